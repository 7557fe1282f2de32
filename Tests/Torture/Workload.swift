import DAX

/// One metadata-heavy operation.
public enum Operation: Sendable, CustomStringConvertible {
    case makeDirectory(String)
    case removeDirectory(String)
    case create(String, [UInt8])
    case write(String, offset: Int, [UInt8])
    case truncate(String, Int)
    case rename(String, String)
    case remove(String)
    case punch(String, offset: Int, count: Int)
    case allocate(String, offset: Int, count: Int)
    /// Open the file, remove it, and keep writing through the handle: an orphan.
    case removeWhileOpen(String)
    /// reflink a file, or snapshot a directory with its tree, to a new path.
    case clone(String, String)
    /// Store bytes through a `.readWrite` mapping of the file, then `sync` it: on a page the file
    /// shares, the store takes a copy-on-write fault.
    case store(String, offset: Int, [UInt8])
    /// Move the file's pages in the range to new blocks; the bytes stay.
    case migrate(String, offset: Int, count: Int)
    /// Share the first file's blocks with the second where the ranges are equal; the bytes stay.
    case deduplicate(String, offset: Int, String, destinationOffset: Int, count: Int)

    /// The operation as a line of a failure report.
    public var description: String {
        switch self {
        case .makeDirectory(let path): "mkdir \(path)"
        case .removeDirectory(let path): "rmdir \(path)"
        case .create(let path, let bytes): "create \(path) \(bytes.count)"
        case .write(let path, let offset, let bytes): "write \(path) \(offset)+\(bytes.count)"
        case .truncate(let path, let size): "truncate \(path) \(size)"
        case .rename(let from, let to): "rename \(from) \(to)"
        case .remove(let path): "remove \(path)"
        case .punch(let path, let offset, let count): "punch \(path) \(offset)+\(count)"
        case .allocate(let path, let offset, let count): "allocate \(path) \(offset)+\(count)"
        case .removeWhileOpen(let path): "remove-open \(path)"
        case .clone(let from, let to): "clone \(from) \(to)"
        case .store(let path, let offset, let bytes): "store \(path) \(offset)+\(bytes.count)"
        case .migrate(let path, let offset, let count): "migrate \(path) \(offset)+\(count)"
        case .deduplicate(let source, let offset, let destination, let destinationOffset, let count):
            "dedup \(source) \(offset) \(destination) \(destinationOffset)+\(count)"
        }
    }

    /// The file whose contents the operation changes, if it changes one in place.
    public var fileChangedInPlace: String? {
        switch self {
        case .write(let path, _, _), .truncate(let path, _), .punch(let path, _, _), .allocate(let path, _, _),
            .store(let path, _, _):
            path
        default: nil
        }
    }
}

/// A deterministic stream of operations from a starting model and a seed.
public struct Workload: Sendable {
    /// What the file system should hold after the operations so far.
    public private(set) var model: Model
    private var random: SeededRandom
    private var counter = 0
    /// Writes and truncates stay below this size.
    public let maximumFileSize: Int
    /// Whether clones, snapshots, stores through mappings, migration and dedup are mixed in.
    public let forking: Bool
    /// Pairs of files that hold (or held) the same bytes: a clone and its source, a file and a
    /// copy of it. Writes, stores and dedup prefer them.
    private var related: [(String, String)] = []

    /// A generator that starts from `model`, repeatable from `seed`. With `forking`, the stream
    /// also clones files and directories, writes and stores into shared pages, migrates and
    /// deduplicates; without it, the stream is the one it always was.
    public init(model: Model, seed: UInt64, maximumFileSize: Int = 48 << 10, forking: Bool = false) {
        self.model = model
        self.random = SeededRandom(seed: seed)
        self.maximumFileSize = maximumFileSize
        self.forking = forking
    }

    /// The next operation, applied to the model.
    public mutating func next() -> Operation {
        let operation = choose()
        apply(operation)
        return operation
    }

    private mutating func pick<T>(_ values: [T]) -> T { values[Int(random.next() % UInt64(values.count))] }
    private mutating func number(_ range: Range<Int>) -> Int {
        range.lowerBound + Int(random.next() % UInt64(range.count))
    }

    private mutating func freshName(in directory: String, prefix: String) -> String {
        counter += 1
        let name = "\(prefix)\(random.next() % 1_000_000)-\(counter)"
        return directory == "/" ? "/" + name : directory + "/" + name
    }

