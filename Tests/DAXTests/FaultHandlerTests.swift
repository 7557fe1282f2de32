import Foundation
import Testing

@testable import DAX

/// The fault handler from the inside: what each fault leaves in the mapping, the file and the
/// counts (the black-box cases are in FaultTests).
@Suite("Fault handler")
struct FaultHandlerTests {
    @Test("a load of a hole reads zeros and allocates nothing; a store then allocates one block, shown in every mapping")
    func holeLoadThenStore() throws {
        let t = try TemporaryFileSystem()
        #expect(t.fs.faultHandling == .userfaultfd)
        let file = try t.fs.create("/f")
        try file.truncate(to: 4 * 4096)
        let used = t.fs.statistics().freeBlocks
        let first = try file.map(count: 4 * 4096)
        let second = try file.map(count: 4 * 4096)
        defer {
            first.unmap()
            second.unmap()
        }
        #expect(first.baseAddress.load(fromByteOffset: 4096 + 5, as: UInt8.self) == 0)
        #expect(try file.frames(offset: 4096, count: 4096) == [nil])
        #expect(t.fs.statistics().freeBlocks == used)
        #expect(t.fs.statistics().faults.zeroPage == 1)
        // The second mapping reads the hole too, then the first stores.
        #expect(second.baseAddress.load(fromByteOffset: 4096 + 5, as: UInt8.self) == 0)
        first.baseAddress.storeBytes(of: 0xA5, toByteOffset: 4096 + 5, as: UInt8.self)
        #expect(t.fs.statistics().faults.allocating == 1)
        #expect(t.fs.statistics().freeBlocks == used - 1)
        #expect(try file.frames(offset: 4096, count: 4096).first! != nil)
        #expect(second.baseAddress.load(fromByteOffset: 4096 + 5, as: UInt8.self) == 0xA5)
        #expect(try file.read(count: 1, at: 4096 + 5) == [0xA5])
        #expect(try t.fs.check().problems.isEmpty)
    }

    @Test("truncate down then up: the old mapping reads zeros in the regrown range, and a store allocates")
    func truncateDownAndUp() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.write([UInt8](repeating: 0x33, count: 2 * 4096), at: 0)
        let mapping = try file.map(count: 2 * 4096)
        defer { mapping.unmap() }
        #expect(mapping.baseAddress.load(fromByteOffset: 4096, as: UInt8.self) == 0x33)
        try file.truncate(to: 0, ifBusy: .fail)
        try file.truncate(to: 2 * 4096, ifBusy: .fail)
        #expect(mapping.baseAddress.load(fromByteOffset: 4096, as: UInt8.self) == 0)
        mapping.baseAddress.storeBytes(of: 0x44, toByteOffset: 5, as: UInt8.self)
        #expect(try file.read(count: 6, at: 0) == [0, 0, 0, 0, 0, 0x44])
        #expect(try t.fs.check().problems.isEmpty)
    }

    @Test("pread from an ordinary file into a hole of a mapping fills the hole")
    func preadIntoHole() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.truncate(to: 4096)
        let mapping = try file.map(count: 4096)
        defer { mapping.unmap() }
        let path = TemporaryDevice.uniquePath("ordinary")
        let fd = open(path, O_RDWR | O_CREAT, 0o600)
        defer {
            close(fd)
            unlink(path)
        }
        let bytes = [UInt8](repeating: 0x99, count: 4096)
        #expect(pwrite(fd, bytes, 4096, 0) == 4096)
        #expect(pread(fd, mapping.baseAddress, 4096, 0) == 4096)
        #expect(try file.read(count: 4096, at: 0) == bytes)
    }

    @Test("sync flushes only what was stored since the last sync")
    func syncWritesBackDirtyPages() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.allocate(offset: 0, count: 64 * 4096)
        let mapping = try file.map(count: 64 * 4096)
        defer { mapping.unmap() }
        #expect(mapping.writeBack() == 64)
        #expect(mapping.writeBack() == 0)
        mapping.baseAddress.storeBytes(of: 1, toByteOffset: 7 * 4096, as: UInt8.self)
        mapping.baseAddress.storeBytes(of: 1, toByteOffset: 9 * 4096, as: UInt8.self)
        #expect(mapping.writeBack() == 2)
        try file.sync()
        #expect(try file.read(count: 1, at: 9 * 4096) == [1])
    }
}
