import Glibc
import Synchronization
import Testing

@testable import DAX

/// System calls that store into a mapping from inside the calls that show or drop its pages, to
/// stand for another thread's store in the moment between them, at the place each test asks for.
/// Each test has its own (tests run side by side on devices laid out alike).
final class RacingStores: Sendable {
    /// The device offset at whose next writable `MAP_FIXED` mmap `deviceValue` goes to byte 100;
    /// -1 when none.
    let deviceOffset = Atomic(-1)
    let deviceValue = Atomic<UInt8>(0)
    /// The address at whose next anonymous writable mmap (a placeholder) 0x5A goes to byte 10;
    /// 0 when none.
    let placeholder = Atomic<UInt>(0)
    /// Set by that store to the placeholder's address when ``secondStore`` is armed: the
    /// `MADV_DONTNEED` that drops the page then has another thread store 0x5B to byte 11 first
    /// (a store after the page was read, before it is dropped), and waits until that store is
    /// done or the fault handler has read the fault it took (the thread then sleeps until the
    /// operation lets go of its locks).
    let dropping = Atomic<UInt>(0)
    let secondStore = Atomic(false)
    /// Set once the second store returned.
    let secondStored = Atomic(false)
    /// The fault handler whose faults the second store's wait watches.
    nonisolated(unsafe) var faults: UserFaults?
    private let storer = Mutex<pthread_t?>(nil)

    /// The next writable shared mmaps of the device that fail with `ENOMEM`.
    let failures = Atomic(0)

    var calls: SystemCalls {
        var calls = SystemCalls.injectable
        calls.mmap = { [self] address, length, protection, flags, fd, offset in
            let writable = flags & MAP_FIXED != 0 && protection & PROT_WRITE != 0
            if writable, fd >= 0, flags & MAP_SHARED != 0, failures.load(ordering: .relaxed) > 0 {
                failures.wrappingSubtract(1, ordering: .relaxed)
                errno = ENOMEM
                return nil
            }
            let mapped = SystemCalls.live.mmap(address, length, protection, flags, fd, offset)
            guard let mapped, writable else { return mapped }
            if fd >= 0, deviceOffset.compareExchange(expected: offset, desired: -1, ordering: .relaxed).exchanged {
                mapped.storeBytes(of: deviceValue.load(ordering: .relaxed), toByteOffset: 100, as: UInt8.self)
            }
            if flags & MAP_ANONYMOUS != 0,
                placeholder.compareExchange(expected: UInt(bitPattern: mapped), desired: 0, ordering: .relaxed)
                    .exchanged
            {
                mapped.storeBytes(of: 0x5A, toByteOffset: 10, as: UInt8.self)
                if secondStore.load(ordering: .relaxed) { dropping.store(UInt(bitPattern: mapped), ordering: .relaxed) }
            }
            return mapped
        }
        calls.madvise = { [self] address, length, advice in
            if advice == MADV_DONTNEED,
                dropping.compareExchange(expected: UInt(bitPattern: address), desired: 0, ordering: .relaxed)
                    .exchanged
            {
                storeFromAnotherThread(address + 11, 0x5B)
            }
            return SystemCalls.live.madvise(address, length, advice)
        }
        return calls
    }

    /// Stores `value` at `address` on a new thread, and returns once the store is done or the
    /// fault handler has read the fault it took.
    private func storeFromAnotherThread(_ address: UnsafeMutableRawPointer, _ value: UInt8) {
        let handled = faults?.faultsHandled.load(ordering: .relaxed) ?? 0
        let context = Unmanaged.passRetained(StoreRequest(address: address, value: value, done: self)).toOpaque()
        var thread = pthread_t()
        let started = pthread_create(
            &thread, nil,
            { argument in
                let request = Unmanaged<StoreRequest>.fromOpaque(argument!).takeRetainedValue()
                request.address.storeBytes(of: request.value, as: UInt8.self)
                request.done.secondStored.store(true, ordering: .sequentiallyConsistent)
                return nil
            }, context)
        precondition(started == 0, "cannot start the storing thread")
        storer.withTrackedLock { $0 = thread }
        while !secondStored.load(ordering: .sequentiallyConsistent),
            (faults?.faultsHandled.load(ordering: .relaxed) ?? 0) == handled
        {
            sched_yield()
        }
    }

