import Glibc
import Synchronization

/// A DAX file system on a ``PMemDevice``: files and directories whose blocks are device pages,
/// mapped directly, with every metadata change crash-atomic through a redo journal.
///
/// Thread-safe: directory operations are serialized by a namespace lock, file operations lock
/// only their own file, so operations on different files run in parallel.
public final class DAXFileSystem: Sendable {
    /// How `format` lays out the device.
    public struct FormatOptions: Sendable {
        /// Device bytes per inode (default 16 KiB, as mke2fs): sets how many files fit.
        public var bytesPerInode = 16 << 10
        /// Journal blocks; nil picks 1/64 of the device, between 64 and 8192.
        public var journalBlocks: Int?
        /// Called with the fraction done while the metadata regions are cleared.
        public var progress: (@Sendable (Double) -> Void)?
        /// Format even over what still looks like a file system (see
        /// ``DAXFileSystem/existingFileSystem(on:)``); without it such a device is refused with
        /// `.alreadyExists`.
        public var overwritesExistingFileSystem = false

        public init() {}
    }

    /// The device the file system lives on.
    public let device: PMemDevice
    /// `.readOnly` for a file system mounted with ``mount(_:access:)`` read-only: nothing on the
    /// device changes while it is mounted.
    public let access: Access
    let superblock: Superblock
    /// What a degraded read-only mount found damaged; empty otherwise.
    let damageFound: Damage
    let journal: Journal
    let allocator: BlockAllocator
    /// Serializes changes of the directory tree; lookups share it.
    let namespace = ReadWriteLock()
    /// Held shared by every file operation, exclusively by `unmount`, which so waits for them.
    let operations = ReadWriteLock()
    let table: Mutex<InodeTable>
    let orphans: Mutex<[UInt32]>
    let mountState = Mutex(MountState())
    /// `mountState.mounted`, readable without the lock on every file operation.
    private let mountedFlag = Atomic<Bool>(true)
    /// Page-map pin totals at mount: statistics count from there.
    let pinBaseline: PinTotals

    struct MountState {
        var mounted = true
        var handles: [ObjectIdentifier: WeakHandle] = [:]
    }

    struct WeakHandle: @unchecked Sendable {
        weak var file: DAXFile?
    }

    /// The device's page map.
    public var pages: PageMap { device.pages }

    init(
        device: PMemDevice, access: Access, superblock: Superblock, journal: Journal, scan: Scanner.Result,
        damage: Damage = Damage()
    ) {
        self.device = device
        self.access = access
        self.damageFound = damage
        self.superblock = superblock
        self.journal = journal
        allocator = BlockAllocator(
            pages: device.pages, dataStart: superblock.dataStart, dataBlocks: Int(superblock.dataBlocks),
            allocated: scan.bitmap, allocatedCount: scan.allocatedBlocks,
            returnStorage: Self.storageReturn(for: device))
        var inodes = InodeTable(count: Int(superblock.inodeCount))
        for (number, scanned) in scan.inodes {
            let inode = Inode(
                number: number, record: scanned.record, extents: scanned.extents,
                directory: scanned.directory)
            inodes.insert(inode)
            // Descriptors learn which file page each block holds.
            for extent in scanned.extents.allExtents {
                for page in extent.logicalRange {
                    let marked = device.pages.markAllocated(
                        extent.block(for: page), inode: number,
                        index: scanned.record.kind == .file ? page : PageOwner.indexLimit)
                    precondition(marked, "block \(extent.block(for: page)) busy at mount")
                }
            }
            for leaf in scanned.extents.leafBlocks {
                _ = device.pages.markAllocated(leaf, inode: number, index: PageOwner.indexLimit)
            }
        }
        table = Mutex(inodes)
        orphans = Mutex(scan.orphans)
        pinBaseline = device.pages.pinTotals
    }

    /// On a sparse device, how freed blocks give their storage back: punched out of the file.
    private static func storageReturn(for device: PMemDevice) -> (@Sendable (BlockRun) -> Void)? {
        guard device.isSparse else { return nil }
        return { run in
            device.zero(offset: Int(run.start) * Superblock.blockSize, count: Int(run.count) * Superblock.blockSize)
        }
    }

    // MARK: - Format and mount

