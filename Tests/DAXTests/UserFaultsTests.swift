import Foundation
import Testing

@testable import DAX

@Suite("userfaultfd")
struct UserFaultsTests {
    @Test("without /dev/userfaultfd or the system call, the error says what is missing and why")
    func unavailable() {
        let calls = PMemDevice.Options.withoutUserfaultfd.systemCalls
        let error = expectDAXError(.permissionDenied) { try UserFaults(calls: calls) }
        #expect(error?.message.contains("vm.unprivileged_userfaultfd") == true)
    }

    @Test("the shared userfaultfd is available here, and tracking a device's pages counts its faults")
    func faultsAreCounted() throws {
        let faults = try UserFaults.shared.get()
        let t = try EmulatedDevice()
        let before = faults.faultsHandled.load(ordering: .relaxed)
        store(1, t.device, at: 8 * 4096)
        store(2, t.device, at: 9 * 4096)
        store(3, t.device, at: 9 * 4096 + 8)  // the same page: no second fault
        #expect(faults.faultsHandled.load(ordering: .relaxed) - before >= 2)
        #expect(t.device.unpersistedRanges().count == 3)
    }

    @Test("the handler polls 100 µs by default, what DAX_FAULT_SPIN_US asks within 0...10000, and not on one CPU")
    func spinFromTheEnvironment() {
        let unset = UserFaults.Spin.from(nil, cpus: 2)
        #expect(unset.nanoseconds == 100_000)
        #expect(unset.description == "the handler thread polls for 100 µs after each fault before it sleeps")
        #expect(UserFaults.Spin.from("250", cpus: 8).nanoseconds == 250_000)
        #expect(UserFaults.Spin.from("10000", cpus: 2).nanoseconds == 10_000_000)
        let off = UserFaults.Spin.from("0", cpus: 2)
        #expect(off.nanoseconds == 0)
        #expect(off.description.contains("DAX_FAULT_SPIN_US=0"))
        for bad in ["", "abc", "-5", "10001", "1e3", " 50"] {
            let spin = UserFaults.Spin.from(bad, cpus: 2)
            #expect(spin.nanoseconds == 100_000, "\(bad)")
            #expect(spin.description.contains("DAX_FAULT_SPIN_US=\(bad) is not a whole number"), "\(bad)")
        }
        let oneCPU = UserFaults.Spin.from("500", cpus: 1)
        #expect(oneCPU.nanoseconds == 0)
        #expect(oneCPU.description.contains("one CPU"))
    }

    @Test("a mounted file system reports the spin its handler thread uses, in the detail too")
    func fileSystemReportsItsSpin() throws {
        let t = try TemporaryFileSystem(name: "spin")
        guard t.fs.faultHandling == .userfaultfd else { return }
        let expected = UserFaults.Spin.fromEnvironment()
        #expect(t.fs.faultHandlerSpin == .nanoseconds(expected.nanoseconds))
        #expect(t.fs.faultHandlingDetail.hasSuffix(expected.description))
        // Faults are answered while it polls, and unmount stops it while it polls.
        let file = try t.fs.create("/f")
        try file.truncate(to: 4 * 4096)
        let mapping = try file.map(count: 4 * 4096)
        for page in 0..<4 {
            mapping.baseAddress.storeBytes(of: UInt8(page + 1), toByteOffset: page * 4096, as: UInt8.self)
        }
        mapping.unmap()
        #expect(try file.read(count: 1, at: 3 * 4096) == [4])
        #expect(t.fs.statistics().faults.allocating == 4)
        file.close()
        try t.fs.unmount()
    }
}
