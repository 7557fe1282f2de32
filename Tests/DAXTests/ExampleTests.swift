import DAXTorture
import Foundation
import Testing

@testable import DAX

/// A device formatted by `daxemu` for a command-line or example test, removed when the value goes.
final class ExampleDevice: @unchecked Sendable {
    let device = DevicePath()
    var path: String { device.path }

    init(size: String = "64M") throws {
        #expect(try runCommand("daxemu", ["create", "-d", device.path, "--size", size]).status == 0)
        #expect(try runCommand("daxemu", ["format", "-d", device.path]).status == 0)
    }
}

@Suite("Examples", .serialized)
struct ExampleTests {
    @Test("kvstore: put, get, delete, check; absent keys exit 1")
    func kvstoreBasics() throws {
        let e = try ExampleDevice()
        let kv = { (arguments: [String]) in try runCommand("kvstore", ["--device", e.path] + arguments) }
        #expect(try kv(["put", "color", "blue"]).status == 0)
        #expect(try kv(["put", "shape", "round"]).status == 0)
        #expect(try kv(["put", "color", "green"]).status == 0)
        #expect(try kv(["get", "color"]).output == "green\n")
        let missing = try kv(["get", "missing"])
        #expect(missing.status == 1 && missing.output.isEmpty && missing.errors.isEmpty, "\(missing.errors)")
        #expect(try kv(["delete", "color"]).status == 0)
        #expect(try kv(["get", "color"]).status == 1)
        let check = try kv(["check"])
        #expect(check.status == 0 && check.output == "ok: 1 key\n")
        expectCleanFailure(
            try runCommand("kvstore", ["--device", e.path + "-missing", "get", "x"]), "kvstore",
            mentioning: "daxemu create")
    }

    @Test("kvstore load killed with SIGKILL: check passes and every printed key is readable")
    func kvstoreCrash() throws {
        let e = try ExampleDevice(size: "256M")
        var random = SeededRandom(seed: 99)
        var total = 0
        for round in 0..<(longTests ? 20 : 4) {
            let child = try ChildProcess(
                "kvstore", ["--device", e.path, "--file", "/kv", "load", "--count", "2000000"])
            // Killed once a random number of keys is in, somewhere in the next ones. Keys are
            // printed in order, so the first line starting with the number is the number.
            let keysBeforeKill = 200 + Int(random.next() % 20_000)
            #expect(child.waitForLine(startingWith: "\(keysBeforeKill)") != nil, "round \(round): load stopped early")
            child.kill()
            let printed = child.lines.compactMap { Int($0) }
            #expect(!printed.isEmpty, "round \(round): load printed nothing")
            total = max(total, (printed.last ?? -1) + 1)
            let check = try runCommand("kvstore", ["--device", e.path, "--file", "/kv", "check"])
            #expect(check.status == 0, "round \(round): \(check.output)")
            // Every key printed (in this round or an earlier one) reads back with its value.
            let fs = try DAXFileSystem.mount(try PMemDevice.open(path: e.path))
            let file = try fs.open("/kv", access: .readOnly)
            let mapping = try file.map(count: file.size, access: .readOnly)
            let store = KVView(mapping: mapping)
            var missing = 0
            for i in 0..<total where store.value(of: "key-\(i)") != "value-\(i)" { missing += 1 }
            #expect(missing == 0, "round \(round): \(missing) of \(total) printed keys unreadable")
            mapping.unmap()
            file.close()
            try fs.unmount()
        }
        #expect(total > 100)
    }

    @Test("pmemlog: append, walk, rewind")
    func pmemlog() throws {
        let e = try ExampleDevice()
        let log = { (arguments: [String]) in try runCommand("pmemlog", ["--device", e.path] + arguments) }
        #expect(try log(["append", "one", "two", "three and four"]).status == 0)
        #expect(try log(["append", "five"]).status == 0)
        #expect(try log(["walk"]).output == "one\ntwo\nthree and four\nfive\n")
        #expect(try log(["rewind"]).status == 0)
        #expect(try log(["walk"]).output.isEmpty)
        #expect(try log(["append", "after"]).status == 0)
        #expect(try log(["walk"]).output == "after\n")
    }

