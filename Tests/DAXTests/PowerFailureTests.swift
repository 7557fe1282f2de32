import Foundation
import Testing

@testable import DAX

/// An emulated device of its own, and image paths next to it, all removed afterwards.
final class EmulatedDevice: @unchecked Sendable {
    let temporary: TemporaryDevice
    var device: PMemDevice { temporary.device }
    private var images: [String] = []

    init(size: Int = 4 << 20, domain: PersistenceDomain = .adr, persistence: PersistenceMode = .cacheFlush) throws {
        var options = PMemDevice.Options()
        options.persistence = persistence
        options.powerFailureEmulation = domain
        temporary = try TemporaryDevice(size: size, options: options, name: "emulated")
    }

    /// Writes an image with `keeping` and opens it.
    func image(_ keeping: InFlightLines = .none) throws -> PMemDevice {
        let path = temporary.path + "-image\(images.count)"
        images.append(path)
        try device.powerFail(writingImageTo: path, keeping: keeping)
        return try PMemDevice.open(path: path)
    }

    deinit { for path in images { unlink(path) } }
}

func store(_ value: UInt64, _ device: PMemDevice, at offset: Int) {
    device.baseAddress.storeBytes(of: value, toByteOffset: offset, as: UInt64.self)
}

func load(_ device: PMemDevice, at offset: Int) -> UInt64 {
    device.baseAddress.load(fromByteOffset: offset, as: UInt64.self)
}

@Suite("Power-failure emulation")
struct PowerFailureTests {
    @Test("a store never flushed is lost; flushed and fenced it survives; flushed alone it is in flight")
    func flushAndFence() throws {
        let t = try EmulatedDevice()
        let device = t.device
        store(0x1111, device, at: 8192)
        store(0x2222, device, at: 16384)
        device.persist(offset: 16384, count: 8)
        store(0x3333, device, at: 24576)
        device.flush(offset: 24576, count: 8)

        #expect(device.unpersistedRanges() == [8192..<8194, 24576..<24578])
        let none = try t.image(.none)
        #expect(load(none, at: 8192) == 0)
        #expect(load(none, at: 16384) == 0x2222)
        #expect(load(none, at: 24576) == 0)
        let all = try t.image(.all)
        #expect(load(all, at: 8192) == 0x1111)
        #expect(load(all, at: 24576) == 0x3333)

        device.drain()
        #expect(device.unpersistedRanges() == [8192..<8194])
        #expect(load(try t.image(.none), at: 24576) == 0x3333)
        none.close()
        all.close()
    }

    @Test("a store after a flush and before its fence stays in flight: the fence persists the flushed content")
    func storeBetweenFlushAndFence() throws {
        let t = try EmulatedDevice()
        let device = t.device
        store(1, device, at: 36864)
        device.flush(offset: 36864, count: 8)
        store(2, device, at: 36864)  // through the same page: it faults and saves the flushed line
        store(3, device, at: 36864 + 64)  // another line of the page, never flushed
        device.drain()
        #expect(load(try t.image(.none), at: 36864) == 1)
        #expect(load(try t.image(.none), at: 36864 + 64) == 0)
        #expect(load(try t.image(.all), at: 36864) == 2)
        #expect(device.unpersistedRanges() == [36864..<36865, (36864 + 64)..<(36864 + 65)])
        device.persist(offset: 36864, count: 128)
        #expect(device.unpersistedRanges().isEmpty)
        #expect(load(try t.image(.none), at: 36864) == 2)
    }

    @Test("a page found persistent is write-protected again: its next store is tracked")
    func reprotection() throws {
        let t = try EmulatedDevice()
        let device = t.device
        store(7, device, at: 4096)
        device.persist(offset: 4096, count: 8)
        #expect(device.unpersistedRanges().isEmpty)  // clean again, protected in every alias
        store(9, device, at: 4096 + 64)
        #expect(device.unpersistedRanges() == [(4096 + 64)..<(4096 + 65)])
        #expect(load(try t.image(), at: 4096 + 64) == 0)
        #expect(load(try t.image(), at: 4096) == 7)
    }

    @Test("copy and fill persist unless told not to; no-drain waits for the fence")
    func copyAndFill() throws {
        let t = try EmulatedDevice()
        let device = t.device
        try device.write([1, 2, 3, 4, 5, 6, 7, 8], at: 0)
        try device.write([9, 9, 9, 9, 9, 9, 9, 9], at: 64, flags: .noDrain)
        device.fill(offset: 128, count: 8, value: 5, flags: .noFlush)
        let before = try t.image()
        #expect(try before.read(count: 8, at: 0) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(try before.read(count: 8, at: 64) == [0, 0, 0, 0, 0, 0, 0, 0])
        #expect(try before.read(count: 8, at: 128) == [0, 0, 0, 0, 0, 0, 0, 0])
        device.drain()
        let after = try t.image()
        #expect(try after.read(count: 8, at: 64) == [9, 9, 9, 9, 9, 9, 9, 9])
        #expect(try after.read(count: 8, at: 128) == [0, 0, 0, 0, 0, 0, 0, 0])
        #expect(device.unpersistedRanges() == [128..<136])
    }

