import CBenchPeers
import DAX
import Foundation

/// A cache-line-aligned counter for the atomic baseline.
final class AlignedCounter {
    let pointer: UnsafeMutablePointer<UInt64>

    init() {
        pointer = UnsafeMutableRawPointer.allocate(byteCount: 128, alignment: 64).bindMemory(
            to: UInt64.self, capacity: 16)
        pointer.initialize(repeating: 0, count: 16)
    }

    deinit { pointer.deallocate() }
}

/// A device for one benchmark, removed afterwards.
final class BenchDevice {
    let device: PMemDevice
    let path: String

    init(
        _ context: BenchContext, name: String, size: Int, persistence: PersistenceMode = .cacheFlush,
        emulation: PersistenceDomain? = nil
    ) throws {
        path = context.devicePath(name)
        unlink(path)
        var options = PMemDevice.Options()
        options.persistence = persistence
        options.powerFailureEmulation = emulation
        device = try PMemDevice.create(path: path, size: size, options: options)
    }

    deinit {
        device.close()
        unlink(path)
    }
}

/// Prints the work beyond the peer of a row timed against the atomic pair, pair by pair (each
/// `ours` sample and the `peer` sample taken right after it): ours minus peer in the row's unit and
/// the ratio, minimum and median. The difference is what the row's goal limits: the peer's two
/// locked instructions cost what the machine makes them cost, the rest is ours.
func reportBeyondPeer(_ name: String, unit: String, _ samples: Samples) -> Samples {
    let differences = zip(samples.ours, samples.peer).map { $0 - $1 }
    let ratios = zip(samples.ours, samples.peer).map { $0 / $1 }
    print(
        "\(name): ours minus peer \(format(differences.min() ?? .nan)) min, \(format(median(differences))) median "
            + "\(unit); ratio \(format(ratios.min() ?? .nan)) min, \(format(median(ratios))) median "
            + "(\(differences.count) pairs)")
    return samples
}

enum PagesBenchmarks {
    static var all: [Benchmark] { [pinUnpinPageMap, pin256, descriptorBytes] }

    /// pin+unpin of one page on the page map vs a bare atomic increment+decrement pair.
    static var pinUnpinPageMap: Benchmark {
        Benchmark(
            name: "pin-unpin-pagemap", unit: "ns", peerName: "atomic inc+dec pair (C)", goal: .beyondPeerAtMost(3.0)
        ) { context in
            let bench = try BenchDevice(context, name: "pin", size: 8 << 20)
            let pages = bench.device.pages
            let frame = PageFrameNumber(rawValue: 100)
            guard pages.markAllocated(frame.rawValue, inode: 1, index: 0) else { throw BenchError("page busy") }
            let counter = AlignedCounter()
            let iterations = context.quick ? 2_000_000 : 10_000_000
            let samples = try context.interleave(
                ours: {
                    try nanosecondsPerIteration(iterations) {
                        for _ in 0..<iterations {
                            let pin = try pages.pin(first: frame, count: 1)
                            pin.release()
                        }
                    }
                },
                peer: {
                    nanosecondsPerIteration(iterations) { cbench_atomic_pair_loop(counter.pointer, UInt64(iterations)) }
                })
            return reportBeyondPeer("pin-unpin-pagemap", unit: "ns", samples)
        }
    }

    /// pin of 256 contiguous pages + unpin, per page, vs one atomic pair per page.
    static var pin256: Benchmark {
        Benchmark(
            name: "pin-256-pages", unit: "ns/page", peerName: "atomic inc+dec pair (C)", goal: .report
        ) { context in
            let bench = try BenchDevice(context, name: "pin256", size: 8 << 20)
            let pages = bench.device.pages
            for frame in 256..<512 { _ = pages.markAllocated(UInt64(frame), inode: 1, index: UInt64(frame)) }
            let counter = AlignedCounter()
            let iterations = context.quick ? 20_000 : 100_000
            return try context.interleave(
                ours: {
                    try nanosecondsPerIteration(iterations * 256) {
                        for _ in 0..<iterations {
                            let pin = try pages.pin(first: PageFrameNumber(rawValue: 256), count: 256)
                            pin.release()
                        }
                    }
                },
                peer: {
                    nanosecondsPerIteration(iterations * 256) {
                        cbench_atomic_pair_loop(counter.pointer, UInt64(iterations * 256))
                    }
                })
        }
    }

    /// Bytes per descriptor, measured as resident memory after touching 2^18 descriptors, vs 64.
    static var descriptorBytes: Benchmark {
        Benchmark(
            name: "descriptor-bytes", unit: "bytes", peerName: "Linux struct page", goal: .atMost(0.25)
        ) { context in
            let touched = 1 << 18
            let pages = try PageMap(pageCount: 1 << 28)  // a 1 TiB device's table
            for frame in 0..<UInt64(touched) { _ = pages.markAllocated(frame, inode: 1, index: frame) }
            let measured = Double(pages.residentTableBytes) / Double(touched)
            return Samples(ours: [measured], peer: [64])
        }
    }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
