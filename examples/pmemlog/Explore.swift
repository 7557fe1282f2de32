import ArgumentParser
import CommandLineSupport
import DAX

/// `pmemlog explore`: appends under the crash explorer, checked by the log's own rule.
struct Explore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Append --records records on an emulated device; check every crash image.",
        discussion: """
            A fresh device (removed afterwards) gets a log, then --records appends. At every fence \
            the explorer makes crash images; in each the log must open and hold exactly the records \
            appended before the append in flight, or those and that one. Exit status 1 when an \
            image fails.
            """)

    @Option(help: "Records to append.")
    var records = 40

    @OptionGroup var exploring: ExploreOptions

    func validate() throws {
        guard records >= 1 else { throw ValidationError("--records is 1 or more") }
    }

    func run() throws {
        let appended = (0..<records).map { Array("record \($0) ".utf8) + [UInt8](repeating: 0x2E, count: $0 % 50) }
        let progress = OperationProgress()
        nonisolated(unsafe) var log: PersistentLog?
        nonisolated(unsafe) var fs: DAXFileSystem?
        try exploring.run(
            deviceSize: 8 << 20, name: "pmemlog explore --records \(records)",
            setup: { device in
                fs = try DAXFileSystem.format(device)
                log = try PersistentLog(fileSystem: fs!, path: "/pmemlog", create: true)
            },
            workload: { _ in
                for record in appended {
                    try log!.append(record)
                    progress.completed += 1
                }
                log!.close()
                try fs!.unmount()
            },
            check: { image in
                let fs = try DAXFileSystem.mount(image)
                defer { try? fs.unmount() }
                let opened = try PersistentLog(fileSystem: fs, path: "/pmemlog", create: false)
                defer { opened.close() }
                var found: [[UInt8]] = []
                try opened.walk { found.append($0) }
                let before = Array(appended[..<progress.completed])
                let after = Array(appended[..<min(progress.completed + 1, appended.count)])
                guard found == before || found == after else {
                    throw CommandError(
                        "the log holds \(found.count) records, not the \(before.count) appended before the "
                            + "append in flight or \(after.count) with it")
                }
            })
    }
}
