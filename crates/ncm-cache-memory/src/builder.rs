//! Configuration of a [`MemoryBackend`].

use std::sync::Arc;
use std::time::Duration;

use ncm_cache_core::{CacheError, Clock, DEFAULT_MAX_KEY_LEN, Result, SharedClock, system_clock};

use crate::backend::MemoryBackend;
use crate::store::{MemoryStore, StoreValue};

/// The most lock shards a memory store may have.
const MAX_SHARDS: usize = 4096;

/// Builds a [`MemoryBackend`].
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_memory::MemoryBackend;
/// let l1 = MemoryBackend::builder()
///     .name("l1")
///     .max_entries(1_000)
///     .max_bytes(16 * 1024 * 1024)
///     .sweep_interval(Duration::from_secs(5))
///     .build()
///     .unwrap();
/// assert_eq!(l1.max_entries(), 1_000);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryBackendBuilder {
    pub(crate) name: String,
    pub(crate) max_entries: u64,
    pub(crate) max_bytes: u64,
    pub(crate) max_key_len: usize,
    pub(crate) max_value_size: Option<usize>,
    pub(crate) clock: SharedClock,
    pub(crate) sweep_interval: Option<Duration>,
    pub(crate) shards: Option<usize>,
}

impl Default for MemoryBackendBuilder {
    fn default() -> Self {
        Self {
            name: "memory".into(),
            max_entries: 100_000,
            max_bytes: 256 * 1024 * 1024,
            max_key_len: DEFAULT_MAX_KEY_LEN,
            max_value_size: None,
            clock: system_clock(),
            sweep_interval: Some(Duration::from_secs(1)),
            shards: None,
        }
    }
}

impl MemoryBackendBuilder {
    /// The cache name used in stats and metrics labels (default `memory`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The maximum number of entries (default 100,000).
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// The maximum total size of keys, values and per-entry overhead (default 256 MiB).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// The maximum key length in bytes (default 4096).
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// Rejects values larger than this with [`CacheError::ValueTooLarge`] (default: only
    /// values that cannot fit in one shard of the cache are rejected).
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = Some(bytes);
        self
    }

    /// The clock used for TTLs (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// A shared clock.
    pub fn shared_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// How often the background sweeper removes expired entries (default 1 s); `None` turns
    /// the sweeper off. The sweeper runs only when the backend is built inside a tokio runtime.
    pub fn sweep_interval(mut self, every: impl Into<Option<Duration>>) -> Self {
        self.sweep_interval = every.into();
        self
    }

    /// The number of lock shards (rounded up to a power of two, at most 4096; default: four
    /// per CPU).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Builds the backend; fails when a bound or the sweep interval is zero.
    pub fn build(self) -> Result<MemoryBackend> {
        Ok(MemoryBackend::from_store(self.build_store("memory")?))
    }

    /// Builds a [`MemoryStore`] of any value type (the L1 of a multi-level cache uses this);
    /// `level` is the `level` label of its stats and metrics.
    pub fn build_store<V: StoreValue>(self, level: &'static str) -> Result<MemoryStore<V>> {
        if self.max_entries == 0 || self.max_bytes == 0 {
            return Err(CacheError::Config(
                "memory backend: max_entries and max_bytes must be greater than zero".into(),
            ));
        }
        if self.sweep_interval.is_some_and(|d| d.is_zero()) {
            return Err(CacheError::Config(
                "memory backend: sweep_interval must be greater than zero (None turns the sweeper off)"
                    .into(),
            ));
        }
        if self.shards == Some(0) {
            return Err(CacheError::Config(
                "memory backend: shards must be greater than zero".into(),
            ));
        }
        // Rounded up to a power of two: `usize::MAX` overflowed (review, helper-83 #5).
        if self.shards.is_some_and(|s| s > MAX_SHARDS) {
            return Err(CacheError::Config(format!(
                "memory backend: shards must be at most {MAX_SHARDS}"
            )));
        }
        MemoryStore::from_builder(self, level)
    }
}
