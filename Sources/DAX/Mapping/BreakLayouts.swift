import Glibc

/// What truncate and punch do about pages that are still referenced or pinned.
public enum BusyPolicy: Sendable {
    /// Throw `.busy` at once and change nothing.
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

extension AddressSpace {
    /// Break layouts, then carry out the layout change that `plan` makes (truncate, punch), in
    /// seven steps:
    /// 1. **plan**: the file system says what changes (blocks freed, pages cut off, the zeroing of
    ///    partial pages), under the invalidate lock, so that no mapping or slow pin starts;
    /// 2. **detach** the pages from every live mapping (they stay mapped and counted for now) and
    ///    bump the layout generation, so that a fast pin racing in backs off (the gup-fast rule,
    ///    `docs/pinning.md`);
    /// 3. **scan the pins**: the page map names the freed pages referenced beyond their mappings
    ///    or pinned;
    /// 4. **apply the policy** if any are busy: put everything back and fail or wait (`.fail`,
    ///    `.wait`), revoke the leases once their grace is over (`.revokeLeases`), or go on
    ///    (`.deferFree`: the busy blocks are quarantined in step 7);
    /// 5. **commit** the change in one journal transaction;
    /// 6. **zap**: the detached pages become pages that fault;
    /// 7. **release** the freed blocks to the allocator (busy ones quarantined until their last
    ///    unpin) and install the new extents.
    ///
    /// `makePlan` gets the file's contents with both locks held (it throws if the file was freed).
    /// Each attempt runs inside `guarded` (the file operation's checks and the operations lock).
    /// Waiting for busy pages happens between attempts, with no lock held, so that a pending
    /// `unmount` does not hold up every other operation behind the wait, and a lease holder can use
    /// the file system to let go.
    func breakLayouts(
        policy: BusyPolicy, what: String, guarded: (() throws -> [UInt64]) throws -> [UInt64],
        plan makePlan: (Inode.Contents) throws -> FileData.TruncatePlan
    ) throws {
        var waiting = BusyWait(policy: policy, what: what)
        while true {
            // Not escaping in fact; the compiler cannot tell that `guarded` does not call it.
            let busy = try withoutActuallyEscaping(makePlan) { makePlan in
                try guarded {
                    try invalidateLock.withWriteLock {
                        try inode.contents.write { (contents) throws -> [UInt64] in
                            // 1. Plan. It may have taken extent-leaf blocks: every way out that
                            //    does not commit it gives them back.
                            var plan = try makePlan(contents)
                            var committed = false
                            defer { if !committed { data.abandon(plan) } }
                            guard plan.changesMappings else {
                                try data.commit(&plan)
                                committed = true
                                data.release(plan, of: &contents)
                                // A truncate up: pages past the old end may be holes now.
                                sizeChanged(&contents)
                                return []
                            }

                            // 2. Detach.
                            let detached = liveMappings.filter { $0.detach(plan.unmappedPages, cut: plan.cutPages) }
                            layoutChanged()
                            func putBack() {
                                for mapping in detached { mapping.restore() }
                                layoutChanged()
                            }

                            // 3. Scan the pins.
                            var busy = device.pages.busyFrames(plan.freedFrames)

                            // 4. Apply the policy.
                            if !busy.isEmpty, waiting.graceIsOver {
                                busy = revokeLeases(holding: busy, &waiting)
                                if !busy.isEmpty, waiting.secondGraceIsOver {
                                    putBack()
                                    throw waiting.timedOut(
                                        busy,
                                        waiting.revoked
                                            ? "references outlived the grace period after the leases were revoked"
                                            : "short-term pins or references outlived the grace period; no lease was revoked"
                                    )
                                }
                            }
                            guard busy.isEmpty || policy.goesOnWhenBusy else {
                                putBack()
                                return busy
                            }

                            // 5. Commit.
                            do {
                                try data.commit(&plan)
                            } catch {
                                putBack()
                                throw error
                            }
                            committed = true

                            // 6. Zap.
                            for mapping in detached { mapping.zapDetached() }

                            // 7. Release; edge pages copied from shared blocks show their copies.
                            data.release(plan, of: &contents)
                            if !plan.copied.isEmpty { show(plan.copied) }
                            keepRacedStores(&contents)
                            return []
                        }
                    }
                }
            }
            if busy.isEmpty { return }
            try waiting.wait(for: busy, on: device.pages)
        }
    }

