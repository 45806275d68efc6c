//! One service process of the cross-process SqlCache tests (`tests/tests/sql_processes.rs`):
//! reads one row through a `SqlCache` whose database reads answer `NCM_SQL_DELAY_MS` late (the
//! rows are read, then the reply is slow — as on a loaded database or network), and prints
//! what it got.
//!
//! Environment: `NCM_SQL_DB` (`postgres` or `mysql`), `NCM_SQL_URL`, `NCM_SQL_QUERY`,
//! `NCM_SQL_DELAY_MS`, `NCM_SQL_MODE` (`redis` or `multilevel`), and the Redis: `NCM_REDIS_URL`
//! or `NCM_REDIS_NODES` (cluster seed URLs, comma-separated), `NCM_REDIS_PREFIX`.
//!
//! Output lines: `fetched` once the database has answered (before the delay), then
//! `result <value>`; with `NCM_SQL_POLL_MS`, `poll <unix ns> <value>` every 20 ms instead.
//!
//! With `NCM_LOAD_PATH` the row is read by a loader of the cache instead of the `SqlCache`
//! (`tests/tests/sql_processes.rs`, loads overtaken by a write): `read_through`
//! (`CacheStrategies::read_through`, key `rt:1`), `loader` (`CacheLoader`, loader `row` with
//! argument `1`) or `get_or_load` (`MultiLevelCache::get_or_load`, key `gl:1`; multi-level
//! mode only). In multi-level mode the worker first waits for its backplane, whose connection
//! goes to `NCM_BACKPLANE_URL` when set (a proxy the test can stall); `NCM_LINGER_MS` keeps it
//! running that long after its result (a service goes on hearing invalidations).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

#[path = "../shared/worker_redis.rs"]
mod worker_redis;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ncm_cache::core::{Cache, Result};
use ncm_cache::sql::{MySqlExecutor, PgExecutor, Rows, SqlDialect, SqlExecutor, SqlValue};
use ncm_cache::{MultiLevelCache, RedisCache, RedisConfig, Serializer, SqlCache};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

/// A real executor whose reads reply `delay` after the database answered.
#[derive(Debug)]
struct SlowReply {
    inner: Arc<dyn SqlExecutor>,
    delay: Duration,
}

#[async_trait]
impl SqlExecutor for SlowReply {
    fn dialect(&self) -> SqlDialect {
        self.inner.dialect()
    }
    fn identity(&self) -> &str {
        self.inner.identity()
    }
    fn database_identity(&self) -> &str {
        self.inner.database_identity()
    }
    async fn fetch_all(&self, sql: &str, params: &[SqlValue]) -> Result<Rows> {
        let rows = self.inner.fetch_all(sql, params).await;
        println!("fetched");
        let _ = std::io::stdout().flush();
        tokio::time::sleep(self.delay).await;
        rows
    }
    async fn execute(&self, sql: &str, params: &[SqlValue]) -> Result<u64> {
        self.inner.execute(sql, params).await
    }
    async fn dependencies(&self) -> Result<Vec<(String, String)>> {
        self.inner.dependencies().await
    }
}

