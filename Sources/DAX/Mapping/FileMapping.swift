import Glibc

extension AddressSpace {
    /// A direct mapping of `count` bytes from `offset` (what ``DAXFile/map(offset:count:access:)``
    /// promises) for a handle opened with `fileAccess` at `path`.
    func map(offset: Int, count: Int, access: Access, fileAccess: Access, path: String) throws -> DAXMapping {
        if access == .readWrite, fileAccess != .readWrite {
            throw DAXError(.permissionDenied, "cannot map \(Paths.quoted(path)) for writing: it was opened read-only")
        }
        try FileData.checkRange(offset, count, "map", path)
        guard count > 0, offset % PMemDevice.pageSize == 0 else {
            throw DAXError(
                .invalidArgument,
                "cannot map \(counted(count, "byte")) at offset \(offset) of \(Paths.quoted(path)): "
                    + "the offset must be a multiple of \(PMemDevice.pageSize) and the count positive")
        }
        let first = FileData.page(offset)
        let pages = first..<FileData.pageUp(offset + count)
        let faults = handler.faults
        let calls = device.systemCalls
        return try invalidateLock.withReadLock {
            try inode.contents.write { contents in
                try contents.checkLive(path)
                // As mmap(2) allows, the range may reach past the end of the file: those pages
                // raise SIGBUS until the file grows over them.
                let end = max(first, min(pages.upperBound, FileData.pageUp(Int(contents.record.size))))
                let inside = first..<end
                if faults == nil, access == .readWrite {
                    // No fault handler: a writable mapping gives its holes blocks now, and its
                    // shared blocks copies (a store could not be caught to copy them later).
                    let added = try data.fillHolesZeroed(&contents, inside, what: "map of \(Paths.quoted(path))")
                    // Older mappings of those pages (punched while mapped) see the new blocks too.
                    show(added)
                    try unshare(inside, &contents, what: "map of \(Paths.quoted(path))")
                }
                let length = pages.count * PMemDevice.pageSize
                let base = try MappingRegion.reserve(length, placeholder: faults == nil ? nil : access, calls: calls)
                var frames = [UInt64](repeating: 0, count: pages.count)
                var zeroPages: Set<Int> = []
                do {
                    if let faults {
                        try DAXMapping.registerPlaceholder(base, length: length, access: access, faults: faults)
                    } else {
                        for hole in contents.extents.holes(in: inside) {  // only in a .readOnly mapping
                            let index = Int(hole.lowerBound - first)
                            try MappingRegion.mapZeroPages(
                                base + index * PMemDevice.pageSize, length: hole.count * PMemDevice.pageSize,
                                calls: calls)
                            zeroPages.formUnion(index..<(index + hole.count))
                        }
                        if end < pages.upperBound {
                            let index = Int(end - first)
                            guard
                                MappingRegion.replaceWithFaulting(
                                    base + index * PMemDevice.pageSize,
                                    length: (pages.count - index) * PMemDevice.pageSize, access: access, calls: calls)
                            else {
                                throw DAXError.system(
                                    "mmap",
                                    "cannot map the pages past the end of \(Paths.quoted(path)) to raise SIGBUS",
                                    errno: errno)
                            }
                        }
                    }
                    for slice in contents.extents.extents(in: inside) {
                        let index = Int(slice.logical - first)
                        for page in 0..<Int(slice.length) {
                            try device.pages.tryMap(PageFrameNumber(rawValue: slice.physical + UInt64(page)))
                            frames[index + page] = slice.physical + UInt64(page)
                        }
                        try MappingRegion.mapDevice(
                            device, frame: slice.physical, pages: Int(slice.length),
                            at: base + index * PMemDevice.pageSize, access: access, faults: faults)
                        try protectShared(slice, at: base + index * PMemDevice.pageSize, access: access, faults: faults)
                    }
                } catch {
                    for frame in frames where frame != 0 { device.pages.unmap(PageFrameNumber(rawValue: frame)) }
                    device.noteUnmapped(base, length: length)
                    faults?.forget(base, length: length)
                    _ = calls.munmap(base, length)
                    throw error
                }
                let mapping = DAXMapping(
                    space: self, path: path, firstPage: first, count: count, access: access,
                    writable: access == .readWrite && fileAccess == .readWrite, base: base,
                    frames: frames, zeroPages: zeroPages, sigbusTail: faults == nil ? Int(end - first) : nil,
                    faults: faults)
                if let faults { mapping.routeFaults(to: faults) }
                register(mapping)
                return mapping
            }
        }
    }

    /// A new writable mapping shows the shared blocks of `slice` (mapped at `address`)
    /// write-protected; throws if the kernel cannot do it.
    private func protectShared(
        _ slice: Extent, at address: UnsafeMutableRawPointer, access: Access, faults: UserFaults?
    )
        throws
    {
        guard access == .readWrite, data.volume.shared.sharedBlockCount > 0 else { return }
        for piece in data.volume.shared.runs(in: slice.physical..<slice.physicalEnd) {
            let start = address + Int(piece.start - slice.physical) * PMemDevice.pageSize
            let length = Int(piece.length) * PMemDevice.pageSize
            guard let faults, faults.registerAgain(start, length: length, modes: MappingRegion.faultModes(access)),
                faults.writeProtect(start, length: length, true)
            else {
                throw DAXError(
                    .unsupported, "cannot write-protect the shared blocks of a writable mapping on this device")
            }
        }
    }
}
