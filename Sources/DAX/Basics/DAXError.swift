import Glibc

/// The one error type of DAX.
///
/// Every throwing call of the library throws a `DAXError`. Its ``code`` says what kind of failure
/// it was (match on it); its ``message`` says what failed, on which path or range, and why. Errors
/// that come from a system call or from libpmem keep the `errno` value and libpmem's own text.
public struct DAXError: Error, CustomStringConvertible, Sendable {
    /// The kind of failure. Extensible: compare with the static members.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's name, as printed.
        public let name: String

        init(_ name: String) { self.name = name }

        /// The code's name, e.g. `busy`.
        public var description: String { name }

        /// Pages are referenced, pinned or mapped and the policy said not to wait (`EBUSY`).
        public static let busy = Code("busy")
        /// Waiting for pages to go idle took longer than allowed (`ETIMEDOUT`).
        public static let timedOut = Code("timedOut")
        /// The pin's lease was revoked; the device refuses to touch its pages.
        public static let revoked = Code("revoked")
        /// No free blocks, inodes, journal space or host memory for the request (`ENOSPC`).
        public static let noSpace = Code("noSpace")
        /// The path, file or device does not exist (`ENOENT`).
        public static let notFound = Code("notFound")
        /// The path or device exists already (`EEXIST`).
        public static let alreadyExists = Code("alreadyExists")
        /// An argument is out of range or malformed (`EINVAL`).
        public static let invalidArgument = Code("invalidArgument")
        /// The access asked for is not allowed by how the file or device was opened (`EACCES`).
        public static let permissionDenied = Code("permissionDenied")
        /// On-device data is damaged or is not what it claims to be (`EUCLEAN`).
        public static let corrupted = Code("corrupted")
        /// A component of the path is not a directory (`ENOTDIR`).
        public static let notADirectory = Code("notADirectory")
        /// The path names a directory where a file was needed (`EISDIR`).
        public static let isADirectory = Code("isADirectory")
        /// The directory still has entries (`ENOTEMPTY`).
        public static let directoryNotEmpty = Code("directoryNotEmpty")
        /// The media reported an error (`EIO` from a poisoned page).
        public static let mediaError = Code("mediaError")
        /// The device or host cannot do what was asked (`EOPNOTSUPP`).
        public static let unsupported = Code("unsupported")
        /// A system call failed for another reason; see ``DAXError/errno``.
        public static let io = Code("io")
    }

    /// What kind of failure this is.
    public var code: Code
    /// What failed, on which path or range, and why.
    public var message: String
    /// The `errno` value of the failed system call, if one failed.
    public var errno: Int32?

    /// Makes an error. `message` should name the path or range and the cause.
    public init(_ code: Code, _ message: String, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.errno = errno
    }

    /// The code and the message, as one line for a person.
    public var description: String {
        if let errno {
            return "\(code): \(message) (errno \(errno): \(String(cString: strerror(errno))))"
        }
        return "\(code): \(message)"
    }
}

extension DAXError {
    /// The error with `what` ("cannot write /f at 0 + 4096") in front of its message, unless the
    /// message names `subject` already: a cause found deep down (no space, a damaged superblock)
    /// then says which call and which path or range it stopped.
    func context(_ what: String, naming subject: String) -> DAXError {
        guard !message.contains(subject) else { return self }
        var error = self
        error.message = "\(what): \(message)"
        return error
    }

    /// An error for a failed system call: the code follows `errno`, the message keeps its text.
    static func system(_ call: String, _ what: String, errno code: Int32) -> DAXError {
        DAXError(Code(errno: code), "\(what): \(call) failed", errno: code)
    }

    /// An error for a failed libpmem call, keeping `pmem_errormsg()`'s text.
    static func pmem(_ call: String, _ what: String, errno code: Int32, message: String) -> DAXError {
        let detail = message.isEmpty ? "" : ": \(message)"
        return DAXError(Code(errno: code), "\(what): \(call) failed\(detail)", errno: code)
    }
}

extension DAXError.Code {
    /// The code that best describes an `errno` value.
    init(errno code: Int32) {
        switch code {
        case ENOENT: self = .notFound
        case EEXIST: self = .alreadyExists
        case EACCES, EPERM, EROFS: self = .permissionDenied
        case ENOSPC, ENOMEM, EDQUOT, EFBIG: self = .noSpace
        case EISDIR: self = .isADirectory
        case ENOTDIR: self = .notADirectory
        case EINVAL, ENAMETOOLONG: self = .invalidArgument
        case EBUSY, EAGAIN, EWOULDBLOCK: self = .busy
        case ETIMEDOUT: self = .timedOut
        case EOPNOTSUPP, ENOTTY, ENODEV, ENXIO: self = .unsupported
        case EHWPOISON: self = .mediaError
        default: self = .io
        }
    }
}
