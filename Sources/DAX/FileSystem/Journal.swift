import Synchronization

/// A metadata change built in DRAM and committed to the journal at once. See `docs/format.md`.
struct Transaction {
    enum Record {
        /// Write `bytes` at device offset `offset`.
        case write(offset: Int, bytes: [UInt8])
        /// Set (`value` true) or clear the bitmap bits of data-block indices `range`.
        case bits(range: Range<UInt64>, value: Bool)
        /// Set (OR, `value` true) or clear (AND-NOT) the bitmap bits that `mask` has set, the mask's
        /// bit 0 being data-block index `first` (a multiple of 8). Many nearby runs in one record.
        case mask(first: UInt64, mask: [UInt8], value: Bool)

        /// The kind field of an encoded record: the first 4 bytes of its header.
        enum Kind: UInt32 {
            /// ``Record/write(offset:bytes:)``.
            case write = 1
            /// ``Record/bits(range:value:)`` with `value` true.
            case setBits = 2
            /// ``Record/bits(range:value:)`` with `value` false.
            case clearBits = 3
            /// ``Record/mask(first:mask:value:)`` with `value` true.
            case setMask = 4
            /// ``Record/mask(first:mask:value:)`` with `value` false.
            case clearMask = 5
        }

        var kind: Kind {
            switch self {
            case .write: .write
            case .bits(_, let value): value ? .setBits : .clearBits
            case .mask(_, _, let value): value ? .setMask : .clearMask
            }
        }
    }

    static let recordHeaderSize = 24
    /// Runs closer than this (in bits) share a mask record.
    static let maskGap: UInt64 = 512

    private var writes: [Record] = []
    private var writeSize = 0
    private var setRanges: [Range<UInt64>] = []
    private var clearRanges: [Range<UInt64>] = []

    var isEmpty: Bool { writes.isEmpty && setRanges.isEmpty && clearRanges.isEmpty }

    mutating func write(_ bytes: [UInt8], at offset: Int) {
        writes.append(.write(offset: offset, bytes: bytes))
        writeSize += Self.recordHeaderSize + (bytes.count + 7) & ~7
    }

    /// Marks data-block indices `range` allocated (true) or free (false) in the bitmap.
    mutating func setBits(_ range: Range<UInt64>, to value: Bool) {
        guard !range.isEmpty else { return }
        if value { setRanges.append(range) } else { clearRanges.append(range) }
    }

    /// The records, bitmap changes last: runs that lie close together become one mask record
    /// when that is smaller (an allocation that skips quarantined blocks has thousands of runs).
    var records: [Record] {
        writes + Self.bitRecords(setRanges, value: true) + Self.bitRecords(clearRanges, value: false)
    }

    /// Bytes the records take in the journal.
    var encodedSize: Int { Self.size(of: records) }

    static func size(of records: [Record]) -> Int {
        records.reduce(0) { total, record in
            switch record {
            case .write(_, let bytes): total + recordHeaderSize + (bytes.count + 7) & ~7
            case .bits: total + recordHeaderSize
            case .mask(_, let mask, _): total + recordHeaderSize + (mask.count + 7) & ~7
            }
        }
    }

    private static func bitRecords(_ ranges: [Range<UInt64>], value: Bool) -> [Record] {
        guard !ranges.isEmpty else { return [] }
        var records: [Record] = []
        var cluster: [Range<UInt64>] = []
        func flush() {
            guard let first = cluster.first, let last = cluster.last else { return }
            let start = first.lowerBound & ~7
            let end = (last.upperBound + 7) & ~7
            let maskBytes = Int((end - start) / 8)
            if cluster.count == 1 || recordHeaderSize + (maskBytes + 7) & ~7 >= recordHeaderSize * cluster.count {
                records += cluster.map { .bits(range: $0, value: value) }
            } else {
                var mask = [UInt8](repeating: 0, count: maskBytes)
                for range in cluster {
                    for bit in range { mask[Int((bit - start) / 8)] |= 1 << UInt8((bit - start) % 8) }
                }
                records.append(.mask(first: start, mask: mask, value: value))
            }
            cluster = []
        }
        for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
            if let last = cluster.last, range.lowerBound > last.upperBound + maskGap { flush() }
            cluster.append(range)
        }
        flush()
        return records
    }

    /// The records as they go into the journal (tests simulate a crash after the commit point).
    func encodeForTesting() -> [UInt8] { Self.encode(records) }

    fileprivate static func encode(_ records: [Record]) -> [UInt8] {
        var e = ByteEncoder(count: size(of: records))
        var at = 0
        for record in records {
            e.put(record.kind.rawValue, at: at)
            switch record {
            case .write(let offset, let bytes):
                e.put(UInt32(bytes.count), at: at + 4)
                e.put(UInt64(offset), at: at + 8)
                e.put(bytes, at: at + recordHeaderSize)
                at += recordHeaderSize + (bytes.count + 7) & ~7
            case .bits(let range, _):
                e.put(range.lowerBound, at: at + 8)
                e.put(UInt64(range.count), at: at + 16)
                at += recordHeaderSize
            case .mask(let first, let mask, _):
                e.put(UInt32(mask.count), at: at + 4)
                e.put(first, at: at + 8)
                e.put(UInt64(mask.count * 8), at: at + 16)
                e.put(mask, at: at + recordHeaderSize)
                at += recordHeaderSize + (mask.count + 7) & ~7
            }
        }
        return e.bytes
    }
}

