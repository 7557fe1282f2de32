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
        return try invalidateLock.withReadLock {
            try inode.contents.write { contents in
                try contents.checkLive(path)
                let size = Int(contents.record.size)
                guard
                    Int(pages.upperBound) * PMemDevice.pageSize <= (size + PMemDevice.pageSize - 1)
                        / PMemDevice.pageSize
                        * PMemDevice.pageSize
                else {
                    throw DAXError(
                        .invalidArgument,
                        "cannot map \(offset)..<\(offset + count) of \(Paths.quoted(path)): "
                            + "the file has only \(counted(size, "byte")) (extend it with truncate or allocate first)")
                }
                if access == .readWrite {
                    let added = try data.fillHolesZeroed(&contents, pages, what: "map of \(Paths.quoted(path))")
                    // Older mappings of those pages (punched while mapped) see the new blocks too.
                    show(added)
                }
                let base = try MappingRegion.reserve(pages.count * PMemDevice.pageSize, calls: device.systemCalls)
                var frames = [UInt64](repeating: 0, count: pages.count)
                var zeroPages: Set<Int> = []
                var mappedCounts = 0
                do {
                    for hole in contents.extents.holes(in: pages) {  // only in a .readOnly mapping
                        let index = Int(hole.lowerBound - first)
                        try MappingRegion.mapZeroPages(
                            base + index * PMemDevice.pageSize, length: hole.count * PMemDevice.pageSize,
                            calls: device.systemCalls)
                        zeroPages.formUnion(index..<(index + hole.count))
                    }
                    for slice in contents.extents.extents(in: pages) {
                        let index = Int(slice.logical - first)
                        try MappingRegion.mapDevice(
                            device, frame: slice.physical, pages: Int(slice.length),
                            at: base + index * PMemDevice.pageSize, access: access)
                        for page in 0..<Int(slice.length) {
                            try device.pages.tryMap(PageFrameNumber(rawValue: slice.physical + UInt64(page)))
                            frames[index + page] = slice.physical + UInt64(page)
                            mappedCounts += 1
                        }
                    }
                } catch {
                    for frame in frames where frame != 0 { device.pages.unmap(PageFrameNumber(rawValue: frame)) }
                    device.noteUnmapped(base, length: pages.count * PMemDevice.pageSize)
                    _ = device.systemCalls.munmap(base, pages.count * PMemDevice.pageSize)
                    throw error
                }
                let mapping = DAXMapping(
                    space: self, path: path, firstPage: first, count: count, access: access,
                    writable: access == .readWrite && fileAccess == .readWrite, base: base,
                    frames: frames, zeroPages: zeroPages)
                register(mapping)
                return mapping
            }
        }
    }
}
