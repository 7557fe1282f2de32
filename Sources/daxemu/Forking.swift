import ArgumentParser
import CommandLineSupport
import DAX

struct Clone: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Clone a file: DEST shares SOURCE's blocks copy-on-write (a reflink, FICLONE).",
        discussion: """
            Into DEST if it is a directory (keeping the name); otherwise DEST, which must not exist. \
            Nothing is copied: a later write to either file copies the block it changes, so the other \
            file never sees it. `ls -l` shows the blocks shared. A directory is cloned with \
            `daxemu snapshot`.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The file to clone.")
    var source: String

    @Argument(help: "The new file, or a directory to put it in.")
    var destination: String

    @Option(
        name: .customLong("if-pinned"),
        help: ArgumentHelp(
            "What to do with pages of SOURCE that a device pins: copy, fail or unsafe-share.",
            discussion: """
                copy (default): the clone gets its own copy of each pinned page, and the device keeps \
                writing into SOURCE only. fail: refuse, changing nothing. unsafe-share: share them anyway, \
                so that the device's writes show up in the clone too (the bug the rule prevents). Pins \
                live in the process that takes them, so a clone from the command line meets none.
                """))
    var ifPinned: PinnedPageChoice = .copy

    func validate() throws {
        try requireDevicePath(source)
        try requireDevicePath(destination)
    }

    func run() throws {
        try device.withFileSystem { fs in
            guard try fs.attributes(of: source).kind == .file else {
                throw CommandError(
                    "cannot clone \(escapedForDisplay(source)): it is a directory (`daxemu snapshot` clones a tree)")
            }
            let target = try targetPath(fs, source: source, destination: destination)
            try fs.clone(source, to: target, ifPinned: ifPinned.policy)
            let clone = try fs.open(target, access: .readOnly)
            defer { clone.close() }
            let shared = try sharedBlockCount(clone, blocks: try fs.attributes(of: target).blocks)
            print(
                "\(escapedForDisplay(target)): a clone of \(escapedForDisplay(source)), "
                    + "\(counted(shared, "block")) shared")
        }
    }
}

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Snapshot a directory: a clone of its whole tree, sharing every file's blocks copy-on-write.",
        discussion: """
            Into DEST if it is a directory (keeping the name); otherwise DEST, which must not exist. \
            The snapshot is made in one transaction: a crash leaves no DEST or a complete one. Files \
            changed afterwards, on either side, copy the blocks they change.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The directory to snapshot.")
    var directory: String

    @Argument(help: "The new directory, or a directory to put it in.")
    var destination: String

    func validate() throws {
        try requireDevicePath(directory)
        try requireDevicePath(destination)
    }

    func run() throws {
        try device.withFileSystem { fs in
            guard try fs.attributes(of: directory).kind == .directory else {
                throw CommandError(
                    "cannot snapshot \(escapedForDisplay(directory)): it is a file, not a directory "
                        + "(`daxemu clone` clones a file)")
            }
            let target = try targetPath(fs, source: directory, destination: destination)
            let inside = normalizedComponents(target)
            guard !inside.starts(with: normalizedComponents(directory)) else {
                throw CommandError(
                    "cannot snapshot \(escapedForDisplay(directory)) into \(escapedForDisplay(target)): "
                        + "it would be inside the tree it copies")
            }
            try fs.clone(directory, to: target, ifPinned: .copy)
            let (files, directories) = try treeCounts(fs, target)
            print(
                "\(escapedForDisplay(target)): a snapshot of \(escapedForDisplay(directory)), "
                    + "\(counted(files, "file")) and \(counted(directories, "directory", "directories"))")
        }
    }

    /// The files and directories under `path` (itself not counted).
    private func treeCounts(_ fs: DAXFileSystem, _ path: String) throws -> (files: Int, directories: Int) {
        var files = 0
        var directories = 0
        var pending = [path]
        while let next = pending.popLast() {
            let base = next.hasSuffix("/") ? next : next + "/"
            for name in try fs.contentsOfDirectory(next) where name != "." && name != ".." {
                if try fs.attributes(of: base + name).kind == .directory {
                    directories += 1
                    pending.append(base + name)
                } else {
                    files += 1
                }
            }
        }
        return (files, directories)
    }
}

