import Glibc
import Synchronization

/// The mounted volume: the device, its superblock, journal and allocator, and the mount itself
/// (the device's `flock`, the mounted flag, the operations lock that `unmount` waits on). The
/// other parts of a mounted file system (``Namespace``, ``FileData``, ``Checker``) change the
/// device through it: every metadata change is a ``PendingChange`` committed here.
final class Volume: Sendable {
    let device: PMemDevice
    /// `.readOnly` for a read-only mount: nothing on the device changes while it is mounted.
    let access: Access
    let superblock: Superblock
    /// What a degraded read-only mount found damaged; empty otherwise.
    let damage: Damage
    let journal: Journal
    let allocator: BlockAllocator
    /// Reference counts of blocks several extents name (reflinks, snapshots, dedup).
    let shared: SharedBlocks
    /// Held shared by every file operation, exclusively by `unmount`, which so waits for them.
    let operations = ReadWriteLock()
    /// Cleared by `unmount`; read without a lock on every file operation.
    private let mountedFlag = Atomic<Bool>(true)
    /// Page-map pin totals at mount: statistics count from there.
    let pinBaseline: PinTotals

    private init(
        device: PMemDevice, access: Access, superblock: Superblock, journal: Journal, scan: Scanner.Result,
        damage: Damage
    ) {
        self.device = device
        self.access = access
        self.damage = damage
        self.superblock = superblock
        self.journal = journal
        allocator = BlockAllocator(
            pages: device.pages, dataStart: superblock.dataStart, dataBlocks: Int(superblock.dataBlocks),
            allocated: scan.bitmap, allocatedCount: scan.allocatedBlocks,
            returnStorage: Self.storageReturn(for: device))
        shared = SharedBlocks(scan.sharedTable)
        pinBaseline = device.pages.pinTotals
    }

    /// The volume and namespace of a scanned device; quarantined blocks go back to the allocator
    /// at their last unpin from now on.
    static func assemble(
        device: PMemDevice, access: Access, superblock: Superblock, journal: Journal, scan: Scanner.Result,
        damage: Damage = Damage()
    ) -> (Volume, Namespace) {
        let volume = Volume(
            device: device, access: access, superblock: superblock, journal: journal, scan: scan, damage: damage)
        let namespace = Namespace(volume: volume, scan: scan)
        volume.watchQuarantine()
        return (volume, namespace)
    }

    /// On a sparse device, how freed blocks give their storage back: punched out of the file.
    private static func storageReturn(for device: PMemDevice) -> (@Sendable (PageRun) -> Void)? {
        guard device.isSparse else { return nil }
        return { run in
            device.zero(offset: Int(run.start) * Superblock.blockSize, count: Int(run.count) * Superblock.blockSize)
        }
    }

    /// Whether the volume is mounted.
    var isMounted: Bool { mountedFlag.load(ordering: .acquiring) }

    /// Marks the volume unmounted: file operations refuse from now on.
    func markUnmounted() { mountedFlag.store(false, ordering: .releasing) }

    func checkMounted() throws {
        guard isMounted else { throw DAXError(.invalidArgument, "the file system on \(device.path) is unmounted") }
    }

    /// Throws `.permissionDenied` on a file system mounted read-only.
    func checkWritable() throws {
        guard access == .readWrite else {
            throw DAXError(.permissionDenied, "the file system on \(device.path) is mounted read-only")
        }
    }

    /// The page map forgets the file system's blocks; the device can be mounted again.
    func releaseDevice() {
        device.pages.setQuarantineRelease(nil)
        device.pages.clearAllocation(superblock.dataStart..<superblock.totalBlocks)
        Self.unlockDevice(device)
        device.releaseUse()
    }

    /// Block usage and pin totals now, with the namespace's counts of files and directories.
    func statistics(files: Int, directories: Int) -> Statistics {
        let totals = device.pages.pinTotals
        return Statistics(
            totalBlocks: Int(superblock.dataBlocks), freeBlocks: allocator.freeBlocks,
            quarantinedBlocks: allocator.quarantinedBlocks, pinnedPages: totals.pinnedPages,
            pinsAcquired: totals.acquired - pinBaseline.acquired, pinsReleased: totals.released - pinBaseline.released,
            files: files, directories: directories, totalInodes: Int(superblock.inodeCount),
            journalCommits: journal.commits.load(ordering: .relaxed), sharedBlocks: shared.sharedBlockCount)
    }

    // MARK: - Format and mount

    /// Writes an empty file system on the device, erasing what it held (not mounted yet).
    static func format(
        _ device: PMemDevice, bytesPerInode: Int, journalBlocks: Int?, overwritingExisting: Bool,
        progress: (@Sendable (Double) -> Void)?
    ) throws {
        do {
            try refuseReadOnly(device, "format")
            try withExclusiveDevice(device) {
                if !overwritingExisting, let found = existingFileSystem(on: device) {
                    throw DAXError(
                        .alreadyExists,
                        "the device holds a file system (\(found)); repair it, or format with "
                            + "overwritesExistingFileSystem to erase it")
                }
                let sb = try Superblock.layout(
                    totalBlocks: UInt64(device.pageCount), bytesPerInode: bytesPerInode,
                    journalBlocks: journalBlocks)
                try writeEmptyFileSystem(sb, on: device, progress: progress)
            }
        } catch let error as DAXError {
            throw error.context("cannot format \(device.path)", naming: device.path)
        }
    }

