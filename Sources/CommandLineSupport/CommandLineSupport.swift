import ArgumentParser
import CLibPMem
import DAX
import Glibc
import Synchronization

/// A failure that is not a `DAXError` (a bad local file, a damaged store, a bad option value), told
/// to the user as one line.
public struct CommandError: Error, CustomStringConvertible {
    /// The line told to the user.
    public var description: String
    /// A failure told as `description`.
    public init(_ description: String) { self.description = description }
}

/// "1 file", "2 files", "0 directories" (with `plural`).
public func counted(_ n: Int, _ singular: String, _ plural: String? = nil) -> String {
    "\(n) \(n == 1 ? singular : plural ?? singular + "s")"
}

/// `text` with what a terminal would not show as itself written as an escape: `\n`, `\t`, `\r`,
/// `\\` (unless `backslashes` is false), and `\u{NN}` for other control characters. A name or
/// record printed this way takes one line and says which bytes it holds.
public func escapedForDisplay(_ text: String, backslashes: Bool = true) -> String {
    var result = ""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "\n": result += "\\n"
        case "\t": result += "\\t"
        case "\r": result += "\\r"
        case "\\" where backslashes: result += "\\\\"
        case _ where scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value):
            result += "\\u{\(String(scalar.value, radix: 16, uppercase: true))}"
        default: result.unicodeScalars.append(scalar)
        }
    }
    return result
}

/// `bytes` as text for display: UTF-8 escaped as ``escapedForDisplay(_:)`` does, and each byte
/// that is not part of valid UTF-8 as `\xNN`.
public func escapedForDisplay(_ bytes: some Collection<UInt8>) -> String {
    let bytes = Array(bytes)
    var result = ""
    var parser = Unicode.UTF8.ForwardParser()
    var iterator = bytes.makeIterator()
    var position = 0
    while true {
        switch parser.parseScalar(from: &iterator) {
        case .valid(let encoded):
            result += escapedForDisplay(String(Unicode.UTF8.decode(encoded)))
            position += encoded.count
        case .error(let length):
            for byte in bytes[position..<(position + length)] {
                let hex = String(byte, radix: 16, uppercase: true)
                result += "\\x" + (hex.count == 1 ? "0" + hex : hex)
            }
            position += length
        case .emptyInput:
            return result
        }
    }
}

/// What is wrong with the raw command line before it is parsed, if anything.
private enum ArgumentProblem {
    /// Argument `index` (from 1) is not valid UTF-8; Swift would turn its bad bytes into U+FFFD, so
    /// two different names would arrive as one.
    case notUTF8(index: Int, shown: String)
    /// A negative number (`-5`, after `option` if it is an option's value): no program here takes
    /// one, and the parser would take it for an option and say something else.
    case negative(String, option: String?)
}

private func rawArgumentProblem() -> ArgumentProblem? {
    for index in 1..<Int(CommandLine.argc) {
        guard let raw = CommandLine.unsafeArgv[index] else { continue }
        let bytes = UnsafeRawBufferPointer(start: raw, count: strlen(raw)).bindMemory(to: UInt8.self)
        if String(validating: bytes, as: UTF8.self) == nil {
            return .notUTF8(index: index, shown: escapedForDisplay(bytes))
        }
    }
    return nil
}