    @Test("pages punched out of a mapping and mapped again, and a mapping made anew, stay tracked")
    func remappedPagesStayTracked() throws {
        let t = try EmulatedDevice(size: 8 << 20)
        let fs = try DAXFileSystem.format(t.device)
        defer { try? fs.unmount() }
        let file = try fs.create("/data")
        try file.allocate(offset: 0, count: 2 * PMemDevice.pageSize)
        let mapping = try file.map(count: 2 * PMemDevice.pageSize)
        try file.punchHole(offset: 4096, count: 4096)  // zapped out of the mapping
        try file.write([1], at: 4096)  // a new block, shown in the mapping again
        let frame = try #require(try file.frames(offset: 4096, count: 4096).first ?? nil)
        #expect(t.device.unpersistedRanges().isEmpty)
        mapping.baseAddress.storeBytes(of: 0x77 as UInt8, toByteOffset: 4096 + 200, as: UInt8.self)
        #expect(t.device.unpersistedRanges() == [(frame.deviceOffset + 200)..<(frame.deviceOffset + 201)])
        mapping.persist(offset: 4096 + 200, count: 1)
        mapping.unmap()

        let again = try file.map(count: 2 * PMemDevice.pageSize)
        defer { again.unmap() }
        again.baseAddress.storeBytes(of: 0x78 as UInt8, toByteOffset: 4096 + 300, as: UInt8.self)
        #expect(t.device.unpersistedRanges() == [(frame.deviceOffset + 300)..<(frame.deviceOffset + 301)])
        #expect(try t.image(.all).read(count: 1, at: frame.deviceOffset + 300) == [0x78])
        #expect(try t.image(.none).read(count: 1, at: frame.deviceOffset + 200) == [0x77])
    }

    @Test("a closed device writes no image")
    func closedDevice() throws {
        let t = try EmulatedDevice()
        t.device.close()
        let path = TemporaryDevice.uniquePath("closed")
        expectDAXError(.invalidArgument) { try t.device.powerFail(writingImageTo: path) }
        #expect(access(path, F_OK) != 0)
        #expect(t.device.unpersistedRanges().isEmpty)
    }

    @Test("msync persists its range under emulation, in either persistence mode")
    func msyncPersists() throws {
        for mode in [PersistenceMode.cacheFlush, .msync] {
            let t = try EmulatedDevice(persistence: mode)
            store(0x5151, t.device, at: 20480)
            store(0x5252, t.device, at: 28672)
            try t.device.msync(offset: 20480, count: 8)
            t.device.flush(offset: 28672, count: 8)  // in .msync mode a flush waits, so persists
            let image = try t.image()
            #expect(load(image, at: 20480) == 0x5151)
            #expect(load(image, at: 28672) == (mode == .msync ? 0x5252 : 0))
        }
    }

    @Test("under eADR every store survives and nothing is ever unpersisted")
    func eadr() throws {
        let t = try EmulatedDevice(domain: .eadr)
        store(0xEAD, t.device, at: 12288)
        #expect(t.device.unpersistedRanges().isEmpty)
        #expect(load(try t.image(.none), at: 12288) == 0xEAD)
    }

    @Test("a random image keeps each 8-byte word either persisted or as stored, and the seed replays it")
    func randomImagesAreMadeOfWholeWords() throws {
        let t = try EmulatedDevice()
        let device = t.device
        for line in 0..<64 {
            for word in 0..<8 { store(UInt64(line * 8 + word + 1), device, at: 65536 + line * 64 + word * 8) }
        }
        var kept = 0
        for seed in UInt64(1)...4 {
            let image = try t.image(.random(seed: seed))
            let again = try t.image(.random(seed: seed))
            for word in 0..<512 {
                let value = load(image, at: 65536 + word * 8)
                #expect(value == 0 || value == UInt64(word + 1))
                #expect(value == load(again, at: 65536 + word * 8))
                if value != 0 { kept += 1 }
            }
        }
        #expect(kept > 0 && kept < 4 * 512)  // some kept, some lost
    }

