import ArgumentParser
import CommandLineSupport
import DAX
import Glibc

/// One line on stderr.
private func warn(_ line: String) { writeStderr(line + "\n") }

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a device file (refuses an existing one).")

    @OptionGroup var device: DeviceOptions

    @Option(name: .shortAndLong, help: "Size: a multiple of 4096 of at least 2M, e.g. 64M, 1G.")
    var size: ByteCount = ByteCount(bytes: 1 << 30)

    @Flag(
        help: """
            Create the file sparse: instant, and it may be larger than the free space; blocks get \
            storage as files use them, and a full /dev/shm is then a 'no space' error.
            """)
    var sparse = false

    func validate() throws {
        try size.validate(
            "--size", multipleOf: PMemDevice.pageSize, in: PMemDevice.minimumSize...PMemDevice.maximumSize)
    }

    func run() throws {
        try Self.checkPlace(for: device.path, size: size.bytes, sparse: sparse)
        var options = device.options
        options.sparse = sparse
        let created = try PMemDevice.create(path: device.path, size: size.bytes, options: options)
        defer { created.close() }
        print("created \(created.path): \(ByteCount.format(created.size)), \(counted(created.pageCount, "page"))")
    }

    /// Says in the user's words why a device cannot be made at `path`, before the library tries:
    /// something already there, a missing directory, too little room.
    static func checkPlace(for path: String, size: Int, sparse: Bool) throws {
        var info = stat()
        if lstat(path, &info) == 0 {
            if info.st_mode & S_IFMT == S_IFDIR {
                throw CommandError("cannot create device \(path): it is a directory; give a file name in it")
            }
            throw CommandError(
                "cannot create device \(path): it already exists (`daxemu format` reuses it; remove it to start anew)")
        }
        let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let shown = directory.isEmpty ? "/" : directory
        guard stat(shown, &info) == 0 else {
            let code = errno
            let reason = code == ENOENT || code == ENOTDIR ? "no such directory" : String(cString: strerror(code))
            throw CommandError("cannot create device \(path): \(shown): \(reason)")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else {
            throw CommandError("cannot create device \(path): \(shown) is not a directory")
        }
        var space = statvfs()
        if statvfs(shown, &space) == 0 {
            let free = Int(space.f_bavail) &* Int(space.f_frsize)
            if size > free, sparse {
                warn(
                    "warning: \(ByteCount.format(size)) requested, \(ByteCount.format(free)) free in \(shown); "
                        + "the sparse device fills up before its end")
            }
            guard size <= free || sparse else {
                throw CommandError(
                    "cannot create device \(path): \(ByteCount.format(size)) requested, "
                        + "\(ByteCount.format(free)) free in \(shown) (--sparse allows a larger one)")
            }
        }
    }
}
