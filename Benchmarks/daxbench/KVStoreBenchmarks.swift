import CBenchPeers
import DAX
import Foundation

/// The kvstore example against LMDB: 16-byte keys, 64-byte values, each put durable when it
/// returns (kvstore: persisted entry and 8-byte commit; LMDB: one write transaction per put).
enum KVStoreBenchmarks {
    static var all: [Benchmark] { [puts, gets] }

    static var puts: Benchmark {
        Benchmark(
            name: "kvstore-put", unit: "ops/s", peerName: "LMDB, MDB_WRITEMAP, a transaction per put",
            goal: .report
        ) { context in
            let results = try comparison(context)
            return Samples(ours: results.map(\.ours.puts), peer: results.map(\.peer.puts))
        }
    }

    static var gets: Benchmark {
        Benchmark(
            name: "kvstore-get", unit: "ops/s", peerName: "LMDB, MDB_WRITEMAP, one read transaction",
            goal: .report
        ) { context in
            let results = try comparison(context)
            return Samples(ours: results.map(\.ours.gets), peer: results.map(\.peer.gets))
        }
    }

    struct Rates {
        var puts: Double
        var gets: Double
    }

    /// Both rows come from one set of runs.
    nonisolated(unsafe) private static var cached: [(ours: Rates, peer: Rates)]?

    static func keyCount(_ context: BenchContext) -> Int { context.quick ? 200_000 : 1_000_000 }

    private static func comparison(_ context: BenchContext) throws -> [(ours: Rates, peer: Rates)] {
        if let cached { return cached }
        let count = keyCount(context)
        let repetitions = context.quick ? 3 : 5
        var results: [(ours: Rates, peer: Rates)] = []
        for _ in 0..<repetitions {
            results.append((try kvstore(context, count: count), try lmdb(context, count: count)))
        }
        cached = results
        return results
    }

    /// Runs `kvstore bench` (the example binary, built next to daxbench) on a fresh device.
    private static func kvstore(_ context: BenchContext, count: Int) throws -> Rates {
        let bench = try BenchDevice(context, name: "kvstore", size: 512 << 20)
        try DAXFileSystem.format(bench.device).unmount()
        let me =
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let binary = URL(fileURLWithPath: me).deletingLastPathComponent().appendingPathComponent("kvstore").path
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw BenchError("kvstore is not built next to daxbench (swift build -c release --product kvstore)")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = [
            "--device", bench.path, "--persistence", "cache-flush", "bench",
            "--count", "\(count)",
        ]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0,
            let json = try JSONSerialization.jsonObject(with: data) as? [String: Double],
            let puts = json["putsPerSecond"], let gets = json["getsPerSecond"]
        else { throw BenchError("kvstore bench failed (status \(process.terminationStatus))") }
        return Rates(puts: puts, gets: gets)
    }

    private static func lmdb(_ context: BenchContext, count: Int) throws -> Rates {
        let path = context.devicePath("lmdb")
        unlink(path)
        unlink(path + "-lock")
        defer {
            unlink(path)
            unlink(path + "-lock")
        }
        var puts = 0.0
        var gets = 0.0
        let status = cbench_lmdb(path, 1 << 30, Int32(count), 64, &puts, &gets)
        guard status == 0 else { throw BenchError("LMDB failed with code \(status)") }
        return Rates(puts: puts, gets: gets)
    }
}
