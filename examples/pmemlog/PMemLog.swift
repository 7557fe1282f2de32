import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

/// An append-only log in one DAX file, after PMDK's pmemlog: append, walk, rewind.
///
/// The file starts with a 4 KiB header whose first word is magic and whose second is the end of
/// the log (a file offset). A record is `length (8) | bytes`, padded to 8. `append` writes the
/// record past the end and persists it, then moves the end with one aligned 8-byte store and
/// persists that: a crash leaves either the old log or the new one. `rewind` stores the start.
final class PersistentLog {
    static let magic: UInt64 = 0x01_474F_4C58_4144  // "DAXLOG\x01"
    static let start = 4096

    let file: DAXFile
    private(set) var mapping: DAXMapping

    init(fileSystem fs: DAXFileSystem, path: String, create: Bool) throws {
        // A log is made whole in an unnamed file and linked at `path` (DAX's createAtomically),
        // so a kill while making it leaves no half-made log there.
        do {
            file = create ? try fs.openOrCreate(path) { try Self.build(in: $0) } : try fs.open(path)
        } catch let error as DAXError where error.code == .notFound && !create {
            throw CommandError("no log at \(path) (`pmemlog append` creates one)")
        }
        guard file.size >= Self.start else { throw CommandError("\(path) is not a log (too small)") }
        mapping = try file.map(count: file.size)
        guard load(0) == Self.magic else { throw CommandError("\(path) is not a log") }
        // Range-checked as an unsigned value: a damaged pointer must not trap on its way to Int.
        guard (UInt64(Self.start)...UInt64(file.size)).contains(load(8)) else {
            throw CommandError("\(path) has a damaged end pointer")
        }
    }

    /// Where the next record goes (checked against the file's size when the log was opened).
    var end: Int { Int(truncatingIfNeeded: load(8)) }

    func append(_ bytes: [UInt8]) throws {
        let size = 8 + (bytes.count + 7) / 8 * 8
        let offset = end
        if offset + size > mapping.count {
            var newSize = mapping.count
            while newSize < offset + size { newSize *= 2 }
            // Blocks first, all or nothing: a full device leaves the log readable as it was.
            try file.allocate(offset: mapping.count, count: newSize - mapping.count)
            mapping.unmap()
            mapping = try file.map(count: newSize)
        }
        var record = [UInt8](repeating: 0, count: size)
        withUnsafeBytes(of: UInt64(bytes.count).littleEndian) { record.replaceSubrange(0..<8, with: $0) }
        record.replaceSubrange(8..<(8 + bytes.count), with: bytes)
        record.withUnsafeBytes { mapping.copy($0, toOffset: offset) }
        store(UInt64(offset + size), at: 8)
    }

    /// Lays a new, empty log out in the empty `file`: 1 MiB of blocks, then the header.
    private static func build(in file: DAXFile) throws {
        try file.allocate(offset: 0, count: 1 << 20)
        var header = [UInt8](repeating: 0, count: 16)
        withUnsafeBytes(of: magic.littleEndian) { header.replaceSubrange(0..<8, with: $0) }
        withUnsafeBytes(of: UInt64(start).littleEndian) { header.replaceSubrange(8..<16, with: $0) }
        try file.write(header, at: 0)
    }

    /// Calls `body` with each record, oldest first. A damaged record (a length past the end, or
    /// an end pointer that cuts a record header) ends the walk with an error saying where, after
    /// `body` has had every record before it.
    func walk(_ body: ([UInt8]) -> Void) throws {
        var offset = Self.start
        var records = 0
        let end = end
        while offset < end {
            let length = end - offset >= 8 ? load(offset) : nil
            guard let length, length <= UInt64(end - offset - 8) else {
                let claim =
                    length.map { "says it holds \($0) bytes" } ?? "has only \(end - offset) of its 8 header bytes"
                throw CommandError(
                    "\(file.path) is damaged: the record at offset \(offset) \(claim), past the log's end at \(end) "
                        + "(\(counted(records, "record")) before it)")
            }
            let count = Int(length)
            body([UInt8](UnsafeRawBufferPointer(start: mapping.baseAddress + offset + 8, count: count)))
            records += 1
            offset += 8 + (count + 7) / 8 * 8
        }
    }

    func rewind() { store(UInt64(Self.start), at: 8) }

    func close() {
        mapping.unmap()
        file.close()
    }

    private func load(_ offset: Int) -> UInt64 {
        UInt64(littleEndian: mapping.baseAddress.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }

    /// One aligned 8-byte store, persisted: the log's commit.
    private func store(_ value: UInt64, at offset: Int) {
        (mapping.baseAddress + offset).storeBytes(of: value.littleEndian, as: UInt64.self)
        mapping.persist(offset: offset, count: 8)
    }
}

struct LogOptions: ParsableArguments {
    @Option(help: "The device (default $DAXEMU_DEVICE, else /dev/shm/daxemu); it must hold a DAX file system.")
    var device: String?

    @Option(help: "The log's file in the DAX file system.")
    var file = "/pmemlog"

    func validate() throws {
        try requireDeviceOption(device)
        try requireDevicePath(file)
    }

    /// Opens device, file system and log around `body`; only `append` creates a log.
    func withLog<T>(creating create: Bool = false, _ body: (PersistentLog) throws -> T) throws -> T {
        let path = device ?? PMemDevice.defaultPath
        let opened = try openCommandDevice(path)
        defer { opened.close() }
        let fs = try DAXFileSystem.mount(opened)
        defer { try? fs.unmount() }
        let log = try PersistentLog(fileSystem: fs, path: file, create: create)
        defer { log.close() }
        return try body(log)
    }
}

@main
struct PMemLog: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pmemlog", abstract: "An append-only, crash-safe log on a DAX mapping.",
        subcommands: [Append.self, Walk.self, Rewind.self, Explore.self])

    @OptionGroup var options: LogOptions

    static func main() { mainReportingErrors() }
}

struct Append: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Append each argument as a record.")
    @ParentCommand var root: PMemLog
    var options: LogOptions { root.options }
    @Argument var records: [String]

    func run() throws {
        try options.withLog(creating: true) { log in for record in records { try log.append(Array(record.utf8)) } }
    }
}

struct Walk: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print every record, oldest first, one a line.",
        discussion:
            "A newline, tab, other control character or backslash in a record is shown escaped (\\n, \\t, \\u{1B}, \\\\)."
    )
    @ParentCommand var root: PMemLog
    var options: LogOptions { root.options }

    func run() throws {
        try options.withLog { log in try log.walk { print(escapedForDisplay($0)) } }
    }
}

struct Rewind: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Empty the log.")
    @ParentCommand var root: PMemLog
    var options: LogOptions { root.options }

    func run() throws { try options.withLog { $0.rewind() } }
}
