import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

/// `daxemu explore`: the file system's metadata operations under the crash explorer.
struct Explore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run random file-system operations on an emulated device; check every crash image.",
        discussion: """
            A fresh device (removed afterwards) gets --ops random metadata operations (create, \
            write, allocate, truncate, punch, rename, remove, mkdir). At every fence the explorer \
            makes crash images; each must mount, check clean, and hold the tree of before or after \
            the operation in flight, nothing else. Exit status 1 when an image fails.
            """)

    @Option(help: "Operations in the workload.")
    var ops = 20

    @Option(help: "Device size.")
    var size: ByteCount = ByteCount(bytes: 4 << 20)

    @OptionGroup var exploring: ExploreOptions

    func validate() throws {
        guard ops >= 1 else { throw ValidationError("--ops is 1 or more") }
        try size.validate(
            "--size", multipleOf: PMemDevice.pageSize, in: PMemDevice.minimumSize...PMemDevice.maximumSize)
    }

    func run() throws {
        let operations = FileSystemWorkload.operations(count: ops, seed: exploring.seed)
        let trees = try FileSystemWorkload.trees(after: operations, deviceSize: size.bytes)
        let progress = OperationProgress()
        nonisolated(unsafe) var fs: DAXFileSystem?
        try exploring.run(
            deviceSize: size.bytes, name: "daxemu explore --ops \(ops)",
            setup: { device in fs = try DAXFileSystem.format(device) },
            workload: { _ in
                for operation in operations {
                    try operation.apply(to: fs!)
                    progress.completed += 1
                }
                try fs!.unmount()
            },
            check: { image in
                let allowed = trees[progress.completed...].prefix(2)
                try FileSystemWorkload.check(image, allowed: Array(allowed))
            })
    }
}

/// `daxemu explore-merge`: joins the JSON reports of the shards of one campaign.
struct ExploreMerge: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "explore-merge",
        abstract: "Join the JSON reports of explore shards; exit 1 on failures or a missing shard.")

    @Argument(help: "The shards' reports (written with --json).")
    var reports: [String]

    @Option(help: "Write the merged report as JSON to this file.")
    var json: String?

    func validate() throws {
        try ExploreOptions.requireFileName(json, option: "--json", what: "the merged report")
    }

    func run() throws {
        // A report that could not be written is found out before the shards are read.
        if let json { try checkCanWrite(json, what: "the merged report") }
        let decoded = try reports.map(Self.read)
        let merged = try CrashReport.merge(decoded)
        if !merged.isComplete {
            let missing = Set(1...(merged.shards.first?.count ?? 1)).subtracting(merged.shards.map(\.index))
            print("missing shards: \(missing.sorted().map(String.init).joined(separator: ", "))")
        }
        try ExploreOptions.report(merged, json: json)
        if !merged.isComplete { throw ExitCode(1) }
    }
}

extension ExploreMerge {
    /// The report at `path`, or an error that says what is wrong with it in a line.
    static func read(_ path: String) throws -> CrashReport {
        let shown = escapedForDisplay(path)
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw CommandError("cannot read the crash report \(shown): no such file")
        }
        guard !isDirectory.boolValue else { throw CommandError("cannot read the crash report \(shown): a directory") }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CommandError("cannot read the crash report \(shown): permission denied or unreadable")
        }
        do {
            return try JSONDecoder().decode(CrashReport.self, from: data)
        } catch let error as DecodingError {
            throw CommandError("\(shown) is not a crash report written by explore --json: \(Self.describe(error))")
        }
    }

    /// A decoding error in a few words: the field and what is wrong with it.
    static func describe(_ error: DecodingError) -> String {
        func field(_ path: [any CodingKey]) -> String {
            guard !path.isEmpty else { return "the top level" }
            let names = path.map { $0.intValue.map { "[\($0)]" } ?? "." + $0.stringValue }.joined()
            return "field " + names.dropFirst(names.hasPrefix(".") ? 1 : 0)
        }
        switch error {
        case .keyNotFound(let key, let context):
            return "no \"\(key.stringValue)\" in \(field(context.codingPath))"
        case .typeMismatch(_, let context), .valueNotFound(_, let context):
            return "\(field(context.codingPath)) has the wrong type"
        case .dataCorrupted(let context):
            guard !context.codingPath.isEmpty else { return "not JSON" }
            // The library's own check says what is wrong (a shard 0 of 0); JSON's says "corrupted".
            let why = context.debugDescription.contains("corrupted") ? "" : ": \(context.debugDescription)"
            return "\(field(context.codingPath)) is corrupt\(why)"
        @unknown default:
            return "unreadable"
        }
    }
}

/// Random metadata operations of the file system, and the trees they leave.
enum FileSystemWorkload {
    /// What a file system holds: every path, nil for a directory, the bytes for a file.
    typealias Tree = [String: [UInt8]?]

