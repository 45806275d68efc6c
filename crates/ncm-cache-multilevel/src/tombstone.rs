//! Tombstones: invalidations that client tracking would not carry by itself
//! (docs/ARCHITECTURE.md, "Server-assisted coherence").

use std::time::Duration;

/// How long a [`Tombstone`] key lives in Redis: only its write matters (it is what Redis
/// pushes); its expiry is pushed too, which costs a tracking instance at most one more L2
/// read of that key.
pub(crate) const TOMBSTONE_TTL: Duration = Duration::from_secs(1);

/// An invalidation Redis would not push by itself: a delete of a key it does not hold (a
/// "not found" cached in L1 by `negative_ttl` has nothing in Redis behind it), a clear or a
/// pattern delete that matched nothing there. The instance that invalidates writes a
/// reserved key (`__ncm:inv:…`) that names what to drop; every tracking instance hears that
/// write and drops it from L1 (docs/ARCHITECTURE.md, "Server-assisted coherence").
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

    /// The tombstone a pushed key (without the cache's prefix) is, if it is one.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
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
