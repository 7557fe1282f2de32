// Peers written in C, so that the benchmarks compare DAX with what a C program using libpmem or
// plain system calls does, measured in the same process.
#ifndef CBENCHPEERS_H
#define CBENCHPEERS_H

#include <stddef.h>
#include <stdint.h>

/// Monotonic time in nanoseconds.
uint64_t cbench_now_ns(void);

/// `iterations` times: store 64 bytes at `address` (eight 8-byte stores), then `pmem_persist` them.
void cbench_store_persist_loop(void *address, uint64_t iterations);

/// `iterations` times: an atomic increment and decrement of `*counter` (lock xadd pairs).
void cbench_atomic_pair_loop(uint64_t *counter, uint64_t iterations);

/// Copies `length` bytes from `source` to `destination` in `chunk`-byte memcpy calls.
void cbench_memcpy_chunks(void *destination, const void *source, size_t length, size_t chunk);

/// What fio's libpmem engine does per write with direct=1 sync=1, over `length` bytes in
/// `request`-byte steps: `pmem_memcpy(dst, src, request, PMEM_F_MEM_NONTEMPORAL)` (which drains).
void cbench_pmem_write_loop(void *destination, const void *source, size_t length, size_t request);

/// What fio's libpmem engine does per read: `memcpy` from the mapping into one buffer.
void cbench_read_loop(void *buffer, const void *source, size_t length, size_t request);

/// `fallocate(fd, 0, 0, length)`: what tmpfs does to give a file `length` bytes of zeroed pages.
int cbench_fallocate(int fd, int64_t length);

/// LMDB on a file at `path` (MDB_NOSUBDIR | MDB_WRITEMAP, map `mapsize` bytes): `count` puts of
/// 16-byte keys `k%015d` and `value_size`-byte values, one write transaction each (durable when it
/// returns, as a kvstore put is), then `count` gets in one read transaction. Returns 0 and the rates
/// in operations per second, or an LMDB error code.
int cbench_lmdb(const char *path, size_t mapsize, int count, int value_size, double *puts_per_second,
                double *gets_per_second);

/// Stores `value` to the first byte of each of `pages` 4 KiB pages from `address`: one store per
/// page, so that on a fresh mapping each store is one write fault.
void cbench_store_each_page(void *address, size_t pages, uint8_t value);

/// Loads the first byte of each of `pages` 4 KiB pages from `address` and returns their sum: one
/// load per page, so that on a fresh mapping each load is one read fault.
uint64_t cbench_load_each_page(const void *address, size_t pages);

/// The kernel's first-touch fault on tmpfs: gives the file at `fd` `pages` fresh holes (ftruncate
/// to 0, then to `pages` * 4096), maps it `MAP_SHARED` without populating it, and stores to
/// (`store` != 0) or loads from each page once, then unmaps. Returns the nanoseconds of the stores
/// or loads alone (each one a write or read fault of shmem), or -errno.
int64_t cbench_tmpfs_first_touch(int fd, size_t pages, int store);

/// `msync(address, length, MS_SYNC)`, timed: nanoseconds, or -errno.
int64_t cbench_time_msync(void *address, size_t length);

/// `pmem_persist(address, length)`, timed: nanoseconds. What making a whole mapping durable costs
/// when nothing tracks which of its pages are dirty.
int64_t cbench_time_pmem_persist(void *address, size_t length);

/// Write-protects `length` bytes at `address` (`mprotect(PROT_READ)`), then `pmem_persist`s
/// them: the least a sync that tracks dirty pages does with every page dirty (one walk of the
/// page table to protect them, one flush). Returns the nanoseconds of both, or -errno; the range
/// is writable again afterwards (not timed).
int64_t cbench_time_protect_and_persist(void *address, size_t length);

/// The least a fault handler in user space does: a userfaultfd (missing mode) on a fresh
/// anonymous mapping of `pages` pages, and a thread that answers each fault with `UFFDIO_COPY` of
/// a zeroed page (poll, read, ioctl). Stores to (`store` != 0) or loads from each page once, and
/// returns the nanoseconds of the stores or loads alone, or -errno. With `cpu` >= 0 the caller and
/// the handler thread run on that CPU alone (the caller's affinity is reset to every CPU after).
/// Otherwise, with `per_cpu` != 0 there is one handler thread bound to each CPU the caller may
/// use, as ours has (`DAXFileSystem.faultHandlerThreads`). Each handler polls for the next fault
/// for `spin_ns` nanoseconds before it sleeps, as ours does (`DAXFileSystem.faultHandlerSpin`).
int64_t cbench_uffd_first_touch(size_t pages, int store, int cpu, long spin_ns, int per_cpu);

/// `sched_setaffinity` of thread `tid` (0: the caller) to CPU `cpu` alone, or to every online CPU
/// when `cpu` < 0. Returns 0 or -errno.
int cbench_pin_thread(int tid, int cpu);

/// Saves the CPU affinity of thread `tid` (0: the caller) in `mask` (1024 bits), or sets it from
/// there again. Return 0 or -errno.
int cbench_save_affinity(int tid, uint64_t mask[16]);
int cbench_restore_affinity(int tid, const uint64_t mask[16]);

/// The caller's thread id (`gettid`).
int cbench_gettid(void);

/// The kernel's copy-on-write fault on anonymous memory after `fork()`: maps `pages` private
/// anonymous 4 KiB pages (`MADV_NOHUGEPAGE`), stores to each so that it has a page of its own,
/// forks a child that waits on a pipe without touching them, then stores one byte to each page in
/// the parent while the child is alive: each page is mapped by both, so each store copies it.
/// Returns the nanoseconds of those stores alone, or -errno; `*faults` is the parent's minor
/// faults during them (one per page when every store copied). The child exits before it returns.
int64_t cbench_fork_cow(size_t pages, int64_t *faults);

/// `ioctl(FICLONE)`: makes `destination` (created; it must not exist) share the blocks of
/// `source`, on a file system with reflinks (xfs with `reflink=1`). Returns the nanoseconds of the
/// ioctl alone, or -errno; `destination` is left for the caller to remove.
int64_t cbench_ficlone(const char *source, const char *destination);

/// Page migration written directly against the kernel: `fd` is a tmpfs file of 2 * `length`
/// bytes, all allocated. Maps all of it, and its first half again, populated (untimed), then
/// times moving the first half to the second `chunk` bytes at a time: unmap the chunk (an
/// inaccessible anonymous mapping over it), non-temporal copy to the second half through the
/// mapping of the whole file, map the copy populated in its place; one drain at the end.
/// Returns ns, or -errno.
int64_t cbench_remap_migrate(int fd, size_t length, size_t chunk);

#endif
