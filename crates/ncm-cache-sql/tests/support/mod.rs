//! Shared test support: database fixtures (own schema / database per test, dropped on drop),
//! the skip rule, a controllable executor wrapper and the suite every database runs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use async_trait::async_trait;
use ncm_cache_codec::Serializer;
use ncm_cache_core::{
    Bytes, Cache, CacheBackend, CacheError, CacheStats, HealthReport, KeyTtl, Result,
};
use ncm_cache_memory::MemoryBackend;
use ncm_cache_sql::{
    QueryCacheStrategy, Rows, SqlCache, SqlDialect, SqlExecutor, SqlValue, params,
};
use tokio::sync::Semaphore;

/// A server this test needs is unreachable: fail under `CI=true`, otherwise print a notice,
/// log it to `$NCM_CACHE_SKIP_LOG`, and let the caller return.
pub(crate) fn skip(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {why} (servers are required when CI=true)");
    }
    eprintln!("SKIPPED {test}: {why}");
    if let Some(path) = std::env::var_os("NCM_CACHE_SKIP_LOG")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "ncm-cache-sql {test}: {why}");
    }
}

pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{:08x}", std::process::id(), fastrand::u32(..))
}

/// A cache over a fresh memory backend.
pub(crate) fn memory_cache() -> Cache<Serializer> {
    Cache::new(MemoryBackend::new(), Serializer::default())
}

/// A memory backend that can be switched off (every call a connection error).
#[derive(Debug, Clone, Default)]
pub(crate) struct Flaky {
    pub(crate) inner: MemoryBackend,
    pub(crate) down: Arc<std::sync::atomic::AtomicBool>,
}

impl Flaky {
    fn check(&self) -> ncm_cache_core::Result<()> {
        if self.down.load(SeqCst) {
            return Err(CacheError::connection("switched off", None));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl CacheBackend for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    async fn get(&self, k: &str) -> ncm_cache_core::Result<Option<Bytes>> {
        self.check()?;
        self.inner.get(k).await
    }
    async fn set(&self, k: &str, v: Bytes, t: Option<Duration>) -> ncm_cache_core::Result<()> {
        self.check()?;
        self.inner.set(k, v, t).await
    }
    async fn delete(&self, k: &str) -> ncm_cache_core::Result<bool> {
        self.check()?;
        self.inner.delete(k).await
    }
    async fn exists(&self, k: &str) -> ncm_cache_core::Result<bool> {
        self.check()?;
        self.inner.exists(k).await
    }
    async fn get_ttl(&self, k: &str) -> ncm_cache_core::Result<KeyTtl> {
        self.check()?;
        self.inner.get_ttl(k).await
    }
    async fn extend_ttl(&self, k: &str, t: Duration) -> ncm_cache_core::Result<bool> {
        self.check()?;
        self.inner.extend_ttl(k, t).await
    }
    async fn clear_pattern(&self, p: &str) -> ncm_cache_core::Result<u64> {
        self.check()?;
        self.inner.clear_pattern(p).await
    }
    async fn health_report(&self) -> HealthReport {
        self.inner.health_report().await
    }
    fn get_stats(&self) -> CacheStats {
        self.inner.get_stats()
    }
}

/// Runs `f` on a separate thread with its own runtime (usable from `Drop`).
fn block_on_thread<F>(f: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(f);
        }
    })
    .join();
}

#[cfg(feature = "postgres")]
pub(crate) mod pg {
    use super::*;
    use ncm_cache_sql::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
    use std::str::FromStr;

    /// A PostgreSQL schema of our own; `pool` has it as its `search_path`.
    pub(crate) struct PgDb {
        pub(crate) url: String,
        pub(crate) schema: String,
        pub(crate) pool: PgPool,
    }

