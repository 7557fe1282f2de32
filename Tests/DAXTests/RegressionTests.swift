import Foundation
import Synchronization
import Testing

@testable import DAX

/// Bugs found by review, each with the test that would have caught it.
@Suite("Regressions", .serialized)
struct RegressionTests {
    @Test("a crash after committing remove-while-open (a superblock record) is replayed by mount")
    func orphanCommitReplays() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "orphanreplay")
        let f = try t.fs.create("/f")
        f.close()
        let sb = t.fs.superblock
        let root = try t.fs.inode(1)
        let entry = try #require(root.directory?.entries[Array("f".utf8)])
        let slot = t.fs.slotOffset(root, entry.slot)
        try t.fs.unmount()
        // The transaction remove() commits for an open file: the name goes, the inode joins the
        // orphan list, the superblock names it. Committed, never applied: a crash.
        guard
            case .success(var inode) = InodeRecord.decode(
                ByteReader(t.device.base + sb.inodeOffset(entry.inode), count: 256))
        else {
            Issue.record("inode unreadable")
            return
        }
        inode.linkCount = 0
        var head = sb
        head.orphanHead = entry.inode
        var transaction = Transaction()
        transaction.write(DirectoryFormat.emptySlot, at: slot)
        transaction.write(inode.encode(), at: sb.inodeOffset(entry.inode))
        transaction.write(head.encode(), at: 0)
        let records = transaction.encodeForTesting()
        try t.device.write(records, at: Int(sb.journalStart + 1) * 4096)
        try t.device.write(
            Journal.header(sequence: 99, committed: true, count: 3, records: records),
            at: Int(sb.journalStart) * 4096)
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.contentsOfDirectory("/").isEmpty)
        #expect(fs.statistics().files == 0)  // the orphan was freed by the mount
        #expect(try fs.check().isClean)
    }

    @Test("a truncate or punch that does not go ahead gives back the leaf blocks its plan took")
    func refusedPunchDoesNotLeak() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "punchleak")
        let f = try t.fs.create("/f")
        for i in 0..<8 { try f.write(pattern(3 * 4096), at: i * 4 * 4096) }
        #expect(f.inode.extents.extentCount == 8)  // inline and full: splitting one needs a leaf block
        let mapping = try f.map(offset: 0, count: 3 * 4096)
        let pin = try mapping.pin(offset: 4096, count: 4096)
        let before = t.fs.statistics().freeBlocks
        expectDAXError(.busy) { try f.punchHole(offset: 4096, count: 4096, ifBusy: .fail) }
        expectDAXError(.timedOut) {
            try f.punchHole(offset: 4096, count: 4096, ifBusy: .wait(timeout: .milliseconds(50)))
        }
        #expect(t.fs.statistics().freeBlocks == before)
        pin.release()
        mapping.unmap()
        #expect(try t.fs.check().isClean)
    }

    @Test("an allocation too large for the journal throws .noSpace, gives everything back, and crashes nothing")
    func allocationTooLargeForJournal() throws {
        var options = DAXFileSystem.FormatOptions()
        options.journalBlocks = 8
        let t = try TemporaryFileSystem(size: 32 << 20, options: options, name: "smalljournal")
        let a = try t.fs.create("/a")
        try a.allocate(offset: 0, count: 5000 * 4096)
        let filler = try t.fs.create("/filler")
        try filler.allocate(offset: 0, count: t.fs.statistics().freeBlocks * 4096)
        // Free every other block: the free space is 2500 single blocks. An allocation taking them
        // all needs about 10 extent leaves, more than the 7 blocks of the journal's record area.
        for page in stride(from: 1, to: 5000, by: 2) {
            try a.punchHole(offset: page * 4096, count: 4096, ifBusy: .fail)
        }
        let free = t.fs.statistics().freeBlocks
        let b = try t.fs.create("/b")
        let error = expectDAXError(.noSpace) { try b.allocate(offset: 0, count: (free - 20) * 4096) }
        #expect(error?.message.contains("journal") == true)
        #expect(t.fs.statistics().freeBlocks == free)
        #expect(b.size == 0)
        try b.allocate(offset: 0, count: 8 * 4096)  // a smaller one fits
        #expect(try t.fs.check().isClean)
    }

    @Test("closing the device under a mounted file system leaves it working until unmount")
    func deviceClosedWhileMounted() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "closed")
        let f = try t.fs.create("/f")
        t.device.close()
        try f.write(pattern(10_000), at: 0)
        #expect(try f.read(count: 10_000, at: 0) == pattern(10_000))
        #expect(try t.fs.check().isClean)
        f.close()
        try t.fs.unmount()
        let again = try DAXFileSystem.mount(try PMemDevice.open(path: t.temporary.path))
        #expect(try again.open("/f").read(count: 10_000, at: 0) == pattern(10_000))
        try again.unmount()
    }

    @Test("freeing an orphan while its predecessor on the list is being written keeps the list whole")
    func orphanListRace() throws {
        let t = try TemporaryFileSystem(size: 32 << 20, name: "orphanrace")
        let fs = t.fs
        let current = Mutex<DAXFile?>(nil)
        let stop = Atomic<Bool>(false)
        let writer = Thread {
            var offset = 0
            while !stop.load(ordering: .relaxed) {
                if let file = current.withTrackedLock({ $0 }) {
                    _ = try? file.write([1], at: offset % (1 << 20))
                    offset += 1
                }
            }
        }
        writer.start()
        defer {
            stop.store(true, ordering: .relaxed)
            while !writer.isFinished { usleep(1000) }
        }
        for round in 0..<(longTests ? 2000 : 200) {
            let x = try fs.create("/x\(round)")
            try fs.remove("/x\(round)")  // orphans: x
            let p = try fs.create("/p\(round)")
            try fs.remove("/p\(round)")  // orphans: p, x
            current.withTrackedLock { $0 = p }
            usleep(100)
            x.close()  // frees x: p's next changes while p is being written
            usleep(100)
            current.withTrackedLock { $0 = nil }
            p.close()
            let report = try fs.check()
            guard report.isClean else {
                Issue.record("round \(round): \(report)")
                return
            }
        }
    }

    @Test("unmount waits for file operations in flight; later ones fail cleanly")
    func unmountWaitsForOperations() throws {
        let t = try TemporaryFileSystem(size: 32 << 20, name: "unmountrace")
        let file = try t.fs.create("/busy")
        let writes = Atomic(0)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let chunk = [UInt8](repeating: 7, count: 256 << 10)
            var offset = 0
            while (try? file.write(chunk, at: offset % (16 << 20))) != nil {
                writes.wrappingAdd(1, ordering: .relaxed)
                offset += chunk.count
            }
            done.signal()
        }
        while writes.load(ordering: .relaxed) < 20 { usleep(1000) }
        try t.fs.unmount()
        done.wait()
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        #expect(try fs.open("/busy").size > 0)
    }
}
