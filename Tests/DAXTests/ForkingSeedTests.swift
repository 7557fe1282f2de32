import DAXTorture
import Foundation
import Synchronization
import Testing

@testable import DAX

// The seed stories of forking, one test each: a device holding a page by frame while the file
// system clones, copies on write, migrates or merges it. Written from the public contract and
// docs/forking.md only; the helpers are in ForkingTests.swift.

@Suite("Forking: the seed stories")
struct ForkingSeedTests {
    /// Jan Kara and OGAWA Hirofumi ("Tux3 page forking", linux-fsdevel, 2015), John Hubbard ("RFC:
    /// get_user_pages() and dirty pages", linux-mm, 2018): a snapshot taken while a NIC holds pages
    /// of the file by frame. Sharing those pages lets the NIC's later writes change the snapshot.
    /// With `unmapped`, the mapping the pin came through is gone before the clone: the pin
    /// outlives it, and a clone of a file no mapping shows looks at the counts without freezing.
    @Test(
        "an RDMA NIC keeps writing by frame after a clone of its file",
        arguments: ClonePolicyCase.allCases, [false, true])
    func nicWritesAfterClone(policy: ClonePolicyCase, unmapped: Bool) throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "clonenic")
        let fs = t.fs
        let source = try fs.create("/rdma-buffer")
        let data = pattern(8 * pageBytes, seed: 5)
        try source.write(data, at: 0)
        let mapping = try source.map(count: data.count)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(
            try mapping.pin(offset: 4 * pageBytes, count: 4 * pageBytes, lifetime: .longTerm(onRevoke: {})))
        let before = try source.frames(pages: 8).map { try #require($0) }
        #expect(region.frames == Array(before[4...]))
        if unmapped { mapping.unmap() }
        let freeBefore = fs.statistics().freeBlocks

        var thrown: DAXError.Code?
        do {
            try fs.clone("/rdma-buffer", to: "/snapshot", ifPinned: policy.policy)
        } catch let error as DAXError {
            thrown = error.code
        }
        let nicBytes = [UInt8](repeating: 0xEE, count: 4 * pageBytes)
        let withNIC = replacing(data, at: 4 * pageBytes, with: nicBytes)
        switch policy {
        case .fail, .wait:
            // Nothing was created, nothing is shared, the NIC's pages are the source's.
            #expect(thrown == (policy == .fail ? .busy : .timedOut))
            #expect(try fs.contentsOfDirectory("/") == ["rdma-buffer"])
            expectDAXError(.notFound) { try fs.open("/snapshot") }
            #expect(fs.statistics().freeBlocks == freeBefore)
            #expect(fs.statistics().sharedBlocks == 0)
            #expect(try source.frames(pages: 8) == before)
            #expect(try source.references(pages: 8) == [1, 1, 1, 1, 1, 1, 1, 1])
            try nic.write(nicBytes, to: region, at: 0)
            #expect(try source.contents() == withNIC)
        case .copy:
            #expect(thrown == nil)
            let clone = try fs.open("/snapshot")
            #expect(clone.size == data.count)
            #expect(try clone.contents() == data)
            let cloneFrames = try clone.frames(pages: 8)
            // The pinned frames stay with the source; the clone got copies of those pages and
            // shares the others.
            #expect(try source.frames(pages: 8) == before)
            #expect(Array(cloneFrames[..<4]) == Array(before[..<4]))
            #expect(cloneFrames[4...].allSatisfy { $0 != nil }, "\(cloneFrames)")
            #expect(Set(cloneFrames[4...].compactMap { $0 }).isDisjoint(with: before), "\(cloneFrames)")
            #expect(try source.references(pages: 8) == [2, 2, 2, 2, 1, 1, 1, 1])
            #expect(try clone.references(pages: 8) == [2, 2, 2, 2, 1, 1, 1, 1])
            #expect(fs.statistics().sharedBlocks == 4)
            let used = freeBefore - fs.statistics().freeBlocks
            #expect(used >= 4 && used <= 6, "the clone used \(used) blocks for 4 copied pages")
            // The NIC writes into the source only; the clone has the bytes of clone time.
            try nic.write(nicBytes, to: region, at: 0)
            #expect(try source.contents() == withNIC)
            #expect(try clone.contents() == data, "the NIC's writes leaked into the clone")
            #expect(try clone.frames(pages: 8) == cloneFrames)
        case .unsafeShare:
            #expect(thrown == nil)
            let clone = try fs.open("/snapshot")
            #expect(try clone.contents() == data)
            #expect(try clone.frames(pages: 8) == before)
            #expect(try clone.references(pages: 8) == [2, 2, 2, 2, 2, 2, 2, 2])
            #expect(fs.statistics().sharedBlocks == 8)
            // The bug of the seed thread, shown: the NIC writes by frame into the snapshot too.
            try nic.write(nicBytes, to: region, at: 0)
            #expect(try source.contents() == withNIC)
            #expect(try clone.contents() == withNIC, "with .unsafeShare the NIC's writes show in the snapshot")
        }
        nic.deregister(region)
        mapping.unmap()
        let statistics = fs.statistics()
        #expect(statistics.pinnedPages == 0)
        #expect(statistics.pinsAcquired == 4 && statistics.pinsReleased == 4)
        #expect(statistics.quarantinedBlocks == 0)
        let report = try fs.check()
        #expect(report.isClean, "\(report)")
    }

    @Test("a clone under .wait is woken by the final unpin and then shares every page")
    func cloneWaitsForUnpin() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "clonewait")
        let fs = t.fs
        let source = try fs.create("/src")
        let data = pattern(4 * pageBytes, seed: 6)
        try source.write(data, at: 0)
        let mapping = try source.map(count: data.count)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(try mapping.pin(offset: pageBytes, count: pageBytes))
        let nicBytes = [UInt8](repeating: 0x3C, count: 100)
        try nic.write(nicBytes, to: region, at: 0)
        let pinned = region.frames
        let returned = Flag()
        let result = Mutex<DAXError.Code??>(nil)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            do {
                try fs.clone("/src", to: "/dst", ifPinned: .wait(timeout: .seconds(20)))
                result.withTrackedLock { $0 = .some(nil) }
            } catch let error as DAXError {
                result.withTrackedLock { $0 = .some(error.code) }
            } catch {}
            returned.raise()
            done.signal()
        }
        let pages = fs.pages
        spinUntil("the clone to sleep on the pinned page") { pages.hasSleeper(onAnyOf: pinned) || returned.isRaised }
        #expect(
            !returned.isRaised,
            "the clone returned while the page was pinned: \(String(describing: result.withTrackedLock { $0 }))")
        nic.deregister(region)
        done.wait()
        #expect(result.withTrackedLock { $0 } == .some(nil))
        let clone = try fs.open("/dst")
        let expected = replacing(data, at: pageBytes, with: nicBytes)
        #expect(try clone.contents() == expected)
        #expect(try clone.frames(pages: 4) == source.frames(pages: 4))
        #expect(fs.statistics().sharedBlocks == 4)
        mapping.unmap()
        #expect(try fs.check().isClean)
    }

    /// A store through a mapping of the clone while the NIC holds the source's copy of the page:
    /// the clone's page is its own, the shared pages copy on write, and neither file ever shows
    /// the other's changes.
    @Test("a store to a cloned page through a mapping while the NIC holds the source's page")
    func storeToClonedPageWhileNICHoldsSource() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "clonestore")
        let fs = t.fs
        let source = try fs.create("/src")
        let data = pattern(4 * pageBytes, seed: 7)
        try source.write(data, at: 0)
        let sourceMapping = try source.map(count: data.count)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(
            try sourceMapping.pin(offset: pageBytes, count: pageBytes, lifetime: .longTerm(onRevoke: {})))
        let pinned = region.frames[0]
        try fs.clone("/src", to: "/dst")
        let clone = try fs.open("/dst")
        let sourceFrames = try source.frames(pages: 4)
        let cloneFrames = try clone.frames(pages: 4)
        #expect(sourceFrames[1] == pinned)
        #expect(cloneFrames[1] != nil && cloneFrames[1] != pinned)
        #expect(
            [cloneFrames[0], cloneFrames[2], cloneFrames[3]] == [sourceFrames[0], sourceFrames[2], sourceFrames[3]])

        let copies = fs.statistics().faults.copyOnWrite
        let cloneMapping = try clone.map(count: data.count)
        let nicBytes = [UInt8](repeating: 0xEE, count: pageBytes)
        try nic.write(nicBytes, to: region, at: 0)
        let onClonedPage = [UInt8](repeating: 0xC1, count: 16)
        let onSharedPage = [UInt8](repeating: 0xC0, count: 16)
        cloneMapping.store(onClonedPage, at: pageBytes + 100)
        cloneMapping.store(onSharedPage, at: 100)
        var expectedClone = replacing(
            replacing(data, at: pageBytes + 100, with: onClonedPage), at: 100, with: onSharedPage)
        var expectedSource = replacing(data, at: pageBytes, with: nicBytes)
        #expect(try clone.contents() == expectedClone)
        #expect(try source.contents() == expectedSource)
        #expect(cloneMapping.loaded(count: data.count) == expectedClone)
        #expect(sourceMapping.loaded(count: data.count) == expectedSource)
        #expect(try nic.read(count: pageBytes, from: region, at: 0) == nicBytes)
        if fs.faultHandling == .userfaultfd {
            // Only the shared page was copied; the clone's own copy of the pinned page was not.
            #expect(fs.statistics().faults.copyOnWrite - copies == 1)
        }
        let cloneAfter = try clone.frames(pages: 4)
        #expect(cloneAfter[0] != nil && cloneAfter[0] != sourceFrames[0])
        #expect(cloneAfter[1] == cloneFrames[1])
        #expect(Array(cloneAfter[2...]) == Array(sourceFrames[2...]))
        #expect(try source.frames(pages: 4) == sourceFrames, "the source's frames changed")
        #expect(sourceMapping.frame(at: 1) == pinned.rawValue)
        #expect(try source.references(pages: 4) == [1, 1, 2, 2])
        #expect(fs.statistics().sharedBlocks == 2)

        // And the other way: a store through the source's mapping into a shared page.
        let onSourcePage = [UInt8](repeating: 0x5A, count: 32)
        sourceMapping.store(onSourcePage, at: 2 * pageBytes + 7)
        expectedSource = replacing(expectedSource, at: 2 * pageBytes + 7, with: onSourcePage)
        #expect(try source.contents() == expectedSource)
        #expect(try clone.contents() == expectedClone)
        #expect(cloneMapping.loaded(count: data.count) == expectedClone)
        if fs.faultHandling == .userfaultfd {
            #expect(fs.statistics().faults.copyOnWrite - copies == 2)
        }
        #expect(try clone.frames(pages: 4)[2] == sourceFrames[2], "the clone's page moved, not the writer's")
        #expect(try source.frames(pages: 4)[2] != sourceFrames[2])
        #expect(fs.statistics().sharedBlocks == 1)
        expectedClone = try clone.contents()

        nic.deregister(region)
        sourceMapping.unmap()
        cloneMapping.unmap()
        #expect(try clone.contents() == expectedClone)
        let statistics = fs.statistics()
        #expect(statistics.pinnedPages == 0 && statistics.pinsAcquired == statistics.pinsReleased)
        #expect(try fs.check().isClean)
    }

    /// Seed 001: do not fork a page while its count is raised by a device reading it; wait.
    @Test(
        "page forking while a short-term read pin is held: the store completes only after the unpin",
        arguments: Side.allCases)
    func pageForkingWaitsForReadPin(storeInto side: Side) throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "forkwait")
        let fs = t.fs
        let source = try fs.create("/src")
        let data = pattern(2 * pageBytes, seed: 8)
        try source.write(data, at: 0)
        try fs.clone("/src", to: "/dst")
        let clone = try fs.open("/dst")
        let shared = try #require(try source.frames(pages: 1)[0])
        #expect(try clone.frames(pages: 1)[0] == shared)
        let sourceMapping = try source.map(count: data.count)
        let cloneMapping = try clone.map(count: data.count)
        // A DMA read in flight from the shared page (an O_DIRECT write out of it): it stays shared.
        let readPin = try sourceMapping.pin(offset: 0, count: pageBytes, access: .readOnly)
        #expect(readPin.frames == [shared])
        #expect(try source.references(pages: 1) == [2])
        let nic = DMAEngine(device: t.device)
        let region = nic.register(readPin)
        let copies = fs.statistics().faults.copyOnWrite

        let (writer, other, target) = side == .source ? (source, clone, sourceMapping) : (clone, source, cloneMapping)
        let address = UInt(bitPattern: target.baseAddress)
        let stored = Flag()
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            UnsafeMutableRawPointer(bitPattern: address)!.storeBytes(of: 0xAB, toByteOffset: 10, as: UInt8.self)
            stored.raise()
            done.signal()
        }
        let pages = fs.pages
        spinUntil("the store to sleep on the pinned page") { pages.hasSleeper(on: shared) || stored.isRaised }
        #expect(!stored.isRaised, "the store to a shared page completed while a DMA read held it")
        #expect(
            try nic.read(count: pageBytes, from: region, at: 0) == Array(data[..<pageBytes]),
            "the DMA read saw new bytes")
        #expect(try t.device.read(count: pageBytes, at: shared.deviceOffset) == Array(data[..<pageBytes]))
        nic.deregister(region)
        guard done.wait(timeout: .now() + 30) == .success else {
            Issue.record("the store did not complete after the unpin")
            return
        }

        let expected = replacing(data, at: 10, with: [0xAB])
        #expect(try writer.contents() == expected)
        #expect(try other.contents() == data)
        #expect(try writer.frames(pages: 1)[0] != shared)
        #expect(try other.frames(pages: 1)[0] == shared)
        #expect(try t.device.read(count: pageBytes, at: shared.deviceOffset) == Array(data[..<pageBytes]))
        if fs.faultHandling == .userfaultfd {
            #expect(fs.statistics().faults.copyOnWrite - copies == 1)
        }
        #expect(try writer.references(pages: 2) == [1, 2])
        #expect(fs.statistics().sharedBlocks == 1)
        sourceMapping.unmap()
        cloneMapping.unmap()
        #expect(fs.statistics().pinnedPages == 0)
        #expect(try fs.check().isClean)
    }

    /// Seed 003 and Andrea Arcangeli's `replace_page`: migration acts only on a page whose count
    /// its mappings explain; a pinned page stays, mapped, and is reported.
    @Test("migration moves every page but a pinned one, which stays mapped and keeps the NIC's writes")
    func migrationSkipsPinnedPage() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "migratepin")
        let fs = t.fs
        let file = try fs.create("/f")
        let data = pattern(8 * pageBytes, seed: 9)
        try file.write(data, at: 0)
        let mapping = try file.map(count: data.count)
        #expect(mapping.loaded(count: data.count) == data)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(try mapping.pin(offset: 3 * pageBytes, count: pageBytes))
        let before = try file.frames(pages: 8).map { try #require($0) }
        let freeBefore = fs.statistics().freeBlocks

        let result = try file.migrate(offset: 0, count: data.count)
        #expect(result == MigrationResult(migrated: 7, busy: [3]))
        let after = try file.frames(pages: 8)
        #expect(after[3] == before[3])
        for index in 0..<8 where index != 3 {
            #expect(
                after[index] != nil && !before.contains(after[index]!),
                "page \(index): \(String(describing: after[index]))")
        }
        #expect(try file.contents() == data)
        #expect(mapping.loaded(count: data.count) == data)
        #expect(mapping.frame(at: 3) == before[3].rawValue)
        let pinnedState = fs.pages.state(of: before[3])
        #expect(pinnedState.pinCount == 1 && pinnedState.mapCount == 1 && pinnedState.isAllocated)
        for index in 0..<8 where index != 3 {
            #expect(mapping.frame(at: index) == nil || mapping.frame(at: index) == after[index]?.rawValue)
            let old = fs.pages.state(of: before[index])
            #expect(!old.isAllocated && old.mapCount == 0 && old.pinCount == 0, "old frame of page \(index): \(old)")
        }
        #expect(fs.statistics().freeBlocks == freeBefore)

        // The NIC's write after the migration reaches the file; a store reaches the new frame.
        let nicBytes = [UInt8](repeating: 0xEE, count: pageBytes)
        try nic.write(nicBytes, to: region, at: 0)
        mapping.store([0x42], at: 5 * pageBytes)
        var expected = replacing(data, at: 3 * pageBytes, with: nicBytes)
        expected[5 * pageBytes] = 0x42
        #expect(try file.contents() == expected)
        #expect(try t.device.read(count: 1, at: try #require(after[5]).deviceOffset) == [0x42])
        nic.deregister(region)

        // Unpinned, it moves too.
        let again = try file.migrate(offset: 3 * pageBytes, count: pageBytes)
        #expect(again == MigrationResult(migrated: 1, busy: []))
        #expect(try file.frames(pages: 8)[3] != before[3])
        #expect(try file.contents() == expected)
        mapping.unmap()
        let statistics = fs.statistics()
        #expect(statistics.pinnedPages == 0 && statistics.pinsAcquired == 1 && statistics.pinsReleased == 1)
        #expect(try fs.check().isClean)
    }

    @Test("dedup leaves a pinned page alone and does not count it", arguments: Side.allCases)
    func dedupSkipsPinnedPage(pinnedSide: Side) throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "deduppin")
        let fs = t.fs
        let data = pattern(4 * pageBytes, seed: 10)
        let source = try fs.create("/a")
        try source.write(data, at: 0)
        let destination = try fs.create("/b")
        try destination.write(data, at: 0)
        let pinnedFile = pinnedSide == .source ? source : destination
        let mapping = try pinnedFile.map(count: data.count)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(try mapping.pin(offset: 2 * pageBytes, count: pageBytes))
        let sourceBefore = try source.frames(pages: 4)
        let destinationBefore = try destination.frames(pages: 4)
        let freeBefore = fs.statistics().freeBlocks

        let shared = try fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: data.count)
        #expect(shared == 3 * pageBytes)
        let destinationAfter = try destination.frames(pages: 4)
        #expect(try source.frames(pages: 4) == sourceBefore)
        #expect(destinationAfter[2] == destinationBefore[2])
        for index in [0, 1, 3] { #expect(destinationAfter[index] == sourceBefore[index]) }
        #expect(try destination.references(pages: 4) == [2, 2, 1, 2])
        #expect(try source.references(pages: 4) == [2, 2, 1, 2])
        #expect(fs.statistics().sharedBlocks == 3)
        #expect(fs.statistics().freeBlocks == freeBefore + 3)
        #expect(try source.contents() == data && destination.contents() == data)

        let nicBytes = [UInt8](repeating: 0xEE, count: pageBytes)
        try nic.write(nicBytes, to: region, at: 0)
        #expect(try pinnedFile.contents() == replacing(data, at: 2 * pageBytes, with: nicBytes))
        #expect(try (pinnedSide == .source ? destination : source).contents() == data)
        nic.deregister(region)
        mapping.unmap()
        #expect(fs.statistics().pinnedPages == 0)
        #expect(try fs.check().isClean)
    }
}
