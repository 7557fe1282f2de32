/// A metadata change in the making: its transaction, the blocks it took from the allocator (given
/// back if it fails), the references to data blocks it adds and drops (resolved against the
/// shared-block table when it commits), and the blocks it frees (released to the allocator once it
/// committed).
struct PendingChange {
    var transaction = Transaction()
    private(set) var allocated: [PageRun] = []
    /// Blocks that gain a reference (a clone or dedup now names them too).
    private(set) var referenced: [PageRun] = []
    /// Blocks that lose a reference (an extent no longer names them): freed at the commit unless
    /// another extent still names them.
    private(set) var dropped: [PageRun] = []
    /// Blocks the change frees: metadata blocks at once, data blocks when the commit finds their
    /// last reference gone.
    fileprivate(set) var freed: [PageRun] = []

    /// Records blocks taken from the allocator as allocated on the device.
    mutating func allocate(_ runs: [PageRun], superblock: Superblock) {
        for run in runs {
            transaction.setBits((run.start - superblock.dataStart)..<(run.end - superblock.dataStart), to: true)
        }
        allocated += runs
    }

    /// Writes inode `number`'s record, with `extents` folded in: how every change of an inode
    /// reaches the device.
    mutating func store(_ record: InodeRecord, extents: ExtentMap, of number: UInt32, superblock: Superblock) {
        var stored = record
        extents.store(into: &stored)
        transaction.write(stored.encode(), at: superblock.inodeOffset(number))
    }

    /// Records metadata blocks (extent and table leaves, never shared) as free on the device; the
    /// allocator gets them after the commit.
    mutating func free(_ runs: [PageRun], superblock: Superblock) {
        for run in Self.coalesced(runs) {
            transaction.setBits((run.start - superblock.dataStart)..<(run.end - superblock.dataStart), to: false)
        }
        freed += runs
    }

    mutating func freeBlocks(_ blocks: [UInt64], superblock: Superblock) {
        free(blocks.map { PageRun(start: $0, count: 1) }, superblock: superblock)
    }

    /// The extents no longer name their blocks: each loses a reference, and is freed at the commit
    /// if that was its last.
    mutating func drop(_ extents: [Extent]) {
        dropped += extents.map { PageRun(start: $0.physical, count: $0.length) }
    }

    /// The extents name their blocks once more (a clone, dedup).
    mutating func reference(_ extents: [Extent]) {
        referenced += extents.map { PageRun(start: $0.physical, count: $0.length) }
    }

    /// Whether the commit must consult the shared-block table.
    var changesReferences: Bool { !referenced.isEmpty || !dropped.isEmpty }

    /// Sorted runs with neighbours joined: fewer bitmap records.
    static func coalesced(_ runs: [PageRun]) -> [PageRun] {
        var result: [PageRun] = []
        for run in runs.sorted(by: { $0.start < $1.start }) {
            if let last = result.last, last.end == run.start {
                result[result.count - 1].count += run.count
            } else {
                result.append(run)
            }
        }
        return result
    }
}

extension Volume {
    /// Commits `change`, then releases the blocks it freed (quarantining the busy ones). If it
    /// throws (the transaction does not fit the journal; nothing was written), the caller still owns
    /// the blocks the change took and gives them back with ``abandon(_:)``.
    func commit(_ change: PendingChange, what: String) throws {
        var change = change
        try commit(&change, what: what, release: true)
    }

