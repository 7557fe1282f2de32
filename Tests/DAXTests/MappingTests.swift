import Foundation
import Synchronization
import Testing

@testable import DAX

/// A file system on a device whose path is already unlinked: for exit tests, whose child process
/// dies by a signal and cannot clean up.
func unlinkedFileSystem(options: PMemDevice.Options = .init()) throws -> DAXFileSystem {
    let path = TemporaryDevice.uniquePath("exit")
    let device = try PMemDevice.create(path: path, size: 8 << 20, options: options)
    unlink(path)
    return try DAXFileSystem.format(device)
}

/// Tells an exit test's injected `mmap` to refuse the calls its test picks (a global: exit tests
/// capture nothing; each runs in a process of its own).
private let refuseMapsInChild = Atomic(false)

/// ``unlinkedFileSystem(options:)`` on a device whose `mmap` fails with `ENOMEM`, as at the
/// process's limit of map entries, for the calls whose flags `refused` picks, once
/// ``refuseMapsInChild`` is set.
private func unlinkedFileSystem(
    refusingMaps refused: @escaping @Sendable (Int32) -> Bool, faultHandler: Bool = true
) throws -> DAXFileSystem {
    var options = faultHandler ? PMemDevice.Options() : .withoutUserfaultfd
    var calls = options.systemCalls
    calls.mmap = { address, length, protection, flags, fd, offset in
        if refuseMapsInChild.load(ordering: .relaxed), refused(flags) {
            errno = ENOMEM
            return nil
        }
        return SystemCalls.live.mmap(address, length, protection, flags, fd, offset)
    }
    options.systemCalls = calls
    return try unlinkedFileSystem(options: options)
}

