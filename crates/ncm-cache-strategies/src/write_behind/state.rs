//! The data of a write-behind queue: a coalescing map indexed by due time and by arrival, the
//! dead letters, and the seams to the cache and the journal.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
#[cfg(feature = "redis")]
use ncm_cache_core::Bytes;
use ncm_cache_core::{Cache, CacheError, Codec, Expiry, Result};
use tokio::time::Instant;

use super::{DeadLetter, QueueValue, WriteBehindConfig};

/// The order of writes to one key: a stream id `(ms, seq)` in durable mode, `(0, n)` otherwise.
pub(crate) type Version = (u64, u64);

/// The cache side of a queue (type-erased over the codec).
#[async_trait]
pub(crate) trait CacheSink<V>: Send + Sync {
    async fn set(&self, key: &str, value: &V, expiry: Expiry) -> Result<()>;
    async fn delete(&self, key: &str) -> Result<bool>;
    /// For each `(key, value)`, whether the cache holds exactly that value (its encoded bytes)
    /// now: one batch read (counted as reads by the backend).
    async fn holds(&self, entries: &[(String, V)]) -> Result<Vec<bool>>;
    /// Encodes a journal value: bound (by a signing codec) to the journal stream and the
    /// entry's key, so a value cannot be paired with another key in the journal.
    #[cfg(feature = "redis")]
    fn encode(&self, binding: &[&str], value: &V) -> Result<Bytes>;
    #[cfg(feature = "redis")]
    fn decode(&self, binding: &[&str], bytes: &[u8]) -> Result<V>;
    /// Tells other instances that keep their own copies (a `CacheStrategies`' messages) that
    /// the queue changed `key` in the cache itself (an eviction after a persist, a refused
    /// write removed, another process's newer write cached). Nothing by default (a queue
    /// started on its own).
    async fn announce(&self, _key: &str) {}
}

/// A `CacheStrategies`' queue's cache: its own changes are announced as the strategies'
/// writes are (review, helper-80 #4: other instances' L1 kept the store's older row).
pub(crate) struct Announcing<C: Codec> {
    pub(crate) cache: Cache<C>,
    pub(crate) inv: std::sync::Arc<crate::invalidation::Invalidator>,
}

#[async_trait]
impl<C: Codec, V: QueueValue> CacheSink<V> for Announcing<C> {
    async fn set(&self, key: &str, value: &V, expiry: Expiry) -> Result<()> {
        CacheSink::<V>::set(&self.cache, key, value, expiry).await
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        CacheSink::<V>::delete(&self.cache, key).await
    }
    async fn holds(&self, entries: &[(String, V)]) -> Result<Vec<bool>> {
        self.cache.holds(entries).await
    }
    #[cfg(feature = "redis")]
    fn encode(&self, binding: &[&str], value: &V) -> Result<Bytes> {
        CacheSink::<V>::encode(&self.cache, binding, value)
    }
    #[cfg(feature = "redis")]
    fn decode(&self, binding: &[&str], bytes: &[u8]) -> Result<V> {
        CacheSink::<V>::decode(&self.cache, binding, bytes)
    }
    async fn announce(&self, key: &str) {
        self.inv
            .broadcast(crate::invalidation::Broadcast::Keys {
                keys: vec![key.to_owned()],
            })
            .await;
    }
}

#[async_trait]
impl<C: Codec, V: QueueValue> CacheSink<V> for Cache<C> {
    async fn set(&self, key: &str, value: &V, expiry: Expiry) -> Result<()> {
        self.set_with_expiry(key, value, expiry).await
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        Cache::delete(self, key).await
    }
    async fn holds(&self, entries: &[(String, V)]) -> Result<Vec<bool>> {
        let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
        let held = self.backend().get_many(&keys).await?;
        Ok(entries
            .iter()
            .zip(held)
            .map(|((key, value), held)| {
                held.is_some_and(|held| self.encode_for(key, value).is_ok_and(|ours| held == ours))
            })
            .collect())
    }
    #[cfg(feature = "redis")]
    fn encode(&self, binding: &[&str], value: &V) -> Result<Bytes> {
        Ok(self.codec().encode_for(binding, value)?)
    }
    #[cfg(feature = "redis")]
    fn decode(&self, binding: &[&str], bytes: &[u8]) -> Result<V> {
        Ok(self.codec().decode_for(binding, bytes)?)
    }
}

