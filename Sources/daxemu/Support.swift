import DAX
import Foundation

/// Whether stderr is a terminal: progress is shown only then.
let stderrIsTerminal = isatty(2) == 1

/// A one-line progress display on stderr, on a terminal only.
final class Progress: @unchecked Sendable {
    private let label: String
    private let lock = NSLock()
    private var lastPercent = -1

    init(_ label: String) { self.label = label }

    func update(_ fraction: Double) {
        guard stderrIsTerminal else { return }
        let percent = Int(min(max(fraction, 0), 1) * 100)
        lock.withLock {
            guard percent != lastPercent else { return }
            lastPercent = percent
            let bar = String(repeating: "#", count: percent / 5).padding(toLength: 20, withPad: ".", startingAt: 0)
            writeStderr("\r\(label) [\(bar)] \(percent)%")
        }
    }

    func finish() {
        guard stderrIsTerminal, lastPercent >= 0 else { return }
        writeStderr("\n")
    }
}

func writeStderr(_ text: String) {
    _ = text.withCString { write(2, $0, strlen($0)) }
}

extension DeviceOptions {
    /// Opens the device and mounts its file system around `body`, unmounting afterwards.
    func withFileSystem<T>(_ body: (DAXFileSystem) throws -> T) throws -> T {
        let device = try open()
        defer { device.close() }
        let fs = try DAXFileSystem.mount(device)
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

/// JSON text for plain values (dictionaries, arrays, strings, numbers, NSNull), keys sorted.
func jsonText(_ value: Any) throws -> String {
    let data = try JSONSerialization.data(
        withJSONObject: value,
        options: [
            .prettyPrinted, .sortedKeys,
            .withoutEscapingSlashes, .fragmentsAllowed,
        ])
    return String(decoding: data, as: UTF8.self)
}

/// `text` left-aligned in a column of `width`, never cut: a longer text keeps every character.
func padded(_ text: String, to width: Int) -> String {
    text.count >= width ? text : text.padding(toLength: width, withPad: " ", startingAt: 0)
}

/// "1 file", "2 files".
func count(_ n: Int, _ singular: String, _ plural: String? = nil) -> String {
    "\(n) \(n == 1 ? singular : plural ?? singular + "s")"
}
