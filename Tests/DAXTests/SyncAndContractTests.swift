import Foundation
import Testing

@testable import DAX

@Suite("sync, and the fault and forking calls this version refuses")
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
            mapping.baseAddress.storeBytes(of: 0xA0A0_0000 + UInt64(page), toByteOffset: page * 4096 + 64, as: UInt64.self)
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

    @Test("no fault handler is claimed; clone, deduplicate and migrate are .unsupported and change nothing")
    func refusedCalls() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "refused")
        guard case .unavailable(let reason) = t.fs.faultHandling else {
            Issue.record("this version has no fault handler, but faultHandling says \(t.fs.faultHandling)")
            return
        }
        #expect(reason.contains("userfaultfd"))
        let file = try t.fs.create("/a")
        try file.write(pattern(8192), at: 0)
        let before = t.fs.statistics()
        expectDAXError(.unsupported) { try t.fs.clone("/a", to: "/b") }
        expectDAXError(.unsupported) { try t.fs.clone("/a", to: "/b", ifPinned: .unsafeShare) }
        expectDAXError(.unsupported) { try t.fs.deduplicate("/a", offset: 0, "/a", offset: 4096, count: 4096) }
        expectDAXError(.unsupported) { try file.migrate(offset: 0, count: 8192) }
        #expect(try t.fs.contentsOfDirectory("/") == ["a"])
        #expect(try file.read(count: 8192, at: 0) == pattern(8192))
        let after = t.fs.statistics()
        #expect(after == before)
        #expect(after.faults == FaultCounts() && after.sharedBlocks == 0)
        #expect(try t.fs.check().isClean)
    }
}
