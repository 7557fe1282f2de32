import Synchronization

/// How long a pin may last.
public enum PinLifetime: Sendable {
    /// Transient I/O (O_DIRECT, a short DMA): truncate waits for it; it is never revoked.
    case shortTerm
    /// A pin that may last indefinitely (an RDMA registration): a lease. When a truncate or
    /// punch needs the pages, `onRevoke` asks the holder to let go; after the grace period the
    /// pin is revoked (FOLL_LONGTERM, which Linux refuses on fsdax, allowed here as a lease).
    case longTerm(onRevoke: @Sendable () -> Void)
}

/// A set of pinned pages, released exactly once: by `release()` or when it goes out of scope.
///
/// The kernel's `pin_user_pages` result. While it lives, every page in ``frames`` has its
/// `pinCount` and `refCount` raised by one, so truncate cannot hand the blocks to another file;
/// the zero frame (a short-term `.readOnly` pin of a hole) is the exception, as the kernel's zero page is:
/// no count of it moves.
///
/// Frozen, with an inlinable ``release()``, so that a one-page pin's release runs in the caller
/// without a call; its fields are all trivial (no reference count to drop when it ends).
@frozen
public struct PinnedPages: ~Copyable, Sendable {
    @usableFromInline let table: MemMap
    /// The first run of pinned frames (for most pins the only one): its first frame and length.
    @usableFromInline let headStart: UInt64
    @usableFromInline let headCount: Int
    /// Further runs, or the lease of a long-term pin, retained once and released by `deinit`; nil
    /// for a one-run short-term pin. Unmanaged, so that the common pin holds no reference-counted
    /// field: the compiler would otherwise destroy the optional after `deinit` through the generic
    /// value witness, which costs more than the rest of an unpin.
    @usableFromInline let extraReference: Unmanaged<PinExtra>?
    /// What the pin was taken for: a device may write the pages only through a `.readWrite` pin
    /// (the kernel's `FOLL_WRITE`).
    public let access: Access

    @inlinable
    init(table: MemMap, headStart: UInt64, headCount: Int, access: Access) {
        self.table = table
        self.headStart = headStart
        self.headCount = headCount
        self.extraReference = nil
        self.access = access
    }

    init(table: MemMap, head: PageRun, access: Access) {
        self.init(table: table, headStart: head.start, headCount: Int(head.count), access: access)
    }

    init(table: MemMap, runs: FrameRuns, lease: PinLease?, access: Access) {
        self.table = table
        self.headStart = runs.runs[0].start
        self.headCount = Int(runs.runs[0].count)
        // A pin that shows the zero frame (never pinned) ends through `MemMap.unpin(_:)`, which
        // leaves it out, not through the one-page release.
        let plain = runs.runs.count == 1 && lease == nil && runs.runs[0].end <= table.zeroFrame
        self.extraReference = plain ? nil : Unmanaged.passRetained(PinExtra(runs: runs, lease: lease))
        self.access = access
    }

    /// The first run of pinned frames.
    var head: PageRun { PageRun(start: headStart, count: headCount) }

    /// Further runs, or the lease; nil for a one-run short-term pin.
    var extra: PinExtra? { extraReference?.takeUnretainedValue() }

    /// True when the pin holds pages of the page map `pages`.
    func belongs(to pages: PageMap) -> Bool { table.core == pages.table.core }

    var runs: FrameRuns { extra?.runs ?? .single(head) }

    var lease: PinLease? { extra?.lease }

    /// The pinned device pages, in the order of the pinned range.
    public var frames: [PageFrameNumber] { runs.frames }

    /// Pages pinned.
    public var count: Int { extra?.runs.pageCount ?? Int(head.count) }

    /// True once a long-term pin's lease was revoked: its counts are already dropped, and the DMA
    /// engine refuses to touch its pages. Releasing it then changes no count.
    public var isRevoked: Bool { extra?.lease?.isRevoked ?? false }

    /// True for a long-term pin (a lease).
    public var isLongTerm: Bool { extra?.lease != nil }

    /// Drops the pins (the kernel's `unpin_user_pages`). The pages may be truncated afterwards.
    @inlinable
    public consuming func release() {
        // A one-page short-term pin unpins here, inline; any other ends as `self` ends here, in
        // `deinit`. Either way the pages are unpinned exactly once.
        guard extraReference == nil, headCount == 1 else {
            _ = consume self
            return
        }
        table.unpinOneCounted(headStart)
        discard self
    }

    deinit {
        if let extraReference {
            let extra = extraReference.takeRetainedValue()
            if let lease = extra.lease { lease.release() } else { table.unpin(extra.runs) }
        } else if headCount == 1 {
            table.unpinOneCounted(headStart)
        } else {
            table.unpin(head)
        }
    }
}

