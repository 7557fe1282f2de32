import Glibc
import Synchronization

/// A file system's fault handler: the userfaultfd its DAX mappings are registered with, the
/// threads that answer their faults, and what they have answered. Started at mount, stopped at
/// unmount (or when the file system is dropped). See `docs/faults.md`.
final class FaultHandler: Sendable {
    /// The userfaultfd; nil when the process has none (``handling`` says why).
    let faults: UserFaults?
    /// What ``DAXFileSystem/faultHandling`` reports.
    let handling: FaultHandling
    /// One sentence on the mode in effect: which accesses are resolved, or why none are.
    let detail: String

    let zeroPage = Atomic<Int>(0)
    let allocating = Atomic<Int>(0)
    let copyOnWrite = Atomic<Int>(0)
    let sigbus = Atomic<Int>(0)

    /// The environment variable that turns fault handling off (`off` or `0`): mappings are then
    /// populated when they are made, as without userfaultfd.
    static let environmentSwitch = "DAX_FAULT_HANDLING"

    /// A handler whose userfaultfd is opened through `calls`, unless the environment turns it off.
    init(calls: SystemCalls) {
        if let value = getenv(Self.environmentSwitch).map({ String(cString: $0) }), value == "off" || value == "0" {
            faults = nil
            let reason = "turned off by \(Self.environmentSwitch)=\(value)"
            handling = .unavailable(reason: reason)
            detail = reason + "; " + Self.withoutHandler
            return
        }
        let placement = UserFaults.Placement.fromEnvironment()
        let spin = UserFaults.Spin.fromEnvironment(for: placement)
        let threads = placement.description + "; " + spin.description
        switch UserFaults.make(calls: calls, spin: spin.nanoseconds, placement: placement) {
        case .success(let faults):
            self.faults = faults
            handling = .userfaultfd
            switch faults.reach {
            case .full:
                detail =
                    "userfaultfd in full mode: loads and stores from user code and from the kernel (read(2) into "
                    + "a mapping) are resolved; " + threads
            case .userModeOnly:
                detail =
                    "userfaultfd in user-mode-only mode (no access to /dev/userfaultfd, no CAP_SYS_PTRACE): loads "
                    + "and stores from user code are resolved; a kernel access to a hole, such as read(2) into "
                    + "it, fails with EFAULT; " + threads
            }
        case .failure(let error):
            faults = nil
            handling = .unavailable(reason: error.message)
            detail = error.message + "; " + Self.withoutHandler
        }
    }

    private static let withoutHandler =
        "mappings are populated when they are made: a writable mapping gives its holes blocks, a read-only one "
        + "shows them as the zero page, and pages cut away raise SIGBUS until the mapping is dropped"

    /// Stops the threads and closes the userfaultfd. Idempotent. No mapping may be left (unmount
    /// refuses while one is).
    func stop() { faults?.stop() }

    /// The last address space and the file system let go: no mapping is left to fault.
    deinit { faults?.stop() }

    /// What was answered since mount.
    var counts: FaultCounts {
        var counts = FaultCounts()
        counts.zeroPage = zeroPage.load(ordering: .relaxed)
        counts.allocating = allocating.load(ordering: .relaxed)
        counts.copyOnWrite = copyOnWrite.load(ordering: .relaxed)
        counts.sigbus = sigbus.load(ordering: .relaxed)
        return counts
    }
}
