// Black-box tests of the fault handler (the design's fault semantics and the public API's faults),
// written only from the public contract and its invariants: loads and stores through direct
// mappings, the pages they allocate, the counters in `Statistics.faults`, SIGBUS/SIGSEGV where the
// kernel sends them, and durability of stores through `sync`. Only the public API is used:
// `import DAX`.
// Every test here passed as of this suite's commit. The zero-page counter is read as one fault per
// page loaded; a hole page's `mapCount` counts every mapping that has touched it.
//
// Where the contract points to Linux 6.1 fsdax, that kernel's behaviour is the model.
import DAX
import Dispatch
import Foundation
import Synchronization
import Testing

// MARK: - Helpers of this file only

private let pageSize = PMemDevice.pageSize
private let zeroPage = [UInt8](repeating: 0, count: PMemDevice.pageSize)

private func bbfPath(_ name: String) -> String {
    "/dev/shm/bbfault-\(getpid())-\(name)-\(UUID().uuidString.prefix(8))"
}

private func bbfPattern(_ count: Int, seed: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ ($0 >> 10) &+ seed &* 29 &+ 3) | 1 }
}

/// A freshly formatted file system on its own device; unmounted, closed and removed afterwards.
private func bbfWithFS<T>(
    size: Int = 8 << 20, options: PMemDevice.Options = .init(), name: String,
    _ body: (PMemDevice, DAXFileSystem) throws -> T
) throws -> T {
    let path = bbfPath(name)
    let device = try PMemDevice.create(path: path, size: size, options: options)
    defer {
        device.close()
        unlink(path)
    }
    let fs = try DAXFileSystem.format(device)
    defer { try? fs.unmount() }
    return try body(device, fs)
}

private func bbfBytes(_ mapping: DAXMapping, at offset: Int, count: Int) -> [UInt8] {
    Array(UnsafeRawBufferPointer(start: mapping.baseAddress + offset, count: count))
}

private func bbfLoad(_ mapping: DAXMapping, _ offset: Int) -> UInt8 {
    mapping.baseAddress.load(fromByteOffset: offset, as: UInt8.self)
}

private func bbfStore(_ mapping: DAXMapping, _ offset: Int, _ value: UInt8) {
    mapping.baseAddress.storeBytes(of: value, toByteOffset: offset, as: UInt8.self)
}

private func bbfExpectClean(_ fs: DAXFileSystem, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        let report = try fs.check()
        #expect(report.isClean, "\(what): \(report.problems)", sourceLocation: sourceLocation)
    } catch {
        Issue.record("\(what): check threw \(error)", sourceLocation: sourceLocation)
    }
}

private func bbfState(_ fs: DAXFileSystem, _ frame: PageFrameNumber) -> PageState { fs.pages.state(of: frame) }

private func bbfRequireFaults(_ fs: DAXFileSystem, sourceLocation: SourceLocation = #_sourceLocation) throws {
    try #require(
        fs.faultHandling == .userfaultfd, "these tests need the userfaultfd handler",
        sourceLocation: sourceLocation)
}

/// In a child process: a file system on a fresh device whose file is unlinked at once (nothing
/// to clean up if the child dies of its signal), with the fault handler if `needsFaults`. Exits 2
/// when the device cannot be made, 3 when the file system cannot or has no handler.
private func bbfChildFileSystem(_ name: String, size: Int = 8 << 20, needsFaults: Bool = true) -> DAXFileSystem {
    let path = "/dev/shm/bbfault-\(name)-\(getpid())"
    guard let device = try? PMemDevice.create(path: path, size: size) else { exit(2) }
    unlink(path)
    guard let fs = try? DAXFileSystem.format(device), !needsFaults || fs.faultHandling == .userfaultfd else {
        exit(3)
    }
    return fs
}

/// For the SIGBUS-counting child only: what its signal handler reads.
nonisolated(unsafe) private var bbfSigbusFS: DAXFileSystem?
nonisolated(unsafe) private var bbfSigbusBefore = 0

// MARK: - Loads and stores to holes