    /// Writes an empty file system on the device, erasing what it held, and mounts it.
    /// Throws `.alreadyExists` if the device still looks like a file system, damaged or not
    /// (unless `options.overwritesExistingFileSystem`), and `.busy` if a file system is mounted on
    /// the device (here or in another process).
    public static func format(_ device: PMemDevice, options: FormatOptions = .init()) throws -> DAXFileSystem {
        do {
            try refuseReadOnly(device, "format")
            try withExclusiveDevice(device) {
                if !options.overwritesExistingFileSystem, let found = existingFileSystem(on: device) {
                    throw DAXError(
                        .alreadyExists,
                        "the device holds a file system (\(found)); repair it, or format with "
                            + "overwritesExistingFileSystem to erase it")
                }
                let sb = try Superblock.layout(
                    totalBlocks: UInt64(device.pageCount), bytesPerInode: options.bytesPerInode,
                    journalBlocks: options.journalBlocks)
                try writeEmptyFileSystem(sb, on: device, progress: options.progress)
            }
        } catch let error as DAXError {
            throw error.context("cannot format \(device.path)", naming: device.path)
        }
        return try mount(device)
    }

    /// Mounts the file system on the device: replays or discards an unfinished journal
    /// transaction, validates all metadata, and frees the blocks of files removed while open.
    /// Throws `.corrupted` (saying what and where) for a device that holds no DAXFS or a damaged
    /// one, and `.busy` if it is mounted already.
    public static func mount(_ device: PMemDevice) throws -> DAXFileSystem {
        try mount(device, access: .readWrite)
    }

    /// Mounts with `access`. `.readOnly` is what `check`, `info`, `ls` and `get` need: it writes
    /// nothing to the device (so a device opened with ``PMemDevice/Options/readOnly`` will do),
    /// shares the device with other read-only mounts and offline checks (a shared `flock`), frees
    /// no orphans, and refuses every change with `.permissionDenied`. It refuses a device whose
    /// journal holds a committed transaction that a read-write mount would replay (a crash):
    /// mount read-write once, or check it offline, which sees it as after the replay.
    public static func mount(_ device: PMemDevice, access: Access) throws -> DAXFileSystem {
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

    private static func mountRetainingDevice(_ device: PMemDevice, access: Access) throws -> DAXFileSystem {
        try device.retainUse(for: "mount")
        do {
            try lockDevice(device, shared: access == .readOnly)
            do {
                let fs = try mountLocked(device, access: access)
                if access == .readWrite { try fs.reclaimOrphansAtMount() }
                return fs
            } catch {
                unlockDevice(device)
                throw error
            }
        } catch {
            device.releaseUse()
            throw error
        }
    }

    private static func mountLocked(_ device: PMemDevice, access: Access) throws -> DAXFileSystem {
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
        if let primaryDamage, let backup = before.backupBlock {
            throw DAXError(
                .corrupted,
                "the superblock in block 0 is damaged (\(primaryDamage)); the backup in block \(backup) is intact; "
                    + Self.repairAdvice)
        }
        try checkReplay(device, superblock: before)
        let (outcome, sequence) = try Journal.recover(device: device, superblock: before)
        // The replay may have rewritten the superblock (its orphan head): read it again.
        let sb = try Superblock.decode(
            ByteReader(device.base, count: Superblock.size),
            deviceBlocks: UInt64(device.pageCount))
        let scan = Scanner.scan(device: device, superblock: sb, journalMustBeEmpty: false)
        try refuseDamage(scan, device)
        if outcome == .tornHeader, access == .readWrite {
            // A crash while committing or emptying: nothing to replay; leave an empty journal.
            try device.write(
                Journal.header(sequence: sequence, committed: false, count: 0, records: []),
                at: Int(sb.journalStart) * Superblock.blockSize)
        }
        let fs = DAXFileSystem(
            device: device, access: access, superblock: sb,
            journal: Journal(
                device: device, superblock: sb,
                sequence: sequence), scan: scan)
        fs.watchQuarantine()
        return fs
    }

    /// Takes the device for this process (`isMounted`) and from other processes (`flock`:
    /// exclusive, or shared for a read-only mount, which other read-only mounts may share).
    private static func lockDevice(_ device: PMemDevice, shared: Bool = false) throws {
        guard
            device.isMounted.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        else { throw DAXError(.busy, "a file system on \(device.path) is already mounted in this process") }
        // A crash image opened for a checker is private to this process: nothing to lock out.
        guard device.isPrivateImage || flock(device.fd, (shared ? LOCK_SH : LOCK_EX) | LOCK_NB) == 0 else {
            let code = errno
            device.isMounted.store(false, ordering: .releasing)
            if code == EWOULDBLOCK {
                throw DAXError(.busy, "the file system on \(device.path) is mounted by another process", errno: code)
            }
            throw DAXError.system("flock", "cannot lock device \(device.path)", errno: code)
        }
    }

    private static func unlockDevice(_ device: PMemDevice) {
        flock(device.fd, LOCK_UN)
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
            device.fill(offset: 0, count: blockSize, flags: .nonTemporal)
            // Journal header, inode table and bitmap must read as zeros (a zero bitmap block is an
            // empty one); clear them in chunks for progress.
            let clearStart = Int(sb.journalStart) * blockSize
            let chunk = 64 << 20
            var offset = clearStart
            while offset < metadataBytes {
                let count = min(chunk, metadataBytes - offset)
                device.fill(offset: offset, count: count, flags: [.nonTemporal, .noDrain])
                offset += count
                progress?(Double(offset - clearStart) / Double(metadataBytes - clearStart))
            }
            device.drain()
        }
        try device.write(
            Journal.header(sequence: 0, committed: false, count: 0, records: []),
            at: Int(sb.journalStart) * blockSize)
        let now = Clock.realtimeNanoseconds
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
            device.fill(offset: Int(backup) * blockSize, count: blockSize, flags: .nonTemporal)
            try device.write(final.encode(), at: Int(backup) * blockSize)
        }
        try device.write(final.encode(), at: 0)
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

