/// The pages of a writable mapping that may hold stores not yet made durable: a bit per page,
/// set when a page is mapped or a store faults on it, cleared by `sync` as it write-protects the
/// page (the dirty tags of the kernel's page cache entries). Kept under the mapping's lock.
struct DirtyPages: ~Copyable {
    private let words: LazyZeroedArray<UInt64>
    /// Words below this one hold no bit, nor do words from `end` on.
    private var start: Int
    private var end = 0
    /// Bits set.
    private(set) var count = 0

    init(pages: Int) {
        words = LazyZeroedArray(count: (pages + 63) / 64)
        start = words.count
    }

    /// Marks `pages` dirty.
    mutating func insert(_ pages: Range<Int>) {
        guard !pages.isEmpty else { return }
        start = min(start, pages.lowerBound / 64)
        end = max(end, (pages.upperBound + 63) / 64)
        for page in pages {
            let bit = UInt64(1) << UInt64(page % 64)
            if words[page / 64] & bit == 0 {
                words[page / 64] |= bit
                count += 1
            }
        }
    }

    /// Marks `pages` clean, for pages whose blocks left the mapping.
    mutating func remove(_ pages: Range<Int>) {
        guard count > 0 else { return }
        for page in pages.clamped(to: (start * 64)..<(end * 64)) {
            let bit = UInt64(1) << UInt64(page % 64)
            if words[page / 64] & bit != 0 {
                words[page / 64] &= ~bit
                count -= 1
            }
        }
    }

    /// Every dirty page as runs, in order, and all of them clean.
    mutating func takeAll() -> [Range<Int>] {
        var runs: [Range<Int>] = []
        guard count > 0 else { return runs }
        var open: Int?
        for word in start..<end {
            var bits = words[word]
            if bits == 0 {
                if let first = open {
                    runs.append(first..<(word * 64))
                    open = nil
                }
                continue
            }
            words[word] = 0
            if bits == ~0 {
                // A whole word dirty (the common case after a large store): the run goes on.
                if open == nil { open = word * 64 }
                continue
            }
            for bit in 0..<64 {
                let page = word * 64 + bit
                if bits & 1 != 0 {
                    if open == nil { open = page }
                } else if let first = open {
                    runs.append(first..<page)
                    open = nil
                }
                bits >>= 1
            }
        }
        if let first = open { runs.append(first..<(end * 64)) }
        count = 0
        start = words.count
        end = 0
        return runs
    }
}