struct Dedup: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Deduplicate: where DEST holds the same bytes as SOURCE, DEST shares SOURCE's blocks (FIDEDUPERANGE).",
        discussion: """
            The ranges are compared page by page while neither file can change; each page that is \
            equal comes to share SOURCE's block, copy-on-write. A partial page at the end is shared \
            only where both ranges end at the end of their files. Holes and pages a device pins are \
            left alone. Prints the bytes now shared. By default the whole of both files, from offset \
            0, as far as the shorter one goes.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The file whose blocks are kept.")
    var source: String

    @Argument(help: "The file whose equal pages come to share them.")
    var destination: String

    @Option(help: "Where the range starts in SOURCE (0, 4096, 64K...).")
    var offset = ByteCount(bytes: 0)

    @Option(help: "Where the range starts in DEST (default: --offset).")
    var destinationOffset: ByteCount?

    @Option(help: "The bytes to compare (default: as far as the shorter file goes).")
    var count: ByteCount?

    func validate() throws {
        try requireDevicePath(source)
        try requireDevicePath(destination)
        // Blocks are shared whole: an offset inside a page is a bad argument, known before mounting.
        for (name, value) in [("--offset", offset), ("--destination-offset", destinationOffset)] {
            if let value, value.bytes % PMemDevice.pageSize != 0 {
                throw ValidationError(
                    "\(name) \(value.bytes) bytes is not a multiple of 4 KiB: dedup shares whole blocks")
            }
        }
    }

    func run() throws {
        try device.withFileSystem { fs in
            let sizes = try [source, destination].map { path in
                let attributes = try fs.attributes(of: path)
                guard attributes.kind == .file else {
                    throw CommandError("cannot deduplicate \(escapedForDisplay(path)): it is a directory")
                }
                return attributes.size
            }
            let destinationOffset = (self.destinationOffset ?? offset).bytes
            for (path, size, start) in [(source, sizes[0], offset.bytes), (destination, sizes[1], destinationOffset)]
            where start > size {
                throw CommandError(
                    "cannot deduplicate at offset \(start) of \(escapedForDisplay(path)): it holds \(size) bytes")
            }
            let count = self.count?.bytes ?? min(sizes[0] - offset.bytes, sizes[1] - destinationOffset)
            let shared = try fs.deduplicate(
                source, offset: offset.bytes, destination, offset: destinationOffset, count: count)
            print(
                "\(escapedForDisplay(destination)): \(shared) of \(count) bytes now share \(escapedForDisplay(source))'s "
                    + "blocks (\(counted((shared + PMemDevice.pageSize - 1) / PMemDevice.pageSize, "page")))")
        }
    }
}

/// `--if-pinned` of `daxemu clone`.
enum PinnedPageChoice: String, ExpressibleByArgument, CaseIterable {
    case copy
    case fail
    case unsafeShare = "unsafe-share"

    var policy: PinnedPagePolicy {
        switch self {
        case .copy: .copy
        case .fail: .fail
        case .unsafeShare: .unsafeShare
        }
    }
}

/// Where `source` goes for `destination`: inside it, keeping its name, when it is a directory
/// (as cp(1) does); else `destination` itself.
private func targetPath(_ fs: DAXFileSystem, source: String, destination: String) throws -> String {
    guard (try? fs.attributes(of: destination))?.kind == .directory else { return destination }
    return (destination.hasSuffix("/") ? destination : destination + "/") + lastComponent(of: source)
}

/// The components of an absolute path with `.` and `..` resolved.
private func normalizedComponents(_ path: String) -> [Substring] {
    var components: [Substring] = []
    for component in path.split(separator: "/") where component != "." {
        if component == ".." { _ = components.popLast() } else { components.append(component) }
    }
    return components
}

/// How many of the file's blocks are shared with another file (or another place in it): a clone,
/// a snapshot, dedup. `blocks` is the file's block count: the look-up stops when it has seen them
/// all, so a huge sparse file with its blocks at the start is quick.
func sharedBlockCount(_ file: DAXFile, blocks: Int) throws -> Int {
    guard blocks > 0 else { return 0 }
    var shared = 0
    try forEachDataWindow(of: file) { offset, count, _ in
        for references in try file.blockReferences(offset: offset, count: count) where references > 1 { shared += 1 }
    }
    return shared
}
