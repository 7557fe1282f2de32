// Black-box tests of scale and resource limits, written only from the public API and the user
// docs, by a tester that did not read the sources: kernel mappings per DAX mapping (faults.md,
// "What a mapping is made of"), huge directories and deep trees, many pins, sparse devices of
// terabytes (README, architecture.md "Sparse devices", performance.md "Scale"), and operations whose
// journal transaction is large (format.md "Journal", forking.md "Clone and snapshot").
import DAX
import Dispatch
import Foundation
import Synchronization
import Testing

// MARK: - Helpers of this file only

private func scPath(_ name: String) -> String {
    "/dev/shm/bbscale-\(getpid())-\(name)-\(UUID().uuidString.prefix(8))"
}

/// A device (sparse unless told) with a fresh file system, removed afterwards.
private func scaleRig(_ name: String, size: Int, sparse: Bool = true, journalBlocks: Int? = nil) throws
    -> BlackBoxRig
{
    var options = PMemDevice.Options()
    options.sparse = sparse
    var format = DAXFileSystem.FormatOptions()
    if let journalBlocks { format.journalBlocks = journalBlocks }
    return try BlackBoxRig("bbscale-\(name)", size: size, options: options, format: format)
}

/// Bytes the file at `path` takes on its tmpfs.
private func storageBytes(_ path: String) -> Int {
    var info = stat()
    guard stat(path, &info) == 0 else { return -1 }
    return Int(info.st_blocks) * 512
}

/// Kernel mappings (lines of /proc/self/maps) that overlap [base, base + count).
private func kernelMappings(overlapping base: UnsafeMutableRawPointer, count: Int) -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/maps", encoding: .utf8) else { return -1 }
    let low = UInt(bitPattern: base)
    let high = low + UInt(count)
    var n = 0
    for line in text.split(separator: "\n") {
        guard let range = line.split(separator: " ").first else { continue }
        let parts = range.split(separator: "-")
        guard parts.count == 2, let start = UInt(parts[0], radix: 16), let end = UInt(parts[1], radix: 16) else {
            continue
        }
        if start < high && end > low { n += 1 }
    }
    return n
}

private func allKernelMappings() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/maps", encoding: .utf8) else { return -1 }
    return text.split(separator: "\n").count
}

/// Runs of consecutive pages whose frames are consecutive (holes are runs of their own).
private func frameRuns(_ frames: [PageFrameNumber?]) -> (data: Int, holes: Int) {
    var data = 0
    var holes = 0
    var previous: PageFrameNumber?? = .none
    for frame in frames {
        switch (previous, frame) {
        case (.some(.some(let p)), .some(let f)) where f.rawValue == p.rawValue + 1: break
        case (.some(.none), .none): break
        case (_, .some): data += 1
        case (_, .none): holes += 1
        }
        previous = .some(frame)
    }
    return (data, holes)
}

private func scPattern(_ count: Int, seed: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ ($0 >> 12) &+ seed &* 41 &+ 7) }
}

private let page = 4096

@Suite("Black box: scale and resource limits", .serialized)
struct BlackBoxScaleTests {

    // MARK: - Kernel mappings follow extents, not pages

    @Test("a 1 GiB file with 1,024 data pages among holes maps with kernel mappings per run, not per page")
    func sparseGiBMappingCostsPerRun() throws {
        let rig = try scaleRig("sparse-map", size: 64 << 20)
        let file = try rig.fs.create("/big")
        defer { file.close() }
        let pages = 1 << 18  // 1 GiB
        let stride = 256
        for index in stride_from(0, pages, stride) {
            try file.write(scPattern(page, seed: index), at: index * page + page)  // page index*stride+1
        }
        try file.truncate(to: pages * page)
        #expect(file.size == pages * page)
        let frames = try file.frames(offset: 0, count: pages * page)
        #expect(frames.count == pages)
        let runs = frameRuns(frames)
        #expect(runs.data == pages / stride)
        let mapping = try file.map(count: pages * page)
        defer { mapping.unmap() }
        let vmas = kernelMappings(overlapping: mapping.baseAddress, count: mapping.count)
        #expect(vmas <= 2 * (runs.data + runs.holes) + 8, "\(vmas) kernel mappings for \(runs)")
        #expect(vmas < 65530 / 8)
        // Every data page reads its bytes through the mapping; a hole reads zeros.
        for index in stride_from(0, pages, stride * 16) {
            let bytes = mapping.baseAddress.advanced(by: index * page + page).assumingMemoryBound(to: UInt8.self)
            #expect(bytes[0] == scPattern(16, seed: index)[0] && bytes[4095] == scPattern(page, seed: index)[4095])
            #expect(mapping.baseAddress.load(fromByteOffset: index * page, as: UInt64.self) == 0)
        }
        #expect(try rig.fs.check().isClean)
    }

