import CLibPMem
import Foundation
import Synchronization
import Testing

@testable import DAX

@Suite("PMemDevice")
struct DeviceTests {
    @Test("create, write, reopen: the bytes are still there")
    func reopenKeepsBytes() throws {
        let path = TemporaryDevice.uniquePath("reopen")
        defer { unlink(path) }
        let pattern = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        do {
            let device = try PMemDevice.create(path: path, size: 4 << 20)
            #expect(device.size == 4 << 20)
            #expect(device.pageCount == 1024)
            #expect(device.pages.count == 1024)
            try device.write(pattern, at: 123_456)
            // Raw stores through the mapping, persisted by hand.
            device.baseAddress.storeBytes(of: 0xDEAD_BEEF_CAFE_F00D as UInt64, toByteOffset: 4096, as: UInt64.self)
            device.persist(offset: 4096, count: 8)
            device.close()
            #expect(device.isClosed)
        }
        let reopened = try PMemDevice.open(path: path)
        defer { reopened.close() }
        #expect(reopened.size == 4 << 20)
        #expect(try reopened.read(count: pattern.count, at: 123_456) == pattern)
        #expect(reopened.baseAddress.load(fromByteOffset: 4096, as: UInt64.self) == 0xDEAD_BEEF_CAFE_F00D)
        // Untouched bytes of a new device read as zeros.
        #expect(try reopened.read(count: 64, at: 2 << 20) == [UInt8](repeating: 0, count: 64))
    }

    @Test("create refuses an existing file and leaves it untouched")
    func createRefusesExisting() throws {
        let path = TemporaryDevice.uniquePath("exists")
        defer { unlink(path) }
        let original = Data("not a device".utf8)
        #expect(FileManager.default.createFile(atPath: path, contents: original))
        let error = expectDAXError(.alreadyExists) { try PMemDevice.create(path: path, size: 4 << 20) }
        #expect(error?.message.contains(path) == true)
        #expect(error?.errno == EEXIST)
        #expect(FileManager.default.contents(atPath: path) == original)
    }