/// A write adopted from a crashed process.
pub(crate) struct Recovered<V> {
    pub(crate) id: Version,
    pub(crate) key: String,
    pub(crate) value: V,
    /// A write-through's or write-around's entry (`Journal::append_direct`): its store call
    /// may not have been accepted (yet), so it is never cached from the journal.
    pub(crate) direct: bool,
}

/// A journaled write: its id, and the id of the key's newest write it replaced as newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    pub(crate) id: Version,
    pub(crate) prev: Option<Version>,
}

/// What the journal says about a write this process is about to persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum Verdict {
    /// Still ours and the newest write of its key: persist it.
    Persist,
    /// A newer write of its key was journaled (by any process): skip it and acknowledge it.
    Superseded,
    /// Another process adopted it (our lease ran out while we stalled): leave it alone.
    Lost,
    /// A direct write (write-through, write-around) of its key is in its store call: ask
    /// again once it ended (stored: superseded; failed: this write is the newest again).
    Busy,
    /// A newer write of its key supersedes it, and that write is pending under this very
    /// consumer: either one this process knows (then like `Superseded`), or an orphan — a write
    /// whose caller stopped waiting after its journal append, or whose append timed out and ran
    /// late — which must be persisted in its place, not left for adoption at exit.
    Orphan(Version),
}

/// Where a durable queue journals its writes (a Redis Stream).
#[async_trait]
pub(crate) trait Journal<V>: Send + Sync {
    /// Appends a write (the acknowledgment comes once it is also cached).
    async fn append(&self, key: &str, value: &V) -> Result<Appended>;
    /// Journals a write-through or write-around of `key` before its store call, only when
    /// the key has journaled writes (which it then supersedes): `None` when nothing was
    /// appended.
    async fn append_direct(&self, key: &str, value: &V) -> Result<Option<Appended>>;
    /// Takes back an appended write that was not acknowledged: `false` when it may no longer
    /// be (an older write of its key was acknowledged as superseded by it) and must be persisted.
    async fn withdraw(&self, key: &str, appended: Appended) -> Result<bool>;
    /// Checks, in one atomic step, each `(key, newest version held)` about to be persisted.
    async fn fence(&self, entries: &[(&str, Version)]) -> Result<Vec<Verdict>>;
    /// Reads one journaled write back (`None` when it is gone).
    async fn fetch(&self, id: Version) -> Result<Option<Recovered<V>>>;
    /// The id of `key`'s newest journaled write (`None` when none of its writes is left:
    /// the store holds the newest).
    async fn newest(&self, key: &str) -> Result<Option<Version>>;
    /// Forgets persisted (or superseded) writes of their keys.
    async fn ack(&self, ids: &[(String, Version)]) -> Result<()>;
    /// Claims up to `limit` pending writes of consumers whose lease expired.
    async fn recover(&self, limit: usize) -> Result<Vec<Recovered<V>>>;
    /// Renews this consumer's lease.
    async fn heartbeat(&self) -> Result<()>;
    /// Leaves the group when nothing of ours is left unacknowledged.
    async fn retire(&self) -> Result<()>;
    /// How often to renew the lease and look for crashed consumers.
    fn maintenance_every(&self) -> Duration;
}

pub(crate) struct Pending<V> {
    pub(crate) value: V,
    pub(crate) version: Version,
    pub(crate) due: Instant,
    pub(crate) seq: u64,
    pub(crate) ids: Vec<Version>,
}

/// A write of a key with a write-through or write-around under way, queued by a dead-letter
/// replay or an adoption (neither takes the key's lock): held aside until that direct write
/// ends, then superseded by it or queued (see `queue.rs`'s `DirectWrite`).
pub(crate) struct Parked<V> {
    pub(crate) value: V,
    pub(crate) version: Version,
    pub(crate) ids: Vec<Version>,
    /// Counted in `taken` under this number until it is superseded or queued.
    pub(crate) seq: u64,
    /// Adopted from a crashed process (its cached value evicted once it is persisted).
    pub(crate) adopted: bool,
}

pub(crate) struct Dead<V> {
    pub(crate) letter: DeadLetter<V>,
    pub(crate) version: Version,
    pub(crate) ids: Vec<Version>,
}