    @Test("simple-copy: non-temporal copies in, the same bytes out")
    func simpleCopy() throws {
        let e = try ExampleDevice()
        let local = NSTemporaryDirectory() + "simple-copy-\(getpid())"
        defer { unlink(local) }
        let data = Data(pattern(2_500_000, seed: 21))
        try data.write(to: URL(fileURLWithPath: local))
        let copy = try runCommand("simple-copy", ["--device", e.path, "--chunk", "65536", local, "/copy"])
        #expect(copy.status == 0, "\(copy.errors)")
        #expect(try runCommand("daxemu", ["get", "-d", e.path, "/copy", "-"]).outputData == data)
        expectCleanFailure(
            try runCommand("simple-copy", ["--device", e.path, local, "/copy"]), "simple-copy",
            mentioning: "exists")
    }

    @Test("kvstore and pmemlog refuse damaged files with one line, never a trap")
    func damagedFilesAreRefused() throws {
        let e = try ExampleDevice()
        let kv = { (arguments: [String]) in
            try runCommand("kvstore", ["--device", e.path, "--buckets", "64"] + arguments)
        }
        let log = { (arguments: [String]) in try runCommand("pmemlog", ["--device", e.path] + arguments) }
        #expect(try kv(["put", "k", "v"]).status == 0)
        #expect(try log(["append", "one", "two"]).status == 0)
        /// Writes `value` at `offset` of a file through the library, as damage would.
        func damage(_ path: String, at offset: Int, _ value: UInt64) throws {
            let device = try PMemDevice.open(path: e.path)
            defer { device.close() }
            let fs = try DAXFileSystem.mount(device)
            defer { try? fs.unmount() }
            let file = try fs.open(path)
            defer { file.close() }
            try file.write(withUnsafeBytes(of: value.littleEndian) { Array($0) }, at: offset)
        }
        // A bucket head far outside the file: get and check say so.
        let bucket = Int(KVView.hash(Array("k".utf8)) % 64)
        try damage("/kvstore", at: 4096 + bucket * 8, 0x1000_0000_0000)
        expectCleanFailure(try kv(["get", "k"]), "kvstore", mentioning: "damaged")
        let check = try kv(["check"])
        #expect(check.status == 1 && check.output.contains("outside the log"), "\(check.output)")
        #expect(check.errors.isEmpty, "\(check.errors)")
        try damage("/kvstore", at: 4096 + bucket * 8, 1 << 63)
        #expect(try kv(["check"]).status == 1)
        // Header fields that do not fit an Int.
        try damage("/kvstore", at: 16, UInt64.max - 7)
        expectCleanFailure(try kv(["check"]), "kvstore", mentioning: "damaged header")
        // The log's end pointer, then a record length past the end.
        try damage("/pmemlog", at: 8, 1 << 63)
        expectCleanFailure(try log(["walk"]), "pmemlog", mentioning: "end pointer")
        try damage("/pmemlog", at: 8, 4096 + 32)
        try damage("/pmemlog", at: 4096, UInt64.max)
        expectCleanFailure(
            try log(["walk"]), "pmemlog",
            mentioning: "the record at offset 4096 says it holds 18446744073709551615 bytes, past the log's end at "
                + "4128 (0 records before it)")
        // Records before the damage are printed, then the walk fails: a record that runs past the
        // end, and an end pointer that cuts a record's header.
        try damage("/pmemlog", at: 4096, 3)
        try damage("/pmemlog", at: 4096 + 8, UInt64(littleEndian: 0x7A_7978))  // "xyz"
        try damage("/pmemlog", at: 4096 + 16, 9)
        let cut = try log(["walk"])
        #expect(cut.status == 1 && cut.output == "xyz\n", "\(cut.output)")
        #expect(cut.errors.contains("offset 4112 says it holds 9 bytes") && cut.errors.contains("(1 record before it)"))
        try damage("/pmemlog", at: 8, 4096 + 20)
        let short = try log(["walk"])
        #expect(short.status == 1 && short.output == "xyz\n", "\(short.output)")
        #expect(short.errors.contains("offset 4112 has only 4 of its 8 header bytes"), "\(short.errors)")
    }

