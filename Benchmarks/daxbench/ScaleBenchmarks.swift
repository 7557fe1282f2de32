import DAX
import Foundation

/// Memory, storage and time in proportion to what is used, not to the device's size: a 1 TiB
/// sparse device against a 1 GiB one.
enum ScaleBenchmarks {
    static let tebibyte = 1 << 40
    static let gibibyte = 1 << 30

    /// create + format + mount + statistics + unmount + offline check, ms: 1 TiB vs 1 GiB. The
    /// goal is absolute (each step under a second, so all six well under one); what little still
    /// grows with the device (the descriptor table's `mincore`, the inode bitmap) shows in the ratio.
    static var open1TiB: Benchmark {
        Benchmark(
            name: "format-mount-check-1TiB", unit: "ms", peerName: "the same on a 1 GiB device",
            goal: .oursAtMost(1000)
        ) { context in
            try context.interleave(
                ours: { try lifeCycle(context, size: tebibyte).milliseconds },
                peer: { try lifeCycle(context, size: gibibyte).milliseconds })
        }
    }

    /// Largest RSS of `daxemu create`, `format`, `info` and `fsck` on 1 TiB vs on 1 GiB, MiB; the
    /// goal is under 64 MiB.
    static var rss1TiB: Benchmark {
        Benchmark(
            name: "daxemu-rss-1TiB", unit: "MiB", peerName: "the same on a 1 GiB device", goal: .oursAtMost(64)
        ) { context in
            try context.interleave(
                ours: { try commandsMaximumRSS(context, size: tebibyte) },
                peer: { try commandsMaximumRSS(context, size: gibibyte) })
        }
    }

    /// Storage the device file holds after format, mount and a 1 MiB file, MiB: 1 TiB vs 1 GiB;
    /// the goal is under 64 MiB of /dev/shm.
    static var storage1TiB: Benchmark {
        Benchmark(
            name: "storage-1TiB", unit: "MiB", peerName: "the same on a 1 GiB device", goal: .oursAtMost(64)
        ) { context in
            try context.interleave(
                ours: { try lifeCycle(context, size: tebibyte).storedMiB },
                peer: { try lifeCycle(context, size: gibibyte).storedMiB })
        }
    }

    static var all: [Benchmark] { [open1TiB, rss1TiB, storage1TiB] }

    /// One life of a sparse device: what it took and what it stored.
    private static func lifeCycle(_ context: BenchContext, size: Int) throws -> (
        milliseconds: Double, storedMiB: Double
    ) {
        let path = context.devicePath("scale-\(size >> 30)g")
        unlink(path)
        defer { unlink(path) }
        var options = PMemDevice.Options()
        options.sparse = true
        let start = now()
        let device = try PMemDevice.create(path: path, size: size, options: options)
        defer { device.close() }
        let fs = try DAXFileSystem.format(device)
        try fs.unmount()
        let mounted = try DAXFileSystem.mount(device)
        _ = mounted.statistics()
        try mounted.unmount()
        guard try DAXFileSystem.check(device).isClean else { throw BenchError("check of \(path) found problems") }
        let elapsed = Double(now() - start) / 1e6
        let again = try DAXFileSystem.mount(device)
        try again.create("/file").write([UInt8](repeating: 1, count: 1 << 20), at: 0)
        try again.unmount()
        var info = stat()
        stat(path, &info)
        return (elapsed, Double(Int(info.st_blocks) * 512) / Double(1 << 20))
    }

    /// Runs daxemu's create, format, info and fsck as processes; the largest RSS among them, MiB.
    private static func commandsMaximumRSS(_ context: BenchContext, size: Int) throws -> Double {
        let path = context.devicePath("scale-rss-\(size >> 30)g")
        unlink(path)
        defer { unlink(path) }
        let daxemu = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
            .appendingPathComponent("daxemu").path
        guard access(daxemu, X_OK) == 0 else {
            throw BenchError("\(daxemu) is missing: build it with `swift build -c release --product daxemu`")
        }
        var largest = 0
        for arguments in [["create", "--size", "\(size)", "--sparse"], ["format"], ["info"], ["fsck"]] {
            // posix_spawn and wait4 (not Foundation's Process, which reaps the child itself).
            let argv = [daxemu, "--device", path] + arguments
            var cArguments = argv.map { strdup($0) } + [nil]
            defer { for pointer in cArguments { free(pointer) } }
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            defer { posix_spawn_file_actions_destroy(&actions) }
            posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
            var pid: pid_t = 0
            guard posix_spawn(&pid, daxemu, &actions, nil, &cArguments, environ) == 0 else {
                throw BenchError("cannot start \(daxemu)")
            }
            var status: Int32 = 0
            var usage = rusage()
            guard wait4(pid, &status, 0, &usage) == pid, status == 0 else {
                throw BenchError("daxemu \(arguments.joined(separator: " ")) failed (status \(status))")
            }
            largest = max(largest, usage.ru_maxrss)  // KiB
        }
        return Double(largest) / 1024
    }
}
