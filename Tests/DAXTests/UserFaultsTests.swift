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
}
