// Black-box tests of crash emulation, written only from the public contract (power-failure
// emulation, crash images, the explorer, and the persistence primitives) and its invariants (an
// image never holds less than was persisted nor anything stored after the crash point; bad input
// gets a clear DAXError and changes nothing). Only the public API is used: `import DAX`.
//
// Findings, as of this suite's commit:
// - Every crash-emulation test here passes.
// - The copy-on-write test of a clone is kept below as a comment: this version refuses clone.
// - Things the contract leaves open, with the answers accepted: `unpersistedRanges()` is byte
//   exact (a word store of 1 over 0 is listed as one byte), which the tests allow for by storing
//   bytes that all differ from the media; devices under 2 MiB are refused with .invalidArgument;
//   emulating a read-only device is refused with .invalidArgument.

import DAX
import Foundation
import Synchronization
import Testing

// MARK: - Helpers (public API only)

private let lineSize = 64
private let pageSize = PMemDevice.pageSize

private func uniqueShmPath(_ name: String) -> String {
    "/dev/shm/daxbb-crash-\(getpid())-\(name)-\(UUID().uuidString.prefix(8))"
}

/// Options of an emulated device. `.cacheFlush` so that `drain` is a real fence (in `.msync`
/// mode `drain` is documented as a no-op and `flush` as an msync).
private func emulatedOptions(_ domain: PersistenceDomain = .adr) -> PMemDevice.Options {
    var options = PMemDevice.Options()
    options.persistence = .cacheFlush
    options.powerFailureEmulation = domain
    return options
}

/// Creates an emulated device under /dev/shm, runs `body`, then closes and removes it.
private func withDevice<T>(
    size: Int = 4 << 20, options: PMemDevice.Options = emulatedOptions(), name: String = "dev",
    _ body: (PMemDevice) throws -> T
) throws -> T {
    let path = uniqueShmPath(name)
    let device = try PMemDevice.create(path: path, size: size, options: options)
    defer {
        device.close()
        unlink(path)
    }
    return try body(device)
}

/// Writes a power-failure image of `device`, reads all of it back through `PMemDevice.open`,
/// and removes the image file.
private func image(of device: PMemDevice, keeping: InFlightLines) throws -> [UInt8] {
    let path = uniqueShmPath("img")
    defer { unlink(path) }
    try device.powerFail(writingImageTo: path, keeping: keeping)
    let opened = try PMemDevice.open(path: path)
    defer { opened.close() }
    #expect(opened.size == device.size)
    return try opened.read(count: opened.size, at: 0)
}

/// A plain CPU store (no flush, no fence) through the device's own mapping.
private func store(_ bytes: [UInt8], to device: PMemDevice, at offset: Int) {
    bytes.withUnsafeBytes { source in
        (device.baseAddress + offset).copyMemory(from: source.baseAddress!, byteCount: source.count)
    }
}

private func storeWord(_ value: UInt64, to device: PMemDevice, at offset: Int) {
    device.baseAddress.storeBytes(of: value, toByteOffset: offset, as: UInt64.self)
}

private func word(_ bytes: [UInt8], at offset: Int) -> UInt64 {
    bytes[offset..<offset + 8].withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
}

private func bytes(_ value: UInt8, _ count: Int) -> [UInt8] { [UInt8](repeating: value, count: count) }

/// A deterministic byte pattern (named apart from Support.swift's `pattern`).
private func bbPattern(_ count: Int, seed: Int = 1) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: ($0 &* 131) &+ ($0 >> 8) &+ seed &* 17) }
}

/// The 64-byte lines a range touches, as a range of byte offsets rounded out to lines.
private func lineRange(_ range: Range<Int>) -> Range<Int> {
    (range.lowerBound / lineSize * lineSize)..<((range.upperBound + lineSize - 1) / lineSize * lineSize)
}

/// True when every byte of `range` lies in one of `ranges`.
private func covered(_ range: Range<Int>, by ranges: [Range<Int>]) -> Bool {
    range.allSatisfy { offset in ranges.contains { $0.contains(offset) } }
}

/// True when every byte of every range in `ranges` lies in one of `allowed`.
private func contained(_ ranges: [Range<Int>], in allowed: [Range<Int>]) -> Bool {
    ranges.allSatisfy { covered($0, by: allowed) }
}

