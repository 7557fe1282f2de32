/// What `attributes(of:)` says about a file or directory.
public struct FileAttributes: Sendable, Equatable {
    /// A regular file or a directory.
    public enum Kind: String, Sendable {
        /// A regular file.
        case file
        /// A directory.
        case directory
    }

    /// File or directory.
    public var kind: Kind
    /// Bytes (a directory: 4096 per directory block).
    public var size: Int
    /// Data blocks the file holds (holes hold none).
    public var blocks: Int
    /// The inode number.
    public var inode: UInt32
    /// Nanoseconds since the epoch.
    public var modificationTime: UInt64
}
