import DAXTorture
import Foundation
import Synchronization
import Testing

@testable import DAX

/// Problems found by stress threads, reported at the end.
final class ProblemLog: @unchecked Sendable {
    private let lock = NSLock()
    private var problems: [String] = []
    func add(_ problem: String) { lock.withLock { if problems.count < 20 { problems.append(problem) } } }
    var all: [String] { lock.withLock { problems } }
}

@Suite("Stress", .serialized)
struct StressTests {
    @Test("pinners, DMA writers, a truncating thread and file churn at once: no byte where it does not belong")
    func pinTruncateChurn() throws {
        // Each RDMA server pins this many times, each other user makes this many files; the
        // administrator truncates until the servers are done.
        let pinsPerServer = longTests ? 2000 : 150
        let filesPerUser = longTests ? 2000 : 150
        let t = try TemporaryFileSystem(size: 48 << 20, name: "stress")
        let fs = t.fs
        let pages = 64
        let shared = try fs.create("/shared")
        try shared.write(pattern(pages * 4096), at: 0)
        let nic = DMAEngine(device: t.device)
        let contents = (0..<4).map { pattern(pages * 4096, seed: $0) }
        let problems = ProblemLog()
        let counts = (pins: Counter(), dma: Counter(), truncates: Counter(), files: Counter(), quarantines: Counter())
        let administratorRounds = Counter()
        let serversDone = Counter()

        onThreads(5) { role in
            var random = SeededRandom(seed: UInt64(role) &* 7919)
            switch role {
            case 0, 1:
                // An RDMA server: map, pin part of the file, let the NIC write markers, let go.
                let marker = [UInt8](repeating: 0xD0 | UInt8(role), count: 512)
                defer { serversDone.increment() }
                var pinned = 0
                while pinned < pinsPerServer {
                    let size = shared.size
                    guard size >= 4096, let mapping = try? shared.map(count: size / 4096 * 4096) else { continue }
                    let first = Int(random.next() % UInt64(size / 4096))
                    let count = 1 + Int(random.next() % UInt64(min(8, size / 4096 - first)))
                    if let pin = try? mapping.pin(offset: first * 4096, count: count * 4096) {
                        counts.pins.increment()
                        pinned += 1
                        let region = nic.register(pin)
                        for round in 0..<3 {
                            do {
                                try nic.write(marker, to: region, at: (round * 1000) % (count * 4096 - 512))
                                counts.dma.increment()
                            } catch {
                                problems.add("DMA write failed: \(error)")
                            }
                            // The transfer takes its time: the administrator goes round at least once.
                            let seen = administratorRounds.value
                            spinUntil { administratorRounds.value > seen }
                        }
                        nic.deregister(region)
                    }
                    mapping.unmap()
                }
            case 2:
                // The administrator: truncate under the NIC with .deferFree, then grow again.
                while serversDone.value < 2 {
                    defer { administratorRounds.increment() }
                    do {
                        try shared.truncate(to: Int(random.next() % UInt64(pages)) * 4096, ifBusy: .deferFree)
                        counts.truncates.increment()
                        if fs.statistics().quarantinedBlocks > 0 { counts.quarantines.increment() }
                        if random.next() % 3 == 0 {
                            try shared.punchHole(
                                offset: Int(random.next() % UInt64(pages)) * 4096, count: 8192,
                                ifBusy: .deferFree)
                        }
                        try shared.write(contents[Int(random.next() % 4)], at: 0)
                    } catch {
                        problems.add("truncate or regrow failed: \(error)")
                    }
                }
            default:
                // Other users: files that must hold exactly what they wrote.
                for index in 1...filesPerUser {
                    let path = "/churn-\(role)-\(index)"
                    let bytes = random.bytes(4096 * (1 + Int(random.next() % 12)))
                    do {
                        let file = try fs.create(path)
                        try file.write(bytes, at: 0)
                        for _ in 0..<3 {
                            if try file.read(count: bytes.count, at: 0) != bytes {
                                problems.add("\(path) holds bytes it did not write")
                                break
                            }
                        }
                        file.close()
                        try fs.remove(path)
                        counts.files.increment()
                    } catch {
                        problems.add("churn on \(path) failed: \(error)")
                    }
                }
            }
        }

        #expect(problems.all.isEmpty, "\(problems.all)")
        #expect(counts.pins.value > 10)
        #expect(counts.dma.value > 10)
        #expect(counts.truncates.value > 10)
        #expect(counts.files.value > 10)
        // The point of the test: truncates that found pages pinned and quarantined them.
        #expect(counts.quarantines.value > 0)
        print(
            "stress: \(counts.pins.value) pins, \(counts.dma.value) DMA writes, \(counts.truncates.value) truncates "
                + "(\(counts.quarantines.value) quarantining), \(counts.files.value) files")
        let statistics = fs.statistics()
        #expect(statistics.pinsAcquired == statistics.pinsReleased)
        #expect(statistics.pinnedPages == 0)
        #expect(statistics.quarantinedBlocks == 0)
        let sumOfPins = (0..<fs.pages.count).reduce(0) {
            $0 + fs.pages.state(of: PageFrameNumber(rawValue: UInt64($1))).pinCount
        }
        #expect(sumOfPins == 0)
        let report = try fs.check()
        #expect(report.isClean, "\(report)")
    }
}
