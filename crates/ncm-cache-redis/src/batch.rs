//! Automatic batching of concurrent single-key calls (`RedisConfig::auto_batch`, on by default).
//!
//! On a cluster only reads are batched: a batch is split by the primary that owns each key (a
//! slot map read with `CLUSTER SLOTS` in a task of its own, when there is none and after a
//! redirect), and each part goes as one pipeline of GETs routed by its first key's slot,
//! answered as soon as its primary answers (an `MGET` would have to share a slot, and random
//! keys rarely do). A pipeline redirected as a whole (a migrated slot, a stale map) is asked
//! again key by key, and pipelines are held back for a second (see [`ask_cluster`]).
//!
//! Concurrent `get`s are coalesced into one `MGET` (duplicates of a key share one slot) and
//! concurrent `set`s into one pipeline. Nothing waits for a timer: a call that finds fewer than
//! [`MAX_IN_FLIGHT`] batches in flight sends at once — alone, since a free slot means nothing
//! is queued, so an idle connection costs a call only a lock and a oneshot — and the calls
//! that arrive while batches are in flight go together in the next batch, sent by a task as
//! soon as one of those returns (after one yield, so that the callers that batch answered
//! usually run first and their next calls join it).
//!
//! A lone `get` is sent by its caller (no task hop) unless it takes the last free slot; every
//! other batch by a task (so futures polled once and then parked cannot hold every slot), so a
//! cancelled caller never cancels the calls of others. Every caller gets its own answer (a
//! write's error reply reaches only its call) or a copy of its batch's failure. A caller waits
//! no longer than an unbatched call may (`connect_timeout` + `response_timeout` per attempt) for
//! its batch to be sent (a write is handed over only once the connection is up: after a failure
//! on a pool connection, a `PING` first waits out its manager's reconnect; batching runs on
//! single-node pools and Sentinel, whose connection is re-resolved before a batch gets it); a
//! write already handed over is waited for as an
//! unbatched one is (until the connection answers or fails), and a write whose caller gave up
//! before that (its bound passed, or its future was dropped: a caller's own timeout, a
//! cancelled request) is never sent, so it is never applied behind its caller's back. A read's
//! bound is kept by the batch that carries it (one timer per batch, not one per read: see
//! [`get`]; on a cluster one per part; a caller on another runtime than the batch tasks' also
//! keeps its own timer); a
//! write's by its caller's own timer. Batch tasks run on the runtime the cache connected on;
//! once a task spawned there was dropped before it ran (that runtime shut down), on the runtime
//! of the call that hands them over. A batch is bounded in calls ([`MAX_BATCH`])
//! and, for writes, in bytes ([`MAX_BATCH_BYTES`]).
//!
//! Differences a caller can see: a failed batch (on a cluster, a failed part) fails all of its
//! calls (each counted once in
//! the stats; a multi-level cache's breaker sees each), except an `MGET` refused by an ACL key
//! permission, which is asked again key by key so that only the forbidden keys' calls fail; a key holding a non-string type reads
//! as missing when its GET went in an `MGET` (nil) and as `WRONGTYPE` when it was the batch's
//! only key or went in a cluster's pipeline (a load
//! after either replaces it: see `set_if_absent`); latency
//! stats are per batch, without the time a call spent queued. `RedisSyncCache` does not batch.
//!
//! Order: a batch is taken from the queue in arrival order and keeps it; several batches may be
//! in flight, so two calls that were both in flight may apply in either order (as two
//! concurrent calls may without batching); a call made after another returned `Ok` is applied
//! after it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ncm_cache_core::{Bytes, CacheError, Operation, Result};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::backend::Inner;
use crate::commands;

/// Batches of one kind in flight at once.
pub(crate) const MAX_IN_FLIGHT: usize = 4;
/// Most calls in one batch (one MGET / one pipeline).
pub(crate) const MAX_BATCH: usize = 256;
/// Most value bytes in one batch of writes (a larger value goes alone).
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;

/// A queued read.
pub(crate) struct Get {
    key: String,
    /// When its caller's bound ends (`None`: a bound too large to count): the batch that
    /// carries the read answers `Timeout` then (see [`send_gets`]).
    deadline: Option<Instant>,
    tx: oneshot::Sender<Result<Option<Bytes>>>,
}

/// A write's progress: queued, handed to the connection, or given up by its caller.
const QUEUED: u8 = 0;
const SENT: u8 = 1;
const ABANDONED: u8 = 2;

/// A queued write.
pub(crate) struct Set {
    key: String,
    value: Bytes,
    ttl: Option<Duration>,
    state: Arc<AtomicU8>,
    tx: oneshot::Sender<Result<()>>,
}

/// Withdraws a queued write when its caller's future ends (completed, timed out or dropped):
/// a write not yet sent is then never sent. Once sent, nothing changes.
struct Withdraw(Arc<AtomicU8>);

impl Drop for Withdraw {
    fn drop(&mut self) {
        let _ = self
            .0
            .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
    }
}

trait Weight {
    /// Bytes this call adds to a batch.
    fn weight(&self) -> usize;
}

impl Weight for Get {
    fn weight(&self) -> usize {
        0
    }
}

impl Weight for Set {
    fn weight(&self) -> usize {
        self.key.len() + self.value.len()
    }
}

/// The queues of one backend.
pub(crate) struct Batcher {
    gets: Lane<Get>,
    sets: Lane<Set>,
    /// The runtime the cache connected on, where its connections' tasks run: batches are sent
    /// by tasks spawned there, not on the caller's runtime, which may be shut down while a
    /// batch slot is handed to a task (`batching.rs::batch_slots_survive_the_shutdown_of_a_runtime_the_reads_ran_on`).
    runtime: Option<tokio::runtime::Handle>,
    /// Set once a batch task spawned on `runtime` was dropped before it ran: that runtime has
    /// shut down (a `static` cache first used by one `#[tokio::test]`), and batch tasks run on
    /// the runtime of the call that hands them over instead
    /// (`batching.rs::batched_calls_go_on_after_the_runtime_the_cache_connected_on_shut_down`).
    runtime_gone: AtomicBool,
    /// On a cluster: which primary owns each slot, to send a batch's reads as one pipeline per
    /// primary (writes are not batched there).
    cluster: Option<Owners>,
    /// The read batches' own connection (`RedisConfig::batch_socket`: see `wire.rs`);
    /// `None`: they go on the pool's connections. Writes always do.
    pub(crate) wire: Option<crate::wire::Wire>,
    /// The backend these queues belong to (its pool is checked when the batches' own
    /// connection is made again: see `wire.rs`).
    owner: std::sync::OnceLock<std::sync::Weak<Inner>>,
}

