import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

/// Options every kvstore command takes.
struct StoreOptions: ParsableArguments {
    @Option(help: "The device (default $DAXEMU_DEVICE, else /dev/shm/daxemu); it must hold a DAX file system.")
    var device: String?

    @Option(help: "The store's file in the DAX file system.")
    var file = "/kvstore"

    @Option(help: "Buckets of a new store.")
    var buckets = 1 << 20

    @Option(help: "How stores are made durable: automatic, cache-flush or msync.")
    var persistence = "automatic"

    var devicePath: String { device ?? PMemDevice.defaultPath }

    func validate() throws {
        try requireDeviceOption(device)
        try requireDevicePath(file)
        guard (1...KVStore.maximumBuckets).contains(buckets) else {
            throw ValidationError("--buckets is 1 to \(KVStore.maximumBuckets), not \(buckets)")
        }
        guard ["automatic", "cache-flush", "msync"].contains(persistence) else {
            throw ValidationError("--persistence is automatic, cache-flush or msync, not \(persistence)")
        }
    }

    /// Throws a bad-argument error for a key or value the store cannot hold.
    static func validate(key: String, value: String = "") throws {
        guard (1...KVStore.maximumKey).contains(key.utf8.count) else {
            throw ValidationError("keys are 1 to \(KVStore.maximumKey) bytes; this one has \(key.utf8.count)")
        }
        guard value.utf8.count <= KVStore.maximumValue else {
            throw ValidationError("values are at most \(KVStore.maximumValue) bytes; this one has \(value.utf8.count)")
        }
    }

    /// Opens device and file system around `body`.
    func withFileSystem<T>(_ body: (DAXFileSystem) throws -> T) throws -> T {
        var options = PMemDevice.Options()
        switch persistence {
        case "automatic": options.persistence = .automatic
        case "cache-flush": options.persistence = .cacheFlush
        case "msync": options.persistence = .msync
        default: throw CommandError("--persistence is automatic, cache-flush or msync, not \(persistence)")
        }
        let device = try openCommandDevice(devicePath, options: options)
        defer { device.close() }
        let fs = try DAXFileSystem.mount(device)
        defer { try? fs.unmount() }
        return try body(fs)
    }

    /// Opens device, file system and store around `body`; only commands that write create a store.
    func withStore<T>(creating create: Bool = false, _ body: (KVStore) throws -> T) throws -> T {
        try withFileSystem { fs in
            let store = try KVStore(fileSystem: fs, path: file, buckets: buckets, create: create)
            defer { store.close() }
            return try body(store)
        }
    }
}

@main
struct KVStoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvstore",
        abstract: "A persistent hash table on a DAX mapping: direct loads and stores, crash-atomic updates.",
        subcommands: [Put.self, Get.self, Delete.self, Check.self, Load.self, Bench.self, Explore.self])

    @OptionGroup var options: StoreOptions

    static func main() { mainReportingErrors() }
}

struct Put: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Store VALUE under KEY.")
    @ParentCommand var root: KVStoreCommand
    var options: StoreOptions { root.options }
    @Argument var key: String
    @Argument var value: String

    func validate() throws { try StoreOptions.validate(key: key, value: value) }

    func run() throws {
        try options.withStore(creating: true) { try $0.put(Array(key.utf8), Array(value.utf8)) }
    }
}

struct Get: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the value of KEY; exit 1 if it is absent.")
    @ParentCommand var root: KVStoreCommand
    var options: StoreOptions { root.options }
    @Argument var key: String

    func validate() throws { try StoreOptions.validate(key: key) }

    func run() throws {
        guard let value = try options.withStore({ try $0.get(Array(key.utf8)) }) else { throw ExitCode(1) }
        print(String(decoding: value, as: UTF8.self))
    }
}

struct Delete: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Remove KEY.")
    @ParentCommand var root: KVStoreCommand
    var options: StoreOptions { root.options }
    @Argument var key: String

    func validate() throws { try StoreOptions.validate(key: key) }

    func run() throws {
        try options.withStore { try $0.delete(Array(key.utf8)) }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Verify the store's structure; exit 1 if it is broken.")
    @ParentCommand var root: KVStoreCommand
    var options: StoreOptions { root.options }

    func run() throws {
        let (keys, problems) = try options.withStore { $0.verify() }
        if problems.isEmpty {
            print("ok: \(counted(keys, "key"))")
        } else {
            for problem in problems { print(problem) }
            throw ExitCode(1)
        }
    }
}

struct Load: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Put key-i -> value-i for i in 0..<COUNT, printing i once each put has returned.")
    @ParentCommand var root: KVStoreCommand
    var options: StoreOptions { root.options }
    @Option var count: Int

    func validate() throws {
        guard count >= 0 else { throw ValidationError("--count cannot be negative") }
    }

    func run() throws {
        try options.withStore(creating: true) { store in
            for i in 0..<count {
                try store.put(Array("key-\(i)".utf8), Array("value-\(i)".utf8))
                let line = "\(i)\n"
                _ = line.withCString { write(1, $0, strlen($0)) }
            }
        }
    }
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Time COUNT puts and gets of 16-byte keys and 64-byte values; print ops/s as JSON.",
        discussion: """
            The keys go into a scratch store of its own, removed at the end: the store in --file is \
            never touched.
            """)
    @ParentCommand var root: KVStoreCommand
    var options: StoreOptions { root.options }
    @Option var count = 1_000_000

    func validate() throws {
        guard count > 0 else { throw ValidationError("--count must be positive") }
    }

    struct Result: Encodable {
        var putsPerSecond: Double
        var getsPerSecond: Double
    }

    func run() throws {
        let result = try options.withFileSystem { fs in
            // An unnamed file: closing it frees it, and so does the next mount after a kill.
            let store = try KVStore.scratch(in: fs, buckets: options.buckets)
            defer { store.close() }
            func key(_ i: Int) -> [UInt8] { Array(String(format: "k%015d", i).utf8) }
            let value = [UInt8](repeating: 0x76, count: 64)
            let keys = (0..<count).map(key)
            var start = DispatchTime.now().uptimeNanoseconds
            for key in keys { try store.put(key, value) }
            let puts = Double(count) / (Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
            start = DispatchTime.now().uptimeNanoseconds
            var found = 0
            for key in keys where try store.get(key) != nil { found += 1 }
            let gets = Double(count) / (Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
            guard found == count else { throw CommandError("only \(found) of \(count) keys read back") }
            return Result(putsPerSecond: puts, getsPerSecond: gets)
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        print(String(decoding: try encoder.encode(result), as: UTF8.self))
    }
}
