//! Tombstones: invalidations that client tracking would not carry by itself
//! (docs/ARCHITECTURE.md, "Server-assisted coherence"). Only written and read with the
//! `redis` feature (client tracking).
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

use std::time::Duration;

/// How long a key's [`Tombstone`] lives in Redis: only its write matters (it is what Redis
/// pushes); its expiry is pushed too, which costs a tracking instance at most one more L2
/// read of that key.
const KEY_TTL: Duration = Duration::from_secs(1);

/// How long a pattern's tombstone lives: its expiry's push makes every instance sweep its L1
/// again, so it is kept long (one key per distinct pattern deleted within the hour).
const PATTERN_TTL: Duration = Duration::from_secs(3600);

/// An invalidation Redis would not push by itself: a delete of a key it does not hold (a
/// "not found" cached in L1 by `negative_ttl` has nothing in Redis behind it), and L1 entries
/// a clear or pattern delete must reach whether or not Redis held them. The instance that
/// invalidates writes a reserved key (`__ncm:inv:…`) that names what to drop; every tracking
/// instance hears that write and drops it from L1 (docs/ARCHITECTURE.md, "Server-assisted
/// coherence").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tombstone<'a> {
    /// One key.
    Key(&'a str),
    /// Every key matching a Redis glob.
    Pattern(&'a str),
    /// Everything (a `clear()`).
    All,
}

impl<'a> Tombstone<'a> {
    /// Its name among the reserved keys (`CacheBackend::set_reserved`).
    pub(crate) fn name(self) -> String {
        match self {
            Tombstone::Key(k) => format!("inv:key:{k}"),
            Tombstone::Pattern(p) => format!("inv:pattern:{p}"),
            Tombstone::All => "inv:all".to_owned(),
        }
    }

    /// How long its key lives: `None` for `All` (one key, overwritten by each clear; an
    /// expiry would clear every instance's L1 once more).
    pub(crate) fn ttl(self) -> Option<Duration> {
        match self {
            Tombstone::Key(_) => Some(KEY_TTL),
            Tombstone::Pattern(_) => Some(PATTERN_TTL),
            Tombstone::All => None,
        }
    }

    /// The tombstone a pushed key (without the cache's prefix) is, if it is one.
    pub(crate) fn parse(pushed: &'a str) -> Option<Self> {
        let rest = pushed
            .strip_prefix(ncm_cache_core::RESERVED_KEY_PREFIX)?
            .strip_prefix("inv:")?;
        if rest == "all" {
            return Some(Tombstone::All);
        }
        if let Some(k) = rest.strip_prefix("key:") {
            return Some(Tombstone::Key(k));
        }
        rest.strip_prefix("pattern:").map(Tombstone::Pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::Tombstone;

    #[test]
    fn a_tombstone_name_parses_back_to_itself() {
        for t in [
            Tombstone::Key("user:1"),
            Tombstone::Key("inv:all"),
            Tombstone::Key(""),
            Tombstone::Pattern("user:*"),
            Tombstone::All,
        ] {
            let pushed = format!("{}{}", ncm_cache_core::RESERVED_KEY_PREFIX, t.name());
            assert_eq!(Tombstone::parse(&pushed), Some(t));
        }
        // A user key, or another reserved key (a lock), is not a tombstone.
        for other in [
            "inv:key:x",
            "__ncm:lock:inv:key:x",
            "__ncm:epoch:users",
            "__ncm:inv:",
        ] {
            assert_eq!(Tombstone::parse(other), None, "{other}");
        }
    }
}
