// Black-box tests: crash consistency of the forking operations (clone, snapshot, dedup,
// migrate) and of fault-time allocation (copy-on-write and allocating stores through mappings),
// with and without DMA pins. Written from the public API, README.md and docs/*.md only, by a
// tester that did not read the sources.
//
// Every crash image is mounted (which replays the journal), checked, compared with the states
// before and after the operation in flight, and then audited: each block's reference count is the
// number of file pages that name it, `sharedBlocks` is the number of blocks named more than once,
// and removing every file and directory gives back exactly the free blocks of a fresh format.

import DAX
import Foundation
import Glibc
import Synchronization
import Testing

private let cfPage = 4096

private struct CrashForkFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

private func cfPattern(_ count: Int, seed: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: ($0 &* 131) &+ ($0 >> 9) &+ seed &* 37 &+ 1) }
}

private func cfZeros(_ count: Int) -> [UInt8] { [UInt8](repeating: 0, count: count) }

/// What a file system holds: files (bytes, frames, reference counts per page) and directories.
private struct CrashForkInventory: CustomStringConvertible {
    var files: [String: [UInt8]] = [:]
    var directories: Set<String> = []
    var frames: [String: [PageFrameNumber?]] = [:]
    var references: [String: [Int]] = [:]

    var tree: [String: [UInt8]?] {
        var result: [String: [UInt8]?] = [:]
        for (path, bytes) in files { result[path] = .some(bytes) }
        for path in directories { result[path] = .some(nil) }
        return result
    }

    var description: String {
        let f = files.keys.sorted().map { "\($0):\(files[$0]!.count)" }
        return "files \(f) dirs \(directories.sorted())"
    }
}

private func cfInventory(_ fs: DAXFileSystem, _ directory: String = "/", into inventory: inout CrashForkInventory)
    throws
{
    for name in try fs.contentsOfDirectory(directory) {
        let path = directory == "/" ? "/" + name : directory + "/" + name
        let file: DAXFile
        do {
            file = try fs.open(path, access: .readOnly)
        } catch let error as DAXError where error.code == .isADirectory {
            inventory.directories.insert(path)
            try cfInventory(fs, path, into: &inventory)
            continue
        }
        defer { file.close() }
        inventory.files[path] = try file.read(count: file.size, at: 0)
        if file.size > 0 {
            inventory.frames[path] = try file.frames(offset: 0, count: file.size)
            inventory.references[path] = try file.blockReferences(offset: 0, count: file.size)
        } else {
            inventory.frames[path] = []
            inventory.references[path] = []
        }
    }
}

private func cfInventory(_ fs: DAXFileSystem) throws -> CrashForkInventory {
    var inventory = CrashForkInventory()
    try cfInventory(fs, into: &inventory)
    return inventory
}

private func cfRead(_ fs: DAXFileSystem, _ path: String) throws -> [UInt8]? {
    let file: DAXFile
    do { file = try fs.open(path, access: .readOnly) } catch let error as DAXError where error.code == .notFound {
        return nil
    }
    defer { file.close() }
    return try file.read(count: file.size, at: 0)
}

/// The audit every recovered image must pass: clean, no pins or quarantine, reference counts and
/// `sharedBlocks` as the files' frames say, and removing everything gives back `postFormatFree`.
private func cfAudit(_ fs: DAXFileSystem, postFormatFree: Int, _ what: String) throws {
    let report = try fs.check()
    guard report.isClean else { throw CrashForkFailure("\(what): check not clean: \(report.problems.prefix(4))") }
    let statistics = fs.statistics()
    guard statistics.pinnedPages == 0, statistics.quarantinedBlocks == 0 else {
        throw CrashForkFailure("\(what): pins \(statistics.pinnedPages), quarantined \(statistics.quarantinedBlocks)")
    }
    let inventory = try cfInventory(fs)
    var names: [UInt64: Int] = [:]
    for frames in inventory.frames.values {
        for frame in frames { if let frame { names[frame.rawValue, default: 0] += 1 } }
    }
    for (path, frames) in inventory.frames {
        let references = inventory.references[path]!
        for (index, frame) in frames.enumerated() {
            guard let frame else { continue }
            guard references[index] == names[frame.rawValue]! else {
                throw CrashForkFailure(
                    "\(what): \(path) page \(index) (frame \(frame.rawValue)) has \(references[index]) references, "
                        + "named \(names[frame.rawValue]!) times")
            }
        }
    }
    let shared = names.values.filter { $0 > 1 }.count
    guard statistics.sharedBlocks == shared else {
        throw CrashForkFailure("\(what): sharedBlocks \(statistics.sharedBlocks), the files share \(shared) blocks")
    }
    for path in inventory.files.keys { try fs.remove(path) }
    for directory in inventory.directories.sorted(by: {
        $0.split(separator: "/").count > $1.split(separator: "/").count
    }) {
        try fs.remove(directory)
    }
    let after = fs.statistics()
    guard after.freeBlocks == postFormatFree, after.sharedBlocks == 0 else {
        throw CrashForkFailure(
            "\(what): after removing everything \(after.freeBlocks) blocks free (after format \(postFormatFree)), "
                + "\(after.sharedBlocks) shared; inventory \(inventory)")
    }
    let again = try fs.check()
    guard again.isClean else {
        throw CrashForkFailure("\(what): not clean after removing everything: \(again.problems.prefix(4))")
    }
}

/// Fills almost every free block with 0xEE and frees it again, so that the next allocations get
/// blocks whose media holds another (removed) file's bytes.
///
/// The root directory keeps the block its first entry gave it (directories are not said to
/// shrink), so the free count to come back to is the one measured after this.
private func cfStale(_ fs: DAXFileSystem, leaving: Int = 24, fill: Bool = true) throws {
    let pages = fill ? fs.statistics().freeBlocks - leaving : 0
    let file = try fs.create("/stale")
    if pages > 0 {
        try file.write([UInt8](repeating: 0xEE, count: pages * cfPage), at: 0)
        try file.sync()
    }
    file.close()
    try fs.remove("/stale")
}

private func cfMake(_ fs: DAXFileSystem, _ path: String, _ bytes: [UInt8], at offset: Int = 0, size: Int? = nil) throws
{
    let file = try fs.create(path)
    defer { file.close() }
    if !bytes.isEmpty { try file.write(bytes, at: offset) }
    if let size { try file.truncate(to: size, ifBusy: .fail) }
}

private func cfStore(_ mapping: DAXMapping, _ value: UInt64, at offset: Int) {
    mapping.baseAddress.storeBytes(of: value, toByteOffset: offset, as: UInt64.self)
}

private func cfApply(_ bytes: [UInt8], _ value: UInt64, at offset: Int) -> [UInt8] {
    var result = bytes
    withUnsafeBytes(of: value.littleEndian) { result.replaceSubrange(offset..<offset + 8, with: $0) }
    return result
}

private func cfPageOf(_ bytes: [UInt8], _ index: Int) -> ArraySlice<UInt8> {
    bytes[min(index * cfPage, bytes.count)..<min((index + 1) * cfPage, bytes.count)]
}

/// Whether each page of `seen` is that page of one of `versions` (all of the same size).
private func cfPagewiseOneOf(_ seen: [UInt8], _ versions: [[UInt8]]) -> Bool {
    guard versions.allSatisfy({ $0.count == seen.count }) else { return false }
    let pages = (seen.count + cfPage - 1) / cfPage
    return (0..<pages).allSatisfy { index in versions.contains { cfPageOf($0, index) == cfPageOf(seen, index) } }
}

/// Flags the workload sets as it goes, read by the checker running inside a later fence.
private final class CrashForkProgress: @unchecked Sendable {
    var postFormatFree = -1
    var steps = 0
}

private struct CrashForkExplored {
    var report: CrashReport
    var progress: CrashForkProgress
}

/// Explores `workload` (given the mounted file system and the progress box) after `setup`; each
/// image is mounted, given to `check` (with the progress reached when the image was made), then
/// audited.
private func cfExplore(
    size: Int = 3 << 20, domain: PersistenceDomain = .adr, imagesPerPoint: Int = 2, seed: UInt64 = 5,
    stale: Bool = true,
    setup: (DAXFileSystem) throws -> Void,
    workload: (PMemDevice, DAXFileSystem, CrashForkProgress) throws -> Void,
    check: (DAXFileSystem, Int) throws -> Void
) throws -> CrashForkExplored {
    let progress = CrashForkProgress()
    let explorer = CrashExplorer(deviceSize: size, domain: domain, imagesPerPoint: imagesPerPoint, seed: seed)
    let report = try explorer.explore(
        setup: { device in
            let fs = try DAXFileSystem.format(device)
            try cfStale(fs, fill: stale)
            progress.postFormatFree = fs.statistics().freeBlocks
            try setup(fs)
            try fs.unmount()
        },
        workload: { device in
            let fs = try DAXFileSystem.mount(device)
            try workload(device, fs, progress)
            try fs.unmount()
        },
        check: { image in
            let steps = progress.steps
            let fs = try DAXFileSystem.mount(image)
            defer { try? fs.unmount() }
            let report = try fs.check()
            guard report.isClean else {
                throw CrashForkFailure("step \(steps): not clean: \(report.problems.prefix(4))")
            }
            try check(fs, steps)
            try cfAudit(fs, postFormatFree: progress.postFormatFree, "step \(steps)")
        })
    return CrashForkExplored(report: report, progress: progress)
}

