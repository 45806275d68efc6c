//! Per-key versions: what keeps an L1 fill from resurrecting a value older than an
//! acknowledged write or invalidation (docs/ARCHITECTURE.md, "Coherence of L1").
//!
//! A hash of the key picks one of [`STRIPES`] stripes; each has two counters: *invalidations*
//! (a received message, a local delete) and *local writes* (this instance's own writes, bumped
//! before and after their L2 write). A cache-wide counter covers clear, disconnects and lost
//! messages. An L1 fill (a promotion, a waiter's read, a load) takes a [`Ticket`] before its
//! L2 read or load and inserts only while all three are unchanged, checked before and after
//! the insert. A writer keeps its own value unless an invalidation came during its write; if
//! only other local writes of the stripe came, the order of the two writes in L2 is unknown, so
//! its value stays in L1 for at most [`CONTENDED_TTL`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Number of stripes: one key's invalidation cancels only fills of keys in its stripe.
pub(crate) const STRIPES: usize = 4096;

/// How long L1 keeps a value whose write overlapped another local write of its stripe (which
/// of the two L2 applied last is unknown; after this, L1 asks L2).
pub(crate) const CONTENDED_TTL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Stripe {
    invalidations: AtomicU64,
    /// Bumped when a local write begins and when it ends.
    writes: AtomicU64,
    /// Local writes between begin and end.
    in_flight: AtomicU64,
    /// Bumped by a caller's own write (not a load's store) when it begins and when its L2
    /// write returns: it only renames the key's load flight ([`Versions::renew_flight`]) and
    /// tells a load's store that a caller's write overlapped it ([`Ticket::set_since`]); no
    /// ticket's `current` checks it, so overlapping writes still settle as
    /// [`Settled::Contended`], not as invalidated.
    sets: AtomicU64,
}

/// The counters. Sequentially consistent: the argument in the module docs orders a bump against
/// a fill's checks across threads.
pub(crate) struct Versions {
    global: AtomicU64,
    stripes: Box<[Stripe]>,
}

/// A snapshot of the counters that guard one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    global: u64,
    stripe: usize,
    invalidations: u64,
    writes: u64,
    /// The stripe's `sets` (flight naming only: not compared by [`Versions::current`]).
    sets: u64,
}

/// Bits of a mark's second part that hold the stripe; the rest hold the stripe's `sets`.
const STRIPE_BITS: u32 = 16;

impl Ticket {
    /// The ticket as a [`LoadMark`](ncm_cache_core::LoadMark) (`as_backend().load_mark`): its
    /// second part holds the stripe and, above [`STRIPE_BITS`], the stripe's `sets` (so a
    /// caller's own write renames flights named by `LoadMark::flight_key` too); its last part
    /// is the local writes counter, which `LoadMark::flight_key` leaves out. Its first part
    /// holds the cache-wide counter and, above [`GLOBAL_BITS`], the epoch's change count when
    /// the mark was taken (`epoch`, with `epoch_clear`; see [`epoch_since`]): a load's store
    /// through `set_loaded` is not made in an epoch begun since, as `get_or_load`'s is not.
    pub(crate) fn mark(&self, epoch: Option<u64>) -> ncm_cache_core::LoadMark {
        ncm_cache_core::LoadMark::new([
            (self.global & GLOBAL_MASK) | (epoch.unwrap_or(0) << GLOBAL_BITS),
            self.stripe as u64 | (self.sets << STRIPE_BITS),
            self.invalidations,
            self.writes,
        ])
    }

    /// Whether a caller's own write of the stripe ([`Versions::renew_flight`]) began, or had
    /// its L2 write return, between `begun` (a write's ticket) and this one (its settled
    /// ticket).
    pub(crate) fn set_since(&self, begun: &Ticket) -> bool {
        self.sets != begun.sets
    }

    /// A mark back as a ticket of `key` and the low bits of the epoch's change count it
    /// carries; `None` when it was not made for `key`'s stripe.
    pub(crate) fn from_mark(key: &str, mark: ncm_cache_core::LoadMark) -> Option<(Self, u64)> {
        let [global, packed, invalidations, writes] = mark.parts();
        let own = stripe_of(key);
        (packed & ((1 << STRIPE_BITS) - 1) == own as u64).then_some((
            Self {
                global: global & GLOBAL_MASK,
                stripe: own,
                invalidations,
                writes,
                sets: packed >> STRIPE_BITS,
            },
            global >> GLOBAL_BITS,
        ))
    }
}

