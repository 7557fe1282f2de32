import ArgumentParser
import DAX
import Glibc

struct DAXEmu: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "daxemu",
        abstract: "A persistent-memory DAX emulator: pmem devices on /dev/shm, page pins, a DAX file system.",
        subcommands: [Create.self, Info.self, Demo.self]
    )
}

/// Runs the command; a `DAXError` becomes one sentence on stderr and exit status 1.
@main
enum Main {
    static func main() {
        do {
            var command = try DAXEmu.parseAsRoot()
            try command.run()
        } catch let error as DAXError {
            printError(error.message + (error.errno.map { " (\(String(cString: strerror($0))))" } ?? ""))
            exit(1)
        } catch {
            DAXEmu.exit(withError: error)
        }
    }
}

/// Writes `daxemu: MESSAGE` on stderr.
func printError(_ message: String) {
    let line = "daxemu: \(message)\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}
