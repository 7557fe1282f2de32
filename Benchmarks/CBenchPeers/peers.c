#define _GNU_SOURCE
#include "CBenchPeers.h"

#include <errno.h>
#include <fcntl.h>
#include <lmdb.h>
#include <stdio.h>

#include <libpmem.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

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

int cbench_lmdb(const char *path, size_t mapsize, int count, int value_size, double *puts_per_second,
                double *gets_per_second) {
    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *txn;
    char key[32];
    char value[4096];
    int rc;
    if (value_size > (int)sizeof(value)) return EINVAL;
    memset(value, 0x76, sizeof(value));
    if ((rc = mdb_env_create(&env)) != 0) return rc;
    if ((rc = mdb_env_set_mapsize(env, mapsize)) != 0) goto out;
    if ((rc = mdb_env_open(env, path, MDB_NOSUBDIR | MDB_WRITEMAP, 0600)) != 0) goto out;
    if ((rc = mdb_txn_begin(env, NULL, 0, &txn)) != 0) goto out;
    if ((rc = mdb_dbi_open(txn, NULL, 0, &dbi)) != 0) { mdb_txn_abort(txn); goto out; }
    if ((rc = mdb_txn_commit(txn)) != 0) goto out;

    uint64_t start = cbench_now_ns();
    for (int i = 0; i < count; i++) {
        snprintf(key, sizeof(key), "k%015d", i);
        MDB_val k = {16, key}, v = {(size_t)value_size, value};
        if ((rc = mdb_txn_begin(env, NULL, 0, &txn)) != 0) goto out;
        if ((rc = mdb_put(txn, dbi, &k, &v, 0)) != 0) { mdb_txn_abort(txn); goto out; }
        if ((rc = mdb_txn_commit(txn)) != 0) goto out;
    }
    *puts_per_second = count / ((cbench_now_ns() - start) / 1e9);

    start = cbench_now_ns();
    if ((rc = mdb_txn_begin(env, NULL, MDB_RDONLY, &txn)) != 0) goto out;
    for (int i = 0; i < count; i++) {
        snprintf(key, sizeof(key), "k%015d", i);
        MDB_val k = {16, key}, v;
        if ((rc = mdb_get(txn, dbi, &k, &v)) != 0) { mdb_txn_abort(txn); goto out; }
    }
    mdb_txn_abort(txn);
    *gets_per_second = count / ((cbench_now_ns() - start) / 1e9);
out:
    mdb_env_close(env);
    return rc;
}

void cbench_store_each_page(void *address, size_t pages, uint8_t value) {
    volatile uint8_t *bytes = address;
    for (size_t page = 0; page < pages; page++) bytes[page * 4096] = value;
}

uint64_t cbench_load_each_page(const void *address, size_t pages) {
    const volatile uint8_t *bytes = address;
    uint64_t sum = 0;
    for (size_t page = 0; page < pages; page++) sum += bytes[page * 4096];
    return sum;
}

int64_t cbench_tmpfs_first_touch(int fd, size_t pages, int store) {
    size_t length = pages * 4096;
    // Fresh holes: whatever an earlier pass gave the file goes back to tmpfs first.
    if (ftruncate(fd, 0) != 0 || ftruncate(fd, (off_t)length) != 0) return -errno;
    void *address = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (address == MAP_FAILED) return -errno;
    uint64_t start = cbench_now_ns();
    uint64_t sum = 0;
    if (store) {
        cbench_store_each_page(address, pages, 1);
    } else {
        sum = cbench_load_each_page(address, pages);
    }
    int64_t elapsed = (int64_t)(cbench_now_ns() - start);
    munmap(address, length);
    // A hole reads as zeros; anything else means the pass did not fault on holes.
    if (sum != 0) return -EINVAL;
    return elapsed;
}

int64_t cbench_time_msync(void *address, size_t length) {
    uint64_t start = cbench_now_ns();
    if (msync(address, length, MS_SYNC) != 0) return -errno;
    return (int64_t)(cbench_now_ns() - start);
}

int64_t cbench_time_pmem_persist(void *address, size_t length) {
    uint64_t start = cbench_now_ns();
    pmem_persist(address, length);
    return (int64_t)(cbench_now_ns() - start);
}
