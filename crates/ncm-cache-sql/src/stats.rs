//! Performance statistics of a [`SqlCache`](crate::SqlCache) (the original's
//! `get_performance_stats()`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use ncm_cache_core::{LatencySummary, Operation, StatsRecorder};
use serde::Serialize;

/// How many of the slowest statements are kept.
pub(crate) const SLOW_QUERIES: usize = 10;
/// Statements in the slow list are cut to this many bytes.
const SLOW_SQL_LEN: usize = 200;

/// One of the slowest statements seen (by database time).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct SlowQuery {
    /// The canonical statement, truncated to 200 bytes.
    pub sql: String,
    /// Its slowest database time.
    pub duration: Duration,
    /// Rows it returned that time.
    pub rows: usize,
}

/// A snapshot of a [`SqlCache`](crate::SqlCache)'s statistics.
///
/// ```
/// # use ncm_cache_sql::SqlPerformanceStats;
/// fn report(stats: &SqlPerformanceStats) {
///     println!("Query hit rate: {:.2}%", stats.hit_rate * 100.0);
///     println!("database p99: {:?}, cache p99: {:?}", stats.db_time.p99, stats.cache_time.p99);
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[non_exhaustive]
pub struct SqlPerformanceStats {
    /// Queries answered from the cache.
    pub hits: u64,
    /// Cache lookups that found nothing.
    pub misses: u64,
    /// `hits + misses`.
    pub total_queries: u64,
    /// `hits / total_queries` (0 with no queries).
    pub hit_rate: f64,
    /// Statements run on the database (queries and writes).
    pub db_queries: u64,
    /// Statements the database failed.
    pub db_errors: u64,
    /// `DbFirst` queries answered from the cache because the database failed.
    pub stale_served: u64,
    /// Results served but not cached because they exceeded `max_query_size`.
    pub oversized: u64,
    /// Results served but not cached for another reason (see `uncached_reasons`).
    pub uncached: u64,
    /// Why results were not cached, by reason ("writes", "row locks", "volatile function
    /// nextval()", "unknown function f()", "reads no table", "unparsed", "not a query",
    /// "too many tables", "unreadable value: …"), sorted by reason.
    pub uncached_reasons: Vec<(String, u64)>,
    /// Invalidations that failed after a write committed (the write still returned its
    /// result); each is retried in the background.
    pub invalidation_failures: u64,
    /// Failed invalidations that later succeeded on a retry.
    pub invalidation_retries_succeeded: u64,
    /// Cache reads or writes that failed (the query fell through to the database).
    pub cache_errors: u64,
    /// Write statements run through `execute`.
    pub writes: u64,
    /// Invalidation calls (query, pattern, table, write, listener).
    pub invalidations: u64,
    /// What invalidations covered: tables whose generation was replaced (`invalidate_table`,
    /// writes, the listener; `invalidate_all` counts one), plus entries removed by
    /// `invalidate_query` and `invalidate_pattern`.
    pub invalidated_entries: u64,
    /// Database time per statement (mean, p50, p99, max); empty without performance
    /// monitoring.
    pub db_time: LatencySummary,
    /// Cache lookup time (read + decode); empty without performance monitoring.
    pub cache_time: LatencySummary,
    /// The slowest statements, slowest first; empty without performance monitoring.
    pub slowest_queries: Vec<SlowQuery>,
}

/// Live counters.
#[derive(Debug)]
pub(crate) struct SqlStats {
    monitoring: bool,
    lookups: StatsRecorder,
    database: StatsRecorder,
    pub(crate) db_queries: AtomicU64,
    pub(crate) db_errors: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) oversized: AtomicU64,
    pub(crate) uncached: AtomicU64,
    uncached_reasons: Mutex<std::collections::BTreeMap<String, u64>>,
    pub(crate) invalidation_failures: AtomicU64,
    pub(crate) invalidation_retries_succeeded: AtomicU64,
    pub(crate) cache_errors: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) invalidated_entries: AtomicU64,
    slow: Mutex<Vec<SlowQuery>>,
}

impl SqlStats {
    pub(crate) fn new(name: &str, monitoring: bool) -> Self {
        Self {
            monitoring,
            lookups: StatsRecorder::new(name.to_owned(), "sql"),
            database: StatsRecorder::new(name.to_owned(), "sql_database"),
            db_queries: AtomicU64::new(0),
            db_errors: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
            oversized: AtomicU64::new(0),
            uncached: AtomicU64::new(0),
            uncached_reasons: Mutex::new(std::collections::BTreeMap::new()),
            invalidation_failures: AtomicU64::new(0),
            invalidation_retries_succeeded: AtomicU64::new(0),
            cache_errors: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            invalidated_entries: AtomicU64::new(0),
            slow: Mutex::new(Vec::with_capacity(SLOW_QUERIES + 1)),
        }
    }

    pub(crate) fn hit(&self, elapsed: Duration) {
        self.lookups.hit();
        if self.monitoring {
            self.lookups.latency(Operation::Get, elapsed);
        }
    }

