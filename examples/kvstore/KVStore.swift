import CommandLineSupport
import DAX
import Foundation

/// A persistent hash table kept in one DAX file, read and written with direct loads and stores
/// through a `DAXMapping`.
///
/// Layout of the file (all integers little-endian, offsets are file offsets):
///
///     0      header: magic, version, bucket count, start of the entry log, cursor hint
///     4096   buckets: one 8-byte offset per bucket, the newest entry of its chain (0: empty)
///     ...    the entry log: entries appended one after the other, never changed in place
///
/// An entry is `next (8) | key length (4) | value length (4, 0xFFFFFFFF for a deletion) |
/// checksum (8) | key | value`, padded to 8 bytes; `next` is the older entry of the same chain.
///
/// Every update is crash-atomic: the new entry is written past the end of the log and persisted,
/// then the bucket's head is replaced by its offset with one aligned 8-byte store, persisted.
/// A crash before that store leaves the entry unreachable (its space is reused on the next open);
/// after it, the update is complete. No update changes a reachable byte except that one word.
final class KVStore {
    static let magic: UInt64 = 0x0153_4B56_5841_44  // "DAXVKS\x01" read little-endian
    static let headerSize = 4096
    static let entryHeader = 24
    static let deletion: UInt32 = 0xFFFF_FFFF
    static let maximumKey = 1 << 16
    static let maximumValue = 1 << 24
    static let maximumBuckets = 1 << 28

    let file: DAXFile
    private(set) var mapping: DAXMapping
    let bucketCount: Int
    let entriesStart: Int
    /// End of the log: where the next entry goes.
    private(set) var cursor: Int
    private var putsSinceHint = 0

    /// Opens the store in `path`; when `create` is set, creates it with `buckets` buckets if it
    /// does not exist (or is an empty file).
    convenience init(fileSystem fs: DAXFileSystem, path: String, buckets: Int = 1 << 20, create: Bool = true)
        throws
    {
        try Self.checkBuckets(buckets)
        // A store is made whole in an unnamed file and linked at `path` (DAX's createAtomically),
        // so a kill while making it leaves no half-made store there.
        let file: DAXFile
        do {
            file =
                create
                ? try fs.openOrCreate(path) { try Self.build(in: $0, buckets: buckets) }
                : try fs.open(path)
        } catch let error as DAXError where error.code == .notFound && !create {
            throw CommandError("no store at \(path) (`kvstore put` or `kvstore load` creates one)")
        }
        do {
            try self.init(file: file)
        } catch {
            file.close()
            throw error
        }
    }

    /// A new, empty store with `buckets` buckets in an unnamed file of `fs`: it has no name, so it
    /// is gone when closed, and a kill leaves nothing behind (the next mount reclaims it).
    static func scratch(in fs: DAXFileSystem, buckets: Int) throws -> KVStore {
        try checkBuckets(buckets)
        let file = try fs.createUnnamed(in: "/")
        do {
            try build(in: file, buckets: buckets)
            return try KVStore(file: file)
        } catch {
            file.close()
            throw error
        }
    }

    private static func checkBuckets(_ buckets: Int) throws {
        guard (1...maximumBuckets).contains(buckets) else {
            throw CommandError("a store has 1 to \(maximumBuckets) buckets, not \(buckets)")
        }
    }

    /// Opens the store in `file`; ``close()`` closes it. When this throws, the caller closes it.
    private init(file: DAXFile) throws {
        self.file = file
        let path = file.path
        guard file.size >= Self.headerSize else { throw CommandError("\(path) is not a kvstore (too small)") }
        mapping = try file.map(count: file.size)
        let base = mapping.baseAddress
        guard base.loadUnaligned(as: UInt64.self) == Self.magic,
            base.loadUnaligned(fromByteOffset: 8, as: UInt64.self) == 1
        else { throw CommandError("\(path) is not a kvstore (bad magic or version)") }
        // Every field is range-checked before it is used as an Int.
        let buckets = base.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
        let start = base.loadUnaligned(fromByteOffset: 24, as: UInt64.self)
        guard (1...UInt64(Self.maximumBuckets)).contains(buckets),
            start == UInt64(Self.headerSize) + (buckets * 8 + 4095) / 4096 * 4096, start <= UInt64(file.size)
        else { throw CommandError("\(path) has a damaged header (\(buckets) buckets, entries at \(start))") }
        bucketCount = Int(buckets)
        entriesStart = Int(start)
        let hint = base.loadUnaligned(fromByteOffset: 32, as: UInt64.self)
        cursor = (UInt64(entriesStart)...UInt64(file.size)).contains(hint) ? Int(hint) : entriesStart
        // Entries written after the hint was stored: walk forward while they are whole.
        while let size = entrySize(at: cursor) { cursor += size }
    }

