/// Little-endian encoding into byte arrays, the form in which metadata enters the journal.
struct ByteEncoder {
    var bytes: [UInt8]

    init(count: Int) { bytes = [UInt8](repeating: 0, count: count) }

    mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= bytes.count, "encoding past the end of a record")
        bytes.withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }

    mutating func put(_ source: [UInt8], at offset: Int) {
        precondition(offset >= 0 && offset + source.count <= bytes.count, "encoding past the end of a record")
        guard !source.isEmpty else { return }
        bytes.withUnsafeMutableBytes { target in
            source.withUnsafeBytes {
                (target.baseAddress! + offset).copyMemory(from: $0.baseAddress!, byteCount: $0.count)
            }
        }
    }

    /// Stores the CRC-32C of `range` at `offset`.
    mutating func sealCRC(of range: Range<Int>, at offset: Int) {
        let crc = CRC32C.checksum(bytes[range])
        put(crc, at: offset)
    }
}

/// Little-endian reading of a bounded region: device memory or a byte array. Every read is
/// checked against the region's length, so damaged metadata cannot lead a reader astray.
struct ByteReader {
    let base: UnsafeRawPointer
    let count: Int

    init(_ base: UnsafeRawPointer, count: Int) {
        self.base = base
        self.count = count
    }

    func get<T: FixedWidthInteger>(_: T.Type = T.self, at offset: Int) -> T {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count, "metadata read outside its region")
        return T(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: T.self))
    }

    func bytes(_ range: Range<Int>) -> [UInt8] {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "metadata read outside its region")
        return [UInt8](UnsafeRawBufferPointer(start: base + range.lowerBound, count: range.count))
    }

    func crc(of range: Range<Int>) -> UInt32 {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "metadata read outside its region")
        return CRC32C.checksum(UnsafeRawBufferPointer(start: base + range.lowerBound, count: range.count))
    }

    func allZero(_ range: Range<Int>) -> Bool {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "metadata read outside its region")
        return UnsafeRawBufferPointer(start: base + range.lowerBound, count: range.count).allSatisfy { $0 == 0 }
    }
}
