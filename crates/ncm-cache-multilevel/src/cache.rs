//! `MultiLevelCache`: the public API and the read/write paths.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::{
    CacheBackend, CacheError, CacheLevel, Codec, Result, SharedBackend, SingleFlight, ValueSource,
};
use ncm_cache_memory::{MemoryBackend, MemoryStore};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::breaker::CircuitBreaker;
use crate::builder::{MultiLevelBuilder, Options};
use crate::epoch::{Placed, Store};
use crate::l1::{Hits, L1Value, Validator};
use crate::options::{Eff, EntryOptions, LoadContext, Loaded};
use crate::stats::{Counters, MultiLevelStats};
use crate::tombstone::Tombstone;
use crate::versions::{CONTENDED_TTL, Settled, Ticket, Versions};
use ncm_cache_core::NO_DEADLINE;

/// A value a multi-level cache can hold: serializable for L2, shareable for L1.
pub trait CacheValue: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> CacheValue for T {}

pub(crate) type Object = Arc<dyn Any + Send + Sync>;
/// What a load produces: the value (`None`: not found) and where it came from.
pub(crate) type Found = (Option<Object>, ValueSource);

/// An L1 (in-process, decoded values) in front of any L2 backend (usually Redis).
///
/// - **L1 hits never decode**: L1 holds the decoded value behind an `Arc`; a hit is a
///   quick_cache lookup and an `Arc` clone ([`get_arc`](Self::get_arc)) or a clone of `T`
///   ([`get`](Self::get)).
/// - **Promotion**: values read from L2 enter L1 after `promotion_threshold` L2 hits.
/// - **Stampede prevention**: concurrent [`get_or_load`](Self::get_or_load) calls for one key
///   run the loader once (single-flight), and with a distributed lock once across processes.
/// - **Coherence** (feature `redis`): sets and deletes are published on a Redis backplane and
///   evicted from every other instance's L1; after a backplane reconnect, L1 is cleared.
/// - **Fail-safe**: with [`fail_safe`](MultiLevelBuilder::fail_safe), a stale value is served
///   (marked [`ValueSource::Stale`]) when L2 or the loader fails; a circuit breaker skips a failing
///   L2 for a cool-down.
///
/// See [`MultiLevelBuilder`] for an example.
pub struct MultiLevelCache<C = Serializer> {
    pub(crate) inner: Arc<Inner<C>>,
}

impl<C> Clone for MultiLevelCache<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for MultiLevelCache<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiLevelCache")
            .field("name", &self.inner.opts.name)
            .field("l1", &self.inner.l1)
            .field("l2", &self.inner.l2)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner<C> {
    /// This cache itself, for work that must outlive a cancelled caller (see
    /// [`withdraw_loads`](Self::withdraw_loads)).
    pub(crate) me: std::sync::Weak<Inner<C>>,
    pub(crate) l1: MemoryStore<L1Value>,
    /// L2 as the cache uses it (through its epoch with `epoch_clear`).
    pub(crate) l2: SharedBackend,
    /// L2 as it was given (to tell whether the backplane or lock share its Redis).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) l2_raw: SharedBackend,
    /// The epoch of L2 keys, with `epoch_clear`.
    pub(crate) epoch: Option<Arc<crate::epoch::EpochBackend>>,
    pub(crate) codec: C,
    pub(crate) opts: Options,
    /// The builder's entry options, for calls without their own.
    pub(crate) defaults: Eff,
    /// Where loaders' tags are recorded ([`Loaded::tags`]).
    pub(crate) tags: std::sync::OnceLock<Arc<dyn ncm_cache_core::TagIndex>>,
    pub(crate) promotions: MemoryStore<Hits>,
    /// Validators of L1 entries that have one (replaced or removed whenever L1 is filled).
    pub(crate) validators: MemoryStore<Validator>,
    /// Set once a validator was stored: until then fills skip the validator store (its `len`
    /// visits every shard).
    pub(crate) has_validators: AtomicBool,
    /// Set once a call with its own fail-safe (`EntryOptions::fail_safe`) filled L1 while the
    /// builder has none: a link outage then keeps L1 as stale-only instead of emptying it.
    pub(crate) per_call_fail_safe: AtomicBool,
    pub(crate) flight: SingleFlight<String, Found>,
    pub(crate) breaker: Arc<CircuitBreaker>,
    /// Per-key invalidation versions: an L2 read or load that started before an invalidation
    /// of its key must not put its (possibly old) value into L1.
    pub(crate) versions: Versions,
    /// The L1 generation: entries of older generations are stale-only.
    pub(crate) generation: AtomicU64,
    /// False while a coherence link (backplane, tracking) is down: nothing enters L1 and
    /// nothing in it is fresh.
    pub(crate) l1_enabled: AtomicBool,
    /// The coherence links not (yet) connected, one bit per [`Link`]; `l1_enabled` is set
    /// under this lock, so two links going up and down at once cannot leave L1 on.
    pub(crate) links_down: std::sync::Mutex<u8>,
    /// Background loads (with loader timeouts): one per key, whoever waits for it.
    pub(crate) loads: crate::load::Loads,
    pub(crate) counters: Counters,
    /// Loads' stores still checked against invalidations heard late (`recent.rs`).
    pub(crate) recent: crate::recent::RecentLoads,
    pub(crate) refreshing: crate::load::Refreshing,
    #[cfg(feature = "redis")]
    pub(crate) backplane: Option<crate::backplane::Backplane>,
    #[cfg(feature = "redis")]
    pub(crate) lock: Option<Arc<ncm_cache_redis::RedisBackend>>,
    #[cfg(feature = "redis")]
    pub(crate) tracking: Option<crate::tracking::Tracker>,
}

/// A source of invalidations L1 depends on.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum Link {
    Backplane = 1,
    Tracking = 2,
}

/// The L1 part of a read: `Ok(found)` ends it, `Err(stale)` goes on to L2.
type L1Outcome<T> = std::result::Result<Option<Arc<T>>, Option<StaleCopy<T>>>;

/// A stale L1 copy fail-safe may serve when L2 fails, and until when (clock nanos: checked
/// again after the failed read, which may have outlasted the max stale age).
pub(crate) type StaleCopy<T> = (Arc<T>, u64);

/// The boxed L2 part of a read.
type BoxedRead<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<Option<(Arc<T>, ValueSource)>>> + Send + 'a>>;

/// The result of looking in L1 (typed: one type check per hit).
pub(crate) enum L1Read<T> {
    Fresh(Option<Arc<T>>, bool),
    /// A value fail-safe may serve, until the deadline (clock nanos: its fresh end plus the
    /// call's max stale age).
    Stale(Option<Arc<T>>, u64),
    Miss,
}

impl MultiLevelCache<Serializer> {
    /// A builder with `l2` as the second level — any backend: a `MemoryBackend`, your own, or
    /// an already shared one (`RedisCache::backend()`, an `Arc<RedisBackend>`), which is used as
    /// it is, not wrapped again — and the default JSON-envelope codec. For Redis with the
    /// backplane and the lock, [`over_redis`](Self::over_redis) wires everything in one call.
    pub fn builder<B: CacheBackend>(l2: B) -> MultiLevelBuilder<Serializer> {
        MultiLevelBuilder::new(shared(l2))
    }

    /// The same as [`builder`](Self::builder), which accepts a [`SharedBackend`] too.
    #[deprecated(
        since = "0.1.0",
        note = "use `builder`: it takes a SharedBackend as well"
    )]
    pub fn builder_shared(l2: SharedBackend) -> MultiLevelBuilder<Serializer> {
        MultiLevelBuilder::new(l2)
    }

    /// The recommended setup in one call (feature `redis`): `redis` as L2, as the backplane
    /// (cross-instance L1 invalidation) and as the distributed stampede lock (TTL
    /// [`DEFAULT_LOCK_TTL`](crate::DEFAULT_LOCK_TTL), renewed while loading; waiters wait
    /// [`DEFAULT_LOCK_WAIT`](crate::DEFAULT_LOCK_WAIT)). Other options as on any builder.
    ///
    /// ```no_run
    /// # async fn demo() -> ncm_cache_core::Result<()> {
    /// use std::time::Duration;
    /// use ncm_cache_multilevel::MultiLevelCache;
    /// use ncm_cache_redis::RedisCache;
    ///
    /// let redis = RedisCache::builder().url("redis://127.0.0.1:6379")?.key_prefix("app:").build().await?;
    /// let cache = MultiLevelCache::over_redis(&redis)
    ///     .fail_safe(Duration::from_secs(600))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "redis")]
    pub fn over_redis(redis: &ncm_cache_redis::RedisCache) -> MultiLevelBuilder<Serializer> {
        let backend = Arc::clone(redis.redis_backend());
        MultiLevelBuilder::new(redis.backend())
            .backplane(Arc::clone(&backend))
            .distributed_lock(backend, crate::DEFAULT_LOCK_TTL, crate::DEFAULT_LOCK_WAIT)
    }
}