    /// Lays a new store out in the empty `file`: zeroed buckets and log, then the header, which
    /// makes it a store.
    private static func build(in file: DAXFile, buckets: Int) throws {
        let entriesStart = headerSize + (buckets * 8 + 4095) / 4096 * 4096
        // Every block now, zeroed: a device too small for the store fails here, before it exists.
        try file.allocate(offset: 0, count: entriesStart + (16 << 20))
        let mapping = try file.map(count: headerSize)
        defer { mapping.unmap() }
        var header = [UInt8](repeating: 0, count: 40)
        put(magic, into: &header, at: 0)
        put(UInt64(1), into: &header, at: 8)
        put(UInt64(buckets), into: &header, at: 16)
        put(UInt64(entriesStart), into: &header, at: 24)
        put(UInt64(entriesStart), into: &header, at: 32)
        header.withUnsafeBytes { mapping.copy($0, toOffset: 0) }
    }

    /// Stores the cursor hint (so the next open scans less) and unmaps.
    func close() {
        storeHint()
        mapping.unmap()
        file.close()
    }

    // MARK: - Operations

    func put(_ key: [UInt8], _ value: [UInt8]) throws { try append(key, value, deletion: false) }

    func delete(_ key: [UInt8]) throws { try append(key, [], deletion: true) }

