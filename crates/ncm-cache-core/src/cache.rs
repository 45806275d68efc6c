//! The typed facade: `get::<T>` / `set` over any backend and codec.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::{CacheBackend, HealthReport, SharedBackend};
use crate::codec::Codec;
use crate::error::{CacheError, Result};
use crate::stats::CacheStats;
use crate::ttl::{Expiry, KeyTtl, TtlPolicy};
use crate::types::CacheFailure;

/// A typed cache: encodes values with a [`Codec`] and stores them in a [`CacheBackend`].
///
/// Cloning is cheap (one `Arc`); clones share the backend. Reads treat a stored value that cannot
/// be decoded (corrupt, written by an incompatible version, foreign bytes) as a miss: the entry is
/// counted as a codec error and removed, so the next write repairs it. Use
/// [`try_get`](Self::try_get) to see the error instead.
///
/// ```
/// # use bytes::Bytes; use serde::{Serialize, de::DeserializeOwned};
/// # use ncm_cache_core::{Codec, CodecError, CodecErrorKind};
/// # #[derive(Debug, Clone, Copy)] struct PlainJson;
/// # impl Codec for PlainJson {
/// #     fn encode<T: Serialize + ?Sized>(&self, v: &T) -> Result<Bytes, CodecError> {
/// #         serde_json::to_vec(v).map(Bytes::from).map_err(|e| CodecError::with_source(CodecErrorKind::Encode, "json", e)) }
/// #     fn decode<T: DeserializeOwned>(&self, b: &[u8]) -> Result<T, CodecError> {
/// #         serde_json::from_slice(b).map_err(|e| CodecError::with_source(CodecErrorKind::Decode, "json", e)) }
/// # }
/// # #[derive(Debug)] struct Store(std::sync::Mutex<std::collections::HashMap<String, Bytes>>);
/// # #[async_trait::async_trait] impl ncm_cache_core::CacheBackend for Store {
/// #   fn name(&self) -> &str { "doc" }
/// #   async fn get(&self, k: &str) -> ncm_cache_core::Result<Option<Bytes>> { Ok(self.0.lock().unwrap().get(k).cloned()) }
/// #   async fn set(&self, k: &str, v: Bytes, _t: Option<std::time::Duration>) -> ncm_cache_core::Result<()> { self.0.lock().unwrap().insert(k.into(), v); Ok(()) }
/// #   async fn delete(&self, k: &str) -> ncm_cache_core::Result<bool> { Ok(self.0.lock().unwrap().remove(k).is_some()) }
/// #   async fn exists(&self, k: &str) -> ncm_cache_core::Result<bool> { Ok(self.0.lock().unwrap().contains_key(k)) }
/// #   async fn get_ttl(&self, _k: &str) -> ncm_cache_core::Result<ncm_cache_core::KeyTtl> { Ok(ncm_cache_core::KeyTtl::Persistent) }
/// #   async fn extend_ttl(&self, _k: &str, _t: std::time::Duration) -> ncm_cache_core::Result<bool> { Ok(true) }
/// #   async fn clear_pattern(&self, _p: &str) -> ncm_cache_core::Result<u64> { Ok(0) }
/// #   async fn health_report(&self) -> ncm_cache_core::HealthReport { ncm_cache_core::HealthReport::new(true, std::time::Duration::ZERO, "doc", "") }
/// #   fn get_stats(&self) -> ncm_cache_core::CacheStats { Default::default() }
/// # }
/// # let backend = Store(Default::default());
/// use std::time::Duration;
/// use ncm_cache_core::Cache;
///
/// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
/// struct User { name: String, email: String }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cache = Cache::builder(backend, PlainJson)
///     .default_ttl(Duration::from_secs(3600))
///     .build();
/// let user = User { name: "John".into(), email: "john@example.com".into() };
/// cache.set("user:123", &user).await?;
/// assert_eq!(cache.get::<User>("user:123").await?, Some(user));
/// assert!(cache.delete("user:123").await?);
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
pub struct Cache<C> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    backend: SharedBackend,
    codec: C,
    ttl: TtlPolicy,
    max_value_size: Option<usize>,
}

