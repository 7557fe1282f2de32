import ArgumentParser
import DAX
import Foundation

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A narrated tour on the device (created if missing): the device, its page map, a pin.")

    @OptionGroup var device: DeviceOptions

    @Option(name: .shortAndLong, help: "Size of the device if it must be created.")
    var size: ByteCount = ByteCount(bytes: 64 << 20)

    func run() throws {
        let opened: PMemDevice
        if FileManager.default.fileExists(atPath: device.path) {
            opened = try device.open()
            say("Opened the device \(device.path).")
        } else {
            opened = try PMemDevice.create(path: device.path, size: size.bytes, options: device.options)
            say("Created the device \(device.path) (\(size)); remove it with `rm \(device.path)`.")
        }
        defer { opened.close() }
        print(DeviceReport(opened).text)

        say(
            """
            Every 4 KiB page of the device has a 16-byte descriptor with a reference count, a pin \
            count and a map count, like the kernel's struct page. A device that DMAs into a page pins \
            it first; a pinned block must not be handed to another file.
            """)
        let pages = opened.pages
        let frame = PageFrameNumber(rawValue: UInt64(opened.pageCount / 2))
        guard pages.markAllocated(frame.rawValue, inode: 0, index: 0) else {
            say("Page \(frame) is in use by another process; skipping the pin walk-through.")
            return
        }
        defer { _ = pages.markFree(frame.rawValue) }
        say("Page \(frame) (device offset \(frame.deviceOffset)) is allocated: \(pages.state(of: frame))")
        let pin = try pages.pin(first: frame, count: 1)
        say("Pinned it, as an RDMA NIC's driver would:        \(pages.state(of: frame))")
        say(
            "A freeze (what migration needs) now fails: \(pages.freeze(frame, expectedRefCount: 0) ? "frozen?!" : "refused, the page is pinned")"
        )
        pin.release()
        say("Released the pin:                               \(pages.state(of: frame))")
        let totals = pages.pinTotals
        say("Pin totals: \(totals.acquired) acquired, \(totals.released) released, \(totals.pinnedPages) pinned now.")
    }

    private func say(_ text: String) { print("\n" + text) }
}
