//! Reading and reloading: `get`, `reload_key`, and the one reload path they share.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use ncm_cache_core::{CacheError, Codec, Expiry, KeyTtl, Result};
use serde::de::DeserializeOwned;

use super::entry::{Entry, bump};
use super::{CacheReloader, ReloadStrategy};
use crate::lease::Lease;

/// The outcome of a reload request.
pub(crate) struct Reloaded {
    /// The value's encoding (fresh, or found already in the cache).
    pub(crate) bytes: Bytes,
    /// The value, when this caller ran the loader.
    pub(crate) value: Option<Box<dyn Any + Send>>,
    /// Whether a loader ran (here or in the flight this caller joined).
    pub(crate) ran: bool,
}

impl<C: Codec> CacheReloader<C> {
    /// Reads the value of `name`, loading or reloading it as its [`ReloadStrategy`] says.
    ///
    /// Fails with [`CacheError::InvalidArgument`] when `name` is not registered or holds
    /// another type, and with the loader's error when a needed load failed (errors are never
    /// cached). If the cache is down, the loader's value is returned uncached (fail-open).
    pub async fn get<T: DeserializeOwned + 'static>(&self, name: &str) -> Result<T> {
        let entry = self.entry(name)?;
        entry.check_type::<T>()?;
        bump(&entry.counters.reads);
        let cache = &self.inner.cache;
        let (found, remaining) = match entry.strategy {
            ReloadStrategy::RefreshAhead { fraction } if !entry.refresh_not_due() => {
                let (value, ttl) =
                    tokio::join!(cache.get_for_load::<T>(name), cache.ttl_state(name));
                if let Ok(KeyTtl::Expires(left)) = ttl {
                    entry.note_ttl_left(left, fraction);
                }
                (value, ttl.ok())
            }
            _ => (cache.get_for_load::<T>(name).await, None),
        };
        // A fail-safe backend's stale copy (its shared store failed): served only if the
        // reload fails too.
        let mut stale = None;
        let cached = match found {
            Ok(ncm_cache_core::Found::Value(value)) => Ok(Some(value)),
            Ok(ncm_cache_core::Found::Stale(bytes, e)) => {
                stale = Some(bytes);
                Err(e)
            }
            // Nothing in the shared store; the copy is served only if the reload fails.
            Ok(ncm_cache_core::Found::Expired(bytes)) => {
                stale = Some(bytes);
                Ok(None)
            }
            Ok(_) => Ok(None),
            Err(e) => Err(e),
        };
        match cached {
            Ok(Some(value)) => {
                bump(&entry.counters.hits);
                if let (ReloadStrategy::RefreshAhead { fraction }, Some(KeyTtl::Expires(left))) =
                    (entry.strategy, remaining)
                    // Capped first: `Duration::MAX` × 1.0 (a fraction so small that
                    // `1 - fraction` rounds to 1) overflows in `mul_f64` (review, helper-83 #3).
                    && left <= ncm_cache_core::capped(entry.ttl).mul_f64(1.0 - fraction)
                {
                    self.refresh_in_background(&entry);
                }
                return Ok(value);
            }
            Ok(None) => {}
            Err(e) => self.log_cache_error(&entry, "get", &e),
        }
        bump(&entry.counters.misses);
        let reloaded = match self.reload_entry(&entry, Force::No, None).await {
            Ok(reloaded) => reloaded,
            Err(e) => {
                return cache
                    .stale_after_load::<T>(name, stale.as_ref())
                    .await
                    .ok_or(e);
            }
        };
        match reloaded.value.map(|v| v.downcast::<T>()) {
            Some(Ok(value)) => Ok(*value),
            _ => cache.decode_for::<T>(name, &reloaded.bytes),
        }
    }

    /// Reloads `name` now (the original's `reload_key(key, force)`): with `force`, always;
    /// without, only when the value is missing or expired. Returns `true` when a loader ran.
    ///
    /// # Errors
    ///
    /// The loader's error; and with `force`, a retryable [`CacheError::Timeout`] when another
    /// reload of `name` (of another instance, or a lazy load of this one) held the run lease
    /// for all of `lock_wait`: its value may come from a source read older than this call,
    /// so it is neither taken nor raced — retry.
    pub async fn reload_key(&self, name: &str, force: bool) -> Result<bool> {
        let entry = self.entry(name)?;
        let force = if force { Force::Explicit } else { Force::No };
        Ok(self.reload_entry(&entry, force, None).await?.ran)
    }

    /// Starts a background reload of `entry` unless one is already running.
    fn refresh_in_background(&self, entry: &Arc<Entry>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if entry.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        bump(&entry.counters.refresh_ahead);
        // A value younger than the refresh point (another instance refreshed it while this one
        // waited for the run lease) is taken, not loaded again: each instance that read the old
        // value late in its TTL ran the loader once in turn (review, helper-71).
        // (With `ttl_jitter` j, a value is stored for as little as (1 - j) × its TTL and looks up
        // to j × TTL older than it is: one just written counts as fresh up to that age.)
        let jitter = self.inner.cache.ttl_policy().jitter();
        let fresh = match entry.strategy {
            ReloadStrategy::RefreshAhead { fraction } => {
                Some(ncm_cache_core::capped(entry.ttl).mul_f64(fraction.max(jitter)))
            }
            _ => None,
        };
        let (reloader, entry) = (self.clone(), Arc::clone(entry));
        runtime.spawn(async move {
            // Cleared however the refresh ends (also cancelled at runtime shutdown).
            let _done = Refreshed(&entry);
            // Errors are counted and logged in `reload_entry`; readers keep the old value.
            let _ = reloader.reload_entry(&entry, Force::Timer, fresh).await;
        });
    }

    /// The one reload path: once per name in this process (single-flight), once across
    /// instances (the `reload:{name}:run` lease). Without `force`, a value already in the
    /// cache is returned instead of reloading; with `fresh_within`, a value written less than
    /// that long ago (by another instance's reload that held the run lease while this one
    /// waited for it) is returned instead of reloading, even with `force`.
    ///
    /// A forced reload that joined another one in this process (begun before it, so its
    /// loader may have read the source before this call) runs once more: it then leads, or
    /// joins one begun after it. Concurrent forced reloads thus share that later run.
    pub(crate) async fn reload_entry(
        &self,
        entry: &Arc<Entry>,
        force: Force,
        fresh_within: Option<Duration>,
    ) -> Result<Reloaded> {
        // Also when the joined flight failed: its error is as old as its source read.
        let (reloaded, joined) = self.reload_flight(entry, force, fresh_within).await;
        if force != Force::No && joined {
            return self.reload_flight(entry, force, fresh_within).await.0;
        }
        reloaded
    }

    /// One flight of [`reload_entry`](Self::reload_entry), and whether this caller joined
    /// another caller's flight.
    async fn reload_flight(
        &self,
        entry: &Arc<Entry>,
        force: Force,
        fresh_within: Option<Duration>,
    ) -> (Result<Reloaded>, bool) {
        let explicit = force == Force::Explicit;
        let force = force != Force::No;
        // Forced and lazy reloads fly separately: a forced reload never settles for a value
        // that a lazy one merely found. A lazy flight is named by the value's load mark now,
        // as `CacheLoader`'s are: a read after an invalidation or write of the value on this
        // instance never joins a load begun before it (whose source read may be older).
        let flight_key = if force {
            format!("{}\u{0}force", entry.name)
        } else {
            ncm_cache_core::LoadMark::flight_key(
                &entry.name,
                self.inner.cache.load_mark(&entry.name),
            )
        };
        let mut slot: Option<Box<dyn Any + Send>> = None;
        let (result, ran_here) = {
            let slot = &mut slot;
            self.inner
                .flight
                .run_with_role(flight_key, || async move {
                    let (lease, granted) = self.run_lease(entry).await;
                    // Another instance's reload, begun before this call (its source read may
                    // be older), held the lease all of `lock_wait`: an explicit forced reload
                    // neither settles for what that one stores nor loads beside it (whichever
                    // store landed last would win). The caller may retry.
                    if explicit && !granted {
                        return Err(CacheError::Timeout {
                            operation: "reload_key (another instance's reload holds the run lease; retry)",
                            after: self.inner.lock_wait,
                        });
                    }
                    // Lazy reads, and anyone who waited out another instance's reload, take a
                    // value that is already there.
                    // (Only bytes this build can read: an entry left in place because a newer
                    // build wrote it is a miss, and the load below overwrites it.)
                    // A lazy load that found the value absent stores it only while it is still
                    // absent (a write by any instance since is at least as new); a forced one,
                    // or one after an entry it could not read, replaces it.
                    let mut after_miss = false;
                    if !force || !granted || self.written_within(entry, fresh_within).await {
                        // A fail-safe copy is no value stored since: the read failed.
                        match self.inner.cache.backend().get_for_load(&entry.name).await {
                            Ok(ncm_cache_core::LoadRead::Hit(bytes))
                                if self
                                    .inner
                                    .cache
                                    .decode_for::<serde::de::IgnoredAny>(&entry.name, &bytes)
                                    .is_ok() =>
                            {
                                release(lease).await;
                                return Ok((bytes, false));
                            }
                            // A timer or refresh-ahead that waited out another instance's
                            // reload and finds nothing does not load beside it either.
                            Ok(
                                ncm_cache_core::LoadRead::Miss
                                | ncm_cache_core::LoadRead::Expired { .. },
                            ) if force && !granted => {
                                return Err(CacheError::Timeout {
                                    operation: "reload (another instance's reload holds the run lease)",
                                    after: self.inner.lock_wait,
                                });
                            }
                            Ok(
                                ncm_cache_core::LoadRead::Miss
                                | ncm_cache_core::LoadRead::Expired { .. },
                            ) => after_miss = !force,
                            // A read that failed (or an entry this build cannot read) beside
                            // another instance's reload: a timer or refresh-ahead does not load
                            // beside it either, and a lazy load stores only while the key is
                            // absent — its plain store could land after the holder's (review,
                            // helper-86 #2: it stored beside it, without the lease).
                            Ok(_) | Err(_) if !granted => {
                                if force {
                                    return Err(CacheError::Timeout {
                                        operation: "reload (another instance's reload holds the run lease)",
                                        after: self.inner.lock_wait,
                                    });
                                }
                                after_miss = true;
                            }
                            Ok(_) | Err(_) => {}
                        }
                    }
                    // A load longer than the lease keeps it: renewed every third of its TTL.
                    let result = renewing(
                        lease.as_deref(),
                        self.inner.lock_ttl,
                        self.load_and_store(entry, lease.as_deref(), after_miss),
                    )
                    .await;
                    release(lease).await;
                    let loaded = result?;
                    entry.notify(&*loaded.value);
                    *slot = Some(loaded.value);
                    Ok((loaded.bytes, true))
                })
                .await
        };
        let reloaded = result.map(|(bytes, ran)| Reloaded {
            bytes,
            value: if ran_here { slot } else { None },
            ran,
        });
        (reloaded, !ran_here)
    }

    /// Runs the loader and writes its value; the cache failing does not fail the reload. The
    /// value is not written when the run lease was lost meanwhile (a stall past its TTL):
    /// another instance may hold it and have stored a newer value.
    async fn load_and_store(
        &self,
        entry: &Entry,
        lease: Option<&dyn Lease>,
        after_miss: bool,
    ) -> Result<super::entry::Loaded> {
        let load = entry.loader();
        // Before the source is read: an invalidation of the value seen meanwhile keeps the
        // (maybe older) reload out of the cache; after a miss, so does any write of it since.
        let mark = if after_miss {
            self.inner.cache.miss_mark(&entry.name)
        } else {
            self.inner.cache.load_mark(&entry.name)
        };
        // A panicking loader is a failed reload: the timer, refresh-ahead and other callers
        // go on (a panic would end an eager or scheduled timer for good).
        let run = std::panic::AssertUnwindSafe(async move { load().await });
        let loaded = match futures_util::FutureExt::catch_unwind(run)
            .await
            .unwrap_or_else(|panic| Err(crate::panicked(&entry.name, &*panic)))
        {
            Ok(loaded) => loaded,
            Err(e) => {
                bump(&entry.counters.errors);
                if self.inner.logging {
                    tracing::warn!(name = %entry.name, error = %e, "reload failed");
                }
                return Err(e);
            }
        };
        bump(&entry.counters.reloads);
        // Still ours? A check that fails counts as lost: the lease may have expired meanwhile
        // (a stall), and a write queued behind the stall would land after the new holder's
        // (review, helper-71). Not storing costs one more load; the value is returned.
        // (Without a lease — none taken, or the lease service failing when it was asked — the
        // value is stored: fail-open, as when taking it.)
        if let Some(lease) = lease {
            match lease.extend(self.inner.lock_ttl).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(name = %entry.name, "reload lease lost while loading (a stall?): the value is returned, not stored");
                    return Ok(loaded);
                }
                Err(e) => {
                    tracing::warn!(name = %entry.name, error = %e, "reload lease could not be checked: the value is returned, not stored");
                    return Ok(loaded);
                }
            }
        }
        let cache = &self.inner.cache;
        let stored = match cache.ttl_policy().resolve(Expiry::After(entry.ttl)) {
            Ok(ttl) => {
                cache
                    .backend()
                    .set_loaded(&entry.name, loaded.bytes.clone(), ttl, mark)
                    .await
            }
            Err(e) => Err(e),
        };
        match stored {
            Err(e) => self.log_cache_error(entry, "set", &e),
            Ok(false) if self.inner.logging => tracing::debug!(name = %entry.name,
                "invalidated while reloading (or, after a miss, written since): the value is returned, not stored"),
            Ok(true) if self.inner.logging => tracing::debug!(name = %entry.name, "reloaded"),
            Ok(_) => {}
        }
        Ok(loaded)
    }

    /// Whether `entry`'s value was written less than `within` ago (its age is its TTL minus
    /// what is left of it).
    async fn written_within(&self, entry: &Entry, within: Option<Duration>) -> bool {
        let Some(within) = within else {
            return false;
        };
        self.value_age(&entry.name, entry.ttl)
            .await
            .is_some_and(|age| age < within)
    }

    /// How long ago `name`'s value, stored for `ttl`, was written (`ttl` minus what is left
    /// of it); `None` without a value (or an expiry) to tell.
    pub(crate) async fn value_age(&self, name: &str, ttl: Duration) -> Option<Duration> {
        match self.inner.cache.ttl_state(name).await {
            Ok(KeyTtl::Expires(left)) => Some(ttl.saturating_sub(left)),
            _ => None,
        }
    }

    /// Takes the per-key run lease, waiting up to `lock_wait` for another instance's reload.
    /// Returns the lease and whether it was granted; a failing lease service grants (the
    /// reload goes on, fail-open).
    async fn run_lease(&self, entry: &Entry) -> (Option<Box<dyn Lease>>, bool) {
        let name = format!("reload:{}:run", entry.name);
        let leases = &self.inner.leases;
        match leases
            .acquire(&name, self.inner.lock_ttl, self.inner.lock_wait)
            .await
        {
            Ok(Some(lease)) => (Some(lease), true),
            Ok(None) => (None, false),
            Err(e) => {
                self.log_cache_error(entry, "lease", &e);
                (None, true)
            }
        }
    }

    pub(crate) fn log_cache_error(&self, entry: &Entry, op: &'static str, err: &CacheError) {
        if self.inner.logging {
            tracing::warn!(name = %entry.name, operation = op, error = %err, "cache unavailable, going on without it");
        }
    }
}