impl Batcher {
    /// Queues of a backend connected on the current runtime (`cluster`: to a Redis Cluster;
    /// `own_sockets`: batches on connections of their own, see `wire.rs`).
    pub(crate) fn new(cluster: bool, own_socket: bool) -> Self {
        Self {
            gets: Lane::default(),
            sets: Lane::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            runtime_gone: AtomicBool::new(false),
            cluster: cluster.then(Owners::default),
            wire: (own_socket && !cluster).then(crate::wire::Wire::default),
            owner: std::sync::OnceLock::new(),
        }
    }

    /// Whether the backend is a cluster's (reads batched per primary, writes not batched).
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Records the backend these queues belong to.
    pub(crate) fn owned_by(&self, owner: std::sync::Weak<Inner>) {
        let _ = self.owner.set(owner);
    }

    /// The backend these queues belong to, once recorded.
    pub(crate) fn owner(&self) -> std::sync::Weak<Inner> {
        self.owner.get().cloned().unwrap_or_default()
    }

    /// Set once batch work spawned on the runtime the cache connected on was dropped unrun.
    pub(crate) fn runtime_gone(&self) -> &AtomicBool {
        &self.runtime_gone
    }

    /// Ends the batches' own connection (the backend was closed).
    pub(crate) fn close(&self) {
        if let Some(wire) = &self.wire {
            wire.close();
        }
    }

    /// Whether batch tasks run on the current thread's runtime: then they run as long as the
    /// caller does, and a read's batch keeps its bound; a caller on another runtime also keeps
    /// a timer of its own (that runtime may stop running tasks: shut down, or not driven).
    fn runs_here(&self) -> bool {
        !self.runtime_gone.load(Ordering::Acquire)
            && self.runtime.as_ref().is_some_and(|rt| {
                tokio::runtime::Handle::try_current().is_ok_and(|here| here.id() == rt.id())
            })
    }
}

/// Runs `work` in a task on [`runtime_of`]'s runtime, or here when there is none. A task
/// dropped before it ran (its runtime shut down: tokio drops what is spawned on it) marks that
/// runtime gone, so later work runs on its caller's runtime (review, helper-76: on a cluster,
/// whose writes are not batched, few concurrent reads never start a slot's task, and the
/// parts of every batch and the slot-map looks went on being spawned there and dropped).
async fn spawn_work(inner: &Arc<Inner>, work: impl Future<Output = ()> + Send + 'static) {
    match runtime_of(inner) {
        Some(runtime) => spawn_marked(inner, &runtime, work),
        None => work.await,
    }
}

/// Spawns `work` on `runtime`; see [`spawn_work`].
fn spawn_marked(
    inner: &Arc<Inner>,
    runtime: &tokio::runtime::Handle,
    work: impl Future<Output = ()> + Send + 'static,
) {
    /// Marks the runtime gone when dropped before the task cleared it.
    struct Unrun(Option<Arc<Inner>>);
    impl Drop for Unrun {
        fn drop(&mut self) {
            if let Some(b) = self.0.take().as_ref().and_then(|i| i.batcher.as_ref()) {
                b.runtime_gone.store(true, Ordering::Release);
            }
        }
    }
    let unrun = Unrun(Some(Arc::clone(inner)));
    drop(runtime.spawn(async move {
        // The whole guard moved in (not only its field), and disarmed once the task runs.
        let mut unrun = unrun;
        unrun.0 = None;
        work.await;
    }));
}

/// The runtime a batch task (and a batch connection's reader) runs on: the one the cache
/// connected on while it runs, else the caller's (`None` outside any runtime).
pub(crate) fn runtime_of(inner: &Inner) -> Option<tokio::runtime::Handle> {
    match inner.batcher.as_ref() {
        Some(b) if !b.runtime_gone.load(Ordering::Acquire) => b.runtime.clone(),
        _ => None,
    }
    .or_else(|| tokio::runtime::Handle::try_current().ok())
}

/// Starts the task of a slot that holds a batch. A task dropped before it ran (its runtime shut
/// down) hands slot and batch on through the slot's drop.
fn spawn<R: Weight + Send + 'static>(slot: Slot<R>) {
    let flush = slot.flush;
    match runtime_of(&slot.inner) {
        Some(runtime) => drop(runtime.spawn(flush(slot))),
        // No runtime: the slot's drop gives the calls back as abandoned.
        None => drop(slot),
    }
}

struct Lane<R> {
    queue: Mutex<Queue<R>>,
}

impl<R> Default for Lane<R> {
    fn default() -> Self {
        Self {
            queue: Mutex::new(Queue {
                items: Vec::new(),
                in_flight: 0,
            }),
        }
    }
}

struct Queue<R> {
    items: Vec<R>,
    in_flight: usize,
}

impl<R: Weight> Queue<R> {
    /// The next batch: the oldest calls, up to [`MAX_BATCH`] calls and [`MAX_BATCH_BYTES`]
    /// (always at least one).
    fn take(&mut self) -> Vec<R> {
        let mut bytes = 0;
        let mut n = 0;
        for r in self.items.iter().take(MAX_BATCH) {
            bytes += r.weight();
            if n > 0 && bytes > MAX_BATCH_BYTES {
                break;
            }
            n += 1;
        }
        if n == self.items.len() {
            std::mem::take(&mut self.items)
        } else {
            self.items.drain(..n).collect()
        }
    }
}

impl<R: Weight> Lane<R> {
    fn lock(&self) -> MutexGuard<'_, Queue<R>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `req`; returns a batch (with a slot in flight) when the caller may send one,
    /// and whether that slot is the last one free (see [`get`]).
    fn push(&self, req: R) -> Option<(Vec<R>, bool)> {
        let mut q = self.lock();
        q.items.push(req);
        if q.in_flight < MAX_IN_FLIGHT {
            q.in_flight += 1;
            Some((q.take(), q.in_flight == MAX_IN_FLIGHT))
        } else {
            None
        }
    }