    /// After the grace period of `.revokeLeases`: revokes the leases on `busy` if that leaves every
    /// page idle (with short-term pins still there the change may yet time out, and a failed
    /// truncate must not have cut the holders off), then waits, woken by each unpin, for what
    /// still backs off. Returns the pages still busy. Invalidate lock held: no lease can start.
    private func revokeLeases(holding busy: [UInt64], _ waiting: inout BusyWait) -> [UInt64] {
        let pages = device.pages
        guard pages.onlyLeasesHold(busy) else { return busy }
        // Revocation waits for a DMA access in flight, then drops the pin's counts.
        for lease in pages.leases(where: Set(busy).contains) where lease.revoke() { waiting.revoked = true }
        // What may still hold a page now is a pinner backing off (gup-fast saw the old layout) or
        // another transient reference: each lets go at once, and its put or unpin wakes this
        // wait, which lasts at most until the end of the second grace period.
        return pages.waitOutTransientReferences(busy, deadline: Deadline(after: waiting.secondGraceLeft))
    }
}

/// How a change that found busy pages waits between attempts, as its ``BusyPolicy`` says.
private struct BusyWait {
    let policy: BusyPolicy
    let what: String
    let started = ContinuousClock.now
    /// When the lease holders were asked to let go, plus the grace period (`.revokeLeases`).
    var graceEnd: ContinuousClock.Instant?
    /// Whether leases were revoked: a later failure must say so.
    var revoked = false

    init(policy: BusyPolicy, what: String) {
        self.policy = policy
        self.what = what
    }

    /// `.revokeLeases` only: the holders were asked and their grace period is over.
    var graceIsOver: Bool {
        guard case .revokeLeases = policy, let graceEnd else { return false }
        return ContinuousClock.now >= graceEnd
    }

    /// `.revokeLeases` only: the second grace period, for what no revocation can take away, is over.
    var secondGraceIsOver: Bool {
        guard case .revokeLeases(let grace) = policy, let graceEnd else { return false }
        return ContinuousClock.now >= graceEnd + grace
    }

    /// What is left of the second grace period (`.revokeLeases`), zero when it is over.
    var secondGraceLeft: Duration {
        guard case .revokeLeases(let grace) = policy, let graceEnd else { return .zero }
        return max(.zero, graceEnd + grace - ContinuousClock.now)
    }

    /// Sleeps until `busy` may have gone idle (woken by the final unpins), or throws.
    mutating func wait(for busy: [UInt64], on pages: PageMap) throws {
        switch policy {
        case .fail:
            throw DAXError(
                .busy,
                "cannot \(what): \(countedAre(busy.count, "page")) pinned or referenced, the first is "
                    + "pfn \(busy[0]) (\(pages.state(of: PageFrameNumber(rawValue: busy[0]))))")
        case .deferFree:
            preconditionFailure("deferFree never waits")
        case .wait(let timeout):
            let deadline = started + timeout
            guard ContinuousClock.now < deadline,
                pages.waitUntil(
                    busy, deadline: Deadline(after: deadline - ContinuousClock.now), PageWord.isIdleExceptMappings)
            else {
                throw timedOut(pages.busyFrames(busy), "waited \(timeout)")
            }
        case .revokeLeases(let grace):
            if graceEnd == nil {
                graceEnd = ContinuousClock.now + grace
                // Asked without holding any lock: a holder may use the file to let go.
                for lease in pages.leases(where: Set(busy).contains) { lease.requestRelease() }
            }
            let end = graceEnd!
            if ContinuousClock.now < end {
                // Until the grace ends, for the holders to let go.
                _ = pages.waitUntil(
                    busy, deadline: Deadline(after: end - ContinuousClock.now), PageWord.isIdleExceptMappings)
            } else {
                // After it, one more grace period for what no revocation can take away.
                let leasePins = pages.leasePins(on: busy)
                _ = pages.waitUntil(busy, deadline: Deadline(after: end + grace - ContinuousClock.now)) {
                    frame, word in PageWord.isIdleExceptMappingsAndLeases(word, leasePins: leasePins[frame] ?? 0)
                }
            }
        }
    }

    func timedOut(_ busy: [UInt64], _ why: String) -> DAXError {
        DAXError(
            .timedOut,
            "cannot \(what): \(counted(busy.count, "page")) stayed pinned (\(why))"
                + (busy.first.map { ", the first is pfn \($0)" } ?? ""))
    }
}