private func expectDAXCode<T>(
    _ code: DAXError.Code, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> T
) {
    do {
        _ = try body()
        Issue.record("expected DAXError \(code), nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as DAXError {
        #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
        #expect(!error.message.isEmpty, sourceLocation: sourceLocation)
    } catch {
        Issue.record("expected DAXError \(code), got \(error)", sourceLocation: sourceLocation)
    }
}

/// What a checker throws; its description must come back in `CrashFailure.error`.
private struct CheckerError: Error, CustomStringConvertible {
    var description: String
}

// MARK: - powerFail and the persistence domain

@Suite("BlackBoxCrash: power-failure images")
struct BlackBoxCrashImageTests {
    @Test("a persisted store survives keeping .none; an unflushed one does not; .all keeps both")
    func persistedVersusUnflushed() throws {
        try withDevice { device throws in
            let persisted = bytes(0xA5, 64)
            let unflushed = bytes(0x5A, 64)
            store(persisted, to: device, at: 0)
            device.persist(offset: 0, count: 64)
            store(unflushed, to: device, at: 8192)

            let none = try image(of: device, keeping: .none)
            #expect(Array(none[0..<64]) == persisted)
            #expect(Array(none[8192..<8256]) == bytes(0, 64))

            let all = try image(of: device, keeping: .all)
            #expect(Array(all[0..<64]) == persisted)
            #expect(Array(all[8192..<8256]) == unflushed)

            // The device goes on running and the CPU still sees both stores.
            #expect(try device.read(count: 64, at: 8192) == unflushed)
            #expect(try device.read(count: 64, at: 0) == persisted)
        }
    }

    @Test("flush without drain is in flight: in .all, not in .none; after drain in both")
    func flushWithoutDrain() throws {
        try withDevice { device throws in
            let data = bytes(0x3C, 128)
            store(data, to: device, at: 4096)
            device.flush(offset: 4096, count: 128)

            #expect(try Array(image(of: device, keeping: .none)[4096..<4224]) == bytes(0, 128))
            #expect(try Array(image(of: device, keeping: .all)[4096..<4224]) == data)
            #expect(covered(4096..<4224, by: device.unpersistedRanges()))

            device.drain()
            #expect(try Array(image(of: device, keeping: .none)[4096..<4224]) == data)
            #expect(device.unpersistedRanges().isEmpty)
        }
    }

    @Test("under .eadr every store survives, even with no flush at all")
    func eadrKeepsEveryStore() throws {
        try withDevice(options: emulatedOptions(.eadr)) { device throws in
            let data = bytes(0x77, 200)
            store(data, to: device, at: 12_345)
            storeWord(0x0102_0304_0506_0708, to: device, at: 65_536)

            let none = try image(of: device, keeping: .none)
            #expect(Array(none[12_345..<12_545]) == data)
            #expect(word(none, at: 65_536) == 0x0102_0304_0506_0708)
            // Under eADR every store is persistent, so nothing is unpersisted.
            #expect(device.unpersistedRanges().isEmpty)
        }
    }

    @Test("a .random(seed:) image is reproducible and holds, per 8-byte word, the persisted or the stored value")
    func randomImagesAreWordAtomicAndReproducible() throws {
        try withDevice { device throws in
            let base = 16_384
            let words = 64 * 8  // 64 lines of 8 words
            // Every byte of the old and new values differs, so a torn word shows.
            func old(_ i: Int) -> UInt64 { 0x1111_1111_1111_1111 &* UInt64(i % 7 + 1) }
            func new(_ i: Int) -> UInt64 { 0x8080_8080_8080_8080 | UInt64(i) &* 0x0001_0203_0405_0607 }
            for i in 0..<words { storeWord(old(i), to: device, at: base + i * 8) }
            device.persist(offset: base, count: words * 8)
            // A persisted region never stored again: every image must hold it.
            store(bytes(0x6B, 512), to: device, at: 1024)
            device.persist(offset: 1024, count: 512)
            for i in 0..<words { storeWord(new(i), to: device, at: base + i * 8) }
            // Half of the lines flushed (in flight too), half not flushed at all.
            device.flush(offset: base, count: words * 8 / 2)

            var sawOld = false
            var sawNew = false
            var distinct = Set<[UInt8]>()
            for seed: UInt64 in [0, 1, 2, 42, .max] {
                let first = try image(of: device, keeping: .random(seed: seed))
                let second = try image(of: device, keeping: .random(seed: seed))
                #expect(first == second, "seed \(seed) gave two different images")
                distinct.insert(Array(first[base..<base + words * 8]))
                for i in 0..<words {
                    let value = word(first, at: base + i * 8)
                    #expect(value == old(i) || value == new(i), "seed \(seed), word \(i): \(String(value, radix: 16))")
                    if value == old(i) { sawOld = true }
                    if value == new(i) { sawNew = true }
                }
                // Nothing outside the stored range appears.
                #expect(Array(first[1024..<1536]) == bytes(0x6B, 512), "seed \(seed) lost persisted bytes")
                #expect(first[0..<1024].allSatisfy { $0 == 0 } && first[1536..<base].allSatisfy { $0 == 0 })
                #expect(first[(base + words * 8)...].allSatisfy { $0 == 0 })
            }
            // A seeded *subset* of 512 in-flight words over 5 seeds: expect both outcomes seen.
            #expect(sawOld && sawNew, "random images kept all or nothing: old \(sawOld) new \(sawNew)")
            // 64 lines in flight: five seeds choosing the same subset would not be seeded at all.
            #expect(distinct.count > 1, "five seeds gave \(distinct.count) distinct image(s)")
        }
    }

    @Test("stores after powerFail returns never reach the image already written")
    func storesAfterPowerFailDoNotReachImage() throws {
        try withDevice { device throws in
            let path = uniqueShmPath("img")
            defer { unlink(path) }
            storeWord(0xAAAA_AAAA_AAAA_AAAA, to: device, at: 0)
            try device.powerFail(writingImageTo: path, keeping: .all)

            // After the crash point: an overwrite, a new store, both persisted.
            storeWord(0xBBBB_BBBB_BBBB_BBBB, to: device, at: 0)
            storeWord(0xCCCC_CCCC_CCCC_CCCC, to: device, at: 8192)
            device.persist(offset: 0, count: 8)
            device.persist(offset: 8192, count: 8)

            let opened = try PMemDevice.open(path: path)
            defer { opened.close() }
            let image = try opened.read(count: opened.size, at: 0)
            #expect(word(image, at: 0) == 0xAAAA_AAAA_AAAA_AAAA)
            #expect(word(image, at: 8192) == 0)
            #expect(image[8...].allSatisfy { $0 == 0 })
            // The device itself holds the newer values.
            #expect(try device.read(count: 8, at: 8192) == bytes(0xCC, 8))
        }
    }

    @Test("powerFail to an existing path is .alreadyExists and leaves that file unchanged")
    func powerFailToExistingPath() throws {
        try withDevice { device throws in
            let path = uniqueShmPath("existing")
            defer { unlink(path) }
            let original = Data("not a device image, keep me".utf8)
            #expect(FileManager.default.createFile(atPath: path, contents: original))
            storeWord(42, to: device, at: 0)
            device.persist(offset: 0, count: 8)

            expectDAXCode(.alreadyExists) { try device.powerFail(writingImageTo: path, keeping: .all) }
            #expect(FileManager.default.contents(atPath: path) == original)
        }
    }

    @Test("powerFail without emulation is .unsupported and creates nothing")
    func powerFailWithoutEmulation() throws {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        try withDevice(options: options) { device throws in
            let path = uniqueShmPath("img")
            defer { unlink(path) }
            expectDAXCode(.unsupported) { try device.powerFail(writingImageTo: path) }
            #expect(!FileManager.default.fileExists(atPath: path))
        }
    }

    @Test("powerFail into a missing directory is a DAXError and creates nothing")
    func powerFailIntoMissingDirectory() throws {
        try withDevice { device throws in
            let path = "/dev/shm/daxbb-no-such-dir-\(UUID().uuidString)/image"
            do {
                try device.powerFail(writingImageTo: path)
                Issue.record("powerFail into a missing directory did not throw")
            } catch let error as DAXError {
                #expect(!error.message.isEmpty)
            }
            #expect(!FileManager.default.fileExists(atPath: path))
        }
    }

    @Test("the image opens with PMemDevice.open and has the device's size")
    func imageOpensWithDeviceSize() throws {
        try withDevice(size: 3 << 20) { device throws in
            let path = uniqueShmPath("img")
            defer { unlink(path) }
            store(Array("hello".utf8), to: device, at: 100)
            device.persist(offset: 100, count: 5)
            try device.powerFail(writingImageTo: path, keeping: .none)
            let attributes = try FileManager.default.attributesOfItem(atPath: path)
            #expect((attributes[.size] as? NSNumber)?.intValue == 3 << 20)
            let opened = try PMemDevice.open(path: path)
            defer { opened.close() }
            #expect(opened.size == 3 << 20)
            #expect(opened.pageCount == (3 << 20) / pageSize)
            #expect(try opened.read(count: 5, at: 100) == Array("hello".utf8))
        }
    }

    @Test("powerFail(.all) does not persist the in-flight lines: the device's media copy is unchanged")
    func powerFailAllChangesNothing() throws {
        try withDevice { device throws in
            storeWord(0x1234_5678_9ABC_DEF0, to: device, at: 4096)
            let before = device.unpersistedRanges()
            #expect(covered(4096..<4104, by: before))
            #expect(word(try image(of: device, keeping: .all), at: 4096) == 0x1234_5678_9ABC_DEF0)
            // The store is still in flight, not persisted by making an image.
            #expect(device.unpersistedRanges() == before)
            #expect(word(try image(of: device, keeping: .none), at: 4096) == 0)
        }
    }

    @Test("a store after flush and before the fence: the image holds one whole value, and .all the newest")
    func storeBetweenFlushAndFence() throws {
        try withDevice { device throws in
            let first: UInt64 = 0x0F0F_0F0F_0F0F_0F0F
            let second: UInt64 = 0xF0F0_F0F0_F0F0_F0F0
            storeWord(first, to: device, at: 8192)
            device.flush(offset: 8192, count: 8)
            storeWord(second, to: device, at: 8192)
            device.drain()
            let none = word(try image(of: device, keeping: .none), at: 8192)
            // Real hardware may persist either; never a torn word, never nothing (it was flushed).
            #expect(none == first || none == second, "\(String(none, radix: 16))")
            if none == first {
                // Then the newer store is still unpersisted and must be listed.
                #expect(covered(8192..<8200, by: device.unpersistedRanges()))
            }
            #expect(word(try image(of: device, keeping: .all), at: 8192) == second)
        }
    }

    @Test("an existing device file opened with emulation: its contents count as persisted")
    func openedDeviceContentsArePersisted() throws {
        let path = uniqueShmPath("plain")
        defer { unlink(path) }
        var plainOptions = PMemDevice.Options()
        plainOptions.persistence = .cacheFlush
        let plain = try PMemDevice.create(path: path, size: 4 << 20, options: plainOptions)
        try plain.write(bytes(0x5E, 5000), at: 3000)
        plain.persist(offset: 3000, count: 5000)
        plain.close()

        let device = try PMemDevice.open(path: path, options: emulatedOptions())
        defer { device.close() }
        #expect(device.unpersistedRanges().isEmpty, "\(device.unpersistedRanges())")
        let none = try image(of: device, keeping: .none)
        #expect(Array(none[3000..<8000]) == bytes(0x5E, 5000))
        #expect(none[0..<3000].allSatisfy { $0 == 0 } && none[8000...].allSatisfy { $0 == 0 })
    }

    @Test("under .eadr a .random image equals what the CPU sees")
    func eadrRandomImage() throws {
        try withDevice(options: emulatedOptions(.eadr)) { device throws in
            store(bytes(0x21, 300), to: device, at: 700)
            device.flush(offset: 700, count: 100)
            let seen = try device.read(count: device.size, at: 0)
            #expect(try image(of: device, keeping: .random(seed: 11)) == seen)
            #expect(try image(of: device, keeping: .none) == seen)
        }
    }

    @Test("with nothing in flight a .random image equals the .none image")
    func randomWithNothingInFlight() throws {
        try withDevice { device throws in
            store(bytes(0x12, 1000), to: device, at: 5000)
            device.persist(offset: 5000, count: 1000)
            let none = try image(of: device, keeping: .none)
            #expect(Array(none[5000..<6000]) == bytes(0x12, 1000))
            #expect(try image(of: device, keeping: .random(seed: 99)) == none)
            #expect(try image(of: device, keeping: .all) == none)
        }
    }

    @Test("a sparse emulated device: the image has the full size and the stored bytes")
    func sparseDeviceImage() throws {
        var options = emulatedOptions()
        options.sparse = true
        try withDevice(size: 64 << 20, options: options, name: "sparse") { device throws in
            storeWord(0xFEED_FACE_CAFE_BEEF, to: device, at: (64 << 20) - 8)
            device.persist(offset: (64 << 20) - 8, count: 8)
            let path = uniqueShmPath("img")
            defer { unlink(path) }
            try device.powerFail(writingImageTo: path)
            let opened = try PMemDevice.open(path: path)
            defer { opened.close() }
            #expect(opened.size == 64 << 20)
            #expect(
                try opened.read(count: 8, at: (64 << 20) - 8)
                    == withUnsafeBytes(of: UInt64(0xFEED_FACE_CAFE_BEEF)) { Array($0) })
        }
    }

    @Test("powerFail to an existing directory is .alreadyExists and leaves it as it was")
    func powerFailToExistingDirectory() throws {
        try withDevice { device throws in
            let path = uniqueShmPath("dir")
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
            defer { try? FileManager.default.removeItem(atPath: path) }
            expectDAXCode(.alreadyExists) { try device.powerFail(writingImageTo: path) }
            #expect(try FileManager.default.contentsOfDirectory(atPath: path).isEmpty)
        }
    }

    @Test("powerFail to an empty path is a DAXError")
    func powerFailEmptyPath() throws {
        try withDevice { device throws in
            do {
                try device.powerFail(writingImageTo: "")
                Issue.record("powerFail to an empty path did not throw")
            } catch let error as DAXError {
                #expect(!error.message.isEmpty)
            }
        }
    }

    @Test("images of a live file system (no unmount) mount and check clean, keeping none, all or a subset")
    func liveFileSystemImagesAreClean() throws {
        try withDevice(size: 8 << 20, name: "livefs") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            try fs.createDirectory("/d")
            let file = try fs.create("/d/f")
            try file.write(bytes(0x71, 9000), at: 0)
            try fs.rename("/d/f", to: "/g")
            file.close()
            for keeping in [InFlightLines.none, .all, .random(seed: 1), .random(seed: 2)] {
                let path = uniqueShmPath("fsimg")
                defer { unlink(path) }
                try device.powerFail(writingImageTo: path, keeping: keeping)
                let opened = try PMemDevice.open(path: path)
                defer { opened.close() }
                let mounted = try DAXFileSystem.mount(opened)
                let report = try mounted.check()
                #expect(report.isClean, "\(keeping): \(report.problems)")
                #expect(try mounted.contentsOfDirectory("/") == ["d", "g"], "\(keeping)")
                try mounted.unmount()
            }
        }
    }

    // A black-box test cannot bound from above what another thread stored between reading its
    // progress and powerFail's entry (a first version of this test used `began + 1` and failed
    // spuriously: the thread ran on while the image path was being made). So the bounds are the
    // sound ones: from below, everything the thread persisted before the call (an image never
    // holds less than was persisted); from above, nothing it stored after the call returned.
    @Test(
        "a thread storing and persisting while powerFail runs: each image is between what was persisted before and stored after"
    )
    func concurrentStoresDuringPowerFail() throws {
        final class Shared: Sendable {
            let published = Atomic<Int>(0)
            let stop = Atomic<Bool>(false)
        }
        @Sendable func value(_ i: Int) -> UInt64 { UInt64(UInt32(i)) << 32 | UInt64(UInt32(i)) }  // a torn word shows
        try withDevice { device throws in
            let shared = Shared()
            let address = UInt(bitPattern: device.baseAddress)
            let base = 5 * pageSize
            let group = DispatchGroup()
            group.enter()
            Thread.detachNewThread {
                let pointer = UnsafeMutableRawPointer(bitPattern: address)!
                var i = 0
                while !shared.stop.load(ordering: .acquiring) {
                    i += 1
                    for w in 0..<64 { pointer.storeBytes(of: value(i), toByteOffset: base + w * 8, as: UInt64.self) }
                    device.persist(offset: base, count: 64 * 8)
                    shared.published.store(i, ordering: .releasing)
                }
                group.leave()
            }
            defer {
                shared.stop.store(true, ordering: .releasing)
                group.wait()
            }
            while shared.published.load(ordering: .acquiring) < 50 {}
            for round in 0..<6 {
                let path = uniqueShmPath("img")
                defer { unlink(path) }
                let keeping: InFlightLines = round % 2 == 0 ? .none : .all
                let persistedBefore = shared.published.load(ordering: .acquiring)
                try device.powerFail(writingImageTo: path, keeping: keeping)
                let storedByReturn = shared.published.load(ordering: .acquiring) + 1
                let opened = try PMemDevice.open(path: path)
                defer { opened.close() }
                let img = try opened.read(count: 64 * 8, at: base)
                for w in 0..<64 {
                    let found = word(img, at: w * 8)
                    let i = Int(found & 0xFFFF_FFFF)
                    #expect(found == value(i), "round \(round), word \(w): torn \(String(found, radix: 16))")
                    #expect(
                        i >= persistedBefore,
                        "round \(round) \(keeping), word \(w): iteration \(i) < persisted \(persistedBefore)")
                    #expect(
                        i <= storedByReturn,
                        "round \(round), word \(w): iteration \(i) > \(storedByReturn) stored by return")
                }
            }
        }
    }

    @Test("in .msync mode (and the default mode) flush is an msync: flush + drain, and persist, reach the media")
    func msyncModePersists() throws {
        for mode in [PersistenceMode.msync, .automatic] {
            var options = PMemDevice.Options()
            options.persistence = mode
            options.powerFailureEmulation = .adr
            try withDevice(options: options, name: "msync") { device throws in
                let data = bytes(0x4D, 100)
                store(data, to: device, at: 4096)
                device.flush(offset: 4096, count: 100)
                device.drain()
                store(data, to: device, at: 8192)
                device.persist(offset: 8192, count: 100)
                store(data, to: device, at: 12_288)  // never flushed
                let none = try image(of: device, keeping: .none)
                #expect(Array(none[4096..<4196]) == data, "\(mode) (\(device.persistence)): flush + drain lost")
                #expect(Array(none[8192..<8292]) == data, "\(mode) (\(device.persistence)): persist lost")
                #expect(Array(none[12_288..<12_388]) == bytes(0, 100), "\(mode): an unflushed store survived")
                let ranges = device.unpersistedRanges()
                #expect(
                    covered(12_288..<12_388, by: ranges) && contained(ranges, in: [lineRange(12_288..<12_388)]),
                    "\(mode): \(ranges)")
            }
        }
    }

    @Test("a read-only emulated device: every store path is .permissionDenied and nothing is in flight")
    func readOnlyEmulatedDevice() throws {
        let path = uniqueShmPath("ro")
        defer { unlink(path) }
        let writer = try PMemDevice.create(path: path, size: 4 << 20, options: emulatedOptions())
        try writer.write(bytes(0x2A, 64), at: 0)
        writer.close()
        var options = emulatedOptions()
        options.readOnly = true
        // The contract does not say whether emulation of a read-only device is allowed; a clear
        // refusal (this library: .invalidArgument, "nothing is stored") is accepted as well.
        let device: PMemDevice
        do {
            device = try PMemDevice.open(path: path, options: options)
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument || error.code == .unsupported, "\(error)")
            #expect(error.message.contains(path), "\(error)")
            return
        }
        defer { device.close() }
        expectDAXCode(.permissionDenied) { try device.write(bytes(1, 8), at: 4096) }
        #expect(device.unpersistedRanges().isEmpty)
        let none = try image(of: device, keeping: .none)
        #expect(Array(none[0..<64]) == bytes(0x2A, 64))
        #expect(none[64...].allSatisfy { $0 == 0 })
    }
}