impl<C> Clone for Cache<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for Cache<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("backend", &self.inner.backend)
            .field("ttl", &self.inner.ttl)
            .field("max_value_size", &self.inner.max_value_size)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Cache`].
#[derive(Debug)]
#[must_use]
pub struct CacheBuilder<C> {
    backend: SharedBackend,
    codec: C,
    ttl: TtlPolicy,
    max_value_size: Option<usize>,
}

impl<C: Codec> CacheBuilder<C> {
    /// The TTL used by [`Cache::set`] (default: no expiry).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = TtlPolicy::new(Some(ttl)).with_jitter(self.ttl.jitter());
        self
    }

    /// Randomly shortens each TTL by up to this fraction (0.0–0.5) to spread expiries.
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.ttl = self.ttl.with_jitter(fraction);
        self
    }

    /// Sets the whole TTL policy.
    pub fn ttl_policy(mut self, policy: TtlPolicy) -> Self {
        self.ttl = policy;
        self
    }

    /// Rejects encoded values larger than `bytes` with [`CacheError::ValueTooLarge`].
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = Some(bytes);
        self
    }

    /// Builds the cache.
    pub fn build(self) -> Cache<C> {
        Cache {
            inner: Arc::new(Inner {
                backend: self.backend,
                codec: self.codec,
                ttl: self.ttl,
                max_value_size: self.max_value_size,
            }),
        }
    }
}

impl<C: Codec> Cache<C> {
    /// A cache over `backend` with `codec`, no default TTL and no value size limit.
    pub fn new(backend: impl CacheBackend, codec: C) -> Self {
        Self::builder(backend, codec).build()
    }

    /// A cache over an already shared backend.
    pub fn from_shared(backend: SharedBackend, codec: C) -> Self {
        Self::builder_shared(backend, codec).build()
    }

    /// A builder over `backend` with `codec`.
    pub fn builder(backend: impl CacheBackend, codec: C) -> CacheBuilder<C> {
        Self::builder_shared(Arc::new(backend), codec)
    }

    /// A builder over an already shared backend.
    pub fn builder_shared(backend: SharedBackend, codec: C) -> CacheBuilder<C> {
        CacheBuilder {
            backend,
            codec,
            ttl: TtlPolicy::default(),
            max_value_size: None,
        }
    }

    /// The backend, for composing (e.g. as the L2 of a multi-level cache).
    pub fn backend(&self) -> &SharedBackend {
        &self.inner.backend
    }

    /// The codec.
    pub fn codec(&self) -> &C {
        &self.inner.codec
    }

    /// The TTL policy.
    pub fn ttl_policy(&self) -> TtlPolicy {
        self.inner.ttl
    }

    /// Reads and decodes a value. A value that cannot be decoded is counted and reported as a
    /// miss; it is removed when damaged or forged, left when another build may read it (see
    /// [`decode_entry`](Self::decode_entry)).
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let Some(bytes) = self.inner.backend.get(key).await? else {
            return Ok(None);
        };
        Ok(self.decode_entry(key, &bytes).await)
    }

    /// Reads and decodes a value, returning decode failures as [`CacheError::Codec`] (the entry
    /// is left in place).
    pub async fn try_get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.inner.backend.get(key).await? {
            None => Ok(None),
            Some(bytes) => Ok(Some(self.decode_for(key, &bytes)?)),
        }
    }

    /// Encodes and stores a value with the default TTL.
    pub async fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        self.set_with_expiry(key, value, Expiry::Default).await
    }

    /// Encodes and stores a value that expires after `ttl`.
    pub async fn set_with_ttl<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        self.set_with_expiry(key, value, Expiry::After(ttl)).await
    }

    /// Encodes and stores a value with an explicit [`Expiry`].
    pub async fn set_with_expiry<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        expiry: Expiry,
    ) -> Result<()> {
        let ttl = self.inner.ttl.resolve(expiry)?;
        let bytes = self.encode_for(key, value)?;
        self.inner.backend.set(key, bytes, ttl).await
    }

    /// Removes a key; `true` when it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.inner.backend.delete(key).await
    }

    /// `true` when the key exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        self.inner.backend.exists(key).await
    }

    /// The remaining TTL; `None` when the key is missing or never expires
    /// (use [`ttl_state`](Self::ttl_state) to tell them apart).
    pub async fn get_ttl(&self, key: &str) -> Result<Option<Duration>> {
        Ok(self.inner.backend.get_ttl(key).await?.remaining())
    }

    /// The key's TTL state: missing, persistent, or expiring after a duration.
    pub async fn ttl_state(&self, key: &str) -> Result<KeyTtl> {
        self.inner.backend.get_ttl(key).await
    }

    /// Sets the key's remaining lifetime to `ttl` from now; `false` when the key is missing.
    pub async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        if ttl.is_zero() {
            return Err(CacheError::InvalidArgument(
                "a TTL must be greater than zero (delete the key instead)".into(),
            ));
        }
        self.inner.backend.extend_ttl(key, ttl).await
    }

    /// Reads several keys in one batch; results in key order, undecodable values as `None`.
    pub async fn get_many<T: DeserializeOwned>(&self, keys: &[&str]) -> Result<Vec<Option<T>>> {
        let raw = self.inner.backend.get_many(keys).await?;
        let mut out = Vec::with_capacity(raw.len());
        for (key, bytes) in keys.iter().zip(raw) {
            out.push(match bytes {
                None => None,
                Some(bytes) => self.decode_entry(key, &bytes).await,
            });
        }
        Ok(out)
    }

    /// Encodes and writes several values in one batch with one expiry.
    pub async fn set_many<K, T, I>(&self, entries: I, expiry: impl Into<Expiry>) -> Result<()>
    where
        I: IntoIterator<Item = (K, T)>,
        K: AsRef<str>,
        T: Serialize,
    {
        let ttl = self.inner.ttl.resolve(expiry.into())?;
        let encoded = entries
            .into_iter()
            .map(|(k, v)| {
                let bytes = self.encode_for(k.as_ref(), &v)?;
                Ok((k, bytes))
            })
            .collect::<Result<Vec<_>>>()?;
        let borrowed: Vec<(&str, Bytes)> = encoded
            .iter()
            .map(|(k, v)| (k.as_ref(), v.clone()))
            .collect();
        self.inner.backend.set_many(&borrowed, ttl).await
    }

    /// Removes several keys; returns how many existed.
    pub async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        self.inner.backend.delete_many(keys).await
    }

    /// Removes every key of this cache matching a Redis-style glob (use
    /// [`escape_glob`](crate::escape_glob) on user-supplied parts).
    pub async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        self.inner.backend.clear_pattern(pattern).await
    }

    /// Returns the cached value, or runs `loader`, caches its result and returns it
    /// (the original's `read_through`). Loader errors are returned and nothing is cached. The
    /// cache failing never fails the call ([`CacheFailure::FailOpen`]: a failed read is a miss,
    /// a failed write is logged); see [`read_through_with`](Self::read_through_with).
    pub async fn read_through<T, F, Fut, E>(
        &self,
        key: &str,
        loader: F,
        expiry: impl Into<Expiry>,
    ) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.read_through_with(key, loader, expiry, CacheFailure::FailOpen)
            .await
    }

    /// [`read_through`](Self::read_through) with the choice of what a cache failure does —
    /// the one read-through implementation (the strategies crate and `CacheLoader` use its
    /// steps, [`read_for_load`](Self::read_for_load) and [`store_loaded`](Self::store_loaded)).
    ///
    /// ```
    /// # use ncm_cache_core::{Cache, CacheFailure, Expiry};
    /// # async fn demo<C: ncm_cache_core::Codec>(cache: Cache<C>) -> ncm_cache_core::Result<()> {
    /// let name: String = cache
    ///     .read_through_with("user:1", || async { Ok::<_, std::io::Error>("Ada".to_owned()) },
    ///         Expiry::Default, CacheFailure::FailClosed)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// The loader's error ([`CacheError::Loader`]); an invalid key or expiry; with
    /// [`CacheFailure::FailClosed`], the cache's error on read or write.
    pub async fn read_through_with<T, F, Fut, E>(
        &self,
        key: &str,
        loader: F,
        expiry: impl Into<Expiry>,
        on_failure: CacheFailure,
    ) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let expiry = expiry.into();
        self.ttl_policy().resolve(expiry)?;
        let (found, mark, stale) = self.read_for_load_fail_safe(key, on_failure).await?;
        if let Some(value) = found {
            return Ok(value);
        }
        let value = match loader().await {
            Ok(value) => value,
            // The store failed and the backend kept a stale copy (fail-safe): served when the
            // load fails too.
            Err(e) => {
                return self
                    .stale_after_load(key, stale.as_ref())
                    .await
                    .ok_or_else(|| CacheError::loader(e));
            }
        };
        match self.encode_for(key, &value) {
            Ok(bytes) => {
                self.store_loaded_since(key, bytes, expiry, on_failure, mark)
                    .await?;
            }
            Err(e) => on_failure.apply(key, "encode", e)?,
        }
        Ok(value)
    }

    /// The read step of a read-through: the cached value; under
    /// [`CacheFailure::FailOpen`] a failing cache is a miss (logged). An invalid key is an
    /// error either way.
    pub async fn read_for_load<T: DeserializeOwned>(
        &self,
        key: &str,
        on_failure: CacheFailure,
    ) -> Result<Option<T>> {
        match self.get::<T>(key).await {
            Ok(found) => Ok(found),
            Err(e) => on_failure.apply(key, "get", e).map(|()| None),
        }
    }

    /// [`read_for_load`](Self::read_for_load) with the mark to store the load with
    /// ([`store_loaded_since`](Self::store_loaded_since)), taken after the read: on a hit
    /// `(Some(value), None)`. The key absent: [`miss_mark`](Self::miss_mark) (the load is
    /// stored only while the key is still absent). Present but unreadable here (damaged, or
    /// another build's newer envelope, left in place), or the read failed under
    /// [`CacheFailure::FailOpen`]: a plain [`load_mark`](Self::load_mark), so the load replaces
    /// what it could not read — a miss mark would be refused by that very entry every time.
    ///
    /// A fail-safe backend's stale copy (its shared store failed) is answered as found: use
    /// [`read_for_load_fail_safe`](Self::read_for_load_fail_safe) to load first and fall back
    /// on it only when the load fails.
    pub async fn read_for_load_marked<T: DeserializeOwned>(
        &self,
        key: &str,
        on_failure: CacheFailure,
    ) -> Result<(Option<T>, Option<crate::LoadMark>)> {
        // A fail-safe copy of a failed read is this call's answer, as it was before
        // `get_for_load` told it apart: a caller of this step has no way to fall back on it
        // after its load. (The copy of an expired entry is not: the cache answered "absent".)
        let (found, mark, stale, failed) = self.read_before_load(key, on_failure).await?;
        if found.is_none()
            && failed
            && let Some(value) = self.decode_stale(key, stale.as_ref())
        {
            return Ok((Some(value), None));
        }
        Ok((found, mark))
    }

    /// [`read_for_load_marked`](Self::read_for_load_marked), also handing back the stale copy a
    /// fail-safe backend kept while its shared store failed ([`CacheBackend::get_for_load`]):
    /// the caller loads, and serves that copy ([`decode_stale`](Self::decode_stale)) only if
    /// its load fails too. Under [`CacheFailure::FailClosed`] the copy is the answer (as a
    /// plain `get` serves it): the cache answered through its fail-safe.
    pub async fn read_for_load_fail_safe<T: DeserializeOwned>(
        &self,
        key: &str,
        on_failure: CacheFailure,
    ) -> Result<(Option<T>, Option<crate::LoadMark>, Option<Bytes>)> {
        let (found, mark, stale, _) = self.read_before_load(key, on_failure).await?;
        Ok((found, mark, stale))
    }

    /// [`read_for_load_fail_safe`](Self::read_for_load_fail_safe), and whether the stale copy
    /// is one of a failed read (not of an expired entry).
    async fn read_before_load<T: DeserializeOwned>(
        &self,
        key: &str,
        on_failure: CacheFailure,
    ) -> Result<(Option<T>, Option<crate::LoadMark>, Option<Bytes>, bool)> {
        match self.get_for_load::<T>(key).await {
            Ok(Found::Value(value)) => Ok((Some(value), None, None, false)),
            Ok(Found::Absent) => Ok((None, self.miss_mark(key), None, false)),
            // The cache answered (no failure to apply): a copy only to fall back on.
            Ok(Found::Expired(bytes)) => Ok((None, self.miss_mark(key), Some(bytes), false)),
            Ok(Found::Unreadable) => Ok((None, self.load_mark(key), None, false)),
            Ok(Found::Stale(bytes, error)) => {
                if on_failure == CacheFailure::FailClosed
                    && let Some(value) = self.decode_stale(key, Some(&bytes))
                {
                    return Ok((Some(value), None, None, false));
                }
                on_failure.apply(key, "get", error)?;
                Ok((None, self.load_mark(key), Some(bytes), true))
            }
            Err(e) => {
                on_failure.apply(key, "get", e)?;
                Ok((None, self.load_mark(key), None, false))
            }
        }
    }

    /// The read before a load ([`CacheBackend::get_for_load`]), decoded (an undecodable
    /// entry is counted and, when damaged, removed: [`decode_entry`](Self::decode_entry)).
    pub async fn get_for_load<T: DeserializeOwned>(&self, key: &str) -> Result<Found<T>> {
        Ok(match self.inner.backend.get_for_load(key).await? {
            crate::LoadRead::Hit(bytes) => match self.decode_entry(key, &bytes).await {
                Some(value) => Found::Value(value),
                None => Found::Unreadable,
            },
            crate::LoadRead::Miss => Found::Absent,
            crate::LoadRead::Stale { value, error } => Found::Stale(value, error),
            crate::LoadRead::Expired { value } => Found::Expired(value),
        })
    }

    /// A stale copy from [`get_for_load`](Self::get_for_load), decoded; `None` when there is
    /// none or it does not decode. To serve it after a failed load, use
    /// [`stale_after_load`](Self::stale_after_load).
    pub fn decode_stale<T: DeserializeOwned>(&self, key: &str, stale: Option<&Bytes>) -> Option<T> {
        self.decode_for::<T>(key, stale?).ok()
    }

    /// [`decode_stale`](Self::decode_stale) for a copy served because the load that followed
    /// the read failed: the backend is asked again ([`CacheBackend::stale_to_serve`]), so a
    /// copy whose fail-safe age ran out during a long load is not served.
    pub async fn stale_after_load<T: DeserializeOwned>(
        &self,
        key: &str,
        stale: Option<&Bytes>,
    ) -> Option<T> {
        let bytes = self
            .inner
            .backend
            .stale_to_serve(key, Bytes::clone(stale?))
            .await?;
        self.decode_for::<T>(key, &bytes).ok()
    }

    /// The write step of a read-through: stores a loaded value's bytes (from
    /// [`encode_for`](Self::encode_for)) with `expiry`; under [`CacheFailure::FailOpen`] a
    /// failing cache is logged and `Ok`.
    pub async fn store_loaded(
        &self,
        key: &str,
        bytes: Bytes,
        expiry: Expiry,
        on_failure: CacheFailure,
    ) -> Result<()> {
        self.store_loaded_since(key, bytes, expiry, on_failure, None)
            .await
            .map(drop)
    }

    /// What the backend knows of `key`'s invalidations now ([`CacheBackend::load_mark`]):
    /// take it after a read-through's miss, before the loader reads the source, and store
    /// with [`store_loaded_since`](Self::store_loaded_since).
    pub fn load_mark(&self, key: &str) -> Option<crate::LoadMark> {
        self.inner.backend.load_mark(key)
    }

    /// [`load_mark`](Self::load_mark) for a load that follows a miss
    /// ([`LoadMark::after_miss`](crate::LoadMark::after_miss)): its value is stored only while `key` is still absent, so
    /// it never overwrites a value written meanwhile, here or by another instance. Always
    /// `Some`: for a backend that keeps no counters, a mark whose parts are all zero. Take it
    /// only when the read found the key absent (see
    /// [`read_for_load_marked`](Self::read_for_load_marked)), not when it found something it
    /// could not read.
    pub fn miss_mark(&self, key: &str) -> Option<crate::LoadMark> {
        Some(self.load_mark(key).unwrap_or_default().after_miss())
    }

    /// [`store_loaded`](Self::store_loaded), skipped when `key` was invalidated or written on
    /// this instance since `mark` ([`CacheBackend::set_loaded`]): the loaded value may be
    /// older than that write, and is served but not cached. Returns whether it was stored
    /// (`false` also for a failure under [`CacheFailure::FailOpen`]).
    pub async fn store_loaded_since(
        &self,
        key: &str,
        bytes: Bytes,
        expiry: Expiry,
        on_failure: CacheFailure,
        mark: Option<crate::LoadMark>,
    ) -> Result<bool> {
        let ttl = self.ttl_policy().resolve(expiry)?;
        match self.inner.backend.set_loaded(key, bytes, ttl, mark).await {
            Ok(stored) => Ok(stored),
            Err(e) => on_failure.apply(key, "set", e).map(|()| false),
        }
    }

    /// `true` when the backend answers.
    pub async fn health_check(&self) -> bool {
        self.inner.backend.health_check().await
    }

    /// A detailed health probe.
    pub async fn health_report(&self) -> HealthReport {
        self.inner.backend.health_report().await
    }

    /// The backend's statistics.
    pub fn get_stats(&self) -> CacheStats {
        self.inner.backend.get_stats()
    }

    /// Closes the backend.
    pub async fn close(&self) -> Result<()> {
        self.inner.backend.close().await
    }

    /// The parts of the key `key` is stored under (the backend's prefix and `key`), which a
    /// signing codec binds values to.
    fn stored_key<'a>(&'a self, key: &'a str) -> [&'a str; 2] {
        [self.inner.backend.key_prefix().unwrap_or(""), key]
    }

    /// Encodes a value to be stored under `key` exactly as [`set`](Self::set) does: with the
    /// codec's [`encode_for`](Codec::encode_for) (a signing codec binds it to the stored key,
    /// prefix included) and checked against [`max_value_size`](CacheBuilder::max_value_size).
    /// For layers that write the bytes themselves (loaders, strategies, SQL caching).
    ///
    /// ```
    /// # use ncm_cache_core::{Cache, CacheBackend};
    /// # async fn demo<C: ncm_cache_core::Codec>(cache: Cache<C>) -> ncm_cache_core::Result<()> {
    /// let bytes = cache.encode_for("user:1", &"Ada")?;
    /// cache.backend().set("user:1", bytes, None).await?;
    /// assert_eq!(cache.get::<String>("user:1").await?.as_deref(), Some("Ada"));
    /// # Ok(()) }
    /// ```
    pub fn encode_for<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<Bytes> {
        let bytes = self.inner.codec.encode_for(&self.stored_key(key), value)?;
        match self.inner.max_value_size {
            Some(max) if bytes.len() > max => Err(CacheError::ValueTooLarge {
                size: bytes.len(),
                max,
            }),
            _ => Ok(bytes),
        }
    }

    /// Decodes bytes read from `key` with the codec's [`decode_for`](Codec::decode_for),
    /// returning the error (the entry is left alone; see [`decode_entry`](Self::decode_entry)).
    pub fn decode_for<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Result<T> {
        Ok(self.inner.codec.decode_for(&self.stored_key(key), bytes)?)
    }

    /// Decodes bytes read from `key` the way [`get`](Self::get) does: a value that does not
    /// decode is a miss (`None`), counted in [`CacheStats::codec_errors`](crate::CacheStats),
    /// and — when the bytes are damaged or forged ([`CodecErrorKind::is_damaged`]) — deleted.
    /// Bytes another build or configuration may read (a newer envelope version, format or
    /// compression; a value above this reader's size cap) are left in place.
    ///
    /// [`CodecErrorKind::is_damaged`]: crate::CodecErrorKind::is_damaged
    pub async fn decode_entry<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Option<T> {
        match self.inner.codec.decode_for(&self.stored_key(key), bytes) {
            Ok(value) => Some(value),
            Err(err) => {
                self.inner.backend.record_decode_error(key);
                if !err.kind().is_damaged() {
                    tracing::debug!(key, error = %err, "unreadable cache entry left in place");
                    return None;
                }
                tracing::warn!(key, error = %err, "undecodable cache entry removed");
                if let Err(e) = self.inner.backend.delete(key).await {
                    tracing::debug!(key, error = %e, "could not remove undecodable entry");
                }
                None
            }
        }
    }
}

/// What [`Cache::get_for_load`] found.
#[derive(Debug)]
#[non_exhaustive]
pub enum Found<T> {
    /// A value to serve.
    Value(T),
    /// Nothing: load, storing only while the key is still absent.
    Absent,
    /// An entry this build cannot read: load, replacing it.
    Unreadable,
    /// The shared store failed (the error); a fail-safe copy (stale) was kept: load, and serve
    /// the copy only if the load fails too.
    Stale(Bytes, CacheError),
    /// Nothing in the shared store (its copy expired), but a fail-safe copy (stale) was kept:
    /// load, storing only while the key is still absent, and serve the copy only if the load
    /// fails ([`LoadRead::Expired`](crate::LoadRead::Expired)).
    Expired(Bytes),
}
