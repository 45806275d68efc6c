//! Server-assisted coherence: L1 evictions from Redis's own client-tracking pushes
//! (docs/ARCHITECTURE.md, "Server-assisted coherence").

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ncm_cache_core::{CacheError, Codec, Result};
use ncm_cache_redis::{RedisBackend, TrackingEvent};

use crate::cache::{Inner, Link};
use crate::stats::Counters;
use crate::tombstone::Tombstone;

/// How an instance learns that another one — or any other client of Redis — changed a key it
/// holds in L1.
///
/// | mode | hears | costs |
/// |---|---|---|
/// | `Backplane` (default of [`over_redis`](crate::MultiLevelCache::over_redis)) | writes made through ncm-cache, on any instance | one PUBLISH per write (batched under load) |
/// | `Tracking` | every change of a key under the cache's prefix, by anyone: other programs, `redis-cli`, Lua, expiry, eviction, `FLUSHALL` | one push per changed key to every instance (also to the writer's own, which then evicts its own copy); Redis 6+ with `HELLO 3` and `CLIENT TRACKING` |
/// | `Both` | both | both; L1 is trusted only while both are connected |
///
/// ```no_run
/// # async fn demo() -> ncm_cache_core::Result<()> {
/// use ncm_cache_multilevel::{Coherence, MultiLevelCache};
/// use ncm_cache_redis::RedisCache;
///
/// let redis = RedisCache::builder().url("redis://127.0.0.1:6379")?.key_prefix("app:").build().await?;
/// let cache = MultiLevelCache::over_redis(&redis)
///     .coherence(Coherence::Tracking)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Coherence {
    /// The pub/sub backplane: instances tell each other about their own writes.
    #[default]
    Backplane,
    /// RESP3 client tracking (broadcast mode, the cache's key prefix) on every primary.
    Tracking,
    /// The backplane and client tracking together.
    Both,
}

/// The tracking listener of a cache.
pub(crate) struct Tracker {
    pub(crate) redis: Arc<RedisBackend>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Tracker {
    pub(crate) fn new(redis: Arc<RedisBackend>) -> Self {
        Self {
            redis,
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
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the tracking listener. L1 stays bypassed until every primary is tracked.
pub(crate) fn start<C: Codec>(inner: &Arc<Inner<C>>) -> Result<()> {
    let Some(tracker) = &inner.tracking else {
        return Ok(());
    };
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        CacheError::Config(
            "client tracking needs a tokio runtime: build the cache inside one".into(),
        )
    })?;
    let weak: Weak<Inner<C>> = Arc::downgrade(inner);
    let redis = Arc::clone(&tracker.redis);
    let task = handle.spawn(async move {
        let mut attempt = 0u32;
        let mut tracking = loop {
            match redis.track_changes().await {
                Ok(t) => break t,
                Err(e) => {
                    if weak.strong_count() == 0 {
                        return;
                    }
                    // A server that refuses tracking: logged loudly, asked again every 30 s;
                    // L1 stays off meanwhile (nothing would invalidate it).
                    let wait = if matches!(e, CacheError::Config(_)) {
                        tracing::error!(error = %e, "client tracking refused: L1 stays off");
                        Duration::from_secs(30)
                    } else {
                        if attempt == 0 {
                            tracing::warn!(error = %e, "client tracking failed; retrying");
                        } else {
                            tracing::debug!(error = %e, "client tracking failed; retrying");
                        }
                        Duration::from_millis(50u64 << attempt.min(5)).min(Duration::from_secs(1))
                    };
                    tokio::time::sleep(wait).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        };
        if let Some(inner) = weak.upgrade() {
            inner.link_up(Link::Tracking, true);
        }
        while let Some(event) = tracking.recv().await {
            let Some(inner) = weak.upgrade() else { return };
            match event {
                TrackingEvent::Invalidated(keys) => {
                    for key in &keys {
                        if let Some(tombstone) = Tombstone::parse(key) {
                            match tombstone {
                                Tombstone::Key(k) => {
                                    let _ = inner.invalidate_l1(k);
                                }
                                Tombstone::Pattern(p) => {
                                    let _ = inner.invalidate_l1_matching(p);
                                }
                                Tombstone::All => inner.remote_clear(),
                            }
                            continue;
                        }
                        match &inner.epoch {
                            None => {
                                let _ = inner.invalidate_l1(key);
                            }
                            Some(epoch) => match epoch.user_key(key) {
                                Some(key) => {
                                    let _ = inner.invalidate_l1(key);
                                }
                                // The epoch key changed: a clear.
                                None => inner.remote_clear(),
                            },
                        }
                    }
                    inner
                        .counters
                        .tracking_received
                        .fetch_add(keys.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                TrackingEvent::Flushed => {
                    inner.remote_clear();
                    Counters::bump(&inner.counters.tracking_received);
                }
                TrackingEvent::Disconnected => {
                    inner.link_down(Link::Tracking);
                    tracing::warn!(
                        "client tracking disconnected: L1 serves nothing as fresh until it is back"
                    );
                }
                TrackingEvent::Reconnected => {
                    inner.link_up(Link::Tracking, false);
                    tracing::info!("client tracking reconnected: L1 made stale-only and resumed");
                }
                _ => {}
            }
        }
        // The session ended (it never does while it runs): nothing invalidates L1 any more.
        if let Some(inner) = weak.upgrade() {
            inner.link_down(Link::Tracking);
            tracing::error!("client tracking ended: L1 stays off");
        }
    });
    if let Ok(mut slot) = tracker.task.lock() {
        *slot = Some(task);
    }
    Ok(())
}
