import Glibc

/// What `check` found.
public struct CheckReport: Sendable, Equatable, CustomStringConvertible {
    /// True when no problem was found.
    public var isClean: Bool
    /// One sentence per problem, naming the inode, block or structure.
    public var problems: [String]
    /// Facts that are not problems (a transaction awaiting replay, orphans awaiting a mount).
    public var notes: [String] = []

    /// A report of `problems` (none when `isClean`).
    public init(isClean: Bool, problems: [String]) {
        self.isClean = isClean
        self.problems = problems
    }

    /// "clean", or the problems, one per line.
    public var description: String {
        guard !isClean else { return "clean" }
        let count = counted(problems.count, "problem")
        return "\(count):\n" + problems.map { "  - " + $0 }.joined(separator: "\n")
    }
}

/// fsck: the online check of a mounted file system (every structure on the device, and the DRAM
/// state against it) and the offline one of a device that is not mounted.
struct Checker {
    let namespace: Namespace

    /// fsck, read-only: validates every structure on the device (checksums, extents, bitmap against
    /// extents, link counts, sizes, the directory tree, the orphan list, an empty journal), and that
    /// the file system's DRAM state agrees with the device.
    func check() throws -> CheckReport {
        // The operations lock for the whole check: `unmount` (and a `close` of the device after
        // it) waits until every inode has been compared.
        try namespace.volume.operations.withReadLock {
            try namespace.volume.checkMounted()
            return checkLocked()
        }
    }

    private func checkLocked() -> CheckReport {
        var problems: [String] = []
        var notes: [String] = []
        // A read-only mount leaves a torn journal header as the crash left it (a read-write one
        // empties the journal): what the offline check notes, not a problem.
        let tornHeader: Bool = {
            guard namespace.volume.access == .readOnly,
                case .tornHeader = try? Journal.read(
                    device: namespace.volume.device, superblock: namespace.volume.superblock)
            else { return false }
            return true
        }()
        if tornHeader {
            notes.append(
                "the journal header is torn (a crash while committing); a read-write mount discards it")
        }
        namespace.lock.withReadLock {
            // The orphan list changes (on the device and in memory at once) only under the orphans
            // lock, which a commit nests inside: holding it, then the journal, the device's list and
            // the mounted one are read at one moment, while removed files are closed alongside.
            let (scan, mountedOrphans) = namespace.orphans.withTrackedLock { mountedOrphans in
                // The shared-block table changes only under its lock, which commits take before
                // the journal's: the table in memory and on the device are read at one moment.
                namespace.volume.shared.withLock { table in
                    namespace.volume.journal.withNoCommits { () -> (Scanner.Result, [UInt32]) in
                        // The superblock as the device has it now (its orphan head changes at run time).
                        let current: Superblock
                        do {
                            current = try Superblock.decode(
                                ByteReader(namespace.volume.device.base, count: Superblock.size),
                                deviceBlocks: UInt64(namespace.volume.device.pageCount))
                        } catch {
                            problems.append("\(error)")
                            return (Scanner.Result(), mountedOrphans)
                        }
                        var expected = namespace.volume.superblock
                        expected.orphanHead = current.orphanHead
                        if expected != current {
                            problems.append("the superblock changed since mount beyond its orphan head")
                        }
                        let scan = Scanner.scan(
                            device: namespace.volume.device, superblock: current, journalMustBeEmpty: !tornHeader)
                        problems += compareAllocator(with: scan.bitmap)
                        if scan.sharedTable != table {
                            problems.append("the shared-block table in memory differs from the device")
                        }
                        return (scan, mountedOrphans)
                    }
                }
            }
            problems += scan.problems
            if scan.suppressed > 0 { problems.append("and \(scan.suppressed) more problems") }
            if scan.orphans != mountedOrphans {
                problems.append("the orphan list on the device \(scan.orphans) differs from the mounted one")
            }
            // Directories change only under the namespace lock, which is held: compare them now.
            for (number, inode) in namespace.table.withTrackedLock({ $0.inodes }) where inode.isDirectory {
                guard let entries = inode.contents.read({ $0.directory?.entries.mapValues(\.inode) }) else { continue }
                if entries != scan.inodes[number]?.directory?.entries.mapValues(\.inode) {
                    problems.append("directory \(number): entries in memory differ from the device")
                }
            }
            // Each inode under its own lock, and still under the namespace lock: a directory's
            // record changes under the namespace lock only, so it is never read half-written.
            let inodes = namespace.table.withTrackedLock { $0.inodes }
            for (_, inode) in inodes.sorted(by: { $0.key < $1.key }) { problems += compare(inode) }
        }
        var report = CheckReport(isClean: problems.isEmpty, problems: problems)
        report.notes = notes
        return report
    }

    /// A block the allocator would hand out must be free on the device, and so must a quarantined
    /// one. Only blocks allocated on the device are looked at (the search skips 64 free blocks
    /// at a time).
    private func compareAllocator(with bitmap: LazyBitmap) -> [String] {
        var problems: [String] = []
        namespace.volume.allocator.withUnavailableBits { unavailable in
            var next = 0
            while problems.count <= 20, let index = bitmap.nextSet(from: next, limit: bitmap.count) {
                next = index + 1
                let frame = PageFrameNumber(rawValue: namespace.volume.superblock.dataStart + UInt64(index))
                if !unavailable[index] {
                    problems.append(
                        "block \(frame.rawValue) is allocated on the device but the allocator would hand it out")
                }
                if namespace.volume.device.pages.state(of: frame).isQuarantined {
                    problems.append("block \(frame.rawValue) is quarantined but allocated on the device")
                }
            }
        }
        return problems
    }

