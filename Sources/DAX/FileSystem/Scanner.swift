/// Reads all metadata from the device and validates it: what `mount` builds DRAM from and what
/// `check` reports on. It never trusts a count, pointer or length before bounding it, so damaged
/// metadata produces problems, never a crash.
struct Scanner {
    struct ScannedInode {
        var record: InodeRecord
        var extents: ExtentMap
        var directory: DirectoryIndex?
    }

    struct Result {
        var inodes: [UInt32: ScannedInode] = [:]
        /// Device bitmap, one bit per data block (lazily zeroed: a huge, empty device costs nothing).
        var bitmap = LazyBitmap(count: 0)
        /// Bits set in ``bitmap``.
        var allocatedBlocks = 0
        var orphans: [UInt32] = []
        /// The shared-block table (nil before format version 3, or when it is damaged).
        var sharedTable: SharedBlockTable?
        /// Inodes that are in use but cannot be loaded (a bad checksum, field or extent), and why.
        var damagedInodes: [UInt32: String] = [:]
        var problems: [String] = []
        /// Problems beyond the first `limit` are only counted.
        var suppressed = 0
    }

    /// The device's bytes, or a private view of them with a pending transaction replayed.
    let base: UnsafeRawPointer
    let superblock: Superblock
    /// The parts of a range of device bytes that hold data; the rest are holes of a sparse device,
    /// which read as zeros and are not read (reading a hole of a tmpfs file through a mapping
    /// would give it memory). nil: everything holds data.
    let dataRanges: ((Range<Int>) -> [Range<Int>])?
    let limit = 50
    private(set) var result = Result()
    /// Owner of each data block, from extents and leaves, and which blocks have one: lazily zeroed,
    /// so that memory follows the blocks in use, not the device's size.
    private let owners: LazyZeroedArray<UInt32>
    private let owned: LazyBitmap
    /// Owned blocks per bitmap block: a bitmap block whose count is 0 needs no comparing.
    private var ownedPerBitmapBlock: [Int: Int] = [:]
    /// Extents naming each shared block (only blocks the table lists are counted).
    private let namings: LazyZeroedArray<UInt32>
    /// What the table says, read before the inodes.
    private var table: SharedBlockTable?

    /// Why block 0's superblock is not used (the backup is), or nil.
    let primaryDamage: String?

    init(
        base: UnsafeRawPointer, superblock: Superblock, primaryDamage: String? = nil,
        dataRanges: ((Range<Int>) -> [Range<Int>])? = nil
    ) {
        self.base = base
        self.superblock = superblock
        self.primaryDamage = primaryDamage
        self.dataRanges = dataRanges
        owners = LazyZeroedArray(count: Int(superblock.dataBlocks))
        owned = LazyBitmap(count: Int(superblock.dataBlocks))
        namings = LazyZeroedArray(count: Int(superblock.dataBlocks))
    }

    /// The blocks of `blocks` that hold data (all of them without ``dataRanges``).
    private func blocksHoldingData(_ blocks: Range<UInt64>) -> [Range<UInt64>] {
        guard let dataRanges else { return [blocks] }
        let size = Superblock.blockSize
        return dataRanges(Int(blocks.lowerBound) * size..<Int(blocks.upperBound) * size).map {
            UInt64($0.lowerBound / size)..<UInt64(($0.upperBound + size - 1) / size)
        }
    }

    /// The last problem found, counted or not.
    private var lastProblem = ""

    private mutating func problem(_ text: String) {
        lastProblem = text
        if result.problems.count < limit { result.problems.append(text) } else { result.suppressed += 1 }
    }

    private func reader(block: UInt64) -> ByteReader {
        ByteReader(base + Int(block) * Superblock.blockSize, count: Superblock.blockSize)
    }

    private func isDataBlock(_ block: UInt64) -> Bool { superblock.dataRange.contains(block) }

    /// Whether a whole block reads as zeros.
    static func isZero(_ block: ByteReader) -> Bool {
        var offset = 0
        while offset + 8 <= block.count {
            guard block.get(UInt64.self, at: offset) == 0 else { return false }
            offset += 8
        }
        return true
    }

