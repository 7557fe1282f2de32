import Foundation
import Testing

@testable import DAX

/// A local file holding `bytes` for `daxemu put`, removed when the value goes.
private final class LocalFile: @unchecked Sendable {
    let path = NSTemporaryDirectory() + "daxemu-fork-\(getpid())-\(UUID().uuidString.prefix(8))"
    init(_ bytes: [UInt8]) throws { try Data(bytes).write(to: URL(fileURLWithPath: path)) }
    deinit { unlink(path) }
}

/// The `N shared` column of `ls -l` for `name`, or nil when no line names it.
private func sharedColumn(_ listing: String, _ name: String) -> Int? {
    for line in listing.split(separator: "\n") where line.hasSuffix(" " + name) {
        let words = line.split(separator: " ")
        guard let index = words.firstIndex(of: "shared"), index > 0 else { return nil }
        return Int(words[index - 1])
    }
    return nil
}

/// `info --json`'s file system object.
private func fileSystemJSON(_ device: String) throws -> [String: Any] {
    let info = try runCommand("daxemu", ["info", "--json", "-d", device])
    let object = try #require(try JSONSerialization.jsonObject(with: info.outputData) as? [String: Any])
    return try #require(object["fileSystem"] as? [String: Any])
}

@Suite("daxemu clone, snapshot, dedup and the shared blocks ls, frames and info show")
struct ForkingCommandTests {
    @Test("clone: the clone reads the source's bytes, shares its blocks, and a change to one leaves the other")
    func cloneFile() throws {
        let e = try ExampleDevice(size: "16M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        let data = pattern(5 * 4096 + 300, seed: 21)
        let local = try LocalFile(data)
        #expect(try daxemu(["put", local.path, "/source"]).status == 0)
        let clone = try daxemu(["clone", "/source", "/copy"])
        try #require(clone.status == 0, "\(clone.errors)")
        #expect(clone.output == "/copy: a clone of /source, 6 blocks shared\n", "\(clone.output)")
        #expect(Array(try daxemu(["get", "/copy", "-"]).outputData) == data)

        // ls -l, frames and info show the sharing.
        let listing = try daxemu(["ls", "-l", "/"]).output
        #expect(sharedColumn(listing, "source") == 6 && sharedColumn(listing, "copy") == 6, "\(listing)")
        let entries = try #require(
            try JSONSerialization.jsonObject(with: try daxemu(["ls", "--json", "/"]).outputData) as? [[String: Any]])
        #expect(entries.map { $0["sharedBlocks"] as? Int } == [6, 6])
        let frames = try daxemu(["frames", "/copy"]).output
        #expect(frames.split(separator: "\n").dropFirst().allSatisfy { $0.hasSuffix(" shared by 2") }, "\(frames)")
        #expect(frames == (try daxemu(["frames", "/source"]).output), "the same frames")
        let runs = try #require(
            try JSONSerialization.jsonObject(with: try daxemu(["frames", "--json", "/copy"]).outputData)
                as? [[String: Any]])
        #expect(runs.allSatisfy { $0["references"] as? Int == 2 } && runs.reduce(0) { $0 + ($1["count"] as! Int) } == 6)
        #expect(try fileSystemJSON(e.path)["sharedBlocks"] as? Int == 6)
        #expect(try daxemu(["info"]).output.contains("shared       6 blocks shared copy-on-write"))

        // A change to the clone copies; the source keeps its bytes.
        #expect(try daxemu(["truncate", "/copy", "4096"]).status == 0)
        #expect(Array(try daxemu(["get", "/source", "-"]).outputData) == data)
        #expect(Array(try daxemu(["get", "/copy", "-"]).outputData) == Array(data.prefix(4096)))
        #expect(sharedColumn(try daxemu(["ls", "-l", "/"]).output, "source") == 1)

