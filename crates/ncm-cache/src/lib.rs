#![doc = include_str!("../../../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use ncm_cache_core as core;
pub use ncm_cache_core::{
    Cache, CacheBackend, CacheBuilder, CacheError, CacheLevel, CacheStats, CacheStrategy, Codec,
    Expiry, HealthReport, KeySpace, KeyTtl, Result, SharedBackend, TtlPolicy, ValueSource,
    escape_glob,
};

pub use ncm_cache_codec as codec;
pub use ncm_cache_codec::{CompressionType, SerializationType, Serializer, SerializerFactory};

/// The in-process backend (feature `memory`).
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use ncm_cache_memory as memory;
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use ncm_cache_memory::MemoryBackend;

/// Redis: `RedisCache`, `RedisSyncCache`, Cluster, Sentinel (feature `redis`).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use ncm_cache_redis as redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use ncm_cache_redis::{RedisCache, RedisConfig, RedisSyncCache};

/// L1 + L2 caching (feature `multilevel`).
#[cfg(feature = "multilevel")]
#[cfg_attr(docsrs, doc(cfg(feature = "multilevel")))]
pub use ncm_cache_multilevel as multilevel;
#[cfg(feature = "multilevel")]
#[cfg_attr(docsrs, doc(cfg(feature = "multilevel")))]
pub use ncm_cache_multilevel::{EntryOptions, LoadContext, Loaded, MultiLevelCache};

/// Loaders, `#[cache_loader]` / `#[cache_method]`, warming and reloading (feature `loader`).
#[cfg(feature = "loader")]
#[cfg_attr(docsrs, doc(cfg(feature = "loader")))]
pub use ncm_cache_loader as loader;
#[cfg(feature = "loader")]
#[cfg_attr(docsrs, doc(cfg(feature = "loader")))]
pub use ncm_cache_loader::{
    CacheLoader, CacheReloader, ReloadStrategy, cache_loader, cache_method,
};

/// SQL query caching with table invalidation (feature `sql`, drivers `sqlite` / `postgres` /
/// `mysql`).
#[cfg(feature = "sql")]
#[cfg_attr(docsrs, doc(cfg(feature = "sql")))]
pub use ncm_cache_sql as sql;
#[cfg(feature = "sql")]
#[cfg_attr(docsrs, doc(cfg(feature = "sql")))]
pub use ncm_cache_sql::{QueryCacheStrategy, SqlCache};

/// Write-through / write-behind / write-around and invalidation strategies (feature
/// `strategies`).
#[cfg(feature = "strategies")]
#[cfg_attr(docsrs, doc(cfg(feature = "strategies")))]
pub use ncm_cache_strategies as strategies;
#[cfg(feature = "strategies")]
#[cfg_attr(docsrs, doc(cfg(feature = "strategies")))]
pub use ncm_cache_strategies::CacheStrategies;

/// The names most programs need: `use ncm_cache::prelude::*;`.
pub mod prelude {
    pub use ncm_cache_codec::{CompressionType, SerializationType, Serializer, SerializerFactory};
    pub use ncm_cache_core::{
        Cache, CacheBackend, CacheError, CacheLevel, CacheStrategy, Expiry, Result,
    };
    #[cfg(feature = "loader")]
    pub use ncm_cache_loader::{
        CacheLoader, CacheReloader, ReloadStrategy, cache_loader, cache_method,
    };
    #[cfg(feature = "memory")]
    pub use ncm_cache_memory::MemoryBackend;
    #[cfg(feature = "multilevel")]
    pub use ncm_cache_multilevel::{EntryOptions, LoadContext, Loaded, MultiLevelCache};
    #[cfg(feature = "redis")]
    pub use ncm_cache_redis::{RedisCache, RedisConfig, RedisSyncCache};
    #[cfg(feature = "sql")]
    pub use ncm_cache_sql::{QueryCacheStrategy, SqlCache};
    #[cfg(feature = "strategies")]
    pub use ncm_cache_strategies::CacheStrategies;
}
