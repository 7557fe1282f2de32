import Foundation
import Testing

@testable import DAX

@Suite("Shared blocks: clone, copy-on-write, counts on the device")
struct SharedBlockTests {
    @Test("a clone shares every block, uses no data block, and survives a remount with check clean")
    func cloneShares() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "share")
        let source = try t.fs.create("/a")
        try source.write(pattern(5 * 4096 + 100), at: 0)
        let free = t.fs.statistics().freeBlocks
        try t.fs.clone("/a", to: "/b")
        #expect(t.fs.statistics().freeBlocks == free)
        #expect(t.fs.statistics().sharedBlocks == 6)
        let clone = try t.fs.open("/b")
        #expect(try clone.read(count: 6 * 4096, at: 0) == pattern(5 * 4096 + 100))
        #expect(try clone.frames(offset: 0, count: clone.size) == source.frames(offset: 0, count: source.size))
        #expect(try clone.blockReferences(offset: 0, count: clone.size) == [2, 2, 2, 2, 2, 2])
        try expectClean(t.fs)
        source.close()
        clone.close()
        try t.fs.unmount()
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(fs.statistics().sharedBlocks == 6)
        try expectClean(fs)
        try fs.remove("/a")
        #expect(fs.statistics().sharedBlocks == 0)
        #expect(fs.statistics().freeBlocks == free)
        #expect(try fs.open("/b").read(count: 6 * 4096, at: 0) == pattern(5 * 4096 + 100))
        try expectClean(fs)
        try fs.remove("/b")
        #expect(fs.statistics().freeBlocks == free + 6)
        try expectClean(fs)
    }

    @Test("write, truncate and punch copy a shared page first: the other file never changes")
    func copyOnWriteSyscalls() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "cowsys")
        let a = try t.fs.create("/a")
        let bytes = pattern(4 * 4096)
        try a.write(bytes, at: 0)
        try t.fs.clone("/a", to: "/b")
        let b = try t.fs.open("/b")
        try b.write([1, 2, 3], at: 4096 + 10)
        #expect(try a.read(count: bytes.count, at: 0) == bytes)
        var expected = bytes
        expected.replaceSubrange((4096 + 10)..<(4096 + 13), with: [1, 2, 3])
        #expect(try b.read(count: bytes.count, at: 0) == expected)
        #expect(try b.blockReferences(offset: 0, count: b.size) == [2, 1, 2, 2])
        try a.truncate(to: 2 * 4096 + 5)
        #expect(try b.read(count: bytes.count, at: 0) == expected)
        try b.punchHole(offset: 3 * 4096 + 100, count: 50)
        expected.replaceSubrange((3 * 4096 + 100)..<(3 * 4096 + 150), with: [UInt8](repeating: 0, count: 50))
        #expect(try b.read(count: bytes.count, at: 0) == expected)
        #expect(try a.read(count: bytes.count, at: 0) == Array(bytes[..<(2 * 4096 + 5)]))
        try expectClean(t.fs)
    }

    @Test("a store through a mapping of a clone copies the page; the source and its frames stay")
    func copyOnWriteFault() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "cowfault")
        guard t.fs.faultHandling == .userfaultfd else { return }
        let a = try t.fs.create("/a")
        try a.write(pattern(2 * 4096), at: 0)
        let sourceMapping = try a.map(count: 2 * 4096)
        try t.fs.clone("/a", to: "/b")
        let b = try t.fs.open("/b")
        let frames = try a.frames(offset: 0, count: 2 * 4096)
        let mapping = try b.map(count: 2 * 4096)
        mapping.baseAddress.storeBytes(of: 0x77, toByteOffset: 5, as: UInt8.self)
        #expect(try b.read(count: 6, at: 0) == Array(pattern(5)) + [0x77])
        #expect(try a.read(count: 2 * 4096, at: 0) == pattern(2 * 4096))
        #expect(try a.frames(offset: 0, count: 2 * 4096) == frames)
        #expect(try b.frames(offset: 0, count: 4096) != [frames[0]])
        #expect(t.fs.statistics().faults.copyOnWrite == 1)
        // And the other way: the source's own mapping was write-protected by the clone.
        sourceMapping.baseAddress.storeBytes(of: 0x55, toByteOffset: 4096, as: UInt8.self)
        #expect(try b.read(count: 1, at: 4096) == [pattern(2 * 4096)[4096]])
        #expect(try a.read(count: 1, at: 4096) == [0x55])
        #expect(t.fs.statistics().faults.copyOnWrite == 2)
        #expect(t.fs.statistics().sharedBlocks == 0)
        mapping.unmap()
        sourceMapping.unmap()
        try expectClean(t.fs)
    }

    @Test("the NIC writes after a clone: .copy keeps them out of the clone, .unsafeShare leaks them")
    func pinnedClone() throws {
        for policy in [PinnedPagePolicy.copy, .unsafeShare] {
            let t = try TemporaryFileSystem(size: 16 << 20, name: "pinclone")
            let a = try t.fs.create("/a")
            try a.write(pattern(2 * 4096), at: 0)
            let mapping = try a.map(count: 2 * 4096)
            let nic = DMAEngine(device: t.device)
            let region = nic.register(try mapping.pin(offset: 0, count: 4096, access: .readWrite))
            if case .copy = policy {
                #expect(throws: DAXError.self) { try t.fs.clone("/a", to: "/fail", ifPinned: .fail) }
                #expect(throws: DAXError.self) {
                    try t.fs.clone("/a", to: "/wait", ifPinned: .wait(timeout: .milliseconds(10)))
                }
            }
            try t.fs.clone("/a", to: "/b", ifPinned: policy)
            try nic.write([9, 9, 9], to: region, at: 0)
            let b = try t.fs.open("/b")
            #expect(try a.read(count: 3, at: 0) == [9, 9, 9])
            if case .copy = policy {
                #expect(try b.read(count: 3, at: 0) == Array(pattern(3)))
                #expect(try b.blockReferences(offset: 0, count: 2 * 4096) == [1, 2])
            } else {
                #expect(try b.read(count: 3, at: 0) == [9, 9, 9])
            }
            nic.deregister(region)
            mapping.unmap()
            try expectClean(t.fs)
        }
    }

    @Test("a .readWrite pin of a shared page unshares it first")
    func pinUnshares() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "pinunshare")
        let a = try t.fs.create("/a")
        try a.write(pattern(4096), at: 0)
        try t.fs.clone("/a", to: "/b")
        let b = try t.fs.open("/b")
        let mapping = try b.map(count: 4096)
        let nic = DMAEngine(device: t.device)
        let region = nic.register(try mapping.pin(offset: 0, count: 4096, access: .readWrite))
        #expect(try b.blockReferences(offset: 0, count: 4096) == [1])
        try nic.write([7], to: region, at: 0)
        #expect(try a.read(count: 1, at: 0) == [pattern(1)[0]])
        #expect(try b.read(count: 1, at: 0) == [7])
        nic.deregister(region)
        mapping.unmap()
        try expectClean(t.fs)
    }

    @Test("a snapshot of a tree: later changes on either side stay there")
    func snapshot() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "snap")
        try t.fs.createDirectory("/d")
        try t.fs.createDirectory("/d/e")
        for index in 0..<20 { try t.fs.create("/d/f\(index)").write(pattern(4096 + index, seed: index), at: 0) }
        try t.fs.create("/d/e/g").write(pattern(9000), at: 0)
        try t.fs.clone("/d", to: "/s")
        #expect(try t.fs.contentsOfDirectory("/s").count == 21)
        try t.fs.open("/d/e/g").write([1], at: 0)
        #expect(try t.fs.open("/s/e/g").read(count: 9000, at: 0) == pattern(9000))
        #expect(try t.fs.open("/s/f3").read(count: 5000, at: 0) == pattern(4099, seed: 3))
        #expect(throws: DAXError.self) { try t.fs.clone("/d", to: "/d/e/inside") }
        #expect(throws: DAXError.self) { try t.fs.clone("/d", to: "/s") }
        #expect(throws: DAXError.self) { try t.fs.clone("/nothing", to: "/x") }
        try expectClean(t.fs)
        try t.fs.unmount()
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        try expectClean(fs)
    }
}