    @Test("every other page of a 64 MiB hole-file stored through a mapping, then the rest: mappings follow runs")
    func alternatingStoresThenFill() throws {
        let rig = try scaleRig("alt-store", size: 256 << 20)
        guard case .userfaultfd = rig.fs.faultHandling else { return }
        let file = try rig.fs.create("/alt")
        defer { file.close() }
        let pages = 16384
        try file.truncate(to: pages * page)
        let mapping = try file.map(count: pages * page)
        defer { mapping.unmap() }
        for index in stride_from(0, pages, 2) {
            mapping.baseAddress.storeBytes(of: UInt64(index + 1), toByteOffset: index * page, as: UInt64.self)
        }
        var runs = frameRuns(try file.frames(offset: 0, count: pages * page))
        var vmas = kernelMappings(overlapping: mapping.baseAddress, count: mapping.count)
        #expect(vmas <= 2 * (runs.data + runs.holes) + 8, "after odd stores: \(vmas) for \(runs)")
        #expect(rig.fs.statistics().faults.allocating >= pages / 2)
        for index in stride_from(1, pages, 2) {
            mapping.baseAddress.storeBytes(of: UInt64(index + 1), toByteOffset: index * page, as: UInt64.self)
        }
        runs = frameRuns(try file.frames(offset: 0, count: pages * page))
        #expect(runs.holes == 0)
        vmas = kernelMappings(overlapping: mapping.baseAddress, count: mapping.count)
        #expect(vmas <= 2 * runs.data + 8, "after filling: \(vmas) for \(runs)")
        for index in [0, 1, 2, pages / 2 + 1, pages - 1] {
            #expect(try file.read(count: 8, at: index * page) == withUnsafeBytes(of: UInt64(index + 1)) { Array($0) })
        }
        try file.sync()
        #expect(try rig.fs.check().isClean)
    }

    @Test("a backward fill of 64 MiB of holes through a mapping comes out as one extent and few mappings")
    func backwardFillOneExtent() throws {
        let rig = try scaleRig("backfill", size: 256 << 20)
        guard case .userfaultfd = rig.fs.faultHandling else { return }
        let file = try rig.fs.create("/back")
        defer { file.close() }
        let pages = 16384
        try file.truncate(to: pages * page)
        let mapping = try file.map(count: pages * page)
        defer { mapping.unmap() }
        for index in (0..<pages).reversed() {
            mapping.baseAddress.storeBytes(of: UInt32(index), toByteOffset: index * page + 100, as: UInt32.self)
        }
        let runs = frameRuns(try file.frames(offset: 0, count: pages * page))
        #expect(runs.data == 1 && runs.holes == 0, "\(runs)")
        let vmas = kernelMappings(overlapping: mapping.baseAddress, count: mapping.count)
        #expect(vmas <= 8, "\(vmas) kernel mappings after a backward fill")
    }