@Suite("DAXMapping")
struct MappingTests {
    @Test("zero copy: a store through the mapping is the byte at frame * 4096 + offset of the device")
    func zeroCopy() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.truncate(to: 5 * 4096)
        let mapping = try file.map(count: 5 * 4096)
        defer { mapping.unmap() }
        for page in 0..<5 {
            mapping.baseAddress.storeBytes(
                of: UInt64(0xC0FFEE00 + page), toByteOffset: page * 4096 + 8, as: UInt64.self)
        }
        mapping.persist(offset: 0, count: 5 * 4096)
        let frames = try file.frames(offset: 0, count: 5 * 4096)
        for (page, frame) in frames.enumerated() {
            #expect(
                t.device.baseAddress.load(fromByteOffset: frame!.deviceOffset + 8, as: UInt64.self)
                    == UInt64(0xC0FFEE00 + page))
        }
        // And the other way: a write to the file shows in the mapping without any copy.
        try file.write([0x5A], at: 3 * 4096 + 1)
        #expect(mapping.baseAddress.load(fromByteOffset: 3 * 4096 + 1, as: UInt8.self) == 0x5A)
        // Both views are the same physical page: same address through the device, too.
        #expect(try file.read(count: 8, at: 4096 + 8) == withUnsafeBytes(of: UInt64(0xC0FFEE01)) { Array($0) })
    }

    @Test("a mapping's persist and copy refuse a range outside it, and copy a read-only mapping: nothing stored")
    func refusedMappingCalls() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        let data = pattern(3 * 4096)
        try file.write(data, at: 0)
        let mapping = try file.map(count: 3 * 4096)
        defer { mapping.unmap() }
        let reader = try file.map(count: 3 * 4096, access: .readOnly)
        defer { reader.unmap() }
        let ones = [UInt8](repeating: 1, count: 4096)
        mapping.persist(offset: 3 * 4096 - 10, count: 4096)
        #expect(t.device.refusedCalls == 1)
        #expect(t.device.lastRefusal?.code == .invalidArgument)
        #expect(t.device.lastRefusal?.message.contains("outside the mapping of /f (12288 bytes)") == true)
        ones.withUnsafeBytes { mapping.copy($0, toOffset: 3 * 4096 - 10) }
        ones.withUnsafeBytes { mapping.copy($0, toOffset: -1) }
        mapping.persist(offset: 0, count: -4096)
        #expect(t.device.refusedCalls == 4)
        ones.withUnsafeBytes { reader.copy($0, toOffset: 0) }
        #expect(t.device.refusedCalls == 5)
        #expect(t.device.lastRefusal?.code == .permissionDenied)
        #expect(t.device.lastRefusal?.message == "copy into a read-only mapping of /f")
        #expect(try file.read(count: 3 * 4096, at: 0) == data, "not one byte stored")
        // What fits still works, through either end.
        ones.withUnsafeBytes { mapping.copy(UnsafeRawBufferPointer(rebasing: $0[0..<10]), toOffset: 3 * 4096 - 10) }
        mapping.persist(offset: 3 * 4096, count: 0)
        #expect(try file.read(count: 10, at: 3 * 4096 - 10) == [UInt8](repeating: 1, count: 10))
        #expect(t.device.refusedCalls == 5)
        // After unmap the range may hold another mapping: the calls refuse, they never store there.
        mapping.unmap()
        mapping.persist(offset: 0, count: 4096)
        ones.withUnsafeBytes { mapping.copy($0, toOffset: 0) }
        #expect(t.device.refusedCalls == 7)
        #expect(t.device.lastRefusal?.message == "copy of 4096 bytes after the mapping of /f was unmapped")
        #expect(try file.read(count: 4096, at: 0) == Array(data[0..<4096]))
    }

    @Test("map and unmap move refCount and mapCount; two mappings count twice")
    func counts() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.write(pattern(8192), at: 0)
        let frame = try file.frames(offset: 0, count: 1)[0]!
        #expect(
            t.fs.pages.state(of: frame)
                == PageState(
                    refCount: 0, pinCount: 0, mapCount: 0, isAllocated: true,
                    isQuarantined: false))
        let first = try file.map(count: 8192)
        let second = try file.map(count: 4096, access: .readOnly)
        #expect(
            t.fs.pages.state(of: frame)
                == PageState(
                    refCount: 2, pinCount: 0, mapCount: 2, isAllocated: true,
                    isQuarantined: false))
        first.unmap()
        first.unmap()
        #expect(t.fs.pages.state(of: frame).mapCount == 1)
        #expect(second.baseAddress.load(as: UInt8.self) == pattern(1)[0])
        second.unmap()
        #expect(t.fs.pages.state(of: frame).refCount == 0)
    }

    @Test("a mapping allocates nothing up front; its range may reach past the end of the file")
    func mappingRules() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.truncate(to: 10_000)
        let mapping = try file.map(count: 12_288)  // the whole last page may be mapped
        #expect(UnsafeRawBufferPointer(start: mapping.baseAddress, count: 12_288).allSatisfy { $0 == 0 })
        #expect(try file.frames(offset: 0, count: 10_000).allSatisfy { $0 == nil }, "loads allocate nothing")
        mapping.unmap()
        let past = try file.map(count: 12_289)  // as mmap(2) allows: page 3 raises SIGBUS
        #expect(past.count == 12_289)
        past.unmap()
        expectDAXError(.invalidArgument) { try file.map(offset: 100, count: 100) }
        expectDAXError(.invalidArgument) { try file.map(count: 0) }
        let mapped = try file.map(offset: 8192, count: 100)
        mapped.baseAddress.storeBytes(of: 7, as: UInt8.self)
        #expect(try file.read(count: 1, at: 8192) == [7])
        #expect(try file.frames(offset: 0, count: 10_000).map { $0 != nil } == [false, false, true])
        mapped.unmap()
        #expect(try t.fs.check().isClean)
    }

    @Test("without userfaultfd a writable mapping allocates its holes, zeroed, when it is made")
    func mappingRulesWithoutFaultHandler() throws {
        let t = try TemporaryFileSystem(deviceOptions: .withoutUserfaultfd)
        guard case .unavailable(let reason) = t.fs.faultHandling else {
            Issue.record("a fault handler without userfaultfd")
            return
        }
        #expect(reason.contains("userfaultfd"))
        let file = try t.fs.create("/f")
        try file.truncate(to: 10_000)
        let mapping = try file.map(count: 12_289)
        #expect(try file.frames(offset: 0, count: 10_000).allSatisfy { $0 != nil })
        #expect(UnsafeRawBufferPointer(start: mapping.baseAddress, count: 12_288).allSatisfy { $0 == 0 })
        mapping.unmap()
        #expect(try t.fs.check().isClean)
    }

    @Test("unmount is refused while a file is mapped; a removed mapped file lives until unmapped")
    func mappedFileLifetime() throws {
        let t = try TemporaryFileSystem()
        let fs = t.fs
        let file = try fs.create("/m")
        try file.write(pattern(16_384), at: 0)
        let mapping = try file.map(count: 16_384)
        file.close()
        let error = expectDAXError(.busy) { try fs.unmount() }
        #expect(error?.message.contains("mapped") == true)
        let free = fs.statistics().freeBlocks
        try fs.remove("/m")
        #expect(try fs.contentsOfDirectory("/").isEmpty)
        #expect(fs.statistics().freeBlocks == free)
        #expect(UnsafeRawBufferPointer(start: mapping.baseAddress, count: 16_384).elementsEqual(pattern(16_384)))
        mapping.baseAddress.storeBytes(of: 1, as: UInt8.self)  // still a live mapping
        #expect(try fs.check().isClean)
        mapping.unmap()
        #expect(fs.statistics().freeBlocks == free + 4)
        #expect(try fs.check().isClean)
        try fs.unmount()
    }

    @Test("a mapping's own persist flushes through it")
    func persistThroughMapping() throws {
        let counter = CallCounter()
        var options = PMemDevice.Options()
        options.persistence = .cacheFlush
        options.systemCalls = counter.systemCalls
        let t = try TemporaryFileSystem(deviceOptions: options)
        let file = try t.fs.create("/f")
        try file.truncate(to: 4096)
        let mapping = try file.map(count: 4096)
        let before = counter.persists.load(ordering: .relaxed)
        mapping.baseAddress.storeBytes(of: 42, as: UInt64.self)
        mapping.persist(offset: 0, count: 8)
        #expect(counter.persists.load(ordering: .relaxed) == before + 1)
        mapping.unmap()
    }

    @Test("a load after truncate raises SIGBUS instead of reading a block someone else owns")
    func loadAfterTruncateFaults() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let fs = try unlinkedFileSystem()
            let file = try fs.create("/f")
            try file.write(pattern(3 * 4096), at: 0)
            let mapping = try file.map(count: 3 * 4096)
            try file.truncate(to: 4096)
            // The first page is still there.
            _ = mapping.baseAddress.load(as: UInt8.self)
            let other = try fs.create("/other")
            try other.write(pattern(2 * 4096, seed: 9), at: 0)  // may reuse the freed blocks
            _ = mapping.baseAddress.load(fromByteOffset: 2 * 4096, as: UInt8.self)
        }
    }

    @Test("without userfaultfd a store after punch raises SIGBUS (with it, the page is a hole that fills)")
    func storeAfterPunchFaults() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let fs = try unlinkedFileSystem(options: .withoutUserfaultfd)
            let file = try fs.create("/f")
            try file.write(pattern(4 * 4096), at: 0)
            let mapping = try file.map(count: 4 * 4096)
            try file.punchHole(offset: 4096, count: 4096)
            mapping.baseAddress.storeBytes(of: 1, toByteOffset: 0, as: UInt8.self)  // page 0 is fine
            mapping.baseAddress.storeBytes(of: 1, toByteOffset: 4096, as: UInt8.self)
        }
    }

    @Test("a hole a read-only mapping shows as the zero page faults once a truncate cuts it off")
    func zeroPageAfterTruncateFaults() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let fs = try unlinkedFileSystem()
            let file = try fs.create("/f")
            try file.write([1], at: 4096)
            try file.truncate(to: 3 * 4096)  // pages 0 and 2 are holes
            let mapping = try file.map(count: 3 * 4096, access: .readOnly)
            guard mapping.baseAddress.load(fromByteOffset: 2 * 4096, as: UInt8.self) == 0 else { exit(0) }
            // A truncate that fails (page 1 is pinned) leaves the zero page readable.
            let pin = try mapping.pin(offset: 4096, count: 1, access: .readOnly)
            guard (try? file.truncate(to: 4096, ifBusy: .fail)) == nil else { exit(0) }
            pin.release()
            guard mapping.baseAddress.load(fromByteOffset: 2 * 4096, as: UInt8.self) == 0 else { exit(0) }
            try file.truncate(to: 4096)
            _ = mapping.baseAddress.load(fromByteOffset: 2 * 4096, as: UInt8.self)
        }
    }

    @Test("a zero page that cannot be replaced by the new block faults rather than read stale zeros")
    func unreplaceableZeroPageFaults() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            // Device pages are mapped with MAP_POPULATE: those are refused.
            let fs = try unlinkedFileSystem(refusingMaps: { $0 & MAP_POPULATE != 0 })
            let file = try fs.create("/f")
            try file.truncate(to: 2 * 4096)
            let mapping = try file.map(count: 2 * 4096, access: .readOnly)
            guard mapping.baseAddress.load(fromByteOffset: 4096, as: UInt8.self) == 0 else { exit(0) }
            refuseMapsInChild.store(true, ordering: .relaxed)
            try file.write([0x42], at: 4096)
            _ = mapping.baseAddress.load(fromByteOffset: 4096, as: UInt8.self)  // not a stale 0
        }
    }

    @Test(
        "a store to a hole whose block cannot be mapped, nor anything else there, gets SIGBUS, not a trap of the library"
    )
    func storeWithNoMapEntriesLeftRaisesSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            // Every mapping at a fixed address is refused: the block, the placeholder, the SIGBUS
            // region, PROT_NONE.
            let fs = try unlinkedFileSystem(refusingMaps: { $0 & MAP_FIXED != 0 })
            let file = try fs.create("/f")
            try file.truncate(to: 2 * 4096)
            let mapping = try file.map(count: 2 * 4096)
            refuseMapsInChild.store(true, ordering: .relaxed)
            mapping.baseAddress.storeBytes(of: 1, toByteOffset: 4096, as: UInt8.self)
        }
    }

    @Test("a load past the end of the file with no map entry for the SIGBUS region still gets SIGBUS, no hang")
    func loadPastEndWithNoMapEntriesLeftRaisesSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            // Every mapping at a fixed address is refused once the flag is set: the SIGBUS
            // region cannot be mapped over the placeholders past the end, and the thread would
            // only fault there again.
            let fs = try unlinkedFileSystem(refusingMaps: { $0 & MAP_FIXED != 0 })
            let file = try fs.create("/f")
            try file.write(pattern(4 * 4096), at: 0)
            let mapping = try file.map(count: 16 * 4096)
            guard UnsafeRawBufferPointer(start: mapping.baseAddress, count: 4 * 4096).elementsEqual(pattern(4 * 4096))
            else { exit(1) }
            refuseMapsInChild.store(true, ordering: .relaxed)
            _ = mapping.baseAddress.load(fromByteOffset: 8 * 4096, as: UInt8.self)
            exit(3)
        }
    }

    @Test(
        "a file that grows while its SIGBUS region cannot be changed: the next sync moves it, and the holes read zeros")
    func growWithNoMapEntriesLeft() async {
        await #expect(processExitsWith: .exitCode(77)) {
            let fs = try unlinkedFileSystem(refusingMaps: { $0 & MAP_FIXED != 0 })
            let file = try fs.create("/f")
            try file.write(pattern(2 * 4096), at: 0)
            let mapping = try file.map(count: 8 * 4096)
            // A kernel access past the end: the handler maps the SIGBUS region over pages 2-7,
            // and read(2) fails with EFAULT there instead of the thread getting a signal.
            let zero = open("/dev/zero", O_RDONLY)
            guard read(zero, mapping.baseAddress + 4 * 4096, 4096) == -1 else { exit(1) }
            close(zero)
            refuseMapsInChild.store(true, ordering: .relaxed)
            try file.truncate(to: 6 * 4096)
            refuseMapsInChild.store(false, ordering: .relaxed)
            try file.sync()
            // Page 3 is a hole inside the file now: zeros, not SIGBUS.
            guard mapping.baseAddress.load(fromByteOffset: 3 * 4096 + 5, as: UInt8.self) == 0 else { exit(2) }
            mapping.baseAddress.storeBytes(of: 0x5A, toByteOffset: 5 * 4096, as: UInt8.self)
            guard try file.read(count: 1, at: 5 * 4096) == [0x5A] else { exit(3) }
            exit(77)
        }
    }

    @Test("migrate without a fault handler, with no map entry to hide a page: the page stays, told busy, no store lost")
    func migrateWithNoMapEntriesLeft() async {
        await #expect(processExitsWith: .exitCode(77)) {
            let fs = try unlinkedFileSystem(refusingMaps: { $0 & MAP_FIXED != 0 }, faultHandler: false)
            guard fs.faultHandling != .userfaultfd else { exit(1) }
            let file = try fs.create("/f")
            try file.write(pattern(4 * 4096), at: 0)
            let before = try file.frames(offset: 0, count: 4 * 4096)
            let mapping = try file.map(count: 4 * 4096)
            refuseMapsInChild.store(true, ordering: .relaxed)
            let result = try file.migrate(offset: 4096, count: 2 * 4096)
            refuseMapsInChild.store(false, ordering: .relaxed)
            guard result.migrated == 0, result.busy == [1, 2] else { exit(2) }
            guard try file.frames(offset: 0, count: 4 * 4096) == before else { exit(3) }
            // The mapping still shows the file's blocks: a store reaches the file.
            mapping.baseAddress.storeBytes(of: 0xA5, toByteOffset: 4096 + 9, as: UInt8.self)
            guard try file.read(count: 1, at: 4096 + 9) == [0xA5] else { exit(4) }
            guard fs.statistics().quarantinedBlocks == 0 else { exit(5) }
            // With entries again the migration goes through.
            let again = try file.migrate(offset: 4096, count: 2 * 4096)
            guard again.migrated == 2, try file.read(count: 1, at: 4096 + 9) == [0xA5] else { exit(6) }
            guard mapping.baseAddress.load(fromByteOffset: 4096 + 9, as: UInt8.self) == 0xA5 else { exit(7) }
            mapping.unmap()
            guard try fs.check().isClean else { exit(8) }
            exit(77)
        }
    }

    @Test("a store in the moment before a cut page's placeholder is registered is gone with the page: SIGBUS after")
    func storeBeforeCutPlaceholderIsRegistered() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let storer = StoreAfterMap()
            var options = PMemDevice.Options()
            options.systemCalls = storer.calls
            let path = TemporaryDevice.uniquePath("cutwindow")
            let device = try PMemDevice.create(path: path, size: 8 << 20, options: options)
            unlink(path)
            let fs = try DAXFileSystem.format(device)
            guard fs.faultHandling == .userfaultfd else { exit(0) }  // nothing races without the handler
            let file = try fs.create("/f")
            try file.write(pattern(3 * 4096, seed: 8), at: 0)
            let mapping = try file.map(count: 3 * 4096)
            storer.placeholder.store(UInt(bitPattern: mapping.baseAddress + 4096), ordering: .relaxed)
            try file.truncate(to: 4096)
            guard storer.placeholder.load(ordering: .relaxed) == 0 else { exit(0) }  // no placeholder made
            // The store (StoreAfterMap) came before the truncate, as far as anyone can tell: the page is past the
            // end, and an access there raises SIGBUS rather than read the stored byte.
            _ = mapping.baseAddress.load(fromByteOffset: 4096 + 10, as: UInt8.self)
        }
    }

    @Test("a store through a read-only mapping faults (SIGSEGV)")
    func readOnlyMappingRejectsStores() async {
        await #expect(processExitsWith: .signal(SIGSEGV)) {
            let fs = try unlinkedFileSystem()
            let file = try fs.create("/f")
            try file.write([1, 2, 3], at: 0)
            let mapping = try file.map(count: 3, access: .readOnly)
            guard mapping.baseAddress.load(as: UInt8.self) == 1 else { exit(0) }
            mapping.baseAddress.storeBytes(of: 9, as: UInt8.self)
        }
    }

    @Test("a read-only mapping cannot be made writable: mprotect(PROT_WRITE) is EACCES", arguments: [true, false])
    func readOnlyMappingStaysReadOnly(fileOpenedReadOnly: Bool) throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "mprotect")
        let owner = try t.fs.create("/f")
        try owner.write(pattern(3 * 4096), at: 0)
        let file = fileOpenedReadOnly ? try t.fs.open("/f", access: .readOnly) : owner
        let mapping = try file.map(count: 3 * 4096, access: .readOnly)
        defer { mapping.unmap() }
        errno = 0
        #expect(mprotect(mapping.baseAddress, 3 * 4096, PROT_READ | PROT_WRITE) == -1)
        #expect(errno == EACCES)
        #expect(mprotect(mapping.baseAddress + 4096, 4096, PROT_READ | PROT_WRITE) == -1)
        #expect(try owner.read(count: 3 * 4096, at: 0) == pattern(3 * 4096))
        #expect(mapping.baseAddress.load(fromByteOffset: 4096, as: UInt8.self) == pattern(3 * 4096)[4096])
    }

    @Test("truncate unmaps from every live mapping, and a failed truncate leaves them as they were")
    func truncateAndMappings() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.write(pattern(4 * 4096), at: 0)
        let frames = try file.frames(offset: 0, count: 4 * 4096)
        let a = try file.map(count: 4 * 4096)
        let b = try file.map(offset: 8192, count: 8192)
        #expect(t.fs.pages.state(of: frames[3]!).mapCount == 2)
        try file.truncate(to: 2 * 4096)
        #expect(
            t.fs.pages.state(of: frames[3]!)
                == PageState(
                    refCount: 0, pinCount: 0, mapCount: 0, isAllocated: false,
                    isQuarantined: false))
        #expect(t.fs.pages.state(of: frames[1]!).mapCount == 1)
        #expect(a.frame(at: 3) == nil && a.frame(at: 1) == frames[1]!.rawValue)
        #expect(b.frame(at: 0) == nil)
        #expect(a.baseAddress.load(fromByteOffset: 4096, as: UInt8.self) == pattern(8192)[4096])
        a.unmap()
        b.unmap()
        #expect(try t.fs.check().isClean)
    }
}

