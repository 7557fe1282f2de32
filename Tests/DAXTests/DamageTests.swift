import Foundation
import Synchronization
import Testing

@testable import DAX

/// A small file system with files in the root and in `/dir`, unmounted, and where its parts lie.
struct DamagedFixture {
    let t: TemporaryFileSystem
    let sb: Superblock
    /// Path to contents.
    let files: [String: [UInt8]]
    /// Path to inode number.
    let inodes: [String: UInt32]
    /// The device block of `/dir`'s first directory block.
    let directoryBlock: UInt64

    init(name: String, size: Int = 4 << 20) throws {
        t = try TemporaryFileSystem(size: size, name: name)
        try t.fs.createDirectory("/dir")
        var files: [String: [UInt8]] = [:]
        for index in 0..<4 {
            files["/f\(index)"] = pattern(5000 * index + 100, seed: index)
            files["/dir/g\(index)"] = pattern(3000 * index + 10, seed: 10 + index)
        }
        var inodes: [String: UInt32] = [:]
        for (path, bytes) in files {
            let file = try t.fs.create(path)
            try file.write(bytes, at: 0)
            file.close()
            inodes[path] = try t.fs.attributes(of: path).inode
        }
        inodes["/dir"] = try t.fs.attributes(of: "/dir").inode
        let directory = try t.fs.inode(inodes["/dir"]!)
        directoryBlock = directory.extents.allExtents[0].physical
        sb = t.fs.superblock
        self.files = files
        self.inodes = inodes
        try t.fs.unmount()
    }

    var device: PMemDevice { t.device }

    /// XORs the byte at `offset` with `mask`.
    func flip(_ offset: Int, _ mask: UInt8 = 0x5A) throws {
        let byte = try device.read(count: 1, at: offset)[0]
        try device.write([byte ^ mask], at: offset)
    }

    /// Checks that every file not in `except` reads back its bytes.
    func expectIntact(_ fs: DAXFileSystem, except: Set<String> = [], sourceLocation: SourceLocation = #_sourceLocation)
        throws
    {
        for (path, bytes) in files where !except.contains(path) {
            let file = try fs.open(path, access: .readOnly)
            #expect(try file.read(count: bytes.count + 10, at: 0) == bytes, "\(path)", sourceLocation: sourceLocation)
            file.close()
        }
    }
}

@Suite("Damage: backup superblock, format refusal, degraded read-only mounts")
struct DamageTests {
    @Test("a flipped magic in block 0: the backup stands in, read-write mount and format refuse, read-only reads")
    func backupSuperblock() throws {
        let f = try DamagedFixture(name: "backup")
        #expect(f.sb.version == 3)
        #expect(f.sb.backupBlock == UInt64(f.device.pageCount - 1))
        #expect(f.sb.dataEnd == f.sb.backupBlock)
        #expect(try DAXFileSystem.check(f.device).isClean)
        try f.flip(0)

        let refused = expectDAXError(.corrupted) { try DAXFileSystem.mount(f.device) }
        #expect(refused?.message.contains("fsck --repair") == true, "\(refused.map { "\($0)" } ?? "")")
        let report = try DAXFileSystem.check(f.device)
        #expect(report.problems.count == 1, "\(report)")
        #expect(report.problems.first?.contains("superblock in block 0 is damaged") == true, "\(report)")
        #expect(report.problems.first?.contains("backup in block \(f.device.pageCount - 1)") == true, "\(report)")

        let fs = try DAXFileSystem.mount(f.device, access: .readOnly)
        #expect(fs.isDegraded)
        try f.expectIntact(fs)
        try fs.unmount()

        #expect(DAXFileSystem.existingFileSystem(on: f.device)?.contains("backup") == true)
        let error = expectDAXError(.alreadyExists) { try DAXFileSystem.format(f.device) }
        #expect(error?.message.contains("backup superblock") == true)
        // Nothing was erased by the refusal.
        let again = try DAXFileSystem.mount(f.device, access: .readOnly)
        try f.expectIntact(again)
        try again.unmount()
    }

