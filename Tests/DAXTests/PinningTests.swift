import Foundation
import Synchronization
import Testing

@testable import DAX

/// The truncate policies the pinning stories are played under.
enum PolicyCase: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case fail, wait, deferFree, revokeLeases

    var policy: BusyPolicy {
        switch self {
        case .fail: .fail
        case .wait: .wait(timeout: .milliseconds(200))
        case .deferFree: .deferFree
        case .revokeLeases: .revokeLeases(grace: .milliseconds(100))
        }
    }

    var testDescription: String { rawValue }
}

/// A file of 16 pages, mapped, whose second half an RDMA NIC has registered.
final class RDMAScenario {
    let t: TemporaryFileSystem
    let file: DAXFile
    let data: [UInt8]
    let frames: [PageFrameNumber]
    let mapping: DAXMapping
    let nic: DMAEngine
    let region: DMARegion
    let asked = Counter()

    init(longTerm: Bool) throws {
        t = try TemporaryFileSystem(size: 8 << 20, name: "rdma")
        file = try t.fs.create("/rdma-buffer")
        data = pattern(16 * 4096)
        try file.write(data, at: 0)
        frames = try file.frames(offset: 0, count: data.count).map { $0! }
        mapping = try file.map(count: data.count)
        let asked = self.asked
        let pin = try mapping.pin(
            offset: 8 * 4096, count: 8 * 4096,
            lifetime: longTerm ? .longTerm(onRevoke: { asked.increment() }) : .shortTerm)
        nic = DMAEngine(device: t.device)
        region = nic.register(pin)
    }

    var pinnedFrames: Set<PageFrameNumber> { Set(frames[8...]) }

    /// Another file takes every free block; returns its frames, after checking it reads as zeros.
    func allocateEverything(_ name: String) throws -> Set<PageFrameNumber> {
        let other = try t.fs.create(name)
        let free = t.fs.statistics().freeBlocks
        guard free > 0 else { return [] }
        try other.allocate(offset: 0, count: free * 4096)
        #expect(t.fs.statistics().freeBlocks == 0)
        #expect(try other.read(count: free * 4096, at: 0).allSatisfy { $0 == 0 }, "the new file shows old bytes")
        return Set(try other.frames(offset: 0, count: free * 4096).compactMap { $0 })
    }
}

