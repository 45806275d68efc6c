//! Configuration and public data types of write-behind queues.

use std::fmt;
#[cfg(feature = "redis")]
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ncm_cache_core::{CacheError, Result};
#[cfg(feature = "redis")]
use ncm_cache_redis::RedisBackend;

/// What a write does when the queue already holds `max_pending` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// Wait for room (up to `full_wait_timeout`); the queue persists its oldest entries early.
    #[default]
    Wait,
    /// Fail at once with a [`QueueFull`] error (see [`is_queue_full`]).
    Error,
}

/// Settings of a write-behind queue.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_strategies::{OnFull, WriteBehindConfig};
/// let config = WriteBehindConfig::default()
///     .batch_size(500)
///     .max_pending(50_000)
///     .on_full(OnFull::Error)
///     .max_retries(3)
///     .retry_backoff(Duration::from_millis(50));
/// assert_eq!(config.batch_size, 500);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct WriteBehindConfig {
    /// Most entries handed to one `store_batch` call (default 100).
    pub batch_size: usize,
    /// Once the oldest entry is due, how long to wait for more to become due before calling the
    /// store, so calls carry fuller batches (default 10 ms; skipped when a whole batch is due).
    pub batch_linger: Duration,
    /// Most distinct keys waiting to be persisted (default 10,000). Writes to a key that is
    /// already waiting always fit (they coalesce). A soft bound: concurrent writers may overshoot
    /// it by their number.
    pub max_pending: usize,
    /// What a write does when the queue is full (default [`OnFull::Wait`]).
    pub on_full: OnFull,
    /// How long [`OnFull::Wait`] waits for room before failing (default 30 s).
    pub full_wait_timeout: Duration,
    /// Retries of a failed store call before its entries go to the dead-letter list (default 5).
    pub max_retries: u32,
    /// First retry delay; doubles per retry, with jitter (default 100 ms).
    pub retry_backoff: Duration,
    /// Largest retry delay (default 10 s).
    pub max_retry_backoff: Duration,
    /// Durable mode: journal pending writes in a Redis Stream (default off).
    #[cfg(feature = "redis")]
    pub durable: Option<DurableConfig>,
}

impl fmt::Debug for WriteBehindConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("WriteBehindConfig");
        d.field("batch_size", &self.batch_size)
            .field("batch_linger", &self.batch_linger)
            .field("max_pending", &self.max_pending)
            .field("on_full", &self.on_full)
            .field("full_wait_timeout", &self.full_wait_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("max_retry_backoff", &self.max_retry_backoff);
        #[cfg(feature = "redis")]
        d.field("durable", &self.durable);
        d.finish()
    }
}

impl Default for WriteBehindConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            batch_linger: Duration::from_millis(10),
            max_pending: 10_000,
            on_full: OnFull::Wait,
            full_wait_timeout: Duration::from_secs(30),
            max_retries: 5,
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(10),
            #[cfg(feature = "redis")]
            durable: None,
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            #[must_use]
            pub fn $name(mut self, value: $ty) -> Self {
                self.$name = value;
                self
            }
        )*
    };
}

impl WriteBehindConfig {
    setters! {
        /// Sets [`batch_size`](Self::batch_size).
        batch_size: usize,
        /// Sets [`batch_linger`](Self::batch_linger).
        batch_linger: Duration,
        /// Sets [`max_pending`](Self::max_pending).
        max_pending: usize,
        /// Sets [`on_full`](Self::on_full).
        on_full: OnFull,
        /// Sets [`full_wait_timeout`](Self::full_wait_timeout).
        full_wait_timeout: Duration,
        /// Sets [`max_retries`](Self::max_retries).
        max_retries: u32,
        /// Sets [`retry_backoff`](Self::retry_backoff).
        retry_backoff: Duration,
        /// Sets [`max_retry_backoff`](Self::max_retry_backoff).
        max_retry_backoff: Duration,
    }

    /// Turns on durable mode: pending writes are journaled in a Redis Stream.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    #[must_use]
    pub fn durable(mut self, durable: DurableConfig) -> Self {
        self.durable = Some(durable);
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.max_pending == 0 {
            return Err(CacheError::Config(
                "write-behind batch_size and max_pending must be greater than zero".into(),
            ));
        }
        Ok(())
    }
}

