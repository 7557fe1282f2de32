import Foundation
import Synchronization
import Testing

@testable import DAX

@Suite("DAXFileSystem: namespace")
struct FileSystemTests {
    @Test("dataRanges lists the byte ranges that have blocks, merged and clipped, from the extents")
    func dataRanges() throws {
        let t = try TemporaryFileSystem(name: "dataranges")
        let file = try t.fs.create("/f")
        try file.write(pattern(2 * 4096), at: 0)
        try file.write(pattern(100), at: 5 * 4096 + 10)
        try file.truncate(to: 1 << 40)  // a terabyte, nearly all of it a hole
        #expect(try file.dataRanges(offset: 0, count: file.size) == [0..<(2 * 4096), (5 * 4096)..<(6 * 4096)])
        #expect(try file.dataRanges(offset: 4096 + 7, count: 5 * 4096) == [4096..<(2 * 4096), (5 * 4096)..<(6 * 4096)])
        #expect(try file.dataRanges(offset: 2 * 4096, count: 3 * 4096).isEmpty)
        #expect(try file.dataRanges(offset: 0, count: 0).isEmpty)
        // Blocks of separate extents that meet are one range.
        try file.allocate(offset: 2 * 4096, count: 3 * 4096)
        #expect(try file.dataRanges(offset: 0, count: file.size) == [0..<(6 * 4096)])
        expectDAXError(.invalidArgument) { try file.dataRanges(offset: -1, count: 10) }
        expectDAXError(.invalidArgument) { try file.dataRanges(offset: Int.max, count: 10) }
        // migrate of the whole terabyte moves the blocks it has, batch by batch where they are.
        let before = try file.frames(offset: 0, count: 6 * 4096)
        let result = try file.migrate(offset: 0, count: file.size)
        #expect(result.migrated == 6 && result.busy.isEmpty)
        #expect(try file.frames(offset: 0, count: 6 * 4096) != before)
        #expect(try file.read(count: 2 * 4096, at: 0) == pattern(2 * 4096))
        #expect(try file.read(count: 100, at: 5 * 4096 + 10) == pattern(100))
        #expect(try t.fs.check().isClean)
    }

    @Test("a path that ends in / names a directory: a file there is refused, nothing changes")
    func trailingSlashNamesADirectory() throws {
        let t = try TemporaryFileSystem(name: "slash")
        let fs = t.fs
        try fs.create("/f").write(pattern(100), at: 0)
        try fs.createDirectory("/d")
        try fs.create("/d/g").close()
        let free = fs.statistics().freeBlocks
        expectDAXError(.notADirectory) { try fs.open("/f/") }
        expectDAXError(.notADirectory) { try fs.attributes(of: "/f/") }
        expectDAXError(.notADirectory) { try fs.remove("/f/") }
        expectDAXError(.notADirectory) { try fs.rename("/f/", to: "/h") }
        expectDAXError(.notADirectory) { try fs.rename("/f", to: "/h/") }
        expectDAXError(.notADirectory) { try fs.rename("/f", to: "/d/g/") }
        expectDAXError(.notADirectory) { try fs.clone("/f/", to: "/c") }
        expectDAXError(.notADirectory) { try fs.clone("/f", to: "/c/") }
        expectDAXError(.isADirectory) { try fs.create("/new/") }
        #expect(try fs.contentsOfDirectory("/") == ["d", "f"])
        #expect(try fs.contentsOfDirectory("/d") == ["g"])
        #expect(try fs.open("/f").read(count: 100, at: 0) == pattern(100))
        #expect(fs.statistics().freeBlocks == free)
        // Directories take the slash, and a file without it is found as before.
        #expect(try fs.attributes(of: "/d/").kind == .directory)
        try fs.createDirectory("/e/")
        try fs.rename("/e/", to: "/d/e/")
        try fs.clone("/d/", to: "/snap/")
        #expect(try fs.contentsOfDirectory("/snap/") == ["e", "g"])
        try fs.remove("/d/e/")
        #expect(try fs.attributes(of: "/f").kind == .file)
        #expect(try fs.check().isClean)
    }

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

    @Test("errors found deep down say which call, path and range they stopped")
    func errorsNameTheirSubject() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "messages")
        let file = try t.fs.create("/big")
        let free = t.fs.statistics().freeBlocks
        let tooMuch = (free + 10) * 4096
        let noSpace = try #require(expectDAXError(.noSpace) { try file.allocate(offset: 0, count: tooMuch) })
        #expect(noSpace.message.contains("allocate") && noSpace.message.contains("/big"))
        #expect(noSpace.message.contains("\(tooMuch)"))
        #expect(t.fs.statistics().freeBlocks == free && file.size == 0)
        try file.allocate(offset: 0, count: free * 4096)
        try t.fs.createDirectory("/dir")  // its first entry needs a block
        let full = try #require(expectDAXError(.noSpace) { _ = try t.fs.create("/dir/more") })
        #expect(full.message.contains("/dir/more"), "\(full)")
        #expect(try t.fs.contentsOfDirectory("/dir").isEmpty)
        file.close()
        try t.fs.unmount()
        memset(t.device.baseAddress, 0x5A, 4096)
        let garbage = try #require(expectDAXError(.corrupted) { _ = try DAXFileSystem.mount(t.device) })
        #expect(garbage.message.contains(t.device.path), "\(garbage)")
    }
}