    private mutating func choose() -> Operation {
        let directories = model.directories.sorted()
        let files = model.files.keys.sorted()
        while true {
            switch number(0..<(forking ? 30 : 20)) {
            case 0 where directories.count < 6:
                return .makeDirectory(freshName(in: pick(directories), prefix: "d"))
            case 1:
                let empty = directories.filter { $0 != "/" && model.children(of: $0).isEmpty }
                if !empty.isEmpty { return .removeDirectory(pick(empty)) }
            case 2...4 where files.count < 24:
                return .create(freshName(in: pick(directories), prefix: "f"), random.bytes(number(0..<(16 << 10))))
            case 5...8 where !files.isEmpty:
                let path = pick(files)
                let offset = number(0..<(maximumFileSize / 2))
                return .write(path, offset: offset, random.bytes(number(1..<min(16 << 10, maximumFileSize - offset))))
            case 9...10 where !files.isEmpty:
                return .truncate(pick(files), number(0..<maximumFileSize))
            case 11...12 where !files.isEmpty:
                let from = pick(files)
                let to =
                    files.count > 1 && number(0..<3) == 0 ? pick(files) : freshName(in: pick(directories), prefix: "r")
                if to != from { return .rename(from, to) }
            case 13...14 where !files.isEmpty:
                return .remove(pick(files))
            case 15...16 where !files.isEmpty:
                let path = pick(files)
                return .punch(path, offset: number(0..<maximumFileSize), count: number(1..<(24 << 10)))
            case 17 where !files.isEmpty:
                let path = pick(files)
                let offset = number(0..<(maximumFileSize / 2))
                return .allocate(path, offset: offset, count: number(1..<(maximumFileSize - offset)))
            case 18 where !files.isEmpty:
                return .removeWhileOpen(pick(files))
            case 20...29:
                if let operation = chooseForking(directories: directories, files: files) { return operation }
            default:
                break
            }
        }
    }

    /// Pairs of `related` whose files both exist now.
    private var livePairs: [(String, String)] {
        related.filter { model.files[$0.0] != nil && model.files[$0.1] != nil && $0.0 != $0.1 }
    }

    /// A file to change in place: mostly one of a related pair, so that the change lands on a shared
    /// page.
    private mutating func pickChangeTarget(_ files: [String]) -> String? {
        let pairs = livePairs
        if !pairs.isEmpty, number(0..<4) != 0 {
            let pair = pick(pairs)
            return number(0..<2) == 0 ? pair.0 : pair.1
        }
        return files.isEmpty ? nil : pick(files)
    }

    private mutating func chooseForking(directories: [String], files: [String]) -> Operation? {
        let pageSize = PMemDevice.pageSize
        switch number(0..<10) {
        case 0...1 where !files.isEmpty && files.count < 24:
            let from = pick(files)
            return .clone(from, freshName(in: pick(directories), prefix: "c"))
        case 2:
            // A snapshot of a small subtree; never of the root, never when it would grow too big.
            let candidates = directories.filter { directory in
                directory != "/" && subtree(of: directory).files.count <= 6
                    && files.count + subtree(of: directory).files.count < 24
                    && directories.count + subtree(of: directory).directories.count < 10
            }
            guard !candidates.isEmpty else { return nil }
            let from = pick(candidates)
            let parent = pick(directories.filter { $0 != from && !$0.hasPrefix(from + "/") })
            return .clone(from, freshName(in: parent, prefix: "s"))
        case 3...4:
            guard let path = pickChangeTarget(files) else { return nil }
            let offset = number(0..<(maximumFileSize / 2))
            return .write(path, offset: offset, random.bytes(number(1..<min(12 << 10, maximumFileSize - offset))))
        case 5...6:
            guard let path = pickChangeTarget(files), let size = model.files[path]?.count, size > 0 else { return nil }
            let offset = number(0..<size)
            return .store(path, offset: offset, random.bytes(number(1..<(min(8 << 10, size - offset) + 1))))
        case 7:
            guard let path = pickChangeTarget(files), let size = model.files[path]?.count, size > 0 else { return nil }
            let pages = (size + pageSize - 1) / pageSize
            let first = number(0..<pages)
            return .migrate(path, offset: first * pageSize, count: number(1..<(pages - first + 1)) * pageSize)
        case 8:
            // A copy that shares nothing yet: dedup has equal, unshared pages to find.
            guard !files.isEmpty, files.count < 24 else { return nil }
            let from = pick(files)
            return .create(freshName(in: pick(directories), prefix: "k"), model.files[from]!)
        case 9:
            let pairs = livePairs
            guard !pairs.isEmpty else { return nil }
            let pair = pick(pairs)
            let (source, destination) = number(0..<2) == 0 ? pair : (pair.1, pair.0)
            let pages = min(model.files[source]!.count, model.files[destination]!.count) / pageSize
            guard pages > 0 else { return nil }
            let first = number(0..<pages)
            let offset = first * pageSize
            return .deduplicate(
                source, offset: offset, destination, destinationOffset: offset,
                count: number(1..<(pages - first + 1)) * pageSize)
        default:
            return nil
        }
    }

    /// The directories and files under `directory` (itself included), as paths relative to it.
    private func subtree(of directory: String) -> (directories: [String], files: [String: [UInt8]]) {
        let prefix = directory + "/"
        let directories = model.directories.filter { $0.hasPrefix(prefix) }.map {
            String($0.dropFirst(directory.count))
        }
        var files: [String: [UInt8]] = [:]
        for (path, bytes) in model.files where path.hasPrefix(prefix) {
            files[String(path.dropFirst(directory.count))] = bytes
        }
        return (directories, files)
    }