// MARK: - unpersistedRanges

@Suite("BlackBoxCrash: unpersisted ranges")
struct BlackBoxCrashUnpersistedTests {
    // Granularity accepted: every stored, unpersisted byte must be covered, and every listed
    // byte must lie in a 64-byte cache line that holds such a byte (cache-line granularity).
    // Stored bytes are chosen to differ, every one, from what is on the media: a byte stored
    // with the value the media already holds is not something a failure could lose, so a
    // byte-exact answer may leave it out (this library's answer is byte-exact: a word store of
    // 1 over 0 is listed as its first byte only).

    @Test("lists exactly the stored, unpersisted ranges (to the cache line) and is empty after persist")
    func listsUnpersistedRanges() throws {
        try withDevice { device throws in
            #expect(device.unpersistedRanges().isEmpty)
            let first = 100..<108
            let second = (8192 + 64 * 3)..<(8192 + 64 * 3 + 100)  // spans two lines
            let third = 65_536 + 4090..<65_536 + 4100  // crosses a page boundary
            for range in [first, second, third] {
                store(bytes(0xEE, range.count), to: device, at: range.lowerBound)
            }
            var ranges = device.unpersistedRanges()
            for range in [first, second, third] {
                #expect(covered(range, by: ranges), "\(range) not in \(ranges)")
            }
            #expect(contained(ranges, in: [first, second, third].map(lineRange)), "\(ranges) lists more")

            device.persist(offset: second.lowerBound, count: second.count)
            ranges = device.unpersistedRanges()
            #expect(covered(first, by: ranges) && covered(third, by: ranges), "\(ranges)")
            #expect(contained(ranges, in: [first, third].map(lineRange)), "\(ranges) lists more")

            device.persist(offset: first.lowerBound, count: first.count)
            device.persist(offset: third.lowerBound, count: third.count)
            #expect(device.unpersistedRanges().isEmpty, "\(device.unpersistedRanges())")
        }
    }

    @Test("a flushed but not fenced line is still unpersisted")
    func flushedNotFenced() throws {
        try withDevice { device throws in
            store(bytes(0x11, 64), to: device, at: 640)
            device.flush(offset: 640, count: 64)
            let ranges = device.unpersistedRanges()
            #expect(covered(640..<704, by: ranges) && contained(ranges, in: [640..<704]), "\(ranges)")
            device.drain()
            #expect(device.unpersistedRanges().isEmpty)
        }
    }

    @Test("empty when emulation is off, whatever was stored")
    func emptyWithoutEmulation() throws {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        try withDevice(options: options) { device throws in
            store(bytes(0x99, 4096), to: device, at: 0)
            #expect(device.unpersistedRanges().isEmpty)
        }
    }

    @Test("copy and fill follow their flags: [] persists, .noDrain waits for a fence, .noFlush for a flush")
    func copyAndFillFlags() throws {
        try withDevice { device throws in
            let a = bytes(0xA1, 64)
            let b = bytes(0xB2, 64)
            let c = bytes(0xC3, 64)
            // The fully persistent calls first: their fence would also move earlier flushed lines.
            a.withUnsafeBytes { device.copy($0, toOffset: 0) }
            device.fill(offset: 12_288, count: 64, value: 0xD4)
            b.withUnsafeBytes { device.copy($0, toOffset: 4096, flags: .noDrain) }
            c.withUnsafeBytes { device.copy($0, toOffset: 8192, flags: .noFlush) }
            device.fill(offset: 16_384, count: 64, value: 0xE5, flags: .noDrain)

            var none = try image(of: device, keeping: .none)
            #expect(Array(none[0..<64]) == a)
            #expect(Array(none[4096..<4160]) == bytes(0, 64))
            #expect(Array(none[8192..<8256]) == bytes(0, 64))
            #expect(Array(none[12_288..<12_352]) == bytes(0xD4, 64))
            #expect(Array(none[16_384..<16_448]) == bytes(0, 64))
            let all = try image(of: device, keeping: .all)
            #expect(Array(all[4096..<4160]) == b)
            #expect(Array(all[8192..<8256]) == c)
            #expect(Array(all[16_384..<16_448]) == bytes(0xE5, 64))
            let ranges = device.unpersistedRanges()
            #expect(covered(4096..<4160, by: ranges) && covered(8192..<8256, by: ranges))
            #expect(covered(16_384..<16_448, by: ranges))
            #expect(contained(ranges, in: [4096..<4160, 8192..<8256, 16_384..<16_448]), "\(ranges)")

            // The fence moves the flushed (.noDrain) lines; the .noFlush line was never flushed.
            device.drain()
            none = try image(of: device, keeping: .none)
            #expect(Array(none[4096..<4160]) == b)
            #expect(Array(none[16_384..<16_448]) == bytes(0xE5, 64))
            #expect(Array(none[8192..<8256]) == bytes(0, 64))
            #expect(covered(8192..<8256, by: device.unpersistedRanges()))

            device.flush(offset: 8192, count: 64)
            device.drain()
            none = try image(of: device, keeping: .none)
            #expect(Array(none[8192..<8256]) == c)
            #expect(device.unpersistedRanges().isEmpty)
        }
    }

    @Test("device.write persists unless its flags say otherwise")
    func deviceWrite() throws {
        try withDevice { device throws in
            try device.write(bytes(0x42, 100), at: 300)
            try device.write(bytes(0x43, 64), at: 4096, flags: .noDrain)
            let none = try image(of: device, keeping: .none)
            #expect(Array(none[300..<400]) == bytes(0x42, 100))
            #expect(Array(none[4096..<4160]) == bytes(0, 64))
            #expect(covered(4096..<4160, by: device.unpersistedRanges()))
            #expect(!device.unpersistedRanges().contains { $0.overlaps(300..<400) })
        }
    }

