import Glibc
import Synchronization

/// What a page map shares with the pins it hands out: the descriptor table, the tally slot, the
/// wait queue and the slow-path hooks.
///
/// It lives in manually allocated memory so that ``PinnedPages`` can point at it without a
/// reference count (a retain and a release would double the cost of a pin). ``PageMap`` frees it
/// in `deinit` only when no pin is outstanding and no release is still running
/// (``MemMap/isFreeable``); otherwise it stays allocated, and a late release remains safe.
@usableFromInline
struct PageTableCore: ~Copyable {
    @usableFromInline let descriptors: UnsafeMutablePointer<PageDescriptor>
    let count: Int
    let tableBytes: Int
    /// This map's slot in the per-thread tallies, or -1 when all slots were taken.
    @usableFromInline let tallySlot: Int
    /// The map's counters when `tallySlot` is -1, laid out like a slot: atomics every thread adds
    /// to (locked instructions, the price of having more than `PinTally.slotCount` maps at once).
    @usableFromInline let sharedCounters: PinTally.Block
    let waitQueue = PageWaitQueue()
    /// Called by the final put or unpin of a quarantined page (the allocator returns the block).
    let quarantineRelease = Mutex(QuarantineHook())
    /// Live long-term pins, for revocation.
    let leases = Mutex<[ObjectIdentifier: PinLease]>([:])

    init(descriptors: UnsafeMutablePointer<PageDescriptor>, count: Int, tableBytes: Int, tallySlot: Int) {
        self.descriptors = descriptors
        self.count = count
        self.tableBytes = tableBytes
        self.tallySlot = tallySlot
        let shared = UnsafeMutableRawPointer.allocate(byteCount: PinTally.slotStride * 8, alignment: 64)
        shared.initializeMemory(as: UInt64.self, repeating: 0, count: PinTally.slotStride)
        self.sharedCounters = shared.assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    deinit { UnsafeMutableRawPointer(sharedCounters).deallocate() }
}

/// The allocator's hook for the end of a quarantine, wrapped in a struct: a bare closure kept in a
/// `Mutex` is re-abstracted, and its wrapper stored back, on every generic `inout` access, so each
/// call would run one more thunk than the last.
struct QuarantineHook: Sendable {
    var release: (@Sendable (PageFrameNumber) -> Void)?
}

/// A reference to a ``PageTableCore`` that pins can carry.
///
/// The one-page pin and unpin are inlinable, so that a caller in another module (a benchmark, a
/// device model) runs them without a call; everything else stays behind calls.
@usableFromInline
struct MemMap: @unchecked Sendable {
    @usableFromInline let core: UnsafeMutablePointer<PageTableCore>

    init(core: UnsafeMutablePointer<PageTableCore>) { self.core = core }

    @inlinable @inline(__always)
    func descriptor(_ frame: UInt64) -> UnsafeMutablePointer<PageDescriptor> {
        core.pointee.descriptors + Int(truncatingIfNeeded: frame)
    }

    @inline(__always)
    func word(_ frame: UInt64) -> UInt64 {
        descriptor(frame).pointee.counts.load(ordering: .sequentiallyConsistent)
    }

    // MARK: Tallies

    /// Where the calling thread counts its pins and unpins of this map (see ``PinTally``).
    @inlinable @inline(__always)
    func tallies() -> PinTally.Counters {
        let slot = core.pointee.tallySlot
        if slot >= 0 { return PinTally.counters(slot: slot) }
        return PinTally.Counters(base: core.pointee.sharedCounters, shared: true)
    }

    /// This map's counters summed over all threads.
    func sums() -> PinTally.Sums {
        let slot = core.pointee.tallySlot
        if slot >= 0 { return PinTally.sums(slot: slot) }
        var sums = PinTally.Sums()
        let shared = core.pointee.sharedCounters
        // Releases first, as in `PinTally.sums`; settled before released, since settling follows.
        let settledLast = shared[PinTally.Field.settledLast.rawValue].load(ordering: .acquiring)
        let settledMore = shared[PinTally.Field.settledMore.rawValue].load(ordering: .acquiring)
        for field in [PinTally.Field.releasedLast, .releasedMore, .acquiredFirst, .acquiredMore, .pinnedAdjust] {
            sums[field] = shared[field.rawValue].load(ordering: .acquiring)
        }
        sums.settled = settledLast == sums[.releasedLast] && settledMore == sums[.releasedMore]
        return sums
    }

    func totals() -> PinTotals {
        let sums = sums()
        return PinTotals(
            acquired: Int(truncatingIfNeeded: sums[.acquiredFirst] &+ sums[.acquiredMore]),
            released: Int(truncatingIfNeeded: sums[.releasedLast] &+ sums[.releasedMore]),
            pinnedPages: Int(truncatingIfNeeded: sums[.acquiredFirst] &- sums[.releasedLast] &+ sums[.pinnedAdjust]))
    }