@Suite("BlackBoxFaults: holes through mappings")
struct BlackBoxFaultHoleTests {
    @Test("a load of a hole reads zeros, maps the zero page and allocates nothing")
    func holeLoadAllocatesNothing() throws {
        try bbfWithFS(name: "holeload") { _, fs in
            try bbfRequireFaults(fs)
            let file = try fs.create("/sparse")
            defer { file.close() }
            try file.truncate(to: 3 * pageSize)
            #expect(try file.frames(offset: 0, count: 3 * pageSize) == [nil, nil, nil])
            let before = fs.statistics()
            let mapping = try file.map(count: 3 * pageSize)
            defer { mapping.unmap() }

            #expect(bbfBytes(mapping, at: pageSize, count: pageSize) == zeroPage)
            let afterOne = fs.statistics()
            #expect((1...3).contains(afterOne.faults.zeroPage - before.faults.zeroPage), "\(afterOne.faults)")
            // A second load of the same page is no new fault.
            _ = bbfLoad(mapping, pageSize + 17)
            #expect(fs.statistics().faults.zeroPage == afterOne.faults.zeroPage)

            #expect(bbfBytes(mapping, at: 0, count: 3 * pageSize).allSatisfy { $0 == 0 })
            let after = fs.statistics()
            #expect(after.faults.zeroPage - before.faults.zeroPage == 3, "one zero-page fault per page loaded")
            #expect(after.faults.allocating == before.faults.allocating)
            #expect(after.faults.copyOnWrite == before.faults.copyOnWrite)
            #expect(after.faults.sigbus == before.faults.sigbus)
            #expect(after.freeBlocks == before.freeBlocks, "a load allocated a block")
            #expect(try file.frames(offset: 0, count: 3 * pageSize) == [nil, nil, nil])
            #expect(try file.read(count: 3 * pageSize, at: 0) == [UInt8](repeating: 0, count: 3 * pageSize))
            bbfExpectClean(fs, "after loads of holes")
        }
    }

