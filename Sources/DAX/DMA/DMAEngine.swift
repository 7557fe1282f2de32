import Synchronization

/// A device that does DMA, such as an RDMA NIC: it writes and reads pinned pages by frame, through
/// the device's own mapping, never through a file's virtual mapping.
///
/// ``register(_:)`` is a memory registration: the engine takes ownership of a pin until
/// ``deregister(_:)``. If the pin was a long-term one and its lease is revoked (a truncate with
/// `.revokeLeases`), every later access throws `.revoked` and writes nothing, the way an IOMMU or
/// on-demand-paging invalidation cuts a NIC off. Thread-safe.
public final class DMAEngine: Sendable {
    let device: PMemDevice
    /// Bytes written and read by DMA, for statistics.
    let bytesWritten = Atomic<Int>(0)
    let bytesRead = Atomic<Int>(0)

    /// An engine for `device`: it touches the device only through the pins registered with it.
    public init(device: PMemDevice) {
        self.device = device
    }

    /// Takes ownership of `pin`, like an RDMA memory registration. The region keeps the pin's
    /// ``Access``: the engine writes only through a `.readWrite` pin. A pin of another device's
    /// pages is held (and released at ``deregister(_:)``) but never accessed: its frame numbers
    /// mean other bytes on this engine's device, so every access throws `.invalidArgument`.
    public func register(_ pin: consuming PinnedPages) -> DMARegion {
        DMARegion(device: device, pin: pin)
    }

    /// Writes `bytes` at `offset` of the region (counted from the start of its first pinned page,
    /// across its pages in order), by frame. Throws `.revoked` once the lease was revoked,
    /// `.permissionDenied` for a region whose pin was taken `.readOnly`, `.invalidArgument` for a
    /// range outside the region, a deregistered region, or a pin of another device; then nothing
    /// is written.
    public func write(_ bytes: [UInt8], to region: DMARegion, at offset: Int) throws {
        try bytes.withUnsafeBytes { try write(from: $0, to: region, at: offset) }
    }

    /// Writes the bytes of `source` at `offset` of the region, by frame, straight from the
    /// caller's memory (no array is made). Throws as ``write(_:to:at:)`` does.
    public func write(from source: UnsafeRawBufferPointer, to region: DMARegion, at offset: Int) throws {
        try checkOwner(region)
        try region.withAccess(offset: offset, count: source.count, what: "write") {
            guard region.access == .readWrite else {
                throw DAXError(
                    .permissionDenied,
                    "cannot DMA-write \(counted(source.count, "byte")) at offset \(offset): the region's pages were "
                        + "pinned .readOnly (a reader of the file may not change it)")
            }
            region.forEachChunk(offset: offset, count: source.count) { deviceOffset, at, length in
                device.copy(
                    UnsafeRawBufferPointer(rebasing: source[at..<(at + length)]), at: deviceOffset,
                    flags: .noDrain)
            }
            device.drain()
        }
        bytesWritten.wrappingAdd(source.count, ordering: .relaxed)
    }

    /// Reads `count` bytes at `offset` of the region, by frame. Throws as ``write(_:to:at:)`` does.
    public func read(count: Int, from region: DMARegion, at offset: Int) throws -> [UInt8] {
        guard count >= 0, count <= region.count else {
            throw DAXError(
                .invalidArgument,
                "cannot DMA-read \(counted(count, "byte")) at offset \(offset): outside the region of "
                    + "\(counted(region.count, "byte"))")
        }
        return try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            try read(into: UnsafeMutableRawBufferPointer(buffer), from: region, at: offset)
            initialized = count
        }
    }

    /// Reads `buffer.count` bytes at `offset` of the region into `buffer`, by frame, straight into
    /// the caller's memory. Throws as ``write(_:to:at:)`` does; then `buffer` is unchanged.
    public func read(into buffer: UnsafeMutableRawBufferPointer, from region: DMARegion, at offset: Int) throws {
        try checkOwner(region)
        try region.withAccess(offset: offset, count: buffer.count, what: "read") {
            region.forEachChunk(offset: offset, count: buffer.count) { deviceOffset, at, length in
                if deviceOffset >= device.size {
                    // The zero frame (a read-only pin of a hole): zeros, as the kernel's zero page.
                    (buffer.baseAddress! + at).initializeMemory(as: UInt8.self, repeating: 0, count: length)
                } else {
                    (buffer.baseAddress! + at).copyMemory(from: device.base + deviceOffset, byteCount: length)
                }
            }
        }
        bytesRead.wrappingAdd(buffer.count, ordering: .relaxed)
    }

    /// Releases the region's pin (waiting for an access in flight). Idempotent.
    public func deregister(_ region: DMARegion) {
        region.deregister()
    }

    private func checkOwner(_ region: DMARegion) throws {
        guard region.device === device else {
            throw DAXError(
                .invalidArgument, "the DMA region belongs to device \(region.device.path), not \(device.path)")
        }
    }
}

