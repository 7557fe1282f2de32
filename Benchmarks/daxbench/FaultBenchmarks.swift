import CBenchPeers
import DAX
import Foundation

/// The fault handler (`docs/faults.md`) against the kernel's own faults on tmpfs, and `sync`'s
/// dirty tracking against making a whole mapping durable.
enum FaultBenchmarks {
    static let pageSize = 4096
    static let gib = 1 << 30

    static var all: [Benchmark] { [allocating, zeroPage, sync1GiB] }

    /// Pages a fault row touches per sample, one fault each: 8 MiB in quick mode, 32 MiB in full.
    static func faultPages(_ context: BenchContext) -> Int { context.quick ? 2048 : 8192 }

    /// The least a fault handler in user space costs: see `cbench_uffd_first_touch`.
    static let bareUserfaultfd = "a bare userfaultfd handler (C)"

    /// One store to each page of a sparse file through a fresh `.readWrite` mapping (an
    /// allocating fault each: a zeroed block, journaled, mapped), microseconds per fault, vs the
    /// kernel's first-touch write fault on a fresh `MAP_SHARED` mapping of a sparse tmpfs file.
    /// Variants: against a bare userfaultfd handler (what ours adds to the mechanism), and ours
    /// with the faulting thread and the handler thread on one CPU (what the wake-up of the
    /// handler on another CPU costs). Both handlers poll for the next fault as ours was set to at
    /// mount (`faultHandlerSpin`), also in the one-CPU passes, where ours was pinned after mount.
    static var allocating: Benchmark {
        Benchmark(
            name: "fault-allocating", unit: "us/fault", peerName: tmpfsWrite, goal: .atMost(5),
            variants: [
                .init(name: "fault-allocating-vs-userfaultfd", peerName: bareUserfaultfd, goal: .report),
                .init(name: "fault-allocating-one-cpu", peerName: tmpfsWrite, goal: .report),
            ]
        ) { context in
            try faults(context, row: "fault-allocating", store: true)
        }
    }
    private static let tmpfsWrite = "tmpfs first-touch write fault (C)"

    /// One load from each page of a sparse file through a fresh `.readWrite` mapping (a zero-page
    /// fault each: a zeroed page, write-protected, nothing allocated), microseconds per fault, vs
    /// the kernel's read fault on a hole of a tmpfs file. Variants as for `fault-allocating`, and
    /// ours through a `.readOnly` mapping, where the fault maps the kernel's shared zero page.
    static var zeroPage: Benchmark {
        Benchmark(
            name: "fault-zero-page", unit: "us/fault", peerName: tmpfsRead, goal: .atMost(5),
            variants: [
                .init(name: "fault-zero-page-vs-userfaultfd", peerName: bareUserfaultfd, goal: .report),
                .init(name: "fault-zero-page-one-cpu", peerName: tmpfsRead, goal: .report),
                .init(name: "fault-zero-page-read-only", peerName: tmpfsRead, goal: .report),
            ]
        ) { context in
            try faults(context, row: "fault-zero-page", store: false)
        }
    }
    private static let tmpfsRead = "tmpfs read fault on a hole (C)"

    /// `DAXFile.sync()` of a clean 1 GiB mapping after a store to one page, microseconds, vs
    /// `pmem_persist` of a whole 1 GiB mapping (what a sync costs that does not know which pages are
    /// dirty); then the same after a store to every page, where dirty tracking must cost little.
    /// Each has a variant with ours in `.msync` mode vs `msync(MS_SYNC)` of 1 GiB of tmpfs (nearly
    /// free: tmpfs has nothing to write back). The all-dirty row has one more peer: what any sync
    /// that tracks dirty pages must do (write-protect every page, one walk of the page table, then
    /// flush), `mprotect(PROT_READ)` and `pmem_persist` of the tmpfs mapping. One benchmark for
    /// the five rows, so that the three 1 GiB files are set up once.
    static var sync1GiB: Benchmark {
        let msync = "msync(MS_SYNC) of 1 GiB of tmpfs (C)"
        return Benchmark(
            name: "sync-1GiB-one-dirty", unit: "us", peerName: "pmem_persist of all 1 GiB (C)", goal: .atMost(0.05),
            variants: [
                .init(name: "sync-1GiB-one-dirty-msync", peerName: msync, goal: .report),
                .init(name: "sync-1GiB-all-dirty", peerName: "pmem_persist of all 1 GiB (C)", goal: .atMost(1.2)),
                .init(
                    name: "sync-1GiB-all-dirty-vs-protect", peerName: "mprotect(PROT_READ) + pmem_persist of 1 GiB (C)",
                    goal: .report),
                .init(name: "sync-1GiB-all-dirty-msync", peerName: msync, goal: .report),
            ]
        ) { context in
            try sync(context)
        }
    }

