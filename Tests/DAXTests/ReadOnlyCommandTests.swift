import Foundation
import Testing

@testable import DAX

@Suite("daxemu on a device the user may only read")
struct ReadOnlyCommandTests {
    /// Runs daxemu as the unprivileged user `nobody` (65534), who may read the device but not write it.
    func asNobody(_ arguments: [String]) throws -> CommandResult {
        try runCommand(
            "/usr/bin/setpriv",
            ["--reuid=65534", "--regid=65534", "--clear-groups", ChildProcess.executable("daxemu")] + arguments)
    }

    @Test(
        "info, ls, get, frames, map and fsck work on a read-only device file; changes are refused",
        .enabled(if: getuid() == 0 && access("/usr/bin/setpriv", X_OK) == 0, "needs root to become nobody"))
    func readingCommandsNeedOnlyRead() throws {
        let device = DevicePath()
        #expect(try runCommand("daxemu", ["create", "--device", device.path, "--size", "8M"]).status == 0)
        #expect(try runCommand("daxemu", ["format", "--device", device.path]).status == 0)
        let local = TemporaryDevice.uniquePath("local")
        defer { unlink(local) }
        try Data(pattern(10_000)).write(to: URL(fileURLWithPath: local))
        #expect(try runCommand("daxemu", ["put", "--device", device.path, local, "/file"]).status == 0)
        #expect(chmod(device.path, 0o644) == 0)
        let before = try Data(contentsOf: URL(fileURLWithPath: device.path))

        let info = try asNobody(["info", "--device", device.path])
        #expect(info.status == 0, "\(info.errors)")
        #expect(info.output.contains("1 file"), "\(info.output)")
        let ls = try asNobody(["ls", "--device", device.path, "/"])
        #expect(ls.status == 0 && ls.output == "file\n", "\(ls.output) \(ls.errors)")
        let get = try asNobody(["get", "--device", device.path, "/file", "-"])
        #expect(get.status == 0, "\(get.errors)")
        #expect(Array(get.outputData) == pattern(10_000))
        for command in [
            ["frames", "--device", device.path, "/file"], ["map", "--device", device.path],
            ["fsck", "--device", device.path],
        ] {
            let result = try asNobody(command)
            #expect(result.status == 0, "\(command[0]): \(result.errors)")
        }
        let refused = try asNobody(["mkdir", "--device", device.path, "/dir"])
        expectCleanFailure(refused, mentioning: "ermission denied")
        #expect(try Data(contentsOf: URL(fileURLWithPath: device.path)) == before)
    }
}
