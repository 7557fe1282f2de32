import CLibPMem
import Glibc
import Synchronization

/// A direct (DAX) mapping of part of a file: loads and stores reach the device pages themselves.
///
/// The mapping is a reserved virtual range into which each extent of the file is mapped from the
/// device file (`mmap(MAP_SHARED | MAP_FIXED)` at the block's device offset), so a byte stored at
/// `baseAddress + i` is the byte at `frame * 4096 + i % 4096` of the device (invariant 3). Each
/// mapped page holds a reference and a map count on its descriptor. With the file system's fault
/// handler, the rest of the range is a placeholder whose faults the handler answers as the
/// kernel's DAX fault handler would: a load of a hole reads zeros, a store gives it a block, an
/// access past the end of the file raises SIGBUS (invariant 6). See `docs/faults.md`.
public final class DAXMapping: Sendable {
    /// The first byte of the mapping (file offset `offset` of ``DAXFile/map(offset:count:access:)``).
    public var baseAddress: UnsafeMutableRawPointer { base }
    /// Bytes asked for.
    public let count: Int
    /// How the mapping may be accessed.
    public let access: Access

    nonisolated(unsafe) let base: UnsafeMutableRawPointer
    /// Bytes reserved: `count` rounded up to whole pages.
    let length: Int
    /// The file's address space: the mapping is one of its mappings.
    @usableFromInline let space: AddressSpace
    let device: PMemDevice
    let inode: Inode
    let path: String
    /// File page of `base`.
    let firstPage: UInt64
    let pageCount: Int
    /// Pins for writing are allowed: mapped `.readWrite` from a file opened `.readWrite`.
    @usableFromInline let writable: Bool
    /// The file system's userfaultfd, when it serves this mapping's faults.
    let faults: UserFaults?
    /// Stores are tracked by page for `sync` (a writable mapping served by the fault handler).
    let tracksDirty: Bool
    @usableFromInline let table: MemMap
    /// The page table: each page's frame, 0 when not mapped (frame 0 is the superblock, never file
    /// data). Read without a lock by the pin fast path; written under `state`.
    @usableFromInline nonisolated(unsafe) let entries: UnsafeMutablePointer<Atomic<UInt64>>

    struct State: ~Copyable {
        var unmapped = false
        /// Pages detached by a break-layouts in progress: their frames, still mapped and counted
        /// until the change commits (then zapped) or fails (then restored).
        var detached: [(index: Int, frame: UInt64)] = []
        /// Holes a `.readOnly` mapping shows as the zero page (no block, nothing counted).
        var zeroPages: Set<Int> = []
        /// Zero pages in the range of a break-layouts in progress: they fault if it commits.
        var detachedZeroPages: Set<Int> = []
        /// Pages from this index on are the region that raises SIGBUS (past the end of the file);
        /// `pageCount` when there is none.
        var sigbusTail: Int
        /// Pages that may hold stores not yet durable (with ``DAXMapping/tracksDirty``).
        var dirty: DirtyPages
        /// Pages of a writable mapping that show a shared block through a private mapping of
        /// it, write-protected: a store in the moment before the protection made a copy in
        /// anonymous memory instead of reaching the block that other files share.
        var privatePages: Set<Int> = []
        /// The pages that a store reached in the moment before their protection or their
        /// registration, by page: what ``AddressSpace/keepRacedStores(_:)`` gives the file.
        var racedStores: [Int: [RacedStore]] = [:]
        /// Pages that still show a block the page table no longer names, by page: a layout change
        /// (truncate, punch, copy-on-write, dedup, migration) found the process out of map
        /// entries, and hiding a page inside a kernel mapping takes one or two more. Each block
        /// stays counted (so a freed one is quarantined, never handed out while shown) until the
        /// page is hidden or shows something else: by the next `sync` or layout change that finds
        /// an entry, or by the unmap. The entries show 0 there.
        var stale: [Int: UInt64] = [:]
    }

    /// A page of anonymous memory that a store made where the mapping showed a page that
    /// took it unprotected: a shared block mapped privately, or a placeholder not yet registered.
    struct RacedStore {
        /// The page as the mapping showed it after the store.
        var bytes: [UInt8]
        /// What the page held before the store: zeros (a placeholder), or the block it showed.
        var overZeros: Bool
    }

    let state: Mutex<State>
    /// Set by ``unmap()`` before the range is given back: the calls that cannot throw refuse then,
    /// rather than touch addresses that may belong to another mapping by now.
    let isGone = Atomic<Bool>(false)

