import DAXTorture
import Foundation
import Testing

@testable import DAX

let longTests = ProcessInfo.processInfo.environment["DAX_LONG_TESTS"] == "1"

/// Runs `daxcrashworker <worker>` on a fresh device `kills` times, each killed after a random
/// number of its operations returned; after each kill, mounts, checks, and compares the device with
/// the model (the operations that returned, and perhaps the one in flight). Expects more
/// operations to have returned than there were kills (they landed inside work), and calls
/// `inFlight` with the operation each kill interrupted. Returns how many operations returned.
@discardableResult
func killWorkloadAtRandom(
    worker: String, name: String, seed: UInt64, forking: Bool, kills: Int,
    inFlight noteInFlight: (DAXTorture.Operation) -> Void = { _ in }
) throws -> Int {
    let t = try TemporaryFileSystem(size: 32 << 20, name: name)
    try t.fs.unmount()
    var model = Model()
    var random = SeededRandom(seed: seed)
    var operationsSurvived = 0
    for kill in 0..<kills {
        let seed = random.next()
        let child = try ChildProcess("daxcrashworker", [worker, t.temporary.path, "\(seed)"])
        guard child.waitForLine(startingWith: "ready") != nil else {
            Issue.record("kill \(kill): the worker did not start")
            return operationsSurvived
        }
        // Killed after a random number of operations returned, somewhere in the ones after.
        let returnedBeforeKill = 1 + Int(random.next() % 40)
        guard child.waitForLine(startingWith: "done \(returnedBeforeKill)") != nil else {
            Issue.record(
                "kill \(kill): the worker stopped before operation \(returnedBeforeKill): \(child.lines.suffix(3))")
            return operationsSurvived
        }
        child.kill()
        let done = child.lines.compactMap { $0.hasPrefix("done ") ? Int($0.dropFirst(5)) : nil }.last ?? -1
        operationsSurvived += done + 1

        // Regenerate what the worker did: operations 0...done returned, done + 1 was in flight.
        var workload = Workload(model: model, seed: seed, forking: forking)
        for _ in 0..<(done + 1) { _ = workload.next() }
        let returned = workload.model
        let inFlight = workload.next()
        noteInFlight(inFlight)
        var candidates = [returned, workload.model]
        if case .create(let path, _) = inFlight {
            // create is two steps (the name, then the bytes): the empty file is a valid state too.
            var created = returned
            created.files[path] = []
            candidates.append(created)
        }
        let lenient = Set([inFlight.fileChangedInPlace].compactMap { $0 })

        let fs = try DAXFileSystem.mount(t.device)
        let report = try fs.check()
        #expect(report.isClean, "kill \(kill) during \(inFlight): \(report)")
        let actual = try Model(reading: fs)
        let matched = candidates.contains { actual.matches($0, lenient: lenient) }
        #expect(
            matched,
            """
            kill \(kill): \(done + 1) operations returned, in flight: \(inFlight)
            on the device: \(actual)
            expected:      \(returned)
            or:            \(workload.model)
            """)
        try fs.unmount()
        guard report.isClean, matched else { return operationsSurvived }
        model = actual
    }
    // The kills must have landed inside work, not before it.
    #expect(operationsSurvived > kills)
    return operationsSurvived
}

@Suite("Crash consistency (SIGKILL)", .serialized)
struct CrashTests {
    @Test(
        "a workload killed after a random number of operations: mount recovers, check is clean, returned operations are there"
    )
    func killedWorkload() throws {
        try killWorkloadAtRandom(
            worker: "workload", name: "crash", seed: 0xDA7A, forking: false, kills: longTests ? 300 : 30)
    }