    @Test("bad requests: an existing path, no emulation; nothing is written")
    func errors() throws {
        let t = try EmulatedDevice()
        let existing = TemporaryDevice.uniquePath("exists")
        _ = FileManager.default.createFile(atPath: existing, contents: Data([42]))
        defer { unlink(existing) }
        expectDAXError(.alreadyExists) { try t.device.powerFail(writingImageTo: existing) }
        #expect(FileManager.default.contents(atPath: existing) == Data([42]))

        let plain = try TemporaryDevice(size: 2 << 20, name: "plain")
        let target = TemporaryDevice.uniquePath("never")
        expectDAXError(.unsupported) { try plain.device.powerFail(writingImageTo: target) }
        #expect(!FileManager.default.fileExists(atPath: target))
        store(1, plain.device, at: 0)
        #expect(plain.device.unpersistedRanges().isEmpty)
        #expect(plain.device.powerFailureEmulation == nil)
    }

    @Test("opening a device with data: the media copy starts with it")
    func openedDevice() throws {
        let path = TemporaryDevice.uniquePath("reopen")
        defer { unlink(path) }
        let first = try PMemDevice.create(path: path, size: 2 << 20)
        try first.write([7, 7, 7], at: 40960)
        first.close()
        var options = PMemDevice.Options()
        options.powerFailureEmulation = .adr
        options.persistence = .cacheFlush
        let device = try PMemDevice.open(path: path, options: options)
        defer { device.close() }
        store(5, device, at: 0)
        let image = path + "-image"
        defer { unlink(image) }
        try device.powerFail(writingImageTo: image)
        let opened = try PMemDevice.open(path: image)
        #expect(try opened.read(count: 3, at: 40960) == [7, 7, 7])
        #expect(load(opened, at: 0) == 0)
    }

    @Test("stores through a DAX file mapping and DMA writes go through the emulation")
    func mappingsAndDMA() throws {
        let t = try EmulatedDevice(size: 8 << 20)
        let fs = try DAXFileSystem.format(t.device)
        defer { try? fs.unmount() }
        let file = try fs.create("/data")
        try file.allocate(offset: 0, count: 2 * PMemDevice.pageSize)
        let frame = try #require(try file.frames(offset: 0, count: 4096).first ?? nil)
        let mapping = try file.map(count: 2 * PMemDevice.pageSize)
        #expect(t.device.unpersistedRanges().isEmpty)

        mapping.baseAddress.storeBytes(of: 0xABCD as UInt64, toByteOffset: 16, as: UInt64.self)
        #expect(t.device.unpersistedRanges() == [(frame.deviceOffset + 16)..<(frame.deviceOffset + 18)])
        #expect(load(try t.image(), at: frame.deviceOffset + 16) == 0)
        mapping.persist(offset: 16, count: 8)
        #expect(t.device.unpersistedRanges().isEmpty)
        #expect(load(try t.image(), at: frame.deviceOffset + 16) == 0xABCD)
        // Clean again: the next store through the mapping faults and is seen.
        mapping.baseAddress.storeBytes(of: 1 as UInt64, toByteOffset: 32, as: UInt64.self)
        #expect(t.device.unpersistedRanges() == [(frame.deviceOffset + 32)..<(frame.deviceOffset + 33)])
        mapping.persist(offset: 32, count: 8)

        let nic = DMAEngine(device: t.device)
        let region = nic.register(try mapping.pin(offset: 4096, count: 4096))
        try nic.write([1, 2, 3], to: region, at: 100)
        nic.deregister(region)
        let second = try #require(try file.frames(offset: 4096, count: 4096).first ?? nil)
        #expect(try t.image().read(count: 3, at: second.deviceOffset + 100) == [1, 2, 3])
        #expect(t.device.unpersistedRanges().isEmpty)
        mapping.unmap()
    }
}

extension PowerFailureTests {
    @Test("threads storing and persisting at once: every persisted store is in the image, none is lost")
    func concurrentStores() throws {
        let t = try EmulatedDevice(size: 4 << 20)
        let device = t.device
        let rounds = 200
        onThreads(4) { thread in
            for round in 0..<rounds {
                // Each thread its own lines, on pages the others use too.
                let offset = 8192 + (round % 16) * 4096 + thread * 64
                store(UInt64(round + 1), device, at: offset)
                if round % 3 != 2 { device.persist(offset: offset, count: 8) }
                _ = device.unpersistedRanges()
            }
        }
        let image = try t.image()
        var unpersisted = 0
        for thread in 0..<4 {
            for slot in 0..<16 {
                let offset = 8192 + slot * 4096 + thread * 64
                let rounds = (0..<rounds).filter { $0 % 16 == slot }
                let last = rounds.last!
                let persistedRound: Int? = rounds.last { $0 % 3 != 2 }
                let persisted = persistedRound.map { UInt64($0 + 1) } ?? 0
                #expect(load(device, at: offset) == UInt64(last + 1))
                #expect(load(image, at: offset) == persisted)
                if last % 3 == 2 { unpersisted += 1 }
            }
        }
        #expect(device.unpersistedRanges().count == unpersisted)
    }
}