    @Test("persisting one byte persists its whole cache line; persisting zero bytes persists nothing")
    func persistGranularity() throws {
        try withDevice { device throws in
            storeWord(0x0A0B_0C0D_0E0F_1011, to: device, at: 64)
            storeWord(0x2122_2324_2526_2728, to: device, at: 200)
            device.persist(offset: 64, count: 0)
            device.flush(offset: 200, count: 0)
            device.drain()
            var ranges = device.unpersistedRanges()
            #expect(covered(64..<72, by: ranges) && covered(200..<208, by: ranges), "\(ranges)")
            // One byte of line 64..<128 flushed and fenced: the line, with the word at 64, is persistent.
            device.persist(offset: 120, count: 1)
            ranges = device.unpersistedRanges()
            #expect(!ranges.contains { $0.overlaps(64..<72) }, "\(ranges)")
            #expect(covered(200..<208, by: ranges), "\(ranges)")
            let none = try image(of: device, keeping: .none)
            #expect(word(none, at: 64) == 0x0A0B_0C0D_0E0F_1011)
            #expect(word(none, at: 200) == 0)
        }
    }

    @Test("a store through a mapping to a line flushed through the device, then the fence: one whole value")
    func mappingStoreBetweenDeviceFlushAndFence() throws {
        try withDevice(size: 8 << 20, name: "flushmap") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let file = try fs.create("/f")
            defer { file.close() }
            try file.allocate(offset: 0, count: pageSize)
            let mapping = try file.map(count: pageSize)
            defer { mapping.unmap() }
            let at = Int(try #require(try file.frames(offset: 0, count: pageSize)[0]).rawValue) * pageSize + 512
            let first: UInt64 = 0x0102_0304_0506_0708
            let second: UInt64 = 0xF1F2_F3F4_F5F6_F7F8
            storeWord(first, to: device, at: at)
            device.flush(offset: at, count: 8)
            mapping.baseAddress.storeBytes(of: second, toByteOffset: 512, as: UInt64.self)
            device.drain()
            let none = word(try image(of: device, keeping: .none), at: at)
            #expect(none == first || none == second, "\(String(none, radix: 16))")
            if none == first { #expect(covered(at..<at + 8, by: device.unpersistedRanges())) }
            #expect(word(try image(of: device, keeping: .all), at: at) == second)
            mapping.persist(offset: 512, count: 8)
            #expect(word(try image(of: device, keeping: .none), at: at) == second)
            #expect(device.unpersistedRanges().isEmpty)
        }
    }

    @Test("flushing one line of a page leaves the page's other stored lines in flight")
    func flushOneLineOfAPage() throws {
        try withDevice { device throws in
            storeWord(0xAAAA_1111_AAAA_1111, to: device, at: 8192)  // line 0, flushed
            storeWord(0xBBBB_1111_BBBB_1111, to: device, at: 8192 + 64)  // line 1, stored before the flush
            device.flush(offset: 8192, count: 8)
            storeWord(0xCCCC_1111_CCCC_1111, to: device, at: 8192 + 128)  // line 2, stored after the flush
            device.drain()
            let none = try image(of: device, keeping: .none)
            #expect(word(none, at: 8192) == 0xAAAA_1111_AAAA_1111)
            #expect(word(none, at: 8192 + 64) == 0)
            #expect(word(none, at: 8192 + 128) == 0)
            let ranges = device.unpersistedRanges()
            #expect(covered(8256..<8264, by: ranges) && covered(8320..<8328, by: ranges), "\(ranges)")
            #expect(contained(ranges, in: [8256..<8320, 8320..<8384]), "\(ranges)")
        }
    }

    @Test("two emulated devices track their stores apart")
    func twoDevicesApart() throws {
        try withDevice(name: "a") { a throws in
            try withDevice(name: "b") { b throws in
                storeWord(0x0101_0101_0101_0101, to: a, at: 4096)
                storeWord(0x0202_0202_0202_0202, to: b, at: 8192)
                #expect(contained(a.unpersistedRanges(), in: [lineRange(4096..<4104)]), "\(a.unpersistedRanges())")
                #expect(covered(4096..<4104, by: a.unpersistedRanges()))
                #expect(contained(b.unpersistedRanges(), in: [lineRange(8192..<8200)]), "\(b.unpersistedRanges())")
                #expect(covered(8192..<8200, by: b.unpersistedRanges()))
                a.persist(offset: 4096, count: 8)
                #expect(a.unpersistedRanges().isEmpty)
                #expect(covered(8192..<8200, by: b.unpersistedRanges()))
                #expect(word(try image(of: b, keeping: .none), at: 8192) == 0)
                #expect(word(try image(of: b, keeping: .all), at: 4096) == 0)
            }
        }
    }

    @Test(
        "non-temporal copies: persisted with a fence, in flight with .noDrain until drain; a mapping copy with [] persists"
    )
    func nonTemporalAndMappingCopies() throws {
        try withDevice(size: 8 << 20, name: "nt") { device throws in
            let data = bytes(0x4E, 256)
            data.withUnsafeBytes { device.copy($0, toOffset: 0, flags: .nonTemporal) }
            #expect(try Array(image(of: device, keeping: .none)[0..<256]) == data)
            data.withUnsafeBytes { device.copy($0, toOffset: 4096, flags: [.nonTemporal, .noDrain]) }
            #expect(try Array(image(of: device, keeping: .none)[4096..<4352]) == bytes(0, 256))
            #expect(try Array(image(of: device, keeping: .all)[4096..<4352]) == data)
            device.drain()
            #expect(try Array(image(of: device, keeping: .none)[4096..<4352]) == data)
            #expect(device.unpersistedRanges().isEmpty)

            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let file = try fs.create("/c")
            defer { file.close() }
            try file.allocate(offset: 0, count: pageSize)
            let mapping = try file.map(count: pageSize)
            defer { mapping.unmap() }
            let at = Int(try #require(try file.frames(offset: 0, count: pageSize)[0]).rawValue) * pageSize
            let more = bytes(0x6C, 300)
            more.withUnsafeBytes { mapping.copy($0, toOffset: 1000) }
            #expect(device.unpersistedRanges().isEmpty, "\(device.unpersistedRanges())")
            #expect(try Array(image(of: device, keeping: .none)[at + 1000..<at + 1300]) == more)
        }
    }
}

// MARK: - Stores through file mappings and DMA

@Suite("BlackBoxCrash: mappings and DMA are tracked")
struct BlackBoxCrashMappingTests {
    @Test("stores through a DAXFileSystem file mapping are tracked; mapping.persist persists them")
    func fileMappingStores() throws {
        try withDevice(size: 8 << 20, name: "fs") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let file = try fs.create("/data")
            defer { file.close() }
            try file.allocate(offset: 0, count: 4 * pageSize)
            let mapping = try file.map(count: 4 * pageSize)
            defer { mapping.unmap() }
            let frames = try file.frames(offset: 0, count: 4 * pageSize)
            let frame = try #require(frames[2])
            let deviceOffset = Int(frame.rawValue) * pageSize + 128
            #expect(device.unpersistedRanges().isEmpty, "format/create/allocate left \(device.unpersistedRanges())")

            let data = bytes(0x6D, 64)
            data.withUnsafeBytes { source in
                (mapping.baseAddress + 2 * pageSize + 128).copyMemory(from: source.baseAddress!, byteCount: 64)
            }
            let target = deviceOffset..<deviceOffset + 64
            let ranges = device.unpersistedRanges()
            #expect(covered(target, by: ranges), "\(target) not in \(ranges)")
            #expect(contained(ranges, in: [target]), "\(ranges)")
            #expect(try Array(image(of: device, keeping: .none)[target]) == bytes(0, 64))
            #expect(try Array(image(of: device, keeping: .all)[target]) == data)

            mapping.persist(offset: 2 * pageSize + 128, count: 64)
            #expect(device.unpersistedRanges().isEmpty)
            #expect(try Array(image(of: device, keeping: .none)[target]) == data)

            // DAXMapping.copy with .noDrain, then DAXMapping.drain.
            let more = bytes(0x4E, 64)
            more.withUnsafeBytes { mapping.copy($0, toOffset: 3 * pageSize, flags: .noDrain) }
            let other = Int(try #require(frames[3]).rawValue) * pageSize
            #expect(try Array(image(of: device, keeping: .none)[other..<other + 64]) == bytes(0, 64))
            #expect(covered(other..<other + 64, by: device.unpersistedRanges()))
            mapping.drain()
            #expect(try Array(image(of: device, keeping: .none)[other..<other + 64]) == more)
            #expect(device.unpersistedRanges().isEmpty)
        }
    }

    @Test("DMAEngine.write by frame is tracked: in the .all image, and persisted or listed as unpersisted")
    func dmaWrites() throws {
        try withDevice(size: 8 << 20, name: "dma") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let file = try fs.create("/buffer")
            defer { file.close() }
            try file.allocate(offset: 0, count: 2 * pageSize)
            let mapping = try file.map(count: 2 * pageSize)
            defer { mapping.unmap() }
            let nic = DMAEngine(device: device)
            let region = nic.register(try mapping.pin(offset: 0, count: 2 * pageSize))
            defer { nic.deregister(region) }
            let data = bytes(0xD7, 100)
            // Offset 4000 crosses into the second pinned page.
            try nic.write(data, to: region, at: 4000)

            let frames = region.frames
            let first = Int(frames[0].rawValue) * pageSize
            let second = Int(frames[1].rawValue) * pageSize
            let targets = [(first + 4000)..<(first + 4096), second..<(second + 4)]
            let all = try image(of: device, keeping: .all)
            #expect(Array(all[targets[0]]) + Array(all[targets[1]]) == data)
            // Tracked: every byte is either persisted already or listed as unpersisted.
            let none = try image(of: device, keeping: .none)
            let ranges = device.unpersistedRanges()
            var offsetInData = 0
            for target in targets {
                for offset in target {
                    #expect(
                        none[offset] == data[offsetInData] || ranges.contains { $0.contains(offset) },
                        "DMA byte at device offset \(offset) neither persisted nor listed")
                    offsetInData += 1
                }
            }
        }
    }

