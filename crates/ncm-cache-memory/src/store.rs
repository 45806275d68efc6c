//! `MemoryStore<V>`: the quick_cache-backed engine shared by [`MemoryBackend`](crate::MemoryBackend)
//! (values are `Bytes`) and the L1 of the multi-level cache (values are decoded objects).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ncm_cache_core::{
    Bytes, CacheError, CacheStats, GlobPattern, KeySpace, KeyTtl, Result, SharedClock,
    StatsRecorder, deadline_after,
};
use ncm_cache_core::{NO_DEADLINE, RESERVED_KEY_PREFIX};
use quick_cache::sync::{Cache as QuickCache, EntryAction, EntryResult};
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use crate::builder::MemoryBackendBuilder;

/// Bytes charged per entry on top of its key and value: the `String` and value headers, the
/// expiry, and quick_cache's slot.
pub const ENTRY_OVERHEAD: u64 = 64;

/// A value the store can hold: cheap to clone, and able to tell its size in bytes.
pub trait StoreValue: Clone + Send + Sync + 'static {
    /// The approximate heap size of the value in bytes (used against `max_bytes`).
    fn size(&self) -> usize;
}

impl StoreValue for Bytes {
    #[inline]
    fn size(&self) -> usize {
        self.len()
    }
}

#[derive(Clone)]
struct Entry<V> {
    value: V,
    /// The deadline in [`Clock::now_nanos`](ncm_cache_core::Clock::now_nanos) time, or
    /// [`NO_DEADLINE`](ncm_cache_core::NO_DEADLINE): 8 bytes per slot instead of an `Option<Instant>`'s 16, and no conversion on a
    /// hit.
    expires_at: u64,
}

impl<V> Entry<V> {
    #[inline]
    fn is_expired(&self, now: u64) -> bool {
        self.expires_at <= now
    }
}

/// Charges every entry at least `slot` so the byte budget also bounds the entry count.
#[derive(Clone)]
struct EntryWeighter {
    slot: u64,
}

impl<V: StoreValue> Weighter<Key, Entry<V>> for EntryWeighter {
    #[inline]
    fn weight(&self, key: &Key, val: &Entry<V>) -> u64 {
        entry_size(key.len(), val.value.size()).max(self.slot)
    }
}

#[inline]
pub(crate) fn entry_size(key_len: usize, value_len: usize) -> u64 {
    key_len as u64 + value_len as u64 + ENTRY_OVERHEAD
}

/// Counts evictions.
#[derive(Clone)]
struct EvictionCounter {
    stats: Arc<StatsRecorder>,
}

impl<V> Lifecycle<Key, Entry<V>> for EvictionCounter {
    type RequestState = ();

    fn on_evict(&self, _state: &mut Self::RequestState, _key: Key, _val: Entry<V>) {
        self.stats.evictions(1);
    }
}

/// Keys up to 24 bytes live inline in the slot: a lookup compares them without following a
/// pointer to the heap, and short keys cost no allocation.
type Key = compact_str::CompactString;

type Quick<V> = QuickCache<Key, Entry<V>, EntryWeighter, DefaultHashBuilder, EvictionCounter>;

/// An in-process key → value store with per-entry TTL, bounded by entry count and by bytes.
///
/// Cloning is cheap; clones share the store. Built with
/// [`MemoryBackend::builder`](crate::MemoryBackend::builder)`().build_store()`.
pub struct MemoryStore<V: StoreValue> {
    inner: Arc<Inner<V>>,
}

impl<V: StoreValue> Clone for MemoryStore<V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<V: StoreValue> {
    store: Quick<V>,
    clock: SharedClock,
    keys: KeySpace,
    stats: Arc<StatsRecorder>,
    max_entries: u64,
    max_bytes: u64,
    max_value_size: Option<usize>,
    closed: AtomicBool,
}

impl<V: StoreValue> fmt::Debug for MemoryStore<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("name", &self.inner.stats.name())
            .field("entries", &self.inner.store.len())
            .field("weight", &self.inner.store.weight())
            .field("max_entries", &self.inner.max_entries)
            .field("max_bytes", &self.inner.max_bytes)
            .finish()
    }
}