impl<C: Codec> MultiLevelCache<C> {
    pub(crate) fn from_builder(b: MultiLevelBuilder<C>) -> Result<Self> {
        #[cfg(feature = "redis")]
        let (backplane_redis, tracking_redis) = fall_back_without_tracking(b.coherence_links()?);
        // Pushes name the tracked Redis's keys, mapped back to L1's through its prefix: under
        // another prefix than L2's, no push would ever match an L1 key (found by review).
        #[cfg(feature = "redis")]
        if let Some(tr) = &tracking_redis
            && let (Some(tracked), Some(stored)) = (
                ncm_cache_core::CacheBackend::key_prefix(&**tr),
                b.l2.key_prefix(),
            )
            && tracked != stored
        {
            return Err(ncm_cache_core::CacheError::Config(format!(
                "client_tracking: its Redis has the key prefix {tracked:?} but L2's is \
                 {stored:?}, so no invalidation it hears would match an L1 key; give it the \
                 RedisBackend of L2's RedisCache (redis.redis_backend()), or build with \
                 MultiLevelCache::over_redis"
            )));
        }
        let o = b.options;
        o.validate()?;
        #[cfg(feature = "redis")]
        if b.lock.is_some() && (o.lock_ttl < Duration::from_millis(100) || o.lock_wait.is_zero()) {
            return Err(ncm_cache_core::CacheError::Config(format!(
                "distributed_lock: lock_ttl ({:?}) must be at least 100 ms (the holder renews it \
                 every lock_ttl / 3) and wait ({:?}) greater than zero; the defaults of \
                 over_redis are 10 s and 15 s",
                o.lock_ttl, o.lock_wait
            )));
        }
        let l1 = MemoryBackend::builder()
            .name(o.name.clone())
            .max_entries(o.l1_max_size)
            .max_bytes(o.l1_max_bytes)
            .shared_clock(Arc::clone(&o.clock))
            .build_store::<L1Value>("l1")?;
        let promotions = MemoryBackend::builder()
            .name(format!("{}-promotions", o.name))
            .max_entries(o.l1_max_size.saturating_mul(4).max(64))
            .max_bytes(o.l1_max_size.saturating_mul(4).max(64).saturating_mul(256))
            .shared_clock(Arc::clone(&o.clock))
            .build_store::<Hits>("promotion")?;
        let validators = MemoryBackend::builder()
            .name(format!("{}-validators", o.name))
            .max_entries(o.l1_max_size.max(64))
            .max_bytes(o.l1_max_size.max(64).saturating_mul(256))
            .shared_clock(Arc::clone(&o.clock))
            .build_store::<Validator>("validator")?;
        #[cfg(feature = "redis")]
        let links = u8::from(backplane_redis.is_some()) * Link::Backplane as u8
            + u8::from(tracking_redis.is_some()) * Link::Tracking as u8;
        let breaker = Arc::new(CircuitBreaker::new(o.breaker_threshold, o.breaker_cooldown));
        #[cfg(feature = "redis")]
        let backplane = backplane_redis.map(|redis| {
            // PUBLISH to L2's own Redis goes through L2's breaker (not to another server).
            let same = std::ptr::addr_eq(Arc::as_ptr(&b.l2), Arc::as_ptr(&redis));
            let gate = same.then(|| Arc::clone(&breaker));
            crate::backplane::Backplane::new(redis, &o.name, gate)
        });
        #[cfg(not(feature = "redis"))]
        let links = 0u8;
        if o.epoch_clear && o.l2_default_ttl.is_none() {
            return Err(CacheError::Config(
                "epoch_clear needs an l2_default_ttl: a clear leaves the old epoch's keys to \
                 expire, which keys without a TTL never do"
                    .into(),
            ));
        }
        let epoch = o.epoch_clear.then(|| {
            Arc::new(crate::epoch::EpochBackend::new(
                Arc::clone(&b.l2),
                &o.name,
                false,
            ))
        });
        let l2: SharedBackend = match &epoch {
            Some(e) => Arc::clone(e) as SharedBackend,
            None => Arc::clone(&b.l2),
        };
        let tags = std::sync::OnceLock::new();
        if let Some(index) = b.tags {
            let _ = tags.set(index);
        }
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            defaults: Eff::defaults(&o),
            tags,
            l1,
            l2,
            l2_raw: b.l2,
            epoch,
            codec: b.codec,
            breaker,
            opts: o,
            promotions,
            validators,
            has_validators: AtomicBool::new(false),
            per_call_fail_safe: AtomicBool::new(false),
            flight: SingleFlight::new(),
            versions: Versions::default(),
            generation: AtomicU64::new(0),
            loads: crate::load::Loads::default(),
            l1_enabled: AtomicBool::new(links == 0),
            links_down: std::sync::Mutex::new(links),
            counters: Counters::default(),
            recent: crate::recent::RecentLoads::default(),
            refreshing: crate::load::Refreshing::default(),
            #[cfg(feature = "redis")]
            backplane,
            #[cfg(feature = "redis")]
            lock: b.lock,
            #[cfg(feature = "redis")]
            tracking: tracking_redis.map(crate::tracking::Tracker::new),
        });
        if let Some(epoch) = &inner.epoch {
            let cache = Arc::downgrade(&inner);
            epoch.on_late_removal(Box::new(move |removal| {
                if let Some(inner) = cache.upgrade() {
                    inner.removed_late(removal);
                }
            }));
            // A new epoch: announced as a clear (instances still reading the previous one, if
            // the key was lost, or of a version that read an absent key as epoch `0`, move to
            // it at once instead of within their re-check interval), and this L1 emptied (no
            // version bump: on a first start it is empty, and the call creating the key stays
            // cacheable).
            let cache = Arc::downgrade(&inner);
            epoch.on_created(Box::new(move || {
                if let Some(inner) = cache.upgrade() {
                    inner.l1.clear();
                    inner.queue_clear();
                }
            }));
        }
        #[cfg(feature = "redis")]
        crate::backplane::start(&inner)?;
        #[cfg(feature = "redis")]
        crate::tracking::start(&inner)?;
        Ok(Self { inner })
    }

    /// The L2 backend.
    pub fn l2(&self) -> &SharedBackend {
        &self.inner.l2
    }

    /// The codec used for L2.
    pub fn codec(&self) -> &C {
        &self.inner.codec
    }

    /// Encodes a value to be stored under `key` with the cache's codec, as [`set`](Self::set)
    /// does (for writing L2 directly, e.g. bulk preloads): a signing codec binds it to the
    /// stored key.
    pub fn codec_bytes<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> std::result::Result<ncm_cache_core::Bytes, ncm_cache_core::CodecError> {
        self.inner.encode(key, value)
    }

    /// Number of entries in L1.
    pub fn l1_len(&self) -> usize {
        self.inner.l1.len()
    }

    /// Bytes charged in L1.
    pub fn l1_weight(&self) -> u64 {
        self.inner.l1.weight()
    }

    /// The coherence mechanism in use (feature `redis`): what was asked for, unless the server
    /// cannot do client tracking (then the backplane); `None` without any.
    #[cfg(feature = "redis")]
    pub fn coherence(&self) -> Option<crate::Coherence> {
        match (
            self.inner.backplane.is_some(),
            self.inner.tracking.is_some(),
        ) {
            (true, true) => Some(crate::Coherence::Both),
            (true, false) => Some(crate::Coherence::Backplane),
            (false, true) => Some(crate::Coherence::Tracking),
            (false, false) => None,
        }
    }

    /// `true` while L1 is in use (with a backplane: only while subscribed).
    pub fn l1_active(&self) -> bool {
        self.inner.l1_enabled.load(Ordering::Acquire)
    }

    /// Reads a value: L1, then L2 (promoting it into L1). Returns a clone of the cached value.
    pub async fn get<T: CacheValue + Clone>(&self, key: &str) -> Result<Option<T>> {
        let found = match self.read_l1::<T>(key)? {
            Ok(hit) => hit,
            Err(stale) => self
                .read_l2::<T>(key, stale, &self.inner.defaults)
                .await?
                .map(|(v, _)| v),
        };
        Ok(found.map(|v| T::clone(&v)))
    }

    /// Reads a value as a shared `Arc<T>` (an L1 hit allocates nothing).
    pub async fn get_arc<T: CacheValue>(&self, key: &str) -> Result<Option<Arc<T>>> {
        // Not a call to `get_with_source`: an L1 hit (the hot path) then runs one small future.
        match self.read_l1::<T>(key)? {
            Ok(hit) => Ok(hit),
            Err(stale) => Ok(self
                .read_l2::<T>(key, stale, &self.inner.defaults)
                .await?
                .map(|(v, _)| v)),
        }
    }

    /// Reads a value and tells where it came from (L1, L2, or Stale when L2 failed).
    pub async fn get_with_source<T: CacheValue>(
        &self,
        key: &str,
    ) -> Result<Option<(Arc<T>, ValueSource)>> {
        match self.read_l1::<T>(key)? {
            Ok(hit) => Ok(hit.map(|v| (v, ValueSource::L1))),
            Err(stale) => self.read_l2::<T>(key, stale, &self.inner.defaults).await,
        }
    }

    /// Reads a value with per-call [`EntryOptions`] (skip L1 or L2, sliding expiration,
    /// fail-safe): the value and where it came from.
    pub async fn get_with<T: CacheValue>(
        &self,
        key: &str,
        options: &EntryOptions,
    ) -> Result<Option<(Arc<T>, ValueSource)>> {
        let eff = options.resolve(&self.inner.defaults)?;
        match self.inner.l1_read::<T>(key, &eff)? {
            L1Read::Fresh(v, _) => {
                self.inner.counters.l1_hits.bump();
                self.inner.trace_l1_hit(key);
                Ok(v.map(|v| (v, ValueSource::L1)))
            }
            L1Read::Stale(stale, until) => {
                self.read_l2::<T>(key, stale.map(|v| (v, until)), &eff)
                    .await
            }
            L1Read::Miss => self.read_l2::<T>(key, None, &eff).await,
        }
    }

    /// The L1 part of a read: `Ok(found)` ends the read (a fresh value, or a cached "not
    /// found"); `Err(stale)` goes on to L2, with what fail-safe may serve if L2 fails.
    #[inline]
    fn read_l1<T: CacheValue>(&self, key: &str) -> Result<L1Outcome<T>> {
        let inner = &self.inner;
        Ok(match inner.l1_read::<T>(key, &inner.defaults)? {
            L1Read::Fresh(v, _) => {
                inner.counters.l1_hits.bump();
                inner.trace_l1_hit(key);
                Ok(v)
            }
            L1Read::Stale(v, until) => Err(v.map(|v| (v, until))),
            L1Read::Miss => Err(None),
        })
    }

    /// The L2 part of a read, boxed: it keeps the callers' futures small, so an L1 hit moves
    /// and initialises a few words instead of the whole L2 state machine.
    fn read_l2<'a, T: CacheValue>(
        &'a self,
        key: &'a str,
        stale: Option<StaleCopy<T>>,
        eff: &'a Eff,
    ) -> BoxedRead<'a, T> {
        let span = tracing::info_span!(
            "ncm_cache.get",
            cache = %self.inner.opts.name,
            key,
            l1 = if stale.is_some() { "stale" } else { "miss" },
            source = tracing::field::Empty
        );
        Box::pin(tracing::Instrument::instrument(
            self.get_from_l2::<T>(key, stale, eff),
            span,
        ))
    }

    async fn get_from_l2<T: CacheValue>(
        &self,
        key: &str,
        stale: Option<StaleCopy<T>>,
        eff: &Eff,
    ) -> Result<Option<(Arc<T>, ValueSource)>> {
        let inner = &self.inner;
        let ticket = inner.versions.ticket(key);
        let span = tracing::Span::current();
        match inner.l2_read::<T>(key, eff).await {
            Ok(Some((v, size))) => {
                span.record("source", "L2");
                Counters::bump(&inner.counters.l2_hits);
                inner.promote(key, Arc::clone(&v) as Object, size, &ticket, eff);
                Ok(Some((v, ValueSource::L2)))
            }
            Ok(None) => {
                span.record("source", "miss");
                Counters::bump(&inner.counters.misses);
                Ok(None)
            }
            Err(e) => match inner.servable(stale) {
                Some(v) => {
                    span.record("source", "Stale");
                    Counters::bump(&inner.counters.stale_served);
                    Ok(Some((v, ValueSource::Stale)))
                }
                None => {
                    span.record("source", "error");
                    Err(e)
                }
            },
        }
    }

    /// Returns the cached value or runs `loader` once (however many callers ask at the same
    /// time), caches its result in L2 and L1, and returns it — the original's
    /// `get(key, loader=...)`. Loader errors reach every waiting caller and are not cached.
    pub async fn get_or_load<T, F, Fut, E>(&self, key: &str, loader: F) -> Result<T>
    where
        T: CacheValue + Clone,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let (v, _) = self.get_or_load_with_source(key, loader).await?;
        Ok(T::clone(&v))
    }

    /// [`get_or_load`](Self::get_or_load), returning the shared value and its source.
    pub async fn get_or_load_with_source<T, F, Fut, E>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<(Arc<T>, ValueSource)>
    where
        T: CacheValue,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        // The L1 hit inline: no boxed future, no allocation.
        let inner = &self.inner;
        if let L1Read::Fresh(Some(v), false) = inner.l1_read::<T>(key, &inner.defaults)? {
            inner.counters.l1_hits.bump();
            inner.trace_l1_hit(key);
            return Ok((v, ValueSource::L1));
        }
        let load = move |_: LoadContext<T>| async move { loader().await.map(Loaded::value) };
        match Arc::clone(inner)
            .get_or_load_erased::<T, _, _, E>(key, inner.defaults, load)
            .await?
        {
            (Some(v), source) => Ok((downcast::<T>(v)?, source)),
            (None, _) => Err(CacheError::InvalidArgument(
                "loader returned no value".into(),
            )),
        }
    }

    /// Like [`get_or_load`](Self::get_or_load) for loaders that may find nothing: with
    /// [`negative_ttl`](MultiLevelBuilder::negative_ttl), a `None` is cached in L1 (distinct
    /// from a miss) so repeated lookups of a missing key do not reach the source.
    pub async fn get_or_load_optional<T, F, Fut, E>(
        &self,
        key: &str,
        loader: F,
    ) -> Result<Option<Arc<T>>>
    where
        T: CacheValue,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<T>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let inner = &self.inner;
        if let L1Read::Fresh(v, false) = inner.l1_read::<T>(key, &inner.defaults)? {
            inner.counters.l1_hits.bump();
            inner.trace_l1_hit(key);
            return Ok(v);
        }
        let load = move |_: LoadContext<T>| async move { loader().await.map(Loaded::from) };
        match Arc::clone(inner)
            .get_or_load_erased::<T, _, _, E>(key, inner.defaults, load)
            .await?
        {
            (Some(v), _) => Ok(Some(downcast::<T>(v)?)),
            (None, _) => Ok(None),
        }
    }

    /// The general load: per-call [`EntryOptions`], and a loader that is given a
    /// [`LoadContext`] (the key; on a refresh the stale value and its validator) and answers
    /// a [`Loaded`] — a value, "not found" or "not modified", with its own TTL, tags, or "do
    /// not cache" (adaptive caching). `None`: not found.
    ///
    /// ```
    /// use std::time::Duration;
    /// use ncm_cache_memory::MemoryBackend;
    /// use ncm_cache_multilevel::{EntryOptions, Loaded, MultiLevelCache};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let cache = MultiLevelCache::builder(MemoryBackend::new()).build()?;
    /// let options = EntryOptions::new().ttl(Duration::from_secs(60));
    /// // An error page is served to this caller but cached nowhere.
    /// let page = cache
    ///     .get_or_load_with::<String, _, _, std::io::Error>("page:/missing", &options, |ctx| async move {
    ///         Ok(Loaded::value(format!("404 {}", ctx.key())).do_not_cache())
    ///     })
    ///     .await?;
    /// assert_eq!(page.map(|(v, _)| v.to_string()).as_deref(), Some("404 page:/missing"));
    /// assert!(cache.l2().get("page:/missing").await?.is_none());
    /// # Ok::<(), ncm_cache_core::CacheError>(())
    /// # }).unwrap();
    /// ```
    pub async fn get_or_load_with<T, F, Fut, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        loader: F,
    ) -> Result<Option<(Arc<T>, ValueSource)>>
    where
        T: CacheValue,
        F: FnOnce(LoadContext<T>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<T>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let eff = options.resolve(&self.inner.defaults)?;
        match Arc::clone(&self.inner)
            .get_or_load_erased::<T, _, _, E>(key, eff, loader)
            .await?
        {
            (Some(v), source) => Ok(Some((downcast::<T>(v)?, source))),
            (None, _) => Ok(None),
        }
    }

    /// Writes a value to L2 (with the L2 TTL) and L1, and tells other instances to drop
    /// their copy.
    pub async fn set<T: CacheValue>(&self, key: &str, value: T) -> Result<()> {
        let bytes = self.inner.encode(key, &value)?;
        self.inner
            .write_encoded(key, Arc::new(value), bytes, &self.inner.defaults)
            .await
    }

    /// Writes a value with per-call [`EntryOptions`] (TTLs, skip L1 / L2 / backplane, no
    /// compression, L1 size).
    pub async fn set_with<T: CacheValue>(
        &self,
        key: &str,
        value: T,
        options: &EntryOptions,
    ) -> Result<()> {
        let eff = options.resolve(&self.inner.defaults)?;
        let bytes = self.inner.encode_with(key, &value, &eff)?;
        self.inner
            .write_encoded(key, Arc::new(value), bytes, &eff)
            .await
    }

    /// Writes a value with an explicit L2 TTL.
    pub async fn set_with_ttl<T: CacheValue>(
        &self,
        key: &str,
        value: T,
        ttl: Duration,
    ) -> Result<()> {
        let eff = EntryOptions::new().ttl(ttl).resolve(&self.inner.defaults)?;
        let bytes = self.inner.encode(key, &value)?;
        self.inner
            .write_encoded(key, Arc::new(value), bytes, &eff)
            .await
    }

    /// Writes a value to one level only (the original's `set(key, value, level=...)`).
    pub async fn set_at<T: CacheValue>(
        &self,
        key: &str,
        value: T,
        level: CacheLevel,
    ) -> Result<()> {
        let inner = &self.inner;
        match level {
            CacheLevel::L1 => {
                let size = inner.encode(key, &value)?.len();
                inner.invalidate_l1(key)?;
                let ticket = inner.versions.ticket(key);
                let fill = Fill::value(Arc::new(value) as Object, size, None);
                inner.l1_fill(key, fill, &ticket, &inner.defaults);
                inner.publish_local(key).await;
            }
            CacheLevel::L2 => {
                let bytes = inner.encode(key, &value)?;
                inner.invalidate_l1(key)?;
                // A local write (fills that began before it cannot land after it), announced
                // also when this call is cancelled during the L2 write.
                let ticket = inner.versions.write_begin(key);
                let began = inner.opts.now_nanos();
                let mut guard = Unannounced::new(inner, key, Some(ticket));
                let written = inner.l2_write(key, bytes, inner.opts.l2_default_ttl).await;
                guard.disarm();
                let _ = inner.versions.write_end(&ticket);
                // An eager refresh's store that landed over it (see `write_encoded`).
                let overwritten = inner.start_withdrawals(
                    inner
                        .recent
                        .overwritten(key, inner.opts.now_nanos(), began)
                        .into_iter()
                        .map(|digest| (key.to_owned(), digest, true))
                        .collect(),
                );
                inner.invalidate_l1(key)?;
                inner.publish_set(key).await;
                Inner::<C>::finish_withdrawals(overwritten).await;
                written?;
            }
        }
        Ok(())
    }

    /// Removes a key from both levels (and from other instances' L1).
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.inner
            .delete_everywhere(key, &self.inner.defaults)
            .await
    }

    /// Removes a key with per-call [`EntryOptions`]: `skip_l2_write` removes the local copy
    /// only, `skip_backplane` leaves other instances' copies to their TTL.
    pub async fn delete_with(&self, key: &str, options: &EntryOptions) -> Result<bool> {
        let eff = options.resolve(&self.inner.defaults)?;
        self.inner.delete_everywhere(key, &eff).await
    }

    /// Reads several keys: L1 first, the rest in one L2 batch. Results in key order. When L2
    /// fails, fail-safe serves the stale L1 copies if every key L2 was asked for has one, else
    /// the call fails.
    pub async fn get_many<T: CacheValue + Clone>(&self, keys: &[&str]) -> Result<Vec<Option<T>>> {
        match self.get_many_read(keys).await? {
            Ok((out, _, _)) => Ok(out),
            Err((out, failed)) => failed.serve(&self.inner, out),
        }
    }

    /// [`get_many`](Self::get_many), and for each key whether L2 was read for it and held
    /// nothing (not: an L1 answer, or an L2 entry this instance could not decode); empty
    /// when L2 was not read at all.
    ///
    /// `Ok(Err(..))`: the L2 batch failed; what L1 answered and the stale copies fail-safe may
    /// serve ([`FailedRead`]).
    async fn get_many_read<T: CacheValue + Clone>(&self, keys: &[&str]) -> Result<ManyRead<T>> {
        let inner = &self.inner;
        let mut out: Vec<Option<T>> = Vec::with_capacity(keys.len());
        let mut missing: Vec<(usize, &str)> = Vec::new();
        let mut copies: Vec<(usize, Option<StaleCopy<T>>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match inner.l1_read::<T>(key, &inner.defaults)? {
                L1Read::Fresh(Some(v), _) => {
                    inner.counters.l1_hits.bump();
                    out.push(Some(T::clone(&v)));
                }
                L1Read::Fresh(None, _) => {
                    inner.counters.l1_hits.bump();
                    out.push(None);
                }
                L1Read::Stale(copy, until) => {
                    out.push(None);
                    missing.push((i, key));
                    copies.push((i, copy.map(|v| (v, until))));
                }
                L1Read::Miss => {
                    out.push(None);
                    missing.push((i, key));
                    copies.push((i, None));
                }
            }
        }
        if missing.is_empty() {
            // Nothing read from L2: no key is known absent (no allocation for it).
            return Ok(Ok((out, Vec::new(), Vec::new())));
        }
        let mut absent = vec![false; keys.len()];
        let tickets: Vec<Ticket> = missing
            .iter()
            .map(|(_, k)| inner.versions.ticket(k))
            .collect();
        let miss_keys: Vec<&str> = missing.iter().map(|(_, k)| *k).collect();
        let raw = match inner
            .l2_call("get_many", inner.l2.get_many(&miss_keys))
            .await
        {
            Ok(raw) => raw,
            Err(error) => return Ok(Err((out, FailedRead { copies, error }))),
        };
        // The copies of the keys L2 does not answer either (absent, unreadable).
        let mut left = Vec::new();
        for ((((i, key), bytes), ticket), (_, copy)) in
            missing.into_iter().zip(raw).zip(&tickets).zip(copies)
        {
            let Some(bytes) = bytes else {
                if let Some(a) = absent.get_mut(i) {
                    *a = true;
                }
                Counters::bump(&inner.counters.misses);
                left.push((i, copy));
                continue;
            };
            match inner.decode::<T>(key, &bytes) {
                Ok(v) => {
                    Counters::bump(&inner.counters.l2_hits);
                    let v = Arc::new(v);
                    inner.promote(
                        key,
                        Arc::clone(&v) as Object,
                        bytes.len(),
                        ticket,
                        &inner.defaults,
                    );
                    out[i] = Some(T::clone(&v));
                }
                Err(e) => {
                    inner.repair(key, &e).await;
                    Counters::bump(&inner.counters.misses);
                    left.push((i, copy));
                }
            }
        }
        Ok(Ok((out, absent, left)))
    }

    /// Batch get-or-load: reads every key, then calls `loader` once with only the missing
    /// keys and caches what it returns. Results in key order (`None`: the loader had nothing).
    pub async fn get_many_or_load<T, F, Fut, E>(
        &self,
        keys: &[&str],
        loader: F,
    ) -> Result<Vec<Option<T>>>
    where
        T: CacheValue + Clone,
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = std::result::Result<HashMap<String, T>, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // L2 failed: load every key not fresh in L1 (replacing: nothing is known absent).
        // Either way the stale copies of the keys left are kept: fail-safe serves them if the
        // loader fails too (also when L2 answered, holding nothing: its copy expired — review,
        // helper-74).
        let (mut out, absent, copies) = match self.get_many_read::<T>(keys).await? {
            Ok((out, absent, copies)) => (out, absent, copies),
            Err((out, failed)) => (out, Vec::new(), failed.copies),
        };
        // Keys L2 was read for and did not hold: their loads are stored only while still
        // absent. The others (an L2 entry this build cannot read, a negative L1 answer) are
        // replaced.
        let absent: std::collections::HashSet<&str> = keys
            .iter()
            .zip(&absent)
            .filter(|(_, a)| **a)
            .map(|(k, _)| *k)
            .collect();
        // Each missing key once, in order (a key may be asked for twice).
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<String> = keys
            .iter()
            .zip(&out)
            .filter(|(k, v)| v.is_none() && seen.insert(**k))
            .map(|(k, _)| (*k).to_owned())
            .collect();
        if missing.is_empty() {
            return Ok(out);
        }
        Counters::bump(&self.inner.counters.loads);
        let tickets: HashMap<String, Ticket> = missing
            .iter()
            .map(|k| (k.clone(), self.inner.versions.ticket(k)))
            .collect();
        let epoch_since = self.inner.epoch_changes();
        let mut loaded = match loader(missing).await {
            Ok(loaded) => loaded,
            Err(e) => {
                Counters::bump(&self.inner.counters.load_errors);
                let error = CacheError::loader(e);
                // Served only if every key left has a copy: a key L1 answered with a cached
                // "not found" (negative caching) went to the loader with no copy of its own,
                // and the loader's error is then the call's (review, helper-77).
                let covered = out
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_none())
                    .all(|(i, _)| copies.iter().any(|(j, _)| *j == i));
                if !covered {
                    return Err(error);
                }
                return FailedRead { copies, error }.serve(&self.inner, out);
            }
        };
        let mut encoded: Vec<(String, ncm_cache_core::Bytes)> = Vec::new();
        // The first position of each loaded key: a repeat gets a copy of its value, and the
        // key is written (and its version settled) once.
        let mut first: HashMap<&str, usize> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Some(&j) = first.get(key) {
                out[i] = out[j].clone();
                continue;
            }
            first.insert(key, i);
            if let Some(v) = loaded.remove(*key) {
                let bytes = self.inner.encode(key, &v)?;
                encoded.push(((*key).to_owned(), bytes));
                out[i] = Some(v);
            }
        }
        // Remembered for deletes heard late (`recent.rs`), before the version checks.
        let mut recent: HashMap<String, Tracked<'_, C>> = encoded
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    // A store that replaces (the key was not found absent) can land over a
                    // newer write, as an eager refresh can: remembered as replacing.
                    Tracked::begin(
                        &self.inner,
                        k,
                        v,
                        &self.inner.defaults,
                        !absent.contains(k.as_str()),
                    ),
                )
            })
            .collect();
        // Keys invalidated while the loader ran are served, not cached: a newer write must not
        // be overwritten in L2 by what the loader read before it.
        encoded.retain(|(k, _)| {
            let keep = tickets
                .get(k)
                .is_some_and(|t| self.inner.versions.current(t));
            if !keep && let Some(t) = recent.remove(k) {
                t.abandon();
            }
            keep
        });
        let batch: Vec<(&str, ncm_cache_core::Bytes)> = encoded
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        if !batch.is_empty() {
            let ttl = self.inner.opts.l2_default_ttl;
            // As writers: only keys nothing invalidated since the load began go into L1, all
            // checked before any write begins (a write's begin bumps its stripe: checked one by
            // one, a key sharing a stripe with an earlier key of the batch looked overtaken by
            // the batch itself, and never reached L1).
            let current: Vec<&str> = encoded
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| {
                    tickets
                        .get(*k)
                        .is_some_and(|t| self.inner.versions.current(t))
                })
                .collect();
            let writes: HashMap<&str, Ticket> = current
                .into_iter()
                .map(|k| (k, self.inner.versions.write_begin(k)))
                .collect();
            // Cancelled during the batch write: every key is ended and announced.
            let mut guard = Unannounced::many(
                &self.inner,
                encoded
                    .iter()
                    .map(|(k, _)| (k.as_str(), writes.get(k.as_str()).copied()))
                    .collect(),
            );
            // A key L2 did not hold only while still absent: a write of it since, by any
            // instance, is at least as new as what the loader read. Every command runs to its
            // end (none dropped half-way when another fails).
            // The others replace, and, as every load's store, are never made again in a new
            // epoch (`place`): the loader may have read its source before a clear not heard of
            // here.
            let each = batch.iter().map(|(k, v)| {
                let (inner, v) = (&self.inner, v.clone());
                let how = if absent.contains(k) {
                    Store::IfAbsent
                } else {
                    Store::Replace
                };
                async move { Ok(inner.place(k, v, ttl, how, epoch_since).await? == Placed::Stored) }
            });
            let written = self
                .inner
                .l2_call("set", async {
                    futures_util::future::join_all(each)
                        .await
                        .into_iter()
                        .collect::<Result<Vec<bool>>>()
                })
                .await;
            guard.disarm();
            let written = written.map(|stored| {
                batch
                    .iter()
                    .zip(stored)
                    .filter(|(_, stored)| !stored)
                    .map(|((k, _), _)| *k)
                    .collect::<std::collections::HashSet<&str>>()
            });
            // Ended now, withdrawn (if a delete overtook them) once the batch is settled.
            let mut withdraw = Vec::new();
            for (k, t) in recent.drain() {
                match &written {
                    Ok(refused) if refused.contains(k.as_str()) => t.abandon(),
                    Ok(_) | Err(_) => withdraw.extend(t.end()),
                }
            }
            let withdraw = self.inner.start_withdrawals(withdraw);
            if let Err(e) = written {
                // Some keys may have reached L2: evicted everywhere else; here the loaded
                // values are kept as stale-only for fail-safe (as `get_or_load` keeps a value
                // whose store failed), unless overtaken.
                for (k, bytes) in &encoded {
                    let ended = writes
                        .get(k.as_str())
                        .map(|t| self.inner.versions.write_end(t));
                    let value = first.get(k.as_str()).and_then(|&i| out[i].clone());
                    let kept = match (ended, value) {
                        (Some(Settled::Clean(mine)), Some(v)) => self.inner.l1_keep_stale_only(
                            k,
                            Fill::value(Arc::new(v) as Object, bytes.len(), ttl),
                            &mine,
                            &self.inner.defaults,
                        ),
                        _ => false,
                    };
                    if !kept {
                        let _ = self.inner.invalidate_l1(k);
                    }
                }
                self.inner
                    .publish_deletes(encoded.iter().map(|(k, _)| k.as_str()))
                    .await;
                Inner::<C>::finish_withdrawals(withdraw).await;
                // The loaded values are still good: served, not cached (as `get_or_load`
                // serves a load whose store failed).
                tracing::warn!(error = %e, "batch of loaded values not written to L2");
                return Ok(out);
            }
            let refused = written.unwrap_or_default();
            for (i, key) in keys.iter().enumerate() {
                let Some(write) = writes.get(key) else {
                    continue;
                };
                if first.get(key) != Some(&i) {
                    continue;
                }
                if refused.contains(key) {
                    // Not written: whatever L1 holds now came after the miss.
                    let _ = self.inner.versions.write_end(write);
                    Counters::bump(&self.inner.counters.loads_not_cached);
                    continue;
                }
                let (Some(v), Some((_, bytes))) = (&out[i], encoded.iter().find(|(k, _)| k == key))
                else {
                    continue;
                };
                let fill = Fill::value(Arc::new(v.clone()) as Object, bytes.len(), ttl);
                self.inner
                    .settle_load(key, fill, write, &self.inner.defaults);
            }
            // One message for the batch (the keys written).
            self.inner
                .publish_loads(
                    encoded
                        .iter()
                        .map(|(k, _)| k.as_str())
                        .filter(|k| !refused.contains(k)),
                )
                .await;
            Inner::<C>::finish_withdrawals(withdraw).await;
        }
        Ok(out)
    }

    /// Empties L1, every key of L2 (within its prefix), and other instances' L1.
    ///
    /// # Errors
    ///
    /// [`CacheError::Config`] when L2 is a shared store (Redis) without a key prefix: clearing
    /// it would remove every key of the database, other applications' and lock keys included.
    pub async fn clear(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.epoch.is_none() && inner.l2.key_prefix() == Some("") {
            return Err(CacheError::Config(
                "clear() refused: L2 has no key prefix, so it would delete every key of the Redis database (other applications' keys and locks too); set RedisConfig::key_prefix (e.g. \"myapp:\") to give the cache its own namespace".into(),
            ));
        }
        inner.invalidate_l1_all();
        // Cancelled during the L2 call (which may have run): still emptied and announced.
        // (With epochs, the new token's write is what tracking instances hear.)
        let tombstone = inner.epoch.is_none();
        let cancelled = OnCancel::new(|| {
            inner.invalidate_l1_all();
            inner.queue_clear();
            if tombstone {
                inner.queue_tombstone(Tombstone::All);
            }
        });
        let r = inner.l2_call("clear", inner.l2.clear_pattern("*")).await;
        inner.invalidate_l1_all();
        // Announced (and the trackers told, also after an error: the clear may have run)
        // before the loads are rechecked, still guarded: a caller cancelled during either
        // still has it announced (review, helper-74, helper-75).
        inner.publish_clear().await;
        let told = if tombstone {
            inner.tell_trackers(Tombstone::All).await
        } else {
            Ok(())
        };
        cancelled.disarm();
        inner.recheck_loads_after_clear().await;
        r?;
        told
    }

    /// Sets the [`tag_index`](MultiLevelBuilder::tag_index) after the build (once).
    ///
    /// # Errors
    ///
    /// [`CacheError::Config`] when the cache already has one.
    pub fn set_tag_index(&self, index: Arc<dyn ncm_cache_core::TagIndex>) -> Result<()> {
        self.inner.tags.set(index).map_err(|_| {
            CacheError::Config("set_tag_index: this cache already has a tag index".into())
        })
    }

    /// Empties this instance's L1 only.
    pub fn clear_l1(&self) {
        self.inner.invalidate_l1_all();
    }

    /// Statistics per level and of the multi-level logic.
    pub fn get_stats(&self) -> MultiLevelStats {
        #[cfg(feature = "redis")]
        let backplane_errors = self
            .inner
            .backplane
            .as_ref()
            .map_or(0, |bp| bp.batch.errors.load(Ordering::Relaxed));
        #[cfg(not(feature = "redis"))]
        let backplane_errors = 0;
        self.inner.counters.snapshot(
            self.inner.l1.get_stats(),
            self.inner.l2.get_stats(),
            self.inner.breaker.trips(),
            backplane_errors,
        )
    }

    /// `true` when the L2 circuit breaker is open (L2 is being skipped).
    pub fn l2_circuit_open(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// Stops the backplane and closes L1 (L2 is left to its owner).
    pub async fn close(&self) -> Result<()> {
        #[cfg(feature = "redis")]
        if let Some(bp) = &self.inner.backplane {
            bp.stop();
        }
        #[cfg(feature = "redis")]
        if let Some(t) = &self.inner.tracking {
            t.stop();
        }
        self.inner.l1.close();
        Ok(())
    }
}

