/// Page migration: moving a file's pages to new blocks while it stays mapped, the kernel's
/// `migrate_pages` and `folio_migrate_mapping` for DAX pages.
extension AddressSpace {
    /// How many times one migration looks at a busy page.
    static let migrationAttempts = 3
    /// File pages migrated in one transaction.
    static let migrationBatch: UInt64 = 1024

    /// Migrates the pages of `pages` (at most ``migrationBatch``) under the invalidate lock and the
    /// inode lock, read top to bottom: find the pages, take them out of the mappings, keep the busy
    /// ones, freeze the rest, move them (the file system copies and commits), map the new blocks,
    /// free the old ones.
    /// `goal` is where the new blocks are looked for first, and is left past the last one taken
    /// (see ``FileData/move(_:_:goal:what:)``).
    func migrate(_ pages: Range<UInt64>, goal: inout UInt64?, path: String) throws -> MigrationResult {
        try invalidateLock.withWriteLock {
            try inode.contents.write { contents in
                try contents.checkLive(path)
                return try migrateLocked(&contents, pages, goal: &goal, path: path)
            }
        }
    }

    /// Where the blocks of a migration of `pages` should go: the first free run that holds as
    /// many blocks as the file has there that may move (shared blocks stay), nil when none does.
    func migrationGoal(_ pages: Range<UInt64>) -> UInt64? {
        let blocks = inode.contents.read { contents in
            let held = contents.extents.extents(in: pages).reduce(0) { $0 + Int($1.length) }
            let shared = data.sharedExtents(in: pages, of: contents.extents).reduce(0) { $0 + Int($1.length) }
            return held - shared
        }
        return data.volume.allocator.firstAvailableRun(length: blocks)
    }

    private func migrateLocked(
        _ contents: inout Inode.Contents, _ pages: Range<UInt64>, goal: inout UInt64?, path: String
    ) throws -> MigrationResult {
        // 1. The pages that have blocks, and the file's mappings.
        // A shared block stays where it is: moving it would repoint every file that names it.
        var candidates: [(page: UInt64, block: UInt64)] = []
        let shared = data.sharedExtents(in: pages, of: contents.extents).flatMap { Array($0.logicalRange) }
        let sharedPages = Set(shared)
        for extent in contents.extents.extents(in: pages) {
            for page in extent.logicalRange where !sharedPages.contains(page) {
                candidates.append((page, extent.block(for: page)))
            }
        }
        guard !candidates.isEmpty else { return MigrationResult(migrated: 0, busy: []) }
        let mappings = liveMappings
        let pageMap = device.pages

        // 2. Out of every mapping's page table (the gup-fast rule: take the entry out, bump the
        //    generation, then look at the counts), then freeze each page at the count its
        //    mappings explain. What is referenced beyond them, or gains a reference before its
        //    freeze, goes back into the page tables and is tried again.
        var pending = candidates
        var frozen: [(page: UInt64, block: UInt64)] = []
        for _ in 1...Self.migrationAttempts where !pending.isEmpty {
            detach(pending.map(\.page), from: mappings)
            let referenced = Set(pageMap.busyFrames(pending.map(\.block)))
            var stayed = pending.filter { referenced.contains($0.block) }
            for candidate in pending where !referenced.contains(candidate.block) {
                if pageMap.freezeAtMappings(PageFrameNumber(rawValue: candidate.block)) {
                    frozen.append(candidate)
                } else {
                    stayed.append(candidate)  // a reference came between the look and the freeze
                }
            }
            if !stayed.isEmpty {
                let back = Set(stayed.map(\.block))
                for mapping in mappings { mapping.restore(frames: back) }
            }
            pending = stayed
        }
        var busy = pending.map { Int($0.page) }.sorted()
        guard !frozen.isEmpty else { return MigrationResult(migrated: 0, busy: busy) }
        frozen.sort { $0.page < $1.page }

        // 3. Stores through the mappings stop before the copy: the pages stay mapped,
        //    write-protected, so a store waits in the fault handler (for the inode lock held
        //    here) and then reaches the new block, as a store waits on the kernel's migration
        //    entry. Where a mapping cannot write-protect, its pages are zapped instead; a page
        //    that cannot even be zapped (the process out of map entries) still takes stores
        //    into its block, so it stays where it is, and is told as busy.
        var unhidden: Set<UInt64> = []
        for mapping in mappings where !mapping.protectDetached() { unhidden.formUnion(mapping.zapDetached()) }
        if !unhidden.isEmpty {
            let kept = frozen.filter { unhidden.contains($0.block) }
            frozen.removeAll { unhidden.contains($0.block) }
            for candidate in kept { pageMap.unfreeze(PageFrameNumber(rawValue: candidate.block)) }
            let back = kept.map { Extent(logical: $0.page, physical: $0.block, length: 1) }
            for mapping in mappings {
                mapping.reinstate(frames: unhidden)
                mapping.restore(frames: unhidden)
                mapping.populate(back)
            }
            keepRacedStores(&contents)
            busy = (busy + kept.map { Int($0.page) }).sorted()
            guard !frozen.isEmpty else { return MigrationResult(migrated: 0, busy: busy) }
        }

        // 4. The file system moves the bytes to new blocks and points the extents at them.
        let moved: FileData.Move
        do {
            moved = try data.move(
                &contents, frozen, goal: &goal, what: "migrate of \(counted(frozen.count, "page")) of \(path)")
        } catch {
            // Nothing moved: the old blocks thaw and show in the mappings again.
            for candidate in frozen { pageMap.unfreeze(PageFrameNumber(rawValue: candidate.block)) }
            let back = frozen.map { Extent(logical: $0.page, physical: $0.block, length: 1) }
            for mapping in mappings {
                mapping.restore()
                mapping.populate(back)
            }
            keepRacedStores(&contents)
            throw error
        }

        // 5. Each mapping shows the new blocks, each mapped straight over its old one; the old
        //    blocks thaw and go back to the allocator.
        for mapping in mappings {
            mapping.replaceDetached(with: moved.extents)
            mapping.populate(moved.extents)
        }
        keepRacedStores(&contents)
        for candidate in frozen { pageMap.unfreeze(PageFrameNumber(rawValue: candidate.block)) }
        data.volume.releaseFreed(moved.freed)
        return MigrationResult(migrated: frozen.count, busy: busy)
    }

    /// Takes `pages` out of every mapping of `mappings` (their counts stay until zapped) and bumps
    /// the layout generation, so that a pin racing in backs off.
    private func detach(_ pages: [UInt64], from mappings: [DAXMapping]) {
        for run in FileData.runs(of: pages) {
            for mapping in mappings { _ = mapping.detach(run, cut: 0..<0) }
        }
        layoutChanged()
    }
}

/// What ``DAXFile/migrate(offset:count:)`` did.
public struct MigrationResult: Sendable, Equatable {
    /// Pages moved to new blocks.
    public var migrated: Int
    /// File page indexes left in place: an unexpected reference (a pin).
    public var busy: [Int]

    /// A result of `migrated` pages moved and `busy` left in place.
    public init(migrated: Int, busy: [Int]) {
        self.migrated = migrated
        self.busy = busy
    }
}
