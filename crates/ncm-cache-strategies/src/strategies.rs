//! `CacheStrategies`: the original's strategy object over a typed cache.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::{Bytes, Cache, CacheError, CacheFailure, Codec, Expiry, Result, SingleFlight};
use serde::Serialize;

use crate::invalidation::Invalidator;
use crate::stats::{InvalidationStats, Kind, WriteBehindStats};
use crate::write_behind::{QueueControl, WriteBehindConfig};

/// The original's `CacheStrategies(cache)`: write-through, write-behind, write-around,
/// read-through and cache-aside over one typed cache, and invalidation by time, event, pattern,
/// dependency and tag.
///
/// - [`new`](Self::new) coordinates in process: the dependency graph, tags and event handlers
///   live in this process, time-based invalidation uses timers. Works over any backend.
/// - [`with_redis`][with_redis] (feature `redis`) coordinates through Redis: events
///   reach every instance (pub/sub), the dependency/tag graph is shared in Redis and walked
///   atomically (Lua), expirations arrive as keyspace notifications, and write-behind can be
///   made durable ([`WriteBehindConfig::durable`]).
///
/// Cloning is cheap; clones share everything. Call [`shutdown`](Self::shutdown) before exiting
/// so every write-behind write is persisted.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_codec::Serializer;
/// use ncm_cache_core::Cache;
/// use ncm_cache_memory::MemoryBackend;
/// use ncm_cache_strategies::{store_fn, CacheStrategies};
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// let strategies = CacheStrategies::new(Cache::new(MemoryBackend::new(), Serializer::default()));
/// let save_to_database = store_fn(|_key: String, _name: String| async { Ok::<_, std::io::Error>(()) });
/// let ttl = Duration::from_secs(3600);
///
/// strategies.write_through("user:123", &"John".to_string(), ttl, &save_to_database).await?;
/// strategies.write_behind("user:124", &"Jane".to_string(), ttl, &save_to_database, Duration::from_millis(10)).await?;
/// strategies.write_around("user:125", &"Joe".to_string(), &save_to_database).await?;
///
/// strategies.dependency_based_invalidation("user:123", ["profile:123"]).await?;
/// assert_eq!(strategies.invalidate_dependencies("profile:123").await?, 1);
/// assert_eq!(strategies.cache().get::<String>("user:123").await?, None);
///
/// strategies.shutdown().await?; // persists the write-behind write
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
#[cfg_attr(feature = "redis", doc = "\n[with_redis]: Self::with_redis")]
#[cfg_attr(
    not(feature = "redis"),
    doc = "\n[with_redis]: https://docs.rs/ncm-cache-strategies/latest/ncm_cache_strategies/struct.CacheStrategies.html#method.with_redis\n[`WriteBehindConfig::durable`]: https://docs.rs/ncm-cache-strategies/latest/ncm_cache_strategies/struct.WriteBehindConfig.html#method.durable"
)]
pub struct CacheStrategies<C = Serializer> {
    pub(crate) cache: Cache<C>,
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) inv: Arc<Invalidator>,
    pub(crate) queues: Mutex<HashMap<usize, Arc<dyn QueueControl>>>,
    pub(crate) creating: tokio::sync::Mutex<()>,
    pub(crate) write_behind: WriteBehindConfig,
    pub(crate) flight: SingleFlight<String, Bytes>,
    /// What `read_through` / `cache_aside` do when the cache fails.
    pub(crate) on_cache_failure: CacheFailure,
    /// Orders write-throughs of one key in this process.
    pub(crate) stripes: Box<[tokio::sync::Mutex<()>]>,
}

impl Inner {
    /// The lock that orders write-throughs of `key` in this process.
    pub(crate) fn stripe(&self, key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key) as usize;
        &self.stripes[h % self.stripes.len()]
    }

    pub(crate) fn queues(&self) -> MutexGuard<'_, HashMap<usize, Arc<dyn QueueControl>>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<C> Clone for CacheStrategies<C> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for CacheStrategies<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheStrategies")
            .field("cache", &self.cache)
            .field("invalidation", &self.inner.inv)
            .field("write_behind", &self.inner.write_behind)
            .finish_non_exhaustive()
    }
}

