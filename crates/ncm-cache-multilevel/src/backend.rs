//! `MultiLevelCache` as a byte-level [`CacheBackend`]: the layer that `SqlCache`,
//! `CacheStrategies`, `CacheLoader`, `CacheReloader` and the macros run over (through
//! `Cache::new(multilevel, codec)`), with the same coherence, breaker and fail-safe as the typed
//! API. L1 then holds the encoded bytes (a hit is a refcount clone; the caller's facade decodes).

use std::sync::Arc;
use std::time::Duration;

use ncm_cache_core::{
    Bytes, CacheBackend, CacheStats, Codec, HealthReport, KeyTtl, LoadRead, LoadTurn, Result,
    ValueSource, async_trait,
};

use crate::cache::{Inner, L1Read, MultiLevelCache, Object};
use crate::options::{Eff, EntryOptions};
use crate::stats::Counters;

impl<C: Codec> Inner<C> {
    /// The byte-level read: L1 (bytes), then L2, promoting; a stale L1 copy (fail-safe) when L2
    /// fails.
    pub(crate) async fn get_bytes(
        &self,
        key: &str,
        eff: &Eff,
    ) -> Result<Option<(Bytes, ValueSource)>> {
        Ok(match self.read_bytes(key, eff).await? {
            BytesRead::Found(bytes, source) => Some((bytes, source)),
            BytesRead::Absent | BytesRead::Expired(_) => None,
            BytesRead::Stale(bytes, _) => {
                Counters::bump(&self.counters.stale_served);
                Some((bytes, ValueSource::Stale))
            }
        })
    }

    /// [`get_bytes`](Self::get_bytes) before a load: a stale copy is handed back apart (the
    /// load runs, and the copy is served only if it fails too).
    pub(crate) async fn get_bytes_for_load(&self, key: &str, eff: &Eff) -> Result<LoadRead> {
        Ok(match self.read_bytes(key, eff).await? {
            BytesRead::Found(bytes, _) => LoadRead::Hit(bytes),
            BytesRead::Absent => LoadRead::Miss,
            BytesRead::Expired(value) => LoadRead::Expired { value },
            BytesRead::Stale(value, error) => LoadRead::Stale { value, error },
        })
    }

    async fn read_bytes(&self, key: &str, eff: &Eff) -> Result<BytesRead> {
        let stale = match self.l1_read::<Bytes>(key, eff)? {
            L1Read::Fresh(v, _) => {
                self.counters.l1_hits.bump();
                return Ok(match v {
                    Some(b) => BytesRead::Found(Bytes::clone(&b), ValueSource::L1),
                    None => BytesRead::Absent,
                });
            }
            L1Read::Stale(v, until) => v.map(|v| (v, until)),
            L1Read::Miss => None,
        };
        let ticket = self.versions.ticket(key);
        match self.l2_get(key, eff).await {
            Ok(Some(bytes)) => {
                Counters::bump(&self.counters.l2_hits);
                let size = bytes.len();
                self.promote(key, Arc::new(bytes.clone()) as Object, size, &ticket, eff);
                Ok(BytesRead::Found(bytes, ValueSource::L2))
            }
            Ok(None) => {
                Counters::bump(&self.counters.misses);
                // L2's copy expired (or was evicted): a stale L1 copy is still kept for a
                // load that fails (review, helper-74).
                Ok(match self.servable(stale) {
                    Some(v) => BytesRead::Expired(Bytes::clone(&v)),
                    None => BytesRead::Absent,
                })
            }
            Err(e) => match self.servable(stale) {
                Some(v) => Ok(BytesRead::Stale(Bytes::clone(&v), e)),
                None => Err(e),
            },
        }
    }

    /// [`get_bytes`](Self::get_bytes) for several keys: L1 first, the rest in one L2 batch
    /// (`get_many`: one `MGET` on Redis). When L2 fails, the stale L1 copies are served if
    /// every key L2 was asked for has one (fail-safe), else the call fails. A sliding read
    /// touches each key (`GETEX`), so it reads them one by one, concurrently.
    pub(crate) async fn get_many_bytes(
        &self,
        keys: &[&str],
        eff: &Eff,
    ) -> Result<Vec<Option<Bytes>>> {
        Ok(self
            .get_many_for_load(keys, eff)
            .await?
            .into_iter()
            .map(|r| match r {
                LoadRead::Hit(bytes) => Some(bytes),
                LoadRead::Stale { value, .. } => {
                    Counters::bump(&self.counters.stale_served);
                    Some(value)
                }
                _ => None,
            })
            .collect())
    }

