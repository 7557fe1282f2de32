@testable import DAX

/// What tests look at in an inode: each a copy taken under the inode's lock (shared), so that a
/// test reads the state as it is between operations without naming the lock.
extension Inode {
    var record: InodeRecord { contents.read { $0.record } }
    var extents: ExtentMap { contents.read { $0.extents } }
    var directory: DirectoryIndex? { contents.read { $0.directory } }
    var isFreed: Bool { contents.read { $0.isFreed } }
}
