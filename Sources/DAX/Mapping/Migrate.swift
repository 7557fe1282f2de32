/// Page migration: moving a file's pages to new blocks while it stays mapped, the kernel's
/// `migrate_pages` and `folio_migrate_mapping` for DAX pages.
extension DAXFile {
    /// Moves each page of `offset..<offset+count` that has a block to a new block, keeping every
    /// byte: the page leaves every mapping, its count is frozen at what is expected (no mapping,
    /// no reference, no pin: the kernel's `page_ref_freeze`), its bytes are copied, the extent is
    /// pointed at the new block in one journal transaction, the new block is mapped where the old
    /// one was, and the old block is freed.
    ///
    /// A page that something else holds (a pin, a transient reference) stays where it is, mapped,
    /// and is reported in ``MigrationResult/busy`` by file page index (the kernel's `-EAGAIN`).
    /// Each busy page is looked at up to ``DAXFileSystem/migrationAttempts`` times in the call,
    /// since a transient reference may go; a pin does not, and is never waited for. Holes are
    /// skipped. New blocks are taken as few runs as the free space allows, so migrating a whole
    /// file defragments it. `.noSpace` when no block is free, then nothing moved.
    public func migrate(offset: Int, count: Int) throws -> MigrationResult {
        try Self.checkRange(offset, count, "migrate", path)
        guard count > 0 else { return MigrationResult(migrated: 0, busy: []) }
        var held: [DAXMapping] = []
        defer { withExtendedLifetime(held) {} }
        return try operation("migrate", writable: true, range: (offset, count)) {
            // A batch of pages per transaction, so that any range fits the journal.
            let pages = DAXFileSystem.page(offset)..<DAXFileSystem.pageUp(offset + count)
            var result = MigrationResult(migrated: 0, busy: [])
            for start in stride(from: pages.lowerBound, to: pages.upperBound, by: Int(DAXFileSystem.migrationBatch)) {
                let batch = start..<min(start + DAXFileSystem.migrationBatch, pages.upperBound)
                let done = try fileSystem.migrate(inode, pages: batch, path: path, held: &held)
                result.migrated += done.migrated
                result.busy += done.busy
            }
            return result
        }
    }
}

extension DAXFileSystem {
    /// How many times one ``DAXFile/migrate(offset:count:)`` looks at a busy page.
    public static let migrationAttempts = 3
    /// File pages migrated in one transaction.
    static let migrationBatch: UInt64 = 1024

