import Foundation
import Synchronization
import Testing

@testable import DAX

@Suite("PageMap")
struct PageMapTests {
    /// A device whose first `allocated` pages are marked allocated, as a file system would.
    static func device(allocated: Int = 64) throws -> TemporaryDevice {
        let temporary = try TemporaryDevice(size: 4 << 20, name: "pages")
        for frame in 0..<UInt64(allocated) {
            #expect(temporary.device.pages.markAllocated(frame, inode: 7, index: frame))
        }
        return temporary
    }

    static func sumOfPinCounts(_ pages: PageMap) -> Int {
        (0..<pages.count).reduce(0) { $0 + pages.state(of: PageFrameNumber(rawValue: UInt64($1))).pinCount }
    }

    @Test("a descriptor is 16 bytes, measured three ways")
    func descriptorSize() throws {
        // The type's stride, the distance between two descriptors in the table, and the memory the
        // kernel backs after touching 4096 descriptors (or, where transparent huge pages may back
        // the table, as many as fill one huge page, starting at a huge-page boundary).
        #expect(PageMap.bytesPerDescriptor <= 16)
        let pages = try PageMap(pageCount: 1 << 20)
        let first = pages.table.descriptor(0)
        let second = pages.table.descriptor(1)
        #expect(UnsafeRawPointer(second) - UnsafeRawPointer(first) == PageMap.bytesPerDescriptor)
        #expect(pages.residentTableBytes == 0)
        let granule = Residency.granule(of: first)
        let start = Int(bitPattern: first)
        let boundary = (start + granule - 1) / granule * granule
        let firstTouched = UInt64((boundary - start) / 16)
        let touched = UInt64(max(4096, granule / 16))
        for frame in firstTouched..<(firstTouched + touched) {
            #expect(pages.markAllocated(frame, inode: 1, index: frame))
        }
        let resident = pages.residentTableBytes
        #expect(resident == Int(touched) * PageMap.bytesPerDescriptor, "granule \(granule)")
        // One descriptor more than the device's pages: the zero frame's.
        #expect(pages.reservedTableBytes == ((1 << 20) + 1) * PageMap.bytesPerDescriptor + 4096 - 16)
    }

    @Test("a 1 TiB device's table is reserved, not allocated")
    func sparseTable() throws {
        let pages = try PageMap(pageCount: (1 << 40) / PMemDevice.pageSize)
        #expect(pages.reservedTableBytes == (4 << 30) + 4096, "and a page for the zero frame's descriptor")
        #expect(pages.residentTableBytes == 0)
        let far = PageFrameNumber(rawValue: (1 << 28) - 1)
        #expect(pages.markAllocated(far.rawValue, inode: 3, index: 99))
        let state = pages.state(of: far)
        #expect(state.isAllocated && state.ownerInode == 3 && state.ownerPageIndex == 99)
        // Touching one descriptor backs its page, or the huge page holding it.
        let granule = Residency.granule(of: pages.table.descriptor(far.rawValue))
        #expect([Residency.pageSize, granule].contains(pages.residentTableBytes), "granule \(granule)")
    }