    init(
        space: AddressSpace, path: String, firstPage: UInt64, count: Int, access: Access, writable: Bool,
        base: UnsafeMutableRawPointer, frames: [UInt64], zeroPages: Set<Int> = [], sigbusTail: Int? = nil,
        faults: UserFaults? = nil
    ) {
        let tracksDirty = faults != nil && access == .readWrite && !space.device.isPrivateImage
        var dirty = DirtyPages(pages: tracksDirty ? frames.count : 0)
        if tracksDirty {
            // A page mapped now may be stored to at once: dirty until the first sync.
            var index = 0
            while index < frames.count {
                guard frames[index] != 0 else {
                    index += 1
                    continue
                }
                var end = index + 1
                while end < frames.count, frames[end] != 0 { end += 1 }
                dirty.insert(index..<end)
                index = end
            }
        }
        self.state = Mutex(
            State(zeroPages: zeroPages, sigbusTail: sigbusTail ?? frames.count, dirty: dirty))
        self.faults = faults
        self.tracksDirty = tracksDirty
        self.space = space
        self.device = space.device
        self.inode = space.inode
        self.path = path
        self.firstPage = firstPage
        self.count = count
        self.length = frames.count * PMemDevice.pageSize
        self.pageCount = frames.count
        self.access = access
        self.writable = writable
        self.base = base
        self.table = space.device.pages.table
        entries = .allocate(capacity: frames.count)
        for (index, frame) in frames.enumerated() { (entries + index).initialize(to: Atomic(frame)) }
    }

    /// Dropping the last reference unmaps. That may be the last use of a removed file, which is
    /// then freed: at once, or, when the mapping is dropped inside a file system operation (which
    /// may hold the locks freeing needs), when that operation ends.
    deinit {
        unmap()
        entries.deinitialize(count: pageCount)
        entries.deallocate()
    }

    /// The frame page `index` of the mapping shows now, nil if unmapped.
    func frame(at index: Int) -> UInt64? {
        let frame = entries[index].load(ordering: .acquiring)
        return frame == 0 ? nil : frame
    }

    /// Makes `count` bytes at `offset` of the mapping durable, through the mapping's own addresses:
    /// `pmem_persist` (or `msync` of the mapping, as the device's persistence mode says).
    /// A range outside the mapping, or a call after ``unmap()``, is refused: nothing is flushed
    /// (the device's ``PMemDevice/refusedCalls``).
    public func persist(offset: Int, count: Int) {
        guard accepts("persist", offset, count) else { return }
        device.persist(mappedAt: base + offset, count: count, deviceOffset: deviceOffset(of:))
    }

    /// Copies `source` to `offset` of the mapping with libpmem's persistent copy (`pmem_memcpy`
    /// with `flags`: non-temporal, no-drain, ...), through the mapping's own addresses; in `.msync`
    /// mode a plain copy followed by `msync` of the range. With `.noDrain`, call ``drain()`` once
    /// after the last copy, as PMDK's `simple_copy` does.
    /// A range outside the mapping, a read-only mapping, or a call after ``unmap()``, is refused:
    /// nothing is copied (the device's ``PMemDevice/refusedCalls``).
    public func copy(_ source: UnsafeRawBufferPointer, toOffset offset: Int, flags: CopyFlags = []) {
        guard accepts("copy", offset, source.count, stores: true) else { return }
        device.copy(source, toMappedAt: base + offset, flags: flags, deviceOffset: deviceOffset(of:))
    }

    /// Whether a caller's `what` of `count` bytes at `offset` may go on: inside the mapping, and,
    /// when it stores, a writable mapping. Otherwise the device records the refusal.
    @inline(__always)
    private func accepts(_ what: StaticString, _ offset: Int, _ count: Int, stores: Bool = false) -> Bool {
        if _fastPath(
            PMemDevice.range(offset, count, fitsIn: length) && !(stores && access != .readWrite)
                && !isGone.load(ordering: .relaxed))
        {
            return true
        }
        refuseCall(what, offset, count)
        return false
    }

