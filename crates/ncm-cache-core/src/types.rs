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
    /// The application reads the cache, loads on a miss and writes the cache itself. In a
    /// `CacheLoader` (and the macros): a failing cache is skipped (fail-open).
    #[default]
    CacheAside,
    /// The cache loads from the source on a miss. In a `CacheLoader`: reads go through the
    /// cache, so a failing cache fails the call ([`CacheFailure::FailClosed`]).
    ReadThrough,
    /// Writes go to the store first, then the cache (`CacheStrategies::write_through`). Not a
    /// loader strategy: a `CacheLoader` refuses it.
    WriteThrough,
    /// Writes go to the cache now and to the store later, batched. In a `CacheLoader`: the
    /// loaded value is returned at once and written to the cache in the background.
    WriteBehind,
    /// Writes go to the store only; the cached key is invalidated. In a `CacheLoader`: loaded
    /// values are not cached (the cache is filled by writes or warming).
    WriteAround,
}

/// What a read-through does when the cache itself fails (not the loader): the one policy of
/// every read-through path — [`Cache::read_through_with`](crate::Cache::read_through_with),
/// the strategies crate's `read_through` / `cache_aside`, and `CacheLoader` (where
/// [`CacheStrategy::ReadThrough`] means [`FailClosed`](Self::FailClosed)).
///
/// ```
/// use ncm_cache_core::CacheFailure;
/// assert_eq!(CacheFailure::default(), CacheFailure::FailOpen);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheFailure {
    /// Go on without the cache: a failed read is a miss (the loader runs), a failed write is
    /// logged and the loaded value returned. The cache never makes a read fail.
    #[default]
    FailOpen,
    /// Return the cache's error: a failed read fails the call before loading, a failed write
    /// fails it after loading (the loaded value is not returned).
    FailClosed,
}

impl CacheFailure {
    /// Applies the policy to a cache error met by operation `op` on `key`: under
    /// [`FailOpen`](Self::FailOpen) it is logged and swallowed (`Ok`); under
    /// [`FailClosed`](Self::FailClosed) returned. A bad key, pattern or argument (a TTL of
    /// zero, ...) is the caller's mistake and always returned; a value above the size cap
    /// (`ValueTooLarge`) follows the policy (fail-open: served, not cached).
    ///
    /// ```
    /// use ncm_cache_core::{CacheError, CacheFailure};
    /// let down = || CacheError::connection("redis down", None);
    /// assert!(CacheFailure::FailOpen.apply("k", "get", down()).is_ok());
    /// assert!(CacheFailure::FailClosed.apply("k", "get", down()).is_err());
    /// let bad = ncm_cache_core::validate_key("", 250).unwrap_err();
    /// assert!(CacheFailure::FailOpen.apply("", "get", bad).is_err());
    /// ```
    pub fn apply(self, key: &str, op: &str, err: crate::CacheError) -> crate::Result<()> {
        let caller_mistake =
            err.is_invalid_input() && !matches!(err, crate::CacheError::ValueTooLarge { .. });
        match (self, &err) {
            _ if caller_mistake => Err(err),
            (Self::FailClosed, _) => Err(err),
            (Self::FailOpen, _) => {
                tracing::warn!(key, operation = op, error = %err, "cache failed; going on without it (fail-open)");
                Ok(())
            }
        }
    }
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
