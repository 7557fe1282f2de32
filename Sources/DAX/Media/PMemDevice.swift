import CLibPMem
import Glibc
import Synchronization

/// A persistent-memory device: a pmem or device-DAX path, or by default a plain file on
/// `/dev/shm`, mapped once into the process with libpmem.
///
/// The kernel's pmem namespace. Every 4 KiB page of the device has a descriptor in ``pages``.
/// Loads and stores through ``baseAddress`` reach the device's bytes; make them durable with
/// ``persist(offset:count:)`` (or the finer ``flush(offset:count:)`` and ``drain()``), as the
/// ``PersistenceMode`` of the device decides.
public final class PMemDevice: Sendable {
    /// The size of a page and of a file-system block: 4096 bytes.
    public static let pageSize = PageFrameNumber.pageSize
    /// The smallest device: 2 MiB (libpmem's `PMEM_MIN_PART`), room for a file system's metadata.
    public static let minimumSize = 2 << 20
    /// The largest device: 16 TiB (2^32 pages).
    public static let maximumSize = 16 << 40

    /// The device tools and examples use when none is named: `$DAXEMU_DEVICE` if set and not
    /// empty, else `/dev/shm/daxemu`.
    public static var defaultPath: String {
        if let path = getenv("DAXEMU_DEVICE"), path.pointee != 0 { return String(cString: path) }
        return "/dev/shm/daxemu"
    }

    /// How a device is opened or created.
    public struct Options: Sendable {
        /// How stores are made durable; `.automatic` follows libpmem's answer.
        public var persistence: PersistenceMode = .automatic
        /// Permission bits of a created device file.
        public var permissions: UInt32 = 0o600
        /// Create the file sparse (`PMEM_FILE_SPARSE`): no `posix_fallocate`, so creation is
        /// instant but a full `/dev/shm` shows up later as SIGBUS instead of at creation.
        public var sparse: Bool = false
        /// Keeps what reached the persistence domain apart from what the CPU sees, so that
        /// ``PMemDevice/powerFail(writingImageTo:keeping:)`` can tell what a power failure would
        /// leave; nil: off. See `docs/crash-emulation.md`.
        public var powerFailureEmulation: PersistenceDomain? = nil
        /// Open the device for reading only: `O_RDONLY` and a `PROT_READ` mapping, which needs
        /// only read permission on the file. Every store path is refused: the throwing ones with
        /// `.permissionDenied`, ``copy(_:toOffset:flags:)`` and ``fill(offset:count:value:flags:)``
        /// (which cannot throw) with a precondition failure. `create` refuses it.
        public var readOnly: Bool = false
        /// The system-call seam; tests inject failures here.
        package var systemCalls: SystemCalls = .live

        /// The defaults: automatic persistence, a dense device, read-write.
        public init() {}
    }

    /// The path the device was opened or created at.
    public let path: String
    /// Bytes; a multiple of ``pageSize``.
    public let size: Int
    /// `pmem_is_pmem`'s answer for the whole mapping.
    public let isPersistentMemory: Bool
    /// True when the path is a device-DAX character device (`/dev/daxX.Y`).
    public let isDeviceDAX: Bool
    /// Whether the kernel grants `MAP_SYNC` mappings of the device, and why not.
    public let mapSync: MapSyncStatus
    /// True when the device was opened with ``Options/readOnly``.
    public let isReadOnly: Bool
    /// True when the device file had holes when opened (created with ``Options/sparse``, or such
    /// a file opened later): blocks are then given storage (``back(offset:count:)``) as they come
    /// into use, so that a full `/dev/shm` is a `.noSpace` error, not a SIGBUS on a later store.
    public let isSparse: Bool
    /// The mode asked for in ``Options``.
    public let requestedPersistence: PersistenceMode
    /// The mode in effect: `.cacheFlush` or `.msync` (`.automatic` resolved).
    public let persistence: PersistenceMode
    /// The whole device, mapped once. Valid until ``close()``; using it afterwards is a bug.
    public var baseAddress: UnsafeMutableRawPointer {
        precondition(state.load(ordering: .relaxed) == State.open, "PMemDevice \(path) is closed")
        return base
    }
    /// One descriptor per device page (the kernel's memmap).
    public let pages: PageMap

