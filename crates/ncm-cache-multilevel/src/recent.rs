//! Loads overtaken by a delete heard late (docs/ARCHITECTURE.md, "Coherence of L1"): a load
//! reads its source, another instance (or a task of this one) changes the source and deletes
//! the key, and the load's store lands after that delete — the key was absent again, so an
//! "only if absent" store succeeds — while the delete's message reaches this instance only
//! after the store began. What the load stored is then older than the delete, and every
//! instance would read it from L2 until its TTL.
//!
//! Each L2 store of a load is remembered from just before it is sent until [`WINDOW`] after
//! it landed. An invalidation of its key within that time — a message from another instance,
//! or a delete, clear or pattern delete on this one — takes the entry: if the store has
//! landed, its bytes are removed from L2 if L2 still holds exactly them (a later write's
//! bytes are left alone), and the removal is announced; if it is still in flight, the load
//! does this itself once it lands. Removing what a later load of the same bytes stored costs
//! one more miss, never a stale read.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// How long after its store a load's value is checked against invalidations it may have
/// missed: a bound on a backplane message's delay (publishes that fail are retried).
pub(crate) const WINDOW: Duration = Duration::from_secs(5);

/// Most loads remembered at once (the oldest are forgotten first).
const MAX_ENTRIES: usize = 16_384;

/// A load's store, as remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent (or about to be): `invalidated` once an invalidation of the key came meanwhile.
    InFlight { id: u64, invalidated: bool },
    /// Landed, with the digest of its bytes, until `until` (the cache clock's nanoseconds).
    Stored { id: u64, digest: u64, until: u64 },
}

#[derive(Debug, Default)]
struct Recent {
    entries: HashMap<String, State>,
    /// Keys in the order they were begun, with their id, to forget the oldest first.
    order: VecDeque<(String, u64)>,
    next_id: u64,
}

/// The loads of one cache whose stores are still checked (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct RecentLoads(Mutex<Recent>);

/// What a store's end asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Landed {
    /// Nothing more.
    Keep,
    /// An invalidation of the key came while the store was in flight: check L2 now.
    Check(u64),
}

