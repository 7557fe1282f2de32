import Glibc

/// Where the file system's regions lie on the device, in frames.
public struct FileSystemLayout: Sendable, Equatable {
    /// Block 0.
    public var superblock: Range<PageFrameNumber>
    /// The redo journal.
    public var journal: Range<PageFrameNumber>
    /// 256-byte inodes, 16 per block.
    public var inodeTable: Range<PageFrameNumber>
    /// One bit per data block.
    public var bitmap: Range<PageFrameNumber>
    /// File data, directory blocks and extent leaves.
    public var data: Range<PageFrameNumber>
    /// The backup superblock: the device's last block (empty for a version 1 file system).
    public var backupSuperblock: Range<PageFrameNumber>
    /// Inodes the file system can hold.
    public var inodeCount: Int

    init(_ sb: Superblock) {
        func frames(_ start: UInt64, _ count: UInt64) -> Range<PageFrameNumber> {
            PageFrameNumber(rawValue: start)..<PageFrameNumber(rawValue: start + count)
        }
        superblock = frames(0, 1)
        journal = frames(sb.journalStart, sb.journalBlocks)
        inodeTable = frames(sb.inodeStart, sb.inodeBlocks)
        bitmap = frames(sb.bitmapStart, sb.bitmapBlocks)
        data = frames(sb.dataStart, sb.dataBlocks)
        backupSuperblock = sb.backupBlock.map { frames($0, 1) } ?? frames(sb.dataEnd, 0)
        inodeCount = Int(sb.inodeCount)
    }
}

extension Checker {
    /// fsck of a device that is not mounted: validates everything `check()` does, changing nothing.
    /// A transaction committed but not yet applied (a crash) is replayed into a private
    /// copy-on-write view of the device, so that the structures checked are those the next mount
    /// will see. A damaged superblock in block 0 is a problem when the backup in the last block is
    /// intact (the rest is checked with the backup). Throws `.busy` if a file system on the device
    /// is mounted (here or in another process), `.corrupted` if the device holds no DAXFS.
    static func check(_ device: PMemDevice) throws -> CheckReport {
        guard !device.isMounted.load(ordering: .acquiring) else {
            throw DAXError(.busy, "the file system on \(device.path) is mounted in this process; use its check()")
        }
        guard device.isPrivateImage || device.systemCalls.flock(device.fd, LOCK_SH | LOCK_NB) == 0 else {
            throw DAXError(.busy, "the file system on \(device.path) is mounted by another process", errno: errno)
        }
        defer { _ = device.systemCalls.flock(device.fd, LOCK_UN) }
        return try checkUnmounted(device)
    }

    /// The offline check, with the device locked by the caller.
    static func checkUnmounted(_ device: PMemDevice) throws -> CheckReport {
        var (sb, primaryDamage) = try Superblock.locate(base: device.base, deviceBlocks: UInt64(device.pageCount))
        var report = CheckReport(isClean: true, problems: [])
        // The journal is validated exactly as mount would before replaying it.
        var journalProblems: [String] = []
        var view: PrivateView?
        var replayedRanges: [Range<Int>] = []
        do {
            switch try Journal.read(device: device, superblock: sb) {
            case .empty: break
            case .tornHeader:
                report.notes.append("the journal header is torn (a crash while committing); the next mount discards it")
            case .committed(_, let records):
                let pending =
                    "the journal holds a committed transaction of \(counted(records.count, "record")), which the next mount replays"
                if let replayed = try? PrivateView(of: device) {
                    Journal.apply(records, to: replayed, superblock: sb)
                    replayedRanges = Journal.targets(of: records, superblock: sb)
                    view = replayed
                    report.notes.append(pending + "; checked as it will be after that")
                    // The transaction may have moved the orphan head; a damaged superblock is a problem.
                    (sb, primaryDamage) = try Superblock.locate(
                        base: replayed.base, deviceBlocks: UInt64(device.pageCount))
                } else {
                    report.notes.append(pending + "; checked as the device is now, before it (no private view)")
                }
            }
        } catch let error as DAXError {
            journalProblems.append("journal: \(error.message); a read-write mount will refuse the device")
        }
        let ranges: ((Range<Int>) -> [Range<Int>])? =
            device.isSparse ? { device.dataRanges(in: $0, alsoWritten: replayedRanges) } : nil
        let scan = withExtendedLifetime(view) {
            Scanner.scan(
                base: view?.base ?? device.base, superblock: sb, journalMustBeEmpty: false,
                primaryDamage: primaryDamage, dataRanges: ranges)
        }
        report.problems =
            journalProblems + scan.problems + (scan.suppressed > 0 ? ["and \(scan.suppressed) more problems"] : [])
        if !scan.orphans.isEmpty {
            report.notes.append(
                "\(scan.orphans.count) removed files are still on the orphan list; the next mount frees them")
        }
        report.isClean = report.problems.isEmpty
        return report
    }
}

/// What `attributes(of:)` says about a file or directory.
public struct FileAttributes: Sendable, Equatable {
    public enum Kind: String, Sendable { case file, directory }

    public var kind: Kind
    /// Bytes (a directory: 4096 per directory block).
    public var size: Int
    /// Data blocks the file holds (holes hold none).
    public var blocks: Int
    public var inode: UInt32
    /// Nanoseconds since the epoch.
    public var modificationTime: UInt64
}

extension Volume {
    /// Whether the device holds a DAXFS superblock (valid magic and checksum).
    static func isFormatted(_ device: PMemDevice) -> Bool {
        (try? Superblock.decode(
            ByteReader(device.base, count: Superblock.size),
            deviceBlocks: UInt64(device.pageCount))) != nil
    }

    /// What on the device still looks like a DAXFS, damaged or not, or nil when nothing does:
    /// a valid superblock in block 0 or the backup one in the last block, a journal header in
    /// block 1, or a root directory inode where the default layout puts it. `format` refuses such
    /// a device unless told to overwrite it.
    static func existingFileSystem(on device: PMemDevice) -> String? {
        let blocks = UInt64(device.pageCount)
        guard blocks >= 2 else { return nil }
        if let (sb, primaryDamage) = try? Superblock.locate(base: device.base, deviceBlocks: blocks) {
            return primaryDamage == nil
                ? "a DAXFS superblock in block 0"
                : "a DAXFS backup superblock in block \(sb.backupBlock ?? blocks - 1); block 0 is damaged"
        }
        let header = ByteReader(device.base + Superblock.blockSize, count: Journal.headerSize)
        if header.get(UInt32.self, at: 0) == Journal.headerMagic { return "a DAXFS journal header in block 1" }
        // The inode table where format's default layout (of either version) puts it.
        for journal in [nil, 8, 64] as [Int?] {
            guard let sb = try? Superblock.layout(totalBlocks: blocks, bytesPerInode: 16 << 10, journalBlocks: journal)
            else { continue }
            guard sb.inodeOffset(Superblock.rootInode) + Superblock.inodeSize <= device.size else { continue }
            let reader = ByteReader(device.base + sb.inodeOffset(Superblock.rootInode), count: Superblock.inodeSize)
            if case .success(let root) = InodeRecord.decode(reader), root.kind == .directory,
                root.parent == Superblock.rootInode
            {
                return "a DAXFS root directory inode in block \(sb.inodeStart)"
            }
        }
        return nil
    }
}
