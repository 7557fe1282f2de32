import CommandLineSupport
import Foundation

/// Colours of files in a picture, one per file in the order of their first page.
private let fileColors = [
    "#70ad47", "#2e8b57", "#bdb76b", "#548235", "#9acd32", "#3cb371", "#8fbc8f", "#6b8e23", "#a9d18e", "#c9a227",
]

extension PagePicture {
    /// An SVG picture that stays readable at any device size: at most `maximumCells` squares of
    /// `cellSize` pixels, `columns` a row, each the strongest state of the pages it covers, each
    /// file in a colour of its own; the superblock, journal, inode table, bitmap and up to
    /// `maximumLabels` files are labelled at the right with a line to their first square; a legend
    /// lists the states present.
    func svgDocument(
        columns requestedColumns: Int = 64, maximumCells: Int = 4096, cellSize: Int = 12, maximumLabels: Int = 40
    ) -> String {
        let pagesPerCell = max(1, (kinds.count + maximumCells - 1) / maximumCells)
        let cells = cells(pagesPerCell: pagesPerCell)
        let columns = max(1, min(requestedColumns, cells.count))
        let rows = (cells.count + columns - 1) / columns
        let files = regions.filter { $0.kind == .fileData }
        var colorOfFile: [Int: String] = [:]  // by first page
        for (index, file) in files.enumerated() { colorOfFile[file.first] = fileColors[index % fileColors.count] }
        // The colour of a file-data cell: that of the file owning its first file page.
        var ownerFirst: [UInt64: Int] = [:]
        for file in files { ownerFirst[owners[file.first]] = file.first }
        func color(ofCell cell: Int) -> String {
            let kind = cells[cell]
            guard kind == .fileData else { return kind.svgColor }
            let pages = (cell * pagesPerCell)..<min(kinds.count, (cell + 1) * pagesPerCell)
            let page = pages.first { kinds[$0] == .fileData } ?? pages.lowerBound
            return ownerFirst[owners[page]].flatMap { colorOfFile[$0] } ?? kind.svgColor
        }

        let top = 56
        let gridWidth = columns * cellSize
        let labelX = 16 + gridWidth + 40
        let labelled = regions.filter { $0.kind != .fileData } + files.prefix(maximumLabels)
        // Labels go beside the row of their first square, pushed down so that none overlap.
        var labelY: [Int] = []
        for region in labelled {
            let row = region.first / pagesPerCell / columns
            let wanted = top + row * cellSize + cellSize / 2 + 4
            labelY.append(max(wanted, (labelY.last ?? 0) + 16))
        }
        let gridBottom = top + rows * cellSize
        let legendTop = max(gridBottom, (labelY.last ?? 0)) + 28
        let counts = counts
        let present = PageKind.allCases.filter { counts[$0] != nil }
        let omitted = files.count - min(files.count, maximumLabels)
        let height = legendTop + present.count * 20 + (omitted > 0 ? 20 : 0) + 16
        let width = labelX + 460

        var svg = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(width)" height="\(height)" viewBox="0 0 \(width) \(height)" \
            font-family="Helvetica, Arial, sans-serif">
            <rect width="100%" height="100%" fill="white"/>
            <text x="16" y="24" font-size="15" font-weight="bold">\(escape(title))</text>
            <text x="16" y="42" font-size="11" fill="#555">one square = \(counted(pagesPerCell, "page")) \
            (\(ByteCount.format(pagesPerCell * 4096))); a square shows the strongest state among its pages</text>

            """
        // The grid: runs of one colour in a row are one rectangle.
        svg += "<g transform=\"translate(16,\(top))\">\n"
        for row in 0..<rows {
            let start = row * columns
            let end = min(cells.count, start + columns)
            var cell = start
            while cell < end {
                let fill = color(ofCell: cell)
                var run = 1
                while cell + run < end, color(ofCell: cell + run) == fill { run += 1 }
                svg +=
                    "<rect x=\"\((cell - start) * cellSize)\" y=\"\(row * cellSize)\" width=\"\(run * cellSize)\" "
                    + "height=\"\(cellSize)\" fill=\"\(fill)\" stroke=\"white\" stroke-width=\"0.5\"/>\n"
                cell += run
            }
        }
        svg += "</g>\n"
        // Labels, each with a line to its region's first square.
        for (region, y) in zip(labelled, labelY) {
            let cell = region.first / pagesPerCell
            let cellX = 16 + (cell % columns) * cellSize + cellSize / 2
            let cellY = top + (cell / columns) * cellSize + cellSize / 2
            let swatch =
                region.kind == .fileData ? colorOfFile[region.first] ?? region.kind.svgColor : region.kind.svgColor
            svg +=
                "<polyline points=\"\(cellX),\(cellY) \(16 + gridWidth + 8),\(cellY) \(labelX - 6),\(y - 4)\" "
                + "fill=\"none\" stroke=\"#444\" stroke-width=\"0.6\" stroke-opacity=\"0.7\"/>\n"
            svg += "<circle cx=\"\(cellX)\" cy=\"\(cellY)\" r=\"2.5\" fill=\"#333\"/>\n"
            svg +=
                "<rect x=\"\(labelX)\" y=\"\(y - 10)\" width=\"12\" height=\"12\" fill=\"\(swatch)\" stroke=\"#999\"/>\n"
            svg += "<text x=\"\(labelX + 18)\" y=\"\(y)\" font-size=\"12\">\(escape(describe(region)))</text>\n"
        }
        // The legend: only the states present.
        for (index, kind) in present.enumerated() {
            let y = legendTop + index * 20
            let name = kind == .fileData ? "file data (a colour per file)" : name(of: kind)
            svg += "<rect x=\"16\" y=\"\(y)\" width=\"14\" height=\"14\" fill=\"\(kind.svgColor)\" stroke=\"#999\"/>\n"
            svg +=
                "<text x=\"38\" y=\"\(y + 12)\" font-size=\"12\">\(escape(name)): \(counted(counts[kind]!, "page"))</text>\n"
        }
        if omitted > 0 {
            let y = legendTop + present.count * 20 + 12
            svg +=
                "<text x=\"16\" y=\"\(y)\" font-size=\"12\">and \(counted(omitted, "more file")), not labelled</text>\n"
        }
        return svg + "</svg>\n"
    }

    /// `journal: frames 1-256 (1 MiB)`, `/f: 3 pages in 2 runs, frames 300-310`.
    private func describe(_ region: PictureRegion) -> String {
        let frames =
            region.first == region.last
            ? "frame \(start + region.first)" : "frames \(start + region.first)-\(start + region.last)"
        let runs = region.runs == 1 ? "" : " in \(counted(region.runs, "run"))"
        return
            "\(region.name): \(frames), \(counted(region.pages, "page"))\(runs) (\(ByteCount.format(region.pages * 4096)))"
    }

    private func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;")
    }
}
