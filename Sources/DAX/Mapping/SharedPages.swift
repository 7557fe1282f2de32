/// Shared blocks in mappings: a shared page shows write-protected in a writable mapping, so that
/// a store faults and copies it; copies replace the old blocks in the writing file's mappings only.
extension AddressSpace {
    /// Before the file's blocks are shared (a clone of it): stores through its mappings, live or
    /// unmapped since the last `sync`, are made durable, and every page its writable mappings show is write-protected, so that the next
    /// store faults and copies. Returns the pages that stay writable because the kernel cannot
    /// write-protect them (no fault handler), which must not be shared, and whether no mapping
    /// shows the file at all. Inode lock held.
    func prepareForSharing() -> Namespace.CloneSource {
        let mappings = liveMappings
        var source = Namespace.CloneSource(unmapped: mappings.isEmpty)
        for mapping in mappings where mapping.access == .readWrite {
            mapping.writeBack()
            source.unshareable.formUnion(mapping.protectShown())
        }
        writeBackUnmapped()
        return source
    }

    /// Copies the shared blocks of `pages` for this file and shows the copies in its mappings:
    /// what a store fault, a `.readWrite` pin and a long-term pin do to a shared page. Returns
    /// whether anything was copied. Inode lock held exclusively.
    @discardableResult
    func unshare(_ pages: Range<UInt64>, _ contents: inout Inode.Contents, what: String) throws -> Bool {
        try copyingShared(pages, &contents) { contents in
            !(try data.unshare(&contents, pages, what: what)).isEmpty
        }
    }

    /// Runs `body`, which may give the shared blocks of `pages` copies (copy-on-write), with
    /// those pages taken out of every mapping first and the generation bumped (the gup-fast rule),
    /// so that no pin can find an old shared page through this file while it is copied and
    /// replaced: a pinner that looked before backs off, and the copy waits for its pin to drop.
    /// Afterwards the mappings show what the file then has there; if `body` throws they show what
    /// they showed. Inode lock held exclusively.
    func copyingShared<T>(
        _ pages: Range<UInt64>, _ contents: inout Inode.Contents, _ body: (inout Inode.Contents) throws -> T
    ) throws -> T {
        let shared = data.sharedExtents(in: pages, of: contents.extents)
        let mappings = shared.isEmpty ? [] : liveMappings
        guard !mappings.isEmpty else { return try body(&contents) }
        // Bumped before as well as after: this runs under the shared invalidate lock, beside
        // slow pinners, and one that finds a page gone must also find the generation moved.
        layoutChanged()
        for extent in shared {
            for mapping in mappings { _ = mapping.detach(extent.logicalRange, cut: 0..<0) }
        }
        layoutChanged()
        let result: T
        do {
            result = try body(&contents)
        } catch {
            for mapping in mappings { mapping.restore() }
            layoutChanged()
            throw error
        }
        var now: [Extent] = []
        for extent in shared { now += contents.extents.extents(in: extent.logicalRange) }
        for mapping in mappings {
            // Straight from the old block to the copy, never through a placeholder: a store
            // racing in waits on the old block's write protection or reaches the copy.
            mapping.replaceDetached(with: now)
            mapping.populate(now)
        }
        return result
    }
}

extension DAXMapping {
    /// Write-protects every page this mapping shows of file pages `pages` (all of them by
    /// default), for a clone or a dedup of its file. Returns the file pages it could not protect
    /// (no handler, or the kernel refused). Inode lock held.
    func protectShown(_ pages: Range<UInt64> = 0..<UInt64.max) -> Set<UInt64> {
        state.withTrackedLock { state in
            guard !state.unmapped, let local = localRange(pages) else { return [] }
            var unprotected: Set<UInt64> = []
            var index = local.lowerBound
            while index < local.upperBound {
                guard entries[index].load(ordering: .relaxed) != 0 else {
                    index += 1
                    continue
                }
                var end = index + 1
                while end < local.upperBound, entries[end].load(ordering: .relaxed) != 0 { end += 1 }
                if !writeProtect(index..<end) {
                    for page in index..<end { unprotected.insert(firstPage + UInt64(page)) }
                }
                index = end
            }
            return unprotected
        }
    }

    /// Write-protects pages `run` of the mapping, which show blocks: registered for write-protect
    /// faults first (device pages are registered lazily). Returns false if the kernel cannot.
    func writeProtect(_ run: Range<Int>) -> Bool {
        guard let faults else { return false }
        let address = base + run.lowerBound * PMemDevice.pageSize
        let length = run.count * PMemDevice.pageSize
        return faults.registerAgain(address, length: length, modes: MappingRegion.faultModes(access))
            && faults.writeProtect(address, length: length, true)
    }

    /// After pages `run` came to show blocks from `firstFrame` on: the shared ones among them are
    /// write-protected in a writable mapping. Returns false if one could not be.
    func protectShared(_ run: Range<Int>, firstFrame: UInt64) -> Bool {
        guard access == .readWrite else { return true }
        let shared = space.data.volume.shared
        guard shared.sharedBlockCount > 0 else { return true }
        var protected = true
        for piece in shared.runs(in: firstFrame..<(firstFrame + UInt64(run.count))) {
            let from = run.lowerBound + Int(piece.start - firstFrame)
            if !writeProtect(from..<(from + Int(piece.length))) { protected = false }
        }
        return protected
    }
}
