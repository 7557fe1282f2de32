import DAX
import DAXTorture
import Glibc

/// The process that crash tests kill with SIGKILL. Modes:
///
///   daxcrashworker workload DEVICE SEED   mount, print "ready", then run the seeded workload,
///                                         printing "done N" after operation N returns
///   daxcrashworker workload-forking DEVICE SEED
///                                         the same with clones, snapshots, stores through
///                                         mappings, migration and dedup mixed in
///   daxcrashworker pin-truncate DEVICE    mount, pin the pages of /pinned, truncate it with
///                                         .deferFree, print "quarantined N", then wait to be killed
///   daxcrashworker hold DEVICE            mount, print "ready", then wait to be killed
///   daxcrashworker orphan DEVICE PATH     mount, open PATH and remove it (an orphan), print
///                                         "ready", then wait to be killed
///   daxcrashworker unnamed DEVICE         mount, create an unnamed file in / and write 64 KiB to
///                                         it, print "ready", then wait to be killed
///   daxcrashworker kill-at-copy DEVICE N OPERATION ARGUMENTS...
///                                         mount in cache-flush mode, then run one operation
///                                         (`truncate PATH SIZE`, `punch PATH OFFSET COUNT`,
///                                         `clone PATH TO`, `write PATH OFFSET COUNT VALUE`,
///                                         `store PATH OFFSET COUNT VALUE` through a mapping, then
///                                         sync, `migrate PATH OFFSET COUNT`, or
///                                         `dedup PATH OFFSET TO OFFSET COUNT`) and
///                                         SIGKILL itself at its Nth durable copy to the device
///                                         (the journal's: 1 is the records, 3 the first in-place
///                                         write after the commit header)
/// Writes a line straight to the pipe: it is out before the next operation starts.
func say(_ line: String) {
    let text = line + "\n"
    _ = text.withCString { write(1, $0, strlen($0)) }
}

func fail(_ message: String) -> Never {
    let text = "daxcrashworker: \(message)\n"
    _ = text.withCString { write(2, $0, strlen($0)) }
    exit(2)
}

/// Copies to the device left before the worker kills itself; negative while not armed.
nonisolated(unsafe) var copiesBeforeKill = -1

/// A device whose durable copies (`pmem_memcpy`) count down to a SIGKILL once armed.
func openCountingCopies(_ path: String) throws -> PMemDevice {
    var options = PMemDevice.Options()
    options.persistence = .cacheFlush
    var calls = SystemCalls.injectable
    calls.memcpy = { to, from, length, flags in
        if copiesBeforeKill > 0 {
            copiesBeforeKill -= 1
            if copiesBeforeKill == 0 { kill(getpid(), SIGKILL) }
        }
        SystemCalls.live.memcpy(to, from, length, flags)
    }
    options.systemCalls = calls
    return try PMemDevice.open(path: path, options: options)
}

let arguments = CommandLine.arguments
guard arguments.count >= 3 else { fail("usage: daxcrashworker workload|pin-truncate|hold|kill-at-copy DEVICE ...") }
do {
    let killsAtCopy = arguments[1] == "kill-at-copy"
    let device = try killsAtCopy ? openCountingCopies(arguments[2]) : PMemDevice.open(path: arguments[2])
    let fs = try DAXFileSystem.mount(device)
    switch arguments[1] {
    case "workload", "workload-forking":
        guard arguments.count == 4, let seed = UInt64(arguments[3]) else { fail("workload needs a seed") }
        var workload = Workload(model: try Model(reading: fs), seed: seed, forking: arguments[1] == "workload-forking")
        let runner = WorkloadRunner(fs: fs)
        say("ready")
        for index in 0... {
            let operation = workload.next()
            try runner.perform(operation)
            say("done \(index)")
        }
    case "pin-truncate":
        let file = try fs.open("/pinned")
        let mapping = try file.map(count: file.size)
        let pin = try mapping.pin(offset: 0, count: file.size)
        try file.truncate(to: 0, ifBusy: .deferFree)
        say("quarantined \(fs.statistics().quarantinedBlocks) \(pin.count)")
        while true { pause() }
    case "kill-at-copy":
        guard arguments.count >= 6, let copies = Int(arguments[3]), copies > 0 else {
            fail("kill-at-copy needs a copy count and an operation")
        }
        // clone and dedup name their files; the rest act on an open file, opened before arming.
        let file = ["clone", "dedup"].contains(arguments[4]) ? nil : try fs.open(arguments[5])
        let numbers = arguments.dropFirst(6).compactMap { Int($0) }
        copiesBeforeKill = copies
        switch (arguments[4], numbers.count) {
        case ("truncate", 1): try file!.truncate(to: numbers[0], ifBusy: .fail)
        case ("punch", 2): try file!.punchHole(offset: numbers[0], count: numbers[1], ifBusy: .fail)
        case ("clone", 0): try fs.clone(arguments[5], to: arguments[6])
        case ("write", 3):
            try file!.write(
                [UInt8](repeating: UInt8(truncatingIfNeeded: numbers[2]), count: numbers[1]), at: numbers[0])
        case ("store", 3):
            let mapping = try file!.map(count: file!.size)
            (mapping.baseAddress + numbers[0]).initializeMemory(
                as: UInt8.self, repeating: UInt8(truncatingIfNeeded: numbers[2]), count: numbers[1])
            try file!.sync()
            mapping.unmap()
        case ("migrate", 2): _ = try file!.migrate(offset: numbers[0], count: numbers[1])
        case ("dedup", 3) where arguments.count == 10:
            // PATH OFFSET TO OFFSET COUNT: the numbers are the two offsets and the count.
            _ = try fs.deduplicate(
                arguments[5], offset: numbers[0], arguments[7], offset: numbers[1], count: numbers[2])
        default: fail("unknown operation \(arguments[4...].joined(separator: " "))")
        }
        say("finished")
        fail("the operation finished before its copy \(copies)")
    case "orphan":
        guard arguments.count == 4 else { fail("orphan needs a path") }
        let file = try fs.open(arguments[3])
        try fs.remove(arguments[3])
        say("ready")
        withExtendedLifetime(file) {
            while true { pause() }
        }
    case "unnamed":
        let file = try fs.createUnnamed(in: "/")
        try file.write([UInt8](repeating: 0xAB, count: 64 << 10), at: 0)
        say("ready")
        withExtendedLifetime(file) {
            while true { pause() }
        }
    case "hold":
        say("ready")
        while true { pause() }
    default:
        fail("unknown mode \(arguments[1])")
    }
} catch {
    fail("\(error)")
}
