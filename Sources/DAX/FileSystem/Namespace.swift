import Glibc
import Synchronization

/// The directory tree and the inodes in DRAM: create, open, mkdir, remove, rename, list, and the
/// orphans (files removed while open or mapped). Every change is one transaction, made under the
/// namespace lock; lookups share it.
final class Namespace: Sendable {
    let volume: Volume
    /// Serializes changes of the directory tree; lookups share it.
    let lock = ReadWriteLock()
    let table: Mutex<InodeTable>
    /// Removed files still in use, head of the on-device list first.
    let orphans: Mutex<[UInt32]>
    /// Orphans whose last user went while this thread was inside a file system operation, which
    /// may hold the locks a reclaim takes: freed when the outermost operation ends.
    private let deferred = Mutex<[Inode]>([])

    init(volume: Volume, scan: Scanner.Result) {
        self.volume = volume
        let pages = volume.device.pages
        var inodes = InodeTable(count: Int(volume.superblock.inodeCount))
        for (number, scanned) in scan.inodes {
            let inode = Inode(
                number: number, record: scanned.record, extents: scanned.extents,
                directory: scanned.directory)
            inodes.insert(inode)
            // Descriptors learn which file page each block holds.
            for extent in scanned.extents.allExtents {
                for page in extent.logicalRange {
                    let marked = pages.markAllocated(
                        extent.block(for: page), inode: number,
                        index: scanned.record.kind == .file ? page : PageOwner.indexLimit)
                    // A shared block is marked by the first file that names it.
                    precondition(
                        marked || volume.shared.references(to: extent.block(for: page)) > 1,
                        "block \(extent.block(for: page)) busy at mount")
                }
            }
            for leaf in scanned.extents.leafBlocks {
                _ = pages.markAllocated(leaf, inode: number, index: PageOwner.indexLimit)
            }
        }
        for block in scan.sharedTable?.chainedBlocks ?? [] {
            _ = pages.markAllocated(block, inode: Superblock.rootInode, index: PageOwner.indexLimit)
        }
        table = Mutex(inodes)
        orphans = Mutex(scan.orphans)
    }

    /// Creates a new empty regular file, counted as open (one handle).
    func create(_ path: String) throws -> Inode {
        try operation(exclusive: true, "create", path) {
            let inode = try makeNode(path, kind: .file)
            inode.users.withTrackedLock { $0.handles += 1 }
            return inode
        }
    }

    /// Looks up a regular file to open, counted as open (one handle).
    func open(_ path: String, access: Access) throws -> Inode {
        try operation(exclusive: false, "open", path) { () throws -> Inode in
            if access == .readWrite { try volume.checkWritable() }
            let (parent, name) = try Paths.split(path, what: "open")
            let directory = try resolveDirectory(parent, path: path)
            let entry = try directory.contents.read { directory in
                guard let entry = directory.directory?.entries[name] else {
                    throw damageHiding(name, in: directory, path: path)
                        ?? DAXError(.notFound, "no such file: \(Paths.quoted(path))")
                }
                return entry
            }
            guard entry.kind == .file else { throw DAXError(.isADirectory, "\(Paths.quoted(path)) is a directory") }
            try Paths.checkTrailingSlash(path, kind: entry.kind, what: "open")
            // Counted under the namespace lock, so a concurrent remove sees the handle.
            let inode = try self.inode(entry.inode)
            inode.users.withTrackedLock { $0.handles += 1 }
            return inode
        }
    }

    /// Creates a directory. Throws `.alreadyExists` if the path exists.
    func createDirectory(_ path: String) throws {
        _ = try operation(exclusive: true, "create directory", path) { try makeNode(path, kind: .directory) }
    }

    /// The names in a directory, sorted (by bytes, which for UTF-8 is code-point order).
    func contentsOfDirectory(_ path: String) throws -> [String] {
        try operation(exclusive: false, "list", path) {
            let directory = try resolveDirectory(try Paths.components(path), path: path)
            return directory.contents.read { $0.directory?.sortedNames } ?? []
        }
    }

