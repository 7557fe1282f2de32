import Synchronization

/// An open regular file of a ``DAXFileSystem``.
///
/// Reads and writes copy between DRAM and the file's device pages with libpmem (writes are
/// durable when they return); ``map(offset:count:access:)`` gives direct access to the pages
/// themselves. A handle keeps a removed file's blocks until it is closed.
///
/// A facade: the file system layer keeps the file's data (`FileData`), the mapping layer its
/// address space (mappings, the invalidate lock); each method calls down into one or both.
public final class DAXFile: Sendable {
    let fileSystem: DAXFileSystem
    let inode: Inode
    /// The file's address space, shared with every other handle and mapping of the file.
    let space: AddressSpace
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
        self.space = fileSystem.spaces.space(for: inode)
        fileSystem.handles.withTrackedLock { $0[ObjectIdentifier(self)] = DAXFileSystem.WeakHandle(file: self) }
    }

    deinit { close() }

    /// The file's size in bytes.
    public var size: Int { inode.contents.read { Int($0.record.size) } }

    /// The inode number (stable while the file exists).
    public var inodeNumber: UInt32 { inode.number }

    /// Closes the handle. The last close of a removed file frees its blocks. Idempotent.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        _ = fileSystem.handles.withTrackedLock { $0.removeValue(forKey: ObjectIdentifier(self)) }
        fileSystem.namespace.releaseUser(inode, handle: true)
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
            return try fileSystem.namespace.run {
                try fileSystem.volume.operations.withReadLock {
                    if writable { try checkWritable(name) } else { try checkOpen(name) }
                    return try body()
                }
            }
        } catch let error as DAXError {
            let subject = Paths.quoted(path)
            throw error.context(
                "cannot \(name) \(subject)" + (range.map { " at \($0.offset) + \($0.count)" } ?? ""), naming: subject)
        }
    }

    func checkOpen(_ operation: String) throws {
        // Unmounted first: an unmount closes every handle, and "closed" would not say why.
        try fileSystem.volume.checkMounted()
        guard !isClosed else {
            throw DAXError(.invalidArgument, "cannot \(operation) \(Paths.quoted(path)): the file is closed")
        }
    }

    func checkWritable(_ operation: String) throws {
        try checkOpen(operation)
        guard access == .readWrite else {
            throw DAXError(.permissionDenied, "cannot \(operation) \(Paths.quoted(path)): it was opened read-only")
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
        try operation("write", writable: true, range: (offset, buffer.count)) {
            try FileData.checkRange(offset, buffer.count, "write", path)
            guard buffer.count > 0 else { return }
            try withBounce(buffer) { buffer in
                try inode.contents.write { contents in
                    try contents.checkLive(path)
                    // Shared pages leave the mappings while they are copied (copy-on-write).
                    let pages = FileData.page(offset)..<FileData.pageUp(offset + buffer.count)
                    let written = try space.copyingShared(pages, &contents) { contents in
                        try fileSystem.data.writeData(&contents, buffer, at: offset)
                    }
                    space.show(written.added)
                    space.sizeChanged(&contents)
                }
            }
        }
    }

    /// Runs `body` with `buffer`, or with a copy of it when it lies in a DAX mapping of any file
    /// system: touching such memory may fault to a handler thread, which may need the inode lock
    /// that `body` holds, or wait behind a fault that does (the kernel faults a user buffer in
    /// before it takes its locks).
    private func withBounce<T>(_ buffer: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) throws -> T) rethrows
        -> T
    {
        guard let start = buffer.baseAddress, UserFaults.anyHandles(start, length: buffer.count)
        else { return try body(buffer) }
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: buffer.count, alignment: 64)
        defer { copy.deallocate() }
        copy.copyMemory(from: buffer)
        return try body(UnsafeRawBufferPointer(copy))
    }

    /// Runs `body` to fill `buffer`, or a copy of it that is then copied in when `buffer` lies in
    /// a DAX mapping of any file system (see ``withBounce(_:_:)``).
    private func withBounce(
        _ buffer: UnsafeMutableRawBufferPointer, _ body: (UnsafeMutableRawBufferPointer) throws -> Int
    ) rethrows -> Int {
        guard let start = buffer.baseAddress, UserFaults.anyHandles(start, length: buffer.count)
        else { return try body(buffer) }
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: buffer.count, alignment: 64)
        defer { copy.deallocate() }
        let done = try body(copy)
        buffer.baseAddress!.copyMemory(from: copy.baseAddress!, byteCount: done)
        return done
    }

    /// Reads up to `count` bytes at `offset`: fewer at the end of the file, none past it.
    ///
    /// The result is one array in memory: a read whose result would take more than half of the
    /// machine's memory throws `.noSpace` (read such a range in pieces with ``read(into:at:)``, or
    /// map it) rather than kill the process when the allocation fails.
    public func read(count: Int, at offset: Int) throws -> [UInt8] {
        try operation("read") {
            try FileData.checkRange(offset, count, "read", path)
            return try inode.contents.read { contents in
                try contents.checkLive(path)
                let length = max(0, min(count, Int(contents.record.size) - offset))
                let limit = PMemDevice.largestReadResult
                guard length <= limit else {
                    throw DAXError(
                        .noSpace,
                        "cannot read \(counted(length, "byte")) at offset \(offset) of \(Paths.quoted(path)) into one array: "
                            + "more than half of the machine's memory (\(counted(limit, "byte"))); read it in pieces "
                            + "with read(into:at:) or map it")
                }
                return fileSystem.data.readData(contents, count: count, at: offset)
            }
        }
    }

    /// Reads into `buffer` (up to its size) at `offset`, without allocating; returns the bytes
    /// read: fewer at the end of the file, 0 past it.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        try operation("read") {
            try FileData.checkRange(offset, buffer.count, "read", path)
            return try withBounce(buffer) { buffer in
                try inode.contents.read { contents in
                    try contents.checkLive(path)
                    return fileSystem.data.readData(contents, into: buffer, at: offset)
                }
            }
        }
    }

    /// fallocate: gives the range zeroed blocks where it has none, and grows the size to cover it.
    public func allocate(offset: Int, count: Int) throws {
        try operation("allocate", writable: true, range: (offset, count)) {
            try FileData.checkRange(offset, count, "allocate", path)
            guard count > 0 else {
                throw DAXError(.invalidArgument, "cannot allocate 0 bytes of \(Paths.quoted(path))")
            }
            try inode.contents.write { contents in
                try contents.checkLive(path)
                space.show(try fileSystem.data.allocateData(&contents, offset: offset, count: count))
                space.sizeChanged(&contents)
            }
        }
    }

    /// The byte ranges of `[offset, offset+count)` that have blocks, whole pages, in order, with
    /// neighbouring runs merged: what `lseek(SEEK_DATA)` and `SEEK_HOLE` step through, found from
    /// the file's extents, so that a sparse file of terabytes is walked in the time its blocks
    /// take, not its pages. Ranges are clipped to the pages `[offset, offset+count)` touches.
    public func dataRanges(offset: Int, count: Int) throws -> [Range<Int>] {
        try operation("look up the data of") {
            try FileData.checkRange(offset, count, "look up the data of", path)
            guard count > 0 else { return [] }
            let pages = FileData.page(offset)..<FileData.pageUp(offset + count)
            return try inode.contents.read { contents in
                try contents.checkLive(path)
                return Self.dataPages(contents, pages).map {
                    Int($0.lowerBound) * FileData.pageSize..<Int($0.upperBound) * FileData.pageSize
                }
            }
        }
    }

    /// The runs of `pages` that have blocks, neighbouring extents merged.
    static func dataPages(_ contents: Inode.Contents, _ pages: Range<UInt64>) -> [Range<UInt64>] {
        var runs: [Range<UInt64>] = []
        for extent in contents.extents.extents(in: pages) {
            if let last = runs.last, last.upperBound == extent.logical {
                runs[runs.count - 1] = last.lowerBound..<extent.logicalEnd
            } else {
                runs.append(extent.logical..<extent.logicalEnd)
            }
        }
        return runs
    }

    /// The device pages backing `[offset, offset+count)`, one entry per page; nil for a hole.
    /// The bytes of page `i` are at device offset `frame * 4096`: a program using libpmem on the
    /// device finds them there.
    public func frames(offset: Int, count: Int) throws -> [PageFrameNumber?] {
        try operation("look up the frames of") {
            try FileData.checkRange(offset, count, "look up the frames of", path)
            guard count > 0 else { return [] }
            let pages = FileData.page(offset)..<FileData.pageUp(offset + count)
            guard pages.count <= 1 << 28 else {
                throw DAXError(.invalidArgument, "cannot list \(pages.count) frames of \(Paths.quoted(path)) at once")
            }
            return try inode.contents.read { contents in
                try contents.checkLive(path)
                return fileSystem.data.frames(contents, pages: pages)
            }
        }
    }

    // MARK: - Layout changes (break layouts)

    /// Sets the size. Shrinking frees the blocks past the new end after breaking layouts: the
    /// pages leave every mapping (a later access there faults), and pages that are still pinned
    /// are dealt with as `ifBusy` says. All or nothing: a failure leaves size,
    /// contents and mappings as they were.
    public func truncate(to size: Int, ifBusy policy: BusyPolicy = .wait(timeout: .seconds(30))) throws {
        try FileData.checkRange(size, 0, "truncate", path)
        try space.breakLayouts(
            policy: policy, what: "truncate \(Paths.quoted(path)) to \(counted(size, "byte"))",
            guarded: { try operation("truncate", writable: true, $0) },
            plan: { contents in
                try contents.checkLive(path)
                return try fileSystem.data.planResize(contents, to: size)
            })
    }

    /// Frees the blocks of the whole pages in `offset..<offset+count` and zeroes the partial pages
    /// at its edges; the size does not change. Busy pages are handled as for ``truncate(to:ifBusy:)``.
    public func punchHole(offset: Int, count: Int, ifBusy policy: BusyPolicy = .wait(timeout: .seconds(30))) throws {
        try FileData.checkRange(offset, count, "punch a hole in", path)
        guard count > 0 else { return try operation("punch a hole in", writable: true) {} }
        try space.breakLayouts(
            policy: policy, what: "punch \(offset)..<\(offset + count) of \(Paths.quoted(path))",
            guarded: { try operation("punch a hole in", writable: true, range: (offset, count), $0) },
            plan: { contents in
                try contents.checkLive(path)
                return try fileSystem.data.planPunch(contents, offset: offset, count: count)
            })
    }

    // MARK: - Direct access

    /// A direct (DAX) mapping of `count` bytes from `offset`: loads and stores reach the device
    /// pages themselves.
    ///
    /// With the file system's fault handler (``DAXFileSystem/faultHandling`` is `.userfaultfd`)
    /// the mapping behaves as the kernel's DAX mappings do: a load of a hole reads zeros and
    /// allocates nothing, the first store to a hole gives it a zeroed block (journaled, and shown
    /// in every mapping of the file; SIGBUS when no block is left), and an access past the end of
    /// the file raises SIGBUS until the file grows over it. Without the handler, a `.readWrite`
    /// mapping gives the holes in its range zeroed blocks first, a `.readOnly` one shows them as the
    /// zero page, and pages past the end raise SIGBUS for the mapping's life.
    ///
    /// `offset` must be a multiple of the page size. The range may reach past the end of the file,
    /// as `mmap(2)` allows; a mapping never changes the file's size. A `.readWrite` mapping needs a
    /// file opened `.readWrite`; a store through a `.readOnly` mapping raises SIGSEGV.
    public func map(offset: Int = 0, count: Int, access: Access = .readWrite) throws -> DAXMapping {
        try operation("map") {
            try space.map(offset: offset, count: count, access: access, fileAccess: self.access, path: path)
        }
    }

    /// Moves each page of `offset..<offset+count` that has a block to a new block, keeping every
    /// byte: the page leaves every mapping, its count is frozen at what is expected (no mapping,
    /// no reference, no pin: the kernel's `page_ref_freeze`), its bytes are copied, the extent is
    /// pointed at the new block in one journal transaction, the new block is mapped where the old
    /// one was, and the old block is freed.
    ///
    /// A page that something else holds (a pin, a transient reference) stays where it is, mapped,
    /// and is reported in ``MigrationResult/busy`` by file page index (the kernel's `-EAGAIN`).
    /// Each busy page is looked at up to ``DAXFileSystem/migrationAttempts`` times in the call,
    /// since a transient reference may go; a pin does not, and is never waited for. Holes are
    /// skipped. New blocks are taken as few runs as the free space allows, so migrating a whole
    /// file defragments it. `.noSpace` when no block is free, then nothing moved.
    public func migrate(offset: Int, count: Int) throws -> MigrationResult {
        try FileData.checkRange(offset, count, "migrate", path)
        guard count > 0 else { return MigrationResult(migrated: 0, busy: []) }
        return try operation("migrate", writable: true, range: (offset, count)) {
            // A batch of pages per transaction, so that any range fits the journal.
            let pages = FileData.page(offset)..<FileData.pageUp(offset + count)
            var result = MigrationResult(migrated: 0, busy: [])
            let step = AddressSpace.migrationBatch
            // One free run for the whole range where there is one: each batch goes on where the
            // one before stopped, so the file comes together across batches.
            var goal = space.migrationGoal(pages)
            // Batches of `step` pages, each starting at the next page with a block: a hole has
            // nothing to move, so a sparse file of terabytes is walked in the time its extents
            // take, and pages scattered among small holes still go many to a transaction.
            let data = inode.contents.read { Self.dataPages($0, pages) }
            var index = 0
            var cursor = pages.lowerBound
            while index < data.count {
                let start = max(data[index].lowerBound, cursor)
                let end = min(start + step, pages.upperBound)
                let done = try space.migrate(start..<end, goal: &goal, path: path)
                result.migrated += done.migrated
                result.busy += done.busy
                cursor = end
                while index < data.count, data[index].upperBound <= cursor { index += 1 }
            }
            return result
        }
    }

    /// fsync: makes every store through the file's mappings durable, and its metadata (which every
    /// change already committed durably).
    ///
    /// With the fault handler (``DAXFileSystem/faultHandling``), each writable mapping knows the
    /// pages stored to since the last `sync`: those are write-protected, so that the next store to
    /// one faults and marks it dirty again, and then made durable (`pmem_persist` of their lines,
    /// or `msync` in `.msync` mode), as the kernel's `dax_writeback_mapping_range` writes back the
    /// entries its page cache tagged dirty. A `sync` after one store to a 1 GiB mapping flushes one
    /// page. Pages of mappings unmapped since the last `sync` are made durable too. Without the
    /// handler it makes every block the file holds durable.
    public func sync() throws {
        try operation("sync") {
            // Pages a layout change could not hide and a SIGBUS region that could not move up as
            // the file grew, for want of a map entry, get another try; a store in the moment
            // before a new placeholder is registered is kept for the file, which needs its lock.
            let end = FileData.pageUp(size)
            if space.liveMappings.contains(where: { $0.hasPagesToRetry(end: end) }) {
                try inode.contents.write { contents in
                    try contents.checkLive(path)
                    let end = FileData.pageUp(Int(contents.record.size))
                    for mapping in space.liveMappings {
                        mapping.hideStalePages()
                        mapping.fileGrew(to: end)
                    }
                    space.keepRacedStores(&contents)
                }
            }
            try inode.contents.read { contents in
                try contents.checkLive(path)
                guard space.handler.faults != nil else {
                    for extent in contents.extents.allExtents {
                        fileSystem.device.persist(
                            at: Int(extent.physical) * PMemDevice.pageSize,
                            count: Int(extent.length) * PMemDevice.pageSize)
                    }
                    return
                }
                for mapping in space.liveMappings where mapping.access == .readWrite { mapping.writeBack() }
                space.writeBackUnmapped()
            }
        }
    }
}
