import Foundation

@testable import DAX

/// How much memory or storage touching a byte costs: a base page, or a transparent huge page.
///
/// With transparent huge pages the kernel may back a whole huge page (2 MiB on x86-64) when one
/// byte of it is touched, and `mincore` then reports all of it resident. Whether it may depends
/// on `/sys/kernel/mm/transparent_hugepage/enabled` (always, madvise, never) and on the mapping
/// (`madvise(MADV_HUGEPAGE)`); `/proc/self/smaps` sums both up per mapping as `THPeligible`.
/// tmpfs has huge pages of its own: the `huge=` mount option, overridden by
/// `/sys/kernel/mm/transparent_hugepage/shmem_enabled` when that says `force` or `deny`.
enum Residency {
    static let pageSize = Int(getpagesize())

    /// The huge page size (`hpage_pmd_size`), 2 MiB if the kernel does not say.
    static let hugePageSize: Int = {
        let text = try? String(contentsOfFile: "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", encoding: .utf8)
        return text.flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 2 << 20
    }()

    /// The bracketed choice of a transparent-huge-page setting, e.g. "madvise" for
    /// "always [madvise] never"; nil where the kernel has no such setting.
    static func setting(_ name: String) -> String? {
        guard let text = try? String(contentsOfFile: "/sys/kernel/mm/transparent_hugepage/\(name)", encoding: .utf8),
            let open = text.firstIndex(of: "["), let close = text[open...].firstIndex(of: "]")
        else { return nil }
        return String(text[text.index(after: open)..<close])
    }

    /// The unit in which the anonymous mapping holding `address` is backed as it is touched.
    static func granule(of address: UnsafeRawPointer) -> Int {
        if let eligible = smapsField("THPeligible", of: address) { return eligible == 1 ? hugePageSize : pageSize }
        // An older kernel without the field: assume the worst that the system setting allows.
        switch setting("enabled") {
        case "never", nil: return pageSize
        default: return hugePageSize
        }
    }

    /// The unit in which a tmpfs file under `/dev/shm` gets storage as it is written.
    static let devShmGranule: Int = {
        switch setting("shmem_enabled") {
        case "force": return hugePageSize
        case "deny", nil: return pageSize
        default: break
        }
        let mounts = readWhole("/proc/self/mounts") ?? ""
        // The last mount on /dev/shm is the one on top.
        let entries = mounts.split(separator: "\n").map { $0.split(separator: " ") }
        let options = entries.last { $0.count > 3 && $0[1] == "/dev/shm" }?[3] ?? ""
        let huge = options.split(separator: ",").first { $0.hasPrefix("huge=") }?.dropFirst(5) ?? "never"
        return huge == "never" || huge == "deny" ? pageSize : hugePageSize
    }()

    /// `field` (in kB, or a flag) of the mapping that holds `address`, from `/proc/self/smaps`.
    static func smapsField(_ field: String, of address: UnsafeRawPointer) -> Int? {
        guard let smaps = readWhole("/proc/self/smaps") else { return nil }
        let target = UInt(bitPattern: address)
        var inside = false
        for line in smaps.split(separator: "\n") {
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let first = words.first else { continue }
            if !first.hasSuffix(":"), let dash = first.firstIndex(of: "-"),
                let low = UInt(first[..<dash], radix: 16),
                let high = UInt(first[first.index(after: dash)...], radix: 16)
            {
                inside = low <= target && target < high
            } else if inside, first == "\(field):", words.count > 1 {
                return Int(words[1])
            }
        }
        return nil
    }

    /// How many `regionSize`-aligned regions of the page map's descriptor table hold a resident
    /// page. Touching a byte makes its region resident, with huge pages or without, so the count
    /// is the same whatever the transparent-huge-page setting.
    static func residentRegions(of pages: PageMap, regionSize: Int = hugePageSize) -> Int {
        let start = UnsafeMutableRawPointer(pages.table.core.pointee.descriptors)
        let bytes = pages.reservedTableBytes
        var vector = [UInt8](repeating: 0, count: bytes / pageSize)
        guard mincore(start, bytes, &vector) == 0 else { return -1 }
        let base = Int(bitPattern: start)
        var regions = Set<Int>()
        for (index, flags) in vector.enumerated() where flags & 1 != 0 {
            regions.insert((base + index * pageSize) / regionSize)
        }
        return regions.count
    }

    /// The whole of a file that reports no size, as `/proc` files do (Foundation reads one page).
    static func readWhole(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            guard count >= 0 else { return nil }
            if count == 0 { return String(decoding: bytes, as: UTF8.self) }
            bytes += buffer[..<count]
        }
    }

    /// How many `regionSize`-aligned regions of the file at `path` hold data (`SEEK_DATA`,
    /// `SEEK_HOLE`): the regions that storage was given to, however large its unit.
    static func dataRegions(_ path: String, regionSize: Int = hugePageSize) -> Int {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return -1 }
        defer { close(fd) }
        var regions = Set<Int>()
        var offset = lseek(fd, 0, 3)  // SEEK_DATA
        while offset >= 0 {
            let end = lseek(fd, offset, 4)  // SEEK_HOLE
            guard end > offset else { break }
            for region in Int(offset) / regionSize...Int(end - 1) / regionSize { regions.insert(region) }
            offset = lseek(fd, end, 3)  // SEEK_DATA
        }
        return regions.count
    }
}