private func cfExpect(
    _ explored: CrashForkExplored, minimumPoints: Int = 2, sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(explored.report.crashPoints >= minimumPoints, sourceLocation: sourceLocation)
    #expect(
        explored.report.failures.isEmpty,
        "\(explored.report.failures.count) of \(explored.report.imagesChecked) images failed: \(explored.report.failures.prefix(4))",
        sourceLocation: sourceLocation)
}

// MARK: - Crash explorer

@Suite("BlackBox: crash consistency of forking and fault-time allocation")
struct BlackBoxCrashForkTests {
    // A file (with a partial last page) and a sparse file, cloned.
    static let a0 = cfPattern(3 * cfPage + 100, seed: 1)
    static let sparse0: [UInt8] = {
        var bytes = cfZeros(4 * cfPage)
        bytes.replaceSubrange(0..<cfPage, with: cfPattern(cfPage, seed: 2))
        bytes.replaceSubrange(3 * cfPage..<4 * cfPage, with: cfPattern(cfPage, seed: 3))
        return bytes
    }()

    @Test(
        "clone of a file and of a sparse file cut at every fence: absent or whole; counts, sharedBlocks and free blocks balance"
    )
    func cloneFilesAudited() throws {
        let other = cfPattern(700, seed: 4)
        let explored = try cfExplore(
            setup: { fs in
                try cfMake(fs, "/a", Self.a0)
                try cfMake(fs, "/sparse", Array(Self.sparse0[0..<cfPage]))
                let file = try fs.open("/sparse")
                try file.write(Array(Self.sparse0.suffix(cfPage)), at: 3 * cfPage)
                file.close()
                try cfMake(fs, "/other", other)
            },
            workload: { _, fs, progress in
                try fs.clone("/a", to: "/b")
                progress.steps = 1
                try fs.clone("/sparse", to: "/sparse2")
                progress.steps = 2
            },
            check: { fs, steps in
                guard try cfRead(fs, "/a") == Self.a0, try cfRead(fs, "/sparse") == Self.sparse0,
                    try cfRead(fs, "/other") == other
                else { throw CrashForkFailure("a source changed") }
                let b = try cfRead(fs, "/b")
                let s2 = try cfRead(fs, "/sparse2")
                guard b == nil || b! == Self.a0 else { throw CrashForkFailure("/b torn: \(b!.count) bytes") }
                guard s2 == nil || s2! == Self.sparse0 else { throw CrashForkFailure("/sparse2 torn") }
                if steps >= 1, b == nil { throw CrashForkFailure("/b lost after clone returned") }
                if steps >= 2, s2 == nil { throw CrashForkFailure("/sparse2 lost after clone returned") }
                if s2 != nil, b == nil { throw CrashForkFailure("the second clone is there, the first not") }
                if s2 != nil {
                    let file = try fs.open("/sparse2", access: .readOnly)
                    defer { file.close() }
                    let frames = try file.frames(offset: 0, count: 4 * cfPage)
                    guard frames[1] == nil, frames[2] == nil else {
                        throw CrashForkFailure("the clone's holes got blocks")
                    }
                }
            })
        cfExpect(explored)
    }

    static let treeX = cfPattern(2 * cfPage, seed: 5)
    static let treeY = cfPattern(5000, seed: 6)
    static let treeZ: [UInt8] = cfZeros(2 * cfPage) + cfPattern(300, seed: 7)

    @Test(
        "snapshot of a nested tree cut at every fence: no /snap or a complete one; counts and free blocks balance",
        arguments: [PersistenceDomain.adr, .eadr])
    func snapshotTreeAudited(_ domain: PersistenceDomain) throws {
        let before: [String: [UInt8]?] = [
            "/d": nil, "/d/x": Self.treeX, "/d/e": [], "/d/s": nil, "/d/s/y": Self.treeY, "/d/s/t": nil,
            "/d/s/t/z": Self.treeZ, "/d/s/empty": nil, "/keep": cfPattern(10, seed: 8),
        ]
        var after = before
        for (path, value) in before where path.hasPrefix("/d") {
            after.updateValue(value, forKey: "/snap" + path.dropFirst(2))
        }
        let explored = try cfExplore(
            domain: domain,
            setup: { fs in
                try fs.createDirectory("/d")
                try fs.createDirectory("/d/s")
                try fs.createDirectory("/d/s/t")
                try fs.createDirectory("/d/s/empty")
                try cfMake(fs, "/d/x", Self.treeX)
                try cfMake(fs, "/d/e", [])
                try cfMake(fs, "/d/s/y", Self.treeY)
                try cfMake(fs, "/d/s/t/z", Array(Self.treeZ[(2 * cfPage)...]), at: 2 * cfPage)
                try cfMake(fs, "/keep", cfPattern(10, seed: 8))
            },
            workload: { _, fs, progress in
                try fs.clone("/d", to: "/snap")
                progress.steps = 1
            },
            check: { fs, steps in
                let tree = try cfInventory(fs).tree
                if tree == before, steps == 0 { return }
                guard tree == after else {
                    throw CrashForkFailure("neither before nor after: \(tree.keys.sorted()) (step \(steps))")
                }
            })
        cfExpect(explored)
    }

