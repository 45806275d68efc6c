//! The engine of a write-behind queue: the worker task that persists batches, retries, dead
//! letters, back-pressure and durable-mode maintenance.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt as _;
use ncm_cache_core::{CacheError, Expiry, Result};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::state::{Appended, CacheSink, Dead, Journal, Pending, State, Verdict, Version, later};
use super::{DeadLetter, OnFull, QueueFull, QueueValue, WriteBehindConfig};
use crate::stats::{Counter, WriteBehindRecorder, WriteBehindStats};
use crate::store::{Store, WriteVersion};

/// Key write locks per queue. A write-through or write-around of a key holds its stripe for its
/// whole call (the store call included), so writes of other keys that share the stripe wait:
/// many stripes keep that rare.
const STRIPES: usize = 1024;

/// Everything the worker and the handles share.
pub(crate) struct Shared<V> {
    pub(crate) name: Arc<str>,
    config: WriteBehindConfig,
    store: Store<V>,
    cache: Arc<dyn CacheSink<V>>,
    pub(crate) journal: Option<Arc<dyn Journal<V>>>,
    pub(crate) state: Mutex<State<V>>,
    /// Serializes cache write + enqueue per key stripe, so the store ends with what the cache has.
    stripes: Box<[tokio::sync::Mutex<()>]>,
    pub(crate) wake: Notify,
    pub(crate) space: Notify,
    pub(crate) flushed: watch::Sender<u64>,
    pub(crate) stats: WriteBehindRecorder,
    /// Serializes inline drains (after the worker stopped).
    pub(crate) inline: tokio::sync::Mutex<()>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections only move entries between maps; a panic cannot leave them torn.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<V: QueueValue> Shared<V> {
    pub(crate) fn new(
        store: Store<V>,
        cache: Arc<dyn CacheSink<V>>,
        journal: Option<Arc<dyn Journal<V>>>,
        config: WriteBehindConfig,
    ) -> Self {
        let name: Arc<str> = Arc::from(store.name());
        Self {
            stats: WriteBehindRecorder::new(&name),
            name,
            config,
            store,
            cache,
            journal,
            state: Mutex::new(State::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            wake: Notify::new(),
            space: Notify::new(),
            flushed: watch::Sender::new(0),
            inline: tokio::sync::Mutex::new(()),
        }
    }

    fn stripe(&self, key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key) as usize;
        &self.stripes[h % self.stripes.len()]
    }

    pub(crate) async fn write(
        &self,
        key: &str,
        value: &V,
        expiry: Expiry,
        delay: Duration,
    ) -> Result<()> {
        self.reserve(key).await?;
        let _stripe = self.stripe(key).lock().await;
        // From here, a caller that stops waiting (its future dropped) may leave a journaled
        // entry or a cached value behind: the guard queues the write instead (see `Unfinished`).
        *lock(&self.state).writing.entry(key.to_owned()).or_default() += 1;
        let mut unfinished = Unfinished {
            shared: self,
            key,
            value,
            delay,
            id: None,
            armed: self.journal.is_none(),
        };
        // Journal first, then the cache: a crash in between leaves a journaled write (adopted
        // and persisted by another process, which then evicts the key), never a cached value
        // that no journal holds.
        let appended = match &self.journal {
            None => None,
            Some(journal) => match journal.append(key, value).await {
                Ok(appended) => Some(appended),
                Err(e) => {
                    self.stats.add(Counter::Rejected, 1);
                    return Err(e);
                }
            },
        };
        let id = appended.map(|a| a.id);
        unfinished.id = id;
        unfinished.armed = true;
        // A cache failure after the append: the write is taken back from the journal (not
        // acknowledged). If that fails too, or the journal refuses (an older write of the key
        // was already acknowledged as superseded by this one), it stays queued — it is
        // journaled and will be persisted, and the key evicted from the cache after — and the
        // cache's error is still returned.
        let mut cache_failure = None;
        if let Err(e) = self.cache.set(key, value, expiry).await {
            self.stats.add(Counter::Rejected, 1);
            match (&self.journal, appended) {
                (Some(journal), Some(a)) => match journal.withdraw(key, a).await {
                    Ok(true) => {
                        unfinished.armed = false;
                        self.unwrite(key, &e).await;
                        return Err(e);
                    }
                    Ok(false) => {
                        tracing::warn!(queue = %self.name, key, error = %e, "a write whose cache write failed supersedes an older acknowledged write; it will be persisted");
                        cache_failure = Some(e);
                    }
                    Err(w) => {
                        tracing::warn!(queue = %self.name, key, error = %w, "could not withdraw a journaled write whose cache write failed; it will be persisted");
                        cache_failure = Some(e);
                    }
                },
                _ => {
                    unfinished.armed = false;
                    self.unwrite(key, &e).await;
                    return Err(e);
                }
            }
        }
        // The cache was evicted without knowing what it should hold (`cache_newest`).
        let mut unsure = false;
        if cache_failure.is_none()
            && let (Some(journal), Some(a)) = (&self.journal, appended)
        {
            // Another process's newer write of the key may have been cached before this one
            // landed: the cache must end with the newest journaled write (still armed: a
            // caller that gives up here leaves the write to be persisted as adopted).
            unsure = self.cache_newest(&**journal, key, Some(a.id), expiry).await;
        }
        unfinished.armed = false;
        let inserted = {
            let mut st = lock(&self.state);
            if st.exited {
                None
            } else {
                st.vseq += 1;
                let version = id.unwrap_or((0, st.vseq));
                let due = later(Instant::now(), delay);
                let r = st.insert(
                    key.to_owned(),
                    value.clone(),
                    version,
                    due,
                    id.into_iter().collect(),
                );
                if cache_failure.is_some() || unsure {
                    // Not (surely) cached: the key is evicted once this write is persisted.
                    st.adopted.insert(key.to_owned());
                } else {
                    // This process's value is now the cached one.
                    st.adopted.remove(key);
                }
                self.stats.pending_gauge(st.pending.len() + st.in_flight);
                Some(r)
            }
        };
        let Some((coalesced, superseded)) = inserted else {
            // The worker stopped meanwhile (shutdown): nothing is queued — a journaled write
            // is withdrawn (the consumer may have left the group already, so nobody would adopt
            // it) and the cached value removed.
            self.stats.add(Counter::Rejected, 1);
            if let (Some(journal), Some(a)) = (&self.journal, appended) {
                match journal.withdraw(key, a).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(queue = %self.name, key, "a write refused at shutdown supersedes an older acknowledged write; left in the journal for another process to adopt");
                    }
                    Err(e) => {
                        tracing::warn!(queue = %self.name, key, error = %e, "could not withdraw a write refused at shutdown");
                    }
                }
            }
            self.uncache(key).await;
            return Err(CacheError::Closed);
        };
        if let Some(e) = cache_failure {
            self.wake.notify_one();
            return Err(e);
        }
        self.stats.add(Counter::Accepted, 1);
        self.stats.add(Counter::Coalesced, u64::from(coalesced));
        self.stats.superseded(superseded);
        self.wake.notify_one();
        Ok(())
    }

    /// Queues a write whose caller stopped waiting after its journal append (or during its
    /// cache write): it may or may not have been cached, so it is persisted like an adopted one
    /// (the cached value evicted after). Left out, a journaled entry would stay pending under
    /// this consumer until the process exits, and an older write of its key would be judged
    /// superseded by it; a cached value would never reach the store.
    fn take_over(&self, key: &str, value: &V, delay: Duration, id: Option<Version>) {
        let mut st = lock(&self.state);
        if st.exited {
            // The consumer left: another process adopts a journaled entry.
            tracing::warn!(queue = %self.name, key, "a write cancelled at shutdown was not queued");
            return;
        }
        st.vseq += 1;
        let version = id.unwrap_or((0, st.vseq));
        let due = later(Instant::now(), delay);
        st.insert(
            key.to_owned(),
            value.clone(),
            version,
            due,
            id.into_iter().collect(),
        );
        st.adopted.insert(key.to_owned());
        self.stats.pending_gauge(st.pending.len() + st.in_flight);
        drop(st);
        self.wake.notify_one();
    }

    /// Leaves the cache holding `key`'s newest journaled write, or nothing when none is left
    /// (the store then holds the newest): its value is read back from the journal and cached
    /// (with `expiry`) when it is not the one the cache is known to hold (`cached`: the
    /// journaled write this process just cached, `None` when unknown), and the journal is
    /// read again after each change until it did not move meanwhile. A write journaled after
    /// that last read is cached by its own writer after this (journal first, then cache).
    ///
    /// `true` when it ended by evicting the key without knowing what the journal holds (an
    /// error, or a key written without pause): the caller's own pending write is then treated
    /// as adopted (its key evicted once persisted), else a read-through could cache the
    /// store's older row for good (found by review).
    ///
    /// Durable mode only. Without it, two processes' writes of one key could leave the cache
    /// with the older value for good — a slow cache write landing after a newer write's, or
    /// the eviction after persisting an adopted write removing a newer write's cached value,
    /// which a read-through then replaced with the older stored row (found by review).
    async fn cache_newest(
        &self,
        journal: &dyn Journal<V>,
        key: &str,
        cached: Option<Version>,
        expiry: Expiry,
    ) -> bool {
        // What the cache holds now: `Some(None)` once evicted here.
        let mut holds = cached.map(Some);
        let unsure = |what: &str, e: &CacheError| {
            tracing::warn!(queue = %self.name, key, error = %e, "could not {what}; evicting it (a read reloads the store)");
        };
        for _ in 0..8 {
            let newest = match journal.newest(key).await {
                Ok(newest) => newest,
                Err(e) => {
                    unsure("check the key's newest journaled write", &e);
                    self.uncache(key).await;
                    return true;
                }
            };
            if newest.is_some() && holds == Some(newest) {
                return false;
            }
            // Its value; `None` when no write is left, or the newest was acknowledged already
            // (older entries of the key still in the journal): the store holds the newest.
            let write = match newest {
                None => None,
                // A direct write's entry is not cached from here: its store call may not have
                // been accepted (or may fail and take it back); its writer caches its value once
                // the store accepted it (review, helper-87 #1).
                Some(id) => match journal.fetch(id).await {
                    Ok(found) => found.filter(|w| !w.direct).map(|w| (id, w.value)),
                    Err(e) => {
                        unsure("read the key's newest journaled write", &e);
                        self.uncache(key).await;
                        return true;
                    }
                },
            };
            match write {
                None if holds == Some(None) => return false,
                None => {
                    self.uncache(key).await;
                    holds = Some(None);
                }
                Some((id, value)) => {
                    if let Err(e) = self.cache.set(key, &value, expiry).await {
                        unsure("cache the key's newest journaled write", &e);
                        self.uncache(key).await;
                        return true;
                    }
                    self.cache.announce(key).await;
                    holds = Some(Some(id));
                }
            }
        }
        tracing::warn!(queue = %self.name, key, "the key's newest journaled write kept changing; evicting it");
        self.uncache(key).await;
        true
    }

    /// A refused write whose cache write failed: it may have landed all the same (a timeout,
    /// a lost connection; a multi-level cache's L2 write), so it is removed again, as `write`
    /// promises on `Err` (before, the unpersisted value stayed cached while the store got the
    /// older write — review, helper-69). An older write of the key that is still waiting is then
    /// persisted as an adopted one (the key evicted once more after it): a read meanwhile may
    /// cache the store's older value. A write refused before it was sent (a bad key, a value
    /// over the cap) changed nothing and removes nothing.
    ///
    /// In durable mode the cache is left with the key's newest journaled write instead (another
    /// process's newer write stays cached: a plain delete let a read cache the store's older
    /// row — review, helper-72).
    async fn unwrite(&self, key: &str, e: &CacheError) {
        if e.is_invalid_input() {
            return;
        }
        {
            let mut st = lock(&self.state);
            // The refused value's cache write may still land later (a stalled connection): the
            // key's waiting older write evicts it again once persisted. (Marked also while any
            // batch is in flight: it may hold the key. Marks of keys with nothing left to
            // persist are dropped when the batch ends.)
            if st.pending.contains_key(key) || st.in_flight > 0 {
                st.adopted.insert(key.to_owned());
            }
        }
        match &self.journal {
            Some(journal) => {
                if self
                    .cache_newest(&**journal, key, None, Expiry::Default)
                    .await
                {
                    lock(&self.state).adopted.insert(key.to_owned());
                }
            }
            None => self.uncache(key).await,
        }
    }

    /// After `entries` were persisted (none adopted): the cache must not keep an older value
    /// than the store now holds. A read-through after an invalidation (or an eviction) of a key
    /// whose write was still pending read the store's older row and cached it, and nothing
    /// replaced it until its TTL (review, helper-69). The keys are read back in one call, and
    /// one whose cache holds other bytes than the write just persisted, or nothing, is
    /// evicted, under the key's write lock, unless a newer local write of it waits (it caches
    /// its own value). Evicted, not written again: the store now holds this write or a newer
    /// one (another write-through, write-around or database write may have landed since, and
    /// its value or its invalidation must not be undone — review, helper-78), so the next read
    /// loads what is current. A key holding nothing is deleted too: on a backend with load
    /// marks (memory, multi-level) that keeps out a read-through of the older row still on its
    /// way; on plain Redis such a read-through's "only if absent" store can still land.
    async fn evict_unless_held(&self, entries: Vec<(String, V)>, done: &[(String, Version)]) {
        let entries: Vec<(String, V)> = {
            let st = lock(&self.state);
            entries
                .into_iter()
                .filter(|(k, _)| !st.pending.contains_key(k))
                .collect()
        };
        if entries.is_empty() {
            return;
        }
        let held = match self.cache.holds(&entries).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(queue = %self.name, error = %e, "could not read back the keys just persisted; a read-through meanwhile may keep an older row cached until its TTL");
                return;
            }
        };
        for ((key, _), held) in entries.iter().zip(held) {
            if held {
                continue;
            }
            let _stripe = self.stripe(key).lock().await;
            if lock(&self.state).pending.contains_key(key) {
                continue;
            }
            self.settle_persisted(key, done).await;
        }
    }

    /// After `key`'s write was persisted (`done`: the journal ids the batch stored or found
    /// superseded): evicted — unless, in durable mode, the key's newest journaled write is
    /// another one (a newer write, of any process, not yet persisted): then the cache is left
    /// with that write ([`cache_newest`](Self::cache_newest)). Before, that newer write's
    /// cached value was evicted and a read-through cached the store's older row until it was
    /// persisted (review, helper-80 #2); and after an adopted write the persisted entry, not
    /// yet acknowledged, counted as the newest and was cached again over a write that landed
    /// after its store call (helper-80 #3).
    async fn settle_persisted(&self, key: &str, done: &[(String, Version)]) {
        let Some(journal) = &self.journal else {
            self.uncache(key).await;
            return;
        };
        match journal.newest(key).await {
            Ok(Some(id)) if !done.iter().any(|(k, d)| k == key && *d == id) => {
                self.cache_newest(&**journal, key, None, Expiry::Default)
                    .await;
            }
            Ok(_) => self.uncache(key).await,
            Err(e) => {
                tracing::warn!(queue = %self.name, key, error = %e, "could not check the key's newest journaled write; evicting it (a read reloads the store)");
                self.uncache(key).await;
            }
        }
    }

    async fn uncache(&self, key: &str) {
        if let Err(e) = self.cache.delete(key).await {
            tracing::warn!(queue = %self.name, key, error = %e, "could not remove a cached value whose write-behind was refused");
        }
        // Also after a failed delete: another instance's own copy goes all the same.
        self.cache.announce(key).await;
    }

    /// A write-through or write-around of `key` to this queue's store is about to call the
    /// store: waits until no batch holding the key is being persisted, then takes the key's
    /// waiting write out of the queue, under the key's write lock (a write-behind of the key
    /// waits for the direct write). Persisted after the direct write, that older write would
    /// replace it in the store (review, helper-80 #1). See [`DirectWrite`].
    pub(crate) async fn direct_write<'a>(&'a self, key: &'a str) -> DirectWrite<'a, V> {
        loop {
            loop {
                let landed = self.space.notified();
                tokio::pin!(landed);
                landed.as_mut().enable();
                if !lock(&self.state).flying.contains(key) {
                    break;
                }
                landed.await;
            }
            // Not held while waiting for the batch: its evictions take this lock.
            let stripe = self.stripe(key).lock().await;
            let mut st = lock(&self.state);
            if st.flying.contains(key) {
                continue;
            }
            let taken = st.remove(key);
            let adopted = taken.is_some() && st.adopted.contains(key);
            if let Some(p) = &taken {
                st.take(p.seq);
            }
            st.direct.insert(key.to_owned(), Vec::new());
            drop(st);
            return DirectWrite {
                shared: self,
                key,
                _stripe: stripe,
                taken,
                adopted,
                accepted: false,
                journaled: None,
            };
        }
    }

    /// Waits for room for `key` (back-pressure).
    async fn reserve(&self, key: &str) -> Result<()> {
        let deadline = later(Instant::now(), self.config.full_wait_timeout);
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = lock(&self.state);
                if st.closing {
                    drop(st);
                    self.stats.add(Counter::Rejected, 1);
                    return Err(CacheError::Closed);
                }
                if st.pending.contains_key(key)
                    || st.pending.len() + st.in_flight < self.config.max_pending
                {
                    return Ok(());
                }
            }
            // Full: the worker persists the oldest entries early to make room.
            self.wake.notify_one();
            let waited = match self.config.on_full {
                OnFull::Error => false,
                OnFull::Wait => tokio::time::timeout_at(deadline, notified).await.is_ok(),
            };
            if !waited {
                self.stats.add(Counter::Rejected, 1);
                let full = QueueFull {
                    queue: self.name.to_string(),
                    max_pending: self.config.max_pending,
                };
                return Err(CacheError::backend(full.to_string(), Some(Box::new(full))));
            }
        }
    }

    /// Persists one batch: fenced against the journal (durable mode), retried with backoff;
    /// a batch still failing is split to find the entries the store refuses (see
    /// [`store_or_split`](Self::store_or_split)), which become dead letters.
    async fn persist(&self, batch: Vec<(String, Pending<V>)>) {
        let mut entries = Vec::with_capacity(batch.len());
        let mut meta = Vec::with_capacity(batch.len());
        for (key, p) in batch {
            entries.push((key, p.value));
            meta.push((p.version, p.ids));
        }
        let mut out = Outcome::default();
        self.store_or_split(entries, meta, self.config.max_retries, &mut out)
            .await;
        let stored = std::mem::take(&mut out.stored_entries);
        // Adopted writes that were stored (not superseded): their writer may have died before
        // caching them, so the cache may hold an older value than the store now has.
        let evict: HashSet<String> = {
            let mut st = lock(&self.state);
            if st.adopted.is_empty() {
                HashSet::new()
            } else {
                // A mark stays while a write of the key waits: that write may be the one the
                // mark is for (review, helper-73: the older write's persist used it up, and
                // nothing evicted after the waiting one).
                stored
                    .iter()
                    .map(|(k, _)| k)
                    .filter(|k| !st.pending.contains_key(*k) && st.adopted.remove(*k))
                    .cloned()
                    .collect()
            }
        };
        for key in &evict {
            // Under the key's write lock, and only while no local write of it is waiting: a
            // local write caches its own (newer) value.
            let _stripe = self.stripe(key).lock().await;
            if lock(&self.state).pending.contains_key(key) {
                continue;
            }
            self.settle_persisted(key, &out.acks).await;
        }
        let others: Vec<(String, V)> = stored
            .into_iter()
            .filter(|(k, _)| !evict.contains(k))
            .collect();
        self.evict_unless_held(others, &out.acks).await;
        {
            let mut st = lock(&self.state);
            self.stats.add(Counter::Stored, out.stored);
            let mut dead = 0;
            let mut superseded = 0;
            for failed in out.failed {
                for ((key, value), (version, ids)) in failed.entries.into_iter().zip(failed.meta) {
                    if st.pending.contains_key(&key) {
                        // Another write of the key is waiting (a newer local one, or an older
                        // one adopted meanwhile): merged, the newer value kept, every id
                        // carried to the ack.
                        let (_, dropped) = st.insert(key, value, version, Instant::now(), ids);
                        superseded += 1 + dropped;
                        continue;
                    }
                    dead += 1;
                    st.push_dead(Dead {
                        letter: DeadLetter {
                            key,
                            value,
                            error: failed.error.clone(),
                            attempts: failed.attempts,
                            failed_at: SystemTime::now(),
                        },
                        version,
                        ids,
                    });
                }
                tracing::error!(queue = %self.name, error = %failed.error, "write-behind gave up: entries moved to the dead-letter list");
                st.last_error = Some(failed.error);
            }
            self.stats.add(Counter::DeadLettered, dead);
            self.stats.superseded(superseded);
            st.in_flight = 0;
            st.flying.clear();
            // Eviction marks of keys with no write left to persist (none waiting, none dead)
            // mean nothing any more: dropped, so the set does not grow with refused keys.
            let State {
                adopted,
                pending,
                dead_keys,
                ..
            } = &mut *st;
            adopted.retain(|k| pending.contains_key(k) || dead_keys.contains(k));
            self.stats.pending_gauge(st.pending.len());
        }
        self.space.notify_waiters();
        self.ack(out.acks).await;
    }

    /// Fences and stores `entries` with up to `max_retries` retries. When that fails for a
    /// batch of several entries, it is bisected: both halves are tried once; when one fails
    /// alone it is bisected in turn, so one bad entry (a constraint the store refuses) is found
    /// in about 2·log₂(n) calls and dead-letters alone; when both fail (the store is down, or
    /// several bad entries), both are given up at once.
    async fn store_or_split(
        &self,
        entries: Vec<(String, V)>,
        meta: Vec<(Version, Vec<Version>)>,
        retries: u32,
        out: &mut Outcome<V>,
    ) {
        let Some(mut failed) = self.attempt(entries, meta, retries, out).await else {
            return;
        };
        // The journal failed, not the store: halves would meet the same outage.
        if failed.journal {
            out.failed.push(failed);
            return;
        }
        while failed.entries.len() > 1 {
            let mid = failed.entries.len() / 2;
            let right = failed.entries.split_off(mid);
            let right_meta = failed.meta.split_off(mid);
            let before = failed.attempts;
            // A dead letter counts every store call its entry took part in.
            let tried = |f: Option<Failed<V>>| {
                f.map(|mut f| {
                    f.attempts += before;
                    f
                })
            };
            let left = tried(self.attempt(failed.entries, failed.meta, 0, out).await);
            let right = tried(self.attempt(right, right_meta, 0, out).await);
            match (left, right) {
                (None, None) => return,
                (Some(one), None) | (None, Some(one)) => failed = one,
                (Some(a), Some(b)) => {
                    tracing::warn!(queue = %self.name, error = %b.error, "both halves of a failing batch failed: the store is down (or several entries are bad)");
                    out.failed.push(a);
                    out.failed.push(b);
                    return;
                }
            }
        }
        out.failed.push(failed);
    }

    /// One fenced store call with up to `retries` retries; `Some` with what failed.
    async fn attempt(
        &self,
        mut entries: Vec<(String, V)>,
        mut meta: Vec<(Version, Vec<Version>)>,
        retries: u32,
        out: &mut Outcome<V>,
    ) -> Option<Failed<V>> {
        let mut attempts = 0u32;
        // A journal (Redis) outage during the fence is waited out for up to the consumer's
        // lease in all (also across batches), without spending the store's retries: a healthy
        // store's writes were given up as dead letters after a Redis outage of a few seconds
        // (review, helper-69). Past the lease, or while the queue shuts down, the store's
        // retries apply as to any failure.
        #[cfg(feature = "redis")]
        let outage = self.config.durable.as_ref().map(|d| d.lease);
        #[cfg(not(feature = "redis"))]
        let outage = None::<Duration>;
        let mut journal_tries = 0u32;
        let mut journal = false;
        let mut busy_since: Option<Instant> = None;
        let result = loop {
            attempts += 1;
            let attempt = match self.fence(&mut entries, &mut meta, &mut out.acks).await {
                // A write-through of a key of the batch is in its store call (another
                // process's, or this one's): asked again shortly, without spending the store's
                // retries or counting as a journal outage. The journal answers "busy" for at
                // most a lease from that write's entry, so this ends. Meanwhile this process's
                // own stored direct writes are acknowledged: another process's batch may be
                // waiting for one of them while this one waits for its (review, helper-89 #2/#3).
                // (Bounded here too, at two leases: a Redis clock stepped back would stretch
                // the journal's own bound; past it the batch fails as after a journal outage.)
                Ok(Fenced::Busy) => {
                    let since = *busy_since.get_or_insert_with(Instant::now);
                    if outage.is_some_and(|lease| since.elapsed() < lease.saturating_mul(2)) {
                        attempts -= 1;
                        self.ack(Vec::new()).await;
                        tokio::time::sleep(JOURNAL_PAUSE).await;
                        continue;
                    }
                    journal = true;
                    Err(CacheError::Timeout {
                        operation: "write-behind fence (a write-through of a key of the batch stayed under way for two leases)",
                        after: since.elapsed(),
                    })
                }
                Err(e) => {
                    let wait = e.is_retryable() && {
                        let mut st = lock(&self.state);
                        let now = Instant::now();
                        // An outage is one run of failures no more than a lease apart: a
                        // failure long after the last one starts a new one (review, helper-73).
                        let ongoing = st.journal_last_failure.is_some_and(|last| {
                            outage.is_some_and(|lease| now.duration_since(last) < lease)
                        });
                        if !ongoing {
                            st.journal_down_since = Some(now);
                        }
                        st.journal_last_failure = Some(now);
                        let since = st.journal_down_since.unwrap_or(now);
                        !st.closing && outage.is_some_and(|lease| now.duration_since(since) < lease)
                    };
                    if wait {
                        attempts -= 1;
                        journal_tries += 1;
                        let pause = backoff(&self.config, journal_tries).max(JOURNAL_PAUSE);
                        tracing::warn!(queue = %self.name, entries = entries.len(), error = %e, retry_in = ?pause, "write-behind journal unavailable; the batch waits for it");
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                    journal = true;
                    Err(e)
                }
                Ok(Fenced::Done) if entries.is_empty() => {
                    lock(&self.state).journal_answered();
                    break Ok(());
                }
                Ok(Fenced::Done) => {
                    lock(&self.state).journal_answered();
                    journal = false;
                    self.stats.add(Counter::StoreCalls, 1);
                    let versions: Vec<WriteVersion> = meta
                        .iter()
                        .map(|((ms, seq), _)| WriteVersion { ms: *ms, seq: *seq })
                        .collect();
                    // A store that panics fails the attempt (retried, then dead-lettered)
                    // instead of ending the worker, which left every later flush waiting.
                    AssertUnwindSafe(self.store.store_batch_versioned(&entries, &versions))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            Err(CacheError::store(
                                "the store panicked while persisting a write-behind batch",
                            ))
                        })
                }
            };
            match attempt {
                Ok(()) => break Ok(()),
                Err(e) if attempts <= retries => {
                    self.stats.add(Counter::Retries, 1);
                    let pause = backoff(&self.config, attempts);
                    tracing::warn!(queue = %self.name, entries = entries.len(), attempt = attempts, error = %e, retry_in = ?pause, "write-behind store call failed");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(()) => {
                out.stored += entries.len() as u64;
                for ((key, value), (_, ids)) in entries.into_iter().zip(meta) {
                    out.acks.extend(ids.into_iter().map(|id| (key.clone(), id)));
                    out.stored_entries.push((key, value));
                }
                None
            }
            Err(error) => Some(Failed {
                entries,
                meta,
                error,
                attempts,
                journal,
            }),
        }
    }

    /// Durable mode: asks the journal about every entry of the batch (atomically) and keeps
    /// only those still ours and newest for their key; superseded ones are moved to `acks`,
    /// ones another process adopted are dropped. Nothing to do in memory mode.
    async fn fence(
        &self,
        entries: &mut Vec<(String, V)>,
        meta: &mut Vec<(Version, Vec<Version>)>,
        acks: &mut Vec<(String, Version)>,
    ) -> Result<Fenced> {
        let Some(journal) = &self.journal else {
            return Ok(Fenced::Done);
        };
        if entries.is_empty() {
            return Ok(Fenced::Done);
        }
        let asked: Vec<(&str, Version)> = entries
            .iter()
            .zip(meta.iter())
            .map(|((key, _), (version, _))| (key.as_str(), *version))
            .collect();
        let verdicts = journal.fence(&asked).await?;
        // A write-through of a key of this batch is in its store call: asked again later, so
        // that its outcome decides (see `attempt`).
        if verdicts.contains(&Verdict::Busy) {
            return Ok(Fenced::Busy);
        }
        let (mut superseded, mut lost) = (0u64, 0u64);
        let mut kept_entries = Vec::with_capacity(entries.len());
        let mut kept_meta = Vec::with_capacity(meta.len());
        let items: Vec<_> = entries.drain(..).zip(meta.drain(..)).collect();
        let mut rest = items.into_iter().zip(verdicts);
        while let Some(((mut entry, mut m), verdict)) = rest.next() {
            let verdict = match verdict {
                Verdict::Orphan(newest) => match self.orphan(journal, &entry.0, newest).await {
                    // Nothing is decided for this entry and the ones after it: they stay in the
                    // batch with those kept so far, for a retry to fence again (review,
                    // helper-72: the drained batch was dropped with the error, and the next
                    // attempt "stored" an empty batch: neither persisted nor dead-lettered).
                    Err(e) => {
                        kept_entries.push(entry);
                        kept_meta.push(m);
                        for ((entry, m), _) in rest {
                            kept_entries.push(entry);
                            kept_meta.push(m);
                        }
                        *entries = kept_entries;
                        *meta = kept_meta;
                        return Err(e);
                    }
                    Ok(None) => Verdict::Superseded,
                    Ok(Some(value)) => {
                        // Persisted in place of the older write (both acknowledged after), and
                        // the cached value evicted after: the orphan's cache write may never
                        // have happened.
                        tracing::warn!(queue = %self.name, key = %entry.0, "persisting a journaled write whose caller stopped waiting (or whose append timed out) in place of an older one");
                        entry.1 = value;
                        m.0 = newest;
                        m.1.push(newest);
                        lock(&self.state).adopted.insert(entry.0.clone());
                        Verdict::Persist
                    }
                },
                v => v,
            };
            match verdict {
                // (Busy is answered above, before any verdict is acted on.)
                Verdict::Persist | Verdict::Busy => {
                    kept_entries.push(entry);
                    kept_meta.push(m);
                }
                Verdict::Superseded | Verdict::Orphan(_) => {
                    superseded += 1;
                    acks.extend(m.1.into_iter().map(|id| (entry.0.clone(), id)));
                }
                Verdict::Lost => {
                    lost += 1;
                    let mut st = lock(&self.state);
                    if !st.pending.contains_key(&entry.0) {
                        st.adopted.remove(&entry.0);
                    }
                }
            }
        }
        *entries = kept_entries;
        *meta = kept_meta;
        if superseded > 0 {
            self.stats.superseded(superseded);
            tracing::debug!(queue = %self.name, superseded, "skipped writes superseded by newer journaled writes");
        }
        if lost > 0 {
            tracing::warn!(queue = %self.name, lost, "writes adopted by another process while this one stalled; not persisting them here");
        }
        Ok(Fenced::Done)
    }

    /// The value of `newest`, a write of `key` pending under this consumer that supersedes one
    /// about to be persisted — when this process does not know it (an orphan); `None` when it
    /// does (it is queued, a dead letter, or a write of the key is under way here) or the write
    /// is gone.
    async fn orphan(
        &self,
        journal: &Arc<dyn Journal<V>>,
        key: &str,
        newest: Version,
    ) -> Result<Option<V>> {
        let known = {
            let st = lock(&self.state);
            let holds =
                |version: Version, ids: &[Version]| version >= newest || ids.contains(&newest);
            st.writing.contains_key(key)
                || st
                    .pending
                    .get(key)
                    .is_some_and(|p| holds(p.version, &p.ids))
                || st.dead_of(key).is_some_and(|d| holds(d.version, &d.ids))
        };
        if known {
            return Ok(None);
        }
        Ok(journal
            .fetch(newest)
            .await?
            .filter(|r| r.key == key)
            .map(|r| r.value))
    }

    pub(crate) async fn ack(&self, mut ids: Vec<(String, Version)>) {
        let Some(journal) = &self.journal else { return };
        ids.append(&mut lock(&self.state).unacked);
        if ids.is_empty() {
            return;
        }
        if let Err(e) = journal.ack(&ids).await {
            tracing::warn!(queue = %self.name, entries = ids.len(), error = %e, "could not acknowledge persisted writes; will retry (they may be stored twice after a crash)");
            lock(&self.state).unacked.append(&mut ids);
        }
    }

    /// One step of the worker (or of an inline drain): persists a batch if one is ready.
    pub(crate) async fn step(&self, worker: bool) -> Step {
        let batch = {
            let mut st = lock(&self.state);
            if st.settle_flush() {
                self.flushed.send_replace(st.flushed);
            }
            let batch = st.take_batch(Instant::now(), &self.config);
            if batch.is_empty() {
                if worker && st.closing && st.pending.is_empty() && st.taken.is_empty() {
                    // Decided under the lock: a write racing with the exit sees `exited`.
                    st.exited = true;
                    return Step::Exit;
                }
                return Step::Idle(st.next_wake(self.config.batch_linger));
            }
            batch
        };
        // A batch that never ends (its drain cancelled, a store that panicked) must not leave
        // its keys "in flight" for good: write-throughs of them wait for that (`DirectWrite`).
        let unlanded = OnDrop(Some(|| {
            let mut st = lock(&self.state);
            st.flying.clear();
            st.in_flight = 0;
            drop(st);
            self.space.notify_waiters();
        }));
        self.persist(batch).await;
        unlanded.disarm();
        Step::Persisted
    }

    pub(crate) fn requeue_dead_letters(&self) -> usize {
        let mut st = lock(&self.state);
        let dead = st.take_all_dead();
        let n = dead.len();
        let now = Instant::now();
        for d in dead {
            let (_, superseded) =
                st.queue_or_park(d.letter.key, d.letter.value, d.version, now, d.ids, false);
            self.stats.superseded(superseded);
        }
        self.stats.replayed(n as u64);
        n
    }

    pub(crate) async fn recover(&self) -> Result<usize> {
        let Some(journal) = &self.journal else {
            return Ok(0);
        };
        // Back-pressure: adopt no more than there is room for; the rest waits for the next
        // pass (every lease / 3), still pending with the dead consumer.
        let room = {
            let st = lock(&self.state);
            self.config
                .max_pending
                .saturating_sub(st.pending.len() + st.in_flight)
        };
        if room == 0 {
            return Ok(0);
        }
        let adopted = journal.recover(room).await?;
        let n = adopted.len();
        if n > 0 {
            let mut st = lock(&self.state);
            let now = Instant::now();
            for r in adopted {
                // Its writer may have died before caching it: evicted once persisted.
                let (_, superseded) = st.queue_or_park(r.key, r.value, r.id, now, vec![r.id], true);
                self.stats.superseded(superseded);
            }
            drop(st);
            tracing::info!(queue = %self.name, entries = n, "adopted pending writes of a crashed process");
            self.stats.add(Counter::Recovered, n as u64);
            self.wake.notify_one();
        }
        Ok(n)
    }

    pub(crate) fn dead_letters(&self) -> Vec<DeadLetter<V>> {
        lock(&self.state)
            .dead
            .iter()
            .map(|d| d.letter.clone())
            .collect()
    }

    pub(crate) fn pending(&self) -> usize {
        let st = lock(&self.state);
        st.pending.len() + st.in_flight
    }

    pub(crate) fn stats(&self) -> WriteBehindStats {
        let st = lock(&self.state);
        self.stats.snapshot(
            (st.pending.len() + st.in_flight) as u64,
            st.dead.len() as u64,
        )
    }

    pub(crate) fn flush_error(&self, dead_before: u64) -> Result<()> {
        if self.stats.get(Counter::DeadLettered) > dead_before {
            return Err(lock(&self.state)
                .last_error
                .clone()
                .unwrap_or_else(|| CacheError::store("write-behind entries were dead-lettered")));
        }
        Ok(())
    }
}

