//! Statistics: cheap atomic counters, a latency histogram, and emission through `metrics`.
//!
//! Every backend owns a [`StatsRecorder`]. Counters are relaxed atomics; `metrics` handles are
//! registered lazily on first use (so a recorder installed after the cache was built still sees
//! them) and cached, so the hot path pays one atomic load and the recorder's own cost.
//!
//! Emitted series (labels `cache`, `level`, `operation`, `outcome`):
//! - `ncm_cache_operations_total` — counter per operation and outcome (`hit`, `miss`, `ok`, `error`)
//! - `ncm_cache_operation_duration_seconds` — histogram per operation (network backends)
//! - `ncm_cache_evictions_total`, `ncm_cache_expirations_total`, `ncm_cache_codec_errors_total`
//! - `ncm_cache_entries`, `ncm_cache_memory_bytes` — gauges, refreshed by `get_stats()`

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// An operation, as labelled in stats and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// A single-key read.
    Get,
    /// A single-key write.
    Set,
    /// A single-key delete.
    Delete,
    /// An existence check.
    Exists,
    /// A batch read.
    GetMany,
    /// A batch write.
    SetMany,
    /// A batch delete.
    DeleteMany,
    /// A TTL read.
    GetTtl,
    /// A TTL change.
    ExtendTtl,
    /// A pattern delete.
    ClearPattern,
    /// A health probe.
    HealthCheck,
    /// A loader run.
    Load,
}

impl Operation {
    const ALL: [Operation; 12] = [
        Self::Get,
        Self::Set,
        Self::Delete,
        Self::Exists,
        Self::GetMany,
        Self::SetMany,
        Self::DeleteMany,
        Self::GetTtl,
        Self::ExtendTtl,
        Self::ClearPattern,
        Self::HealthCheck,
        Self::Load,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Set => "set",
            Self::Delete => "delete",
            Self::Exists => "exists",
            Self::GetMany => "get_many",
            Self::SetMany => "set_many",
            Self::DeleteMany => "delete_many",
            Self::GetTtl => "get_ttl",
            Self::ExtendTtl => "extend_ttl",
            Self::ClearPattern => "clear_pattern",
            Self::HealthCheck => "health_check",
            Self::Load => "load",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The outcome of an operation, as labelled in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// A read found the key.
    Hit,
    /// A read did not find the key.
    Miss,
    /// A write or other operation succeeded.
    Ok,
    /// The operation failed.
    Error,
}

impl Outcome {
    const COUNT: usize = 4;

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Ok => "ok",
            Self::Error => "error",
        }
    }
}

/// A latency summary computed from the recorder's histogram.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct LatencySummary {
    /// Number of timed operations.
    pub count: u64,
    /// Mean latency.
    pub mean: Duration,
    /// Median (bucket estimate, within ~19 %).
    pub p50: Duration,
    /// 99th percentile (bucket estimate, within ~19 %).
    pub p99: Duration,
    /// Largest latency seen.
    pub max: Duration,
}

