import DAX
import Foundation

enum CrashBenchmarks {
    static var all: [Benchmark] { [imagesPerSecond, crashPointScaling, persist64Emulated] }

    /// A small transaction on a device: a 64-byte record persisted, then the count that
    /// publishes it, persisted (two fences, each a crash point with one line in flight).
    static func transaction(_ index: Int, on device: PMemDevice) {
        let offset = 4096 + (index % 8192) * 64
        for word in 0..<8 {
            device.baseAddress.storeBytes(
                of: UInt64(index &* 8 &+ word), toByteOffset: offset + word * 8, as: UInt64.self)
        }
        device.persist(offset: offset, count: 64)
        device.baseAddress.storeBytes(of: UInt64(index + 1), toByteOffset: 0, as: UInt64.self)
        device.persist(offset: 0, count: 8)
    }

    /// Crash images checked per second, a trivial checker, 1,000 small transactions on a 64 MiB
    /// device, against PMAT's best published rate (about 1,000 images per second).
    static var imagesPerSecond: Benchmark {
        Benchmark(
            name: "crash-images-per-second", unit: "images/s", peerName: "PMAT's best reported (constant)",
            goal: .atLeast(10)
        ) { context in
            var explorer = CrashExplorer(deviceSize: 64 << 20)
            explorer.directory = context.directory
            var samples = Samples()
            for _ in 0..<(context.quick ? 3 : context.repetitions) {
                let report = try explorer.explore(
                    workload: { device in for index in 0..<1000 { transaction(index, on: device) } },
                    check: { _ in })
                guard report.failures.isEmpty, report.imagesChecked >= 10_000 else {
                    throw BenchError("unexpected report \(report.crashPoints) points, \(report.imagesChecked) images")
                }
                samples.ours.append(report.imagesPerSecond)
                samples.peer.append(1_000)
            }
            return samples
        }
    }

    /// Nanoseconds per crash point (one dirty line, its images, a trivial checker) on a 1 GiB
    /// device against the same on a 64 MiB device: the cost must not grow with the device.
    static var crashPointScaling: Benchmark {
        Benchmark(
            name: "crash-point-1GiB-vs-64MiB", unit: "ns", peerName: "the same on 64 MiB", goal: .atMost(1.5)
        ) { context in
            let points = context.quick ? 500 : 2000
            func measure(_ size: Int) throws -> Double {
                var explorer = CrashExplorer(deviceSize: size, imagesPerPoint: 2)
                explorer.directory = context.directory
                var elapsed = 0.0
                var fences = 0
                _ = try explorer.explore(
                    workload: { device in
                        let start = now()
                        for index in 0..<points {
                            device.baseAddress.storeBytes(
                                of: UInt64(index), toByteOffset: (size / 2) + (index % 64) * 64, as: UInt64.self)
                            device.persist(offset: (size / 2) + (index % 64) * 64, count: 8)
                        }
                        elapsed = Double(now() - start)
                        fences = points
                    }, check: { _ in })
                return elapsed / Double(fences)
            }
            return try context.interleave(ours: { try measure(1 << 30) }, peer: { try measure(64 << 20) })
        }
    }

    /// persist-64B with power-failure emulation on against the same device with it off.
    static var persist64Emulated: Benchmark {
        Benchmark(
            name: "persist-64B-emulated", unit: "ns", peerName: "persist-64B, emulation off", goal: .atMost(3.0)
        ) { context in
            let plain = try BenchDevice(context, name: "persist-off", size: 8 << 20, persistence: .cacheFlush)
            let emulated = try BenchDevice(
                context, name: "persist-on", size: 8 << 20, persistence: .cacheFlush, emulation: .adr)
            let iterations = context.quick ? 1_000_000 : 4_000_000
            func loop(_ device: PMemDevice) -> Double {
                let offset = 1 << 20
                let line = device.baseAddress + offset
                return nanosecondsPerIteration(iterations) {
                    for i in 0..<iterations {
                        for word in 0..<8 { (line + word * 8).storeBytes(of: UInt64(i &+ word), as: UInt64.self) }
                        device.persist(offset: offset, count: 64)
                    }
                }
            }
            return context.interleave(ours: { loop(emulated.device) }, peer: { loop(plain.device) })
        }
    }
}
