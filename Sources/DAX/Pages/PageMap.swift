import Glibc
import Synchronization

/// Pin totals of a page map, in pages, like `/proc/vmstat`'s `nr_foll_pin_*`.
///
/// Read without waiting for anyone. Every pin or unpin whose effect on a descriptor the reader has
/// seen (a truncate that found the page idle, a thread woken by the final unpin, a joined thread)
/// is counted. While other threads pin and unpin, the totals may also count changes they have
/// begun but not yet made to a descriptor, a few instructions early, and a pin and unpin made
/// during the read may show only its pin: they are off by at most the changes made meanwhile. At
/// rest, `acquired - released` is exactly the sum of `pinCount` over all descriptors, and
/// ``pinnedPages`` exactly the number of descriptors with `pinCount > 0`.
public struct PinTotals: Sendable, Equatable {
    /// Pages pinned.
    public var acquired: Int
    /// Pages unpinned, or revoked with their lease.
    public var released: Int
    /// Descriptors with `pinCount > 0`.
    public var pinnedPages: Int
}

/// One descriptor per device page: the kernel's memmap (`vmemmap`), with `pfn_to_page` and
/// `page_to_pfn` both O(1).
///
/// Runtime state only, never written to the device. A descriptor is 16 bytes (Linux's `struct
/// page` is 64); the table is reserved as address space and backed lazily by the kernel, so a 1 TiB
/// device pays memory only for the descriptors it uses.
public final class PageMap: Sendable {
    /// Descriptors, one per device page.
    public let count: Int
    @usableFromInline let table: MemMap
    /// The device's system-call seam: the table is reserved, looked at and released through it.
    private let calls: SystemCalls

    /// The zero frame: a page past the device's last one that reads as zeros and is never
    /// written, the kernel's shared zero page. A short-term `.readOnly` pin of a hole shows it among its
    /// frames; a device reading by it reads zeros. It has a descriptor of its own, which no file
    /// owns and no pin counts: as `pin_user_pages` takes no pin on the zero page, its counts stay
    /// put, and the pin statistics count a pin's device pages only.
    public var zeroFrame: PageFrameNumber { PageFrameNumber(rawValue: UInt64(count)) }

