extension DAXFile {
    /// A direct (DAX) mapping of `count` bytes from `offset`: loads and stores reach the device
    /// pages themselves. A `.readWrite` mapping gives the holes in its range zeroed blocks first; a
    /// `.readOnly` one shows them as the zero page and changes nothing (as the kernel does), until
    /// a `write`, `allocate` or another mapping gives them blocks, which it then shows.
    ///
    /// `offset` must be a multiple of the page size, and the range must lie within the file's size
    /// rounded up to a page (extend the file with `truncate` or `allocate` first): as with `mmap`,
    /// a mapping never changes the file's size. A `.readWrite` mapping needs a file opened
    /// `.readWrite`; stores through a `.readOnly` mapping fault.
    public func map(offset: Int = 0, count: Int, access: Access = .readWrite) throws -> DAXMapping {
        // Older mappings shown the blocks that filled holes are released only after every lock.
        var shown: [DAXMapping] = []
        defer { withExtendedLifetime(shown) {} }
        return try operation("map") { try mapLocked(offset: offset, count: count, access: access, shown: &shown) }
    }

    private func mapLocked(offset: Int, count: Int, access: Access, shown: inout [DAXMapping]) throws -> DAXMapping {
        if access == .readWrite, self.access != .readWrite {
            throw DAXError(.permissionDenied, "cannot map \(Paths.debug(path)) for writing: it was opened read-only")
        }
        try Self.checkRange(offset, count, "map", path)
        guard count > 0, offset % PMemDevice.pageSize == 0 else {
            throw DAXError(
                .invalidArgument,
                "cannot map \(counted(count, "byte")) at offset \(offset) of \(Paths.debug(path)): "
                    + "the offset must be a multiple of \(PMemDevice.pageSize) and the count positive")
        }
        let fs = fileSystem
        let device = fs.device
        let first = DAXFileSystem.page(offset)
        let pages = first..<DAXFileSystem.pageUp(offset + count)
        return try inode.invalidateLock.withReadLock {
            try inode.lock.withWriteLock {
                try inode.checkLive(path)
                let size = Int(inode.record.size)
                guard
                    Int(pages.upperBound) * PMemDevice.pageSize <= (size + PMemDevice.pageSize - 1)
                        / PMemDevice.pageSize
                        * PMemDevice.pageSize
                else {
                    throw DAXError(
                        .invalidArgument,
                        "cannot map \(offset)..<\(offset + count) of \(Paths.debug(path)): "
                            + "the file has only \(counted(size, "byte")) (extend it with truncate or allocate first)")
                }
                if access == .readWrite {
                    let added = try fs.fillHolesZeroed(inode, pages, what: "map of \(Paths.debug(path))")
                    // Older mappings of those pages (punched while mapped) see the new blocks too.
                    shown = fs.showInMappings(inode, added)
                }
                let base = try MappingRegion.reserve(pages.count * PMemDevice.pageSize, calls: device.systemCalls)
                var frames = [UInt64](repeating: 0, count: pages.count)
                var zeroPages: Set<Int> = []
                var mappedCounts = 0
                do {
                    for hole in inode.extents.holes(in: pages) {  // only in a .readOnly mapping
                        let index = Int(hole.lowerBound - first)
                        try MappingRegion.mapZeroPages(
                            base + index * PMemDevice.pageSize, length: hole.count * PMemDevice.pageSize,
                            calls: device.systemCalls)
                        zeroPages.formUnion(index..<(index + hole.count))
                    }
                    for slice in inode.extents.extents(in: pages) {
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
                    file: self, firstPage: first, count: count, access: access,
                    writable: access == .readWrite && self.access == .readWrite, base: base,
                    frames: frames, zeroPages: zeroPages)
                inode.users.withTrackedLock { $0.mappings += 1 }
                inode.mappings.withTrackedLock { $0[ObjectIdentifier(mapping)] = WeakMapping(object: mapping) }
                return mapping
            }
        }
    }
}

extension DAXFileSystem {
    /// Gives the holes of `pages` zeroed blocks, as mapping and pinning need (inode lock held
    /// exclusively). Returns the extents added.
    @discardableResult
    func fillHolesZeroed(_ inode: Inode, _ pages: Range<UInt64>, what: String) throws -> [Extent] {
        guard !inode.extents.holes(in: pages).isEmpty else { return [] }
        var change = PendingChange()
        var map = inode.extents
        let added: [Extent]
        do {
            added = try fillHoles(inode, pages, map: &map, change: &change, zeroing: .all)
            var record = inode.record
            map.store(into: &record)
            change.transaction.write(record.encode(), at: superblock.inodeOffset(inode.number))
            device.drain()
            try commit(change, what: what)
        } catch {
            abandon(change)
            throw error
        }
        inode.extents = map
        return added
    }
}