    /// Removing an open file puts it on the orphan list, whose head lives in the superblock; its
    /// close takes it off. Each is a transaction that writes block 0 in place after its commit,
    /// so a power failure in that write can leave block 0 torn (a checksum that no longer
    /// matches) while the journal still holds the committed transaction. Mount must replay it,
    /// which writes the block whole, rather than call the device damaged.
    @Test("block 0 torn while a committed transaction rewrote it: mount replays it, at every crash point")
    func tornSuperblockUnderCommittedTransaction() throws {
        let data = pattern(4096, seed: 84)
        let explorer = CrashExplorer(deviceSize: 3 << 20, domain: .adr, imagesPerPoint: 2, seed: 5)
        let setup: (PMemDevice) throws -> Void = { device in
            let fs = try DAXFileSystem.format(device)
            let file = try fs.create("/f")
            try file.write(data, at: 0)
            file.close()
            try fs.unmount()
        }
        let tornImages = Atomic<Int>(0)
        let report = try explorer.explore(
            setup: setup,
            workload: { device in
                let fs = try DAXFileSystem.mount(device)
                let file = try fs.open("/f")
                try fs.remove("/f")
                file.close()
                try fs.unmount()
            },
            check: { image in
                if (try? Superblock.locate(base: image.base, deviceBlocks: UInt64(image.pageCount)))?.1 != nil {
                    tornImages.add(1, ordering: .relaxed)
                }
                let fs = try DAXFileSystem.mount(image)
                defer { try? fs.unmount() }
                let check = try fs.check()
                guard check.isClean else { throw DAXError(.corrupted, "not clean: \(check)") }
                // Removed (freed with it) or not yet: never changed.
                if let file = try? fs.open("/f", access: .readOnly) {
                    defer { file.close() }
                    guard try file.read(count: 8192, at: 0) == data else { throw DAXError(.corrupted, "/f changed") }
                } else if fs.statistics().freeBlocks != fs.statistics().totalBlocks - 1 {
                    throw DAXError(.corrupted, "/f is gone but its block is not free: \(fs.statistics())")
                }
            })
        #expect(report.crashPoints > 2)
        #expect(tornImages.load(ordering: .relaxed) > 0, "no image tore block 0: the test shows nothing")
        #expect(
            report.failures.isEmpty, "\(report.failures.count) of \(report.imagesChecked): \(report.failures.prefix(2))"
        )
    }

    /// A torn journal header is what a crash while committing leaves: the offline check notes it,
    /// a read-write mount empties the journal, and a read-only mount, which changes nothing,
    /// checks clean with the same note rather than calling a normal crash image damaged.
    @Test("a torn journal header: a read-only mount checks clean and notes it, as the offline check does")
    func tornJournalHeaderUnderReadOnlyMount() throws {
        let f = try DamagedFixture(name: "tornjournal")
        // A byte of the header's sequence: its checksum no longer matches, its magic still does.
        try f.flip(Int(f.sb.journalStart) * Superblock.blockSize + 8)
        let torn = "the journal header is torn"
        let offline = try DAXFileSystem.check(f.device)
        #expect(offline.isClean, "\(offline)")
        #expect(offline.notes.contains { $0.contains(torn) }, "\(offline.notes)")

        let readOnly = try DAXFileSystem.mount(f.device, access: .readOnly)
        let report = try readOnly.check()
        #expect(report.isClean, "\(report)")
        #expect(report.notes.contains { $0.contains(torn) }, "\(report.notes)")
        try f.expectIntact(readOnly)
        try readOnly.unmount()
        // Still torn: the read-only mount wrote nothing.
        #expect(try DAXFileSystem.check(f.device).notes.contains { $0.contains(torn) })

        let readWrite = try DAXFileSystem.mount(f.device)
        let after = try readWrite.check()
        #expect(after.isClean && after.notes.isEmpty, "\(after) \(after.notes)")
        try f.expectIntact(readWrite)
        try readWrite.unmount()
    }

