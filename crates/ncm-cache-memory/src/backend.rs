//! `MemoryBackend`: the [`CacheBackend`] over a [`MemoryStore<Bytes>`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ncm_cache_core::{
    Bytes, CacheBackend, CacheStats, HealthReport, KeyTtl, LoadMark, Operation, Result, async_trait,
};

use crate::builder::MemoryBackendBuilder;
use crate::store::MemoryStore;

/// An in-process cache backend: per-entry TTL, bounded by entry count and bytes.
///
/// Cloning is cheap and clones share the store. See the [crate docs](crate) for an example.
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    store: MemoryStore<Bytes>,
    marks: Arc<Marks>,
}

/// Stripes of the per-key write counters.
const MARK_STRIPES: usize = 1024;

/// Write counters for [`CacheBackend::load_mark`] / [`CacheBackend::set_loaded`]: every write,
/// delete or eviction request of a key bumps its stripe (a whole-store one bumps `all`)
/// *before* it acts, so a load that took its mark earlier does not store over it.
#[derive(Debug)]
struct Marks {
    stripes: Box<[AtomicU64]>,
    all: AtomicU64,
}

impl Default for Marks {
    fn default() -> Self {
        Self {
            stripes: (0..MARK_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            all: AtomicU64::new(0),
        }
    }
}

impl Marks {
    fn stripe(key: &str) -> usize {
        // FNV-1a: cheap and stable; a collision only costs a load that is not stored.
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        // Truncation is the point: the low bits pick the stripe.
        (hash as usize) % MARK_STRIPES
    }

    fn bump(&self, key: &str) {
        if let Some(s) = self.stripes.get(Self::stripe(key)) {
            s.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn bump_all(&self) {
        self.all.fetch_add(1, Ordering::SeqCst);
    }

    fn mark(&self, key: &str) -> LoadMark {
        let stripe = Self::stripe(key);
        let writes = self
            .stripes
            .get(stripe)
            .map_or(0, |s| s.load(Ordering::SeqCst));
        LoadMark::new([self.all.load(Ordering::SeqCst), stripe as u64, writes, 0])
    }

    fn current(&self, key: &str, mark: LoadMark) -> bool {
        let [all, stripe, writes, _] = mark.parts();
        let own = Self::stripe(key);
        stripe == own as u64
            && self.all.load(Ordering::SeqCst) == all
            && self
                .stripes
                .get(own)
                .is_some_and(|s| s.load(Ordering::SeqCst) == writes)
    }
}

impl Default for MemoryBackend {
    /// A backend with the default bounds (100,000 entries, 256 MiB).
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// A backend with the default bounds (100,000 entries, 256 MiB) and the system clock.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        // The default configuration has non-zero bounds, so building cannot fail.
        MemoryBackendBuilder::default()
            .build()
            .expect("default memory backend configuration is valid")
    }

    /// A builder.
    pub fn builder() -> MemoryBackendBuilder {
        MemoryBackendBuilder::default()
    }

    pub(crate) fn from_store(store: MemoryStore<Bytes>) -> Self {
        Self {
            store,
            marks: Arc::default(),
        }
    }

    /// The underlying store. Writes made directly through it are not seen by
    /// [`set_loaded`](CacheBackend::set_loaded): a load overtaken by them is still stored.
    pub fn store(&self) -> &MemoryStore<Bytes> {
        &self.store
    }

    /// The configured maximum number of entries.
    pub fn max_entries(&self) -> u64 {
        self.store.max_entries()
    }

    /// The configured maximum number of bytes.
    pub fn max_bytes(&self) -> u64 {
        self.store.max_bytes()
    }

    /// The number of entries stored (expired ones not yet reclaimed included).
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// `true` when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// The bytes charged against `max_bytes`.
    pub fn weight(&self) -> u64 {
        self.store.weight()
    }

    /// The sum of the real sizes (key + value + overhead) of the stored entries.
    pub fn used_bytes(&self) -> u64 {
        self.store.used_bytes()
    }

    /// The largest value that fits.
    pub fn max_storable_value(&self) -> usize {
        self.store.max_storable_value()
    }

    /// Removes every expired entry now; returns how many were removed.
    pub fn purge_expired(&self) -> u64 {
        self.store.purge_expired()
    }

    /// Removes every entry.
    pub fn clear(&self) {
        self.marks.bump_all();
        self.store.clear();
    }

    /// Reads a value without going through the async trait (no allocation).
    #[inline]
    pub fn get_now(&self, key: &str) -> Result<Option<Bytes>> {
        self.store.get(key)
    }

    /// Writes a value without going through the async trait.
    pub fn set_now(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.marks.bump(key);
        self.store.insert(key, value, ttl)
    }

    /// Stores a value, counting a failure (`set` and `set_loaded`, after their marks).
    fn insert(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.store
            .insert(key, value, ttl)
            .inspect_err(|_| self.store.stats().error(Operation::Set))
    }

    /// Removes a key without going through the async trait; `true` when a live entry existed.
    pub fn delete_now(&self, key: &str) -> Result<bool> {
        self.marks.bump(key);
        self.store.remove(key)
    }
}

#[async_trait]
impl CacheBackend for MemoryBackend {
    fn name(&self) -> &str {
        self.store.stats().name()
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.store.get(key)
    }

