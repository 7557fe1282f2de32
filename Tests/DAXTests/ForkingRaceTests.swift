import DAXTorture
import Foundation
import Synchronization
import Testing

@testable import DAX

/// The canaries each pinner thread writes: per (thread, page) slot, the last one it started (before
/// the pin) and the last one it finished (after the unpin). A canary is `(thread + 1) << 56 | round`.
final class CanaryLedger: Sendable {
    let threads: Int
    let pages: Int
    private let started: Mutex<[UInt64]>
    private let finished: Mutex<[UInt64]>

    init(threads: Int, pages: Int) {
        self.threads = threads
        self.pages = pages
        started = Mutex([UInt64](repeating: 0, count: threads * pages))
        finished = Mutex([UInt64](repeating: 0, count: threads * pages))
    }

    func start(_ thread: Int, _ page: Int, _ canary: UInt64) {
        started.withTrackedLock { $0[thread * pages + page] = canary }
    }
    func finish(_ thread: Int, _ page: Int, _ canary: UInt64) {
        finished.withTrackedLock { $0[thread * pages + page] = canary }
    }
    var startedNow: [UInt64] { started.withTrackedLock { $0 } }
    var finishedNow: [UInt64] { finished.withTrackedLock { $0 } }

    /// Where `thread`'s canary for `page` lives in the file.
    func offset(_ thread: Int, _ page: Int) -> Int { page * PMemDevice.pageSize + thread * 8 }
}

/// A snapshot of the buffer and what its slots may hold: no less than was finished before the
/// clone began, no more than was started before it returned.
struct TakenClone {
    let path: String
    let lower: [UInt64]
    let upper: [UInt64]
}

@Suite("Forking races pins")
struct ForkingRaceTests {
    /// Seed 003's race, with every forking path at once: a pinner takes a page by frame while
    /// migration, dedup and clone each try to move, merge or share it.
    @Test("pin, DMA-write canaries and unpin while others migrate, dedup and clone the same file")
    func pinsRaceForking() throws {
        // 10^5 rounds in the test run, 10^4 under ThreadSanitizer (which checks every access of
        // each round, some fifty times slower), 10^6 with DAX_LONG_TESTS=1.
        let underTSan = ProcessInfo.processInfo.environment["DAX_TSAN"] == "1"
        let rounds = longTests ? 1_000_000 : underTSan ? 10_000 : 100_000
        let pinners = 2
        let pages = 8
        let t = try TemporaryFileSystem(size: 32 << 20, name: "forkrace")
        let fs = t.fs
        let file = try fs.create("/buffer")
        var initial = pattern(pages * pageBytes, seed: 21)
        for index in 0..<pages {
            initial.replaceSubrange(
                (index * pageBytes)..<(index * pageBytes + pinners * 8), with: [UInt8](repeating: 0, count: pinners * 8)
            )
        }
        try file.write(initial, at: 0)
        let mapping = try file.map(count: initial.count)
        let nic = DMAEngine(device: t.device)
        let ledger = CanaryLedger(threads: pinners, pages: pages)
        let stop = Flag()
        let pinnersDone = Counter()
        let failures = Mutex<[String]>([])
        let pinsTaken = Counter()
        let busyPins = Counter()
        let refusals = Mutex<[String]>([])
        let migrated = Counter()
        let busyPages = Counter()
        let deduplicated = Counter()
        let clones = Counter()
        // The forking threads go one step per few rounds of the pinners, so that the race keeps
        // its mix whatever a clone or a migration costs on this machine (a wait on a semaphore the
        // pinners signal, with a timeout only to notice the end).
        let paces = (0..<3).map { _ in DispatchSemaphore(value: 0) }
        @Sendable func pace(_ index: Int) { _ = paces[index].wait(timeout: .now() + .seconds(1)) }

        @Sendable func fail(_ message: String) {
            failures.withTrackedLock { $0.append(message) }
            stop.raise()
        }
        @Sendable func bytes(_ value: UInt64) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }
        @Sendable func value(_ bytes: [UInt8], at offset: Int) -> UInt64 {
            bytes[offset..<(offset + 8)].reversed().reduce(0) { $0 << 8 | UInt64($1) }
        }
        @Sendable func verify(_ clone: TakenClone) {
            do {
                let snapshot = try fs.open(clone.path, access: .readOnly)
                let contents = try snapshot.read(count: pages * pageBytes, at: 0)
                snapshot.close()
                for thread in 0..<pinners {
                    for page in 0..<pages {
                        let slot = thread * pages + page
                        let seen = value(contents, at: ledger.offset(thread, page))
                        guard seen >= clone.lower[slot], seen <= clone.upper[slot] else {
                            fail(
                                "\(clone.path): thread \(thread) page \(page) holds canary \(String(seen, radix: 16)), "
                                    + "outside [\(String(clone.lower[slot], radix: 16)), "
                                    + "\(String(clone.upper[slot], radix: 16))]: a device's write reached the clone")
                            return
                        }
                    }
                }
                try fs.remove(clone.path)
            } catch {
                fail("verify \(clone.path): \(error)")
            }
        }

