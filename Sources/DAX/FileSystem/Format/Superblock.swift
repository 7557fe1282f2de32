/// The file system's geometry and root facts, in block 0, and from version 2 a backup copy in the
/// device's last block. See `docs/format.md`.
struct Superblock: Equatable, Sendable {
    static let magic: [UInt8] = [0x44, 0x41, 0x58, 0x46, 0x53, 0x00, 0x01, 0x0A]  // "DAXFS\0\x01\n"
    /// The version `format` writes: 2 keeps a backup superblock in the last block, 3 also keeps the
    /// shared-block table's first leaf in the journal region's last block.
    static let version: UInt32 = 3
    /// Versions a mount reads: 1 (no backup; the data region runs to the end of the device), 2 (no
    /// shared blocks) and 3.
    static let readableVersions: ClosedRange<UInt32> = 1...3
    static let size = 256
    static let blockSize = 4096
    static let inodeSize = 256
    static let inodesPerBlock = blockSize / inodeSize
    static let bitmapBytesPerBlock = blockSize - 4
    static let bitsPerBitmapBlock = bitmapBytesPerBlock * 8
    static let rootInode: UInt32 = 1
    /// The owner field of a page descriptor has 24 bits for the inode number.
    static let maximumInodes = (1 << 24) - 1

    /// 1 or 2; see `hasBackup`.
    var version: UInt32 = Superblock.version
    var totalBlocks: UInt64
    var journalStart: UInt64
    var journalBlocks: UInt64
    var inodeStart: UInt64
    var inodeBlocks: UInt64
    var inodeCount: UInt64
    var bitmapStart: UInt64
    var bitmapBlocks: UInt64
    var dataStart: UInt64
    var dataBlocks: UInt64
    var orphanHead: UInt32 = 0
    var uuid: [UInt8] = [UInt8](repeating: 0, count: 16)
    var formatTime: UInt64 = 0

    /// Lays out a device of `totalBlocks` pages.
    static func layout(totalBlocks: UInt64, bytesPerInode: Int, journalBlocks requested: Int?) throws -> Superblock {
        let total = Int(totalBlocks)
        let journal = requested ?? min(max(total / 64, 64), 8192)
        guard journal >= 8 else {
            throw DAXError(.invalidArgument, "journal of \(counted(journal, "block")) is too small (at least 8)")
        }
        guard bytesPerInode >= 1024, bytesPerInode % 1024 == 0 else {
            throw DAXError(
                .invalidArgument, "bytes per inode \(bytesPerInode) must be a multiple of 1024, at least 1024")
        }
        let inodes = min(max(total * blockSize / bytesPerInode, 64), maximumInodes)
        let inodeBlocks = (inodes + inodesPerBlock - 1) / inodesPerBlock
        let before = 1 + journal + inodeBlocks
        // The last block holds the backup superblock; the bitmap covers what remains after itself
        // and before the backup: grow it until it does.
        let end = total - 1
        var bitmapBlocks = 1
        while (end - before - bitmapBlocks) > bitmapBlocks * bitsPerBitmapBlock { bitmapBlocks += 1 }
        let dataStart = before + bitmapBlocks
        let dataBlocks = end - dataStart
        guard dataBlocks >= 16 else {
            throw DAXError(
                .noSpace,
                "a device of \(counted(total, "block")) leaves \(dataBlocks) data blocks after metadata; "
                    + "\(journal) journal and \(inodeBlocks) inode table blocks need a larger device")
        }
        return Superblock(
            totalBlocks: totalBlocks, journalStart: 1, journalBlocks: UInt64(journal), inodeStart: UInt64(1 + journal),
            inodeBlocks: UInt64(inodeBlocks), inodeCount: UInt64(inodes), bitmapStart: UInt64(before),
            bitmapBlocks: UInt64(bitmapBlocks), dataStart: UInt64(dataStart), dataBlocks: UInt64(dataBlocks))
    }

