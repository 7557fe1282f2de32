/// Directory blocks and their 272-byte slots. See `docs/format.md`.
enum DirectoryFormat {
    static let magic: UInt32 = 0x4244_5844  // "DXDB"
    static let headerSize = 16
    static let slotSize = 272
    static let slotsPerBlock = (Superblock.blockSize - headerSize) / slotSize  // 15
    static let maximumNameLength = 255

    static func header(owner: UInt32, index: UInt32) -> [UInt8] {
        var e = ByteEncoder(count: headerSize)
        e.put(magic, at: 0)
        e.put(owner, at: 4)
        e.put(index, at: 8)
        e.sealCRC(of: 0..<12, at: 12)
        return e.bytes
    }

    static func validHeader(_ reader: ByteReader, owner: UInt32, index: UInt32) -> Bool {
        reader.get(UInt32.self, at: 0) == magic && reader.get(UInt32.self, at: 4) == owner
            && reader.get(UInt32.self, at: 8) == index && reader.get(UInt32.self, at: 12) == reader.crc(of: 0..<12)
    }

    /// Byte offset of slot `slot` within its block.
    static func slotOffset(_ slot: Int) -> Int { headerSize + slot * slotSize }

    static func encodeSlot(inode: UInt32, name: [UInt8], kind: InodeRecord.Kind) -> [UInt8] {
        precondition(!name.isEmpty && name.count <= maximumNameLength)
        var e = ByteEncoder(count: slotSize)
        e.put(inode, at: 4)
        e.put(UInt16(name.count), at: 8)
        e.put(kind.rawValue, at: 10)
        e.put(name, at: 16)
        e.sealCRC(of: 4..<(16 + name.count), at: 0)
        return e.bytes
    }

    static var emptySlot: [UInt8] { [UInt8](repeating: 0, count: slotSize) }

    enum SlotContent {
        case empty
        case entry(inode: UInt32, name: [UInt8], kind: InodeRecord.Kind)
        case damaged(String)
    }

    static func decodeSlot(_ reader: ByteReader) -> SlotContent {
        let inode: UInt32 = reader.get(at: 4)
        if inode == 0 {
            return reader.allZero(0..<slotSize) ? .empty : .damaged("free slot is not zeroed")
        }
        let length = Int(reader.get(UInt16.self, at: 8))
        guard length >= 1, length <= maximumNameLength else { return .damaged("name length \(length)") }
        guard reader.get(UInt32.self, at: 0) == reader.crc(of: 4..<(16 + length)) else {
            return .damaged("checksum mismatch")
        }
        guard let kind = InodeRecord.Kind(rawValue: reader.get(at: 10)), kind != .free else {
            return .damaged("entry type \(reader.get(UInt8.self, at: 10))")
        }
        let name = reader.bytes(16..<(16 + length))
        guard Paths.isValidName(name) else { return .damaged("invalid name") }
        // Names are made from Swift strings, so a name that is not UTF-8 is damage (with a
        // checksum made right again); taken as it is, it could be listed but never looked up.
        guard String(validating: name, as: UTF8.self) != nil else { return .damaged("name is not UTF-8") }
        return .entry(inode: inode, name: name, kind: kind)
    }
}
