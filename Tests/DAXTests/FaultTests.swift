// Black-box tests of the fault semantics of DAX mappings, written from the contract only
// (docs/faults.md and the public API): what a load, a store, a `read(2)` or a pin does on a
// page that is a hole, a punched page, or a page past the end of the file, through every kind of
// mapping, alone and racing truncates and punches. Only the public API is used: `import DAX`.
//
// Signals a user expects (SIGBUS past the end or with no space, SIGSEGV for a store through a
// `.readOnly` mapping) are exit tests. Where an access may fault and the test must see that
// in-process, it reads through the kernel (`kernelLoad`), which answers EFAULT instead of a
// signal. Tests that would die of a signal in a library without a fault handler first require
// `faultHandling == .userfaultfd`, so they fail with that reason instead of killing the run.
// An exit test's child exits 0 when the access it ends with did not fault, and 3 or 4 when a
// step before it went wrong.

import DAX
import Foundation
import Synchronization
import Testing

private let page = PMemDevice.pageSize

/// `count` bytes at `offset` of `mapping`, read by loads.
private func loaded(_ mapping: DAXMapping, at offset: Int, count: Int) -> [UInt8] {
    Array(UnsafeRawBufferPointer(start: mapping.baseAddress + offset, count: count))
}

private func store(_ byte: UInt8, _ mapping: DAXMapping, at offset: Int) {
    mapping.baseAddress.storeBytes(of: byte, toByteOffset: offset, as: UInt8.self)
}

private func zeros(_ count: Int) -> [UInt8] { [UInt8](repeating: 0, count: count) }

/// The bytes of `value` as memory holds them.
private func bytes(_ value: UInt64) -> [UInt8] { withUnsafeBytes(of: value) { Array($0) } }

/// What storer `storer` stores in round `round` of the race test: never 0, never another's.
private func raceValue(_ storer: Int, _ round: Int) -> UInt64 { UInt64(storer + 1) << 32 | UInt64(round) }

/// Which pages of `file` have blocks, in `[0, pages)`.
private func backed(_ file: DAXFile, pages: Int) throws -> [Bool] {
    try file.frames(offset: 0, count: pages * page).map { $0 != nil }
}

/// True when every byte of `range` lies in one of `ranges`.
private func covered(_ range: Range<Int>, by ranges: [Range<Int>]) -> Bool {
    range.allSatisfy { offset in ranges.contains { $0.contains(offset) } }
}

private let noHandler = "without a fault handler this test would die of SIGBUS"

@Suite(
    "Faults", .enabled(if: processMayOpenUserfaultfdDevice, "needs /dev/userfaultfd (root, or access to the device)"))
