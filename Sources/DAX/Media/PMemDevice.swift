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
    public static let pageSize = 4096
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
        /// The system-call seam; tests inject failures here.
        package var systemCalls: SystemCalls = .live

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
    /// An `O_RDWR` descriptor of the device file: file mappings are made from it, and mounting
    /// takes an exclusive `flock` on it.
    let fd: Int32
    let systemCalls: SystemCalls
    private let flushesCaches: Bool
    /// Cache-flush mode with the live seam and no emulation: `persist` calls `pmem_persist` and
    /// nothing else.
    private let persistsDirectly: Bool
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

    // MARK: - Creating and opening

    /// Creates the device file (fails with `.alreadyExists` if it exists) and maps it with libpmem.
    ///
    /// `size` must be a positive multiple of ``pageSize``, at least ``minimumSize``, at most
    /// ``maximumSize``, and fit in the free space of the file system holding `path`. Nothing is
    /// created when any check fails. Calls `pmem_map_file(PMEM_FILE_CREATE | PMEM_FILE_EXCL)`.
    public static func create(path: String, size: Int, options: Options = .init()) throws -> PMemDevice {
        try validate(size: size, path: path)
        try checkFreeSpace(for: size, at: path)
        let calls = options.systemCalls
        var flags = PMEM_FILE_CREATE | PMEM_FILE_EXCL
        if options.sparse { flags |= PMEM_FILE_SPARSE }
        guard let mapping = calls.pmemMapFile(path, size, Int32(flags), mode_t(options.permissions)) else {
            let code = Glibc.errno
            throw DAXError.pmem(
                "pmem_map_file", "cannot create device \(path) of \(size) bytes",
                errno: code, message: pmemErrorMessage())
        }
        do {
            return try PMemDevice(path: path, mapping: mapping, options: options, created: true)
        } catch {
            _ = calls.pmemUnmap(mapping.address, mapping.length)
            unlink(path)
            throw error
        }
    }

    /// Maps an existing device file, or a real pmem/dev-dax path. Calls `pmem_map_file(path, 0, 0)`.
    public static func open(path: String, options: Options = .init()) throws -> PMemDevice {
        guard !path.isEmpty else { throw DAXError(.invalidArgument, "device path is empty") }
        var info = stat()
        guard stat(path, &info) == 0 else {
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
                        + "between \(minimumSize) and \(maximumSize) bytes")
            }
        }
        let calls = options.systemCalls
        guard let mapping = calls.pmemMapFile(path, 0, 0, 0) else {
            throw DAXError.pmem(
                "pmem_map_file", "cannot open device \(path)", errno: Glibc.errno,
                message: pmemErrorMessage())
        }
        do {
            try validate(size: mapping.length, path: path)
            return try PMemDevice(path: path, mapping: mapping, options: options, created: false)
        } catch {
            _ = calls.pmemUnmap(mapping.address, mapping.length)
            throw error
        }
    }

    init(
        path: String, mapping: (address: UnsafeMutableRawPointer, length: Int, isPmem: Bool), options: Options,
        created: Bool, privateImageFD: Int32? = nil
    ) throws {
        let calls = options.systemCalls
        let fd = privateImageFD ?? calls.open(path, O_RDWR | O_CLOEXEC, 0)
        guard fd >= 0 else { throw DAXError.system("open", "cannot open device \(path)", errno: Glibc.errno) }
        var info = stat()
        fstat(fd, &info)
        self.isDeviceDAX = (info.st_mode & S_IFMT) == S_IFCHR
        self.path = path
        self.size = mapping.length
        self.base = mapping.address
        self.isPersistentMemory = mapping.isPmem
        self.fd = fd
        self.systemCalls = calls
        self.requestedPersistence = options.persistence
        switch options.persistence {
        case .automatic: self.persistence = mapping.isPmem ? .cacheFlush : .msync
        case .cacheFlush, .msync: self.persistence = options.persistence
        }
        self.flushesCaches = persistence == .cacheFlush
        self.persistsDirectly = flushesCaches && calls.isLive && options.powerFailureEmulation == nil
        self.isPrivateImage = privateImageFD != nil
        self.mapSync =
            privateImageFD == nil
            ? Self.probeMapSync(fd: fd, calls: calls) : .refused(reason: "a crash image is mapped privately")
        do {
            self.pages = try PageMap(pageCount: mapping.length / Self.pageSize)
            self.emulation = try options.powerFailureEmulation.map { domain in
                try MediaCopy(
                    domain: domain, cpu: mapping.address, size: mapping.length, deviceFD: fd, copyingDevice: !created,
                    path: path)
            }
        } catch {
            Glibc.close(fd)
            throw error
        }
    }

    deinit {
        if state.load(ordering: .acquiring) != State.unmapped {
            emulation?.close()
            unmapMapping()
            Glibc.close(fd)
        }
    }

    private func unmapMapping() {
        if isPrivateImage { _ = systemCalls.munmap(base, size) } else { _ = systemCalls.pmemUnmap(base, size) }
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
                "device size \(size) for \(path) is below the minimum of \(minimumSize) bytes (2 MiB)")
        }
        guard size <= maximumSize else {
            throw DAXError(
                .invalidArgument,
                "device size \(size) for \(path) is above the maximum of \(maximumSize) bytes (16 TiB)")
        }
    }

    /// Refuses up front a device that the file system holding it cannot back: otherwise tmpfs
    /// would fill the machine's memory before `posix_fallocate` gives up.
    private static func checkFreeSpace(for size: Int, at path: String) throws {
        let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        var info = statvfs()
        guard statvfs(directory.isEmpty ? "/" : directory, &info) == 0 else {
            throw DAXError.system("statvfs", "cannot create device \(path)", errno: Glibc.errno)
        }
        let free = Int(info.f_bavail) &* Int(info.f_frsize)
        guard size <= free else {
            throw DAXError(
                .noSpace,
                "cannot create device \(path) of \(size) bytes: \(directory) has \(free) bytes free")
        }
    }

    /// Asks the kernel for a one-page `MAP_SHARED_VALIDATE | MAP_SYNC` mapping of the device.
    private static func probeMapSync(fd: Int32, calls: SystemCalls) -> MapSyncStatus {
        let flags = dax_MAP_SHARED_VALIDATE | dax_MAP_SYNC
        guard let probe = calls.mmap(nil, pageSize, PROT_READ | PROT_WRITE, flags, fd, 0) else {
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
        Glibc.close(fd)
    }

    // MARK: - Persistence

    /// Makes `count` bytes at `offset` durable, as ``persistence`` says: `pmem_persist` (flush the
    /// cache lines, then SFENCE) or `pmem_msync`. A failing `msync` falls back to cache flushing
    /// and is counted in ``persistenceErrors``; use ``msync(offset:count:)`` to see the error.
    public func persist(offset: Int, count: Int) {
        checkRange(offset, count)
        if persistsDirectly {
            pmem_persist(base + offset, count)
        } else {
            persistThroughSeam(base + offset, count)
        }
    }

    @inline(never)
    private func persistThroughSeam(_ address: UnsafeMutableRawPointer, _ count: Int) {
        if let emulation {
            emulation.persist(offset: address - base, count: count)
        } else if flushesCaches {
            systemCalls.persist(address, count)
        } else {
            syncOrFlush(address, count)
        }
    }

    /// Starts write-back of the range's cache lines without waiting: `pmem_flush` (in `.msync`
    /// mode, `pmem_msync` of the range, which also waits).
    public func flush(offset: Int, count: Int) {
        checkRange(offset, count)
        if persistsDirectly {
            pmem_flush(base + offset, count)
        } else if let emulation {
            emulation.flush(offset: offset, count: count)
            if !flushesCaches { emulation.fence() }
        } else if flushesCaches {
            systemCalls.flush(base + offset, count)
        } else {
            syncOrFlush(base + offset, count)
        }
    }

    /// Waits until flushed lines are durable: `pmem_drain` (SFENCE). A no-op in `.msync` mode,
    /// where every flush already waited.
    public func drain() {
        if persistsDirectly {
            pmem_drain()
        } else if let emulation {
            if flushesCaches { emulation.fence() }
        } else if flushesCaches {
            systemCalls.drain()
        }
    }

    /// Calls `pmem_msync` on the range, whatever the mode, and reports its failure. Under
    /// power-failure emulation a successful `msync` persists the range, as it would on a DAX file.
    public func msync(offset: Int, count: Int) throws {
        checkRange(offset, count)
        guard systemCalls.msync(base + offset, count) == 0 else {
            throw DAXError.system(
                "msync", "cannot persist \(count) bytes at offset \(offset) of \(path)",
                errno: Glibc.errno)
        }
        emulation?.persist(offset: offset, count: count)
    }

    /// Errors of `msync` in ``persist(offset:count:)`` since the device was opened.
    public var persistenceErrors: Int { msyncFailures.load(ordering: .relaxed) }
    private let msyncFailures = Atomic<Int>(0)

    private func syncOrFlush(_ address: UnsafeMutableRawPointer, _ count: Int) {
        if systemCalls.msync(address, count) != 0 {
            msyncFailures.wrappingAdd(1, ordering: .relaxed)
            systemCalls.persist(address, count)
        }
    }

    /// Copies `source` to the device at `offset` and makes it durable: `pmem_memcpy` with `flags`
    /// (non-temporal or temporal stores, no-drain, no-flush). In `.msync` mode: a plain copy, then
    /// `pmem_msync` of the range unless `flags` has `.noFlush`.
    public func copy(_ source: UnsafeRawBufferPointer, toOffset offset: Int, flags: CopyFlags = []) {
        guard let from = source.baseAddress, source.count > 0 else { return }
        checkRange(offset, source.count)
        let to = base + offset
        if let emulation {
            to.copyMemory(from: from, byteCount: source.count)
            emulatedPersistence(emulation, offset, source.count, flags)
        } else if flushesCaches {
            if systemCalls.isLive {
                pmem_memcpy(to, from, source.count, flags.rawValue)
            } else {
                systemCalls.memcpy(to, from, source.count, flags.rawValue)
            }
        } else {
            to.copyMemory(from: from, byteCount: source.count)
            if !flags.contains(.noFlush) { syncOrFlush(to, source.count) }
        }
    }

    /// Sets `count` bytes at `offset` to `value` and makes them durable: `pmem_memset` with `flags`
    /// (in `.msync` mode: a plain fill, then `pmem_msync`).
    public func fill(offset: Int, count: Int, value: UInt8 = 0, flags: CopyFlags = []) {
        guard count > 0 else { return }
        checkRange(offset, count)
        let to = base + offset
        if let emulation {
            memset(to, Int32(value), count)
            emulatedPersistence(emulation, offset, count, flags)
        } else if flushesCaches {
            if systemCalls.isLive {
                pmem_memset(to, Int32(value), count, flags.rawValue)
            } else {
                systemCalls.memset(to, Int32(value), count, flags.rawValue)
            }
        } else {
            memset(to, Int32(value), count)
            if !flags.contains(.noFlush) { syncOrFlush(to, count) }
        }
    }

    /// What a persistent copy or fill with `flags` does to the media copy: flush unless
    /// `.noFlush`, then fence unless `.noDrain` (in `.msync` mode the flush itself waits).
    private func emulatedPersistence(_ emulation: MediaCopy, _ offset: Int, _ count: Int, _ flags: CopyFlags) {
        guard !flags.contains(.noFlush) else { return }
        if !flushesCaches || !flags.contains(.noDrain) {
            emulation.persist(offset: offset, count: count)
        } else {
            emulation.flush(offset: offset, count: count)
        }
    }

    // MARK: - Bounds-checked byte access

    /// Writes `bytes` at `offset` durably (see ``copy(_:toOffset:flags:)``).
    /// Throws `.invalidArgument` for a range outside the device; then nothing is written.
    public func write(_ bytes: [UInt8], at offset: Int, flags: CopyFlags = []) throws {
        try validateRange(offset, bytes.count)
        bytes.withUnsafeBytes { copy($0, toOffset: offset, flags: flags) }
    }

    /// Reads `count` bytes at `offset`. Throws `.invalidArgument` for a range outside the device.
    public func read(count: Int, at offset: Int) throws -> [UInt8] {
        try validateRange(offset, count)
        return [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            if count > 0 {
                buffer.baseAddress!.update(from: (base + offset).assumingMemoryBound(to: UInt8.self), count: count)
            }
            initialized = count
        }
    }

    func validateRange(_ offset: Int, _ count: Int) throws {
        guard !isClosed else { throw DAXError(.invalidArgument, "device \(path) is closed") }
        guard offset >= 0, count >= 0, offset <= size, count <= size - offset else {
            throw DAXError(
                .invalidArgument,
                "range of \(count) bytes at offset \(offset) is outside device \(path) of \(size) bytes")
        }
    }

    @inline(__always)
    private func checkRange(_ offset: Int, _ count: Int) {
        if _slowPath(offset < 0 || count < 0 || offset > size || count > size &- offset) {
            rangeFailure(offset, count)
        }
    }

    @inline(never)
    private func rangeFailure(_ offset: Int, _ count: Int) -> Never {
        preconditionFailure("range of \(count) bytes at offset \(offset) is outside device \(path) of \(size) bytes")
    }
}
