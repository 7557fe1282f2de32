/// Contiguous device pages: `count` pages from frame `start`.
///
/// A page of the device and a block of its file system are the same 4 KiB unit with the same
/// number, so one type says both what a pin covers (frames) and what the allocator hands out or
/// a transaction frees (blocks).
struct PageRun: Sendable, Hashable, CustomStringConvertible {
    /// The first page's frame number, which is also its block number.
    var start: UInt64
    /// Pages in the run, counted as block numbers and extent lengths count (`UInt64`).
    var count: UInt64

    init(start: UInt64, count: UInt64) {
        self.start = start
        self.count = count
    }

    /// A run of `count` pages, counted as Swift counts (`Int`).
    init(start: UInt64, count: Int) {
        self.init(start: start, count: UInt64(count))
    }

    /// The frame after the last one.
    var end: UInt64 { start + count }
    /// The frames of the run.
    var range: Range<UInt64> { start..<end }

    var description: String { "\(start)..<\(end)" }
}

extension Array where Element == PageRun {
    /// Appends page `frame`: to the last run if it ends there, else as a run of its own.
    mutating func append(page frame: UInt64) {
        if let last, last.end == frame {
            self[count - 1].count += 1
        } else {
            append(PageRun(start: frame, count: 1))
        }
    }
}
