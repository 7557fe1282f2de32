import Foundation
import Synchronization
import Testing

@testable import DAX

/// What a finished command printed.
struct CommandResult {
    var status: Int32
    /// Standard output as raw bytes (it may hold a binary file).
    var outputData: Data
    var errors: String
    var output: String { String(decoding: outputData, as: UTF8.self) }
}

/// Runs a binary built by this package (or, given a path, any program) to completion.
func runCommand(_ name: String, _ arguments: [String], environment: [String: String] = [:]) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: name.hasPrefix("/") ? name : ChildProcess.executable(name))
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment
    env.removeValue(forKey: "DAXEMU_DEVICE")
    for (key, value) in environment { env[key] = value }
    process.environment = env
    let output = Pipe()
    let errors = Pipe()
    process.standardOutput = output
    process.standardError = errors
    try process.run()
    // Read both pipes while it runs, so a chatty child never blocks on a full pipe.
    let errorData = Mutex<Data>(Data())
    let drained = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
        let data = errors.fileHandleForReading.readDataToEndOfFile()
        errorData.withTrackedLock { $0 = data }
        drained.signal()
    }
    let outputData = output.fileHandleForReading.readDataToEndOfFile()
    drained.wait()
    process.waitUntilExit()
    return CommandResult(
        status: process.terminationStatus, outputData: outputData,
        errors: String(decoding: errorData.withTrackedLock { $0 }, as: UTF8.self))
}

/// A device path for a command-line test, removed when the value goes.
final class DevicePath: @unchecked Sendable {
    let path = TemporaryDevice.uniquePath("cli")
    deinit { unlink(path) }

    /// Runs `body` on a new device of `size` bytes at this path, formatted; unmounted and closed
    /// after, for a command to find it as `body` left it.
    func withNewFileSystem(size: Int, _ body: (DAXFileSystem) throws -> Void) throws {
        let created = try PMemDevice.create(path: path, size: size)
        defer { created.close() }
        let fs = try DAXFileSystem.format(created)
        try body(fs)
        try fs.unmount()
    }

    /// Runs `body` on the file system of the device at this path, mounted; unmounted and closed after.
    func withFileSystem(_ body: (DAXFileSystem) throws -> Void) throws {
        let opened = try PMemDevice.open(path: path)
        defer { opened.close() }
        let fs = try DAXFileSystem.mount(opened)
        try body(fs)
        try fs.unmount()
    }
}

/// An error from a command: exit status not 0, one line on stderr naming the program, no trace.
func expectCleanFailure(
    _ result: CommandResult, _ program: String = "daxemu", mentioning text: String? = nil,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(result.status != 0, sourceLocation: sourceLocation)
    let lines = result.errors.split(separator: "\n")
    #expect(lines.count == 1, "stderr: \(result.errors)", sourceLocation: sourceLocation)
    #expect(result.errors.hasPrefix("\(program): "), "stderr: \(result.errors)", sourceLocation: sourceLocation)
    #expect(
        !result.errors.contains("Backtrac") && !result.errors.contains("Fatal error"), sourceLocation: sourceLocation)
    if let text { #expect(result.errors.contains(text), "stderr: \(result.errors)", sourceLocation: sourceLocation) }
}

