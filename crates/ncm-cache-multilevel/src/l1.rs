//! What the L1 holds: decoded values, type-erased, with their freshness deadlines.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use ncm_cache_memory::StoreValue;

/// A decoded value in L1. Cloning is an `Arc` clone.
#[derive(Clone)]
pub(crate) struct L1Value {
    /// The value, or `None` for a cached "not found" (negative caching).
    pub(crate) object: Option<Arc<dyn Any + Send + Sync>>,
    /// Encoded size, charged against the L1 byte budget.
    pub(crate) size: usize,
    /// Until when the value is fresh; after it (and before the store TTL) it is stale and
    /// only served by fail-safe.
    pub(crate) fresh_until: Option<Instant>,
    /// When a hit should trigger a background refresh (eager refresh).
    pub(crate) refresh_at: Option<Instant>,
}

impl StoreValue for L1Value {
    #[inline]
    fn size(&self) -> usize {
        self.size
    }
}

impl L1Value {
    /// `true` when fresh at `now`.
    #[inline]
    pub(crate) fn is_fresh(&self, now: Instant) -> bool {
        self.fresh_until.is_none_or(|t| now < t)
    }
}

/// A per-key L2 hit counter for promotion.
#[derive(Clone, Copy)]
pub(crate) struct Hits(pub(crate) u32);

impl StoreValue for Hits {
    fn size(&self) -> usize {
        4
    }
}
