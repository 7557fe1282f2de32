import ArgumentParser
import DAX

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a device file (refuses an existing one).")

    @OptionGroup var device: DeviceOptions

    @Option(name: .shortAndLong, help: "Size: a multiple of 4096 of at least 2M, e.g. 64M, 1G.")
    var size: ByteCount = ByteCount(bytes: 1 << 30)

    @Flag(help: "Create the file sparse: instant, but a full /dev/shm shows up later as SIGBUS.")
    var sparse = false

    func run() throws {
        var options = device.options
        options.sparse = sparse
        let created = try PMemDevice.create(path: device.path, size: size.bytes, options: options)
        defer { created.close() }
        print("created \(created.path): \(ByteCount.format(created.size)), \(created.pageCount) pages")
    }
}
