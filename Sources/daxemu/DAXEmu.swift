import ArgumentParser
import CommandLineSupport
import DAX

struct DAXEmu: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "daxemu",
        abstract: "A persistent-memory DAX emulator: pmem devices on /dev/shm, page pins, a DAX file system.",
        discussion: """
            Every command works on --device PATH (default $DAXEMU_DEVICE, else /dev/shm/daxemu).
            Start with `daxemu demo`, or `daxemu create --size 1G && daxemu format`.
            Exit status: 0 on success, 1 when a command fails, 64 for a bad argument.
            """,
        version: "daxemu \(daxemuVersion)",
        subcommands: [
            Create.self, Format.self, Info.self, ListCommand.self, MakeDirectory.self, Put.self, Get.self,
            Remove.self, Move.self, Truncate.self, Clone.self, Snapshot.self, Dedup.self, Fsck.self, Frames.self,
            MapCommand.self, Defrag.self, Demo.self,
            Explore.self, ExploreMerge.self,
        ]
    )
}

/// The version `daxemu --version` prints.
let daxemuVersion = "0.1.0"

/// Runs the command; an error becomes one line on stderr and a non-zero exit status.
@main
enum Main {
    static func main() {
        let arguments = DeviceOptions.movedAfterSubcommand(Array(CommandLine.arguments.dropFirst()))
        DAXEmu.mainReportingErrors(arguments: arguments)
    }
}
