//! `CacheLoader`: named loaders, typed handles, stats and health.

use std::any::type_name;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheError, CacheStrategy, Codec, Result, SingleFlight, escape_glob};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::key::{args_key, loader_key};
use crate::registry::{ErasedLoader, LoadFn, LoaderHandle, Registered};
use crate::stats::{LoaderCounters, LoaderHealth, LoaderStatsReport};
use crate::warm::WarmingState;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Loads values into a cache on demand (the original's `CacheLoader`).
///
/// Register loaders by name and call them with [`load`](Self::load): the arguments form the
/// key (`loader:{name}:{canonical JSON of the arguments}`), a hit returns the cached value, a
/// miss runs the loader once for all concurrent callers of that key
/// ([`SingleFlight`]) and caches the result for the loader's TTL. Loader errors are returned to
/// every waiting caller and never cached. If the cache itself fails, the call goes on without it
/// (fail-open, counted in [`cache_errors`](crate::LoaderStats::cache_errors)).
///
/// The attribute macros [`cache_loader`](crate::cache_loader) and
/// [`cache_method`](crate::cache_method) cache functions through a `CacheLoader` the same way;
/// [`warm_cache`](Self::warm_cache) and
/// [`start_background_warming`](Self::start_background_warming) pre-load keys. Cloning is cheap
/// and clones share everything.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_codec::Serializer;
/// use ncm_cache_core::{Cache, CacheStrategy};
/// use ncm_cache_loader::CacheLoader;
/// use ncm_cache_memory::MemoryBackend;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let cache = Cache::new(MemoryBackend::new(), Serializer::default());
/// let loader = CacheLoader::builder(cache)
///     .default_ttl(Duration::from_secs(3600))
///     .enable_metrics(true)
///     .enable_logging(true)
///     .build()?;
///
/// loader.register_loader(
///     "user_data",
///     |user_id: u64| async move { Ok::<_, std::io::Error>(format!("user {user_id}")) },
///     Duration::from_secs(3600),
///     CacheStrategy::CacheAside,
/// )?;
///
/// let user: String = loader.load("user_data", 123u64).await?;
/// assert_eq!(user, "user 123");
/// let again: String = loader.load("user_data", 123u64).await?; // from the cache
/// assert_eq!(loader.get_loader_stats().loaders["user_data"].hits, 1);
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
pub struct CacheLoader<C = Serializer> {
    pub(crate) inner: Arc<Inner<C>>,
}

pub(crate) struct Inner<C> {
    pub(crate) cache: Cache<C>,
    pub(crate) default_ttl: Duration,
    pub(crate) enable_logging: bool,
    enable_metrics: bool,
    max_error_rate: f64,
    pub(crate) flight: SingleFlight<String, Option<Bytes>>,
    pub(crate) registry: RwLock<HashMap<String, Arc<dyn ErasedLoader<C>>>>,
    counters: RwLock<HashMap<String, Arc<LoaderCounters>>>,
    pub(crate) warming: WarmingState,
    /// Write-behind stores in flight, which an invalidation through the loader waits for.
    pub(crate) pending: Arc<crate::pending::PendingStores>,
}

impl<C> Clone for CacheLoader<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for CacheLoader<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLoader")
            .field("cache", &self.inner.cache)
            .field("default_ttl", &self.inner.default_ttl)
            .field("loaders", &read(&self.inner.registry).len())
            .finish_non_exhaustive()
    }
}

/// Builds a [`CacheLoader`] (the original's `CacheLoader(cache, default_ttl, enable_metrics,
/// enable_logging)`).
#[derive(Debug)]
#[must_use]
pub struct CacheLoaderBuilder<C> {
    cache: Cache<C>,
    default_ttl: Duration,
    enable_metrics: bool,
    enable_logging: bool,
    max_error_rate: f64,
}

impl<C: Codec> CacheLoaderBuilder<C> {
    /// The TTL of loaders registered without one, and of annotated functions without `ttl`
    /// (default 1 hour).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Collects per-loader statistics and emits them through `metrics` (default on).
    pub fn enable_metrics(mut self, on: bool) -> Self {
        self.enable_metrics = on;
        self
    }

