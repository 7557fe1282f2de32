import CLibPMem

/// How a device makes stores durable.
public enum PersistenceMode: Sendable, Hashable, CustomStringConvertible {
    /// libpmem's choice: cache flushing when `pmem_is_pmem` says the mapping is persistent memory,
    /// `msync` otherwise (on `/dev/shm`, unless `PMEM_IS_PMEM_FORCE=1` is set).
    case automatic
    /// Always flush cache lines (CLWB, else CLFLUSHOPT, else CLFLUSH) and fence (SFENCE), as if
    /// `PMEM_IS_PMEM_FORCE=1` were set: the instruction stream of real persistent memory.
    case cacheFlush
    /// Always `msync(MS_SYNC)` the page-aligned range: what a non-DAX file needs.
    case msync

    /// The name a person reads, as the CLI prints it.
    public var description: String {
        switch self {
        case .automatic: "automatic"
        case .cacheFlush: "cache-flush"
        case .msync: "msync"
        }
    }
}

/// Whether the kernel granted a `MAP_SYNC` mapping of the device, and if not, why.
///
/// `MAP_SYNC` makes the file system's metadata for a mapped page durable before the page can be
/// written, so that cache flushing alone persists a store. Only fsdax file systems and device DAX
/// grant it; tmpfs (`/dev/shm`) refuses it with `EOPNOTSUPP`.
public enum MapSyncStatus: Sendable, Hashable, CustomStringConvertible {
    case granted
    case refused(reason: String)

    /// True when granted.
    public var isGranted: Bool { self == .granted }

    /// The name a person reads, as the CLI prints it.
    public var description: String {
        switch self {
        case .granted: "granted"
        case .refused(let reason): "refused: \(reason)"
        }
    }
}

/// How a persistent copy or fill reaches the media: libpmem's `PMEM_F_MEM_*` flags.
public struct CopyFlags: OptionSet, Sendable, Hashable {
    /// libpmem's `PMEM_F_MEM_*` bits.
    public let rawValue: UInt32
    /// Flags from libpmem's bits.
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Do not wait for the stores to be durable; call ``PMemDevice/drain()`` later
    /// (`PMEM_F_MEM_NODRAIN`).
    public static let noDrain = CopyFlags(rawValue: UInt32(PMEM_F_MEM_NODRAIN))
    /// Use non-temporal stores that bypass the cache (`PMEM_F_MEM_NONTEMPORAL`).
    public static let nonTemporal = CopyFlags(rawValue: UInt32(PMEM_F_MEM_NONTEMPORAL))
    /// Use ordinary stores followed by cache flushes (`PMEM_F_MEM_TEMPORAL`).
    public static let temporal = CopyFlags(rawValue: UInt32(PMEM_F_MEM_TEMPORAL))
    /// Use write-combining stores (`PMEM_F_MEM_WC`).
    public static let writeCombining = CopyFlags(rawValue: UInt32(PMEM_F_MEM_WC))
    /// Use write-back stores (`PMEM_F_MEM_WB`).
    public static let writeBack = CopyFlags(rawValue: UInt32(PMEM_F_MEM_WB))
    /// Do not flush at all: the caller flushes later (`PMEM_F_MEM_NOFLUSH`).
    public static let noFlush = CopyFlags(rawValue: UInt32(PMEM_F_MEM_NOFLUSH))
}
