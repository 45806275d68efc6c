//! [`SqlCacheBuilder`]: the original's `SQLCache(cache, default_ttl, max_query_size,
//! enable_query_logging, enable_performance_monitoring)`.

use std::sync::Arc;
use std::time::Duration;

use ncm_cache_core::{Cache, CacheError, Codec, Result, SingleFlight};

use crate::cache::{Inner, SqlCache};
use crate::deps::Dependencies;
use crate::executor::SqlExecutor;
use crate::keys::Keys;
use crate::rules::Policy;
use crate::stats::SqlStats;
use crate::tables::parse_table_name;

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
    decoded_cache_size: usize,
    policy: Policy,
    dependencies: Vec<(String, String)>,
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
            decoded_cache_size: 1024,
            policy: Policy::default(),
            dependencies: Vec::new(),
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

    /// How many decoded results this process keeps (default 1024, and at most about 64 MiB;
    /// 0: decode every hit). A
    /// hit whose stored bytes are exactly those of a remembered result shares its rows
    /// instead of decoding them again ([`SqlCache::cache_query_shared`] then copies nothing).
    /// Validity is still checked on every read (generation tokens), so remembering never
    /// serves a stale result.
    pub fn decoded_cache_size(mut self, n: usize) -> Self {
        self.decoded_cache_size = n;
        self
    }

    /// Cache results of statements that call functions outside the built-in deterministic
    /// list (default `false`: such statements run uncached, counted as "unknown function
    /// f()"). Volatile functions (`nextval`, `random`, `now`, …) are never cached.
    ///
    /// ```
    /// # use ncm_cache_sql::{SqlCache, SqliteExecutor};
    /// # async fn demo(cache: ncm_cache_core::Cache<ncm_cache_codec::Serializer>) -> ncm_cache_core::Result<()> {
    /// let sql = SqlCache::builder(cache, SqliteExecutor::memory().await?)
    ///     .deterministic_functions(["price_with_tax"]) // just these,
    ///     .cache_unknown_functions(false)               // not every unknown one
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn cache_unknown_functions(mut self, on: bool) -> Self {
        self.policy.unknown_functions = on;
        self
    }

    /// Functions (bare names, any case) to treat as deterministic: statements calling them are
    /// cached. A volatile built-in named here stays uncached.
    pub fn deterministic_functions<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.policy
            .deterministic
            .extend(names.into_iter().map(|n| n.as_ref().to_lowercase()));
        self
    }

    /// Cache results of queries that read no table (`SELECT 1 + 1`, `SELECT version()`;
    /// default `false`: no write would ever invalidate them, so they are only right if they
    /// never change). Their only invalidations are the TTL and `invalidate_all`.
    pub fn cache_tableless(mut self, on: bool) -> Self {
        self.policy.tableless = on;
        self
    }

    /// Declares that a write to `written` changes what queries of `affected` return — a
    /// dependency the catalog does not show, e.g. a trigger on `orders` that writes
    /// `order_totals`. Writes to `written` then invalidate `affected` too (transitively).
    /// Views, partitions and cascading foreign keys are read from the catalog (PostgreSQL,
    /// MySQL/MariaDB) and need no declaration.
    ///
    /// ```
    /// # use ncm_cache_sql::{SqlCache, SqliteExecutor};
    /// # async fn demo(cache: ncm_cache_core::Cache<ncm_cache_codec::Serializer>) -> ncm_cache_core::Result<()> {
    /// let sql = SqlCache::builder(cache, SqliteExecutor::memory().await?)
    ///     .dependency("orders", "order_totals") // a trigger keeps order_totals up to date
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn dependency(mut self, written: &str, affected: &str) -> Self {
        self.dependencies
            .push((written.to_owned(), affected.to_owned()));
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
        let keys = Keys::new(
            &self.namespace,
            self.executor.identity(),
            self.executor.database_identity(),
        );
        let dialect = self.executor.dialect();
        Ok(SqlCache::from_inner(Inner {
            dialect,
            keys,
            cache: self.cache,
            executor: self.executor,
            default_ttl: self.default_ttl,
            max_query_size: self.max_query_size,
            logging: self.query_logging,
            statements: (self.statement_cache_size > 0)
                .then(|| quick_cache::sync::Cache::new(self.statement_cache_size)),
            decoded: (self.decoded_cache_size > 0).then(|| {
                crate::flow::DecodedMemo::with_weighter(
                    self.decoded_cache_size,
                    crate::flow::DECODED_BYTES,
                    crate::flow::DecodedWeighter,
                )
            }),
            flights: SingleFlight::new(),
            deps: Dependencies::new(
                self.dependencies
                    .iter()
                    .map(|(w, a)| {
                        (
                            parse_table_name(w, dialect).bare().to_owned(),
                            parse_table_name(a, dialect).bare().to_owned(),
                        )
                    })
                    .collect(),
            ),
            policy: self.policy,
            pending: std::sync::Mutex::default(),
            token_creation: tokio::sync::Mutex::new(()),
            stats: SqlStats::new(&self.name, self.performance_monitoring),
        }))
    }
}
