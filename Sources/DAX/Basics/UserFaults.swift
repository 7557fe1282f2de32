import CLibPMem
import Glibc
import Synchronization

/// A page fault reported by the process's userfaultfd.
struct UserFault: Sendable {
    /// The faulting address (the kernel rounds it down to its page unless asked not to).
    var address: UInt
    /// A store (`UFFD_PAGEFAULT_FLAG_WRITE`).
    var isWrite: Bool
    /// A store to a write-protected page (`UFFD_PAGEFAULT_FLAG_WP`), as opposed to a missing page.
    var isWriteProtect: Bool
}

/// The process's one userfaultfd and the one thread that answers its faults.
///
/// Linux lets a virtual range be registered with only one userfaultfd, so every part of DAX that
/// handles faults in user space shares this one: the crash emulation's write-protect tracking of
/// the device and of the DAX file mappings of an emulated device (the Media layer), and a later
/// missing/write-protect fault handler for holes and shared blocks (the Mapping layer). Each user
/// registers its ranges with a handler of its own; the thread looks the faulting address up and
/// calls that handler, which must resolve the fault (for instance with
/// ``writeProtect(_:length:_:)`` off, which wakes the faulting thread) without storing to any
/// registered range and without waiting for a thread that may itself be faulting.
///
/// The descriptor comes from `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`) when the process may open
/// it, else from the `userfaultfd(2)` system call; kernel-mode accesses (a `read(2)` into a
/// registered page) fault too. The thread and descriptor live as long as the process.
final class UserFaults: Sendable {
    /// What a registered range asks for.
    struct Modes: OptionSet, Sendable {
        let rawValue: UInt64
        /// Faults on stores to write-protected pages (`UFFDIO_REGISTER_MODE_WP`).
        static let writeProtect = Modes(rawValue: UInt64(dax_UFFDIO_REGISTER_MODE_WP))
        /// Faults on pages with no backing (`UFFDIO_REGISTER_MODE_MISSING`).
        static let missing = Modes(rawValue: UInt64(dax_UFFDIO_REGISTER_MODE_MISSING))
    }

    private struct Registration {
        var start: UInt
        var end: UInt
        var handler: @Sendable (UserFault) -> Void
    }

    /// The kernel's page size on x86-64.
    static let pageSize = 4096

    /// The shared instance, or why userfaultfd is not available to this process.
    static let shared: Result<UserFaults, DAXError> = {
        do {
            return .success(try UserFaults(calls: .live))
        } catch let error as DAXError {
            return .failure(error)
        } catch {
            return .failure(DAXError(.unsupported, "cannot set up userfaultfd: \(error)"))
        }
    }()

    let fd: Int32
    private let calls: SystemCalls
    /// Registered ranges, sorted by start, disjoint.
    private let registrations = Mutex<[Registration]>([])
    /// Faults handled, for tests and statistics.
    let faultsHandled = Atomic<Int>(0)