    /// A table of `pageCount` descriptors (and one for ``zeroFrame``), reserved with `mmap`
    /// through `calls`.
    package init(pageCount: Int, calls: SystemCalls = .live) throws {
        precondition(pageCount > 0)
        let bytes =
            ((pageCount + 1) * MemoryLayout<PageDescriptor>.stride + Int(getpagesize()) - 1)
            & ~(Int(getpagesize()) - 1)
        guard
            let memory = calls.mmap(
                nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        else {
            throw DAXError.system(
                "mmap", "cannot reserve \(counted(bytes, "byte")) for \(pageCount) page descriptors",
                errno: Glibc.errno)
        }
        // Zeroed memory is a valid table: no counts, no flags, no owner.
        let descriptors = memory.bindMemory(to: PageDescriptor.self, capacity: pageCount + 1)
        let core = UnsafeMutablePointer<PageTableCore>.allocate(capacity: 1)
        core.initialize(
            to: PageTableCore(
                descriptors: descriptors, count: pageCount + 1, tableBytes: bytes, tallySlot: PinTally.claimSlot() ?? -1
            ))
        self.count = pageCount
        self.table = MemMap(core: core)
        self.calls = calls
    }

    /// Marks the zero frame allocated for good (no file owns it), so that it reads as a page in
    /// use; done at its first use, so that an unused table stays untouched memory.
    func prepareZeroFrame() {
        let counts = table.descriptor(UInt64(count))
        if counts.pointee.counts.load(ordering: .relaxed) & PageWord.allocated == 0 {
            counts.pointee.counts.bitwiseOr(PageWord.allocated, ordering: .sequentiallyConsistent)
        }
    }

    deinit {
        guard table.isFreeable else {
            // Pins outlive the map, or a release is still running: leave the table in place so
            // that their release stays safe.
            return
        }
        if table.core.pointee.tallySlot >= 0 { PinTally.releaseSlot(table.core.pointee.tallySlot) }
        _ = calls.munmap(UnsafeMutableRawPointer(table.core.pointee.descriptors), table.core.pointee.tableBytes)
        table.core.deinitialize(count: 1)
        table.core.deallocate()
    }

    /// A snapshot of the descriptor of `frame`. A frame past the device and its zero frame has
    /// no descriptor, and nothing can hold it: its state is all zeros, not allocated (a query
    /// that cannot throw answers rather than stop the process over a wrong number).
    public func state(of frame: PageFrameNumber) -> PageState {
        guard frame.rawValue <= UInt64(count) else {
            return PageState(refCount: 0, pinCount: 0, mapCount: 0, isAllocated: false, isQuarantined: false)
        }
        let descriptor = table.descriptor(frame.rawValue)
        return PageState(
            word: descriptor.pointee.counts.load(ordering: .acquiring),
            owner: descriptor.pointee.owner.load(ordering: .relaxed))
    }

    /// Bytes of one descriptor, as laid out in the table.
    public static var bytesPerDescriptor: Int { MemoryLayout<PageDescriptor>.stride }

    /// Bytes of the table the kernel has actually backed with memory so far (`mincore`).
    public var residentTableBytes: Int {
        let pageSize = Int(getpagesize())
        let pages = table.core.pointee.tableBytes / pageSize
        var vector = [UInt8](repeating: 0, count: pages)
        let status = vector.withUnsafeMutableBufferPointer {
            calls.mincore(
                UnsafeMutableRawPointer(table.core.pointee.descriptors), table.core.pointee.tableBytes,
                $0.baseAddress!)
        }
        guard status == 0 else { return -1 }
        return vector.reduce(0) { $0 + Int($1 & 1) } * pageSize
    }

    /// Bytes of address space reserved for the table.
    public var reservedTableBytes: Int { table.core.pointee.tableBytes }

    // MARK: - Pin totals

    /// The pin totals, read together, at once (no wait, no deadline): see ``PinTotals`` for what
    /// they count while other threads pin. Under concurrent pinning, `acquired - released` is
    /// never below the number of pins held throughout the read.
    public var pinTotals: PinTotals { table.totals() }
    /// Pages pinned since the map was made (the kernel's `nr_foll_pin_acquired`).
    public var pinsAcquired: Int { table.totals().acquired }
    /// Pages unpinned or revoked since the map was made (`nr_foll_pin_released`).
    public var pinsReleased: Int { table.totals().released }
    /// Descriptors whose `pinCount` is above zero now. Exact at rest; while other threads pin and
    /// unpin it may also count the transitions they have begun (see ``PinTotals``).
    public var pinnedPageCount: Int { table.totals().pinnedPages }

    // MARK: - References (package API: the layers above use these)

    private func check(_ frame: PageFrameNumber) throws {
        guard frame.rawValue < UInt64(count) else {
            throw DAXError(.invalidArgument, "\(frame) is outside the device's \(counted(count, "page"))")
        }
    }

    /// Takes a transient reference (the kernel's `folio_try_get`): fails on a free or frozen page.
    package func tryGet(_ frame: PageFrameNumber) -> Bool {
        guard frame.rawValue < UInt64(count) else { return false }
        return table.tryGet(frame.rawValue, adding: PageWord.refOne) == nil
    }

    /// Drops a reference taken with ``tryGet(_:)``; the last one wakes waiters.
    package func put(_ frame: PageFrameNumber) {
        precondition(frame.rawValue < UInt64(count), "\(frame) is outside the page map")
        table.put(frame.rawValue, removing: PageWord.refOne)
    }

    /// Adds a mapping (a reference and a map count) unless the page is free or frozen.
    package func tryMap(_ frame: PageFrameNumber) throws {
        try check(frame)
        if let failure = table.tryGet(frame.rawValue, adding: PageWord.refOne | PageWord.mapOne) {
            throw MemMap.error(for: failure, frame: frame.rawValue, what: "map")
        }
    }

    /// Drops a mapping added with ``tryMap(_:)``.
    package func unmap(_ frame: PageFrameNumber) {
        precondition(frame.rawValue < UInt64(count), "\(frame) is outside the page map")
        table.put(frame.rawValue, removing: PageWord.refOne | PageWord.mapOne)
    }

    /// Pins `frames` (all or none): `pin_user_pages` on device frames, without the file checks that
    /// ``DAXMapping/pin(offset:count:access:lifetime:)`` makes.
    package func pin(
        _ frames: some Sequence<PageFrameNumber>, access: Access = .readWrite, lifetime: PinLifetime = .shortTerm
    ) throws -> PinnedPages {
        let runs = FrameRuns(frames)
        for run in runs.runs where run.start + UInt64(run.count) > UInt64(count) {
            throw DAXError(
                .invalidArgument, "frames \(run.start)..<\(run.start + UInt64(run.count)) are outside the device")
        }
        guard runs.pageCount > 0 else { throw DAXError(.invalidArgument, "no frames to pin") }
        return try pin(runs: runs, access: access, lifetime: lifetime)
    }

    /// Pins `count` contiguous frames from `first` for short-term use. Inlinable: a one-page pin
    /// runs in the caller without a call.
    @inlinable @inline(__always)
    package func pin(first: PageFrameNumber, count pages: Int) throws -> PinnedPages {
        guard pages == 1, first.rawValue < UInt64(truncatingIfNeeded: count) else {
            return try pinRun(first: first, count: pages)
        }
        try table.pinOne(first.rawValue)
        return PinnedPages(table: table, headStart: first.rawValue, headCount: 1, access: .readWrite)
    }

    @usableFromInline
    func pinRun(first: PageFrameNumber, count pages: Int) throws -> PinnedPages {
        guard pages > 0, first.rawValue < UInt64(count), UInt64(pages) <= UInt64(count) - first.rawValue else {
            throw DAXError(
                .invalidArgument,
                "cannot pin \(pages) frames from \(first): outside the device's \(counted(count, "page"))")
        }
        let run = PageRun(start: first.rawValue, count: pages)
        try table.pin(run)
        return PinnedPages(table: table, head: run, access: .readWrite)
    }

    /// Pins `count` contiguous frames from `first`.
    package func pin(first: PageFrameNumber, count pages: Int, lifetime: PinLifetime) throws -> PinnedPages {
        guard case .longTerm = lifetime else { return try pin(first: first, count: pages) }
        guard pages > 0, first.rawValue < UInt64(count), UInt64(pages) <= UInt64(count) - first.rawValue else {
            throw DAXError(
                .invalidArgument,
                "cannot pin \(pages) frames from \(first): outside the device's \(counted(count, "page"))")
        }
        return try pin(
            runs: .single(PageRun(start: first.rawValue, count: pages)), access: .readWrite, lifetime: lifetime)
    }

    func pin(runs: FrameRuns, access: Access, lifetime: PinLifetime) throws -> PinnedPages {
        try pin(runs: runs, access: access, lifetime: lifetime, keep: { true })!
    }

    /// Pins `runs`, then asks `keep` whether the pin still stands (the slow pin path's look
    /// again, after the count): if not, the pins are taken back uncounted and nil returned, so
    /// that one pin the caller asked for counts as one however many times it looked.
    func pin(runs: FrameRuns, access: Access, lifetime: PinLifetime, keep: () -> Bool) throws -> PinnedPages? {
        try table.pin(runs)
        guard keep() else {
            table.takeBack(runs)
            return nil
        }
        switch lifetime {
        case .shortTerm:
            return PinnedPages(table: table, runs: runs, lease: nil, access: access)
        case .longTerm(let onRevoke):
            let lease = PinLease(table: table, runs: runs, onRevoke: onRevoke)
            lease.register()
            return PinnedPages(table: table, runs: runs, lease: lease, access: access)
        }
    }

    /// Live long-term pins that hold any frame `contains` accepts.
    func leases(where contains: (UInt64) -> Bool) -> [PinLease] {
        let all = table.core.pointee.leases.withTrackedLock { Array($0.values) }
        return all.filter { lease in
            var hit = false
            lease.runs.forEachFrame { frame in
                hit = contains(frame)
                return !hit
            }
            return hit
        }
    }

    /// How many pins the active leases hold on each of `frames` (absent: none).
    func leasePins(on frames: [UInt64]) -> [UInt64: UInt64] {
        let wanted = Set(frames)
        var pins: [UInt64: UInt64] = [:]
        for lease in leases(where: wanted.contains) where lease.isActive {
            lease.runs.forEachFrame { frame in
                if wanted.contains(frame) { pins[frame, default: 0] += 1 }
                return true
            }
        }
        return pins
    }

    // MARK: - Freeze

    /// The kernel's `page_ref_freeze`: if the page has exactly `expectedRefCount` references and
    /// no pin, marks it frozen so that every try-get, pin and map fails until ``unfreeze(_:)``.
    /// Returns false if anyone holds a reference beyond those expected.
    package func freeze(_ frame: PageFrameNumber, expectedRefCount: Int) -> Bool {
        guard frame.rawValue < UInt64(count) else { return false }
        let counts = table.descriptor(frame.rawValue)
        var old = counts.pointee.counts.load(ordering: .relaxed)
        while true {
            guard PageWord.refCount(old) == UInt64(expectedRefCount), PageWord.pinCount(old) == 0,
                old & PageWord.frozen == 0
            else { return false }
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: old | PageWord.frozen, ordering: .sequentiallyConsistent)
            if exchanged { return true }
            old = current
        }
    }