    /// Has the device record a call that ``accepts(_:_:_:stores:)`` turned down, saying why.
    @inline(never)
    private func refuseCall(_ what: StaticString, _ offset: Int, _ count: Int) {
        if isGone.load(ordering: .relaxed) {
            device.refuse(
                DAXError(
                    .invalidArgument, "\(what) of \(counted(count, "byte")) after the mapping of \(path) was unmapped"))
        } else if PMemDevice.range(offset, count, fitsIn: length) {
            device.refuse(DAXError(.permissionDenied, "\(what) into a read-only mapping of \(path)"))
        } else {
            device.refuse(
                DAXError(
                    .invalidArgument,
                    "\(what) of \(counted(count, "byte")) at offset \(offset) is outside the mapping of \(path) ("
                        + "\(counted(length, "byte")))"))
        }
    }

    /// The device offset of `address` inside the mapping, through the page table; nil where the
    /// page shows no block (a hole, a page cut away). An emulated device tracks lines by it.
    private func deviceOffset(of address: UnsafeMutableRawPointer) -> Int? {
        let position = address - base
        return frame(at: position / PMemDevice.pageSize).map {
            Int($0) * PMemDevice.pageSize + position % PMemDevice.pageSize
        }
    }

    /// Waits until flushed and non-temporal stores are durable (`pmem_drain`; nothing in `.msync`
    /// mode).
    public func drain() { device.drain() }

    /// Unmaps: the addresses become invalid, the pages' map counts drop. A removed file whose last
    /// handle is closed is freed with its last mapping. Idempotent.
    public func unmap() {
        let wasMapped = state.withTrackedLock { state -> Bool in
            guard !state.unmapped else { return false }
            state.unmapped = true
            isGone.store(true, ordering: .relaxed)
            // Before the range is given back: a mapping made there next is tracked afresh, and
            // its faults go to its own handler.
            device.noteUnmapped(base, length: length)
            faults?.forget(base, length: length)
            _ = device.systemCalls.munmap(base, length)
            if state.dirty.count > 0 {
                // Still to be made durable by the next sync, as the kernel's dirty tags outlive a munmap.
                var runs: [PageRun] = []
                for run in state.dirty.takeAll() { appendShownFrames(run, to: &runs) }
                space.unmappedDirtyFrames.withTrackedLock { frames in
                    for run in runs { frames.formUnion(run.range) }
                }
            }
            let pages = device.pages
            for index in 0..<pageCount {
                let frame = entries[index].exchange(0, ordering: .acquiringAndReleasing)
                if frame != 0 { pages.unmap(PageFrameNumber(rawValue: frame)) }
            }
            for page in state.detached { pages.unmap(PageFrameNumber(rawValue: page.frame)) }
            state.detached = []
            for frame in state.stale.values { pages.unmap(PageFrameNumber(rawValue: frame)) }
            state.stale = [:]
            // Stores that raced a change this mapping took part in, made before this unmap: the
            // change, which holds the inode lock, still gives them to the file.
            let stores = takeRacedStores(&state)
            if !stores.isEmpty { space.unmappedRacedStores.withTrackedLock { $0 += stores } }
            return true
        }
        guard wasMapped else { return }
        space.forget(self)
    }

    /// True once unmapped.
    public var isUnmapped: Bool { state.withTrackedLock { $0.unmapped } }

    // MARK: - Break layouts support

    /// Detaches the pages of file pages `pages` from the page table (pins can no longer find them);
    /// they stay mapped and counted. Returns whether any page was detached.
    /// Zero pages (holes of a `.readOnly` mapping) are detached only in `cut`, the pages past the
    /// new end of the file: a punched hole is still a hole, and reads as zeros.
    func detach(_ pages: Range<UInt64>, cut: Range<UInt64>) -> Bool {
        state.withTrackedLock { state in
            guard !state.unmapped, let local = localRange(pages) else { return false }
            let cutLocal = localRange(cut) ?? 0..<0
            var any = false
            for index in local {
                let frame = entries[index].exchange(0, ordering: .sequentiallyConsistent)
                if frame != 0 {
                    state.detached.append((index, frame))
                    any = true
                } else if cutLocal.contains(index), state.zeroPages.remove(index) != nil {
                    state.detachedZeroPages.insert(index)
                    any = true
                }
            }
            return any
        }
    }

    /// Puts the detached pages that show one of `frames` back (a page migration leaves busy):
    /// the rest stay detached.
    func restore(frames: Set<UInt64>) {
        state.withTrackedLock { state in
            guard !state.unmapped else { return }
            state.detached.removeAll { page in
                guard frames.contains(page.frame) else { return false }
                entries[page.index].store(page.frame, ordering: .sequentiallyConsistent)
                return true
            }
        }
    }

