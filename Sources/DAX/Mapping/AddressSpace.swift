import Synchronization

/// A file's address space (the kernel's `struct address_space`): its live mappings, the
/// invalidate lock and the layout generation that pins re-validate against.
///
/// The mapping layer owns it; the file system below answers questions about the file in values
/// (which blocks back these pages, give these holes blocks, plan this resize, commit it) and never
/// sees a mapping. Every handle and mapping of one file shares one address space, which lives as
/// long as any of them does (``AddressSpaces`` hands it out).
@usableFromInline
final class AddressSpace: Sendable {
    let inode: Inode
    let data: FileData
    let namespace: Namespace
    var device: PMemDevice { data.volume.device }
    /// The file system's fault handler.
    let handler: FaultHandler
    /// The volume's shared-block counts, which the pin paths look at.
    @usableFromInline let sharedBlocks: SharedBlocks
    /// Frames stored to through mappings that were unmapped since the last `sync`: it still makes
    /// them durable, as the kernel's dirty tags outlive a `munmap`.
    let unmappedDirtyFrames = Mutex<Set<UInt64>>([])
    /// Stores that raced a change in a mapping unmapped before the change kept them, by file
    /// page: ``keepRacedStores(_:)`` keeps them with the live mappings' own.
    let unmappedRacedStores = Mutex<[(page: UInt64, store: DAXMapping.RacedStore)]>([])

    /// Makes the stores through mappings unmapped since the last `sync` durable
    /// (``unmappedDirtyFrames``), and forgets them.
    func writeBackUnmapped() {
        let frames = unmappedDirtyFrames.withTrackedLock { frames in
            defer { frames = [] }
            return frames
        }
        guard !frames.isEmpty else { return }
        for run in FileData.runs(of: Array(frames)) {
            device.persist(at: Int(run.lowerBound) * PMemDevice.pageSize, count: run.count * PMemDevice.pageSize)
        }
    }

    /// Taken exclusively by break layouts and migration, shared by new mappings and by the slow
    /// path of pin: the kernel's `mapping->invalidate_lock`.
    let invalidateLock = ReadWriteLock()
    /// Bumped whenever pages leave the file's mappings; a fast pin re-validates against it.
    @usableFromInline let layoutGeneration = Atomic<UInt64>(0)
    /// Live mappings of the file, weakly held (a mapping leaves when unmapped).
    private let mappings = Mutex<[ObjectIdentifier: WeakMapping]>([:])
    private let registry: AddressSpaces

    fileprivate init(inode: Inode, data: FileData, namespace: Namespace, registry: AddressSpaces) {
        self.inode = inode
        self.data = data
        self.namespace = namespace
        self.registry = registry
        self.handler = registry.handler
        self.sharedBlocks = data.volume.shared
    }

    deinit { registry.forget(inode) }

    /// Live mappings, strongly held for the caller's use. Dropping one of them may unmap it (the
    /// last reference); that only drops counts, so it may happen under any lock.
    var liveMappings: [DAXMapping] {
        mappings.withTrackedLock { $0.values.compactMap(\.mapping) }
    }

    /// A new mapping of the file joins: it holds the file open (a removed file keeps its blocks).
    func register(_ mapping: DAXMapping) {
        inode.users.withTrackedLock { $0.mappings += 1 }
        mappings.withTrackedLock { $0[ObjectIdentifier(mapping)] = WeakMapping(mapping: mapping) }
    }

    /// A mapping was unmapped (its pages are gone from it): pins racing in back off, and a removed
    /// file may be freed.
    func forget(_ mapping: DAXMapping) {
        layoutChanged()
        _ = mappings.withTrackedLock { $0.removeValue(forKey: ObjectIdentifier(mapping)) }
        namespace.releaseUser(inode, handle: false)
    }

    /// Blocks that filled holes show up in every live mapping that showed nothing there (a page
    /// punched while mapped), as the kernel's next fault would map them; until then a load there
    /// faults. The caller then calls ``keepRacedStores(_:)`` (a page that cannot be shown becomes
    /// a placeholder, which may take a store), as ``sizeChanged(_:)`` does. Inode lock held
    /// exclusively.
    func show(_ extents: [Extent]) {
        guard !extents.isEmpty else { return }
        for mapping in liveMappings { mapping.populate(extents) }
    }

    /// The file's size is what `contents` says now, perhaps larger than before: mappings whose
    /// pages past the old end were made to raise SIGBUS turn the part below the new end back into
    /// placeholders, so that those pages read zeros and take stores as holes. Then the stores that
    /// raced a new placeholder here or in the change before (``show(_:)``) are kept. Inode lock
    /// held exclusively.
    func sizeChanged(_ contents: inout Inode.Contents) {
        guard handler.faults != nil else { return }
        let end = FileData.pageUp(Int(contents.record.size))
        for mapping in liveMappings { mapping.fileGrew(to: end) }
        keepRacedStores(&contents)
    }

    /// Bumps the layout generation: pages left the mappings, or came back after a failed change.
    func layoutChanged() {
        layoutGeneration.wrappingAdd(1, ordering: .sequentiallyConsistent)
    }
}

/// A mapping registered with its address space, held weakly.
private struct WeakMapping: @unchecked Sendable {
    weak var mapping: DAXMapping?
}

/// The address spaces of a file system's files, one per inode while a handle or mapping uses it.
final class AddressSpaces: Sendable {
    let data: FileData
    let namespace: Namespace
    /// The file system's fault handler, shared by every address space.
    let handler: FaultHandler
    private let spaces = Mutex<[ObjectIdentifier: WeakSpace]>([:])

    private struct WeakSpace: @unchecked Sendable {
        weak var space: AddressSpace?
    }

    init(data: FileData, namespace: Namespace, handler: FaultHandler) {
        self.data = data
        self.namespace = namespace
        self.handler = handler
    }

    /// The address space of `inode`, made when no handle or mapping holds one.
    func space(for inode: Inode) -> AddressSpace {
        spaces.withTrackedLock { spaces in
            let key = ObjectIdentifier(inode)
            if let space = spaces[key]?.space { return space }
            let space = AddressSpace(inode: inode, data: data, namespace: namespace, registry: self)
            spaces[key] = WeakSpace(space: space)
            return space
        }
    }

    /// An address space went (its deinit): its entry goes, unless a new one took its place.
    fileprivate func forget(_ inode: Inode) {
        spaces.withTrackedLock { spaces in
            let key = ObjectIdentifier(inode)
            if spaces[key]?.space == nil { spaces[key] = nil }
        }
    }
}
