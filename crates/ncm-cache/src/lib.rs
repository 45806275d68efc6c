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

/// The names most programs need: `use ncm_cache::prelude::*;`.
pub mod prelude {
    pub use ncm_cache_codec::{CompressionType, SerializationType, Serializer, SerializerFactory};
    pub use ncm_cache_core::{
        Cache, CacheBackend, CacheError, CacheLevel, CacheStrategy, Expiry, Result,
    };
    #[cfg(feature = "memory")]
    pub use ncm_cache_memory::MemoryBackend;
}