/// What a pin needs beyond one run of frames: more runs, or a lease.
@usableFromInline
final class PinExtra: Sendable {
    let runs: FrameRuns
    let lease: PinLease?

    init(runs: FrameRuns, lease: PinLease?) {
        self.runs = runs
        self.lease = lease
    }
}

/// The shared state of a long-term pin: who holds it, and whether it was released or revoked.
///
/// Revocation and DMA access exclude each other through ``withAccess(_:)``: a revoke waits for
/// an access in flight, and no access starts after it (the IOMMU or on-demand-paging invalidation
/// of an RDMA NIC).
final class PinLease: Sendable {
    enum State { case active, released, revoked }

    let table: MemMap
    let runs: FrameRuns
    private let onRevoke: @Sendable () -> Void
    private let state = Mutex(State.active)
    private let revokeRequested = Atomic<Bool>(false)

    init(table: MemMap, runs: FrameRuns, onRevoke: @escaping @Sendable () -> Void) {
        self.table = table
        self.runs = runs
        self.onRevoke = onRevoke
    }

    var isRevoked: Bool { state.withTrackedLock { $0 == .revoked } }
    var isActive: Bool { state.withTrackedLock { $0 == .active } }

    /// The holder lets go. Changes no count if the lease was revoked first. The counts drop under
    /// the state lock, as ``revoke()`` drops them: a truncate that reads the active leases' pins
    /// (``PageMap/onlyLeasesHold(_:)``) sees either an active lease and its pins or neither, never
    /// a lease gone inactive whose pins are still counted, which it would take for a short-term pin.
    func release() { end(as: .released) }

    /// Asks the holder to let go by calling its `onRevoke`, once.
    func requestRelease() {
        guard isActive, !revokeRequested.exchange(true, ordering: .acquiringAndReleasing) else { return }
        Self.$askingToLetGo.withValue(self) { onRevoke() }
    }

    /// The lease whose `onRevoke` runs on this thread now (``PinLifetime/longTerm(releasing:)``).
    @TaskLocal static var askingToLetGo: PinLease?

    /// Revokes the lease: waits for an access in flight, drops the counts (counted as released),
    /// and makes every later access fail. Returns false if it was no longer active.
    @discardableResult
    func revoke() -> Bool { end(as: .revoked) }

    /// Ends an active lease as `ending` (released or revoked): drops its counts while holding the
    /// state lock, so that no access can still be copying and no truncate sees the lease gone with
    /// its pins still counted, then unregisters it. Returns false if it was no longer active.
    @discardableResult
    private func end(as ending: State) -> Bool {
        let ended = state.withTrackedLock { state in
            guard state == .active else { return false }
            state = ending
            table.unpin(runs)
            return true
        }
        if ended { unregister() }
        return ended
    }

    /// Runs `body` while the lease cannot be revoked; throws `.revoked` if it already was.
    func withAccess<T>(_ body: () throws -> T) throws -> T {
        try state.withTrackedLock { state in
            switch state {
            case .active: return try body()
            case .revoked:
                throw DAXError(.revoked, "the pin's lease was revoked: its pages may belong to another file now")
            case .released: throw DAXError(.invalidArgument, "the pin was released by its holder")
            }
        }
    }

    func register() {
        table.core.pointee.leases.withTrackedLock { $0[ObjectIdentifier(self)] = self }
    }

    private func unregister() {
        _ = table.core.pointee.leases.withTrackedLock { $0.removeValue(forKey: ObjectIdentifier(self)) }
    }
}

/// What a lease's holder is handed when it is asked to let go: releasing it drops the pin's counts
/// at once, as deregistering the DMA region that holds the pin would (that region's later accesses
/// then fail, and its deregistration changes no count). A holder so needs no reference of its own
/// to its region, nor a box to keep one in.
public struct LeaseHandle: Sendable {
    let lease: PinLease

    /// Lets go of the pinned pages (once; later calls do nothing).
    public func release() { lease.release() }

    /// True once the lease was revoked: its pages may belong to another file now.
    public var isRevoked: Bool { lease.isRevoked }
}

extension PinLifetime {
    /// A lease whose `onRevoke` receives its ``LeaseHandle``: `.longTerm(releasing: { $0.release() })`
    /// lets go as soon as a truncate asks. The handle is valid only while `onRevoke` runs.
    public static func longTerm(releasing onRevoke: @escaping @Sendable (LeaseHandle) -> Void) -> PinLifetime {
        .longTerm(onRevoke: {
            if let lease = PinLease.askingToLetGo { onRevoke(LeaseHandle(lease: lease)) }
        })
    }
}