    /// Opens a userfaultfd through `calls` and starts its thread; use ``shared``, not this (tests
    /// call it with failing calls to see the error).
    init(calls: SystemCalls) throws {
        self.calls = calls
        var fd: Int32 = -1
        let device = calls.open("/dev/userfaultfd", O_RDWR | O_CLOEXEC, 0)
        if device >= 0 {
            var flags = Int32(O_CLOEXEC)
            fd = withUnsafeMutablePointer(to: &flags) {
                calls.ioctl(device, UInt(dax_USERFAULTFD_IOC_NEW), UnsafeMutableRawPointer($0))
            }
            _ = calls.close(device)
        }
        if fd < 0 { fd = calls.userfaultfd(O_CLOEXEC) }
        guard fd >= 0 else {
            throw DAXError.system(
                "userfaultfd",
                "cannot track stores: neither /dev/userfaultfd nor the userfaultfd system call is available "
                    + "to this process (it needs access to /dev/userfaultfd, CAP_SYS_PTRACE, or "
                    + "vm.unprivileged_userfaultfd=1)",
                errno: errno)
        }
        var api = uffdio_api()
        api.api = UInt64(dax_UFFD_API)
        api.features = UInt64(dax_UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
        guard withUnsafeMutablePointer(to: &api, { calls.ioctl(fd, dax_UFFDIO_API, UnsafeMutableRawPointer($0)) }) == 0
        else {
            let code = errno
            _ = calls.close(fd)
            throw DAXError.system(
                "ioctl(UFFDIO_API)",
                "cannot track stores: the kernel's userfaultfd has no write-protect mode for shared memory "
                    + "(UFFD_FEATURE_WP_HUGETLBFS_SHMEM needs Linux 5.19 or later)",
                errno: code)
        }
        self.fd = fd
        let box = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let started = pthread_create(
            &thread, nil,
            { argument in
                let faults = Unmanaged<UserFaults>.fromOpaque(argument!).takeRetainedValue()
                faults.serve()
                return nil
            }, box)
        precondition(started == 0, "cannot start the userfaultfd thread: error \(started)")
        pthread_detach(thread)
    }

    /// Registers `length` bytes at `address` (page-aligned, a mapping of this process) for `modes`;
    /// faults there call `handler` on the fault thread. Calls `ioctl(UFFDIO_REGISTER)`.
    func register(
        _ address: UnsafeMutableRawPointer, length: Int, modes: Modes,
        handler: @escaping @Sendable (UserFault) -> Void
    ) throws {
        var request = uffdio_register()
        request.range.start = UInt64(UInt(bitPattern: address))
        request.range.len = UInt64(length)
        request.mode = modes.rawValue
        let start = UInt(bitPattern: address)
        try registrations.withTrackedLock { list in
            guard
                withUnsafeMutablePointer(
                    to: &request,
                    {
                        calls.ioctl(fd, dax_UFFDIO_REGISTER, UnsafeMutableRawPointer($0))
                    }) == 0
            else {
                throw DAXError.system(
                    "ioctl(UFFDIO_REGISTER)", "cannot register \(length) bytes at \(address) with userfaultfd",
                    errno: errno)
            }
            Self.remove(start..<(start + UInt(length)), from: &list)
            let entry = Registration(start: start, end: start + UInt(length), handler: handler)
            let index = list.firstIndex { $0.start > start } ?? list.count
            list.insert(entry, at: index)
        }
    }

    /// Drops the handlers of `length` bytes at `address` after the range was unmapped or mapped
    /// over (the kernel dropped its registration with the old mapping); a handler whose range only
    /// partly overlaps keeps the rest.
    func forget(_ address: UnsafeMutableRawPointer, length: Int) {
        let start = UInt(bitPattern: address)
        registrations.withTrackedLock { Self.remove(start..<(start + UInt(length)), from: &$0) }
    }

    /// Sets (`protect` true) or clears write protection of `length` bytes at `address`; clearing
    /// wakes threads waiting on a fault there. Calls `ioctl(UFFDIO_WRITEPROTECT)`. Returns false
    /// (errno set) when the range is not registered for write-protect faults.
    @discardableResult
    func writeProtect(_ address: UnsafeMutableRawPointer, length: Int, _ protect: Bool) -> Bool {
        var request = uffdio_writeprotect()
        request.range.start = UInt64(UInt(bitPattern: address))
        request.range.len = UInt64(length)
        request.mode = protect ? UInt64(dax_UFFDIO_WRITEPROTECT_MODE_WP) : 0
        return withUnsafeMutablePointer(to: &request) {
            calls.ioctl(fd, dax_UFFDIO_WRITEPROTECT, UnsafeMutableRawPointer($0))
        } == 0
    }

    /// Wakes threads waiting on a fault in the range without changing it (`UFFDIO_WAKE`).
    func wake(_ address: UInt, length: Int) {
        var range = uffdio_range()
        range.start = UInt64(address)
        range.len = UInt64(length)
        _ = withUnsafeMutablePointer(to: &range) { calls.ioctl(fd, dax_UFFDIO_WAKE, UnsafeMutableRawPointer($0)) }
    }

    private static func remove(_ range: Range<UInt>, from list: inout [Registration]) {
        var kept: [Registration] = []
        kept.reserveCapacity(list.count + 1)
        for entry in list {
            if entry.end <= range.lowerBound || entry.start >= range.upperBound {
                kept.append(entry)
                continue
            }
            if entry.start < range.lowerBound {
                kept.append(Registration(start: entry.start, end: range.lowerBound, handler: entry.handler))
            }
            if entry.end > range.upperBound {
                kept.append(Registration(start: range.upperBound, end: entry.end, handler: entry.handler))
            }
        }
        list = kept
    }

    private func handler(for address: UInt) -> (@Sendable (UserFault) -> Void)? {
        registrations.withTrackedLock { list in
            var low = 0
            var high = list.count
            while low < high {
                let middle = (low + high) / 2
                if list[middle].end <= address { low = middle + 1 } else { high = middle }
            }
            guard low < list.count, list[low].start <= address else { return nil }
            return list[low].handler
        }
    }

    /// The fault thread: reads each fault and calls the handler of its range. A fault with no
    /// handler (its range was forgotten while the fault was queued) is woken to retry as is.
    private func serve() {
        while true {
            var address: UInt64 = 0
            var flags: UInt64 = 0
            let got = calls.readUserFault(fd, &address, &flags)
            if got < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                preconditionFailure("userfaultfd read failed: errno \(errno)")
            }
            guard got == 1 else { continue }
            let fault = UserFault(
                address: UInt(address) & ~UInt(Self.pageSize - 1),
                isWrite: flags & UInt64(dax_UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                isWriteProtect: flags & UInt64(dax_UFFD_PAGEFAULT_FLAG_WP) != 0)
            faultsHandled.wrappingAdd(1, ordering: .relaxed)
            if let handler = handler(for: fault.address) {
                handler(fault)
            } else if fault.isWriteProtect {
                _ = writeProtect(UnsafeMutableRawPointer(bitPattern: fault.address)!, length: Self.pageSize, false)
            } else {
                wake(fault.address, length: Self.pageSize)
            }
        }
    }
}