/// A point-in-time snapshot of a cache's statistics (the original's `get_stats()`).
///
/// ```
/// use ncm_cache_core::StatsRecorder;
/// let rec = StatsRecorder::new("users", "memory");
/// rec.hit(); rec.hit(); rec.hit(); rec.miss();
/// let stats = rec.snapshot();
/// assert_eq!(stats.total_requests, 4);
/// assert_eq!(stats.hit_rate, 0.75);
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[non_exhaustive]
pub struct CacheStats {
    /// The cache's name (the `cache` metrics label).
    pub name: String,
    /// The level or backend kind (the `level` metrics label), e.g. `memory`, `redis`, `l1`.
    pub level: String,
    /// Reads that found a value.
    pub hits: u64,
    /// Reads that found nothing (including values that could not be decoded).
    pub misses: u64,
    /// Successful writes.
    pub sets: u64,
    /// Keys removed by delete, delete_many and clear_pattern.
    pub deletes: u64,
    /// Failed operations of any kind.
    pub errors: u64,
    /// Stored values that could not be decoded (counted as misses and removed).
    pub codec_errors: u64,
    /// Entries evicted to respect the size bounds.
    pub evictions: u64,
    /// Entries removed because their TTL ran out.
    pub expirations: u64,
    /// `hits + misses`.
    pub total_requests: u64,
    /// `hits / total_requests`, or 0 when there were no reads.
    pub hit_rate: f64,
    /// Number of entries, where the backend knows it.
    pub entries: Option<u64>,
    /// Bytes used, where the backend knows it: Redis's `used_memory`; for the memory backend the
    /// bytes *charged* against `max_bytes` (each entry is charged at least
    /// `max_bytes / max_entries`), an upper bound of what it really holds
    /// (`MemoryBackend::used_bytes` walks the entries for the exact figure).
    pub memory_usage: Option<u64>,
    /// Operation latencies, for backends that time their operations.
    pub latency: Option<LatencySummary>,
}

const BUCKETS: usize = 64 * 4;

/// Atomic counters and a latency histogram for one cache, mirrored to the `metrics` crate.
#[derive(Debug)]
pub struct StatsRecorder {
    name: Arc<str>,
    level: &'static str,
    hits: AtomicU64,
    misses: AtomicU64,
    sets: AtomicU64,
    deletes: AtomicU64,
    errors: AtomicU64,
    codec_errors: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    latency_count: AtomicU64,
    latency_sum_nanos: AtomicU64,
    latency_max_nanos: AtomicU64,
    latency_buckets: Box<[AtomicU64]>,
    counters: Box<[OnceLock<metrics::Counter>]>,
    histograms: Box<[OnceLock<metrics::Histogram>]>,
    extra: [OnceLock<metrics::Counter>; 3],
}

impl StatsRecorder {
    /// A recorder for the cache `name` at `level` (used as metrics labels).
    pub fn new(name: impl Into<Arc<str>>, level: &'static str) -> Self {
        let slots = Operation::ALL.len() * Outcome::COUNT;
        Self {
            name: name.into(),
            level,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            sets: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            codec_errors: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
            latency_sum_nanos: AtomicU64::new(0),
            latency_max_nanos: AtomicU64::new(0),
            latency_buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            counters: (0..slots).map(|_| OnceLock::new()).collect(),
            histograms: (0..Operation::ALL.len()).map(|_| OnceLock::new()).collect(),
            extra: [OnceLock::new(), OnceLock::new(), OnceLock::new()],
        }
    }