    /// After a batch: the next one (keeping the slot), or `None` (the slot given back).
    fn next(&self) -> Option<Vec<R>> {
        let mut q = self.lock();
        if q.items.is_empty() {
            q.in_flight = q.in_flight.saturating_sub(1);
            None
        } else {
            Some(q.take())
        }
    }
}

/// A slot in flight and the batch it is to send; given back (or passed to a new task with the
/// queued calls) when dropped — also when its holder is cancelled or panics, or its task is
/// dropped before it ran, so a slot never leaks.
struct Slot<R: Weight + Send + 'static> {
    inner: Arc<Inner>,
    lane: fn(&Batcher) -> &Lane<R>,
    flush: fn(Slot<R>) -> futures_util::future::BoxFuture<'static, ()>,
    /// Calls taken for this slot and not sent yet (empty while a batch is being sent).
    batch: Vec<R>,
    held: bool,
    /// Tasks of this slot dropped before they ran, in a row.
    unrun: u8,
}

impl<R: Weight + Send + 'static> Slot<R> {
    fn new(
        inner: &Arc<Inner>,
        lane: fn(&Batcher) -> &Lane<R>,
        flush: fn(Slot<R>) -> futures_util::future::BoxFuture<'static, ()>,
        batch: Vec<R>,
    ) -> Self {
        Self {
            inner: Arc::clone(inner),
            lane,
            flush,
            batch,
            held: true,
            unrun: 0,
        }
    }

    /// Takes the next batch for this slot (`true`), or gives the slot back (`false`).
    fn refill(&mut self) -> bool {
        let batch = (self.inner.batcher.as_ref()).and_then(|b| (self.lane)(b).next());
        self.held = batch.is_some();
        self.batch = batch.unwrap_or_default();
        self.held
    }
}

impl<R: Weight + Send + 'static> Drop for Slot<R> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let mut batch = std::mem::take(&mut self.batch);
        let mut unrun = 0;
        if batch.is_empty() {
            // Its holder ended: the calls queued meanwhile go to a task.
            if !self.refill() {
                return;
            }
            batch = std::mem::take(&mut self.batch);
        } else {
            // Taken, never sent: this slot's task was dropped before it ran, so the runtime it
            // was spawned on has shut down; later tasks run on their caller's runtime.
            if let Some(b) = self.inner.batcher.as_ref() {
                b.runtime_gone.store(true, Ordering::Release);
            }
            unrun = self.unrun.saturating_add(1);
        }
        self.held = false;
        // A second task dropped unrun in a row: no runtime here runs one (this drop is part of
        // a runtime's shutdown). The calls are dropped (their callers see the batch abandoned,
        // at once), and so are those queued meanwhile, so that a free slot still means an
        // empty queue; `next` gives the slot back once the queue is empty.
        if unrun >= 2 {
            drop(batch);
            if let Some(b) = self.inner.batcher.as_ref() {
                while let Some(queued) = (self.lane)(b).next() {
                    drop(queued);
                }
            }
            return;
        }
        let mut next = Slot::new(&self.inner, self.lane, self.flush, batch);
        next.unrun = unrun;
        spawn(next);
    }
}

fn gets(b: &Batcher) -> &Lane<Get> {
    &b.gets
}

fn sets(b: &Batcher) -> &Lane<Set> {
    &b.sets
}

fn spawn_gets(slot: Slot<Get>) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(flush_gets(slot))
}

fn spawn_sets(slot: Slot<Set>) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(flush_sets(slot))
}

/// The answer when a batch ended without one for this call (its sender was dropped: the
/// runtime shut down).
fn abandoned() -> CacheError {
    CacheError::Connection {
        message: "the batched call was abandoned (runtime shutting down?); retry".into(),
        source: None,
    }
}

/// How long a caller waits for its batch: what one unbatched call may take (connect, then each
/// attempt's response timeout).
fn call_bound(inner: &Inner, retried: bool) -> Duration {
    let c = &inner.config;
    let attempts = if retried && c.retry_on_timeout { 2 } else { 1 };
    c.connect_timeout + c.response_timeout * attempts
}

/// The error of a call that waited past its bound (counted here: no batch counted it).
fn timed_out<T>(inner: &Inner, op: &'static str, kind: Operation, after: Duration) -> Result<T> {
    inner.stats.error(kind);
    Err(CacheError::Timeout {
        operation: op,
        after,
    })
}

/// Reads `key` (a full key) in a batch.
///
/// A caller on the runtime the batch tasks run on waits with no timer of its own: its read's
/// batch answers `Timeout` when the read's bound has passed (one timer per batch, not one per
/// read; a timer per read cost about 8 % of the client's CPU at 64 tasks). A read still queued
/// is within that bound too: every batch in flight holds only reads made before it, whose
/// bounds end first, and a slot whose reads have all been answered takes the queue at once.
/// A caller on another runtime keeps its own timer too, since the batch tasks' runtime may
/// stop running them (shut down, blocked, or a `current_thread` runtime no longer driven).
pub(crate) async fn get(
    inner: &Arc<Inner>,
    batcher: &Batcher,
    key: String,
) -> Result<Option<Bytes>> {
    let (tx, rx) = oneshot::channel();
    let bound = call_bound(inner, true);
    let deadline = Instant::now().checked_add(bound);
    match batcher.gets.push(Get { key, deadline, tx }) {
        // The last free slot goes to a task: a caller's future holds its slot until it is
        // polled again, and futures polled once then left unpolled (a `select!` arm no longer
        // looked at, a busy task) must not hold every slot — the other calls would wait for
        // them, not for Redis.
        Some((batch, true)) => spawn(Slot::new(inner, gets, spawn_gets, batch)),
        // Boxed: a Redis call's future is kilobytes, and inline it would make every read's
        // future that large (allocated per call by the trait's boxing; `backend.rs`'s
        // `batched_calls_have_small_futures`).
        // Usually answered (or timed out) by the send itself.
        Some((batch, false)) => Box::pin(send_alone(inner, batch)).await,
        None => {}
    }
    if batcher.runs_here() {
        return rx.await.unwrap_or_else(|_| Err(abandoned()));
    }
    match tokio::time::timeout(bound, rx).await {
        Ok(r) => r.unwrap_or_else(|_| Err(abandoned())),
        Err(_) => timed_out(inner, "get", Operation::Get, bound),
    }
}