struct FaultTests {
    @Test("this machine offers full userfaultfd, and the file system uses it")
    func faultHandlingIsUserfaultfd() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "fhandling")
        #expect(t.fs.faultHandling == .userfaultfd)
    }

    // MARK: - Holes

    @Test("a load of a hole reads zeros and allocates nothing", arguments: MappingKind.allCases)
    func loadOfHole(kind: MappingKind) throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "fzero")
        let owner = try t.fs.create("/f")
        try owner.write(pattern(page), at: page)
        try owner.truncate(to: 4 * page)  // pages 0, 2 and 3 are holes
        let before = t.fs.statistics()
        let mapping = try kind.map(t.fs, owner, path: "/f", count: 4 * page)
        defer { mapping.unmap() }

        for hole in [0, 2, 3] { #expect(loaded(mapping, at: hole * page, count: page) == zeros(page), "page \(hole)") }
        #expect(loaded(mapping, at: page, count: page) == pattern(page))
        let after = t.fs.statistics()
        #expect(try backed(owner, pages: 4) == [false, true, false, false])
        #expect(after.usedBlocks == before.usedBlocks)
        #expect(after.faults.allocating == before.faults.allocating)
        #expect((1...3).contains(after.faults.zeroPage - before.faults.zeroPage), "\(after.faults)")

        // The zero page stays: loading the holes again faults no more.
        for hole in [0, 2, 3] { #expect(loaded(mapping, at: hole * page, count: page) == zeros(page)) }
        #expect(t.fs.statistics().faults == after.faults)
        #expect(try t.fs.check().isClean)
    }

    @Test("a store to a hole allocates one zeroed block, journaled, shown in every mapping of the file")
    func storeToHole() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "fstore")
        let file = try t.fs.create("/f")
        try file.write(pattern(page), at: 0)
        try file.truncate(to: 4 * page)  // pages 1, 2 and 3 are holes
        let reader = try file.map(count: 4 * page, access: .readOnly)  // made before, never touched
        let loader = try file.map(count: 4 * page)  // made before, has loaded the hole
        #expect(loaded(loader, at: 2 * page, count: page) == zeros(page))
        let before = t.fs.statistics()
        let writer = try file.map(count: 4 * page)

        store(0xA5, writer, at: 2 * page + 100)  // a store is the first touch of the hole
        #expect(try backed(file, pages: 4) == [true, false, true, false])
        #expect(t.fs.statistics().usedBlocks == before.usedBlocks + 1)
        #expect(t.fs.statistics().faults.allocating == before.faults.allocating + 1)
        for mapping in [reader, loader, writer] {
            var expected = zeros(page)
            expected[100] = 0xA5
            #expect(loaded(mapping, at: 2 * page, count: page) == expected)  // the rest of the block is zeroed
        }
        #expect(try file.read(count: 1, at: 2 * page + 100) == [0xA5])

        // A store after a load of the hole (the writer's zero page) allocates too.
        #expect(loaded(writer, at: 3 * page, count: page) == zeros(page))
        store(0x5A, writer, at: 3 * page + 7)
        #expect(reader.baseAddress.load(fromByteOffset: 3 * page + 7, as: UInt8.self) == 0x5A)
        #expect(loader.baseAddress.load(fromByteOffset: 3 * page + 7, as: UInt8.self) == 0x5A)
        #expect(try file.read(count: 1, at: 3 * page + 7) == [0x5A])
        // Stores to pages that have blocks fault no more.
        store(0x01, writer, at: 2 * page + 200)
        store(0x02, loader, at: 3 * page + 8)
        let after = t.fs.statistics()
        #expect(after.usedBlocks == before.usedBlocks + 2)
        #expect(after.faults.allocating == before.faults.allocating + 2)
        #expect(try backed(file, pages: 4) == [true, false, true, true])
        #expect(try t.fs.check().isClean)

        try file.sync()
        for mapping in [reader, loader, writer] { mapping.unmap() }
        file.close()
        let fs = try t.remount()
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        let again = try fs.open("/f")
        defer { again.close() }
        var expected = pattern(page) + zeros(3 * page)
        expected[2 * page + 100] = 0xA5
        expected[2 * page + 200] = 0x01
        expected[3 * page + 7] = 0x5A
        expected[3 * page + 8] = 0x02
        #expect(try again.read(count: 4 * page, at: 0) == expected)
        #expect(try backed(again, pages: 4) == [true, false, true, true])
    }

    @Test("threads storing to the same holes at once get one block per hole")
    func concurrentStoresToOneHole() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "fonce")
        let holes = 32
        let threads = 4
        let file = try t.fs.create("/f")
        try file.truncate(to: holes * page)
        let mapping = try file.map(count: holes * page)
        defer { mapping.unmap() }
        let before = t.fs.statistics()
        let base = UInt(bitPattern: mapping.baseAddress)
        let start = StartLine(threads)
        onThreads(threads) { thread in
            let address = UnsafeMutableRawPointer(bitPattern: base)!
            start.arrive()
            for hole in 0..<holes {
                address.storeBytes(of: UInt8(thread + 1), toByteOffset: hole * page + thread, as: UInt8.self)
            }
        }
        let after = t.fs.statistics()
        #expect(after.faults.allocating - before.faults.allocating == holes, "\(after.faults)")
        let frames = try file.frames(offset: 0, count: holes * page)
        #expect(frames.allSatisfy { $0 != nil })
        #expect(Set(frames.compactMap { $0 }).count == holes)
        // Extent leaves may take a block or two besides the data.
        #expect((holes...holes + 2).contains(after.usedBlocks - before.usedBlocks), "\(after)")
        let expected = (1...threads).map { UInt8($0) } + zeros(page - threads)
        for hole in 0..<holes {
            #expect(loaded(mapping, at: hole * page, count: page) == expected, "page \(hole)")
            #expect(try file.read(count: page, at: hole * page) == expected, "page \(hole)")
        }
        #expect(try t.fs.check().isClean)
    }

    @Test("a store to a hole when no block is left raises SIGBUS in the storing thread")
    func storeWithNoSpaceRaisesSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let fs = try unlinkedFileSystem()
            let file = try fs.create("/f")
            try file.truncate(to: 2 * 4096)
            let mapping = try file.map(count: 2 * 4096)
            try fillUp(fs)
            do {
                try fs.create("/probe").allocate(offset: 0, count: 4096)
                exit(3)  // not full after all
            } catch {}
            // A load needs no block: it still reads zeros.
            guard mapping.baseAddress.load(fromByteOffset: 4096, as: UInt8.self) == 0 else { exit(4) }
            mapping.baseAddress.storeBytes(of: 1, as: UInt8.self)
        }
    }

    @Test("a read(2) from an ordinary file into a hole of a .readWrite mapping allocates and returns the full count")
    func preadIntoHole() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "fpread")
        let source = try OrdinaryFile(holding: pattern(2 * page, seed: 5))
        let file = try t.fs.create("/f")
        try file.truncate(to: 4 * page)
        let writer = try file.map(count: 4 * page)
        defer { writer.unmap() }
        let reader = try file.map(count: 4 * page, access: .readOnly)
        defer { reader.unmap() }
        let before = t.fs.statistics()

        let (count, error) = source.pread(into: writer.baseAddress + page, count: 2 * page)
        #expect(count == 2 * page, "pread returned \(count), errno \(error)")
        #expect(try file.read(count: 2 * page, at: page) == pattern(2 * page, seed: 5))
        #expect(loaded(reader, at: page, count: 2 * page) == pattern(2 * page, seed: 5))
        #expect(try backed(file, pages: 4) == [false, true, true, false])
        let after = t.fs.statistics()
        #expect(after.faults.allocating - before.faults.allocating == 2, "\(after.faults)")
        #expect(after.usedBlocks == before.usedBlocks + 2)

        // Into a .readOnly mapping the kernel may not store: EFAULT, and the file is unchanged.
        let (refused, refusal) = source.pread(into: reader.baseAddress + 3 * page, count: page)
        #expect(refused == -1)
        #expect(refusal == EFAULT)
        #expect(try file.read(count: page, at: 3 * page) == zeros(page))
        #expect(try backed(file, pages: 4) == [false, true, true, false])
        #expect(try t.fs.check().isClean)
    }

    @Test("a page punched while mapped reads zeros in every mapping, and a store gives it a new block")
    func punchedPageIsAHole() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "fpunch")
        try #require(t.fs.faultHandling == .userfaultfd, "\(noHandler)")
        let file = try t.fs.create("/f")
        try file.write(pattern(4 * page), at: 0)
        let writer = try file.map(count: 4 * page)
        defer { writer.unmap() }
        let reader = try t.fs.open("/f", access: .readOnly).map(count: 4 * page, access: .readOnly)
        defer { reader.unmap() }
        try file.punchHole(offset: page, count: page)
        let before = t.fs.statistics()

        #expect(kernelLoad(reader.baseAddress + page) == 0)
        #expect(kernelLoad(writer.baseAddress + page + 1) == 0)
        for mapping in [reader, writer] {
            #expect(loaded(mapping, at: page, count: page) == zeros(page))
            #expect(loaded(mapping, at: 0, count: page) == Array(pattern(4 * page)[0..<page]))
            #expect(loaded(mapping, at: 2 * page, count: 2 * page) == Array(pattern(4 * page)[(2 * page)...]))
        }
        #expect(try backed(file, pages: 4) == [true, false, true, true])
        #expect(t.fs.statistics().usedBlocks == before.usedBlocks)
        #expect(t.fs.statistics().faults.zeroPage > before.faults.zeroPage)

        store(0x99, writer, at: page + 10)
        let new = try #require(try file.frames(offset: page, count: 1)[0])
        #expect(t.fs.pages.state(of: new).isAllocated)
        #expect(t.fs.statistics().faults.allocating == before.faults.allocating + 1)
        #expect(t.fs.statistics().usedBlocks == before.usedBlocks + 1)
        #expect(reader.baseAddress.load(fromByteOffset: page + 10, as: UInt8.self) == 0x99)
        var expected = zeros(page)
        expected[10] = 0x99
        #expect(try file.read(count: page, at: page) == expected)
        #expect(try t.fs.check().isClean)
    }

    // MARK: - The end of the file

    @Test(
        "truncate down then up: old mappings read zeros in the regrown range, and stores allocate",
        arguments: MappingKind.allCases)
    func truncateDownThenUp(kind: MappingKind) throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "fregrow")
        try #require(t.fs.faultHandling == .userfaultfd, "\(noHandler)")
        let owner = try t.fs.create("/f")
        try owner.write(pattern(4 * page), at: 0)
        let old = try kind.map(t.fs, owner, path: "/f", count: 4 * page)
        defer { old.unmap() }
        let writer = try owner.map(count: 4 * page)
        defer { writer.unmap() }
        try owner.truncate(to: page)
        try owner.truncate(to: 4 * page)
        #expect(owner.size == 4 * page)
        #expect(try backed(owner, pages: 4) == [true, false, false, false])
        let before = t.fs.statistics()

        for regrown in 1..<4 { try #require(kernelLoad(old.baseAddress + regrown * page) == 0, "page \(regrown)") }
        #expect(loaded(old, at: 0, count: page) == Array(pattern(4 * page)[0..<page]))
        #expect(loaded(old, at: page, count: 3 * page) == zeros(3 * page))
        #expect(t.fs.statistics().usedBlocks == before.usedBlocks)

        try #require(kernelLoad(writer.baseAddress + page) == 0)
        store(0x3C, writer, at: 2 * page + 9)  // page 2 of the writer: first touched by this store
        #expect(old.baseAddress.load(fromByteOffset: 2 * page + 9, as: UInt8.self) == 0x3C)
        #expect(try owner.read(count: 1, at: 2 * page + 9) == [0x3C])
        #expect(try backed(owner, pages: 4) == [true, false, true, false])
        #expect(t.fs.statistics().usedBlocks == before.usedBlocks + 1)
        #expect(t.fs.statistics().faults.allocating == before.faults.allocating + 1)
        #expect(try t.fs.check().isClean)
    }

    @Test(
        "map may reach past the end: those pages fault until the file grows over them, then show its data",
        arguments: MappingKind.allCases)
    func mapPastEndOfFile(kind: MappingKind) throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "fpasteof")
        let owner = try t.fs.create("/f")
        try owner.write(pattern(page), at: 0)
        let before = t.fs.statistics()
        let mapping = try kind.map(t.fs, owner, path: "/f", count: 4 * page)  // 3 pages past the end
        defer { mapping.unmap() }
        #expect(mapping.count == 4 * page)
        #expect(loaded(mapping, at: 0, count: page) == pattern(page))

        // The kernel's own access past the end is EFAULT (a load's would be SIGBUS), and counted.
        #expect(kernelLoad(mapping.baseAddress + 2 * page + 5) == nil)
        #expect(t.fs.statistics().faults.sigbus > before.faults.sigbus, "\(t.fs.statistics().faults)")
        #expect(owner.size == page)
        #expect(t.fs.statistics().usedBlocks == before.usedBlocks)

        // The file grows over page 2: the old mapping shows the byte written there.
        try owner.write([0xAB], at: 2 * page + 5)
        #expect(owner.size == 2 * page + 6)
        try #require(kernelLoad(mapping.baseAddress + 2 * page + 5) == 0xAB)
        #expect(mapping.baseAddress.load(fromByteOffset: 2 * page + 5, as: UInt8.self) == 0xAB)
        // Page 1 is a hole inside the file now; page 3 is still past the end.
        try #require(kernelLoad(mapping.baseAddress + page) == 0)
        #expect(loaded(mapping, at: page, count: page) == zeros(page))
        #expect(kernelLoad(mapping.baseAddress + 3 * page) == nil)

        if kind == .readWrite {
            store(0x11, mapping, at: page + 1)
            #expect(try owner.read(count: 2, at: page) == [0, 0x11])
        } else {
            try owner.write([0x11], at: page + 1)
            #expect(mapping.baseAddress.load(fromByteOffset: page + 1, as: UInt8.self) == 0x11)
        }
        #expect(try t.fs.check().isClean)
    }

    @Test("a load past the end of the file through a mapping that reaches there raises SIGBUS")
    func loadPastEndRaisesSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let fs = try unlinkedFileSystem()
            let file = try fs.create("/f")
            try file.write([1, 2, 3], at: 0)
            let mapping = try file.map(count: 3 * 4096)
            guard mapping.baseAddress.load(fromByteOffset: 2, as: UInt8.self) == 3 else { exit(3) }
            _ = mapping.baseAddress.load(fromByteOffset: 2 * 4096, as: UInt8.self)
        }
    }

    @Test("after truncate down and a smaller regrow, a store below the new end allocates and one past it raises SIGBUS")
    func storePastRegrownEndRaisesSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let fs = try unlinkedFileSystem()
            let file = try fs.create("/f")
            try file.write([UInt8](repeating: 0xEE, count: 4 * 4096), at: 0)
            let mapping = try file.map(count: 4 * 4096)
            try file.truncate(to: 4096)
            try file.truncate(to: 2 * 4096)
            guard kernelLoad(mapping.baseAddress + 4096) == 0 else { exit(3) }
            mapping.baseAddress.storeBytes(of: 7, toByteOffset: 4096 + 3, as: UInt8.self)
            guard try file.read(count: 4, at: 4096) == [0, 0, 0, 7] else { exit(4) }
            mapping.baseAddress.storeBytes(of: 7, toByteOffset: 3 * 4096, as: UInt8.self)
        }
    }

    enum Growth: String, CaseIterable, Sendable, CustomStringConvertible {
        case truncateToPage, truncatePast, writePast, allocatePast
        var description: String { rawValue }
    }

    @Test(
        "POSIX tail: a byte stored past the end in the last partial page reads as zero once the file grows",
        arguments: Growth.allCases)
    func tailOfLastPageReadsZerosAfterGrowth(growth: Growth) throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "ftail")
        let file = try t.fs.create("/f")
        let data = pattern(10_000)
        try file.write(data, at: 0)
        let mapping = try file.map(count: 3 * page)  // the whole last page
        defer { mapping.unmap() }
        memset(mapping.baseAddress + 10_000, 0x77, 3 * page - 10_000)  // no signal: inside the last page
        #expect(file.size == 10_000)
        #expect(try file.read(count: page, at: 2 * page) == Array(data[(2 * page)...]))

        switch growth {
        case .truncateToPage: try file.truncate(to: 3 * page)
        case .truncatePast: try file.truncate(to: 5 * page)
        case .writePast: try file.write([1], at: 5 * page)
        case .allocatePast: try file.allocate(offset: 0, count: 5 * page)
        }
        #expect(try file.read(count: 3 * page - 10_000, at: 10_000) == zeros(3 * page - 10_000))
        #expect(loaded(mapping, at: 10_000, count: 3 * page - 10_000) == zeros(3 * page - 10_000))
        #expect(try file.read(count: 10_000, at: 0) == data)
        if growth != .truncateToPage { #expect(try file.read(count: 2 * page, at: 3 * page) == zeros(2 * page)) }
        #expect(try t.fs.check().isClean)
    }

    // MARK: - Read-only mappings

    @Test("a store to a hole through a .readOnly mapping raises SIGSEGV")
    func storeThroughReadOnlyMappingRaisesSIGSEGV() async {
        await #expect(processExitsWith: .signal(SIGSEGV)) {
            let fs = try unlinkedFileSystem()
            let file = try fs.create("/f")
            try file.write([1], at: 4096)
            try file.truncate(to: 2 * 4096)  // page 0 is a hole
            let mapping = try fs.open("/f", access: .readOnly).map(count: 2 * 4096, access: .readOnly)
            guard mapping.baseAddress.load(as: UInt8.self) == 0 else { exit(3) }  // the zero page
            mapping.baseAddress.storeBytes(of: 9, as: UInt8.self)
        }
    }

    // MARK: - Pins

    @Test(
        "a .readOnly pin of a hole succeeds, allocates nothing, and a device reads zeros by its frame",
        arguments: MappingKind.allCases)
    func readOnlyPinOfHole(kind: MappingKind) throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "fropin")
        let owner = try t.fs.create("/f")
        try owner.write(pattern(page), at: 0)
        try owner.truncate(to: 2 * page)  // page 1 is a hole
        let mapping = try kind.map(t.fs, owner, path: "/f", count: 2 * page)
        defer { mapping.unmap() }
        let before = t.fs.statistics()

        let pin = try mapping.pin(offset: page, count: page, access: .readOnly)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(pin)
        #expect(try nic.read(count: page, from: region, at: 0) == zeros(page))
        #expect(try backed(owner, pages: 2) == [true, false])
        #expect(t.fs.statistics().usedBlocks == before.usedBlocks)
        expectDAXError(.permissionDenied) { try nic.write([1], to: region, at: 0) }
        #expect(try owner.read(count: page, at: page) == zeros(page))

        // It holds no block of the file, so no truncate waits on it.
        try owner.truncate(to: page, ifBusy: .fail)
        #expect(owner.size == page)
        // A block the file gets there later is not what the device holds: it reads the zeros it pinned.
        try owner.write(pattern(page, seed: 3), at: page)
        #expect(try nic.read(count: page, from: region, at: 0) == zeros(page))
        #expect(try owner.read(count: page, at: page) == pattern(page, seed: 3))
        nic.deregister(region)
        let after = t.fs.statistics()
        #expect(after.pinsAcquired == after.pinsReleased)
        #expect(after.pinnedPages == 0)
        #expect(try t.fs.check().isClean)
    }

    @Test("a .readWrite pin of a hole allocates its block, which the mapping and the file show")
    func readWritePinOfHoleAllocates() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "frwpin")
        let file = try t.fs.create("/f")
        try file.truncate(to: 2 * page)
        let mapping = try file.map(count: 2 * page)
        defer { mapping.unmap() }
        #expect(try backed(file, pages: 2) == [false, false])
        let before = t.fs.statistics()

        let pin = try mapping.pin(offset: 0, count: page)
        let frame = pin.frames[0]
        #expect(try file.frames(offset: 0, count: page) == [frame])
        #expect(t.fs.statistics().usedBlocks == before.usedBlocks + 1)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(pin)
        #expect(try nic.read(count: page, from: region, at: 0) == zeros(page))
        try nic.write([1, 2, 3], to: region, at: 10)
        #expect(try file.read(count: 3, at: 10) == [1, 2, 3])
        #expect(loaded(mapping, at: 10, count: 3) == [1, 2, 3])
        #expect(try backed(file, pages: 2) == [true, false])
        nic.deregister(region)
        #expect(t.fs.statistics().pinnedPages == 0)
        #expect(try t.fs.check().isClean)
    }

    // MARK: - Sparse mappings

    @Test(
        "a mapping of a sparse file costs kernel mappings per extent and hole, not per page",
        arguments: MappingKind.allCases)
    func sparseMappingIsCheap(kind: MappingKind) throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "fsparse")
        let size = 64 << 20
        let stride = 16
        let file = try t.fs.create("/sparse")
        try file.truncate(to: size)
        let written = size / page / stride
        for index in 0..<written { try file.write(pattern(page, seed: index), at: index * stride * page) }
        #expect(try file.frames(offset: 0, count: size).compactMap { $0 }.count == written)
        let runs = 2 * written  // each written page, and the hole after it
        let bound = 2 * runs + 16

        let mapping = try kind.map(t.fs, file, path: "/sparse", count: size)
        defer { mapping.unmap() }
        let mapped = kernelMappings(in: mapping.baseAddress, count: size)
        #expect(mapped <= bound, "\(mapped) kernel mappings for \(runs) runs of \(size / page) pages")
        for index in [0, written / 2, written - 1] {
            #expect(loaded(mapping, at: index * stride * page, count: page) == pattern(page, seed: index))
        }
        // Loading a byte of every hole maps zero pages inside the holes' kernel mappings.
        for index in 0..<written {
            #expect(mapping.baseAddress.load(fromByteOffset: (index * stride + 5) * page + 1, as: UInt8.self) == 0)
        }
        #expect(kernelMappings(in: mapping.baseAddress, count: size) <= bound)
        if kind == .readWrite {
            for index in 0..<8 { store(1, mapping, at: (index * stride + 9) * page) }
            #expect(kernelMappings(in: mapping.baseAddress, count: size) <= bound)
            #expect(try file.frames(offset: 0, count: size).compactMap { $0 }.count == written + 8)
        }
        #expect(try file.frames(offset: 5 * page, count: 1) == [nil])
    }

    @Test(
        "holes filled through a mapping from the last page to the first get blocks in order: one extent, few kernel mappings",
        arguments: [false, true])
    func backwardFillStaysContiguous(afterData: Bool) throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "fbackward")
        let pages = 512
        let file = try t.fs.create("/f")
        // With data before the holes, their blocks go after its block; without, after the
        // allocator's cursor.
        if afterData { try file.write(pattern(page), at: 0) }
        let first = afterData ? 1 : 0
        try file.truncate(to: (first + pages) * page)
        let mapping = try file.map(count: (first + pages) * page)
        defer { mapping.unmap() }
        // A memcpy that copies backwards, 1 MiB at a time (two runs of 256 pages, each filled
        // from its end): one allocating fault a page.
        for chunk in 0..<2 {
            for step in (0..<256).reversed() {
                store(UInt8(step & 0x7F) | 0x80, mapping, at: (first + chunk * 256 + step) * page)
            }
        }
        #expect(t.fs.statistics().faults.allocating == pages)
        let frames = try file.frames(offset: 0, count: (first + pages) * page).map { try #require($0) }
        let descending = zip(frames, frames.dropFirst()).filter { $1.rawValue != $0.rawValue + 1 }.count
        #expect(descending == 0, "\(descending) breaks in \(frames.count) frames")
        #expect(kernelMappings(in: mapping.baseAddress, count: (first + pages) * page) <= 4)
        #expect(try file.read(count: 1, at: (first + 300) * page) == [UInt8(44 & 0x7F) | 0x80])
        #expect(try t.fs.check().isClean)
    }

    @Test("a 1 GiB mapping of a fully sparse file, then one store: a handful of kernel mappings")
    func gigabyteOfHoles() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "fgig")
        let size = 1 << 30
        let file = try t.fs.create("/big")
        try file.truncate(to: size)
        let before = t.fs.statistics()
        let writer = try file.map(count: size)
        defer { writer.unmap() }
        let reader = try file.map(count: size, access: .readOnly)
        defer { reader.unmap() }
        #expect(kernelMappings(in: writer.baseAddress, count: size) <= 4)
        #expect(kernelMappings(in: reader.baseAddress, count: size) <= 4)

        store(0x42, writer, at: size / 2 + 7)
        #expect(reader.baseAddress.load(fromByteOffset: size / 2 + 7, as: UInt8.self) == 0x42)
        #expect(try file.read(count: 1, at: size / 2 + 7) == [0x42])
        #expect(t.fs.statistics().usedBlocks == before.usedBlocks + 1)
        #expect(t.fs.statistics().faults.allocating == before.faults.allocating + 1)
        #expect(kernelMappings(in: writer.baseAddress, count: size) <= 8)
        #expect(kernelMappings(in: reader.baseAddress, count: size) <= 8)
        #expect(try t.fs.check().isClean)
    }

    // MARK: - sync

    @Test("sync makes stores through mappings durable, those that allocated included, and again after a later store")
    func syncMakesMappedStoresDurable() throws {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        options.powerFailureEmulation = .adr
        let t = try TemporaryFileSystem(size: 8 << 20, name: "fsync", deviceOptions: options)
        let device = t.device
        let file = try t.fs.create("/f")
        defer { file.close() }
        try file.write(pattern(page), at: 0)
        try file.truncate(to: 3 * page)  // pages 1 and 2 are holes
        let mapping = try file.map(count: 3 * page)
        defer { mapping.unmap() }

        mapping.baseAddress.storeBytes(of: 0x1111_2222_3333_4444, toByteOffset: 64, as: UInt64.self)
        mapping.baseAddress.storeBytes(of: 0x5555_6666_7777_8888, toByteOffset: page + 64, as: UInt64.self)
        let frames = try file.frames(offset: 0, count: 2 * page).map { try #require($0) }
        for frame in frames {
            #expect(covered(frame.deviceOffset + 64..<frame.deviceOffset + 72, by: device.unpersistedRanges()))
        }
        let lost = try imageBytes(device, at: frames[1].deviceOffset + 64, count: 8)
        #expect(lost == zeros(8), "a store nobody flushed is not in the persistence domain yet")

        try file.sync()
        #expect(device.unpersistedRanges().isEmpty, "\(device.unpersistedRanges())")
        try withImage(of: device) { fs in
            let crashed = try fs.open("/f")
            defer { crashed.close() }
            #expect(try crashed.read(count: 8, at: 64) == bytes(0x1111_2222_3333_4444))
            #expect(try crashed.read(count: 8, at: page + 64) == bytes(0x5555_6666_7777_8888))
            #expect(try crashed.read(count: page, at: 2 * page) == zeros(page))
        }

        // A store after sync is tracked again, and the next sync makes it durable.
        mapping.baseAddress.storeBytes(of: 0x9999_AAAA_BBBB_CCCC, toByteOffset: 128, as: UInt64.self)
        #expect(covered(frames[0].deviceOffset + 128..<frames[0].deviceOffset + 136, by: device.unpersistedRanges()))
        mapping.baseAddress.storeBytes(of: 0xDDDD_EEEE_FFFF_0001, toByteOffset: 2 * page, as: UInt64.self)
        try file.sync()
        #expect(device.unpersistedRanges().isEmpty, "\(device.unpersistedRanges())")
        try withImage(of: device) { fs in
            let crashed = try fs.open("/f")
            defer { crashed.close() }
            #expect(try crashed.read(count: 8, at: 128) == bytes(0x9999_AAAA_BBBB_CCCC))
            #expect(try crashed.read(count: 8, at: 2 * page) == bytes(0xDDDD_EEEE_FFFF_0001))
            #expect(try fs.check().isClean)
        }
        #expect(try t.fs.check().isClean)
    }

    // MARK: - Races

    @Test("threads store into holes while others punch and truncate: one block per page, every byte as modelled")
    func storesRacePunchesAndTruncates() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "frace")
        try #require(t.fs.faultHandling == .userfaultfd, "\(noHandler)")
        let fs = t.fs
        // Storers store only below the punched range's end; the puncher punches only `punched`;
        // the truncator cuts and regrows only `truncated`, so no store ever lands past the end.
        let stored = 0..<16
        let punched = 16..<32
        let truncated = 32..<48
        let storers = 2
        let rounds = 40
        let file = try fs.create("/race")
        try file.truncate(to: truncated.upperBound * page)
        let baseline = fs.statistics()
        let mapping = try file.map(count: truncated.upperBound * page)
        let base = UInt(bitPattern: mapping.baseAddress)
        let problems = ProblemLog()
        let punches = Counter()
        let truncates = Counter()
        let storersDone = Counter()
        let start = StartLine(storers + 2)

        onThreads(storers + 2) { role in
            let address = UnsafeMutableRawPointer(bitPattern: base)!
            start.arrive()
            switch role {
            case 0..<storers:
                defer { storersDone.increment() }
                for round in 1...rounds {
                    let mine = raceValue(role, round)
                    for index in stored.lowerBound..<punched.upperBound {
                        address.storeBytes(of: mine, toByteOffset: index * page + role * 8, as: UInt64.self)
                    }
                    for index in stored.lowerBound..<punched.upperBound {
                        let seen = address.load(fromByteOffset: index * page + role * 8, as: UInt64.self)
                        if seen != mine, !(punched.contains(index) && seen == 0) {
                            problems.add("storer \(role) round \(round): page \(index) holds \(seen)")
                        }
                    }
                    // Let a punch and a truncate happen between rounds.
                    let (p, r) = (punches.value, truncates.value)
                    spinUntil { punches.value > p && truncates.value > r }
                }
            case storers:
                var step = 0
                repeat {
                    let index = punched.lowerBound + (step * 7) % punched.count
                    let pages = index + 1 < punched.upperBound && step % 2 == 1 ? 2 : 1
                    do {
                        try file.punchHole(offset: index * page, count: pages * page)
                    } catch {
                        problems.add("punch of page \(index): \(error)")
                    }
                    punches.increment()
                    step += 1
                } while storersDone.value < storers
            default:
                var step = 0
                repeat {
                    let cut = truncated.lowerBound + (step * 5) % truncated.count
                    let written = cut + (step * 3) % (truncated.upperBound - cut)
                    do {
                        try file.truncate(to: cut * page)
                        try file.write(pattern(page, seed: step), at: written * page)
                        try file.truncate(to: truncated.upperBound * page)
                        var expected = zeros((truncated.upperBound - cut) * page)
                        expected.replaceSubrange(
                            (written - cut) * page..<(written - cut + 1) * page, with: pattern(page, seed: step))
                        if try file.read(count: expected.count, at: cut * page) != expected {
                            problems.add("truncate step \(step): pages \(cut)..<\(truncated.upperBound) not as written")
                        }
                    } catch {
                        problems.add("truncate step \(step): \(error)")
                    }
                    truncates.increment()
                    step += 1
                } while storersDone.value < storers
                // The last word: pages 32..<40 holes, page 40 written, the file ends after it.
                do {
                    try file.truncate(to: truncated.lowerBound * page)
                    try file.write(pattern(page, seed: 99), at: 40 * page)
                } catch {
                    problems.add("the last truncate: \(error)")
                }
            }
        }

        #expect(problems.all.isEmpty, "\(problems.all)")
        #expect(punches.value >= rounds)
        #expect(truncates.value >= rounds)
        #expect(file.size == 41 * page)
        let last = (0..<storers).flatMap { bytes(raceValue($0, rounds)) }
        for index in stored {
            let expected = last + zeros(page - last.count)
            #expect(try file.read(count: page, at: index * page) == expected, "page \(index)")
            #expect(loaded(mapping, at: index * page, count: page) == expected, "page \(index)")
        }
        for index in punched {
            let contents = try file.read(count: page, at: index * page)
            #expect(contents[(storers * 8)...].allSatisfy { $0 == 0 }, "page \(index)")
            for storer in 0..<storers {
                let word = Array(contents[storer * 8..<storer * 8 + 8])
                #expect(word == zeros(8) || word == bytes(raceValue(storer, rounds)))
            }
        }
        #expect(try file.read(count: 8 * page, at: 32 * page) == zeros(8 * page))
        #expect(try file.read(count: page, at: 40 * page) == pattern(page, seed: 99))
        // The old mapping shows the regrown range as the file has it, and faults past the end.
        try #require(kernelLoad(mapping.baseAddress + 40 * page) == pattern(page, seed: 99)[0])
        #expect(loaded(mapping, at: 32 * page, count: 9 * page) == zeros(8 * page) + pattern(page, seed: 99))
        #expect(kernelLoad(mapping.baseAddress + 41 * page) == nil)

        // No block was given twice or lost: the file's blocks are what the allocator handed out
        // (extent leaves aside), and check agrees.
        let blocks = try file.frames(offset: 0, count: 41 * page).compactMap { $0 }
        #expect(Set(blocks).count == blocks.count)
        let used = fs.statistics().usedBlocks - baseline.usedBlocks
        #expect((blocks.count...blocks.count + 2).contains(used), "\(used) blocks used, \(blocks.count) in the file")
        #expect(fs.statistics().faults.allocating >= stored.count)
        #expect(try fs.check().isClean)

        mapping.unmap()
        file.close()
        let again = try t.remount()
        defer { try? again.unmount() }
        #expect(try again.check().isClean)
        let reopened = try again.open("/race")
        defer { reopened.close() }
        for index in stored { #expect(try reopened.read(count: 16, at: index * page) == last, "page \(index)") }
    }
}

/// Writes a power-failure image of `device` (nothing in flight kept) and returns `count` bytes at
/// `offset` of it.
private func imageBytes(_ device: PMemDevice, at offset: Int, count: Int) throws -> [UInt8] {
    let path = TemporaryDevice.uniquePath("fimage")
    defer { unlink(path) }
    try device.powerFail(writingImageTo: path, keeping: .none)
    let image = try PMemDevice.open(path: path)
    defer { image.close() }
    return try image.read(count: count, at: offset)
}

/// Mounts a power-failure image of `device` (nothing in flight kept), as a reboot after a crash
/// now would, and runs `body` on it.
private func withImage(of device: PMemDevice, _ body: (DAXFileSystem) throws -> Void) throws {
    let path = TemporaryDevice.uniquePath("fimage")
    defer { unlink(path) }
    try device.powerFail(writingImageTo: path, keeping: .none)
    let image = try PMemDevice.open(path: path)
    defer { image.close() }
    let fs = try DAXFileSystem.mount(image)
    defer { try? fs.unmount() }
    try body(fs)
}