    /// Removes a file or an empty directory. A file that is open, mapped or pinned loses its name
    /// at once and keeps its blocks until the last close or unmap (an orphan; its pinned blocks
    /// stay quarantined until unpinned).
    func remove(_ path: String) throws {
        try operation(exclusive: true, "remove", path) {
            let (parentPath, name) = try Paths.split(path, what: "remove")
            let parent = try resolveDirectory(parentPath, path: path)
            guard let entry = parent.contents.read({ $0.directory?.entries[name] }) else {
                throw DAXError(.notFound, "no such file or directory: \(Paths.quoted(path))")
            }
            try Paths.checkTrailingSlash(path, kind: entry.kind, what: "remove")
            let target = try inode(entry.inode)
            if entry.kind == .directory, target.contents.read({ $0.directory?.isEmpty == false }) {
                throw DAXError(.directoryNotEmpty, "directory \(Paths.quoted(path)) is not empty")
            }
            var change = PendingChange()
            change.transaction.write(DirectoryFormat.emptySlot, at: parent.contents.read { slotOffset($0, entry.slot) })
            try unlink(target, change: &change, what: "remove \(Paths.quoted(path))")
            parent.contents.write { parent in
                parent.directory?.entries[name] = nil
                parent.directory?.release(entry.slot)
            }
        }
    }

    /// Renames atomically. An existing file at `newPath` is replaced (an empty directory by a
    /// directory); after a crash exactly one of the two names exists.
    func rename(_ path: String, to newPath: String) throws {
        try operation(exclusive: true, "rename", path, to: newPath) {
            let (fromPath, fromName) = try Paths.split(path, what: "rename")
            let (toPath, toName) = try Paths.split(newPath, what: "rename onto")
            let from = try resolveDirectory(fromPath, path: path)
            let to = try resolveDirectory(toPath, path: newPath)
            guard let entry = from.contents.read({ $0.directory?.entries[fromName] }) else {
                throw DAXError(.notFound, "no such file or directory: \(Paths.quoted(path))")
            }
            try Paths.checkTrailingSlash(path, kind: entry.kind, what: "rename")
            try Paths.checkTrailingSlash(newPath, kind: entry.kind, what: "rename a file onto")
            if from === to, fromName == toName { return }
            if entry.kind == .directory {
                // A directory cannot move into itself or below itself.
                var ancestor: Inode? = to
                while let current = ancestor {
                    if current.number == entry.inode {
                        throw DAXError(
                            .invalidArgument,
                            "cannot move directory \(Paths.quoted(path)) into itself "
                                + "(\(Paths.quoted(newPath)))")
                    }
                    let parent = current.contents.read { $0.record.parent }
                    ancestor = current.number == Superblock.rootInode ? nil : try inode(parent)
                }
            }
            let replaced = to.contents.read { $0.directory?.entries[toName] }
            if let replaced {
                switch (entry.kind, replaced.kind) {
                case (.directory, .file):
                    throw DAXError(.notADirectory, "cannot replace file \(Paths.quoted(newPath)) with a directory")
                case (.file, .directory):
                    throw DAXError(.isADirectory, "cannot replace directory \(Paths.quoted(newPath)) with a file")
                case (.directory, .directory)
                where try inode(replaced.inode).contents.read({ $0.directory?.isEmpty == false }):
                    throw DAXError(.directoryNotEmpty, "directory \(Paths.quoted(newPath)) is not empty")
                default: break
                }
            }
            var change = PendingChange()
            // Whatever fails before the commit gives back the directory block planSlot took.
            var committed = false
            defer { if !committed { volume.abandon(change) } }
            let moved = try inode(entry.inode)
            let slot: DirectoryIndex.SlotAddress
            var toExtents: ExtentMap?
            if let replaced {
                slot = replaced.slot
            } else {
                (slot, toExtents) = try to.contents.read { try planSlot(in: $0, change: &change) }
            }
            let entryBytes = DirectoryFormat.encodeSlot(inode: entry.inode, name: toName, kind: entry.kind)
            change.transaction.write(entryBytes, at: to.contents.read { slotOffset($0, slot, extents: toExtents) })
            change.transaction.write(DirectoryFormat.emptySlot, at: from.contents.read { slotOffset($0, entry.slot) })
            var movedRecord: InodeRecord?
            if entry.kind == .directory, from !== to {
                moved.contents.read { moved in
                    var record = moved.record
                    record.parent = to.number
                    record.changeTime = WallClock.nanosecondsSinceEpoch
                    movedRecord = record
                    change.store(record, extents: moved.extents, of: moved.number, superblock: volume.superblock)
                }
            }
            if let replaced {
                try unlink(try inode(replaced.inode), change: &change, what: "rename onto \(Paths.quoted(newPath))")
            } else {
                try volume.commit(change, what: "rename \(Paths.quoted(path))")
                to.contents.write { to in
                    installSlot(in: &to, extents: toExtents)
                    to.directory?.take(slot)
                }
            }
            committed = true
            if let movedRecord { moved.contents.write { $0.record = movedRecord } }
            from.contents.write { from in
                from.directory?.entries[fromName] = nil
                from.directory?.release(entry.slot)
            }
            to.contents.write { to in
                to.directory?.entries[toName] = DirectoryIndex.Entry(inode: entry.inode, kind: entry.kind, slot: slot)
            }
        }
    }

