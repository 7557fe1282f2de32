import DAXTorture
import Foundation
import Testing

@testable import DAX

@Suite("Repair under harsh damage")
struct RepairFuzzTests {
    @Test(
        "zeroed, random and flipped runs of metadata bytes: repair leaves a clean device or refuses, and is idempotent")
    func harshDamage() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "harsh")
        let fs = t.fs
        try fs.createDirectory("/dir")
        try fs.createDirectory("/dir/sub")
        for index in 0..<20 {
            let file = try fs.create(index % 2 == 0 ? "/dir/file\(index)" : "/dir/sub/f\(index)")
            try file.write(pattern(3000 * index), at: 0)
        }
        let fragmented = try fs.create("/fragmented")
        let spacer = try fs.create("/spacer")
        for page in 0..<40 {
            try fragmented.write([UInt8(page)], at: page * 4096)
            try spacer.write([1], at: page * 4096)
        }
        let open = try fs.create("/orphan")
        try open.write(pattern(9000), at: 0)
        try fs.remove("/orphan")
        let sb = fs.superblock
        var targets: [Range<Int>] = [
            0..<4096, Int(sb.journalStart) * 4096..<(Int(sb.journalStart) * 4096 + 8192),
            sb.inodeOffset(1)..<sb.inodeOffset(64),
            Int(sb.bitmapStart) * 4096..<Int(sb.dataStart) * 4096,
            Int(sb.totalBlocks - 1) * 4096..<Int(sb.totalBlocks) * 4096,
        ]
        for inode in fs.namespace.table.withTrackedLock({ Array($0.inodes.values) }) {
            for block in inode.extents.leafBlocks { targets.append(Int(block) * 4096..<Int(block + 1) * 4096) }
            if inode.directory != nil {
                for extent in inode.extents.allExtents {
                    targets.append(Int(extent.physical) * 4096..<Int(extent.physicalEnd) * 4096)
                }
            }
        }
        // The device as a crash leaves it while a removed file is still open: on the orphan list.
        let image = try t.device.read(count: t.device.size, at: 0)
        open.close()
        try fs.unmount()
        var random = SeededRandom(seed: 99)
        var outcomes: [String: Int] = [:]
        for round in 0..<(longTests ? 1500 : 80) {
            image.withUnsafeBytes { t.device.copy($0, toOffset: 0) }
            for _ in 0..<(1 + Int(random.next() % 6)) {
                let target = targets[Int(random.next() % UInt64(targets.count))]
                let length = [1, 8, 64, 256, 4096][Int(random.next() % 5)]
                let offset = target.lowerBound + Int(random.next() % UInt64(target.count))
                let count = min(length, target.upperBound - offset)
                let mode = random.next() % 3
                var bytes = try t.device.read(count: count, at: offset)
                for i in bytes.indices {
                    switch mode {
                    case 0: bytes[i] = 0
                    case 1: bytes[i] = UInt8(truncatingIfNeeded: random.next())
                    default: bytes[i] ^= UInt8(truncatingIfNeeded: random.next() | 1)
                    }
                }
                try t.device.write(bytes, at: offset)
            }
            // Check and a (degraded) read-only mount never trap, whatever they find.
            _ = try? DAXFileSystem.check(t.device)
            if let readOnly = try? DAXFileSystem.mount(t.device, access: .readOnly) {
                _ = try? Model(reading: readOnly)
                try readOnly.unmount()
            }
            do {
                let report = try DAXFileSystem.repair(t.device)
                outcomes["repaired", default: 0] += 1
                #expect(report.check.isClean)
                do {
                    let mounted = try DAXFileSystem.mount(t.device)
                    let after = try mounted.check()
                    #expect(after.isClean, "round \(round): \(after)\n\(report)")
                    _ = try Model(reading: mounted)
                    try mounted.unmount()
                    let again = try DAXFileSystem.repair(t.device)
                    #expect(again.changedNothing, "round \(round): second repair \(again)\nfirst: \(report)")
                } catch {
                    Issue.record("round \(round): \(error)\n\(report)")
                }
            } catch let error as DAXError {
                #expect(error.code == .corrupted, "round \(round): \(error)")
                outcomes["refused: \(error.code)", default: 0] += 1
            }
        }
        #expect((outcomes["repaired"] ?? 0) > (longTests ? 1000 : 50), "\(outcomes)")
    }
}