/// Sends a lone read from its caller's future (a free slot: the queue was empty), then hands
/// the slot to a task with the calls queued meanwhile.
async fn send_alone(inner: &Arc<Inner>, batch: Vec<Get>) {
    // Dropped after the send (or when this future is), the slot goes with the calls queued
    // meanwhile to a task.
    let _slot = Slot::new(inner, gets, spawn_gets, Vec::new());
    send_gets(inner, batch).await;
}

/// Writes `key` (a full key) in a batch.
pub(crate) async fn set(
    inner: &Arc<Inner>,
    batcher: &Batcher,
    key: String,
    value: Bytes,
    ttl: Option<Duration>,
) -> Result<()> {
    let (tx, mut rx) = oneshot::channel();
    let state = Arc::new(AtomicU8::new(QUEUED));
    // Dropped with this future (a caller's own timeout, a cancelled request) before the write
    // was handed to the connection: it is withdrawn, as after `bound` below.
    let _withdrawn_on_drop = Withdraw(Arc::clone(&state));
    let call = Set {
        key,
        value,
        ttl,
        state: Arc::clone(&state),
        tx,
    };
    if let Some((batch, _)) = batcher.sets.push(call) {
        spawn(Slot::new(inner, sets, spawn_sets, batch));
    }
    let bound = call_bound(inner, false);
    match tokio::time::timeout(bound, &mut rx).await {
        Ok(Ok(r)) => return r,
        Ok(Err(_)) => return Err(abandoned()),
        Err(_) => {}
    }
    // Not sent yet: it never will be.
    if state
        .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        return timed_out(inner, "set", Operation::Set, bound);
    }
    // Sent: like an unbatched write, its caller learns how it ended (the connection bounds the
    // wait: response timeout, reconnect settings).
    rx.await.unwrap_or_else(|_| Err(abandoned()))
}

async fn flush_gets(mut slot: Slot<Get>) {
    let inner = Arc::clone(&slot.inner);
    loop {
        let batch = std::mem::take(&mut slot.batch);
        send_gets(&inner, batch).await;
        // The callers just answered usually run before the next batch is taken (a yield, no
        // timer; tokio does not promise the order, and under other load the yielded task waits
        // behind ready tasks, each queued read still bounded: see `get`): their next reads join
        // it, instead of the first of them finding this slot free and sending alone (64 tasks
        // on spread keys: 9.1 reads per command without the yield, 16.1 with it; the
        // `redis_ceiling` bench prints it; docs/BENCHMARKS.md, issue 21).
        tokio::task::yield_now().await;
        if !slot.refill() {
            return;
        }
    }
}

async fn flush_sets(mut slot: Slot<Set>) {
    let inner = Arc::clone(&slot.inner);
    loop {
        let mut batch = std::mem::take(&mut slot.batch);
        send_sets(&inner, &mut batch).await;
        // As for reads (see `flush_gets`): the callers just answered usually queue their next
        // writes before the next batch is taken (64 tasks, SET 100 B: about 1.1× raw redis-rs
        // without the yield, 1.3–1.4× with it; docs/BENCHMARKS.md, issue 21).
        tokio::task::yield_now().await;
        if !slot.refill() {
            return;
        }
    }
}

/// Hands `answer` to its caller and counts a delivered error, so that every failed call is
/// counted once: `pending` are errors `Inner::run` already counted for the batch, attributed
/// to the first failed calls delivered.
fn deliver<T>(
    inner: &Inner,
    kind: Operation,
    tx: oneshot::Sender<Result<T>>,
    answer: Result<T>,
    pending: &mut u32,
) {
    let failed = answer.is_err();
    if tx.send(answer).is_ok() && failed {
        if *pending > 0 {
            *pending -= 1;
        } else {
            inner.stats.error(kind);
        }
    }
}

/// Whether `Inner::run` counted this failure (it does not count `Closed`, returned before any
/// attempt).
fn counted_by_run<T>(r: &Result<T>) -> bool {
    matches!(r, Err(e) if !matches!(e, CacheError::Closed))
}

/// A read of a batch being sent: its bound and its caller (gone once answered).
struct Waiter {
    deadline: Option<Instant>,
    tx: Option<oneshot::Sender<Result<Option<Bytes>>>>,
}

/// Answers `Timeout` to every waiter whose bound has passed; the earliest bound still to come.
fn expire(inner: &Inner, waiters: &mut [Waiter]) -> Option<Option<Instant>> {
    let now = Instant::now();
    let mut next: Option<Option<Instant>> = None;
    for w in waiters.iter_mut().filter(|w| w.tx.is_some()) {
        match w.deadline {
            Some(d) if d <= now => {
                if let Some(tx) = w.tx.take() {
                    let after = call_bound(inner, true);
                    let timeout = CacheError::Timeout {
                        operation: "get",
                        after,
                    };
                    // Counted only when its caller gets it.
                    if tx.send(Err(timeout)).is_ok() {
                        inner.stats.error(Operation::Get);
                    }
                }
            }
            d => {
                next = Some(match (next.flatten(), d) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                });
            }
        }
    }
    next
}

/// One GET (a batch of one) or one MGET of the distinct keys; every caller gets its answer by
/// its bound: a read whose bound passes first is answered `Timeout`, and once every read of
/// the batch has been answered the reply is no longer waited for.
async fn send_gets(inner: &Arc<Inner>, batch: Vec<Get>) {
    // Callers that gave up (cancelled) are not asked for.
    let batch: Vec<Get> = batch.into_iter().filter(|g| !g.tx.is_closed()).collect();
    // On a cluster: one part per primary, each answered as soon as its primary answers.
    if let Some(owners) = inner.batcher.as_ref().and_then(|b| b.cluster.as_ref())
        && !batch.is_empty()
    {
        use futures_util::{FutureExt, StreamExt};
        owners.look_if_stale(inner);
        let mut parts: futures_util::stream::FuturesUnordered<_> = owners
            .split(batch)
            .into_iter()
            .map(|part| {
                let inner = Arc::clone(inner);
                async move { send_part(&inner, part).await }
            })
            .collect();
        // The batch keeps its slot until its first part is answered (what gathers the next
        // batch meanwhile), or for `PART_GRACE` at most; parts still waiting then go on in a
        // task of their own, so that a stalled primary holds no slot
        // (`cluster.rs::a_stalled_primary_holds_up_only_its_own_keys_reads`): each of its
        // reads is still answered by its bound.
        let grace = tokio::time::sleep(PART_GRACE);
        let mut grace = std::pin::pin!(grace);
        tokio::select! {
            biased;
            first = parts.next() => if first.is_none() {
                return;
            },
            () = &mut grace => {}
        }
        while let Some(Some(())) = parts.next().now_or_never() {}
        if parts.is_empty() {
            return;
        }
        spawn_work(inner, async move { while parts.next().await.is_some() {} }).await;
        return;
    }
    send_part(inner, batch).await;
}

