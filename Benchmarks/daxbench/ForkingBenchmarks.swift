import CBenchPeers
import DAX
import Foundation

/// Forking (`docs/forking.md`): a reflink clone against copying the file and against xfs's reflink,
/// a copy-on-write fault on a DAX mapping against the kernel's after `fork()`, and migration
/// against the copy it must make.
enum ForkingBenchmarks {
    static let pageSize = 4096
    static let gib = 1 << 30
    static let mib = 1 << 20

    static var all: [Benchmark] { [clone1GiB, copyOnWriteFault, MigrationBenchmarks.migrate1GiB] }

    // MARK: - clone

    /// `DAXFileSystem.clone` of a 1 GiB file that has all its blocks (written with 1 MiB writes),
    /// ms, vs `cp` of a 1 GiB tmpfs file to a new tmpfs file, run as a process (posix_spawn and
    /// wait4, so the process start is in it: the row prints what starting `true` costs). Variants:
    /// `cp --reflink=always` of a 1 GiB file on a loop-mounted xfs image made with
    /// `mkfs.xfs -m reflink=1`, a process too, and the `FICLONE` ioctl it makes, from C, without
    /// the process. Where the machine cannot mount the image those two variants print why. The
    /// last variant clones the source while a synced mapping shows every page of it: each page is
    /// then frozen at its mapping count and write-protected, where the unmapped source of the main
    /// row is only looked at.
    static var clone1GiB: Benchmark {
        Benchmark(
            name: "clone-1GiB", unit: "ms", peerName: "cp of 1 GiB on tmpfs (a process)", goal: .atMost(0.01),
            variants: [
                .init(
                    name: "clone-1GiB-vs-reflink", peerName: "cp --reflink=always on loop xfs (a process)",
                    goal: .report),
                .init(name: "clone-1GiB-vs-ficlone", peerName: "ioctl(FICLONE) on loop xfs (C)", goal: .report),
                .init(
                    name: "clone-1GiB-mapped", peerName: "cp of 1 GiB on tmpfs (a process)", goal: .report),
            ]
        ) { context in
            try clone(context)
        }
    }

    private static let cp = "/usr/bin/cp"

