//! The quick_cache-backed store.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ncm_cache_core::{
    Bytes, CacheBackend, CacheError, CacheStats, GlobPattern, HealthReport, KeySpace, KeyTtl,
    Operation, Result, SharedClock, StatsRecorder, async_trait,
};
use quick_cache::sync::{Cache as QuickCache, EntryAction, EntryResult};
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use crate::builder::MemoryBackendBuilder;

/// Bytes charged per entry on top of its key and value: the `String` and `Bytes` headers, the
/// expiry, and quick_cache's slot.
const ENTRY_OVERHEAD: u64 = 64;

#[derive(Clone)]
struct Entry {
    value: Bytes,
    expires_at: Option<Instant>,
}

impl Entry {
    #[inline]
    fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Charges every entry at least `slot` so the byte budget also bounds the entry count.
#[derive(Clone)]
struct EntryWeighter {
    slot: u64,
}

impl Weighter<String, Entry> for EntryWeighter {
    #[inline]
    fn weight(&self, key: &String, val: &Entry) -> u64 {
        entry_size(key.len(), val.value.len()).max(self.slot)
    }
}

#[inline]
fn entry_size(key_len: usize, value_len: usize) -> u64 {
    key_len as u64 + value_len as u64 + ENTRY_OVERHEAD
}

/// Counts evictions.
#[derive(Clone)]
struct EvictionCounter {
    stats: Arc<StatsRecorder>,
}

impl Lifecycle<String, Entry> for EvictionCounter {
    type RequestState = ();

    fn on_evict(&self, _state: &mut Self::RequestState, _key: String, _val: Entry) {
        self.stats.evictions(1);
    }
}

type Store = QuickCache<String, Entry, EntryWeighter, DefaultHashBuilder, EvictionCounter>;

/// An in-process cache backend: per-entry TTL, bounded by entry count and bytes.
///
/// Cloning is cheap and clones share the store. See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    clock: SharedClock,
    keys: KeySpace,
    stats: Arc<StatsRecorder>,
    max_entries: u64,
    max_bytes: u64,
    max_value_size: Option<usize>,
    closed: AtomicBool,
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("name", &self.inner.stats.name())
            .field("entries", &self.inner.store.len())
            .field("weight", &self.inner.store.weight())
            .field("max_entries", &self.inner.max_entries)
            .field("max_bytes", &self.inner.max_bytes)
            .finish()
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

