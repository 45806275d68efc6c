//! Options of a [`MultiLevelCache`](crate::MultiLevelCache) (the original's constructor
//! arguments, plus the fail-safe, refresh and coherence options).

#[cfg(feature = "redis")]
use std::sync::Arc;
use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::{Clock, CoarseClock, Codec, Result, SharedBackend, SharedClock};

use crate::cache::MultiLevelCache;

/// The distributed lock's TTL in [`MultiLevelCache::over_redis`]: renewed every third of it
/// while the loader runs, so it only bounds how long a crashed holder blocks others.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(10);
/// How long a waiter waits for the lock holder's value in [`MultiLevelCache::over_redis`]
/// before it loads itself (or serves stale, with fail-safe): longer than the lock TTL, so a
/// crashed holder's lock expires and is taken over before waiters give up.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(15);

/// Tunables shared by the cache's operations.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) name: String,
    pub(crate) l1_max_size: u64,
    pub(crate) l1_max_bytes: u64,
    pub(crate) l1_default_ttl: Duration,
    pub(crate) l2_default_ttl: Option<Duration>,
    pub(crate) enable_promotion: bool,
    pub(crate) promotion_threshold: u32,
    pub(crate) enable_stampede_prevention: bool,
    pub(crate) epoch_clear: bool,
    pub(crate) trace_l1_hits: bool,
    pub(crate) max_stale_age: Option<Duration>,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) hard_timeout: Option<Duration>,
    pub(crate) eager_refresh: Option<f64>,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cooldown: Duration,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) lock_ttl: Duration,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) lock_wait: Duration,
    pub(crate) clock: SharedClock,
    /// The default clock itself (the same readings as `clock`), called directly on the L1 hit
    /// path: no dynamic call. `None` once a clock is configured.
    pub(crate) coarse: Option<CoarseClock>,
}

impl Options {
    /// Refuses a zero where zero would not mean "off" but a cache that silently does
    /// something else: a fail-safe that serves nothing, every load abandoned at once (hard
    /// timeout) or a stale value served before the load began (soft), entries (or "not
    /// found") stored to expire at once. `None` turns each off.
    pub(crate) fn validate(&self) -> Result<()> {
        let zero = [
            ("l2_default_ttl (None: no expiry)", self.l2_default_ttl),
            (
                "fail_safe's max stale age (leave fail_safe unset for none)",
                self.max_stale_age,
            ),
            ("the soft loader timeout (None: none)", self.soft_timeout),
            ("the hard loader timeout (None: none)", self.hard_timeout),
            (
                "negative_ttl (leave it unset for no negative caching)",
                self.negative_ttl,
            ),
        ]
        .into_iter()
        .find(|(_, d)| d.is_some_and(|d| d.is_zero()));
        match zero {
            Some((what, _)) => Err(ncm_cache_core::CacheError::Config(format!(
                "MultiLevelCache: {what} must be greater than zero"
            ))),
            None => Ok(()),
        }
    }