    @Test(
        "bad sizes are refused before anything is created",
        arguments: [
            0, -4096, 4095, 4097, (4 << 20) + 1, 1 << 20, PMemDevice.minimumSize - 4096, PMemDevice.maximumSize + 4096,
        ])
    func badSizes(size: Int) throws {
        let path = TemporaryDevice.uniquePath("size")
        defer { unlink(path) }
        let error = expectDAXError(.invalidArgument) { try PMemDevice.create(path: path, size: size) }
        #expect(error?.message.contains("\(size)") == true)
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    @Test("a device larger than the free space is refused without filling /dev/shm")
    func noSpace() throws {
        let path = TemporaryDevice.uniquePath("huge")
        defer { unlink(path) }
        expectDAXError(.noSpace) { try PMemDevice.create(path: path, size: 4 << 40) }
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    @Test("create in a missing directory fails with notFound and creates nothing")
    func missingDirectory() throws {
        let path = "/dev/shm/daxtest-no-such-dir-\(getpid())/device"
        expectDAXError(.notFound) { try PMemDevice.create(path: path, size: 4 << 20) }
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    @Test("open of a wrong path says what is wrong")
    func openErrors() throws {
        expectDAXError(.notFound) { try PMemDevice.open(path: "/dev/shm/daxtest-missing-\(UUID())") }
        expectDAXError(.isADirectory) { try PMemDevice.open(path: "/dev/shm") }
        expectDAXError(.invalidArgument) { try PMemDevice.open(path: "") }
        let path = TemporaryDevice.uniquePath("odd")
        defer { unlink(path) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: 5000)))
        let error = expectDAXError(.invalidArgument) { try PMemDevice.open(path: path) }
        #expect(error?.message.contains("5000") == true)
        #expect((try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) == 5000)
    }

    /// Whether the devices of these tests live on a tmpfs, as `/dev/shm` normally is.
    static let devicesOnTmpfs: Bool = {
        // The mount whose mount point is the longest prefix of /dev/shm, from /proc/self/mounts.
        let mounts = Residency.readWhole("/proc/self/mounts") ?? ""
        var best: (point: String, type: String)?
        for line in mounts.split(separator: "\n") {
            let fields = line.split(separator: " ").map(String.init)
            guard fields.count > 2, fields[1] == "/" || "/dev/shm/".hasPrefix(fields[1] + "/") else { continue }
            if fields[1].count >= (best?.point.count ?? 0) { best = (fields[1], fields[2]) }
        }
        return best?.type == "tmpfs"
    }()

    @Test(
        "tmpfs is reported honestly: pmem only if libpmem is told so, the persistence that follows, MAP_SYNC refused with a reason",
        .enabled(if: devicesOnTmpfs, "/dev/shm is not a tmpfs on this machine"))
    func honestReport() throws {
        let temporary = try TemporaryDevice()
        let device = temporary.device
        // A tmpfs page is not persistent memory; PMEM_IS_PMEM_FORCE=1 makes libpmem say it is.
        let forced = ProcessInfo.processInfo.environment["PMEM_IS_PMEM_FORCE"] == "1"
        #expect(device.isPersistentMemory == forced)
        #expect(device.isPersistentMemory == (pmem_is_pmem(device.baseAddress, device.size) != 0))
        #expect(device.persistence == (forced ? .cacheFlush : .msync))
        #expect(device.requestedPersistence == .automatic)
        // The kernel decides MAP_SYNC, whatever libpmem was told.
        guard case .refused(let reason) = device.mapSync else {
            Issue.record("MAP_SYNC granted on tmpfs")
            return
        }
        #expect(reason.contains("tmpfs"))
    }

    @Test("cache-flush mode flushes and fences, never msyncs")
    func cacheFlushMode() throws {
        let counter = CallCounter()
        let temporary = try counter.temporaryDevice(persistence: .cacheFlush)
        let device = temporary.device
        #expect(device.persistence == .cacheFlush)
        device.persist(offset: 0, count: 64)
        device.flush(offset: 4096, count: 128)
        device.drain()
        try device.write([1, 2, 3], at: 8192, flags: [.nonTemporal, .noDrain])
        #expect(counter.persists.load(ordering: .relaxed) == 1)
        #expect(counter.flushes.load(ordering: .relaxed) == 1)
        #expect(counter.drains.load(ordering: .relaxed) == 1)
        #expect(counter.msyncs.load(ordering: .relaxed) == 0)
        #expect(counter.copies.load(ordering: .relaxed) == 1)
        #expect(counter.copyFlags.withTrackedLock { $0 } == [UInt32(PMEM_F_MEM_NONTEMPORAL | PMEM_F_MEM_NODRAIN)])
        #expect(try device.read(count: 3, at: 8192) == [1, 2, 3])
    }

    @Test("persist, flush, copy and fill refuse a range outside the device: nothing stored or flushed, counted")
    func refusedRanges() throws {
        let counter = CallCounter()
        let temporary = try counter.temporaryDevice(persistence: .cacheFlush)
        let device = temporary.device
        let size = device.size
        try device.write([UInt8](repeating: 0x5A, count: 4096), at: size - 4096)
        let calls = counter.persists.load(ordering: .relaxed) + counter.flushes.load(ordering: .relaxed)
        let copies = counter.copies.load(ordering: .relaxed)
        let ones = [UInt8](repeating: 1, count: 4096)
        let refused: [(String, () -> Void)] = [
            ("flush of 4 KiB at size - 10", { device.flush(offset: size - 10, count: 4096) }),
            ("fill of 4 KiB at size - 10", { device.fill(offset: size - 10, count: 4096, value: 0xEE) }),
            ("copy of 4 KiB to size - 10", { ones.withUnsafeBytes { device.copy($0, toOffset: size - 10) } }),
            ("persist at -4096", { device.persist(offset: -4096, count: 4096) }),
            ("persist at size", { device.persist(offset: size, count: 4096) }),
            ("persist of a negative count", { device.persist(offset: 0, count: -1) }),
            ("copy to Int.max", { ones.withUnsafeBytes { device.copy($0, toOffset: Int.max) } }),
            ("fill of Int.max bytes at 1", { device.fill(offset: 1, count: Int.max) }),
        ]
        #expect(device.refusedCalls == 0 && device.lastRefusal == nil)
        for (index, (name, call)) in refused.enumerated() {
            call()
            #expect(device.refusedCalls == index + 1, "\(name)")
            #expect(device.lastRefusal?.code == .invalidArgument, "\(name)")
            #expect(device.lastRefusal?.message.contains("outside device \(device.path)") == true, "\(name)")
        }
        // Not one byte of the copy or the fill was stored at the end of the device, nothing was
        // flushed, no libpmem copy ran.
        #expect(try device.read(count: 4096, at: size - 4096) == [UInt8](repeating: 0x5A, count: 4096))
        #expect(counter.persists.load(ordering: .relaxed) + counter.flushes.load(ordering: .relaxed) == calls)
        #expect(counter.copies.load(ordering: .relaxed) == copies)
        #expect(counter.memsets.load(ordering: .relaxed) == 0)
        // The ranges that fit still work, up to the last byte.
        device.fill(offset: size - 10, count: 10, value: 0xEE)
        device.persist(offset: size, count: 0)
        #expect(try device.read(count: 10, at: size - 10) == [UInt8](repeating: 0xEE, count: 10))
        #expect(device.refusedCalls == refused.count)
        // Closed with no user left, the device is unmapped: a call refuses rather than fault.
        device.close()
        device.persist(offset: 0, count: 64)
        ones.withUnsafeBytes { device.copy($0, toOffset: 0) }
        #expect(device.refusedCalls == refused.count + 2)
        #expect(device.lastRefusal?.message.hasSuffix("device \(device.path) is closed (its mapping is gone)") == true)
    }

    @Test("a read-only device refuses copy and fill (.permissionDenied) and stores nothing")
    func readOnlyDeviceRefusesStores() throws {
        let temporary = try TemporaryDevice()
        try temporary.device.write([7, 7, 7], at: 4096)
        var options = PMemDevice.Options()
        options.readOnly = true
        let device = try PMemDevice.open(path: temporary.path, options: options)
        defer { device.close() }
        device.fill(offset: 4096, count: 3, value: 1)
        [UInt8](repeating: 2, count: 3).withUnsafeBytes { device.copy($0, toOffset: 4096) }
        #expect(device.refusedCalls == 2)
        #expect(device.lastRefusal?.code == .permissionDenied)
        #expect(device.lastRefusal?.message.contains("read-only") == true)
        #expect(try device.read(count: 3, at: 4096) == [7, 7, 7])
        device.persist(offset: 4096, count: 3)  // nothing to store: allowed
        #expect(device.refusedCalls == 2)
    }

    @Test("the first refusals are told on stderr, one line each; later ones are only counted (child process)")
    func refusalsToldOnStderr() async {
        let result = await #expect(processExitsWith: .exitCode(0), observing: [\.standardErrorContent]) {
            let path = "/dev/shm/daxtest-refusals-\(getpid())"
            guard let device = try? PMemDevice.create(path: path, size: 4 << 20) else { exit(2) }
            unlink(path)
            for count in 1...20 { device.persist(offset: device.size, count: count) }
            exit(device.refusedCalls == 20 ? 0 : 3)
        }
        guard let result else { return }
        let lines = String(decoding: result.standardErrorContent, as: UTF8.self).split(separator: "\n")
        #expect(lines.count == PMemDevice.Refusals.told, "\(lines)")
        #expect(lines.allSatisfy { $0.hasPrefix("DAX: refused, nothing done: persist of ") })
        #expect(lines.first?.contains("persist of 1 byte at offset 4194304 is outside device") == true)
        #expect(lines.last?.hasSuffix("further refusals are only counted (PMemDevice.refusedCalls)") == true)
    }

