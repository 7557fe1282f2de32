/// What ``DAXFileSystem/repair(_:)`` did.
public struct RepairReport: Sendable, Equatable, CustomStringConvertible {
    /// Each step in the order taken, one sentence each: what was wrong and what repair did about
    /// it. Empty when the file system needed nothing.
    public var actions: [String]
    /// Where what had lost its name now is (`/lost+found/#12`), one path each.
    public var lostAndFound: [String]
    /// The offline check after the repair: clean (repair throws otherwise); its notes remain.
    public var check: CheckReport

    /// Whether the device needed no change.
    public var changedNothing: Bool { actions.isEmpty }

    /// "nothing to repair", or one line per action.
    public var description: String {
        actions.isEmpty ? "nothing to repair" : actions.map { "- " + $0 }.joined(separator: "\n")
    }
}

extension Volume {
    /// `repair`, stopping as a crash would right after the commit point of transaction
    /// `stop + 1` (its records durable, nothing applied) when `stop` is not nil, with at most
    /// `writesPerTransaction` writes in each: tests run repair again on what is left.
    static func repair(
        _ device: PMemDevice, stoppingAfterCommits stop: Int?, writesPerTransaction: Int = .max
    ) throws -> RepairReport {
        do {
            try refuseReadOnly(device, "repair")
            var report: RepairReport?
            try withExclusiveDevice(device, for: "repair") {
                report = try repairLocked(device, stop: stop, writesPerTransaction: writesPerTransaction)
            }
            return report!
        } catch let error as DAXError {
            throw error.context("cannot repair \(device.path)", naming: device.path)
        }
    }

    private static func repairLocked(_ device: PMemDevice, stop: Int?, writesPerTransaction: Int) throws
        -> RepairReport
    {
        guard device.size >= PMemDevice.minimumSize else {
            throw DAXError(.corrupted, "device \(device.path) is too small to hold a DAXFS")
        }
        let totals = device.pages.pinTotals
        guard totals.acquired == totals.released else {
            throw DAXError(
                .busy, "\(countedAre(totals.acquired - totals.released, "page")) still pinned from an earlier mount")
        }
        let blocks = UInt64(device.pageCount)
        var (sb, primaryDamage) = try Superblock.locate(base: device.base, deviceBlocks: blocks)
        var actions: [String] = []
        let sequence = try emptyJournal(device, superblock: sb, actions: &actions)
        if !actions.isEmpty {
            // A replayed transaction may have rewritten block 0.
            (sb, primaryDamage) = try Superblock.locate(base: device.base, deviceBlocks: blocks)
        }
        if let primaryDamage, let backup = sb.backupBlock {
            try device.write(sb.encode(), at: 0)
            actions.append(
                "the superblock in block 0 was damaged (\(primaryDamage)); restored it from the backup in block \(backup)"
            )
        }
        try restoreBackup(device, superblock: sb, actions: &actions)

        let plan = try Salvage.plan(
            base: device.base, superblock: sb, dataRanges: device.isSparse ? { device.dataRanges(in: $0) } : nil)
        actions += plan.actions
        try commit(
            plan.writes, keepingTogether: plan.atomicRuns, device: device, superblock: sb, sequence: sequence,
            stop: stop, writesPerTransaction: writesPerTransaction)

        let check = try Checker.checkUnmounted(device)
        guard check.isClean else {
            throw DAXError(
                .corrupted,
                "repair could not make the file system consistent: "
                    + check.problems.prefix(3).joined(separator: "; "))
        }
        return RepairReport(actions: actions, lostAndFound: plan.lostAndFound, check: check)
    }

