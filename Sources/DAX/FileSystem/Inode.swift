import Synchronization

/// A file or directory in DRAM: its on-device record, its extents, and who uses it.
///
/// ``contents`` holds the record, the extents and (for a directory) the entries, behind the
/// inode's lock: readers of data share it, anything that changes the file takes it exclusively.
/// A directory changes only under the namespace lock held exclusively; its entries are looked up
/// and changed under its own lock too, each time for a moment, with nothing nested inside but the
/// allocator (planning a new directory block). `users` counts open handles and live mappings,
/// which keep a removed file's blocks (an orphan) until the last one goes. (The mappings
/// themselves belong to the mapping layer's address space of the file.)
final class Inode: Sendable {
    let number: UInt32
    /// File or directory: fixed for the inode's life, so readable without a lock.
    let kind: InodeRecord.Kind
    let contents: ReadWriteLocked<Contents>

    /// What the inode's lock guards. A function that needs the lock held takes this (`inout` to
    /// change it).
    struct Contents: Sendable {
        /// The inode's number, the same as its ``Inode/number``.
        let number: UInt32
        var record: InodeRecord
        var extents: ExtentMap
        /// Entries of a directory; nil for a file.
        var directory: DirectoryIndex?
        /// The inode and its blocks were freed (its number may already belong to another file).
        /// Every operation checks it once it holds the lock.
        var isFreed = false

        /// Throws if the inode was freed: an operation that raced the last close of its file.
        func checkLive(_ path: String) throws {
            guard !isFreed else {
                throw DAXError(
                    .invalidArgument, "\(Paths.quoted(path)) was closed and freed while the operation started")
            }
        }
    }

    struct Users {
        var handles = 0
        var mappings = 0
        /// Blocks and inode were freed: the last user of an orphan went.
        var reclaimed = false
    }

    let users = Mutex(Users())

    init(number: UInt32, record: InodeRecord, extents: ExtentMap, directory: DirectoryIndex? = nil) {
        self.number = number
        self.kind = record.kind
        self.contents = ReadWriteLocked(
            Contents(number: number, record: record, extents: extents, directory: directory))
    }

    var isDirectory: Bool { kind == .directory }
}

/// Runs `body` holding `inode`'s lock exclusively, with its contents, or with no lock (and nil)
/// when there is no inode.
func withWriteLock<T>(of inode: Inode?, _ body: (inout Inode.Contents?) throws -> T) rethrows -> T {
    guard let inode else {
        var none: Inode.Contents? = nil
        return try body(&none)
    }
    return try inode.contents.write { contents in
        var held: Inode.Contents? = contents
        defer { contents = held! }
        return try body(&held)
    }
}
