import ArgumentParser
import DAX
import Foundation

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the device: size, persistence, MAP_SYNC, page descriptors and pins.")

    @OptionGroup var device: DeviceOptions

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let opened = try device.open()
        defer { opened.close() }
        let report = DeviceReport(opened)
        if json {
            print(try report.json())
        } else {
            print(report.text)
        }
    }
}

/// What `info` says about a device.
struct DeviceReport {
    var fields: [(String, Any)]
    var text: String

    init(_ device: PMemDevice) {
        let totals = device.pages.pinTotals
        var mapSyncReason: Any = NSNull()
        if case .refused(let reason) = device.mapSync { mapSyncReason = reason }
        fields = [
            ("path", device.path),
            ("size", device.size),
            ("pages", device.pageCount),
            ("is_pmem", device.isPersistentMemory),
            ("device_dax", device.isDeviceDAX),
            ("map_sync", device.mapSync.isGranted),
            ("map_sync_refused_because", mapSyncReason),
            ("persistence", device.persistence.description),
            ("persistence_requested", device.requestedPersistence.description),
            ("descriptor_bytes", PageMap.bytesPerDescriptor),
            ("descriptor_table_reserved", device.pages.reservedTableBytes),
            ("descriptor_table_resident", device.pages.residentTableBytes),
            ("pins_acquired", totals.acquired),
            ("pins_released", totals.released),
            ("pinned_pages", totals.pinnedPages),
        ]
        var lines = [
            "device       \(device.path)",
            "size         \(ByteCount.format(device.size)) (\(device.size) bytes, \(device.pageCount) pages of 4 KiB)",
            "pmem         \(device.isPersistentMemory ? "yes" : "no") (pmem_is_pmem)\(device.isDeviceDAX ? ", device DAX" : "")",
            "MAP_SYNC     \(device.mapSync)",
            "persistence  \(device.persistence)" + (device.requestedPersistence == .automatic ? " (automatic)" : ""),
            "descriptors  \(PageMap.bytesPerDescriptor) bytes each (Linux struct page: 64); table "
                + "\(ByteCount.format(device.pages.reservedTableBytes)) reserved, "
                + "\(ByteCount.format(device.pages.residentTableBytes)) resident",
            "pins         \(totals.pinnedPages) pages pinned now; \(totals.acquired) acquired, \(totals.released) released",
        ]
        if !device.isPersistentMemory, device.requestedPersistence == .automatic {
            lines.append(
                "note         not persistent memory, so stores are made durable with msync; "
                    + "use --persistence cache-flush (or PMEM_IS_PMEM_FORCE=1) for real flush instructions")
        }
        text = lines.joined(separator: "\n")
    }

    func json() throws -> String {
        // Keys in a fixed order, for people reading the output.
        let body = try fields.map { key, value in
            let encoded = try JSONSerialization.data(
                withJSONObject: [value], options: [.fragmentsAllowed, .withoutEscapingSlashes])
            let element = String(decoding: encoded, as: UTF8.self).dropFirst().dropLast()
            return "  \"\(key)\": \(element)"
        }
        return "{\n" + body.joined(separator: ",\n") + "\n}"
    }
}
