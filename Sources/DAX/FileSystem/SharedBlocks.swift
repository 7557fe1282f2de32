import Synchronization

/// The reference counts of shared blocks, in DRAM as on the device: sorted runs of blocks that
/// more than one extent names, with their count, in a chain of leaves whose first is the journal
/// region's last block. A block with no run has one reference if it is allocated.
///
/// An edit changes counts by whole runs (a clone of a contiguous 1 GiB file is one run) and
/// re-packs only the leaves whose range it touches, as ``ExtentMap`` does for extents.
struct SharedBlockTable: Sendable, Equatable {
    struct Leaf: Sendable, Equatable {
        var block: UInt64
        var runs: [SharedRun]
    }

    static let leafCapacity = SharedBlockLeaf.capacity

    /// Never empty: the first leaf is the fixed root block, kept even when it holds no run.
    private(set) var leaves: [Leaf]
    /// Blocks with two or more references.
    private(set) var sharedBlocks: UInt64 = 0

    /// An empty table whose first leaf is `root`.
    init(root: UInt64) { leaves = [Leaf(block: root, runs: [])] }

    /// The table as the device holds it (already validated).
    init(leaves: [Leaf]) {
        precondition(!leaves.isEmpty)
        self.leaves = leaves
        sharedBlocks = leaves.reduce(0) { $0 + $1.runs.reduce(0) { $0 + $1.length } }
    }

    var root: UInt64 { leaves[0].block }
    var allRuns: [SharedRun] { leaves.flatMap(\.runs) }
    /// Leaf blocks after the root (allocated in the data region).
    var chainedBlocks: [UInt64] { leaves.dropFirst().map(\.block) }

    /// The index of the leaf that holds, or would hold, `block`.
    private func leafIndex(for block: UInt64) -> Int {
        var low = 0
        var high = leaves.count - 1
        while low < high {
            let middle = (low + high + 1) / 2
            if let first = leaves[middle].runs.first, first.start <= block { low = middle } else { high = middle - 1 }
        }
        return low
    }

    /// The references to `block`: its run's count, else 1 (the caller knows it is allocated).
    func references(to block: UInt64) -> UInt32 {
        runs(in: block..<(block + 1)).first?.count ?? 1
    }

    /// The runs overlapping `blocks`, clipped to it, in order.
    func runs(in blocks: Range<UInt64>) -> [SharedRun] {
        guard !blocks.isEmpty, sharedBlocks > 0 else { return [] }
        var result: [SharedRun] = []
        for leaf in leaves[leafIndex(for: blocks.lowerBound)...] {
            for run in leaf.runs where run.end > blocks.lowerBound {
                if run.start >= blocks.upperBound { return result }
                let start = max(run.start, blocks.lowerBound)
                let end = min(run.end, blocks.upperBound)
                result.append(SharedRun(start: start, length: end - start, count: run.count))
            }
        }
        return result
    }

    /// Whether any block of `blocks` has more than one reference.
    func isShared(_ blocks: Range<UInt64>) -> Bool { !runs(in: blocks).isEmpty }

    // MARK: - Edits

    /// A planned change of counts: the runs that replace leaves `first...last`, the blocks whose
    /// last reference goes, and how many leaf blocks must be allocated first.
    struct Edit {
        var first: Int
        var last: Int
        var runs: [SharedRun]
        var freed: [PageRun]
        var newLeafBlocks: Int
        var isEmpty: Bool
    }

    /// Plans one more reference to every block of `added` and one fewer to every block of
    /// `dropped` (a block may appear several times: each appearance counts).
    func plan(adding added: [PageRun], dropping dropped: [PageRun]) -> Edit {
        var events: [(position: UInt64, delta: Int)] = []
        events.reserveCapacity(2 * (added.count + dropped.count))
        for run in added where run.count > 0 { events += [(run.start, 1), (run.end, -1)] }
        for run in dropped where run.count > 0 { events += [(run.start, -1), (run.end, 1)] }
        guard let low = events.map(\.position).min(), let high = events.map(\.position).max() else {
            return Edit(first: 0, last: -1, runs: [], freed: [], newLeafBlocks: 0, isEmpty: true)
        }
        events.sort { $0.position < $1.position }
        let first = leafIndex(for: low)
        var last = leafIndex(for: high - 1)
        last = max(last, first)
        let existing = leaves[first...last].flatMap(\.runs)

        var points = events.map(\.position)
        for run in existing { points += [run.start, run.end] }
        points.sort()
        var runs: [SharedRun] = []
        var freed: [PageRun] = []
        var eventIndex = 0
        var runIndex = 0
        var delta = 0
        var previous: UInt64? = nil
        for (index, point) in points.enumerated() where point != previous {
            previous = point
            while eventIndex < events.count, events[eventIndex].position <= point {
                delta += events[eventIndex].delta
                eventIndex += 1
            }
            guard let next = points[(index + 1)...].first(where: { $0 > point }) else { break }
            while runIndex < existing.count, existing[runIndex].end <= point { runIndex += 1 }
            let covering = runIndex < existing.count && existing[runIndex].start <= point ? existing[runIndex] : nil
            guard covering != nil || delta != 0 else { continue }
            let now = Int(covering?.count ?? 1) + delta
            precondition(now >= 0, "a block at \(point) would have \(now) references")
            if now >= 2 {
                Self.append(SharedRun(start: point, length: next - point, count: UInt32(now)), to: &runs)
            } else if now == 0 {
                freed.append(page: point, count: next - point)
            }
        }
        let needed = (runs.count + Self.leafCapacity - 1) / Self.leafCapacity
        let keep = first == 0 ? max(needed, 1) : needed
        return Edit(
            first: first, last: last, runs: runs, freed: freed,
            newLeafBlocks: max(0, keep - (last - first + 1)), isEmpty: false)
    }

