//! Cross-instance coherence over Redis pub/sub, and the distributed stampede lock.
//!
//! Every set / delete / clear publishes an invalidation on the channel `l1:{cache name}`
//! (inside the Redis prefix): `[B][instance id: 8 bytes]` followed by entries
//! `[op][key length: u32 LE][key]`. Every other instance evicts those keys (or everything) from
//! its L1; an instance ignores its own messages. While the subscription is down, L1 is
//! bypassed; when it comes back, L1 is cleared before it is used again, so nothing missed
//! during the outage is ever served.
//!
//! Publishing is batched. An uncontended write sends its value and its invalidation in one
//! round trip (so when `set` returns, the invalidation is published). While a PUBLISH is in
//! flight, later writes write their value alone and queue their invalidation, which a flush
//! task publishes with every other queued key in the next message, right after the one in
//! flight; those writes return without waiting for it (as FusionCache's background backplane
//! operations do), which keeps a write at one round trip under load. One PUBLISH then carries
//! many keys, so Redis and every subscriber handle a fraction of the messages; the stale
//! window grows by at most that one round trip.
//!
//! Nothing is dropped: every message carries this instance's sequence number (`[Q][id][seq]`
//! then entries); a PUBLISH that fails is resent, with the same number and before anything
//! newer, with backoff (10 ms doubling to 1 s) until it gets through or the cache is closed; a
//! write that reaches Redis meanwhile cuts the backoff short (a retry at most 20 ms after the
//! last attempt), so a write acknowledged after an outage is not announced a second late.
//! A receiver that sees a sender's number jump (a message lost) makes all of its L1
//! stale-only, as after a disconnect. On Redis Cluster a write and its PUBLISH are sent apart
//! (they hash to different slots).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ncm_cache_core::{CacheError, Codec, LoadEnd, Result, ValueSource};
use ncm_cache_redis::{PubSubEvent, RedisBackend, RedisLock};
use std::future::Future;

use crate::breaker::CircuitBreaker;
use crate::cache::{CacheValue, Fill, Found, Inner, Link, Object};
use crate::load::backoff;
use crate::stats::Counters;

const SET: u8 = b'S';
const DELETE: u8 = b'D';
const CLEAR: u8 = b'C';
/// Delete the keys matching a glob pattern (the entry's "key").
const PATTERN: u8 = b'P';
/// A load's value withdrawn from L2 (`recent.rs`): drop the key from L1, but do not check
/// this instance's own loads of it — no source changed, and checking would let withdrawals
/// chase each other's fresh loads of a hot key. (Versions before it ignore the entry.)
const WITHDRAWN: u8 = b'W';
/// A load's or an eager refresh's store (a value read from the source): drop the key from L1
/// as for SET, but not taken as a write that a refresh of this instance may have overwritten
/// (`recent.rs`): concurrent refreshes store the same bytes, and taking each other's stores
/// for writes, they withdrew each other's values of a hot key (found by review). (Versions
/// before it ignore the entry: their L1 copy then ends with its TTL.)
const LOADED: u8 = b'L';
/// A message of one or more `[op][len][key]` entries (read, no longer sent).
const BATCH: u8 = b'B';
/// A message with the sender's sequence number: `[Q][id: 8][seq: 8]` then entries.
const SEQUENCED: u8 = b'Q';
/// Queued entries past this many bytes are replaced by one CLEAR (a long outage must not grow
/// the queue without bound; receivers then drop everything, which is always safe).
const MAX_QUEUED: usize = 1 << 20;

pub(crate) struct Backplane {
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub(crate) batch: Arc<Batcher>,
}

/// Where invalidations go and the batching of them (see the module docs); shared with the
/// flush task.
pub(crate) struct Batcher {
    redis: Arc<RedisBackend>,
    channel: String,
    /// This instance's id in every message (its own messages are ignored on receipt).
    id: u64,
    /// The next message's sequence number.
    seq: AtomicU64,
    pending: Mutex<Pending>,
    /// Failed PUBLISHes (each retried): the stats' `backplane_errors`.
    pub(crate) errors: AtomicU64,
    /// Set when the cache closes: retries stop.
    stopped: AtomicBool,
    /// L2's circuit breaker when the backplane is L2's Redis: while it is open, invalidations
    /// wait in the queue instead of each waiting a response timeout on a server known down.
    breaker: Option<Arc<CircuitBreaker>>,
    /// Rung when a write reached Redis while the flush task backs off: Redis answers, so the
    /// queue is retried now instead of after up to a second (a write acknowledged right after
    /// an outage — a cluster failover — would otherwise leave other instances' copies that long).
    wake: tokio::sync::Notify,
}

/// After a wake, the flush task retries no sooner than this after its last attempt, so a steady
/// stream of writes during a partial outage (the channel's node down, other nodes up) does not
/// turn the retries into a busy loop.
const WOKEN_RETRY: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Pending {
    /// A PUBLISH is in flight (by a leading writer or the flush task).
    flushing: bool,
    /// Queued entries, already encoded, not yet numbered.
    entries: Vec<u8>,
    /// Numbered messages not yet published (a failed one first), sent in order.
    outbox: VecDeque<Vec<u8>>,
}

