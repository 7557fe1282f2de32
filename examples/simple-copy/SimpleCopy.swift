import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

/// Copies a host file into a DAX file the way PMDK's simple_copy does: map the destination, copy
/// each chunk with a non-temporal persistent copy that does not wait (`pmem_memcpy` with
/// NONTEMPORAL | NODRAIN), and drain once at the end.
@main
struct SimpleCopy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simple-copy", abstract: "Copy a host file into a DAX file with non-temporal persistent copies.")

    @Option(help: "The device (default $DAXEMU_DEVICE, else /dev/shm/daxemu); it must hold a DAX file system.")
    var device: String?

    @Option(help: "Bytes per copy.")
    var chunk = 1 << 20

    @Argument(help: "The host file to read.")
    var source: String

    @Argument(help: "The DAX file to create (it must not exist).")
    var destination: String

    static func main() { mainReportingErrors() }

    func validate() throws {
        try requireDeviceOption(device)
        try requireDevicePath(destination)
        guard (1...(1 << 30)).contains(chunk) else { throw ValidationError("--chunk is 1 to 1073741824, not \(chunk)") }
    }

    func run() throws {
        let input = open(source, O_RDONLY)
        guard input >= 0 else { throw CommandError("cannot read \(source): \(String(cString: strerror(errno)))") }
        defer { close(input) }
        var info = stat()
        guard fstat(input, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
            // The destination is sized and mapped up front, so the source's size must be known.
            throw CommandError(
                "\(source) is not a regular file (a pipe or device has no size to map the destination to)")
        }
        let size = Int(info.st_size)
        let path = device ?? PMemDevice.defaultPath
        let opened = try openCommandDevice(path)
        defer { opened.close() }
        let fs = try DAXFileSystem.mount(opened)
        defer { try? fs.unmount() }
        let file = try fs.create(destination)
        var copied = false
        defer {
            file.close()
            if !copied { try? fs.remove(destination) }  // a failed copy leaves no partial file
        }
        guard size > 0 else {
            copied = true
            print("copied 0 bytes to \(destination)")
            return
        }
        // Blocks first (posix_fallocate, as PMDK's pmem_map_file does): a store through the mapping
        // to a hole would allocate on the fault, and with no block left that is SIGBUS, not an error.
        try file.allocate(offset: 0, count: size)
        let mapping = try file.map(count: size)
        defer { mapping.unmap() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var offset = 0
        while offset < size {
            let count = read(input, buffer.baseAddress, min(chunk, size - offset))
            guard count > 0 else { throw CommandError("\(source) ended early at \(offset) bytes") }
            mapping.copy(
                UnsafeRawBufferPointer(rebasing: buffer[0..<count]), toOffset: offset,
                flags: [.nonTemporal, .noDrain])
            offset += count
        }
        mapping.drain()
        copied = true
        print("copied \(counted(size, "byte")) to \(destination)")
    }
}
