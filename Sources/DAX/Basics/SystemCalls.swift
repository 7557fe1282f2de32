import CLibPMem
import Glibc

/// The one seam through which DAX makes system calls and libpmem's persistence calls.
///
/// Every call DAX makes to the kernel or to libpmem goes through one of these entries, as
/// swift-system's `Syscalls.swift` funnels its calls: a device carries its seam
/// (`PMemDevice.Options.systemCalls`) and hands it to what it builds (its page map, its media
/// copy, the file systems and mappings made on it), so that tests which inject faults run in
/// parallel. What runs with no device at hand (the process's userfaultfd, lazily zeroed
/// arrays, the region that faults where pages were truncated) uses ``live``.
///
/// Each entry keeps the C call's contract: the same arguments (with Swift types: `Int` for sizes
/// and offsets, `String` for paths), the same result, and on failure the same failure value
/// (`-1`, or `nil` where the C call fills a structure or returns `MAP_FAILED`) with `errno` left
/// as the call set it, so that the caller can read `errno` after the entry returns. A
/// replacement that fails must do the same: set `errno`, then return the failure value. Tests
/// start from ``injectable`` and replace single entries to count calls or to inject failures
/// (`ENOSPC`, `EIO`, `EINTR`) that a healthy machine never produces.
///
/// An entry is a closure: calling one costs an indirect call and a thunk more than calling the
/// C function directly (a dozen instructions, against some forty in `pmem_persist` itself and
/// the cache flush that follows), so the live and the injected calls take one path.
package struct SystemCalls: Sendable {
    // MARK: libpmem

    /// Calls `pmem_map_file(path, length, flags, mode, &mappedLength, &isPmem)`: the mapping, its
    /// length and whether it is persistent memory; nil on failure (`errno` and
    /// `pmem_errormsg()` say why).
    package var pmemMapFile:
        @Sendable (_ path: String, _ length: Int, _ flags: Int32, _ mode: mode_t)
            -> (address: UnsafeMutableRawPointer, length: Int, isPmem: Bool)?
    /// Calls `pmem_is_pmem(address, length)`: whether the whole range is persistent memory that
    /// cache flushing alone makes durable.
    package var pmemIsPmem: @Sendable (_ address: UnsafeRawPointer, _ length: Int) -> Bool
    /// Calls `pmem_unmap(address, length)`; -1 on failure.
    package var pmemUnmap: @Sendable (_ address: UnsafeMutableRawPointer, _ length: Int) -> Int32
    /// Calls `pmem_persist(address, length)`: flushes the range's cache lines, then drains.
    package var persist: @Sendable (_ address: UnsafeRawPointer, _ length: Int) -> Void
    /// Calls `pmem_flush(address, length)`: flushes the range's cache lines without waiting.
    package var flush: @Sendable (_ address: UnsafeRawPointer, _ length: Int) -> Void
    /// Calls `pmem_drain()`: waits until flushed lines are durable (SFENCE).
    package var drain: @Sendable () -> Void
    /// Calls `pmem_memcpy(to, from, length, flags)`: a copy that is durable unless the flags
    /// (`PMEM_F_MEM_*`) say otherwise.
    package var memcpy:
        @Sendable (_ to: UnsafeMutableRawPointer, _ from: UnsafeRawPointer, _ length: Int, _ flags: UInt32) -> Void
    /// Calls `pmem_memset(to, value, length, flags)`.
    package var memset:
        @Sendable (_ to: UnsafeMutableRawPointer, _ value: Int32, _ length: Int, _ flags: UInt32) -> Void
    /// Calls `pmem_msync(address, length)`: `msync(MS_SYNC)` of the page-aligned range; -1 on
    /// failure.
    package var msync: @Sendable (_ address: UnsafeRawPointer, _ length: Int) -> Int32

    // MARK: Memory

    /// Calls `mmap(2)`; nil on failure (`MAP_FAILED`).
    package var mmap:
        @Sendable (
            _ address: UnsafeMutableRawPointer?, _ length: Int, _ protection: Int32, _ flags: Int32,
            _ fd: Int32, _ offset: Int
        ) -> UnsafeMutableRawPointer?
    /// Calls `munmap(2)`; -1 on failure.
    package var munmap: @Sendable (_ address: UnsafeMutableRawPointer, _ length: Int) -> Int32
    /// Calls `mincore(2)`: one byte per page of the range into `vector` (bit 0: resident); -1 on
    /// failure.
    package var mincore:
        @Sendable (_ address: UnsafeMutableRawPointer, _ length: Int, _ vector: UnsafeMutablePointer<UInt8>) -> Int32
    /// Calls `madvise(2)`; -1 on failure.
    package var madvise: @Sendable (_ address: UnsafeMutableRawPointer, _ length: Int, _ advice: Int32) -> Int32
    /// Calls `memfd_create(2)`: a descriptor of a new anonymous file; -1 on failure.
    package var memfdCreate: @Sendable (_ name: String, _ flags: UInt32) -> Int32

    // MARK: Files

    /// Calls `open(2)`: a descriptor; -1 on failure.
    package var open: @Sendable (_ path: String, _ flags: Int32, _ mode: mode_t) -> Int32
    /// Calls `close(2)`; -1 on failure (the descriptor is gone either way, as Linux does).
    package var close: @Sendable (_ fd: Int32) -> Int32
    /// Calls `dup(2)`: a new descriptor of the same open file; -1 on failure.
    package var dup: @Sendable (_ fd: Int32) -> Int32
    /// Calls `stat(2)` (symbolic links followed): the file's status; nil on failure.
    package var stat: @Sendable (_ path: String) -> Glibc.stat?
    /// Calls `fstat(2)`: the status of the open file; nil on failure.
    package var fstat: @Sendable (_ fd: Int32) -> Glibc.stat?
    /// Calls `statvfs(3)`: the status of the file system holding `path`; nil on failure.
    package var statvfs: @Sendable (_ path: String) -> Glibc.statvfs?
    /// Calls `flock(2)` with `LOCK_SH`, `LOCK_EX` or `LOCK_UN`, perhaps with `LOCK_NB`; -1 on
    /// failure (`EWOULDBLOCK`: another open file holds a conflicting lock).
    package var flock: @Sendable (_ fd: Int32, _ operation: Int32) -> Int32
    /// Calls `unlink(2)`; -1 on failure.
    package var unlink: @Sendable (_ path: String) -> Int32
    /// Calls `ftruncate(2)`; -1 on failure.
    package var ftruncate: @Sendable (_ fd: Int32, _ length: Int) -> Int32
    /// Calls `fallocate(2)`: gives a file's range storage (mode 0) or punches it out; -1 on failure.
    package var fallocate: @Sendable (_ fd: Int32, _ mode: Int32, _ offset: Int, _ length: Int) -> Int32
    /// Calls `lseek(2)`, for `SEEK_DATA` and `SEEK_HOLE`: the new offset; -1 on failure (`ENXIO`
    /// past the data).
    package var lseek: @Sendable (_ fd: Int32, _ offset: Int, _ whence: Int32) -> Int
    /// Calls `pread(2)` into `buffer`: the bytes read, 0 at the end of the file; -1 on failure.
    package var pread: @Sendable (_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, _ offset: Int) -> Int
    /// Calls `pwrite(2)` of `buffer`: the bytes written; -1 on failure.
    package var pwrite: @Sendable (_ fd: Int32, _ buffer: UnsafeRawBufferPointer, _ offset: Int) -> Int

    // MARK: userfaultfd

    /// Calls `userfaultfd(2)` with `flags`: a descriptor; -1 on failure.
    package var userfaultfd: @Sendable (_ flags: Int32) -> Int32
    /// Calls `ioctl(2)` with a pointer argument; -1 on failure.
    package var ioctl: @Sendable (_ fd: Int32, _ request: UInt, _ argument: UnsafeMutableRawPointer) -> Int32
    /// Calls `read(2)` for one message of a userfaultfd: 1 and the page fault's address, flags
    /// (`UFFD_PAGEFAULT_FLAG_*`) and faulting thread, 0 for a message of another kind; -1 on
    /// failure (`EINTR`, `EAGAIN`).
    package var readUserFault:
        @Sendable (_ fd: Int32, _ address: inout UInt64, _ flags: inout UInt64, _ thread: inout UInt32) -> Int32

    /// The real calls.
    package static let live = SystemCalls(
        pmemMapFile: { path, length, flags, mode in
            var mapped = 0
            var isPmem: Int32 = 0
            guard let address = pmem_map_file(path, length, flags, mode, &mapped, &isPmem) else { return nil }
            return (address, mapped, isPmem != 0)
        },
        pmemIsPmem: { address, length in pmem_is_pmem(address, length) != 0 },
        pmemUnmap: { address, length in pmem_unmap(address, length) },
        persist: { address, length in pmem_persist(address, length) },
        flush: { address, length in pmem_flush(address, length) },
        drain: { pmem_drain() },
        memcpy: { to, from, length, flags in _ = pmem_memcpy(to, from, length, flags) },
        memset: { to, value, length, flags in _ = pmem_memset(to, value, length, flags) },
        msync: { address, length in pmem_msync(address, length) },
        mmap: { address, length, protection, flags, fd, offset in
            let result = Glibc.mmap(address, length, protection, flags, fd, off_t(offset))
            return result == MAP_FAILED ? nil : result
        },
        munmap: { address, length in Glibc.munmap(address, length) },
        mincore: { address, length, vector in Glibc.mincore(address, length, vector) },
        madvise: { address, length, advice in Glibc.madvise(address, length, advice) },
        memfdCreate: { name, flags in dax_memfd_create(name, flags) },
        open: { path, flags, mode in Glibc.open(path, flags, mode) },
        close: { fd in Glibc.close(fd) },
        dup: { fd in Glibc.dup(fd) },
        stat: { path in callStat(path) },
        fstat: { fd in callFstat(fd) },
        statvfs: { path in callStatvfs(path) },
        flock: { fd, operation in callFlock(fd, operation) },
        unlink: { path in Glibc.unlink(path) },
        ftruncate: { fd, length in Glibc.ftruncate(fd, off_t(length)) },
        fallocate: { fd, mode, offset, length in dax_fallocate(fd, mode, Int64(offset), Int64(length)) },
        lseek: { fd, offset, whence in Int(Glibc.lseek(fd, off_t(offset), whence)) },
        pread: { fd, buffer, offset in Glibc.pread(fd, buffer.baseAddress, buffer.count, off_t(offset)) },
        pwrite: { fd, buffer, offset in Glibc.pwrite(fd, buffer.baseAddress, buffer.count, off_t(offset)) },
        userfaultfd: { flags in dax_userfaultfd(flags) },
        ioctl: { fd, request, argument in dax_ioctl(fd, request, argument) },
        readUserFault: { fd, address, flags, thread in dax_uffd_read_fault(fd, &address, &flags, &thread) }
    )

    /// The real calls, as a value to replace entries in: tests start here.
    package static var injectable: SystemCalls { live }
}

// The calls whose C name is also the name of a C structure, which a member of `SystemCalls`
// cannot name unambiguously.

private func callStat(_ path: String) -> Glibc.stat? {
    var info = Glibc.stat()
    return stat(path, &info) == 0 ? info : nil
}

private func callFstat(_ fd: Int32) -> Glibc.stat? {
    var info = Glibc.stat()
    return fstat(fd, &info) == 0 ? info : nil
}

private func callStatvfs(_ path: String) -> Glibc.statvfs? {
    var info = Glibc.statvfs()
    return statvfs(path, &info) == 0 ? info : nil
}

private func callFlock(_ fd: Int32, _ operation: Int32) -> Int32 { flock(fd, operation) }

/// The text of libpmem's last error on this thread (`pmem_errormsg`).
func pmemErrorMessage() -> String {
    guard let text = pmem_errormsg() else { return "" }
    return String(cString: text)
}
