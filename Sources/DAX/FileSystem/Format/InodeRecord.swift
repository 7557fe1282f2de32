/// What an inode says on the device (256 bytes). See `docs/format.md`.
struct InodeRecord: Equatable, Sendable {
    enum Kind: UInt8, Sendable {
        case free = 0
        case file = 1
        case directory = 2
    }

    static let inlineExtentCapacity = 8

    var kind: Kind = .free
    var linkCount: UInt32 = 0
    var generation: UInt32 = 0
    var size: UInt64 = 0
    var blockCount: UInt64 = 0
    var modificationTime: UInt64 = 0
    var changeTime: UInt64 = 0
    var parent: UInt32 = 0
    var nextOrphan: UInt32 = 0
    var extentCount: UInt32 = 0
    var leafCount: UInt32 = 0
    var firstLeaf: UInt64 = 0
    /// Up to 8 extents when `leafCount` is 0.
    var inlineExtents: [Extent] = []

    func encode() -> [UInt8] {
        var e = ByteEncoder(count: Superblock.inodeSize)
        guard kind != .free || generation != 0 else { return e.bytes }
        e.put(kind.rawValue, at: 4)
        e.put(linkCount, at: 8)
        e.put(generation, at: 12)
        e.put(size, at: 16)
        e.put(blockCount, at: 24)
        e.put(modificationTime, at: 32)
        e.put(changeTime, at: 40)
        e.put(parent, at: 48)
        e.put(nextOrphan, at: 52)
        e.put(extentCount, at: 56)
        e.put(leafCount, at: 60)
        e.put(firstLeaf, at: 64)
        precondition(inlineExtents.count <= Self.inlineExtentCapacity, "too many inline extents")
        for (i, extent) in inlineExtents.enumerated() { extent.encode(into: &e, at: 128 + i * Extent.size) }
        e.sealCRC(of: 4..<Superblock.inodeSize, at: 0)
        return e.bytes
    }

    /// Decodes an inode; a problem is described, not thrown, so that `check` can list them all.
    static func decode(_ reader: ByteReader) -> Result<InodeRecord, InodeProblem> {
        if reader.allZero(0..<Superblock.inodeSize) { return .success(InodeRecord()) }
        guard reader.get(UInt32.self, at: 0) == reader.crc(of: 4..<Superblock.inodeSize) else {
            return .failure(.checksum)
        }
        guard let kind = Kind(rawValue: reader.get(at: 4)) else {
            return .failure(.field("type \(reader.get(UInt8.self, at: 4))"))
        }
        var record = InodeRecord(
            kind: kind, linkCount: reader.get(at: 8), generation: reader.get(at: 12), size: reader.get(at: 16),
            blockCount: reader.get(at: 24), modificationTime: reader.get(at: 32), changeTime: reader.get(at: 40),
            parent: reader.get(at: 48), nextOrphan: reader.get(at: 52), extentCount: reader.get(at: 56),
            leafCount: reader.get(at: 60), firstLeaf: reader.get(at: 64))
        if kind == .free { return .success(record) }
        if record.size > Extent.maximumFileSize { return .failure(.field("size \(record.size)")) }
        if record.leafCount == 0 {
            guard record.extentCount <= UInt32(Self.inlineExtentCapacity) else {
                return .failure(.field("\(record.extentCount) inline extents"))
            }
            for i in 0..<Int(record.extentCount) {
                guard let extent = Extent.decode(reader, at: 128 + i * Extent.size) else {
                    return .failure(.field("inline extent \(i)"))
                }
                record.inlineExtents.append(extent)
            }
        }
        return .success(record)
    }
}

enum InodeProblem: Error, CustomStringConvertible {
    case checksum
    case field(String)

    var description: String {
        switch self {
        case .checksum: "checksum mismatch"
        case .field(let what): "bad \(what)"
        }
    }
}