    /// Pages on the device.
    public var pageCount: Int { size / Self.pageSize }

    nonisolated(unsafe) let base: UnsafeMutableRawPointer
    /// An `O_RDWR` descriptor of the device file: writable file mappings are made from it, and
    /// mounting takes an exclusive `flock` on it.
    let fd: Int32
    /// An `O_RDONLY` descriptor of the device file: read-only file mappings are made from it, so
    /// that `mprotect(PROT_WRITE)` on one fails with `EACCES`, as for any shared mapping of a
    /// read-only descriptor, instead of making the file writable.
    let readOnlyFD: Int32
    let systemCalls: SystemCalls
    let flushesCaches: Bool
    /// Cache-flush mode without emulation: `persist`, `flush` and `drain` are the seam's libpmem
    /// calls and nothing else.
    let persistsDirectly: Bool
    /// The media copy of a device with power-failure emulation.
    let emulation: MediaCopy?
    /// A crash image opened for a checker: mapped `MAP_PRIVATE`, so that nothing stored reaches
    /// the image's file (file mappings of it are private too).
    let isPrivateImage: Bool

    private enum State {
        static let open = 0
        static let closing = 1
        static let unmapped = 2
    }
    private let state = Atomic<Int>(State.open)
    /// Mounted file systems and registered DMA regions: they keep the mapping alive past `close`.
    private let users = Atomic<Int>(0)
    /// Set while a file system of this process is mounted on the device.
    let isMounted = Atomic<Bool>(false)
    /// Failures of `msync` that a persist fell back from (``persistenceErrors``).
    let msyncFailures = Atomic<Int>(0)
    /// Calls refused for a bad range or a store to a read-only device (``refusedCalls``).
    let refusals = Mutex(Refusals())

    // MARK: - Creating and opening

    /// Creates the device file (fails with `.alreadyExists` if it exists) and maps it with libpmem.
    ///
    /// `size` must be a positive multiple of ``pageSize``, at least ``minimumSize``, at most
    /// ``maximumSize``, and fit in the free space of the file system holding `path`. Nothing is
    /// created when any check fails. Calls `pmem_map_file(PMEM_FILE_CREATE | PMEM_FILE_EXCL)`.
    public static func create(path: String, size: Int, options: Options = .init()) throws -> PMemDevice {
        guard !options.readOnly else {
            throw DAXError(.invalidArgument, "cannot create device \(path) read-only: a new device must be written")
        }
        try validate(size: size, path: path)
        // A sparse device uses space only as blocks come into use, so it may be larger than the
        // free space (its file system then fails with .noSpace when that runs out).
        let free = try freeSpace(at: path, calls: options.systemCalls)
        guard options.sparse || size <= free else {
            throw DAXError(
                .noSpace,
                "cannot create device \(path) of \(counted(size, "byte")): its directory has \(counted(free, "byte")) free "
                    + "(a sparse device may be larger)")
        }
        let calls = options.systemCalls
        var flags = PMEM_FILE_CREATE | PMEM_FILE_EXCL
        if options.sparse { flags |= PMEM_FILE_SPARSE }
        guard let mapping = calls.pmemMapFile(path, size, Int32(flags), mode_t(options.permissions)) else {
            let code = Glibc.errno
            throw DAXError.pmem(
                "pmem_map_file", "cannot create device \(path) of \(counted(size, "byte"))",
                errno: code, message: pmemErrorMessage())
        }
        do {
            return try PMemDevice(path: path, mapping: mapping, options: options, created: true)
        } catch {
            _ = calls.pmemUnmap(mapping.address, mapping.length)
            _ = calls.unlink(path)
            throw error
        }
    }

