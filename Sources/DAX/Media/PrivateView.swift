import Glibc

/// Memory that journal records can be applied to: the device itself, or a private view of it.
protocol RecordMedium {
    var base: UnsafeMutableRawPointer { get }
    func copy(_ source: UnsafeRawBufferPointer, at offset: Int, flags: CopyFlags)
    func flush(at offset: Int, count: Int)
    func drain()
}

extension PMemDevice: RecordMedium {}

/// A copy-on-write view of a whole device (`mmap` with `MAP_PRIVATE`): reads see the device,
/// stores go to private pages and never reach it. Offline fsck replays a committed journal
/// transaction into one, to check the structures the next mount will see without changing any.
final class PrivateView: RecordMedium {
    let base: UnsafeMutableRawPointer
    let size: Int
    private let calls: SystemCalls

    /// Throws when the device cannot be mapped privately (a device-DAX character device cannot).
    init(of device: PMemDevice) throws {
        calls = device.systemCalls
        guard
            let address = calls.mmap(
                nil, device.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, device.fd, 0)
        else {
            throw DAXError.system("mmap", "a private view of \(device.path)", errno: errno)
        }
        base = address
        size = device.size
    }

    deinit { _ = calls.munmap(base, size) }

    func copy(_ source: UnsafeRawBufferPointer, at offset: Int, flags: CopyFlags) {
        guard let from = source.baseAddress else { return }
        (base + offset).copyMemory(from: from, byteCount: source.count)
    }

    /// Nothing to make durable: the view is thrown away.
    func flush(at offset: Int, count: Int) {}
    func drain() {}
}
