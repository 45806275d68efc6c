//! # ncm-cache-memory
//!
//! [`MemoryBackend`]: the in-process [`CacheBackend`](ncm_cache_core::CacheBackend) of ncm-cache,
//! built on [`quick_cache`] (S3-FIFO eviction). It is the embedded default when no Redis is
//! configured, and the L1 of a multi-level cache.
//!
//! - **Per-entry TTL.** An expired entry is never returned; it is removed when touched, and a
//!   background sweeper (when a tokio runtime is present) or
//!   [`purge_expired`](MemoryBackend::purge_expired) reclaims the ones nobody touches.
//! - **Bounded by entry count and by bytes.** Each entry is charged
//!   `max(key + value + overhead, max_bytes / max_entries)`, so neither bound is ever exceeded.
//! - **Any value type**: [`MemoryStore<V>`] is the engine; `MemoryBackend` is
//!   `MemoryStore<Bytes>` behind the `CacheBackend` trait, and the multi-level cache keeps decoded
//!   values in a `MemoryStore` of its own so an L1 hit never decodes.
//! - **Time is injectable** ([`ManualClock`](ncm_cache_core::ManualClock)) so TTL behaviour is
//!   tested exactly, without sleeping.
//!
//! ```
//! use std::time::Duration;
//! use ncm_cache_core::{CacheBackend, Bytes, ManualClock};
//! use ncm_cache_memory::MemoryBackend;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let clock = ManualClock::new();
//! let cache = MemoryBackend::builder()
//!     .max_entries(10_000)
//!     .max_bytes(64 * 1024 * 1024)
//!     .clock(clock.clone())
//!     .build()?;
//! cache.set("session:1", Bytes::from_static(b"data"), Some(Duration::from_secs(30))).await?;
//! assert!(cache.get("session:1").await?.is_some());
//! clock.advance(Duration::from_secs(30));
//! assert!(cache.get("session:1").await?.is_none()); // expired exactly at its TTL
//! # Ok::<(), ncm_cache_core::CacheError>(())
//! # }).unwrap();
//! ```

mod backend;
mod builder;
mod store;

pub use backend::MemoryBackend;
pub use builder::MemoryBackendBuilder;
pub use store::{ENTRY_OVERHEAD, MemoryStore, StoreValue};
