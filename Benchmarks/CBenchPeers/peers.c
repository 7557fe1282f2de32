#include "CBenchPeers.h"

#include <libpmem.h>
#include <string.h>
#include <time.h>

uint64_t cbench_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void cbench_store_persist_loop(void *address, uint64_t iterations) {
    volatile uint64_t *words = address;
    for (uint64_t i = 0; i < iterations; i++) {
        for (int w = 0; w < 8; w++) words[w] = i + (uint64_t)w;
        pmem_persist(address, 64);
    }
}

void cbench_atomic_pair_loop(uint64_t *counter, uint64_t iterations) {
    for (uint64_t i = 0; i < iterations; i++) {
        __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
        __atomic_fetch_sub(counter, 1, __ATOMIC_RELAXED);
    }
}

void cbench_memcpy_chunks(void *destination, const void *source, size_t length, size_t chunk) {
    for (size_t done = 0; done < length; done += chunk) {
        size_t n = length - done < chunk ? length - done : chunk;
        memcpy((char *)destination + done, (const char *)source + done, n);
    }
}
