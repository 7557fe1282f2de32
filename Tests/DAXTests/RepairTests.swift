import Foundation
import Testing

@testable import DAX

extension DamagedFixture {
    /// Device offset of the directory slot that holds `path`'s name.
    func slotOffset(of path: String) throws -> Int {
        let fs = try DAXFileSystem.mount(device, access: .readOnly)
        defer { try? fs.unmount() }
        let (parent, name) = try Paths.split(path, what: "find")
        let directory = try fs.resolveDirectory(parent, path: path)
        let entry = try #require(directory.directory?.entries[name])
        return fs.slotOffset(directory, entry.slot)
    }

    /// The device blocks of `path`'s pages.
    func blocks(of path: String) throws -> [UInt64] {
        let fs = try DAXFileSystem.mount(device, access: .readOnly)
        defer { try? fs.unmount() }
        let file = try fs.open(path, access: .readOnly)
        defer { file.close() }
        return try file.frames(offset: 0, count: file.size).compactMap { $0?.rawValue }
    }

    /// Rewrites inode `number` with `change` applied and a valid checksum.
    func craftInode(_ number: UInt32, _ change: (inout InodeRecord) -> Void) throws {
        let reader = ByteReader(device.base + sb.inodeOffset(number), count: Superblock.inodeSize)
        guard case .success(var record) = InodeRecord.decode(reader) else {
            Issue.record("inode \(number) unreadable")
            return
        }
        change(&record)
        try device.write(record.encode(), at: sb.inodeOffset(number))
    }

    /// Repairs, then checks that the device is clean, mounts read-write, and that every file not
    /// in `lost` reads back its bytes; a second repair changes nothing.
    @discardableResult
    func repairAndVerify(lost: Set<String> = [], sourceLocation: SourceLocation = #_sourceLocation) throws
        -> RepairReport
    {
        let report = try DAXFileSystem.repair(device)
        #expect(report.check.isClean, "\(report.check)", sourceLocation: sourceLocation)
        #expect(try DAXFileSystem.check(device).isClean, sourceLocation: sourceLocation)
        let fs = try DAXFileSystem.mount(device)
        try expectIntact(fs, except: lost, sourceLocation: sourceLocation)
        #expect(try fs.check().isClean, sourceLocation: sourceLocation)
        try fs.unmount()
        let again = try DAXFileSystem.repair(device)
        #expect(again.changedNothing, "\(again)", sourceLocation: sourceLocation)
        return report
    }
}

@Suite("Repair")
struct RepairTests {
    /// A helper's find: repair of a clean 1 TiB sparse device read its whole inode table through
    /// the mapping, which gave every hole a page of memory (4 GB of tmpfs and 6 GB of RSS).
    @Test("repair of a sparse device reads only what it holds: the inode table's holes stay holes")
    func repairOfASparseDeviceLeavesItsHoles() throws {
        let path = TemporaryDevice.uniquePath("sparserepair")
        var options = PMemDevice.Options()
        options.sparse = true
        let device = try PMemDevice.create(path: path, size: 64 << 30, options: options)
        defer {
            device.close()
            unlink(path)
        }
        let fs = try DAXFileSystem.format(device)
        try fs.create("/f").write(pattern(10_000), at: 0)
        try fs.unmount()
        func stored() -> Int {
            var info = stat()
            return stat(path, &info) == 0 ? Int(info.st_blocks) * 512 : -1
        }
        let before = stored()
        let report = try DAXFileSystem.repair(device)
        #expect(report.actions.isEmpty, "\(report.actions)")
        // The bitmap is read whole (2 MiB for 64 GiB); the inode table's holes are not.
        #expect(stored() - before < 16 << 20, "the device file grew from \(before) to \(stored()) bytes")
        let again = try DAXFileSystem.mount(device)
        defer { try? again.unmount() }
        #expect(try again.open("/f").read(count: 10_000, at: 0) == pattern(10_000))
    }

