/// A file's extents in DRAM, kept in the same leaves as on the device.
///
/// Up to 8 extents live inline in the inode (one leaf with block 0). Beyond that they live in leaf
/// blocks of up to 254 sorted extents, chained in logical order. An edit re-packs only the leaves
/// whose range it touches, so a change costs O(leaf) in the journal, not O(file).
struct ExtentMap: Sendable, Equatable {
    struct Leaf: Sendable, Equatable {
        /// The leaf's block; 0 when the extents are inline in the inode.
        var block: UInt64
        var extents: [Extent]
    }

    static let inlineCapacity = InodeRecord.inlineExtentCapacity
    static let leafCapacity = ExtentLeaf.capacity

    private(set) var leaves: [Leaf] = [Leaf(block: 0, extents: [])]
    /// Extents in all leaves, kept up to date by every edit (a fragmented file has many).
    private(set) var extentCount = 0
    /// Blocks the extents map.
    private(set) var blockCount: UInt64 = 0

    init() {}

    /// Rebuilds the map from what the device holds (already validated).
    init(inline: [Extent]) { self.init(leaves: [Leaf(block: 0, extents: inline)]) }

    init(leaves: [Leaf]) {
        precondition(!leaves.isEmpty)
        self.leaves = leaves
        (extentCount, blockCount) = Self.counts(leaves[...])
    }

    private static func counts(_ leaves: ArraySlice<Leaf>) -> (Int, UInt64) {
        leaves.reduce((0, 0)) { sum, leaf in
            (sum.0 + leaf.extents.count, sum.1 + leaf.extents.reduce(0) { $0 + $1.length })
        }
    }

    var isInline: Bool { leaves.count == 1 && leaves[0].block == 0 }
    var allExtents: [Extent] { leaves.flatMap(\.extents) }
    var leafBlocks: [UInt64] { isInline ? [] : leaves.map(\.block) }
    var isEmpty: Bool { leaves.allSatisfy { $0.extents.isEmpty } }
    /// One past the last mapped page (0 for an empty map).
    var endPage: UInt64 { leaves.last(where: { !$0.extents.isEmpty })?.extents.last?.logicalEnd ?? 0 }

    /// The index of the leaf that holds, or would hold, page `page`.
    private func leafIndex(for page: UInt64) -> Int {
        var low = 0
        var high = leaves.count - 1
        while low < high {
            let middle = (low + high + 1) / 2
            if let first = leaves[middle].extents.first, first.logical <= page {
                low = middle
            } else {
                high = middle - 1
            }
        }
        return low
    }

    /// The extent covering `page`, if any.
    func extent(containing page: UInt64) -> Extent? {
        let extents = leaves[leafIndex(for: page)].extents
        var low = 0
        var high = extents.count
        while low < high {
            let middle = (low + high) / 2
            if extents[middle].logicalEnd <= page { low = middle + 1 } else { high = middle }
        }
        guard low < extents.count, extents[low].logical <= page else { return nil }
        return extents[low]
    }

    /// The pieces of extents inside `pages`, clipped to it, in order.
    func extents(in pages: Range<UInt64>) -> [Extent] {
        guard !pages.isEmpty else { return [] }
        var result: [Extent] = []
        for leaf in leaves[leafIndex(for: pages.lowerBound)...] {
            for extent in leaf.extents where extent.logicalEnd > pages.lowerBound {
                if extent.logical >= pages.upperBound { return result }
                result.append(extent.slice(pages))
            }
        }
        return result
    }

    /// The holes inside `pages`, in order.
    func holes(in pages: Range<UInt64>) -> [Range<UInt64>] {
        var holes: [Range<UInt64>] = []
        var next = pages.lowerBound
        for extent in extents(in: pages) {
            if extent.logical > next { holes.append(next..<extent.logical) }
            next = extent.logicalEnd
        }
        if next < pages.upperBound { holes.append(next..<pages.upperBound) }
        return holes
    }

    /// Where to look first for the blocks of `hole`: right before the block of the page after it
    /// when that page is mapped and the page before it is not, else as ``goal(before:)``. A file
    /// filled backwards (a `memcpy` that copies from the end, into a mapping of holes, one fault a
    /// page) then gets its blocks in order, one extent and one kernel mapping for the run, where
    /// the block after the last one taken would give each page an extent of its own, in
    /// descending order.
    func goal(for hole: Range<UInt64>) -> UInt64? {
        let before = hole.lowerBound > 0 ? extent(containing: hole.lowerBound - 1) : nil
        if before == nil, let after = extent(containing: hole.upperBound) {
            let block = after.block(for: hole.upperBound)
            if block >= UInt64(hole.count) { return block - UInt64(hole.count) }
        }
        return goal(before: hole.lowerBound)
    }

