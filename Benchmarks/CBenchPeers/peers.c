#define _GNU_SOURCE
#include "CBenchPeers.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>
#include <lmdb.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>

#include <libpmem.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
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

int64_t cbench_time_protect_and_persist(void *address, size_t length) {
    uint64_t start = cbench_now_ns();
    if (mprotect(address, length, PROT_READ) != 0) return -errno;
    pmem_persist(address, length);
    int64_t elapsed = (int64_t)(cbench_now_ns() - start);
    if (mprotect(address, length, PROT_READ | PROT_WRITE) != 0) return -errno;
    return elapsed;
}

// The bare userfaultfd peer: the least any user-space fault handler does per fault.
struct cbench_uffd_handler {
    int uffd;
    int stop;  // an eventfd: written once to end the thread
    void *zeros;
    long spin_ns;  // polls for the next fault this long before sleeping in poll
};

static void *cbench_uffd_serve(void *argument) {
    struct cbench_uffd_handler *handler = argument;
    struct pollfd fds[2] = {{handler->uffd, POLLIN, 0}, {handler->stop, POLLIN, 0}};
    for (;;) {
        int ready = 0;
        uint64_t spun = cbench_now_ns();
        while (handler->spin_ns > 0 && (ready = poll(fds, 2, 0)) == 0 &&
               cbench_now_ns() - spun < (uint64_t)handler->spin_ns) {
            __builtin_ia32_pause();
        }
        if (ready < 0) {
            if (errno != EINTR) return NULL;
            continue;
        }
        if (ready == 0 && poll(fds, 2, -1) < 0 && errno != EINTR) return NULL;
        if (fds[1].revents) return NULL;
        struct uffd_msg message;
        if (read(handler->uffd, &message, sizeof(message)) != sizeof(message)) continue;
        if (message.event != UFFD_EVENT_PAGEFAULT) continue;
        struct uffdio_copy copy = {
            .dst = message.arg.pagefault.address & ~(uint64_t)4095,
            .src = (uint64_t)(uintptr_t)handler->zeros,
            .len = 4096,
        };
        // EEXIST: another thread's fault on the page was resolved first; it is woken all the same.
        if (ioctl(handler->uffd, UFFDIO_COPY, &copy) != 0 && errno != EEXIST) return NULL;
    }
}

static int cbench_open_userfaultfd(void) {
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0) {
        int device = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (device < 0) return -1;
        uffd = ioctl(device, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        close(device);
    }
    if (uffd < 0) return -1;
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(uffd, UFFDIO_API, &api) != 0) {
        close(uffd);
        return -1;
    }
    return uffd;
}

int cbench_pin_thread(int tid, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (cpu >= 0) {
        CPU_SET(cpu, &set);
    } else {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        for (long each = 0; each < cpus && each < CPU_SETSIZE; each++) CPU_SET(each, &set);
    }
    return sched_setaffinity(tid, sizeof(set), &set) == 0 ? 0 : -errno;
}

int cbench_gettid(void) { return (int)gettid(); }

int cbench_save_affinity(int tid, uint64_t mask[16]) {
    memset(mask, 0, 16 * sizeof mask[0]);
    return sched_getaffinity(tid, 16 * sizeof mask[0], (cpu_set_t *)mask) == 0 ? 0 : -errno;
}

int cbench_restore_affinity(int tid, const uint64_t mask[16]) {
    return sched_setaffinity(tid, 16 * sizeof mask[0], (const cpu_set_t *)mask) == 0 ? 0 : -errno;
}

// A handler bound to one CPU (cpu >= 0) before it serves.
struct cbench_bound_handler {
    struct cbench_uffd_handler *handler;
    int cpu;
};

static void *cbench_uffd_serve_bound(void *argument) {
    struct cbench_bound_handler *bound = argument;
    if (bound->cpu >= 0) cbench_pin_thread(0, bound->cpu);
    return cbench_uffd_serve(bound->handler);
}

