/// Part of a crash-exploration campaign: shard `index` (from 1) of `count`.
///
/// Each crash image (a crash point and a seed) belongs to exactly one shard, chosen by a hash of
/// the two, so `count` runs with shards 1 through `count` check exactly the images one run
/// checks, each once. Every shard runs the whole workload: crash points are found by running it.
public struct CrashShard: Sendable, Hashable, Codable, CustomStringConvertible {
    /// From 1 to ``count``.
    public let index: Int
    /// Shards in the campaign, at least 1.
    public let count: Int

    /// The whole campaign in one run.
    public static let all = CrashShard(checkedIndex: 1, count: 1)

    /// Throws `.invalidArgument` unless `1 <= index <= count`.
    public init(index: Int, count: Int) throws {
        guard count >= 1 else {
            throw DAXError(.invalidArgument, "shard \(index)/\(count): the number of shards N is 1 or more")
        }
        guard index >= 1, index <= count else {
            throw DAXError(
                .invalidArgument, "shard \(index)/\(count) is not one of 1/\(count) through \(count)/\(count)")
        }
        self.init(checkedIndex: index, count: count)
    }

    /// Parses `K/N` (for example `3/8`, as a CI matrix or a Slurm array passes it).
    public init(parsing text: String) throws {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let index = Int(parts[0]), let count = Int(parts[1]) else {
            throw DAXError(.invalidArgument, "shard '\(text)' is not K/N, such as 1/4")
        }
        try self.init(index: index, count: count)
    }

    private init(checkedIndex index: Int, count: Int) {
        self.index = index
        self.count = count
    }

    private enum CodingKeys: String, CodingKey { case index, count }

    /// Decodes a shard as ``init(index:count:)`` checks it: a report that names shard 0 of 0 is
    /// corrupt, not a campaign.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let index = try container.decode(Int.self, forKey: .index)
        let count = try container.decode(Int.self, forKey: .count)
        do {
            try self.init(index: index, count: count)
        } catch let error as DAXError {
            throw DecodingError.dataCorruptedError(forKey: .count, in: container, debugDescription: error.message)
        }
    }

    /// Whether the image of `seed` at crash point `point` is this shard's.
    func owns(point: Int, seed: UInt64) -> Bool {
        guard count > 1 else { return true }
        var mix = SplitMix64(seed: UInt64(point) &* 0x9E37_79B9_7F4A_7C15 ^ seed)
        return Int(mix.next() % UInt64(count)) == index - 1
    }

    /// `K/N`, as ``init(parsing:)`` reads it.
    public var description: String { "\(index)/\(count)" }
}

/// What makes crash images the same in two runs: the explorer's settings and the workload's name.
/// Shards of one campaign have equal campaigns; ``CrashReport/merge(_:)`` refuses others.
public struct CrashCampaign: Sendable, Codable, Hashable, CustomStringConvertible {
    /// ``CrashExplorer/deviceSize``.
    public var deviceSize: Int
    /// ``CrashExplorer/domain``: `adr` or `eadr`.
    public var domain: String
    /// ``CrashExplorer/imagesPerPoint``.
    public var imagesPerPoint: Int
    /// ``CrashExplorer/seed``.
    public var seed: UInt64
    /// ``CrashExplorer/workloadName``: what the workload was, with its parameters (nil: unnamed).
    public var workload: String?

    /// The campaign of `explorer`'s settings.
    public init(_ explorer: CrashExplorer) {
        deviceSize = explorer.deviceSize
        domain = explorer.domain.description
        imagesPerPoint = explorer.imagesPerPoint
        seed = explorer.seed
        workload = explorer.workloadName
    }

    /// The settings, one line: `daxemu explore --ops 20, domain adr, seed 1, 8 images per point,
    /// 4194304 bytes of device`.
    public var description: String {
        (workload.map { "\($0), " } ?? "")
            + "domain \(domain), seed \(seed), \(counted(imagesPerPoint, "image")) per point, "
            + "\(deviceSize) bytes of device"
    }
}

/// What a crash exploration found.
public struct CrashReport: Sendable, Codable, Equatable {
    /// Fences of the workload, and the end of the workload: each a moment a power failure was
    /// emulated at.
    public var crashPoints: Int
    /// Crash images the checker ran on (in this shard).
    public var imagesChecked: Int
    /// Images the checker rejected, by crash point then seed; empty when every image passed.
    public var failures: [CrashFailure]
    /// The shards this report covers, sorted (all of them after a complete merge).
    public var shards: [CrashShard]
    /// Seconds the exploration took (the sum over merged shards).
    public var seconds: Double
    /// The settings the images came from (nil in a report made by hand, or written before reports
    /// named them): shards of one campaign name the same.
    public var campaign: CrashCampaign?

    /// Creates a report.
    public init(
        crashPoints: Int, imagesChecked: Int, failures: [CrashFailure], shards: [CrashShard] = [.all],
        seconds: Double = 0, campaign: CrashCampaign? = nil
    ) {
        self.crashPoints = crashPoints
        self.imagesChecked = imagesChecked
        self.failures = failures
        self.shards = shards
        self.seconds = seconds
        self.campaign = campaign
    }

