//! Write-behind: write the cache now, persist later — coalesced, batched, retried, bounded, and
//! (with Redis) durable across crashes.

mod config;
#[cfg(feature = "redis")]
mod durable;
mod handle;
mod queue;
mod state;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ncm_cache_core::{Cache, Codec, Expiry, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[cfg(feature = "redis")]
pub use config::DurableConfig;
pub use config::{DeadLetter, OnFull, QueueFull, WriteBehindConfig, is_queue_full};

use crate::stats::WriteBehindStats;
use crate::store::Store;
use queue::Shared;
use state::Journal;

/// Values a write-behind queue can hold: cached (serialized), kept until persisted (cloned),
/// and journaled to Redis in durable mode (deserialized on recovery).
pub trait QueueValue: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> QueueValue for T {}

/// A write-behind queue over one cache and one store: [`write`](Self::write) caches the value
/// at once and acknowledges; a background task persists it after `delay`.
///
/// - **Coalescing**: writes to a key that is still waiting replace its value (last write wins);
///   the key keeps the due time of its first waiting write, so a hot key is not starved.
/// - **Batching**: due entries go to [`PersistentStore::store_batch`](crate::PersistentStore)
///   in batches of up to `batch_size`.
/// - **Retries, then dead letters**: a failed batch is retried with exponential backoff up to
///   `max_retries`, then its entries are kept in a dead-letter list.
/// - **Back-pressure**: at most `max_pending` keys wait; see [`OnFull`].
/// - [`flush`](Self::flush) persists everything pending now; [`shutdown`](Self::shutdown)
///   flushes and stops the task. Dropping every handle also flushes in the background.
/// - **Durable mode** (feature `redis`, [`DurableConfig`]): each write is appended to a Redis
///   Stream before it is acknowledged, so a crashed process loses nothing; see [`DurableConfig`].
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_codec::Serializer;
/// use ncm_cache_core::Cache;
/// use ncm_cache_memory::MemoryBackend;
/// use ncm_cache_strategies::{store_fn, WriteBehind, WriteBehindConfig};
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// let cache = Cache::new(MemoryBackend::new(), Serializer::default());
/// let store = store_fn(|_key: String, _count: u64| async { Ok::<_, std::io::Error>(()) });
/// let queue = WriteBehind::start(cache.clone(), store, WriteBehindConfig::default()).await?;
/// for i in 0..1000u64 {
///     queue.write("counter", &i, Duration::from_secs(60), Duration::from_millis(50)).await?;
/// }
/// assert_eq!(cache.get::<u64>("counter").await?, Some(999)); // cached at once
/// queue.shutdown().await?;                                   // persisted: one store call
/// let stats = queue.stats();
/// assert_eq!((stats.accepted, stats.stored, stats.pending), (1000, 1, 0));
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
#[cfg_attr(
    not(feature = "redis"),
    doc = "\n[`DurableConfig`]: https://docs.rs/ncm-cache-strategies/latest/ncm_cache_strategies/struct.DurableConfig.html"
)]
pub struct WriteBehind<V> {
    inner: Arc<handle::Handle<V>>,
}

impl<V> Clone for WriteBehind<V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V> fmt::Debug for WriteBehind<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBehind")
            .field("name", &self.inner.shared.name)
            .finish_non_exhaustive()
    }
}

impl<V: QueueValue> WriteBehind<V> {
    /// Starts a queue (and its background task) writing to `cache` and persisting to `store`.
    /// In durable mode this also joins the stream's consumer group and adopts the pending
    /// writes of crashed processes.
    pub async fn start<C: Codec>(
        cache: Cache<C>,
        store: Store<V>,
        config: WriteBehindConfig,
    ) -> Result<Self> {
        Self::start_announcing(cache, None, store, config).await
    }

    /// [`start`](Self::start) for a `CacheStrategies`: the queue's own cache changes are
    /// announced through `inv`.
    pub(crate) async fn start_announcing<C: Codec>(
        cache: Cache<C>,
        inv: Option<Arc<crate::invalidation::Invalidator>>,
        store: Store<V>,
        config: WriteBehindConfig,
    ) -> Result<Self> {
        config.validate()?;
        #[cfg(feature = "redis")]
        let journal: Option<Arc<dyn Journal<V>>> = match &config.durable {
            Some(d) => {
                Some(Box::pin(durable::RedisJournal::open(d, store.name(), cache.clone())).await?)
            }
            None => None,
        };
        #[cfg(not(feature = "redis"))]
        let journal: Option<Arc<dyn Journal<V>>> = None;
        let sink: Arc<dyn state::CacheSink<V>> = match inv {
            Some(inv) => Arc::new(state::Announcing { cache, inv }),
            None => Arc::new(cache),
        };
        let shared = Shared::new(store, sink, journal, config);
        let handle = handle::Handle::start(shared).await?;
        Ok(Self {
            inner: Arc::new(handle),
        })
    }

