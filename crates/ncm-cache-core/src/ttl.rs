//! Time-to-live policy: default TTL, per-call TTL, no expiry, and jitter.

use std::time::Duration;

use crate::error::{CacheError, Result};

/// How long one write should live. Passed per call; [`Expiry::Default`] uses the cache's policy.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_core::{Expiry, TtlPolicy};
/// let policy = TtlPolicy::new(Some(Duration::from_secs(3600)));
/// assert_eq!(policy.resolve(Expiry::Default).unwrap(), Some(Duration::from_secs(3600)));
/// assert_eq!(policy.resolve(Expiry::Never).unwrap(), None);
/// assert_eq!(policy.resolve(Duration::from_secs(5).into()).unwrap(), Some(Duration::from_secs(5)));
/// assert!(policy.resolve(Expiry::After(Duration::ZERO)).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expiry {
    /// Use the cache's default TTL (which may itself be "never").
    #[default]
    Default,
    /// Never expire.
    Never,
    /// Expire after this long (must be non-zero).
    After(Duration),
}

impl From<Duration> for Expiry {
    fn from(ttl: Duration) -> Self {
        Self::After(ttl)
    }
}

impl From<Option<Duration>> for Expiry {
    /// `Some(ttl)` expires after `ttl`; `None` uses the default.
    fn from(ttl: Option<Duration>) -> Self {
        ttl.map_or(Self::Default, Self::After)
    }
}

/// A cache's TTL policy: the default TTL and optional jitter.
///
/// Jitter shortens each TTL by a random amount of up to `jitter` × TTL, so keys written together
/// do not all expire in the same instant (a thundering herd on the database). Jitter never
/// lengthens a TTL: a value is never served for longer than it was allowed to live.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_core::{Expiry, TtlPolicy};
/// let policy = TtlPolicy::new(Some(Duration::from_secs(100))).with_jitter(0.1);
/// let ttl = policy.resolve(Expiry::Default).unwrap().unwrap();
/// assert!(ttl <= Duration::from_secs(100) && ttl >= Duration::from_secs(90));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TtlPolicy {
    default_ttl: Option<Duration>,
    jitter: f64,
}

impl TtlPolicy {
    /// A policy with this default TTL (`None`: entries never expire by default) and no jitter.
    pub fn new(default_ttl: Option<Duration>) -> Self {
        Self {
            default_ttl,
            jitter: 0.0,
        }
    }

    /// Sets the jitter fraction, clamped to `0.0..=0.5`.
    #[must_use]
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 0.5)
        } else {
            0.0
        };
        self
    }

    /// The default TTL.
    pub fn default_ttl(&self) -> Option<Duration> {
        self.default_ttl
    }

    /// The jitter fraction.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Turns a per-call [`Expiry`] into the TTL to store: `None` means no expiry.
    ///
    /// A zero TTL is rejected: to remove a key, delete it.
    pub fn resolve(&self, expiry: Expiry) -> Result<Option<Duration>> {
        let ttl = match expiry {
            Expiry::Never => return Ok(None),
            Expiry::Default => match self.default_ttl {
                None => return Ok(None),
                Some(ttl) => ttl,
            },
            Expiry::After(ttl) => ttl,
        };
        if ttl.is_zero() {
            return Err(CacheError::InvalidArgument(
                "a TTL must be greater than zero (delete the key instead)".into(),
            ));
        }
        Ok(Some(self.apply_jitter(ttl)))
    }

    fn apply_jitter(&self, ttl: Duration) -> Duration {
        if self.jitter <= 0.0 {
            return ttl;
        }
        let cut = ttl.mul_f64(self.jitter * fastrand::f64());
        // Keep at least one millisecond: Redis cannot store less.
        ttl.saturating_sub(cut).max(Duration::from_millis(1))
    }
}

/// The remaining lifetime of a stored key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTtl {
    /// No such key.
    Missing,
    /// The key exists and never expires.
    Persistent,
    /// The key expires after this long.
    Expires(Duration),
}

impl KeyTtl {
    /// The remaining time, when the key exists and expires.
    pub fn remaining(self) -> Option<Duration> {
        match self {
            Self::Expires(d) => Some(d),
            _ => None,
        }
    }

    /// `true` unless the key is missing.
    pub fn exists(self) -> bool {
        !matches!(self, Self::Missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_only_shortens_within_bounds() {
        let policy = TtlPolicy::new(Some(Duration::from_secs(1000))).with_jitter(0.2);
        let mut distinct = std::collections::HashSet::new();
        for _ in 0..200 {
            let ttl = policy.resolve(Expiry::Default).unwrap().unwrap();
            assert!(ttl <= Duration::from_secs(1000));
            assert!(ttl >= Duration::from_secs(800));
            distinct.insert(ttl);
        }
        assert!(distinct.len() > 100, "jitter should spread TTLs");
    }

    #[test]
    fn jitter_is_clamped_and_nan_safe() {
        assert_eq!(TtlPolicy::default().with_jitter(5.0).jitter(), 0.5);
        assert_eq!(TtlPolicy::default().with_jitter(f64::NAN).jitter(), 0.0);
        assert_eq!(TtlPolicy::default().with_jitter(-1.0).jitter(), 0.0);
    }

    #[test]
    fn no_default_means_no_expiry() {
        let policy = TtlPolicy::default();
        assert_eq!(policy.resolve(Expiry::Default).unwrap(), None);
        assert_eq!(Expiry::from(None), Expiry::Default);
        assert_eq!(
            KeyTtl::Expires(Duration::from_secs(1)).remaining(),
            Some(Duration::from_secs(1))
        );
        assert!(!KeyTtl::Missing.exists());
        assert!(KeyTtl::Persistent.exists());
    }
}
