//! The byte-level backend trait every store implements.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::error::{CacheError, Result};
use crate::stats::CacheStats;
use crate::ttl::KeyTtl;
use crate::turn::{Accept, LoadPermit, LoadTurn};

/// The future an `#[async_trait]` method returns.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The result of a health probe.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// `true` when the backend answered correctly.
    pub healthy: bool,
    /// How long the probe took.
    pub latency: Duration,
    /// The backend kind, e.g. `memory` or `redis`.
    pub backend: String,
    /// What went wrong, or other detail (server version, node count, ...).
    pub detail: String,
}

impl HealthReport {
    /// A report.
    pub fn new(
        healthy: bool,
        latency: Duration,
        backend: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            healthy,
            latency,
            backend: backend.into(),
            detail: detail.into(),
        }
    }
}

/// What a read before a load found ([`CacheBackend::get_for_load`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LoadRead {
    /// A value to serve.
    Hit(Bytes),
    /// Nothing: load.
    Miss,
    /// The shared store failed with `error`, and the backend kept `value` (stale, within its
    /// fail-safe age): load, and serve `value` only if the load fails too.
    Stale {
        /// The stale copy.
        value: Bytes,
        /// Why the shared store could not be read.
        error: CacheError,
    },
    /// The shared store answered and holds nothing (its copy expired or was evicted), and the
    /// backend kept `value` (stale, within its fail-safe age): load as after a
    /// [`Miss`](Self::Miss) — storing only while the key is still absent — and serve `value`
    /// only if the load fails (fail-safe's "the source is down" case). Never a value to serve
    /// as a hit.
    Expired {
        /// The stale copy.
        value: Bytes,
    },
}

