import Glibc

/// Wall-clock time (`CLOCK_REALTIME`), for inode timestamps.
enum WallClock {
    /// Nanoseconds since the epoch.
    static var nanosecondsSinceEpoch: UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}
