import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

struct MapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Draw the device's pages, or some frames, or a file's: metadata, free, file data.",
        discussion: """
            Mappings and pins belong to the process that makes them, as in the kernel; this command \
            shows the device as a fresh mount sees it. `daxemu demo` draws them live.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument(help: "A file: draw the frames from its first page's to its last's, its pages marked F.")
    var file: String?

    @Option(help: "The frames to draw, FIRST-LAST or one frame (default: the whole device, or the file's).")
    var frames: FrameRange?

    @Option(help: "Also write an SVG picture to this file.")
    var svg: String?

    @Option(help: "Cells per line of the terminal picture.")
    var columns = 64

    func validate() throws {
        guard (1...4096).contains(columns) else { throw ValidationError("--columns is 1 to 4096, not \(columns)") }
        if let file { try requireDevicePath(file) }
        if svg?.isEmpty == true { throw ValidationError("--svg names no file: give a file name for the picture") }
    }

    func run() throws {
        if let svg { try checkCanWrite(svg, what: "the picture") }
        let picture = try device.withFileSystem(access: .readOnly) { fs in
            var range = frames.map { $0.first..<($0.last + 1) }
            var selected: (frames: Set<Int>, path: String)?
            if let file {
                let attributes = try fs.attributes(of: file)
                guard attributes.kind == .file else {
                    throw CommandError("\(file) is a directory; map draws a file's pages")
                }
                let frames = try Self.frames(of: file, in: fs)
                selected = (frames, file)
                if range == nil {
                    guard let lowest = frames.min(), let highest = frames.max() else {
                        throw CommandError("\(file) has no blocks on the device (it is empty or a hole)")
                    }
                    range = lowest..<(highest + 1)
                }
            }
            if let range, range.upperBound > fs.device.pageCount {
                throw ValidationError(
                    "--frames \(range.lowerBound)-\(range.upperBound - 1) goes past the device's last frame, "
                        + "\(fs.device.pageCount - 1)")
            }
            return PagePicture(fileSystem: fs, device: fs.device, frames: range, selected: selected)
        }
        print(picture.terminal(columns: columns))
        if let svg {
            // Written as a redirection writes: through a link, into what is there (never the
            // device itself), not renamed over it.
            let output = try openOutput(svg, device: device.path)
            defer { close(output) }
            let document = Array(picture.svgDocument().utf8)
            try document.withUnsafeBytes { try writeAll(output, $0, path: svg) }
            print("wrote \(svg)")
        }
    }

    /// The frames from the lowest to the highest that holds a page of `file`.
    /// The frames that hold `file`'s data, its own blocks and those it shares with a clone alike.
    static func frames(of file: String, in fs: DAXFileSystem) throws -> Set<Int> {
        let handle = try fs.open(file, access: .readOnly)
        defer { handle.close() }
        var frames = Set<Int>()
        try forEachDataWindow(of: handle, pages: Frames.window) { offset, count, _ in
            for case let frame? in try handle.frames(offset: offset, count: count) {
                frames.insert(Int(frame.rawValue))
            }
        }
        return frames
    }
}

/// `FIRST-LAST` or `FRAME`: frames of the device, both ends included.
struct FrameRange: ExpressibleByArgument {
    var first: Int
    var last: Int

    init?(argument: String) {
        let parts = argument.split(separator: "-", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let first = Int(parts[0]), let last = Int(parts.last!), first >= 0,
            first <= last
        else { return nil }
        self.first = first
        self.last = last
    }
}