@Suite("daxemu, the built binary")
struct CommandLineTests {
    @Test("create, info, format: the device is reported honestly, bad input is refused cleanly")
    func deviceCommands() throws {
        let device = DevicePath()
        let created = try runCommand("daxemu", ["create", "--device", device.path, "--size", "8M"])
        #expect(created.status == 0, "\(created.errors)")
        expectCleanFailure(
            try runCommand("daxemu", ["create", "--device", device.path, "--size", "8M"]),
            mentioning: "already exists")
        let odd = try runCommand("daxemu", ["create", "--device", device.path + "-odd", "--size", "3K"])
        expectCleanFailure(odd, mentioning: "3072")
        #expect(odd.status == 64)
        expectCleanFailure(
            try runCommand("daxemu", ["info", "--device", "/dev/shm/no-such-device-\(getpid())"]),
            mentioning: "no-such-device")

        let info = try runCommand("daxemu", ["info", "--json"], environment: ["DAXEMU_DEVICE": device.path])
        #expect(info.status == 0)
        let json = try #require(try JSONSerialization.jsonObject(with: Data(info.output.utf8)) as? [String: Any])
        #expect(json["size"] as? Int == 8 << 20)
        #expect(json["isPersistentMemory"] as? Bool == false)
        #expect(json["mapSync"] as? Bool == false)
        #expect((json["mapSyncRefusedBecause"] as? String)?.contains("tmpfs") == true)
        #expect((json["pins"] as? [String: Any])?["pinnedPages"] as? Int == 0)
        #expect((json["fileSystem"] as? [String: Any])?["state"] as? String == "none")
        // One naming convention: camelCase keys everywhere.
        func keys(_ value: Any) -> [String] {
            guard let object = value as? [String: Any] else { return [] }
            return object.keys + object.values.flatMap(keys)
        }
        #expect(keys(json).count > 15 && keys(json).allSatisfy { !$0.contains("_") && $0.first!.isLowercase })

        #expect(try runCommand("daxemu", ["format", "-d", device.path]).status == 0)
        expectCleanFailure(try runCommand("daxemu", ["format", "-d", device.path]), mentioning: "--force")
        #expect(try runCommand("daxemu", ["format", "-d", device.path, "--force"]).status == 0)
        let formatted = try runCommand("daxemu", ["info", "--json", "-d", device.path])
        let fs = try #require(
            (try JSONSerialization.jsonObject(with: Data(formatted.output.utf8)) as? [String: Any])?["fileSystem"]
                as? [String: Any])
        #expect(fs["state"] as? String == "mounted")
        #expect(fs["directories"] as? Int == 1 && fs["files"] as? Int == 0)
        #expect(fs["quarantinedBlocks"] as? Int == 0)
        #expect(fs["pinnedPages"] == nil, "pins are told once, at the top")
        #expect(fs["faultHandling"] as? String == "userfaultfd")
        #expect((fs["faultHandlingDetail"] as? String)?.contains("full mode") == true)
        let faults = try #require(fs["faults"] as? [String: Int])
        #expect(faults == ["zeroPage": 0, "allocating": 0, "copyOnWrite": 0, "sigbus": 0])
        let text = try runCommand("daxemu", ["info", "-d", device.path]).output
        #expect(text.contains("MAP_SYNC     refused"))
        #expect(text.contains("faults       userfaultfd: userfaultfd in full mode"))
        #expect(text.contains("0 zero-page, 0 allocating, 0 copy-on-write, 0 SIGBUS"))
        let off = try runCommand("daxemu", ["info", "-d", device.path], environment: ["DAX_FAULT_HANDLING": "off"])
        #expect(off.output.contains("faults       unavailable: turned off by DAX_FAULT_HANDLING=off"))
        // The device may also come before the subcommand, as the examples take it.
        let before = try runCommand("daxemu", ["--device", device.path, "info", "--json"])
        let beforeJSON = try #require(try JSONSerialization.jsonObject(with: before.outputData) as? [String: Any])
        #expect(
            before.status == 0 && beforeJSON["size"] as? Int == 8 << 20 && beforeJSON["fileSystem"] is [String: Any])
    }

    @Test("put, get, ls, mkdir, mv, truncate, rm: the bytes go in and come out")
    func fileCommands() throws {
        let device = DevicePath()
        _ = try runCommand("daxemu", ["create", "-d", device.path, "--size", "16M"])
        _ = try runCommand("daxemu", ["format", "-d", device.path])
        let local = NSTemporaryDirectory() + "daxemu-put-\(getpid())"
        let back = local + ".back"
        defer {
            unlink(local)
            unlink(back)
        }
        let data = Data(pattern(300_000, seed: 5))
        try data.write(to: URL(fileURLWithPath: local))
        let env = ["DAXEMU_DEVICE": device.path]
        #expect(try runCommand("daxemu", ["mkdir", "-p", "/a/b"], environment: env).status == 0)
        let put = try runCommand("daxemu", ["put", local, "/a/b/data"], environment: env)
        #expect(put.status == 0)
        #expect(!put.errors.contains("\r"), "no progress when not on a terminal")
        #expect(try runCommand("daxemu", ["get", "/a/b/data", back], environment: env).status == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: back)) == data)
        let toStdout = try runCommand("daxemu", ["get", "/a/b/data", "-"], environment: env)
        #expect(toStdout.outputData == data)
        #expect(try runCommand("daxemu", ["put", local, "/a"], environment: env).status == 0)  // into a directory
        #expect(
            try runCommand("daxemu", ["ls", "/a"], environment: env).output == "b/\n"
                + (local as NSString).lastPathComponent + "\n")
        let listing = try runCommand("daxemu", ["ls", "/a/b", "--json"], environment: env)
        let entries = try #require(
            try JSONSerialization.jsonObject(with: Data(listing.output.utf8)) as? [[String: Any]])
        #expect(entries.count == 1 && entries[0]["name"] as? String == "data" && entries[0]["size"] as? Int == 300_000)
        #expect(entries[0]["type"] as? String == "file")
        #expect(try runCommand("daxemu", ["mv", "/a/b/data", "/moved"], environment: env).status == 0)
        #expect(try runCommand("daxemu", ["truncate", "/moved", "100"], environment: env).status == 0)
        #expect(try runCommand("daxemu", ["get", "/moved", "-"], environment: env).outputData == data.prefix(100))
        expectCleanFailure(try runCommand("daxemu", ["rm", "/a"], environment: env), mentioning: "not empty")
        expectCleanFailure(
            try runCommand("daxemu", ["get", "/nothing", back], environment: env), mentioning: "/nothing")
        expectCleanFailure(
            try runCommand("daxemu", ["put", "/no/such/local/file", "/x"], environment: env),
            mentioning: "/no/such/local/file")
        #expect(try runCommand("daxemu", ["rm", "/moved"], environment: env).status == 0)
        #expect(try runCommand("daxemu", ["fsck"], environment: env).status == 0)
    }

    @Test("frames --json: a program reading the device file finds the file's bytes there")
    func framesForOutsiders() throws {
        let device = DevicePath()
        _ = try runCommand("daxemu", ["create", "-d", device.path, "--size", "8M"])
        _ = try runCommand("daxemu", ["format", "-d", device.path])
        let local = NSTemporaryDirectory() + "daxemu-frames-\(getpid())"
        defer { unlink(local) }
        let data = Data(pattern(3 * 4096 + 500, seed: 11))
        try data.write(to: URL(fileURLWithPath: local))
        _ = try runCommand("daxemu", ["put", "-d", device.path, local, "/f"])
        let result = try runCommand("daxemu", ["frames", "-d", device.path, "/f", "--json"])
        let runs = try #require(try JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [[String: Any]])
        #expect(runs.reduce(0) { $0 + ($1["count"] as? Int ?? 0) } == 4)
        let raw = try Data(contentsOf: URL(fileURLWithPath: device.path))
        for run in runs {
            let first = try #require(run["page"] as? Int)
            let offset = try #require(run["deviceOffset"] as? Int)
            #expect(run["frame"] as? Int == offset / 4096)
            for page in first..<(first + (run["count"] as? Int ?? 0)) {
                let at = offset + (page - first) * 4096
                let length = min(4096, data.count - page * 4096)
                #expect(raw[at..<(at + length)] == data[(page * 4096)..<(page * 4096 + length)])
            }
        }
        // The text: one line per run, pages -> frames at the device offset of the first.
        let text = try runCommand("daxemu", ["frames", "-d", device.path, "/f"]).output
        let expected = runs.map { run in
            let (page, count, frame) = (run["page"] as! Int, run["count"] as! Int, run["frame"] as! Int)
            let span = { (first: Int) in count == 1 ? "\(first)" : "\(first)-\(first + count - 1)" }
            return "\(span(page)) -> \(span(frame)) at \(run["deviceOffset"] as! Int)\n"
        }
        #expect(text == "pages -> frames at device offset\n" + expected.joined(), "\(text)")
    }

    @Test("frames of a huge sparse file: one line per run of holes; ls -l keeps every digit of a size")
    func framesOfSparseFile() throws {
        let device = try ExampleDevice(size: "8M")
        _ = try runCommand("daxemu", ["put", "-d", device.path, "/etc/hostname", "/f"])
        #expect(try runCommand("daxemu", ["truncate", "-d", device.path, "/f", "1G"]).status == 0)
        let text = try runCommand("daxemu", ["frames", "-d", device.path, "/f"])
        let lines = text.output.split(separator: "\n")
        #expect(text.status == 0 && lines.count == 3, "\(text.output.prefix(300))")
        #expect(lines.last == "1-262143 -> hole")
        let json = try runCommand("daxemu", ["frames", "-d", device.path, "/f", "--json"])
        let entries = try #require(try JSONSerialization.jsonObject(with: Data(json.output.utf8)) as? [[String: Any]])
        #expect(entries.count == 1 && entries[0]["page"] as? Int == 0 && entries[0]["count"] as? Int == 1)
        // A file that is not there, or a directory: the error alone, no header on stdout.
        for path in ["/nope", "/"] {
            let failed = try runCommand("daxemu", ["frames", "-d", device.path, path])
            expectCleanFailure(failed)
            #expect(failed.output.isEmpty, "\(path): \(failed.output)")
        }
        let empty = NSTemporaryDirectory() + "daxemu-empty-\(getpid())"
        FileManager.default.createFile(atPath: empty, contents: Data())
        defer { unlink(empty) }
        #expect(try runCommand("daxemu", ["put", "-d", device.path, empty, "/empty"]).status == 0)
        #expect(
            try runCommand("daxemu", ["frames", "-d", device.path, "/empty"]).output
                == "pages -> frames at device offset\n")
        #expect(try runCommand("daxemu", ["truncate", "-d", device.path, "/f", "1T"]).status == 0)
        let listing = try runCommand("daxemu", ["ls", "-l", "-d", device.path, "/"])
        #expect(listing.output.contains(" 1099511627776 "), "\(listing.output)")
    }

    @Test("bad arguments: one line on stderr naming the program and where help is, exit 64, no trap")
    func badArguments() throws {
        let device = try ExampleDevice(size: "8M")
        let cases: [(String, [String], String)] = [
            ("daxemu", ["truncate", "/x"], "daxemu truncate --help"),
            ("daxemu", ["map", "--columns", "1152921504606846976"], "--columns"),
            ("daxemu", ["ls", "--bogus"], "--bogus"),
            ("kvstore", ["--buckets", "0", "put", "a", "b"], "--buckets"),
            ("kvstore", ["--buckets=-1", "put", "a", "b"], "--buckets"),
            ("kvstore", ["--buckets", "2305843009213693952", "put", "a", "b"], "--buckets"),
            ("kvstore", ["load", "--count=-1"], "--count"),
            ("kvstore", ["bench", "--count=0"], "--count"),
            ("simple-copy", ["--chunk", "4611686018427387904", "/etc/hostname", "/y"], "--chunk"),
            ("rdma-buffer", ["--pages", "4611686018427387904"], "--pages"),
            ("rdma-buffer", ["--grace-milliseconds=-5"], "--grace-milliseconds"),
        ]
        for (program, arguments, text) in cases {
            // daxemu takes the device after the subcommand, the examples before it.
            let result = try runCommand(
                program, program == "daxemu" ? arguments + ["-d", device.path] : ["--device", device.path] + arguments)
            expectCleanFailure(result, program, mentioning: text)
            #expect(result.status == 64, "\(program) \(arguments): \(result.status)")
        }
        // None of them touched the file system.
        let listing = try runCommand("daxemu", ["ls", "-a", "-d", device.path, "/"])
        #expect(listing.status == 0 && listing.output == "./\n../\n", "\(listing.output)")
        #expect(try runCommand("daxemu", ["--help"]).status == 0)
    }

    @Test("put over an existing file that does not fit leaves the file as it was")
    func failedPutKeepsDestination() throws {
        let device = try ExampleDevice(size: "16M")
        let small = NSTemporaryDirectory() + "daxemu-keep-\(getpid())"
        let big = small + ".big"
        defer {
            unlink(small)
            unlink(big)
        }
        let kept = Data(pattern(10_000, seed: 8))
        try kept.write(to: URL(fileURLWithPath: small))
        try Data(count: 30 << 20).write(to: URL(fileURLWithPath: big))
        let env = ["DAXEMU_DEVICE": device.path]
        #expect(try runCommand("daxemu", ["put", small, "/keep"], environment: env).status == 0)
        expectCleanFailure(try runCommand("daxemu", ["put", big, "/keep"], environment: env), mentioning: "no space")
        #expect(try runCommand("daxemu", ["get", "/keep", "-"], environment: env).outputData == kept)
        // No partial file, hidden or not.
        #expect(try runCommand("daxemu", ["ls", "-a", "/"], environment: env).output == "./\n../\nkeep\n")
        // Replacing works when it fits.
        let replacement = Data(pattern(5_000, seed: 9))
        try replacement.write(to: URL(fileURLWithPath: small))
        #expect(try runCommand("daxemu", ["put", small, "/keep"], environment: env).status == 0)
        #expect(try runCommand("daxemu", ["get", "/keep", "-"], environment: env).outputData == replacement)
        expectCleanFailure(
            try runCommand("daxemu", ["put", small, "/nodir/x"], environment: env), mentioning: "/nodir")
        #expect(try runCommand("daxemu", ["fsck"], environment: env).status == 0)
    }

    @Test("fsck: clean is 0, damage is listed with exit 1, garbage is reported, nothing crashes")
    func fsck() throws {
        let device = DevicePath()
        _ = try runCommand("daxemu", ["create", "-d", device.path, "--size", "8M"])
        _ = try runCommand("daxemu", ["format", "-d", device.path])
        _ = try runCommand("daxemu", ["mkdir", "-d", device.path, "/d"])
        let clean = try runCommand("daxemu", ["fsck", "-d", device.path])
        #expect(clean.status == 0 && clean.output.contains("clean"))
        // Damage the root directory's inode (the first inode) through the device file.
        let fs = try DAXFileSystem.mount(try PMemDevice.open(path: device.path))
        let offset = fs.superblock.inodeOffset(1) + 20
        try fs.unmount()
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: device.path))
        try handle.seek(toOffset: UInt64(offset))
        try handle.write(contentsOf: Data([0x77]))
        try handle.close()
        let damaged = try runCommand("daxemu", ["fsck", "-d", device.path])
        #expect(damaged.status == 1 && damaged.errors.isEmpty, "\(damaged.errors)")
        #expect(damaged.output.contains("inode 1"), "\(damaged.output)")
        expectCleanFailure(try runCommand("daxemu", ["ls", "-d", device.path]), mentioning: "damaged")
        // A device of garbage.
        let garbage = try FileHandle(forUpdating: URL(fileURLWithPath: device.path))
        try garbage.write(contentsOf: Data(pattern(4096, seed: 3)))
        try garbage.close()
        let refused = try runCommand("daxemu", ["fsck", "-d", device.path])
        #expect(refused.status == 1 && refused.output.contains("damaged"))
        #expect(!refused.errors.contains("Backtrac"))
    }

    @Test("map draws the pages in the terminal and as SVG")
    func map() throws {
        let device = DevicePath()
        _ = try runCommand("daxemu", ["create", "-d", device.path, "--size", "8M"])
        _ = try runCommand("daxemu", ["format", "-d", device.path])
        let svg = NSTemporaryDirectory() + "daxemu-map-\(getpid()).svg"
        defer { unlink(svg) }
        let result = try runCommand("daxemu", ["map", "-d", device.path, "--svg", svg])
        #expect(result.status == 0)
        #expect(result.output.contains("J journal") && result.output.contains(". free"))
        let picture = try String(contentsOfFile: svg, encoding: .utf8)
        #expect(picture.hasPrefix("<svg") && picture.contains("inode table") && picture.hasSuffix("</svg>\n"))
        // An empty --svg is a bad argument, refused before anything is drawn.
        let empty = try runCommand("daxemu", ["map", "-d", device.path, "--svg", ""])
        #expect(empty.status == 64 && empty.output.isEmpty, "\(empty.status) \(empty.output)")
        #expect(empty.errors.contains("--svg names no file"), "\(empty.errors)")
    }

    @Test("demo: the pinning story runs end to end and leaves the device clean")
    func demo() throws {
        let device = DevicePath()
        let result = try runCommand("daxemu", ["demo", "--fast", "-d", device.path])
        #expect(result.status == 0, "\(result.errors)")
        for text in ["busy", "timedOut", "revoked", "quarantined", "only zeros", "check(): clean"] {
            #expect(result.output.contains(text), "demo output lacks \(text)")
        }
        #expect(try runCommand("daxemu", ["fsck", "-d", device.path]).status == 0)
        #expect(try runCommand("daxemu", ["ls", "-a", "-d", device.path]).output == "./\n../\n")
    }

    /// The demo removes what it made; a /demo of the user's is not that, and neither is anything
    /// else on a device too full for the story, where the demo fails part-way.
    @Test("demo: leaves a /demo of the user's alone, and cleans up after itself when it fails")
    func demoLeavesOthersAlone() throws {
        let device = DevicePath()
        try device.withNewFileSystem(size: 2 << 20) { fs in
            try fs.createDirectory("/demo")
            let mine = try fs.create("/demo/mine")
            try mine.write(pattern(100), at: 0)
            mine.close()
        }
        let refused = try runCommand("daxemu", ["demo", "--fast", "-d", device.path])
        expectCleanFailure(refused, mentioning: "already exists")
        let kept = try runCommand("daxemu", ["get", "-d", device.path, "/demo/mine", "-"])
        #expect(kept.status == 0 && Array(kept.outputData) == pattern(100), "\(kept.errors)")

        // Too full for the story's second file: the demo fails and takes its files with it.
        try device.withFileSystem { fs in
            try fs.remove("/demo/mine")
            try fs.remove("/demo")
            let filler = try fs.create("/filler")
            try filler.allocate(offset: 0, count: (fs.statistics().freeBlocks - 40) * 4096)
            filler.close()
        }
        let failed = try runCommand("daxemu", ["demo", "--fast", "-d", device.path])
        expectCleanFailure(failed, mentioning: "no space")
        #expect(try runCommand("daxemu", ["ls", "-a", "-d", device.path]).output == "./\n../\nfiller\n")
        #expect(try runCommand("daxemu", ["fsck", "-d", device.path]).status == 0)
    }

    @Test("daxemu defrag gathers a fragmented file into one extent and says so")
    func defragCommand() throws {
        let device = DevicePath()
        try device.withNewFileSystem(size: 8 << 20) { fs in
            let file = try fs.create("/f")
            let spacer = try fs.create("/spacer")
            for page in 0..<12 {
                try file.write(pattern(4096, seed: page), at: page * 4096)
                try spacer.write([1], at: page * 4096)
            }
            file.close()
            spacer.close()
            try fs.remove("/spacer")
        }
        let result = try runCommand("daxemu", ["defrag", "--device", device.path, "/f"])
        #expect(result.status == 0, "\(result.errors)")
        #expect(result.output == "/f: moved 12 pages; 12 extents before, 1 after\n", "\(result.output)")
        let frames = try runCommand("daxemu", ["frames", "--device", device.path, "/f"])
        #expect(frames.output.split(separator: "\n").count == 2, "\(frames.output)")
        let bytes = try runCommand("daxemu", ["get", "--device", device.path, "/f", "-"])
        #expect(Array(bytes.outputData) == (0..<12).flatMap { pattern(4096, seed: $0) })
        expectCleanFailure(try runCommand("daxemu", ["defrag", "--device", device.path, "/missing"]))
    }
}