    /// True when the table may be freed: every pin was released and every release has finished
    /// with the table (counted, swapped, slow path done, settled).
    ///
    /// Called only by the map's `deinit`, so no pin can start (pinning needs the map) and every
    /// pin ever acquired is visible (the last reference's release happened before the `deinit`).
    /// A release still running has counted itself but not settled, or (inside a compare-and-swap
    /// retry) has taken its count back, leaving the acquires ahead: either way this is false.
    var isFreeable: Bool {
        let sums = sums()
        return sums.settled && sums[.acquiredFirst] &+ sums[.acquiredMore] == sums[.releasedLast] &+ sums[.releasedMore]
    }

    // MARK: Pin and unpin

    @usableFromInline
    enum GetFailure: Error { case notAllocated, frozen, overflow }

    /// The kernel's `try_grab_folio(FOLL_PIN)`: adds a reference and a pin unless the page is free,
    /// frozen or at a count limit, counted acquired in `counters`. Returns whether this was the
    /// page's first pin.
    ///
    /// The count comes before the compare-and-swap and is taken back if the swap fails, so that
    /// anyone who sees the new descriptor sees the count (see ``PinTally``). One attempt inline;
    /// a lost race or a refusal goes to ``tryPinRetrying(_:from:counting:)``.
    @inlinable @inline(__always)
    func tryPin(_ frame: UInt64, counting counters: PinTally.Counters) -> Result<Bool, GetFailure> {
        let counts = descriptor(frame)
        let old = counts.pointee.counts.load(ordering: .relaxed)
        let pins = PageWord.pinCount(old)
        if old & (PageWord.allocated | PageWord.frozen) == PageWord.allocated,
            PageWord.refCount(old) != PageWord.refLimit, pins != PageWord.pinLimit
        {
            let field: PinTally.Field = pins == 0 ? .acquiredFirst : .acquiredMore
            counters.add(field)
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: old &+ (PageWord.refOne | PageWord.pinOne), ordering: .sequentiallyConsistent)
            if exchanged { return .success(pins == 0) }
            counters.subtract(field)
            return tryPinRetrying(frame, from: current, counting: counters)
        }
        return tryPinRetrying(frame, from: old, counting: counters)
    }

