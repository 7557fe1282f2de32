import Foundation
import Synchronization
import Testing

@testable import DAX

/// System calls whose `mmap` stores one byte into what it just mapped, where a test asks for it: a
/// store in the moment between the mmap and the handler's registration, which another thread's
/// store hits only now and then. Each test has its own, so that tests running side by side (on
/// devices laid out alike) never take each other's store.
final class StoreAfterMap: Sendable {
    /// The device offset at whose next writable `mmap` 0xAB goes to byte 100; -1 when none.
    let deviceOffset = Atomic(-1)
    /// The address at whose next anonymous writable `mmap` (a placeholder) 0x5A goes to byte 10;
    /// 0 when none.
    let placeholder = Atomic<UInt>(0)

    var calls: SystemCalls {
        var calls = SystemCalls.injectable
        calls.mmap = { [self] address, length, protection, flags, fd, offset in
            let mapped = SystemCalls.live.mmap(address, length, protection, flags, fd, offset)
            guard let mapped, flags & MAP_FIXED != 0, protection & PROT_WRITE != 0 else { return mapped }
            if fd >= 0, deviceOffset.compareExchange(expected: offset, desired: -1, ordering: .relaxed).exchanged {
                mapped.storeBytes(of: 0xAB, toByteOffset: 100, as: UInt8.self)
            }
            if flags & MAP_ANONYMOUS != 0,
                placeholder.compareExchange(expected: UInt(bitPattern: mapped), desired: 0, ordering: .relaxed)
                    .exchanged
            {
                mapped.storeBytes(of: 0x5A, toByteOffset: 10, as: UInt8.self)
            }
            return mapped
        }
        return calls
    }
}

@Suite("sync, migrate, and the fault handler's claim")
struct SyncAndContractTests {
    @Test("sync makes stores through a mapping survive a power failure; before it they are lost")
    func syncPersistsMappedStores() throws {
        let emulated = try EmulatedDevice(size: 8 << 20)
        let fs = try DAXFileSystem.format(emulated.device)
        let file = try fs.create("/f")
        try file.allocate(offset: 0, count: 3 * 4096)
        let frames = try file.frames(offset: 0, count: 3 * 4096).map { $0! }
        let mapping = try file.map(count: 3 * 4096)
        for page in 0..<3 {
            mapping.baseAddress.storeBytes(
                of: 0xA0A0_0000 + UInt64(page), toByteOffset: page * 4096 + 64, as: UInt64.self)
        }
        let before = try emulated.image(.none)
        for frame in frames { #expect(load(before, at: frame.deviceOffset + 64) == 0) }
        before.close()
        try file.sync()
        let after = try emulated.image(.none)
        defer { after.close() }
        for (page, frame) in frames.enumerated() {
            #expect(load(after, at: frame.deviceOffset + 64) == 0xA0A0_0000 + UInt64(page))
        }
        #expect(emulated.device.unpersistedRanges().isEmpty)
        file.close()
        expectDAXError(.invalidArgument) { try file.sync() }
        mapping.unmap()
        try fs.unmount()
    }

    @Test("a clone makes the source's stores durable first, also those of a mapping already unmapped")
    func cloneWritesBackUnmappedStores() throws {
        let emulated = try EmulatedDevice(size: 8 << 20)
        let fs = try DAXFileSystem.format(emulated.device)
        defer { try? fs.unmount() }
        let file = try fs.create("/f")
        try file.allocate(offset: 0, count: 2 * 4096)
        let frames = try file.frames(offset: 0, count: 2 * 4096).map { $0! }
        let mapping = try file.map(count: 2 * 4096)
        for page in 0..<2 {
            mapping.baseAddress.storeBytes(of: 0xC10E_0000 + UInt64(page), toByteOffset: page * 4096, as: UInt64.self)
        }
        mapping.unmap()  // no sync: the stores are not durable yet, and no mapping shows the file
        let before = try emulated.image(.none)
        for frame in frames { #expect(load(before, at: frame.deviceOffset) == 0) }
        before.close()
        try fs.clone("/f", to: "/g")
        // The clone shares the blocks: what /g shows must survive a power failure, as xfs writes
        // the source's dirty range back before FICLONE shares it.
        let after = try emulated.image(.none)
        defer { after.close() }
        let clone = try fs.open("/g")
        #expect(try clone.frames(offset: 0, count: 2 * 4096).map { $0! } == frames)
        for (page, frame) in frames.enumerated() {
            #expect(load(after, at: frame.deviceOffset) == 0xC10E_0000 + UInt64(page))
        }
        clone.close()
        file.close()
    }

    @Test("the fault handler is claimed and says its mode")
    func faultHandlingClaimed() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "claimed")
        #expect(t.fs.faultHandling == .userfaultfd)
        #expect(t.fs.faultHandlingDetail.contains("full mode"), "root here: \(t.fs.faultHandlingDetail)")
    }

