// Adversarial black-box tests: combinations of features the single-feature suites are unlikely to
// cover (clone + truncate/punch/allocate/rename on both sides, dedup and migrate with odd ranges,
// faults through several mappings, crash images after copy-on-write, pins across clones, bad
// input everywhere). Written by a helper from the public contract only: `import DAX`, no
// internals.
import DAX
import Dispatch
import Foundation
import Synchronization
import Testing

// MARK: - Helpers of this file only

private let advPage = PMemDevice.pageSize

private func advPattern(_ count: Int, seed: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ ($0 >> 11) &+ seed &* 53 &+ 1) | 0x10 }
}

private func advZeros(_ count: Int) -> [UInt8] { [UInt8](repeating: 0, count: count) }

private func advEmulated(_ domain: PersistenceDomain = .adr) -> PMemDevice.Options {
    var options = PMemDevice.Options()
    options.persistence = .cacheFlush
    options.powerFailureEmulation = domain
    return options
}

extension BlackBoxRig {
    /// Every path under `root` (relative; directories end in "/"), sorted.
    func tree(_ root: String = "/") throws -> [String] {
        var out: [String] = []
        func walk(_ dir: String, _ prefix: String) throws {
            for name in try fs.contentsOfDirectory(dir) {
                let full = dir == "/" ? "/\(name)" : "\(dir)/\(name)"
                do {
                    _ = try fs.contentsOfDirectory(full)
                    out.append(prefix + name + "/")
                    try walk(full, prefix + name + "/")
                } catch let error as DAXError where error.code == .notADirectory {
                    out.append(prefix + name)
                }
            }
        }
        try walk(root, "")
        return out.sorted()
    }
}

private func advBytes(_ mapping: DAXMapping, at offset: Int, count: Int) -> [UInt8] {
    Array(UnsafeRawBufferPointer(start: mapping.baseAddress + offset, count: count))
}

private func advStore(_ mapping: DAXMapping, _ offset: Int, _ value: UInt8) {
    mapping.baseAddress.storeBytes(of: value, toByteOffset: offset, as: UInt8.self)
}

