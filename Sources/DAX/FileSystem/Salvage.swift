/// Plans a repair: reads every structure leniently, keeps what can be trusted, and lists the
/// writes that make the rest consistent, each with the sentence that says why. It writes nothing;
/// ``DAXFileSystem/repair(_:)`` commits the writes in the order planned, which is an order in
/// which any prefix is a device that a new plan repairs (everything here is derived again from
/// what the device holds).
struct Salvage {
    struct Kept {
        var record: InodeRecord
        var extents: ExtentMap
        /// Extent leaf blocks.
        var leaves: [UInt64]
        /// The record must be written.
        var changed = false

        /// Every block the inode owns: its extents' blocks and its leaves.
        var blockRanges: [Range<UInt64>] {
            extents.allExtents.map { $0.physical..<$0.physicalEnd } + leaves.map { $0..<($0 + 1) }
        }
    }

    struct Entry {
        var name: [UInt8]
        var child: UInt32
        var kind: InodeRecord.Kind
        /// Device offset of the slot.
        var offset: Int
    }

    let base: UnsafeRawPointer
    let superblock: Superblock
    private(set) var actions: [String] = []
    /// Device offset and bytes, in the order they must reach the device.
    private(set) var writes: [(offset: Int, bytes: [UInt8])] = []
    /// Paths given to what had no name.
    private(set) var lostAndFound: [String] = []
    private var kept: [UInt32: Kept] = [:]
    /// Why an inode was dropped.
    private var dropped: [UInt32: String] = [:]
    /// Each directory's entries, in slot order.
    private var entries: [UInt32: [Entry]] = [:]
    /// Each directory's free slots (device offsets), lowest first.
    private var freeSlots: [UInt32: [Int]] = [:]
    /// The inode owning each data block, 0 when none.
    private var owners: [UInt32]
    private var allocationCursor = 0
    /// The name in the root of the directory that takes what has no name.
    private var homeName = "lost+found"
    private let now = Clock.realtimeNanoseconds

    private init(base: UnsafeRawPointer, superblock: Superblock) {
        self.base = base
        self.superblock = superblock
        owners = [UInt32](repeating: 0, count: Int(superblock.dataBlocks))
    }

    /// The plan for the device at `base` (its journal already empty). Throws `.noSpace` when
    /// there is no free inode or block for `/lost+found`.
    static func plan(base: UnsafeRawPointer, superblock: Superblock) throws -> Salvage {
        var salvage = Salvage(base: base, superblock: superblock)
        salvage.salvageInodes()
        salvage.dropConflicts()
        salvage.salvageRoot()
        salvage.cutDirectoryHoles()
        salvage.salvageDirectorySlots()
        try salvage.rebuildTree()
        salvage.writeRecords()
        salvage.rebuildBitmap()
        salvage.emptyOrphanList()
        return salvage
    }

    private mutating func say(_ action: String) { actions.append(action) }

    private func reader(block: UInt64) -> ByteReader {
        ByteReader(base + Int(block) * Superblock.blockSize, count: Superblock.blockSize)
    }

    private static func describe(_ kind: InodeRecord.Kind) -> String { kind == .directory ? "directory" : "file" }

    /// Clears inode `number` on the device and forgets it.
    private mutating func drop(_ number: UInt32, _ why: String) {
        writes.append((superblock.inodeOffset(number), InodeRecord().encode()))
        if let gone = kept.removeValue(forKey: number) {
            for range in gone.blockRanges { setOwner(range, to: 0, ifOwnedBy: number) }
        }
        dropped[number] = why
    }

    private mutating func setOwner(_ blocks: Range<UInt64>, to owner: UInt32, ifOwnedBy previous: UInt32? = nil) {
        for block in blocks {
            let index = Int(block - superblock.dataStart)
            if previous == nil || owners[index] == previous { owners[index] = owner }
        }
    }

    // MARK: Inodes

