import Foundation
import Testing

@testable import DAX

/// A tiny persistent log straight on a device: a count at offset 0, 64-byte records from 4096,
/// each eight words, the last a checksum of the first seven.
enum TinyLog {
    static let start = 4096

    static func record(_ index: Int) -> [UInt64] {
        let words = (0..<7).map { UInt64(index * 7 + $0 + 1) &* 0x9E37_79B9 }
        return words + [words.reduce(0x1234, { $0 &* 31 &+ $1 })]
    }

    /// Appends record `index`. `planted`: the bug of publishing the count before the record is
    /// persisted (both stored, the count persisted first).
    static func append(_ index: Int, to device: PMemDevice, planted: Bool) {
        let offset = start + index * 64
        for (word, value) in record(index).enumerated() {
            device.baseAddress.storeBytes(of: value, toByteOffset: offset + word * 8, as: UInt64.self)
        }
        if planted {
            device.baseAddress.storeBytes(of: UInt64(index + 1), toByteOffset: 0, as: UInt64.self)
            device.persist(offset: 0, count: 8)
            device.persist(offset: offset, count: 64)
        } else {
            device.persist(offset: offset, count: 64)
            device.baseAddress.storeBytes(of: UInt64(index + 1), toByteOffset: 0, as: UInt64.self)
            device.persist(offset: 0, count: 8)
        }
    }

    struct Torn: Error, CustomStringConvertible {
        var description: String
    }

    /// Every record the count publishes is whole.
    static func check(_ device: PMemDevice) throws {
        let count = Int(device.baseAddress.load(fromByteOffset: 0, as: UInt64.self))
        for index in 0..<count {
            let stored = (0..<8).map {
                device.baseAddress.load(fromByteOffset: start + index * 64 + $0 * 8, as: UInt64.self)
            }
            guard stored == record(index) else { throw Torn(description: "record \(index) of \(count) is torn") }
        }
    }
}

@Suite("Crash explorer")
struct CrashExplorerTests {
    let explorer = CrashExplorer(deviceSize: 2 << 20, imagesPerPoint: 4, seed: 7)

    @Test("a record published before it is persisted is caught; the correct order passes")
    func plantedBug() throws {
        let buggy = try explorer.explore(
            workload: { device in for index in 0..<4 { TinyLog.append(index, to: device, planted: true) } },
            check: TinyLog.check)
        #expect(buggy.crashPoints == 9)  // two fences per append, and the end
        #expect(!buggy.failures.isEmpty)
        #expect(buggy.failures.allSatisfy { $0.error.contains("torn") })

        let correct = try explorer.explore(
            workload: { device in for index in 0..<4 { TinyLog.append(index, to: device, planted: false) } },
            check: TinyLog.check)
        #expect(correct.crashPoints == 9)
        #expect(correct.failures.isEmpty)
        #expect(correct.imagesChecked >= 9)
    }

    @Test("a failure replays: its image is kept as a device file and fails the check again")
    func replay() throws {
        let workload: (PMemDevice) throws -> Void = { device in
            for index in 0..<3 { TinyLog.append(index, to: device, planted: true) }
        }
        let report = try explorer.explore(workload: workload, check: TinyLog.check)
        let failure = try #require(report.failures.last)
        let path = TemporaryDevice.uniquePath("replay")
        defer { unlink(path) }
        let again = try explorer.replay(failure, keepingImageAt: path, workload: workload, check: TinyLog.check)
        #expect(again == failure.error)
        let kept = try PMemDevice.open(path: path)
        defer { kept.close() }
        #expect(throws: TinyLog.Torn.self) { try TinyLog.check(kept) }

        expectDAXError(.alreadyExists) {
            try explorer.replay(failure, keepingImageAt: path, workload: workload, check: TinyLog.check)
        }
        let beyond = CrashFailure(crashPoint: 99, seed: 0, error: "")
        let nowhere = TemporaryDevice.uniquePath("nowhere")
        expectDAXError(.invalidArgument) {
            try explorer.replay(beyond, keepingImageAt: nowhere, workload: workload, check: TinyLog.check)
        }
        #expect(access(nowhere, F_OK) != 0)
    }