    /// Where the block of `page` would be if the file were contiguous from the last page mapped
    /// before it: that page's block plus the distance between them (ext4's goal keeps the same
    /// distance, so that a hole filled later fits between its neighbours).
    func goal(before page: UInt64) -> UInt64? {
        guard page > 0 else { return nil }
        if let extent = extent(containing: page - 1) { return extent.block(for: page - 1) + 1 }
        let leaf = leaves[leafIndex(for: page)]
        return leaf.extents.last(where: { $0.logicalEnd <= page }).map { $0.physicalEnd + (page - $0.logicalEnd) }
    }

    // MARK: - Edits

    /// A planned change: what replaces the affected leaves, and what it frees.
    struct Edit {
        /// Affected leaves `first...last` of the current map (empty when becoming inline or a leaf map).
        var first: Int
        var last: Int
        /// The new contents of the affected span, in order.
        var extents: [Extent]
        /// Pieces of old extents inside the edited range: their blocks become free.
        var removed: [Extent]
        /// The whole map is rewritten: inline to leaves, or leaves to inline.
        var rewritesAll: Bool
        /// The map is inline afterwards.
        var becomesInline: Bool
        /// Leaf blocks to allocate before ``ExtentMap/apply(_:newBlocks:owner:transaction:superblock:)``.
        var newLeafBlocks: Int
    }

    /// Plans replacing whatever maps `pages` by `replacement` (sorted extents inside `pages`; empty
    /// to punch a hole). Parts of extents outside `pages` stay.
    func plan(replacing pages: Range<UInt64>, with replacement: [Extent]) -> Edit {
        // The affected leaves: those overlapping the range, or the one an insertion goes into.
        var first = leafIndex(for: pages.lowerBound)
        var last = first
        while last + 1 < leaves.count, let next = leaves[last + 1].extents.first, next.logical < pages.upperBound {
            last += 1
        }
        if isInline {
            first = 0
            last = 0
        }
        var extents: [Extent] = []
        var removed: [Extent] = []
        var inserted = false
        for extent in leaves[first...last].flatMap(\.extents) {
            if extent.logicalEnd <= pages.lowerBound {
                extents.append(extent)
                continue
            }
            if extent.logical >= pages.upperBound {
                if !inserted {
                    extents += replacement
                    inserted = true
                }
                extents.append(extent)
                continue
            }
            // Overlaps: keep the parts outside, remove the part inside.
            if extent.logical < pages.lowerBound { extents.append(extent.slice(extent.logical..<pages.lowerBound)) }
            removed.append(extent.slice(pages))
            if extent.logicalEnd > pages.upperBound {
                if !inserted {
                    extents += replacement
                    inserted = true
                }
                extents.append(extent.slice(pages.upperBound..<extent.logicalEnd))
            }
        }
        if !inserted { extents += replacement }
        extents = Self.merged(extents)

        let total = extentCount - leaves[first...last].reduce(0) { $0 + $1.extents.count } + extents.count
        if total <= Self.inlineCapacity {
            // Small enough to live in the inode: all leaves go.
            let all = Self.merged(
                Array(leaves[..<first].flatMap(\.extents)) + extents
                    + Array(leaves[(last + 1)...].flatMap(\.extents)))
            return Edit(
                first: 0, last: leaves.count - 1, extents: all, removed: removed, rewritesAll: !isInline,
                becomesInline: true, newLeafBlocks: 0)
        }
        if isInline {
            let leafCount = (extents.count + Self.leafCapacity - 1) / Self.leafCapacity
            return Edit(
                first: 0, last: 0, extents: extents, removed: removed, rewritesAll: true, becomesInline: false,
                newLeafBlocks: leafCount)
        }
        let leafCount = (extents.count + Self.leafCapacity - 1) / Self.leafCapacity
        return Edit(
            first: first, last: last, extents: extents, removed: removed, rewritesAll: false,
            becomesInline: false, newLeafBlocks: max(0, leafCount - (last - first + 1)))
    }

