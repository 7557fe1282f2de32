import DAXTorture
import Foundation
import Synchronization
import Testing

@testable import DAX

// Black-box tests of forking: reflink clones, snapshots, copy-on-write, dedup and migration, and
// how each meets a device that holds a page by frame. Written from the public contract and
// docs/forking.md only.

let pageBytes = PMemDevice.pageSize

/// The clone policies the NIC story is played under.
enum ClonePolicyCase: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case copy, fail, wait, unsafeShare

    var policy: PinnedPagePolicy {
        switch self {
        case .copy: .copy
        case .fail: .fail
        case .wait: .wait(timeout: .milliseconds(100))
        case .unsafeShare: .unsafeShare
        }
    }

    var testDescription: String { rawValue }
}

/// Which of two files sharing blocks a test changes.
enum Side: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case source, clone

    var testDescription: String { rawValue }
}

/// Returns once `fact` holds, or records an issue and returns false after `limit`: a guard
/// against a hang, never a way to order threads (the fact does that).
@discardableResult
func spinUntil(
    _ what: String, giveUpAfter limit: Duration = .seconds(30), sourceLocation: SourceLocation = #_sourceLocation,
    _ fact: () -> Bool
) -> Bool {
    let deadline = ContinuousClock.now + limit
    while !fact() {
        if ContinuousClock.now > deadline {
            Issue.record("gave up waiting for \(what)", sourceLocation: sourceLocation)
            return false
        }
        sched_yield()
    }
    return true
}

extension DAXFile {
    /// The frames behind the first `pages` pages.
    func frames(pages: Int) throws -> [PageFrameNumber?] { try frames(offset: 0, count: pages * pageBytes) }

    /// The block references behind the first `pages` pages.
    func references(pages: Int) throws -> [Int] { try blockReferences(offset: 0, count: pages * pageBytes) }

    /// The whole file.
    func contents() throws -> [UInt8] { try read(count: size, at: 0) }
}