    @Test("shards cover exactly what one run covers, and their JSON reports merge")
    func shards() throws {
        let workload: (PMemDevice) throws -> Void = { device in
            for index in 0..<3 { TinyLog.append(index, to: device, planted: true) }
        }
        let whole = try explorer.explore(workload: workload, check: TinyLog.check)
        var parts: [CrashReport] = []
        for index in 1...3 {
            var shard = explorer
            shard.shard = try CrashShard(parsing: "\(index)/3")
            let report = try shard.explore(workload: workload, check: TinyLog.check)
            let json = try JSONEncoder().encode(report)
            parts.append(try JSONDecoder().decode(CrashReport.self, from: json))
        }
        let merged = try CrashReport.merge(parts)
        #expect(merged.isComplete)
        #expect(merged.crashPoints == whole.crashPoints)
        #expect(merged.imagesChecked == whole.imagesChecked)
        #expect(merged.failures == whole.failures)
        #expect(parts.allSatisfy { $0.imagesChecked < whole.imagesChecked })

        expectDAXError(.invalidArgument) { try CrashReport.merge([parts[0], parts[0]]) }
        expectDAXError(.invalidArgument) { try CrashReport.merge([]) }
        expectDAXError(.invalidArgument) { try CrashShard(parsing: "4/3") }
        expectDAXError(.invalidArgument) { try CrashShard(parsing: "x") }
    }

    /// Two campaigns can have as many crash points (the same workload with other explorer
    /// settings): their shards must not merge into a "complete" report no one run made.
    @Test("shards of different campaigns do not merge, though their crash points agree")
    func mergeRefusesOtherCampaigns() throws {
        let workload: (PMemDevice) throws -> Void = { device in
            for index in 0..<3 { TinyLog.append(index, to: device, planted: true) }
        }
        func shard(_ index: Int, _ change: (inout CrashExplorer) -> Void = { _ in }) throws -> CrashReport {
            var shard = explorer
            shard.workloadName = "tiny log, 3 appends"
            change(&shard)
            shard.shard = try CrashShard(parsing: "\(index)/2")
            let report = try shard.explore(workload: workload, check: TinyLog.check)
            return try JSONDecoder().decode(CrashReport.self, from: try JSONEncoder().encode(report))
        }
        let first = try shard(1)
        var expected = CrashCampaign(explorer)
        expected.workload = "tiny log, 3 appends"
        #expect(first.campaign == expected)
        #expect(try CrashReport.merge([first, try shard(2)]).isComplete)
        let others: [(String, CrashReport)] = [
            ("seed", try shard(2) { $0.seed += 1 }),
            ("domain eadr", try shard(2) { $0.domain = .eadr }),
            ("image", try shard(2) { $0.imagesPerPoint += 1 }),
            ("bytes of device", try shard(2) { $0.deviceSize *= 2 }),
            ("another workload", try shard(2) { $0.workloadName = "another workload" }),
        ]
        for (differs, other) in others {
            #expect(other.crashPoints == first.crashPoints)
            let error = expectDAXError(.invalidArgument) { try CrashReport.merge([first, other]) }
            #expect(error?.message.contains("different campaigns") == true, "\(error.map { "\($0)" } ?? "")")
            #expect(error?.message.contains(differs) == true, "\(differs): \(error.map { "\($0)" } ?? "")")
        }
        // A report written before reports named their campaign merges with its own kind only.
        var unnamed = try shard(2)
        unnamed.campaign = nil
        expectDAXError(.invalidArgument) { try CrashReport.merge([first, unnamed]) }
        var unnamedFirst = first
        unnamedFirst.campaign = nil
        #expect(try CrashReport.merge([unnamedFirst, unnamed]).isComplete)
    }

