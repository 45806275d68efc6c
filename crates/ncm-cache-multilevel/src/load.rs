//! The load path: single-flight, distributed lock, loader timeouts, fail-safe, eager refresh.

use ncm_cache_core::{CacheError, Codec, Result, ValueSource};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::cache::{CacheValue, Inner, L1Read, Loaded, Object};
use crate::stats::Counters;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl<C: Codec> Inner<C> {
    /// L1 → L2 → (single-flight) loader, with fail-safe. `None` in the result: the loader
    /// found nothing.
    pub(crate) fn get_or_load_erased<'a, T, F, Fut, E>(
        self: Arc<Self>,
        key: &'a str,
        loader: F,
    ) -> BoxFuture<'a, Result<Loaded>>
    where
        T: CacheValue,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        // Boxed so the public async fns that call this stay small types.
        Box::pin(self.get_or_load_inner::<T, F, Fut, E>(key, loader))
    }

    async fn get_or_load_inner<T, F, Fut, E>(
        self: Arc<Self>,
        key: &str,
        loader: F,
    ) -> Result<Loaded>
    where
        T: CacheValue,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let stale = match self.l1_read::<T>(key)? {
            L1Read::Fresh(v, refresh) => {
                self.counters.l1_hits.bump();
                // One background refresh per key at a time.
                if refresh && self.refreshing.begin(key) {
                    Counters::bump(&self.counters.background_refreshes);
                    let this = Arc::clone(&self);
                    let key = key.to_owned();
                    tokio::spawn(async move {
                        if let Err(e) = this
                            .load_flight::<T, _, _, E>(&key, loader, None, false)
                            .await
                        {
                            tracing::debug!(key, error = %e, "eager refresh failed");
                        }
                        this.refreshing.end(&key);
                    });
                }
                return Ok((v.map(|v| v as Object), ValueSource::L1));
            }
            L1Read::Stale(v) => v.map(|v| v as Object),
            L1Read::Miss => None,
        };
        let epoch = self.epoch.load(Ordering::Acquire);
        match self.l2_read::<T>(key).await {
            Ok(Some((v, size))) => {
                Counters::bump(&self.counters.l2_hits);
                let v = v as Object;
                self.promote(key, Arc::clone(&v), size, epoch);
                return Ok((Some(v), ValueSource::L2));
            }
            Ok(None) => Counters::bump(&self.counters.misses),
            // L2 unavailable: the loader is the source of truth; go on.
            Err(e) => tracing::debug!(key, error = %e, "L2 read failed; loading"),
        }
        self.load_flight::<T, F, Fut, E>(key, loader, stale, true)
            .await
    }

    /// Runs the load once per key (single-flight) unless stampede prevention is off.
    ///
    /// With `recheck`, the flight first looks at L1 again: a caller that missed just before
    /// an earlier flight stored its value would otherwise start a second load.
    pub(crate) async fn load_flight<T, F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        loader: F,
        stale: Option<Object>,
        recheck: bool,
    ) -> Result<Loaded>
    where
        T: CacheValue,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        // Boxed: erases the loader's future type here, keeping the caller's future small and
        // its `Send` check shallow.
        let work = {
            let this = Arc::clone(self);
            let key = key.to_owned();
            let stale = stale.clone();
            move || -> BoxFuture<'static, Result<Loaded>> {
                Box::pin(async move {
                    if recheck && let L1Read::Fresh(v, _) = this.l1_read::<T>(&key)? {
                        return Ok((v.map(|v| v as Object), ValueSource::L1));
                    }
                    this.load_with_timeouts::<T, F, Fut, E>(key, loader, stale)
                        .await
                })
            }
        };
        let result = if self.opts.enable_stampede_prevention {
            self.flight.run(key.to_owned(), work).await
        } else {
            work().await
        };
        match (result, stale) {
            (Ok(v), _) => Ok(v),
            (Err(e), Some(stale)) if self.opts.max_stale_age.is_some() => {
                tracing::warn!(key, error = %e, "serving a stale value (fail-safe)");
                Counters::bump(&self.counters.stale_served);
                Ok((Some(stale), ValueSource::Stale))
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Soft timeout: serve stale and let the load finish in the background. Hard timeout: give
    /// up with a timeout error.
    async fn load_with_timeouts<T, F, Fut, E>(
        self: Arc<Self>,
        key: String,
        loader: F,
        stale: Option<Object>,
    ) -> Result<Loaded>
    where
        T: CacheValue,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let soft = self.opts.soft_timeout.filter(|_| stale.is_some());
        let hard = self.opts.hard_timeout;
        if soft.is_none() && hard.is_none() {
            return self.load_and_store::<T, F, Fut, E>(key, loader).await;
        }
        let this = Arc::clone(&self);
        let k = key.clone();
        let mut task =
            tokio::spawn(async move { this.load_and_store::<T, F, Fut, E>(k, loader).await });
        let joined = |r: std::result::Result<Result<Loaded>, tokio::task::JoinError>| {
            r.unwrap_or_else(|e| Err(CacheError::loader(format!("loader task failed: {e}"))))
        };
        if let (Some(soft), Some(stale)) = (soft, stale) {
            match tokio::time::timeout(soft, &mut task).await {
                Ok(r) => return joined(r),
                Err(_) => {
                    // The load goes on in the background and will refresh the cache.
                    Counters::bump(&self.counters.background_refreshes);
                    Counters::bump(&self.counters.stale_served);
                    return Ok((Some(stale), ValueSource::Stale));
                }
            }
        }
        match hard {
            Some(hard) => match tokio::time::timeout(hard, &mut task).await {
                Ok(r) => joined(r),
                Err(_) => {
                    task.abort();
                    Counters::bump(&self.counters.load_errors);
                    Err(CacheError::Timeout {
                        operation: "load",
                        after: hard,
                    })
                }
            },
            None => joined(task.await),
        }
    }

    /// Runs the loader (under the distributed lock when configured) and stores its result in
    /// L2 and L1.
    async fn load_and_store<T, F, Fut, E>(self: Arc<Self>, key: String, loader: F) -> Result<Loaded>
    where
        T: CacheValue,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        // Boxed: redis-rs futures are deep; keep them out of the caller's future type.
        #[cfg(feature = "redis")]
        let _lock = {
            let wait: BoxFuture<'_, _> = Box::pin(self.lock_or_wait::<T>(&key));
            match wait.await? {
                crate::backplane::LockOutcome::Found(v) => return Ok(v),
                crate::backplane::LockOutcome::Proceed(guard) => guard,
            }
        };
        let epoch = self.epoch.load(Ordering::Acquire);
        Counters::bump(&self.counters.loads);
        let loaded = loader().await.map_err(|e| {
            Counters::bump(&self.counters.load_errors);
            CacheError::loader(e)
        })?;
        let result = match loaded {
            None => {
                if self.opts.negative_ttl.is_some() {
                    self.l1_insert(&key, None, 0, Some(epoch), true);
                }
                (None, ValueSource::Loader)
            }
            Some(v) => {
                let bytes = self.codec.encode(&v)?;
                let size = bytes.len();
                let object: Object = Arc::new(v);
                match self.l2_write(&key, bytes, self.opts.l2_default_ttl).await {
                    Ok(()) => {
                        self.l1_insert(&key, Some(Arc::clone(&object)), size, Some(epoch), false);
                        self.publish_set(&key).await;
                    }
                    // The value is still good: serve it and keep it in L1; count the failure.
                    Err(e) => {
                        tracing::warn!(key, error = %e, "loaded value not written to L2");
                        self.l1_insert(&key, Some(Arc::clone(&object)), size, Some(epoch), false);
                    }
                }
                (Some(object), ValueSource::Loader)
            }
        };
        #[cfg(feature = "redis")]
        if let Some(lock) = _lock {
            let release: BoxFuture<'_, _> = Box::pin(lock.release());
            let _ = release.await;
        }
        Ok(result)
    }
}

/// How long a waiter sleeps between L2 polls, growing from 5 ms to 100 ms.
#[cfg(feature = "redis")]
pub(crate) fn backoff(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_millis((5u64 << attempt.min(5)).min(100))
}

/// Keys with a background refresh under way.
#[derive(Debug, Default)]
pub(crate) struct Refreshing(std::sync::Mutex<std::collections::HashSet<String>>);

impl Refreshing {
    /// `true` when the caller should start the refresh (nobody else is).
    pub(crate) fn begin(&self, key: &str) -> bool {
        self.0
            .lock()
            .map(|mut set| set.insert(key.to_owned()))
            .unwrap_or(false)
    }

    pub(crate) fn end(&self, key: &str) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(key);
        }
    }
}