    @Test("format refuses what still looks like a file system, and overwrites it when told to")
    func formatRefusal() throws {
        let f = try DamagedFixture(name: "refuse")
        let last = (f.device.pageCount - 1) * 4096
        // Both superblocks gone: the journal header still says what the device is.
        try f.device.write([UInt8](repeating: 0, count: 256), at: 0)
        try f.device.write([UInt8](repeating: 0, count: 256), at: last)
        #expect(DAXFileSystem.existingFileSystem(on: f.device)?.contains("journal") == true)
        expectDAXError(.alreadyExists) { try DAXFileSystem.format(f.device) }
        // The journal gone too: the root directory's inode.
        try f.device.write([UInt8](repeating: 0, count: 64), at: 4096)
        #expect(DAXFileSystem.existingFileSystem(on: f.device)?.contains("root directory") == true)
        expectDAXError(.alreadyExists) { try DAXFileSystem.format(f.device) }
        var options = DAXFileSystem.FormatOptions()
        options.overwritesExistingFileSystem = true
        let fs = try DAXFileSystem.format(f.device, options: options)
        #expect(try fs.contentsOfDirectory("/").isEmpty)
        try fs.unmount()
        // A device of zeros is not a file system.
        let blank = try TemporaryDevice(size: 4 << 20, name: "blank")
        #expect(DAXFileSystem.existingFileSystem(on: blank.device) == nil)
        try DAXFileSystem.format(blank.device).unmount()
    }

    @Test("a version 2 device mounts and works; clone and deduplicate are .unsupported and change nothing")
    func versionTwoMounts() throws {
        let f = try DamagedFixture(name: "v2")
        var v2 = f.sb
        v2.version = 2
        try f.device.write(v2.encode(), at: 0)
        try f.device.write(v2.encode(), at: (f.device.pageCount - 1) * 4096)
        #expect(try DAXFileSystem.check(f.device).isClean)
        let fs = try DAXFileSystem.mount(f.device)
        defer { try? fs.unmount() }
        try f.expectIntact(fs)
        let file = try fs.create("/a")
        try file.write(pattern(8192), at: 0)
        let before = fs.statistics()
        expectDAXError(.unsupported) { try fs.clone("/a", to: "/b") }
        expectDAXError(.unsupported) { try fs.clone("/a", to: "/b", ifPinned: .unsafeShare) }
        expectDAXError(.unsupported) { try fs.deduplicate("/a", offset: 0, "/a", offset: 4096, count: 4096) }
        #expect(try !fs.contentsOfDirectory("/").contains("b"))
        #expect(try file.read(count: 8192, at: 0) == pattern(8192))
        #expect(fs.statistics() == before)
        #expect(fs.statistics().sharedBlocks == 0)
        #expect(try fs.check().isClean)
    }

    @Test("a version 1 device (no backup, data to the end of the device) still mounts and uses its last block")
    func versionOneMounts() throws {
        let f = try DamagedFixture(name: "v1")
        var v1 = f.sb
        v1.version = 1
        v1.dataBlocks += 1
        try f.device.write(v1.encode(), at: 0)
        try f.device.write([UInt8](repeating: 0, count: 4096), at: (f.device.pageCount - 1) * 4096)
        #expect(try DAXFileSystem.check(f.device).isClean)
        let fs = try DAXFileSystem.mount(f.device)
        #expect(fs.superblock.dataEnd == UInt64(f.device.pageCount))
        try f.expectIntact(fs)
        let hog = try fs.create("/hog")
        try hog.allocate(offset: 0, count: fs.statistics().freeBlocks * 4096)
        let frames = try hog.frames(offset: 0, count: hog.size).compactMap { $0?.rawValue }
        #expect(frames.contains(UInt64(f.device.pageCount - 1)))
        hog.close()
        #expect(try fs.check().isClean)
        try fs.unmount()
    }

