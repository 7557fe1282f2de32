import DAXTorture
import Foundation
import Testing

@testable import DAX

@Suite("Workload against a model")
struct WorkloadTests {
    @Test("a long mixed workload in one process matches its model after every operation")
    func matchesModel() throws {
        let t = try TemporaryFileSystem(size: 32 << 20, name: "workload")
        var workload = Workload(model: Model(), seed: 1)
        let runner = WorkloadRunner(fs: t.fs)
        defer { runner.closeAll() }
        let operations = longTests ? 20_000 : 1500
        for index in 0..<operations {
            let operation = workload.next()
            try runner.perform(operation)
            let actual = try Model(reading: t.fs)
            guard actual.matches(workload.model) else {
                Issue.record("after operation \(index) (\(operation)):\n\(actual)\nexpected\n\(workload.model)")
                return
            }
            if index % 100 == 99 {
                let report = try t.fs.check()
                guard report.isClean else {
                    Issue.record("after operation \(index) (\(operation)): \(report)")
                    return
                }
            }
        }
        runner.closeAll()
        let remounted = try t.remount()
        defer { try? remounted.unmount() }
        #expect(try Model(reading: remounted).matches(workload.model))
        #expect(try remounted.check().isClean)
    }
}
