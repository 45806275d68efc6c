//! # ncm-cache-strategies
//!
//! The original's `CacheStrategies` for [ncm-cache](https://github.com/ncm-foundation/ncm-cache):
//! how a cache cooperates with the system of record, and how cached values are invalidated.
//!
//! | strategy | method |
//! |---|---|
//! | write-through (store, then cache) | [`CacheStrategies::write_through`] |
//! | write-behind (cache now, store later: coalesced, batched, retried, bounded, durable) | [`CacheStrategies::write_behind`], [`WriteBehind`] |
//! | write-around (store, invalidate the cache) | [`CacheStrategies::write_around`] |
//! | read-through / cache-aside | [`CacheStrategies::read_through`], [`CacheStrategies::cache_aside`] |
//! | time-based invalidation | [`CacheStrategies::time_based_invalidation`] |
//! | event-based invalidation | [`CacheStrategies::event_based_invalidation`], [`CacheStrategies::trigger_event_invalidation`] |
//! | pattern-based invalidation | [`CacheStrategies::pattern_based_invalidation`] |
//! | dependency-based invalidation | [`CacheStrategies::dependency_based_invalidation`], [`CacheStrategies::invalidate_dependencies`] |
//! | tags | [`CacheStrategies::set_with_tags`], [`CacheStrategies::invalidate_tag`] |
//!
//! The persistent store is a [`Store`]: an async closure ([`store_fn`], [`batch_store_fn`]) or
//! your own [`PersistentStore`].
//!
//! Without Redis everything runs in process over any
//! [`CacheBackend`](ncm_cache_core::CacheBackend). With the `redis` feature and
//! [`CacheStrategies::with_redis`], instances coordinate: events and invalidations reach every
//! instance over pub/sub, the dependency/tag graph lives in Redis (walked atomically by Lua),
//! expirations arrive as keyspace notifications, and write-behind can journal its pending writes
//! in a Redis Stream so a crashed process loses none ([`DurableConfig`]).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use ncm_cache_codec::Serializer;
//! use ncm_cache_core::Cache;
//! use ncm_cache_memory::MemoryBackend;
//! use ncm_cache_strategies::{store_fn, CacheStrategies};
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! let database = Arc::new(Mutex::new(Vec::new()));
//! let db = database.clone();
//! let save_to_database = store_fn(move |key: String, value: String| {
//!     let db = db.clone();
//!     async move {
//!         db.lock().unwrap().push((key, value));
//!         Ok::<_, std::io::Error>(())
//!     }
//! });
//!
//! let strategies = CacheStrategies::new(Cache::new(MemoryBackend::new(), Serializer::default()));
//! let ttl = Duration::from_secs(3600);
//! strategies.write_behind("user:1", &"v1".to_string(), ttl, &save_to_database, Duration::from_secs(5)).await?;
//! strategies.write_behind("user:1", &"v2".to_string(), ttl, &save_to_database, Duration::from_secs(5)).await?;
//! assert!(database.lock().unwrap().is_empty());           // not yet persisted
//! strategies.shutdown().await?;                           // persists what is pending
//! assert_eq!(*database.lock().unwrap(), [("user:1".to_string(), "v2".to_string())]);
//!
//! strategies.event_based_invalidation("user_updated", ["user:1"], |event, keys| {
//!     println!("{event} invalidated {keys:?}");
//! }).await?;
//! assert_eq!(strategies.trigger_event_invalidation("user_updated").await?, 1);
//! # Ok::<(), ncm_cache_core::CacheError>(())
//! # }).unwrap();
//! ```
// Links to items of the `redis` feature, for documentation built without it.
#![cfg_attr(
    not(feature = "redis"),
    doc = "\n[`CacheStrategies::with_redis`]: https://docs.rs/ncm-cache-strategies/latest/ncm_cache_strategies/struct.CacheStrategies.html#method.with_redis\n[`DurableConfig`]: https://docs.rs/ncm-cache-strategies/latest/ncm_cache_strategies/struct.DurableConfig.html"
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod invalidation;
#[cfg(feature = "redis")]
mod remote;
mod stats;
mod store;
mod strategies;
mod write_behind;
mod write_through;

pub use stats::{InvalidationStats, WriteBehindStats};
pub use store::{PersistentStore, Store, StoreError, WriteVersion, batch_store_fn, store_fn};
pub use strategies::{CacheStrategies, CacheStrategiesBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use write_behind::DurableConfig;
pub use write_behind::{
    DeadLetter, OnFull, QueueFull, QueueValue, WriteBehind, WriteBehindConfig, is_queue_full,
};

/// Re-exported so [`PersistentStore`] implementations use the same `async_trait`.
pub use async_trait::async_trait;
