import ArgumentParser
import CommandLineSupport
import DAX

/// `kvstore explore`: puts and deletes under the crash explorer, checked by the store's own rules.
struct Explore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run --ops puts and deletes on an emulated device; check every crash image.",
        discussion: """
            A fresh device (removed afterwards) gets a store, then --ops updates of a few keys. At \
            every fence the explorer makes crash images; in each the store must open, verify clean, \
            and give every key its value from before or after the update in flight, nothing else. \
            Exit status 1 when an image fails.
            """)

    @Option(help: "Updates in the workload.")
    var ops = 50

    @Option(help: "Distinct keys the updates touch.")
    var keys = 8

    @OptionGroup var exploring: ExploreOptions

    func validate() throws {
        guard ops >= 1 else { throw ValidationError("--ops is 1 or more") }
        guard keys >= 1 else { throw ValidationError("--keys is 1 or more") }
    }

    /// Update i: key `i % keys` gets value i, or every seventh update deletes it.
    func update(_ index: Int) -> (key: [UInt8], value: [UInt8]?) {
        let key = Array("key-\(index % keys)".utf8)
        return index % 7 == 6
            ? (key, nil) : (key, Array("value-\(index)-".utf8) + [UInt8](repeating: 0x61, count: index % 40))
    }

    func run() throws {
        // The contents after each number of updates, from 0 to ops.
        var states: [[[UInt8]: [UInt8]]] = [[:]]
        for index in 0..<ops {
            var next = states.last!
            let (key, value) = update(index)
            next[key] = value
            states.append(next)
        }
        let progress = OperationProgress()
        nonisolated(unsafe) var store: KVStore?
        nonisolated(unsafe) var fs: DAXFileSystem?
        let allKeys = Set(states.flatMap(\.keys))
        try exploring.run(
            deviceSize: 24 << 20, name: "kvstore explore --ops \(ops) --keys \(keys)",
            setup: { device in
                fs = try DAXFileSystem.format(device)
                store = try KVStore(fileSystem: fs!, path: "/kvstore", buckets: 64)
            },
            workload: { _ in
                for index in 0..<ops {
                    let (key, value) = update(index)
                    if let value { try store!.put(key, value) } else { try store!.delete(key) }
                    progress.completed += 1
                }
                store!.close()
                try fs!.unmount()
            },
            check: { image in
                let fs = try DAXFileSystem.mount(image)
                defer { try? fs.unmount() }
                let opened = try KVStore(fileSystem: fs, path: "/kvstore", create: false)
                defer { opened.close() }
                let (_, problems) = opened.verify()
                guard problems.isEmpty else { throw CommandError("verify: \(problems.prefix(3))") }
                let allowed = states[progress.completed...].prefix(2)
                for key in allKeys {
                    let found = try opened.get(key)
                    guard allowed.contains(where: { $0[key] == found }) else {
                        throw CommandError(
                            "\(String(decoding: key, as: UTF8.self)) has a value from neither before nor after "
                                + "update \(progress.completed)")
                    }
                }
            })
    }
}
