import ArgumentParser
import CommandLineSupport
import DAX
import Foundation

struct Frames: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show where a file's pages live on the device: runs of pages and their frames.",
        discussion: """
            One line per run of pages on consecutive frames, `PAGES -> FRAMES at OFFSET`, and per run \
            of holes. A program that maps the device with libpmem finds page P of a run at \
            OFFSET + (P - first page) * 4096. Frames that other files share (a clone, a snapshot, \
            dedup) end with `shared by N`, the files' extents naming each; a store to one of them \
            copies it first.
            """)

    @OptionGroup var device: DeviceOptions

    @Argument var file: String

    @Flag(
        help:
            "Print JSON: a list of runs {page, count, frame, deviceOffset, references}, first page and frame of each (holes are left out; references is 1 for a frame of this file alone)."
    )
    var json = false

    func validate() throws { try requireDevicePath(file) }

    /// Pages looked up at a time: a huge sparse file is streamed, never held in memory whole.
    static let window = 1 << 16

    func run() throws {
        var output = FramesOutput(json: json)
        try device.withFileSystem(access: .readOnly) { fs in
            let handle = try fs.open(file, access: .readOnly)
            defer { handle.close() }
            let pageSize = PMemDevice.pageSize
            let pages = (handle.size + pageSize - 1) / pageSize
            // Only the pages with blocks are looked up, a window at a time; a hole between them
            // is one run, however long.
            var next = 0
            try forEachDataWindow(of: handle, pages: Self.window) { offset, count, _ in
                let first = offset / pageSize
                if first > next { output.addHole(pages: next..<first) }
                let frames = try handle.frames(offset: offset, count: count)
                let references = try handle.blockReferences(offset: offset, count: count)
                for (index, frame) in frames.enumerated() {
                    output.add(page: first + index, frame, references: index < references.count ? references[index] : 1)
                }
                next = first + frames.count
            }
            if pages > next { output.addHole(pages: next..<pages) }
        }
        try output.finish()
    }
}

/// A run of a file's pages on consecutive frames with one reference count (`frame` nil: a run of
/// holes).
struct FrameRun: Encodable {
    var page: Int
    var count: Int
    var frame: UInt64?
    var deviceOffset: Int?
    /// How many files' extents name each frame of the run: 1 for this file alone, more for a
    /// frame shared copy-on-write; absent for holes.
    var references: Int?

    /// `0-262143 -> 1000-263143 at 4096000`, `3 -> 70 at 286720 shared by 2`, `5 -> hole`.
    var text: String {
        func span(_ first: Int) -> String { count == 1 ? "\(first)" : "\(first)-\(first + count - 1)" }
        guard let frame, let deviceOffset else { return "\(span(page)) -> hole" }
        let line = "\(span(page)) -> \(span(Int(frame))) at \(deviceOffset)"
        guard let references, references > 1 else { return line }
        return line + " shared by \(references)"
    }
}

/// The runs of `daxemu frames`: text lines as they come; JSON, which leaves holes out, at the end.
private struct FramesOutput {
    let json: Bool
    var current: FrameRun?
    var runs: [FrameRun] = []

    /// The header is printed with the first run, once the file was found: a command that fails
    /// prints nothing on standard output.
    private var headerPrinted = false

    init(json: Bool) { self.json = json }

    /// A run of holes, added at once.
    mutating func addHole(pages: Range<Int>) {
        guard !pages.isEmpty else { return }
        if var run = current, run.frame == nil, run.page + run.count == pages.lowerBound {
            run.count += pages.count
            current = run
            return
        }
        end()
        current = FrameRun(page: pages.lowerBound, count: pages.count, frame: nil, deviceOffset: nil, references: nil)
    }

    mutating func add(page: Int, _ frame: PageFrameNumber?, references: Int) {
        let references = frame == nil ? nil : references
        if var run = current, run.page + run.count == page, run.references == references,
            run.frame.map({ frame?.rawValue == $0 + UInt64(run.count) }) ?? (frame == nil)
        {
            run.count += 1
            current = run
            return
        }
        end()
        current = FrameRun(
            page: page, count: 1, frame: frame?.rawValue, deviceOffset: frame?.deviceOffset, references: references)
    }

    mutating func finish() throws {
        end()
        if json {
            print(try jsonText(runs))
        } else {
            printHeaderOnce()  // an empty file has no run to print it
        }
    }

    private mutating func printHeaderOnce() {
        guard !headerPrinted else { return }
        headerPrinted = true
        print("pages -> frames at device offset")
    }

    private mutating func end() {
        guard let run = current else { return }
        current = nil
        if !json {
            printHeaderOnce()
            print(run.text)
        } else if run.frame != nil {
            runs.append(run)
        }
    }
}

struct Fsck: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check the file system without changing it: exit 0 when clean, 1 with the problems listed.",
        discussion: """
            Without --repair the device is opened for reading only. With --repair, repair what check \
            finds (the device must not be mounted): rebuild the bitmap, link counts, the journal, the \
            orphan list and a damaged superblock; clear damaged inodes; move files that lost their name \
            to /lost+found. Each step is printed. Exit 0 when the file system is consistent afterwards.
            """)

    @OptionGroup var device: DeviceOptions

    @Flag(help: "Repair the damage found, saying each step (the device must not be mounted).")
    var repair = false

    func run() throws {
        let opened = try device.open(readOnly: !repair)
        defer { opened.close() }
        if repair { return try runRepair(opened) }
        let report: CheckReport
        do {
            report = try DAXFileSystem.check(opened)
        } catch let error as DAXError where error.code == .corrupted {
            print("\(opened.path): damaged: \(error.message)")
            throw ExitCode(1)
        }
        for note in report.notes { print("note: \(note)") }
        if report.isClean {
            print("\(opened.path): clean")
        } else {
            print("\(opened.path): \(counted(report.problems.count, "problem"))")
            for problem in report.problems { print("  - \(problem)") }
            print("`daxemu fsck --repair` repairs it (unmounted); a read-only mount reads what is intact")
            throw ExitCode(1)
        }
    }

    private func runRepair(_ opened: PMemDevice) throws {
        let report: RepairReport
        do {
            report = try DAXFileSystem.repair(opened)
        } catch let error as DAXError where error.code == .corrupted {
            // The message starts "cannot repair PATH".
            print(error.message)
            throw ExitCode(1)
        }
        for action in report.actions { print("repaired: \(action)") }
        for note in report.check.notes { print("note: \(note)") }
        let outcome =
            report.changedNothing
            ? "clean, nothing to repair" : "repaired (\(counted(report.actions.count, "step"))); now clean"
        print("\(opened.path): \(outcome)")
    }
}
