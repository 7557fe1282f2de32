import Glibc

/// How many file system operations the calling thread is inside (nested ones count).
///
/// An operation may hold the namespace, inode and invalidate locks. Something that is released
/// while they are held (the last mapping of a removed file, dropped by the code that looked it
/// up) must not take them again to free the file: it defers that to the end of the outermost
/// operation, which knows that nothing is held any more.
enum OperationDepth {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        let status = pthread_key_create(&key, nil)
        precondition(status == 0, "pthread_key_create failed: \(status)")
        return key
    }()

    /// Operations of the calling thread in progress.
    static var current: Int { Int(bitPattern: pthread_getspecific(key)) }

    /// Runs `body` as an operation of the calling thread.
    static func inside<T: ~Copyable>(_ body: () throws -> T) rethrows -> T {
        let depth = current
        pthread_setspecific(key, UnsafeRawPointer(bitPattern: depth + 1))
        defer { pthread_setspecific(key, UnsafeRawPointer(bitPattern: depth)) }
        return try body()
    }
}
