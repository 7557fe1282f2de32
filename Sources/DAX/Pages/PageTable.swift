import Glibc
import Synchronization

/// What a page map shares with the pins it hands out: the descriptor table, the tally slot, the
/// wait queue and the slow-path hooks.
///
/// It lives in manually allocated memory so that ``PinnedPages`` can point at it without a
/// reference count (a retain and a release would double the cost of a pin). ``PageMap`` frees it
/// in `deinit` only when no pin is outstanding; otherwise it stays allocated, and a late release
/// remains safe.
/// Pin totals in shared atomics, for a page map that found no free per-thread tally slot.
struct SharedTallies: ~Copyable {
    let acquired = Atomic<UInt64>(0)
    let released = Atomic<UInt64>(0)
    let pinnedUp = Atomic<UInt64>(0)
    let pinnedDown = Atomic<UInt64>(0)

    func add(_ n: Int, _ field: PinTally.Field) {
        switch field {
        case .acquired: acquired.wrappingAdd(UInt64(n), ordering: .relaxed)
        case .released: released.wrappingAdd(UInt64(n), ordering: .relaxed)
        case .pinnedUp: pinnedUp.wrappingAdd(UInt64(n), ordering: .relaxed)
        case .pinnedDown: pinnedDown.wrappingAdd(UInt64(n), ordering: .relaxed)
        }
    }

    var values: [UInt64] {
        // Releases first, as in `PinTally.totals`.
        let released = released.load(ordering: .acquiring)
        let pinnedDown = pinnedDown.load(ordering: .acquiring)
        return [acquired.load(ordering: .acquiring), released, pinnedUp.load(ordering: .acquiring), pinnedDown]
    }
}

struct PageTableCore: ~Copyable {
    let descriptors: UnsafeMutablePointer<PageDescriptor>
    let count: Int
    let tableBytes: Int
    /// This map's slot in the per-thread tallies, or -1 when all slots were taken.
    let tallySlot: Int
    /// Used instead of the tallies when `tallySlot` is -1.
    let sharedTallies = SharedTallies()
    let waitQueue = PageWaitQueue()
    /// Called by the final put or unpin of a quarantined page (the allocator returns the block).
    let quarantineRelease = Mutex(QuarantineHook())
    /// Live long-term pins, for revocation.
    let leases = Mutex<[ObjectIdentifier: PinLease]>([:])
}

/// The allocator's hook for the end of a quarantine, wrapped in a struct: a bare closure kept in a
/// `Mutex` is re-abstracted, and its wrapper stored back, on every generic `inout` access, so each
/// call would run one more thunk than the last.
struct QuarantineHook: Sendable {
    var release: (@Sendable (PageFrameNumber) -> Void)?
}

/// A reference to a ``PageTableCore`` that pins can carry.
struct PageTable: @unchecked Sendable {
    let core: UnsafeMutablePointer<PageTableCore>

    @inline(__always)
    func descriptor(_ frame: UInt64) -> UnsafeMutablePointer<PageDescriptor> {
        core.pointee.descriptors + Int(truncatingIfNeeded: frame)
    }

    @inline(__always)
    func word(_ frame: UInt64) -> UInt64 {
        descriptor(frame).pointee.counts.load(ordering: .acquiring)
    }

    // MARK: Tallies

    /// Starts a change of pin counts: see ``PinTally`` for why readers wait for it.
    @inline(__always)
    func beginChange() -> PinTally.Block { PinTally.begin() }

    @inline(__always)
    func endChange(_ block: PinTally.Block) { PinTally.end(block) }

    /// Adds to two counters, inside a change (`block` from ``beginChange()``).
    @inline(__always)
    func tally(_ n: Int, _ field: PinTally.Field, _ m: Int, _ other: PinTally.Field, in block: PinTally.Block) {
        let slot = core.pointee.tallySlot
        if slot >= 0 {
            PinTally.add(n, field, m, other, slot: slot, block: block)
        } else {
            core.pointee.sharedTallies.add(n, field)
            core.pointee.sharedTallies.add(m, other)
        }
    }

    func totals() -> PinTotals {
        let slot = core.pointee.tallySlot
        let sums: [UInt64]
        if slot >= 0 {
            sums = PinTally.totals(slot: slot)
        } else {
            PinTally.waitForChanges()
            sums = core.pointee.sharedTallies.values
        }
        return PinTotals(
            acquired: Int(truncatingIfNeeded: sums[0]), released: Int(truncatingIfNeeded: sums[1]),
            pinnedPages: Int(truncatingIfNeeded: sums[2] &- sums[3]))
    }

