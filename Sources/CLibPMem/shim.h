// The C boundary of DAX: libpmem, and the few Linux interfaces that Swift's Glibc module does
// not export. Nothing here is public API of DAX; no C type crosses into it.
#ifndef DAX_CLIBPMEM_SHIM_H
#define DAX_CLIBPMEM_SHIM_H

#include <libpmem.h>

#include <errno.h>
#include <stdio.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <stdint.h>
#include <sys/file.h>
#include <poll.h>
#include <time.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

// MAP_SYNC asks for a mapping whose page tables are durable with the data (fsdax only);
// it must be combined with MAP_SHARED_VALIDATE so that a kernel that does not know it refuses.
#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif
#ifndef MAP_SYNC
#define MAP_SYNC 0x80000
#endif
static const int dax_MAP_SHARED_VALIDATE = MAP_SHARED_VALIDATE;
static const int dax_MAP_SYNC = MAP_SYNC;
static const unsigned int dax_MFD_CLOEXEC = 0x0001U;

/// Calls `memfd_create(2)` through `syscall(2)` (Glibc's Swift module does not export it).
static inline int dax_memfd_create(const char *name, unsigned int flags) {
    return (int)syscall(SYS_memfd_create, name, flags);
}

/// Calls `fallocate(2)` through `syscall(2)` (Glibc's Swift module does not export it).
static inline int dax_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return (int)syscall(SYS_fallocate, fd, mode, offset, length);
}
static const int dax_FALLOC_FL_KEEP_SIZE = 0x01;
static const int dax_FALLOC_FL_PUNCH_HOLE = 0x02;
static const int dax_SEEK_DATA = 3;
static const int dax_SEEK_HOLE = 4;

// userfaultfd(2): the ioctl numbers are function-like macros that Swift cannot import.
static const unsigned long dax_USERFAULTFD_IOC_NEW = USERFAULTFD_IOC_NEW;
static const unsigned long dax_UFFDIO_API = UFFDIO_API;
static const unsigned long dax_UFFDIO_REGISTER = UFFDIO_REGISTER;
static const unsigned long dax_UFFDIO_UNREGISTER = UFFDIO_UNREGISTER;
static const unsigned long dax_UFFDIO_WRITEPROTECT = UFFDIO_WRITEPROTECT;
static const unsigned long dax_UFFDIO_WAKE = UFFDIO_WAKE;
static const unsigned long dax_UFFDIO_COPY = UFFDIO_COPY;
static const unsigned long dax_UFFDIO_ZEROPAGE = UFFDIO_ZEROPAGE;
static const unsigned long long dax_UFFDIO_COPY_MODE_WP = UFFDIO_COPY_MODE_WP;
static const unsigned long long dax_UFFDIO_COPY_MODE_DONTWAKE = UFFDIO_COPY_MODE_DONTWAKE;
static const unsigned long long dax_UFFDIO_ZEROPAGE_MODE_DONTWAKE = UFFDIO_ZEROPAGE_MODE_DONTWAKE;
static const unsigned long long dax_UFFDIO_WRITEPROTECT_MODE_DONTWAKE = UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
static const unsigned long long dax_UFFD_FEATURE_THREAD_ID = UFFD_FEATURE_THREAD_ID;
static const unsigned long long dax_UFFD_API = UFFD_API;
static const unsigned long long dax_UFFD_FEATURE_WP_HUGETLBFS_SHMEM = UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
static const unsigned long long dax_UFFD_USER_MODE_ONLY = UFFD_USER_MODE_ONLY;
static const unsigned long long dax_UFFDIO_REGISTER_MODE_WP = UFFDIO_REGISTER_MODE_WP;
static const unsigned long long dax_UFFDIO_REGISTER_MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING;
static const unsigned long long dax_UFFDIO_WRITEPROTECT_MODE_WP = UFFDIO_WRITEPROTECT_MODE_WP;
static const unsigned long long dax_UFFD_PAGEFAULT_FLAG_WRITE = UFFD_PAGEFAULT_FLAG_WRITE;
static const unsigned long long dax_UFFD_PAGEFAULT_FLAG_WP = UFFD_PAGEFAULT_FLAG_WP;

/// Calls `userfaultfd(2)` through `syscall(2)`.
static inline int dax_userfaultfd(int flags) {
    return (int)syscall(SYS_userfaultfd, flags);
}

/// Calls `ioctl(2)` with a pointer argument (Swift cannot call the variadic `ioctl`).
static inline int dax_ioctl(int fd, unsigned long request, void *argument) {
    return ioctl(fd, request, argument);
}

/// Reads one message from a userfaultfd; returns 1 and the fault's address, flags and faulting
/// thread (0 unless `UFFD_FEATURE_THREAD_ID` was asked for) for a page fault, 0 for another event,
/// -1 with errno set when `read(2)` fails.
static inline int dax_uffd_read_fault(int fd, uint64_t *address, uint64_t *flags, uint32_t *thread) {
    struct uffd_msg message;
    ssize_t got = read(fd, &message, sizeof message);
    if (got != (ssize_t)sizeof message) return -1;
    if (message.event != UFFD_EVENT_PAGEFAULT) return 0;
    *address = message.arg.pagefault.address;
    *flags = message.arg.pagefault.flags;
    *thread = message.arg.pagefault.feat.ptid;
    return 1;
}

