import DAX
import Foundation
import Testing

@Suite("README")
struct ReadmeTests {
    /// The first example of README.md, on a device at `path`, checking its comments; it ends
    /// with the mapping still mapped, as the second example continues it.
    static func firstExample(at path: String) throws -> (device: PMemDevice, fs: DAXFileSystem, mapping: DAXMapping) {
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
        return (device, fs, mapping)
    }

    @Test("the README's example runs and does what its comments say")
    func readmeExample() throws {
        let path = "/dev/shm/mystore-\(getpid())"
        defer { unlink(path) }
        // The example of README.md, with its path made unique.
        let (device, fs, mapping) = try Self.firstExample(at: path)
        mapping.unmap()
        try fs.unmount()
        device.close()
    }

    @Test("the README's second example runs after the first, as written, and does what its comments say")
    func readmeSecondExample() throws {
        let path = "/dev/shm/mystore2-\(getpid())"
        defer { unlink(path) }
        // The first example, as the second continues it.
        let (device, fs, mapping) = try Self.firstExample(at: path)

        // The second, line by line.
        let store = try fs.openOrCreate("/store") { try $0.allocate(offset: 0, count: 1 << 20) }
        let draft = try fs.createUnnamed(in: "/")
        try draft.write(Array("draft".utf8), at: 0)
        try fs.link(draft, at: "/draft", replacing: true)

        let storeMapping = try store.map(count: 1 << 20)
        let frames = try storeMapping.withPin(offset: 0, count: 4096) { pin in pin.frames }
        let lease = try storeMapping.pin(offset: 0, count: 4096, lifetime: .longTerm(releasing: { $0.release() }))
        #expect(frames == [try store.frames(offset: 0, count: 1)[0]!])
        let isLease = lease.isLongTerm
        #expect(isLease)

        let result = try store.migrate(offset: 0, count: store.size)
        #expect(result == MigrationResult(migrated: 255, busy: [0]))

        try fs.clone("/store", to: "/store.snap")
        #expect(try store.blockReferences(offset: 4096, count: 4096) == [2])
        #expect(try store.blockReferences(offset: 0, count: 4096) == [1], "the pinned page was copied")
        let copy = try fs.create("/copy")
        try copy.write(try store.read(count: 1 << 20, at: 0), at: 0)
        let merged = try fs.deduplicate("/store", offset: 0, "/copy", offset: 0, count: 1 << 20)
        #expect(merged == (1 << 20) - 4096)

        lease.release()
        storeMapping.unmap()
        mapping.unmap()
        try fs.unmount()
        var readOnly = PMemDevice.Options()
        readOnly.readOnly = true
        let reader = try DAXFileSystem.mount(
            try PMemDevice.open(path: device.path, options: readOnly), access: .readOnly)
        #expect(try reader.open("/draft", access: .readOnly).read(count: 5, at: 0) == Array("draft".utf8))
        #expect(try reader.contentsOfDirectory("/") == ["copy", "draft", "journal", "store", "store.snap"])
        try reader.unmount()
        let report = try DAXFileSystem.repair(device)
        #expect(report.changedNothing)
        device.close()
    }

    @Test("the README shows that example, with the busy policy of every truncate spelled out")
    func readmeShowsTheExample() throws {
        let readme = try String(
            contentsOf: URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
                "../../README.md"), encoding: .utf8)
        #expect(readme.contains("try file.truncate(to: 1 << 20, ifBusy: .fail)"))
        #expect(readme.contains("try file.truncate(to: 0, ifBusy: .deferFree)"))
        #expect(readme.contains("let draft = try fs.createUnnamed(in: \"/\")"))
        #expect(readme.contains("let report = try DAXFileSystem.repair(device)"))
        #expect(readme.contains("let result = try store.migrate(offset: 0, count: store.size)"))
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