    /// Kind, size and blocks of the file or directory at `path`.
    func attributes(of path: String) throws -> FileAttributes {
        let inode = try operation(exclusive: false, "look up", path) { () throws -> Inode in
            let components = try Paths.components(path)
            guard let name = components.last else { return try self.inode(Superblock.rootInode) }
            let parent = try resolveDirectory(Array(components.dropLast()), path: path)
            let entry = try parent.contents.read { parent in
                guard let entry = parent.directory?.entries[name] else {
                    throw damageHiding(name, in: parent, path: path)
                        ?? DAXError(.notFound, "no such file or directory: \(Paths.quoted(path))")
                }
                return entry
            }
            try Paths.checkTrailingSlash(path, kind: entry.kind, what: "look up")
            return try self.inode(entry.inode)
        }
        return inode.contents.read { contents in
            FileAttributes(
                kind: inode.isDirectory ? .directory : .file, size: Int(contents.record.size),
                blocks: Int(contents.extents.blockCount), inode: inode.number,
                modificationTime: contents.record.modificationTime)
        }
    }

    // MARK: - Helpers (namespace lock held)

    /// Runs a directory operation: holds the operations lock shared (so that `unmount` waits for
    /// it, and one that waited for the namespace lock cannot run after `unmount`), checks that the
    /// file system is still mounted, then takes the namespace lock.
    /// An error that does not name `path` gets "cannot `what` `path` [to `newPath`]" in front.
    func operation<T>(
        exclusive: Bool, _ what: String, _ path: String, to newPath: String? = nil, _ body: () throws -> T
    ) throws -> T {
        do {
            return try run {
                try volume.operations.withReadLock {
                    try volume.checkMounted()
                    // Every exclusive directory operation changes the tree.
                    if exclusive { try volume.checkWritable() }
                    return exclusive ? try lock.withWriteLock(body) : try lock.withReadLock(body)
                }
            }
        } catch let error as DAXError {
            let subject = Paths.quoted(path)
            let target = newPath.map { " to \(Paths.quoted($0))" } ?? ""
            throw error.context("cannot \(what) \(subject)\(target)", naming: subject)
        }
    }

    func inode(_ number: UInt32) throws -> Inode {
        guard let inode = table.withTrackedLock({ $0.inodes[number] }) else {
            throw DAXError(.corrupted, "inode \(number) is named in a directory but not loaded")
        }
        return inode
    }

    /// The directory at `components`, from the root.
    func resolveDirectory(_ components: [[UInt8]], path: String) throws -> Inode {
        var current = try inode(Superblock.rootInode)
        for (index, name) in components.enumerated() {
            let entry = try current.contents.read { current in
                guard let entry = current.directory?.entries[name] else {
                    let prefix = components[...index].map { String(decoding: $0, as: UTF8.self) }.joined(separator: "/")
                    throw damageHiding(name, in: current, path: "/" + prefix)
                        ?? DAXError(
                            .notFound, "no such directory \(Paths.quoted("/" + prefix)) in \(Paths.quoted(path))")
                }
                return entry
            }
            guard entry.kind == .directory else {
                let prefix = components[...index].map { String(decoding: $0, as: UTF8.self) }.joined(separator: "/")
                throw DAXError(
                    .notADirectory, "\(Paths.quoted("/" + prefix)) in \(Paths.quoted(path)) is not a directory")
            }
            current = try inode(entry.inode)
        }
        return current
    }