    @Test("msync mode msyncs, and its failures are reported")
    func msyncMode() throws {
        let counter = CallCounter()
        let temporary = try counter.temporaryDevice(persistence: .msync)
        let device = temporary.device
        #expect(device.persistence == .msync)
        device.persist(offset: 100, count: 10)
        try device.write([9, 9], at: 5000)
        device.drain()
        #expect(counter.msyncs.load(ordering: .relaxed) == 2)
        #expect(counter.persists.load(ordering: .relaxed) == 0)
        #expect(counter.drains.load(ordering: .relaxed) == 0)
        #expect(counter.copies.load(ordering: .relaxed) == 0)

        counter.msyncFailure.store(EIO, ordering: .relaxed)
        let error = expectDAXError(.io) { try device.msync(offset: 0, count: 4096) }
        #expect(error?.errno == EIO)
        #expect(device.persistenceErrors == 0)
        // persist cannot throw: it falls back to flushing the cache lines and counts the failure.
        device.persist(offset: 0, count: 64)
        #expect(device.persistenceErrors == 1)
        #expect(counter.persists.load(ordering: .relaxed) == 1)
    }

    @Test("a failing pmem_map_file keeps errno and libpmem's message")
    func mapFailure() throws {
        var options = PMemDevice.Options()
        options.systemCalls = .injectable
        options.systemCalls.pmemMapFile = { _, _, _, _ in
            errno = ENOSPC
            return nil
        }
        let path = TemporaryDevice.uniquePath("mapfail")
        defer { unlink(path) }
        let error = expectDAXError(.noSpace) { try PMemDevice.create(path: path, size: 4 << 20, options: options) }
        #expect(error?.errno == ENOSPC)
        #expect(error?.message.contains("pmem_map_file") == true)
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    @Test("byte access outside the device is an error and writes nothing")
    func outOfRange() throws {
        let temporary = try TemporaryDevice(size: 4 << 20)
        let device = temporary.device
        expectDAXError(.invalidArgument) { try device.write([1, 2, 3, 4], at: (4 << 20) - 2) }
        expectDAXError(.invalidArgument) { try device.write([1], at: -1) }
        expectDAXError(.invalidArgument) { try device.read(count: 10, at: 4 << 20) }
        expectDAXError(.invalidArgument) { try device.read(count: -1, at: 0) }
        #expect(try device.read(count: 2, at: (4 << 20) - 2) == [0, 0])
    }

    @Test("fill and copy with temporal and non-temporal stores land on the device")
    func fillAndCopy() throws {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        let temporary = try TemporaryDevice(options: options)
        let device = temporary.device
        device.fill(offset: 65536, count: 1 << 20, value: 0xAB, flags: .nonTemporal)
        let source = [UInt8](repeating: 0x5C, count: 300)
        source.withUnsafeBytes { device.copy($0, toOffset: 100, flags: [.temporal, .noDrain]) }
        device.drain()
        #expect(try device.read(count: 1 << 20, at: 65536).allSatisfy { $0 == 0xAB })
        #expect(try device.read(count: 300, at: 100) == source)
        #expect(try device.read(count: 1, at: 65536 + (1 << 20)) == [0])
    }
}

@Suite("Sparse devices: storage given as blocks come into use")
struct SparseDeviceTests {
    /// A sparse device whose `fallocate` fails with ENOSPC while `full` is set (a full /dev/shm).
    final class FillingUp: @unchecked Sendable {
        final class Flags: Sendable {
            let full = Atomic(false)
            let backed = Atomic(0)
        }
        let flags = Flags()
        let temporary: TemporaryDevice