    /// Caches `value` under `key` now and schedules it to be persisted after `delay`.
    ///
    /// When this returns `Ok`, the write is acknowledged: it will reach the store, or be
    /// reported as a dead letter. In durable mode it is already in Redis. On `Err`, nothing was
    /// queued, and the cached value was removed again if caching succeeded or may have (a cache
    /// write that timed out can land later); an older write of the key that is still waiting
    /// then evicts the key again once it is persisted.
    pub async fn write(
        &self,
        key: &str,
        value: &V,
        ttl: impl Into<Expiry>,
        delay: Duration,
    ) -> Result<()> {
        self.inner.shared.write(key, value, ttl.into(), delay).await
    }

    /// Persists everything pending when called (not waiting for delays). `Err` when some of it
    /// went to the dead-letter list.
    pub async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    /// Stops accepting writes, persists everything pending and stops the background task.
    /// Idempotent. `Err` when dead letters remain (they stay readable and replayable).
    pub async fn shutdown(&self) -> Result<()> {
        self.inner.shutdown().await
    }

    /// The writes given up after the last retry, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter<V>> {
        self.inner.shared.dead_letters()
    }

    /// Puts every dead letter back into the queue (unless a newer write of its key is waiting)
    /// and flushes; returns how many were replayed. Entries that fail again return to the
    /// dead-letter list and the error is returned.
    pub async fn replay_dead_letters(&self) -> Result<usize> {
        let n = self.inner.shared.requeue_dead_letters();
        self.inner.flush().await?;
        Ok(n)
    }

    /// Durable mode: adopts now the pending writes of consumers whose lease expired (this also
    /// runs at start and periodically). Returns how many entries were adopted; 0 without Redis.
    pub async fn recover(&self) -> Result<usize> {
        self.inner.shared.recover().await
    }

    /// Keys waiting to be persisted (including a batch being stored).
    pub fn pending(&self) -> usize {
        self.inner.shared.pending()
    }

    /// The queue's name (the store's name).
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// A snapshot of the counters (the acceptance numbers: writes vs store calls).
    pub fn stats(&self) -> WriteBehindStats {
        self.inner.shared.stats()
    }
}

/// Type-erased control of a queue, so `CacheStrategies` can flush and stop queues of any type.
#[async_trait::async_trait]
pub(crate) trait QueueControl: Send + Sync {
    async fn flush(&self) -> Result<()>;
    async fn shutdown(&self) -> Result<()>;
    fn stats(&self) -> WriteBehindStats;
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync);
    /// A write-through or write-around of `key` to this queue's store begins (see
    /// `queue.rs`'s `DirectWrite`).
    async fn direct_write<'a>(&'a self, key: &'a str) -> Box<dyn DirectWriting + 'a>;
}

/// [`queue::DirectWrite`], type-erased.
#[async_trait::async_trait]
pub(crate) trait DirectWriting: Send {
    /// Durable mode: journals the direct write before its store call (`value` is the queue's
    /// value type; any other is not journaled).
    async fn journal(&mut self, value: &(dyn std::any::Any + Send + Sync)) -> Result<()>;
    /// The store call failed.
    async fn failed(&mut self);
    /// The store accepted the direct write: the key's waiting write is superseded. The key
    /// stays locked until this is dropped.
    fn stored(&mut self);
}

#[async_trait::async_trait]
impl<V: QueueValue> DirectWriting for queue::DirectWrite<'_, V> {
    async fn journal(&mut self, value: &(dyn std::any::Any + Send + Sync)) -> Result<()> {
        match value.downcast_ref::<V>() {
            Some(value) => queue::DirectWrite::journal(self, value).await,
            None => Ok(()),
        }
    }
    async fn failed(&mut self) {
        queue::DirectWrite::failed(self).await;
    }
    fn stored(&mut self) {
        queue::DirectWrite::stored(self);
    }
}

#[async_trait::async_trait]
impl<V: QueueValue> QueueControl for WriteBehind<V> {
    async fn flush(&self) -> Result<()> {
        WriteBehind::flush(self).await
    }
    async fn shutdown(&self) -> Result<()> {
        WriteBehind::shutdown(self).await
    }
    fn stats(&self) -> WriteBehindStats {
        WriteBehind::stats(self)
    }
    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
    async fn direct_write<'a>(&'a self, key: &'a str) -> Box<dyn DirectWriting + 'a> {
        Box::new(self.inner.shared.direct_write(key).await)
    }
}
