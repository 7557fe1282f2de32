import Synchronization

extension DAXMapping {
    /// `get_user_pages`/`pin_user_pages`: resolves the pages of `offset..<offset+count` to their
    /// frames and pins them, so that no truncate can hand the blocks to another file while a
    /// device uses them (it waits, fails, quarantines or revokes, as its ``BusyPolicy`` says).
    ///
    /// A `.readWrite` pin needs a `.readWrite` mapping of a file opened `.readWrite`
    /// (`.permissionDenied` otherwise). Pages a punch removed get new zeroed blocks for a
    /// `.readWrite` pin; pages a truncate cut off, or a range outside the mapping, are
    /// `.invalidArgument`. See `docs/pinning.md` for why a pin and a truncate cannot both win.
    @inlinable
    public func pin(
        offset: Int, count: Int, access: Access = .readWrite, lifetime: PinLifetime = .shortTerm
    ) throws -> PinnedPages {
        if case .shortTerm = lifetime, let pinned = pinOnePageInline(offset: offset, count: count, access: access) {
            return pinned
        }
        return try pinChecked(offset: offset, count: count, access: access, lifetime: lifetime)
    }

    /// gup-fast for a one-page range that passes every check, inlined into the caller (a pin is a
    /// few nanoseconds; a call and its checks were half of it); nil sends the caller to the
    /// checked path, which says what is wrong or pins the slow way.
    @inlinable @inline(__always)
    func pinOnePageInline(offset: Int, count: Int, access: Access) -> PinnedPages? {
        let index = offset >> 12
        guard offset >= 0, count > 0, count <= self.count &- offset, (offset &+ count &- 1) >> 12 == index,
            access == .readOnly || (writable && space.sharedBlocks.noneShared)
        else { return nil }
        let generation = space.layoutGeneration.load(ordering: .acquiring)
        let frame = entries[index].load(ordering: .acquiring)
        guard frame != 0, case .success = table.tryPin(frame) else { return nil }
        guard space.layoutGeneration.load(ordering: .sequentiallyConsistent) == generation,
            access == .readOnly || space.sharedBlocks.noneShared
        else {
            // A truncate detached pages after we looked, or a page may be shared (a pin for
            // writing unshares it first, on the slow path): back off without counting anything.
            table.takeBackPin(frame)
            return nil
        }
        return PinnedPages(table: table, headStart: frame, headCount: 1, access: access)
    }

    /// ``pin(offset:count:access:lifetime:)`` with every check, for what the inline path does
    /// not take.
    @usableFromInline
    func pinChecked(
        offset: Int, count: Int, access: Access, lifetime: PinLifetime
    ) throws -> PinnedPages {
        guard count != 0 else {
            throw DAXError(
                .invalidArgument,
                "cannot pin 0 bytes at offset \(offset) of \(Paths.quoted(path)): a pin holds at least one byte")
        }
        guard offset >= 0, count > 0, offset <= self.count, count <= self.count - offset else {
            throw DAXError(
                .invalidArgument,
                "cannot pin \(counted(count, "byte")) at offset \(offset): outside the mapping of "
                    + "\(counted(self.count, "byte")) of \(Paths.quoted(path))")
        }
        if access == .readWrite, !writable {
            throw DAXError(
                .permissionDenied,
                "cannot pin pages of \(Paths.quoted(path)) for writing: the mapping or "
                    + "the file is read-only")
        }
        let first = offset / PMemDevice.pageSize
        let last = (offset + count - 1) / PMemDevice.pageSize
        // A pin for writing of a volume with shared blocks goes the slow way, which unshares
        // first; the fast paths would pin and take the pin back.
        if access == .readOnly || space.sharedBlocks.noneShared {
            if case .shortTerm = lifetime, first == last, let pinned = pinOneFast(first, access: access) {
                return pinned
            }
            if case .shortTerm = lifetime, let pinned = pinFast(first...last, access: access) { return pinned }
        }
        return try pinSlow(first...last, access: access, lifetime: lifetime)
    }

