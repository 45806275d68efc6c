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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
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

/// Stripes of the hot counters: threads bump different cache lines.
const STRIPES: usize = 8;

/// This thread's stripe, in `0..STRIPES` (threads are numbered round-robin on first use).
#[inline]
fn stripe() -> usize {
    thread_local! {
        static STRIPE: usize = {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            NEXT.fetch_add(1, Relaxed) % STRIPES
        };
    }
    STRIPE.with(|s| *s)
}

/// A counter bumped from many threads at once: striped over cache-line-padded cells (as
/// Java's `LongAdder`), so concurrent bumps do not contend on one cache line; reading sums the
/// cells.
///
/// ```
/// use ncm_cache_core::StripedCounter;
/// let hits = StripedCounter::default();
/// std::thread::scope(|s| {
///     for _ in 0..4 {
///         s.spawn(|| (0..1000).for_each(|_| hits.bump()));
///     }
/// });
/// assert_eq!(hits.load(), 4000);
/// ```
#[derive(Debug, Default)]
pub struct StripedCounter {
    cells: [PaddedU64; STRIPES],
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct PaddedU64(AtomicU64);

impl StripedCounter {
    /// Adds one.
    #[inline]
    pub fn bump(&self) {
        if let Some(cell) = self.cells.get(stripe()) {
            cell.0.fetch_add(1, Relaxed);
        }
    }

    /// The sum of every cell.
    pub fn load(&self) -> u64 {
        self.cells.iter().map(|c| c.0.load(Relaxed)).sum()
    }
}

/// The counters one thread bumps on the hot path, on their own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    /// Wrapping: a hit turned into a miss may be taken from another stripe's count.
    hits: AtomicU64,
    misses: AtomicU64,
    sets: AtomicU64,
    deletes: AtomicU64,
    errors: AtomicU64,
    latency_count: AtomicU64,
    latency_sum_nanos: AtomicU64,
    latency_max_nanos: AtomicU64,
}

