import Foundation

/// daxbench: every comparison of DAX against its peers, in one process.
///
///   daxbench [--quick] [--json FILE] [--only NAME[,NAME...]] [--list] [--repetitions N] [--dir DIR]
let usage = "usage: daxbench [--quick] [--json FILE] [--only NAME[,NAME...]] [--list] [--repetitions N] [--dir DIR]"

var quick = false
var jsonPath: String?
var only: Set<String>?
var repetitions: Int?
var directory = "/dev/shm"
var list = false
var arguments = CommandLine.arguments.dropFirst().makeIterator()
while let argument = arguments.next() {
    switch argument {
    case "--quick": quick = true
    case "--json": jsonPath = arguments.next()
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

let benchmarks = PagesBenchmarks.all + MediaBenchmarks.all + FileSystemBenchmarks.all + PinningBenchmarks.all
if list {
    for benchmark in benchmarks {
        print("\(benchmark.name)\t\(benchmark.unit)\tvs \(benchmark.peerName)\t\(benchmark.goal)")
    }
    exit(0)
}
if let only {
    let unknown = only.subtracting(benchmarks.map(\.name))
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
for benchmark in benchmarks where only?.contains(benchmark.name) ?? true {
    FileHandle.standardError.write(Data("running \(benchmark.name)...\n".utf8))
    do {
        let samples = try benchmark.run(context)
        results.append(Result(benchmark: benchmark, ours: median(samples.ours), peer: median(samples.peer)))
    } catch {
        FileHandle.standardError.write(Data("daxbench: \(benchmark.name) failed: \(error)\n".utf8))
        failed = true
    }
}
printTable(results)
if let jsonPath {
    do {
        try writeJSON(results, to: jsonPath)
    } catch {
        FileHandle.standardError.write(Data("daxbench: cannot write \(jsonPath): \(error)\n".utf8))
        failed = true
    }
}
exit(failed ? 1 : 0)