    /// gup-fast for one page: try-get, then re-validate the layout generation; nil sends the
    /// caller to the slow path.
    @inline(__always)
    private func pinOneFast(_ index: Int, access: Access) -> PinnedPages? {
        let generation = space.layoutGeneration.load(ordering: .acquiring)
        let frame = entries[index].load(ordering: .acquiring)
        guard frame != 0 else { return nil }
        guard case .success = table.tryPin(frame) else { return nil }
        guard space.layoutGeneration.load(ordering: .sequentiallyConsistent) == generation,
            access == .readOnly || space.sharedBlocks.noneShared
        else {
            // A truncate detached pages after we looked, or a page may be shared: back off
            // without counting anything.
            table.takeBackPin(frame)
            return nil
        }
        return PinnedPages(table: table, head: PageRun(start: frame, count: 1), access: access)
    }

    /// gup-fast for a range.
    private func pinFast(_ pages: ClosedRange<Int>, access: Access) -> PinnedPages? {
        let generation = space.layoutGeneration.load(ordering: .acquiring)
        var frames: [PageFrameNumber] = []
        frames.reserveCapacity(pages.count)
        for index in pages {
            let frame = entries[index].load(ordering: .acquiring)
            guard frame != 0 else { return nil }
            frames.append(PageFrameNumber(rawValue: frame))
        }
        let runs = FrameRuns(frames)
        guard (try? table.pin(runs)) != nil else { return nil }
        guard space.layoutGeneration.load(ordering: .sequentiallyConsistent) == generation,
            access == .readOnly || space.sharedBlocks.noneShared
        else {
            // Undo as a release of what was just acquired, so the totals stay balanced.
            table.unpin(runs)
            return nil
        }
        return PinnedPages(table: table, runs: runs, lease: nil, access: access)
    }

    /// How long a pin waits for a frozen page to thaw before it is `.busy`.
    static let frozenPageWait: Duration = .seconds(1)

    /// gup-slow: under the invalidate lock no truncate runs; resolve missing pages, then pin.
    /// An operation of the file system (``Namespace/run(_:)``): a mapping whose last reference
    /// goes while `resolve` holds the inode lock frees a removed file only once the locks are gone.
    private func pinSlow(_ pages: ClosedRange<Int>, access: Access, lifetime: PinLifetime) throws -> PinnedPages {
        try space.namespace.run { try pinSlowLocked(pages, access: access, lifetime: lifetime) }
    }

    private func pinSlowLocked(_ pages: ClosedRange<Int>, access: Access, lifetime: PinLifetime) throws -> PinnedPages {
        try space.invalidateLock.withReadLock {
            // No truncate runs now, but an unmap can (and may free an orphan's blocks): re-validate
            // against the layout generation after pinning, as the fast path does.
            var frozenWait: Deadline? = nil
            while true {
                guard !isUnmapped else {
                    throw DAXError(
                        .invalidArgument, "cannot pin pages of \(Paths.quoted(path)): the mapping was unmapped")
                }
                let generation = space.layoutGeneration.load(ordering: .sequentiallyConsistent)
                let missing = pages.filter { entries[$0].load(ordering: .acquiring) == 0 }
                let holes = missing.isEmpty ? [] : try resolve(missing, access: access, lifetime: lifetime)
                var frames: [PageFrameNumber] = []
                var moved = false
                for index in pages {
                    let frame = entries[index].load(ordering: .acquiring)
                    if frame == 0, holes.contains(index) {
                        // A read-only pin of a hole: the zero frame, as GUP returns the zero page.
                        device.pages.prepareZeroFrame()
                        frames.append(device.pages.zeroFrame)
                        continue
                    }
                    if frame == 0, space.layoutGeneration.load(ordering: .sequentiallyConsistent) != generation {
                        // Taken out of the mapping meanwhile (a copy-on-write under the shared
                        // invalidate lock, by a fault or another pin): look again.
                        moved = true
                        break
                    }
                    guard frame != 0 else {
                        throw DAXError(
                            .invalidArgument,
                            "cannot pin page \(firstPage + UInt64(index)) of \(Paths.quoted(path)): "
                                + "it is no longer mapped")
                    }
                    frames.append(PageFrameNumber(rawValue: frame))
                }
                if moved { continue }
                let mustBePrivate: Bool = {
                    if access == .readWrite { return true }
                    if case .longTerm = lifetime { return true }
                    return false
                }()
                if mustBePrivate, !space.sharedBlocks.noneShared,
                    frames.contains(where: { space.sharedBlocks.references(to: $0.rawValue) > 1 })
                {
                    // A device never holds a shared page for writing, nor any page for long:
                    // the file gets its own copies first (break-COW), then the pin looks again.
                    try unshareForPin(pages)
                    continue
                }
                // Shared between the look and the pin (a clone that froze after the look
                // cannot have; one that committed before the pin can), or the layout changed:
                // the pin is taken back uncounted and the pinner looks again.
                var sharedAfterPin = false
                let pinned: PinnedPages?
                do {
                    pinned = try device.pages.pin(runs: FrameRuns(frames), access: access, lifetime: lifetime) {
                        if mustBePrivate, !space.sharedBlocks.noneShared,
                            frames.contains(where: { space.sharedBlocks.references(to: $0.rawValue) > 1 })
                        {
                            sharedAfterPin = true
                            return false
                        }
                        return space.layoutGeneration.load(ordering: .sequentiallyConsistent) == generation
                    }
                } catch let error as DAXError
                    where space.layoutGeneration.load(ordering: .sequentiallyConsistent) != generation
                {
                    _ = error  // a page left the mapping between the look and the pin (freed, moved)
                    continue
                } catch let error as DAXError where error.code == .busy {
                    // A page frozen for a moment (a clone deciding, a migration, a copy): wait for
                    // the freeze to end, as gup waits out a migration entry, and look again; a
                    // freeze that outlasts the wait is `.busy`.
                    let deadline = frozenWait ?? Deadline(after: Self.frozenPageWait)
                    frozenWait = deadline
                    guard !deadline.hasPassed,
                        device.pages.waitUntil(
                            frames.map(\.rawValue), deadline: deadline, { $0 & PageWord.frozen == 0 })
                    else { throw error }
                    continue
                }
                if let pinned { return pinned }
                if sharedAfterPin { try unshareForPin(pages) }
            }
        }
    }

