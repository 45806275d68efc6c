//! Cross-instance coherence over Redis pub/sub, and the distributed stampede lock.
//!
//! Every set / delete / clear publishes `[op][instance id][key]` on the channel
//! `l1:{cache name}` (inside the Redis prefix). Every other instance evicts that key (or
//! everything) from its L1; an instance ignores its own messages. While the subscription is
//! down, L1 is bypassed; when it comes back, L1 is cleared before it is used again, so nothing
//! missed during the outage is ever served.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ncm_cache_core::{CacheError, Codec, Result, ValueSource};
use ncm_cache_redis::{PubSubEvent, RedisBackend, RedisLock};

use crate::cache::{CacheValue, Inner, Loaded, Object};
use crate::load::backoff;
use crate::stats::Counters;

const SET: u8 = b'S';
const DELETE: u8 = b'D';
const CLEAR: u8 = b'C';

pub(crate) struct Backplane {
    pub(crate) redis: Arc<RedisBackend>,
    id: u64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Backplane {
    pub(crate) fn new(redis: Arc<RedisBackend>) -> Self {
        Self {
            redis,
            id: fastrand::u64(..),
            task: Mutex::new(None),
        }
    }

    pub(crate) fn stop(&self) {
        if let Ok(mut task) = self.task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }

    fn message(&self, op: u8, key: &str) -> Vec<u8> {
        let mut m = Vec::with_capacity(9 + key.len());
        m.push(op);
        m.extend_from_slice(&self.id.to_le_bytes());
        m.extend_from_slice(key.as_bytes());
        m
    }
}

impl Drop for Backplane {
    fn drop(&mut self) {
        self.stop();
    }
}

fn channel(name: &str) -> String {
    format!("l1:{name}")
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
    let redis = Arc::clone(&bp.redis);
    let id = bp.id;
    let name = channel(&inner.opts.name);
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
        while let Some(event) = sub.recv().await {
            let Some(inner) = weak.upgrade() else { return };
            match event {
                PubSubEvent::Message { payload, .. } => {
                    let Some((&op, rest)) = payload.split_first() else {
                        continue;
                    };
                    let (Some(origin), Some(key)) = (rest.get(..8), rest.get(8..)) else {
                        continue;
                    };
                    if origin == id.to_le_bytes() {
                        continue;
                    }
                    Counters::bump(&inner.counters.backplane_received);
                    inner.epoch.fetch_add(1, Ordering::AcqRel);
                    match op {
                        CLEAR => inner.l1.clear(),
                        SET | DELETE => {
                            if let Ok(key) = std::str::from_utf8(key) {
                                let _ = inner.l1.remove(key);
                            }
                        }
                        _ => {}
                    }
                }
                PubSubEvent::Disconnected => {
                    inner.l1_enabled.store(false, Ordering::Release);
                    inner.epoch.fetch_add(1, Ordering::AcqRel);
                    inner.l1.clear();
                    tracing::warn!("backplane disconnected: L1 bypassed until it is back");
                }
                PubSubEvent::Reconnected => {
                    resync(&inner, false);
                    tracing::info!("backplane reconnected: L1 cleared and resumed");
                }
                _ => {}
            }
        }
    });
    if let Ok(mut slot) = bp.task.lock() {
        *slot = Some(task);
    }
    Ok(())
}

/// Clears L1 (anything may have changed while we were not listening) and turns it on.
fn resync<C>(inner: &Inner<C>, first: bool) {
    inner.epoch.fetch_add(1, Ordering::AcqRel);
    inner.l1.clear();
    inner.l1_enabled.store(true, Ordering::Release);
    if !first {
        Counters::bump(&inner.counters.resyncs);
    }
}

impl<C: Codec> Inner<C> {
    async fn publish(&self, op: u8, key: &str) {
        let Some(bp) = &self.backplane else { return };
        let msg = bp.message(op, key);
        let channel = channel(&self.opts.name);
        // Boxed: redis-rs futures are deep; keep them out of every write path's future type.
        let publish: std::pin::Pin<Box<dyn Future<Output = Result<u64>> + Send + '_>> =
            Box::pin(bp.redis.publish(&channel, &msg));
        if let Err(e) = publish.await {
            Counters::bump(&self.counters.backplane_errors);
            tracing::warn!(key, error = %e, "backplane publish failed; other instances may serve their L1 copy until it expires");
        }
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
        let same = std::ptr::addr_eq(Arc::as_ptr(&self.l2), Arc::as_ptr(&bp.redis));
        if !same {
            return None;
        }
        let msg = bp.message(SET, key);
        let channel = channel(&self.opts.name);
        let write: std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> =
            Box::pin(bp.redis.set_and_publish(key, bytes, ttl, &channel, &msg));
        Some(self.l2_call(write).await)
    }

    pub(crate) async fn publish_set(&self, key: &str) {
        self.publish(SET, key).await;
    }

    pub(crate) async fn publish_delete(&self, key: &str) {
        self.publish(DELETE, key).await;
    }

    pub(crate) async fn publish_clear(&self) {
        self.publish(CLEAR, "").await;
    }

    /// With a distributed lock: take it, or wait for the holder's value to appear in L2.
    pub(crate) async fn lock_or_wait<T: CacheValue>(&self, key: &str) -> Result<LockOutcome> {
        let Some(redis) = &self.lock else {
            return Ok(LockOutcome::Proceed(None));
        };
        let deadline = Instant::now() + self.opts.lock_wait;
        let name = format!("load:{key}");
        let mut attempt = 0;
        loop {
            match redis.try_lock(&name, self.opts.lock_ttl).await {
                Ok(Some(guard)) => {
                    // Someone may have loaded and released just before we got the lock.
                    if let Some(found) = self.found_in_l2::<T>(key).await {
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
            if let Some(found) = self.found_in_l2::<T>(key).await {
                return Ok(LockOutcome::Found(found));
            }
            if Instant::now() >= deadline {
                tracing::warn!(key, "stampede lock wait timed out; loading");
                return Ok(LockOutcome::Proceed(None));
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }

    async fn found_in_l2<T: CacheValue>(&self, key: &str) -> Option<Loaded> {
        let epoch = self.epoch.load(Ordering::Acquire);
        match self.l2_read::<T>(key).await {
            Ok(Some((v, size))) => {
                let v = v as Object;
                self.l1_insert(key, Some(Arc::clone(&v)), size, Some(epoch), false);
                Some((Some(v), ValueSource::L2))
            }
            _ => None,
        }
    }
}

pub(crate) enum LockOutcome {
    Found(Loaded),
    Proceed(Option<RedisLock>),
}