    private static func clone(_ context: BenchContext) throws -> Samples {
        let bytes = gib
        let pages = bytes / pageSize
        let setup = try BenchFileSystem(context, name: "clone", size: bytes + bytes / 4)
        let source = try setup.fs.create("/source")
        try fill(source, bytes: bytes)
        source.close()

        // One clone first: until the library shares blocks it refuses, and the row measures only
        // the peers, prints them, and reports itself not measured.
        var unsupported: String?
        do {
            let before = setup.fs.statistics()
            try cloneOrNotMeasured(setup.fs, "/source", to: "/clone")
            let after = setup.fs.statistics()
            let clone = try setup.fs.open("/clone", access: .readOnly)
            let references = try clone.blockReferences(offset: 0, count: bytes)
            clone.close()
            let shared = references.filter { $0 == 2 }.count
            guard shared == pages else {
                throw BenchError("clone-1GiB: after a clone \(shared) of \(pages) pages show 2 block references")
            }
            try setup.fs.remove("/clone")
            print(
                "clone-1GiB: a clone of the 1 GiB file took \(before.freeBlocks - after.freeBlocks) blocks and left "
                    + "\(after.sharedBlocks) shared")
        } catch let error as NotMeasured {
            unsupported = error.reason
        }

        guard FileManager.default.isExecutableFile(atPath: cp) else { throw BenchError("\(cp) is missing") }
        let tmpfsSource = try TmpfsFile(context, name: "clone-cp-source")
        try fill(fd: tmpfsSource.fd, bytes: bytes)
        let tmpfsDestination = context.devicePath("clone-cp-destination")
        defer { unlink(tmpfsDestination) }

        var volume: XFSReflinkVolume?
        var whyNoXFS: String?
        do {
            volume = try XFSReflinkVolume(context, fileBytes: bytes)
        } catch let error as NotMeasured {
            whyNoXFS = error.reason
            print("clone-1GiB: no xfs peer: \(error.reason)")
        }

        func ours() throws -> Double {
            let start = now()
            try setup.fs.clone("/source", to: "/clone")
            let elapsed = Double(now() - start) / 1e6
            try setup.fs.remove("/clone")
            return elapsed
        }
        /// `cp` with `options` from `from` to `to`, which is removed before and after, ms.
        func copy(_ options: [String], _ from: String, _ to: String) throws -> Double {
            unlink(to)
            let run = try runProcess([cp] + options + [from, to])
            guard run.status == 0 else {
                throw BenchError(
                    "cp \((options + [from, to]).joined(separator: " ")) failed (wait status \(run.status)): \(run.errors)"
                )
            }
            unlink(to)
            return Double(run.nanoseconds) / 1e6
        }
        func ficlone(_ from: String, _ to: String) throws -> Double {
            unlink(to)
            let elapsed = cbench_ficlone(from, to)
            guard elapsed >= 0 else { throw BenchError("ioctl(FICLONE) failed: errno \(-elapsed)") }
            unlink(to)
            return Double(elapsed) / 1e6
        }

        /// The clone of a source that a mapping shows in full: each page is frozen at its mapping
        /// count and write-protected, where a source nothing maps is only looked at.
        func oursMapped() throws -> Double {
            let file = try setup.fs.open("/source")
            defer { file.close() }
            let mapping = try file.map(count: bytes)
            defer { mapping.unmap() }
            _ = cbench_load_each_page(mapping.baseAddress, pages)
            // Synced first: a new mapping counts every page it shows as stored to until its first
            // sync, and the clone would make all 1 GiB durable again.
            try file.sync()
            return try ours()
        }

        var sides: [(name: String, measure: () throws -> Double)] = []
        if unsupported == nil { sides.append(("ours", ours)) }
        sides.append(("cp on tmpfs", { try copy([], tmpfsSource.path, tmpfsDestination) }))
        if let volume {
            let destination = "\(volume.mountPoint)/clone"
            sides.append(("cp --reflink=always on xfs", { try copy(["--reflink=always"], volume.source, destination) }))
            sides.append(("ioctl(FICLONE) on xfs", { try ficlone(volume.source, destination) }))
        }
        if unsupported == nil { sides.append(("ours with the source mapped", oursMapped)) }
        let samples = try context.interleave(sides.map(\.measure))
        let start = try median((0..<5).map { _ in Double(try runProcess(["/bin/true"]).nanoseconds) / 1e6 })
        print(
            "clone-1GiB: cp runs as a process (posix_spawn + wait4, timed from spawn to reaped); starting and "
                + "reaping /bin/true the same way takes \(format(start)) ms (median of 5)")
        for (side, sideSamples) in zip(sides, samples) {
            print("clone-1GiB: \(side.name) \(format(median(sideSamples))) ms (median of \(sideSamples.count))")
        }
        if let unsupported { throw NotMeasured(unsupported) }
        var result = Samples(ours: samples[0], peer: samples[1])
        if let whyNoXFS {
            result.variants = [.notMeasured(whyNoXFS), .notMeasured(whyNoXFS)]
        } else {
            result.variants = [
                Samples(ours: samples[0], peer: samples[2]), Samples(ours: samples[0], peer: samples[3]),
            ]
        }
        result.variants.append(Samples(ours: samples[samples.count - 1], peer: samples[1]))
        return result
    }

    /// `fs.clone`, or `NotMeasured` if this build refuses it with `.unsupported`.
    private static func cloneOrNotMeasured(_ fs: DAXFileSystem, _ source: String, to destination: String) throws {
        do {
            try fs.clone(source, to: destination)
        } catch let error as DAXError where error.code == .unsupported {
            throw NotMeasured("DAXFileSystem.clone is unsupported in this build (\(error.message))")
        }
    }

    /// Writes `bytes` to `file` in 1 MiB writes of a pattern that changes from MiB to MiB.
    private static func fill(_ file: DAXFile, bytes: Int) throws {
        var chunk = [UInt8](repeating: 0, count: mib)
        for offset in stride(from: 0, to: bytes, by: mib) {
            for index in stride(from: 0, to: mib, by: 512) { chunk[index] = UInt8(truncatingIfNeeded: offset >> 20) }
            try file.write(chunk, at: offset)
        }
    }