/// Mappings keep up with the file under them: a page punched and filled again, holes, a file
/// removed while mapped. (No child processes here, so ThreadSanitizer runs them too.)
@Suite("DAXMapping: holes, punched pages and removed files")
struct MappingLayoutTests {
    @Test("a removed file that is still mapped keeps its blocks until the unmap")
    func removedFileKeepsBlocksUntilUnmap() throws {
        let t = try TemporaryFileSystem(size: 4 << 20)
        let fs = t.fs
        let file = try fs.create("/gone")
        try file.write(pattern(8 * 4096), at: 0)
        let frames = Set(try file.frames(offset: 0, count: 8 * 4096).compactMap { $0 })
        let mapping = try file.map(count: 8 * 4096)
        file.close()
        try fs.remove("/gone")
        let other = try fs.create("/other")
        let free = fs.statistics().freeBlocks
        try other.allocate(offset: 0, count: free * 4096)
        #expect(Set(try other.frames(offset: 0, count: free * 4096).compactMap { $0 }).isDisjoint(with: frames))
        #expect(UnsafeRawBufferPointer(start: mapping.baseAddress, count: 8 * 4096).elementsEqual(pattern(8 * 4096)))
        mapping.unmap()
        #expect(fs.statistics().freeBlocks == 8)
        #expect(try fs.check().isClean)
    }

