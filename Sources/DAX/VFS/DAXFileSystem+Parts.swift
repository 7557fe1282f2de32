import Synchronization

/// The parts below the facade, by the names the package's tests and tools reach them with.
extension DAXFileSystem {
    var superblock: Superblock { volume.superblock }
    var journal: Journal { volume.journal }
    var allocator: BlockAllocator { volume.allocator }

    func inode(_ number: UInt32) throws -> Inode { try namespace.inode(number) }

    func resolveDirectory(_ components: [[UInt8]], path: String) throws -> Inode {
        try namespace.resolveDirectory(components, path: path)
    }

    func slotOffset(_ directory: Inode, _ slot: DirectoryIndex.SlotAddress) -> Int {
        directory.contents.read { namespace.slotOffset($0, slot) }
    }
}