/// The least pause between two fences of a batch waiting for the journal (`retry_backoff` may
/// be zero).
const JOURNAL_PAUSE: Duration = Duration::from_millis(20);

fn backoff(config: &WriteBehindConfig, attempt: u32) -> Duration {
    let exp = config
        .retry_backoff
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(config.max_retry_backoff);
    exp.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// Armed while a write's outcome is in the air (after its journal append, during its cache
/// write); a future dropped then hands the write to [`Shared::take_over`].
struct Unfinished<'a, V: QueueValue> {
    shared: &'a Shared<V>,
    key: &'a str,
    value: &'a V,
    delay: Duration,
    id: Option<Version>,
    armed: bool,
}

impl<V: QueueValue> Drop for Unfinished<'_, V> {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            if let Some(n) = st.writing.get_mut(self.key) {
                *n -= 1;
                if *n == 0 {
                    st.writing.remove(self.key);
                }
            }
        }
        if self.armed {
            self.shared
                .take_over(self.key, self.value, self.delay, self.id);
        }
    }
}

/// What a fence left of a batch.
enum Fenced {
    /// The batch holds what is to be persisted.
    Done,
    /// A direct write of one of its keys is in its store call: ask again later.
    Busy,
}

pub(crate) enum Step {
    Persisted,
    Idle(Option<Instant>),
    Exit,
}