    /// [`get_many_bytes`](Self::get_many_bytes) before a load: the stale copies (L2 failed)
    /// handed back apart.
    pub(crate) async fn get_many_for_load(
        &self,
        keys: &[&str],
        eff: &Eff,
    ) -> Result<Vec<LoadRead>> {
        if !eff.read_l2() || (eff.sliding.is_some() && eff.write_l2()) {
            let each = keys.iter().map(|k| self.get_bytes_for_load(k, eff));
            return futures_util::future::join_all(each)
                .await
                .into_iter()
                .collect();
        }
        let mut out: Vec<LoadRead> = Vec::with_capacity(keys.len());
        // (index, key, stale copy, ticket taken before the L2 read)
        let mut missing = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let stale = match self.l1_read::<Bytes>(key, eff)? {
                L1Read::Fresh(v, _) => {
                    self.counters.l1_hits.bump();
                    out.push(v.map_or(LoadRead::Miss, |b| LoadRead::Hit(Bytes::clone(&b))));
                    continue;
                }
                L1Read::Stale(v, until) => v.map(|v| (v, until)),
                L1Read::Miss => None,
            };
            out.push(LoadRead::Miss);
            missing.push((i, *key, stale, self.versions.ticket(key)));
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let miss_keys: Vec<&str> = missing.iter().map(|(_, k, _, _)| *k).collect();
        match self.l2_call("get_many", self.l2.get_many(&miss_keys)).await {
            Ok(raw) => {
                for ((i, key, stale, ticket), bytes) in missing.into_iter().zip(raw) {
                    let Some(bytes) = bytes else {
                        Counters::bump(&self.counters.misses);
                        // L2's copy expired: the stale L1 copy, for a load that fails.
                        if let Some(v) = self.servable(stale) {
                            out[i] = LoadRead::Expired {
                                value: Bytes::clone(&v),
                            };
                        }
                        continue;
                    };
                    Counters::bump(&self.counters.l2_hits);
                    let size = bytes.len();
                    self.promote(key, Arc::new(bytes.clone()) as Object, size, &ticket, eff);
                    out[i] = LoadRead::Hit(bytes);
                }
                Ok(out)
            }
            // Every key L2 was asked for has a copy still within its max stale age now (one
            // reading of the clock for all).
            Err(e)
                if {
                    let now = self.opts.now_nanos();
                    missing.iter().all(|(_, _, stale, _)| {
                        stale.as_ref().is_some_and(|(_, until)| now <= *until)
                    })
                } =>
            {
                for (i, _, stale, _) in missing {
                    if let Some((b, _)) = stale {
                        out[i] = LoadRead::Stale {
                            value: Bytes::clone(&b),
                            error: e.clone(),
                        };
                    }
                }
                tracing::debug!(error = %e, "L2 batch read failed; stale copies served");
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }
}

/// A [`MultiLevelCache`] as a byte-level [`CacheBackend`] (from
/// [`MultiLevelCache::as_backend`]): give it to `Cache::new` and anything that takes a `Cache`
/// — `SqlCache`, `CacheStrategies`, `CacheLoader`, `CacheReloader`, the macros — runs over
/// L1 + L2 with the cache's coherence, breaker and fail-safe. A newtype rather than an impl on
/// `MultiLevelCache` itself, so the typed methods (`get::<T>`, `set`) never clash with the
/// trait's byte-level ones.
///
/// ```
/// use ncm_cache_core::Cache;
/// use ncm_cache_codec::Serializer;
/// use ncm_cache_memory::MemoryBackend;
/// use ncm_cache_multilevel::MultiLevelCache;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let multi = MultiLevelCache::builder(MemoryBackend::new()).build()?;
/// let cache = Cache::new(multi.as_backend(), Serializer::default());
/// cache.set("user:1", &"Ada").await?;
/// assert_eq!(cache.get::<String>("user:1").await?.as_deref(), Some("Ada"));
/// assert_eq!(multi.l1_len(), 1);
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
pub struct MultiLevelBackend<C = ncm_cache_codec::Serializer>(MultiLevelCache<C>, Eff);

impl<C> Clone for MultiLevelBackend<C> {
    fn clone(&self) -> Self {
        Self(self.0.clone(), self.1)
    }
}

impl<C> std::fmt::Debug for MultiLevelBackend<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MultiLevelBackend").field(&self.0).finish()
    }
}