/// Client tracking where the server refused it for certain (probed at connect: `CLIENT
/// TRACKING` unknown, renamed or forbidden, no RESP3) falls back to the backplane on the same
/// Redis, with the reason logged: other instances' writes are still heard, other programs'
/// writes are not. A probe that merely failed (a timeout, a network error) changes nothing:
/// the tracking listener retries, and L1 stays off until it is up — never a silent switch of
/// mode, which would leave this instance deaf to tracking instances (they do not publish).
#[cfg(feature = "redis")]
#[allow(clippy::type_complexity)]
fn fall_back_without_tracking(
    (backplane, tracking): (
        Option<Arc<ncm_cache_redis::RedisBackend>>,
        Option<Arc<ncm_cache_redis::RedisBackend>>,
    ),
) -> (
    Option<Arc<ncm_cache_redis::RedisBackend>>,
    Option<Arc<ncm_cache_redis::RedisBackend>>,
) {
    match tracking {
        Some(t) if t.capabilities().tracking_refused => {
            tracing::warn!(
                capabilities = %t.capabilities(),
                "client tracking is not available on this server: using the pub/sub backplane \
                 instead (writes by other programs are not seen by L1)"
            );
            (backplane.or(Some(t)), None)
        }
        other => (backplane, other),
    }
}

