//! [`SqlCache`]: query results cached over any backend, invalidated by table.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheError, Codec, Result, SingleFlight};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::builder::SqlCacheBuilder;
use crate::deps::Dependencies;
use crate::executor::{SqlDialect, SqlExecutor};
use crate::keys::{Analysis, Keys};
use crate::params::SqlParams;
use crate::rows::Rows;
use crate::rules::Policy;
use crate::stats::{SqlPerformanceStats, SqlStats};

/// Statements longer than this are analysed on every call instead of being memoized.
const MAX_MEMO_SQL: usize = 16 * 1024;

/// Where [`SqlCache::cache_query`] looks first (the original's `QueryCacheStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryCacheStrategy {
    /// The cache, then the database on a miss (storing the result). The default.
    #[default]
    CacheFirst,
    /// The database, storing the result; if the database fails, the cached result (if any).
    DbFirst,
    /// Only the cache: never touches the database; `None` on a miss.
    CacheOnly,
}

impl FromStr for QueryCacheStrategy {
    type Err = CacheError;

    /// Accepts `cache_first`, `db_first`, `cache_only` in any case (`CACHE_FIRST` too).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "cache_first" => Ok(Self::CacheFirst),
            "db_first" => Ok(Self::DbFirst),
            "cache_only" => Ok(Self::CacheOnly),
            other => Err(CacheError::InvalidArgument(format!(
                "unknown query cache strategy {other:?} (expected cache_first, db_first or cache_only)"
            ))),
        }
    }
}

/// Caches SQL query results in any [`CacheBackend`](ncm_cache_core::CacheBackend) — memory,
/// Redis, multi-level — and invalidates them when their tables change.
///
/// - [`cache_query`](Self::cache_query) with a [`QueryCacheStrategy`]; `%s`, `%(name)s`,
///   `:name` and the driver's own placeholders; a typed variant
///   ([`cache_query_as`](Self::cache_query_as)).
/// - Keys from the canonical statement (sqlparser), the parameters and the database identity;
///   the tables a query reads are part of its key.
/// - [`execute`](Self::execute) runs writes and invalidates the tables they touch;
///   [`invalidate_query`](Self::invalidate_query), [`invalidate_pattern`](Self::invalidate_pattern),
///   [`invalidate_table`](Self::invalidate_table) do it by hand; views, partitions and
///   cascading foreign keys are followed; on PostgreSQL a LISTEN/NOTIFY listener catches
///   everyone else's writes (`listen_postgres`, feature `postgres`).
/// - Invalidation replaces per-table generation tokens: one write per table, whatever the
///   keyspace; a result read before a write committed is never served after it, whichever
///   process stored it (see the crate README, "How invalidation works").
/// - Concurrent misses of one query run it once. Statements with side effects or results no
///   write could invalidate are never cached (README, "What is never cached").
/// - Failures of the cache never fail a query (it falls through to the database and is
///   counted); database failures are [`CacheError::Database`] and cache nothing.
///
/// Cloning is cheap; clones share everything.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_codec::Serializer;
/// use ncm_cache_core::Cache;
/// use ncm_cache_memory::MemoryBackend;
/// use ncm_cache_sql::{params, QueryCacheStrategy, SqlCache, SqliteExecutor};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let db = SqliteExecutor::memory().await?;
/// let cache = Cache::new(MemoryBackend::new(), Serializer::default());
/// let sql_cache = SqlCache::builder(cache, db)
///     .default_ttl(Duration::from_secs(1800))
///     .max_query_size(1024 * 1024)
///     .build()?;
/// sql_cache.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)", ()).await?;
/// sql_cache.execute("INSERT INTO users VALUES (%s, %s)", params![123, "Ada"]).await?;
///
/// let rows = sql_cache
///     .cache_query("SELECT * FROM users WHERE id = %s", params! { "id" => 123 },
///                  QueryCacheStrategy::CacheFirst, None)
///     .await?
///     .expect("CacheFirst always answers");
/// assert_eq!(rows.get(0, "name").and_then(|v| v.as_str()), Some("Ada"));
///
/// // Second time: from the cache. A write through the cache invalidates it.
/// sql_cache.query("SELECT * FROM users WHERE id = %s", params![123]).await?;
/// sql_cache.execute("UPDATE users SET name = %s WHERE id = %s", params!["Bob", 123]).await?;
/// let rows = sql_cache.query("SELECT * FROM users WHERE id = %s", params![123]).await?;
/// assert_eq!(rows.get(0, "name").and_then(|v| v.as_str()), Some("Bob"));
/// assert_eq!(sql_cache.get_performance_stats().hits, 1);
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
pub struct SqlCache<C = Serializer> {
    inner: Arc<Inner<C>>,
}