/// The right to publish without queueing; on drop, whatever queued meanwhile is handed to a
/// flush task (also when the leader's future is cancelled).
pub(crate) struct Lead<'a>(&'a Arc<Batcher>);

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let mut p = self.0.lock();
        if p.entries.is_empty() && p.outbox.is_empty() {
            p.flushing = false;
        } else {
            drop(p);
            self.0.spawn_flush();
        }
    }
}

impl Batcher {
    /// The next numbered message carrying `entries`. Numbers are taken by whoever may
    /// publish (the leader or the flush task), so they go out in order.
    fn message(&self, entries: &[u8]) -> Vec<u8> {
        message(self.id, self.seq.fetch_add(1, Ordering::Relaxed), entries)
    }

    /// Publishes one message; `false` (counted, logged) when it failed.
    async fn send(&self, msg: &[u8]) -> bool {
        let permit = match &self.breaker {
            Some(breaker) => match breaker.allow() {
                Some(permit) => Some(permit),
                // Not attempted (the circuit is open): deferred, not a failure.
                None => return false,
            },
            None => None,
        };
        // A cancelled send drops the permit unreported: a probe then counts as failed.
        match self.redis.publish(&self.channel, msg).await {
            Ok(_) => {
                if let Some(p) = permit {
                    p.success();
                }
                true
            }
            Err(e) => {
                if let Some(p) = permit {
                    if e.is_unavailable() {
                        p.failure();
                    } else {
                        p.success();
                    }
                }
                self.failed(&e);
                false
            }
        }
    }

    /// `true` when L2's breaker (gating this backplane) is open: publish later, from the queue.
    fn circuit_open(&self) -> bool {
        self.breaker.as_ref().is_some_and(|b| b.is_open())
    }

    fn failed(&self, e: &CacheError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "backplane publish failed; retrying (other instances serve their L1 copy until it gets through)");
    }

    /// A leader's message that did not go out: first in line for the flush task.
    fn retry_first(&self, msg: Vec<u8>) {
        self.lock().outbox.push_front(msg);
    }

    /// The queue. Nothing panics while holding it; a poisoned lock is still used rather than
    /// dropping invalidations.
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn try_lead(self: &Arc<Self>) -> Option<Lead<'_>> {
        let mut p = self.lock();
        if p.flushing {
            return None;
        }
        p.flushing = true;
        Some(Lead(self))
    }

    /// Queues an entry for the next message; starts the flush task when none is running.
    fn enqueue(self: &Arc<Self>, op: u8, key: &str) {
        self.enqueue_entries(&entry(op, key));
    }

    /// Queues encoded entries (see [`enqueue`](Self::enqueue)).
    fn enqueue_entries(self: &Arc<Self>, entries: &[u8]) {
        let start = {
            let mut p = self.lock();
            if p.entries.len() > MAX_QUEUED {
                p.entries.clear();
                encode_entry(&mut p.entries, CLEAR, "");
            }
            p.entries.extend_from_slice(entries);
            !std::mem::replace(&mut p.flushing, true)
        };
        if start {
            self.spawn_flush();
        }
    }

    /// Publishes queued entries until none are left, as a task: no caller's cancellation can
    /// strand other callers' entries.
    fn spawn_flush(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let flush = async move {
            loop {
                let next = {
                    let mut p = this.lock();
                    if p.outbox.is_empty() && !p.entries.is_empty() {
                        let entries = std::mem::take(&mut p.entries);
                        for part in chunks(&entries, MAX_MESSAGE) {
                            let msg = this.message(part);
                            p.outbox.push_back(msg);
                        }
                    }
                    match p.outbox.pop_front() {
                        Some(msg) => msg,
                        None => {
                            p.flushing = false;
                            return;
                        }
                    }
                };
                let mut attempt = 0u32;
                while !this.send(&next).await {
                    if this.stopped.load(Ordering::Relaxed) {
                        return;
                    }
                    let failed = Instant::now();
                    let wait = Duration::from_millis(10u64 << attempt.min(7));
                    tokio::select! {
                        () = tokio::time::sleep(wait.min(Duration::from_secs(1))) => {}
                        () = this.wake.notified() => {
                            let since = failed.elapsed();
                            if since < WOKEN_RETRY {
                                tokio::time::sleep(WOKEN_RETRY - since).await;
                            }
                        }
                    }
                    attempt += 1;
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(flush);
            }
            // No runtime (a drop outside one): nothing can publish them.
            Err(_) => {
                let mut p = self.lock();
                p.entries.clear();
                p.flushing = false;
                drop(p);
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A numbered message not yet known to be published: dropped still holding it (a failure or a
/// cancelled caller), it goes first in line for the flush task, so its number is never skipped.
struct Unsent<'a>(&'a Arc<Batcher>, Option<Vec<u8>>);

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(msg) = self.1.take() {
            self.0.retry_first(msg);
        }
    }
}

/// Entries per message stop growing past this many bytes (a longer single entry goes alone).
const MAX_MESSAGE: usize = 64 * 1024;

/// Splits encoded entries into runs of at most `max` bytes, at entry boundaries.
fn chunks(entries: &[u8], max: usize) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let (mut start, mut at) = (0, 0);
    while at < entries.len() {
        let len = entries
            .get(at + 1..at + 5)
            .and_then(|b| b.try_into().ok())
            .map_or(usize::MAX, |b| u32::from_le_bytes(b) as usize);
        let next = (at + 5).saturating_add(len).min(entries.len());
        if next - start > max && at > start {
            parts.push(&entries[start..at]);
            start = at;
        }
        at = next;
    }
    if start < entries.len() {
        parts.push(&entries[start..]);
    }
    parts
}

/// Message `seq` from instance `id` carrying encoded `entries`.
fn message(id: u64, seq: u64, entries: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(17 + entries.len());
    m.push(SEQUENCED);
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(entries);
    m
}

fn encode_entry(out: &mut Vec<u8>, op: u8, key: &str) {
    out.push(op);
    // Keys are bounded by the key length limit, far below 4 GiB.
    out.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
}

/// A message from another instance.
#[derive(Debug, PartialEq)]
struct Received<'a> {
    origin: u64,
    /// The sender's sequence number (`None` from versions that did not number messages).
    seq: Option<u64>,
    entries: Vec<(u8, &'a [u8])>,
}

/// Decodes a message from another instance; `None` for our own messages and for messages
/// this version does not understand.
fn decode(payload: &[u8], own_id: u64) -> Option<Received<'_>> {
    let (&kind, rest) = payload.split_first()?;
    let origin = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    if origin == own_id {
        return None;
    }
    let (seq, mut body) = match kind {
        BATCH => (None, rest.get(8..)?),
        SEQUENCED => (
            Some(u64::from_le_bytes(rest.get(8..16)?.try_into().ok()?)),
            rest.get(16..)?,
        ),
        _ => return None,
    };
    let mut entries = Vec::new();
    while let Some((&op, rest)) = body.split_first() {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let end = len.checked_add(4)?;
        entries.push((op, rest.get(4..end)?));
        body = rest.get(end..)?;
    }
    Some(Received {
        origin,
        seq,
        entries,
    })
}