    @Test("a store to a hole allocates one zeroed block, at that page only, seen by every mapping")
    func holeStoreAllocatesOnce() throws {
        try bbfWithFS(name: "holestore") { device, fs in
            try bbfRequireFaults(fs)
            let file = try fs.create("/sparse")
            defer { file.close() }
            try file.truncate(to: 2 * pageSize)
            let other = try fs.open("/sparse")
            defer { other.close() }
            let before = fs.statistics()
            let m1 = try file.map(count: 2 * pageSize)
            let m2 = try file.map(count: 2 * pageSize)
            let m3 = try other.map(count: 2 * pageSize)

            bbfStore(m1, 100, 0x5A)

            let after = fs.statistics()
            #expect(after.faults.allocating - before.faults.allocating == 1, "\(after.faults)")
            #expect(before.freeBlocks - after.freeBlocks == 1, "one block for one stored page")
            let frames = try file.frames(offset: 0, count: 2 * pageSize)
            #expect(frames.count == 2)
            #expect(frames[1] == nil, "the untouched page stayed a hole")
            let frame = try #require(frames[0])
            #expect(bbfLoad(m2, 100) == 0x5A)
            #expect(bbfLoad(m3, 100) == 0x5A, "a mapping of another handle of the file")
            var expected = zeroPage
            expected[100] = 0x5A
            #expect(try file.read(count: pageSize, at: 0) == expected, "the rest of the new block is zeros")
            #expect(try device.read(count: pageSize, at: Int(frame.rawValue) * pageSize) == expected, "zero copy")
            #expect(try file.read(count: pageSize, at: pageSize) == zeroPage)
            #expect(
                fs.statistics().faults.allocating == after.faults.allocating,
                "loads of the other mappings allocate nothing")

            let state = bbfState(fs, frame)
            #expect(state.isAllocated)
            #expect(state.mapCount == 3, "\(state)")
            #expect(state.refCount >= 3, "\(state)")
            m1.unmap()
            m2.unmap()
            m3.unmap()
            let unmapped = bbfState(fs, frame)
            #expect(unmapped.mapCount == 0 && unmapped.refCount == 0, "\(unmapped)")
            #expect(try file.read(count: pageSize, at: 0) == expected)
            bbfExpectClean(fs, "after a store to a hole")
        }
    }

    @Test("a load then a store or write() of a hole: the zero page is replaced in every mapping")
    func zeroPageThenStore() throws {
        try bbfWithFS(name: "zerothenstore") { _, fs in
            try bbfRequireFaults(fs)
            let file = try fs.create("/f")
            defer { file.close() }
            try file.truncate(to: 2 * pageSize)
            let m1 = try file.map(count: 2 * pageSize)
            let m2 = try file.map(count: 2 * pageSize)
            defer {
                m1.unmap()
                m2.unmap()
            }
            #expect(bbfLoad(m1, 7) == 0)
            #expect(bbfLoad(m2, 7) == 0)
            let before = fs.statistics()
            bbfStore(m1, 7, 0xC3)
            let after = fs.statistics()
            #expect(after.faults.allocating - before.faults.allocating == 1)
            #expect(bbfLoad(m2, 7) == 0xC3, "the other mapping still shows the zero page")
            #expect(try file.read(count: 8, at: 0) == [0, 0, 0, 0, 0, 0, 0, 0xC3])
            #expect(try file.frames(offset: 0, count: 2 * pageSize)[0] != nil)

            // write() into page 1, which both mappings saw as the zero page, shows through them.
            #expect(bbfLoad(m1, pageSize + 49) == 0 && bbfLoad(m2, pageSize + 50) == 0)
            let data = bbfPattern(300, seed: 4)
            try file.write(data, at: pageSize + 50)
            #expect(bbfBytes(m1, at: pageSize + 50, count: 300) == data, "write() hidden by the zero page")
            #expect(bbfBytes(m2, at: pageSize + 50, count: 300) == data, "write() hidden by the zero page")
            #expect(bbfLoad(m1, pageSize + 49) == 0)
            bbfExpectClean(fs, "after a store and a write over the zero page")
        }
    }

    @Test("threads storing to one hole page at once allocate one block and keep every byte")
    func concurrentStoresAllocateOnce() throws {
        try bbfWithFS(name: "concurrent") { _, fs in
            try bbfRequireFaults(fs)
            let file = try fs.create("/f")
            defer { file.close() }
            try file.truncate(to: pageSize)
            let mappings = try (0..<2).map { _ in try file.map(count: pageSize) }
            defer { for mapping in mappings { mapping.unmap() } }
            let before = fs.statistics()
            let threads = 6
            let ready = DispatchSemaphore(value: 0)
            let go = DispatchSemaphore(value: 0)
            let group = DispatchGroup()
            for index in 0..<threads {
                group.enter()
                let mapping = mappings[index % 2]
                Thread.detachNewThread {
                    ready.signal()
                    go.wait()
                    bbfStore(mapping, index * 64, UInt8(index + 1))
                    group.leave()
                }
            }
            for _ in 0..<threads { ready.wait() }
            for _ in 0..<threads { go.signal() }
            group.wait()
            let after = fs.statistics()
            #expect(after.faults.allocating - before.faults.allocating == 1, "\(after.faults)")
            #expect(before.freeBlocks - after.freeBlocks == 1)
            let read = try file.read(count: pageSize, at: 0)
            for index in 0..<threads {
                #expect(read[index * 64] == UInt8(index + 1), "thread \(index)'s byte was lost")
                #expect(bbfLoad(mappings[0], index * 64) == UInt8(index + 1))
                #expect(bbfLoad(mappings[1], index * 64) == UInt8(index + 1))
            }
            bbfExpectClean(fs, "after concurrent stores")
        }
    }

    @Test("a punched page inside the file reads zeros through the mapping; a store gives it a new block")
    func punchedPageIsAHole() throws {
        try bbfWithFS(name: "punch") { _, fs in
            try bbfRequireFaults(fs)
            let file = try fs.create("/f")
            defer { file.close() }
            let data = bbfPattern(2 * pageSize, seed: 5)
            try file.write(data, at: 0)
            let mapping = try file.map(count: 2 * pageSize)
            defer { mapping.unmap() }
            #expect(bbfBytes(mapping, at: 0, count: 2 * pageSize) == data)
            try file.punchHole(offset: 0, count: pageSize, ifBusy: .fail)
            #expect(file.size == 2 * pageSize)
            #expect(try file.frames(offset: 0, count: pageSize) == [nil])
            #expect(bbfBytes(mapping, at: 0, count: pageSize) == zeroPage, "no SIGBUS: a hole inside the file")
            #expect(bbfBytes(mapping, at: pageSize, count: pageSize) == Array(data[pageSize...]))
            let before = fs.statistics()
            bbfStore(mapping, 3, 0x88)
            #expect(fs.statistics().faults.allocating - before.faults.allocating == 1)
            var expected = zeroPage
            expected[3] = 0x88
            #expect(try file.read(count: pageSize, at: 0) == expected, "the new block reads zeros but the store")
            #expect(try file.frames(offset: 0, count: pageSize)[0] != nil)
            bbfExpectClean(fs, "after a store to a punched page")
        }
    }
}

