import DAXTorture
import Foundation
import Testing

@testable import DAX

/// One forking operation the crash worker runs and is killed in, at each of its durable copies.
struct ForkCrashCase: CustomTestStringConvertible, Sendable {
    let name: String
    /// Makes the files the operation acts on.
    let setup: @Sendable (DAXFileSystem) throws -> Void
    /// The operation, as `daxcrashworker kill-at-copy DEVICE N` takes it.
    let operation: [String]
    /// What the operation does to the model, once it is whole.
    let change: @Sendable (inout Model) -> Void
    /// A file the operation changes in place: after a kill each of its pages is old or new.
    let changedInPlace: String?
    /// Blocks shared before and after the operation.
    let sharedBlocks: (before: Int, after: Int)

    var testDescription: String { name }
}

@Suite("Forking crash consistency (SIGKILL)", .serialized)
struct ForkingCrashTests {
    static let cases: [ForkCrashCase] = [
        ForkCrashCase(
            name: "clone a file",
            setup: { fs in
                try fs.create("/f").write(pattern(5 * pageBytes, seed: 30), at: 0)
                try fs.create("/other").write(pattern(100, seed: 31), at: 0)
            },
            operation: ["clone", "/f", "/g"],
            change: { $0.files["/g"] = $0.files["/f"] },
            changedInPlace: nil, sharedBlocks: (0, 5)),
        ForkCrashCase(
            name: "snapshot a tree",
            setup: { fs in
                try fs.createDirectory("/d")
                try fs.createDirectory("/d/s")
                try fs.create("/d/a").write(pattern(3 * pageBytes, seed: 32), at: 0)
                try fs.create("/d/s/b").write(pattern(5000, seed: 33), at: 0)
                _ = try fs.create("/d/s/e")
            },
            operation: ["clone", "/d", "/snap"],
            change: { model in
                model.directories.formUnion(["/snap", "/snap/s"])
                for path in ["/a", "/s/b", "/s/e"] { model.files["/snap" + path] = model.files["/d" + path] }
            },
            changedInPlace: nil, sharedBlocks: (0, 5)),
        ForkCrashCase(
            name: "write into a cloned file (copy-on-write)",
            setup: { fs in
                try fs.create("/f").write(pattern(4 * pageBytes, seed: 34), at: 0)
                try fs.clone("/f", to: "/g")
            },
            operation: ["write", "/g", "4000", "8200", "90"],
            change: { $0.files["/g"]!.replaceSubrange(4000..<12200, with: [UInt8](repeating: 90, count: 8200)) },
            changedInPlace: "/g", sharedBlocks: (4, 1)),
        ForkCrashCase(
            name: "store into a cloned file through a mapping (copy-on-write fault)",
            setup: { fs in
                try fs.create("/f").write(pattern(4 * pageBytes, seed: 35), at: 0)
                try fs.clone("/f", to: "/g")
            },
            operation: ["store", "/g", "100", "5000", "119"],
            change: { $0.files["/g"]!.replaceSubrange(100..<5100, with: [UInt8](repeating: 119, count: 5000)) },
            changedInPlace: "/g", sharedBlocks: (4, 2)),
        ForkCrashCase(
            name: "migrate a fragmented file",
            setup: { fs in
                let file = try fs.create("/f")
                let spacer = try fs.create("/spacer")
                for index in 0..<8 {
                    try file.write(pattern(pageBytes, seed: 36 + index), at: index * pageBytes)
                    try spacer.write([1], at: index * pageBytes)
                }
                spacer.close()
                try fs.remove("/spacer")
            },
            operation: ["migrate", "/f", "0", "\(8 * pageBytes)"],
            change: { _ in },
            changedInPlace: nil, sharedBlocks: (0, 0)),
        ForkCrashCase(
            name: "deduplicate two equal files",
            setup: { fs in
                try fs.create("/a").write(pattern(6 * pageBytes, seed: 37), at: 0)
                try fs.create("/b").write(pattern(6 * pageBytes, seed: 37), at: 0)
            },
            operation: ["dedup", "/a", "0", "/b", "0", "\(6 * pageBytes)"],
            change: { _ in },
            changedInPlace: nil, sharedBlocks: (0, 6)),
    ]

