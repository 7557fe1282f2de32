import Foundation

/// Write bandwidth against request size, for ours, fio and fio's calls from C on a warm mapping,
/// drawn as an SVG line chart (request size on a log scale).
enum WriteBandwidthPlot {
    static let sizes = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]

    struct Point {
        var size: Int
        var ours: Double
        var fio: Double
        var warm: Double
    }

    static func measure(_ context: BenchContext) throws -> [Point] {
        var plotContext = context
        plotContext.repetitions = context.quick ? 3 : 5
        return try sizes.map { size in
            FileHandle.standardError.write(Data("plotting write bandwidth for \(size)-byte requests...\n".utf8))
            let bytes = 256 << 20
            let fio = try FileSystemBenchmarks.bandwidth(plotContext, write: true, request: size, bytes: bytes)
            let warm = try FileSystemBenchmarks.bandwidth(
                plotContext, write: true, request: size, warmPeer: true,
                bytes: bytes)
            return Point(size: size, ours: median(fio.ours + warm.ours), fio: median(fio.peer), warm: median(warm.peer))
        }
    }

    static func svg(_ points: [Point], machine: String) -> String {
        let width = 720.0
        let height = 440.0
        let left = 70.0
        let right = 200.0
        let top = 50.0
        let bottom = 60.0
        let plotWidth = width - left - right
        let plotHeight = height - top - bottom
        let maximum = (points.flatMap { [$0.ours, $0.fio, $0.warm] }.max() ?? 1) * 1.1
        func x(_ index: Int) -> Double { left + plotWidth * Double(index) / Double(points.count - 1) }
        func y(_ value: Double) -> Double { top + plotHeight * (1 - value / maximum) }
        var svg = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" \
            font-family="Helvetica, Arial, sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(left)" y="24" font-size="15" font-weight="bold">Sequential write bandwidth by request size</text>
            <text x="\(left)" y="40" font-size="10" fill="#555">\(machine); 256 MiB per pass, medians</text>

            """
        for tick in 0...5 {
            let value = maximum * Double(tick) / 5
            svg +=
                "<line x1=\"\(left)\" x2=\"\(left + plotWidth)\" y1=\"\(y(value))\" y2=\"\(y(value))\" stroke=\"#ddd\"/>\n"
            svg +=
                "<text x=\"\(left - 8)\" y=\"\(y(value) + 4)\" text-anchor=\"end\">\(String(format: "%.0f", value))</text>\n"
        }
        for (index, point) in points.enumerated() {
            let label = point.size >= 1 << 20 ? "\(point.size >> 20) MiB" : "\(point.size >> 10) KiB"
            svg += "<text x=\"\(x(index))\" y=\"\(top + plotHeight + 18)\" text-anchor=\"middle\">\(label)</text>\n"
        }
        svg += "<text x=\"\(left + plotWidth / 2)\" y=\"\(height - 16)\" text-anchor=\"middle\">request size</text>\n"
        svg +=
            "<text x=\"18\" y=\"\(top + plotHeight / 2)\" transform=\"rotate(-90 18 \(top + plotHeight / 2))\" "
            + "text-anchor=\"middle\">GB/s</text>\n"
        let series: [(String, String, KeyPath<Point, Double>)] = [
            ("DAXFile.write", "#c00000", \.ours),
            ("fio libpmem engine", "#2e75b6", \.fio),
            ("fio's calls from C, warm", "#70ad47", \.warm),
        ]
        for (index, (name, color, path)) in series.enumerated() {
            let coordinates = points.enumerated().map { "\(x($0.offset)),\(y($0.element[keyPath: path]))" }
            svg +=
                "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"2.5\" points=\"\(coordinates.joined(separator: " "))\"/>\n"
            for (offset, point) in points.enumerated() {
                svg += "<circle cx=\"\(x(offset))\" cy=\"\(y(point[keyPath: path]))\" r=\"3.5\" fill=\"\(color)\"/>\n"
            }
            let legendY = top + 20 + Double(index) * 22
            svg +=
                "<rect x=\"\(left + plotWidth + 20)\" y=\"\(legendY - 10)\" width=\"14\" height=\"4\" fill=\"\(color)\"/>\n"
            svg += "<text x=\"\(left + plotWidth + 40)\" y=\"\(legendY - 4)\">\(name)</text>\n"
        }
        return svg + "</svg>\n"
    }
}
