import CLibPMem
import Glibc
import Synchronization

/// Per-thread pin totals, summed on read: how `/proc/vmstat` keeps `nr_foll_pin_acquired`.
///
/// Each thread owns a block of counters (allocated on its first pin) and only it writes them, with
/// a plain load and store: no locked instruction on the pin path. A reader sums every live block
/// plus the totals of exited threads under the registry lock. Each ``PageMap`` owns one slot of
/// every block; slots are reused once a page map is gone with no pin outstanding.
///
/// **Exact without waiting.** A pin or unpin counts itself *before* the compare-and-swap that
/// changes the descriptor, and takes the count back if that compare-and-swap fails. The
/// compare-and-swap is a release (on x86 a locked instruction, a full fence), so whoever sees its
/// effect on the descriptor, or anything that happened after it, sees the count too: a truncate
/// that found the page idle, a thread woken by the final unpin, a thread that joined the pinner.
/// Nobody waits for a change in flight, so a reader never spins, sleeps or gives up.
///
/// What the totals may show transiently, and only for changes other threads make while the read
/// runs: a pin or unpin counted a few instructions before its descriptor changes, a count taken
/// back when the compare-and-swap loses a race or a pin fails and is undone, and (the blocks being
/// summed one after the other) a change whose acquire is read but whose release is not yet. So
/// under load the totals are off by at most the changes made during the read; at rest (no pin or
/// unpin between its count and its compare-and-swap), `acquired - released` is exactly the sum of
/// `pinCount` over all descriptors and `pinnedPages` the number of descriptors with
/// `pinCount > 0` (invariant 9), with no deadline involved.
///
/// Whether a pin took the page's `pinCount` from 0 to 1 (or an unpin from 1 to 0) is read from
/// the value the compare-and-swap expects, so it is known before the swap and is exact when the
/// swap succeeds: each change adds to exactly one counter (`acquiredFirst` or `acquiredMore`,
/// `releasedLast` or `releasedMore`), one plain load and store.
///
/// **Freeing the table.** A released pin does not hold its page map alive (a retain and a release
/// would be two more locked instructions), so an unpin can run while the map's `deinit` decides
/// whether to free the descriptors. After its compare-and-swap (and the slow path that may follow
/// it), an unpin copies its release counter into a *settled* counter: a thread whose release
/// counters differ from its settled ones is still touching the table, and `deinit` then leaves the
/// table in place instead of freeing it under that thread (see ``MemMap/isFreeable``).
@usableFromInline
enum PinTally {
    /// Counters kept per slot.
    @usableFromInline
    enum Field: Int, CaseIterable {
        /// Pins that took a page's `pinCount` from 0 to 1.
        case acquiredFirst = 0
        /// Other pins.
        case acquiredMore = 1
        /// Unpins and revocations that took a page's `pinCount` from 1 to 0.
        case releasedLast = 2
        /// Other unpins and revocations.
        case releasedMore = 3
        /// -1 for each pin taken back uncounted that was its page's last (the take-back uncounts
        /// its acquire from `acquiredMore`, wherever it was counted); wraps, read signed.
        case pinnedAdjust = 4
        /// `releasedLast` as of the end of this thread's last unpin of the slot's map.
        case settledLast = 5
        /// `releasedMore` likewise.
        case settledMore = 6
    }

    /// Page maps that can have exact per-thread tallies at once; more fall back to shared atomics.
    static let slotCount = 256
    /// Words per slot: one cache line, so that a pin or unpin touches one line of its block.
    @inlinable static var slotStride: Int { 8 }
    static let blockWords = slotCount * slotStride
    /// How far a settled counter lies after the release counter it copies.
    @inlinable static var settledOffset: Int { Field.settledLast.rawValue - Field.releasedLast.rawValue }

    @usableFromInline typealias Block = UnsafeMutablePointer<Atomic<UInt64>>

    /// Where one pin or unpin counts itself: the calling thread's counters for one page map's
    /// slot (plain loads and stores; only this thread writes them), or the map's shared atomics.
    @usableFromInline
    struct Counters {
        @usableFromInline let base: Block
        @usableFromInline let shared: Bool

        @inlinable @inline(__always)
        init(base: Block, shared: Bool) {
            self.base = base
            self.shared = shared
        }

        @inlinable @inline(__always)
        func add(_ field: Field, _ n: UInt64 = 1) {
            let word = base + field.rawValue
            if shared {
                word.pointee.wrappingAdd(n, ordering: .releasing)
            } else {
                // Releasing: a reader that sees a release counted also sees the pin's acquire.
                word.pointee.store(word.pointee.load(ordering: .relaxed) &+ n, ordering: .releasing)
            }
        }

        @inlinable @inline(__always)
        func subtract(_ field: Field, _ n: UInt64 = 1) { add(field, 0 &- n) }

        /// Records that `n` releases counted in `field` (`releasedLast` or `releasedMore`) have
        /// changed their descriptors and are done with the table.
        @inlinable @inline(__always)
        func settle(_ field: Field, _ n: UInt64) {
            let settled = base + (field.rawValue &+ PinTally.settledOffset)
            if shared {
                if n != 0 { settled.pointee.wrappingAdd(n, ordering: .releasing) }
            } else {
                settled.pointee.store((base + field.rawValue).pointee.load(ordering: .relaxed), ordering: .releasing)
            }
        }
    }