    /// Leaves the journal empty: replays a committed transaction, empties a torn header, discards
    /// a damaged journal. Returns the sequence number to go on from.
    private static func emptyJournal(_ device: PMemDevice, superblock sb: Superblock, actions: inout [String]) throws
        -> UInt64
    {
        let headerOffset = Int(sb.journalStart) * Superblock.blockSize
        func empty(_ sequence: UInt64) throws {
            try device.write(
                Journal.header(sequence: sequence, committed: false, count: 0, records: []), at: headerOffset)
        }
        do {
            switch try Journal.read(device: device, superblock: sb) {
            case .empty(let sequence):
                return sequence
            case .tornHeader:
                try empty(0)
                actions.append(
                    "the journal header was torn (a crash while committing or emptying); emptied the journal")
                return 0
            case .committed(let sequence, let records):
                Journal.apply(records, to: device, superblock: sb)
                try empty(sequence)
                actions.append(
                    "replayed the committed transaction in the journal (\(counted(records.count, "record"))), as mount would"
                )
                return sequence
            }
        } catch let error as DAXError where error.code == .corrupted {
            try empty(0)
            actions.append("the journal is damaged (\(error.message)); discarded it (a transaction in it is lost)")
            return 0
        }
    }

    /// Rewrites the backup superblock when it is damaged or differs from block 0 (beyond the
    /// orphan head, which only block 0 keeps).
    private static func restoreBackup(_ device: PMemDevice, superblock sb: Superblock, actions: inout [String]) throws {
        guard let block = sb.backupBlock else { return }
        let offset = Int(block) * Superblock.blockSize
        var expected = sb
        expected.orphanHead = 0
        let reader = ByteReader(device.base + offset, count: Superblock.size)
        let why: String
        do {
            var backup = try Superblock.decode(reader, deviceBlocks: sb.totalBlocks, block: block)
            backup.orphanHead = 0
            guard backup != expected else { return }
            why = "it differed from block 0"
        } catch let error as DAXError {
            why = error.message
        }
        try device.write(expected.encode(), at: offset)
        actions.append("the backup superblock in block \(block) was wrong (\(why)); rewrote it from block 0")
    }

    /// Commits `writes` through the journal in order, as many per transaction as fit; each of
    /// `runs` goes into one transaction (unless it alone is larger than the journal).
    private static func commit(
        _ writes: [(offset: Int, bytes: [UInt8])], keepingTogether runs: [Range<Int>], device: PMemDevice,
        superblock: Superblock, sequence: UInt64, stop: Int?, writesPerTransaction: Int
    ) throws {
        let journal = Journal(device: device, superblock: superblock, sequence: sequence)
        var batch = Transaction()
        var size = 0
        var count = 0
        var commits = 0
        func flush() throws {
            guard !batch.isEmpty else { return }
            if let stop, commits == stop {
                // A crash right after the commit point: records and header durable, nothing applied.
                let records = batch.encodeForTesting()
                try device.write(records, at: journal.recordsOffset)
                try device.write(
                    Journal.header(
                        sequence: sequence &+ UInt64(commits) &+ 1, committed: true, count: batch.records.count,
                        records: records),
                    at: journal.headerOffset)
                throw DAXError(.io, "repair stopped after \(commits) transactions, as in a crash (a test)")
            }
            try journal.commit(batch, what: "repair")
            commits += 1
            batch = Transaction()
            size = 0
            count = 0
        }
        func recordSize(_ index: Int) -> Int { Transaction.recordHeaderSize + (writes[index].bytes.count + 7) & ~7 }
        let runStarts = Dictionary(runs.map { ($0.lowerBound, $0) }, uniquingKeysWith: { first, _ in first })
        var runEnd = 0
        for index in writes.indices {
            if let run = runStarts[index] {
                let runSize = run.reduce(0) { $0 + recordSize($1) }
                if runSize <= journal.capacity,
                    size + runSize > journal.capacity || count + run.count > writesPerTransaction
                {
                    try flush()
                }
                runEnd = run.upperBound
            }
            if index >= runEnd, size + recordSize(index) > journal.capacity || count >= writesPerTransaction {
                try flush()
            } else if index < runEnd, size + recordSize(index) > journal.capacity {
                try flush()  // a run larger than the journal: split where it must be
            }
            batch.write(writes[index].bytes, at: writes[index].offset)
            size += recordSize(index)
            count += 1
        }
        try flush()
    }
}
