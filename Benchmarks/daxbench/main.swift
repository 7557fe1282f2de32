import Foundation

/// daxbench: every comparison of DAX against its peers, in one process.
///
///   daxbench [--quick] [--json FILE] [--markdown FILE] [--plot FILE.svg] [--only NAME[,NAME...]]
///            [--list] [--repetitions N] [--dir DIR]
let usage = """
    usage: daxbench [--quick] [--json FILE] [--markdown FILE] [--plot FILE.svg] [--only NAME[,NAME...]] \
    [--list] [--repetitions N] [--dir DIR]
    """

var quick = false
var jsonPath: String?
var markdownPath: String?
var plotPath: String?
var only: Set<String>?
var repetitions: Int?
var directory = "/dev/shm"
var list = false
var arguments = CommandLine.arguments.dropFirst().makeIterator()
while let argument = arguments.next() {
    switch argument {
    case "--quick": quick = true
    case "--json": jsonPath = arguments.next()
    case "--markdown": markdownPath = arguments.next()
    case "--plot": plotPath = arguments.next()
    case "--only": only = Set((arguments.next() ?? "").split(separator: ",").map(String.init))
    case "--repetitions": repetitions = arguments.next().flatMap(Int.init)
    case "--dir": directory = arguments.next() ?? directory
    case "--list": list = true
    case "-h", "--help":
        print(usage)
        exit(0)
    default:
        FileHandle.standardError.write(Data("daxbench: unknown argument \(argument)\n\(usage)\n".utf8))
        exit(2)
    }
}

// The rows of the performance table, in its order, then the extra comparisons.
let benchmarks: [Benchmark] =
    [
        PinningBenchmarks.pinUnpinMapping, MediaBenchmarks.persist64, FileSystemBenchmarks.mappedStoreBandwidth,
        FileSystemBenchmarks.writeBandwidth, FileSystemBenchmarks.readBandwidth, FileSystemBenchmarks.truncate1GiB,
        FileSystemBenchmarks.allocate1GiB, PinningBenchmarks.truncatePinned, PinningBenchmarks.allocateWithQuarantine,
        PagesBenchmarks.descriptorBytes, KVStoreBenchmarks.puts, KVStoreBenchmarks.gets,
        PagesBenchmarks.pinUnpinPageMap, PagesBenchmarks.pin256, FileSystemBenchmarks.writeBandwidthWarm,
        FileSystemBenchmarks.readBandwidthWarm, FileSystemBenchmarks.createRemove, CrashBenchmarks.imagesPerSecond,
        CrashBenchmarks.crashPointScaling, CrashBenchmarks.persist64Emulated,
    ] + ScaleBenchmarks.all + FaultBenchmarks.all + ForkingBenchmarks.all
if list {
    for row in benchmarks.flatMap(\.rows) {
        print("\(row.name)\t\(row.unit)\tvs \(row.peerName)\t\(row.goal)")
    }
    exit(0)
}
if let only {
    let unknown = only.subtracting(benchmarks.flatMap(\.rows).map(\.name))
    guard unknown.isEmpty else {
        FileHandle.standardError.write(
            Data("daxbench: no benchmark named \(unknown.sorted().joined(separator: ", "))\n".utf8))
        exit(2)
    }
}

let context = BenchContext(quick: quick, repetitions: repetitions ?? (quick ? 5 : 9), directory: directory)
print("machine: \(machineDescription())")
print("mode: \(quick ? "quick" : "full"), \(context.repetitions) repetitions, medians\n")
var results: [Result] = []
var failed = false
// Naming any row of a benchmark runs it, with all its rows.
for benchmark in benchmarks where only.map({ !$0.isDisjoint(with: benchmark.rows.map(\.name)) }) ?? true {
    FileHandle.standardError.write(Data("running \(benchmark.name)...\n".utf8))
    do {
        var rowContext = context
        rowContext.repetitions = max(context.repetitions, benchmark.minimumRepetitions)
        let samples = try benchmark.run(rowContext)
        guard samples.variants.count == benchmark.variants.count else {
            throw BenchError("\(samples.variants.count) variants measured, \(benchmark.variants.count) declared")
        }
        if ProcessInfo.processInfo.environment["DAXBENCH_SAMPLES"] != nil {
            for (row, rowSamples) in zip(benchmark.rows, [samples] + samples.variants) {
                let lines =
                    "  \(row.name) ours: \(rowSamples.ours.map(format))\n"
                    + "  \(row.name) peer: \(rowSamples.peer.map(format))\n"
                FileHandle.standardError.write(Data(lines.utf8))
            }
        }
        for (row, rowSamples) in zip(benchmark.rows, [samples] + samples.variants) {
            if let reason = rowSamples.notMeasured {
                results.append(Result(notMeasured: row, reason: reason))
            } else {
                results.append(Result(benchmark: row, ours: median(rowSamples.ours), peer: median(rowSamples.peer)))
            }
        }
    } catch let error as NotMeasured {
        FileHandle.standardError.write(Data("daxbench: \(benchmark.name) not measured: \(error.reason)\n".utf8))
        results += benchmark.rows.map { Result(notMeasured: $0, reason: error.reason) }
    } catch {
        FileHandle.standardError.write(Data("daxbench: \(benchmark.name) failed: \(error)\n".utf8))
        failed = true
    }
}
printTable(results)
if let markdownPath {
    do {
        try markdownTable(results).write(toFile: markdownPath, atomically: true, encoding: .utf8)
    } catch {
        FileHandle.standardError.write(Data("daxbench: cannot write \(markdownPath): \(error)\n".utf8))
        failed = true
    }
}
if let plotPath {
    do {
        let points = try WriteBandwidthPlot.measure(context)
        try WriteBandwidthPlot.svg(points, machine: machineDescription()).write(
            toFile: plotPath, atomically: true,
            encoding: .utf8)
        print("\nwrite bandwidth by request size (GB/s), plotted in \(plotPath):")
        print("size      ours    fio     fio's calls, warm")
        for point in points {
            print(
                "\(String(point.size).padding(toLength: 9, withPad: " ", startingAt: 0)) "
                    + "\(format(point.ours).padding(toLength: 7, withPad: " ", startingAt: 0)) "
                    + "\(format(point.fio).padding(toLength: 7, withPad: " ", startingAt: 0)) \(format(point.warm))")
        }
    } catch {
        FileHandle.standardError.write(Data("daxbench: cannot plot: \(error)\n".utf8))
        failed = true
    }
}
if let jsonPath {
    do {
        try writeJSON(results, to: jsonPath)
    } catch {
        FileHandle.standardError.write(Data("daxbench: cannot write \(jsonPath): \(error)\n".utf8))
        failed = true
    }
}
exit(failed ? 1 : 0)