    /// The value of `key`, or nil. Throws if the chain leads outside the log (a damaged store).
    func get(_ key: [UInt8]) throws -> [UInt8]? {
        let bucket = bucket(for: key)
        var offset = head(of: bucket)
        var newer = cursor
        while offset != 0 {
            // Each link goes back in the log to an entry whose lengths fit before the next one.
            guard offset >= entriesStart, offset < newer, offset <= cursor - Self.entryHeader else {
                throw damaged(bucket, offset)
            }
            let base = mapping.baseAddress + offset
            let keyLength = Int(base.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            let valueLength = base.loadUnaligned(fromByteOffset: 12, as: UInt32.self)
            let stored = valueLength == Self.deletion ? 0 : Int(valueLength)
            guard keyLength <= Self.maximumKey, stored <= Self.maximumValue,
                Self.entryHeader + keyLength + stored <= cursor - offset
            else { throw damaged(bucket, offset) }
            if keyLength == key.count,
                key.withUnsafeBytes({ memcmp($0.baseAddress!, base + Self.entryHeader, keyLength) == 0 })
            {
                guard valueLength != Self.deletion else { return nil }
                return [UInt8](
                    UnsafeRawBufferPointer(start: base + Self.entryHeader + keyLength, count: Int(valueLength)))
            }
            newer = offset
            offset = Int(truncatingIfNeeded: base.loadUnaligned(as: UInt64.self))
        }
        return nil
    }

    private func damaged(_ bucket: Int, _ offset: Int) -> CommandError {
        CommandError("the store is damaged: bucket \(bucket) links to \(offset), outside its log (run `kvstore check`)")
    }

    private func append(_ key: [UInt8], _ value: [UInt8], deletion: Bool) throws {
        guard !key.isEmpty, key.count <= Self.maximumKey else {
            throw CommandError("keys are 1 to \(Self.maximumKey) bytes; this one has \(key.count)")
        }
        guard value.count <= Self.maximumValue else {
            throw CommandError("values are at most \(Self.maximumValue) bytes; this one has \(value.count)")
        }
        let size = Self.entryHeader + (key.count + value.count + 7) / 8 * 8
        if cursor + size > mapping.count { try grow(to: cursor + size) }
        let bucket = bucket(for: key)
        let offset = cursor
        // 1. The entry, past the end of the log, persisted.
        var entry = [UInt8](repeating: 0, count: size)
        Self.put(UInt64(truncatingIfNeeded: head(of: bucket)), into: &entry, at: 0)
        Self.put(UInt32(key.count), into: &entry, at: 8)
        Self.put(deletion ? Self.deletion : UInt32(value.count), into: &entry, at: 12)
        entry.replaceSubrange(Self.entryHeader..<(Self.entryHeader + key.count), with: key)
        entry.replaceSubrange(
            (Self.entryHeader + key.count)..<(Self.entryHeader + key.count + value.count), with: value)
        Self.put(Self.checksum(entry), into: &entry, at: 16)
        entry.withUnsafeBytes { mapping.copy($0, toOffset: offset) }
        cursor += size
        // 2. The commit: one aligned 8-byte store of the bucket's head, persisted.
        let slot = Self.headerSize + bucket * 8
        (mapping.baseAddress + slot).storeBytes(of: UInt64(offset).littleEndian, as: UInt64.self)
        mapping.persist(offset: slot, count: 8)
        putsSinceHint += 1
        if putsSinceHint >= 1024 { storeHint() }
    }

    private func storeHint() {
        guard putsSinceHint > 0 else { return }
        (mapping.baseAddress + 32).storeBytes(of: UInt64(cursor).littleEndian, as: UInt64.self)
        mapping.persist(offset: 32, count: 8)
        putsSinceHint = 0
    }

    /// Doubles the file (new blocks come zeroed) and maps it again.
    private func grow(to needed: Int) throws {
        var size = mapping.count
        while size < needed { size *= 2 }
        // Blocks first, all or nothing: on a full device `.noSpace` leaves the store as it was (a
        // size grown past the file's blocks would make every later open need space to map it).
        try file.allocate(offset: mapping.count, count: size - mapping.count)
        storeHint()
        mapping.unmap()
        mapping = try file.map(count: size)
    }

    // MARK: - Checking

    /// Verifies every chain: offsets inside the log, entries whole, keys in the right bucket, links
    /// only to older entries (so no cycle). Returns the live keys, or the problems found.
    func verify() -> (keys: Int, problems: [String]) {
        var problems: [String] = []
        var live = 0
        for bucket in 0..<bucketCount {
            var offset = head(of: bucket)
            var seen = Set<[UInt8]>()
            while offset != 0 {
                guard offset >= entriesStart, offset < cursor, offset % 8 == 0, let size = entrySize(at: offset),
                    offset + size <= cursor
                else {
                    problems.append("bucket \(bucket): entry at \(offset) is outside the log or damaged")
                    break
                }
                let base = mapping.baseAddress + offset
                let keyLength = Int(base.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
                let key = [UInt8](UnsafeRawBufferPointer(start: base + Self.entryHeader, count: keyLength))
                if self.bucket(for: key) != bucket {
                    problems.append("bucket \(bucket): entry at \(offset) belongs elsewhere")
                }
                if seen.insert(key).inserted, base.loadUnaligned(fromByteOffset: 12, as: UInt32.self) != Self.deletion {
                    live += 1
                }
                let next = Int(truncatingIfNeeded: base.loadUnaligned(as: UInt64.self))
                guard next < offset else {
                    problems.append("bucket \(bucket): entry at \(offset) links forward to \(next)")
                    break
                }
                offset = next
            }
            if problems.count > 20 { break }
        }
        return (live, problems)
    }

    /// The size of the whole entry at `offset`, or nil if none is there (end of log, or torn).
    private func entrySize(at offset: Int) -> Int? {
        guard offset + Self.entryHeader <= mapping.count else { return nil }
        let base = mapping.baseAddress + offset
        let keyLength = Int(base.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        let stored = base.loadUnaligned(fromByteOffset: 12, as: UInt32.self)
        let valueLength = stored == Self.deletion ? 0 : Int(stored)
        guard keyLength > 0, keyLength <= Self.maximumKey, valueLength <= Self.maximumValue else { return nil }
        let size = Self.entryHeader + (keyLength + valueLength + 7) / 8 * 8
        guard offset + size <= mapping.count else { return nil }
        var entry = [UInt8](UnsafeRawBufferPointer(start: base, count: size))
        let checksum = base.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
        Self.put(UInt64(0), into: &entry, at: 16)
        return Self.checksum(entry) == checksum ? size : nil
    }

    /// The newest entry of the bucket's chain; a damaged value comes out negative or out of range,
    /// never traps.
    private func head(of bucket: Int) -> Int {
        let stored = (mapping.baseAddress + Self.headerSize + bucket * 8).load(as: UInt64.self)
        return Int(truncatingIfNeeded: UInt64(littleEndian: stored))
    }

    private func bucket(for key: [UInt8]) -> Int { Int(Self.fnv1a(key) % UInt64(bucketCount)) }

    // MARK: - Helpers

    static func fnv1a(_ bytes: [UInt8]) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01B3
        }
        return hash
    }

    /// The entry's checksum: FNV-1a over the entry with its checksum field zero, never 0.
    static func checksum(_ entry: [UInt8]) -> UInt64 { fnv1a(entry) | 1 }

    static func put<T: FixedWidthInteger>(_ value: T, into bytes: inout [UInt8], at offset: Int) {
        withUnsafeBytes(of: value.littleEndian) { raw in
            for (index, byte) in raw.enumerated() { bytes[offset + index] = byte }
        }
    }
}