/// The last sequence number seen per sender, to detect a lost message.
#[derive(Default)]
struct Senders(HashMap<u64, u64>);

impl Senders {
    /// Records `seq` from `origin`; `true` when messages before it were lost.
    fn gap(&mut self, origin: u64, seq: u64) -> bool {
        // Bounded: forgetting senders only means their next message is not checked.
        if self.0.len() > 10_000 {
            self.0.clear();
        }
        match self.0.get_mut(&origin) {
            Some(last) if seq > *last => {
                let lost = seq > *last + 1;
                *last = seq;
                lost
            }
            // A resent message that did arrive the first time: nothing lost.
            Some(_) => false,
            None => {
                self.0.insert(origin, seq);
                false
            }
        }
    }
}

impl Backplane {
    pub(crate) fn new(
        redis: Arc<RedisBackend>,
        name: &str,
        breaker: Option<Arc<CircuitBreaker>>,
    ) -> Self {
        Self {
            batch: Arc::new(Batcher {
                redis,
                channel: format!("l1:{name}"),
                id: fastrand::u64(..),
                seq: AtomicU64::new(0),
                pending: Mutex::new(Pending::default()),
                errors: AtomicU64::new(0),
                stopped: AtomicBool::new(false),
                breaker,
                wake: tokio::sync::Notify::new(),
            }),
            task: Mutex::new(None),
        }
    }

    pub(crate) fn stop(&self) {
        self.batch.stopped.store(true, Ordering::Relaxed);
        if let Ok(mut task) = self.task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }
}

/// One encoded `[op][len][key]` entry.
fn entry(op: u8, key: &str) -> Vec<u8> {
    let mut entry = Vec::with_capacity(5 + key.len());
    encode_entry(&mut entry, op, key);
    entry
}