        onThreads(pinners + 3) { index in
            switch index {
            case 0..<pinners:
                defer { pinnersDone.increment() }
                var random = SeededRandom(seed: UInt64(index) + 1)
                for round in 1...(rounds / pinners) where !stop.isRaised {
                    let page = Int(random.next() % UInt64(pages))
                    let canary = UInt64(index + 1) << 56 | UInt64(round)
                    let offset = ledger.offset(index, page)
                    ledger.start(index, page, canary)
                    do {
                        let pin: PinnedPages
                        do {
                            pin = try mapping.pin(offset: page * pageBytes, count: pageBytes)
                        } catch let error as DAXError where error.code == .busy {
                            busyPins.increment()  // frozen by a migration or dedup: back off
                            continue
                        } catch let error as DAXError where error.code == .invalidArgument {
                            // The mapping is live and covers the page: a page migration or dedup
                            // unmapped for a moment must be faulted back in, not refused. Counted
                            // (and reported below) so that the race goes on.
                            refusals.withTrackedLock { $0.append("thread \(index) round \(round): \(error)") }
                            continue
                        }
                        pinsTaken.increment()
                        let region = nic.register(pin)
                        let frame = region.frames[0]
                        try nic.write(bytes(canary), to: region, at: index * 8)
                        // While pinned: the file owns the frame, alone, and shows the canary.
                        let owner = try file.frames(offset: page * pageBytes, count: 1)[0]
                        let references = try file.blockReferences(offset: page * pageBytes, count: 1)[0]
                        let seen = value(try file.read(count: 8, at: offset), at: 0)
                        nic.deregister(region)
                        ledger.finish(index, page, canary)
                        if round % 8 == 0 { for semaphore in paces { semaphore.signal() } }
                        guard owner == frame, references == 1, seen == canary else {
                            fail(
                                "thread \(index) round \(round) page \(page): pinned \(frame), file has "
                                    + "\(String(describing: owner)) with \(references) references and "
                                    + "canary \(String(seen, radix: 16)), not \(String(canary, radix: 16))")
                            return
                        }
                        // Unpinned: the page may move or be shared again, the canary stays.
                        let after = value(try file.read(count: 8, at: offset), at: 0)
                        guard after == canary else {
                            fail("thread \(index) round \(round) page \(page): canary lost after the unpin")
                            return
                        }
                    } catch {
                        fail("thread \(index) round \(round): \(error)")
                        return
                    }
                }
            case pinners:
                while pinnersDone.value < pinners, !stop.isRaised {
                    pace(0)
                    do {
                        let result = try file.migrate(offset: 0, count: pages * pageBytes)
                        guard result.migrated + result.busy.count <= pages,
                            result.busy.allSatisfy({ (0..<pages).contains($0) })
                        else {
                            fail("migrate: \(result)")
                            return
                        }
                        for _ in 0..<result.migrated { migrated.increment() }
                        for _ in result.busy { busyPages.increment() }
                    } catch {
                        fail("migrate: \(error)")
                    }
                }
            case pinners + 1:
                var turn = 0
                while pinnersDone.value < pinners, !stop.isRaised {
                    pace(1)
                    do {
                        try fs.clone("/buffer", to: "/donor")
                        let (source, destination) = turn % 2 == 0 ? ("/donor", "/buffer") : ("/buffer", "/donor")
                        turn += 1
                        let shared = try fs.deduplicate(
                            source, offset: 0, destination, offset: 0, count: pages * pageBytes)
                        guard shared >= 0, shared <= pages * pageBytes, shared % pageBytes == 0 else {
                            fail("dedup returned \(shared)")
                            return
                        }
                        if shared > 0 { deduplicated.increment() }
                        try fs.remove("/donor")
                    } catch {
                        fail("clone and dedup: \(error)")
                    }
                }
            default:
                var taken: [TakenClone] = []
                var number = 0
                while pinnersDone.value < pinners, !stop.isRaised {
                    pace(2)
                    number += 1
                    let lower = ledger.finishedNow
                    do {
                        try fs.clone("/buffer", to: "/snap\(number)")
                    } catch {
                        fail("clone: \(error)")
                        return
                    }
                    taken.append(TakenClone(path: "/snap\(number)", lower: lower, upper: ledger.startedNow))
                    clones.increment()
                    // Looked at a few clones later, after more of the NIC's writes.
                    if taken.count > 4 { verify(taken.removeFirst()) }
                }
                for clone in taken { verify(clone) }
            }
        }

        let problems = failures.withTrackedLock { $0 }
        #expect(problems.isEmpty, "\(problems.prefix(5).joined(separator: "\n"))")
        let refused = refusals.withTrackedLock { $0 }
        #expect(refused.isEmpty, "\(refused.count) pins of a mapped page refused: \(refused.prefix(3))")
        // No DMA write was lost: each slot holds the last canary written to it.
        let final = try file.read(count: pages * pageBytes, at: 0)
        let finished = ledger.finishedNow
        for thread in 0..<pinners {
            for page in 0..<pages where problems.isEmpty {
                #expect(value(final, at: ledger.offset(thread, page)) == finished[thread * pages + page])
            }
        }
        mapping.unmap()
        let statistics = fs.statistics()
        #expect(statistics.pinnedPages == 0)
        #expect(statistics.pinsAcquired == statistics.pinsReleased)
        #expect(statistics.pinsAcquired == pinsTaken.value)
        #expect(statistics.quarantinedBlocks == 0)
        if problems.isEmpty {
            // Every thread did its work, often.
            #expect(pinsTaken.value > rounds / 2)
            #expect(migrated.value > 0 && deduplicated.value > 0 && clones.value > 0)
        }
        print(
            "forking race: \(pinsTaken.value) pins (\(busyPins.value) backed off, \(refused.count) refused), \(migrated.value) pages migrated, "
                + "\(busyPages.value) busy, \(deduplicated.value) dedups that shared, \(clones.value) clones")
        let report = try fs.check()
        #expect(report.isClean, "\(report)")
        if problems.isEmpty {
            // Every clone was verified and removed, and so was the donor.
            #expect(try fs.contentsOfDirectory("/") == ["buffer"])
            #expect(fs.statistics().sharedBlocks == 0)
        }
    }
}