/// The redo journal: commits one transaction at a time and replays a committed one at mount.
final class Journal: Sendable {
    static let headerMagic: UInt32 = 0x484A_5844  // "DXJH"
    static let headerSize = 64

    /// The state field of the journal header.
    enum HeaderState: UInt32 {
        /// No transaction to replay.
        case empty = 0
        /// The records hold a committed transaction: the commit point has passed.
        case committed = 1
    }

    let device: PMemDevice
    let superblock: Superblock
    private let sequence: Mutex<UInt64>
    /// Transactions committed since mount.
    let commits = Atomic<Int>(0)

    init(device: PMemDevice, superblock: Superblock, sequence: UInt64) {
        self.device = device
        self.superblock = superblock
        self.sequence = Mutex(sequence)
    }

    var headerOffset: Int { Int(superblock.journalStart) * Superblock.blockSize }
    var recordsOffset: Int { headerOffset + Superblock.blockSize }
    /// Bytes available for one transaction's records.
    var capacity: Int { (Int(superblock.journalUsedBlocks) - 1) * Superblock.blockSize }

    /// Throws `.noSpace` if `transaction` cannot fit the journal; then nothing may be written.
    func checkFits(_ transaction: Transaction, what: String) throws {
        try checkFits(size: transaction.encodedSize, what: what)
    }

    private func checkFits(size: Int, what: String) throws {
        guard size <= capacity else {
            throw DAXError(
                .noSpace,
                "\(what) needs a metadata transaction of \(counted(size, "byte")); "
                    + "the journal holds \(capacity) (format a larger device or with a larger journal)")
        }
    }

    /// Makes `transaction` durable and applies it: records, commit header, in place, empty header.
    func commit(_ transaction: Transaction, what: String) throws {
        guard !transaction.isEmpty else { return }
        let recordList = transaction.records
        try checkFits(size: Transaction.size(of: recordList), what: what)
        let records = Transaction.encode(recordList)
        try backTargets(of: recordList, recordBytes: records.count)
        // Nothing below can fail: the device's mapping stays while a file system uses it (even
        // after `close`), and on a sparse device every byte written has storage by now, so no
        // error is ever reported after the commit point as if it were a rollback.
        sequence.withTrackedLock { sequence in
            sequence &+= 1
            write(records, at: recordsOffset)
            write(
                Self.header(sequence: sequence, committed: true, count: recordList.count, records: records),
                at: headerOffset)
            apply(recordList)
            write(Self.header(sequence: sequence, committed: false, count: 0, records: []), at: headerOffset)
        }
        commits.wrappingAdd(1, ordering: .relaxed)
    }

    /// On a sparse device, gives storage to everything a commit of `records` writes (the journal's
    /// header and records, each record's target, the bitmap blocks it changes) before any of it is
    /// written: a full `/dev/shm` is `.noSpace` with nothing changed, never a SIGBUS mid-commit.
    private func backTargets(of records: [Transaction.Record], recordBytes: Int) throws {
        guard device.isSparse else { return }
        try device.back(offset: headerOffset, count: Superblock.blockSize + recordBytes)
        for range in Self.targets(of: records, superblock: superblock) {
            try device.back(offset: range.lowerBound, count: range.count)
        }
    }