/// The story Matthew Wilcox told ("direct_access, pinning and truncation", linux-fsdevel, Oct 2014):
/// get_user_pages on a DAX file pins blocks, not page-cache copies, so a truncate that freed them
/// would let a NIC write into another file's data. Played under every busy policy, with the pins
/// a DMA engine holds.
@Suite("Pins gate truncate, punch and reuse of their blocks")
struct PinningTests {
    @Test(
        "truncate while an RDMA registration holds the pages, the NIC writing afterwards",
        arguments: PolicyCase.allCases)
    func truncateUnderRDMA(policy: PolicyCase) throws {
        let s = try RDMAScenario(longTerm: policy == .revokeLeases)
        let fs = s.t.fs
        let nicBytes = [UInt8](repeating: 0xEE, count: 4096)
        var thrown: DAXError.Code?
        do {
            try s.file.truncate(to: 4 * 4096, ifBusy: policy.policy)
        } catch let error as DAXError {
            thrown = error.code
        }
        switch policy {
        case .fail, .wait:
            // All or nothing: size, data and mappings exactly as they were.
            #expect(thrown == (policy == .fail ? .busy : .timedOut))
            #expect(s.file.size == 16 * 4096)
            #expect(try s.file.read(count: s.data.count, at: 0) == s.data)
            for page in 0..<16 {
                #expect(s.mapping.frame(at: page) == s.frames[page].rawValue)
                #expect(fs.pages.state(of: s.frames[page]).mapCount == 1)
            }
            #expect(fs.statistics().quarantinedBlocks == 0)
            // The pages are still the file's: the NIC's write shows in it.
            try s.nic.write(nicBytes, to: s.region, at: 0)
            #expect(try s.file.read(count: 4096, at: 8 * 4096) == nicBytes)
            let taken = try s.allocateEverything("/other")
            #expect(taken.isDisjoint(with: s.frames))
        case .deferFree:
            #expect(thrown == nil)
            #expect(s.file.size == 4 * 4096)
            #expect(fs.statistics().quarantinedBlocks == 8)
            for page in 4..<16 { #expect(s.mapping.frame(at: page) == nil) }
            for frame in s.pinnedFrames {
                #expect(
                    fs.pages.state(of: frame)
                        == PageState(
                            refCount: 1, pinCount: 1, mapCount: 0,
                            isAllocated: false, isQuarantined: true))
            }
            // The NIC writes into the quarantined pages; nobody else owns them.
            try s.nic.write(nicBytes, to: s.region, at: 0)
            let taken = try s.allocateEverything("/other")
            #expect(taken.isDisjoint(with: s.pinnedFrames))
            #expect(taken.isSuperset(of: s.frames[4..<8]))  // the unpinned ones were reused
            // Deregistration ends the quarantine; the blocks come back, and read as zeros when reused.
            s.nic.deregister(s.region)
            #expect(fs.statistics().quarantinedBlocks == 0)
            #expect(fs.statistics().freeBlocks == 8)
            let reused = try s.allocateEverything("/after")
            #expect(reused == s.pinnedFrames)
        case .revokeLeases:
            #expect(thrown == nil)
            #expect(s.asked.value == 1)
            #expect(s.region.isRevoked)
            #expect(s.file.size == 4 * 4096)
            #expect(fs.statistics().quarantinedBlocks == 0)
            // The NIC is cut off: it writes nothing, anywhere.
            let before = try s.t.device.read(count: 4096, at: s.frames[8].deviceOffset)
            let error = expectDAXError(.revoked) { try s.nic.write(nicBytes, to: s.region, at: 0) }
            #expect(error != nil)
            expectDAXError(.revoked) { try s.nic.read(count: 1, from: s.region, at: 0) }
            #expect(try s.t.device.read(count: 4096, at: s.frames[8].deviceOffset) == before)
            let taken = try s.allocateEverything("/other")
            #expect(taken.isSuperset(of: s.pinnedFrames))  // revoked blocks are reusable at once
        }
        s.nic.deregister(s.region)
        s.mapping.unmap()
        let statistics = fs.statistics()
        #expect(statistics.pinsAcquired == 8)
        #expect(statistics.pinsReleased == 8)
        #expect(statistics.pinnedPages == 0)
        #expect(statistics.quarantinedBlocks == 0)
        #expect(try fs.check().isClean)
    }