pub(crate) async fn worker<V: QueueValue>(shared: Arc<Shared<V>>) {
    loop {
        let next = match shared.step(true).await {
            Step::Persisted => continue,
            Step::Exit => break,
            Step::Idle(next) => next,
        };
        {
            if !lock(&shared.state).unacked.is_empty() {
                shared.ack(Vec::new()).await;
            }
            let sleep = async {
                match next {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shared.wake.notified() => {}
                () = sleep => {}
            }
        }
    }
    if let Some(journal) = &shared.journal {
        shared.ack(Vec::new()).await;
        if let Err(e) = journal.retire().await {
            tracing::warn!(queue = %shared.name, error = %e, "could not leave the write-behind consumer group");
        }
    }
    shared.flushed.send_replace(u64::MAX);
}

pub(crate) async fn maintain<V: QueueValue>(shared: Weak<Shared<V>>, journal: Arc<dyn Journal<V>>) {
    let mut tick = tokio::time::interval(journal.maintenance_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            break;
        };
        if lock(&shared.state).exited {
            break;
        }
        if let Err(e) = journal.heartbeat().await {
            tracing::warn!(queue = %shared.name, error = %e, "write-behind lease renewal failed");
        }
        if let Err(e) = shared.recover().await {
            tracing::debug!(queue = %shared.name, error = %e, "write-behind recovery pass failed");
        }
    }
}