    @Test(
        "dedup with an unequal page and a shared partial tail, cut at every fence: bytes never change; 0 or 4 blocks shared"
    )
    func dedupAudited() throws {
        let a = cfPattern(4 * cfPage + 100, seed: 9)
        var b = a
        b[2 * cfPage + 7] ^= 0xFF
        let explored = try cfExplore(
            setup: { fs in
                try cfMake(fs, "/a", a)
                try cfMake(fs, "/b", b)
            },
            workload: { _, fs, progress in
                let shared = try fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: a.count)
                guard shared == 3 * cfPage + 100 else { throw CrashForkFailure("dedup shared \(shared) bytes") }
                progress.steps = 1
            },
            check: { fs, steps in
                guard try cfRead(fs, "/a") == a, try cfRead(fs, "/b") == b else {
                    throw CrashForkFailure("bytes changed")
                }
                let shared = fs.statistics().sharedBlocks
                guard shared == 0 || shared == 4 else {
                    throw CrashForkFailure("\(shared) blocks shared: a torn dedup")
                }
                if steps == 1, shared != 4 { throw CrashForkFailure("the dedup was lost after it returned") }
            })
        cfExpect(explored)
    }

    @Test(
        "migrate of a fragmented file with a shared page, cut at every fence: every byte kept; counts and free blocks balance"
    )
    func migrateAudited() throws {
        let data = cfPattern(6 * cfPage, seed: 10)
        let explored = try cfExplore(
            setup: { fs in
                let file = try fs.create("/f")
                let spacer = try fs.create("/spacer")
                for index in 0..<6 {
                    try file.write(Array(cfPageOf(data, index)), at: index * cfPage)
                    try spacer.write([1], at: index * cfPage)
                }
                file.close()
                spacer.close()
                try fs.remove("/spacer")
                // Page 3 shared with another file: migration leaves it where it is.
                try cfMake(fs, "/twin", Array(cfPageOf(data, 3)))
                _ = try fs.deduplicate("/f", offset: 3 * cfPage, "/twin", offset: 0, count: cfPage)
            },
            workload: { _, fs, progress in
                let file = try fs.open("/f")
                let result = try file.migrate(offset: 0, count: 6 * cfPage)
                file.close()
                guard result.migrated == 5, result.busy.isEmpty else { throw CrashForkFailure("migrate: \(result)") }
                progress.steps = 1
            },
            check: { fs, _ in
                guard try cfRead(fs, "/f") == data, try cfRead(fs, "/twin") == Array(cfPageOf(data, 3)) else {
                    throw CrashForkFailure("bytes changed")
                }
                guard fs.statistics().sharedBlocks == 1 else {
                    throw CrashForkFailure("the shared page is no longer shared")
                }
            })
        cfExpect(explored)
    }

    @Test(
        "clone, then write() to the source, a store to the clone and a store to the source, each cut at every fence",
        arguments: [PersistenceDomain.adr, .eadr])
    func cloneThenWriteEitherSide(_ domain: PersistenceDomain) throws {
        let a0 = Self.a0
        var a1 = a0
        a1.replaceSubrange(3000..<8000, with: [UInt8](repeating: 0x31, count: 5000))
        let b1 = cfApply(a0, 0x4242_4242_4242_4242, at: 2 * cfPage + 16)
        let a2 = cfApply(a1, 0x5353_5353_5353_5353, at: 3 * cfPage + 40)
        let explored = try cfExplore(
            domain: domain,
            setup: { fs in try cfMake(fs, "/a", a0) },
            workload: { _, fs, progress in
                try fs.clone("/a", to: "/b")
                progress.steps = 1
                let a = try fs.open("/a")
                try a.write([UInt8](repeating: 0x31, count: 5000), at: 3000)
                progress.steps = 2
                let b = try fs.open("/b")
                let mb = try b.map(count: b.size)
                cfStore(mb, 0x4242_4242_4242_4242, at: 2 * cfPage + 16)
                try b.sync()
                progress.steps = 3
                let ma = try a.map(count: a.size)
                cfStore(ma, 0x5353_5353_5353_5353, at: 3 * cfPage + 40)
                try a.sync()
                progress.steps = 4
                ma.unmap()
                mb.unmap()
                a.close()
                b.close()
            },
            check: { fs, steps in
                guard let a = try cfRead(fs, "/a") else { throw CrashForkFailure("/a gone") }
                let b = try cfRead(fs, "/b")
                guard b == nil || b! == a0 || b! == b1 else {
                    throw CrashForkFailure("/b is neither a0 nor b1 (step \(steps))")
                }
                guard cfPagewiseOneOf(a, [a0, a1, a2]) else {
                    throw CrashForkFailure("/a has a page of no version (step \(steps))")
                }
                if b == nil, a != a0 { throw CrashForkFailure("/a changed though the clone is not there") }
                if b == b1, a != a1, a != a2 {
                    throw CrashForkFailure("the clone's store is there, the write to /a is not whole")
                }
                if cfPageOf(a, 3) == cfPageOf(a2, 3), b != b1 {
                    throw CrashForkFailure("/a's synced store before /b's")
                }
                if steps >= 1, b == nil { throw CrashForkFailure("clone lost") }
                if steps >= 2, a != a1, a != a2 {
                    throw CrashForkFailure("write() to a shared range not whole after it returned")
                }
                if steps >= 3, b != b1 { throw CrashForkFailure("/b's store lost after sync (step \(steps))") }
                if steps >= 4, a != a2 { throw CrashForkFailure("/a's store lost after sync") }
            })
        cfExpect(explored, minimumPoints: domain == .adr ? 4 : 2)
    }

    @Test("allocating stores to holes over stale blocks: never another file's bytes; what sync made durable survives")
    func allocatingStoresOverStaleBlocks() throws {
        let size = 8 * cfPage
        let stored: [(page: Int, value: UInt64)] = [
            (0, 0x1111_0000_0000_0001), (2, 0x2222_0000_0000_0002), (5, 0x5555_0000_0000_0005),
        ]
        let late: (page: Int, value: UInt64) = (7, 0x7777_0000_0000_0007)
        let explored = try cfExplore(
            setup: { fs in try cfMake(fs, "/h", [], size: size) },
            workload: { _, fs, progress in
                let file = try fs.open("/h")
                let mapping = try file.map(count: size)
                for (page, value) in stored { cfStore(mapping, value, at: page * cfPage + 24) }
                try file.sync()
                progress.steps = 1
                cfStore(mapping, late.value, at: late.page * cfPage + 24)
                mapping.unmap()
                file.close()
            },
            check: { fs, steps in
                guard let h = try cfRead(fs, "/h"), h.count == size else {
                    throw CrashForkFailure("/h lost or resized")
                }
                for index in 0..<8 {
                    let pageBytes = Array(cfPageOf(h, index))
                    let value = (stored + [late]).first { $0.page == index }?.value
                    let zeros = cfZeros(cfPage)
                    let new = value.map { cfApply(zeros, $0, at: 24) }
                    if pageBytes.contains(0xEE) { throw CrashForkFailure("page \(index) shows a removed file's bytes") }
                    guard pageBytes == zeros || pageBytes == new else {
                        throw CrashForkFailure("page \(index) is torn")
                    }
                    if steps >= 1, index != late.page, let new, pageBytes != new {
                        throw CrashForkFailure("page \(index): a store that sync made durable is lost")
                    }
                }
            })
        cfExpect(explored)
    }

    @Test(
        "copy-on-write stores through mappings of both sides of a clone, over stale blocks: durable after sync, never in the other file"
    )
    func copyOnWriteStoresOverStaleBlocks() throws {
        let data = cfPattern(4 * cfPage, seed: 20)
        func value(_ page: Int) -> UInt64 { 0xC0C0_0000_0000_0000 | UInt64(page + 1) }
        let explored = try cfExplore(
            setup: { fs in
                try cfMake(fs, "/a", data)
                try fs.clone("/a", to: "/b")
            },
            workload: { _, fs, progress in
                let b = try fs.open("/b")
                let mb = try b.map(count: 4 * cfPage)
                cfStore(mb, value(0), at: 0 * cfPage + 8)
                cfStore(mb, value(1), at: 1 * cfPage + 8)
                try b.sync()
                progress.steps = 1
                cfStore(mb, value(3), at: 3 * cfPage + 8)
                let a = try fs.open("/a")
                let ma = try a.map(count: 4 * cfPage)
                cfStore(ma, value(2), at: 2 * cfPage + 8)
                try a.sync()
                progress.steps = 2
                ma.unmap()
                mb.unmap()
                a.close()
                b.close()
            },
            check: { fs, steps in
                guard let a = try cfRead(fs, "/a"), let b = try cfRead(fs, "/b") else {
                    throw CrashForkFailure("a file is gone")
                }
                for index in 0..<4 {
                    let old = Array(cfPageOf(data, index))
                    let new = cfApply(old, value(index), at: 8)
                    let (mine, theirs) = index == 2 ? (a, b) : (b, a)
                    guard Array(cfPageOf(theirs, index)) == old else {
                        throw CrashForkFailure("page \(index): a store reached the other file (step \(steps))")
                    }
                    let seen = Array(cfPageOf(mine, index))
                    guard seen == old || seen == new else {
                        throw CrashForkFailure("page \(index) is neither old nor new")
                    }
                    let durable = (index <= 1 && steps >= 1) || (index == 2 && steps >= 2)
                    if durable, seen != new { throw CrashForkFailure("page \(index): a store lost after sync") }
                }
            })
        cfExpect(explored)
    }

    @Test(
        "a clone of a file a NIC holds (.copy, .unsafeShare), then the NIC writes by frame, cut at every fence",
        arguments: ["copy", "unsafeShare"])
    func cloneOfPinnedFileThenDMA(_ policy: String) throws {
        let data = cfPattern(3 * cfPage, seed: 30)
        var written = data
        written.replaceSubrange(cfPage + 100..<cfPage + 164, with: [UInt8](repeating: 0x77, count: 64))
        let explored = try cfExplore(
            setup: { fs in try cfMake(fs, "/a", data) },
            workload: { device, fs, progress in
                let a = try fs.open("/a")
                let mapping = try a.map(count: 3 * cfPage)
                let nic = DMAEngine(device: device)
                let region = nic.register(try mapping.pin(offset: cfPage, count: cfPage))
                try fs.clone("/a", to: "/b", ifPinned: policy == "copy" ? .copy : .unsafeShare)
                progress.steps = 1
                try nic.write([UInt8](repeating: 0x77, count: 64), to: region, at: 100)
                progress.steps = 2
                nic.deregister(region)
                mapping.unmap()
                a.close()
            },
            check: { fs, steps in
                guard let a = try cfRead(fs, "/a") else { throw CrashForkFailure("/a gone") }
                let b = try cfRead(fs, "/b")
                // The NIC's write is two cache lines: until its fence, any of its words may be lost.
                guard a.indices.allSatisfy({ a[$0] == data[$0] || a[$0] == written[$0] }) else {
                    throw CrashForkFailure("/a is neither old nor written")
                }
                if steps >= 2, a != written { throw CrashForkFailure("the NIC's fenced write is lost") }
                if steps >= 1, b == nil { throw CrashForkFailure("the clone is lost") }
                guard let b else {
                    if a != data { throw CrashForkFailure("/a written before the clone returned") }
                    return
                }
                if policy == "copy" {
                    guard b == data else { throw CrashForkFailure("the NIC's write reached the clone (.copy)") }
                    guard fs.statistics().sharedBlocks == 2 else {
                        throw CrashForkFailure(".copy: \(fs.statistics().sharedBlocks) blocks shared, not 2")
                    }
                } else {
                    guard b == a else { throw CrashForkFailure(".unsafeShare: the clone and the source differ") }
                    guard fs.statistics().sharedBlocks == 3 else {
                        throw CrashForkFailure(".unsafeShare: \(fs.statistics().sharedBlocks) blocks shared, not 3")
                    }
                }
            })
        cfExpect(explored)
    }

    @Test("dedup and migrate meet a NIC's pin, then the NIC writes: the pinned page stays the destination's alone")
    func dedupAndMigrateWithPinThenDMA() throws {
        let data = cfPattern(3 * cfPage, seed: 40)
        var written = data
        written.replaceSubrange(cfPage..<cfPage + 32, with: [UInt8](repeating: 0x99, count: 32))
        let explored = try cfExplore(
            setup: { fs in
                try cfMake(fs, "/a", data)
                try cfMake(fs, "/b", data)
            },
            workload: { device, fs, progress in
                let b = try fs.open("/b")
                let mapping = try b.map(count: 3 * cfPage)
                let nic = DMAEngine(device: device)
                let region = nic.register(try mapping.pin(offset: cfPage, count: cfPage))
                let shared = try fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 3 * cfPage)
                guard shared == 2 * cfPage else { throw CrashForkFailure("dedup shared \(shared) bytes, not 2 pages") }
                progress.steps = 1
                let result = try b.migrate(offset: 0, count: 3 * cfPage)
                guard result.migrated == 0, result.busy == [1] else { throw CrashForkFailure("migrate: \(result)") }
                try nic.write([UInt8](repeating: 0x99, count: 32), to: region, at: 0)
                progress.steps = 2
                nic.deregister(region)
                mapping.unmap()
                b.close()
            },
            check: { fs, steps in
                guard try cfRead(fs, "/a") == data else { throw CrashForkFailure("/a changed: the NIC's write leaked") }
                guard let b = try cfRead(fs, "/b"), b.count == data.count,
                    b.indices.allSatisfy({ b[$0] == data[$0] || b[$0] == written[$0] })
                else { throw CrashForkFailure("/b wrong") }
                if steps >= 2, b != written { throw CrashForkFailure("the NIC's fenced write is lost") }
                let shared = fs.statistics().sharedBlocks
                guard shared == 0 || shared == 2 else { throw CrashForkFailure("\(shared) blocks shared") }
                if steps >= 1, shared != 2 { throw CrashForkFailure("the dedup was lost") }
            })
        cfExpect(explored)
    }

    @Test(
        "holes filled by write(), allocate, a .readWrite pin with a DMA write and a grow over stale blocks: zeros or the new bytes, never stale"
    )
    func holeFillsOverStaleBlocks() throws {
        let size = 6 * cfPage
        func page0(_ new: Bool) -> [UInt8] {
            var bytes = cfZeros(cfPage)
            if new { bytes.replaceSubrange(1000..<1100, with: [UInt8](repeating: 0x31, count: 100)) }
            return bytes
        }
        let explored = try cfExplore(
            setup: { fs in
                try cfMake(fs, "/h", [], size: size)
                try cfMake(fs, "/t", [UInt8](repeating: 0x21, count: 100))
            },
            workload: { device, fs, progress in
                let h = try fs.open("/h")
                try h.write([UInt8](repeating: 0x31, count: 100), at: 1000)
                progress.steps = 1
                try h.allocate(offset: 2 * cfPage, count: cfPage)
                progress.steps = 2
                let mapping = try h.map(count: size)
                let nic = DMAEngine(device: device)
                let region = nic.register(try mapping.pin(offset: 4 * cfPage, count: cfPage))
                try nic.write([UInt8](repeating: 0x41, count: 32), to: region, at: 0)
                progress.steps = 3
                nic.deregister(region)
                mapping.unmap()
                h.close()
                let t = try fs.open("/t")
                try t.truncate(to: 3 * cfPage + 10, ifBusy: .fail)
                try t.write([0x51], at: 2 * cfPage + 5)
                progress.steps = 4
                t.close()
            },
            check: { fs, steps in
                guard let h = try cfRead(fs, "/h"), h.count == size else {
                    throw CrashForkFailure("/h lost or resized")
                }
                let p0 = Array(cfPageOf(h, 0))
                guard p0 == page0(false) || p0 == page0(true) else { throw CrashForkFailure("/h page 0 stale or torn") }
                if steps >= 1, p0 != page0(true) {
                    throw CrashForkFailure("write() into a hole lost after it returned")
                }
                for index in [1, 2, 3, 5] where cfPageOf(h, index).contains(where: { $0 != 0 }) {
                    throw CrashForkFailure("/h page \(index) is not zeros (step \(steps))")
                }
                let p4 = Array(cfPageOf(h, 4))
                guard p4[32...].allSatisfy({ $0 == 0 }), p4[..<32].allSatisfy({ $0 == 0 || $0 == 0x41 }) else {
                    throw CrashForkFailure("/h page 4 (pinned hole) stale")
                }
                if steps >= 3, p4[..<32].contains(0) { throw CrashForkFailure("the NIC's fenced write is lost") }
                guard let t = try cfRead(fs, "/t") else { throw CrashForkFailure("/t gone") }
                guard t.count == 100 || t.count == 3 * cfPage + 10 else { throw CrashForkFailure("/t size \(t.count)") }
                guard t[..<100].allSatisfy({ $0 == 0x21 }) else { throw CrashForkFailure("/t lost its bytes") }
                for offset in 100..<t.count where t[offset] != 0 && !(offset == 2 * cfPage + 5 && t[offset] == 0x51) {
                    throw CrashForkFailure("/t grown range not zeros at \(offset): \(t[offset]) (step \(steps))")
                }
                if steps >= 4, t.count != 3 * cfPage + 10 || t[2 * cfPage + 5] != 0x51 {
                    throw CrashForkFailure("/t's grow or write lost")
                }
            })
        cfExpect(explored)
    }

    @Test("truncate and punch of a clone and removal of its source, cut at every fence: counts and free blocks balance")
    func sharedTruncateRemovePunchAudited() throws {
        let a0 = cfPattern(4 * cfPage + 50, seed: 82)
        var b0 = a0
        b0.replaceSubrange(5..<15, with: [UInt8](repeating: 0x61, count: 10))
        let bTruncated = Array(b0[..<(cfPage + 10)])
        let bPunched = cfZeros(cfPage) + Array(b0[cfPage..<(cfPage + 10)])
        let explored = try cfExplore(
            setup: { fs in
                try cfMake(fs, "/a", a0)
                try fs.clone("/a", to: "/b")
                let b = try fs.open("/b")
                try b.write([UInt8](repeating: 0x61, count: 10), at: 5)
                b.close()
            },
            workload: { _, fs, progress in
                let b = try fs.open("/b")
                try b.truncate(to: cfPage + 10, ifBusy: .fail)
                progress.steps = 1
                try fs.remove("/a")
                progress.steps = 2
                try b.punchHole(offset: 0, count: cfPage, ifBusy: .fail)
                progress.steps = 3
                b.close()
            },
            check: { fs, steps in
                let a = try cfRead(fs, "/a")
                guard let b = try cfRead(fs, "/b") else { throw CrashForkFailure("/b gone") }
                guard a == nil || a! == a0 else { throw CrashForkFailure("/a changed") }
                guard [b0, bTruncated, bPunched].contains(b) else {
                    throw CrashForkFailure("/b is no state (step \(steps))")
                }
                if b == b0, a == nil || steps >= 1 {
                    throw CrashForkFailure("out of order or lost truncate (step \(steps))")
                }
                if b == bPunched, a != nil { throw CrashForkFailure("punch before the remove") }
                if steps >= 2, a != nil { throw CrashForkFailure("remove lost") }
                if steps >= 3, b != bPunched { throw CrashForkFailure("punch lost") }
            })
        cfExpect(explored)
    }

    @Test(
        "a removed clone still mapped (an orphan) takes a copy-on-write store, the source writes its shared page: counts balance at every fence"
    )
    func orphanedCloneAudited() throws {
        let a0 = cfPattern(3 * cfPage, seed: 83)
        var a1 = a0
        a1.replaceSubrange(2 * cfPage + 8..<2 * cfPage + 16, with: [UInt8](repeating: 0x71, count: 8))
        let explored = try cfExplore(
            setup: { fs in
                try cfMake(fs, "/a", a0)
                try fs.clone("/a", to: "/b")
            },
            workload: { _, fs, progress in
                let b = try fs.open("/b")
                let mapping = try b.map(count: 3 * cfPage)
                try fs.remove("/b")
                progress.steps = 1
                cfStore(mapping, 0x7272_7272_7272_7272, at: cfPage + 8)
                try b.sync()
                progress.steps = 2
                let a = try fs.open("/a")
                try a.write([UInt8](repeating: 0x71, count: 8), at: 2 * cfPage + 8)
                a.close()
                progress.steps = 3
                mapping.unmap()
                b.close()
                progress.steps = 4
            },
            check: { fs, steps in
                guard let a = try cfRead(fs, "/a") else { throw CrashForkFailure("/a gone") }
                guard a == a0 || a == a1 else { throw CrashForkFailure("/a is neither old nor new (step \(steps))") }
                if steps >= 3, a != a1 { throw CrashForkFailure("/a's write lost") }
                let b = try cfRead(fs, "/b")
                if steps >= 1, b != nil { throw CrashForkFailure("the removed clone is back") }
                if let b, b != a0 { throw CrashForkFailure("/b changed before its removal") }
            })
        // Removing the open clone and closing it write the orphan head in block 0 in place:
        // images that tear it must mount too, the journal's replay writing it whole.
        cfExpect(explored)
    }

    @Test(
        "truncates with .deferFree of both sides of a clone while a NIC holds a shared page, cut at every fence: counts and free blocks balance"
    )
    func deferFreeOfPinnedSharedPageAudited() throws {
        let a0 = cfPattern(2 * cfPage, seed: 85)
        let explored = try cfExplore(
            setup: { fs in
                try cfMake(fs, "/a", a0)
                try fs.clone("/a", to: "/b")
            },
            workload: { device, fs, progress in
                let b = try fs.open("/b")
                let mapping = try b.map(count: 2 * cfPage)
                let nic = DMAEngine(device: device)
                let region = nic.register(try mapping.pin(offset: 0, count: cfPage, access: .readOnly))
                let a = try fs.open("/a")
                try a.truncate(to: 0, ifBusy: .deferFree)
                progress.steps = 1
                guard fs.statistics().quarantinedBlocks == 0 else {
                    throw CrashForkFailure("a block /b still names is quarantined")
                }
                try b.truncate(to: 0, ifBusy: .deferFree)
                progress.steps = 2
                guard fs.statistics().quarantinedBlocks == 1 else {
                    throw CrashForkFailure(
                        "\(fs.statistics().quarantinedBlocks) quarantined after the last reference went, not 1")
                }
                guard try nic.read(count: cfPage, from: region, at: 0) == Array(cfPageOf(a0, 0)) else {
                    throw CrashForkFailure("the NIC's page changed while quarantined")
                }
                nic.deregister(region)
                guard fs.statistics().quarantinedBlocks == 0 else {
                    throw CrashForkFailure("still quarantined after the unpin")
                }
                mapping.unmap()
                a.close()
                b.close()
            },
            check: { fs, steps in
                guard let a = try cfRead(fs, "/a"), let b = try cfRead(fs, "/b") else {
                    throw CrashForkFailure("a file is gone")
                }
                guard a == a0 || a.isEmpty, b == a0 || b.isEmpty else { throw CrashForkFailure("torn truncate") }
                if steps >= 1, !a.isEmpty { throw CrashForkFailure("/a's truncate lost") }
                if steps >= 2, !b.isEmpty { throw CrashForkFailure("/b's truncate lost") }
                if !b.isEmpty, a.isEmpty == false, fs.statistics().sharedBlocks != 2 {
                    throw CrashForkFailure("shared count")
                }
            })
        cfExpect(explored)
    }

    /// The chain of forking operations `chainOfForks` explores, one per step.
    static let chain: [(String, @Sendable (DAXFileSystem) throws -> Void)] = [
        ("clone a b", { fs in try fs.clone("/a", to: "/b") }),
        ("clone b c", { fs in try fs.clone("/b", to: "/c") }),
        (
            "write b",
            { fs in
                let b = try fs.open("/b")
                defer { b.close() }
                try b.write([UInt8](repeating: 0xB1, count: 300), at: cfPage + 7)
            }
        ),
        ("remove a", { fs in try fs.remove("/a") }),
        (
            "dedup c d",
            { fs in
                guard try fs.deduplicate("/c", offset: 0, "/d", offset: 0, count: 3 * cfPage) == 2 * cfPage else {
                    throw CrashForkFailure("dedup c d shared other than 2 pages")
                }
            }
        ),
        (
            "truncate b",
            { fs in
                let b = try fs.open("/b")
                defer { b.close() }
                try b.truncate(to: cfPage + 1, ifBusy: .fail)
            }
        ),
        (
            "punch c",
            { fs in
                let c = try fs.open("/c")
                defer { c.close() }
                try c.punchHole(offset: 0, count: cfPage, ifBusy: .fail)
            }
        ),
        ("mkdir s", { fs in try fs.createDirectory("/s") }),
        ("clone c into s", { fs in try fs.clone("/c", to: "/s/c") }),
        ("snapshot s", { fs in try fs.clone("/s", to: "/t") }),
    ]

    @Test(
        "a chain of clones, copy-on-write, remove, dedup, truncate and punch: every image is the state before or after the step in flight",
        arguments: [PersistenceDomain.adr, .eadr])
    func chainOfForks(_ domain: PersistenceDomain) throws {
        let a0 = cfPattern(3 * cfPage, seed: 86)
        var d0 = a0
        d0[cfPage + 3] ^= 0x5A  // /d differs from /c in page 1 only
        let setup: (DAXFileSystem) throws -> Void = { fs in
            try cfMake(fs, "/a", a0)
            try cfMake(fs, "/d", d0)
        }
        // The states, from a run without crashes.
        let plain = try TemporaryFileSystem(size: 3 << 20, name: "cfchain")
        try setup(plain.fs)
        var states = [try cfInventory(plain.fs).tree]
        for (_, step) in Self.chain {
            try step(plain.fs)
            states.append(try cfInventory(plain.fs).tree)
        }
        let explored = try cfExplore(
            domain: domain,
            setup: setup,
            workload: { _, fs, progress in
                for (index, (_, step)) in Self.chain.enumerated() {
                    try step(fs)
                    progress.steps = index + 1
                }
            },
            check: { fs, steps in
                let tree = try cfInventory(fs).tree
                let allowed = steps + 1 < states.count ? [states[steps], states[steps + 1]] : [states[steps]]
                guard allowed.contains(tree) else {
                    let name = steps < Self.chain.count ? Self.chain[steps].0 : "the end"
                    throw CrashForkFailure(
                        "during \(name): neither the state before nor after: \(tree.mapValues { $0?.count ?? -1 })")
                }
            })
        cfExpect(explored, minimumPoints: Self.chain.count)
    }

    /// Explores a mount (recovery) of the device image `bytes`, then an unmount: every image must
    /// mount again, hold what `expected` says and pass the audit.
    fileprivate static func exploreRecovery(
        of bytes: [UInt8], postFormatFree: Int, expected: @escaping (DAXFileSystem) throws -> Void
    ) throws -> CrashReport {
        let explorer = CrashExplorer(deviceSize: bytes.count, domain: .adr, imagesPerPoint: 3, seed: 9)
        return try explorer.explore(
            setup: { device in bytes.withUnsafeBytes { device.copy($0, toOffset: 0) } },
            workload: { device in try DAXFileSystem.mount(device).unmount() },
            check: { image in
                let fs = try DAXFileSystem.mount(image)
                defer { try? fs.unmount() }
                try expected(fs)
                try cfAudit(fs, postFormatFree: postFormatFree, "recovered twice")
            })
    }

    @Test(
        "mount freeing an orphaned clone (its shared references drop), cut at every fence: every image mounts and balances"
    )
    func orphanRecoveryCrash() throws {
        let a0 = cfPattern(3 * cfPage, seed: 87)
        let t = try TemporaryFileSystem(size: 3 << 20, name: "cforphanrec")
        try cfStale(t.fs, fill: false)
        let postFormatFree = t.fs.statistics().freeBlocks
        try cfMake(t.fs, "/a", a0)
        try t.fs.clone("/a", to: "/b")
        let b = try t.fs.open("/b")
        try b.write([0x42], at: 5)  // page 0 of the orphan is its own, pages 1 and 2 shared
        try t.fs.remove("/b")
        #expect(t.fs.statistics().sharedBlocks == 2)
        let bytes = try t.device.read(count: t.device.size, at: 0)  // as a crash now would leave it
        b.close()
        let report = try Self.exploreRecovery(of: bytes, postFormatFree: postFormatFree) { fs in
            guard try fs.contentsOfDirectory("/") == ["a"], try cfRead(fs, "/a") == a0 else {
                throw CrashForkFailure("the tree is not just /a")
            }
        }
        #expect(report.crashPoints > 1)
        // Mount freeing the orphaned clone clears the orphan head in block 0: images that tear it
        // mount too.
        #expect(
            report.failures.isEmpty, "\(report.failures.count) of \(report.imagesChecked): \(report.failures.prefix(3))"
        )
    }

    @Test(
        "mount replaying a snapshot's committed transaction (a process SIGKILLed after the commit), cut at every fence")
    func replayOfCommittedSnapshotCrash() async throws {
        let path = TemporaryDevice.uniquePath("cfreplay")
        defer { unlink(path) }
        let x = cfPattern(2 * cfPage, seed: 88)
        let y = cfPattern(5000, seed: 89)
        let postFormatFree: Int
        do {
            let device = try PMemDevice.create(path: path, size: 3 << 20)
            let fs = try DAXFileSystem.format(device)
            try cfStale(fs, fill: false)
            postFormatFree = fs.statistics().freeBlocks
            try fs.createDirectory("/d")
            try cfMake(fs, "/d/x", x)
            try cfMake(fs, "/d/y", y)
            try fs.unmount()
            device.close()
        }
        let prepared: [UInt8]
        do {
            let device = try PMemDevice.open(path: path)
            prepared = try device.read(count: device.size, at: 0)
            device.close()
        }
        let expected: [String: [UInt8]?] = ["/d": nil, "/d/x": x, "/d/y": y, "/snap": nil, "/snap/x": x, "/snap/y": y]
        var committedImages = 0
        for killAt in 1...40 {
            do {
                let device = try PMemDevice.open(path: path)
                prepared.withUnsafeBytes { device.copy($0, toOffset: 0) }
                device.close()
            }
            let result = await #expect(processExitsWith: .failure, observing: [\.exitStatus]) {
                [path = path as String, killAt = killAt as Int] in
                do {
                    let device = try PMemDevice.open(path: path, options: BlackBoxCrashForkTests.killingOptions())
                    let fs = try DAXFileSystem.mount(device)
                    cfCopiesBeforeKill.store(killAt, ordering: .relaxed)
                    try fs.clone("/d", to: "/snap")
                    exit(3)
                } catch {
                    exit(4)
                }
            }
            guard let status = result?.exitStatus, status == .signal(SIGKILL) else { break }
            let device = try PMemDevice.open(path: path)
            let bytes = try device.read(count: device.size, at: 0)
            // A committed transaction is one that only a read-write mount can replay.
            var committed = false
            do {
                try DAXFileSystem.mount(device, access: .readOnly).unmount()
            } catch let error as DAXError where error.code == .permissionDenied {
                committed = true
            }
            device.close()
            guard committed else { continue }
            committedImages += 1
            let report = try Self.exploreRecovery(of: bytes, postFormatFree: postFormatFree) { fs in
                let tree = try cfInventory(fs).tree
                guard tree == expected else { throw CrashForkFailure("not the snapshot's tree: \(tree.keys.sorted())") }
                guard fs.statistics().sharedBlocks == 4 else {
                    throw CrashForkFailure("\(fs.statistics().sharedBlocks) shared, not 4")
                }
            }
            #expect(report.crashPoints > 1, "killed at copy \(killAt)")
            #expect(
                report.failures.isEmpty,
                "killed at copy \(killAt): \(report.failures.count) of \(report.imagesChecked): \(report.failures.prefix(3))"
            )
        }
        #expect(committedImages > 0, "no kill left a committed transaction")
    }

    @Test(
        "pins of a clone's shared pages unshare them (a long-term read pin, a .readWrite pin), then the NIC writes, cut at every fence"
    )
    func unsharingPinsAudited() throws {
        let data = cfPattern(3 * cfPage, seed: 95)
        var written = data
        written.replaceSubrange(2 * cfPage + 40..<2 * cfPage + 48, with: [UInt8](repeating: 0xA7, count: 8))
        let explored = try cfExplore(
            setup: { fs in
                try cfMake(fs, "/a", data)
                try fs.clone("/a", to: "/b")
            },
            workload: { device, fs, progress in
                let b = try fs.open("/b")
                let mapping = try b.map(count: 3 * cfPage)
                let lease = try mapping.pin(
                    offset: 0, count: cfPage, access: .readOnly, lifetime: .longTerm(onRevoke: {}))
                progress.steps = 1
                let nic = DMAEngine(device: device)
                let region = nic.register(try mapping.pin(offset: 2 * cfPage, count: cfPage))
                progress.steps = 2
                guard fs.statistics().sharedBlocks == 1 else {
                    throw CrashForkFailure("\(fs.statistics().sharedBlocks) shared after two unsharing pins, not 1")
                }
                try nic.write([UInt8](repeating: 0xA7, count: 8), to: region, at: 40)
                progress.steps = 3
                nic.deregister(region)
                lease.release()
                mapping.unmap()
                b.close()
            },
            check: { fs, steps in
                guard try cfRead(fs, "/a") == data else {
                    throw CrashForkFailure("/a changed: the NIC's write leaked (step \(steps))")
                }
                guard let b = try cfRead(fs, "/b"), b.count == data.count,
                    b.indices.allSatisfy({ b[$0] == data[$0] || b[$0] == written[$0] })
                else { throw CrashForkFailure("/b is neither old nor written") }
                if steps >= 3, b != written { throw CrashForkFailure("the NIC's fenced write is lost") }
                let shared = fs.statistics().sharedBlocks
                let most = steps >= 1 ? 2 : 3  // each unshare is durable once its pin returned
                guard shared >= 1, shared <= most else {
                    throw CrashForkFailure("\(shared) blocks shared at step \(steps)")
                }
                if steps >= 2, shared != 1 { throw CrashForkFailure("an unshare was lost: \(shared) shared") }
            })
        cfExpect(explored)
    }

    @Test(
        "daxemu defrag of a fragmented file with a page shared by dedup: bytes kept, the shared page stays shared, counts and free blocks balance"
    )
    func defragCommandAudited() throws {
        let path = TemporaryDevice.uniquePath("cfdefrag")
        defer { unlink(path) }
        let data = cfPattern(6 * cfPage, seed: 96)
        let postFormatFree: Int
        let sharedFrame: PageFrameNumber?
        do {
            let device = try PMemDevice.create(path: path, size: 3 << 20)
            let fs = try DAXFileSystem.format(device)
            try cfStale(fs)
            postFormatFree = fs.statistics().freeBlocks
            let file = try fs.create("/f")
            let spacer = try fs.create("/spacer")
            for index in 0..<6 {
                try file.write(Array(cfPageOf(data, index)), at: index * cfPage)
                try spacer.write([1], at: index * cfPage)
            }
            spacer.close()
            try fs.remove("/spacer")
            try cfMake(fs, "/twin", Array(cfPageOf(data, 3)))
            #expect(try fs.deduplicate("/f", offset: 3 * cfPage, "/twin", offset: 0, count: cfPage) == cfPage)
            sharedFrame = try file.frames(offset: 3 * cfPage, count: cfPage)[0]
            file.close()
            try fs.unmount()
            device.close()
        }
        let child = try ChildProcess("daxemu", ["defrag", "--device", path, "/f"])
        let signal = child.waitForEnd()
        #expect(signal == nil && child.process.terminationStatus == 0, "daxemu defrag: \(child.lines)")
        let device = try PMemDevice.open(path: path)
        defer { device.close() }
        let fs = try DAXFileSystem.mount(device)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        #expect(try cfRead(fs, "/f") == data)
        #expect(try cfRead(fs, "/twin") == Array(cfPageOf(data, 3)))
        let file = try fs.open("/f", access: .readOnly)
        #expect(try file.frames(offset: 3 * cfPage, count: cfPage)[0] == sharedFrame, "the shared page moved")
        file.close()
        #expect(fs.statistics().sharedBlocks == 1)
        do {
            try cfAudit(fs, postFormatFree: postFormatFree, "after daxemu defrag")
        } catch {
            Issue.record("\(error)")
        }
    }

    // MARK: - Power-failure images without the explorer

    private static func emulatedDevice(_ name: String) throws -> (String, PMemDevice) {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        options.powerFailureEmulation = .adr
        let path = TemporaryDevice.uniquePath(name)
        return (path, try PMemDevice.create(path: path, size: 4 << 20, options: options))
    }

    /// Writes a power-failure image (keeping nothing in flight), mounts it and runs `body`.
    private static func withImage(_ device: PMemDevice, _ body: (DAXFileSystem) throws -> Void) throws {
        let image = TemporaryDevice.uniquePath("cfimg")
        defer { unlink(image) }
        try device.powerFail(writingImageTo: image, keeping: .none)
        let imageDevice = try PMemDevice.open(path: image)
        defer { imageDevice.close() }
        let fs = try DAXFileSystem.mount(imageDevice)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        try body(fs)
    }

    @Test(
        "a clone (.copy) of a file with unsynced stores on a pinned and an unpinned page: after a power failure both files hold them"
    )
    func clonePinnedUnsyncedThenPowerFail() throws {
        let (path, device) = try Self.emulatedDevice("cfclonepin")
        defer {
            device.close()
            unlink(path)
        }
        let fs = try DAXFileSystem.format(device)
        defer { try? fs.unmount() }
        guard fs.faultHandling == .userfaultfd else { return }
        try cfStale(fs)
        let data = cfPattern(3 * cfPage, seed: 80)
        try cfMake(fs, "/a", data)
        let a = try fs.open("/a")
        defer { a.close() }
        let mapping = try a.map(count: 3 * cfPage)
        defer { mapping.unmap() }
        try a.sync()
        let pin = try mapping.pin(offset: cfPage, count: cfPage)
        cfStore(mapping, 0x8181_8181_8181_8181, at: 8)
        cfStore(mapping, 0x8282_8282_8282_8282, at: cfPage + 8)
        let expected = cfApply(cfApply(data, 0x8181_8181_8181_8181, at: 8), 0x8282_8282_8282_8282, at: cfPage + 8)
        try fs.clone("/a", to: "/b")
        #expect(try cfRead(fs, "/b") == expected)
        #expect(fs.statistics().sharedBlocks == 2)
        try Self.withImage(device) { image throws in
            let b = try #require(try cfRead(image, "/b"))
            let a = try #require(try cfRead(image, "/a"))
            #expect(
                b == expected,
                "the clone after a power failure: page 0 \(cfPageOf(b, 0) == cfPageOf(expected, 0)), page 1 \(cfPageOf(b, 1) == cfPageOf(expected, 1))"
            )
            // "a clone makes its source durable first" (docs/forking.md): the source keeps what the clone got.
            #expect(
                a == expected,
                "the source after a power failure: page 0 \(cfPageOf(a, 0) == cfPageOf(expected, 0)), page 1 (pinned) \(cfPageOf(a, 1) == cfPageOf(expected, 1))"
            )
        }
        pin.release()
    }

    @Test(
        "migrate of a page with an unsynced store through a mapping, then a power failure: the page is old or new, never another block's bytes"
    )
    func migrateUnsyncedThenPowerFail() throws {
        let (path, device) = try Self.emulatedDevice("cfmigunsynced")
        defer {
            device.close()
            unlink(path)
        }
        let fs = try DAXFileSystem.format(device)
        defer { try? fs.unmount() }
        guard fs.faultHandling == .userfaultfd else { return }
        try cfStale(fs)
        let postFormatFree = fs.statistics().freeBlocks
        let data = cfPattern(2 * cfPage, seed: 81)
        try cfMake(fs, "/f", data)
        let file = try fs.open("/f")
        defer { file.close() }
        let mapping = try file.map(count: 2 * cfPage)
        defer { mapping.unmap() }
        try file.sync()
        cfStore(mapping, 0x9191_9191_9191_9191, at: 16)
        let stored = cfApply(data, 0x9191_9191_9191_9191, at: 16)
        let result = try file.migrate(offset: 0, count: 2 * cfPage)
        #expect(result.migrated == 2 && result.busy.isEmpty, "\(result)")
        #expect(try file.read(count: 2 * cfPage, at: 0) == stored)
        try Self.withImage(device) { image throws in
            let seen = try #require(try cfRead(image, "/f"))
            #expect(seen == data || seen == stored, "the migrated file holds bytes it never had")
            try cfAudit(image, postFormatFree: postFormatFree, "after a power failure")
        }
        // And once synced, the store survives in the new block.
        try file.sync()
        try Self.withImage(device) { image throws in
            #expect(try cfRead(image, "/f") == stored, "sync after migrate did not make the store durable")
        }
    }

    @Test(
        "a copy-on-write store through a clone's mapping, made durable with mapping.persist: an image holds it in the clone only"
    )
    func copyOnWriteMappingPersistThenPowerFail() throws {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        options.powerFailureEmulation = .adr
        let path = TemporaryDevice.uniquePath("cfcowpersist")
        let device = try PMemDevice.create(path: path, size: 4 << 20, options: options)
        defer {
            device.close()
            unlink(path)
        }
        let fs = try DAXFileSystem.format(device)
        defer { try? fs.unmount() }
        guard fs.faultHandling == .userfaultfd else { return }
        try cfStale(fs)
        let data = cfPattern(2 * cfPage, seed: 50)
        try cfMake(fs, "/src", data)
        try fs.clone("/src", to: "/dst")
        let clone = try fs.open("/dst")
        defer { clone.close() }
        let mapping = try clone.map(count: 2 * cfPage)
        defer { mapping.unmap() }
        cfStore(mapping, 0x9999_9999_9999_9999, at: 16)
        mapping.persist(offset: 16, count: 8)
        let image = TemporaryDevice.uniquePath("cfcowimg")
        defer { unlink(image) }
        try device.powerFail(writingImageTo: image, keeping: .none)
        let imageDevice = try PMemDevice.open(path: image)
        defer { imageDevice.close() }
        let imageFS = try DAXFileSystem.mount(imageDevice)
        defer { try? imageFS.unmount() }
        #expect(try imageFS.check().isClean)
        #expect(try cfRead(imageFS, "/src") == data)
        let seen = try #require(try cfRead(imageFS, "/dst"))
        let stale = seen.indices.filter { seen[$0] == 0xEE && data[$0] != 0xEE }
        #expect(
            stale.isEmpty,
            "the clone shows a removed file's bytes at \(stale.count) offsets from \(stale.first ?? -1) to \(stale.last ?? -1)"
        )
        // The store was persisted, so the clone holds it, and the page's other bytes are the copy.
        #expect(
            seen == cfApply(data, 0x9999_9999_9999_9999, at: 16),
            "first difference at \((0..<min(seen.count, data.count)).first { seen[$0] != cfApply(data, 0x9999_9999_9999_9999, at: 16)[$0] } ?? -1)"
        )
    }

    // MARK: - Real processes killed with SIGKILL

    /// Options whose durable copies count down to a SIGKILL of the process once armed.
    fileprivate static func killingOptions() -> PMemDevice.Options {
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        var calls = SystemCalls.injectable
        calls.memcpy = { to, from, length, flags in
            if cfCopiesBeforeKill.wrappingSubtract(1, ordering: .relaxed).newValue == 0 { kill(getpid(), SIGKILL) }
            SystemCalls.live.memcpy(to, from, length, flags)
        }
        options.systemCalls = calls
        return options
    }

    static let killPoints = [1, 2, 3, 4, 6, 9, 14, 22, 40]

    @Test(
        "a snapshot of a tree with a DMA-pinned page and unsynced stores, SIGKILLed at a durable copy: no /snap or a whole one",
        arguments: killPoints)
    func snapshotWithPinKilled(_ killAt: Int) async throws {
        let path = TemporaryDevice.uniquePath("cfkillsnap")
        defer { unlink(path) }
        let x = cfPattern(3 * cfPage, seed: 60)
        let y = cfPattern(5000, seed: 61)
        let postFormatFree: Int
        do {
            let device = try PMemDevice.create(path: path, size: 4 << 20)
            let fs = try DAXFileSystem.format(device)
            try cfStale(fs)
            postFormatFree = fs.statistics().freeBlocks
            try fs.createDirectory("/d")
            try fs.createDirectory("/d/s")
            try cfMake(fs, "/d/x", x)
            try cfMake(fs, "/d/s/y", y)
            try fs.unmount()
            device.close()
        }
        let result = await #expect(processExitsWith: .failure, observing: [\.exitStatus]) {
            [path = path as String, killAt = killAt as Int] in
            do {
                let device = try PMemDevice.open(path: path, options: BlackBoxCrashForkTests.killingOptions())
                let fs = try DAXFileSystem.mount(device)
                let file = try fs.open("/d/x")
                let mapping = try file.map(count: 3 * cfPage)
                let nic = DMAEngine(device: device)
                let region = nic.register(try mapping.pin(offset: cfPage, count: cfPage))
                cfStore(mapping, 0xABAB_ABAB_ABAB_ABAB, at: 8)  // not synced
                try nic.write([UInt8](repeating: 0x66, count: 16), to: region, at: 64)
                cfCopiesBeforeKill.store(killAt, ordering: .relaxed)
                try fs.clone("/d", to: "/snap")
                exit(3)
            } catch {
                exit(4)
            }
        }
        guard let status = result?.exitStatus else { return }
        #expect(status == .signal(SIGKILL) || status == .exitCode(3), "\(status)")
        var xNow = cfApply(x, 0xABAB_ABAB_ABAB_ABAB, at: 8)
        xNow.replaceSubrange(cfPage + 64..<cfPage + 80, with: [UInt8](repeating: 0x66, count: 16))
        let device = try PMemDevice.open(path: path)
        defer { device.close() }
        let fs = try DAXFileSystem.mount(device)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        // A process crash keeps every store that reached the device file.
        #expect(try cfRead(fs, "/d/x") == xNow)
        #expect(try cfRead(fs, "/d/s/y") == y)
        let snapshot = try cfInventory(fs).tree.filter { $0.key.hasPrefix("/snap") }
        let whole: [String: [UInt8]?] = ["/snap": nil, "/snap/x": xNow, "/snap/s": nil, "/snap/s/y": y]
        #expect(snapshot.isEmpty || snapshot == whole, "killed at copy \(killAt): \(snapshot.keys.sorted())")
        if status == .exitCode(3) { #expect(snapshot == whole) }
        do {
            try cfAudit(fs, postFormatFree: postFormatFree, "killed at copy \(killAt)")
        } catch {
            Issue.record("\(error)")
        }
    }

    @Test(
        "copy-on-write and allocating stores through a clone's mapping, SIGKILLed at a durable copy: each page old or new, the source intact",
        arguments: killPoints)
    func faultingStoresKilled(_ killAt: Int) async throws {
        let path = TemporaryDevice.uniquePath("cfkillfault")
        defer { unlink(path) }
        // /a: pages 0 and 1 hold data, page 2 is a hole; /b its clone.
        let a: [UInt8] = cfPattern(2 * cfPage, seed: 70) + cfZeros(cfPage)
        let postFormatFree: Int
        do {
            let device = try PMemDevice.create(path: path, size: 4 << 20)
            let fs = try DAXFileSystem.format(device)
            try cfStale(fs)
            postFormatFree = fs.statistics().freeBlocks
            try cfMake(fs, "/a", Array(a[0..<(2 * cfPage)]), size: 3 * cfPage)
            try fs.clone("/a", to: "/b")
            try fs.unmount()
            device.close()
        }
        let value = cfFaultValue
        let result = await #expect(processExitsWith: .failure, observing: [\.exitStatus]) {
            [path = path as String, killAt = killAt as Int] in
            do {
                let device = try PMemDevice.open(path: path, options: BlackBoxCrashForkTests.killingOptions())
                let fs = try DAXFileSystem.mount(device)
                guard fs.faultHandling == .userfaultfd else { exit(5) }
                let file = try fs.open("/b")
                let mapping = try file.map(count: 3 * cfPage)
                cfCopiesBeforeKill.store(killAt, ordering: .relaxed)
                for page in 0..<3 { cfStore(mapping, cfFaultValue(page), at: page * cfPage + 200) }
                try file.sync()
                exit(3)
            } catch {
                exit(4)
            }
        }
        guard let status = result?.exitStatus else { return }
        #expect(status == .signal(SIGKILL) || status == .exitCode(3), "\(status)")
        let device = try PMemDevice.open(path: path)
        defer { device.close() }
        let fs = try DAXFileSystem.mount(device)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        #expect(try cfRead(fs, "/a") == a, "killed at copy \(killAt): the source changed")
        let b = try #require(try cfRead(fs, "/b"))
        #expect(b.count == a.count)
        var stored = 0
        for page in 0..<3 {
            let old = Array(cfPageOf(a, page))
            let new = cfApply(old, value(page), at: 200)
            let seen = Array(cfPageOf(b, page))
            #expect(seen == old || seen == new, "killed at copy \(killAt): page \(page) is neither old nor new")
            if seen == new { stored += 1 }
        }
        // The stores are made in order: a later page stored means every earlier one is.
        #expect(
            (0..<3).allSatisfy { page in
                Array(cfPageOf(b, page)) != cfApply(Array(cfPageOf(a, page)), value(page), at: 200)
                    || (0..<page).allSatisfy {
                        Array(cfPageOf(b, $0)) == cfApply(Array(cfPageOf(a, $0)), value($0), at: 200)
                    }
            }, "killed at copy \(killAt): stores out of order")
        if status == .exitCode(3) { #expect(stored == 3) }
        do {
            try cfAudit(fs, postFormatFree: postFormatFree, "killed at copy \(killAt)")
        } catch {
            Issue.record("\(error)")
        }
    }
    @Test(
        "a process holding an orphaned clone (mapped, a read pin, a copy-on-write store) is SIGKILLed: mount frees it, counts balance"
    )
    func orphanedCloneKilled() async throws {
        let path = TemporaryDevice.uniquePath("cfkillorphan")
        defer { unlink(path) }
        let a0 = cfPattern(3 * cfPage, seed: 90)
        let postFormatFree: Int
        do {
            let device = try PMemDevice.create(path: path, size: 4 << 20)
            let fs = try DAXFileSystem.format(device)
            try cfStale(fs)
            postFormatFree = fs.statistics().freeBlocks
            try cfMake(fs, "/a", a0)
            try fs.clone("/a", to: "/b")
            try fs.unmount()
            device.close()
        }
        await #expect(processExitsWith: .signal(SIGKILL)) { [path = path as String] in
            do {
                let device = try PMemDevice.open(path: path)
                let fs = try DAXFileSystem.mount(device)
                guard fs.faultHandling == .userfaultfd else { exit(5) }
                let b = try fs.open("/b")
                let mapping = try b.map(count: 3 * cfPage)
                let pin = try mapping.pin(offset: 0, count: cfPage, access: .readOnly)
                try fs.remove("/b")
                cfStore(mapping, 0x9393_9393_9393_9393, at: cfPage + 8)
                let a = try fs.open("/a")
                try a.write([UInt8](repeating: 0x94, count: 8), at: 2 * cfPage + 8)
                kill(getpid(), SIGKILL)
                pin.release()
                exit(3)
            } catch {
                exit(4)
            }
        }
        var a1 = a0
        a1.replaceSubrange(2 * cfPage + 8..<2 * cfPage + 16, with: [UInt8](repeating: 0x94, count: 8))
        let device = try PMemDevice.open(path: path)
        defer { device.close() }
        let fs = try DAXFileSystem.mount(device)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        #expect(try fs.contentsOfDirectory("/") == ["a"])
        #expect(try cfRead(fs, "/a") == a1)
        #expect(fs.statistics().sharedBlocks == 0, "the freed orphan's references were not dropped")
        do {
            try cfAudit(fs, postFormatFree: postFormatFree, "after the orphan's process was killed")
        } catch {
            Issue.record("\(error)")
        }
    }
    @Test(
        "a process that truncates both sides of a clone with .deferFree while a NIC holds a shared page is SIGKILLed: the quarantined block is free after mount"
    )
    func quarantinedSharedBlockKilled() async throws {
        let path = TemporaryDevice.uniquePath("cfkillquar")
        defer { unlink(path) }
        let a0 = cfPattern(3 * cfPage, seed: 91)
        let postFormatFree: Int
        do {
            let device = try PMemDevice.create(path: path, size: 4 << 20)
            let fs = try DAXFileSystem.format(device)
            try cfStale(fs)
            postFormatFree = fs.statistics().freeBlocks
            try cfMake(fs, "/a", a0)
            try fs.clone("/a", to: "/b")
            try cfMake(fs, "/keep", cfPattern(100, seed: 92))
            try fs.unmount()
            device.close()
        }
        await #expect(processExitsWith: .signal(SIGKILL)) { [path = path as String] in
            do {
                let device = try PMemDevice.open(path: path)
                let fs = try DAXFileSystem.mount(device)
                let b = try fs.open("/b")
                let mapping = try b.map(count: 3 * cfPage)
                let nic = DMAEngine(device: device)
                let region = nic.register(try mapping.pin(offset: cfPage, count: cfPage, access: .readOnly))
                try fs.open("/a").truncate(to: 0, ifBusy: .deferFree)
                try b.truncate(to: 0, ifBusy: .deferFree)
                guard fs.statistics().quarantinedBlocks == 1 else { exit(6) }
                kill(getpid(), SIGKILL)
                nic.deregister(region)
                exit(3)
            } catch {
                exit(4)
            }
        }
        let device = try PMemDevice.open(path: path)
        defer { device.close() }
        let fs = try DAXFileSystem.mount(device)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        #expect(try cfRead(fs, "/a") == [] && cfRead(fs, "/b") == [])
        let statistics = fs.statistics()
        #expect(statistics.quarantinedBlocks == 0 && statistics.sharedBlocks == 0 && statistics.pinnedPages == 0)
        do {
            try cfAudit(fs, postFormatFree: postFormatFree, "after the pinning process was killed")
        } catch {
            Issue.record("\(error)")
        }
    }
}

private func cfFaultValue(_ page: Int) -> UInt64 { 0xD0D0_0000_0000_0000 | UInt64(page + 1) }

/// Durable copies left before the process kills itself (armed in a child only).
private let cfCopiesBeforeKill = Atomic<Int>(-1_000_000_000)