/// One GET (a batch of one) or one MGET (on a cluster: one pipeline to the primary that owns
/// them all) of the distinct keys of `batch`; see [`send_gets`].
async fn send_part(inner: &Inner, batch: Vec<Get>) {
    let mut keys: Vec<String> = Vec::with_capacity(batch.len());
    let mut waiters: Vec<Waiter> = Vec::with_capacity(batch.len());
    for g in batch {
        keys.push(g.key);
        waiters.push(Waiter {
            deadline: g.deadline,
            tx: Some(g.tx),
        });
    }
    let Some(mut next) = expire(inner, &mut waiters) else {
        return;
    };
    // Distinct keys in first-seen order; `place[i]` is read i's key's index among them.
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
    let mut distinct: Vec<&str> = Vec::with_capacity(keys.len());
    let place: Vec<usize> = keys
        .iter()
        .map(|k| {
            *index.entry(k.as_str()).or_insert_with(|| {
                distinct.push(k.as_str());
                distinct.len() - 1
            })
        })
        .collect();
    drop(index);
    let mut reply = std::pin::pin!(ask(inner, &distinct));
    let (r, mut pending) = loop {
        let Some(deadline) = next else {
            break reply.await;
        };
        tokio::select! {
            biased;
            r = &mut reply => break r,
            () = tokio::time::sleep_until(deadline) => match expire(inner, &mut waiters) {
                Some(n) => next = n,
                // Every read answered: the reply is not waited for.
                None => return,
            },
        }
    };
    // A key's value goes to its last caller by move, cloned only for the others: a clone of
    // the `Bytes` made from a reply's `Vec` allocates.
    let mut uses = vec![0u32; distinct.len()];
    for &at in &place {
        uses[at] += 1;
    }
    let mut r = r;
    for (w, at) in waiters.into_iter().zip(place) {
        uses[at] -= 1;
        let Some(tx) = w.tx else { continue };
        let last = uses[at] == 0;
        let answer = match &mut r {
            Ok(Answers::All(values)) if last => Ok(values[at].take()),
            Ok(Answers::All(values)) => Ok(values[at].clone()),
            Ok(Answers::Each(answers)) if last => std::mem::replace(&mut answers[at], Ok(None)),
            Ok(Answers::Each(answers)) => answers[at].clone(),
            Err(e) => Err(e.clone()),
        };
        deliver(inner, Operation::Get, tx, answer, &mut pending);
    }
}

/// The values of `keys` (distinct): one GET for one key, else one MGET (asked again key by
/// key if an ACL refuses it); with the errors `Inner::run` counted.
async fn ask(inner: &Inner, keys: &[&str]) -> (Result<Answers>, u32) {
    if let Some(owners) = inner.batcher.as_ref().and_then(|b| b.cluster.as_ref())
        && keys.len() > 1
    {
        return ask_cluster(inner, owners, keys).await;
    }
    if let Some(wire) = inner.batcher.as_ref().and_then(|b| b.wire.as_ref()) {
        return ask_on(inner, wire, keys).await;
    }
    if let [key] = keys {
        let r = get_alone(inner, key).await;
        let pending = u32::from(counted_by_run(&r));
        return (r.map(|v| Answers::All(vec![v])), pending);
    }
    let mut mget = redis::cmd("MGET");
    mget.arg(keys);
    let mget = &mget;
    let r: Result<Vec<Option<Vec<u8>>>> = inner
        .run(
            Operation::Get,
            crate::backend::Retry::Anywhere,
            |mut h| async move { mget.query_async(&mut h).await },
        )
        .await;
    let mut pending = u32::from(counted_by_run(&r));
    let r = r.and_then(|values| {
        if values.len() == keys.len() {
            Ok(Answers::All(
                values
                    .into_iter()
                    .map(|v| v.map(Bytes::from))
                    .collect::<Vec<_>>(),
            ))
        } else {
            Err(CacheError::Backend {
                message: format!(
                    "MGET of {} keys answered {} values",
                    keys.len(),
                    values.len()
                ),
                source: None,
            })
        }
    });
    // ACL key permissions apply to a whole MGET: one caller's forbidden key refuses it for
    // every caller. Asked again key by key (one pipeline), each caller gets its own answer.
    let r = match r {
        Err(CacheError::Auth(_)) => {
            let again = get_each(inner, keys).await;
            pending += u32::from(counted_by_run(&again));
            again
        }
        r => r,
    };
    (r, pending)
}

