import Foundation
import Testing

@testable import DAX

@Suite("DMA engine: what a device may touch")
struct DMATests {
    enum Lifetime: CaseIterable { case shortTerm, longTerm }

    @Test("a .readOnly pin lets the engine read but never write the file", arguments: Lifetime.allCases, [true, false])
    func readOnlyPinCannotBeWritten(lifetime: Lifetime, openedReadOnly: Bool) throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "dmaro")
        let owner = try t.fs.create("/public")
        try owner.write(pattern(2 * 4096), at: 0)
        let reader = openedReadOnly ? try t.fs.open("/public", access: .readOnly) : owner
        let mapping = try reader.map(count: 2 * 4096, access: openedReadOnly ? .readOnly : .readWrite)
        let pin = try mapping.pin(
            offset: 0, count: 2 * 4096, access: .readOnly,
            lifetime: lifetime == .shortTerm ? .shortTerm : .longTerm(onRevoke: {}))
        #expect(pin.access == .readOnly)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(pin)
        #expect(region.access == .readOnly)

        let error = expectDAXError(.permissionDenied) { try nic.write([0xEE, 0xEE], to: region, at: 4095) }
        #expect(error?.message.contains("readOnly") == true, "\(String(describing: error))")
        #expect(try owner.read(count: 2 * 4096, at: 0) == pattern(2 * 4096))
        #expect(try nic.read(count: 16, from: region, at: 4090) == Array(pattern(2 * 4096)[4090..<4106]))
        nic.deregister(region)
        #expect(t.fs.statistics().pinnedPages == 0)
    }

    @Test("a revoked read-only region stays .revoked, not .permissionDenied")
    func revokedReadOnlyStaysRevoked() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "dmarorev")
        let owner = try t.fs.create("/public")
        try owner.write(pattern(4096), at: 0)
        let reader = try t.fs.open("/public", access: .readOnly)
        let mapping = try reader.map(count: 4096, access: .readOnly)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(
            try mapping.pin(offset: 0, count: 4096, access: .readOnly, lifetime: .longTerm(onRevoke: {})))
        mapping.unmap()
        try owner.truncate(to: 0, ifBusy: .revokeLeases(grace: .zero))
        #expect(region.isRevoked)
        expectDAXError(.revoked) { try nic.write([1], to: region, at: 0) }
        expectDAXError(.revoked) { try nic.read(count: 1, from: region, at: 0) }
        nic.deregister(region)
    }

    @Test("a pin of another device's pages is never accessed by this device's engine")
    func pinOfAnotherDeviceIsRefused() throws {
        let mine = try TemporaryFileSystem(size: 4 << 20, name: "dmamine")
        let theirs = try TemporaryFileSystem(size: 4 << 20, name: "dmatheirs")
        // The same layout on both: this device's file has the frame numbers of the other's pin.
        let victim = try mine.fs.create("/victim")
        try victim.write(pattern(4096, seed: 3), at: 0)
        let other = try theirs.fs.create("/other")
        try other.write(pattern(4096, seed: 4), at: 0)
        #expect(try victim.frames(offset: 0, count: 4096) == other.frames(offset: 0, count: 4096))

        let mapping = try other.map(count: 4096)
        let nic = DMAEngine(device: mine.device)
        let region = nic.register(try mapping.pin(offset: 0, count: 4096))
        expectDAXError(.invalidArgument) { try nic.write([0xAA], to: region, at: 0) }
        expectDAXError(.invalidArgument) { try nic.read(count: 1, from: region, at: 0) }
        #expect(try victim.read(count: 4096, at: 0) == pattern(4096, seed: 3))
        #expect(try other.read(count: 4096, at: 0) == pattern(4096, seed: 4))
        #expect(theirs.fs.statistics().pinnedPages == 1)
        nic.deregister(region)
        #expect(theirs.fs.statistics().pinnedPages == 0)
        let statistics = theirs.fs.statistics()
        #expect(statistics.pinsAcquired == statistics.pinsReleased)
    }

    @Test("a lease holder handed its LeaseHandle lets go without a reference to its region")
    func leaseHandleReleases() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "leasehandle")
        let file = try t.fs.create("/buffer")
        try file.write(pattern(2 * 4096), at: 0)
        let mapping = try file.map(count: 2 * 4096)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(
            try mapping.pin(offset: 0, count: 2 * 4096, lifetime: .longTerm(releasing: { $0.release() })))
        mapping.unmap()
        try nic.write([1, 2, 3], to: region, at: 0)
        // The grace is long: only the holder letting go at once makes this return now, unrevoked.
        try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .seconds(600)))
        #expect(!region.isRevoked)
        #expect(file.size == 0)
        expectDAXError(.invalidArgument) { try nic.write([9], to: region, at: 0) }
        nic.deregister(region)
        let statistics = t.fs.statistics()
        #expect(statistics.pinnedPages == 0 && statistics.quarantinedBlocks == 0)
        #expect(statistics.pinsAcquired == statistics.pinsReleased)
        #expect(try t.fs.check().isClean)
    }

    @Test("DMA from and into the caller's buffers, across page boundaries, by frame")
    func rawBuffers() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "dmaraw")
        let file = try t.fs.create("/f")
        try file.write(pattern(3 * 4096), at: 0)
        let mapping = try file.map(count: 3 * 4096)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(try mapping.pin(offset: 0, count: 3 * 4096))
        let message = pattern(5000, seed: 9)
        try message.withUnsafeBytes { try nic.write(from: $0, to: region, at: 4000) }
        #expect(try file.read(count: 5000, at: 4000) == message)
        var back = [UInt8](repeating: 0, count: 5000)
        try back.withUnsafeMutableBytes { try nic.read(into: $0, from: region, at: 4000) }
        #expect(back == message)
        var outside = [UInt8](repeating: 7, count: 10)
        expectDAXError(.invalidArgument) {
            try outside.withUnsafeMutableBytes { try nic.read(into: $0, from: region, at: 3 * 4096 - 5) }
        }
        #expect(outside == [UInt8](repeating: 7, count: 10))
        expectDAXError(.invalidArgument) { try nic.read(count: 1 << 40, from: region, at: 0) }
        nic.deregister(region)
        mapping.unmap()
    }

    @Test("DMA writes by frame land in the file, visible through its mapping and read()")
    func dmaByFrameIsZeroCopy() throws {
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