    /// Runs every check. `journalMustBeEmpty` is true for `check` of a mounted file system.
    static func scan(
        device: PMemDevice, superblock: Superblock, journalMustBeEmpty: Bool, primaryDamage: String? = nil
    ) -> Result {
        let ranges: ((Range<Int>) -> [Range<Int>])? = device.isSparse ? { device.dataRanges(in: $0) } : nil
        return scan(
            base: device.base, superblock: superblock, journalMustBeEmpty: journalMustBeEmpty,
            primaryDamage: primaryDamage, dataRanges: ranges)
    }

    /// Runs every check on `base`. With `primaryDamage`, `superblock` is the backup: block 0's
    /// damage is a problem, and the orphan list (whose head only block 0 keeps) is not followed.
    /// `dataRanges` says which parts of a sparse device hold data (the rest read as zeros).
    static func scan(
        base: UnsafeRawPointer, superblock: Superblock, journalMustBeEmpty: Bool, primaryDamage: String? = nil,
        dataRanges: ((Range<Int>) -> [Range<Int>])? = nil
    ) -> Result {
        var scanner = Scanner(base: base, superblock: superblock, primaryDamage: primaryDamage, dataRanges: dataRanges)
        scanner.checkSuperblocks()
        if journalMustBeEmpty { scanner.checkJournal() }
        scanner.scanSharedTable()
        scanner.scanInodes()
        scanner.checkSharedCounts()
        scanner.scanDirectories()
        scanner.checkTree()
        scanner.checkOrphans()
        scanner.checkBitmap()
        return scanner.result
    }

    /// Block 0 damaged (the backup is in use), or the backup damaged or different from block 0.
    private mutating func checkSuperblocks() {
        guard let block = superblock.backupBlock else { return }
        if let primaryDamage {
            problem("the superblock in block 0 is damaged (\(primaryDamage)); the backup in block \(block) is used")
            return
        }
        do {
            var backup = try Superblock.decode(
                reader(block: block), deviceBlocks: superblock.totalBlocks, block: block)
            backup.orphanHead = superblock.orphanHead
            if backup != superblock { problem("the backup superblock in block \(block) differs from block 0") }
        } catch let error as DAXError {
            problem(error.message)
        } catch {
            problem("the backup superblock in block \(block): \(error)")
        }
    }

    private mutating func checkJournal() {
        let header = ByteReader(
            base + Int(superblock.journalStart) * Superblock.blockSize, count: Journal.headerSize)
        if header.get(UInt32.self, at: 0) != Journal.headerMagic {
            problem("journal header has a bad magic number")
        } else if header.get(UInt32.self, at: 4) != header.crc(of: 8..<Journal.headerSize) {
            problem("journal header checksum mismatch")
        } else if header.get(UInt32.self, at: 16) != 0 {
            problem("journal holds a transaction that was not applied")
        }
    }

    // MARK: Inodes and extents

    private mutating func scanInodes() {
        // Only inode blocks that hold data: a hole holds free inodes.
        let table = superblock.inodeStart..<(superblock.inodeStart + superblock.inodeBlocks)
        let perBlock = UInt64(Superblock.blockSize / Superblock.inodeSize)
        let count = superblock.inodeCount
        let numbers = blocksHoldingData(table).lazy.flatMap { blocks in
            let first = UInt32((blocks.lowerBound - table.lowerBound) * perBlock + 1)
            let last = UInt32(min((blocks.upperBound - table.lowerBound) * perBlock, count))
            return first...last
        }
        for number in numbers {
            let offset = superblock.inodeOffset(number)
            let reader = ByteReader(base + offset, count: Superblock.inodeSize)
            switch InodeRecord.decode(reader) {
            case .failure(let reason):
                problem("inode \(number): \(reason)")
                result.damagedInodes[number] = "\(reason)"
            case .success(let record):
                guard record.kind != .free else { continue }
                guard let extents = loadExtents(number, record) else {
                    let prefix = "inode \(number): "
                    result.damagedInodes[number] =
                        lastProblem.hasPrefix(prefix) ? String(lastProblem.dropFirst(prefix.count)) : lastProblem
                    continue
                }
                result.inodes[number] = ScannedInode(record: record, extents: extents)
            }
        }
        if result.inodes[Superblock.rootInode]?.record.kind != .directory {
            problem("root inode \(Superblock.rootInode) is not a directory")
        }
    }

