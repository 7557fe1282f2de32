import ArgumentParser
import CommandLineSupport
import DAX
import Foundation
import Synchronization

/// A storage server registers a buffer that lives in a DAX file with its RDMA NIC (a long-term
/// pin), and the NIC keeps writing into it. An administrator truncates the file. What happens,
/// step by step: the server is asked to let go; if it does not, its lease is revoked after the
/// grace period, the NIC is refused from then on, and no byte of the NIC's ever reaches a block that
/// another file now owns.
@main
struct RDMABuffer: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rdma-buffer",
        abstract: "An RDMA buffer on a DAX file, and what an administrator's truncate does to it.")

    @Option(help: "The device (default $DAXEMU_DEVICE, else /dev/shm/daxemu); it must hold a DAX file system.")
    var device: String?

    @Option(help: "Pages in the registered buffer.")
    var pages = 64

    @Option(help: "Milliseconds the server gets to let go before its lease is revoked.")
    var graceMilliseconds = 200

    @Flag(help: "The server lets go when asked (deregisters), instead of ignoring the request.")
    var cooperative = false

    static func main() { mainReportingErrors() }

    func validate() throws {
        try requireDeviceOption(device)
        guard (1...(1 << 22)).contains(pages) else { throw ValidationError("--pages is 1 to 4194304, not \(pages)") }
        guard (0...3_600_000).contains(graceMilliseconds) else {
            throw ValidationError("--grace-milliseconds is 0 to 3600000, not \(graceMilliseconds)")
        }
    }

    func run() throws {
        let path = device ?? PMemDevice.defaultPath
        let opened = try openCommandDevice(path)
        defer { opened.close() }
        let fs = try DAXFileSystem.mount(opened)
        defer { try? fs.unmount() }
        let bytes = pages * 4096
        let file = try fs.create("/rdma-buffer-\(getpid())")
        defer {
            file.close()
            try? fs.remove(file.path)
        }
        try file.write([UInt8](repeating: 0x53, count: bytes), at: 0)
        let frames = try file.frames(offset: 0, count: bytes).compactMap { $0 }
        let mapping = try file.map(count: bytes)

        // The server registers the buffer with its NIC: a long-term pin, a lease. When a truncate
        // asks it to let go, its onRevoke gets the lease's handle and, if it can, releases it.
        let nic = DMAEngine(device: opened)
        let lease = PinLifetime.longTerm(releasing: { [cooperative] lease in
            if cooperative {
                print("server: asked to let go; releasing the registration")
                lease.release()
            } else {
                print("server: asked to let go, but a transfer is in flight; holding on")
            }
        })
        let registration = nic.register(try mapping.pin(offset: 0, count: bytes, lifetime: lease))
        print("server: registered \(counted(pages, "page")) (frames \(frames.first!.rawValue)...) with the NIC")

        // The NIC writes messages into the buffer until it is cut off (revoked, or deregistered).
        let nicDone = DispatchSemaphore(value: 0)
        let stats = NICStats()
        Thread.detachNewThread {
            var sequence = 0
            while true {
                let message = Array("message \(sequence) from the NIC ".utf8)
                do {
                    try nic.write(message, to: registration, at: (sequence * 64) % (bytes - 64))
                    stats.delivered.wrappingAdd(1, ordering: .relaxed)
                } catch let error as DAXError {
                    stats.refusal.withLock { $0 = "\(error.code): \(error.message)" }
                    break
                } catch {
                    break
                }
                sequence += 1
                usleep(2_000)
            }
            nicDone.signal()
        }
        usleep(50_000)

        print("admin: truncating the file to 0 with .revokeLeases(grace: \(graceMilliseconds) ms)")
        let started = Date()
        try file.truncate(to: 0, ifBusy: .revokeLeases(grace: .milliseconds(graceMilliseconds)))
        let elapsed = Int(Date().timeIntervalSince(started) * 1000)
        print("admin: done after \(elapsed) ms; the file has \(counted(file.size, "byte"))")
        nicDone.wait()
        print(registration.isRevoked ? "server: lease revoked: true" : "server: had let go in time")
        nic.deregister(registration)  // after a revocation or a release, this changes no count
        print(
            "nic: \(stats.delivered.load(ordering: .relaxed)) messages delivered, then refused: "
                + (stats.refusal.withLock { $0 } ?? "?"))
        mapping.unmap()

        // Nothing was corrupted: the freed blocks go to another file, which reads only zeros.
        let other = try fs.create("/rdma-after-\(getpid())")
        defer {
            other.close()
            try? fs.remove(other.path)
        }
        // Every free block, in pieces: on fragmented free space the file's extent leaves take
        // some blocks too, so a request for all of them at once would not fit.
        var pieces = max(1, fs.statistics().freeBlocks)
        while pieces > 0 {
            do {
                try other.allocate(offset: other.size, count: pieces * 4096)
            } catch let error as DAXError where error.code == .noSpace {
                pieces /= 2
            }
        }
        let reused = Set(try other.frames(offset: 0, count: other.size).compactMap { $0 }).intersection(frames)
        // A buffer block not among the data went to the file's extent leaves: handed out all the same.
        let handedOut = frames.filter { fs.pages.state(of: $0).isAllocated }.count
        let clean = try other.read(count: other.size, at: 0).allSatisfy { $0 == 0 }
        let statistics = fs.statistics()
        print(
            "check: another file took \(reused.count) of the buffer's \(counted(frames.count, "block"))"
                + (handedOut > reused.count ? " (and \(handedOut - reused.count) for its extent tree)" : "")
                + " and reads " + (clean ? "only zeros" : "FOREIGN BYTES"))
        print(
            "check: pins \(statistics.pinsAcquired) acquired, \(statistics.pinsReleased) released; "
                + "file system \(try fs.check().isClean ? "clean" : "NOT CLEAN")")
        guard clean, handedOut == frames.count, statistics.pinsAcquired == statistics.pinsReleased else {
            throw ExitCode(1)
        }
    }
}

final class NICStats: Sendable {
    let delivered = Atomic(0)
    let refusal = Mutex<String?>(nil)
}