/// `l2` as a shared backend: an `Arc` it already is (so the backplane can tell that L2 is its
/// own Redis), else a new one.
fn shared<B: CacheBackend>(l2: B) -> SharedBackend {
    let any: &dyn Any = &l2;
    if let Some(shared) = any.downcast_ref::<SharedBackend>() {
        return Arc::clone(shared);
    }
    #[cfg(feature = "redis")]
    if let Some(redis) = any.downcast_ref::<Arc<ncm_cache_redis::RedisBackend>>() {
        return Arc::clone(redis) as SharedBackend;
    }
    Arc::new(l2)
}

/// The address of a value's allocation: identifies it while someone holds it.
pub(crate) fn address(value: &Object) -> usize {
    Arc::as_ptr(value).cast::<()>() as usize
}

pub(crate) fn downcast<T: Send + Sync + 'static>(v: Object) -> Result<Arc<T>> {
    v.downcast::<T>().map_err(|_| {
        CacheError::InvalidArgument(format!(
            "the cached value is not a {} (one key, two types?)",
            std::any::type_name::<T>()
        ))
    })
}

impl<C: Codec> Inner<C> {
    /// Looks in L1 with a call's options: a miss with `skip_l1_read`, else the plain lookup
    /// (the hot path, as lean as before per-call options existed).
    #[inline]
    pub(crate) fn l1_read<T: CacheValue>(&self, key: &str, eff: &Eff) -> Result<L1Read<T>> {
        if !eff.read_l1() {
            return Ok(L1Read::Miss);
        }
        self.l1_lookup(key, eff)
    }

