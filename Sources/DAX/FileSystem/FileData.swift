import Glibc

/// The data path of regular files: write, read, allocate, the plans of truncate and punch, and
/// the moves of migration. It answers in values (extents added, a plan to commit, the blocks
/// freed) and never looks at a mapping: the mapping layer shows what changed. Each function takes
/// the file's ``Inode/Contents`` as the inode's lock hands them out (`inout`: held exclusively).
struct FileData: Sendable {
    let volume: Volume

    static let pageSize = Superblock.blockSize
    /// Largest file size: 2^52 bytes (extents address 2^40 pages).
    static let maximumFileSize = Int(Extent.maximumFileSize)

    /// Throws `.invalidArgument` for a negative offset or count, or a range past the largest file.
    static func checkRange(_ offset: Int, _ count: Int, _ operation: String, _ path: String) throws {
        guard offset >= 0, count >= 0 else {
            throw DAXError(
                .invalidArgument,
                "cannot \(operation) \(Paths.quoted(path)): negative offset \(offset) or count \(count)")
        }
        guard count <= maximumFileSize, offset <= maximumFileSize - count else {
            throw DAXError(
                .invalidArgument,
                "cannot \(operation) \(Paths.quoted(path)) at \(offset) + \(count): past the "
                    + "largest file size of \(counted(maximumFileSize, "byte"))")
        }
    }

    static func page(_ offset: Int) -> UInt64 { UInt64(offset / pageSize) }
    static func pageUp(_ offset: Int) -> UInt64 { UInt64((offset + pageSize - 1) / pageSize) }

    /// How new blocks are prepared before a change links them.
    enum Zeroing {
        /// Zero all of them (allocate, map).
        case all
        /// Zero only what the write to `bytes` will not fill.
        case except(Range<Int>)
    }

    /// Allocates blocks for the holes of `pages` into `map` and `change`, zeroing them as told.
    /// Returns the new extents. Gives nothing back on failure: the caller abandons `change`.
    func fillHoles(
        of inode: UInt32, _ pages: Range<UInt64>, map: inout ExtentMap, change: inout PendingChange, zeroing: Zeroing
    ) throws -> [Extent] {
        var added: [Extent] = []
        for hole in map.holes(in: pages) {
            let runs = try volume.allocateBacked(
                Int(hole.count), goal: map.goal(for: hole) ?? volume.allocator.goalFromCursor(plus: hole.lowerBound),
                inode: inode, firstIndex: hole.lowerBound)
            change.allocate(runs, superblock: volume.superblock)
            let extents = Self.extents(of: runs, from: hole.lowerBound)
            try volume.editExtents(&map, of: inode, replacing: hole, with: extents, change: &change)
            added += extents
        }
        for extent in added { zero(extent, zeroing) }
        return added
    }

    /// Extents that map file pages from `logical` on to the blocks of `runs`, in order, none
    /// longer than an extent may be.
    static func extents(of runs: [PageRun], from logical: UInt64) -> [Extent] {
        var logical = logical
        var extents: [Extent] = []
        for run in runs {
            var start = run.start
            var remaining = run.count
            while remaining > 0 {
                let length = min(remaining, Extent.maximumLength)
                extents.append(Extent(logical: logical, physical: start, length: length))
                logical += length
                start += length
                remaining -= length
            }
        }
        return extents
    }

    /// Zeroes the parts of a new extent that must read as zeros (no stale data, invariant 4).
    private func zero(_ extent: Extent, _ zeroing: Zeroing) {
        let start = Int(extent.logical) * Self.pageSize
        let end = Int(extent.logicalEnd) * Self.pageSize
        let deviceStart = Int(extent.physical) * Self.pageSize
        switch zeroing {
        case .all:
            volume.device.fill(at: deviceStart, count: end - start, flags: [.nonTemporal, .noDrain])
        case .except(let written):
            if written.lowerBound > start {
                volume.device.fill(at: deviceStart, count: min(written.lowerBound, end) - start, flags: .noDrain)
            }
            if written.upperBound < end {
                let from = max(written.upperBound, start)
                volume.device.fill(at: deviceStart + (from - start), count: end - from, flags: .noDrain)
            }
        }
    }

