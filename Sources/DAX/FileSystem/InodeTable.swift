/// Inode numbers in use and their DRAM inodes.
struct InodeTable {
    var inodes: [UInt32: Inode] = [:]
    /// Bit `n` set: inode number `n` is in use. Lazily zeroed: 16 M inodes cost nothing unused.
    private let used: LazyBitmap
    private var cursor = 1
    let count: Int

    init(count: Int) {
        self.count = count
        used = LazyBitmap(count: count + 1)
        used.set(0)  // there is no inode 0
    }

    mutating func insert(_ inode: Inode) {
        inodes[inode.number] = inode
        used.set(Int(inode.number))
    }

    /// A free inode number, marked used; nil when all are taken. Next fit from the last one taken.
    mutating func takeNumber() -> UInt32? {
        guard let number = used.nextClear(from: cursor, limit: count + 1) ?? used.nextClear(from: 1, limit: cursor)
        else { return nil }
        used.set(number)
        cursor = number % count + 1
        return UInt32(number)
    }

    /// Gives back a number taken with `takeNumber` (the inode was freed or never created).
    mutating func release(_ number: UInt32) {
        used.clear(Int(number))
        inodes[number] = nil
    }
}
