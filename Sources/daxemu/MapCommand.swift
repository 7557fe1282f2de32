import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

struct MapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Draw the device's pages: metadata, free, file data (and mapped, pinned, quarantined).",
        discussion: """
            Mappings and pins belong to the process that makes them, as in the kernel; this command \
            shows the device as a fresh mount sees it. `daxemu demo` draws them live.
            """)

    @OptionGroup var device: DeviceOptions

    @Option(help: "Also write an SVG picture to this file.")
    var svg: String?

    @Option(help: "Cells per line of the terminal picture.")
    var columns = 64

    func validate() throws {
        guard (1...4096).contains(columns) else { throw ValidationError("--columns is 1 to 4096, not \(columns)") }
    }

    func run() throws {
        if let svg { try Self.checkWritable(svg) }
        let picture = try device.withFileSystem { fs in PagePicture(fileSystem: fs, device: fs.device) }
        print(picture.terminal(columns: columns))
        if let svg {
            do {
                try picture.svgDocument().write(toFile: svg, atomically: true, encoding: .utf8)
            } catch {
                // Foundation's own text names a Cocoa error domain; the POSIX cause is more use.
                let cause = (error as NSError).userInfo[NSUnderlyingErrorKey] as? NSError
                let reason = cause.map { String(cString: strerror(Int32($0.code))) } ?? error.localizedDescription
                throw CommandError("cannot write \(svg): \(reason)")
            }
            print("wrote \(svg)")
        }
    }

    /// Refuses, before anything is drawn, a picture file that cannot be written: a directory, or
    /// one whose directory is missing or not writable.
    static func checkWritable(_ path: String) throws {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue {
            throw CommandError("cannot write \(path): it is a directory; give a file name for the picture")
        }
        let directory = (path as NSString).deletingLastPathComponent
        let shown = directory.isEmpty ? "." : directory
        guard FileManager.default.fileExists(atPath: shown, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw CommandError("cannot write \(path): \(shown): no such directory")
        }
        guard access(shown, W_OK) == 0 else {
            throw CommandError("cannot write \(path): \(shown): \(String(cString: strerror(errno)))")
        }
    }
}