    /// Zeroes the bytes of the page holding `size` that lie past it: stores through a mapping may
    /// have left data there, which must not reappear when the file grows.
    func zeroPastEnd(size: Int, map: ExtentMap) {
        guard size % Self.pageSize != 0, let extent = map.extent(containing: Self.page(size)) else { return }
        let page = Self.page(size)
        let offset = Int(extent.block(for: page)) * Self.pageSize + size % Self.pageSize
        volume.device.fill(at: offset, count: Self.pageSize - size % Self.pageSize, flags: .noDrain)
    }

    /// The device offset of file bytes `offset..<end` when one extent holds them all.
    @inline(__always)
    private func contiguousDeviceOffset(_ file: Inode.Contents, _ offset: Int, _ end: Int) -> Int? {
        guard let extent = file.extents.extent(containing: Self.page(offset)),
            Int(extent.logicalEnd) * Self.pageSize >= end
        else { return nil }
        return Int(extent.physical) * Self.pageSize + offset - Int(extent.logical) * Self.pageSize
    }

    /// What a write changed in the file's extents, for the mappings to show.
    struct Written {
        /// Blocks for holes: mappings that showed nothing there must now show them.
        var added: [Extent] = []
        /// Copies of shared blocks: mappings must show them instead of the old blocks.
        var copied: [Extent] = []
    }

    /// Writes `source` at `offset`: allocates holes, copies shared blocks (copy-on-write), fills,
    /// then commits what points at the data.
    @discardableResult
    func writeData(_ file: inout Inode.Contents, _ source: UnsafeRawBufferPointer, at offset: Int) throws -> Written {
        let end = offset + source.count
        if end <= Int(file.record.size), let deviceOffset = contiguousDeviceOffset(file, offset, end),
            volume.shared.sharedBlockCount == 0
                || !volume.shared.isShared(
                    UInt64(deviceOffset / Self.pageSize)..<UInt64((deviceOffset + source.count - 1) / Self.pageSize + 1)
                )
        {
            // An overwrite inside one extent of blocks this file alone names: no metadata
            // changes, the data goes straight in.
            volume.device.copy(source, at: deviceOffset)
            return Written()
        }
        let pages = Self.page(offset)..<Self.pageUp(end)
        var change = PendingChange()
        var map = file.extents
        var record = file.record
        var written = Written()
        do {
            let oldSize = Int(record.size)
            written.added = try fillHoles(
                of: file.number, pages, map: &map, change: &change, zeroing: .except(offset..<end))
            written.copied = try copyShared(of: file.number, pages, map: &map, change: &change)
            if end > oldSize {
                zeroPastEnd(size: oldSize, map: file.extents)
                record.size = UInt64(end)
                record.modificationTime = WallClock.nanosecondsSinceEpoch
                record.changeTime = record.modificationTime
            }
            if !change.transaction.isEmpty || change.changesReferences || end > oldSize {
                change.store(record, extents: map, of: file.number, superblock: volume.superblock)
            }
            try volume.journal.checkFits(change.transaction, what: "write of \(counted(source.count, "byte"))")
            copy(source, into: map, at: offset)
            volume.device.drain()
            try volume.commit(change, what: "write of \(counted(source.count, "byte"))")
        } catch {
            volume.abandon(change)
            throw error
        }
        file.extents = map
        file.record = record
        return written
    }

    /// Copies `source` to the file bytes at `offset`, all of which are mapped in `map`.
    private func copy(_ source: UnsafeRawBufferPointer, into map: ExtentMap, at offset: Int) {
        let end = offset + source.count
        for slice in map.extents(in: Self.page(offset)..<Self.pageUp(end)) {
            let from = max(offset, Int(slice.logical) * Self.pageSize)
            let to = min(end, Int(slice.logicalEnd) * Self.pageSize)
            let deviceOffset = Int(slice.physical) * Self.pageSize + (from - Int(slice.logical) * Self.pageSize)
            volume.device.copy(
                UnsafeRawBufferPointer(rebasing: source[(from - offset)..<(to - offset)]), at: deviceOffset,
                flags: .noDrain)
        }
    }