    /// The cache name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The level label.
    pub fn level(&self) -> &'static str {
        self.level
    }

    /// Counts one operation with its outcome in `metrics` only (the atomic counters have
    /// dedicated methods: [`hit`](Self::hit), [`miss`](Self::miss), ...).
    #[inline]
    pub fn emit(&self, op: Operation, outcome: Outcome) {
        let slot = op.index() * Outcome::COUNT + outcome as usize;
        if let Some(cell) = self.counters.get(slot) {
            cell.get_or_init(|| {
                metrics::counter!(
                    "ncm_cache_operations_total",
                    "cache" => self.name.to_string(),
                    "level" => self.level,
                    "operation" => op.as_str(),
                    "outcome" => outcome.as_str(),
                )
            })
            .increment(1);
        }
    }

    /// Records a read that found a value.
    #[inline]
    pub fn hit(&self) {
        self.hits.fetch_add(1, Relaxed);
        self.emit(Operation::Get, Outcome::Hit);
    }

    /// Records `n` reads that found a value (batch reads).
    pub fn hits(&self, n: u64) {
        self.hits.fetch_add(n, Relaxed);
    }

    /// Records a read that found nothing.
    #[inline]
    pub fn miss(&self) {
        self.misses.fetch_add(1, Relaxed);
        self.emit(Operation::Get, Outcome::Miss);
    }

    /// Records `n` reads that found nothing (batch reads).
    pub fn misses(&self, n: u64) {
        self.misses.fetch_add(n, Relaxed);
    }

    /// Records `n` successful writes.
    #[inline]
    pub fn sets(&self, n: u64) {
        self.sets.fetch_add(n, Relaxed);
    }

    /// Records `n` removed keys.
    #[inline]
    pub fn deletes(&self, n: u64) {
        self.deletes.fetch_add(n, Relaxed);
    }

    /// Records a failed operation.
    pub fn error(&self, op: Operation) {
        self.errors.fetch_add(1, Relaxed);
        self.emit(op, Outcome::Error);
    }

    /// Records that a read counted as a hit returned a value the caller could not decode: the
    /// hit becomes a miss and a codec error is counted.
    pub fn undecodable(&self) {
        // Saturating: never underflow if the hit was counted by another recorder.
        let _ = self
            .hits
            .fetch_update(Relaxed, Relaxed, |h| Some(h.saturating_sub(1)));
        self.misses.fetch_add(1, Relaxed);
        self.codec_error();
    }

    /// Records a value that could not be decoded.
    pub fn codec_error(&self) {
        self.codec_errors.fetch_add(1, Relaxed);
        self.extra_counter(0, "ncm_cache_codec_errors_total")
            .increment(1);
    }

    /// Records `n` evictions.
    pub fn evictions(&self, n: u64) {
        self.evictions.fetch_add(n, Relaxed);
        self.extra_counter(1, "ncm_cache_evictions_total")
            .increment(n);
    }

    /// Records `n` expirations.
    pub fn expirations(&self, n: u64) {
        self.expirations.fetch_add(n, Relaxed);
        self.extra_counter(2, "ncm_cache_expirations_total")
            .increment(n);
    }

    fn extra_counter(&self, i: usize, name: &'static str) -> &metrics::Counter {
        self.extra[i].get_or_init(
            || metrics::counter!(name, "cache" => self.name.to_string(), "level" => self.level),
        )
    }

    /// Records the latency of one operation (in the histogram and in `metrics`).
    pub fn latency(&self, op: Operation, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_nanos.fetch_add(nanos, Relaxed);
        self.latency_max_nanos.fetch_max(nanos, Relaxed);
        if let Some(bucket) = self.latency_buckets.get(bucket_index(nanos)) {
            bucket.fetch_add(1, Relaxed);
        }
        if let Some(cell) = self.histograms.get(op.index()) {
            cell.get_or_init(|| {
                metrics::histogram!(
                    "ncm_cache_operation_duration_seconds",
                    "cache" => self.name.to_string(),
                    "level" => self.level,
                    "operation" => op.as_str(),
                )
            })
            .record(elapsed.as_secs_f64());
        }
    }

    /// A snapshot of the counters. `entries` and `memory_usage` are left for the backend to fill.
    pub fn snapshot(&self) -> CacheStats {
        let hits = self.hits.load(Relaxed);
        let misses = self.misses.load(Relaxed);
        let total = hits + misses;
        CacheStats {
            name: self.name.to_string(),
            level: self.level.to_owned(),
            hits,
            misses,
            sets: self.sets.load(Relaxed),
            deletes: self.deletes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            codec_errors: self.codec_errors.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            expirations: self.expirations.load(Relaxed),
            total_requests: total,
            hit_rate: if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            },
            entries: None,
            memory_usage: None,
            latency: self.latency_summary(),
        }
    }

    /// Publishes size gauges (`ncm_cache_entries`, `ncm_cache_memory_bytes`).
    pub fn publish_gauges(&self, entries: Option<u64>, memory: Option<u64>) {
        if let Some(n) = entries {
            metrics::gauge!("ncm_cache_entries", "cache" => self.name.to_string(), "level" => self.level)
                .set(n as f64);
        }
        if let Some(b) = memory {
            metrics::gauge!("ncm_cache_memory_bytes", "cache" => self.name.to_string(), "level" => self.level)
                .set(b as f64);
        }
    }

    fn latency_summary(&self) -> Option<LatencySummary> {
        let count = self.latency_count.load(Relaxed);
        if count == 0 {
            return None;
        }
        let counts: Vec<u64> = self
            .latency_buckets
            .iter()
            .map(|b| b.load(Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let quantile = |q: f64| -> Duration {
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Duration::from_nanos(bucket_midpoint(i));
                }
            }
            Duration::ZERO
        };
        Some(LatencySummary {
            count,
            mean: Duration::from_nanos(self.latency_sum_nanos.load(Relaxed) / count),
            p50: quantile(0.50),
            p99: quantile(0.99),
            max: Duration::from_nanos(self.latency_max_nanos.load(Relaxed)),
        })
    }
}

