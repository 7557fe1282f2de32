/// The second half of a repair plan: names for everything kept, then the records, the bitmap
/// and the orphan list as they must be.
extension Salvage {
    // MARK: Tree, /lost+found, links

    /// Gives every kept inode exactly one name: the first entry found from the root; unnamed ones
    /// go to /lost+found (a removed file, with no links, is freed instead, as mount frees it).
    mutating func rebuildTree() throws {
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
            var taken = Set((entries[home] ?? []).map(\.name))
            for number in unplaced {
                guard let inode = kept[number] else { continue }
                var name = "#\(number)"
                var suffix = 0
                while taken.contains(Array(name.utf8)) {
                    suffix += 1
                    name = "#\(number).\(suffix)"
                }
                taken.insert(Array(name.utf8))
                try addEntry(to: home, name: Array(name.utf8), child: number, kind: inode.record.kind)
                named[number] = home
                let path = "/\(homeName)/\(name)"
                lostAndFound.append(path)
                let what =
                    inode.record.kind == .directory
                    ? "a directory" : "a file of \(counted(inode.record.size, "byte"))"
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
                    say(
                        "directory \(number) named parent \(inode.record.parent) but is in directory \(parent); corrected"
                    )
                }
                inode.record.parent = parent
                inode.changed = true
            }
            kept[number] = inode
        }
    }

    /// Names every entry of `directory` and of the directories below it, breadth first; an entry
    /// naming an inode that already has a name is removed (DAXFS has no hard links).
    mutating func visit(_ directory: UInt32, named: inout [UInt32: UInt32]) {
        var queue = [directory]
        var next = 0
        while next < queue.count {
            let current = queue[next]
            next += 1
            var keptEntries: [Entry] = []
            for entry in entries[current] ?? [] {
                if entry.child == Superblock.rootInode || named[entry.child] != nil {
                    let quoted = Paths.quoted(String(decoding: entry.name, as: UTF8.self))
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
    mutating func lostAndFoundDirectory(named: inout [UInt32: UInt32]) throws -> UInt32 {
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
    mutating func addEntry(to directory: UInt32, name: [UInt8], child: UInt32, kind: InodeRecord.Kind) throws {
        if freeSlots[directory, default: []].isEmpty { try addBlock(to: directory) }
        freeSlots[directory]!.sort()
        let offset = freeSlots[directory]!.removeFirst()
        writes.append((offset, DirectoryFormat.encodeSlot(inode: child, name: name, kind: kind)))
        entries[directory, default: []].append(Entry(name: name, child: child, kind: kind, offset: offset))
    }

    mutating func addBlock(to directory: UInt32) throws {
        guard var inode = kept[directory], inode.extents.isInline else {
            throw DAXError(.noSpace, "directory \(directory) is too fragmented for repair to add a block to it")
        }
        let page = inode.extents.endPage
        // The block after the directory's last, when free, keeps it one extent.
        let block = try allocateBlock(goal: inode.extents.allExtents.last?.physicalEnd)
        let extents = ExtentMap.merged(inode.extents.allExtents + [Extent(logical: page, physical: block, length: 1)])
        guard extents.count <= InodeRecord.inlineExtentCapacity else {
            throw DAXError(.noSpace, "directory \(directory) is too fragmented for repair to add a block to it")
        }
        owners[Int(block - superblock.dataStart)] = directory
        // Data first: the block is whole on the device before a record links it.
        writes.append(
            (Int(block) * Superblock.blockSize, Self.emptyDirectoryBlock(owner: directory, index: UInt32(page))))
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

    mutating func allocateBlock(goal: UInt64?) throws -> UInt64 {
        if let goal, superblock.dataRange.contains(goal), owners[Int(goal - superblock.dataStart)] == 0 {
            return goal
        }
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

    mutating func writeRecords() {
        for number in kept.keys.sorted() {
            guard var inode = kept[number], inode.changed else { continue }
            inode.extents.store(into: &inode.record)
            inode.record.changeTime = now
            writes.append((superblock.inodeOffset(number), inode.record.encode()))
        }
    }

    /// The shared-block table as the kept extents say it must be (a count for every data block
    /// named more than once); rewritten, with leaf blocks taken as needed, when the device's
    /// differs or is damaged.
    mutating func rebuildSharedTable() throws {
        guard let root = superblock.sharedTableRoot else { return }
        var named: [UInt64: UInt32] = [:]
        for inode in kept.values {
            for extent in inode.extents.allExtents {
                for block in extent.physical..<extent.physicalEnd { named[block, default: 0] += 1 }
            }
        }
        var runs: [SharedRun] = []
        for (block, count) in named.filter({ $0.value > 1 }).sorted(by: { $0.key < $1.key }) {
            if let last = runs.last, last.end == block, last.count == count {
                runs[runs.count - 1].length += 1
            } else {
                runs.append(SharedRun(start: block, length: 1, count: count))
            }
        }
        // What the device holds now, if it can be read.
        let onDevice = readSharedTable()
        let oldLeaves = sharedTableLeaves()
        if let onDevice, onDevice == runs {
            // Kept as it is: its leaves stay allocated.
            for leaf in oldLeaves { setOwner(leaf..<(leaf + 1), to: Superblock.rootInode) }
            return
        }
        say(
            onDevice == nil
                ? "the shared-block table is damaged; rebuilt it from the extents (\(counted(runs.count, "run")))"
                : "the shared-block table disagreed with the extents; rebuilt it from them "
                    + "(\(counted(runs.count, "run")))")
        let capacity = SharedBlockLeaf.capacity
        let chunks = stride(from: 0, to: max(runs.count, 1), by: capacity).map {
            runs[$0..<min($0 + capacity, runs.count)]
        }
        var blocks = [root]
        for _ in chunks.dropFirst() {
            let leaf = try allocateBlock(goal: nil)
            setOwner(leaf..<(leaf + 1), to: Superblock.rootInode)
            blocks.append(leaf)
        }
        let first = writes.count
        for (index, chunk) in chunks.enumerated() {
            let next = index + 1 < blocks.count ? blocks[index + 1] : 0
            writes.append((Int(blocks[index]) * Superblock.blockSize, SharedBlockLeaf.encode(chunk, next: next)))
        }
        atomicRuns.append(first..<writes.count)
    }

    /// The shared-block table's runs as the device holds them, or nil when its chain cannot be
    /// read (a damaged leaf, a loop, a pointer out of the data region).
    func readSharedTable() -> [SharedRun]? {
        guard let root = superblock.sharedTableRoot else { return [] }
        var runs: [SharedRun] = []
        var seen = Set<UInt64>()
        var block = root
        while true {
            guard case .success(let (leafRuns, next)) = SharedBlockLeaf.decode(reader(block: block)) else { return nil }
            runs += leafRuns
            if next == 0 { return runs }
            guard superblock.dataRange.contains(next), seen.insert(next).inserted else { return nil }
            block = next
        }
    }

    /// The chained leaf blocks of a readable shared-block table (none when it cannot be read).
    func sharedTableLeaves() -> [UInt64] {
        guard let root = superblock.sharedTableRoot, readSharedTable() != nil else { return [] }
        var leaves: [UInt64] = []
        var block = root
        while case .success(let (_, next)) = SharedBlockLeaf.decode(reader(block: block)), next != 0 {
            leaves.append(next)
            block = next
        }
        return leaves
    }

    /// Each bitmap block as the owned blocks say it must be; the ones that differ are rewritten.
    mutating func rebuildBitmap() {
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
            // A block never written since format is all zeros, checksum included: all free, valid.
            if bytes.allSatisfy({ $0 == 0 }), Scanner.isZero(blockReader) { continue }
            // All zeros is a valid block too (check reads it as all free), so its bits are told
            // as check tells them, not as a checksum mismatch.
            let crcValid =
                Scanner.isZero(blockReader)
                || blockReader.get(UInt32.self, at: Superblock.bitmapBytesPerBlock)
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
    mutating func emptyOrphanList() {
        guard superblock.orphanHead != 0 else { return }
        var sb = superblock
        sb.orphanHead = 0
        say("emptied the orphan list (its removed files were freed)")
        writes.append((0, sb.encode()))
    }
}
