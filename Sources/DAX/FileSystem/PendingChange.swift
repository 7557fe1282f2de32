/// A metadata change in the making: its transaction, the blocks it took from the allocator (given
/// back if it fails) and the blocks it frees (released to the allocator once it committed).
struct PendingChange {
    var transaction = Transaction()
    private(set) var allocated: [PageRun] = []
    private(set) var freed: [PageRun] = []

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

    /// Records blocks as free on the device; the allocator gets them after the commit.
    mutating func free(_ runs: [PageRun], superblock: Superblock) {
        for run in Self.coalesced(runs) {
            transaction.setBits((run.start - superblock.dataStart)..<(run.end - superblock.dataStart), to: false)
        }
        freed += runs
    }

    mutating func free(_ extents: [Extent], superblock: Superblock) {
        free(extents.map { PageRun(start: $0.physical, count: $0.length) }, superblock: superblock)
    }

    mutating func freeBlocks(_ blocks: [UInt64], superblock: Superblock) {
        free(blocks.map { PageRun(start: $0, count: 1) }, superblock: superblock)
    }

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
        try journal.commit(change.transaction, what: what)
        releaseFreed(change.freed)
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
        change.free(plan.removed, superblock: superblock)
    }

    /// Frees every block of the inode whose contents are `inode` and the inode itself, in `change`.
    func freeInode(_ inode: Inode.Contents, change: inout PendingChange) {
        change.free(inode.extents.allExtents, superblock: superblock)
        change.freeBlocks(inode.extents.leafBlocks, superblock: superblock)
        var record = InodeRecord()
        record.generation = inode.record.generation
        change.store(record, extents: ExtentMap(), of: inode.number, superblock: superblock)
    }
}
