/// reflink and snapshots: a new file (or tree) whose extents name the source's blocks, each of
/// which gains a reference, in one transaction. Which pages may be shared is decided page by page
/// by a freeze at the count the page's mappings explain; a page that will not freeze is pinned,
/// and the ``PinnedPagePolicy`` says what becomes of it.
extension Namespace {
    /// What a clone asks the mapping layer to do for each source file before looking at its
    /// pages, under the file's inode lock: make stores through its mappings durable and
    /// write-protect them.
    typealias CloneSourcePreparation = (Inode, inout Inode.Contents) -> CloneSource

    /// What the mapping layer says of a source file it prepared, under the file's inode lock.
    struct CloneSource {
        /// File pages that must not be shared (shown writable by a mapping that cannot be
        /// write-protected): they are copied as pinned pages are.
        var unshareable: Set<UInt64> = []
        /// No mapping shows the file. A new one needs the inode lock the clone holds, and a pin
        /// is taken through a mapping, so no page that only this file names can gain a pin while
        /// the clone looks: a look at such a page's counts stands for its freeze. A block the
        /// file shares with another is still frozen, since that file's mappings may pin it.
        var unmapped = false
    }

    /// One node of the tree being cloned.
    private struct Node {
        var source: Inode
        var number: UInt32
        var name: [UInt8]
        var parent: UInt32
        var record = InodeRecord()
        var extents = ExtentMap()
        var directory: DirectoryIndex?
        /// What the mapping layer said of the source file (see ``CloneSource``).
        var prepared = CloneSource()
    }

    /// Thrown inside a clone when a pinned page under `.wait` means trying again later.
    struct PinnedDuringClone: Error {
        var frames: [UInt64]
    }

    /// Clones `source` (a file, or a directory with its tree) to `destination`, which must not
    /// exist, in one transaction. Frozen pages stay frozen until the commit is done.
    func clone(
        _ source: String, to destination: String, ifPinned policy: PinnedPagePolicy,
        prepare: CloneSourcePreparation
    ) throws {
        try operation(exclusive: true, "clone", source, to: destination) {
            guard volume.shared.canShare else {
                throw DAXError(
                    .unsupported,
                    "the device was formatted as version \(volume.superblock.version), which keeps no "
                        + "shared-block counts; format it again to share blocks")
            }
            let (sourceParent, sourceName) = try Paths.split(source, what: "clone")
            let sourceEntry = try resolveDirectory(sourceParent, path: source).contents.read { directory in
                guard let entry = directory.directory?.entries[sourceName] else {
                    throw DAXError(.notFound, "no such file or directory: \(Paths.quoted(source))")
                }
                return entry
            }
            try Paths.checkTrailingSlash(source, kind: sourceEntry.kind, what: "clone")
            try Paths.checkTrailingSlash(destination, kind: sourceEntry.kind, what: "clone a file to")
            let (parentPath, name) = try Paths.split(destination, what: "clone to")
            let parent = try resolveDirectory(parentPath, path: destination)
            guard parent.contents.read({ $0.directory?.entries[name] }) == nil else {
                throw DAXError(.alreadyExists, "\(Paths.quoted(destination)) already exists")
            }
            if sourceEntry.kind == .directory, try isInside(parent, sourceEntry.inode) {
                throw DAXError(
                    .invalidArgument,
                    "\(Paths.quoted(destination)) lies inside \(Paths.quoted(source)), the tree cloned")
            }
            // The tree, parents before children, each with a new inode number.
            var nodes: [Node] = []
            defer {
                if !nodes.isEmpty {
                    table.withTrackedLock { table in for node in nodes { table.release(node.number) } }
                }
            }
            try collect(try inode(sourceEntry.inode), name: name, parent: parent.number, into: &nodes)
            let deadline: Deadline? =
                if case .wait(let timeout) = policy { Deadline(after: timeout) } else { nil }
            while true {
                do {
                    try cloneLocked(&nodes, into: parent, policy: policy, prepare: prepare, path: destination)
                    nodes = []  // installed: their numbers stay taken
                    return
                } catch let pinned as PinnedDuringClone {
                    // `.wait`: let go of everything, wait for the pins to drop, look again.
                    guard let deadline, !deadline.hasPassed else {
                        throw DAXError(
                            .timedOut,
                            "\(counted(pinned.frames.count, "page")) of \(Paths.quoted(source)) stayed pinned")
                    }
                    _ = volume.device.pages.waitUntil(pinned.frames, deadline: deadline) { PageWord.pinCount($0) == 0 }
                }
            }
        }
    }