    @Test(
        "a write or allocate that fills a page punched while mapped shows the new block in the mappings",
        arguments: [true, false])
    func refilledPunchedPageShowsInMappings(withFaultHandler: Bool) throws {
        let t = try TemporaryFileSystem(
            size: 8 << 20, name: "refill", deviceOptions: withFaultHandler ? .init() : .withoutUserfaultfd)
        let file = try t.fs.create("/f")
        try file.write(pattern(3 * 4096, seed: 6), at: 0)
        let writable = try file.map(count: 3 * 4096)
        let readOnly = try file.map(count: 3 * 4096, access: .readOnly)
        try file.punchHole(offset: 4096, count: 4096)
        // The punched page is a hole now: a .readOnly pin there pins the zero frame.
        let zero = try readOnly.pin(offset: 4096, count: 1, access: .readOnly)
        #expect(zero.frames == [t.fs.pages.zeroFrame])
        zero.release()
        try file.write([0x5A], at: 4096 + 5)
        let frame = try #require(try file.frames(offset: 4096, count: 1)[0])
        #expect(t.fs.pages.state(of: frame).mapCount == 2)
        for mapping in [writable, readOnly] {
            // Pinnable again, so mapped: the load below cannot fault.
            let pin = try mapping.pin(offset: 4096, count: 1, access: .readOnly)
            #expect(pin.frames == [frame])
            #expect(mapping.baseAddress.load(fromByteOffset: 4096 + 5, as: UInt8.self) == 0x5A)
            #expect(mapping.baseAddress.load(fromByteOffset: 4096 + 6, as: UInt8.self) == 0)
            pin.release()
        }
        // A store through the mapping reaches the new block (zero copy).
        writable.baseAddress.storeBytes(of: 0x66, toByteOffset: 4096 + 7, as: UInt8.self)
        #expect(try file.read(count: 3, at: 4096 + 5) == [0x5A, 0, 0x66])
        // allocate does the same.
        try file.punchHole(offset: 2 * 4096, count: 4096)
        try file.allocate(offset: 2 * 4096, count: 4096)
        let allocated = try #require(try file.frames(offset: 2 * 4096, count: 1)[0])
        #expect(t.fs.pages.state(of: allocated).mapCount == 2)
        // So does a map that fills the hole for itself (without a handler), or its first store (with one).
        try file.punchHole(offset: 0, count: 4096)
        let third = try file.map(offset: 0, count: 4096)
        if withFaultHandler { third.baseAddress.storeBytes(of: 0, as: UInt8.self) }
        let refilled = try #require(try file.frames(offset: 0, count: 1)[0])
        #expect(t.fs.pages.state(of: refilled).mapCount == 3)
        try file.write([0x77], at: 1)
        let pin = try readOnly.pin(offset: 0, count: 1, access: .readOnly)
        #expect(pin.frames == [refilled])
        #expect(readOnly.baseAddress.load(fromByteOffset: 1, as: UInt8.self) == 0x77)
        pin.release()
        third.unmap()
        writable.unmap()
        readOnly.unmap()
        for page in [frame, allocated, refilled] {
            #expect(t.fs.pages.state(of: page).mapCount == 0 && t.fs.pages.state(of: page).refCount == 0)
        }
        #expect(try t.fs.check().isClean)
    }

