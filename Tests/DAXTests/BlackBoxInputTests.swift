import DAX
import Foundation
import Testing

// Black-box tests of bad input and limits, written from README.md, docs/*.md, the examples'
// READMEs, each command's --help and the public API only, by a tester that did not read the
// sources.

private let biPage = 4096
/// docs/format.md: "A file has at most 2^40 - 1 pages ..., so sizes are at most (2^40 - 1) x 4096 bytes."
private let biMaxFileSize = ((1 << 40) - 1) * 4096

private func biPattern(_ count: Int, seed: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: ($0 &* 131) &+ ($0 >> 9) &+ seed &* 29 &+ 1) }
}

/// CRC-32C (Castagnoli), as docs/format.md says every structure carries.
private let biCRCTable: [UInt32] = (0..<256).map { index -> UInt32 in
    var c = UInt32(index)
    for _ in 0..<8 { c = (c & 1) != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
    return c
}

private func biCRC(_ bytes: ArraySlice<UInt8>) -> UInt32 {
    var c: UInt32 = 0xFFFF_FFFF
    for byte in bytes { c = biCRCTable[Int((c ^ UInt32(byte)) & 0xFF)] ^ (c >> 8) }
    return c ^ 0xFFFF_FFFF
}

extension Array where Element == UInt8 {
    fileprivate func biU64(_ offset: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(self[offset + $1]) << (8 * UInt64($1)) }
    }
    fileprivate mutating func biPut(_ value: UInt64, at offset: Int, bytes: Int) {
        for i in 0..<bytes { self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    }
}

/// A local file for `daxemu put`, removed when the value goes.
private final class InputLocalFile: @unchecked Sendable {
    let path = NSTemporaryDirectory() + "bbin-\(getpid())-\(UUID().uuidString.prefix(8))"
    init(_ bytes: [UInt8]) throws { try Data(bytes).write(to: URL(fileURLWithPath: path)) }
    deinit { unlink(path) }
}

/// A directory of its own under the temporary directory, removed when the value goes.
private final class InputDirectory: @unchecked Sendable {
    let path = NSTemporaryDirectory() + "bbin-dir-\(getpid())-\(UUID().uuidString.prefix(8))"
    init() throws { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// What a file system looks like from outside: every path with its type, size and bytes (files).
private func biTree(_ fs: DAXFileSystem, _ directory: String = "/") throws -> [String: [UInt8]?] {
    var result: [String: [UInt8]?] = [:]
    for name in try fs.contentsOfDirectory(directory) {
        let path = directory == "/" ? "/" + name : directory + "/" + name
        do {
            let file = try fs.open(path, access: .readOnly)
            defer { file.close() }
            result[path] = try file.read(count: file.size, at: 0)
        } catch let error as DAXError where error.code == .isADirectory {
            result[path] = .some(nil)
            for (key, value) in try biTree(fs, path) { result[key] = value }
        }
    }
    return result
}

private struct InputNumbers: Equatable {
    var free: Int
    var shared: Int
    var quarantined: Int
    var pinned: Int
    init(_ fs: DAXFileSystem) {
        let s = fs.statistics()
        free = s.freeBlocks
        shared = s.sharedBlocks
        quarantined = s.quarantinedBlocks
        pinned = s.pinnedPages
    }
}

/// Everything a refused call must leave as it was: the tree and bytes, the frames of each file,
/// the counts; and a clean check.
private func biSnapshot(_ fs: DAXFileSystem) throws -> ([String: [UInt8]?], [String: [PageFrameNumber?]], InputNumbers)
{
    let tree = try biTree(fs)
    var frames: [String: [PageFrameNumber?]] = [:]
    for (path, bytes) in tree where bytes != nil {
        let file = try fs.open(path, access: .readOnly)
        defer { file.close() }
        if file.size > 0 { frames[path] = try file.frames(offset: 0, count: file.size) }
    }
    return (tree, frames, InputNumbers(fs))
}

private func biExpectUnchanged(
    _ fs: DAXFileSystem, _ before: ([String: [UInt8]?], [String: [PageFrameNumber?]], InputNumbers), _ what: String,
    sourceLocation: SourceLocation = #_sourceLocation
) throws {
    let after = try biSnapshot(fs)
    #expect(after.0 == before.0, "\(what): the tree or bytes changed", sourceLocation: sourceLocation)
    #expect(after.1 == before.1, "\(what): frames changed", sourceLocation: sourceLocation)
    #expect(after.2 == before.2, "\(what): \(before.2) -> \(after.2)", sourceLocation: sourceLocation)
    let report = try fs.check()
    #expect(report.isClean, "\(what): \(report.problems)", sourceLocation: sourceLocation)
}

/// Fills every free block of `fs` with one file, `/fill`.
private func biFill(_ fs: DAXFileSystem) throws {
    let fill = try fs.create("/fill")
    defer { fill.close() }
    var offset = 0
    var want = fs.statistics().freeBlocks
    while want > 0 {
        do {
            try fill.allocate(offset: offset, count: want * biPage)
            offset += want * biPage
            want = fs.statistics().freeBlocks
        } catch let error as DAXError where error.code == .noSpace {
            // An allocation may need a block of metadata (an extent leaf): take less.
            want -= 1
        }
    }
    #expect(fs.statistics().freeBlocks == 0)
}

@Suite("BlackBox: bad input and limits", .serialized)
struct BlackBoxInputTests {
    // MARK: - Library: names of 255 and 256 bytes through every call that names

    @Test("names of 255 bytes work everywhere; 256 bytes (ASCII or UTF-8) are refused and change nothing")
    func nameLengths() throws {
        let s = try BlackBoxRig("binames")
        let data = biPattern(2 * biPage + 7, seed: 1)
        try s.make("/f", data)
        try s.fs.createDirectory("/d")
        try s.make("/d/inner", data)
        let n255 = String(repeating: "a", count: 255)
        let n256 = String(repeating: "b", count: 256)
        let euro255 = String(repeating: "€", count: 85)  // 3 bytes each: 255
        let euro258 = String(repeating: "€", count: 86)
        let e256 = String(repeating: "é", count: 128)  // 2 bytes each: 256
        #expect(euro255.utf8.count == 255 && e256.utf8.count == 256)

        try s.fs.clone("/f", to: "/" + n255)
        try s.fs.clone("/d", to: "/" + euro255)
        try s.fs.createDirectory("/d/" + n255)
        try s.fs.clone("/d", to: "/d2")  // a snapshot of a tree that holds a 255-byte name
        #expect(try s.fs.contentsOfDirectory("/d2").contains(n255))
        #expect(try s.contents("/" + n255) == data)
        #expect(try s.contents("/" + euro255 + "/inner") == data)

        let before = try biSnapshot(s.fs)
        for long in [n256, euro258, e256] {
            expectDAXError(.invalidArgument, "clone to \(long.utf8.count) bytes") {
                try s.fs.clone("/f", to: "/" + long)
            }
            expectDAXError(.invalidArgument, "snapshot to \(long.utf8.count) bytes") {
                try s.fs.clone("/d", to: "/" + long)
            }
            expectDAXError(.invalidArgument, "create") { _ = try s.fs.create("/d/" + long) }
            expectDAXError(.invalidArgument, "mkdir") { try s.fs.createDirectory("/" + long) }
            expectDAXError(.invalidArgument, "rename") { try s.fs.rename("/f", to: "/" + long) }
            // A name too long on the source side is a name that cannot exist.
            let missing = expectDAXError(.invalidArgument, "clone from") { try s.fs.clone("/" + long, to: "/x") }
            _ = missing
        }
        try biExpectUnchanged(s.fs, before, "refused long names")
    }

    @Test("clone/snapshot: a tree into itself, the root, empty paths, a newline name")
    func cloneAwkwardPaths() throws {
        let s = try BlackBoxRig("bipaths")
        let data = biPattern(biPage + 3, seed: 2)
        try s.make("/f", data)
        try s.fs.createDirectory("/d")
        try s.fs.createDirectory("/d/sub")
        try s.make("/d/sub/g", data)
        let before = try biSnapshot(s.fs)
        for (source, destination) in [
            ("/d", "/d/x"), ("/d", "/d/sub/x"), ("/", "/x"), ("/d/", "/d/sub/y"), ("/d", "/d/./sub/../z"),
        ] {
            do {
                try s.fs.clone(source, to: destination)
                Issue.record("clone \(source) to \(destination): nothing thrown")
            } catch let error as DAXError {
                #expect(
                    [.invalidArgument, .alreadyExists, .busy].contains(error.code),
                    "clone \(source) to \(destination): \(error)")
            }
        }
        for (source, destination) in [("", "/x"), ("/f", "")] {
            do {
                try s.fs.clone(source, to: destination)
                Issue.record("clone \(source.debugDescription) to \(destination.debugDescription): nothing thrown")
            } catch is DAXError {}
        }
        expectDAXError(.notADirectory, "a source under a file") { try s.fs.clone("/f/x", to: "/y") }
        try biExpectUnchanged(s.fs, before, "refused clones")

        // A name with a newline is a name like any other.
        try s.fs.clone("/f", to: "/a\nb")
        try s.fs.clone("/d", to: "/snap\nshot")
        #expect(try s.fs.contentsOfDirectory("/").contains("a\nb"))
        #expect(try s.contents("/a\nb") == data)
        #expect(try s.contents("/snap\nshot/sub/g") == data)
        #expect(try s.fs.check().isClean)
    }

    // MARK: - Library: offsets and counts near the limits

    @Test("ranges that overflow an Int, or reach past the largest file: DAXError, no trap, nothing changed (child)")
    func overflowingRanges() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            alarm(40)  // a call that walks 2^40 pages one at a time is a failure too
            let path = "/dev/shm/bbin-ovf-\(getpid())"
            guard let device = try? PMemDevice.create(path: path, size: 8 << 20) else { exit(2) }
            unlink(path)
            guard let fs = try? DAXFileSystem.format(device), let file = try? fs.create("/f") else { exit(3) }
            let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
            guard (try? file.write(data, at: 0)) != nil, (try? fs.clone("/f", to: "/g")) != nil,
                let g = try? fs.open("/g")
            else { exit(4) }
            let frames = try? file.frames(offset: 0, count: 8192)
            let steps = ChildSteps()
            let bad: [DAXError.Code] = [.invalidArgument]
            let badOrFull: [DAXError.Code] = [.invalidArgument, .noSpace]
            let top = Int.max & ~4095
            steps.step("frames(offset: 4096, count: Int.max)", bad) {
                _ = try file.frames(offset: 4096, count: Int.max)
            }
            steps.step("frames(offset: top, count: 8192)", bad) { _ = try file.frames(offset: top, count: 8192) }
            steps.step("blockReferences(offset: 4096, count: Int.max)", bad) {
                _ = try file.blockReferences(offset: 4096, count: Int.max)
            }
            steps.step("blockReferences(offset: top, count: 8192)", bad) {
                _ = try file.blockReferences(offset: top, count: 8192)
            }
            steps.step("blockReferences(count: -1)", bad) { _ = try file.blockReferences(offset: 0, count: -1) }
            steps.step("migrate(offset: 4096, count: Int.max)", bad) {
                _ = try file.migrate(offset: 4096, count: Int.max)
            }
            steps.step("migrate(offset: top, count: 8192)", bad) { _ = try file.migrate(offset: top, count: 8192) }
            steps.step("migrate(offset: -4096)", bad) { _ = try file.migrate(offset: -4096, count: 4096) }
            steps.step("migrate(count: -1)", bad) { _ = try file.migrate(offset: 0, count: -1) }
            steps.step("deduplicate(offset: 4096, count: Int.max)", bad) {
                _ = try fs.deduplicate("/f", offset: 4096, "/g", offset: 4096, count: Int.max)
            }
            steps.step("deduplicate(offset: top)", bad) {
                _ = try fs.deduplicate("/f", offset: top, "/g", offset: 0, count: 4096)
            }
            steps.step("deduplicate(destination offset: top)", bad) {
                _ = try fs.deduplicate("/f", offset: 0, "/g", offset: top, count: 4096)
            }
            steps.step("deduplicate(offset: -4096)", bad) {
                _ = try fs.deduplicate("/f", offset: -4096, "/g", offset: 0, count: 4096)
            }
            steps.step("deduplicate(offset: 100) (not a multiple of 4096)", bad) {
                _ = try fs.deduplicate("/f", offset: 100, "/g", offset: 100, count: 4096)
            }
            steps.step("g.write(2 bytes at Int.max - 1)", badOrFull) { try g.write([1, 2], at: Int.max - 1) }
            steps.step("g.write(at: largest size)", badOrFull) { try g.write([1], at: biMaxFileSize) }
            steps.step("g.write(2 bytes at largest size - 1)", badOrFull) {
                try g.write([1, 2], at: biMaxFileSize - 1)
            }
            steps.step("g.truncate(to: largest size + 1)", badOrFull) {
                try g.truncate(to: biMaxFileSize + 1, ifBusy: .fail)
            }
            steps.step("g.allocate(offset: largest size, count: 4096)", badOrFull) {
                try g.allocate(offset: biMaxFileSize, count: 4096)
            }
            steps.step("g.punchHole(offset: 4096, count: Int.max)", badOrFull) {
                try g.punchHole(offset: 4096, count: Int.max, ifBusy: .fail)
            }
            FileHandle.standardError.write(Data("step unchanged after refusals\n".utf8))
            if file.size != 8192 || g.size != 8192 { steps.mismatch("sizes \(file.size) \(g.size)") }
            if (try? file.read(count: 8192, at: 0)) != data || (try? g.read(count: 8192, at: 0)) != data {
                steps.mismatch("bytes changed")
            }
            if (try? file.frames(offset: 0, count: 8192)) != frames || (try? g.frames(offset: 0, count: 8192)) != frames
            {
                steps.mismatch("frames changed")
            }
            if fs.statistics().sharedBlocks != 2 { steps.mismatch("shared \(fs.statistics().sharedBlocks)") }
            if (try? fs.check().isClean) != true { steps.mismatch("check not clean") }

            // The largest file: a byte at its last offset is fine, and it can be cloned, deduplicated
            // and migrated over its whole size (holes are walked, not visited).
            FileHandle.standardError.write(Data("step a file of the largest size\n".utf8))
            guard let big = try? fs.create("/big") else { exit(5) }
            do {
                try big.write([42], at: biMaxFileSize - 1)
                try big.write(data, at: 0)
                if big.size != biMaxFileSize { steps.mismatch("big size \(big.size)") }
                if try big.read(count: 1, at: biMaxFileSize - 1) != [42] { steps.mismatch("last byte") }
                try fs.clone("/big", to: "/big2")
                FileHandle.standardError.write(Data("step dedup of the largest file\n".utf8))
                let shared = try fs.deduplicate("/big", offset: 0, "/big2", offset: 0, count: biMaxFileSize)
                if shared < 8192 { steps.mismatch("dedup of two clones shared \(shared)") }
                FileHandle.standardError.write(Data("step migrate of the largest file\n".utf8))
                let moved = try big.migrate(offset: 0, count: biMaxFileSize)
                if !moved.busy.isEmpty { steps.mismatch("busy \(moved.busy)") }
                if try big.read(count: 8192, at: 0) != data { steps.mismatch("big bytes after migrate") }
            } catch {
                steps.mismatch("largest file: \(error)")
            }
            // Asking for one entry per page of it is too much memory: a DAXError, not a trap.
            steps.step("big.frames(offset: 0, count: largest size)", badOrFull) {
                _ = try big.frames(offset: 0, count: biMaxFileSize)
            }
            steps.step("big.blockReferences(offset: 0, count: largest size)", badOrFull) {
                _ = try big.blockReferences(offset: 0, count: biMaxFileSize)
            }
            if (try? fs.check().isClean) != true { steps.mismatch("check not clean at the end") }
            steps.exitWithResult()
        }
        ChildSteps.expectPassed(result)
    }

    // MARK: - Library: a full device, no space in the middle of a fork

    @Test("a full device: copy-on-write write, truncate and punch of a shared page are all or nothing")
    func fullDeviceCopyOnWrite() throws {
        let s = try BlackBoxRig("bifullcow", size: 2 << 20)
        let data = biPattern(8 * biPage, seed: 3)
        try s.make("/a", data)
        try s.fs.clone("/a", to: "/b")
        try biFill(s.fs)
        let before = try biSnapshot(s.fs)
        let b = try s.fs.open("/b")
        defer { b.close() }

        expectDAXError(.noSpace, "write over 3 shared pages") { try b.write(biPattern(3 * biPage, seed: 4), at: 100) }
        try biExpectUnchanged(s.fs, before, "refused write")
        expectDAXError(.noSpace, "write into 1 shared page") { try b.write([1, 2, 3], at: 5) }
        try biExpectUnchanged(s.fs, before, "refused small write")

        // A truncate to inside a shared page, and a punch of part of one, must copy the page first
        // (docs/forking.md): with no block to copy into, refused and nothing changed, or done right.
        do {
            try b.truncate(to: biPage + 100, ifBusy: .fail)
            #expect(b.size == biPage + 100)
            #expect(try b.read(count: b.size, at: 0) == Array(data[0..<(biPage + 100)]))
            try b.truncate(to: 2 * biPage, ifBusy: .fail)
            #expect(try b.read(count: biPage - 100, at: biPage + 100) == [UInt8](repeating: 0, count: biPage - 100))
            Issue.record("truncate to a partial shared page on a full device succeeded (checked it is right)")
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
            try biExpectUnchanged(s.fs, before, "refused truncate")
        }
        do {
            try b.punchHole(offset: 100, count: 200, ifBusy: .fail)
            #expect(try b.read(count: 200, at: 100) == [UInt8](repeating: 0, count: 200))
            #expect(try s.contents("/a") == data)
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
            try biExpectUnchanged(s.fs, before, "refused punch")
        }
        #expect(try s.contents("/a") == data)
    }

    @Test("a full device: clone .copy of a pinned page, a .readWrite pin of a shared page, migrate, dedup")
    func fullDevicePinsAndMigration() throws {
        let s = try BlackBoxRig("bifullpin", size: 2 << 20)
        let data = biPattern(4 * biPage, seed: 5)
        try s.make("/p", data)
        try s.make("/twin", data)
        try s.make("/s", data)
        try s.fs.clone("/s", to: "/s2")
        try s.fs.createDirectory("/dir")
        try s.make("/dir/x", data)
        let p = try s.fs.open("/p")
        defer { p.close() }
        let mapping = try p.map(count: 4 * biPage)
        defer { mapping.unmap() }
        var pin: PinnedPages? = try mapping.pin(offset: 0, count: biPage)
        try biFill(s.fs)
        let before = try biSnapshot(s.fs)

        // The pinned page must be copied into the clone: no block for it.
        expectDAXError(.noSpace, "clone .copy of a pinned page") { try s.fs.clone("/p", to: "/q") }
        try biExpectUnchanged(s.fs, before, "refused clone")

        // A .readWrite pin of a shared page unshares it first: no block for the copy.
        let s2 = try s.fs.open("/s2")
        defer { s2.close() }
        let shared = try s2.map(count: 4 * biPage)
        defer { shared.unmap() }
        let acquired = s.fs.statistics().pinsAcquired
        do {
            let extra = try shared.pin(offset: 0, count: biPage, access: .readWrite)
            extra.release()
            Issue.record("a .readWrite pin of a shared page on a full device succeeded")
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
        }
        let stats = s.fs.statistics()
        #expect(stats.pinsAcquired - stats.pinsReleased == 1, "only /p's pin is held: \(stats)")
        _ = acquired
        try biExpectUnchanged(s.fs, before, "refused pin")

        // migrate has nowhere to move to: nothing moves, nothing is lost.
        let twin = try s.fs.open("/twin")
        defer { twin.close() }
        do {
            let result = try twin.migrate(offset: 0, count: twin.size)
            #expect(result.migrated == 0, "\(result)")
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
        }
        try biExpectUnchanged(s.fs, before, "migrate with no space")

        // dedup needs no block: it works on a full device, and frees /twin's.
        let merged = try s.fs.deduplicate("/dir/x", offset: 0, "/twin", offset: 0, count: data.count)
        #expect(merged == data.count)
        #expect(s.fs.statistics().freeBlocks == 4)
        #expect(try s.contents("/twin") == data)
        pin?.release()
        pin = nil
        #expect(try s.fs.check().isClean)
    }

    @Test("a snapshot that needs more inodes than are left is refused whole")
    func snapshotOutOfInodes() throws {
        let s = try BlackBoxRig("biinodes", size: 2 << 20)
        try s.fs.createDirectory("/d")
        var made = 0
        // Make as many files as leave fewer free inodes than /d needs for a snapshot.
        while true {
            do {
                try s.make("/d/f\(made)", [UInt8(made & 0xFF)])
                made += 1
            } catch let error as DAXError where error.code == .noSpace {
                break
            }
        }
        #expect(made > 10)
        // Now free some, so that a snapshot of a small tree fits and of /d does not.
        for i in 0..<5 { try s.fs.remove("/d/f\(i)") }
        try s.fs.createDirectory("/small")
        try s.make("/small/one", [1])
        try s.fs.clone("/small", to: "/small2")
        let before = try biSnapshot(s.fs)
        let error = expectDAXError(.noSpace, "snapshot with too few inodes") { try s.fs.clone("/d", to: "/snap") }
        #expect(
            error?.message.contains("/snap") == true || error?.message.contains("/d") == true,
            "\(String(describing: error))")
        try biExpectUnchanged(s.fs, before, "refused snapshot")
        try s.remount()
        try biExpectUnchanged(s.fs, before, "refused snapshot, after a remount")
    }

    // MARK: - daxemu: the forking commands on a full device and with awkward names

    @Test("daxemu snapshot, clone and defrag on a full device: one line, exit 1, ls/info/bytes unchanged")
    func commandsOnAFullDevice() throws {
        let device = DevicePath()
        let data = biPattern(3 * biPage + 11, seed: 6)
        try device.withNewFileSystem(size: 2 << 20) { fs in
            try fs.createDirectory("/d")
            for i in 0..<20 { try fs.create("/d/f\(i)").write(data, at: 0) }
            let frag = try fs.create("/frag")
            // Every other page: many extents; then fill the gaps' blocks elsewhere so that a defrag
            // would need free blocks.
            for page in stride(from: 0, to: 40, by: 2) { try frag.write(biPattern(100, seed: page), at: page * biPage) }
            frag.close()
            try biFill(fs)
        }
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", device.path]) }
        func state() throws -> [String] {
            [
                try daxemu(["ls", "-la", "/"]).output, try daxemu(["ls", "-l", "/d"]).output,
                try daxemu(["frames", "/frag"]).output,
                "\(try fileSystemNumbers(device.path))",
                String(decoding: try daxemu(["get", "/d/f3", "-"]).outputData, as: UTF8.self),
            ]
        }
        let before = try state()
        // (An empty directory takes no block, so mkdir in a directory with room still works.)
        for arguments in [
            ["snapshot", "/d", "/snap"], ["snapshot", "/d", "/d/inner"], ["clone", "/frag", "/d/frag2"],
        ] {
            let result = try daxemu(arguments)
            if arguments[2] == "/d/inner" {
                expectCleanFailure(result)  // inside the tree it copies, or no space: either is right
            } else {
                expectCleanFailure(result, mentioning: "no space")
            }
            #expect(result.status == 1, "\(arguments): \(result.status)")
            #expect(try state() == before, "\(arguments) changed the device")
        }
        // A clone of a file needs no data block for itself; it works on a full device, or it
        // fails cleanly and changes nothing.
        let defrag = try daxemu(["defrag", "/frag"])
        if defrag.status != 0 { expectCleanFailure(defrag) }
        #expect(Array(try daxemu(["get", "/d/f3", "-"]).outputData) == data)
        #expect(try daxemu(["fsck"]).status == 0)
    }

    @Test("daxemu clone and snapshot: names of 255 bytes work, 256 bytes are one line; newlines are shown escaped")
    func commandNames() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        let data = biPattern(biPage + 9, seed: 7)
        let local = try InputLocalFile(data)
        #expect(try daxemu(["put", local.path, "/f"]).status == 0)
        #expect(try daxemu(["mkdir", "/dir"]).status == 0)
        #expect(try daxemu(["put", local.path, "/dir/g"]).status == 0)
        let n255 = String(repeating: "n", count: 255)
        let n256 = String(repeating: "m", count: 256)
        #expect(try daxemu(["clone", "/f", "/" + n255]).status == 0)
        #expect(try daxemu(["snapshot", "/dir", "/s" + String(n255.dropFirst())]).status == 0)
        let before = try daxemu(["ls", "-la", "/"]).output
        var statuses: [String: Int32] = [:]
        for arguments in [
            ["clone", "/f", "/" + n256], ["snapshot", "/dir", "/" + n256], ["clone", "/f", "/dir/" + n256],
            ["mkdir", "/" + n256], ["put", local.path, "/" + n256], ["mv", "/f", "/" + n256],
        ] {
            let result = try daxemu(arguments)
            expectCleanFailure(result, mentioning: "255")
            statuses[arguments[0]] = result.status
        }
        #expect(Set(statuses.values).count == 1, "one kind of error, one exit status: \(statuses)")
        #expect(try daxemu(["ls", "-la", "/"]).output == before)
        // A newline in a name: the command works, and every listing shows it escaped, one line.
        let clone = try daxemu(["clone", "/f", "/a\nb"])
        #expect(clone.status == 0 && !clone.output.dropLast().contains("\n"), "\(clone.output)")
        let snapshot = try daxemu(["snapshot", "/dir", "/s\nt"])
        #expect(snapshot.status == 0 && !snapshot.output.dropLast().contains("\n"), "\(snapshot.output)")
        let listing = try daxemu(["ls", "/"]).output.split(separator: "\n")
        #expect(listing.contains("a\\nb") && listing.contains("s\\nt/"), "\(listing)")
        #expect(Array(try daxemu(["get", "/s\nt/g", "-"]).outputData) == data)
        let dedup = try daxemu(["dedup", "/f", "/a\nb"])
        #expect(dedup.status == 0 && !dedup.output.dropLast().contains("\n"), "\(dedup.output)")
        #expect(try daxemu(["fsck"]).status == 0)
    }

    @Test("daxemu dedup and defrag: offsets at Int.max, counts that overflow, numbers too large")
    func commandNumbers() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        let data = biPattern(2 * biPage, seed: 8)
        let local = try InputLocalFile(data)
        #expect(try daxemu(["put", local.path, "/f"]).status == 0)
        #expect(try daxemu(["put", local.path, "/g"]).status == 0)
        let before = try daxemu(["ls", "-l", "/"]).output
        let top = String(Int.max & ~4095)
        for arguments in [
            ["dedup", "/f", "/g", "--offset", top],
            ["dedup", "/f", "/g", "--destination-offset", top],
            ["dedup", "/f", "/g", "--offset", "4096", "--count", String(Int.max)],
            ["dedup", "/f", "/g", "--count", String(Int.max - 4095)],
            ["dedup", "/f", "/g", "--offset", "99999999999999999999"],
            ["dedup", "/f", "/g", "--count", "8E"],
            ["dedup", "/f", "/g", "--count", "16E"],
            ["dedup", "/f", "/g", "--offset", "-0"],
            ["truncate", "/g", "4503599627366401"],
            ["truncate", "/g", String(Int.max)],
            ["truncate", "/g", "99999999999999999999"],
            ["defrag", "/nothing"],
            ["defrag", "/"],
            ["defrag", "relative"],
            ["defrag", ""],
        ] {
            let result = try daxemu(arguments)
            if arguments == ["dedup", "/f", "/g", "--offset", "-0"] && result.status == 0 { continue }
            expectCleanFailure(result)
            #expect([1, 64].contains(result.status), "\(arguments): \(result.status)")
        }
        #expect(try daxemu(["ls", "-l", "/"]).output == before)
        // The largest size is allowed, one more byte is not.
        #expect(try daxemu(["truncate", "/g", "4503599627366400"]).status == 0)
        #expect(try daxemu(["ls", "-l", "/g"]).output.contains("4503599627366400"))
        let frames = try daxemu(["frames", "/g"])
        #expect(frames.status == 0, "\(frames.errors)")
        #expect(try daxemu(["fsck"]).status == 0)
    }

    // MARK: - daxemu: damaged images, crafted with valid checksums

    /// A device with files, a clone and a snapshot, as bytes, and its geometry.
    private static func damagedImageBase(_ device: DevicePath) throws -> [UInt8] {
        try device.withNewFileSystem(size: 8 << 20) { fs in
            try fs.create("/f").write(biPattern(40_000, seed: 9), at: 0)
            try fs.createDirectory("/dir")
            for i in 0..<20 { try fs.create("/dir/n\(i)").write(biPattern(100, seed: i), at: 0) }
            let frag = try fs.create("/frag")
            for page in stride(from: 0, to: 40, by: 2) { try frag.write(biPattern(100, seed: page), at: page * biPage) }
            frag.close()
            try fs.clone("/f", to: "/fc")
            try fs.clone("/dir", to: "/snap")
        }
        return Array(try Data(contentsOf: URL(fileURLWithPath: device.path)))
    }

    @Test("read commands on crafted damage (valid checksums, impossible values): fail cleanly or report, never trap")
    func craftedDamage() throws {
        let device = DevicePath()
        let base = try Self.damagedImageBase(device)
        let totalBlocks = Int(base.biU64(24))
        let journalStart = Int(base.biU64(32))
        let journalBlocks = Int(base.biU64(40))
        let inodeStart = Int(base.biU64(48))
        let tableLeaf = journalStart + journalBlocks - 1
        func inode(_ n: Int) -> Int { inodeStart * biPage + (n - 1) * 256 }
        func resealInode(_ d: inout [UInt8], _ n: Int) {
            let o = inode(n)
            d.biPut(UInt64(biCRC(d[(o + 4)..<(o + 256)])), at: o, bytes: 4)
        }
        func resealSuper(_ d: inout [UInt8], both: Bool) {
            d.biPut(UInt64(biCRC(d[0..<252])), at: 252, bytes: 4)
            if both {
                d.replaceSubrange(((totalBlocks - 1) * biPage)..<((totalBlocks - 1) * biPage + 256), with: d[0..<256])
            }
        }
        func resealLeaf(_ d: inout [UInt8], _ block: Int) {
            let o = block * biPage
            d.biPut(UInt64(biCRC(d[(o + 8)..<(o + biPage)])), at: o + 4, bytes: 4)
        }
        // Inode 2 is /f, the first file made (ls --json confirms below).
        let list = try runCommand("daxemu", ["ls", "--json", "-d", device.path])
        let entries = try #require(try JSONSerialization.jsonObject(with: list.outputData) as? [[String: Any]])
        let f = try #require(entries.first { $0["name"] as? String == "f" }?["inode"] as? Int)
        let dir = try #require(entries.first { $0["name"] as? String == "dir" }?["inode"] as? Int)
        let firstExtent = base.biU64(inode(f) + 128)
        let firstBlock = base.biU64(inode(f) + 136)

        var cases: [(String, [UInt8])] = []
        func inodeCase(_ name: String, _ n: Int, _ offset: Int, _ value: UInt64, _ bytes: Int) {
            var d = base
            d.biPut(value, at: inode(n) + offset, bytes: bytes)
            resealInode(&d, n)
            cases.append((name, d))
        }
        inodeCase("size Int.max", f, 16, UInt64(Int.max), 8)
        inodeCase("size 2^64-1", f, 16, UInt64.max, 8)
        inodeCase("size past the largest", f, 16, UInt64(biMaxFileSize + 1), 8)
        inodeCase("extent count 2^32-1", f, 56, UInt64(UInt32.max), 4)
        inodeCase("leaf count 1, leaf at block 0", f, 60, 1, 4)
        inodeCase("type 255", f, 4, 255, 1)
        inodeCase("directory parent 2^32-1", dir, 48, UInt64(UInt32.max), 4)
        inodeCase("root parent itself not", 1, 48, UInt64(dir), 4)
        inodeCase("link count 0, not an orphan", f, 8, 0, 4)
        inodeCase("extent length 2^23-1", f, 128, (firstExtent & ((1 << 40) - 1)) | (((1 << 23) - 1) << 40), 8)
        inodeCase("extent at the last logical page", f, 128, ((1 << 40) - 5) | ((firstExtent >> 40) << 40), 8)
        inodeCase("extent block 2^48-1", f, 136, (1 << 48) - 1, 8)
        inodeCase("extent block in the inode table", f, 136, UInt64(inodeStart), 8)
        _ = firstBlock
        func superCase(_ name: String, _ offset: Int, _ value: UInt64, _ bytes: Int) {
            for both in [false, true] {
                var d = base
                d.biPut(value, at: offset, bytes: bytes)
                resealSuper(&d, both: both)
                cases.append(("superblock\(both ? "s" : " 0") \(name)", d))
            }
        }
        superCase("inode count 2^63", 64, 1 << 63, 8)
        superCase("data blocks 2^63", 96, 1 << 63, 8)
        superCase("journal blocks 2^40", 40, 1 << 40, 8)
        superCase("root inode 2^32-1", 104, UInt64(UInt32.max), 4)
        superCase("orphan head a linked file", 112, UInt64(f), 4)
        func leafCase(_ name: String, _ offset: Int, _ value: UInt64, _ bytes: Int) {
            var d = base
            d.biPut(value, at: tableLeaf * biPage + offset, bytes: bytes)
            resealLeaf(&d, tableLeaf)
            cases.append(("shared-block table \(name)", d))
        }
        leafCase("run count 2^32-1", 8, UInt64(UInt32.max), 4)
        leafCase("next leaf itself", 16, UInt64(tableLeaf), 8)
        leafCase("next leaf 2^48-1", 16, (1 << 48) - 1, 8)
        leafCase("run length 2^32-1", 40, UInt64(UInt32.max), 4)
        leafCase("run count 1", 44, 1, 4)
        leafCase("run at block 2^63", 32, 1 << 63, 8)

        let reads: [[String]] = [
            ["ls", "-l", "/"], ["ls", "--json", "/snap"], ["get", "/fc", "-"], ["get", "/snap/n3", "-"],
            ["info", "--json"], ["map"], ["map", "/fc"], ["frames", "/frag"], ["fsck"],
        ]
        for (name, bytes) in cases {
            try Data(bytes).write(to: URL(fileURLWithPath: device.path))
            for arguments in reads {
                let result = try runCommand("daxemu", arguments + ["-d", device.path])
                let errors = result.errors.split(separator: "\n").filter { !$0.hasPrefix("daxemu: warning:") }
                let what = "\(name): \(arguments)"
                #expect([0, 1].contains(result.status), "\(what): exit \(result.status): \(result.errors.prefix(300))")
                #expect(
                    !result.errors.contains("Backtrac") && !result.errors.contains("crashed")
                        && !result.errors.contains("Fatal error"), "\(what): \(result.errors.prefix(300))")
                if result.status == 1 && arguments[0] != "fsck" {
                    #expect(
                        errors.count == 1 && errors[0].hasPrefix("daxemu: "), "\(what): \(result.errors.prefix(300))")
                }
            }
            // fsck says what is wrong (exit 1), unless it found the structure harmless.
            let fsck = try runCommand("daxemu", ["fsck", "-d", device.path])
            #expect(fsck.status == 1, "\(name): fsck says clean: \(fsck.output.prefix(200))")
            // The read commands wrote nothing.
            #expect(Array(try Data(contentsOf: URL(fileURLWithPath: device.path))) == bytes, "\(name): device changed")
        }
    }

    // MARK: - explore and explore-merge

    @Test("explore-merge of a report whose counts overflow or are negative: one clean line, no trap")
    func mergeOfCorruptNumbers() throws {
        let directory = try InputDirectory()
        let one = directory.path + "/s1.json"
        let two = directory.path + "/s2.json"
        for (shard, path) in [("1/2", one), ("2/2", two)] {
            let made = try runCommand(
                "daxemu", ["explore", "--ops", "1", "--images-per-point", "0", "--shard", shard, "--json", path])
            #expect(made.status == 0, "\(made.errors)")
        }
        let text = try String(contentsOfFile: one, encoding: .utf8)
        var object = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        #expect(object["imagesChecked"] is Int)
        for (name, value) in [("max", Int.max), ("negative", -1), ("min", Int.min)] {
            object["imagesChecked"] = value
            let path = directory.path + "/\(name).json"
            try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: path))
            let result = try runCommand("daxemu", ["explore-merge", path, two])
            // A count no run makes names its file; one that only overflows the sum says so.
            expectCleanFailure(result, mentioning: name == "max" ? "do not fit" : "\(name).json")
            #expect(result.status == 1, "imagesChecked \(value): exit \(result.status)")
        }
    }

    @Test("explore and explore-merge --json to an empty path or a directory: one clean line, no Foundation dump")
    func reportPaths() throws {
        let directory = try InputDirectory()
        let one = directory.path + "/r.json"
        #expect(
            try runCommand("daxemu", ["explore", "--ops", "1", "--images-per-point", "0", "--json", one]).status == 0)
        for target in ["", directory.path, directory.path + "/missing/r.json"] {
            let merged = try runCommand("daxemu", ["explore-merge", one, "--json", target])
            expectCleanFailure(merged)
            #expect(
                !merged.errors.contains("NSCocoaErrorDomain"),
                "merge --json \(target.debugDescription): \(merged.errors)")
        }
        for program in ["daxemu", "kvstore", "pmemlog"] {
            let arguments = program == "pmemlog" ? ["explore", "--records", "1"] : ["explore", "--ops", "1"]
            let result = try runCommand(program, arguments + ["--images-per-point", "0", "--json", ""])
            expectCleanFailure(result, program)
            #expect(!result.errors.contains("NSCocoaErrorDomain"), "\(program) --json '': \(result.errors)")
            #expect(!result.output.contains("images checked"), "\(program) --json '': explored before refusing")
        }
    }

    @Test("the examples' explore refuse an option they do not have by name, even with a negative value")
    func examplesUnknownNegativeOption() throws {
        for (program, foreign) in [("kvstore", "--records"), ("pmemlog", "--ops")] {
            let result = try runCommand(program, ["explore", foreign, "-1"])
            expectCleanFailure(result, program)
            #expect(result.status == 64)
            #expect(result.errors.contains("Unknown option"), "\(program) explore \(foreign) -1: \(result.errors)")
        }
    }
}

/// `info --json`'s file-system numbers that a refused command must leave alone.
private func fileSystemNumbers(_ device: String) throws -> [String] {
    let info = try runCommand("daxemu", ["info", "--json", "-d", device])
    let object = try #require(try JSONSerialization.jsonObject(with: info.outputData) as? [String: Any])
    let fs = try #require(object["fileSystem"] as? [String: Any])
    return ["freeBlocks", "sharedBlocks", "files", "directories", "totalBlocks"].map { "\($0)=\(fs[$0] ?? "nil")" }
}
