/// Path syntax: `/a/b/c` or `a/b/c` (from the root); empty components are ignored.
enum Paths {
    /// The components of `path`, validated. Throws `.invalidArgument` for an empty path, a name
    /// longer than 255 bytes, or a `.`/`..` component.
    static func components(_ path: String) throws -> [[UInt8]] {
        guard !path.isEmpty else { throw DAXError(.invalidArgument, "path is empty") }
        guard !path.utf8.contains(0) else {
            throw DAXError(.invalidArgument, "path \(quoted(path)) contains a NUL byte")
        }
        let parts = path.utf8.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: true).map(Array.init)
        for part in parts {
            if part.count > DirectoryFormat.maximumNameLength {
                throw DAXError(
                    .invalidArgument,
                    "name \(quoted(String(decoding: part.prefix(40), as: UTF8.self)))... in \(quoted(path)) is "
                        + "\(counted(part.count, "byte")) long; names are at most 255 bytes")
            }
            if part == [UInt8(ascii: ".")] || part == [UInt8(ascii: "."), UInt8(ascii: ".")] {
                throw DAXError(
                    .invalidArgument, "path \(quoted(path)) has a '.' or '..' component, which DAXFS does not resolve")
            }
        }
        return parts
    }

    /// The parent's components and the last name. Throws `.invalidArgument` for the root itself.
    static func split(_ path: String, what: String) throws -> (parent: [[UInt8]], name: [UInt8]) {
        var parts = try components(path)
        guard let name = parts.popLast() else {
            throw DAXError(.invalidArgument, "cannot \(what) \(quoted(path)): it is the root directory")
        }
        return (parts, name)
    }

    /// Whether `path` ends in `/` (and is not the root): as in POSIX, it then names a directory,
    /// and a file there is refused (`.notADirectory`) rather than taken by its name alone.
    static func namesDirectory(_ path: String) -> Bool {
        path.utf8.last == UInt8(ascii: "/") && path.utf8.contains { $0 != UInt8(ascii: "/") }
    }

    /// Throws `.notADirectory` when `path` ends in `/` but names a file (`kind`).
    static func checkTrailingSlash(_ path: String, kind: InodeRecord.Kind, what: String) throws {
        guard kind != .directory, namesDirectory(path) else { return }
        throw DAXError(
            .notADirectory, "cannot \(what) \(quoted(path)): it ends in '/', but the file there is not a directory")
    }

    static func isValidName(_ name: [UInt8]) -> Bool {
        !name.isEmpty && name.count <= DirectoryFormat.maximumNameLength && !name.contains(0)
            && !name.contains(UInt8(ascii: "/")) && name != [46] && name != [46, 46]
    }

    /// The path quoted for messages.
    static func quoted(_ path: String) -> String { "\"\(path)\"" }
}
