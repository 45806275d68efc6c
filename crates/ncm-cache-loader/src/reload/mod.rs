//! `CacheReloader`: named values kept fresh by lazy, eager or refresh-ahead reloading.

mod entry;
mod run;
mod schedule;

use std::any::{TypeId, type_name};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheError, Codec, Result, SingleFlight};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use self::entry::ReloadStats;
use self::entry::{Entry, erase_loader};
use self::schedule::Task;
use crate::lease::{LeaseProvider, LocalLeases};
use crate::loader::{read, write};

/// When a [`CacheReloader`] reloads a value (the original's `ReloadStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum ReloadStrategy {
    /// Reload when the value is read after it expired (the reader waits for the load).
    #[default]
    Lazy,
    /// Reload on a timer before the value expires (at the reloader's `eager_fraction` of the
    /// TTL, 80 % by default — of the shortest TTL the cache's `ttl_jitter` may give it), so
    /// readers never miss. Across instances on Redis the timer has
    /// one owner; when it dies, another instance takes over and reloads before the value
    /// expires, provided a load plus the run lease ([`lock_ttl`](CacheReloaderBuilder::lock_ttl))
    /// fit in what is left of the TTL at the reload point minus 1.5 × the timer lease (a
    /// quarter of that remaining time, at most 15 s).
    Eager,
    /// Serve the cached value, and reload it in the background when it is read after
    /// `fraction` of its TTL has passed (0 < fraction < 1; 0.8 is usual).
    RefreshAhead {
        /// The part of the TTL after which a read triggers a background reload.
        fraction: f64,
    },
}

impl ReloadStrategy {
    /// `RefreshAhead` at 80 % of the TTL.
    pub const fn refresh_ahead() -> Self {
        Self::RefreshAhead { fraction: 0.8 }
    }
}

/// Keeps named values fresh in a cache (the original's `CacheReloader`).
///
/// Each registered name is one cache key holding the value its loader returns. Reads go
/// through [`get`](Self::get); the [`ReloadStrategy`] decides when the loader runs.
/// [`schedule_reload`](Self::schedule_reload) reloads on a fixed interval,
/// [`reload_key`](Self::reload_key) on demand, and callbacks see every new value.
///
/// Concurrent reloads of a name in one process run once ([`SingleFlight`]). With
/// [`RedisLeases`](crate::RedisLeases) (feature `redis`), instances sharing a Redis also
/// coordinate: one instance at a time reloads a given key (a lease `reload:{name}:run` with a
/// TTL), and each schedule has one owner (a lease `reload:{name}` renewed on every tick), so a
/// scheduled tick runs the loader once in total.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_codec::Serializer;
/// use ncm_cache_core::Cache;
/// use ncm_cache_loader::{CacheReloader, ReloadStrategy};
/// use ncm_cache_memory::MemoryBackend;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let reloader = CacheReloader::new(Cache::new(MemoryBackend::new(), Serializer::default()));
/// reloader.register_loader(
///     "fresh_data",
///     || async { Ok::<_, std::io::Error>("Fresh data".to_string()) },
///     Duration::from_secs(300),
///     ReloadStrategy::Lazy,
/// )?;
/// reloader.add_reload_callback("fresh_data", |key: &str, value: &String| {
///     println!("Reloaded {key}: {value}");
/// })?;
/// let value: String = reloader.get("fresh_data").await?;
/// assert_eq!(value, "Fresh data");
/// assert!(reloader.reload_key("fresh_data", true).await?);
/// reloader.shutdown().await;
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
pub struct CacheReloader<C = Serializer> {
    pub(crate) inner: Arc<Inner<C>>,
}

pub(crate) struct Inner<C> {
    pub(crate) cache: Cache<C>,
    pub(crate) leases: Arc<dyn LeaseProvider>,
    pub(crate) default_ttl: Duration,
    pub(crate) eager_fraction: f64,
    pub(crate) lock_ttl: Duration,
    pub(crate) lock_wait: Duration,
    pub(crate) logging: bool,
    pub(crate) flight: SingleFlight<String, (Bytes, bool)>,
    pub(crate) entries: RwLock<HashMap<String, Arc<Entry>>>,
    pub(crate) tasks: Mutex<HashMap<String, Task>>,
}

impl<C> Clone for CacheReloader<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for CacheReloader<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheReloader")
            .field("cache", &self.inner.cache)
            .field("leases", &self.inner.leases)
            .field("entries", &read(&self.inner.entries).len())
            .finish_non_exhaustive()
    }
}

/// Builds a [`CacheReloader`].
#[derive(Debug)]
#[must_use]
pub struct CacheReloaderBuilder<C> {
    cache: Cache<C>,
    leases: Arc<dyn LeaseProvider>,
    default_ttl: Duration,
    eager_fraction: f64,
    lock_ttl: Duration,
    lock_wait: Duration,
    logging: bool,
}