/// Entries the store refused after every attempt.
struct Failed<V> {
    entries: Vec<(String, V)>,
    meta: Vec<(Version, Vec<Version>)>,
    error: CacheError,
    attempts: u32,
    /// The journal failed (its fence), not the store.
    journal: bool,
}

/// A write-through or write-around of a key under way on a store with a write-behind queue
/// ([`Shared::direct_write`]): holds the key's write lock and its waiting write, if any.
/// [`stored`](Self::stored) once the store accepted the direct write: the waiting write (and
/// a dead letter of the key) is superseded — acknowledged, never persisted. Dropped without
/// that (the store call failed, or the caller was cancelled), the waiting write goes back to
/// its place in the queue.
pub(crate) struct DirectWrite<'a, V: QueueValue> {
    shared: &'a Shared<V>,
    key: &'a str,
    /// Held until the direct write's end (its cache write, eviction or mark included): a
    /// write-behind of the key waits for all of it, so the direct write's cache write cannot
    /// land over a newer write-behind's.
    _stripe: tokio::sync::MutexGuard<'a, ()>,
    taken: Option<Pending<V>>,
    /// The taken write was marked for eviction after its persist (adopted): marked again when
    /// it is put back.
    adopted: bool,
    /// The store accepted the direct write ([`stored`](Self::stored)): what a replay or an
    /// adoption parked meanwhile is superseded too, else it is queued.
    accepted: bool,
    /// Durable mode: the direct write's own journal entry ([`journal`](Self::journal)), and
    /// its value, until the direct write ends.
    journaled: Option<(Appended, V)>,
}

