import Glibc
import Synchronization

/// A reader-writer lock (`pthread_rwlock_t`, writers preferred so a stream of readers cannot
/// starve a truncate). Not recursive. Only scoped: ``withReadLock(_:)`` and ``withWriteLock(_:)``.
///
/// It counts the threads that wait for it (``queuedReaders``, ``queuedWriters``): a test can wait
/// until another thread is blocked here rather than guess with a sleep. Counting costs nothing
/// when the lock is free, since a thread counts itself only after a try-lock failed.
final class ReadWriteLock: @unchecked Sendable {
    private let lock: UnsafeMutablePointer<pthread_rwlock_t>
    private let waitingReaders = Atomic<Int>(0)
    private let waitingWriters = Atomic<Int>(0)

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
        if pthread_rwlock_tryrdlock(lock) != 0 {
            waitingReaders.wrappingAdd(1, ordering: .relaxed)
            pthread_rwlock_rdlock(lock)
            waitingReaders.wrappingSubtract(1, ordering: .relaxed)
        }
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    func withWriteLock<T: ~Copyable>(_ body: () throws -> T) rethrows -> T {
        if pthread_rwlock_trywrlock(lock) != 0 {
            waitingWriters.wrappingAdd(1, ordering: .relaxed)
            pthread_rwlock_wrlock(lock)
            waitingWriters.wrappingSubtract(1, ordering: .relaxed)
        }
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    /// Threads blocked waiting to read (counted from just before they block until they hold it).
    var queuedReaders: Int { waitingReaders.load(ordering: .relaxed) }

    /// Threads blocked waiting to write.
    var queuedWriters: Int { waitingWriters.load(ordering: .relaxed) }
}
