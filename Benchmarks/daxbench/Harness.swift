import CBenchPeers
import Foundation

/// The goal a row's ratio (ours / peer) should meet.
enum Goal: CustomStringConvertible {
    case atMost(Double)
    case atLeast(Double)
    /// A limit on our own figure, in the row's unit (the ratio is reported beside it).
    case oursAtMost(Double)
    /// A limit on ours minus the peer's figure, in the row's unit: the work beyond the peer's, which
    /// any machine can check (a ratio moves with the peer's own cost).
    case beyondPeerAtMost(Double)
    case report

    func holds(ours: Double, peer: Double, ratio: Double) -> Bool? {
        switch self {
        case .atMost(let limit): ratio <= limit
        case .atLeast(let limit): ratio >= limit
        case .oursAtMost(let limit): ours <= limit
        case .beyondPeerAtMost(let limit): ours - peer <= limit
        case .report: nil
        }
    }

    var description: String {
        switch self {
        case .atMost(let limit): "<= \(limit)"
        case .atLeast(let limit): ">= \(limit)"
        case .oursAtMost(let limit): "ours <= \(limit)"
        case .beyondPeerAtMost(let limit): "ours-peer <= \(limit)"
        case .report: "report"
        }
    }
}

/// One comparison: what we measure, against whom, and the goal.
struct Benchmark {
    var name: String
    var unit: String
    var peerName: String
    var goal: Goal
    /// At least this many repetitions: rows whose samples are short need more against the noise.
    var minimumRepetitions = 0
    /// Further comparisons made in the same interleaved run (another peer, or ours in another
    /// mode), each reported as a row of its own; their samples are `Samples.variants`, in order.
    var variants: [Variant] = []
    /// Runs both sides `repetitions` times, interleaved, and returns the samples.
    var run: (_ context: BenchContext) throws -> Samples

    init(
        name: String, unit: String, peerName: String, goal: Goal, minimumRepetitions: Int = 0,
        variants: [Variant] = [], run: @escaping (_ context: BenchContext) throws -> Samples
    ) {
        self.name = name
        self.unit = unit
        self.peerName = peerName
        self.goal = goal
        self.minimumRepetitions = minimumRepetitions
        self.variants = variants
        self.run = run
    }

    /// A further row of a benchmark, in its unit.
    struct Variant {
        var name: String
        var peerName: String
        var goal: Goal
    }

    /// The row of `variant`: this benchmark under the variant's name, peer and goal.
    func row(_ variant: Variant) -> Benchmark {
        Benchmark(name: variant.name, unit: unit, peerName: variant.peerName, goal: variant.goal, run: run)
    }

    /// Every row this benchmark reports: its own, then its variants'.
    var rows: [Benchmark] { [self] + variants.map(row) }
}

struct Samples {
    var ours: [Double] = []
    var peer: [Double] = []
    /// The samples of each of the benchmark's variants, in order.
    var variants: [Samples] = []
    /// Why this row has no samples, when one side cannot run here (a peer this machine cannot
    /// set up): the row is printed as not measured, with this reason.
    var notMeasured: String?

    /// The samples of a row that could not be measured, and why.
    static func notMeasured(_ reason: String) -> Samples { Samples(notMeasured: reason) }
}

/// Thrown by a benchmark that cannot run at all on this build or machine (an operation the
/// library refuses with `.unsupported`, a peer that needs what the machine lacks): every row of
/// the benchmark is printed as not measured, with `reason`, and the run does not fail.
struct NotMeasured: Error, CustomStringConvertible {
    var reason: String
    init(_ reason: String) { self.reason = reason }
    var description: String { reason }
}

/// The result of one row: medians of the samples.
struct Result {
    var benchmark: Benchmark
    var ours: Double
    var peer: Double
    /// Why the row was not measured; `ours` and `peer` are NaN then.
    var notMeasured: String?
    var ratio: Double { peer == 0 ? .infinity : ours / peer }
    var holds: Bool? { notMeasured == nil ? benchmark.goal.holds(ours: ours, peer: peer, ratio: ratio) : nil }

    init(benchmark: Benchmark, ours: Double, peer: Double, notMeasured: String? = nil) {
        self.benchmark = benchmark
        self.ours = ours
        self.peer = peer
        self.notMeasured = notMeasured
    }

    /// A row that was not measured, and why.
    init(notMeasured benchmark: Benchmark, reason: String) {
        self.init(benchmark: benchmark, ours: .nan, peer: .nan, notMeasured: reason)
    }

    /// What the table shows in the `holds` column.
    var holdsCell: String { notMeasured != nil ? "not measured" : holds.map { $0 ? "yes" : "NO" } ?? "-" }
}

/// Settings every benchmark sees.
struct BenchContext {
    var quick: Bool
    var repetitions: Int
    /// Where benchmark devices go.
    var directory: String

    func devicePath(_ name: String) -> String { "\(directory)/daxbench-\(getpid())-\(name)" }

    /// Runs `ours` and `peer` alternately `repetitions` times after one warm-up of each.
    func interleave(ours: () throws -> Double, peer: () throws -> Double) rethrows -> Samples {
        _ = try ours()
        _ = try peer()
        var samples = Samples()
        for _ in 0..<repetitions {
            samples.ours.append(try ours())
            samples.peer.append(try peer())
        }
        return samples
    }

