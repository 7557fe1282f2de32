import Glibc

/// The fault handler's side of a mapping: each fault is answered as the kernel's DAX fault
/// handler answers it (`docs/faults.md`), and `sync` writes back only the pages stored to.
extension DAXMapping {
    /// Starts serving the mapping's faults with `faults`: the handler answers for the whole range,
    /// and the range (a placeholder, which the blocks are then mapped over) is registered with the
    /// kernel. Called before any block is mapped; nothing can fault there yet.
    static func registerPlaceholder(
        _ base: UnsafeMutableRawPointer, length: Int, access: Access, faults: UserFaults
    ) throws {
        guard faults.registerAgain(base, length: length, modes: MappingRegion.faultModes(access)) else {
            throw DAXError.system(
                "ioctl(UFFDIO_REGISTER)",
                "cannot register a mapping of \(counted(length, "byte")) with the fault handler", errno: errno)
        }
    }

    /// Routes the faults of the mapping's range to it, held weakly: a fault that comes after the
    /// mapping went is woken and finds nothing there.
    func routeFaults(to faults: UserFaults) {
        faults.handle(base, length: length) { [weak self] fault in
            guard let self else {
                faults.wake(fault.address, length: PMemDevice.pageSize)
                return
            }
            resolve(fault, faults)
        }
    }

    /// The file grew to `end` pages: the part of the SIGBUS tail below it becomes a placeholder
    /// again (holes now, read as zeros, filled by a store). A store in the moment before a new
    /// placeholder was registered goes to ``State/racedStores``. Inode lock held. With no map
    /// entry to spare the tail stops at the first run that could not be changed, and `sync`
    /// tries again (``hasPagesToRetry(end:)``).
    func fileGrew(to end: UInt64) {
        guard faults != nil else { return }
        state.withTrackedLock { state in
            guard !state.unmapped, state.sigbusTail < pageCount else { return }
            let newTail = end <= firstPage ? 0 : Int(min(end - firstPage, UInt64(pageCount)))
            guard newTail > state.sigbusTail else { return }
            // Runs that show no block: a block written there meanwhile was mapped over the region.
            var failed: Int?
            forEachRunShowingNothing(in: state.sigbusTail..<newTail) { run in
                if failed == nil, !makeFaulting(run, &state) { failed = run.lowerBound }
            }
            state.sigbusTail = failed ?? newTail
        }
    }

    // MARK: - Answering a fault

    /// What a fault needs once the mapping's lock is let go.
    private enum Answer {
        case answered
        /// The file has a block there that the mapping does not show yet.
        case show(Extent)
        /// A store to a hole: allocate.
        case allocate
        /// A store to a shared block: copy it first.
        case copy
    }

    /// The fault thread: answers `fault` at a page of this mapping, under the invalidate lock
    /// (shared) and the inode lock, as the slow path of `pin` takes them, and as a file system
    /// operation (a mapping dropped meanwhile frees its orphan once the locks are gone).
    private func resolve(_ fault: UserFault, _ faults: UserFaults) {
        let position = Int(bitPattern: fault.address) - Int(bitPattern: base)
        guard position >= 0, position < length else {
            faults.wake(fault.address, length: PMemDevice.pageSize)
            return
        }
        let index = position / PMemDevice.pageSize
        space.namespace.run {
            space.invalidateLock.withReadLock {
                space.inode.contents.write { contents in resolve(fault, at: index, &contents, faults) }
            }
        }
        // Woken once the locks are gone: a thread that goes on to call into the file system (a
        // sync after its store) does not wait for the handler's tail. A thread sent a signal
        // takes it now.
        faults.wake(fault.address, length: PMemDevice.pageSize)
    }