    @Test("stores through a mapping while its file migrates are never lost: each lands in the block the file then has")
    func storesRacingMigration() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "migrace")
        // Without the handler a page being moved faults with SIGBUS: the storer would die.
        try #require(t.fs.faultHandling == .userfaultfd, "stores racing a migration need the fault handler")
        let pages = 32
        let file = try t.fs.create("/f")
        try file.allocate(offset: 0, count: pages * 4096)
        let mapping = try file.map(count: pages * 4096)
        defer { mapping.unmap() }
        // One thread stores a rising counter into one word of each page in turn, and keeps what it
        // stored last; the test migrates the whole file meanwhile, then tells it to stop.
        let stop = Atomic(false)
        let stored = Mutex([UInt64](repeating: 0, count: pages))
        let done = DispatchSemaphore(value: 0)
        let base = UInt(bitPattern: mapping.baseAddress)
        Thread.detachNewThread {
            var value: UInt64 = 0
            var last = [UInt64](repeating: 0, count: pages)
            while !stop.load(ordering: .relaxed) {
                value += 1
                let page = Int(value % UInt64(pages))
                UnsafeMutableRawPointer(bitPattern: base)!.storeBytes(
                    of: value, toByteOffset: page * 4096 + 64, as: UInt64.self)
                last[page] = value
            }
            stored.withTrackedLock { $0 = last }
            done.signal()
        }
        var migrated = 0
        for _ in 0..<200 { migrated += try file.migrate(offset: 0, count: pages * 4096).migrated }
        stop.store(true, ordering: .relaxed)
        done.wait()
        #expect(migrated == 200 * pages, "nothing pins the file")
        let last = stored.withTrackedLock { $0 }
        for page in 0..<pages {
            let inFile = try file.read(count: 8, at: page * 4096 + 64).withUnsafeBytes { $0.load(as: UInt64.self) }
            #expect(inFile == last[page], "page \(page): the file has \(inFile), the last store was \(last[page])")
            #expect(mapping.baseAddress.load(fromByteOffset: page * 4096 + 64, as: UInt64.self) == last[page])
        }
        #expect(try t.fs.check().isClean)
    }

    @Test(
        "a store through either file's mapping during a dedup is never lost nor shared: dedup compares only once stores wait",
        arguments: [false, true])
    func storesRacingDedup(intoSource: Bool) throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "deduprace")
        try #require(t.fs.faultHandling == .userfaultfd, "stores racing a dedup need the fault handler")
        let bytes = pattern(4096, seed: 3)
        let source = try t.fs.create("/s")
        let destination = try t.fs.create("/d")
        try source.write(bytes, at: 0)
        let sourceMapping = try source.map(count: 4096)
        let destinationMapping = try destination.map(count: 4096)
        defer {
            sourceMapping.unmap()
            destinationMapping.unmap()
        }
        let target = UInt(bitPattern: (intoSource ? sourceMapping : destinationMapping).baseAddress)
        let go = DispatchSemaphore(value: 0)
        let stored = DispatchSemaphore(value: 0)
        let stop = Atomic(false)
        Thread.detachNewThread {
            while true {
                go.wait()
                if stop.load(ordering: .relaxed) { break }
                UnsafeMutableRawPointer(bitPattern: target)!.storeBytes(of: 0xAB, toByteOffset: 100, as: UInt8.self)
                stored.signal()
            }
            stored.signal()
        }
        defer {
            stop.store(true, ordering: .relaxed)
            go.signal()
            stored.wait()
        }
        var changed = bytes
        changed[100] = 0xAB
        var sharedRounds = 0
        for round in 0..<300 {
            // Both files hold `bytes` in blocks of their own, and one store races the dedup.
            try source.write(bytes, at: 0)
            try destination.write(bytes, at: 0)
            go.signal()
            sharedRounds += try t.fs.deduplicate("/s", offset: 0, "/d", offset: 0, count: 4096)
            stored.wait()
            let (wrote, other) = intoSource ? (source, destination) : (destination, source)
            let seen = (try wrote.read(count: 4096, at: 0), try other.read(count: 4096, at: 0))
            #expect(seen.0 == changed, "round \(round): the store was lost")
            #expect(seen.1 == bytes, "round \(round): the store reached the other file")
            if seen.0 != changed { break }
        }
        #expect(try t.fs.check().isClean)
        _ = sharedRounds  // how often the store came late enough to let the pages share: timing
    }

    @Test(
        "a store in the moment between the mmap that shows a dedup's shared block and its write protection stays in its own file",
        arguments: [true, false])
    func storeBeforeSharedPageIsProtected(pageTableReadable: Bool) throws {
        // The store comes from the mmap itself, right after the kernel made the new mapping and
        // before the handler could register it: the moment another thread's store hits one time
        // in a few hundred in storesRacingDedup.
        let storer = StoreAfterMap()
        var calls = storer.calls
        if !pageTableReadable {
            // The page table is read at the page's index; the device reads only at offset 0.
            calls.pread = { fd, buffer, offset in
                guard offset == 0 else {
                    errno = EACCES
                    return -1
                }
                return SystemCalls.live.pread(fd, buffer, offset)
            }
        }
        var options = PMemDevice.Options()
        options.systemCalls = calls
        let t = try TemporaryFileSystem(size: 16 << 20, name: "dedupwindow", deviceOptions: options)
        try #require(t.fs.faultHandling == .userfaultfd, "a store that faults needs the fault handler")
        let bytes = pattern(4096, seed: 5)
        let source = try t.fs.create("/s")
        let destination = try t.fs.create("/d")
        try source.write(bytes, at: 0)
        try destination.write(bytes, at: 0)
        let mapping = try destination.map(count: 4096)
        defer { mapping.unmap() }
        let sourceBlock = try #require(try source.frames(offset: 0, count: 4096).first ?? nil)
        storer.deviceOffset.store(Int(sourceBlock.rawValue) * 4096, ordering: .relaxed)

        #expect(try t.fs.deduplicate("/s", offset: 0, "/d", offset: 0, count: 4096) == 4096)
        #expect(
            storer.deviceOffset.load(ordering: .relaxed) == -1, "the destination's mapping showed the source's block")
        var changed = bytes
        changed[100] = 0xAB
        #expect(try source.read(count: 4096, at: 0) == bytes, "the store reached the block the source shares")
        #expect(try destination.read(count: 4096, at: 0) == changed, "the store was lost")
        #expect(mapping.baseAddress.load(fromByteOffset: 100, as: UInt8.self) == 0xAB)
        // The store made the destination's page its own again, and the mapping shows that block.
        let frame = try #require(try destination.frames(offset: 0, count: 4096).first ?? nil)
        #expect(frame != sourceBlock)
        #expect(t.fs.statistics().sharedBlocks == 0)
        mapping.baseAddress.storeBytes(of: 0xCD, toByteOffset: 200, as: UInt8.self)
        changed[200] = 0xCD
        #expect(try destination.read(count: 4096, at: 0) == changed)
        #expect(try source.read(count: 4096, at: 0) == bytes)
        #expect(try t.fs.check().isClean)
    }

    @Test("a store in the moment before a punched page's placeholder is registered fills the hole, as a fault would")
    func storeBeforePlaceholderIsRegistered() throws {
        let storer = StoreAfterMap()
        var options = PMemDevice.Options()
        options.systemCalls = storer.calls
        let t = try TemporaryFileSystem(size: 16 << 20, name: "punchwindow", deviceOptions: options)
        try #require(t.fs.faultHandling == .userfaultfd, "a store that faults needs the fault handler")
        let file = try t.fs.create("/f")
        try file.write(pattern(3 * 4096, seed: 7), at: 0)
        let mapping = try file.map(count: 3 * 4096)
        defer { mapping.unmap() }
        storer.placeholder.store(UInt(bitPattern: mapping.baseAddress + 4096), ordering: .relaxed)

        try file.punchHole(offset: 4096, count: 4096)
        #expect(storer.placeholder.load(ordering: .relaxed) == 0, "the punched page became a placeholder")
        // The store came after the punch: it gave the hole a block, as an allocating fault does.
        var page = [UInt8](repeating: 0, count: 4096)
        page[10] = 0x5A
        #expect(try file.read(count: 4096, at: 4096) == page, "the store stayed in anonymous memory")
        #expect(try file.frames(offset: 4096, count: 4096).first != nil)
        #expect(mapping.baseAddress.load(fromByteOffset: 4096 + 10, as: UInt8.self) == 0x5A)
        mapping.baseAddress.storeBytes(of: 0x5B, toByteOffset: 4096 + 11, as: UInt8.self)
        page[11] = 0x5B
        #expect(try file.read(count: 4096, at: 4096) == page)
        #expect(try t.fs.check().isClean)
    }

    @Test("a dedup's shared page that stops being shared takes the next store into its block, without a copy")
    func storeAfterSharingEnds() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "dedupunshared")
        try #require(t.fs.faultHandling == .userfaultfd, "a store that faults needs the fault handler")
        let bytes = pattern(4096, seed: 6)
        let source = try t.fs.create("/s")
        let destination = try t.fs.create("/d")
        try source.write(bytes, at: 0)
        try destination.write(bytes, at: 0)
        let mapping = try destination.map(count: 4096)
        defer { mapping.unmap() }
        #expect(try t.fs.deduplicate("/s", offset: 0, "/d", offset: 0, count: 4096) == 4096)
        let shared = try #require(try destination.frames(offset: 0, count: 4096).first ?? nil)
        #expect(mapping.baseAddress.load(fromByteOffset: 7, as: UInt8.self) == bytes[7])
        // The source writes its page (a copy of its own), so the block is the destination's alone.
        try source.write([1], at: 0)
        #expect(t.fs.statistics().sharedBlocks == 0)
        let before = t.fs.statistics().faults.copyOnWrite
        mapping.baseAddress.storeBytes(of: 0xEE, toByteOffset: 7, as: UInt8.self)
        var changed = bytes
        changed[7] = 0xEE
        #expect(try destination.read(count: 4096, at: 0) == changed, "the store went to a private copy")
        #expect(try destination.frames(offset: 0, count: 4096).first == shared, "nothing to copy: the block is its own")
        #expect(t.fs.statistics().faults.copyOnWrite == before)
        let second = try destination.map(count: 4096, access: .readOnly)
        defer { second.unmap() }
        #expect(second.baseAddress.load(fromByteOffset: 7, as: UInt8.self) == 0xEE)
        #expect(try t.fs.check().isClean)
    }

    @Test("migrate moves every page to a new block, keeps every byte, and maps the new frames; a pinned page stays")
    func migrateKeepsBytesAndSkipsPins() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "migrate")
        // A fragmented file: its pages interleaved with another file's.
        let file = try t.fs.create("/f")
        let spacer = try t.fs.create("/spacer")
        for page in 0..<8 {
            try file.write(pattern(4096, seed: page), at: page * 4096)
            try spacer.write([1], at: page * 4096)
        }
        try t.fs.remove("/spacer")
        spacer.close()
        let before = try file.frames(offset: 0, count: 8 * 4096).map { $0! }
        let mapping = try file.map(count: 8 * 4096)
        let second = try file.map(offset: 4096, count: 2 * 4096, access: .readOnly)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(try mapping.pin(offset: 3 * 4096, count: 1))

        let result = try file.migrate(offset: 0, count: 8 * 4096)
        #expect(result.migrated == 7)
        #expect(result.busy == [3])
        let after = try file.frames(offset: 0, count: 8 * 4096).map { $0! }
        #expect(after[3] == before[3], "the pinned page stays where it is")
        for page in [0, 1, 2, 4, 5, 6, 7] { #expect(after[page] != before[page]) }
        #expect(Set(after).count == 8)
        for page in 0..<8 {
            #expect(try file.read(count: 4096, at: page * 4096) == pattern(4096, seed: page), "page \(page)")
            #expect(
                mapping.baseAddress.load(fromByteOffset: page * 4096 + 7, as: UInt8.self)
                    == pattern(4096, seed: page)[7])
            #expect(t.device.pages.state(of: after[page]).mapCount == (page == 1 || page == 2 ? 2 : 1))
        }
        #expect(second.baseAddress.load(fromByteOffset: 5, as: UInt8.self) == pattern(4096, seed: 1)[5])
        // The moved pages' old blocks are free again; a store through the mapping reaches the new block.
        for page in [0, 1, 2, 4, 5, 6, 7] { #expect(!t.device.pages.state(of: before[page]).isAllocated) }
        mapping.baseAddress.storeBytes(of: 0xEE, toByteOffset: 5 * 4096, as: UInt8.self)
        #expect(try t.device.read(count: 1, at: after[5].deviceOffset) == [0xEE])
        // The NIC still writes the file through the pinned frame.
        try nic.write([0xD0], to: region, at: 0)
        #expect(try file.read(count: 1, at: 3 * 4096) == [0xD0])
        nic.deregister(region)
        #expect(try file.migrate(offset: 3 * 4096, count: 1) == MigrationResult(migrated: 1, busy: []))
        #expect(try file.read(count: 1, at: 3 * 4096) == [0xD0])
        #expect(try t.fs.check().isClean)
        let statistics = t.fs.statistics()
        #expect(statistics.pinsAcquired == statistics.pinsReleased && statistics.pinnedPages == 0)
        mapping.unmap()
        second.unmap()
        file.close()
        try t.fs.unmount()
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        let reopened = try fs.open("/f")
        for page in 0..<8 where page != 3 && page != 5 {
            #expect(try reopened.read(count: 4096, at: page * 4096) == pattern(4096, seed: page))
        }
        #expect(try fs.check().isClean)
    }

    @Test("migrating a fragmented file gathers it into one extent where the free space allows")
    func migrateDefragments() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "defrag")
        let file = try t.fs.create("/f")
        let spacer = try t.fs.create("/spacer")
        for page in 0..<16 {
            try file.write(pattern(100, seed: page), at: page * 4096)
            try spacer.write([1], at: page * 4096)
        }
        try t.fs.remove("/spacer")
        let runs = { (frames: [PageFrameNumber?]) in
            zip(frames.dropFirst(), frames).filter { $0.0!.rawValue != $0.1!.rawValue + 1 }.count + 1
        }
        #expect(runs(try file.frames(offset: 0, count: 16 * 4096)) == 16)
        #expect(try file.migrate(offset: 0, count: 16 * 4096).migrated == 16)
        #expect(runs(try file.frames(offset: 0, count: 16 * 4096)) == 1)
        for page in 0..<16 { #expect(try file.read(count: 100, at: page * 4096) == pattern(100, seed: page)) }
        #expect(try file.migrate(offset: 1 << 20, count: 4096) == MigrationResult(migrated: 0, busy: []))
        expectDAXError(.invalidArgument) { try file.migrate(offset: -1, count: 4096) }
        #expect(try t.fs.check().isClean)
    }

    @Test("threads pin, DMA-write canaries and unpin while another migrates the file: no write is lost")
    func migrateRacesPinners() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "migrace")
        // Without the handler a page being moved faults with SIGBUS: the storer would die.
        try #require(t.fs.faultHandling == .userfaultfd, "stores racing a migration need the fault handler")
        let pages = 16
        let file = try t.fs.create("/f")
        try file.write([UInt8](repeating: 0, count: pages * 4096), at: 0)
        let mapping = try file.map(count: pages * 4096)
        let nic = DMAEngine(device: t.device)
        let rounds = longTests ? 20_000 : 2_000
        let problems = ProblemLog()
        let migrated = Atomic(0)
        let pinnersDone = Atomic(0)
        onThreads(3) { role in
            if role == 2 {
                // Migrate until both pinners are done, then once more.
                repeat {
                    do {
                        migrated.wrappingAdd(
                            try file.migrate(offset: 0, count: pages * 4096).migrated, ordering: .relaxed)
                    } catch { problems.add("migrate: \(error)") }
                } while pinnersDone.load(ordering: .acquiring) < 2
                return
            }
            for round in 0..<rounds {
                let page = (round * 7 + role * 3) % pages
                let slot = page * 4096 + role * 8
                let canary = UInt64(role + 1) << 56 | UInt64(round)
                do {
                    let region = nic.register(try mapping.pin(offset: slot, count: 8))
                    try withUnsafeBytes(of: canary.littleEndian) {
                        try nic.write(from: $0, to: region, at: slot % 4096)
                    }
                    nic.deregister(region)
                    let bytes = try file.read(count: 8, at: slot)
                    let seen = bytes.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
                    if UInt64(littleEndian: seen) != canary {
                        problems.add("round \(round): page \(page) lost a DMA write")
                    }
                } catch { problems.add("pinner \(role): \(error)") }
            }
            pinnersDone.wrappingAdd(1, ordering: .releasing)
        }
        #expect(problems.all.isEmpty, "\(problems.all)")
        #expect(migrated.load(ordering: .relaxed) > 0)
        let statistics = t.fs.statistics()
        #expect(statistics.pinsAcquired == statistics.pinsReleased && statistics.pinnedPages == 0)
        #expect(try t.fs.check().isClean)
        mapping.unmap()
    }
}