/// Log-linear bucket: 4 sub-buckets per power of two.
fn bucket_index(nanos: u64) -> usize {
    if nanos < 4 {
        return nanos as usize;
    }
    let log = 63 - nanos.leading_zeros() as usize;
    let sub = ((nanos >> (log - 2)) & 0b11) as usize;
    (log * 4 + sub).min(BUCKETS - 1)
}

fn bucket_midpoint(index: usize) -> u64 {
    if index < 4 {
        return index as u64;
    }
    let log = index / 4;
    let sub = (index % 4) as u64;
    let low = (1u64 << log) + sub * (1u64 << (log - 2));
    low + (1u64 << (log - 2)) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_close() {
        let mut last = 0;
        for nanos in [
            5u64,
            100,
            1_000,
            10_000,
            123_456,
            1_000_000,
            50_000_000,
            u64::MAX / 2,
        ] {
            let i = bucket_index(nanos);
            assert!(i >= last);
            last = i;
            let mid = bucket_midpoint(i) as f64;
            let err = (mid - nanos as f64).abs() / nanos as f64;
            assert!(err < 0.2, "{nanos}: midpoint {mid} err {err}");
        }
    }

    #[test]
    fn latency_summary_orders_percentiles() {
        let rec = StatsRecorder::new("t", "test");
        for i in 1..=100u64 {
            rec.latency(Operation::Get, Duration::from_micros(i));
        }
        let s = rec.snapshot().latency.unwrap();
        assert_eq!(s.count, 100);
        assert!(s.p50 <= s.p99 && s.p99 <= s.max.mul_f64(1.2));
        assert!(
            s.p50 >= Duration::from_micros(40) && s.p50 <= Duration::from_micros(60),
            "{s:?}"
        );
        assert_eq!(s.max, Duration::from_micros(100));
    }

    #[test]
    fn metrics_are_emitted_with_labels() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let rec = StatsRecorder::new("users", "memory");
            rec.hit();
            rec.hit();
            rec.miss();
            rec.error(Operation::Set);
            rec.latency(Operation::Get, Duration::from_millis(2));
        });
        let snap = snapshotter.snapshot().into_vec();
        let find = |outcome: &str| {
            snap.iter().find_map(|(key, _, _, value)| {
                let labels: Vec<_> = key.key().labels().map(|l| (l.key(), l.value())).collect();
                (key.key().name() == "ncm_cache_operations_total"
                    && labels.contains(&("cache", "users"))
                    && labels.contains(&("level", "memory"))
                    && labels.contains(&("outcome", outcome)))
                .then_some(value)
            })
        };
        assert_eq!(find("hit"), Some(&DebugValue::Counter(2)));
        assert_eq!(find("miss"), Some(&DebugValue::Counter(1)));
        assert_eq!(find("error"), Some(&DebugValue::Counter(1)));
        assert!(
            snap.iter()
                .any(|(k, _, _, _)| k.key().name() == "ncm_cache_operation_duration_seconds")
        );
    }
}
