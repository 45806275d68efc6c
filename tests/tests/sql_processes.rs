//! SqlCache across OS processes (issue 17): process A reads a row (old value) and replies
//! late; meanwhile process B commits an UPDATE through `SqlCache::execute`, which invalidates;
//! then A stores what it read. Every read after B's write must return the new value — from B,
//! and from a third process. Before generation tokens, A's late store put the old rows back for
//! the whole TTL (the guard was per process).
//!
//! On PostgreSQL and on MariaDB, over one Redis, over a 3+3 Redis Cluster, and over a
//! `MultiLevelCache` (L1 + Redis + backplane) in every process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ncm_cache::core::Cache;
use ncm_cache::sql::sqlx::{self, AssertSqlSafe};
use ncm_cache::sql::{MySqlExecutor, PgExecutor, SqlExecutor, SqlValue};
use ncm_cache::{MultiLevelCache, RedisCache, RedisConfig, Serializer, SqlCache};
use ncm_cache_testkit::{RedisCluster, RedisServer};

const PG: &str = "postgres://postgres@127.0.0.1:5432/test";
const MARIADB: &str = "mysql://root@127.0.0.1:3306/test";

#[derive(Clone, Copy, PartialEq)]
enum Db {
    Postgres,
    MariaDb,
}

/// Where the cache lives.
enum Redis {
    One(Box<RedisServer>),
    Cluster(RedisCluster),
}

impl Redis {
    fn env(&self) -> (&'static str, String) {
        match self {
            Self::One(s) => ("NCM_REDIS_URL", s.url()),
            Self::Cluster(c) => ("NCM_REDIS_NODES", c.node_urls().join(",")),
        }
    }

    fn config(&self, prefix: &str) -> RedisConfig {
        let mut c = match self {
            Self::One(s) => RedisConfig::from_url(&s.url()).unwrap(),
            Self::Cluster(cl) => {
                let mut c = RedisConfig::default();
                c.cluster_nodes = cl.node_urls();
                c
            }
        };
        c.key_prefix = prefix.into();
        c.health_check_interval = None;
        c
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{:08x}", std::process::id(), fastrand::u32(..))
}

/// Creates `{ns}.t (id, v)` with row (1, 'old') in a schema (PostgreSQL) or database (MariaDB)
/// of its own; returns the qualified table and a cleanup statement.
async fn setup(db: Db) -> (String, String) {
    let ns = unique("ncm_xproc");
    let (create, table, drop) = match db {
        Db::Postgres => (
            format!("CREATE SCHEMA {ns}"),
            format!("{ns}.t"),
            format!("DROP SCHEMA IF EXISTS {ns} CASCADE"),
        ),
        Db::MariaDb => (
            format!("CREATE DATABASE {ns}"),
            format!("{ns}.t"),
            format!("DROP DATABASE IF EXISTS {ns}"),
        ),
    };
    for stmt in [
        create,
        format!("CREATE TABLE {table} (id INT PRIMARY KEY, v VARCHAR(20))"),
        format!("INSERT INTO {table} VALUES (1, 'old')"),
    ] {
        admin(db, &stmt).await;
    }
    (table, drop)
}

async fn admin(db: Db, stmt: &str) {
    match db {
        Db::Postgres => {
            let pool = sqlx::PgPool::connect(PG).await.unwrap();
            sqlx::query(AssertSqlSafe(stmt.to_owned()))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        Db::MariaDb => {
            let pool = sqlx::MySqlPool::connect(MARIADB).await.unwrap();
            sqlx::query(AssertSqlSafe(stmt.to_owned()))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    }
}

fn spawn(db: Db, redis: &Redis, prefix: &str, mode: &str, query: &str, delay_ms: u64) -> Child {
    spawn_with(db, redis, prefix, mode, query, delay_ms, 0)
}

fn spawn_with(
    db: Db,
    redis: &Redis,
    prefix: &str,
    mode: &str,
    query: &str,
    delay_ms: u64,
    poll_ms: u64,
) -> Child {
    worker(db, redis, prefix, mode, query, delay_ms)
        .env("NCM_SQL_POLL_MS", poll_ms.to_string())
        .spawn()
        .unwrap()
}

/// A worker reading the row through one of the cache's loaders (`NCM_LOAD_PATH`), its
/// database reply 2 s late.
fn spawn_loader(db: Db, redis: &Redis, prefix: &str, mode: &str, query: &str, path: &str) -> Child {
    worker(db, redis, prefix, mode, query, 2000)
        .env("NCM_LOAD_PATH", path)
        .spawn()
        .unwrap()
}

/// A worker process reading the row late (`delay_ms`), not yet spawned.
fn worker(db: Db, redis: &Redis, prefix: &str, mode: &str, query: &str, delay_ms: u64) -> Command {
    let (var, value) = redis.env();
    let mut c = Command::new(env!("CARGO_BIN_EXE_sql_worker"));
    c.env(
        "NCM_SQL_DB",
        if db == Db::Postgres {
            "postgres"
        } else {
            "mysql"
        },
    )
    .env("NCM_SQL_URL", if db == Db::Postgres { PG } else { MARIADB })
    .env("NCM_SQL_QUERY", query)
    .env("NCM_SQL_DELAY_MS", delay_ms.to_string())
    .env("NCM_SQL_MODE", mode)
    .env(var, value)
    .env("NCM_REDIS_PREFIX", prefix)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Forwards the child's output lines (without the `fetched` marker) to a receiver; with
/// `fetched`, first waits for that marker (the child has read the database).
fn lines(child: &mut Child, fetched: bool) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let (marker_tx, marker_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if line == "fetched" {
                let _ = marker_tx.send(());
            } else if tx.send(line).is_err() {
                return;
            }
        }
    });
    if fetched && marker_rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        panic!("the worker never read the database:\n{stderr}");
    }
    rx
}