    /// Logs loads, and cache failures the loader went on without, through `tracing`
    /// (default on).
    pub fn enable_logging(mut self, on: bool) -> Self {
        self.enable_logging = on;
        self
    }

    /// The error rate (errors per call) above which [`CacheLoader::get_health_status`]
    /// reports unhealthy (default 0.1).
    pub fn max_error_rate(mut self, rate: f64) -> Self {
        self.max_error_rate = if rate.is_finite() { rate.max(0.0) } else { 0.1 };
        self
    }

    /// Builds the loader. Fails with [`CacheError::InvalidArgument`] when `default_ttl` is
    /// zero.
    pub fn build(self) -> Result<CacheLoader<C>> {
        if self.default_ttl.is_zero() {
            return Err(CacheError::InvalidArgument(
                "a loader's default_ttl must be greater than zero".into(),
            ));
        }
        Ok(self.finish())
    }

    fn finish(self) -> CacheLoader<C> {
        CacheLoader {
            inner: Arc::new(Inner {
                cache: self.cache,
                default_ttl: self.default_ttl,
                enable_logging: self.enable_logging,
                enable_metrics: self.enable_metrics,
                max_error_rate: self.max_error_rate,
                flight: SingleFlight::new(),
                registry: RwLock::new(HashMap::new()),
                counters: RwLock::new(HashMap::new()),
                warming: WarmingState::default(),
                pending: Arc::default(),
            }),
        }
    }
}

impl<C: Codec> CacheLoader<C> {
    /// A loader over `cache` with the defaults: 1 hour TTL, metrics and logging on.
    pub fn new(cache: Cache<C>) -> Self {
        Self::builder(cache).finish()
    }

    /// A builder over `cache`.
    pub fn builder(cache: Cache<C>) -> CacheLoaderBuilder<C> {
        CacheLoaderBuilder {
            cache,
            default_ttl: Duration::from_secs(3600),
            enable_metrics: true,
            enable_logging: true,
            max_error_rate: 0.1,
        }
    }

    /// The cache values are loaded into.
    pub fn cache(&self) -> &Cache<C> {
        &self.inner.cache
    }

    /// The TTL used when none is given.
    pub fn default_ttl(&self) -> Duration {
        self.inner.default_ttl
    }

