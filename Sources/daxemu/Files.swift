import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ls", abstract: "List a directory, or show a file.")

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The directory (default /), or a file, which is listed alone as given.")
    var directory = "/"

    @Flag(name: .shortAndLong, help: "Show type, size and blocks.")
    var long = false

    @Flag(help: "Print JSON: a list of {name, type, size, blocks, inode}.")
    var json = false

    func run() throws {
        let entries = try device.withFileSystem { fs -> [(String, FileAttributes)] in
            let target = try fs.attributes(of: directory)
            if target.kind == .file { return [(directory, target)] }
            return try fs.contentsOfDirectory(directory).map { name in
                (name, try fs.attributes(of: directory == "/" ? "/" + name : directory + "/" + name))
            }
        }
        if json {
            print(
                try jsonText(
                    entries.map { name, a in
                        [
                            "name": name, "type": a.kind.rawValue, "size": a.size, "blocks": a.blocks,
                            "inode": Int(a.inode),
                        ]
                    }))
        } else if long {
            for (name, a) in entries {
                let kind = a.kind == .directory ? "d" : "-"
                print("\(kind)  \(padded(String(a.size), to: 12)) \(padded(String(a.blocks), to: 8)) \(name)")
            }
        } else {
            for (name, a) in entries { print(a.kind == .directory ? name + "/" : name) }
        }
    }
}

struct MakeDirectory: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "mkdir", abstract: "Create a directory.")

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The directory to create.")
    var directory: String

    @Flag(name: .shortAndLong, help: "Create missing parents too; an existing directory is fine.")
    var parents = false

    func run() throws {
        try device.withFileSystem { fs in
            guard parents else { return try fs.createDirectory(directory) }
            var path = ""
            for component in directory.split(separator: "/") {
                path += "/" + component
                do {
                    try fs.createDirectory(path)
                } catch let error as DAXError where error.code == .alreadyExists {
                    guard try fs.attributes(of: path).kind == .directory else { throw error }
                }
            }
        }
    }
}