    @Test("a process that pins, truncates with .deferFree and dies: the quarantined blocks are free after mount")
    func killedWhilePinned() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "pincrash")
        let file = try t.fs.create("/pinned")
        try file.write(pattern(64 << 10), at: 0)
        file.close()
        try t.fs.unmount()
        let child = try ChildProcess("daxcrashworker", ["pin-truncate", t.temporary.path])
        let line = child.waitForLine(startingWith: "quarantined")
        #expect(line == "quarantined 16 16")
        child.kill()

        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        let statistics = fs.statistics()
        #expect(statistics.quarantinedBlocks == 0)
        #expect(statistics.pinnedPages == 0)
        #expect(statistics.freeBlocks == statistics.totalBlocks - 1)  // all but the root directory's block
        #expect(try fs.open("/pinned").size == 0)
        // Every block, the once-quarantined ones included, can be allocated again.
        let hog = try fs.create("/hog")
        try hog.allocate(offset: 0, count: statistics.freeBlocks * 4096)
        #expect(fs.statistics().freeBlocks == 0)
        #expect(try fs.check().isClean)
    }

    /// A truncate or punch that zeroes partial pages, and the file's bytes after it.
    static let zeroingChanges: [(operation: [String], after: @Sendable ([UInt8]) -> [UInt8])] = [
        (["truncate", "5000"], { Array($0[..<5000]) }),  // the new last page keeps 904 bytes
        (["truncate", "14000"], { $0 + [UInt8](repeating: 0, count: 14000 - $0.count) }),  // grows over a tail
        (["punch", "100", "9000"], { Array($0[..<100]) + [UInt8](repeating: 0, count: 9000) + $0[9100...] }),
        (["punch", "5000", "100"], { Array($0[..<5000]) + [UInt8](repeating: 0, count: 100) + $0[5100...] }),
    ]

    @Test(
        "a truncate or punch killed before its commit changes nothing; killed after it, it is whole",
        arguments: zeroingChanges.indices, [1, 3])
    func zeroingIsPartOfTheCommit(change: Int, killAtCopy: Int) throws {
        let (operation, after) = Self.zeroingChanges[change]
        let t = try TemporaryFileSystem(size: 4 << 20, name: "zerocrash")
        let file = try t.fs.create("/f")
        let before = pattern(3 * 4096 - 1000)
        try file.write(before, at: 0)
        file.close()
        try t.fs.unmount()
        // The worker dies at the journal's first copy (its records: the commit point is not
        // reached) or its third (the first in-place write after the committed header).
        let child = try ChildProcess(
            "daxcrashworker", ["kill-at-copy", t.temporary.path, "\(killAtCopy)", operation[0], "/f"] + operation[1...])
        #expect(child.waitForEnd() == SIGKILL, "\(operation): \(child.lines)")

        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        let report = try fs.check()
        #expect(report.isClean, "\(report)")
        let expected = killAtCopy == 1 ? before : after(before)
        let reopened = try fs.open("/f")
        let bytes = try reopened.read(count: 1 << 20, at: 0)
        #expect(bytes.count == expected.count, "\(operation) killed at copy \(killAtCopy)")
        let differs = zip(bytes, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset
        #expect(differs == nil, "\(operation) killed at copy \(killAtCopy): the file differs at byte \(differs ?? 0)")
    }

    @Test("a transaction committed but not applied is replayed by mount")
    func replaysCommittedTransaction() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "replay")
        let file = try t.fs.create("/f")
        try file.write(pattern(100), at: 0)
        file.close()
        let sb = t.fs.superblock
        try t.fs.unmount()
        // A crash right after the commit point: records and committed header durable, nothing applied.
        var record = InodeRecord.decode(ByteReader(t.device.base + sb.inodeOffset(2), count: 256))
        guard case .success(var inode) = record else {
            Issue.record("inode 2 unreadable")
            return
        }
        inode.size = 42
        record = .success(inode)
        var transaction = Transaction()
        transaction.write(inode.encode(), at: sb.inodeOffset(2))
        let records = transaction.encodeForTesting()
        try t.device.write(records, at: Int(sb.journalStart + 1) * 4096)
        try t.device.write(
            Journal.header(sequence: 99, committed: true, count: 1, records: records),
            at: Int(sb.journalStart) * 4096)
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.open("/f").size == 42)
        #expect(try fs.check().isClean)
    }

    @Test("a committed transaction whose bitmap change is a mask (many nearby runs) is replayed")
    func replaysMaskRecords() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "mask")
        let file = try t.fs.create("/f")
        let spacer = try t.fs.create("/s")
        for page in 0..<200 {
            try file.write([UInt8(page)], at: page * 4096)
            try spacer.write([1], at: page * 4096)
        }
        spacer.close()
        try t.fs.remove("/s")
        let frames = try file.frames(offset: 0, count: 200 * 4096).map { $0! }
        file.close()
        let sb = t.fs.superblock
        try t.fs.unmount()
        // The device as if the allocation of those 200 scattered blocks had been committed but
        // not applied: bits clear, and the transaction that sets them in the journal.
        var touched = Set<UInt64>()
        var transaction = Transaction()
        for frame in frames {
            let index = frame.rawValue - sb.dataStart
            Journal.setBits(index..<(index + 1), value: false, medium: t.device, superblock: sb, touched: &touched)
            transaction.setBits(index..<(index + 1), to: true)
        }
        Journal.sealBitmapBlocks(touched, medium: t.device, superblock: sb)
        let records = transaction.records
        #expect(records.count == 1)
        guard case .mask(_, _, true) = records[0] else {
            Issue.record("200 runs two blocks apart should make one mask record, not \(records.count) records")
            return
        }
        expectDAXError(.corrupted) { try DAXFileSystem.mount(t.device) }  // without the journal: damaged
        #expect(try !DAXFileSystem.check(t.device).isClean)
        let encoded = transaction.encodeForTesting()
        try t.device.write(encoded, at: Int(sb.journalStart + 1) * 4096)
        try t.device.write(
            Journal.header(sequence: 5, committed: true, count: records.count, records: encoded),
            at: Int(sb.journalStart) * 4096)
        // Offline fsck checks what mount will see, replaying into a private view: clean, and the
        // device is not changed.
        let image = try t.device.read(count: t.device.size, at: 0)
        let offline = try DAXFileSystem.check(t.device)
        #expect(offline.isClean, "\(offline)")
        #expect(offline.notes.contains { $0.contains("checked as it will be after that") }, "\(offline.notes)")
        #expect(try t.device.read(count: t.device.size, at: 0) == image)
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        #expect(try fs.open("/f").read(count: 1, at: 150 * 4096) == [150])
    }

    @Test("a torn journal header is discarded: nothing was applied, nothing is replayed")
    func discardsTornHeader() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "torn")
        _ = try t.fs.create("/f")
        let sb = t.fs.superblock
        try t.fs.unmount()
        var header = Journal.header(sequence: 7, committed: true, count: 1, records: [1, 2, 3])
        header[20] ^= 0xFF  // a torn write: the checksum no longer matches
        try t.device.write(header, at: Int(sb.journalStart) * 4096)
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.contentsOfDirectory("/") == ["f"])
        #expect(try fs.check().isClean)
    }

    @Test("a crash after committing remove-while-open (a superblock record) is replayed by mount")
    func committedOrphanRemovalIsReplayed() throws {
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
}

