//! The write and read strategies of `CacheStrategies`: write-through, write-behind,
//! write-around, read-through and cache-aside.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ncm_cache_core::{
    CacheError, Codec, DEFAULT_MAX_KEY_LEN, Expiry, LoadEnd, LoadPermit, LoadRead, LoadTurn,
    Result, validate_key,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::stats::Kind;
use crate::store::Store;
use crate::strategies::CacheStrategies;
use crate::write_behind::{QueueControl, QueueValue, WriteBehind};

/// Armed while a write-through's outcome is in the air (its store call, its cache write): a
/// future dropped then evicts the key in a task (the store may hold the new value while the
/// cache holds the old one). The write's in-flight mark is left to expire (30 s).
struct EvictOnCancel<'a> {
    inv: Option<Arc<crate::invalidation::Invalidator>>,
    key: &'a str,
}

impl Drop for EvictOnCancel<'_> {
    fn drop(&mut self) {
        let Some(inv) = self.inv.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                key = self.key,
                "a cancelled write-through or write-around could not evict its key (no runtime): a stale value may be served until it expires"
            );
            return;
        };
        let key = self.key.to_owned();
        runtime.spawn(async move {
            if let Err(e) = inv.delete_keys(std::slice::from_ref(&key), Kind::Key).await {
                tracing::error!(key, error = %e, "a cancelled write-through or write-around could not evict its key: a stale value may be served until it expires");
            }
        });
    }
}

impl<C: Codec> CacheStrategies<C> {
    /// Write-through: the store first, then the cache.
    ///
    /// - The store fails → the cache is untouched and [`CacheError::Store`] is returned. (With a
    ///   durable write-behind queue of this store on this instance, the write is journaled
    ///   before its store call when the key has journaled writes, so other processes' older
    ///   write-behinds of the key wait for its outcome; if its journal entry cannot be taken
    ///   back after a failed store call, or the call is cancelled after journaling, the queue
    ///   persists it later. See docs/ARCHITECTURE.md, "Across processes".)
    /// - The cache write fails after the store succeeded → the key is invalidated (so no stale
    ///   value is served) and the cache's error is returned. Any error other than
    ///   `CacheError::Store` therefore means the value **is** persisted.
    /// - **Order**: write-throughs of one key on this instance run one after the other, so
    ///   the cache ends with what the store ends with. Across instances (with Redis
    ///   coordination, e.g. [`from_redis_cache`](Self::from_redis_cache)), a write-through
    ///   that overlapped another of the same key — which of the two the store applied last is
    ///   unknown — evicts the key after its cache write, so the cache is not left older (or
    ///   newer) than the store past one Redis round trip after the later cache write.
    /// - **Cancelled** (the future dropped) after the store call began: the key is evicted (in a
    ///   task), since the store may hold the new value while the cache still holds the old.
    /// - A write-through whose store call outlives its mark's lease (30 s by default,
    ///   [`write_through_lease`](crate::CacheStrategiesBuilder::write_through_lease)) still
    ///   counts as overlapping the next write-through of the key, if that begins within 4
    ///   leases, and counts itself as overlapped when it ends.
    /// - Limits: a write-through whose process dies (or whose call is cancelled) between its
    ///   cache write and its end leaves its mark for the lease (later write-throughs of the key
    ///   evict during that time) and, if the process died and no other write-through overlapped
    ///   it, its value until the cache TTL; a store call longer than 4 leases is not seen by a
    ///   write-through begun after that; when Redis cannot be reached to mark a write, that
    ///   writer evicts its own value, but others do not learn of it; the store call runs under
    ///   the key's stripe lock (one of 64), so a store must not call a write-through or
    ///   write-around of this `CacheStrategies` itself.
    pub async fn write_through<V>(
        &self,
        key: &str,
        value: &V,
        ttl: impl Into<Expiry>,
        store: &Store<V>,
    ) -> Result<()>
    where
        V: Serialize + Send + Sync + 'static,
    {
        let expiry = ttl.into();
        // Reject bad arguments before anything reaches the store.
        validate_key(key, DEFAULT_MAX_KEY_LEN)?;
        self.cache.ttl_policy().resolve(expiry)?;
        let _in_order = self.inner.stripe(key).lock().await;
        let queue = self.inner.queues().get(&store.id()).cloned();
        // Held to the end of the call (a write-behind of the key waits for it).
        let mut waiting = match &queue {
            Some(q) => Some(q.direct_write(key).await),
            None => None,
        };
        // Durable mode: journaled as the key's newest write, so other processes' older
        // write-behinds of the key are not persisted after it.
        if let Some(w) = waiting.as_mut() {
            w.journal(value).await?;
        }
        let mark = self.inner.inv.write_begin(key).await;
        // A caller that stops waiting once the store call began (it may have committed) leaves
        // the key evicted, not holding the value the store may have replaced.
        let mut unfinished = EvictOnCancel {
            inv: Some(Arc::clone(&self.inner.inv)),
            key,
        };
        let stored = store.store(key, value).await;
        if let Some(w) = waiting.as_mut() {
            match &stored {
                Ok(()) => w.stored(),
                Err(_) => w.failed().await,
            }
        }
        let cached = match stored {
            Ok(()) => self.cache.set_with_expiry(key, value, expiry).await,
            Err(e) => {
                unfinished.inv = None;
                self.inner.inv.write_end(mark).await;
                return Err(e);
            }
        };
        // Still armed while the mark ends and what it asks for is done: a caller cancelled
        // there (a stalled coordination Redis) may have overlapped another write-through, and
        // only an eviction leaves the cache no older than the store (review, helper-80 #5).
        if self.inner.inv.write_end(mark).await {
            // Overlapped another instance's write-through of the key: the store may hold
            // either value, so the cache holds neither.
            self.invalidate_after_failure(
                key,
                &CacheError::Config("concurrent write-through".into()),
            )
            .await;
            unfinished.inv = None;
            return cached;
        }
        let result = match cached {
            Ok(()) => {
                self.announce_write(key).await;
                Ok(())
            }
            Err(e) => {
                self.invalidate_after_failure(key, &e).await;
                Err(e)
            }
        };
        unfinished.inv = None;
        result
    }

