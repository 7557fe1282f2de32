import Foundation
import Testing

@testable import DAX

/// Runs `script` with `/bin/sh -c`, `$DAXEMU`, `$KVSTORE` and `$PMEMLOG` naming the built
/// programs: the shell's `printf` makes arguments that a Swift `String` cannot hold.
func runShell(_ script: String) throws -> CommandResult {
    try runCommand(
        "/bin/sh", ["-c", script],
        environment: [
            "DAXEMU": ChildProcess.executable("daxemu"), "KVSTORE": ChildProcess.executable("kvstore"),
            "PMEMLOG": ChildProcess.executable("pmemlog"),
        ])
}

/// Runs `command` (a shell command line) on a pseudo-terminal, with `script(1)`; returns what
/// reached the terminal.
func runOnTerminal(_ command: String) throws -> CommandResult {
    try runCommand(
        "/usr/bin/script", ["-qec", command, "/dev/null"], environment: ["DAXEMU": ChildProcess.executable("daxemu")])
}

@Suite("daxemu and the examples fit a user's habits")
struct CommandLineHabitTests {
    @Test("mv FILE DIR moves the file into the directory, as mv(1) does")
    func moveIntoDirectory() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        #expect(try daxemu(["put", "/etc/hostname", "/f"]).status == 0)
        #expect(try daxemu(["mkdir", "/dir"]).status == 0)
        #expect(try daxemu(["mv", "/f", "/dir"]).status == 0)
        #expect(try daxemu(["ls", "/dir"]).output == "f\n")
        #expect(try daxemu(["mv", "/dir/f", "/g"]).status == 0)  // a name that is not there: a rename
        #expect(try daxemu(["ls", "/"]).output == "dir/\ng\n")
        #expect(
            try daxemu(["get", "/g", "-"]).outputData == (try Data(contentsOf: URL(fileURLWithPath: "/etc/hostname"))))
    }

    /// Found by a helper hunting from the outside: `get` into the device file emptied it (it was
    /// opened with O_TRUNC while mapped) and died of SIGBUS; `map --svg` renamed a new file over
    /// whatever was there, the device or a device node included.
    @Test("get and map --svg never write the device itself, and write through links as a redirection does")
    func outputsAreNeverTheDevice() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        #expect(try daxemu(["put", "/etc/hostname", "/h"]).status == 0)
        let link = TemporaryDevice.uniquePath("cli-link")
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: e.path)
        defer { unlink(link) }
        for output in [e.path, link] {
            let get = try daxemu(["get", "/h", output])
            #expect(get.status == 1 && get.errors.contains("it is the device itself"), "\(get.errors)")
            let map = try daxemu(["map", "--svg", output])
            #expect(map.status == 1 && map.errors.contains("it is the device itself"), "\(map.errors)")
        }
        #expect(try daxemu(["fsck"]).status == 0)
        #expect(
            try daxemu(["get", "/h", "-"]).outputData == (try Data(contentsOf: URL(fileURLWithPath: "/etc/hostname"))))
        // Through a link to an ordinary file: the file gets the picture, the link stays a link.
        let target = TemporaryDevice.uniquePath("cli-svg")
        let svgLink = TemporaryDevice.uniquePath("cli-svg-link")
        _ = FileManager.default.createFile(atPath: target, contents: Data("old".utf8))
        try FileManager.default.createSymbolicLink(atPath: svgLink, withDestinationPath: target)
        defer { unlink(target) }
        defer { unlink(svgLink) }
        #expect(try daxemu(["map", "--svg", svgLink]).status == 0)
        #expect(
            try String(contentsOfFile: target, encoding: .utf8).hasPrefix("<?xml")
                || String(contentsOfFile: target, encoding: .utf8).hasPrefix("<svg"))
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: svgLink) == target)
    }

    @Test("a path ending in / names a directory: mv and rm of a file there are refused, as mv(1) and rm(1) do")
    func trailingSlashNamesADirectory() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        #expect(try daxemu(["put", "/etc/hostname", "/report"]).status == 0)
        #expect(try daxemu(["put", "/etc/services", "/draft"]).status == 0)
        let move = try daxemu(["mv", "/draft", "/report/"])
        #expect(move.status == 1 && move.errors.contains("not a directory"), "\(move.errors)")
        let remove = try daxemu(["rm", "/report/"])
        #expect(remove.status == 1 && remove.errors.contains("not a directory"), "\(remove.errors)")
        #expect(
            try daxemu(["get", "/report", "-"]).outputData
                == (try Data(contentsOf: URL(fileURLWithPath: "/etc/hostname"))))
        #expect(try daxemu(["ls", "/"]).output == "draft\nreport\n")
        #expect(try daxemu(["mkdir", "/dir"]).status == 0)
        #expect(try daxemu(["mv", "/draft", "/dir/"]).status == 0)
        #expect(try daxemu(["ls", "/dir/"]).output == "draft\n")
    }

    @Test("frames, defrag, dedup and map of a sparse file of 16 TiB walk its extents; frames shows one run of holes")
    func framesOfAHugeSparseFile() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        #expect(try daxemu(["put", "/etc/hostname", "/a"]).status == 0)
        #expect(try daxemu(["truncate", "/a", "16T"]).status == 0)
        let lines = try daxemu(["frames", "/a"]).output.split(separator: "\n")
        #expect(lines.count == 3, "\(lines)")
        #expect(lines.first == "pages -> frames at device offset")
        #expect(lines.dropFirst().first?.hasPrefix("0 -> ") == true, "\(lines)")
        #expect(lines.last == "1-4294967295 -> hole", "\(lines)")
        // defrag, dedup and map walk its extents too, not its four billion pages.
        #expect(try daxemu(["defrag", "/a"]).output == "/a: already in one extent; nothing moved\n")
        #expect(try daxemu(["put", "/etc/hostname", "/b"]).status == 0)
        #expect(try daxemu(["truncate", "/b", "16T"]).status == 0)
        let dedup = try daxemu(["dedup", "/a", "/b"])
        #expect(dedup.output == "/b: 4096 of 17592186044416 bytes now share /a's blocks (1 page)\n", "\(dedup.output)")
        let map = try daxemu(["map", "/a"])
        // One frame drawn: the block /a and /b now share (its legend names the file whose
        // descriptor owns it, or file data).
        #expect(map.status == 0 && map.output.contains("one cell = 1 page"), "\(map.output)")
        #expect(map.output.contains(" (1)\n"), "\(map.output)")
        #expect(try daxemu(["fsck"]).status == 0)
    }

    @Test("help of a command that does not exist says so and exits 64; help of one that does, 0")
    func helpOfAnUnknownCommand() throws {
        let unknown = try runCommand("daxemu", ["help", "bogus"])
        #expect(unknown.status == 64 && unknown.errors.contains("there is no command bogus"), "\(unknown.errors)")
        let known = try runCommand("daxemu", ["help", "ls"])
        #expect(known.status == 0 && known.output.contains("OVERVIEW"))
    }

    @Test("rm goes on past an operand it cannot remove, as rm(1) does, and then exits 1")
    func removeTriesEveryOperand() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        #expect(try daxemu(["put", "/etc/hostname", "/a"]).status == 0)
        #expect(try daxemu(["put", "/etc/hostname", "/b"]).status == 0)
        let remove = try daxemu(["rm", "/a", "/missing", "/b"])
        #expect(remove.status == 1 && remove.errors.contains("\"/missing\""), "\(remove.errors)")
        #expect(try daxemu(["ls", "/"]).output == "")
        // A name with a newline or an escape is told on one line, escaped, as every error is.
        let odd = try daxemu(["rm", "/no\nsuch", "/no\u{1B}such"])
        #expect(odd.status == 1)
        #expect(odd.errors.split(separator: "\n").count == 2, "\(odd.errors)")
        #expect(odd.errors.contains("/no\\nsuch") && !odd.errors.contains("\u{1B}"), "\(odd.errors)")
    }

    @Test("put refuses a FIFO without waiting for a writer, and copies a /proc file whole")
    func putOfSpecialFiles() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        let fifo = TemporaryDevice.uniquePath("cli-fifo")
        #expect(mkfifo(fifo, 0o600) == 0)
        defer { unlink(fifo) }
        let put = try daxemu(["put", fifo, "/x"])
        #expect(put.status == 1 && put.errors.contains("is not a regular file"), "\(put.errors)")
        // /proc/self/cmdline says 0 bytes in its size, and holds the command line.
        #expect(try daxemu(["put", "/proc/self/cmdline", "/cmdline"]).status == 0)
        let copied = try daxemu(["get", "/cmdline", "-"]).outputData
        #expect(copied.count > 0 && String(decoding: copied, as: UTF8.self).contains("daxemu"), "\(copied.count)")
    }

    @Test("output that cannot be written (stdout on /dev/full) is an error, as ls(1) says it")
    func writeErrorsOnStandardOutput() throws {
        let e = try ExampleDevice(size: "8M")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: ChildProcess.executable("daxemu"))
        process.arguments = ["ls", "-la", "/", "-d", e.path]
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/full")
        let errors = Pipe()
        process.standardError = errors
        try process.run()
        process.waitUntilExit()
        let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(process.terminationStatus == 1)
        #expect(text.contains("write error on standard output"), "\(text)")
    }

    @Test("--version; negative numbers and other bad arguments say what is wrong and exit 64")
    func badArgumentsExit64() throws {
        let e = try ExampleDevice(size: "8M")
        let version = try runCommand("daxemu", ["--version"])
        #expect(version.status == 0 && version.output.hasPrefix("daxemu ") && version.output.contains("."))
        _ = try runCommand("daxemu", ["put", "-d", e.path, "/etc/hostname", "/f"])
        let fresh = TemporaryDevice.uniquePath("cli")
        let cases: [(String, [String], String)] = [
            ("daxemu", ["create", "--device", fresh, "--size", "-5"], "--size -5 is negative"),
            ("daxemu", ["create", "--device", fresh, "-s", "-1G"], "-1G is negative"),
            ("daxemu", ["create", "--device", fresh, "--size", "0"], "--size must be positive"),
            ("daxemu", ["create", "--device", fresh, "--size", "1M"], "outside 2 MiB to 16 TiB"),
            ("daxemu", ["truncate", "-d", e.path, "/f", "-5"], "-5 is negative, and no size or count is"),
            ("daxemu", ["truncate", "/f", "-5", "-d", e.path], "daxemu truncate --help"),
            ("daxemu", ["truncate", "-d", e.path, "/f", "8192T"], "larger than the largest file"),
            (
                "daxemu", ["truncate", "-d", e.path, "/f", "4503599627366401"],
                "4503599627366401 bytes is larger than the largest file, 4503599627366400 bytes"
            ),
            ("daxemu", ["format", "-d", e.path, "--force", "--bytes-per-inode", "0"], "--bytes-per-inode"),
            ("daxemu", ["ls", "-d", e.path, "f"], "start with /"),
            ("daxemu", ["map", "-d", e.path, "--columns", "-3"], "--columns -3 is negative"),
            ("kvstore", ["--device", e.path, "--buckets", "-1", "put", "a", "b"], "--buckets -1 is negative"),
            ("kvstore", ["--device", e.path, "--persistence", "fast", "get", "a"], "--persistence is automatic"),
            ("kvstore", ["--device", e.path, "put", "", "b"], "keys are 1 to 65536 bytes; this one has 0"),
            // A path on the device is absolute in the examples as in daxemu, not made so silently.
            ("kvstore", ["--device", e.path, "--file", "store", "put", "a", "b"], "start with /"),
            ("pmemlog", ["--device", e.path, "--file", "log", "append", "x"], "start with /"),
            ("simple-copy", ["--device", e.path, "/etc/hostname", "copy"], "start with /"),
            // An option a command does not have is unknown, whatever its value, negative too.
            ("kvstore", ["--device", e.path, "explore", "--records", "-1"], "Unknown option '--records'"),
            ("pmemlog", ["--device", e.path, "explore", "--ops", "-1"], "Unknown option '--ops'"),
            ("daxemu", ["create", "-d", fresh, "--bogus", "-1"], "Unknown option '--bogus'"),
            // An empty --device is a bad argument too, not a device that cannot be opened.
            ("daxemu", ["info", "--device", ""], "--device names no file"),
            ("daxemu", ["-d", "", "ls"], "--device names no file"),
            ("kvstore", ["--device", "", "get", "a"], "--device names no file"),
            ("pmemlog", ["--device", "", "walk"], "--device names no file"),
            ("simple-copy", ["--device", "", "/etc/hostname", "/copy"], "--device names no file"),
            ("rdma-buffer", ["--device", ""], "--device names no file"),
            ("daxemu", ["dedup", "-d", e.path, "/f", "/f", "--offset", "100"], "--offset 100 bytes is not a multiple"),
            (
                "daxemu", ["dedup", "-d", e.path, "/f", "/f", "--destination-offset", "4097"],
                "--destination-offset 4097 bytes"
            ),
        ]
        for (program, arguments, text) in cases {
            let result = try runCommand(program, arguments)
            expectCleanFailure(result, program, mentioning: text)
            #expect(result.status == 64, "\(arguments): \(result.status)")
        }
        #expect(access(fresh, F_OK) != 0, "no device was created")
        // Nothing changed: the file is whole, the file system was not formatted again.
        #expect(try runCommand("daxemu", ["ls", "-l", "-d", e.path]).output.contains(" f\n"))
        #expect(try runCommand("daxemu", ["ls", "-d", e.path]).output == "f\n", "the examples made nothing")
    }

    @Test("ls hides dot files unless -a; -la shows . and .. too")
    func listAll() throws {
        let e = try ExampleDevice(size: "8M")
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", e.path]) }
        _ = try daxemu(["put", "/etc/hostname", "/.hidden"])
        _ = try daxemu(["put", "/etc/hostname", "/shown"])
        #expect(try daxemu(["ls"]).output == "shown\n")
        #expect(try daxemu(["ls", "-a"]).output == "./\n../\n.hidden\nshown\n")
        let long = try daxemu(["ls", "-la", "/"]).output.split(separator: "\n")
        #expect(long.count == 4 && long[0].hasPrefix("d ") && long[0].hasSuffix(" .") && long[1].hasSuffix(" .."))
        #expect(long[2].hasPrefix("- ") && long[2].hasSuffix(" .hidden"))
        let json = try daxemu(["ls", "-a", "--json"])
        let names = try #require(try JSONSerialization.jsonObject(with: json.outputData) as? [[String: Any]])
        #expect(names.compactMap { $0["name"] as? String } == [".hidden", "shown"])
    }

    @Test("errors in the user's words: an existing device, a directory, a missing directory, too big a size")
    func errorsInUsersWords() throws {
        let e = try ExampleDevice(size: "8M")
        let directory = NSTemporaryDirectory() + "daxemu-words-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let cases: [([String], String)] = [
            (["create", "-d", e.path, "--size", "8M"], "\(e.path): it already exists"),
            (["create", "-d", directory, "--size", "8M"], "\(directory): it is a directory"),
            (["create", "-d", directory + "/no/dev", "--size", "8M"], "\(directory)/no: no such directory"),
            (["create", "-d", directory + "/dev", "--size", "16T"], "16 TiB requested, "),
            (["info", "-d", directory + "/none"], "no device at \(directory)/none"),
            (["info", "-d", directory], "it is a directory"),
        ]
        for (arguments, text) in cases {
            let result = try runCommand("daxemu", arguments)
            expectCleanFailure(result, mentioning: text)
            #expect(!result.errors.contains("failed"), "library words: \(result.errors)")
        }
        #expect(
            try runCommand("daxemu", ["create", "-d", directory + "/dev", "--size", "16T"]).errors.contains(" free in ")
        )
        // The examples say it as daxemu does, and what makes one.
        let missing = directory + "/none"
        for (program, arguments) in [
            ("kvstore", ["--device", missing, "get", "a"]), ("pmemlog", ["--device", missing, "walk"]),
            ("rdma-buffer", ["--device", missing]), ("simple-copy", ["--device", missing, "/etc/hostname", "/x"]),
        ] {
            let result = try runCommand(program, arguments)
            expectCleanFailure(result, program, mentioning: "no device at \(missing): create one with `daxemu create")
            #expect(!result.errors.contains("failed"), "library words: \(result.errors)")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty, "nothing was created")
        // map --svg into a missing directory fails before it draws anything.
        let map = try runCommand("daxemu", ["map", "-d", e.path, "--svg", directory + "/no/pages.svg"])
        expectCleanFailure(map, mentioning: "\(directory)/no")
        #expect(map.output.isEmpty, "\(map.output)")
    }

    @Test("names: invalid UTF-8 refused everywhere; a newline is shown escaped on one line")
    func names() throws {
        let e = try ExampleDevice(size: "24M")
        let dev = "'\(e.path)'"
        // Each is refused with exit 64 and one line that shows the bad byte.
        for script in [
            "\"$DAXEMU\" put -d \(dev) /etc/hostname \"$(printf '/a\\377b')\"",
            "\"$DAXEMU\" mkdir -d \(dev) \"$(printf '/a\\377b')\"",
            "\"$KVSTORE\" --device \(dev) --buckets 64 put \"$(printf 'k\\377')\" v",
            "\"$PMEMLOG\" --device \(dev) append \"$(printf 'r\\377')\"",
        ] {
            let result = try runShell(script)
            expectCleanFailure(
                result, script.contains("DAXEMU") ? "daxemu" : script.contains("KVSTORE") ? "kvstore" : "pmemlog",
                mentioning: "\\xFF")
            #expect(result.status == 64, "\(script): \(result.status)")
        }
        #expect(try runCommand("daxemu", ["ls", "-a", "-d", e.path]).output == "./\n../\n", "nothing was made")
        // A name with a newline is listed on one line, escaped, and as it is in JSON.
        #expect(try runCommand("daxemu", ["put", "-d", e.path, "/etc/hostname", "/two\nlines\\"]).status == 0)
        #expect(try runCommand("daxemu", ["ls", "-d", e.path]).output == "two\\nlines\\\\\n")
        let json = try runCommand("daxemu", ["ls", "--json", "-d", e.path])
        let entries = try #require(try JSONSerialization.jsonObject(with: json.outputData) as? [[String: Any]])
        #expect(entries.first?["name"] as? String == "two\nlines\\")
        // An error naming it is still one line.
        expectCleanFailure(
            try runCommand("daxemu", ["mkdir", "-d", e.path, "/two\nlines\\"]), mentioning: "two\\nlines")
        // So is one naming a host file, told in full (it was cut at the newline).
        let host = NSTemporaryDirectory() + "no-such-\(getpid())\nfile"
        for (program, arguments) in [
            ("daxemu", ["put", "-d", e.path, host, "/host"]), ("simple-copy", ["--device", e.path, host, "/host"]),
        ] {
            let result = try runCommand(program, arguments)
            #expect(result.status == 1, "\(program)")
            #expect(
                result.errors == "\(program): cannot read \(host.replacingOccurrences(of: "\n", with: "\\n")): "
                    + "No such file or directory\n", "\(result.errors)")
        }
        // pmemlog keeps the record, and walk shows it on one line.
        #expect(try runCommand("pmemlog", ["--device", e.path, "append", "one\ntwo", "tab\there"]).status == 0)
        #expect(try runCommand("pmemlog", ["--device", e.path, "walk"]).output == "one\\ntwo\ntab\\there\n")
        // A value that starts with - goes after --, as the error says.
        #expect(try runCommand("kvstore", ["--device", e.path, "--buckets", "64", "put", "t", "--", "-5"]).status == 0)
        #expect(try runCommand("kvstore", ["--device", e.path, "get", "t"]).output == "-5\n")
        // A record that another program wrote with bytes that are not UTF-8 shows them as \xNN.
        do {
            let fs = try DAXFileSystem.mount(try PMemDevice.open(path: e.path))
            defer { try? fs.unmount() }
            let log = try fs.open("/pmemlog")
            defer { log.close() }
            try log.write([0xFF, 0xE2, 0x82], at: 4096 + 8 + 1)  // inside the first record, "one\ntwo"
        }
        #expect(try runCommand("pmemlog", ["--device", e.path, "walk"]).output == "o\\xFF\\xE2\\x82two\ntab\\there\n")
    }

    /// An exploration of many images runs for minutes: on a terminal it shows how many it has
    /// checked, and the report still starts on a line of its own; elsewhere it prints the report only.
    @Test("explore shows the crash images checked so far on a terminal, and nothing of it elsewhere")
    func exploreProgress() throws {
        let shown = try runOnTerminal("\"$DAXEMU\" explore --ops 2 --images-per-point 0")
        #expect(shown.status == 0, "\(shown)")
        let images = try #require(
            shown.output.split(whereSeparator: \.isNewline).first { $0.hasPrefix("crash points: ") })
        let total = try #require(images.split(separator: ",").dropFirst().first?.split(separator: " ").last)
        #expect(shown.output.contains("explore: \(total) crash images checked\r\n"), "\(shown.output)")
        let plain = try runCommand("daxemu", ["explore", "--ops", "2", "--images-per-point", "0"])
        #expect(plain.status == 0 && plain.errors.isEmpty, "\(plain.errors)")
        #expect(plain.output.hasPrefix("crash points: "), "\(plain.output)")
    }

    @Test("get shows progress on a terminal as put does, also when the bytes go to a pipe")
    func getProgress() throws {
        let e = try ExampleDevice(size: "16M")
        let local = NSTemporaryDirectory() + "daxemu-progress-\(getpid())"
        defer { unlink(local) }
        try Data(pattern(8 << 20, seed: 4)).write(to: URL(fileURLWithPath: local))
        let put = try runOnTerminal("\"$DAXEMU\" put -d '\(e.path)' '\(local)' /big")
        #expect(put.status == 0 && put.output.contains("put /big [") && put.output.contains("100%"), "\(put)")
        // Into a file, and to standard output when it is a pipe.
        for command in ["get -d '\(e.path)' /big '\(local).back'", "get -d '\(e.path)' /big - | cat >/dev/null"] {
            let get = try runOnTerminal("\"$DAXEMU\" " + command)
            #expect(get.status == 0 && get.output.contains("get /big [") && get.output.contains("100%"), "\(get)")
        }
        #expect(
            try Data(contentsOf: URL(fileURLWithPath: local + ".back")) == Data(contentsOf: URL(fileURLWithPath: local))
        )
        // Bytes to the terminal itself get no progress mixed in.
        try Data("bytes for the terminal".utf8).write(to: URL(fileURLWithPath: local))
        _ = try runCommand("daxemu", ["put", "-d", e.path, local, "/h"])
        let toTerminal = try runOnTerminal("\"$DAXEMU\" get -d '\(e.path)' /h -")
        #expect(toTerminal.status == 0 && toTerminal.output == "bytes for the terminal", "\(toTerminal.output)")
        unlink(local + ".back")
    }

    @Test("kvstore bench never touches the user's store")
    func benchLeavesStoreAlone() throws {
        let e = try ExampleDevice(size: "64M")
        let kv = { (arguments: [String]) in
            try runCommand("kvstore", ["--device", e.path, "--buckets", "1024"] + arguments)
        }
        #expect(try kv(["put", "mine", "kept"]).status == 0)
        let bench = try kv(["bench", "--count", "2000"])
        #expect(bench.status == 0, "\(bench.errors)")
        let result = try #require(try JSONSerialization.jsonObject(with: bench.outputData) as? [String: Double])
        #expect(Set(result.keys) == ["putsPerSecond", "getsPerSecond"] && result.values.allSatisfy { $0 > 0 })
        #expect(try kv(["check"]).output == "ok: 1 key\n")
        #expect(try kv(["get", "mine"]).output == "kept\n")
        #expect(try runCommand("daxemu", ["ls", "-a", "-d", e.path]).output == "./\n../\nkvstore\n", "scratch removed")
    }

    @Test("kvstore bench killed while it runs leaves no file behind, and the next mount frees its blocks")
    func killedBenchLeavesNothing() throws {
        let e = try ExampleDevice(size: "64M")
        #expect(
            try runCommand("kvstore", ["--device", e.path, "--buckets", "1024", "put", "mine", "kept"]).status == 0)
        let before = try runCommand("daxemu", ["info", "-d", e.path]).output
        let bench = Process()
        bench.executableURL = URL(fileURLWithPath: ChildProcess.executable("kvstore"))
        bench.arguments = ["--device", e.path, "--buckets", "1024", "bench", "--count", "50000000"]
        bench.standardOutput = FileHandle.nullDevice
        bench.standardError = FileHandle.nullDevice
        try bench.run()
        // The scratch store exists once the bench maps it: a second mapping of the device, beside
        // the device's own, in the bench's address space.
        let maps = "/proc/\(bench.processIdentifier)/maps"
        spinUntil {
            let text = (try? String(contentsOfFile: maps, encoding: .utf8)) ?? ""
            return text.split(separator: "\n").count { $0.hasSuffix(e.path) } >= 2 || !bench.isRunning
        }
        #expect(bench.isRunning, "the bench ended before its store was mapped")
        kill(bench.processIdentifier, SIGKILL)
        bench.waitUntilExit()
        #expect(bench.terminationReason == .uncaughtSignal && bench.terminationStatus == SIGKILL)
        // No name is left: the store had none. A read-only look sees the blocks still held by the
        // unnamed file, on the orphan list; the next mount that may write frees them.
        #expect(try runCommand("daxemu", ["ls", "-a", "-d", e.path]).output == "./\n../\nkvstore\n")
        let fsck = try runCommand("daxemu", ["fsck", "-d", e.path])
        #expect(fsck.status == 0, "\(fsck.output)")
        #expect(fsck.output.contains("1 removed file is still on the orphan list"), "\(fsck.output)")
        #expect(try runCommand("kvstore", ["--device", e.path, "get", "mine"]).output == "kept\n")
        let free = { (info: String) in info.split(separator: "\n").first { $0.hasPrefix("file system") } }
        let after = try runCommand("daxemu", ["info", "-d", e.path]).output
        #expect(free(after) != nil && free(after) == free(before), "\(before)\n\(after)")
    }

    @Test("counts are plural only when they should be")
    func plurals() throws {
        let e = try ExampleDevice(size: "8M")
        let info = try runCommand("daxemu", ["info", "-d", e.path]).output
        #expect(info.contains("0 files, 1 directory,") && info.contains("0 pages pinned, 0 blocks quarantined"))
        _ = try runCommand("daxemu", ["put", "-d", e.path, "/etc/hostname", "/f"])
        #expect(try runCommand("daxemu", ["info", "-d", e.path]).output.contains("1 file, 1 directory,"))
        let one = NSTemporaryDirectory() + "one-byte-\(getpid())"
        defer { unlink(one) }
        try Data("x".utf8).write(to: URL(fileURLWithPath: one))
        #expect(try runCommand("simple-copy", ["--device", e.path, one, "/one"]).output == "copied 1 byte to /one\n")
        // Damage that fsck reports as exactly one problem: a link count.
        let fs = try DAXFileSystem.mount(try PMemDevice.open(path: e.path))
        let offset = fs.superblock.inodeOffset(1) + 20
        try fs.unmount()
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: e.path))
        try handle.seek(toOffset: UInt64(offset))
        try handle.write(contentsOf: Data([0x77]))
        try handle.close()
        let fsck = try runCommand("daxemu", ["fsck", "-d", e.path])
        #expect(fsck.status == 1 && !fsck.output.contains(" 1 problems"), "\(fsck.output)")
        #expect(fsck.output.contains(": 3 problems\n"), "\(fsck.output)")
        #expect(fsck.output.contains("  - 1 block is marked allocated but owned by no file"), "\(fsck.output)")
        #expect(CheckReport(isClean: false, problems: ["x"]).description == "1 problem:\n  - x")
    }

    @Test("map: a frame range, a file, a legend of the states present, a readable SVG of a 1 GiB device")
    func map() throws {
        let device = DevicePath()
        #expect(try runCommand("daxemu", ["create", "-d", device.path, "--size", "1G", "--sparse"]).status == 0)
        #expect(try runCommand("daxemu", ["format", "-d", device.path]).status == 0)
        let local = NSTemporaryDirectory() + "daxemu-map-\(getpid())"
        let svg = local + ".svg"
        defer {
            unlink(local)
            unlink(svg)
        }
        try Data(pattern(5 * 4096, seed: 2)).write(to: URL(fileURLWithPath: local))
        let daxemu = { (arguments: [String]) in try runCommand("daxemu", arguments + ["-d", device.path]) }
        #expect(try daxemu(["put", local, "/f1"]).status == 0)
        #expect(try daxemu(["mkdir", "/dir"]).status == 0)
        #expect(try daxemu(["put", "/etc/hostname", "/dir/f2"]).status == 0)

        let whole = try daxemu(["map", "--svg", svg])
        #expect(whole.status == 0 && whole.output.contains("J journal") && whole.output.contains("# file data"))
        for absent in ["quarantined", "pinned", "mapped", "F "] { #expect(!whole.output.contains(absent), "\(absent)") }
        let picture = try String(contentsOfFile: svg, encoding: .utf8)
        for label in [
            ">superblock: frame 0, ", ">journal: frames 1-", ">inode table: frames ", ">/f1: frames ",
            ">/dir/f2: frame ",
        ] {
            #expect(picture.contains(label), "the SVG lacks \(label)")
        }
        #expect(!picture.contains("quarantined") && !picture.contains("pinned"), "a legend of the states present")
        // Squares of 12 pixels, at most 4096 of them, however large the device.
        let squares = picture.split(separator: "\n").filter {
            $0.hasPrefix("<rect x=") && $0.contains("height=\"12\" fill")
        }
        #expect(squares.count > 10 && squares.count <= 4096)
        #expect(picture.contains("one square = 64 pages (256 KiB)"))

        // A file: the frames from its first to its last, all its own.
        let runs = try #require(
            try JSONSerialization.jsonObject(with: try daxemu(["frames", "/f1", "--json"]).outputData)
                as? [[String: Any]])
        let first = try #require(runs.first?["frame"] as? Int)
        let file = try daxemu(["map", "/f1"])
        #expect(
            file.status == 0 && file.output.hasPrefix("\(device.path), frames \(first)-\(first + 4);"), "\(file.output)"
        )
        #expect(file.output.contains("\n  FFFFF\n") && file.output.contains("F /f1 (5)"), "\(file.output)")
        // A frame range.
        let range = try daxemu(["map", "--frames", "0-9"])
        #expect(range.output.contains("\n  SJJJJJJJJJ\n  S superblock (1)  J journal (9)"), "\(range.output)")
        for bad in ["9-3", "0-262144", "x"] {
            let result = try daxemu(["map", "--frames", bad])
            expectCleanFailure(result, mentioning: "--frames")
            #expect(result.status == 64 && result.output.isEmpty)
        }
        expectCleanFailure(try daxemu(["map", "/dir"]), mentioning: "directory")
    }
}