@Suite("Corruption")
struct CorruptionTests {
    @Test("random byte flips in metadata: mount, check, repair never crash; repair leaves it clean or refuses")
    func randomFlips() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "flip")
        let fs = t.fs
        try fs.createDirectory("/dir")
        for index in 0..<20 {
            let file = try fs.create("/dir/file\(index)")
            try file.write(pattern(3000 * index), at: 0)
        }
        let fragmented = try fs.create("/fragmented")
        let spacer = try fs.create("/spacer")
        for page in 0..<20 {
            try fragmented.write([UInt8(page)], at: page * 4096)
            try spacer.write([1], at: page * 4096)
        }
        let sb = fs.superblock
        // Where metadata lives: the metadata regions, directory blocks and extent leaves.
        var targets: [Range<Int>] = [
            0..<256, Int(sb.journalStart) * 4096..<(Int(sb.journalStart) * 4096 + 64),
            sb.inodeOffset(1)..<sb.inodeOffset(64),
            Int(sb.bitmapStart) * 4096..<Int(sb.dataStart) * 4096,
            Int(sb.totalBlocks - 1) * 4096..<(Int(sb.totalBlocks - 1) * 4096 + 256),  // the backup superblock
        ]
        for inode in fs.namespace.table.withTrackedLock({ Array($0.inodes.values) }) {
            for block in inode.extents.leafBlocks { targets.append(Int(block) * 4096..<Int(block + 1) * 4096) }
            if inode.directory != nil {
                for extent in inode.extents.allExtents {
                    targets.append(Int(extent.physical) * 4096..<Int(extent.physicalEnd) * 4096)
                }
            }
        }
        try fs.unmount()
        let image = try t.device.read(count: t.device.size, at: 0)
        var random = SeededRandom(seed: 7)
        var outcomes: [String: Int] = [:]
        var repairs: [String: Int] = [:]
        for _ in 0..<(longTests ? 3000 : 300) {
            image.withUnsafeBytes { t.device.copy($0, toOffset: 0) }
            for _ in 0..<(1 + Int(random.next() % 4)) {
                let target = targets[Int(random.next() % UInt64(targets.count))]
                let offset = target.lowerBound + Int(random.next() % UInt64(target.count))
                try t.device.write(
                    [UInt8(truncatingIfNeeded: random.next() | 1) ^ t.device.read(count: 1, at: offset)[0]],
                    at: offset)
            }
            do {
                let mounted = try DAXFileSystem.mount(t.device)
                let report = try mounted.check()
                _ = try? Model(reading: mounted)
                outcomes[report.isClean ? "mounted clean" : "mounted, check found damage", default: 0] += 1
                try mounted.unmount()
            } catch let error as DAXError {
                outcomes["refused: \(error.code)", default: 0] += 1
            }
            // Repair either leaves a file system that mounts read-write, checks clean and reads
            // whole, or refuses with .corrupted.
            let report: RepairReport
            do {
                report = try DAXFileSystem.repair(t.device)
            } catch let error as DAXError {
                repairs["repair refused: \(error.code)", default: 0] += 1
                #expect(error.code == .corrupted, "\(error)")
                continue
            }
            repairs[report.changedNothing ? "nothing to repair" : "repaired", default: 0] += 1
            #expect(report.check.isClean)
            do {
                let repaired = try DAXFileSystem.mount(t.device)
                let after = try repaired.check()
                #expect(after.isClean, "after repair: \(after)\nrepair did: \(report)")
                _ = try Model(reading: repaired)
                try repaired.unmount()
            } catch {
                Issue.record("after repair: \(error)\nrepair did: \(report)")
            }
        }
        // Damage is found, not ignored: most flips hit a checksum.
        #expect((outcomes["refused: corrupted"] ?? 0) > 100, "\(outcomes)")
        #expect(outcomes.keys.allSatisfy { $0.hasPrefix("mounted") || $0 == "refused: corrupted" }, "\(outcomes)")
        #expect((repairs["repaired"] ?? 0) > 100, "\(repairs)")
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
}
