import Foundation
import Synchronization
import Testing

@testable import DAX

/// A device file of its own under `/dev/shm`, removed when the value goes.
final class TemporaryDevice: @unchecked Sendable {
    let path: String
    let device: PMemDevice

    static func uniquePath(_ name: String = "dev") -> String {
        "/dev/shm/daxtest-\(getpid())-\(name)-\(UUID().uuidString.prefix(8))"
    }

    init(size: Int = 8 << 20, options: PMemDevice.Options = .init(), name: String = "dev") throws {
        path = Self.uniquePath(name)
        device = try PMemDevice.create(path: path, size: size, options: options)
    }

    deinit {
        device.close()
        unlink(path)
    }
}

/// Runs `body` on `count` real threads at once and waits for all of them.
func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let group = DispatchGroup()
    for index in 0..<count {
        group.enter()
        Thread.detachNewThread {
            body(index)
            group.leave()
        }
    }
    group.wait()
}

/// Asserts that `body` throws a `DAXError` with `code`, and returns it.
@discardableResult
func expectDAXError<T>(
    _ code: DAXError.Code, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> T
) -> DAXError? {
    do {
        _ = try body()
        Issue.record("expected DAXError \(code), but nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as DAXError {
        #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
        return error
    } catch {
        Issue.record("expected DAXError \(code), got \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

/// Counts the persistence calls a device makes through the seam.
final class CallCounter: Sendable {
    let persists = Atomic(0)
    let flushes = Atomic(0)
    let drains = Atomic(0)
    let msyncs = Atomic(0)
    let copies = Atomic(0)
    let copyFlags = Mutex<[UInt32]>([])
    /// `errno` that msync fails with, or 0.
    let msyncFailure = Atomic<Int32>(0)

    var systemCalls: SystemCalls {
        var calls = SystemCalls.injectable
        calls.persist = { address, length in
            self.persists.wrappingAdd(1, ordering: .relaxed)
            SystemCalls.live.persist(address, length)
        }
        calls.flush = { address, length in
            self.flushes.wrappingAdd(1, ordering: .relaxed)
            SystemCalls.live.flush(address, length)
        }
        calls.drain = {
            self.drains.wrappingAdd(1, ordering: .relaxed)
            SystemCalls.live.drain()
        }
        calls.msync = { address, length in
            self.msyncs.wrappingAdd(1, ordering: .relaxed)
            let failure = self.msyncFailure.load(ordering: .relaxed)
            if failure != 0 {
                errno = failure
                return -1
            }
            return SystemCalls.live.msync(address, length)
        }
        calls.memcpy = { to, from, length, flags in
            self.copies.wrappingAdd(1, ordering: .relaxed)
            self.copyFlags.withLock { $0.append(flags) }
            SystemCalls.live.memcpy(to, from, length, flags)
        }
        return calls
    }
}

/// Holds a pin so that another thread can release it.
final class PinBox: Sendable {
    private let pin: Mutex<PinnedPages?>

    init(_ pin: consuming PinnedPages) { self.pin = Mutex(Optional(pin)) }

    func release() {
        let taken = pin.withLock { $0.take() }
        taken?.release()
    }
}
