import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the device (size, pmem, MAP_SYNC, persistence) and its file system (usage, pins).")

    @OptionGroup var device: DeviceOptions

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let opened = try device.open(readOnly: true)
        defer { opened.close() }
        let deviceReport = DeviceReport(opened)
        let fileSystem = FileSystemReport(opened)
        if json {
            var object = deviceReport.json
            object.fileSystem = fileSystem.json
            print(try jsonText(object))
        } else {
            print(deviceReport.text)
            print(fileSystem.text)
        }
    }
}

/// What `info --json` prints: the device, the pins this process holds, and the file system.
struct InfoJSON: Encodable {
    var path: String
    var size: Int
    var pages: Int
    var isPersistentMemory: Bool
    var isDeviceDAX: Bool
    var mapSync: Bool
    /// Why the kernel refused `MAP_SYNC`; absent when it granted it.
    var mapSyncRefusedBecause: String?
    var persistence: String
    var persistenceRequested: String
    var descriptorBytes: Int
    var descriptorTableReserved: Int
    var pins: Pins
    var fileSystem: FileSystemJSON?

    /// Pins live in the process that takes them: these are this process's.
    struct Pins: Encodable {
        var acquired: Int
        var released: Int
        var pinnedPages: Int
    }
}

/// The file system part of `info --json`: `state` is `none`, `mounted` or `unreadable`.
struct FileSystemJSON: Encodable {
    var state: String
    var totalBlocks: Int?
    var freeBlocks: Int?
    var usedBlocks: Int?
    var quarantinedBlocks: Int?
    /// Data blocks named by more than one extent (clones, snapshots, dedup).
    var sharedBlocks: Int?
    var files: Int?
    var directories: Int?
    var inodes: Int?
    /// `userfaultfd` or `unavailable`, with the detail.
    var faultHandling: String?
    var faultHandlingDetail: String?
    /// Faults this process's mount answered (none: `info` maps nothing).
    var faults: Faults?
    var error: String?
    var code: String?
    /// What a read-only mount found damaged; absent on an intact file system.
    var damage: [String]?

    init(state: String) { self.state = state }

    struct Faults: Encodable {
        var zeroPage: Int
        var allocating: Int
        var copyOnWrite: Int
        var sigbus: Int

        init(_ counts: FaultCounts) {
            zeroPage = counts.zeroPage
            allocating = counts.allocating
            copyOnWrite = counts.copyOnWrite
            sigbus = counts.sigbus
        }
    }
}

/// What `info` says about a device.
struct DeviceReport {
    var json: InfoJSON
    var text: String

    init(_ device: PMemDevice) {
        let totals = device.pages.pinTotals
        var mapSyncReason: String?
        if case .refused(let reason) = device.mapSync { mapSyncReason = reason }
        json = InfoJSON(
            path: device.path, size: device.size, pages: device.pageCount,
            isPersistentMemory: device.isPersistentMemory, isDeviceDAX: device.isDeviceDAX,
            mapSync: device.mapSync.isGranted, mapSyncRefusedBecause: mapSyncReason,
            persistence: device.persistence.description,
            persistenceRequested: device.requestedPersistence.description,
            descriptorBytes: PageMap.bytesPerDescriptor,
            descriptorTableReserved: device.pages.reservedTableBytes,
            pins: .init(
                acquired: Int(totals.acquired), released: Int(totals.released), pinnedPages: Int(totals.pinnedPages)))
        var lines = [
            "device       \(device.path)",
            "size         \(ByteCount.format(device.size)) (\(device.size) bytes, \(counted(device.pageCount, "page")) of 4 KiB)",
            "pmem         \(device.isPersistentMemory ? "yes" : "no") (pmem_is_pmem)\(device.isDeviceDAX ? ", device DAX" : "")",
            "MAP_SYNC     \(device.mapSync)",
            "persistence  \(device.persistence)" + (device.requestedPersistence == .automatic ? " (automatic)" : ""),
            "descriptors  \(PageMap.bytesPerDescriptor) bytes per page (Linux's struct page: 64); "
                + "\(ByteCount.format(device.pages.reservedTableBytes)) of address space reserved",
        ]
        if !device.isPersistentMemory, device.requestedPersistence == .automatic {
            lines.append(
                "note         not persistent memory, so stores are made durable with msync; "
                    + "--persistence cache-flush (or PMEM_IS_PMEM_FORCE=1) gives real flush instructions")
        }
        text = lines.joined(separator: "\n")
    }
}