impl<V: StoreValue> MemoryStore<V> {
    pub(crate) fn from_builder(b: MemoryBackendBuilder, level: &'static str) -> Result<Self> {
        let shards = b
            .shards
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get()) * 4)
            .next_power_of_two();
        if b.max_bytes < shards as u64 {
            // Fewer bytes than shards: one shard is enough.
            return Self::from_builder(
                MemoryBackendBuilder {
                    shards: Some(1),
                    ..b
                },
                level,
            );
        }
        // A multiple of the shard count: the per-shard budgets then add up to exactly max_bytes.
        let capacity = (b.max_bytes / shards as u64) * shards as u64;
        let slot = capacity.div_ceil(b.max_entries);
        let options = OptionsBuilder::new()
            .shards(shards)
            .estimated_items_capacity(
                usize::try_from(b.max_entries.min(1 << 24)).unwrap_or(1 << 24),
            )
            .weight_capacity(capacity)
            .build()
            .map_err(|e| CacheError::Config(format!("memory store: {e}")))?;
        let stats = Arc::new(StatsRecorder::new(b.name.as_str(), level));
        let store = QuickCache::with_options(
            options,
            EntryWeighter { slot },
            DefaultHashBuilder::default(),
            EvictionCounter {
                stats: Arc::clone(&stats),
            },
        );
        let this = Self {
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
            this.spawn_sweeper(every);
        }
        Ok(this)
    }

    /// Runs [`purge_expired`](Self::purge_expired) periodically on the current tokio runtime,
    /// if there is one. The task holds a weak reference and ends when the store is dropped or
    /// closed.
    fn spawn_sweeper(&self, every: Duration) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Inner<V>> = Arc::downgrade(&self.inner);
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

    /// The store's clock.
    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    /// The stats recorder (counters shared with [`get_stats`](Self::get_stats)).
    pub fn stats(&self) -> &StatsRecorder {
        &self.inner.stats
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
            .map(|(k, e)| entry_size(k.len(), e.value.size()))
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

    /// Marks the store closed and empties it; later calls fail with `Closed`.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.store.clear();
    }

    /// `true` once closed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Relaxed)
    }

    #[inline]
    fn check(&self, key: &str) -> Result<()> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(CacheError::Closed);
        }
        self.inner.keys.validate(key)
    }

    /// Checks a key (and that the store is open) without looking it up.
    #[inline]
    pub fn validate(&self, key: &str) -> Result<()> {
        self.check(key)
    }

    /// Reads a live value (counted as a hit or a miss).
    #[inline]
    pub fn get(&self, key: &str) -> Result<Option<V>> {
        self.check(key)?;
        Ok(self.inner.lookup(key, true))
    }

    /// Reads a live value without touching the hit/miss counters.
    #[inline]
    pub fn peek(&self, key: &str) -> Result<Option<V>> {
        self.check(key)?;
        Ok(self.inner.lookup(key, false))
    }

    /// Like [`peek`](Self::peek) without validating the key, for hot paths: a key that fails
    /// validation is never stored, so it simply misses. Callers validate on their miss path
    /// (with [`validate`](Self::validate)) to report a bad key as an error.
    ///
    /// ```
    /// # use ncm_cache_core::Bytes;
    /// let store = ncm_cache_memory::MemoryBackend::builder().build_store::<Bytes>("l1").unwrap();
    /// store.insert("k", Bytes::from_static(b"v"), None).unwrap();
    /// assert_eq!(store.peek_unvalidated("k").unwrap().as_deref(), Some(&b"v"[..]));
    /// assert_eq!(store.peek_unvalidated("").unwrap(), None);
    /// assert!(store.validate("").is_err());
    /// ```
    #[inline]
    pub fn peek_unvalidated(&self, key: &str) -> Result<Option<V>> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(CacheError::Closed);
        }
        Ok(self.inner.lookup(key, false))
    }

    /// [`peek_unvalidated`](Self::peek_unvalidated) at `now`, a reading of this store's clock
    /// ([`Clock::now_nanos`](ncm_cache_core::Clock::now_nanos)) the caller took for its own
    /// checks too: a hot path reads the clock once.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use ncm_cache_core::{Bytes, Clock, ManualClock, SharedClock};
    /// let clock = Arc::new(ManualClock::new());
    /// let store = ncm_cache_memory::MemoryBackend::builder()
    ///     .shared_clock(Arc::clone(&clock) as SharedClock)
    ///     .build_store::<Bytes>("l1")
    ///     .unwrap();
    /// store.insert("k", Bytes::from_static(b"v"), Some(std::time::Duration::from_secs(60))).unwrap();
    /// let now = clock.now_nanos();
    /// assert!(store.peek_unvalidated_at("k", now).unwrap().is_some());
    /// assert!(store.peek_unvalidated_at("k", now + 61_000_000_000).unwrap().is_none(), "expired by then");
    /// ```
    #[inline]
    pub fn peek_unvalidated_at(&self, key: &str, now: u64) -> Result<Option<V>> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(CacheError::Closed);
        }
        Ok(match self.inner.store.get(key) {
            Some(entry) if entry.is_expired(now) => {
                self.inner.expire(key, now);
                None
            }
            Some(entry) => Some(entry.value),
            None => None,
        })
    }

    /// Reads a live value with its expiry instant (`None`: never expires), uncounted.
    pub fn get_with_expiry(&self, key: &str) -> Result<Option<(V, Option<Instant>)>> {
        self.check(key)?;
        Ok(self.inner.live(key).map(|e| {
            let at = (e.expires_at != NO_DEADLINE).then(|| {
                let clock = &self.inner.clock;
                let left = e.expires_at.saturating_sub(clock.now_nanos());
                clock.now() + Duration::from_nanos(left)
            });
            (e.value, at)
        }))
    }

    /// Stores a value (`ttl: None`: no expiry).
    pub fn insert(&self, key: &str, value: V, ttl: Option<Duration>) -> Result<()> {
        self.check(key)?;
        self.insert_checked(key, value, ttl)
    }

    /// Reads one of ncm-cache's own keys ([`RESERVED_KEY_PREFIX`] + `name`), which
    /// [`get`](Self::get) refuses.
    pub fn get_reserved(&self, name: &str) -> Result<Option<V>> {
        let key = self.reserved(name)?;
        Ok(self.inner.lookup(&key, true))
    }

    /// Writes one of ncm-cache's own keys (see [`get_reserved`](Self::get_reserved)).
    pub fn insert_reserved(&self, name: &str, value: V, ttl: Option<Duration>) -> Result<()> {
        let key = self.reserved(name)?;
        self.insert_checked(&key, value, ttl)
    }

    /// The stored name of a reserved key, checked like a key (and the store open).
    fn reserved(&self, name: &str) -> Result<String> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(CacheError::Closed);
        }
        self.inner.keys.reserved_key(name)?;
        Ok(format!("{RESERVED_KEY_PREFIX}{name}"))
    }

    /// [`insert`](Self::insert) of a checked key.
    fn insert_checked(&self, key: &str, value: V, ttl: Option<Duration>) -> Result<()> {
        if ttl.is_some_and(|t| t.is_zero()) {
            return Err(CacheError::InvalidArgument(
                "a TTL must be greater than zero (delete the key instead)".into(),
            ));
        }
        let max = self.max_storable_value();
        let size = value.size();
        if size > max || entry_size(key.len(), size) > self.inner.store.shard_capacity() {
            return Err(CacheError::ValueTooLarge { size, max });
        }
        let expires_at = ttl.map_or(NO_DEADLINE, |t| {
            deadline_after(self.inner.clock.now_nanos(), t)
        });
        self.inner
            .store
            .insert(Key::new(key), Entry { value, expires_at });
        self.inner.stats.sets(1);
        Ok(())
    }

    /// Removes a key; `true` when a live entry existed.
    pub fn remove(&self, key: &str) -> Result<bool> {
        self.check(key)?;
        let now = self.inner.clock.now_nanos();
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

    /// `true` when a live entry exists.
    pub fn contains(&self, key: &str) -> Result<bool> {
        self.check(key)?;
        Ok(self.inner.live(key).is_some())
    }

    /// The remaining lifetime of a key.
    pub fn ttl(&self, key: &str) -> Result<KeyTtl> {
        self.check(key)?;
        Ok(match self.inner.live(key) {
            None => KeyTtl::Missing,
            Some(Entry {
                expires_at: NO_DEADLINE,
                ..
            }) => KeyTtl::Persistent,
            Some(Entry { expires_at, .. }) => KeyTtl::Expires(Duration::from_nanos(
                expires_at.saturating_sub(self.inner.clock.now_nanos()),
            )),
        })
    }

    /// Sets the remaining lifetime to `ttl` from now; `false` when the key is missing.
    pub fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.check(key)?;
        if ttl.is_zero() {
            return Err(CacheError::InvalidArgument(
                "a TTL must be greater than zero (delete the key instead)".into(),
            ));
        }
        let now = self.inner.clock.now_nanos();
        let result = self.inner.store.entry(&Key::new(key), None, |_, entry| {
            if entry.is_expired(now) {
                EntryAction::Remove
            } else {
                entry.expires_at = deadline_after(now, ttl);
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

    /// Removes every key matching a Redis-style glob; returns how many live entries went.
    pub fn remove_matching(&self, pattern: &str) -> Result<u64> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(CacheError::Closed);
        }
        let full = self.inner.keys.full_pattern(pattern)?;
        let glob = GlobPattern::new(&full)?;
        let now = self.inner.clock.now_nanos();
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

    /// Statistics with entry count and bytes.
    pub fn get_stats(&self) -> CacheStats {
        let mut stats = self.inner.stats.snapshot();
        let entries = self.inner.store.len() as u64;
        let bytes = self.inner.store.weight();
        stats.entries = Some(entries);
        stats.memory_usage = Some(bytes);
        self.inner.stats.publish_gauges(Some(entries), Some(bytes));
        stats
    }
}

impl<V: StoreValue> Inner<V> {
    #[inline]
    fn lookup(&self, key: &str, count: bool) -> Option<V> {
        let found = match self.store.get(key) {
            Some(entry) if entry.expires_at == NO_DEADLINE => Some(entry.value),
            Some(entry) => {
                let now = self.clock.now_nanos();
                if entry.is_expired(now) {
                    self.expire(key, now);
                    None
                } else {
                    Some(entry.value)
                }
            }
            None => None,
        };
        if count {
            if found.is_some() {
                self.stats.hit();
            } else {
                self.stats.miss();
            }
        }
        found
    }

    /// Removes `key` if it is (still) expired at `now`.
    fn expire(&self, key: &str, now: u64) {
        if self.store.remove_if(key, |e| e.is_expired(now)).is_some() {
            self.stats.expirations(1);
        }
    }

    fn live(&self, key: &str) -> Option<Entry<V>> {
        let entry = self.store.peek(key)?;
        let now = self.clock.now_nanos();
        if entry.is_expired(now) {
            self.expire(key, now);
            None
        } else {
            Some(entry)
        }
    }

    fn purge_expired(&self) -> u64 {
        let now = self.clock.now_nanos();
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
