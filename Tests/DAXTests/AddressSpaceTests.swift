import Foundation
import Testing

@testable import DAX

/// The mapping layer's address space of a file: shared by every handle and mapping of the file,
/// and never re-entering the file system from a mapping's deinit.
@Suite("Address spaces")
struct AddressSpaceTests {
    let t: TemporaryDevice
    let fs: DAXFileSystem

    init() throws {
        t = try TemporaryDevice(size: 16 << 20)
        fs = try DAXFileSystem.format(t.device)
    }

    @Test("every handle and mapping of one file shares one address space; a new one once all are gone")
    func oneAddressSpacePerFile() throws {
        let first = try fs.create("/f")
        try first.write([UInt8](repeating: 9, count: 4 * PMemDevice.pageSize), at: 0)
        let second = try fs.open("/f", access: .readOnly)
        let other = try fs.create("/g")
        #expect(first.space === second.space)
        #expect(first.space !== other.space)
        let mapping = try second.map(count: 4 * PMemDevice.pageSize, access: .readOnly)
        #expect(mapping.space === first.space)

        // A truncate through one handle takes the pages out of a mapping made through the other.
        try first.truncate(to: PMemDevice.pageSize)
        #expect(mapping.frame(at: 1) == nil)
        #expect(mapping.frame(at: 0) != nil)

        mapping.unmap()
        first.close()
        second.close()
        other.close()
        // Nothing holds the old space: a fresh one serves the next open, with nothing in it.
        let again = try fs.open("/f")
        #expect(again.space.liveMappings.isEmpty)
        #expect(fs.spaces.space(for: again.inode) === again.space)
    }

    @Test("a removed file's last mapping dropped inside an operation is freed when the operation ends")
    func deferredReclaimInsideOperation() throws {
        let file = try fs.create("/removed")
        try file.write([UInt8](repeating: 7, count: 8 * PMemDevice.pageSize), at: 0)
        var mapping: DAXMapping? = try file.map(count: 8 * PMemDevice.pageSize)
        try fs.remove("/removed")
        file.close()
        let held = fs.statistics().freeBlocks
        let inode = file.inode

        // Dropped with the inode's lock held, as code that looked the mappings up would: freeing
        // the file then would need that lock. It is freed once the operation is over.
        var freeInside = 0
        fs.namespace.run {
            inode.contents.write { _ in
                mapping = nil
                freeInside = fs.allocator.freeBlocks
            }
            #expect(!inode.isFreed)
        }
        #expect(freeInside == held)
        #expect(inode.isFreed)
        #expect(fs.statistics().freeBlocks == held + 8)
        #expect(fs.namespace.orphans.withTrackedLock { $0.isEmpty })
        #expect(try fs.check().isClean)
    }

    @Test("a removed file's last mapping dropped outside any operation is freed at once")
    func immediateReclaimOutsideOperations() throws {
        let file = try fs.create("/removed")
        try file.write([UInt8](repeating: 1, count: 3 * PMemDevice.pageSize), at: 0)
        var mapping: DAXMapping? = try file.map(count: 3 * PMemDevice.pageSize)
        try fs.remove("/removed")
        file.close()
        let held = fs.allocator.freeBlocks
        #expect(OperationDepth.current == 0)
        mapping = nil
        #expect(mapping == nil)
        #expect(file.inode.isFreed)
        #expect(fs.allocator.freeBlocks == held + 3)
        #expect(try fs.check().isClean)
    }

    @Test("operations nest: only the outermost one frees what was deferred")
    func nestedOperations() throws {
        let file = try fs.create("/removed")
        try file.write([UInt8](repeating: 2, count: PMemDevice.pageSize), at: 0)
        var mapping: DAXMapping? = try file.map(count: PMemDevice.pageSize)
        try fs.remove("/removed")
        file.close()
        fs.namespace.run {
            fs.namespace.run { mapping = nil }
            // The inner operation ended, the outer one has not.
            #expect(!file.inode.isFreed)
            #expect(OperationDepth.current == 1)
        }
        #expect(OperationDepth.current == 0)
        #expect(file.inode.isFreed)
    }
}