/// Atomic counters and a latency histogram for one cache, mirrored to the `metrics` crate.
///
/// The counters bumped on every operation are striped per thread (see [`StripedCounter`]), so
/// a backend shared by many threads does not serialise them on one cache line.
#[derive(Debug)]
pub struct StatsRecorder {
    name: Arc<str>,
    level: &'static str,
    stripes: [Stripe; STRIPES],
    codec_errors: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    /// `STRIPES * BUCKETS` counts, allocated on the first latency recorded.
    latency_buckets: OnceLock<Box<[AtomicU64]>>,
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
            stripes: Default::default(),
            codec_errors: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            latency_buckets: OnceLock::new(),
            counters: (0..slots).map(|_| OnceLock::new()).collect(),
            histograms: (0..Operation::ALL.len()).map(|_| OnceLock::new()).collect(),
            extra: [OnceLock::new(), OnceLock::new(), OnceLock::new()],
        }
    }

    #[inline]
    fn mine(&self) -> &Stripe {
        &self.stripes[stripe()]
    }

    /// Sums one counter over the stripes.
    fn sum(&self, field: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(field(s).load(Relaxed)))
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
        self.mine().hits.fetch_add(1, Relaxed);
        self.emit(Operation::Get, Outcome::Hit);
    }

    /// Records `n` reads that found a value (batch reads).
    pub fn hits(&self, n: u64) {
        self.mine().hits.fetch_add(n, Relaxed);
    }

    /// Records a read that found nothing.
    #[inline]
    pub fn miss(&self) {
        self.mine().misses.fetch_add(1, Relaxed);
        self.emit(Operation::Get, Outcome::Miss);
    }

    /// Records `n` reads that found nothing (batch reads).
    pub fn misses(&self, n: u64) {
        self.mine().misses.fetch_add(n, Relaxed);
    }

    /// Records `n` successful writes.
    #[inline]
    pub fn sets(&self, n: u64) {
        self.mine().sets.fetch_add(n, Relaxed);
    }

    /// Records `n` removed keys.
    #[inline]
    pub fn deletes(&self, n: u64) {
        self.mine().deletes.fetch_add(n, Relaxed);
    }

    /// Records a failed operation.
    pub fn error(&self, op: Operation) {
        self.mine().errors.fetch_add(1, Relaxed);
        self.emit(op, Outcome::Error);
    }

    /// Records that a read counted as a hit returned a value the caller could not decode: the
    /// hit becomes a miss and a codec error is counted.
    pub fn undecodable(&self) {
        // Wrapping per stripe (the hit may have been counted on another one); the sum is
        // clamped at zero in case the hit was counted by another recorder.
        let mine = self.mine();
        mine.hits.fetch_sub(1, Relaxed);
        mine.misses.fetch_add(1, Relaxed);
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
        let nanos = crate::clock::duration_nanos(elapsed);
        let i = stripe();
        let mine = &self.stripes[i];
        mine.latency_count.fetch_add(1, Relaxed);
        mine.latency_sum_nanos.fetch_add(nanos, Relaxed);
        if nanos > mine.latency_max_nanos.load(Relaxed) {
            mine.latency_max_nanos.fetch_max(nanos, Relaxed);
        }
        let buckets = self
            .latency_buckets
            .get_or_init(|| (0..STRIPES * BUCKETS).map(|_| AtomicU64::new(0)).collect());
        if let Some(bucket) = buckets.get(i * BUCKETS + bucket_index(nanos)) {
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
        // A sum above i64::MAX is a net negative (more hits undone than counted here).
        let hits = self.sum(|s| &s.hits);
        let hits = if hits > i64::MAX as u64 { 0 } else { hits };
        let misses = self.sum(|s| &s.misses);
        let total = hits + misses;
        CacheStats {
            name: self.name.to_string(),
            level: self.level.to_owned(),
            hits,
            misses,
            sets: self.sum(|s| &s.sets),
            deletes: self.sum(|s| &s.deletes),
            errors: self.sum(|s| &s.errors),
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
        let count = self.sum(|s| &s.latency_count);
        if count == 0 {
            return None;
        }
        let buckets = self.latency_buckets.get()?;
        let counts: Vec<u64> = (0..BUCKETS)
            .map(|b| {
                (0..STRIPES)
                    .filter_map(|i| buckets.get(i * BUCKETS + b))
                    .map(|c| c.load(Relaxed))
                    .sum()
            })
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
            mean: Duration::from_nanos(self.sum(|s| &s.latency_sum_nanos) / count),
            p50: quantile(0.50),
            p99: quantile(0.99),
            max: Duration::from_nanos(
                self.stripes
                    .iter()
                    .map(|s| s.latency_max_nanos.load(Relaxed))
                    .max()
                    .unwrap_or(0),
            ),
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
    fn striped_counters_sum_bumps_from_every_thread() {
        let stats = StatsRecorder::new("t", "l2");
        std::thread::scope(|s| {
            for _ in 0..(STRIPES + 3) {
                s.spawn(|| {
                    for _ in 0..1000 {
                        stats.hit();
                        stats.sets(2);
                        stats.latency(Operation::Get, Duration::from_micros(10));
                    }
                    stats.miss();
                });
            }
        });
        let snap = stats.snapshot();
        let threads = (STRIPES + 3) as u64;
        assert_eq!(snap.hits, 1000 * threads);
        assert_eq!(snap.sets, 2000 * threads);
        assert_eq!(snap.misses, threads);
        let latency = snap.latency.unwrap();
        assert_eq!(latency.count, 1000 * threads);
        assert!(
            latency.p99 >= Duration::from_micros(9) && latency.p99 <= Duration::from_micros(11)
        );
    }

    #[test]
    fn an_undone_hit_on_another_thread_neither_wraps_nor_goes_negative() {
        let stats = StatsRecorder::new("t", "l2");
        stats.hit();
        std::thread::scope(|s| {
            s.spawn(|| stats.undecodable());
        });
        let snap = stats.snapshot();
        assert_eq!((snap.hits, snap.misses, snap.codec_errors), (0, 1, 1));
        // More undone than counted (a hit counted by another recorder): clamped at zero.
        stats.undecodable();
        assert_eq!(stats.snapshot().hits, 0);
    }

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