    /// Write-protects the detached pages of a writable mapping where they are, so that a store
    /// to one waits in the fault handler while the layout changes (a read-only mapping takes
    /// none). Returns false if the kernel could not protect them all.
    func protectDetached() -> Bool {
        guard access == .readWrite else { return true }
        return state.withTrackedLock { state in
            guard !state.unmapped else { return true }
            var protected = true
            for run in FileData.runs(of: state.detached.map { UInt64($0.index) }) {
                if !writeProtect(Int(run.lowerBound)..<Int(run.upperBound)) { protected = false }
            }
            return protected
        }
    }

    /// Puts detached pages back: the layout change did not happen.
    func restore() {
        state.withTrackedLock { state in
            guard !state.unmapped else { return }
            for page in state.detached { entries[page.index].store(page.frame, ordering: .sequentiallyConsistent) }
            state.detached = []
            state.zeroPages.formUnion(state.detachedZeroPages)
            state.detachedZeroPages = []
        }
    }

    /// The layout change committed: detached pages are replaced by a region that faults, and
    /// their map counts drop. Returns the frames of the pages that could not be hidden (the
    /// process out of map entries): they still show, counted, in ``State/stale``.
    @discardableResult
    func zapDetached() -> Set<UInt64> {
        state.withTrackedLock { state in
            guard !state.unmapped else { return [] }
            return zap(state.detached, &state)
        }
    }

    /// Pages of ``State/stale`` that show one of `frames`, which the file still has there (a
    /// migration that left them in place), show them as before: back in the page table.
    func reinstate(frames: Set<UInt64>) {
        state.withTrackedLock { state in
            guard !state.unmapped, !state.stale.isEmpty else { return }
            for (index, frame) in state.stale where frames.contains(frame) {
                state.stale.removeValue(forKey: index)
                entries[index].store(frame, ordering: .sequentiallyConsistent)
                if tracksDirty { state.dirty.insert(index..<(index + 1)) }
            }
        }
    }

    /// Whether the mapping has work for `sync` to try again: pages that could not be hidden, or
    /// a SIGBUS region that could not be moved up when the file grew to `end` pages.
    func hasPagesToRetry(end: UInt64) -> Bool {
        state.withTrackedLock { state in
            guard !state.unmapped else { return false }
            let local = end <= firstPage ? 0 : Int(min(end - firstPage, UInt64(pageCount)))
            return !state.stale.isEmpty || (faults != nil && state.sigbusTail < local)
        }
    }

    /// The layout change committed, and `extents` are what the file holds now at the detached
    /// pages they cover (copies of shared blocks, migrated blocks, blocks shared by a dedup):
    /// each such page shows its new block at once, by one `mmap` over the old one. The kernel
    /// swaps the one for the other, so a thread storing there meanwhile either reaches the old
    /// block, write-protected, and waits for the handler, or reaches the new one. With a
    /// placeholder in between, a store in the moment before the placeholder is registered would
    /// land in anonymous memory that the new block then replaces: a store lost. A shared block
    /// is mapped privately and write-protected at once (the kernel maps nothing write-protected
    /// from the start): a store in that moment makes a copy, which the caller's
    /// ``AddressSpace/keepRacedStores(_:)`` gives the file. Pages that cannot be shown so are
    /// zapped as ``zapDetached()`` zaps them, and ``populate(_:)`` shows them afterwards.
    func replaceDetached(with extents: [Extent]) {
        state.withTrackedLock { state in
            guard !state.unmapped else { return }
            let sorted = extents.sorted { $0.logical < $1.logical }
            // Each detached page with its new block, in page order; the rest are zapped.
            var moves: [(index: Int, old: UInt64, new: UInt64)] = []
            var left: [(index: Int, frame: UInt64)] = []
            var at = 0  // the first extent that ends after the page: both walks go up
            for page in state.detached.sorted(by: { $0.index < $1.index }) {
                let filePage = firstPage + UInt64(page.index)
                while at < sorted.count, sorted[at].logicalEnd <= filePage { at += 1 }
                if at < sorted.count, sorted[at].logicalRange.contains(filePage) {
                    moves.append((page.index, page.frame, sorted[at].block(for: filePage)))
                } else {
                    left.append(page)
                }
            }
            var start = 0
            while start < moves.count {
                var end = start + 1
                while end < moves.count, moves[end].index == moves[end - 1].index + 1,
                    moves[end].new == moves[end - 1].new + 1
                {
                    end += 1
                }
                // populate's own mapping of a run: one mmap, MAP_FIXED over the old block here.
                let first = moves[start]
                populateRun(
                    first.index..<(first.index + end - start),
                    of: Extent(
                        logical: firstPage + UInt64(first.index), physical: first.new, length: UInt64(end - start)),
                    &state)
                start = end
            }
            // The old blocks lose their counts where the new ones show; a page that could not be
            // shown is zapped with the rest, so that no old block stays mapped uncounted.
            for move in moves {
                if entries[move.index].load(ordering: .relaxed) == move.new {
                    device.pages.unmap(PageFrameNumber(rawValue: move.old))
                } else {
                    left.append((move.index, move.old))
                }
            }
            zap(left, &state)
        }
    }