/// A run of file pages mapped to a run of device blocks.
struct Extent: Equatable, Hashable, Sendable, CustomStringConvertible {
    static let size = 16
    static let maximumLength: UInt64 = (1 << 23) - 1
    static let logicalLimit: UInt64 = 1 << 40
    /// One page short of `logicalLimit`: page index 2^40 - 1 is the descriptors' metadata marker
    /// (`PageOwner.indexLimit`), so no file page may have it.
    static let maximumFileSize: UInt64 = (logicalLimit - 1) * UInt64(Superblock.blockSize)

    /// First file page.
    var logical: UInt64
    /// First device block (page frame number).
    var physical: UInt64
    /// Pages.
    var length: UInt64

    var logicalEnd: UInt64 { logical + length }
    var physicalEnd: UInt64 { physical + length }
    var logicalRange: Range<UInt64> { logical..<logicalEnd }

    /// The block holding file page `page`, which must be inside the extent.
    func block(for page: UInt64) -> UInt64 { physical + (page - logical) }

    /// The part of the extent covering `pages`, which must overlap it.
    func slice(_ pages: Range<UInt64>) -> Extent {
        let start = max(pages.lowerBound, logical)
        let end = min(pages.upperBound, logicalEnd)
        return Extent(logical: start, physical: physical + (start - logical), length: end - start)
    }

    /// Whether `next` continues this extent on both the file and the device.
    func canMerge(with next: Extent) -> Bool {
        logicalEnd == next.logical && physicalEnd == next.physical && length + next.length <= Self.maximumLength
    }

    func encode(into e: inout ByteEncoder, at offset: Int) {
        e.put(logical | (length << 40), at: offset)
        e.put(physical, at: offset + 8)
    }

    static func decode(_ reader: ByteReader, at offset: Int) -> Extent? {
        let word0: UInt64 = reader.get(at: offset)
        let word1: UInt64 = reader.get(at: offset + 8)
        let extent = Extent(logical: word0 & (logicalLimit - 1), physical: word1, length: (word0 >> 40) & maximumLength)
        guard extent.length > 0, extent.logicalEnd <= logicalLimit, word0 >> 63 == 0, word1 >> 48 == 0 else {
            return nil
        }
        return extent
    }

    var description: String {
        "[\(logical)..<\(logicalEnd) -> \(physical)]"
    }
}

/// An extent leaf block: up to 254 sorted extents and the next leaf of the chain.
enum ExtentLeaf {
    static let magic: UInt32 = 0x4C45_5844  // "DXEL"
    static let capacity = 254
    static let headerSize = 32

    static func encode(owner: UInt32, extents: ArraySlice<Extent>, next: UInt64) -> [UInt8] {
        precondition(!extents.isEmpty && extents.count <= capacity, "extent leaf of \(extents.count) extents")
        var e = ByteEncoder(count: Superblock.blockSize)
        e.put(magic, at: 0)
        e.put(owner, at: 8)
        e.put(UInt32(extents.count), at: 12)
        e.put(next, at: 16)
        for (i, extent) in extents.enumerated() { extent.encode(into: &e, at: headerSize + i * Extent.size) }
        e.sealCRC(of: 8..<Superblock.blockSize, at: 4)
        return e.bytes
    }

    /// The leaf's extents and next pointer, or a description of what is wrong.
    static func decode(_ reader: ByteReader, owner: UInt32) -> Result<(extents: [Extent], next: UInt64), InodeProblem> {
        guard reader.get(UInt32.self, at: 0) == magic else { return .failure(.field("extent leaf magic")) }
        guard reader.get(UInt32.self, at: 4) == reader.crc(of: 8..<Superblock.blockSize) else {
            return .failure(.field("extent leaf checksum"))
        }
        guard reader.get(UInt32.self, at: 8) == owner else { return .failure(.field("extent leaf owner")) }
        let count = Int(reader.get(UInt32.self, at: 12))
        guard count >= 1, count <= capacity else { return .failure(.field("extent leaf count \(count)")) }
        var extents: [Extent] = []
        for i in 0..<count {
            guard let extent = Extent.decode(reader, at: headerSize + i * Extent.size) else {
                return .failure(.field("extent \(i) of a leaf"))
            }
            extents.append(extent)
        }
        return .success((extents, reader.get(at: 16)))
    }
}
