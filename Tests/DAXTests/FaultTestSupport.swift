import DAX
import Foundation
import Synchronization

// Helpers of the fault tests (FaultTests.swift), built on the public API and the kernel only.

/// Whether this process may open `/dev/userfaultfd`: the full mode of userfaultfd, which also
/// resolves faults the kernel takes on the process's behalf (a `read(2)` into a mapping). Asked of
/// the kernel, not of the library, so that a library that claims no handler fails the tests.
let processMayOpenUserfaultfdDevice: Bool = {
    let descriptor = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC)
    guard descriptor >= 0 else { return false }
    close(descriptor)
    return true
}()

/// The kinds of mapping a file has: every fault rule holds for each.
enum MappingKind: String, CaseIterable, Sendable, CustomStringConvertible {
    /// A `.readWrite` mapping of the file opened `.readWrite`.
    case readWrite
    /// A `.readOnly` mapping of the file opened `.readWrite`.
    case readOnly
    /// A `.readOnly` mapping of the file opened `.readOnly` (the descriptor a reader of a public
    /// file has).
    case readOnlyOfReadOnlyFile

    var description: String { rawValue }

    /// Maps `count` bytes at `offset` of the file at `path`, whose owner opened it `.readWrite`.
    func map(_ fs: DAXFileSystem, _ owner: DAXFile, path: String, offset: Int = 0, count: Int) throws -> DAXMapping {
        switch self {
        case .readWrite: try owner.map(offset: offset, count: count, access: .readWrite)
        case .readOnly: try owner.map(offset: offset, count: count, access: .readOnly)
        case .readOnlyOfReadOnlyFile:
            try fs.open(path, access: .readOnly).map(offset: offset, count: count, access: .readOnly)
        }
    }
}

extension Statistics {
    /// Data blocks that belong to files now.
    var usedBlocks: Int { totalBlocks - freeBlocks - quarantinedBlocks }
}

/// The byte at `address`, read the way the kernel reads a user buffer: by `write(2)` of it into a
/// pipe. A page that would raise SIGBUS or SIGSEGV for a load answers `EFAULT` instead, and this
/// returns nil, so a test can look at a page that may fault without dying. In full userfaultfd
/// mode the kernel's access to a hole is a fault like a load's.
func kernelLoad(_ address: UnsafeRawPointer) -> UInt8? {
    var ends: [Int32] = [-1, -1]
    precondition(pipe(&ends) == 0, "pipe: errno \(errno)")
    defer {
        close(ends[0])
        close(ends[1])
    }
    guard write(ends[1], address, 1) == 1 else {
        precondition(errno == EFAULT, "write from \(address) into a pipe: errno \(errno), not EFAULT")
        return nil
    }
    var byte: UInt8 = 0
    precondition(read(ends[0], &byte, 1) == 1, "read from a pipe: errno \(errno)")
    return byte
}

/// Lines of `/proc/self/maps` (kernel mappings, VMAs) that meet `[address, address + count)`.
func kernelMappings(in address: UnsafeRawPointer, count: Int) -> Int {
    let start = UInt(bitPattern: address)
    let end = start + UInt(count)
    var mappings = 0
    for line in procSelfMaps().split(separator: "\n") {
        let range = line.prefix { $0 != " " }.split(separator: "-")
        guard range.count == 2, let low = UInt(range[0], radix: 16), let high = UInt(range[1], radix: 16) else {
            continue
        }
        if low < end, high > start { mappings += 1 }
    }
    return mappings
}

/// `/proc/self/maps`, read to its end (its size is 0 to `stat`).
private func procSelfMaps() -> String {
    let descriptor = open("/proc/self/maps", O_RDONLY | O_CLOEXEC)
    precondition(descriptor >= 0, "open /proc/self/maps: errno \(errno)")
    defer { close(descriptor) }
    var contents: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let got = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
        precondition(got >= 0, "read /proc/self/maps: errno \(errno)")
        if got == 0 { break }
        contents += chunk[0..<got]
    }
    return String(decoding: contents, as: UTF8.self)
}

/// An ordinary file under `/dev/shm` (not on the DAX file system), removed when the value goes:
/// the source of a `pread` into a mapping.
final class OrdinaryFile {
    let path: String
    let descriptor: Int32

    init(holding bytes: [UInt8]) throws {
        path = "/dev/shm/daxtest-\(getpid())-ordinary-\(UUID().uuidString.prefix(8))"
        descriptor = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        let written = bytes.withUnsafeBytes { pwrite(descriptor, $0.baseAddress, $0.count, 0) }
        guard written == bytes.count else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    }

    /// `pread(2)` of `count` bytes at `offset` of this file into `buffer`: the kernel stores into
    /// the buffer. Returns the count and `errno`.
    func pread(into buffer: UnsafeMutableRawPointer, count: Int, at offset: Int = 0) -> (Int, Int32) {
        errno = 0
        let got = Glibc.pread(descriptor, buffer, count, off_t(offset))
        return (got, errno)
    }

    deinit {
        close(descriptor)
        unlink(path)
    }
}

/// Allocates every block `fs` has left to a file of its own, `/filler`, in halving chunks, until
/// not even one more page fits.
func fillUp(_ fs: DAXFileSystem) throws {
    let filler = try fs.create("/filler")
    var chunk = fs.statistics().freeBlocks
    var offset = 0
    while chunk > 0 {
        do {
            try filler.allocate(offset: offset, count: chunk * PMemDevice.pageSize)
            offset += chunk * PMemDevice.pageSize
        } catch let error as DAXError where error.code == .noSpace {
            chunk /= 2
        }
    }
}

/// Threads that start a step together: each calls ``arrive()`` and returns once all have.
final class StartLine: Sendable {
    private let arrived = Atomic(0)
    private let count: Int

    init(_ count: Int) { self.count = count }

    func arrive() {
        arrived.wrappingAdd(1, ordering: .sequentiallyConsistent)
        while arrived.load(ordering: .sequentiallyConsistent) < count { sched_yield() }
    }
}