private func advStore(_ mapping: DAXMapping, _ offset: Int, _ bytes: [UInt8]) {
    bytes.withUnsafeBytes { (mapping.baseAddress + offset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
}

/// Throws a DAXError (any code) and returns it, or records an issue.
@discardableResult
private func expectSomeDAXError<T>(
    _ what: String, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> T
) -> DAXError? {
    do {
        _ = try body()
        Issue.record("\(what): expected a DAXError, nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as DAXError {
        #expect(!error.message.isEmpty, "\(what): empty message", sourceLocation: sourceLocation)
        return error
    } catch {
        Issue.record("\(what): not a DAXError: \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

@discardableResult
private func expectCode<T>(
    _ codes: [DAXError.Code], _ what: String, sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws -> T
) -> DAXError? {
    let error = expectSomeDAXError(what, sourceLocation: sourceLocation, body)
    if let error {
        #expect(codes.contains(error.code), "\(what): \(error)", sourceLocation: sourceLocation)
    }
    return error
}

private func withImage<T>(
    _ device: PMemDevice, keeping: InFlightLines = .none, _ body: (PMemDevice, DAXFileSystem) throws -> T
) throws -> T {
    let path = TemporaryDevice.uniquePath("img")
    defer { unlink(path) }
    try device.powerFail(writingImageTo: path, keeping: keeping)
    let image = try PMemDevice.open(path: path)
    defer { image.close() }
    let fs = try DAXFileSystem.mount(image)
    defer { try? fs.unmount() }
    return try body(image, fs)
}

private func readAll(_ fs: DAXFileSystem, _ path: String) throws -> [UInt8] {
    let file = try fs.open(path, access: .readOnly)
    defer { file.close() }
    return try file.read(count: file.size, at: 0)
}

private func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String {
    if a.count != b.count { return "sizes \(a.count) vs \(b.count)" }
    if let i = a.indices.first(where: { a[$0] != b[$0] }) { return "first difference at \(i): \(a[i]) vs \(b[i])" }
    return "equal"
}

// MARK: - Clone and snapshot combinations

@Suite("Adversarial: clone and snapshot combinations")
struct AdversarialCloneTests {
    @Test("snapshot, then truncate/punch/write/allocate/rename/remove on both sides; remount; all removed balances")
    func snapshotThenAlternatingOps() throws {
        let r = try BlackBoxRig("snapops")
        try r.make("/keep", [])
        let baseline = r.fs.statistics()
        try r.fs.createDirectory("/d")
        try r.fs.createDirectory("/d/sub")
        let x = try r.make("/d/x", advPattern(3 * advPage, seed: 1))
        let y = try r.make("/d/sub/y", advPattern(2 * advPage + 100, seed: 2))
        try r.make("/d/z", [])
        try r.fs.clone("/d", to: "/snap")
        #expect(r.fs.statistics().sharedBlocks == 6)

        // Model of every file's bytes.
        var model: [String: [UInt8]] = [
            "/d/x": x, "/d/sub/y": y, "/d/z": [], "/snap/x": x, "/snap/sub/y": y, "/snap/z": [],
        ]

        // 1. truncate the source's x inside page 1.
        try r.with("/d/x") { try $0.truncate(to: 5000, ifBusy: .fail) }
        model["/d/x"] = Array(x[0..<5000])
        // 2. write into the snapshot's x at page 0.
        try r.with("/snap/x") { try $0.write([0xEE, 0xEF], at: 100) }
        model["/snap/x"]!.replaceSubrange(100..<102, with: [0xEE, 0xEF])
        // 3. punch page 0 of the snapshot's y, and a partial range of page 1.
        try r.with("/snap/sub/y") {
            try $0.punchHole(offset: 0, count: advPage, ifBusy: .fail)
            try $0.punchHole(offset: advPage + 10, count: 20, ifBusy: .fail)
        }
        model["/snap/sub/y"]!.replaceSubrange(0..<advPage, with: advZeros(advPage))
        model["/snap/sub/y"]!.replaceSubrange(advPage + 10..<advPage + 30, with: advZeros(20))
        // 4. allocate over the source's shared y (fallocate keeps data) and past its end.
        try r.with("/d/sub/y") { try $0.allocate(offset: 0, count: 4 * advPage) }
        model["/d/sub/y"]! += advZeros(4 * advPage - y.count)
        // 5. renames on both sides.
        try r.fs.rename("/snap/sub/y", to: "/snap/y2")
        model["/snap/y2"] = model.removeValue(forKey: "/snap/sub/y")
        try r.fs.rename("/d/x", to: "/d/sub/x")
        model["/d/sub/x"] = model.removeValue(forKey: "/d/x")
        // 6. remove and create.
        try r.fs.remove("/d/z")
        model["/d/z"] = nil
        model["/snap/new"] = try r.make("/snap/new", advPattern(advPage + 1, seed: 3))
        // 7. truncate up the truncated file: the grown range reads zeros (POSIX, as xfs does).
        try r.with("/d/sub/x") { try $0.truncate(to: 3 * advPage, ifBusy: .fail) }
        model["/d/sub/x"]! += advZeros(3 * advPage - 5000)
        // 8. write through the source over its shared page 2 of y.
        try r.with("/d/sub/y") { try $0.write([1, 2, 3], at: 2 * advPage + 50) }
        model["/d/sub/y"]!.replaceSubrange(2 * advPage + 50..<2 * advPage + 53, with: [1, 2, 3])

        func verify(_ when: String) throws {
            #expect(try r.tree("/d") == ["sub/", "sub/x", "sub/y"], "\(when)")
            #expect(try r.tree("/snap") == ["new", "sub/", "x", "y2", "z"], "\(when)")
            for (path, bytes) in model.sorted(by: { $0.key < $1.key }) {
                let got = try r.contents(path)
                #expect(got == bytes, "\(when): \(path): \(firstDifference(got, bytes))")
            }
            r.expectClean(when)
        }
        try verify("after the operations")
        try r.remount()
        try verify("after remount")

        for path in model.keys { try r.fs.remove(path) }
        try r.fs.remove("/d/sub")
        try r.fs.remove("/d")
        try r.fs.remove("/snap/sub")
        try r.fs.remove("/snap")
        let end = r.fs.statistics()
        #expect(end.sharedBlocks == 0)
        #expect(end.freeBlocks == baseline.freeBlocks, "blocks leaked: \(baseline.freeBlocks) -> \(end.freeBlocks)")
        #expect(end.quarantinedBlocks == 0)
        r.expectClean("after removing everything")
        try r.remount()
        #expect(r.fs.statistics().freeBlocks == baseline.freeBlocks, "after remount")
        r.expectClean("after the last remount")
    }

    @Test("truncate of a clone's source to inside a shared page never zeroes the clone's tail")
    func truncateInsideSharedPage() throws {
        let r = try BlackBoxRig("truncshared")
        let data = try r.make("/a", advPattern(2 * advPage, seed: 4))
        try r.fs.clone("/a", to: "/b")
        let bFrames = try r.frames("/b")
        try r.with("/a") { try $0.truncate(to: 100, ifBusy: .fail) }
        do {
            let got = try r.contents("/b")
            #expect(got == data, "the clone changed: \(firstDifference(got, data))")
        }
        #expect(try r.frames("/b") == bFrames)
        try r.with("/a") { try $0.truncate(to: 2 * advPage, ifBusy: .fail) }
        let a = try r.contents("/a")
        #expect(
            a == Array(data[0..<100]) + advZeros(2 * advPage - 100),
            "\(firstDifference(a, Array(data[0..<100]) + advZeros(2 * advPage - 100)))")
        #expect(try r.contents("/b") == data)
        // The same from the clone's side.
        try r.with("/b") { try $0.truncate(to: advPage + 1, ifBusy: .fail) }
        try r.with("/b") { try $0.truncate(to: 2 * advPage, ifBusy: .fail) }
        #expect(try r.contents("/b") == Array(data[0..<advPage + 1]) + advZeros(advPage - 1))
        #expect(try r.contents("/a") == a)
        r.expectClean("after truncates of shared pages")
    }

    @Test("a partial punch of a shared page zeroes only the puncher's copy")
    func partialPunchOfSharedPage() throws {
        let r = try BlackBoxRig("punchshared")
        let data = try r.make("/a", advPattern(3 * advPage, seed: 5))
        try r.fs.clone("/a", to: "/b")
        try r.with("/a") { try $0.punchHole(offset: 100, count: advPage + 200, ifBusy: .fail) }
        var expected = data
        expected.replaceSubrange(100..<advPage + 300, with: advZeros(advPage + 200))
        let a = try r.contents("/a")
        #expect(a == expected, "\(firstDifference(a, expected))")
        let b = try r.contents("/b")
        #expect(b == data, "the clone changed: \(firstDifference(b, data))")
        r.expectClean("after a partial punch of shared pages")
    }

    @Test("a chain of clones: write, remove in any order; sharedBlocks and free blocks balance")
    func cloneChain() throws {
        let r = try BlackBoxRig("chain")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(4 * advPage, seed: 6))
        try r.fs.clone("/a", to: "/b")
        try r.fs.clone("/b", to: "/c")
        #expect(r.fs.statistics().sharedBlocks == 4)
        #expect(r.fs.statistics().freeBlocks == free0 - 4)
        try r.with("/b") { try $0.write([0xAA], at: advPage) }
        #expect(r.fs.statistics().freeBlocks == free0 - 5)
        #expect(r.fs.statistics().sharedBlocks == 4, "page 1 is still shared by /a and /c")
        try r.fs.remove("/a")
        #expect(try r.contents("/c") == data)
        var b = data
        b[advPage] = 0xAA
        #expect(try r.contents("/b") == b)
        #expect(r.fs.statistics().sharedBlocks == 3)
        try r.fs.remove("/c")
        #expect(r.fs.statistics().sharedBlocks == 0)
        #expect(try r.contents("/b") == b)
        #expect(r.fs.statistics().freeBlocks == free0 - 4)
        try r.fs.remove("/b")
        #expect(r.fs.statistics().freeBlocks == free0)
        r.expectClean("after the chain")
    }

    @Test("two mappings of the clone: a store through one copies the page and the other mapping sees it")
    func twoMappingsOfClone() throws {
        let r = try BlackBoxRig("twomapclone")
        try #require(r.fs.faultHandling == .userfaultfd)
        let data = try r.make("/a", advPattern(2 * advPage, seed: 7))
        try r.fs.clone("/a", to: "/b")
        let a = try r.fs.open("/a")
        let b = try r.fs.open("/b")
        defer {
            a.close()
            b.close()
        }
        let ma = try a.map(count: 2 * advPage)
        let m1 = try b.map(count: 2 * advPage)
        let m2 = try b.map(count: 2 * advPage)
        let m3 = try b.map(offset: advPage, count: advPage)
        defer {
            ma.unmap()
            m1.unmap()
            m2.unmap()
            m3.unmap()
        }
        // Touch everything first so each mapping has the shared pages mapped.
        #expect(advBytes(ma, at: 0, count: 2 * advPage) == data)
        #expect(advBytes(m1, at: 0, count: 2 * advPage) == data)
        #expect(advBytes(m2, at: 0, count: 2 * advPage) == data)
        #expect(advBytes(m3, at: 0, count: advPage) == Array(data[advPage...]))
        let before = r.fs.statistics()
        advStore(m1, advPage + 5, 0x5A)
        #expect(r.fs.statistics().faults.copyOnWrite - before.faults.copyOnWrite == 1)
        #expect(advBytes(m2, at: advPage + 5, count: 1) == [0x5A], "the clone's other mapping misses the store")
        #expect(advBytes(m3, at: 5, count: 1) == [0x5A], "the clone's offset mapping misses the store")
        #expect(advBytes(ma, at: advPage + 5, count: 1) == [data[advPage + 5]], "the source's mapping sees the store")
        #expect(try a.read(count: 2 * advPage, at: 0) == data)
        #expect(try b.read(count: 1, at: advPage + 5) == [0x5A])
        // A store through the other mapping of the clone now hits the copy: no further copy.
        let mid = r.fs.statistics()
        advStore(m2, advPage + 6, 0x5B)
        #expect(r.fs.statistics().faults.copyOnWrite == mid.faults.copyOnWrite)
        #expect(advBytes(m1, at: advPage + 6, count: 1) == [0x5B])
        let bFrames = try b.frames(offset: 0, count: 2 * advPage)
        let aFrames = try a.frames(offset: 0, count: 2 * advPage)
        #expect(bFrames[0] == aFrames[0] && bFrames[1] != aFrames[1])
        r.expectClean("after copy-on-write through several mappings")
    }

    @Test("clone of a sparse file with a partial last page keeps holes; stores to the clone's hole stay in the clone")
    func cloneSparse() throws {
        let r = try BlackBoxRig("clonesparse")
        try #require(r.fs.faultHandling == .userfaultfd)
        let file = try r.fs.create("/s")
        try file.write([1, 2, 3], at: 3 * advPage + 10)  // pages 0-2 holes, page 3 partial
        file.close()
        try r.fs.clone("/s", to: "/t")
        let frames = try r.frames("/t")
        #expect(frames.count == 4)
        #expect(frames[0] == nil && frames[1] == nil && frames[2] == nil && frames[3] != nil)
        #expect(r.fs.statistics().sharedBlocks == 1)
        let t = try r.fs.open("/t")
        defer { t.close() }
        let mapping = try t.map(count: 4 * advPage)
        defer { mapping.unmap() }
        #expect(advBytes(mapping, at: 0, count: advPage) == advZeros(advPage))
        advStore(mapping, advPage + 1, 0x77)
        #expect(try r.frames("/s")[1] == nil, "a store to the clone's hole gave the source a block")
        #expect(try r.contents("/s") == advZeros(3 * advPage + 10) + [1, 2, 3])
        #expect(try t.read(count: 1, at: advPage + 1) == [0x77])
        // Past the end in the last page: zeros in both.
        #expect(advBytes(mapping, at: 3 * advPage + 13, count: 8) == advZeros(8))
        r.expectClean("after stores into a clone's holes")
    }

    @Test("a snapshot of a directory into its own subtree is refused or holds the tree as it was; never a loop")
    func snapshotIntoItself() throws {
        let r = try BlackBoxRig("snapself")
        try r.fs.createDirectory("/d")
        try r.fs.createDirectory("/d/e")
        let data = try r.make("/d/e/f", advPattern(advPage, seed: 8))
        let tree = try r.tree("/")
        let stats = r.fs.statistics()
        do {
            try r.fs.clone("/d", to: "/d/e/snap")
            // Accepted: a snapshot of the tree as it was before the snapshot.
            #expect(try r.tree("/d/e/snap") == ["e/", "e/f"])
            #expect(try r.contents("/d/e/snap/e/f") == data)
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument, "\(error)")
            #expect(try r.tree("/") == tree)
            #expect(r.fs.statistics().freeBlocks == stats.freeBlocks)
            #expect(r.fs.statistics().sharedBlocks == 0)
        }
        r.expectClean("after a snapshot into its own subtree")
    }

    @Test("clone .copy of a DMA-pinned file, then truncate .deferFree of the source: quarantine, clone intact, balance")
    func cloneCopyThenDeferFree() throws {
        let r = try BlackBoxRig("clonedefer")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(3 * advPage, seed: 9))
        let a = try r.fs.open("/a")
        let mapping = try a.map(count: 3 * advPage)
        let engine = DMAEngine(device: r.device)
        let region = engine.register(try mapping.pin(offset: advPage, count: advPage))
        let pinnedFrame = region.frames[0]
        try r.fs.clone("/a", to: "/b", ifPinned: .copy)
        let bFrames = try r.frames("/b")
        #expect(bFrames[1] != pinnedFrame, "the pinned frame was shared with the clone")
        #expect(try a.frames(offset: advPage, count: advPage) == [pinnedFrame], "the pinned frame left the source")
        #expect(r.fs.statistics().sharedBlocks == 2)
        try a.truncate(to: 0, ifBusy: .deferFree)
        #expect(r.fs.statistics().quarantinedBlocks == 1)
        #expect(r.fs.pages.state(of: pinnedFrame).isQuarantined)
        // The device still writes its frame: only the quarantined block, never the clone.
        try engine.write([0xD0, 0xD1], to: region, at: 0)
        #expect(try r.contents("/b") == data)
        #expect(try r.contents("/a") == [])
        r.expectPinsBalance("while the quarantined page is pinned")
        engine.deregister(region)
        mapping.unmap()
        a.close()
        #expect(r.fs.statistics().quarantinedBlocks == 0)
        #expect(r.fs.statistics().sharedBlocks == 0, "the source is empty: nothing is shared")
        #expect(r.fs.statistics().freeBlocks == free0 - 3)
        try r.fs.remove("/b")
        try r.fs.remove("/a")
        #expect(r.fs.statistics().freeBlocks == free0)
        r.expectPinsBalance("after deregister")
        r.expectClean("after clone, deferred truncate and deregister")
    }

    @Test("clone .unsafeShare of a pinned page, then truncate .fail is busy; remove the clone; balance at the end")
    func unsafeShareThenTruncate() throws {
        let r = try BlackBoxRig("unsafetrunc")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(2 * advPage, seed: 10))
        let a = try r.fs.open("/a")
        let mapping = try a.map(count: 2 * advPage)
        let engine = DMAEngine(device: r.device)
        let region = engine.register(try mapping.pin(offset: 0, count: advPage))
        try r.fs.clone("/a", to: "/b", ifPinned: .unsafeShare)
        #expect(try r.frames("/b")[0] == region.frames[0])
        try engine.write([0x42], to: region, at: 0)
        #expect(try r.contents("/b")[0] == 0x42, "unsafeShare: the device's write shows in the clone")
        // The clone's copy of the pinned page is pinned too: a truncate of it meets the pin.
        try r.with("/b") { b in
            expectCode([.busy], "truncate of the clone over the pinned shared page") {
                try b.truncate(to: 0, ifBusy: .fail)
            }
            #expect(b.size == 2 * advPage)
        }
        expectCode([.busy], "truncate .fail of the pinned source") { try a.truncate(to: 0, ifBusy: .fail) }
        #expect(a.size == 2 * advPage)
        var expected = data
        expected[0] = 0x42
        #expect(try a.read(count: 2 * advPage, at: 0) == expected)
        try r.fs.remove("/b")
        #expect(r.fs.statistics().sharedBlocks == 0)
        #expect(try a.read(count: 2 * advPage, at: 0) == expected)
        engine.deregister(region)
        mapping.unmap()
        a.close()
        try r.fs.remove("/a")
        #expect(r.fs.statistics().freeBlocks == free0)
        r.expectPinsBalance("at the end")
        r.expectClean("after unsafeShare and removal")
    }

    @Test("clone .wait with a short timeout while pinned: .timedOut, no destination, nothing changed")
    func cloneWaitTimesOut() throws {
        let r = try BlackBoxRig("clonewait")
        try r.make("/a", advPattern(advPage, seed: 11))
        let a = try r.fs.open("/a")
        defer { a.close() }
        let mapping = try a.map(count: advPage)
        defer { mapping.unmap() }
        let pin = try mapping.pin(offset: 0, count: advPage, access: .readOnly)
        let stats = r.fs.statistics()
        let tree = try r.tree()
        expectCode([.timedOut], "clone .wait") {
            try r.fs.clone("/a", to: "/b", ifPinned: .wait(timeout: .milliseconds(50)))
        }
        #expect(try r.tree() == tree)
        #expect(r.fs.statistics().freeBlocks == stats.freeBlocks)
        // The same as a snapshot of the root's subdirectory holding it.
        pin.release()
        r.expectClean("after a timed-out clone")
    }
}

// MARK: - Deduplicate combinations

@Suite("Adversarial: deduplicate")
struct AdversarialDedupTests {
    @Test("deduplicate of a range with itself changes nothing and frees nothing")
    func dedupSameRangeSameFile() throws {
        let r = try BlackBoxRig("dedupself")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(3 * advPage, seed: 20))
        let frames = try r.frames("/a")
        let stats = r.fs.statistics()
        do {
            let shared = try r.fs.deduplicate("/a", offset: 0, "/a", offset: 0, count: 3 * advPage)
            #expect(shared == 0 || shared == 3 * advPage, "\(shared)")
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument, "\(error)")
        }
        #expect(try r.contents("/a") == data)
        #expect(try r.frames("/a") == frames)
        #expect(r.fs.statistics().freeBlocks == stats.freeBlocks, "blocks freed by a self-dedup")
        r.expectClean("after a self-dedup")
        try r.with("/a") { try $0.write([9], at: 0) }
        #expect(try r.contents("/a")[0] == 9)
        try r.fs.remove("/a")
        #expect(r.fs.statistics().freeBlocks == free0)
        r.expectClean("after removing a self-deduplicated file")
        // A file system that still works: new files read zeros and keep their bytes.
        let more = try r.make("/m", advPattern(4 * advPage, seed: 21))
        #expect(try r.contents("/m") == more)
    }

    @Test("deduplicate between equal pages of one file: sharing within a file keeps every byte on later writes")
    func dedupWithinFile() throws {
        let r = try BlackBoxRig("dedupwithin")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let page = advPattern(advPage, seed: 22)
        let data = try r.make("/a", page + page + advPattern(advPage, seed: 23))
        var shared = 0
        do {
            shared = try r.fs.deduplicate("/a", offset: 0, "/a", offset: advPage, count: advPage)
            #expect(shared == advPage || shared == 0)
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument, "\(error)")
        }
        let frames = try r.frames("/a")
        if shared == advPage { #expect(frames[0] == frames[1]) }
        #expect(try r.contents("/a") == data)
        r.expectClean("after a dedup within a file")
        try r.with("/a") { try $0.write([0xFE], at: advPage + 3) }
        var expected = data
        expected[advPage + 3] = 0xFE
        do {
            let got = try r.contents("/a")
            #expect(got == expected, "a write to page 1 reached page 0: \(firstDifference(got, expected))")
        }
        try r.with("/a") { try $0.punchHole(offset: 0, count: advPage, ifBusy: .fail) }
        expected.replaceSubrange(0..<advPage, with: advZeros(advPage))
        #expect(try r.contents("/a") == expected)
        r.expectClean("after writes and a punch")
        try r.fs.remove("/a")
        #expect(r.fs.statistics().freeBlocks == free0)
        #expect(r.fs.statistics().sharedBlocks == 0)
    }

    @Test("deduplicate of overlapping ranges in one file: refused or correct, bytes never change")
    func dedupOverlapping() throws {
        let r = try BlackBoxRig("dedupoverlap")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let page = advPattern(advPage, seed: 24)
        let data = try r.make("/a", page + page + page + page)
        do {
            let shared = try r.fs.deduplicate("/a", offset: 0, "/a", offset: advPage, count: 3 * advPage)
            #expect(shared >= 0 && shared <= 3 * advPage)
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument, "\(error)")
        }
        #expect(try r.contents("/a") == data)
        r.expectClean("after an overlapping dedup")
        for index in 0..<4 {
            try r.with("/a") { try $0.write([UInt8(index)], at: index * advPage) }
        }
        var expected = data
        for index in 0..<4 { expected[index * advPage] = UInt8(index) }
        do {
            let got = try r.contents("/a")
            #expect(got == expected, "\(firstDifference(got, expected))")
        }
        r.expectClean("after writing each page")
        try r.fs.remove("/a")
        #expect(r.fs.statistics().freeBlocks == free0)
        #expect(r.fs.statistics().sharedBlocks == 0)
        r.expectClean("after removal")
    }

    @Test("deduplicate with unaligned offsets never changes the destination's bytes outside or inside the range")
    func dedupUnaligned() throws {
        let r = try BlackBoxRig("dedupunaligned")
        let data = advPattern(3 * advPage, seed: 25)
        var other = data
        for i in 0..<100 { other[i] ^= 0x5A }  // differs only before the range
        for i in (3 * advPage - 50)..<(3 * advPage) { other[i] ^= 0x33 }  // and after it
        try r.make("/a", data)
        try r.make("/b", other)
        let aFrames = try r.frames("/a")
        do {
            let shared = try r.fs.deduplicate("/a", offset: 100, "/b", offset: 100, count: 3 * advPage - 150)
            #expect(shared >= 0 && shared <= 3 * advPage - 150)
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument, "\(error)")
        }
        do {
            let got = try r.contents("/b")
            #expect(got == other, "\(firstDifference(got, other))")
        }
        #expect(try r.contents("/a") == data)
        let bFrames = try r.frames("/b")
        #expect(bFrames[0] != aFrames[0], "page 0 differs in bytes 0..<100, yet it is shared")
        #expect(bFrames[2] != aFrames[2], "page 2 differs at its end, yet it is shared")
        // Offsets that differ within a page: no page can be shared.
        try r.make("/c", [0] + Array(data[0..<(2 * advPage)]))
        let cBefore = try r.contents("/c")
        do {
            let shared = try r.fs.deduplicate("/a", offset: 0, "/c", offset: 1, count: 2 * advPage)
            #expect(shared == 0, "unaligned offsets cannot share whole blocks: \(shared)")
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument, "\(error)")
        }
        #expect(try r.contents("/c") == cBefore)
        r.expectClean("after unaligned dedups")
    }

    @Test("deduplicate of a partial last page: equal tails share; a destination longer than the range is left alone")
    func dedupPartialLastPage() throws {
        let r = try BlackBoxRig("deduptail")
        let head = advPattern(advPage + 100, seed: 26)
        try r.make("/a", head)
        try r.make("/b", head)
        let longer = head + advPattern(500, seed: 27)  // same first advPage+100 bytes, then more in page 1
        try r.make("/c", longer)
        let cFrames = try r.frames("/c")
        let shared = try r.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: advPage + 100)
        // Both ranges end at the end of their files: the partial page is shared, as Linux shares
        // it, and counted to the end.
        let aFrames = try r.frames("/a")
        let bFrames = try r.frames("/b")
        #expect(shared == advPage + 100, "\(shared)")
        #expect(bFrames[0] == aFrames[0])
        #expect((bFrames[1] == aFrames[1]) == (shared == advPage + 100), "the count and the sharing disagree")
        #expect(try r.contents("/b") == head)
        // Growing the destination: the grown range reads zeros, the source is unchanged.
        try r.with("/b") { try $0.truncate(to: 2 * advPage, ifBusy: .fail) }
        #expect(try r.contents("/b") == head + advZeros(advPage - 100))
        #expect(try r.contents("/a") == head)
        // /c holds bytes past the range in its page 1: that page must not become /a's.
        do {
            let sharedC = try r.fs.deduplicate("/a", offset: 0, "/c", offset: 0, count: advPage + 100)
            #expect(sharedC <= advPage + 100)
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument, "\(error)")
        }
        do {
            let got = try r.contents("/c")
            #expect(got == longer, "\(firstDifference(got, longer))")
        }
        #expect(try r.frames("/c")[1] == cFrames[1])
        r.expectClean("after tail dedups")
    }

    @Test("deduplicate into a destination that is already a clone: nothing freed twice, counts balance")
    func dedupIntoClone() throws {
        let r = try BlackBoxRig("dedupclone")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(3 * advPage, seed: 28))
        try r.fs.clone("/a", to: "/b")
        let stats = r.fs.statistics()
        let shared = try r.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 3 * advPage)
        #expect(shared == 3 * advPage, "every byte is shared already")
        let after = r.fs.statistics()
        #expect(after.freeBlocks == stats.freeBlocks)
        #expect(after.sharedBlocks == stats.sharedBlocks)
        r.expectClean("after dedup of a clone")
        // And again the other way round, and into a third file that is a clone of the clone.
        try r.fs.clone("/b", to: "/c")
        #expect(try r.fs.deduplicate("/c", offset: 0, "/a", offset: 0, count: 3 * advPage) == 3 * advPage)
        #expect(r.fs.statistics().freeBlocks == stats.freeBlocks)
        try r.fs.remove("/a")
        try r.fs.remove("/b")
        #expect(try r.contents("/c") == data)
        #expect(r.fs.statistics().sharedBlocks == 0)
        try r.fs.remove("/c")
        #expect(r.fs.statistics().freeBlocks == free0)
        r.expectClean("after removing all clones")
    }

    @Test("deduplicate of count 0 and of holes changes nothing")
    func dedupZeroAndHoles() throws {
        let r = try BlackBoxRig("dedupzero")
        try #require(r.fs.faultHandling == .userfaultfd)
        let a = try r.fs.create("/a")
        try a.truncate(to: 2 * advPage, ifBusy: .fail)  // two holes
        a.close()
        try r.make("/b", advZeros(2 * advPage))  // two zeroed data blocks
        let stats = r.fs.statistics()
        let bFrames = try r.frames("/b")
        do {
            #expect(try r.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 0) == 0)
        } catch let error as DAXError {
            #expect(error.code == .invalidArgument, "\(error)")
        }
        #expect(try r.frames("/b") == bFrames)
        // A hole and a page of zeros hold the same bytes; whatever happens, both still read zeros.
        _ = try? r.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 2 * advPage)
        #expect(try r.contents("/a") == advZeros(2 * advPage))
        #expect(try r.contents("/b") == advZeros(2 * advPage))
        #expect(r.fs.statistics().freeBlocks >= stats.freeBlocks)
        r.expectClean("after dedup of holes")
        try r.with("/b") { try $0.write([5], at: 10) }
        #expect(try r.contents("/a") == advZeros(2 * advPage))
    }
}