    /// Runs each of `sides` in turn, `repetitions` times, after one warm-up round; returns each
    /// side's samples, in the order of `sides`. For rows that measure more than two sides.
    func interleave(_ sides: [() throws -> Double]) throws -> [[Double]] {
        for side in sides { _ = try side() }
        var samples = [[Double]](repeating: [], count: sides.count)
        for _ in 0..<repetitions {
            for (index, side) in sides.enumerated() { samples[index].append(try side()) }
        }
        return samples
    }
}

func now() -> UInt64 { cbench_now_ns() }

func median(_ values: [Double]) -> Double {
    guard !values.isEmpty else { return .nan }
    let sorted = values.sorted()
    let middle = sorted.count / 2
    return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
}

/// Nanoseconds per iteration of `body`, which runs `iterations` times.
func nanosecondsPerIteration(_ iterations: Int, _ body: () throws -> Void) rethrows -> Double {
    let start = now()
    try body()
    return Double(now() - start) / Double(iterations)
}

/// Formats a number with three significant digits.
func format(_ value: Double) -> String {
    if value.isNaN || value.isInfinite { return "\(value)" }
    let magnitude = abs(value)
    if magnitude >= 100 { return String(format: "%.0f", value) }
    if magnitude >= 10 { return String(format: "%.1f", value) }
    if magnitude >= 1 { return String(format: "%.2f", value) }
    if magnitude == 0 { return String(format: "%.3f", value) }
    // 0.000427, not 0.000: a ratio far below its goal still shows how far.
    return String(format: "%#.3g", value)
}

/// A description of the machine, for reports.
func machineDescription() -> String {
    let cpu =
        (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?
        .split(separator: "\n").first { $0.hasPrefix("model name") }?
        .split(separator: ":", maxSplits: 1).last?.trimmingCharacters(in: .whitespaces) ?? "unknown CPU"
    var name = utsname()
    uname(&name)
    let kernel = withUnsafeBytes(of: &name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    let memory = ProcessInfo.processInfo.physicalMemory >> 30
    return "\(cpu), \(ProcessInfo.processInfo.activeProcessorCount) cores, \(memory) GiB, Linux \(kernel)"
}

func printTable(_ results: [Result]) {
    let header = ["name", "ours", "peer", "peer is", "unit", "ratio", "goal", "holds"]
    let rows = results.map { result in
        [
            result.benchmark.name, format(result.ours), format(result.peer), result.benchmark.peerName,
            result.benchmark.unit, format(result.ratio), result.benchmark.goal.description, result.holdsCell,
        ].map { result.notMeasured != nil && $0 == "nan" ? "-" : $0 }
    }
    var widths = header.map(\.count)
    for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, cell in cell.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
            .joined(separator: "  ")
    }
    print(line(header))
    print(line(widths.map { String(repeating: "-", count: $0) }))
    for row in rows { print(line(row)) }
    // One line per reason, naming its rows (a benchmark's variants share their benchmark's).
    var reasons: [(reason: String, rows: [String])] = []
    for result in results {
        guard let reason = result.notMeasured else { continue }
        if let last = reasons.indices.last, reasons[last].reason == reason {
            reasons[last].rows.append(result.benchmark.name)
        } else {
            reasons.append((reason, [result.benchmark.name]))
        }
    }
    for (reason, rows) in reasons { print("\(rows.joined(separator: ", ")): not measured: \(reason)") }
}

func writeJSON(_ results: [Result], to path: String) throws {
    let entries: [[String: Any]] = results.map { result in
        var entry: [String: Any] = [
            "name": result.benchmark.name,
            "unit": result.benchmark.unit,
            "ours": result.ours,
            "peer": result.peer,
            "peerName": result.benchmark.peerName,
            "ratio": result.ratio,
            "goal": result.benchmark.goal.description,
            "holds": result.holds.map { $0 as Any } ?? NSNull(),
        ]
        if let reason = result.notMeasured {
            // JSON has no NaN.
            for key in ["ours", "peer", "ratio"] { entry[key] = NSNull() }
            entry["notMeasured"] = reason
        }
        return entry
    }
    let document: [String: Any] = ["machine": machineDescription(), "results": entries]
    let data = try JSONSerialization.data(
        withJSONObject: document,
        options: [
            .prettyPrinted, .sortedKeys,
            .withoutEscapingSlashes,
        ])
    try data.write(to: URL(fileURLWithPath: path))
}

/// The results as a Markdown table.
func markdownTable(_ results: [Result]) -> String {
    var lines = [
        "| name | ours | peer | peer is | unit | ratio | goal | holds |",
        "|---|---:|---:|---|---|---:|---|---|",
    ]
    for result in results {
        if let reason = result.notMeasured {
            lines.append(
                "| `\(result.benchmark.name)` | - | - | \(result.benchmark.peerName) | \(result.benchmark.unit) | - | "
                    + "`\(result.benchmark.goal)` | not measured: \(reason.replacingOccurrences(of: "|", with: "\\|")) |"
            )
            continue
        }
        let holds = result.holds.map { $0 ? "yes" : "**no**" } ?? "-"
        lines.append(
            "| `\(result.benchmark.name)` | \(format(result.ours)) | \(format(result.peer)) | "
                + "\(result.benchmark.peerName) | \(result.benchmark.unit) | \(format(result.ratio)) | "
                + "`\(result.benchmark.goal)` | \(holds) |")
    }
    return lines.joined(separator: "\n") + "\n"
}