pub(crate) struct State<V> {
    pub(crate) pending: HashMap<String, Pending<V>>,
    pub(crate) by_due: BTreeMap<(Instant, u64), String>,
    pub(crate) by_seq: BTreeMap<u64, String>,
    pub(crate) in_flight: usize,
    /// The keys of the batch in flight (a write-through of one waits for it: see
    /// `queue.rs`'s `DirectWrite`).
    pub(crate) flying: std::collections::HashSet<String>,
    /// The sequence numbers of writes taken out by a write-through or write-around of their
    /// key under way (`queue.rs`'s `DirectWrite`), with their counts: a flush that covers one
    /// does not settle, and the worker does not exit, before it is superseded or put back.
    pub(crate) taken: BTreeMap<u64, u32>,
    /// The keys with a write-through or write-around under way (`DirectWrite`), and what a
    /// replay or an adoption queued for them meanwhile ([`queue_or_park`](Self::queue_or_park)).
    pub(crate) direct: HashMap<String, Vec<Parked<V>>>,
    pub(crate) seq: u64,
    /// Version of memory-mode writes (monotonic, so ties never favour an older value).
    pub(crate) vseq: u64,
    pub(crate) flush_target: u64,
    pub(crate) flushed: u64,
    /// Dead letters in the order they were given up (read with `dead_letters`).
    pub(crate) dead: Vec<Dead<V>>,
    /// The keys of `dead`: a write looks its key up here before searching `dead` (which grows
    /// while a store is down: a search per write made an outage's cost grow with its square).
    pub(crate) dead_keys: std::collections::HashSet<String>,
    /// Since when the journal's fence has been failing (durable mode; cleared by a fence that
    /// answers): batches wait for it no longer than a lease in all.
    pub(crate) journal_down_since: Option<Instant>,
    /// The journal's fence's last retryable failure.
    pub(crate) journal_last_failure: Option<Instant>,
    pub(crate) unacked: Vec<(String, Version)>,
    /// Keys whose waiting write was adopted from a crashed process (not written by this one):
    /// their cached value is evicted once the write is persisted.
    pub(crate) adopted: std::collections::HashSet<String>,
    /// Keys with a write between its start and its queueing (journal append, cache write): a
    /// journaled entry of such a key this process does not hold yet is not an orphan.
    pub(crate) writing: HashMap<String, u32>,
    pub(crate) last_error: Option<CacheError>,
    pub(crate) closing: bool,
    pub(crate) exited: bool,
}

impl<V> State<V> {
    pub(crate) fn new() -> Self {
        Self {
            pending: HashMap::new(),
            by_due: BTreeMap::new(),
            by_seq: BTreeMap::new(),
            in_flight: 0,
            flying: std::collections::HashSet::new(),
            taken: BTreeMap::new(),
            direct: HashMap::new(),
            seq: 0,
            vseq: 0,
            flush_target: 0,
            flushed: 0,
            dead: Vec::new(),
            dead_keys: std::collections::HashSet::new(),
            journal_down_since: None,
            journal_last_failure: None,
            unacked: Vec::new(),
            adopted: std::collections::HashSet::new(),
            writing: HashMap::new(),
            last_error: None,
            closing: false,
            exited: false,
        }
    }

    /// Queues a replayed dead letter or an adopted write (`adopted`), or, while a direct write
    /// of its key is under way, parks it until that ends: queued there, the worker could store
    /// it after the direct write (review, helper-82 #3). Returns as [`insert`](Self::insert).
    pub(crate) fn queue_or_park(
        &mut self,
        key: String,
        value: V,
        version: Version,
        due: Instant,
        ids: Vec<Version>,
        adopted: bool,
    ) -> (bool, u64) {
        // After the worker exited (a replay after shutdown drains inline, and nothing would
        // acknowledge a superseded write's journal entry), queued as before: not covered.
        if !self.exited && self.direct.contains_key(&key) {
            self.seq += 1;
            let seq = self.seq;
            self.take(seq);
            if let Some(parked) = self.direct.get_mut(&key) {
                parked.push(Parked {
                    value,
                    version,
                    ids,
                    seq,
                    adopted,
                });
            }
            return (false, 0);
        }
        if adopted {
            self.adopted.insert(key.clone());
        }
        self.insert(key, value, version, due, ids)
    }