    /// Opens the device at `path`, or creates it with `size` when nothing is there. `size` is used
    /// only for creating: an existing device keeps its own size. Another process creating the same
    /// path at the same moment is not an error; this one opens what it created.
    public static func openOrCreate(path: String, size: Int, options: Options = .init()) throws -> PMemDevice {
        guard !path.isEmpty else { throw DAXError(.invalidArgument, "device path is empty") }
        while true {
            if options.systemCalls.stat(path) != nil { return try open(path: path, options: options) }
            guard Glibc.errno == ENOENT else {
                throw DAXError.system("stat", "cannot open or create device \(path)", errno: Glibc.errno)
            }
            do {
                return try create(path: path, size: size, options: options)
            } catch let error as DAXError where error.code == .alreadyExists {
                continue  // created by someone else since the stat: open it
            }
        }
    }

    /// Maps an existing device file, or a real pmem/dev-dax path. Calls `pmem_map_file(path, 0, 0)`.
    public static func open(path: String, options: Options = .init()) throws -> PMemDevice {
        guard !path.isEmpty else { throw DAXError(.invalidArgument, "device path is empty") }
        let calls = options.systemCalls
        guard let info = calls.stat(path) else {
            throw DAXError.system("stat", "cannot open device \(path)", errno: Glibc.errno)
        }
        let kind = info.st_mode & S_IFMT
        if kind == S_IFDIR { throw DAXError(.isADirectory, "cannot open device \(path): it is a directory") }
        guard kind == S_IFREG || kind == S_IFCHR else {
            throw DAXError(.invalidArgument, "cannot open device \(path): not a regular file or a character device")
        }
        if kind == S_IFREG {
            let size = Int(info.st_size)
            guard size > 0, size % pageSize == 0, size >= minimumSize, size <= maximumSize else {
                throw DAXError(
                    .invalidArgument,
                    "cannot open device \(path): its size \(size) is not a multiple of \(pageSize) "
                        + "between \(minimumSize) and \(counted(maximumSize, "byte"))")
            }
        }
        let mapped = options.readOnly ? try mapReadOnly(path, calls: calls) : calls.pmemMapFile(path, 0, 0, 0)
        guard let mapping = mapped else {
            throw DAXError.pmem(
                "pmem_map_file", "cannot open device \(path)", errno: Glibc.errno,
                message: pmemErrorMessage())
        }
        do {
            try validate(size: mapping.length, path: path)
            return try PMemDevice(path: path, mapping: mapping, options: options, created: false)
        } catch {
            unmap(mapping.address, mapping.length, readOnly: options.readOnly, calls: calls)
            throw error
        }
    }