impl Drop for Backplane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the listener task. L1 stays bypassed until the subscription is live.
pub(crate) fn start<C: Codec>(inner: &Arc<Inner<C>>) -> Result<()> {
    let Some(bp) = &inner.backplane else {
        return Ok(());
    };
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        CacheError::Config("the backplane needs a tokio runtime: build the cache inside one".into())
    })?;
    let weak: Weak<Inner<C>> = Arc::downgrade(inner);
    let redis = Arc::clone(&bp.batch.redis);
    let id = bp.batch.id;
    let name = bp.batch.channel.clone();
    let task = handle.spawn(async move {
        let mut attempt = 0;
        let mut sub = loop {
            match redis.subscribe(&[name.as_str()]).await {
                Ok(sub) => break sub,
                Err(e) => {
                    tracing::warn!(error = %e, "backplane subscribe failed; retrying");
                    if weak.strong_count() == 0 {
                        return;
                    }
                    tokio::time::sleep(backoff(attempt).max(Duration::from_millis(50))).await;
                    attempt += 1;
                }
            }
        };
        if let Some(inner) = weak.upgrade() {
            resync(&inner, true);
        }
        let mut senders = Senders::default();
        while let Some(event) = sub.recv().await {
            let Some(inner) = weak.upgrade() else { return };
            match event {
                PubSubEvent::Message { payload, .. } => {
                    let Some(msg) = decode(&payload, id) else {
                        continue;
                    };
                    // Loads stored here that these deletes may have overtaken (`recent.rs`):
                    // checked in a task of their own.
                    let now = inner.opts.now_nanos();
                    let mut withdraw = Vec::new();
                    if msg.seq.is_some_and(|seq| senders.gap(msg.origin, seq)) {
                        tracing::warn!("backplane message lost: L1 made stale-only");
                        inner.mark_l1_stale();
                        Counters::bump(&inner.counters.resyncs);
                        // No sign of a delete: nothing to withdraw (a delete lost with the
                        // message is not covered); what is remembered stays checked.
                    }
                    for (op, key) in msg.entries {
                        Counters::bump(&inner.counters.backplane_received);
                        match op {
                            CLEAR => {
                                inner.remote_clear();
                                let stored = inner.recent.deleted_matching(now, |_| true);
                                // With epochs, a load's store cannot land in the new one.
                                if inner.epoch.is_none() {
                                    withdraw.extend(stored);
                                }
                            }
                            PATTERN => {
                                // A pattern L1 refuses (over the key length limit: a
                                // hostile or broken publisher) is not compiled again here.
                                if let Ok(pattern) = std::str::from_utf8(key)
                                    && inner.invalidate_l1_matching(pattern).is_ok()
                                    && let Ok(glob) = ncm_cache_core::GlobPattern::new(pattern)
                                {
                                    withdraw.extend(
                                        inner.recent.deleted_matching(now, |k| glob.matches(k)),
                                    );
                                }
                            }
                            WITHDRAWN | LOADED => {
                                if let Ok(key) = std::str::from_utf8(key) {
                                    let _ = inner.invalidate_l1(key);
                                }
                            }
                            // A write never leaves an older load behind: an "only if absent"
                            // store after it is refused, one before it is overwritten. An
                            // eager refresh's plain store may have landed over it: checked.
                            SET => {
                                if let Ok(key) = std::str::from_utf8(key) {
                                    let _ = inner.invalidate_l1(key);
                                    withdraw.extend(
                                        inner
                                            .recent
                                            .overwritten(key, now, 0)
                                            .into_iter()
                                            .map(|d| (key.to_owned(), d)),
                                    );
                                }
                            }
                            DELETE => {
                                if let Ok(key) = std::str::from_utf8(key) {
                                    let _ = inner.invalidate_l1(key);
                                    withdraw.extend(
                                        inner
                                            .recent
                                            .deleted(key, now)
                                            .into_iter()
                                            .map(|d| (key.to_owned(), d)),
                                    );
                                }
                            }
                            _ => {}
                        }
                    }
                    if !withdraw.is_empty() {
                        let inner = Arc::clone(&inner);
                        let each = withdraw.into_iter().map(|(k, d)| (k, d, true)).collect();
                        tokio::spawn(async move { inner.withdraw_loads_here(each).await });
                    }
                }
                PubSubEvent::Disconnected => {
                    // The senders' numbers are kept across the outage: the first message of
                    // each sender afterwards shows what was missed meanwhile as a gap (one
                    // more resync, harmless), and — what forgetting them missed — a message
                    // lost right after the reconnect (a cluster's bus still settling after a
                    // failover) shows as a gap at that sender's next message.
                    inner.link_down(Link::Backplane);
                    tracing::warn!(
                        "backplane disconnected: L1 serves nothing as fresh until it is back"
                    );
                }
                PubSubEvent::Reconnected => {
                    resync(&inner, false);
                    // Messages sent meanwhile are lost; no sign of a delete: nothing to
                    // withdraw (a delete lost with them is not covered).
                    tracing::info!("backplane reconnected: L1 cleared and resumed");
                }
                _ => {}
            }
        }
        // The subscription ended (it never does while it runs): nothing invalidates L1 any more.
        if let Some(inner) = weak.upgrade() {
            inner.link_down(Link::Backplane);
            tracing::error!("backplane listener ended: L1 stays off");
        }
    });
    if let Ok(mut slot) = bp.task.lock() {
        *slot = Some(task);
    }
    Ok(())
}

/// Makes L1 stale-only (anything may have changed while we were not listening) and turns it
/// on once every coherence link is up.
fn resync<C: Codec>(inner: &Inner<C>, first: bool) {
    inner.link_up(Link::Backplane, first);
}

impl<C: Codec> Inner<C> {
    /// Publishes an invalidation: at once (returning when it is published) when no PUBLISH
    /// is in flight, else queued for the next message (returning at once).
    async fn publish(&self, op: u8, key: &str, written: bool) {
        self.publish_entries(entry(op, key), written).await;
    }

    /// Publishes encoded entries as one message (see [`publish`](Self::publish)); more than
    /// one message's worth goes through the queue, which splits it.
    ///
    /// `written`: the caller's write just reached L2, so Redis answers (see `Batcher::wake`).
    async fn publish_entries(&self, entries: Vec<u8>, written: bool) {
        if self.backplane.is_none() {
            return;
        }
        let span = tracing::info_span!(
            "ncm_cache.backplane.publish",
            cache = %self.opts.name,
            bytes = entries.len()
        );
        tracing::Instrument::instrument(self.publish_entries_now(entries, written), span).await;
    }

