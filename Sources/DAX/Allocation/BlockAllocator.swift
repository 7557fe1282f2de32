import Synchronization

/// Which data blocks can be handed out now: the runtime side of the block bitmap.
///
/// A block is *available* when the device's bitmap says it is free **and** no reference, pin or
/// mapping holds it (invariant 1). Blocks freed while still pinned are *quarantined*: free on the
/// device, unavailable here, until the page map's final unpin hands them back (invariant 2). The
/// allocator re-checks each block's descriptor as it takes it, so a busy block is never handed out
/// even if the bookkeeping were wrong.
final class BlockAllocator: Sendable {
    struct State: ~Copyable {
        /// One bit per data block: 1 = not available (allocated on the device, being handed out,
        /// or quarantined). Lazily zeroed: the free part of a huge device costs no memory.
        let used: LazyBitmap
        var availableCount: Int
        var quarantined: Int = 0
        /// Next-fit position, as a data-block index.
        var cursor: Int = 0
        /// Available blocks found busy at allocation (a bookkeeping bug if ever non-zero).
        var skippedBusy: Int = 0
    }

    let pages: PageMap
    let dataStart: UInt64
    let dataBlocks: Int
    /// Gives a run's storage back to the file system holding a sparse device (a punched hole);
    /// nil for a device that is not sparse. Called under the lock, after the blocks are free and
    /// before they can be handed out, so that it never reaches another file's new data.
    private let returnStorage: (@Sendable (PageRun) -> Void)?
    fileprivate let state: Mutex<State>

    /// Takes over `allocated`, the device's bitmap as scanned (bit `i` set: data-block index `i`
    /// is allocated), of which `allocatedCount` bits are set. Nothing else may use it afterwards.
    init(
        pages: PageMap, dataStart: UInt64, dataBlocks: Int, allocated: LazyBitmap, allocatedCount: Int,
        returnStorage: (@Sendable (PageRun) -> Void)? = nil
    ) {
        precondition(allocated.count == dataBlocks, "a bitmap of \(allocated.count) bits for \(dataBlocks) blocks")
        self.pages = pages
        self.dataStart = dataStart
        self.dataBlocks = dataBlocks
        self.returnStorage = returnStorage
        state = Mutex(State(used: allocated, availableCount: dataBlocks - allocatedCount))
    }

    /// Blocks that can be allocated now.
    var freeBlocks: Int { state.withTrackedLock { $0.availableCount } }
    /// Blocks free on the device but held back by pins or references.
    var quarantinedBlocks: Int { state.withTrackedLock { $0.quarantined } }
    var skippedBusyBlocks: Int { state.withTrackedLock { $0.skippedBusy } }

    /// Takes `count` blocks, as few runs as the free space allows, starting the search at `goal`
    /// (a block number; the block after the file's last one keeps files contiguous). Marks each
    /// block's descriptor allocated to `inode` at page `firstIndex + n` (metadata blocks pass
    /// `nil`). All or nothing: `.noSpace` if fewer blocks are available.
    func allocate(_ count: Int, goal: UInt64?, inode: UInt32, firstIndex: UInt64?) throws -> [PageRun] {
        precondition(count > 0)
        return try state.withTrackedLock { state in
            guard state.availableCount >= count else {
                throw DAXError(
                    .noSpace,
                    "no space: \(counted(count, "block")) needed, \(state.availableCount) free"
                        + (state.quarantined > 0 ? " and \(state.quarantined) held by pins" : ""))
            }
            var runs: [PageRun] = []
            var taken = 0
            let first =
                goal.flatMap { $0 >= dataStart && $0 < dataStart + UInt64(dataBlocks) ? Int($0 - dataStart) : nil }
                ?? state.cursor
            // One sweep: from `first` to the end, then from 0 back to `first`.
            var position = first
            var limit = dataBlocks
            var wrapped = false
            while taken < count {
                guard let start = state.used.nextClear(from: position, limit: limit) else {
                    if wrapped { break }
                    wrapped = true
                    position = 0
                    limit = first
                    continue
                }
                var block = start
                while block < limit, taken < count, !state.used[block] {
                    let frame = dataStart + UInt64(block)
                    let pageIndex = firstIndex.map { $0 + UInt64(taken) } ?? PageOwner.indexLimit
                    block += 1
                    guard pages.markAllocated(frame, inode: inode, index: pageIndex) else {
                        // Free on the device yet referenced: invariant 1 says never hand it out.
                        // It stays available; a later allocation retries it once it is idle.
                        state.skippedBusy += 1
                        break
                    }
                    state.used.set(Int(frame - dataStart))
                    state.availableCount -= 1
                    runs.append(page: frame)
                    taken += 1
                }
                position = block
            }
            guard taken == count else {
                for run in runs { Self.giveBack(run, to: &state, pages: pages, dataStart: dataStart) }
                throw DAXError(.noSpace, "no space: \(counted(count, "block")) needed, only \(taken) free and idle")
            }
            state.cursor = position < dataBlocks ? position : 0
            return runs
        }
    }

