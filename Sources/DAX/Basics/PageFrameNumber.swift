/// A device page's index: its device offset divided by the page size, 4096 bytes.
///
/// The kernel's PFN. A frame names a page of the *device*, not of a file or a mapping: two files
/// never share a frame at the same time, and the DMA engine addresses memory by frame.
public struct PageFrameNumber: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The device offset divided by the page size.
    public var rawValue: UInt64

    /// The bytes of the page a frame names: 4096, the device's page and file-system block.
    static let pageSize = 4096

    /// The frame with index `rawValue`.
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// The frame of the page at `offset` bytes into the device (rounded down).
    public init(deviceOffset offset: Int) {
        self.rawValue = UInt64(offset) / UInt64(Self.pageSize)
    }

    /// The device offset of the page's first byte.
    public var deviceOffset: Int { Int(rawValue) * Self.pageSize }

    /// Frames order by device offset.
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    /// "pfn N", as the kernel prints a frame.
    public var description: String { "pfn \(rawValue)" }

    /// The frame `n` pages further on.
    public func advanced(by n: Int) -> PageFrameNumber {
        PageFrameNumber(rawValue: UInt64(Int(rawValue) + n))
    }
}