    /// A fuzzer's find: a name with a byte that is not UTF-8 (its checksum made right) passed
    /// check, and `ls` of its directory failed on the name it could not look up again.
    @Test("a directory entry whose name is not UTF-8 is damage: check finds it, repair keeps the file")
    func nameThatIsNotUTF8() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "badname")
        try t.fs.create("/twin").write(pattern(300), at: 0)
        try t.fs.create("/other").write(pattern(10), at: 0)
        try t.fs.unmount()
        // The slot holding "twin": its name's second byte made 0xFF, the slot's checksum redone.
        let bytes = try t.device.read(count: t.device.size, at: 0)
        var patched = false
        let magic: [UInt8] = Array("DXDB".utf8)
        let twin: [UInt8] = Array("twin".utf8)
        for block in 0..<(bytes.count / 4096) {
            let start: Int = block * 4096
            guard Array(bytes[start..<(start + 4)]) == magic else { continue }
            for slot in 0..<15 {
                let at: Int = start + 16 + slot * 272
                let length = Int(bytes[at + 8]) | Int(bytes[at + 9]) << 8
                guard length == 4, Array(bytes[(at + 16)..<(at + 20)]) == twin else { continue }
                var entry = Array(bytes[at..<(at + 16 + length)])
                entry[17] = 0xFF
                let crc = CRC32C.checksum(entry[4...])
                withUnsafeBytes(of: crc.littleEndian) { entry.replaceSubrange(0..<4, with: $0) }
                try t.device.write(entry, at: at)
                patched = true
            }
        }
        try #require(patched)
        let report = try DAXFileSystem.check(t.device)
        #expect(report.problems.contains { $0.contains("name is not UTF-8") }, "\(report.problems)")
        _ = try DAXFileSystem.repair(t.device)
        #expect(try DAXFileSystem.check(t.device).isClean)
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.contentsOfDirectory("/") == ["lost+found", "other"])
        let kept = try fs.contentsOfDirectory("/lost+found")
        #expect(kept.count == 1)
        #expect(try fs.open("/lost+found/" + kept[0]).read(count: 300, at: 0) == pattern(300))
    }

    @Test("an intact file system: repair changes nothing and says so")
    func nothingToRepair() throws {
        let f = try DamagedFixture(name: "rpnone")
        let image = try f.device.read(count: f.device.size, at: 0)
        let report = try DAXFileSystem.repair(f.device)
        #expect(report.changedNothing)
        #expect(report.description == "nothing to repair")
        #expect(try f.device.read(count: f.device.size, at: 0) == image)
    }

    @Test("a flipped bitmap byte: the bitmap is rebuilt from the extents, every file keeps its bytes")
    func bitmap() throws {
        let f = try DamagedFixture(name: "rpbitmap")
        try f.flip(Int(f.sb.bitmapStart) * 4096 + 2)
        let report = try f.repairAndVerify()
        #expect(report.actions == ["bitmap block 0 is damaged (checksum mismatch); rebuilt it from the extents"])
    }

    @Test("a bitmap block wiped to zeros: check and repair tell it alike, as bits the extents disagree with")
    func zeroedBitmap() throws {
        let f = try DamagedFixture(name: "rpzero")
        try f.device.write([UInt8](repeating: 0, count: 4096), at: Int(f.sb.bitmapStart) * 4096)
        // All zeros is a valid bitmap block (never written since format): every block free.
        let check = try DAXFileSystem.check(f.device)
        let owned = try #require(check.problems.first { $0.contains("owned by a file but marked free") }, "\(check)")
        let count = try #require(Int(owned.prefix { $0.isNumber }), "\(owned)")
        #expect(!check.problems.contains { $0.contains("checksum") }, "\(check)")
        let report = try f.repairAndVerify()
        // One bit per owned block, the metadata's (the root's directory block, the leaves) and the files'.
        #expect(report.actions == ["bitmap block 0: \(count) bits disagreed with the extents; rebuilt it from them"])
    }

    @Test("a bitmap that disagrees with the extents (valid checksum) is rebuilt, and says how many bits")
    func leakedBits() throws {
        let f = try DamagedFixture(name: "rpleak")
        var touched = Set<UInt64>()
        Journal.setBits(100..<110, value: true, medium: f.device, superblock: f.sb, touched: &touched)
        Journal.sealBitmapBlocks(touched, medium: f.device, superblock: f.sb)
        #expect(try !DAXFileSystem.check(f.device).isClean)
        let report = try f.repairAndVerify()
        #expect(report.actions.contains { $0.contains("10 bits disagreed") }, "\(report)")
    }

    @Test("a damaged inode is cleared and says why; its name goes; the other files keep their bytes")
    func damagedInode() throws {
        let f = try DamagedFixture(name: "rpinode")
        let number = f.inodes["/f2"]!
        try f.flip(f.sb.inodeOffset(number) + 30)
        let report = try f.repairAndVerify(lost: ["/f2"])
        #expect(
            report.actions.first == "inode \(number) is damaged (checksum mismatch); cleared it: what it held is lost")
        #expect(
            report.actions.contains { $0.contains("entry \"f2\" names inode \(number), which was cleared") },
            "\(report)")
        #expect(report.actions.contains { $0.hasPrefix("bitmap block 0") }, "its blocks are free again")
        let fs = try DAXFileSystem.mount(f.device)
        defer { try? fs.unmount() }
        expectDAXError(.notFound) { try fs.open("/f2") }
    }

    @Test("a damaged directory block is emptied; its files, whose inodes are intact, go to /lost+found intact")
    func damagedDirectoryBlock() throws {
        let f = try DamagedFixture(name: "rpdir")
        try f.flip(Int(f.directoryBlock) * 4096 + 2)
        let lost = Set(f.files.keys.filter { $0.hasPrefix("/dir/") })
        let report = try f.repairAndVerify(lost: lost)
        #expect(report.actions.contains { $0.contains("bad header; emptied it") }, "\(report)")
        #expect(report.actions.contains { $0.hasPrefix("made /lost+found") }, "\(report)")
        #expect(report.lostAndFound.count == 4)
        let fs = try DAXFileSystem.mount(f.device)
        defer { try? fs.unmount() }
        #expect(try fs.contentsOfDirectory("/dir").isEmpty)
        for path in lost {
            let found = "/lost+found/#\(f.inodes[path]!)"
            #expect(report.lostAndFound.contains(found))
            #expect(try fs.open(found).read(count: 1 << 20, at: 0) == f.files[path], "\(found)")
        }
    }

    @Test("a file whose name was lost (its slot cleared) moves to /lost+found with its bytes")
    func lostName() throws {
        let f = try DamagedFixture(name: "rpname")
        try f.device.write([UInt8](repeating: 0, count: DirectoryFormat.slotSize), at: try f.slotOffset(of: "/f1"))
        let report = try f.repairAndVerify(lost: ["/f1"])
        let found = "/lost+found/#\(f.inodes["/f1"]!)"
        #expect(report.lostAndFound == [found])
        #expect(report.actions.contains { $0.contains("had no name; moved it to \(found)") }, "\(report)")
        let fs = try DAXFileSystem.mount(f.device)
        defer { try? fs.unmount() }
        #expect(try fs.open(found).read(count: 1 << 20, at: 0) == f.files["/f1"])
    }

    @Test("a second entry of a name and a second name of an inode are removed; the first ones stay")
    func duplicateNames() throws {
        let f = try DamagedFixture(name: "rpdup")
        let rootBlock = try f.slotOffset(of: "/f0") / 4096 * 4096
        let slot = { (index: Int) in rootBlock + DirectoryFormat.slotOffset(index) }
        // The root has 5 entries in its first slots: the last two slots are free.
        try f.device.write(
            DirectoryFormat.encodeSlot(inode: f.inodes["/f2"]!, name: Array("f1".utf8), kind: .file), at: slot(13))
        try f.device.write(
            DirectoryFormat.encodeSlot(inode: f.inodes["/f3"]!, name: Array("other".utf8), kind: .file), at: slot(14))
        let report = try f.repairAndVerify()
        #expect(report.actions.contains("directory 1 has a second entry named \"f1\"; removed it"), "\(report)")
        #expect(
            report.actions.contains { $0.contains("entry \"other\" is a second name for inode \(f.inodes["/f3"]!)") },
            "\(report)")
        let fs = try DAXFileSystem.mount(f.device)
        defer { try? fs.unmount() }
        #expect(try fs.contentsOfDirectory("/") == ["dir", "f0", "f1", "f2", "f3"])
    }

    @Test("a damaged journal header is discarded; the files keep their bytes")
    func damagedJournal() throws {
        let f = try DamagedFixture(name: "rpjournal")
        try f.flip(Int(f.sb.journalStart) * 4096 + 1)
        expectDAXError(.corrupted) { try DAXFileSystem.mount(f.device) }
        let report = try f.repairAndVerify()
        #expect(report.actions.count == 1)
        #expect(report.actions.first?.hasPrefix("the journal is damaged") == true, "\(report)")
    }

    @Test("a damaged superblock in block 0 is restored from the backup")
    func primarySuperblock() throws {
        let f = try DamagedFixture(name: "rpsuper")
        try f.flip(3)
        #expect(!DAXFileSystem.isFormatted(f.device))
        let report = try f.repairAndVerify()
        #expect(report.actions.first?.hasPrefix("the superblock in block 0 was damaged") == true, "\(report)")
        #expect(
            report.actions.first?.hasSuffix("restored it from the backup in block \(f.device.pageCount - 1)") == true)
        #expect(DAXFileSystem.isFormatted(f.device))
        // A damaged backup is rewritten from block 0.
        try f.flip((f.device.pageCount - 1) * 4096 + 40)
        #expect(try !DAXFileSystem.check(f.device).isClean)
        let backup = try f.repairAndVerify()
        #expect(backup.actions.count == 1)
        #expect(backup.actions.first?.hasPrefix("the backup superblock in block") == true, "\(backup)")
    }

    @Test("link counts and an extent outside the data region: the count is set, the file is dropped")
    func craftedInodes() throws {
        let f = try DamagedFixture(name: "rpcraft")
        try f.craftInode(f.inodes["/f1"]!) { $0.linkCount = 3 }
        try f.craftInode(f.inodes["/f3"]!) { $0.inlineExtents[0].physical = f.sb.totalBlocks + 5 }
        let report = try f.repairAndVerify(lost: ["/f3"])
        #expect(report.actions.contains { $0.contains("link count 3 for one name; made it 1") }, "\(report)")
        #expect(report.actions.contains { $0.contains("outside the data region") }, "\(report)")
    }

    @Test("two files claiming one block: neither is trusted, both are cleared, the rest is intact")
    func sharedBlock() throws {
        let f = try DamagedFixture(name: "rpshare")
        let block = try f.blocks(of: "/f2")[0]
        // One block of /f3 made to point at /f2's first one (and at nothing else).
        try f.craftInode(f.inodes["/f3"]!) {
            $0.inlineExtents = [Extent(logical: 0, physical: block, length: 1)]
            $0.extentCount = 1
            $0.blockCount = 1
        }
        let report = try f.repairAndVerify(lost: ["/f2", "/f3"])
        #expect(report.actions.filter { $0.contains("is also claimed by") }.count == 2, "\(report)")
    }

    @Test("a damaged root inode: a new root, and every file and directory under /lost+found with its bytes")
    func damagedRoot() throws {
        let f = try DamagedFixture(name: "rproot")
        try f.flip(f.sb.inodeOffset(Superblock.rootInode) + 30)
        let report = try f.repairAndVerify(lost: Set(f.files.keys))
        #expect(report.actions.contains { $0.hasPrefix("the root directory (inode 1) was lost") }, "\(report)")
        let fs = try DAXFileSystem.mount(f.device)
        defer { try? fs.unmount() }
        #expect(try fs.contentsOfDirectory("/") == ["lost+found"])
        for (path, bytes) in f.files {
            let found =
                path.hasPrefix("/dir/")
                ? "/lost+found/#\(f.inodes["/dir"]!)/\(path.dropFirst(5))" : "/lost+found/#\(f.inodes[path]!)"
            #expect(try fs.open(found).read(count: 1 << 20, at: 0) == bytes, "\(found)")
        }
    }

    @Test("a damaged directory inode of 40 files: all of them under /lost+found, which takes several blocks")
    func manyLost() throws {
        let t = try TemporaryFileSystem(size: 8 << 20, name: "rpmany")
        try t.fs.createDirectory("/big")
        var files: [String: [UInt8]] = [:]
        for index in 0..<40 {
            let bytes = pattern(100 + index * 300, seed: index)
            let file = try t.fs.create("/big/file\(index)")
            try file.write(bytes, at: 0)
            files["#\(file.inode.number)"] = bytes
            file.close()
        }
        let directory = try t.fs.attributes(of: "/big").inode
        let sb = t.fs.superblock
        try t.fs.unmount()
        let offset = sb.inodeOffset(directory) + 20
        try t.device.write([try t.device.read(count: 1, at: offset)[0] ^ 0xFF], at: offset)
        let report = try DAXFileSystem.repair(t.device)
        #expect(report.lostAndFound.count == 40, "\(report)")
        let fs = try DAXFileSystem.mount(t.device)
        defer { try? fs.unmount() }
        #expect(try fs.check().isClean)
        #expect(try fs.attributes(of: "/lost+found").size == 3 * 4096)
        #expect(try fs.contentsOfDirectory("/lost+found").sorted() == files.keys.sorted())
        for (name, bytes) in files {
            #expect(try fs.open("/lost+found/" + name).read(count: 1 << 20, at: 0) == bytes, "\(name)")
        }
    }

    @Test("a removed file left on the orphan list is freed and the list emptied, as mount would")
    func orphan() throws {
        let f = try DamagedFixture(name: "rporphan")
        let number = f.inodes["/f3"]!
        try f.device.write([UInt8](repeating: 0, count: DirectoryFormat.slotSize), at: try f.slotOffset(of: "/f3"))
        try f.craftInode(number) { $0.linkCount = 0 }
        var sb = f.sb
        sb.orphanHead = number
        try f.device.write(sb.encode(), at: 0)
        let before = try DAXFileSystem.check(f.device)
        #expect(before.isClean, "\(before)")
        #expect(before.notes.contains { $0.contains("orphan list") })
        let report = try f.repairAndVerify(lost: ["/f3"])
        #expect(report.actions.contains { $0.contains("inode \(number) is a removed file") }, "\(report)")
        #expect(report.actions.contains("emptied the orphan list (its removed files were freed)"), "\(report)")
        #expect(report.lostAndFound.isEmpty)
        let after = try DAXFileSystem.check(f.device)
        #expect(after.notes.isEmpty, "\(after.notes)")
    }

    @Test("repair stopped by a crash after any transaction: repair again finishes it, the files intact")
    func crashMidRepair() throws {
        let f = try DamagedFixture(name: "rpcrash")
        try f.flip(Int(f.sb.bitmapStart) * 4096 + 2)
        try f.flip(f.sb.inodeOffset(f.inodes["/f2"]!) + 30)
        try f.flip(Int(f.directoryBlock) * 4096 + 2)
        try f.device.write([UInt8](repeating: 0, count: DirectoryFormat.slotSize), at: try f.slotOffset(of: "/f1"))
        // /f3 and /f0 share a block: both are cleared in one transaction, never one of them alone.
        let shared = try f.blocks(of: "/f0")[0]
        try f.craftInode(f.inodes["/f3"]!) {
            $0.inlineExtents = [Extent(logical: 0, physical: shared, length: 1)]
            $0.extentCount = 1
            $0.blockCount = 1
        }
        let damaged = try f.device.read(count: f.device.size, at: 0)
        let cleared: Set<String> = ["/f0", "/f2", "/f3"]
        let lost = cleared.union(f.files.keys.filter { $0.hasPrefix("/dir/") || $0 == "/f1" })
        var stops = 0
        for stop in 0..<200 {
            damaged.withUnsafeBytes { f.device.copy($0, toOffset: 0) }
            do {
                _ = try DAXFileSystem.repair(f.device, stoppingAfterCommits: stop, writesPerTransaction: 1)
                break  // fewer transactions than `stop`: the repair ran to its end
            } catch let error as DAXError {
                #expect(error.code == .io, "\(error)")
            }
            stops += 1
            let report = try DAXFileSystem.repair(f.device)
            #expect(
                report.actions.first?.hasPrefix("replayed the committed transaction") == true,
                "stop \(stop): \(report)")
            try f.repairAndVerify(lost: lost)
            let fs = try DAXFileSystem.mount(f.device)
            #expect(try fs.contentsOfDirectory("/").filter { cleared.contains("/" + $0) }.isEmpty, "stop \(stop)")
            for path in lost where !cleared.contains(path) {
                let found = try fs.contentsOfDirectory("/lost+found").filter { $0.hasPrefix("#\(f.inodes[path]!)") }
                #expect(found.count == 1, "stop \(stop): \(path)")
            }
            try fs.unmount()
        }
        #expect(stops > 10, "the repair should take many one-write transactions")
    }

    @Test("repair refuses a mounted device and a read-only one, and a device with no file system")
    func refusals() throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "rprefuse")
        expectDAXError(.busy) { try DAXFileSystem.repair(t.device) }
        try t.fs.unmount()
        var options = PMemDevice.Options()
        options.readOnly = true
        let readOnly = try PMemDevice.open(path: t.temporary.path, options: options)
        defer { readOnly.close() }
        expectDAXError(.permissionDenied) { try DAXFileSystem.repair(readOnly) }
        let blank = try TemporaryDevice(size: 4 << 20, name: "rpblank")
        expectDAXError(.corrupted) { try DAXFileSystem.repair(blank.device) }
        #expect(try blank.device.read(count: blank.device.size, at: 0).allSatisfy { $0 == 0 })
    }
}