    /// Device offset of a directory slot. `extents` overrides the directory's extents when the
    /// slot is in a block that a pending change adds.
    func slotOffset(_ directory: Inode.Contents, _ slot: DirectoryIndex.SlotAddress, extents: ExtentMap? = nil) -> Int {
        let map = extents ?? directory.extents
        guard let extent = map.extent(containing: UInt64(slot.block)) else {
            preconditionFailure("directory \(directory.number) has no block \(slot.block)")
        }
        return Int(extent.block(for: UInt64(slot.block))) * Superblock.blockSize + DirectoryFormat.slotOffset(slot.slot)
    }

    /// A free slot of `directory`: an existing one, or the first of a new block, zeroed with its
    /// header and added to the directory by `change`. Returns the directory's new extents when a
    /// block is added (install with ``installSlot(in:extents:)`` after the commit).
    func planSlot(
        in directory: Inode.Contents, change: inout PendingChange
    ) throws -> (DirectoryIndex.SlotAddress, ExtentMap?) {
        if let slot = directory.directory?.freeSlots.last { return (slot, nil) }
        let page = UInt64(directory.directory?.blockCount ?? 0)
        let runs = try volume.allocateBacked(
            1, goal: directory.extents.goal(before: page), inode: directory.number,
            firstIndex: nil)
        change.allocate(runs, superblock: volume.superblock)
        let block = runs[0].start
        // Not linked yet: write it in place, then let the transaction link it.
        volume.device.fill(at: Int(block) * Superblock.blockSize, count: Superblock.blockSize, flags: .noDrain)
        DirectoryFormat.header(owner: directory.number, index: UInt32(page)).withUnsafeBytes {
            volume.device.copy($0, at: Int(block) * Superblock.blockSize)
        }
        var map = directory.extents
        try volume.editExtents(
            &map, of: directory.number, replacing: page..<(page + 1),
            with: [Extent(logical: page, physical: block, length: 1)], change: &change)
        var record = directory.record
        record.size = (page + 1) * UInt64(Superblock.blockSize)
        record.modificationTime = WallClock.nanosecondsSinceEpoch
        change.store(record, extents: map, of: directory.number, superblock: volume.superblock)
        return (DirectoryIndex.SlotAddress(block: Int(page), slot: 0), map)
    }

    /// Installs a block added by ``planSlot(in:change:)`` once its change committed.
    func installSlot(in directory: inout Inode.Contents, extents: ExtentMap?) {
        guard let extents else { return }
        directory.extents = extents
        directory.record.size = UInt64(extents.blockCount) * UInt64(Superblock.blockSize)
        directory.directory?.addBlock()
    }

