import Foundation
import Synchronization
import Testing

@testable import DAX

// How tests order threads: never by sleeping or by reading a clock, always by a fact another
// thread makes true (a count it raised, a mark it set, a semaphore it signalled). When a test
// needs a thread to be *inside* the library, blocked, it waits for the mark the library itself
// leaves there: a page's waiters bit, a lock's queued writer.

/// Returns once `fact` holds, giving the processor away between looks. For a state another
/// thread is about to reach; the fact must become true without this thread's help.
func spinUntil(_ fact: () -> Bool) {
    while !fact() { sched_yield() }
}

extension PageMap {
    /// Whether a waiter has marked `frame`: a truncate or punch under `.wait` or `.revokeLeases`,
    /// or ``waitUntilIdle(_:timeout:)``, found the page busy, registered in the page wait queue
    /// and set the page's waiters bit. It then sleeps (or is about to) until the page's next
    /// decrement, which clears the bit and wakes it. The bit stays set if the waiter gives up,
    /// and also if it set the bit just as the page went idle; clear it with ``clearWaiterMark(_:)``.
    func hasSleeper(on frame: PageFrameNumber) -> Bool {
        table.word(frame.rawValue) & PageWord.waiters != 0
    }

    func hasSleeper(onAnyOf frames: some Sequence<PageFrameNumber>) -> Bool {
        frames.contains { hasSleeper(on: $0) }
    }

    /// Wake-ups the page wait queue has delivered: each decrement that found a waiters bit.
    var wakeUps: Int { table.core.pointee.waitQueue.wakeUps.load(ordering: .relaxed) }

    /// Clears a waiters bit an earlier wait left on an allocated page, the way the library does:
    /// a decrement (here of a reference taken for the purpose) finds the bit and clears it.
    func clearWaiterMark(_ frame: PageFrameNumber) {
        guard hasSleeper(on: frame) else { return }
        precondition(tryGet(frame), "\(frame) cannot be referenced")
        put(frame)
    }
}

/// A flag one thread raises once and others read.
final class Flag: Sendable {
    private let raised = Atomic(false)

    func raise() { raised.store(true, ordering: .sequentiallyConsistent) }

    var isRaised: Bool { raised.load(ordering: .sequentiallyConsistent) }
}

/// Lets threads take turns: each one waits for its turn, does a step, and passes the turn on.
/// A thread that is done leaves, and the others go on without it.
final class Turns: @unchecked Sendable {
    private let condition = NSCondition()
    private var current = 0
    private var active: [Bool]

    init(_ count: Int) { active = Array(repeating: true, count: count) }

    /// Blocks until it is `index`'s turn.
    func wait(_ index: Int) {
        condition.lock()
        while current != index { condition.wait() }
        condition.unlock()
    }

    /// Gives the turn to the next thread still taking part.
    func pass(_ index: Int) {
        condition.lock()
        advance(from: index)
        condition.unlock()
    }

    /// `index` takes no more turns; if it held the turn, the next thread gets it.
    func leave(_ index: Int) {
        condition.lock()
        active[index] = false
        if current == index { advance(from: index) }
        condition.unlock()
    }

    private func advance(from index: Int) {
        for step in 1...active.count where active[(index + step) % active.count] {
            current = (index + step) % active.count
            break
        }
        condition.broadcast()
    }
}
