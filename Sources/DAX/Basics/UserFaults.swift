import CLibPMem
import Glibc
import Synchronization

/// A page fault reported by a userfaultfd.
struct UserFault: Sendable {
    /// The faulting address (the kernel rounds it down to its page unless asked not to).
    var address: UInt
    /// A store (`UFFD_PAGEFAULT_FLAG_WRITE`).
    var isWrite: Bool
    /// A store to a write-protected page (`UFFD_PAGEFAULT_FLAG_WP`), as opposed to a missing page.
    var isWriteProtect: Bool
    /// The faulting thread's id (`UFFD_FEATURE_THREAD_ID`), to signal it.
    var thread: Int32
}

/// A userfaultfd and the threads that answer its faults: one, or one bound to each CPU the
/// process may use (``Placement``).
///
/// Linux lets a virtual range be registered with only one userfaultfd. Each user registers its
/// ranges with a handler of its own; the thread looks the faulting address up and calls that
/// handler, which must resolve the fault (map something there, lift a write protection, or signal
/// the thread) without storing to any registered range and without waiting for a thread that may
/// itself be faulting. There is one for the whole process, ``shared``, for the crash emulation's
/// tracking of a device's own mapping; each mounted file system has one more for its DAX
/// mappings, stopped at unmount.
///
/// The descriptor comes from `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`) when the process may open
/// it, else from the `userfaultfd(2)` system call, both in full mode: kernel-mode accesses (a
/// `read(2)` into a registered page) fault too. Without privilege the system call still gives a
/// descriptor with `UFFD_USER_MODE_ONLY`, which resolves only faults of user-mode accesses.
final class UserFaults: Sendable {
    /// What a registered range asks for.
    struct Modes: OptionSet, Sendable {
        let rawValue: UInt64
        /// Faults on stores to write-protected pages (`UFFDIO_REGISTER_MODE_WP`).
        static let writeProtect = Modes(rawValue: UInt64(dax_UFFDIO_REGISTER_MODE_WP))
        /// Faults on pages with no backing (`UFFDIO_REGISTER_MODE_MISSING`).
        static let missing = Modes(rawValue: UInt64(dax_UFFDIO_REGISTER_MODE_MISSING))
    }

    /// Which accesses fault to the handler.
    enum Reach: Sendable, Equatable {
        /// User- and kernel-mode accesses (`/dev/userfaultfd`, or the system call with privilege).
        case full
        /// Only user-mode accesses (`UFFD_USER_MODE_ONLY`): a kernel access to a registered page
        /// that is missing fails with `EFAULT`.
        case userModeOnly
    }

    private struct Registration {
        var start: UInt
        var end: UInt
        var handler: @Sendable (UserFault) -> Void
    }

    /// The kernel's page size on x86-64.
    static let pageSize = 4096

    /// How long the thread polls for the next fault before it sleeps in `poll`. A thread that
    /// sleeps lets its CPU go idle, and waking an idle CPU is most of what a fault answered in
    /// user space costs where idle CPUs halt (a virtual machine's vCPU, a core in a deep C-state):
    /// each fault then wakes two of them, the handler's and, when the handler has answered, the
    /// faulting thread's. Polling for a while keeps the handler's CPU awake for the next fault of
    /// a run of them, at the cost of that CPU's time while it polls. It is off where the thread
    /// can run on one CPU only, where polling would only keep the faulting thread waiting.
    struct Spin: Equatable, Sendable {
        /// What a handler polls for, when the environment does not say.
        static let defaultMicroseconds = 100
        /// The most the environment may ask for.
        static let maximumMicroseconds = 10_000
        /// The environment variable that sets it, in microseconds (0 turns polling off).
        static let environmentVariable = "DAX_FAULT_SPIN_US"

        var nanoseconds: Int
        /// One sentence on it, for `faultHandlingDetail`.
        var description: String