/// Bits of a mark's first part that hold the cache-wide counter (cleared and pattern
/// invalidations: 2^48 of them are never reached); the rest hold the epoch's change count.
const GLOBAL_BITS: u32 = 48;
const GLOBAL_MASK: u64 = (1 << GLOBAL_BITS) - 1;

/// The epoch change count a mark was taken at, from the `low` bits it carries and the count
/// `now` (which is never lower): the latest count at or below `now` with those low bits. Equal
/// to `now` when the epoch did not change since (fewer than 2^16 changes during one load). A
/// mark no count of this instance can have made (another instance's, through the public
/// `Cache::store_loaded_since`) is `u64::MAX`: moved, the store is not made.
pub(crate) fn epoch_since(now: u64, low: u64) -> u64 {
    now.checked_sub(now.wrapping_sub(low) & ((1 << (64 - GLOBAL_BITS)) - 1))
        .unwrap_or(u64::MAX)
}

/// How a writer's L2 write ended, for its own L1 insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Nothing else touched the key's stripe: keep the value (with this ticket).
    Clean(Ticket),
    /// Only other local writes of the stripe overlapped: keep it for [`CONTENDED_TTL`] at most.
    Contended(Ticket),
    /// An invalidation came during the write: evict (L2 decides).
    Invalidated,
}

impl Default for Versions {
    fn default() -> Self {
        Self {
            global: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
        }
    }
}

fn stripe_of(key: &str) -> usize {
    // Truncation is the point: the low bits pick the stripe.
    (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) as usize) % STRIPES
}

impl Versions {
    /// The current versions of `key`, taken before reading L2 or loading.
    pub(crate) fn ticket(&self, key: &str) -> Ticket {
        let stripe = stripe_of(key);
        let s = &self.stripes[stripe];
        Ticket {
            global: self.global.load(Ordering::SeqCst),
            stripe,
            invalidations: s.invalidations.load(Ordering::SeqCst),
            writes: s.writes.load(Ordering::SeqCst),
            sets: s.sets.load(Ordering::SeqCst),
        }
    }

    /// `key` tagged with its invalidation versions now: the name of a load in flight
    /// (single-flight), so a caller that starts after an invalidation of the key — or after a
    /// caller's own write ([`renew_flight`](Self::renew_flight)) — never joins a load begun
    /// before it (whose loader may have read the older value). The writes version is left
    /// out: a load's own store bumps it, and would otherwise send the callers that missed just
    /// before it into a second load.
    pub(crate) fn flight_key(&self, key: &str) -> String {
        let t = self.ticket(key);
        format!("{key}\0{}.{}.{}", t.global, t.invalidations, t.sets)
    }

    /// A caller's own write of `key` begins, or its L2 write returned (not a load's store):
    /// later callers name a new load flight. Unlike [`invalidate`](Self::invalidate), no ticket sees it, so a write
    /// overlapping another local write of the stripe settles as [`Settled::Contended`].
    pub(crate) fn renew_flight(&self, key: &str) {
        self.stripes[stripe_of(key)]
            .sets
            .fetch_add(1, Ordering::SeqCst);
    }

    /// `true` while nothing that guards the ticket's key has changed since it was taken.
    pub(crate) fn current(&self, t: &Ticket) -> bool {
        let s = &self.stripes[t.stripe];
        self.global.load(Ordering::SeqCst) == t.global
            && s.invalidations.load(Ordering::SeqCst) == t.invalidations
            && s.writes.load(Ordering::SeqCst) == t.writes
    }

    /// Invalidates `key` (its stripe): every fill of it that took a ticket before now fails.
    pub(crate) fn invalidate(&self, key: &str) {
        self.stripes[stripe_of(key)]
            .invalidations
            .fetch_add(1, Ordering::SeqCst);
    }

    /// Invalidates every key.
    pub(crate) fn invalidate_all(&self) {
        self.global.fetch_add(1, Ordering::SeqCst);
    }

    /// A local write of `key` begins: fills that took a ticket earlier fail. Returns the
    /// writer's ticket.
    pub(crate) fn write_begin(&self, key: &str) -> Ticket {
        let s = &self.stripes[stripe_of(key)];
        s.in_flight.fetch_add(1, Ordering::SeqCst);
        s.writes.fetch_add(1, Ordering::SeqCst);
        self.ticket(key)
    }

