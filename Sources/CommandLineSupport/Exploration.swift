import ArgumentParser
import DAX
import Foundation

/// The options of every `explore` command (`daxemu explore`, `kvstore explore`, `pmemlog explore`):
/// the explorer's settings, the shard, the JSON report and the replay of one failure.
public struct ExploreOptions: ParsableArguments {
    /// `--images-per-point`: ``CrashExplorer/imagesPerPoint``.
    @Option(help: "Seeded random crash images per crash point, on top of none, all and small subsets.")
    public var imagesPerPoint = 8

    /// `--seed`: ``CrashExplorer/seed``, and the workload's seed where it has one.
    @Option(help: "Seed of the workload and of the random images.")
    public var seed: UInt64 = 1

    /// `--domain`: `adr` or `eadr`.
    @Option(help: "The persistence domain: adr (flushed and fenced lines survive) or eadr (every store).")
    public var domain = "adr"

    /// `--shard K/N`: ``CrashExplorer/shard``.
    @Option(help: "Check only shard K of N (1 <= K <= N); N runs check what one run checks.")
    public var shard: String?

    /// `--json FILE`: where the report goes as JSON.
    @Option(help: "Write the report as JSON to this file (join shards with `daxemu explore-merge`).")
    public var json: String?

    /// `--replay POINT:SEED`: the failure to replay.
    @Option(help: "Replay one failure, POINT:SEED, and keep its image (needs --keep).")
    public var replay: String?

    /// `--keep FILE`: where the replayed image is kept.
    @Option(help: "Where --replay writes the failure's crash image, a device file.")
    public var keep: String?

    /// The defaults.
    public init() {}

    /// Refuses values the explorer cannot take.
    public func validate() throws {
        guard imagesPerPoint >= 0 else { throw ValidationError("--images-per-point is 0 or more") }
        guard ["adr", "eadr"].contains(domain) else { throw ValidationError("--domain is adr or eadr, not \(domain)") }
        guard (replay == nil) == (keep == nil) else { throw ValidationError("--replay and --keep go together") }
        try Self.requireFileName(json, option: "--json", what: "the report")
        try Self.requireFileName(keep, option: "--keep", what: "the crash image")
        if let shard {
            do { _ = try CrashShard(parsing: shard) } catch let error as DAXError {
                throw ValidationError("--shard: \(error.message)")
            }
        }
        if let replay, Self.parseReplay(replay) == nil {
            throw ValidationError(
                "--replay is POINT:SEED, as a failure line prints it (crash points count from 1), not \(replay)")
        }
    }

    /// Refuses an empty file name for `option`: a bad argument, found before any work is done.
    public static func requireFileName(_ path: String?, option: String, what: String) throws {
        guard path?.isEmpty != true else {
            throw ValidationError("\(option) names no file: give a file name for \(what)")
        }
    }

    /// `POINT:SEED`, as a failure line prints it.
    static func parseReplay(_ text: String) -> (point: Int, seed: UInt64)? {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let point = Int(parts[0]), point >= 1, let seed = UInt64(parts[1]) else { return nil }
        return (point, seed)
    }

    /// The explorer these options describe, on a device of `deviceSize` bytes, for the workload
    /// `workload` names (with its own parameters: shards of different workloads must not merge).
    public func explorer(deviceSize: Int, workload: String? = nil) throws -> CrashExplorer {
        var explorer = CrashExplorer(
            deviceSize: deviceSize, domain: domain == "eadr" ? .eadr : .adr, imagesPerPoint: imagesPerPoint,
            seed: seed)
        if let shard { explorer.shard = try CrashShard(parsing: shard) }
        explorer.workloadName = workload
        return explorer
    }

