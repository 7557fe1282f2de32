import CLibPMem
import Glibc
import Synchronization

/// What reached the persistence domain of an emulated device, kept apart from what the CPU sees.
///
/// The CPU's view is the device file, mapped as always. Under ADR the media copy is a memfd of
/// the device's size. Stores are tracked by page with userfaultfd in write-protect mode: every
/// page that matches the media copy is write-protected in the device's mapping and in every DAX
/// file mapping of it (an *alias*); its first store faults, and the fault thread marks the page
/// dirty and lets the store through. `flush` marks 64-byte lines and write-protects their pages
/// until the fence (a store in between first saves the flushed content); a fence copies the
/// marked lines to the media copy with the content they had when flushed. The lines in
/// flight are the lines of dirty pages that differ from the media copy; finding them compares
/// only dirty pages, and a dirty page found equal again is write-protected (in every alias) and
/// clean. So a crash point costs in proportion to the pages stored since the last one, never a
/// scan of the device. Under eADR every store is persistent: nothing is tracked and the device
/// file is its own media copy.
final class MediaCopy: Sendable {
    static let lineSize = 64
    static let pageSize = 4096
    static let linesPerPage = pageSize / lineSize

    let domain: PersistenceDomain
    let size: Int
    /// The CPU's view: the device's mapping.
    nonisolated(unsafe) let cpu: UnsafeMutableRawPointer
    /// A file holding the persisted bytes: the memfd under ADR, the device file under eADR.
    let fd: Int32
    /// The media copy, mapped shared (the device's mapping under eADR).
    nonisolated(unsafe) let media: UnsafeMutableRawPointer
    /// The process's userfaultfd (ADR only).
    private let faults: UserFaults?
    private let ownsFile: Bool
    /// The device's system-call seam.
    private let calls: SystemCalls

    /// A virtual range that maps device pages `firstPage ..< firstPage + pages` at `start`.
    struct Alias: Sendable {
        var start: UInt
        var pages: Int
        var firstPage: Int
        /// The userfaultfd the range is registered with: the process's for the device's mapping,
        /// a file system's fault handler for a DAX mapping it handles (which forwards stores here).
        var faults: UserFaults
    }

    struct State {
        /// Pages that may differ from the media copy (stored since they were last clean).
        var dirty: Set<Int> = []
        /// Lines flushed and not yet fenced: device page -> bit per line.
        var flushed: [Int: UInt64] = [:]
        /// Pages with flushed lines, write-protected by the flush: a store to one before the fence
        /// first saves the flushed content of its flushed lines in `snapshots`.
        var flushedPages: Set<Int> = []
        /// The content a flushed line had when it was flushed, for lines stored to again before
        /// the fence: the fence persists this, and the newer store stays in flight.
        var snapshots: [Int: CacheLine] = [:]
        /// The device's mapping first, then every DAX file mapping of the device.
        var aliases: [Alias] = []
        /// Bumped whenever a fence changes the media copy.
        var generation = 0
    }

    let state: Mutex<State>
    /// Fences since the device was opened.
    let fences = Atomic<Int>(0)
    /// Called at each fence, before the fence takes effect (the crash explorer's hook).
    let observer = Mutex<FenceObserver?>(nil)