/// Builds a [`CacheStrategies`] with a write-behind configuration and, optionally, Redis
/// coordination.
#[must_use]
pub struct CacheStrategiesBuilder<C> {
    cache: Cache<C>,
    write_behind: WriteBehindConfig,
    on_cache_failure: CacheFailure,
    #[cfg(feature = "redis")]
    redis: Option<Arc<ncm_cache_redis::RedisBackend>>,
    #[cfg(feature = "redis")]
    write_through_lease: std::time::Duration,
}

impl<C> fmt::Debug for CacheStrategiesBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheStrategiesBuilder")
            .field("write_behind", &self.write_behind)
            .finish_non_exhaustive()
    }
}

impl<C: Codec> CacheStrategiesBuilder<C> {
    /// The configuration of the write-behind queues created by
    /// [`CacheStrategies::write_behind`] (one per store).
    pub fn write_behind(mut self, config: WriteBehindConfig) -> Self {
        self.write_behind = config;
        self
    }

    /// What [`CacheStrategies::read_through`] and [`CacheStrategies::cache_aside`] do when the
    /// cache fails (default [`CacheFailure::FailOpen`]: the loaded value is served).
    pub fn on_cache_failure(mut self, on_failure: CacheFailure) -> Self {
        self.on_cache_failure = on_failure;
        self
    }

    /// Coordinates through this Redis (see [`CacheStrategies::with_redis`]).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis(mut self, backend: Arc<ncm_cache_redis::RedisBackend>) -> Self {
        self.redis = Some(backend);
        self
    }

    /// How long a write-through's mark in Redis lives (default 30 s): the bound on a
    /// write-through's store call for cross-instance ordering (see
    /// [`CacheStrategies::write_through`]). A write whose store call takes longer still counts
    /// as overlapping the next write of its key for up to 4 times this; one slower than that
    /// may leave the cache with the next write's value while the store keeps its own. Raise it
    /// for a store whose writes can take that long.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn write_through_lease(mut self, lease: std::time::Duration) -> Self {
        self.write_through_lease = lease;
        self
    }

    /// Builds; with Redis, returns once subscribed to the invalidation channel.
    pub async fn build(self) -> Result<CacheStrategies<C>> {
        #[cfg(feature = "redis")]
        let inv = match self.redis {
            Some(redis) => {
                Box::pin(crate::remote::connect(
                    Arc::clone(self.cache.backend()),
                    redis,
                    self.write_through_lease,
                ))
                .await?
            }
            None => Arc::new(Invalidator::local(Arc::clone(self.cache.backend()))),
        };
        #[cfg(not(feature = "redis"))]
        let inv = Arc::new(Invalidator::local(Arc::clone(self.cache.backend())));
        Ok(CacheStrategies::from_parts(
            self.cache,
            inv,
            self.write_behind,
            self.on_cache_failure,
        ))
    }
}

impl<C: Codec> CacheStrategies<C> {
    /// Strategies over `cache`, coordinated in this process.
    pub fn new(cache: Cache<C>) -> Self {
        let inv = Arc::new(Invalidator::local(Arc::clone(cache.backend())));
        Self::from_parts(
            cache,
            inv,
            WriteBehindConfig::default(),
            CacheFailure::FailOpen,
        )
    }

    /// A builder (write-behind settings, Redis coordination).
    pub fn builder(cache: Cache<C>) -> CacheStrategiesBuilder<C> {
        CacheStrategiesBuilder {
            cache,
            write_behind: WriteBehindConfig::default(),
            on_cache_failure: CacheFailure::FailOpen,
            #[cfg(feature = "redis")]
            redis: None,
            #[cfg(feature = "redis")]
            write_through_lease: crate::remote::WRITE_LEASE,
        }
    }