        /// The spin that `value` (of ``environmentVariable``, nil when unset) asks for, for a
        /// thread that may run on `cpus` CPUs. A value that is not a whole number of microseconds
        /// from 0 to ``maximumMicroseconds`` gives the default, and the description says so.
        /// Threads bound one to each CPU (`perCPU`) do not poll unless `value` asks them to: the
        /// thread on the faulting thread's CPU answers there, and one polling elsewhere would
        /// only take the fault from it and wake the faulting thread across CPUs.
        static func from(_ value: String?, cpus: Int, perCPU: Bool = false) -> Spin {
            var note = ""
            var microseconds = defaultMicroseconds
            if value == nil, perCPU {
                return Spin(
                    nanoseconds: 0,
                    description: "each handler thread sleeps between faults, woken on its own CPU")
            }
            if let value {
                if let asked = Int(value), (0...maximumMicroseconds).contains(asked) {
                    microseconds = asked
                } else {
                    note =
                        " (\(environmentVariable)=\(value) is not a whole number of microseconds from 0 to "
                        + "\(maximumMicroseconds); the default is used)"
                }
            }
            if cpus <= 1 {
                return Spin(
                    nanoseconds: 0, description: "the handler thread sleeps between faults: it has one CPU" + note)
            }
            if microseconds == 0 {
                return Spin(
                    nanoseconds: 0, description: "the handler thread sleeps between faults (\(environmentVariable)=0)")
            }
            return Spin(
                nanoseconds: microseconds * 1000,
                description: "the handler thread polls for \(microseconds) µs after each fault before it sleeps" + note)
        }

        /// The spin the process's environment asks for, for threads started by the calling one
        /// (which inherit its CPUs) and placed as `placement` says.
        static func fromEnvironment(for placement: Placement) -> Spin {
            from(
                getenv(environmentVariable).map { String(cString: $0) }, cpus: Int(dax_usable_cpus()),
                perCPU: !placement.cpus.isEmpty)
        }
    }

    /// Where the handler threads run. A fault answered in user space costs two wake-ups, the
    /// handler's and then the faulting thread's, and waking a thread on another CPU costs far
    /// more than switching to one on the same CPU where idle CPUs halt (a virtual machine's vCPU
    /// above all). So where the process may use a few CPUs, each gets a thread of its own, bound
    /// to it: the faulting thread's fault wakes every thread, the one on its CPU runs as soon as
    /// the faulting thread sleeps, answers, and wakes it there. With many CPUs every fault would
    /// wake too many threads; there one thread, free to run anywhere, answers all faults.
    struct Placement: Equatable, Sendable {
        /// The most CPUs that get a thread each by default.
        static let mostPerCPU = 4
        /// The most threads the environment may ask for (`per-cpu` on a machine with more CPUs
        /// binds one to each of the first ones).
        static let mostThreads = 64
        /// The environment variable that chooses: `1` for one thread, `per-cpu` for one bound to
        /// each CPU.
        static let environmentVariable = "DAX_FAULT_THREADS"

        /// The CPUs the threads are bound to, one thread each; empty for one thread, unbound.
        var cpus: [Int32]
        /// One sentence on it, for `faultHandlingDetail`.
        var description: String

        /// One thread, unbound (the process-wide instance's, and the choice with many CPUs).
        static func single(_ why: String) -> Placement { Placement(cpus: [], description: why) }

        /// The placement `value` (of ``environmentVariable``, nil when unset) asks for, for a
        /// process that may use `cpus`.
        static func from(_ value: String?, cpus: [Int32]) -> Placement {
            var note = ""
            var perCPU = cpus.count > 1 && cpus.count <= mostPerCPU
            if let value {
                switch value {
                case "1": perCPU = false
                case "per-cpu": perCPU = cpus.count > 1
                default:
                    note =
                        " (\(environmentVariable)=\(value) is neither 1 nor per-cpu; the default is used)"
                }
            }
            guard perCPU else {
                let why =
                    cpus.count <= 1
                    ? "one handler thread: the process has one CPU"
                    : value == "1"
                        ? "one handler thread (\(environmentVariable)=1)"
                        : "one handler thread: the process may use \(cpus.count) CPUs, more than "
                            + "\(mostPerCPU) to wake at each fault"
                return .single(why + note)
            }
            let bound = Array(cpus.prefix(mostThreads))
            return Placement(
                cpus: bound,
                description: "\(bound.count) handler threads, one bound to each CPU the process may use" + note)
        }