    private mutating func salvageInodes() {
        for number in 1...UInt32(superblock.inodeCount) {
            let reader = ByteReader(base + superblock.inodeOffset(number), count: Superblock.inodeSize)
            switch InodeRecord.decode(reader) {
            case .failure(let reason):
                say("inode \(number) is damaged (\(reason)); cleared it: what it held is lost")
                drop(number, "it was damaged: \(reason)")
            case .success(let record):
                guard record.kind != .free else { continue }
                switch loadExtents(number, record) {
                case .failure(let reason):
                    say("\(Self.describe(record.kind)) inode \(number): \(reason); cleared it: what it held is lost")
                    drop(number, "it had a \(reason)")
                case .success(let (extents, leaves)):
                    kept[number] = Kept(record: record, extents: extents, leaves: leaves)
                }
            }
        }
    }

    /// The extents of `record`, validated as `check` does, or why they cannot be trusted.
    private func loadExtents(_ number: UInt32, _ record: InodeRecord) -> Result<(ExtentMap, [UInt64]), InodeProblem> {
        let map: ExtentMap
        var leafBlocks: [UInt64] = []
        if record.leafCount == 0 {
            map = ExtentMap(inline: record.inlineExtents)
        } else {
            var leaves: [ExtentMap.Leaf] = []
            var block = record.firstLeaf
            for index in 0..<Int(min(record.leafCount, UInt32(superblock.dataBlocks))) {
                guard superblock.dataRange.contains(block), !leafBlocks.contains(block) else {
                    return .failure(.field("extent leaf \(index) at block \(block)"))
                }
                switch ExtentLeaf.decode(reader(block: block), owner: number) {
                case .failure(let reason): return .failure(reason)
                case .success(let (extents, next)):
                    leaves.append(ExtentMap.Leaf(block: block, extents: extents))
                    leafBlocks.append(block)
                    block = next
                }
            }
            guard block == 0, leaves.count == Int(record.leafCount) else {
                return .failure(.field("extent leaf chain (it does not end after \(record.leafCount) leaves)"))
            }
            map = ExtentMap(leaves: leaves)
        }
        let extents = map.allExtents
        guard UInt32(extents.count) == record.extentCount else {
            return .failure(.field("extent count (\(extents.count) extents, the record says \(record.extentCount))"))
        }
        for (index, extent) in extents.enumerated() {
            if index > 0, extents[index - 1].logicalEnd > extent.logical {
                return .failure(.field("extents \(index - 1) and \(index), which overlap or are out of order"))
            }
            guard extent.physical >= superblock.dataStart, extent.physicalEnd <= superblock.dataEnd else {
                return .failure(.field("extent \(extent), which lies outside the data region"))
            }
        }
        return .success((map, leafBlocks))
    }

    /// Blocks claimed twice: no claimant can be trusted.
    private mutating func dropConflicts() {
        var conflicts: [UInt32: (block: UInt64, other: UInt32)] = [:]
        for number in kept.keys.sorted() {
            for range in kept[number]!.blockRanges {
                for block in range {
                    let index = Int(block - superblock.dataStart)
                    let other = owners[index]
                    if other != 0 {
                        conflicts[number] = conflicts[number] ?? (block, other)
                        conflicts[other] = conflicts[other] ?? (block, number)
                    } else {
                        owners[index] = number
                    }
                }
            }
        }
        for (number, conflict) in conflicts.sorted(by: { $0.key < $1.key }) {
            let other = conflict.other == number ? "itself" : "inode \(conflict.other)"
            say(
                "inode \(number): block \(conflict.block) is also claimed by \(other); "
                    + "neither can be trusted: cleared inode \(number)")
            drop(number, "it shared block \(conflict.block) with \(other)")
        }
        owners = [UInt32](repeating: 0, count: owners.count)
        for (number, inode) in kept {
            for range in inode.blockRanges { setOwner(range, to: number) }
            var fixed = inode
            if inode.record.blockCount != inode.extents.blockCount {
                say(
                    "inode \(number): its record says \(inode.record.blockCount) blocks, its extents map "
                        + "\(inode.extents.blockCount); corrected the record")
                fixed.record.blockCount = inode.extents.blockCount
                fixed.changed = true
            }
            let pages = (inode.record.size + UInt64(Superblock.blockSize) - 1) / UInt64(Superblock.blockSize)
            if inode.record.kind == .file, inode.extents.endPage > pages {
                let size = inode.extents.endPage * UInt64(Superblock.blockSize)
                say("file inode \(number): blocks are mapped past its size \(inode.record.size); made it \(size) bytes")
                fixed.record.size = size
                fixed.changed = true
            }
            kept[number] = fixed
        }
    }

