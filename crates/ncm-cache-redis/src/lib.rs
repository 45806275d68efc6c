//! # ncm-cache-redis
//!
//! Redis for ncm-cache: [`RedisCache`] (async, tokio) and [`RedisSyncCache`] (blocking), on a
//! single node, a Redis Cluster, or through Sentinel, with ACL and (feature `tls`) TLS.
//!
//! - Multiplexed connections that reconnect by themselves (redis-rs `ConnectionManager`;
//!   concurrent requests are pipelined on the wire), `max_connections` of them.
//! - Every call bounded by `response_timeout`: a dead or paused server costs at most the timeout
//!   and surfaces as [`CacheError::is_connection`](ncm_cache_core::CacheError::is_connection) or
//!   [`is_timeout`](ncm_cache_core::CacheError::is_timeout); service resumes on its own.
//! - `get_many` is one `MGET`, `set_many` one pipelined round trip, `clear_pattern` is
//!   `SCAN` + `UNLINK` in batches on every primary (never `KEYS`), always inside the key prefix.
//! - Building blocks for cross-instance features: [`RedisLock`] (token + Lua release + TTL) and
//!   reconnecting pub/sub ([`RedisBackend::subscribe`], [`PubSubEvent::Reconnected`]).
//! - [`RedisBackend`] is the byte-level [`CacheBackend`](ncm_cache_core::CacheBackend) for
//!   composing (the L2 of a multi-level cache).
//!
//! ```no_run
//! use ncm_cache_redis::RedisCache;
//! # async fn demo() -> ncm_cache_core::Result<()> {
//! let cache = RedisCache::from_url("redis://127.0.0.1:6379/0?key_prefix=ncm:&default_ttl=1h").await?;
//! cache.set("user:123", &"John").await?;
//! assert_eq!(cache.get::<String>("user:123").await?.as_deref(), Some("John"));
//! # Ok(()) }
//! ```

mod backend;
mod batch;
mod cache;
mod capabilities;
mod commands;
mod config;
mod conn;
mod error;
mod lock;
mod pipeline;
mod pubsub;
mod sync;
mod tracking;
mod wire;

pub use backend::RedisBackend;
pub use cache::{IntoCompression, RedisCache, RedisCacheBuilder};
pub use capabilities::Capabilities;
pub use config::{Compression, KeepaliveOptions, RedisConfig, SentinelConfig};
pub use conn::tcp_settings;
pub use lock::RedisLock;
pub use pipeline::{PipelineResult, RedisPipeline};
pub use pubsub::{PubSubEvent, Subscription};
pub use sync::RedisSyncCache;
pub use tracking::{Tracking, TrackingEvent};