    /// Waits for the thread of the second store, if one was started.
    func joinStorer() {
        guard let thread = storer.withTrackedLock({ $0 }) else { return }
        pthread_join(thread, nil)
    }

    private final class StoreRequest: @unchecked Sendable {
        let address: UnsafeMutableRawPointer
        let value: UInt8
        let done: RacingStores
        init(address: UnsafeMutableRawPointer, value: UInt8, done: RacingStores) {
            self.address = address
            self.value = value
            self.done = done
        }
    }

    /// A file system on a device whose system calls are these.
    func fileSystem(name: String) throws -> TemporaryFileSystem {
        var options = PMemDevice.Options()
        options.systemCalls = calls
        let made = try TemporaryFileSystem(size: 16 << 20, name: name, deviceOptions: options)
        try #require(made.fs.faultHandling == .userfaultfd)
        faults = made.fs.spaces.handler.faults
        return made
    }
}

@Suite("stores in the moment before a page is protected or registered")
struct RacedStoreTests {
    /// Two files of one page, each holding `bytes` in a block of its own: what a test then
    /// deduplicates, once the destination is mapped.
    private func deduplicated(_ t: TemporaryFileSystem, _ bytes: [UInt8]) throws -> (DAXFile, DAXFile) {
        let source = try t.fs.create("/s")
        let destination = try t.fs.create("/d")
        try source.write(bytes, at: 0)
        try destination.write(bytes, at: 0)
        return (source, destination)
    }

    @Test("a store of the byte already there, before the protection, leaves no copy that goes stale")
    func sameValueStoreLeavesNoStaleCopy() throws {
        let stores = RacingStores()
        let t = try stores.fileSystem(name: "racesame")
        let bytes = pattern(4096, seed: 5)
        let (source, destination) = try deduplicated(t, bytes)
        let mapping = try destination.map(count: 4096)
        defer { mapping.unmap() }
        let shared = try #require(try source.frames(offset: 0, count: 4096).first ?? nil)
        // A failed compare-and-swap, say: a store of what is there makes a copy all the same.
        stores.deviceValue.store(bytes[100], ordering: .relaxed)
        stores.deviceOffset.store(Int(shared.rawValue) * 4096, ordering: .relaxed)
        #expect(try t.fs.deduplicate("/s", offset: 0, "/d", offset: 0, count: 4096) == 4096)
        #expect(stores.deviceOffset.load(ordering: .relaxed) == -1, "the store happened")
        #expect(try destination.read(count: 4096, at: 0) == bytes)

        // The source takes a copy of its own: the block is the destination's alone.
        try source.write([1], at: 0)
        #expect(t.fs.statistics().sharedBlocks == 0)
        try destination.write([0x77], at: 100)
        #expect(mapping.baseAddress.load(fromByteOffset: 100, as: UInt8.self) == 0x77)
        let other = try destination.map(count: 4096)
        defer { other.unmap() }
        other.baseAddress.storeBytes(of: 0x66, toByteOffset: 200, as: UInt8.self)
        #expect(mapping.baseAddress.load(fromByteOffset: 200, as: UInt8.self) == 0x66)
        #expect(try destination.read(count: 1, at: 200) == [0x66])
        #expect(try t.fs.check().isClean)
    }

