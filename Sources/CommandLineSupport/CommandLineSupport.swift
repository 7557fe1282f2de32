import ArgumentParser
import DAX
import Glibc

/// A failure that is not a `DAXError` (a bad local file, a damaged store, a bad option value), told
/// to the user as one line.
public struct CommandError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

extension ParsableCommand {
    /// Parses the arguments and runs the command. Every failure becomes one line on stderr,
    /// `NAME: what went wrong`, and an exit status: 1 for a failed command, 64 for bad arguments
    /// (then the line ends with where to find help). `--help` and `--version` print as usual.
    public static func mainReportingErrors(arguments: [String]? = nil) -> Never {
        let name = configuration.commandName ?? _commandName
        do {
            var command = try parseAsRoot(arguments)
            try command.run()
            Glibc.exit(0)
        } catch let error as DAXError {
            let reason = error.errno.map { " (\(String(cString: strerror($0))))" } ?? ""
            report("\(name): \(error.message)\(reason)")
            Glibc.exit(1)
        } catch {
            let code = exitCode(for: error)
            // Help and version requests arrive as errors that exit successfully.
            guard code != .success else { self.exit(withError: error) }
            let message = message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            var line = "\(name): \(message)"
            if code == .validationFailure,
                let hint = fullMessage(for: error).split(separator: "\n").last(where: { $0.contains("--help") })
            {
                let trimmed = hint.trimmingCharacters(in: " .")
                line += " (\(trimmed.prefix(1).lowercased() + trimmed.dropFirst()))"
            }
            report(line)
            Glibc.exit(code.rawValue)
        }
    }
}

private func report(_ line: String) {
    let text = line + "\n"
    _ = text.withCString { write(STDERR_FILENO, $0, strlen($0)) }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> Substring {
        var result = self
        while let first = result.first, set.contains(first) { result = result.dropFirst() }
        while let last = result.last, set.contains(last) { result = result.dropLast() }
        return result
    }
}

extension DAXFileSystem {
    /// Creates the file at `path`, or replaces the file there, all at once: `build` fills a new
    /// file under a temporary name in the same directory, which is then renamed over `path`. A
    /// build that throws leaves `path` as it was; so does a process killed during it (its temporary
    /// file, `.<hash of the name>.partial`, is removed by the next call for the same path).
    public func createAtomically(_ path: String, build: (DAXFile) throws -> Void) throws {
        // Refuse what the rename would refuse, before any work: a bad path or parent, a directory.
        do {
            if try attributes(of: path).kind == .directory {
                throw DAXError(.isADirectory, "cannot replace directory \(path) with a file")
            }
        } catch let error as DAXError where error.code == .notFound {
            let parent = String(path.prefix(upTo: path.lastIndex(of: "/") ?? path.startIndex))
            guard try attributes(of: parent.isEmpty ? "/" : parent).kind == .directory else {
                throw DAXError(.notADirectory, "\(parent) is not a directory")
            }
        }
        let name = path.split(separator: "/").last.map(String.init) ?? path
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in name.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        let temporary = String(path.dropLast(name.utf8.count)) + ".\(String(hash, radix: 16)).partial"
        try? remove(temporary)
        let file = try create(temporary)
        do {
            try build(file)
            file.close()
            try rename(temporary, to: path)
        } catch {
            file.close()
            try? remove(temporary)
            throw error
        }
    }
}