    /// The L1 clock's [`now_nanos`](ncm_cache_core::Clock::now_nanos).
    #[inline]
    pub(crate) fn now_nanos(&self) -> u64 {
        match &self.coarse {
            Some(c) => c.now_nanos(),
            None => self.clock.now_nanos(),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        // The L1 hit path reads the clock on every hit: a coarse clock keeps it cheap.
        let coarse = CoarseClock::new();
        Self {
            clock: std::sync::Arc::new(coarse),
            coarse: Some(coarse),
            name: "multilevel".into(),
            l1_max_size: 1000,
            l1_max_bytes: 64 * 1024 * 1024,
            l1_default_ttl: Duration::from_secs(300),
            l2_default_ttl: Some(Duration::from_secs(3600)),
            enable_promotion: true,
            promotion_threshold: 1,
            enable_stampede_prevention: true,
            epoch_clear: false,
            trace_l1_hits: false,
            max_stale_age: None,
            soft_timeout: None,
            hard_timeout: None,
            eager_refresh: None,
            negative_ttl: None,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            lock_ttl: DEFAULT_LOCK_TTL,
            lock_wait: DEFAULT_LOCK_WAIT,
        }
    }
}

/// Builds a [`MultiLevelCache`].
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_memory::MemoryBackend;
/// use ncm_cache_multilevel::MultiLevelCache;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let l2 = MemoryBackend::new(); // usually a RedisCache's backend()
/// let cache = MultiLevelCache::builder(l2)
///     .l1_max_size(1000)
///     .l1_default_ttl(Duration::from_secs(300))
///     .l2_default_ttl(Duration::from_secs(3600))
///     .enable_promotion(true)
///     .enable_stampede_prevention(true)
///     .promotion_threshold(2)
///     .build()?;
/// cache.set("product:456", serde_json::json!({"name": "Laptop", "price": 999.99})).await?;
/// let product: Option<serde_json::Value> = cache.get("product:456").await?;
/// assert!(product.is_some());
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
#[must_use]
pub struct MultiLevelBuilder<C = Serializer> {
    pub(crate) l2: SharedBackend,
    pub(crate) codec: C,
    pub(crate) options: Options,
    #[cfg(feature = "redis")]
    pub(crate) backplane: Option<Arc<ncm_cache_redis::RedisBackend>>,
    #[cfg(feature = "redis")]
    pub(crate) lock: Option<Arc<ncm_cache_redis::RedisBackend>>,
    #[cfg(feature = "redis")]
    pub(crate) tracking: Option<Arc<ncm_cache_redis::RedisBackend>>,
    #[cfg(feature = "redis")]
    pub(crate) coherence: Option<crate::Coherence>,
    pub(crate) tags: Option<std::sync::Arc<dyn ncm_cache_core::TagIndex>>,
}

macro_rules! option {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.options.$name = value;
                self
            }
        )*
    };
}

impl MultiLevelBuilder<Serializer> {
    pub(crate) fn new(l2: SharedBackend) -> Self {
        Self::with_codec(l2, Serializer::default())
    }
}

impl<C: Codec> MultiLevelBuilder<C> {
    pub(crate) fn with_codec(l2: SharedBackend, codec: C) -> Self {
        Self {
            l2,
            codec,
            options: Options::default(),
            #[cfg(feature = "redis")]
            backplane: None,
            #[cfg(feature = "redis")]
            lock: None,
            #[cfg(feature = "redis")]
            tracking: None,
            #[cfg(feature = "redis")]
            coherence: None,
            tags: None,
        }
    }

    /// Uses another codec for L2 values (default: the JSON envelope `Serializer`).
    pub fn codec<D: Codec>(self, codec: D) -> MultiLevelBuilder<D> {
        MultiLevelBuilder {
            l2: self.l2,
            codec,
            options: self.options,
            #[cfg(feature = "redis")]
            backplane: self.backplane,
            #[cfg(feature = "redis")]
            lock: self.lock,
            #[cfg(feature = "redis")]
            tracking: self.tracking,
            #[cfg(feature = "redis")]
            coherence: self.coherence,
            tags: self.tags,
        }
    }

    option! {
        /// Maximum number of L1 entries (default 1000).
        l1_max_size: u64,
        /// Maximum bytes of L1 (encoded sizes; default 64 MiB).
        l1_max_bytes: u64,
        /// TTL of L1 entries (default 5 minutes).
        l1_default_ttl: Duration,
        /// Promote values read from L2 into L1 (default true).
        enable_promotion: bool,
        /// L2 hits of a key before it is promoted into L1 (default 1).
        promotion_threshold: u32,
        /// Single-flight loads per key (default true).
        enable_stampede_prevention: bool,
        /// Consecutive L2 failures that open the circuit (default 5).
        breaker_threshold: u32,
        /// How long an open circuit skips L2 (default 1 s, so service resumes within about a
        /// second of Redis coming back).
        breaker_cooldown: Duration,
    }