/// [`ask`] on the batch's own connection: one `GET` or `MGET` (an `MGET` refused by an ACL
/// asked again key by key on the pool's connections).
async fn ask_on(inner: &Inner, wire: &crate::wire::Wire, keys: &[&str]) -> (Result<Answers>, u32) {
    use crate::wire::{Reply, arg, header};
    let timeout = inner.config.response_timeout;
    let mut bytes = Vec::with_capacity(16 + keys.iter().map(|k| k.len() + 16).sum::<usize>());
    header(&mut bytes, keys.len() + 1);
    arg(&mut bytes, if keys.len() == 1 { b"GET" } else { b"MGET" });
    for k in keys {
        arg(&mut bytes, k.as_bytes());
    }
    let n = keys.len();
    let r = crate::wire::run(
        inner,
        wire,
        Operation::Get,
        true,
        &bytes,
        1,
        |mut replies| {
            let reply = replies.pop().unwrap_or(Reply::Nil);
            let values = match reply {
                Reply::Array(values) if n > 1 && values.len() == n => values,
                Reply::Array(values) if n > 1 => {
                    return Err(CacheError::Backend {
                        message: format!("MGET of {n} keys answered {} values", values.len()),
                        source: None,
                    });
                }
                Reply::Error(e) => return Err(crate::wire::server_error(&e, "get", timeout)),
                one if n == 1 => vec![one],
                other => {
                    return Err(CacheError::Backend {
                        message: format!("MGET of {n} keys answered {other:?}"),
                        source: None,
                    });
                }
            };
            values
                .into_iter()
                .map(|v| v.into_value("get", timeout))
                .collect::<Result<Vec<_>>>()
                .map(Answers::All)
        },
    )
    .await;
    let mut pending = u32::from(counted_by_run(&r));
    let r = match r {
        Err(CacheError::Auth(_)) if n > 1 => {
            let again = get_each(inner, keys).await;
            pending += u32::from(counted_by_run(&again));
            again
        }
        r => r,
    };
    (r, pending)
}

/// The answers to a batch of reads: one `MGET` reply, or one reply per key.
enum Answers {
    All(Vec<Option<Bytes>>),
    Each(Vec<Result<Option<Bytes>>>),
}

/// One GET, counted by `Inner::run` when it fails.
async fn get_alone(inner: &Inner, key: &str) -> Result<Option<Bytes>> {
    let r: Option<Vec<u8>> = inner
        .run(Operation::Get, crate::backend::Retry::Anywhere, |mut h| {
            let c = commands::get(key);
            async move { c.query_async(&mut h).await }
        })
        .await?;
    Ok(r.map(Bytes::from))
}

/// A GET per key in one pipeline (on a cluster, routed by the first key's slot), each with its
/// own reply (an error reply reaches only its key's callers). A failure is counted: by
/// `Inner::run`, or here for a reply count that does not match.
async fn get_each(inner: &Inner, keys: &[&str]) -> Result<Answers> {
    let timeout = inner.config.response_timeout;
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for key in keys {
        pipe.add_command(commands::get(key));
    }
    let first = keys.first().copied().unwrap_or_default();
    let n = keys.len();
    let pipe = &pipe;
    let values: Vec<redis::Value> = inner
        .run(
            Operation::Get,
            crate::backend::Retry::Anywhere,
            |h| async move {
                match h {
                    // Retried as any cluster call is; a redirect is not followed here but
                    // answered key by key (`ask_cluster`).
                    crate::conn::Handle::Cluster(c, cc, resend) => {
                        let bound = cc.bound();
                        crate::conn::cluster_call(
                            bound,
                            crate::conn::Redirects::Surface,
                            resend,
                            |_| {
                                let mut c = c.clone();
                                let route =
                                    redis::cluster_routing::SingleNodeRoutingInfo::SpecificNode(
                                        redis::cluster_routing::Route::with_key(
                                            first,
                                            redis::cluster_routing::SlotAddr::Master,
                                        ),
                                    );
                                async move { c.route_pipeline(pipe.clone(), 0, n, route).await }
                            },
                        )
                        .await
                    }
                    mut other => {
                        redis::aio::ConnectionLike::req_packed_commands(&mut other, pipe, 0, n)
                            .await
                    }
                }
            },
        )
        .await?;
    if values.len() != n {
        inner.stats.error(Operation::Get);
        return Err(CacheError::Backend {
            message: format!("a pipeline of {n} GETs answered {} replies", values.len()),
            source: None,
        });
    }
    Ok(Answers::Each(
        values
            .into_iter()
            .map(|v| {
                match v {
                    redis::Value::ServerError(e) => Err(redis::RedisError::from(e)),
                    v => <Option<Vec<u8>> as redis::FromRedisValue>::from_redis_value(v)
                        .map_err(Into::into),
                }
                .map(|v| v.map(Bytes::from))
                .map_err(|e| crate::error::map_err("get", e, timeout))
            })
            .collect(),
    ))
}

/// One pipeline of SETs, built when the connection is ready: a write whose caller gave up
/// before that is left out. Every caller gets its own command's outcome (an error reply
/// reaches only its call) or the pipeline's failure.
async fn send_sets(inner: &Inner, batch: &mut Vec<Set>) {
    let timeout = inner.config.response_timeout;
    let calls = &*batch;
    type Sent = (
        Vec<usize>,
        Vec<redis::RedisResult<redis::Value>>,
        Option<u64>,
    );
    let r: Result<Sent> = inner
        .run(Operation::Set, crate::backend::Retry::No, |mut h| {
            let slot = h.slot();
            // The connection's generation (Sentinel): an error reply of this batch must not
            // drop a newer connection made meanwhile (review, helper-76).
            let generation = h.generation();
            async move {
                // A connection manager that is reconnecting holds a request until the new
                // connection is up, long after its caller may have gone: after a failure on
                // this connection, a PING first waits for that (nothing is claimed yet).
                // (Again if another call failed meanwhile; a few times at most.)
                for _ in 0..3 {
                    let Some(seen) = inner.conn.may_be_reconnecting(slot) else {
                        break;
                    };
                    // An error reply is an answer too: the connection is up (a user not
                    // allowed `PING` must not lose every write batch after a reconnect); a
                    // `PING` that met a failed reconnect is asked once more.
                    crate::conn::ping_up(&mut h).await?;
                    inner.conn.connected(slot, seen);
                }
                // Claimed now, with the connection up: from here the write is the caller's
                // to wait for.
                let sent: Vec<usize> = calls
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| {
                        s.state
                            .compare_exchange(QUEUED, SENT, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                    })
                    .map(|(i, _)| i)
                    .collect();
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for &i in &sent {
                    let s = &calls[i];
                    pipe.add_command(commands::set(&s.key, &s.value, s.ttl));
                }
                if sent.is_empty() {
                    return redis::RedisResult::Ok((sent, Vec::new(), generation));
                }
                let replies = pipe
                    .query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut h)
                    .await?;
                Ok((sent, replies, generation))
            }
        })
        .await;
    let mut pending = u32::from(counted_by_run(&r));
    let mut calls: Vec<Option<Set>> = batch.drain(..).map(Some).collect();
    match r {
        Ok((sent, replies, generation)) => {
            let mut replies = replies.into_iter();
            for i in sent {
                let Some(call) = calls.get_mut(i).and_then(Option::take) else {
                    continue;
                };
                let answer = match replies.next() {
                    Some(Ok(_)) => Ok(()),
                    Some(Err(e)) => {
                        let e = crate::error::map_err("set", e, timeout);
                        // READONLY and the like: the connection must be re-resolved.
                        if e.is_connection() {
                            inner.conn.on_error(&e, generation);
                        }
                        Err(e)
                    }
                    None => Err(abandoned()),
                };
                deliver(inner, Operation::Set, call.tx, answer, &mut pending);
            }
        }
        Err(e) => {
            for call in calls.into_iter().flatten() {
                deliver(inner, Operation::Set, call.tx, Err(e.clone()), &mut pending);
            }
        }
    }
}