// MARK: - Migrate combinations

@Suite("Adversarial: migrate")
struct AdversarialMigrateTests {
    @Test("migrate of shared (cloned) pages keeps both files' bytes; later writes never cross; counts balance")
    func migrateShared() throws {
        let r = try BlackBoxRig("migshared")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(3 * advPage, seed: 30))
        try r.fs.clone("/a", to: "/b")
        let result = try r.with("/a") { try $0.migrate(offset: 0, count: 3 * advPage) }
        #expect(result.busy.isEmpty)
        #expect(try r.contents("/a") == data)
        #expect(try r.contents("/b") == data)
        r.expectClean("after migrating shared pages")
        try r.with("/a") { try $0.write([1], at: 0) }
        try r.with("/b") { try $0.write([2], at: advPage) }
        var a = data
        a[0] = 1
        var b = data
        b[advPage] = 2
        #expect(try r.contents("/a") == a)
        #expect(try r.contents("/b") == b)
        try r.remount()
        #expect(try r.contents("/a") == a)
        #expect(try r.contents("/b") == b)
        r.expectClean("after remount")
        try r.fs.remove("/a")
        try r.fs.remove("/b")
        #expect(r.fs.statistics().freeBlocks == free0)
        #expect(r.fs.statistics().sharedBlocks == 0)
    }

    @Test("migrate of an unaligned range reaching past the end moves the pages it touches; mappings follow")
    func migrateUnalignedPastEOF() throws {
        let r = try BlackBoxRig("migunaligned")
        let data = try r.make("/f", advPattern(2 * advPage + 100, seed: 31))
        let file = try r.fs.open("/f")
        defer { file.close() }
        let m0 = try file.map(count: 3 * advPage)
        let m1 = try file.map(offset: advPage, count: 2 * advPage)
        defer {
            m0.unmap()
            m1.unmap()
        }
        #expect(advBytes(m0, at: 0, count: data.count) == data)
        #expect(advBytes(m1, at: 0, count: advPage + 100) == Array(data[advPage...]))
        let old = try file.frames(offset: 0, count: 3 * advPage)
        let result = try file.migrate(offset: advPage + 1, count: 1 << 20)
        #expect(result.migrated == 2, "pages 1 and 2 are touched by the range: \(result)")
        #expect(result.busy.isEmpty)
        let new = try file.frames(offset: 0, count: 3 * advPage)
        #expect(new[0] == old[0])
        #expect(new[1] != old[1] && new[2] != old[2])
        #expect(advBytes(m0, at: 0, count: data.count) == data)
        #expect(advBytes(m1, at: 0, count: advPage + 100) == Array(data[advPage...]))
        // Stores through both mappings reach the new frames.
        advStore(m1, 10, 0x61)
        advStore(m0, 2 * advPage + 20, 0x62)
        #expect(try file.read(count: 1, at: advPage + 10) == [0x61])
        #expect(advBytes(m0, at: advPage + 10, count: 1) == [0x61])
        #expect(advBytes(m1, at: advPage + 20, count: 1) == [0x62])
        let frame2 = try #require(new[2])
        #expect(try r.device.read(count: 1, at: Int(frame2.rawValue) * advPage + 20) == [0x62], "zero copy")
        #expect(file.size == data.count)
        r.expectClean("after migrate past the end")
    }

    @Test("migrate with a read-only short-term pin and a long-term lease: both busy, indexes right, bytes kept")
    func migrateWithPins() throws {
        let r = try BlackBoxRig("migpins")
        let data = try r.make("/f", advPattern(4 * advPage, seed: 32))
        let file = try r.fs.open("/f")
        defer { file.close() }
        let mapping = try file.map(count: 4 * advPage)
        defer { mapping.unmap() }
        let short = try mapping.pin(offset: advPage, count: advPage, access: .readOnly)
        let engine = DMAEngine(device: r.device)
        let lease = engine.register(
            try mapping.pin(offset: 3 * advPage, count: advPage, lifetime: .longTerm(onRevoke: {})))
        let old = try file.frames(offset: 0, count: 4 * advPage)
        let result = try file.migrate(offset: 0, count: 4 * advPage)
        #expect(result.busy.sorted() == [1, 3], "\(result)")
        #expect(result.migrated == 2)
        let new = try file.frames(offset: 0, count: 4 * advPage)
        #expect(new[1] == old[1] && new[3] == old[3])
        #expect(new[0] != old[0] && new[2] != old[2])
        #expect(advBytes(mapping, at: 0, count: 4 * advPage) == data)
        try engine.write([0x99], to: lease, at: 7)
        #expect(try file.read(count: 1, at: 3 * advPage + 7) == [0x99])
        #expect(advBytes(mapping, at: 3 * advPage + 7, count: 1) == [0x99])
        short.release()
        engine.deregister(lease)
        let again = try file.migrate(offset: 0, count: 4 * advPage)
        #expect(again.busy.isEmpty && again.migrated == 4)
        r.expectPinsBalance("after migrations with pins")
        r.expectClean("after migrations with pins")
    }

    @Test("migrate of a hole loaded through a mapping (the zero page) moves nothing; a store still allocates")
    func migrateZeroPageHole() throws {
        let r = try BlackBoxRig("migzero")
        try #require(r.fs.faultHandling == .userfaultfd)
        let file = try r.fs.create("/f")
        defer { file.close() }
        try file.truncate(to: 2 * advPage, ifBusy: .fail)
        let mapping = try file.map(count: 2 * advPage)
        defer { mapping.unmap() }
        #expect(advBytes(mapping, at: 0, count: 2 * advPage) == advZeros(2 * advPage))
        let stats = r.fs.statistics()
        let result = try file.migrate(offset: 0, count: 2 * advPage)
        #expect(result.migrated == 0 && result.busy.isEmpty, "\(result)")
        #expect(r.fs.statistics().freeBlocks == stats.freeBlocks)
        #expect(try file.frames(offset: 0, count: 2 * advPage) == [nil, nil])
        advStore(mapping, advPage + 3, 0x44)
        #expect(try file.read(count: 1, at: advPage + 3) == [0x44])
        #expect(try file.frames(offset: 0, count: 2 * advPage)[1] != nil)
        r.expectClean("after migrate of holes")
    }

    @Test("migrate of a deduplicated destination keeps the source's bytes and the sharing consistent")
    func migrateAfterDedup() throws {
        let r = try BlackBoxRig("migdedup")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(2 * advPage, seed: 33))
        try r.make("/b", data)
        #expect(try r.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 2 * advPage) == 2 * advPage)
        let result = try r.with("/b") { try $0.migrate(offset: 0, count: 2 * advPage) }
        #expect(result.busy.isEmpty)
        #expect(try r.contents("/a") == data)
        #expect(try r.contents("/b") == data)
        r.expectClean("after migrate of deduplicated pages")
        try r.fs.remove("/a")
        #expect(try r.contents("/b") == data)
        try r.fs.remove("/b")
        #expect(r.fs.statistics().freeBlocks == free0)
        #expect(r.fs.statistics().sharedBlocks == 0)
        r.expectClean("after removal")
    }
}

// MARK: - Faults through mappings

@Suite("Adversarial: faults and mappings")
struct AdversarialFaultTests {
    @Test("a mapping larger than the file: growing the file by write and truncate makes the new pages reachable")
    func mapPastEOFThenGrow() throws {
        let r = try BlackBoxRig("mapgrow")
        try #require(r.fs.faultHandling == .userfaultfd)
        let file = try r.fs.create("/f")
        defer { file.close() }
        try file.write(advPattern(100, seed: 40), at: 0)
        let mapping: DAXMapping
        do {
            mapping = try file.map(count: 4 * advPage)
        } catch let error as DAXError {
            // Refusing a mapping past the end is a reading of the contract too.
            #expect(error.code == .invalidArgument, "\(error)")
            return
        }
        defer { mapping.unmap() }
        #expect(advBytes(mapping, at: 0, count: 100) == advPattern(100, seed: 40))
        let more = advPattern(300, seed: 41)
        try file.write(more, at: 2 * advPage + 7)
        #expect(
            advBytes(mapping, at: 2 * advPage + 7, count: 300) == more, "the mapping misses a write() past its old end")
        #expect(advBytes(mapping, at: advPage, count: advPage) == advZeros(advPage), "page 1 is a hole inside the file")
        try file.truncate(to: 4 * advPage, ifBusy: .fail)
        advStore(mapping, 3 * advPage + 9, 0x3C)
        #expect(try file.read(count: 1, at: 3 * advPage + 9) == [0x3C])
        advStore(mapping, advPage, 0x3D)
        #expect(try file.read(count: 1, at: advPage) == [0x3D])
        #expect(file.size == 4 * advPage)
        r.expectClean("after growing under a mapping")
    }

    @Test("stores through two mappings at different offsets reach one block each; counts and frames agree")
    func twoMappingsAtOffsets() throws {
        let r = try BlackBoxRig("twomaps")
        try #require(r.fs.faultHandling == .userfaultfd)
        let file = try r.fs.create("/f")
        defer { file.close() }
        try file.truncate(to: 4 * advPage, ifBusy: .fail)
        let whole = try file.map(count: 4 * advPage)
        let tail = try file.map(offset: 2 * advPage, count: 2 * advPage)
        defer {
            whole.unmap()
            tail.unmap()
        }
        #expect(advBytes(whole, at: 2 * advPage, count: 16) == advZeros(16))  // the zero page in `whole`
        let before = r.fs.statistics()
        advStore(tail, 8, [1, 2, 3, 4])
        let after = r.fs.statistics()
        #expect(after.faults.allocating - before.faults.allocating == 1)
        #expect(before.freeBlocks - after.freeBlocks == 1)
        #expect(
            advBytes(whole, at: 2 * advPage + 8, count: 4) == [1, 2, 3, 4],
            "the other mapping still shows the zero page")
        advStore(whole, 3 * advPage + 1, 9)
        #expect(advBytes(tail, at: advPage + 1, count: 1) == [9])
        let frames = try file.frames(offset: 0, count: 4 * advPage)
        #expect(frames[0] == nil && frames[1] == nil && frames[2] != nil && frames[3] != nil)
        let frame = try #require(frames[2])
        #expect(try r.device.read(count: 4, at: Int(frame.rawValue) * advPage + 8) == [1, 2, 3, 4])
        let state = r.fs.pages.state(of: frame)
        #expect(state.mapCount == 2, "both mappings map page 2 now: \(state)")
        whole.unmap()
        #expect(r.fs.pages.state(of: frame).mapCount == 1)
        r.expectClean("after stores through two mappings")
    }

    @Test("a store through a mapping of a clone, then sync, survives a power failure; the source keeps its bytes")
    func cowSyncPowerFail() throws {
        let r = try BlackBoxRig("cowpf", options: advEmulated())
        try #require(r.fs.faultHandling == .userfaultfd)
        let data = try r.make("/src", advPattern(2 * advPage, seed: 42))
        try r.fs.clone("/src", to: "/dst")
        let dst = try r.fs.open("/dst")
        defer { dst.close() }
        let mapping = try dst.map(count: 2 * advPage)
        defer { mapping.unmap() }
        mapping.baseAddress.storeBytes(of: 0x9999_9999_9999_9999 as UInt64, toByteOffset: 16, as: UInt64.self)
        try dst.sync()
        var expected = data
        for i in 16..<24 { expected[i] = 0x99 }
        try withImage(r.device) { _, fs throws in
            let got = try readAll(fs, "/dst")
            #expect(got == expected, "the clone after a power failure: \(firstDifference(got, expected))")
            #expect(try readAll(fs, "/src") == data)
            let report = try fs.check()
            #expect(report.isClean, "\(report.problems)")
        }
    }

    @Test("allocating stores to holes of a new file, then sync: an ADR image keeps file, size and bytes")
    func allocatingSyncPowerFail() throws {
        let r = try BlackBoxRig("allocpf", options: advEmulated())
        try #require(r.fs.faultHandling == .userfaultfd)
        let file = try r.fs.create("/f")
        defer { file.close() }
        try file.truncate(to: 3 * advPage, ifBusy: .fail)
        let mapping = try file.map(count: 3 * advPage)
        defer { mapping.unmap() }
        advStore(mapping, 5, [7, 7, 7])
        advStore(mapping, 2 * advPage + 4000, [8, 8])
        try file.sync()
        #expect(r.device.unpersistedRanges().isEmpty || true)
        var expected = advZeros(3 * advPage)
        expected.replaceSubrange(5..<8, with: [7, 7, 7])
        expected.replaceSubrange(2 * advPage + 4000..<2 * advPage + 4002, with: [8, 8])
        try withImage(r.device) { _, fs throws in
            let got = try readAll(fs, "/f")
            #expect(got == expected, "\(firstDifference(got, expected))")
            let f = try fs.open("/f", access: .readOnly)
            defer { f.close() }
            let frames = try f.frames(offset: 0, count: 3 * advPage)
            #expect(frames[0] != nil && frames[1] == nil && frames[2] != nil, "\(frames)")
            #expect(try fs.check().isClean)
        }
    }

    @Test("under eADR a write() and a mapping store survive without sync; the image mounts clean")
    func eadrWithoutSync() throws {
        let r = try BlackBoxRig("eadr", options: advEmulated(.eadr))
        try #require(r.fs.faultHandling == .userfaultfd)
        let file = try r.fs.create("/f")
        defer { file.close() }
        let data = advPattern(2 * advPage, seed: 43)
        try file.write(data, at: 0)
        let mapping = try file.map(count: 2 * advPage)
        defer { mapping.unmap() }
        advStore(mapping, 100, 0xAB)
        var expected = data
        expected[100] = 0xAB
        #expect(
            r.device.unpersistedRanges().isEmpty, "under eADR nothing is unpersisted: \(r.device.unpersistedRanges())")
        try withImage(r.device) { _, fs throws in
            #expect(try readAll(fs, "/f") == expected)
            #expect(try fs.check().isClean)
        }
    }

    @Test(
        "under ADR an unsynced mapping store is unpersisted and in the .all image only; sync lists nothing of the file")
    func adrUnsyncedStore() throws {
        let r = try BlackBoxRig("adr", options: advEmulated(.adr))
        let data = try r.make("/f", advPattern(2 * advPage, seed: 44))
        let file = try r.fs.open("/f")
        defer { file.close() }
        try file.sync()
        let frames = try file.frames(offset: 0, count: 2 * advPage).map { try #require($0) }
        let fileRanges = frames.map { Int($0.rawValue) * advPage..<(Int($0.rawValue) + 1) * advPage }
        let mapping = try file.map(count: 2 * advPage)
        defer { mapping.unmap() }
        advStore(mapping, advPage + 64, 0xCD)
        let dirty = r.device.unpersistedRanges().filter { range in fileRanges.contains { $0.overlaps(range) } }
        #expect(dirty.count == 1 && dirty.first.map { fileRanges[1].contains($0.lowerBound) } == true, "\(dirty)")
        try withImage(r.device, keeping: .none) { _, fs throws in
            #expect(try readAll(fs, "/f") == data)
            #expect(try fs.check().isClean)
        }
        var expected = data
        expected[advPage + 64] = 0xCD
        try withImage(r.device, keeping: .all) { _, fs throws in
            #expect(try readAll(fs, "/f") == expected)
        }
        try file.sync()
        let after = r.device.unpersistedRanges().filter { range in fileRanges.contains { $0.overlaps(range) } }
        #expect(after.isEmpty, "\(after)")
        try withImage(r.device, keeping: .none) { _, fs throws in
            #expect(try readAll(fs, "/f") == expected)
        }
    }

    @Test("migrate then a power failure: an image after sync holds the bytes at the new frames")
    func migrateSyncPowerFail() throws {
        let r = try BlackBoxRig("migpf", options: advEmulated())
        let data = try r.make("/f", advPattern(3 * advPage, seed: 45))
        let file = try r.fs.open("/f")
        defer { file.close() }
        let mapping = try file.map(count: 3 * advPage)
        defer { mapping.unmap() }
        _ = try file.migrate(offset: 0, count: 3 * advPage)
        advStore(mapping, 2 * advPage + 1, 0x12)
        try file.sync()
        var expected = data
        expected[2 * advPage + 1] = 0x12
        try withImage(r.device) { _, fs throws in
            let got = try readAll(fs, "/f")
            #expect(got == expected, "\(firstDifference(got, expected))")
            #expect(try fs.check().isClean)
        }
    }

    @Test("a punch of a mapped, stored page then a store again: a new zeroed block, old bytes never reappear")
    func punchMappedThenStore() throws {
        let r = try BlackBoxRig("punchmapped")
        try #require(r.fs.faultHandling == .userfaultfd)
        let data = try r.make("/f", advPattern(2 * advPage, seed: 46))
        let file = try r.fs.open("/f")
        defer { file.close() }
        let m1 = try file.map(count: 2 * advPage)
        let m2 = try file.map(count: 2 * advPage)
        defer {
            m1.unmap()
            m2.unmap()
        }
        #expect(advBytes(m2, at: 0, count: 2 * advPage) == data)
        try file.punchHole(offset: 0, count: advPage, ifBusy: .fail)
        #expect(advBytes(m1, at: 0, count: advPage) == advZeros(advPage))
        #expect(advBytes(m2, at: 0, count: advPage) == advZeros(advPage))
        advStore(m2, 30, 0x31)
        var expected = advZeros(advPage)
        expected[30] = 0x31
        #expect(advBytes(m1, at: 0, count: advPage) == expected)
        #expect(try file.read(count: advPage, at: 0) == expected)
        #expect(advBytes(m1, at: advPage, count: advPage) == Array(data[advPage...]))
        r.expectClean("after punch and store")
    }
}

