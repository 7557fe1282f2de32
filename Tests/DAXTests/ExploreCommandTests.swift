import Foundation
import Testing

@testable import DAX

@Suite("explore commands")
struct ExploreCommandTests {
    func images(in output: String) -> Int? {
        guard let range = output.range(of: "images checked: ") else { return nil }
        return Int(output[range.upperBound...].prefix { $0.isNumber })
    }

    @Test("explore --json to a directory or a missing one is refused before exploring, in one clean line")
    func reportPathIsCheckedFirst() throws {
        let directory = try runCommand("daxemu", ["explore", "--ops", "3", "--json", NSTemporaryDirectory()])
        expectCleanFailure(directory, mentioning: "it is a directory")
        #expect(images(in: directory.output) == nil, "\(directory.output)")
        let missing = try runCommand("daxemu", ["explore", "--ops", "3", "--json", "/nonexistent-\(getpid())/r.json"])
        expectCleanFailure(missing, mentioning: "no such directory")
    }

    @Test("explore's bad sizes, shards and replays are bad arguments (64), told in the option's words")
    func badExploreArguments() throws {
        let cases: [([String], String)] = [
            (["--size", "0"], "--size must be positive"),
            (["--size", "4097"], "--size 4097 bytes is not a multiple of 4 KiB"),
            (["--shard", "0/1"], "shard 0/1 is not one of 1/1 through 1/1"),
            (["--shard", "x"], "is not K/N"),
            (["--shard", "1/0"], "the number of shards N is 1 or more"),
            (["--shard", "3/2"], "is not one of 1/2 through 2/2"),
            (["--replay", "1", "--keep", "/dev/shm/never-\(getpid())"], "--replay is POINT:SEED"),
            (["--replay", "1:x", "--keep", "/dev/shm/never-\(getpid())"], "--replay is POINT:SEED"),
            (["--replay", "0:1", "--keep", "/dev/shm/never-\(getpid())"], "crash points count from 1"),
        ]
        for (arguments, text) in cases {
            let result = try runCommand("daxemu", ["explore", "--ops", "2"] + arguments)
            expectCleanFailure(result, mentioning: text)
            #expect(result.status == 64, "\(arguments): \(result.status)")
            #expect(images(in: result.output) == nil, "\(arguments): explored anyway")
            #expect(!result.errors.contains("daxemu-explore-"), "names the explorer's own device: \(result.errors)")
        }
        #expect(access("/dev/shm/never-\(getpid())", F_OK) != 0)
    }

    @Test("explore-merge of a missing, a non-JSON or a foreign report says so in one line, not a Foundation dump")
    func mergeOfBadReports() throws {
        let directory = NSTemporaryDirectory() + "merge-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let notJSON = directory + "/text.json"
        let foreign = directory + "/foreign.json"
        try Data("not json\n".utf8).write(to: URL(fileURLWithPath: notJSON))
        try Data("{\"a\": 1}".utf8).write(to: URL(fileURLWithPath: foreign))
        // A report whose shard is 1 of 0: corrupt, told as such rather than a trap.
        let report = try runCommand(
            "daxemu", ["explore", "--ops", "2", "--images-per-point", "0", "--json", directory + "/r.json"])
        #expect(report.status == 0, "\(report.errors)")
        let zeroShards = directory + "/zero-shards.json"
        let text = try String(contentsOfFile: directory + "/r.json", encoding: .utf8)
        try text.replacingOccurrences(of: "\"count\":1", with: "\"count\":0")
            .replacingOccurrences(of: "\"count\" : 1", with: "\"count\" : 0")
            .write(toFile: zeroShards, atomically: true, encoding: .utf8)
        // Counts no exploration makes: too many images to add up, or fewer than none.
        func edited(_ name: String, images: String) throws -> String {
            let path = directory + "/\(name).json"
            guard let range = text.range(of: #""imagesChecked" ?: ?[0-9]+"#, options: .regularExpression) else {
                throw DAXError(.corrupted, "no imagesChecked in \(text)")
            }
            try text.replacingCharacters(in: range, with: "\"imagesChecked\": \(images)")
                .write(toFile: path, atomically: true, encoding: .utf8)
            return path
        }
        let huge = try edited("huge", images: "\(Int.max)")
        for (path, says) in [
            (try edited("negative", images: "-1"), "-1 images checked"),
            (try edited("least", images: "\(Int.min)"), "\(Int.min) images checked"),
        ] {
            let result = try runCommand("daxemu", ["explore-merge", path, huge])
            expectCleanFailure(result, mentioning: says)
            #expect(result.status == 1 && !result.output.contains("images checked"), "\(result.output)")
        }
        let overflow = try runCommand("daxemu", ["explore-merge", huge, huge])
        expectCleanFailure(overflow, mentioning: "do not fit")
        #expect(overflow.status == 1)
        // Where the merged report cannot go is found out before anything is read; an empty name is
        // a bad argument, for explore as for explore-merge.
        expectCleanFailure(
            try runCommand("daxemu", ["explore-merge", huge, "--json", directory]), mentioning: "it is a directory")
        for arguments in [
            ["explore-merge", huge, "--json", ""], ["explore", "--ops", "1", "--json", ""],
            ["explore", "--ops", "1", "--replay", "1:1", "--keep", ""],
        ] {
            let result = try runCommand("daxemu", arguments)
            expectCleanFailure(result, mentioning: "names no file")
            #expect(result.status == 64 && images(in: result.output) == nil, "\(arguments): \(result.output)")
        }
        let cases: [(String, String)] = [
            (zeroShards, "the number of shards N is 1 or more"),
            (directory + "/missing.json", "no such file"),
            (directory, "a directory"),
            (notJSON, "is not a crash report written by explore --json: not JSON"),
            (foreign, "no \"crashPoints\""),
        ]
        for (path, text) in cases {
            let result = try runCommand("daxemu", ["explore-merge", path])
            expectCleanFailure(result, mentioning: text)
            #expect(result.status == 1)
            #expect(!result.errors.contains("NSCocoaErrorDomain") && !result.errors.contains("CodingKeys"))
        }
    }