    /// Whether `actual` is `before` or `after`, or, for the file changed in place, each page of it
    /// is the page before or after; every other file exactly.
    static func isBeforeOrAfter(_ actual: Model, _ before: Model, _ after: Model, changedInPlace: String?) -> Bool {
        if actual == before || actual == after { return true }
        guard let path = changedInPlace, let old = before.files[path], let new = after.files[path],
            let seen = actual.files[path], seen.count == new.count, old.count == new.count
        else { return false }
        var others = actual
        others.files[path] = new
        guard others == after else { return false }
        return stride(from: 0, to: seen.count, by: pageBytes).allSatisfy { start in
            let end = min(start + pageBytes, seen.count)
            return seen[start..<end] == old[start..<end] || seen[start..<end] == new[start..<end]
        }
    }

    @Test(
        "a forking operation killed at each durable copy: no change or the whole change, check clean",
        arguments: cases)
    func killedAtEachCopy(_ crash: ForkCrashCase) throws {
        let t = try TemporaryFileSystem(size: 4 << 20, name: "forkcrash")
        try crash.setup(t.fs)
        let before = try Model(reading: t.fs)
        var after = before
        crash.change(&after)
        #expect(t.fs.statistics().sharedBlocks == crash.sharedBlocks.before)
        try t.fs.unmount()
        let image = try t.device.read(count: t.device.size, at: 0)
        var kills = 0
        var completed = false
        for killAt in 1...64 {
            image.withUnsafeBytes { t.device.copy($0, toOffset: 0) }
            let child = try ChildProcess(
                "daxcrashworker", ["kill-at-copy", t.temporary.path, "\(killAt)"] + crash.operation)
            let signal = child.waitForEnd()
            let fs = try DAXFileSystem.mount(t.device)
            defer { try? fs.unmount() }
            let report = try fs.check()
            #expect(report.isClean, "\(crash.name), killed at copy \(killAt): \(report)")
            let actual = try Model(reading: fs)
            let statistics = fs.statistics()
            #expect(statistics.pinnedPages == 0 && statistics.quarantinedBlocks == 0)
            if signal == SIGKILL {
                kills += 1
                #expect(
                    Self.isBeforeOrAfter(actual, before, after, changedInPlace: crash.changedInPlace),
                    """
                    \(crash.name), killed at copy \(killAt):
                    on the device: \(actual)
                    before:        \(before)
                    after:         \(after)
                    """)
                if actual == before, crash.changedInPlace == nil, crash.operation[0] == "clone" {
                    #expect(statistics.sharedBlocks == crash.sharedBlocks.before, "killed at copy \(killAt)")
                } else if actual == after, crash.operation[0] == "clone" {
                    #expect(statistics.sharedBlocks == crash.sharedBlocks.after, "killed at copy \(killAt)")
                }
                guard report.isClean else { return }
            } else {
                // The worker got through the operation before this copy: it must be whole.
                #expect(child.lines.contains("finished"), "\(crash.name): the worker failed: \(child.lines)")
                #expect(actual == after, "\(crash.name), completed:\non the device: \(actual)\nexpected:      \(after)")
                #expect(statistics.sharedBlocks == crash.sharedBlocks.after)
                completed = true
                break
            }
        }
        #expect(kills > 0, "\(crash.name): the worker was never killed inside the operation")
        #expect(completed, "\(crash.name): the operation never completed within 64 copies")
    }

    @Test(
        "a workload of clones, snapshots, copy-on-write, migration and dedup killed at random: mount recovers, check is clean, the model matches"
    )
    func killedForkingWorkload() throws {
        var forkingInFlight = 0
        let operationsSurvived = try killWorkloadAtRandom(
            worker: "workload-forking", name: "forkworkcrash", seed: 0xF0C4, forking: true,
            kills: longTests ? 300 : 30
        ) { inFlight in
            switch inFlight {
            case .clone, .store, .migrate, .deduplicate: forkingInFlight += 1
            default: break
            }
        }
        print(
            "forking crash loop: \(operationsSurvived) operations returned, \(forkingInFlight) kills inside a forking operation"
        )
    }
}
