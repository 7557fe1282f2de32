/// Copy-on-write of shared blocks on the data path: before a file changes a block that another
/// extent also names, the file gets a copy of its own. The copy waits for short-term pins of the
/// old page (a DMA read in flight); the decision is a freeze at the count the page's mappings
/// explain, never a look at the counts under a lock.
extension FileData {
    /// How long a copy waits for the short-term pins of a shared page before it gives up.
    static let copyWaitLimit: Duration = .seconds(30)

    /// The pieces of `pages` in `map` whose blocks are shared, as extents.
    func sharedExtents(in pages: Range<UInt64>, of map: ExtentMap) -> [Extent] {
        guard volume.shared.sharedBlockCount > 0 else { return [] }
        var result: [Extent] = []
        for slice in map.extents(in: pages) {
            for run in volume.shared.runs(in: slice.physical..<slice.physicalEnd) {
                result.append(
                    Extent(
                        logical: slice.logical + (run.start - slice.physical), physical: run.start, length: run.length))
            }
        }
        return result
    }

    /// Gives every shared block of `pages` in `map` a copy of its own for `inode`, in `change`:
    /// allocates, waits for the old pages' short-term pins, copies whole pages (before the commit:
    /// the new blocks are free on the device until it), and points the extents at the copies.
    /// Returns the new extents; the old blocks each lose a reference when `change` commits.
    func copyShared(
        of inode: UInt32, _ pages: Range<UInt64>, map: inout ExtentMap, change: inout PendingChange
    ) throws -> [Extent] {
        let shared = sharedExtents(in: pages, of: map)
        var copies: [Extent] = []
        for old in shared {
            let runs = try volume.allocateBacked(
                Int(old.length), goal: map.goal(before: old.logical), inode: inode, firstIndex: old.logical)
            change.allocate(runs, superblock: volume.superblock)
            let replacement = Self.extents(of: runs, from: old.logical)
            try copyWhenUnpinned(old, to: replacement)
            try volume.editExtents(&map, of: inode, replacing: old.logicalRange, with: replacement, change: &change)
            copies += replacement
        }
        return copies
    }

    /// Copies the blocks of `old` to those of `replacement` (the same pages), each old page frozen
    /// at its mapping count while it is read: a short-term pin (a DMA read in flight) is waited
    /// out first. Throws `.busy` when a pin outlasts ``copyWaitLimit``.
    private func copyWhenUnpinned(_ old: Extent, to replacement: [Extent]) throws {
        let pageMap = volume.device.pages
        let deadline = Deadline(after: Self.copyWaitLimit)
        for extent in replacement {
            for page in extent.logicalRange {
                let from = old.block(for: page)
                let frame = PageFrameNumber(rawValue: from)
                while !pageMap.freezeAtMappings(frame) {
                    let busy = pageMap.waitOutTransientReferences([from], deadline: deadline)
                    if !busy.isEmpty, deadline.hasPassed {
                        throw DAXError(
                            .busy,
                            "cannot copy shared block \(from) before a change: a pin has held it for "
                                + "\(Self.copyWaitLimit)")
                    }
                }
                volume.device.copy(
                    UnsafeRawBufferPointer(start: volume.device.base + Int(from) * Self.pageSize, count: Self.pageSize),
                    at: Int(extent.block(for: page)) * Self.pageSize, flags: [.nonTemporal, .noDrain])
                pageMap.unfreeze(frame)
            }
        }
    }

    /// Gives the shared blocks of `pages` copies of this file's own and commits that: what a
    /// store through a mapping, a `.readWrite` pin and a long-term pin do before they reach a
    /// shared page. Returns the new extents (the mappings must show them instead of the old
    /// blocks); empty when nothing there was shared.
    func unshare(_ file: inout Inode.Contents, _ pages: Range<UInt64>, what: String) throws -> [Extent] {
        guard !sharedExtents(in: pages, of: file.extents).isEmpty else { return [] }
        let number = file.number
        return try commitExtents(&file, what: what) { map, change in
            try copyShared(of: number, pages, map: &map, change: &change)
        }
    }

    /// How many extents name the block of each page of `pages`: 0 for a hole.
    func references(_ file: Inode.Contents, pages: Range<UInt64>) -> [Int] {
        var result = [Int](repeating: 0, count: pages.count)
        for slice in file.extents.extents(in: pages) {
            for page in slice.logicalRange { result[Int(page - pages.lowerBound)] = 1 }
            for run in volume.shared.runs(in: slice.physical..<slice.physicalEnd) {
                for block in run.range {
                    result[Int(slice.logical + (block - slice.physical) - pages.lowerBound)] = Int(run.count)
                }
            }
        }
        return result
    }
}

extension FileData {
    /// Points each page of `pages` (sorted `(page, block)`, the file's own blocks frozen by the
    /// caller) of the file at `block`, which gains a reference, in one transaction: the extent
    /// side of dedup. Returns the blocks freed (to release once they thaw); on failure nothing
    /// changed.
    func share(_ file: inout Inode.Contents, _ pages: [(page: UInt64, block: UInt64)], what: String) throws -> [PageRun]
    {
        var extents: [Extent] = []
        for (page, block) in pages {
            let extent = Extent(logical: page, physical: block, length: 1)
            if let last = extents.last, last.canMerge(with: extent) {
                extents[extents.count - 1].length += 1
            } else {
                extents.append(extent)
            }
        }
        var change = PendingChange()
        var map = file.extents
        var record = file.record
        do {
            for extent in extents {
                try volume.editExtents(
                    &map, of: file.number, replacing: extent.logicalRange, with: [extent], change: &change)
            }
            change.reference(extents)
            record.changeTime = WallClock.nanosecondsSinceEpoch
            change.store(record, extents: map, of: file.number, superblock: volume.superblock)
            try volume.commit(&change, what: what, release: false)
        } catch {
            volume.abandon(change)
            throw error
        }
        file.extents = map
        file.record = record
        return change.freed
    }
}