        init() throws {
            let flags = self.flags
            var options = PMemDevice.Options()
            options.sparse = true
            var calls = SystemCalls.injectable
            calls.fallocate = { fd, mode, offset, length in
                if flags.full.load(ordering: .relaxed) {
                    errno = ENOSPC
                    return -1
                }
                flags.backed.wrappingAdd(1, ordering: .relaxed)
                return SystemCalls.live.fallocate(fd, mode, offset, length)
            }
            options.systemCalls = calls
            temporary = try TemporaryDevice(size: 8 << 20, options: options, name: "sparse")
        }
    }

    @Test("a full /dev/shm is .noSpace at allocation and at commit; nothing changes, no SIGBUS")
    func fullBackingStoreIsNoSpace() throws {
        let t = try FillingUp()
        let device = t.temporary.device
        #expect(device.isSparse)
        let fs = try DAXFileSystem.format(device)
        let file = try fs.create("/f")
        try file.write(pattern(4096), at: 0)
        #expect(t.flags.backed.load(ordering: .relaxed) > 0)
        let before = fs.statistics()

        t.flags.full.store(true, ordering: .relaxed)
        let error = expectDAXError(.noSpace) { try file.write(pattern(64 << 10, seed: 2), at: 8192) }
        #expect(error?.message.contains("full") == true, "\(String(describing: error))")
        expectDAXError(.noSpace) { try file.allocate(offset: 1 << 20, count: 4096) }
        expectDAXError(.noSpace) { try fs.create("/g") }
        expectDAXError(.noSpace) { try fs.createDirectory("/d") }
        #expect(file.size == 4096)
        #expect(try file.read(count: 8192, at: 0) == pattern(4096))
        #expect(fs.statistics().freeBlocks == before.freeBlocks)
        #expect(try fs.contentsOfDirectory("/") == ["f"])
        #expect(try fs.check().isClean)

        t.flags.full.store(false, ordering: .relaxed)
        try file.write(pattern(64 << 10, seed: 2), at: 8192)
        #expect(try file.read(count: 64 << 10, at: 8192) == pattern(64 << 10, seed: 2))
        #expect(try fs.check().isClean)
        try fs.unmount()
    }

