//! Automatic batching of concurrent single-key calls (`RedisConfig::auto_batch`, on by default).
//!
//! Concurrent `get`s are coalesced into one `MGET` (duplicates of a key share one slot) and
//! concurrent `set`s into one pipeline (per hash slot on a cluster). Nothing waits for a timer:
//! a call that finds fewer than [`MAX_IN_FLIGHT`] batches in flight sends at once — alone when
//! the connection is idle, so a single caller pays nothing but a lock and a oneshot — and the
//! calls that arrive while batches are in flight are sent together as soon as one returns.
//!
//! Reads are sent by the caller that leads them (no task hop); if that caller is cancelled
//! mid-flight, its batch is sent again by a background task for the others (a read is
//! idempotent). Writes are always sent by a background task, so a cancelled caller never
//! cancels the writes of others, and are never resent. Every caller gets its own result (a
//! write's error reply reaches only its call) or a copy of its batch's failure, and waits no
//! longer than an unbatched call may (`connect_timeout` + `response_timeout` per attempt);
//! a caller that gave up is left out of any batch not yet sent, so a timed-out write is never
//! applied later. On a cluster batching is off (per-slot batches gained nothing there yet).
//!
//! One difference from a plain GET: `MGET` answers nil for a key holding another type where
//! GET answers `WRONGTYPE`, so such a key reads as missing.
//!
//! Order: a batch is taken from the queue in arrival order and keeps it; two batches may be in
//! flight at once, so two calls that were both in flight may apply in either order (as two
//! concurrent calls may without batching); a call made after another returned is always
//! applied after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ncm_cache_core::{Bytes, CacheError, Operation, Result};
use tokio::sync::oneshot;

use crate::backend::Inner;
use crate::commands;

/// Batches of one kind in flight at once (one being sent while another's reply is handled).
pub(crate) const MAX_IN_FLIGHT: usize = 4;
/// Most calls in one batch (one MGET / one pipeline).
pub(crate) const MAX_BATCH: usize = 256;

/// A queued read.
pub(crate) struct Get {
    key: String,
    tx: oneshot::Sender<Result<Option<Bytes>>>,
}

/// A queued write.
pub(crate) struct Set {
    key: String,
    value: Bytes,
    ttl: Option<Duration>,
    tx: oneshot::Sender<Result<()>>,
}

/// The queues of one connection.
#[derive(Default)]
pub(crate) struct Batcher {
    gets: Lane<Get>,
    sets: Lane<Set>,
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

impl<R> Queue<R> {
    fn take(&mut self) -> Vec<R> {
        if self.items.len() <= MAX_BATCH {
            std::mem::take(&mut self.items)
        } else {
            self.items.drain(..MAX_BATCH).collect()
        }
    }
}

impl<R> Lane<R> {
    fn lock(&self) -> MutexGuard<'_, Queue<R>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `req`; returns a batch (with a slot in flight) when the caller may send one.
    fn push(&self, req: R) -> Option<Vec<R>> {
        let mut q = self.lock();
        q.items.push(req);
        if q.in_flight < MAX_IN_FLIGHT {
            q.in_flight += 1;
            Some(q.take())
        } else {
            None
        }
    }

