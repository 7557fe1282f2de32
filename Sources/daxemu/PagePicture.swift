import CommandLineSupport
import DAX
import Foundation

/// What a page is, for pictures. Later cases win when one cell covers several pages.
enum PageKind: Int, CaseIterable, Comparable {
    case free, superblock, journal, inodes, bitmap, fileMetadata, fileData, selected, mapped, pinned, quarantined

    static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }

    var symbol: Character {
        switch self {
        case .free: "."
        case .superblock: "S"
        case .journal: "J"
        case .inodes: "I"
        case .bitmap: "B"
        case .fileMetadata: "d"
        case .fileData: "#"
        case .selected: "F"
        case .mapped: "M"
        case .pinned: "P"
        case .quarantined: "Q"
        }
    }

    var name: String {
        switch self {
        case .free: "free"
        case .superblock: "superblock"
        case .journal: "journal"
        case .inodes: "inode table"
        case .bitmap: "bitmap"
        case .fileMetadata: "directory blocks and extent leaves"
        case .fileData: "file data"
        case .selected: "the file's pages"
        case .mapped: "mapped"
        case .pinned: "pinned"
        case .quarantined: "quarantined (free on the device, held by a pin)"
        }
    }

    /// ANSI colour code for terminals.
    var ansi: String {
        switch self {
        case .free: "90"
        case .superblock, .journal, .inodes, .bitmap: "36"
        case .fileMetadata: "34"
        case .fileData: "32"
        case .selected: "1;92"
        case .mapped: "33"
        case .pinned: "35"
        case .quarantined: "31"
        }
    }

    var svgColor: String {
        switch self {
        case .free: "#eeeeee"
        case .superblock: "#1f4e79"
        case .journal: "#2e75b6"
        case .inodes: "#5b9bd5"
        case .bitmap: "#9dc3e6"
        case .fileMetadata: "#7030a0"
        case .fileData: "#70ad47"
        case .selected: "#2f6b12"
        case .mapped: "#ffc000"
        case .pinned: "#ed7d31"
        case .quarantined: "#c00000"
        }
    }
}

/// A labelled part of a picture: a metadata region or a file, where its pages lie.
struct PictureRegion {
    var name: String
    var kind: PageKind
    /// Index (in the picture) of its first page, pages it has there, and runs of consecutive pages.
    var first: Int
    var last: Int
    var pages: Int
    var runs: Int
}

/// The kinds of the device's pages, from the file system's layout and the page descriptors, and
/// which file holds each.
struct PagePicture {
    let start: Int
    let kinds: [PageKind]
    /// Who holds each page (0: no file): an inode number, or above `UInt32.max` a group of files
    /// that share the block (clones, dedup), the same number for the same group.
    let owners: [UInt64]
    /// Metadata regions and files, in the order of their first page.
    let regions: [PictureRegion]
    let title: String
    /// The file the picture is drawn for, if one was given.
    let selected: String?

    /// A picture of `frames` (default: the whole device); the pages of the file `selected` (the
    /// frames of its data and its path) are drawn as such, also those it shares with a clone,
    /// whose descriptors name one owner only.
    init(
        fileSystem fs: DAXFileSystem, device: PMemDevice, frames: Range<Int>? = nil,
        selected: (frames: Set<Int>, path: String)? = nil
    ) {
        let layout = fs.layout
        let range = frames ?? 0..<device.pageCount
        start = range.lowerBound
        self.selected = selected?.path
        var owners = [UInt64](repeating: 0, count: range.count)
        let files = Self.files(fs)
        // A shared block's descriptor names one owner; the files' own block lists name them all.
        let sharers = fs.statistics().sharedBlocks > 0 ? Self.sharers(files, in: range, of: fs) : [:]
        var groups: [[UInt32]: UInt64] = [:]
        var names = [UInt64: String](uniqueKeysWithValues: files.map { (UInt64($0.key), escapedForDisplay($0.value)) })
        func number(of group: [UInt32]) -> UInt64 {
            if let number = groups[group] { return number }
            let number = UInt64(UInt32.max) + 1 + UInt64(groups.count)
            groups[group] = number
            names[number] = group.map { names[UInt64($0)] ?? "inode \($0)" }.joined(separator: ", ") + " (shared)"
            return number
        }
        var kinds = [PageKind](repeating: .free, count: range.count)
        for (index, frameIndex) in range.enumerated() {
            let frame = PageFrameNumber(rawValue: UInt64(frameIndex))
            kinds[index] = {
                if layout.superblock.contains(frame) { return .superblock }
                if layout.journal.contains(frame) { return .journal }
                if layout.inodeTable.contains(frame) { return .inodes }
                if layout.bitmap.contains(frame) { return .bitmap }
                let state = fs.pages.state(of: frame)
                if let group = sharers[frameIndex] {
                    owners[index] = number(of: group)
                } else if state.holdsFileData {
                    owners[index] = UInt64(state.ownerInode)
                }
                if state.isQuarantined { return .quarantined }
                if state.pinCount > 0 { return .pinned }
                if state.mapCount > 0 { return .mapped }
                if selected?.frames.contains(frameIndex) == true { return .selected }
                if state.holdsFileData { return .fileData }
                if state.isAllocated { return .fileMetadata }
                return .free
            }()
        }
        self.kinds = kinds
        self.owners = owners
        regions = Self.regions(kinds: kinds, owners: owners, names: names)
        title =
            frames.map { "\(device.path), frames \($0.lowerBound)-\($0.upperBound - 1)" }
            ?? "\(device.path): \(counted(device.pageCount, "page")) of 4 KiB"
    }