impl<C> MultiLevelBackend<C> {
    /// The multi-level cache behind this backend.
    pub fn get_ref(&self) -> &MultiLevelCache<C> {
        &self.0
    }

    /// Unwraps the multi-level cache.
    pub fn into_inner(self) -> MultiLevelCache<C> {
        self.0
    }
}

impl<C: Codec> MultiLevelCache<C> {
    /// This cache as a byte-level [`CacheBackend`] (shares L1, L2 and everything else).
    pub fn as_backend(&self) -> MultiLevelBackend<C> {
        MultiLevelBackend(self.clone(), self.inner.defaults)
    }

    /// This cache as a byte-level [`CacheBackend`] whose every call uses `options` (a TTL
    /// passed to `set` still wins over `options`' TTL): e.g. a `SqlCache` whose results skip
    /// L1, or loaders whose values slide.
    ///
    /// ```
    /// use ncm_cache_core::{Cache, CacheBackend};
    /// use ncm_cache_codec::Serializer;
    /// use ncm_cache_memory::MemoryBackend;
    /// use ncm_cache_multilevel::{EntryOptions, MultiLevelCache};
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let multi = MultiLevelCache::builder(MemoryBackend::new()).build()?;
    /// let no_l1 = multi.as_backend_with(&EntryOptions::new().skip_l1())?;
    /// let cache = Cache::new(no_l1, Serializer::default());
    /// cache.set("report:1", &42).await?;
    /// assert_eq!(multi.l1_len(), 0);
    /// assert_eq!(cache.get::<i32>("report:1").await?, Some(42));
    /// # Ok::<(), ncm_cache_core::CacheError>(())
    /// # }).unwrap();
    /// ```
    pub fn as_backend_with(&self, options: &EntryOptions) -> Result<MultiLevelBackend<C>> {
        Ok(MultiLevelBackend(
            self.clone(),
            options.resolve(&self.inner.defaults)?,
        ))
    }
}

impl<C: Codec> MultiLevelBackend<C> {
    /// The options of a write through this backend with the facade's `ttl`: `None` (the
    /// facade has no TTL of its own) keeps the options' TTL, else the builder's
    /// `l2_default_ttl` (as for every other write of the cache).
    /// The view's options for a write. Its writes are exact: one that another local write of
    /// its stripe overlapped is not kept in L1 (the typed API keeps it up to 1 s). `SqlCache`
    /// writes its table tokens here: two concurrent `execute`s of one table otherwise left the
    /// superseded token in L1, and a query on this instance served a result cached under it,
    /// older than a write this instance had acknowledged (review, helper-79 #1).
    fn write_eff(&self, ttl: Option<Duration>) -> Eff {
        let mut eff = self.1.with_exact_writes();
        eff.l2_ttl = ttl
            .or(self.1.explicit_ttl())
            .or(self.0.inner.opts.l2_default_ttl);
        eff
    }
}