/// Pinned pages registered with a ``DMAEngine``.
public final class DMARegion: Sendable {
    /// The pinned frames, in order; `offset` counts across them.
    public let frames: [PageFrameNumber]
    /// The access the pin was taken with: `.readOnly` regions can only be read by DMA.
    public let access: Access
    let device: PMemDevice
    /// Whether the pin holds pages of `device` (a pin of another device is never accessed).
    private let isOnDevice: Bool
    private let lease: PinLease?
    /// The pin, until deregistered. Held while an access is in flight, so a deregister waits.
    private let pin: Mutex<PinnedPages?>
    /// Whether the device's mapping was retained (it stays mapped while the region lives).
    private let retainsDevice: Bool

    init(device: PMemDevice, pin: consuming PinnedPages) {
        self.device = device
        self.frames = pin.frames
        self.access = pin.access
        self.isOnDevice = pin.belongs(to: device.pages)
        self.lease = pin.lease
        self.pin = Mutex(Optional(pin))
        self.retainsDevice = (try? device.retainUse(for: "register a DMA region")) != nil
    }

    deinit { deregister() }

    /// True once the lease of its long-term pin was revoked.
    public var isRevoked: Bool { lease?.isRevoked ?? false }

    /// True once deregistered.
    public var isDeregistered: Bool { pin.withTrackedLock { $0 == nil } }

    /// Bytes the region covers.
    public var count: Int { frames.count * PMemDevice.pageSize }

    func deregister() {
        let taken = pin.withTrackedLock { $0.take() }
        guard let taken else { return }
        taken.release()
        if retainsDevice { device.releaseUse() }
    }

    /// Runs `body` while the region can be neither deregistered nor revoked.
    func withAccess<T: Sendable>(offset: Int, count: Int, what: String, _ body: () throws -> T) throws -> T {
        guard isOnDevice else {
            throw DAXError(
                .invalidArgument,
                "cannot DMA-\(what): the region's pin holds pages of another device, not of \(device.path) "
                    + "(its frame numbers would reach other bytes here)")
        }
        guard offset >= 0, count >= 0, offset <= self.count, count <= self.count - offset else {
            throw DAXError(
                .invalidArgument,
                "cannot DMA-\(what) \(counted(count, "byte")) at offset \(offset): outside the region "
                    + "of \(counted(self.count, "byte"))")
        }
        guard retainsDevice else {
            throw DAXError(.invalidArgument, "cannot DMA-\(what): device \(device.path) is closed")
        }
        return try pin.withTrackedLock { pin in
            guard pin != nil else {
                throw DAXError(.invalidArgument, "cannot DMA-\(what): the region was deregistered")
            }
            guard let lease else { return try body() }
            do {
                return try lease.withAccess(body)
            } catch let error as DAXError {
                let first = frames.first.map { " from \($0)" } ?? ""
                throw error.context(
                    "cannot DMA-\(what) \(counted(count, "byte")) at offset \(offset) of the region of \(counted(self.count, "byte"))\(first)",
                    naming: "DMA-")
            }
        }
    }

    /// Splits `offset..<offset+count` of the region into pieces within one frame each:
    /// `(device offset, offset in the caller's buffer, length)`.
    func forEachChunk(offset: Int, count: Int, _ body: (Int, Int, Int) -> Void) {
        var done = 0
        while done < count {
            let position = offset + done
            let page = position / PMemDevice.pageSize
            let within = position % PMemDevice.pageSize
            let length = min(count - done, PMemDevice.pageSize - within)
            body(frames[page].deviceOffset + within, done, length)
            done += length
        }
    }
}
