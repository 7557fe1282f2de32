/// What survives a power failure: the platform's persistence domain.
///
/// Under ADR (asynchronous DRAM refresh) the memory controller's write queues are in the domain
/// but the CPU caches are not: a store survives once its cache line was flushed and a fence has
/// waited for the flush. Under eADR the caches are in the domain too: every store survives.
public enum PersistenceDomain: Sendable, Equatable, Hashable, CustomStringConvertible {
    /// Only flushed-and-fenced lines survive (ADR).
    case adr
    /// The CPU caches are in the domain: every store survives (eADR).
    case eadr

    /// `adr` or `eadr`.
    public var description: String {
        switch self {
        case .adr: "adr"
        case .eadr: "eadr"
        }
    }
}

/// Which of the lines in flight at a power failure (stored or flushed, not yet fenced) a crash
/// image keeps on top of what was persisted.
public enum InFlightLines: Sendable, Equatable, Hashable {
    /// Only what was persisted.
    case none
    /// Every line stored, flushed or not.
    case all
    /// A subset chosen by `seed`: each in-flight line is lost, kept whole, kept as a seeded subset
    /// of its 8-byte words, or kept as a prefix of its words. The same seed on the same lines
    /// always makes the same image.
    case random(seed: UInt64)
}

/// One cache line of an image and which of its eight 8-byte words reach the image (bit i:
/// word i; `0xFF` is the whole line).
struct KeptLine: Sendable, Equatable {
    /// The line's index on the device (device offset / 64).
    var line: Int
    var words: UInt8

    static let whole: UInt8 = 0xFF
}

/// SplitMix64: the deterministic generator behind seeded crash images.
struct SplitMix64: RandomNumberGenerator, Sendable {
    var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// How crash images choose among in-flight lines.
enum CrashImagePlan {
    /// The lines `keeping` keeps of `lines` (sorted in-flight line indices).
    static func lines(_ keeping: InFlightLines, of lines: [Int]) -> [KeptLine] {
        switch keeping {
        case .none: return []
        case .all: return lines.map { KeptLine(line: $0, words: KeptLine.whole) }
        case .random(let seed): return randomSubset(seed: seed, of: lines)
        }
    }

    /// Each line independently: lost, whole, a seeded subset of its words, or a prefix of them
    /// (a line written back word by word, cut off by the failure).
    static func randomSubset(seed: UInt64, of lines: [Int]) -> [KeptLine] {
        var random = SplitMix64(seed: seed)
        var kept: [KeptLine] = []
        for line in lines {
            let draw = random.next()
            switch draw % 4 {
            case 0: continue
            case 1: kept.append(KeptLine(line: line, words: KeptLine.whole))
            case 2:
                let words = UInt8(truncatingIfNeeded: draw >> 8)
                if words != 0 { kept.append(KeptLine(line: line, words: words)) }
            default:
                let prefix = 1 + Int((draw >> 8) % 7)
                kept.append(KeptLine(line: line, words: UInt8((1 << prefix) - 1)))
            }
        }
        return kept
    }

    /// The image a crash-point seed names, for in-flight `lines`: 0 keeps none, 1 keeps all,
    /// 2 ..< 2 + n keeps one whole line, the next n(n-1)/2 seeds keep a pair of whole lines (in
    /// the order (0,1), (0,2), ..., (1,2), ...); any other seed is ``randomSubset(seed:of:)``.
    static func image(seed: UInt64, of lines: [Int]) -> [KeptLine] {
        let n = UInt64(lines.count)
        if seed == 0 { return [] }
        if seed == 1 { return Self.lines(.all, of: lines) }
        if seed < 2 + n { return [KeptLine(line: lines[Int(seed - 2)], words: KeptLine.whole)] }
        let pairs = n * (n &- 1) / 2
        if n >= 2, seed < 2 + n + pairs {
            var index = seed - 2 - n
            var first = 0
            var remaining = n - 1
            while index >= remaining {
                index -= remaining
                first += 1
                remaining -= 1
            }
            let second = first + 1 + Int(index)
            return [
                KeptLine(line: lines[first], words: KeptLine.whole),
                KeptLine(line: lines[second], words: KeptLine.whole),
            ]
        }
        return randomSubset(seed: seed, of: lines)
    }

    /// The seeds of the images made at crash point `point` (from 1) with `lines` in flight:
    /// none and all, every single line and pair when that is at most `exhaustiveLimit` images,
    /// then `randomImages` random subsets (seeds with the top bit set, so they never name an
    /// enumerated image). With nothing in flight, one image.
    static func seeds(
        point: Int, lineCount: Int, randomImages: Int, explorerSeed: UInt64, exhaustiveLimit: Int = 64
    ) -> [UInt64] {
        if lineCount == 0 { return [0] }
        var seeds: [UInt64] = [0, 1]
        let n = lineCount
        let enumerated = n + n * (n - 1) / 2
        if n >= 2, enumerated <= exhaustiveLimit {
            seeds += (0..<enumerated).map { UInt64(2 + $0) }
        }
        var random = SplitMix64(seed: explorerSeed ^ (UInt64(point) &* 0xD1B5_4A32_D192_ED03))
        for _ in 0..<randomImages { seeds.append(random.next() | (1 << 63)) }
        return seeds
    }
}
