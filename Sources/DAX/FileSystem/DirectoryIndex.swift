/// A directory's entries in DRAM, and where each lives on the device.
struct DirectoryIndex: Sendable {
    struct SlotAddress: Hashable, Sendable {
        /// Index of the directory block in the directory (its file page).
        var block: Int
        var slot: Int
    }

    struct Entry: Sendable {
        var inode: UInt32
        var kind: InodeRecord.Kind
        var slot: SlotAddress
    }

    var entries: [[UInt8]: Entry] = [:]
    /// Entries naming an inode that is damaged (a degraded read-only mount names them in errors).
    var damagedEntries: [[UInt8]: UInt32] = [:]
    /// What is damaged in the directory's blocks: a name missing from `entries` may have been there.
    var damage: [String] = []
    /// Free slots of the directory's blocks (a stack; which free slot is reused does not matter).
    var freeSlots: [SlotAddress] = []
    /// Directory blocks.
    var blockCount = 0

    var isEmpty: Bool { entries.isEmpty }

    /// Names in byte order (UTF-8 byte order is code-point order).
    var sortedNames: [String] {
        entries.keys.sorted { $0.lexicographicallyPrecedes($1) }.map { String(decoding: $0, as: UTF8.self) }
    }

    mutating func addBlock() {
        for slot in (0..<DirectoryFormat.slotsPerBlock).reversed() {
            freeSlots.append(SlotAddress(block: blockCount, slot: slot))
        }
        blockCount += 1
    }

    mutating func release(_ slot: SlotAddress) { freeSlots.append(slot) }

    /// Takes `slot`, which `DAXFileSystem.planSlot` chose: the top of the free stack.
    mutating func take(_ slot: SlotAddress) {
        precondition(freeSlots.last == slot, "directory slot \(slot) is not the one planned")
        freeSlots.removeLast()
    }
}
