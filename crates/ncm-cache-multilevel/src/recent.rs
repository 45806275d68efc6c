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
//!
//! An eager refresh's store *replaces* what L2 holds (a plain `SET`, not "only if absent"), so
//! it can also overwrite a newer write: another instance's (its SET message heard late) or a
//! caller's on this one (whose L2 write returned first). Such a write takes the refresh's entry
//! as a delete does, and the refresh's bytes are withdrawn if L2 still holds them — which
//! means the refresh landed after the write (found by review).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// A plain store (an eager refresh): a write of the key heard later may have been
    /// overwritten by it.
    replaces: bool,
}

#[derive(Debug, Default)]
struct Recent {
    /// Per key, every store remembered (usually one).
    entries: HashMap<String, Vec<Entry>>,
    /// Stores in the order they began, to forget the oldest first.
    order: VecDeque<(String, u64)>,
    next_id: u64,
    /// How many remembered stores replace (`Entry::replaces`).
    replacing: usize,
}

/// The loads of one cache whose stores are still checked (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct RecentLoads {
    inner: Mutex<Recent>,
    /// `Recent::replacing`, readable without the lock: a caller's write looks for refreshes
    /// it may have been overwritten by only when there are any.
    replacing: AtomicUsize,
}

/// The lock, which publishes the count of replacing stores when released.
struct Locked<'a> {
    r: std::sync::MutexGuard<'a, Recent>,
    mirror: &'a AtomicUsize,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Recent;
    fn deref(&self) -> &Recent {
        &self.r
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Recent {
        &mut self.r
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.mirror.store(self.r.replacing, Ordering::SeqCst);
    }
}

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
    fn lock(&self) -> Locked<'_> {
        Locked {
            r: self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            mirror: &self.replacing,
        }
    }

    /// A load's store of `key` with bytes of `digest` is about to be checked and sent
    /// (`replaces`: a plain store, an eager refresh's); returns its id for
    /// [`landed`](Self::landed) or [`abandoned`](Self::abandoned).
    pub(crate) fn begin(&self, key: &str, digest: u64, now: u64, replaces: bool) -> u64 {
        let mut r = self.lock();
        r.forget_old(now);
        r.next_id += 1;
        let id = r.next_id;
        r.replacing += usize::from(replaces);
        r.entries.entry(key.to_owned()).or_default().push(Entry {
            id,
            digest,
            state: State::InFlight { deleted: false },
            replaces,
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
        self.take(key, now, None)
    }

    /// `key` was written (another instance's SET message, or a caller's write here whose L2
    /// write returned), the write having begun at `since` (0: not known):
    /// [`deleted`](Self::deleted) for the stores that replace only (a store "only if absent"
    /// cannot land over a write), and of those landed, only the ones that landed after
    /// `since` (one that landed before the write began was overwritten by it).
    pub(crate) fn overwritten(&self, key: &str, now: u64, since: u64) -> Vec<u64> {
        if self.replacing.load(Ordering::SeqCst) == 0 {
            return Vec::new();
        }
        self.take(key, now, Some(since))
    }

    fn take(&self, key: &str, now: u64, replacing_since: Option<u64>) -> Vec<u64> {
        let mut r = self.lock();
        let Some(list) = r.entries.get_mut(key) else {
            return Vec::new();
        };
        let (check, gone) = take_landed(list, now, replacing_since);
        if list.is_empty() {
            r.entries.remove(key);
        }
        r.replacing -= gone;
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
        let mut gone = 0;
        r.entries.retain(|key, list| {
            if !matches(key) {
                return true;
            }
            let (found, removed) = take_landed(list, now, None);
            gone += removed;
            check.extend(found.into_iter().map(|d| (key.clone(), d)));
            !list.is_empty()
        });
        r.replacing -= gone;
        check
    }
}

/// Marks the stores in flight and takes the landed ones within their window — with
/// `replacing_since`, of the stores that replace only, and of the landed ones only those that
/// landed at or after it (the others are left); with the number of replacing stores removed.
fn take_landed(list: &mut Vec<Entry>, now: u64, replacing_since: Option<u64>) -> (Vec<u64>, usize) {
    let window = u64::try_from(WINDOW.as_nanos()).unwrap_or(u64::MAX);
    let mut check = Vec::new();
    let mut gone = 0;
    list.retain_mut(|e| {
        if replacing_since.is_some() && !e.replaces {
            return true;
        }
        match &mut e.state {
            State::InFlight { deleted } => {
                *deleted = true;
                true
            }
            State::Stored { until } => {
                let landed_at = until.saturating_sub(window);
                if replacing_since.is_some_and(|since| landed_at < since) {
                    return true;
                }
                if *until > now {
                    check.push(e.digest);
                }
                gone += usize::from(e.replaces);
                false
            }
        }
    });
    (check, gone)
}

impl Recent {
    fn find(&mut self, key: &str, id: u64) -> Option<&mut Entry> {
        self.entries.get_mut(key)?.iter_mut().find(|e| e.id == id)
    }

    fn remove(&mut self, key: &str, id: u64) {
        if let Some(list) = self.entries.get_mut(key) {
            let mut gone = 0;
            list.retain(|e| {
                let keep = e.id != id;
                gone += usize::from(!keep && e.replaces);
                keep
            });
            if list.is_empty() {
                self.entries.remove(key);
            }
            self.replacing -= gone;
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
        let id = r.begin("k", 7, 0, false);
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
        let id = r.begin("k", 7, 0, false);
        assert_eq!(r.landed("k", id, SEC), Landed::Keep);
        assert!(r.deleted("other", 2 * SEC).is_empty());
        assert_eq!(r.deleted("k", 2 * SEC), vec![7]);
        assert!(r.deleted("k", 3 * SEC).is_empty());
        // Past the window: nothing.
        let id = r.begin("k", 8, 10 * SEC, false);
        r.landed("k", id, 10 * SEC);
        let window = u64::try_from(WINDOW.as_nanos()).unwrap();
        assert!(r.deleted("k", 10 * SEC + window + 1).is_empty());
    }

    #[test]
    fn two_stores_of_one_key_are_each_checked() {
        let r = RecentLoads::default();
        let first = r.begin("k", 1, 0, false);
        let second = r.begin("k", 2, 0, false);
        assert!(r.deleted("k", 1).is_empty());
        // The second is refused; the first lands after the delete: it is checked.
        r.abandoned("k", second);
        assert_eq!(r.landed("k", first, 2), Landed::Check(1));
        // Both landed, then a delete: both digests.
        let a = r.begin("k", 3, 10, false);
        let b = r.begin("k", 4, 10, false);
        r.landed("k", a, 11);
        r.landed("k", b, 11);
        let mut found = r.deleted("k", 12);
        found.sort_unstable();
        assert_eq!(found, vec![3, 4]);
    }

    #[test]
    fn abandoned_stores_are_not_checked_and_failed_ones_are() {
        let r = RecentLoads::default();
        let id = r.begin("k", 1, 0, false);
        r.abandoned("k", id);
        assert!(r.deleted("k", 1).is_empty());
        let id = r.begin("k", 2, 0, false);
        assert_eq!(r.landed("k", id, 1), Landed::Keep);
        assert_eq!(r.deleted("k", 2), vec![2]);
        // A failed store that a delete overtook in flight is checked at once.
        let id = r.begin("k", 3, 3, false);
        assert!(r.deleted("k", 4).is_empty());
        assert_eq!(r.landed("k", id, 5), Landed::Check(3));
    }

    #[test]
    fn matching_deletes_mark_and_collect() {
        let r = RecentLoads::default();
        let a = r.begin("user:1", 1, 0, false);
        r.landed("user:1", a, 0);
        let b = r.begin("user:2", 2, 0, false);
        r.begin("order:1", 3, 0, false);
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

    /// A write takes a refresh's store as a delete does; "only if absent" stores are left.
    #[test]
    fn a_write_checks_the_refreshes_it_may_have_been_overwritten_by() {
        let r = RecentLoads::default();
        assert!(r.overwritten("k", 0, 0).is_empty());
        let load = r.begin("k", 1, 0, false);
        let refresh = r.begin("k", 2, 0, true);
        // In flight: marked, checked once it lands.
        assert!(r.overwritten("k", 1, 0).is_empty());
        assert_eq!(r.landed("k", refresh, 2), Landed::Check(2));
        assert_eq!(r.landed("k", load, 2), Landed::Keep);
        let refresh = r.begin("k", 3, 3, true);
        r.landed("k", refresh, 4);
        assert_eq!(r.replacing.load(Ordering::SeqCst), 1);
        // A write that began after it landed overwrote it: nothing to check.
        assert!(r.overwritten("k", 5, 5).is_empty());
        assert_eq!(r.overwritten("k", 5, 4), vec![3]);
        assert_eq!(r.replacing.load(Ordering::SeqCst), 0);
        assert!(r.overwritten("k", 6, 0).is_empty(), "checked once");
        // The load's store is still there for a delete.
        assert_eq!(r.deleted("k", 7), vec![1]);
        // Abandoned and forgotten ones leave the count.
        let refresh = r.begin("j", 4, 8, true);
        r.abandoned("j", refresh);
        assert_eq!(r.replacing.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_oldest_stores_go_beyond_the_cap() {
        let r = RecentLoads::default();
        for i in 0..MAX_ENTRIES + 100 {
            let key = format!("k{i}");
            let id = r.begin(&key, 1, 0, false);
            r.landed(&key, id, 0);
        }
        let len = r.lock().entries.len();
        assert!(len <= MAX_ENTRIES, "{len} entries");
        assert!(r.deleted("k0", 1).is_empty(), "the oldest was forgotten");
        let last = format!("k{}", MAX_ENTRIES + 99);
        assert_eq!(r.deleted(&last, 1), vec![1]);
    }
}