    private enum CodingKeys: String, CodingKey { case crashPoints, imagesChecked, failures, shards, seconds, campaign }

    /// Decodes a report as an exploration can make one: a shard edited by hand or damaged on its
    /// way (a negative count, a failure at no crash point) is corrupt, not a result to merge.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self.init(
            crashPoints: try container.decode(Int.self, forKey: .crashPoints),
            imagesChecked: try container.decode(Int.self, forKey: .imagesChecked),
            failures: try container.decode([CrashFailure].self, forKey: .failures),
            shards: try container.decode([CrashShard].self, forKey: .shards),
            seconds: try container.decode(Double.self, forKey: .seconds),
            campaign: try container.decodeIfPresent(CrashCampaign.self, forKey: .campaign))
        if let problem {
            throw DecodingError.dataCorruptedError(forKey: .imagesChecked, in: container, debugDescription: problem)
        }
    }

    /// What makes this report one no exploration makes, or nil.
    var problem: String? {
        if crashPoints < 1 { return "\(crashPoints) crash points (an exploration has at least 1)" }
        if imagesChecked < 0 { return "\(imagesChecked) images checked" }
        if failures.count > imagesChecked {
            return "\(counted(failures.count, "failure")) among \(counted(imagesChecked, "image")) checked"
        }
        if let failure = failures.first(where: { !(1...crashPoints).contains($0.crashPoint) }) {
            return "a failure at crash point \(failure.crashPoint), not one of 1 to \(crashPoints)"
        }
        if shards.isEmpty { return "no shards" }
        if !seconds.isFinite || seconds < 0 { return "\(seconds) seconds" }
        return nil
    }

    /// Images checked per second of exploration.
    public var imagesPerSecond: Double { seconds > 0 ? Double(imagesChecked) / seconds : 0 }

    /// Joins the reports of the shards of one campaign. Throws `.invalidArgument` when they are
    /// not shards of one campaign (different settings, shard counts or crash points, a shard
    /// twice, none). Reports that name no ``campaign`` (made by hand, or written before reports
    /// named it) are compared by crash points and shards only; one that names it does not merge
    /// with one that does not.
    public static func merge(_ reports: [CrashReport]) throws -> CrashReport {
        guard let first = reports.first else { throw DAXError(.invalidArgument, "no crash reports to merge") }
        var shards: [CrashShard] = []
        var images = 0
        var seconds = 0.0
        for report in reports {
            if let problem = report.problem {
                throw DAXError(.invalidArgument, "cannot merge a crash report of \(problem)")
            }
            let sum = images.addingReportingOverflow(report.imagesChecked)
            seconds += report.seconds
            guard !sum.overflow, seconds.isFinite else {
                throw DAXError(.invalidArgument, "cannot merge crash reports: their totals do not fit in a report")
            }
            images = sum.partialValue
            guard report.campaign == first.campaign else {
                throw DAXError(
                    .invalidArgument,
                    "cannot merge crash reports of different campaigns: "
                        + "\(report.campaign.map { "\($0)" } ?? "a report that names no settings") against "
                        + "\(first.campaign.map { "\($0)" } ?? "a report that names no settings")")
            }
            guard report.crashPoints == first.crashPoints else {
                throw DAXError(
                    .invalidArgument,
                    "cannot merge crash reports of different runs: \(report.crashPoints) crash points "
                        + "against \(first.crashPoints)")
            }
            shards += report.shards
        }
        guard Set(shards.map(\.count)).count == 1 else {
            throw DAXError(.invalidArgument, "cannot merge shards of campaigns of different sizes: \(shards)")
        }
        guard Set(shards).count == shards.count else {
            throw DAXError(.invalidArgument, "cannot merge crash reports: a shard appears twice in \(shards)")
        }
        return CrashReport(
            crashPoints: first.crashPoints, imagesChecked: images,
            failures: reports.flatMap(\.failures).sorted { ($0.crashPoint, $0.seed) < ($1.crashPoint, $1.seed) },
            shards: shards.sorted { $0.index < $1.index }, seconds: seconds,
            campaign: first.campaign)
    }

    /// True when the shards cover the whole campaign.
    public var isComplete: Bool { shards.count == shards.first?.count }
}

/// A crash image the checker rejected.
public struct CrashFailure: Sendable, CustomStringConvertible, Codable, Equatable {
    /// Which fence of the workload, counted from 1 (one past the last fence: after the workload).
    public var crashPoint: Int
    /// Replays the image with ``CrashExplorer/replay(_:keepingImageAt:setup:workload:check:)``.
    public var seed: UInt64
    /// What `check` threw.
    public var error: String

    /// Creates a failure record.
    public init(crashPoint: Int, seed: UInt64, error: String) {
        self.crashPoint = crashPoint
        self.seed = seed
        self.error = error
    }

    /// One line: the crash point, the seed and the error.
    public var description: String { "crash point \(crashPoint), seed \(seed): \(error)" }
}
