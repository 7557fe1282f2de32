import ArgumentParser
import DAX
import Glibc

struct DAXEmu: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "daxemu",
        abstract: "A persistent-memory DAX emulator: pmem devices on /dev/shm, page pins, a DAX file system.",
        discussion: """
            Every command works on --device PATH (default $DAXEMU_DEVICE, else /dev/shm/daxemu).
            Start with `daxemu demo`, or `daxemu create --size 1G && daxemu format`.
            """,
        subcommands: [
            Create.self, Format.self, Info.self, ListCommand.self, MakeDirectory.self, Put.self, Get.self,
            Remove.self, Move.self, Truncate.self, Fsck.self, Frames.self, MapCommand.self, Demo.self,
        ]
    )
}

/// Runs the command; an error becomes one sentence on stderr and a non-zero exit status.
@main
enum Main {
    static func main() {
        do {
            var command = try DAXEmu.parseAsRoot()
            try command.run()
        } catch let error as DAXError {
            printError(error.message + (error.errno.map { " (\(String(cString: strerror($0))))" } ?? ""))
            exit(1)
        } catch let error as CommandError {
            printError(error.description)
            exit(1)
        } catch {
            DAXEmu.exit(withError: error)
        }
    }
}

/// Writes `daxemu: MESSAGE` on stderr.
func printError(_ message: String) {
    writeStderr("daxemu: \(message)\n")
}