    /// Whether `directory` is `ancestor` or lies inside it.
    private func isInside(_ directory: Inode, _ ancestor: UInt32) throws -> Bool {
        var current = directory
        while true {
            if current.number == ancestor { return true }
            if current.number == Superblock.rootInode { return false }
            current = try inode(current.contents.read { $0.record.parent })
        }
    }

    /// Adds `source` and, for a directory, its tree to `nodes`, each with a new inode number.
    private func collect(_ source: Inode, name: [UInt8], parent: UInt32, into nodes: inout [Node]) throws {
        guard let number = table.withTrackedLock({ $0.takeNumber() }) else {
            throw DAXError(.noSpace, "all \(countedAre(volume.superblock.inodeCount, "inode")) in use")
        }
        nodes.append(Node(source: source, number: number, name: name, parent: parent))
        guard source.isDirectory else { return }
        let entries = source.contents.read { $0.directory?.entries ?? [:] }
        for (childName, entry) in entries.sorted(by: { $0.key.lexicographicallyPrecedes($1.key) }) {
            try collect(try inode(entry.inode), name: childName, parent: number, into: &nodes)
        }
    }

    /// Holds every source file's inode lock (in inode-number order), builds the new inodes, and
    /// commits them with the destination's name.
    private func cloneLocked(
        _ nodes: inout [Node], into parent: Inode, policy: PinnedPagePolicy, prepare: CloneSourcePreparation,
        path: String
    ) throws {
        let files = nodes.indices.filter { !nodes[$0].source.isDirectory }
            .sorted { nodes[$0].source.number < nodes[$1].source.number }
        var change = PendingChange()
        do {
            try withSourcesLocked(files[...], &nodes, prepare: prepare, path: path) { nodes in
                // Thawed while the source files are still locked: a fault or pin that comes
                // after the locks finds every page as it was, shared or copied.
                var frozen: [PageRun] = []
                defer { for run in frozen { volume.device.pages.unfreeze(run) } }
                try buildAndCommit(&nodes, into: parent, policy: policy, change: &change, frozen: &frozen, path: path)
            }
        } catch {
            volume.abandon(change)
            throw error
        }
    }

    /// Runs `body` holding the inode locks of `files` (indexes into `nodes`) exclusively, each
    /// prepared as it is taken and its record and extents copied into its node. Recursive: one
    /// lock per level.
    private func withSourcesLocked(
        _ files: ArraySlice<Int>, _ nodes: inout [Node], prepare: CloneSourcePreparation, path: String,
        _ body: (inout [Node]) throws -> Void
    ) throws {
        guard let first = files.first else {
            try body(&nodes)
            return
        }
        let source = nodes[first].source
        try source.contents.write { contents in
            try contents.checkLive(path)
            nodes[first].prepared = prepare(source, &contents)
            nodes[first].record = contents.record
            nodes[first].extents = contents.extents
            try withSourcesLocked(files.dropFirst(), &nodes, prepare: prepare, path: path, body)
        }
    }

