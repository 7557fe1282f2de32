import CBenchPeers
import DAX
import Foundation

enum MediaBenchmarks {
    static var all: [Benchmark] { [persist64] }

    /// A 64-byte store + persist through `PMemDevice` vs the same with `pmem_persist` from C.
    static var persist64: Benchmark {
        Benchmark(
            name: "persist-64B", unit: "ns", peerName: "store + pmem_persist (C)", goal: .atMost(1.05)
        ) { context in
            let bench = try BenchDevice(context, name: "persist", size: 8 << 20, persistence: .cacheFlush)
            let device = bench.device
            let offset = 1 << 20
            let line = device.baseAddress + offset
            let iterations = context.quick ? 1_000_000 : 4_000_000
            return context.interleave(
                ours: {
                    nanosecondsPerIteration(iterations) {
                        for i in 0..<iterations {
                            for word in 0..<8 {
                                (line + word * 8).storeBytes(of: UInt64(i &+ word), as: UInt64.self)
                            }
                            device.persist(offset: offset, count: 64)
                        }
                    }
                },
                peer: {
                    nanosecondsPerIteration(iterations) { cbench_store_persist_loop(line, UInt64(iterations)) }
                })
        }
    }
}