/// Cluster slots.
const SLOTS: usize = 16384;
/// How long a cluster batch keeps its slot waiting for its first part (a round trip, when its
/// primaries answer).
const PART_GRACE: Duration = Duration::from_millis(10);
/// An owner not known (no map yet, or a slot no primary serves).
const UNKNOWN: u16 = u16::MAX;

/// Which primary owns each slot, as `CLUSTER SLOTS` last answered: only to split a batch's
/// reads by primary. redis-rs routes each part's pipeline by the slot of its first key; a part
/// whose pipeline is redirected (a migrated slot, a stale map) is asked again key by key,
/// each key following its own redirect.
#[derive(Default)]
pub(crate) struct Owners {
    /// Slot → index of its primary (`UNKNOWN`): `None` until the first look.
    map: std::sync::RwLock<Option<Arc<Vec<u16>>>>,
    /// A redirect was answered (or no map yet): the map is looked at again.
    stale: AtomicBool,
    /// A look under way (one at a time, in a task of its own: never in a batch's way).
    looking: AtomicBool,
    /// No look before this (100 ms after a look, 1 s after a failed one).
    not_before: std::sync::Mutex<Option<std::time::Instant>>,
    /// No pipelines before this (1 s after one was redirected: a slot is moving, and redis-rs
    /// would bounce each pipeline holding its keys between the two primaries).
    alone_until: std::sync::Mutex<Option<std::time::Instant>>,
}

/// A look at the slot map under way: `Owners::looking` is cleared when it is dropped (the look
/// ended, or its task was dropped, also before it ran).
struct Looking(Arc<Inner>);

impl Drop for Looking {
    fn drop(&mut self) {
        if let Some(owners) = self.0.batcher.as_ref().and_then(|b| b.cluster.as_ref()) {
            owners.looking.store(false, Ordering::Release);
        }
    }
}

/// Whether `until` (a lock holding an instant) is still ahead.
fn before(until: &std::sync::Mutex<Option<std::time::Instant>>) -> bool {
    until
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some_and(|t| std::time::Instant::now() < t)
}

/// Sets `until` to `after` from now.
fn hold(until: &std::sync::Mutex<Option<std::time::Instant>>, after: Duration) {
    *until.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now() + after);
}

impl Owners {
    fn current(&self) -> Option<Arc<Vec<u16>>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts a look at the slot map in a task when there is none or it went stale (one at a
    /// time, at most every 100 ms, 1 s after a failed one); batches go on with the map they
    /// have, or key by key without one.
    fn look_if_stale(&self, inner: &Arc<Inner>) {
        let wanted = self.stale.load(Ordering::Acquire) || self.current().is_none();
        if !wanted || before(&self.not_before) || self.looking.swap(true, Ordering::AcqRel) {
            return;
        }
        // Clears `looking` when the look ends, or its task is dropped (also before it ran).
        let looking = Looking(Arc::clone(inner));
        let Some(runtime) = runtime_of(inner) else {
            return;
        };
        spawn_marked(inner, &runtime, async move {
            let inner = &looking.0;
            let Some(owners) = inner.batcher.as_ref().and_then(|b| b.cluster.as_ref()) else {
                return;
            };
            // Cleared first: a redirect answered during the look asks for another.
            owners.stale.store(false, Ordering::Release);
            // Not through `Inner::run`: a failed look is not a failed read.
            match inner
                .conn
                .cluster_slots(inner.config.response_timeout)
                .await
            {
                Ok(None) => {}
                Ok(Some(slots)) => {
                    let map = Arc::new(slot_owners(slots));
                    *owners.map.write().unwrap_or_else(|e| e.into_inner()) = Some(map);
                    hold(&owners.not_before, Duration::from_millis(100));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "batched reads: CLUSTER SLOTS failed; the next look in 1 s");
                    owners.stale.store(true, Ordering::Release);
                    hold(&owners.not_before, Duration::from_secs(1));
                }
            }
        });
    }

    /// `batch` split by the primary that owns each key (a key whose owner is not known, or
    /// every key while pipelines are held back, in a part of its own).
    fn split(&self, batch: Vec<Get>) -> Vec<Vec<Get>> {
        let map = (!before(&self.alone_until))
            .then(|| self.current())
            .flatten();
        let mut parts: Vec<(u16, Vec<Get>)> = Vec::new();
        for g in batch {
            let owner = map
                .as_ref()
                .map_or(UNKNOWN, |m| m[slot_of(g.key.as_bytes())]);
            match parts
                .iter_mut()
                .find(|(o, _)| *o == owner && owner != UNKNOWN)
            {
                Some((_, part)) => part.push(g),
                None => parts.push((owner, vec![g])),
            }
        }
        parts.into_iter().map(|(_, part)| part).collect()
    }
}