    /// A shard's JSON is a file a user or a CI step can edit or damage: numbers no exploration
    /// makes are refused, by the decoder and by merge, never summed into a trap or a nonsense total.
    @Test("reports with impossible numbers are refused when decoded and when merged; totals never overflow")
    func corruptReportsAreRefused() throws {
        let workload: (PMemDevice) throws -> Void = { device in
            for index in 0..<3 { TinyLog.append(index, to: device, planted: true) }
        }
        var parts: [CrashReport] = []
        for index in 1...2 {
            var shard = explorer
            shard.shard = try CrashShard(parsing: "\(index)/2")
            parts.append(try shard.explore(workload: workload, check: TinyLog.check))
        }
        #expect(try CrashReport.merge(parts).isComplete)
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        func edited(_ change: (inout CrashReport) -> Void) throws -> (CrashReport, Data) {
            var report = parts[0]
            change(&report)
            return (report, try encoder.encode(report))
        }
        let impossible: [(String, (inout CrashReport) -> Void)] = [
            ("-1 images checked", { $0.imagesChecked = -1 }),
            ("\(Int.min) images checked", { $0.imagesChecked = .min }),
            ("0 crash points", { $0.crashPoints = 0 }),
            ("-1.0 seconds", { $0.seconds = -1 }),
            ("not one of 1 to", { $0.failures[0].crashPoint = $0.crashPoints + 1 }),
            ("among", { $0.imagesChecked = $0.failures.count - 1 }),
            ("no shards", { $0.shards = [] }),
        ]
        try #require(!parts[0].failures.isEmpty, "the planted bug gives the shard failures to edit")
        for (says, change) in impossible {
            let (report, json) = try edited(change)
            #expect(throws: DecodingError.self, "\(says)") { try JSONDecoder().decode(CrashReport.self, from: json) }
            let error = expectDAXError(.invalidArgument) { try CrashReport.merge([report, parts[1]]) }
            #expect(error?.message.contains(says) == true, "\(says): \(error.map { "\($0)" } ?? "")")
        }
        // Each valid, together too large: refused, not a trap.
        let (huge, json) = try edited { $0.imagesChecked = .max }
        #expect(try JSONDecoder().decode(CrashReport.self, from: json) == huge)
        let error = expectDAXError(.invalidArgument) { try CrashReport.merge([huge, parts[1]]) }
        #expect(error?.message.contains("do not fit") == true, "\(error.map { "\($0)" } ?? "")")
    }

    @Test("few lines in flight: every single line and pair is an image of its own")
    func smallSubsets() throws {
        let seeds = CrashImagePlan.seeds(point: 1, lineCount: 3, randomImages: 2, explorerSeed: 1)
        #expect(seeds.count == 2 + 3 + 3 + 2)
        let lines = [10, 20, 30]
        let images = Set(seeds.map { CrashImagePlan.image(seed: $0, of: lines).map(\.line) })
        for subset in [[], [10], [20], [30], [10, 20], [10, 30], [20, 30], [10, 20, 30]] {
            #expect(images.contains(subset))
        }
        #expect(CrashImagePlan.seeds(point: 1, lineCount: 0, randomImages: 5, explorerSeed: 1) == [0])
    }

    @Test("under eADR nothing is in flight: one image per crash point, and the planted bug is harmless")
    func eadr() throws {
        var explorer = explorer
        explorer.domain = .eadr
        let report = try explorer.explore(
            workload: { device in for index in 0..<3 { TinyLog.append(index, to: device, planted: true) } },
            check: TinyLog.check)
        #expect(report.crashPoints == 7)
        #expect(report.imagesChecked == 7)
        #expect(report.failures.isEmpty)
    }

    @Test("a bad configuration is refused before anything runs, and leaves no device behind")
    func badConfiguration() throws {
        let directory = TemporaryDevice.uniquePath("explore-dir")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        nonisolated(unsafe) var ran = false
        var small = CrashExplorer(deviceSize: 4096)
        small.directory = directory
        expectDAXError(.invalidArgument) { try small.explore(workload: { _ in ran = true }, check: { _ in }) }
        var negative = CrashExplorer(deviceSize: 2 << 20, imagesPerPoint: -1)
        negative.directory = directory
        expectDAXError(.invalidArgument) { try negative.explore(workload: { _ in ran = true }, check: { _ in }) }
        #expect(!ran)
        var good = CrashExplorer(deviceSize: 2 << 20)
        good.directory = directory
        _ = try good.explore(workload: { device in TinyLog.append(0, to: device, planted: false) }, check: { _ in })
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty)
    }

    @Test("what the checker stores never reaches the next image")
    func checkerStoresAreThrownAway() throws {
        let report = try explorer.explore(
            workload: { device in for index in 0..<2 { TinyLog.append(index, to: device, planted: false) } },
            check: { image in
                let stray = image.baseAddress.load(fromByteOffset: 1 << 20, as: UInt64.self)
                guard stray == 0 else { throw TinyLog.Torn(description: "a checker's store leaked") }
                image.baseAddress.storeBytes(of: 0xBAD, toByteOffset: 1 << 20, as: UInt64.self)
                image.persist(offset: 1 << 20, count: 8)
                try TinyLog.check(image)
            })
        #expect(report.failures.isEmpty)
        #expect(report.imagesChecked > 1)
    }
}
