import Dispatch

/// A point in time on the monotonic clock, for waits that may sleep several times.
struct Deadline: Sendable {
    let uptimeNanoseconds: UInt64

    init(after duration: Duration) {
        let now = DispatchTime.now().uptimeNanoseconds
        let delta = max(0, duration.nanoseconds)
        let (sum, overflow) = now.addingReportingOverflow(UInt64(delta))
        uptimeNanoseconds = overflow ? .max : sum
    }

    private init(uptimeNanoseconds: UInt64) { self.uptimeNanoseconds = uptimeNanoseconds }

    /// A deadline that never passes: wait until woken.
    static let distantFuture = Deadline(uptimeNanoseconds: .max)

    var hasPassed: Bool { DispatchTime.now().uptimeNanoseconds >= uptimeNanoseconds }

    var dispatchTime: DispatchTime {
        uptimeNanoseconds == .max ? .distantFuture : DispatchTime(uptimeNanoseconds: uptimeNanoseconds)
    }

    var remaining: Duration {
        let now = DispatchTime.now().uptimeNanoseconds
        return now >= uptimeNanoseconds ? .zero : .nanoseconds(Int64(clamping: uptimeNanoseconds - now))
    }
}