    /// Appends `run`, joining it to the last run when it continues it with the same count.
    private static func append(_ run: SharedRun, to runs: inout [SharedRun]) {
        var run = run
        if let tail = runs.last, tail.end == run.start, tail.count == run.count,
            tail.length + run.length <= SharedRun.maximumLength
        {
            runs[runs.count - 1].length += run.length
            return
        }
        while run.length > SharedRun.maximumLength {
            runs.append(SharedRun(start: run.start, length: SharedRun.maximumLength, count: run.count))
            run.start += SharedRun.maximumLength
            run.length -= SharedRun.maximumLength
        }
        runs.append(run)
    }

    /// Applies `edit`, taking leaf blocks from `newBlocks`: writes every changed leaf into
    /// `transaction` and returns the leaf blocks no longer used.
    mutating func apply(_ edit: Edit, newBlocks: [UInt64], transaction: inout Transaction) -> [UInt64] {
        guard !edit.isEmpty else { return [] }
        precondition(newBlocks.count == edit.newLeafBlocks, "shared-block edit needs \(edit.newLeafBlocks) leaf blocks")
        let removedCount = leaves[edit.first...edit.last].reduce(0) { $0 + $1.runs.reduce(0) { $0 + $1.length } }
        sharedBlocks = sharedBlocks - removedCount + edit.runs.reduce(0) { $0 + $1.length }
        let chunks = Self.chunks(edit.runs, atLeastOne: edit.first == 0)
        let oldBlocks = leaves[edit.first...edit.last].map(\.block)
        let blocks = Array((oldBlocks + newBlocks).prefix(chunks.count))
        let freed = Array(oldBlocks.dropFirst(chunks.count))
        let replacement = zip(blocks, chunks).map { Leaf(block: $0, runs: Array($1)) }
        leaves.replaceSubrange(edit.first...edit.last, with: replacement)
        let written =
            replacement.isEmpty ? [edit.first - 1] : Array(edit.first..<(edit.first + replacement.count))
        for index in written {
            let next = index + 1 < leaves.count ? leaves[index + 1].block : 0
            transaction.write(
                SharedBlockLeaf.encode(leaves[index].runs[...], next: next),
                at: Int(leaves[index].block) * Superblock.blockSize)
        }
        return freed
    }

    /// `runs` in as few leaves as fit, evenly filled; one empty leaf for the root when asked.
    private static func chunks(_ runs: [SharedRun], atLeastOne: Bool) -> [ArraySlice<SharedRun>] {
        guard !runs.isEmpty else { return atLeastOne ? [runs[...]] : [] }
        return runs.evenChunks(ofAtMost: leafCapacity)
    }
}

extension [PageRun] {
    /// Appends blocks `start..<start+count`, joined to the last run when they continue it.
    mutating func append(page start: UInt64, count: UInt64) {
        if let last = self.last, last.end == start {
            self[self.count - 1].count += count
        } else {
            append(PageRun(start: start, count: count))
        }
    }
}

/// The volume's shared-block table behind its lock. Every commit that adds or drops a reference
/// to a data block resolves it here, under the lock, so two files dropping their references to
/// one block at once free it exactly once.
@usableFromInline
final class SharedBlocks: Sendable {
    /// nil on a device formatted before version 3: it has no table and cannot share.
    private let table: Mutex<SharedBlockTable?>
    @usableFromInline let shared: Atomic<Int>

    /// Whether no block is shared: what the fast pin path checks after pinning for writing (a
    /// clone stores the count before it unfreezes the pages it shared, so a pin that got one of
    /// them sees the count).
    @inlinable var noneShared: Bool { shared.load(ordering: .acquiring) == 0 }

    init(_ table: SharedBlockTable?) {
        self.table = Mutex(table)
        shared = Atomic(Int(table?.sharedBlocks ?? 0))
    }

    /// Whether the device keeps a table (format version 3 and later).
    var canShare: Bool { table.withTrackedLock { $0 != nil } }

    /// Blocks with two or more references.
    var sharedBlockCount: Int { shared.load(ordering: .relaxed) }

    /// The references to each block of `blocks` that is shared (blocks not listed have one).
    func runs(in blocks: Range<UInt64>) -> [SharedRun] {
        guard shared.load(ordering: .acquiring) > 0 else { return [] }
        return table.withTrackedLock { $0?.runs(in: blocks) ?? [] }
    }

    /// Whether any block of `blocks` is shared.
    func isShared(_ blocks: Range<UInt64>) -> Bool { !runs(in: blocks).isEmpty }

    /// The references to `block` (1 when it is not shared).
    func references(to block: UInt64) -> Int { Int(runs(in: block..<(block + 1)).first?.count ?? 1) }

    /// Runs `body` on the table under its lock; the count of shared blocks follows what it leaves.
    func withLock<R: Sendable, E: Error>(_ body: (inout SharedBlockTable?) throws(E) -> R) throws(E) -> R {
        try table.withTrackedLock { (table: inout SharedBlockTable?) throws(E) -> R in
            defer { shared.store(Int(table?.sharedBlocks ?? 0), ordering: .releasing) }
            return try body(&table)
        }
    }

    /// The table as it is now (for check).
    var snapshot: SharedBlockTable? { table.withTrackedLock { $0 } }
}