    /// The extents of a clone of `node`'s file: shared where each page froze (kept frozen until
    /// after the commit, so that no pin comes between the look and the sharing), copied into new
    /// blocks where it is pinned and the policy says `.copy`. Page by page only where a page must
    /// be looked at: a freeze is one compare-and-swap, and runs of shared pages grow in place. A
    /// file no mapping shows needs no freeze (``CloneSource/unmapped``) where it alone names the
    /// blocks: each page is only looked at, one load.
    private func cloneExtents(
        _ node: Node, policy: PinnedPagePolicy, change: inout PendingChange, frozen: inout [PageRun]
    ) throws -> [Extent] {
        let pages = volume.device.pages
        var shared: [Extent] = []
        var copied: [Extent] = []
        var pinned: [UInt64] = []
        let unsafe: Bool = if case .unsafeShare = policy { true } else { false }
        let anyUnshareable = !node.prepared.unshareable.isEmpty
        func share(_ page: UInt64, _ block: UInt64, _ length: UInt64) {
            if let last = shared.last, last.logicalEnd == page, last.physicalEnd == block,
                last.length + length <= Extent.maximumLength
            {
                shared[shared.count - 1].length += length
            } else {
                shared.append(Extent(logical: page, physical: block, length: length))
            }
        }
        for extent in node.extents.allExtents {
            // Only this file names the extent's blocks and no mapping shows it: a look will do.
            let looks =
                node.prepared.unmapped
                && (volume.shared.noneShared || !volume.shared.isShared(extent.physical..<extent.physicalEnd))
            var page = extent.logical
            while page < extent.logicalEnd {
                let block = extent.block(for: page)
                // The common case: a run of pages that all freeze, shared as one piece.
                if !anyUnshareable, !unsafe {
                    let left = Int(extent.logicalEnd - page)
                    let idle: UInt64
                    if looks {
                        idle = UInt64(pages.idleExceptMappings(run: block, count: left))
                    } else {
                        idle = UInt64(pages.freezeAtMappings(run: block, count: left))
                        if idle > 0 { frozen.append(page: block, count: idle) }
                    }
                    if idle > 0 {
                        share(page, block, idle)
                        page += idle
                        continue
                    }
                }
                let mayShare = !anyUnshareable || !node.prepared.unshareable.contains(page)
                if mayShare, unsafe || pages.freezeAtMappings(PageFrameNumber(rawValue: block)) {
                    if !unsafe { frozen.append(page: block, count: 1) }
                    share(page, block, 1)
                    page += 1
                    continue
                }
                defer { page += 1 }
                // Pinned (or shown writable where stores cannot be caught).
                switch policy {
                case .fail:
                    throw DAXError(
                        .busy, "page \(page) of the source is pinned (a device holds it); nothing was cloned")
                case .wait:
                    if mayShare {
                        pinned.append(block)
                        continue
                    }
                case .copy, .unsafeShare:
                    break
                }
                let runs = try volume.allocateBacked(1, goal: nil, inode: node.number, firstIndex: page)
                change.allocate(runs, superblock: volume.superblock)
                volume.device.copy(
                    UnsafeRawBufferPointer(
                        start: volume.device.base + Int(block) * Superblock.blockSize, count: Superblock.blockSize),
                    at: Int(runs[0].start) * Superblock.blockSize, flags: [.nonTemporal, .noDrain])
                copied.append(Extent(logical: page, physical: runs[0].start, length: 1))
            }
        }
        if !pinned.isEmpty { throw PinnedDuringClone(frames: pinned) }
        change.reference(shared)
        guard !copied.isEmpty else { return shared }
        return ExtentMap.merged((shared + copied).sorted { $0.logical < $1.logical })
    }

