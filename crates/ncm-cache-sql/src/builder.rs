//! [`SqlCacheBuilder`]: the original's `SQLCache(cache, default_ttl, max_query_size,
//! enable_query_logging, enable_performance_monitoring)`.

use std::sync::Arc;
use std::time::Duration;

use ncm_cache_core::{Cache, CacheError, Codec, Result, SingleFlight};

use crate::cache::{Inner, SqlCache};
use crate::executor::SqlExecutor;
use crate::invalidate::Guard;
use crate::keys::Keys;
use crate::stats::SqlStats;

/// Default lifetime of a cached result: one hour.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Default largest result (encoded) that is cached: 1 MiB.
pub const DEFAULT_MAX_QUERY_SIZE: usize = 1024 * 1024;

/// Builds a [`SqlCache`]; start with [`SqlCache::builder`].
#[derive(Debug)]
#[must_use]
pub struct SqlCacheBuilder<C> {
    cache: Cache<C>,
    executor: Arc<dyn SqlExecutor>,
    default_ttl: Duration,
    max_query_size: usize,
    query_logging: bool,
    performance_monitoring: bool,
    namespace: String,
    name: String,
    statement_cache_size: usize,
}

impl<C: Codec> SqlCacheBuilder<C> {
    pub(crate) fn new(cache: Cache<C>, executor: Arc<dyn SqlExecutor>) -> Self {
        Self {
            cache,
            executor,
            default_ttl: DEFAULT_TTL,
            max_query_size: DEFAULT_MAX_QUERY_SIZE,
            query_logging: false,
            performance_monitoring: true,
            namespace: "sql".to_owned(),
            name: "sql".to_owned(),
            statement_cache_size: 1024,
        }
    }

    /// How long results are cached when a call gives no TTL (default 1 hour).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Results whose encoded size exceeds this many bytes are returned but not cached
    /// (default 1 MiB); they are counted in [`oversized`](crate::SqlPerformanceStats::oversized).
    pub fn max_query_size(mut self, bytes: usize) -> Self {
        self.max_query_size = bytes;
        self
    }

    /// Logs every statement (canonical text, rows, time, hit or miss) at `info` level through
    /// `tracing` (default: off, `debug` level).
    pub fn enable_query_logging(mut self, on: bool) -> Self {
        self.query_logging = on;
        self
    }

    /// Records latencies and the slowest statements (default: on). Counters are always kept.
    pub fn enable_performance_monitoring(mut self, on: bool) -> Self {
        self.performance_monitoring = on;
        self
    }

    /// The first segment of every key (default `sql`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The `cache` label in metrics (default `sql`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How many distinct statements keep their parsed analysis in memory (default 1024; 0
    /// parses every call).
    pub fn statement_cache_size(mut self, n: usize) -> Self {
        self.statement_cache_size = n;
        self
    }

    /// Builds the SQL cache.
    pub fn build(self) -> Result<SqlCache<C>> {
        if self.default_ttl.is_zero() {
            return Err(CacheError::Config(
                "default_ttl must be greater than zero".into(),
            ));
        }
        if self.namespace.is_empty() || self.namespace.contains(['*', '?', '[', ']', '\\']) {
            return Err(CacheError::Config(
                "namespace must be non-empty and free of glob characters".into(),
            ));
        }
        let keys = Keys::new(&self.namespace, self.executor.identity());
        Ok(SqlCache::from_inner(Inner {
            dialect: self.executor.dialect(),
            keys,
            cache: self.cache,
            executor: self.executor,
            default_ttl: self.default_ttl,
            max_query_size: self.max_query_size,
            logging: self.query_logging,
            statements: (self.statement_cache_size > 0)
                .then(|| quick_cache::sync::Cache::new(self.statement_cache_size)),
            flights: SingleFlight::new(),
            guard: Guard::default(),
            stats: SqlStats::new(&self.name, self.performance_monitoring),
        }))
    }
}