/// Waits until `fd` is readable or `stop` (an eventfd) is signalled: 1 for `fd`, 0 for `stop`,
/// -1 with errno set when `poll(2)` fails. For the first `spin_ns` nanoseconds it polls without
/// sleeping, so that the thread's CPU does not go idle between faults that come close together.
static inline int dax_wait_readable(int fd, int stop, long spin_ns) {
    struct pollfd fds[2] = {{.fd = fd, .events = POLLIN}, {.fd = stop, .events = POLLIN}};
    int got = 0;
    if (spin_ns > 0) {
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (;;) {
            got = poll(fds, 2, 0);
            if (got != 0) break;
            clock_gettime(CLOCK_MONOTONIC, &now);
            long elapsed = (now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec);
            if (elapsed >= spin_ns) break;
            __builtin_ia32_pause();
        }
    }
    if (got == 0) got = poll(fds, 2, -1);
    if (got < 0) return -1;
    if (fds[1].revents) return 0;
    return 1;
}


/// Writes to `cpus` (room for `room`) the numbers of the CPUs the calling thread may run on
/// (`sched_getaffinity`), lowest first, and returns how many there are; 0 when the kernel's
/// mask does not fit 8192 bits or cannot be read.
static inline int dax_usable_cpu_list(int *cpus, int room) {
    unsigned long mask[128] = {0};
    long got = syscall(SYS_sched_getaffinity, 0, sizeof mask, mask);
    if (got <= 0) return 0;
    int count = 0;
    int bits = (int)(8 * sizeof mask[0]);
    for (long word = 0; word < got / (long)sizeof mask[0]; word++) {
        for (int bit = 0; bit < bits; bit++) {
            if (!(mask[word] & (1UL << bit))) continue;
            if (count < room) cpus[count] = (int)(word * bits + bit);
            count++;
        }
    }
    return count;
}

/// The CPUs the calling thread may run on (`sched_getaffinity`), at least 1; the CPUs online
/// if the kernel's mask does not fit 8192 bits.
static inline int dax_usable_cpus(void) {
    int count = dax_usable_cpu_list(NULL, 0);
    if (count > 0) return count;
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? (int)online : 1;
}

/// Binds the calling thread to CPU `cpu` (`sched_setaffinity`); 0, or -1 with errno set.
static inline int dax_bind_to_cpu(int cpu) {
    unsigned long mask[128] = {0};
    if (cpu < 0 || cpu >= (int)(8 * sizeof mask)) {
        errno = EINVAL;
        return -1;
    }
    mask[cpu / (8 * sizeof mask[0])] |= 1UL << (cpu % (8 * sizeof mask[0]));
    return (int)syscall(SYS_sched_setaffinity, 0, sizeof mask, mask);
}

/// The CPU the calling thread runs on now (`getcpu`), or -1.
static inline int dax_current_cpu(void) {
    unsigned cpu = 0;
    return syscall(SYS_getcpu, &cpu, NULL, NULL) == 0 ? (int)cpu : -1;
}

/// Flushes standard output: 0 when everything written to it so far got out, -1 (errno set, where
/// the failed write set it) when a write failed, now or before.
static inline int dax_flush_standard_output(void) {
    int flushed = fflush(stdout);
    return flushed == 0 && !ferror(stdout) ? 0 : -1;
}

/// Calls `eventfd(2)` with `EFD_CLOEXEC`.
static inline int dax_eventfd(void) {
    return eventfd(0, EFD_CLOEXEC);
}

/// Sends `signal` to thread `thread` of this process (`tgkill(2)`).
static inline int dax_tgkill(int thread, int signal) {
    return (int)syscall(SYS_tgkill, getpid(), thread, signal);
}

/// ThreadSanitizer's annotations, weak: present only in a `--sanitize=thread` build. The standard
/// library's `Mutex` waits with futexes that TSan cannot see on Linux, so DAX tells it about each
/// lock hand-over (see `Mutex.withTrackedLock`). Without TSan these are a never-taken branch.
void __tsan_acquire(void *address) __attribute__((weak));
void __tsan_release(void *address) __attribute__((weak));

static inline void dax_tsan_acquire(void *address) {
    if (__tsan_acquire) __tsan_acquire(address);
}

static inline void dax_tsan_release(void *address) {
    if (__tsan_release) __tsan_release(address);
}

/// CRC-32C (Castagnoli) of `length` bytes, continuing from `crc`, with the SSE4.2 `crc32`
/// instruction. Only call it when `dax_cpu_has_crc32c()` says the CPU has the instruction.
__attribute__((target("sse4.2")))
static inline uint32_t dax_crc32c_hardware(uint32_t crc, const void *data, size_t length) {
    const uint8_t *bytes = (const uint8_t *)data;
    uint64_t value = ~crc;
    while (length >= 8) {
        uint64_t word;
        __builtin_memcpy(&word, bytes, 8);
        value = __builtin_ia32_crc32di(value, word);
        bytes += 8;
        length -= 8;
    }
    uint32_t small = (uint32_t)value;
    while (length > 0) {
        small = __builtin_ia32_crc32qi(small, *bytes);
        bytes += 1;
        length -= 1;
    }
    return ~small;
}

/// Whether the CPU has SSE4.2's `crc32` instruction.
static inline int dax_cpu_has_crc32c(void) {
    return __builtin_cpu_supports("sse4.2");
}

// The pin tallies' per-thread block (Pages/PinTally.swift): a C thread-local, because Swift has no
// thread-local variables and `pthread_getspecific` costs a call and a dozen instructions on every
// pin and unpin. Weak, so that every object file that uses it shares one definition; initial-exec,
// so that reading it is one load from the thread pointer, also from a shared library.
__attribute__((weak, tls_model("initial-exec"))) __thread void *dax_pin_tally_block = NULL;

/// The calling thread's pin tally block, or NULL before its first pin.
static inline void *dax_pin_tally_block_get(void) {
    return dax_pin_tally_block;
}

/// Sets the calling thread's pin tally block.
static inline void dax_pin_tally_block_set(void *block) {
    dax_pin_tally_block = block;
}

#endif