    @Test("a store through a mapping is persisted by device.persist of its frame, and the other way round")
    func persistAcrossViews() throws {
        try withDevice(size: 8 << 20, name: "views") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let file = try fs.create("/v")
            defer { file.close() }
            try file.allocate(offset: 0, count: 2 * pageSize)
            let mapping = try file.map(count: 2 * pageSize)
            defer { mapping.unmap() }
            let frames = try file.frames(offset: 0, count: 2 * pageSize)
            let page0 = Int(try #require(frames[0]).rawValue) * pageSize
            let page1 = Int(try #require(frames[1]).rawValue) * pageSize

            mapping.baseAddress.storeBytes(of: 0xABCD_EF01_2345_6789 as UInt64, toByteOffset: 64, as: UInt64.self)
            device.persist(offset: page0 + 64, count: 8)
            #expect(device.unpersistedRanges().isEmpty, "\(device.unpersistedRanges())")
            #expect(word(try image(of: device, keeping: .none), at: page0 + 64) == 0xABCD_EF01_2345_6789)

            storeWord(0x1357_9BDF_0246_8ACE, to: device, at: page1 + 128)
            #expect(mapping.baseAddress.load(fromByteOffset: pageSize + 128, as: UInt64.self) == 0x1357_9BDF_0246_8ACE)
            mapping.persist(offset: pageSize + 128, count: 8)
            #expect(device.unpersistedRanges().isEmpty, "\(device.unpersistedRanges())")
            #expect(word(try image(of: device, keeping: .none), at: page1 + 128) == 0x1357_9BDF_0246_8ACE)
        }
    }

    @Test("a mapping store across a page boundary is tracked and persisted on both frames")
    func mappingStoreAcrossPages() throws {
        try withDevice(size: 8 << 20, name: "cross") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            // Interleave two files so that /x's pages are unlikely to be adjacent frames.
            let x = try fs.create("/x")
            let y = try fs.create("/y")
            defer {
                x.close()
                y.close()
            }
            for page in 0..<4 {
                try x.write(bytes(1, pageSize), at: page * pageSize)
                try y.write(bytes(2, pageSize), at: page * pageSize)
            }
            let mapping = try x.map(count: 4 * pageSize)
            defer { mapping.unmap() }
            let frames = try x.frames(offset: 0, count: 4 * pageSize).map { Int(try #require($0).rawValue) }
            let data = bytes(0x9D, 256)
            data.withUnsafeBytes { source in
                (mapping.baseAddress + 2 * pageSize - 128).copyMemory(from: source.baseAddress!, byteCount: 256)
            }
            let targets = [
                (frames[1] * pageSize + pageSize - 128)..<(frames[1] * pageSize + pageSize),
                (frames[2] * pageSize)..<(frames[2] * pageSize + 128),
            ]
            let ranges = device.unpersistedRanges()
            #expect(targets.allSatisfy { covered($0, by: ranges) }, "\(targets) not in \(ranges)")
            #expect(contained(ranges, in: targets), "\(ranges)")
            mapping.persist(offset: 2 * pageSize - 128, count: 256)
            #expect(device.unpersistedRanges().isEmpty, "\(device.unpersistedRanges())")
            let none = try image(of: device, keeping: .none)
            #expect(Array(none[targets[0]]) + Array(none[targets[1]]) == data)
        }
    }

    @Test("DAXFile.sync makes stores through the file's mappings persistent")
    func syncPersistsMappingStores() throws {
        try withDevice(size: 8 << 20, name: "sync") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let file = try fs.create("/s")
            defer { file.close() }
            try file.allocate(offset: 0, count: pageSize)
            let mapping = try file.map(count: pageSize)
            defer { mapping.unmap() }
            let frame = Int(try #require(try file.frames(offset: 0, count: pageSize)[0]).rawValue)
            let data = bytes(0x5F, 1000)
            data.withUnsafeBytes { mapping.baseAddress.copyMemory(from: $0.baseAddress!, byteCount: 1000) }
            #expect(covered(frame * pageSize..<frame * pageSize + 1000, by: device.unpersistedRanges()))
            try file.sync()
            #expect(device.unpersistedRanges().isEmpty, "\(device.unpersistedRanges())")
            #expect(try Array(image(of: device, keeping: .none)[frame * pageSize..<frame * pageSize + 1000]) == data)
        }
    }

    @Test("a store made by another thread is tracked like any other")
    func storeFromAnotherThread() throws {
        try withDevice { device throws in
            let address = UInt(bitPattern: device.baseAddress)
            let group = DispatchGroup()
            group.enter()
            Thread.detachNewThread {
                UnsafeMutableRawPointer(bitPattern: address)!
                    .storeBytes(of: 0x7777_6666_5555_4444 as UInt64, toByteOffset: 20_480, as: UInt64.self)
                group.leave()
            }
            group.wait()
            #expect(covered(20_480..<20_488, by: device.unpersistedRanges()))
            #expect(word(try image(of: device, keeping: .all), at: 20_480) == 0x7777_6666_5555_4444)
            #expect(word(try image(of: device, keeping: .none), at: 20_480) == 0)
        }
    }

    @Test("a mapping made after an image was written, and a remapping, are tracked")
    func newMappingsAreTracked() throws {
        try withDevice(size: 8 << 20, name: "remap") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let file = try fs.create("/r")
            defer { file.close() }
            try file.allocate(offset: 0, count: pageSize)
            let at = Int(try #require(try file.frames(offset: 0, count: pageSize)[0]).rawValue) * pageSize
            _ = try image(of: device, keeping: .none)
            for round in 1...2 {
                let mapping = try file.map(count: pageSize)
                let value = UInt64(round) &* 0x1111_1111_1111_1111
                mapping.baseAddress.storeBytes(of: value, toByteOffset: 64, as: UInt64.self)
                #expect(covered(at + 64..<at + 72, by: device.unpersistedRanges()), "round \(round)")
                #expect(word(try image(of: device, keeping: .all), at: at + 64) == value)
                mapping.persist(offset: 64, count: 8)
                #expect(word(try image(of: device, keeping: .none), at: at + 64) == value)
                mapping.unmap()
            }
        }
    }

    /// Writes a power-failure image, mounts it and returns `count` bytes of `path` at 0.
    private func readAfterPowerFail(_ device: PMemDevice, _ path: String, count: Int) throws -> [UInt8] {
        let imagePath = uniqueShmPath("fsimg")
        defer { unlink(imagePath) }
        try device.powerFail(writingImageTo: imagePath, keeping: .none)
        let opened = try PMemDevice.open(path: imagePath)
        defer { opened.close() }
        let fs = try DAXFileSystem.mount(opened)
        defer { try? fs.unmount() }
        let report = try fs.check()
        #expect(report.isClean, "\(report.problems)")
        let file = try fs.open(path, access: .readOnly)
        defer { file.close() }
        return try file.read(count: count, at: 0)
    }

    // (This version handles no faults, so a store to a hole cannot be tested here: without fault
    // handling it raises SIGBUS. `allocate` gives zeroed blocks.)
    @Test("allocate over blocks a removed file left dirty: after a power failure the new range reads zeros")
    func allocateOverStaleBlocksThenPowerFail() throws {
        try withDevice(size: 8 << 20, name: "stale") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let stale = try fs.create("/stale")
            try stale.write(bytes(0xEE, 64 * pageSize), at: 0)
            stale.close()
            try fs.remove("/stale")
            let file = try fs.create("/h")
            defer { file.close() }
            try file.write(bytes(0x11, pageSize), at: 0)
            try file.allocate(offset: pageSize, count: 32 * pageSize)
            #expect(file.size == 33 * pageSize)
            let read = try readAfterPowerFail(device, "/h", count: 33 * pageSize)
            // New blocks read zeros, across a crash too: the old state (one page) or the new one (zeros after it).
            #expect(read.count == pageSize || read.count == 33 * pageSize, "\(read.count)")
            #expect(Array(read.prefix(pageSize)) == bytes(0x11, pageSize))
            #expect(
                read.dropFirst(pageSize).allSatisfy { $0 == 0 },
                "stale bytes: \(read.dropFirst(pageSize).filter { $0 != 0 }.count)")
        }
    }

    // Kept commented until clone exists (this version refuses it with .unsupported, and has no
    // fault handler): copy-on-write through a mapping after a power failure.
    // @Test("copy-on-write of a cloned page through a mapping: after a power failure the clone holds the copy and the store")
    // func cloneCopyOnWriteThenPowerFail() throws {
    //     try withDevice(size: 8 << 20, name: "cow") { device throws in
    //         let fs = try DAXFileSystem.format(device)
    //         defer { try? fs.unmount() }
    //         guard fs.faultHandling == .userfaultfd else { return }
    //         let source = try fs.create("/src")
    //         try source.write(bbPattern(2 * pageSize), at: 0)
    //         source.close()
    //         try fs.clone("/src", to: "/dst")
    //         let clone = try fs.open("/dst")
    //         defer { clone.close() }
    //         let mapping = try clone.map(count: 2 * pageSize)
    //         defer { mapping.unmap() }
    //         mapping.baseAddress.storeBytes(of: 0x9999_9999_9999_9999 as UInt64, toByteOffset: 16, as: UInt64.self)
    //         mapping.persist(offset: 16, count: 8)
    //         var expected = bbPattern(2 * pageSize)
    //         for i in 0..<8 { expected[16 + i] = 0x99 }
    //         let read = try readAfterPowerFail(device, "/dst", count: 2 * pageSize)
    //         #expect(read == expected, "first differing byte at \(zip(read, expected).firstIndex { $0 != $1 } ?? -1)")
    //         let original = try readAfterPowerFail(device, "/src", count: 2 * pageSize)
    //         #expect(original == bbPattern(2 * pageSize))
    //     }
    // }

