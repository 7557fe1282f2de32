import ArgumentParser
import CommandLineSupport
import DAX

struct Defrag: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Move a file's pages into as few extents as the free space allows (page migration).",
        discussion: """
            Each page is moved to a new block under a freeze and the old block freed; a page that \
            something pins stays where it is and is reported, and so does a page shared with another \
            file (a clone, a snapshot, dedup), which moving would repoint in every file naming it. A \
            file already in one extent, or in no more extents than the free space could give it, is \
            left alone. The file's bytes do not change.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument(help: "The file to defragment.")
    var file: String

    func validate() throws { try requireDevicePath(file) }

    func run() throws {
        try device.withFileSystem { fs in
            let attributes = try fs.attributes(of: file)
            guard attributes.kind == .file else {
                throw CommandError("cannot defragment \(escapedForDisplay(file)): it is a directory")
            }
            let handle = try fs.open(file)
            defer { handle.close() }
            let name = escapedForDisplay(file)
            let before = try Self.extentCount(handle)
            guard before > 1 else {
                print("\(name): \(before == 0 ? "no blocks" : "already in one extent"); nothing moved")
                return
            }
            let shared = try sharedBlockCount(handle, blocks: attributes.blocks)
            let movable = attributes.blocks - shared
            guard movable > 0 else {
                print("\(name): every block is shared with another file, and stays; nothing moved")
                return
            }
            let best = Self.fewestExtents(fs, holding: movable)
            guard let best, best < before else {
                print(
                    "\(name): \(counted(before, "extent")); the free space could not hold it in fewer "
                        + "(\(best.map { "\(counted($0, "extent")) at best" } ?? "not enough room")); nothing moved")
                return
            }
            let result = try handle.migrate(offset: 0, count: handle.size)
            let after = try Self.extentCount(handle)
            var line =
                "\(name): moved \(counted(result.migrated, "page")); \(counted(before, "extent")) before, \(after) after"
            if !result.busy.isEmpty {
                line +=
                    "; \(counted(result.busy.count, "pinned page")) left in place (pages \(Self.spans(result.busy)))"
            }
            if shared > 0 { line += "; \(counted(shared, "shared page")) left in place" }
            print(line)
        }
    }

    /// Runs of consecutive frames among the file's pages (holes end a run).
    static func extentCount(_ handle: DAXFile) throws -> Int {
        var runs = 0
        var last: PageFrameNumber?
        try forEachDataWindow(of: handle) { offset, count, afterHole in
            if afterHole { last = nil }
            for frame in try handle.frames(offset: offset, count: count) {
                if let frame, last.map({ $0.rawValue + 1 == frame.rawValue }) != true { runs += 1 }
                last = frame
            }
        }
        return runs
    }

    /// The fewest runs of free data blocks that hold `pages` blocks (the largest runs first), or
    /// nil when the free space is too small: the best a migration can do. The scan stops at the
    /// first run that holds them all.
    static func fewestExtents(_ fs: DAXFileSystem, holding pages: Int) -> Int? {
        guard pages > 0 else { return 0 }
        var runs: [Int] = []
        var current = 0
        for raw in fs.layout.data.lowerBound.rawValue..<fs.layout.data.upperBound.rawValue {
            let state = fs.pages.state(of: PageFrameNumber(rawValue: raw))
            if !state.isAllocated, !state.isQuarantined {
                current += 1
                if current >= pages { return 1 }
            } else if current > 0 {
                runs.append(current)
                current = 0
            }
        }
        if current > 0 { runs.append(current) }
        var held = 0
        for (index, run) in runs.sorted(by: >).enumerated() {
            held += run
            if held >= pages { return index + 1 }
        }
        return nil
    }

    /// `3, 7-9, 12`; after eight spans, `and N more`.
    static func spans(_ pages: [Int]) -> String {
        var parts: [String] = []
        var index = 0
        while index < pages.count {
            var end = index
            while end + 1 < pages.count, pages[end + 1] == pages[end] + 1 { end += 1 }
            parts.append(end == index ? "\(pages[index])" : "\(pages[index])-\(pages[end])")
            index = end + 1
        }
        guard parts.count > 8 else { return parts.joined(separator: ", ") }
        return parts.prefix(8).joined(separator: ", ") + " and \(parts.count - 8) more"
    }
}
