/// Shared blocks in mappings: a shared page shows write-protected in a writable mapping, so that
/// a store faults and copies it; copies replace the old blocks in the writing file's mappings only.
extension AddressSpace {
    /// Before the file's blocks are shared (a clone of it): stores through its mappings, live or
    /// unmapped since the last `sync`, are made durable, and every page its writable mappings show is write-protected, so that the next
    /// store faults and copies. Returns the pages that stay writable because the kernel cannot
    /// write-protect them (no fault handler), which must not be shared, and whether no mapping
    /// shows the file at all. Inode lock held.
    func prepareForSharing() -> Namespace.CloneSource {
        let mappings = liveMappings
        var source = Namespace.CloneSource(unmapped: mappings.isEmpty)
        for mapping in mappings where mapping.access == .readWrite {
            mapping.writeBack()
            source.unshareable.formUnion(mapping.protectShown())
        }
        writeBackUnmapped()
        return source
    }

    /// Copies the shared blocks of `pages` for this file and shows the copies in its mappings:
    /// what a store fault, a `.readWrite` pin and a long-term pin do to a shared page. Returns
    /// whether anything was copied. Inode lock held exclusively.
    @discardableResult
    func unshare(_ pages: Range<UInt64>, _ contents: inout Inode.Contents, what: String) throws -> Bool {
        try copyingShared(pages, &contents) { contents in
            !(try data.unshare(&contents, pages, what: what)).isEmpty
        }
    }

    /// Runs `body`, which may give the shared blocks of `pages` copies (copy-on-write), with
    /// those pages taken out of every mapping first and the generation bumped (the gup-fast rule),
    /// so that no pin can find an old shared page through this file while it is copied and
    /// replaced: a pinner that looked before backs off, and the copy waits for its pin to drop.
    /// Afterwards the mappings show what the file then has there; if `body` throws they show what
    /// they showed. Inode lock held exclusively.
    func copyingShared<T>(
        _ pages: Range<UInt64>, _ contents: inout Inode.Contents, _ body: (inout Inode.Contents) throws -> T
    ) throws -> T {
        let shared = data.sharedExtents(in: pages, of: contents.extents)
        let mappings = shared.isEmpty ? [] : liveMappings
        guard !mappings.isEmpty else { return try body(&contents) }
        // Bumped before as well as after: this runs under the shared invalidate lock, beside
        // slow pinners, and one that finds a page gone must also find the generation moved.
        layoutChanged()
        for extent in shared {
            for mapping in mappings { _ = mapping.detach(extent.logicalRange, cut: 0..<0) }
        }
        layoutChanged()
        let result: T
        do {
            result = try body(&contents)
        } catch {
            for mapping in mappings { mapping.restore() }
            layoutChanged()
            throw error
        }
        var now: [Extent] = []
        for extent in shared { now += contents.extents.extents(in: extent.logicalRange) }
        for mapping in mappings {
            // Straight from the old block to the copy, never through a placeholder: a store
            // racing in waits on the old block's write protection or reaches the copy.
            mapping.replaceDetached(with: now)
            mapping.populate(now)
        }
        keepRacedStores(&contents)
        return result
    }
}

extension AddressSpace {
    /// Stores that came in the moment before a page of a mapping was protected or registered
    /// (what ``DAXMapping/takeRacedStores()`` hands over) become the file's, as the fault each
    /// would have taken makes them:
    /// - at a shared block shown privately, a copy: the page gets a block of its own holding
    ///   them, and the files that share the old block never see them;
    /// - at a placeholder where the file has a hole, an allocating fault: a zeroed block with
    ///   them;
    /// - past the end of the file, or at a private copy of a block the file no longer has,
    ///   nothing: the store came before the change that took the page.
    /// Every mapping of the file shows the result. A copy that holds nothing new (a store of the
    /// bytes already there) is dropped from its mapping, whose next access shows the block again:
    /// left, it would go on reading the copy once the block changes. A byte stored in two
    /// mappings' copies takes either one's value, as two racing stores may. Showing the result can
    /// make placeholders that take stores of their own: they are kept in turn, until none is
    /// left. If no block can be had the stores are lost and the pages fault, to show the file as
    /// it is (where the kernel would have sent the storing thread SIGBUS).
    ///
    /// Every operation that shows pages or makes them fault calls it before it lets go of the
    /// inode lock (held exclusively), so that a store is kept in the operation it raced, never
    /// applied over a later change.
    func keepRacedStores(_ contents: inout Inode.Contents) {
        // Each round needs a store that raced a new placeholder of the round before (a show that
        // failed): a few rounds at most in practice; the bound keeps a storm from holding the lock.
        for _ in 0..<Self.racedStoreRounds {
            guard keepRacedStoresOnce(&contents) else { return }
        }
        // Left after the rounds: lost. A mapping that shows a private copy with them drops it,
        // so that it does not go on showing bytes the file does not have.
        for mapping in liveMappings {
            for taken in mapping.takeRacedStores() where !taken.store.overZeros {
                mapping.replacePrivate(taken.page, shared: false)
            }
            _ = mapping.takeRacedStores()
        }
        unmappedRacedStores.withTrackedLock { $0 = [] }
    }

    /// Rounds of ``keepRacedStores(_:)`` before what is left is dropped.
    static let racedStoreRounds = 16

