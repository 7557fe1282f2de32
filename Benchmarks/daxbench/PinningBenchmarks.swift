import CBenchPeers
import DAX
import Foundation

/// Pinned pages held for a benchmark (a class, so closures can share it).
final class PinHolder {
    private var pins: [DMARegion] = []
    let engine: DMAEngine

    init(device: PMemDevice) { engine = DMAEngine(device: device) }

    func hold(_ pin: consuming PinnedPages) { pins.append(engine.register(pin)) }

    func releaseAll() {
        for region in pins { engine.deregister(region) }
        pins = []
    }
}

enum PinningBenchmarks {
    static var all: [Benchmark] { [pinUnpinMapping, truncatePinned, allocateWithQuarantine] }

    /// pin+unpin of one page through a `DAXMapping` (the gup-fast path) vs a bare atomic pair; the
    /// goal limits the work beyond the pair's two locked instructions.
    static var pinUnpinMapping: Benchmark {
        Benchmark(name: "pin-unpin", unit: "ns", peerName: "atomic inc+dec pair (C)", goal: .beyondPeerAtMost(6.0)) {
            context in
            let setup = try BenchFileSystem(context, name: "pinmap", size: 16 << 20)
            let file = try setup.fs.create("/pinned")
            try file.truncate(to: 64 << 10)
            let mapping = try file.map(count: 64 << 10)
            defer { mapping.unmap() }
            let counter = AlignedCounter()
            let iterations = context.quick ? 2_000_000 : 10_000_000
            let samples = try context.interleave(
                ours: {
                    try nanosecondsPerIteration(iterations) {
                        for _ in 0..<iterations {
                            let pin = try mapping.pin(offset: 8192, count: 4096)
                            pin.release()
                        }
                    }
                },
                peer: {
                    nanosecondsPerIteration(iterations) { cbench_atomic_pair_loop(counter.pointer, UInt64(iterations)) }
                })
            return reportBeyondPeer("pin-unpin", unit: "ns", samples)
        }
    }

    /// Truncate a mapped 1 GiB file to 0 with `.deferFree` while 1% of its pages (one in a
    /// hundred) are pinned, vs the same file with none pinned.
    static var truncatePinned: Benchmark {
        Benchmark(name: "truncate-1GiB-1pct-pinned", unit: "ms", peerName: "ours, nothing pinned", goal: .atMost(1.2)) {
            context in
            let bytes = 1 << 30
            let setup = try BenchFileSystem(context, name: "truncpin", size: bytes + bytes / 4)
            let file = try setup.fs.create("/f")
            let holder = PinHolder(device: setup.bench.device)
            func truncate(pinning: Bool) throws -> Double {
                try file.allocate(offset: 0, count: bytes)
                let mapping = try file.map(count: bytes)
                if pinning {
                    for page in stride(from: 0, to: bytes / 4096, by: 100) {
                        holder.hold(try mapping.pin(offset: page * 4096, count: 4096))
                    }
                }
                let start = now()
                try file.truncate(to: 0, ifBusy: .deferFree)
                let elapsed = Double(now() - start) / 1e6
                mapping.unmap()
                holder.releaseAll()
                return elapsed
            }
            return try context.interleave(ours: { try truncate(pinning: true) }, peer: { try truncate(pinning: false) })
        }
    }

    /// Allocate 100 MiB while every tenth free block is quarantined (pinned, then freed with
    /// `.deferFree`), so the allocator must skip them, vs the same device once the pins are gone
    /// (nothing quarantined, the free space contiguous). Both sides use the same device, so the
    /// same memory: two devices differ by more than the quarantine does. Cycles of: build the
    /// quarantine, time ours, release the pins, time the peer.
    static var allocateWithQuarantine: Benchmark {
        Benchmark(
            name: "allocate-with-quarantine", unit: "ms", peerName: "ours, nothing quarantined",
            goal: .atMost(1.2)
        ) { context in
            let setup = try BenchFileSystem(context, name: "quarantine", size: 512 << 20)
            let fs = setup.fs
            let target = try fs.create("/target")
            func allocate() throws -> Double {
                let start = now()
                try target.allocate(offset: 0, count: 100 << 20)
                let elapsed = Double(now() - start) / 1e6
                try target.truncate(to: 0)
                return elapsed
            }
            var samples = Samples()
            for _ in 0..<(context.quick ? 3 : 5) {
                let holder = try quarantineEveryTenthBlock(fs, device: setup.bench.device)
                _ = try allocate()
                for _ in 0..<5 { samples.ours.append(try allocate()) }
                holder.releaseAll()
                guard fs.statistics().quarantinedBlocks == 0 else { throw BenchError("quarantine did not end") }
                _ = try allocate()
                for _ in 0..<5 { samples.peer.append(try allocate()) }
            }
            return samples
        }
    }

    /// Makes every tenth free block quarantined: interleaves /q with a spacer page by page, frees
    /// the spacer, pins all of /q and truncates it with .deferFree. Returns the holder of the pins.
    static func quarantineEveryTenthBlock(_ fs: DAXFileSystem, device: PMemDevice) throws -> PinHolder {
        let q = try fs.create("/q")
        let spacer = try fs.create("/spacer")
        let blocks = fs.statistics().freeBlocks - 2048  // room for both files' extent leaves
        let page = [UInt8](repeating: 1, count: 4096)
        for index in 0..<blocks {
            if index % 10 == 0 {
                try q.write(page, at: index / 10 * 4096)
            } else {
                try spacer.write(page, at: (index - index / 10 - 1) * 4096)
            }
        }
        spacer.close()
        try fs.remove("/spacer")
        let holder = PinHolder(device: device)
        let mapping = try q.map(count: q.size)
        holder.hold(try mapping.pin(offset: 0, count: q.size))
        mapping.unmap()
        try q.truncate(to: 0, ifBusy: .deferFree)
        q.close()
        try fs.remove("/q")
        let held = fs.statistics().quarantinedBlocks
        guard held * 10 >= (held + fs.statistics().freeBlocks) * 9 / 10 else {
            throw BenchError("quarantine not set up: \(held) blocks")
        }
        return holder
    }
}