    /// Creates a file or directory at `path` with one transaction.
    private func makeNode(_ path: String, kind: InodeRecord.Kind) throws -> Inode {
        let (parentPath, name) = try Paths.split(path, what: "create")
        if kind == .file, Paths.namesDirectory(path) {
            throw DAXError(
                .isADirectory, "cannot create file \(Paths.quoted(path)): a path that ends in '/' names a directory")
        }
        let parent = try resolveDirectory(parentPath, path: path)
        guard parent.contents.read({ $0.directory?.entries[name] }) == nil else {
            throw DAXError(.alreadyExists, "\(Paths.quoted(path)) already exists")
        }
        guard let number = table.withTrackedLock({ $0.takeNumber() }) else {
            throw DAXError(
                .noSpace,
                "cannot create \(Paths.quoted(path)): all \(countedAre(volume.superblock.inodeCount, "inode")) in use")
        }
        var change = PendingChange()
        do {
            let (slot, parentExtents) = try parent.contents.read { try planSlot(in: $0, change: &change) }
            let now = WallClock.nanosecondsSinceEpoch
            var record = InodeRecord()
            record.kind = kind
            record.linkCount = 1
            let old = ByteReader(
                volume.device.base + volume.superblock.inodeOffset(number), count: Superblock.inodeSize)
            record.generation = old.get(UInt32.self, at: 12) &+ 1
            record.modificationTime = now
            record.changeTime = now
            record.parent = kind == .directory ? parent.number : 0
            change.store(record, extents: ExtentMap(), of: number, superblock: volume.superblock)
            change.transaction.write(
                DirectoryFormat.encodeSlot(inode: number, name: name, kind: kind),
                at: parent.contents.read { slotOffset($0, slot, extents: parentExtents) })
            try volume.commit(change, what: "create \(Paths.quoted(path))")
            let inode = Inode(
                number: number, record: record, extents: ExtentMap(),
                directory: kind == .directory ? DirectoryIndex() : nil)
            table.withTrackedLock { $0.insert(inode) }
            parent.contents.write { parent in
                installSlot(in: &parent, extents: parentExtents)
                parent.directory?.take(slot)
                parent.directory?.entries[name] = DirectoryIndex.Entry(inode: number, kind: kind, slot: slot)
            }
            return inode
        } catch {
            volume.abandon(change)
            table.withTrackedLock { $0.release(number) }
            throw error
        }
    }

    /// Drops the one name of `target` in `change` (whose directory-slot records are already in it)
    /// and commits: a file still open or mapped becomes an orphan, anything else is freed.
    private func unlink(_ target: Inode, change: inout PendingChange, what: String) throws {
        try target.contents.write { contents in
            try target.users.withTrackedLock { users in
                if users.handles > 0 || users.mappings > 0 {
                    try orphans.withTrackedLock { orphans in
                        var record = contents.record
                        record.linkCount = 0
                        record.nextOrphan = orphans.first ?? 0
                        record.changeTime = WallClock.nanosecondsSinceEpoch
                        change.store(
                            record, extents: contents.extents, of: target.number, superblock: volume.superblock)
                        var sb = volume.superblock
                        sb.orphanHead = target.number
                        change.transaction.write(sb.encode(), at: 0)
                        try volume.commit(change, what: what)
                        contents.record = record
                        orphans.insert(target.number, at: 0)
                    }
                } else {
                    volume.freeInode(contents, change: &change)
                    try volume.commit(change, what: what)
                    contents.record.linkCount = 0
                    contents.isFreed = true
                    users.reclaimed = true
                    table.withTrackedLock { $0.release(target.number) }
                }
            }
        }
    }

    /// Frees an orphan whose last handle or mapping went: one transaction takes it off the orphan
    /// list and frees its blocks and inode.
    func reclaim(_ inode: Inode) throws {
        // Shared with lookups. `unmount` frees every orphan itself, holding the lock exclusively
        // after it cleared the mounted flag: nothing is committed once it has let go.
        try lock.withReadLock {
            guard volume.isMounted else { return }
            try reclaimLocked(inode)
        }
    }

    /// ``reclaim(_:)`` with the namespace lock held (shared or exclusively).
    func reclaimLocked(_ inode: Inode) throws {
        while true {
            // The orphan before this one on the list, whose `next` must change: found without
            // holding any inode lock, then locked first. Locks go in list order (the predecessor,
            // then this inode); the list only grows at its head, so that order never inverts.
            enum Position {
                case absent, head
                case after(Inode)
            }
            // Looked up under the orphans lock: an orphan on the list is in the table until the
            // reclaim that takes it off, which needs this lock too.
            let position: Position = orphans.withTrackedLock { orphans in
                guard let index = orphans.firstIndex(of: inode.number) else { return .absent }
                guard index > 0 else { return .head }
                return table.withTrackedLock { $0.inodes[orphans[index - 1]] }.map(Position.after) ?? .absent
            }
            let previous: Inode?
            switch position {
            case .absent: return
            case .head: previous = nil
            case .after(let inode): previous = inode
            }
            let done = try withWriteLock(of: previous) { previousContents in
                try inode.contents.write { contents in
                    try orphans.withTrackedLock { orphans -> Bool in
                        guard let index = orphans.firstIndex(of: inode.number) else { return true }
                        guard (index == 0 ? nil : orphans[index - 1]) == previous?.number else { return false }
                        var change = PendingChange()
                        let next = index + 1 < orphans.count ? orphans[index + 1] : 0
                        var previousRecord: InodeRecord?
                        if let previousContents {
                            var record = previousContents.record
                            record.nextOrphan = next
                            previousRecord = record
                            change.store(
                                record, extents: previousContents.extents, of: previousContents.number,
                                superblock: volume.superblock)
                        } else {
                            var sb = volume.superblock
                            sb.orphanHead = next
                            change.transaction.write(sb.encode(), at: 0)
                        }
                        volume.freeInode(contents, change: &change)
                        try volume.commit(change, what: "free removed file \(inode.number)")
                        if let previousRecord { previousContents?.record = previousRecord }
                        orphans.remove(at: index)
                        contents.extents = ExtentMap()
                        contents.isFreed = true
                        table.withTrackedLock { $0.release(inode.number) }
                        return true
                    }
                }
            }
            // The list changed while nothing was locked: look again.
            if done { return }
        }
    }

