import Foundation
import Synchronization
import Testing

@testable import DAX

@Suite("DAXFileSystem: namespace")
struct FileSystemTests {
    @Test("format, write, unmount, mount: files, directories and bytes survive")
    func survivesRemount() throws {
        let t = try TemporaryFileSystem()
        try t.fs.createDirectory("/a")
        try t.fs.createDirectory("/a/b")
        let data = pattern(100_000)
        do {
            let file = try t.fs.create("/a/b/data")
            try file.write(data, at: 0)
            file.close()
        }
        let small = try t.fs.create("/small")
        try small.write(Array("hi".utf8), at: 0)
        small.close()
        let fs = try t.remount()
        defer { try? fs.unmount() }
        #expect(try fs.contentsOfDirectory("/") == ["a", "small"])
        #expect(try fs.contentsOfDirectory("/a") == ["b"])
        let file = try fs.open("/a/b/data", access: .readOnly)
        #expect(file.size == 100_000)
        #expect(try file.read(count: 200_000, at: 0) == data)
        #expect(try fs.open("/small").read(count: 10, at: 0) == Array("hi".utf8))
        #expect(try fs.check().isClean)
    }

    @Test("path errors name the path and change nothing")
    func pathErrors() throws {
        let t = try TemporaryFileSystem()
        let fs = t.fs
        try fs.createDirectory("/dir")
        _ = try fs.create("/dir/file")
        let before = fs.statistics()
        expectDAXError(.notFound) { try fs.open("/missing") }
        expectDAXError(.notFound) { try fs.create("/no/such/dir/file") }
        expectDAXError(.alreadyExists) { try fs.create("/dir/file") }
        expectDAXError(.alreadyExists) { try fs.createDirectory("/dir") }
        expectDAXError(.alreadyExists) { try fs.create("/dir") }
        expectDAXError(.notADirectory) { try fs.create("/dir/file/child") }
        expectDAXError(.notADirectory) { try fs.contentsOfDirectory("/dir/file") }
        expectDAXError(.isADirectory) { try fs.open("/dir") }
        expectDAXError(.directoryNotEmpty) { try fs.remove("/dir") }
        expectDAXError(.invalidArgument) { try fs.create("") }
        expectDAXError(.invalidArgument) { try fs.remove("/") }
        expectDAXError(.invalidArgument) { try fs.create("/dir/../x") }
        let long = String(repeating: "n", count: 256)
        let error = expectDAXError(.invalidArgument) { try fs.create("/\(long)") }
        #expect(error?.message.contains("255") == true)
        _ = try fs.create("/" + String(repeating: "n", count: 255))  // the longest name is fine
        expectDAXError(.notFound) { try fs.remove("/dir/nothing") }
        expectDAXError(.notFound) { try fs.rename("/nothing", to: "/x") }
        #expect(try fs.contentsOfDirectory("/") == ["dir", String(repeating: "n", count: 255)])
        #expect(fs.statistics().freeBlocks == before.freeBlocks)
        #expect(try fs.check().isClean)
    }