    private mutating func apply(_ operation: Operation) {
        switch operation {
        case .makeDirectory(let path): model.directories.insert(path)
        case .removeDirectory(let path): model.directories.remove(path)
        case .create(let path, let bytes):
            if forking, path.split(separator: "/").last?.hasPrefix("k") == true,
                let original = model.files.keys.sorted().first(where: { model.files[$0] == bytes && $0 != path })
            {
                related.append((original, path))
            }
            model.files[path] = bytes
        case .clone(let from, let to):
            if let bytes = model.files[from] {
                model.files[to] = bytes
                related.append((from, to))
            } else {
                let tree = subtree(of: from)
                model.directories.insert(to)
                for directory in tree.directories { model.directories.insert(to + directory) }
                for (relative, bytes) in tree.files.sorted(by: { $0.key < $1.key }) {
                    model.files[to + relative] = bytes
                    related.append((from + relative, to + relative))
                }
            }
        case .migrate, .deduplicate:
            break
        case .write(let path, let offset, let bytes), .store(let path, let offset, let bytes):
            var content = model.files[path]!
            if content.count < offset + bytes.count {
                content += [UInt8](repeating: 0, count: offset + bytes.count - content.count)
            }
            content.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
            model.files[path] = content
        case .truncate(let path, let size):
            var content = model.files[path]!
            if size < content.count {
                content.removeLast(content.count - size)
            } else {
                content += [UInt8](repeating: 0, count: size - content.count)
            }
            model.files[path] = content
        case .rename(let from, let to):
            model.files[to] = model.files.removeValue(forKey: from)
        case .remove(let path), .removeWhileOpen(let path):
            model.files[path] = nil
        case .punch(let path, let offset, let count):
            var content = model.files[path]!
            let end = min(offset + count, content.count)
            if offset < end { content.replaceSubrange(offset..<end, with: [UInt8](repeating: 0, count: end - offset)) }
            model.files[path] = content
        case .allocate(let path, let offset, let count):
            var content = model.files[path]!
            if content.count < offset + count {
                content += [UInt8](repeating: 0, count: offset + count - content.count)
            }
            model.files[path] = content
        }
    }
}

/// Carries out operations on a mounted file system.
public final class WorkloadRunner {
    /// The file system the operations run on.
    public let fs: DAXFileSystem
    /// Handles of removed files kept open (orphans), written to now and then.
    private var orphans: [DAXFile] = []

    /// A runner of operations on `fs`.
    public init(fs: DAXFileSystem) { self.fs = fs }

    /// Carries out `operation` on the file system, as the model does.
    public func perform(_ operation: Operation) throws {
        switch operation {
        case .makeDirectory(let path): try fs.createDirectory(path)
        case .removeDirectory(let path): try fs.remove(path)
        case .create(let path, let bytes):
            let file = try fs.create(path)
            defer { file.close() }
            try file.write(bytes, at: 0)
        case .write(let path, let offset, let bytes):
            let file = try fs.open(path)
            defer { file.close() }
            try file.write(bytes, at: offset)
        case .truncate(let path, let size):
            let file = try fs.open(path)
            defer { file.close() }
            try file.truncate(to: size)
        case .rename(let from, let to): try fs.rename(from, to: to)
        case .remove(let path): try fs.remove(path)
        case .punch(let path, let offset, let count):
            let file = try fs.open(path)
            defer { file.close() }
            try file.punchHole(offset: offset, count: count)
        case .allocate(let path, let offset, let count):
            let file = try fs.open(path)
            defer { file.close() }
            try file.allocate(offset: offset, count: count)
        case .removeWhileOpen(let path):
            let file = try fs.open(path)
            try fs.remove(path)
            try file.write([1, 2, 3], at: 8192)
            orphans.append(file)
            if orphans.count > 3 { orphans.removeFirst().close() }
        case .clone(let from, let to): try fs.clone(from, to: to)
        case .store(let path, let offset, let bytes):
            let file = try fs.open(path)
            defer { file.close() }
            let mapping = try file.map(count: file.size)
            defer { mapping.unmap() }
            bytes.withUnsafeBytes {
                (mapping.baseAddress + offset).copyMemory(from: $0.baseAddress!, byteCount: $0.count)
            }
            try file.sync()
        case .migrate(let path, let offset, let count):
            let file = try fs.open(path)
            defer { file.close() }
            _ = try file.migrate(offset: offset, count: count)
        case .deduplicate(let source, let offset, let destination, let destinationOffset, let count):
            _ = try fs.deduplicate(source, offset: offset, destination, offset: destinationOffset, count: count)
        }
    }

    /// Closes every handle the runner keeps open.
    public func closeAll() {
        for file in orphans { file.close() }
        orphans = []
    }
}