    /// Adds a write; `true` when it coalesced with a waiting value of the same key.
    pub(crate) fn insert(
        &mut self,
        key: String,
        value: V,
        version: Version,
        due: Instant,
        ids: Vec<Version>,
    ) -> (bool, u64) {
        let mut superseded = 0;
        if let Some(dead) = self.take_dead(&key) {
            superseded = 1;
            if dead.version > version {
                // An adopted older write met a newer dead letter: keep the newer value.
                return self.insert_inner(
                    key,
                    dead.letter.value,
                    dead.version,
                    due,
                    [ids, dead.ids].concat(),
                    superseded,
                );
            }
            return self.insert_inner(
                key,
                value,
                version,
                due,
                [ids, dead.ids].concat(),
                superseded,
            );
        }
        self.insert_inner(key, value, version, due, ids, superseded)
    }

    /// The journal's fence answered: no outage under way.
    pub(crate) fn journal_answered(&mut self) {
        self.journal_down_since = None;
        self.journal_last_failure = None;
    }

    /// Gives a write up: it becomes a dead letter (one per key: a key's later write takes it
    /// back, see `insert`).
    pub(crate) fn push_dead(&mut self, mut dead: Dead<V>) {
        if let Some(older) = self.take_dead(&dead.letter.key) {
            // Not expected (a key's write takes its dead letter back); kept as one, the newer
            // value, every id carried.
            if older.version > dead.version {
                let ids = std::mem::take(&mut dead.ids);
                dead = older;
                dead.ids.extend(ids);
            } else {
                dead.ids.extend(older.ids);
            }
        }
        self.dead_keys.insert(dead.letter.key.clone());
        self.dead.push(dead);
    }

    /// `key`'s dead letter, taken out of the list.
    pub(crate) fn take_dead(&mut self, key: &str) -> Option<Dead<V>> {
        if !self.dead_keys.remove(key) {
            return None;
        }
        let i = self.dead.iter().position(|d| d.letter.key == key)?;
        Some(self.dead.remove(i))
    }

    /// Every dead letter, taken out of the list (a replay).
    pub(crate) fn take_all_dead(&mut self) -> Vec<Dead<V>> {
        self.dead_keys.clear();
        std::mem::take(&mut self.dead)
    }

    /// `key`'s dead letter, if it has one.
    pub(crate) fn dead_of(&self, key: &str) -> Option<&Dead<V>> {
        if !self.dead_keys.contains(key) {
            return None;
        }
        self.dead.iter().find(|d| d.letter.key == key)
    }

    fn insert_inner(
        &mut self,
        key: String,
        value: V,
        version: Version,
        due: Instant,
        ids: Vec<Version>,
        superseded: u64,
    ) -> (bool, u64) {
        if let Some(p) = self.pending.get_mut(&key) {
            if version >= p.version {
                p.value = value;
                p.version = version;
            }
            p.ids.extend(ids);
            if due < p.due {
                self.by_due.remove(&(p.due, p.seq));
                p.due = due;
                self.by_due.insert((due, p.seq), key);
            }
            return (true, superseded);
        }
        self.seq += 1;
        let seq = self.seq;
        self.by_due.insert((due, seq), key.clone());
        self.by_seq.insert(seq, key.clone());
        self.pending.insert(
            key,
            Pending {
                value,
                version,
                due,
                seq,
                ids,
            },
        );
        (false, superseded)
    }

    /// Puts back a write taken out with [`remove`](Self::remove), in its place (its sequence
    /// number: a flush waiting for it still does); merged as a write is if the key has a
    /// waiting write again.
    pub(crate) fn restore(&mut self, key: String, p: Pending<V>) {
        if self.pending.contains_key(&key) {
            self.insert_inner(key, p.value, p.version, p.due, p.ids, 0);
            return;
        }
        self.by_due.insert((p.due, p.seq), key.clone());
        self.by_seq.insert(p.seq, key.clone());
        self.pending.insert(key, p);
    }

    /// A write with sequence number `seq` is taken out ([`taken`](Self::taken)).
    pub(crate) fn take(&mut self, seq: u64) {
        *self.taken.entry(seq).or_default() += 1;
    }