    // MARK: - Unmount

    /// Closes every handle, frees removed files, and releases the device. Throws `.busy` while a
    /// file is mapped or pages are pinned; then nothing changes.
    public func unmount() throws {
        try operations.withWriteLock { try unmountExclusively() }
        releaseDevice()
    }

    private func unmountExclusively() throws {
        try namespace.withWriteLock {
            let handles: [DAXFile] = try mountState.withTrackedLock { state in
                guard state.mounted else { throw DAXError(.invalidArgument, "the file system is not mounted") }
                // The table lock is a leaf: take the inodes out, then look at their users.
                let inodes = table.withTrackedLock { Array($0.inodes.values) }
                let mapped = inodes.filter { $0.users.withTrackedLock { $0.mappings > 0 } }.count
                guard mapped == 0 else {
                    throw DAXError(.busy, "cannot unmount \(device.path): \(countedAre(mapped, "file")) mapped")
                }
                let totals = device.pages.pinTotals
                let pinned = totals.acquired - totals.released
                guard pinned == 0, allocator.quarantinedBlocks == 0 else {
                    throw DAXError(.busy, "cannot unmount \(device.path): \(countedAre(pinned, "page")) pinned")
                }
                state.mounted = false
                mountedFlag.store(false, ordering: .releasing)
                return state.handles.values.compactMap(\.file)
            }
            for handle in handles { handle.closeForUnmount() }
            // Removed files that were open are freed now that nothing holds them. A failure (the
            // journal fails only on a closed device) leaves the orphan for the next mount to free.
            // A read-only mount changes nothing: the next read-write mount frees them.
            for number in orphans.withTrackedLock({ access == .readWrite ? $0 : [] }) {
                if let inode = table.withTrackedLock({ $0.inodes[number] }) { try? reclaimLocked(inode) }
            }
        }
    }

    deinit {
        // Dropped without unmount (no handle or mapping can remain: they hold the file system).
        // Release the device so that it can be mounted again; orphans are freed by that mount.
        if mountedFlag.load(ordering: .acquiring) { releaseDevice() }
    }

    /// The page map forgets the file system's blocks; the device can be mounted again.
    private func releaseDevice() {
        device.pages.setQuarantineRelease(nil)
        device.pages.clearAllocation(superblock.dataStart..<superblock.totalBlocks)
        Self.unlockDevice(device)
        device.releaseUse()
    }

    /// Whether the file system is mounted.
    public var isMounted: Bool { mountedFlag.load(ordering: .acquiring) }

    func checkMounted() throws {
        guard isMounted else { throw DAXError(.invalidArgument, "the file system on \(device.path) is unmounted") }
    }

    // MARK: - Statistics