    private mutating func loadExtents(_ number: UInt32, _ record: InodeRecord) -> ExtentMap? {
        let map: ExtentMap
        if record.leafCount == 0 {
            map = ExtentMap(inline: record.inlineExtents)
        } else {
            var leaves: [ExtentMap.Leaf] = []
            var block = record.firstLeaf
            for index in 0..<Int(min(record.leafCount, UInt32(superblock.dataBlocks))) {
                guard isDataBlock(block) else {
                    problem("inode \(number): extent leaf \(index) points at block \(block), outside the data region")
                    return nil
                }
                guard claim(block, for: number, what: "extent leaf") else { return nil }
                switch ExtentLeaf.decode(reader(block: block), owner: number) {
                case .failure(let reason):
                    problem("inode \(number): leaf at block \(block): \(reason)")
                    return nil
                case .success(let (extents, next)):
                    leaves.append(ExtentMap.Leaf(block: block, extents: extents))
                    block = next
                }
            }
            guard block == 0, leaves.count == Int(record.leafCount) else {
                problem(
                    "inode \(number): extent leaf chain does not end after "
                        + counted(record.leafCount, "leaf", plural: "leaves"))
                return nil
            }
            map = ExtentMap(leaves: leaves)
        }
        let extents = map.allExtents
        guard UInt32(extents.count) == record.extentCount else {
            problem("inode \(number): holds \(counted(extents.count, "extent")), its record says \(record.extentCount)")
            return nil
        }
        for (index, extent) in extents.enumerated() {
            if index > 0, extents[index - 1].logicalEnd > extent.logical {
                problem("inode \(number): extents \(index - 1) and \(index) overlap or are out of order")
                return nil
            }
            guard extent.physical >= superblock.dataStart, extent.physicalEnd <= superblock.dataEnd else {
                problem("inode \(number): extent \(extent) lies outside the data region")
                return nil
            }
        }
        for extent in extents {
            for block in extent.physical..<extent.physicalEnd where !claimData(block, for: number) {
                return nil
            }
        }
        if map.blockCount != record.blockCount {
            problem(
                "inode \(number): extents map \(counted(map.blockCount, "block")), "
                    + "its record says \(record.blockCount)")
        }
        let pageSize = UInt64(Superblock.blockSize)
        if record.kind == .file, map.endPage > (record.size + pageSize - 1) / pageSize {
            problem("inode \(number): blocks mapped past its size \(record.size)")
        }
        return map
    }

    /// Records `number` as the owner of `block`; a second owner is a problem.
    private mutating func claim(_ block: UInt64, for number: UInt32, what: String) -> Bool {
        let index = Int(block - superblock.dataStart)
        if owned[index] {
            problem("block \(block) (\(what) of inode \(number)) is also owned by inode \(owners[index])")
            return false
        }
        owners[index] = number
        owned.set(index)
        ownedPerBitmapBlock[index / Superblock.bitsPerBitmapBlock, default: 0] += 1
        return true
    }

    /// Claims a data block for an extent of `number`: a block the shared-block table lists may be
    /// named by several extents, and each naming is counted.
    private mutating func claimData(_ block: UInt64, for number: UInt32) -> Bool {
        guard let table, table.sharedBlocks > 0, table.references(to: block) > 1 else {
            return claim(block, for: number, what: "data")
        }
        let index = Int(block - superblock.dataStart)
        namings[index] += 1
        if owned[index] {
            guard owners[index] != 0 else {
                problem("block \(block) (data of inode \(number)) is also a shared-block table leaf")
                return false
            }
            return true
        }
        return claim(block, for: number, what: "data")
    }