    /// A local write begun with `t` ended (call exactly once per [`write_begin`]): bump again
    /// (a read that began during the write cannot promote the old value) and tell what the
    /// writer may keep in L1.
    pub(crate) fn write_end(&self, t: &Ticket) -> Settled {
        let s = &self.stripes[t.stripe];
        let before = s.writes.fetch_add(1, Ordering::SeqCst);
        let others_in_flight = s.in_flight.fetch_sub(1, Ordering::SeqCst) > 1;
        let global = self.global.load(Ordering::SeqCst);
        let invalidations = s.invalidations.load(Ordering::SeqCst);
        if global != t.global || invalidations != t.invalidations {
            return Settled::Invalidated;
        }
        let mine = Ticket {
            global,
            stripe: t.stripe,
            invalidations,
            writes: before + 1,
            sets: s.sets.load(Ordering::SeqCst),
        };
        if before == t.writes && !others_in_flight {
            Settled::Clean(mine)
        } else {
            Settled::Contended(mine)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other_stripe_key(of: &str) -> String {
        (0..1000)
            .map(|i| format!("k{i}"))
            .find(|k| stripe_of(k) != stripe_of(of))
            .unwrap()
    }

    #[test]
    fn tickets_follow_their_key_and_the_global_counter() {
        let v = Versions::default();
        let a = v.ticket("a");
        assert!(v.current(&a));
        v.invalidate("a");
        assert!(!v.current(&a));
        let a = v.ticket("a");
        v.invalidate(&other_stripe_key("a"));
        assert!(v.current(&a), "another stripe leaves `a` alone");
        let t = v.write_begin("a");
        assert!(!v.current(&a), "a local write cancels earlier fills");
        assert!(matches!(v.write_end(&t), Settled::Clean(_)));
        let a = v.ticket("a");
        v.invalidate_all();
        assert!(!v.current(&a));
    }

    #[test]
    fn a_flight_is_named_by_its_keys_versions() {
        let v = Versions::default();
        let before = v.flight_key("k");
        assert_eq!(
            before,
            v.flight_key("k"),
            "nothing happened: the same flight"
        );
        v.invalidate("k");
        let after = v.flight_key("k");
        assert_ne!(before, after, "after an invalidation: a new flight");
        v.write_end(&v.write_begin("k"));
        assert_eq!(
            after,
            v.flight_key("k"),
            "a load's own store keeps the flight"
        );
        v.renew_flight("k");
        assert_ne!(
            after,
            v.flight_key("k"),
            "a caller's own write: a new flight"
        );
        let mark = v.ticket("k").mark(Some(70_000));
        let (back, epoch) = Ticket::from_mark("k", mark).unwrap();
        assert_eq!(back, v.ticket("k"), "a mark carries the ticket");
        assert_eq!(
            epoch_since(70_000, epoch),
            70_000,
            "and the epoch's changes"
        );
        assert_eq!(epoch_since(70_003, epoch), 70_000, "three clears since");
        assert_eq!(epoch_since(5, 5), 5);
        assert_eq!(
            epoch_since(3, 5),
            u64::MAX,
            "a foreign mark: moved, no panic"
        );
        assert!(v.current(&back));
        v.renew_flight("k");
        assert!(
            v.current(&back),
            "a caller's write is no invalidation of fills"
        );
        assert_ne!(
            ncm_cache_core::LoadMark::flight_key("k", Some(mark)),
            ncm_cache_core::LoadMark::flight_key("k", Some(v.ticket("k").mark(Some(70_000)))),
            "marks name the new flight too"
        );
    }

    #[test]
    fn a_writer_learns_what_overlapped_its_write() {
        let v = Versions::default();
        let t = v.write_begin("k");
        let Settled::Clean(mine) = v.write_end(&t) else {
            panic!("nothing overlapped")
        };
        assert!(v.current(&mine));
        let (t1, t2) = (v.write_begin("k"), v.write_begin("k"));
        assert!(
            matches!(v.write_end(&t2), Settled::Contended(_)),
            "the first write is still in flight"
        );
        assert!(matches!(v.write_end(&t1), Settled::Contended(_)));
        let t = v.write_begin("k");
        assert!(
            matches!(v.write_end(&t), Settled::Clean(_)),
            "back to one writer"
        );
        // Two callers' writes overlapping (each renames the flight first, as `set` does).
        v.renew_flight("k");
        let t1 = v.write_begin("k");
        v.renew_flight("k");
        let t2 = v.write_begin("k");
        assert!(matches!(v.write_end(&t1), Settled::Contended(_)));
        assert!(matches!(v.write_end(&t2), Settled::Contended(_)));
        let t = v.write_begin("k");
        v.invalidate("k");
        assert_eq!(
            v.write_end(&t),
            Settled::Invalidated,
            "a delete or a message came"
        );
        let t = v.write_begin("k");
        v.invalidate_all();
        assert_eq!(v.write_end(&t), Settled::Invalidated);
    }
}