/// A byte-level cache store: the memory backend, Redis, a multi-level cache, or your own.
///
/// The trait is object safe, so caches compose at run time as `Arc<dyn CacheBackend>`: a
/// multi-level cache takes any backend as L2, strategies and loaders take any backend.
/// Keys are the caller's keys; a backend that shares its store applies its own prefix
/// ([`KeySpace`](crate::KeySpace)). Values are opaque bytes — the typed
/// [`Cache`](crate::Cache) facade encodes and decodes them with a [`Codec`](crate::Codec).
///
/// Contract (checked by the conformance suite in `ncm-cache-testkit`):
/// - an expired key is never returned and counts as missing everywhere;
/// - `ttl: None` means "no expiry"; a zero TTL is rejected with `InvalidArgument`;
/// - batch results come back in the order of the keys given;
/// - `clear_pattern` uses Redis `MATCH` glob syntax and only touches this cache's keys;
/// - invalid keys are rejected with `InvalidKey` before any I/O.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use bytes::Bytes;
/// use ncm_cache_core::{CacheBackend, CacheStats, HealthReport, KeyTtl, Result};
///
/// /// A backend that stores nothing (every read is a miss).
/// #[derive(Debug)]
/// struct Null;
///
/// #[async_trait]
/// impl CacheBackend for Null {
///     fn name(&self) -> &str { "null" }
///     async fn get(&self, _key: &str) -> Result<Option<Bytes>> { Ok(None) }
///     async fn set(&self, _key: &str, _value: Bytes, _ttl: Option<Duration>) -> Result<()> { Ok(()) }
///     async fn delete(&self, _key: &str) -> Result<bool> { Ok(false) }
///     async fn exists(&self, _key: &str) -> Result<bool> { Ok(false) }
///     async fn get_ttl(&self, _key: &str) -> Result<KeyTtl> { Ok(KeyTtl::Missing) }
///     async fn extend_ttl(&self, _key: &str, _ttl: Duration) -> Result<bool> { Ok(false) }
///     async fn clear_pattern(&self, _pattern: &str) -> Result<u64> { Ok(0) }
///     async fn health_report(&self) -> HealthReport {
///         HealthReport::new(true, Duration::ZERO, "null", "")
///     }
///     fn get_stats(&self) -> CacheStats { CacheStats::default() }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let backend: Arc<dyn CacheBackend> = Arc::new(Null);
/// assert_eq!(backend.get("k").await.unwrap(), None);
/// // Batch operations have default implementations built on the single-key ones.
/// assert_eq!(backend.get_many(&["a", "b"]).await.unwrap(), vec![None, None]);
/// # });
/// ```
#[async_trait]
pub trait CacheBackend: Send + Sync + Debug + 'static {
    /// The cache's name, used as the `cache` label in stats and metrics.
    fn name(&self) -> &str;

    /// Reads a value; `None` when the key is missing or expired.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;

    /// Writes a value, replacing any previous one. `ttl: None` stores it without expiry.
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()>;

    /// Removes a key; `true` when it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// `true` when the key exists and has not expired.
    async fn exists(&self, key: &str) -> Result<bool>;

    /// [`get`](Self::get) before a load (a read-through, a loader, a reload): tells a value to
    /// serve from a copy a fail-safe backend kept while its shared store failed
    /// ([`LoadRead::Stale`]) or after the shared store's copy expired ([`LoadRead::Expired`]),
    /// which the caller should serve only if its load fails too — a plain `get` serves the
    /// first as a hit and the second as a miss. The default has no such copies; a backend
    /// that wraps another should forward this method too, or the copies it passes on become
    /// hits.
    async fn get_for_load(&self, key: &str) -> Result<LoadRead> {
        Ok(match self.get(key).await? {
            Some(value) => LoadRead::Hit(value),
            None => LoadRead::Miss,
        })
    }

    /// [`get_many`](Self::get_many) before a load (see [`get_for_load`](Self::get_for_load)):
    /// one [`LoadRead`] per key, in order.
    async fn get_many_for_load(&self, keys: &[&str]) -> Result<Vec<LoadRead>> {
        Ok(self
            .get_many(keys)
            .await?
            .into_iter()
            .map(|v| v.map_or(LoadRead::Miss, LoadRead::Hit))
            .collect())
    }

    /// Reads several keys; the result has one slot per key, in order.
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(key).await?);
        }
        Ok(out)
    }

    /// Writes several values with one TTL.
    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Option<Duration>) -> Result<()> {
        for (key, value) in entries {
            self.set(key, value.clone(), ttl).await?;
        }
        Ok(())
    }

    /// Removes several keys; returns how many existed.
    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        let mut n = 0;
        for key in keys {
            n += u64::from(self.delete(key).await?);
        }
        Ok(n)
    }

    /// What this backend knows of `key`'s invalidations now, taken by a read-through before
    /// its loader reads the source and handed back to [`set_loaded`](Self::set_loaded).
    /// `None` (the default): the backend keeps no such counters.
    ///
    /// `Cache::read_through_with`, `CacheStrategies::read_through` / `cache_aside` and
    /// `CacheLoader` take a mark after their cache read and store with it: a miss mark
    /// ([`LoadMark::after_miss`], `Cache::miss_mark`) only when the read found the key absent;
    /// a plain one when it found something it could not read, or failed, and for reloads and
    /// refreshes, which replace what is there.
    fn load_mark(&self, key: &str) -> Option<LoadMark> {
        let _ = key;
        None
    }

    /// Stores a loaded value as [`set`](Self::set) does, unless `key` was invalidated or
    /// written on this instance since `mark` was taken: the load may have read the source
    /// before a newer write, whose invalidation this instance has seen, and its older value
    /// must not be put back for the TTL. A mark taken after a miss
    /// ([`LoadMark::follows_miss`]) also stores only while the key is still absent
    /// ([`set_if_absent`](Self::set_if_absent)): whatever is there now was written after the
    /// miss, by this instance or another, and is at least as new as what the load read.
    /// Returns whether it was stored. The default keeps no counters: it stores, only if
    /// absent after a miss.
    ///
    /// A multi-level cache checks its per-key versions (as its own `get_or_load` does); a
    /// wrapper backend must forward both methods.
    async fn set_loaded(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        mark: Option<LoadMark>,
    ) -> Result<bool> {
        if mark.is_some_and(|m| m.follows_miss()) {
            return self.set_if_absent(key, value, ttl).await;
        }
        self.set(key, value, ttl).await.map(|()| true)
    }

    /// Called by a load after its read found `key` absent, before it reads the source: waits
    /// for the key's turn when the backend coordinates loads across processes (a multi-level
    /// cache's stampede lock), so one process loads while the others wait and then take its
    /// value ([`LoadTurn::Found`]; only one `accept` takes, see [`Accept`]). `has_stale`: the
    /// caller holds a stale copy it can serve; a wait that gives up while the copy may still
    /// be served fails with [`CacheError::Timeout`] (serve the copy) instead of loading. The
    /// default coordinates nothing: [`LoadTurn::Load`] with a free permit.
    ///
    /// `CacheLoader` (and the macros), `CacheStrategies::read_through` and `SqlCache` call it;
    /// a wrapper backend must forward it.
    ///
    /// # Errors
    ///
    /// [`CacheError::Timeout`] when `has_stale` and the wait gave up.
    async fn begin_load(&self, key: &str, has_stale: bool, accept: Accept<'_>) -> Result<LoadTurn> {
        let _ = (key, has_stale, accept);
        Ok(LoadTurn::Load(LoadPermit::free()))
    }

    /// A stale copy [`get_for_load`](Self::get_for_load) handed back ([`LoadRead::Stale`],
    /// [`LoadRead::Expired`]),
    /// asked for again when the caller is about to serve it because its load failed: the copy
    /// to serve now, or `None` when it may no longer be served — the load may have taken
    /// longer than what was left of the copy's fail-safe age. The default serves `copy`; a
    /// multi-level cache answers with its L1 copy if it is still within its max stale age (a
    /// wrapper backend must forward it).
    async fn stale_to_serve(&self, key: &str, copy: Bytes) -> Option<Bytes> {
        let _ = key;
        Some(copy)
    }

    /// Writes `value` only if `key` holds nothing (Redis `SET NX`); returns whether it was
    /// written. What a load that followed a miss stores with: it must not overwrite a value
    /// written since the miss.
    ///
    /// The default asks [`exists`](Self::exists), then sets: not atomic (a write between the
    /// two is overwritten). A backend that others share overrides it with one atomic command;
    /// a wrapper backend must forward it.
    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        if self.exists(key).await? {
            return Ok(false);
        }
        self.set(key, value, ttl).await.map(|()| true)
    }

    /// Removes `keys` from what this instance alone keeps, leaving what other instances share;
    /// returns how many were removed here. This is what another instance's invalidation
    /// message asks for (`ncm-cache-strategies` with Redis coordination): that instance has
    /// removed the shared copy already, and may have written a new value since.
    ///
    /// The default follows [`key_prefix`](Self::key_prefix): a store others share (`Some`)
    /// removes nothing, one this process alone owns (`None`, in-process memory) is deleted
    /// from ([`delete_many`](Self::delete_many)). A backend that keeps a part of its own over
    /// a shared store overrides it (a multi-level cache evicts its L1 only); a wrapper backend
    /// must forward it.
    async fn evict_local(&self, keys: &[&str]) -> Result<u64> {
        if self.key_prefix().is_some() {
            return Ok(0);
        }
        self.delete_many(keys).await
    }

    /// [`evict_local`](Self::evict_local) for every key matching a Redis-style glob (`*`: all
    /// this instance keeps alone). The default follows [`key_prefix`](Self::key_prefix) as
    /// `evict_local` does, with [`clear_pattern`](Self::clear_pattern) for a store of its own.
    async fn evict_local_matching(&self, pattern: &str) -> Result<u64> {
        if self.key_prefix().is_some() {
            return Ok(0);
        }
        self.clear_pattern(pattern).await
    }

    /// The remaining lifetime of a key.
    async fn get_ttl(&self, key: &str) -> Result<KeyTtl>;

    /// Sets the key's remaining lifetime to `ttl` from now (Redis `PEXPIRE`); `false` when the
    /// key does not exist.
    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool>;

    /// Reads a value and, when found, sets its remaining lifetime to `ttl` from now (sliding
    /// expiration: an entry read often stays, an idle one expires). Redis does both in one
    /// `GETEX PX`; the default reads, then calls [`extend_ttl`](Self::extend_ttl) — whose
    /// failure is logged, not returned: the read succeeded, and the entry keeps its old TTL.
    async fn get_and_touch(&self, key: &str, ttl: Duration) -> Result<Option<Bytes>> {
        get_then_extend(self, key, ttl).await
    }

    /// Removes every key of this cache matching a Redis-style glob; returns how many.
    async fn clear_pattern(&self, pattern: &str) -> Result<u64>;

    /// Probes the backend and reports its health and latency.
    async fn health_report(&self) -> HealthReport;

    /// `true` when the backend answers (the original's `health_check()`).
    async fn health_check(&self) -> bool {
        self.health_report().await.healthy
    }

    /// A snapshot of the statistics.
    fn get_stats(&self) -> CacheStats;

    /// Hook: a value read from `key` could not be decoded by the caller's codec. Backends count
    /// it (the read becomes a miss in their stats); the caller then deletes the entry.
    fn record_decode_error(&self, key: &str) {
        let _ = key;
    }

    /// Releases connections and background tasks. Further calls may fail with `Closed`.
    async fn close(&self) -> Result<()> {
        Ok(())
    }

    /// Reads one of ncm-cache's own keys, [`RESERVED_KEY_PREFIX`](crate::RESERVED_KEY_PREFIX)
    /// + `name`, which user calls cannot name (they refuse keys in that namespace). The
    /// multi-level cache keeps its epoch there.
    ///
    /// The default reads `get("__ncm:{name}")`, which suits a backend that does not refuse
    /// reserved keys; the built-in backends override it, and **a wrapper backend must forward
    /// it**.
    async fn get_reserved(&self, name: &str) -> Result<Option<Bytes>> {
        self.get(&format!("{}{name}", crate::RESERVED_KEY_PREFIX))
            .await
    }

    /// Writes one of ncm-cache's own keys (see [`get_reserved`](Self::get_reserved)).
    async fn set_reserved(&self, name: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.set(&format!("{}{name}", crate::RESERVED_KEY_PREFIX), value, ttl)
            .await
    }

    /// Writes one of ncm-cache's own keys only if it holds nothing (see
    /// [`get_reserved`](Self::get_reserved)); returns whether it was written. The multi-level
    /// cache creates its epoch key so: instances that find it absent together agree on one.
    ///
    /// The default reads, then writes: not atomic (two callers may both write, the later
    /// winning). A backend that others share overrides it with one atomic command (Redis:
    /// `SET NX`); **a wrapper backend must forward it**.
    async fn set_reserved_if_absent(
        &self,
        name: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        if self.get_reserved(name).await?.is_some() {
            return Ok(false);
        }
        self.set_reserved(name, value, ttl).await.map(|()| true)
    }

    /// For a backend whose store others share (Redis): the prefix every key of this cache
    /// gets, so that callers can refuse whole-store operations when it is empty (`Some("")`:
    /// this cache's keys are mixed with everyone else's). `None` (the default): the store
    /// belongs to this backend alone.
    ///
    /// **A wrapper backend must forward it**: caches bind signed values to the stored key,
    /// prefix included (`[prefix, key]` passed to `Codec::encode_for`), so a wrapper that
    /// reports `None` over a prefixed store writes values that other paths over the same
    /// store (which see the prefix) reject, and lets signed values move between prefixes.
    fn key_prefix(&self) -> Option<&str> {
        None
    }
}