    /// The device bytes that applying `records` writes: each write's range, and the whole bitmap
    /// blocks that bit records change (their checksums are rewritten too).
    static func targets(of records: [Transaction.Record], superblock: Superblock) -> [Range<Int>] {
        let bitsPerBlock = UInt64(Superblock.bitsPerBitmapBlock)
        func bitmapBlocks(_ bits: Range<UInt64>) -> Range<Int> {
            guard !bits.isEmpty else { return 0..<0 }
            let first = Int(superblock.bitmapStart + bits.lowerBound / bitsPerBlock)
            let last = Int(superblock.bitmapStart + (bits.upperBound - 1) / bitsPerBlock)
            return first * Superblock.blockSize..<(last + 1) * Superblock.blockSize
        }
        return records.map { record in
            switch record {
            case .write(let offset, let bytes): offset..<(offset + bytes.count)
            case .bits(let range, _): bitmapBlocks(range)
            case .mask(let first, let mask, _): bitmapBlocks(first..<(first + UInt64(mask.count * 8)))
            }
        }.filter { !$0.isEmpty }
    }

    /// A durable copy to the device (`pmem_memcpy` and drain, or `msync`), which cannot fail.
    private func write(_ bytes: [UInt8], at offset: Int) {
        bytes.withUnsafeBytes { device.copy($0, at: offset) }
    }

    /// Runs `body` with no transaction in flight: `check` reads a still device.
    func withNoCommits<T>(_ body: () throws -> T) rethrows -> T {
        try sequence.withTrackedLock { _ in try body() }
    }

    private func apply(_ records: [Transaction.Record]) {
        Self.apply(records, to: device, superblock: superblock)
    }

    /// Applies `records` in place on `medium` (the device, or a private view of it).
    static func apply(_ records: [Transaction.Record], to medium: some RecordMedium, superblock: Superblock) {
        var touchedBitmapBlocks = Set<UInt64>()
        for record in records {
            switch record {
            case .write(let offset, let bytes):
                bytes.withUnsafeBytes { medium.copy($0, at: offset, flags: .noDrain) }
            case .bits(let range, let value):
                setBits(range, value: value, medium: medium, superblock: superblock, touched: &touchedBitmapBlocks)
            case .mask(let first, let mask, let value):
                applyMask(
                    mask, from: first, value: value, medium: medium, superblock: superblock,
                    touched: &touchedBitmapBlocks)
            }
        }
        // Each bitmap block is sealed and flushed once, however many records touched it.
        sealBitmapBlocks(touchedBitmapBlocks, medium: medium, superblock: superblock)
        medium.drain()
    }

    static func header(sequence: UInt64, committed: Bool, count: Int, records: [UInt8]) -> [UInt8] {
        var e = ByteEncoder(count: headerSize)
        e.put(headerMagic, at: 0)
        e.put(sequence, at: 8)
        e.put((committed ? HeaderState.committed : .empty).rawValue, at: 16)
        e.put(UInt32(count), at: 20)
        e.put(UInt64(records.count), at: 24)
        e.put(CRC32C.checksum(records), at: 32)
        e.sealCRC(of: 8..<headerSize, at: 4)
        return e.bytes
    }

    /// Sets or clears bitmap bits in place, noting the bitmap blocks touched (sealed afterwards by
    /// ``sealBitmapBlocks(_:medium:superblock:)``).
    static func setBits(
        _ range: Range<UInt64>, value: Bool, medium: some RecordMedium, superblock: Superblock,
        touched: inout Set<UInt64>
    ) {
        let bitsPerBlock = UInt64(Superblock.bitsPerBitmapBlock)
        var index = range.lowerBound
        while index < range.upperBound {
            let block = index / bitsPerBlock
            let blockEnd = min(range.upperBound, (block + 1) * bitsPerBlock)
            let blockOffset = (Int(superblock.bitmapStart) + Int(block)) * Superblock.blockSize
            let bytes = (medium.base + blockOffset).assumingMemoryBound(to: UInt8.self)
            var bit = Int(index - block * bitsPerBlock)
            let end = Int(blockEnd - block * bitsPerBlock)
            // Whole bytes with one fill, the ragged ends bit by bit.
            while bit < end && bit % 8 != 0 {
                setBit(bytes, bit, value)
                bit += 1
            }
            if end - bit >= 8 {
                let whole = (end - bit) / 8
                (bytes + bit / 8).update(repeating: value ? 0xFF : 0, count: whole)
                bit += whole * 8
            }
            while bit < end {
                setBit(bytes, bit, value)
                bit += 1
            }
            touched.insert(block)
            index = blockEnd
        }
    }