    #[inline]
    fn l1_lookup<T: CacheValue>(&self, key: &str, eff: &Eff) -> Result<L1Read<T>> {
        // One clock reading for the store's expiry and the freshness checks below.
        let now = self.opts.now_nanos();
        // Only a miss validates the key: a key that fails validation is never stored in L1.
        let Some(v) = self.l1.peek_unvalidated_at(key, now)? else {
            self.l1.validate(key)?;
            return Ok(L1Read::Miss);
        };
        let (fresh_until, refresh_at) = (v.fresh_until, v.refresh_at);
        let current = v.generation == self.generation.load(Ordering::Acquire) as u32;
        let object = match v.object {
            None => None,
            // One type check: another type under this key is read from L2 with the requested type.
            Some(o) => match o.downcast::<T>() {
                Ok(typed) => Some(typed),
                Err(_) => return Ok(L1Read::Miss),
            },
        };
        if !current {
            return Ok(self.stale(object, now, fresh_until, eff));
        }
        if now < fresh_until {
            let refresh = now >= refresh_at;
            Ok(L1Read::Fresh(object, refresh))
        } else {
            Ok(self.stale(object, now, fresh_until, eff))
        }
    }

    /// An L1 hit as a span (`ncm_cache.get`, source `L1`, DEBUG level) when
    /// [`trace_l1_hits`](MultiLevelBuilder::trace_l1_hits) is on. Off, it is one test of a
    /// flag: even `tracing::enabled!` costs an L1 hit about 10 % (measured, docs/BENCHMARKS.md).
    #[inline]
    pub(crate) fn trace_l1_hit(&self, key: &str) {
        if self.opts.trace_l1_hits && tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!("ncm_cache.get", cache = %self.opts.name, key, source = "L1")
                .in_scope(|| {});
        }
    }

    /// After a failed L2 read, the stale copy fail-safe may serve: still within its max stale
    /// age now (the read may have taken its whole timeout).
    pub(crate) fn servable<T>(&self, stale: Option<StaleCopy<T>>) -> Option<Arc<T>> {
        stale
            .filter(|(_, until)| self.opts.now_nanos() <= *until)
            .map(|(v, _)| v)
    }

    /// A value L1 may not serve as fresh: served by fail-safe when the call has it and the
    /// value is not older than the call's max stale age.
    fn stale<T>(&self, object: Option<Arc<T>>, now: u64, fresh_until: u64, eff: &Eff) -> L1Read<T> {
        match eff.max_stale_age {
            Some(age) => {
                let until = fresh_until.saturating_add(ncm_cache_core::duration_nanos(age));
                if now <= until {
                    L1Read::Stale(object, until)
                } else {
                    L1Read::Miss
                }
            }
            None => L1Read::Miss,
        }
    }

    /// Runs an L2 call through the circuit breaker.
    ///
    /// Traced as a span `ncm_cache.l2` (INFO) with the operation and its result.
    pub(crate) async fn l2_call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let span = tracing::info_span!(
            "ncm_cache.l2",
            cache = %self.opts.name,
            op,
            result = tracing::field::Empty
        );
        let Some(permit) = self.breaker.allow() else {
            Counters::bump(&self.counters.l2_errors);
            span.record("result", "circuit_open");
            return Err(CacheError::CircuitOpen("l2"));
        };
        // A cancelled call drops the permit unreported: a probe then counts as failed.
        match tracing::Instrument::instrument(call, span.clone()).await {
            Ok(v) => {
                span.record("result", "ok");
                permit.success();
                Ok(v)
            }
            Err(e) => {
                span.record("result", "error");
                Counters::bump(&self.counters.l2_errors);
                if e.is_unavailable() {
                    permit.failure();
                } else {
                    // L2 answered (with an error): it is reachable.
                    permit.success();
                }
                Err(e)
            }
        }
    }

    /// Reads and decodes from L2: the value and its encoded size.
    pub(crate) async fn l2_read<T: CacheValue>(
        &self,
        key: &str,
        eff: &Eff,
    ) -> Result<Option<(Arc<T>, usize)>> {
        Ok(match self.l2_lookup::<T>(key, eff).await? {
            L2Read::Found(v, size) => Some((v, size)),
            _ => None,
        })
    }

    /// [`l2_read`](Self::l2_read), telling a key L2 does not hold from one it did not read
    /// (`skip_l2_read`) or could not decode (repaired as `l2_read` does).
    pub(crate) async fn l2_lookup<T: CacheValue>(&self, key: &str, eff: &Eff) -> Result<L2Read<T>> {
        if !eff.read_l2() {
            return Ok(L2Read::Unknown);
        }
        let Some(bytes) = self.l2_get(key, eff).await? else {
            return Ok(L2Read::Absent);
        };
        match self.decode::<T>(key, &bytes) {
            Ok(v) => Ok(L2Read::Found(Arc::new(v), bytes.len())),
            Err(e) => {
                self.repair(key, &e).await;
                Ok(L2Read::Unknown)
            }
        }
    }

    /// The L2 read of one call: none with `skip_l2_read`; with sliding expiration, a read that
    /// re-arms the TTL in the same round trip (`GETEX`).
    pub(crate) async fn l2_get(
        &self,
        key: &str,
        eff: &Eff,
    ) -> Result<Option<ncm_cache_core::Bytes>> {
        if !eff.read_l2() {
            return Ok(None);
        }
        match eff.sliding {
            Some(idle) if eff.write_l2() => {
                self.l2_call("getex", self.l2.get_and_touch(key, idle))
                    .await
            }
            _ => self.l2_call("get", self.l2.get(key)).await,
        }
    }

    /// An L2 value of `key` did not decode: counted; removed when damaged or forged, left
    /// when another build or configuration may read it (see `CodecErrorKind::is_damaged`).
    pub(crate) async fn repair(&self, key: &str, e: &ncm_cache_core::CodecError) {
        self.l2.record_decode_error(key);
        if !e.kind().is_damaged() {
            tracing::debug!(key, error = %e, "unreadable L2 entry left in place");
            return;
        }
        tracing::warn!(key, error = %e, "undecodable L2 entry removed");
        let _ = self.l2_call("delete", self.l2.delete(key)).await;
    }

    /// Encodes a value stored under `key` (bound to the L2 key, prefix included, by a signing
    /// codec).
    pub(crate) fn encode<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> std::result::Result<ncm_cache_core::Bytes, ncm_cache_core::CodecError> {
        self.codec
            .encode_for(&[self.l2.key_prefix().unwrap_or(""), key], value)
    }

    /// Encodes with a call's options (`no_compression`).
    pub(crate) fn encode_with<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        eff: &Eff,
    ) -> std::result::Result<ncm_cache_core::Bytes, ncm_cache_core::CodecError> {
        if eff.compress() {
            return self.encode(key, value);
        }
        self.codec
            .encode_uncompressed_for(&[self.l2.key_prefix().unwrap_or(""), key], value)
    }

    /// Decodes a value read from `key` of L2.
    pub(crate) fn decode<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        bytes: &[u8],
    ) -> std::result::Result<T, ncm_cache_core::CodecError> {
        self.codec
            .decode_for(&[self.l2.key_prefix().unwrap_or(""), key], bytes)
    }

    pub(crate) async fn l2_write(
        &self,
        key: &str,
        bytes: ncm_cache_core::Bytes,
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.l2_call("set", self.l2.set(key, bytes, ttl)).await
    }

    /// Counts an L2 hit of `key` and promotes the value into L1 once it reached the threshold
    /// (unless `key` was invalidated since `ticket`, taken before the L2 read).
    pub(crate) fn promote(
        &self,
        key: &str,
        value: Object,
        size: usize,
        ticket: &Ticket,
        eff: &Eff,
    ) {
        if !self.opts.enable_promotion || !eff.write_l1() {
            return;
        }
        let threshold = self.opts.promotion_threshold.max(1);
        if threshold > 1 {
            let hits = self.promotions.peek(key).ok().flatten().map_or(0, |h| h.0) + 1;
            if hits < threshold {
                let _ = self
                    .promotions
                    .insert(key, Hits(hits), Some(self.opts.l1_default_ttl));
                return;
            }
            let _ = self.promotions.remove(key);
        }
        let fill = Fill::value(value, size, eff.l2_ttl);
        if self.l1_fill(key, fill, ticket, eff) {
            Counters::bump(&self.counters.promotions);
        }
    }

    /// An invalidation of `key` in this L1 (local or received): bump its version, then evict.
    /// Returns whether L1 held it.
    pub(crate) fn invalidate_l1(&self, key: &str) -> Result<bool> {
        self.versions.invalidate(key);
        self.l1.remove(key)
    }

    /// Keys removed in a new epoch after a write's caller gave up before its epoch check (in
    /// the background, see `epoch.rs`): the caller's eviction and announcement went out before,
    /// and a read in between may have cached what the new epoch held then, so both are made
    /// again. Announced even for a call with `skip_backplane`: an extra eviction only costs a
    /// miss.
    fn removed_late(&self, removal: &crate::epoch::Removal) {
        use crate::epoch::Removal;
        match removal {
            Removal::Keys(keys) => {
                for key in keys {
                    let _ = self.invalidate_l1(key);
                    self.queue_delete(key);
                }
            }
            Removal::Pattern(pattern) => {
                let _ = self.invalidate_l1_matching(pattern);
                self.queue_pattern(pattern);
            }
        }
    }

    /// Invalidates and empties all of this L1.
    pub(crate) fn invalidate_l1_all(&self) {
        self.versions.invalidate_all();
        self.l1.clear();
    }

    /// Another instance cleared the cache (or Redis was flushed): L1 emptied, and with epochs
    /// the epoch read again before the next L2 call.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn remote_clear(&self) {
        if let Some(e) = &self.epoch {
            e.forget();
        }
        self.invalidate_l1_all();
    }

    /// Invalidates every key and removes those matching `pattern` (Redis glob) from L1.
    pub(crate) fn invalidate_l1_matching(&self, pattern: &str) -> Result<u64> {
        self.versions.invalidate_all();
        self.l1.remove_matching(pattern)
    }

    /// Makes everything in L1 stale-only (kept for fail-safe, never served as fresh); without
    /// fail-safe, empties it.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn mark_l1_stale(&self) {
        // With epochs, the token first (a clear may have been missed: a link down, a lost
        // message): a read that takes its ticket after the bump below uses the new epoch.
        if let Some(e) = &self.epoch {
            e.forget();
        }
        // Global bump first: a fill that reads the new generation then fails its second check.
        self.versions.invalidate_all();
        self.generation.fetch_add(1, Ordering::AcqRel);
        if self.opts.max_stale_age.is_none() && !self.per_call_fail_safe.load(Ordering::Acquire) {
            self.l1.clear();
        }
    }

    /// A coherence link went down: L1 is bypassed and everything in it made stale-only.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn link_down(&self, link: Link) {
        let mut down = self.links_down.lock().unwrap_or_else(|e| e.into_inner());
        *down |= link as u8;
        self.l1_enabled.store(false, Ordering::Release);
        if let Some(e) = &self.epoch {
            e.set_linked(false);
        }
        drop(down);
        self.mark_l1_stale();
    }

    /// A coherence link is (again) up: anything may have changed while it was not, so L1 is
    /// made stale-only; L1 is used again once every link is up.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn link_up(&self, link: Link, first: bool) {
        self.mark_l1_stale();
        let mut down = self.links_down.lock().unwrap_or_else(|e| e.into_inner());
        *down &= !(link as u8);
        if let Some(e) = &self.epoch {
            // Clears missed while the link was down: `mark_l1_stale` above forgot the token.
            e.set_linked(*down == 0);
        }
        if *down == 0 {
            self.l1_enabled.store(true, Ordering::Release);
        }
        drop(down);
        if !first {
            Counters::bump(&self.counters.resyncs);
        }
    }

    /// Puts a value into L1 while `ticket` is current: checked before the insert and again
    /// after it (an invalidation in between removes what was inserted). Returns whether it
    /// stayed.
    pub(crate) fn l1_fill(&self, key: &str, fill: Fill, ticket: &Ticket, eff: &Eff) -> bool {
        self.l1_enabled.load(Ordering::Acquire) && self.l1_put_while(key, fill, ticket, eff, false)
    }

    /// A value this instance just wrote or loaded while L1 may not serve it as fresh (a
    /// coherence link down), or whose L2 store failed: kept as stale-only — never served as
    /// fresh, served by fail-safe within its max stale age — in place of an older copy, so
    /// the loads of an outage leave their values for fail-safe (before, found by review: the
    /// older copy was removed with it, and once the source failed too nothing was served).
    /// Only with fail-safe on for the call, and while `ticket` is current (checked before
    /// and after the insert, as [`l1_fill`](Self::l1_fill) does). Returns whether it stayed.
    pub(crate) fn l1_keep_stale_only(
        &self,
        key: &str,
        fill: Fill,
        ticket: &Ticket,
        eff: &Eff,
    ) -> bool {
        eff.max_stale_age.is_some() && self.l1_put_while(key, fill, ticket, eff, true)
    }

    /// [`l1_put`](Self::l1_put) while `ticket` is current, checked before the insert and again
    /// after it (an invalidation in between removes what was inserted).
    fn l1_put_while(
        &self,
        key: &str,
        fill: Fill,
        ticket: &Ticket,
        eff: &Eff,
        stale_only: bool,
    ) -> bool {
        if !eff.write_l1() || !self.versions.current(ticket) {
            return false;
        }
        if !self.l1_put(key, fill, eff, stale_only) {
            return false;
        }
        if self.versions.current(ticket) {
            true
        } else {
            let _ = self.l1.remove(key);
            false
        }
    }

    /// Inserts `fill`; `stale_only`: under a generation older than the current one, so it is
    /// never read as fresh (`l1_lookup`).
    fn l1_put(&self, key: &str, fill: Fill, eff: &Eff, stale_only: bool) -> bool {
        let mut fresh = if fill.negative {
            eff.negative_ttl.unwrap_or(eff.l1_ttl)
        } else {
            eff.l1_ttl
        };
        // Never longer than the entry lives in L2.
        if let Some(ttl) = fill.l2_ttl {
            fresh = fresh.min(ttl);
        }
        let now = self.opts.now_nanos();
        let after = |d: Duration| ncm_cache_core::deadline_after(now, d);
        let size = eff.size.map_or(fill.size, |s| s as usize);
        let value = L1Value {
            object: fill.object,
            size: u32::try_from(size).unwrap_or(u32::MAX),
            fresh_until: after(fresh),
            refresh_at: eff
                .eager_refresh
                .map_or(NO_DEADLINE, |f| after(fresh.mul_f64(f))),
            // Truncation is the point: see `L1Value::generation`.
            generation: (self.generation.load(Ordering::Acquire) as u32)
                .wrapping_sub(u32::from(stale_only)),
        };
        let ttl = Some(fresh.saturating_add(eff.keep_stale));
        if self.opts.max_stale_age.is_none()
            && eff.max_stale_age.is_some()
            && !self.per_call_fail_safe.load(Ordering::Relaxed)
        {
            self.per_call_fail_safe.store(true, Ordering::Release);
        }
        // The validator follows the entry: set with it, or gone with a value that has none.
        match (fill.validator, &value.object) {
            (Some(v), Some(object)) => {
                self.has_validators.store(true, Ordering::Release);
                if self
                    .validators
                    .insert(key, Validator(v, address(object)), ttl)
                    .is_err()
                {
                    // Not kept (too large): never leave the previous value's behind.
                    let _ = self.validators.remove(key);
                }
            }
            _ if self.has_validators.load(Ordering::Acquire) => {
                let _ = self.validators.remove(key);
            }
            _ => {}
        }
        match self.l1.insert(key, value, ttl) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(key, error = %e, "value not kept in L1");
                false
            }
        }
    }

    /// The validator of `value` (an L1 entry of `key`, fresh or stale, which the caller
    /// holds), for a conditional refresh: `None` when `key` now has another value.
    pub(crate) fn l1_validator(&self, key: &str, value: &Object) -> Option<Arc<str>> {
        if !self.has_validators.load(Ordering::Acquire) {
            return None;
        }
        self.validators
            .peek(key)
            .ok()
            .flatten()
            .filter(|v| v.1 == address(value))
            .map(|v| v.0)
    }

    /// The size of `key`'s L1 entry if it is still `value` (fresh or stale): a "not modified"
    /// answer may re-arm only the value its loader compared against.
    pub(crate) fn l1_holds(&self, key: &str, value: &Object) -> Option<u32> {
        self.l1
            .peek_unvalidated_at(key, self.opts.now_nanos())
            .ok()
            .flatten()
            .filter(|v| {
                v.object
                    .as_ref()
                    .is_some_and(|o| address(o) == address(value))
            })
            .map(|v| v.size)
    }

    /// Writes L2 first, then L1, then tells other instances. If L2 fails, L1 is not left
    /// holding a value L2 does not have.
    pub(crate) async fn write_encoded(
        &self,
        key: &str,
        value: Object,
        bytes: ncm_cache_core::Bytes,
        eff: &Eff,
    ) -> Result<()> {
        let size = bytes.len();
        let ttl = eff.l2_ttl;
        if !eff.write_l2() {
            // This instance's L1 only (others drop their copy unless told not to).
            self.invalidate_l1(key)?;
            let ticket = self.versions.ticket(key);
            self.l1_fill(key, Fill::value(value, size, ttl), &ticket, eff);
            if eff.announce() {
                self.publish_local(key).await;
            }
            return Ok(());
        }
        // Bump before: fills that started earlier cannot land after this write. The old L1
        // copy may still be served until the write is acknowledged. Callers after a write of
        // the caller's name a new load flight, never joining one begun before it (a load's
        // own store keeps the flight); no ticket sees that, so overlapping local writes still
        // settle as contended, not invalidated.
        self.versions.renew_flight(key);
        let ticket = self.versions.write_begin(key);
        let began = self.opts.now_nanos();
        let mut guard = Unannounced::new(self, key, Some(ticket)).announce(eff.announce());
        // One round trip when L2 is the backplane's Redis, else write then publish.
        let combined = if eff.announce() {
            self.write_and_publish(key, &bytes, ttl).await
        } else {
            None
        };
        let (written, published) = match combined {
            Some(r) => (r, true),
            None => (self.l2_write(key, bytes, ttl).await, false),
        };
        guard.disarm();
        // Again once the L2 write has returned, before it settles: a load whose store began
        // while this write was under way and settles after it sees a caller's write
        // overlapped it (`settle_load`), and a caller after this write never joins a load
        // begun during it.
        self.versions.renew_flight(key);
        // An eager refresh's store of the key (a plain SET) that landed after this write began
        // may have overwritten it (`recent.rs`): checked once this write is settled.
        // (Started at once: a caller cancelled during the announcement below still has them
        // checked. Also after a failed write: it may have landed all the same.)
        let overwritten = self.start_withdrawals(
            self.recent
                .overwritten(key, self.opts.now_nanos(), began)
                .into_iter()
                .map(|digest| (key.to_owned(), digest, eff.announce()))
                .collect(),
        );
        if let Err(e) = written {
            let _ = self.versions.write_end(&ticket);
            let _ = self.invalidate_l1(key);
            if eff.announce() {
                self.publish_delete(key).await;
            }
            Self::finish_withdrawals(overwritten).await;
            return Err(e);
        }
        self.settle_write(key, Fill::value(value, size, ttl), &ticket, eff);
        if !published && eff.announce() {
            self.publish_set(key).await;
        }
        Self::finish_withdrawals(overwritten).await;
        Ok(())
    }

    /// A load's L2 store, only if the key is absent or replacing (`how`), in the current epoch
    /// with `epoch_clear` and never made again in a new one (see `EpochBackend::place`).
    /// `since`: [`epoch_changes`](Self::epoch_changes) when the load began.
    pub(crate) async fn place(
        &self,
        key: &str,
        bytes: ncm_cache_core::Bytes,
        ttl: Option<Duration>,
        how: Store,
        since: Option<u64>,
    ) -> Result<Placed> {
        if let Some(epoch) = &self.epoch {
            return epoch.place(key, bytes, ttl, how, since).await;
        }
        Ok(match how {
            Store::IfAbsent => {
                if self.l2.set_if_absent(key, bytes, ttl).await? {
                    Placed::Stored
                } else {
                    Placed::Refused
                }
            }
            Store::Replace => {
                self.l2.set(key, bytes, ttl).await?;
                Placed::Stored
            }
        })
    }

    /// With `epoch_clear`, how many times the epoch token in use changed: taken when a load
    /// begins, before its loader reads the source, and given to its store (`place`), which is
    /// not made in an epoch that began since. `None` without epochs.
    pub(crate) fn epoch_changes(&self) -> Option<u64> {
        self.epoch.as_ref().map(|e| e.changes())
    }

    /// A load's store after a miss (`CacheBackend::set_if_absent`, and `set_loaded` with a
    /// mark taken after a miss): L2 only if the key is still absent there (`SET NX`), then L1
    /// and the announcement as for a write. Refused — something was written since the miss,
    /// here or by another instance, at least as new as what the load read — nothing is kept
    /// here (counted in `loads_not_cached`). Returns whether it was stored.
    /// `tracked`: the store of a load after a miss, remembered for deletes heard late
    /// (`recent.rs`); `None` for a plain "only if absent" write.
    pub(crate) async fn write_loaded(
        &self,
        key: &str,
        value: Object,
        bytes: ncm_cache_core::Bytes,
        eff: &Eff,
        tracked: Option<Tracked<'_, C>>,
        epoch_since: Option<u64>,
    ) -> Result<bool> {
        if !eff.write_l2() {
            if let Some(t) = tracked {
                t.abandon();
            }
            return self
                .write_encoded(key, value, bytes, eff)
                .await
                .map(|()| true);
        }
        let size = bytes.len();
        let ttl = eff.l2_ttl;
        let ticket = self.versions.write_begin(key);
        let mut guard = Unannounced::new(self, key, Some(ticket)).announce(eff.announce());
        let written = self
            .l2_call(
                "set",
                self.place(key, bytes, ttl, Store::IfAbsent, epoch_since),
            )
            .await
            .map(|placed| placed == Placed::Stored);
        // Disarmed only after the withdrawal a failed store may owe (`Tracked::after`): a
        // caller cancelled during it still ends its write (else the stripe counted it in
        // flight for good: review, helper-74 #6).
        let tracked = Tracked::after(tracked, written.as_ref().map(|stored| *stored)).await;
        guard.disarm();
        match written {
            Ok(true) => {
                self.settle_load(key, Fill::value(value, size, ttl), &ticket, eff);
                if let Some(t) = tracked {
                    t.finish().await;
                }
                if eff.announce() {
                    self.publish_loaded(key).await;
                }
                Ok(true)
            }
            Ok(false) => {
                // Nothing written: whatever L1 holds now came after the miss — except a cached
                // "not found" (`negative_ttl`), which this path's read took for an absent key:
                // L2 holds a value after all, so it goes (else every load through this path
                // would run the loader, refused, until `negative_ttl` ends).
                let _ = self.versions.write_end(&ticket);
                if let Ok(L1Read::Fresh(None, _) | L1Read::Stale(None, _)) =
                    self.l1_read::<ncm_cache_core::Bytes>(key, eff)
                {
                    let _ = self.l1.remove(key);
                }
                Counters::bump(&self.counters.loads_not_cached);
                tracing::debug!(key, "written since the load's miss; result not cached");
                Ok(false)
            }
            Err(e) => {
                let _ = self.versions.write_end(&ticket);
                let _ = self.invalidate_l1(key);
                if eff.announce() {
                    self.publish_delete(key).await;
                }
                Err(e)
            }
        }
    }

    /// A load's store that a delete may have overtaken (`recent.rs`): removed from L2 when L2
    /// still holds exactly its bytes (its digest), evicted here, and announced as a withdrawal
    /// (`announce`: not for a delete made with `skip_backplane`). The look and the delete are
    /// two calls: a write landing between them is deleted too (one more miss).
    pub(crate) async fn withdraw_load(&self, key: &str, digest: u64, announce: bool) {
        match self.l2_call("get", self.l2.get(key)).await {
            Ok(Some(held)) if crate::recent::digest(&held) == digest => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(key, error = %e, "a load's store that a delete may have overtaken could not be checked");
                return;
            }
        }
        if let Err(e) = self.l2_call("delete", self.l2.delete(key)).await {
            tracing::warn!(key, error = %e, "a load stored after a delete of its key could not be withdrawn");
            return;
        }
        let _ = self.invalidate_l1(key);
        Counters::bump(&self.counters.loads_withdrawn);
        tracing::debug!(key, "a load stored after a delete of its key was withdrawn");
        if announce {
            self.publish_withdrawn(key).await;
        }
    }

    /// Withdraws each `(key, digest)` that L2 still holds, a few at a time — in a task of its
    /// own, awaited: the entries were taken out of `recent`, so a caller cancelled meanwhile
    /// (a timeout around `delete` or `clear`) must not drop the check (review, helper-74).
    pub(crate) async fn withdraw_loads(&self, found: Vec<(String, u64)>, announce: bool)
    where
        C: Codec,
    {
        let found = found.into_iter().map(|(k, d)| (k, d, announce)).collect();
        Self::finish_withdrawals(self.start_withdrawals(found)).await;
    }

    /// Starts the withdrawal of each `(key, digest, announce)` in a task of its own, at once:
    /// the entries were taken out of `recent`, so a caller cancelled at any later await (its
    /// announcement, the withdrawal itself) must not drop them (review, helper-74, helper-77).
    /// Await the handle ([`finish_withdrawals`](Self::finish_withdrawals)) where the caller
    /// waits for them. Outside a runtime, or while the cache is being dropped, they are
    /// dropped (logged).
    pub(crate) fn start_withdrawals(
        &self,
        found: Vec<(String, u64, bool)>,
    ) -> Option<tokio::task::JoinHandle<()>>
    where
        C: Codec,
    {
        if found.is_empty() {
            return None;
        }
        match (self.me.upgrade(), tokio::runtime::Handle::try_current()) {
            (Some(inner), Ok(runtime)) => {
                Some(runtime.spawn(async move { inner.withdraw_loads_here(found).await }))
            }
            _ => {
                tracing::warn!(
                    loads = found.len(),
                    "loads stored after a write or delete of their keys could not be checked (no runtime)"
                );
                None
            }
        }
    }

    /// Waits for withdrawals [`start_withdrawals`](Self::start_withdrawals) began.
    pub(crate) async fn finish_withdrawals(started: Option<tokio::task::JoinHandle<()>>) {
        if let Some(task) = started {
            let _ = task.await;
        }
    }

    pub(crate) async fn withdraw_loads_here(&self, found: Vec<(String, u64, bool)>) {
        use futures_util::StreamExt as _;
        futures_util::stream::iter(found)
            .for_each_concurrent(16, |(key, digest, announce)| async move {
                self.withdraw_load(&key, digest, announce).await;
            })
            .await;
    }

    /// `key` was deleted here: a load's store of it that may have landed after the delete is
    /// checked (`recent.rs`).
    pub(crate) async fn recheck_loads_of(&self, key: &str, announce: bool)
    where
        C: Codec,
    {
        let found = self
            .recent
            .deleted(key, self.opts.now_nanos())
            .into_iter()
            .map(|digest| (key.to_owned(), digest))
            .collect();
        self.withdraw_loads(found, announce).await;
    }

    /// After a clear: with `epoch_clear` a load's store cannot land in the new epoch (see
    /// `EpochBackend::place`), so nothing is checked; without, every load stored
    /// here within the window is (as the clear's own `SCAN`, this grows with the work).
    pub(crate) async fn recheck_loads_after_clear(&self) {
        if self.epoch.is_some() {
            let _ = self
                .recent
                .deleted_matching(self.opts.now_nanos(), |_| true);
            return;
        }
        self.recheck_loads_matching(|_| true).await;
    }

    /// [`recheck_loads_of`](Self::recheck_loads_of) for every key `matches` accepts.
    pub(crate) async fn recheck_loads_matching(&self, matches: impl Fn(&str) -> bool) {
        let found = self.recent.deleted_matching(self.opts.now_nanos(), matches);
        self.withdraw_loads(found, true).await;
    }

    /// Deletes `key` everywhere: L1 (before and after the L2 delete: a read that began in
    /// between may have read the old value), L2, and other instances' L1.
    pub(crate) async fn delete_everywhere(&self, key: &str, eff: &Eff) -> Result<bool> {
        let in_l1 = self.invalidate_l1(key)?;
        let in_l2 = if eff.write_l2() {
            let mut guard = Unannounced::new(self, key, None).announce(eff.announce());
            let delete = self.l2_call("delete", self.l2.delete(key));
            #[cfg(feature = "redis")]
            let in_l2 = if self.lock.is_some() {
                // Beside the DEL, not after it (boxed: this path is rare and its future large).
                let both: std::pin::Pin<Box<dyn Future<Output = Result<bool>> + Send + '_>> =
                    Box::pin(async { tokio::join!(delete, self.overrule_load(key)).0 });
                both.await
            } else {
                delete.await
            };
            #[cfg(not(feature = "redis"))]
            let in_l2 = delete.await;
            self.invalidate_l1(key)?;
            // Announced before the recheck below, the guard armed until then: a caller
            // cancelled during either still has it announced (review, helper-74).
            if eff.announce() {
                self.publish_delete(key).await;
            }
            // Redis removed nothing, so it pushes nothing: other instances may still hold the
            // key in L1 (a cached "not found"). Also after an error (the DEL may have run),
            // and before the recheck, still guarded (review, helper-75).
            let told = match &in_l2 {
                Ok(true) => Ok(()),
                _ => self.tell_trackers(Tombstone::Key(key)).await,
            };
            guard.disarm();
            // A load of the key stored here may have landed after this delete.
            self.recheck_loads_of(key, eff.announce()).await;
            let in_l2 = in_l2?;
            told?;
            in_l2
        } else {
            if eff.announce() {
                self.publish_local(key).await;
            }
            false
        };
        Ok(in_l2 || in_l1)
    }

    /// [`tell_trackers`](Self::tell_trackers) from a drop guard: the marker's write is
    /// spawned, not awaited (an error is logged).
    pub(crate) fn queue_tombstone(&self, tombstone: Tombstone<'_>) {
        #[cfg(feature = "redis")]
        if let Some(tracker) = &self.tracking
            && self.backplane.is_none()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            use ncm_cache_core::CacheBackend as _;
            let redis = Arc::clone(&tracker.redis);
            let (name, ttl) = (tombstone.name(), tombstone.ttl());
            runtime.spawn(async move {
                if let Err(e) = redis
                    .set_reserved(&name, ncm_cache_core::Bytes::new(), ttl)
                    .await
                {
                    tracing::warn!(marker = %name, error = %e, "the invalidation marker of a cancelled delete could not be written; tracking instances may keep a cached not-found until negative_ttl");
                }
            });
        }
        let _ = tombstone;
    }

    /// With client tracking and no backplane (which carries every invalidation itself):
    /// makes Redis push an invalidation it would not push by itself (see [`Tombstone`]), on
    /// the tracked Redis. The write is spawned: a caller cancelled during it still has it
    /// written (nothing else would retry it). Otherwise, nothing.
    ///
    /// # Errors
    ///
    /// The error of the tombstone's write: other tracking instances may then keep what it
    /// would have dropped (for at most their L1 TTL, or `negative_ttl`).
    pub(crate) async fn tell_trackers(&self, tombstone: Tombstone<'_>) -> Result<()> {
        #[cfg(feature = "redis")]
        if let Some(tracker) = &self.tracking
            && self.backplane.is_none()
        {
            use ncm_cache_core::CacheBackend as _;
            let redis = Arc::clone(&tracker.redis);
            let (name, ttl) = (tombstone.name(), tombstone.ttl());
            let write = async move {
                tokio::spawn(async move {
                    redis
                        .set_reserved(&name, ncm_cache_core::Bytes::new(), ttl)
                        .await
                })
                .await
                .unwrap_or_else(|e| {
                    Err(CacheError::Backend {
                        message: format!("the invalidation marker's write did not finish: {e}"),
                        source: None,
                    })
                })
            };
            let on_l2 = std::ptr::addr_eq(Arc::as_ptr(&self.l2_raw), Arc::as_ptr(&tracker.redis));
            return if on_l2 {
                self.l2_call("tombstone", write).await
            } else {
                write.await
            };
        }
        let _ = tombstone;
        Ok(())
    }

    /// After this instance's L2 write of `key` (begun with `ticket`): keep the written value in
    /// L1 unless an invalidation came meanwhile — for at most
    /// [`CONTENDED_TTL`](crate::versions::CONTENDED_TTL) when another local write of its stripe
    /// overlapped (which of the two L2 applied last is unknown), not at all for a write of a
    /// `MultiLevelBackend` view (`Eff::exact_writes`).
    pub(crate) fn settle_write(&self, key: &str, fill: Fill, ticket: &Ticket, eff: &Eff) {
        self.settle(key, fill, ticket, eff, true);
    }

    /// [`settle_write`](Self::settle_write) for a load's store: one that a caller's own write
    /// of its stripe overlapped is not kept (L2 decides). An "only if absent" store that
    /// succeeded came before any write of the key that overlapped it, so keeping it even for
    /// `CONTENDED_TTL` would serve it over that newer write here (found by review). A caller's
    /// write renames flights when it begins and when its L2 write returns, so `set_since` sees
    /// one that began during this store and one already under way when it began that ended
    /// before it settles; one still under way settles after this store and replaces or evicts
    /// its L1 copy itself. Overlapped only by other loads' stores (the keys of one
    /// `get_many_or_load` batch, say), it is kept as a write's is.
    pub(crate) fn settle_load(&self, key: &str, fill: Fill, ticket: &Ticket, eff: &Eff) {
        self.settle(key, fill, ticket, eff, false);
    }

    fn settle(&self, key: &str, mut fill: Fill, ticket: &Ticket, eff: &Eff, keep_contended: bool) {
        // While a coherence link is down, L1 takes nothing as fresh: the value is kept for
        // fail-safe only.
        let linked = self.l1_enabled.load(Ordering::Acquire);
        let fill_in = |fill: Fill, mine: &Ticket| {
            if linked {
                self.l1_fill(key, fill, mine, eff)
            } else {
                self.l1_keep_stale_only(key, fill, mine, eff)
            }
        };
        match self.versions.write_end(ticket) {
            Settled::Clean(mine) => {
                if !fill_in(fill, &mine) {
                    // Not kept (too large, or overtaken): never leave an older value behind.
                    let _ = self.l1.remove(key);
                }
            }
            Settled::Contended(_) if keep_contended && eff.exact_writes() => {
                let _ = self.l1.remove(key);
            }
            Settled::Contended(mine) if !keep_contended && mine.set_since(ticket) => {
                let _ = self.l1.remove(key);
            }
            Settled::Contended(mine) => {
                let ttl = fill.l2_ttl.map_or(CONTENDED_TTL, |t| t.min(CONTENDED_TTL));
                fill.l2_ttl = Some(ttl);
                if !fill_in(fill, &mine) {
                    let _ = self.l1.remove(key);
                }
            }
            Settled::Invalidated => {
                let _ = self.l1.remove(key);
            }
        }
    }
}