    // MARK: - Faults

    /// What one pass of a fault row measured.
    /// The fault rows, their sides interleaved: ours through a `.readWrite` mapping, the tmpfs
    /// peer, the bare userfaultfd peer, both again with every thread involved on one CPU, and (for
    /// loads) ours through a `.readOnly` mapping. Each pass maps fresh holes and touches each page
    /// once; only the stores or loads are timed. A pass of ours throws unless the file system
    /// counted exactly one fault of the expected kind per page.
    private static func faults(_ context: BenchContext, row: String, store: Bool) throws -> Samples {
        let pages = faultPages(context)
        let bytes = pages * pageSize
        let threadsBefore = threadIDs()
        let setup = try BenchFileSystem(context, name: row, size: gib)
        guard setup.fs.faultHandling == .userfaultfd else {
            throw BenchError("\(row) needs the fault handler; this file system has \(setup.fs.faultHandling)")
        }
        let file = try setup.fs.create("/sparse")
        let tmpfs = try TmpfsFile(context, name: "\(row)-tmpfs")
        defer { ftruncate(tmpfs.fd, 0) }

        func ours(_ access: Access, oneCPU: Bool = false) throws -> FaultPass {
            // Fresh holes: the blocks an earlier pass's stores allocated go back first.
            try file.truncate(to: 0)
            try file.truncate(to: bytes)
            let mapping = try file.map(count: bytes, access: access)
            defer { mapping.unmap() }
            let before = setup.fs.statistics()
            // The threads the file system started (its fault handler), and this one.
            let threads = threadIDs().subtracting(threadsBefore).union([0])
            guard threads.count > 1 else { throw BenchError("\(row): the file system started no thread") }
            let saved = oneCPU ? try pin(threads, to: 0) : Affinities()
            let switches = contextSwitches()
            let start = now()
            var sum: UInt64 = 0
            if store {
                cbench_store_each_page(mapping.baseAddress, pages, 1)
            } else {
                sum = cbench_load_each_page(mapping.baseAddress, pages)
            }
            let elapsed = Double(now() - start)
            let switched = Double(contextSwitches() - switches)
            try restore(saved)
            // Counted after the unmap: the handler may count a zero-page fault just after it woke
            // the thread, but it does so under the mapping's lock, which the unmap takes.
            mapping.unmap()
            let after = setup.fs.statistics()
            let allocated = after.faults.allocating - before.faults.allocating
            let zeroPages = after.faults.zeroPage - before.faults.zeroPage
            let blocksTaken = before.freeBlocks - after.freeBlocks
            let expected = store ? (pages, 0, pages) : (0, pages, 0)
            guard (allocated, zeroPages, blocksTaken) == expected, sum == 0 else {
                throw BenchError(
                    "\(row): \(pages) \(store ? "stores" : "loads") through a \(access) mapping of holes made "
                        + "\(allocated) allocating and \(zeroPages) zero-page faults and took \(blocksTaken) blocks "
                        + "(expected \(expected)); the loads summed to \(sum)")
            }
            return FaultPass(
                microsecondsPerFault: elapsed / Double(pages) / 1000,
                contextSwitchesPerFault: switched / Double(pages))
        }
        func peer(_ what: String, _ touch: () -> Int64) throws -> FaultPass {
            let switches = contextSwitches()
            let elapsed = touch()
            let switched = Double(contextSwitches() - switches)
            guard elapsed >= 0 else { throw BenchError("\(row): the \(what) failed: errno \(-elapsed)") }
            return FaultPass(
                microsecondsPerFault: Double(elapsed) / Double(pages) / 1000,
                contextSwitchesPerFault: switched / Double(pages))
        }

        let touch: Int32 = store ? 1 : 0
        // The bare peer waits for faults as ours does, with as many threads.
        let spin = setup.fs.faultHandlerSpin.nanosecondsForPeer
        let perCPU: Int32 = setup.fs.faultHandlerThreads > 1 ? 1 : 0
        print("\(row): \(setup.fs.faultHandlingDetail)")
        var sides: [(name: String, measure: () throws -> FaultPass)] = [
            ("ours (.readWrite mapping)", { try ours(.readWrite) }),
            ("tmpfs peer", { try peer("tmpfs peer") { cbench_tmpfs_first_touch(tmpfs.fd, pages, touch) } }),
            (
                "bare userfaultfd peer",
                { try peer("userfaultfd peer") { cbench_uffd_first_touch(pages, touch, -1, spin, perCPU) } }
            ),
            ("ours (.readWrite mapping), one CPU", { try ours(.readWrite, oneCPU: true) }),
            (
                "bare userfaultfd peer, one CPU",
                { try peer("userfaultfd peer") { cbench_uffd_first_touch(pages, touch, 0, spin, perCPU) } }
            ),
        ]
        if !store { sides.append(("ours (.readOnly mapping)", { try ours(.readOnly) })) }
        let samples = try context.interleaveFaultPasses(row: row, pages: pages, sides)
        if store {
            // The file system's share of an allocating fault: the same journaled allocation of one
            // zeroed block, asked for with `allocate` instead of a store.
            try file.truncate(to: 0)
            let start = now()
            for page in 0..<pages { try file.allocate(offset: page * pageSize, count: pageSize) }
            let perPage = Double(now() - start) / Double(pages) / 1000
            try file.truncate(to: 0)
            print("\(row): DAXFile.allocate of one page at a time \(format(perPage)) us per page (one pass)")
        }
        var result = Samples(ours: samples[0], peer: samples[1])
        result.variants = [Samples(ours: samples[0], peer: samples[2]), Samples(ours: samples[3], peer: samples[1])]
        if !store { result.variants.append(Samples(ours: samples[5], peer: samples[1])) }
        return result
    }