    private func resolve(_ fault: UserFault, at index: Int, _ contents: inout Inode.Contents, _ faults: UserFaults) {
        let handler = space.handler
        let page = firstPage + UInt64(index)
        let end = FileData.pageUp(Int(contents.record.size))
        let address = fault.address
        var raced = false
        let answer: Answer = state.withTrackedLock { state in
            // A page this answer made fault again (a private page that could not be shown
            // shared) may have taken a store in the moment before it was registered.
            defer { raced = !state.racedStores.isEmpty }
            guard !state.unmapped, !contents.isFreed, index < state.sigbusTail else {
                // Unmapped, or a fault queued before the page was resolved by an earlier one.
                return .answered
            }
            if page >= end {
                // With no map entry for the SIGBUS region the thread would only fault here again:
                // the signal is sent.
                if !raiseSigbusPastEnd(end, &state, faults) { faults.signal(SIGBUS, to: fault) }
                handler.sigbus.wrappingAdd(1, ordering: .relaxed)
                return .answered
            }
            let frame = entries[index].load(ordering: .acquiring)
            if frame != 0 {
                let stores = fault.isWrite || fault.isWriteProtect
                if stores, access == .readWrite, space.data.volume.shared.references(to: frame) > 1 {
                    return .copy
                }
                if state.privatePages.contains(index) {
                    // A private mapping of a block that was shared when it was shown: a store
                    // would only make a copy there, so the block, this file's alone now, is
                    // mapped shared first. A load of a page the device file lacks reads zeros,
                    // protected, so that a store still faults. (Every block a file names has
                    // its page in the device file: a new block is zeroed by a store, and only
                    // freed ones are punched out, so this is for a device file changed behind
                    // the file system's back.)
                    if stores {
                        showShared(index, frame: frame, &state)
                    } else {
                        faults.placeZeros(at: address, writeProtect: true, waking: false)
                    }
                    return .answered
                }
                storeToBlock(fault, frame: frame, at: index, &state, faults)
                return .answered
            }
            if let extent = contents.extents.extent(containing: page) { return .show(extent) }
            // A hole.
            guard fault.isWrite || fault.isWriteProtect else {
                let placed =
                    access == .readWrite
                    ? faults.placeZeros(at: address, writeProtect: true, waking: false)
                    : faults.placeZeroPage(at: address, waking: false)
                if placed {
                    state.zeroPages.insert(index)
                    handler.zeroPage.wrappingAdd(1, ordering: .relaxed)
                }
                return .answered
            }
            guard access == .readWrite else {
                // A store to a read-only mapping's hole, which the user made writable with mprotect.
                faults.signal(SIGSEGV, to: fault)
                return .answered
            }
            return .allocate
        }
        if raced { space.keepRacedStores(&contents) }
        switch answer {
        case .answered:
            return
        case .show(let extent):
            populate([extent])
            space.keepRacedStores(&contents)
            signalUnlessShown(fault, at: index, faults)
        case .copy:
            // Copy-on-write: the page gets a block of this file's own, journaled, and every
            // mapping of this file shows it; the other files keep the old block.
            do {
                try space.unshare(
                    page..<(page + 1), &contents, what: "store to a shared page of \(Paths.quoted(path))")
                handler.copyOnWrite.wrappingAdd(1, ordering: .relaxed)
                signalUnlessShown(fault, at: index, faults)
            } catch {
                handler.sigbus.wrappingAdd(1, ordering: .relaxed)
                faults.signal(SIGBUS, to: fault)
            }
        case .allocate:
            // The kernel's page_mkwrite: a zeroed block, journaled as `allocate` journals it, shown
            // in every mapping of the file that shows nothing there, this one included.
            do {
                let added = try space.data.fillHolesZeroed(
                    &contents, page..<(page + 1), what: "store to a hole of \(Paths.quoted(path)) through a mapping")
                handler.allocating.wrappingAdd(1, ordering: .relaxed)
                space.show(added)
                space.keepRacedStores(&contents)
                signalUnlessShown(fault, at: index, faults)
            } catch {
                // No block (or the journal refused): SIGBUS to the thread, nothing else changes.
                handler.sigbus.wrappingAdd(1, ordering: .relaxed)
                faults.signal(SIGBUS, to: fault)
            }
        }
    }

    /// Page `index` shows its block now, or it could not be mapped (the process out of map
    /// entries, a count at its limit): then the thread would fault again at once, so it gets SIGBUS
    /// instead, as the kernel answers a fault it cannot map (`VM_FAULT_SIGBUS`).
    private func signalUnlessShown(_ fault: UserFault, at index: Int, _ faults: UserFaults) {
        // An unmapped mapping shows nothing either: its thread retries and finds no mapping there.
        if entries[index].load(ordering: .acquiring) == 0, !isUnmapped {
            space.handler.sigbus.wrappingAdd(1, ordering: .relaxed)
            faults.signal(SIGBUS, to: fault)
        }
    }