// MARK: - End of file, truncate, access

@Suite("BlackBoxFaults: end of file and protection")
struct BlackBoxFaultEOFTests {
    @Test("truncate down then up: the old mapping reads zeros, write() and stores work again")
    func truncateDownThenUp() throws {
        try bbfWithFS(name: "truncupdown") { _, fs in
            try bbfRequireFaults(fs)
            let file = try fs.create("/f")
            defer { file.close() }
            let data = bbfPattern(3 * pageSize, seed: 6)
            try file.write(data, at: 0)
            let mapping = try file.map(count: 3 * pageSize)
            defer { mapping.unmap() }
            #expect(bbfBytes(mapping, at: 0, count: 3 * pageSize) == data)
            try file.truncate(to: 100, ifBusy: .fail)
            try file.truncate(to: 3 * pageSize, ifBusy: .fail)
            #expect(file.size == 3 * pageSize)
            // POSIX (and xfs): the grown range reads zeros, also in the tail of the partial page.
            #expect(bbfBytes(mapping, at: 0, count: 100) == Array(data[0..<100]))
            #expect(bbfBytes(mapping, at: 100, count: pageSize - 100).allSatisfy { $0 == 0 }, "stale tail")
            #expect(bbfBytes(mapping, at: pageSize, count: 2 * pageSize).allSatisfy { $0 == 0 }, "stale pages")
            #expect(
                try file.read(count: 3 * pageSize, at: 0) == Array(data[0..<100])
                    + [UInt8](repeating: 0, count: 3 * pageSize - 100))
            #expect(try file.frames(offset: pageSize, count: 2 * pageSize) == [nil, nil])
            // write() extends over page 1; the mapping sees it.
            let more = bbfPattern(50, seed: 7)
            try file.write(more, at: pageSize + 10)
            #expect(bbfBytes(mapping, at: pageSize + 10, count: 50) == more)
            // A store to page 2 gives it a block.
            bbfStore(mapping, 2 * pageSize + 5, 0x44)
            #expect(try file.read(count: 1, at: 2 * pageSize + 5) == [0x44])
            #expect(try file.frames(offset: 2 * pageSize, count: pageSize)[0] != nil)
            bbfExpectClean(fs, "after truncate down and up")
        }
    }

    @Test("a store past the end of the file (a page truncated away) faults with SIGBUS (child process)")
    func storePastEOFIsSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let fs = bbfChildFileSystem("eofstore")
            guard let file = try? fs.create("/t") else { exit(3) }
            do {
                try file.write(bbfPattern(2 * pageSize, seed: 8), at: 0)
                let mapping = try file.map(count: 2 * pageSize)
                _ = bbfLoad(mapping, pageSize)
                try file.truncate(to: pageSize, ifBusy: .fail)
                bbfStore(mapping, pageSize + 8, 0x11)
                exit(0)
            } catch { exit(4) }
        }
    }

    @Test("a SIGBUS of a store past the end is counted in faults.sigbus before it is delivered (child process)")
    func sigbusIsCounted() async {
        // The child catches the SIGBUS and exits 40 + the number of SIGBUS faults counted since
        // before the store (exit 40 would say the signal came but was not counted).
        await #expect(processExitsWith: .exitCode(41)) {
            let fs = bbfChildFileSystem("sigbuscount")
            guard let file = try? fs.create("/t") else { exit(3) }
            do {
                try file.write(bbfPattern(2 * pageSize, seed: 12), at: 0)
                let mapping = try file.map(count: 2 * pageSize)
                try file.truncate(to: pageSize, ifBusy: .fail)
                bbfSigbusFS = fs
                bbfSigbusBefore = fs.statistics().faults.sigbus
                signal(SIGBUS) { _ in
                    guard let fs = bbfSigbusFS else { _exit(39) }
                    _exit(Int32(40 + min(fs.statistics().faults.sigbus - bbfSigbusBefore, 9)))
                }
                bbfStore(mapping, pageSize + 8, 0x11)
                exit(0)
            } catch { exit(4) }
        }
    }

    @Test("a store through a read-only mapping of a data page is SIGSEGV (child process)")
    func storeThroughReadOnlyMappingIsSIGSEGV() async {
        await #expect(processExitsWith: .signal(SIGSEGV)) {
            let fs = bbfChildFileSystem("rostore", needsFaults: false)
            guard let writer = try? fs.create("/t") else { exit(3) }
            do {
                try writer.write([UInt8](repeating: 0x55, count: pageSize), at: 0)
                let reader = try fs.open("/t", access: .readOnly)
                let mapping = try reader.map(count: pageSize, access: .readOnly)
                guard bbfLoad(mapping, 1) == 0x55 else { exit(5) }
                bbfStore(mapping, 1, 0x66)
                exit(0)
            } catch { exit(4) }
        }
    }

    @Test("a store through a read-only mapping of a hole is SIGSEGV, not an allocation (child process)")
    func storeThroughReadOnlyHoleIsSIGSEGV() async {
        await #expect(processExitsWith: .signal(SIGSEGV)) {
            let fs = bbfChildFileSystem("roholestore", needsFaults: false)
            guard let writer = try? fs.create("/t") else { exit(3) }
            do {
                try writer.truncate(to: 2 * pageSize)
                let reader = try fs.open("/t", access: .readOnly)
                let mapping = try reader.map(count: 2 * pageSize, access: .readOnly)
                bbfStore(mapping, pageSize + 1, 0x66)
                exit(0)
            } catch { exit(4) }
        }
    }

    @Test("a store to a hole with no space left faults with SIGBUS (child process)")
    func storeToHoleWithoutSpaceIsSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let fs = bbfChildFileSystem("nospace", size: 4 << 20)
            guard let sparse = try? fs.create("/sparse"), let hog = try? fs.create("/hog") else { exit(3) }
            do {
                try sparse.truncate(to: pageSize)
                let mapping = try sparse.map(count: pageSize)
                var offset = 0
                while true {
                    do {
                        try hog.allocate(offset: offset, count: pageSize)
                        offset += pageSize
                    } catch let error as DAXError where error.code == .noSpace { break }
                }
                guard fs.statistics().freeBlocks == 0 else { exit(5) }
                bbfStore(mapping, 0, 0x77)
                exit(0)
            } catch { exit(4) }
        }
    }

    @Test("a read-only mapping of a hole reads zeros, then shows what a writer writes there")
    func readOnlyMappingSeesLaterWrite() throws {
        try bbfWithFS(name: "roseeswrite") { _, fs in
            try bbfRequireFaults(fs)
            let writer = try fs.create("/f")
            defer { writer.close() }
            try writer.truncate(to: 2 * pageSize)
            let reader = try fs.open("/f", access: .readOnly)
            defer { reader.close() }
            let mapping = try reader.map(count: 2 * pageSize, access: .readOnly)
            defer { mapping.unmap() }
            let free = fs.statistics().freeBlocks
            #expect(bbfBytes(mapping, at: 0, count: 2 * pageSize).allSatisfy { $0 == 0 })
            #expect(fs.statistics().freeBlocks == free)
            let data = bbfPattern(pageSize, seed: 9)
            try writer.write(data, at: pageSize)
            #expect(
                bbfBytes(mapping, at: pageSize, count: pageSize) == data, "the read-only mapping kept the zero page")
            // A store by a read-write mapping of the writer shows too.
            let rw = try writer.map(count: 2 * pageSize)
            defer { rw.unmap() }
            bbfStore(rw, 9, 0x99)
            #expect(bbfLoad(mapping, 9) == 0x99)
            bbfExpectClean(fs, "after writes under a read-only mapping")
        }
    }
}

