import Foundation
import Testing

@testable import DAX

/// Uses up the process's map entries (`vm.max_map_count`) with single pages of anonymous memory
/// whose protections alternate, so that no two merge, until the kernel refuses one more: a
/// process that many mappings have brought to its limit. ``release()`` gives them back.
final class MapEntryFiller {
    private var pages: [UnsafeMutableRawPointer] = []

    init() {
        while true {
            let protection = pages.count % 2 == 0 ? PROT_READ : PROT_READ | PROT_WRITE
            guard let page = mmap(nil, 4096, protection, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
                page != MAP_FAILED
            else { break }
            pages.append(page)
        }
    }

    /// How many entries it took.
    var count: Int { pages.count }

    func release() {
        for page in pages { munmap(page, 4096) }
        pages = []
    }
}

/// The child of an exit test: a page of a live mapping must stop showing its block (a punch, or
/// a truncate that cuts it off) while the process has no map entry left to spare, with and
/// without a fault handler. The change must happen, with the block kept from reuse while the
/// mapping still shows it, rather than the process stopping. Exits 77 when every check held.
func changeLayoutWithoutMapEntries(cut: Bool) -> Never {
    let steps = ChildSteps()
    for handler in [true, false] {
        let label = "\(cut ? "truncate" : "punch"), \(handler ? "with" : "without") a fault handler"
        let path = TemporaryDevice.uniquePath("mapentries")
        guard
            let device = try? PMemDevice.create(
                path: path, size: 8 << 20, options: handler ? .init() : .withoutUserfaultfd)
        else { exit(2) }
        unlink(path)
        guard let fs = try? DAXFileSystem.format(device), let file = try? fs.create("/f") else { exit(3) }
        let data = pattern(16 * 4096, seed: 9)
        guard (try? file.write(data, at: 0)) != nil, let mapping = try? file.map(count: 16 * 4096),
            let before = try? file.frames(offset: 0, count: 16 * 4096)
        else { exit(4) }
        let freeBefore = fs.statistics().freeBlocks
        // Pages 6-15 go with a truncate to 5 pages and 100 bytes; page 5 with a punch.
        let gone = cut ? 6..<16 : 5..<6
        let filler = MapEntryFiller()
        if filler.count == 0 { steps.mismatch("\(label): the filler took no map entries") }
        do {
            if cut {
                try file.truncate(to: 5 * 4096 + 100, ifBusy: .fail)
            } else {
                try file.punchHole(offset: 5 * 4096, count: 4096, ifBusy: .fail)
            }
        } catch {
            steps.mismatch("\(label): the change failed: \(error)")
        }
        // Given back at once: the checks below need memory, which a process with no map entry
        // left may not get. Nothing hides the pages again before the sync below.
        filler.release()
        // The file changed as asked.
        let frames = (try? file.frames(offset: 0, count: 16 * 4096)) ?? []
        if frames.count != 16 || gone.contains(where: { frames[$0] != nil }) {
            steps.mismatch("\(label): the file still has blocks there: \(frames)")
        }
        if cut, file.size != 5 * 4096 + 100 { steps.mismatch("\(label): size \(file.size)") }
        if !cut, (try? file.read(count: 4096, at: 5 * 4096)) != [UInt8](repeating: 0, count: 4096) {
            steps.mismatch("\(label): the punched page does not read zeros")
        }
        // The pages kept still show their data through the old mapping.
        let kept = UnsafeRawBufferPointer(start: mapping.baseAddress, count: 5 * 4096)
        if !kept.elementsEqual(data[0..<(5 * 4096)]) { steps.mismatch("\(label): pages 0-4 changed in the mapping") }
        // No map entry was left for the pages to stop showing their blocks (every split of a
        // kernel mapping was refused): the blocks are quarantined, never handed out while the
        // mapping shows them.
        let stats = fs.statistics()
        if stats.freeBlocks - freeBefore != 0 || stats.quarantinedBlocks != gone.count {
            steps.mismatch("\(label): \(gone.count) blocks should be quarantined: \(stats)")
        }
        let stale = Set(gone.compactMap { before[$0]?.rawValue })
        if let other = try? fs.create("/other"),
            (try? other.allocate(offset: 0, count: stats.freeBlocks * 4096)) != nil,
            let taken = try? other.frames(offset: 0, count: stats.freeBlocks * 4096)
        {
            let reused = taken.compactMap { $0?.rawValue }.filter { stale.contains($0) }
            if !reused.isEmpty { steps.mismatch("\(label): blocks \(reused) handed out while a mapping shows them") }
            other.close()
        } else {
            steps.mismatch("\(label): cannot take the free blocks")
        }
        try? fs.remove("/other")
        // With entries to spare again, the next sync makes those pages stop showing the blocks.
        do { try file.sync() } catch { steps.mismatch("\(label): sync: \(error)") }
        if fs.statistics().quarantinedBlocks != 0 {
            steps.mismatch("\(label): blocks still quarantined after a sync with entries to spare: \(fs.statistics())")
        }
        if handler, !cut,
            !UnsafeRawBufferPointer(start: mapping.baseAddress + 5 * 4096, count: 4096).allSatisfy({ $0 == 0 })
        {
            steps.mismatch("\(label): the punched page does not read zeros through the old mapping after the sync")
        }
        mapping.unmap()
        let after = fs.statistics()
        if after.quarantinedBlocks != 0 || after.freeBlocks != freeBefore + gone.count {
            steps.mismatch("\(label): after the unmap \(after), expected \(freeBefore + gone.count) free")
        }
        for frame in before.compactMap({ $0 }) where fs.pages.state(of: frame).mapCount != 0 {
            steps.mismatch("\(label): frame \(frame) still counted as mapped: \(fs.pages.state(of: frame))")
        }
        if (try? fs.check().isClean) != true { steps.mismatch("\(label): check is not clean") }
        try? fs.unmount()
        device.close()
    }
    steps.exitWithResult()
}

@Suite("DAXMapping: the process out of map entries")
struct MapEntryLimitTests {
    @Test(
        "a punch in a live mapping with no map entry to spare happens, and the block is kept until the page is hidden")
    func punchWithoutMapEntries() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            changeLayoutWithoutMapEntries(cut: false)
        }
        ChildSteps.expectPassed(result)
    }

    @Test(
        "a truncate that cuts pages of a live mapping with no map entry to spare happens, the blocks kept until hidden")
    func truncateWithoutMapEntries() async {
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            changeLayoutWithoutMapEntries(cut: true)
        }
        ChildSteps.expectPassed(result)
    }
}