    /// Files mapped now.
    var mappedFiles: Int {
        // The table lock is a leaf: take the inodes out, then look at their users.
        let inodes = table.withTrackedLock { Array($0.inodes.values) }
        return inodes.filter { $0.users.withTrackedLock { $0.mappings > 0 } }.count
    }

    /// Regular files (removed ones still open included) and directories.
    var fileCounts: (files: Int, directories: Int) {
        table.withTrackedLock { table in
            table.inodes.values.reduce(into: (0, 0)) { counts, inode in
                if inode.isDirectory { counts.1 += 1 } else { counts.0 += 1 }
            }
        }
    }

    /// Unmount, with the namespace lock held exclusively and every handle closed: frees the removed
    /// files that were open, now that nothing holds them. A failure (the journal fails only on a
    /// closed device) leaves the orphan for the next mount to free. A read-only mount changes
    /// nothing: the next read-write mount frees them.
    func reclaimOrphansAtUnmount() {
        for number in orphans.withTrackedLock({ volume.access == .readWrite ? $0 : [] }) {
            if let inode = table.withTrackedLock({ $0.inodes[number] }) { try? reclaimLocked(inode) }
        }
    }

    /// Mount: frees what the orphan list still holds (files removed while open before a crash).
    func reclaimOrphansAtMount() throws {
        for number in orphans.withTrackedLock({ $0 }) {
            let inode = try self.inode(number)
            inode.users.withTrackedLock { $0.reclaimed = true }
            try reclaim(inode)
        }
    }

    /// Called when a handle or mapping of `inode` goes: frees an orphan nobody uses any more, at
    /// once, or at the end of the operation the calling thread is inside (see ``OperationDepth``).
    func releaseUser(_ inode: Inode, handle: Bool) {
        let reclaimNow = inode.users.withTrackedLock { users -> Bool in
            if handle { users.handles -= 1 } else { users.mappings -= 1 }
            guard users.handles == 0, users.mappings == 0, !users.reclaimed,
                orphans.withTrackedLock({ $0.contains(inode.number) })
            else { return false }
            users.reclaimed = true
            return true
        }
        guard reclaimNow, volume.isMounted, volume.access == .readWrite else { return }
        guard OperationDepth.current == 0 else {
            deferred.withTrackedLock { $0.append(inode) }
            return
        }
        // A failure here (the journal cannot fail short of a closed device) leaves the orphan on the
        // list; the next mount frees it.
        try? reclaim(inode)
    }

    /// Runs a file system operation: a removed file whose last user goes during it is freed when
    /// the outermost operation of the thread ends, with no lock held (and so are files deferred
    /// by an earlier operation on this thread that belonged to another file system's).
    func run<T: ~Copyable>(_ body: () throws -> T) rethrows -> T {
        let outermost = OperationDepth.current == 0
        defer { if outermost { reclaimDeferred() } }
        return try OperationDepth.inside(body)
    }

    /// Frees the orphans whose reclaim was deferred.
    func reclaimDeferred() {
        while let inode = deferred.withTrackedLock({ $0.popLast() }) { try? reclaim(inode) }
    }
}