    async fn get_reserved(&self, name: &str) -> Result<Option<Bytes>> {
        self.store.get_reserved(name)
    }

    async fn set_reserved(&self, name: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.store.insert_reserved(name, value, ttl)
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.marks.bump(key);
        self.insert(key, value, ttl)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.marks.bump(key);
        self.store.remove(key)
    }

    /// Every write or delete of the key (or clear) on this backend bumps its counter.
    fn load_mark(&self, key: &str) -> Option<LoadMark> {
        Some(self.marks.mark(key))
    }

    /// Not stored when the key was written or deleted (here, or by an eviction another
    /// instance's invalidation message asked for) since `mark`, nor — for a load after a miss
    /// ([`LoadMark::follows_miss`]) — when the key is there now: another load's store (a
    /// `refresh`) bumps no counter, and may be newer.
    async fn set_loaded(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        mark: Option<LoadMark>,
    ) -> Result<bool> {
        if mark.is_some_and(|m| !self.marks.current(key, m)) {
            return Ok(false);
        }
        if mark.is_some_and(|m| m.follows_miss()) && self.store.contains(key)? {
            return Ok(false);
        }
        // Not a write that overtakes other loads of the stripe: no bump.
        self.insert(key, value, ttl).map(|()| true)
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        self.store.contains(key)
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        // Validate every key first so a bad key fails the batch before any read is counted.
        for key in keys {
            self.store.validate(key)?;
        }
        keys.iter().map(|k| self.store.get(k)).collect()
    }

    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Option<Duration>) -> Result<()> {
        for (key, _) in entries {
            self.store.validate(key)?;
        }
        for (key, value) in entries {
            self.marks.bump(key);
            self.store.insert(key, value.clone(), ttl)?;
        }
        Ok(())
    }

    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        for key in keys {
            self.store.validate(key)?;
        }
        let mut n = 0;
        for key in keys {
            self.marks.bump(key);
            n += u64::from(self.store.remove(key)?);
        }
        Ok(n)
    }

    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        self.store.ttl(key)
    }

    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.store.expire(key, ttl)
    }

    async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        self.marks.bump_all();
        self.store.remove_matching(pattern)
    }

    async fn health_report(&self) -> HealthReport {
        let open = !self.store.is_closed();
        HealthReport::new(
            open,
            Duration::ZERO,
            "memory",
            if open {
                format!(
                    "{} entries, {} of {} bytes charged",
                    self.store.len(),
                    self.store.weight(),
                    self.store.max_bytes()
                )
            } else {
                "closed".to_owned()
            },
        )
    }

    fn get_stats(&self) -> CacheStats {
        self.store.get_stats()
    }

    fn record_decode_error(&self, _key: &str) {
        self.store.stats().undecodable();
    }

    async fn close(&self) -> Result<()> {
        self.store.close();
        Ok(())
    }
}
