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

/// Asserts that `body` throws a `DAXError` with `code`, and returns it. `what` (the call, the
/// case) goes in front of the message of a failure.
@discardableResult
func expectDAXError<T>(
    _ code: DAXError.Code, _ what: String = "", sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws -> T
) -> DAXError? {
    let prefix = what.isEmpty ? "" : "\(what): "
    do {
        _ = try body()
        Issue.record("\(prefix)expected DAXError \(code), but nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as DAXError {
        #expect(error.code == code, "\(prefix)\(error)", sourceLocation: sourceLocation)
        return error
    } catch {
        Issue.record("\(prefix)expected DAXError \(code), got \(error)", sourceLocation: sourceLocation)
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
    let memsets = Atomic(0)
    let copyFlags = Mutex<[UInt32]>([])
    /// `errno` that msync fails with, or 0.
    let msyncFailure = Atomic<Int32>(0)

    /// A new device in `persistence` mode whose calls this counter counts.
    func temporaryDevice(persistence: PersistenceMode) throws -> TemporaryDevice {
        var options = PMemDevice.Options()
        options.persistence = persistence
        options.systemCalls = systemCalls
        return try TemporaryDevice(options: options)
    }

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
            self.copyFlags.withTrackedLock { $0.append(flags) }
            SystemCalls.live.memcpy(to, from, length, flags)
        }
        calls.memset = { to, value, length, flags in
            self.memsets.wrappingAdd(1, ordering: .relaxed)
            SystemCalls.live.memset(to, value, length, flags)
        }
        return calls
    }
}

/// Holds a pin so that another thread can release it.
final class PinBox: Sendable {
    private let pin: Mutex<PinnedPages?>

    init(_ pin: consuming PinnedPages) { self.pin = Mutex(Optional(pin)) }

    /// Empty, for a pin whose callback must capture the box before the pin exists.
    init() { pin = Mutex(nil) }

    func set(_ pin: consuming PinnedPages) {
        var incoming = Optional(pin)
        self.pin.withTrackedLock { $0 = incoming.take() }
    }

    func release() {
        let taken = pin.withTrackedLock { $0.take() }
        taken?.release()
    }
}

/// A formatted file system on its own device, unmounted and removed when the value goes.
final class TemporaryFileSystem: @unchecked Sendable {
    let temporary: TemporaryDevice
    let fs: DAXFileSystem
    var device: PMemDevice { temporary.device }

    init(
        size: Int = 16 << 20, options: DAXFileSystem.FormatOptions = .init(), name: String = "fs",
        deviceOptions: PMemDevice.Options = .init()
    ) throws {
        temporary = try TemporaryDevice(size: size, options: deviceOptions, name: name)
        fs = try DAXFileSystem.format(temporary.device, options: options)
    }

    /// Unmounts and mounts again, as after a reboot of the process.
    func remount() throws -> DAXFileSystem {
        try fs.unmount()
        return try DAXFileSystem.mount(temporary.device)
    }

    deinit { try? fs.unmount() }
}

/// A deterministic byte pattern.
func pattern(_ count: Int, seed: Int = 1) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: ($0 &* 131) &+ ($0 >> 8) &+ seed &* 17) }
}

/// A helper process built next to the test binary (by this package), reading its output by line.
final class ChildProcess: @unchecked Sendable {
    let process = Process()
    private let output = Pipe()
    private var buffer = Data()
    private(set) var lines: [String] = []

    static func executable(_ name: String) -> String {
        let me =
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: me).deletingLastPathComponent().appendingPathComponent(name).path
    }

    init(_ name: String, _ arguments: [String]) throws {
        process.executableURL = URL(fileURLWithPath: Self.executable(name))
        process.arguments = arguments
        process.standardOutput = output
        process.standardError = FileHandle.standardError
        try process.run()
    }

    /// Reads until a line starting with `prefix` arrives (nil at end of output).
    func waitForLine(startingWith prefix: String) -> String? {
        while true {
            if let line = lines.first(where: { $0.hasPrefix(prefix) }) { return line }
            guard readMore() else { return nil }
        }
    }

    /// Reads what is there; false at end of output.
    @discardableResult
    private func readMore() -> Bool {
        let data = output.fileHandleForReading.availableData
        guard !data.isEmpty else { return false }
        buffer.append(data)
        while let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
            lines.append(String(decoding: buffer[buffer.startIndex..<newline], as: UTF8.self))
            buffer.removeSubrange(buffer.startIndex...newline)
        }
        return true
    }

    /// Waits for the process to end by itself and collects every line it wrote; returns the signal
    /// that ended it, or nil if it exited.
    func waitForEnd() -> Int32? {
        while readMore() {}
        process.waitUntilExit()
        return process.terminationReason == .uncaughtSignal ? process.terminationStatus : nil
    }

    /// SIGKILL, then collect every line it wrote.
    func kill() {
        Glibc.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        while readMore() {}
    }
}