    /// Strategies over `cache`, coordinated through `redis` with every other instance using the
    /// same Redis and key prefix. `cache` may be stored in that Redis (a `RedisCache`) or be
    /// local to each instance (then deletions are also broadcast to the other instances).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub async fn with_redis(
        cache: Cache<C>,
        redis: Arc<ncm_cache_redis::RedisBackend>,
    ) -> Result<Self> {
        Self::builder(cache).redis(redis).build().await
    }

    fn from_parts(
        cache: Cache<C>,
        inv: Arc<Invalidator>,
        write_behind: WriteBehindConfig,
        on_cache_failure: CacheFailure,
    ) -> Self {
        Self {
            cache,
            inner: Arc::new(Inner {
                inv,
                queues: Mutex::new(HashMap::new()),
                creating: tokio::sync::Mutex::new(()),
                write_behind,
                flight: SingleFlight::new(),
                on_cache_failure,
                stripes: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            }),
        }
    }

    /// The typed cache.
    pub fn cache(&self) -> &Cache<C> {
        &self.cache
    }

    /// `true` when coordinated through Redis.
    pub fn is_distributed(&self) -> bool {
        self.inner.inv.is_distributed()
    }

    /// Persists every write-behind write pending now, in every queue. `Err` (the first error)
    /// when some went to a dead-letter list.
    pub async fn flush(&self) -> Result<()> {
        let queues: Vec<_> = self.inner.queues().values().cloned().collect();
        let mut first = None;
        for q in queues {
            if let Err(e) = q.flush().await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Stops every write-behind queue after persisting what it holds (idempotent). Further
    /// write-behind writes fail with [`CacheError::Closed`]; everything else keeps working.
    pub async fn shutdown(&self) -> Result<()> {
        let queues: Vec<_> = self.inner.queues().values().cloned().collect();
        let mut first = None;
        for q in queues {
            if let Err(e) = q.shutdown().await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The counters of every write-behind queue.
    pub fn write_behind_stats(&self) -> Vec<WriteBehindStats> {
        self.inner.queues().values().map(|q| q.stats()).collect()
    }

    /// The invalidation counters.
    pub fn invalidation_stats(&self) -> InvalidationStats {
        self.inner.inv.stats.snapshot()
    }

    /// Deletes `key` (here, and on instances that keep their own cache); `true` when it existed
    /// here.
    pub async fn invalidate(&self, key: &str) -> Result<bool> {
        // A deleted key's declared dependencies end with it — first: a concurrent
        // `set_with_dependencies` of the key then keeps its new edges (a stray edge to a
        // missing key is harmless).
        self.inner
            .inv
            .graph
            .remove(&crate::invalidation::key_node(key))
            .await?;
        Ok(self
            .inner
            .inv
            .delete_keys(&[key.to_owned()], Kind::Key)
            .await?
            > 0)
    }

    /// Gives `key` a TTL of `ttl` and runs `callback(key)` once it has expired (the original's
    /// `time_based_invalidation`). Returns `false` when the key does not exist (nothing is
    /// registered). A later registration of the same key replaces this one.
    ///
    /// The event is **expiry only**: Redis's `expired` keyspace notification (re-enabled after
    /// every reconnect, as a restarted Redis forgets it; expirations missed during a break are
    /// found by checking the watched keys), or a timer where notifications are unavailable. A
    /// delete or an overwrite of the key fires nothing.
    pub async fn time_based_invalidation(
        &self,
        key: &str,
        ttl: Duration,
        callback: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<bool> {
        self.inner
            .inv
            .time_based(key, ttl, Arc::new(callback))
            .await
    }

    /// Stops watching `key` for expiry; `true` when it was watched.
    pub fn cancel_time_based_invalidation(&self, key: &str) -> bool {
        self.inner.inv.cancel_time_based(key)
    }

    /// Registers `keys` and `callback(event, keys)` under `event`. Handlers accumulate: each
    /// trigger deletes the keys of every handler, then runs their callbacks. With Redis
    /// coordination the keys are registered in Redis for every instance — a trigger on any
    /// instance deletes them, also after this one is gone — while the callback runs on this
    /// instance only (when the trigger's message reaches it: at most once; a message lost in a
    /// disconnect is not replayed, and an instance with a cache of its own empties it on
    /// reconnecting).
    pub async fn event_based_invalidation<I, K>(
        &self,
        event: &str,
        keys: I,
        callback: impl Fn(&str, &[String]) + Send + Sync + 'static,
    ) -> Result<()>
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        let keys = keys.into_iter().map(Into::into).collect();
        self.inner
            .inv
            .register_event(event, keys, Arc::new(callback))
            .await
    }

    /// Triggers `event` on every instance: the keys registered for it (by any instance, with
    /// Redis) are deleted, then the callbacks run — here at once, elsewhere through Redis.
    /// Returns how many registered keys existed.
    pub async fn trigger_event_invalidation(&self, event: &str) -> Result<u64> {
        self.inner.inv.trigger_event(event).await
    }

    /// Events with handlers registered on this instance.
    pub fn registered_events(&self) -> Vec<String> {
        self.inner.inv.events.names()
    }

    /// Deletes every key matching `pattern` (Redis glob syntax, inside the cache's prefix; use
    /// [`escape_glob`](ncm_cache_core::escape_glob) on user input), then runs
    /// `callback(pattern, removed)`. Returns how many keys were removed here.
    pub async fn pattern_based_invalidation(
        &self,
        pattern: &str,
        callback: impl FnOnce(&str, u64) + Send,
    ) -> Result<u64> {
        let n = self.inner.inv.invalidate_pattern(pattern).await?;
        self.inner
            .inv
            .run_callback("pattern", || callback(pattern, n));
        Ok(n)
    }

    /// Records that `key` depends on each of `dependencies`: invalidating one of them
    /// (directly or transitively) deletes `key`. The edges live as long as `key` (its remaining
    /// TTL in the cache; a day if it is not written yet — declare after writing, or use
    /// [`set_with_dependencies`](Self::set_with_dependencies)) or until it is deleted with
    /// [`invalidate`](Self::invalidate).
    pub async fn dependency_based_invalidation<I, K>(
        &self,
        key: &str,
        dependencies: I,
    ) -> Result<()>
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        let deps: Vec<String> = dependencies.into_iter().map(Into::into).collect();
        self.inner.inv.add_dependencies(key, &deps, None).await
    }

    /// Caches `value` under `key` and declares that it depends on each of `dependencies`, for
    /// as long as it lives (`ttl`): [`invalidate_dependencies`](Self::invalidate_dependencies)
    /// of any of them deletes it — also after it was deleted by an earlier walk and cached
    /// again. With the graph and the cache in one Redis (not a cluster) the edges and the value
    /// are written by one script, in one round trip; otherwise the edges first (an edge to a
    /// key not yet written is harmless), then the value.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use ncm_cache_strategies::CacheStrategies;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let cache = ncm_cache_core::Cache::new(ncm_cache_memory::MemoryBackend::new(), ncm_cache_codec::Serializer::default());
    /// let s = CacheStrategies::new(cache);
    /// s.set_with_dependencies("user:1", &"Ada", Duration::from_secs(60), ["profile:1"]).await?;
    /// assert_eq!(s.invalidate_dependencies("profile:1").await?, 1);
    /// assert_eq!(s.cache().get::<String>("user:1").await?, None);
    /// # Ok::<(), ncm_cache_core::CacheError>(())
    /// # }).unwrap();
    /// ```
    pub async fn set_with_dependencies<V, I, K>(
        &self,
        key: &str,
        value: &V,
        ttl: impl Into<Expiry>,
        dependencies: I,
    ) -> Result<()>
    where
        V: Serialize + ?Sized,
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        let expiry = ttl.into();
        let lifetime = self.cache.ttl_policy().resolve(expiry)?;
        let deps: Vec<String> = dependencies.into_iter().map(Into::into).collect();
        // One round trip when the graph and the cache share one Redis node. The TTL is
        // resolved once (jitter included): the edges live exactly as long as the value.
        let bytes = self.cache.encode_for(key, value)?;
        if !self
            .inner
            .inv
            .add_dependencies_and_set(key, &deps, lifetime, &bytes)
            .await?
        {
            self.inner
                .inv
                .add_dependencies(key, &deps, Some(lifetime))
                .await?;
            self.cache.backend().set(key, bytes, lifetime).await?;
        }
        self.announce_write(key).await;
        Ok(())
    }

    /// Deletes every key that depends on `dependency`, transitively (cycle-safe, each key
    /// once per walk). `dependency` itself is not deleted. Returns how many keys the walk
    /// reached. The edges stay (declared facts): a key deleted here and cached again is reached
    /// again by the next walk; an edge ends when its key is deleted with
    /// [`invalidate`](Self::invalidate) or its lifetime (the key's TTL when declared) ends.
    pub async fn invalidate_dependencies(&self, dependency: &str) -> Result<u64> {
        self.inner.inv.invalidate_dependencies(dependency).await
    }

    /// Caches `value` under `key` and tags it; [`invalidate_tag`](Self::invalidate_tag)
    /// deletes every key carrying a tag. Tags accumulate over writes of the same key.
    pub async fn set_with_tags<V, I, K>(
        &self,
        key: &str,
        value: &V,
        ttl: impl Into<Expiry>,
        tags: I,
    ) -> Result<()>
    where
        V: Serialize + ?Sized,
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        let tags: Vec<String> = tags.into_iter().map(Into::into).collect();
        // Resolved once (jitter included): the tags live exactly as long as the value.
        let lifetime = self.cache.ttl_policy().resolve(ttl.into())?;
        let bytes = self.cache.encode_for(key, value)?;
        // Tag first: a tag pointing at a key not yet written is harmless; the reverse is not.
        self.inner.inv.add_tags(key, &tags, lifetime).await?;
        self.cache.backend().set(key, bytes, lifetime).await?;
        self.announce_write(key).await;
        Ok(())
    }

    /// These strategies' tag graph as a [`TagIndex`](ncm_cache_core::TagIndex): give it to a
    /// `MultiLevelCache` (`set_tag_index`) under these strategies, and the tags its loaders
    /// give (adaptive caching) are recorded here, so [`invalidate_tag`](Self::invalidate_tag)
    /// removes those entries. It holds the strategies weakly (no reference cycle through the
    /// cache): once they are dropped, tagging fails with `Closed`.
    pub fn tag_index(&self) -> Arc<dyn ncm_cache_core::TagIndex> {
        Arc::new(TagGraph(Arc::downgrade(&self.inner.inv)))
    }

    /// Deletes every key tagged `tag` (and the keys depending on those); returns how many.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        self.inner.inv.invalidate_tag(tag).await
    }

    /// Tells instances with their own cache that `key` changed (no-op otherwise).
    pub(crate) async fn announce_write(&self, key: &str) {
        self.inner
            .inv
            .broadcast(crate::invalidation::Broadcast::Keys {
                keys: vec![key.to_owned()],
            })
            .await;
    }

    /// After a failed cache write: removes the key so no stale value is served.
    pub(crate) async fn invalidate_after_failure(&self, key: &str, cause: &CacheError) {
        if let Err(e) = self
            .inner
            .inv
            .delete_keys(&[key.to_owned()], Kind::Key)
            .await
        {
            tracing::error!(key, cause = %cause, error = %e, "cache write failed and the key could not be invalidated: a stale value may be served until it expires");
        }
    }
}

#[cfg(feature = "redis")]
impl CacheStrategies<Serializer> {
    /// Strategies over a [`RedisCache`](ncm_cache_redis::RedisCache), coordinated through the
    /// same Redis (invalidations, dependency edges, events).
    ///
    /// Write-behind queues stay **in memory** (writes not yet persisted are lost if the
    /// process dies): for a journal on Redis Streams, build with
    /// [`builder`](Self::builder)`(..).redis(..).write_behind(WriteBehindConfig::default().durable(..))`.
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub async fn from_redis_cache(cache: &ncm_cache_redis::RedisCache) -> Result<Self> {
        Self::with_redis(cache.cache().clone(), Arc::clone(cache.redis_backend())).await
    }
}

/// [`CacheStrategies::tag_index`].
#[derive(Debug)]
struct TagGraph(std::sync::Weak<Invalidator>);

#[ncm_cache_core::async_trait]
impl ncm_cache_core::TagIndex for TagGraph {
    async fn tag(
        &self,
        key: &str,
        tags: &[String],
        ttl: Option<std::time::Duration>,
    ) -> Result<()> {
        let Some(inv) = self.0.upgrade() else {
            return Err(CacheError::Closed);
        };
        inv.add_tags(key, tags, ttl).await
    }
}