/// `check` is clean, or the test says what it found.
func expectClean(_ fs: DAXFileSystem, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let report = try fs.check()
    #expect(report.isClean, "\(report)", sourceLocation: sourceLocation)
}

@Suite("Shared blocks: deduplicate")
struct DeduplicateTests {
    @Test("equal pages come to share, unequal and pinned ones stay; bad ranges change nothing")
    func deduplicate() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "dedup")
        let a = try t.fs.create("/a")
        let b = try t.fs.create("/b")
        var bytes = pattern(4 * 4096)
        try a.write(bytes, at: 0)
        bytes[2 * 4096] ^= 0xFF
        try b.write(bytes, at: 0)
        let mapping = try b.map(count: 4 * 4096)
        let pin = try mapping.pin(offset: 3 * 4096, count: 4096, access: .readOnly)
        let free = t.fs.statistics().freeBlocks
        let framesA = try a.frames(offset: 0, count: 4 * 4096)
        let framesB = try b.frames(offset: 0, count: 4 * 4096)
        #expect(try t.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 4 * 4096) == 2 * 4096)
        #expect(try b.frames(offset: 0, count: 4 * 4096) == [framesA[0], framesA[1], framesB[2], framesB[3]])
        #expect(t.fs.statistics().freeBlocks == free + 2)
        #expect(t.fs.statistics().sharedBlocks == 2)
        #expect(try b.read(count: 4 * 4096, at: 0) == bytes)
        // The mapping shows the shared block, write-protected: a store copies it back out.
        #expect(mapping.baseAddress.load(fromByteOffset: 10, as: UInt8.self) == bytes[10])
        if t.fs.faultHandling == .userfaultfd {
            mapping.baseAddress.storeBytes(of: 0xAB, toByteOffset: 10, as: UInt8.self)
            #expect(try a.read(count: 1, at: 10) == [bytes[10]])
            #expect(try b.read(count: 1, at: 10) == [0xAB])
        }
        pin.release()
        expectDAXError(.invalidArgument) { _ = try t.fs.deduplicate("/a", offset: 100, "/b", offset: 0, count: 4096) }
        expectDAXError(.invalidArgument) { _ = try t.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 5 * 4096) }
        expectDAXError(.notFound) { _ = try t.fs.deduplicate("/nothing", offset: 0, "/b", offset: 0, count: 4096) }
        mapping.unmap()
        try expectClean(t.fs)
    }
}