/// A count shared with callbacks.
final class Counter: Sendable {
    private let count = Atomic(0)
    func increment() { count.wrappingAdd(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}

extension PMemDevice.Options {
    /// Options whose system calls refuse userfaultfd (`/dev/userfaultfd` and the system call), so
    /// that a file system mounted on the device has no fault handler: how a process without the
    /// privilege sees mappings.
    static var withoutUserfaultfd: PMemDevice.Options {
        var calls = SystemCalls.injectable
        calls.open = { path, flags, mode in
            guard path == "/dev/userfaultfd" else { return SystemCalls.live.open(path, flags, mode) }
            errno = EACCES
            return -1
        }
        calls.userfaultfd = { _ in
            errno = EPERM
            return -1
        }
        var options = PMemDevice.Options()
        options.systemCalls = calls
        return options
    }
}

/// The checks the child process of an exit test runs one after another. Each step is told on
/// stderr before it runs, so that a trap names it; a step that throws no `DAXError`, or one whose
/// code is not among `codes` (any code when `codes` is empty), is told as a mismatch and counted.
/// The parent reads the lines; `exitWithResult()` ends the child with 77 when every step matched.
final class ChildSteps {
    private(set) var mismatches = 0

    func step(_ name: String, _ codes: [DAXError.Code] = [], _ body: () throws -> Void) {
        FileHandle.standardError.write(Data("step \(name)\n".utf8))
        do {
            try body()
            mismatch("\(name): nothing thrown")
        } catch let error as DAXError {
            if !codes.isEmpty, !codes.contains(error.code) { mismatch("\(name): \(error)") }
        } catch {
            mismatch("\(name): not a DAXError: \(error)")
        }
    }

    /// Tells (`mismatch TEXT`) and counts a mismatch, also one a check of the caller's own found.
    func mismatch(_ text: String) {
        FileHandle.standardError.write(Data("mismatch \(text)\n".utf8))
        mismatches += 1
    }

    /// Ends the child: 77 when every step matched, else 1.
    func exitWithResult() -> Never { exit(mismatches == 0 ? 77 : 1) }

    /// The parent's side: records an issue unless the child (observed with its standard error)
    /// exited 77, telling its last step, its mismatches and its error lines. Exit tests expect
    /// `.failure`, which 77 also is, so that the status is checked here with the child's lines.
    static func expectPassed(_ result: ExitTest.Result?, sourceLocation: SourceLocation = #_sourceLocation) {
        guard let result, result.exitStatus != .exitCode(77) else { return }
        let lines = String(decoding: result.standardErrorContent, as: UTF8.self).split(separator: "\n")
        let last = lines.last { $0.hasPrefix("step") } ?? "none"
        let mismatches = lines.filter { $0.hasPrefix("mismatch") }
        let errors = lines.filter { $0.contains("rror") || $0.contains("Fatal") || $0.contains("Crash") }
        Issue.record(
            "child ended \(result.exitStatus); last step: \(last); mismatches: \(mismatches); \(errors.prefix(8))",
            sourceLocation: sourceLocation)
    }
}

/// A device of its own with a freshly formatted file system, for the black-box suites (which use
/// only the public API); unmounted, closed and removed afterwards.
final class BlackBoxRig: @unchecked Sendable {
    let path: String
    let device: PMemDevice
    var fs: DAXFileSystem

    init(
        _ name: String, size: Int = 8 << 20, options: PMemDevice.Options = .init(),
        format: DAXFileSystem.FormatOptions = .init()
    ) throws {
        path = TemporaryDevice.uniquePath(name)
        device = try PMemDevice.create(path: path, size: size, options: options)
        fs = try DAXFileSystem.format(device, options: format)
    }

    func remount() throws {
        try fs.unmount()
        fs = try DAXFileSystem.mount(device)
    }

    deinit {
        try? fs.unmount()
        device.close()
        unlink(path)
    }

    /// Creates `path` holding `bytes` at `offset`, and returns the bytes.
    @discardableResult
    func make(_ path: String, _ bytes: [UInt8], at offset: Int = 0) throws -> [UInt8] {
        let file = try fs.create(path)
        defer { file.close() }
        if !bytes.isEmpty { try file.write(bytes, at: offset) }
        return bytes
    }

    func contents(_ path: String) throws -> [UInt8] {
        try with(path, access: .readOnly) { try $0.read(count: $0.size, at: 0) }
    }

    /// The frames of every page of `path` (one, a hole, for an empty file).
    func frames(_ path: String) throws -> [PageFrameNumber?] {
        try with(path, access: .readOnly) { try $0.frames(offset: 0, count: max($0.size, 1)) }
    }

    func with<T>(_ path: String, access: Access = .readWrite, _ body: (DAXFile) throws -> T) throws -> T {
        let file = try fs.open(path, access: access)
        defer { file.close() }
        return try body(file)
    }

    func expectClean(_ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            let report = try fs.check()
            #expect(report.isClean, "\(what): \(report.problems)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("\(what): check threw \(error)", sourceLocation: sourceLocation)
        }
    }

    /// Invariant 9: pins acquired minus released is the sum of `pinCount` over every device page
    /// and the zero frame one past them (which a read pin of a hole leaves at 0), and
    /// `pinnedPages` counts the pages pinned.
    func expectPinsBalance(_ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
        var sum = 0
        var pinned = 0
        for index in 0...fs.pages.count {
            let count = fs.pages.state(of: PageFrameNumber(rawValue: UInt64(index))).pinCount
            sum += count
            if count > 0 { pinned += 1 }
        }
        let stats = fs.statistics()
        #expect(stats.pinsAcquired - stats.pinsReleased == sum, "\(what): \(stats)", sourceLocation: sourceLocation)
        #expect(stats.pinnedPages == pinned, "\(what)", sourceLocation: sourceLocation)
    }
}
