import Glibc

extension PMemDevice {
    /// The persistence domain emulated (``Options/powerFailureEmulation``), nil when off.
    public var powerFailureEmulation: PersistenceDomain? { emulation?.domain }

    /// Writes to `path` a device file holding this device as a power failure now would leave it:
    /// what reached the persistence domain, plus the in-flight lines (stored or flushed, not
    /// fenced) that `keeping` chooses, whole or as some of their 8-byte words. Never a byte
    /// stored after this call began, never less than was persisted. ``open(path:options:)`` maps
    /// the file. The device goes on running.
    ///
    /// Throws `.alreadyExists` if `path` exists, `.unsupported` without emulation; then nothing
    /// is written. Costs the device's size in writes (holes of the media copy stay holes).
    public func powerFail(writingImageTo path: String, keeping: InFlightLines = .none) throws {
        guard !path.isEmpty else { throw DAXError(.invalidArgument, "crash image path is empty") }
        guard let emulation else {
            throw DAXError(
                .unsupported,
                "cannot write a crash image of \(self.path): power-failure emulation is off "
                    + "(open the device with Options.powerFailureEmulation set)")
        }
        guard !isClosed else { throw DAXError(.invalidArgument, "device \(self.path) is closed") }
        let lines = emulation.inFlight().lines
        try emulation.writeImage(to: path, keeping: CrashImagePlan.lines(keeping, of: lines))
    }

    /// Byte ranges stored through the device or its mappings and not yet persistent (flushed and
    /// fenced): what a power failure now could lose, like pmemcheck's "stores not made
    /// persistent". Sorted, disjoint. Empty unless emulation is on (and always under eADR).
    /// Costs in proportion to the pages stored since they were last found persistent.
    public func unpersistedRanges() -> [Range<Int>] {
        guard let emulation, !isClosed else { return [] }
        return emulation.unpersistedRanges()
    }

    /// Fences since the device was opened (each a crash point). Counted only with emulation on.
    public var fenceCount: Int { emulation?.fences.load(ordering: .relaxed) ?? 0 }

    // MARK: - Aliases: file mappings of an emulated device

    /// Tells an emulated device that `pages` of its pages from `frame` are now mapped at
    /// `address` (a DAX file mapping), so that stores there are tracked. `exposed`: the address
    /// is in a mapping other threads may already use. Nothing without emulation.
    /// `handler`: the userfaultfd the range is registered with for write-protect faults, whose
    /// handler forwards stores to ``noteStore(frame:at:through:)``; nil registers it with the
    /// process's.
    func noteMapped(
        _ address: UnsafeMutableRawPointer, frame: UInt64, pages: Int, exposed: Bool,
        handledBy handler: UserFaults? = nil
    ) throws {
        guard let emulation else { return }
        try emulation.addAlias(address, pages: pages, firstPage: Int(frame), exposed: exposed, handledBy: handler)
    }

    /// A store faulted at `address`, a page of a DAX mapping that shows `frame` and is registered
    /// with `faults`: an emulated device marks the page dirty and lifts the write protection (and
    /// returns true); any other device does nothing (false).
    func noteStore(frame: UInt64, at address: UInt, through faults: UserFaults) -> Bool {
        guard let emulation, emulation.domain == .adr else { return false }
        emulation.storeFault(page: Int(frame), at: address, through: faults)
        return true
    }

    /// Tells an emulated device that `length` bytes at `address` no longer map its pages.
    func noteUnmapped(_ address: UnsafeMutableRawPointer, length: Int) {
        emulation?.removeAliases(address, length: length)
    }

    // MARK: - Crash images for a checker

    /// Opens the file `fd` (a crash image the size of this device) as a device of its own, mapped
    /// privately: whatever the checker stores never reaches the file. Calls `mmap(MAP_PRIVATE)`
    /// through `calls`, which the image device keeps.
    static func openPrivateImage(fd: Int32, size: Int, name: String, calls: SystemCalls) throws -> PMemDevice {
        let own = calls.open("/proc/self/fd/\(fd)", O_RDONLY | O_CLOEXEC, 0)
        guard own >= 0 else { throw DAXError.system("open", "cannot open crash image \(name)", errno: errno) }
        guard let address = calls.mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, own, 0) else {
            let code = errno
            _ = calls.close(own)
            throw DAXError.system("mmap", "cannot map crash image \(name) of \(size) bytes", errno: code)
        }
        var options = Options()
        options.persistence = .cacheFlush
        options.systemCalls = calls
        do {
            return try PMemDevice(
                path: name, mapping: (address, size, false), options: options, created: false, privateImageFD: own)
        } catch {
            _ = calls.munmap(address, size)
            throw error
        }
    }
}