/// What a backend knew of a key's invalidations when a load began
/// ([`CacheBackend::load_mark`]), and whether the load followed a miss; the counters are
/// opaque to everyone but the backend that made them.
///
/// ```
/// use ncm_cache_core::LoadMark;
///
/// let mark = LoadMark::new([7, 0, 0, 0]);
/// assert!(!mark.follows_miss());
/// let after_miss = mark.after_miss();
/// assert!(after_miss.follows_miss());
/// assert_eq!(after_miss.parts(), [7, 0, 0, 0]);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LoadMark {
    parts: [u64; 4],
    after_miss: bool,
}

impl LoadMark {
    /// A mark from a backend's own counters. The fourth part may count writes that do not
    /// name a new single-flight ([`flight_key`](Self::flight_key) leaves it out): a backend
    /// whose writes fill the cache before they return, so that later callers find the value.
    pub const fn new(parts: [u64; 4]) -> Self {
        Self {
            parts,
            after_miss: false,
        }
    }

    /// The counters it was made from.
    pub const fn parts(&self) -> [u64; 4] {
        self.parts
    }

    /// The same mark, for a load that began with the key absent from the cache: its value is
    /// stored only if the key is still absent ([`CacheBackend::set_loaded`]). A reload or a
    /// refresh, which replaces a value on purpose, keeps the plain mark.
    #[must_use]
    pub const fn after_miss(self) -> Self {
        Self {
            after_miss: true,
            ..self
        }
    }