fn finish(mut child: Child, lines: &mpsc::Receiver<String>) -> String {
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    assert!(status.success(), "worker failed: {status}\n{stderr}");
    // The reader thread ends when the child's stdout closes.
    let mut result = None;
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(30)) {
        if let Some(v) = line.strip_prefix("result ") {
            result = Some(v.to_owned());
        }
    }
    result.unwrap_or_else(|| panic!("the worker printed no result\n{stderr}"))
}

async fn race(db: Db, redis: Redis, mode: &str) {
    let (table, drop) = setup(db).await;
    let prefix = format!("{}:", unique("xp"));
    let query = format!("SELECT v FROM {table} WHERE id = 1");

    // Process B (this one).
    let executor: std::sync::Arc<dyn SqlExecutor> = match db {
        Db::Postgres => std::sync::Arc::new(PgExecutor::connect(PG).await.unwrap()),
        Db::MariaDb => std::sync::Arc::new(MySqlExecutor::connect(MARIADB).await.unwrap()),
    };
    let redis_cache = RedisCache::connect(redis.config(&prefix)).await.unwrap();
    let cache = match mode {
        "multilevel" => {
            let multi = MultiLevelCache::over_redis(&redis_cache).build().unwrap();
            Cache::builder(multi.as_backend(), Serializer::default()).build()
        }
        _ => redis_cache.cache().clone(),
    };
    let b = SqlCache::builder_shared(cache, executor).build().unwrap();

    // Process A reads 'old', then answers 2 s late.
    let mut a = spawn(db, &redis, &prefix, mode, &query, 2000);
    let a_lines = lines(&mut a, true);
    // Process D (started after A's lookup, so A reads the database) polls the row the whole
    // time: its cache warm (its L1, over a MultiLevelCache) across B's write.
    let mut d = spawn_with(db, &redis, &prefix, mode, &query, 0, 4000);
    let d_lines = lines(&mut d, false);
    let first_poll = d_lines
        .recv_timeout(Duration::from_secs(60))
        .expect("the polling worker printed nothing");
    // B commits its write (and invalidates) while A's result is on its way.
    let n = b
        .execute(&format!("UPDATE {table} SET v = 'new' WHERE id = 1"), ())
        .await
        .unwrap();
    assert_eq!(n, 1);
    let written = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // A stores what it read and returns it (it started before the write: 'old' is right).
    assert_eq!(finish(a, &a_lines), "old");

    // After the write, every process reads the new value: B (twice: miss then hit) ...
    for _ in 0..2 {
        let rows = b.query(&query, ()).await.unwrap();
        assert_eq!(
            rows.get(0, "v").and_then(SqlValue::as_str),
            Some("new"),
            "B read the value A stored after B's invalidation"
        );
    }
    // ... and a third process.
    let mut c = spawn(db, &redis, &prefix, mode, &query, 0);
    let c_lines = lines(&mut c, false);
    assert_eq!(finish(c, &c_lines), "new");
    assert!(
        b.get_performance_stats().hits >= 1,
        "B's second read was a hit"
    );
    // D, polling with a warm cache across the write: 'old' before it, and from 1 s after it
    // (the multi-level backplane's bound; at once on Redis alone) only 'new'.
    assert!(d.wait().unwrap().success(), "the polling worker failed");
    let mut polls = Vec::new();
    for line in std::iter::once(first_poll).chain(std::iter::from_fn(|| {
        d_lines.recv_timeout(Duration::from_secs(30)).ok()
    })) {
        let f: Vec<&str> = line.split(' ').collect();
        if let [_, t, v] = f[..] {
            polls.push((t.parse::<u128>().unwrap(), v.to_owned()));
        }
    }
    assert!(
        polls.iter().any(|(t, v)| *t < written && v == "old"),
        "D never read before the write: {polls:?}"
    );
    let late: Vec<_> = polls
        .iter()
        .filter(|(t, _)| *t > written + 1_000_000_000)
        .collect();
    assert!(!late.is_empty(), "D stopped polling too early");
    assert!(
        late.iter().all(|(_, v)| v == "new"),
        "D served the old value more than 1 s after the write: {late:?}"
    );
    admin(db, &drop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_slow_read_and_concurrent_write_across_processes() {
    race(
        Db::Postgres,
        Redis::One(Box::new(RedisServer::start().unwrap())),
        "redis",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_slow_read_and_concurrent_write_across_processes() {
    race(
        Db::MariaDb,
        Redis::One(Box::new(RedisServer::start().unwrap())),
        "redis",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_slow_read_and_concurrent_write_across_processes_on_a_cluster() {
    race(
        Db::Postgres,
        Redis::Cluster(RedisCluster::start().unwrap()),
        "redis",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_slow_read_and_concurrent_write_across_processes_over_multilevel() {
    race(
        Db::Postgres,
        Redis::One(Box::new(RedisServer::start().unwrap())),
        "multilevel",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_slow_read_and_concurrent_write_across_processes_over_multilevel_on_a_cluster() {
    race(
        Db::MariaDb,
        Redis::Cluster(RedisCluster::start().unwrap()),
        "multilevel",
    )
    .await;
}

/// The cache-aside race across processes, with a loader instead of the `SqlCache`: process A's
/// loader (`CacheStrategies::read_through`, `CacheLoader`, `MultiLevelCache::get_or_load`) misses
/// and reads the row (`old`), whose reply comes 2 s late; meanwhile this process (B) commits an
/// UPDATE to `new` and writes `new` to the cache (a write-through service). A returns `old` (it
/// read before the write) but must not store it over B's write: A's store is "only if still
/// absent" (`SET NX`). Before that, on a plain Redis cache, A's `old` overwrote `new` for the
/// TTL. Over multi-level caches with the backplane A also hears B's write first.
async fn load_race(db: Db, redis: Redis, mode: &str, paths: &[&str]) {
    let (table, drop) = setup(db).await;
    let prefix = format!("{}:", unique("xl"));
    let query = format!("SELECT v FROM {table} WHERE id = 1");
    let redis_cache = RedisCache::connect(redis.config(&prefix)).await.unwrap();
    let cache = match mode {
        "multilevel" => {
            let multi = MultiLevelCache::over_redis(&redis_cache).build().unwrap();
            Cache::builder(multi.as_backend(), Serializer::default()).build()
        }
        _ => redis_cache.cache().clone(),
    };
    for (round, path) in paths.iter().enumerate() {
        let key = match *path {
            "read_through" => "rt:1".to_owned(),
            "get_or_load" => "gl:1".to_owned(),
            _ => ncm_cache::loader::loader_key("row", &ncm_cache::loader::args_key(&1u64).unwrap()),
        };
        let (was, now) = if round % 2 == 0 {
            ("old", "new")
        } else {
            ("new", "old")
        };
        let mut a = spawn_loader(db, &redis, &prefix, mode, &query, path);
        let a_lines = lines(&mut a, true);
        admin(db, &format!("UPDATE {table} SET v = '{now}' WHERE id = 1")).await;
        cache.set(&key, &now.to_owned()).await.unwrap();
        assert_eq!(finish(a, &a_lines), was, "{path}: A returns what it read");
        let cached: Option<String> = cache.get(&key).await.unwrap();
        assert_eq!(
            cached.as_deref(),
            Some(now),
            "{path} ({mode}): A's late load overwrote the newer write"
        );
        // A third process reads the new value from the cache (its loader would answer 2 s late).
        let start = std::time::Instant::now();
        let mut c = spawn_loader(db, &redis, &prefix, mode, &query, path);
        let c_lines = lines(&mut c, false);
        assert_eq!(finish(c, &c_lines), now, "{path}: a third process");
        assert!(
            start.elapsed() < Duration::from_millis(2000),
            "{path}: the third process loaded instead of reading the cache"
        );
    }
    admin(db, &drop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_load_does_not_overwrite_a_write_across_processes() {
    load_race(
        Db::Postgres,
        Redis::One(Box::new(RedisServer::start().unwrap())),
        "redis",
        &["read_through", "loader"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_load_does_not_overwrite_a_write_across_processes_over_multilevel_on_a_cluster() {
    load_race(
        Db::MariaDb,
        Redis::Cluster(RedisCluster::start().unwrap()),
        "multilevel",
        &["read_through", "loader", "get_or_load"],
    )
    .await;
}

/// Cache-aside with a delete, across processes, the delete heard late: process A's
/// `MultiLevelCache::get_or_load` reads the row (`old`), its reply 500 ms late; this process (B)
/// commits an UPDATE and deletes the key (the cache-aside write), while A's backplane is
/// stalled (a proxy), so A's store lands after the delete — the key was absent, "only if
/// absent" lets it in — and A hears of the delete only afterwards. Once it does, A withdraws
/// what it stored: a third process then loads the new row. Before, every process read A's
/// `old` from Redis for the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_stored_after_a_delete_heard_late_is_withdrawn_across_processes() {
    use ncm_cache::core::CacheBackend as _;
    use ncm_cache_testkit::{FaultProxy, ProxyMode};
    let db = Db::Postgres;
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let redis = Redis::One(Box::new(server));
    let (table, drop) = setup(db).await;
    let prefix = format!("{}:", unique("xd"));
    let query = format!("SELECT v FROM {table} WHERE id = 1");
    let redis_cache = RedisCache::connect(redis.config(&prefix)).await.unwrap();
    let multi = MultiLevelCache::over_redis(&redis_cache).build().unwrap();
    let key = "gl:1";
    admin(db, &format!("UPDATE {table} SET v = 'old' WHERE id = 1")).await;
    let mut a = worker(db, &redis, &prefix, "multilevel", &query, 500)
        .env("NCM_LOAD_PATH", "get_or_load")
        .env("NCM_BACKPLANE_URL", proxy.url())
        .env("NCM_LINGER_MS", "5000")
        .spawn()
        .unwrap();
    // A has read `old` (its backplane was up before it loaded); its messages now wait.
    let a_lines = lines(&mut a, true);
    proxy.set_mode(ProxyMode::Stall);
    admin(db, &format!("UPDATE {table} SET v = 'new' WHERE id = 1")).await;
    multi.delete(key).await.unwrap();
    let result = a_lines
        .recv_timeout(Duration::from_secs(30))
        .expect("A printed no result");
    assert_eq!(result, "result old", "A returns what it read");
    let raw = redis_cache.backend();
    let held = raw.get(key).await.unwrap();
    assert!(
        held.is_some(),
        "A's store did not land after the delete (the race did not happen)"
    );
    // A hears the delete now.
    proxy.set_mode(ProxyMode::Pass);
    let start = std::time::Instant::now();
    while raw.get(key).await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "A's older value stayed in Redis after A heard the delete"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = a.kill();
    let _ = a.wait();
    let mut c = spawn_loader(db, &redis, &prefix, "multilevel", &query, "get_or_load");
    let c_lines = lines(&mut c, false);
    assert_eq!(finish(c, &c_lines), "new", "a third process");
    admin(db, &drop).await;
}

/// Three service processes run one query at once over `MultiLevelCache::over_redis`
/// (`SqlCache` over `as_backend()`) just after a write invalidated its cached result: one asks
/// the database under the key's stampede lock, the others wait — past the old result still in
/// L2, stored under the table's old tokens — and take its result (stored under the new ones).
/// Before, each process ran the query (3 database reads); a waiter that took whatever L2 held
/// would have found the old result.
async fn one_query_across_processes(db: Db, redis: Redis) {
    let (table, drop) = setup(db).await;
    let prefix = format!("{}:", unique("sqlstampede"));
    let query = format!("SELECT v FROM {table} WHERE id = 1");
    // The result is cached ('old') under the table's first tokens.
    let warm = worker(db, &redis, &prefix, "multilevel", &query, 0)
        .spawn()
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert!(
        warm.status.success(),
        "{}",
        String::from_utf8_lossy(&warm.stderr)
    );
    // This process writes the row through its own SqlCache: new tokens, the old result left
    // in L2 under the old ones.
    let executor: std::sync::Arc<dyn SqlExecutor> = match db {
        Db::Postgres => std::sync::Arc::new(PgExecutor::connect(PG).await.unwrap()),
        Db::MariaDb => std::sync::Arc::new(MySqlExecutor::connect(MARIADB).await.unwrap()),
    };
    let redis_cache = RedisCache::connect(redis.config(&prefix)).await.unwrap();
    let multi = MultiLevelCache::over_redis(&redis_cache).build().unwrap();
    let writer = SqlCache::builder_shared(
        Cache::builder(multi.as_backend(), Serializer::default()).build(),
        executor,
    )
    .build()
    .unwrap();
    let n = writer
        .execute(&format!("UPDATE {table} SET v = 'new' WHERE id = 1"), ())
        .await
        .unwrap();
    assert_eq!(n, 1);
    let children: Vec<Child> = (0..3)
        .map(|_| {
            worker(db, &redis, &prefix, "multilevel", &query, 1500)
                .spawn()
                .unwrap()
        })
        .collect();
    let mut fetched = 0;
    let mut outputs = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        fetched += stdout.lines().filter(|l| *l == "fetched").count();
        assert!(stdout.lines().any(|l| l == "result new"), "{stdout}");
        outputs.push(stdout);
    }
    admin(db, &drop).await;
    assert_eq!(
        fetched, 1,
        "the database was read {fetched} times by three processes: {outputs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_query_across_processes_over_multilevel() {
    let server = RedisServer::start().unwrap();
    one_query_across_processes(Db::Postgres, Redis::One(Box::new(server))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_one_query_across_processes_over_multilevel_on_a_cluster() {
    let cluster = RedisCluster::start().unwrap();
    one_query_across_processes(Db::MariaDb, Redis::Cluster(cluster)).await;
}