/// A write that failed `max_retries + 1` times. Read them with
/// [`WriteBehind::dead_letters`](super::WriteBehind::dead_letters); retry them with [`WriteBehind::replay_dead_letters`](super::WriteBehind::replay_dead_letters). A newer
/// write of the same key replaces its dead letter (it is then counted as `superseded`).
///
/// Dead letters are kept in memory, one per key, until replayed or replaced: they are not
/// bounded by `max_pending` (dropping them would lose acknowledged writes), so a store that stays
/// down while writes reach many distinct keys grows the list — watch the `dead_letters` stat.
/// A write of a key that has no dead letter does not search the list (before, every write did,
/// so an outage cost writes time in proportion to its length — review, helper-69); taking a
/// key's own dead letter back still does, once.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter<V> {
    /// The key.
    pub key: String,
    /// The value that could not be persisted.
    pub value: V,
    /// The store's last error.
    pub error: CacheError,
    /// How many store calls were tried.
    pub attempts: u32,
    /// When it was given up.
    pub failed_at: SystemTime,
}

/// The error source of a write refused because the queue is full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFull {
    /// The queue's name.
    pub queue: String,
    /// Its `max_pending`.
    pub max_pending: usize,
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "write-behind queue {:?} is full ({} keys pending)",
            self.queue, self.max_pending
        )
    }
}

impl std::error::Error for QueueFull {}

/// `true` when `err` is a write refused because the write-behind queue was full.
pub fn is_queue_full(err: &CacheError) -> bool {
    matches!(err, CacheError::Backend { source: Some(source), .. } if source.is::<QueueFull>())
}

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
/// Durable mode of a write-behind queue (feature `redis`): every write is journaled in a Redis
/// Stream before it is acknowledged, and pending writes of a crashed process are adopted and
/// persisted by the next process that runs a queue of the same name (on start, then every
/// `lease / 3`).
///
/// The queue's name is the [`Store`](crate::Store)'s name: give each durable store a stable
/// name, unique per value type (`store_fn(..).named("users")`). Stores must be idempotent: a
/// write persisted just before a crash may be persisted again.
///
/// Needs Redis 6.2 or later (`XPENDING … IDLE`, `XGROUP CREATECONSUMER`). The stream and its
/// companion keys share one hash slot, so it also works on a Redis Cluster.
///
/// ```no_run
/// # async fn demo(cache: ncm_cache_redis::RedisCache) -> ncm_cache_core::Result<()> {
/// use std::time::Duration;
/// use ncm_cache_strategies::{store_fn, DurableConfig, WriteBehind, WriteBehindConfig};
/// let store = store_fn(|_k: String, _v: u64| async { Ok::<_, std::io::Error>(()) }).named("counters");
/// let durable = DurableConfig::new(cache.redis_backend().clone()).lease(Duration::from_secs(10));
/// let config = WriteBehindConfig::default().durable(durable);
/// let queue = WriteBehind::start(cache.cache().clone(), store, config).await?;
/// queue.write("visits", &1, Duration::from_secs(60), Duration::from_secs(5)).await?; // in Redis now
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct DurableConfig {
    /// The Redis holding the stream (usually the cache's own backend).
    pub backend: Arc<RedisBackend>,
    /// How long a consumer stays "alive" without renewing its lease (default 10 s). A crashed
    /// process's writes are adopted by others after this.
    pub lease: Duration,
    /// Minimum idle time of an entry before it can be claimed from a dead consumer (default
    /// 1 s); protects against two recovering processes claiming the same entry.
    pub claim_min_idle: Duration,
}

#[cfg(feature = "redis")]
impl fmt::Debug for DurableConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableConfig")
            .field("lease", &self.lease)
            .field("claim_min_idle", &self.claim_min_idle)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "redis")]
impl DurableConfig {
    /// Durable mode on `backend` with the default lease (10 s) and claim idle time (1 s).
    pub fn new(backend: Arc<RedisBackend>) -> Self {
        Self {
            backend,
            lease: Duration::from_secs(10),
            claim_min_idle: Duration::from_secs(1),
        }
    }

    /// Sets [`lease`](Self::lease).
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets [`claim_min_idle`](Self::claim_min_idle).
    #[must_use]
    pub fn claim_min_idle(mut self, idle: Duration) -> Self {
        self.claim_min_idle = idle;
        self
    }
}