// MARK: - Bad input everywhere

@Suite("Adversarial: bad input")
struct AdversarialBadInputTests {
    @Test("bad paths to create/open/createDirectory/remove/rename: a DAXError, tree unchanged, check clean")
    func badPaths() throws {
        let r = try BlackBoxRig("badpaths")
        let data = try r.make("/file", advPattern(500, seed: 50))
        try r.fs.createDirectory("/dir")
        try r.make("/dir/inner", [1])
        let tree = try r.tree()
        let stats = r.fs.statistics()
        let long = String(repeating: "n", count: 300)
        let veryLong = String(repeating: "v", count: 20000)
        expectSomeDAXError("create of an empty path") { try r.fs.create("") }
        expectSomeDAXError("create of /") { try r.fs.create("/") }
        expectSomeDAXError("create of a 300-byte name") { try r.fs.create("/" + long) }
        expectSomeDAXError("create of a 20000-byte name") { try r.fs.create("/" + veryLong) }
        expectSomeDAXError("createDirectory of a 300-byte name") { try r.fs.createDirectory("/" + long) }
        expectSomeDAXError("create with a NUL in the name") { try r.fs.create("/a\u{0}b") }
        expectCode([.notFound], "create in a missing directory") { try r.fs.create("/missing/x") }
        expectCode([.notADirectory], "create under a file") { try r.fs.create("/file/x") }
        expectCode([.alreadyExists], "create over a file") { try r.fs.create("/file") }
        expectCode([.alreadyExists], "create over a directory") { try r.fs.create("/dir") }
        expectCode([.alreadyExists], "createDirectory over a file") { try r.fs.createDirectory("/file") }
        expectCode([.isADirectory], "open of a directory") { try r.fs.open("/dir") }
        expectCode([.notADirectory], "contents of a file") { try r.fs.contentsOfDirectory("/file") }
        expectCode([.notFound], "contents of a missing path") { try r.fs.contentsOfDirectory("/nothing") }
        expectCode([.notFound], "open of a missing file") { try r.fs.open("/nothing") }
        expectCode([.notADirectory], "open under a file") { try r.fs.open("/file/x") }
        expectCode([.directoryNotEmpty], "remove of a non-empty directory") { try r.fs.remove("/dir") }
        expectSomeDAXError("remove of /") { try r.fs.remove("/") }
        expectCode([.notFound], "remove of a missing file") { try r.fs.remove("/nothing") }
        expectSomeDAXError("rename of a long name") { try r.fs.rename("/file", to: "/" + long) }
        expectCode([.notFound], "rename of a missing file") { try r.fs.rename("/nothing", to: "/x") }
        expectCode([.notFound], "rename into a missing directory") { try r.fs.rename("/file", to: "/missing/x") }
        expectSomeDAXError("rename of /") { try r.fs.rename("/", to: "/root2") }
        expectSomeDAXError("rename of a directory over a file") { try r.fs.rename("/dir", to: "/file") }
        expectSomeDAXError("rename of a file over a non-empty directory") { try r.fs.rename("/file", to: "/dir") }
        expectSomeDAXError("clone to a 300-byte name") { try r.fs.clone("/file", to: "/" + long) }
        #expect(try r.tree() == tree)
        #expect(try r.contents("/file") == data)
        #expect(r.fs.statistics().freeBlocks == stats.freeBlocks)
        r.expectClean("after bad paths")
        try r.remount()
        #expect(try r.tree() == tree)
        r.expectClean("after remount")
    }

    @Test("rename of a directory into its own subtree is refused; the tree stays reachable")
    func renameIntoOwnSubtree() throws {
        let r = try BlackBoxRig("renameloop")
        try r.fs.createDirectory("/d")
        try r.fs.createDirectory("/d/e")
        try r.make("/d/e/f", [1, 2, 3])
        let tree = try r.tree()
        expectCode([.invalidArgument], "rename /d to /d/e/g") { try r.fs.rename("/d", to: "/d/e/g") }
        expectCode([.invalidArgument], "rename /d to /d/x") { try r.fs.rename("/d", to: "/d/x") }
        #expect(try r.tree() == tree)
        #expect(try r.contents("/d/e/f") == [1, 2, 3])
        r.expectClean("after refused renames")
        try r.remount()
        #expect(try r.tree() == tree)
        r.expectClean("after remount")
    }

    @Test("rename edge cases: onto itself, over a file (replaces it), over an empty directory; counts balance")
    func renameEdgeCases() throws {
        let r = try BlackBoxRig("renameedge")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let a = try r.make("/a", advPattern(2 * advPage, seed: 51))
        try r.make("/b", advPattern(3 * advPage, seed: 52))
        // Onto itself: POSIX says nothing happens.
        do { try r.fs.rename("/a", to: "/a") } catch let error as DAXError {
            Issue.record("rename onto itself: \(error)")
        }
        #expect(try r.contents("/a") == a)
        // Over an existing file: replaces it, its blocks are freed.
        try r.fs.rename("/a", to: "/b")
        #expect(try r.tree() == ["b", "keep"])
        #expect(try r.contents("/b") == a)
        #expect(r.fs.statistics().freeBlocks == free0 - 2, "the replaced file's blocks were not freed")
        // A directory over an empty directory: replaces it.
        try r.fs.createDirectory("/d1")
        try r.fs.createDirectory("/d2")
        try r.make("/d1/x", [9])
        try r.fs.rename("/d1", to: "/d2")
        #expect(try r.tree() == ["b", "d2/", "d2/x", "keep"])
        r.expectClean("after renames")
        try r.remount()
        #expect(try r.tree() == ["b", "d2/", "d2/x", "keep"])
        try r.fs.remove("/d2/x")
        try r.fs.remove("/d2")
        try r.fs.remove("/b")
        #expect(r.fs.statistics().freeBlocks == free0)
        r.expectClean("after removal")
    }

    @Test(
        "overflowing offsets and counts in dedup, migrate, frames, DMA and powerFail: DAXError, no trap (child process)"
    )
    func overflowsInChild() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let path = "/dev/shm/adv-overflow-\(getpid())"
            var options = PMemDevice.Options()
            options.persistence = .cacheFlush
            options.powerFailureEmulation = .adr
            guard let device = try? PMemDevice.create(path: path, size: 8 << 20, options: options) else { exit(2) }
            unlink(path)
            guard let fs = try? DAXFileSystem.format(device), let file = try? fs.create("/f"),
                let other = try? fs.create("/g")
            else { exit(3) }
            let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 3 &+ 1) }
            guard (try? file.write(data, at: 0)) != nil, (try? other.write(data, at: 0)) != nil,
                let mapping = try? file.map(count: 8192)
            else { exit(4) }
            let engine = DMAEngine(device: device)
            guard let pin = try? mapping.pin(offset: 0, count: 8192) else { exit(5) }
            let region = engine.register(pin)
            let frames = try? file.frames(offset: 0, count: 8192)
            let gFrames = try? other.frames(offset: 0, count: 8192)
            let steps = ChildSteps()
            let bad: [DAXError.Code] = [.invalidArgument]
            steps.step("dedup offset Int.max", bad) {
                _ = try fs.deduplicate("/f", offset: Int.max, "/g", offset: 0, count: 4096)
            }
            steps.step("dedup dest offset Int.max", bad) {
                _ = try fs.deduplicate("/f", offset: 0, "/g", offset: Int.max, count: 4096)
            }
            steps.step("dedup count Int.max", bad) {
                _ = try fs.deduplicate("/f", offset: 4096, "/g", offset: 4096, count: Int.max)
            }
            steps.step("dedup offset -4096", bad) {
                _ = try fs.deduplicate("/f", offset: -4096, "/g", offset: 0, count: 4096)
            }
            steps.step("dedup offset Int.min", bad) {
                _ = try fs.deduplicate("/f", offset: Int.min, "/g", offset: 0, count: 4096)
            }
            steps.step("migrate offset Int.max count Int.max", bad) {
                _ = try file.migrate(offset: Int.max, count: Int.max)
            }
            FileHandle.standardError.write(Data("step migrate offset 4096 count Int.max\n".utf8))
            do {
                // A range reaching past the end moves only the file's pages (other suites' reading).
                let result = try file.migrate(offset: 4096, count: Int.max)
                if result.migrated + result.busy.count != 1 {
                    steps.mismatch("migrate to Int.max: \(result)")
                }
            } catch let error as DAXError where error.code == .invalidArgument {
            } catch {
                steps.mismatch("migrate to Int.max: \(error)")
            }
            steps.step("frames offset Int.max - 10", bad) { _ = try file.frames(offset: Int.max - 10, count: 4096) }
            steps.step("frames count Int.max", bad) { _ = try file.frames(offset: 4096, count: Int.max) }
            steps.step("DMA write at Int.max", bad) { try engine.write([1], to: region, at: Int.max) }
            steps.step("DMA write at -1", bad) { try engine.write([1], to: region, at: -1) }
            steps.step("DMA write past the region", bad) { try engine.write([1, 2], to: region, at: 8191) }
            steps.step("DMA read count Int.max", bad) { _ = try engine.read(count: Int.max, from: region, at: 0) }
            steps.step("DMA read count -1", bad) { _ = try engine.read(count: -1, from: region, at: 0) }
            steps.step("DMA read at Int.max", bad) { _ = try engine.read(count: 1, from: region, at: Int.max) }
            steps.step("device read count Int.max", bad) { _ = try device.read(count: Int.max, at: 0) }
            steps.step("device read at Int.max", bad) { _ = try device.read(count: 1, at: Int.max) }
            steps.step("device write at Int.max - 1 (two bytes)", bad) { try device.write([1, 2], at: Int.max - 1) }
            steps.step("punch offset Int.max - 10", [.invalidArgument]) {
                try file.punchHole(offset: Int.max - 10, count: Int.max, ifBusy: .fail)
            }
            steps.step("allocate count Int.max", [.invalidArgument, .noSpace]) {
                try file.allocate(offset: 4096, count: Int.max)
            }
            steps.step("write at Int.max - 1", [.invalidArgument, .noSpace]) {
                try file.write([1, 2, 3], at: Int.max - 1)
            }
            steps.step("truncate to Int.max - 100", [.invalidArgument, .noSpace]) {
                try file.truncate(to: Int.max - 100, ifBusy: .fail)
            }
            steps.step("map offset Int.max & ~4095", bad) { _ = try file.map(offset: Int.max & ~4095, count: 4096) }
            steps.step("map count Int.max", bad + [.noSpace]) { _ = try file.map(offset: 4096, count: Int.max & ~4095) }
            steps.step("pin offset Int.max", bad) {
                let p = try mapping.pin(offset: Int.max & ~4095, count: 4096)
                p.release()
            }
            steps.step("pin offset 4096 count Int.max", bad) {
                let p = try mapping.pin(offset: 4096, count: Int.max)
                p.release()
            }
            steps.step("powerFail to an empty path", [.invalidArgument, .notFound, .io, .permissionDenied]) {
                try device.powerFail(writingImageTo: "")
            }
            steps.step("PMemDevice.create size 1", [.invalidArgument]) {
                _ = try PMemDevice.create(path: path + "-one", size: 1)
            }
            unlink(path + "-one")
            FileHandle.standardError.write(Data("step unchanged\n".utf8))
            if (try? file.read(count: 8192, at: 0)) != data || file.size != 8192 {
                steps.mismatch("/f changed")
            }
            if (try? other.read(count: 8192, at: 0)) != data || other.size != 8192 {
                steps.mismatch("/g changed")
            }
            if (try? file.frames(offset: 0, count: 8192)) != frames {
                steps.mismatch("/f frames changed")
            }
            if (try? other.frames(offset: 0, count: 8192)) != gFrames {
                steps.mismatch("/g frames changed")
            }
            if fs.statistics().sharedBlocks != 0 {
                steps.mismatch("sharedBlocks \(fs.statistics().sharedBlocks)")
            }
            engine.deregister(region)
            let stats = fs.statistics()
            if stats.pinnedPages != 0 || stats.pinsAcquired != stats.pinsReleased {
                steps.mismatch("pins \(stats)")
            }
            if let report = try? fs.check(), !report.isClean {
                steps.mismatch("check: \(report.problems)")
            }
            steps.exitWithResult()
        }
        ChildSteps.expectPassed(result)
    }

    @Test("unmount is .busy while a clone's mapping or a pin lives, and then works; remount finds everything")
    func unmountBusyWithCloneMapping() throws {
        let r = try BlackBoxRig("unmountbusy")
        let data = try r.make("/a", advPattern(advPage, seed: 53))
        try r.fs.clone("/a", to: "/b")
        let b = try r.fs.open("/b")
        let mapping = try b.map(count: advPage)
        expectCode([.busy], "unmount while mapped") { try r.fs.unmount() }
        let pin = try mapping.pin(offset: 0, count: advPage, access: .readOnly)
        mapping.unmap()
        expectCode([.busy], "unmount while pinned") { try r.fs.unmount() }
        pin.release()
        b.close()
        try r.remount()
        #expect(try r.contents("/b") == data)
        #expect(r.fs.statistics().sharedBlocks == 1)
        r.expectClean("after busy unmounts")
    }
}