    enum Operation {
        case create(String)
        case append(String, count: Int)
        case allocate(String, pages: Int)
        case truncate(String, to: Int)
        case punch(String, page: Int)
        case rename(String, to: String)
        case remove(String)
        case mkdir(String)

        func apply(to fs: DAXFileSystem) throws {
            switch self {
            case .create(let path): try fs.create(path).close()
            case .append(let path, let count):
                let file = try fs.open(path)
                defer { file.close() }
                try file.write((0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ file.size) }, at: file.size)
            case .allocate(let path, let pages):
                let file = try fs.open(path)
                defer { file.close() }
                try file.allocate(offset: file.size, count: pages * 4096)
            case .truncate(let path, let size):
                let file = try fs.open(path)
                defer { file.close() }
                try file.truncate(to: size)
            case .punch(let path, let page):
                let file = try fs.open(path)
                defer { file.close() }
                try file.punchHole(offset: page * 4096, count: 4096)
            case .rename(let path, let newPath): try fs.rename(path, to: newPath)
            case .remove(let path): try fs.remove(path)
            case .mkdir(let path): try fs.createDirectory(path)
            }
        }
    }

    /// `count` operations from `seed`, each valid on the tree the ones before it leave.
    static func operations(count: Int, seed: UInt64) -> [Operation] {
        var random = SplitMix(state: seed)
        var files: [String: Int] = [:]  // path -> size
        var directories = ["/"]
        var operations: [Operation] = []
        var serial = 0
        func newPath() -> String {
            serial += 1
            let directory = directories[Int(random.next() % UInt64(directories.count))]
            return (directory == "/" ? "" : directory) + "/n\(serial)"
        }
        while operations.count < count {
            let names = files.keys.sorted()
            let file = names.isEmpty ? nil : names[Int(random.next() % UInt64(names.count))]
            switch (random.next() % 8, file) {
            case (1, let path?):
                let bytes = 1 + Int(random.next() % 6000)
                operations.append(.append(path, count: bytes))
                files[path]! += bytes
            case (2, let path?):
                let pages = 1 + Int(random.next() % 3)
                operations.append(.allocate(path, pages: pages))
                files[path]! += pages * 4096
            case (3, let path?):
                let size = Int(random.next() % UInt64(files[path]! + 5000))
                operations.append(.truncate(path, to: size))
                files[path] = size
            case (4, let path?) where files[path]! >= 4096:
                operations.append(.punch(path, page: Int(random.next() % UInt64(files[path]! / 4096))))
            case (5, let path?):
                let target = newPath()
                operations.append(.rename(path, to: target))
                files[target] = files.removeValue(forKey: path)
            case (6, let path?):
                operations.append(.remove(path))
                files.removeValue(forKey: path)
            case (7, _) where directories.count < 4:
                let path = newPath()
                operations.append(.mkdir(path))
                directories.append(path)
            default:
                let path = newPath()
                operations.append(.create(path))
                files[path] = 0
            }
        }
        return operations
    }

    /// The tree before the first operation and after each one, from a run on a plain device.
    static func trees(after operations: [Operation], deviceSize: Int) throws -> [Tree] {
        let path = "/dev/shm/daxemu-explore-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        var options = PMemDevice.Options()
        options.sparse = true
        let device = try PMemDevice.create(path: path, size: deviceSize, options: options)
        unlink(path)
        defer { device.close() }
        let fs = try DAXFileSystem.format(device)
        defer { try? fs.unmount() }
        var trees = [try tree(of: fs)]
        for operation in operations {
            try operation.apply(to: fs)
            trees.append(try tree(of: fs))
        }
        return trees
    }

    static func tree(of fs: DAXFileSystem, _ directory: String = "/") throws -> Tree {
        var result: Tree = [:]
        for name in try fs.contentsOfDirectory(directory) {
            let path = directory == "/" ? "/" + name : directory + "/" + name
            do {
                let file = try fs.open(path, access: .readOnly)
                defer { file.close() }
                result[path] = .some(try file.read(count: file.size, at: 0))
            } catch let error as DAXError where error.code == .isADirectory {
                result[path] = .some(nil)
                result.merge(try tree(of: fs, path)) { old, _ in old }
            }
        }
        return result
    }

    /// Mounts the image (recovering), checks it, and compares its tree with the allowed ones.
    static func check(_ image: PMemDevice, allowed: [Tree]) throws {
        let fs = try DAXFileSystem.mount(image)
        defer { try? fs.unmount() }
        let report = try fs.check()
        guard report.isClean else {
            throw CommandError("check found \(report.problems.count) problems: \(report.problems.prefix(3))")
        }
        let found = try tree(of: fs)
        guard allowed.contains(found) else {
            throw CommandError(
                "the tree is neither the one before the operation in flight nor the one after: "
                    + found.keys.sorted().joined(separator: " "))
        }
    }

    /// SplitMix64, for a workload that the same seed repeats.
    struct SplitMix {
        var state: UInt64

        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }
}