struct Put: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy a local file into the file system (replacing DEST if it is a file).",
        discussion: """
            The copy is written under a temporary name beside DEST and renamed over it when whole, \
            so a put that fails leaves DEST as it was; replacing a file needs room for both.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The local file to read.")
    var local: String

    @Argument(help: "Where to put it; a directory keeps the local name.")
    var destination: String

    func run() throws {
        let input = open(local, O_RDONLY)
        guard input >= 0 else { throw CommandError("cannot read \(local): \(String(cString: strerror(errno)))") }
        defer { close(input) }
        var info = stat()
        fstat(input, &info)
        guard info.st_mode & S_IFMT == S_IFREG else { throw CommandError("\(local) is not a regular file") }
        let size = Int(info.st_size)
        try device.withFileSystem { fs in
            var target = destination
            if (try? fs.attributes(of: destination))?.kind == .directory {
                target =
                    (destination.hasSuffix("/") ? destination : destination + "/")
                    + (local.split(separator: "/").last.map(String.init) ?? local)
            }
            // A put that fails (no space, a bad read) or is killed leaves an existing DEST as it was.
            try fs.createAtomically(target) { file in
                if size > 0 { try file.allocate(offset: 0, count: size) }  // contiguous blocks, fails early if full
                let progress = Progress("put \(target)")
                let chunk = 1 << 20
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
                defer { buffer.deallocate() }
                var offset = 0
                while offset < size {
                    let count = read(input, buffer.baseAddress, min(chunk, size - offset))
                    guard count > 0 else {
                        let reason = count == 0 ? "it shrank" : String(cString: strerror(errno))
                        throw CommandError("cannot read \(local) at offset \(offset): \(reason)")
                    }
                    try file.write(UnsafeRawBufferPointer(rebasing: buffer[0..<count]), at: offset)
                    offset += count
                    progress.update(Double(offset) / Double(size))
                }
                progress.finish()
            }
        }
    }
}

struct Get: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Copy a file out of the file system ('-' for stdout).")

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The file to read.")
    var source: String

    @Argument(help: "The local file to write, or - for standard output.")
    var local: String

    func run() throws {
        try device.withFileSystem { fs in
            let file = try fs.open(source, access: .readOnly)
            defer { file.close() }
            let output = local == "-" ? 1 : open(local, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            guard output >= 0 else { throw CommandError("cannot write \(local): \(String(cString: strerror(errno)))") }
            defer { if output != 1 { close(output) } }
            let size = file.size
            let progress = Progress("get \(source)")
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
            defer { buffer.deallocate() }
            var offset = 0
            while offset < size {
                let count = try file.read(into: buffer, at: offset)
                guard count > 0 else { break }
                var written = 0
                while written < count {
                    let n = write(output, buffer.baseAddress! + written, count - written)
                    guard n > 0 else {
                        throw CommandError("cannot write \(local): \(String(cString: strerror(errno)))")
                    }
                    written += n
                }
                offset += count
                if output != 1 { progress.update(Double(offset) / Double(size)) }
            }
            progress.finish()
        }
    }
}

struct Remove: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "rm", abstract: "Remove a file or an empty directory.")

    @OptionGroup var device: DeviceOptions

    @Argument(help: "What to remove.")
    var paths: [String]

    func run() throws {
        guard !paths.isEmpty else { throw CommandError("rm needs a path") }
        try device.withFileSystem { fs in for path in paths { try fs.remove(path) } }
    }
}

struct Move: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "mv", abstract: "Rename atomically (replaces a file).")

    @OptionGroup var device: DeviceOptions

    @Argument var source: String
    @Argument var destination: String

    func run() throws {
        try device.withFileSystem { fs in try fs.rename(source, to: destination) }
    }
}

struct Truncate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Set a file's size (shrinking frees its blocks).")

    @OptionGroup var device: DeviceOptions

    @Argument var file: String
    @Argument(help: "The new size: 0, 4096, 64K, 1M...")
    var size: ByteCount

    func run() throws {
        try device.withFileSystem { fs in
            let handle = try fs.open(file)
            defer { handle.close() }
            try handle.truncate(to: size.bytes)
        }
    }
}

struct Frames: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show where each page of a file lives on the device: its frame and device offset.",
        discussion: "A program that maps the device with libpmem finds page P's bytes at the device offset shown.")

    @OptionGroup var device: DeviceOptions

    @Argument var file: String

    @Flag(help: "Print JSON: a list of {page, frame, deviceOffset} for the pages that have a block (holes are left out).")
    var json = false

    /// Pages looked up at a time: a huge sparse file is streamed, never held in memory whole.
    static let window = 1 << 16

    func run() throws {
        try device.withFileSystem { fs in
            let handle = try fs.open(file, access: .readOnly)
            defer { handle.close() }
            let pages = (handle.size + PMemDevice.pageSize - 1) / PMemDevice.pageSize
            var output = FramesOutput(json: json)
            var first = 0
            while first < pages {
                let count = min(Self.window, pages - first)
                let frames = try handle.frames(
                    offset: first * PMemDevice.pageSize,
                    count: min(count * PMemDevice.pageSize, handle.size - first * PMemDevice.pageSize))
                for (index, frame) in frames.enumerated() { output.add(page: first + index, frame) }
                first += count
            }
            output.finish(pages: pages)
        }
    }
}

/// The lines of `daxemu frames`, written as they come: a run of holes is one line.
private struct FramesOutput {
    let json: Bool
    var holeStart: Int?
    var entries = 0

    init(json: Bool) {
        self.json = json
        print(json ? "[" : "page      frame     device offset")
    }

    mutating func add(page: Int, _ frame: PageFrameNumber?) {
        guard let frame else {
            if holeStart == nil { holeStart = page }
            return
        }
        endHole(at: page)
        if json {
            print((entries > 0 ? "," : "") + "{\"page\": \(page), \"frame\": \(frame.rawValue), \"deviceOffset\": \(frame.deviceOffset)}")
        } else {
            print(padded(String(page), to: 9) + " " + padded(String(frame.rawValue), to: 9) + " \(frame.deviceOffset)")
        }
        entries += 1
    }

    mutating func finish(pages: Int) {
        endHole(at: pages)
        if json { print("]") }
    }

    private mutating func endHole(at page: Int) {
        guard let start = holeStart else { return }
        holeStart = nil
        guard !json else { return }
        print(padded(page - start == 1 ? String(start) : "\(start)-\(page - 1)", to: 9) + " " + padded("-", to: 9) + " (hole)")
    }
}

struct Fsck: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check the file system without changing it: exit 0 when clean, 1 with the problems listed.",
        discussion: """
            With --repair, repair what check finds (the device must not be mounted): rebuild the bitmap, \
            link counts, the journal, the orphan list and a damaged superblock; clear damaged inodes; move \
            files that lost their name to /lost+found. Each step is printed. Exit 0 when the file system \
            is consistent afterwards.
            """)

    @OptionGroup var device: DeviceOptions

    @Flag(help: "Repair the damage found, saying each step (the device must not be mounted).")
    var repair = false

    func run() throws {
        let opened = try device.open()
        defer { opened.close() }
        if repair { return try runRepair(opened) }
        let report: CheckReport
        do {
            report = try DAXFileSystem.check(opened)
        } catch let error as DAXError where error.code == .corrupted {
            print("\(opened.path): damaged: \(error.message)")
            throw ExitCode(1)
        }
        for note in report.notes { print("note: \(note)") }
        if report.isClean {
            print("\(opened.path): clean")
        } else {
            print("\(opened.path): \(report.problems.count) problems")
            for problem in report.problems { print("  - \(problem)") }
            print("`daxemu fsck --repair` repairs it (unmounted); a read-only mount reads what is intact")
            throw ExitCode(1)
        }
    }

    private func runRepair(_ opened: PMemDevice) throws {
        let report: RepairReport
        do {
            report = try DAXFileSystem.repair(opened)
        } catch let error as DAXError where error.code == .corrupted {
            print("\(opened.path): cannot repair: \(error.message)")
            throw ExitCode(1)
        }
        for action in report.actions { print("repaired: \(action)") }
        for note in report.check.notes { print("note: \(note)") }
        let outcome =
            report.changedNothing ? "clean, nothing to repair" : "repaired (\(report.actions.count) steps); now clean"
        print("\(opened.path): \(outcome)")
    }
}