    /// Freezes the page at the count its mappings explain: no pin and no reference beyond one per
    /// mapping that shows it. What copy-on-write, dedup and clone decide by (a compare-and-swap,
    /// so that a pinner racing in either got its pin first, and the freeze fails, or fails itself).
    func freezeAtMappings(_ frame: PageFrameNumber) -> Bool {
        guard frame.rawValue < UInt64(count) else { return false }
        let counts = table.descriptor(frame.rawValue)
        var old = counts.pointee.counts.load(ordering: .relaxed)
        while true {
            guard PageWord.isIdleExceptMappings(old), old & PageWord.frozen == 0 else { return false }
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: old | PageWord.frozen, ordering: .sequentiallyConsistent)
            if exchanged { return true }
            old = current
        }
    }

    /// ``freezeAtMappings(_:)`` for frames `start..<start+count`, in order, until one will not
    /// freeze. Returns how many froze (the first that did not is `start + result`, if any).
    func freezeAtMappings(run start: UInt64, count pages: Int) -> Int {
        guard start < UInt64(count), UInt64(pages) <= UInt64(count) - start else { return 0 }
        for index in 0..<pages {
            let counts = table.descriptor(start + UInt64(index))
            var old = counts.pointee.counts.load(ordering: .relaxed)
            while true {
                guard PageWord.isIdleExceptMappings(old), old & PageWord.frozen == 0 else { return index }
                let (exchanged, current) = counts.pointee.counts.compareExchange(
                    expected: old, desired: old | PageWord.frozen, ordering: .sequentiallyConsistent)
                if exchanged { break }
                old = current
            }
        }
        return pages
    }

    /// How many of frames `start..<start+count`, from the first, hold no reference beyond their
    /// mappings, no pin and no freeze: ``freezeAtMappings(run:count:)``'s test without the freeze,
    /// for a caller that knows no reference can be taken meanwhile (a clone of a file that no
    /// mapping shows, under its inode lock).
    func idleExceptMappings(run start: UInt64, count pages: Int) -> Int {
        guard start < UInt64(count), UInt64(pages) <= UInt64(count) - start else { return 0 }
        for index in 0..<pages {
            let word = table.word(start + UInt64(index))
            guard PageWord.isIdleExceptMappings(word), word & PageWord.frozen == 0 else { return index }
        }
        return pages
    }

    /// Ends the freezes of frames `run` (each frozen), waking pinners that wait for any of them.
    func unfreeze(_ run: PageRun) {
        precondition(
            run.start < UInt64(count) && run.count <= UInt64(count) - run.start, "\(run) is outside the page map")
        var waiters = false
        for frame in run.range {
            let old = table.descriptor(frame).pointee.counts.bitwiseAnd(
                ~PageWord.frozen, ordering: .sequentiallyConsistent
            )
            .oldValue
            precondition(old & PageWord.frozen != 0, "unfreeze of pfn \(frame), which is not frozen")
            if old & PageWord.waiters != 0 { waiters = true }
        }
        if waiters { table.core.pointee.waitQueue.wakeAll() }
    }

    /// Ends a freeze (`page_ref_unfreeze`).
    package func unfreeze(_ frame: PageFrameNumber) {
        precondition(frame.rawValue < UInt64(count), "\(frame) is outside the page map")
        let old = table.descriptor(frame.rawValue).pointee.counts.bitwiseAnd(
            ~PageWord.frozen,
            ordering: .sequentiallyConsistent
        ).oldValue
        precondition(old & PageWord.frozen != 0, "unfreeze of \(frame), which is not frozen")
        // A pinner that found the page frozen sleeps until it thaws.
        if old & PageWord.waiters != 0 { table.core.pointee.waitQueue.wakeAll() }
    }

    // MARK: - Waiting

    /// Sleeps until every page of `frames` has no reference beyond its mappings and no pin, or
    /// until `timeout` passes. Woken by the final put or unpin; never polls. Returns whether all
    /// pages were idle.
    package func waitUntilIdle(_ frames: some Sequence<PageFrameNumber>, timeout: Duration) -> Bool {
        waitUntil(frames.map(\.rawValue), deadline: Deadline(after: timeout), PageWord.isIdleExceptMappings)
    }

    /// Sleeps until no page of `frames` has a reference beyond its mappings or a pin, or until
    /// `deadline` passes (``Deadline/distantFuture``: no limit); returns the pages still busy then,
    /// in order (none: all went idle).
    ///
    /// What break layouts calls after revoking leases, to wait out the transient references left:
    /// a gup-fast pinner backing off, a transient get. It never polls: it sets each busy page's
    /// `waiters` bit and sleeps, and every decrement that replaces a value carrying the bit wakes
    /// it: the put of a transient get, an unpin or revocation, a pin taken back, an unmap. It takes
    /// no lock a holder needs to let go, so it may be called holding the inode's locks, if every
    /// holder can drop its reference without them (under the invalidate lock no new one starts).
    /// The result comes from sequentially consistent loads, so it can stand for the scan of break
    /// layouts.
    func waitOutTransientReferences(_ frames: [UInt64], deadline: Deadline) -> [UInt64] {
        _ = waitUntil(frames, deadline: deadline, PageWord.isIdleExceptMappings)
        return frames.filter { !PageWord.isIdleExceptMappings(table.word($0)) }
    }

    /// Sleeps until `isIdle` holds for every frame's counts word, or the deadline passes.
    func waitUntil(_ frames: [UInt64], deadline: Deadline, _ isIdle: (UInt64) -> Bool) -> Bool {
        waitUntil(frames, deadline: deadline) { _, word in isIdle(word) }
    }

    /// Sleeps until `isIdle(frame, word)` holds for every frame, or the deadline passes.
    func waitUntil(_ frames: [UInt64], deadline: Deadline, _ isIdle: (UInt64, UInt64) -> Bool) -> Bool {
        if frames.allSatisfy({ isIdle($0, table.word($0)) }) { return true }
        let queue = table.core.pointee.waitQueue
        let waiter = PageWaitQueue.Waiter()
        queue.register(waiter)
        defer { queue.unregister(waiter) }
        var next = 0
        while true {
            // Pages before `next` were idle when last looked at; find the first busy one from there.
            while next < frames.count {
                let counts = table.descriptor(frames[next])
                if isIdle(frames[next], counts.pointee.counts.load(ordering: .acquiring)) {
                    next += 1
                    continue
                }
                let word = counts.pointee.counts.bitwiseOr(PageWord.waiters, ordering: .sequentiallyConsistent).newValue
                if isIdle(frames[next], word) {
                    next += 1
                    continue
                }
                break
            }
            if next == frames.count {
                // Idle one by one; confirm all at once, since an early page may have been taken again.
                if let busy = frames.firstIndex(where: { !isIdle($0, table.word($0)) }) {
                    next = busy
                    continue
                }
                return true
            }
            if waiter.semaphore.wait(timeout: deadline.dispatchTime) == .timedOut {
                return frames.allSatisfy { isIdle($0, table.word($0)) }
            }
        }
    }

    // MARK: - Allocation state (the allocator's side)

    /// Marks a free, idle page allocated to `inode` at `index`. Fails (returns false) if the page is
    /// allocated, quarantined or referenced: invariant 1 checked at the last moment.
    package func markAllocated(_ frame: UInt64, inode: UInt32, index: UInt64) -> Bool {
        let counts = table.descriptor(frame)
        var old = counts.pointee.counts.load(ordering: .relaxed)
        while true {
            guard old & (PageWord.allocated | PageWord.quarantined | PageWord.frozen) == 0,
                PageWord.refCount(old) == 0
            else { return false }
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: old | PageWord.allocated, ordering: .sequentiallyConsistent)
            if exchanged { break }
            old = current
        }
        counts.pointee.owner.store(PageOwner.pack(inode: inode, index: index), ordering: .releasing)
        return true
    }

    /// Records which file page a block now holds (after a move within a file).
    func setOwner(_ frame: UInt64, inode: UInt32, index: UInt64) {
        table.descriptor(frame).pointee.owner.store(PageOwner.pack(inode: inode, index: index), ordering: .releasing)
    }

    /// Frees an allocated page: idle pages become free at once (returns true); a page still
    /// referenced or pinned becomes quarantined (returns false) and is handed to the quarantine
    /// release hook by its final put or unpin.
    package func markFree(_ frame: UInt64) -> Bool {
        let counts = table.descriptor(frame)
        var old = counts.pointee.counts.load(ordering: .relaxed)
        while true {
            precondition(old & PageWord.allocated != 0, "free of pfn \(frame), which is not allocated")
            let busy = PageWord.refCount(old) > 0
            let new = (old & ~PageWord.allocated) | (busy ? PageWord.quarantined : 0)
            let (exchanged, current) = counts.pointee.counts.compareExchange(
                expected: old, desired: new, ordering: .sequentiallyConsistent)
            if exchanged {
                counts.pointee.owner.store(0, ordering: .relaxed)
                return !busy
            }
            old = current
        }
    }

    /// Sets the closure that the final put or unpin of a quarantined page calls.
    func setQuarantineRelease(_ release: (@Sendable (PageFrameNumber) -> Void)?) {
        table.core.pointee.quarantineRelease.withTrackedLock { $0 = QuarantineHook(release: release) }
    }

    /// Clears every allocated flag (unmount): the file system's blocks are no longer owned.
    /// Pages still referenced keep their counts.
    func clearAllocation(_ frames: Range<UInt64>) {
        // Only the parts of the table that were ever written can hold an allocated mark: skip the
        // rest a table page at a time (`mincore`), so that unmount of a huge device costs in
        // proportion to the blocks used, and reading it does not map the whole table.
        for resident in residentFrames(in: frames) {
            for frame in resident {
                let counts = table.descriptor(frame)
                if counts.pointee.counts.load(ordering: .relaxed) & PageWord.allocated != 0 {
                    counts.pointee.counts.bitwiseAnd(~PageWord.allocated, ordering: .sequentiallyConsistent)
                    counts.pointee.owner.store(0, ordering: .relaxed)
                }
            }
        }
    }

    /// The runs of `frames` whose descriptors lie in table pages the kernel has backed; all of
    /// `frames` if `mincore` fails.
    private func residentFrames(in frames: Range<UInt64>) -> [Range<UInt64>] {
        guard !frames.isEmpty else { return [] }
        let pageSize = Int(getpagesize())
        let perPage = UInt64(pageSize / MemoryLayout<PageDescriptor>.stride)
        let firstPage = Int(frames.lowerBound / perPage)
        let lastPage = Int((frames.upperBound - 1) / perPage)
        var vector = [UInt8](repeating: 0, count: lastPage - firstPage + 1)
        let start = UnsafeMutableRawPointer(table.core.pointee.descriptors) + firstPage * pageSize
        let status = vector.withUnsafeMutableBufferPointer {
            calls.mincore(start, $0.count * pageSize, $0.baseAddress!)
        }
        guard status == 0 else { return [frames] }
        var runs: [Range<UInt64>] = []
        var offset = 0
        while offset < vector.count {
            // Eight table pages at a time while none is resident: the common case, by far.
            if offset + 8 <= vector.count,
                vector.withUnsafeBytes({ $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self) })
                    & 0x0101_0101_0101_0101 == 0
            {
                offset += 8
                continue
            }
            defer { offset += 1 }
            guard vector[offset] & 1 != 0 else { continue }
            let page = UInt64(firstPage + offset)
            let run = max(page * perPage, frames.lowerBound)..<min((page + 1) * perPage, frames.upperBound)
            if let last = runs.last, last.upperBound == run.lowerBound {
                runs[runs.count - 1] = last.lowerBound..<run.upperBound
            } else {
                runs.append(run)
            }
        }
        return runs
    }
}