    /// Gives the file copies of the shared blocks behind `pages` of this mapping, shown in its
    /// mappings, before a pin that must hold private pages.
    private func unshareForPin(_ pages: ClosedRange<Int>) throws {
        try inode.contents.write { contents in
            try contents.checkLive(path)
            let filePages = (firstPage + UInt64(pages.lowerBound))..<(firstPage + UInt64(pages.upperBound) + 1)
            try space.unshare(filePages, &contents, what: "pin of \(Paths.quoted(path))")
        }
    }

    /// Maps pages this mapping does not show: past the end of the file they stay faulting (an
    /// error). Returns the holes left, which the pin pins as the zero frame.
    ///
    /// A `.readWrite` pin gives the holes zeroed blocks, as a write fault would; so does a
    /// long-term `.readOnly` one on a writable mount, so that the device reads the page the file
    /// uses and sees what is stored there later (the kernel's R/O long-term unshare, which will not
    /// leave a long-term pin on its zero page where the page can still change). A short-term
    /// `.readOnly` pin leaves them holes.
    private func resolve(_ missing: [Int], access: Access, lifetime: PinLifetime) throws -> Set<Int> {
        try inode.contents.write { contents in
            try contents.checkLive(path)
            let size = Int(contents.record.size)
            for index in missing where firstPage + UInt64(index) >= FileData.pageUp(size) {
                throw DAXError(
                    .invalidArgument,
                    "cannot pin page \(firstPage + UInt64(index)) of \(Paths.quoted(path)): it lies past the end "
                        + "of the file (\(counted(size, "byte"))); the mapping raises SIGBUS there")
            }
            let pages = UInt64(missing.first!)..<(UInt64(missing.last!) + 1)
            let filePages = (firstPage + pages.lowerBound)..<(firstPage + pages.upperBound)
            var holes: Set<Int> = []
            let longTerm: Bool = {
                if case .longTerm = lifetime { return true }
                return false
            }()
            if access == .readWrite || (longTerm && space.data.volume.access == .readWrite) {
                try space.data.fillHolesZeroed(
                    &contents, filePages,
                    what: access == .readWrite
                        ? "pin of \(Paths.quoted(path))" : "long-term read-only pin of \(Paths.quoted(path))")
            } else {
                for hole in contents.extents.holes(in: filePages) {
                    for page in hole { holes.insert(Int(page - firstPage)) }
                }
            }
            // Every live mapping that shows nothing there gets the blocks, as its own fault would.
            space.show(contents.extents.extents(in: filePages))
            space.keepRacedStores(&contents)
            return holes
        }
    }
}