    /// Write-around: the store only; the cached key is invalidated (here and, with Redis, on
    /// instances that keep their own cache). A store failure leaves the cache untouched.
    ///
    /// Ordered as write-throughs are: on this instance it waits for the key's write-throughs
    /// (a write-through's cache write cannot land after this write's eviction), across
    /// instances it marks the key so an overlapping write-through evicts after its cache
    /// write, and a call cancelled once its store call began still evicts the key (in a task).
    /// Before, a cancelled write-around left the old value cached, and a write-through of the
    /// same key could cache its value after the write-around's eviction, while the store held
    /// the write-around's (review, helper-69).
    ///
    /// A write-behind of the key waiting in this instance's queue of the same store is
    /// superseded as by a write-through.
    ///
    /// Like a write-through's, the store call runs under the key's stripe lock (one of 64): a
    /// store must not call a write-through or write-around of this `CacheStrategies` itself (it
    /// would wait for its own stripe).
    pub async fn write_around<V>(&self, key: &str, value: &V, store: &Store<V>) -> Result<()>
    where
        V: Send + Sync + 'static,
    {
        validate_key(key, DEFAULT_MAX_KEY_LEN)?;
        let _in_order = self.inner.stripe(key).lock().await;
        let queue = self.inner.queues().get(&store.id()).cloned();
        // Held to the end of the call, as a write-through's.
        let mut waiting = match &queue {
            Some(q) => Some(q.direct_write(key).await),
            None => None,
        };
        if let Some(w) = waiting.as_mut() {
            w.journal(value).await?;
        }
        let mark = self.inner.inv.write_begin(key).await;
        let mut unfinished = EvictOnCancel {
            inv: Some(Arc::clone(&self.inner.inv)),
            key,
        };
        if let Err(e) = store.store(key, value).await {
            if let Some(w) = waiting.as_mut() {
                w.failed().await;
            }
            unfinished.inv = None;
            self.inner.inv.write_end(mark).await;
            return Err(e);
        }
        if let Some(w) = waiting.as_mut() {
            w.stored();
        }
        let evicted = self
            .inner
            .inv
            .delete_keys(&[key.to_owned()], Kind::Key)
            .await;
        // Evicted after the store call whether or not another instance's write-through
        // overlapped (that one evicts after its own cache write). Armed until the mark ended,
        // as a write-through's guard is.
        self.inner.inv.write_end(mark).await;
        unfinished.inv = None;
        evicted.map(drop)
    }

