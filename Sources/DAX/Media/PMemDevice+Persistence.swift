import Glibc

/// Persistence: how stores to the device, or to a DAX file mapping of it, become durable, as the
/// device's ``PersistenceMode`` says, and what an emulated device records of it.
extension PMemDevice {
    /// Makes `count` bytes at `offset` durable, as ``persistence`` says: `pmem_persist` (flush the
    /// cache lines, then SFENCE) or `pmem_msync`. A failing `msync` falls back to cache flushing
    /// and is counted in ``persistenceErrors``; use ``msync(offset:count:)`` to see the error.
    /// A range outside the device is refused: nothing is flushed (``refusedCalls``).
    public func persist(offset: Int, count: Int) {
        guard accepts("persist", offset, count) else { return }
        persist(at: offset, count: count)
    }

    /// ``persist(offset:count:)`` for the library's own calls: a range outside the device is a bug
    /// of DAX, and traps.
    @inline(__always)
    func persist(at offset: Int, count: Int) {
        checkRange(offset, count)
        persist(base + offset, count) { $0.persist(offset: offset, count: count) }
    }

    /// Makes `count` bytes at `address` durable, as ``persist(offset:count:)`` does, where
    /// `address` lies in a mapping of the device's pages other than ``baseAddress`` (a DAX file
    /// mapping): the cache lines are flushed, or the range synced, through that mapping.
    /// `deviceOffset` gives the device offset of a byte of the range, nil where the mapping
    /// shows no device page (a hole, a page truncated away); only a device with power-failure
    /// emulation calls it, once per page of the range, since it tracks lines by device offset.
    func persist(
        mappedAt address: UnsafeMutableRawPointer, count: Int, deviceOffset: (UnsafeMutableRawPointer) -> Int?
    ) {
        persist(address, count) { _ in
            flushEmulated(mappedAt: address, count: count, deviceOffset: deviceOffset)
            drain()
        }
    }

    /// The one persist path: `emulated` is what an emulated device does instead.
    @inline(__always)
    private func persist(_ address: UnsafeMutableRawPointer, _ count: Int, emulated: (MediaCopy) -> Void) {
        if persistsDirectly {
            systemCalls.persist(address, count)
        } else {
            persistSlowly(address, count, emulated: emulated)
        }
    }

    @inline(never)
    private func persistSlowly(_ address: UnsafeMutableRawPointer, _ count: Int, emulated: (MediaCopy) -> Void) {
        if let emulation { emulated(emulation) } else { syncOrFlush(address, count) }
    }

    /// Starts write-back of the range's cache lines without waiting: `pmem_flush` (in `.msync`
    /// mode, `pmem_msync` of the range, which also waits). A range outside the device is refused:
    /// nothing is flushed (``refusedCalls``).
    public func flush(offset: Int, count: Int) {
        guard accepts("flush", offset, count) else { return }
        flush(at: offset, count: count)
    }

    /// ``flush(offset:count:)`` for the library's own calls: a bad range traps.
    @inline(__always)
    func flush(at offset: Int, count: Int) {
        checkRange(offset, count)
        if persistsDirectly {
            systemCalls.flush(base + offset, count)
        } else if let emulation {
            flushEmulated(emulation, offset: offset, count: count)
        } else {
            syncOrFlush(base + offset, count)
        }
    }

    /// A flush of an emulated device: marks the lines flushed (in `.msync` mode, where a flush
    /// waits, it fences too).
    private func flushEmulated(_ emulation: MediaCopy, offset: Int, count: Int) {
        emulation.flush(offset: offset, count: count)
        if !flushesCaches { emulation.fence() }
    }

    /// A flush of an emulated device's lines behind `count` bytes at `address` of a file
    /// mapping, page by page at the device offsets `deviceOffset` gives.
    private func flushEmulated(
        mappedAt address: UnsafeMutableRawPointer, count: Int, deviceOffset: (UnsafeMutableRawPointer) -> Int?
    ) {
        guard let emulation, count > 0 else { return }
        var position = address
        let end = address + count
        while position < end {
            let within = Int(bitPattern: UInt(bitPattern: position) % UInt(Self.pageSize))
            let length = min(end - position, Self.pageSize - within)
            if let offset = deviceOffset(position) {
                checkRange(offset, length)
                flushEmulated(emulation, offset: offset, count: length)
            }
            position += length
        }
    }

    /// Waits until flushed lines are durable: `pmem_drain` (SFENCE). A no-op in `.msync` mode,
    /// where every flush already waited.
    public func drain() {
        if persistsDirectly {
            systemCalls.drain()
        } else if let emulation, flushesCaches {
            emulation.fence()
        }
    }