    @Test("directories: nested, listed sorted, removed when empty; names are bytes")
    func directories() throws {
        let t = try TemporaryFileSystem()
        let fs = t.fs
        let names = ["zeta", "Alpha", "beta", "émile", "a b", "10", "9"]
        try fs.createDirectory("/d")
        for name in names { _ = try fs.create("/d/\(name)") }
        #expect(
            try fs.contentsOfDirectory("/d")
                == names.sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) })
        #expect(try fs.contentsOfDirectory("d/") == fs.contentsOfDirectory("/d"))  // same path, other spelling
        for name in names { try fs.remove("/d/\(name)") }
        #expect(try fs.contentsOfDirectory("/d").isEmpty)
        try fs.remove("/d")
        expectDAXError(.notFound) { try fs.contentsOfDirectory("/d") }
        #expect(try fs.check().isClean)
    }

    @Test("a directory with hundreds of entries spans blocks and survives a remount")
    func largeDirectory() throws {
        let t = try TemporaryFileSystem()
        try t.fs.createDirectory("/big")
        for index in 0..<400 { _ = try t.fs.create("/big/file-\(index)") }
        for index in stride(from: 0, to: 400, by: 3) { try t.fs.remove("/big/file-\(index)") }
        for index in 0..<50 { _ = try t.fs.create("/big/again-\(index)") }
        let fs = try t.remount()
        defer { try? fs.unmount() }
        let listed = try fs.contentsOfDirectory("/big")
        #expect(listed.count == 400 - 134 + 50)
        #expect(listed.contains("file-1") && !listed.contains("file-0") && listed.contains("again-49"))
        #expect(try fs.check().isClean)
    }

    @Test("rename moves, replaces a file, and refuses what POSIX refuses")
    func rename() throws {
        let t = try TemporaryFileSystem()
        let fs = t.fs
        try fs.createDirectory("/a")
        try fs.createDirectory("/a/sub")
        try fs.createDirectory("/b")
        let one = try fs.create("/a/one")
        try one.write(Array("one".utf8), at: 0)
        let two = try fs.create("/b/two")
        try two.write(Array("two".utf8), at: 0)
        two.close()
        let freeBefore = fs.statistics().freeBlocks
        try fs.rename("/a/one", to: "/b/two")  // replaces two, frees its block
        #expect(try fs.contentsOfDirectory("/a") == ["sub"])
        #expect(try fs.contentsOfDirectory("/b") == ["two"])
        #expect(try fs.open("/b/two").read(count: 10, at: 0) == Array("one".utf8))
        #expect(fs.statistics().freeBlocks == freeBefore + 1)
        try one.write(Array("ONE".utf8), at: 0)  // the handle follows the file, not the name
        #expect(try fs.open("/b/two").read(count: 3, at: 0) == Array("ONE".utf8))
        try fs.rename("/a/sub", to: "/b/sub")
        #expect(try fs.contentsOfDirectory("/b") == ["sub", "two"])
        expectDAXError(.invalidArgument) { try fs.rename("/b", to: "/b/sub/inside") }
        expectDAXError(.isADirectory) { try fs.rename("/b/two", to: "/b/sub") }
        _ = try fs.create("/b/sub/x")
        try fs.createDirectory("/c")
        expectDAXError(.notADirectory) { try fs.rename("/c", to: "/b/two") }
        expectDAXError(.directoryNotEmpty) { try fs.rename("/c", to: "/b/sub") }
        try fs.rename("/b/two", to: "/b/two")  // to itself: nothing happens
        #expect(try fs.contentsOfDirectory("/b") == ["sub", "two"])
        let remounted = try t.remount()
        defer { try? remounted.unmount() }
        #expect(try remounted.contentsOfDirectory("/b/sub") == ["x"])
        #expect(try remounted.check().isClean)
    }

    @Test("a read-only handle cannot change the file")
    func readOnlyHandle() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.write([1, 2, 3], at: 0)
        let reader = try t.fs.open("/f", access: .readOnly)
        expectDAXError(.permissionDenied) { try reader.write([9], at: 0) }
        expectDAXError(.permissionDenied) { try reader.truncate(to: 0) }
        expectDAXError(.permissionDenied) { try reader.punchHole(offset: 0, count: 1) }
        expectDAXError(.permissionDenied) { try reader.allocate(offset: 0, count: 1) }
        expectDAXError(.permissionDenied) { try reader.map(count: 3, access: .readWrite) }
        #expect(try reader.read(count: 3, at: 0) == [1, 2, 3])
        #expect(reader.size == 3)
    }

    @Test("closed handles and unmounted file systems refuse work")
    func closedHandles() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        file.close()
        file.close()
        expectDAXError(.invalidArgument) { try file.write([1], at: 0) }
        let open = try t.fs.open("/f")
        try t.fs.unmount()
        #expect(open.isClosed)
        expectDAXError(.invalidArgument) { try open.read(count: 1, at: 0) }
        expectDAXError(.invalidArgument) { try t.fs.create("/g") }
        let again = try DAXFileSystem.mount(t.device)
        #expect(try again.contentsOfDirectory("/") == ["f"])
        try again.unmount()
    }

    @Test("a removed open file keeps its blocks until the last close (an orphan)")
    func orphan() throws {
        let t = try TemporaryFileSystem()
        let fs = t.fs
        let file = try fs.create("/victim")
        let free = fs.statistics().freeBlocks  // after the root directory got its first block
        try file.write(pattern(40_000), at: 0)
        let used = free - fs.statistics().freeBlocks
        #expect(used == 10)
        try fs.remove("/victim")
        #expect(try fs.contentsOfDirectory("/").isEmpty)
        #expect(fs.statistics().freeBlocks == free - used)
        #expect(try file.read(count: 40_000, at: 0) == pattern(40_000))
        try file.write([7], at: 50_000)  // still writable
        let report = try fs.check()
        #expect(report.isClean, "\(report)")
        _ = try fs.create("/victim")  // the name is free again
        file.close()
        #expect(fs.statistics().freeBlocks == free)
        #expect(try fs.check().isClean)
    }

    @Test("check() while other threads remove open files and close them reports nothing")
    func checkAlongsideOrphanChurn() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "checkchurn")
        let fs = t.fs
        let checks = longTests ? 2000 : 150
        let done = Atomic(false)
        let problems = ProblemLog()
        let churned = Atomic(0)
        onThreads(3) { role in
            if role == 0 {
                for _ in 0..<checks {
                    do {
                        let report = try fs.check()
                        if !report.isClean { problems.add("\(report)") }
                    } catch { problems.add("check threw \(error)") }
                }
                done.store(true, ordering: .releasing)
                return
            }
            // Each file becomes an orphan (removed while open), then is freed by its close.
            var round = 0
            while !done.load(ordering: .acquiring) {
                do {
                    let path = "/churn\(role)-\(round % 8)"
                    let file = try fs.create(path)
                    try file.write([UInt8(round & 0xFF)], at: 0)
                    try fs.remove(path)
                    file.close()
                    churned.wrappingAdd(1, ordering: .relaxed)
                } catch { problems.add("churn \(role): \(error)") }
                round += 1
            }
        }
        #expect(problems.all.isEmpty, "\(problems.all.prefix(3))")
        #expect(churned.load(ordering: .relaxed) > 0)
        #expect(try fs.check().isClean)
        #expect(fs.statistics().freeBlocks == fs.statistics().totalBlocks - 1)
    }

    @Test("unmount frees orphans; mount refuses a second mount and garbage")
    func mountRules() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/x")
        try file.write(pattern(9000), at: 0)
        try t.fs.remove("/x")
        expectDAXError(.busy) { try DAXFileSystem.mount(t.device) }
        try t.fs.unmount()
        expectDAXError(.invalidArgument) { try t.fs.unmount() }
        let fs = try DAXFileSystem.mount(t.device)
        #expect(fs.statistics().freeBlocks == fs.statistics().totalBlocks - 1)  // the root directory's block
        #expect(try fs.contentsOfDirectory("/").isEmpty)
        try fs.unmount()

        let blank = try TemporaryDevice(size: 4 << 20, name: "blank")
        let error = expectDAXError(.corrupted) { try DAXFileSystem.mount(blank.device) }
        #expect(error?.message.contains("no DAXFS") == true)
        try blank.device.write(pattern(4096), at: 0)
        expectDAXError(.corrupted) { try DAXFileSystem.mount(blank.device) }
    }

    @Test("a file system mounted by another process is busy here")
    func mountedElsewhere() throws {
        let t = try TemporaryFileSystem()
        try t.fs.unmount()
        let child = try ChildProcess("daxcrashworker", ["hold", t.temporary.path])
        #expect(child.waitForLine(startingWith: "ready") != nil)
        let error = expectDAXError(.busy) { try DAXFileSystem.mount(t.device) }
        #expect(error?.message.contains("another process") == true)
        expectDAXError(.busy) { try DAXFileSystem.format(t.device) }
        child.kill()
        let fs = try DAXFileSystem.mount(t.device)
        #expect(try fs.check().isClean)
        try fs.unmount()
    }

    @Test("format options: inode count, running out of inodes")
    func inodes() throws {
        var options = DAXFileSystem.FormatOptions()
        options.bytesPerInode = 64 << 10
        let progress = ProgressRecorder()
        options.progress = { progress.record($0) }
        let t = try TemporaryFileSystem(size: 4 << 20, options: options)
        #expect(t.fs.statistics().totalInodes == 64)
        #expect(progress.last == 1.0)
        for index in 0..<63 { _ = try t.fs.create("/f\(index)") }
        let error = expectDAXError(.noSpace) { try t.fs.create("/one-too-many") }
        #expect(error?.message.contains("inodes") == true)
        try t.fs.remove("/f0")
        _ = try t.fs.create("/one-more")
        #expect(try t.fs.check().isClean)
    }
}

final class ProgressRecorder: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Double] = []
    func record(_ value: Double) { lock.withLock { values.append(value) } }
    var last: Double? { lock.withLock { values.last } }
}