    /// Maps the whole device `PROT_READ` from an `O_RDONLY` descriptor (libpmem's `pmem_map_file`
    /// always opens for writing); asks `pmem_is_pmem` about the mapping.
    private static func mapReadOnly(_ path: String, calls: SystemCalls) throws -> (
        address: UnsafeMutableRawPointer, length: Int, isPmem: Bool
    )? {
        let fd = calls.open(path, O_RDONLY | O_CLOEXEC, 0)
        guard fd >= 0 else {
            throw DAXError.system("open", "cannot open device \(path) for reading", errno: Glibc.errno)
        }
        defer { _ = calls.close(fd) }
        guard let info = calls.fstat(fd) else {
            throw DAXError.system("fstat", "cannot open device \(path) for reading", errno: Glibc.errno)
        }
        let length = (info.st_mode & S_IFMT) == S_IFCHR ? deviceDAXSize(path, calls: calls) : Int(info.st_size)
        guard length > 0 else {
            throw DAXError(.invalidArgument, "cannot open device \(path) read-only: its size is unknown")
        }
        guard let address = calls.mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0) else {
            throw DAXError.system("mmap", "cannot map device \(path) read-only", errno: Glibc.errno)
        }
        return (address, length, calls.pmemIsPmem(address, length))
    }

    /// The size of a device-DAX character device, from sysfs (0 if it cannot be read).
    private static func deviceDAXSize(_ path: String, calls: SystemCalls) -> Int {
        guard let info = calls.stat(path) else { return 0 }
        let major = (info.st_rdev >> 8) & 0xFFF
        let minor = (info.st_rdev & 0xFF) | ((info.st_rdev >> 12) & 0xFFF00)
        let fd = calls.open("/sys/dev/char/\(major):\(minor)/size", O_RDONLY | O_CLOEXEC, 0)
        guard fd >= 0 else { return 0 }
        defer { _ = calls.close(fd) }
        var text = [UInt8](repeating: 0, count: 32)
        let count = text.withUnsafeMutableBytes { calls.pread(fd, $0, 0) }
        guard count > 0 else { return 0 }
        return Int(String(decoding: text[..<count], as: UTF8.self).filter(\.isNumber)) ?? 0
    }

    /// `privateImageFD`: a crash image's descriptor, already mapped privately at `mapping`.
    init(
        path: String, mapping: (address: UnsafeMutableRawPointer, length: Int, isPmem: Bool), options: Options,
        created: Bool, privateImageFD: Int32? = nil
    ) throws {
        let calls = options.systemCalls
        guard !(options.readOnly && options.powerFailureEmulation != nil) else {
            throw DAXError(
                .invalidArgument, "cannot emulate power failures on \(path) opened read-only: nothing is stored")
        }
        let fd = privateImageFD ?? calls.open(path, (options.readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC, 0)
        guard fd >= 0 else { throw DAXError.system("open", "cannot open device \(path)", errno: Glibc.errno) }
        let readOnlyFD = privateImageFD.map { calls.dup($0) } ?? calls.open(path, O_RDONLY | O_CLOEXEC, 0)
        guard readOnlyFD >= 0 else {
            let code = Glibc.errno
            _ = calls.close(fd)
            throw DAXError.system("open", "cannot open device \(path) for reading", errno: code)
        }
        guard let info = calls.fstat(fd) else {
            let code = Glibc.errno
            _ = calls.close(fd)
            _ = calls.close(readOnlyFD)
            throw DAXError.system("fstat", "cannot open device \(path)", errno: code)
        }
        self.isDeviceDAX = (info.st_mode & S_IFMT) == S_IFCHR
        // A crash image's holes say nothing of what its checker stored privately: all of it is data.
        self.isSparse =
            privateImageFD == nil && (info.st_mode & S_IFMT) == S_IFREG && Int(info.st_blocks) * 512 < Int(info.st_size)
        self.path = path
        self.size = mapping.length
        self.base = mapping.address
        self.isPersistentMemory = mapping.isPmem
        self.fd = fd
        self.readOnlyFD = readOnlyFD
        self.isReadOnly = options.readOnly
        self.systemCalls = calls
        self.requestedPersistence = options.persistence
        switch options.persistence {
        case .automatic: self.persistence = mapping.isPmem ? .cacheFlush : .msync
        case .cacheFlush, .msync: self.persistence = options.persistence
        }
        self.flushesCaches = persistence == .cacheFlush
        self.persistsDirectly = flushesCaches && options.powerFailureEmulation == nil
        self.isPrivateImage = privateImageFD != nil
        self.mapSync =
            privateImageFD == nil
            ? Self.probeMapSync(fd: fd, readOnly: options.readOnly, calls: calls)
            : .refused(reason: "a crash image is mapped privately")
        do {
            self.pages = try PageMap(pageCount: mapping.length / Self.pageSize, calls: calls)
            self.emulation = try options.powerFailureEmulation.map { domain in
                try MediaCopy(
                    domain: domain, cpu: mapping.address, size: mapping.length, deviceFD: fd, copyingDevice: !created,
                    path: path, calls: calls)
            }
        } catch {
            _ = calls.close(fd)
            _ = calls.close(readOnlyFD)
            throw error
        }
    }

    deinit {
        if state.load(ordering: .acquiring) != State.unmapped {
            emulation?.close()
            unmapMapping()
            _ = systemCalls.close(fd)
            _ = systemCalls.close(readOnlyFD)
        }
    }

    private func unmapMapping() {
        if isPrivateImage {
            _ = systemCalls.munmap(base, size)
        } else {
            Self.unmap(base, size, readOnly: isReadOnly, calls: systemCalls)
        }
    }

    private static func validate(size: Int, path: String) throws {
        guard !path.isEmpty else { throw DAXError(.invalidArgument, "device path is empty") }
        guard size > 0, size % pageSize == 0 else {
            throw DAXError(
                .invalidArgument,
                "device size \(size) for \(path) is not a positive multiple of the page size \(pageSize)")
        }
        guard size >= minimumSize else {
            throw DAXError(
                .invalidArgument,
                "device size \(size) for \(path) is below the minimum of \(counted(minimumSize, "byte")) (2 MiB)")
        }
        guard size <= maximumSize else {
            throw DAXError(
                .invalidArgument,
                "device size \(size) for \(path) is above the maximum of \(counted(maximumSize, "byte")) (16 TiB)")
        }
    }

    /// Bytes free in the file system that would hold a device at `path`: a device that is not
    /// sparse must fit, or tmpfs would fill the machine's memory before `posix_fallocate` gives up.
    static func freeSpace(at path: String, calls: SystemCalls) throws -> Int {
        let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        guard let info = calls.statvfs(directory.isEmpty ? "/" : directory) else {
            let code = Glibc.errno
            if code == ENOENT || code == ENOTDIR {
                throw DAXError(
                    .notFound, "cannot create device \(path): the directory \(directory) does not exist")
            }
            throw DAXError.system("statvfs", "cannot create device \(path)", errno: code)
        }
        return Int(info.f_bavail) &* Int(info.f_frsize)
    }

    /// Asks the kernel for a one-page `MAP_SHARED_VALIDATE | MAP_SYNC` mapping of the device.
    private static func probeMapSync(fd: Int32, readOnly: Bool, calls: SystemCalls) -> MapSyncStatus {
        let flags = dax_MAP_SHARED_VALIDATE | dax_MAP_SYNC
        let protection = readOnly ? PROT_READ : PROT_READ | PROT_WRITE
        guard let probe = calls.mmap(nil, pageSize, protection, flags, fd, 0) else {
            let code = Glibc.errno
            switch code {
            case EOPNOTSUPP:
                return .refused(
                    reason: "the file system holding the device does not support DAX "
                        + "(tmpfs and other page-cache file systems refuse MAP_SYNC; mount with -o dax)")
            case EINVAL:
                return .refused(reason: "the kernel does not know MAP_SYNC (it needs Linux 4.15 or later)")
            default:
                return .refused(reason: "mmap(MAP_SYNC) failed with errno \(code): \(String(cString: strerror(code)))")
            }
        }
        _ = calls.munmap(probe, pageSize)
        return .granted
    }

    // MARK: - Lifetime

    /// Releases the device. Nothing may use ``baseAddress`` afterwards. If a file system is still
    /// mounted or a DMA region still registered on it, the mapping stays until the last one goes.
    public func close() {
        guard
            state.compareExchange(expected: State.open, desired: State.closing, ordering: .sequentiallyConsistent)
                .exchanged
        else { return }
        if users.load(ordering: .sequentiallyConsistent) == 0 { unmapNow() }
    }

    /// True once ``close()`` was called.
    public var isClosed: Bool { state.load(ordering: .acquiring) != State.open }

    /// Registers a user that needs the mapping (a mounted file system, a DMA registration).
    func retainUse(for what: String) throws {
        users.wrappingAdd(1, ordering: .sequentiallyConsistent)
        if state.load(ordering: .sequentiallyConsistent) != State.open {
            releaseUse()
            throw DAXError(.invalidArgument, "cannot \(what): device \(path) is closed")
        }
    }

    /// Ends a use taken with ``retainUse(for:)``; the last one after `close` unmaps.
    func releaseUse() {
        let remaining = users.wrappingSubtract(1, ordering: .sequentiallyConsistent).newValue
        precondition(remaining >= 0, "PMemDevice \(path): more uses released than retained")
        if remaining == 0, state.load(ordering: .sequentiallyConsistent) == State.closing { unmapNow() }
    }

    private func unmapNow() {
        guard
            state.compareExchange(expected: State.closing, desired: State.unmapped, ordering: .sequentiallyConsistent)
                .exchanged
        else { return }
        emulation?.close()
        unmapMapping()
        _ = systemCalls.close(fd)
        _ = systemCalls.close(readOnlyFD)
    }

    /// `pmem_unmap` for a mapping libpmem made, `munmap` for a read-only one made here.
    private static func unmap(_ address: UnsafeMutableRawPointer, _ length: Int, readOnly: Bool, calls: SystemCalls) {
        if readOnly { _ = calls.munmap(address, length) } else { _ = calls.pmemUnmap(address, length) }
    }

    // MARK: - Backing a sparse device

    /// Gives `count` bytes at `offset` storage in the file system holding the device (`fallocate`),
    /// so that a store there cannot fail later; a no-op unless ``isSparse``. Throws `.noSpace` when
    /// that file system is full (on `/dev/shm`: the machine's shared memory), changing nothing.
    public func back(offset: Int, count: Int) throws {
        guard isSparse, !isReadOnly, count > 0 else { return }
        try validateRange(offset, count)
        let start = offset / Self.pageSize * Self.pageSize
        let end = (offset + count + Self.pageSize - 1) / Self.pageSize * Self.pageSize
        while systemCalls.fallocate(fd, 0, start, end - start) != 0 {
            let code = Glibc.errno
            if code == EINTR { continue }
            if code == ENOSPC {
                throw DAXError(
                    .noSpace,
                    "cannot back \(counted(end - start, "byte")) at offset \(start) of sparse device \(path): the file "
                        + "system holding it is full", errno: code)
            }
            throw DAXError.system(
                "fallocate", "cannot back \(counted(end - start, "byte")) at offset \(start) of \(path)", errno: code)
        }
    }

    /// The parts of device bytes `range` that hold data in the device file, in order, holes left
    /// out (`lseek` with `SEEK_DATA` and `SEEK_HOLE`): what a scan of metadata needs to read, since
    /// a hole reads as zeros, and reading one through a mapping of a tmpfs file would give it a
    /// page of memory. The whole range on a device that is not ``isSparse``. With `written`, the
    /// ranges a private view of the device changed are counted as data too.
    func dataRanges(in range: Range<Int>, alsoWritten written: [Range<Int>] = []) -> [Range<Int>] {
        guard written.isEmpty else {
            // Merge in `written` (what a private view of the device has changed), in order.
            let all = (dataRanges(in: range) + written.map { $0.clamped(to: range) }.filter { !$0.isEmpty })
                .sorted { $0.lowerBound < $1.lowerBound }
            var merged: [Range<Int>] = []
            for next in all {
                if let last = merged.last, next.lowerBound <= last.upperBound {
                    merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, next.upperBound)
                } else {
                    merged.append(next)
                }
            }
            return merged
        }
        guard isSparse, !range.isEmpty else { return range.isEmpty ? [] : [range] }
        var ranges: [Range<Int>] = []
        var position = range.lowerBound
        while position < range.upperBound {
            let data = systemCalls.lseek(fd, position, dax_SEEK_DATA)
            if data < 0 {
                // ENXIO: no data at or after `position`; anything else: take the rest as data.
                if Glibc.errno != ENXIO { ranges.append(position..<range.upperBound) }
                break
            }
            guard data < range.upperBound else { break }
            let hole = systemCalls.lseek(fd, data, dax_SEEK_HOLE)
            let end = hole < 0 ? range.upperBound : min(hole, range.upperBound)
            ranges.append(max(data, range.lowerBound)..<end)
            position = end
        }
        return ranges
    }

    /// Sets `count` bytes at `offset` to zero and makes that durable. On a sparse device the whole
    /// pages inside the range are punched out of the file (`fallocate(PUNCH_HOLE)`), which costs
    /// in proportion to what they held and leaves them using no memory; the ragged ends are filled.
    func zero(offset: Int, count: Int) {
        guard count > 0 else { return }
        checkRange(offset, count)
        checkWritable()
        let first = (offset + Self.pageSize - 1) / Self.pageSize * Self.pageSize
        let last = (offset + count) / Self.pageSize * Self.pageSize
        // Under emulation the zeros are stores like any other: a punched hole would change the
        // pages without a store to track.
        guard isSparse, emulation == nil, first < last,
            systemCalls.fallocate(fd, dax_FALLOC_FL_PUNCH_HOLE | dax_FALLOC_FL_KEEP_SIZE, first, last - first) == 0
        else {
            fill(at: offset, count: count, flags: .nonTemporal)
            return
        }
        fill(at: offset, count: first - offset)
        fill(at: last, count: offset + count - last)
    }

    // MARK: - Bounds-checked byte access

    /// Writes `bytes` at `offset` durably (see ``copy(_:toOffset:flags:)``).
    /// Throws `.invalidArgument` for a range outside the device; then nothing is written.
    public func write(_ bytes: [UInt8], at offset: Int, flags: CopyFlags = []) throws {
        try validateRange(offset, bytes.count)
        guard !isReadOnly else {
            throw DAXError(
                .permissionDenied,
                "cannot write \(counted(bytes.count, "byte")) at offset \(offset) of \(path): opened read-only")
        }
        bytes.withUnsafeBytes { copy($0, at: offset, flags: flags) }
    }

    /// Reads `count` bytes at `offset`. Throws `.invalidArgument` for a range outside the device,
    /// and `.noSpace` for a result that would take more than half of the machine's memory (read
    /// such a range in pieces, or through ``baseAddress``) rather than abort when it cannot be had.
    public func read(count: Int, at offset: Int) throws -> [UInt8] {
        try validateRange(offset, count)
        guard count <= Self.largestReadResult else {
            throw DAXError(
                .noSpace,
                "cannot read \(counted(count, "byte")) at offset \(offset) of \(path) into one array: more than half "
                    + "of the machine's memory (\(counted(Self.largestReadResult, "byte"))); read it in pieces")
        }
        return [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            if count > 0 {
                buffer.baseAddress!.update(from: (base + offset).assumingMemoryBound(to: UInt8.self), count: count)
            }
            initialized = count
        }
    }

    /// The largest result ``read(count:at:)`` (and a file's read) allocates: half of the machine's memory.
    package static let largestReadResult: Int = {
        let pages = sysconf(Int32(_SC_PHYS_PAGES))
        let pageBytes = sysconf(Int32(_SC_PAGESIZE))
        guard pages > 0, pageBytes > 0 else { return 1 << 30 }
        return pages / 2 * pageBytes
    }()

    func validateRange(_ offset: Int, _ count: Int) throws {
        guard !isClosed else { throw DAXError(.invalidArgument, "device \(path) is closed") }
        guard Self.range(offset, count, fitsIn: size) else {
            throw DAXError(
                .invalidArgument,
                "range of \(counted(count, "byte")) at offset \(offset) is outside device \(path) of "
                    + counted(size, "byte"))
        }
    }

    /// Traps on a range outside the device: for the library's own calls, where such a range is a
    /// bug of DAX, not of its caller.
    @inline(__always)
    func checkRange(_ offset: Int, _ count: Int) {
        if _slowPath(!Self.range(offset, count, fitsIn: size)) {
            rangeFailure(offset, count)
        }
    }

    @inline(__always)
    func checkWritable() {
        if _slowPath(isReadOnly) { readOnlyFailure() }
    }

    @inline(never)
    private func readOnlyFailure() -> Never {
        preconditionFailure("device \(path) was opened read-only: nothing may be stored to it")
    }

    @inline(never)
    private func rangeFailure(_ offset: Int, _ count: Int) -> Never {
        preconditionFailure("range of \(count) bytes at offset \(offset) is outside device \(path) of \(size) bytes")
    }

    /// Whether `count` bytes at `offset` lie inside `0..<limit`.
    @inline(__always)
    static func range(_ offset: Int, _ count: Int, fitsIn limit: Int) -> Bool {
        offset >= 0 && count >= 0 && offset <= limit && count <= limit &- offset
    }

    // MARK: - Refused calls

    /// Whether a caller's call `what` (`"persist"`) of `count` bytes at `offset` may go on: true
    /// for a range inside the device (and, when it stores, a writable device) while the device is
    /// mapped; otherwise the call is refused (``refusedCalls``) and does nothing. (A closed device
    /// stays mapped while a file system or a DMA registration uses it.)
    @inline(__always)
    func accepts(_ what: StaticString, _ offset: Int, _ count: Int, stores: Bool = false) -> Bool {
        if _fastPath(
            Self.range(offset, count, fitsIn: size) && !(stores && isReadOnly)
                && state.load(ordering: .relaxed) != State.unmapped)
        {
            return true
        }
        refuseCall(what, offset, count)
        return false
    }

    /// Refuses a call that ``accepts(_:_:_:stores:)`` turned down, saying why.
    @inline(never)
    private func refuseCall(_ what: StaticString, _ offset: Int, _ count: Int) {
        let range = "\(what) of \(counted(count, "byte")) at offset \(offset)"
        if state.load(ordering: .relaxed) == State.unmapped {
            refuse(DAXError(.invalidArgument, "\(range): device \(path) is closed (its mapping is gone)"))
        } else if Self.range(offset, count, fitsIn: size) {
            refuse(DAXError(.permissionDenied, "\(range): device \(path) was opened read-only"))
        } else {
            refuse(DAXError(.invalidArgument, "\(range) is outside device \(path) of \(counted(size, "byte"))"))
        }
    }

    /// Calls of the primitives that cannot throw that were refused since the device was opened:
    /// ``persist(offset:count:)``, ``flush(offset:count:)``, ``copy(_:toOffset:flags:)`` and
    /// ``fill(offset:count:value:flags:)`` of the device, and `persist` and `copy` of its
    /// ``DAXMapping``s, given a range outside the device or mapping, asked to store to a read-only
    /// one, or called after the device was closed and unmapped, or the mapping unmapped. A refused call does nothing at all: no byte is stored, no line is flushed.
    /// (A throwing call such as ``write(_:at:flags:)`` throws instead.) The first few refusals of
    /// a device are also told on stderr; with `DAX_TRAP_ON_REFUSAL=1` in the environment a refusal
    /// traps instead, so that a debugger stops at the caller.
    public var refusedCalls: Int { refusals.withTrackedLock { $0.count } }

    /// The last refused call (see ``refusedCalls``), as the error a throwing call would throw:
    /// `.invalidArgument` for a range outside the device or mapping, `.permissionDenied` for a store
    /// to a read-only one. Nil when no call was refused.
    public var lastRefusal: DAXError? { refusals.withTrackedLock { $0.last } }

    /// Records a refused call; the first ``Refusals/told`` of them also go to stderr, one line each.
    @inline(never)
    func refuse(_ error: DAXError) {
        if Self.trapsOnRefusal { preconditionFailure("DAX refused a call: \(error.message)") }
        let count = refusals.withTrackedLock { refusals -> Int in
            refusals.count += 1
            refusals.last = error
            return refusals.count
        }
        guard count <= Refusals.told else { return }
        let more = count == Refusals.told ? "; further refusals are only counted (PMemDevice.refusedCalls)" : ""
        let line = "DAX: refused, nothing done: \(error.message)\(more)\n"
        _ = line.withCString { Glibc.write(STDERR_FILENO, $0, strlen($0)) }
    }

    /// Whether `DAX_TRAP_ON_REFUSAL=1` asks refusals to trap.
    private static let trapsOnRefusal = getenv("DAX_TRAP_ON_REFUSAL").map { String(cString: $0) == "1" } ?? false

    /// The refused calls of a device (``refusedCalls``, ``lastRefusal``).
    struct Refusals {
        /// How many refusals of a device are told on stderr.
        static let told = 8
        var count = 0
        var last: DAXError?
    }
}
