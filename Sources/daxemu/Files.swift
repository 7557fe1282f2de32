import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ls", abstract: "List a directory, or show a file.",
        discussion: """
            A name holding a newline, tab, other control character or backslash is shown escaped \
            (\\n, \\t, \\u{1B}, \\\\); --json gives names as they are.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The directory (default /), or a file, which is listed alone as given.")
    var directory = "/"

    @Flag(
        name: .shortAndLong, help: "Show type, size, blocks and how many of them are shared (clone, snapshot, dedup).")
    var long = false

    @Flag(name: .shortAndLong, help: "Show names that start with a dot too, and . and .. (not in --json).")
    var all = false

    @Flag(help: "Print JSON: a list of {name, type, size, blocks, sharedBlocks, inode}.")
    var json = false

    func validate() throws { try requireDevicePath(directory) }

    /// One line of the listing.
    struct Entry: Encodable {
        var name: String
        /// `file` or `directory`.
        var type: String
        var size: Int
        var blocks: Int
        /// Blocks shared copy-on-write with another file (a clone, a snapshot, dedup); 0 for a
        /// directory, whose blocks are its own.
        var sharedBlocks: Int
        var inode: UInt32

        init(_ name: String, _ attributes: FileAttributes, sharedBlocks: Int = 0) {
            self.name = name
            type = attributes.kind.rawValue
            size = attributes.size
            blocks = attributes.blocks
            self.sharedBlocks = sharedBlocks
            inode = attributes.inode
        }

        /// The entry for `path`, its shared blocks counted when `counting` (which opens the file).
        init(_ name: String, path: String, _ fs: DAXFileSystem, counting: Bool) throws {
            let attributes = try fs.attributes(of: path)
            guard counting, attributes.kind == .file, attributes.blocks > 0 else {
                self.init(name, attributes)
                return
            }
            let file = try fs.open(path, access: .readOnly)
            defer { file.close() }
            self.init(name, attributes, sharedBlocks: try sharedBlockCount(file, blocks: attributes.blocks))
        }

        var isDirectory: Bool { type == FileAttributes.Kind.directory.rawValue }
    }

    func run() throws {
        let entries = try device.withFileSystem(access: .readOnly) { fs -> [Entry] in
            let counting = long || json
            let target = try fs.attributes(of: directory)
            if target.kind == .file { return [try Entry(directory, path: directory, fs, counting: counting)] }
            let base = directory.hasSuffix("/") ? directory : directory + "/"
            var entries = try fs.contentsOfDirectory(directory).filter { all || !$0.hasPrefix(".") }.map { name in
                try Entry(name, path: base + name, fs, counting: counting)
            }
            if all, !json {
                let parent = try fs.attributes(of: parentPath(of: directory))
                entries.insert(contentsOf: [Entry(".", target), Entry("..", parent)], at: 0)
            }
            return entries
        }
        if json {
            print(try jsonText(entries))
            return
        }
        for entry in entries {
            let name = escapedForDisplay(entry.name)
            if long {
                let sizes =
                    padded(String(entry.size), to: 12) + " " + padded(String(entry.blocks), to: 8) + " "
                    + padded(entry.isDirectory ? "-" : "\(entry.sharedBlocks) shared", to: 10)
                print("\(entry.isDirectory ? "d" : "-")  \(sizes) \(name)")
            } else {
                print(entry.isDirectory ? name + "/" : name)
            }
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

    func validate() throws { try requireDevicePath(directory) }

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
            The copy is written into an unnamed file (on the orphan list, like O_TMPFILE) and linked \
            over DEST when whole, so a put that fails or is killed leaves DEST as it was and the \
            next mount frees what it had copied; replacing a file needs room for both.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The local file to read.")
    var local: String

    @Argument(help: "Where to put it; a directory keeps the local name.")
    var destination: String

    func validate() throws { try requireDevicePath(destination) }

    func run() throws {
        // Opened without waiting (a FIFO would block until a writer came), then checked.
        let input = open(local, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard input >= 0 else { throw CommandError("cannot read \(local): \(String(cString: strerror(errno)))") }
        defer { close(input) }
        var info = stat()
        guard fstat(input, &info) == 0 else {
            throw CommandError("cannot read \(local): \(String(cString: strerror(errno)))")
        }
        guard info.st_mode & S_IFMT == S_IFREG else { throw CommandError("\(local) is not a regular file") }
        _ = fcntl(input, F_SETFL, fcntl(input, F_GETFL) & ~O_NONBLOCK)
        let size = Int(info.st_size)
        try device.withFileSystem { fs in
            var target = destination
            if (try? fs.attributes(of: destination))?.kind == .directory {
                target = (destination.hasSuffix("/") ? destination : destination + "/") + lastComponent(of: local)
            }
            // A put that fails (no space, a bad read) or is killed leaves an existing DEST as it was.
            try fs.createAtomically(target) { file in
                if size > 0 { try file.allocate(offset: 0, count: size) }  // contiguous blocks, fails early if full
                let progress = Progress("put \(target)")
                let chunk = 1 << 20
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
                defer { buffer.deallocate() }
                var offset = 0
                // Up to the end of the file, not just its size when it was opened: a file that
                // grows meanwhile, or one of /proc that says 0 bytes, is copied whole.
                while true {
                    let count = read(input, buffer.baseAddress, chunk)
                    if count < 0, errno == EINTR { continue }
                    if count == 0, offset >= size { break }
                    guard count > 0 else {
                        let reason = count == 0 ? "it shrank" : String(cString: strerror(errno))
                        throw CommandError("cannot read \(local) at offset \(offset): \(reason)")
                    }
                    try file.write(UnsafeRawBufferPointer(rebasing: buffer[0..<count]), at: offset)
                    offset += count
                    progress.update(size > 0 ? Double(offset) / Double(size) : 1)
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

    func validate() throws { try requireDevicePath(source) }

    func run() throws {
        try device.withFileSystem(access: .readOnly) { fs in
            let file = try fs.open(source, access: .readOnly)
            defer { file.close() }
            let output = local == "-" ? 1 : try openOutput(local, device: device.path)
            defer { if output != 1 { close(output) } }
            let size = file.size
            // Progress on stderr, unless the bytes themselves go to the terminal.
            let progress = Progress("get \(source)", shown: output != 1 || isatty(1) == 0)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
            defer { buffer.deallocate() }
            var offset = 0
            while offset < size {
                let count = try file.read(into: buffer, at: offset)
                guard count > 0 else { break }
                try writeAll(output, UnsafeRawBufferPointer(rebasing: buffer[0..<count]), path: local)
                offset += count
                progress.update(Double(offset) / Double(size))
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

    func validate() throws {
        guard !paths.isEmpty else { throw ValidationError("rm needs a path") }
        for path in paths { try requireDevicePath(path) }
    }

    /// Every path is tried, as rm(1) tries each operand: one that cannot be removed is told on
    /// stderr, and the command then fails.
    func run() throws {
        let failed = try device.withFileSystem { fs in
            var failed = 0
            for path in paths {
                do {
                    try fs.remove(path)
                } catch let error as DAXError {
                    reportErrorLine("daxemu: \(error.message)")
                    failed += 1
                }
            }
            return failed
        }
        if failed > 0 { throw ExitCode.failure }
    }
}

struct Move: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mv", abstract: "Move or rename atomically, as mv(1) does.",
        discussion: """
            Into DEST if it is a directory (keeping the name); otherwise SOURCE becomes DEST, \
            replacing a file there.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument var source: String
    @Argument var destination: String

    func validate() throws {
        try requireDevicePath(source)
        try requireDevicePath(destination)
    }

    func run() throws {
        try device.withFileSystem { fs in
            var target = destination
            if (try? fs.attributes(of: destination))?.kind == .directory {
                target = (destination.hasSuffix("/") ? destination : destination + "/") + lastComponent(of: source)
            }
            try fs.rename(source, to: target)
        }
    }
}

struct Truncate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Set a file's size (shrinking frees its blocks).")

    @OptionGroup var device: DeviceOptions

    @Argument var file: String
    @Argument(help: "The new size: 0, 4096, 64K, 1M...")
    var size: ByteCount

    func validate() throws {
        try requireDevicePath(file)
        guard size.bytes <= DAXFileSystem.maximumFileSize else {
            // In bytes where the rounded sizes would read the same ("4096 TiB ... 4096 TiB").
            let largest = DAXFileSystem.maximumFileSize
            let shown = ByteCount.format(size.bytes) == ByteCount.format(largest)
            throw ValidationError(
                shown
                    ? "\(size.bytes) bytes is larger than the largest file, \(largest) bytes"
                    : "\(size) is larger than the largest file, \(ByteCount.format(largest))")
        }
    }

    func run() throws {
        try device.withFileSystem { fs in
            let handle = try fs.open(file)
            defer { handle.close() }
            try handle.truncate(to: size.bytes)
        }
    }
}
