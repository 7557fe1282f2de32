import Testing

@testable import DAX

@Suite("CRC32C")
struct CRCTests {
    @Test("known answers, and hardware agrees with the table")
    func knownAnswers() {
        // RFC 3720 (iSCSI) test vectors.
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum(Array(0..<32)) == 0x46DD_794E)
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        let bytes = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 7919 &+ 13) }
        for length in [0, 1, 7, 8, 9, 63, 64, 4095, 4096, 10_000] {
            let slice = Array(bytes.prefix(length))
            let software = slice.withUnsafeBytes { CRC32C.software($0) }
            #expect(CRC32C.checksum(slice) == software)
        }
        // Continuing a CRC equals computing it at once.
        let whole = CRC32C.checksum(bytes)
        let split = CRC32C.checksum(Array(bytes[5000...]), continuing: CRC32C.checksum(Array(bytes[..<5000])))
        #expect(whole == split)
    }
}
