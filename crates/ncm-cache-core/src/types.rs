//! Small enums shared by every crate.

use serde::{Deserialize, Serialize};

/// How a cache cooperates with the system of record (the original's `CacheStrategy`).
///
/// ```
/// use ncm_cache_core::CacheStrategy;
/// assert_eq!(CacheStrategy::default(), CacheStrategy::CacheAside);
/// assert_eq!("write_behind".parse::<CacheStrategy>().unwrap(), CacheStrategy::WriteBehind);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CacheStrategy {
    /// The application reads the cache, loads on a miss and writes the cache itself.
    #[default]
    CacheAside,
    /// The cache loads from the source on a miss.
    ReadThrough,
    /// Writes go to the store first, then the cache.
    WriteThrough,
    /// Writes go to the cache now and to the store later, batched.
    WriteBehind,
    /// Writes go to the store only; the cached key is invalidated.
    WriteAround,
}

impl std::str::FromStr for CacheStrategy {
    type Err = crate::CacheError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "cache_aside" => Self::CacheAside,
            "read_through" => Self::ReadThrough,
            "write_through" => Self::WriteThrough,
            "write_behind" => Self::WriteBehind,
            "write_around" => Self::WriteAround,
            other => {
                return Err(crate::CacheError::Config(format!(
                    "unknown cache strategy {other:?} (expected cache_aside, read_through, \
                     write_through, write_behind or write_around)"
                )));
            }
        })
    }
}

/// A level of a multi-level cache (the original's `CacheLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheLevel {
    /// The in-process memory cache.
    L1,
    /// The shared cache behind it (usually Redis).
    L2,
}

/// Where a value returned by a cache came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ValueSource {
    /// The in-process level.
    L1,
    /// The shared level.
    L2,
    /// The loader ran.
    Loader,
    /// A stale value served because the source failed (fail-safe).
    Stale,
}
