import CBenchPeers
import DAX
import Foundation

/// A formatted file system for one benchmark, in cache-flush mode (what `PMEM_IS_PMEM_FORCE=1`
/// gives fio), removed afterwards.
final class BenchFileSystem {
    let bench: BenchDevice
    let fs: DAXFileSystem

    init(_ context: BenchContext, name: String, size: Int) throws {
        bench = try BenchDevice(context, name: name, size: size)
        fs = try DAXFileSystem.format(bench.device)
    }

    deinit { try? fs.unmount() }
}

/// A plain file on /dev/shm for the tmpfs peers.
final class TmpfsFile {
    let path: String
    let fd: Int32

    init(_ context: BenchContext, name: String) throws {
        path = context.devicePath(name)
        unlink(path)
        fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw BenchError("cannot create \(path): errno \(errno)") }
    }

    deinit {
        close(fd)
        unlink(path)
    }
}

enum FileSystemBenchmarks {
    static let gib = 1 << 30
    static let mib = 1 << 20

    static var all: [Benchmark] {
        [
            writeBandwidth, readBandwidth, writeBandwidthWarm, readBandwidthWarm, mappedStoreBandwidth, truncate1GiB,
            allocate1GiB, createRemove,
        ]
    }

    static func fileBytes(_ context: BenchContext) -> Int { context.quick ? 256 * mib : gib }

    /// Sequential `DAXFile.write` of 1 MiB requests over an allocated file, GB/s, vs fio's libpmem
    /// engine (direct=1 sync=1: non-temporal pmem_memcpy and a drain per request) on a tmpfs file.
    static var writeBandwidth: Benchmark {
        Benchmark(name: "write-bandwidth", unit: "GB/s", peerName: "fio libpmem engine write", goal: .atLeast(0.9)) {
            context in
            try bandwidth(context, write: true)
        }
    }

    static var readBandwidth: Benchmark {
        Benchmark(name: "read-bandwidth", unit: "GB/s", peerName: "fio libpmem engine read", goal: .atLeast(0.9)) {
            context in
            try bandwidth(context, write: false)
        }
    }

    /// The same `DAXFile` loop against fio's calls made from C on a warm libpmem mapping: fio
    /// re-maps its file for every loop, so on tmpfs each of its passes pays a page fault per 4 KiB.
    static var writeBandwidthWarm: Benchmark {
        Benchmark(
            name: "write-bandwidth-warm", unit: "GB/s", peerName: "fio's pmem_memcpy calls from C, warm",
            goal: .atLeast(0.9), minimumRepetitions: 15
        ) { context in
            try bandwidth(context, write: true, warmPeer: true)
        }
    }

    static var readBandwidthWarm: Benchmark {
        Benchmark(
            name: "read-bandwidth-warm", unit: "GB/s", peerName: "fio's memcpy calls from C, warm",
            goal: .atLeast(0.9), minimumRepetitions: 15
        ) { context in
            try bandwidth(context, write: false, warmPeer: true)
        }
    }

