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

        public init() {}
    }

    /// The device the file system lives on.
    public let device: PMemDevice
    let superblock: Superblock
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

    private init(device: PMemDevice, superblock: Superblock, journal: Journal, scan: Scanner.Result) {
        self.device = device
        self.superblock = superblock
        self.journal = journal
        let bitmap = scan.bitmap
        allocator = BlockAllocator(
            pages: device.pages, dataStart: superblock.dataStart,
            dataBlocks: Int(superblock.dataBlocks)
        ) { Scanner.isAllocated(bitmap, $0) }
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

    // MARK: - Format and mount

    /// Writes an empty file system on the device, erasing what it held, and mounts it.
    /// Throws `.busy` if a file system is mounted on the device (here or in another process).
    public static func format(_ device: PMemDevice, options: FormatOptions = .init()) throws -> DAXFileSystem {
        do {
            try withExclusiveDevice(device) {
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
        do {
            return try mountRetainingDevice(device)
        } catch let error as DAXError {
            throw error.context("cannot mount \(device.path)", naming: device.path)
        }
    }

    private static func mountRetainingDevice(_ device: PMemDevice) throws -> DAXFileSystem {
        try device.retainUse(for: "mount")
        do {
            try lockDevice(device)
            do {
                let fs = try mountLocked(device)
                try fs.reclaimOrphansAtMount()
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

    private static func mountLocked(_ device: PMemDevice) throws -> DAXFileSystem {
        guard device.size >= PMemDevice.minimumSize else {
            throw DAXError(.corrupted, "device \(device.path) is too small to hold a DAXFS")
        }
        let totals = device.pages.pinTotals
        guard totals.acquired == totals.released else {
            // Pins from an earlier mount in this process still hold pages: their blocks may be
            // free on the device, and a new mount must not hand them out.
            throw DAXError(
                .busy,
                "cannot mount \(device.path): \(totals.acquired - totals.released) pages are still "
                    + "pinned from an earlier mount; release those pins first")
        }
        let before = try Superblock.decode(
            ByteReader(device.base, count: Superblock.size),
            deviceBlocks: UInt64(device.pageCount))
        try checkReplay(device, superblock: before)
        let (outcome, sequence) = try Journal.recover(device: device, superblock: before)
        // The replay may have rewritten the superblock (its orphan head): read it again.
        let sb = try Superblock.decode(
            ByteReader(device.base, count: Superblock.size),
            deviceBlocks: UInt64(device.pageCount))
        let scan = Scanner.scan(device: device, superblock: sb, journalMustBeEmpty: false)
        try refuseDamage(scan, device)
        if outcome == .tornHeader {
            // A crash while committing or emptying: nothing to replay; leave an empty journal.
            try device.write(
                Journal.header(sequence: sequence, committed: false, count: 0, records: []),
                at: Int(sb.journalStart) * Superblock.blockSize)
        }
        let fs = DAXFileSystem(
            device: device, superblock: sb,
            journal: Journal(
                device: device, superblock: sb,
                sequence: sequence), scan: scan)
        device.pages.setQuarantineRelease { [weak allocator = fs.allocator] frame in allocator?.quarantineEnded(frame) }
        return fs
    }

    /// Takes the device for this process (`isMounted`) and from other processes (`flock`).
    private static func lockDevice(_ device: PMemDevice) throws {
        guard
            device.isMounted.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        else { throw DAXError(.busy, "a file system on \(device.path) is already mounted in this process") }
        // A crash image opened for a checker is private to this process: nothing to lock out.
        guard device.isPrivateImage || flock(device.fd, LOCK_EX | LOCK_NB) == 0 else {
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

    private static func withExclusiveDevice(_ device: PMemDevice, _ body: () throws -> Void) throws {
        try device.retainUse(for: "format")
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
        device.fill(offset: 0, count: blockSize, flags: .nonTemporal)
        // Journal header and the inode table must read as zeros; clear them in chunks for progress.
        let clearStart = Int(sb.journalStart) * blockSize
        let clearEnd = Int(sb.dataStart) * blockSize
        let chunk = 64 << 20
        var offset = clearStart
        while offset < clearEnd {
            let count = min(chunk, clearEnd - offset)
            device.fill(offset: offset, count: count, flags: [.nonTemporal, .noDrain])
            offset += count
            progress?(Double(offset - clearStart) / Double(clearEnd - clearStart))
        }
        device.drain()
        try device.write(
            Journal.header(sequence: 0, committed: false, count: 0, records: []),
            at: Int(sb.journalStart) * blockSize)
        let emptyCRC = CRC32C.checksum([UInt8](repeating: 0, count: Superblock.bitmapBytesPerBlock))
        for block in 0..<sb.bitmapBlocks {
            var crc = ByteEncoder(count: 4)
            crc.put(emptyCRC, at: 0)
            try device.write(crc.bytes, at: Int(sb.bitmapStart + block) * blockSize + Superblock.bitmapBytesPerBlock)
        }
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
        let scan = withExtendedLifetime(view) {
            Scanner.scan(base: view.base, superblock: replayed, journalMustBeEmpty: false)
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
                + (more > 0 ? "; and \(more) more (run check)" : ""))
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
                    throw DAXError(.busy, "cannot unmount \(device.path): \(mapped) files are mapped")
                }
                let totals = device.pages.pinTotals
                let pinned = totals.acquired - totals.released
                guard pinned == 0, allocator.quarantinedBlocks == 0 else {
                    throw DAXError(.busy, "cannot unmount \(device.path): \(pinned) pages are pinned")
                }
                state.mounted = false
                mountedFlag.store(false, ordering: .releasing)
                return state.handles.values.compactMap(\.file)
            }
            for handle in handles { handle.closeForUnmount() }
            // Removed files that were open are freed now that nothing holds them. A failure (the
            // journal fails only on a closed device) leaves the orphan for the next mount to free.
            for number in orphans.withTrackedLock({ $0 }) {
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
    private var used: [UInt64]
    private var cursor = 1
    let count: Int

    init(count: Int) {
        self.count = count
        used = [UInt64](repeating: 0, count: (count + 64) / 64)
    }

    mutating func insert(_ inode: Inode) {
        inodes[inode.number] = inode
        used[Int(inode.number) / 64] |= 1 << UInt64(inode.number % 64)
    }

    /// A free inode number, marked used; nil when all are taken.
    mutating func takeNumber() -> UInt32? {
        for step in 0..<count {
            let number = (cursor - 1 + step) % count + 1
            if used[number / 64] & (1 << UInt64(number % 64)) == 0 {
                used[number / 64] |= 1 << UInt64(number % 64)
                cursor = number % count + 1
                return UInt32(number)
            }
        }
        return nil
    }

    /// Gives back a number taken with `takeNumber` (the inode was freed or never created).
    mutating func release(_ number: UInt32) {
        used[Int(number) / 64] &= ~(1 << UInt64(number % 64))
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