// MARK: - Bytes past the end of the last partial page

@Suite("Adversarial: bytes stored past the end of the file in its last page")
struct AdversarialPastEOFTests {
    /// A file of `size` bytes mapped over its last page, with `garbage` stored through the mapping
    /// past the end of the file (inside the last page, so no fault).
    private func fileWithGarbage(_ r: BlackBoxRig, _ path: String, size: Int) throws -> (DAXFile, DAXMapping, [UInt8]) {
        let file = try r.fs.create(path)
        let data = advPattern(size, seed: 60)
        try file.write(data, at: 0)
        let pages = (size + advPage - 1) / advPage
        let mapping = try file.map(count: pages * advPage)
        advStore(mapping, size + 10, [UInt8](repeating: 0xBB, count: 64))
        return (file, mapping, data)
    }

    @Test("a store past the end in the last page, then truncate up: the grown range reads zeros (POSIX, as xfs does)")
    func storePastEOFThenTruncateUp() throws {
        let r = try BlackBoxRig("eoftrunc")
        let (file, mapping, data) = try fileWithGarbage(r, "/f", size: 1000)
        defer {
            mapping.unmap()
            file.close()
        }
        try file.truncate(to: 2 * advPage, ifBusy: .fail)
        let got = try file.read(count: 2 * advPage, at: 0)
        let expected = data + advZeros(2 * advPage - 1000)
        #expect(got == expected, "read(): \(firstDifference(got, expected))")
        #expect(advBytes(mapping, at: 0, count: advPage) == Array(expected[0..<advPage]), "the mapping")
        r.expectClean("after truncate up")
    }

    @Test("a store past the end in the last page, then a write() further on: the gap reads zeros")
    func storePastEOFThenExtendingWrite() throws {
        let r = try BlackBoxRig("eofwrite")
        let (file, mapping, data) = try fileWithGarbage(r, "/f", size: 1000)
        defer {
            mapping.unmap()
            file.close()
        }
        try file.write([1, 2, 3], at: 3000)
        var expected = data + advZeros(2000)
        expected += [1, 2, 3]
        let got = try file.read(count: file.size, at: 0)
        #expect(got == expected, "read(): \(firstDifference(got, expected))")
        r.expectClean("after the extending write")
    }

    @Test("a store past the end in the last page, then allocate over it: the allocated range reads zeros")
    func storePastEOFThenAllocate() throws {
        let r = try BlackBoxRig("eofalloc")
        let (file, mapping, data) = try fileWithGarbage(r, "/f", size: 1000)
        defer {
            mapping.unmap()
            file.close()
        }
        try file.allocate(offset: 0, count: 2 * advPage)
        let got = try file.read(count: 2 * advPage, at: 0)
        let expected = data + advZeros(2 * advPage - 1000)
        #expect(got == expected, "read(): \(firstDifference(got, expected))")
        r.expectClean("after allocate")
    }

    @Test("a store past the end in the last page, then clone, then truncate the clone up: zeros in the clone")
    func storePastEOFThenCloneTruncateUp() throws {
        let r = try BlackBoxRig("eofclone")
        let (file, mapping, data) = try fileWithGarbage(r, "/f", size: 1000)
        defer {
            mapping.unmap()
            file.close()
        }
        try r.fs.clone("/f", to: "/g")
        try r.with("/g") { try $0.truncate(to: advPage, ifBusy: .fail) }
        let got = try r.contents("/g")
        let expected = data + advZeros(advPage - 1000)
        #expect(got == expected, "the clone: \(firstDifference(got, expected))")
        try file.truncate(to: advPage, ifBusy: .fail)
        let source = try file.read(count: advPage, at: 0)
        #expect(source == expected, "the source: \(firstDifference(source, expected))")
        r.expectClean("after clone and truncate up")
    }

    @Test("a store past the end in the last page, then migrate, then truncate up: zeros")
    func storePastEOFThenMigrate() throws {
        let r = try BlackBoxRig("eofmigrate")
        let (file, mapping, data) = try fileWithGarbage(r, "/f", size: 1000)
        defer {
            mapping.unmap()
            file.close()
        }
        _ = try file.migrate(offset: 0, count: advPage)
        try file.truncate(to: advPage, ifBusy: .fail)
        let got = try file.read(count: advPage, at: 0)
        let expected = data + advZeros(advPage - 1000)
        #expect(got == expected, "\(firstDifference(got, expected))")
    }

    @Test("a store past the end, remount, then truncate up: zeros (the tail is not kept by the device)")
    func storePastEOFThenRemount() throws {
        let r = try BlackBoxRig("eofremount")
        do {
            let (file, mapping, _) = try fileWithGarbage(r, "/f", size: 1000)
            mapping.unmap()
            file.close()
        }
        let data = advPattern(1000, seed: 60)
        try r.remount()
        try r.with("/f") { try $0.truncate(to: advPage, ifBusy: .fail) }
        let got = try r.contents("/f")
        let expected = data + advZeros(advPage - 1000)
        #expect(got == expected, "\(firstDifference(got, expected))")
    }

    @Test("a load of a page wholly past the end of a mapping larger than the file is SIGBUS (child process)")
    func loadPastEOFIsSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let path = "/dev/shm/adv-eofload-\(getpid())"
            guard let device = try? PMemDevice.create(path: path, size: 8 << 20) else { exit(2) }
            unlink(path)
            guard let fs = try? DAXFileSystem.format(device), fs.faultHandling == .userfaultfd,
                let file = try? fs.create("/f")
            else { exit(3) }
            do {
                try file.write([1, 2, 3], at: 0)
                let mapping = try file.map(count: 4 * advPage)
                let byte = mapping.baseAddress.load(fromByteOffset: 2 * advPage + 5, as: UInt8.self)
                exit(byte == 0 ? 10 : 11)  // a value: no SIGBUS
            } catch { exit(4) }
        }
    }

    @Test(
        "a store to a page wholly past the end of a mapping larger than the file is SIGBUS, nothing allocated (child)")
    func storePastEOFIsSIGBUS() async {
        await #expect(processExitsWith: .signal(SIGBUS)) {
            let path = "/dev/shm/adv-eofstore-\(getpid())"
            guard let device = try? PMemDevice.create(path: path, size: 8 << 20) else { exit(2) }
            unlink(path)
            guard let fs = try? DAXFileSystem.format(device), fs.faultHandling == .userfaultfd,
                let file = try? fs.create("/f")
            else { exit(3) }
            do {
                try file.write([1, 2, 3], at: 0)
                let mapping = try file.map(count: 4 * advPage)
                mapping.baseAddress.storeBytes(of: 7 as UInt8, toByteOffset: 3 * advPage, as: UInt8.self)
                exit(file.size == 3 ? 10 : 11)  // no SIGBUS
            } catch { exit(4) }
        }
    }
}

// MARK: - Leases across clones

@Suite("Adversarial: leases and truncate policies across clones")
struct AdversarialLeaseTests {
    @Test("a lease on the source's unshared page is not revoked by a truncate of the clone")
    func truncateCloneKeepsSourceLease() throws {
        let r = try BlackBoxRig("leaseclone")
        let data = try r.make("/a", advPattern(2 * advPage, seed: 70))
        try r.fs.clone("/a", to: "/b")
        let a = try r.fs.open("/a")
        defer { a.close() }
        let mapping = try a.map(count: 2 * advPage)
        defer { mapping.unmap() }
        let asked = Counter()
        let engine = DMAEngine(device: r.device)
        let region = engine.register(
            try mapping.pin(offset: 0, count: advPage, lifetime: .longTerm(onRevoke: { asked.increment() })))
        #expect(
            try r.frames("/b")[0] != region.frames[0], "a long-term pin of a shared page unshares it (invariant 11)")
        try r.with("/b") { try $0.truncate(to: 0, ifBusy: .revokeLeases(grace: .milliseconds(20))) }
        #expect(asked.value == 0, "the source's lease holder was asked to let go by a truncate of the clone")
        #expect(!region.isRevoked)
        try engine.write([0x11], to: region, at: 0)
        var expected = data
        expected[0] = 0x11
        #expect(try a.read(count: 2 * advPage, at: 0) == expected)
        #expect(try r.contents("/b") == [])
        // .fail on the clone's remaining pages never meets the source's pin either.
        try r.fs.clone("/a", to: "/c", ifPinned: .copy)
        try r.with("/c") { try $0.truncate(to: 0, ifBusy: .fail) }
        engine.deregister(region)
        r.expectPinsBalance("after deregister")
        r.expectClean("after truncates of clones")
    }

    @Test("revokeLeases on a source with a lease: revoked, the clone (.copy) keeps its bytes, the device is refused")
    func revokeSourceLeaseAfterClone() throws {
        let r = try BlackBoxRig("leaserevoke")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(2 * advPage, seed: 71))
        let a = try r.fs.open("/a")
        let mapping = try a.map(count: 2 * advPage)
        let engine = DMAEngine(device: r.device)
        let region = engine.register(
            try mapping.pin(offset: advPage, count: advPage, lifetime: .longTerm(onRevoke: {})))
        try r.fs.clone("/a", to: "/b")  // .copy: page 1 copied into the clone
        try a.truncate(to: 0, ifBusy: .revokeLeases(grace: .milliseconds(10)))
        #expect(region.isRevoked)
        expectCode([.revoked], "a DMA write to the revoked region") { try engine.write([1], to: region, at: 0) }
        #expect(try r.contents("/b") == data)
        #expect(r.fs.statistics().quarantinedBlocks == 0, "a revoked pin holds nothing")
        engine.deregister(region)
        mapping.unmap()
        a.close()
        try r.fs.remove("/a")
        try r.fs.remove("/b")
        let stats = r.fs.statistics()
        #expect(stats.freeBlocks == free0)
        #expect(stats.pinsAcquired == stats.pinsReleased && stats.pinnedPages == 0, "\(stats)")
        r.expectClean("after revoke and removal")
    }

    @Test(
        "truncate .wait of a clone whose page is pinned in the source (.unsafeShare): the pinned block stays the source's"
    )
    func unsafeShareTruncateDefer() throws {
        let r = try BlackBoxRig("unsafedefer")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(advPage, seed: 72))
        let a = try r.fs.open("/a")
        let mapping = try a.map(count: advPage)
        let engine = DMAEngine(device: r.device)
        let region = engine.register(try mapping.pin(offset: 0, count: advPage))
        try r.fs.clone("/a", to: "/b", ifPinned: .unsafeShare)
        // Removing the clone drops one reference; the block stays with the source: never quarantined.
        try r.with("/b") { try $0.truncate(to: 0, ifBusy: .deferFree) }
        #expect(r.fs.statistics().quarantinedBlocks == 0, "a block the source still owns is not free")
        #expect(!r.fs.pages.state(of: region.frames[0]).isQuarantined)
        try engine.write([0x77], to: region, at: 1)
        var expected = data
        expected[1] = 0x77
        #expect(try a.read(count: advPage, at: 0) == expected)
        // A new file never gets the pinned block.
        try r.make("/n", advPattern(advPage, seed: 73))
        #expect(try r.frames("/n")[0] != region.frames[0])
        engine.deregister(region)
        mapping.unmap()
        a.close()
        for p in ["/a", "/b", "/n"] { try r.fs.remove(p) }
        #expect(r.fs.statistics().freeBlocks == free0)
        r.expectClean("after unsafeShare and deferred truncate")
    }
}

// MARK: - Races that must keep every byte

