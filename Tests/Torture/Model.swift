import DAX

/// What a file system should hold: directories and files with their bytes.
public struct Model: Equatable, Sendable, CustomStringConvertible {
    /// Paths of the directories, the root included.
    public var directories: Set<String> = ["/"]
    /// Each file's path and bytes.
    public var files: [String: [UInt8]] = [:]

    /// An empty file system: only the root.
    public init() {}

    /// Reads the whole tree of a mounted file system.
    public init(reading fs: DAXFileSystem) throws {
        var pending = ["/"]
        while let directory = pending.popLast() {
            for name in try fs.contentsOfDirectory(directory) {
                let path = directory == "/" ? "/" + name : directory + "/" + name
                do {
                    let file = try fs.open(path, access: .readOnly)
                    defer { file.close() }
                    files[path] = try file.read(count: file.size, at: 0)
                } catch let error as DAXError where error.code == .isADirectory {
                    directories.insert(path)
                    pending.append(path)
                }
            }
        }
    }

    /// Every directory and file with its size, one per line.
    public var description: String {
        let dirs = directories.sorted().joined(separator: " ")
        let fileList = files.keys.sorted().map { "\($0)(\(files[$0]!.count))" }.joined(separator: " ")
        return "dirs: \(dirs); files: \(fileList)"
    }

    /// Same names, kinds and sizes; contents equal except for `lenient` files.
    public func matches(_ other: Model, lenient: Set<String> = []) -> Bool {
        guard directories == other.directories, Set(files.keys) == Set(other.files.keys) else { return false }
        for (path, bytes) in files {
            guard let theirs = other.files[path], theirs.count == bytes.count else { return false }
            if !lenient.contains(path), theirs != bytes { return false }
        }
        return true
    }

    func children(of directory: String) -> [String] {
        let prefix = directory == "/" ? "/" : directory + "/"
        return (Array(directories) + Array(files.keys)).filter {
            $0 != directory && $0.hasPrefix(prefix) && !$0.dropFirst(prefix.count).contains("/")
        }
    }
}

/// A small deterministic random generator (SplitMix64).
public struct SeededRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64

    /// A generator whose sequence `seed` fixes.
    public init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }

    /// The next 64 random bits.
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// `count` random bytes.
    public mutating func bytes(_ count: Int) -> [UInt8] {
        var result: [UInt8] = []
        result.reserveCapacity(count)
        while result.count < count {
            let word = next()
            for shift in stride(from: 0, to: 64, by: 8) where result.count < count {
                result.append(UInt8(truncatingIfNeeded: word >> UInt64(shift)))
            }
        }
        return result
    }
}