    /// ORs (or clears) `mask` into the bitmap from data-block index `first` (a multiple of 8);
    /// bits past the data region are never set.
    static func applyMask(
        _ mask: [UInt8], from first: UInt64, value: Bool, medium: some RecordMedium, superblock: Superblock,
        touched: inout Set<UInt64>
    ) {
        let bytesPerBlock = UInt64(Superblock.bitmapBytesPerBlock)
        var lastBlock = UInt64.max
        for (index, byte) in mask.enumerated() where byte != 0 {
            let bit = first + UInt64(index) * 8
            var bits = byte
            if bit + 8 > superblock.dataBlocks {
                bits &= UInt8(truncatingIfNeeded: (1 << (superblock.dataBlocks - bit)) - 1)
            }
            let byteIndex = bit / 8
            let block = byteIndex / bytesPerBlock
            let target =
                medium.base + (Int(superblock.bitmapStart) + Int(block)) * Superblock.blockSize
                + Int(byteIndex % bytesPerBlock)
            let current = target.load(as: UInt8.self)
            target.storeBytes(of: value ? current | bits : current & ~bits, as: UInt8.self)
            if block != lastBlock {
                touched.insert(block)
                lastBlock = block
            }
        }
    }

    /// Recomputes the checksum of each bitmap block in `blocks` and flushes it.
    static func sealBitmapBlocks(_ blocks: Set<UInt64>, medium: some RecordMedium, superblock: Superblock) {
        for block in blocks {
            let blockOffset = (Int(superblock.bitmapStart) + Int(block)) * Superblock.blockSize
            let bytes = medium.base + blockOffset
            let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: bytes, count: Superblock.bitmapBytesPerBlock))
            (bytes + Superblock.bitmapBytesPerBlock).storeBytes(of: crc.littleEndian, as: UInt32.self)
            medium.flush(at: blockOffset, count: Superblock.blockSize)
        }
    }

    private static func setBit(_ bytes: UnsafeMutablePointer<UInt8>, _ bit: Int, _ value: Bool) {
        if value { bytes[bit / 8] |= 1 << (bit % 8) } else { bytes[bit / 8] &= ~(1 << (bit % 8)) }
    }

    // MARK: - Recovery

    /// What the journal held at mount.
    enum RecoveryOutcome: Equatable {
        case empty
        /// A torn header: a crash while committing or emptying; nothing to replay.
        case tornHeader
        case replayed(records: Int)
    }

    /// What the journal area holds, validated but not applied.
    enum Contents {
        case empty(sequence: UInt64)
        /// A torn header: a crash while committing or emptying; nothing to replay.
        case tornHeader
        case committed(sequence: UInt64, records: [Transaction.Record])
    }

    /// Reads and validates the journal without changing the device: throws `.corrupted` for
    /// anything a crash cannot leave behind (a bad magic, an unknown state, records that do not
    /// match the committed header's checksum or that write outside the metadata and data regions).
    static func read(device: PMemDevice, superblock: Superblock) throws -> Contents {
        let headerOffset = Int(superblock.journalStart) * Superblock.blockSize
        let header = ByteReader(device.base + headerOffset, count: headerSize)
        guard header.get(UInt32.self, at: 0) == headerMagic else {
            throw DAXError(.corrupted, "journal header at block \(superblock.journalStart) has a bad magic number")
        }
        guard header.get(UInt32.self, at: 4) == header.crc(of: 8..<headerSize) else { return .tornHeader }
        let sequence: UInt64 = header.get(at: 8)
        let rawState: UInt32 = header.get(at: 16)
        guard let state = HeaderState(rawValue: rawState) else {
            throw DAXError(.corrupted, "journal header has unknown state \(rawState)")
        }
        guard state == .committed else { return .empty(sequence: sequence) }
        let count = Int(header.get(UInt32.self, at: 20))
        let length: UInt64 = header.get(at: 24)
        let capacity = (Int(superblock.journalUsedBlocks) - 1) * Superblock.blockSize
        guard length <= UInt64(capacity) else {
            throw DAXError(
                .corrupted,
                "journal header claims \(counted(length, "byte")) of records; the journal holds \(capacity)")
        }
        let area = ByteReader(device.base + headerOffset + Superblock.blockSize, count: Int(length))
        guard header.get(UInt32.self, at: 32) == area.crc(of: 0..<Int(length)) else {
            // The header was written after the records were durable, so this is damage, not a crash.
            throw DAXError(.corrupted, "journal records do not match their checksum in the committed header")
        }
        return .committed(sequence: sequence, records: try decode(area, count: count, superblock: superblock))
    }

    /// Replays a committed transaction, if any. Returns what it found and the last sequence number.
    static func recover(device: PMemDevice, superblock: Superblock) throws -> (RecoveryOutcome, UInt64) {
        switch try read(device: device, superblock: superblock) {
        case .empty(let sequence):
            return (.empty, sequence)
        case .tornHeader:
            return (.tornHeader, 0)
        case .committed(let sequence, let records):
            let journal = Journal(device: device, superblock: superblock, sequence: sequence)
            journal.apply(records)
            journal.write(
                Self.header(sequence: sequence, committed: false, count: 0, records: []),
                at: Int(superblock.journalStart) * Superblock.blockSize)
            return (.replayed(records: records.count), sequence)
        }
    }

    /// Decodes and validates records: a write must rewrite exactly the superblock's first 256 bytes
    /// or land past the journal and before the end of the data region (never on the backup
    /// superblock); bits inside the bitmap.
    private static func decode(_ area: ByteReader, count: Int, superblock: Superblock) throws -> [Transaction.Record] {
        var records: [Transaction.Record] = []
        var at = 0
        let firstWritable = Int(superblock.sharedTableRoot ?? superblock.inodeStart) * Superblock.blockSize
        let writableEnd = Int(superblock.dataEnd) * Superblock.blockSize
        for index in 0..<count {
            guard at + Transaction.recordHeaderSize <= area.count else {
                throw DAXError(.corrupted, "journal record \(index) runs past the committed records")
            }
            let rawKind: UInt32 = area.get(at: at)
            guard let kind = Transaction.Record.Kind(rawValue: rawKind) else {
                throw DAXError(.corrupted, "journal record \(index) has unknown kind \(rawKind)")
            }
            switch kind {
            case .write:
                let length = Int(area.get(UInt32.self, at: at + 4))
                let offset: UInt64 = area.get(at: at + 8)
                let padded = (length + 7) & ~7
                let superblockRecord = offset == 0 && length == Superblock.size
                guard at + Transaction.recordHeaderSize + padded <= area.count,
                    superblockRecord
                        || (offset >= UInt64(firstWritable) && offset <= UInt64(writableEnd)
                            && UInt64(length) <= UInt64(writableEnd) - offset)
                else {
                    throw DAXError(
                        .corrupted,
                        "journal record \(index) writes \(counted(length, "byte")) at offset \(offset): neither the "
                            + "whole superblock (256 bytes at offset 0) nor inside the metadata and data regions")
                }
                let start = at + Transaction.recordHeaderSize
                records.append(.write(offset: Int(offset), bytes: area.bytes(start..<(start + length))))
                at += Transaction.recordHeaderSize + padded
            case .setBits, .clearBits:
                let first: UInt64 = area.get(at: at + 8)
                let bits: UInt64 = area.get(at: at + 16)
                guard bits > 0, first < superblock.dataBlocks, bits <= superblock.dataBlocks - first else {
                    throw DAXError(
                        .corrupted,
                        "journal record \(index) changes bitmap bits \(first) + \(bits), outside "
                            + "the \(superblock.dataBlocks) data blocks")
                }
                records.append(.bits(range: first..<(first + bits), value: kind == .setBits))
                at += Transaction.recordHeaderSize
            case .setMask, .clearMask:
                let length = Int(area.get(UInt32.self, at: at + 4))
                let first: UInt64 = area.get(at: at + 8)
                let bits: UInt64 = area.get(at: at + 16)
                let padded = (length + 7) & ~7
                guard at + Transaction.recordHeaderSize + padded <= area.count, first % 8 == 0,
                    bits == UInt64(length) * 8, first < superblock.dataBlocks,
                    bits <= (superblock.dataBlocks + 7) / 8 * 8 - first
                else {
                    throw DAXError(
                        .corrupted,
                        "journal record \(index) masks bitmap bits \(first) + \(bits), outside the "
                            + "\(superblock.dataBlocks) data blocks")
                }
                let start = at + Transaction.recordHeaderSize
                records.append(.mask(first: first, mask: area.bytes(start..<(start + length)), value: kind == .setMask))
                at += Transaction.recordHeaderSize + padded
            }
        }
        return records
    }
}