    /// ``tryPin(_:counting:)`` from `old` on: the loop, out of line.
    @usableFromInline @inline(never)
    func tryPinRetrying(_ frame: UInt64, from old: UInt64, counting counters: PinTally.Counters) -> Result<
        Bool, GetFailure
    > {
        let counts = descriptor(frame)
        var old = old
        while true {
            if old & (PageWord.allocated | PageWord.frozen) != PageWord.allocated {
                return .failure(old & PageWord.allocated == 0 ? .notAllocated : .frozen)
            }
            if PageWord.refCount(old) == PageWord.refLimit || PageWord.pinCount(old) == PageWord.pinLimit {
                return .failure(.overflow)
            }
            let first = PageWord.pinCount(old) == 0
            let field: PinTally.Field = first ? .acquiredFirst : .acquiredMore
            counters.add(field)
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: old &+ (PageWord.refOne | PageWord.pinOne), ordering: .sequentiallyConsistent)
            if exchanged { return .success(first) }
            counters.subtract(field)
            old = current
        }
    }

    /// ``tryPin(_:counting:)`` with the calling thread's counters: the fast path of a one-page pin.
    @inlinable @inline(__always)
    func tryPin(_ frame: UInt64) -> Result<Bool, GetFailure> {
        let slot = core.pointee.tallySlot
        // The shared counters stay out of line: here the per-thread case folds to plain stores.
        guard slot >= 0 else { return tryPinShared(frame) }
        return tryPin(frame, counting: PinTally.counters(slot: slot))
    }

    @usableFromInline @inline(never)
    func tryPinShared(_ frame: UInt64) -> Result<Bool, GetFailure> { tryPin(frame, counting: tallies()) }

    /// Takes back a pin that ``tryPin(_:)`` took, uncounted: the gup-fast pinner that found the
    /// layout changed after its try-get.
    @usableFromInline @inline(never)
    func takeBackPin(_ frame: UInt64) {
        let counters = tallies()
        counters.subtract(.acquiredMore)
        takeBack(frame, counting: counters)
    }

    /// Drops a reference and a pin without counting a release, for a pin being taken back whose
    /// acquire the caller uncounted from `acquiredMore` (whether it was counted there or in
    /// `acquiredFirst`): `pinnedAdjust` then takes the page off the pinned pages if this was its
    /// last pin, which leaves `acquiredFirst - releasedLast + pinnedAdjust` exact either way.
    /// Wakes waiters like any decrement.
    func takeBack(_ frame: UInt64, counting counters: PinTally.Counters) {
        let counts = descriptor(frame)
        var old = counts.pointee.counts.load(ordering: .relaxed)
        while true {
            precondition(
                PageWord.pinCount(old) > 0 && PageWord.refCount(old) > 0,
                "take-back of pfn \(frame), which is not pinned")
            let last = PageWord.pinCount(old) == 1
            if last { counters.subtract(.pinnedAdjust) }
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: old &- (PageWord.refOne | PageWord.pinOne), ordering: .sequentiallyConsistent)
            if exchanged { break }
            if last { counters.add(.pinnedAdjust) }
            old = current
        }
        if old & PageWord.slowPathFlags != 0 {
            afterDecrement(frame, old: old, new: old &- (PageWord.refOne | PageWord.pinOne))
        }
    }

    /// Drops a reference and a pin, counted released in `counters` before the compare-and-swap
    /// (the caller settles it afterwards). Returns the field it counted in. One attempt inline
    /// when the page needs no slow path; anything else goes to ``unpinRetrying(_:from:counting:)``.
    @inlinable @inline(__always)
    func unpinOne(_ frame: UInt64, counting counters: PinTally.Counters) -> PinTally.Field {
        let counts = descriptor(frame)
        let old = counts.pointee.counts.load(ordering: .relaxed)
        let pins = PageWord.pinCount(old)
        // A pin holds a reference, so `pins > 0` implies `refCount > 0`; the loop checks both.
        if pins != 0, old & PageWord.slowPathFlags == 0 {
            let field: PinTally.Field = pins == 1 ? .releasedLast : .releasedMore
            counters.add(field)
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: old &- (PageWord.refOne | PageWord.pinOne), ordering: .sequentiallyConsistent)
            if exchanged { return field }
            counters.subtract(field)
            return unpinRetrying(frame, from: current, counting: counters)
        }
        return unpinRetrying(frame, from: old, counting: counters)
    }

    /// ``unpinOne(_:counting:)`` from `old` on: the loop and the slow path, out of line.
    @usableFromInline @inline(never)
    func unpinRetrying(_ frame: UInt64, from old: UInt64, counting counters: PinTally.Counters) -> PinTally.Field {
        let counts = descriptor(frame)
        var old = old
        var field: PinTally.Field
        while true {
            precondition(
                PageWord.pinCount(old) > 0 && PageWord.refCount(old) > 0, "unpin of pfn \(frame), which is not pinned")
            field = PageWord.pinCount(old) == 1 ? .releasedLast : .releasedMore
            counters.add(field)
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: old &- (PageWord.refOne | PageWord.pinOne), ordering: .sequentiallyConsistent)
            if exchanged { break }
            counters.subtract(field)
            old = current
        }
        // The swap succeeded on `old`, so its flags say exactly whether the slow path is needed.
        if old & PageWord.slowPathFlags != 0 {
            afterDecrement(frame, old: old, new: old &- (PageWord.refOne | PageWord.pinOne))
        }
        return field
    }

    /// The zero frame's descriptor: the last one, past the device's pages.
    var zeroFrame: UInt64 { UInt64(core.pointee.count - 1) }

    /// `run` without the zero frame, which is never pinned: as the kernel takes no pin on its
    /// shared zero page (`pin_user_pages` since Linux 6.5), a pin of it moves no count, so that
    /// pins acquired minus released stays the sum of the device pages' pin counts. Only a run of
    /// `runs` can hold it (the one-page fast path takes device frames only), and only at its end.
    @inline(__always)
    func withoutZeroFrame(_ run: PageRun) -> PageRun {
        run.end <= zeroFrame
            ? run : PageRun(start: run.start, count: run.start >= zeroFrame ? 0 : zeroFrame - run.start)
    }

    /// Pins every frame of `runs`, all or none (the zero frame is left as it is).
    func pin(_ runs: FrameRuns) throws {
        let counters = tallies()
        for (index, run) in runs.runs.enumerated() {
            do {
                try pin(withoutZeroFrame(run), counting: counters)
            } catch {
                for earlier in runs.runs[..<index] {
                    let earlier = withoutZeroFrame(earlier)
                    takeBack(earlier, pinned: Int(earlier.count), counting: counters)
                }
                throw error
            }
        }
    }

    /// Pins every frame of `run`, all or none.
    @inline(__always)
    func pin(_ run: PageRun) throws { try pin(run, counting: tallies()) }

    /// Pins one frame: the fast path of a one-page pin.
    @inlinable @inline(__always)
    func pinOne(_ frame: UInt64) throws {
        if case .failure(let reason) = tryPin(frame) { throw Self.error(for: reason, frame: frame, what: "pin") }
    }

    private func pin(_ run: PageRun, counting counters: PinTally.Counters) throws {
        // A copy of the loop for each kind of counter, so that neither tests the kind per page.
        if counters.shared {
            try pinEach(run, counting: PinTally.Counters(base: counters.base, shared: true))
        } else {
            try pinEach(run, counting: PinTally.Counters(base: counters.base, shared: false))
        }
    }

    @inline(__always)
    private func pinEach(_ run: PageRun, counting counters: PinTally.Counters) throws {
        var frame = run.start
        for pinned in 0..<run.count {
            if case .failure(let reason) = tryPin(frame, counting: counters) {
                takeBack(run, pinned: Int(pinned), counting: counters)
                throw Self.error(for: reason, frame: frame, what: "pin")
            }
            frame &+= 1
        }
    }

    /// Takes back the first `pinned` pins of `run`, uncounted.
    private func takeBack(_ run: PageRun, pinned: Int, counting counters: PinTally.Counters) {
        guard pinned > 0 else { return }
        counters.subtract(.acquiredMore, UInt64(pinned))
        var frame = run.start
        for _ in 0..<pinned {
            takeBack(frame, counting: counters)
            frame &+= 1
        }
    }

    /// Unpins one frame and counts it released: the fast path of a one-page release.
    @inlinable @inline(__always)
    func unpinOneCounted(_ frame: UInt64) {
        let slot = core.pointee.tallySlot
        guard slot >= 0 else { return unpinOneShared(frame) }
        let counters = PinTally.counters(slot: slot)
        counters.settle(unpinOne(frame, counting: counters), 1)
    }

    @usableFromInline @inline(never)
    func unpinOneShared(_ frame: UInt64) {
        let counters = tallies()
        counters.settle(unpinOne(frame, counting: counters), 1)
    }

    /// Unpins every frame of `run` and counts them as released.
    func unpin(_ run: PageRun) {
        let counters = tallies()
        // A copy of the loop for each kind of counter, so that neither tests the kind per page.
        if counters.shared {
            unpinEach(run, counting: PinTally.Counters(base: counters.base, shared: true))
        } else {
            unpinEach(run, counting: PinTally.Counters(base: counters.base, shared: false))
        }
    }

    @inline(__always)
    private func unpinEach(_ run: PageRun, counting counters: PinTally.Counters) {
        var last: UInt64 = 0
        var frame = run.start
        for _ in 0..<run.count {
            if unpinOne(frame, counting: counters) == .releasedLast { last += 1 }
            frame &+= 1
        }
        counters.settle(.releasedLast, last)
        counters.settle(.releasedMore, UInt64(run.count) - last)
    }

    /// Unpins every frame of `runs` and counts them as released (the zero frame, never pinned,
    /// is left as it is). Each run settles its releases as it ends: those of later runs are not
    /// counted yet, so the table is not freeable before.
    func unpin(_ runs: FrameRuns) {
        for run in runs.runs {
            let run = withoutZeroFrame(run)
            if run.count > 0 { unpin(run) }
        }
    }

    /// Takes back pins that ``pin(_:)-(FrameRuns)`` took, uncounted: a pinner that found, after
    /// pinning, that it must look again (the layout changed, a page is shared).
    func takeBack(_ runs: FrameRuns) {
        let counters = tallies()
        for run in runs.runs {
            let run = withoutZeroFrame(run)
            takeBack(run, pinned: Int(run.count), counting: counters)
        }
    }

    @usableFromInline @inline(never)
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

    /// Drops `delta` (a reference, or a reference and a mapping). The last reference of a
    /// quarantined page releases it; any drop of a page with waiters wakes them (a transient get's
    /// put is what a truncate that revoked leases waits for).
    @inline(__always)
    func put(_ frame: UInt64, removing delta: UInt64) {
        let old = descriptor(frame).pointee.counts.wrappingSubtract(delta, ordering: .acquiringAndReleasing).oldValue
        precondition(
            PageWord.refCount(old) > 0 && (delta & PageWord.mapOne == 0 || PageWord.mapCount(old) > 0),
            "put of pfn \(frame), which holds no such reference")
        if old & PageWord.slowPathFlags != 0 { afterDecrement(frame, old: old, new: old &- delta) }
    }

    /// The slow path of a decrement: release a quarantined page on its last reference, wake waiters.
    @usableFromInline @inline(never)
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
            // Clear, then wake: a waiter that sets the bit again after this is woken by the next
            // decrement; one registered before the bit was set is signalled here.
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
