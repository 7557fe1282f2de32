import ArgumentParser
import CommandLineSupport
import DAX
import Foundation
import Synchronization

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "The story of truncate versus a pinned page, narrated and live: a mapped file, an RDMA NIC pinning it, truncate under each policy.",
        discussion: """
            Works in /demo on the device, which must not exist yet (the device is created and formatted \
            if missing; other files are left alone), and removes what it made at the end, also when it fails.
            """)

    @OptionGroup var device: DeviceOptions

    @Option(name: .shortAndLong, help: "Size of the device if it must be created.")
    var size: ByteCount = ByteCount(bytes: 64 << 20)

    @Flag(help: "Do not pause between acts.")
    var fast = false

    func validate() throws {
        try size.validate(
            "--size", multipleOf: PMemDevice.pageSize, in: PMemDevice.minimumSize...PMemDevice.maximumSize)
    }

    func run() throws {
        let opened: PMemDevice
        if FileManager.default.fileExists(atPath: device.path) {
            opened = try device.open()
            act("The device", "Opened \(opened.path).")
        } else {
            try Create.checkPlace(for: device.path, size: size.bytes, sparse: false)
            opened = try PMemDevice.create(path: device.path, size: size.bytes, options: device.options)
            act("The device", "Created \(opened.path) (\(size)); `rm \(opened.path)` removes it.")
        }
        defer { opened.close() }
        print(DeviceReport(opened).text)
        let fs: DAXFileSystem
        if DAXFileSystem.isFormatted(opened) {
            fs = try DAXFileSystem.mount(opened)
        } else {
            fs = try DAXFileSystem.format(opened)
            say("Formatted it with a DAX file system: \(fs.statistics().totalBlocks) data blocks.")
        }
        defer { try? fs.unmount() }
        // /demo is the user's if it is there already (a directory of theirs, or what an earlier
        // demo that was killed left): the demo never removes what it did not make.
        if (try? fs.attributes(of: "/demo")) != nil {
            throw CommandError(
                "\"/demo\" already exists on \(opened.path); the demo works in a directory of its own and "
                    + "removes it at the end, so it leaves yours alone (remove it, or run the demo on another "
                    + "--device)")
        }
        try fs.createDirectory("/demo")
        do {
            try story(fs)
        } catch {
            // What the story made goes too, so that a demo that failed (a device too full) can run again.
            try? cleanUp(fs)
            throw error
        }
        try cleanUp(fs)
        let totals = fs.statistics()
        act(
            "The end",
            """
            Every pin was released exactly once: \(counted(totals.pinsAcquired, "page")) pinned, \
            \(totals.pinsReleased) released, \(totals.pinnedPages) pinned now, \
            \(counted(totals.quarantinedBlocks, "block")) quarantined. \
            check(): \(try fs.check().isClean ? "clean" : "NOT clean").
            """)
    }

    private func story(_ fs: DAXFileSystem) throws {
        let pages = 16
        let buffer = try fs.create("/demo/rdma-buffer")
        defer { buffer.close() }
        try buffer.write([UInt8](repeating: 0x42, count: pages * 4096), at: 0)
        let frames = try buffer.frames(offset: 0, count: pages * 4096).map { $0! }
        let window = window(around: frames)
        act(
            "1. A file",
            """
            /demo/rdma-buffer holds \(pages) pages. Its blocks are device pages: page 0 is \(frames[0]), \
            at device offset \(frames[0].deviceOffset).
            """)
        picture(fs, window)

        let mapping = try buffer.map(count: pages * 4096)
        mapping.baseAddress.storeBytes(of: 0x5A, toByteOffset: 0, as: UInt8.self)
        mapping.persist(offset: 0, count: 1)
        let onDevice = try fs.device.read(count: 1, at: frames[0].deviceOffset)[0]
        act(
            "2. A DAX mapping",
            """
            Mapped it: a store through the mapping wrote 0x5A, and the device holds 0x\(String(onDevice, radix: 16, uppercase: true)) \
            at that frame's offset. No copy exists anywhere. Page 0: \(fs.pages.state(of: frames[0])).
            """)
        picture(fs, window)

        let nic = DMAEngine(device: fs.device)
        let asked = Mutex(false)
        let lease = try mapping.pin(
            offset: 8 * 4096, count: 8 * 4096,
            lifetime: .longTerm(onRevoke: {
                asked.withLock { $0 = true }
            }))
        let region = nic.register(lease)
        try nic.write(Array("hello from the NIC".utf8), to: region, at: 0)
        act(
            "3. An RDMA NIC pins the second half",
            """
            The NIC registered pages 8-15 (a long-term pin, a lease) and DMA-writes to them by frame. \
            Page 8: \(fs.pages.state(of: frames[8])). Now the administrator truncates the file to 4 pages.
            """)
        picture(fs, window)

        attempt("4. truncate, .fail") { try buffer.truncate(to: 4 * 4096, ifBusy: .fail) }
        say("   Nothing changed: size \(buffer.size), page 8 still mapped (\(fs.pages.state(of: frames[8]))).")
        attempt("5. truncate, .wait(timeout: 0.3 s)") {
            try buffer.truncate(to: 4 * 4096, ifBusy: .wait(timeout: .milliseconds(300)))
        }
        say("   The truncate slept until its deadline; the final unpin would have woken it. Nothing changed.")

        attempt("6. truncate, .revokeLeases(grace: 0.3 s)") {
            try buffer.truncate(to: 4 * 4096, ifBusy: .revokeLeases(grace: .milliseconds(300)))
        }
        say(
            """
               The NIC was asked to let go (\(asked.withLock { $0 } ? "it was asked, and ignored it" : "it was not asked")); \
            after the grace period its lease was revoked: isRevoked = \(region.isRevoked).
            """)
        do {
            try nic.write(Array("too late".utf8), to: region, at: 0)
            say("   The NIC's write went through?!")
        } catch let error as DAXError {
            say("   The NIC's next write is refused: \(error.code) (\(error.message)). Nothing was written.")
        }
        say("   Size \(buffer.size); pages 4-15 are free again and can be reused at once.")
        nic.deregister(region)
        picture(fs, window)

        // Again with a short-term pin, and .deferFree.
        try buffer.write([UInt8](repeating: 0x43, count: pages * 4096), at: 0)
        let remapped = try buffer.map(count: pages * 4096)
        let newFrames = try buffer.frames(offset: 0, count: pages * 4096).map { $0! }
        let dma = nic.register(try remapped.pin(offset: 8 * 4096, count: 8 * 4096))
        act("7. The file grows back; the NIC pins pages 8-15 again, short-term this time", "")
        attempt("8. truncate, .deferFree") { try buffer.truncate(to: 4 * 4096, ifBusy: .deferFree) }
        let statistics = fs.statistics()
        say(
            """
               The truncate went on: size \(buffer.size). The 8 pinned blocks are free on the device but \
            quarantined (\(statistics.quarantinedBlocks) quarantined): page 8 is \(fs.pages.state(of: newFrames[8])).
            """)
        try nic.write(Array("still mine".utf8), to: dma, at: 0)
        let other = try fs.create("/demo/other")
        defer { other.close() }
        try other.allocate(offset: 0, count: 64 * 4096)
        let taken = Set(try other.frames(offset: 0, count: 64 * 4096).compactMap { $0 })
        say(
            """
               The NIC keeps writing into them; another file allocating 64 blocks gets \
            \(taken.intersection(newFrames[8...]).count) of the quarantined ones, and reads \
            \(try other.read(count: 64 * 4096, at: 0).allSatisfy { $0 == 0 } ? "only zeros" : "SOMEONE ELSE'S BYTES").
            """)
        picture(fs, window)
        nic.deregister(dma)
        say(
            "   The NIC deregistered: its final unpin ended the quarantine (\(fs.statistics().quarantinedBlocks) quarantined)."
        )
        picture(fs, window)
        mapping.unmap()
        remapped.unmap()
    }

    private func cleanUp(_ fs: DAXFileSystem) throws {
        for name in try fs.contentsOfDirectory("/demo") { try fs.remove("/demo/" + name) }
        try fs.remove("/demo")
    }

    /// The frames around the demo's file, for a readable picture.
    private func window(around frames: [PageFrameNumber]) -> Range<Int> {
        let first = Int(frames.min()!.rawValue)
        let start = max(0, first - first % 64 - 64)
        return start..<(start + 256)
    }

    private func picture(_ fs: DAXFileSystem, _ frames: Range<Int>) {
        let bounded = frames.clamped(to: 0..<fs.device.pageCount)
        print(PagePicture(fileSystem: fs, device: fs.device, frames: bounded).terminal(columns: 64, rows: 4))
    }

    private func attempt(_ title: String, _ body: () throws -> Void) {
        pause()
        print("\n\(title)")
        do {
            try body()
            say("   It succeeded.")
        } catch let error as DAXError {
            say("   It failed with \(error.code): \(error.message)")
        } catch {
            say("   It failed: \(error)")
        }
    }

    private func act(_ title: String, _ text: String) {
        pause()
        print("\n\(title)")
        if !text.isEmpty { say("   " + text) }
    }

    private func say(_ text: String) { print(text) }

    private func pause() {
        if !fast, isatty(1) == 1 { usleep(400_000) }
    }
}