/// Changes the first leaf of the shared-block table of `t`'s unmounted device with `change`, then
/// makes its checksum right again, so that only the change is wrong.
private func rewriteFirstLeaf(_ t: TemporaryFileSystem, _ change: (inout [UInt8]) -> Void) throws {
    let root = Int(t.fs.superblock.sharedTableRoot!) * 4096
    var leaf = try t.device.read(count: 4096, at: root)
    change(&leaf)
    let crc = CRC32C.checksum(leaf[8...])
    withUnsafeBytes(of: crc.littleEndian) { leaf.replaceSubrange(4..<8, with: $0) }
    try t.device.write(leaf, at: root)
}

@Suite("Shared blocks: check and repair")
struct SharedBlockRepairTests {
    @Test("a wrong count in the shared-block table is found by check, and repair rebuilds it keeping both files")
    func wrongCount() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "sharerepair")
        try t.fs.create("/a").write(pattern(3 * 4096), at: 0)
        try t.fs.clone("/a", to: "/b")
        try t.fs.unmount()
        // The first run's count (offset 32 + 12), then the leaf's checksum made right again, so
        // only the count is wrong.
        try rewriteFirstLeaf(t) { leaf in
            #expect(leaf[44] == 2)
            leaf[44] = 3
        }
        let report = try DAXFileSystem.check(t.device)
        #expect(!report.isClean)
        #expect(report.problems.contains { $0.contains("shared-block table counts 3 references") }, "\(report)")
        let repaired = try DAXFileSystem.repair(t.device)
        #expect(repaired.actions.contains { $0.contains("shared-block table") }, "\(repaired.actions)")
        #expect(try DAXFileSystem.check(t.device).isClean)
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.open("/a").read(count: 3 * 4096, at: 0) == pattern(3 * 4096))
        #expect(try fs.open("/b").read(count: 3 * 4096, at: 0) == pattern(3 * 4096))
        #expect(fs.statistics().sharedBlocks == 3)
    }

    /// A fuzzer's find: naming the run in the error that refused it computed its end, which
    /// overflowed, and every command trapped on such a device, `fsck --repair` included.
    @Test("a shared run whose start is near 2^64 is reported by check and repaired, not a trap")
    func runStartNearTheTopOfUInt64() async throws {
        await #expect(processExitsWith: .success) {
            let t = try TemporaryFileSystem(size: 16 << 20, name: "sharetop")
            try t.fs.create("/a").write(pattern(3 * 4096), at: 0)
            try t.fs.clone("/a", to: "/b")
            try t.fs.unmount()
            try rewriteFirstLeaf(t) { leaf in
                withUnsafeBytes(of: UInt64.max.littleEndian) { leaf.replaceSubrange(32..<40, with: $0) }
            }
            let report = try DAXFileSystem.check(t.device)
            guard !report.isClean, report.problems.contains(where: { $0.contains("18446744073709551615") }) else {
                exit(2)
            }
            _ = try DAXFileSystem.repair(t.device)
            guard try DAXFileSystem.check(t.device).isClean else { exit(3) }
            let fs = try DAXFileSystem.mount(t.device)
            guard try fs.open("/a").read(count: 3 * 4096, at: 0) == pattern(3 * 4096),
                try fs.open("/b").read(count: 3 * 4096, at: 0) == pattern(3 * 4096)
            else { exit(4) }
            try fs.unmount()
        }
    }
}