    private mutating func salvageRoot() {
        let root = Superblock.rootInode
        if let inode = kept[root], inode.record.kind != .directory {
            say("inode \(root) should be the root directory but is a file; cleared it")
            drop(root, "it was not a directory")
        }
        guard kept[root] == nil else { return }
        say("the root directory (inode \(root)) was lost; made a new empty one (what it held goes to /lost+found)")
        kept[root] = Kept(record: newDirectoryRecord(parent: root, generation: 1), extents: ExtentMap(), leaves: [])
        kept[root]?.changed = true
    }

    private func newDirectoryRecord(parent: UInt32, generation: UInt32) -> InodeRecord {
        var record = InodeRecord()
        record.kind = .directory
        record.linkCount = 1
        record.generation = generation
        record.parent = parent
        record.modificationTime = now
        record.changeTime = now
        return record
    }

    // MARK: Directories

    /// A directory's blocks must run from block 0 without a hole: the blocks after one are
    /// dropped (inline extents), or the whole directory (extent leaves, which are not rewritten).
    private mutating func cutDirectoryHoles() {
        for number in kept.keys.sorted() {
            guard let inode = kept[number], inode.record.kind == .directory else { continue }
            let extents = inode.extents.allExtents
            var pages: UInt64 = 0
            var cut: Int?
            for (index, extent) in extents.enumerated() {
                if extent.logical != pages {
                    cut = index
                    break
                }
                pages = extent.logicalEnd
            }
            if let cut {
                guard inode.extents.isInline else {
                    say("directory \(number) has a hole at block \(pages); cleared it (what it held goes to /lost+found)")
                    drop(number, "its blocks had a hole")
                    continue
                }
                for extent in extents[cut...] { setOwner(extent.physical..<extent.physicalEnd, to: 0) }
                kept[number]?.extents = ExtentMap(inline: Array(extents[..<cut]))
                kept[number]?.changed = true
                say("directory \(number) has a hole at block \(pages); dropped its blocks after it")
            }
            let size = pages * UInt64(Superblock.blockSize)
            if kept[number]?.record.size != size {
                say("directory \(number) has size \(inode.record.size) for \(pages) blocks; made it \(size)")
                kept[number]?.record.size = size
                kept[number]?.changed = true
            }
        }
    }