    /// Sets up emulation for the device mapped at `cpu` from `deviceFD`. `copyingDevice`: the
    /// device holds data already (it was opened, not created), which the media copy starts with.
    init(
        domain: PersistenceDomain, cpu: UnsafeMutableRawPointer, size: Int, deviceFD: Int32, copyingDevice: Bool,
        path: String, calls: SystemCalls
    ) throws {
        self.domain = domain
        self.cpu = cpu
        self.size = size
        self.calls = calls
        guard domain == .adr else {
            fd = deviceFD
            media = cpu
            faults = nil
            ownsFile = false
            state = Mutex(State())
            return
        }
        let faults: UserFaults
        switch UserFaults.shared {
        case .success(let shared): faults = shared
        case .failure(let error):
            throw DAXError(
                .unsupported, "cannot emulate power failures on \(path): \(error.message)")
        }
        let memfd = calls.memfdCreate("dax-media-copy", dax_MFD_CLOEXEC)
        guard memfd >= 0 else { throw DAXError.system("memfd_create", "a media copy for \(path)", errno: errno) }
        guard calls.ftruncate(memfd, size) == 0 else {
            let code = errno
            _ = calls.close(memfd)
            throw DAXError.system("ftruncate", "a media copy of \(size) bytes for \(path)", errno: code)
        }
        guard let mapped = calls.mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, memfd, 0) else {
            let code = errno
            _ = calls.close(memfd)
            throw DAXError.system("mmap", "a media copy of \(size) bytes for \(path)", errno: code)
        }
        if copyingDevice { Self.copyNonZeroPages(from: cpu, to: mapped, size: size) }
        self.fd = memfd
        self.media = mapped
        self.faults = faults
        self.ownsFile = true
        self.state = Mutex(State())
        do {
            try addAlias(cpu, pages: size / Self.pageSize, firstPage: 0, exposed: false, handledBy: nil)
        } catch {
            _ = calls.munmap(mapped, size)
            _ = calls.close(memfd)
            throw DAXError(.unsupported, "cannot emulate power failures on \(path): \(error)")
        }
    }

    /// Drops the aliases' handlers and the media copy.
    func close() {
        let aliases = state.withTrackedLock { state in
            defer { state.aliases = [] }
            return state.aliases
        }
        for alias in aliases {
            faults?.forget(UnsafeMutableRawPointer(bitPattern: alias.start)!, length: alias.pages * Self.pageSize)
        }
        if ownsFile {
            _ = calls.munmap(media, size)
            _ = calls.close(fd)
        }
    }

    private static func copyNonZeroPages(from source: UnsafeRawPointer, to target: UnsafeMutableRawPointer, size: Int) {
        var offset = 0
        while offset < size {
            let words = (source + offset).assumingMemoryBound(to: UInt64.self)
            var zero = true
            for index in 0..<(pageSize / 8) where words[index] != 0 {
                zero = false
                break
            }
            if !zero { (target + offset).copyMemory(from: source + offset, byteCount: pageSize) }
            offset += pageSize
        }
    }

    // MARK: - Aliases

    /// Starts tracking stores through `pages` device pages from `firstPage` mapped at `address`.
    /// `exposed`: other threads may already store there (a page shown in a live mapping), so its
    /// pages count as dirty until compared. `handler`: the range is registered for write-protect
    /// faults with that userfaultfd already, whose handler calls ``storeFault(page:at:through:)``;
    /// nil registers it here, with the process's.
    func addAlias(
        _ address: UnsafeMutableRawPointer, pages: Int, firstPage: Int, exposed: Bool, handledBy handler: UserFaults?
    ) throws {
        guard let shared = faults else { return }
        let start = UInt(bitPattern: address)
        let faults = handler ?? shared
        if handler == nil {
            try faults.register(address, length: pages * Self.pageSize, modes: .writeProtect) { [self] fault in
                storeFault(
                    page: firstPage + Int((fault.address - start) / UInt(Self.pageSize)), at: fault.address,
                    through: faults)
            }
        }
        state.withTrackedLock { state in
            state.aliases.append(Alias(start: start, pages: pages, firstPage: firstPage, faults: faults))
            faults.writeProtect(address, length: pages * Self.pageSize, true)
            if exposed { state.dirty.formUnion(firstPage..<(firstPage + pages)) }
        }
    }

    /// Stops tracking `length` bytes at `address`: they were unmapped or mapped over.
    func removeAliases(_ address: UnsafeMutableRawPointer, length: Int) {
        guard let faults else { return }
        let low = UInt(bitPattern: address)
        let high = low + UInt(length)
        faults.forget(address, length: length)
        state.withTrackedLock { state in
            var kept: [Alias] = []
            for alias in state.aliases {
                let end = alias.start + UInt(alias.pages * Self.pageSize)
                if end <= low || alias.start >= high {
                    kept.append(alias)
                    continue
                }
                if alias.start < low {
                    kept.append(
                        Alias(
                            start: alias.start, pages: Int(low - alias.start) / Self.pageSize,
                            firstPage: alias.firstPage, faults: alias.faults))
                }
                if end > high {
                    let skipped = Int(high - alias.start) / Self.pageSize
                    kept.append(
                        Alias(
                            start: high, pages: alias.pages - skipped, firstPage: alias.firstPage + skipped,
                            faults: alias.faults))
                }
            }
            state.aliases = kept
        }
    }

    /// A fault thread: a store to a clean page, or to a page with flushed lines, at `address` of
    /// an alias registered with `faults`. Saves the flushed lines' content, marks the page dirty
    /// and lets the store through, under the lock so that a crash point cannot find the page clean
    /// between the two.
    func storeFault(page: Int, at address: UInt, through faults: UserFaults) {
        state.withTrackedLock { state in
            if state.flushedPages.remove(page) != nil, let bits = state.flushed[page] {
                var remaining = bits
                while remaining != 0 {
                    let line = page * Self.linesPerPage + remaining.trailingZeroBitCount
                    remaining &= remaining - 1
                    if state.snapshots[line] == nil { state.snapshots[line] = CacheLine(cpu + line * Self.lineSize) }
                }
            }
            state.dirty.insert(page)
            faults.writeProtect(UnsafeMutableRawPointer(bitPattern: address)!, length: Self.pageSize, false)
        }
    }

    /// Write-protects `pages` in every alias, one call per alias.
    private func writeProtectEverywhere(pages: Range<Int>, _ state: borrowing State) {
        for alias in state.aliases {
            let low = max(pages.lowerBound, alias.firstPage)
            let high = min(pages.upperBound, alias.firstPage + alias.pages)
            guard low < high else { continue }
            let address = alias.start + UInt((low - alias.firstPage) * Self.pageSize)
            alias.faults.writeProtect(
                UnsafeMutableRawPointer(bitPattern: address)!, length: (high - low) * Self.pageSize, true)
        }
    }

    private func writeProtectEverywhere(_ page: Int, _ state: borrowing State) {
        for alias in state.aliases where page >= alias.firstPage && page < alias.firstPage + alias.pages {
            let address = alias.start + UInt((page - alias.firstPage) * Self.pageSize)
            alias.faults.writeProtect(UnsafeMutableRawPointer(bitPattern: address)!, length: Self.pageSize, true)
        }
    }

    // MARK: - Flush and fence

    /// Marks the lines of the range flushed: the next fence makes them persistent with the
    /// content they have now. Their pages are write-protected until the fence, so that a store
    /// to one in between first saves that content (the store itself stays in flight).
    func flush(offset: Int, count: Int) {
        guard domain == .adr, count > 0 else { return }
        let first = offset / Self.lineSize
        let last = (offset + count - 1) / Self.lineSize
        state.withTrackedLock { state in
            var line = first
            while line <= last {
                let page = line / Self.linesPerPage
                let from = line % Self.linesPerPage
                let to = min(Self.linesPerPage - 1, from + (last - line))
                let bits = to - from == 63 ? UInt64.max : ((UInt64(1) << UInt64(to - from + 1)) - 1) << UInt64(from)
                state.flushed[page, default: 0] |= bits
                state.flushedPages.insert(page)
                if !state.snapshots.isEmpty {
                    for index in (page * Self.linesPerPage + from)...(page * Self.linesPerPage + to) {
                        state.snapshots.removeValue(forKey: index)
                    }
                }
                line += to - from + 1
            }
            writeProtectEverywhere(pages: (first / Self.linesPerPage)..<(last / Self.linesPerPage + 1), state)
        }
    }

    /// A fence (SFENCE after flushes): first the observer sees the crash point, then every
    /// flushed line reaches the media copy.
    func fence() {
        let number = fences.wrappingAdd(1, ordering: .relaxed).newValue
        notifyObserver(number)
        state.withTrackedLock { state in
            if domain == .adr { applyFlushed(&state) } else { state.generation &+= 1 }
        }
    }

    /// Flush then fence, in one step: `pmem_persist` of the range.
    func persist(offset: Int, count: Int) {
        let number = fences.wrappingAdd(1, ordering: .relaxed).newValue
        notifyObserver(number)
        guard domain == .adr else {
            state.withTrackedLock { $0.generation &+= 1 }
            return
        }
        state.withTrackedLock { state in
            applyFlushed(&state)
            guard count > 0 else { return }
            let first = offset / Self.lineSize * Self.lineSize
            let end = (offset + count + Self.lineSize - 1) / Self.lineSize * Self.lineSize
            (media + first).copyMemory(from: cpu + first, byteCount: end - first)
            state.generation &+= 1
        }
    }

    private func notifyObserver(_ number: Int) {
        guard let observer = observer.withTrackedLock({ $0 }) else { return }
        observer.body(number)
    }

    private func applyFlushed(_ state: inout State) {
        guard !state.flushed.isEmpty else { return }
        defer {
            for (line, content) in state.snapshots { content.store(to: media + line * Self.lineSize) }
            state.snapshots.removeAll()
            state.flushedPages.removeAll(keepingCapacity: true)
        }
        for (page, bits) in state.flushed {
            let pageOffset = page * Self.pageSize
            if bits == .max {
                (media + pageOffset).copyMemory(from: cpu + pageOffset, byteCount: Self.pageSize)
                continue
            }
            var remaining = bits
            while remaining != 0 {
                let line = remaining.trailingZeroBitCount
                remaining &= remaining - 1
                let offset = pageOffset + line * Self.lineSize
                (media + offset).copyMemory(from: cpu + offset, byteCount: Self.lineSize)
            }
        }
        state.flushed.removeAll(keepingCapacity: true)
        state.generation &+= 1
    }

    // MARK: - What is in flight

    /// The lines that differ between the CPU's view and the media copy, sorted, and the media
    /// copy's generation. Dirty pages found equal are write-protected again and become clean.
    func inFlight() -> (lines: [Int], generation: Int) {
        guard domain == .adr else { return ([], state.withTrackedLock { $0.generation }) }
        return state.withTrackedLock { state in
            var lines: [Int] = []
            var clean: [Int] = []
            for page in state.dirty.sorted() {
                let before = lines.count
                differingLines(page, into: &lines)
                guard lines.count == before else { continue }
                // Protect, then look again: a store that slipped in before the protection shows.
                writeProtectEverywhere(page, state)
                differingLines(page, into: &lines)
                if lines.count == before { clean.append(page) }
            }
            for page in clean { state.dirty.remove(page) }
            return (lines, state.generation)
        }
    }

    private func differingLines(_ page: Int, into lines: inout [Int]) {
        let offset = page * Self.pageSize
        guard memcmp(cpu + offset, media + offset, Self.pageSize) != 0 else { return }
        for line in 0..<Self.linesPerPage {
            let at = offset + line * Self.lineSize
            if memcmp(cpu + at, media + at, Self.lineSize) != 0 { lines.append(page * Self.linesPerPage + line) }
        }
    }

    /// Byte ranges where the CPU's view differs from the media copy: what a failure now loses.
    func unpersistedRanges() -> [Range<Int>] {
        var ranges: [Range<Int>] = []
        for line in inFlight().lines {
            let start = line * Self.lineSize
            for byte in start..<(start + Self.lineSize) {
                let differs =
                    cpu.load(fromByteOffset: byte, as: UInt8.self) != media.load(fromByteOffset: byte, as: UInt8.self)
                guard differs else { continue }
                if let last = ranges.last, last.upperBound == byte {
                    ranges[ranges.count - 1] = last.lowerBound..<(byte + 1)
                } else {
                    ranges.append(byte..<(byte + 1))
                }
            }
        }
        return ranges
    }

    // MARK: - Images

    /// Copies the kept words of `lines` from the CPU's view into `target` (an image the size of
    /// the device).
    func apply(_ lines: [KeptLine], to target: UnsafeMutableRawPointer) {
        for kept in lines {
            let offset = kept.line * Self.lineSize
            if kept.words == KeptLine.whole {
                (target + offset).copyMemory(from: cpu + offset, byteCount: Self.lineSize)
                continue
            }
            for word in 0..<8 where kept.words & (1 << word) != 0 {
                (target + offset + word * 8).copyMemory(from: cpu + offset + word * 8, byteCount: 8)
            }
        }
    }

    /// Runs `body` while the media copy holds `lines` on top of what was persisted, then puts
    /// the persisted bytes back. `body` must not store to the media copy.
    func withLinesApplied<T>(_ lines: [KeptLine], _ body: () throws -> T) rethrows -> T {
        guard !lines.isEmpty else { return try body() }
        var saved = [UInt8](repeating: 0, count: lines.count * Self.lineSize)
        saved.withUnsafeMutableBytes { buffer in
            for (index, kept) in lines.enumerated() {
                (buffer.baseAddress! + index * Self.lineSize).copyMemory(
                    from: media + kept.line * Self.lineSize, byteCount: Self.lineSize)
            }
        }
        apply(lines, to: media)
        defer {
            saved.withUnsafeBytes { buffer in
                for (index, kept) in lines.enumerated() {
                    (media + kept.line * Self.lineSize).copyMemory(
                        from: buffer.baseAddress! + index * Self.lineSize, byteCount: Self.lineSize)
                }
            }
        }
        return try body()
    }

    /// Writes a device file at `path`: the media copy plus `lines` from the CPU's view.
    func writeImage(to path: String, keeping lines: [KeptLine]) throws {
        let out = calls.open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard out >= 0 else {
            let code = errno
            if code == EEXIST { throw DAXError(.alreadyExists, "cannot write a crash image to \(path): it exists") }
            throw DAXError.system("open", "cannot write a crash image to \(path)", errno: code)
        }
        do {
            guard calls.ftruncate(out, size) == 0 else {
                throw DAXError.system(
                    "ftruncate", "cannot write a crash image of \(size) bytes to \(path)", errno: errno)
            }
            try withLinesApplied(domain == .adr ? lines : []) {
                try copyData(to: out, path: path)
            }
            _ = calls.close(out)
        } catch {
            _ = calls.close(out)
            _ = calls.unlink(path)
            throw error
        }
    }

    /// Writes the media copy's data regions (`SEEK_DATA`/`SEEK_HOLE`; holes stay holes).
    private func copyData(to out: Int32, path: String) throws {
        var offset = 0
        while offset < size {
            let data = calls.lseek(fd, offset, dax_SEEK_DATA)
            if data < 0 { break }
            let hole = min(size, max(data, calls.lseek(fd, data, dax_SEEK_HOLE)))
            var at = data
            while at < hole {
                let written = calls.pwrite(
                    out, UnsafeRawBufferPointer(start: media + at, count: min(hole - at, 1 << 26)), at)
                guard written > 0 else {
                    let code = errno
                    throw DAXError(
                        code == ENOSPC ? .noSpace : .io,
                        "cannot write a crash image of \(size) bytes to \(path): \(String(cString: strerror(code)))",
                        errno: code)
                }
                at += written
            }
            offset = hole
        }
    }
}

/// The content of one 64-byte cache line.
struct CacheLine {
    private var words: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64)

    /// Copies the line at `address`.
    init(_ address: UnsafeRawPointer) {
        words = (0, 0, 0, 0, 0, 0, 0, 0)
        withUnsafeMutableBytes(of: &words) { $0.baseAddress!.copyMemory(from: address, byteCount: 64) }
    }

    /// Copies the line to `address`.
    func store(to address: UnsafeMutableRawPointer) {
        var words = words
        withUnsafeBytes(of: &words) { address.copyMemory(from: $0.baseAddress!, byteCount: 64) }
    }
}

/// The crash explorer's hook: called on the thread that fences, before the fence takes effect,
/// with the fence's number since the device was opened.
final class FenceObserver: Sendable {
    /// Called only on the thread that runs the explorer's workload, while the explorer waits in
    /// it: the explorer's contract is a workload that fences from that one thread.
    nonisolated(unsafe) let body: (Int) -> Void

    init(_ body: @escaping (Int) -> Void) { self.body = body }
}