    @Test("a device created whole is not sparse and makes no fallocate calls")
    func wholeDeviceIsNotBacked() throws {
        let t = try TemporaryDevice(size: 4 << 20, name: "whole")
        #expect(!t.device.isSparse)
        try t.device.back(offset: 0, count: 4 << 20)  // a no-op
        expectDAXError(.invalidArgument) {
            var options = PMemDevice.Options()
            options.sparse = true
            let sparse = try TemporaryDevice(size: 4 << 20, options: options, name: "sparserange")
            try sparse.device.back(offset: 4 << 20, count: 1)
        }
    }
}

@Suite("Scale: memory and storage follow what is used, not the device's size")
struct ScaleTests {
    /// Bytes of storage the device file holds.
    static func storage(_ path: String) -> Int {
        var info = stat()
        return stat(path, &info) == 0 ? Int(info.st_blocks) * 512 : -1
    }

    /// Expects the device file to hold at most `bytes` of storage, where tmpfs gives storage a
    /// page at a time. Where `/dev/shm` has huge pages, each region holding data may take a whole
    /// huge page, so the bound is on those regions instead: at most one per page of `bytes`.
    static func expectStorage(
        _ path: String, atMost bytes: Int, _ what: String, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        let storage = storage(path)
        guard Residency.devShmGranule > Residency.pageSize else {
            #expect(storage <= bytes, "\(what) \(storage) bytes", sourceLocation: sourceLocation)
            return
        }
        let regions = Residency.dataRegions(path)
        #expect(
            storage <= regions * Residency.devShmGranule && regions <= bytes / Residency.pageSize,
            "\(what) \(storage) bytes in \(regions) huge pages", sourceLocation: sourceLocation)
    }