    @Test("a waiting truncate is woken by the final unpin and frees the blocks normally")
    func waitWokenByUnpin() throws {
        let s = try RDMAScenario(longTerm: false)
        let pages = s.t.fs.pages
        let pinned = s.pinnedFrames
        let nic = s.nic
        let region = s.region
        let released = Flag()
        let wokeTheTruncate = Flag()
        let finished = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            // Deregister only once the truncate sleeps on a pinned page.
            spinUntil { pages.hasSleeper(onAnyOf: pinned) }
            let wakeUps = pages.wakeUps
            released.raise()
            nic.deregister(region)
            if pages.wakeUps > wakeUps { wokeTheTruncate.raise() }
            finished.signal()
        }
        try s.file.truncate(to: 0, ifBusy: .wait(timeout: .seconds(20)))
        #expect(released.isRaised, "the truncate went on while the pages were pinned")
        finished.wait()
        #expect(wokeTheTruncate.isRaised, "the final unpin woke no one")
        #expect(!pages.hasSleeper(onAnyOf: pinned))
        #expect(s.file.size == 0)
        #expect(s.t.fs.statistics().quarantinedBlocks == 0)
        s.mapping.unmap()
        #expect(s.t.fs.statistics().freeBlocks == s.t.fs.statistics().totalBlocks - 1)
    }

    @Test("a removed file whose pages are pinned: the name goes, the blocks wait in quarantine")
    func removedButPinned() throws {
        let t = try TemporaryFileSystem(size: 4 << 20)
        let fs = t.fs
        let file = try fs.create("/pinned")
        try file.write(pattern(4 * 4096), at: 0)
        let mapping = try file.map(count: 4 * 4096)
        let pin = try mapping.pin(offset: 0, count: 4 * 4096)
        mapping.unmap()
        file.close()
        try fs.remove("/pinned")
        #expect(try fs.contentsOfDirectory("/").isEmpty)
        #expect(fs.statistics().quarantinedBlocks == 4)
        expectDAXError(.busy) { try fs.unmount() }
        pin.release()
        #expect(fs.statistics().quarantinedBlocks == 0)
        #expect(try fs.check().isClean)
    }

    @Test("pin rules: outside the mapping, truncated away, punched, unmapped")
    func pinRules() throws {
        let t = try TemporaryFileSystem(size: 4 << 20)
        let file = try t.fs.create("/f")
        try file.write(pattern(8 * 4096), at: 0)
        let mapping = try file.map(count: 8 * 4096)
        expectDAXError(.invalidArgument) { _ = try mapping.pin(offset: 7 * 4096, count: 8192) }
        expectDAXError(.invalidArgument) { _ = try mapping.pin(offset: -1, count: 1) }
        expectDAXError(.invalidArgument) { _ = try mapping.pin(offset: 0, count: 0) }
        try file.punchHole(offset: 2 * 4096, count: 4096)
        try file.truncate(to: 6 * 4096)
        expectDAXError(.invalidArgument) { _ = try mapping.pin(offset: 6 * 4096, count: 10) }  // truncated away
        // A read pin of the punched page pins the zero frame and allocates nothing.
        let zero = try mapping.pin(offset: 2 * 4096, count: 10, access: .readOnly)
        #expect(zero.frames == [t.fs.pages.zeroFrame])
        #expect(try file.frames(offset: 2 * 4096, count: 1)[0] == nil)
        zero.release()
        // A write pin of the punched page gives it a new zeroed block, in the mapping too.
        let pin = try mapping.pin(offset: 2 * 4096, count: 10)
        let frame = pin.frames[0]
        #expect(try file.frames(offset: 2 * 4096, count: 1)[0] == frame)
        #expect(mapping.frame(at: 2) == frame.rawValue)
        #expect(mapping.baseAddress.load(fromByteOffset: 2 * 4096, as: UInt64.self) == 0)
        mapping.baseAddress.storeBytes(of: 0xAB, toByteOffset: 2 * 4096, as: UInt8.self)
        #expect(try file.read(count: 1, at: 2 * 4096) == [0xAB])
        pin.release()
        mapping.unmap()
        expectDAXError(.invalidArgument) { _ = try mapping.pin(offset: 0, count: 1) }
        #expect(try t.fs.check().isClean)
    }

    /// Invariant 11 for a hole: a lease on the zero frame would read zeros for good, whatever the
    /// owner stored there afterwards. A long-term read-only pin gives the hole its block first
    /// (the kernel's R/O long-term unshare); a short-term one still pins the zero frame; on a
    /// read-only mount, where nothing can be stored, so does a lease.
    @Test("a long-term read-only pin of a hole pins a block of the file, which the owner's later stores reach")
    func longTermReadOnlyPinOfHoleAllocates() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "ltrohole")
        let owner = try t.fs.create("/f")
        try owner.write(pattern(4096), at: 4096)  // page 0 is a hole
        let reader = try t.fs.open("/f", access: .readOnly)
        let view = try reader.map(count: 2 * 4096, access: .readOnly)
        let engine = DMAEngine(device: t.device)

        let short = try view.pin(offset: 0, count: 4096, access: .readOnly)
        #expect(short.frames == [t.fs.pages.zeroFrame])
        short.release()
        #expect(try owner.frames(offset: 0, count: 4096) == [nil])

        let before = t.fs.statistics()
        let region = engine.register(
            try view.pin(offset: 0, count: 4096, access: .readOnly, lifetime: .longTerm(onRevoke: {})))
        let frame = try #require(try owner.frames(offset: 0, count: 4096)[0])
        #expect(region.frames == [frame])
        #expect(frame.rawValue < UInt64(t.device.pageCount))
        let during = t.fs.statistics()
        #expect(before.freeBlocks - during.freeBlocks == 1)
        #expect(during.pinnedPages == 1 && during.pinsAcquired - before.pinsAcquired == 1)
        #expect(t.fs.pages.state(of: frame).pinCount == 1)
        #expect(try engine.read(count: 8, from: region, at: 0) == [UInt8](repeating: 0, count: 8))
        // The reader's mapping shows the block, and the owner's stores reach the device's view.
        #expect(view.frame(at: 0) == frame.rawValue)
        try owner.write([0x5C, 0x5D], at: 0)
        #expect(try engine.read(count: 2, from: region, at: 0) == [0x5C, 0x5D])
        #expect(view.baseAddress.load(as: UInt8.self) == 0x5C)
        // A lease of a page that now has a block blocks unmount as any pin does.
        expectDAXError(.busy) { try t.fs.unmount() }
        engine.deregister(region)
        view.unmap()
        #expect(t.fs.statistics().pinnedPages == 0)
        #expect(try t.fs.check().isClean)
    }

    @Test("a long-term read-only pin of a hole with no space left is .noSpace and changes nothing")
    func longTermReadOnlyPinOfHoleWithoutSpace() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "ltronospace")
        let owner = try t.fs.create("/f")
        try owner.truncate(to: 4096)
        let filler = try t.fs.create("/filler")
        let free = t.fs.statistics().freeBlocks
        try filler.allocate(offset: 0, count: free * 4096)
        #expect(t.fs.statistics().freeBlocks == 0)
        let view = try t.fs.open("/f", access: .readOnly).map(count: 4096, access: .readOnly)
        defer { view.unmap() }
        let before = t.fs.statistics()
        expectDAXError(.noSpace) {
            _ = try view.pin(offset: 0, count: 4096, access: .readOnly, lifetime: .longTerm(onRevoke: {}))
        }
        #expect(try owner.frames(offset: 0, count: 4096) == [nil])
        let after = t.fs.statistics()
        #expect(after.pinsAcquired == before.pinsAcquired && after.pinnedPages == 0)
        #expect(try t.fs.check().isClean)
    }

    @Test("on a read-only mount a long-term read-only pin of a hole pins the zero frame and allocates nothing")
    func longTermReadOnlyPinOfHoleOnReadOnlyMount() throws {
        let temporary = try TemporaryDevice(size: 4 << 20, name: "ltromount")
        do {
            let fs = try DAXFileSystem.format(temporary.device)
            let file = try fs.create("/f")
            try file.truncate(to: 4096)
            file.close()
            try fs.unmount()
        }
        let fs = try DAXFileSystem.mount(temporary.device, access: .readOnly)
        defer { try? fs.unmount() }
        let view = try fs.open("/f", access: .readOnly).map(count: 4096, access: .readOnly)
        defer { view.unmap() }
        let free = fs.statistics().freeBlocks
        let pin = try view.pin(offset: 0, count: 4096, access: .readOnly, lifetime: .longTerm(onRevoke: {}))
        #expect(pin.frames == [fs.pages.zeroFrame])
        #expect(fs.statistics().freeBlocks == free)
        pin.release()
    }

    /// Invariant 9 over the device's descriptors: the zero frame is not one of them, and as the
    /// kernel takes no pin on its shared zero page, a pin of it moves no count.
    @Test(
        "a read pin across holes and blocks counts the blocks only: acquired minus released is the device's pin counts")
    func readPinOfHolesCountsBlocksOnly() throws {
        let t = try TemporaryFileSystem(size: 4 << 20)
        let file = try t.fs.create("/f")
        try file.write(pattern(4 * 4096), at: 0)
        try file.punchHole(offset: 1 * 4096, count: 4096)
        try file.punchHole(offset: 2 * 4096, count: 4096)
        let mapping = try file.map(count: 4 * 4096, access: .readOnly)
        defer { mapping.unmap() }
        func pinCounts() -> Int {
            (0..<t.fs.pages.count).reduce(0) {
                $0 + t.fs.pages.state(of: PageFrameNumber(rawValue: UInt64($1))).pinCount
            }
        }
        let before = t.fs.statistics()
        let pin = try mapping.pin(offset: 0, count: 4 * 4096, access: .readOnly)
        let zero = t.fs.pages.zeroFrame
        #expect(pin.frames.count == 4)
        #expect(pin.frames[1] == zero && pin.frames[2] == zero)
        let during = t.fs.statistics()
        #expect(during.pinsAcquired - before.pinsAcquired == 2)
        #expect(during.pinnedPages == 2)
        #expect(during.pinsAcquired - during.pinsReleased == pinCounts())
        #expect(t.fs.pages.state(of: zero).pinCount == 0)
        // A device reads the holes as zeros by frame, and the blocks' bytes.
        let engine = DMAEngine(device: t.device)
        let region = engine.register(pin)
        #expect(
            try engine.read(count: 4 * 4096, from: region, at: 0)
                == pattern(4 * 4096).enumerated().map {
                    $0.offset / 4096 == 1 || $0.offset / 4096 == 2 ? 0 : $0.element
                })
        engine.deregister(region)
        let after = t.fs.statistics()
        #expect(after.pinsReleased - before.pinsReleased == 2)
        #expect(after.pinnedPages == 0)
        #expect(pinCounts() == 0)
        // A one-page read pin of a hole alone, released at once.
        let single = try mapping.pin(offset: 1 * 4096, count: 1, access: .readOnly)
        #expect(single.frames == [zero])
        #expect(t.fs.statistics().pinnedPages == 0)
        single.release()
        let end = t.fs.statistics()
        #expect(end.pinsAcquired == after.pinsAcquired && end.pinsReleased == after.pinsReleased)
        #expect(try t.fs.check().isClean)
    }

    /// Page forking and page replacement must check for pins (Rik van Riel and Jan Kara, "[FYI]
    /// tux3: Core changes", linux-kernel, May 2015; Andrea Arcangeli, "[PATCH 2/4] Add
    /// replace_page()", linux-kernel, Nov 2008): a page with an extra reference is not frozen.
    @Test("a pinned page cannot be frozen for migration or copy-on-write")
    func pinnedPagesCannotBeFrozen() throws {
        let t = try TemporaryFileSystem(size: 4 << 20)
        let file = try t.fs.create("/f")
        try file.write(pattern(4096), at: 0)
        let mapping = try file.map(count: 4096)
        let frame = PageFrameNumber(rawValue: mapping.frame(at: 0)!)
        // Mapped once, not pinned: the expected count is the mapping's reference.
        #expect(t.fs.pages.freeze(frame, expectedRefCount: 1))
        expectDAXError(.busy) { _ = try mapping.pin(offset: 0, count: 1) }  // frozen: the pin waits, then backs off
        t.fs.pages.unfreeze(frame)
        let pin = try mapping.pin(offset: 0, count: 1)
        #expect(!t.fs.pages.freeze(frame, expectedRefCount: 2))  // an extra reference: refuse (EAGAIN)
        pin.release()
        mapping.unmap()
    }

    @Test("a truncate or punch that does not go ahead gives back the leaf blocks its plan took")
    func refusedPunchGivesBackPlannedLeafBlocks() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "punchleak")
        let f = try t.fs.create("/f")
        for i in 0..<8 { try f.write(pattern(3 * 4096), at: i * 4 * 4096) }
        #expect(f.inode.extents.extentCount == 8)  // inline and full: splitting one needs a leaf block
        let mapping = try f.map(offset: 0, count: 3 * 4096)
        let pin = try mapping.pin(offset: 4096, count: 4096)
        let before = t.fs.statistics().freeBlocks
        expectDAXError(.busy) { try f.punchHole(offset: 4096, count: 4096, ifBusy: .fail) }
        expectDAXError(.timedOut) {
            try f.punchHole(offset: 4096, count: 4096, ifBusy: .wait(timeout: .milliseconds(50)))
        }
        #expect(t.fs.statistics().freeBlocks == before)
        pin.release()
        mapping.unmap()
        #expect(try t.fs.check().isClean)
    }

    @Test("a truncate waiting for a pin does not hold up other files while unmount is asked for")
    func waitingTruncateDoesNotBlockUnmount() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "waitstall")
        let a = try t.fs.create("/a")
        try a.write(pattern(8 * 4096), at: 0)
        let b = try t.fs.create("/b")
        try b.write([1, 2, 3], at: 0)
        let mapping = try a.map(count: 8 * 4096)
        let pin = PinBox(try mapping.pin(offset: 4 * 4096, count: 4096))
        let frame = try #require(try a.frames(offset: 4 * 4096, count: 1)[0])
        let pages = t.fs.pages
        let truncated = DispatchSemaphore(value: 0)
        let truncateReturned = Flag()
        let truncateResult = Mutex<Bool>(false)
        Thread.detachNewThread {
            let done = (try? a.truncate(to: 4096, ifBusy: .wait(timeout: .seconds(20)))) != nil
            truncateResult.withTrackedLock { $0 = done }
            truncateReturned.raise()
            truncated.signal()
        }
        // The truncate sleeps on the pinned page, between its attempts.
        spinUntil { pages.hasSleeper(on: frame) }
        // The pin is held, so unmount must refuse at once rather than queue behind the wait. Had
        // it queued, it would return only after the truncate gave up, and the truncate failed.
        let unmountCode = Mutex<DAXError.Code?>(nil)
        let unmounted = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            do { try t.fs.unmount() } catch let error as DAXError {
                unmountCode.withTrackedLock { $0 = error.code }
            } catch {}
            unmounted.signal()
        }
        unmounted.wait()
        #expect(unmountCode.withTrackedLock { $0 } == .busy)
        #expect(try b.read(count: 3, at: 0) == [1, 2, 3])
        // Still waiting for the pin.
        #expect(!truncateReturned.isRaised)
        #expect(pages.hasSleeper(on: frame))
        pin.release()
        truncated.wait()
        #expect(truncateResult.withTrackedLock { $0 })
        #expect(a.size == 4096)
        mapping.unmap()
    }

    @Test("the counts balance as soon as a truncate woken by another thread's final unpin returns")
    func countsBalanceAfterWokenTruncate() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "wokenbalance")
        let engine = DMAEngine(device: t.device)
        let pages = t.fs.pages
        for round in 0..<1000 {
            let file = try t.fs.create("/f\(round)")
            try file.write(pattern(2 * 4096, seed: round), at: 0)
            let mapping = try file.map(count: 2 * 4096)
            let frames = try file.frames(offset: 0, count: 2 * 4096).map { try #require($0) }
            let region = engine.register(try mapping.pin(offset: 0, count: 2 * 4096))
            // Even rounds: the release races the truncate's first scan. Odd rounds: it comes once
            // the truncate sleeps, and wakes it. Both must see it counted.
            let afterSleep = round % 2 == 1
            if afterSleep {
                // A mark an earlier round's wait left on a reused block would say "asleep" too early.
                for frame in frames { pages.clearWaiterMark(frame) }
            }
            Thread.detachNewThread {
                if afterSleep { spinUntil { pages.hasSleeper(onAnyOf: frames) } }
                engine.deregister(region)
            }
            try file.truncate(to: 0, ifBusy: .wait(timeout: .seconds(10)))
            let s = t.fs.statistics()
            let state = t.fs.pages.state(of: frames[0])
            guard s.pinsAcquired - s.pinsReleased == 0, s.pinnedPages == 0, state.pinCount == 0 else {
                let counts = "acquired \(s.pinsAcquired), released \(s.pinsReleased), pinned pages \(s.pinnedPages)"
                Issue.record("round \(round): \(counts), pinCount \(state.pinCount)")
                return
            }
            mapping.unmap()
            file.close()
            try t.fs.remove("/f\(round)")
        }
    }
}