    /// Replaces the pages of `detached` (and the detached zero pages) by a region that faults
    /// and drops their map counts; the mapping has no detached pages afterwards. Returns the
    /// frames of the pages that could not be hidden, kept counted in ``State/stale``.
    @discardableResult
    private func zap(_ detached: [(index: Int, frame: UInt64)], _ state: inout State) -> Set<UInt64> {
        let pages = device.pages
        hideStale(&state)
        // In order already where one detach took them all (a page is detached once: its entry
        // is zero after), so the sort is one pass.
        var indices = detached.map(\.index)
        indices.append(contentsOf: state.detachedZeroPages)
        indices.sort()
        // The pages made to fault; a detached page left out still shows its block.
        var hidden = Set(indices)
        state.detachedZeroPages = []
        var start = 0
        while start < indices.count {
            var end = start + 1
            while end < indices.count, indices[end] == indices[end - 1] + 1 { end += 1 }
            let run = indices[start]..<indices[end - 1] + 1
            // Whatever was stored there went with the block.
            state.dirty.remove(run)
            // A store kept from the moment before a protection stays in ``State/racedStores``:
            // the operation hands it to the file before it lets go of the inode lock.
            for index in run { state.privatePages.remove(index) }
            // Placeholders again: the next access asks the handler, which sees the file as it is
            // then (a hole, or past its end).
            if makeFaulting(run, &state) {
                device.noteUnmapped(
                    base + run.lowerBound * PMemDevice.pageSize, length: run.count * PMemDevice.pageSize)
            } else {
                hidden.subtract(run)
            }
            start = end
        }
        var unhidden: Set<UInt64> = []
        for page in detached {
            if hidden.contains(page.index) {
                pages.unmap(PageFrameNumber(rawValue: page.frame))
            } else {
                state.stale[page.index] = page.frame
                unhidden.insert(page.frame)
            }
        }
        state.detached = []
        return unhidden
    }

    /// Hides the pages of ``State/stale`` that can be hidden now (`sync`). Inode lock held.
    func hideStalePages() {
        state.withTrackedLock { state in
            guard !state.unmapped else { return }
            hideStale(&state)
        }
    }

    /// Hides the pages of ``State/stale`` that can be hidden now, dropping their blocks' counts
    /// (a quarantined block goes back to the allocator with its last). Under the mapping's lock.
    func hideStale(_ state: inout State) {
        guard !state.stale.isEmpty else { return }
        for run in FileData.runs(of: state.stale.keys.map { UInt64($0) }) {
            let pages = Int(run.lowerBound)..<Int(run.upperBound)
            if makeFaulting(pages, &state) {
                device.noteUnmapped(
                    base + pages.lowerBound * PMemDevice.pageSize, length: pages.count * PMemDevice.pageSize)
            }
        }
    }

    /// Pages `run` show something new (a block, a placeholder, the SIGBUS region): the stale
    /// blocks they showed lose their counts. Under the mapping's lock.
    func forgetStale(_ run: Range<Int>, _ state: inout State) {
        guard !state.stale.isEmpty else { return }
        for index in run {
            if let frame = state.stale.removeValue(forKey: index) {
                device.pages.unmap(PageFrameNumber(rawValue: frame))
            }
        }
    }

    /// Maps the blocks of `extents` at the pages of this mapping that show nothing now (punched
    /// while mapped, or cut off and then given blocks again), as the kernel's next fault would.
    /// Counted first: a page that cannot be counted or mapped keeps faulting, never shows
    /// uncounted.
    func populate(_ extents: [Extent]) {
        state.withTrackedLock { state in
            guard !state.unmapped else { return }
            for extent in extents {
                guard let local = localRange(extent.logicalRange) else { continue }
                // Runs of pages that show nothing, each mapped with one mmap.
                forEachRunShowingNothing(in: local) { populateRun($0, of: extent, &state) }
            }
        }
    }