    async fn publish_entries_now(&self, entries: Vec<u8>, written: bool) {
        let Some(bp) = &self.backplane else { return };
        // With L2's circuit open, the flush task sends it once L2 answers again.
        let lead = match bp.batch.circuit_open() || entries.len() > MAX_MESSAGE {
            true => None,
            false => bp.batch.try_lead(),
        };
        let Some(lead) = lead else {
            bp.batch.enqueue_entries(&entries);
            if written {
                // Redis took this write: a flush task backing off may retry now.
                bp.batch.wake.notify_one();
            }
            return;
        };
        // Resent by the flush task unless published (also when this future is cancelled).
        let mut unsent = Unsent(&bp.batch, Some(bp.batch.message(&entries)));
        let msg = unsent.1.clone().unwrap_or_default();
        // Boxed: redis-rs futures are deep; keep them out of every write path's future type.
        let publish: std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>> =
            Box::pin(bp.batch.send(&msg));
        if publish.await {
            unsent.1 = None;
        }
        drop(unsent);
        drop(lead);
    }

    /// When L2 is the backplane's own Redis: the write and its invalidation in one round trip.
    /// `None` when that does not apply (the caller writes and publishes separately).
    pub(crate) async fn write_and_publish(
        &self,
        key: &str,
        bytes: &ncm_cache_core::Bytes,
        ttl: Option<Duration>,
    ) -> Option<Result<()>> {
        let bp = self.backplane.as_ref()?;
        // `l2`, not `l2_raw`: with epochs L2 is the epoch wrapper, and the combined path would
        // write the bare key; such writes go through the wrapper, then publish.
        let same = self.epoch.is_none()
            && std::ptr::addr_eq(Arc::as_ptr(&self.l2), Arc::as_ptr(&bp.batch.redis));
        // On a cluster the key and the channel hash to different slots: no shared pipeline.
        if !same || bp.batch.redis.is_cluster() {
            return None;
        }
        // Another invalidation in flight: the caller writes alone and queues its own.
        let lead = bp.batch.try_lead()?;
        let mut unsent = Unsent(&bp.batch, Some(bp.batch.message(&entry(SET, key))));
        let msg = unsent.1.clone().unwrap_or_default();
        let write: std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> = Box::pin(
            bp.batch
                .redis
                .set_and_publish(key, bytes, ttl, &bp.batch.channel, &msg),
        );
        let written = self.l2_call("set+publish", write).await;
        // On an error (maybe published, maybe not) or a cancellation the message is resent;
        // a receiver ignores a duplicate number.
        if written.is_ok() {
            unsent.1 = None;
        }
        drop(unsent);
        drop(lead);
        Some(written)
    }

    /// Queues a delete of `key` for the flush task, without waiting (usable in a `Drop`).
    pub(crate) fn queue_delete(&self, key: &str) {
        if let Some(bp) = &self.backplane {
            bp.batch.enqueue(DELETE, key);
        }
    }

    /// Queues a CLEAR for the flush task, without waiting (usable in a `Drop`).
    pub(crate) fn queue_clear(&self) {
        if let Some(bp) = &self.backplane {
            bp.batch.enqueue(CLEAR, "");
        }
    }

    /// Queues a pattern delete for the flush task, without waiting (usable in a `Drop`).
    pub(crate) fn queue_pattern(&self, pattern: &str) {
        if let Some(bp) = &self.backplane {
            bp.batch.enqueue(PATTERN, pattern);
        }
    }