        /// The placement the process's environment asks for, for the CPUs the calling thread
        /// may use.
        static func fromEnvironment() -> Placement {
            from(getenv(environmentVariable).map { String(cString: $0) }, cpus: usableCPUs())
        }

        /// The CPUs the calling thread may run on, lowest first (none when they cannot be read).
        static func usableCPUs() -> [Int32] {
            var cpus = [Int32](repeating: 0, count: 8192)
            let count = cpus.withUnsafeMutableBufferPointer { dax_usable_cpu_list($0.baseAddress, Int32($0.count)) }
            return Array(cpus.prefix(Int(max(0, min(count, 8192)))))
        }
    }

    /// The process-wide instance, or why userfaultfd is not available to this process.
    static let shared: Result<UserFaults, DAXError> = {
        let placement = Placement.single("one handler thread for the process")
        return make(calls: .live, spin: Spin.fromEnvironment(for: placement).nanoseconds, placement: placement)
    }()

    /// A new instance, or why userfaultfd is not available.
    static func make(calls: SystemCalls, spin: Int = 0, placement: Placement = .single("")) -> Result<
        UserFaults, DAXError
    > {
        do {
            return .success(try UserFaults(calls: calls, spin: spin, placement: placement))
        } catch let error as DAXError {
            return .failure(error)
        } catch {
            return .failure(DAXError(.unsupported, "cannot set up userfaultfd: \(error)"))
        }
    }

    let fd: Int32
    let reach: Reach
    /// Nanoseconds the thread polls for the next fault before it sleeps (``Spin``).
    let spin: Int
    /// Written to stop the thread.
    private let stopFD: Int32
    private let calls: SystemCalls
    /// Registered ranges, sorted by start, disjoint.
    private let registrations = Mutex<[Registration]>([])
    /// Faults handled, for tests and statistics.
    let faultsHandled = Atomic<Int>(0)
    /// Where the threads run.
    let placement: Placement
    /// The threads, until ``stop()`` joins them.
    private let threads = Mutex<[pthread_t]>([])
    /// Threads that have not ended; the last to end closes the descriptors.
    private let running = Atomic<Int>(0)

    /// How many threads answer faults.
    var threadCount: Int { max(1, placement.cpus.count) }