    private mutating func salvageDirectorySlots() {
        for number in kept.keys.sorted() {
            guard let inode = kept[number], inode.record.kind == .directory else { continue }
            entries[number] = []
            freeSlots[number] = []
            for page in 0..<inode.extents.endPage {
                guard let block = inode.extents.extent(containing: page)?.block(for: page) else { continue }
                let blockOffset = Int(block) * Superblock.blockSize
                let blockReader = reader(block: block)
                let slots = (0..<DirectoryFormat.slotsPerBlock).map { blockOffset + DirectoryFormat.slotOffset($0) }
                guard DirectoryFormat.validHeader(blockReader, owner: number, index: UInt32(page)) else {
                    say(
                        "directory \(number) block \(page) (block \(block)) has a bad header; emptied it "
                            + "(its entries are lost: their files go to /lost+found)")
                    writes.append((blockOffset, Self.emptyDirectoryBlock(owner: number, index: UInt32(page))))
                    freeSlots[number]! += slots
                    continue
                }
                for (slot, offset) in slots.enumerated() {
                    let slotReader = ByteReader(base + offset, count: DirectoryFormat.slotSize)
                    switch DirectoryFormat.decodeSlot(slotReader) {
                    case .empty:
                        freeSlots[number]!.append(offset)
                    case .damaged(let reason):
                        say("directory \(number) block \(page) slot \(slot) is damaged (\(reason)); cleared it")
                        clearSlot(offset, of: number)
                    case .entry(let child, let name, let kind):
                        let quoted = Paths.debug(String(decoding: name, as: UTF8.self))
                        if let target = kept[child], target.record.kind == kind {
                            if entries[number]!.contains(where: { $0.name == name }) {
                                say("directory \(number) has a second entry named \(quoted); removed it")
                                clearSlot(offset, of: number)
                            } else {
                                entries[number]!.append(Entry(name: name, child: child, kind: kind, offset: offset))
                            }
                            continue
                        }
                        let why =
                            if let target = kept[child] {
                                "which is a \(Self.describe(target.record.kind)), not a \(Self.describe(kind))"
                            } else if let reason = dropped[child] {
                                "which was cleared (\(reason))"
                            } else {
                                "which is not in use"
                            }
                        say("directory \(number): entry \(quoted) names inode \(child), \(why); removed the entry")
                        clearSlot(offset, of: number)
                    }
                }
            }
        }
    }

    private mutating func clearSlot(_ offset: Int, of directory: UInt32) {
        writes.append((offset, DirectoryFormat.emptySlot))
        freeSlots[directory, default: []].append(offset)
    }

    private static func emptyDirectoryBlock(owner: UInt32, index: UInt32) -> [UInt8] {
        DirectoryFormat.header(owner: owner, index: index)
            + [UInt8](repeating: 0, count: Superblock.blockSize - DirectoryFormat.headerSize)
    }
}

extension Salvage {
    // MARK: Tree, /lost+found, links

    /// Gives every kept inode exactly one name: the first entry found from the root; unnamed ones
    /// go to /lost+found (a removed file, with no links, is freed instead, as mount frees it).
    fileprivate mutating func rebuildTree() throws {
        let root = Superblock.rootInode
        var named: [UInt32: UInt32] = [:]
        var unplaced: [UInt32] = []
        visit(root, named: &named)
        while true {
            let unnamed = kept.keys.filter { $0 != root && named[$0] == nil }.sorted()
            guard !unnamed.isEmpty else { break }
            var referenced = Set<UInt32>()
            for number in unnamed where kept[number]?.record.kind == .directory {
                for entry in entries[number] ?? [] { referenced.insert(entry.child) }
            }
            var tops = unnamed.filter { !referenced.contains($0) }
            if tops.isEmpty {
                // Only cycles of directories are left: cut one open.
                tops = [unnamed.first { kept[$0]?.record.kind == .directory } ?? unnamed[0]]
            }
            for number in tops where named[number] == nil {
                guard let inode = kept[number] else { continue }
                if inode.record.kind == .file, inode.record.linkCount == 0 {
                    say("inode \(number) is a removed file (no links, no name); freed it, as the next mount would")
                    drop(number, "it was a removed file")
                    continue
                }
                unplaced.append(number)
                named[number] = 0
                if inode.record.kind == .directory { visit(number, named: &named) }
            }
        }
        if !unplaced.isEmpty {
            let home = try lostAndFoundDirectory(named: &named)
            for number in unplaced {
                guard let inode = kept[number] else { continue }
                var name = "#\(number)"
                var suffix = 0
                while entries[home]?.contains(where: { $0.name == Array(name.utf8) }) == true {
                    suffix += 1
                    name = "#\(number).\(suffix)"
                }
                try addEntry(to: home, name: Array(name.utf8), child: number, kind: inode.record.kind)
                named[number] = home
                let path = "/\(homeName)/\(name)"
                lostAndFound.append(path)
                let what =
                    inode.record.kind == .directory
                    ? "a directory" : "a file of \(inode.record.size) bytes"
                say("inode \(number) (\(what)) had no name; moved it to \(path)")
            }
        }
        for number in kept.keys.sorted() {
            guard var inode = kept[number] else { continue }
            let parent = number == root ? root : named[number] ?? root
            if inode.record.linkCount != 1 {
                say("inode \(number) had link count \(inode.record.linkCount) for one name; made it 1")
                inode.record.linkCount = 1
                inode.changed = true
            }
            if inode.record.nextOrphan != 0 {
                inode.record.nextOrphan = 0
                inode.changed = true
            }
            if inode.record.kind == .directory, inode.record.parent != parent {
                if unplaced.contains(number) == false {
                    say("directory \(number) named parent \(inode.record.parent) but is in directory \(parent); corrected")
                }
                inode.record.parent = parent
                inode.changed = true
            }
            kept[number] = inode
        }
    }