    /// Publishes a SET of every key in one message (a batch write that reached L2).
    /// Announces the stores of a batch of loads (see [`LOADED`]).
    pub(crate) async fn publish_loads<'k>(&self, keys: impl Iterator<Item = &'k str>) {
        self.publish_all(LOADED, keys, true).await;
    }

    /// Announces a load's or an eager refresh's store (see [`LOADED`]).
    pub(crate) async fn publish_loaded(&self, key: &str) {
        self.publish(LOADED, key, true).await;
    }

    /// Announces a write or delete of this instance's L1 only (`skip_l2_write`, `set_at` L1):
    /// other instances drop their L1 copy, as for a load's store ([`LOADED`]), and take it
    /// for no write of L2 — they do not withdraw their own recent loads of the key from L2
    /// (before, a local-only delete made them delete the key from L2: review, helper-85 #3).
    pub(crate) async fn publish_local(&self, key: &str) {
        self.publish(LOADED, key, false).await;
    }

    /// Announces a load's value withdrawn from L2 (see [`WITHDRAWN`]).
    pub(crate) async fn publish_withdrawn(&self, key: &str) {
        self.publish(WITHDRAWN, key, false).await;
    }

    /// Publishes a DELETE of every key in one message (a failed batch write).
    pub(crate) async fn publish_deletes<'k>(&self, keys: impl Iterator<Item = &'k str>) {
        self.publish_all(DELETE, keys, false).await;
    }

    async fn publish_all<'k>(&self, op: u8, keys: impl Iterator<Item = &'k str>, written: bool) {
        let mut entries = Vec::new();
        for key in keys {
            encode_entry(&mut entries, op, key);
        }
        if !entries.is_empty() {
            self.publish_entries(entries, written).await;
        }
    }

    /// The invalidation of a write (after it reached L2, or of this instance's L1 only).
    pub(crate) async fn publish_set(&self, key: &str) {
        self.publish(SET, key, true).await;
    }

    /// The invalidation of a delete (also of one whose L2 call failed).
    pub(crate) async fn publish_delete(&self, key: &str) {
        self.publish(DELETE, key, false).await;
    }

    pub(crate) async fn publish_clear(&self) {
        self.publish(CLEAR, "", false).await;
    }

    pub(crate) async fn publish_pattern(&self, pattern: &str) {
        self.publish(PATTERN, pattern, false).await;
    }

    /// With a distributed lock: take it, or wait for the holder's value to appear in L2.
    ///
    /// `check_first`: after taking the lock, look in L2 before loading (someone may have
    /// loaded just before); off for an eager refresh, which must replace what L2 holds. A
    /// waiter that gives up after `lock_wait` loads itself, or — when it has a stale value —
    /// fails with a timeout, so that fail-safe serves the stale value.
    ///
    /// `found`: reads L2 for the holder's value (and fills L1 with it, checked against the
    /// ticket taken before the wait began), as the caller holds values (decoded, or the
    /// encoded bytes of the byte-level backend); `poll`, whether it is read while waiting
    /// too (see below).
    pub(crate) async fn lock_or_wait<X, R, F>(
        &self,
        key: &str,
        check_first: bool,
        serve_until: Option<u64>,
        eff: &crate::options::Eff,
        (found, poll): (R, bool),
    ) -> Result<LockOutcome<X>>
    where
        R: Fn(crate::versions::Ticket) -> F,
        F: Future<Output = Option<X>>,
    {
        let Some(redis) = &self.lock else {
            return Ok(LockOutcome::Proceed(None));
        };
        // The lock shares a load through L2: a call that does not read L2 cannot see the
        // holder's result, and one that does not write L2 cannot give its own.
        if !eff.read_l2() || !eff.write_l2() {
            return Ok(LockOutcome::Proceed(None));
        }
        let now = Instant::now();
        // `Duration::MAX` waits (about 30 years), it does not give up at once.
        let deadline = now + ncm_cache_core::capped(self.opts.lock_wait);
        let name = format!("load:{key}");
        let mut attempt = 0;
        // When the lock lives on L2's Redis, it goes through L2's circuit breaker: an open
        // circuit skips the lock (loading without it) instead of waiting on a dead server.
        let through_breaker = std::ptr::addr_eq(Arc::as_ptr(&self.l2_raw), Arc::as_ptr(redis));
        // Taken before the first read: a negative fill from the holder's note must not land
        // over an invalidation heard at any time while this call waited.
        let first = self.versions.ticket(key);
        loop {
            let attempt_lock = redis.try_lock(&name, self.opts.lock_ttl);
            let taken = if through_breaker {
                self.l2_call("lock", attempt_lock).await
            } else {
                attempt_lock.await
            };
            match taken {
                Ok(Some(guard)) => {
                    // Someone may have loaded and released just before we got the lock.
                    if check_first && let Some(found) = found(first).await {
                        let _ = guard.release().await;
                        return Ok(LockOutcome::Found(found));
                    }
                    return Ok(LockOutcome::Proceed(Some(guard)));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(key, error = %e, "stampede lock unavailable; loading without it");
                    return Ok(LockOutcome::Proceed(None));
                }
            }
            // `poll`: look for the holder's value while it holds the lock. Off for a caller
            // that refuses what L2 holds now (`SqlCache`: a result under older tokens, read in
            // full on every poll): it looks once it takes the lock, which the holder releases
            // after its store.
            if poll && let Some(found) = found(first).await {
                return Ok(LockOutcome::Found(found));
            }
            // The holder found nothing: it left that in the lock (see `release_with_note`).
            let note = redis.lock_note(&name);
            let note = if through_breaker {
                self.l2_call("lock_note", note).await
            } else {
                note.await
            };
            match note.ok().flatten().as_deref() {
                Some(NOT_FOUND) => {
                    if eff.negative_ttl.is_some() {
                        self.l1_fill(key, Fill::negative(), &first, eff);
                    }
                    return Ok(LockOutcome::Absent);
                }
                // The holder's answer was not cached, or the key was deleted during its load
                // (`overrule_load`): nothing will appear in L2 to wait for.
                Some(NOT_CACHED) => return Ok(LockOutcome::Proceed(None)),
                _ => {}
            }
            if Instant::now() >= deadline {
                if serve_until.is_some_and(|until| self.opts.now_nanos() <= until) {
                    return Err(CacheError::Timeout {
                        operation: "stampede lock wait",
                        after: self.opts.lock_wait,
                    });
                }
                tracing::warn!(key, "stampede lock wait timed out; loading");
                return Ok(LockOutcome::Proceed(None));
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// A delete of `key`: a load of it under way elsewhere may have read the source before
    /// the change the delete stands for, so its lock (or the "not found" note it left) is
    /// overruled by an "uncached" note — its waiters, and callers in the next [`NOTE_KEEP`],
    /// load themselves instead of taking its answer. Without a lock, nothing.
    pub(crate) async fn overrule_load(&self, key: &str) {
        let Some(redis) = &self.lock else { return };
        let name = format!("load:{key}");
        let overrule = redis.overrule_lock(&name, NOT_CACHED, NOTE_KEEP);
        let r = if std::ptr::addr_eq(Arc::as_ptr(&self.l2_raw), Arc::as_ptr(redis)) {
            self.l2_call("lock", overrule).await
        } else {
            overrule.await
        };
        if let Err(e) = r {
            tracing::warn!(key, error = %e, "a load of the deleted key under way elsewhere could not be overruled: its waiters may take its answer");
        }
    }

    /// Releases a load lock leaving a note for [`NOTE_KEEP`]: after a loader that found
    /// nothing, the callers waiting for it return `None` instead of loading again; after an
    /// answer that was not cached (`do_not_cache`), they load at once instead of one by one.
    pub(crate) async fn release_with_note(&self, lock: RedisLock, note: LockNote) {
        let note = match note {
            LockNote::NotFound => NOT_FOUND,
            LockNote::NotCached => NOT_CACHED,
        };
        if let Err(e) = lock.release_with_note(note, NOTE_KEEP).await {
            tracing::debug!(error = %e, "stampede lock not released (it expires by itself)");
        }
    }

    /// The lock holder's value in L2, decoded as `T` (L1 filled with it unless the key was
    /// invalidated since `ticket`, taken before the wait: a delete heard while waiting keeps a
    /// value stored before it out of L1).
    pub(crate) async fn found_in_l2<T: CacheValue>(
        &self,
        key: &str,
        eff: &crate::options::Eff,
        ticket: crate::versions::Ticket,
    ) -> Option<Found> {
        match self.l2_read::<T>(key, eff).await {
            Ok(Some((v, size))) => {
                let v = v as Object;
                let fill = Fill::value(Arc::clone(&v), size, eff.l2_ttl);
                self.l1_fill(key, fill, &ticket, eff);
                Some((Some(v), ValueSource::L2))
            }
            _ => None,
        }
    }

    /// The lock holder's value in L2 as the byte-level backend holds it: the encoded bytes
    /// (L1 filled with them, as by [`found_in_l2`](Self::found_in_l2)), when `accept` takes
    /// them.
    pub(crate) async fn found_bytes_in_l2(
        &self,
        key: &str,
        eff: &crate::options::Eff,
        ticket: crate::versions::Ticket,
        accept: ncm_cache_core::Accept<'_>,
    ) -> Option<ncm_cache_core::Bytes> {
        match self.l2_get(key, eff).await {
            Ok(Some(bytes)) if accept.is_none_or(|take| take(&bytes)) => {
                let size = bytes.len();
                let fill = Fill::value(Arc::new(bytes.clone()) as Object, size, eff.l2_ttl);
                self.l1_fill(key, fill, &ticket, eff);
                Some(bytes)
            }
            _ => None,
        }
    }

    /// Keeps a load lock for a load that runs outside this cache (`CacheLoader`,
    /// `CacheStrategies::read_through` over the byte-level backend, through
    /// `CacheBackend::begin_load`): renewed every third of the lock TTL until the permit ends
    /// (released with the note its end calls for) or is dropped (released).
    pub(crate) fn hold_lock(&self, guard: RedisLock) -> ncm_cache_core::LoadPermit {
        let ttl = self.opts.lock_ttl;
        let (tx, rx) =
            tokio::sync::oneshot::channel::<(LoadEnd, tokio::sync::oneshot::Sender<()>)>();
        tokio::spawn(async move {
            let mut rx = std::pin::pin!(rx);
            let mut renewing = true;
            let ended = loop {
                let tick = async {
                    if renewing {
                        tokio::time::sleep(ttl / 3).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    ended = rx.as_mut() => break ended.ok(),
                    () = tick => match guard.extend(ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(lock = guard.key(), "stampede lock lost while loading");
                            renewing = false;
                        }
                        Err(e) => {
                            tracing::warn!(lock = guard.key(), error = %e, "stampede lock not renewed");
                        }
                    },
                }
            };
            let Some((how, done)) = ended else {
                // The permit was dropped (the load panicked or was cancelled).
                let _ = guard.release().await;
                return;
            };
            let note = match how {
                LoadEnd::Stored | LoadEnd::Failed => None,
                LoadEnd::NotFound => Some(NOT_FOUND),
                _ => Some(NOT_CACHED),
            };
            let released = match note {
                Some(note) => guard.release_with_note(note, NOTE_KEEP).await,
                None => guard.release().await,
            };
            if let Err(e) = released {
                tracing::debug!(error = %e, "stampede lock not released (it expires by itself)");
            }
            let _ = done.send(());
        });
        ncm_cache_core::LoadPermit::held(HeldLock(tx))
    }

    /// Runs `work` while renewing `guard` every third of the lock TTL, so a loader longer than
    /// the TTL keeps the lock (a crashed holder's lock still expires after one TTL).
    pub(crate) async fn renewing<F: Future>(&self, guard: &RedisLock, work: F) -> F::Output {
        let ttl = self.opts.lock_ttl;
        let renew = async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                match guard.extend(ttl).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(lock = guard.key(), "stampede lock lost while loading");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(lock = guard.key(), error = %e, "stampede lock not renewed");
                    }
                }
            }
        };
        let mut renew = std::pin::pin!(renew);
        let mut work = std::pin::pin!(work);
        let mut renewing = true;
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(out) = work.as_mut().poll(cx) {
                return std::task::Poll::Ready(out);
            }
            if renewing && renew.as_mut().poll(cx).is_ready() {
                renewing = false;
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// The note a load lock holds for a while after its loader found nothing.
const NOT_FOUND: &str = "none";

/// The note a load lock holds for a while after its loader's answer was not cached.
const NOT_CACHED: &str = "uncached";

/// What a released load lock tells its waiters.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LockNote {
    NotFound,
    NotCached,
}

