import ArgumentParser
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

    func run() throws {
        guard columns > 0 else { throw CommandError("--columns must be positive") }
        let picture = try device.withFileSystem { fs in PagePicture(fileSystem: fs, device: fs.device) }
        print(picture.terminal(columns: columns))
        if let svg {
            do {
                try picture.svgDocument().write(toFile: svg, atomically: true, encoding: .utf8)
            } catch {
                throw CommandError("cannot write \(svg): \(error.localizedDescription)")
            }
            print("wrote \(svg)")
        }
    }
}
