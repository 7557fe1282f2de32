import ArgumentParser
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

    @Option(help: "How stores are made durable: automatic, cache-flush or msync.")
    var persistence: PersistenceChoice = .automatic

    var options: PMemDevice.Options {
        var options = PMemDevice.Options()
        options.persistence = persistence.mode
        return options
    }

    func open() throws -> PMemDevice { try PMemDevice.open(path: path, options: options) }
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
