/// A value that only its reader-writer lock gives access to: ``read(_:)`` shares the lock,
/// ``write(_:)`` takes it exclusively (a ``ReadWriteLock``: writers preferred, not recursive).
///
/// The lock owns the data, as `Mutex<Value>` does (and swift-nio's `NIOLockedValueBox`), with
/// readers that run side by side. A function that needs the lock held takes the value itself
/// (`inout Value` to change it), so that "lock held" is in its signature.
final class ReadWriteLocked<Value> {
    private let lock = ReadWriteLock()
    /// Out of line, so that a reader borrows it without a copy and without the dynamic exclusivity
    /// check of a class's stored property: the lock is what keeps accesses apart.
    private let storage: UnsafeMutablePointer<Value>

    init(_ value: Value) {
        storage = .allocate(capacity: 1)
        storage.initialize(to: value)
    }

    deinit {
        storage.deinitialize(count: 1)
        storage.deallocate()
    }

    /// Runs `body` with the value, holding the lock shared. The value must not escape `body`
    /// (a copy may: it is a snapshot, no longer guarded).
    @inline(__always)
    func read<Result: ~Copyable>(_ body: (Value) throws -> Result) rethrows -> Result {
        try lock.withReadLock { try body(storage.pointee) }
    }

    /// Runs `body` with the value to change, holding the lock exclusively.
    @inline(__always)
    func write<Result: ~Copyable>(_ body: (inout Value) throws -> Result) rethrows -> Result {
        try lock.withWriteLock { try body(&storage.pointee) }
    }
}

// Every access goes through the lock; readers share a value, so it must be Sendable.
extension ReadWriteLocked: @unchecked Sendable where Value: Sendable {}