    /// Opens a userfaultfd through `calls` and starts its threads; use ``shared`` or
    /// ``make(calls:)`` (tests call it with failing calls to see the error).
    init(calls: SystemCalls, spin: Int = 0, placement: Placement = .single("")) throws {
        self.calls = calls
        self.spin = max(0, spin)
        self.placement = placement
        var fd: Int32 = -1
        var reach = Reach.full
        let device = calls.open("/dev/userfaultfd", O_RDWR | O_CLOEXEC, 0)
        if device >= 0 {
            // Non-blocking: a fault that poll reported may be woken (resolved) before it is read.
            var flags = Int32(O_CLOEXEC | O_NONBLOCK)
            fd = withUnsafeMutablePointer(to: &flags) {
                calls.ioctl(device, UInt(dax_USERFAULTFD_IOC_NEW), UnsafeMutableRawPointer($0))
            }
            _ = calls.close(device)
        }
        if fd < 0 { fd = calls.userfaultfd(O_CLOEXEC | O_NONBLOCK) }
        if fd < 0 {
            fd = calls.userfaultfd(O_CLOEXEC | O_NONBLOCK | Int32(dax_UFFD_USER_MODE_ONLY))
            reach = .userModeOnly
        }
        guard fd >= 0 else {
            throw DAXError.system(
                "userfaultfd",
                "cannot handle faults in user space: neither /dev/userfaultfd nor the userfaultfd system call "
                    + "is available to this process (it needs access to /dev/userfaultfd, CAP_SYS_PTRACE, or "
                    + "vm.unprivileged_userfaultfd=1)",
                errno: errno)
        }
        var api = uffdio_api()
        api.api = UInt64(dax_UFFD_API)
        api.features = UInt64(dax_UFFD_FEATURE_WP_HUGETLBFS_SHMEM) | UInt64(dax_UFFD_FEATURE_THREAD_ID)
        guard withUnsafeMutablePointer(to: &api, { calls.ioctl(fd, dax_UFFDIO_API, UnsafeMutableRawPointer($0)) }) == 0
        else {
            let code = errno
            _ = calls.close(fd)
            throw DAXError.system(
                "ioctl(UFFDIO_API)",
                "cannot handle faults in user space: the kernel's userfaultfd has no write-protect mode for "
                    + "shared memory (UFFD_FEATURE_WP_HUGETLBFS_SHMEM needs Linux 5.19 or later)",
                errno: code)
        }
        let stopFD = dax_eventfd()
        guard stopFD >= 0 else {
            let code = errno
            _ = calls.close(fd)
            throw DAXError.system("eventfd", "cannot make the stop signal of a fault handler thread", errno: code)
        }
        self.fd = fd
        self.reach = reach
        self.stopFD = stopFD
        let cpus: [Int32?] = placement.cpus.isEmpty ? [nil] : placement.cpus.map { $0 }
        var started: [pthread_t] = []
        for cpu in cpus {
            running.wrappingAdd(1, ordering: .sequentiallyConsistent)
            let box = Unmanaged.passRetained(Start(faults: self, cpu: cpu)).toOpaque()
            var thread = pthread_t()
            let result = pthread_create(
                &thread, nil,
                { argument in
                    let start = Unmanaged<Start>.fromOpaque(argument!).takeRetainedValue()
                    // Bound where the placement says; if the CPU was taken away meanwhile, the
                    // thread runs unbound, which answers faults all the same.
                    if let cpu = start.cpu { _ = dax_bind_to_cpu(cpu) }
                    start.faults.serve()
                    return nil
                }, box)
            guard result == 0 else {
                Unmanaged<Start>.fromOpaque(box).release()
                running.wrappingSubtract(1, ordering: .sequentiallyConsistent)
                threads.withTrackedLock { $0 = started }
                if started.isEmpty {
                    _ = calls.close(fd)
                    _ = calls.close(stopFD)
                } else {
                    stop()
                }
                throw DAXError(.unsupported, "cannot start a fault handler thread: error \(result)")
            }
            started.append(thread)
        }
        threads.withTrackedLock { $0 = started }
        Self.instances.withTrackedLock { $0[ObjectIdentifier(self)] = WeakInstance(faults: self) }
    }

    /// What a new thread needs: the instance, and the CPU to bind itself to.
    private final class Start {
        let faults: UserFaults
        let cpu: Int32?
        init(faults: UserFaults, cpu: Int32?) {
            self.faults = faults
            self.cpu = cpu
        }
    }