    /// Write-behind: caches `value` now and persists it to `store` after `delay`, through the
    /// store's [`WriteBehind`] queue (created on first use with the strategies' write-behind
    /// configuration). See [`WriteBehind`] for coalescing, batching, retries, dead letters and
    /// back-pressure; call [`flush`](Self::flush) or [`shutdown`](Self::shutdown) to persist
    /// everything pending.
    pub async fn write_behind<V: QueueValue>(
        &self,
        key: &str,
        value: &V,
        ttl: impl Into<Expiry>,
        store: &Store<V>,
        delay: Duration,
    ) -> Result<()> {
        let queue = self.write_behind_queue(store).await?;
        queue.write(key, value, ttl, delay).await?;
        self.announce_write(key).await;
        Ok(())
    }

    /// The write-behind queue of `store` (created and started on first use): read its stats
    /// and dead letters, replay them, flush it. In durable mode, creating it adopts the pending
    /// writes that crashed processes left for this store.
    pub async fn write_behind_queue<V: QueueValue>(
        &self,
        store: &Store<V>,
    ) -> Result<WriteBehind<V>> {
        let id = store.id();
        if let Some(q) = self.lookup(id)? {
            return Ok(q);
        }
        let _one = self.inner.creating.lock().await;
        if let Some(q) = self.lookup(id)? {
            return Ok(q);
        }
        #[cfg(feature = "redis")]
        if self.inner.write_behind.durable.is_some()
            && self
                .inner
                .queues()
                .values()
                .any(|q| q.stats().name == store.name())
        {
            return Err(CacheError::Config(format!(
                "two stores are named {:?}: durable write-behind needs a unique name per store",
                store.name()
            )));
        }
        let queue = WriteBehind::start_announcing(
            self.cache.clone(),
            Some(Arc::clone(&self.inner.inv)),
            store.clone(),
            self.inner.write_behind.clone(),
        )
        .await?;
        self.inner
            .queues()
            .insert(id, Arc::new(queue.clone()) as Arc<dyn QueueControl>);
        Ok(queue)
    }

    fn lookup<V: QueueValue>(&self, id: usize) -> Result<Option<WriteBehind<V>>> {
        let queues = self.inner.queues();
        let Some(q) = queues.get(&id) else {
            return Ok(None);
        };
        q.as_any()
            .downcast_ref::<WriteBehind<V>>()
            .cloned()
            .map(Some)
            .ok_or_else(|| CacheError::Config("a store is used with two value types".into()))
    }