pub(crate) struct Inner<C> {
    pub(crate) cache: Cache<C>,
    pub(crate) executor: Arc<dyn SqlExecutor>,
    pub(crate) dialect: SqlDialect,
    pub(crate) keys: Keys,
    pub(crate) default_ttl: Duration,
    pub(crate) max_query_size: usize,
    pub(crate) logging: bool,
    pub(crate) statements: Option<quick_cache::sync::Cache<String, Arc<Analysis>>>,
    /// Results decoded in this process, by key (`decoded_cache_size`; `None`: off).
    pub(crate) decoded: Option<crate::flow::DecodedMemo>,
    pub(crate) flights: SingleFlight<String, Arc<Rows>>,
    pub(crate) policy: Policy,
    pub(crate) deps: Dependencies,
    pub(crate) pending: std::sync::Mutex<crate::invalidate::Pending>,
    /// Serializes the creation of missing generation tokens in this process.
    pub(crate) token_creation: tokio::sync::Mutex<()>,
    pub(crate) stats: SqlStats,
}

impl<C> Clone for SqlCache<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for SqlCache<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlCache")
            .field("executor", &self.inner.executor)
            .field("keys", &self.inner.keys)
            .field("default_ttl", &self.inner.default_ttl)
            .field("max_query_size", &self.inner.max_query_size)
            .finish_non_exhaustive()
    }
}

impl<C: Codec> SqlCache<C> {
    /// A builder over a typed cache (its backend stores the results, its codec encodes them)
    /// and an executor.
    pub fn builder(cache: Cache<C>, executor: impl SqlExecutor) -> SqlCacheBuilder<C> {
        SqlCacheBuilder::new(cache, Arc::new(executor))
    }

    /// A builder over an already shared executor.
    pub fn builder_shared(cache: Cache<C>, executor: Arc<dyn SqlExecutor>) -> SqlCacheBuilder<C> {
        SqlCacheBuilder::new(cache, executor)
    }

    pub(crate) fn from_inner(inner: Inner<C>) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    pub(crate) fn inner(&self) -> &Inner<C> {
        &self.inner
    }

    /// The executor.
    pub fn executor(&self) -> &Arc<dyn SqlExecutor> {
        &self.inner.executor
    }

    /// The typed cache the results live in.
    pub fn cache(&self) -> &Cache<C> {
        &self.inner.cache
    }

    /// Runs `sql` with `strategy`, caching the rows for `ttl` (`None`: the default TTL).
    ///
    /// Returns `None` only for [`QueryCacheStrategy::CacheOnly`] on a miss. A statement that
    /// writes (`INSERT … RETURNING`, …) is run, invalidates what it writes, and is never cached.
    pub async fn cache_query(
        &self,
        sql: &str,
        params: impl Into<SqlParams>,
        strategy: QueryCacheStrategy,
        ttl: Option<Duration>,
    ) -> Result<Option<Rows>> {
        let params = params.into();
        let ttl = self.ttl(ttl)?;
        let analysis = self.analyze(sql, &params);
        let values = analysis.template.values(&params)?;
        let rows = self.run(&analysis, values, strategy, ttl).await?;
        Ok(rows.map(Arc::unwrap_or_clone))
    }

    /// [`cache_query`](Self::cache_query), with each row deserialized into `T` (see
    /// [`Rows::deserialize`]).
    pub async fn cache_query_as<T: DeserializeOwned>(
        &self,
        sql: &str,
        params: impl Into<SqlParams>,
        strategy: QueryCacheStrategy,
        ttl: Option<Duration>,
    ) -> Result<Option<Vec<T>>> {
        let params = params.into();
        let ttl = self.ttl(ttl)?;
        let analysis = self.analyze(sql, &params);
        let values = analysis.template.values(&params)?;
        match self.run(&analysis, values, strategy, ttl).await? {
            Some(rows) => rows.deserialize().map(Some),
            None => Ok(None),
        }
    }

    /// [`cache_query`](Self::cache_query) returning the rows shared (`Arc`): a hit on a result
    /// this process decoded before costs no decode and no copy.
    pub async fn cache_query_shared(
        &self,
        sql: &str,
        params: impl Into<SqlParams>,
        strategy: QueryCacheStrategy,
        ttl: Option<Duration>,
    ) -> Result<Option<Arc<Rows>>> {
        let params = params.into();
        let ttl = self.ttl(ttl)?;
        let analysis = self.analyze(sql, &params);
        let values = analysis.template.values(&params)?;
        self.run(&analysis, values, strategy, ttl).await
    }