    func encode() -> [UInt8] {
        var e = ByteEncoder(count: Self.size)
        e.put(Self.magic, at: 0)
        e.put(version, at: 8)
        e.put(UInt32(0), at: 12)
        e.put(UInt32(Self.blockSize), at: 16)
        e.put(totalBlocks, at: 24)
        e.put(journalStart, at: 32)
        e.put(journalBlocks, at: 40)
        e.put(inodeStart, at: 48)
        e.put(inodeBlocks, at: 56)
        e.put(inodeCount, at: 64)
        e.put(bitmapStart, at: 72)
        e.put(bitmapBlocks, at: 80)
        e.put(dataStart, at: 88)
        e.put(dataBlocks, at: 96)
        e.put(Self.rootInode, at: 104)
        e.put(orphanHead, at: 112)
        e.put(uuid, at: 120)
        e.put(formatTime, at: 136)
        e.sealCRC(of: 0..<252, at: 252)
        return e.bytes
    }

    /// Decodes and validates a superblock (block 0's, or the backup in `block`). Throws
    /// `.corrupted` saying what is wrong.
    static func decode(_ reader: ByteReader, deviceBlocks: UInt64, block: UInt64 = 0) throws -> Superblock {
        let which = block == 0 ? "superblock" : "backup superblock in block \(block)"
        guard reader.bytes(0..<8) == magic else {
            throw DAXError(
                .corrupted,
                block == 0
                    ? "no DAXFS file system on the device: the superblock magic is missing"
                    : "the \(which) has no DAXFS magic")
        }
        guard reader.get(UInt32.self, at: 252) == reader.crc(of: 0..<252) else {
            throw DAXError(.corrupted, "\(which) checksum mismatch" + (block == 0 ? " at block 0" : ""))
        }
        let version: UInt32 = reader.get(at: 8)
        guard readableVersions.contains(version) else {
            throw DAXError(
                .corrupted, "\(which) version \(version) is not supported (this build reads versions 1 to 3)")
        }
        guard block == 0 || version >= 2 else {
            throw DAXError(.corrupted, "the \(which) says version \(version), which keeps no backup")
        }
        let features: UInt32 = reader.get(at: 12)
        guard features == 0 else {
            throw DAXError(.corrupted, "superblock has unknown feature flags 0x\(String(features, radix: 16))")
        }
        guard reader.get(UInt32.self, at: 16) == UInt32(blockSize), reader.get(UInt32.self, at: 104) == rootInode else {
            throw DAXError(.corrupted, "superblock block size or root inode is wrong")
        }
        let sb = Superblock(
            version: version, totalBlocks: reader.get(at: 24), journalStart: reader.get(at: 32),
            journalBlocks: reader.get(at: 40),
            inodeStart: reader.get(at: 48), inodeBlocks: reader.get(at: 56), inodeCount: reader.get(at: 64),
            bitmapStart: reader.get(at: 72), bitmapBlocks: reader.get(at: 80), dataStart: reader.get(at: 88),
            dataBlocks: reader.get(at: 96), orphanHead: reader.get(at: 112), uuid: reader.bytes(120..<136),
            formatTime: reader.get(at: 136))
        if let problem = sb.geometryProblem(deviceBlocks: deviceBlocks) {
            throw DAXError(.corrupted, "\(which) geometry is inconsistent: \(problem)")
        }
        return sb
    }