    /// Read-through: the cached value, or `loader`'s result, cached with `ttl`. Concurrent
    /// callers of one key on this instance share one loader run. A loader error is returned
    /// (as [`CacheError::Loader`]) and nothing is cached. A cache failure follows
    /// [`on_cache_failure`](crate::CacheStrategiesBuilder::on_cache_failure) (default
    /// fail-open: a failed read is a miss, a failed write is logged) — the same steps as
    /// `Cache::read_through_with`.
    pub async fn read_through<T, F, Fut, E>(
        &self,
        key: &str,
        loader: F,
        ttl: impl Into<Expiry>,
    ) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let expiry = ttl.into();
        let on_failure = self.inner.on_cache_failure;
        self.cache.ttl_policy().resolve(expiry)?;
        // The mark is taken after the read: a load that follows a real absence stores only
        // while the key is still absent.
        // With a fail-safe backend whose shared store failed, `stale` is the copy it kept:
        // served only if the load fails too.
        let (found, mark, stale) = self
            .cache
            .read_for_load_fail_safe::<T>(key, on_failure)
            .await?;
        if let Some(value) = found {
            return Ok(value);
        }
        // Named by the mark: a caller after an invalidation does not join an older load.
        let flight = ncm_cache_core::LoadMark::flight_key(key, mark);
        // Only a copy this caller can serve lets a wait for another process's load give up.
        let has_stale = self.cache.decode_stale::<T>(key, stale.as_ref()).is_some();
        let bytes = self
            .inner
            .flight
            .run(flight, || async {
                // Double check: a flight of the key that stored just before this one began
                // (its store may have moved the mark this caller took) left the value.
                // (A fail-safe copy is not a value stored since: only a hit counts.)
                let backend = self.cache.backend();
                let permit = match backend.get_for_load(key).await {
                    Ok(LoadRead::Hit(stored)) => match self.cache.decode_for::<T>(key, &stored) {
                        Ok(value) => return Ok(self.cache.codec().encode_for(&[key], &value)?),
                        Err(_) => LoadPermit::free(),
                    },
                    // Another process may be loading it (a multi-level cache's stampede
                    // lock): wait for its value. (A waiter with a stale copy that gives up
                    // fails, and the copy is served.)
                    Ok(LoadRead::Miss | LoadRead::Expired { .. }) => match backend
                        .begin_load(key, has_stale, None)
                        .await
                    {
                        Ok(LoadTurn::Found(stored)) => {
                            match self.cache.decode_for::<T>(key, &stored) {
                                Ok(value) => {
                                    return Ok(self.cache.codec().encode_for(&[key], &value)?);
                                }
                                Err(_) => LoadPermit::free(),
                            }
                        }
                        Ok(LoadTurn::Load(permit)) => permit,
                        Err(e) if has_stale => return Err(e),
                        _ => LoadPermit::free(),
                    },
                    _ => LoadPermit::free(),
                };
                // `mark` was taken before the source is read: an invalidation of the key seen
                // meanwhile keeps the (maybe older) value out of the cache.
                let value = match loader().await {
                    Ok(value) => value,
                    Err(e) => {
                        permit.end(LoadEnd::Failed).await;
                        return Err(CacheError::loader(e));
                    }
                };
                // Waiters share the encoded value, so it is encoded without the size cap; the
                // cap applies to what is stored (as in `Cache::read_through_with`).
                let bytes = match self.cache.codec().encode_for(&[key], &value) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        permit.end(LoadEnd::NotStored).await;
                        return Err(e.into());
                    }
                };
                let stored = match self.cache.encode_for(key, &value) {
                    Ok(stored) => {
                        self.cache
                            .store_loaded_since(key, stored, expiry, on_failure, mark)
                            .await
                    }
                    Err(e) => on_failure.apply(key, "encode", e).map(|()| false),
                };
                let end = match stored {
                    Ok(true) => LoadEnd::Stored,
                    _ => LoadEnd::NotStored,
                };
                permit.end(end).await;
                stored?;
                Ok(bytes)
            })
            .await;
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(e) => {
                return self
                    .cache
                    .stale_after_load(key, stale.as_ref())
                    .await
                    .ok_or(e);
            }
        };
        Ok(self.cache.codec().decode_for(&[key], &bytes)?)
    }

    /// Cache-aside, as the application would write it: read the cache; on a miss, load, cache
    /// with `ttl`, return — `Cache::read_through_with` with this instance's
    /// [`on_cache_failure`](crate::CacheStrategiesBuilder::on_cache_failure). (No
    /// single-flight; see [`read_through`](Self::read_through).)
    pub async fn cache_aside<T, F, Fut, E>(
        &self,
        key: &str,
        loader: F,
        ttl: impl Into<Expiry>,
    ) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.cache
            .read_through_with(key, loader, ttl, self.inner.on_cache_failure)
            .await
    }
}