    fn candidate_urls() -> Vec<String> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => vec![url],
            _ => vec![
                "postgres://postgres@127.0.0.1:5432/test".into(),
                "postgres://root@127.0.0.1:5432/test".into(),
            ],
        }
    }

    /// Connects and creates a schema, or records a skip and returns `None`.
    pub(crate) async fn db(test: &str) -> Option<PgDb> {
        let mut last = String::new();
        for url in candidate_urls() {
            let admin = match PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(3))
                .connect(&url)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    last = format!("{url}: {e}");
                    continue;
                }
            };
            let schema = unique("ncm_test");
            ncm_cache_sql::sqlx::query(ncm_cache_sql::sqlx::AssertSqlSafe(format!(
                "CREATE SCHEMA {schema}"
            )))
            .execute(&admin)
            .await
            .expect("create schema");
            admin.close().await;
            let opts = PgConnectOptions::from_str(&url)
                .unwrap()
                .options([("search_path", schema.as_str())]);
            let pool = PgPoolOptions::new()
                .max_connections(5)
                .connect_with(opts)
                .await
                .expect("connect with search_path");
            return Some(PgDb { url, schema, pool });
        }
        skip(test, &format!("PostgreSQL unreachable ({last})"));
        None
    }

    impl Drop for PgDb {
        fn drop(&mut self) {
            let (url, schema) = (self.url.clone(), self.schema.clone());
            block_on_thread(async move {
                if let Ok(pool) = PgPoolOptions::new().max_connections(1).connect(&url).await {
                    let _ = ncm_cache_sql::sqlx::query(ncm_cache_sql::sqlx::AssertSqlSafe(
                        format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
                    ))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        }
    }
}

#[cfg(feature = "mysql")]
pub(crate) mod my {
    use super::*;
    use ncm_cache_sql::sqlx::mysql::{MySqlPool, MySqlPoolOptions};

    /// A MySQL/MariaDB database of our own; `pool` is connected to it.
    pub(crate) struct MyDb {
        pub(crate) server_url: String,
        pub(crate) database: String,
        pub(crate) pool: MySqlPool,
    }

    /// Connects and creates a database, or records a skip and returns `None`.
    pub(crate) async fn db(test: &str) -> Option<MyDb> {
        let url = std::env::var("MYSQL_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "mysql://root@127.0.0.1:3306/test".into());
        let admin = match MySqlPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect(&url)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                skip(test, &format!("MySQL/MariaDB unreachable ({url}: {e})"));
                return None;
            }
        };
        let database = unique("ncm_test");
        ncm_cache_sql::sqlx::query(ncm_cache_sql::sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {database}"
        )))
        .execute(&admin)
        .await
        .expect("create database");
        admin.close().await;
        let base = url
            .rsplit_once('/')
            .map_or(url.as_str(), |(b, _)| b)
            .to_owned();
        let pool = MySqlPoolOptions::new()
            .max_connections(5)
            .connect(&format!("{base}/{database}"))
            .await
            .expect("connect to the test database");
        Some(MyDb {
            server_url: url,
            database,
            pool,
        })
    }

    impl Drop for MyDb {
        fn drop(&mut self) {
            let (url, database) = (self.server_url.clone(), self.database.clone());
            block_on_thread(async move {
                if let Ok(pool) = MySqlPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                {
                    let _ = ncm_cache_sql::sqlx::query(ncm_cache_sql::sqlx::AssertSqlSafe(
                        format!("DROP DATABASE IF EXISTS {database}"),
                    ))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        }
    }
}

/// Wraps an executor: counts calls, fails on demand, can hold queries at a gate.
#[derive(Debug)]
pub(crate) struct Probe {
    pub(crate) inner: Arc<dyn SqlExecutor>,
    pub(crate) fetches: AtomicUsize,
    pub(crate) executes: AtomicUsize,
    pub(crate) fail: AtomicBool,
    /// When set, every fetch waits for a permit.
    pub(crate) gate: Option<Arc<Semaphore>>,
    /// When set, every execute waits for a permit after the database applied it (a reply
    /// that comes late).
    pub(crate) exec_gate: Option<Arc<Semaphore>>,
    /// When set, reading the dependency catalog fails.
    pub(crate) deps_fail: AtomicBool,
    /// When set, every execute panics after the database applied it (a bug in a driver).
    pub(crate) panic_after_execute: AtomicBool,
}

impl Probe {
    pub(crate) fn new(inner: impl SqlExecutor) -> Self {
        Self {
            inner: Arc::new(inner),
            fetches: AtomicUsize::new(0),
            executes: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
            gate: None,
            exec_gate: None,
            deps_fail: AtomicBool::new(false),
            panic_after_execute: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl SqlExecutor for Probe {
    fn dialect(&self) -> SqlDialect {
        self.inner.dialect()
    }
    fn identity(&self) -> &str {
        self.inner.identity()
    }
    fn database_identity(&self) -> &str {
        self.inner.database_identity()
    }
    async fn dependencies(&self) -> Result<Vec<(String, String)>> {
        if self.deps_fail.load(SeqCst) {
            return Err(CacheError::Database {
                message: "catalog unreadable (probe)".into(),
                source: None,
            });
        }
        self.inner.dependencies().await
    }
    async fn fetch_all(&self, sql: &str, params: &[SqlValue]) -> Result<Rows> {
        self.fetches.fetch_add(1, SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        if self.fail.load(SeqCst) {
            return Err(CacheError::Database {
                message: "database is down (probe)".into(),
                source: None,
            });
        }
        self.inner.fetch_all(sql, params).await
    }
    async fn execute(&self, sql: &str, params: &[SqlValue]) -> Result<u64> {
        self.executes.fetch_add(1, SeqCst);
        if self.fail.load(SeqCst) {
            return Err(CacheError::Database {
                message: "database is down (probe)".into(),
                source: None,
            });
        }
        let applied = self.inner.execute(sql, params).await;
        if let Some(gate) = &self.exec_gate {
            let _permit = gate.acquire().await;
        }
        assert!(
            !self.panic_after_execute.load(SeqCst),
            "probe: a panic after the write was applied"
        );
        applied
    }
}

fn names(rows: &Rows) -> Vec<String> {
    rows.iter()
        .map(|r| r[1].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The behaviour every database must show, with portable SQL (`items`, `tags` tables).
/// `cache` must be built over `probe` (shared) so the suite can count database calls.
pub(crate) async fn common_suite(cache: &SqlCache, probe: &Probe) {
    let ddl = [
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name VARCHAR(100), category VARCHAR(50))",
        "CREATE TABLE tags (item_id INTEGER, tag VARCHAR(50))",
    ];
    for d in ddl {
        cache.execute(d, ()).await.unwrap();
    }
    for (id, name, cat) in [
        (1, "laptop", "electronics"),
        (2, "phone", "electronics"),
        (3, "desk", "furniture"),
    ] {
        let n = cache
            .execute(
                "INSERT INTO items (id, name, category) VALUES (%s, %s, %s)",
                params![id, name, cat],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    cache
        .execute("INSERT INTO tags VALUES (1, 'new'), (3, 'sale')", ())
        .await
        .unwrap();
    let by_cat = "SELECT id, name FROM items WHERE category = %s ORDER BY id";

    // CacheFirst: miss → database, then hit (whitespace and keyword case do not matter).
    let before = probe.fetches.load(SeqCst);
    let rows = cache
        .cache_query(
            by_cat,
            params! {"category" => "electronics"},
            QueryCacheStrategy::CacheFirst,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&rows), ["laptop", "phone"]);
    let again = cache
        .cache_query(
            "select id,   name\n from items where category = %s order by id",
            params!["electronics"],
            QueryCacheStrategy::CacheFirst,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, rows);
    assert_eq!(
        probe.fetches.load(SeqCst),
        before + 1,
        "second call must be a hit"
    );

    // CacheOnly: never touches the database.
    let before = probe.fetches.load(SeqCst);
    let cached = cache
        .cache_query(
            by_cat,
            params!["electronics"],
            QueryCacheStrategy::CacheOnly,
            None,
        )
        .await
        .unwrap();
    assert_eq!(cached, Some(rows.clone()));
    let missing = cache
        .cache_query(by_cat, params!["toys"], QueryCacheStrategy::CacheOnly, None)
        .await
        .unwrap();
    assert_eq!(missing, None);
    assert_eq!(probe.fetches.load(SeqCst), before);

    // Write-aware execute: an UPDATE invalidates the items queries, not the tags ones.
    let tag_q = "SELECT item_id, tag FROM tags ORDER BY item_id";
    cache.query(tag_q, ()).await.unwrap();
    let n = cache
        .execute(
            "UPDATE items SET name = %s WHERE id = %s",
            params!["notebook", 1],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let cached = cache
        .cache_query(
            by_cat,
            params!["electronics"],
            QueryCacheStrategy::CacheOnly,
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        cached, None,
        "UPDATE items must invalidate queries on items"
    );
    assert!(
        cache
            .cache_query(tag_q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap()
            .is_some(),
        "tags queries survive a write to items"
    );
    let fresh = cache.query(by_cat, params!["electronics"]).await.unwrap();
    assert_eq!(names(&fresh), ["notebook", "phone"]);

    // DbFirst: fresh from the database; when it fails, the cached result.
    cache
        .execute("UPDATE items SET name = 'tablet' WHERE id = 2", ())
        .await
        .unwrap();
    let db_first = cache
        .cache_query(
            by_cat,
            params!["electronics"],
            QueryCacheStrategy::DbFirst,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&db_first), ["notebook", "tablet"]);
    probe.fail.store(true, SeqCst);
    let stale = cache
        .cache_query(
            by_cat,
            params!["electronics"],
            QueryCacheStrategy::DbFirst,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stale, db_first);
    let err = cache
        .cache_query(
            by_cat,
            params!["never-cached"],
            QueryCacheStrategy::DbFirst,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Database { .. }), "{err}");
    probe.fail.store(false, SeqCst);
    assert!(cache.get_performance_stats().stale_served >= 1);

    // A join is invalidated by a write to either table.
    let join = "SELECT i.name, t.tag FROM items i JOIN tags t ON t.item_id = i.id ORDER BY i.id";
    cache.query(join, ()).await.unwrap();
    cache
        .execute("DELETE FROM tags WHERE tag = 'sale'", ())
        .await
        .unwrap();
    assert_eq!(
        cache
            .cache_query(join, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap(),
        None
    );
    assert_eq!(cache.query(join, ()).await.unwrap().len(), 1);

    // invalidate_query removes exactly that entry.
    cache.query(by_cat, params!["furniture"]).await.unwrap();
    cache.query(by_cat, params!["electronics"]).await.unwrap();
    assert!(
        cache
            .invalidate_query(by_cat, params!["furniture"])
            .await
            .unwrap()
    );
    assert!(
        !cache
            .invalidate_query(by_cat, params!["furniture"])
            .await
            .unwrap()
    );
    assert_eq!(
        cache
            .cache_query(
                by_cat,
                params!["furniture"],
                QueryCacheStrategy::CacheOnly,
                None
            )
            .await
            .unwrap(),
        None
    );
    assert!(
        cache
            .cache_query(
                by_cat,
                params!["electronics"],
                QueryCacheStrategy::CacheOnly,
                None
            )
            .await
            .unwrap()
            .is_some()
    );

    // invalidate_table and invalidate_pattern.
    cache.query(tag_q, ()).await.unwrap();
    assert!(cache.invalidate_table("ITEMS").await.unwrap() >= 1);
    assert_eq!(
        cache
            .cache_query(
                by_cat,
                params!["electronics"],
                QueryCacheStrategy::CacheOnly,
                None
            )
            .await
            .unwrap(),
        None
    );
    assert!(
        cache
            .cache_query(tag_q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap()
            .is_some()
    );
    // Entries superseded by earlier invalidations stay in the store until their TTL, so the
    // pattern may remove more than the live one.
    assert!(cache.invalidate_pattern("*tags*").await.unwrap() >= 1);
    assert_eq!(
        cache
            .cache_query(tag_q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap(),
        None
    );

    // Bad SQL: the database's error, typed, and nothing cached.
    let entries_before = cache.get_performance_stats().db_errors;
    let bad = cache
        .query("SELECT nope FROM items WHERE", ())
        .await
        .unwrap_err();
    assert!(matches!(bad, CacheError::Database { .. }), "{bad}");
    let missing_table = cache
        .query("SELECT * FROM no_such_table", ())
        .await
        .unwrap_err();
    assert!(
        matches!(missing_table, CacheError::Database { ref message, .. } if message.contains("no_such_table")),
        "{missing_table}"
    );
    assert_eq!(
        cache
            .cache_query(
                "SELECT * FROM no_such_table",
                (),
                QueryCacheStrategy::CacheOnly,
                None
            )
            .await
            .unwrap(),
        None
    );
    assert_eq!(cache.get_performance_stats().db_errors, entries_before + 2);
    let bad_write = cache
        .execute("INSERT INTO items (id) VALUES ('not a number', 2)", ())
        .await;
    assert!(matches!(bad_write, Err(CacheError::Database { .. })));

    // TRUNCATE / DELETE-all invalidate too; DROP as well.
    cache.query(by_cat, params!["electronics"]).await.unwrap();
    cache.execute("DELETE FROM items", ()).await.unwrap();
    assert!(
        cache
            .query(by_cat, params!["electronics"])
            .await
            .unwrap()
            .is_empty()
    );
    cache.query(tag_q, ()).await.unwrap();
    cache.execute("DROP TABLE tags", ()).await.unwrap();
    assert_eq!(
        cache
            .cache_query(tag_q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap(),
        None
    );

    let stats = cache.get_performance_stats();
    assert!(stats.hits >= 4 && stats.misses >= 4, "{stats:?}");
    assert!(stats.hit_rate > 0.0 && stats.hit_rate < 1.0);
    assert!(stats.db_time.count > 0 && stats.cache_time.count > 0);
    assert!(stats.db_time.p50 <= stats.db_time.p99);
    assert!(!stats.slowest_queries.is_empty());
    assert!(stats.invalidations > 0 && stats.writes > 0);
}

/// Waits until `f` is true or `within` passes; returns how long it took.
pub(crate) async fn eventually<F, Fut>(within: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}