/// The Redis of the test: one server or a cluster.
pub fn redis_config() -> RedisConfig {
    let mut c = worker_redis::from_env();
    c.health_check_interval = None;
    c
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = env("NCM_SQL_URL");
    let executor: Arc<dyn SqlExecutor> = match env("NCM_SQL_DB").as_str() {
        "mysql" => Arc::new(MySqlExecutor::connect(&url).await.unwrap()),
        _ => Arc::new(PgExecutor::connect(&url).await.unwrap()),
    };
    let delay = Duration::from_millis(env("NCM_SQL_DELAY_MS").parse().unwrap_or(0));
    let executor = Arc::new(SlowReply {
        inner: executor,
        delay,
    });
    let redis = RedisCache::connect(redis_config()).await.unwrap();
    let backplane = match env("NCM_BACKPLANE_URL") {
        url if url.is_empty() => None,
        url => {
            let mut c = RedisConfig::from_url(&url).unwrap();
            c.key_prefix = env("NCM_REDIS_PREFIX");
            c.health_check_interval = None;
            // Long enough that the test's stall is not taken for a dead link.
            c.response_timeout = Duration::from_secs(3);
            Some(RedisCache::connect(c).await.unwrap())
        }
    };
    let multi = (env("NCM_SQL_MODE") == "multilevel").then(|| {
        let mut builder = MultiLevelCache::over_redis(&redis);
        if let Some(bp) = &backplane {
            builder = builder.backplane(Arc::clone(bp.redis_backend()));
        }
        builder.build().unwrap()
    });
    if let Some(multi) = &multi {
        let start = std::time::Instant::now();
        while !multi.l1_active() && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let cache = match &multi {
        Some(multi) => Cache::builder(multi.as_backend(), Serializer::default()).build(),
        None => redis.cache().clone(),
    };
    let path = env("NCM_LOAD_PATH");
    if !path.is_empty() {
        let value = load(&path, cache, multi.as_ref(), executor).await;
        println!("result {value}");
        let _ = std::io::stdout().flush();
        let linger = env("NCM_LINGER_MS").parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(linger)).await;
        return;
    }
    let sql = SqlCache::builder_shared(cache, executor).build().unwrap();
    // Polling mode: read every 20 ms for NCM_SQL_POLL_MS, printing `poll <unix ns> <value>`
    // (a process whose L1 is warm while another process writes).
    let poll_ms: u64 = env("NCM_SQL_POLL_MS").parse().unwrap_or(0);
    if poll_ms > 0 {
        let end = std::time::Instant::now() + Duration::from_millis(poll_ms);
        while std::time::Instant::now() < end {
            let rows = sql.query(&env("NCM_SQL_QUERY"), ()).await.unwrap();
            let v = rows
                .get(0, "v")
                .and_then(SqlValue::as_str)
                .unwrap_or("<none>");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            println!("poll {now} {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::io::stdout().flush();
        return;
    }
    let rows = sql.query(&env("NCM_SQL_QUERY"), ()).await.unwrap();
    let value = rows
        .get(0, "v")
        .and_then(SqlValue::as_str)
        .unwrap_or("<none>")
        .to_owned();
    println!("result {value}");
    let _ = std::io::stdout().flush();
}

/// Reads the row through one of the cache's loaders (`NCM_LOAD_PATH`): the loader reads the
/// database, which answers late.
async fn load(
    path: &str,
    cache: Cache<Serializer>,
    multi: Option<&MultiLevelCache>,
    executor: Arc<SlowReply>,
) -> String {
    use ncm_cache::CacheStrategy;
    use ncm_cache::loader::CacheLoader;
    use ncm_cache::strategies::CacheStrategies;
    let read = move || {
        let executor = Arc::clone(&executor);
        async move {
            let rows = executor.fetch_all(&env("NCM_SQL_QUERY"), &[]).await?;
            Ok::<_, ncm_cache::core::CacheError>(
                rows.get(0, "v")
                    .and_then(SqlValue::as_str)
                    .unwrap_or("<none>")
                    .to_owned(),
            )
        }
    };
    let ttl = Duration::from_secs(600);
    match path {
        "read_through" => CacheStrategies::new(cache)
            .read_through("rt:1", read, ttl)
            .await
            .unwrap(),
        "loader" => {
            let loader = CacheLoader::new(cache);
            loader
                .register_loader(
                    "row",
                    move |_id: u64| read(),
                    ttl,
                    CacheStrategy::CacheAside,
                )
                .unwrap();
            loader.load("row", 1u64).await.unwrap()
        }
        "get_or_load" => multi
            .expect("get_or_load needs NCM_SQL_MODE=multilevel")
            .get_or_load::<String, _, _, _>("gl:1", read)
            .await
            .unwrap(),
        other => panic!("unknown NCM_LOAD_PATH {other:?}"),
    }
}
