import CLibPMem
import Glibc

/// The virtual memory of mappings: reserving ranges, mapping device pages, the placeholders a
/// fault handler answers for, and the region that raises SIGBUS past the end of a file.
enum MappingRegion {
    /// A memfd of size 0: any access to a shared mapping of it is past its end, and the kernel
    /// sends SIGBUS, exactly as for a page truncated out of a file mapping.
    static let faultingFile: Int32 = SystemCalls.live.memfdCreate("dax-truncated-pages", dax_MFD_CLOEXEC)

    static func protection(_ access: Access) -> Int32 {
        access == .readWrite ? PROT_READ | PROT_WRITE : PROT_READ
    }

    /// What a placeholder of a mapping with `access` is registered for: missing pages, and in a
    /// writable mapping stores to the zeroed pages placed there (and to its blocks, for `sync`).
    static func faultModes(_ access: Access) -> UserFaults.Modes {
        access == .readWrite ? [.missing, .writeProtect] : [.missing]
    }

    /// Reserves `length` bytes of address space. With a fault handler (`placeholder` set) the
    /// range is one anonymous placeholder with `placeholder`'s protection, whose pages fault to the
    /// handler once registered; without, it faults (`PROT_NONE`) until something is mapped there.
    static func reserve(_ length: Int, placeholder: Access? = nil, calls: SystemCalls) throws -> UnsafeMutableRawPointer
    {
        let protection = placeholder.map(protection) ?? PROT_NONE
        guard let base = calls.mmap(nil, length, protection, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) else {
            throw DAXError.system(
                "mmap", "cannot reserve \(counted(length, "byte")) of address space for a mapping", errno: errno)
        }
        return base
    }

    /// Maps `pages` device pages from `frame` at `address`, populated: a `.readOnly` mapping from
    /// the device's read-only descriptor, so that it cannot be made writable with `mprotect`.
    /// With `faults` (a writable mapping that a fault handler serves) on an emulated device, the
    /// new range is registered with it for write-protect faults, which the crash emulation sets. An emulated device
    /// tracks stores through the new pages (`exposed`: in a mapping that other threads may already
    /// use). A crash image opened for a checker is mapped privately, and so are the pages
    /// `privately` asks for: shared blocks shown in a live mapping, where a store in the moment
    /// before their write protection must make a copy rather than reach the block.
    static func mapDevice(
        _ device: PMemDevice, frame: UInt64, pages: Int, at address: UnsafeMutableRawPointer, access: Access,
        exposed: Bool = false, faults: UserFaults? = nil, privately: Bool = false
    ) throws {
        let length = pages * PMemDevice.pageSize
        // Populating a private writable mapping would copy every page: a crash image's pages
        // are copied only when the checker stores to them, a private page only when a store
        // reaches it unprotected.
        let sharing = device.isPrivateImage || privately ? MAP_PRIVATE | MAP_NORESERVE : MAP_SHARED | MAP_POPULATE
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
        guard access == .readWrite else { return }
        do {
            // Registered now only where the crash emulation write-protects the pages at once; else
            // `sync` registers the runs it protects (a fault need not pay for it).
            if let faults, device.emulation != nil,
                !faults.registerAgain(address, length: length, modes: faultModes(access))
            {
                throw DAXError.system(
                    "ioctl(UFFDIO_REGISTER)", "cannot register \(pages) device pages at pfn \(frame) for faults",
                    errno: errno)
            }
            try device.noteMapped(address, frame: frame, pages: pages, exposed: exposed, handledBy: faults)
        } catch {
            replaceWithFaulting(address, length: length, access: access, calls: device.systemCalls)
            throw error
        }
    }

    static func mapDevicePage(
        _ device: PMemDevice, frame: UInt64, at address: UnsafeMutableRawPointer, access: Access, exposed: Bool = false,
        faults: UserFaults? = nil
    ) throws {
        try mapDevice(device, frame: frame, pages: 1, at: address, access: access, exposed: exposed, faults: faults)
    }

    /// The process's page table, read by address (`/proc/self/pagemap`); -1 where it cannot be
    /// opened.
    private static let pageTable: Int32 = SystemCalls.live.open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC, 0)

    /// Which of the `pages` pages at `address` the page table maps to anonymous memory: in a
    /// private mapping of the device, the copies that stores made there. Nil when the page table
    /// cannot be read. (A copy swapped out shows as the write-protect markers of pages not yet
    /// touched do; it cannot be, in the microseconds since the store that made it.)
    static func anonymousPages(at address: UnsafeMutableRawPointer, pages: Int, calls: SystemCalls) -> [Int]? {
        guard pageTable >= 0 else { return nil }
        var entries = [UInt64](repeating: 0, count: pages)
        let read = entries.withUnsafeMutableBytes {
            calls.pread(pageTable, $0, Int(bitPattern: address) / PMemDevice.pageSize * 8)
        }
        guard read == pages * 8 else { return nil }
        // Bit 63: present; bit 61: a page of a file (or of shared anonymous memory).
        return entries.indices.filter { entries[$0] & (1 << 63) != 0 && entries[$0] & (1 << 61) == 0 }
    }

    /// Makes `length` bytes at `address` a placeholder again, registered with `faults`: its pages
    /// show nothing until the handler answers a fault there (a page cut away or punched, a zeroed
    /// page dropped, the end of the file moved past a SIGBUS region). If the registration fails the
    /// range faults with SIGBUS instead, never silently taking stores into anonymous memory.
    /// Returns false if no mapping at all could be made there (the process out of map entries):
    /// the range shows what it showed. `showsNothing` says that is a placeholder or the SIGBUS
    /// region already, so that nothing else is tried.
    @discardableResult
    static func makePlaceholder(
        _ address: UnsafeMutableRawPointer, length: Int, access: Access, faults: UserFaults, calls: SystemCalls,
        showsNothing: Bool = false
    ) -> Bool {
        let mapped = calls.mmap(
            address, length, protection(access), MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0)
        if mapped != nil, faults.registerAgain(address, length: length, modes: faultModes(access)) { return true }
        if mapped == nil, showsNothing { return false }
        return replaceWithFaulting(address, length: length, access: access, calls: calls) || mapped != nil
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
    /// Returns false if neither can be mapped there: a range inside a kernel mapping needs one or
    /// two entries more, which a process at its limit (`vm.max_map_count`) does not have. The
    /// range then shows what it showed; the caller keeps what it shows counted.
    @discardableResult
    static func replaceWithFaulting(_ address: UnsafeMutableRawPointer, length: Int, access: Access, calls: SystemCalls)
        -> Bool
    {
        if faultingFile >= 0,
            calls.mmap(address, length, protection(access), MAP_SHARED | MAP_FIXED, faultingFile, 0) != nil
        {
            return true
        }
        return calls.mmap(address, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0)
            != nil
    }
}
