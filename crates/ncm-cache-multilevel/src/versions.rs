//! Per-key invalidation versions: what keeps an L1 fill from resurrecting a value older than
//! an acknowledged write or invalidation (docs/ARCHITECTURE.md, "Coherence of L1").
//!
//! Every invalidation of a key bumps its stripe (a hash of the key picks one of [`STRIPES`]
//! counters) before and after its L2 effect, then evicts the key from L1; a cache-wide
//! invalidation (clear, disconnect, lost message) bumps one global counter. An L1 fill takes a
//! [`Ticket`] before its L2 read or load and inserts only while the ticket is current, checked
//! before and after the insert.

use std::sync::atomic::{AtomicU64, Ordering};

/// Number of stripes: one key's invalidation cancels only fills of keys in its stripe.
pub(crate) const STRIPES: usize = 4096;

/// The counters. Sequentially consistent: the argument in the module docs orders a bump against
/// a fill's checks across threads.
pub(crate) struct Versions {
    global: AtomicU64,
    stripes: Box<[AtomicU64]>,
}

/// A snapshot of the two counters that guard one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    global: u64,
    stripe: usize,
    version: u64,
}

impl Default for Versions {
    fn default() -> Self {
        Self {
            global: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
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
        Ticket {
            global: self.global.load(Ordering::SeqCst),
            stripe,
            version: self.stripes[stripe].load(Ordering::SeqCst),
        }
    }

    /// `true` while nothing that guards the ticket's key has been invalidated since it was taken.
    pub(crate) fn current(&self, t: &Ticket) -> bool {
        self.global.load(Ordering::SeqCst) == t.global
            && self.stripes[t.stripe].load(Ordering::SeqCst) == t.version
    }

    /// Invalidates `key` (its stripe): every fill of it that took a ticket before now fails.
    pub(crate) fn invalidate(&self, key: &str) {
        self.stripes[stripe_of(key)].fetch_add(1, Ordering::SeqCst);
    }

    /// Invalidates every key.
    pub(crate) fn invalidate_all(&self) {
        self.global.fetch_add(1, Ordering::SeqCst);
    }

    /// A writer's bump after its L2 write: `Some(ticket)` for its own L1 insert when nothing
    /// else invalidated the key since `t` (only this bump), `None` when something did (the
    /// writer then evicts instead: which write is newer is L2's to say).
    pub(crate) fn advance(&self, t: &Ticket) -> Option<Ticket> {
        let before = self.stripes[t.stripe].fetch_add(1, Ordering::SeqCst);
        let global = self.global.load(Ordering::SeqCst);
        (before == t.version && global == t.global).then_some(Ticket {
            global,
            stripe: t.stripe,
            version: before + 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_follow_their_key_and_the_global_counter() {
        let v = Versions::default();
        let a = v.ticket("a");
        assert!(v.current(&a));
        v.invalidate("a");
        assert!(!v.current(&a));
        let a = v.ticket("a");
        // Another key (in another stripe) leaves `a` alone.
        let other = (0..100)
            .map(|i| format!("k{i}"))
            .find(|k| stripe_of(k) != stripe_of("a"))
            .unwrap();
        v.invalidate(&other);
        assert!(v.current(&a));
        v.invalidate_all();
        assert!(!v.current(&a));
    }

    #[test]
    fn a_writer_keeps_its_insert_only_without_a_concurrent_bump() {
        let v = Versions::default();
        let t = v.ticket("k");
        let mine = v.advance(&t).unwrap();
        assert!(v.current(&mine));
        let t = v.ticket("k");
        v.invalidate("k");
        assert!(
            v.advance(&t).is_none(),
            "someone else invalidated during the write"
        );
    }
}