    @Test("a flipped bitmap byte: read-write mount refuses and says what to do, read-only reads every file")
    func degradedBitmap() throws {
        let f = try DamagedFixture(name: "dgbitmap")
        try f.flip(Int(f.sb.bitmapStart) * 4096 + 3)
        let refused = expectDAXError(.corrupted) { try DAXFileSystem.mount(f.device) }
        #expect(refused?.message.contains("bitmap block 0 checksum mismatch") == true)
        #expect(refused?.message.contains("mount it read-only") == true)
        let image = try f.device.read(count: f.device.size, at: 0)
        let fs = try DAXFileSystem.mount(f.device, access: .readOnly)
        #expect(fs.damage.contains("bitmap block 0 checksum mismatch"), "\(fs.damage)")
        try f.expectIntact(fs)
        #expect(try fs.contentsOfDirectory("/dir").count == 4)
        try fs.unmount()
        #expect(try f.device.read(count: f.device.size, at: 0) == image, "a read-only mount wrote")
    }

    @Test("a damaged journal header: read-write mount refuses, read-only ignores it and reads every file")
    func degradedJournal() throws {
        let f = try DamagedFixture(name: "dgjournal")
        try f.flip(Int(f.sb.journalStart) * 4096)
        expectDAXError(.corrupted) { try DAXFileSystem.mount(f.device) }
        let fs = try DAXFileSystem.mount(f.device, access: .readOnly)
        defer { try? fs.unmount() }
        #expect(fs.damage.first?.hasPrefix("journal:") == true, "\(fs.damage)")
        try f.expectIntact(fs)
    }

    @Test(
        "a damaged inode: check says it is damaged and why; read-only opens the others, the damaged one is .corrupted")
    func degradedInode() throws {
        let f = try DamagedFixture(name: "dginode")
        let number = f.inodes["/f2"]!
        try f.flip(f.sb.inodeOffset(number) + 20)
        let report = try DAXFileSystem.check(f.device)
        #expect(
            report.problems.contains { $0.contains("names inode \(number), which is damaged: checksum mismatch") },
            "\(report)")
        #expect(!report.problems.contains { $0.contains("not in use") }, "\(report)")
        let fs = try DAXFileSystem.mount(f.device, access: .readOnly)
        defer { try? fs.unmount() }
        try f.expectIntact(fs, except: ["/f2"])
        let error = expectDAXError(.corrupted) { try fs.open("/f2", access: .readOnly) }
        #expect(error?.message.contains("inode \(number)") == true, "\(error.map { "\($0)" } ?? "")")
        #expect(error?.message.contains("checksum mismatch") == true)
    }

    @Test("a damaged directory inode: its files are .corrupted naming it; a damaged root refuses even read-only")
    func degradedDirectoryInode() throws {
        let f = try DamagedFixture(name: "dgdirinode")
        try f.flip(f.sb.inodeOffset(f.inodes["/dir"]!) + 20)
        let fs = try DAXFileSystem.mount(f.device, access: .readOnly)
        try f.expectIntact(fs, except: Set(f.files.keys.filter { $0.hasPrefix("/dir/") }))
        let error = expectDAXError(.corrupted) { try fs.open("/dir/g1", access: .readOnly) }
        #expect(error?.message.contains("\"/dir\" is damaged") == true, "\(error.map { "\($0)" } ?? "")")
        try fs.unmount()

        try f.flip(f.sb.inodeOffset(Superblock.rootInode) + 20)
        let refused = expectDAXError(.corrupted) { try DAXFileSystem.mount(f.device, access: .readOnly) }
        #expect(refused?.message.contains("root directory cannot be read") == true)
        #expect(refused?.message.contains("fsck --repair") == true)
    }

    @Test("a damaged directory block: the files elsewhere read, a name in it is .corrupted, not .notFound")
    func degradedDirectoryBlock() throws {
        let f = try DamagedFixture(name: "dgdir")
        try f.flip(Int(f.directoryBlock) * 4096 + 1)
        let fs = try DAXFileSystem.mount(f.device, access: .readOnly)
        defer { try? fs.unmount() }
        #expect(fs.damage.contains { $0.contains("bad header") }, "\(fs.damage)")
        try f.expectIntact(fs, except: Set(f.files.keys.filter { $0.hasPrefix("/dir/") }))
        let error = expectDAXError(.corrupted) { try fs.open("/dir/g1", access: .readOnly) }
        #expect(error?.message.contains("damaged") == true, "\(error.map { "\($0)" } ?? "")")
        expectDAXError(.notFound) { try fs.open("/nothing", access: .readOnly) }
    }
}