    @Test("a store or log whose creation failed can be created afterwards; nothing half-made is left")
    func failedCreationLeavesNothing() throws {
        let e = try ExampleDevice(size: "24M")
        // 1M buckets need 8 MiB plus a 16 MiB log: more than the device has. 1024 buckets fit.
        expectCleanFailure(
            try runCommand("kvstore", ["--device", e.path, "put", "a", "b"]), "kvstore", mentioning: "no space")
        #expect(try runCommand("daxemu", ["ls", "-a", "-d", e.path, "/"]).output == "./\n../\n")
        #expect(try runCommand("kvstore", ["--device", e.path, "--buckets", "1024", "put", "a", "b"]).status == 0)
        #expect(try runCommand("kvstore", ["--device", e.path, "get", "a"]).output == "b\n")
        #expect(try runCommand("daxemu", ["ls", "-a", "-d", e.path, "/"]).output == "./\n../\nkvstore\n")
        // simple-copy: a source larger than the space left leaves no partial destination.
        let local = NSTemporaryDirectory() + "simple-copy-big-\(getpid())"
        defer { unlink(local) }
        try Data(count: 20 << 20).write(to: URL(fileURLWithPath: local))
        expectCleanFailure(
            try runCommand("simple-copy", ["--device", e.path, local, "/big"]), "simple-copy", mentioning: "no space")
        #expect(try runCommand("daxemu", ["ls", "-a", "-d", e.path, "/"]).output == "./\n../\nkvstore\n")
        #expect(try runCommand("daxemu", ["fsck", "-d", e.path]).status == 0)
        // An empty file where the log or store goes (say, created by hand) becomes one.
        #expect(try runCommand("daxemu", ["put", "-d", e.path, "/dev/null", "/log"]).status != 0)  // not a regular file
        let empty = NSTemporaryDirectory() + "empty-\(getpid())"
        defer { unlink(empty) }
        #expect(FileManager.default.createFile(atPath: empty, contents: Data()))
        #expect(try runCommand("daxemu", ["put", "-d", e.path, empty, "/log"]).status == 0)
        #expect(try runCommand("pmemlog", ["--device", e.path, "--file", "/log", "append", "x"]).status == 0)
        #expect(try runCommand("pmemlog", ["--device", e.path, "--file", "/log", "walk"]).output == "x\n")
    }

