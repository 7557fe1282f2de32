/// A run of blocks that several extents name, and how many: one entry of the shared-block table.
struct SharedRun: Equatable, Sendable, CustomStringConvertible {
    static let size = 16
    /// A run longer than this is stored as several.
    static let maximumLength: UInt64 = UInt64(UInt32.max)

    var start: UInt64
    var length: UInt64
    /// Extents naming each block of the run: at least 2.
    var count: UInt32

    var end: UInt64 { start + length }
    var range: Range<UInt64> { start..<end }

    /// Told from the fields themselves, so that a run read from a damaged table (a start near
    /// 2^64) can be named in the error that refuses it.
    var description: String {
        let (end, overflow) = start.addingReportingOverflow(length)
        return overflow ? "[\(start) + \(length) blocks x\(count)]" : "[\(start)..<\(end) x\(count)]"
    }
}

/// One block of the shared-block table: sorted runs and the next leaf. The first leaf is the last
/// block of the journal region (from format version 3), so the table needs no pointer anywhere; an
/// all-zero first leaf is an empty table. See `docs/format.md`.
enum SharedBlockLeaf {
    static let magic: UInt32 = 0x4352_5844  // "DXRC"
    static let headerSize = 32
    static let capacity = (Superblock.blockSize - headerSize) / SharedRun.size

    static func encode(_ runs: ArraySlice<SharedRun>, next: UInt64) -> [UInt8] {
        precondition(runs.count <= capacity, "shared-block leaf of \(runs.count) runs")
        var e = ByteEncoder(count: Superblock.blockSize)
        e.put(magic, at: 0)
        e.put(UInt32(runs.count), at: 8)
        e.put(next, at: 16)
        for (i, run) in runs.enumerated() {
            let at = headerSize + i * SharedRun.size
            e.put(run.start, at: at)
            e.put(UInt32(run.length), at: at + 8)
            e.put(run.count, at: at + 12)
        }
        e.sealCRC(of: 8..<Superblock.blockSize, at: 4)
        return e.bytes
    }

    /// Decodes a leaf; an all-zero block is an empty one (the first leaf, never written).
    static func decode(_ reader: ByteReader) -> Result<(runs: [SharedRun], next: UInt64), InodeProblem> {
        if reader.allZero(0..<Superblock.blockSize) { return .success(([], 0)) }
        guard reader.get(UInt32.self, at: 0) == magic else { return .failure(.field("shared-block leaf magic")) }
        guard reader.get(UInt32.self, at: 4) == reader.crc(of: 8..<Superblock.blockSize) else {
            return .failure(.checksum)
        }
        let count = Int(reader.get(UInt32.self, at: 8))
        guard count <= capacity else { return .failure(.field("shared-block leaf run count \(count)")) }
        var runs: [SharedRun] = []
        runs.reserveCapacity(count)
        for i in 0..<count {
            let at = headerSize + i * SharedRun.size
            let run = SharedRun(
                start: reader.get(at: at), length: UInt64(reader.get(UInt32.self, at: at + 8)),
                count: reader.get(at: at + 12))
            guard run.length > 0, run.count >= 2, run.start >> 48 == 0 else {
                return .failure(.field("shared run \(i) \(run)"))
            }
            if let last = runs.last, last.end > run.start {
                return .failure(.field("shared runs \(i - 1) and \(i) overlap or are out of order"))
            }
            runs.append(run)
        }
        return .success((runs, reader.get(at: 16)))
    }
}
