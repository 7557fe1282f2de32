import Glibc

/// FIDEDUPERANGE for DAX pages: equal pages of two files come to share one block, unless a pin
/// holds either, decided by a freeze at the count the mappings explain (invariant 10).
extension AddressSpace {
    /// Makes pages `destinationPages` of `destination` share the blocks of the same-sized
    /// `sourcePages` of `source` where the bytes are equal and neither page is pinned. Both
    /// files' invalidate and inode locks are held throughout (in inode-number order), so neither
    /// changes while it compares. Returns the destination's pages that now share.
    static func deduplicate(
        _ source: AddressSpace, _ sourcePages: Range<UInt64>, _ destination: AddressSpace,
        _ destinationPages: Range<UInt64>, what: String
    ) throws -> [UInt64] {
        let same = source === destination
        let first = same || source.inode.number < destination.inode.number ? source : destination
        let second = first === source ? destination : source
        return try first.invalidateLock.withWriteLock {
            if same {
                return try destination.inode.contents.write { contents in
                    let before = contents  // the source's side, read while the extents change
                    return try destination.deduplicateLocked(
                        from: before, sourcePages, source: source, into: &contents, destinationPages, what: what)
                }
            }
            return try second.invalidateLock.withWriteLock {
                try first.inode.contents.write { firstContents in
                    try second.inode.contents.write { secondContents in
                        if first === source {
                            return try destination.deduplicateLocked(
                                from: firstContents, sourcePages, source: source, into: &secondContents,
                                destinationPages, what: what)
                        }
                        return try destination.deduplicateLocked(
                            from: secondContents, sourcePages, source: source, into: &firstContents,
                            destinationPages, what: what)
                    }
                }
            }
        }
    }

    /// Dedup with both files locked; `self` is the destination.
    private func deduplicateLocked(
        from sourceContents: Inode.Contents, _ sourcePages: Range<UInt64>, source: AddressSpace,
        into contents: inout Inode.Contents, _ pages: Range<UInt64>, what: String
    ) throws -> [UInt64] {
        let device = self.device
        let pageMap = device.pages
        let size = FileData.pageSize
        // 1. Stores through either file's writable mappings stop before the bytes are compared:
        //    the pages stay mapped, write-protected, so a store waits in the fault handler (for
        //    the inode locks held here) and lands afterwards in the block the page has then, as
        //    the kernel unmaps both ranges before it compares. A page either side cannot
        //    protect is left alone.
        var unprotected: Set<UInt64> = []  // destination pages
        for mapping in liveMappings where mapping.access == .readWrite {
            unprotected.formUnion(mapping.protectShown(pages))
        }
        for mapping in source.liveMappings where mapping.access == .readWrite {
            for page in mapping.protectShown(sourcePages) {
                unprotected.insert(pages.lowerBound + (page - sourcePages.lowerBound))
            }
        }

        // 2. Equal pages whose blocks differ; pages already sharing the source's block count too.
        var already: [UInt64] = []
        var candidates: [(page: UInt64, sourceBlock: UInt64, block: UInt64)] = []
        // Only the destination's pages that have blocks are looked at (a hole is left alone), so
        // a sparse file of terabytes is compared in the time its extents take.
        let destinationPages = contents.extents.extents(in: pages).flatMap { Array($0.logicalRange) }
        for page in destinationPages where !unprotected.contains(page) {
            let sourcePage = sourcePages.lowerBound + (page - pages.lowerBound)
            guard let sourceExtent = sourceContents.extents.extent(containing: sourcePage),
                let extent = contents.extents.extent(containing: page)
            else { continue }
            let sourceBlock = sourceExtent.block(for: sourcePage)
            let block = extent.block(for: page)
            if sourceBlock == block {
                already.append(page)
                continue
            }
            if memcmp(device.base + Int(sourceBlock) * size, device.base + Int(block) * size, size) == 0 {
                candidates.append((page, sourceBlock, block))
            }
        }
        guard !candidates.isEmpty else { return already }

        // 3. The destination's pages leave its page tables (pinners back off), then each side is
        //    frozen at the count its mappings explain; a page that will not freeze is pinned and
        //    stays as it was.
        let mappings = liveMappings
        for run in FileData.runs(of: candidates.map(\.page)) {
            for mapping in mappings { _ = mapping.detach(run, cut: 0..<0) }
        }
        layoutChanged()
        var frozen: [PageFrameNumber] = []
        var chosen: [(page: UInt64, block: UInt64)] = []
        var left: Set<UInt64> = []
        for candidate in candidates {
            let old = PageFrameNumber(rawValue: candidate.block)
            let shared = PageFrameNumber(rawValue: candidate.sourceBlock)
            guard pageMap.freezeAtMappings(old) else {
                left.insert(candidate.block)
                continue
            }
            guard frozen.contains(shared) || pageMap.freezeAtMappings(shared) else {
                pageMap.unfreeze(old)
                left.insert(candidate.block)
                continue
            }
            if !frozen.contains(shared) { frozen.append(shared) }
            frozen.append(old)
            chosen.append((candidate.page, candidate.sourceBlock))
        }
        defer { for frame in frozen { pageMap.unfreeze(frame) } }
        if !left.isEmpty {
            for mapping in mappings { mapping.restore(frames: left) }
        }
        guard !chosen.isEmpty else { return already }

        // 4. The source's blocks are made durable first: the destination gives up a durable
        //    block for one whose bytes were compared as the CPU sees them, and a store through a
        //    mapping of the source may not have reached the media yet (a clone makes its source
        //    durable for the same reason). Then the extents, and each mapping shows the shared
        //    blocks, each mapped over the old block and write-protected.
        for run in FileData.runs(of: Array(Set(chosen.map(\.block)))) {
            device.persist(at: Int(run.lowerBound) * size, count: run.count * size)
        }
        let freed: [PageRun]
        do {
            freed = try data.share(&contents, chosen, what: what)
        } catch {
            for mapping in mappings { mapping.restore() }
            throw error
        }
        for frame in frozen { pageMap.unfreeze(frame) }
        frozen = []
        let shown = chosen.map { Extent(logical: $0.page, physical: $0.block, length: 1) }
        for mapping in mappings {
            mapping.replaceDetached(with: shown)
            mapping.populate(shown)
        }
        keepRacedStores(&contents)
        data.volume.releaseFreed(freed)
        return already + chosen.map(\.page)
    }
}