    /// Names every entry of `directory` and of the directories below it, breadth first; an entry
    /// naming an inode that already has a name is removed (DAXFS has no hard links).
    private mutating func visit(_ directory: UInt32, named: inout [UInt32: UInt32]) {
        var queue = [directory]
        while !queue.isEmpty {
            let current = queue.removeFirst()
            var keptEntries: [Entry] = []
            for entry in entries[current] ?? [] {
                if entry.child == Superblock.rootInode || named[entry.child] != nil {
                    let quoted = Paths.debug(String(decoding: entry.name, as: UTF8.self))
                    say(
                        "directory \(current): entry \(quoted) is a second name for inode \(entry.child) "
                            + "(DAXFS has no hard links); removed the entry")
                    clearSlot(entry.offset, of: current)
                    continue
                }
                named[entry.child] = current
                keptEntries.append(entry)
                if entry.kind == .directory { queue.append(entry.child) }
            }
            entries[current] = keptEntries
        }
    }

    /// The `/lost+found` directory, made (with its name in the root) when there is none. A file
    /// of that name makes it `/lost+found.1` (or the first such name that is free or a directory).
    private mutating func lostAndFoundDirectory(named: inout [UInt32: UInt32]) throws -> UInt32 {
        let root = Superblock.rootInode
        var suffix = 0
        while let entry = entries[root]?.first(where: { $0.name == Array(homeName.utf8) }) {
            if entry.kind == .directory { return entry.child }
            suffix += 1
            homeName = "lost+found.\(suffix)"
        }
        let name = Array(homeName.utf8)
        guard let number = (1...UInt32(superblock.inodeCount)).first(where: { kept[$0] == nil }) else {
            throw DAXError(.noSpace, "no free inode for /\(homeName)")
        }
        kept[number] = Kept(record: newDirectoryRecord(parent: root, generation: 1), extents: ExtentMap(), leaves: [])
        kept[number]?.changed = true
        entries[number] = []
        freeSlots[number] = []
        try addEntry(to: root, name: name, child: number, kind: .directory)
        named[number] = root
        say("made /\(homeName) (inode \(number)) for what has no name")
        return number
    }

    /// Writes an entry into a free slot of `directory`, adding a block when it has none.
    private mutating func addEntry(to directory: UInt32, name: [UInt8], child: UInt32, kind: InodeRecord.Kind) throws {
        if freeSlots[directory, default: []].isEmpty { try addBlock(to: directory) }
        freeSlots[directory]!.sort()
        let offset = freeSlots[directory]!.removeFirst()
        writes.append((offset, DirectoryFormat.encodeSlot(inode: child, name: name, kind: kind)))
        entries[directory, default: []].append(Entry(name: name, child: child, kind: kind, offset: offset))
    }

