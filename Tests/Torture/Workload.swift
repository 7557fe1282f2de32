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
        }
    }

    /// The file whose contents the operation changes, if it changes one in place.
    public var fileChangedInPlace: String? {
        switch self {
        case .write(let path, _, _), .truncate(let path, _), .punch(let path, _, _), .allocate(let path, _, _):
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

    /// A generator that starts from `model`, repeatable from `seed`.
    public init(model: Model, seed: UInt64, maximumFileSize: Int = 48 << 10) {
        self.model = model
        self.random = SeededRandom(seed: seed)
        self.maximumFileSize = maximumFileSize
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
            switch number(0..<20) {
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
            default:
                break
            }
        }
    }

    private mutating func apply(_ operation: Operation) {
        switch operation {
        case .makeDirectory(let path): model.directories.insert(path)
        case .removeDirectory(let path): model.directories.remove(path)
        case .create(let path, let bytes): model.files[path] = bytes
        case .write(let path, let offset, let bytes):
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
        }
    }

    /// Closes every handle the runner keeps open.
    public func closeAll() {
        for file in orphans { file.close() }
        orphans = []
    }
}