    /// Reads up to `count` bytes at `offset`; short at the end of the file; holes read as zeros.
    func readData(_ file: Inode.Contents, count: Int, at offset: Int) -> [UInt8] {
        let length = max(0, min(count, Int(file.record.size) - offset))
        guard length > 0 else { return [] }
        return [UInt8](unsafeUninitializedCapacity: length) { buffer, initialized in
            initialized = readData(file, into: UnsafeMutableRawBufferPointer(buffer), at: offset)
        }
    }

    /// Reads into `buffer`; returns the bytes read.
    func readData(_ file: Inode.Contents, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) -> Int {
        let size = Int(file.record.size)
        guard offset < size, buffer.count > 0, let target = buffer.baseAddress else { return 0 }
        let length = min(buffer.count, size - offset)
        let end = offset + length
        if let deviceOffset = contiguousDeviceOffset(file, offset, end) {
            target.copyMemory(from: volume.device.base + deviceOffset, byteCount: length)
            return length
        }
        var position = offset
        for slice in file.extents.extents(in: Self.page(offset)..<Self.pageUp(end)) {
            let from = max(offset, Int(slice.logical) * Self.pageSize)
            let to = min(end, Int(slice.logicalEnd) * Self.pageSize)
            if from > position {
                (target + (position - offset)).initializeMemory(as: UInt8.self, repeating: 0, count: from - position)
            }
            let deviceOffset = Int(slice.physical) * Self.pageSize + (from - Int(slice.logical) * Self.pageSize)
            (target + (from - offset)).copyMemory(from: volume.device.base + deviceOffset, byteCount: to - from)
            position = to
        }
        if position < end {
            (target + (position - offset)).initializeMemory(as: UInt8.self, repeating: 0, count: end - position)
        }
        return length
    }

    /// fallocate: gives the holes of the range zeroed blocks; the size grows to cover it.
    /// Returns the extents it added, which mappings must now show.
    @discardableResult
    func allocateData(_ file: inout Inode.Contents, offset: Int, count: Int) throws -> [Extent] {
        let end = offset + count
        var change = PendingChange()
        var map = file.extents
        var record = file.record
        do {
            let added = try fillHoles(
                of: file.number, Self.page(offset)..<Self.pageUp(end), map: &map, change: &change,
                zeroing: .all)
            let oldSize = Int(record.size)
            if end > oldSize {
                zeroPastEnd(size: oldSize, map: file.extents)
                record.size = UInt64(end)
                record.changeTime = WallClock.nanosecondsSinceEpoch
            }
            guard !added.isEmpty || end > oldSize else { return [] }
            change.store(record, extents: map, of: file.number, superblock: volume.superblock)
            volume.device.drain()
            try volume.commit(change, what: "allocate of \(counted(count, "byte"))")
            file.extents = map
            file.record = record
            return added
        } catch {
            volume.abandon(change)
            throw error
        }
    }

    /// The device frames of the file's pages `pages`, nil for holes.
    func frames(_ file: Inode.Contents, pages: Range<UInt64>) -> [PageFrameNumber?] {
        var result = [PageFrameNumber?](repeating: nil, count: pages.count)
        for slice in file.extents.extents(in: pages) {
            for page in slice.logicalRange {
                result[Int(page - pages.lowerBound)] = PageFrameNumber(rawValue: slice.block(for: page))
            }
        }
        return result
    }

    // MARK: - Layout changes (truncate, punch): planned here, carried out by break layouts

