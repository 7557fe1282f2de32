import CLibPMem
import Glibc

/// The one seam through which DAX makes system calls and libpmem's persistence calls.
///
/// Production code uses ``live``. Tests replace single entries to count calls or to inject
/// failures (`ENOSPC`, `EIO`, `EINTR`) that a healthy machine never produces. A replacement that
/// fails must return the failure value and set `errno`, as the real call does. The seam travels with
/// a device (`PMemDevice.Options`), so tests that inject faults can run in parallel.
package struct SystemCalls: Sendable {
    /// `pmem_map_file(path, len, flags, mode, &mappedLength, &isPmem)`; nil on failure.
    package var pmemMapFile:
        @Sendable (_ path: String, _ length: Int, _ flags: Int32, _ mode: mode_t)
            -> (address: UnsafeMutableRawPointer, length: Int, isPmem: Bool)?
    /// `pmem_unmap`.
    package var pmemUnmap: @Sendable (_ address: UnsafeMutableRawPointer, _ length: Int) -> Int32
    /// `pmem_persist`: flush the range's cache lines, then drain.
    package var persist: @Sendable (_ address: UnsafeRawPointer, _ length: Int) -> Void
    /// `pmem_flush`: flush the range's cache lines without waiting.
    package var flush: @Sendable (_ address: UnsafeRawPointer, _ length: Int) -> Void
    /// `pmem_drain`: wait until flushed lines are durable (SFENCE).
    package var drain: @Sendable () -> Void
    /// `pmem_memcpy(dest, src, len, flags)`: a copy that is durable unless the flags say otherwise.
    package var memcpy:
        @Sendable (_ to: UnsafeMutableRawPointer, _ from: UnsafeRawPointer, _ length: Int, _ flags: UInt32) -> Void
    /// `pmem_memset(dest, value, len, flags)`.
    package var memset:
        @Sendable (_ to: UnsafeMutableRawPointer, _ value: Int32, _ length: Int, _ flags: UInt32) -> Void
    /// `pmem_msync`: `msync(MS_SYNC)` of the page-aligned range.
    package var msync: @Sendable (_ address: UnsafeRawPointer, _ length: Int) -> Int32
    /// `mmap(2)`; nil on failure (`MAP_FAILED`).
    package var mmap:
        @Sendable (
            _ address: UnsafeMutableRawPointer?, _ length: Int, _ protection: Int32, _ flags: Int32,
            _ fd: Int32, _ offset: Int
        ) -> UnsafeMutableRawPointer?
    /// `munmap(2)`.
    package var munmap: @Sendable (_ address: UnsafeMutableRawPointer, _ length: Int) -> Int32
    /// `open(2)`.
    package var open: @Sendable (_ path: String, _ flags: Int32, _ mode: mode_t) -> Int32
    /// `fallocate(2)`: gives a file's range storage (mode 0) or punches it out.
    package var fallocate: @Sendable (_ fd: Int32, _ mode: Int32, _ offset: Int, _ length: Int) -> Int32
    /// `lseek(2)`, for `SEEK_DATA` and `SEEK_HOLE`: -1 with `errno` on failure (`ENXIO` past the data).
    package var lseek: @Sendable (_ fd: Int32, _ offset: Int, _ whence: Int32) -> Int
    /// `userfaultfd(2)` with `flags`; -1 with `errno` on failure.
    package var userfaultfd: @Sendable (_ flags: Int32) -> Int32
    /// `ioctl(2)` with a pointer argument; -1 with `errno` on failure.
    package var ioctl: @Sendable (_ fd: Int32, _ request: UInt, _ argument: UnsafeMutableRawPointer) -> Int32

    /// True for ``live``: hot paths then call libpmem directly instead of through a closure.
    package var isLive: Bool

    /// The real calls.
    package static let live = SystemCalls(
        pmemMapFile: { path, length, flags, mode in
            var mapped = 0
            var isPmem: Int32 = 0
            guard let address = pmem_map_file(path, length, flags, mode, &mapped, &isPmem) else { return nil }
            return (address, mapped, isPmem != 0)
        },
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
        open: { path, flags, mode in Glibc.open(path, flags, mode) },
        fallocate: { fd, mode, offset, length in dax_fallocate(fd, mode, Int64(offset), Int64(length)) },
        lseek: { fd, offset, whence in Int(Glibc.lseek(fd, off_t(offset), whence)) },
        userfaultfd: { flags in dax_userfaultfd(flags) },
        ioctl: { fd, request, argument in dax_ioctl(fd, request, argument) },
        isLive: true
    )

    /// A copy in which `isLive` is false, for tests that replace entries.
    package static var injectable: SystemCalls {
        var calls = live
        calls.isLive = false
        return calls
    }
}

/// The text of libpmem's last error on this thread (`pmem_errormsg`).
func pmemErrorMessage() -> String {
    guard let text = pmem_errormsg() else { return "" }
    return String(cString: text)
}