    /// The thread ids of this process (`/proc/self/task`).
    static func threadIDs() -> Set<Int32> {
        Set(((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []).compactMap { Int32($0) })
    }

    /// The CPU affinity of each of some threads, saved to be set again.
    struct Affinities {
        var masks: [Int32: [UInt64]] = [:]
    }

    /// Runs each thread of `threads` (0: the caller) on CPU `cpu` alone, and returns what each
    /// ran on before, for ``restore(_:)``: the file system's handler threads may be bound one to
    /// each CPU.
    static func pin(_ threads: Set<Int32>, to cpu: Int32) throws -> Affinities {
        var saved = Affinities()
        for thread in threads {
            var mask = [UInt64](repeating: 0, count: 16)
            let got = mask.withUnsafeMutableBufferPointer { cbench_save_affinity(thread, $0.baseAddress) }
            let result = got == 0 ? cbench_pin_thread(thread, cpu) : got
            guard result == 0 else {
                throw BenchError("cannot set the CPU affinity of thread \(thread): errno \(-result)")
            }
            saved.masks[thread] = mask
        }
        return saved
    }

    /// Sets the affinities ``pin(_:to:)`` saved again.
    static func restore(_ saved: Affinities) throws {
        for (thread, mask) in saved.masks {
            let result = mask.withUnsafeBufferPointer { cbench_restore_affinity(thread, $0.baseAddress) }
            guard result == 0 else {
                throw BenchError("cannot set the CPU affinity of thread \(thread) again: errno \(-result)")
            }
        }
    }

    /// Context switches of this process so far, voluntary and not (every thread's: a fault that the
    /// handler thread resolves costs at least a switch to it and one back).
    static func contextSwitches() -> Int {
        var usage = rusage()
        getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage)
        return usage.ru_nvcsw + usage.ru_nivcsw
    }

    // MARK: - sync