/// Armed while a write or delete of `key` may have reached L2 but is not yet settled and
/// announced. Dropped armed — the caller's future was cancelled during the L2 call (a request
/// timeout around `set`, a dropped handler) — it ends the write, evicts the local copy and
/// queues the invalidation for other instances, as if the call had failed after reaching L2.
pub(crate) struct Unannounced<'a, C: Codec> {
    inner: &'a Inner<C>,
    /// The keys, each with its write's ticket (`None` for a delete).
    writes: Vec<(&'a str, Option<Ticket>)>,
    armed: bool,
    /// Whether other instances are told (not with `skip_backplane`).
    announce: bool,
}

impl<'a, C: Codec> Unannounced<'a, C> {
    pub(crate) fn new(inner: &'a Inner<C>, key: &'a str, write: Option<Ticket>) -> Self {
        Self::many(inner, vec![(key, write)])
    }

    /// One guard for a batch write.
    pub(crate) fn many(inner: &'a Inner<C>, writes: Vec<(&'a str, Option<Ticket>)>) -> Self {
        Self {
            inner,
            writes,
            armed: true,
            announce: true,
        }
    }

    /// A call with `skip_backplane`: a cancelled write is not announced either.
    pub(crate) fn announce(mut self, announce: bool) -> Self {
        self.announce = announce;
        self
    }

    /// The L2 call ended (either way): the caller settles and announces it itself.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl<C: Codec> Drop for Unannounced<'_, C> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for (key, write) in self.writes.drain(..) {
            if let Some(t) = write {
                let _ = self.inner.versions.write_end(&t);
            }
            let _ = self.inner.invalidate_l1(key);
            if self.announce {
                self.inner.queue_delete(key);
            }
            if write.is_none() {
                // A delete: Redis pushes nothing for a key it did not hold.
                self.inner.queue_tombstone(Tombstone::Key(key));
            }
        }
    }
}

