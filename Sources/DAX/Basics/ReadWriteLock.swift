import Glibc

/// A reader-writer lock (`pthread_rwlock_t`, writers preferred so a stream of readers cannot
/// starve a truncate). Not recursive.
final class ReadWriteLock: @unchecked Sendable {
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>

    init() {
        lock = .allocate(capacity: 1)
        var attributes = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attributes)
        pthread_rwlockattr_setkind_np(&attributes, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        let status = pthread_rwlock_init(lock, &attributes)
        pthread_rwlockattr_destroy(&attributes)
        precondition(status == 0, "pthread_rwlock_init failed: \(status)")
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    func withReadLock<T: ~Copyable>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    func withWriteLock<T: ~Copyable>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    /// Takes the lock shared until ``unlock()``: only for a test that holds it across threads.
    /// Everything else uses the scoped forms, or guards its data with ``ReadWriteLocked``.
    func lockForReading() { pthread_rwlock_rdlock(lock) }
    /// Lets go of the lock taken with ``lockForReading()``.
    func unlock() { pthread_rwlock_unlock(lock) }
}