    /// Sequential `DAXFile.write` or `read(into:)` of `request`-byte requests over an allocated
    /// file, GB/s, against fio, or against fio's own calls from C on a warm mapping.
    static func bandwidth(
        _ context: BenchContext, write: Bool, request: Int = 1 << 20, warmPeer: Bool = false,
        bytes: Int? = nil
    ) throws -> Samples {
        let bytes = bytes ?? fileBytes(context)
        let setup = try BenchFileSystem(context, name: "bw", size: bytes + bytes / 4)
        let file = try setup.fs.create("/data")
        try file.allocate(offset: 0, count: bytes)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: request, alignment: 4096)
        defer { buffer.deallocate() }
        for i in 0..<request { buffer[i] = UInt8(truncatingIfNeeded: i &* 7) }
        let ours = {
            let start = now()
            if write {
                for offset in stride(from: 0, to: bytes, by: request) {
                    try file.write(UnsafeRawBufferPointer(buffer), at: offset)
                }
            } else {
                for offset in stride(from: 0, to: bytes, by: request) { _ = try file.read(into: buffer, at: offset) }
            }
            return Double(bytes) / Double(now() - start)
        }
        if warmPeer {
            let peer = try BenchDevice(context, name: "bw-peer", size: bytes)
            let target = peer.device.baseAddress
            return try context.interleave(
                ours: ours,
                peer: {
                    let start = now()
                    if write {
                        cbench_pmem_write_loop(target, buffer.baseAddress, bytes, request)
                    } else {
                        cbench_read_loop(buffer.baseAddress, target, bytes, request)
                    }
                    return Double(bytes) / Double(now() - start)
                })
        }
        let fio = try FioPeer(context, bytes: bytes)
        return try context.interleave(ours: ours, peer: { try fio.run(write: write, request: request) })
    }

    /// Stores (memcpy) through a `DAXMapping` vs memcpy into a plain mmap of a /dev/shm file.
    static var mappedStoreBandwidth: Benchmark {
        Benchmark(
            name: "mapped-store-bandwidth", unit: "GB/s", peerName: "memcpy into mmap of a tmpfs file",
            goal: .atLeast(0.95)
        ) { context in
            let bytes = context.quick ? 256 * mib : gib
            let setup = try BenchFileSystem(context, name: "map", size: bytes + bytes / 4)
            let file = try setup.fs.create("/mapped")
            try file.truncate(to: bytes)
            let mapping = try file.map(count: bytes)
            defer { mapping.unmap() }
            let plain = try TmpfsFile(context, name: "plain-mmap")
            ftruncate(plain.fd, off_t(bytes))
            guard let peer = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, plain.fd, 0),
                peer != MAP_FAILED
            else { throw BenchError("mmap of the tmpfs file failed") }
            defer { munmap(peer, bytes) }
            let source = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
            defer { source.deallocate() }
            memset(source, 0x3C, bytes)
            return context.interleave(
                ours: {
                    let start = now()
                    cbench_memcpy_chunks(mapping.baseAddress, source, bytes, 1 << 20)
                    return Double(bytes) / Double(now() - start)
                },
                peer: {
                    let start = now()
                    cbench_memcpy_chunks(peer, source, bytes, 1 << 20)
                    return Double(bytes) / Double(now() - start)
                })
        }
    }

    /// Truncate a populated 1 GiB file to 0, ms, vs tmpfs ftruncate of a populated 1 GiB file.
    static var truncate1GiB: Benchmark {
        Benchmark(name: "truncate-1GiB", unit: "ms", peerName: "tmpfs ftruncate", goal: .atMost(0.5)) { context in
            let bytes = gib
            let setup = try BenchFileSystem(context, name: "trunc", size: bytes + bytes / 4)
            let file = try setup.fs.create("/populated")
            let chunk = [UInt8](repeating: 0x77, count: 1 << 20)
            let tmpfs = try TmpfsFile(context, name: "trunc-tmpfs")
            return try context.interleave(
                ours: {
                    for offset in stride(from: 0, to: bytes, by: chunk.count) { try file.write(chunk, at: offset) }
                    let start = now()
                    try file.truncate(to: 0)
                    return Double(now() - start) / 1e6
                },
                peer: {
                    chunk.withUnsafeBytes { raw in
                        for offset in stride(from: 0, to: bytes, by: raw.count) {
                            _ = pwrite(tmpfs.fd, raw.baseAddress, raw.count, off_t(offset))
                        }
                    }
                    let start = now()
                    ftruncate(tmpfs.fd, 0)
                    return Double(now() - start) / 1e6
                })
        }
    }

    /// allocate 1 GiB (zeroed blocks), ms, vs tmpfs fallocate of 1 GiB.
    static var allocate1GiB: Benchmark {
        Benchmark(name: "allocate-1GiB", unit: "ms", peerName: "tmpfs fallocate", goal: .atMost(1.0)) { context in
            let bytes = gib
            let setup = try BenchFileSystem(context, name: "alloc", size: bytes + bytes / 4)
            let file = try setup.fs.create("/allocated")
            let tmpfs = try TmpfsFile(context, name: "alloc-tmpfs")
            return try context.interleave(
                ours: {
                    let start = now()
                    try file.allocate(offset: 0, count: bytes)
                    let elapsed = Double(now() - start) / 1e6
                    try file.truncate(to: 0)
                    return elapsed
                },
                peer: {
                    let start = now()
                    guard cbench_fallocate(tmpfs.fd, Int64(bytes)) == 0 else {
                        throw BenchError("fallocate: errno \(errno)")
                    }
                    let elapsed = Double(now() - start) / 1e6
                    ftruncate(tmpfs.fd, 0)
                    return elapsed
                })
        }
    }

    /// Create (with 1 KiB of data) and remove 10,000 files, ms, vs the same on tmpfs.
    static var createRemove: Benchmark {
        Benchmark(name: "create-remove-10k", unit: "ms", peerName: "tmpfs open+write+close, unlink", goal: .report) {
            context in
            let count = 10_000
            let setup = try BenchFileSystem(context, name: "files", size: 256 << 20)
            let data = [UInt8](repeating: 0x11, count: 1024)
            let directory = context.devicePath("files-tmpfs")
            try? FileManager.default.removeItem(atPath: directory)
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: false)
            defer { try? FileManager.default.removeItem(atPath: directory) }
            return try context.interleave(
                ours: {
                    let start = now()
                    for index in 0..<count {
                        let file = try setup.fs.create("/f\(index)")
                        try file.write(data, at: 0)
                        file.close()
                    }
                    for index in 0..<count { try setup.fs.remove("/f\(index)") }
                    return Double(now() - start) / 1e6
                },
                peer: {
                    let start = now()
                    data.withUnsafeBytes { raw in
                        for index in 0..<count {
                            let fd = open("\(directory)/f\(index)", O_RDWR | O_CREAT | O_EXCL, 0o600)
                            _ = write(fd, raw.baseAddress, raw.count)
                            close(fd)
                        }
                    }
                    for index in 0..<count { unlink("\(directory)/f\(index)") }
                    return Double(now() - start) / 1e6
                })
        }
    }
}