@Suite("Adversarial: races with stores through mappings")
struct AdversarialRaceTests {
    @Test("clone while another thread stores through the source's mapping: later stores never reach the clone")
    func cloneRacingStores() throws {
        let r = try BlackBoxRig("clonerace", size: 16 << 20)
        try #require(r.fs.faultHandling == .userfaultfd)
        let file = try r.fs.create("/a")
        defer { file.close() }
        try file.write(advZeros(2 * advPage), at: 0)
        let mapping = try file.map(count: 2 * advPage)
        defer { mapping.unmap() }
        let published = Atomic<Int>(0)
        let stop = Atomic<Bool>(false)
        let base = UInt(bitPattern: mapping.baseAddress)
        let slots = 2 * advPage / 8
        let writer = Thread {
            var c = 1
            let pointer = UnsafeMutableRawPointer(bitPattern: base)!
            while !stop.load(ordering: .acquiring) {
                pointer.storeBytes(of: UInt64(c), toByteOffset: (c % slots) * 8, as: UInt64.self)
                published.store(c, ordering: .releasing)
                c += 1
            }
        }
        writer.start()
        var clones: [(String, Int)] = []
        for index in 0..<8 {
            // The writer is storing while each clone is made.
            let seen = published.load(ordering: .acquiring)
            while published.load(ordering: .acquiring) < seen + 100 { sched_yield() }
            let name = "/c\(index)"
            try r.fs.clone("/a", to: name)
            clones.append((name, published.load(ordering: .acquiring)))
        }
        stop.store(true, ordering: .releasing)
        while !writer.isFinished { sched_yield() }
        for (name, bound) in clones {
            let bytes = try r.contents(name)
            let words = bytes.withUnsafeBytes { Array($0.bindMemory(to: UInt64.self)) }
            let newest = words.max() ?? 0
            #expect(
                newest <= UInt64(bound + 1), "\(name) holds store \(newest), made after the clone returned at \(bound)")
        }
        // The source holds every store: the newest value at each slot is the last one written there.
        let final = published.load(ordering: .acquiring)
        let words = try file.read(count: 2 * advPage, at: 0).withUnsafeBytes { Array($0.bindMemory(to: UInt64.self)) }
        for c in max(1, final - slots + 1)...final {
            #expect(words[c % slots] == UInt64(c), "slot \(c % slots) lost store \(c): \(words[c % slots])")
            if words[c % slots] != UInt64(c) { break }
        }
        r.expectClean("after clones racing stores")
    }

    @Test("dedup while another thread stores into the destination's mapping: the source never changes, no store lost")
    func dedupRacingStores() throws {
        let r = try BlackBoxRig("dedeprace", size: 16 << 20)
        try #require(r.fs.faultHandling == .userfaultfd)
        for round in 0..<12 {
            let data = advPattern(2 * advPage, seed: 80 + round)
            try r.make("/a\(round)", data)
            try r.make("/b\(round)", data)
            let b = try r.fs.open("/b\(round)")
            let mapping = try b.map(count: 2 * advPage)
            _ = advBytes(mapping, at: 0, count: 2 * advPage)
            let base = UInt(bitPattern: mapping.baseAddress)
            let start = StartLine(2)
            let stores = 3000
            let writer = Thread {
                let pointer = UnsafeMutableRawPointer(bitPattern: base)!
                start.arrive()
                for v in 1...stores {
                    pointer.storeBytes(of: UInt32(v), toByteOffset: advPage + 64, as: UInt32.self)
                }
            }
            writer.start()
            start.arrive()
            let shared = try r.fs.deduplicate("/a\(round)", offset: 0, "/b\(round)", offset: 0, count: 2 * advPage)
            while !writer.isFinished { sched_yield() }
            #expect(
                try r.contents("/a\(round)") == data, "round \(round): a store into the destination reached the source")
            var expected = data
            withUnsafeBytes(of: UInt32(stores)) { expected.replaceSubrange(advPage + 64..<advPage + 68, with: $0) }
            let got = try b.read(count: 2 * advPage, at: 0)
            #expect(got == expected, "round \(round) (shared \(shared)): \(firstDifference(got, expected))")
            #expect(advBytes(mapping, at: 0, count: 2 * advPage) == expected, "round \(round): the mapping")
            mapping.unmap()
            b.close()
        }
        r.expectClean("after dedups racing stores")
    }

    @Test("migrate while another thread stores through a mapping: no store lost, every other byte kept")
    func migrateRacingStores() throws {
        let r = try BlackBoxRig("migrace", size: 16 << 20)
        try #require(r.fs.faultHandling == .userfaultfd)
        let data = try r.make("/f", advPattern(2 * advPage, seed: 90))
        let file = try r.fs.open("/f")
        defer { file.close() }
        let mapping = try file.map(count: 2 * advPage)
        defer { mapping.unmap() }
        _ = advBytes(mapping, at: 0, count: 2 * advPage)
        let base = UInt(bitPattern: mapping.baseAddress)
        var expected = data
        for round in 0..<10 {
            let start = StartLine(2)
            let stores = 3000
            let offset = (round % 2) * advPage + 128
            let writer = Thread {
                let pointer = UnsafeMutableRawPointer(bitPattern: base)!
                start.arrive()
                for v in 1...stores {
                    pointer.storeBytes(of: UInt32(v + round * 10000), toByteOffset: offset, as: UInt32.self)
                }
            }
            writer.start()
            start.arrive()
            let result = try file.migrate(offset: 0, count: 2 * advPage)
            while !writer.isFinished { sched_yield() }
            withUnsafeBytes(of: UInt32(stores + round * 10000)) {
                expected.replaceSubrange(offset..<offset + 4, with: $0)
            }
            let got = try file.read(count: 2 * advPage, at: 0)
            #expect(got == expected, "round \(round) (\(result)): \(firstDifference(got, expected))")
            #expect(advBytes(mapping, at: 0, count: 2 * advPage) == expected, "round \(round): the mapping")
        }
        r.expectClean("after migrations racing stores")
    }
}

// MARK: - Crash exploration of forking operations

private struct AdvCheckFailure: Error, CustomStringConvertible {
    var description: String
}

private func advOpenRead(_ fs: DAXFileSystem, _ path: String) throws -> [UInt8]? {
    let file: DAXFile
    do { file = try fs.open(path, access: .readOnly) } catch let error as DAXError where error.code == .notFound {
        return nil
    }
    defer { file.close() }
    return try file.read(count: file.size, at: 0)
}

@Suite("Adversarial: crash exploration of dedup, migrate, punch of shared pages, snapshot removal")
struct AdversarialCrashTests {
    private func explore(
        _ setup: @escaping (DAXFileSystem) throws -> Void, workload: @escaping (DAXFileSystem) throws -> Void,
        check: @escaping (DAXFileSystem) throws -> Void
    ) throws -> CrashReport {
        let explorer = CrashExplorer(deviceSize: 4 << 20, imagesPerPoint: 2, seed: 7)
        return try explorer.explore(
            setup: { device in
                let fs = try DAXFileSystem.format(device)
                try setup(fs)
                try fs.unmount()
            },
            workload: { device in
                let fs = try DAXFileSystem.mount(device)
                try workload(fs)
                try fs.unmount()
            },
            check: { image in
                let fs = try DAXFileSystem.mount(image)
                defer { try? fs.unmount() }
                let report = try fs.check()
                guard report.isClean else { throw AdvCheckFailure(description: "not clean: \(report.problems)") }
                try check(fs)
            })
    }

    @Test(
        "dedup from a source whose stores through a mapping are not durable yet, then power failure: the destination keeps its bytes",
        arguments: [true, false])
    func dedupOfUnpersistedSource(unmapFirst: Bool) throws {
        let r = try BlackBoxRig("adv-dedup-unpersisted", options: advEmulated())
        let old = [UInt8](repeating: 0x41, count: 2 * 4096)
        let new = [UInt8](repeating: 0x42, count: 2 * 4096)
        _ = try r.make("/s", old)
        _ = try r.make("/d", new)
        try r.with("/s") { try $0.sync() }
        try r.with("/d") { try $0.sync() }
        let source = try r.fs.open("/s")
        defer { source.close() }
        let mapping = try source.map(count: 2 * 4096)
        defer { mapping.unmap() }
        // The source now equals the destination, in the CPU's view only.
        new.withUnsafeBytes { mapping.baseAddress.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        if unmapFirst { mapping.unmap() }
        #expect(try r.fs.deduplicate("/s", offset: 0, "/d", offset: 0, count: 2 * 4096) == 2 * 4096)
        try withImage(r.device) { _, fs throws in
            #expect(try fs.check().isClean)
            // Both name one block now: what was compared must be what the crash keeps.
            #expect(try readAll(fs, "/d") == new, "the destination, durable and never written, changed")
            #expect(try readAll(fs, "/s") == new)
        }
    }

    @Test("dedup cut by a crash at any fence: both files keep their bytes, check clean")
    func dedupCrash() throws {
        let data = advPattern(3 * advPage, seed: 100)
        let report = try explore(
            { fs in
                for name in ["/a", "/b"] {
                    let f = try fs.create(name)
                    try f.write(data, at: 0)
                    f.close()
                }
            },
            workload: { fs in
                _ = try fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 3 * advPage)
            },
            check: { fs in
                for name in ["/a", "/b"] {
                    guard try advOpenRead(fs, name) == data else {
                        throw AdvCheckFailure(description: "\(name) changed")
                    }
                }
            })
        #expect(report.crashPoints > 0)
        #expect(report.failures.isEmpty, "\(report.failures.prefix(3))")
    }

    @Test("migrate cut by a crash at any fence: the file keeps every byte, check clean")
    func migrateCrash() throws {
        let data = advPattern(3 * advPage, seed: 101)
        let report = try explore(
            { fs in
                let f = try fs.create("/f")
                try f.write(data, at: 0)
                f.close()
            },
            workload: { fs in
                let f = try fs.open("/f")
                _ = try f.migrate(offset: 0, count: 3 * advPage)
                f.close()
            },
            check: { fs in
                guard try advOpenRead(fs, "/f") == data else { throw AdvCheckFailure(description: "/f changed") }
            })
        #expect(report.crashPoints > 0)
        #expect(report.failures.isEmpty, "\(report.failures.prefix(3))")
    }

    @Test("a partial punch and a truncate of a clone's shared pages cut by a crash: the source never changes")
    func punchSharedCrash() throws {
        let data = advPattern(3 * advPage, seed: 102)
        let report = try explore(
            { fs in
                let f = try fs.create("/a")
                try f.write(data, at: 0)
                f.close()
                try fs.clone("/a", to: "/b")
            },
            workload: { fs in
                let b = try fs.open("/b")
                try b.punchHole(offset: 100, count: advPage, ifBusy: .fail)
                try b.truncate(to: 2 * advPage + 7, ifBusy: .fail)
                b.close()
            },
            check: { fs in
                guard try advOpenRead(fs, "/a") == data else { throw AdvCheckFailure(description: "/a changed") }
                guard let b = try advOpenRead(fs, "/b") else { throw AdvCheckFailure(description: "/b gone") }
                var punched = data
                punched.replaceSubrange(100..<advPage + 100, with: advZeros(advPage))
                let ok = [data, punched, Array(punched[0..<(2 * advPage + 7)])]
                guard ok.contains(b) else {
                    throw AdvCheckFailure(description: "/b is neither old nor new: \(b.count) bytes")
                }
            })
        #expect(report.crashPoints > 0)
        #expect(report.failures.isEmpty, "\(report.failures.prefix(3))")
    }

    @Test("copy-on-write through a mapping of a clone, then sync, cut by a crash: the source never changes")
    func cowMappingCrash() throws {
        let data = advPattern(2 * advPage, seed: 105)
        var stored = data
        for i in 16..<24 { stored[i] = 0x99 }
        let report = try explore(
            { fs in
                let f = try fs.create("/src")
                try f.write(data, at: 0)
                f.close()
                try fs.clone("/src", to: "/dst")
            },
            workload: { fs in
                let d = try fs.open("/dst")
                let m = try d.map(count: 2 * advPage)
                m.baseAddress.storeBytes(of: 0x9999_9999_9999_9999 as UInt64, toByteOffset: 16, as: UInt64.self)
                try d.sync()
                m.unmap()
                d.close()
            },
            check: { fs in
                guard try advOpenRead(fs, "/src") == data else { throw AdvCheckFailure(description: "/src changed") }
                guard let d = try advOpenRead(fs, "/dst"), d == data || d == stored else {
                    throw AdvCheckFailure(description: "/dst is neither old nor new")
                }
            })
        #expect(report.crashPoints > 0)
        #expect(report.failures.isEmpty, "\(report.failures.prefix(3))")
    }

    @Test("write() into a deduplicated destination cut by a crash: the source never changes")
    func writeDedupedCrash() throws {
        let data = advPattern(2 * advPage, seed: 106)
        let report = try explore(
            { fs in
                for name in ["/a", "/b"] {
                    let f = try fs.create(name)
                    try f.write(data, at: 0)
                    f.close()
                }
                _ = try fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 2 * advPage)
            },
            workload: { fs in
                let b = try fs.open("/b")
                try b.write([1, 2, 3], at: advPage - 1)
                b.close()
            },
            check: { fs in
                guard try advOpenRead(fs, "/a") == data else { throw AdvCheckFailure(description: "/a changed") }
            })
        #expect(report.crashPoints > 0)
        #expect(report.failures.isEmpty, "\(report.failures.prefix(3))")
    }

    @Test("removing a snapshot tree cut by a crash: the original tree keeps its bytes, check clean")
    func removeSnapshotCrash() throws {
        let x = advPattern(2 * advPage, seed: 103)
        let y = advPattern(advPage + 9, seed: 104)
        let report = try explore(
            { fs in
                try fs.createDirectory("/d")
                for (name, bytes) in [("/d/x", x), ("/d/y", y)] {
                    let f = try fs.create(name)
                    try f.write(bytes, at: 0)
                    f.close()
                }
                try fs.clone("/d", to: "/s")
            },
            workload: { fs in
                try fs.remove("/s/x")
                try fs.remove("/s/y")
                try fs.remove("/s")
                try fs.clone("/d", to: "/t")
            },
            check: { fs in
                guard try advOpenRead(fs, "/d/x") == x, try advOpenRead(fs, "/d/y") == y else {
                    throw AdvCheckFailure(description: "the original tree changed")
                }
                if let tx = try advOpenRead(fs, "/t/x"), tx != x { throw AdvCheckFailure(description: "/t/x wrong") }
            })
        #expect(report.crashPoints > 0)
        #expect(report.failures.isEmpty, "\(report.failures.prefix(3))")
    }
}

// MARK: - Every kind of mapping follows clone, dedup and migrate

/// The three kinds of mapping a file has (the owner's .readWrite and .readOnly mappings, and a
/// reader's .readOnly mapping of the file opened .readOnly).
enum AdvMappingKind: String, CaseIterable, Sendable, CustomStringConvertible {
    case readWrite, readOnly, readOnlyOfReadOnlyFile
    var description: String { rawValue }

    func map(_ fs: DAXFileSystem, _ owner: DAXFile, path: String, count: Int) throws -> (DAXMapping, DAXFile?) {
        switch self {
        case .readWrite: return (try owner.map(count: count, access: .readWrite), nil)
        case .readOnly: return (try owner.map(count: count, access: .readOnly), nil)
        case .readOnlyOfReadOnlyFile:
            let reader = try fs.open(path, access: .readOnly)
            return (try reader.map(count: count, access: .readOnly), reader)
        }
    }
}

