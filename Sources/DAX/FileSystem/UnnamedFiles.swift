/// Files created without a name (Linux's `O_TMPFILE`) and named once complete (`linkat`): a
/// program that builds a file and dies half way leaves nothing behind, since the file is on the
/// orphan list from its first moment and the next mount frees it.
extension Namespace {
    /// Creates a regular file with no name, in the file system of `directory` (which must exist),
    /// open for reading and writing: the kernel's `open(directory, O_TMPFILE)`. It is an orphan
    /// from the start: its last close frees it, and so does the next mount after a crash, unless
    /// ``link(_:at:replacing:)`` gave it a name first. Its ``DAXFile/path`` says `(unnamed N)` until then.
    func createUnnamed(in directory: String) throws -> Inode {
        try operation(exclusive: true, "create an unnamed file in", directory) { () throws -> Inode in
            _ = try resolveDirectory(try Paths.components(directory), path: directory)
            guard let number = table.withTrackedLock({ $0.takeNumber() }) else {
                throw DAXError(
                    .noSpace,
                    "cannot create an unnamed file in \(Paths.quoted(directory)): all \(volume.superblock.inodeCount) "
                        + "inodes are in use")
            }
            do {
                return try orphans.withTrackedLock { orphans in
                    let now = WallClock.nanosecondsSinceEpoch
                    var record = InodeRecord()
                    record.kind = .file
                    record.linkCount = 0
                    let old = ByteReader(
                        volume.device.base + volume.superblock.inodeOffset(number), count: Superblock.inodeSize)
                    record.generation = old.get(UInt32.self, at: 12) &+ 1
                    record.modificationTime = now
                    record.changeTime = now
                    record.nextOrphan = orphans.first ?? 0
                    var change = PendingChange()
                    change.store(record, extents: ExtentMap(), of: number, superblock: volume.superblock)
                    var sb = volume.superblock
                    sb.orphanHead = number
                    change.transaction.write(sb.encode(), at: 0)
                    try volume.commit(change, what: "create an unnamed file")
                    orphans.insert(number, at: 0)
                    let inode = Inode(number: number, record: record, extents: ExtentMap())
                    inode.users.withTrackedLock { $0.handles += 1 }
                    table.withTrackedLock { $0.insert(inode) }
                    return inode
                }
            } catch {
                table.withTrackedLock { $0.release(number) }
                throw error
            }
        }
    }

    /// Gives the unnamed file `file` (from ``createUnnamed(in:)``, still open) the name `path`:
    /// the kernel's `linkat` of an `O_TMPFILE` file. One transaction takes it off the orphan list
    /// and writes the directory entry, so after a crash the file is either complete under its
    /// name or gone. With `replacing`, a file already at `path` is replaced in the same
    /// transaction (as ``rename(_:to:)`` replaces one): it becomes an orphan if it is open or
    /// mapped, else its blocks are freed. Throws `.alreadyExists` (without `replacing`),
    /// `.isADirectory` for a directory at `path`, `.notFound` for a missing parent,
    /// `.invalidArgument` for a file that has a name already, was closed, or belongs to another
    /// file system.
    /// `check` runs first, under the namespace lock: the handle's own checks (open, writable, of
    /// this file system); `filePath` names the file in errors.
    func link(
        _ inode: Inode, filePath: String, at path: String, replacing: Bool, check: () throws -> Void
    ) throws {
        try operation(exclusive: true, "link", path) {
            try check()
            let (parentPath, name) = try Paths.split(path, what: "link")
            try Paths.checkTrailingSlash(path, kind: .file, what: "link a file at")
            let parent = try resolveDirectory(parentPath, path: path)
            let existing = parent.contents.read { $0.directory?.entries[name] }
            if let existing {
                guard replacing else { throw DAXError(.alreadyExists, "\(Paths.quoted(path)) already exists") }
                guard existing.kind == .file else {
                    throw DAXError(.isADirectory, "cannot replace directory \(Paths.quoted(path)) with a file")
                }
            }
            let replaced = try existing.map { try self.inode($0.inode) }
            // Read under the inode's lock, before the orphans lock (which nests inside inode
            // locks); only directory operations, which this one excludes, change it.
            let unnamed = inode.contents.read { $0.record.linkCount == 0 }
            // With the namespace lock held exclusively, nothing else changes the orphan list.
            // Locks in the order a reclaim takes them: the predecessor on the list, then the
            // inode; then the replaced file (a named file, never on the list) and its users.
            let previous: Inode? = try orphans.withTrackedLock { orphans in
                guard let index = orphans.firstIndex(of: inode.number), unnamed else {
                    throw DAXError(
                        .invalidArgument, "\(Paths.quoted(filePath)) is not an unnamed file: it has a name already")
                }
                return index == 0 ? nil : try self.inode(orphans[index - 1])
            }
            try withWriteLock(of: previous) { previousContents in
                try withWriteLock(of: replaced) { replacedContents in
                    try inode.contents.write { contents in
                        try contents.checkLive(filePath)
                        try linkLocked(
                            &contents, name: name, in: parent, previous: &previousContents,
                            replacing: existing.map { ($0, replaced!) }, replaced: &replacedContents, path: path)
                    }
                }
            }
        }
    }