    /// Calls `body` with each maximal run of pages in `indices` that show no block. Under the
    /// mapping's lock.
    func forEachRunShowingNothing(in indices: Range<Int>, _ body: (Range<Int>) -> Void) {
        var index = indices.lowerBound
        while index < indices.upperBound {
            guard entries[index].load(ordering: .relaxed) == 0 else {
                index += 1
                continue
            }
            var end = index + 1
            while end < indices.upperBound, entries[end].load(ordering: .relaxed) == 0 { end += 1 }
            body(index..<end)
            index = end
        }
    }

    /// Maps pages `run` of the mapping, all showing nothing now, from `extent`: counted first,
    /// then mapped (one `mmap` a piece, ``show(_:firstFrame:_:)``); if that fails, page by page,
    /// and a page that cannot be shown faults.
    private func populateRun(_ run: Range<Int>, of extent: Extent, _ state: inout State) {
        let pageMap = device.pages
        let firstFrame = extent.block(for: firstPage + UInt64(run.lowerBound))
        var counted = 0
        for index in run {
            guard (try? pageMap.tryMap(PageFrameNumber(rawValue: firstFrame + UInt64(index - run.lowerBound)))) != nil
            else { break }
            counted += 1
        }
        // Pages a failed show mapped all the same: they show their new block until hidden.
        var mapped: Set<Int> = []
        if counted == run.count, show(run, firstFrame: firstFrame, &state, mapped: &mapped) {
            for index in run {
                entries[index].store(firstFrame + UInt64(index - run.lowerBound), ordering: .sequentiallyConsistent)
                state.zeroPages.remove(index)
            }
            if tracksDirty { state.dirty.insert(run) }
            return
        }
        for step in 0..<counted { pageMap.unmap(PageFrameNumber(rawValue: firstFrame + UInt64(step))) }
        for index in run {
            let frame = PageFrameNumber(rawValue: firstFrame + UInt64(index - run.lowerBound))
            let address = base + index * PMemDevice.pageSize
            if (try? pageMap.tryMap(frame)) != nil {
                if show(index..<(index + 1), firstFrame: frame.rawValue, &state, mapped: &mapped) {
                    entries[index].store(frame.rawValue, ordering: .sequentiallyConsistent)
                    state.zeroPages.remove(index)
                    if tracksDirty { state.dirty.insert(index..<(index + 1)) }
                    continue
                }
                pageMap.unmap(frame)
            }
            // Not shown (a count at its limit, the process out of map entries, a shared block
            // the kernel cannot write-protect): a zero page there would read stale zeros over
            // data. With a handler the page becomes a placeholder (its next fault tries again),
            // without one it faults.
            let hidden: Bool
            if faults != nil {
                let showsNothing = !state.zeroPages.contains(index) && !mapped.contains(index)
                hidden = makeFaulting(index..<(index + 1), &state, showsNothing: showsNothing) || showsNothing
                if hidden { state.zeroPages.remove(index) }
            } else if state.zeroPages.contains(index) || mapped.contains(index) {
                hidden = MappingRegion.replaceWithFaulting(
                    address, length: PMemDevice.pageSize, access: access, calls: device.systemCalls)
                if hidden { state.zeroPages.remove(index) }
            } else {
                hidden = true
            }
            // A page that shows the new block and cannot stop showing it keeps it counted.
            if !hidden, mapped.contains(index), (try? pageMap.tryMap(frame)) != nil {
                state.stale[index] = frame.rawValue
            }
        }
    }

