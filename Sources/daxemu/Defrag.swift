import ArgumentParser
import CommandLineSupport
import DAX

struct Defrag: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Move a file's pages into as few extents as the free space allows (page migration).",
        discussion: """
            Each page is moved to a new block under a freeze and the old block freed; a page that \
            something pins stays where it is and is reported. The file's bytes do not change.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The file to defragment.")
    var file: String

    func validate() throws { try requireDevicePath(file) }

    func run() throws {
        try device.withFileSystem { fs in
            let handle = try fs.open(file)
            defer { handle.close() }
            let before = try Self.extentCount(handle)
            let result = try handle.migrate(offset: 0, count: handle.size)
            let after = try Self.extentCount(handle)
            print(
                "\(file): moved \(counted(result.migrated, "page")); \(counted(before, "extent")) before, \(after) after"
                    + (result.busy.isEmpty ? "" : "; \(counted(result.busy.count, "pinned page")) left in place"))
        }
    }

    /// Runs of consecutive frames among the file's pages (holes end a run).
    static func extentCount(_ handle: DAXFile) throws -> Int {
        var runs = 0
        var last: PageFrameNumber?
        let window = 1 << 16
        var page = 0
        let pages = (handle.size + PMemDevice.pageSize - 1) / PMemDevice.pageSize
        while page < pages {
            let count = min(window, pages - page)
            let frames = try handle.frames(
                offset: page * PMemDevice.pageSize,
                count: min(count * PMemDevice.pageSize, handle.size - page * PMemDevice.pageSize))
            for frame in frames {
                if let frame, last.map({ $0.rawValue + 1 == frame.rawValue }) != true { runs += 1 }
                last = frame
            }
            page += count
        }
        return runs
    }
}
