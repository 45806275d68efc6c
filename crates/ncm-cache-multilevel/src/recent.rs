//! Loads overtaken by a delete heard late (docs/ARCHITECTURE.md, "Coherence of L1"): a load
//! reads its source, another instance (or a task of this one) changes the source and deletes
//! the key, and the load's store lands after that delete — the key was absent again, so an
//! "only if absent" store succeeds — while the delete's message reaches this instance only
//! after the store began. What the load stored is then older than the delete, and every
//! instance would read it from L2 until its TTL.
//!
//! Each L2 store of a load is remembered from just before the load's last version check until
//! [`WINDOW`] after it landed (also when it failed or its caller was cancelled: it may have
//! landed all the same; a failed one that a delete overtook is checked at once). A delete of
//! its key within that time — a DELETE, pattern or CLEAR
//! message from another instance, or a delete, pattern delete or clear on this one — takes
//! the entry: if the store has landed, its bytes are removed from L2 if L2 still holds exactly
//! them (a later write's bytes are left alone), and the removal is announced as a withdrawal
//! (which evicts L1 elsewhere but is not itself a delete: withdrawals do not chase each other's
//! fresh loads); if it is still in flight, the load does this itself once it lands. Removing
//! what a later load of the same bytes stored costs one more miss, never a stale read.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// How long after its store a load's value is checked against deletes it may have missed: a
/// bound on a backplane message's delay (publishes that fail are retried).
pub(crate) const WINDOW: Duration = Duration::from_secs(5);

/// Most stores remembered at once (the oldest are forgotten first).
const MAX_ENTRIES: usize = 16_384;

/// A load's store, as remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent (or about to be): `deleted` once a delete of the key came meanwhile.
    InFlight { deleted: bool },
    /// Landed (or may have), until `until` (the cache clock's nanoseconds).
    Stored { until: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    digest: u64,
    state: State,
}

#[derive(Debug, Default)]
struct Recent {
    /// Per key, every store remembered (usually one).
    entries: HashMap<String, Vec<Entry>>,
    /// Stores in the order they began, to forget the oldest first.
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
    /// A delete of the key came while the store was in flight: check L2 now for this digest.
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

    /// A load's store of `key` with bytes of `digest` is about to be checked and sent; returns
    /// its id for [`landed`](Self::landed), [`abandoned`](Self::abandoned) or
    /// (for a store that failed too).
    pub(crate) fn begin(&self, key: &str, digest: u64, now: u64) -> u64 {
        let mut r = self.lock();
        r.forget_old(now);
        r.next_id += 1;
        let id = r.next_id;
        r.entries.entry(key.to_owned()).or_default().push(Entry {
            id,
            digest,
            state: State::InFlight { deleted: false },
        });
        r.order.push_back((key.to_owned(), id));
        id
    }

    /// The store `id` of `key` landed, or may have (it failed, or its caller was cancelled):
    /// remembered for [`WINDOW`], or — when a delete came while it was in flight — to be
    /// checked by the caller now.
    pub(crate) fn landed(&self, key: &str, id: u64, now: u64) -> Landed {
        let mut r = self.lock();
        let Some(entry) = r.find(key, id) else {
            return Landed::Keep;
        };
        match entry.state {
            State::InFlight { deleted: true } => {
                let digest = entry.digest;
                r.remove(key, id);
                Landed::Check(digest)
            }
            _ => {
                entry.state = State::Stored {
                    until: ncm_cache_core::deadline_after(now, WINDOW),
                };
                Landed::Keep
            }
        }
    }

    /// The store `id` of `key` was not made (refused, or not sent): nothing to check.
    pub(crate) fn abandoned(&self, key: &str, id: u64) {
        self.lock().remove(key, id);
    }

    /// `key` was deleted: the digests of landed stores to check now (each taken once); stores
    /// in flight are marked, for their loads to check once they land.
    pub(crate) fn deleted(&self, key: &str, now: u64) -> Vec<u64> {
        let mut r = self.lock();
        let Some(list) = r.entries.get_mut(key) else {
            return Vec::new();
        };
        let check = take_landed(list, now);
        if list.is_empty() {
            r.entries.remove(key);
        }
        check
    }

    /// [`deleted`](Self::deleted) for every remembered key `matches` accepts.
    pub(crate) fn deleted_matching(
        &self,
        now: u64,
        matches: impl Fn(&str) -> bool,
    ) -> Vec<(String, u64)> {
        let mut r = self.lock();
        let mut check = Vec::new();
        r.entries.retain(|key, list| {
            if !matches(key) {
                return true;
            }
            check.extend(take_landed(list, now).into_iter().map(|d| (key.clone(), d)));
            !list.is_empty()
        });
        check
    }
}

/// Marks the stores in flight and takes the landed ones within their window.
fn take_landed(list: &mut Vec<Entry>, now: u64) -> Vec<u64> {
    let mut check = Vec::new();
    list.retain_mut(|e| match &mut e.state {
        State::InFlight { deleted } => {
            *deleted = true;
            true
        }
        State::Stored { until } => {
            if *until > now {
                check.push(e.digest);
            }
            false
        }
    });
    check
}

