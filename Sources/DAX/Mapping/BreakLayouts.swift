import Glibc

/// What truncate and punch do about pages that are still referenced or pinned.
public enum BusyPolicy: Sendable {
    /// Throw `.busy` and change nothing (the EBUSY Doug Ledford asked the kernel for).
    case fail
    /// Sleep until the pins drop, woken by the final unpin; throw `.timedOut` and change nothing
    /// if they do not drop in time.
    case wait(timeout: Duration)
    /// Go on: pinned blocks are freed on the device but quarantined until their last unpin.
    case deferFree
    /// Ask each long-term pin holder in the range to let go (its `onRevoke`), wait up to `grace`,
    /// then revoke the leases that remain. Short-term pins and other references are waited for, up
    /// to `grace` again; leases are revoked only once nothing else holds the pages, so a truncate
    /// that times out (`.timedOut`) has revoked nothing (though the holders were asked), unless its
    /// message says that a reference appeared after the revocation and outlived the grace period.
    case revokeLeases(grace: Duration)
}

extension BusyPolicy {
    /// `.deferFree`: busy pages do not stop the change.
    var goesOnWhenBusy: Bool {
        if case .deferFree = self { return true }
        return false
    }
}

extension DAXFile {
    /// Sets the size. Shrinking frees the blocks past the new end after breaking layouts (DESIGN
    /// section 5): the pages leave every mapping (a later access there faults), and pages that are
    /// still pinned are dealt with as `ifBusy` says. All or nothing: a failure leaves size,
    /// contents and mappings as they were.
    public func truncate(to size: Int, ifBusy policy: BusyPolicy = .wait(timeout: .seconds(30))) throws {
        try Self.checkRange(size, 0, "truncate", path)
        try fileSystem.changeLayout(
            inode, policy: policy, what: "truncate \(Paths.debug(path)) to \(counted(size, "byte"))",
            guarded: { try operation("truncate", writable: true, $0) }
        ) {
            try inode.checkLive(path)
            return try fileSystem.planResize(inode, to: size)
        }
    }

    /// Frees the blocks of the whole pages in `offset..<offset+count` and zeroes the partial pages
    /// at its edges; the size does not change. Busy pages are handled as for ``truncate(to:ifBusy:)``.
    public func punchHole(offset: Int, count: Int, ifBusy policy: BusyPolicy = .wait(timeout: .seconds(30))) throws {
        try Self.checkRange(offset, count, "punch a hole in", path)
        guard count > 0 else { return try operation("punch a hole in", writable: true) {} }
        try fileSystem.changeLayout(
            inode, policy: policy, what: "punch \(offset)..<\(offset + count) of \(Paths.debug(path))",
            guarded: { try operation("punch a hole in", writable: true, range: (offset, count), $0) }
        ) {
            try inode.checkLive(path)
            return try fileSystem.planPunch(inode, offset: offset, count: count)
        }
    }
}

extension DAXFileSystem {
    /// Break layouts, then carry out the layout change `plan` makes (DESIGN section 5):
    /// 1. take the invalidate lock: no new mapping or slow pin starts;
    /// 2. detach the pages from every live mapping and bump the layout generation, so that a pin
    ///    racing in backs off (the gup-fast rule, `docs/pinning.md`);
    /// 3. scan the pages for references beyond their mappings and for pins;
    /// 4. act on `policy` if any are busy;
    /// 5. commit, replace the pages in the mappings by faulting ones, release the blocks.
    ///
    /// Each attempt runs inside `guarded` (the file operation's checks and the operations lock);
    /// waiting for pins happens between attempts, outside it, so that a pending `unmount` does not
    /// hold up every other file operation behind the wait, and a lease holder can use the file
    /// system to let go.
    func changeLayout(
        _ inode: Inode, policy: BusyPolicy, what: String,
        guarded: (() throws -> [UInt64]) throws -> [UInt64],
        plan: () throws -> LayoutChange
    ) throws {
        let started = ContinuousClock.now
        /// When the lease holders were asked to let go plus the grace period (`.revokeLeases`).
        var graceEnd: ContinuousClock.Instant?
        /// Whether leases were revoked (`.revokeLeases`): a later failure must say so.
        var revoked = false
        while true {
            // Not escaping in fact; the compiler cannot tell that `guarded` does not call `plan`.
            let busy = try withoutActuallyEscaping(plan) { plan in
                let deadline = graceEnd
                return try guarded {
                    try attemptLayoutChange(
                        inode, policy: policy, what: what, graceEnd: deadline, revoked: &revoked, plan: plan)
                }
            }
            if busy.isEmpty { return }
            switch policy {
            case .fail:
                throw DAXError(
                    .busy,
                    "cannot \(what): \(countedAre(busy.count, "page")) pinned or referenced, the first is "
                        + "pfn \(busy[0]) (\(device.pages.state(of: PageFrameNumber(rawValue: busy[0]))))")
            case .deferFree:
                preconditionFailure("deferFree never waits")
            case .wait(let timeout):
                let deadline = started + timeout
                guard ContinuousClock.now < deadline,
                    device.pages.waitUntil(
                        busy, deadline: Deadline(after: deadline - ContinuousClock.now),
                        PageWord.isIdleExceptMappings)
                else {
                    throw timedOut(what, busyFrames(busy), "waited \(timeout)")
                }
            case .revokeLeases(let grace):
                if graceEnd == nil {
                    graceEnd = ContinuousClock.now + grace
                    // Asked without holding any lock: a holder may use the file to let go.
                    for lease in device.pages.leases(where: Set(busy).contains) { lease.requestRelease() }
                }
                if ContinuousClock.now < graceEnd! {
                    // Until the grace ends, for the holders to let go.
                    _ = device.pages.waitUntil(
                        busy, deadline: Deadline(after: graceEnd! - ContinuousClock.now),
                        PageWord.isIdleExceptMappings)
                } else {
                    // After it, one more grace period for what no revocation can take away.
                    let leasePins = device.pages.leasePins(on: busy)
                    _ = device.pages.waitUntil(
                        busy, deadline: Deadline(after: graceEnd! + grace - ContinuousClock.now)
                    ) { frame, word in PageWord.isIdleExceptMappingsAndLeases(word, leasePins: leasePins[frame] ?? 0) }
                }
            }
        }
    }

