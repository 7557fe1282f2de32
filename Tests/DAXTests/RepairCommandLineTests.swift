import Foundation
import Testing

@testable import DAX

@Suite("daxemu fsck --repair and format, the built binary")
struct RepairCommandLineTests {
    /// XORs the byte at `offset` of the device file.
    static func flip(_ path: String, at offset: Int) throws {
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: UInt64(offset))
        let byte = try handle.read(upToCount: 1)?.first ?? 0
        try handle.seek(toOffset: UInt64(offset))
        try handle.write(contentsOf: Data([byte ^ 0x5A]))
    }

    @Test("a damaged superblock and bitmap: format refuses, fsck --repair says each step, the files come back")
    func repairAndFormat() throws {
        let device = DevicePath()
        #expect(try runCommand("daxemu", ["create", "-d", device.path, "--size", "8M"]).status == 0)
        #expect(try runCommand("daxemu", ["format", "-d", device.path]).status == 0)
        let local = NSTemporaryDirectory() + "daxemu-repair-\(getpid())"
        defer { unlink(local) }
        let data = Data(pattern(3 * 4096 + 123, seed: 5))
        try data.write(to: URL(fileURLWithPath: local))
        #expect(try runCommand("daxemu", ["put", "-d", device.path, local, "/a"]).status == 0)
        let opened = try PMemDevice.open(path: device.path)
        let fs = try DAXFileSystem.mount(opened)
        let bitmap = Int(fs.superblock.bitmapStart) * 4096 + 1
        try fs.unmount()
        opened.close()
        try Self.flip(device.path, at: 0)
        try Self.flip(device.path, at: bitmap)

        expectCleanFailure(try runCommand("daxemu", ["format", "-d", device.path]), mentioning: "fsck --repair")
        // Reading commands mount read-only, in a degraded mode that reads what is intact.
        let degraded = try runCommand("daxemu", ["ls", "-d", device.path])
        #expect(degraded.status == 0 && degraded.output == "a\n", "\(degraded.output) \(degraded.errors)")
        #expect(degraded.errors.contains("damaged") && degraded.errors.contains("fsck --repair"), "\(degraded.errors)")
        #expect(try runCommand("daxemu", ["get", "-d", device.path, "/a", "-"]).outputData == data)
        // info too: the file system is there, damaged, not "none".
        let info = try runCommand("daxemu", ["info", "-d", device.path])
        #expect(info.status == 0 && !info.output.contains("file system  none"), "\(info.output)")
        #expect(info.output.contains("damage ") && info.output.contains("fsck --repair"), "\(info.output)")
        let infoJSON = try runCommand("daxemu", ["info", "--json", "-d", device.path])
        let object = try JSONSerialization.jsonObject(with: Data(infoJSON.output.utf8)) as? [String: Any]
        let fileSystem = object?["fileSystem"] as? [String: Any]
        #expect(fileSystem?["state"] as? String == "mounted", "\(infoJSON.output)")
        #expect((fileSystem?["damage"] as? [String])?.isEmpty == false, "\(infoJSON.output)")
        let found = try runCommand("daxemu", ["fsck", "-d", device.path])
        #expect(found.status == 1, "\(found.output)")
        #expect(found.output.contains("superblock in block 0 is damaged"), "\(found.output)")
        #expect(found.output.contains("fsck --repair"), "\(found.output)")

        let repaired = try runCommand("daxemu", ["fsck", "--repair", "-d", device.path])
        #expect(repaired.status == 0, "\(repaired.output)\(repaired.errors)")
        let lines = repaired.output.split(separator: "\n").map(String.init)
        #expect(lines.first?.hasPrefix("repaired: the superblock in block 0 was damaged") == true, "\(lines)")
        #expect(lines.contains { $0.hasPrefix("repaired: bitmap block 0 is damaged") }, "\(lines)")
        #expect(lines.last?.hasSuffix("now clean") == true, "\(lines)")

        let clean = try runCommand("daxemu", ["fsck", "-d", device.path])
        #expect(clean.status == 0 && clean.output.contains("clean"), "\(clean.output)")
        #expect(try runCommand("daxemu", ["get", "-d", device.path, "/a", "-"]).outputData == data)
        let again = try runCommand("daxemu", ["fsck", "--repair", "-d", device.path])
        #expect(again.status == 0 && again.output.contains("nothing to repair"), "\(again.output)")

        expectCleanFailure(try runCommand("daxemu", ["format", "-d", device.path]), mentioning: "--force")
        #expect(try runCommand("daxemu", ["format", "--force", "-d", device.path]).status == 0)
        let listed = try runCommand("daxemu", ["ls", "-d", device.path])
        #expect(listed.status == 0 && !listed.output.contains("a"), "\(listed.output)")
    }

    @Test("a device resized after format: every command says so and how to undo it; none offers a repair that fails")
    func resizedDevice() throws {
        let device = DevicePath()
        #expect(try runCommand("daxemu", ["create", "-d", device.path, "--size", "8M"]).status == 0)
        #expect(try runCommand("daxemu", ["format", "-d", device.path]).status == 0)
        #expect(try runCommand("daxemu", ["put", "-d", device.path, "/etc/hostname", "/h"]).status == 0)
        let hostname = try Data(contentsOf: URL(fileURLWithPath: "/etc/hostname"))
        // A clean file system: format's refusal offers no repair.
        let clean = try runCommand("daxemu", ["format", "-d", device.path])
        expectCleanFailure(clean, mentioning: "--force erases it")
        #expect(!clean.errors.contains("repair"), "\(clean.errors)")

        #expect(truncate(device.path, 16 << 20) == 0)
        let advice = "the device was resized after format; give it back its size (truncate -s 8388608) to read it"
        expectCleanFailure(try runCommand("daxemu", ["ls", "-d", device.path]), mentioning: advice)
        let format = try runCommand("daxemu", ["format", "-d", device.path])
        expectCleanFailure(format, mentioning: "cannot be mounted or repaired")
        #expect(format.errors.contains(advice) && !format.errors.contains("fsck --repair"), "\(format.errors)")
        let fsck = try runCommand("daxemu", ["fsck", "-d", device.path])
        #expect(fsck.status == 1 && fsck.output.contains(advice), "\(fsck.output)")
        let repair = try runCommand("daxemu", ["fsck", "--repair", "-d", device.path])
        #expect(repair.status == 1, "\(repair.output)")
        #expect(repair.output.hasPrefix("cannot repair \(device.path): ") && repair.output.contains(advice))
        #expect(repair.output.components(separatedBy: "cannot repair").count == 2, "said once: \(repair.output)")

        // As the message says: back at its size, the device reads as before, with nothing lost.
        #expect(truncate(device.path, 8 << 20) == 0)
        #expect(try runCommand("daxemu", ["get", "-d", device.path, "/h", "-"]).outputData == hostname)
        #expect(try runCommand("daxemu", ["fsck", "-d", device.path]).status == 0)
    }

    @Test("fsck --repair of a device with no file system fails cleanly and changes nothing")
    func repairRefusesGarbage() throws {
        let device = DevicePath()
        #expect(try runCommand("daxemu", ["create", "-d", device.path, "--size", "8M"]).status == 0)
        let result = try runCommand("daxemu", ["fsck", "--repair", "-d", device.path])
        #expect(result.status == 1, "\(result.output)\(result.errors)")
        #expect(result.output.contains("cannot repair"), "\(result.output)")
        #expect(!result.errors.contains("Backtrac"))
        let raw = try Data(contentsOf: URL(fileURLWithPath: device.path))
        #expect(raw.allSatisfy { $0 == 0 })
    }
}