    /// Maps the region that raises SIGBUS over the mapping's pages from the end of the file (`end`
    /// pages) on, which show no block; the faulting thread retries and the kernel itself raises
    /// SIGBUS/`BUS_ADRERR` there (a kernel access gets `EFAULT`). Returns false if the region
    /// could not be mapped (the process out of map entries).
    private func raiseSigbusPastEnd(_ end: UInt64, _ state: inout State, _ faults: UserFaults) -> Bool {
        let from = end <= firstPage ? 0 : Int(end - firstPage)
        guard from < state.sigbusTail else { return true }
        let address = base + from * PMemDevice.pageSize
        let tailLength = (state.sigbusTail - from) * PMemDevice.pageSize
        guard MappingRegion.replaceWithFaulting(address, length: tailLength, access: access, calls: device.systemCalls)
        else { return false }
        forgetStale(from..<state.sigbusTail, &state)
        for index in from..<state.sigbusTail { state.zeroPages.remove(index) }
        state.sigbusTail = from
        return true
    }

    /// A fault at a page that shows a block: a store after `sync` write-protected it (it is dirty
    /// again; an emulated device also notes the store), or a fault queued before the block was
    /// mapped here.
    private func storeToBlock(
        _ fault: UserFault, frame: UInt64, at index: Int, _ state: inout State, _ faults: UserFaults
    ) {
        let address = fault.address
        if fault.isWriteProtect {
            if tracksDirty { state.dirty.insert(index..<(index + 1)) }
            if !device.noteStore(frame: frame, at: address, through: faults) {
                faults.writeProtect(
                    UnsafeMutableRawPointer(bitPattern: address)!, length: PMemDevice.pageSize, false, waking: false)
            }
            return
        }
        // A missing page of the device file itself (a sparse device's never-written block reads as
        // zeros), or a page mapped meanwhile (`EEXIST`): either way the thread may go on.
        faults.placeZeros(at: address, writeProtect: false, waking: false)
        if tracksDirty, fault.isWrite { state.dirty.insert(index..<(index + 1)) }
    }

    // MARK: - sync

    /// `sync` of this mapping: write-protects its dirty pages, so that the next store to one
    /// faults and marks it dirty again, then makes them durable through the device. Returns the
    /// pages written back. A mapping that does not track stores makes every page it shows durable.
    @discardableResult
    func writeBack() -> Int {
        let runs: [PageRun] = state.withTrackedLock { state in
            guard !state.unmapped else { return [] }
            var runs: [PageRun] = []
            guard tracksDirty, let faults else {
                appendShownFrames(0..<pageCount, to: &runs)
                return runs
            }
            for run in state.dirty.takeAll() {
                // Protect first, then flush (the kernel's order): a store racing the flush either
                // is in it or faults and is flushed by the next sync. The blocks' ranges are
                // registered here, at their first sync, not when a fault maps them.
                let address = base + run.lowerBound * PMemDevice.pageSize
                let runLength = run.count * PMemDevice.pageSize
                if !faults.registerAgain(address, length: runLength, modes: MappingRegion.faultModes(access))
                    || !faults.writeProtect(address, length: runLength, true)
                {
                    // The kernel cannot write-protect these pages (a device that is not shared
                    // memory): they stay dirty, and every sync flushes them, as without tracking.
                    state.dirty.insert(run)
                }
                appendShownFrames(run, to: &runs)
            }
            return runs
        }
        for run in runs {
            device.persist(at: Int(run.start) * PMemDevice.pageSize, count: Int(run.count) * PMemDevice.pageSize)
        }
        return runs.reduce(0) { $0 + Int($1.count) }
    }

    /// Appends the frames that pages `indices` of the mapping show, as runs (pages that show
    /// nothing are skipped). Under the mapping's lock.
    func appendShownFrames(_ indices: Range<Int>, to runs: inout [PageRun]) {
        var index = indices.lowerBound
        while index < indices.upperBound {
            let frame = entries[index].load(ordering: .relaxed)
            guard frame != 0 else {
                index += 1
                continue
            }
            // The frames of a stretch of pages are usually consecutive blocks: one run for them.
            var length = 1
            while index + length < indices.upperBound,
                entries[index + length].load(ordering: .relaxed) == frame + UInt64(length)
            {
                length += 1
            }
            runs.append(page: frame, count: UInt64(length))
            index += length
        }
    }
}
