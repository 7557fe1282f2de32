import Synchronization

/// A DAX file system on a ``PMemDevice``: files and directories whose blocks are device pages,
/// mapped directly, with every metadata change crash-atomic through a redo journal.
///
/// Thread-safe: directory operations are serialized by a namespace lock, file operations lock
/// only their own file, so operations on different files run in parallel.
///
/// A facade, as the kernel's VFS is: the file system layer below keeps the volume (device,
/// journal, allocator, mount), the namespace (directories, inodes, orphans) and the data path;
/// the mapping layer keeps each file's address space. Each method calls down into them.
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

        /// The defaults: 16 KiB per inode, a journal of 1/64 of the device.
        public init() {}
    }

    /// The device the file system lives on.
    public let device: PMemDevice
    let volume: Volume
    let namespace: Namespace
    let data: FileData
    let spaces: AddressSpaces
    /// Open handles, weakly held: `unmount` closes them.
    let handles = Mutex<[ObjectIdentifier: WeakHandle]>([:])

    struct WeakHandle: @unchecked Sendable {
        weak var file: DAXFile?
    }

    private init(_ parts: (Volume, Namespace)) {
        (volume, namespace) = parts
        device = volume.device
        data = FileData(volume: volume)
        spaces = AddressSpaces(
            data: data, namespace: namespace, handler: FaultHandler(calls: volume.device.systemCalls))
    }

    deinit {
        // Dropped without unmount (no handle or mapping can remain: they hold the file system).
        // Release the device so that it can be mounted again; orphans are freed by that mount.
        // The fault handler stops with its last user: a mapping still alive holds it.
        if volume.isMounted { volume.releaseDevice() }
    }

    /// `.readOnly` for a file system mounted with ``mount(_:access:)`` read-only: nothing on the
    /// device changes while it is mounted.
    public var access: Access { volume.access }

    /// The device's page map.
    public var pages: PageMap { device.pages }

    /// Largest file size: 2^52 bytes (extents address 2^40 pages).
    public static let maximumFileSize = FileData.maximumFileSize

    /// Whether the file system is mounted.
    public var isMounted: Bool { volume.isMounted }

    // MARK: - Format and mount

    /// Writes an empty file system on the device, erasing what it held, and mounts it.
    /// Throws `.alreadyExists` if the device still looks like a file system, damaged or not
    /// (unless `options.overwritesExistingFileSystem`), and `.busy` if a file system is mounted on
    /// the device (here or in another process).
    public static func format(_ device: PMemDevice, options: FormatOptions = .init()) throws -> DAXFileSystem {
        try Volume.format(
            device, bytesPerInode: options.bytesPerInode, journalBlocks: options.journalBlocks,
            overwritingExisting: options.overwritesExistingFileSystem, progress: options.progress)
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
        DAXFileSystem(try Volume.mount(device, access: access))
    }

    /// Closes every handle, frees removed files, and releases the device. Throws `.busy` while a
    /// file is mapped or pages are pinned; then nothing changes.
    public func unmount() throws {
        try volume.operations.withWriteLock { try unmountExclusively() }
        // No mapping is left, so no fault can come: the handler thread goes.
        spaces.handler.stop()
        volume.releaseDevice()
    }

    private func unmountExclusively() throws {
        try namespace.lock.withWriteLock {
            let open: [DAXFile] = try handles.withTrackedLock { handles in
                guard volume.isMounted else { throw DAXError(.invalidArgument, "the file system is not mounted") }
                let mapped = namespace.mappedFiles
                guard mapped == 0 else {
                    throw DAXError(.busy, "cannot unmount \(device.path): \(countedAre(mapped, "file")) mapped")
                }
                let totals = device.pages.pinTotals
                let pinned = totals.acquired - totals.released
                guard pinned == 0, volume.allocator.quarantinedBlocks == 0 else {
                    throw DAXError(.busy, "cannot unmount \(device.path): \(countedAre(pinned, "page")) pinned")
                }
                volume.markUnmounted()
                return handles.values.compactMap(\.file)
            }
            for handle in open { handle.closeForUnmount() }
            namespace.reclaimOrphansAtUnmount()
        }
    }

    // MARK: - Statistics, layout, damage

    /// Block usage and pin totals now.
    public func statistics() -> Statistics {
        namespace.run {
            let (files, directories) = namespace.fileCounts
            var statistics = volume.statistics(files: files, directories: directories)
            statistics.faults = spaces.handler.counts
            return statistics
        }
    }

    /// Where the regions lie.
    public var layout: FileSystemLayout { FileSystemLayout(volume.superblock) }

    /// What a read-only mount found damaged: one sentence per problem, as ``check(_:)`` names them.
    /// Empty for an intact file system. A read-only mount of a damaged file system is *degraded*:
    /// undamaged files open and read as usual, and an operation that reaches a damaged inode or a
    /// name in a damaged directory block throws `.corrupted` naming it. (A read-write mount refuses
    /// damage.)
    public var damage: [String] { volume.damage.problems }

    /// Whether the file system is mounted read-only over damage (see ``damage``).
    public var isDegraded: Bool { !volume.damage.problems.isEmpty }

    // MARK: - Namespace

    /// Creates a new empty regular file and opens it for reading and writing.
    /// Throws `.alreadyExists` if the path exists, `.notFound` if the parent does not.
    public func create(_ path: String) throws -> DAXFile {
        DAXFile(fileSystem: self, inode: try namespace.create(path), path: path, access: .readWrite)
    }

    /// Opens an existing regular file. Throws `.notFound`, or `.isADirectory` for a directory.
    public func open(_ path: String, access: Access = .readWrite) throws -> DAXFile {
        DAXFile(fileSystem: self, inode: try namespace.open(path, access: access), path: path, access: access)
    }

    /// Creates a directory. Throws `.alreadyExists` if the path exists.
    public func createDirectory(_ path: String) throws { try namespace.createDirectory(path) }

    /// The names in a directory, sorted (by bytes, which for UTF-8 is code-point order).
    public func contentsOfDirectory(_ path: String) throws -> [String] { try namespace.contentsOfDirectory(path) }

    /// Removes a file or an empty directory. A file that is open, mapped or pinned loses its name
    /// at once and keeps its blocks until the last close or unmap (an orphan; its pinned blocks
    /// stay quarantined until unpinned).
    public func remove(_ path: String) throws { try namespace.remove(path) }

    /// Renames atomically. An existing file at `newPath` is replaced (an empty directory by a
    /// directory); after a crash exactly one of the two names exists.
    public func rename(_ path: String, to newPath: String) throws { try namespace.rename(path, to: newPath) }

    /// Kind, size and blocks of the file or directory at `path`.
    public func attributes(of path: String) throws -> FileAttributes { try namespace.attributes(of: path) }

    // MARK: - Unnamed files

    /// Creates a regular file with no name, in the file system of `directory` (which must exist),
    /// open for reading and writing: the kernel's `open(directory, O_TMPFILE)`. It is an orphan
    /// from the start: its last close frees it, and so does the next mount after a crash, unless
    /// ``link(_:at:replacing:)`` gave it a name first. Its ``DAXFile/path`` says `(unnamed N)` until then.
    public func createUnnamed(in directory: String) throws -> DAXFile {
        let inode = try namespace.createUnnamed(in: directory)
        let prefix = directory.hasSuffix("/") ? directory : directory + "/"
        return DAXFile(fileSystem: self, inode: inode, path: "\(prefix)(unnamed \(inode.number))", access: .readWrite)
    }

    /// Creates the file at `path`, or replaces the file there, all at once: `build` fills a new
    /// unnamed file (``DAXFileSystem/createUnnamed(in:)``, on the orphan list from its first
    /// moment), which is then linked at `path` in one transaction. A build that throws leaves
    /// `path` as it was; so does a process killed during it, and the next mount frees what it
    /// had written.
    public func createAtomically(_ path: String, build: (DAXFile) throws -> Void) throws {
        // Refuse what the link would refuse, before any work: a bad path or parent, a directory.
        let slash = path.utf8.lastIndex(of: UInt8(ascii: "/"))
        let directory = slash.map { String(path[...$0]) } ?? "/"
        do {
            if try attributes(of: path).kind == .directory {
                throw DAXError(.isADirectory, "cannot replace directory \(path) with a file")
            }
        } catch let error as DAXError where error.code == .notFound {
            guard try attributes(of: directory).kind == .directory else {
                throw DAXError(.notADirectory, "\(directory) is not a directory")
            }
        }
        let file = try createUnnamed(in: directory)
        defer { file.close() }
        do {
            try build(file)
        } catch var error as DAXError {
            // Told about the file the user named, not the unnamed one it was built in.
            error.message = error.message.replacing(file.path, with: path)
            throw error
        }
        try link(file, at: path, replacing: true)
    }

    /// Opens the file at `path` for reading and writing, or, when there is none or it is empty,
    /// makes it with `build` through ``createAtomically(_:build:)`` and opens that: how an app
    /// opens its store or log, so that a creation that fails or is killed never leaves a file at
    /// `path` that is not one.
    public func openOrCreate(_ path: String, build: (DAXFile) throws -> Void) throws -> DAXFile {
        do {
            let existing = try open(path)
            if existing.size > 0 { return existing }
            existing.close()
        } catch let error as DAXError where error.code == .notFound {}
        try createAtomically(path, build: build)
        return try open(path)
    }

    /// Gives the unnamed file `file` (from ``createUnnamed(in:)``, still open) the name `path`:
    /// the kernel's `linkat` of an `O_TMPFILE` file. One transaction takes it off the orphan list
    /// and writes the directory entry, so after a crash the file is either complete under its
    /// name or gone. With `replacing`, a file already at `path` is replaced in the same
    /// transaction (as ``rename(_:to:)`` replaces one): it becomes an orphan if it is open or
    /// mapped, else its blocks are freed. Throws `.alreadyExists` (without `replacing`),
    /// `.isADirectory` for a directory at `path`, `.notFound` for a missing parent,
    /// `.invalidArgument` for a file that has a name already, was closed, or belongs to another
    /// file system.
    public func link(_ file: DAXFile, at path: String, replacing: Bool = false) throws {
        try namespace.link(file.inode, filePath: file.path, at: path, replacing: replacing) {
            guard file.fileSystem === self else {
                throw DAXError(.invalidArgument, "\(Paths.quoted(file.path)) belongs to another file system")
            }
            try file.checkWritable("link")
        }
    }

    // MARK: - Check and repair

    /// fsck, read-only: validates every structure on the device (checksums, extents, bitmap against
    /// extents, link counts, sizes, the directory tree, the orphan list, an empty journal), and that
    /// the file system's DRAM state agrees with the device.
    public func check() throws -> CheckReport {
        try namespace.run { try Checker(namespace: namespace).check() }
    }

    /// fsck of a device that is not mounted: validates everything `check()` does, changing nothing.
    /// A transaction committed but not yet applied (a crash) is replayed into a private
    /// copy-on-write view of the device, so that the structures checked are those the next mount
    /// will see. A damaged superblock in block 0 is a problem when the backup in the last block is
    /// intact (the rest is checked with the backup). Throws `.busy` if a file system on the device
    /// is mounted (here or in another process), `.corrupted` if the device holds no DAXFS.
    public static func check(_ device: PMemDevice) throws -> CheckReport { try Checker.check(device) }

    /// fsck's repair (the kernel's `e2fsck -y`, PMDK's `pmempool check --repair`), offline, on a
    /// device that is not mounted: rebuilds what can be derived and drops or moves what cannot be
    /// trusted, then checks the result. In order:
    ///
    /// 1. the journal: a committed transaction is replayed (as mount would), a torn header
    ///    emptied, a damaged journal discarded;
    /// 2. the superblock: block 0 is restored from the backup when damaged, the backup rewritten
    ///    when it is damaged or differs;
    /// 3. inodes that are damaged, whose extents lie outside the data region or overlap, or that
    ///    share a block with another inode are cleared (what they held is lost); block counts and
    ///    sizes are corrected;
    /// 4. directories: a block with a bad header is emptied, a damaged entry or one naming a
    ///    cleared or free inode, a second name of an inode, removed;
    /// 5. files and directories with a valid inode but no name are moved to `/lost+found` (made
    ///    when missing) as `#<inode>`; a removed file with no links is freed, as mount frees it;
    ///    link counts and parents are set from the tree;
    /// 6. the block bitmap is rebuilt from the extents, the orphan list emptied.
    ///
    /// Every change goes through the journal in transactions, in an order in which a crash
    /// between two of them leaves a device that `repair` can run on again (it derives everything
    /// afresh). Undamaged files keep every byte. Returns what was done; throws `.busy` if the
    /// device is mounted, `.permissionDenied` for a read-only device, `.corrupted` when neither
    /// superblock is usable (nothing is changed then) or when the result still fails its check,
    /// and `.noSpace` when there is no inode or block left for `/lost+found`.
    public static func repair(_ device: PMemDevice) throws -> RepairReport {
        try Volume.repair(device, stoppingAfterCommits: nil)
    }

    /// `repair`, stopping as a crash would after transaction `stop + 1` (see `Volume.repair`).
    static func repair(
        _ device: PMemDevice, stoppingAfterCommits stop: Int?, writesPerTransaction: Int = .max
    ) throws -> RepairReport {
        try Volume.repair(device, stoppingAfterCommits: stop, writesPerTransaction: writesPerTransaction)
    }

    /// Whether the device holds a DAXFS superblock (valid magic and checksum).
    public static func isFormatted(_ device: PMemDevice) -> Bool { Volume.isFormatted(device) }

    /// What on the device still looks like a DAXFS, damaged or not, or nil when nothing does:
    /// a valid superblock in block 0 or the backup one in the last block, a journal header in
    /// block 1, or a root directory inode where the default layout puts it. `format` refuses such
    /// a device unless told to overwrite it.
    public static func existingFileSystem(on device: PMemDevice) -> String? { Volume.existingFileSystem(on: device) }

    // MARK: - Migration

    /// How many times one ``DAXFile/migrate(offset:count:)`` looks at a busy page.
    public static let migrationAttempts = AddressSpace.migrationAttempts
}