        // Removing the clone leaves the source with blocks of its own.
        #expect(try daxemu(["rm", "/copy"]).status == 0)
        let after = try daxemu(["ls", "-l", "/"]).output
        #expect(sharedColumn(after, "source") == 0, "\(after)")
        #expect(try daxemu(["frames", "/source"]).output.contains("shared") == false)
        #expect(try fileSystemJSON(e.path)["sharedBlocks"] as? Int == 0)
        #expect(Array(try daxemu(["get", "/source", "-"]).outputData) == data)
        #expect(try daxemu(["fsck"]).status == 0)
    }

    @Test("map: a file's pages it shares with a clone are its own (F), and the SVG names every file sharing them")
    func mapShowsSharedPages() throws {
        let e = try ExampleDevice(size: "16M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        let local = try LocalFile(pattern(6 * 4096, seed: 23))
        #expect(try daxemu(["put", local.path, "/source"]).status == 0)
        #expect(try daxemu(["put", local.path, "/other"]).status == 0)
        #expect(try daxemu(["clone", "/source", "/copy"]).status == 0)
        // Cut to four pages, the clone shares all of them; the source's last two are its alone.
        #expect(try daxemu(["truncate", "/copy", "16384"]).status == 0)
        for (file, pages) in [("/source", 6), ("/copy", 4)] {
            let map = try daxemu(["map", file]).output.split(separator: "\n").map(String.init)
            #expect(map.count == 3, "\(map)")
            #expect(map.dropFirst().first == "  " + String(repeating: "F", count: pages), "\(map)")
            #expect(map.last == "  F \(file) (\(pages))", "\(map)")
        }
        let svg = TemporaryDevice.uniquePath("map") + ".svg"
        defer { unlink(svg) }
        #expect(try daxemu(["map", "--svg", svg]).status == 0)
        let labels = try String(contentsOfFile: svg, encoding: .utf8)
        #expect(labels.contains("/source, /copy (shared): frames "), "\(labels)")
        #expect(labels.contains(">/source: frames "), "the pages only /source holds")
        #expect(labels.contains(">/other: frames "))
        #expect(!labels.contains(">/copy: frames "), "the clone holds no page alone")
    }

    @Test("clone into a directory keeps the name; onto an existing file it is refused and changes nothing")
    func cloneDestinations() throws {
        let e = try ExampleDevice(size: "16M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        let data = pattern(3 * 4096, seed: 4)
        let other = pattern(100, seed: 9)
        let (local, otherLocal) = (try LocalFile(data), try LocalFile(other))
        #expect(try daxemu(["put", local.path, "/f"]).status == 0)
        #expect(try daxemu(["put", otherLocal.path, "/g"]).status == 0)
        #expect(try daxemu(["mkdir", "/dir"]).status == 0)
        let into = try daxemu(["clone", "/f", "/dir", "--if-pinned", "fail"])
        try #require(into.status == 0, "\(into.errors)")
        #expect(Array(try daxemu(["get", "/dir/f", "-"]).outputData) == data)
        let onto = try daxemu(["clone", "/f", "/g"])
        expectCleanFailure(onto, mentioning: "exists")
        #expect(onto.status == 1)
        #expect(Array(try daxemu(["get", "/g", "-"]).outputData) == other)
        #expect(sharedColumn(try daxemu(["ls", "-l", "/"]).output, "g") == 0)
        #expect(try daxemu(["clone", "/f", "/u", "--if-pinned", "unsafe-share"]).status == 0)
        #expect(sharedColumn(try daxemu(["ls", "-l", "/"]).output, "f") == 3)
        #expect(try fileSystemJSON(e.path)["sharedBlocks"] as? Int == 3, "three blocks, each named three times")
        #expect(try daxemu(["fsck"]).status == 0)
    }

    @Test("snapshot: a tree's clone; the original changes and the snapshot keeps what it had")
    func snapshotTree() throws {
        let e = try ExampleDevice(size: "16M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        let (a, b, c) = (pattern(2 * 4096, seed: 1), pattern(4096 + 10, seed: 2), pattern(7, seed: 3))
        let locals = try [a, b, c].map(LocalFile.init)
        #expect(try daxemu(["mkdir", "-p", "/data/sub"]).status == 0)
        #expect(try daxemu(["put", locals[0].path, "/data/a"]).status == 0)
        #expect(try daxemu(["put", locals[1].path, "/data/sub/b"]).status == 0)
        let snapshot = try daxemu(["snapshot", "/data", "/snap"])
        try #require(snapshot.status == 0, "\(snapshot.errors)")
        #expect(snapshot.output == "/snap: a snapshot of /data, 2 files and 1 directory\n", "\(snapshot.output)")
        #expect(try daxemu(["ls", "/snap"]).output == "a\nsub/\n")
        #expect(Array(try daxemu(["get", "/snap/a", "-"]).outputData) == a)
        #expect(Array(try daxemu(["get", "/snap/sub/b", "-"]).outputData) == b)
        #expect(sharedColumn(try daxemu(["ls", "-l", "/snap/sub"]).output, "b") == 2)

        // The original changes: the snapshot does not.
        #expect(try daxemu(["put", locals[2].path, "/data/a"]).status == 0)
        #expect(try daxemu(["rm", "/data/sub/b", "/data/sub"]).status == 0)
        #expect(Array(try daxemu(["get", "/data/a", "-"]).outputData) == c)
        #expect(Array(try daxemu(["get", "/snap/a", "-"]).outputData) == a)
        #expect(Array(try daxemu(["get", "/snap/sub/b", "-"]).outputData) == b)
        #expect(sharedColumn(try daxemu(["ls", "-l", "/snap"]).output, "a") == 0)
        #expect(try fileSystemJSON(e.path)["sharedBlocks"] as? Int == 0)
        // A snapshot into an existing directory keeps the name.
        #expect(try daxemu(["snapshot", "/snap", "/data"]).status == 0)
        #expect(try daxemu(["ls", "/data/snap/sub"]).output == "b\n")
        #expect(try daxemu(["fsck"]).status == 0)
    }

    @Test("dedup: equal pages come to share the source's blocks, the tail at both ends too; a differing page stays")
    func dedup() throws {
        let e = try ExampleDevice(size: "16M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        let data = pattern(4 * 4096 + 500, seed: 12)
        var changed = data
        changed[2 * 4096 + 7] ^= 0xFF
        let (local, changedLocal) = (try LocalFile(data), try LocalFile(changed))
        #expect(try daxemu(["put", local.path, "/a"]).status == 0)
        #expect(try daxemu(["put", changedLocal.path, "/b"]).status == 0)
        let result = try daxemu(["dedup", "/a", "/b"])
        try #require(result.status == 0, "\(result.errors)")
        #expect(result.output == "/b: 12788 of 16884 bytes now share /a's blocks (4 pages)\n", "\(result.output)")
        #expect(Array(try daxemu(["get", "/b", "-"]).outputData) == changed)
        #expect(Array(try daxemu(["get", "/a", "-"]).outputData) == data)
        let listing = try daxemu(["ls", "-l", "/"]).output
        #expect(sharedColumn(listing, "a") == 4 && sharedColumn(listing, "b") == 4, "\(listing)")
        // Again: nothing more to share, nothing changes. A range: one page.
        let again = try daxemu(["dedup", "/a", "/b"])
        #expect(again.status == 0 && again.output.hasPrefix("/b: "), "\(again.errors)")
        #expect(sharedColumn(try daxemu(["ls", "-l", "/"]).output, "b") == 4)
        #expect(try fileSystemJSON(e.path)["sharedBlocks"] as? Int == 4)
        #expect(try daxemu(["put", changedLocal.path, "/c"]).status == 0)
        let ranged = try daxemu([
            "dedup", "/a", "/c", "--offset", "4096", "--destination-offset", "4K", "--count", "8192",
        ])
        #expect(ranged.output == "/c: 4096 of 8192 bytes now share /a's blocks (1 page)\n", "\(ranged.output)")
        #expect(sharedColumn(try daxemu(["ls", "-l", "/"]).output, "c") == 1)
        #expect(try daxemu(["fsck"]).status == 0)
    }

    @Test("bad input: one line naming the problem, exit 1 or 64, nothing changed")
    func badInput() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        let data = pattern(2 * 4096, seed: 30)
        let local = try LocalFile(data)
        #expect(try daxemu(["put", local.path, "/f"]).status == 0)
        #expect(try daxemu(["mkdir", "/dir"]).status == 0)
        let before = try daxemu(["ls", "-la", "/"]).output
        let failures: [([String], String, Int32)] = [
            (["clone", "/missing", "/x"], "/missing", 1),
            (["clone", "/dir", "/x"], "/dir: it is a directory (`daxemu snapshot` clones a tree)", 1),
            (["clone", "/f", "/nodir/x"], "/nodir", 1),
            (["clone", "/f", "x"], "start with /", 64),
            (["clone", "/f", "/x", "--if-pinned", "sometimes"], "--if-pinned", 64),
            (["clone", "/f"], "daxemu clone --help", 64),
            (["snapshot", "/f", "/x"], "/f: it is a file, not a directory", 1),
            (["snapshot", "/missing", "/x"], "/missing", 1),
            (["snapshot", "/dir", "/dir/inner"], "it would be inside the tree it copies", 1),
            (["snapshot", "/dir", "/dir/./x/.."], "it would be inside the tree it copies", 1),
            (["snapshot", "/", "/dir"], "it would be inside the tree it copies", 1),
            (["dedup", "/f", "/missing"], "/missing", 1),
            (["dedup", "/f", "/dir"], "cannot deduplicate /dir: it is a directory", 1),
            (["dedup", "/f", "/f", "--offset", "1M"], "offset 1048576 of /f: it holds 8192 bytes", 1),
            (["dedup", "/f", "/f", "--destination-offset", "12288"], "offset 12288 of /f: it holds 8192 bytes", 1),
            (["dedup", "/f", "/f", "--destination-offset", "9000"], "9000 bytes is not a multiple of 4 KiB", 64),
            (["dedup", "/f", "/f", "--count", "-4096"], "-4096 is negative", 64),
            (["dedup", "/f", "/f", "--count", "many"], "--count", 64),
        ]
        for (arguments, text, status) in failures {
            let result = try daxemu(arguments)
            expectCleanFailure(result, mentioning: text)
            #expect(result.status == status, "\(arguments): \(result.status)")
        }
        #expect(try daxemu(["ls", "-la", "/"]).output == before)
        #expect(Array(try daxemu(["get", "/f", "-"]).outputData) == data)
        #expect(try fileSystemJSON(e.path)["sharedBlocks"] as? Int == 0)
        #expect(try daxemu(["fsck"]).status == 0)
    }

    @Test("without sharing: ls -l says 0 shared, frames --json 1 reference a frame, info 0 shared blocks")
    func nothingShared() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        let local = try LocalFile(pattern(3 * 4096 + 1, seed: 5))
        #expect(try daxemu(["put", local.path, "/f"]).status == 0)
        #expect(try daxemu(["mkdir", "/d"]).status == 0)
        #expect(try daxemu(["truncate", "/f", "1T"]).status == 0)  // a huge sparse tail is not walked
        let listing = try daxemu(["ls", "-l", "/"]).output.split(separator: "\n")
        #expect(listing.count == 2 && listing[0].hasPrefix("d ") && listing[0].contains(" - "), "\(listing)")
        #expect(listing[1] == "-  1099511627776 4        0 shared   f", "\(listing)")
        let file = try daxemu(["ls", "-l", "/f"]).output
        #expect(sharedColumn(file, "/f") == 0, "\(file)")
        let entries = try #require(
            try JSONSerialization.jsonObject(with: try daxemu(["ls", "--json"]).outputData) as? [[String: Any]])
        #expect(entries.map { $0["sharedBlocks"] as? Int } == [0, 0])
        #expect(try daxemu(["truncate", "/f", "16K"]).status == 0)
        let runs = try #require(
            try JSONSerialization.jsonObject(with: try daxemu(["frames", "--json", "/f"]).outputData)
                as? [[String: Any]])
        #expect(runs.count == 1 && runs[0]["references"] as? Int == 1 && runs[0]["count"] as? Int == 4)
        #expect(!(try daxemu(["frames", "/f"]).output.contains("shared")))
        let fs = try fileSystemJSON(e.path)
        #expect(fs["sharedBlocks"] as? Int == 0)
        #expect((fs["faults"] as? [String: Int])?["copyOnWrite"] == 0)
        let info = try daxemu(["info"]).output
        #expect(info.contains("shared       0 blocks shared copy-on-write by clones, snapshots or dedup"), "\(info)")
        #expect(info.contains(" 0 copy-on-write, "))
    }

    @Test("defrag: a file in one extent, or one the free space cannot gather better, is left alone")
    func defragLeavesAlone() throws {
        let device = DevicePath()
        try device.withNewFileSystem(size: 8 << 20) { fs in
            let whole = try fs.create("/whole")
            try whole.write(pattern(8 * 4096, seed: 1), at: 0)
            whole.close()
            // /two: two extents of 100 pages; then the free space cut into single blocks.
            let two = try fs.create("/two")
            let spacer = try fs.create("/spacer")
            try two.write(pattern(100 * 4096, seed: 2), at: 0)
            try spacer.write([1], at: 0)
            try two.write(pattern(100 * 4096, seed: 3), at: 100 * 4096)
            let (kept, dropped) = (try fs.create("/kept"), try fs.create("/dropped"))
            var page = 0
            do {
                while true {
                    try kept.write([2], at: page * 4096)
                    try dropped.write([3], at: page * 4096)
                    page += 1
                }
            } catch let error as DAXError where error.code == .noSpace {}
            for file in [two, spacer, kept, dropped] { file.close() }
            try fs.remove("/dropped")
        }
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", device.path]) }
        let one = try daxemu(["defrag", "/whole"])
        #expect(one.status == 0 && one.output == "/whole: already in one extent; nothing moved\n", "\(one.output)")
        let framesBefore = try daxemu(["frames", "/two"]).output
        let two = try daxemu(["defrag", "/two"])
        #expect(two.status == 0, "\(two.errors)")
        #expect(
            two.output.hasPrefix("/two: 2 extents; the free space could not hold it in fewer (")
                && two.output.hasSuffix("); nothing moved\n"), "\(two.output)")
        #expect(try daxemu(["frames", "/two"]).output == framesBefore)
        #expect(
            Array(try daxemu(["get", "/two", "-"]).outputData) == pattern(100 * 4096, seed: 2)
                + pattern(100 * 4096, seed: 3))
        _ = try daxemu(["truncate", "/kept", "0"])
        // With room, the same file comes together.
        let gathered = try daxemu(["defrag", "/two"])
        #expect(gathered.output == "/two: moved 200 pages; 2 extents before, 1 after\n", "\(gathered.output)")
        expectCleanFailure(try daxemu(["defrag", "/"]), mentioning: "cannot defragment /: it is a directory")
        let empty = try daxemu(["defrag", "/spacer"])
        #expect(empty.output == "/spacer: already in one extent; nothing moved\n")
        #expect(try daxemu(["fsck"]).status == 0)
    }

    @Test("defrag gathers a file of more than one migration batch into one extent when one free run holds it")
    func defragAcrossBatches() throws {
        // Free space: a run of 1500 blocks at the front, single blocks among the file's, and the
        // rest at the end, which alone holds the whole 3000-page file.
        let device = DevicePath()
        try device.withNewFileSystem(size: 64 << 20) { fs in
            let front = try fs.create("/front")
            try front.allocate(offset: 0, count: 1500 * 4096)
            front.close()
            let file = try fs.create("/f")
            let spacer = try fs.create("/spacer")
            for page in 0..<3000 {
                try file.write(pattern(4096, seed: page), at: page * 4096)
                try spacer.write([1], at: page * 4096)
            }
            file.close()
            spacer.close()
            try fs.remove("/front")
            try fs.remove("/spacer")
        }
        let result = try runCommand("daxemu", ["defrag", "-d", device.path, "/f"])
        #expect(result.status == 0, "\(result.errors)")
        #expect(result.output.hasPrefix("/f: moved 3000 pages; 3000 extents before, "), "\(result.output)")
        #expect(result.output == "/f: moved 3000 pages; 3000 extents before, 1 after\n", "\(result.output)")
        let bytes = try runCommand("daxemu", ["get", "-d", device.path, "/f", "-"])
        #expect(Array(bytes.outputData) == (0..<3000).flatMap { pattern(4096, seed: $0) })
        #expect(try runCommand("daxemu", ["fsck", "-d", device.path]).status == 0)
    }
}
