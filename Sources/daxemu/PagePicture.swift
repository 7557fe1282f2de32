import DAX
import Foundation

/// What a page is, for pictures. Later cases win when one cell covers several pages.
enum PageKind: Int, CaseIterable, Comparable {
    case free, superblock, journal, inodes, bitmap, fileMetadata, fileData, mapped, pinned, quarantined

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
        case .mapped: "#ffc000"
        case .pinned: "#ed7d31"
        case .quarantined: "#c00000"
        }
    }
}

/// The kinds of the device's pages, from the file system's layout and the page descriptors.
struct PagePicture {
    let kinds: [PageKind]
    let title: String

    init(fileSystem fs: DAXFileSystem, device: PMemDevice, frames: Range<Int>? = nil) {
        let layout = fs.layout
        let range = frames ?? 0..<device.pageCount
        kinds = range.map { index in
            let frame = PageFrameNumber(rawValue: UInt64(index))
            if layout.superblock.contains(frame) { return .superblock }
            if layout.journal.contains(frame) { return .journal }
            if layout.inodeTable.contains(frame) { return .inodes }
            if layout.bitmap.contains(frame) { return .bitmap }
            let state = fs.pages.state(of: frame)
            if state.isQuarantined { return .quarantined }
            if state.pinCount > 0 { return .pinned }
            if state.mapCount > 0 { return .mapped }
            if state.holdsFileData { return .fileData }
            if state.isAllocated { return .fileMetadata }
            return .free
        }
        title =
            frames.map { "\(device.path), frames \($0.lowerBound)..<\($0.upperBound)" }
            ?? "\(device.path): \(device.pageCount) pages of 4 KiB"
    }

    /// Pages of each kind.
    var counts: [PageKind: Int] { kinds.reduce(into: [:]) { $0[$1, default: 0] += 1 } }

    /// Cells of `pagesPerCell` pages, each the strongest kind among its pages.
    func cells(pagesPerCell: Int) -> [PageKind] {
        stride(from: 0, to: kinds.count, by: pagesPerCell).map { start in
            kinds[start..<min(kinds.count, start + pagesPerCell)].max()!
        }
    }

    /// A compact picture for a terminal: at most `rows` lines of `columns` cells, with a legend.
    func terminal(columns: Int = 64, rows: Int = 16, color: Bool = isatty(1) == 1) -> String {
        let pagesPerCell = max(1, (kinds.count + columns * rows - 1) / (columns * rows))
        let cells = cells(pagesPerCell: pagesPerCell)
        var lines = ["\(title); one cell = \(pagesPerCell) page\(pagesPerCell == 1 ? "" : "s")"]
        for row in stride(from: 0, to: cells.count, by: columns) {
            let line = cells[row..<min(cells.count, row + columns)].map { kind in
                color ? "\u{1B}[\(kind.ansi)m\(kind.symbol)\u{1B}[0m" : String(kind.symbol)
            }.joined()
            lines.append("  " + line)
        }
        let counts = counts
        let legend = PageKind.allCases.filter { counts[$0] != nil }.map { "\($0.symbol) \($0.name) (\(counts[$0]!))" }
        lines.append("  " + legend.joined(separator: "  "))
        return lines.joined(separator: "\n")
    }

    /// An SVG picture: a grid of squares, runs of one kind drawn as one rectangle, and a legend.
    func svgDocument(columns: Int = 256, maximumCells: Int = 65_536) -> String {
        let pagesPerCell = max(1, (kinds.count + maximumCells - 1) / maximumCells)
        let cells = cells(pagesPerCell: pagesPerCell)
        let size = 4
        let rows = (cells.count + columns - 1) / columns
        let gridHeight = rows * size
        let legendTop = gridHeight + 56
        let counts = counts
        let present = PageKind.allCases.filter { counts[$0] != nil }
        let height = legendTop + present.count * 20 + 16
        let width = max(columns * size + 32, 520)
        var svg = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(width)" height="\(height)" viewBox="0 0 \(width) \(height)" \
            font-family="Helvetica, Arial, sans-serif">
            <rect width="100%" height="100%" fill="white"/>
            <text x="16" y="24" font-size="15" font-weight="bold">\(escape(title))</text>
            <text x="16" y="42" font-size="11" fill="#555">one square = \(pagesPerCell) page\(pagesPerCell == 1 ? "" : "s") \
            of 4 KiB; the strongest state in it wins (quarantined, pinned, mapped, data, metadata, free)</text>
            <g transform="translate(16,50)">

            """
        for row in 0..<rows {
            var column = 0
            let start = row * columns
            let end = min(cells.count, start + columns)
            while start + column < end {
                let kind = cells[start + column]
                var run = 1
                while start + column + run < end, cells[start + column + run] == kind { run += 1 }
                svg +=
                    "<rect x=\"\(column * size)\" y=\"\(row * size)\" width=\"\(run * size)\" height=\"\(size)\" "
                    + "fill=\"\(kind.svgColor)\"/>\n"
                column += run
            }
        }
        svg += "</g>\n"
        for (index, kind) in present.enumerated() {
            let y = legendTop + index * 20
            svg += "<rect x=\"16\" y=\"\(y)\" width=\"14\" height=\"14\" fill=\"\(kind.svgColor)\" stroke=\"#999\"/>\n"
            svg +=
                "<text x=\"38\" y=\"\(y + 12)\" font-size=\"12\">\(escape(kind.name)): \(counts[kind]!) page\(counts[kind]! == 1 ? "" : "s")</text>\n"
        }
        return svg + "</svg>\n"
    }

    private func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;")
    }
}
