//! SqlCache on SQLite (always runs): the common suite, every parameter and value type, typed
//! queries, oversized results, single-flight, the invalidation guard, cache failures, TTLs.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ncm_cache_codec::Serializer;
use ncm_cache_core::{
    Bytes, Cache, CacheBackend, CacheError, CacheStats, HealthReport, KeyTtl, ManualClock,
};
use ncm_cache_memory::MemoryBackend;
use ncm_cache_sql::{QueryCacheStrategy, SqlCache, SqlParams, SqlValue, SqliteExecutor, params};
use serde::Deserialize;
use support::{Flaky, Probe, common_suite, eventually, memory_cache};
use tokio::sync::Semaphore;

async fn sqlite_cache() -> (SqlCache, Arc<Probe>) {
    let probe = Arc::new(Probe::new(SqliteExecutor::memory().await.unwrap()));
    // The mechanics tests below cache table-less statements (`SELECT 1 AS one`): opted in.
    let cache = SqlCache::builder_shared(memory_cache(), probe.clone())
        .cache_tableless(true)
        .build()
        .unwrap();
    (cache, probe)
}

#[tokio::test]
async fn common_suite_on_sqlite() {
    let (cache, probe) = sqlite_cache().await;
    common_suite(&cache, &probe).await;
}

#[tokio::test]
async fn common_suite_on_a_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let db = SqliteExecutor::connect(&url).await.unwrap();
    assert!(ncm_cache_sql::SqlExecutor::identity(&db).ends_with("app.db"));
    let probe = Arc::new(Probe::new(db));
    let cache = SqlCache::builder_shared(memory_cache(), probe.clone())
        .build()
        .unwrap();
    common_suite(&cache, &probe).await;
}

fn ts() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 250_000_000).unwrap()
}

#[tokio::test]
async fn every_parameter_type_binds_and_reads_back() {
    let (cache, _) = sqlite_cache().await;
    cache
        .execute(
            "CREATE TABLE t (id INTEGER, n TEXT, b BOOLEAN, i INTEGER, f REAL, s TEXT, x BLOB, \
             ts DATETIME, j TEXT)",
            (),
        )
        .await
        .unwrap();
    let json = serde_json::json!({"tags": ["a", "b"], "n": 1});
    let row = params![
        1,
        SqlValue::Null,
        true,
        i64::MIN,
        0.1,
        "Zoë's \"quoted\" %s text",
        vec![0u8, 159, 255],
        ts(),
        json.clone()
    ];
    cache
        .execute(
            "INSERT INTO t VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            row,
        )
        .await
        .unwrap();
    // Each type as a WHERE parameter, in the three placeholder styles.
    let by_all = "SELECT * FROM t WHERE b = %(b)s AND i = %(i)s AND f = %(f)s AND s = %(s)s \
                  AND x = %(x)s AND ts = %(ts)s AND n IS NOT DISTINCT FROM %(n)s";
    let named = params! {
        "b" => true, "i" => i64::MIN, "f" => 0.1, "s" => "Zoë's \"quoted\" %s text",
        "x" => vec![0u8, 159, 255], "ts" => ts(), "n" => SqlValue::Null
    };
    let rows = cache.query(by_all, named.clone()).await.unwrap();
    assert_eq!(rows.len(), 1, "every bound type must match the stored row");
    let colon =
        "SELECT * FROM t WHERE b = :b AND i = :i AND f = :f AND s = :s AND x = :x AND ts = :ts";
    assert_eq!(cache.query(colon, named).await.unwrap(), rows);
    let native = "SELECT * FROM t WHERE b = ? AND i = ?";
    assert_eq!(
        cache.query(native, params![true, i64::MIN]).await.unwrap(),
        rows
    );

    let get = |c: &str| rows.get(0, c).cloned().unwrap();
    assert_eq!(get("n"), SqlValue::Null);
    assert_eq!(get("b"), SqlValue::Bool(true));
    assert_eq!(get("i"), SqlValue::Int(i64::MIN));
    assert_eq!(get("f"), SqlValue::Float(0.1));
    assert_eq!(get("s"), SqlValue::Text("Zoë's \"quoted\" %s text".into()));
    assert_eq!(get("x"), SqlValue::Bytes(vec![0, 159, 255]));
    assert_eq!(get("ts"), SqlValue::Timestamp(ts()));
    // SQLite has no JSON type: a JSON parameter is stored and read as text.
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(get("j").as_str().unwrap()).unwrap(),
        json
    );
    // And the cached copy (through the codec) is identical.
    let cached = cache
        .cache_query(
            by_all,
            params! {
                "b" => true, "i" => i64::MIN, "f" => 0.1, "s" => "Zoë's \"quoted\" %s text",
                "x" => vec![0u8, 159, 255], "ts" => ts(), "n" => SqlValue::Null
            },
            QueryCacheStrategy::CacheOnly,
            None,
        )
        .await
        .unwrap();
    assert_eq!(cached, Some(rows));
}

