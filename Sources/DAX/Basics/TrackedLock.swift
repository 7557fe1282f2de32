import CLibPMem
import Synchronization

extension Mutex where Value: ~Copyable {
    /// `withLock`, telling ThreadSanitizer about the hand-over.
    ///
    /// On Linux the standard library's `Mutex` waits with futexes inside the (uninstrumented)
    /// standard library, so TSan sees no ordering between two critical sections and reports every
    /// guarded access as a race. This wrapper marks the lock's acquire and release on the mutex's
    /// address (`__tsan_acquire`/`__tsan_release`); in a build without TSan the marks are one
    /// untaken branch each. All of DAX uses it, so that `swift test --sanitize=thread` finds real
    /// races only.
    @inline(__always)
    borrowing func withTrackedLock<Result: ~Copyable, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        let address = withUnsafePointer(to: self) { UnsafeMutableRawPointer(mutating: $0) }
        return try withLock { (value: inout sending Value) throws(E) -> sending Result in
            dax_tsan_acquire(address)
            defer { dax_tsan_release(address) }
            return try body(&value)
        }
    }
}
