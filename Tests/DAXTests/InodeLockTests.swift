import Foundation
import Synchronization
import Testing

@testable import DAX

// Readers and writers of one inode's state racing, where the state was once read without the
// inode's lock: a directory's size and blocks (changed by create under the namespace lock alone),
// and an unnamed file's record (read by link outside the file's lock). ThreadSanitizer
// (scripts/tsan) reports the first race when the directory's lock is missing; a torn or stale
// read fails the expectations.

extension FileSystemTests {
    @Test("attributes of a directory read while files are created in it: its size and blocks always agree")
    func directoryAttributesWhileItGrows() throws {
        let t = try TemporaryFileSystem(name: "dirgrow")
        let fs = t.fs
        try fs.createDirectory("/d")
        let files = 8 * DirectoryFormat.slotsPerBlock  // eight new directory blocks
        let creating = Mutex(true)
        let problems = ProblemLog()
        onThreads(2) { role in
            if role == 0 {
                defer { creating.withTrackedLock { $0 = false } }
                for index in 0..<files {
                    do { try fs.create("/d/f\(index)").close() } catch {
                        problems.add("create /d/f\(index): \(error)")
                        return
                    }
                }
            } else {
                repeat {
                    do {
                        let attributes = try fs.attributes(of: "/d")
                        if attributes.size != attributes.blocks * Superblock.blockSize {
                            problems.add("size \(attributes.size) with \(attributes.blocks) blocks")
                        }
                    } catch {
                        problems.add("attributes of /d: \(error)")
                    }
                } while creating.withTrackedLock({ $0 })
            }
        }
        #expect(problems.all.isEmpty)
        let attributes = try fs.attributes(of: "/d")
        #expect(attributes.blocks == 8)
        #expect(attributes.size == 8 * Superblock.blockSize)
        #expect(try fs.contentsOfDirectory("/d").count == files)
        #expect(try fs.check().isClean)
    }
}

extension UnnamedFileTests {
    @Test("an unnamed file linked while another thread appends to it keeps every byte under its new name")
    func linkWhileWriting() throws {
        let t = try TemporaryFileSystem(name: "linkwrite")
        let fs = t.fs
        let file = try fs.createUnnamed(in: "/")
        let limit = 1024  // pages, if the link takes that long
        let page: @Sendable (Int) -> [UInt8] = { pattern(PMemDevice.pageSize, seed: $0) }
        let writing = DispatchSemaphore(value: 0)
        let linked = Mutex(false)
        let written = Mutex(0)
        let problems = ProblemLog()
        onThreads(2) { role in
            if role == 0 {
                // Each append changes the file's record, which the link changes too: an update of
                // either made from a copy taken outside the lock would lose the other's.
                var signalled = false
                defer { if !signalled { writing.signal() } }
                repeat {
                    let index = written.withTrackedLock { $0 }
                    do { try file.write(page(index), at: index * PMemDevice.pageSize) } catch {
                        problems.add("write of page \(index): \(error)")
                        return
                    }
                    written.withTrackedLock { $0 = index + 1 }
                    if !signalled {
                        signalled = true
                        writing.signal()
                    }
                } while !linked.withTrackedLock({ $0 }) && written.withTrackedLock({ $0 }) < limit
            } else {
                writing.wait()
                do { try fs.link(file, at: "/named") } catch { problems.add("link: \(error)") }
                linked.withTrackedLock { $0 = true }
            }
        }
        #expect(problems.all.isEmpty)
        file.close()
        let pages = written.withTrackedLock { $0 }
        let named = try fs.open("/named", access: .readOnly)
        #expect(named.inodeNumber == file.inodeNumber)
        #expect(try named.read(count: (pages + 1) * PMemDevice.pageSize, at: 0) == (0..<pages).flatMap(page))
        named.close()
        #expect(try fs.check().isClean)
    }
}
