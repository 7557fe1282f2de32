#define _GNU_SOURCE
#include "CBenchPeers.h"

#include <fcntl.h>

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

int cbench_fallocate(int fd, int64_t length) { return fallocate(fd, 0, 0, (off_t)length); }

void cbench_pmem_write_loop(void *destination, const void *source, size_t length, size_t request) {
    for (size_t done = 0; done + request <= length; done += request) {
        pmem_memcpy((char *)destination + done, source, request, PMEM_F_MEM_NONTEMPORAL);
    }
}

void cbench_read_loop(void *buffer, const void *source, size_t length, size_t request) {
    for (size_t done = 0; done + request <= length; done += request) {
        memcpy(buffer, (const char *)source + done, request);
    }
}
