/// What `attributes(of:)` says about a file or directory.
public struct FileAttributes: Sendable, Equatable {
    public enum Kind: String, Sendable { case file, directory }

    public var kind: Kind
    /// Bytes (a directory: 4096 per directory block).
    public var size: Int
    /// Data blocks the file holds (holes hold none).
    public var blocks: Int
    public var inode: UInt32
    /// Nanoseconds since the epoch.
    public var modificationTime: UInt64
}