/// fio with the libpmem engine on a /dev/shm file, `PMEM_IS_PMEM_FORCE=1` (fio refuses non-pmem).
final class FioPeer {
    let path: String
    let bytes: Int
    let executable: String

    init(_ context: BenchContext, bytes: Int) throws {
        guard let fio = ["/usr/bin/fio", "/usr/local/bin/fio"].first(where: FileManager.default.isExecutableFile) else {
            throw BenchError("fio is not installed (scripts/bench installs it with apt)")
        }
        executable = fio
        self.bytes = bytes
        path = context.devicePath("fio")
        unlink(path)
        // Lay the file out once, so that every run overwrites existing pages, as ours does.
        let fd = open(path, O_RDWR | O_CREAT, 0o600)
        guard fd >= 0, posix_fallocate(fd, 0, off_t(bytes)) == 0 else { throw BenchError("cannot lay out \(path)") }
        close(fd)
    }

    deinit { unlink(path) }

    /// One pass over the file; returns GB/s as fio reports it. Two loops: the first warms fio's
    /// fresh mapping (page faults), as our first (warm-up) repetition does for us.
    func run(write: Bool, request: Int) throws -> Double {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = [
            "--name=peer", "--ioengine=libpmem", "--filename=\(path)", "--size=\(bytes)", "--bs=\(request)",
            "--rw=\(write ? "write" : "read")", "--direct=1", "--sync=1", "--iodepth=1", "--loops=2",
            "--overwrite=1", "--output-format=json",
        ]
        var environment = ProcessInfo.processInfo.environment
        environment["PMEM_IS_PMEM_FORCE"] = "1"
        process.environment = environment
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0,
            let json = try JSONSerialization.jsonObject(with: data) as? [String: Any],
            let job = (json["jobs"] as? [[String: Any]])?.first,
            let side = job[write ? "write" : "read"] as? [String: Any],
            let bandwidth = side["bw_bytes"] as? Double ?? (side["bw_bytes"] as? Int).map(Double.init)
        else { throw BenchError("fio failed (status \(process.terminationStatus))") }
        return bandwidth / 1e9
    }
}