    pub(crate) fn miss(&self, elapsed: Duration) {
        self.lookups.miss();
        if self.monitoring {
            self.lookups.latency(Operation::Get, elapsed);
        }
    }

    /// A result served but not cached, and why. The reasons map is bounded (reasons name
    /// functions, so a statement mix could grow it): past 256 reasons new ones count as
    /// "other".
    pub(crate) fn uncached(&self, reason: String) {
        self.uncached.fetch_add(1, Relaxed);
        let mut reasons = self
            .uncached_reasons
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let len = reasons.len();
        match reasons.get_mut(&reason) {
            Some(n) => *n += 1,
            None if len < 256 => {
                reasons.insert(reason, 1);
            }
            None => *reasons.entry("other".to_owned()).or_default() += 1,
        }
    }

    pub(crate) fn cache_error(&self, op: Operation) {
        self.cache_errors.fetch_add(1, Relaxed);
        self.lookups.error(op);
    }

    pub(crate) fn codec_error(&self) {
        self.lookups.codec_error();
    }

    pub(crate) fn db_error(&self) {
        self.db_errors.fetch_add(1, Relaxed);
        self.database.error(Operation::Load);
    }

    pub(crate) fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Records one database statement.
    pub(crate) fn database(&self, sql: &str, elapsed: Duration, rows: usize) {
        self.db_queries.fetch_add(1, Relaxed);
        if !self.monitoring {
            return;
        }
        self.database.latency(Operation::Load, elapsed);
        let Ok(mut slow) = self.slow.lock() else {
            return;
        };
        if slow.len() == SLOW_QUERIES && slow.last().is_some_and(|s| s.duration >= elapsed) {
            return;
        }
        let sql = truncate(sql, SLOW_SQL_LEN);
        if let Some(existing) = slow.iter_mut().find(|s| s.sql == sql) {
            if existing.duration < elapsed {
                existing.duration = elapsed;
                existing.rows = rows;
            }
        } else {
            slow.push(SlowQuery {
                sql,
                duration: elapsed,
                rows,
            });
        }
        slow.sort_by_key(|s| std::cmp::Reverse(s.duration));
        slow.truncate(SLOW_QUERIES);
    }

    pub(crate) fn snapshot(&self) -> SqlPerformanceStats {
        let lookups = self.lookups.snapshot();
        let database = self.database.snapshot();
        SqlPerformanceStats {
            hits: lookups.hits,
            misses: lookups.misses,
            total_queries: lookups.total_requests,
            hit_rate: lookups.hit_rate,
            db_queries: self.db_queries.load(Relaxed),
            db_errors: self.db_errors.load(Relaxed),
            stale_served: self.stale_served.load(Relaxed),
            oversized: self.oversized.load(Relaxed),
            uncached: self.uncached.load(Relaxed),
            uncached_reasons: self
                .uncached_reasons
                .lock()
                .map(|r| r.iter().map(|(k, v)| (k.clone(), *v)).collect())
                .unwrap_or_default(),
            invalidation_failures: self.invalidation_failures.load(Relaxed),
            invalidation_retries_succeeded: self.invalidation_retries_succeeded.load(Relaxed),
            cache_errors: self.cache_errors.load(Relaxed),
            writes: self.writes.load(Relaxed),
            invalidations: self.invalidations.load(Relaxed),
            invalidated_entries: self.invalidated_entries.load(Relaxed),
            db_time: database.latency.unwrap_or_default(),
            cache_time: lookups.latency.unwrap_or_default(),
            slowest_queries: self.slow.lock().map(|s| s.clone()).unwrap_or_default(),
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_list_is_bounded_sorted_and_deduplicated() {
        let stats = SqlStats::new("t", true);
        for i in 0..30u64 {
            stats.database(&format!("q{}", i % 15), Duration::from_millis(i), 1);
        }
        let snap = stats.snapshot();
        assert_eq!(snap.slowest_queries.len(), SLOW_QUERIES);
        assert_eq!(snap.slowest_queries[0].duration, Duration::from_millis(29));
        assert_eq!(snap.slowest_queries[0].sql, "q14");
        assert!(
            snap.slowest_queries
                .windows(2)
                .all(|w| w[0].duration >= w[1].duration)
        );
        assert_eq!(snap.db_queries, 30);
        assert_eq!(snap.db_time.count, 30);
        let long = "é".repeat(300);
        stats.database(&long, Duration::from_secs(1), 0);
        assert!(stats.snapshot().slowest_queries[0].sql.len() <= SLOW_SQL_LEN + 3);
    }

    #[test]
    fn monitoring_off_keeps_counters_only() {
        let stats = SqlStats::new("t", false);
        stats.database("q", Duration::from_millis(5), 1);
        stats.hit(Duration::from_micros(3));
        stats.miss(Duration::from_micros(3));
        let snap = stats.snapshot();
        assert_eq!((snap.db_queries, snap.hits, snap.misses), (1, 1, 1));
        assert_eq!(snap.hit_rate, 0.5);
        assert!(snap.slowest_queries.is_empty());
        assert_eq!(snap.db_time.count, 0);
    }
}