    private mutating func addBlock(to directory: UInt32) throws {
        guard var inode = kept[directory], inode.extents.isInline else {
            throw DAXError(.noSpace, "directory \(directory) is too fragmented for repair to add a block to it")
        }
        let page = inode.extents.endPage
        let block = try allocateBlock()
        let extents = ExtentMap.merged(inode.extents.allExtents + [Extent(logical: page, physical: block, length: 1)])
        guard extents.count <= InodeRecord.inlineExtentCapacity else {
            throw DAXError(.noSpace, "directory \(directory) is too fragmented for repair to add a block to it")
        }
        owners[Int(block - superblock.dataStart)] = directory
        // Data first: the block is whole on the device before a record links it.
        writes.append((Int(block) * Superblock.blockSize, Self.emptyDirectoryBlock(owner: directory, index: UInt32(page))))
        inode.extents = ExtentMap(inline: extents)
        inode.record.size = (page + 1) * UInt64(Superblock.blockSize)
        inode.record.modificationTime = now
        inode.changed = true
        kept[directory] = inode
        let base = Int(block) * Superblock.blockSize
        freeSlots[directory, default: []] += (0..<DirectoryFormat.slotsPerBlock).map {
            base + DirectoryFormat.slotOffset($0)
        }
    }

    private mutating func allocateBlock() throws -> UInt64 {
        for step in 0..<owners.count {
            let index = (allocationCursor + step) % owners.count
            if owners[index] == 0 {
                allocationCursor = index + 1
                return superblock.dataStart + UInt64(index)
            }
        }
        throw DAXError(.noSpace, "no free block for /\(homeName)")
    }

    // MARK: Records, bitmap, orphan list

    fileprivate mutating func writeRecords() {
        for number in kept.keys.sorted() {
            guard var inode = kept[number], inode.changed else { continue }
            inode.extents.store(into: &inode.record)
            inode.record.changeTime = now
            writes.append((superblock.inodeOffset(number), inode.record.encode()))
        }
    }

    /// Each bitmap block as the owned blocks say it must be; the ones that differ are rewritten.
    fileprivate mutating func rebuildBitmap() {
        let bits = Superblock.bitsPerBitmapBlock
        for bitmapBlock in 0..<Int(superblock.bitmapBlocks) {
            var bytes = [UInt8](repeating: 0, count: Superblock.blockSize)
            let first = bitmapBlock * bits
            for index in first..<min(owners.count, first + bits) where owners[index] != 0 {
                bytes[(index - first) / 8] |= 1 << UInt8((index - first) % 8)
            }
            var sealed = ByteEncoder(count: Superblock.blockSize)
            sealed.put(bytes, at: 0)
            sealed.sealCRC(of: 0..<Superblock.bitmapBytesPerBlock, at: Superblock.bitmapBytesPerBlock)
            let blockReader = reader(block: superblock.bitmapStart + UInt64(bitmapBlock))
            guard blockReader.bytes(0..<Superblock.blockSize) != sealed.bytes else { continue }
            let crcValid =
                blockReader.get(UInt32.self, at: Superblock.bitmapBytesPerBlock)
                == blockReader.crc(of: 0..<Superblock.bitmapBytesPerBlock)
            if crcValid {
                var wrong = 0
                for byte in 0..<Superblock.bitmapBytesPerBlock {
                    wrong += (blockReader.get(UInt8.self, at: byte) ^ sealed.bytes[byte]).nonzeroBitCount
                }
                say("bitmap block \(bitmapBlock): \(wrong) bits disagreed with the extents; rebuilt it from them")
            } else {
                say("bitmap block \(bitmapBlock) is damaged (checksum mismatch); rebuilt it from the extents")
            }
            writes.append(((Int(superblock.bitmapStart) + bitmapBlock) * Superblock.blockSize, sealed.bytes))
        }
    }

    /// Every removed file was freed or given a name: the list is empty.
    fileprivate mutating func emptyOrphanList() {
        guard superblock.orphanHead != 0 else { return }
        var sb = superblock
        sb.orphanHead = 0
        say("emptied the orphan list (its removed files were freed)")
        writes.append((0, sb.encode()))
    }
}