#[derive(Debug, Deserialize, PartialEq)]
struct Product {
    id: i64,
    name: String,
    price: f64,
    in_stock: bool,
    added: DateTime<Utc>,
    note: Option<String>,
}

#[tokio::test]
async fn typed_queries_deserialize_rows() {
    let (cache, probe) = sqlite_cache().await;
    cache
        .execute(
            "CREATE TABLE products (id INTEGER, name TEXT, price REAL, in_stock BOOLEAN, added DATETIME, note TEXT)",
            (),
        )
        .await
        .unwrap();
    cache
        .execute(
            "INSERT INTO products VALUES (%s, %s, %s, %s, %s, %s)",
            params![7, "lamp", 19.5, false, ts(), None::<String>],
        )
        .await
        .unwrap();
    let expected = vec![Product {
        id: 7,
        name: "lamp".into(),
        price: 19.5,
        in_stock: false,
        added: ts(),
        note: None,
    }];
    let sql = "SELECT * FROM products WHERE id = %s";
    let got: Vec<Product> = cache.query_as(sql, params![7]).await.unwrap();
    assert_eq!(got, expected);
    let from_cache: Option<Vec<Product>> = cache
        .cache_query_as(sql, params![7], QueryCacheStrategy::CacheOnly, None)
        .await
        .unwrap();
    assert_eq!(from_cache, Some(expected));
    assert_eq!(probe.fetches.load(SeqCst), 1);
    let count: Vec<i64> = cache
        .query_as("SELECT count(*) FROM products", ())
        .await
        .unwrap();
    assert_eq!(count, vec![1]);
    // A type that does not fit is a typed error, not a panic.
    let err = cache
        .query_as::<Vec<String>>(sql, params![7])
        .await
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
}

#[tokio::test]
async fn oversized_results_are_served_but_not_cached() {
    let probe = Arc::new(Probe::new(SqliteExecutor::memory().await.unwrap()));
    let cache = SqlCache::builder_shared(memory_cache(), probe.clone())
        .max_query_size(200)
        .cache_tableless(true)
        .build()
        .unwrap();
    let big = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) SELECT i FROM n";
    assert_eq!(cache.query(big, ()).await.unwrap().len(), 100);
    assert_eq!(cache.query(big, ()).await.unwrap().len(), 100);
    assert_eq!(probe.fetches.load(SeqCst), 2);
    assert_eq!(cache.get_performance_stats().oversized, 2);
    // Small ones are cached.
    cache.query("SELECT 1 AS one", ()).await.unwrap();
    cache.query("SELECT 1 AS one", ()).await.unwrap();
    assert_eq!(probe.fetches.load(SeqCst), 3);
}

/// A write whose caller is dropped after the database applied it (a request timeout while the
/// reply is late) still invalidates its table: nothing read before it is served afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cancelled_after_it_committed_still_invalidates() {
    let gate = Arc::new(Semaphore::new(0));
    let mut probe = Probe::new(SqliteExecutor::memory().await.unwrap());
    probe.exec_gate = Some(gate.clone());
    let probe = Arc::new(probe);
    let cache = SqlCache::builder_shared(memory_cache(), probe.clone())
        .build()
        .unwrap();
    gate.add_permits(100);
    cache
        .execute("CREATE TABLE t (v INTEGER)", ())
        .await
        .unwrap();
    cache.execute("INSERT INTO t VALUES (1)", ()).await.unwrap();
    gate.forget_permits(gate.available_permits());
    let read = |cache: SqlCache| async move {
        let rows = cache.query("SELECT v FROM t", ()).await.unwrap();
        rows.get(0, "v").cloned()
    };
    assert_eq!(read(cache.clone()).await, Some(SqlValue::Int(1)));
    // Applied, but its reply never comes before the caller gives up.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        cache.execute("UPDATE t SET v = 2", ()),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the write was expected to wait at the gate"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        read(cache.clone()).await,
        Some(SqlValue::Int(2)),
        "a result read before a committed write was served after it"
    );
}

