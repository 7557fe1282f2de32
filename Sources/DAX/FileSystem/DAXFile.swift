import Synchronization

/// An open regular file of a ``DAXFileSystem``.
///
/// Reads and writes copy between DRAM and the file's device pages with libpmem (writes are
/// durable when they return); ``map(offset:count:access:)`` gives direct access to the pages
/// themselves. A handle keeps a removed file's blocks until it is closed.
public final class DAXFile: Sendable {
    let fileSystem: DAXFileSystem
    let inode: Inode
    /// The path the file was opened or created at.
    public let path: String
    /// How the file was opened.
    public let access: Access
    private let closed = Atomic<Bool>(false)

    init(fileSystem: DAXFileSystem, inode: Inode, path: String, access: Access) {
        self.fileSystem = fileSystem
        self.inode = inode
        self.path = path
        self.access = access
        fileSystem.mountState.withTrackedLock {
            $0.handles[ObjectIdentifier(self)] = DAXFileSystem.WeakHandle(file: self)
        }
    }

    deinit { close() }

    /// The file's size in bytes.
    public var size: Int { inode.lock.withReadLock { Int(inode.record.size) } }

    /// The inode number (stable while the file exists).
    public var inodeNumber: UInt32 { inode.number }

    /// Closes the handle. The last close of a removed file frees its blocks. Idempotent.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        fileSystem.mountState.withTrackedLock { _ = $0.handles.removeValue(forKey: ObjectIdentifier(self)) }
        fileSystem.releaseUser(inode, handle: true)
    }

    /// Unmount closes handles without freeing anything yet.
    func closeForUnmount() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        inode.users.withTrackedLock { $0.handles -= 1 }
    }

    /// True once closed (or its file system unmounted).
    public var isClosed: Bool { closed.load(ordering: .acquiring) }

    /// Runs a file operation: checks that the handle is open (and writable if asked) and holds the
    /// file system's operations lock shared, so that `unmount` waits for it to finish.
    func operation<T: ~Copyable>(
        _ name: String, writable: Bool = false, range: (offset: Int, count: Int)? = nil, _ body: () throws -> T
    ) throws -> T {
        do {
            return try fileSystem.operations.withReadLock {
                if writable { try checkWritable(name) } else { try checkOpen(name) }
                return try body()
            }
        } catch let error as DAXError {
            let subject = Paths.debug(path)
            throw error.context("cannot \(name) \(subject)" + (range.map { " at \($0.offset) + \($0.count)" } ?? ""), naming: subject)
        }
    }

    func checkOpen(_ operation: String) throws {
        guard !isClosed else {
            throw DAXError(.invalidArgument, "cannot \(operation) \(Paths.debug(path)): the file is closed")
        }
        try fileSystem.checkMounted()
    }

    func checkWritable(_ operation: String) throws {
        try checkOpen(operation)
        guard access == .readWrite else {
            throw DAXError(.permissionDenied, "cannot \(operation) \(Paths.debug(path)): it was opened read-only")
        }
    }

    static func checkRange(_ offset: Int, _ count: Int, _ operation: String, _ path: String) throws {
        guard offset >= 0, count >= 0 else {
            throw DAXError(
                .invalidArgument,
                "cannot \(operation) \(Paths.debug(path)): negative offset \(offset) or count \(count)")
        }
        guard count <= DAXFileSystem.maximumFileSize, offset <= DAXFileSystem.maximumFileSize - count else {
            throw DAXError(
                .invalidArgument,
                "cannot \(operation) \(Paths.debug(path)) at \(offset) + \(count): past the "
                    + "largest file size of \(counted(DAXFileSystem.maximumFileSize, "byte"))")
        }
    }

    /// Writes `bytes` at `offset`, extending the file as needed; durable when it returns. Holes
    /// that the write does not cover read as zeros. Throws `.permissionDenied` on a read-only
    /// handle and `.noSpace` (changing nothing) when blocks run out.
    public func write(_ bytes: [UInt8], at offset: Int) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// Writes the bytes of `buffer` at `offset` (see ``write(_:at:)``), without an array.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: Int) throws {
        // Mappings shown new blocks are released only after every lock (see `showInMappings`).
        var shown: [DAXMapping] = []
        defer { withExtendedLifetime(shown) {} }
        try operation("write", writable: true, range: (offset, buffer.count)) {
            try Self.checkRange(offset, buffer.count, "write", path)
            guard buffer.count > 0 else { return }
            try inode.lock.withWriteLock {
                try inode.checkLive(path)
                let added = try fileSystem.writeData(inode, buffer, at: offset)
                shown = fileSystem.showInMappings(inode, added)
            }
        }
    }

    /// Reads up to `count` bytes at `offset`: fewer at the end of the file, none past it.
    ///
    /// The result is one array in memory: a read whose result would take more than half of the
    /// machine's memory throws `.noSpace` (read such a range in pieces with ``read(into:at:)``, or
    /// map it) rather than kill the process when the allocation fails.
    public func read(count: Int, at offset: Int) throws -> [UInt8] {
        try operation("read") {
            try Self.checkRange(offset, count, "read", path)
            return try inode.lock.withReadLock {
                try inode.checkLive(path)
                let length = max(0, min(count, Int(inode.record.size) - offset))
                let limit = PMemDevice.largestReadResult
                guard length <= limit else {
                    throw DAXError(
                        .noSpace,
                        "cannot read \(counted(length, "byte")) at offset \(offset) of \(Paths.debug(path)) into one array: "
                            + "more than half of the machine's memory (\(counted(limit, "byte"))); read it in pieces "
                            + "with read(into:at:) or map it")
                }
                return fileSystem.readData(inode, count: count, at: offset)
            }
        }
    }

    /// Reads into `buffer` (up to its size) at `offset`, without allocating; returns the bytes
    /// read: fewer at the end of the file, 0 past it.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        try operation("read") {
            try Self.checkRange(offset, buffer.count, "read", path)
            return try inode.lock.withReadLock {
                try inode.checkLive(path)
                return fileSystem.readData(inode, into: buffer, at: offset)
            }
        }
    }

    /// fallocate: gives the range zeroed blocks where it has none, and grows the size to cover it.
    public func allocate(offset: Int, count: Int) throws {
        var shown: [DAXMapping] = []
        defer { withExtendedLifetime(shown) {} }
        try operation("allocate", writable: true, range: (offset, count)) {
            try Self.checkRange(offset, count, "allocate", path)
            guard count > 0 else {
                throw DAXError(.invalidArgument, "cannot allocate 0 bytes of \(Paths.debug(path))")
            }
            try inode.lock.withWriteLock {
                try inode.checkLive(path)
                let added = try fileSystem.allocateData(inode, offset: offset, count: count)
                shown = fileSystem.showInMappings(inode, added)
            }
        }
    }

    /// The device pages backing `[offset, offset+count)`, one entry per page; nil for a hole.
    /// The bytes of page `i` are at device offset `frame * 4096`: a program using libpmem on the
    /// device finds them there.
    public func frames(offset: Int, count: Int) throws -> [PageFrameNumber?] {
        try operation("look up the frames of") {
            try Self.checkRange(offset, count, "look up the frames of", path)
            guard count > 0 else { return [] }
            let pages = DAXFileSystem.page(offset)..<DAXFileSystem.pageUp(offset + count)
            guard pages.count <= 1 << 28 else {
                throw DAXError(.invalidArgument, "cannot list \(pages.count) frames of \(Paths.debug(path)) at once")
            }
            return try inode.lock.withReadLock {
                try inode.checkLive(path)
                return fileSystem.frames(inode, pages: pages)
            }
        }
    }
}