/// How long a note lasts: longer than a waiter's longest poll interval (100 ms), short
/// enough that a row inserted meanwhile is loaded soon by the next caller (the note is not
/// evicted by a delete, unlike a negative entry in L1).
const NOTE_KEEP: Duration = Duration::from_millis(250);

pub(crate) enum LockOutcome<X> {
    /// The holder's value, read from L2.
    Found(X),
    /// The holder found nothing at the source (its note).
    Absent,
    /// Load: under the lock, or without it.
    Proceed(Option<RedisLock>),
}

/// A load lock kept for a load running outside this cache ([`Inner::hold_lock`]): ending it
/// tells the renewing task to release it.
type EndTx = tokio::sync::oneshot::Sender<(LoadEnd, tokio::sync::oneshot::Sender<()>)>;

struct HeldLock(EndTx);

#[ncm_cache_core::async_trait]
impl ncm_cache_core::LoadHold for HeldLock {
    async fn end(self: Box<Self>, how: LoadEnd) {
        let (done, released) = tokio::sync::oneshot::channel();
        if self.0.send((how, done)).is_ok() {
            // Released before the caller goes on (its waiters then find the value or the note).
            let _ = released.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: u64, entries: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (op, key) in entries {
            encode_entry(&mut body, *op, key);
        }
        message(id, 5, &body)
    }

    #[test]
    fn a_batch_decodes_to_its_entries_and_our_own_is_ignored() {
        let m = batch(7, &[(SET, "a"), (DELETE, "key:ü"), (CLEAR, "")]);
        let received = decode(&m, 8).unwrap();
        assert_eq!((received.origin, received.seq), (7, Some(5)));
        assert_eq!(
            received.entries,
            vec![
                (SET, &b"a"[..]),
                (DELETE, "key:ü".as_bytes()),
                (CLEAR, &b""[..])
            ]
        );
        assert!(
            decode(&m, 7).is_none(),
            "an instance ignores its own messages"
        );
    }

    #[test]
    fn unnumbered_messages_of_older_versions_are_still_read() {
        let mut m = vec![BATCH];
        m.extend_from_slice(&3u64.to_le_bytes());
        encode_entry(&mut m, DELETE, "k");
        let received = decode(&m, 8).unwrap();
        assert_eq!(received.seq, None);
        assert_eq!(received.entries, vec![(DELETE, &b"k"[..])]);
    }

    #[test]
    fn a_jump_in_a_senders_numbers_is_a_lost_message() {
        let mut s = Senders::default();
        assert!(!s.gap(1, 10), "a new sender starts anywhere");
        assert!(!s.gap(1, 11));
        assert!(!s.gap(1, 11), "a resent message is no gap");
        assert!(!s.gap(2, 0));
        assert!(s.gap(1, 13), "12 was lost");
        assert!(!s.gap(1, 14));
    }

    #[test]
    fn large_batches_split_at_entry_boundaries() {
        let mut entries = Vec::new();
        let keys: Vec<String> = (0..100).map(|i| format!("key:{i:04}")).collect();
        for k in &keys {
            encode_entry(&mut entries, SET, k);
        }
        let parts = chunks(&entries, 64);
        assert!(parts.len() > 10);
        let mut seen = Vec::new();
        for p in &parts {
            assert!(p.len() <= 64);
            let msg = message(1, 0, p);
            for (_, k) in decode(&msg, 0).unwrap().entries {
                seen.push(String::from_utf8(k.to_vec()).unwrap());
            }
        }
        assert_eq!(seen, keys);
        // An entry longer than the limit goes alone.
        let mut big = Vec::new();
        encode_entry(&mut big, SET, "a");
        encode_entry(&mut big, SET, &"x".repeat(200));
        encode_entry(&mut big, SET, "b");
        assert_eq!(chunks(&big, 64).len(), 3);
    }

    #[test]
    fn malformed_messages_are_dropped_without_panicking() {
        let good = batch(1, &[(SET, "abc")]);
        // Every truncation, a length past the end, a huge length, an unknown kind.
        for cut in 0..good.len() - 1 {
            let _ = decode(&good[..cut], 2);
        }
        assert!(decode(&good[..good.len() - 1], 2).is_none());
        let mut long = good.clone();
        long[18..22].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&long, 2).is_none());
        let mut unknown = good.clone();
        unknown[0] = b'Z';
        assert!(decode(&unknown, 2).is_none());
        assert!(decode(&[], 2).is_none());
    }
}