    /// A 1 GiB file on a device opened in one persistence mode, mapped `.readWrite` and synced
    /// once, so that every page is clean. The device file outlives it: the rows open it again in
    /// the other mode, which keeps one 1 GiB device in memory instead of two.
    private final class SyncedMapping {
        let device: PMemDevice
        let fs: DAXFileSystem
        let file: DAXFile
        let mapping: DAXMapping
        /// The threads the file system started (its fault handler).
        let faultThreads: Set<Int32>

        init(path: String, creating: Bool, persistence: PersistenceMode) throws {
            var options = PMemDevice.Options()
            options.persistence = persistence
            let threadsBefore = threadIDs()
            if creating {
                unlink(path)
                device = try PMemDevice.create(path: path, size: gib + gib / 16, options: options)
                fs = try DAXFileSystem.format(device)
                file = try fs.create("/synced")
                try file.allocate(offset: 0, count: gib)
            } else {
                device = try PMemDevice.open(path: path, options: options)
                fs = try DAXFileSystem.mount(device)
                file = try fs.open("/synced")
            }
            guard device.persistence == persistence else {
                throw BenchError("\(path) opened in \(device.persistence) mode, not \(persistence)")
            }
            mapping = try file.map(count: gib)
            try file.sync()
            faultThreads = threadIDs().subtracting(threadsBefore)
            guard fs.faultHandling != .userfaultfd || !faultThreads.isEmpty else {
                throw BenchError("\(path): the file system handles faults but started no thread")
            }
        }

        deinit {
            mapping.unmap()
            file.close()
            try? fs.unmount()
            device.close()
        }
    }

    /// The sync rows. Ours in `.cacheFlush` mode against `pmem_persist` of a whole 1 GiB tmpfs
    /// mapping, then (the device opened again) ours in `.msync` mode against `msync` of that
    /// mapping; in each mode the one-dirty sides interleaved, then the all-dirty sides. Only the
    /// sync is timed. The stores to every page are timed apart and printed: after a sync each is
    /// a write-protect fault, so they run with the fault handler on this thread's CPU (a wake-up
    /// of an idle vCPU costs ~85 us on the VMs measured here; 262,144 of them would take 20 s).
    /// For the same reason the all-dirty rows take 3 samples in quick mode.
    private static func sync(_ context: BenchContext) throws -> Samples {
        let pages = gib / pageSize
        let path = context.devicePath("sync")
        defer { unlink(path) }
        let tmpfs = try TmpfsFile(context, name: "sync-tmpfs")
        guard cbench_fallocate(tmpfs.fd, Int64(gib)) == 0,
            let peer = mmap(nil, gib, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, tmpfs.fd, 0),
            peer != MAP_FAILED
        else { throw BenchError("sync-1GiB: cannot map 1 GiB of tmpfs: errno \(errno)") }
        defer { munmap(peer, gib) }
        cbench_store_each_page(peer, pages, 1)
        var allDirtyContext = context
        if context.quick { allDirtyContext.repetitions = min(context.repetitions, 3) }

        // The page a one-page sample stores to, and the byte stored, change from sample to sample.
        var sample = 0
        var dirtying: [Double] = []
        func dirty(_ base: UnsafeMutableRawPointer, all: Bool, faultThreads: Set<Int32>? = nil) throws {
            sample += 1
            let value = UInt8(truncatingIfNeeded: sample)
            guard all else {
                base.storeBytes(of: value, toByteOffset: (sample &* 7919) % pages * pageSize + 64, as: UInt8.self)
                return
            }
            let saved = try faultThreads.map { try pin($0.union([0]), to: 0) }
            let start = now()
            cbench_store_each_page(base, pages, value)
            if let saved {
                dirtying.append(Double(now() - start) / Double(pages) / 1000)
                try restore(saved)
            }
        }
        func ours(_ side: SyncedMapping, all: Bool) throws -> Double {
            try dirty(side.mapping.baseAddress, all: all, faultThreads: side.faultThreads)
            let start = now()
            try side.file.sync()
            return Double(now() - start) / 1000
        }
        func persistPeer(all: Bool) throws -> Double {
            try dirty(peer, all: all)
            return Double(cbench_time_pmem_persist(peer, gib)) / 1000
        }
        /// What any sync that tracks dirty pages costs with every page dirty: protect, then flush.
        func protectPeer() throws -> Double {
            try dirty(peer, all: true)
            let elapsed = cbench_time_protect_and_persist(peer, gib)
            guard elapsed >= 0 else { throw BenchError("sync-1GiB: mprotect failed: errno \(-elapsed)") }
            return Double(elapsed) / 1000
        }
        func msyncPeer(all: Bool) throws -> Double {
            try dirty(peer, all: all)
            let elapsed = cbench_time_msync(peer, gib)
            guard elapsed >= 0 else { throw BenchError("sync-1GiB: msync failed: errno \(-elapsed)") }
            return Double(elapsed) / 1000
        }
        /// A sync with nothing dirty, the median of 5, microseconds: what any sync costs.
        func clean(_ side: SyncedMapping) throws -> Double {
            try median(
                (0..<5).map { _ in
                    let start = now()
                    try side.file.sync()
                    return Double(now() - start) / 1000
                })
        }

        var flushed: [[Double]] = []
        var cleanSyncs: [Double] = []
        do {
            let flushing = try SyncedMapping(path: path, creating: true, persistence: .cacheFlush)
            print("sync-1GiB: fault handling \(flushing.fs.faultHandling)")
            flushed = try context.interleave([{ try ours(flushing, all: false) }, { try persistPeer(all: false) }])
            flushed += try allDirtyContext.interleave([
                { try ours(flushing, all: true) }, { try persistPeer(all: true) }, { try protectPeer() },
            ])
            cleanSyncs.append(try clean(flushing))
        }
        let msyncing = try SyncedMapping(path: path, creating: false, persistence: .msync)
        var msynced = try context.interleave([{ try ours(msyncing, all: false) }, { try msyncPeer(all: false) }])
        msynced += try allDirtyContext.interleave([{ try ours(msyncing, all: true) }, { try msyncPeer(all: true) }])
        cleanSyncs.append(try clean(msyncing))
        print(
            "sync-1GiB: a store to each page of our synced mapping took \(format(median(dirtying))) us per page "
                + "(median of \(dirtying.count) passes, the fault handler on the storing thread's CPU; a "
                + "write-protect fault each when sync tracks dirty pages)")
        print(
            "sync-1GiB: a sync with no page dirty took \(format(cleanSyncs[0])) us in .cacheFlush mode, "
                + "\(format(cleanSyncs[1])) us in .msync mode (medians of 5)")
        return Samples(
            ours: flushed[0], peer: flushed[1],
            variants: [
                Samples(ours: msynced[0], peer: msynced[1]), Samples(ours: flushed[2], peer: flushed[3]),
                Samples(ours: flushed[2], peer: flushed[4]), Samples(ours: msynced[2], peer: msynced[3]),
            ])
    }
}