impl<C: Codec> CacheReloaderBuilder<C> {
    /// Who may reload across instances (default [`LocalLeases`]: this process only).
    pub fn leases(mut self, leases: impl LeaseProvider) -> Self {
        self.leases = Arc::new(leases);
        self
    }

    /// The TTL of names first seen by [`CacheReloader::schedule_reload`] (default 5 minutes).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        if !ttl.is_zero() {
            self.default_ttl = ttl;
        }
        self
    }

    /// When an [`Eager`](ReloadStrategy::Eager) value is reloaded, as a part of its TTL
    /// (clamped to 0.05–0.95; default 0.8).
    pub fn eager_fraction(mut self, fraction: f64) -> Self {
        if fraction.is_finite() {
            self.eager_fraction = fraction.clamp(0.05, 0.95);
        }
        self
    }

    /// The TTL of the lease held while one instance reloads a key (default 10 s), renewed
    /// every third of it while the load runs (a longer load keeps it): a crashed instance
    /// blocks the others' reloads of that key for at most this long.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        if !ttl.is_zero() {
            self.lock_ttl = ttl;
        }
        self
    }

    /// How long a reader waits for another instance's reload of the same key before loading
    /// itself (default 5 s).
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// Logs reloads and failures through `tracing` (default on).
    pub fn enable_logging(mut self, on: bool) -> Self {
        self.logging = on;
        self
    }

    /// Builds the reloader.
    pub fn build(self) -> CacheReloader<C> {
        CacheReloader {
            inner: Arc::new(Inner {
                cache: self.cache,
                leases: self.leases,
                default_ttl: self.default_ttl,
                eager_fraction: self.eager_fraction,
                lock_ttl: self.lock_ttl,
                lock_wait: self.lock_wait,
                logging: self.logging,
                flight: SingleFlight::new(),
                entries: RwLock::new(HashMap::new()),
                tasks: Mutex::new(HashMap::new()),
            }),
        }
    }
}

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
impl CacheReloader<Serializer> {
    /// A builder over a Redis cache with [`RedisLeases`](crate::RedisLeases) on the same
    /// server, so instances sharing it coordinate their reloads.
    pub fn redis(cache: &ncm_cache_redis::RedisCache) -> CacheReloaderBuilder<Serializer> {
        CacheReloader::builder(cache.cache().clone())
            .leases(crate::RedisLeases::new(Arc::clone(cache.redis_backend())))
    }
}

impl<C: Codec> CacheReloader<C> {
    /// A reloader over `cache` for this process only ([`LocalLeases`]).
    pub fn new(cache: Cache<C>) -> Self {
        Self::builder(cache).build()
    }

    /// A builder over `cache`.
    pub fn builder(cache: Cache<C>) -> CacheReloaderBuilder<C> {
        CacheReloaderBuilder {
            cache,
            leases: Arc::new(LocalLeases),
            default_ttl: Duration::from_secs(300),
            eager_fraction: 0.8,
            lock_ttl: Duration::from_secs(10),
            lock_wait: Duration::from_secs(5),
            logging: true,
        }
    }

    /// The cache the values live in (each under its name).
    pub fn cache(&self) -> &Cache<C> {
        &self.inner.cache
    }

