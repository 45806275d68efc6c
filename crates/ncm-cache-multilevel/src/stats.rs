//! Per-level statistics of a multi-level cache.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ncm_cache_core::{CacheStats, StripedCounter};
use serde::Serialize;

/// Counters of the multi-level logic, on top of each level's own [`CacheStats`].
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct MultiLevelStats {
    /// The L1 store's statistics (entries, bytes, evictions, ...).
    pub l1: CacheStats,
    /// The L2 backend's statistics.
    pub l2: CacheStats,
    /// Reads answered by L1.
    pub l1_hits: u64,
    /// Reads answered by L2.
    pub l2_hits: u64,
    /// Reads found nowhere.
    pub misses: u64,
    /// Loader runs.
    pub loads: u64,
    /// Loader failures.
    pub load_errors: u64,
    /// Loaded values not cached (served to their callers, or dropped for a background
    /// refresh): the key was invalidated or written on this instance while the loader ran (`get_or_load`, and loads through `as_backend()`:
    /// `CacheLoader`, `CacheStrategies::read_through`, `Cache::read_through_with`). A pattern
    /// invalidation or a resync counts for every load in flight.
    pub loads_not_cached: u64,
    /// Loaded values removed from L2 after they were stored: a delete of the key heard within
    /// 5 s of the store (or during it) may have come before the store landed, and L2 still
    /// held exactly what the load stored (docs/ARCHITECTURE.md, "Coherence of L1").
    pub loads_withdrawn: u64,
    /// Stale values served by fail-safe.
    pub stale_served: u64,
    /// Values promoted from L2 into L1.
    pub promotions: u64,
    /// Background refreshes started (eager refresh, soft timeouts).
    pub background_refreshes: u64,
    /// Loads answered "not modified" (conditional refresh: TTL re-armed, no payload written).
    pub not_modified: u64,
    /// L2 failures (including skips while the circuit was open).
    pub l2_errors: u64,
    /// Times the L2 circuit breaker opened.
    pub circuit_trips: u64,
    /// Invalidations received from other instances.
    pub backplane_received: u64,
    /// Invalidations that could not be published.
    pub backplane_errors: u64,
    /// Keys invalidated by Redis's client-tracking pushes (`Coherence::Tracking` / `Both`).
    pub tracking_received: u64,
    /// L1 resynchronisations after a backplane or tracking reconnect (or a lost message).
    pub resyncs: u64,
    /// `(l1_hits + l2_hits) / reads`.
    pub hit_rate: f64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Bumped on every L1 hit, from every thread: striped.
    pub(crate) l1_hits: StripedCounter,
    pub(crate) l2_hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) loads: AtomicU64,
    pub(crate) load_errors: AtomicU64,
    pub(crate) loads_not_cached: AtomicU64,
    pub(crate) loads_withdrawn: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) promotions: AtomicU64,
    pub(crate) background_refreshes: AtomicU64,
    pub(crate) not_modified: AtomicU64,
    pub(crate) l2_errors: AtomicU64,
    pub(crate) backplane_received: AtomicU64,
    pub(crate) tracking_received: AtomicU64,
    pub(crate) resyncs: AtomicU64,
}

impl Counters {
    #[inline]
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// The counters with each level's stats, the breaker's trips and the backplane's publish
    /// failures (counted where they happen, by the backplane).
    pub(crate) fn snapshot(
        &self,
        l1: CacheStats,
        l2: CacheStats,
        trips: u64,
        backplane_errors: u64,
    ) -> MultiLevelStats {
        let l1_hits = self.l1_hits.load();
        let l2_hits = self.l2_hits.load(Relaxed);
        let misses = self.misses.load(Relaxed);
        let reads = l1_hits + l2_hits + misses;
        MultiLevelStats {
            l1,
            l2,
            l1_hits,
            l2_hits,
            misses,
            loads: self.loads.load(Relaxed),
            load_errors: self.load_errors.load(Relaxed),
            loads_not_cached: self.loads_not_cached.load(Relaxed),
            loads_withdrawn: self.loads_withdrawn.load(Relaxed),
            stale_served: self.stale_served.load(Relaxed),
            promotions: self.promotions.load(Relaxed),
            background_refreshes: self.background_refreshes.load(Relaxed),
            not_modified: self.not_modified.load(Relaxed),
            l2_errors: self.l2_errors.load(Relaxed),
            circuit_trips: trips,
            backplane_received: self.backplane_received.load(Relaxed),
            backplane_errors,
            tracking_received: self.tracking_received.load(Relaxed),
            resyncs: self.resyncs.load(Relaxed),
            hit_rate: if reads == 0 {
                0.0
            } else {
                (l1_hits + l2_hits) as f64 / reads as f64
            },
        }
    }
}
