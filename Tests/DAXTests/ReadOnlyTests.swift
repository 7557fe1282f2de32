import Foundation
import Testing

@testable import DAX

@Suite("Read-only devices and mounts, open-or-create")
struct ReadOnlyTests {
    /// A formatted device with a directory and a file, unmounted; its path is removed at the end.
    final class Prepared: @unchecked Sendable {
        let path = TemporaryDevice.uniquePath("ro")
        let contents = pattern(3 * 4096 + 17)

        init() throws {
            let device = try PMemDevice.create(path: path, size: 4 << 20)
            defer { device.close() }
            let fs = try DAXFileSystem.format(device)
            try fs.createDirectory("/dir")
            let file = try fs.create("/dir/data")
            try file.write(contents, at: 0)
            file.close()
            try fs.unmount()
        }

        deinit { unlink(path) }

        func openReadOnly() throws -> PMemDevice {
            var options = PMemDevice.Options()
            options.readOnly = true
            return try PMemDevice.open(path: path, options: options)
        }

        var image: [UInt8] { get throws { try [UInt8](Data(contentsOf: URL(fileURLWithPath: path))) } }
    }

    @Test("a device file with read permission only opens read-only; its stores are refused")
    func readOnlyDeviceRefusesStores() throws {
        let prepared = try Prepared()
        let before = try prepared.image
        #expect(chmod(prepared.path, 0o444) == 0)
        let device = try prepared.openReadOnly()
        defer { device.close() }
        #expect(device.isReadOnly)
        #expect(try device.read(count: 16, at: 0) == Array(before[0..<16]))
        expectDAXError(.permissionDenied) { try device.write([1, 2, 3], at: 8192) }
        expectDAXError(.permissionDenied) { try DAXFileSystem.mount(device) }
        expectDAXError(.permissionDenied) { try DAXFileSystem.format(device) }
        expectDAXError(.invalidArgument) {
            var options = PMemDevice.Options()
            options.readOnly = true
            return try PMemDevice.create(path: TemporaryDevice.uniquePath("rocreate"), size: 4 << 20, options: options)
        }
        #expect(try prepared.image == before)
    }

    @Test("mount(access: .readOnly) reads files, lists, checks; every change is .permissionDenied")
    func readOnlyMount() throws {
        let prepared = try Prepared()
        let before = try prepared.image
        let device = try prepared.openReadOnly()
        defer { device.close() }
        let fs = try DAXFileSystem.mount(device, access: .readOnly)
        #expect(fs.access == .readOnly)
        #expect(try fs.contentsOfDirectory("/") == ["dir"])
        let file = try fs.open("/dir/data", access: .readOnly)
        #expect(try file.read(count: 1 << 20, at: 0) == prepared.contents)
        #expect(try fs.check().isClean)
        let mapping = try file.map(count: file.size, access: .readOnly)
        #expect(mapping.baseAddress.load(fromByteOffset: 4096, as: UInt8.self) == prepared.contents[4096])
        let pin = try mapping.pin(offset: 0, count: 4096, access: .readOnly)
        let nic = DMAEngine(device: device)
        let region = nic.register(pin)
        #expect(try nic.read(count: 4, from: region, at: 0) == Array(prepared.contents[0..<4]))
        expectDAXError(.permissionDenied) { try nic.write([9], to: region, at: 0) }
        nic.deregister(region)
        mapping.unmap()

        expectDAXError(.permissionDenied) { try fs.create("/new") }
        expectDAXError(.permissionDenied) { try fs.createDirectory("/d2") }
        expectDAXError(.permissionDenied) { try fs.remove("/dir/data") }
        expectDAXError(.permissionDenied) { try fs.rename("/dir/data", to: "/moved") }
        expectDAXError(.permissionDenied) { try fs.open("/dir/data") }
        expectDAXError(.permissionDenied) { try file.write([1], at: 0) }
        expectDAXError(.permissionDenied) { try file.truncate(to: 0, ifBusy: .fail) }
        expectDAXError(.permissionDenied) { try file.map(count: 4096) }
        file.close()
        try fs.unmount()
        #expect(try prepared.image == before)
    }

