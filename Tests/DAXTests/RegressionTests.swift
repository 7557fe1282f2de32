import CommandLineSupport
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

    // MARK: - Second review

    @Test("last closes of many orphans at once free every one of them")
    func concurrentOrphanCloses() throws {
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

    @Test("a directory operation queued behind unmount fails and leaves the device alone")
    func namespaceOperationAfterUnmount() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "lateCreate")
        let fs = t.fs
        // Hold the namespace lock so that unmount (holding the operations lock) queues behind it,
        // then start a create that would queue behind unmount.
        fs.namespace.lock.lockForReading()
        let unmounted = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            try? fs.unmount()
            unmounted.signal()
        }
        usleep(50_000)
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
        usleep(50_000)
        fs.namespace.lock.unlock()
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

    @Test("a truncate waiting for a pin does not hold up other files while unmount is asked for")
    func waitingTruncateDoesNotBlockUnmount() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "waitstall")
        let a = try t.fs.create("/a")
        try a.write(pattern(8 * 4096), at: 0)
        let b = try t.fs.create("/b")
        try b.write([1, 2, 3], at: 0)
        let mapping = try a.map(count: 8 * 4096)
        let pin = PinBox(try mapping.pin(offset: 4 * 4096, count: 4096))
        let truncated = DispatchSemaphore(value: 0)
        let truncateResult = Mutex<Bool>(false)
        Thread.detachNewThread {
            let done = (try? a.truncate(to: 4096, ifBusy: .wait(timeout: .seconds(20)))) != nil
            truncateResult.withTrackedLock { $0 = done }
            truncated.signal()
        }
        usleep(100_000)
        // The pin is held, so unmount must refuse at once rather than queue behind the wait.
        let unmountCode = Mutex<DAXError.Code?>(nil)
        let unmounted = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            do { try t.fs.unmount() } catch let error as DAXError {
                unmountCode.withTrackedLock { $0 = error.code }
            } catch {}
            unmounted.signal()
        }
        #expect(unmounted.wait(timeout: .now() + 5) == .success)
        #expect(unmountCode.withTrackedLock { $0 } == .busy)
        #expect(try b.read(count: 3, at: 0) == [1, 2, 3])
        #expect(truncated.wait(timeout: .now()) == .timedOut)  // still waiting for the pin
        pin.release()
        truncated.wait()
        #expect(truncateResult.withTrackedLock { $0 })
        #expect(a.size == 4096)
        mapping.unmap()
    }

    @Test("a lease holder may use the file system to let go")
    func revokeCallbackUsesFileSystem() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "revokeuse")
        let a = try t.fs.create("/a")
        try a.write(pattern(4 * 4096), at: 0)
        let mapping = try a.map(count: 4 * 4096)
        let lease = PinBox()
        let letGo = DispatchSemaphore(value: 0)
        lease.set(
            try mapping.pin(
                offset: 4096, count: 4096,
                lifetime: .longTerm(onRevoke: {
                    // Let go from another thread that first writes a note to a file.
                    Thread.detachNewThread {
                        if let note = try? t.fs.create("/released") {
                            _ = try? note.write([1], at: 0)
                            note.close()
                        }
                        lease.release()
                        letGo.signal()
                    }
                })))
        try a.truncate(to: 4096, ifBusy: .revokeLeases(grace: .seconds(30)))
        letGo.wait()
        #expect(a.size == 4096)
        #expect(try t.fs.contentsOfDirectory("/") == ["a", "released"])
        mapping.unmap()
    }

    @Test("crafted metadata with valid checksums is refused with .corrupted, never a trap")
    func craftedMetadataIsRefused() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "crafted")
        let sb = t.fs.superblock
        try t.fs.unmount()
        let original = try t.device.read(count: t.device.size, at: 0)

        /// Every refusal leaves the device as it was.
        func expectRefusedUnchanged(_ what: String) throws {
            let before = try t.device.read(count: t.device.size, at: 0)
            expectDAXError(.corrupted) { _ = try DAXFileSystem.mount(t.device) }
            let report: CheckReport
            do { report = try DAXFileSystem.check(t.device) } catch let error as DAXError {
                #expect(error.code == .corrupted, "\(what)")
                #expect(try t.device.read(count: t.device.size, at: 0) == before, "\(what)")
                return
            }
            #expect(!report.isClean, "\(what): fsck calls a device mount refuses clean")
            // The journal is named, or block 0's superblock when the backup stands in for it.
            let named = report.problems.first.map {
                $0.hasPrefix("journal:") || $0.hasPrefix("the superblock in block 0 is damaged")
            }
            #expect(named == true, "\(what): \(report)")
            #expect(try t.device.read(count: t.device.size, at: 0) == before, "\(what)")
        }

        // A journal write record at an offset whose end overflows.
        var transaction = Transaction()
        transaction.write([1, 2, 3, 4], at: Int(sb.dataStart) * 4096)
        var records = transaction.encodeForTesting()
        withUnsafeBytes(of: UInt64(0xFFFF_FFFF_FFFF_FFFC).littleEndian) { records.replaceSubrange(8..<16, with: $0) }
        let header = Journal.header(sequence: 7, committed: true, count: 1, records: records)
        try t.device.write(records, at: Int(sb.journalStart + 1) * 4096)
        try t.device.write(header, at: Int(sb.journalStart) * 4096)
        try expectRefusedUnchanged("write record past the end of the address space")

        // Records that do not match the committed header's checksum.
        try t.device.write(original, at: 0)
        try t.device.write(header, at: Int(sb.journalStart) * 4096)
        try expectRefusedUnchanged("records that fail their checksum")

        // A superblock whose bitmap size overflows the geometry arithmetic.
        try t.device.write(original, at: 0)
        var bad = sb
        bad.bitmapBlocks = 0xFFFF_FFFF_FFFF_FFF0
        try t.device.write(bad.encode(), at: 0)
        #expect(!DAXFileSystem.isFormatted(t.device))
        try expectRefusedUnchanged("superblock with an overflowing bitmap size")

        // A well-formed committed transaction whose replay would break the file system (it zeroes
        // the root's inode record): refused before the replay touches the device.
        try t.device.write(original, at: 0)
        var breaking = Transaction()
        breaking.write([UInt8](repeating: 0, count: 256), at: Int(sb.inodeStart) * 4096)
        let breakingRecords = breaking.encodeForTesting()
        try t.device.write(breakingRecords, at: Int(sb.journalStart + 1) * 4096)
        try t.device.write(
            Journal.header(sequence: 9, committed: true, count: 1, records: breakingRecords),
            at: Int(sb.journalStart) * 4096)
        let crafted = try t.device.read(count: t.device.size, at: 0)
        let refusal = expectDAXError(.corrupted) { _ = try DAXFileSystem.mount(t.device) }
        #expect(refusal?.message.contains("after replaying its journal") == true, "\(String(describing: refusal))")
        #expect(try t.device.read(count: t.device.size, at: 0) == crafted)
        let report = try DAXFileSystem.check(t.device)
        #expect(!report.isClean)
        #expect(try t.device.read(count: t.device.size, at: 0) == crafted)

        try t.device.write(original, at: 0)
        let fs = try DAXFileSystem.mount(t.device)
        #expect(try fs.check().isClean)
        try fs.unmount()
    }

    // MARK: - Third review

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
            let done = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                while let report = try? fs.check() { reports.withTrackedLock { $0.append(report) } }
                done.signal()
            }
            usleep(2000)
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

    @Test("createAtomically: concurrent calls for one path never mix; a failed one leaves the other's file")
    func createAtomicallyConcurrently() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "atomic")
        let fs = t.fs
        try fs.createDirectory("/dir")
        struct Halfway: Error {}
        for round in 0..<20 {
            let path = "/dir/é\(round)"
            let winner = pattern(40_000, seed: round)
            let outcomes = Mutex<[Bool]>([])
            onThreads(2) { index in
                let succeeded = (try? fs.createAtomically(path) { file in
                    for chunk in stride(from: 0, to: winner.count, by: 4096) {
                        let bytes = index == 0 ? winner : pattern(winner.count, seed: 1000 + round)
                        try file.write(Array(bytes[chunk..<min(chunk + 4096, bytes.count)]), at: chunk)
                        if index == 1, chunk >= 16384 { throw Halfway() }
                        usleep(50)
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

    @Test("the counts balance as soon as a truncate woken by another thread's final unpin returns")
    func balanceAfterWokenTruncate() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "wokenbalance")
        let engine = DMAEngine(device: t.device)
        for round in 0..<1000 {
            let file = try t.fs.create("/f\(round)")
            try file.write(pattern(2 * 4096, seed: round), at: 0)
            let mapping = try file.map(count: 2 * 4096)
            let frame = try #require(try file.frames(offset: 0, count: 4096)[0])
            let region = engine.register(try mapping.pin(offset: 0, count: 2 * 4096))
            // The release races the truncate's first scan or wakes its wait: both must see it counted.
            let delay = UInt32(round % 4) * 500
            Thread.detachNewThread {
                usleep(delay)
                engine.deregister(region)
            }
            try file.truncate(to: 0, ifBusy: .wait(timeout: .seconds(10)))
            let s = t.fs.statistics()
            let state = t.fs.pages.state(of: frame)
            guard s.pinsAcquired - s.pinsReleased == 0, s.pinnedPages == 0, state.pinCount == 0 else {
                let counts = "acquired \(s.pinsAcquired), released \(s.pinsReleased), pinned pages \(s.pinnedPages)"
                Issue.record("round \(round): \(counts), pinCount \(state.pinCount)")
                return
            }
            mapping.unmap()
            file.close()
            try t.fs.remove("/f\(round)")
        }
    }

    @Test(".revokeLeases that times out on a short-term pin revokes no lease")
    func timedOutRevokeKeepsLeases() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "keeplease")
        let file = try t.fs.create("/f")
        try file.write(pattern(4 * 4096, seed: 3), at: 0)
        let mapping = try file.map(count: 4 * 4096)
        let asked = Atomic(0)
        let engine = DMAEngine(device: t.device)
        let lease = engine.register(
            try mapping.pin(offset: 4096, count: 4096, lifetime: .longTerm(onRevoke: { asked.wrappingAdd(1, ordering: .relaxed) })))
        let shortPin = try mapping.pin(offset: 0, count: 4096)
        let framesBefore = try file.frames(offset: 0, count: 4 * 4096)
        let started = ContinuousClock.now
        expectDAXError(.timedOut) { try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .milliseconds(50))) }
        #expect(ContinuousClock.now - started >= .milliseconds(100))
        #expect(asked.load(ordering: .relaxed) == 1)
        #expect(!lease.isRevoked)
        try engine.write([0xAB], to: lease, at: 0)
        #expect(file.size == 4 * 4096)
        #expect(try file.frames(offset: 0, count: 4 * 4096) == framesBefore)
        var expected = pattern(4 * 4096, seed: 3)
        expected[4096] = 0xAB
        #expect(try file.read(count: 4 * 4096, at: 0) == expected)
        let s = t.fs.statistics()
        #expect(s.pinsAcquired == 2 && s.pinsReleased == 0)
        shortPin.release()
        engine.deregister(lease)
        mapping.unmap()
        #expect(t.fs.statistics().pinsReleased == 2)
    }

    @Test(".revokeLeases revokes as soon as the short-term pins are gone, within the second grace period")
    func revokeAfterShortTermPinGoes() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "laterevoke")
        let file = try t.fs.create("/f")
        try file.write(pattern(4 * 4096), at: 0)
        let mapping = try file.map(count: 4 * 4096)
        let engine = DMAEngine(device: t.device)
        // The lease and the short-term pin share a page, so only the lease's pin is revocable there.
        let lease = engine.register(try mapping.pin(offset: 0, count: 2 * 4096, lifetime: .longTerm(onRevoke: {})))
        let shortPin = PinBox(try mapping.pin(offset: 4096, count: 4096))
        Thread.detachNewThread {
            usleep(1_500_000)  // past the grace of 1 s, well inside the second one
            shortPin.release()
        }
        let started = ContinuousClock.now
        try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .seconds(1)))
        let took = ContinuousClock.now - started
        #expect(took >= .milliseconds(1400) && took < .milliseconds(1950), "took \(took)")
        #expect(lease.isRevoked)
        #expect(file.size == 0)
        expectDAXError(.revoked) { try engine.write([1], to: lease, at: 0) }
        let s = t.fs.statistics()
        #expect(s.pinsAcquired == 3 && s.pinsReleased == 3 && s.pinnedPages == 0)
        engine.deregister(lease)
        #expect(t.fs.statistics().pinsReleased == 3)
        mapping.unmap()
        #expect(try t.fs.check().isClean)
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

    // MARK: - Black-box testing

    @Test("a file of exactly the largest size: truncate and a write of its last byte, then remount clean")
    func largestFileSize() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "largest")
        let largest = DAXFileSystem.maximumFileSize
        let file = try t.fs.create("/f")
        try file.write([1, 2, 3], at: 0)
        try file.truncate(to: largest)
        #expect(file.size == largest)
        try file.write([9], at: largest - 1)
        #expect(try file.read(count: 1, at: largest - 1) == [9])
        expectDAXError(.invalidArgument) { try file.truncate(to: largest + 1) }
        expectDAXError(.invalidArgument) { try file.write([1], at: largest) }
        #expect(try t.fs.check().isClean)
        file.close()
        let again = try t.remount()
        let reopened = try again.open("/f")
        #expect(reopened.size == largest)
        #expect(try reopened.read(count: 3, at: 0) == [1, 2, 3])
        #expect(try reopened.read(count: 1, at: largest - 1) == [9])
        reopened.close()
        #expect(try again.check().isClean)
        try again.unmount()
    }

    @Test(".revokeLeases racing a transient reference never revokes and then claims it revoked nothing")
    func revokeRacingTransientReference() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "revoketransient")
        let engine = DMAEngine(device: t.device)
        var inconsistent: [String] = []
        for round in 0..<(longTests ? 2000 : 300) {
            let file = try t.fs.create("/f\(round)")
            try file.write(pattern(4096, seed: round), at: 0)
            let mapping = try file.map(count: 4096)
            let frame = try #require(try file.frames(offset: 0, count: 4096)[0])
            let region = engine.register(try mapping.pin(offset: 0, count: 4096, lifetime: .longTerm(onRevoke: {})))
            let stop = Atomic(false)
            let stopped = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                // Takes and drops a reference over and over, as a pinner backing off would.
                while !stop.load(ordering: .relaxed) {
                    if t.fs.pages.tryGet(frame) { t.fs.pages.put(frame) }
                }
                stopped.signal()
            }
            do {
                try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .zero))
                if !region.isRevoked { inconsistent.append("round \(round): truncated, lease not revoked") }
            } catch let error as DAXError {
                if error.code != .timedOut || (region.isRevoked && !error.message.contains("after the leases were revoked")) {
                    inconsistent.append("round \(round): \(error), revoked \(region.isRevoked)")
                }
            }
            stop.store(true, ordering: .relaxed)
            stopped.wait()
            engine.deregister(region)
            mapping.unmap()
            file.close()
            try t.fs.remove("/f\(round)")
        }
        #expect(inconsistent.count == 0, "\(inconsistent.prefix(3))")
        #expect(try t.fs.check().isClean)
        let s = t.fs.statistics()
        #expect(s.pinsAcquired == s.pinsReleased && s.pinnedPages == 0)
    }

    @Test("a punch that covers the last, partly filled page frees its block")
    func punchFreesPartialLastPage() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "punchlast")
        let file = try t.fs.create("/p")
        let data = pattern(2 * 4096 + 10, seed: 4)
        try file.write(data, at: 0)
        let free = t.fs.statistics().freeBlocks
        try file.punchHole(offset: 2 * 4096 + 5, count: 4096)  // not from the page's start: zeroes only
        #expect(try file.frames(offset: 2 * 4096, count: 1)[0] != nil)
        #expect(try file.read(count: 10, at: 2 * 4096) == Array(data[8192..<8197]) + [0, 0, 0, 0, 0])
        try file.punchHole(offset: 2 * 4096, count: 10)  // exactly to the end of the file
        #expect(try file.frames(offset: 2 * 4096, count: 1) == [nil])
        #expect(t.fs.statistics().freeBlocks == free + 1)
        #expect(file.size == 2 * 4096 + 10)
        #expect(try file.read(count: 10, at: 2 * 4096) == [UInt8](repeating: 0, count: 10))
        try file.punchHole(offset: 4096, count: 100 * 4096)
        #expect(try file.frames(offset: 0, count: 3 * 4096).map { $0 == nil } == [false, true, true])
        #expect(t.fs.statistics().freeBlocks == free + 2)
        #expect(try file.read(count: 4096, at: 0) == Array(data[0..<4096]))
        #expect(try t.fs.check().isClean)
    }

    @Test("a write or allocate that fills a page punched while mapped shows the new block in the mappings")
    func refillPunchedMappedPage() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "refill")
        let file = try t.fs.create("/f")
        try file.write(pattern(3 * 4096, seed: 6), at: 0)
        let writable = try file.map(count: 3 * 4096)
        let readOnly = try file.map(count: 3 * 4096, access: .readOnly)
        try file.punchHole(offset: 4096, count: 4096)
        // The punched page faults now: a .readOnly pin there is refused, nothing is mapped.
        expectDAXError(.invalidArgument) { _ = try readOnly.pin(offset: 4096, count: 1, access: .readOnly) }
        try file.write([0x5A], at: 4096 + 5)
        let frame = try #require(try file.frames(offset: 4096, count: 1)[0])
        #expect(t.fs.pages.state(of: frame).mapCount == 2)
        for mapping in [writable, readOnly] {
            // Pinnable again, so mapped: the load below cannot fault.
            let pin = try mapping.pin(offset: 4096, count: 1, access: .readOnly)
            #expect(pin.frames == [frame])
            #expect(mapping.baseAddress.load(fromByteOffset: 4096 + 5, as: UInt8.self) == 0x5A)
            #expect(mapping.baseAddress.load(fromByteOffset: 4096 + 6, as: UInt8.self) == 0)
            pin.release()
        }
        // A store through the mapping reaches the new block (zero copy).
        writable.baseAddress.storeBytes(of: 0x66, toByteOffset: 4096 + 7, as: UInt8.self)
        #expect(try file.read(count: 3, at: 4096 + 5) == [0x5A, 0, 0x66])
        // allocate does the same.
        try file.punchHole(offset: 2 * 4096, count: 4096)
        try file.allocate(offset: 2 * 4096, count: 4096)
        let allocated = try #require(try file.frames(offset: 2 * 4096, count: 1)[0])
        #expect(t.fs.pages.state(of: allocated).mapCount == 2)
        // So does a map that fills the hole for itself.
        try file.punchHole(offset: 0, count: 4096)
        let third = try file.map(offset: 0, count: 4096)
        let refilled = try #require(try file.frames(offset: 0, count: 1)[0])
        #expect(t.fs.pages.state(of: refilled).mapCount == 3)
        try file.write([0x77], at: 1)
        let pin = try readOnly.pin(offset: 0, count: 1, access: .readOnly)
        #expect(pin.frames == [refilled])
        #expect(readOnly.baseAddress.load(fromByteOffset: 1, as: UInt8.self) == 0x77)
        pin.release()
        third.unmap()
        writable.unmap()
        readOnly.unmap()
        for page in [frame, allocated, refilled] {
            #expect(t.fs.pages.state(of: page).mapCount == 0 && t.fs.pages.state(of: page).refCount == 0)
        }
        #expect(try t.fs.check().isClean)
    }

    @Test("a read-only mapping of holes changes nothing, works on a full file system, and shows later writes")
    func readOnlyMappingOfHoles() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "rohole")
        let writer = try t.fs.create("/sparse")
        try writer.write([7], at: 0)
        try writer.truncate(to: 8 * 4096)
        let filler = try t.fs.create("/filler")
        try filler.allocate(offset: 0, count: t.fs.statistics().freeBlocks * 4096)
        let framesBefore = try writer.frames(offset: 0, count: 8 * 4096)
        let free = t.fs.statistics().freeBlocks
        let reader = try t.fs.open("/sparse", access: .readOnly)
        let mapping = try reader.map(count: 8 * 4096, access: .readOnly)
        #expect(try writer.frames(offset: 0, count: 8 * 4096) == framesBefore)
        #expect(t.fs.statistics().freeBlocks == free)
        let bytes = UnsafeRawBufferPointer(start: mapping.baseAddress, count: 8 * 4096)
        #expect(bytes[0] == 7 && bytes[1...].allSatisfy { $0 == 0 })
        // A .readOnly pin of a hole has no block to pin.
        expectDAXError(.invalidArgument) { _ = try mapping.pin(offset: 3 * 4096, count: 1, access: .readOnly) }
        // A writer fills a hole: the read-only mapping shows the new block, counted.
        try filler.truncate(to: 0)
        try writer.write([0x42], at: 3 * 4096 + 9)
        let frame = try #require(try writer.frames(offset: 3 * 4096, count: 1)[0])
        #expect(t.fs.pages.state(of: frame).mapCount == 1)
        #expect(bytes[3 * 4096 + 9] == 0x42)
        let pin = try mapping.pin(offset: 3 * 4096, count: 1, access: .readOnly)
        #expect(pin.frames == [frame])
        pin.release()
        // So does a .readWrite mapping that fills the rest.
        // A punch that frees a block leaves the holes around it reading zeros (still holes).
        try writer.punchHole(offset: 2 * 4096, count: 3 * 4096)
        #expect(bytes[2 * 4096] == 0 && bytes[4 * 4096] == 0)
        let full = try writer.map(count: 8 * 4096)
        full.baseAddress.storeBytes(of: 0x24, toByteOffset: 6 * 4096, as: UInt8.self)
        #expect(bytes[6 * 4096] == 0x24)
        full.unmap()
        mapping.unmap()
        for page in try writer.frames(offset: 0, count: 8 * 4096) {
            let state = t.fs.pages.state(of: try #require(page))
            #expect(state.mapCount == 0 && state.refCount == 0)
        }
        reader.close()
        #expect(try t.fs.check().isClean)
    }
}
