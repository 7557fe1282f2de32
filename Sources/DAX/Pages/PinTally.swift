import Glibc
import Synchronization

/// Per-thread pin totals, summed on read: how `/proc/vmstat` keeps `nr_foll_pin_acquired`.
///
/// Each thread owns a block of counters (allocated on its first pin) and only it writes them, with
/// a plain load and store: no locked instruction on the pin path. A reader sums every live block
/// plus the totals of exited threads under the registry lock. Each ``PageMap`` owns one slot of
/// every block; slots are reused once a page map is gone with no pin outstanding.
///
/// A pin or unpin changes a descriptor first and counts afterwards, so a reader could see the page
/// idle (a truncate woken by the final unpin) and then totals that do not count that unpin yet.
/// Each block therefore has a change sequence, odd from ``begin()`` to ``end(_:)``, bracketing the
/// descriptor change and its tally; a reader waits out every change in flight before it sums.
enum PinTally {
    /// Counters kept per slot.
    enum Field: Int, CaseIterable {
        case acquired = 0  // pages pinned
        case released = 1  // pages unpinned or revoked
        case pinnedUp = 2  // pages whose pinCount went 0 -> 1
        case pinnedDown = 3  // pages whose pinCount went 1 -> 0
    }

    /// Page maps that can have exact per-thread tallies at once; more fall back to shared atomics.
    static let slotCount = 256
    static let fieldCount = Field.allCases.count
    /// The index of a block's change sequence, after its counters.
    static let sequenceIndex = slotCount * fieldCount
    static let blockWords = sequenceIndex + 1

    typealias Block = UnsafeMutablePointer<Atomic<UInt64>>

    /// One thread's counters. Sendable: only its thread writes them, others load them atomically.
    struct ThreadBlock: @unchecked Sendable, Equatable {
        let raw: UnsafeMutableRawPointer
        var counters: Block { raw.assumingMemoryBound(to: Atomic<UInt64>.self) }
    }

    struct Registry: ~Copyable {
        var blocks: [ThreadBlock] = []
        var retired: [UInt64] = Array(repeating: 0, count: PinTally.blockWords)
        var freeSlots: [Int] = Array((0..<PinTally.slotCount).reversed())
    }

    static let registry = Mutex(Registry())

    /// The key whose destructor folds an exiting thread's block into the retired totals.
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
    @inline(__always)
    static func currentBlock() -> Block {
        if let block = pthread_getspecific(threadKey) {
            return block.assumingMemoryBound(to: Atomic<UInt64>.self)
        }
        return registerCurrentThread()
    }

    @inline(never)
    static func registerCurrentThread() -> Block {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: blockWords * 8, alignment: 64)
        raw.initializeMemory(as: UInt64.self, repeating: 0, count: blockWords)
        let block = ThreadBlock(raw: raw)
        registry.withTrackedLock { $0.blocks.append(block) }
        pthread_setspecific(threadKey, raw)
        return raw.assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    static func retire(_ raw: UnsafeMutableRawPointer) {
        let block = ThreadBlock(raw: raw)
        registry.withTrackedLock { registry in
            for i in 0..<blockWords { registry.retired[i] &+= block.counters[i].load(ordering: .acquiring) }
            registry.blocks.removeAll { $0 == block }
        }
        raw.deallocate()
    }

    /// Starts a change of pin counts on the calling thread: call before touching a descriptor, and
    /// ``end(_:)`` after counting it. The odd sequence is stored before the descriptor's atomic
    /// update, whose release ordering makes it visible to anyone who sees that update.
    @inline(__always)
    static func begin() -> Block {
        let block = currentBlock()
        let sequence = block + sequenceIndex
        // Releasing: a reader that sees this odd value (leaving its wait for the previous change)
        // must also see that change's tallies.
        sequence.pointee.store(sequence.pointee.load(ordering: .relaxed) &+ 1, ordering: .releasing)
        return block
    }

    /// Ends the change ``begin()`` started; its tallies are visible to a reader that sees this.
    @inline(__always)
    static func end(_ block: Block) {
        let sequence = block + sequenceIndex
        sequence.pointee.store(sequence.pointee.load(ordering: .relaxed) &+ 1, ordering: .releasing)
    }

    /// Adds to two of the calling thread's counters (`block` is the thread's, from ``begin()``).
    /// Only this thread writes them.
    @inline(__always)
    static func add(_ n: Int, _ field: Field, _ m: Int, _ other: Field, slot: Int, block: Block) {
        let counters = block + slot &* fieldCount
        let a = counters + field.rawValue
        a.pointee.store(a.pointee.load(ordering: .relaxed) &+ UInt64(n), ordering: .releasing)
        if m != 0 {
            let b = counters + other.rawValue
            b.pointee.store(b.pointee.load(ordering: .relaxed) &+ UInt64(m), ordering: .releasing)
        }
    }

    /// The sum over all threads of one slot's counters.
    ///
    /// Reads every `released`/`pinnedDown` counter before any `acquired`/`pinnedUp` one: a release
    /// counted here happened after its acquire, which the second pass then sees. So even while
    /// other threads pin and unpin, acquired - released never drops below the pins outstanding.
    static func totals(slot: Int) -> [UInt64] {
        registry.withTrackedLock { registry in
            waitForChanges(in: registry.blocks)
            let base = slot * fieldCount
            var sums = Array(registry.retired[base..<(base + fieldCount)])
            for field in [Field.released, .pinnedDown, .acquired, .pinnedUp] {
                for block in registry.blocks {
                    sums[field.rawValue] &+= block.counters[base + field.rawValue].load(ordering: .acquiring)
                }
            }
            return sums
        }
    }

    /// Waits until no change that began before this call is in flight: a pin or unpin whose
    /// descriptor update the caller may have seen is counted once this returns. A change is short
    /// (an unpin of many pages closes and reopens it every ``changePages``); the wait skips the
    /// calling thread's own block (a reader inside a change, say a page map freed by a quarantine
    /// hook) and gives up after a second, so that nothing can hang a reader.
    static func waitForChanges(in blocks: [ThreadBlock]) {
        let own = pthread_getspecific(threadKey)
        var deadline: ContinuousClock.Instant?
        for block in blocks where block.raw != own {
            let sequence = block.counters + sequenceIndex
            let started = sequence.pointee.load(ordering: .acquiring)
            guard started & 1 == 1 else { continue }
            var spins = 0
            while sequence.pointee.load(ordering: .acquiring) == started {
                spins += 1
                guard spins > 100 else { continue }
                let limit = deadline ?? ContinuousClock.now + .seconds(1)
                deadline = limit
                if ContinuousClock.now >= limit { break }
                sched_yield()
            }
        }
    }

    /// Pages one change covers at most in a long unpin, which tallies as it goes.
    static let changePages = 64

    /// Waits out the changes in flight on every thread (for the shared-atomics fallback).
    static func waitForChanges() {
        registry.withTrackedLock { waitForChanges(in: $0.blocks) }
    }

    /// Takes a free slot, zeroed in every block, or nil when all are taken.
    static func claimSlot() -> Int? {
        registry.withTrackedLock { registry in
            guard let slot = registry.freeSlots.popLast() else { return nil }
            for i in 0..<fieldCount {
                registry.retired[slot * fieldCount + i] = 0
                for block in registry.blocks {
                    block.counters[slot * fieldCount + i].store(0, ordering: .relaxed)
                }
            }
            return slot
        }
    }

    /// Gives a slot back. Only when no pin of its page map is outstanding.
    static func releaseSlot(_ slot: Int) {
        registry.withTrackedLock { $0.freeSlots.append(slot) }
    }
}
