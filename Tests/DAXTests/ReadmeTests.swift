import DAX
import Foundation
import Testing

@Suite("README")
struct ReadmeTests {
    @Test("the README's example runs and does what its comments say")
    func readmeExample() throws {
        let path = "/dev/shm/mystore-\(getpid())"
        defer { unlink(path) }
        // The example of README.md, with its path made unique.
        let device = try PMemDevice.create(path: path, size: 64 << 20)
        let fs = try DAXFileSystem.format(device)
        let file = try fs.create("/journal")
        try file.truncate(to: 1 << 20, ifBusy: .fail)

        let mapping = try file.map(count: 1 << 20)
        mapping.baseAddress.storeBytes(of: 42 as UInt64, toByteOffset: 0, as: UInt64.self)
        mapping.persist(offset: 0, count: 8)

        let nic = DMAEngine(device: device)
        let region = nic.register(try mapping.pin(offset: 0, count: 4096))
        try nic.write(Array("from the NIC".utf8), to: region, at: 8)

        try file.truncate(to: 0, ifBusy: .deferFree)
        #expect(fs.statistics().quarantinedBlocks == 1)
        nic.deregister(region)
        #expect(fs.statistics().quarantinedBlocks == 0)
        mapping.unmap()
        try fs.unmount()
        device.close()
    }

    @Test("the README shows that example, with the busy policy of every truncate spelled out")
    func readmeShowsTheExample() throws {
        let readme = try String(
            contentsOf: URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
                "../../README.md"), encoding: .utf8)
        #expect(readme.contains("try file.truncate(to: 1 << 20, ifBusy: .fail)"))
        #expect(readme.contains("try file.truncate(to: 0, ifBusy: .deferFree)"))
        // A truncate without a policy waits 30 s when a page is pinned: none in the README.
        let truncates = readme.split(separator: "\n").filter { $0.contains(".truncate(to:") }
        #expect(truncates.count == 2 && truncates.allSatisfy { $0.contains("ifBusy:") })
    }

    @Test("the docs name no design notes or seed files: they stand on their own")
    func docsStandAlone() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../..")
            .standardized
        var documents = ["README.md", "Sources/DAX/DAX.docc/DAX.md"]
        for folder in ["docs", "examples"] {
            let enumerator = FileManager.default.enumerator(atPath: root.appendingPathComponent(folder).path)
            while let path = enumerator?.nextObject() as? String {
                if path.hasSuffix(".md") { documents.append(folder + "/" + path) }
            }
        }
        #expect(documents.count > 8)
        for document in documents {
            let text = try String(contentsOf: root.appendingPathComponent(document), encoding: .utf8)
            for name in ["DESIGN.md", "API.md", "DESIGN section", "seed 0", "seed `"] {
                #expect(!text.contains(name), "\(document) mentions \(name)")
            }
        }
    }
}