impl<V: QueueValue> DirectWrite<'_, V> {
    /// Durable mode, before the store call: when the key has journaled writes (of any
    /// process), journals the direct write as the key's newest write, so that another
    /// process's older write of the key, waiting in its own queue, is found superseded by its
    /// fence and never persisted after this one (one round trip; nothing is written when the
    /// key has none). Acknowledged once the store accepted it; taken back if the store call
    /// fails ([`failed`](Self::failed)). A journal that cannot be reached leaves the direct
    /// write unjournaled (a warning; the write-through's error contract is kept: only a
    /// store error means nothing was persisted).
    pub(crate) async fn journal(&mut self, value: &V) -> Result<()> {
        let Some(journal) = &self.shared.journal else {
            return Ok(());
        };
        {
            // After shutdown nothing would acknowledge the entry (review, helper-87 #2).
            let st = lock(&self.shared.state);
            if st.closing || st.exited {
                return Ok(());
            }
        }
        match journal.append_direct(self.key, value).await {
            Ok(Some(appended)) => self.journaled = Some((appended, value.clone())),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(queue = %self.shared.name, key = self.key, error = %e, "could not journal a write-through; an older write-behind of the key waiting in another process may still be persisted after it");
            }
        }
        Ok(())
    }

    /// The store call failed: the direct write's journal entry is taken back (other processes'
    /// older writes of the key, which waited for it, are the newest again). A withdrawal
    /// refused (the entry pinned: another process's fence took it for a newer write once its
    /// "busy" lease passed, a store call longer than a lease) or failing queues it here,
    /// persisted later. (Cancelled here, it is queued too, on drop.)
    pub(crate) async fn failed(&mut self) {
        let Some((appended, _)) = &self.journaled else {
            return;
        };
        let Some(journal) = &self.shared.journal else {
            return;
        };
        match journal.withdraw(self.key, *appended).await {
            Ok(true) => self.journaled = None,
            Ok(false) => {
                tracing::warn!(queue = %self.shared.name, key = self.key, "a failed write-through superseded another process's older write of the key; it is queued and will be persisted");
            }
            Err(e) => {
                tracing::warn!(queue = %self.shared.name, key = self.key, error = %e, "could not take back the journal entry of a failed write-through; it is queued and will be persisted");
            }
        }
    }

    /// The store accepted the direct write. The key stays locked until this is dropped.
    pub(crate) fn stored(&mut self) {
        self.accepted = true;
        let shared = self.shared;
        let mut st = lock(&shared.state);
        let mut superseded = 0;
        let mut ids = Vec::new();
        // Its own journal entry is done with.
        if let Some((appended, _)) = self.journaled.take() {
            ids.push(appended.id);
        }
        if let Some(p) = self.taken.take() {
            superseded += 1;
            ids.extend(p.ids);
            st.untake(p.seq);
        }
        if let Some(dead) = st.take_dead(self.key) {
            superseded += 1;
            ids.extend(dead.ids);
        }
        if !st.pending.contains_key(self.key) {
            st.adopted.remove(self.key);
        }
        // Journal entries are acknowledged by the worker (no await here: a cancelled caller
        // cannot drop them).
        st.unacked
            .extend(ids.into_iter().map(|id| (self.key.to_owned(), id)));
        shared.stats.superseded(superseded);
        shared.stats.pending_gauge(st.pending.len() + st.in_flight);
        drop(st);
        // A flush waiting for the superseded write settles.
        shared.wake.notify_one();
    }
}