    /// Commits `change`: under the shared-block table's lock, the references it adds and drops
    /// become new counts (leaves written in the same transaction) and the blocks whose last
    /// reference went are freed; `change.freed` says which. With `release`, they go to the
    /// allocator at once; else the caller releases them (``releaseFreed(_:)``) when nothing holds
    /// them frozen any more.
    func commit(_ change: inout PendingChange, what: String, release: Bool) throws {
        if change.changesReferences {
            try shared.withLock { table in
                var edited = table
                var resolved = change
                var leafRuns: [PageRun] = []
                if edited == nil {
                    precondition(change.referenced.isEmpty, "a device without a shared-block table cannot share")
                    resolved.free(change.dropped, superblock: superblock)
                } else {
                    let edit = edited!.plan(adding: change.referenced, dropping: change.dropped)
                    if edit.newLeafBlocks > 0 {
                        leafRuns = try allocateBacked(
                            edit.newLeafBlocks, goal: nil, inode: Superblock.rootInode, firstIndex: nil)
                        resolved.allocate(leafRuns, superblock: superblock)
                    }
                    let leafBlocks = leafRuns.flatMap { Array($0.range) }
                    let freedLeaves = edited!.apply(edit, newBlocks: leafBlocks, transaction: &resolved.transaction)
                    resolved.freeBlocks(freedLeaves, superblock: superblock)
                    resolved.free(edit.freed, superblock: superblock)
                }
                do {
                    try journal.commit(resolved.transaction, what: what)
                } catch {
                    if !leafRuns.isEmpty { allocator.unallocate(leafRuns) }  // the rest the caller gives back
                    throw error
                }
                change = resolved
                table = edited
            }
        } else {
            try journal.commit(change.transaction, what: what)
        }
        if release { releaseFreed(change.freed) }
    }

    /// Gives blocks a committed change freed to the allocator: idle ones become available (on a
    /// sparse device with their storage given back), busy ones are quarantined.
    func releaseFreed(_ runs: [PageRun]) {
        if !runs.isEmpty { allocator.release(runs) }
    }

    /// Hands quarantined blocks back to the allocator at their final unpin or put.
    func watchQuarantine() {
        device.pages.setQuarantineRelease { [weak allocator] frame in allocator?.quarantineEnded(frame) }
    }

    /// Takes blocks from the allocator (see ``BlockAllocator/allocate(_:goal:inode:firstIndex:)``)
    /// and, on a sparse device, gives them storage first: a full `/dev/shm` is `.noSpace` here,
    /// with the blocks given back, rather than a SIGBUS at the first store into one.
    func allocateBacked(_ count: Int, goal: UInt64?, inode: UInt32, firstIndex: UInt64?) throws -> [PageRun] {
        let runs = try allocator.allocate(count, goal: goal, inode: inode, firstIndex: firstIndex)
        do {
            for run in runs {
                try device.back(
                    offset: Int(run.start) * Superblock.blockSize, count: Int(run.count) * Superblock.blockSize)
            }
        } catch {
            allocator.unallocate(runs)
            throw error
        }
        return runs
    }

    /// Gives back the blocks of a change that will not be committed.
    func abandon(_ change: PendingChange) {
        if !change.allocated.isEmpty { allocator.unallocate(change.allocated) }
    }

    /// Replaces what maps `pages` of `inode` with `extents` in `map` (a copy the caller installs
    /// after the commit), taking leaf blocks as needed and freeing what is removed.
    func editExtents(
        _ map: inout ExtentMap, of inode: UInt32, replacing pages: Range<UInt64>, with extents: [Extent],
        change: inout PendingChange
    ) throws {
        let plan = map.plan(replacing: pages, with: extents)
        var leafBlocks: [UInt64] = []
        if plan.newLeafBlocks > 0 {
            let runs = try allocateBacked(plan.newLeafBlocks, goal: nil, inode: inode, firstIndex: nil)
            change.allocate(runs, superblock: superblock)
            leafBlocks = runs.flatMap { Array($0.range) }
        }
        let freedLeaves = map.apply(
            plan, newBlocks: leafBlocks, owner: inode, transaction: &change.transaction,
            superblock: superblock)
        change.freeBlocks(freedLeaves, superblock: superblock)
        change.drop(plan.removed)
    }

    /// Frees every block of the inode whose contents are `inode` and the inode itself, in `change`.
    func freeInode(_ inode: Inode.Contents, change: inout PendingChange) {
        change.drop(inode.extents.allExtents)
        change.freeBlocks(inode.extents.leafBlocks, superblock: superblock)
        var record = InodeRecord()
        record.generation = inode.record.generation
        change.store(record, extents: ExtentMap(), of: inode.number, superblock: superblock)
    }
}