    /// The same pattern into a plain file with `pwrite`.
    private static func fill(fd: Int32, bytes: Int) throws {
        var chunk = [UInt8](repeating: 0, count: mib)
        for offset in stride(from: 0, to: bytes, by: mib) {
            for index in stride(from: 0, to: mib, by: 512) { chunk[index] = UInt8(truncatingIfNeeded: offset >> 20) }
            let written = chunk.withUnsafeBytes { pwrite(fd, $0.baseAddress, mib, off_t(offset)) }
            guard written == mib else { throw BenchError("pwrite of a peer file failed: errno \(errno)") }
        }
    }

    // MARK: - copy-on-write fault

    /// One store to each page of a clone through a fresh `.readWrite` mapping (every page shared
    /// with the source, so every store is a copy-on-write fault: a new block, the page copied,
    /// the extent journaled, the copy mapped), microseconds per fault, vs the kernel's
    /// copy-on-write fault on anonymous memory: the parent's store to each page after `fork()`,
    /// the child alive and waiting. Variants: ours with the faulting thread and the handler thread
    /// on one CPU; ours after a load from each page (untimed), so that each store finds the shared
    /// page mapped write-protected, as the kernel's does; and ours against a bare userfaultfd
    /// handler that copies a page into place (what the mechanism alone costs).
    static var copyOnWriteFault: Benchmark {
        Benchmark(
            name: "cow-fault", unit: "us/fault", peerName: forkPeer, goal: .atMost(5),
            variants: [
                .init(name: "cow-fault-one-cpu", peerName: forkPeer, goal: .report),
                .init(name: "cow-fault-after-load", peerName: forkPeer, goal: .report),
                .init(name: "cow-fault-vs-userfaultfd", peerName: FaultBenchmarks.bareUserfaultfd, goal: .report),
            ]
        ) { context in
            try copyOnWriteFaults(context)
        }
    }
    private static let forkPeer = "anonymous copy-on-write fault after fork() (C)"

    /// What one pass of a fault row measured.
    /// The byte every page of the source holds where the stores go.
    private static let sourceByte: UInt8 = 0xA5

    private static func copyOnWriteFaults(_ context: BenchContext) throws -> Samples {
        let row = "cow-fault"
        let pages = FaultBenchmarks.faultPages(context)
        let bytes = pages * pageSize
        let threadsBefore = FaultBenchmarks.threadIDs()
        let setup = try BenchFileSystem(context, name: row, size: 4 * bytes + 64 * mib)
        guard setup.fs.faultHandling == .userfaultfd else {
            throw NotMeasured(
                "a copy-on-write fault needs the fault handler; this file system has \(setup.fs.faultHandling)")
        }
        let source = try setup.fs.create("/source")
        try source.write([UInt8](repeating: sourceByte, count: bytes), at: 0)
        // Until the library shares blocks it refuses: the row then measures only the peers.
        var unsupported: String?
        do {
            try cloneOrNotMeasured(setup.fs, "/source", to: "/clone")
            try setup.fs.remove("/clone")
        } catch let error as NotMeasured {
            unsupported = error.reason
        }
        let check = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: pageSize)
        defer { check.deallocate() }