impl Recent {
    fn find(&mut self, key: &str, id: u64) -> Option<&mut Entry> {
        self.entries.get_mut(key)?.iter_mut().find(|e| e.id == id)
    }

    fn remove(&mut self, key: &str, id: u64) {
        if let Some(list) = self.entries.get_mut(key) {
            list.retain(|e| e.id != id);
            if list.is_empty() {
                self.entries.remove(key);
            }
        }
    }

    /// Drops landed stores past their window (and the order items of stores gone), and the
    /// oldest stores beyond [`MAX_ENTRIES`] whatever their state.
    fn forget_old(&mut self, now: u64) {
        while let Some((key, id)) = self.order.front() {
            let over_cap = self.order.len() >= MAX_ENTRIES;
            let done = match self
                .entries
                .get(key)
                .and_then(|l| l.iter().find(|e| e.id == *id))
            {
                Some(Entry {
                    state: State::Stored { until },
                    ..
                }) => *until <= now,
                Some(_) => false,
                None => true,
            };
            if !done && !over_cap {
                break;
            }
            if let Some((key, id)) = self.order.pop_front() {
                self.remove(&key, id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_delete_during_the_store_asks_its_load_to_check() {
        let r = RecentLoads::default();
        let id = r.begin("k", 7, 0);
        assert!(
            r.deleted("k", 1).is_empty(),
            "in flight: marked, nothing yet"
        );
        assert_eq!(r.landed("k", id, 2), Landed::Check(7));
        assert!(r.deleted("k", 3).is_empty(), "checked once");
    }

    #[test]
    fn a_delete_within_the_window_checks_a_landed_store_once() {
        let r = RecentLoads::default();
        let id = r.begin("k", 7, 0);
        assert_eq!(r.landed("k", id, SEC), Landed::Keep);
        assert!(r.deleted("other", 2 * SEC).is_empty());
        assert_eq!(r.deleted("k", 2 * SEC), vec![7]);
        assert!(r.deleted("k", 3 * SEC).is_empty());
        // Past the window: nothing.
        let id = r.begin("k", 8, 10 * SEC);
        r.landed("k", id, 10 * SEC);
        let window = u64::try_from(WINDOW.as_nanos()).unwrap();
        assert!(r.deleted("k", 10 * SEC + window + 1).is_empty());
    }

    #[test]
    fn two_stores_of_one_key_are_each_checked() {
        let r = RecentLoads::default();
        let first = r.begin("k", 1, 0);
        let second = r.begin("k", 2, 0);
        assert!(r.deleted("k", 1).is_empty());
        // The second is refused; the first lands after the delete: it is checked.
        r.abandoned("k", second);
        assert_eq!(r.landed("k", first, 2), Landed::Check(1));
        // Both landed, then a delete: both digests.
        let a = r.begin("k", 3, 10);
        let b = r.begin("k", 4, 10);
        r.landed("k", a, 11);
        r.landed("k", b, 11);
        let mut found = r.deleted("k", 12);
        found.sort_unstable();
        assert_eq!(found, vec![3, 4]);
    }

    #[test]
    fn abandoned_stores_are_not_checked_and_failed_ones_are() {
        let r = RecentLoads::default();
        let id = r.begin("k", 1, 0);
        r.abandoned("k", id);
        assert!(r.deleted("k", 1).is_empty());
        let id = r.begin("k", 2, 0);
        assert_eq!(r.landed("k", id, 1), Landed::Keep);
        assert_eq!(r.deleted("k", 2), vec![2]);
        // A failed store that a delete overtook in flight is checked at once.
        let id = r.begin("k", 3, 3);
        assert!(r.deleted("k", 4).is_empty());
        assert_eq!(r.landed("k", id, 5), Landed::Check(3));
    }

    #[test]
    fn matching_deletes_mark_and_collect() {
        let r = RecentLoads::default();
        let a = r.begin("user:1", 1, 0);
        r.landed("user:1", a, 0);
        let b = r.begin("user:2", 2, 0);
        r.begin("order:1", 3, 0);
        assert_eq!(
            r.deleted_matching(1, |k| k.starts_with("user:")),
            vec![("user:1".to_owned(), 1)]
        );
        assert_eq!(
            r.landed("user:2", b, 1),
            Landed::Check(2),
            "marked in flight"
        );
        assert!(r.deleted("order:1", 1).is_empty(), "in flight: marked only");
    }

    #[test]
    fn the_oldest_stores_go_beyond_the_cap() {
        let r = RecentLoads::default();
        for i in 0..MAX_ENTRIES + 100 {
            let key = format!("k{i}");
            let id = r.begin(&key, 1, 0);
            r.landed(&key, id, 0);
        }
        let len = r.lock().entries.len();
        assert!(len <= MAX_ENTRIES, "{len} entries");
        assert!(r.deleted("k0", 1).is_empty(), "the oldest was forgotten");
        let last = format!("k{}", MAX_ENTRIES + 99);
        assert_eq!(r.deleted(&last, 1), vec![1]);
    }
}