    // MARK: The shared-block table

    /// Reads the table's chain from its root (version 3): leaves valid, runs sorted across leaves,
    /// inside the data region, the chained leaves claimed as metadata.
    private mutating func scanSharedTable() {
        guard let root = superblock.sharedTableRoot else { return }
        var leaves: [SharedBlockTable.Leaf] = []
        var block = root
        var lastEnd: UInt64 = 0
        while true {
            if leaves.count > 0 {
                guard isDataBlock(block) else {
                    problem("shared-block table leaf \(leaves.count) points at block \(block), outside the data region")
                    return
                }
                guard claim(block, for: 0, what: "shared-block table leaf") else { return }
            }
            switch SharedBlockLeaf.decode(reader(block: block)) {
            case .failure(let reason):
                problem("shared-block table leaf at block \(block): \(reason)")
                return
            case .success(let (runs, next)):
                if let first = runs.first, first.start < lastEnd {
                    problem("shared-block table leaf at block \(block) is out of order")
                    return
                }
                if leaves.count > 0, runs.isEmpty {
                    problem("shared-block table leaf at block \(block) is empty")
                    return
                }
                for run in runs where run.start < superblock.dataStart || run.end > superblock.dataEnd {
                    problem("shared-block table run \(run) lies outside the data region")
                    return
                }
                lastEnd = runs.last?.end ?? lastEnd
                leaves.append(SharedBlockTable.Leaf(block: block, runs: runs))
                block = next
            }
            if block == 0 { break }
        }
        table = SharedBlockTable(leaves: leaves)
        result.sharedTable = table
    }

    /// Every block the table lists is named by exactly as many extents as its count says.
    private mutating func checkSharedCounts() {
        guard let table, table.sharedBlocks > 0 else { return }
        var wrong = 0
        for run in table.allRuns {
            for block in run.range {
                let named = namings[Int(block - superblock.dataStart)]
                guard named != run.count else { continue }
                wrong += 1
                if wrong <= 3 {
                    problem(
                        "block \(block): the shared-block table counts \(run.count) references, "
                            + "\(counted(Int(named), "extent")) name it")
                }
            }
        }
        if wrong > 3 { problem("and \(wrong - 3) more blocks whose shared count is wrong") }
    }

    // MARK: Directories

    /// References to each inode from directory entries, and each entry's parent directory.
    private var references: [UInt32: [UInt32]] = [:]

    private mutating func scanDirectories() {
        for number in result.inodes.keys.sorted() {
            guard let inode = result.inodes[number], inode.record.kind == .directory else { continue }
            let blocks = inode.extents.allExtents
            var index = DirectoryIndex()
            var pages: UInt64 = 0
            for extent in blocks {
                if extent.logical != pages {
                    problem("directory \(number) has a hole at block \(pages)")
                    break
                }
                for page in extent.logicalRange {
                    readDirectoryBlock(number, page: page, block: extent.block(for: page), into: &index)
                }
                pages = extent.logicalEnd
            }
            if inode.record.size != pages * UInt64(Superblock.blockSize) {
                problem("directory \(number) has size \(inode.record.size) for \(counted(pages, "block"))")
            }
            result.inodes[number]?.directory = index
        }
    }

