/// Block usage and pin totals of a mounted file system.
public struct Statistics: Sendable, Equatable {
    /// Data blocks the allocator manages.
    public var totalBlocks: Int
    /// Free and reusable now.
    public var freeBlocks: Int
    /// Free on the device, held back by pins or references.
    public var quarantinedBlocks: Int
    /// Descriptors with `pinCount > 0`.
    public var pinnedPages: Int
    /// Pages pinned since mount (like `nr_foll_pin_acquired`).
    public var pinsAcquired: Int
    /// Pages unpinned or revoked since mount.
    public var pinsReleased: Int
    /// Regular files, including removed ones still open.
    public var files: Int = 0
    /// Directories, including the root.
    public var directories: Int = 0
    /// Inodes the file system can hold.
    public var totalInodes: Int = 0
    /// Metadata transactions committed since mount.
    public var journalCommits: Int = 0
    /// Faults resolved on the file system's mappings since mount (all zero without a fault
    /// handler: ``DAXFileSystem/faultHandling``).
    public var faults = FaultCounts()
    /// Data blocks owned by more than one file (reflinks, dedup): none until blocks can be shared.
    public var sharedBlocks: Int = 0

    /// Statistics with the block and pin figures given and every other count zero.
    public init(
        totalBlocks: Int, freeBlocks: Int, quarantinedBlocks: Int, pinnedPages: Int, pinsAcquired: Int,
        pinsReleased: Int
    ) {
        self.totalBlocks = totalBlocks
        self.freeBlocks = freeBlocks
        self.quarantinedBlocks = quarantinedBlocks
        self.pinnedPages = pinnedPages
        self.pinsAcquired = pinsAcquired
        self.pinsReleased = pinsReleased
    }

    init(
        totalBlocks: Int, freeBlocks: Int, quarantinedBlocks: Int, pinnedPages: Int, pinsAcquired: Int,
        pinsReleased: Int, files: Int, directories: Int, totalInodes: Int, journalCommits: Int, sharedBlocks: Int = 0
    ) {
        self.init(
            totalBlocks: totalBlocks, freeBlocks: freeBlocks, quarantinedBlocks: quarantinedBlocks,
            pinnedPages: pinnedPages, pinsAcquired: pinsAcquired, pinsReleased: pinsReleased)
        self.files = files
        self.directories = directories
        self.totalInodes = totalInodes
        self.journalCommits = journalCommits
        self.sharedBlocks = sharedBlocks
    }
}

extension Statistics: CustomStringConvertible {
    /// One line a person can read: blocks, files, pins and commits, with plurals right.
    public var description: String {
        let used = totalBlocks - freeBlocks - quarantinedBlocks
        return "\(counted(totalBlocks, "data block")): \(used) used, \(freeBlocks) free, "
            + "\(quarantinedBlocks) quarantined; \(counted(files, "file")) and \(counted(directories, "directory", plural: "directories")) "
            + "of \(counted(totalInodes, "inode")); \(counted(pinnedPages, "page")) pinned "
            + "(\(counted(pinsAcquired, "pin")) acquired, \(pinsReleased) released since mount); "
            + "\(counted(journalCommits, "journal commit"))"
    }
}
