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