    /// The name used in stats, metrics and the backplane channel (default `multilevel`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.options.name = name.into();
        self
    }

    /// TTL of L2 entries (default 1 hour; `None`: no expiry; a zero is refused by
    /// [`build`](Self::build)).
    pub fn l2_default_ttl(mut self, ttl: impl Into<Option<Duration>>) -> Self {
        self.options.l2_default_ttl = ttl.into();
        self
    }

    /// Fail-safe: keep values up to `max_stale_age` past their TTL and serve them (marked
    /// [`ValueSource::Stale`](ncm_cache_core::ValueSource::Stale)) when L2 or the loader fails.
    /// A zero `max_stale_age` is refused by [`build`](Self::build) (it would serve nothing).
    pub fn fail_safe(mut self, max_stale_age: Duration) -> Self {
        self.options.max_stale_age = Some(max_stale_age);
        self
    }

    /// Loader timeouts: after `soft` a stale value (if any) is served and the load finishes in
    /// the background; after `hard` the load is abandoned with a timeout error. `None` turns
    /// each off; a zero is refused by [`build`](Self::build).
    pub fn loader_timeouts(mut self, soft: Option<Duration>, hard: Option<Duration>) -> Self {
        self.options.soft_timeout = soft;
        self.options.hard_timeout = hard;
        self
    }

    /// Eager refresh: a hit later than `fraction` (0.1–0.99) of the L1 TTL starts one background
    /// reload in `get_or_load`, so hot keys never expire under load.
    pub fn eager_refresh(mut self, fraction: f64) -> Self {
        self.options.eager_refresh = Some(crate::options::eager_fraction(fraction));
        self
    }

    /// Negative caching: `get_or_load_optional` caches "not found" for `ttl` (greater than
    /// zero: [`build`](Self::build) refuses a zero).
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.options.negative_ttl = Some(ttl);
        self
    }

    /// The clock of L1 (default: [`CoarseClock`], millisecond-level TTL precision; tests use a
    /// manual clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.options.clock = clock;
        self.options.coarse = None;
        self
    }

    /// Cross-instance coherence: publish every set / delete / clear on this Redis and evict
    /// what other instances publish (requires feature `redis`).
    #[cfg(feature = "redis")]
    pub fn backplane(mut self, redis: Arc<ncm_cache_redis::RedisBackend>) -> Self {
        self.backplane = Some(redis);
        self
    }

    /// Server-assisted coherence (feature `redis`): evict from L1 every key under `redis`'s
    /// prefix that Redis reports changed — by any client, by expiry, eviction or a flush —
    /// through RESP3 client tracking in broadcast mode on every primary. Alone (without
    /// [`backplane`](Self::backplane)) or beside it; see [`Coherence`](crate::Coherence).
    #[cfg(feature = "redis")]
    pub fn client_tracking(mut self, redis: Arc<ncm_cache_redis::RedisBackend>) -> Self {
        self.tracking = Some(redis);
        self
    }

    /// Which coherence mechanism to use with the Redis already given (by
    /// [`over_redis`](crate::MultiLevelCache::over_redis), [`backplane`](Self::backplane) or
    /// [`client_tracking`](Self::client_tracking)); see [`Coherence`](crate::Coherence).
    /// [`build`](Self::build) fails when no Redis was given.
    #[cfg(feature = "redis")]
    pub fn coherence(mut self, mode: crate::Coherence) -> Self {
        self.coherence = Some(mode);
        self
    }

    /// The backplane's and the tracking's Redis after [`coherence`](Self::coherence).
    #[cfg(feature = "redis")]
    #[allow(clippy::type_complexity)]
    pub(crate) fn coherence_links(
        &self,
    ) -> Result<(
        Option<Arc<ncm_cache_redis::RedisBackend>>,
        Option<Arc<ncm_cache_redis::RedisBackend>>,
    )> {
        let (bp, tr) = (self.backplane.clone(), self.tracking.clone());
        let Some(mode) = self.coherence else {
            return Ok((bp, tr));
        };
        let Some(any) = bp.clone().or_else(|| tr.clone()) else {
            return Err(ncm_cache_core::CacheError::Config(format!(
                "coherence({mode:?}) needs a Redis: start from MultiLevelCache::over_redis, or \
                 give one with backplane(..) or client_tracking(..)"
            )));
        };
        Ok(match mode {
            crate::Coherence::Backplane => (Some(bp.unwrap_or(any)), None),
            crate::Coherence::Tracking => (None, Some(tr.unwrap_or(any))),
            _ => (
                Some(bp.unwrap_or_else(|| Arc::clone(&any))),
                Some(tr.unwrap_or(any)),
            ),
        })
    }

    /// Cross-process stampede prevention: a Redis lock per key around the loader (feature
    /// `redis`). The lock expires `lock_ttl` after its holder stops renewing it (the holder
    /// renews it every `lock_ttl / 3` while its loader runs, so a loader may take longer);
    /// waiters poll L2 for up to `wait`, then load themselves — or, with fail-safe and a stale
    /// value, serve that. Make `wait` longer than `lock_ttl` (the defaults of
    /// [`MultiLevelCache::over_redis`]: 10 s and 15 s) so that waiters outlast a crashed holder.
    /// [`build`](Self::build) refuses a `lock_ttl` under 100 ms or a zero `wait`.
    #[cfg(feature = "redis")]
    pub fn distributed_lock(
        mut self,
        redis: Arc<ncm_cache_redis::RedisBackend>,
        lock_ttl: Duration,
        wait: Duration,
    ) -> Self {
        self.lock = Some(redis);
        self.options.lock_ttl = lock_ttl;
        self.options.lock_wait = wait;
        self
    }

    /// O(1) [`clear`](MultiLevelCache::clear) on a shared Redis: L2 keys are kept in the
    /// cache's current epoch (`@{token}:{key}` under the prefix), and `clear()` starts a new
    /// epoch with one write to `__ncm:epoch:{name}` instead of scanning the keyspace; the old
    /// epoch's keys expire by their L2 TTL. Caches of different names share a prefix without
    /// touching each other's entries. Other instances hear of a clear over their coherence
    /// link (backplane or client tracking) and otherwise re-read the epoch at least every
    /// second. Every instance of the cache must use it (the keys differ), and only this cache
    /// reads them (not a plain `RedisCache`, nor the Python library). [`build`](Self::build)
    /// refuses it without an `l2_default_ttl` (old epochs would never expire). Keep the epoch
    /// key from eviction (a `volatile-*` or `noeviction` policy): a lost epoch key reads as the
    /// first epoch. See docs/ARCHITECTURE.md, "O(1) clear".
    pub fn epoch_clear(mut self, on: bool) -> Self {
        self.options.epoch_clear = on;
        self
    }

    /// L1 hits as `tracing` spans too (`ncm_cache.get`, source `L1`, DEBUG level; default off):
    /// a hit takes tens of nanoseconds, and even asking `tracing` whether DEBUG is on costs it
    /// about 10 %. The other spans (L2, loads, the backplane) are always emitted.
    pub fn trace_l1_hits(mut self, on: bool) -> Self {
        self.options.trace_l1_hits = on;
        self
    }

    /// Where the tags a loader gives ([`Loaded::tags`](crate::Loaded::tags)) are recorded, so
    /// that invalidating a tag removes the entries — e.g. `CacheStrategies::tag_index()` of
    /// strategies over this cache's [`as_backend`](MultiLevelCache::as_backend). Can also be set
    /// after the build with [`MultiLevelCache::set_tag_index`] (strategies built over the
    /// cache exist only then).
    pub fn tag_index(mut self, index: std::sync::Arc<dyn ncm_cache_core::TagIndex>) -> Self {
        self.tags = Some(index);
        self
    }

    /// Builds the cache (spawns the backplane listener when configured; needs a tokio runtime
    /// then).
    pub fn build(self) -> Result<MultiLevelCache<C>> {
        MultiLevelCache::from_builder(self)
    }
}
