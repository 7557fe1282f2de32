import ArgumentParser
import DAX
import Glibc
import Synchronization

/// A failure that is not a `DAXError` (a bad local file, a damaged store, a bad option value), told
/// to the user as one line.
public struct CommandError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }

    /// Throws if one of `values` came from a command-line argument that is not valid UTF-8. Swift
    /// turns invalid bytes into U+FFFD, so two different byte strings would arrive as one key or
    /// record.
    public static func requireUTF8(_ values: [String], for what: String) throws {
        for index in 1..<Int(CommandLine.argc) {
            guard let raw = CommandLine.unsafeArgv[index] else { continue }
            let bytes = UnsafeRawBufferPointer(start: raw, count: strlen(raw)).bindMemory(to: UInt8.self)
            guard String(validating: bytes, as: UTF8.self) == nil else { continue }
            if values.contains(String(decoding: bytes, as: UTF8.self)) {
                throw CommandError("argument \(index) is not valid UTF-8 (\(what) are UTF-8 text)")
            }
        }
    }
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
        } catch let code as ExitCode {
            // A result, not a failure (`get` of an absent key, `check` of a broken store): the
            // command has already said what it had to.
            Glibc.exit(code.rawValue)
        } catch let error as DAXError {
            // The errno's text, unless the message (libpmem's, say) ends with it already.
            let text = error.errno.map { String(cString: strerror($0)) }
            let reason = text.map { error.message.hasSuffix($0) ? "" : " (\($0))" } ?? ""
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
    /// Opens an app's file at `path` (a store, a log: `kind`). A missing or empty one is made by
    /// `build` under another name and renamed into place (``createAtomically(_:build:)``), so a
    /// creation that fails or is killed never leaves a file at `path` that is not one. Without
    /// `build` (a command that only reads) a missing or empty file is an error naming `maker`,
    /// the command that makes one.
    public func openOrCreate(
        _ path: String, kind: String, maker: String, build: ((DAXFile) throws -> Void)?
    ) throws -> DAXFile {
        let existing: DAXFile?
        do {
            existing = try open(path)
        } catch let error as DAXError where error.code == .notFound {
            existing = nil
        }
        if let existing, existing.size > 0 { return existing }
        existing?.close()
        guard let build else {
            throw CommandError(
                existing == nil
                    ? "no \(kind) at \(path) (\(maker) creates one)"
                    : "\(path) is an empty file, not a \(kind) (\(maker) makes it one)")
        }
        try createAtomically(path, build: build)
        return try open(path)
    }

    /// Creates the file at `path`, or replaces the file there, all at once: `build` fills a new
    /// unnamed file (``DAXFileSystem/createUnnamed(in:)``, on the orphan list from its first
    /// moment), which is then linked at `path` in one transaction. A build that throws leaves
    /// `path` as it was; so does a process killed during it, and the next mount frees what it
    /// had written.
    public func createAtomically(_ path: String, build: (DAXFile) throws -> Void) throws {
        // Refuse what the link would refuse, before any work: a bad path or parent, a directory.
        let slash = path.utf8.lastIndex(of: UInt8(ascii: "/"))
        let directory = slash.map { String(path[...$0]) } ?? "/"
        do {
            if try attributes(of: path).kind == .directory {
                throw DAXError(.isADirectory, "cannot replace directory \(path) with a file")
            }
        } catch let error as DAXError where error.code == .notFound {
            guard try attributes(of: directory).kind == .directory else {
                throw DAXError(.notADirectory, "\(directory) is not a directory")
            }
        }
        let file = try createUnnamed(in: directory)
        defer { file.close() }
        do {
            try build(file)
        } catch var error as DAXError {
            // Told about the file the user named, not the unnamed one it was built in.
            error.message = error.message.replacing(file.path, with: path)
            throw error
        }
        try link(file, at: path, replacing: true)
    }
}