    @Test(
        "a read-only mapping of holes changes nothing, works on a full file system, and shows later writes",
        arguments: [true, false])
    func readOnlyMappingOfHoles(withFaultHandler: Bool) throws {
        let t = try TemporaryFileSystem(
            size: 8 << 20, name: "rohole", deviceOptions: withFaultHandler ? .init() : .withoutUserfaultfd)
        let writer = try t.fs.create("/sparse")
        try writer.write([7], at: 0)
        try writer.truncate(to: 8 * 4096)
        let filler = try t.fs.create("/filler")
        try filler.allocate(offset: 0, count: t.fs.statistics().freeBlocks * 4096)
        let framesBefore = try writer.frames(offset: 0, count: 8 * 4096)
        let free = t.fs.statistics().freeBlocks
        let reader = try t.fs.open("/sparse", access: .readOnly)
        let mapping = try reader.map(count: 8 * 4096, access: .readOnly)
        #expect(try writer.frames(offset: 0, count: 8 * 4096) == framesBefore)
        #expect(t.fs.statistics().freeBlocks == free)
        let bytes = UnsafeRawBufferPointer(start: mapping.baseAddress, count: 8 * 4096)
        #expect(bytes[0] == 7 && bytes[1...].allSatisfy { $0 == 0 })
        // A .readOnly pin of a hole pins the zero frame, which reads zeros by DMA.
        let zero = try mapping.pin(offset: 3 * 4096, count: 1, access: .readOnly)
        #expect(zero.frames == [t.fs.pages.zeroFrame])
        let nic = DMAEngine(device: t.device)
        let region = nic.register(zero)
        #expect(try nic.read(count: 4096, from: region, at: 0) == [UInt8](repeating: 0, count: 4096))
        nic.deregister(region)
        // A writer fills a hole: the read-only mapping shows the new block, counted.
        try filler.truncate(to: 0)
        try writer.write([0x42], at: 3 * 4096 + 9)
        let frame = try #require(try writer.frames(offset: 3 * 4096, count: 1)[0])
        #expect(t.fs.pages.state(of: frame).mapCount == 1)
        #expect(bytes[3 * 4096 + 9] == 0x42)
        let pin = try mapping.pin(offset: 3 * 4096, count: 1, access: .readOnly)
        #expect(pin.frames == [frame])
        pin.release()
        // So does a .readWrite mapping that fills the rest.
        // A punch that frees a block leaves the holes around it reading zeros (still holes).
        try writer.punchHole(offset: 2 * 4096, count: 3 * 4096)
        #expect(bytes[2 * 4096] == 0 && bytes[4 * 4096] == 0)
        let full = try writer.map(count: 8 * 4096)
        full.baseAddress.storeBytes(of: 0x24, toByteOffset: 6 * 4096, as: UInt8.self)
        #expect(bytes[6 * 4096] == 0x24)
        full.unmap()
        mapping.unmap()
        // Without a handler the writable mapping gave every hole a block; with one, only the stored page.
        let frames = try writer.frames(offset: 0, count: 8 * 4096)
        #expect(frames.filter { $0 != nil }.count == (withFaultHandler ? 2 : 8))  // pages 0 and 6
        for page in frames.compactMap({ $0 }) {
            let state = t.fs.pages.state(of: page)
            #expect(state.mapCount == 0 && state.refCount == 0)
        }
        reader.close()
        #expect(try t.fs.check().isClean)
    }
}

