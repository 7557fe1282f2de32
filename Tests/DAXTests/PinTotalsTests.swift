import Dispatch
import Foundation
import Synchronization
import Testing

@testable import DAX

/// Invariant 9 without deadlines: pins acquired minus released equals the sum of `pinCount` over
/// all descriptors, read at once; and the wake-ups that waiting for idle pages relies on.
@Suite("Pin totals")
struct PinTotalsTests {
    /// A device whose first `allocated` pages are marked allocated, as a file system would.
    static func device(_ name: String, allocated: Int) throws -> TemporaryDevice {
        let temporary = try TemporaryDevice(size: 4 << 20, name: name)
        for frame in 0..<UInt64(allocated) {
            #expect(temporary.device.pages.markAllocated(frame, inode: 7, index: frame))
        }
        return temporary
    }

    /// The sum of `pinCount`, and the number of pinned descriptors, over the first `frames` pages.
    static func pinCounts(_ pages: PageMap, frames: Int) -> (sum: Int, pinned: Int) {
        var sum = 0
        var pinned = 0
        for frame in 0..<UInt64(frames) {
            let count = pages.state(of: PageFrameNumber(rawValue: frame)).pinCount
            sum += count
            if count > 0 { pinned += 1 }
        }
        return (sum, pinned)
    }

    /// Waits until a waiter has marked `frame` (set its `waiters` bit): from then on only a
    /// decrement's wake-up can end its wait.
    static func waitForWaiter(on frame: UInt64, in pages: PageMap) {
        while pages.table.word(frame) & PageWord.waiters == 0 { sched_yield() }
    }

    @Test("a release is counted as soon as its page is seen idle, while the releasing thread is still inside its unpin")
    func countedBeforeTheUnpinReturns() throws {
        let temporary = try Self.device("totals-inflight", allocated: 8)
        let pages = temporary.device.pages
        let frame = PageFrameNumber(rawValue: 5)
        let box = PinBox(try pages.pin(first: frame, count: 1))
        // Freed while pinned: quarantined, so the final unpin runs the allocator's hook, which
        // here holds the releasing thread inside its unpin until the test lets it go.
        #expect(!pages.markFree(frame.rawValue))
        let entered = DispatchSemaphore(value: 0)
        let proceed = DispatchSemaphore(value: 0)
        let done = DispatchSemaphore(value: 0)
        pages.setQuarantineRelease { _ in
            entered.signal()
            proceed.wait()
        }
        Thread.detachNewThread {
            box.release()
            done.signal()
        }
        entered.wait()
        // The unpin has not returned, but its page is idle: the totals must already count it.
        #expect(pages.state(of: frame).pinCount == 0)
        let totals = pages.pinTotals
        #expect(totals == PinTotals(acquired: 1, released: 1, pinnedPages: 0))
        proceed.signal()
        done.wait()
        #expect(pages.pinTotals == PinTotals(acquired: 1, released: 1, pinnedPages: 0))
        pages.setQuarantineRelease(nil)
    }