    /// Whether the load followed a miss ([`after_miss`](Self::after_miss)).
    pub const fn follows_miss(&self) -> bool {
        self.after_miss
    }

    /// The single-flight name of a load of `key` that begins with `mark`: callers whose marks
    /// differ in their first three parts — an invalidation of the key came between them — do
    /// not share a load, so a caller arriving after it never waits for, and gets, what a load
    /// begun before it read. `None`, or counters all zero (a backend without counters): the
    /// key alone.
    ///
    /// The counters are striped (a multi-level cache also has a cache-wide one): a write or
    /// invalidation of *another* key of the stripe, or a pattern invalidation, also starts a
    /// new flight — more loads of a hot key whose loader is slow while its stripe is written.
    ///
    /// ```
    /// use ncm_cache_core::LoadMark;
    ///
    /// let before = Some(LoadMark::new([0, 3, 1, 0]));
    /// let after = Some(LoadMark::new([0, 3, 2, 0]));
    /// assert_ne!(LoadMark::flight_key("k", before), LoadMark::flight_key("k", after));
    /// // The fourth part (writes that fill the cache) keeps the flight.
    /// let written = Some(LoadMark::new([0, 3, 1, 9]));
    /// assert_eq!(LoadMark::flight_key("k", before), LoadMark::flight_key("k", written));
    /// assert_eq!(LoadMark::flight_key("k", None), "k");
    /// assert_eq!(LoadMark::flight_key("k", Some(LoadMark::default().after_miss())), "k");
    /// ```
    pub fn flight_key(key: &str, mark: Option<Self>) -> String {
        match mark {
            Some(m) if m.parts[..3] != [0; 3] => {
                let [a, b, c, _] = m.parts;
                format!("{key}\u{0}{a:x}.{b:x}.{c:x}")
            }
            _ => key.to_owned(),
        }
    }
}