/// Runs its closure when dropped before [`disarm`](Self::disarm): what a call cancelled
/// during its L2 call still owes (L1 evictions, an announcement queued for the flush task).
pub(crate) struct OnCancel<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnCancel<F> {
    pub(crate) fn new(f: F) -> Self {
        Self(Some(f))
    }

    /// The call ended (either way): the caller settles and announces it itself.
    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnCancel<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// What goes into L1.
pub(crate) struct Fill {
    pub(crate) object: Option<Object>,
    pub(crate) size: usize,
    /// A cached "not found" (negative caching: its own TTL).
    pub(crate) negative: bool,
    /// The entry's L2 TTL: the L1 copy never outlives it.
    pub(crate) l2_ttl: Option<Duration>,
    /// The loader's validator (conditional refresh).
    pub(crate) validator: Option<Arc<str>>,
}

impl Fill {
    pub(crate) fn value(object: Object, size: usize, l2_ttl: Option<Duration>) -> Self {
        Self {
            object: Some(object),
            size,
            negative: false,
            l2_ttl,
            validator: None,
        }
    }

    pub(crate) fn negative() -> Self {
        Self {
            object: None,
            size: 0,
            negative: true,
            l2_ttl: None,
            validator: None,
        }
    }
}

/// What an L2 read of one key found ([`Inner::l2_lookup`]).
pub(crate) enum L2Read<T> {
    /// A value this instance can read, with its encoded size.
    Found(Arc<T>, usize),
    /// L2 holds nothing under the key.
    Absent,
    /// Not read (`skip_l2_read`), or held something this instance could not decode.
    Unknown,
}

/// A load's L2 store remembered for deletes heard late (`recent.rs`), from before the load's
/// last version check. Ended by its outcome; dropped unended (the caller cancelled during the
/// store), it is remembered as possibly landed (a delete heard meanwhile is then not acted on).
pub(crate) struct Tracked<'a, C> {
    inner: &'a Inner<C>,
    key: String,
    id: u64,
    announce: bool,
    ended: bool,
}

