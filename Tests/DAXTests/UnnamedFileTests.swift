import Foundation
import Synchronization
import Testing

@testable import DAX

@Suite("Unnamed files (O_TMPFILE) and link")
struct UnnamedFileTests {
    @Test("an unnamed file is built, then linked whole under its name; it survives a remount")
    func buildThenLink() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "tmpfile")
        try t.fs.createDirectory("/dir")
        let file = try t.fs.createUnnamed(in: "/dir")
        #expect(file.path.hasPrefix("/dir/(unnamed "))
        try file.write(pattern(20_000), at: 0)
        #expect(try t.fs.contentsOfDirectory("/dir") == [])
        #expect(try t.fs.check().isClean)
        try t.fs.link(file, at: "/dir/complete")
        #expect(try t.fs.contentsOfDirectory("/dir") == ["complete"])
        expectDAXError(.invalidArgument) { try t.fs.link(file, at: "/dir/again") }
        file.close()
        #expect(try t.fs.open("/dir/complete").read(count: 1 << 20, at: 0) == pattern(20_000))
        #expect(try t.fs.check().isClean)
        try t.fs.unmount()
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.open("/dir/complete").read(count: 1 << 20, at: 0) == pattern(20_000))
        #expect(try fs.check().isClean)
    }

    @Test("an unnamed file closed without a link frees its blocks; bad links change nothing")
    func closedWithoutLinkIsFreed() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "tmpfree")
        _ = try t.fs.create("/taken")
        let takenFree = t.fs.statistics().freeBlocks
        let first = try t.fs.createUnnamed(in: "/")
        let second = try t.fs.createUnnamed(in: "/")
        try first.write(pattern(3 * 4096), at: 0)
        try second.write(pattern(5 * 4096), at: 0)
        expectDAXError(.alreadyExists) { try t.fs.link(first, at: "/taken") }
        expectDAXError(.notFound) { try t.fs.link(first, at: "/missing/name") }
        expectDAXError(.notFound) { try t.fs.createUnnamed(in: "/missing") }
        // The first is not the head of the orphan list: linking it mends the list around it.
        try t.fs.link(first, at: "/first")
        second.close()
        #expect(try t.fs.contentsOfDirectory("/") == ["first", "taken"])
        #expect(t.fs.statistics().freeBlocks == takenFree - 3)
        first.close()
        try t.fs.remove("/first")
        try t.fs.remove("/taken")
        #expect(t.fs.statistics().freeBlocks == takenFree, "all but the root directory's new block")
        #expect(try t.fs.check().isClean)
    }

    @Test("link replacing: a closed file's blocks are freed; an open one lives on as an orphan until closed")
    func linkReplacing() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "tmpreplace")
        try t.fs.createDirectory("/d")
        let old = try t.fs.create("/d/store")
        try old.write(pattern(4 * 4096, seed: 1), at: 0)
        old.close()
        let baseline = t.fs.statistics().freeBlocks
        let new = try t.fs.createUnnamed(in: "/d")
        try new.write(pattern(2 * 4096, seed: 2), at: 0)
        expectDAXError(.alreadyExists) { try t.fs.link(new, at: "/d/store") }
        expectDAXError(.isADirectory) { try t.fs.link(new, at: "/d", replacing: true) }
        try t.fs.link(new, at: "/d/store", replacing: true)
        new.close()
        #expect(t.fs.statistics().freeBlocks == baseline - 2 + 4)
        let check = try t.fs.open("/d/store")
        #expect(try check.read(count: 1 << 20, at: 0) == pattern(2 * 4096, seed: 2))
        check.close()
        #expect(try t.fs.check().isClean)

        // Replacing a file that is still open: its reader keeps its bytes until it closes.
        let reader = try t.fs.open("/d/store", access: .readOnly)
        let newer = try t.fs.createUnnamed(in: "/")
        try newer.write(pattern(3 * 4096, seed: 3), at: 0)
        let another = try t.fs.createUnnamed(in: "/")  // the orphan list holds more than one
        try t.fs.link(newer, at: "/d/store", replacing: true)
        #expect(try reader.read(count: 1 << 20, at: 0) == pattern(2 * 4096, seed: 2))
        let current = try t.fs.open("/d/store")
        #expect(try current.read(count: 1 << 20, at: 0) == pattern(3 * 4096, seed: 3))
        current.close()
        #expect(try t.fs.check().isClean)
        let held = t.fs.statistics().freeBlocks
        reader.close()
        #expect(t.fs.statistics().freeBlocks == held + 2)
        another.close()
        #expect(try t.fs.check().isClean)
        try t.fs.unmount()
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.contentsOfDirectory("/d") == ["store"])
        #expect(try fs.check().isClean)
    }

    @Test("a process killed while building an unnamed file leaves nothing after the next mount")
    func killedWhileBuildingLeavesNothing() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "tmpkill")
        let free = t.fs.statistics().freeBlocks
        try t.fs.unmount()
        let child = try ChildProcess("daxcrashworker", ["unnamed", t.temporary.path])
        #expect(child.waitForLine(startingWith: "ready") != nil)
        child.kill()
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.contentsOfDirectory("/") == [])
        #expect(fs.statistics().freeBlocks == free)
        #expect(try fs.check().isClean)
    }

    @Test("createAtomically: concurrent calls for one path never mix; a failed one leaves the other's file")
    func concurrentCreateAtomicallyNeverMixes() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "atomic")
        let fs = t.fs
        try fs.createDirectory("/dir")
        struct Halfway: Error {}
        for round in 0..<20 {
            let path = "/dir/é\(round)"
            let winner = pattern(40_000, seed: round)
            let outcomes = Mutex<[Bool]>([])
            // The two builds take turns, a chunk each, so that both are half done at once.
            let turns = Turns(2)
            onThreads(2) { index in
                defer { turns.leave(index) }
                let succeeded =
                    (try? fs.createAtomically(path) { file in
                        for chunk in stride(from: 0, to: winner.count, by: 4096) {
                            turns.wait(index)
                            defer { turns.pass(index) }
                            let bytes = index == 0 ? winner : pattern(winner.count, seed: 1000 + round)
                            try file.write(Array(bytes[chunk..<min(chunk + 4096, bytes.count)]), at: chunk)
                            if index == 1, chunk >= 16384 { throw Halfway() }
                        }
                    }) != nil
                outcomes.withTrackedLock { $0.append(succeeded && index == 0) }
            }
            #expect(outcomes.withTrackedLock { $0.filter { $0 }.count } == 1, "round \(round): the whole build failed")
            let file = try fs.open(path)
            #expect(try file.read(count: 50_000, at: 0) == winner, "round \(round)")
            file.close()
        }
        // The files were built unnamed: no temporary name was ever in a directory, none is left.
        #expect(try fs.contentsOfDirectory("/dir").count == 20)
        #expect(try fs.contentsOfDirectory("/") == ["dir"])
        #expect(fs.statistics().files == 20)
        #expect(try fs.check().isClean)
    }
}
