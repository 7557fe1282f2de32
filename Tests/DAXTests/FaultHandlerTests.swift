import Foundation
import Testing

@testable import DAX

/// The fault handler from the inside: what each fault leaves in the mapping, the file and the
/// counts (the black-box cases are in FaultTests).
@Suite("Fault handler")
struct FaultHandlerTests {
    @Test(
        "a load of a hole reads zeros and allocates nothing; a store then allocates one block, shown in every mapping")
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

@Suite("Fault handler: modes and locks")
struct FaultHandlerModeTests {
    /// Options whose userfaultfd comes only in user-mode-only mode, as for a process without
    /// privilege (no /dev/userfaultfd, no CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=0).
    static var userModeOnly: PMemDevice.Options {
        var options = PMemDevice.Options.withoutUserfaultfd
        options.systemCalls.userfaultfd = { flags in
            guard flags & 1 != 0 else {  // UFFD_USER_MODE_ONLY
                errno = EPERM
                return -1
            }
            return SystemCalls.live.userfaultfd(flags)
        }
        return options
    }

    @Test("without privilege the handler is user-mode only: stores fill holes, a read(2) into a hole is EFAULT")
    func userModeOnly() throws {
        let t = try TemporaryFileSystem(deviceOptions: Self.userModeOnly)
        #expect(t.fs.faultHandling == .userfaultfd)
        #expect(t.fs.faultHandlingDetail.contains("user-mode-only"))
        let file = try t.fs.create("/f")
        try file.truncate(to: 2 * 4096)
        let mapping = try file.map(count: 2 * 4096)
        defer { mapping.unmap() }
        mapping.baseAddress.storeBytes(of: 0x31, as: UInt8.self)
        #expect(try file.read(count: 1, at: 0) == [0x31])
        let path = TemporaryDevice.uniquePath("ordinary")
        let fd = open(path, O_RDWR | O_CREAT, 0o600)
        defer {
            close(fd)
            unlink(path)
        }
        #expect(pwrite(fd, [UInt8](repeating: 0x99, count: 4096), 4096, 0) == 4096)
        #expect(pread(fd, mapping.baseAddress + 4096, 4096, 0) == -1 && errno == EFAULT)
        #expect(try file.frames(offset: 4096, count: 4096) == [nil])
        #expect(try t.fs.check().isClean)
    }

    @Test("without userfaultfd the file system says why, and mappings are populated when made")
    func unavailable() throws {
        let t = try TemporaryFileSystem(deviceOptions: .withoutUserfaultfd)
        guard case .unavailable(let reason) = t.fs.faultHandling else {
            Issue.record("\(t.fs.faultHandling)")
            return
        }
        #expect(reason.contains("/dev/userfaultfd"))
        #expect(t.fs.faultHandlingDetail.contains("populated when they are made"))
        let file = try t.fs.create("/f")
        try file.truncate(to: 4096)
        let mapping = try file.map(count: 4096)
        defer { mapping.unmap() }
        #expect(try file.frames(offset: 0, count: 4096).first! != nil)
        try file.sync()
    }

    @Test("write and read through a buffer in the file's own mapping, holes included, do not wait on the handler")
    func copiesThroughOwnMapping() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.write(pattern(4096), at: 0)
        try file.truncate(to: 4 * 4096)
        let mapping = try file.map(count: 4 * 4096)
        defer { mapping.unmap() }
        // From a hole of the mapping (page 1) into page 2, then from page 0 into the hole of page 3.
        try file.write(UnsafeRawBufferPointer(start: mapping.baseAddress + 4096, count: 4096), at: 2 * 4096)
        #expect(
            try file.read(
                into: UnsafeMutableRawBufferPointer(start: mapping.baseAddress + 3 * 4096, count: 4096), at: 0) == 4096)
        #expect(try file.read(count: 4096, at: 3 * 4096) == pattern(4096))
        #expect(try file.read(count: 4096, at: 2 * 4096) == [UInt8](repeating: 0, count: 4096))
        #expect(t.fs.statistics().faults.allocating >= 1)
    }

    @Test("unmount stops the handler; a file system mounted again on the device starts its own")
    func remountHandles() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.truncate(to: 4096)
        let mapping = try file.map(count: 4096)
        mapping.baseAddress.storeBytes(of: 5, as: UInt8.self)
        mapping.unmap()
        file.close()
        let again = try t.remount()
        let reopened = try again.open("/f")
        try reopened.truncate(to: 2 * 4096)
        let second = try reopened.map(count: 2 * 4096)
        #expect(second.baseAddress.load(as: UInt8.self) == 5)
        second.baseAddress.storeBytes(of: 6, toByteOffset: 4096, as: UInt8.self)
        #expect(again.statistics().faults.allocating == 1)
        second.unmap()
        reopened.close()
        try again.unmount()
    }
}

@Suite("Fault handler: a run of allocating faults")
struct FaultRunTests {
    @Test("256 stores to fresh holes allocate 256 blocks")
    func manyAllocatingFaults() throws {
        let t = try TemporaryFileSystem(size: 32 << 20)
        let file = try t.fs.create("/f")
        try file.truncate(to: 256 * 4096)
        let mapping = try file.map(count: 256 * 4096)
        defer { mapping.unmap() }
        for page in 0..<256 {
            mapping.baseAddress.storeBytes(of: UInt8(page & 0xFF), toByteOffset: page * 4096, as: UInt8.self)
        }
        #expect(t.fs.statistics().faults.allocating == 256)
        #expect(try file.read(count: 1, at: 255 * 4096) == [255])
    }
}