    /// After a batch: the next one (keeping the slot), or `None` (the slot given back).
    fn next(&self) -> Option<Vec<R>> {
        let mut q = self.lock();
        if q.items.is_empty() {
            q.in_flight -= 1;
            None
        } else {
            Some(q.take())
        }
    }
}

/// The answer when a batch ended without one for this call (its sender was dropped: the
/// runtime shut down).
fn abandoned() -> CacheError {
    CacheError::Connection {
        message: "the batched call was abandoned (runtime shutting down?); retry".into(),
        source: None,
    }
}

/// How long a caller waits for its batch at most: what one unbatched call may take (connect,
/// then each attempt's response timeout). A caller that gives up is dropped from any batch
/// not yet sent.
fn call_bound(inner: &Inner, op: &'static str, retried: bool) -> (Duration, &'static str) {
    let c = &inner.config;
    let attempts = if retried && c.retry_on_timeout { 2 } else { 1 };
    (c.connect_timeout + c.response_timeout * attempts, op)
}

/// Waits for this call's answer. An error the batch delivered was counted in the stats by
/// the batch; one that happens here (the bound passed, the batch abandoned) is counted here.
async fn wait<T>(
    inner: &Inner,
    rx: oneshot::Receiver<Result<T>>,
    (bound, op): (Duration, &'static str),
    kind: Operation,
) -> Result<T> {
    let failed = match tokio::time::timeout(bound, rx).await {
        Ok(Ok(r)) => return r,
        Ok(Err(_)) => abandoned(),
        Err(_) => CacheError::Timeout {
            operation: op,
            after: bound,
        },
    };
    inner.stats.error(kind);
    Err(failed)
}

/// Hands `answer` to its caller and counts a delivered error, so that every failed call is
/// counted once: `pending` is an error `Inner::run` already counted for the batch, attributed
/// to the first failed call delivered.
fn deliver<T>(
    inner: &Inner,
    kind: Operation,
    tx: oneshot::Sender<Result<T>>,
    answer: Result<T>,
    pending: &mut bool,
) {
    let failed = answer.is_err();
    if tx.send(answer).is_ok() && failed {
        if *pending {
            *pending = false;
        } else {
            inner.stats.error(kind);
        }
    }
}

/// Reads `key` (a full key) in a batch.
pub(crate) async fn get(
    inner: &Arc<Inner>,
    batcher: &Batcher,
    key: String,
) -> Result<Option<Bytes>> {
    let (tx, rx) = oneshot::channel();
    if let Some(batch) = batcher.gets.push(Get { key, tx }) {
        let mut lead = Leading {
            inner,
            batch: Some(batch),
        };
        lead.run().await;
    }
    wait(inner, rx, call_bound(inner, "get", true), Operation::Get).await
}

/// Writes `key` (a full key) in a batch.
pub(crate) async fn set(
    inner: &Arc<Inner>,
    batcher: &Batcher,
    key: String,
    value: Bytes,
    ttl: Option<Duration>,
) -> Result<()> {
    let (tx, rx) = oneshot::channel();
    if let Some(batch) = batcher.sets.push(Set {
        key,
        value,
        ttl,
        tx,
    }) {
        tokio::spawn(flush_sets(Arc::clone(inner), batch));
    }
    wait(inner, rx, call_bound(inner, "set", false), Operation::Set).await
}

/// A read batch sent by its leading caller; resent by a task if that caller is cancelled.
struct Leading<'a> {
    inner: &'a Arc<Inner>,
    batch: Option<Vec<Get>>,
}

impl Leading<'_> {
    async fn run(&mut self) {
        if let Some(batch) = self.batch.as_mut() {
            send_gets(self.inner, batch).await;
        }
        self.batch = None;
        if let Some(batcher) = self.inner.batcher.as_ref()
            && let Some(next) = batcher.gets.next()
        {
            tokio::spawn(flush_gets(Arc::clone(self.inner), next));
        }
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        // Cancelled mid-flight: the others still wait for this batch (the slot is still held).
        if let Some(batch) = self.batch.take() {
            tokio::spawn(flush_gets(Arc::clone(self.inner), batch));
        }
    }
}

async fn flush_gets(inner: Arc<Inner>, mut batch: Vec<Get>) {
    let Some(batcher) = inner.batcher.as_ref() else {
        return;
    };
    loop {
        send_gets(&inner, &mut batch).await;
        match batcher.gets.next() {
            Some(next) => batch = next,
            None => return,
        }
    }
}

async fn flush_sets(inner: Arc<Inner>, mut batch: Vec<Set>) {
    let Some(batcher) = inner.batcher.as_ref() else {
        return;
    };
    loop {
        send_sets(&inner, &mut batch).await;
        match batcher.sets.next() {
            Some(next) => batch = next,
            None => return,
        }
    }
}

