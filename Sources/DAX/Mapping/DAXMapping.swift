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
    /// their map counts drop.
    func zapDetached() {
        state.withTrackedLock { state in
            guard !state.unmapped else { return }
            zap(state.detached, &state)
        }
    }

    /// The layout change committed, and `extents` are what the file holds now at the detached
    /// pages they cover (copies of shared blocks, migrated blocks, blocks shared by a dedup):
    /// each such page shows its new block at once, by one `mmap` over the old one. The kernel
    /// swaps the one for the other, so a thread storing there meanwhile either reaches the old
    /// block, write-protected, and waits for the handler, or reaches the new one. With a
    /// placeholder in between, a store in the moment before the placeholder is registered would
    /// land in anonymous memory that the new block then replaces: a store lost. A shared block
    /// is write-protected as soon as it is mapped (the kernel maps nothing write-protected from
    /// the start; docs/faults.md says what that moment allows). Pages that cannot be shown so are
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
    /// and drops their map counts; the mapping has no detached pages afterwards.
    private func zap(_ detached: [(index: Int, frame: UInt64)], _ state: inout State) {
        let pages = device.pages
        // In order already where one detach took them all (a page is detached once: its entry
        // is zero after), so the sort is one pass.
        var indices = detached.map(\.index)
        indices.append(contentsOf: state.detachedZeroPages)
        indices.sort()
        state.detachedZeroPages = []
        var start = 0
        while start < indices.count {
            var end = start + 1
            while end < indices.count, indices[end] == indices[end - 1] + 1 { end += 1 }
            let address = base + indices[start] * PMemDevice.pageSize
            let runLength = (end - start) * PMemDevice.pageSize
            if let faults {
                // Placeholders again: the next access asks the handler, which sees the file as
                // it is then (a hole, or past its end).
                MappingRegion.makePlaceholder(
                    address, length: runLength, access: access, faults: faults, calls: device.systemCalls)
            } else {
                MappingRegion.replaceWithFaulting(
                    address, length: runLength, access: access, calls: device.systemCalls)
            }
            device.noteUnmapped(address, length: runLength)
            // Whatever was stored there went with the block.
            state.dirty.remove(indices[start]..<indices[end - 1] + 1)
            start = end
        }
        for page in detached { pages.unmap(PageFrameNumber(rawValue: page.frame)) }
        state.detached = []
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
    /// then one `mmap`; if that fails, page by page, and a page that cannot be shown faults.
    private func populateRun(_ run: Range<Int>, of extent: Extent, _ state: inout State) {
        let pageMap = device.pages
        let firstFrame = extent.block(for: firstPage + UInt64(run.lowerBound))
        var counted = 0
        for index in run {
            guard (try? pageMap.tryMap(PageFrameNumber(rawValue: firstFrame + UInt64(index - run.lowerBound)))) != nil
            else { break }
            counted += 1
        }
        if counted == run.count,
            (try? MappingRegion.mapDevice(
                device, frame: firstFrame, pages: run.count, at: base + run.lowerBound * PMemDevice.pageSize,
                access: access, exposed: true, faults: faults)) != nil
        {
            // Shared blocks show write-protected before anyone can find them: a store copies.
            if protectShared(run, firstFrame: firstFrame) {
                for index in run {
                    entries[index].store(firstFrame + UInt64(index - run.lowerBound), ordering: .sequentiallyConsistent)
                    state.zeroPages.remove(index)
                }
                if tracksDirty { state.dirty.insert(run) }
                return
            }
            // A shared block the kernel cannot write-protect is not shown writable: it faults.
            for step in 0..<counted { pageMap.unmap(PageFrameNumber(rawValue: firstFrame + UInt64(step))) }
            let address = base + run.lowerBound * PMemDevice.pageSize
            if let faults {
                MappingRegion.makePlaceholder(
                    address, length: run.count * PMemDevice.pageSize, access: access, faults: faults,
                    calls: device.systemCalls)
            } else {
                MappingRegion.replaceWithFaulting(
                    address, length: run.count * PMemDevice.pageSize, access: access, calls: device.systemCalls)
            }
            return
        }
        for step in 0..<counted { pageMap.unmap(PageFrameNumber(rawValue: firstFrame + UInt64(step))) }
        for index in run {
            let frame = PageFrameNumber(rawValue: firstFrame + UInt64(index - run.lowerBound))
            let address = base + index * PMemDevice.pageSize
            do {
                try pageMap.tryMap(frame)
                do {
                    try MappingRegion.mapDevicePage(
                        device, frame: frame.rawValue, at: address, access: access, exposed: true, faults: faults)
                    guard protectShared(index..<(index + 1), firstFrame: frame.rawValue) else {
                        throw DAXError(.unsupported, "a shared page cannot be write-protected here")
                    }
                } catch {
                    pageMap.unmap(frame)
                    throw error
                }
                entries[index].store(frame.rawValue, ordering: .sequentiallyConsistent)
                state.zeroPages.remove(index)
                if tracksDirty { state.dirty.insert(index..<(index + 1)) }
            } catch {
                // Not shown (a count at its limit, the process out of map entries): a zero page
                // there would read stale zeros over data. With a handler the page becomes a
                // placeholder (its next fault tries again), without one it faults.
                if let faults {
                    MappingRegion.makePlaceholder(
                        address, length: PMemDevice.pageSize, access: access, faults: faults,
                        calls: device.systemCalls)
                    state.zeroPages.remove(index)
                } else if state.zeroPages.remove(index) != nil {
                    MappingRegion.replaceWithFaulting(
                        address, length: PMemDevice.pageSize, access: access, calls: device.systemCalls)
                }
            }
        }
    }

    /// The mapping's page indices for file pages `pages`, nil if they do not meet.
    func localRange(_ pages: Range<UInt64>) -> Range<Int>? {
        let start = max(pages.lowerBound, firstPage)
        let end = min(pages.upperBound, firstPage + UInt64(pageCount))
        guard start < end else { return nil }
        return Int(start - firstPage)..<Int(end - firstPage)
    }
}
