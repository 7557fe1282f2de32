import ArgumentParser
import CommandLineSupport
import DAX

struct Format: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write an empty DAX file system on the device (refuses one that still looks like a file system).")

    @OptionGroup var device: DeviceOptions

    @Flag(help: "Erase a file system that is already there.")
    var force = false

    @Option(help: "Device bytes per inode: how many files fit (default 16K).")
    var bytesPerInode: ByteCount = ByteCount(bytes: 16 << 10)

    func validate() throws {
        try bytesPerInode.validate("--bytes-per-inode", multipleOf: 1024, in: 1024...PMemDevice.maximumSize)
    }

    func run() throws {
        let opened = try device.open()
        defer { opened.close() }
        if !force, let found = DAXFileSystem.existingFileSystem(on: opened) {
            // What to do instead depends on its state: repair only helps where check finds damage
            // that it can read past.
            let state: String
            do {
                state =
                    try DAXFileSystem.check(opened).isClean
                    ? "" : ", damaged: `daxemu fsck --repair` repairs it"
            } catch let error as DAXError {
                state = ", which cannot be mounted or repaired (\(error.message))"
            }
            throw CommandError("\(opened.path) still holds a DAX file system (\(found))\(state); --force erases it")
        }
        var options = DAXFileSystem.FormatOptions()
        options.overwritesExistingFileSystem = force
        options.bytesPerInode = bytesPerInode.bytes
        let progress = Progress("formatting \(opened.path)")
        options.progress = { progress.update($0) }
        let fs = try DAXFileSystem.format(opened, options: options)
        progress.finish()
        let statistics = fs.statistics()
        try fs.unmount()
        print(
            "formatted \(opened.path): \(counted(statistics.totalBlocks, "data block")) "
                + "(\(ByteCount.format(statistics.totalBlocks * 4096))), \(counted(statistics.totalInodes, "inode"))")
    }
}