    /// Returns blocks that were taken with `allocate` but never committed to the device (on a
    /// sparse device their storage too, which the failed operation may have given them).
    func unallocate(_ runs: [PageRun]) {
        state.withTrackedLock { state in
            for run in runs {
                returnStorage?(run)
                Self.giveBack(run, to: &state, pages: pages, dataStart: dataStart)
            }
        }
    }

    private static func giveBack(_ run: PageRun, to state: inout State, pages: PageMap, dataStart: UInt64) {
        for frame in run.range {
            let released = pages.markFree(frame)
            precondition(released, "a block taken and given back in one operation was referenced")
            state.used.clear(Int(frame - dataStart))
            state.availableCount += 1
        }
    }

    /// Blocks freed on the device by a committed transaction: idle ones become available now
    /// (on a sparse device, their storage given back first), busy ones are quarantined until
    /// their final unpin or put calls ``quarantineEnded(_:)``.
    func release(_ runs: [PageRun]) {
        state.withTrackedLock { state in
            var available: [PageRun] = []
            for run in runs {
                for frame in run.range {
                    if pages.markFree(frame) {
                        available.append(page: frame)
                    } else {
                        state.quarantined += 1
                    }
                }
            }
            for run in available {
                returnStorage?(run)
                for frame in run.range { state.used.clear(Int(frame - dataStart)) }
                state.availableCount += Int(run.count)
            }
        }
    }

    /// The final put or unpin of a quarantined block: it may be reused now.
    func quarantineEnded(_ frame: PageFrameNumber) {
        state.withTrackedLock { state in
            let index = Int(frame.rawValue - dataStart)
            precondition(
                index >= 0 && index < dataBlocks && state.used[index],
                "quarantine ended for \(frame), which is not a quarantined data block")
            returnStorage?(PageRun(start: frame.rawValue, count: 1))
            state.used.clear(index)
            state.availableCount += 1
            state.quarantined -= 1
        }
    }

    /// The first block of the first run of at least `length` available blocks, or nil: a goal
    /// for an allocation that should be contiguous (migration gathering a file).
    /// A goal for a file page `offset` pages into a run of the file with no block mapped before
    /// or after it: where the next sweep starts, plus `offset`, so that the pages of the run get
    /// blocks at the same distance from each other whatever order they are filled in (nil when
    /// that lies past the last block).
    func goalFromCursor(plus offset: UInt64) -> UInt64? {
        state.withTrackedLock { state in
            let block = UInt64(state.cursor).addingReportingOverflow(offset)
            return !block.overflow && block.partialValue < UInt64(dataBlocks) ? dataStart + block.partialValue : nil
        }
    }

    func firstAvailableRun(length: Int) -> UInt64? {
        guard length > 0 else { return nil }
        return state.withTrackedLock { state in
            var position = 0
            while let start = state.used.nextClear(from: position, limit: dataBlocks) {
                let end = state.used.nextSet(from: start, limit: dataBlocks) ?? dataBlocks
                if end - start >= length { return dataStart + UInt64(start) }
                position = end
            }
            return nil
        }
    }

    /// Whether data-block index `index` is available, for `check`.
    func isAvailable(_ index: Int) -> Bool { state.withTrackedLock { !$0.used[index] } }

    /// Runs `body` with the bits of the blocks that cannot be handed out now (set: allocated,
    /// being handed out, or quarantined), under the allocator's lock, for `check`.
    func withUnavailableBits<T>(_ body: (LazyBitmap) throws -> T) rethrows -> T {
        try state.withTrackedLock { state in try body(state.used) }
    }
}