    @Test("daxemu explore checks every crash image of random operations; shards merge to the same count")
    func daxemuExplore() throws {
        let whole = try runCommand("daxemu", ["explore", "--ops", "3", "--images-per-point", "0", "--seed", "3"])
        #expect(whole.status == 0, "\(whole.errors)")
        #expect(whole.output.contains("failures: 0"))
        let total = try #require(images(in: whole.output))

        let first = DevicePath()
        let second = DevicePath()
        for (index, path) in [(1, first.path), (2, second.path)] {
            let shard = try runCommand(
                "daxemu",
                [
                    "explore", "--ops", "3", "--images-per-point", "0", "--seed", "3", "--shard", "\(index)/2",
                    "--json", path,
                ])
            #expect(shard.status == 0, "\(shard.errors)")
            #expect((images(in: shard.output) ?? total) < total)
        }
        let merged = try runCommand("daxemu", ["explore-merge", first.path, second.path])
        #expect(merged.status == 0, "\(merged.errors)")
        #expect(images(in: merged.output) == total)

        let partial = try runCommand("daxemu", ["explore-merge", first.path])
        #expect(partial.status == 1)
        #expect(partial.output.contains("missing shards: 2"))
        expectCleanFailure(try runCommand("daxemu", ["explore-merge", first.path, first.path]), mentioning: "twice")

        // Shard 2 of another campaign (another seed, or as many operations of another domain)
        // does not complete shard 1 of this one.
        for other in [
            ["--ops", "3", "--seed", "4"], ["--ops", "3", "--seed", "3", "--domain", "eadr"],
            ["--ops", "4", "--seed", "3"],
        ] {
            let foreign = DevicePath()
            let shard = try runCommand(
                "daxemu", ["explore", "--images-per-point", "0", "--shard", "2/2", "--json", foreign.path] + other)
            #expect(shard.status == 0, "\(shard.errors)")
            let mixed = try runCommand("daxemu", ["explore-merge", first.path, foreign.path])
            expectCleanFailure(mixed, mentioning: "different")
            #expect(mixed.status == 1, "\(other)")
        }
    }

    @Test("daxemu explore refuses bad options and replays a crash point into a device file")
    func daxemuOptionsAndReplay() throws {
        expectCleanFailure(try runCommand("daxemu", ["explore", "--ops", "2", "--shard", "3/2"]), mentioning: "shard")
        let unpaired = try runCommand("daxemu", ["explore", "--replay", "1:0"])
        #expect(unpaired.status == 64)
        let kept = DevicePath()
        let replay = try runCommand("daxemu", ["explore", "--ops", "2", "--replay", "2:1", "--keep", kept.path])
        #expect(replay.status == 0, "\(replay.errors)")
        #expect(replay.output.contains("kept in \(kept.path)"))
        let device = try PMemDevice.open(path: kept.path)
        defer { device.close() }
        #expect(DAXFileSystem.isFormatted(device))
    }

    @Test("kvstore explore and pmemlog explore pass: their updates are crash-atomic")
    func examples() throws {
        let kvstore = try runCommand("kvstore", ["explore", "--ops", "5", "--images-per-point", "0"])
        #expect(kvstore.status == 0, "\(kvstore.errors)")
        #expect(kvstore.output.contains("failures: 0"))
        #expect((images(in: kvstore.output) ?? 0) > 5)
        let pmemlog = try runCommand("pmemlog", ["explore", "--records", "4", "--images-per-point", "0"])
        #expect(pmemlog.status == 0, "\(pmemlog.errors)")
        #expect(pmemlog.output.contains("failures: 0"))
        #expect((images(in: pmemlog.output) ?? 0) > 4)
    }
}
