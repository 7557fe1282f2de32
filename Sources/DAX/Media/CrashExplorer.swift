import Glibc

/// Runs a workload on an emulated device and checks what a power failure at each of its fences
/// would leave.
///
/// Every fence of the workload (a ``PMemDevice/drain()``, the fence inside
/// ``PMemDevice/persist(offset:count:)`` and inside a copy or fill without `.noDrain`, and the
/// same through a DAX file mapping) is a crash point, and so is the end of the workload. At each,
/// before the fence takes effect, the explorer makes crash images: the persisted bytes alone,
/// with every in-flight line, every single line and pair of lines when there are few, and
/// ``imagesPerPoint`` seeded subsets (whole lines, some of their 8-byte words, prefixes). It opens
/// each image as a device of its own, privately mapped (whatever the checker stores is thrown
/// away), and runs the checker on it. A crash point with nothing in flight and nothing persisted
/// since the last image checked is counted but not checked again.
///
/// Making an image costs in proportion to the lines in flight: the media copy itself is the
/// image, with the chosen lines copied in for the checker and put back afterwards.
///
/// The workload must fence from the thread that calls ``explore(setup:workload:check:)``.
public struct CrashExplorer: Sendable {
    /// Bytes of the device the workload runs on.
    public var deviceSize: Int
    /// The persistence domain emulated.
    public var domain: PersistenceDomain
    /// Seeded random images per crash point, on top of none, all, and the small subsets.
    public var imagesPerPoint: Int
    /// Chooses the random images: the same seed on the same workload makes the same images.
    public var seed: UInt64
    /// The part of the campaign this run checks.
    public var shard: CrashShard = .all
    /// Where the workload's device is created (and removed at once: it lives as an open file).
    public var directory = "/dev/shm"
    /// What the workload is, with its parameters (`daxemu explore --ops 20`), kept in the report's
    /// ``CrashReport/campaign``: shards of different workloads then refuse to merge. Nil: unnamed.
    public var workloadName: String?

    /// An explorer of a device of `deviceSize` bytes (see ``PMemDevice/create(path:size:options:)``).
    public init(deviceSize: Int, domain: PersistenceDomain = .adr, imagesPerPoint: Int = 8, seed: UInt64 = 1) {
        self.deviceSize = deviceSize
        self.domain = domain
        self.imagesPerPoint = imagesPerPoint
        self.seed = seed
    }

    /// Runs `setup` then `workload` on a fresh emulated device in `.cacheFlush` mode (so every
    /// fence, including the one inside `persist`, is a crash point); at every fence of the
    /// workload it makes crash images (nothing in flight kept, everything kept, and
    /// `imagesPerPoint` seeded subsets of the in-flight lines) and runs `check` on each, opened
    /// as a device of its own. What `check` throws is a failure of the report; what `setup` or
    /// `workload` throws, or a bad configuration (`.invalidArgument`), ends the exploration.
    public func explore(
        setup: (PMemDevice) throws -> Void = { _ in }, workload: (PMemDevice) throws -> Void,
        check: (PMemDevice) throws -> Void
    ) throws -> CrashReport {
        let started = monotonicSeconds()
        let run = try Run(self, replaying: nil)
        defer { run.close() }
        try run.go(setup: setup, workload: workload, check: check)
        return CrashReport(
            crashPoints: run.points, imagesChecked: run.images,
            failures: run.failures.sorted { ($0.crashPoint, $0.seed) < ($1.crashPoint, $1.seed) }, shards: [shard],
            seconds: monotonicSeconds() - started, campaign: CrashCampaign(self))
    }

    /// Runs the workload again up to the failure's crash point, writes its image to `path` (a
    /// device file for ``PMemDevice/open(path:options:)`` and a debugger), and runs `check` on it
    /// once more, at the crash point as the exploration did (a checker may look at what the
    /// workload has done so far). Returns what `check` threw now, nil if it passed (the workload
    /// is not deterministic, or the bug is gone). Throws `.alreadyExists` if `path` exists, and
    /// `.invalidArgument` when the workload never reaches the crash point.
    public func replay(
        _ failure: CrashFailure, keepingImageAt path: String, setup: (PMemDevice) throws -> Void = { _ in },
        workload: (PMemDevice) throws -> Void, check: (PMemDevice) throws -> Void
    ) throws -> String? {
        guard SystemCalls.live.stat(path) == nil else {
            throw DAXError(.alreadyExists, "cannot keep a crash image at \(path): it exists")
        }
        let run = try Run(self, replaying: (failure, path))
        defer { run.close() }
        try run.go(setup: setup, workload: workload, check: check)
        guard run.replayed else {
            throw DAXError(
                .invalidArgument,
                "cannot replay crash point \(failure.crashPoint): the workload has only \(run.points) crash points")
        }
        return run.failures.first?.error
    }