    /// A taken write is superseded or put back.
    pub(crate) fn untake(&mut self, seq: u64) {
        if let Some(n) = self.taken.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.taken.remove(&seq);
            }
        }
    }

    pub(crate) fn remove(&mut self, key: &str) -> Option<Pending<V>> {
        let p = self.pending.remove(key)?;
        self.by_due.remove(&(p.due, p.seq));
        self.by_seq.remove(&p.seq);
        Some(p)
    }

    /// Marks a flush done once nothing at or below its target is waiting.
    pub(crate) fn settle_flush(&mut self) -> bool {
        let oldest = self.by_seq.first_key_value().map(|(s, _)| *s);
        if self.flush_target > self.flushed
            && self.in_flight == 0
            && self
                .taken
                .first_key_value()
                .is_none_or(|(s, _)| *s > self.flush_target)
            && oldest.is_none_or(|s| s > self.flush_target)
        {
            self.flushed = self.flush_target;
            return true;
        }
        false
    }

    /// How many entries are due at `now`, counting up to `cap`.
    fn due_at(&self, now: Instant, cap: usize) -> usize {
        self.by_due.range(..=(now, u64::MAX)).take(cap).count()
    }

    /// When the worker should look again: the oldest due time plus the linger.
    pub(crate) fn next_wake(&self, linger: std::time::Duration) -> Option<Instant> {
        self.by_due
            .first_key_value()
            .map(|((due, _), _)| later(*due, linger))
    }

    /// The next batch: due entries; or, when draining (flush, shutdown) or full, the oldest.
    pub(crate) fn take_batch(
        &mut self,
        now: Instant,
        config: &WriteBehindConfig,
    ) -> Vec<(String, Pending<V>)> {
        let drain = self.closing || self.flush_target > self.flushed;
        let full = self.pending.len() + self.in_flight >= config.max_pending;
        // Linger: once the oldest entry is due, wait `batch_linger` more (unless a whole batch is
        // already due) so one call carries everything that became due meanwhile.
        let ready = self.by_due.first_key_value().is_some_and(|((due, _), _)| {
            later(*due, config.batch_linger) <= now
                || self.due_at(now, config.batch_size) >= config.batch_size
        });
        if !(drain || full || ready) {
            self.in_flight = 0;
            self.flying.clear();
            return Vec::new();
        }
        let mut batch = Vec::new();
        while batch.len() < config.batch_size {
            let key = if drain || full {
                self.by_seq.first_key_value().map(|(_, k)| k.clone())
            } else {
                match self.by_due.first_key_value() {
                    Some(((due, _), k)) if *due <= now => Some(k.clone()),
                    _ => None,
                }
            };
            let Some(key) = key else { break };
            if let Some(p) = self.remove(&key) {
                batch.push((key, p));
            }
        }
        self.in_flight = batch.len();
        self.flying = batch.iter().map(|(k, _)| k.clone()).collect();
        batch
    }
}

/// `at + by`, saturating a century ahead instead of overflowing (a delay of `Duration::MAX`
/// means "only on flush").
pub(crate) fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by)
        .or_else(|| at.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use ncm_cache_core::CacheError;

    use super::*;
    use crate::write_behind::DeadLetter;

    fn dead(key: &str, value: u32, version: Version) -> Dead<u32> {
        Dead {
            letter: DeadLetter {
                key: key.to_owned(),
                value,
                error: CacheError::store("down"),
                attempts: 1,
                failed_at: SystemTime::now(),
            },
            version,
            ids: vec![version],
        }
    }

    /// Dead letters are found by key without a search of the list, one per key; a key's write
    /// takes its dead letter back (the newer value kept), and a replay takes them all.
    #[test]
    fn dead_letters_are_indexed_by_key() {
        let mut st = State::<u32>::new();
        for i in 0..10_000u32 {
            st.push_dead(dead(&format!("k{i}"), i, (1, u64::from(i))));
        }
        assert_eq!(st.dead.len(), 10_000);
        assert!(st.dead_of("k42").is_some_and(|d| d.letter.value == 42));
        assert!(st.dead_of("nope").is_none());
        // A second dead letter of a key is merged into one (the newer value, both ids).
        st.push_dead(dead("k7", 700, (2, 0)));
        assert_eq!(st.dead.len(), 10_000);
        let k7 = st.dead_of("k7").unwrap();
        assert_eq!((k7.letter.value, k7.ids.len()), (700, 2));
        // An older write of a dead-lettered key: the dead letter's newer value is queued.
        let (_, superseded) = st.insert("k9".into(), 1, (0, 0), Instant::now(), vec![(0, 0)]);
        assert_eq!(superseded, 1);
        assert!(st.dead_of("k9").is_none());
        assert_eq!(st.pending["k9"].value, 9);
        assert_eq!(st.dead.len(), 9_999);
        assert_eq!(st.take_all_dead().len(), 9_999);
        assert!(st.dead_of("k1").is_none() && st.dead_keys.is_empty());
    }
}