int64_t cbench_uffd_first_touch(size_t pages, int store, int cpu, long spin_ns, int per_cpu) {
    size_t length = pages * 4096;
    int64_t result = -EINVAL;
    struct cbench_uffd_handler handler = {
        .uffd = cbench_open_userfaultfd(), .stop = -1, .zeros = NULL, .spin_ns = spin_ns};
    if (handler.uffd < 0) return -errno;
    // One handler, or one bound to each CPU the caller may use (at most 64).
    struct cbench_bound_handler bound[64];
    int threads = 0;
    cpu_set_t usable;
    if (cpu < 0 && per_cpu && sched_getaffinity(0, sizeof usable, &usable) == 0) {
        for (int each = 0; each < CPU_SETSIZE && threads < 64; each++) {
            if (CPU_ISSET(each, &usable)) bound[threads++] = (struct cbench_bound_handler){&handler, each};
        }
    }
    if (threads == 0) bound[threads++] = (struct cbench_bound_handler){&handler, -1};
    void *address = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    handler.zeros = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    handler.stop = eventfd(0, EFD_CLOEXEC);
    struct uffdio_register registration = {
        .range = {.start = (uint64_t)(uintptr_t)address, .len = length},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    pthread_t thread[64];
    int started = 0;
    if (address == MAP_FAILED || handler.zeros == MAP_FAILED || handler.stop < 0 ||
        ioctl(handler.uffd, UFFDIO_REGISTER, &registration) != 0 ||
        (cpu >= 0 && cbench_pin_thread(0, cpu) != 0)) {
        result = -errno;
    } else {
        while (started < threads &&
               pthread_create(&thread[started], NULL, cbench_uffd_serve_bound, &bound[started]) == 0) {
            started++;
        }
    }
    if (started < threads) {
        if (result == -EINVAL) result = -EAGAIN;
        uint64_t one = 1;
        if (handler.stop >= 0 && write(handler.stop, &one, sizeof(one)) != sizeof(one)) result = -errno;
        for (int each = 0; each < started; each++) pthread_join(thread[each], NULL);
    } else {
        uint64_t start = cbench_now_ns();
        uint64_t sum = 0;
        if (store) {
            cbench_store_each_page(address, pages, 1);
        } else {
            sum = cbench_load_each_page(address, pages);
        }
        result = sum == 0 ? (int64_t)(cbench_now_ns() - start) : -EINVAL;
        uint64_t one = 1;
        if (write(handler.stop, &one, sizeof(one)) != sizeof(one)) result = -errno;
        for (int each = 0; each < started; each++) pthread_join(thread[each], NULL);
    }
    if (cpu >= 0) cbench_pin_thread(0, -1);
    if (handler.stop >= 0) close(handler.stop);
    if (handler.zeros != MAP_FAILED && handler.zeros != NULL) munmap(handler.zeros, 4096);
    if (address != MAP_FAILED) munmap(address, length);
    close(handler.uffd);
    return result;
}

static int64_t cbench_minor_faults(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_minflt;
}

int64_t cbench_fork_cow(size_t pages, int64_t *faults) {
    size_t length = pages * 4096;
    void *address = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (address == MAP_FAILED) return -errno;
    // 4 KiB pages, as a DAX page here: a huge page would be split at the first fault instead.
    if (madvise(address, length, MADV_NOHUGEPAGE) != 0) {
        int error = errno;
        munmap(address, length);
        return -error;
    }
    cbench_store_each_page(address, pages, 1);
    int gate[2];
    if (pipe(gate) != 0) {
        int error = errno;
        munmap(address, length);
        return -error;
    }
    pid_t child = fork();
    if (child == 0) {
        // The child only waits: it keeps every page mapped until the parent is done. read and
        // _exit are all it may call in the copy of a process with other threads.
        char byte;
        close(gate[1]);
        while (read(gate[0], &byte, 1) < 0 && errno == EINTR) {}
        _exit(0);
    }
    int64_t result;
    close(gate[0]);
    if (child < 0) {
        result = -errno;
    } else {
        int64_t before = cbench_minor_faults();
        uint64_t start = cbench_now_ns();
        cbench_store_each_page(address, pages, 2);
        result = (int64_t)(cbench_now_ns() - start);
        *faults = cbench_minor_faults() - before;
    }
    // Closing the pipe lets the child go.
    close(gate[1]);
    if (child > 0) {
        int status;
        while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) result = -ECHILD;
    }
    munmap(address, length);
    return result;
}

int64_t cbench_ficlone(const char *source, const char *destination) {
    int from = open(source, O_RDONLY | O_CLOEXEC);
    if (from < 0) return -errno;
    int to = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (to < 0) {
        int error = errno;
        close(from);
        return -error;
    }
    uint64_t start = cbench_now_ns();
    int64_t result = ioctl(to, FICLONE, from) == 0 ? (int64_t)(cbench_now_ns() - start) : -errno;
    close(to);
    close(from);
    return result;
}

int64_t cbench_remap_migrate(int fd, size_t length, size_t chunk) {
    char *file = mmap(NULL, 2 * length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (file == MAP_FAILED) return -errno;
    char *view = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (view == MAP_FAILED) {
        int error = errno;
        munmap(file, 2 * length);
        return -error;
    }
    int64_t result = 0;
    uint64_t start = cbench_now_ns();
    for (size_t done = 0; done < length; done += chunk) {
        size_t n = length - done < chunk ? length - done : chunk;
        if (mmap(view + done, n, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED) {
            result = -errno;
            break;
        }
        pmem_memcpy(file + length + done, file + done, n, PMEM_F_MEM_NONTEMPORAL | PMEM_F_MEM_NODRAIN);
        if (mmap(view + done, n, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_SHARED | MAP_POPULATE, fd,
                 (off_t)(length + done)) == MAP_FAILED) {
            result = -errno;
            break;
        }
    }
    pmem_drain();
    if (result == 0) result = (int64_t)(cbench_now_ns() - start);
    munmap(view, length);
    munmap(file, 2 * length);
    return result;
}