// MARK: - Kernel-mode accesses and durability

@Suite("BlackBoxFaults: kernel accesses and sync")
struct BlackBoxFaultKernelAndSyncTests {
    @Test("read(2) into a hole of a mapping fills it (a kernel-mode fault); write(2) from a hole writes zeros")
    func systemCallsThroughHoles() throws {
        try bbfWithFS(name: "syscalls") { _, fs in
            try bbfRequireFaults(fs)
            let file = try fs.create("/f")
            defer { file.close() }
            try file.truncate(to: 2 * pageSize)
            let mapping = try file.map(count: 2 * pageSize)
            defer { mapping.unmap() }

            let tmpPath = bbfPath("plain")
            defer { unlink(tmpPath) }
            let source = bbfPattern(pageSize, seed: 10)
            #expect(FileManager.default.createFile(atPath: tmpPath, contents: Data(source)))
            let fd = Glibc.open(tmpPath, O_RDWR)
            try #require(fd >= 0)
            defer { Glibc.close(fd) }

            let got = pread(fd, mapping.baseAddress, pageSize, 0)
            #expect(got == pageSize, "errno \(errno)")
            #expect(try file.read(count: pageSize, at: 0) == source)
            #expect(try file.frames(offset: 0, count: pageSize)[0] != nil)

            // Page 1 is a hole: write(2) from it writes zeros and allocates nothing.
            let free = fs.statistics().freeBlocks
            let put = pwrite(fd, mapping.baseAddress + pageSize, pageSize, 0)
            #expect(put == pageSize, "errno \(errno)")
            #expect(FileManager.default.contents(atPath: tmpPath).map(Array.init) == zeroPage)
            #expect(try file.frames(offset: pageSize, count: pageSize) == [nil])
            #expect(fs.statistics().freeBlocks == free)
            bbfExpectClean(fs, "after system calls through holes")
        }
    }