    /// Calls `pmem_msync` on the range, whatever the mode, and reports its failure. Under
    /// power-failure emulation a successful `msync` persists the range, as it would on a DAX file.
    public func msync(offset: Int, count: Int) throws {
        try validateRange(offset, count)
        guard systemCalls.msync(base + offset, count) == 0 else {
            throw DAXError.system(
                "msync", "cannot persist \(counted(count, "byte")) at offset \(offset) of \(path)",
                errno: Glibc.errno)
        }
        emulation?.persist(offset: offset, count: count)
    }

    /// Errors of `msync` in ``persist(offset:count:)`` since the device was opened.
    public var persistenceErrors: Int { msyncFailures.load(ordering: .relaxed) }

    private func syncOrFlush(_ address: UnsafeMutableRawPointer, _ count: Int) {
        if systemCalls.msync(address, count) != 0 {
            msyncFailures.wrappingAdd(1, ordering: .relaxed)
            systemCalls.persist(address, count)
        }
    }

    /// Copies `source` to the device at `offset` and makes it durable: `pmem_memcpy` with `flags`
    /// (non-temporal or temporal stores, no-drain, no-flush). In `.msync` mode: a plain copy, then
    /// `pmem_msync` of the range unless `flags` has `.noFlush`. A range outside the device, or a
    /// read-only device, is refused: nothing is copied (``refusedCalls``).
    public func copy(_ source: UnsafeRawBufferPointer, toOffset offset: Int, flags: CopyFlags = []) {
        guard accepts("copy", offset, source.count, stores: true) else { return }
        copy(source, at: offset, flags: flags)
    }

    /// ``copy(_:toOffset:flags:)`` for the library's own calls: a bad range, or a store to a
    /// read-only device, is a bug of DAX and traps.
    func copy(_ source: UnsafeRawBufferPointer, at offset: Int, flags: CopyFlags = []) {
        checkRange(offset, source.count)
        guard source.baseAddress != nil, source.count > 0 else { return }
        copy(source, to: base + offset, flags: flags) { emulation in
            emulatedPersistence(emulation, offset, source.count, flags)
        }
    }

    /// Copies `source` to `address` and makes it durable, as ``copy(_:toOffset:flags:)`` does,
    /// where `address` lies in a mapping of the device's pages other than ``baseAddress`` (a
    /// writable DAX file mapping): the copy's stores and flushes go through that mapping.
    /// `deviceOffset` is as for ``persist(mappedAt:count:deviceOffset:)``.
    func copy(
        _ source: UnsafeRawBufferPointer, toMappedAt address: UnsafeMutableRawPointer, flags: CopyFlags = [],
        deviceOffset: (UnsafeMutableRawPointer) -> Int?
    ) {
        copy(source, to: address, flags: flags) { _ in
            guard !flags.contains(.noFlush) else { return }
            flushEmulated(mappedAt: address, count: source.count, deviceOffset: deviceOffset)
            if !flags.contains(.noDrain) { drain() }
        }
    }

    /// The one copy path: `emulated` makes the copied bytes durable on an emulated device.
    @inline(__always)
    private func copy(
        _ source: UnsafeRawBufferPointer, to: UnsafeMutableRawPointer, flags: CopyFlags,
        emulated: (MediaCopy) -> Void
    ) {
        guard let from = source.baseAddress, source.count > 0 else { return }
        checkWritable()
        if let emulation {
            to.copyMemory(from: from, byteCount: source.count)
            emulated(emulation)
        } else if flushesCaches {
            systemCalls.memcpy(to, from, source.count, flags.rawValue)
        } else {
            to.copyMemory(from: from, byteCount: source.count)
            if !flags.contains(.noFlush) { syncOrFlush(to, source.count) }
        }
    }

    /// Sets `count` bytes at `offset` to `value` and makes them durable: `pmem_memset` with `flags`
    /// (in `.msync` mode: a plain fill, then `pmem_msync`). A range outside the device, or a
    /// read-only device, is refused: nothing is stored (``refusedCalls``).
    public func fill(offset: Int, count: Int, value: UInt8 = 0, flags: CopyFlags = []) {
        guard accepts("fill", offset, count, stores: true) else { return }
        fill(at: offset, count: count, value: value, flags: flags)
    }

    /// ``fill(offset:count:value:flags:)`` for the library's own calls: a bad range, or a store
    /// to a read-only device, is a bug of DAX and traps.
    func fill(at offset: Int, count: Int, value: UInt8 = 0, flags: CopyFlags = []) {
        checkRange(offset, count)
        checkWritable()
        guard count > 0 else { return }
        let to = base + offset
        if let emulation {
            memset(to, Int32(value), count)
            emulatedPersistence(emulation, offset, count, flags)
        } else if flushesCaches {
            systemCalls.memset(to, Int32(value), count, flags.rawValue)
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
}
