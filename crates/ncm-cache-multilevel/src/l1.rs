//! What the L1 holds: decoded values, type-erased, with their freshness deadlines.

use std::any::Any;
use std::sync::Arc;

use ncm_cache_memory::StoreValue;

/// A decoded value in L1, held inline in the store's slot: a hit copies a few words and bumps
/// one reference count (the value's), and inserting allocates nothing beyond the value itself.
#[derive(Clone)]
pub(crate) struct L1Value {
    /// The value, or `None` for a cached "not found" (negative caching).
    pub(crate) object: Option<Arc<dyn Any + Send + Sync>>,
    /// Encoded size, charged against the L1 byte budget (saturating: a value of 4 GiB or
    /// more never fits an L1 budget anyway). 32 bits keep the slot small: a hit's cost is
    /// mostly cache misses on the slot.
    pub(crate) size: u32,
    /// Until when the value is fresh, in the L1 clock's `now_nanos` time ([`NO_DEADLINE`](ncm_cache_core::NO_DEADLINE): while it
    /// is stored); after it (and before the store TTL) it is stale and only served by fail-safe.
    pub(crate) fresh_until: u64,
    /// When a hit should trigger a background refresh (eager refresh), or `NO_DEADLINE`.
    pub(crate) refresh_at: u64,
    /// The L1 generation it was inserted in: an entry of an older generation (from before a
    /// backplane outage or a lost message) is stale-only, served by fail-safe alone.
    /// (The low 32 bits: compared for equality only, and four billion resyncs apart.)
    pub(crate) generation: u32,
}

impl StoreValue for L1Value {
    #[inline]
    fn size(&self) -> usize {
        self.size as usize
    }
}

/// A loader's validator (ETag, version) of the L1 entry of the same key, for a conditional
/// refresh. Kept beside L1, not in its slot: most entries have none, and the slot's size is
/// what an L1 hit costs. Anchored to the value it describes (the address of its `Arc`, held
/// alive by whoever compares): a validator is only ever paired with its own value.
#[derive(Clone)]
pub(crate) struct Validator(pub(crate) Arc<str>, pub(crate) usize);

impl StoreValue for Validator {
    fn size(&self) -> usize {
        self.0.len()
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
