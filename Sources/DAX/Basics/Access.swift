/// Whether a file, mapping or pin may be written, or only read.
public enum Access: Sendable, Hashable {
    case readOnly
    case readWrite
}