/// Runs `work`, extending `lease` to `ttl` every third of `ttl` until it ends.
async fn renewing<F: Future>(lease: Option<&dyn Lease>, ttl: Duration, work: F) -> F::Output {
    let Some(lease) = lease else {
        return work.await;
    };
    let renew = async move {
        loop {
            tokio::time::sleep(ttl / 3).await;
            match lease.extend(ttl).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("reload lease lost while loading");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "reload lease not renewed"),
            }
        }
    };
    let mut work = std::pin::pin!(work);
    let mut renew = std::pin::pin!(renew);
    let mut renewing = true;
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(out) = work.as_mut().poll(cx) {
            return std::task::Poll::Ready(out);
        }
        if renewing && renew.as_mut().poll(cx).is_ready() {
            renewing = false;
        }
        std::task::Poll::Pending
    })
    .await
}

/// Clears an entry's `refreshing` flag when dropped.
struct Refreshed<'a>(&'a Entry);

impl Drop for Refreshed<'_> {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
    }
}

async fn release(lease: Option<Box<dyn Lease>>) {
    if let Some(lease) = lease
        && let Err(e) = lease.release().await
    {
        tracing::debug!(error = %e, "could not release a reload lease (it expires by itself)");
    }
}

/// Why a reload runs regardless of a cached value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Force {
    /// A read: a cached value is taken instead.
    No,
    /// A timer or refresh-ahead: when another instance's reload holds the run lease past
    /// `lock_wait`, the value it stored is taken.
    Timer,
    /// `reload_key(name, true)`: runs, or fails (see `reload_flight`).
    Explicit,
}
