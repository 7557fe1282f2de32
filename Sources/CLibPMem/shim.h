// The C boundary of DAX: libpmem, and the few Linux interfaces that Swift's Glibc module does
// not export. Nothing here is public API of DAX; no C type crosses into it.
#ifndef DAX_CLIBPMEM_SHIM_H
#define DAX_CLIBPMEM_SHIM_H

#include <libpmem.h>

#include <errno.h>
#include <stdint.h>
#include <sys/file.h>
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
static const int dax_MAP_FIXED_NOREPLACE = 0x100000;

/// Calls `memfd_create(2)` through `syscall(2)` (Glibc's Swift module does not export it).
static inline int dax_memfd_create(const char *name, unsigned int flags) {
    return (int)syscall(SYS_memfd_create, name, flags);
}

#endif