    /// Cache-first with the default TTL: the common case.
    pub async fn query(&self, sql: &str, params: impl Into<SqlParams>) -> Result<Rows> {
        let rows = self
            .cache_query(sql, params, QueryCacheStrategy::CacheFirst, None)
            .await?;
        Ok(rows.unwrap_or_default())
    }

    /// Cache-first with the default TTL, rows deserialized into `T`.
    pub async fn query_as<T: DeserializeOwned>(
        &self,
        sql: &str,
        params: impl Into<SqlParams>,
    ) -> Result<Vec<T>> {
        let rows = self
            .cache_query_as(sql, params, QueryCacheStrategy::CacheFirst, None)
            .await?;
        Ok(rows.unwrap_or_default())
    }

    /// Runs a write (`INSERT`, `UPDATE`, `DELETE`, `MERGE`, `TRUNCATE`, DDL, …) and invalidates
    /// the cached queries of every table it touches, and of the tables that depend on them
    /// (views, partitions, cascading foreign keys, declared dependencies); all of this
    /// database's entries when the tables cannot be known (e.g. `CALL`). Returns the number of
    /// rows affected.
    ///
    /// Database failures are [`CacheError::Database`]. Once the database has committed the
    /// write, its result is returned **even if the invalidation fails** (the cache is down):
    /// the failure is counted (`invalidation_failures`), logged at error level, and retried in
    /// the background; until a retry succeeds, cached results of those tables may be stale.
    /// A caller retrying on an error therefore never applies a write twice because of the
    /// cache.
    pub async fn execute(&self, sql: &str, params: impl Into<SqlParams>) -> Result<u64> {
        let params = params.into();
        let analysis = self.analyze(sql, &params);
        let values = analysis.template.values(&params)?;
        SqlStats::count(&self.inner.stats.writes, 1);
        let start = Instant::now();
        self.write_then_invalidate(&analysis, move |cache, analysis| async move {
            let result = cache
                .inner
                .executor
                .execute(&analysis.template.sql, &values)
                .await;
            cache.record_db(
                &analysis,
                start.elapsed(),
                &result.as_ref().map(|n| *n as usize),
            );
            result
        })
        .await
    }

    /// The tables whose cached results a write to `tables` invalidates: them, and every table
    /// that depends on them.
    pub(crate) async fn dependents(&self, tables: &[String]) -> Option<Vec<String>> {
        // The shared catalog token first: a schema change through another instance since
        // this one loaded its catalog makes it load again.
        let shared = self
            .inner
            .cache
            .backend()
            .get(&self.inner.keys.catalog())
            .await
            .ok();
        self.inner
            .deps
            .expand(self.inner.executor.as_ref(), tables, shared)
            .await
    }

    /// The key `sql` with `params` is cached under (for inspection and tests).
    pub fn key_for(&self, sql: &str, params: impl Into<SqlParams>) -> Result<String> {
        let params = params.into();
        let analysis = self.analyze(sql, &params);
        let values = analysis.template.values(&params)?;
        self.inner.keys.entry(&analysis, &values).ok_or_else(|| {
            CacheError::InvalidArgument("the statement names too many tables to be cached".into())
        })
    }

    /// Hits, misses, hit rate, database and cache time (mean, p50, p99), oversized results,
    /// the slowest statements (the original's `get_performance_stats()`).
    pub fn get_performance_stats(&self) -> SqlPerformanceStats {
        self.inner.stats.snapshot()
    }

    fn ttl(&self, ttl: Option<Duration>) -> Result<Duration> {
        match ttl {
            Some(t) if t.is_zero() => Err(CacheError::InvalidArgument(
                "a TTL must be greater than zero".into(),
            )),
            Some(t) => Ok(t),
            None => Ok(self.inner.default_ttl),
        }
    }

    pub(crate) fn analyze(&self, sql: &str, params: &SqlParams) -> Arc<Analysis> {
        let names = params.names();
        let dialect = self.inner.dialect;
        let Some(memo) = self
            .inner
            .statements
            .as_ref()
            .filter(|_| sql.len() <= MAX_MEMO_SQL)
        else {
            return Arc::new(Analysis::new(
                sql,
                dialect,
                names.as_deref(),
                &self.inner.policy,
            ));
        };
        let memo_key = match &names {
            None => sql.to_owned(),
            Some(n) => format!("{sql}\0{}", n.join("\0")),
        };
        if let Some(hit) = memo.get(memo_key.as_str()) {
            return hit;
        }
        let analysis = Arc::new(Analysis::new(
            sql,
            dialect,
            names.as_deref(),
            &self.inner.policy,
        ));
        memo.insert(memo_key, Arc::clone(&analysis));
        analysis
    }
}
