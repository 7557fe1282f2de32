import Foundation
import Synchronization
import Testing

@testable import DAX

@Suite("DAXFile: data")
struct FileDataTests {
    @Test("writes at offsets, holes read as zeros and have no frames")
    func holes() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/sparse")
        try file.write([1, 2, 3], at: 10_000)
        try file.write([4, 5], at: 100_000)
        #expect(file.size == 100_002)
        let all = try file.read(count: 200_000, at: 0)
        #expect(all.count == 100_002)
        var expected = [UInt8](repeating: 0, count: 100_002)
        expected[10_000...10_002] = [1, 2, 3]
        expected[100_000...100_001] = [4, 5]
        #expect(all == expected)
        let frames = try file.frames(offset: 0, count: 100_002)
        #expect(frames.count == 25)
        #expect(frames.compactMap { $0 }.count == 2)  // pages 2 and 24 only
        #expect(frames[2] != nil && frames[24] != nil && frames[0] == nil)
        #expect(try file.read(count: 10, at: 100_002).isEmpty)
        #expect(try file.read(count: 0, at: 5).isEmpty)
        expectDAXError(.invalidArgument) { try file.write([1], at: -1) }
        expectDAXError(.invalidArgument) { try file.read(count: -1, at: 0) }
        expectDAXError(.invalidArgument) { try file.write([1], at: DAXFileSystem.maximumFileSize) }
        #expect(try t.fs.check().isClean)
    }

    @Test("frames are where a libpmem program finds the file's bytes")
    func framesAreDeviceOffsets() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        let data = pattern(3 * 4096 + 100)
        try file.write(data, at: 0)
        let frames = try file.frames(offset: 0, count: data.count)
        #expect(frames.count == 4)
        for (page, frame) in frames.enumerated() {
            let onDevice = try t.device.read(count: 4096, at: frame!.deviceOffset)
            let expected = Array(data[(page * 4096)..<min(data.count, page * 4096 + 4096)])
            #expect(Array(onDevice.prefix(expected.count)) == expected)
            let state = t.fs.pages.state(of: frame!)
            #expect(state.isAllocated && state.ownerInode == file.inodeNumber && state.ownerPageIndex == UInt64(page))
        }
        // The tail of the last page past the end of the file is zero on the device too.
        #expect(try t.device.read(count: 4096 - 100, at: frames[3]!.deviceOffset + 100).allSatisfy { $0 == 0 })
    }

    @Test("no stale data: a new file never shows a removed file's bytes, by read or on the device")
    func noStaleData() throws {
        let t = try TemporaryFileSystem(size: 8 << 20)
        let fs = t.fs
        let secret = [UInt8](repeating: 0xA5, count: 1 << 20)
        for index in 0..<5 {
            let file = try fs.create("/secret\(index)")
            try file.write(secret, at: 0)
            file.close()
        }
        for index in 0..<5 { try fs.remove("/secret\(index)") }
        // Take every free block three ways: partial writes, allocate, and mapping holes.
        let partial = try fs.create("/partial")
        for page in 0..<64 { try partial.write([1], at: page * 4096 + 2000) }
        let allocated = try fs.create("/allocated")
        try allocated.allocate(offset: 0, count: 2 << 20)
        let mapped = try fs.create("/mapped")
        try mapped.truncate(to: 1 << 20)
        let mapping = try mapped.map(count: 1 << 20)
        let remaining = fs.statistics().freeBlocks * 4096
        let rest = try fs.create("/rest")
        try rest.allocate(offset: 0, count: remaining)
        #expect(fs.statistics().freeBlocks == 0)
        for file in [partial, allocated, mapped, rest] {
            let bytes = try file.read(count: file.size, at: 0)
            #expect(!bytes.contains(0xA5))
            for frame in try file.frames(offset: 0, count: file.size).compactMap({ $0 }) {
                #expect(!(try t.device.read(count: 4096, at: frame.deviceOffset)).contains(0xA5))
            }
        }
        let view = UnsafeRawBufferPointer(start: mapping.baseAddress, count: 1 << 20)
        #expect(!view.contains(0xA5))
        mapping.unmap()
    }

    @Test("truncate shrinks and grows: freed blocks return, the tail reads as zeros")
    func truncate() throws {
        let t = try TemporaryFileSystem()
        let fs = t.fs
        let file = try fs.create("/f")
        let before = fs.statistics().freeBlocks
        try file.write(pattern(40_000), at: 0)
        #expect(fs.statistics().freeBlocks == before - 10)
        try file.truncate(to: 5000)
        #expect(file.size == 5000)
        #expect(fs.statistics().freeBlocks == before - 2)
        #expect(try file.read(count: 40_000, at: 0) == Array(pattern(40_000).prefix(5000)))
        try file.truncate(to: 20_000)
        let grown = try file.read(count: 20_000, at: 0)
        #expect(Array(grown.prefix(5000)) == Array(pattern(40_000).prefix(5000)))
        #expect(grown[5000...].allSatisfy { $0 == 0 })
        #expect(fs.statistics().freeBlocks == before - 2)  // growing allocates nothing
        try file.truncate(to: 0)
        #expect(fs.statistics().freeBlocks == before)
        #expect(try file.frames(offset: 0, count: 20_000).allSatisfy { $0 == nil })
        expectDAXError(.invalidArgument) { try file.truncate(to: -1) }
        #expect(try fs.check().isClean)
    }

    @Test("punch hole frees whole pages, zeroes partial ones, keeps the size")
    func punch() throws {
        let t = try TemporaryFileSystem()
        let fs = t.fs
        let file = try fs.create("/f")
        let data = pattern(10 * 4096)
        try file.write(data, at: 0)
        let free = fs.statistics().freeBlocks
        try file.punchHole(offset: 4096 + 100, count: 3 * 4096)  // pages 2, 3 whole; 1 and 4 partial
        #expect(file.size == data.count)
        #expect(fs.statistics().freeBlocks == free + 2)
        var expected = data
        expected.replaceSubrange((4096 + 100)..<(4 * 4096 + 100), with: [UInt8](repeating: 0, count: 3 * 4096))
        #expect(try file.read(count: data.count, at: 0) == expected)
        let frames = try file.frames(offset: 0, count: data.count)
        #expect(frames[2] == nil && frames[3] == nil && frames[1] != nil && frames[4] != nil)
        try file.punchHole(offset: 50_000, count: 1 << 30)  // past the end: clipped to the size
        #expect(file.size == data.count)
        try file.write([9], at: 3 * 4096)  // fills the hole again
        #expect(try file.read(count: 2, at: 3 * 4096) == [9, 0])
        #expect(try fs.check().isClean)
    }

    @Test("allocate gives zeroed blocks and grows the size; existing data stays")
    func allocate() throws {
        let t = try TemporaryFileSystem()
        let file = try t.fs.create("/f")
        try file.write([1, 2, 3], at: 0)
        let free = t.fs.statistics().freeBlocks
        try file.allocate(offset: 0, count: 1 << 20)
        #expect(file.size == 1 << 20)
        #expect(t.fs.statistics().freeBlocks == free - 255)
        let bytes = try file.read(count: 1 << 20, at: 0)
        #expect(Array(bytes.prefix(3)) == [1, 2, 3])
        #expect(bytes[3...].allSatisfy { $0 == 0 })
        #expect(try file.frames(offset: 0, count: 1 << 20).allSatisfy { $0 != nil })
        try file.allocate(offset: 100, count: 10)  // inside: nothing changes
        #expect(file.size == 1 << 20)
        expectDAXError(.invalidArgument) { try file.allocate(offset: 0, count: 0) }
    }

    @Test("a fragmented file moves its extents to leaves and back, and survives a remount")
    func fragmentation() throws {
        let t = try TemporaryFileSystem(size: 32 << 20)
        let fs = t.fs
        let file = try fs.create("/frag")
        // Interleave with a second file so that every page of /frag is its own extent.
        let spacer = try fs.create("/spacer")
        let pages = 700
        for page in 0..<pages {
            try file.write(pattern(4096, seed: page), at: page * 4096)
            try spacer.write([1], at: page * 4096)
        }
        #expect(file.inode.extents.extentCount == pages)
        #expect(!file.inode.extents.isInline)
        #expect(file.inode.extents.leaves.count >= 3)
        #expect(try fs.check().isClean)
        // Punch in the middle of a leaf, truncate across leaves.
        try file.punchHole(offset: 300 * 4096, count: 50 * 4096)
        try file.truncate(to: 600 * 4096 + 10)
        let remounted = try t.remount()
        defer { try? remounted.unmount() }
        #expect(try remounted.check().isClean)
        let again = try remounted.open("/frag")
        #expect(again.size == 600 * 4096 + 10)
        for page in [0, 299, 350, 599] {
            #expect(
                try again.read(count: 4096, at: page * 4096)
                    == Array(pattern(4096, seed: page).prefix(page == 600 ? 10 : 4096)))
        }
        #expect(try again.read(count: 4096, at: 320 * 4096).allSatisfy { $0 == 0 })
        try again.truncate(to: 5 * 4096)
        #expect(again.inode.extents.isInline)
        #expect(try remounted.check().isClean)
        try remounted.remove("/spacer")
        try again.truncate(to: 0)
        again.close()
        try remounted.remove("/frag")
        #expect(remounted.statistics().freeBlocks == remounted.statistics().totalBlocks - 1)
    }

    @Test("running out of space: .noSpace, nothing half-done, and the file system stays usable")
    func noSpace() throws {
        let t = try TemporaryFileSystem(size: 4 << 20)
        let fs = t.fs
        let hog = try fs.create("/hog")
        let free = fs.statistics().freeBlocks
        expectDAXError(.noSpace) { try hog.write(pattern((free + 1) * 4096), at: 0) }
        #expect(hog.size == 0)
        #expect(fs.statistics().freeBlocks == free)
        expectDAXError(.noSpace) { try hog.allocate(offset: 0, count: (free + 10) * 4096) }
        #expect(fs.statistics().freeBlocks == free)
        try hog.write(pattern(free * 4096), at: 0)
        #expect(fs.statistics().freeBlocks == 0)
        expectDAXError(.noSpace) { try hog.write([1], at: free * 4096) }
        let other = try fs.create("/other")  // the root directory block has room
        expectDAXError(.noSpace) { try other.write([1], at: 0) }
        #expect(try fs.check().isClean)
        try hog.truncate(to: 4096)
        try other.write(pattern(10_000), at: 0)
        #expect(try other.read(count: 10_000, at: 0) == pattern(10_000))
        #expect(try fs.check().isClean)
    }

    @Test("a read too large for memory is .noSpace, not a crash; reading it in pieces works")
    func hugeReadIsAnError() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "hugeread")
        let file = try t.fs.create("/sparse")
        try file.truncate(to: 1 << 42)  // 4 TiB of holes on a 4 MiB device
        try file.write([7, 8, 9], at: (1 << 42) - 3)
        let error = expectDAXError(.noSpace) { try file.read(count: 1 << 42, at: 0) }
        #expect(error?.message.contains("in pieces") == true, "\(String(describing: error))")
        #expect(try file.read(count: 1 << 42, at: (1 << 42) - 4) == [0, 7, 8, 9])
        var piece = [UInt8](repeating: 0xFF, count: 4096)
        let read = try piece.withUnsafeMutableBytes { try file.read(into: $0, at: (1 << 42) - 4096) }
        #expect(read == 4096)
        #expect(piece[..<4093].allSatisfy { $0 == 0 } && Array(piece[4093...]) == [7, 8, 9])
        #expect(file.size == 1 << 42)
    }

    @Test("threads writing different files at once: every byte where it belongs")
    func parallelFiles() throws {
        let t = try TemporaryFileSystem(size: 64 << 20)
        let fs = t.fs
        let failures = Atomic(0)
        onThreads(4) { thread in
            do {
                let file = try fs.create("/t\(thread)")
                for round in 0..<40 {
                    try file.write(pattern(3000 + round * 100, seed: thread * 100 + round), at: round * 5000)
                    if round % 10 == 9 { try file.truncate(to: (round - 3) * 5000) }
                }
                file.close()
            } catch {
                failures.wrappingAdd(1, ordering: .relaxed)
            }
        }
        #expect(failures.load(ordering: .relaxed) == 0)
        for thread in 0..<4 {
            // The same writes and truncates on an array.
            var expected: [UInt8] = []
            for round in 0..<40 {
                let bytes = pattern(3000 + round * 100, seed: thread * 100 + round)
                let end = round * 5000 + bytes.count
                if expected.count < end { expected += [UInt8](repeating: 0, count: end - expected.count) }
                expected.replaceSubrange((round * 5000)..<end, with: bytes)
                if round % 10 == 9 { expected = Array(expected.prefix((round - 3) * 5000)) }
            }
            let file = try fs.open("/t\(thread)")
            #expect(try file.read(count: 1 << 20, at: 0) == expected)
        }
        #expect(try fs.check().isClean)
    }

    @Test("an allocation too large for the journal throws .noSpace, gives everything back, and crashes nothing")
    func allocationTooLargeForJournal() throws {
        var options = DAXFileSystem.FormatOptions()
        options.journalBlocks = 8
        let t = try TemporaryFileSystem(size: 32 << 20, options: options, name: "smalljournal")
        let a = try t.fs.create("/a")
        try a.allocate(offset: 0, count: 5000 * 4096)
        let filler = try t.fs.create("/filler")
        try filler.allocate(offset: 0, count: t.fs.statistics().freeBlocks * 4096)
        // Free every other block: the free space is 2500 single blocks. An allocation taking them
        // all needs about 10 extent leaves, more than the 7 blocks of the journal's record area.
        for page in stride(from: 1, to: 5000, by: 2) {
            try a.punchHole(offset: page * 4096, count: 4096, ifBusy: .fail)
        }
        let free = t.fs.statistics().freeBlocks
        let b = try t.fs.create("/b")
        let error = expectDAXError(.noSpace) { try b.allocate(offset: 0, count: (free - 20) * 4096) }
        #expect(error?.message.contains("journal") == true)
        #expect(t.fs.statistics().freeBlocks == free)
        #expect(b.size == 0)
        try b.allocate(offset: 0, count: 8 * 4096)  // a smaller one fits
        #expect(try t.fs.check().isClean)
    }

    @Test("a file of exactly the largest size: truncate and a write of its last byte, then remount clean")
    func largestFileSize() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "largest")
        let largest = DAXFileSystem.maximumFileSize
        let file = try t.fs.create("/f")
        try file.write([1, 2, 3], at: 0)
        try file.truncate(to: largest)
        #expect(file.size == largest)
        try file.write([9], at: largest - 1)
        #expect(try file.read(count: 1, at: largest - 1) == [9])
        expectDAXError(.invalidArgument) { try file.truncate(to: largest + 1) }
        expectDAXError(.invalidArgument) { try file.write([1], at: largest) }
        #expect(try t.fs.check().isClean)
        file.close()
        let again = try t.remount()
        let reopened = try again.open("/f")
        #expect(reopened.size == largest)
        #expect(try reopened.read(count: 3, at: 0) == [1, 2, 3])
        #expect(try reopened.read(count: 1, at: largest - 1) == [9])
        reopened.close()
        #expect(try again.check().isClean)
        try again.unmount()
    }

    @Test("a punch that covers the last, partly filled page frees its block")
    func punchFreesPartialLastPage() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "punchlast")
        let file = try t.fs.create("/p")
        let data = pattern(2 * 4096 + 10, seed: 4)
        try file.write(data, at: 0)
        let free = t.fs.statistics().freeBlocks
        try file.punchHole(offset: 2 * 4096 + 5, count: 4096)  // not from the page's start: zeroes only
        #expect(try file.frames(offset: 2 * 4096, count: 1)[0] != nil)
        #expect(try file.read(count: 10, at: 2 * 4096) == Array(data[8192..<8197]) + [0, 0, 0, 0, 0])
        try file.punchHole(offset: 2 * 4096, count: 10)  // exactly to the end of the file
        #expect(try file.frames(offset: 2 * 4096, count: 1) == [nil])
        #expect(t.fs.statistics().freeBlocks == free + 1)
        #expect(file.size == 2 * 4096 + 10)
        #expect(try file.read(count: 10, at: 2 * 4096) == [UInt8](repeating: 0, count: 10))
        try file.punchHole(offset: 4096, count: 100 * 4096)
        #expect(try file.frames(offset: 0, count: 3 * 4096).map { $0 == nil } == [false, true, true])
        #expect(t.fs.statistics().freeBlocks == free + 2)
        #expect(try file.read(count: 4096, at: 0) == Array(data[0..<4096]))
        let report = try t.fs.check()
        #expect(report.isClean, "\(report)")
    }
}