    /// Every file's path by inode, from a walk of the directory tree.
    private static func files(_ fs: DAXFileSystem) -> [UInt32: String] {
        var names: [UInt32: String] = [:]
        var directories = ["/"]
        while let directory = directories.popLast() {
            for name in (try? fs.contentsOfDirectory(directory)) ?? [] {
                let path = (directory == "/" ? "/" : directory + "/") + name
                guard let attributes = try? fs.attributes(of: path) else { continue }
                if attributes.kind == .directory { directories.append(path) } else { names[attributes.inode] = path }
            }
        }
        return names
    }

    /// The inodes of the files that hold each shared frame, by frame.
    private typealias Sharers = [Int: [UInt32]]

    /// For each frame of `range` that holds data of more than one of `files`, their inodes, in order.
    private static func sharers(_ files: [UInt32: String], in range: Range<Int>, of fs: DAXFileSystem) -> Sharers {
        var holders: Sharers = [:]
        for (inode, path) in files.sorted(by: { $0.key < $1.key }) {
            for frame in (try? MapCommand.frames(of: path, in: fs)) ?? [] where range.contains(frame) {
                holders[frame, default: []].append(inode)
            }
        }
        return holders.filter { $0.value.count > 1 }
    }

    /// The metadata regions and the files in the picture, each with where its pages lie.
    private static func regions(kinds: [PageKind], owners: [UInt64], names: [UInt64: String]) -> [PictureRegion] {
        var byKind: [PageKind: PictureRegion] = [:]
        var byOwner: [UInt64: PictureRegion] = [:]
        func note(_ region: inout PictureRegion?, _ index: Int, name: String, kind: PageKind) {
            if var seen = region {
                if seen.last != index - 1 { seen.runs += 1 }
                seen.last = index
                seen.pages += 1
                region = seen
            } else {
                region = PictureRegion(name: name, kind: kind, first: index, last: index, pages: 1, runs: 1)
            }
        }
        for (index, kind) in kinds.enumerated() {
            switch kind {
            case .superblock, .journal, .inodes, .bitmap: note(&byKind[kind], index, name: kind.name, kind: kind)
            default:
                let owner = owners[index]
                guard owner != 0 else { continue }
                note(&byOwner[owner], index, name: names[owner] ?? "inode \(owner)", kind: .fileData)
            }
        }
        return (Array(byKind.values) + Array(byOwner.values)).sorted { $0.first < $1.first }
    }

    /// Pages of each kind.
    var counts: [PageKind: Int] { kinds.reduce(into: [:]) { $0[$1, default: 0] += 1 } }

    /// Cells of `pagesPerCell` pages, each the strongest kind among its pages.
    func cells(pagesPerCell: Int) -> [PageKind] {
        stride(from: 0, to: kinds.count, by: pagesPerCell).map { start in
            kinds[start..<min(kinds.count, start + pagesPerCell)].max()!
        }
    }

    /// The legend's name of a kind: the selected file's kind is the file.
    func name(of kind: PageKind) -> String {
        kind == .selected ? selected.map { escapedForDisplay($0) } ?? kind.name : kind.name
    }

    /// A compact picture for a terminal: at most `rows` lines of `columns` cells, with a legend of
    /// the kinds present.
    func terminal(columns: Int = 64, rows: Int = 16, color: Bool = isatty(1) == 1) -> String {
        let pagesPerCell = max(1, (kinds.count + columns * rows - 1) / (columns * rows))
        let cells = cells(pagesPerCell: pagesPerCell)
        var lines = ["\(title); one cell = \(counted(pagesPerCell, "page"))"]
        for row in stride(from: 0, to: cells.count, by: columns) {
            let line = cells[row..<min(cells.count, row + columns)].map { kind in
                color ? "\u{1B}[\(kind.ansi)m\(kind.symbol)\u{1B}[0m" : String(kind.symbol)
            }.joined()
            lines.append("  " + line)
        }
        let counts = counts
        let legend = PageKind.allCases.filter { counts[$0] != nil }.map {
            "\($0.symbol) \(name(of: $0)) (\(counts[$0]!))"
        }
        lines.append("  " + legend.joined(separator: "  "))
        return lines.joined(separator: "\n")
    }
}