    @Test("migrate, then a power failure: the file holds every byte")
    func migrateThenPowerFail() throws {
        try withDevice(size: 8 << 20, name: "migrate") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let file = try fs.create("/m")
            defer { file.close() }
            try file.write(bbPattern(4 * pageSize, seed: 3), at: 0)
            let before = try file.frames(offset: 0, count: 4 * pageSize)
            let result = try file.migrate(offset: 0, count: 4 * pageSize)
            #expect(result.migrated == 4 && result.busy.isEmpty)
            #expect(try file.frames(offset: 0, count: 4 * pageSize) != before)
            #expect(try readAfterPowerFail(device, "/m", count: 4 * pageSize) == bbPattern(4 * pageSize, seed: 3))
        }
    }

    @Test("a DMA write to a revoked region throws .revoked and leaves no store behind")
    func revokedDMAWriteStoresNothing() throws {
        try withDevice(size: 8 << 20, name: "revoke") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let file = try fs.create("/lease")
            defer { file.close() }
            try file.write(bytes(0x10, pageSize), at: 0)
            let mapping = try file.map(count: pageSize)
            let nic = DMAEngine(device: device)
            let region = nic.register(try mapping.pin(offset: 0, count: pageSize, lifetime: .longTerm(onRevoke: {})))
            defer { nic.deregister(region) }
            let frame = Int(region.frames[0].rawValue)
            mapping.unmap()
            try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .zero))
            #expect(region.isRevoked)
            let before = try image(of: device, keeping: .all)
            let unpersistedBefore = device.unpersistedRanges()
            expectDAXCode(.revoked) { try nic.write(bytes(0xBD, 64), to: region, at: 0) }
            #expect(device.unpersistedRanges() == unpersistedBefore)
            let after = try image(of: device, keeping: .all)
            #expect(after == before)
            #expect(!after[frame * pageSize..<frame * pageSize + 64].contains(0xBD))
        }
    }

    @Test("bad input changes nothing: an out-of-range device or DMA write leaves no store in flight")
    func outOfRangeWritesStoreNothing() throws {
        try withDevice(size: 8 << 20, name: "range") { device throws in
            let fs = try DAXFileSystem.format(device)
            defer { try? fs.unmount() }
            let file = try fs.create("/b")
            defer { file.close() }
            try file.write(bytes(0x10, pageSize), at: 0)
            let mapping = try file.map(count: pageSize)
            defer { mapping.unmap() }
            let nic = DMAEngine(device: device)
            let region = nic.register(try mapping.pin(offset: 0, count: pageSize))
            defer { nic.deregister(region) }
            let before = try image(of: device, keeping: .all)
            #expect(device.unpersistedRanges().isEmpty)

            expectDAXCode(.invalidArgument) { try device.write(bytes(0xBD, 100), at: device.size - 50) }
            expectDAXCode(.invalidArgument) { try device.write(bytes(0xBD, 8), at: -8) }
            expectDAXCode(.invalidArgument) { try nic.write(bytes(0xBD, 100), to: region, at: pageSize - 50) }
            #expect(device.unpersistedRanges().isEmpty, "\(device.unpersistedRanges())")
            #expect(try image(of: device, keeping: .all) == before)
            #expect(try device.read(count: 50, at: device.size - 50) == bytes(0, 50))
        }
    }

    @Test("a large in-flight set: .random images stay word-atomic over 256 pages")
    func largeRandomImages() throws {
        try withDevice(size: 4 << 20, name: "large") { device throws in
            let base = 1 << 20
            let words = 256 * pageSize / 8
            for i in stride(from: 0, to: words, by: 1) {
                storeWord(0x0101_0101_0101_0101, to: device, at: base + i * 8)
            }
            device.persist(offset: base, count: words * 8)
            for i in stride(from: 0, to: words, by: 1) {
                storeWord(0xFEFE_FEFE_FEFE_FEFE ^ UInt64(i & 0x7F), to: device, at: base + i * 8)
            }
            device.flush(offset: base, count: words * 4)
            for seed: UInt64 in [7, 8] {
                let img = try image(of: device, keeping: .random(seed: seed))
                var bad = 0
                for i in 0..<words {
                    let value = word(img, at: base + i * 8)
                    if value != 0x0101_0101_0101_0101 && value != 0xFEFE_FEFE_FEFE_FEFE ^ UInt64(i & 0x7F) { bad += 1 }
                }
                #expect(bad == 0, "seed \(seed): \(bad) torn or foreign words")
            }
            let all = try image(of: device, keeping: .all)
            #expect(all == (try device.read(count: device.size, at: 0)))
        }
    }
}

// MARK: - CrashExplorer

/// A log-like layout: a 64-byte record at 4096 and a "published" flag at 0.
private let recordOffset = 4096
private let record: [UInt8] = (0..<64).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
private let flagValue: UInt64 = 0xF1A6_F1A6_F1A6_F1A6

private func checkRecord(_ image: PMemDevice) throws {
    let flag = word(try image.read(count: 8, at: 0), at: 0)
    if flag == flagValue {
        let stored = try image.read(count: 64, at: recordOffset)
        if stored != record { throw CheckerError(description: "bbx: flag published but record torn") }
    } else if flag != 0 {
        throw CheckerError(description: "bbx: flag torn \(String(flag, radix: 16))")
    }
}

@Suite("BlackBoxCrash: CrashExplorer")
struct BlackBoxCrashExplorerTests {
    @Test("a correct workload (record, persist, flag, persist) passes every image")
    func correctWorkloadPasses() throws {
        let report = try CrashExplorer(deviceSize: 4 << 20).explore(
            workload: { device throws in
                store(record, to: device, at: recordOffset)
                device.persist(offset: recordOffset, count: 64)
                storeWord(flagValue, to: device, at: 0)
                device.persist(offset: 0, count: 8)
            },
            check: checkRecord)
        #expect(report.failures.isEmpty, "\(report.failures)")
        #expect(report.crashPoints > 0)
        #expect(report.imagesChecked > 0)
    }

    @Test("a planted bug (flag persisted before the record) is reported with the checker's error")
    func plantedBugIsFound() throws {
        let report = try CrashExplorer(deviceSize: 4 << 20).explore(
            workload: { device throws in
                store(record, to: device, at: recordOffset)
                storeWord(flagValue, to: device, at: 0)
                device.persist(offset: 0, count: 8)
                device.persist(offset: recordOffset, count: 64)
            },
            check: checkRecord)
        #expect(!report.failures.isEmpty)
        #expect(report.crashPoints >= 2)
        // At the fence inside persist(record) (point 2) the flag is persisted and the record is
        // in flight, so the image keeping nothing in flight must fail there.
        #expect(report.failures.contains { $0.crashPoint == 2 }, "\(report.failures)")
        #expect(report.failures.count <= report.imagesChecked)
        for failure in report.failures {
            #expect(failure.crashPoint >= 1 && failure.crashPoint <= report.crashPoints, "\(failure)")
            #expect(failure.error.contains("bbx: flag published but record torn"), "\(failure.error)")
            #expect(!failure.description.isEmpty)
        }
    }