/// The digest a stored value is recognised by.
pub(crate) fn digest(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

impl RecentLoads {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A load's store of `key` is about to be sent; returns its id for [`landed`](Self::landed)
    /// or [`abandoned`](Self::abandoned).
    pub(crate) fn begin(&self, key: &str, now: u64) -> u64 {
        let mut r = self.lock();
        r.forget_old(now);
        r.next_id += 1;
        let id = r.next_id;
        r.entries.insert(
            key.to_owned(),
            State::InFlight {
                id,
                invalidated: false,
            },
        );
        r.order.push_back((key.to_owned(), id));
        id
    }

    /// The store `id` of `key` landed with bytes of `digest`: remembered for [`WINDOW`], or — when an
    /// invalidation came while it was in flight — to be checked by the caller now.
    pub(crate) fn landed(&self, key: &str, id: u64, digest: u64, now: u64) -> Landed {
        let mut r = self.lock();
        match r.entries.get(key).copied() {
            Some(State::InFlight {
                id: current,
                invalidated,
            }) if current == id => {
                if invalidated {
                    r.entries.remove(key);
                    Landed::Check(digest)
                } else {
                    let until = ncm_cache_core::deadline_after(now, WINDOW);
                    r.entries
                        .insert(key.to_owned(), State::Stored { id, digest, until });
                    Landed::Keep
                }
            }
            // Replaced by a later load of the key, or forgotten: that one is checked.
            _ => Landed::Keep,
        }
    }

    /// The store `id` of `key` was not made (refused, failed): nothing to check.
    pub(crate) fn abandoned(&self, key: &str, id: u64) {
        let mut r = self.lock();
        if matches!(r.entries.get(key), Some(State::InFlight { id: current, .. }) if *current == id)
        {
            r.entries.remove(key);
        }
    }

    /// `key` was invalidated: the digest of a landed store to check now, if any (a store in
    /// flight is marked, for its load to check once it lands).
    pub(crate) fn invalidated(&self, key: &str, now: u64) -> Option<u64> {
        let mut r = self.lock();
        match r.entries.get_mut(key) {
            Some(State::InFlight { invalidated, .. }) => {
                *invalidated = true;
                None
            }
            Some(State::Stored { digest, until, .. }) => {
                let found = (*until > now).then_some(*digest);
                r.entries.remove(key);
                found
            }
            None => None,
        }
    }

    /// [`invalidated`](Self::invalidated) for every remembered key `matches` accepts (all of
    /// them for a clear): the landed stores to check now.
    pub(crate) fn invalidated_matching(
        &self,
        now: u64,
        matches: impl Fn(&str) -> bool,
    ) -> Vec<(String, u64)> {
        let mut r = self.lock();
        let mut check = Vec::new();
        r.entries.retain(|key, state| {
            if !matches(key) {
                return true;
            }
            match state {
                State::InFlight { invalidated, .. } => {
                    *invalidated = true;
                    true
                }
                State::Stored { digest, until, .. } => {
                    if *until > now {
                        check.push((key.clone(), *digest));
                    }
                    false
                }
            }
        });
        check
    }
}

impl Recent {
    /// Drops landed entries past their window (and the order items of entries replaced or
    /// gone), and the oldest entries beyond [`MAX_ENTRIES`] whatever their state.
    fn forget_old(&mut self, now: u64) {
        while let Some((key, id)) = self.order.front() {
            let over_cap = self.order.len() > MAX_ENTRIES;
            let (ours, done) = match self.entries.get(key) {
                Some(State::Stored { id: c, until, .. }) if c == id => (true, *until <= now),
                Some(State::InFlight { id: c, .. }) if c == id => (true, false),
                _ => (false, true),
            };
            if !done && !over_cap {
                break;
            }
            if let Some((key, _)) = self.order.pop_front()
                && ours
            {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn an_invalidation_during_the_store_asks_its_load_to_check() {
        let r = RecentLoads::default();
        let id = r.begin("k", 0);
        assert_eq!(
            r.invalidated("k", 1),
            None,
            "in flight: marked, nothing to check yet"
        );
        assert_eq!(r.landed("k", id, 7, 2), Landed::Check(7));
        assert_eq!(r.invalidated("k", 3), None, "checked once");
    }

    #[test]
    fn an_invalidation_within_the_window_checks_a_landed_store_once() {
        let r = RecentLoads::default();
        let id = r.begin("k", 0);
        assert_eq!(r.landed("k", id, 7, SEC), Landed::Keep);
        assert_eq!(r.invalidated("other", 2 * SEC), None);
        assert_eq!(r.invalidated("k", 2 * SEC), Some(7));
        assert_eq!(r.invalidated("k", 3 * SEC), None);
        // Past the window: nothing.
        let id = r.begin("k", 10 * SEC);
        r.landed("k", id, 8, 10 * SEC);
        let window = u64::try_from(WINDOW.as_nanos()).unwrap();
        assert_eq!(r.invalidated("k", 10 * SEC + window + 1), None);
    }

    #[test]
    fn abandoned_and_replaced_stores_are_not_checked() {
        let r = RecentLoads::default();
        let id = r.begin("k", 0);
        r.abandoned("k", id);
        assert_eq!(r.invalidated("k", 1), None);
        // A later load of the key replaces the entry: the earlier one's landing is ignored.
        let first = r.begin("k", 0);
        let second = r.begin("k", 0);
        assert_eq!(r.landed("k", first, 1, 1), Landed::Keep);
        assert_eq!(r.landed("k", second, 2, 1), Landed::Keep);
        assert_eq!(r.invalidated("k", 2), Some(2));
    }

    #[test]
    fn matching_invalidations_mark_and_collect() {
        let r = RecentLoads::default();
        let a = r.begin("user:1", 0);
        r.landed("user:1", a, 1, 0);
        let b = r.begin("user:2", 0);
        r.begin("order:1", 0);
        let mut found = r.invalidated_matching(1, |k| k.starts_with("user:"));
        found.sort();
        assert_eq!(found, vec![("user:1".to_owned(), 1)]);
        assert_eq!(
            r.landed("user:2", b, 2, 1),
            Landed::Check(2),
            "marked in flight"
        );
        assert_eq!(r.invalidated("order:1", 1), None);
    }

    #[test]
    fn the_oldest_entries_go_beyond_the_cap() {
        let r = RecentLoads::default();
        for i in 0..MAX_ENTRIES + 100 {
            let key = format!("k{i}");
            let id = r.begin(&key, 0);
            r.landed(&key, id, 1, 0);
        }
        let len = r.lock().entries.len();
        assert!(len <= MAX_ENTRIES + 1, "{len} entries");
        assert_eq!(r.invalidated("k0", 1), None, "the oldest was forgotten");
        let last = format!("k{}", MAX_ENTRIES + 99);
        assert_eq!(r.invalidated(&last, 1), Some(1));
    }
}