    /// Block usage and pin totals now.
    public func statistics() -> Statistics {
        let totals = device.pages.pinTotals
        let (files, directories) = table.withTrackedLock { table in
            table.inodes.values.reduce(into: (0, 0)) { counts, inode in
                if inode.isDirectory { counts.1 += 1 } else { counts.0 += 1 }
            }
        }
        return Statistics(
            totalBlocks: Int(superblock.dataBlocks), freeBlocks: allocator.freeBlocks,
            quarantinedBlocks: allocator.quarantinedBlocks, pinnedPages: totals.pinnedPages,
            pinsAcquired: totals.acquired - pinBaseline.acquired, pinsReleased: totals.released - pinBaseline.released,
            files: files, directories: directories, totalInodes: Int(superblock.inodeCount),
            journalCommits: journal.commits.load(ordering: .relaxed))
    }
}

/// Block usage and pin totals of a mounted file system.
public struct Statistics: Sendable, Equatable {
    /// Data blocks the allocator manages.
    public var totalBlocks: Int
    /// Free and reusable now.
    public var freeBlocks: Int
    /// Free on the device, held back by pins or references.
    public var quarantinedBlocks: Int
    /// Descriptors with `pinCount > 0`.
    public var pinnedPages: Int
    /// Pages pinned since mount (like `nr_foll_pin_acquired`).
    public var pinsAcquired: Int
    /// Pages unpinned or revoked since mount.
    public var pinsReleased: Int
    /// Regular files, including removed ones still open.
    public var files: Int = 0
    /// Directories, including the root.
    public var directories: Int = 0
    /// Inodes the file system can hold.
    public var totalInodes: Int = 0
    /// Metadata transactions committed since mount.
    public var journalCommits: Int = 0
    /// Faults resolved on the file system's mappings since mount (all zero without a fault
    /// handler: ``DAXFileSystem/faultHandling``).
    public var faults = FaultCounts()
    /// Data blocks owned by more than one file (reflinks, dedup): none until blocks can be shared.
    public var sharedBlocks: Int = 0

    public init(
        totalBlocks: Int, freeBlocks: Int, quarantinedBlocks: Int, pinnedPages: Int, pinsAcquired: Int,
        pinsReleased: Int
    ) {
        self.totalBlocks = totalBlocks
        self.freeBlocks = freeBlocks
        self.quarantinedBlocks = quarantinedBlocks
        self.pinnedPages = pinnedPages
        self.pinsAcquired = pinsAcquired
        self.pinsReleased = pinsReleased
    }

    init(
        totalBlocks: Int, freeBlocks: Int, quarantinedBlocks: Int, pinnedPages: Int, pinsAcquired: Int,
        pinsReleased: Int, files: Int, directories: Int, totalInodes: Int, journalCommits: Int
    ) {
        self.init(
            totalBlocks: totalBlocks, freeBlocks: freeBlocks, quarantinedBlocks: quarantinedBlocks,
            pinnedPages: pinnedPages, pinsAcquired: pinsAcquired, pinsReleased: pinsReleased)
        self.files = files
        self.directories = directories
        self.totalInodes = totalInodes
        self.journalCommits = journalCommits
    }
}

/// Inode numbers in use and their DRAM inodes.
struct InodeTable {
    var inodes: [UInt32: Inode] = [:]
    /// Bit `n` set: inode number `n` is in use. Lazily zeroed: 16 M inodes cost nothing unused.
    private let used: LazyBitmap
    private var cursor = 1
    let count: Int

    init(count: Int) {
        self.count = count
        used = LazyBitmap(count: count + 1)
        used.set(0)  // there is no inode 0
    }

    mutating func insert(_ inode: Inode) {
        inodes[inode.number] = inode
        used.set(Int(inode.number))
    }

    /// A free inode number, marked used; nil when all are taken. Next fit from the last one taken.
    mutating func takeNumber() -> UInt32? {
        guard let number = used.nextClear(from: cursor, limit: count + 1) ?? used.nextClear(from: 1, limit: cursor)
        else { return nil }
        used.set(number)
        cursor = number % count + 1
        return UInt32(number)
    }

    /// Gives back a number taken with `takeNumber` (the inode was freed or never created).
    mutating func release(_ number: UInt32) {
        used.clear(Int(number))
        inodes[number] = nil
    }
}

/// Wall-clock time for inode timestamps.
enum Clock {
    static var realtimeNanoseconds: UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}