/// One GET (a batch of one) or one MGET of the distinct keys; every caller gets its answer.
async fn send_gets(inner: &Inner, batch: &mut Vec<Get>) {
    // Callers that gave up (timed out, cancelled) are not asked for.
    batch.retain(|g| !g.tx.is_closed());
    if batch.is_empty() {
        return;
    }
    if batch.len() == 1 {
        let key = batch[0].key.as_str();
        let r: Result<Option<Vec<u8>>> = inner
            .run(Operation::Get, true, |mut h| {
                let c = commands::get(key);
                async move { c.query_async(&mut h).await }
            })
            .await;
        if let Some(g) = batch.pop() {
            let mut pending = r.is_err();
            deliver(
                inner,
                Operation::Get,
                g.tx,
                r.map(|v| v.map(Bytes::from)),
                &mut pending,
            );
        }
        return;
    }
    // Distinct keys in first-seen order; `slot[i]` is call i's key's place.
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    let mut keys: Vec<&str> = Vec::with_capacity(batch.len());
    let slot: Vec<usize> = batch
        .iter()
        .map(|g| {
            *index.entry(g.key.as_str()).or_insert_with(|| {
                keys.push(g.key.as_str());
                keys.len() - 1
            })
        })
        .collect();
    let mut mget = redis::cmd("MGET");
    mget.arg(&keys);
    let mget = &mget;
    let r: Result<Vec<Option<Vec<u8>>>> = inner
        .run(Operation::Get, true, |mut h| async move {
            mget.query_async(&mut h).await
        })
        .await;
    // A failed MGET was counted once by `run`; a reply of the wrong length was not.
    let mut pending = r.is_err();
    let r = r.and_then(|values| {
        if values.len() == keys.len() {
            Ok(values
                .into_iter()
                .map(|v| v.map(Bytes::from))
                .collect::<Vec<_>>())
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
    drop(index);
    drop(keys);
    for (g, at) in batch.drain(..).zip(slot) {
        let answer = match &r {
            Ok(values) => Ok(values[at].clone()),
            Err(e) => Err(e.clone()),
        };
        deliver(inner, Operation::Get, g.tx, answer, &mut pending);
    }
}

/// One pipeline of SETs (per hash slot on a cluster); every caller gets its own command's
/// outcome (a server error reply reaches only its call), or its pipeline's failure.
async fn send_sets(inner: &Inner, batch: &mut Vec<Set>) {
    // A write whose caller gave up before it was sent is not sent: its caller saw a timeout
    // (or was cancelled) and the write is not applied later behind its back.
    batch.retain(|s| !s.tx.is_closed());
    if batch.is_empty() {
        return;
    }
    let groups: Vec<Vec<usize>> = if inner.conn.is_cluster() {
        let keys: Vec<&[u8]> = batch.iter().map(|s| s.key.as_bytes()).collect();
        crate::conn::group_by_slot(&keys)
    } else {
        vec![(0..batch.len()).collect()]
    };
    let timeout = inner.config.response_timeout;
    let sends = groups.iter().map(|group| {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for &i in group {
            let s = &batch[i];
            pipe.add_command(commands::set(&s.key, &s.value, s.ttl));
        }
        async move {
            let pipe = &pipe;
            inner
                .run(Operation::Set, false, |mut h| async move {
                    pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut h)
                        .await
                })
                .await
        }
    });
    let outcomes = futures_util::future::join_all(sends).await;
    let mut calls: Vec<Option<Set>> = batch.drain(..).map(Some).collect();
    for (group, outcome) in groups.iter().zip(outcomes) {
        // A failed pipeline was counted once by `run`; error replies were not.
        let mut pending = outcome.is_err();
        let mut replies = outcome.map(Vec::into_iter);
        for &i in group {
            let Some(call) = calls.get_mut(i).and_then(Option::take) else {
                continue;
            };
            let answer = match &mut replies {
                Ok(replies) => match replies.next() {
                    Some(reply) => reply
                        .map(|_| ())
                        .map_err(|e| crate::error::map_err("set", e, timeout)),
                    None => Err(abandoned()),
                },
                Err(e) => Err(e.clone()),
            };
            deliver(inner, Operation::Set, call.tx, answer, &mut pending);
        }
    }
}