    @Test("contended pins, failed pins taken back and revoked leases: the totals are exact at every rest point")
    func exactAtRest() throws {
        // Pages 0..<6 are allocated and shared by every thread; page 6 is not, so pins that reach
        // it fail and take back what they took, while other threads pin the same pages.
        let temporary = try Self.device("totals-rest", allocated: 6)
        let pages = temporary.device.pages
        let threads = 4
        let rounds = 40
        // A barrier: each thread says it arrived, then waits on its own semaphore (a shared one
        // could be taken twice by a thread that runs ahead).
        let arrived = DispatchSemaphore(value: 0)
        let resume = (0..<threads).map { _ in DispatchSemaphore(value: 0) }
        let held = Mutex<[Int]>(Array(repeating: 0, count: threads))
        let group = DispatchGroup()
        for thread in 0..<threads {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                var generator = SystemRandomNumberGenerator()
                for _ in 0..<rounds {
                    var kept: [PinBox] = []
                    var keptPages = 0
                    for step in 0..<200 {
                        let first = UInt64.random(in: 0..<6, using: &generator)
                        switch step % 5 {
                        case 0:
                            // A one-page pin, released at once.
                            let pin = try! pages.pin(first: PageFrameNumber(rawValue: first), count: 1)
                            pin.release()
                        case 1:
                            // A run that reaches the unallocated page: fails, takes its pins back.
                            #expect(throws: DAXError.self) {
                                _ = try pages.pin(first: PageFrameNumber(rawValue: first), count: 7 - Int(first))
                            }
                        case 2:
                            // Two runs, the second unallocated: the first run is taken back whole.
                            #expect(throws: DAXError.self) {
                                _ = try pages.pin([PageFrameNumber(rawValue: first), PageFrameNumber(rawValue: 6)])
                            }
                        case 3:
                            // gup-fast finding the layout changed: a try-get taken back uncounted.
                            if case .success = pages.table.tryPin(first) { pages.table.takeBackPin(first) }
                        default:
                            // A pin kept until the rest point, one page or a run, short or long term.
                            let count = Int.random(in: 1...(6 - Int(first)), using: &generator)
                            let lifetime: PinLifetime = step % 2 == 0 ? .shortTerm : .longTerm(onRevoke: {})
                            kept.append(
                                PinBox(
                                    try! pages.pin(
                                        first: PageFrameNumber(rawValue: first), count: count, lifetime: lifetime)))
                            keptPages += count
                        }
                    }
                    held.withTrackedLock { $0[thread] = keptPages }
                    arrived.signal()
                    resume[thread].wait()
                    // Leases the checker revoked are released again here: that changes no count.
                    for pin in kept { pin.release() }
                }
            }
        }
        var revoked = 0
        for round in 0..<rounds {
            for _ in 0..<threads { arrived.wait() }
            // At rest: every thread holds its kept pins and nothing else is in flight.
            var counts = Self.pinCounts(pages, frames: 7)
            var totals = pages.pinTotals
            let keptPages = held.withTrackedLock { $0.reduce(0, +) }
            #expect(totals.acquired - totals.released == counts.sum, "round \(round): \(totals)")
            #expect(counts.sum == keptPages, "round \(round)")
            #expect(totals.pinnedPages == counts.pinned, "round \(round): \(totals)")
            if round % 4 == 0 {
                // Revoke every lease (counted as a release), then check again.
                for lease in pages.leases(where: { _ in true }) where lease.revoke() { revoked += 1 }
                counts = Self.pinCounts(pages, frames: 7)
                totals = pages.pinTotals
                #expect(totals.acquired - totals.released == counts.sum, "round \(round), revoked: \(totals)")
                #expect(totals.pinnedPages == counts.pinned, "round \(round), revoked: \(totals)")
            }
            for semaphore in resume { semaphore.signal() }
        }
        group.wait()
        #expect(revoked > 0)
        let totals = pages.pinTotals
        #expect(totals.acquired == totals.released)
        #expect(totals.pinnedPages == 0)
        #expect(Self.pinCounts(pages, frames: 7).sum == 0)
        for frame in 0..<UInt64(7) { #expect(pages.state(of: PageFrameNumber(rawValue: frame)).refCount == 0) }
    }

    @Test("a page map beyond the per-thread slots counts exactly in shared counters")
    func sharedCounters() throws {
        // Hold page maps until one finds every per-thread slot taken (other suites may hold some).
        var maps: [PageMap] = []
        var shared: PageMap?
        while shared == nil, maps.count <= PinTally.slotCount {
            let map = try PageMap(pageCount: 16)
            if map.table.core.pointee.tallySlot < 0 { shared = map } else { maps.append(map) }
        }
        let pages = try #require(shared)
        for frame in 0..<UInt64(8) { #expect(pages.markAllocated(frame, inode: 1, index: frame)) }
        onThreads(4) { thread in
            for round in 0..<5000 {
                let first = PageFrameNumber(rawValue: UInt64((thread + round) % 6))
                let pin = try! pages.pin(first: first, count: 1 + round % 2)
                if round % 100 == 0, case .success = pages.table.tryPin(first.rawValue) {
                    pages.table.takeBackPin(first.rawValue)
                }
                pin.release()
            }
        }
        let kept = try pages.pin(first: PageFrameNumber(rawValue: 2), count: 3)
        var totals = pages.pinTotals
        #expect(totals.acquired - totals.released == 3)
        #expect(totals.pinnedPages == 3)
        #expect(totals.acquired == 4 * (0..<5000).reduce(0) { $0 + 1 + $1 % 2 } + 3)
        #expect(!pages.table.isFreeable)
        kept.release()
        totals = pages.pinTotals
        #expect(totals.acquired == totals.released && totals.pinnedPages == 0)
        #expect(pages.table.isFreeable)
        maps.removeAll()
    }

    @Test("a page map freed from inside a release keeps its table until the release is done with it")
    func freedInsideRelease() throws {
        final class Holder: @unchecked Sendable {
            var map: PageMap?
        }
        let holder = Holder()
        var pin: PinnedPages?
        let hookRan = Atomic<Bool>(false)
        do {
            let map = try PageMap(pageCount: 64)
            holder.map = map
            #expect(map.markAllocated(3, inode: 1, index: 0))
            pin = try map.pin(first: PageFrameNumber(rawValue: 3), count: 1)
            #expect(!map.markFree(3))  // quarantined: the final unpin runs the hook
            // A wait that gives up at once leaves the waiters bit set, so the final unpin also
            // touches the descriptor and the wait queue after the hook.
            #expect(!map.waitUntilIdle([PageFrameNumber(rawValue: 3)], timeout: .zero))
            #expect(map.table.word(3) & PageWord.waiters != 0)
            map.setQuarantineRelease { _ in
                // The last reference to the map goes while its final unpin is still running.
                holder.map = nil
                hookRan.store(true, ordering: .relaxed)
            }
        }
        // If deinit freed the table here, the rest of this unpin would fault on unmapped memory.
        pin.take()!.release()
        let ran = hookRan.load(ordering: .relaxed)
        #expect(ran)
        #expect(holder.map == nil)
    }

    @Test("a pin released after its page map is gone changes the counts safely")
    func releasedAfterTheMap() throws {
        var pin: PinnedPages?
        var table: MemMap?
        do {
            let map = try PageMap(pageCount: 64)
            #expect(map.markAllocated(9, inode: 1, index: 0))
            pin = try map.pin(first: PageFrameNumber(rawValue: 9), count: 1)
            table = map.table
        }
        // The map is gone; its table stayed, since a pin was outstanding.
        let kept = try #require(table)
        pin.take()!.release()
        #expect(kept.totals() == PinTotals(acquired: 1, released: 1, pinnedPages: 0))
        #expect(PageWord.pinCount(kept.word(9)) == 0)
    }

    // MARK: - Wake-ups for waiters

    /// Runs `drop` on another thread once a waiter sleeps on `frame`, and checks that the waiter
    /// of break layouts (``PageMap/waitOutTransientReferences(_:deadline:)``) is woken by it.
    static func expectWoken(
        _ pages: PageMap, frame: UInt64, sourceLocation: SourceLocation = #_sourceLocation,
        by drop: @escaping @Sendable () -> Void
    ) {
        let wakeUps = pages.table.core.pointee.waitQueue.wakeUps.load(ordering: .relaxed)
        let dropped = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            Self.waitForWaiter(on: frame, in: pages)
            drop()
            dropped.signal()
        }
        // A safety net only: without the wake-up the wait ends here, still busy.
        let busy = pages.waitOutTransientReferences([frame], deadline: Deadline(after: .seconds(60)))
        dropped.wait()
        #expect(busy.isEmpty, sourceLocation: sourceLocation)
        #expect(
            pages.table.core.pointee.waitQueue.wakeUps.load(ordering: .relaxed) > wakeUps,
            sourceLocation: sourceLocation)
        #expect(pages.table.word(frame) & PageWord.waiters == 0, sourceLocation: sourceLocation)
    }

    @Test("the put of a transient get wakes a waiter for transient references")
    func transientPutWakes() throws {
        let temporary = try Self.device("wake-put", allocated: 8)
        let pages = temporary.device.pages
        #expect(pages.tryGet(PageFrameNumber(rawValue: 4)))
        Self.expectWoken(pages, frame: 4) { pages.put(PageFrameNumber(rawValue: 4)) }
    }

    @Test("a gup-fast pin taken back wakes a waiter")
    func takenBackPinWakes() throws {
        let temporary = try Self.device("wake-takeback", allocated: 8)
        let pages = temporary.device.pages
        guard case .success = pages.table.tryPin(2) else {
            Issue.record("try-get of an allocated page failed")
            return
        }
        Self.expectWoken(pages, frame: 2) { pages.table.takeBackPin(2) }
        #expect(pages.pinTotals == PinTotals(acquired: 0, released: 0, pinnedPages: 0))
    }

    @Test("the final unpin wakes a waiter; a mapping's reference does not keep the page busy")
    func finalUnpinWakes() throws {
        let temporary = try Self.device("wake-unpin", allocated: 8)
        let pages = temporary.device.pages
        let frame = PageFrameNumber(rawValue: 6)
        try pages.tryMap(frame)
        let first = PinBox(try pages.pin(first: frame, count: 1))
        let second = PinBox(try pages.pin(first: frame, count: 1))
        // Two pins: the waiter is woken by the first unpin, finds the page still pinned, sleeps
        // again, and the second (final) unpin wakes it for good.
        Self.expectWoken(pages, frame: 6) {
            first.release()
            Self.waitForWaiter(on: 6, in: pages)
            second.release()
        }
        #expect(pages.state(of: frame).mapCount == 1)
        pages.unmap(frame)
        #expect(pages.pinTotals == PinTotals(acquired: 2, released: 2, pinnedPages: 0))
    }

    @Test("a revoked lease wakes a waiter")
    func revocationWakes() throws {
        let temporary = try Self.device("wake-revoke", allocated: 8)
        let pages = temporary.device.pages
        let lease = try pages.pin(first: PageFrameNumber(rawValue: 1), count: 2, lifetime: .longTerm(onRevoke: {}))
        Self.expectWoken(pages, frame: 2) {
            for lease in pages.leases(where: { $0 == 2 }) { lease.revoke() }
        }
        let revoked = lease.isRevoked
        #expect(revoked)
        lease.release()  // changes no count
        #expect(pages.pinTotals == PinTotals(acquired: 2, released: 2, pinnedPages: 0))
    }

    @Test("a wait without a deadline ends when the last transient reference goes")
    func waitWithoutDeadline() throws {
        let temporary = try Self.device("wake-forever", allocated: 8)
        let pages = temporary.device.pages
        let frames: [UInt64] = [0, 1, 2]
        for frame in frames { #expect(pages.tryGet(PageFrameNumber(rawValue: frame))) }
        let dropped = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            for frame in frames {
                Self.waitForWaiter(on: frame, in: pages)
                pages.put(PageFrameNumber(rawValue: frame))
            }
            dropped.signal()
        }
        #expect(pages.waitOutTransientReferences(frames, deadline: .distantFuture).isEmpty)
        dropped.wait()
    }
}