impl<V: QueueValue> DirectWrite<'_, V> {
    /// The queue stopped while `value` was held back: kept as a dead letter (replayable), not
    /// lost.
    fn bury(&self, st: &mut State<V>, value: V, version: Version, ids: Vec<Version>) {
        tracing::warn!(queue = %self.shared.name, key = self.key, "the queue stopped during a failed write-through of a key with a waiting write-behind; that write is a dead letter now");
        st.push_dead(Dead {
            letter: DeadLetter {
                key: self.key.to_owned(),
                value,
                error: CacheError::Closed,
                attempts: 0,
                failed_at: SystemTime::now(),
            },
            version,
            ids,
        });
    }
}

impl<V: QueueValue> Drop for DirectWrite<'_, V> {
    fn drop(&mut self) {
        let shared = self.shared;
        let mut st = lock(&shared.state);
        let parked = st.direct.remove(self.key).unwrap_or_default();
        if self.taken.is_none() && parked.is_empty() && self.journaled.is_none() {
            return;
        }
        if let Some(p) = self.taken.take() {
            st.untake(p.seq);
            if self.adopted {
                st.adopted.insert(self.key.to_owned());
            }
            if st.exited {
                self.bury(&mut st, p.value, p.version, p.ids);
            } else {
                st.restore(self.key.to_owned(), p);
            }
        }
        // Writes a replay or an adoption queued meanwhile: older than an accepted direct
        // write (superseded, acknowledged by the worker), else queued as they would have been.
        let mut superseded = 0;
        for p in parked {
            st.untake(p.seq);
            if self.accepted {
                superseded += 1;
                st.unacked
                    .extend(p.ids.into_iter().map(|id| (self.key.to_owned(), id)));
            } else if st.exited {
                self.bury(&mut st, p.value, p.version, p.ids);
            } else {
                // Under its parked number: a flush that waited for it (the replay's own) still
                // does.
                if p.adopted {
                    st.adopted.insert(self.key.to_owned());
                }
                let mut pending = Pending {
                    value: p.value,
                    version: p.version,
                    due: Instant::now(),
                    seq: p.seq,
                    ids: p.ids,
                };
                // An adopted write meeting a dead letter of the key from before the direct
                // write: one entry, the newer value, every id (as `State::insert` merges).
                if let Some(dead) = st.take_dead(self.key) {
                    superseded += 1;
                    if dead.version > pending.version {
                        pending.value = dead.letter.value;
                        pending.version = dead.version;
                    }
                    pending.ids.extend(dead.ids);
                }
                st.restore(self.key.to_owned(), pending);
            }
        }
        // Its own journal entry, not taken back (a failed store call whose entry superseded
        // another process's write, or a caller cancelled): persisted like an adopted write,
        // its key evicted after (the store call may not have happened, and the cache was not
        // written). After the worker exited it stays in the journal for another process.
        if let Some((appended, value)) = self.journaled.take()
            && !st.exited
        {
            st.insert(
                self.key.to_owned(),
                value,
                appended.id,
                Instant::now(),
                vec![appended.id],
            );
            st.adopted.insert(self.key.to_owned());
        }
        shared.stats.superseded(superseded);
        shared.stats.pending_gauge(st.pending.len() + st.in_flight);
        drop(st);
        shared.wake.notify_one();
    }
}

/// Runs its closure when dropped before [`disarm`](Self::disarm).
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// What persisting a batch came to.
struct Outcome<V> {
    stored: u64,
    /// The entries stored (for the eviction of adopted keys and the check of the others).
    stored_entries: Vec<(String, V)>,
    acks: Vec<(String, Version)>,
    failed: Vec<Failed<V>>,
}

impl<V> Default for Outcome<V> {
    fn default() -> Self {
        Self {
            stored: 0,
            stored_entries: Vec::new(),
            acks: Vec::new(),
            failed: Vec::new(),
        }
    }
}