    @Test("read-only commands create nothing; a load that fills the device leaves every printed key readable")
    func examplesAtTheEdges() throws {
        let e = try ExampleDevice(size: "24M")
        let ls = { try runCommand("daxemu", ["ls", "-a", "-d", e.path, "/"]).output.replacing("./\n../\n", with: "") }
        for arguments in [["get", "a"], ["delete", "a"], ["check"]] {
            expectCleanFailure(
                try runCommand("kvstore", ["--device", e.path, "--file", "/typo"] + arguments), "kvstore",
                mentioning: "no store at /typo")
        }
        expectCleanFailure(
            try runCommand("pmemlog", ["--device", e.path, "--file", "/typo", "walk"]), "pmemlog", mentioning: "no log")
        #expect(try ls().isEmpty)
        // The store's log doubles from 16 MiB: the second doubling does not fit on 24 MiB.
        let load = try runCommand("kvstore", ["--device", e.path, "--buckets", "1024", "load", "--count", "5000000"])
        #expect(load.status == 1 && load.errors.contains("no space"), "\(load.errors)")
        let printed = load.output.split(separator: "\n").count
        #expect(printed > 100_000)
        let kv = { (arguments: [String]) in try runCommand("kvstore", ["--device", e.path] + arguments) }
        #expect(try kv(["get", "key-0"]).output == "value-0\n")
        #expect(try kv(["get", "key-\(printed - 1)"]).output == "value-\(printed - 1)\n")
        #expect(try kv(["check"]).output == "ok: \(printed) keys\n")
        #expect(try runCommand("daxemu", ["fsck", "-d", e.path]).status == 0)
        // simple-copy sizes the destination from the source: a pipe or device is refused.
        expectCleanFailure(
            try runCommand("simple-copy", ["--device", e.path, "/dev/null", "/copy"]), "simple-copy",
            mentioning: "not a regular file")
        #expect(try ls() == "kvstore\n")
    }

    @Test("rdma-buffer on fragmented free space: the buffer's blocks go to data and extent leaves")
    func rdmaBufferFragmented() throws {
        let e = try ExampleDevice(size: "16M")
        do {
            let device = try PMemDevice.open(path: e.path)
            defer { device.close() }
            let fs = try DAXFileSystem.mount(device)
            for i in 0..<300 {
                let file = try fs.create("/f\(i)")
                try file.write(pattern(20_000, seed: i), at: 0)
                file.close()
            }
            for i in stride(from: 0, to: 300, by: 2) { try fs.remove("/f\(i)") }
            try fs.unmount()
        }
        let result = try runCommand("rdma-buffer", ["--device", e.path])
        #expect(result.status == 0, "\(result.output)\(result.errors)")
        #expect(result.output.contains("reads only zeros") && result.output.contains("file system clean"))
    }

    @Test("rdma-buffer: the lease is revoked, the NIC refused, nothing corrupted", arguments: [false, true])
    func rdmaBuffer(cooperative: Bool) throws {
        let e = try ExampleDevice()
        let result = try runCommand("rdma-buffer", ["--device", e.path] + (cooperative ? ["--cooperative"] : []))
        #expect(result.status == 0, "\(result.output)\(result.errors)")
        #expect(result.output.contains(cooperative ? "had let go in time" : "lease revoked: true"))
        #expect(result.output.contains(cooperative ? "released by its holder" : "refused: revoked"))
        #expect(result.output.contains("reads only zeros"))
        #expect(result.output.contains("file system clean"))
    }
}

/// Reads a kvstore file the way the example lays it out (see examples/kvstore/KVStore.swift),
/// independently of the example's own code.
struct KVView {
    let mapping: DAXMapping

    /// FNV-1a, which picks a key's bucket.
    static func hash(_ bytes: [UInt8]) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01B3
        }
        return hash
    }

    func value(of key: String) -> String? {
        let base = mapping.baseAddress
        let buckets = Int(base.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        let keyBytes = Array(key.utf8)
        let hash = Self.hash(keyBytes)
        var offset = Int(base.loadUnaligned(fromByteOffset: 4096 + Int(hash % UInt64(buckets)) * 8, as: UInt64.self))
        while offset != 0 {
            let keyLength = Int(base.loadUnaligned(fromByteOffset: offset + 8, as: UInt32.self))
            let valueLength = base.loadUnaligned(fromByteOffset: offset + 12, as: UInt32.self)
            let stored = [UInt8](UnsafeRawBufferPointer(start: base + offset + 24, count: keyLength))
            if stored == keyBytes {
                guard valueLength != 0xFFFF_FFFF else { return nil }
                return String(
                    decoding: UnsafeRawBufferPointer(start: base + offset + 24 + keyLength, count: Int(valueLength)),
                    as: UTF8.self)
            }
            offset = Int(base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
        }
        return nil
    }
}
