import ArgumentParser

/// A size given on the command line: `4096`, `64K`, `512M`, `1G`, `2GiB`, `1T`.
struct ByteCount: ExpressibleByArgument, CustomStringConvertible {
    var bytes: Int

    init(bytes: Int) { self.bytes = bytes }

    init?(argument: String) {
        let text = argument.trimmingCharacters(in: .whitespaces).uppercased()
        let digits = text.prefix { $0.isNumber }
        guard !digits.isEmpty, let value = Int(digits) else { return nil }
        var unit = String(text.dropFirst(digits.count))
        if unit.hasSuffix("IB") { unit.removeLast(2) } else if unit.hasSuffix("B") { unit.removeLast() }
        let shifts: [String: Int] = ["": 0, "K": 10, "M": 20, "G": 30, "T": 40]
        guard let shift = shifts[unit] else { return nil }
        let (bytes, overflow) = value.multipliedReportingOverflow(by: 1 << shift)
        guard !overflow else { return nil }
        self.bytes = bytes
    }

    var description: String { Self.format(bytes) }

    /// Throws a bad-argument error unless the size is a positive multiple of `multiple` in `range`:
    /// `what` names the argument (`--size`).
    func validate(_ what: String, multipleOf multiple: Int = 1, in range: ClosedRange<Int>) throws {
        guard bytes > 0 else { throw ValidationError("\(what) must be positive, not \(bytes)") }
        guard bytes % multiple == 0 else {
            throw ValidationError("\(what) \(bytes) bytes is not a multiple of \(Self.format(multiple))")
        }
        guard range.contains(bytes) else {
            throw ValidationError(
                "\(what) \(Self.format(bytes)) is outside \(Self.format(range.lowerBound)) to \(Self.format(range.upperBound))"
            )
        }
    }

    /// `1.5 GiB`, `64 KiB`, `512 B`.
    static func format(_ bytes: Int) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(bytes)
        var index = 0
        while value >= 1024, index < units.count - 1 {
            value /= 1024
            index += 1
        }
        if index == 0 { return "\(bytes) B" }
        let rounded = (value * 10).rounded() / 10
        return rounded == rounded.rounded() ? "\(Int(rounded)) \(units[index])" : "\(rounded) \(units[index])"
    }
}

extension String {
    func trimmingCharacters(in set: Set<Character>) -> String {
        String(drop { set.contains($0) }.reversed().drop { set.contains($0) }.reversed())
    }
}

extension Set where Element == Character {
    static let whitespaces: Set<Character> = [" ", "\t", "\n"]
}