    /// Registers (or replaces) the value `name`: `f()` loads it, it lives for `ttl` (`None`:
    /// the default TTL), and `strategy` decides when it is reloaded. An
    /// [`Eager`](ReloadStrategy::Eager) value is loaded at once in the background and then
    /// before each expiry, which needs a running tokio runtime.
    pub fn register_loader<T, F, Fut, E>(
        &self,
        name: &str,
        f: F,
        ttl: impl Into<Option<Duration>>,
        strategy: ReloadStrategy,
    ) -> Result<()>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        if name.is_empty() {
            return Err(CacheError::InvalidArgument(
                "a reload name must not be empty".into(),
            ));
        }
        let ttl = ttl.into().unwrap_or(self.inner.default_ttl);
        if ttl.is_zero() {
            return Err(CacheError::InvalidArgument(format!(
                "{name:?}: the TTL must be greater than zero"
            )));
        }
        if let ReloadStrategy::RefreshAhead { fraction } = strategy
            && !(fraction > 0.0 && fraction < 1.0)
        {
            return Err(CacheError::InvalidArgument(format!(
                "{name:?}: the refresh-ahead fraction must be between 0 and 1, got {fraction}"
            )));
        }
        let runtime = match strategy {
            ReloadStrategy::Eager => Some(tokio::runtime::Handle::try_current().map_err(|_| {
                CacheError::Config("an Eager reload needs a running tokio runtime".into())
            })?),
            _ => None,
        };
        let entry = Arc::new(Entry::new::<T>(
            name,
            ttl,
            strategy,
            erase_loader(self.inner.cache.clone(), name, f),
        ));
        write(&self.inner.entries).insert(name.to_owned(), Arc::clone(&entry));
        // A replaced entry's eager timer stops; a new one starts for an Eager entry.
        self.stop_task(&schedule::eager_task(name));
        if let Some(runtime) = runtime {
            // Of the shortest TTL the cache may give the value: with `ttl_jitter(j)` a stored
            // TTL can be cut to (1 - j) × ttl, and a timer at a fraction of the full TTL let the
            // value expire before its reload (review, helper-71: readers missed).
            // (Capped first: `Duration::MAX` × 1.0 overflows in `mul_f64`, found by the hostile
            // configuration test.)
            let shortest =
                ncm_cache_core::capped(ttl).mul_f64(1.0 - self.inner.cache.ttl_policy().jitter());
            let every = shortest.mul_f64(self.inner.eager_fraction);
            self.spawn_task(&runtime, schedule::eager_task(name), name, every, true);
        }
        Ok(())
    }

    /// Calls `callback(name, &value)` after every reload of `name` on this instance (the
    /// original's `add_reload_callback`). The value type must be the registered one.
    pub fn add_reload_callback<T, F>(&self, name: &str, callback: F) -> Result<()>
    where
        T: 'static,
        F: Fn(&str, &T) + Send + Sync + 'static,
    {
        let entry = self.entry(name)?;
        entry.check_type::<T>()?;
        entry.add_callback(Arc::new(move |key, value| {
            if let Some(value) = value.downcast_ref::<T>() {
                callback(key, value);
            }
        }));
        Ok(())
    }

    /// Reloads `name` every `interval` with `loader` (the original's
    /// `schedule_reload(key, interval, loader)`), replacing a previous schedule of the name.
    /// `loader` also becomes the name's loader; a name not registered yet is registered as
    /// [`Lazy`](ReloadStrategy::Lazy) with the default TTL. Across instances with Redis leases
    /// the schedule has one owner, so each tick runs the loader once in total.
    pub async fn schedule_reload<T, F, Fut, E>(
        &self,
        name: &str,
        interval: Duration,
        loader: F,
    ) -> Result<()>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        if interval.is_zero() {
            return Err(CacheError::InvalidArgument(
                "a reload interval must be greater than zero".into(),
            ));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            CacheError::Config("schedule_reload needs a running tokio runtime".into())
        })?;
        match self.entry(name) {
            Ok(entry) => {
                entry.check_type::<T>()?;
                entry.set_loader(erase_loader(self.inner.cache.clone(), name, loader));
            }
            Err(_) => self.register_loader(name, loader, None, ReloadStrategy::Lazy)?,
        }
        let task = schedule::scheduled_task(name);
        self.cancel_task(&task).await;
        self.spawn_task(&runtime, task, name, interval, false);
        Ok(())
    }

    /// Stops the scheduled reload of `name` and waits for its task to end; `false` when none
    /// was scheduled. The schedule's lease is released so another instance can take it over.
    pub async fn cancel_reload(&self, name: &str) -> bool {
        self.cancel_task(&schedule::scheduled_task(name)).await
    }

    /// Stops every timer (eager and scheduled) and waits until their tasks have ended.
    pub async fn shutdown(&self) {
        let tasks: Vec<Task> = schedule::lock(&self.inner.tasks)
            .drain()
            .map(|(_, t)| t)
            .collect();
        for task in tasks {
            task.stop().await;
        }
    }

    /// Statistics of `name` on this instance.
    pub fn stats(&self, name: &str) -> Option<ReloadStats> {
        read(&self.inner.entries).get(name).map(|e| e.stats())
    }

    /// Statistics of every registered name on this instance.
    pub fn get_stats(&self) -> BTreeMap<String, ReloadStats> {
        read(&self.inner.entries)
            .iter()
            .map(|(name, e)| (name.clone(), e.stats()))
            .collect()
    }

    pub(crate) fn entry(&self, name: &str) -> Result<Arc<Entry>> {
        read(&self.inner.entries).get(name).cloned().ok_or_else(|| {
            CacheError::InvalidArgument(format!("no reload loader registered as {name:?}"))
        })
    }
}

impl Entry {
    pub(crate) fn check_type<T: 'static>(&self) -> Result<()> {
        if self.value_type == TypeId::of::<T>() {
            Ok(())
        } else {
            Err(CacheError::InvalidArgument(format!(
                "{:?} holds `{}`, not `{}`",
                self.name,
                self.value_type_name,
                type_name::<T>()
            )))
        }
    }
}