    @Test("one file mapped 2,000 times: counts exact, stores shared, every kernel mapping given back")
    func manyMappingsOfOneFile() throws {
        let rig = try scaleRig("many-maps", size: 32 << 20)
        let file = try rig.fs.create("/shared")
        defer { file.close() }
        try file.write(scPattern(4 * page, seed: 3), at: 0)
        let frame = try #require(try file.frames(offset: 0, count: page)[0])
        let before = allKernelMappings()
        var mappings: [DAXMapping] = []
        for _ in 0..<2000 { mappings.append(try file.map(count: 4 * page)) }
        #expect(rig.fs.pages.state(of: frame).mapCount == 2000)
        #expect(allKernelMappings() - before <= 2000 * 2 + 64)
        mappings[1999].baseAddress.storeBytes(of: 0xAB, toByteOffset: 7, as: UInt8.self)
        #expect(mappings[0].baseAddress.load(fromByteOffset: 7, as: UInt8.self) == 0xAB)
        #expect(try rig.fs.unmount_busy())
        for mapping in mappings { mapping.unmap() }
        mappings.removeAll()
        let state = rig.fs.pages.state(of: frame)
        #expect(state.mapCount == 0 && state.pinCount == 0)
        #expect(allKernelMappings() - before <= 64)
        #expect(try file.read(count: 1, at: 7) == [0xAB])
    }