    /// ``DAXFile/migrate(offset:count:)`` under the file's invalidate lock and lock, read top to
    /// bottom: find the pages, take them out of the mappings, keep the busy ones, freeze the rest,
    /// copy, commit, map the new blocks, free the old ones.
    func migrate(_ inode: Inode, pages: Range<UInt64>, path: String, held: inout [DAXMapping]) throws
        -> MigrationResult
    {
        inode.invalidateLock.lockForWriting()
        inode.lock.lockForWriting()
        defer {
            inode.lock.unlock()
            inode.invalidateLock.unlock()
        }
        try inode.checkLive(path)
        // 1. The pages that have blocks, and the file's mappings.
        var candidates: [(page: UInt64, block: UInt64)] = []
        for extent in inode.extents.extents(in: pages) {
            for page in extent.logicalRange { candidates.append((page, extent.block(for: page))) }
        }
        guard !candidates.isEmpty else { return MigrationResult(migrated: 0, busy: []) }
        // Kept by the caller until every lock is released, added to rather than replaced: a
        // mapping dropped under the inode lock would unmap and reclaim, which takes that lock.
        let mappings = inode.liveMappings.compactMap { $0 as? DAXMapping }
        held += mappings
        let pageMap = device.pages

        // 2. Out of every mapping (the gup-fast rule: unmap, bump the generation, then look at the
        //    counts), then freeze each page at no reference. What is referenced, or gains a
        //    reference before its freeze, goes back into the mappings and is tried again.
        var pending = candidates
        var frozen: [(page: UInt64, block: UInt64)] = []
        for _ in 1...Self.migrationAttempts where !pending.isEmpty {
            detach(pending.map(\.page), from: mappings, inode)
            let referenced = Set(busyFrames(pending.map(\.block)))
            for mapping in mappings { mapping.restore() }
            let movable = pending.filter { !referenced.contains($0.block) }
            detach(movable.map(\.page), from: mappings, inode)
            for mapping in mappings { mapping.zapDetached() }
            var stayed = pending.filter { referenced.contains($0.block) }
            for candidate in movable {
                if pageMap.freeze(PageFrameNumber(rawValue: candidate.block), expectedRefCount: 0) {
                    frozen.append(candidate)
                } else {
                    stayed.append(candidate)  // a reference came between the look and the freeze
                }
            }
            // What could not be frozen shows its old block again.
            let back = stayed.map { Extent(logical: $0.page, physical: $0.block, length: 1) }
            for mapping in mappings { mapping.populate(back) }
            pending = stayed
        }
        let busy = pending.map { Int($0.page) }.sorted()
        guard !frozen.isEmpty else { return MigrationResult(migrated: 0, busy: busy) }
        frozen.sort { $0.page < $1.page }

        // 3. New blocks, the bytes copied, and one transaction that points the extents at them.
        var change = PendingChange()
        var map = inode.extents
        var record = inode.record
        var moved: [Extent] = []
        do {
            // New blocks for each run of consecutive pages, from the first free run long enough
            // for all of them: contiguous where the free space allows, each block owned by the
            // file page it holds. Then the bytes, and the extents pointed at them.
            let oldBlocks = Dictionary(uniqueKeysWithValues: frozen.map { ($0.page, $0.block) })
            var goal = allocator.firstAvailableRun(length: frozen.count)
            for pageRun in Self.runs(of: frozen.map(\.page)) {
                let runs = try allocateBacked(
                    pageRun.count, goal: goal, inode: inode.number, firstIndex: pageRun.lowerBound)
                change.allocate(runs, superblock: superblock)
                var page = pageRun.lowerBound
                for run in runs {
                    for step in 0..<run.count {
                        let source = device.base + Int(oldBlocks[page + step]!) * Self.pageSize
                        device.copy(
                            UnsafeRawBufferPointer(start: source, count: Self.pageSize),
                            toOffset: Int(run.start + step) * Self.pageSize, flags: [.nonTemporal, .noDrain])
                    }
                    var done: UInt64 = 0
                    while done < run.count {
                        let length = min(run.count - done, Extent.maximumLength)
                        let extent = Extent(logical: page + done, physical: run.start + done, length: length)
                        try editExtents(
                            &map, of: inode.number, replacing: extent.logicalRange, with: [extent], change: &change)
                        moved.append(extent)
                        done += length
                    }
                    page += run.count
                    goal = run.end
                }
            }
            device.drain()
            record.changeTime = Clock.realtimeNanoseconds
            var stored = record
            map.store(into: &stored)
            change.transaction.write(stored.encode(), at: superblock.inodeOffset(inode.number))
            try journal.commit(change.transaction, what: "migrate of \(counted(frozen.count, "page")) of \(path)")
        } catch {
            // Nothing moved: the old blocks thaw and show in the mappings again.
            abandon(change)
            for candidate in frozen { pageMap.unfreeze(PageFrameNumber(rawValue: candidate.block)) }
            let back = frozen.map { Extent(logical: $0.page, physical: $0.block, length: 1) }
            for mapping in mappings { mapping.populate(back) }
            throw error
        }

        // 4. The new blocks in every mapping; the old ones thaw and go back to the allocator.
        inode.extents = map
        inode.record = record
        for mapping in mappings { mapping.populate(moved) }
        for candidate in frozen { pageMap.unfreeze(PageFrameNumber(rawValue: candidate.block)) }
        releaseFreed(change.freed)
        return MigrationResult(migrated: frozen.count, busy: busy)
    }

    /// Takes `pages` out of every mapping of `mappings` (their counts stay until zapped) and bumps
    /// the layout generation, so that a pin racing in backs off.
    private func detach(_ pages: [UInt64], from mappings: [DAXMapping], _ inode: Inode) {
        for run in Self.runs(of: pages) {
            for mapping in mappings { _ = mapping.detach(run, cut: 0..<0) }
        }
        inode.layoutGeneration.wrappingAdd(1, ordering: .sequentiallyConsistent)
    }

    /// `pages` (sorted) as contiguous ranges.
    static func runs(of pages: [UInt64]) -> [Range<UInt64>] {
        var runs: [Range<UInt64>] = []
        for page in pages.sorted() {
            if let last = runs.last, last.upperBound == page {
                runs[runs.count - 1] = last.lowerBound..<(page + 1)
            } else {
                runs.append(page..<(page + 1))
            }
        }
        return runs
    }
}
