import Dispatch
import Synchronization

/// Sleepers waiting for pages to go idle, and the slow-path hooks of a page map.
///
/// The kernel's `page_waitqueue` plus `wake_up_var`. A waiter registers here *before* it sets the
/// `waiters` bit of a busy page and re-reads the page; a decrement that replaces a value carrying
/// the bit signals every registered waiter. See `docs/architecture.md` for why no wake-up is lost.
final class PageWaitQueue: Sendable {
    final class Waiter: Sendable {
        let semaphore = DispatchSemaphore(value: 0)
    }

    private let waiters = Mutex<[ObjectIdentifier: Waiter]>([:])
    /// Wake-ups delivered, for tests and statistics.
    let wakeUps = Atomic<Int>(0)

    func register(_ waiter: Waiter) {
        waiters.withTrackedLock { $0[ObjectIdentifier(waiter)] = waiter }
    }

    func unregister(_ waiter: Waiter) {
        _ = waiters.withTrackedLock { $0.removeValue(forKey: ObjectIdentifier(waiter)) }
    }

    func wakeAll() {
        wakeUps.wrappingAdd(1, ordering: .relaxed)
        waiters.withTrackedLock { waiters in
            for waiter in waiters.values { waiter.semaphore.signal() }
        }
    }
}

extension Duration {
    /// The duration as whole nanoseconds, saturating.
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        let (whole, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return seconds < 0 ? .min : .max }
        return whole.addingReportingOverflow(attoseconds / 1_000_000_000).overflow
            ? .max
            : whole + attoseconds / 1_000_000_000
    }
}
