/// A metadata change in the making: its transaction, the blocks it took from the allocator (given
/// back if it fails) and the blocks it frees (released to the allocator once it committed).
struct PendingChange {
    var transaction = Transaction()
    private(set) var allocated: [BlockRun] = []
    private(set) var freed: [BlockRun] = []

    /// Records blocks taken from the allocator as allocated on the device.
    mutating func allocate(_ runs: [BlockRun], superblock: Superblock) {
        for run in runs {
            transaction.setBits((run.start - superblock.dataStart)..<(run.end - superblock.dataStart), to: true)
        }
        allocated += runs
    }

    /// Records blocks as free on the device; the allocator gets them after the commit.
    mutating func free(_ runs: [BlockRun], superblock: Superblock) {
        for run in Self.coalesced(runs) {
            transaction.setBits((run.start - superblock.dataStart)..<(run.end - superblock.dataStart), to: false)
        }
        freed += runs
    }

    mutating func free(_ extents: [Extent], superblock: Superblock) {
        free(extents.map { BlockRun(start: $0.physical, count: $0.length) }, superblock: superblock)
    }

    mutating func freeBlocks(_ blocks: [UInt64], superblock: Superblock) {
        free(blocks.map { BlockRun(start: $0, count: 1) }, superblock: superblock)
    }

    /// Sorted runs with neighbours joined: fewer bitmap records.
    static func coalesced(_ runs: [BlockRun]) -> [BlockRun] {
        var result: [BlockRun] = []
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

extension DAXFileSystem {
    /// Commits `change`, then releases the blocks it freed (quarantining the busy ones). If it
    /// throws (the transaction does not fit the journal; nothing was written), the caller still owns
    /// the blocks the change took and gives them back with ``abandon(_:)``.
    func commit(_ change: PendingChange, what: String) throws {
        try journal.commit(change.transaction, what: what)
        releaseFreed(change.freed)
    }

    /// Gives blocks a committed change freed to the allocator (busy ones are quarantined). On a
    /// sparse device the storage of the idle ones goes back to the file system holding it
    /// (punched out), so that what a file frees can back what another file allocates next.
    func releaseFreed(_ runs: [BlockRun]) {
        guard !runs.isEmpty else { return }
        if device.isSparse {
            // Before the allocator may hand them out again (punching after would zero another
            // file's new data), and only the idle ones: a pinned block keeps its bytes for the
            // device that holds it, and is given back when its quarantine ends.
            var idle: [BlockRun] = []
            for run in runs {
                for frame in run.range where isIdle(device.pages.state(of: PageFrameNumber(rawValue: frame))) {
                    if let last = idle.last, last.end == frame {
                        idle[idle.count - 1].count += 1
                    } else {
                        idle.append(BlockRun(start: frame, count: 1))
                    }
                }
            }
            for run in idle { giveBackStorage(run) }
        }
        allocator.release(runs)
    }

    /// Hands quarantined blocks back to the allocator at their final unpin or put, and on a sparse
    /// device their storage back to the file system holding it.
    func watchQuarantine() {
        let sparse = device.isSparse
        device.pages.setQuarantineRelease { [weak self] frame in
            guard let self else { return }
            // Idle now, and not yet available: nothing else can be using the block.
            if sparse { giveBackStorage(BlockRun(start: frame.rawValue, count: 1)) }
            allocator.quarantineEnded(frame)
        }
    }

    private func isIdle(_ state: PageState) -> Bool { state.refCount == 0 && state.pinCount == 0 }

    /// Punches `run` out of a sparse device file: it reads as zeros and uses no memory.
    func giveBackStorage(_ run: BlockRun) {
        device.zero(offset: Int(run.start) * Superblock.blockSize, count: Int(run.count) * Superblock.blockSize)
    }

    /// Takes blocks from the allocator (see ``BlockAllocator/allocate(_:goal:inode:firstIndex:)``)
    /// and, on a sparse device, gives them storage first: a full `/dev/shm` is `.noSpace` here,
    /// with the blocks given back, rather than a SIGBUS at the first store into one.
    func allocateBacked(_ count: Int, goal: UInt64?, inode: UInt32, firstIndex: UInt64?) throws -> [BlockRun] {
        let runs = try allocator.allocate(count, goal: goal, inode: inode, firstIndex: firstIndex)
        do {
            for run in runs {
                try device.back(offset: Int(run.start) * Superblock.blockSize, count: Int(run.count) * Superblock.blockSize)
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

    /// Frees every block of `inode` and the inode itself, in `change`.
    func freeInode(_ inode: Inode, change: inout PendingChange) {
        change.free(inode.extents.allExtents, superblock: superblock)
        change.freeBlocks(inode.extents.leafBlocks, superblock: superblock)
        var record = InodeRecord()
        record.generation = inode.record.generation
        change.transaction.write(record.encode(), at: superblock.inodeOffset(inode.number))
    }
}
