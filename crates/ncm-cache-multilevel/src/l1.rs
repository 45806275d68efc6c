//! What the L1 holds: decoded values, type-erased, with their freshness deadlines.

use std::any::Any;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use ncm_cache_memory::StoreValue;

/// A decoded value in L1 behind one `Arc`: the store clones 8 bytes on a hit.
#[derive(Clone)]
pub(crate) struct L1Value(Arc<L1Entry>);

pub(crate) struct L1Entry {
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

impl L1Value {
    pub(crate) fn new(entry: L1Entry) -> Self {
        Self(Arc::new(entry))
    }
}

impl Deref for L1Value {
    type Target = L1Entry;
    fn deref(&self) -> &L1Entry {
        &self.0
    }
}

impl StoreValue for L1Value {
    #[inline]
    fn size(&self) -> usize {
        self.0.size
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