    @Test("pin raises refCount and pinCount; release drops them exactly once")
    func pinAndRelease() throws {
        let temporary = try Self.device()
        let pages = temporary.device.pages
        let frame = PageFrameNumber(rawValue: 10)
        do {
            let pin = try pages.pin(first: frame, count: 3)
            let frames = pin.frames
            #expect(frames == [10, 11, 12].map { PageFrameNumber(rawValue: $0) })
            #expect(
                pages.state(of: frame)
                    == PageState(
                        refCount: 1, pinCount: 1, mapCount: 0,
                        isAllocated: true, isQuarantined: false))
            #expect(pages.pinnedPageCount == 3)
            pin.release()
        }
        #expect(pages.state(of: frame).pinCount == 0)
        #expect(pages.state(of: frame).refCount == 0)
        do {
            // Going out of scope releases too.
            let pin = try pages.pin([PageFrameNumber(rawValue: 3), PageFrameNumber(rawValue: 5)])
            let count = pin.count
            #expect(count == 2)
            #expect(pages.state(of: PageFrameNumber(rawValue: 5)).pinCount == 1)
        }
        #expect(pages.state(of: PageFrameNumber(rawValue: 5)).pinCount == 0)
        #expect(pages.pinsAcquired == 5)
        #expect(pages.pinsReleased == 5)
        #expect(pages.pinnedPageCount == 0)
    }

    @Test("the state of a frame past the device is all zeros, not allocated: no trap")
    func stateOfFramePastDevice() throws {
        let temporary = try Self.device(allocated: 8)
        let pages = temporary.device.pages
        let none = PageState(refCount: 0, pinCount: 0, mapCount: 0, isAllocated: false, isQuarantined: false)
        for frame in [UInt64(pages.count) + 1, UInt64(pages.count) + 4096, UInt64.max] {
            #expect(pages.state(of: PageFrameNumber(rawValue: frame)) == none, "frame \(frame)")
        }
        // The last page and the zero frame have descriptors.
        #expect(pages.state(of: PageFrameNumber(rawValue: UInt64(pages.count - 1))) == none)
        #expect(pages.state(of: PageFrameNumber(rawValue: 6)).isAllocated)
    }

    @Test("pinning a free page fails and changes no count")
    func pinFreePage() throws {
        let temporary = try Self.device(allocated: 8)
        let pages = temporary.device.pages
        // Frames 6, 7 are allocated, 8 is not: the pin of 6..<9 must take back what it took.
        expectDAXError(.invalidArgument) { _ = try pages.pin(first: PageFrameNumber(rawValue: 6), count: 3) }
        for frame in 6..<9 { #expect(pages.state(of: PageFrameNumber(rawValue: UInt64(frame))).refCount == 0) }
        #expect(pages.pinsAcquired == 0)
        #expect(pages.pinnedPageCount == 0)
        expectDAXError(.invalidArgument) { _ = try pages.pin(first: PageFrameNumber(rawValue: 1020), count: 10) }
    }

    @Test("concurrent pins and unpins from 8 threads balance to zero")
    func concurrentPins() throws {
        let temporary = try Self.device(allocated: 16)
        let pages = temporary.device.pages
        let rounds = 20_000
        onThreads(8) { thread in
            for round in 0..<rounds {
                let first = PageFrameNumber(rawValue: UInt64((thread + round) % 14))
                let pin = try! pages.pin(first: first, count: 1 + round % 3)
                if round % 1000 == 0 {
                    // Mid-flight, the totals already count this thread's pin as outstanding.
                    let count = pin.count
                    let totals = pages.pinTotals
                    #expect(totals.acquired - totals.released >= count)
                }
                pin.release()
            }
        }
        let expected = 8 * (0..<rounds).reduce(0) { $0 + 1 + $1 % 3 }
        #expect(pages.pinsAcquired == expected)
        #expect(pages.pinsReleased == expected)
        #expect(pages.pinnedPageCount == 0)
        #expect(Self.sumOfPinCounts(pages) == 0)
        for frame in 0..<16 { #expect(pages.state(of: PageFrameNumber(rawValue: UInt64(frame))).refCount == 0) }
    }

    @Test("acquired minus released equals the sum of pin counts while pins are held")
    func countsBalanceWhileHeld() throws {
        let temporary = try Self.device(allocated: 32)
        let pages = temporary.device.pages
        let held = Mutex<Int>(0)
        onThreads(4) { thread in
            // Each thread keeps one pin of 4 pages alive while it pins and unpins others.
            let kept = try! pages.pin(first: PageFrameNumber(rawValue: UInt64(thread * 4)), count: 4)
            for round in 0..<5000 {
                let pin = try! pages.pin(first: PageFrameNumber(rawValue: UInt64(16 + round % 16)), count: 1)
                pin.release()
            }
            held.withTrackedLock { $0 += kept.count }
            // Threads exit holding nothing but `kept`, released here; their tallies fold into the totals.
            kept.release()
        }
        #expect(held.withTrackedLock { $0 } == 16)
        #expect(pages.pinsAcquired - pages.pinsReleased == Self.sumOfPinCounts(pages))
        let pin = try pages.pin(first: PageFrameNumber(rawValue: 0), count: 7)
        #expect(pages.pinsAcquired - pages.pinsReleased == 7)
        #expect(Self.sumOfPinCounts(pages) == 7)
        #expect(pages.pinnedPageCount == 7)
        pin.release()
        #expect(pages.pinsAcquired == 4 * 4 + 4 * 5000 + 7)
    }

    @Test("freeze fails while pinned or referenced; try-get and pin fail while frozen")
    func freeze() throws {
        let temporary = try Self.device()
        let pages = temporary.device.pages
        let frame = PageFrameNumber(rawValue: 20)
        do {
            let pin = try pages.pin(first: frame, count: 1)
            #expect(!pages.freeze(frame, expectedRefCount: 1))
            #expect(!pages.freeze(frame, expectedRefCount: 0))
            pin.release()
        }
        #expect(pages.tryGet(frame))
        #expect(!pages.freeze(frame, expectedRefCount: 0))  // an extra reference
        #expect(pages.freeze(frame, expectedRefCount: 1))
        #expect(!pages.tryGet(frame))
        #expect(pages.state(of: frame).isFrozen)
        expectDAXError(.busy) { _ = try pages.pin(first: frame, count: 1) }
        expectDAXError(.busy) { try pages.tryMap(frame) }
        #expect(pages.state(of: frame).refCount == 1)
        pages.unfreeze(frame)
        pages.put(frame)
        #expect(pages.tryGet(frame))
        pages.put(frame)
        #expect(
            pages.state(of: frame)
                == PageState(
                    refCount: 0, pinCount: 0, mapCount: 0,
                    isAllocated: true, isQuarantined: false))
        #expect(!pages.tryGet(PageFrameNumber(rawValue: 900)))  // not allocated
    }

    @Test("an idle wait sleeps through a release that leaves a pin, and wakes when the last pin goes")
    func idleWaitWakes() throws {
        let temporary = try Self.device()
        let pages = temporary.device.pages
        let frames = (30..<34).map { PageFrameNumber(rawValue: $0) }
        let holder = PinBox(try pages.pin(frames))
        let second = PinBox(try pages.pin(first: PageFrameNumber(rawValue: 32), count: 1))
        let wakeUpsBefore = pages.wakeUps
        let released = Flag()
        let wokenByLastRelease = Flag()
        let finished = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            // The waiter marks the first busy page, 30, before it sleeps.
            spinUntil { pages.hasSleeper(on: frames[0]) }
            second.release()  // page 32 keeps the holder's pin: no wake-up is due
            let wakeUps = pages.wakeUps
            released.raise()
            holder.release()
            if pages.wakeUps > wakeUps { wokenByLastRelease.raise() }
            finished.signal()
        }
        #expect(pages.waitUntilIdle(frames, timeout: .seconds(20)))
        #expect(released.isRaised, "returned before the last pin went")
        finished.wait()
        #expect(wokenByLastRelease.isRaised)
        #expect(pages.wakeUps > wakeUpsBefore)
        for frame in frames { #expect(pages.state(of: frame).pinCount == 0) }
    }

    @Test("an idle wait times out while a pin is held, having slept on the page")
    func idleWaitTimesOut() throws {
        let temporary = try Self.device()
        let pages = temporary.device.pages
        let frame = PageFrameNumber(rawValue: 40)
        let pin = try pages.pin(first: frame, count: 1)
        #expect(!pages.hasSleeper(on: frame))
        #expect(!pages.waitUntilIdle([frame], timeout: .milliseconds(200)))
        // It slept: it marked the page for a wake-up that never came, and the mark is still there.
        #expect(pages.hasSleeper(on: frame))
        #expect(pages.state(of: frame).pinCount == 1)
        let wakeUps = pages.wakeUps
        pin.release()
        #expect(!pages.hasSleeper(on: frame))  // the release found the mark and cleared it
        #expect(pages.wakeUps == wakeUps + 1)
        #expect(pages.waitUntilIdle([frame], timeout: .zero))
    }

    @Test("mappings count in refCount and mapCount, and an idle wait ignores them")
    func mappings() throws {
        let temporary = try Self.device()
        let pages = temporary.device.pages
        let frame = PageFrameNumber(rawValue: 41)
        try pages.tryMap(frame)
        try pages.tryMap(frame)
        #expect(
            pages.state(of: frame)
                == PageState(
                    refCount: 2, pinCount: 0, mapCount: 2,
                    isAllocated: true, isQuarantined: false))
        #expect(!pages.state(of: frame).isBusy)
        #expect(pages.waitUntilIdle([frame], timeout: .zero))
        let pin = try pages.pin(first: frame, count: 1)
        #expect(pages.state(of: frame).isBusy)
        pin.release()
        pages.unmap(frame)
        pages.unmap(frame)
        #expect(pages.state(of: frame).refCount == 0)
        expectDAXError(.invalidArgument) { try pages.tryMap(PageFrameNumber(rawValue: 1000)) }
    }

    @Test("the map count stops at its limit with an error, never wraps")
    func mapCountLimit() throws {
        let temporary = try Self.device()
        let pages = temporary.device.pages
        let frame = PageFrameNumber(rawValue: 42)
        for _ in 0..<Int(PageWord.mapLimit) { try pages.tryMap(frame) }
        expectDAXError(.busy) { try pages.tryMap(frame) }
        #expect(pages.state(of: frame).mapCount == Int(PageWord.mapLimit))
        for _ in 0..<Int(PageWord.mapLimit) { pages.unmap(frame) }
        #expect(pages.state(of: frame).refCount == 0)
    }

    @Test("a page freed while pinned is quarantined and released by its final unpin")
    func quarantine() throws {
        let temporary = try Self.device()
        let pages = temporary.device.pages
        let released = Mutex<[PageFrameNumber]>([])
        pages.setQuarantineRelease { frame in released.withTrackedLock { $0.append(frame) } }
        let frame = PageFrameNumber(rawValue: 50)
        let first = try pages.pin(first: frame, count: 1)
        let second = try pages.pin(first: frame, count: 1)
        #expect(!pages.markFree(frame.rawValue))
        #expect(
            pages.state(of: frame)
                == PageState(
                    refCount: 2, pinCount: 2, mapCount: 0,
                    isAllocated: false, isQuarantined: true))
        // A quarantined page cannot be allocated, pinned or referenced again.
        #expect(!pages.markAllocated(frame.rawValue, inode: 1, index: 0))
        #expect(!pages.tryGet(frame))
        first.release()
        #expect(released.withTrackedLock { $0 }.isEmpty)
        second.release()
        #expect(released.withTrackedLock { $0 } == [frame])
        #expect(
            pages.state(of: frame)
                == PageState(
                    refCount: 0, pinCount: 0, mapCount: 0,
                    isAllocated: false, isQuarantined: false))
        #expect(pages.markAllocated(frame.rawValue, inode: 2, index: 0))
        // An idle page is freed at once.
        #expect(pages.markFree(frame.rawValue))
        #expect(released.withTrackedLock { $0 }.count == 1)
    }

    @Test("a long-term pin's lease: asked, then revoked; the holder's release changes nothing")
    func leaseRevocation() throws {
        let temporary = try Self.device()
        let pages = temporary.device.pages
        let asked = Atomic(0)
        let pin = try pages.pin(
            first: PageFrameNumber(rawValue: 60), count: 2,
            lifetime: .longTerm(onRevoke: { asked.wrappingAdd(1, ordering: .relaxed) }))
        let (longTerm, revokedAtFirst) = (pin.isLongTerm, pin.isRevoked)
        #expect(longTerm && !revokedAtFirst)
        let leases = pages.leases { $0 == 61 }
        #expect(leases.count == 1)
        #expect(pages.leases { $0 == 62 }.isEmpty)
        leases[0].requestRelease()
        leases[0].requestRelease()
        #expect(asked.load(ordering: .relaxed) == 1)
        #expect(leases[0].revoke())
        let revoked = pin.isRevoked
        #expect(revoked)
        #expect(pages.state(of: PageFrameNumber(rawValue: 60)).pinCount == 0)
        #expect(pages.pinsReleased == 2)
        let refused = Result { try leases[0].withAccess { 1 } }
        #expect(throws: DAXError.self) { try refused.get() }
        pin.release()
        #expect(pages.pinsReleased == 2)
        #expect(pages.pinsAcquired == 2)
        #expect(pages.state(of: PageFrameNumber(rawValue: 61)).refCount == 0)
        #expect(pages.leases { _ in true }.isEmpty)
    }

    @Test("the quarantine hook costs the same on its 200,000th call as on its first")
    func quarantineHookDoesNotGrow() throws {
        // A closure kept bare in a Mutex was re-wrapped on every access; 200,000 releases then
        // ran 200,000 nested thunks and overflowed the stack.
        let temporary = try Self.device()
        let pages = temporary.device.pages
        let released = Counter()
        pages.setQuarantineRelease { _ in released.increment() }
        let frame = PageFrameNumber(rawValue: 5)
        for _ in 0..<200_000 {
            let pin = try pages.pin(first: frame, count: 1)
            #expect(!pages.markFree(frame.rawValue))
            pin.release()
            #expect(pages.markAllocated(frame.rawValue, inode: 1, index: 0))
        }
        #expect(released.value == 200_000)
    }
}
