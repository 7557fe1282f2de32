import ArgumentParser
import DAX
import Foundation

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the device (size, pmem, MAP_SYNC, persistence) and its file system (usage, pins).")

    @OptionGroup var device: DeviceOptions

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let opened = try device.open()
        defer { opened.close() }
        let deviceReport = DeviceReport(opened)
        let fileSystem = FileSystemReport(opened)
        if json {
            var object = deviceReport.object
            object["filesystem"] = fileSystem.object
            print(try jsonText(object))
        } else {
            print(deviceReport.text)
            print(fileSystem.text)
        }
    }
}

/// What `info` says about a device.
struct DeviceReport {
    var object: [String: Any]
    var text: String

    init(_ device: PMemDevice) {
        let totals = device.pages.pinTotals
        var mapSyncReason: Any = NSNull()
        if case .refused(let reason) = device.mapSync { mapSyncReason = reason }
        object = [
            "path": device.path, "size": device.size, "pages": device.pageCount,
            "is_pmem": device.isPersistentMemory, "device_dax": device.isDeviceDAX,
            "map_sync": device.mapSync.isGranted, "map_sync_refused_because": mapSyncReason,
            "persistence": device.persistence.description,
            "persistence_requested": device.requestedPersistence.description,
            "descriptor_bytes": PageMap.bytesPerDescriptor,
            "descriptor_table_reserved": device.pages.reservedTableBytes,
            "pins_acquired": totals.acquired, "pins_released": totals.released, "pinned_pages": totals.pinnedPages,
        ]
        var lines = [
            "device       \(device.path)",
            "size         \(ByteCount.format(device.size)) (\(device.size) bytes, \(device.pageCount) pages of 4 KiB)",
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
    var object: Any
    var text: String

    init(_ device: PMemDevice) {
        guard DAXFileSystem.isFormatted(device) else {
            object = NSNull()
            text = "file system  none (daxemu format makes one)"
            return
        }
        do {
            let fs = try DAXFileSystem.mount(device)
            defer { try? fs.unmount() }
            let s = fs.statistics()
            let used = s.totalBlocks - s.freeBlocks - s.quarantinedBlocks
            object = [
                "total_blocks": s.totalBlocks, "free_blocks": s.freeBlocks, "used_blocks": used,
                "quarantined_blocks": s.quarantinedBlocks, "files": s.files, "directories": s.directories,
                "inodes": s.totalInodes, "pinned_pages": s.pinnedPages, "pins_acquired": s.pinsAcquired,
                "pins_released": s.pinsReleased,
            ]
            text = [
                "file system  DAXFS: \(ByteCount.format(used * 4096)) used of \(ByteCount.format(s.totalBlocks * 4096)) "
                    + "(\(s.freeBlocks) of \(s.totalBlocks) blocks free)",
                "files        \(count(s.files, "file")), \(count(s.directories, "directory", "directories")), \(s.totalInodes) inodes",
                "pins         \(s.pinnedPages) pages pinned, \(s.quarantinedBlocks) blocks quarantined "
                    + "(pins live in the process that takes them; this one holds none)",
            ].joined(separator: "\n")
        } catch let error as DAXError {
            object = ["error": error.message, "code": error.code.description]
            text = "file system  \(error.code == .busy ? "in use" : "unreadable"): \(error.message)"
        } catch {
            object = ["error": "\(error)"]
            text = "file system  unreadable: \(error)"
        }
    }
}