/// What `info` says about the file system on a device, if there is one.
struct FileSystemReport {
    var json: FileSystemJSON
    var text: String

    init(_ device: PMemDevice) {
        // A damaged superblock in block 0 with an intact backup still mounts (read-only): only a
        // device where nothing looks like a file system has none.
        guard DAXFileSystem.isFormatted(device) || DAXFileSystem.existingFileSystem(on: device) != nil else {
            json = FileSystemJSON(state: "none")
            text = "file system  none (daxemu format makes one)"
            return
        }
        do {
            let fs = try DAXFileSystem.mount(device, access: .readOnly)
            defer { try? fs.unmount() }
            let s = fs.statistics()
            let used = s.totalBlocks - s.freeBlocks - s.quarantinedBlocks
            json = FileSystemJSON(state: "mounted")
            json.totalBlocks = s.totalBlocks
            json.freeBlocks = s.freeBlocks
            json.usedBlocks = used
            json.quarantinedBlocks = s.quarantinedBlocks
            json.sharedBlocks = s.sharedBlocks
            json.files = s.files
            json.directories = s.directories
            json.inodes = s.totalInodes
            let handling: String
            switch fs.faultHandling {
            case .userfaultfd: handling = "userfaultfd"
            case .unavailable: handling = "unavailable"
            }
            json.faultHandling = handling
            json.faultHandlingDetail = fs.faultHandlingDetail
            json.faults = .init(s.faults)
            if fs.isDegraded { json.damage = fs.damage }
            let f = s.faults
            let damage =
                fs.isDegraded
                ? [
                    "damage       \(fs.damage.first!)"
                        + (fs.damage.count > 1 ? " and \(fs.damage.count - 1) more" : "")
                        + "; the counts are of what is intact; `daxemu fsck` lists it all, `fsck --repair` repairs"
                ] : []
            text =
                (damage + [
                    "file system  DAXFS: \(ByteCount.format(used * 4096)) used of \(ByteCount.format(s.totalBlocks * 4096)) "
                        + "(\(s.freeBlocks) of \(counted(s.totalBlocks, "block")) free)",
                    "files        \(counted(s.files, "file")), \(counted(s.directories, "directory", "directories")), "
                        + counted(s.totalInodes, "inode"),
                    "shared       \(counted(s.sharedBlocks, "block")) shared copy-on-write by clones, snapshots "
                        + "or dedup",
                    "pins         \(counted(s.pinnedPages, "page")) pinned, \(counted(s.quarantinedBlocks, "block")) "
                        + "quarantined (pins live in the process that takes them; this one holds none)",
                    "faults       \(handling): \(fs.faultHandlingDetail)",
                    "             \(f.zeroPage) zero-page, \(f.allocating) allocating, \(f.copyOnWrite) copy-on-write, "
                        + "\(f.sigbus) SIGBUS (faults are answered in the process that maps; this one maps nothing)",
                ]).joined(separator: "\n")
        } catch let error as DAXError {
            json = FileSystemJSON(state: "unreadable")
            json.error = error.message
            json.code = error.code.description
            text = "file system  \(error.code == .busy ? "in use" : "unreadable"): \(error.message)"
        } catch {
            json = FileSystemJSON(state: "unreadable")
            json.error = "\(error)"
            text = "file system  unreadable: \(error)"
        }
    }
}