/// A write whose execution panics after the database applied it still invalidates its table
/// (the background retrier takes it): nothing read before it is served afterwards (found by
/// review: once the write ran in a task of its own, a panic there skipped its invalidation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_panics_after_it_applied_still_invalidates() {
    let probe = Arc::new(Probe::new(SqliteExecutor::memory().await.unwrap()));
    let cache = SqlCache::builder_shared(memory_cache(), probe.clone())
        .build()
        .unwrap();
    cache
        .execute("CREATE TABLE t (v INTEGER)", ())
        .await
        .unwrap();
    cache.execute("INSERT INTO t VALUES (1)", ()).await.unwrap();
    let read = |cache: SqlCache| async move {
        let rows = cache.query("SELECT v FROM t", ()).await.unwrap();
        rows.get(0, "v").cloned()
    };
    assert_eq!(read(cache.clone()).await, Some(SqlValue::Int(1)));
    probe
        .panic_after_execute
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let panicked = tokio::spawn({
        let cache = cache.clone();
        async move { cache.execute("UPDATE t SET v = 2", ()).await }
    })
    .await;
    assert!(
        panicked.is_err_and(|e| e.is_panic()),
        "the panic reaches the caller"
    );
    probe
        .panic_after_execute
        .store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        read(cache.clone()).await,
        Some(SqlValue::Int(2)),
        "a result read before the applied write was served after it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_run_the_query_once() {
    let gate = Arc::new(Semaphore::new(0));
    let mut probe = Probe::new(SqliteExecutor::memory().await.unwrap());
    probe.gate = Some(gate.clone());
    let probe = Arc::new(probe);
    let cache = SqlCache::builder_shared(memory_cache(), probe.clone())
        .cache_tableless(true)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.query("SELECT 42 AS answer", ()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(100);
    for t in tasks {
        assert_eq!(
            t.await.unwrap().unwrap().get(0, "answer"),
            Some(&SqlValue::Int(42))
        );
    }
    assert_eq!(probe.fetches.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_computed_across_an_invalidation_is_not_stored() {
    let gate = Arc::new(Semaphore::new(0));
    let mut probe = Probe::new(SqliteExecutor::memory().await.unwrap());
    probe.gate = Some(gate.clone());
    let probe = Arc::new(probe);
    let cache = SqlCache::builder_shared(memory_cache(), probe.clone())
        .build()
        .unwrap();
    cache
        .execute("CREATE TABLE acct (id INTEGER, bal INTEGER)", ())
        .await
        .unwrap();
    cache
        .execute("INSERT INTO acct VALUES (1, 10)", ())
        .await
        .unwrap();
    let q = "SELECT bal FROM acct WHERE id = 1";
    let reader = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.query(q, ()).await })
    };
    // The read is in flight (held at the gate) when a write invalidates its table.
    tokio::time::sleep(Duration::from_millis(50)).await;
    cache.invalidate_table("acct").await.unwrap();
    gate.add_permits(100);
    reader.await.unwrap().unwrap();
    assert_eq!(
        cache
            .cache_query(q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap(),
        None,
        "a result older than the invalidation must not be cached"
    );
    // Unrelated tables are not affected.
    cache.query(q, ()).await.unwrap();
    assert!(
        cache
            .cache_query(q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn corrupt_entries_are_removed_and_reloaded() {
    let (cache, probe) = sqlite_cache().await;
    let sql = "SELECT 'x' AS v";
    cache.query(sql, ()).await.unwrap();
    let key = cache.key_for(sql, ()).unwrap();
    cache
        .cache()
        .backend()
        .set(
            &key,
            Bytes::from_static(b"\xc1\x4e\x01\x01\x00{not json"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        cache.query(sql, ()).await.unwrap().get(0, "v"),
        Some(&SqlValue::from("x"))
    );
    assert_eq!(probe.fetches.load(SeqCst), 2);
    assert!(
        cache
            .cache_query(sql, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap()
            .is_some()
    );
}

/// A backend that fails every call.
#[derive(Debug)]
struct Down;

#[async_trait::async_trait]
impl CacheBackend for Down {
    fn name(&self) -> &str {
        "down"
    }
    async fn get(&self, _: &str) -> ncm_cache_core::Result<Option<Bytes>> {
        Err(CacheError::connection("down", None))
    }
    async fn set(&self, _: &str, _: Bytes, _: Option<Duration>) -> ncm_cache_core::Result<()> {
        Err(CacheError::connection("down", None))
    }
    async fn delete(&self, _: &str) -> ncm_cache_core::Result<bool> {
        Err(CacheError::connection("down", None))
    }
    async fn exists(&self, _: &str) -> ncm_cache_core::Result<bool> {
        Err(CacheError::connection("down", None))
    }
    async fn get_ttl(&self, _: &str) -> ncm_cache_core::Result<KeyTtl> {
        Err(CacheError::connection("down", None))
    }
    async fn extend_ttl(&self, _: &str, _: Duration) -> ncm_cache_core::Result<bool> {
        Err(CacheError::connection("down", None))
    }
    async fn clear_pattern(&self, _: &str) -> ncm_cache_core::Result<u64> {
        Err(CacheError::connection("down", None))
    }
    async fn health_report(&self) -> HealthReport {
        HealthReport::new(false, Duration::ZERO, "down", "down")
    }
    fn get_stats(&self) -> CacheStats {
        CacheStats::default()
    }
}

#[tokio::test]
async fn a_dead_cache_never_fails_reads() {
    let db = SqliteExecutor::memory().await.unwrap();
    let cache = SqlCache::builder(Cache::new(Down, Serializer::default()), db)
        .build()
        .unwrap();
    // A write succeeds in the database and returns its result although the invalidation
    // after it fails: counted, never an error (a retrying caller would write twice).
    cache
        .execute("CREATE TABLE z (a INTEGER)", ())
        .await
        .unwrap();
    assert_eq!(
        cache.execute("INSERT INTO z VALUES (1)", ()).await.unwrap(),
        1
    );
    assert!(cache.get_performance_stats().invalidation_failures >= 2);
    let q = "SELECT a FROM z";
    let rows = cache.query(q, ()).await.unwrap();
    assert_eq!(rows.len(), 1);
    let db_first = cache
        .cache_query(q, (), QueryCacheStrategy::DbFirst, None)
        .await
        .unwrap();
    assert!(db_first.is_some());
    let only = cache
        .cache_query(q, (), QueryCacheStrategy::CacheOnly, None)
        .await
        .unwrap_err();
    assert!(only.is_connection());
    assert!(cache.get_performance_stats().cache_errors >= 3);
}

#[tokio::test]
async fn statements_that_write_are_run_and_never_cached() {
    let (cache, probe) = sqlite_cache().await;
    cache
        .execute("CREATE TABLE q (id INTEGER PRIMARY KEY, v TEXT)", ())
        .await
        .unwrap();
    cache
        .query("SELECT count(*) AS n FROM q", ())
        .await
        .unwrap();
    let ins = "INSERT INTO q (v) VALUES (%s) RETURNING id";
    let a = cache.query(ins, params!["a"]).await.unwrap();
    let b = cache.query(ins, params!["a"]).await.unwrap();
    assert_ne!(a, b, "each call inserts");
    assert_eq!(
        cache
            .cache_query(ins, params!["a"], QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap(),
        None
    );
    let n = cache
        .query("SELECT count(*) AS n FROM q", ())
        .await
        .unwrap();
    assert_eq!(
        n.get(0, "n"),
        Some(&SqlValue::Int(2)),
        "the count was invalidated"
    );
    assert_eq!(probe.fetches.load(SeqCst), 4);
}

#[tokio::test]
async fn entries_expire_with_their_ttl() {
    let clock = ManualClock::new();
    let backend = MemoryBackend::builder()
        .clock(clock.clone())
        .build()
        .unwrap();
    let probe = Arc::new(Probe::new(SqliteExecutor::memory().await.unwrap()));
    let cache = SqlCache::builder_shared(Cache::new(backend, Serializer::default()), probe.clone())
        .default_ttl(Duration::from_secs(60))
        .cache_tableless(true)
        .build()
        .unwrap();
    let q = "SELECT 1 AS one";
    cache.query(q, ()).await.unwrap();
    cache
        .cache_query(
            "SELECT 2 AS two",
            (),
            QueryCacheStrategy::CacheFirst,
            Some(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    clock.advance(Duration::from_secs(6));
    assert!(
        cache
            .cache_query(q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        cache
            .cache_query("SELECT 2 AS two", (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap()
            .is_none()
    );
    clock.advance(Duration::from_secs(60));
    assert!(
        cache
            .cache_query(q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap()
            .is_none()
    );
    let zero = cache
        .cache_query(q, (), QueryCacheStrategy::CacheFirst, Some(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(zero.is_invalid_input());
}

#[tokio::test]
async fn databases_sharing_a_cache_stay_apart() {
    let shared = memory_cache();
    let a = SqlCache::builder(shared.clone(), SqliteExecutor::memory().await.unwrap())
        .build()
        .unwrap();
    let b = SqlCache::builder(shared, SqliteExecutor::memory().await.unwrap())
        .build()
        .unwrap();
    for (c, v) in [(&a, "a"), (&b, "b")] {
        c.execute("CREATE TABLE t (v TEXT)", ()).await.unwrap();
        c.execute("INSERT INTO t VALUES (%s)", params![v])
            .await
            .unwrap();
    }
    let q = "SELECT v FROM t";
    assert_eq!(
        a.query(q, ()).await.unwrap().get(0, "v"),
        Some(&SqlValue::from("a"))
    );
    assert_eq!(
        b.query(q, ()).await.unwrap().get(0, "v"),
        Some(&SqlValue::from("b"))
    );
    assert_ne!(a.key_for(q, ()).unwrap(), b.key_for(q, ()).unwrap());
    assert_eq!(a.invalidate_table("t").await.unwrap(), 1);
    assert!(
        b.cache_query(q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(b.invalidate_all().await.unwrap(), 1);
}

#[tokio::test]
async fn parameter_mistakes_are_typed_errors_before_any_io() {
    let (cache, probe) = sqlite_cache().await;
    let err = cache.query("SELECT %s, %s", params![1]).await.unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    let err = cache
        .query("SELECT %(a)s", SqlParams::named([("b", 1)]))
        .await
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert_eq!(probe.fetches.load(SeqCst), 0);
    // Placeholders inside literals are text, not parameters.
    let rows = cache
        .query("SELECT '%s' AS a, %s AS b", params![5])
        .await
        .unwrap();
    assert_eq!(rows.rows[0], vec![SqlValue::from("%s"), SqlValue::Int(5)]);
}

#[tokio::test]
async fn unparseable_statements_run_uncached_and_invalidate_when_they_may_write() {
    let (cache, probe) = sqlite_cache().await;
    cache
        .execute("CREATE TABLE g (name TEXT)", ())
        .await
        .unwrap();
    cache
        .execute("INSERT INTO g VALUES ('lamp'), ('desk')", ())
        .await
        .unwrap();
    // sqlparser does not know SQLite's INDEXED BY; SQLite does.
    cache
        .execute("CREATE INDEX g_name ON g (name)", ())
        .await
        .unwrap();
    let q = "SELECT name FROM g INDEXED BY g_name WHERE name > 'a' ORDER BY name";
    assert!(ncm_cache_sql::referenced_tables(q, ncm_cache_sql::SqlDialect::Sqlite).is_err());
    assert_eq!(cache.query(q, ()).await.unwrap().len(), 2);
    assert_eq!(cache.query(q, ()).await.unwrap().len(), 2);
    assert_eq!(
        probe.fetches.load(SeqCst),
        2,
        "run every time, never cached"
    );
    assert_eq!(
        cache
            .cache_query(q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap(),
        None
    );
    let stats = cache.get_performance_stats();
    assert!(
        stats.uncached_reasons.contains(&("unparsed".to_owned(), 2)),
        "{:?}",
        stats.uncached_reasons
    );
    // An unparseable statement with a write keyword is a write of unknown tables: it runs,
    // returns its rows, and invalidates every cached result of the database.
    let cached = "SELECT count(*) AS n FROM g";
    cache.query(cached, ()).await.unwrap();
    let delete = "DELETE FROM g INDEXED BY g_name WHERE name = 'desk' RETURNING name";
    let deleted = cache.query(delete, ()).await.unwrap();
    assert_eq!(deleted.get(0, "name"), Some(&SqlValue::from("desk")));
    assert_eq!(
        cache
            .cache_query(cached, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap(),
        None,
        "invalidated by the unparseable write"
    );
    assert_eq!(
        cache.query(cached, ()).await.unwrap().get(0, "n"),
        Some(&SqlValue::Int(1))
    );
}

#[tokio::test]
async fn query_logging_and_monitoring_options() {
    let probe = Arc::new(Probe::new(SqliteExecutor::memory().await.unwrap()));
    let cache = SqlCache::builder_shared(memory_cache(), probe)
        .enable_query_logging(true)
        .enable_performance_monitoring(false)
        .namespace("reports")
        .name("reports")
        .statement_cache_size(0)
        .cache_tableless(true)
        .build()
        .unwrap();
    cache.query("SELECT 1 AS one", ()).await.unwrap();
    cache.query("SELECT 1 AS one", ()).await.unwrap();
    let stats = cache.get_performance_stats();
    assert_eq!((stats.hits, stats.misses, stats.db_queries), (1, 1, 1));
    assert!(stats.slowest_queries.is_empty() && stats.db_time.count == 0);
    assert!(
        cache
            .key_for("SELECT 1", ())
            .unwrap()
            .starts_with("reports:sqlite::memory:")
    );
    let bad = SqlCache::builder(memory_cache(), SqliteExecutor::memory().await.unwrap())
        .namespace("a*")
        .build();
    assert!(bad.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_after_a_write_never_joins_an_older_flight() {
    let gate = Arc::new(Semaphore::new(0));
    let mut probe = Probe::new(SqliteExecutor::memory().await.unwrap());
    probe.gate = Some(gate.clone());
    let probe = Arc::new(probe);
    let cache = SqlCache::builder_shared(memory_cache(), probe.clone())
        .build()
        .unwrap();
    cache
        .execute("CREATE TABLE kv (k TEXT, v TEXT)", ())
        .await
        .unwrap();
    cache
        .execute("INSERT INTO kv VALUES ('a', 'old')", ())
        .await
        .unwrap();
    let q = "SELECT v FROM kv WHERE k = 'a'";
    // A read starts and is held before it reaches the database...
    let early = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.query(q, ()).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...a write lands (and invalidates)...
    cache
        .execute("UPDATE kv SET v = 'new' WHERE k = 'a'", ())
        .await
        .unwrap();
    // ...then our own read must not share the early one: it sees the write.
    let late = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.query(q, ()).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.add_permits(100);
    early.await.unwrap().unwrap();
    let late = late.await.unwrap().unwrap();
    assert_eq!(late.get(0, "v"), Some(&SqlValue::from("new")));
    assert_eq!(probe.fetches.load(SeqCst), 2);
    // Never the old rows from the cache. (The early read may store its result after the late
    // one: it carries the old tokens, so it is a miss — a reload, never stale data.)
    let cached = cache
        .cache_query(q, (), QueryCacheStrategy::CacheOnly, None)
        .await
        .unwrap();
    if let Some(cached) = cached {
        assert_eq!(cached.get(0, "v"), Some(&SqlValue::from("new")));
    }
    assert_eq!(
        cache.query(q, ()).await.unwrap().get(0, "v"),
        Some(&SqlValue::from("new"))
    );
}

/// A dependency no catalog shows (a trigger keeps `order_totals` up to date) is declared on the
/// builder: writes to `orders` invalidate `order_totals` too, transitively.
#[tokio::test]
async fn declared_dependencies_invalidate_the_affected_tables() {
    let probe = Arc::new(Probe::new(SqliteExecutor::memory().await.unwrap()));
    let cache = SqlCache::builder_shared(memory_cache(), probe.clone())
        .dependency("orders", "order_totals")
        .dependency("order_totals", "dashboard")
        .build()
        .unwrap();
    for stmt in [
        "CREATE TABLE orders (id INTEGER, total INTEGER)",
        "CREATE TABLE order_totals (total INTEGER)",
        "CREATE TABLE dashboard (k TEXT)",
        "INSERT INTO order_totals VALUES (0)",
        "INSERT INTO dashboard VALUES ('x')",
        "CREATE TRIGGER keep_total AFTER INSERT ON orders BEGIN \
         UPDATE order_totals SET total = total + NEW.total; END",
    ] {
        cache.execute(stmt, ()).await.unwrap();
    }
    let totals = "SELECT total FROM order_totals";
    let dash = "SELECT k FROM dashboard";
    assert_eq!(
        cache.query(totals, ()).await.unwrap().rows[0][0],
        SqlValue::Int(0)
    );
    cache.query(dash, ()).await.unwrap();
    assert_eq!(
        cache.invalidate_table("orders").await.unwrap(),
        3,
        "orders, order_totals, dashboard"
    );
    cache.query(dash, ()).await.unwrap();
    cache
        .execute("INSERT INTO orders VALUES (1, 5)", ())
        .await
        .unwrap();
    assert_eq!(
        cache.query(totals, ()).await.unwrap().rows[0][0],
        SqlValue::Int(5)
    );
}

/// Invalidations that fail after a committed write (the cache is off) are retried by one
/// background retrier until they succeed: after the cache is back, the write's table is
/// invalidated without any further call, so a result cached before the outage is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_invalidations_are_retried_until_they_succeed() {
    let flaky = Flaky::default();
    let db = SqliteExecutor::memory().await.unwrap();
    let cache = SqlCache::builder(Cache::new(flaky.clone(), Serializer::default()), db)
        .build()
        .unwrap();
    cache
        .execute("CREATE TABLE t (v INTEGER)", ())
        .await
        .unwrap();
    cache.execute("INSERT INTO t VALUES (1)", ()).await.unwrap();
    let q = "SELECT v FROM t";
    assert_eq!(
        cache.query(q, ()).await.unwrap().rows[0][0],
        SqlValue::Int(1)
    );
    flaky.down.store(true, SeqCst);
    // A storm of writes during the outage: each returns its result.
    for v in 2..=50 {
        assert_eq!(
            cache
                .execute("UPDATE t SET v = %s", params![v])
                .await
                .unwrap(),
            1
        );
    }
    assert_eq!(cache.get_performance_stats().invalidation_failures, 49);
    flaky.down.store(false, SeqCst);
    let retried = eventually(Duration::from_secs(5), || {
        let cache = cache.clone();
        async move { cache.get_performance_stats().invalidation_retries_succeeded >= 1 }
    })
    .await;
    assert!(retried.is_some(), "the retrier never succeeded");
    assert_eq!(
        cache.query(q, ()).await.unwrap().rows[0][0],
        SqlValue::Int(50),
        "the result cached before the outage was served"
    );
    // One retrier replayed the set of tables: a handful of attempts, not one per write.
    assert!(cache.get_performance_stats().invalidation_retries_succeeded <= 3);
}

/// Remembered decoded results: a hit shares the rows (`cache_query_shared` returns the same
/// `Arc` every time), and after an invalidation the same stored bytes are a miss — the tokens
/// are checked on every read, remembered or not.
#[tokio::test]
async fn remembered_results_are_shared_and_still_invalidated() {
    let (cache, probe) = sqlite_cache().await;
    cache
        .execute("CREATE TABLE m (v INTEGER)", ())
        .await
        .unwrap();
    cache.execute("INSERT INTO m VALUES (7)", ()).await.unwrap();
    let q = "SELECT v FROM m";
    let shared = |cache: SqlCache| async move {
        cache
            .cache_query_shared(q, (), QueryCacheStrategy::CacheFirst, None)
            .await
            .unwrap()
            .unwrap()
    };
    let first = shared(cache.clone()).await;
    let second = shared(cache.clone()).await;
    let third = shared(cache.clone()).await;
    assert!(Arc::ptr_eq(&second, &third), "hits share the decoded rows");
    assert_eq!(*first, *second);
    assert_eq!(probe.fetches.load(SeqCst), 1);
    // Invalidate without changing the data: the stored bytes are the same, and still a miss.
    cache.invalidate_table("m").await.unwrap();
    assert_eq!(
        cache
            .cache_query(q, (), QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap(),
        None
    );
    let again = shared(cache.clone()).await;
    assert_eq!(*again, *first);
    assert_eq!(
        probe.fetches.load(SeqCst),
        2,
        "the invalidated result was not served"
    );
}
