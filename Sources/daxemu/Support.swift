import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

/// Whether stderr is a terminal: progress is shown only then.
let stderrIsTerminal = isatty(2) == 1

/// A one-line progress display on stderr, on a terminal only.
final class Progress: @unchecked Sendable {
    private let label: String
    private let lock = NSLock()
    private let shown: Bool
    private var lastPercent = -1

    /// A display that is `shown` only on a terminal, and only when `shown` is set.
    init(_ label: String, shown: Bool = true) {
        self.label = label
        self.shown = shown && stderrIsTerminal
    }

    func update(_ fraction: Double) {
        guard shown else { return }
        let percent = Int(min(max(fraction, 0), 1) * 100)
        lock.withLock {
            guard percent != lastPercent else { return }
            lastPercent = percent
            let bar = String(repeating: "#", count: percent / 5).padding(toLength: 20, withPad: ".", startingAt: 0)
            writeStderr("\r\(label) [\(bar)] \(percent)%")
        }
    }

    func finish() {
        guard shown, lastPercent >= 0 else { return }
        writeStderr("\n")
    }
}

func writeStderr(_ text: String) {
    _ = text.withCString { write(2, $0, strlen($0)) }
}

extension DeviceOptions {
    /// Opens the device and mounts its file system around `body`, unmounting afterwards. A command
    /// that only reads passes `.readOnly`: the device is opened for reading only and nothing on it
    /// changes, so a device the user may only read can be inspected.
    func withFileSystem<T>(access: Access = .readWrite, _ body: (DAXFileSystem) throws -> T) throws -> T {
        let device = try open(readOnly: access == .readOnly)
        defer { device.close() }
        let fs = try DAXFileSystem.mount(device, access: access)
        if fs.isDegraded {
            // A read-only mount of a damaged device reads what is intact: say what is not.
            writeStderr(
                "daxemu: warning: the file system is damaged (\(fs.damage.first ?? "see fsck"))"
                    + "\(fs.damage.count > 1 ? " and \(fs.damage.count - 1) more" : ""); only intact files can be read; "
                    + "`daxemu fsck --repair` repairs it\n")
        }
        do {
            let result = try body(fs)
            try fs.unmount()
            return result
        } catch {
            try? fs.unmount()
            throw error
        }
    }
}

/// JSON text for what a command prints: camelCase keys (the library's property names), sorted,
/// pretty-printed.
func jsonText(_ value: some Encodable) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

/// `text` left-aligned in a column of `width`, never cut: a longer text keeps every character.
func padded(_ text: String, to width: Int) -> String {
    text.count >= width ? text : text.padding(toLength: width, withPad: " ", startingAt: 0)
}

/// The directory that holds `path` (`/` for `/` itself).
func parentPath(of path: String) -> String {
    var components = path.split(separator: "/")
    _ = components.popLast()
    return "/" + components.joined(separator: "/")
}

/// The last component of `path`.
func lastComponent(of path: String) -> String {
    path.split(separator: "/").last.map(String.init) ?? path
}

/// Throws a bad-argument error unless `path` names something on the device: an absolute path.
func requireDevicePath(_ path: String) throws {
    guard path.hasPrefix("/") else {
        throw ValidationError("\(escapedForDisplay(path)): paths on the device start with /")
    }
}
