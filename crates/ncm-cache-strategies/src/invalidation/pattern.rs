//! Pattern-based invalidation: every key of the cache matching a Redis-style glob.

use ncm_cache_core::Result;

use super::{Broadcast, Invalidator};
use crate::stats::Kind;

impl Invalidator {
    /// Removes every key matching `pattern` here (and on other instances that keep their own
    /// cache); returns how many were removed here.
    pub(crate) async fn invalidate_pattern(&self, pattern: &str) -> Result<u64> {
        let n = self.backend.clear_pattern(pattern).await?;
        self.stats.invalidated(Kind::Pattern, n);
        self.broadcast(Broadcast::Pattern {
            pattern: pattern.to_owned(),
        })
        .await;
        Ok(n)
    }
}