    /// Registers (or replaces) the loader `name`: `f(args)` loads the value for `args`, which is
    /// cached for `ttl` (`None`: the default TTL) under `strategy` (see the crate docs for what
    /// each strategy means for a loader). Returns a typed handle; the by-name
    /// [`load`](Self::load) works as well.
    ///
    /// Arguments of several values are a tuple (`|(id, lang): (u64, String)| ...`). They are
    /// `Serialize` (they form the key) and `DeserializeOwned` (warming configs name them as
    /// JSON).
    pub fn register_loader<A, T, F, Fut, E>(
        &self,
        name: &str,
        f: F,
        ttl: impl Into<Option<Duration>>,
        strategy: CacheStrategy,
    ) -> Result<LoaderHandle<A, T, C>>
    where
        A: Serialize + DeserializeOwned + Send + 'static,
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        if name.is_empty() {
            return Err(CacheError::InvalidArgument(
                "a loader name must not be empty".into(),
            ));
        }
        let ttl = ttl.into();
        if ttl.is_some_and(|t| t.is_zero()) {
            return Err(CacheError::InvalidArgument(format!(
                "loader {name:?}: the TTL must be greater than zero"
            )));
        }
        check_strategy(name, strategy)?;
        let f = Arc::new(f);
        let load: Box<LoadFn<A, T>> = Box::new(move |args| {
            let f = Arc::clone(&f);
            Box::pin(async move { f(args).await.map_err(CacheError::loader) })
        });
        let registered = Arc::new(Registered::new(
            name,
            ttl,
            strategy,
            self.counters(name),
            load,
        ));
        let erased: Arc<dyn ErasedLoader<C>> = registered.clone();
        if write(&self.inner.registry)
            .insert(name.to_owned(), erased)
            .is_some()
            && self.inner.enable_logging
        {
            tracing::debug!(loader = name, "loader replaced");
        }
        Ok(LoaderHandle::new(self.clone(), registered))
    }

    /// Loads through the loader registered as `name` (the original's `load(name, **args)`).
    ///
    /// Fails with [`CacheError::InvalidArgument`] when no loader has that name or it was
    /// registered with other argument or value types; with [`CacheError::Loader`] when the
    /// loader failed.
    pub async fn load<A, T>(&self, name: &str, args: A) -> Result<T>
    where
        A: Serialize + Send + 'static,
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        let erased = self.registered(name)?;
        let registered = erased
            .as_any()
            .downcast_ref::<Registered<A, T>>()
            .ok_or_else(|| {
                let (a, t) = erased.signature();
                CacheError::InvalidArgument(format!(
                    "loader {name:?} takes `{a}` and returns `{t}`, but was called with `{}` \
                     for `{}`",
                    type_name::<A>(),
                    type_name::<T>()
                ))
            })?;
        registered.load(self, args, false).await
    }

    /// Loads through the loader registered as `name` with named arguments — the original's
    /// `load(name, **kwargs)`: `kwargs` (a JSON object) are the fields of the loader's struct
    /// argument. Cached and single-flight like [`load`](Self::load), under the same key.
    ///
    /// ```
    /// # use ncm_cache_core::{Cache, CacheStrategy};
    /// # use ncm_cache_loader::CacheLoader;
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let cache = Cache::new(ncm_cache_memory::MemoryBackend::new(), ncm_cache_codec::Serializer::default());
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Search { query: String, limit: u32 }
    /// let loader = CacheLoader::new(cache);
    /// loader.register_loader(
    ///     "search",
    ///     |s: Search| async move { Ok::<_, std::io::Error>(vec![s.query; s.limit as usize]) },
    ///     None,
    ///     CacheStrategy::CacheAside,
    /// )?;
    /// let hits: Vec<String> = loader
    ///     .load_named("search", serde_json::json!({"query": "rust", "limit": 2}))
    ///     .await?;
    /// assert_eq!(hits.len(), 2);
    /// # Ok::<(), ncm_cache_core::CacheError>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    ///
    /// [`CacheError::InvalidArgument`] when no loader has that name, `kwargs` is not an object
    /// or does not fit the loader's argument, or `T` is not the loader's value type; the
    /// loader's own error otherwise.
    pub async fn load_named<T>(&self, name: &str, kwargs: serde_json::Value) -> Result<T>
    where
        T: Send + 'static,
    {
        let erased = self.registered(name)?;
        let serde_json::Value::Object(kwargs) = kwargs else {
            return Err(CacheError::InvalidArgument(format!(
                "named arguments for loader {name:?} must be a JSON object"
            )));
        };
        if erased.value_type() != std::any::TypeId::of::<T>() {
            let (a, t) = erased.signature();
            return Err(CacheError::InvalidArgument(format!(
                "loader {name:?} takes `{a}` and returns `{t}`, not `{}`",
                type_name::<T>()
            )));
        }
        let value = erased
            .load_json(self, serde_json::Value::Null, kwargs)
            .await?;
        value.downcast::<T>().map(|v| *v).map_err(|_| {
            CacheError::InvalidArgument(format!("loader {name:?} returned another type"))
        })
    }

    /// Removes the cached value of one call of `name`; `true` when it was cached.
    ///
    /// A `WriteBehind` load of it through this loader that returned before this call has its
    /// store land first (this waits for it, at most 10 s), so that store cannot bring the
    /// value back, whatever the backend. Stores of other loaders or processes, and deletes
    /// made on the cache directly, are not waited for.
    pub async fn invalidate<A: Serialize + ?Sized>(&self, name: &str, args: &A) -> Result<bool> {
        self.invalidate_key(&loader_key(name, &args_key(args)?))
            .await
    }

    /// Removes one loader key, after the write-behind stores of it begun before this call.
    pub(crate) async fn invalidate_key(&self, key: &str) -> Result<bool> {
        self.inner.pending.settled(key).await;
        self.inner.cache.delete(key).await
    }

    /// Removes every cached value of `name`; returns how many.
    ///
    /// The pattern is `loader:{name}:*`, so it also removes the values of loaders whose name
    /// begins with `{name}:` (`invalidate_all("user")` removes `user:profile`'s too): only
    /// misses for them, but give loaders names that do not extend one another where that
    /// matters.
    pub async fn invalidate_all(&self, name: &str) -> Result<u64> {
        // The write-behind stores of its keys begun before this call land first.
        self.inner
            .pending
            .settled_under(&loader_key(name, ""))
            .await;
        self.inner
            .cache
            .clear_pattern(&loader_key(&escape_glob(name), "*"))
            .await
    }

    /// The names of the registered loaders, sorted.
    pub fn loader_names(&self) -> Vec<String> {
        let mut names: Vec<String> = read(&self.inner.registry).keys().cloned().collect();
        names.sort();
        names
    }

    /// Per-loader and overall statistics (the original's `get_loader_stats()`).
    pub fn get_loader_stats(&self) -> LoaderStatsReport {
        let loaders: BTreeMap<_, _> = read(&self.inner.counters)
            .iter()
            .map(|(name, c)| (name.clone(), c.snapshot()))
            .collect();
        LoaderStatsReport::from_loaders(loaders)
    }

    /// Probes the backend and checks the error rate (the original's `get_health_status()`).
    pub async fn get_health_status(&self) -> LoaderHealth {
        let backend = self.inner.cache.health_report().await;
        let stats = self.get_loader_stats();
        let error_rate = stats.total.error_rate();
        let max_error_rate = self.inner.max_error_rate;
        let mut issues = Vec::new();
        if !backend.healthy {
            issues.push(format!(
                "backend {} is unreachable: {}",
                backend.backend, backend.detail
            ));
        }
        if error_rate > max_error_rate {
            issues.push(format!(
                "error rate {:.1}% is above the maximum of {:.1}%",
                error_rate * 100.0,
                max_error_rate * 100.0
            ));
        }
        LoaderHealth {
            is_healthy: issues.is_empty(),
            backend_healthy: backend.healthy,
            backend,
            error_rate,
            max_error_rate,
            registered_loaders: read(&self.inner.registry).len(),
            background_warming: self.is_background_warming(),
            warming_rounds: self.warming_rounds(),
            issues,
        }
    }

    /// The counters of `name`, created on first use (shared by a registered loader and by an
    /// annotated function of the same name).
    pub(crate) fn counters(&self, name: &str) -> Arc<LoaderCounters> {
        if let Some(c) = read(&self.inner.counters).get(name) {
            return Arc::clone(c);
        }
        let mut map = write(&self.inner.counters);
        Arc::clone(
            map.entry(name.to_owned())
                .or_insert_with(|| Arc::new(LoaderCounters::new(name, self.inner.enable_metrics))),
        )
    }

    pub(crate) fn registered(&self, name: &str) -> Result<Arc<dyn ErasedLoader<C>>> {
        read(&self.inner.registry)
            .get(name)
            .cloned()
            .ok_or_else(|| CacheError::InvalidArgument(format!("no loader registered as {name:?}")))
    }
}

pub(crate) fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Every critical section is a single map operation: a panic cannot leave it inconsistent.
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A loader reads; [`CacheStrategy::WriteThrough`] is about writes (to a store, then the
/// cache) and has no meaning here: refused rather than silently treated as another strategy.
pub(crate) fn check_strategy(name: &str, strategy: CacheStrategy) -> Result<()> {
    if strategy == CacheStrategy::WriteThrough {
        return Err(CacheError::InvalidArgument(format!(
            "loader {name:?}: WriteThrough is a write strategy (use CacheStrategies::write_through \
             for writes); a loader takes CacheAside (the default: a failing cache is skipped), \
             ReadThrough (a failing cache fails the call), WriteBehind (the loaded value is \
             cached in the background) or WriteAround (loaded values are not cached)"
        )));
    }
    Ok(())
}