    @Test("3,000 files mapped at once, then unmapped and removed: blocks and mappings all come back")
    func manyFilesMappedAtOnce() throws {
        let rig = try scaleRig("many-files", size: 128 << 20)
        try rig.fs.createDirectory("/m")
        try rig.fs.createDirectory("/m2")
        try rig.fs.remove("/m2")
        let free0 = rig.fs.statistics().freeBlocks
        let before = allKernelMappings()
        var files: [DAXFile] = []
        var mappings: [DAXMapping] = []
        for index in 0..<3000 {
            let file = try rig.fs.create("/m/f\(index)")
            try file.write(scPattern(2 * page, seed: index), at: 0)
            files.append(file)
            mappings.append(try file.map(count: 2 * page))
        }
        #expect(allKernelMappings() - before <= 3000 * 2 + 64)
        for index in stride_from(0, 3000, 97) {
            #expect(
                mappings[index].baseAddress.load(fromByteOffset: 5000, as: UInt8.self)
                    == scPattern(5001, seed: index)[5000])
        }
        for mapping in mappings { mapping.unmap() }
        for file in files { file.close() }
        for index in 0..<3000 { try rig.fs.remove("/m/f\(index)") }
        #expect(try rig.fs.contentsOfDirectory("/m").isEmpty)
        try rig.fs.remove("/m")  // directories need not shrink; removing one gives its blocks back
        #expect(allKernelMappings() - before <= 64)
        #expect(rig.fs.statistics().freeBlocks == free0)
        #expect(try rig.fs.contentsOfDirectory("/").isEmpty)
        #expect(try rig.fs.check().isClean)
    }

    @Test(
        "a layout needing more kernel mappings than vm.max_map_count: a DAXError or a working mapping, never a crash (child)"
    )
    func mappingBeyondMaxMapCount() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            alarm(50)
            let path = "/dev/shm/bbscale-maxmap-\(getpid())"
            var options = PMemDevice.Options()
            options.sparse = true
            guard let device = try? PMemDevice.create(path: path, size: 256 << 20, options: options) else { exit(2) }
            unlink(path)
            guard let fs = try? DAXFileSystem.format(device), let file = try? fs.create("/holey") else { exit(3) }
            let steps = ChildSteps()
            let pages = 80_000  // 40,000 data runs and 40,000 holes
            let one = [UInt8](repeating: 0x5A, count: 16)
            func tell(_ text: String) { FileHandle.standardError.write(Data("step \(text)\n".utf8)) }
            func run(_ name: String, mustSucceed: Bool = true, _ body: () throws -> Void) {
                tell(name)
                do { try body() } catch let error as DAXError {
                    if mustSucceed { steps.mismatch("\(name): \(error)") } else { tell("\(name): DAXError \(error)") }
                } catch { steps.mismatch("\(name): not a DAXError: \(error)") }
            }
            do {
                for index in stride_from(0, pages, 2) { try file.write(one, at: index * 4096) }
                try file.truncate(to: pages * 4096)
            } catch { exit(4) }
            run("map 80,000 alternating pages", mustSucceed: false) {
                let mapping = try file.map(count: pages * 4096, access: .readOnly)
                var bad = 0
                for index in stride_from(0, pages, 2)
                where mapping.baseAddress.load(fromByteOffset: index * 4096, as: UInt8.self) != 0x5A { bad += 1 }
                if bad != 0 { steps.mismatch("map succeeded but \(bad) data pages read wrong") }
                mapping.unmap()
            }
            run("a small mapping afterwards") {
                let small = try file.map(count: 8192)
                if small.baseAddress.load(as: UInt8.self) != 0x5A { steps.mismatch("small mapping reads wrong") }
                small.unmap()
            }
            run("check") { if !(try fs.check().isClean) { steps.mismatch("check not clean") } }
            file.close()
            steps.exitWithResult()
        }
        ChildSteps.expectPassed(result)
    }

    // MARK: - Directories: many entries, deep trees

    @Test("20,000 entries in one directory: created, listed sorted, looked up, removed, remounted")
    func hugeDirectory() throws {
        let rig = try scaleRig("bigdir", size: 512 << 20)
        try rig.fs.createDirectory("/d")
        let free0 = rig.fs.statistics().freeBlocks
        let count = 20_000
        let names = (0..<count).map { "entry-\(String(format: "%05d", ($0 &* 7919) % count))" }
        for name in names { try rig.fs.create("/d/\(name)").close() }
        let listed = try rig.fs.contentsOfDirectory("/d")
        #expect(listed.count == count)
        #expect(listed == names.sorted())
        expectDAXError(.alreadyExists, "duplicate in a full directory") { try rig.fs.create("/d/entry-12345") }
        for index in stride_from(0, count, 997) {
            try rig.fs.open("/d/entry-\(String(format: "%05d", index))").close()
        }
        expectDAXError(.notFound, "missing in a full directory") { try rig.fs.open("/d/entry-99999") }
        expectDAXError(.directoryNotEmpty, "remove a full directory") { try rig.fs.remove("/d") }
        try rig.remount()
        #expect(try rig.fs.contentsOfDirectory("/d") == names.sorted())
        #expect(try rig.fs.check().isClean)
        for name in names { try rig.fs.remove("/d/\(name)") }
        #expect(try rig.fs.contentsOfDirectory("/d").isEmpty)
        try rig.fs.remove("/d")
        #expect(rig.fs.statistics().freeBlocks >= free0)
        #expect(try rig.fs.check().isClean)
    }

    @Test("a tree 600 directories deep: create, snapshot, rename, cycle refused, check, remount, remove")
    func deepTree() throws {
        let rig = try scaleRig("deep", size: 64 << 20)
        let depth = 600
        var path = ""
        var paths: [String] = []
        for _ in 0..<depth {
            path += "/d"
            try rig.fs.createDirectory(path)
            paths.append(path)
        }
        let leafData = scPattern(3 * page, seed: 9)
        let leaf = try rig.fs.create(path + "/leaf")
        try leaf.write(leafData, at: 0)
        leaf.close()
        try rig.fs.clone("/d", to: "/snap")
        let snapLeaf = "/snap" + String(path.dropFirst(2)) + "/leaf"
        #expect(try rig.fs.open(snapLeaf).read(count: 3 * page, at: 0) == leafData)
        // A rename of the top into its own deepest descendant is a cycle.
        expectDAXError(.invalidArgument, "rename into its own descendant") { try rig.fs.rename("/d", to: path + "/x") }
        #expect(try rig.fs.contentsOfDirectory("/") == ["d", "snap"])
        // Move the subtree from depth 300 to the root.
        try rig.fs.rename(paths[299], to: "/moved")
        let movedLeaf = "/moved" + String(repeating: "/d", count: depth - 300) + "/leaf"
        #expect(try rig.fs.open(movedLeaf).read(count: 3 * page, at: 0) == leafData)
        #expect(try rig.fs.check().isClean)
        try rig.remount()
        #expect(try rig.fs.check().isClean)
        #expect(try rig.fs.open(snapLeaf).read(count: 3 * page, at: 0) == leafData)
        // Writing the snapshot's leaf leaves the original alone.
        let snap = try rig.fs.open(snapLeaf)
        try snap.write([1, 2, 3], at: 0)
        snap.close()
        #expect(try rig.fs.open(movedLeaf).read(count: 3, at: 0) == Array(leafData.prefix(3)))
        #expect(rig.fs.statistics().sharedBlocks == 2)
    }

    // MARK: - Pins at scale

    @Test("one DMA registration of 16,384 pages: pin counts exact, DMA by frame reaches the file, all released")
    func oneHugeRegistration() throws {
        let rig = try scaleRig("bigpin", size: 256 << 20)
        let file = try rig.fs.create("/dma")
        defer { file.close() }
        let pages = 16384
        try file.allocate(offset: 0, count: pages * page)
        let mapping = try file.map(count: pages * page)
        defer { mapping.unmap() }
        let s0 = rig.fs.statistics()
        let engine = DMAEngine(device: rig.device)
        let region = engine.register(try mapping.pin(offset: 0, count: pages * page))
        #expect(region.frames.count == pages)
        #expect(Set(region.frames).count == pages)
        let s1 = rig.fs.statistics()
        #expect(s1.pinnedPages - s0.pinnedPages == pages)
        #expect(s1.pinsAcquired - s0.pinsAcquired == pages)
        try engine.write([9, 8, 7], to: region, at: pages * page - 3)
        #expect(try file.read(count: 3, at: pages * page - 3) == [9, 8, 7])
        for frame in region.frames.prefix(4) { #expect(rig.fs.pages.state(of: frame).pinCount == 1) }
        expectDAXError(.busy, "unmount while pinned") { try rig.fs.unmount() }
        engine.deregister(region)
        let s2 = rig.fs.statistics()
        #expect(s2.pinnedPages == s0.pinnedPages)
        #expect(s2.pinsReleased - s0.pinsReleased == pages)
        #expect(s2.pinsAcquired - s2.pinsReleased == s2.pinnedPages)
    }

    @Test("4,096 one-page registrations across truncate policies: fail, wait, deferFree; quarantine exact")
    func manySmallPinsAcrossTruncate() throws {
        let rig = try scaleRig("smallpins", size: 128 << 20)
        let file = try rig.fs.create("/t")
        try rig.fs.create("/other-placeholder").close()  // the root directory has its block now
        let free0 = rig.fs.statistics().freeBlocks
        defer { file.close() }
        let pages = 4096
        let data = scPattern(pages * page, seed: 5)
        try file.write(data, at: 0)
        let mapping = try file.map(count: pages * page)
        let engine = DMAEngine(device: rig.device)
        var regions: [DMARegion] = []
        let s0 = rig.fs.statistics()
        for index in 0..<pages {
            regions.append(engine.register(try mapping.pin(offset: index * page, count: page)))
        }
        #expect(rig.fs.statistics().pinnedPages - s0.pinnedPages == pages)
        #expect(rig.fs.statistics().pinsAcquired - s0.pinsAcquired == pages)
        expectDAXError(.busy, "truncate .fail") { try file.truncate(to: 0, ifBusy: .fail) }
        #expect(file.size == pages * page)
        expectDAXError(.timedOut, "truncate .wait") {
            try file.truncate(to: page, ifBusy: .wait(timeout: .milliseconds(30)))
        }
        #expect(file.size == pages * page)
        #expect(try file.read(count: pages * page, at: 0) == data)
        #expect(
            mapping.baseAddress.load(fromByteOffset: (pages - 1) * page + 9, as: UInt8.self)
                == data[(pages - 1) * page + 9])
        mapping.unmap()
        try file.truncate(to: 0, ifBusy: .deferFree)
        #expect(file.size == 0)
        let s1 = rig.fs.statistics()
        #expect(s1.quarantinedBlocks == pages)
        #expect(s1.freeBlocks == free0 - pages)  // the quarantined ones are not reusable yet
        // A new file never gets a quarantined block.
        let other = try rig.fs.create("/other")
        try other.write(scPattern(64 * page, seed: 1), at: 0)
        let pinnedFrames = Set(regions.map { $0.frames[0] })
        for frame in try other.frames(offset: 0, count: 64 * page) { #expect(!pinnedFrames.contains(frame!)) }
        try engine.write([1, 2, 3, 4], to: regions[4095], at: 0)
        #expect(try other.read(count: 64 * page, at: 0) == scPattern(64 * page, seed: 1))
        other.close()
        try rig.fs.remove("/other")
        for region in regions { engine.deregister(region) }
        regions.removeAll()
        let s2 = rig.fs.statistics()
        #expect(s2.quarantinedBlocks == 0)
        #expect(s2.pinnedPages == s0.pinnedPages)
        #expect(s2.pinsReleased - s0.pinsReleased == pages)
        #expect(s2.freeBlocks == free0)
        #expect(try rig.fs.check().isClean)
    }

    @Test("2,000 long-term pins revoked by one truncate: every region revoked, counts released once")
    func manyLeasesRevoked() throws {
        let rig = try scaleRig("leases", size: 64 << 20)
        let file = try rig.fs.create("/lease")
        defer { file.close() }
        let pages = 2000
        try file.write(scPattern(pages * page, seed: 2), at: 0)
        let mapping = try file.map(count: pages * page, access: .readWrite)
        let engine = DMAEngine(device: rig.device)
        let asked = Counter()
        let s0 = rig.fs.statistics()
        var regions: [DMARegion] = []
        for index in 0..<pages {
            regions.append(
                engine.register(
                    try mapping.pin(
                        offset: index * page, count: page, lifetime: .longTerm(onRevoke: { asked.increment() }))))
        }
        mapping.unmap()
        try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .milliseconds(20)))
        #expect(asked.value == pages)
        #expect(regions.allSatisfy { $0.isRevoked })
        let s1 = rig.fs.statistics()
        #expect(s1.pinnedPages == s0.pinnedPages)
        #expect(s1.pinsReleased - s0.pinsReleased == pages)
        #expect(s1.quarantinedBlocks == 0)
        expectDAXError(.revoked, "DMA to a revoked region") { try engine.write([1], to: regions[1234], at: 0) }
        for region in regions { engine.deregister(region) }
        let s2 = rig.fs.statistics()
        #expect(s2.pinsReleased == s1.pinsReleased)
        #expect(s2.pinsAcquired - s2.pinsReleased == s2.pinnedPages)
        #expect(try rig.fs.check().isClean)
    }

    // MARK: - Devices near the size limits

    @Test("a sparse 4 TiB device: create, format, mount, files far apart, check; tmpfs barely used")
    func sparseTerabyteDevice() throws {
        let rig = try scaleRig("4tib", size: 4 << 40)
        #expect(rig.device.size == 4 << 40)
        #expect(rig.device.pageCount == (4 << 40) / page)
        let file = try rig.fs.create("/far")
        let data = scPattern(1 << 20, seed: 4)
        try file.write(data, at: 0)
        try file.write(data, at: 3 << 40)  // a file of 3 TiB + 1 MiB, two extents
        #expect(file.size == (3 << 40) + (1 << 20))
        #expect(try file.read(count: 1 << 20, at: 3 << 40) == data)
        #expect(try file.frames(offset: 1 << 40, count: page) == [nil])
        file.close()
        let stats = rig.fs.statistics()
        #expect(stats.totalBlocks - stats.freeBlocks < 4096)
        try rig.remount()
        #expect(try rig.fs.check().isClean)
        #expect(try rig.fs.open("/far").read(count: 16, at: 3 << 40) == Array(data.prefix(16)))
        #expect(storageBytes(rig.path) < 64 << 20, "\(storageBytes(rig.path)) bytes of tmpfs")
    }

    @Test("a non-sparse device larger than the tmpfs: DAXError, and the tmpfs keeps its space")
    func deviceLargerThanTmpfs() throws {
        var fsinfo = statvfs()
        #expect(statvfs("/dev/shm", &fsinfo) == 0)
        let freeBefore = Int(fsinfo.f_bavail) * Int(fsinfo.f_frsize)
        let path = scPath("huge")
        defer { unlink(path) }
        let size = (Int(fsinfo.f_blocks) * Int(fsinfo.f_frsize) + (1 << 30)) & ~(page - 1)
        do {
            let device = try PMemDevice.create(path: path, size: size)
            device.close()
            Issue.record("a \(size)-byte non-sparse device was created on a smaller tmpfs")
        } catch let error as DAXError {
            #expect(!error.message.isEmpty)
        }
        #expect(statvfs("/dev/shm", &fsinfo) == 0)
        let freeAfter = Int(fsinfo.f_bavail) * Int(fsinfo.f_frsize)
        #expect(freeBefore - freeAfter < 256 << 20, "tmpfs lost \(freeBefore - freeAfter) bytes")
    }

    @Test("the inode table runs out: .noSpace with a message, nothing half made, room again after a remove")
    func inodesRunOut() throws {
        let rig = try scaleRig("inodes", size: 2 << 20, sparse: false)
        var made = 0
        var failure: DAXError?
        for index in 0..<10_000 {
            do {
                try rig.fs.create("/i\(index)").close()
                made += 1
            } catch let error as DAXError {
                failure = error
                break
            }
        }
        let error = try #require(failure)
        #expect(error.code == .noSpace, "\(error)")
        #expect(made >= 32 && made < 10_000)
        #expect(try rig.fs.contentsOfDirectory("/").count == made)
        expectDAXError(.noSpace, "mkdir with no inode") { try rig.fs.createDirectory("/dir") }
        #expect(try rig.fs.check().isClean)
        try rig.fs.remove("/i0")
        try rig.fs.create("/again").close()
        #expect(try rig.fs.check().isClean)
    }

    @Test("a write or allocate larger than the free space: .noSpace, size and free blocks unchanged")
    func spaceRunsOut() throws {
        let rig = try scaleRig("full", size: 16 << 20, sparse: false)
        let file = try rig.fs.create("/big")
        defer { file.close() }
        try file.write(scPattern(page, seed: 1), at: 0)
        let free0 = rig.fs.statistics().freeBlocks
        let tooMuch = (free0 + 16) * page
        expectDAXError(.noSpace, "write past the free space") {
            try file.write([UInt8](repeating: 1, count: tooMuch), at: page)
        }
        #expect(file.size == page)
        #expect(rig.fs.statistics().freeBlocks == free0)
        expectDAXError(.noSpace, "allocate past the free space") { try file.allocate(offset: page, count: tooMuch) }
        #expect(file.size == page)
        #expect(rig.fs.statistics().freeBlocks == free0)
        #expect(try file.read(count: page, at: 0) == scPattern(page, seed: 1))
        #expect(try rig.fs.check().isClean)
    }

    // MARK: - Journal capacity

    @Test("a snapshot of 3,000 files under a 64-block journal: complete, or .noSpace with nothing written")
    func snapshotLargerThanJournal() throws {
        let rig = try scaleRig("snapjournal", size: 128 << 20, journalBlocks: 64)
        try rig.fs.createDirectory("/tree")
        for d in 0..<30 {
            try rig.fs.createDirectory("/tree/d\(d)")
            for f in 0..<100 {
                let file = try rig.fs.create("/tree/d\(d)/f\(f)")
                try file.write(scPattern(64, seed: d * 100 + f), at: 0)
                file.close()
            }
        }
        let s0 = rig.fs.statistics()
        do {
            try rig.fs.clone("/tree", to: "/snap")
            #expect(try rig.fs.contentsOfDirectory("/snap").count == 30)
            #expect(try rig.fs.contentsOfDirectory("/snap/d29").count == 100)
            #expect(try rig.fs.open("/snap/d17/f42").read(count: 64, at: 0) == scPattern(64, seed: 1742))
            #expect(rig.fs.statistics().sharedBlocks == 3000)
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
            #expect(error.message.contains("journal") || error.message.contains("transaction"), "\(error.message)")
            #expect(try rig.fs.contentsOfDirectory("/") == ["tree"])
            let s1 = rig.fs.statistics()
            #expect(s1.freeBlocks == s0.freeBlocks && s1.sharedBlocks == 0)
            // And room is left for ordinary work.
            try rig.fs.clone("/tree/d3", to: "/small")
            #expect(try rig.fs.contentsOfDirectory("/small").count == 100)
        }
        #expect(try rig.fs.check().isClean)
        try rig.remount()
        #expect(try rig.fs.check().isClean)
    }

    @Test("truncate and remove of a file of 8,192 extents under a 64-block journal: all or nothing, clean")
    func truncateManyExtentsSmallJournal() throws {
        let rig = try scaleRig("extents", size: 128 << 20, journalBlocks: 64)
        let file = try rig.fs.create("/frag")
        let free0 = rig.fs.statistics().freeBlocks
        defer { file.close() }
        let extents = 8192
        for index in 0..<extents {
            try file.write(scPattern(64, seed: index), at: index * 2 * page)
        }
        let runs = frameRuns(try file.frames(offset: 0, count: file.size))
        #expect(runs.data == extents)
        let size0 = file.size
        do {
            try file.truncate(to: 3 * page * 1000 + 17)  // keep 1,500 extents
            #expect(file.size == 3 * page * 1000 + 17)
            #expect(try file.read(count: 64, at: 2 * page * 1000) == scPattern(64, seed: 1000))
            #expect(try file.read(count: 64, at: 2 * page * 1499) == scPattern(64, seed: 1499))
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
            #expect(file.size == size0)
            #expect(try file.read(count: 64, at: 2 * page * 8191) == scPattern(64, seed: 8191))
        }
        #expect(try rig.fs.check().isClean)
        do {
            try file.punchHole(offset: 0, count: 2 * page * 1000)
            #expect(try file.frames(offset: 0, count: 2 * page * 1000).allSatisfy { $0 == nil })
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
            #expect(try file.read(count: 64, at: 0) == scPattern(64, seed: 0))
        }
        #expect(try rig.fs.check().isClean)
        try file.truncate(to: 0)
        #expect(file.size == 0)
        #expect(rig.fs.statistics().freeBlocks == free0)
        file.close()
        try rig.fs.remove("/frag")
        try rig.remount()
        #expect(try rig.fs.check().isClean)
    }

    @Test("dedup of 4 MiB against a fragmented source under a 64-block journal: consistent, shared count exact")
    func dedupLongFragmentedRange() throws {
        let rig = try scaleRig("dedup", size: 256 << 20, journalBlocks: 64)
        let pages = 1024
        let source = try rig.fs.create("/src")
        let filler = try rig.fs.create("/filler")
        // Interleave so that the source's blocks are not adjacent.
        for index in 0..<pages {
            try source.write(scPattern(page, seed: index), at: index * page)
            try filler.write(scPattern(page, seed: -index), at: index * page)
        }
        filler.close()
        let destination = try rig.fs.create("/dst")
        var all: [UInt8] = []
        all.reserveCapacity(pages * page)
        for index in 0..<pages { all += scPattern(page, seed: index) }
        try destination.write(all, at: 0)
        let free0 = rig.fs.statistics().freeBlocks
        var shared = 0
        do {
            shared = try rig.fs.deduplicate("/src", offset: 0, "/dst", offset: 0, count: pages * page)
            #expect(shared % page == 0 && shared <= pages * page)
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
        }
        let stats = rig.fs.statistics()
        #expect(stats.sharedBlocks == shared / page)
        #expect(stats.freeBlocks == free0 + shared / page)
        let sf = try source.frames(offset: 0, count: pages * page)
        let df = try destination.frames(offset: 0, count: pages * page)
        #expect(zip(sf, df).filter { $0 == $1 }.count == shared / page)
        #expect(try destination.read(count: pages * page, at: 0) == all)
        #expect(try rig.fs.check().isClean)
        source.close()
        destination.close()
        try rig.remount()
        #expect(try rig.fs.check().isClean)
        #expect(rig.fs.statistics().sharedBlocks == shared / page)
    }
}

private struct Done: Error {}

private func stride_from(_ from: Int, _ to: Int, _ by: Int) -> StrideTo<Int> { stride(from: from, to: to, by: by) }

extension DAXFileSystem {
    /// True when unmount refuses with .busy (mappings live).
    fileprivate func unmount_busy() throws -> Bool {
        do {
            try unmount()
            return false
        } catch let error as DAXError {
            return error.code == .busy
        }
    }
}
