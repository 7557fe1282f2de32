import Foundation
import Synchronization
import Testing

@testable import DAX

/// The volume: format options, mount and unmount against work in flight, the orphans a removed
/// open file leaves, and the statistics.
@Suite("DAXFileSystem: format, mount, unmount, orphans and statistics", .serialized)
struct MountTests {
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
        // The handle was open: the message says why it refuses.
        do {
            _ = try open.read(count: 1, at: 0)
        } catch let error as DAXError {
            #expect(error.message.contains("unmounted") && !error.message.contains("closed"), "\(error)")
        }
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

    @Test("unmount waits for file operations in flight; later ones fail cleanly")
    func unmountWaitsForOperations() throws {
        let t = try TemporaryFileSystem(size: 32 << 20, name: "unmountrace")
        let file = try t.fs.create("/busy")
        let writing = DispatchSemaphore(value: 0)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let chunk = [UInt8](repeating: 7, count: 256 << 10)
            var writes = 0
            // Writes until unmount stops it; the twentieth tells the test to unmount.
            while (try? file.write(chunk, at: writes * chunk.count % (16 << 20))) != nil {
                writes += 1
                if writes == 20 { writing.signal() }
            }
            done.signal()
        }
        writing.wait()
        try t.fs.unmount()
        done.wait()
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        #expect(try fs.open("/busy").size > 0)
    }

    @Test("a directory operation queued behind unmount fails and leaves the device alone")
    func namespaceOperationQueuedBehindUnmountFails() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "lateCreate")
        let fs = t.fs
        // Hold the namespace lock (a reader thread, until told to let go) so that unmount
        // (holding the operations lock) queues behind it, then start a create that would queue
        // behind unmount.
        let holding = DispatchSemaphore(value: 0)
        let letGo = DispatchSemaphore(value: 0)
        let released = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            fs.namespace.lock.withReadLock {
                holding.signal()
                letGo.wait()
            }
            released.signal()
        }
        holding.wait()
        let unmounted = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            try? fs.unmount()
            unmounted.signal()
        }
        // Unmount holds the operations lock and waits for the namespace lock: a writer waits there.
        spinUntil { fs.namespace.lock.queuedWriters > 0 }
        let outcome = Mutex<Result<Void, DAXError>?>(nil)
        let created = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            do {
                try fs.create("/late").close()
                outcome.withTrackedLock { $0 = .success(()) }
            } catch let error as DAXError {
                outcome.withTrackedLock { $0 = .failure(error) }
            } catch {}
            created.signal()
        }
        // The create waits for the operations lock, which unmount holds.
        spinUntil { fs.volume.operations.queuedReaders > 0 }
        letGo.signal()
        released.wait()
        unmounted.wait()
        created.wait()
        #expect(!fs.isMounted)
        guard case .failure(let error) = try #require(outcome.withTrackedLock { $0 }) else {
            Issue.record("create succeeded on an unmounted file system")
            return
        }
        #expect(error.code == .invalidArgument)
        let again = try DAXFileSystem.mount(t.device)
        #expect(try again.contentsOfDirectory("/").isEmpty)
        try again.unmount()
    }

    @Test("check() racing unmount reports no false problems and reads no unmapped memory")
    func checkRacingUnmount() throws {
        for round in 0..<(longTests ? 100 : 15) {
            let t = try TemporaryFileSystem(size: 8 << 20, name: "checkrace")
            let fs = t.fs
            // Removed while open: unmount frees them while check() may be comparing them.
            let open = try (0..<8).map { index in
                let file = try fs.create("/o\(index)")
                try file.write(pattern(5000), at: 0)
                try fs.remove("/o\(index)")
                return file
            }
            let reports = Mutex<[CheckReport]>([])
            let checking = DispatchSemaphore(value: 0)
            let done = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                while let report = try? fs.check() {
                    let count = reports.withTrackedLock { reports in
                        reports.append(report)
                        return reports.count
                    }
                    // Unmount once the first check is in: the next one is under way.
                    if count == 1 { checking.signal() }
                }
                done.signal()
            }
            checking.wait()
            try fs.unmount()
            t.device.close()  // the mapping of the device goes: a check still reading it would fault
            done.wait()
            withExtendedLifetime(open) {}
            let unclean = reports.withTrackedLock { $0.filter { !$0.isClean } }
            guard unclean.isEmpty else {
                Issue.record("round \(round): \(unclean[0])")
                return
            }
        }
    }

    @Test("freeing an orphan while its predecessor on the list is being written keeps the list whole")
    func orphanFreedWhilePredecessorIsWritten() throws {
        let t = try TemporaryFileSystem(size: 32 << 20, name: "orphanrace")
        let fs = t.fs
        // The file to write and its round; the writer counts its writes of each round's file.
        let current = Mutex<(file: DAXFile, round: Int)?>(nil)
        let written = Mutex((round: -1, writes: 0))
        let stop = Atomic<Bool>(false)
        let stopped = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            var offset = 0
            while !stop.load(ordering: .relaxed) {
                guard let (file, round) = current.withTrackedLock({ $0 }) else { continue }
                _ = try? file.write([1], at: offset % (1 << 20))
                offset += 1
                written.withTrackedLock { $0 = $0.round == round ? (round, $0.writes + 1) : (round, 1) }
            }
            stopped.signal()
        }
        defer {
            stop.store(true, ordering: .relaxed)
            stopped.wait()
        }
        func writes(in round: Int) -> Int { written.withTrackedLock { $0.round == round ? $0.writes : 0 } }
        for round in 0..<(longTests ? 2000 : 200) {
            let x = try fs.create("/x\(round)")
            try fs.remove("/x\(round)")  // orphans: x
            let p = try fs.create("/p\(round)")
            try fs.remove("/p\(round)")  // orphans: p, x
            current.withTrackedLock { $0 = (p, round) }
            spinUntil { writes(in: round) > 0 }  // the writer is at p
            let before = writes(in: round)
            x.close()  // frees x: p's next changes while p is being written
            spinUntil { writes(in: round) > before }  // and it wrote p again since
            current.withTrackedLock { $0 = nil }
            // Checked while p is still on the list: freeing p would erase the record a lost
            // update of its `next` corrupts.
            let report = try fs.check()
            p.close()
            guard report.isClean else {
                Issue.record("round \(round): \(report)")
                return
            }
        }
    }

    @Test("last closes of many orphans at once free every one of them")
    func concurrentLastClosesFreeEveryOrphan() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "orphancloses")
        let fs = t.fs
        for round in 0..<(longTests ? 300 : 40) {
            let files = try (0..<16).map { index in
                let file = try fs.create("/f\(round)-\(index)")
                try file.write([UInt8(index)], at: 0)
                return file
            }
            for index in 0..<16 { try fs.remove("/f\(round)-\(index)") }
            let free = fs.statistics().freeBlocks  // the orphans still hold one block each
            let box = Mutex(files)
            onThreads(16) { index in box.withTrackedLock { $0[index] }.close() }
            let left = fs.namespace.orphans.withTrackedLock { $0 }
            guard left.isEmpty, fs.statistics().freeBlocks == free + 16 else {
                Issue.record("round \(round): orphans \(left) still hold blocks")
                return
            }
        }
        #expect(fs.statistics().files == 0)
        #expect(try fs.check().isClean)
    }

    @Test("Statistics reads as a sentence, with plurals right")
    func statisticsDescription() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "statsdesc")
        let file = try t.fs.create("/f")
        try file.write([1], at: 0)
        let text = "\(t.fs.statistics())"
        #expect(text.contains("1 file and 1 directory"), "\(text)")
        #expect(text.contains("0 pages pinned"), "\(text)")
        #expect(!text.contains("1 files"), "\(text)")
    }
}

final class ProgressRecorder: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Double] = []
    func record(_ value: Double) { lock.withLock { values.append(value) } }
    var last: Double? { lock.withLock { values.last } }
}
