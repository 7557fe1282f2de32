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
