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

/// Opens `path` to write what a command makes, as a shell redirection would: created (0644) when
/// missing, followed through a symbolic link, written into a device node or FIFO as it is, and
/// emptied only once it is known to be a regular file that is not the device at `device` (or a
/// link to it): writing a device's own file through its mapping would destroy it.
func openOutput(_ path: String, device: String) throws -> Int32 {
    let output = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o644)
    guard output >= 0 else { throw CommandError("cannot write \(path): \(String(cString: strerror(errno)))") }
    var written = stat()
    var ours = stat()
    if fstat(output, &written) == 0, stat(device, &ours) == 0, written.st_dev == ours.st_dev,
        written.st_ino == ours.st_ino
    {
        close(output)
        throw CommandError("cannot write \(path): it is the device itself (\(device))")
    }
    if written.st_mode & S_IFMT == S_IFREG, ftruncate(output, 0) != 0 {
        let reason = String(cString: strerror(errno))
        close(output)
        throw CommandError("cannot write \(path): \(reason)")
    }
    return output
}

/// Calls `body` with the byte ranges of `file` that have blocks, in order, cut in windows of at
/// most `pages` pages and clipped to its size, and whether each window starts a new run of
/// data (a hole came before it). A sparse file is walked in the time its extents take.
func forEachDataWindow(
    of file: DAXFile, pages: Int = 1 << 16, _ body: (_ offset: Int, _ count: Int, _ afterHole: Bool) throws -> Void
) throws {
    let size = file.size
    for data in try file.dataRanges(offset: 0, count: size) {
        var offset = data.lowerBound
        let end = min(data.upperBound, size)
        var first = true
        while offset < end {
            let count = min(pages * PMemDevice.pageSize, end - offset)
            try body(offset, count, first)
            first = false
            offset += count
        }
    }
}

/// Writes all of `bytes` to `output`, or throws naming `path`.
func writeAll(_ output: Int32, _ bytes: UnsafeRawBufferPointer, path: String) throws {
    var written = 0
    while written < bytes.count {
        let n = write(output, bytes.baseAddress! + written, bytes.count - written)
        if n < 0, errno == EINTR { continue }
        guard n > 0 else { throw CommandError("cannot write \(path): \(String(cString: strerror(errno)))") }
        written += n
    }
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