#[async_trait]
impl<B: CacheBackend + ?Sized> CacheBackend for Arc<B> {
    fn name(&self) -> &str {
        (**self).name()
    }
    // `get`, `set` and `get_for_load` return the inner call's future as it is, not boxed again
    // (every call through a `SharedBackend` takes this impl; a second box per call cost a few
    // per cent of a batched Redis read's throughput, docs/BENCHMARKS.md).
    fn get<'life0, 'life1, 'async_trait>(
        &'life0 self,
        key: &'life1 str,
    ) -> BoxFuture<'async_trait, Result<Option<Bytes>>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        (**self).get(key)
    }
    fn set<'life0, 'life1, 'async_trait>(
        &'life0 self,
        key: &'life1 str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> BoxFuture<'async_trait, Result<()>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        (**self).set(key, value, ttl)
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        (**self).delete(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool> {
        (**self).exists(key).await
    }
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        (**self).get_many(keys).await
    }
    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Option<Duration>) -> Result<()> {
        (**self).set_many(entries, ttl).await
    }
    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        (**self).delete_many(keys).await
    }
    fn load_mark(&self, key: &str) -> Option<LoadMark> {
        (**self).load_mark(key)
    }
    async fn set_loaded(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        mark: Option<LoadMark>,
    ) -> Result<bool> {
        (**self).set_loaded(key, value, ttl, mark).await
    }
    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        (**self).set_if_absent(key, value, ttl).await
    }
    async fn evict_local(&self, keys: &[&str]) -> Result<u64> {
        (**self).evict_local(keys).await
    }
    async fn evict_local_matching(&self, pattern: &str) -> Result<u64> {
        (**self).evict_local_matching(pattern).await
    }
    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        (**self).get_ttl(key).await
    }
    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        (**self).extend_ttl(key, ttl).await
    }
    async fn get_and_touch(&self, key: &str, ttl: Duration) -> Result<Option<Bytes>> {
        (**self).get_and_touch(key, ttl).await
    }
    fn get_for_load<'life0, 'life1, 'async_trait>(
        &'life0 self,
        key: &'life1 str,
    ) -> BoxFuture<'async_trait, Result<LoadRead>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        (**self).get_for_load(key)
    }
    async fn begin_load(&self, key: &str, has_stale: bool, accept: Accept<'_>) -> Result<LoadTurn> {
        (**self).begin_load(key, has_stale, accept).await
    }
    async fn get_many_for_load(&self, keys: &[&str]) -> Result<Vec<LoadRead>> {
        (**self).get_many_for_load(keys).await
    }
    async fn stale_to_serve(&self, key: &str, copy: Bytes) -> Option<Bytes> {
        (**self).stale_to_serve(key, copy).await
    }
    async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        (**self).clear_pattern(pattern).await
    }
    async fn health_report(&self) -> HealthReport {
        (**self).health_report().await
    }
    async fn health_check(&self) -> bool {
        (**self).health_check().await
    }
    fn get_stats(&self) -> CacheStats {
        (**self).get_stats()
    }
    fn record_decode_error(&self, key: &str) {
        (**self).record_decode_error(key)
    }
    async fn close(&self) -> Result<()> {
        (**self).close().await
    }
    async fn get_reserved(&self, name: &str) -> Result<Option<Bytes>> {
        (**self).get_reserved(name).await
    }
    async fn set_reserved(&self, name: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        (**self).set_reserved(name, value, ttl).await
    }
    async fn set_reserved_if_absent(
        &self,
        name: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        (**self).set_reserved_if_absent(name, value, ttl).await
    }
    fn key_prefix(&self) -> Option<&str> {
        (**self).key_prefix()
    }
}

