import Glibc

/// A fixed-size array of trivial values in lazily zeroed memory: an anonymous `MAP_NORESERVE`
/// mapping, so that only the pages that were written use memory. The per-block arrays of a 1 TiB
/// device (a bitmap of 2^28 bits, an owner per block) cost nothing until blocks are used.
///
/// Not synchronized: its owner holds it under a lock, or uses it from one thread. The memory is
/// reserved and released through ``SystemCalls/live``: an array has no device at hand.
final class LazyZeroedArray<Element: BitwiseCopyable>: @unchecked Sendable {
    let count: Int
    private let bytes: Int
    private let base: UnsafeMutablePointer<Element>

    init(count: Int) {
        precondition(count >= 0, "a lazily zeroed array of \(count) elements")
        self.count = count
        let pageSize = Int(getpagesize())
        bytes = max(pageSize, (count * MemoryLayout<Element>.stride + pageSize - 1) / pageSize * pageSize)
        guard
            let address = SystemCalls.live.mmap(
                nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        else {
            preconditionFailure(
                "cannot reserve \(bytes) bytes of address space for a lazily zeroed array: errno \(errno)")
        }
        base = address.bindMemory(to: Element.self, capacity: max(count, 1))
    }

    deinit { _ = SystemCalls.live.munmap(base, bytes) }

    @inline(__always)
    subscript(index: Int) -> Element {
        get {
            precondition(index >= 0 && index < count, "index \(index) outside a lazily zeroed array of \(count)")
            return base[index]
        }
        set {
            precondition(index >= 0 && index < count, "index \(index) outside a lazily zeroed array of \(count)")
            base[index] = newValue
        }
    }
}

/// A fixed-size bit array in lazily zeroed memory (see ``LazyZeroedArray``): all bits start
/// clear, and only words that were set use memory.
///
/// DAX's one bitmap type: the allocator's unavailable blocks, the inode numbers in use, and the
/// scanner's blocks owned and marked allocated. Searches go a 64-bit word at a time.
final class LazyBitmap: @unchecked Sendable {
    /// Bits.
    let count: Int
    private let words: LazyZeroedArray<UInt64>

    init(count: Int) {
        self.count = count
        words = LazyZeroedArray(count: (count + 63) / 64)
    }

    @inline(__always)
    subscript(index: Int) -> Bool {
        words[index / 64] & (1 << UInt64(index % 64)) != 0
    }

    @inline(__always)
    func set(_ index: Int) { words[index / 64] |= 1 << UInt64(index % 64) }

    @inline(__always)
    func clear(_ index: Int) { words[index / 64] &= ~(1 << UInt64(index % 64)) }

    /// The 8 bits from `index` (a multiple of 8) as a byte, the bit at `index` its lowest: the
    /// order of the device's bitmap blocks. Bits past ``count`` read as clear.
    @inline(__always)
    func byte(at index: Int) -> UInt8 {
        precondition(index % 8 == 0 && index >= 0 && index < count, "no byte of bits at \(index) of \(count)")
        return UInt8(truncatingIfNeeded: words[index / 64] >> UInt64(index % 64))
    }

    /// Sets the bits of `byte` among the 8 bits from `index` (a multiple of 8), as ``byte(at:)``
    /// orders them; its clear bits change nothing. None may lie past ``count``.
    @inline(__always)
    func formUnion(byte: UInt8, at index: Int) {
        precondition(
            index % 8 == 0 && index >= 0 && index + (8 - byte.leadingZeroBitCount) <= count,
            "no byte of bits at \(index) of \(count)")
        words[index / 64] |= UInt64(byte) << UInt64(index % 64)
    }

    /// The first clear bit at or after `from`, below `limit`.
    func nextClear(from: Int, limit: Int) -> Int? { next(from: from, limit: limit, invert: true) }

    /// The first set bit at or after `from`, below `limit`.
    func nextSet(from: Int, limit: Int) -> Int? { next(from: from, limit: limit, invert: false) }

    private func next(from: Int, limit: Int, invert: Bool) -> Int? {
        guard from < limit, from < count else { return nil }
        var wordIndex = from / 64
        var word = (invert ? ~words[wordIndex] : words[wordIndex]) & (~0 << UInt64(from % 64))
        while true {
            if word != 0 {
                let bit = wordIndex * 64 + word.trailingZeroBitCount
                return bit < min(limit, count) ? bit : nil
            }
            wordIndex += 1
            guard wordIndex < words.count, wordIndex * 64 < limit else { return nil }
            word = invert ? ~words[wordIndex] : words[wordIndex]
        }
    }
}