@Suite("Adversarial: every kind of mapping follows forking")
struct AdversarialMappingKindTests {
    @Test("after migrate, a write() shows in every kind of mapping of the file", arguments: AdvMappingKind.allCases)
    func migrateThenWrite(kind: AdvMappingKind) throws {
        let r = try BlackBoxRig("kindmig-\(kind)")
        let data = try r.make("/f", advPattern(2 * advPage, seed: 110))
        let file = try r.fs.open("/f")
        defer { file.close() }
        let (mapping, reader) = try kind.map(r.fs, file, path: "/f", count: 2 * advPage)
        defer {
            mapping.unmap()
            reader?.close()
        }
        #expect(advBytes(mapping, at: 0, count: 2 * advPage) == data)
        let result = try file.migrate(offset: 0, count: 2 * advPage)
        #expect(result.migrated == 2 && result.busy.isEmpty, "\(result)")
        #expect(advBytes(mapping, at: 0, count: 2 * advPage) == data)
        try file.write([0xA1, 0xA2], at: advPage + 9)
        #expect(
            advBytes(mapping, at: advPage + 9, count: 2) == [0xA1, 0xA2], "\(kind): the mapping shows a stale frame")
        let frame = try #require(try file.frames(offset: advPage, count: advPage)[0])
        #expect(r.fs.pages.state(of: frame).mapCount >= 1, "\(kind): the new frame is not mapped")
        r.expectClean("\(kind)")
    }

    @Test(
        "a write() to a shared page copies it; every kind of mapping of the writer shows the copy, the other file's not",
        arguments: AdvMappingKind.allCases)
    func cowThenMappingsOfWriter(kind: AdvMappingKind) throws {
        let r = try BlackBoxRig("kindcow-\(kind)")
        let data = try r.make("/a", advPattern(2 * advPage, seed: 111))
        try r.fs.clone("/a", to: "/b")
        let a = try r.fs.open("/a")
        let b = try r.fs.open("/b")
        defer {
            a.close()
            b.close()
        }
        let (ma, ra) = try kind.map(r.fs, a, path: "/a", count: 2 * advPage)
        let (mb, rb) = try kind.map(r.fs, b, path: "/b", count: 2 * advPage)
        defer {
            ma.unmap()
            mb.unmap()
            ra?.close()
            rb?.close()
        }
        #expect(advBytes(ma, at: 0, count: 2 * advPage) == data)
        #expect(advBytes(mb, at: 0, count: 2 * advPage) == data)
        try a.write([0xC1], at: 5)
        #expect(advBytes(ma, at: 5, count: 1) == [0xC1], "\(kind): the writer's mapping misses its write")
        #expect(advBytes(mb, at: 5, count: 1) == [data[5]], "\(kind): the other file's mapping shows the write")
        try b.write([0xC2], at: advPage + 5)
        #expect(advBytes(mb, at: advPage + 5, count: 1) == [0xC2])
        #expect(advBytes(ma, at: advPage + 5, count: 1) == [data[advPage + 5]])
        r.expectClean("\(kind)")
    }

    @Test(
        "after dedup into a mapped destination, a write() to it shows in every kind of its mapping",
        arguments: AdvMappingKind.allCases)
    func dedupThenWrite(kind: AdvMappingKind) throws {
        let r = try BlackBoxRig("kinddedup-\(kind)")
        let data = try r.make("/a", advPattern(2 * advPage, seed: 112))
        try r.make("/b", data)
        let b = try r.fs.open("/b")
        defer { b.close() }
        let (mb, rb) = try kind.map(r.fs, b, path: "/b", count: 2 * advPage)
        defer {
            mb.unmap()
            rb?.close()
        }
        #expect(advBytes(mb, at: 0, count: 2 * advPage) == data)
        let shared = try r.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 2 * advPage)
        #expect(shared == 2 * advPage, "\(kind): a mapping that is not writable holds no page back")
        #expect(advBytes(mb, at: 0, count: 2 * advPage) == data)
        try b.write([0xD1], at: 7)
        #expect(advBytes(mb, at: 7, count: 1) == [0xD1], "\(kind): the mapping shows a stale frame")
        #expect(try r.contents("/a") == data)
        r.expectClean("\(kind)")
    }

    @Test("after dedup, a store through the SOURCE's writable mapping never reaches the destination")
    func dedupThenStoreThroughSource() throws {
        let r = try BlackBoxRig("dedupsrcstore")
        try #require(r.fs.faultHandling == .userfaultfd)
        let data = try r.make("/a", advPattern(2 * advPage, seed: 113))
        try r.make("/b", data)
        let a = try r.fs.open("/a")
        defer { a.close() }
        let ma = try a.map(count: 2 * advPage)
        defer { ma.unmap() }
        #expect(advBytes(ma, at: 0, count: 2 * advPage) == data)
        advStore(ma, 0, data[0])  // the source's pages are mapped writable now
        let shared = try r.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 2 * advPage)
        #expect(shared == 2 * advPage)
        let before = r.fs.statistics()
        advStore(ma, advPage + 3, 0xE3)
        #expect(try r.contents("/b") == data, "a store through the source's mapping reached the destination")
        #expect(r.fs.statistics().faults.copyOnWrite - before.faults.copyOnWrite == 1)
        #expect(try a.read(count: 1, at: advPage + 3) == [0xE3])
        r.expectClean("after a store through the source")
    }

    @Test("after dedup, .readWrite pins on either side unshare first: DMA writes reach only the pinning file")
    func dedupThenPinBothSides() throws {
        let r = try BlackBoxRig("deduppinboth")
        let data = try r.make("/a", advPattern(2 * advPage, seed: 114))
        try r.make("/b", data)
        #expect(try r.fs.deduplicate("/a", offset: 0, "/b", offset: 0, count: 2 * advPage) == 2 * advPage)
        let a = try r.fs.open("/a")
        let b = try r.fs.open("/b")
        defer {
            a.close()
            b.close()
        }
        let ma = try a.map(count: 2 * advPage)
        let mb = try b.map(count: 2 * advPage)
        defer {
            ma.unmap()
            mb.unmap()
        }
        let engine = DMAEngine(device: r.device)
        let ra = engine.register(try ma.pin(offset: 0, count: advPage))
        let rb = engine.register(try mb.pin(offset: advPage, count: advPage))
        try engine.write([0x01], to: ra, at: 0)
        try engine.write([0x02], to: rb, at: 0)
        var ea = data
        ea[0] = 0x01
        var eb = data
        eb[advPage] = 0x02
        #expect(try a.read(count: 2 * advPage, at: 0) == ea)
        #expect(try b.read(count: 2 * advPage, at: 0) == eb)
        #expect(advBytes(ma, at: 0, count: 2 * advPage) == ea)
        #expect(advBytes(mb, at: 0, count: 2 * advPage) == eb)
        engine.deregister(ra)
        engine.deregister(rb)
        r.expectPinsBalance("after deregister")
        r.expectClean("after DMA to deduplicated files")
    }

    @Test("migrate of a page shared with a mapped clone: both mappings keep their bytes and stores never cross")
    func migrateSharedWithMappedClone() throws {
        let r = try BlackBoxRig("migsharedmap")
        try #require(r.fs.faultHandling == .userfaultfd)
        let data = try r.make("/a", advPattern(2 * advPage, seed: 115))
        try r.fs.clone("/a", to: "/b")
        let a = try r.fs.open("/a")
        let b = try r.fs.open("/b")
        defer {
            a.close()
            b.close()
        }
        let ma = try a.map(count: 2 * advPage)
        let mb = try b.map(count: 2 * advPage)
        defer {
            ma.unmap()
            mb.unmap()
        }
        #expect(advBytes(ma, at: 0, count: 2 * advPage) == data)
        #expect(advBytes(mb, at: 0, count: 2 * advPage) == data)
        let result = try a.migrate(offset: 0, count: 2 * advPage)
        #expect(result.busy.isEmpty, "\(result)")
        #expect(advBytes(ma, at: 0, count: 2 * advPage) == data)
        #expect(advBytes(mb, at: 0, count: 2 * advPage) == data)
        advStore(mb, 11, 0xB1)
        advStore(ma, advPage + 11, 0xA1)
        var ea = data
        ea[advPage + 11] = 0xA1
        var eb = data
        eb[11] = 0xB1
        do {
            let got = try a.read(count: 2 * advPage, at: 0)
            #expect(got == ea, "/a: \(firstDifference(got, ea))")
        }
        do {
            let got = try b.read(count: 2 * advPage, at: 0)
            #expect(got == eb, "/b: \(firstDifference(got, eb))")
        }
        #expect(advBytes(ma, at: 0, count: 2 * advPage) == ea)
        #expect(advBytes(mb, at: 0, count: 2 * advPage) == eb)
        r.expectClean("after migrate of shared, mapped pages")
    }
}

// MARK: - Orphans with shared blocks

@Suite("Adversarial: orphans holding shared blocks")
struct AdversarialOrphanTests {
    @Test("a removed but mapped clone source: stores copy (never reach the clone); unmap frees only its own blocks")
    func orphanSourceStores() throws {
        let r = try BlackBoxRig("orphanshared")
        try #require(r.fs.faultHandling == .userfaultfd)
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(3 * advPage, seed: 120))
        try r.fs.clone("/a", to: "/b")
        let a = try r.fs.open("/a")
        let ma = try a.map(count: 3 * advPage)
        #expect(advBytes(ma, at: 0, count: 3 * advPage) == data)
        try r.fs.remove("/a")
        a.close()
        advStore(ma, advPage, 0x0F)
        #expect(try r.contents("/b") == data, "a store to the orphan reached the clone")
        #expect(advBytes(ma, at: advPage, count: 1) == [0x0F])
        #expect(r.fs.statistics().freeBlocks == free0 - 4, "3 blocks of /b and the orphan's copy")
        ma.unmap()
        #expect(r.fs.statistics().freeBlocks == free0 - 3)
        #expect(r.fs.statistics().sharedBlocks == 0)
        r.expectClean("after the orphan is gone")
        try r.remount()
        #expect(try r.contents("/b") == data)
        try r.fs.remove("/b")
        #expect(r.fs.statistics().freeBlocks == free0)
        r.expectClean("after removal")
    }

    @Test(
        "a power failure while a removed clone source is still mapped: the next mount frees the orphan, keeps the clone"
    )
    func orphanSharedPowerFail() throws {
        let r = try BlackBoxRig("orphanpf", options: advEmulated())
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(3 * advPage, seed: 121))
        try r.fs.clone("/a", to: "/b")
        let a = try r.fs.open("/a")
        defer { a.close() }
        let ma = try a.map(count: 3 * advPage)
        defer { ma.unmap() }
        _ = advBytes(ma, at: 0, count: 3 * advPage)
        try r.fs.remove("/a")
        try a.write([1], at: 0)  // the orphan gets a block of its own
        try a.sync()
        try withImage(r.device) { _, fs throws in
            #expect(try fs.contentsOfDirectory("/") == ["b", "keep"])
            #expect(try readAll(fs, "/b") == data)
            let report = try fs.check()
            #expect(report.isClean, "\(report.problems)")
            #expect(fs.statistics().sharedBlocks == 0, "the orphan's shares were not dropped")
            #expect(
                fs.statistics().freeBlocks == free0 - 3,
                "the orphan's blocks leaked: \(fs.statistics().freeBlocks) vs \(free0 - 3)")
            try fs.remove("/b")
            #expect(fs.statistics().freeBlocks == free0)
            #expect(try fs.check().isClean)
        }
    }
}

// MARK: - No space left, with shared blocks

@Suite("Adversarial: no space with shared blocks")
struct AdversarialNoSpaceTests {
    /// `/a` with `pages` pages of data, `/b` its clone, and the rest of the device filled.
    private func fullWithClone(_ name: String, pages: Int = 3) throws -> (BlackBoxRig, [UInt8]) {
        let r = try BlackBoxRig(name, size: 4 << 20)
        try r.fs.createDirectory("/dir")
        try r.make("/dir/x", advPattern(advPage, seed: 130))
        let data = try r.make("/a", advPattern(pages * advPage, seed: 131))
        try r.fs.clone("/a", to: "/b")
        try fillUp(r.fs)
        #expect(r.fs.statistics().freeBlocks == 0)
        return (r, data)
    }

    private func expectUnchanged(
        _ r: BlackBoxRig, _ data: [UInt8], _ what: String, sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        #expect(try r.contents("/a") == data, "\(what): /a", sourceLocation: sourceLocation)
        #expect(try r.contents("/b") == data, "\(what): /b", sourceLocation: sourceLocation)
        #expect(try r.frames("/a") == r.frames("/b"), "\(what): no longer shared", sourceLocation: sourceLocation)
        r.expectClean(what, sourceLocation: sourceLocation)
    }

    @Test("write() to a shared page with no space: .noSpace, nothing changed")
    func writeSharedNoSpace() throws {
        let (r, data) = try fullWithClone("nospacewrite")
        try r.with("/b") { b in
            expectCode([.noSpace], "write to a shared page") { try b.write([1], at: 10) }
        }
        try expectUnchanged(r, data, "after a refused write")
    }

    @Test("truncate to inside a shared page with no space: succeeds keeping the clone, or .noSpace changing nothing")
    func truncateSharedNoSpace() throws {
        let (r, data) = try fullWithClone("nospacetrunc")
        let bFrames = try r.frames("/b")
        do {
            try r.with("/a") { try $0.truncate(to: advPage + 100, ifBusy: .fail) }
            #expect(try r.contents("/a") == Array(data[0..<(advPage + 100)]))
            #expect(try r.contents("/b") == data, "the clone changed")
            #expect(try r.frames("/b") == bFrames)
            try r.with("/a") { try $0.truncate(to: 2 * advPage, ifBusy: .fail) }
            let got = try r.contents("/a")
            let expected = Array(data[0..<(advPage + 100)]) + advZeros(advPage - 100)
            #expect(got == expected, "the grown range of a truncated shared page: \(firstDifference(got, expected))")
            r.expectClean("after truncate with no space")
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
            try expectUnchanged(r, data, "after a refused truncate")
        }
    }

    @Test("a partial punch of a shared page with no space: .noSpace changing nothing, or done keeping the clone")
    func punchSharedNoSpace() throws {
        let (r, data) = try fullWithClone("nospacepunch")
        do {
            try r.with("/a") { try $0.punchHole(offset: 100, count: 200, ifBusy: .fail) }
            var expected = data
            expected.replaceSubrange(100..<300, with: advZeros(200))
            #expect(try r.contents("/a") == expected)
            #expect(try r.contents("/b") == data, "the clone changed")
            r.expectClean("after a partial punch with no space")
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
            try expectUnchanged(r, data, "after a refused punch")
        }
    }

    @Test("a snapshot of a directory with no space: done, or .noSpace with no partial tree left behind")
    func snapshotNoSpace() throws {
        let r = try BlackBoxRig("nospacesnap", size: 4 << 20)
        for d in 0..<6 {
            try r.fs.createDirectory("/t\(d)")
            try r.make("/t\(d)/f", advPattern(100, seed: d))
            try r.fs.createDirectory("/t\(d)/inner")
        }
        try r.fs.createDirectory("/all")
        for d in 0..<6 { try r.fs.rename("/t\(d)", to: "/all/t\(d)") }
        try fillUp(r.fs)
        let tree = try r.tree()
        do {
            try r.fs.clone("/all", to: "/snap")
            #expect(try r.tree("/snap") == r.tree("/all"))
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
            #expect(try r.tree() == tree, "a partial snapshot was left behind")
        }
        r.expectClean("after a snapshot with no space")
    }

    @Test("migrate with no free block: pages stay in place with their bytes; a DAXError or a result")
    func migrateNoSpace() throws {
        let (r, data) = try fullWithClone("nospacemigrate")
        let frames = try r.frames("/dir/x")
        do {
            let result = try r.with("/dir/x") { try $0.migrate(offset: 0, count: advPage) }
            #expect(result.migrated == 0, "\(result)")
        } catch let error as DAXError {
            #expect(error.code == .noSpace, "\(error)")
        }
        #expect(try r.frames("/dir/x") == frames)
        #expect(try r.contents("/dir/x") == advPattern(advPage, seed: 130))
        try expectUnchanged(r, data, "after migrate with no space")
    }

    @Test("clone .copy of a pinned file with no space for the copy: .noSpace, no destination")
    func cloneCopyNoSpace() throws {
        let r = try BlackBoxRig("nospaceclonecopy", size: 4 << 20)
        let data = try r.make("/a", advPattern(2 * advPage, seed: 132))
        let a = try r.fs.open("/a")
        defer { a.close() }
        let mapping = try a.map(count: 2 * advPage)
        defer { mapping.unmap() }
        let pin = try mapping.pin(offset: 0, count: advPage)
        try fillUp(r.fs)
        let tree = try r.tree()
        expectCode([.noSpace], "clone .copy with no space") { try r.fs.clone("/a", to: "/b", ifPinned: .copy) }
        #expect(try r.tree() == tree)
        #expect(try a.read(count: 2 * advPage, at: 0) == data)
        #expect(r.fs.statistics().sharedBlocks == 0)
        pin.release()
        r.expectClean("after a refused clone")
    }
}