    /// A planned truncate or punch: what it frees and writes. The zeroing of the partial pages at
    /// its edges is part of its transaction, so a crash leaves them zeroed only if it committed.
    struct TruncatePlan {
        var change = PendingChange()
        var extents: ExtentMap
        var record: InodeRecord
        /// File pages whose blocks go.
        var freedPages: Range<UInt64>
        /// Copies of shared blocks at the edges, whose kept part is zeroed: mappings must show
        /// them instead of the old blocks, which the other files keep unchanged.
        var copied: [Extent] = []
        /// File pages past the new end of the file (a shrinking truncate): every mapping must fault
        /// there afterwards, holes it shows as the zero page included.
        var cutPages: Range<UInt64> = 0..<0
        /// The frames of the blocks that leave the file (freed, or still named by another file).
        var freedFrames: [UInt64] { change.dropped.flatMap { Array($0.range) } }
        /// Whether anything leaves the file (break layouts needed).
        var removesBlocks: Bool { !change.dropped.isEmpty }
        /// Whether mappings must change (break layouts needed): blocks go, pages are cut off, or
        /// shared edge pages are copied.
        var changesMappings: Bool { removesBlocks || !cutPages.isEmpty || !copied.isEmpty }
        /// The pages to take out of every mapping: the freed ones, the cut-off ones, and the edge
        /// pages copied from shared blocks (next to the others, so one range holds them all).
        var unmappedPages: Range<UInt64> {
            var ranges = [freedPages, cutPages].filter { !$0.isEmpty } + copied.map(\.logicalRange)
            guard let first = ranges.popLast() else { return freedPages }
            return ranges.reduce(first) { min($0.lowerBound, $1.lowerBound)..<max($0.upperBound, $1.upperBound) }
        }
    }

    /// Plans setting the size to `size` (smaller or larger).
    func planResize(_ file: Inode.Contents, to size: Int) throws -> TruncatePlan {
        let oldSize = Int(file.record.size)
        var plan = TruncatePlan(extents: file.extents, record: file.record, freedPages: 0..<0)
        plan.record.size = UInt64(size)
        plan.record.modificationTime = WallClock.nanosecondsSinceEpoch
        plan.record.changeTime = plan.record.modificationTime
        if size < oldSize {
            let firstFreed = Self.pageUp(size)
            let end = max(plan.extents.endPage, firstFreed)
            plan.freedPages = firstFreed..<end
            plan.cutPages = firstFreed..<max(Self.pageUp(oldSize), firstFreed)
            if end > firstFreed {
                try volume.editExtents(
                    &plan.extents, of: file.number, replacing: plan.freedPages, with: [],
                    change: &plan.change)
            }
            if size % Self.pageSize != 0 {
                try zeroEdges([size..<(Int(firstFreed) * Self.pageSize)], of: file.number, &plan)
            }
        } else if size > oldSize, oldSize % Self.pageSize != 0 {
            try zeroEdges([oldSize..<(Int(Self.pageUp(oldSize)) * Self.pageSize)], of: file.number, &plan)
        }
        plan.change.store(plan.record, extents: plan.extents, of: file.number, superblock: volume.superblock)
        try fits(plan, what: "truncate to \(counted(size, "byte"))")
        return plan
    }

    /// Throws `.noSpace` if the plan's transaction cannot fit the journal, after giving back the leaf
    /// blocks the plan took.
    private func fits(_ plan: TruncatePlan, what: String) throws {
        do {
            try volume.journal.checkFits(plan.change.transaction, what: what)
        } catch {
            volume.abandon(plan.change)
            throw error
        }
    }

    /// Plans a hole over `offset..<offset+count`: whole pages lose their blocks, partial ones are zeroed.
    func planPunch(_ file: Inode.Contents, offset: Int, count: Int) throws -> TruncatePlan {
        // A punch that reaches the end of the file reaches the end of its last page: the bytes past
        // the size read as zeros anyway, so a punch from the page's start frees its block.
        let size = Int(file.record.size)
        let pagedSize = Int(Self.pageUp(size)) * Self.pageSize
        let end = offset + count >= size ? max(pagedSize, offset) : offset + count
        var plan = TruncatePlan(extents: file.extents, record: file.record, freedPages: 0..<0)
        guard end > offset else { return plan }
        let first = Self.pageUp(offset)
        let last = Self.page(end)
        if first < last {
            plan.freedPages = first..<last
            try volume.editExtents(
                &plan.extents, of: file.number, replacing: plan.freedPages, with: [], change: &plan.change)
        }
        let firstWhole = Int(first) * Self.pageSize
        let lastWhole = Int(last) * Self.pageSize
        if !plan.change.transaction.isEmpty || plan.change.changesReferences {
            plan.record.changeTime = WallClock.nanosecondsSinceEpoch
            plan.change.store(plan.record, extents: plan.extents, of: file.number, superblock: volume.superblock)
        }
        if first > last {
            try zeroEdges([offset..<end], of: file.number, &plan)  // inside one page
        } else {
            try zeroEdges(
                [offset..<min(firstWhole, end), max(lastWhole, offset)..<end].filter { !$0.isEmpty },
                of: file.number, &plan)
        }
        try fits(plan, what: "punch of \(counted(count, "byte"))")
        return plan
    }