    /// One attempt of ``changeLayout(_:policy:what:guarded:plan:)``: carries the change out and
    /// returns no frames, or puts everything back and returns the busy frames to wait for.
    private func attemptLayoutChange(
        _ inode: Inode, policy: BusyPolicy, what: String, graceEnd: ContinuousClock.Instant?,
        revoked: inout Bool, plan: () throws -> LayoutChange
    ) throws -> [UInt64] {
        // Mappings found under the locks stay referenced until after the unlock: if one held the
        // last reference, its deinit (unmap, perhaps freeing an orphan) would need these locks.
        var held: [DAXMapping] = []
        defer { withExtendedLifetime(held) {} }
        inode.invalidateLock.lockForWriting()
        inode.lock.lockForWriting()
        defer {
            inode.lock.unlock()
            inode.invalidateLock.unlock()
        }

        let layout = try plan()
        // The plan may have taken leaf blocks: every way out that does not carry it out gives them back.
        var carriedOut = false
        defer { if !carriedOut { abandon(layout.change) } }
        guard layout.changesMappings else {
            try carryOut(layout, on: inode) {}
            carriedOut = true
            return []
        }
        held = inode.liveMappings.compactMap { $0 as? DAXMapping }
        let mappings = held.filter { $0.detach(layout.unmappedPages, cut: layout.cutPages) }
        inode.layoutGeneration.wrappingAdd(1, ordering: .sequentiallyConsistent)
        let frames = layout.change.freed.flatMap { Array($0.range) }
        var busy = busyFrames(frames)

        if !busy.isEmpty, case .revokeLeases(let grace) = policy, let end = graceEnd, ContinuousClock.now >= end {
            // The grace period is over. Revoke the leases only if that leaves every page idle: with
            // short-term pins still there the change may yet time out, and a failed truncate must
            // not have cut the holders off. (No lease can start now: the invalidate lock is held.)
            let leasePins = device.pages.leasePins(on: busy)
            let table = device.pages.table
            let onlyLeases = busy.allSatisfy {
                PageWord.isIdleExceptMappingsAndLeases(
                    table.descriptor($0).pointee.counts.load(ordering: .sequentiallyConsistent),
                    leasePins: leasePins[$0] ?? 0)
            }
            if onlyLeases {
                // Revocation waits for a DMA access in flight, then drops the pin's counts.
                for lease in device.pages.leases(where: Set(busy).contains) where lease.revoke() { revoked = true }
                busy = waitOutTransientReferences(busyFrames(busy))
            }
            if !busy.isEmpty, ContinuousClock.now >= end + grace {
                restore(mappings, inode)
                throw timedOut(
                    what, busy,
                    revoked
                        ? "references outlived the grace period after the leases were revoked"
                        : "short-term pins or references outlived the grace period; no lease was revoked")
            }
        }
        if busy.isEmpty || policy.goesOnWhenBusy {
            do {
                try carryOut(layout, on: inode) { for mapping in mappings { mapping.zapDetached() } }
            } catch {
                restore(mappings, inode)
                throw error
            }
            carriedOut = true
            return []
        }

        // Busy, and the policy says not to go on now: put everything back.
        restore(mappings, inode)
        return busy
    }

    /// After a revocation, with the invalidate lock held, no pin or mapping of the pages can
    /// start; what still holds one is a pinner backing off (gup-fast saw the old layout) or
    /// another transient get. Wait those out here rather than fail after cutting holders off.
    private func waitOutTransientReferences(_ frames: [UInt64]) -> [UInt64] {
        var busy = frames
        let deadline = ContinuousClock.now + .milliseconds(100)
        while !busy.isEmpty, ContinuousClock.now < deadline {
            sched_yield()
            busy = busyFrames(busy)
        }
        return busy
    }

    private func restore(_ mappings: [DAXMapping], _ inode: Inode) {
        for mapping in mappings { mapping.restore() }
        inode.layoutGeneration.wrappingAdd(1, ordering: .sequentiallyConsistent)
    }

    /// Frames referenced beyond their mappings, or pinned. Sequentially consistent loads: the
    /// argument of `docs/pinning.md` (R3 follows R2 in the total order) needs them.
    func busyFrames(_ frames: [UInt64]) -> [UInt64] {
        let table = device.pages.table
        return frames.filter {
            !PageWord.isIdleExceptMappings(table.descriptor($0).pointee.counts.load(ordering: .sequentiallyConsistent))
        }
    }

    private func timedOut(_ what: String, _ busy: [UInt64], _ why: String) -> DAXError {
        DAXError(
            .timedOut,
            "cannot \(what): \(counted(busy.count, "page")) stayed pinned (\(why))"
                + (busy.first.map { ", the first is pfn \($0)" } ?? ""))
    }
}