extension DAXMapping {
    /// The bytes of the mapping, loaded through it.
    func loaded(offset: Int = 0, count: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: baseAddress + offset, count: count))
    }

    /// Stores `bytes` through the mapping at `offset`.
    func store(_ bytes: [UInt8], at offset: Int) {
        bytes.withUnsafeBytes { (baseAddress + offset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }
}

/// `bytes` with `replacement` put in at `offset`.
func replacing(_ bytes: [UInt8], at offset: Int, with replacement: [UInt8]) -> [UInt8] {
    var result = bytes
    result.replaceSubrange(offset..<(offset + replacement.count), with: replacement)
    return result
}

/// Every directory (value nil) and file (its bytes) under `root`, by path relative to it.
func subtree(_ fs: DAXFileSystem, under root: String) throws -> [String: [UInt8]?] {
    var result: [String: [UInt8]?] = [:]
    var pending = [root]
    while let directory = pending.popLast() {
        for name in try fs.contentsOfDirectory(directory) {
            let path = directory + "/" + name
            let relative = String(path.dropFirst(root.count))
            do {
                let file = try fs.open(path, access: .readOnly)
                defer { file.close() }
                result[relative] = .some(try file.contents())
            } catch let error as DAXError where error.code == .isADirectory {
                result[relative] = .some(nil)
                pending.append(path)
            }
        }
    }
    return result
}

@Suite("Forking: copy-on-write, clones, snapshots, dedup")
struct ForkingTests {
    @Test(
        "write, allocate, punchHole and truncate copy a shared page first; the other file never changes",
        arguments: Side.allCases)
    func copyOnWriteByFileCalls(changing side: Side) throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "cowcalls")
        let fs = t.fs
        let data = pattern(4 * pageBytes, seed: 11)
        let source = try fs.create("/a")
        try source.write(data, at: 0)
        let original = try source.frames(pages: 4)
        let freeBeforeClone = fs.statistics().freeBlocks
        try fs.clone("/a", to: "/b")
        let clone = try fs.open("/b")
        #expect(freeBeforeClone - fs.statistics().freeBlocks <= 1, "a clone of 4 blocks used data blocks")
        #expect(try clone.frames(pages: 4) == original)
        #expect(try source.references(pages: 4) == [2, 2, 2, 2])
        #expect(fs.statistics().sharedBlocks == 4)
        let (changed, other) = side == .source ? (source, clone) : (clone, source)
        var expected = data
        var free = fs.statistics().freeBlocks

        func verify(
            _ step: String, references: [Int], otherReferences: [Int], shared: Int, newBlocks: Int,
            sourceLocation: SourceLocation = #_sourceLocation
        ) throws {
            #expect(try changed.contents() == expected, "\(step): the changed file", sourceLocation: sourceLocation)
            #expect(try other.contents() == data, "\(step): the other file changed", sourceLocation: sourceLocation)
            #expect(
                try other.frames(pages: 4) == original, "\(step): the other file's frames",
                sourceLocation: sourceLocation)
            let pages = (changed.size + pageBytes - 1) / pageBytes
            #expect(try changed.references(pages: pages) == references, "\(step)", sourceLocation: sourceLocation)
            #expect(try other.references(pages: 4) == otherReferences, "\(step)", sourceLocation: sourceLocation)
            let statistics = fs.statistics()
            #expect(statistics.sharedBlocks == shared, "\(step): sharedBlocks", sourceLocation: sourceLocation)
            #expect(free - statistics.freeBlocks == newBlocks, "\(step): blocks used", sourceLocation: sourceLocation)
            free = statistics.freeBlocks
            let report = try fs.check()
            #expect(report.isClean, "\(step): \(report)", sourceLocation: sourceLocation)
        }

        let bytes = [UInt8](repeating: 0x77, count: 10)
        try changed.write(bytes, at: pageBytes + 100)
        expected = replacing(expected, at: pageBytes + 100, with: bytes)
        try verify("write", references: [2, 1, 2, 2], otherReferences: [2, 1, 2, 2], shared: 3, newBlocks: 1)
        #expect(try changed.frames(pages: 4)[1] != original[1])

        try changed.allocate(offset: 0, count: 4 * pageBytes)
        try verify("allocate", references: [2, 1, 2, 2], otherReferences: [2, 1, 2, 2], shared: 3, newBlocks: 0)

        try changed.punchHole(offset: 2 * pageBytes + 10, count: 20)
        expected = replacing(expected, at: 2 * pageBytes + 10, with: [UInt8](repeating: 0, count: 20))
        try verify(
            "punch inside a page", references: [2, 1, 1, 2], otherReferences: [2, 1, 1, 2], shared: 2, newBlocks: 1)

        try changed.punchHole(offset: 3 * pageBytes, count: pageBytes)
        expected = replacing(expected, at: 3 * pageBytes, with: [UInt8](repeating: 0, count: pageBytes))
        try verify(
            "punch a whole page", references: [2, 1, 1, 0], otherReferences: [2, 1, 1, 1], shared: 1, newBlocks: 0)
        #expect(try changed.frames(pages: 4)[3] == nil)

        // Down to a partial shared page: it is copied (its tail must read zeros later), the
        // changed file's own copies of pages 1 and 2 are freed.
        try changed.truncate(to: 100)
        expected = Array(expected[..<100])
        try verify("truncate", references: [1], otherReferences: [1, 1, 1, 1], shared: 0, newBlocks: -1)
        #expect(try changed.frames(pages: 1)[0] != original[0])

        try changed.truncate(to: 4 * pageBytes)
        expected += [UInt8](repeating: 0, count: 4 * pageBytes - 100)
        try verify("truncate up", references: [1, 0, 0, 0], otherReferences: [1, 1, 1, 1], shared: 0, newBlocks: 0)

        let remounted = try t.remount()
        defer { try? remounted.unmount() }
        let changedPath = side == .source ? "/a" : "/b"
        let otherPath = side == .source ? "/b" : "/a"
        #expect(try remounted.open(changedPath).contents() == expected)
        #expect(try remounted.open(otherPath).contents() == data)
        #expect(try remounted.check().isClean)
    }

    @Test(
        "a clone of 256 blocks uses no data blocks; remount keeps the sharing; removing one frees nothing shared",
        arguments: Side.allCases)
    func cloneSharesAndRemoveKeepsTheOther(removing side: Side) throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "clonecount")
        let freeEmpty = t.fs.statistics().freeBlocks
        let data = pattern(256 * pageBytes, seed: 12)
        let source = try t.fs.create("/a")
        try source.write(data, at: 0)
        let frames = try source.frames(pages: 256)
        let freeBefore = t.fs.statistics().freeBlocks
        try t.fs.clone("/a", to: "/b")
        let used = freeBefore - t.fs.statistics().freeBlocks
        #expect(used >= 0 && used <= 2, "a clone of 256 blocks used \(used) blocks")
        #expect(t.fs.statistics().sharedBlocks == 256)
        source.close()

        let fs = try t.remount()
        defer { try? fs.unmount() }
        #expect(fs.statistics().sharedBlocks == 256)
        let a = try fs.open("/a")
        let b = try fs.open("/b")
        #expect(try a.frames(pages: 256) == frames && b.frames(pages: 256) == frames)
        #expect(try a.references(pages: 256) == [Int](repeating: 2, count: 256))
        #expect(try b.contents() == data)
        #expect(try fs.check().isClean)

        let (removed, kept) = side == .source ? ("/a", b) : ("/b", a)
        (side == .source ? a : b).close()
        let freeShared = fs.statistics().freeBlocks
        try fs.remove(removed)
        let freed = fs.statistics().freeBlocks - freeShared
        #expect(freed >= 0 && freed <= 2, "removing one of two sharing files freed \(freed) blocks")
        #expect(fs.statistics().sharedBlocks == 0)
        #expect(try kept.contents() == data)
        #expect(try kept.frames(pages: 256) == frames)
        #expect(try kept.references(pages: 256) == [Int](repeating: 1, count: 256))
        #expect(frames.allSatisfy { fs.pages.state(of: $0!).isAllocated })
        #expect(try fs.check().isClean)
        kept.close()
        try fs.remove(side == .source ? "/b" : "/a")
        // Every data block is back; the shared-block table may keep its (empty) leaf.
        let leftOver = freeEmpty - fs.statistics().freeBlocks
        #expect(leftOver >= 0 && leftOver <= 1, "\(leftOver) blocks not returned")
        #expect(try fs.check().isClean)
    }

    @Test("a store through the source's mapping made before the clone copies; the clone keeps its bytes")
    func storeThroughExistingMappingAfterClone() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "cowmap")
        let fs = t.fs
        let data = pattern(3 * pageBytes, seed: 13)
        let source = try fs.create("/a")
        try source.write(data, at: 0)
        let mapping = try source.map(count: data.count)
        #expect(mapping.loaded(count: data.count) == data)
        mapping.store([1, 2, 3], at: 0)
        let atClone = replacing(data, at: 0, with: [1, 2, 3])
        try fs.clone("/a", to: "/b")
        let clone = try fs.open("/b")
        let cloneMapping = try clone.map(count: data.count, access: .readOnly)
        let copies = fs.statistics().faults.copyOnWrite
        mapping.store([9, 9], at: pageBytes + 5)
        let afterStore = replacing(atClone, at: pageBytes + 5, with: [9, 9])
        #expect(try source.contents() == afterStore)
        #expect(try clone.contents() == atClone)
        #expect(cloneMapping.loaded(count: data.count) == atClone)
        #expect(mapping.loaded(count: data.count) == afterStore)
        if fs.faultHandling == .userfaultfd {
            #expect(fs.statistics().faults.copyOnWrite - copies == 1)
        }
        let sourceFrames = try source.frames(pages: 3)
        #expect(mapping.frame(at: 1) == sourceFrames[1]?.rawValue)
        #expect(try sourceFrames[1] != clone.frames(pages: 3)[1])
        #expect(try source.references(pages: 3) == [2, 1, 2])
        mapping.unmap()
        cloneMapping.unmap()
        #expect(try fs.check().isClean)
    }

    /// What Linux 6.1 does on xfs with `dax=always` (the kernel oracle's reflink scenario): after
    /// `FICLONE` of a 2-page file filled with 0x21, both files have 2 blocks and read 0x21; a store
    /// of 0x42 through a shared mapping of the clone changes the clone only, and a store of 0x43
    /// through one of the source changes the source only, each mapping of the other file still
    /// loading 0x21.
    @Test("the kernel's reflink story on xfs with dax=always: stores through either file's mapping stay in it")
    func kernelReflinkStory() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "oraclej")
        let fs = t.fs
        let source = try fs.create("/j-src")
        try source.write([UInt8](repeating: 0x21, count: 2 * pageBytes), at: 0)
        try source.sync()
        let freeBefore = fs.statistics().freeBlocks
        try fs.clone("/j-src", to: "/j-dst")
        let clone = try fs.open("/j-dst")
        #expect(clone.size == 2 * pageBytes)
        #expect(try clone.read(count: 1, at: 0) == [0x21])
        #expect(try source.references(pages: 2) == [2, 2] && clone.references(pages: 2) == [2, 2])
        let used = freeBefore - fs.statistics().freeBlocks
        #expect(used >= 0 && used <= 1, "the clone of 2 blocks took \(used)")

        let cloneMapping = try clone.map(count: 2 * pageBytes)
        let sourceMapping = try source.map(count: 2 * pageBytes)
        #expect(cloneMapping.loaded(count: 1) == [0x21] && sourceMapping.loaded(count: 1) == [0x21])
        cloneMapping.store([0x42], at: 0)
        #expect(try clone.read(count: 1, at: 0) == [0x42])
        #expect(try source.read(count: 1, at: 0) == [0x21])
        #expect(sourceMapping.loaded(count: 1) == [0x21])
        sourceMapping.store([0x43], at: pageBytes)
        #expect(try source.read(count: 1, at: pageBytes) == [0x43])
        #expect(try clone.read(count: 1, at: pageBytes) == [0x21])
        #expect(cloneMapping.loaded(offset: pageBytes, count: 1) == [0x21])
        // Each store copied its page: nothing is shared any more, each file has its 2 blocks.
        #expect(try source.references(pages: 2) == [1, 1] && clone.references(pages: 2) == [1, 1])
        #expect(fs.statistics().sharedBlocks == 0)
        cloneMapping.unmap()
        sourceMapping.unmap()
        #expect(try fs.check().isClean)
    }

    enum PinKind: String, CaseIterable, CustomTestStringConvertible, Sendable {
        case shortTermRead, shortTermWrite, longTermRead, longTermWrite
        var access: Access { self == .shortTermRead || self == .longTermRead ? .readOnly : .readWrite }
        var lifetime: PinLifetime {
            self == .shortTermRead || self == .shortTermWrite ? .shortTerm : .longTerm(onRevoke: {})
        }
        /// A device may write through the pin, or hold it indefinitely: the page must be private.
        var unshares: Bool { self != .shortTermRead }
        var testDescription: String { rawValue }
    }

    @Test("a .readWrite pin and every long-term pin of a shared page unshare it first", arguments: PinKind.allCases)
    func pinsUnshare(kind: PinKind) throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "pinunshare")
        let fs = t.fs
        let data = pattern(2 * pageBytes, seed: 14)
        let source = try fs.create("/a")
        try source.write(data, at: 0)
        try fs.clone("/a", to: "/b")
        let clone = try fs.open("/b")
        let shared = try clone.frames(pages: 2)
        let mapping = try source.map(count: data.count)
        let pin = try mapping.pin(offset: 0, count: pageBytes, access: kind.access, lifetime: kind.lifetime)
        let frame = pin.frames[0]
        // One page pinned once, however the pin got a private page.
        #expect(fs.statistics().pinsAcquired == 1)
        #expect(fs.statistics().pinnedPages == 1)
        if kind.unshares {
            #expect(frame != shared[0])
            #expect(try source.frames(pages: 1)[0] == frame)
            #expect(try source.references(pages: 2) == [1, 2])
            #expect(fs.statistics().sharedBlocks == 1)
        } else {
            #expect(frame == shared[0])
            #expect(try source.references(pages: 2) == [2, 2])
        }
        #expect(try clone.frames(pages: 2) == shared)
        #expect(try source.contents() == data && clone.contents() == data)
        if kind.access == .readWrite {
            let nic = DMAEngine(device: t.device)
            let region = nic.register(pin)
            try nic.write([0xEE, 0xEE], to: region, at: 50)
            #expect(try source.contents() == replacing(data, at: 50, with: [0xEE, 0xEE]))
            #expect(try clone.contents() == data, "a device's write by frame reached the other file")
            nic.deregister(region)
        } else {
            pin.release()
        }
        mapping.unmap()
        #expect(fs.statistics().pinnedPages == 0)
        #expect(try fs.check().isClean)
    }

    @Test("a file with holes clones with its holes; an empty file clones empty")
    func cloneHolesAndEmpty() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "cloneholes")
        let fs = t.fs
        let sparse = try fs.create("/sparse")
        try sparse.write([1, 2, 3], at: 5 * pageBytes + 1)
        try sparse.write([4], at: pageBytes)
        _ = try fs.create("/empty")
        try fs.clone("/sparse", to: "/sparse2")
        try fs.clone("/empty", to: "/empty2")
        let clone = try fs.open("/sparse2")
        #expect(clone.size == sparse.size)
        #expect(try clone.contents() == sparse.contents())
        #expect(try clone.references(pages: 6) == [0, 2, 0, 0, 0, 2])
        #expect(try clone.frames(pages: 6).map { $0 == nil } == [true, false, true, true, true, false])
        #expect(try fs.open("/empty2").size == 0)
        #expect(fs.statistics().sharedBlocks == 2)
        // A write into a hole of the clone is an allocation, not a copy.
        try clone.write([7], at: 0)
        #expect(try sparse.read(count: 1, at: 0) == [0])
        #expect(fs.statistics().sharedBlocks == 2)
        #expect(try fs.check().isClean)
    }

    @Test("a snapshot of a directory tree: later changes to either side do not show in the other")
    func snapshot() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "snapshot")
        let fs = t.fs
        try fs.createDirectory("/data")
        try fs.createDirectory("/data/sub")
        try fs.createDirectory("/data/sub/deeper")
        try fs.createDirectory("/data/emptydir")
        try fs.create("/data/a").write(pattern(3 * pageBytes, seed: 15), at: 0)
        try fs.create("/data/sub/b").write(pattern(5000, seed: 16), at: 0)
        _ = try fs.create("/data/sub/deeper/c")
        try fs.create("/data/sparse").write([5, 6], at: 4 * pageBytes)
        let original = try subtree(fs, under: "/data")
        #expect(original.count == 7)

        try fs.clone("/data", to: "/snap")
        #expect(try fs.contentsOfDirectory("/") == ["data", "snap"])
        #expect(try subtree(fs, under: "/snap") == original)
        for path in ["/a", "/sub/b", "/sparse"] {
            let size = try fs.open("/data" + path).size
            #expect(
                try fs.open("/snap" + path).frames(offset: 0, count: size)
                    == fs.open("/data" + path).frames(offset: 0, count: size))
        }
        #expect(fs.statistics().sharedBlocks == 3 + 2 + 1)
        #expect(try fs.check().isClean)

        // Changes to the original.
        try fs.open("/data/a").write([0xFF], at: 10)
        try fs.create("/data/new").write([1], at: 0)
        try fs.remove("/data/sub/b")
        try fs.rename("/data/sub/deeper/c", to: "/data/c2")
        try fs.open("/data/sparse").truncate(to: 0)
        try fs.createDirectory("/data/emptydir/inner")
        let changedData = try subtree(fs, under: "/data")
        #expect(changedData != original)
        #expect(try subtree(fs, under: "/snap") == original, "a change to the original showed in the snapshot")

        // Changes to the snapshot.
        try fs.open("/snap/sub/b").write([0xEE], at: 4999)
        try fs.createDirectory("/snap/extra")
        try fs.remove("/snap/a")
        let mapping = try fs.open("/snap/sparse").map(count: 4 * pageBytes + 2)
        mapping.store([0xDD], at: 4 * pageBytes)
        mapping.unmap()
        var expectedSnap = original
        expectedSnap["/sub/b"] = .some(replacing(pattern(5000, seed: 16), at: 4999, with: [0xEE]))
        expectedSnap["/extra"] = .some(nil)
        expectedSnap["/a"] = nil
        var sparse = [UInt8](repeating: 0, count: 4 * pageBytes + 2)
        sparse[4 * pageBytes] = 0xDD
        sparse[4 * pageBytes + 1] = 6
        expectedSnap["/sparse"] = .some(sparse)
        #expect(try subtree(fs, under: "/snap") == expectedSnap)
        #expect(try subtree(fs, under: "/data") == changedData, "a change to the snapshot showed in the original")
        #expect(try fs.check().isClean)

        let remounted = try t.remount()
        defer { try? remounted.unmount() }
        #expect(try subtree(remounted, under: "/snap") == expectedSnap)
        #expect(try subtree(remounted, under: "/data") == changedData)
        #expect(try remounted.check().isClean)
    }

    @Test("clone: an existing destination, a missing source or parent change nothing")
    func cloneBadInput() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "clonebad")
        let fs = t.fs
        let source = try fs.create("/src")
        try source.write(pattern(2 * pageBytes, seed: 17), at: 0)
        let other = try fs.create("/other")
        try other.write(pattern(pageBytes, seed: 18), at: 0)
        try fs.createDirectory("/dir")
        let otherFrames = try other.frames(pages: 1)
        let free = fs.statistics().freeBlocks

        expectDAXError(.alreadyExists) { try fs.clone("/src", to: "/other") }
        expectDAXError(.alreadyExists) { try fs.clone("/src", to: "/dir") }
        expectDAXError(.alreadyExists) { try fs.clone("/src", to: "/src") }
        expectDAXError(.alreadyExists) { try fs.clone("/dir", to: "/other") }
        expectDAXError(.notFound) { try fs.clone("/missing", to: "/new") }
        expectDAXError(.notFound) { try fs.clone("/src", to: "/nodir/new") }
        expectDAXError(.notADirectory) { try fs.clone("/src", to: "/other/new") }

        #expect(try fs.contentsOfDirectory("/") == ["dir", "other", "src"])
        #expect(try fs.contentsOfDirectory("/dir").isEmpty)
        #expect(try other.contents() == pattern(pageBytes, seed: 18))
        #expect(try other.frames(pages: 1) == otherFrames)
        #expect(try source.contents() == pattern(2 * pageBytes, seed: 17))
        #expect(try source.references(pages: 2) == [1, 1])
        #expect(fs.statistics().sharedBlocks == 0)
        #expect(fs.statistics().freeBlocks == free)
        #expect(try fs.check().isClean)
    }

    @Test("a read-only mount refuses clone and dedup")
    func readOnlyMountRefuses() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "clonero")
        try t.fs.create("/a").write(pattern(pageBytes), at: 0)
        try t.fs.create("/b").write(pattern(pageBytes), at: 0)
        try t.fs.unmount()
        let fs = try DAXFileSystem.mount(t.device, access: .readOnly)
        defer { try? fs.unmount() }
        expectDAXError(.permissionDenied) { try fs.clone("/a", to: "/c") }
        expectDAXError(.permissionDenied) { try fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: pageBytes) }
        #expect(try fs.contentsOfDirectory("/") == ["a", "b"])
        #expect(fs.statistics().sharedBlocks == 0)
    }

    @Test("dedup shares equal pages, leaves unequal ones, and the sharing is copy-on-write")
    func deduplicate() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "dedup")
        let fs = t.fs
        let data = pattern(4 * pageBytes + 100, seed: 19)
        let a = try fs.create("/a")
        try a.write(data, at: 0)
        var differing = data
        differing[2 * pageBytes + 7] ^= 0xFF
        let b = try fs.create("/b")
        try b.write(differing, at: 0)
        let c = try fs.create("/c")
        try c.write(Array(data[pageBytes..<(2 * pageBytes)]), at: 0)
        let aFrames = try a.frames(pages: 5)
        let bFrames = try b.frames(pages: 5)
        let free = fs.statistics().freeBlocks

        // Pages 0, 1 and 3 are equal; 2 differs; 4 is a partial page at the end of both files,
        // equal: shared too, and counted to the end of the files, as FIDEDUPERANGE does.
        let shared = try fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: data.count)
        #expect(shared == 3 * pageBytes + 100)
        let bAfter = try b.frames(pages: 5)
        #expect([bAfter[0], bAfter[1], bAfter[3], bAfter[4]] == [aFrames[0], aFrames[1], aFrames[3], aFrames[4]])
        #expect(bAfter[2] == bFrames[2])
        #expect(try a.frames(pages: 5) == aFrames)
        #expect(try b.references(pages: 5) == [2, 2, 1, 2, 2])
        #expect(fs.statistics().sharedBlocks == 4)
        #expect(fs.statistics().freeBlocks == free + 4)
        #expect(try a.contents() == data && b.contents() == differing)
        // Growing either file over the shared tail copies it first; the other keeps its bytes.
        try b.truncate(to: data.count + 50)
        #expect(try b.contents() == differing + [UInt8](repeating: 0, count: 50))
        #expect(try a.contents() == data)
        #expect(try b.references(pages: 5) == [2, 2, 1, 2, 1])
        try b.truncate(to: data.count)
        #expect(try fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: data.count) == 3 * pageBytes + 100)

        // A range that stops short of a file's end is taken down to whole pages.
        let d = try fs.create("/d")
        try d.write(data + [1, 2, 3], at: 0)
        #expect(try fs.deduplicate("/a", offset: 0, "/d", offset: 0, count: data.count) == 4 * pageBytes)
        #expect(try d.references(pages: 5) == [3, 3, 2, 3, 1])
        d.close()
        try fs.remove("/d")
        #expect(try a.references(pages: 5) == [2, 2, 1, 2, 2])

        // At different offsets: /c's only page equals /a's page 1.
        #expect(try fs.deduplicate("/a", offset: pageBytes, "/c", offset: 0, count: pageBytes) == pageBytes)
        #expect(try c.frames(pages: 1)[0] == aFrames[1])
        #expect(try a.references(pages: 2) == [2, 3])
        #expect(fs.statistics().sharedBlocks == 4)
        #expect(fs.statistics().freeBlocks == free + 5)

        // Copy-on-write from then on.
        try b.write([0x11], at: pageBytes)
        #expect(try a.contents() == data)
        #expect(try c.contents() == Array(data[pageBytes..<(2 * pageBytes)]))
        #expect(try a.references(pages: 2) == [2, 2])
        #expect(try fs.check().isClean)

        let remounted = try t.remount()
        defer { try? remounted.unmount() }
        #expect(try remounted.open("/a").references(pages: 5) == [2, 2, 1, 2, 2])
        #expect(try remounted.open("/c").frames(pages: 1)[0] == aFrames[1])
        #expect(try remounted.check().isClean)
    }

    @Test("dedup with bad ranges or paths throws and changes nothing")
    func deduplicateBadInput() throws {
        let t = try TemporaryFileSystem(size: 16 << 20, name: "dedupbad")
        let fs = t.fs
        let data = pattern(4 * pageBytes, seed: 20)
        let a = try fs.create("/a")
        try a.write(data, at: 0)
        let b = try fs.create("/b")
        try b.write(data, at: 0)
        try fs.createDirectory("/dir")
        let aFrames = try a.frames(pages: 4)
        let bFrames = try b.frames(pages: 4)
        let free = fs.statistics().freeBlocks

        let invalid: [(String, Int, Int, Int)] = [
            ("negative source offset", -pageBytes, 0, pageBytes),
            ("negative destination offset", 0, -pageBytes, pageBytes),
            ("negative count", 0, 0, -pageBytes),
            ("source offset past the end", 5 * pageBytes, 0, pageBytes),
            ("destination offset past the end", 0, 5 * pageBytes, pageBytes),
            ("source range past the end", 2 * pageBytes, 0, 3 * pageBytes),
            ("destination range past the end", 0, 2 * pageBytes, 3 * pageBytes),
        ]
        for (what, offset, destinationOffset, count) in invalid {
            let error = expectDAXError(.invalidArgument) {
                try fs.deduplicate("/a", offset: offset, "/b", offset: destinationOffset, count: count)
            }
            #expect(error != nil, "\(what)")
        }
        // Offsets that are not congruent can share no block: refused, or nothing shared.
        do {
            let shared = try fs.deduplicate("/a", offset: 0, "/b", offset: 1, count: 2 * pageBytes)
            #expect(shared == 0)
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument, "\(error)")
        }
        expectDAXError(.notFound) { try fs.deduplicate("/missing", offset: 0, "/b", offset: 0, count: pageBytes) }
        expectDAXError(.notFound) { try fs.deduplicate("/a", offset: 0, "/missing", offset: 0, count: pageBytes) }
        expectDAXError(.isADirectory) { try fs.deduplicate("/dir", offset: 0, "/b", offset: 0, count: pageBytes) }
        expectDAXError(.isADirectory) { try fs.deduplicate("/a", offset: 0, "/dir", offset: 0, count: pageBytes) }

        #expect(try a.frames(pages: 4) == aFrames && b.frames(pages: 4) == bFrames)
        #expect(try a.contents() == data && b.contents() == data)
        #expect(fs.statistics().sharedBlocks == 0)
        #expect(fs.statistics().freeBlocks == free)
        #expect(try fs.check().isClean)
    }

    @Test("a mixed workload with clones, snapshots, stores, migration and dedup matches its model")
    func forkingWorkloadMatchesModel() throws {
        let t = try TemporaryFileSystem(size: 32 << 20, name: "forkworkload")
        var workload = Workload(model: Model(), seed: 12, forking: true)
        let runner = WorkloadRunner(fs: t.fs)
        defer { runner.closeAll() }
        let operations = longTests ? 10_000 : 600
        var forkingOperations = 0
        for index in 0..<operations {
            let operation = workload.next()
            switch operation {
            case .clone, .store, .migrate, .deduplicate: forkingOperations += 1
            default: break
            }
            do {
                try runner.perform(operation)
            } catch {
                Issue.record("operation \(index) (\(operation)): \(error)")
                return
            }
            let actual = try Model(reading: t.fs)
            guard actual.matches(workload.model) else {
                Issue.record("after operation \(index) (\(operation)):\n\(actual)\nexpected\n\(workload.model)")
                return
            }
            if index % 50 == 49 {
                let report = try t.fs.check()
                guard report.isClean else {
                    Issue.record("after operation \(index) (\(operation)): \(report)")
                    return
                }
            }
        }
        #expect(forkingOperations > operations / 5)
        runner.closeAll()
        let remounted = try t.remount()
        defer { try? remounted.unmount() }
        #expect(try Model(reading: remounted).matches(workload.model))
        #expect(try remounted.check().isClean)
    }
}