    /// Applies `edit`, taking leaf blocks from `newBlocks`: writes every changed leaf into
    /// `transaction` and returns the leaf blocks no longer used. The inode record (inline extents,
    /// first leaf, counts) must be written by the caller afterwards.
    mutating func apply(
        _ edit: Edit, newBlocks: [UInt64], owner: UInt32, transaction: inout Transaction, superblock: Superblock
    ) -> [UInt64] {
        precondition(newBlocks.count == edit.newLeafBlocks, "extent edit needs \(edit.newLeafBlocks) leaf blocks")
        // The counts: the span replaced goes (the whole map when it is rewritten), the new extents come.
        let replaced =
            edit.becomesInline || edit.rewritesAll
            ? (extentCount, blockCount)
            : Self.counts(leaves[edit.first...edit.last])
        extentCount += edit.extents.count - replaced.0
        blockCount = blockCount - replaced.1 + edit.extents.reduce(0) { $0 + $1.length }
        if edit.becomesInline {
            let freed = leafBlocks
            leaves = [Leaf(block: 0, extents: edit.extents)]
            return freed
        }
        let chunks = Self.chunks(edit.extents)
        let oldBlocks = edit.rewritesAll ? [] : leaves[edit.first...edit.last].map(\.block)
        let blocks = Array((oldBlocks + newBlocks).prefix(chunks.count))
        let freed = Array(oldBlocks.dropFirst(chunks.count))
        let newLeaves = zip(blocks, chunks).map { Leaf(block: $0, extents: Array($1)) }
        if edit.rewritesAll {
            leaves = newLeaves
        } else {
            leaves.replaceSubrange(edit.first...edit.last, with: newLeaves)
        }
        if leaves.isEmpty { leaves = [Leaf(block: 0, extents: [])] }
        // Write the new leaves; if the span vanished, the leaf before it, whose next pointer changed.
        // (A span that survives starts at its old first block, so that pointer stays right.)
        let firstWritten = edit.rewritesAll ? 0 : edit.first
        let toWrite =
            newLeaves.isEmpty
            ? (firstWritten > 0 ? [firstWritten - 1] : [])
            : Array(firstWritten..<(firstWritten + newLeaves.count))
        for index in toWrite where leaves[index].block != 0 {
            let next = index + 1 < leaves.count ? leaves[index + 1].block : 0
            let bytes = ExtentLeaf.encode(owner: owner, extents: leaves[index].extents[...], next: next)
            transaction.write(bytes, at: Int(leaves[index].block) * Superblock.blockSize)
        }
        return freed
    }

    /// Fills a record's extent fields from the map.
    func store(into record: inout InodeRecord) {
        record.extentCount = UInt32(extentCount)
        record.blockCount = blockCount
        if isInline {
            record.leafCount = 0
            record.firstLeaf = 0
            record.inlineExtents = leaves[0].extents
        } else {
            record.leafCount = UInt32(leaves.count)
            record.firstLeaf = leaves[0].block
            record.inlineExtents = []
        }
    }

    /// Joins neighbours that continue each other on the file and the device.
    static func merged(_ extents: [Extent]) -> [Extent] {
        var result: [Extent] = []
        result.reserveCapacity(extents.count)
        for extent in extents {
            if let last = result.last, last.canMerge(with: extent) {
                result[result.count - 1].length += extent.length
            } else {
                result.append(extent)
            }
        }
        return result
    }

    /// Splits `extents` into as few leaves as fit, evenly filled.
    private static func chunks(_ extents: [Extent]) -> [ArraySlice<Extent>] {
        extents.evenChunks(ofAtMost: leafCapacity)
    }
}

extension Array {
    /// The elements in as few slices of at most `capacity` as hold them, their sizes differing by
    /// one at most (leaves filled evenly, so that the next insert rarely splits one); none when
    /// the array is empty.
    func evenChunks(ofAtMost capacity: Int) -> [ArraySlice<Element>] {
        guard !isEmpty else { return [] }
        let chunks = (count + capacity - 1) / capacity
        let base = count / chunks
        let extra = count % chunks
        var result: [ArraySlice<Element>] = []
        result.reserveCapacity(chunks)
        var start = 0
        for index in 0..<chunks {
            let size = base + (index < extra ? 1 : 0)
            result.append(self[start..<(start + size)])
            start += size
        }
        return result
    }
}