/// Slot → primary index from a `CLUSTER SLOTS` reply (`UNKNOWN` where none is given). A
/// primary is known by its node ID (by address if the reply has none).
fn slot_owners(slots: redis::Value) -> Vec<u16> {
    let mut map = vec![UNKNOWN; SLOTS];
    let mut primaries: Vec<Vec<u8>> = Vec::new();
    let redis::Value::Array(ranges) = slots else {
        return map;
    };
    let text = |v: Option<&redis::Value>| match v {
        Some(redis::Value::BulkString(b)) => Some(b.clone()),
        Some(redis::Value::SimpleString(t)) => Some(t.clone().into_bytes()),
        Some(redis::Value::Int(n)) => Some(n.to_string().into_bytes()),
        _ => None,
    };
    for range in ranges {
        let redis::Value::Array(items) = range else {
            continue;
        };
        let (
            Some(redis::Value::Int(start)),
            Some(redis::Value::Int(end)),
            Some(redis::Value::Array(primary)),
        ) = (items.first(), items.get(1), items.get(2))
        else {
            continue;
        };
        let id = match text(primary.get(2)) {
            Some(id) => id,
            None => match (text(primary.first()), text(primary.get(1))) {
                (Some(mut host), Some(port)) => {
                    host.push(b':');
                    host.extend(port);
                    host
                }
                _ => continue,
            },
        };
        let at = match primaries.iter().position(|p| *p == id) {
            Some(at) => at,
            None => {
                primaries.push(id);
                primaries.len() - 1
            }
        };
        let Ok(at) = u16::try_from(at) else { continue };
        let (Ok(start), Ok(end)) = (usize::try_from(*start), usize::try_from(*end)) else {
            continue;
        };
        for owner in map
            .iter_mut()
            .take(end.saturating_add(1).min(SLOTS))
            .skip(start)
        {
            *owner = at;
        }
    }
    map
}

/// Whether `e` is a cluster redirect (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`).
fn redirected(e: &CacheError) -> bool {
    let Some(source) = std::error::Error::source(e) else {
        return false;
    };
    // The source is kept in an `Arc`, which may be what `source` hands out.
    let source = match source.downcast_ref::<ncm_cache_core::BoxError>() {
        Some(shared) => &**shared as &(dyn std::error::Error + 'static),
        None => source,
    };
    source
        .downcast_ref::<redis::RedisError>()
        .is_some_and(redis::RedisError::is_cluster_error)
}

/// The cluster slot of `key` (its hash tag's, if it has one), as Redis computes it.
fn slot_of(key: &[u8]) -> usize {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    usize::from(crc16::State::<crc16::XMODEM>::calculate(tagged)) % SLOTS
}

/// The values of `keys` (distinct, owned by one primary as far as the map knows) on a
/// cluster: one pipeline of GETs routed by the first key's slot. A pipeline that meets a
/// redirect (a key of another primary, a slot being migrated) fails with it (`conn.rs` follows
/// no redirect for a pipeline): then each key is asked alone, following its own redirect, the
/// map is looked at again and pipelines are held back for a second.
async fn ask_cluster(inner: &Inner, owners: &Owners, keys: &[&str]) -> (Result<Answers>, u32) {
    match get_each(inner, keys).await {
        Ok(answers) => (Ok(answers), 0),
        // `Inner::run` counted the pipeline's failure; the keys are asked again.
        Err(e) if redirected(&e) => {
            owners.stale.store(true, Ordering::Release);
            hold(&owners.alone_until, Duration::from_secs(1));
            let retried =
                futures_util::future::join_all(keys.iter().map(|key| get_alone(inner, key))).await;
            let pending = retried.iter().map(|r| u32::from(counted_by_run(r))).sum();
            (Ok(Answers::Each(retried)), pending)
        }
        Err(e) => {
            // Counted (not `Closed`: returned before any attempt).
            let pending = u32::from(!matches!(e, CacheError::Closed));
            (Err(e), pending)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_computed_as_redis_computes_them() {
        use redis::cluster_routing::Slot;
        for key in [
            "",
            "a",
            "k1",
            "user:{42}:name",
            "{42}",
            "{}x",
            "x{}y{z}",
            "{a}{b}",
            "é",
        ] {
            let ours = u16::try_from(slot_of(key.as_bytes())).unwrap();
            assert_eq!(Slot::new(ours), Some(Slot::for_key(key)), "{key:?}");
        }
    }

    /// A slot map that sends every key to one primary (stale: a migrated slot): the pipeline
    /// fails with the first redirect, the keys are asked
    /// again alone, each gets its own value, none is counted failed, pipelines are held back
    /// for a second, and a look at the map (in a task) then splits reads by the three
    /// primaries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_sent_to_the_wrong_primary_are_asked_again() {
        let cluster = ncm_cache_testkit::RedisCluster::start().expect("redis cluster");
        let config = crate::RedisConfig {
            cluster_nodes: cluster.node_urls(),
            health_check_interval: None,
            ..Default::default()
        };
        let backend = crate::RedisBackend::connect(config).await.unwrap();
        let keys: Vec<String> = (0..60).map(|i| format!("wrong:{i}")).collect();
        for k in &keys {
            ncm_cache_core::CacheBackend::set(&backend, k, Bytes::from(k.clone()), None)
                .await
                .unwrap();
        }
        let inner = backend.inner();
        let owners = inner
            .batcher
            .as_ref()
            .and_then(|b| b.cluster.as_ref())
            .unwrap();
        *owners.map.write().unwrap() = Some(Arc::new(vec![0; SLOTS]));
        owners.stale.store(false, Ordering::Release);
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (answers, pending) = ask_cluster(inner, owners, &refs).await;
        let Ok(Answers::Each(answers)) = answers else {
            panic!("no answers")
        };
        assert_eq!(pending, 0, "no failed read to count");
        for (k, a) in keys.iter().zip(answers) {
            assert_eq!(a.unwrap(), Some(Bytes::from(k.clone())), "{k}");
        }
        assert!(
            owners.stale.load(Ordering::Acquire),
            "the map is to be looked at again"
        );
        assert!(before(&owners.alone_until), "pipelines are held back");
        let calls = || {
            keys.iter()
                .map(|k| Get {
                    key: k.clone(),
                    deadline: None,
                    tx: oneshot::channel().0,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            owners.split(calls()).len(),
            keys.len(),
            "one key per part meanwhile"
        );
        owners.look_if_stale(inner);
        let start = std::time::Instant::now();
        while owners.current().is_some_and(|m| m.iter().all(|&o| o == 0)) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the map was not looked at"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let map = owners.current().unwrap();
        assert!(map.iter().all(|&o| o != UNKNOWN));
        *owners.alone_until.lock().unwrap() = None;
        assert_eq!(owners.split(calls()).len(), 3, "one part per primary");
    }
}