        var pass = 0
        func ours(oneCPU: Bool = false, loadFirst: Bool = false) throws -> FaultPass {
            pass += 1
            let value = UInt8(truncatingIfNeeded: pass % 200 + 1)
            try setup.fs.clone("/source", to: "/clone")
            let clone = try setup.fs.open("/clone")
            defer {
                clone.close()
                try? setup.fs.remove("/clone")
            }
            let mapping = try clone.map(count: bytes, access: .readWrite)
            defer { mapping.unmap() }
            if loadFirst {
                let sum = cbench_load_each_page(mapping.baseAddress, pages)
                guard sum == UInt64(pages) * UInt64(sourceByte) else {
                    throw BenchError("\(row): the clone's pages read \(sum), not \(pages) x \(sourceByte)")
                }
            }
            let before = setup.fs.statistics()
            // The threads the file system started (its fault handler), and this one.
            let threads = FaultBenchmarks.threadIDs().subtracting(threadsBefore).union([0])
            guard threads.count > 1 else { throw BenchError("\(row): the file system started no thread") }
            let saved = oneCPU ? try FaultBenchmarks.pin(threads, to: 0) : FaultBenchmarks.Affinities()
            let switches = FaultBenchmarks.contextSwitches()
            let start = now()
            cbench_store_each_page(mapping.baseAddress, pages, value)
            let elapsed = Double(now() - start)
            let switched = Double(FaultBenchmarks.contextSwitches() - switches)
            try FaultBenchmarks.restore(saved)
            // Counted after the unmap, which waits for the handler (as in the fault rows).
            mapping.unmap()
            let after = setup.fs.statistics()
            let copied = after.faults.copyOnWrite - before.faults.copyOnWrite
            let taken = before.freeBlocks - after.freeBlocks
            // At least a new block per page (the extents a copy splits may take a leaf or two).
            guard copied == pages, taken >= pages else {
                throw BenchError(
                    "\(row): \(pages) stores to shared pages made \(copied) copy-on-write faults and took \(taken) "
                        + "blocks (expected \(pages) faults and at least as many blocks)")
            }
            // The clone has the stores, the source has none of them.
            for (file, expected) in [(clone, value), (source, sourceByte)] {
                guard try file.read(into: check, at: 0) == bytes,
                    (0..<pages).allSatisfy({ check[$0 * pageSize] == expected })
                else {
                    throw BenchError("\(row): after the stores \(file.path) does not hold \(expected) on every page")
                }
            }
            return FaultPass(
                microsecondsPerFault: elapsed / Double(pages) / 1000,
                contextSwitchesPerFault: switched / Double(pages))
        }
        var forkFaults: [Double] = []
        func forkPeer() throws -> FaultPass {
            var faults: Int64 = 0
            let switches = FaultBenchmarks.contextSwitches()
            let elapsed = cbench_fork_cow(pages, &faults)
            let switched = Double(FaultBenchmarks.contextSwitches() - switches)
            guard elapsed >= 0 else { throw BenchError("\(row): the fork peer failed: errno \(-elapsed)") }
            guard faults >= pages else {
                throw BenchError("\(row): the fork peer's \(pages) stores took \(faults) faults; each should copy")
            }
            forkFaults.append(Double(faults) / Double(pages))
            return FaultPass(
                microsecondsPerFault: Double(elapsed) / Double(pages) / 1000,
                contextSwitchesPerFault: switched / Double(pages))
        }
        func userfaultfdPeer() throws -> FaultPass {
            let switches = FaultBenchmarks.contextSwitches()
            let elapsed = cbench_uffd_first_touch(
                pages, 1, -1, setup.fs.faultHandlerSpin.nanosecondsForPeer, setup.fs.faultHandlerThreads > 1 ? 1 : 0)
            let switched = Double(FaultBenchmarks.contextSwitches() - switches)
            guard elapsed >= 0 else { throw BenchError("\(row): the userfaultfd peer failed: errno \(-elapsed)") }
            return FaultPass(
                microsecondsPerFault: Double(elapsed) / Double(pages) / 1000,
                contextSwitchesPerFault: switched / Double(pages))
        }

        var sides: [(name: String, measure: () throws -> FaultPass)] = [
            ("fork() peer (the parent's stores, the child waiting)", forkPeer),
            ("bare userfaultfd peer (UFFDIO_COPY of a page)", userfaultfdPeer),
        ]
        if unsupported == nil {
            sides += [
                ("ours (store to a clone's fresh .readWrite mapping)", { try ours() }),
                ("ours, one CPU", { try ours(oneCPU: true) }),
                ("ours after a load from each page", { try ours(loadFirst: true) }),
            ]
        }
        let samples = try context.interleaveFaultPasses(row: row, pages: pages, sides)
        print("\(row): the fork peer's stores took \(format(median(forkFaults))) minor faults per page (median)")
        if let unsupported { throw NotMeasured(unsupported) }
        return Samples(
            ours: samples[2], peer: samples[0],
            variants: [
                Samples(ours: samples[3], peer: samples[0]), Samples(ours: samples[4], peer: samples[0]),
                Samples(ours: samples[2], peer: samples[1]),
            ])
    }
}