    // MARK: Pin and unpin

    enum GetFailure: Error { case notAllocated, frozen, overflow }

    /// The kernel's `try_grab_folio(FOLL_PIN)`: adds a reference and a pin unless the page is free,
    /// frozen or at a count limit. Returns whether this was the page's first pin.
    @inline(__always)
    func tryPin(_ frame: UInt64) -> Result<Bool, GetFailure> {
        let counts = descriptor(frame)
        var old = counts.pointee.counts.load(ordering: .relaxed)
        while true {
            if old & (PageWord.allocated | PageWord.frozen) != PageWord.allocated {
                return .failure(old & PageWord.allocated == 0 ? .notAllocated : .frozen)
            }
            if PageWord.refCount(old) == PageWord.refLimit || PageWord.pinCount(old) == PageWord.pinLimit {
                return .failure(.overflow)
            }
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: old &+ (PageWord.refOne | PageWord.pinOne), ordering: .sequentiallyConsistent)
            if exchanged { return .success(PageWord.pinCount(old) == 0) }
            old = current
        }
    }

    /// Drops a reference and a pin. Returns whether the page is no longer pinned.
    @inline(__always)
    func unpinOne(_ frame: UInt64) -> Bool {
        let old = descriptor(frame).pointee.counts.wrappingSubtract(
            PageWord.refOne | PageWord.pinOne, ordering: .acquiringAndReleasing
        ).oldValue
        precondition(
            PageWord.pinCount(old) > 0 && PageWord.refCount(old) > 0,
            "unpin of pfn \(frame), which is not pinned")
        if old & PageWord.slowPathFlags != 0 {
            afterDecrement(frame, old: old, new: old &- (PageWord.refOne | PageWord.pinOne))
        }
        return PageWord.pinCount(old) == 1
    }

    /// Pins every frame of `runs`, all or none.
    func pin(_ runs: FrameRuns) throws {
        let change = beginChange()
        defer { endChange(change) }
        var pinned = 0
        var firstPins = 0
        var failure: (UInt64, GetFailure)?
        runs.forEachFrame { frame in
            switch tryPin(frame) {
            case .success(let first):
                pinned += 1
                if first { firstPins += 1 }
                return true
            case .failure(let reason):
                failure = (frame, reason)
                return false
            }
        }
        if let (frame, reason) = failure {
            var undone = 0
            var lastPins = 0
            runs.forEachFrame { frame in
                guard undone < pinned else { return false }
                if unpinOne(frame) { lastPins += 1 }
                undone += 1
                return true
            }
            tally(firstPins, .pinnedUp, lastPins, .pinnedDown, in: change)
            throw Self.error(for: reason, frame: frame, what: "pin")
        }
        tally(pinned, .acquired, firstPins, .pinnedUp, in: change)
    }

    /// Pins one frame: the fast path of a one-page pin.
    @inline(__always)
    func pinOne(_ frame: UInt64) throws {
        let change = beginChange()
        defer { endChange(change) }
        switch tryPin(frame) {
        case .success(let first): tally(1, .acquired, first ? 1 : 0, .pinnedUp, in: change)
        case .failure(let reason): throw Self.error(for: reason, frame: frame, what: "pin")
        }
    }

    /// Unpins one frame and counts it released: the fast path of a one-page release.
    @inline(__always)
    func unpinOneCounted(_ frame: UInt64) {
        let change = beginChange()
        let last = unpinOne(frame)
        tally(1, .released, last ? 1 : 0, .pinnedDown, in: change)
        endChange(change)
    }

    /// Unpins every frame of `runs` and counts them as released.
    func unpin(_ runs: FrameRuns) {
        // A change at a time of at most `PinTally.changePages` pages, each counted as it ends: a
        // reader never waits long for one (a quarantined page's unpin runs the allocator's hook).
        var change = beginChange()
        var released = 0
        var lastPins = 0
        runs.forEachFrame { frame in
            if unpinOne(frame) { lastPins += 1 }
            released += 1
            if released == PinTally.changePages {
                tally(released, .released, lastPins, .pinnedDown, in: change)
                endChange(change)
                change = beginChange()
                released = 0
                lastPins = 0
            }
            return true
        }
        tally(released, .released, lastPins, .pinnedDown, in: change)
        endChange(change)
    }

    static func error(for failure: GetFailure, frame: UInt64, what: String) -> DAXError {
        switch failure {
        case .notAllocated:
            DAXError(.invalidArgument, "cannot \(what) pfn \(frame): the page is not allocated")
        case .frozen:
            DAXError(.busy, "cannot \(what) pfn \(frame): the page is frozen (being migrated or truncated)")
        case .overflow:
            DAXError(.busy, "cannot \(what) pfn \(frame): its reference or pin count is at its limit")
        }
    }

    // MARK: Other references

    /// Adds `delta` (a reference, or a reference and a mapping) unless the page is free or frozen.
    @inline(__always)
    func tryGet(_ frame: UInt64, adding delta: UInt64) -> GetFailure? {
        let counts = descriptor(frame)
        var old = counts.pointee.counts.load(ordering: .relaxed)
        while true {
            if old & (PageWord.allocated | PageWord.frozen) != PageWord.allocated {
                return old & PageWord.allocated == 0 ? .notAllocated : .frozen
            }
            if PageWord.refCount(old) == PageWord.refLimit
                || (delta & PageWord.mapOne != 0 && PageWord.mapCount(old) == PageWord.mapLimit)
            {
                return .overflow
            }
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: old &+ delta, ordering: .sequentiallyConsistent)
            if exchanged { return nil }
            old = current
        }
    }

    /// Drops `delta` (a reference, or a reference and a mapping).
    @inline(__always)
    func put(_ frame: UInt64, removing delta: UInt64) {
        let old = descriptor(frame).pointee.counts.wrappingSubtract(delta, ordering: .acquiringAndReleasing).oldValue
        precondition(
            PageWord.refCount(old) > 0 && (delta & PageWord.mapOne == 0 || PageWord.mapCount(old) > 0),
            "put of pfn \(frame), which holds no such reference")
        if old & PageWord.slowPathFlags != 0 { afterDecrement(frame, old: old, new: old &- delta) }
    }

    /// The slow path of a decrement: release a quarantined page on its last reference, wake waiters.
    @inline(never)
    func afterDecrement(_ frame: UInt64, old: UInt64, new: UInt64) {
        let counts = descriptor(frame)
        if old & PageWord.quarantined != 0, PageWord.refCount(new) == 0 {
            // Only one decrement takes the count of a free page to zero, and no try-get can raise
            // it again (the page is not allocated), so exactly one caller gets here per quarantine.
            counts.pointee.counts.bitwiseAnd(~PageWord.quarantined, ordering: .sequentiallyConsistent)
            let hook = core.pointee.quarantineRelease.withTrackedLock { $0 }
            hook.release?(PageFrameNumber(rawValue: frame))
        }
        if old & PageWord.waiters != 0 {
            counts.pointee.counts.bitwiseAnd(~PageWord.waiters, ordering: .sequentiallyConsistent)
            core.pointee.waitQueue.wakeAll()
        }
    }
}

/// Contiguous runs of frames: what a pin covers.
struct FrameRuns: Sendable {
    /// Non-empty, in the order of the pinned range.
    let runs: [PageRun]

    init(_ runs: [PageRun]) { self.runs = runs }

    init(_ frames: some Sequence<PageFrameNumber>) {
        var runs: [PageRun] = []
        for frame in frames { runs.append(page: frame.rawValue) }
        self.runs = runs
    }

    static func single(_ run: PageRun) -> FrameRuns { FrameRuns([run]) }

    var pageCount: Int { runs.reduce(0) { $0 + Int($1.count) } }

    var frames: [PageFrameNumber] {
        var result: [PageFrameNumber] = []
        result.reserveCapacity(pageCount)
        forEachFrame {
            result.append(PageFrameNumber(rawValue: $0))
            return true
        }
        return result
    }

    func contains(_ frame: UInt64) -> Bool {
        runs.contains { $0.range.contains(frame) }
    }

    /// Calls `body` on each frame in order until it returns false.
    func forEachFrame(_ body: (UInt64) -> Bool) {
        for run in runs {
            var frame = run.start
            for _ in 0..<run.count {
                guard body(frame) else { return }
                frame &+= 1
            }
        }
    }
}
