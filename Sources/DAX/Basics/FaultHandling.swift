/// How a file system resolves faults on its DAX mappings: the kernel's DAX fault handler, in user
/// space.
public enum FaultHandling: Sendable, Equatable {
    /// Missing and write-protect faults are resolved by a handler thread through `userfaultfd`.
    case userfaultfd
    /// No fault handler: mappings are populated when they are made, and an access to a page that
    /// shows no block faults with SIGBUS. `reason` says why.
    case unavailable(reason: String)
}

/// Faults resolved on a file system's mappings since mount.
public struct FaultCounts: Sendable, Equatable {
    /// Loads of a hole: the zero page was mapped, nothing allocated.
    public var zeroPage = 0
    /// Stores to a hole: a zeroed block was allocated (the kernel's `page_mkwrite`).
    public var allocating = 0
    /// Stores to a shared block: the page was copied first.
    public var copyOnWrite = 0
    /// Faults answered with SIGBUS (beyond the end of the file, no space, a media error).
    public var sigbus = 0

    /// No faults.
    public init() {}
}