    /// Mounts the file system on `device` with `access` (the public mount says what that does):
    /// the volume and its namespace.
    static func mount(_ device: PMemDevice, access: Access) throws -> (Volume, Namespace) {
        do {
            if access == .readWrite { try refuseReadOnly(device, "mount read-write") }
            return try mountRetainingDevice(device, access: access)
        } catch let error as DAXError {
            throw error.context("cannot mount \(device.path)", naming: device.path)
        }
    }

    static func refuseReadOnly(_ device: PMemDevice, _ what: String) throws {
        guard device.isReadOnly else { return }
        throw DAXError(
            .permissionDenied,
            "cannot \(what) \(device.path): the device was opened read-only"
                + (what.hasPrefix("mount") ? " (mount it with access: .readOnly)" : ""))
    }

    private static func mountRetainingDevice(_ device: PMemDevice, access: Access) throws -> (Volume, Namespace) {
        try device.retainUse(for: "mount")
        do {
            try lockDevice(device, shared: access == .readOnly)
            do {
                let (volume, namespace) = try mountLocked(device, access: access)
                if access == .readWrite { try namespace.reclaimOrphansAtMount() }
                return (volume, namespace)
            } catch {
                unlockDevice(device)
                throw error
            }
        } catch {
            device.releaseUse()
            throw error
        }
    }

    private static func mountLocked(_ device: PMemDevice, access: Access) throws -> (Volume, Namespace) {
        guard device.size >= PMemDevice.minimumSize else {
            throw DAXError(.corrupted, "device \(device.path) is too small to hold a DAXFS")
        }
        let totals = device.pages.pinTotals
        guard totals.acquired == totals.released else {
            // Pins from an earlier mount in this process still hold pages: their blocks may be
            // free on the device, and a new mount must not hand them out.
            throw DAXError(
                .busy,
                "cannot mount \(device.path): \(countedAre(totals.acquired - totals.released, "page")) still "
                    + "pinned from an earlier mount; release those pins first")
        }
        if access == .readOnly { return try mountDegradable(device) }
        let (before, primaryDamage) = try Superblock.locate(base: device.base, deviceBlocks: UInt64(device.pageCount))
        // With block 0 damaged, `before` is the backup: the same geometry, a stale orphan head.
        func damagedPrimary() -> DAXError {
            DAXError(
                .corrupted,
                "the superblock in block 0 is damaged (\(primaryDamage ?? "")); the backup in block "
                    + "\(before.backupBlock ?? 0) is intact; " + Self.repairAdvice)
        }
        // A crash while a committed transaction was written in place can tear block 0 (the orphan
        // head lives there): its replay writes the block whole again, so only a block 0 that no
        // committed record rewrites is damage.
        if primaryDamage != nil, !journalRewritesSuperblock(device, superblock: before) { throw damagedPrimary() }
        try checkReplay(device, superblock: before)
        let (outcome, sequence) = try Journal.recover(device: device, superblock: before)
        // The replay may have rewritten the superblock (its orphan head): read it again.
        let sb: Superblock
        do {
            sb = try Superblock.decode(
                ByteReader(device.base, count: Superblock.size),
                deviceBlocks: UInt64(device.pageCount))
        } catch let error as DAXError where primaryDamage != nil && error.code == .corrupted {
            // Only without a private view: the replay was not tried first, and left block 0 damaged.
            throw damagedPrimary()
        }
        let scan = Scanner.scan(device: device, superblock: sb, journalMustBeEmpty: false)
        try refuseDamage(scan, device)
        if outcome == .tornHeader, access == .readWrite {
            // A crash while committing or emptying: nothing to replay; leave an empty journal.
            try device.write(
                Journal.header(sequence: sequence, committed: false, count: 0, records: []),
                at: Int(sb.journalStart) * Superblock.blockSize)
        }
        return assemble(
            device: device, access: access, superblock: sb,
            journal: Journal(device: device, superblock: sb, sequence: sequence), scan: scan)
    }

    /// Takes the device for this process (`isMounted`) and from other processes (`flock`:
    /// exclusive, or shared for a read-only mount, which other read-only mounts may share).
    static func lockDevice(_ device: PMemDevice, shared: Bool = false) throws {
        guard
            device.isMounted.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        else { throw DAXError(.busy, "a file system on \(device.path) is already mounted in this process") }
        // A crash image opened for a checker is private to this process: nothing to lock out.
        guard device.isPrivateImage || device.systemCalls.flock(device.fd, (shared ? LOCK_SH : LOCK_EX) | LOCK_NB) == 0
        else {
            let code = errno
            device.isMounted.store(false, ordering: .releasing)
            if code == EWOULDBLOCK {
                throw DAXError(
                    .busy,
                    "the file system on \(device.path) is mounted by another process, or through another open of the device in this one",
                    errno: code)
            }
            throw DAXError.system("flock", "cannot lock device \(device.path)", errno: code)
        }
    }