/// Page migration against the copy it must make.
enum MigrationBenchmarks {
    /// migrate of a 1 GiB file (256 MiB in quick mode), mapped with every page shown and nothing
    /// pinned, ms, vs memcpy of as many bytes between two buffers.
    static var migrate1GiB: Benchmark {
        Benchmark(
            name: "migrate-1GiB", unit: "ms", peerName: "memcpy of 1 GiB", goal: .atMost(1.5),
            variants: [
                .init(
                    name: "migrate-1GiB-vs-remap", peerName: "unmap, NT copy, mmap populated, per 4 MiB (C)",
                    goal: .report)
            ]
        ) { context in
            let bytes = context.quick ? 256 << 20 : 1 << 30
            let pages = bytes / 4096
            let setup = try BenchFileSystem(context, name: "migrate", size: bytes * 2 + bytes / 4)
            let file = try setup.fs.create("/f")
            try file.allocate(offset: 0, count: bytes)
            let mapping = try file.map(count: bytes)
            defer { mapping.unmap() }
            // Every page shown in the mapping, so that each migration unmaps and maps it again.
            _ = cbench_load_each_page(mapping.baseAddress, pages)
            let from = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
            let to = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
            defer {
                from.deallocate()
                to.deallocate()
            }
            memset(from, 1, bytes)
            memset(to, 2, bytes)
            // The same moves written against the kernel: a tmpfs file of twice the size, its
            // first half moved to its second in chunks of one migration transaction.
            let remapFile = try TmpfsFile(context, name: "migrate-remap")
            guard cbench_fallocate(remapFile.fd, Int64(2 * bytes)) == 0 else {
                throw BenchError("cannot allocate \(2 * bytes >> 20) MiB of tmpfs for the remap peer: errno \(errno)")
            }
            let chunk = 1024 * 4096  // the 1024 pages migrate moves per transaction
            let sides = try context.interleave([
                {
                    let start = now()
                    let result = try file.migrate(offset: 0, count: bytes)
                    let elapsed = Double(now() - start) / 1e6
                    guard result.migrated == pages, result.busy.isEmpty else {
                        throw BenchError("migrated \(result.migrated) of \(pages) pages, \(result.busy.count) busy")
                    }
                    return elapsed
                },
                {
                    let start = now()
                    memcpy(to, from, bytes)
                    return Double(now() - start) / 1e6
                },
                {
                    let elapsed = cbench_remap_migrate(remapFile.fd, bytes, chunk)
                    guard elapsed >= 0 else { throw BenchError("the remap peer failed: errno \(-elapsed)") }
                    return Double(elapsed) / 1e6
                },
            ])
            var samples = Samples(ours: sides[0], peer: sides[1])
            samples.variants = [Samples(ours: sides[0], peer: sides[2])]
            let perPage = median(samples.ours) * 1e6 / Double(pages)
            print(
                "migrate-1GiB: \(bytes >> 20) MiB, \(pages) pages moved per call: \(format(perPage)) ns per page, "
                    + "\(format(Double(bytes) / (median(samples.ours) * 1e6))) GB/s; memcpy "
                    + "\(format(Double(bytes) / (median(samples.peer) * 1e6))) GB/s (medians)")
            return samples
        }
    }
}

/// A loop-mounted xfs image with reflinks (`mkfs.xfs -m reflink=1`) in the benchmarks' directory,
/// holding one file of `fileBytes`; unmounted and removed when it goes. Its initializer throws
/// `NotMeasured` with the exact reason when the machine cannot make one.
final class XFSReflinkVolume {
    let image: String
    let mountPoint: String
    let source: String
    private var mounted = false

