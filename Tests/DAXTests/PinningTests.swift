import Foundation
import Synchronization
import Testing

@testable import DAX

/// The truncate policies the seed stories are played under.
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

@Suite("Pins gate truncate and reuse (the seed stories)")
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
        let started = ContinuousClock.now
        let nic = s.nic
        let region = s.region
        Thread.detachNewThread {
            Thread.sleep(forTimeInterval: 0.15)
            nic.deregister(region)
        }
        try s.file.truncate(to: 0, ifBusy: .wait(timeout: .seconds(20)))
        let waited = ContinuousClock.now - started
        #expect(waited >= .milliseconds(140) && waited < .seconds(10))
        #expect(s.file.size == 0)
        #expect(s.t.fs.statistics().quarantinedBlocks == 0)
        s.mapping.unmap()
        #expect(s.t.fs.statistics().freeBlocks == s.t.fs.statistics().totalBlocks - 1)
    }

    @Test("a lease holder who lets go when asked: no revocation, the truncate goes on at once")
    func holderLetsGo() throws {
        let t = try TemporaryFileSystem(size: 8 << 20)
        let file = try t.fs.create("/f")
        try file.write(pattern(8 * 4096), at: 0)
        let mapping = try file.map(count: 8 * 4096)
        let nic = DMAEngine(device: t.device)
        let holder = RegionHolder()
        let pin = try mapping.pin(offset: 0, count: 8 * 4096, lifetime: .longTerm(onRevoke: { holder.letGo() }))
        holder.set(nic.register(pin), engine: nic)
        let started = ContinuousClock.now
        try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .seconds(20)))
        #expect(ContinuousClock.now - started < .seconds(5))
        #expect(holder.region?.isDeregistered == true)
        #expect(holder.region?.isRevoked == false)
        #expect(t.fs.statistics().pinsReleased == 8)
        mapping.unmap()
    }

    @Test("a removed file that is still mapped keeps its blocks until the unmap")
    func removedButMapped() throws {
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

    @Test("a reader's long-term pin cannot block the owner's truncate forever (seed 004)")
    func readerCannotBlockOwner() throws {
        let t = try TemporaryFileSystem(size: 4 << 20)
        let owner = try t.fs.create("/public")
        try owner.write(pattern(4 * 4096), at: 0)
        let reader = try t.fs.open("/public", access: .readOnly)
        let view = try reader.map(count: 4 * 4096, access: .readOnly)
        expectDAXError(.permissionDenied) { _ = try view.pin(offset: 0, count: 4096, access: .readWrite) }
        let nic = DMAEngine(device: t.device)
        // A hostile reader ignores the request to let go.
        let ignore: @Sendable () -> Void = {}
        let region = nic.register(
            try view.pin(offset: 0, count: 4 * 4096, access: .readOnly, lifetime: .longTerm(onRevoke: ignore)))
        expectDAXError(.busy) { try owner.truncate(to: 0, ifBusy: .fail) }
        expectDAXError(.timedOut) { try owner.truncate(to: 0, ifBusy: .wait(timeout: .milliseconds(50))) }
        #expect(owner.size == 4 * 4096)
        try owner.truncate(to: 0, ifBusy: .revokeLeases(grace: .milliseconds(50)))
        #expect(owner.size == 0)
        #expect(region.isRevoked)
        expectDAXError(.revoked) { try nic.read(count: 16, from: region, at: 0) }
        #expect(t.fs.statistics().freeBlocks == t.fs.statistics().totalBlocks - 1)
        nic.deregister(region)
        view.unmap()
        #expect(t.fs.statistics().pinsAcquired == t.fs.statistics().pinsReleased)
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
        expectDAXError(.invalidArgument) { _ = try mapping.pin(offset: 2 * 4096, count: 10, access: .readOnly) }
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

    @Test("a pinned page cannot be frozen for migration or copy-on-write (seeds 000-003)")
    func pinnedPagesCannotBeFrozen() throws {
        let t = try TemporaryFileSystem(size: 4 << 20)
        let file = try t.fs.create("/f")
        try file.write(pattern(4096), at: 0)
        let mapping = try file.map(count: 4096)
        let frame = PageFrameNumber(rawValue: mapping.frame(at: 0)!)
        // Mapped once, not pinned: the expected count is the mapping's reference.
        #expect(t.fs.pages.freeze(frame, expectedRefCount: 1))
        expectDAXError(.busy) { _ = try mapping.pin(offset: 0, count: 1) }  // frozen: the pin backs off
        t.fs.pages.unfreeze(frame)
        let pin = try mapping.pin(offset: 0, count: 1)
        #expect(!t.fs.pages.freeze(frame, expectedRefCount: 2))  // an extra reference: refuse (EAGAIN)
        pin.release()
        mapping.unmap()
    }

    @Test("DMA writes by frame land in the file, visible through its mapping and read()")
    func dmaIsZeroCopy() throws {
        let t = try TemporaryFileSystem(size: 4 << 20)
        let file = try t.fs.create("/f")
        try file.truncate(to: 3 * 4096)
        let mapping = try file.map(count: 3 * 4096)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(try mapping.pin(offset: 0, count: 3 * 4096))
        let message = pattern(6000, seed: 3)
        try nic.write(message, to: region, at: 4000)  // across a page boundary
        #expect(try file.read(count: 6000, at: 4000) == message)
        #expect(UnsafeRawBufferPointer(start: mapping.baseAddress + 4000, count: 6000).elementsEqual(message))
        #expect(try nic.read(count: 6000, from: region, at: 4000) == message)
        expectDAXError(.invalidArgument) { try nic.write([1], to: region, at: 3 * 4096) }
        let other = DMAEngine(device: try TemporaryDevice(size: 4 << 20).device)
        expectDAXError(.invalidArgument) { try other.write([1], to: region, at: 0) }
        nic.deregister(region)
        nic.deregister(region)
        expectDAXError(.invalidArgument) { try nic.write([1], to: region, at: 0) }
        #expect(region.isDeregistered && !region.isRevoked)
        mapping.unmap()
    }
}

/// Holds a registration that its lease callback releases, as an RDMA server would.
final class RegionHolder: @unchecked Sendable {
    private let lock = NSLock()
    private(set) var region: DMARegion?
    private var engine: DMAEngine?

    func set(_ region: DMARegion, engine: DMAEngine) {
        lock.withLock {
            self.region = region
            self.engine = engine
        }
    }

    func letGo() {
        let (region, engine) = lock.withLock { (self.region, self.engine) }
        if let region, let engine { engine.deregister(region) }
    }
}

/// A count shared with callbacks.
final class Counter: Sendable {
    private let count = Atomic(0)
    func increment() { count.wrappingAdd(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}
