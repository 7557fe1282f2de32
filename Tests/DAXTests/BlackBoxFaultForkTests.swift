// Black-box tests: faults, mappings, sync and forking as a user combines them. Written
// only from the public API and the user docs (docs/faults.md, docs/forking.md, docs/pinning.md,
// README.md): `import DAX` and the public API alone.
//
// Readings of what the docs leave open: calls on a closed DAXFile or on an unmounted file system
// are only checked to throw some DAXError (no code is documented); a truncate or punch inside a
// shared page with no block left may either copy (.noSpace) or manage without a block; a
// .readWrite map of a file opened .readOnly is read as .permissionDenied; a zero-frame pin (a read
// pin of a hole) is read as holding up no clone, as it holds up no truncate.
import DAX
import Dispatch
import Foundation
import Synchronization
import Testing

// MARK: - Helpers of this file only

private let pageSize = PMemDevice.pageSize
private let zeros = [UInt8](repeating: 0, count: PMemDevice.pageSize)

private func ffPattern(_ count: Int, seed: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ ($0 >> 8) &+ seed &* 41 &+ 9) | 1 }
}

private func ffBytes(_ mapping: DAXMapping, at offset: Int, count: Int) -> [UInt8] {
    Array(UnsafeRawBufferPointer(start: mapping.baseAddress + offset, count: count))
}

private func ffLoad(_ mapping: DAXMapping, _ offset: Int) -> UInt8 {
    mapping.baseAddress.load(fromByteOffset: offset, as: UInt8.self)
}

private func ffStore(_ mapping: DAXMapping, _ offset: Int, _ value: UInt8) {
    mapping.baseAddress.storeBytes(of: value, toByteOffset: offset, as: UInt8.self)
}

private func ffRequireFaults(_ fs: DAXFileSystem, sourceLocation: SourceLocation = #_sourceLocation) throws {
    try #require(fs.faultHandling == .userfaultfd, "needs the userfaultfd handler", sourceLocation: sourceLocation)
}

private func ffFaults(_ fs: DAXFileSystem) -> FaultCounts { fs.statistics().faults }

/// The difference of two fault counts, as (zeroPage, allocating, copyOnWrite, sigbus).
private func ffDelta(_ after: FaultCounts, _ before: FaultCounts) -> [Int] {
    [
        after.zeroPage - before.zeroPage, after.allocating - before.allocating,
        after.copyOnWrite - before.copyOnWrite, after.sigbus - before.sigbus,
    ]
}

/// In a child process: a fresh device (unlinked at once) with a formatted file system and the
/// fault handler. Exits 2 when the device cannot be made, 3 when the file system cannot.
private func ffChildFileSystem(_ name: String, size: Int = 8 << 20) -> (PMemDevice, DAXFileSystem) {
    let path = "/dev/shm/bbff-\(name)-\(getpid())"
    guard let device = try? PMemDevice.create(path: path, size: size) else { exit(2) }
    unlink(path)
    guard let fs = try? DAXFileSystem.format(device), fs.faultHandling == .userfaultfd else { exit(3) }
    return (device, fs)
}

nonisolated(unsafe) private var ffSigbusFS: DAXFileSystem?
nonisolated(unsafe) private var ffSigbusBefore = 0

// MARK: - Faults through several mappings

@Suite("BlackBox: faults, mappings, sync and forking combined")
struct BlackBoxFaultForkTests {
    @Test("zero-page faults are counted per mapping and page; one store allocates once for all mappings")
    func zeroPageCountsPerMapping() throws {
        let s = try BlackBoxRig("ffzero")
        try ffRequireFaults(s.fs)
        let file = try s.fs.create("/f")
        defer { file.close() }
        try file.truncate(to: 2 * pageSize, ifBusy: .fail)
        let reader = try s.fs.open("/f", access: .readOnly)
        defer { reader.close() }
        let m1 = try file.map(count: 2 * pageSize)
        let m2 = try file.map(count: 2 * pageSize)
        let ro = try reader.map(count: 2 * pageSize, access: .readOnly)
        defer {
            m1.unmap()
            m2.unmap()
            ro.unmap()
        }
        let free = s.fs.statistics().freeBlocks
        let f0 = ffFaults(s.fs)
        #expect(ffLoad(m1, 10) == 0)
        #expect(ffLoad(m2, 10) == 0)
        #expect(ffLoad(ro, 10) == 0)
        let f1 = ffFaults(s.fs)
        #expect(ffDelta(f1, f0) == [3, 0, 0, 0], "one zero-page fault per mapping that loaded the hole")
        // Loads of the same page again, anywhere in it: no fault.
        #expect(ffBytes(m1, at: 0, count: pageSize) == zeros)
        #expect(ffBytes(m2, at: 0, count: pageSize) == zeros)
        #expect(ffBytes(ro, at: 0, count: pageSize) == zeros)
        #expect(ffFaults(s.fs) == f1)
        #expect(s.fs.statistics().freeBlocks == free, "a load allocated")
        #expect(try file.frames(offset: 0, count: 2 * pageSize) == [nil, nil])

        ffStore(m2, 10, 0x3C)
        let f2 = ffFaults(s.fs)
        #expect(ffDelta(f2, f1) == [0, 1, 0, 0], "a store over a zero page is one allocating fault")
        #expect(s.fs.statistics().freeBlocks == free - 1)
        #expect(ffLoad(m1, 10) == 0x3C, "the other writable mapping kept its zeroed page")
        #expect(ffLoad(ro, 10) == 0x3C, "the read-only mapping kept the zero page")
        ffStore(m1, 11, 0x3D)
        #expect(ffLoad(ro, 11) == 0x3D)
        #expect(ffFaults(s.fs) == f2, "the block is mapped in every mapping: no further fault")
        let m3 = try file.map(count: 2 * pageSize)
        defer { m3.unmap() }
        #expect(ffLoad(m3, 10) == 0x3C && ffLoad(m3, 11) == 0x3D)
        #expect(ffFaults(s.fs) == f2, "a new mapping shows the block without a fault")
        let frames = try file.frames(offset: 0, count: 2 * pageSize)
        #expect(frames[0] != nil && frames[1] == nil)
        let state = s.fs.pages.state(of: frames[0]!)
        #expect(state.mapCount == 4, "\(state)")
        // Page 1 stays a hole for all of them.
        #expect(ffLoad(ro, pageSize) == 0 && ffLoad(m3, pageSize) == 0)
        #expect(ffDelta(ffFaults(s.fs), f2) == [2, 0, 0, 0])
        #expect(s.fs.statistics().freeBlocks == free - 1)
        s.expectClean("after faults through four mappings")
    }

    @Test("a pin of a hole one mapping shows as a zero page: the block appears in that mapping too")
    func pinOfZeroPageHole() throws {
        let s = try BlackBoxRig("ffpinzero")
        try ffRequireFaults(s.fs)
        let file = try s.fs.create("/f")
        defer { file.close() }
        try file.truncate(to: pageSize, ifBusy: .fail)
        let m1 = try file.map(count: pageSize)
        let m2 = try file.map(count: pageSize)
        defer {
            m1.unmap()
            m2.unmap()
        }
        #expect(ffLoad(m1, 0) == 0)
        let free = s.fs.statistics().freeBlocks
        let engine = DMAEngine(device: s.device)
        let region = engine.register(try m2.pin(offset: 0, count: pageSize, access: .readWrite))
        #expect(s.fs.statistics().freeBlocks == free - 1)
        #expect(try file.frames(offset: 0, count: pageSize) == [region.frames[0]])
        try engine.write([0xD1, 0xD2], to: region, at: 100)
        #expect(ffBytes(m1, at: 100, count: 2) == [0xD1, 0xD2], "the zero page hid the pinned block")
        #expect(ffBytes(m2, at: 100, count: 2) == [0xD1, 0xD2])
        #expect(try file.read(count: 2, at: 100) == [0xD1, 0xD2])
        engine.deregister(region)
        s.expectPinsBalance("after deregister")
        s.expectClean("after a pin of a zero-page hole")
    }