    /// Why the regions do not tile the device, or nil.
    func geometryProblem(deviceBlocks: UInt64) -> String? {
        if totalBlocks != deviceBlocks {
            // With a good checksum, the device's size changed after format (a host file grown or
            // cut with truncate(1)): a file system keeps the size it was made for.
            let formatted = totalBlocks.multipliedReportingOverflow(by: UInt64(Self.blockSize))
            let bytes = formatted.overflow ? "" : " (truncate -s \(formatted.partialValue))"
            return "it describes \(counted(totalBlocks, "block")) but the device has \(deviceBlocks): the device was "
                + "resized after format; give it back its size\(bytes) to read it"
        }
        if journalStart != 1 || journalBlocks < 8 || journalBlocks > 1 << 20 {
            return "journal at \(journalStart) of \(counted(journalBlocks, "block"))"
        }
        if inodeStart != journalStart + journalBlocks { return "inode table does not follow the journal" }
        if inodeCount == 0 || inodeCount > UInt64(Self.maximumInodes)
            || inodeBlocks != (inodeCount + UInt64(Self.inodesPerBlock) - 1) / UInt64(Self.inodesPerBlock)
        {
            return "\(counted(inodeCount, "inode")) in \(counted(inodeBlocks, "block"))"
        }
        if bitmapStart != inodeStart + inodeBlocks { return "bitmap does not follow the inode table" }
        if bitmapBlocks == 0 || bitmapBlocks > totalBlocks { return "bitmap of \(counted(bitmapBlocks, "block"))" }
        if dataStart != bitmapStart + bitmapBlocks { return "data region does not follow the bitmap" }
        if dataStart >= dataEnd || dataBlocks != dataEnd - dataStart {
            return "data region of \(counted(dataBlocks, "block"))"
        }
        if bitmapBlocks * UInt64(Self.bitsPerBitmapBlock) < dataBlocks { return "bitmap too small for the data region" }
        if orphanHead > inodeCount { return "orphan list head \(orphanHead) is not an inode" }
        return nil
    }

    /// Device byte offset of inode `number` (1-based).
    func inodeOffset(_ number: UInt32) -> Int {
        Int(inodeStart) * Self.blockSize + (Int(number) - 1) * Self.inodeSize
    }

    /// Device byte offset of the bitmap byte holding data block index `index`'s bit.
    func bitmapByteOffset(_ index: UInt64) -> Int {
        let block = Int(index) / Self.bitsPerBitmapBlock
        let within = (Int(index) % Self.bitsPerBitmapBlock) / 8
        return (Int(bitmapStart) + block) * Self.blockSize + within
    }

    /// The first leaf of the shared-block table: the journal region's last block (version 3 and
    /// later), or nil for a device that cannot share blocks.
    var sharedTableRoot: UInt64? { version >= 3 ? journalStart + journalBlocks - 1 : nil }

    /// Journal blocks the header and the records use: all but the shared-block table's root.
    var journalUsedBlocks: UInt64 { version >= 3 ? journalBlocks - 1 : journalBlocks }

    /// Whether the last block holds a backup copy (version 2 and later).
    var hasBackup: Bool { version >= 2 }

    /// The block of the backup superblock (the device's last), or nil for version 1.
    var backupBlock: UInt64? { hasBackup ? max(totalBlocks, 1) - 1 : nil }

    /// The block after the data region: the backup's block, or the end of the device.
    var dataEnd: UInt64 { hasBackup ? max(totalBlocks, 1) - 1 : totalBlocks }

    var dataRange: Range<UInt64> { dataStart..<dataEnd }
}

extension Superblock {
    /// Block 0's superblock, or the backup in the last block when block 0 is damaged, with what
    /// is wrong with block 0 in that case. Throws `.corrupted` when neither can be used.
    static func locate(base: UnsafeRawPointer, deviceBlocks: UInt64) throws -> (Superblock, primaryDamage: String?) {
        do {
            return (try decode(ByteReader(base, count: size), deviceBlocks: deviceBlocks), nil)
        } catch let primary as DAXError {
            guard deviceBlocks >= 2 else { throw primary }
            let block = deviceBlocks - 1
            let reader = ByteReader(base + Int(block) * blockSize, count: size)
            do {
                return (try decode(reader, deviceBlocks: deviceBlocks, block: block), primary.message)
            } catch let backup as DAXError {
                // A device without a backup (version 1, or never formatted) says only what block 0 lacks.
                guard reader.bytes(0..<8) == magic else { throw primary }
                throw DAXError(.corrupted, primary.message + "; and " + backup.message)
            }
        }
    }
}