    private mutating func readDirectoryBlock(
        _ number: UInt32, page: UInt64, block: UInt64, into index: inout DirectoryIndex
    ) {
        let reader = reader(block: block)
        let blockIndex = index.blockCount
        index.blockCount += 1
        guard DirectoryFormat.validHeader(reader, owner: number, index: UInt32(page)) else {
            problem("directory \(number) block \(page) (block \(block)): bad header")
            index.damage.append("its block \(page) (block \(block)) has a bad header")
            return
        }
        for slot in 0..<DirectoryFormat.slotsPerBlock {
            let address = DirectoryIndex.SlotAddress(block: blockIndex, slot: slot)
            let slotReader = ByteReader(reader.base + DirectoryFormat.slotOffset(slot), count: DirectoryFormat.slotSize)
            switch DirectoryFormat.decodeSlot(slotReader) {
            case .empty:
                index.freeSlots.append(address)
            case .damaged(let reason):
                problem("directory \(number) block \(page) slot \(slot): \(reason)")
                index.damage.append("slot \(slot) of its block \(page) is damaged (\(reason))")
            case .entry(let child, let name, let kind):
                let printable = String(decoding: name, as: UTF8.self)
                if let reason = result.damagedInodes[child] {
                    problem(
                        "directory \(number) entry \"\(printable)\" names inode \(child), which is damaged: \(reason)")
                    index.damagedEntries[name] = child
                    continue
                }
                guard child >= 1, UInt64(child) <= superblock.inodeCount, let target = result.inodes[child] else {
                    problem("directory \(number) entry \"\(printable)\" names inode \(child), which is not in use")
                    continue
                }
                guard target.record.kind == kind else {
                    problem("directory \(number) entry \"\(printable)\" has the wrong type for inode \(child)")
                    continue
                }
                guard index.entries[name] == nil else {
                    problem("directory \(number) has two entries named \"\(printable)\"")
                    continue
                }
                index.entries[name] = DirectoryIndex.Entry(inode: child, kind: kind, slot: address)
                references[child, default: []].append(number)
            }
        }
    }

    // MARK: Tree, links, orphans

    private mutating func checkTree() {
        guard result.inodes[Superblock.rootInode]?.record.kind == .directory else { return }
        if result.inodes[Superblock.rootInode]?.record.parent != Superblock.rootInode {
            problem("root directory's parent is not itself")
        }
        if references[Superblock.rootInode] != nil { problem("the root directory has a name in a directory") }
        // Every directory is reached from the root exactly once.
        var reached: Set<UInt32> = [Superblock.rootInode]
        var queue: [UInt32] = [Superblock.rootInode]
        while let directory = queue.popLast() {
            let entries = result.inodes[directory]?.directory?.entries ?? [:]
            for entry in entries.values where entry.kind == .directory {
                guard reached.insert(entry.inode).inserted else {
                    problem("directory \(entry.inode) is reached twice (a cycle or a second name)")
                    continue
                }
                if result.inodes[entry.inode]?.record.parent != directory {
                    problem("directory \(entry.inode) is in directory \(directory) but names another parent")
                }
                queue.append(entry.inode)
            }
        }
        for (number, inode) in result.inodes.sorted(by: { $0.key < $1.key }) where number != Superblock.rootInode {
            let names = references[number]?.count ?? 0
            if inode.record.linkCount > 1 {
                problem("inode \(number) has link count \(inode.record.linkCount); DAXFS has no hard links")
            } else if Int(inode.record.linkCount) != names {
                problem("inode \(number) has link count \(inode.record.linkCount) but \(names) directory entries")
            }
            if inode.record.kind == .directory, names == 1, !reached.contains(number) {
                problem("directory \(number) is not reachable from the root")
            }
        }
    }

    private mutating func checkOrphans() {
        guard primaryDamage == nil else {
            // The backup's orphan head is the one of format time: the removed files are those
            // with no links.
            result.orphans = result.inodes.filter { $0.key != Superblock.rootInode && $0.value.record.linkCount == 0 }
                .keys.sorted()
            return
        }
        var seen: Set<UInt32> = []
        var number = superblock.orphanHead
        var previous: UInt32 = 0
        while number != 0 {
            guard UInt64(number) <= superblock.inodeCount, let inode = result.inodes[number] else {
                problem("orphan list names inode \(number) (after \(previous)), which is not in use")
                break
            }
            guard seen.insert(number).inserted else {
                problem("orphan list loops back to inode \(number)")
                break
            }
            if inode.record.linkCount != 0 || inode.record.kind != .file {
                problem("orphan list holds inode \(number), which is not a removed file")
            }
            result.orphans.append(number)
            previous = number
            number = inode.record.nextOrphan
        }
        for (number, inode) in result.inodes where inode.record.linkCount == 0 && number != Superblock.rootInode {
            if !seen.contains(number) { problem("inode \(number) has no links but is not on the orphan list") }
        }
    }