@Suite("DAXMapping: scoped access")
struct ScopedAccessTests {
    @Test("withUnsafeMutableBytes is the mapping's bytes, bounded; withPin releases when the body ends")
    func scopedBuffersAndPins() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "scoped")
        let file = try t.fs.create("/f")
        try file.write(pattern(2 * 4096), at: 0)
        let mapping = try file.map(count: 2 * 4096 - 100)
        defer { mapping.unmap() }
        mapping.withUnsafeMutableBytes { bytes in
            #expect(bytes.count == 2 * 4096 - 100)
            bytes[4096] = 0xEE
        }
        #expect(try file.read(count: 1, at: 4096) == [0xEE])
        #expect(mapping.withUnsafeBytes { Array($0[0..<4]) } == Array(pattern(4)))

        struct Stop: Error {}
        let frame = try file.frames(offset: 4096, count: 1)[0]!
        let seen = try mapping.withPin(offset: 4096, count: 10) { pin in
            #expect(t.fs.pages.state(of: frame).pinCount == 1)
            return pin.frames
        }
        #expect(seen == [frame])
        #expect(t.fs.pages.state(of: frame).pinCount == 0)
        #expect(throws: Stop.self) {
            try mapping.withPin(offset: 0, count: 1) { _ in throw Stop() }
        }
        #expect(t.fs.statistics().pinnedPages == 0)
        let statistics = t.fs.statistics()
        #expect(statistics.pinsAcquired == statistics.pinsReleased)
        let error = expectDAXError(.invalidArgument) { try mapping.pin(offset: 0, count: 0).release() }
        #expect(error?.message.contains("at least one byte") == true, "\(String(describing: error))")
    }
}
