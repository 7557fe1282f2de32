/// A read-only mount of a damaged file system: what is intact can be read, what is damaged is
/// named in the errors of the operations that reach it.
struct Damage: Sendable {
    /// What `check` would report, one sentence each.
    var problems: [String] = []
    /// Inodes in use that cannot be loaded, and why.
    var inodes: [UInt32: String] = [:]
}

extension Volume {
    /// What to do about damage, said wherever a mount refuses it.
    static let repairAdvice =
        "run `daxemu fsck --repair` (DAXFileSystem.repair) to repair it, or mount it read-only to read what is intact"

    /// The read-only mount: like the read-write one, but damage that leaves the root directory
    /// readable is kept in ``damage`` instead of refused. Nothing is written: a committed
    /// transaction is refused (a read-write mount must replay it), a damaged journal is ignored.
    static func mountDegradable(_ device: PMemDevice) throws -> (Volume, Namespace) {
        let (sb, primaryDamage) = try Superblock.locate(base: device.base, deviceBlocks: UInt64(device.pageCount))
        var problems: [String] = []
        var sequence: UInt64 = 0
        do {
            switch try Journal.read(device: device, superblock: sb) {
            case .empty(let last): sequence = last
            case .tornHeader: break
            case .committed:
                throw DAXError(
                    .permissionDenied,
                    "the journal holds a committed transaction (a crash) that only a read-write mount "
                        + "can replay; mount read-write once, or check the device offline")
            }
        } catch let error as DAXError where error.code == .corrupted {
            problems.append("journal: \(error.message)")
        }
        let scan = Scanner.scan(device: device, superblock: sb, journalMustBeEmpty: false, primaryDamage: primaryDamage)
        guard scan.inodes[Superblock.rootInode]?.record.kind == .directory else {
            throw DAXError(
                .corrupted,
                "file system on \(device.path) is damaged: its root directory cannot be read ("
                    + (scan.damagedInodes[Superblock.rootInode] ?? "it is not a directory")
                    + "), so nothing can be; run `daxemu fsck --repair` (DAXFileSystem.repair) to repair it")
        }
        problems += scan.problems
        if scan.suppressed > 0 { problems.append("and \(scan.suppressed) more problems") }
        return assemble(
            device: device, access: .readOnly, superblock: sb,
            journal: Journal(device: device, superblock: sb, sequence: sequence), scan: scan,
            damage: Damage(problems: problems, inodes: scan.damagedInodes))
    }
}

extension Namespace {
    /// Why `name` is not among `directory`'s entries when damage may explain it: the entry names
    /// a damaged inode, or one of the directory's blocks is damaged. Nil: the name is not there.
    func damageHiding(_ name: [UInt8], in directory: Inode.Contents, path: String) -> DAXError? {
        guard let index = directory.directory else { return nil }
        if let number = index.damagedEntries[name] {
            let reason = volume.damage.inodes[number].map { " (\($0))" } ?? ""
            return DAXError(
                .corrupted,
                "\(Paths.quoted(path)) is damaged: its inode \(number) cannot be read\(reason); "
                    + "run `daxemu fsck --repair` to drop it")
        }
        guard !index.damage.isEmpty else { return nil }
        return DAXError(
            .corrupted,
            "\(Paths.quoted(path)) is not in directory \(directory.number), which is damaged ("
                + index.damage.prefix(2).joined(separator: "; ") + "): it may have been lost there; "
                + "`daxemu fsck --repair` moves files it cannot place to /lost+found")
    }
}