    init(_ context: BenchContext, fileBytes: Int) throws {
        image = context.devicePath("xfs.img")
        mountPoint = context.devicePath("xfs-mount")
        source = "\(mountPoint)/source"
        guard geteuid() == 0 else {
            throw NotMeasured("mounting a loop device needs root; daxbench runs as uid \(geteuid())")
        }
        guard let mkfs = ["/usr/sbin/mkfs.xfs", "/sbin/mkfs.xfs"].first(where: FileManager.default.isExecutableFile)
        else { throw NotMeasured("mkfs.xfs is not installed (apt-get install xfsprogs)") }
        guard access("/dev/loop-control", R_OK | W_OK) == 0 else {
            throw NotMeasured("no loop devices: /dev/loop-control: \(String(cString: strerror(errno)))")
        }
        let filesystems = (try? String(contentsOfFile: "/proc/filesystems", encoding: .utf8)) ?? ""
        let hasXFS = filesystems.split(separator: "\n").contains { $0.hasSuffix("\txfs") }
        unlink(image)
        let fd = open(image, O_RDWR | O_CREAT | O_EXCL, 0o600)
        guard fd >= 0 else { throw NotMeasured("cannot create \(image): \(String(cString: strerror(errno)))") }
        // Sparse: the image holds what xfs writes, about the file and its metadata.
        let sized = ftruncate(fd, off_t(fileBytes + fileBytes / 2 + (512 << 20)))
        close(fd)
        guard sized == 0 else { throw NotMeasured("cannot size \(image): \(String(cString: strerror(errno)))") }
        let made = try runProcess([mkfs, "-q", "-f", "-m", "reflink=1", image])
        guard made.status == 0 else {
            throw NotMeasured("mkfs.xfs -m reflink=1 failed (wait status \(made.status)): \(made.errors)")
        }
        guard mkdir(mountPoint, 0o700) == 0 else {
            throw NotMeasured("cannot make \(mountPoint): \(String(cString: strerror(errno)))")
        }
        let mount = try runProcess(["/usr/bin/mount", "-o", "loop", image, mountPoint])
        guard mount.status == 0 else {
            let kernel = hasXFS ? "" : "; the kernel lists no xfs in /proc/filesystems"
            throw NotMeasured(
                "mount -o loop of the xfs image failed (wait status \(mount.status)): \(mount.errors)\(kernel)")
        }
        mounted = true
        let file = open(source, O_RDWR | O_CREAT | O_EXCL, 0o600)
        guard file >= 0 else { throw BenchError("cannot create \(source): errno \(errno)") }
        defer { close(file) }
        var chunk = [UInt8](repeating: 0x5C, count: 1 << 20)
        for offset in stride(from: 0, to: fileBytes, by: chunk.count) {
            chunk[0] = UInt8(truncatingIfNeeded: offset >> 20)
            let written = chunk.withUnsafeBytes { pwrite(file, $0.baseAddress, $0.count, off_t(offset)) }
            guard written == chunk.count else { throw BenchError("pwrite to \(source) failed: errno \(errno)") }
        }
        // Extents on the image, not delayed allocations: a reflink of dirty pages writes them first.
        guard fsync(file) == 0 else { throw BenchError("fsync of \(source) failed: errno \(errno)") }
    }

    deinit {
        if mounted {
            let unmount = try? runProcess(["/usr/bin/umount", mountPoint])
            if unmount?.status != 0 {
                FileHandle.standardError.write(
                    Data("daxbench: cannot unmount \(mountPoint): \(unmount?.errors ?? "umount did not run")\n".utf8))
            }
        }
        rmdir(mountPoint)
        unlink(image)
    }
}

/// Runs `arguments` (the first an absolute path) as a process with posix_spawn, its output to
/// /dev/null, and reaps it with wait4: the raw wait status (0 for a clean exit), what it wrote to
/// stderr, and the nanoseconds from the spawn to the reaping.
func runProcess(_ arguments: [String]) throws -> (status: Int32, errors: String, nanoseconds: UInt64) {
    var errorPipe: [Int32] = [-1, -1]
    guard pipe(&errorPipe) == 0 else { throw BenchError("pipe failed: errno \(errno)") }
    var cArguments = arguments.map { strdup($0) } + [nil]
    defer { for pointer in cArguments { free(pointer) } }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, errorPipe[1], 2)
    posix_spawn_file_actions_addclose(&actions, errorPipe[0])
    posix_spawn_file_actions_addclose(&actions, errorPipe[1])
    var pid: pid_t = 0
    let start = now()
    let spawned = posix_spawn(&pid, arguments[0], &actions, nil, &cArguments, environ)
    close(errorPipe[1])
    defer { close(errorPipe[0]) }
    guard spawned == 0 else {
        throw BenchError("cannot start \(arguments[0]): \(String(cString: strerror(spawned)))")
    }
    // Read to the end first: the pipe closes when the process exits, and a full pipe cannot block it.
    var errors = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = buffer.withUnsafeMutableBytes { read(errorPipe[0], $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        if count <= 0 { break }
        errors += buffer[0..<count]
    }
    var status: Int32 = 0
    while wait4(pid, &status, 0, nil) < 0 && errno == EINTR {}
    let elapsed = now() - start
    let text = String(decoding: errors, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    return (status, text, elapsed)
}