    @Test("a store to a raced placeholder page after it was read and before it is dropped is kept")
    func storeBeforeTheDropIsKept() throws {
        let stores = RacingStores()
        let t = try stores.fileSystem(name: "racedrop")
        let file = try t.fs.create("/f")
        let bytes = pattern(3 * 4096, seed: 7)
        try file.write(bytes, at: 0)
        let mapping = try file.map(count: 3 * 4096)
        defer { mapping.unmap() }
        stores.secondStore.store(true, ordering: .relaxed)
        stores.placeholder.store(UInt(bitPattern: mapping.baseAddress + 4096), ordering: .relaxed)
        try file.punchHole(offset: 4096, count: 4096)
        stores.joinStorer()
        #expect(stores.placeholder.load(ordering: .relaxed) == 0, "the first store happened")
        #expect(stores.dropping.load(ordering: .relaxed) == 0, "the second store happened")
        let secondStored = stores.secondStored.load(ordering: .relaxed)
        #expect(secondStored)
        let page = try file.read(count: 4096, at: 4096)
        #expect(page[10] == 0x5A)
        #expect(page[11] == 0x5B)
        #expect(page.enumerated().allSatisfy { $0.offset == 10 || $0.offset == 11 || $0.element == 0 })
        #expect(mapping.baseAddress.load(fromByteOffset: 4096 + 11, as: UInt8.self) == 0x5B)
        #expect(try file.read(count: 4096, at: 0) == Array(bytes[0..<4096]))
        #expect(try file.read(count: 4096, at: 8192) == Array(bytes[8192...]))
        #expect(try t.fs.check().isClean)
    }

    @Test("a store that raced a placeholder left by a copy that could not be shown is kept")
    func storeRacingAFailedShowIsKept() throws {
        let stores = RacingStores()
        let t = try stores.fileSystem(name: "racefail")
        let bytes = pattern(4096, seed: 5)
        let (source, destination) = try deduplicated(t, bytes)
        let mapping = try destination.map(count: 4096)
        defer { mapping.unmap() }
        #expect(try t.fs.deduplicate("/s", offset: 0, "/d", offset: 0, count: 4096) == 4096)
        let copiesBefore = t.fs.statistics().faults.copyOnWrite
        // The copy-on-write's mmap of the copy fails, and so does the one page retry: the page
        // becomes a placeholder, which takes a store before it is registered.
        stores.failures.store(2, ordering: .relaxed)
        stores.placeholder.store(UInt(bitPattern: mapping.baseAddress), ordering: .relaxed)
        mapping.baseAddress.storeBytes(of: 0xEE, toByteOffset: 300, as: UInt8.self)
        #expect(stores.placeholder.load(ordering: .relaxed) == 0, "the raced store happened")
        #expect(t.fs.statistics().faults.copyOnWrite == copiesBefore + 1)
        var expected = bytes
        expected[300] = 0xEE
        expected[10] = 0x5A
        #expect(try destination.read(count: 4096, at: 0) == expected)
        #expect(mapping.baseAddress.load(fromByteOffset: 10, as: UInt8.self) == 0x5A)
        #expect(try source.read(count: 4096, at: 0) == bytes)
        #expect(try t.fs.check().isClean)
    }

    @Test("a clone's page loaded while shared shows the clone's later stores once the source has its own copy")
    func pageLoadedWhileSharedFollowsTheBlock() throws {
        let stores = RacingStores()
        let t = try stores.fileSystem(name: "raceabsent")
        let source = try t.fs.create("/s")
        try source.allocate(offset: 0, count: 4096)
        try t.fs.clone("/s", to: "/d")
        let destination = try t.fs.open("/d")
        #expect(t.fs.statistics().sharedBlocks == 1)
        let mapping = try destination.map(count: 4096)
        defer { mapping.unmap() }
        #expect(mapping.baseAddress.load(fromByteOffset: 100, as: UInt8.self) == 0)
        // The source takes a copy: the block is the destination's alone, and written.
        try source.write([1], at: 0)
        #expect(t.fs.statistics().sharedBlocks == 0)
        try destination.write([0x77], at: 100)
        #expect(mapping.baseAddress.load(fromByteOffset: 100, as: UInt8.self) == 0x77)
        mapping.baseAddress.storeBytes(of: 0x66, toByteOffset: 200, as: UInt8.self)
        #expect(try destination.read(count: 1, at: 200) == [0x66])
        #expect(try source.read(count: 2, at: 0) == [1, 0])
        #expect(try t.fs.check().isClean)
    }
}