    /// Compares one inode's DRAM state with the device, under its lock.
    private func compare(_ inode: Inode) -> [String] {
        inode.contents.read { contents in
            // Freed since the table was read, or about to be: nothing on the device to compare.
            if contents.isFreed || inode.users.withTrackedLock({ $0.reclaimed }) { return [] }
            let reader = ByteReader(
                namespace.volume.device.base + namespace.volume.superblock.inodeOffset(inode.number),
                count: Superblock.inodeSize)
            guard case .success(let record) = InodeRecord.decode(reader), record.kind != .free else {
                return ["inode \(inode.number) is in use in memory but not on the device"]
            }
            var problems: [String] = []
            if record.kind != contents.record.kind || record.size != contents.record.size
                || record.linkCount != contents.record.linkCount
            {
                problems.append(
                    "inode \(inode.number): memory says \(contents.record.kind) of \(counted(contents.record.size, "byte")) "
                        + "with \(contents.record.linkCount) links, the device \(record.kind) of \(record.size) with "
                        + "\(record.linkCount)")
            }
            var stored = contents.record
            contents.extents.store(into: &stored)
            if stored.extentCount != record.extentCount || stored.leafCount != record.leafCount
                || stored.firstLeaf != record.firstLeaf || stored.inlineExtents != record.inlineExtents
            {
                problems.append("inode \(inode.number): extents in memory differ from the device")
            }
            for leaf in contents.extents.leafBlocks.enumerated() {
                let leafReader = ByteReader(
                    namespace.volume.device.base + Int(leaf.element) * Superblock.blockSize, count: Superblock.blockSize
                )
                guard case .success(let (extents, _)) = ExtentLeaf.decode(leafReader, owner: inode.number),
                    extents == contents.extents.leaves[leaf.offset].extents
                else {
                    problems.append("inode \(inode.number): extent leaf \(leaf.offset) differs from the device")
                    continue
                }
            }
            return problems
        }
    }
}

extension Checker {
    /// fsck of a device that is not mounted: validates everything `check()` does, changing nothing.
    /// A transaction committed but not yet applied (a crash) is replayed into a private
    /// copy-on-write view of the device, so that the structures checked are those the next mount
    /// will see. A damaged superblock in block 0 is a problem when the backup in the last block is
    /// intact (the rest is checked with the backup). Throws `.busy` if a file system on the device
    /// is mounted (here or in another process), `.corrupted` if the device holds no DAXFS.
    static func check(_ device: PMemDevice) throws -> CheckReport {
        guard !device.isMounted.load(ordering: .acquiring) else {
            throw DAXError(.busy, "the file system on \(device.path) is mounted in this process; use its check()")
        }
        guard device.isPrivateImage || device.systemCalls.flock(device.fd, LOCK_SH | LOCK_NB) == 0 else {
            throw DAXError(
                .busy,
                "the file system on \(device.path) is mounted by another process, or through another open of the device in this one",
                errno: errno)
        }
        defer { _ = device.systemCalls.flock(device.fd, LOCK_UN) }
        return try checkUnmounted(device)
    }

    /// The offline check, with the device locked by the caller.
    static func checkUnmounted(_ device: PMemDevice) throws -> CheckReport {
        var (sb, primaryDamage) = try Superblock.locate(base: device.base, deviceBlocks: UInt64(device.pageCount))
        var report = CheckReport(isClean: true, problems: [])
        // The journal is validated exactly as mount would before replaying it.
        var journalProblems: [String] = []
        var view: PrivateView?
        var replayedRanges: [Range<Int>] = []
        do {
            switch try Journal.read(device: device, superblock: sb) {
            case .empty: break
            case .tornHeader:
                report.notes.append("the journal header is torn (a crash while committing); the next mount discards it")
            case .committed(_, let records):
                let pending =
                    "the journal holds a committed transaction of \(counted(records.count, "record")), which the next mount replays"
                if let replayed = try? PrivateView(of: device) {
                    Journal.apply(records, to: replayed, superblock: sb)
                    replayedRanges = Journal.targets(of: records, superblock: sb)
                    view = replayed
                    report.notes.append(pending + "; checked as it will be after that")
                    // The transaction may have moved the orphan head; a damaged superblock is a problem.
                    (sb, primaryDamage) = try Superblock.locate(
                        base: replayed.base, deviceBlocks: UInt64(device.pageCount))
                } else {
                    report.notes.append(pending + "; checked as the device is now, before it (no private view)")
                }
            }
        } catch let error as DAXError {
            journalProblems.append("journal: \(error.message); a read-write mount will refuse the device")
        }
        let ranges: ((Range<Int>) -> [Range<Int>])? =
            device.isSparse ? { device.dataRanges(in: $0, alsoWritten: replayedRanges) } : nil
        let scan = withExtendedLifetime(view) {
            Scanner.scan(
                base: view?.base ?? device.base, superblock: sb, journalMustBeEmpty: false,
                primaryDamage: primaryDamage, dataRanges: ranges)
        }
        report.problems =
            journalProblems + scan.problems + (scan.suppressed > 0 ? ["and \(scan.suppressed) more problems"] : [])
        if !scan.orphans.isEmpty {
            report.notes.append(
                "\(countedAre(scan.orphans.count, "removed file")) still on the orphan list; the next mount frees them")
        }
        report.isClean = report.problems.isEmpty
        return report
    }
}