// MARK: - Names

@Suite("Adversarial: names")
struct AdversarialNameTests {
    @Test("names of 255 bytes (ASCII and multi-byte UTF-8) work; 256 bytes are refused; '.' and '..' refused")
    func nameLengths() throws {
        let r = try BlackBoxRig("names")
        let ascii255 = String(repeating: "a", count: 255)
        let utf8_254 = String(repeating: "é", count: 127)  // 254 bytes
        let utf8_256 = String(repeating: "é", count: 128)  // 256 bytes
        let emoji252 = String(repeating: "🙂", count: 63)  // 252 bytes
        for name in [ascii255, utf8_254, emoji252] {
            try r.make("/" + name, [UInt8(name.utf8.count & 0xFF)])
        }
        try r.fs.createDirectory("/" + String(repeating: "d", count: 255))
        expectCode([.invalidArgument], "256 ASCII bytes") { try r.fs.create("/" + String(repeating: "b", count: 256)) }
        expectCode([.invalidArgument], "256 UTF-8 bytes") { try r.fs.create("/" + utf8_256) }
        expectCode([.invalidArgument], "'.'") { try r.fs.create("/.") }
        expectCode([.invalidArgument], "'..'") { try r.fs.createDirectory("/x/..") }
        expectCode([.invalidArgument], "rename to 256 bytes") { try r.fs.rename("/" + ascii255, to: "/" + utf8_256) }
        let listing = try r.fs.contentsOfDirectory("/")
        #expect(listing.count == 4)
        #expect(listing == listing.sorted(), "not sorted: \(listing.map { $0.prefix(3) })")
        try r.remount()
        #expect(try r.fs.contentsOfDirectory("/") == listing)
        for name in [ascii255, utf8_254, emoji252] {
            #expect(try r.contents("/" + name) == [UInt8(name.utf8.count & 0xFF)])
        }
        // A snapshot and renames keep long names.
        let dir = "/" + String(repeating: "d", count: 255)
        try r.fs.rename("/" + emoji252, to: dir + "/" + emoji252)
        try r.fs.clone(dir, to: "/s")
        #expect(try r.contents("/s/" + emoji252) == [252])
        r.expectClean("after long names")
    }

    @Test("a directory with many entries: snapshot, remove all, balance; listing sorted and complete")
    func manyEntries() throws {
        let r = try BlackBoxRig("manyentries", size: 16 << 20)
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        try r.fs.createDirectory("/d")
        var names: [String] = []
        for i in 0..<300 {
            let name = "file-\(String(i * 7919 % 1000, radix: 36))-\(i)"
            names.append(name)
            try r.make("/d/" + name, i % 3 == 0 ? [UInt8(i & 0xFF)] : [])
        }
        #expect(try r.fs.contentsOfDirectory("/d") == names.sorted())
        try r.fs.clone("/d", to: "/s")
        #expect(try r.fs.contentsOfDirectory("/s") == names.sorted())
        for (i, name) in names.enumerated() where i % 2 == 0 { try r.fs.remove("/d/" + name) }
        try r.remount()
        #expect(
            try r.fs.contentsOfDirectory("/d")
                == names.enumerated().filter { $0.offset % 2 == 1 }.map(\.element).sorted())
        #expect(try r.fs.contentsOfDirectory("/s").count == 300)
        for (i, name) in names.enumerated() where i % 3 == 0 {
            #expect(try r.contents("/s/" + name) == [UInt8(i & 0xFF)])
        }
        for name in try r.fs.contentsOfDirectory("/d") { try r.fs.remove("/d/" + name) }
        for name in try r.fs.contentsOfDirectory("/s") { try r.fs.remove("/s/" + name) }
        try r.fs.remove("/d")
        try r.fs.remove("/s")
        #expect(r.fs.statistics().freeBlocks == free0)
        r.expectClean("after many entries")
    }
}

// MARK: - Counts, renames over clones, handles after close

@Suite("Adversarial: counts, renames over clones, stale handles")
struct AdversarialHandleTests {
    @Test("invariant 9 with read pins of holes (the zero frame), double pins of one page, and a clone .copy")
    func pinCountsBalanceInCorners() throws {
        let r = try BlackBoxRig("pincorners")
        let file = try r.fs.create("/f")
        defer { file.close() }
        try file.write(advPattern(advPage, seed: 140), at: 0)
        try file.truncate(to: 4 * advPage, ifBusy: .fail)  // pages 1-3 holes
        let mapping = try file.map(count: 4 * advPage)
        defer { mapping.unmap() }
        let before = r.fs.statistics()
        let holes = try mapping.pin(offset: advPage, count: 2 * advPage, access: .readOnly)
        let one = try mapping.pin(offset: 0, count: advPage)
        let two = try mapping.pin(offset: 0, count: advPage, access: .readOnly)
        #expect(try file.frames(offset: advPage, count: 2 * advPage) == [nil, nil], "a read pin allocated a hole")
        // The zero frame is one past the device's pages (docs/faults.md); a DMA read of it reads zeros.
        #expect(holes.frames.allSatisfy { Int($0.rawValue) == r.fs.pages.count }, "\(holes.frames)")
        r.expectPinsBalance("with zero-frame and double pins")
        let during = r.fs.statistics()
        // As nr_foll_pin_acquired since Linux 6.5: the zero frame takes no pin, the device pages do.
        #expect(during.pinsAcquired - before.pinsAcquired == 2, "device pages pinned: 1 + 1: \(during)")
        #expect(r.fs.pages.state(of: holes.frames[0]).pinCount == 0)
        try r.fs.clone("/f", to: "/g", ifPinned: .copy)
        r.expectPinsBalance("after a clone .copy")
        holes.release()
        one.release()
        r.expectPinsBalance("after two releases")
        two.release()
        r.expectPinsBalance("after every release")
        let after = r.fs.statistics()
        #expect(after.pinnedPages == 0)
        #expect(
            after.pinsAcquired - before.pinsAcquired == 2 && after.pinsReleased - before.pinsReleased == 2, "\(after)")
        r.expectClean("after pins in corners")
    }

    @Test("a DMA region of a read pin of holes (the zero frame): reads zeros, writes refused, the device untouched")
    func dmaOfZeroFrame() throws {
        let r = try BlackBoxRig("dmazero")
        let file = try r.fs.create("/f")
        defer { file.close() }
        try file.truncate(to: 3 * advPage, ifBusy: .fail)
        let mapping = try file.map(count: 3 * advPage)
        defer { mapping.unmap() }
        let engine = DMAEngine(device: r.device)
        let region = engine.register(try mapping.pin(offset: 0, count: 3 * advPage, access: .readOnly))
        #expect(try engine.read(count: 3 * advPage, from: region, at: 0) == advZeros(3 * advPage))
        #expect(try engine.read(count: 10, from: region, at: advPage - 5) == advZeros(10))
        expectCode([.permissionDenied], "a DMA write to the zero frame") { try engine.write([1], to: region, at: 0) }
        // The file gets data; the region still holds the zero frame, which still reads zeros.
        try file.write(advPattern(3 * advPage, seed: 145), at: 0)
        #expect(try engine.read(count: 16, from: region, at: 0) == advZeros(16))
        // No truncate waits on the zero frame.
        try file.truncate(to: 0, ifBusy: .fail)
        engine.deregister(region)
        r.expectPinsBalance("after deregister")
        r.expectClean("after DMA of the zero frame")
    }

    @Test("rename of a file over its own clone: the replaced clone's references drop, no block freed or leaked")
    func renameOverOwnClone() throws {
        let r = try BlackBoxRig("renameclone")
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(3 * advPage, seed: 141))
        try r.fs.clone("/a", to: "/b")
        try r.with("/b") { try $0.write([1], at: 0) }  // /b owns one block of its own
        #expect(r.fs.statistics().freeBlocks == free0 - 4)
        try r.fs.rename("/a", to: "/b")
        #expect(try r.tree() == ["b", "keep"])
        #expect(try r.contents("/b") == data)
        #expect(r.fs.statistics().sharedBlocks == 0)
        #expect(r.fs.statistics().freeBlocks == free0 - 3, "\(r.fs.statistics().freeBlocks) vs \(free0 - 3)")
        r.expectClean("after rename over a clone")
        try r.remount()
        #expect(r.fs.statistics().freeBlocks == free0 - 3)
        try r.fs.remove("/b")
        #expect(r.fs.statistics().freeBlocks == free0)
        r.expectClean("after removal")
    }

    @Test("rename over a mapped clone: the replaced file is an orphan whose stores copy and never reach the survivor")
    func renameOverMappedClone() throws {
        let r = try BlackBoxRig("renameorphan")
        try #require(r.fs.faultHandling == .userfaultfd)
        try r.make("/keep", [])
        let free0 = r.fs.statistics().freeBlocks
        let data = try r.make("/a", advPattern(2 * advPage, seed: 142))
        try r.fs.clone("/a", to: "/b")
        let b = try r.fs.open("/b")
        let mb = try b.map(count: 2 * advPage)
        #expect(advBytes(mb, at: 0, count: 2 * advPage) == data)
        try r.fs.rename("/a", to: "/b")  // the old /b lives on as an orphan
        advStore(mb, 3, 0x33)
        #expect(try r.contents("/b") == data, "a store to the orphan reached the file that replaced it")
        #expect(try b.read(count: 1, at: 3) == [0x33])
        mb.unmap()
        b.close()
        #expect(r.fs.statistics().freeBlocks == free0 - 2)
        #expect(r.fs.statistics().sharedBlocks == 0)
        r.expectClean("after the orphan went")
    }

    @Test("a handle to a removed file writes to the orphan, never to a new file of the same name")
    func handleAfterRecreate() throws {
        let r = try BlackBoxRig("recreate")
        let old = try r.fs.create("/f")
        try old.write(advPattern(advPage, seed: 143), at: 0)
        try r.fs.remove("/f")
        let fresh = try r.make("/f", [9, 9])
        try old.write([1, 2, 3], at: 0)
        try old.truncate(to: 10, ifBusy: .fail)
        #expect(try r.contents("/f") == fresh)
        #expect(try old.read(count: 10, at: 0) == [1, 2, 3] + Array(advPattern(advPage, seed: 143)[3..<10]))
        old.close()
        r.expectClean("after the orphan closed")
    }

    @Test("sync of a file opened .readOnly, of a clone, of an orphan works")
    func syncVariants() throws {
        let r = try BlackBoxRig("syncvariants", options: advEmulated())
        try r.make("/a", advPattern(advPage, seed: 144))
        try r.fs.clone("/a", to: "/b")
        let ro = try r.fs.open("/a", access: .readOnly)
        try ro.sync()
        ro.close()
        try r.with("/b") { try $0.sync() }
        let orphan = try r.fs.open("/b")
        try r.fs.remove("/b")
        try orphan.write([1], at: 0)
        try orphan.sync()
        orphan.close()
        r.expectClean("after syncs")
    }

    @Test("use after close, unmap, unmount: DAXErrors, never a trap (child process)")
    func useAfterCloseInChild() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let path = "/dev/shm/adv-stale-\(getpid())"
            guard let device = try? PMemDevice.create(path: path, size: 8 << 20) else { exit(2) }
            unlink(path)
            guard let fs = try? DAXFileSystem.format(device), let file = try? fs.create("/f") else { exit(3) }
            guard (try? file.write([1, 2, 3], at: 0)) != nil, let other = try? fs.open("/f") else { exit(4) }
            let steps = ChildSteps()
            file.close()
            steps.step("read after close") { _ = try file.read(count: 3, at: 0) }
            steps.step("write after close") { try file.write([4], at: 0) }
            steps.step("truncate after close") { try file.truncate(to: 0, ifBusy: .fail) }
            steps.step("map after close") { _ = try file.map(count: 4096) }
            steps.step("migrate after close") { _ = try file.migrate(offset: 0, count: 4096) }
            steps.step("sync after close") { try file.sync() }
            file.close()  // twice: no trap
            // The other handle still works.
            FileHandle.standardError.write(Data("step other handle\n".utf8))
            if (try? other.read(count: 3, at: 0)) != [1, 2, 3] {
                steps.mismatch("the other handle lost the file")
            }
            guard let mapping = try? other.map(count: 4096) else { exit(5) }
            mapping.unmap()
            mapping.unmap()  // twice: no trap
            mapping.persist(offset: 0, count: 8)  // after unmap: no trap
            steps.step("pin after unmap") {
                let p = try mapping.pin(offset: 0, count: 4096)
                p.release()
            }
            other.close()
            guard (try? fs.unmount()) != nil else { exit(6) }
            steps.step("create after unmount") { _ = try fs.create("/g") }
            steps.step("open after unmount") { _ = try fs.open("/f") }
            steps.step("clone after unmount") { try fs.clone("/f", to: "/h") }
            steps.step("dedup after unmount") { _ = try fs.deduplicate("/f", offset: 0, "/f", offset: 0, count: 4096) }
            steps.step("contents after unmount") { _ = try fs.contentsOfDirectory("/") }
            steps.step("check after unmount") { _ = try fs.check() }
            steps.step("unmount twice") { try fs.unmount() }
            FileHandle.standardError.write(Data("step remount\n".utf8))
            guard let again = try? DAXFileSystem.mount(device), let f = try? again.open("/f"),
                (try? f.read(count: 3, at: 0)) == [1, 2, 3]
            else {
                FileHandle.standardError.write(Data("mismatch remount lost /f\n".utf8))
                exit(1)
            }
            f.close()
            try? again.unmount()
            device.close()
            steps.step("device read after close") { _ = try device.read(count: 1, at: 0) }
            steps.step("device write after close") { try device.write([1], at: 0) }
            steps.step("format after close") { _ = try DAXFileSystem.format(device) }
            steps.exitWithResult()
        }
        ChildSteps.expectPassed(result)
    }
}

@Suite("Adversarial: mounting twice")
struct AdversarialDoubleMountTests {
    @Test("a second read-write mount of a mounted device is refused, or sees the same files and stays clean")
    func doubleMount() throws {
        let r = try BlackBoxRig("doublemount")
        let data = try r.make("/a", advPattern(advPage, seed: 150))
        do {
            let second = try DAXFileSystem.mount(r.device)
            defer { try? second.unmount() }
            #expect(try readAll(second, "/a") == data)
            try r.make("/b", [1])
            let f = try second.create("/c")
            try f.write([2], at: 0)
            f.close()
            #expect(try r.fs.contentsOfDirectory("/") == ["a", "b", "c"], "two mounts diverge")
            #expect(try second.contentsOfDirectory("/") == ["a", "b", "c"], "two mounts diverge")
        } catch let error as DAXError {
            #expect([.busy, .alreadyExists, .permissionDenied].contains(error.code), "\(error)")
        }
        r.expectClean("after a second mount")
    }
}
