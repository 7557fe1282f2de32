extension PageState {
    /// The page index a descriptor records for blocks that hold a file's metadata (directory
    /// blocks, extent leaves) rather than its data.
    public static let metadataPageIndex: UInt64 = PageOwner.indexLimit

    /// The block holds file data (not a directory block or an extent leaf).
    public var holdsFileData: Bool { isAllocated && ownerInode != 0 && ownerPageIndex != Self.metadataPageIndex }
}