    /// Stops the threads, the last of which closes the descriptor as it ends; idempotent. Waits
    /// for them, except for the calling thread when it is one of them (a handler that dropped the
    /// last use of a file system). Every range registered here must be unmapped by then: a fault
    /// that arrives later is the kernel's to handle.
    func stop() {
        let taken = threads.withTrackedLock { threads in
            defer { threads = [] }
            return threads
        }
        guard !taken.isEmpty else { return }
        _ = Self.instances.withTrackedLock { $0.removeValue(forKey: ObjectIdentifier(self)) }
        // The eventfd stays readable: every thread sees it.
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(stopFD, $0.baseAddress, 8) }
        for thread in taken {
            if pthread_equal(thread, pthread_self()) != 0 {
                pthread_detach(thread)
            } else {
                pthread_join(thread, nil)
            }
        }
    }

    /// Registers `length` bytes at `address` (page-aligned, a mapping of this process) for `modes`;
    /// faults there call `handler` on the fault thread. Calls `ioctl(UFFDIO_REGISTER)`.
    func register(
        _ address: UnsafeMutableRawPointer, length: Int, modes: Modes,
        handler: @escaping @Sendable (UserFault) -> Void
    ) throws {
        guard registerAgain(address, length: length, modes: modes) else {
            throw DAXError.system(
                "ioctl(UFFDIO_REGISTER)", "cannot register \(length) bytes at \(address) with userfaultfd",
                errno: errno)
        }
        handle(address, length: length, handler: handler)
    }

    /// Sends the faults of `length` bytes at `address` to `handler`, without registering anything
    /// with the kernel (its owner registers each part, with ``registerAgain(_:length:modes:)``, as
    /// it maps it).
    func handle(_ address: UnsafeMutableRawPointer, length: Int, handler: @escaping @Sendable (UserFault) -> Void) {
        let start = UInt(bitPattern: address)
        registrations.withTrackedLock { list in
            Self.remove(start..<(start + UInt(length)), from: &list)
            let entry = Registration(start: start, end: start + UInt(length), handler: handler)
            let index = list.firstIndex { $0.start > start } ?? list.count
            list.insert(entry, at: index)
        }
    }

    /// Every instance in the process that has not stopped, weakly held.
    private static let instances = Mutex<[ObjectIdentifier: WeakInstance]>([:])

    private struct WeakInstance: @unchecked Sendable {
        weak var faults: UserFaults?
    }

    /// Whether any of `length` bytes at `address` has a handler in any instance of the process:
    /// memory whose faults a handler thread answers, which code holding a lock that some handler
    /// takes must not touch (another file system's handler may wait for a lock of this one).
    static func anyHandles(_ address: UnsafeRawPointer, length: Int) -> Bool {
        let all = instances.withTrackedLock { $0.values.compactMap(\.faults) }
        return all.contains { $0.handles(address, length: length) }
    }

    /// Whether any of `length` bytes at `address` has a handler here: memory whose faults this
    /// thread answers, which code holding a lock the handler takes must not touch.
    func handles(_ address: UnsafeRawPointer, length: Int) -> Bool {
        guard length > 0 else { return false }
        let low = UInt(bitPattern: address)
        let high = low + UInt(length)
        return registrations.withTrackedLock { list in list.contains { $0.start < high && $0.end > low } }
    }

    /// Registers `length` bytes at `address` with the kernel again, for `modes`, keeping the
    /// handler already recorded for them: a new mapping made there with `MAP_FIXED` (a block
    /// mapped over a placeholder) has no registration of its own. Returns false (errno set) when
    /// the kernel refuses.
    @discardableResult
    func registerAgain(_ address: UnsafeMutableRawPointer, length: Int, modes: Modes) -> Bool {
        var request = uffdio_register()
        request.range.start = UInt64(UInt(bitPattern: address))
        request.range.len = UInt64(length)
        request.mode = modes.rawValue
        return withUnsafeMutablePointer(to: &request) {
            calls.ioctl(fd, dax_UFFDIO_REGISTER, UnsafeMutableRawPointer($0))
        } == 0
    }

    /// Places a page of zeros at `address` (a missing page of a registered range) and, unless
    /// `waking` is false, wakes the threads faulting there: `UFFDIO_COPY`, write-protected when
    /// `writeProtect` (the range must be registered for write-protect faults), so that a store
    /// still faults. Returns false (errno set) on failure; `EEXIST` means something is there already.
    @discardableResult
    func placeZeros(at address: UInt, writeProtect: Bool, waking: Bool = true) -> Bool {
        var request = uffdio_copy()
        request.dst = UInt64(address)
        request.src = UInt64(UInt(bitPattern: Self.zeros))
        request.len = UInt64(Self.pageSize)
        request.mode = writeProtect ? UInt64(dax_UFFDIO_COPY_MODE_WP) : 0
        if !waking { request.mode |= UInt64(dax_UFFDIO_COPY_MODE_DONTWAKE) }
        return withUnsafeMutablePointer(to: &request) {
            calls.ioctl(fd, dax_UFFDIO_COPY, UnsafeMutableRawPointer($0))
        } == 0
    }

    /// Maps the kernel's shared zero page at `address` (a missing page of a registered anonymous
    /// range) and wakes the threads faulting there: `UFFDIO_ZEROPAGE`. A store there would copy it
    /// without a fault, so only read-only ranges use it. Returns false (errno set) on failure.
    @discardableResult
    func placeZeroPage(at address: UInt, waking: Bool = true) -> Bool {
        var request = uffdio_zeropage()
        request.range.start = UInt64(address)
        request.range.len = UInt64(Self.pageSize)
        request.mode = waking ? 0 : UInt64(dax_UFFDIO_ZEROPAGE_MODE_DONTWAKE)
        return withUnsafeMutablePointer(to: &request) {
            calls.ioctl(fd, dax_UFFDIO_ZEROPAGE, UnsafeMutableRawPointer($0))
        } == 0
    }

    /// A page of zeros, the source of ``placeZeros(at:writeProtect:)``.
    private nonisolated(unsafe) static let zeros: UnsafeMutableRawPointer = {
        let page = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize)
        page.initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
        return page
    }()

    /// Sends `signal` to the faulting thread `fault.thread` (SIGBUS for a fault that cannot be
    /// resolved); it takes the signal once woken.
    func signal(_ signal: Int32, to fault: UserFault) {
        _ = dax_tgkill(fault.thread, signal)
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
    /// `waking` false leaves the threads waiting there for a later ``wake(_:length:)``.
    @discardableResult
    func writeProtect(_ address: UnsafeMutableRawPointer, length: Int, _ protect: Bool, waking: Bool = true) -> Bool {
        var request = uffdio_writeprotect()
        request.range.start = UInt64(UInt(bitPattern: address))
        request.range.len = UInt64(length)
        request.mode = protect ? UInt64(dax_UFFDIO_WRITEPROTECT_MODE_WP) : 0
        if !waking { request.mode |= UInt64(dax_UFFDIO_WRITEPROTECT_MODE_DONTWAKE) }
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

    /// A fault thread: waits for a fault or the stop signal, reads each fault and calls the
    /// handler of its range. A fault with no handler (its range was forgotten while the fault was
    /// queued) is woken to retry as is. Every thread is woken by each fault; one reads it, the
    /// others find nothing (`EAGAIN`) and wait again.
    private func serve() {
        while true {
            let ready = dax_wait_readable(fd, stopFD, spin)
            if ready == 0 {
                if running.subtract(1, ordering: .sequentiallyConsistent).newValue == 0 {
                    _ = calls.close(fd)
                    _ = calls.close(stopFD)
                }
                return
            }
            if ready < 0 {
                if errno == EINTR { continue }
                preconditionFailure("poll of a userfaultfd failed: errno \(errno)")
            }
            var address: UInt64 = 0
            var flags: UInt64 = 0
            var faulting: UInt32 = 0
            let got = calls.readUserFault(fd, &address, &flags, &faulting)
            if got < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                preconditionFailure("userfaultfd read failed: errno \(errno)")
            }
            guard got == 1 else { continue }
            let fault = UserFault(
                address: UInt(address) & ~UInt(Self.pageSize - 1),
                isWrite: flags & UInt64(dax_UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                isWriteProtect: flags & UInt64(dax_UFFD_PAGEFAULT_FLAG_WP) != 0,
                thread: Int32(bitPattern: faulting))
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
