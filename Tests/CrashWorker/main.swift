import DAX
import DAXTorture
import Glibc

/// The process that crash tests kill with SIGKILL. Modes:
///
///   daxcrashworker workload DEVICE SEED   mount, print "ready", then run the seeded workload,
///                                         printing "done N" after operation N returns
///   daxcrashworker pin-truncate DEVICE    mount, pin the pages of /pinned, truncate it with
///                                         .deferFree, print "quarantined N", then wait to be killed
///   daxcrashworker hold DEVICE            mount, print "ready", then wait to be killed
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

let arguments = CommandLine.arguments
guard arguments.count >= 3 else { fail("usage: daxcrashworker workload|pin-truncate|hold DEVICE [SEED]") }
do {
    let device = try PMemDevice.open(path: arguments[2])
    let fs = try DAXFileSystem.mount(device)
    switch arguments[1] {
    case "workload":
        guard arguments.count == 4, let seed = UInt64(arguments[3]) else { fail("workload needs a seed") }
        var workload = Workload(model: try Model(reading: fs), seed: seed)
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
    case "hold":
        say("ready")
        while true { pause() }
    default:
        fail("unknown mode \(arguments[1])")
    }
} catch {
    fail("\(error)")
}