    private func validate() throws {
        guard imagesPerPoint >= 0 else {
            throw DAXError(.invalidArgument, "imagesPerPoint \(imagesPerPoint) is negative")
        }
    }

    /// One exploration: the device, the counts, the failures.
    private final class Run {
        let explorer: CrashExplorer
        let device: PMemDevice
        let media: MediaCopy
        let replaying: (failure: CrashFailure, path: String)?
        var points = 0
        var images = 0
        var failures: [CrashFailure] = []
        var replayed = false
        /// An error of the explorer itself at a crash point (an image it could not open).
        var internalError: Error?
        /// The media copy's generation when its image with nothing in flight was last checked.
        var checkedGeneration: Int?
        var firstFence = 0

        init(_ explorer: CrashExplorer, replaying: (CrashFailure, String)?) throws {
            try explorer.validate()
            self.explorer = explorer
            self.replaying = replaying
            var options = PMemDevice.Options()
            options.persistence = .cacheFlush
            options.powerFailureEmulation = explorer.domain
            options.sparse = true
            let path = "\(explorer.directory)/dax-explore-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
            device = try PMemDevice.create(path: path, size: explorer.deviceSize, options: options)
            _ = device.systemCalls.unlink(path)
            media = device.emulation!
        }

        func close() {
            media.observer.withTrackedLock { $0 = nil }
            device.close()
        }

        func go(
            setup: (PMemDevice) throws -> Void, workload: (PMemDevice) throws -> Void,
            check: (PMemDevice) throws -> Void
        ) throws {
            try setup(device)
            try withoutActuallyEscaping(check) { check in
                firstFence = media.fences.load(ordering: .relaxed)
                media.observer.withTrackedLock {
                    $0 = FenceObserver { [self] number in crashPoint(number - firstFence, check) }
                }
                defer { media.observer.withTrackedLock { $0 = nil } }
                try workload(device)
                crashPoint(media.fences.load(ordering: .relaxed) - firstFence + 1, check)
            }
            if let internalError { throw internalError }
        }

        private func crashPoint(_ point: Int, _ check: (PMemDevice) throws -> Void) {
            points = point
            guard internalError == nil else { return }
            let (lines, generation) = media.inFlight()
            if let replaying {
                guard point == replaying.failure.crashPoint else { return }
                let kept = CrashImagePlan.image(seed: replaying.failure.seed, of: lines)
                do {
                    try media.writeImage(to: replaying.path, keeping: kept)
                    replayed = true
                } catch {
                    internalError = error
                    return
                }
                checkImage(point: point, seed: replaying.failure.seed, kept: kept, check)
                return
            }
            if lines.isEmpty, generation == checkedGeneration { return }
            checkedGeneration = generation
            let seeds = CrashImagePlan.seeds(
                point: point, lineCount: lines.count, randomImages: explorer.imagesPerPoint,
                explorerSeed: explorer.seed)
            for seed in seeds where explorer.shard.owns(point: point, seed: seed) {
                checkImage(point: point, seed: seed, kept: CrashImagePlan.image(seed: seed, of: lines), check)
                guard internalError == nil else { return }
                images += 1
            }
        }

        /// Runs `check` on the media copy with `kept` applied, opened privately.
        private func checkImage(point: Int, seed: UInt64, kept: [KeptLine], _ check: (PMemDevice) throws -> Void) {
            do {
                try media.withLinesApplied(kept) {
                    let image = try PMemDevice.openPrivateImage(
                        fd: media.fd, size: device.size, name: "crash image \(point)/\(seed)",
                        calls: device.systemCalls)
                    defer { image.close() }
                    do {
                        try check(image)
                    } catch {
                        failures.append(CrashFailure(crashPoint: point, seed: seed, error: "\(error)"))
                    }
                }
            } catch {
                internalError = error
            }
        }
    }
}

/// Seconds on the monotonic clock.
func monotonicSeconds() -> Double {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
}