    /// Maps the blocks from `firstFrame` at pages `run`, counted already: one `mmap` for the
    /// blocks of this file alone. A shared block in a writable mapping is shown through a private
    /// mapping of it and write-protected; a store that came in the moment between the two made a
    /// copy in anonymous memory (the kernel maps nothing born registered with a userfaultfd), and
    /// is kept in ``State/racedStores`` for the file, while the block the other files share never
    /// saw it. Returns false if a piece could not be shown; the run then shows what it showed, or
    /// nothing, and the caller makes it fault. `mapped` gets the pages whose piece was mapped,
    /// whether or not the rest of the run could be.
    private func show(_ run: Range<Int>, firstFrame: UInt64, _ state: inout State, mapped: inout Set<Int>) -> Bool {
        let shared = space.data.volume.shared
        let pieces: [(pages: Range<Int>, shared: Bool)]
        if access == .readWrite, !device.isPrivateImage, shared.sharedBlockCount > 0 {
            var split: [(pages: Range<Int>, shared: Bool)] = []
            var at = run.lowerBound
            for piece in shared.runs(in: firstFrame..<(firstFrame + UInt64(run.count))) {
                let from = run.lowerBound + Int(piece.start - firstFrame)
                if at < from { split.append((at..<from, false)) }
                split.append((from..<(from + Int(piece.length)), true))
                at = from + Int(piece.length)
            }
            if at < run.upperBound { split.append((at..<run.upperBound, false)) }
            pieces = split
        } else {
            pieces = [(run, false)]
        }
        for piece in pieces {
            let address = base + piece.pages.lowerBound * PMemDevice.pageSize
            let frame = firstFrame + UInt64(piece.pages.lowerBound - run.lowerBound)
            guard !piece.shared || faults != nil else { return false }  // a store could not be caught
            do {
                try MappingRegion.mapDevice(
                    device, frame: frame, pages: piece.pages.count, at: address, access: access, exposed: true,
                    faults: faults, privately: piece.shared)
            } catch {
                return false
            }
            mapped.formUnion(piece.pages)
            forgetStale(piece.pages, &state)
            guard piece.shared else {
                for index in piece.pages { state.privatePages.remove(index) }
                continue
            }
            state.privatePages.formUnion(piece.pages)
            guard writeProtect(piece.pages) else { return false }
            keepStoresMadeBeforeProtection(piece.pages, firstFrame: frame, &state)
        }
        return true
    }

    /// Pages `pages` show the blocks from `firstFrame` through a private mapping, write-protected
    /// now: the ones that a store reached first hold a copy in anonymous memory, which the page
    /// table tells (or, where it cannot be read, bytes that differ from the block, among the
    /// resident pages: reading one that is not could fault to the handler, which waits for this
    /// mapping's lock). Their bytes go to ``State/racedStores``.
    private func keepStoresMadeBeforeProtection(_ pages: Range<Int>, firstFrame: UInt64, _ state: inout State) {
        let address = base + pages.lowerBound * PMemDevice.pageSize
        let copied =
            MappingRegion.anonymousPages(at: address, pages: pages.count, calls: device.systemCalls)
            ?? {
                var resident = [UInt8](repeating: 0, count: pages.count)
                guard device.systemCalls.mincore(address, pages.count * PMemDevice.pageSize, &resident) == 0 else {
                    return []
                }
                return (0..<pages.count).filter { step in
                    resident[step] & 1 != 0
                        && memcmp(
                            address + step * PMemDevice.pageSize,
                            device.base + Int(firstFrame + UInt64(step)) * PMemDevice.pageSize, PMemDevice.pageSize)
                            != 0
                }
            }()
        for step in copied {
            state.racedStores[pages.lowerBound + step, default: []].append(
                RacedStore(
                    bytes: [UInt8](
                        UnsafeRawBufferPointer(start: address + step * PMemDevice.pageSize, count: PMemDevice.pageSize)),
                    overZeros: false))
        }
    }