    @Test("imagesPerPoint changes imagesChecked")
    func imagesPerPointMatters() throws {
        func run(_ imagesPerPoint: Int) throws -> CrashReport {
            try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: imagesPerPoint, seed: 5).explore(
                workload: { device throws in
                    for i in 0..<4 {
                        store(bytes(UInt8(i + 1), 256), to: device, at: i * 4096)
                        device.persist(offset: i * 4096, count: 256)
                    }
                },
                check: { _ in })
        }
        let few = try run(1)
        let many = try run(16)
        #expect(few.crashPoints == many.crashPoints)
        #expect(few.failures.isEmpty && many.failures.isEmpty)
        #expect(many.imagesChecked > few.imagesChecked, "1: \(few.imagesChecked), 16: \(many.imagesChecked)")
    }

    @Test("a checker that always throws fails every image at every crash point")
    func alwaysThrowingChecker() throws {
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 2).explore(
            workload: { device throws in
                for i in 0..<3 {
                    storeWord(UInt64(i + 1) &* 0x0101_0101_0101_0101, to: device, at: i * 64)
                    device.persist(offset: i * 64, count: 8)
                }
            },
            check: { _ in throw CheckerError(description: "bbx: always") })
        #expect(report.crashPoints >= 3)
        #expect(report.imagesChecked > 0)
        #expect(report.failures.count == report.imagesChecked)
        #expect(report.failures.allSatisfy { $0.error.contains("bbx: always") })
        #expect(
            Set(report.failures.map(\.crashPoint)) == Set(1...report.crashPoints),
            "points \(report.crashPoints), failed at \(Set(report.failures.map(\.crashPoint)).sorted())")
    }

    @Test("at every crash point the image holds no less than was persisted, and nothing stored after the crash point")
    func imageBoundsAtEveryCrashPoint() throws {
        let count = 6
        var storesDone = 0
        func value(_ i: Int) -> UInt64 { 0x5050_5050_5050_5050 &+ UInt64(i + 1) }
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 8, seed: 9).explore(
            workload: { device throws in
                for i in 0..<count {
                    // Each word in a line of its own, so whole-line choices cannot hide a bug.
                    storeWord(value(i), to: device, at: i * 128)
                    storesDone = i + 1
                    device.persist(offset: i * 128, count: 8)
                }
            },
            check: { image in
                let bytes = try image.read(count: count * 128, at: 0)
                // At the fence inside persist k, stores 0..<k-1 are persisted, store k-1 is in flight.
                for i in 0..<count {
                    let found = word(bytes, at: i * 128)
                    if i < storesDone - 1, found != value(i) {
                        throw CheckerError(description: "bbx: persisted word \(i) lost (stores \(storesDone))")
                    }
                    if i >= storesDone, found != 0 {
                        throw CheckerError(
                            description: "bbx: word \(i) stored after the crash point (stores \(storesDone))")
                    }
                    if found != 0, found != value(i) {
                        throw CheckerError(description: "bbx: word \(i) torn: \(String(found, radix: 16))")
                    }
                }
            })
        #expect(report.failures.isEmpty, "\(report.failures)")
        #expect(report.crashPoints >= count)
        #expect(report.imagesChecked > 0)
    }

    @Test("the file system under the explorer: create + write, every image mounts and checks clean")
    func fileSystemUnderExplorer() throws {
        let content = Array("black box crash test".utf8)
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 4).explore(
            setup: { device in try DAXFileSystem.format(device).unmount() },
            workload: { device throws in
                let fs = try DAXFileSystem.mount(device)
                let file = try fs.create("/a")
                try file.write(content, at: 0)
                file.close()
                try fs.unmount()
            },
            check: { image in
                let fs = try DAXFileSystem.mount(image)
                defer { try? fs.unmount() }
                let report = try fs.check()
                guard report.isClean else {
                    throw CheckerError(description: "bbx: unclean \(report.problems)")
                }
                let names = try fs.contentsOfDirectory("/")
                if names.contains("a") {
                    let file = try fs.open("/a", access: .readOnly)
                    defer { file.close() }
                    let read = try file.read(count: file.size, at: 0)
                    // The old (empty) or the new content, nothing else.
                    guard read.isEmpty || read == content else {
                        throw CheckerError(description: "bbx: /a holds \(read)")
                    }
                } else if !names.isEmpty {
                    throw CheckerError(description: "bbx: unexpected names \(names)")
                }
            })
        #expect(report.failures.isEmpty, "\(report.failures)")
        #expect(report.crashPoints > 0)
        #expect(report.imagesChecked > 0)
    }

    @Test("the same explorer on the same workload reports the same failures (seeds replay)")
    func deterministicFailures() throws {
        func run() throws -> [String] {
            try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 8, seed: 77).explore(
                workload: { device in
                    store(record, to: device, at: recordOffset)
                    storeWord(flagValue, to: device, at: 0)
                    device.persist(offset: 0, count: 8)
                    device.persist(offset: recordOffset, count: 64)
                },
                check: checkRecord
            ).failures.map { "\($0.crashPoint)/\($0.seed)/\($0.error)" }
        }
        let first = try run()
        #expect(!first.isEmpty)
        #expect(try run() == first)
    }

    @Test("under .eadr the planted bug cannot show: every store is persistent, in program order")
    func eadrHidesOrderingBug() throws {
        let report = try CrashExplorer(deviceSize: 4 << 20, domain: .eadr).explore(
            workload: { device in
                store(record, to: device, at: recordOffset)
                storeWord(flagValue, to: device, at: 0)
                device.persist(offset: 0, count: 8)
                device.persist(offset: recordOffset, count: 64)
            },
            check: checkRecord)
        #expect(report.failures.isEmpty, "\(report.failures)")
        #expect(report.crashPoints > 0)
    }

    @Test("setup's fences are not crash points, its persisted data is in every image, and images have the device size")
    func setupIsNotExplored() throws {
        func run(withSetup: Bool) throws -> CrashReport {
            try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 2).explore(
                setup: { device in
                    guard withSetup else { return }
                    for i in 0..<5 {
                        store(bytes(0x5C, 64), to: device, at: 65_536 + i * 64)
                        device.persist(offset: 65_536 + i * 64, count: 64)
                    }
                },
                workload: { device in
                    storeWord(1, to: device, at: 0)
                    device.persist(offset: 0, count: 8)
                },
                check: { image in
                    guard image.size == 4 << 20 else { throw CheckerError(description: "bbx: size \(image.size)") }
                    if withSetup, try image.read(count: 320, at: 65_536) != bytes(0x5C, 320) {
                        throw CheckerError(description: "bbx: setup data missing")
                    }
                })
        }
        let with = try run(withSetup: true)
        let without = try run(withSetup: false)
        #expect(with.failures.isEmpty, "\(with.failures)")
        #expect(without.failures.isEmpty, "\(without.failures)")
        #expect(with.crashPoints == without.crashPoints)
    }

    @Test("a DAXError thrown by the checker comes back as its text")
    func checkerDAXErrorText() throws {
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 1).explore(
            workload: { device in
                storeWord(1, to: device, at: 0)
                device.persist(offset: 0, count: 8)
            },
            check: { image in _ = try image.read(count: 16, at: image.size - 8) })
        // Reading past the end must be a DAXError (.invalidArgument): bad input, a clear error.
        #expect(!report.failures.isEmpty)
        #expect(
            report.failures.allSatisfy { $0.error.contains("invalidArgument") || $0.error.contains("invalid") },
            "\(report.failures.map(\.error))")
    }

    @Test("file system metadata under the explorer: mkdir, rename, truncate, remove all check clean")
    func fileSystemMetadataUnderExplorer() throws {
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 2).explore(
            setup: { device in
                let fs = try DAXFileSystem.format(device)
                try fs.create("/old").write(bytes(0x33, 10_000), at: 0)
                try fs.unmount()
            },
            workload: { device in
                let fs = try DAXFileSystem.mount(device)
                try fs.createDirectory("/d")
                try fs.rename("/old", to: "/d/new")
                let file = try fs.open("/d/new")
                try file.truncate(to: 5000, ifBusy: .fail)
                file.close()
                try fs.create("/gone").write(bytes(0x44, 100), at: 0)
                try fs.remove("/gone")
                try fs.unmount()
            },
            check: { image in
                let fs = try DAXFileSystem.mount(image)
                defer { try? fs.unmount() }
                let report = try fs.check()
                guard report.isClean else { throw CheckerError(description: "bbx: unclean \(report.problems)") }
                let path = try fs.contentsOfDirectory("/").contains("old") ? "/old" : "/d/new"
                let file = try fs.open(path, access: .readOnly)
                defer { file.close() }
                guard file.size == 10_000 || file.size == 5000 else {
                    throw CheckerError(description: "bbx: \(path) has size \(file.size)")
                }
                guard try file.read(count: file.size, at: 0) == bytes(0x33, file.size) else {
                    throw CheckerError(description: "bbx: \(path) content changed")
                }
            })
        #expect(report.failures.isEmpty, "\(report.failures.prefix(5))")
        #expect(report.crashPoints > 0)
        #expect(report.imagesChecked > 0)
    }

    @Test("crash points are the workload's fences (and possibly its end); a flush alone is no fence")
    func crashPointsCountFences() throws {
        let fences = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 1).explore(
            workload: { device in
                for i in 0..<5 {
                    storeWord(UInt64(i + 1), to: device, at: i * 64)
                    device.persist(offset: i * 64, count: 8)
                }
            },
            check: { _ in })
        #expect(fences.crashPoints == 5 || fences.crashPoints == 6, "\(fences.crashPoints)")
        let flushOnly = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 1).explore(
            workload: { device in
                storeWord(1, to: device, at: 0)
                device.flush(offset: 0, count: 8)
            },
            check: { _ in })
        #expect(flushOnly.crashPoints <= 1, "\(flushOnly.crashPoints)")
    }

    @Test("the explorer sees stores through a file mapping: once persisted, every later image holds them")
    func explorerTracksMappingStores() throws {
        var persisted = false
        var dataOffset = -1
        let data = bytes(0xC7, 128)
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 4).explore(
            setup: { device in
                let fs = try DAXFileSystem.format(device)
                let file = try fs.create("/m")
                try file.allocate(offset: 0, count: pageSize)
                dataOffset = Int(try #require(try file.frames(offset: 0, count: pageSize)[0]).rawValue) * pageSize + 256
                file.close()
                try fs.unmount()
            },
            workload: { device in
                let fs = try DAXFileSystem.mount(device)
                let file = try fs.open("/m")
                let mapping = try file.map(count: pageSize)
                data.withUnsafeBytes { (mapping.baseAddress + 256).copyMemory(from: $0.baseAddress!, byteCount: 128) }
                mapping.persist(offset: 256, count: 128)
                persisted = true
                mapping.unmap()
                file.close()
                try fs.unmount()
            },
            check: { image in
                let found = try image.read(count: 128, at: dataOffset)
                if persisted, found != data {
                    throw CheckerError(description: "bbx: persisted mapping data missing")
                }
                guard
                    found == data || found == bytes(0, 128)
                        || found.enumerated().allSatisfy({ $0.element == 0 || $0.element == 0xC7 })
                else {
                    throw CheckerError(description: "bbx: foreign bytes \(found)")
                }
            })
        #expect(dataOffset > 0)
        #expect(report.failures.isEmpty, "\(report.failures.prefix(5))")
        #expect(report.crashPoints > 0)
    }

    @Test("a checker's stores to its image never reach the images checked after it")
    func checkerStoresArePrivate() throws {
        var checked = 0
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 4).explore(
            workload: { device in
                for i in 0..<3 {
                    storeWord(UInt64(i + 1), to: device, at: i * 64)
                    device.persist(offset: i * 64, count: 8)
                }
            },
            check: { image in
                checked += 1
                let head = try image.read(count: 4096, at: 0)
                for i in 0..<64 {
                    let value = word(head, at: i * 64)
                    if (i < 3 && value > 3) || (i >= 3 && value != 0) {
                        throw CheckerError(description: "bbx: image \(checked) saw a checker's store at \(i * 64)")
                    }
                }
                // Scribble over the image, as a buggy recovery might.
                try image.write(bytes(0xFF, 4096), at: 0)
                image.persist(offset: 0, count: 4096)
            })
        #expect(report.failures.isEmpty, "\(report.failures.prefix(3))")
        #expect(checked == report.imagesChecked)
        #expect(checked > 1)
    }

    @Test("imagesPerPoint 0 still checks the keep-none and keep-all images; a negative count is .invalidArgument")
    func imagesPerPointBounds() throws {
        let zero = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 0).explore(
            workload: { device in
                storeWord(5, to: device, at: 0)
                device.persist(offset: 0, count: 8)
            },
            check: { _ in })
        #expect(zero.failures.isEmpty)
        #expect(zero.imagesChecked >= 2, "\(zero.imagesChecked)")
        var ran = false
        do {
            _ = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: -1).explore(
                workload: { _ in ran = true }, check: { _ in })
            Issue.record("imagesPerPoint -1 was accepted")
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument, "\(error)")
        }
        #expect(!ran)
    }

    @Test("every fencing primitive is a crash point: copy, fill, write, flush+drain, mapping persist")
    func everyFenceIsACrashPoint() throws {
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 1).explore(
            workload: { device in
                bytes(1, 64).withUnsafeBytes { device.copy($0, toOffset: 0) }  // 1
                device.fill(offset: 64, count: 64, value: 2)  // 2
                try device.write(bytes(3, 64), at: 128)  // 3
                storeWord(4, to: device, at: 192)
                device.flush(offset: 192, count: 8)
                device.drain()  // 4
                bytes(5, 64).withUnsafeBytes { device.copy($0, toOffset: 256, flags: .noDrain) }
                device.drain()  // 5
            },
            check: { _ in })
        #expect(report.crashPoints == 5 || report.crashPoints == 6, "\(report.crashPoints)")
        #expect(report.failures.isEmpty)
    }

    @Test("punch a hole and extend a file under the explorer: each operation all or nothing")
    func punchAndExtendUnderExplorer() throws {
        let page = pageSize
        let original = bbPattern(8 * page, seed: 5)
        let tail = bytes(0x7E, 100)
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 2).explore(
            setup: { device in
                let fs = try DAXFileSystem.format(device)
                try fs.create("/p").write(original, at: 0)
                try fs.unmount()
            },
            workload: { device in
                let fs = try DAXFileSystem.mount(device)
                let file = try fs.open("/p")
                try file.punchHole(offset: 2 * page, count: 2 * page, ifBusy: .fail)
                try file.write(tail, at: 10 * page)
                file.close()
                try fs.unmount()
            },
            check: { image in
                let fs = try DAXFileSystem.mount(image)
                defer { try? fs.unmount() }
                let report = try fs.check()
                guard report.isClean else { throw CheckerError(description: "bbx: unclean \(report.problems)") }
                let file = try fs.open("/p", access: .readOnly)
                defer { file.close() }
                let size = file.size
                guard size == 8 * page || size == 10 * page + 100 else {
                    throw CheckerError(description: "bbx: size \(size)")
                }
                let data = try file.read(count: size, at: 0)
                guard Array(data[0..<2 * page]) == Array(original[0..<2 * page]),
                    Array(data[4 * page..<8 * page]) == Array(original[4 * page..<8 * page])
                else {
                    throw CheckerError(description: "bbx: untouched pages changed")
                }
                let hole = Array(data[2 * page..<4 * page])
                guard hole == Array(original[2 * page..<4 * page]) || hole.allSatisfy({ $0 == 0 }) else {
                    throw CheckerError(description: "bbx: punch half done")
                }
                if size == 10 * page + 100 {
                    guard hole.allSatisfy({ $0 == 0 }) else {
                        throw CheckerError(description: "bbx: write before punch")
                    }
                    guard data[8 * page..<10 * page].allSatisfy({ $0 == 0 }) else {
                        throw CheckerError(description: "bbx: gap not zeros")
                    }
                    guard Array(data[(10 * page)...]) == tail else {
                        throw CheckerError(description: "bbx: size grown, data not there")
                    }
                }
            })
        #expect(report.failures.isEmpty, "\(report.failures.prefix(5))")
        #expect(report.crashPoints > 0)
    }

    @Test("at a crash point the explorer checks both the keep-nothing and the keep-everything image")
    func explorerChecksNoneAndAll() throws {
        var stage = 0
        var sawNone = false
        var sawAll = false
        let a: UInt64 = 0xA1A1_A1A1_A1A1_A1A1
        let b: UInt64 = 0xB2B2_B2B2_B2B2_B2B2
        let c: UInt64 = 0xC3C3_C3C3_C3C3_C3C3
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 2).explore(
            workload: { device in
                storeWord(a, to: device, at: 0)
                storeWord(b, to: device, at: 8192)
                storeWord(c, to: device, at: 16_384)
                stage = 1
                device.persist(offset: 16_384, count: 8)
                stage = 2
            },
            check: { image in
                guard stage == 1 else { return }
                let found = [
                    word(try image.read(count: 8, at: 0), at: 0),
                    word(try image.read(count: 8, at: 8192), at: 0),
                    word(try image.read(count: 8, at: 16_384), at: 0),
                ]
                if found == [0, 0, 0] { sawNone = true }
                if found == [a, b, c] { sawAll = true }
            })
        #expect(report.failures.isEmpty)
        #expect(sawNone, "no image at the fence kept nothing in flight")
        #expect(sawAll, "no image at the fence kept everything in flight")
    }

    @Test("under .eadr every image at a fence holds every store made before it")
    func eadrExplorerKeepsEveryStore() throws {
        var storesDone = 0
        let report = try CrashExplorer(deviceSize: 4 << 20, domain: .eadr, imagesPerPoint: 4).explore(
            workload: { device in
                for i in 0..<4 {
                    storeWord(0x0F0F_0F0F_0F0F_0F0F &+ UInt64(i), to: device, at: i * 4096)  // never flushed
                    storesDone = i + 1
                    if i % 2 == 1 { device.drain() }
                }
                device.persist(offset: 0, count: 8)
            },
            check: { image in
                for i in 0..<4 {
                    let found = word(try image.read(count: 8, at: i * 4096), at: 0)
                    let expected: UInt64 = i < storesDone ? 0x0F0F_0F0F_0F0F_0F0F &+ UInt64(i) : 0
                    if found != expected {
                        throw CheckerError(
                            description: "bbx: eadr word \(i) is \(String(found, radix: 16)) after \(storesDone) stores"
                        )
                    }
                }
            })
        #expect(report.failures.isEmpty, "\(report.failures.prefix(3))")
        #expect(report.crashPoints >= 3)
        #expect(report.imagesChecked > 0)
    }

    @Test("a checker may map a file of its image: the mapping shows what read() shows")
    func checkerMapsImageFiles() throws {
        let content = bbPattern(3 * pageSize, seed: 9)
        var mapped = 0
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 2).explore(
            setup: { device in try DAXFileSystem.format(device).unmount() },
            workload: { device in
                let fs = try DAXFileSystem.mount(device)
                let file = try fs.create("/a")
                try file.write(content, at: 0)
                file.close()
                try fs.unmount()
            },
            check: { image in
                let fs = try DAXFileSystem.mount(image)
                defer { try? fs.unmount() }
                guard try fs.contentsOfDirectory("/").contains("a") else { return }
                let file = try fs.open("/a", access: .readOnly)
                defer { file.close() }
                let size = file.size
                guard size > 0 else { return }
                let read = try file.read(count: size, at: 0)
                let mapping = try file.map(count: size, access: .readOnly)
                defer { mapping.unmap() }
                let viaMapping = Array(UnsafeRawBufferPointer(start: mapping.baseAddress, count: size))
                mapped += 1
                guard viaMapping == read else { throw CheckerError(description: "bbx: mapping and read() differ") }
                guard read == Array(content.prefix(size)) else {
                    throw CheckerError(description: "bbx: content of size \(size) wrong")
                }
            })
        #expect(report.failures.isEmpty, "\(report.failures.prefix(3))")
        #expect(mapped > 0)
    }

    @Test("many small file-system operations under the explorer: every image checks clean, no file half written")
    func manyOperationsUnderExplorer() throws {
        func content(_ i: Int) -> [UInt8] { bbPattern(1000 + i * 700, seed: i) }
        let report = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 1).explore(
            setup: { device in try DAXFileSystem.format(device).unmount() },
            workload: { device in
                let fs = try DAXFileSystem.mount(device)
                try fs.createDirectory("/d")
                try fs.createDirectory("/d/e")
                for i in 0..<8 {
                    let file = try fs.create("/d/e/f\(i)")
                    try file.write(content(i), at: 0)
                    file.close()
                }
                for i in stride(from: 0, to: 8, by: 2) { try fs.remove("/d/e/f\(i)") }
                try fs.rename("/d/e/f1", to: "/d/g1")
                try fs.unmount()
            },
            check: { image in
                let fs = try DAXFileSystem.mount(image)
                defer { try? fs.unmount() }
                let report = try fs.check()
                guard report.isClean else { throw CheckerError(description: "bbx: unclean \(report.problems)") }
                guard try fs.contentsOfDirectory("/").contains("d") else { return }
                var paths: [(String, Int)] = []
                if try fs.contentsOfDirectory("/d").contains("e") {
                    for name in try fs.contentsOfDirectory("/d/e") {
                        guard name.hasPrefix("f"), let i = Int(name.dropFirst()), (0..<8).contains(i) else {
                            throw CheckerError(description: "bbx: unexpected /d/e/\(name)")
                        }
                        paths.append(("/d/e/\(name)", i))
                    }
                }
                if try fs.contentsOfDirectory("/d").contains("g1") { paths.append(("/d/g1", 1)) }
                for (path, i) in paths {
                    let file = try fs.open(path, access: .readOnly)
                    defer { file.close() }
                    let read = try file.read(count: file.size, at: 0)
                    // A file is created empty, then written: empty or whole (the write's size and data).
                    guard read.isEmpty || read == content(i) else {
                        throw CheckerError(
                            description: "bbx: \(path) holds \(read.count) bytes, not 0 or \(content(i).count)")
                    }
                }
            })
        #expect(report.failures.isEmpty, "\(report.failures.prefix(5))")
        #expect(report.crashPoints > 10)
    }

    @Test("a workload that throws is not a passing exploration: explore throws")
    func throwingWorkload() throws {
        var threw = false
        do {
            _ = try CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 1).explore(
                workload: { device in
                    storeWord(1, to: device, at: 0)
                    device.persist(offset: 0, count: 8)
                    throw CheckerError(description: "bbx: workload failed")
                },
                check: { _ in })
        } catch {
            threw = true
            #expect("\(error)".contains("bbx: workload failed"), "\(error)")
        }
        #expect(threw, "explore returned a report although its workload threw")
    }

    @Test("bad input: a device size of 0 or not a page multiple is a DAXError, the workload never runs")
    func badDeviceSize() throws {
        for size in [0, pageSize + 1, -pageSize] {
            var ran = false
            do {
                _ = try CrashExplorer(deviceSize: size).explore(workload: { _ in ran = true }, check: { _ in })
                Issue.record("deviceSize \(size) was accepted")
            } catch let error as DAXError {
                #expect(error.code == .invalidArgument, "\(size): \(error)")
            }
            #expect(!ran, "deviceSize \(size): the workload ran")
        }
    }
}