    @Test("read-only mounts share a device with each other and with offline check, not with a writer")
    func readOnlyMountsShare() throws {
        let prepared = try Prepared()
        let first = try prepared.openReadOnly()
        let second = try prepared.openReadOnly()
        let writer = try PMemDevice.open(path: prepared.path)
        defer { for device in [first, second, writer] { device.close() } }
        let a = try DAXFileSystem.mount(first, access: .readOnly)
        let b = try DAXFileSystem.mount(second, access: .readOnly)
        #expect(try DAXFileSystem.check(writer).isClean)
        expectDAXError(.busy) { try DAXFileSystem.mount(writer) }
        try a.unmount()
        try b.unmount()
        let mounted = try DAXFileSystem.mount(writer)
        expectDAXError(.busy) { try DAXFileSystem.mount(first, access: .readOnly) }
        try mounted.unmount()
    }

    @Test("a read-only mount refuses a journal awaiting replay, and frees no orphans")
    func readOnlyMountChangesNothingAfterACrash() throws {
        let prepared = try Prepared()
        // An orphan: a process killed with the file open and removed leaves it on the device.
        let child = try ChildProcess("daxcrashworker", ["orphan", prepared.path, "/dir/data"])
        #expect(child.waitForLine(startingWith: "ready") != nil)
        child.kill()
        do {
            let device = try PMemDevice.open(path: prepared.path)
            defer { device.close() }
            let offline = try DAXFileSystem.check(device)
            #expect(
                offline.notes.contains { $0.contains("1 removed file is still on the orphan list") }, "\(offline)")
        }
        let before = try prepared.image
        let device = try prepared.openReadOnly()
        let fs = try DAXFileSystem.mount(device, access: .readOnly)
        let report = try fs.check()
        #expect(report.isClean, "\(report)")
        #expect(try fs.contentsOfDirectory("/dir") == [])
        let blocksHeld = fs.statistics().totalBlocks - fs.statistics().freeBlocks
        #expect(blocksHeld == 1 + 1 + 4, "the root's and /dir's directory blocks, and the orphan's four")
        try fs.unmount()
        device.close()
        #expect(try prepared.image == before)

        // A committed transaction not yet applied: only a read-write mount may replay it.
        let writer = try PMemDevice.open(path: prepared.path)
        defer { writer.close() }
        let sb = try Superblock.decode(ByteReader(writer.base, count: Superblock.size), deviceBlocks: 1024)
        var transaction = Transaction()
        transaction.write(sb.encode(), at: 0)  // rewrites the superblock as it is
        let records = transaction.encodeForTesting()
        try writer.write(records, at: Int(sb.journalStart + 1) * 4096)
        try writer.write(
            Journal.header(sequence: 77, committed: true, count: 1, records: records), at: Int(sb.journalStart) * 4096)
        let crashed = try prepared.image
        let reader = try prepared.openReadOnly()
        defer { reader.close() }
        let error = expectDAXError(.permissionDenied) { try DAXFileSystem.mount(reader, access: .readOnly) }
        #expect(error?.message.contains("replay") == true, "\(String(describing: error))")
        #expect(try prepared.image == crashed)
        let replayed = try DAXFileSystem.mount(writer)
        #expect(try replayed.check().isClean)
        try replayed.unmount()
    }

    @Test("openOrCreate creates once, then opens what is there whatever size it is asked for")
    func openOrCreate() throws {
        let path = TemporaryDevice.uniquePath("ooc")
        defer { unlink(path) }
        let created = try PMemDevice.openOrCreate(path: path, size: 4 << 20)
        try created.write([42], at: 4096)
        created.close()
        let opened = try PMemDevice.openOrCreate(path: path, size: 8 << 20)
        defer { opened.close() }
        #expect(opened.size == 4 << 20)
        #expect(try opened.read(count: 1, at: 4096) == [42])
        expectDAXError(.notFound) { try PMemDevice.openOrCreate(path: "/dev/shm/no-such-dir/dev", size: 4 << 20) }
        expectDAXError(.invalidArgument) { try PMemDevice.openOrCreate(path: path + "-bad", size: 12345) }
        #expect(access(path + "-bad", F_OK) != 0)
    }
}
