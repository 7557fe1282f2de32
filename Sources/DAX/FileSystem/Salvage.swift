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
    var actions: [String] = []
    /// Device offset and bytes, in the order they must reach the device.
    var writes: [(offset: Int, bytes: [UInt8])] = []
    /// Runs of `writes` that must reach the device in one transaction: decisions that a prefix
    /// would change (clearing one of two inodes that share a block would let the next plan keep
    /// the other).
    var atomicRuns: [Range<Int>] = []
    /// Paths given to what had no name.
    var lostAndFound: [String] = []
    var kept: [UInt32: Kept] = [:]
    /// Why an inode was dropped.
    var dropped: [UInt32: String] = [:]
    /// Each directory's entries, in slot order.
    var entries: [UInt32: [Entry]] = [:]
    /// Each directory's free slots (device offsets), lowest first.
    var freeSlots: [UInt32: [Int]] = [:]
    /// The inode owning each data block, 0 when none.
    var owners: [UInt32]
    var allocationCursor = 0
    /// The name in the root of the directory that takes what has no name.
    var homeName = "lost+found"
    let now = WallClock.nanosecondsSinceEpoch

    /// Which byte ranges of a sparse device hold data (the rest reads as zeros); nil: all of it.
    let dataRanges: ((Range<Int>) -> [Range<Int>])?

    private init(base: UnsafeRawPointer, superblock: Superblock, dataRanges: ((Range<Int>) -> [Range<Int>])?) {
        self.base = base
        self.superblock = superblock
        self.dataRanges = dataRanges
        owners = [UInt32](repeating: 0, count: Int(superblock.dataBlocks))
    }

    /// The plan for the device at `base` (its journal already empty). Throws `.noSpace` when
    /// there is no free inode or block for `/lost+found`. `dataRanges` says what a sparse device
    /// holds: the inode table's holes are free inodes and are not read (a read of a hole of a
    /// tmpfs file gives it a page of memory).
    static func plan(
        base: UnsafeRawPointer, superblock: Superblock, dataRanges: ((Range<Int>) -> [Range<Int>])? = nil
    ) throws -> Salvage {
        var salvage = Salvage(base: base, superblock: superblock, dataRanges: dataRanges)
        salvage.salvageInodes()
        salvage.dropConflicts()
        salvage.salvageRoot()
        salvage.cutDirectoryHoles()
        salvage.salvageDirectorySlots()
        try salvage.rebuildTree()
        salvage.writeRecords()
        try salvage.rebuildSharedTable()
        salvage.rebuildBitmap()
        salvage.emptyOrphanList()
        return salvage
    }

    mutating func say(_ action: String) { actions.append(action) }

    func reader(block: UInt64) -> ByteReader {
        ByteReader(base + Int(block) * Superblock.blockSize, count: Superblock.blockSize)
    }

    static func describe(_ kind: InodeRecord.Kind) -> String { kind == .directory ? "directory" : "file" }

    /// Clears inode `number` on the device and forgets it.
    mutating func drop(_ number: UInt32, _ why: String) {
        writes.append((superblock.inodeOffset(number), InodeRecord().encode()))
        if let gone = kept.removeValue(forKey: number) {
            for range in gone.blockRanges { setOwner(range, to: 0, ifOwnedBy: number) }
        }
        dropped[number] = why
    }

    mutating func setOwner(_ blocks: Range<UInt64>, to owner: UInt32, ifOwnedBy previous: UInt32? = nil) {
        for block in blocks {
            let index = Int(block - superblock.dataStart)
            if previous == nil || owners[index] == previous { owners[index] = owner }
        }
    }

    // MARK: Inodes

    /// The inode numbers whose records may hold something: all of them, or on a sparse device
    /// those whose slot lies in data (a hole reads as zeros, a free inode).
    func storedInodes() -> [ClosedRange<UInt32>] {
        let all = 1...UInt32(superblock.inodeCount)
        guard let dataRanges else { return [all] }
        let first = superblock.inodeOffset(1)
        let end = superblock.inodeOffset(UInt32(superblock.inodeCount)) + Superblock.inodeSize
        return dataRanges(first..<end).compactMap { range in
            let low = UInt32((range.lowerBound - first) / Superblock.inodeSize) + 1
            let high = UInt32((range.upperBound - first + Superblock.inodeSize - 1) / Superblock.inodeSize)
            return low <= high ? max(low, 1)...min(high, UInt32(superblock.inodeCount)) : nil
        }
    }

    mutating func salvageInodes() {
        for number in storedInodes().joined() {
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
    func loadExtents(_ number: UInt32, _ record: InodeRecord) -> Result<(ExtentMap, [UInt64]), InodeProblem> {
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
                return .failure(
                    .field(
                        "extent leaf chain (it does not end after \(counted(record.leafCount, "leaf", plural: "leaves")))"
                    ))
            }
            map = ExtentMap(leaves: leaves)
        }
        let extents = map.allExtents
        guard UInt32(extents.count) == record.extentCount else {
            return .failure(
                .field("extent count (\(counted(extents.count, "extent")), the record says \(record.extentCount))"))
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

    /// Blocks claimed twice: no claimant can be trusted, unless it is a data block that the
    /// shared-block table lists as shared; its count is rebuilt afterwards. When the table
    /// itself is damaged (a device that keeps one, but it cannot be read), nothing says which
    /// data blocks were shared, so every data block that extents of several files name is taken
    /// as shared: the files keep their bytes, copy-on-write from then on, rather than all of them
    /// being cleared because a table that only counts references was lost.
    mutating func dropConflicts() {
        var conflicts: [UInt32: (block: UInt64, other: UInt32)] = [:]
        var leaves = Set<Int>()
        let table = readSharedTable()
        let tableLost = table == nil
        let listed = (table ?? []).sorted { $0.start < $1.start }
        func isListed(_ block: UInt64) -> Bool {
            var low = 0
            var high = listed.count
            while low < high {
                let middle = (low + high) / 2
                if listed[middle].end <= block { low = middle + 1 } else { high = middle }
            }
            return low < listed.count && listed[low].start <= block
        }
        for number in kept.keys.sorted() {
            let inode = kept[number]!
            let data = inode.extents.allExtents.map { ($0.physical..<$0.physicalEnd, false) }
            for (range, isLeaf) in data + inode.leaves.map({ ($0..<($0 + 1), true) }) {
                for block in range {
                    let index = Int(block - superblock.dataStart)
                    let other = owners[index]
                    if other == 0 {
                        owners[index] = number
                        if isLeaf { leaves.insert(index) }
                    } else if isLeaf || leaves.contains(index) || (!tableLost && !isListed(block)) {
                        conflicts[number] = conflicts[number] ?? (block, other)
                        conflicts[other] = conflicts[other] ?? (block, number)
                    }
                }
            }
        }
        let first = writes.count
        defer { if writes.count > first { atomicRuns.append(first..<writes.count) } }
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
                    "inode \(number): its record says \(counted(inode.record.blockCount, "block")), its extents map "
                        + "\(inode.extents.blockCount); corrected the record")
                fixed.record.blockCount = inode.extents.blockCount
                fixed.changed = true
            }
            let pages = (inode.record.size + UInt64(Superblock.blockSize) - 1) / UInt64(Superblock.blockSize)
            if inode.record.kind == .file, inode.extents.endPage > pages {
                let size = inode.extents.endPage * UInt64(Superblock.blockSize)
                say(
                    "file inode \(number): blocks are mapped past its size \(inode.record.size); made it \(counted(size, "byte"))"
                )
                fixed.record.size = size
                fixed.changed = true
            }
            kept[number] = fixed
        }
    }

    mutating func salvageRoot() {
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

    func newDirectoryRecord(parent: UInt32, generation: UInt32) -> InodeRecord {
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
    mutating func cutDirectoryHoles() {
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
                    say(
                        "directory \(number) has a hole at block \(pages); cleared it (what it held goes to /lost+found)"
                    )
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
                say("directory \(number) has size \(inode.record.size) for \(counted(pages, "block")); made it \(size)")
                kept[number]?.record.size = size
                kept[number]?.changed = true
            }
        }
    }

    mutating func salvageDirectorySlots() {
        for number in kept.keys.sorted() {
            guard let inode = kept[number], inode.record.kind == .directory else { continue }
            entries[number] = []
            freeSlots[number] = []
            var names = Set<[UInt8]>()
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
                        let quoted = Paths.quoted(String(decoding: name, as: UTF8.self))
                        if let target = kept[child], target.record.kind == kind {
                            if !names.insert(name).inserted {
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

    mutating func clearSlot(_ offset: Int, of directory: UInt32) {
        writes.append((offset, DirectoryFormat.emptySlot))
        freeSlots[directory, default: []].append(offset)
    }

    static func emptyDirectoryBlock(owner: UInt32, index: UInt32) -> [UInt8] {
        DirectoryFormat.header(owner: owner, index: index)
            + [UInt8](repeating: 0, count: Superblock.blockSize - DirectoryFormat.headerSize)
    }
}