    /// Zeroes file bytes `ranges` (kept partial pages at the edges of a truncate or punch) in the
    /// plan's transaction, after giving a shared page there a copy of the file's own: the other
    /// files keep their bytes. On failure the caller abandons the plan.
    private func zeroEdges(_ ranges: [Range<Int>], of inode: UInt32, _ plan: inout TruncatePlan) throws {
        for range in ranges where !range.isEmpty {
            let pages = Self.page(range.lowerBound)..<Self.pageUp(range.upperBound)
            let copies = try copyShared(of: inode, pages, map: &plan.extents, change: &plan.change)
            plan.copied += copies
        }
        if !plan.copied.isEmpty {
            plan.change.store(plan.record, extents: plan.extents, of: inode, superblock: volume.superblock)
        }
        journalZeroing(ranges, of: plan.extents, in: &plan.change)
    }

    /// Adds the zeroing of file bytes `ranges` (kept partial pages at the edges of a truncate or
    /// punch) to `change` as write records: the zeros reach the device with the commit, or, after a
    /// crash before it, not at all (invariant 8). Holes need nothing; they read as zeros.
    private func journalZeroing(_ ranges: [Range<Int>], of map: ExtentMap, in change: inout PendingChange) {
        for range in ranges {
            for slice in map.extents(in: Self.page(range.lowerBound)..<Self.pageUp(range.upperBound)) {
                let from = max(range.lowerBound, Int(slice.logical) * Self.pageSize)
                let to = min(range.upperBound, Int(slice.logicalEnd) * Self.pageSize)
                guard to > from else { continue }
                change.transaction.write(
                    [UInt8](repeating: 0, count: to - from),
                    at: Int(slice.physical) * Self.pageSize + from - Int(slice.logical) * Self.pageSize)
            }
        }
    }

    /// Commits a planned layout change once break layouts allowed it (the zeroing of the partial
    /// pages with it). If it throws, nothing was written and the caller still owns the plan's
    /// blocks (``abandon(_:)``).
    func commit(_ plan: inout TruncatePlan) throws {
        try volume.commit(&plan.change, what: "truncate", release: false)
    }

    /// After the commit, and once the pages left every mapping: the freed blocks go back to the
    /// allocator (busy ones quarantined) and the inode takes its new extents and record.
    func release(_ plan: TruncatePlan, of file: inout Inode.Contents) {
        volume.releaseFreed(plan.change.freed)
        file.extents = plan.extents
        file.record = plan.record
    }

    /// Gives back the blocks a plan took (extent leaves) when it will not be committed.
    func abandon(_ plan: TruncatePlan) { volume.abandon(plan.change) }

    /// Gives the holes of `pages` zeroed blocks, as mapping and pinning need. Returns the extents
    /// added.
    @discardableResult
    func fillHolesZeroed(_ file: inout Inode.Contents, _ pages: Range<UInt64>, what: String) throws -> [Extent] {
        guard !file.extents.holes(in: pages).isEmpty else { return [] }
        let number = file.number
        return try commitExtents(&file, what: what) { map, change in
            try fillHoles(of: number, pages, map: &map, change: &change, zeroing: .all)
        }
    }