impl<'a, C: Codec> Tracked<'a, C> {
    /// `replaces`: a plain store (an eager refresh's), not "only if absent".
    pub(crate) fn begin(
        inner: &'a Inner<C>,
        key: &str,
        bytes: &[u8],
        eff: &Eff,
        replaces: bool,
    ) -> Self {
        let id = inner.recent.begin(
            key,
            crate::recent::digest(bytes),
            inner.opts.now_nanos(),
            replaces,
        );
        Self {
            inner,
            key: key.to_owned(),
            id,
            announce: eff.announce(),
            ended: false,
        }
    }

    /// Not stored (refused, moved, or not sent).
    pub(crate) fn abandon(mut self) {
        self.ended = true;
        self.inner.recent.abandoned(&self.key, self.id);
    }

    /// The store landed, or may have (it failed): what to withdraw now, if a delete of the key
    /// came while it was in flight (see [`Inner::withdraw_load`]).
    pub(crate) fn end(mut self) -> Option<(String, u64, bool)> {
        self.ended = true;
        let now = self.inner.opts.now_nanos();
        match self.inner.recent.landed(&self.key, self.id, now) {
            crate::recent::Landed::Check(digest) => {
                Some((std::mem::take(&mut self.key), digest, self.announce))
            }
            crate::recent::Landed::Keep => None,
        }
    }

    /// After the store was sent: kept (for [`finish`](Self::finish) once the store is settled)
    /// when it landed, abandoned when it was refused, finished at once when it failed (it may
    /// have landed).
    pub(crate) async fn after<E>(
        tracked: Option<Self>,
        stored: std::result::Result<bool, E>,
    ) -> Option<Self> {
        let t = tracked?;
        match stored {
            Ok(true) => Some(t),
            Ok(false) => {
                t.abandon();
                None
            }
            Err(_) => {
                t.finish().await;
                None
            }
        }
    }

    /// [`end`](Self::end), then the withdrawal it asks for.
    pub(crate) async fn finish(self)
    where
        C: Codec,
    {
        let inner = self.inner;
        let started = inner.start_withdrawals(self.end().into_iter().collect());
        Inner::<C>::finish_withdrawals(started).await;
    }
}

impl<C> Drop for Tracked<'_, C> {
    fn drop(&mut self) {
        if !self.ended {
            let now = self.inner.opts.now_nanos();
            let _ = self.inner.recent.landed(&self.key, self.id, now);
        }
    }
}

/// What a typed batch read found: the values in key order and which keys L2 held nothing for;
/// or, when the L2 batch failed, what L1 answered and the [`FailedRead`].
/// A typed batch read: what L1 and L2 answered, which keys L2 held nothing for, and the
/// stale L1 copies of the keys still missing (for a load that fails: fail-safe); or, when the
/// L2 batch failed, what L1 answered and the stale copies of every key L2 was asked for.
type ManyRead<T> = std::result::Result<
    (
        Vec<Option<T>>,
        Vec<bool>,
        Vec<(usize, Option<StaleCopy<T>>)>,
    ),
    (Vec<Option<T>>, FailedRead<T>),
>;

/// A typed batch read whose L2 call failed.
struct FailedRead<T> {
    /// Each key L2 was asked for (its position) and its stale L1 copy, if any.
    copies: Vec<(usize, Option<StaleCopy<T>>)>,
    error: CacheError,
}

impl<T: Clone> FailedRead<T> {
    /// Fail-safe: `out` with the stale copies, if every key left has one still within its max
    /// stale age; else the error (of the L2 batch, or of the load that followed).
    fn serve<C: Codec>(self, inner: &Inner<C>, mut out: Vec<Option<T>>) -> Result<Vec<Option<T>>> {
        let mut served = Vec::with_capacity(self.copies.len());
        for (i, copy) in self.copies {
            match inner.servable(copy) {
                Some(v) => served.push((i, v)),
                None => return Err(self.error),
            }
        }
        for (i, v) in served {
            Counters::bump(&inner.counters.stale_served);
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(T::clone(&v));
            }
        }
        tracing::debug!(error = %self.error, "stale copies served (fail-safe)");
        Ok(out)
    }
}