/// `-5`, `-1G`, `-0.5`: a token that reads as a negative number, not as an option.
private func isNegativeNumber(_ token: String) -> Bool {
    let utf8 = Array(token.utf8)
    return utf8.count >= 2 && utf8[0] == UInt8(ascii: "-") && (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(utf8[1])
}

extension ParsableCommand {
    /// Parses the arguments and runs the command. Every failure becomes one line on stderr,
    /// `NAME: what went wrong`, and an exit status: 1 for a failed command, 64 for bad arguments
    /// (then the line ends with where to find help). `--help` and `--version` print as usual.
    ///
    /// Two mistakes are caught before the parser sees them, as bad arguments: an argument that is
    /// not valid UTF-8 (every name, path and value here is UTF-8 text), and a negative number
    /// (`--size -5`, `truncate /f -5`), which no program here takes.
    public static func mainReportingErrors(arguments: [String]? = nil) -> Never {
        let name = configuration.commandName ?? _commandName
        let arguments = arguments ?? Array(CommandLine.arguments.dropFirst())
        var problem = rawArgumentProblem()
        var parsed = arguments
        if problem == nil, let index = arguments.prefix(while: { $0 != "--" }).firstIndex(where: isNegativeNumber) {
            let previous = index > 0 ? arguments[index - 1] : ""
            let isOption = previous.hasPrefix("-") && !previous.contains("=") && !isNegativeNumber(previous)
            // An option the command does not have is told as such, whatever its value: the
            // parser says so once the number is out of its way.
            var probe = arguments
            probe[index] = "0"
            var unknown = false
            do { _ = try parseAsRoot(probe) } catch { unknown = message(for: error).hasPrefix("Unknown option") }
            if unknown {
                parsed = probe
            } else {
                problem = .negative(arguments[index], option: isOption ? previous : nil)
            }
        }
        // `help NAME` of a command that does not exist: the parser would print the main help
        // and exit 0, as if it had been answered.
        if problem == nil, arguments.first == "help", arguments.count > 1, !arguments[1].hasPrefix("-") {
            let names = configuration.subcommands.map { $0._commandName }
            if !names.contains(arguments[1]), arguments[1] != "help" {
                report(
                    "\(name): there is no command \(arguments[1]) (see '\(name) --help' for the commands)")
                Glibc.exit(ExitCode.validationFailure.rawValue)
            }
        }
        if let problem {
            let message: String
            switch problem {
            case .notUTF8(let index, let shown):
                message = "argument \(index) (\(shown)) is not valid UTF-8; names, paths and values are UTF-8 text"
            case .negative(let number, let option?):
                message = "\(option) \(number) is negative; sizes and counts are 0 or more"
            case .negative(let number, nil):
                message = "\(number) is negative, and no size or count is; an argument that starts with - goes after --"
            }
            // The help hint names the subcommand, as the parser's own hints do.
            let names = configuration.subcommands.map { $0._commandName }
            let path = [name] + (arguments.first(where: names.contains).map { [$0] } ?? [])
            report("\(name): \(message) (see '\(path.joined(separator: " ")) --help' for more information)")
            Glibc.exit(ExitCode.validationFailure.rawValue)
        }
        // The subcommand, once parsed: a bad argument found while it runs names its help.
        var subcommand: ParsableCommand.Type?
        do {
            var command = try parseAsRoot(parsed)
            if type(of: command) != Self.self { subcommand = type(of: command) }
            try command.run()
            // What was printed must have reached standard output (a full disk, /dev/full): a
            // listing cut short is a failure, as ls(1) and cat(1) report it.
            if dax_flush_standard_output() != 0 {
                report("\(name): write error on standard output: \(String(cString: strerror(errno)))")
                Glibc.exit(1)
            }
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
            // The parser's own messages may run on over lines of usage: their first line says it.
            // A command's own message is one line, whatever names in it hold (a newline is shown
            // escaped).
            let message =
                (error as? CommandError)?.description
                ?? message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            var line = "\(name): \(message)"
            if code == .validationFailure, error is ValidationError, let subcommand {
                line += " (see '\(name) \(subcommand._commandName) --help' for more information)"
            } else if code == .validationFailure,
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

/// Writes `line` to stderr as one line: a name with a newline in it is shown escaped.
private func report(_ line: String) { reportErrorLine(line) }

/// Writes `line` on stderr as one line, its control characters (a newline or an escape in a name)
/// shown escaped: how every error of these commands is told, also one a command reports and
/// goes on after, as `rm` does for each operand it cannot remove.
public func reportErrorLine(_ line: String) {
    writeStderr(escapedForDisplay(line, backslashes: false) + "\n")
}

/// Writes `text` on stderr as it is, unbuffered: a progress line redrawn with `\r`, a warning.
public func writeStderr(_ text: String) {
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

/// Throws a bad-argument error unless `path` names something on the device: an absolute path.
/// Every command of the project and its examples takes device paths this way.
public func requireDevicePath(_ path: String) throws {
    guard path.hasPrefix("/") else {
        throw ValidationError("\(escapedForDisplay(path)): paths on the device start with /")
    }
}

/// Refuses `--device ""`, a bad argument like any other, before anything is opened.
public func requireDeviceOption(_ device: String?) throws {
    guard device?.isEmpty != true else {
        throw ValidationError("--device names no file: give the device's path (or leave it out for the default)")
    }
}

/// Opens the device at `path` for a command, saying how to make one when there is none: what
/// every example command does with its `--device`.
public func openCommandDevice(_ path: String, options: PMemDevice.Options = .init()) throws -> PMemDevice {
    do {
        return try PMemDevice.open(path: path, options: options)
    } catch let error as DAXError where error.code == .notFound {
        throw CommandError(
            "no device at \(path): create one with `daxemu create --device \(path)` "
                + "and `daxemu format --device \(path)`")
    }
}