    @Test("punch under three mappings: each reads zeros, then one store gives one block seen by all")
    func punchUnderSeveralMappings() throws {
        let s = try BlackBoxRig("ffpunch")
        try ffRequireFaults(s.fs)
        let data = try s.make("/f", ffPattern(3 * pageSize, seed: 1))
        let file = try s.fs.open("/f")
        let reader = try s.fs.open("/f", access: .readOnly)
        defer {
            file.close()
            reader.close()
        }
        let m1 = try file.map(count: 3 * pageSize)
        let m2 = try file.map(count: 3 * pageSize)
        let ro = try reader.map(count: 3 * pageSize, access: .readOnly)
        defer {
            m1.unmap()
            m2.unmap()
            ro.unmap()
        }
        for m in [m1, m2, ro] { #expect(ffBytes(m, at: 0, count: 3 * pageSize) == data) }
        let free = s.fs.statistics().freeBlocks
        try file.punchHole(offset: pageSize, count: pageSize, ifBusy: .fail)
        #expect(s.fs.statistics().freeBlocks == free + 1)
        let f0 = ffFaults(s.fs)
        for m in [m1, m2, ro] {
            #expect(ffBytes(m, at: pageSize, count: pageSize) == zeros)
            #expect(ffBytes(m, at: 0, count: pageSize) == Array(data[0..<pageSize]))
            #expect(ffBytes(m, at: 2 * pageSize, count: pageSize) == Array(data[(2 * pageSize)..<data.count]))
        }
        #expect(ffDelta(ffFaults(s.fs), f0) == [3, 0, 0, 0], "a punched page is a hole: zero-page faults")
        #expect(s.fs.statistics().freeBlocks == free + 1)
        let f1 = ffFaults(s.fs)
        ffStore(m2, pageSize + 9, 0x99)
        #expect(ffDelta(ffFaults(s.fs), f1) == [0, 1, 0, 0])
        #expect(s.fs.statistics().freeBlocks == free)
        #expect(ffLoad(m1, pageSize + 9) == 0x99 && ffLoad(ro, pageSize + 9) == 0x99)
        var expected = zeros
        expected[9] = 0x99
        #expect(try file.read(count: pageSize, at: pageSize) == expected)
        s.expectClean("after punch under mappings")
    }

    // MARK: - End of file

    @Test("a mapping made past the end of the file shows the pages once the file grows over them")
    func mapPastEndThenGrow() throws {
        let s = try BlackBoxRig("ffpastend")
        try ffRequireFaults(s.fs)
        let data = try s.make("/f", ffPattern(pageSize, seed: 2))
        let file = try s.fs.open("/f")
        defer { file.close() }
        let m = try file.map(count: 4 * pageSize)
        let reader = try s.fs.open("/f", access: .readOnly)
        defer { reader.close() }
        let ro = try reader.map(count: 4 * pageSize, access: .readOnly)
        defer {
            m.unmap()
            ro.unmap()
        }
        #expect(m.count == 4 * pageSize)
        #expect(ffBytes(m, at: 0, count: pageSize) == data)
        #expect(ffBytes(ro, at: 0, count: pageSize) == data)
        // The kernel's view of a page past the end: EFAULT, not a byte.
        #expect(kernelLoad(m.baseAddress + pageSize) == nil, "a page past the end gave a byte")
        #expect(kernelLoad(ro.baseAddress + 3 * pageSize) == nil, "a page past the end gave a byte")
        // Grow by truncate: pages 1 and 2 come back as holes, page 3 stays past the end.
        try file.truncate(to: 3 * pageSize, ifBusy: .fail)
        let f0 = ffFaults(s.fs)
        #expect(ffBytes(m, at: pageSize, count: 2 * pageSize) == zeros + zeros)
        #expect(ffBytes(ro, at: pageSize, count: 2 * pageSize) == zeros + zeros)
        #expect(ffDelta(ffFaults(s.fs), f0) == [4, 0, 0, 0])
        #expect(kernelLoad(m.baseAddress + 3 * pageSize) == nil, "page 3 is still past the end")
        #expect(try file.frames(offset: pageSize, count: 2 * pageSize) == [nil, nil])
        // Grow by write(): page 3 shows the bytes written.
        let tail = ffPattern(100, seed: 3)
        try file.write(tail, at: 3 * pageSize + 20)
        #expect(ffBytes(m, at: 3 * pageSize + 20, count: 100) == tail)
        #expect(ffBytes(ro, at: 3 * pageSize + 20, count: 100) == tail)
        #expect(ffBytes(m, at: 3 * pageSize, count: 20) == [UInt8](repeating: 0, count: 20))
        // A store to page 2 allocates, and the read-only mapping sees it.
        let f1 = ffFaults(s.fs)
        ffStore(m, 2 * pageSize + 1, 0x21)
        #expect(ffDelta(ffFaults(s.fs), f1) == [0, 1, 0, 0])
        #expect(ffLoad(ro, 2 * pageSize + 1) == 0x21)
        #expect(try file.read(count: 1, at: 2 * pageSize + 1) == [0x21])
        s.expectClean("after growing under a mapping past the end")
    }

    @Test(
        "a byte stored past the end inside the last page reads zeros when the file grows, by each growth path",
        arguments: ["truncate", "write", "allocate"])
    func tailOfLastPageAfterGrowth(_ how: String) throws {
        let s = try BlackBoxRig("fftail")
        try ffRequireFaults(s.fs)
        let data = try s.make("/f", ffPattern(2 * pageSize, seed: 4))
        let file = try s.fs.open("/f")
        defer { file.close() }
        let m = try file.map(count: 2 * pageSize)
        defer { m.unmap() }
        try file.truncate(to: pageSize + 100, ifBusy: .fail)
        #expect(file.size == pageSize + 100)
        #expect(ffBytes(m, at: pageSize, count: 100) == Array(data[pageSize..<pageSize + 100]))
        // Inside the last partial page but past the end: the kernel allows the store.
        ffStore(m, pageSize + 200, 0xEE)
        ffStore(m, pageSize + 4000, 0xEF)
        #expect(try file.read(count: 2 * pageSize, at: 0) == Array(data[0..<pageSize + 100]))
        switch how {
        case "truncate": try file.truncate(to: 2 * pageSize, ifBusy: .fail)
        case "write": try file.write([0x42], at: 2 * pageSize - 1)
        default: try file.allocate(offset: pageSize, count: pageSize)
        }
        #expect(file.size == 2 * pageSize)
        let grown = try file.read(count: pageSize - 100, at: pageSize + 100)
        #expect(grown[100] == 0 && grown[3900] == 0, "the stale tail came back after \(how)")
        #expect(ffLoad(m, pageSize + 200) == 0 && ffLoad(m, pageSize + 4000) == 0, "through the mapping, \(how)")
        #expect(Array(grown[0..<(pageSize - 101)]).allSatisfy { $0 == 0 })
        #expect(try file.read(count: pageSize + 100, at: 0) == Array(data[0..<pageSize + 100]))
        s.expectClean("after growth by \(how)")
    }

    @Test("a load past the end of a fresh mapping made past the end of the file is SIGBUS (child process)")
    func loadPastEndOfFreshMappingIsSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let (_, fs) = ffChildFileSystem("freshpastend")
            do {
                let file = try fs.create("/f")
                try file.write([1, 2, 3], at: 0)
                let m = try file.map(count: 3 * pageSize)
                guard ffLoad(m, 1) == 2, ffLoad(m, pageSize - 1) == 0 else { exit(5) }
                _ = ffLoad(m, 2 * pageSize + 5)
                exit(0)
            } catch { exit(4) }
        }
    }

    @Test("a load past the end through a read-only mapping is SIGBUS and counted in faults.sigbus (child process)")
    func readOnlyLoadPastEndCounted() async {
        await #expect(processExitsWith: .exitCode(41)) {
            let (_, fs) = ffChildFileSystem("ropastend")
            do {
                let file = try fs.create("/f")
                try file.write(ffPattern(pageSize, seed: 5), at: 0)
                let reader = try fs.open("/f", access: .readOnly)
                let m = try reader.map(count: 2 * pageSize, access: .readOnly)
                ffSigbusFS = fs
                ffSigbusBefore = fs.statistics().faults.sigbus
                signal(SIGBUS) { _ in
                    guard let fs = ffSigbusFS else { _exit(39) }
                    _exit(Int32(40 + min(max(fs.statistics().faults.sigbus - ffSigbusBefore, 0), 9)))
                }
                _ = ffLoad(m, pageSize + 8)
                exit(0)
            } catch { exit(4) }
        }
    }

    @Test(
        "a clone truncated down: a store past its new end through its mapping is SIGBUS, the source untouched (child)")
    func storePastEndOfTruncatedClone() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let (_, fs) = ffChildFileSystem("clonetrunc")
            do {
                let data = ffPattern(2 * pageSize, seed: 6)
                let src = try fs.create("/s")
                try src.write(data, at: 0)
                try fs.clone("/s", to: "/c")
                let clone = try fs.open("/c")
                let ms = try src.map(count: 2 * pageSize)
                let mc = try clone.map(count: 2 * pageSize)
                guard ffBytes(mc, at: 0, count: 2 * pageSize) == data else { exit(5) }
                try clone.truncate(to: pageSize, ifBusy: .fail)
                guard ffBytes(ms, at: 0, count: 2 * pageSize) == data else { exit(6) }
                guard try src.read(count: 2 * pageSize, at: 0) == data else { exit(7) }
                guard ffBytes(mc, at: 0, count: pageSize) == Array(data[0..<pageSize]) else { exit(8) }
                ffStore(mc, pageSize + 3, 0x01)
                exit(0)
            } catch { exit(4) }
        }
    }

    @Test("a store to a shared page through a read-only mapping is SIGSEGV, no copy (child process)")
    func storeToSharedPageThroughReadOnlyMapping() async {
        await #expect(processExitsWith: .signal(SIGSEGV)) {
            let (_, fs) = ffChildFileSystem("roshared")
            do {
                let src = try fs.create("/s")
                try src.write([UInt8](repeating: 0x33, count: pageSize), at: 0)
                try fs.clone("/s", to: "/c")
                let reader = try fs.open("/c", access: .readOnly)
                let m = try reader.map(count: pageSize, access: .readOnly)
                guard ffLoad(m, 0) == 0x33 else { exit(5) }
                ffStore(m, 0, 0x44)
                exit(0)
            } catch { exit(4) }
        }
    }

    // MARK: - sync and dirty tracking

    @Test("sync flushes only pages stored to through a mapping; a sync with no store flushes nothing")
    func syncFlushesOnlyDirtyPages() throws {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        options.powerFailureEmulation = .adr
        let s = try BlackBoxRig("ffsync", options: options)
        try ffRequireFaults(s.fs)
        let data = try s.make("/f", ffPattern(4 * pageSize, seed: 7))
        let file = try s.fs.open("/f")
        defer { file.close() }
        let m = try file.map(count: 4 * pageSize)
        defer { m.unmap() }
        try file.sync()
        let frames = try file.frames(offset: 0, count: 4 * pageSize).map { try #require($0) }
        let pages = frames.map { Int($0.rawValue) * pageSize..<(Int($0.rawValue) + 1) * pageSize }
        func unpersisted(_ page: Int) -> Bool { s.device.unpersistedRanges().contains { $0.overlaps(pages[page]) } }
        #expect((0..<4).allSatisfy { !unpersisted($0) }, "\(s.device.unpersistedRanges())")

        // A store by the device itself to page 1 (not through the mapping), left unflushed.
        s.device.fill(offset: pages[1].lowerBound + 64, count: 64, value: 0xAB, flags: .noFlush)
        #expect(unpersisted(1))
        #expect(ffLoad(m, pageSize + 64) == 0xAB, "zero copy")
        try file.sync()
        #expect(unpersisted(1), "a sync with no store through a mapping flushed page 1")

        // One store through the mapping to page 2: the next sync flushes page 2, not page 1.
        ffStore(m, 2 * pageSize + 5, ~data[2 * pageSize + 5])
        #expect(unpersisted(2))
        try file.sync()
        #expect(!unpersisted(2), "sync left the mapping's store unpersisted")
        #expect(unpersisted(1), "sync flushed a page no mapping stored to")
        // Stores after that sync fault (write-protect), land in the block and are flushed again.
        let free = s.fs.statistics().freeBlocks
        let f0 = ffFaults(s.fs)
        ffStore(m, 2 * pageSize + 6, 0x66)
        ffStore(m, 3 * pageSize + 6, 0x67)
        #expect(try file.read(count: 1, at: 2 * pageSize + 6) == [0x66])
        #expect(try s.device.read(count: 1, at: pages[3].lowerBound + 6) == [0x67])
        #expect(s.fs.statistics().freeBlocks == free)
        let f1 = ffFaults(s.fs)
        #expect(f1.allocating == f0.allocating && f1.copyOnWrite == f0.copyOnWrite && f1.sigbus == f0.sigbus)
        try file.sync()
        #expect(!unpersisted(2) && !unpersisted(3))
        #expect(unpersisted(1))
        // A new mapping's pages start dirty: its first sync flushes page 1 too.
        let fresh = try file.map(count: 4 * pageSize)
        defer { fresh.unmap() }
        try file.sync()
        #expect(!unpersisted(1), "a fresh mapping's pages start dirty, yet sync did not flush page 1")
        s.expectClean("after syncs")
    }

    @Test("sync of a file with shared pages never lets a later store reach the other file")
    func syncKeepsSharedPagesProtected() throws {
        let s = try BlackBoxRig("ffsyncshare")
        try ffRequireFaults(s.fs)
        let data = try s.make("/s", ffPattern(2 * pageSize, seed: 8))
        let src = try s.fs.open("/s")
        defer { src.close() }
        let m = try src.map(count: 2 * pageSize)
        defer { m.unmap() }
        ffStore(m, 1, 0x11)  // dirty, then shared by the clone
        var current = data
        current[1] = 0x11
        try s.fs.clone("/s", to: "/c")
        #expect(s.fs.statistics().sharedBlocks == 2)
        try src.sync()
        let f0 = ffFaults(s.fs)
        ffStore(m, 2, 0x22)
        current[2] = 0x22
        #expect(ffDelta(ffFaults(s.fs), f0) == [0, 0, 1, 0], "a store after sync to a shared page must copy")
        #expect(try s.contents("/c") == Array(data[0..<1]) + [0x11] + Array(data[2..<data.count]))
        #expect(s.fs.statistics().sharedBlocks == 1)
        // Sync again, store again to the page now owned alone: no copy.
        try src.sync()
        let f1 = ffFaults(s.fs)
        ffStore(m, 3, 0x33)
        current[3] = 0x33
        #expect(ffFaults(s.fs).copyOnWrite == f1.copyOnWrite, "a page owned alone was copied")
        // The other page is still shared: after two syncs a store still copies.
        ffStore(m, pageSize + 4, 0x44)
        current[pageSize + 4] = 0x44
        #expect(ffFaults(s.fs).copyOnWrite == f1.copyOnWrite + 1)
        #expect(s.fs.statistics().sharedBlocks == 0)
        #expect(try src.read(count: 2 * pageSize, at: 0) == current)
        var cloneExpected = data
        cloneExpected[1] = 0x11
        #expect(try s.contents("/c") == cloneExpected)

        // Dedup: the destination's pages become shared; sync the destination, then store there.
        let twin = try s.make("/t", cloneExpected)
        _ = twin
        let t = try s.fs.open("/t")
        defer { t.close() }
        let mt = try t.map(count: 2 * pageSize)
        defer { mt.unmap() }
        ffStore(mt, 0, cloneExpected[0])  // dirty (same byte)
        #expect(try s.fs.deduplicate("/c", offset: 0, "/t", offset: 0, count: 2 * pageSize) == 2 * pageSize)
        #expect(s.fs.statistics().sharedBlocks == 2)
        try t.sync()
        let f2 = ffFaults(s.fs)
        ffStore(mt, pageSize + 7, 0x77)
        #expect(ffFaults(s.fs).copyOnWrite == f2.copyOnWrite + 1)
        #expect(try s.contents("/c") == cloneExpected, "a store to the dedup destination reached the source")
        var tExpected = cloneExpected
        tExpected[pageSize + 7] = 0x77
        #expect(try t.read(count: 2 * pageSize, at: 0) == tExpected)
        s.expectClean("after syncs of shared pages")
    }

    // MARK: - Forking of mapped, sparse and pinned files

    @Test("clone of a sparse, mapped file: holes fault independently, shared pages copy, every block returns")
    func cloneOfSparseMappedFile() throws {
        let s = try BlackBoxRig("ffsparse")
        try ffRequireFaults(s.fs)
        try s.make("/keep", [])
        let baseline = s.fs.statistics().freeBlocks
        let src = try s.fs.create("/s")
        let a = ffPattern(pageSize, seed: 9)
        let b = ffPattern(pageSize, seed: 10)
        try src.write(a, at: 0)
        try src.write(b, at: 2 * pageSize)
        try src.truncate(to: 4 * pageSize, ifBusy: .fail)  // pages 1 and 3 are holes
        let ms = try src.map(count: 4 * pageSize)
        #expect(ffLoad(ms, pageSize) == 0)  // page 1 shown as a zero page in the source's mapping
        let beforeClone = s.fs.statistics()
        try s.fs.clone("/s", to: "/c")
        let afterClone = s.fs.statistics()
        #expect(afterClone.sharedBlocks == 2)
        #expect(afterClone.freeBlocks == beforeClone.freeBlocks, "a clone took data blocks")
        let clone = try s.fs.open("/c")
        #expect(clone.size == 4 * pageSize)
        let srcFrames = try src.frames(offset: 0, count: 4 * pageSize)
        #expect(try clone.frames(offset: 0, count: 4 * pageSize) == srcFrames)
        #expect(srcFrames[1] == nil && srcFrames[3] == nil)
        let mc = try clone.map(count: 4 * pageSize)
        #expect(ffLoad(mc, pageSize) == 0)

        // A store to the source's hole allocates for the source only.
        let f0 = ffFaults(s.fs)
        ffStore(ms, pageSize + 1, 0x51)
        #expect(ffDelta(ffFaults(s.fs), f0) == [0, 1, 0, 0])
        #expect(ffLoad(mc, pageSize + 1) == 0, "the source's new block showed in the clone's mapping")
        #expect(try clone.frames(offset: pageSize, count: pageSize) == [nil])
        // A store to the clone's hole allocates for the clone only.
        ffStore(mc, 3 * pageSize + 2, 0x52)
        #expect(ffDelta(ffFaults(s.fs), f0) == [0, 2, 0, 0])
        #expect(ffLoad(ms, 3 * pageSize + 2) == 0)
        #expect(try src.frames(offset: 3 * pageSize, count: pageSize) == [nil])
        // A store to a shared page copies for the clone only.
        ffStore(mc, 5, 0x53)
        #expect(ffDelta(ffFaults(s.fs), f0) == [1, 2, 1, 0], "one zero page: the source's load of its page 3")
        #expect(ffLoad(ms, 5) == a[5])
        #expect(s.fs.statistics().sharedBlocks == 1)
        // write() into the source's shared page 2 copies for the source only.
        try src.write([0x54], at: 2 * pageSize + 6)
        #expect(ffLoad(mc, 2 * pageSize + 6) == b[6])
        #expect(ffLoad(ms, 2 * pageSize + 6) == 0x54)
        #expect(s.fs.statistics().sharedBlocks == 0)
        var srcExpected = a + zeros + b + zeros
        srcExpected[pageSize + 1] = 0x51
        srcExpected[2 * pageSize + 6] = 0x54
        var cloneExpected = a + zeros + b + zeros
        cloneExpected[3 * pageSize + 2] = 0x52
        cloneExpected[5] = 0x53
        #expect(try src.read(count: 4 * pageSize, at: 0) == srcExpected)
        #expect(try clone.read(count: 4 * pageSize, at: 0) == cloneExpected)
        s.expectClean("after faults on both sides")

        ms.unmap()
        mc.unmap()
        src.close()
        clone.close()
        try s.fs.remove("/s")
        try s.fs.remove("/c")
        let end = s.fs.statistics()
        #expect(end.freeBlocks == baseline, "blocks leaked or freed twice")
        #expect(end.sharedBlocks == 0 && end.quarantinedBlocks == 0)
        s.expectClean("after removing both")
    }

    @Test("a DMA-pinned page through clone .copy and .unsafeShare, then truncates under each busy policy")
    func pinnedCloneThenTruncates() throws {
        let s = try BlackBoxRig("ffpintrunc")
        try s.make("/keep", [])
        let baseline = s.fs.statistics().freeBlocks
        let data = try s.make("/s", ffPattern(3 * pageSize, seed: 11))
        let src = try s.fs.open("/s")
        let m = try src.map(count: 3 * pageSize)
        let engine = DMAEngine(device: s.device)
        let region = engine.register(try m.pin(offset: pageSize, count: pageSize, access: .readWrite))
        let pinned = region.frames[0]
        #expect(s.fs.statistics().pinnedPages == 1)

        // .copy: the clone gets its own copy of the pinned page.
        try s.fs.clone("/s", to: "/c", ifPinned: .copy)
        #expect(s.fs.statistics().sharedBlocks == 2)
        #expect(s.fs.statistics().freeBlocks == baseline - 4, "3 blocks of the source, 1 copy")
        try engine.write([0xC0], to: region, at: 0)
        var srcData = data
        srcData[pageSize] = 0xC0
        #expect(try s.contents("/c") == data)
        // The clone holds nothing pinned: its truncate with .fail succeeds.
        let clone = try s.fs.open("/c")
        try clone.truncate(to: 0, ifBusy: .fail)
        clone.close()
        #expect(s.fs.statistics().sharedBlocks == 0)
        #expect(s.fs.statistics().freeBlocks == baseline - 3)
        #expect(try s.contents("/s") == srcData)
        // The source's truncate with .fail is .busy and changes nothing.
        let frames = try src.frames(offset: 0, count: 3 * pageSize)
        expectDAXError(.busy, "truncate .fail of the pinned source") { try src.truncate(to: 0, ifBusy: .fail) }
        expectDAXError(.timedOut, "truncate .wait of the pinned source") {
            try src.truncate(to: pageSize, ifBusy: .wait(timeout: .milliseconds(30)))
        }
        #expect(src.size == 3 * pageSize)
        #expect(try src.frames(offset: 0, count: 3 * pageSize) == frames)
        #expect(ffBytes(m, at: 0, count: 3 * pageSize) == srcData)

        // .unsafeShare: the clone shares the pinned frame.
        try s.fs.clone("/s", to: "/u", ifPinned: .unsafeShare)
        #expect(s.fs.statistics().sharedBlocks == 3)
        #expect(try s.frames("/u")[1] == pinned)
        // Truncate of the source with .deferFree: the pinned block is still /u's, so not freed.
        try src.truncate(to: 0, ifBusy: .deferFree)
        var stats = s.fs.statistics()
        #expect(src.size == 0)
        #expect(stats.sharedBlocks == 0)
        #expect(stats.quarantinedBlocks == 0, "a block another file owns was quarantined: \(stats)")
        #expect(stats.freeBlocks == baseline - 3)
        #expect(try s.contents("/u") == srcData)
        try engine.write([0xC1], to: region, at: 1)
        #expect(try s.contents("/u")[pageSize + 1] == 0xC1, "the device writes the frame /u owns")
        // Removing /u frees the pinned block: quarantined until the device lets go.
        try s.fs.remove("/u")
        stats = s.fs.statistics()
        #expect(stats.quarantinedBlocks == 1, "\(stats)")
        #expect(stats.freeBlocks == baseline - 1, "\(stats)")
        #expect(s.fs.pages.state(of: pinned).isQuarantined)
        s.expectClean("with a quarantined block")
        engine.deregister(region)
        stats = s.fs.statistics()
        #expect(stats.quarantinedBlocks == 0)
        #expect(stats.freeBlocks == baseline, "\(stats)")
        m.unmap()
        src.close()
        try s.fs.remove("/s")
        try s.fs.remove("/c")
        #expect(s.fs.statistics().freeBlocks == baseline)
        s.expectPinsBalance("after deregister")
        s.expectClean("after all went")
    }

    @Test("migrate of a mapped file: a shared page stays (not busy), a pinned one is busy, the rest move")
    func migrateMixedPages() throws {
        let s = try BlackBoxRig("ffmigrate")
        try ffRequireFaults(s.fs)
        let data = try s.make("/s", ffPattern(4 * pageSize, seed: 12))
        try s.fs.clone("/s", to: "/c")
        let src = try s.fs.open("/s")
        defer { src.close() }
        try src.write([0x01], at: pageSize)  // page 1 owned alone now
        try src.punchHole(offset: 3 * pageSize, count: pageSize, ifBusy: .fail)  // page 3 a hole
        let m = try src.map(count: 4 * pageSize)
        defer { m.unmap() }
        let engine = DMAEngine(device: s.device)
        let region = engine.register(try m.pin(offset: 2 * pageSize, count: pageSize, access: .readWrite))
        let before = try src.frames(offset: 0, count: 4 * pageSize)
        #expect(before[2] == region.frames[0])
        #expect(s.fs.statistics().sharedBlocks == 1, "page 0 alone is still shared")
        let result = try src.migrate(offset: 0, count: 4 * pageSize)
        #expect(result.migrated == 1, "\(result)")
        #expect(result.busy == [2], "\(result)")
        let after = try src.frames(offset: 0, count: 4 * pageSize)
        #expect(after[0] == before[0], "a shared page moved")
        #expect(after[1] != before[1] && after[1] != nil)
        #expect(after[2] == before[2])
        #expect(after[3] == nil)
        #expect(try s.frames("/c")[0] == before[0])
        var expected = data
        expected[pageSize] = 0x01
        expected.replaceSubrange(3 * pageSize..<4 * pageSize, with: zeros)
        #expect(try src.read(count: 4 * pageSize, at: 0) == expected)
        #expect(ffBytes(m, at: 0, count: 4 * pageSize) == expected)
        // Stores through the mapping reach the moved page's new frame; the device writes the pinned one.
        ffStore(m, pageSize + 2, 0x02)
        #expect(try s.device.read(count: 1, at: Int(after[1]!.rawValue) * pageSize + 2) == [0x02])
        try engine.write([0x03], to: region, at: 3)
        #expect(try src.read(count: 1, at: 2 * pageSize + 3) == [0x03])
        #expect(try s.contents("/c") == data, "the clone changed")
        engine.deregister(region)
        s.expectPinsBalance("after deregister")
        s.expectClean("after migrate of mixed pages")
    }

    @Test("deduplicate: partial last pages, holes, zero blocks and a repeat")
    func dedupEdges() throws {
        let s = try BlackBoxRig("ffdedup")
        let body = ffPattern(pageSize + 100, seed: 13)
        try s.make("/a", body)
        try s.make("/b", body)
        try s.make("/longer", body + [0x5A])
        let free = s.fs.statistics().freeBlocks
        // Both ranges end at the end of their files: the partial page is shared, counted to the end.
        #expect(try s.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: pageSize + 100) == pageSize + 100)
        #expect(try s.frames("/b") == s.frames("/a"))
        #expect(s.fs.statistics().sharedBlocks == 2)
        #expect(s.fs.statistics().freeBlocks == free + 2)
        // Repeat: already shared pages are counted again, nothing changes.
        #expect(try s.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: pageSize + 100) == pageSize + 100)
        #expect(s.fs.statistics().sharedBlocks == 2 && s.fs.statistics().freeBlocks == free + 2)
        // The destination range does not end at its file's end: only whole pages.
        let longerFrames = try s.frames("/longer")
        #expect(try s.fs.deduplicate("/a", offset: 0, "/longer", offset: 0, count: pageSize + 100) == pageSize)
        let after = try s.frames("/longer")
        #expect(after[0] == (try s.frames("/a"))[0] && after[1] == longerFrames[1])
        #expect(try s.contents("/longer") == body + [0x5A])
        #expect(try s.contents("/b") == body)

        // A block of zeros against a hole: left alone both ways, nothing counted.
        try s.make("/z", zeros)
        let hole = try s.fs.create("/h")
        try hole.truncate(to: pageSize, ifBusy: .fail)
        hole.close()
        let freeZ = s.fs.statistics().freeBlocks
        #expect(try s.fs.deduplicate("/z", offset: 0, "/h", offset: 0, count: pageSize) == 0)
        #expect(try s.fs.deduplicate("/h", offset: 0, "/z", offset: 0, count: pageSize) == 0)
        #expect(try s.frames("/h") == [nil])
        #expect(try s.frames("/z")[0] != nil)
        #expect(s.fs.statistics().freeBlocks == freeZ)
        s.expectClean("after dedups")
    }

    @Test("misaligned dedup offsets and a clone onto itself or an existing file: DAXError, nothing changed")
    func forkingBadInput() throws {
        let s = try BlackBoxRig("ffbad")
        let data = ffPattern(3 * pageSize, seed: 14)
        try s.make("/a", data)
        try s.make("/b", data)
        let aFrames = try s.frames("/a")
        let bFrames = try s.frames("/b")
        let stats = s.fs.statistics()
        expectDAXError(.invalidArgument, "misaligned source offset") {
            try s.fs.deduplicate("/a", offset: 100, "/b", offset: 0, count: pageSize)
        }
        expectDAXError(.invalidArgument, "misaligned destination offset") {
            try s.fs.deduplicate("/a", offset: 0, "/b", offset: 100, count: pageSize)
        }
        expectDAXError(.invalidArgument, "negative source offset") {
            try s.fs.deduplicate("/a", offset: -pageSize, "/b", offset: 0, count: pageSize)
        }
        expectDAXError(.invalidArgument, "destination range past its end") {
            try s.fs.deduplicate("/a", offset: 0, "/b", offset: pageSize, count: 3 * pageSize)
        }
        expectDAXError(.alreadyExists, "clone onto itself") { try s.fs.clone("/a", to: "/a") }
        expectDAXError(.alreadyExists, "clone onto another file") { try s.fs.clone("/a", to: "/b") }
        expectDAXError(.notFound, "clone into a missing directory") { try s.fs.clone("/a", to: "/no/x") }
        #expect(try s.frames("/a") == aFrames)
        #expect(try s.frames("/b") == bFrames)
        #expect(try s.contents("/a") == data && s.contents("/b") == data)
        #expect(try s.fs.contentsOfDirectory("/") == ["a", "b"])
        let after = s.fs.statistics()
        #expect(after.sharedBlocks == stats.sharedBlocks && after.freeBlocks == stats.freeBlocks)
        // A read-write mapping of a file opened read-only is refused.
        let reader = try s.fs.open("/a", access: .readOnly)
        defer { reader.close() }
        expectDAXError(.permissionDenied, "a .readWrite map of a .readOnly file") {
            try reader.map(count: pageSize, access: .readWrite).unmap()
        }
        s.expectClean("after refused calls")
    }

    // MARK: - Closed files and an unmounted file system

    @Test("a mapping outlives close of its file: stores land, holes allocate; calls on the closed file throw (child)")
    func closedFile() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let (_, fs) = ffChildFileSystem("closed")
            let steps = ChildSteps()
            do {
                let data = ffPattern(2 * pageSize, seed: 15)
                let file = try fs.create("/f")
                try file.write(data, at: 0)
                try file.truncate(to: 3 * pageSize, ifBusy: .fail)
                let m = try file.map(count: 3 * pageSize)
                file.close()
                FileHandle.standardError.write(Data("step stores after close\n".utf8))
                ffStore(m, 1, 0x71)
                ffStore(m, 2 * pageSize + 1, 0x72)
                steps.step("write") { try file.write([1], at: 0) }
                steps.step("read") { _ = try file.read(count: 1, at: 0) }
                steps.step("truncate") { try file.truncate(to: 0, ifBusy: .fail) }
                steps.step("punchHole") { try file.punchHole(offset: 0, count: pageSize, ifBusy: .fail) }
                steps.step("allocate") { try file.allocate(offset: 0, count: 4 * pageSize) }
                steps.step("map") { try file.map(count: pageSize).unmap() }
                steps.step("frames") { _ = try file.frames(offset: 0, count: pageSize) }
                steps.step("migrate") { _ = try file.migrate(offset: 0, count: pageSize) }
                FileHandle.standardError.write(Data("step unchanged\n".utf8))
                let again = try fs.open("/f")
                var expected = data + zeros
                expected[1] = 0x71
                expected[2 * pageSize + 1] = 0x72
                if again.size != 3 * pageSize { steps.mismatch("size \(again.size)") }
                if try again.read(count: 3 * pageSize, at: 0) != expected { steps.mismatch("bytes") }
                if ffBytes(m, at: 0, count: 3 * pageSize) != expected { steps.mismatch("mapping") }
                m.unmap()
                again.close()
                if (try? fs.check().isClean) != true { steps.mismatch("check") }
                try fs.unmount()
            } catch {
                steps.mismatch("setup: \(error)")
            }
            steps.exitWithResult()
        }
        ChildSteps.expectPassed(result)
    }

    @Test("calls on an unmounted file system and on a file opened before unmount throw, and change nothing (child)")
    func unmountedFileSystem() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let (device, fs) = ffChildFileSystem("unmounted")
            let steps = ChildSteps()
            do {
                let data = ffPattern(pageSize, seed: 16)
                let file = try fs.create("/f")
                try file.write(data, at: 0)
                let m = try file.map(count: pageSize)
                steps.step("unmount while mapped", [.busy]) { try fs.unmount() }
                m.unmap()
                try fs.unmount()
                steps.step("create") { _ = try fs.create("/g") }
                steps.step("open") { _ = try fs.open("/f") }
                steps.step("remove") { try fs.remove("/f") }
                steps.step("rename") { try fs.rename("/f", to: "/h") }
                steps.step("createDirectory") { try fs.createDirectory("/d") }
                steps.step("clone") { try fs.clone("/f", to: "/c") }
                steps.step("deduplicate") { _ = try fs.deduplicate("/f", offset: 0, "/f", offset: 0, count: pageSize) }
                steps.step("file.write") { try file.write([9], at: 0) }
                steps.step("file.truncate") { try file.truncate(to: 0, ifBusy: .fail) }
                steps.step("file.map") { try file.map(count: pageSize).unmap() }
                steps.step("file.sync") { try file.sync() }
                FileHandle.standardError.write(Data("step remount\n".utf8))
                let again = try DAXFileSystem.mount(device)
                if try again.contentsOfDirectory("/") != ["f"] { steps.mismatch("tree") }
                let f = try again.open("/f")
                if try f.read(count: f.size, at: 0) != data { steps.mismatch("bytes") }
                f.close()
                if (try? again.check().isClean) != true { steps.mismatch("check") }
                try again.unmount()
            } catch {
                steps.mismatch("setup: \(error)")
            }
            steps.exitWithResult()
        }
        ChildSteps.expectPassed(result)
    }

    // MARK: - Round 5, part 2: pins, layout changes and durability together

    @Test(
        "a pinned page cut away with .deferFree: the old mapping regrows to a hole, the device never reaches the file",
        arguments: ["truncate", "punch"])
    func deferFreeThenRegrow(_ how: String) throws {
        let s = try BlackBoxRig("ffdefer")
        try ffRequireFaults(s.fs)
        let data = try s.make("/f", ffPattern(2 * pageSize, seed: 20))
        let file = try s.fs.open("/f")
        defer { file.close() }
        let m = try file.map(count: 2 * pageSize)
        defer { m.unmap() }
        let engine = DMAEngine(device: s.device)
        let region = engine.register(try m.pin(offset: pageSize, count: pageSize, access: .readWrite))
        let pinned = region.frames[0]
        if how == "truncate" {
            try file.truncate(to: pageSize, ifBusy: .deferFree)
            #expect(kernelLoad(m.baseAddress + pageSize) == nil, "a page past the end gave a byte")
            try file.truncate(to: 2 * pageSize, ifBusy: .fail)
        } else {
            try file.punchHole(offset: pageSize, count: pageSize, ifBusy: .deferFree)
        }
        #expect(s.fs.statistics().quarantinedBlocks == 1)
        #expect(s.fs.pages.state(of: pinned).isQuarantined)
        #expect(try file.frames(offset: pageSize, count: pageSize) == [nil])
        #expect(ffBytes(m, at: pageSize, count: pageSize) == zeros, "the old mapping shows the quarantined block")
        try engine.write([0xDD, 0xDE], to: region, at: 0)
        #expect(ffBytes(m, at: pageSize, count: 2) == [0, 0], "the device's write reached the file's mapping")
        #expect(try file.read(count: pageSize, at: pageSize) == zeros, "the device's write reached the file")
        // A store to the hole gives a new block, never the quarantined one.
        ffStore(m, pageSize + 7, 0x17)
        let now = try #require(try file.frames(offset: pageSize, count: pageSize)[0])
        #expect(now != pinned)
        #expect(try engine.read(count: 2, from: region, at: 0) == [0xDD, 0xDE], "the device lost its own write")
        var expected = zeros
        expected[7] = 0x17
        #expect(try file.read(count: pageSize, at: pageSize) == expected)
        #expect(try file.read(count: pageSize, at: 0) == Array(data[0..<pageSize]))
        engine.deregister(region)
        #expect(s.fs.statistics().quarantinedBlocks == 0)
        #expect(!s.fs.pages.state(of: pinned).isAllocated)
        s.expectPinsBalance("after deregister")
        s.expectClean("after \(how) .deferFree and regrowth")
    }

    @Test("a short-term read pin of a hole is the zero frame: no pin counted, truncate never waits, DMA reads zeros")
    func readPinOfHoleIsZeroFrame() throws {
        let s = try BlackBoxRig("ffzeroframe")
        let file = try s.fs.create("/f")
        defer { file.close() }
        try file.truncate(to: 2 * pageSize, ifBusy: .fail)
        let m = try file.map(count: 2 * pageSize)
        defer { m.unmap() }
        let before = s.fs.statistics()
        let engine = DMAEngine(device: s.device)
        let region = engine.register(try m.pin(offset: 0, count: pageSize, access: .readOnly))
        #expect(region.frames[0].rawValue == UInt64(s.fs.pages.count), "not the frame one past the device")
        let stats = s.fs.statistics()
        #expect(stats.pinsAcquired == before.pinsAcquired && stats.pinnedPages == 0, "\(stats)")
        #expect(stats.freeBlocks == before.freeBlocks)
        #expect(try file.frames(offset: 0, count: pageSize) == [nil])
        #expect(try engine.read(count: 16, from: region, at: 0) == [UInt8](repeating: 0, count: 16))
        expectDAXError(.permissionDenied, "a DMA write to the zero frame") {
            try engine.write([1], to: region, at: 0)
        }
        // A store gives the file a block; the pin keeps the zero frame.
        ffStore(m, 3, 0x33)
        #expect(try file.read(count: 4, at: 0) == [0, 0, 0, 0x33])
        #expect(try engine.read(count: 4, from: region, at: 0) == [0, 0, 0, 0])
        // A truncate does not wait on the zero frame (the page was a hole when pinned).
        try file.punchHole(offset: pageSize, count: pageSize, ifBusy: .fail)
        try file.truncate(to: 0, ifBusy: .fail)
        #expect(file.size == 0)
        engine.deregister(region)
        let end = s.fs.statistics()
        #expect(end.pinsAcquired == before.pinsAcquired && end.pinsReleased == before.pinsReleased)
        s.expectPinsBalance("after the zero-frame pin")
        s.expectClean("after a zero-frame pin")
    }

    @Test("a long-term read pin of a hole allocates a zeroed block shown in every mapping; with no space .noSpace")
    func longTermReadPinOfHole() throws {
        let s = try BlackBoxRig("ffltpin", size: 4 << 20)
        try ffRequireFaults(s.fs)
        let file = try s.fs.create("/f")
        defer { file.close() }
        try file.truncate(to: 2 * pageSize, ifBusy: .fail)
        let reader = try s.fs.open("/f", access: .readOnly)
        defer { reader.close() }
        let ro = try reader.map(count: 2 * pageSize, access: .readOnly)
        let rw = try file.map(count: 2 * pageSize)
        defer {
            ro.unmap()
            rw.unmap()
        }
        #expect(ffLoad(ro, 0) == 0 && ffLoad(rw, 0) == 0)
        let free = s.fs.statistics().freeBlocks
        let engine = DMAEngine(device: s.device)
        let region = engine.register(
            try ro.pin(offset: 0, count: pageSize, access: .readOnly, lifetime: .longTerm(onRevoke: {})))
        #expect(s.fs.statistics().freeBlocks == free - 1)
        #expect(try file.frames(offset: 0, count: pageSize) == [region.frames[0]])
        #expect(s.fs.statistics().pinnedPages == 1)
        try file.write([0x0A, 0x0B], at: 10)
        #expect(try engine.read(count: 2, from: region, at: 10) == [0x0A, 0x0B], "the lease parted from the file")
        ffStore(rw, 12, 0x0C)
        #expect(try engine.read(count: 1, from: region, at: 12) == [0x0C])
        #expect(ffBytes(ro, at: 10, count: 3) == [0x0A, 0x0B, 0x0C])

        // No space: the pin of the other hole fails and changes nothing.
        let hog = try s.fs.create("/hog")
        defer { hog.close() }
        var offset = 0
        while true {
            do {
                try hog.allocate(offset: offset, count: pageSize)
                offset += pageSize
            } catch let error as DAXError where error.code == .noSpace { break }
        }
        #expect(s.fs.statistics().freeBlocks == 0)
        let stats = s.fs.statistics()
        expectDAXError(.noSpace, "a long-term read pin of a hole with no space") {
            let pin = try ro.pin(
                offset: pageSize, count: pageSize, access: .readOnly, lifetime: .longTerm(onRevoke: {}))
            pin.release()
        }
        let after = s.fs.statistics()
        #expect(after.pinsAcquired == stats.pinsAcquired && after.pinnedPages == 1)
        #expect(try file.frames(offset: pageSize, count: pageSize) == [nil])
        engine.deregister(region)
        s.expectPinsBalance("after the lease")
        s.expectClean("after long-term pins of holes")
    }

    @Test("stores after migrate, copy-on-write, punch and dedup are all made durable by sync (power-failure image)")
    func syncAfterLayoutChanges() throws {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        options.powerFailureEmulation = .adr
        let s = try BlackBoxRig("ffsynclayout", options: options)
        try ffRequireFaults(s.fs)
        var expected = try s.make("/s", ffPattern(4 * pageSize, seed: 21))
        try s.make("/x", Array(expected[3 * pageSize..<4 * pageSize]))
        let file = try s.fs.open("/s")
        defer { file.close() }
        let m = try file.map(count: 4 * pageSize)
        defer { m.unmap() }
        try file.sync()
        func unpersisted(_ page: Int) throws -> Bool {
            let frame = try #require(try file.frames(offset: page * pageSize, count: pageSize)[0])
            let range = Int(frame.rawValue) * pageSize..<(Int(frame.rawValue) + 1) * pageSize
            return s.device.unpersistedRanges().contains { $0.overlaps(range) }
        }
        func store(_ offset: Int, _ value: UInt8) {
            ffStore(m, offset, value)
            expected[offset] = value
        }
        // Migrate page 0, then store to it.
        let old0 = try file.frames(offset: 0, count: pageSize)[0]
        #expect(try file.migrate(offset: 0, count: pageSize).migrated == 1)
        #expect(try file.frames(offset: 0, count: pageSize)[0] != old0)
        store(1, 0xA1)
        // Clone, then a store to page 1 copies on write.
        try s.fs.clone("/s", to: "/c")
        let cloneData = expected
        let f0 = ffFaults(s.fs)
        store(pageSize + 1, 0xA2)
        #expect(ffFaults(s.fs).copyOnWrite == f0.copyOnWrite + 1)
        // Punch page 2, then a store allocates.
        try file.punchHole(offset: 2 * pageSize, count: pageSize, ifBusy: .fail)
        expected.replaceSubrange(2 * pageSize..<3 * pageSize, with: zeros)
        store(2 * pageSize + 1, 0xA3)
        // Dedup page 3 with /x (equal bytes), then a store copies on write.
        #expect(try s.fs.deduplicate("/x", offset: 0, "/s", offset: 3 * pageSize, count: pageSize) == pageSize)
        let f1 = ffFaults(s.fs)
        store(3 * pageSize + 1, 0xA4)
        #expect(ffFaults(s.fs).copyOnWrite == f1.copyOnWrite + 1)
        #expect(try file.read(count: 4 * pageSize, at: 0) == expected)
        try file.sync()
        for page in 0..<4 {
            #expect(try !unpersisted(page), "page \(page) not durable after sync: \(s.device.unpersistedRanges())")
        }
        let image = TemporaryDevice.uniquePath("r5img")
        defer { unlink(image) }
        try s.device.powerFail(writingImageTo: image, keeping: .none)
        let imageDevice = try PMemDevice.open(path: image)
        defer { imageDevice.close() }
        let imageFS = try DAXFileSystem.mount(imageDevice)
        defer { try? imageFS.unmount() }
        let recovered = try imageFS.open("/s", access: .readOnly)
        #expect(try recovered.read(count: 4 * pageSize, at: 0) == expected, "the image lost stores sync made durable")
        recovered.close()
        let clone = try imageFS.open("/c", access: .readOnly)
        #expect(try clone.read(count: 4 * pageSize, at: 0) == cloneData)
        clone.close()
        #expect(try imageFS.check().isClean)
    }

    @Test("a clone and a snapshot make the source's unpersisted mapping stores durable first (power-failure image)")
    func cloneMakesSourceDurable() throws {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        options.powerFailureEmulation = .adr
        let s = try BlackBoxRig("ffclonedur", options: options)
        try ffRequireFaults(s.fs)
        try s.fs.createDirectory("/d")
        var data = try s.make("/d/f", ffPattern(2 * pageSize, seed: 22))
        let file = try s.fs.open("/d/f")
        defer { file.close() }
        let m = try file.map(count: 2 * pageSize)
        defer { m.unmap() }
        try file.sync()
        ffStore(m, 5, 0xB5)
        ffStore(m, pageSize + 5, 0xB6)
        data[5] = 0xB5
        data[pageSize + 5] = 0xB6
        #expect(!s.device.unpersistedRanges().isEmpty)
        try s.fs.clone("/d/f", to: "/c")
        try s.fs.clone("/d", to: "/snap")
        let image = TemporaryDevice.uniquePath("r5img2")
        defer { unlink(image) }
        try s.device.powerFail(writingImageTo: image, keeping: .none)
        let imageDevice = try PMemDevice.open(path: image)
        defer { imageDevice.close() }
        let imageFS = try DAXFileSystem.mount(imageDevice)
        defer { try? imageFS.unmount() }
        for path in ["/c", "/snap/f"] {
            let f = try imageFS.open(path, access: .readOnly)
            #expect(try f.read(count: 2 * pageSize, at: 0) == data, "\(path) holds bytes the source never had for good")
            f.close()
        }
        #expect(try imageFS.check().isClean)
    }

    @Test("truncate and punch of a clone inside a shared page: the other file keeps every byte, through its mapping")
    func partialTruncatePunchOfSharedPage() throws {
        let s = try BlackBoxRig("ffpartial")
        try ffRequireFaults(s.fs)
        let data = try s.make("/s", ffPattern(2 * pageSize, seed: 23))
        try s.fs.clone("/s", to: "/c")
        let src = try s.fs.open("/s")
        let clone = try s.fs.open("/c")
        defer {
            src.close()
            clone.close()
        }
        let ms = try src.map(count: 2 * pageSize)
        let mc = try clone.map(count: 2 * pageSize)
        defer {
            ms.unmap()
            mc.unmap()
        }
        try clone.punchHole(offset: 10, count: 20, ifBusy: .fail)
        try clone.truncate(to: pageSize + 100, ifBusy: .fail)
        try clone.truncate(to: 2 * pageSize, ifBusy: .fail)
        #expect(try src.read(count: 2 * pageSize, at: 0) == data, "the source changed")
        #expect(ffBytes(ms, at: 0, count: 2 * pageSize) == data, "the source's mapping changed")
        var expected = data
        expected.replaceSubrange(10..<30, with: [UInt8](repeating: 0, count: 20))
        expected.replaceSubrange(pageSize + 100..<2 * pageSize, with: [UInt8](repeating: 0, count: pageSize - 100))
        #expect(try clone.read(count: 2 * pageSize, at: 0) == expected)
        #expect(ffBytes(mc, at: 0, count: 2 * pageSize) == expected)
        #expect(s.fs.statistics().sharedBlocks == 0)
        s.expectClean("after partial truncate and punch of a clone")
    }

    @Test("a mapping at an offset, reaching past the end: faults hit the right file pages, copy-on-write too")
    func offsetMapping() throws {
        let s = try BlackBoxRig("ffoffset")
        try ffRequireFaults(s.fs)
        let file = try s.fs.create("/f")
        defer { file.close() }
        try file.write(ffPattern(pageSize, seed: 24), at: 3 * pageSize)  // pages 0-2 holes, page 3 data
        let page3 = try file.read(count: pageSize, at: 3 * pageSize)
        let m = try file.map(offset: 2 * pageSize, count: 3 * pageSize)  // pages 2, 3 and one past the end
        defer { m.unmap() }
        #expect(ffBytes(m, at: pageSize, count: pageSize) == page3)
        #expect(kernelLoad(m.baseAddress + 2 * pageSize) == nil, "a page past the end gave a byte")
        let f0 = ffFaults(s.fs)
        ffStore(m, 9, 0x29)
        #expect(ffDelta(ffFaults(s.fs), f0) == [0, 1, 0, 0])
        let frames = try file.frames(offset: 0, count: 4 * pageSize)
        #expect(frames[0] == nil && frames[1] == nil && frames[2] != nil && frames[3] != nil, "\(frames)")
        #expect(try file.read(count: 1, at: 2 * pageSize + 9) == [0x29])
        // A pin at the mapping's offset 0 is the file's page 2.
        let pin = try m.pin(offset: 0, count: 2 * pageSize, access: .readOnly)
        #expect(pin.frames == [frames[2]!, frames[3]!])
        pin.release()
        // Clone, then a store through the offset mapping copies the file's page 3 only.
        try s.fs.clone("/f", to: "/c")
        ffStore(m, pageSize + 1, 0x31)
        #expect(ffFaults(s.fs).copyOnWrite == f0.copyOnWrite + 1)
        #expect(try s.contents("/c")[3 * pageSize + 1] == page3[1])
        #expect(try file.read(count: 1, at: 3 * pageSize + 1) == [0x31])
        let after = try file.frames(offset: 0, count: 4 * pageSize)
        #expect(after[2] == frames[2] && after[3] != frames[3])
        // Growing the file over the mapping's last page makes it a hole.
        try file.truncate(to: 5 * pageSize, ifBusy: .fail)
        #expect(ffBytes(m, at: 2 * pageSize, count: pageSize) == zeros)
        s.expectPinsBalance("after pins at an offset")
        s.expectClean("after an offset mapping")
    }

    @Test("dedup then a change to the source: the destination's read-only and writable mappings keep their bytes")
    func dedupThenSourceChanges() throws {
        let s = try BlackBoxRig("ffdedupsrc")
        try ffRequireFaults(s.fs)
        let data = try s.make("/a", ffPattern(2 * pageSize, seed: 25))
        try s.make("/b", data)
        let a = try s.fs.open("/a")
        let b = try s.fs.open("/b")
        let bReader = try s.fs.open("/b", access: .readOnly)
        defer {
            a.close()
            b.close()
            bReader.close()
        }
        let ma = try a.map(count: 2 * pageSize)
        let mb = try b.map(count: 2 * pageSize)
        let rb = try bReader.map(count: 2 * pageSize, access: .readOnly)
        defer {
            ma.unmap()
            mb.unmap()
            rb.unmap()
        }
        #expect(ffBytes(rb, at: 0, count: 2 * pageSize) == data)
        #expect(try s.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 2 * pageSize) == 2 * pageSize)
        #expect(try b.frames(offset: 0, count: 2 * pageSize) == a.frames(offset: 0, count: 2 * pageSize))
        #expect(ffBytes(rb, at: 0, count: 2 * pageSize) == data)
        #expect(ffBytes(mb, at: 0, count: 2 * pageSize) == data)
        // write() to the source's page 0, a store through its mapping to page 1.
        try a.write([0xE0], at: 0)
        let f0 = ffFaults(s.fs)
        ffStore(ma, pageSize, 0xE1)
        #expect(ffFaults(s.fs).copyOnWrite == f0.copyOnWrite + 1)
        #expect(try b.read(count: 2 * pageSize, at: 0) == data, "the destination changed")
        #expect(ffBytes(rb, at: 0, count: 2 * pageSize) == data, "the destination's read-only mapping changed")
        #expect(ffBytes(mb, at: 0, count: 2 * pageSize) == data, "the destination's writable mapping changed")
        #expect(ffLoad(ma, 0) == 0xE0 && ffLoad(ma, pageSize) == 0xE1)
        #expect(s.fs.statistics().sharedBlocks == 0)
        // The destination now owns those blocks alone: a store does not copy.
        let f1 = ffFaults(s.fs)
        ffStore(mb, 2, 0xE2)
        #expect(ffFaults(s.fs).copyOnWrite == f1.copyOnWrite)
        #expect(ffLoad(rb, 2) == 0xE2)
        s.expectClean("after dedup and changes to the source")
    }

    @Test("migrate under a read-only and a writable mapping: both follow the new frame, the old one is freed")
    func migrateUnderTwoMappings() throws {
        let s = try BlackBoxRig("ffmigr2")
        try ffRequireFaults(s.fs)
        let data = try s.make("/f", ffPattern(2 * pageSize, seed: 26))
        let file = try s.fs.open("/f")
        let reader = try s.fs.open("/f", access: .readOnly)
        defer {
            file.close()
            reader.close()
        }
        let rw = try file.map(count: 2 * pageSize)
        let ro = try reader.map(count: 2 * pageSize, access: .readOnly)
        defer {
            rw.unmap()
            ro.unmap()
        }
        #expect(ffBytes(ro, at: 0, count: 2 * pageSize) == data)
        let old = try file.frames(offset: 0, count: 2 * pageSize).map { try #require($0) }
        let free = s.fs.statistics().freeBlocks
        let result = try file.migrate(offset: 0, count: 2 * pageSize)
        #expect(result.migrated == 2 && result.busy.isEmpty, "\(result)")
        let new = try file.frames(offset: 0, count: 2 * pageSize).map { try #require($0) }
        #expect(Set(new).isDisjoint(with: old))
        #expect(s.fs.statistics().freeBlocks == free)
        for frame in old {
            #expect(!s.fs.pages.state(of: frame).isAllocated && s.fs.pages.state(of: frame).refCount == 0)
        }
        for frame in new { #expect(s.fs.pages.state(of: frame).mapCount == 2, "\(s.fs.pages.state(of: frame))") }
        try file.write([0xF0], at: 3)
        ffStore(rw, pageSize + 3, 0xF1)
        #expect(ffLoad(ro, 3) == 0xF0 && ffLoad(rw, 3) == 0xF0, "a mapping still shows the old frame")
        #expect(ffLoad(ro, pageSize + 3) == 0xF1)
        #expect(try s.device.read(count: 1, at: Int(new[1].rawValue) * pageSize + 3) == [0xF1])
        s.expectClean("after migrate under two mappings")
    }

    @Test("a thread that blocks SIGBUS and stores to a hole with no space completes once space is freed (child)")
    func blockedSigbusRetriesUntilSpace() async {
        await #expect(processExitsWith: .exitCode(77)) {
            let (_, fs) = ffChildFileSystem("blockedbus", size: 4 << 20)
            do {
                let sparse = try fs.create("/sparse")
                try sparse.truncate(to: pageSize, ifBusy: .fail)
                let m = try sparse.map(count: pageSize)
                let hog = try fs.create("/hog")
                var offset = 0
                while true {
                    do {
                        try hog.allocate(offset: offset, count: pageSize)
                        offset += pageSize
                    } catch let error as DAXError where error.code == .noSpace { break }
                }
                guard fs.statistics().freeBlocks == 0 else { exit(5) }
                let before = fs.statistics().faults.sigbus
                let done = DispatchSemaphore(value: 0)
                Thread.detachNewThread {
                    var set = sigset_t()
                    sigemptyset(&set)
                    sigaddset(&set, SIGBUS)
                    pthread_sigmask(SIG_BLOCK, &set, nil)
                    ffStore(m, 0, 0x77)
                    done.signal()
                }
                let deadline = DispatchTime.now() + .seconds(20)
                while fs.statistics().faults.sigbus == before {
                    if DispatchTime.now() > deadline { exit(9) }
                    sched_yield()
                }
                if try sparse.frames(offset: 0, count: pageSize) != [nil] { exit(10) }
                try hog.truncate(to: 0, ifBusy: .fail)
                guard done.wait(timeout: .now() + .seconds(20)) == .success else { exit(11) }
                guard try sparse.read(count: 1, at: 0) == [0x77] else { exit(12) }
                guard try sparse.frames(offset: 0, count: pageSize)[0] != nil else { exit(13) }
                exit(77)
            } catch { exit(4) }
        }
    }

    // MARK: - Races of stores through a mapping with sync, migrate and clone

    /// A thread storing an increasing 8-byte counter at offset 0 of each of `pages` pages of `m`,
    /// page by page, then publishing it; `stop()` ends it and returns the last value stored.
    final class R5Storer: @unchecked Sendable {
        let published = Atomic<UInt64>(0)
        private let stopping = Atomic<Bool>(false)
        private let finished = DispatchSemaphore(value: 0)

        init(_ m: DAXMapping, pages: Int) {
            let started = DispatchSemaphore(value: 0)
            Thread.detachNewThread { [self] in
                started.signal()
                var k: UInt64 = 0
                while !stopping.load(ordering: .sequentiallyConsistent) {
                    k += 1
                    for page in 0..<pages {
                        m.baseAddress.storeBytes(of: k, toByteOffset: page * pageSize, as: UInt64.self)
                    }
                    published.store(k, ordering: .sequentiallyConsistent)
                }
                finished.signal()
            }
            started.wait()
            advance()
        }

        /// Waits until at least one more value than now has been stored and published.
        func advance() {
            let now = published.load(ordering: .sequentiallyConsistent)
            let deadline = DispatchTime.now() + .seconds(30)
            while published.load(ordering: .sequentiallyConsistent) == now {
                precondition(DispatchTime.now() < deadline, "the storing thread made no progress")
                sched_yield()
            }
        }

        func stop() -> UInt64 {
            stopping.store(true, ordering: .sequentiallyConsistent)
            finished.wait()
            return published.load(ordering: .sequentiallyConsistent)
        }
    }

    private static func value(_ file: DAXFile, page: Int) throws -> UInt64 {
        try file.read(count: 8, at: page * pageSize).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
    }

    @Test("syncs racing stores through a mapping: after the last sync the power-failure image holds the last stores")
    func syncRacesStores() throws {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        options.powerFailureEmulation = .adr
        let s = try BlackBoxRig("ffsyncrace", options: options)
        try ffRequireFaults(s.fs)
        try s.make("/f", ffPattern(4 * pageSize, seed: 30))
        let file = try s.fs.open("/f")
        defer { file.close() }
        let m = try file.map(count: 4 * pageSize)
        defer { m.unmap() }
        let storer = R5Storer(m, pages: 4)
        for _ in 0..<150 {
            storer.advance()
            try file.sync()
        }
        let last = storer.stop()
        #expect(last > 0)
        try file.sync()
        let frames = try file.frames(offset: 0, count: 4 * pageSize).map { try #require($0) }
        let ranges = frames.map { Int($0.rawValue) * pageSize..<(Int($0.rawValue) + 1) * pageSize }
        let left = s.device.unpersistedRanges().filter { r in ranges.contains { $0.overlaps(r) } }
        #expect(left.isEmpty, "stores left unpersisted after the last sync: \(left)")
        let image = TemporaryDevice.uniquePath("r5img3")
        defer { unlink(image) }
        try s.device.powerFail(writingImageTo: image, keeping: .none)
        let imageDevice = try PMemDevice.open(path: image)
        defer { imageDevice.close() }
        for page in 0..<4 {
            let bytes = try imageDevice.read(count: 8, at: ranges[page].lowerBound)
            let got = bytes.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
            #expect(got == last, "page \(page): the image holds \(got), the last store was \(last)")
            #expect(try Self.value(file, page: page) == last)
        }
    }

    @Test("migrations racing stores to the page: no store is lost, the file and the mapping end with the last one")
    func migrateRacesStores() throws {
        let s = try BlackBoxRig("ffmigrace")
        try ffRequireFaults(s.fs)
        try s.make("/f", ffPattern(pageSize, seed: 31))
        let file = try s.fs.open("/f")
        defer { file.close() }
        let m = try file.map(count: pageSize)
        defer { m.unmap() }
        let storer = R5Storer(m, pages: 1)
        var moved = 0
        for round in 0..<80 {
            storer.advance()
            moved += try file.migrate(offset: 0, count: pageSize).migrated
            let published = storer.published.load(ordering: .sequentiallyConsistent)
            let now = try Self.value(file, page: 0)
            if now < published {
                Issue.record("round \(round): the file holds \(now), a store of \(published) had completed")
                break
            }
        }
        let last = storer.stop()
        #expect(moved > 0)
        #expect(try Self.value(file, page: 0) == last)
        #expect(m.baseAddress.load(as: UInt64.self) == last)
        let frame = try #require(try file.frames(offset: 0, count: pageSize)[0])
        let onDevice = try s.device.read(count: 8, at: Int(frame.rawValue) * pageSize)
        #expect(onDevice.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) } == last, "zero copy")
        s.expectClean("after migrations racing stores")
    }

    @Test(
        "clones racing stores to the source: each clone holds a value stored around its clone, the source every store")
    func cloneRacesStores() throws {
        let s = try BlackBoxRig("ffclonerace")
        try ffRequireFaults(s.fs)
        try s.make("/keep", [])
        let baseline = s.fs.statistics().freeBlocks
        try s.make("/s", ffPattern(2 * pageSize, seed: 32))
        let file = try s.fs.open("/s")
        let m = try file.map(count: 2 * pageSize)
        let storer = R5Storer(m, pages: 2)
        for round in 0..<60 {
            storer.advance()
            let before = storer.published.load(ordering: .sequentiallyConsistent)
            try s.fs.clone("/s", to: "/c")
            let after = storer.published.load(ordering: .sequentiallyConsistent)
            let clone = try s.fs.open("/c", access: .readOnly)
            let v0 = try Self.value(clone, page: 0)
            let v1 = try Self.value(clone, page: 1)
            clone.close()
            let now = try Self.value(file, page: 0)
            try s.fs.remove("/c")
            if v0 < before || v0 > after + 1 || v1 + 1 < before || v1 > after + 1 || now < after {
                Issue.record("round \(round): before \(before), after \(after), clone \(v0)/\(v1), source \(now)")
                break
            }
        }
        let last = storer.stop()
        #expect(try Self.value(file, page: 0) == last && Self.value(file, page: 1) == last)
        #expect(m.baseAddress.load(as: UInt64.self) == last)
        m.unmap()
        file.close()
        try s.fs.remove("/s")
        let end = s.fs.statistics()
        #expect(end.freeBlocks == baseline && end.sharedBlocks == 0, "\(end)")
        s.expectClean("after clones racing stores")
    }

    // MARK: - Forking with no space left

    private static func fillUp(_ fs: DAXFileSystem, _ hog: DAXFile) throws {
        var offset = hog.size
        while true {
            do {
                try hog.allocate(offset: offset, count: pageSize)
                offset += pageSize
            } catch let error as DAXError where error.code == .noSpace { break }
        }
    }

    @Test("with no block left, every copy of a shared or pinned page is .noSpace and changes nothing")
    func forkingWithNoSpace() throws {
        let s = try BlackBoxRig("ffnospace", size: 4 << 20)
        try ffRequireFaults(s.fs)
        let data = try s.make("/s", ffPattern(3 * pageSize, seed: 40))
        let pdata = try s.make("/p", ffPattern(2 * pageSize, seed: 41))
        try s.fs.clone("/s", to: "/c")
        let src = try s.fs.open("/s")
        let clone = try s.fs.open("/c")
        let p = try s.fs.open("/p")
        defer {
            src.close()
            clone.close()
            p.close()
        }
        let ms = try src.map(count: 3 * pageSize)
        let mc = try clone.map(count: 3 * pageSize)
        let mp = try p.map(count: 2 * pageSize)
        defer {
            ms.unmap()
            mc.unmap()
            mp.unmap()
        }
        let engine = DMAEngine(device: s.device)
        let region = engine.register(try mp.pin(offset: 0, count: pageSize, access: .readWrite))
        let hog = try s.fs.create("/hog")
        defer { hog.close() }
        try Self.fillUp(s.fs, hog)
        let stats = s.fs.statistics()
        #expect(stats.freeBlocks == 0)
        #expect(stats.sharedBlocks == 3)
        let frames = try src.frames(offset: 0, count: 3 * pageSize)
        let tree = try s.fs.contentsOfDirectory("/")

        expectDAXError(.noSpace, "write() to a shared page") { try src.write([0x01], at: 5) }
        expectDAXError(.noSpace, "write() to the clone's shared page") { try clone.write([0x01], at: pageSize + 5) }
        expectDAXError(.noSpace, "a .readWrite pin of a shared page") {
            let pin = try ms.pin(offset: 2 * pageSize, count: pageSize, access: .readWrite)
            pin.release()
        }
        expectDAXError(.noSpace, "clone .copy of a pinned page") { try s.fs.clone("/p", to: "/q", ifPinned: .copy) }
        #expect(try s.fs.contentsOfDirectory("/") == tree, "a refused clone left a file")
        // A truncate or punch inside a shared page either copies (no block: .noSpace) or manages
        // without one; either way the source keeps every byte.
        do {
            try clone.truncate(to: pageSize + 100, ifBusy: .fail)
            #expect(clone.size == pageSize + 100)
            #expect(try clone.read(count: pageSize + 100, at: 0) == Array(data[0..<pageSize + 100]))
        } catch let error as DAXError where error.code == .noSpace {
            #expect(clone.size == 3 * pageSize)
            #expect(try clone.read(count: 3 * pageSize, at: 0) == data)
        }
        do {
            try clone.punchHole(offset: 10, count: 20, ifBusy: .fail)
            #expect(try clone.read(count: 20, at: 10) == [UInt8](repeating: 0, count: 20))
        } catch let error as DAXError where error.code == .noSpace {
            #expect(try clone.read(count: 20, at: 10) == Array(data[10..<30]))
        }
        #expect(try src.read(count: 3 * pageSize, at: 0) == data, "the source changed")
        #expect(ffBytes(ms, at: 0, count: 3 * pageSize) == data)
        #expect(try src.frames(offset: 0, count: 3 * pageSize) == frames)
        #expect(try p.read(count: 2 * pageSize, at: 0) == pdata)
        let after = s.fs.statistics()
        #expect(after.pinsAcquired == stats.pinsAcquired && after.pinnedPages == 1, "\(after)")
        #expect(after.freeBlocks == 0 || after.freeBlocks == 1, "\(after)")
        s.expectClean("after refused copies")

        // Space again: the same calls work.
        try hog.truncate(to: 0, ifBusy: .fail)
        try src.write([0x01], at: 5)
        #expect(try clone.read(count: 1, at: 5) == [data[5]])
        try s.fs.clone("/p", to: "/q", ifPinned: .copy)
        #expect(try s.contents("/q") == pdata)
        engine.deregister(region)
        s.expectPinsBalance("after deregister")
        s.expectClean("after space came back")
    }

    @Test("a store to a shared page through a mapping with no block left is SIGBUS, counted (child process)")
    func copyOnWriteStoreWithNoSpace() async {
        await #expect(processExitsWith: .exitCode(41)) {
            let (_, fs) = ffChildFileSystem("cownospace", size: 4 << 20)
            do {
                let src = try fs.create("/s")
                try src.write(ffPattern(pageSize, seed: 42), at: 0)
                try fs.clone("/s", to: "/c")
                let clone = try fs.open("/c")
                let m = try clone.map(count: pageSize)
                let hog = try fs.create("/hog")
                try BlackBoxFaultForkTests.fillUp(fs, hog)
                guard fs.statistics().freeBlocks == 0 else { exit(5) }
                ffSigbusFS = fs
                ffSigbusBefore = fs.statistics().faults.sigbus
                signal(SIGBUS) { _ in
                    guard let fs = ffSigbusFS else { _exit(39) }
                    _exit(Int32(40 + min(max(fs.statistics().faults.sigbus - ffSigbusBefore, 0), 9)))
                }
                ffStore(m, 0, 0x99)
                exit(0)
            } catch { exit(4) }
        }
    }

    @Test("a zero-frame pin (a read pin of a hole) holds up neither clone .fail nor migrate")
    func zeroFramePinDoesNotBlockForking() throws {
        let s = try BlackBoxRig("ffzeroclone")
        let data = try s.make("/s", ffPattern(pageSize, seed: 43))
        let file = try s.fs.open("/s")
        defer { file.close() }
        try file.truncate(to: 2 * pageSize, ifBusy: .fail)  // page 1 a hole
        let m = try file.map(count: 2 * pageSize)
        defer { m.unmap() }
        let pin = try m.pin(offset: pageSize, count: pageSize, access: .readOnly)
        try s.fs.clone("/s", to: "/c", ifPinned: .fail)
        #expect(try s.frames("/c") == file.frames(offset: 0, count: 2 * pageSize))
        #expect(s.fs.statistics().sharedBlocks == 1)
        #expect(try s.contents("/c") == data + zeros)
        pin.release()
        s.expectPinsBalance("after the zero-frame pin")
        s.expectClean("after clone with a zero-frame pin")
    }

    @Test(
        "an unlinked, mapped clone source: holes still allocate, the clone keeps its bytes, every block returns at the end"
    )
    func unlinkedMappedSource() throws {
        let s = try BlackBoxRig("fforphan")
        try ffRequireFaults(s.fs)
        try s.make("/keep", [])
        let baseline = s.fs.statistics().freeBlocks
        let data = try s.make("/s", ffPattern(2 * pageSize, seed: 44))
        let src = try s.fs.open("/s")
        try src.truncate(to: 3 * pageSize, ifBusy: .fail)  // page 2 a hole
        let m = try src.map(count: 3 * pageSize)
        try s.fs.clone("/s", to: "/c")
        src.close()
        try s.fs.remove("/s")
        #expect(try s.fs.contentsOfDirectory("/") == ["c", "keep"])
        #expect(s.fs.statistics().sharedBlocks == 2, "the mapped orphan still names its blocks")
        let f0 = ffFaults(s.fs)
        ffStore(m, 2 * pageSize + 1, 0x61)  // a hole of the orphan
        ffStore(m, 1, 0x62)  // a shared page of the orphan
        #expect(ffDelta(ffFaults(s.fs), f0) == [0, 1, 1, 0])
        #expect(ffLoad(m, 2 * pageSize + 1) == 0x61 && ffLoad(m, 1) == 0x62)
        #expect(try s.contents("/c") == data + zeros, "the orphan's stores reached the clone")
        #expect(s.fs.statistics().sharedBlocks == 1)
        s.expectClean("with a mapped orphan")
        m.unmap()
        let after = s.fs.statistics()
        #expect(after.sharedBlocks == 0)
        #expect(after.freeBlocks == baseline - 2, "the orphan's blocks did not all return: \(after)")
        #expect(try s.contents("/c") == data + zeros)
        try s.fs.remove("/c")
        #expect(s.fs.statistics().freeBlocks == baseline)
        s.expectClean("after the orphan and the clone went")
    }
}