    /// Builds every new inode (files share or copy, directories get new blocks naming the new
    /// inodes), the destination's name, and commits them in one transaction.
    private func buildAndCommit(
        _ nodes: inout [Node], into parent: Inode, policy: PinnedPagePolicy, change: inout PendingChange,
        frozen: inout [PageRun], path: String
    ) throws {
        let now = WallClock.nanosecondsSinceEpoch
        let superblock = volume.superblock
        // Children of each new directory, by the new number.
        var children: [UInt32: [Int]] = [:]
        for index in nodes.indices.dropFirst() { children[nodes[index].parent, default: []].append(index) }
        for index in nodes.indices {
            var record = InodeRecord()
            record.kind = nodes[index].source.kind
            record.linkCount = 1
            let old = ByteReader(
                volume.device.base + superblock.inodeOffset(nodes[index].number), count: Superblock.inodeSize)
            record.generation = old.get(UInt32.self, at: 12) &+ 1
            record.modificationTime = now
            record.changeTime = now
            var map = ExtentMap()
            if record.kind == .file {
                record.size = nodes[index].record.size
                let extents = try cloneExtents(nodes[index], policy: policy, change: &change, frozen: &frozen)
                if let end = extents.last?.logicalEnd {
                    try volume.editExtents(
                        &map, of: nodes[index].number, replacing: 0..<end, with: extents, change: &change)
                }
            } else {
                record.parent = nodes[index].parent
                let mine = children[nodes[index].number] ?? []
                var directory = DirectoryIndex()
                let blocks = (mine.count + DirectoryFormat.slotsPerBlock - 1) / DirectoryFormat.slotsPerBlock
                if blocks > 0 {
                    let runs = try volume.allocateBacked(blocks, goal: nil, inode: nodes[index].number, firstIndex: nil)
                    change.allocate(runs, superblock: superblock)
                    let physical = runs.flatMap { Array($0.range) }
                    for (page, block) in physical.enumerated() {
                        volume.device.fill(
                            at: Int(block) * Superblock.blockSize, count: Superblock.blockSize, flags: .noDrain)
                        DirectoryFormat.header(owner: nodes[index].number, index: UInt32(page)).withUnsafeBytes {
                            volume.device.copy($0, at: Int(block) * Superblock.blockSize, flags: .noDrain)
                        }
                        directory.addBlock()
                    }
                    for child in mine {
                        let slot = directory.freeSlots.last!
                        directory.take(slot)
                        let kind = nodes[child].source.kind
                        directory.entries[nodes[child].name] = DirectoryIndex.Entry(
                            inode: nodes[child].number, kind: kind, slot: slot)
                        DirectoryFormat.encodeSlot(inode: nodes[child].number, name: nodes[child].name, kind: kind)
                            .withUnsafeBytes {
                                volume.device.copy(
                                    $0,
                                    at: Int(physical[slot.block]) * Superblock.blockSize
                                        + DirectoryFormat.slotOffset(slot.slot), flags: .noDrain)
                            }
                    }
                    let extents = runs.reduce(into: [Extent]()) { extents, run in
                        extents.append(
                            Extent(logical: extents.last?.logicalEnd ?? 0, physical: run.start, length: run.count))
                    }
                    try volume.editExtents(
                        &map, of: nodes[index].number, replacing: 0..<UInt64(blocks), with: extents, change: &change)
                }
                record.size = UInt64(blocks) * UInt64(Superblock.blockSize)
                nodes[index].directory = directory
            }
            nodes[index].record = record
            nodes[index].extents = map
            change.store(record, extents: map, of: nodes[index].number, superblock: superblock)
        }
        // The destination's name, as create writes it.
        let top = nodes[0]
        let (slot, parentExtents) = try parent.contents.read { try planSlot(in: $0, change: &change) }
        change.transaction.write(
            DirectoryFormat.encodeSlot(inode: top.number, name: top.name, kind: top.source.kind),
            at: parent.contents.read { slotOffset($0, slot, extents: parentExtents) })
        volume.device.drain()
        try volume.commit(change, what: "clone to \(Paths.quoted(path))")
        for node in nodes {
            table.withTrackedLock {
                $0.insert(
                    Inode(number: node.number, record: node.record, extents: node.extents, directory: node.directory))
            }
        }
        parent.contents.write { parent in
            installSlot(in: &parent, extents: parentExtents)
            parent.directory?.take(slot)
            parent.directory?.entries[top.name] = DirectoryIndex.Entry(
                inode: top.number, kind: top.source.kind, slot: slot)
        }
    }
}

/// What ``DAXFileSystem/clone(_:to:ifPinned:)`` does with pages of the source that are pinned.
public enum PinnedPagePolicy: Sendable {
    /// Pinned pages are copied into the clone now; the pinned frames stay with the source (fork's
    /// early copy of pinned pages).
    case copy
    /// `.busy`, nothing changes.
    case fail
    /// Until no page of the source is pinned; `.timedOut` changes nothing.
    case wait(timeout: Duration)
    /// Share pinned pages anyway, as a file system that ignores pins would: a device writing by
    /// frame changes the clone too.
    case unsafeShare
}