    /// ``link(_:at:replacing:)`` with every lock but the users', the orphans' and the parent
    /// directory's held: those of `file`, of `previous` (the orphan before it on the list) and of
    /// `replaced` (the contents of `replacing.inode`).
    private func linkLocked(
        _ file: inout Inode.Contents, name: [UInt8], in parent: Inode, previous: inout Inode.Contents?,
        replacing: (entry: DirectoryIndex.Entry, inode: Inode)?, replaced: inout Inode.Contents?, path: String
    ) throws {
        // The replaced file's users cannot change while this decides whether it becomes an orphan.
        try withUsers(of: replacing?.inode) { users in
            try orphans.withTrackedLock { orphans in
                guard let index = orphans.firstIndex(of: file.number) else {
                    preconditionFailure("unnamed inode \(file.number) left the orphan list under the namespace lock")
                }
                var change = PendingChange()
                var committed = false
                defer { if !committed { volume.abandon(change) } }
                var list = orphans
                list.remove(at: index)
                var previousRecord: InodeRecord?
                if let previous {
                    var record = previous.record
                    record.nextOrphan = index < list.count ? list[index] : 0
                    previousRecord = record
                    change.store(record, extents: previous.extents, of: previous.number, superblock: volume.superblock)
                }
                let slot: DirectoryIndex.SlotAddress
                var parentExtents: ExtentMap?
                var replacedRecord: InodeRecord?
                if let replacing, let users, let replaced {
                    slot = replacing.entry.slot
                    if users.handles > 0 || users.mappings > 0 {
                        // Still open or mapped: an orphan at the head of the list, like a removed file.
                        var record = replaced.record
                        record.linkCount = 0
                        record.nextOrphan = list.first ?? 0
                        record.changeTime = WallClock.nanosecondsSinceEpoch
                        replacedRecord = record
                        change.store(
                            record, extents: replaced.extents, of: replaced.number, superblock: volume.superblock)
                        list.insert(replaced.number, at: 0)
                    } else {
                        volume.freeInode(replaced, change: &change)
                    }
                } else {
                    (slot, parentExtents) = try parent.contents.read { try planSlot(in: $0, change: &change) }
                }
                if list.first != orphans.first {
                    var sb = volume.superblock
                    sb.orphanHead = list.first ?? 0
                    change.transaction.write(sb.encode(), at: 0)
                }
                change.transaction.write(
                    DirectoryFormat.encodeSlot(inode: file.number, name: name, kind: .file),
                    at: parent.contents.read { slotOffset($0, slot, extents: parentExtents) })
                var record = file.record
                record.linkCount = 1
                record.nextOrphan = 0
                record.changeTime = WallClock.nanosecondsSinceEpoch
                change.store(record, extents: file.extents, of: file.number, superblock: volume.superblock)
                try volume.commit(change, what: "link \(Paths.quoted(path))")
                committed = true

                if let replacing {
                    if let replacedRecord {
                        replaced?.record = replacedRecord
                    } else {
                        replaced?.record.linkCount = 0
                        replaced?.isFreed = true
                        users?.reclaimed = true
                        table.withTrackedLock { $0.release(replacing.inode.number) }
                    }
                }
                parent.contents.write { parent in
                    if replacing == nil {
                        installSlot(in: &parent, extents: parentExtents)
                        parent.directory?.take(slot)
                    }
                    parent.directory?.entries[name] = DirectoryIndex.Entry(inode: file.number, kind: .file, slot: slot)
                }
                if let previousRecord { previous?.record = previousRecord }
                file.record = record
                orphans = list
            }
        }
    }
}

/// Runs `body` holding the users lock of `inode`, or with nil when there is no inode.
private func withUsers<T>(of inode: Inode?, _ body: (inout Inode.Users?) throws -> T) throws -> T {
    guard let inode else {
        var none: Inode.Users? = nil
        return try body(&none)
    }
    return try inode.users.withTrackedLock { users in
        var held: Inode.Users? = users
        defer { users = held! }
        return try body(&held)
    }
}
