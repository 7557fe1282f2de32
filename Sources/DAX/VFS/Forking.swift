/// Fault handling, and forking: blocks shared by several files (reflink, snapshots, dedup), copied
/// before a change (copy-on-write). See `docs/forking.md`.
extension DAXFileSystem {
    /// Which fault handling is in effect: `.userfaultfd` when the file system's handler threads
    /// answer the faults of its mappings (holes read as zeros and fill on the first store, pages
    /// past the end of the file raise SIGBUS), else `.unavailable` with the reason (mappings are
    /// then populated when they are made). ``faultHandlingDetail`` says which accesses are resolved.
    public var faultHandling: FaultHandling { spaces.handler.handling }

    /// One sentence on the fault handling in effect: whether faults the kernel takes inside a
    /// system call (`read(2)` into a mapping) are resolved too (full mode) or fail with `EFAULT`
    /// (user-mode-only mode, without privilege), or why there is no handler; and how many handler
    /// threads there are and how they wait for faults (``faultHandlerThreads``,
    /// ``faultHandlerSpin``).
    public var faultHandlingDetail: String { spaces.handler.detail }

    /// How many threads answer the faults of this file system's mappings: one bound to each CPU
    /// the process may use when it may use 2 to 4 (a fault is answered on the faulting thread's
    /// own CPU, which costs far less than waking one on another where idle CPUs halt), else one;
    /// 0 without a handler. Set by `DAX_FAULT_THREADS` (`1`, or `per-cpu`) when the file system
    /// is mounted (`docs/faults.md`).
    public var faultHandlerThreads: Int { spaces.handler.faults?.threadCount ?? 0 }

    /// How long each handler thread polls for the next fault after each one before it sleeps, so
    /// that a run of faults does not wake an idle CPU for each (`docs/faults.md`); zero when it
    /// does not (no handler, one usable CPU, threads bound one to each CPU, or
    /// `DAX_FAULT_SPIN_US=0`). Set by `DAX_FAULT_SPIN_US` (microseconds, 0 to 10000) when the
    /// file system is mounted; 100 µs by default for a single thread.
    public var faultHandlerSpin: Duration { .nanoseconds(spaces.handler.faults?.spin ?? 0) }

    /// reflink (`FICLONE`): `destination`, which must not exist, shares the source's blocks
    /// copy-on-write; a directory is cloned with its whole tree (a snapshot). One transaction: a
    /// crash leaves no destination or a complete one. Pages of the source that a device holds
    /// (pinned) are dealt with as `ifPinned` says; with the default `.copy` the clone gets copies
    /// of them and the device keeps writing into the source only. Throws `.alreadyExists`,
    /// `.notFound`, `.busy` (`.fail`), `.timedOut` (`.wait`), `.noSpace` (the tree does not fit one
    /// transaction, or no blocks for copies), `.unsupported` on a device formatted before version 3.
    public func clone(_ source: String, to destination: String, ifPinned: PinnedPagePolicy = .copy) throws {
        try namespace.clone(source, to: destination, ifPinned: ifPinned) { inode, _ in
            spaces.space(for: inode).prepareForSharing()
        }
    }

    /// `FIDEDUPERANGE`: where the ranges hold the same bytes, page by page, `destination` comes to
    /// share `source`'s blocks. Returns the bytes now shared (pages that already shared the block
    /// count too). Pages with a hole on either side, pages that differ, and pages a pin holds on
    /// either side are left alone and not counted. A partial page at the end is compared and
    /// shared only where both ranges end at the end of their files, as Linux's remap checks
    /// allow; otherwise `count` is taken down to whole pages. Offsets must be multiples of 4096
    /// and both ranges inside their files (`.invalidArgument`, nothing changed); the destination
    /// must be writable.
    public func deduplicate(
        _ source: String, offset: Int, _ destination: String, offset destinationOffset: Int, count: Int
    ) throws -> Int {
        let what =
            "deduplicate \(Paths.quoted(destination)) at \(destinationOffset) against "
            + "\(Paths.quoted(source)) at \(offset) + \(count)"
        do {
            try FileData.checkRange(offset, count, "deduplicate", source)
            try FileData.checkRange(destinationOffset, count, "deduplicate", destination)
            guard offset % FileData.pageSize == 0, destinationOffset % FileData.pageSize == 0 else {
                throw DAXError(.invalidArgument, "the offsets must be multiples of \(FileData.pageSize)")
            }
            guard volume.shared.canShare else {
                throw DAXError(
                    .unsupported,
                    "the device was formatted as version \(volume.superblock.version), which keeps no "
                        + "shared-block counts; format it again to share blocks")
            }
            let sourceFile = try open(source, access: .readOnly)
            defer { sourceFile.close() }
            let destinationFile = try open(destination)
            defer { destinationFile.close() }
            guard offset + count <= sourceFile.size, destinationOffset + count <= destinationFile.size else {
                throw DAXError(
                    .invalidArgument,
                    "the range reaches past the end of a file (\(counted(sourceFile.size, "byte")) and "
                        + "\(counted(destinationFile.size, "byte")))")
            }
            // The last page, partial, when both ranges end where their files do: the bytes past
            // the end are compared too (they read as zeros once a file grows over them), so a
            // page whose tails differ is left alone.
            let tail = count % FileData.pageSize
            let withTail =
                tail != 0 && offset + count == sourceFile.size && destinationOffset + count == destinationFile.size
            let pages = count / FileData.pageSize + (withTail ? 1 : 0)
            guard pages > 0 else { return 0 }
            let first = FileData.page(offset)
            let destinationFirst = FileData.page(destinationOffset)
            let last = destinationFirst + UInt64(pages) - 1
            return try destinationFile.operation("deduplicate", writable: true) {
                let shared = try AddressSpace.deduplicate(
                    sourceFile.space, first..<(first + UInt64(pages)), destinationFile.space,
                    destinationFirst..<(destinationFirst + UInt64(pages)), what: what)
                let partial = withTail && shared.contains(last) ? FileData.pageSize - tail : 0
                return shared.count * FileData.pageSize - partial
            }
        } catch let error as DAXError {
            throw error.context("cannot \(what)", naming: Paths.quoted(destination))
        }
    }
}

extension DAXFile {
    /// How many files' extents name the block behind each page of `[offset, offset+count)`: 0 for
    /// a hole, 1 for a block of this file alone, more for a block shared copy-on-write (a clone, a
    /// snapshot, dedup). `daxemu ls -l` and `frames` show it.
    public func blockReferences(offset: Int, count: Int) throws -> [Int] {
        try operation("look up the block references of") {
            try FileData.checkRange(offset, count, "look up the block references of", path)
            guard count > 0 else { return [] }
            let pages = FileData.page(offset)..<FileData.pageUp(offset + count)
            guard pages.count <= 1 << 28 else {
                throw DAXError(
                    .invalidArgument, "cannot list \(pages.count) block references of \(Paths.quoted(path)) at once")
            }
            return try inode.contents.read { contents in
                try contents.checkLive(path)
                return fileSystem.data.references(contents, pages: pages)
            }
        }
    }
}