    /// One thread's counters. Sendable: only its thread writes them, others load them atomically.
    struct ThreadBlock: @unchecked Sendable, Equatable {
        let raw: UnsafeMutableRawPointer
        var counters: Block { raw.assumingMemoryBound(to: Atomic<UInt64>.self) }
    }

    struct Registry: ~Copyable {
        var blocks: [ThreadBlock] = []
        /// The sums of the blocks of exited threads (settled by construction).
        var retired: [UInt64] = Array(repeating: 0, count: PinTally.blockWords)
        var freeSlots: [Int] = Array((0..<PinTally.slotCount).reversed())
    }

    static let registry = Mutex(Registry())

    /// The key whose destructor folds an exiting thread's block into the retired totals. The pin
    /// path finds the block through a C thread-local instead (`dax_pin_tally_block`): one load from
    /// the thread pointer, where `pthread_getspecific` is a call (and this lazy global a
    /// `swift_once` check); the key's value is set only so that its destructor runs.
    static let threadKey: pthread_key_t = {
        var key = pthread_key_t()
        let status = pthread_key_create(&key) { block in
            guard let block else { return }
            PinTally.retire(block)
        }
        precondition(status == 0, "pthread_key_create failed: \(status)")
        return key
    }()

    /// The calling thread's block, registered on first use.
    @inlinable @inline(__always)
    static func currentBlock() -> Block {
        if let block = dax_pin_tally_block_get() {
            return block.assumingMemoryBound(to: Atomic<UInt64>.self)
        }
        return registerCurrentThread()
    }

    @usableFromInline @inline(never)
    static func registerCurrentThread() -> Block {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: blockWords * 8, alignment: 64)
        raw.initializeMemory(as: UInt64.self, repeating: 0, count: blockWords)
        let block = ThreadBlock(raw: raw)
        registry.withTrackedLock { $0.blocks.append(block) }
        pthread_setspecific(threadKey, raw)
        dax_pin_tally_block_set(raw)
        return raw.assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    static func retire(_ raw: UnsafeMutableRawPointer) {
        let block = ThreadBlock(raw: raw)
        registry.withTrackedLock { registry in
            for i in 0..<blockWords { registry.retired[i] &+= block.counters[i].load(ordering: .acquiring) }
            registry.blocks.removeAll { $0 == block }
        }
        // A later destructor that pins registers the thread again (and the key runs this again).
        if dax_pin_tally_block_get() == raw { dax_pin_tally_block_set(nil) }
        raw.deallocate()
    }

    /// The calling thread's counters for `slot`.
    @inlinable @inline(__always)
    static func counters(slot: Int) -> Counters {
        Counters(base: currentBlock() + slot &* slotStride, shared: false)
    }

    /// A slot's counters summed over all threads.
    struct Sums {
        var fields = [UInt64](repeating: 0, count: Field.allCases.count)
        /// True when every thread's releases of the slot are settled (see ``PinTally``).
        var settled = true

        subscript(_ field: Field) -> UInt64 {
            get { fields[field.rawValue] }
            set { fields[field.rawValue] = newValue }
        }
    }

    /// The sum over all threads of one slot's counters.
    ///
    /// Reads every release counter before any acquire counter: a release counted here happened
    /// after its acquire, which the second pass then sees. So even while other threads pin and
    /// unpin, `acquired - released` never drops below the pins held throughout the read.
    static func sums(slot: Int) -> Sums {
        registry.withTrackedLock { registry in
            let base = slot * slotStride
            var sums = Sums()
            for field in Field.allCases { sums[field] = registry.retired[base + field.rawValue] }
            for block in registry.blocks {
                let counters = block.counters + base
                let last = counters[Field.releasedLast.rawValue].load(ordering: .acquiring)
                let more = counters[Field.releasedMore.rawValue].load(ordering: .acquiring)
                // Settled values are stored after the released ones; equal means done with the table.
                if counters[Field.settledLast.rawValue].load(ordering: .acquiring) != last
                    || counters[Field.settledMore.rawValue].load(ordering: .acquiring) != more
                {
                    sums.settled = false
                }
                sums[.releasedLast] &+= last
                sums[.releasedMore] &+= more
            }
            for field in [Field.acquiredFirst, .acquiredMore, .pinnedAdjust] {
                for block in registry.blocks {
                    sums[field] &+= block.counters[base + field.rawValue].load(ordering: .acquiring)
                }
            }
            return sums
        }
    }

    /// Takes a free slot, zeroed in every block, or nil when all are taken.
    static func claimSlot() -> Int? {
        registry.withTrackedLock { registry in
            guard let slot = registry.freeSlots.popLast() else { return nil }
            for i in 0..<slotStride {
                registry.retired[slot * slotStride + i] = 0
                for block in registry.blocks {
                    block.counters[slot * slotStride + i].store(0, ordering: .relaxed)
                }
            }
            return slot
        }
    }

    /// Gives a slot back. Only when no pin of its page map is outstanding or in flight.
    static func releaseSlot(_ slot: Int) {
        registry.withTrackedLock { $0.freeSlots.append(slot) }
    }
}