    /// One round of ``keepRacedStores(_:)``: false if there was nothing to keep.
    private func keepRacedStoresOnce(_ contents: inout Inode.Contents) -> Bool {
        let mappings = liveMappings
        var raced: [UInt64: [(mapping: DAXMapping?, store: DAXMapping.RacedStore)]] = [:]
        for taken in unmappedRacedStores.withTrackedLock({ stores in
            defer { stores = [] }
            return stores
        }) {
            raced[taken.page, default: []].append((nil, taken.store))
        }
        for mapping in mappings {
            for taken in mapping.takeRacedStores() { raced[taken.page, default: []].append((mapping, taken.store)) }
        }
        guard !raced.isEmpty else { return false }
        let end = FileData.pageUp(Int(contents.record.size))
        let zeros = [UInt8](repeating: 0, count: PMemDevice.pageSize)
        for (page, stores) in raced.sorted(by: { $0.key < $1.key }) where page < end {
            let block = contents.extents.extent(containing: page)?.block(for: page)
            let original =
                block.map {
                    [UInt8](
                        UnsafeRawBufferPointer(
                            start: device.base + Int($0) * PMemDevice.pageSize, count: PMemDevice.pageSize))
                } ?? zeros
            var bytes = original
            for (_, store) in stores where store.overZeros || block != nil {
                let before = store.overZeros ? zeros : original
                for at in 0..<PMemDevice.pageSize where store.bytes[at] != before[at] { bytes[at] = store.bytes[at] }
            }
            guard bytes != original else {
                for (mapping, store) in stores where !store.overZeros { mapping?.replacePrivate(page, shared: false) }
                continue
            }
            do {
                try keep(bytes, over: original, at: page, block: block, &contents)
            } catch {
                for mapping in mappings { mapping.replacePrivate(page, shared: false) }
            }
        }
        return true
    }

    /// Puts `bytes` in file page `page`, whose block is `block` (nil: a hole) and holds
    /// `original`, as a store that faulted would have: a copy of a shared block, a zeroed block
    /// for a hole, or the block itself, which the file alone names. Every mapping shows the page
    /// then.
    private func keep(
        _ bytes: [UInt8], over original: [UInt8], at page: UInt64, block: UInt64?, _ contents: inout Inode.Contents
    ) throws {
        let pages = page..<(page + 1)
        let what = "a store through a mapping of inode \(inode.number)"
        guard let block else {
            let added = try data.fillHolesZeroed(&contents, pages, what: what)
            if let new = added.first?.block(for: page) {
                bytes.withUnsafeBytes { device.copy($0, at: Int(new) * PMemDevice.pageSize, flags: []) }
            }
            show(added)
            return
        }
        let copied = try copyingShared(pages, &contents) { contents in
            // The copy is nobody's to see until the mappings show it: the stores go in first.
            let copy = try data.unshare(&contents, pages, what: what)
            if let target = copy.first?.block(for: page) {
                bytes.withUnsafeBytes { device.copy($0, at: Int(target) * PMemDevice.pageSize, flags: []) }
            } else {
                // The file's own block, which other mappings may show writable and be storing
                // to: only the bytes the raced stores changed are written, never the rest.
                var offset = 0
                while offset < PMemDevice.pageSize {
                    guard bytes[offset] != original[offset] else {
                        offset += 1
                        continue
                    }
                    var end = offset + 1
                    while end < PMemDevice.pageSize, bytes[end] != original[end] { end += 1 }
                    bytes[offset..<end].withUnsafeBytes {
                        device.copy($0, at: Int(block) * PMemDevice.pageSize + offset, flags: [])
                    }
                    offset = end
                }
            }
            return !copy.isEmpty
        }
        // Not shared any more: the stores went into the file's own block, which the mappings
        // that show it through a private mapping now show shared.
        if !copied {
            for mapping in liveMappings { mapping.replacePrivate(page, shared: true) }
        }
    }
}

extension DAXMapping {
    /// Write-protects every page this mapping shows of file pages `pages` (all of them by
    /// default), for a clone or a dedup of its file. Returns the file pages it could not protect
    /// (no handler, or the kernel refused). Inode lock held.
    func protectShown(_ pages: Range<UInt64> = 0..<UInt64.max) -> Set<UInt64> {
        state.withTrackedLock { state in
            guard !state.unmapped, let local = localRange(pages) else { return [] }
            var unprotected: Set<UInt64> = []
            var index = local.lowerBound
            while index < local.upperBound {
                guard entries[index].load(ordering: .relaxed) != 0 else {
                    index += 1
                    continue
                }
                var end = index + 1
                while end < local.upperBound, entries[end].load(ordering: .relaxed) != 0 { end += 1 }
                if !writeProtect(index..<end) {
                    for page in index..<end { unprotected.insert(firstPage + UInt64(page)) }
                }
                index = end
            }
            return unprotected
        }
    }

    /// Write-protects pages `run` of the mapping, which show blocks: registered for write-protect
    /// faults first (device pages are registered lazily). Returns false if the kernel cannot.
    func writeProtect(_ run: Range<Int>) -> Bool {
        guard let faults else { return false }
        let address = base + run.lowerBound * PMemDevice.pageSize
        let length = run.count * PMemDevice.pageSize
        return faults.registerAgain(address, length: length, modes: MappingRegion.faultModes(access))
            && faults.writeProtect(address, length: length, true)
    }
}