    static func unlockDevice(_ device: PMemDevice) {
        _ = device.systemCalls.flock(device.fd, LOCK_UN)
        device.isMounted.store(false, ordering: .releasing)
    }

    static func withExclusiveDevice(
        _ device: PMemDevice, for what: String = "format", _ body: () throws -> Void
    ) throws {
        try device.retainUse(for: what)
        defer { device.releaseUse() }
        try lockDevice(device)
        defer { unlockDevice(device) }
        try body()
    }

    /// Clears the metadata regions and writes an empty root directory. The superblock goes last,
    /// after its old copy was erased first: a crash in between leaves no file system, never half of one.
    private static func writeEmptyFileSystem(
        _ sb: Superblock, on device: PMemDevice, progress: (@Sendable (Double) -> Void)?
    ) throws {
        let blockSize = Superblock.blockSize
        let metadataBytes = Int(sb.dataStart) * blockSize
        if device.isSparse {
            // Punched out rather than filled: a hole reads as zeros and holds no memory, so a
            // 1 TiB device formats in no time and uses only the blocks written below.
            device.zero(offset: 0, count: metadataBytes)
            progress?(1)
            let written = [0, sb.journalStart, UInt64(sb.inodeOffset(Superblock.rootInode) / blockSize)]
            for block in written + (sb.backupBlock.map { [$0] } ?? []) {
                try device.back(offset: Int(block) * blockSize, count: blockSize)
            }
        } else {
            device.fill(at: 0, count: blockSize, flags: .nonTemporal)
            // Journal header, inode table and bitmap must read as zeros (a zero bitmap block is an
            // empty one); clear them in chunks for progress.
            let clearStart = Int(sb.journalStart) * blockSize
            let chunk = 64 << 20
            var offset = clearStart
            while offset < metadataBytes {
                let count = min(chunk, metadataBytes - offset)
                device.fill(at: offset, count: count, flags: [.nonTemporal, .noDrain])
                offset += count
                progress?(Double(offset - clearStart) / Double(metadataBytes - clearStart))
            }
            device.drain()
        }
        try device.write(
            Journal.header(sequence: 0, committed: false, count: 0, records: []),
            at: Int(sb.journalStart) * blockSize)
        let now = WallClock.nanosecondsSinceEpoch
        var root = InodeRecord()
        root.kind = .directory
        root.linkCount = 1
        root.generation = 1
        root.parent = Superblock.rootInode
        root.modificationTime = now
        root.changeTime = now
        try device.write(root.encode(), at: sb.inodeOffset(Superblock.rootInode))
        var final = sb
        final.formatTime = now
        final.uuid = (0..<16).map { _ in UInt8.random(in: 0...255) }
        if let backup = final.backupBlock {
            device.fill(at: Int(backup) * blockSize, count: blockSize, flags: .nonTemporal)
            try device.write(final.encode(), at: Int(backup) * blockSize)
        }
        try device.write(final.encode(), at: 0)
    }

    /// Whether the journal holds a committed transaction with a record that writes the
    /// superblock (in block 0).
    private static func journalRewritesSuperblock(_ device: PMemDevice, superblock: Superblock) -> Bool {
        guard case .committed(_, let records) = try? Journal.read(device: device, superblock: superblock) else {
            return false
        }
        return Journal.targets(of: records, superblock: superblock).contains { $0.overlaps(0..<Superblock.size) }
    }

    /// A committed transaction is replayed first into a private view, and the result checked as
    /// mount checks it: a crafted or damaged journal that would leave a broken file system is
    /// refused before it changes the device. (Without a private view, a device-DAX character
    /// device, the replay goes ahead and the check after it refuses.)
    private static func checkReplay(_ device: PMemDevice, superblock: Superblock) throws {
        guard case .committed(_, let records) = try Journal.read(device: device, superblock: superblock),
            let view = try? PrivateView(of: device)
        else { return }
        Journal.apply(records, to: view, superblock: superblock)
        let replayed = try Superblock.decode(
            ByteReader(view.base, count: Superblock.size), deviceBlocks: UInt64(device.pageCount))
        let written = Journal.targets(of: records, superblock: superblock)
        let ranges: ((Range<Int>) -> [Range<Int>])? =
            device.isSparse ? { device.dataRanges(in: $0, alsoWritten: written) } : nil
        let scan = withExtendedLifetime(view) {
            Scanner.scan(base: view.base, superblock: replayed, journalMustBeEmpty: false, dataRanges: ranges)
        }
        try refuseDamage(scan, device, " after replaying its journal (the device was left as it was)")
    }

    private static func refuseDamage(_ scan: Scanner.Result, _ device: PMemDevice, _ when: String = "") throws {
        guard !scan.problems.isEmpty else { return }
        let more = scan.problems.count - 3 + scan.suppressed
        throw DAXError(
            .corrupted,
            "file system on \(device.path) is damaged\(when): "
                + scan.problems.prefix(3).joined(separator: "; ")
                + (more > 0 ? "; and \(more) more" : "") + "; " + repairAdvice)
    }
}