    // MARK: Bitmap

    private mutating func checkBitmap() {
        let dataBlocks = Int(superblock.dataBlocks)
        let bitmap = LazyBitmap(count: dataBlocks)
        var allocated = 0
        var leaked = 0
        var missing = 0
        var firstLeaked: Int?
        var firstMissing: Int?
        let bitmapRegion = superblock.bitmapStart..<(superblock.bitmapStart + superblock.bitmapBlocks)
        var holding = Set<UInt64>()
        for blocks in blocksHoldingData(bitmapRegion) { holding.formUnion(blocks) }
        for bitmapBlock in 0..<Int(superblock.bitmapBlocks) {
            let first = bitmapBlock * Superblock.bitsPerBitmapBlock
            let end = min(dataBlocks, first + Superblock.bitsPerBitmapBlock)
            guard holding.contains(superblock.bitmapStart + UInt64(bitmapBlock)) else {
                // A hole of a sparse device: every block it covers is free. Owned ones are missing.
                guard ownedPerBitmapBlock[bitmapBlock] != nil else { continue }
                var index = first
                while let owner = owned.nextSet(from: index, limit: end) {
                    missing += 1
                    if firstMissing == nil { firstMissing = owner }
                    index = owner + 1
                }
                continue
            }
            let reader = reader(block: superblock.bitmapStart + UInt64(bitmapBlock))
            guard
                reader.get(UInt32.self, at: Superblock.bitmapBytesPerBlock)
                    == reader.crc(of: 0..<Superblock.bitmapBytesPerBlock)
                    || Self.isZero(reader)  // never written since format: every block free
            else {
                problem("bitmap block \(bitmapBlock) checksum mismatch")
                continue
            }
            guard first < end else { continue }
            // A byte at a time: `first` is a multiple of 8, so each byte is 8 bits of one word.
            for byteIndex in 0..<((end - first + 7) / 8) {
                let index = first + byteIndex * 8
                let bits = min(8, end - index)
                let mask = UInt8(truncatingIfNeeded: (1 << bits) - 1)
                let onDevice = reader.get(UInt8.self, at: byteIndex) & mask
                let ownedBits = owned.byte(at: index) & mask
                if onDevice != 0 {
                    bitmap.formUnion(byte: onDevice, at: index)
                    allocated += onDevice.nonzeroBitCount
                }
                guard onDevice != ownedBits else { continue }
                for bit in 0..<bits where (onDevice ^ ownedBits) & (1 << UInt8(bit)) != 0 {
                    if onDevice & (1 << UInt8(bit)) != 0 {
                        leaked += 1
                        if firstLeaked == nil { firstLeaked = index + bit }
                    } else {
                        missing += 1
                        if firstMissing == nil { firstMissing = index + bit }
                    }
                }
            }
            // Bits past the data region must be clear.
            if end == dataBlocks, end - first < Superblock.bitsPerBitmapBlock {
                for bit in (end - first)..<Superblock.bitsPerBitmapBlock
                where reader.get(UInt8.self, at: bit / 8) & (1 << UInt8(bit % 8)) != 0 {
                    problem("bitmap marks block \(superblock.dataStart + UInt64(first + bit)), past the data region")
                    break
                }
            }
        }
        result.bitmap = bitmap
        result.allocatedBlocks = allocated
        if let firstLeaked {
            problem(
                "\(leaked == 1 ? "1 block is" : "\(counted(leaked, "block")) are") marked allocated but owned by no file (leaked), the first is block "
                    + "\(superblock.dataStart + UInt64(firstLeaked))")
        }
        if let firstMissing {
            problem(
                "\(missing == 1 ? "1 block is" : "\(counted(missing, "block")) are") owned by a file but marked free, the first is block "
                    + "\(superblock.dataStart + UInt64(firstMissing)) (inode \(owners[firstMissing]))")
        }
    }
}
