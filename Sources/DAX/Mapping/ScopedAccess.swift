/// Scoped access to a mapping's bytes and pins: bounded buffers instead of a bare base address,
/// and pins that cannot outlive the work that needs them.
extension DAXMapping {
    /// Runs `body` with the mapping's bytes as one mutable buffer of ``count`` bytes: loads and
    /// stores through it reach the device pages (zero copy). Do not let the buffer escape `body`:
    /// it is valid only while the mapping is mapped. A store through a `.readOnly` mapping faults
    /// (SIGSEGV), as a store to a `PROT_READ` mapping does; use ``withUnsafeBytes(_:)`` there.
    public func withUnsafeMutableBytes<T, E: Error>(
        _ body: (UnsafeMutableRawBufferPointer) throws(E) -> T
    ) throws(E) -> T {
        try body(UnsafeMutableRawBufferPointer(start: base, count: count))
    }

    /// Runs `body` with the mapping's bytes as one read-only buffer of ``count`` bytes. Do not let
    /// the buffer escape `body`.
    public func withUnsafeBytes<T, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> T) throws(E) -> T {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    /// Pins `offset..<offset+count` (see ``pin(offset:count:access:lifetime:)``), runs `body` with
    /// the pin, and releases it when `body` returns or throws: a transient I/O that cannot forget
    /// its unpin. Short-term only: a pin that must outlive the call is a lease; take it with `pin`.
    public func withPin<T>(
        offset: Int, count: Int, access: Access = .readWrite, _ body: (borrowing PinnedPages) throws -> T
    ) throws -> T {
        let pinned = try pin(offset: offset, count: count, access: access, lifetime: .shortTerm)
        // Released as `pinned` goes out of scope, whether `body` returns or throws.
        return try body(pinned)
    }
}