    pub(crate) fn from_builder(b: MemoryBackendBuilder) -> Result<Self> {
        let shards = b
            .shards
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get()) * 4)
            .next_power_of_two();
        // A multiple of the shard count: the per-shard budgets then add up to exactly max_bytes.
        let capacity = (b.max_bytes / shards as u64).max(1) * shards as u64;
        let capacity = if capacity > b.max_bytes {
            // Fewer bytes than shards: one shard is enough.
            return Self::from_builder(MemoryBackendBuilder {
                shards: Some(1),
                ..b
            });
        } else {
            capacity
        };
        let slot = capacity.div_ceil(b.max_entries);
        let options = OptionsBuilder::new()
            .shards(shards)
            .estimated_items_capacity(
                usize::try_from(b.max_entries.min(1 << 24)).unwrap_or(1 << 24),
            )
            .weight_capacity(capacity)
            .build()
            .map_err(|e| CacheError::Config(format!("memory backend: {e}")))?;
        let stats = Arc::new(StatsRecorder::new(b.name.as_str(), "memory"));
        let store = QuickCache::with_options(
            options,
            EntryWeighter { slot },
            DefaultHashBuilder::default(),
            EvictionCounter {
                stats: Arc::clone(&stats),
            },
        );
        let backend = Self {
            inner: Arc::new(Inner {
                store,
                clock: b.clock,
                keys: KeySpace::new("").with_max_key_len(b.max_key_len),
                stats,
                max_entries: b.max_entries,
                max_bytes: b.max_bytes,
                max_value_size: b.max_value_size,
                closed: AtomicBool::new(false),
            }),
        };
        if let Some(every) = b.sweep_interval {
            backend.spawn_sweeper(every);
        }
        Ok(backend)
    }

    /// Runs [`purge_expired`](Self::purge_expired) periodically on the current tokio runtime,
    /// if there is one. The task holds a weak reference and ends when the backend is dropped
    /// or closed.
    fn spawn_sweeper(&self, every: Duration) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        handle.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if inner.closed.load(Ordering::Relaxed) {
                    break;
                }
                inner.purge_expired();
            }
        });
    }

    /// The configured maximum number of entries.
    pub fn max_entries(&self) -> u64 {
        self.inner.max_entries
    }

    /// The configured maximum number of bytes.
    pub fn max_bytes(&self) -> u64 {
        self.inner.max_bytes
    }

    /// The number of entries stored (expired ones not yet reclaimed included).
    pub fn len(&self) -> usize {
        self.inner.store.len()
    }

    /// `true` when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.inner.store.is_empty()
    }

    /// The bytes charged against `max_bytes`.
    pub fn weight(&self) -> u64 {
        self.inner.store.weight()
    }

    /// The sum of the real sizes (key + value + overhead) of the stored entries.
    pub fn used_bytes(&self) -> u64 {
        self.inner
            .store
            .iter()
            .map(|(k, e)| entry_size(k.len(), e.value.len()))
            .sum()
    }

    /// The largest value that fits: a value must fit in one shard of the store.
    pub fn max_storable_value(&self) -> usize {
        let shard = self
            .inner
            .store
            .shard_capacity()
            .saturating_sub(ENTRY_OVERHEAD);
        let shard = usize::try_from(shard).unwrap_or(usize::MAX);
        self.inner.max_value_size.map_or(shard, |m| m.min(shard))
    }

    /// Removes every expired entry now; returns how many were removed.
    pub fn purge_expired(&self) -> u64 {
        self.inner.purge_expired()
    }

    /// Removes every entry.
    pub fn clear(&self) {
        self.inner.store.clear();
    }

    /// Reads a value without going through the async trait (the L1 fast path: no allocation).
    #[inline]
    pub fn get_now(&self, key: &str) -> Result<Option<Bytes>> {
        self.check_open()?;
        self.inner.keys.validate(key)?;
        Ok(self.inner.lookup(key))
    }

    /// Writes a value without going through the async trait.
    pub fn set_now(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.check_open()?;
        self.inner.keys.validate(key)?;
        if ttl.is_some_and(|t| t.is_zero()) {
            return Err(CacheError::InvalidArgument(
                "a TTL must be greater than zero (delete the key instead)".into(),
            ));
        }
        let max = self.max_storable_value();
        if value.len() > max
            || entry_size(key.len(), value.len()) > self.inner.store.shard_capacity()
        {
            return Err(CacheError::ValueTooLarge {
                size: value.len(),
                max,
            });
        }
        let expires_at = ttl.map(|t| self.inner.clock.now() + t);
        self.inner
            .store
            .insert(key.to_owned(), Entry { value, expires_at });
        self.inner.stats.sets(1);
        Ok(())
    }

    /// Removes a key without going through the async trait; `true` when a live entry existed.
    pub fn delete_now(&self, key: &str) -> Result<bool> {
        self.check_open()?;
        self.inner.keys.validate(key)?;
        let now = self.inner.clock.now();
        let removed = self
            .inner
            .store
            .remove(key)
            .is_some_and(|(_, e)| !e.is_expired(now));
        if removed {
            self.inner.stats.deletes(1);
        }
        Ok(removed)
    }

    #[inline]
    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Relaxed) {
            Err(CacheError::Closed)
        } else {
            Ok(())
        }
    }
}

impl Inner {
    #[inline]
    fn lookup(&self, key: &str) -> Option<Bytes> {
        match self.store.get(key) {
            Some(entry) if entry.expires_at.is_none() => {
                self.stats.hit();
                Some(entry.value)
            }
            Some(entry) => {
                let now = self.clock.now();
                if entry.is_expired(now) {
                    self.expire(key, now);
                    self.stats.miss();
                    None
                } else {
                    self.stats.hit();
                    Some(entry.value)
                }
            }
            None => {
                self.stats.miss();
                None
            }
        }
    }

    /// Removes `key` if it is (still) expired at `now`.
    fn expire(&self, key: &str, now: Instant) {
        if self.store.remove_if(key, |e| e.is_expired(now)).is_some() {
            self.stats.expirations(1);
        }
    }

