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

extension ReadWriteLock {
    /// Whether a writer holds the lock or waits for it; a reader would then block (the lock
    /// prefers writers). Asked with `pthread_rwlock_tryrdlock`, taking nothing: a read lock it
    /// gets is given back at once.
    ///
    /// The lock keeps its `pthread_rwlock_t` private; it is reached through `Mirror`, and a
    /// missing one is a test failure, not a guess.
    func hasWriter(sourceLocation: SourceLocation = #_sourceLocation) throws -> Bool {
        let rwlock = try pthreadLock(sourceLocation)
        switch pthread_rwlock_tryrdlock(rwlock) {
        case 0:
            pthread_rwlock_unlock(rwlock)
            return false
        case EBUSY:
            return true
        case let status:
            Issue.record("pthread_rwlock_tryrdlock: \(status)", sourceLocation: sourceLocation)
            return false
        }
    }

    /// Readers that wait while a writer holds the lock. glibc (since 2.25) counts a reader that
    /// arrives in a write phase in `__readers`, above its three flag bits, before it sleeps; no
    /// POSIX call tells a queued reader from none.
    func queuedReaders(sourceLocation: SourceLocation = #_sourceLocation) throws -> Int {
        let word = try pthreadLock(sourceLocation).pointee.__data.__readers
        let writePhase: UInt32 = 1
        return word & writePhase != 0 ? Int(word >> 3) : 0
    }

    private func pthreadLock(_ sourceLocation: SourceLocation) throws -> UnsafeMutablePointer<pthread_rwlock_t> {
        try #require(
            Mirror(reflecting: self).children.lazy.compactMap { $0.value as? UnsafeMutablePointer<pthread_rwlock_t> }
                .first,
            "ReadWriteLock keeps no pthread_rwlock_t", sourceLocation: sourceLocation)
    }
}