    /// Runs `edit` on a copy of the file's extents with a new change, then stores the record and
    /// the extents in the change and commits it, after a drain of the data `edit` wrote. On
    /// failure the change gives back what it took and the file is as it was. Returns the extents
    /// `edit` returns.
    func commitExtents(
        _ file: inout Inode.Contents, what: String,
        _ edit: (inout ExtentMap, inout PendingChange) throws -> [Extent]
    ) throws -> [Extent] {
        var change = PendingChange()
        var map = file.extents
        let result: [Extent]
        do {
            result = try edit(&map, &change)
            change.store(file.record, extents: map, of: file.number, superblock: volume.superblock)
            volume.device.drain()
            try volume.commit(change, what: what)
        } catch {
            volume.abandon(change)
            throw error
        }
        file.extents = map
        return result
    }

    // MARK: - Migration

    /// Pages moved to new blocks by ``move(_:_:what:)``: the extents that now hold them, and the
    /// old blocks, to release once nothing holds them frozen.
    struct Move {
        var extents: [Extent]
        var freed: [PageRun]
    }

    /// Moves the file pages of `frozen` (sorted by page; their blocks frozen by the caller, so
    /// nothing reads or writes them) to new blocks: takes them from the first free run long enough
    /// for all of them (contiguous where the free space allows, each block owned by the file page
    /// it holds), copies the bytes, and points the extents at them in one transaction. On failure
    /// nothing changed.
    ///
    /// `goal` is where to look for the new blocks first (nil: the first free run long enough for
    /// this move); it is left just past the last block taken, so that the moves of one long range
    /// in batches follow each other in one free run.
    func move(
        _ file: inout Inode.Contents, _ frozen: [(page: UInt64, block: UInt64)], goal: inout UInt64?, what: String
    ) throws -> Move {
        var change = PendingChange()
        var map = file.extents
        var record = file.record
        var moved: [Extent] = []
        var nextGoal: UInt64?
        do {
            // New blocks for each run of consecutive pages, from the first free run long enough
            // for all of them: contiguous where the free space allows, each block owned by the
            // file page it holds. Then the bytes, and the extents pointed at them.
            // `frozen` is sorted by page, so the runs of pages walk it in order: `next` is the
            // entry of the page being placed.
            var next = 0
            nextGoal = goal ?? volume.allocator.firstAvailableRun(length: frozen.count)
            for pageRun in Self.runs(of: frozen.map(\.page)) {
                let runs = try volume.allocateBacked(
                    pageRun.count, goal: nextGoal, inode: file.number, firstIndex: pageRun.lowerBound)
                change.allocate(runs, superblock: volume.superblock)
                var page = pageRun.lowerBound
                for run in runs {
                    // One copy for each stretch whose old blocks are contiguous too.
                    var step: UInt64 = 0
                    while step < run.count {
                        let from = frozen[next].block
                        var length: UInt64 = 1
                        while step + length < run.count, frozen[next + Int(length)].block == from + length {
                            length += 1
                        }
                        volume.device.copy(
                            UnsafeRawBufferPointer(
                                start: volume.device.base + Int(from) * Self.pageSize,
                                count: Int(length) * Self.pageSize),
                            at: Int(run.start + step) * Self.pageSize, flags: [.nonTemporal, .noDrain])
                        next += Int(length)
                        step += length
                    }
                    var done: UInt64 = 0
                    while done < run.count {
                        let length = min(run.count - done, Extent.maximumLength)
                        let extent = Extent(logical: page + done, physical: run.start + done, length: length)
                        try volume.editExtents(
                            &map, of: file.number, replacing: extent.logicalRange, with: [extent], change: &change)
                        moved.append(extent)
                        done += length
                    }
                    page += run.count
                    nextGoal = run.end
                }
            }
            volume.device.drain()
            record.changeTime = WallClock.nanosecondsSinceEpoch
            change.store(record, extents: map, of: file.number, superblock: volume.superblock)
            try volume.commit(&change, what: what, release: false)
        } catch {
            volume.abandon(change)
            throw error
        }
        file.extents = map
        file.record = record
        goal = nextGoal
        return Move(extents: moved, freed: change.freed)
    }

    /// `pages` (sorted) as contiguous ranges.
    static func runs(of pages: [UInt64]) -> [Range<UInt64>] {
        var runs: [PageRun] = []
        for page in pages.sorted() { runs.append(page: page) }
        return runs.map(\.range)
    }
}