/// Records which tags a cache key carries, so that invalidating a tag can find its keys: what
/// a multi-level cache calls when a loader tags its value (adaptive caching).
/// `ncm-cache-strategies` implements it over its tag graph (`CacheStrategies::tag_index`).
///
/// ```
/// use std::sync::Mutex;
/// use std::time::Duration;
/// use ncm_cache_core::{Result, TagIndex, async_trait};
///
/// /// An in-process index (one process only).
/// #[derive(Debug, Default)]
/// struct Local(Mutex<Vec<(String, String)>>);
///
/// #[async_trait]
/// impl TagIndex for Local {
///     async fn tag(&self, key: &str, tags: &[String], _ttl: Option<Duration>) -> Result<()> {
///         let mut pairs = self.0.lock().unwrap();
///         pairs.extend(tags.iter().map(|t| (t.clone(), key.to_owned())));
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait TagIndex: Send + Sync + Debug + 'static {
    /// Records that `key` carries `tags`, for as long as `ttl` (the entry's lifetime; `None`:
    /// until the key is deleted).
    async fn tag(&self, key: &str, tags: &[String], ttl: Option<Duration>) -> Result<()>;
}

/// [`CacheBackend::get_and_touch`] in two calls: a read, then, when found,
/// [`extend_ttl`](CacheBackend::extend_ttl) — whose failure is logged, not returned (the read
/// succeeded; the entry keeps its old TTL). The trait's default, and a fallback for backends
/// whose one-call form the server refuses.
///
/// ```
/// # use ncm_cache_core::{CacheBackend, get_then_extend};
/// # async fn demo(backend: &dyn CacheBackend) -> ncm_cache_core::Result<()> {
/// let value = get_then_extend(backend, "session:1", std::time::Duration::from_secs(60)).await?;
/// # let _ = value; Ok(()) }
/// ```
pub async fn get_then_extend<B: CacheBackend + ?Sized>(
    backend: &B,
    key: &str,
    ttl: Duration,
) -> Result<Option<Bytes>> {
    let found = backend.get(key).await?;
    if found.is_some()
        && let Err(e) = backend.extend_ttl(key, ttl).await
    {
        tracing::debug!(key, error = %e, "sliding expiration: TTL not re-armed");
    }
    Ok(found)
}

/// Compile-time check that [`CacheBackend`] stays object safe.
const _: fn(&dyn CacheBackend) = |_| {};

/// A shared, type-erased backend.
pub type SharedBackend = Arc<dyn CacheBackend>;