    /// Explores (or replays, with `--replay`), prints what it found, writes `--json`, and exits
    /// with status 1 when a crash image failed its check.
    ///
    /// `name` says what the workload is, with its parameters, for the report's campaign.
    public func run(
        deviceSize: Int, name: String? = nil, setup: (PMemDevice) throws -> Void,
        workload: (PMemDevice) throws -> Void, check: (PMemDevice) throws -> Void
    ) throws {
        let explorer = try explorer(deviceSize: deviceSize, workload: name)
        // A report that could not be written is found out before the exploration, not after it.
        if let json { try checkCanWrite(json, what: "the report") }
        if let replay, let keep {
            guard let (point, seed) = Self.parseReplay(replay) else {
                throw CommandError("--replay is POINT:SEED, as a failure line prints it, not \(replay)")
            }
            let failure = CrashFailure(crashPoint: point, seed: seed, error: "")
            let error = try explorer.replay(
                failure, keepingImageAt: keep, setup: setup, workload: workload, check: check)
            print("crash image of point \(point), seed \(seed) kept in \(keep)")
            if let error {
                print("check fails: \(error)")
                throw ExitCode(1)
            }
            print("check passes on it now")
            return
        }
        let progress = ImagesProgress()
        let report = try explorer.explore(setup: setup, workload: workload) { image in
            progress.checked()
            try check(image)
        }
        progress.finish()
        try Self.report(report, json: json)
    }

    /// Prints a report (and the replay command of each failure) and writes it as JSON to `json`;
    /// exits with status 1 when it holds failures.
    public static func report(_ report: CrashReport, json: String?) throws {
        let shards = report.isComplete ? "" : " (shards \(report.shards.map(\.description).joined(separator: ", ")))"
        Swift.print(
            "crash points: \(report.crashPoints), images checked: \(report.imagesChecked)\(shards), "
                + "images per second: \(Int(report.imagesPerSecond.rounded())), failures: \(report.failures.count)")
        for failure in report.failures.prefix(20) {
            Swift.print("  \(failure)  (replay: --replay \(failure.crashPoint):\(failure.seed) --keep FILE)")
        }
        if report.failures.count > 20 { Swift.print("  ... and \(report.failures.count - 20) more") }
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            let data = try encoder.encode(report)
            do {
                try data.write(to: URL(fileURLWithPath: json))
            } catch {
                // Foundation's own text names a Cocoa error domain; the POSIX cause is more use.
                let cause = (error as NSError).userInfo[NSUnderlyingErrorKey] as? NSError
                let reason = cause.map { String(cString: strerror(Int32($0.code))) } ?? error.localizedDescription
                throw CommandError("cannot write the report to \(json): \(reason)")
            }
        }
        if !report.failures.isEmpty { throw ExitCode(1) }
    }
}

/// How far an exploration has got, on stderr when it is a terminal: the crash images checked so
/// far, on one line redrawn at most five times a second. A long campaign (thousands of images,
/// minutes) shows it is moving; the total is not known until the workload has run.
final class ImagesProgress {
    private let shown = isatty(2) == 1
    private var images = 0
    private var last = ContinuousClock.now

    /// One more image checked.
    func checked() {
        images += 1
        guard shown, ContinuousClock.now - last >= .milliseconds(200) else { return }
        last = ContinuousClock.now
        writeStderr("\rexplore: \(images) crash images checked")
    }

    /// Ends the line, if one was drawn, so that the report starts on its own.
    func finish() {
        guard shown, images > 0 else { return }
        writeStderr("\rexplore: \(images) crash images checked\n")
    }
}

/// Per-operation bookkeeping a checker needs: which operation was in flight at a crash point, so
/// that the state found can be compared with the state before it and after it.
public final class OperationProgress {
    /// Operations that returned; the next one is in flight.
    public var completed = 0

    /// Nothing completed yet.
    public init() {}
}

/// Refuses, before a command does its work, an output file that cannot be written: a directory,
/// or one whose directory is missing or not writable. `what` names what would be written there.
public func checkCanWrite(_ path: String, what: String) throws {
    var isDirectory: ObjCBool = false
    if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue {
        throw CommandError("cannot write \(path): it is a directory; give a file name for \(what)")
    }
    let directory = (path as NSString).deletingLastPathComponent
    let shown = directory.isEmpty ? "." : directory
    guard FileManager.default.fileExists(atPath: shown, isDirectory: &isDirectory), isDirectory.boolValue else {
        throw CommandError("cannot write \(path): \(shown): no such directory")
    }
    guard access(shown, W_OK) == 0 else {
        throw CommandError("cannot write \(path): \(shown): \(String(cString: strerror(errno)))")
    }
}
