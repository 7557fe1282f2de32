import ArgumentParser
import CommandLineSupport
import DAX
import Glibc

/// `--device PATH`, shared by every command: default `$DAXEMU_DEVICE`, else `/dev/shm/daxemu`.
struct DeviceOptions: ParsableArguments {
    @Option(
        name: .shortAndLong,
        help: ArgumentHelp(
            "The device: a file (by default on /dev/shm) or a pmem/dev-dax path.",
            discussion: "Default: $DAXEMU_DEVICE, else /dev/shm/daxemu."))
    var device: String?

    var path: String { device ?? PMemDevice.defaultPath }

    func validate() throws { try requireDeviceOption(device) }

    @Option(help: "How stores are made durable: automatic, cache-flush or msync.")
    var persistence: PersistenceChoice = .automatic

    var options: PMemDevice.Options {
        var options = PMemDevice.Options()
        options.persistence = persistence.mode
        return options
    }

    /// Opens the device (`readOnly`: for reading only, which needs only read permission); a
    /// missing one is told in the user's words, with the command that makes it.
    func open(readOnly: Bool = false) throws -> PMemDevice {
        var options = options
        options.readOnly = readOnly
        do {
            return try PMemDevice.open(path: path, options: options)
        } catch let error as DAXError where error.code == .notFound {
            throw CommandError("no device at \(path) (`daxemu create --device \(path)` makes one)")
        }
    }

    /// The arguments with device options given before the subcommand (`daxemu -d PATH ls`, as the
    /// examples take them) moved after it, where each subcommand declares them.
    static func movedAfterSubcommand(_ arguments: [String]) -> [String] {
        var moved: [String] = []
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            if ["-d", "--device", "--persistence"].contains(argument), index + 1 < arguments.count {
                moved += arguments[index...(index + 1)]
                index += 2
            } else if argument.hasPrefix("--device=") || argument.hasPrefix("--persistence=") {
                moved.append(argument)
                index += 1
            } else {
                break
            }
        }
        guard !moved.isEmpty, index < arguments.count, !arguments[index].hasPrefix("-") else { return arguments }
        return [arguments[index]] + moved + arguments[(index + 1)...]
    }
}

enum PersistenceChoice: String, ExpressibleByArgument, CaseIterable {
    case automatic
    case cacheFlush = "cache-flush"
    case msync

    var mode: PersistenceMode {
        switch self {
        case .automatic: .automatic
        case .cacheFlush: .cacheFlush
        case .msync: .msync
        }
    }
}
