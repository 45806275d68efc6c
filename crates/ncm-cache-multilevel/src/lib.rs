//! # ncm-cache-multilevel
//!
//! [`MultiLevelCache`]: an in-process L1 ([`MemoryStore`](ncm_cache_memory::MemoryStore) of
//! decoded values) in front of any L2 [`CacheBackend`](ncm_cache_core::CacheBackend) — usually
//! Redis — with promotion, stampede prevention (in-process single-flight and, with feature
//! `redis`, a distributed lock), cross-instance L1 coherence over a Redis pub/sub backplane,
//! fail-safe stale values, a circuit breaker around L2, loader timeouts, eager refresh, negative
//! caching, and per-level statistics.
//!
//! ```
//! use std::time::Duration;
//! use ncm_cache_core::{CacheLevel, ValueSource};
//! use ncm_cache_memory::MemoryBackend;
//! use ncm_cache_multilevel::MultiLevelCache;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let cache = MultiLevelCache::builder(MemoryBackend::new())
//!     .l1_max_size(1000)
//!     .promotion_threshold(2)
//!     .build()?;
//! // The original's `multi_cache.get("user:123", loader=lambda: load_user(123))`:
//! let user: String = cache.get_or_load("user:123", || async { Ok::<_, std::io::Error>("John".to_string()) }).await?;
//! let (_, source) = cache.get_with_source::<String>("user:123").await?.unwrap();
//! assert_eq!(source, ValueSource::L1);
//! cache.set_at("user:456", "Jane".to_string(), CacheLevel::L1).await?;
//! cache.set_at("user:789", "Joe".to_string(), CacheLevel::L2).await?;
//! # Ok::<(), ncm_cache_core::CacheError>(())
//! # }).unwrap();
//! ```

mod backend;
#[cfg(feature = "redis")]
mod backplane;
mod breaker;
mod builder;
mod cache;
mod epoch;
mod l1;
mod load;
#[cfg(not(feature = "redis"))]
mod nobackplane;
mod options;
mod recent;
mod stats;
mod tombstone;
#[cfg(feature = "redis")]
mod tracking;
mod versions;

pub use backend::MultiLevelBackend;
pub use builder::{DEFAULT_LOCK_TTL, DEFAULT_LOCK_WAIT, MultiLevelBuilder};
pub use cache::{CacheValue, MultiLevelCache};
pub use options::{EntryOptions, LoadContext, Loaded};
pub use stats::MultiLevelStats;
#[cfg(feature = "redis")]
pub use tracking::Coherence;