    fn live(&self, key: &str) -> Option<Entry> {
        let entry = self.store.peek(key)?;
        let now = self.clock.now();
        if entry.is_expired(now) {
            self.expire(key, now);
            None
        } else {
            Some(entry)
        }
    }

    fn purge_expired(&self) -> u64 {
        let now = self.clock.now();
        let removed = AtomicU64::new(0);
        self.store.retain(|_, e| {
            let keep = !e.is_expired(now);
            if !keep {
                removed.fetch_add(1, Ordering::Relaxed);
            }
            keep
        });
        let n = removed.into_inner();
        if n > 0 {
            self.stats.expirations(n);
        }
        n
    }
}

#[async_trait]
impl CacheBackend for MemoryBackend {
    fn name(&self) -> &str {
        self.inner.stats.name()
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.get_now(key)
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.set_now(key, value, ttl)
            .inspect_err(|_| self.inner.stats.error(Operation::Set))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.delete_now(key)
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        self.check_open()?;
        self.inner.keys.validate(key)?;
        Ok(self.inner.live(key).is_some())
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        self.check_open()?;
        for key in keys {
            self.inner.keys.validate(key)?;
        }
        Ok(keys.iter().map(|k| self.inner.lookup(k)).collect())
    }

    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Option<Duration>) -> Result<()> {
        for (key, _) in entries {
            self.inner.keys.validate(key)?;
        }
        for (key, value) in entries {
            self.set_now(key, value.clone(), ttl)?;
        }
        Ok(())
    }

    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        for key in keys {
            self.inner.keys.validate(key)?;
        }
        let mut n = 0;
        for key in keys {
            n += u64::from(self.delete_now(key)?);
        }
        Ok(n)
    }

    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        self.check_open()?;
        self.inner.keys.validate(key)?;
        Ok(match self.inner.live(key) {
            None => KeyTtl::Missing,
            Some(Entry {
                expires_at: None, ..
            }) => KeyTtl::Persistent,
            Some(Entry {
                expires_at: Some(at),
                ..
            }) => KeyTtl::Expires(at.saturating_duration_since(self.inner.clock.now())),
        })
    }

    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.check_open()?;
        self.inner.keys.validate(key)?;
        if ttl.is_zero() {
            return Err(CacheError::InvalidArgument(
                "a TTL must be greater than zero (delete the key instead)".into(),
            ));
        }
        let now = self.inner.clock.now();
        let result = self.inner.store.entry(key, None, |_, entry| {
            if entry.is_expired(now) {
                EntryAction::Remove
            } else {
                entry.expires_at = Some(now + ttl);
                EntryAction::Retain(())
            }
        });
        Ok(match result {
            EntryResult::Retained(()) => true,
            EntryResult::Removed(..) => {
                self.inner.stats.expirations(1);
                false
            }
            // Vacant: dropping the placeholder guard leaves the key absent.
            _ => false,
        })
    }

    async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        self.check_open()?;
        let full = self.inner.keys.full_pattern(pattern)?;
        let glob = GlobPattern::new(&full)?;
        let now = self.inner.clock.now();
        let removed = AtomicU64::new(0);
        self.inner.store.retain(|key, entry| {
            let remove = glob.matches(key);
            if remove && !entry.is_expired(now) {
                removed.fetch_add(1, Ordering::Relaxed);
            }
            !remove
        });
        let n = removed.into_inner();
        self.inner.stats.deletes(n);
        Ok(n)
    }

    async fn health_report(&self) -> HealthReport {
        let open = !self.inner.closed.load(Ordering::Relaxed);
        HealthReport::new(
            open,
            Duration::ZERO,
            "memory",
            if open {
                format!(
                    "{} entries, {} of {} bytes charged",
                    self.inner.store.len(),
                    self.inner.store.weight(),
                    self.inner.max_bytes
                )
            } else {
                "closed".to_owned()
            },
        )
    }

    fn get_stats(&self) -> CacheStats {
        let mut stats = self.inner.stats.snapshot();
        let entries = self.inner.store.len() as u64;
        let bytes = self.inner.store.weight();
        stats.entries = Some(entries);
        stats.memory_usage = Some(bytes);
        self.inner.stats.publish_gauges(Some(entries), Some(bytes));
        stats
    }

    fn record_decode_error(&self, _key: &str) {
        self.inner.stats.undecodable();
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.store.clear();
        Ok(())
    }
}