#[async_trait]
impl<C: Codec> CacheBackend for MultiLevelBackend<C> {
    fn name(&self) -> &str {
        &self.0.inner.opts.name
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.0.inner.get_bytes(key, &self.1).await?.map(|(b, _)| b))
    }

    /// A stale copy (fail-safe, L2 failing) is handed back apart: loaders, read-throughs and
    /// reloads run their load and serve it only if that fails too.
    async fn get_for_load(&self, key: &str) -> Result<LoadRead> {
        self.0.inner.get_bytes_for_load(key, &self.1).await
    }

    /// With the distributed lock (`MultiLevelBuilder::distributed_lock`, or `with_redis`):
    /// takes the key's load lock, or waits for its holder's value to appear in L2, as
    /// `get_or_load` does — so a `CacheLoader`, a macro or `CacheStrategies::read_through`
    /// running over this cache loads a key once across processes. The lock is renewed while
    /// the permit is held. Without a lock, or when this call neither reads nor writes L2, a
    /// free permit.
    async fn begin_load(
        &self,
        key: &str,
        has_stale: bool,
        accept: ncm_cache_core::Accept<'_>,
    ) -> Result<LoadTurn> {
        #[cfg(feature = "redis")]
        {
            let (inner, eff) = (&self.0.inner, &self.1);
            // A waiter that gives up serves the caller's stale copy while L1's copy may still
            // be served (fail-safe's max stale age), else it loads.
            let serve_until = if has_stale {
                match inner.l1_read::<Bytes>(key, eff) {
                    Ok(crate::cache::L1Read::Stale(_, until)) => Some(until),
                    _ => None,
                }
            } else {
                None
            };
            let found = |ticket| inner.found_bytes_in_l2(key, eff, ticket, accept);
            let wait: futures_util::future::BoxFuture<'_, _> = Box::pin(inner.lock_or_wait(
                key,
                true,
                serve_until,
                eff,
                (found, accept.is_none()),
            ));
            Ok(match wait.await? {
                crate::backplane::LockOutcome::Found(bytes) => LoadTurn::Found(bytes),
                crate::backplane::LockOutcome::Absent => LoadTurn::Absent,
                crate::backplane::LockOutcome::Proceed(Some(guard)) => {
                    LoadTurn::Load(inner.hold_lock(guard))
                }
                crate::backplane::LockOutcome::Proceed(None) => {
                    LoadTurn::Load(ncm_cache_core::LoadPermit::free())
                }
            })
        }
        #[cfg(not(feature = "redis"))]
        {
            let _ = (key, has_stale, accept);
            Ok(LoadTurn::Load(ncm_cache_core::LoadPermit::free()))
        }
    }

    /// L1's copy when it may still be served: a stale one within its max stale age (the
    /// load that failed may have outlived it; counted as served stale), or a fresh one a
    /// write or load put there meanwhile. Not `copy` itself, whose age is not known here: a
    /// copy evicted from L1 during the load (capacity) is not served either.
    async fn stale_to_serve(&self, key: &str, copy: Bytes) -> Option<Bytes> {
        let _ = copy;
        let inner = &self.0.inner;
        match inner.l1_read::<Bytes>(key, &self.1) {
            Ok(L1Read::Fresh(Some(v), _)) => Some(Bytes::clone(&v)),
            Ok(L1Read::Stale(Some(v), until)) => {
                let served = inner.servable(Some((v, until))).map(|v| Bytes::clone(&v));
                if served.is_some() {
                    Counters::bump(&inner.counters.stale_served);
                }
                served
            }
            _ => None,
        }
    }

    /// Every key written (`set`), also after one failed: a failed write evicts its key here
    /// and elsewhere, so none of them is left behind with an older value (`SqlCache`'s
    /// invalidation of several tables during an outage, say). The first error is returned.
    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Option<Duration>) -> Result<()> {
        let mut first = None;
        for (key, value) in entries {
            if let Err(e) = self.set(key, value.clone(), ttl).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// L1 first, the rest in one L2 batch (see `Inner::get_many_bytes`).
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        self.0.inner.get_many_bytes(keys, &self.1).await
    }

    /// The stale copies (fail-safe, L2 failing) handed back apart, as by `get_for_load`.
    async fn get_many_for_load(&self, keys: &[&str]) -> Result<Vec<LoadRead>> {
        self.0.inner.get_many_for_load(keys, &self.1).await
    }

    /// The library's own keys live in L2 only (as the multi-level cache keeps its epoch).
    async fn get_reserved(&self, name: &str) -> Result<Option<Bytes>> {
        self.0.inner.l2_raw.get_reserved(name).await
    }

    async fn set_reserved(&self, name: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.0.inner.l2_raw.set_reserved(name, value, ttl).await
    }

    async fn set_reserved_if_absent(
        &self,
        name: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        self.0
            .inner
            .l2_raw
            .set_reserved_if_absent(name, value, ttl)
            .await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        let object = Arc::new(value.clone()) as Object;
        let eff = self.write_eff(ttl);
        self.0.inner.write_encoded(key, object, value, &eff).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.0.inner.delete_everywhere(key, &self.1).await
    }

    /// The key's invalidation versions on this instance (as `get_or_load` takes them), and
    /// with `epoch_clear` the epoch's change count.
    fn load_mark(&self, key: &str) -> Option<ncm_cache_core::LoadMark> {
        let inner = &self.0.inner;
        Some(inner.versions.ticket(key).mark(inner.epoch_changes()))
    }

    /// Not stored when the key was invalidated (here or, announced, elsewhere) or written on
    /// this instance since `mark`, as `get_or_load` refuses to store such a load; after a
    /// miss, not stored either when L2 holds the key by now (`SET NX`: another instance wrote
    /// it, announced or not).
    async fn set_loaded(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        mark: Option<ncm_cache_core::LoadMark>,
    ) -> Result<bool> {
        if let Some(mark) = mark {
            // The miss is this backend's: with `skip_l2_read` L2 was not asked.
            let after_miss = mark.follows_miss() && self.1.read_l2();
            let eff = self.write_eff(ttl);
            // A load's store, remembered for deletes heard late (`recent.rs`) from before the
            // version check.
            let tracked = (after_miss && eff.write_l2())
                .then(|| crate::cache::Tracked::begin(&self.0.inner, key, &value, &eff, false));
            let versions = &self.0.inner.versions;
            let back = crate::versions::Ticket::from_mark(key, mark);
            let ticket = back.map(|(ticket, _)| ticket);
            // The epoch the load began in: its store is not made in a later one (a clear
            // unheard here, found when the token is re-read at the store).
            let since = back.and_then(|(_, low)| {
                let now = self.0.inner.epoch_changes()?;
                Some(crate::versions::epoch_since(now, low))
            });
            let current = ticket.is_some_and(|t| versions.current(&t));
            if !current {
                if let Some(t) = tracked {
                    t.abandon();
                }
                Counters::bump(&self.0.inner.counters.loads_not_cached);
                tracing::debug!(key, "key invalidated during the load; result not cached");
                return Ok(false);
            }
            let object = Arc::new(value.clone()) as Object;
            if after_miss {
                return self
                    .0
                    .inner
                    .write_loaded(key, object, value, &eff, tracked, since)
                    .await;
            }
            // A load that replaces (a refresh, a forced load, one after an unreadable or a
            // failed read) is stored as `get_or_load` stores one: remembered as replacing
            // (withdrawn if it lands over a newer write), never made again in a new epoch,
            // announced as a load, and — its L2 store failing, L2 down — kept in L1, as the
            // caller is served it (before: a plain write, which evicted L1's copy and
            // announced a delete, so the first load during an outage left nothing for
            // fail-safe; found by review).
            if eff.write_l2()
                && let Some(ticket) = ticket
            {
                let (_, stored) = self
                    .0
                    .inner
                    .store_encoded(key, object, value, (&ticket, since), &eff, None, false)
                    .await?;
                return match stored {
                    crate::load::Stored::Cached => Ok(true),
                    // The caller learns of the failed store (a fail-closed read-through fails,
                    // a loader counts it); the value stays in L1 all the same.
                    crate::load::Stored::Failed(e) => Err(e),
                    _ => Ok(false),
                };
            }
        }
        self.set(key, value, ttl).await.map(|()| true)
    }

    /// L2 only if absent there (`SET NX`), then L1 and the announcement as for `set`.
    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        let object = Arc::new(value.clone()) as Object;
        let eff = self.write_eff(ttl);
        self.0
            .inner
            .write_loaded(key, object, value, &eff, None, None)
            .await
    }

    /// This instance's L1 only: L2 is what instances share.
    async fn evict_local(&self, keys: &[&str]) -> Result<u64> {
        let mut evicted = 0;
        for key in keys {
            evicted += u64::from(self.0.inner.invalidate_l1(key)?);
        }
        Ok(evicted)
    }

    /// This instance's L1 only (`*`: all of it, emptied as for a clear announced by another
    /// instance): L2 is what instances share.
    async fn evict_local_matching(&self, pattern: &str) -> Result<u64> {
        let inner = &self.0.inner;
        if pattern == "*" {
            let held = inner.l1.len() as u64;
            inner.invalidate_l1_all();
            return Ok(held);
        }
        inner.invalidate_l1_matching(pattern)
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        if let L1Read::Fresh(Some(_), _) = self.0.inner.l1_read::<Bytes>(key, &self.1)? {
            return Ok(true);
        }
        self.0
            .inner
            .l2_call("exists", self.0.inner.l2.exists(key))
            .await
    }

    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        self.0
            .inner
            .l2_call("ttl", self.0.inner.l2.get_ttl(key))
            .await
    }

    /// Changes the L2 TTL (it may shorten it) and drops every instance's L1 copy, which would
    /// otherwise outlive the new TTL.
    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        let inner = &self.0.inner;
        // Cancelled during the L2 call (which may have run): still evicted and announced.
        let cancelled = crate::cache::OnCancel::new(|| {
            let _ = inner.invalidate_l1(key);
            inner.queue_delete(key);
        });
        let changed = inner.l2_call("expire", inner.l2.extend_ttl(key, ttl)).await;
        cancelled.disarm();
        let _ = inner.invalidate_l1(key);
        inner.publish_delete(key).await;
        changed
    }

    /// `*` is [`MultiLevelCache::clear`]; another pattern deletes its matches in L2 and in every
    /// instance's L1.
    async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        let inner = &self.0.inner;
        if pattern == "*" {
            self.0.clear().await?;
            return Ok(0);
        }
        inner.invalidate_l1_matching(pattern)?;
        use crate::tombstone::Tombstone;
        let cancelled = crate::cache::OnCancel::new(|| {
            let _ = inner.invalidate_l1_matching(pattern);
            inner.queue_pattern(pattern);
            inner.queue_tombstone(Tombstone::Pattern(pattern));
        });
        let removed = inner
            .l2_call("clear_pattern", inner.l2.clear_pattern(pattern))
            .await;
        inner.invalidate_l1_matching(pattern)?;
        // Announced (and the trackers told, also after an error: the deletes may have run)
        // before the loads are rechecked, still guarded: a caller cancelled during either
        // still has it announced (review, helper-74, helper-75).
        inner.publish_pattern(pattern).await;
        let told = inner.tell_trackers(Tombstone::Pattern(pattern)).await;
        cancelled.disarm();
        if let Ok(glob) = ncm_cache_core::GlobPattern::new(pattern) {
            inner.recheck_loads_matching(|k| glob.matches(k)).await;
        }
        let removed = removed?;
        told?;
        Ok(removed)
    }

    async fn health_report(&self) -> HealthReport {
        self.0.inner.l2.health_report().await
    }

    fn get_stats(&self) -> CacheStats {
        let s = self.0.get_stats();
        let mut out = s.l2.clone();
        out.name.clone_from(&self.0.inner.opts.name);
        out.level = "multilevel".into();
        out.hits = s.l1_hits + s.l2_hits;
        out.misses = s.misses;
        out.total_requests = out.hits + out.misses;
        out.hit_rate = if out.total_requests == 0 {
            0.0
        } else {
            out.hits as f64 / out.total_requests as f64
        };
        out
    }

    fn record_decode_error(&self, key: &str) {
        let _ = self.0.inner.invalidate_l1(key);
        self.0.inner.l2.record_decode_error(key);
    }

    async fn close(&self) -> Result<()> {
        self.0.close().await
    }

    fn key_prefix(&self) -> Option<&str> {
        self.0.inner.l2.key_prefix()
    }
}

/// What the byte-level read found.
enum BytesRead {
    Found(Bytes, ValueSource),
    Absent,
    /// L2 holds nothing; a stale L1 copy fail-safe may serve if a load fails.
    Expired(Bytes),
    /// L2 failed (the error); a stale L1 copy fail-safe may serve.
    Stale(Bytes, ncm_cache_core::CacheError),
}
