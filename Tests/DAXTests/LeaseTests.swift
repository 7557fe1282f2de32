import Foundation
import Synchronization
import Testing

@testable import DAX

/// Long-term pins: `.revokeLeases` asks their holders to let go, waits, and revokes only what
/// nothing else holds.
@Suite("Leases: .revokeLeases asks, waits, then revokes", .serialized)
struct LeaseTests {
    @Test("a lease holder who lets go when asked: no revocation, the truncate goes on at once")
    func holderWhoLetsGoIsNotRevoked() throws {
        let t = try TemporaryFileSystem(size: 8 << 20)
        let file = try t.fs.create("/f")
        try file.write(pattern(8 * 4096), at: 0)
        let mapping = try file.map(count: 8 * 4096)
        let nic = DMAEngine(device: t.device)
        let holder = RegionHolder()
        let pin = try mapping.pin(offset: 0, count: 8 * 4096, lifetime: .longTerm(onRevoke: { holder.letGo() }))
        holder.set(nic.register(pin), engine: nic)
        let frames = try file.frames(offset: 0, count: 8 * 4096).map { try #require($0) }
        let pages = t.fs.pages
        let wakeUps = pages.wakeUps
        try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .seconds(20)))
        // At once: the holder let go inside its callback, so the truncate found the pages idle
        // and never slept on one (a sleeper marks the page, and a later decrement wakes it).
        #expect(!pages.hasSleeper(onAnyOf: frames))
        #expect(pages.wakeUps == wakeUps)
        #expect(holder.region?.isDeregistered == true)
        #expect(holder.region?.isRevoked == false)
        #expect(t.fs.statistics().pinsReleased == 8)
        mapping.unmap()
    }

    /// A reader pinning a file it may only read must not hold the owner's truncate hostage (the
    /// question in Matthew Wilcox, "direct_access, pinning and truncation", linux-fsdevel, Oct 2014).
    @Test("a reader's long-term pin cannot block the owner's truncate forever")
    func readerLeaseCannotBlockOwnerTruncate() throws {
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

    @Test("a lease holder may use the file system to let go")
    func leaseHolderMayUseFileSystemToLetGo() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "revokeuse")
        let a = try t.fs.create("/a")
        try a.write(pattern(4 * 4096), at: 0)
        let mapping = try a.map(count: 4 * 4096)
        let lease = PinBox()
        let letGo = DispatchSemaphore(value: 0)
        lease.set(
            try mapping.pin(
                offset: 4096, count: 4096,
                lifetime: .longTerm(onRevoke: {
                    // Let go from another thread that first writes a note to a file.
                    Thread.detachNewThread {
                        if let note = try? t.fs.create("/released") {
                            _ = try? note.write([1], at: 0)
                            note.close()
                        }
                        lease.release()
                        letGo.signal()
                    }
                })))
        try a.truncate(to: 4096, ifBusy: .revokeLeases(grace: .seconds(30)))
        letGo.wait()
        #expect(a.size == 4096)
        #expect(try t.fs.contentsOfDirectory("/") == ["a", "released"])
        mapping.unmap()
    }

    @Test(".revokeLeases that times out on a short-term pin revokes no lease")
    func timedOutRevokeKeepsLeases() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "keeplease")
        let file = try t.fs.create("/f")
        try file.write(pattern(4 * 4096, seed: 3), at: 0)
        let mapping = try file.map(count: 4 * 4096)
        let asked = Atomic(0)
        let engine = DMAEngine(device: t.device)
        let lease = engine.register(
            try mapping.pin(
                offset: 4096, count: 4096, lifetime: .longTerm(onRevoke: { asked.wrappingAdd(1, ordering: .relaxed) })))
        let shortPin = try mapping.pin(offset: 0, count: 4096)
        let framesBefore = try file.frames(offset: 0, count: 4 * 4096)
        let error = expectDAXError(.timedOut) {
            try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .milliseconds(50)))
        }
        // It gave up only after the second grace period, the one for what revoking cannot take.
        #expect(
            error?.message.contains("outlived the grace period; no lease was revoked") == true,
            "\(String(describing: error))")
        #expect(asked.load(ordering: .relaxed) == 1)
        #expect(!lease.isRevoked)
        try engine.write([0xAB], to: lease, at: 0)
        #expect(file.size == 4 * 4096)
        #expect(try file.frames(offset: 0, count: 4 * 4096) == framesBefore)
        var expected = pattern(4 * 4096, seed: 3)
        expected[4096] = 0xAB
        #expect(try file.read(count: 4 * 4096, at: 0) == expected)
        let s = t.fs.statistics()
        #expect(s.pinsAcquired == 2 && s.pinsReleased == 0)
        shortPin.release()
        engine.deregister(lease)
        mapping.unmap()
        #expect(t.fs.statistics().pinsReleased == 2)
    }

    @Test(".revokeLeases revokes as soon as the short-term pins are gone, within the second grace period")
    func revokesOnceShortTermPinGoes() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "laterevoke")
        let file = try t.fs.create("/f")
        try file.write(pattern(4 * 4096), at: 0)
        let mapping = try file.map(count: 4 * 4096)
        let engine = DMAEngine(device: t.device)
        // The lease and the short-term pin share a page, so only the lease's pin is revocable there.
        let lease = engine.register(try mapping.pin(offset: 0, count: 2 * 4096, lifetime: .longTerm(onRevoke: {})))
        let shortPin = PinBox(try mapping.pin(offset: 4096, count: 4096))
        let shared = try #require(try file.frames(offset: 4096, count: 1)[0])
        let pages = t.fs.pages
        let released = Flag()
        let wokeTheTruncate = Flag()
        let finished = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            // In the first grace period the truncate sleeps on page 0, which the lease keeps busy.
            // In the second it waits only for what is not a lease: it passes page 0 and sleeps on
            // page 1, the short-term pin's. Release the pin then.
            spinUntil { pages.hasSleeper(on: shared) }
            let wakeUps = pages.wakeUps
            released.raise()
            shortPin.release()
            if pages.wakeUps > wakeUps { wokeTheTruncate.raise() }
            finished.signal()
        }
        try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .seconds(1)))
        #expect(released.isRaised, "revoked while a short-term pin was held")
        finished.wait()
        // The release woke the second wait, so the truncate went on without waiting it out.
        #expect(wokeTheTruncate.isRaised)
        #expect(lease.isRevoked)
        #expect(file.size == 0)
        expectDAXError(.revoked) { try engine.write([1], to: lease, at: 0) }
        let s = t.fs.statistics()
        #expect(s.pinsAcquired == 3 && s.pinsReleased == 3 && s.pinnedPages == 0)
        engine.deregister(lease)
        #expect(t.fs.statistics().pinsReleased == 3)
        mapping.unmap()
        #expect(try t.fs.check().isClean)
    }

    @Test(".revokeLeases racing a transient reference never revokes and then claims it revoked nothing")
    func revokeRacingTransientReference() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "revoketransient")
        let engine = DMAEngine(device: t.device)
        var inconsistent: [String] = []
        for round in 0..<(longTests ? 2000 : 300) {
            let file = try t.fs.create("/f\(round)")
            try file.write(pattern(4096, seed: round), at: 0)
            let mapping = try file.map(count: 4096)
            let frame = try #require(try file.frames(offset: 0, count: 4096)[0])
            let region = engine.register(try mapping.pin(offset: 0, count: 4096, lifetime: .longTerm(onRevoke: {})))
            let stop = Atomic(false)
            let stopped = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                // Takes and drops a reference over and over, as a pinner backing off would.
                while !stop.load(ordering: .relaxed) {
                    if t.fs.pages.tryGet(frame) { t.fs.pages.put(frame) }
                }
                stopped.signal()
            }
            do {
                try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .zero))
                if !region.isRevoked { inconsistent.append("round \(round): truncated, lease not revoked") }
            } catch let error as DAXError {
                if error.code != .timedOut
                    || (region.isRevoked && !error.message.contains("after the leases were revoked"))
                {
                    inconsistent.append("round \(round): \(error), revoked \(region.isRevoked)")
                }
            }
            stop.store(true, ordering: .relaxed)
            stopped.wait()
            engine.deregister(region)
            mapping.unmap()
            file.close()
            try t.fs.remove("/f\(round)")
        }
        #expect(inconsistent.count == 0, "\(inconsistent.prefix(3))")
        #expect(try t.fs.check().isClean)
        let s = t.fs.statistics()
        #expect(s.pinsAcquired == s.pinsReleased && s.pinnedPages == 0)
    }

    /// A holder that lets go on its own while a truncate looks at the pins: the lease counts as
    /// a lease until its pins are gone, never as a short-term pin that a grace of zero times out on.
    @Test(".revokeLeases(grace: .zero) racing the holder's own release always goes on")
    func revokeRacingHolderRelease() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "revokerelease")
        let engine = DMAEngine(device: t.device)
        let file = try t.fs.create("/f")
        let free = t.fs.statistics().freeBlocks
        var failures: [String] = []
        for round in 0..<(longTests ? 20_000 : 2_000) {
            try file.write(pattern(2 * 4096, seed: round), at: 0)
            let mapping = try file.map(count: 2 * 4096)
            let region = engine.register(
                try mapping.pin(offset: 0, count: 2 * 4096, lifetime: .longTerm(onRevoke: {})))
            mapping.unmap()
            let go = DispatchSemaphore(value: 0)
            let done = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                go.wait()
                engine.deregister(region)
                done.signal()
            }
            go.signal()
            do {
                try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .zero))
            } catch {
                failures.append("round \(round): \(error)")
            }
            done.wait()
            if file.size != 0 { try file.truncate(to: 0) }
        }
        #expect(failures.isEmpty, "\(failures.count) truncates failed; the first: \(failures.first ?? "")")
        #expect(try t.fs.check().isClean)
        let s = t.fs.statistics()
        #expect(s.pinsAcquired == s.pinsReleased && s.pinnedPages == 0)
        #expect(s.freeBlocks == free)
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