    /// Makes pages `run` fault: with the handler, a placeholder it answers for (see
    /// `MappingRegion.makePlaceholder`), else the region that raises SIGBUS. A placeholder takes
    /// stores unseen in the moment before it is registered, each making a page of anonymous
    /// memory there: those pages are dropped, so that the next access asks the handler, and the
    /// bytes stored go to ``State/racedStores`` for the file.
    /// `showsNothing`: the pages are placeholders already (no block, no zero page), which stay
    /// if no new mapping can be made. Returns false if no mapping could be made there (the process
    /// out of map entries): the pages show what they showed.
    @discardableResult
    func makeFaulting(_ run: Range<Int>, _ state: inout State, showsNothing: Bool = false) -> Bool {
        let address = base + run.lowerBound * PMemDevice.pageSize
        let length = run.count * PMemDevice.pageSize
        guard let faults else {
            guard MappingRegion.replaceWithFaulting(address, length: length, access: access, calls: device.systemCalls)
            else { return false }
            forgetStale(run, &state)
            return true
        }
        guard
            MappingRegion.makePlaceholder(
                address, length: length, access: access, faults: faults, calls: device.systemCalls,
                showsNothing: showsNothing)
        else { return false }
        forgetStale(run, &state)
        // What is resident in a new placeholder came in that moment (the handler, which places
        // pages there, waits for this mapping's lock).
        var resident = [UInt8](repeating: 0, count: run.count)
        guard device.systemCalls.mincore(address, length, &resident) == 0, resident.contains(where: { $0 & 1 != 0 })
        else { return true }
        for step in 0..<run.count where resident[step] & 1 != 0 {
            let pageAddress = address + step * PMemDevice.pageSize
            // Protected before it is read: a later store waits in the handler (for this lock) and
            // is answered once the change is done, as a store to what the file has there then,
            // instead of landing in a page about to be dropped. A read-only placeholder takes no
            // stores.
            if access == .readWrite {
                _ = faults.writeProtect(pageAddress, length: PMemDevice.pageSize, true)
                let page = UnsafeRawBufferPointer(start: pageAddress, count: PMemDevice.pageSize)
                if page.contains(where: { $0 != 0 }) {
                    state.racedStores[run.lowerBound + step, default: []].append(
                        RacedStore(bytes: [UInt8](page), overZeros: true))
                }
            }
            _ = device.systemCalls.madvise(pageAddress, PMemDevice.pageSize, MADV_DONTNEED)
        }
        return true
    }

    /// A store reached page `index`, which shows a block of this file alone through a private
    /// mapping (it was shared when it was shown): the block is mapped shared again, so that the
    /// store reaches it. If it cannot be, the page faults and its next access shows the block.
    func showShared(_ index: Int, frame: UInt64, _ state: inout State) {
        state.privatePages.remove(index)
        do {
            try MappingRegion.mapDevicePage(
                device, frame: frame, at: base + index * PMemDevice.pageSize, access: access, exposed: true,
                faults: faults)
            if tracksDirty { state.dirty.insert(index..<(index + 1)) }
        } catch {
            unshow(index, frame: frame, &state)
        }
    }

    /// Page `index`, which shows `frame`, shows nothing any more: its next access faults. Outside
    /// a layout change (no page detached).
    private func unshow(_ index: Int, frame: UInt64, _ state: inout State) {
        entries[index].store(0, ordering: .sequentiallyConsistent)
        state.dirty.remove(index..<(index + 1))
        state.privatePages.remove(index)
        guard makeFaulting(index..<(index + 1), &state) else {
            // Still shown, through the private mapping: counted until it can be hidden.
            state.stale[index] = frame
            return
        }
        device.noteUnmapped(base + index * PMemDevice.pageSize, length: PMemDevice.pageSize)
        device.pages.unmap(PageFrameNumber(rawValue: frame))
    }

    /// File page `page`, if this mapping shows it through a private mapping: shown shared
    /// (`shared`; its block is the file's alone now), or not at all, so that its next access
    /// shows what the file has. Inode lock held.
    func replacePrivate(_ page: UInt64, shared: Bool) {
        state.withTrackedLock { state in
            guard !state.unmapped, let local = localRange(page..<(page + 1)),
                state.privatePages.contains(local.lowerBound)
            else { return }
            let frame = entries[local.lowerBound].load(ordering: .relaxed)
            guard frame != 0 else { return }
            if shared {
                showShared(local.lowerBound, frame: frame, &state)
            } else {
                unshow(local.lowerBound, frame: frame, &state)
            }
        }
    }

    /// Takes the stores that reached private copies of shared pages before their protection
    /// (``State/racedStores``), by file page.
    func takeRacedStores() -> [(page: UInt64, store: RacedStore)] {
        state.withTrackedLock { takeRacedStores(&$0) }
    }

    /// ``takeRacedStores()`` under the mapping's lock.
    private func takeRacedStores(_ state: inout State) -> [(page: UInt64, store: RacedStore)] {
        guard !state.racedStores.isEmpty else { return [] }
        defer { state.racedStores = [:] }
        return state.racedStores.flatMap { index, stores in stores.map { (firstPage + UInt64(index), $0) } }
    }

    /// The mapping's page indices for file pages `pages`, nil if they do not meet.
    func localRange(_ pages: Range<UInt64>) -> Range<Int>? {
        let start = max(pages.lowerBound, firstPage)
        let end = min(pages.upperBound, firstPage + UInt64(pageCount))
        guard start < end else { return nil }
        return Int(start - firstPage)..<Int(end - firstPage)
    }
}
