//! Loader statistics (`get_loader_stats()`) and health (`get_health_status()`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use ncm_cache_core::{HealthReport, Operation, Outcome, StatsRecorder};
use serde::Serialize;

/// Counters of one loader, kept in a [`StatsRecorder`] (relaxed atomics, mirrored to the
/// `metrics` crate with `cache = <loader name>`, `level = "loader"`).
#[derive(Debug)]
pub(crate) struct LoaderCounters {
    enabled: bool,
    recorder: StatsRecorder,
    cache_errors: AtomicU64,
}

impl LoaderCounters {
    pub(crate) fn new(name: &str, enabled: bool) -> Self {
        Self {
            enabled,
            recorder: StatsRecorder::new(name, "loader"),
            cache_errors: AtomicU64::new(0),
        }
    }

    /// A call served from the cache.
    pub(crate) fn hit(&self) {
        if self.enabled {
            self.recorder.hit();
        }
    }

    /// A call that needed a load (run here or shared with a concurrent caller).
    pub(crate) fn miss(&self) {
        if self.enabled {
            self.recorder.miss();
        }
    }

    /// One run of the loader and how long it took.
    pub(crate) fn load(&self, elapsed: Duration, ok: bool) {
        if self.enabled {
            self.recorder.latency(Operation::Load, elapsed);
            self.recorder.emit(
                Operation::Load,
                if ok { Outcome::Ok } else { Outcome::Error },
            );
        }
    }

    /// A call that returned the loader's error.
    pub(crate) fn error(&self) {
        if self.enabled {
            self.recorder.error(Operation::Load);
        }
    }

    /// The cache failed under a call (read or write); the call went on without it.
    pub(crate) fn cache_error(&self, op: Operation) {
        if self.enabled {
            self.cache_errors.fetch_add(1, Relaxed);
            self.recorder.emit(op, Outcome::Error);
        }
    }

    pub(crate) fn snapshot(&self) -> LoaderStats {
        let s = self.recorder.snapshot();
        let latency = s.latency.unwrap_or_default();
        LoaderStats {
            calls: s.total_requests,
            hits: s.hits,
            misses: s.misses,
            loads: latency.count,
            errors: s.errors,
            cache_errors: self.cache_errors.load(Relaxed),
            hit_rate: s.hit_rate,
            mean_load_time: latency.mean,
            max_load_time: latency.max,
        }
    }
}

/// Statistics of one loader (or the sum over all of them).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
#[non_exhaustive]
pub struct LoaderStats {
    /// Calls of `load` / of the annotated function (`hits + misses`).
    pub calls: u64,
    /// Calls answered from the cache.
    pub hits: u64,
    /// Calls that needed a load (run by this caller or shared with a concurrent one).
    pub misses: u64,
    /// Times the loader actually ran.
    pub loads: u64,
    /// Calls that returned the loader's error (errors are never cached).
    pub errors: u64,
    /// Cache reads or writes that failed; the call went on without the cache (fail-open).
    pub cache_errors: u64,
    /// `hits / calls`, 0 without calls.
    pub hit_rate: f64,
    /// Mean time of one loader run.
    pub mean_load_time: Duration,
    /// Longest loader run.
    pub max_load_time: Duration,
}

impl LoaderStats {
    /// Errors (loader and cache) per call, 0 without calls.
    pub fn error_rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            (self.errors + self.cache_errors) as f64 / self.calls as f64
        }
    }

    fn add(&mut self, other: &LoaderStats) {
        let total_load = self.mean_load_time.as_secs_f64() * self.loads as f64
            + other.mean_load_time.as_secs_f64() * other.loads as f64;
        self.calls += other.calls;
        self.hits += other.hits;
        self.misses += other.misses;
        self.loads += other.loads;
        self.errors += other.errors;
        self.cache_errors += other.cache_errors;
        self.max_load_time = self.max_load_time.max(other.max_load_time);
        self.mean_load_time = if self.loads == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(total_load / self.loads as f64)
        };
        self.hit_rate = if self.calls == 0 {
            0.0
        } else {
            self.hits as f64 / self.calls as f64
        };
    }
}

/// Everything `get_loader_stats()` reports: per loader and overall.
///
/// ```
/// # use ncm_cache_loader::LoaderStatsReport;
/// # fn show(report: LoaderStatsReport) {
/// println!("Loader hit rate: {:.2}%", report.overall_hit_rate * 100.0);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[non_exhaustive]
pub struct LoaderStatsReport {
    /// Per loader, by name (registered loaders and annotated functions).
    pub loaders: BTreeMap<String, LoaderStats>,
    /// The sum over every loader.
    pub total: LoaderStats,
    /// `total.hits / total.calls` (the original's `overall_hit_rate`).
    pub overall_hit_rate: f64,
}

impl LoaderStatsReport {
    pub(crate) fn from_loaders(loaders: BTreeMap<String, LoaderStats>) -> Self {
        let mut total = LoaderStats::default();
        for stats in loaders.values() {
            total.add(stats);
        }
        Self {
            overall_hit_rate: total.hit_rate,
            loaders,
            total,
        }
    }
}

/// The loader's health (`get_health_status()`): healthy when the backend answers and the error
/// rate is below the configured maximum.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct LoaderHealth {
    /// `backend_healthy && error_rate <= max_error_rate`.
    pub is_healthy: bool,
    /// The backend answered its health probe.
    pub backend_healthy: bool,
    /// The backend's probe, with latency and detail.
    pub backend: HealthReport,
    /// Errors per call over the loader's lifetime.
    pub error_rate: f64,
    /// The threshold above which the loader is unhealthy.
    pub max_error_rate: f64,
    /// Registered loaders (annotated functions are not registered).
    pub registered_loaders: usize,
    /// Whether background warming is running.
    pub background_warming: bool,
    /// Completed background warming rounds.
    pub warming_rounds: u64,
    /// Human-readable reasons for being unhealthy (empty when healthy).
    pub issues: Vec<String>,
}