    @Test("after sync one store makes one page unpersisted; sync makes it durable across a power failure")
    func syncThenOneStore() throws {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        options.powerFailureEmulation = .adr
        try bbfWithFS(size: 8 << 20, options: options, name: "sync") { device, fs in
            let file = try fs.create("/f")
            defer { file.close() }
            let data = bbfPattern(4 * pageSize, seed: 11)
            try file.write(data, at: 0)
            let mapping = try file.map(count: 4 * pageSize)
            defer { mapping.unmap() }
            _ = bbfBytes(mapping, at: 0, count: 4 * pageSize)
            try file.sync()
            let frames = try file.frames(offset: 0, count: 4 * pageSize).map { try #require($0) }
            let fileRanges = frames.map { Int($0.rawValue) * pageSize..<(Int($0.rawValue) + 1) * pageSize }
            func dirtyInFile() -> [Range<Int>] {
                device.unpersistedRanges().filter { range in fileRanges.contains { $0.overlaps(range) } }
            }
            #expect(dirtyInFile().isEmpty, "sync left file bytes unpersisted: \(dirtyInFile())")

            bbfStore(mapping, 2 * pageSize + 10, ~data[2 * pageSize + 10])
            let dirty = dirtyInFile()
            #expect(!dirty.isEmpty, "a store through the mapping is not listed")
            #expect(
                dirty.allSatisfy { fileRanges[2].contains($0.lowerBound) && $0.upperBound <= fileRanges[2].upperBound },
                "more than the stored page is unpersisted: \(dirty), page 2 is \(fileRanges[2])")

            // Not persisted: an image of a power failure now has the old byte.
            let before = bbfPath("img-before")
            defer { unlink(before) }
            try device.powerFail(writingImageTo: before, keeping: .none)
            let imageBefore = try PMemDevice.open(path: before)
            #expect(try imageBefore.read(count: 1, at: fileRanges[2].lowerBound + 10) == [data[2 * pageSize + 10]])
            imageBefore.close()

            try file.sync()
            #expect(dirtyInFile().isEmpty, "sync left the store unpersisted: \(dirtyInFile())")
            let after = bbfPath("img-after")
            defer { unlink(after) }
            try device.powerFail(writingImageTo: after, keeping: .none)
            let image = try PMemDevice.open(path: after)
            defer { image.close() }
            let imageFS = try DAXFileSystem.mount(image)
            defer { try? imageFS.unmount() }
            var expected = data
            expected[2 * pageSize + 10] = ~data[2 * pageSize + 10]
            let recovered = try imageFS.open("/f", access: .readOnly)
            #expect(try recovered.read(count: 4 * pageSize, at: 0) == expected)
            recovered.close()
            bbfExpectClean(imageFS, "the image after sync")
        }
    }
}
