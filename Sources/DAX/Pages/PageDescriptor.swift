import Synchronization

/// The runtime state of one device page: the emulator's `struct page`, 16 bytes.
///
/// Never stored on the device. Word `counts` packs the three counts and the flags, so that one
/// compare-and-swap can take a reference unless the page is frozen or free, and the value a
/// decrement replaces tells whether anyone must be woken. Word `owner` names the file page that
/// holds the block, for reverse lookup. The bit layout is in `docs/architecture.md`.
@usableFromInline
struct PageDescriptor: ~Copyable {
    @usableFromInline let counts: Atomic<UInt64>
    let owner: Atomic<UInt64>
}

/// The bit layout of `PageDescriptor.counts`.
///
/// Computed and inlinable, so that the pin path inlined into another module folds them into
/// constants (a `static let` there would be a lazy global, a `swift_once` check on every use).
@usableFromInline
enum PageWord {
    @inlinable static var refOne: UInt64 { 1 }
    @inlinable static var refLimit: UInt64 { (1 << 23) - 1 }
    @inlinable static var pinShift: UInt64 { 23 }
    @inlinable static var pinOne: UInt64 { 1 << pinShift }
    @inlinable static var pinLimit: UInt64 { (1 << 20) - 1 }
    @inlinable static var mapShift: UInt64 { 43 }
    @inlinable static var mapOne: UInt64 { 1 << mapShift }
    @inlinable static var mapLimit: UInt64 { (1 << 16) - 1 }

    @inlinable static var allocated: UInt64 { 1 << 59 }
    @inlinable static var quarantined: UInt64 { 1 << 60 }
    @inlinable static var frozen: UInt64 { 1 << 61 }
    @inlinable static var waiters: UInt64 { 1 << 62 }
    @inlinable static var poisoned: UInt64 { 1 << 63 }

    /// Flags whose presence sends a decrement to the slow path.
    @inlinable static var slowPathFlags: UInt64 { quarantined | waiters }

    @inlinable @inline(__always) static func refCount(_ w: UInt64) -> UInt64 { w & refLimit }
    @inlinable @inline(__always) static func pinCount(_ w: UInt64) -> UInt64 { (w >> pinShift) & pinLimit }
    @inlinable @inline(__always) static func mapCount(_ w: UInt64) -> UInt64 { (w >> mapShift) & mapLimit }

    /// No reference besides those of mappings, and no pin: what truncate waits for.
    @inline(__always) static func isIdleExceptMappings(_ w: UInt64) -> Bool {
        refCount(w) == mapCount(w) && pinCount(w) == 0
    }

    /// Idle but for mappings and `leasePins` pins that leases hold (each with its reference): what
    /// revoking those leases would leave idle.
    @inline(__always) static func isIdleExceptMappingsAndLeases(_ w: UInt64, leasePins: UInt64) -> Bool {
        pinCount(w) <= leasePins && refCount(w) <= mapCount(w) + pinCount(w)
    }
}

/// The bit layout of `PageDescriptor.owner`: inode number and page index in that file.
enum PageOwner {
    static let inodeBits: UInt64 = 24
    static let inodeLimit: UInt64 = (1 << inodeBits) - 1
    static let indexLimit: UInt64 = (1 << 40) - 1

    static func pack(inode: UInt32, index: UInt64) -> UInt64 {
        precondition(UInt64(inode) <= inodeLimit && index <= indexLimit, "page owner out of range")
        return UInt64(inode) | (index << inodeBits)
    }
}

/// A snapshot of one page descriptor.
public struct PageState: Sendable, Equatable, CustomStringConvertible {
    /// Every user: mappings, transient references, pins.
    public var refCount: Int
    /// DMA pins, counted exactly.
    public var pinCount: Int
    /// Live file mappings of the page.
    public var mapCount: Int
    /// The block belongs to a file or to file-system metadata.
    public var isAllocated: Bool
    /// The block is free on the device but held back from reuse until its last pin goes.
    public var isQuarantined: Bool
    /// The page is frozen (`page_ref_freeze`): new references fail until it is unfrozen.
    public var isFrozen: Bool = false
    /// The inode whose file holds the block (0 for none or for file-system metadata).
    public var ownerInode: UInt32 = 0
    /// The page index of the block in that file.
    public var ownerPageIndex: UInt64 = 0

    /// A state with these counts and flags (no owner).
    public init(refCount: Int, pinCount: Int, mapCount: Int, isAllocated: Bool, isQuarantined: Bool) {
        self.refCount = refCount
        self.pinCount = pinCount
        self.mapCount = mapCount
        self.isAllocated = isAllocated
        self.isQuarantined = isQuarantined
    }

    init(word: UInt64, owner: UInt64) {
        self.init(
            refCount: Int(PageWord.refCount(word)), pinCount: Int(PageWord.pinCount(word)),
            mapCount: Int(PageWord.mapCount(word)), isAllocated: word & PageWord.allocated != 0,
            isQuarantined: word & PageWord.quarantined != 0)
        self.isFrozen = word & PageWord.frozen != 0
        self.ownerInode = UInt32(owner & PageOwner.inodeLimit)
        self.ownerPageIndex = owner >> PageOwner.inodeBits
    }

    /// Equality compares the five counts and flags of the API; frozen and owner are extras.
    public static func == (a: PageState, b: PageState) -> Bool {
        a.refCount == b.refCount && a.pinCount == b.pinCount && a.mapCount == b.mapCount
            && a.isAllocated == b.isAllocated && a.isQuarantined == b.isQuarantined
    }

    /// Busy for truncate: referenced beyond its mappings, or pinned.
    public var isBusy: Bool { refCount - mapCount > 0 || pinCount > 0 }

    /// The counts and flags, as `daxemu frames` prints them.
    public var description: String {
        var flags: [String] = []
        if isAllocated { flags.append("allocated") }
        if isQuarantined { flags.append("quarantined") }
        if isFrozen { flags.append("frozen") }
        return "ref \(refCount) pin \(pinCount) map \(mapCount)"
            + (flags.isEmpty ? "" : " [" + flags.joined(separator: ",") + "]")
    }
}