/// One pass of a side of a fault benchmark: what each fault cost.
struct FaultPass {
    var microsecondsPerFault: Double
    var contextSwitchesPerFault: Double
}

extension BenchContext {
    /// Interleaves the passes of fault-benchmark `sides` (each pass a sample of its microseconds per
    /// fault), then prints each side's medians under `row`, the warm-up pass left out. Returns the
    /// samples of each side, in order.
    func interleaveFaultPasses(
        row: String, pages: Int, _ sides: [(name: String, measure: () throws -> FaultPass)]
    ) throws -> [[Double]] {
        var passes = [[FaultPass]](repeating: [], count: sides.count)
        let samples = try interleave(
            sides.indices.map { side in
                {
                    passes[side].append(try sides[side].measure())
                    return passes[side].last!.microsecondsPerFault
                }
            })
        for (side, sidePasses) in zip(sides, passes) {
            let measured = sidePasses.dropFirst()
            print(
                "\(row): \(side.name) \(format(median(measured.map(\.microsecondsPerFault)))) us per fault, "
                    + "\(format(median(measured.map(\.contextSwitchesPerFault)))) context switches per fault "
                    + "(medians of \(measured.count) passes of \(pages) faults)")
        }
        return samples
    }
}

extension Duration {
    /// Whole nanoseconds, for a C peer's `long`.
    var nanosecondsForPeer: Int {
        let (seconds, attoseconds) = components
        return Int(seconds) * 1_000_000_000 + Int(attoseconds / 1_000_000_000)
    }
}