    @Test("a 1 TiB sparse device formats, mounts, checks and unmounts using a few MiB")
    func terabyteSparseDevice() throws {
        var options = PMemDevice.Options()
        options.sparse = true
        let t = try TemporaryDevice(size: 1 << 40, options: options, name: "tera")
        #expect(t.device.isSparse)
        let fs = try DAXFileSystem.format(t.device)
        Self.expectStorage(t.path, atMost: 1 << 20, "format stored")
        let file = try fs.create("/data")
        try file.write(pattern(3 << 20), at: 0)
        try fs.createDirectory("/dir")
        #expect(try fs.check().isClean)
        try fs.unmount()
        let report = try DAXFileSystem.check(t.device)
        #expect(report.isClean, "\(report)")
        let mounted = try DAXFileSystem.mount(t.device)
        #expect(try mounted.open("/data").read(count: 4 << 20, at: 0) == pattern(3 << 20))
        let statistics = mounted.statistics()
        #expect(statistics.totalBlocks - statistics.freeBlocks == 768 + 1, "the file's blocks and the root directory's")
        try mounted.unmount()
        Self.expectStorage(t.path, atMost: 8 << 20, "the device file stores")
        // The descriptor table is 4 GiB of address space; only what was touched is memory.
        #expect(t.device.pages.reservedTableBytes == (1 << 40) / 4096 * 16 + 4096, "and the zero frame's")
        // Counted in huge-page-sized regions touched, the same with transparent huge pages or
        // without: a handful of the table's 2048. With huge pages each costs 2 MiB at most.
        let regions = Residency.residentRegions(of: t.device.pages)
        #expect(regions > 0 && regions <= 8, "\(regions) regions of the table touched")
        #expect(t.device.pages.residentTableBytes <= regions * Residency.hugePageSize)
        #expect(t.device.pages.residentTableBytes < 64 << 20, "\(t.device.pages.residentTableBytes)")
    }

    @Test("a bitmap block never written is empty; one damaged byte in it is still found")
    func zeroBitmapBlocks() throws {
        let t = try TemporaryFileSystem(size: 64 << 20, name: "zerobitmap")
        let sb = t.fs.superblock
        try t.fs.unmount()
        // Format leaves bitmap blocks as zeros, checksum included: valid, every block free.
        #expect(try t.device.read(count: 4096, at: Int(sb.bitmapStart) * 4096).allSatisfy { $0 == 0 })
        #expect(try DAXFileSystem.check(t.device).isClean)
        try t.device.write([0x01], at: Int(sb.bitmapStart) * 4096 + 100)
        let report = try DAXFileSystem.check(t.device)
        #expect(report.problems.contains { $0.contains("bitmap block 0 checksum mismatch") }, "\(report)")
    }
}

@Suite("Sparse devices give storage back")
struct SparseStorageTests {
    @Test("what a removed or truncated file held goes back to /dev/shm; a pinned block keeps its bytes until unpinned")
    func freedBlocksAreGivenBack() throws {
        var options = PMemDevice.Options()
        options.sparse = true
        let t = try TemporaryDevice(size: 256 << 20, options: options, name: "giveback")
        let fs = try DAXFileSystem.format(t.device)
        let base = ScaleTests.storage(t.path)
        let big = try fs.create("/big")
        try big.write([UInt8](repeating: 7, count: 16 << 20), at: 0)
        #expect(ScaleTests.storage(t.path) >= base + (16 << 20))
        big.close()
        try fs.remove("/big")
        // Less than 1 MiB kept; where /dev/shm has huge pages, at most the one the rest shares.
        let kept = ScaleTests.storage(t.path) - base
        #expect(kept < max(1 << 20, Residency.devShmGranule + 1), "\(kept) bytes kept")

        // A pinned block freed by a truncate keeps its bytes for the NIC, and goes back at the unpin.
        let file = try fs.create("/pinned")
        try file.write([UInt8](repeating: 9, count: 8192), at: 0)
        let mapping = try file.map(count: 8192)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(try mapping.pin(offset: 0, count: 4096))
        let frame = region.frames[0]
        try file.truncate(to: 0, ifBusy: .deferFree)
        #expect(try nic.read(count: 4, from: region, at: 0) == [9, 9, 9, 9])
        let held = ScaleTests.storage(t.path)
        nic.deregister(region)
        #expect(ScaleTests.storage(t.path) == held - 4096)
        #expect(try t.device.read(count: 4, at: frame.deviceOffset) == [0, 0, 0, 0])
        mapping.unmap()
        #expect(try fs.check().isClean)
        try fs.unmount()
    }
}
