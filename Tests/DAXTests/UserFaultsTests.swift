import CLibPMem
import Foundation
import Synchronization
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

    @Test("threads bound one to each CPU do not poll unless DAX_FAULT_SPIN_US asks them to")
    func spinOfThreadsBoundToCPUs() {
        let unset = UserFaults.Spin.from(nil, cpus: 2, perCPU: true)
        #expect(unset.nanoseconds == 0)
        #expect(unset.description == "each handler thread sleeps between faults, woken on its own CPU")
        #expect(UserFaults.Spin.from("250", cpus: 2, perCPU: true).nanoseconds == 250_000)
        #expect(UserFaults.Spin.from("abc", cpus: 2, perCPU: true).nanoseconds == 100_000)
    }

    @Test("a thread per CPU where the process may use 2 to 4, one otherwise, as DAX_FAULT_THREADS says")
    func placementFromTheEnvironment() {
        typealias Placement = UserFaults.Placement
        #expect(Placement.from(nil, cpus: [0, 1]).cpus == [0, 1])
        #expect(Placement.from(nil, cpus: [3, 5, 6, 7]).cpus == [3, 5, 6, 7])
        #expect(
            Placement.from(nil, cpus: [0, 1]).description
                == "2 handler threads, one bound to each CPU the process may use")
        let one = Placement.from(nil, cpus: [2])
        #expect(one.cpus.isEmpty)
        #expect(one.description == "one handler thread: the process has one CPU")
        let many = Placement.from(nil, cpus: Array(0..<8))
        #expect(many.cpus.isEmpty)
        #expect(many.description.contains("8 CPUs, more than 4"))
        let asked = Placement.from("1", cpus: [0, 1])
        #expect(asked.cpus.isEmpty)
        #expect(asked.description.contains("DAX_FAULT_THREADS=1"))
        #expect(Placement.from("per-cpu", cpus: Array(0..<8)).cpus == Array(0..<8))
        #expect(Placement.from("per-cpu", cpus: Array(0..<100)).cpus.count == Placement.mostThreads)
        #expect(Placement.from("per-cpu", cpus: [4]).cpus.isEmpty)
        for bad in ["", "2", "percpu", "PER-CPU"] {
            let placement = Placement.from(bad, cpus: [0, 1])
            #expect(placement.cpus == [0, 1], "\(bad)")
            #expect(placement.description.contains("DAX_FAULT_THREADS=\(bad) is neither 1 nor per-cpu"), "\(bad)")
        }
        let usable = Placement.usableCPUs()
        #expect(usable.count == Int(dax_usable_cpus()))
        #expect(usable == usable.sorted())
    }

    @Test("with a thread per CPU, a fault is answered while another thread's answer waits, on a CPU of its own")
    func threadsPerCPUAnswerFaultsTogether() throws {
        let cpus = UserFaults.Placement.usableCPUs()
        guard cpus.count >= 2 else { return }
        let placement = UserFaults.Placement(cpus: Array(cpus.prefix(2)), description: "two")
        let faults = try UserFaults(calls: .live, spin: 0, placement: placement)
        defer { faults.stop() }
        #expect(faults.threadCount == 2)
        let pages = 2
        let length = pages * UserFaults.pageSize
        let region = try #require(
            mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0))
        defer { munmap(region, length) }
        // The first fault's answer waits until the second fault has been answered: one thread
        // alone would never get to the second.
        let secondAnswered = DispatchSemaphore(value: 0)
        let handlerCPUs = Mutex<[Int: Int32]>([:])
        let base = UInt(bitPattern: region)
        try faults.register(region, length: length, modes: .missing) { fault in
            let page = Int(fault.address - base) / UserFaults.pageSize
            handlerCPUs.withTrackedLock { $0[page] = dax_current_cpu() }
            if page == 0 {
                _ = secondAnswered.wait(timeout: .now() + 20)
                faults.placeZeros(at: fault.address, writeProtect: false)
            } else {
                faults.placeZeros(at: fault.address, writeProtect: false)
                secondAnswered.signal()
            }
        }
        let firstLoaded = DispatchSemaphore(value: 0)
        let loads = Mutex<[Int: UInt8]>([:])
        Thread.detachNewThread {
            let value = UnsafeRawPointer(bitPattern: base)!.load(as: UInt8.self)
            loads.withTrackedLock { $0[0] = value }
            firstLoaded.signal()
        }
        // The second load starts once the first fault is in its handler.
        spinUntil { handlerCPUs.withTrackedLock { $0[0] != nil } }
        let second = region.load(fromByteOffset: UserFaults.pageSize, as: UInt8.self)
        #expect(firstLoaded.wait(timeout: .now() + 20) == .success)
        #expect(second == 0)
        #expect(loads.withTrackedLock { $0[0] } == 0)
        let ran = handlerCPUs.withTrackedLock { $0 }
        #expect(ran.count == 2)
        // Each answer ran on a thread bound to a CPU of the placement, and not the same one.
        #expect(Set(ran.values).isSubset(of: Set(placement.cpus)))
        #expect(ran[0] != ran[1])
        #expect(faults.faultsHandled.load(ordering: .relaxed) == 2)
    }

    @Test("a mounted file system reports its handler threads and their spin, in the detail too")
    func fileSystemReportsItsSpin() throws {
        let t = try TemporaryFileSystem(name: "spin")
        guard t.fs.faultHandling == .userfaultfd else { return }
        let placement = UserFaults.Placement.fromEnvironment()
        let expected = UserFaults.Spin.fromEnvironment(for: placement)
        #expect(t.fs.faultHandlerSpin == .nanoseconds(expected.nanoseconds))
        #expect(t.fs.faultHandlerThreads == max(1, placement.cpus.count))
        #expect(t.fs.faultHandlingDetail.hasSuffix(placement.description + "; " + expected.description))
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
