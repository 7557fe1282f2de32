import CLibPMem
import Glibc

/// The virtual memory of mappings: reserving ranges, mapping device pages, and the region that
/// raises SIGBUS where pages were truncated away.
enum MappingRegion {
    /// A memfd of size 0: any access to a shared mapping of it is past its end, and the kernel
    /// sends SIGBUS, exactly as for a page truncated out of a file mapping.
    static let faultingFile: Int32 = SystemCalls.live.memfdCreate("dax-truncated-pages", dax_MFD_CLOEXEC)

    static func protection(_ access: Access) -> Int32 {
        access == .readWrite ? PROT_READ | PROT_WRITE : PROT_READ
    }

    /// Reserves `length` bytes of address space that fault until something is mapped there.
    static func reserve(_ length: Int, calls: SystemCalls) throws -> UnsafeMutableRawPointer {
        guard let base = calls.mmap(nil, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) else {
            throw DAXError.system(
                "mmap", "cannot reserve \(counted(length, "byte")) of address space for a mapping", errno: errno)
        }
        return base
    }

    /// Maps `pages` device pages from `frame` at `address`, populated: a `.readOnly` mapping from
    /// the device's read-only descriptor, so that it cannot be made writable with `mprotect`.
    /// An emulated device tracks stores through the new pages (`exposed`: in a mapping that
    /// other threads may already use). A crash image opened for a checker is mapped privately.
    static func mapDevice(
        _ device: PMemDevice, frame: UInt64, pages: Int, at address: UnsafeMutableRawPointer, access: Access,
        exposed: Bool = false
    ) throws {
        let length = pages * PMemDevice.pageSize
        // Populating a private writable mapping would copy every page: a crash image's pages
        // are copied only when the checker stores to them.
        let sharing = device.isPrivateImage ? MAP_PRIVATE : MAP_SHARED | MAP_POPULATE
        device.noteUnmapped(address, length: length)
        guard
            device.systemCalls.mmap(
                address, length, protection(access), sharing | MAP_FIXED,
                access == .readWrite ? device.fd : device.readOnlyFD, Int(frame) * PMemDevice.pageSize) != nil
        else {
            let code = errno
            throw DAXError.system(
                "mmap",
                "cannot map \(pages) device pages at pfn \(frame)"
                    + (code == ENODEV || code == EINVAL
                        ? " (a device-DAX character device maps only 2 MiB-aligned ranges)" : ""),
                errno: code)
        }
        if access == .readWrite {
            do {
                try device.noteMapped(address, frame: frame, pages: pages, exposed: exposed)
            } catch {
                replaceWithFaulting(address, length: length, access: access, calls: device.systemCalls)
                throw error
            }
        }
    }

    static func mapDevicePage(
        _ device: PMemDevice, frame: UInt64, at address: UnsafeMutableRawPointer, access: Access, exposed: Bool = false
    ) throws {
        try mapDevice(device, frame: frame, pages: 1, at: address, access: access, exposed: exposed)
    }

    /// Maps the zero page, read-only, over `length` bytes at `address`: a hole as a read-only
    /// mapping shows it (the kernel maps its shared zero page there).
    static func mapZeroPages(_ address: UnsafeMutableRawPointer, length: Int, calls: SystemCalls) throws {
        guard
            calls.mmap(address, length, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0)
                != nil
        else {
            throw DAXError.system("mmap", "cannot map \(counted(length, "byte")) of zero pages for holes", errno: errno)
        }
    }

    /// Replaces `length` bytes at `address` by the faulting region (PROT_NONE if memfd is missing).
    static func replaceWithFaulting(_ address: UnsafeMutableRawPointer, length: Int, access: Access, calls: SystemCalls)
    {
        if faultingFile >= 0,
            calls.mmap(address, length, protection(access), MAP_SHARED | MAP_FIXED, faultingFile, 0) != nil
        {
            return
        }
        let fallback = calls.mmap(
            address, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0)
        precondition(fallback != nil, "cannot unmap truncated pages from a mapping: errno \(errno)")
    }
}
