extension PageMap {
    /// The frames of `frames` that something holds beyond the mappings that show them: a pin, or
    /// a reference that is not a mapping's (break layouts' scan). Sequentially consistent loads:
    /// the argument of `docs/pinning.md` (the scan follows the detach in the total order) needs
    /// them.
    func busyFrames(_ frames: [UInt64]) -> [UInt64] {
        frames.filter {
            !PageWord.isIdleExceptMappings(table.descriptor($0).pointee.counts.load(ordering: .sequentiallyConsistent))
        }
    }

    /// Whether long-term pins (leases) are all that holds `frames` beyond their mappings, so that
    /// revoking the leases would leave every one idle.
    func onlyLeasesHold(_ frames: [UInt64]) -> Bool {
        let leasePins = leasePins(on: frames)
        return frames.allSatisfy {
            PageWord.isIdleExceptMappingsAndLeases(
                table.descriptor($0).pointee.counts.load(ordering: .sequentiallyConsistent),
                leasePins: leasePins[$0] ?? 0)
        }
    }
}
