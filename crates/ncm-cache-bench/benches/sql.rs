//! SqlCache on PostgreSQL: a hit beside the same query run on PostgreSQL over loopback
//! (100-row result), over the memory backend and over a MultiLevelCache (L1 + Redis); and
//! `execute(UPDATE)` + invalidation latency with 1,000 and with 2,000,000 unrelated keys in
//! Redis, beside the SCAN-based invalidation of the previous design.
//!
//! A custom harness: creates a 100-row table in its own schema, then measures, interleaving
//! rounds (ABBA), `SqlCache::cache_query(.., CacheFirst, ..)` over the in-process memory
//! backend (every call a hit) against `sqlx::query(..).fetch_all(&pool)` on the same pool.
//! Writes one row to `$NCM_BENCH_OUT/sql.json` (unit ns/query, ratio = baseline / ours).
//! Skips with a message when PostgreSQL is unreachable (`DATABASE_URL` or
//! `postgres://postgres@127.0.0.1:5432/test`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use ncm_cache_bench::{Row, interleaved_medians, median, quick, write_rows};
use ncm_cache_codec::Serializer;
use ncm_cache_core::Cache;
use ncm_cache_memory::MemoryBackend;
use ncm_cache_multilevel::MultiLevelCache;
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_sql::sqlx::postgres::{PgPool, PgPoolOptions};
use ncm_cache_sql::sqlx::{self, AssertSqlSafe};
use ncm_cache_sql::{PgExecutor, QueryCacheStrategy, SqlCache, params};
use ncm_cache_testkit::RedisServer;

const QUERY: &str =
    "SELECT id, name, price, active, created FROM bench_rows WHERE id > %s ORDER BY id";
const RAW_QUERY: &str =
    "SELECT id, name, price, active, created FROM bench_rows WHERE id > $1 ORDER BY id";

async fn connect() -> Option<(String, PgPool)> {
    let urls = match std::env::var("DATABASE_URL") {
        Ok(u) if !u.is_empty() => vec![u],
        _ => vec![
            "postgres://postgres@127.0.0.1:5432/test".to_owned(),
            "postgres://root@127.0.0.1:5432/test".to_owned(),
        ],
    };
    for url in urls {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect(&url)
            .await;
        match pool {
            Ok(p) => return Some((url, p)),
            Err(e) => eprintln!("sql bench: {url}: {e}"),
        }
    }
    None
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some((url, admin)) = rt.block_on(connect()) else {
        eprintln!("sql bench: SKIPPED (PostgreSQL unreachable; set DATABASE_URL)");
        return;
    };
    let schema = format!("ncm_bench_{}", std::process::id());
    let pool = rt.block_on(async {
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .unwrap();
        let opts = url
            .parse::<sqlx::postgres::PgConnectOptions>()
            .unwrap()
            .options([("search_path", schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .unwrap();
        for sql in [
            "CREATE TABLE bench_rows (id int PRIMARY KEY, name text, price float8, active bool, created timestamptz)",
            "INSERT INTO bench_rows SELECT i, 'product ' || i, i * 1.25, i % 2 = 0, \
             timestamptz '2024-01-01' + i * interval '1 hour' FROM generate_series(1, 100) i",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        pool
    });

    let cache = SqlCache::builder(
        Cache::new(MemoryBackend::new(), Serializer::default()),
        PgExecutor::new(pool.clone()),
    )
    .enable_performance_monitoring(false)
    .build()
    .unwrap();
    // Warm up both sides (and check they agree).
    rt.block_on(async {
        let ours = cache.query(QUERY, params![0]).await.unwrap();
        assert_eq!(ours.len(), 100);
        let raw = sqlx::query(RAW_QUERY)
            .bind(0i64)
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(raw.len(), 100);
    });

    let (rounds, per_round) = if quick() { (10, 200) } else { (30, 1000) };
    let ours_round = || {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..per_round {
                let rows = cache
                    .cache_query(QUERY, params![0], QueryCacheStrategy::CacheFirst, None)
                    .await
                    .unwrap();
                std::hint::black_box(rows);
            }
            start.elapsed().as_nanos() as f64 / per_round as f64
        })
    };
    let baseline_round = || {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..per_round {
                let rows = sqlx::query(RAW_QUERY)
                    .bind(0i64)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                std::hint::black_box(rows);
            }
            start.elapsed().as_nanos() as f64 / per_round as f64
        })
    };
    let (ours, baseline) = interleaved_medians(rounds, ours_round, baseline_round);
    let stats = cache.get_performance_stats();
    assert_eq!(stats.misses, 1, "every measured call is a hit");
    println!(
        "sql_cached_hit_100_rows: ours {ours:.0} ns/query, postgres loopback {baseline:.0} ns/query, \
         ratio {:.1}x",
        baseline / ours
    );
    let mut rows = vec![Row {
        name: "sql_cached_hit_100_rows".into(),
        ours,
        baseline,
        baseline_name: "postgres_loopback_sqlx".into(),
        unit: "ns/query".into(),
        ratio: baseline / ours,
    }];

    let server = RedisServer::start().expect("redis-server is needed for the SQL/Redis rows");
    rows.extend(rt.block_on(multilevel_hit(&server, &pool, rounds, per_round, baseline)));
    rows.extend(rt.block_on(invalidation_rows(&server, &pool)));

    rt.block_on(async {
        pool.close().await;
        let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&admin)
            .await;
        admin.close().await;
    });
    let path = write_rows("sql", &rows).unwrap();
    println!("wrote {}", path.display());
}

/// A `SqlCache` over a `MultiLevelCache` (L1 + this Redis + backplane): every measured call is
/// an L1 hit (entry and generation tokens), beside the PostgreSQL query measured above —
/// with `cache_query_shared` (the rows shared, no copy) and with `cache_query` (owned rows).
async fn multilevel_hit(
    server: &RedisServer,
    pool: &PgPool,
    rounds: usize,
    per_round: usize,
    postgres_ns: f64,
) -> Vec<Row> {
    let mut config = RedisConfig::from_url(&server.url()).unwrap();
    config.key_prefix = "bench-ml:".into();
    config.health_check_interval = None;
    let redis = RedisCache::connect(config).await.unwrap();
    let multi = MultiLevelCache::over_redis(&redis).build().unwrap();
    let cache = SqlCache::builder(
        Cache::new(multi.as_backend(), Serializer::default()),
        PgExecutor::from_pool(pool.clone()).await.unwrap(),
    )
    .enable_performance_monitoring(false)
    .build()
    .unwrap();
    assert_eq!(cache.query(QUERY, params![0]).await.unwrap().len(), 100);
    let (mut shared, mut owned) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..per_round {
            let rows = cache
                .cache_query_shared(QUERY, params![0], QueryCacheStrategy::CacheFirst, None)
                .await
                .unwrap();
            std::hint::black_box(rows);
        }
        shared.push(start.elapsed().as_nanos() as f64 / per_round as f64);
        let start = Instant::now();
        for _ in 0..per_round {
            let rows = cache
                .cache_query(QUERY, params![0], QueryCacheStrategy::CacheFirst, None)
                .await
                .unwrap();
            std::hint::black_box(rows);
        }
        owned.push(start.elapsed().as_nanos() as f64 / per_round as f64);
    }
    assert_eq!(cache.get_performance_stats().misses, 1);
    let (shared, owned) = (median(&mut shared), median(&mut owned));
    println!(
        "sql_cached_hit_100_rows_multilevel: shared {shared:.0} ns/query, owned {owned:.0} \
         ns/query, postgres {postgres_ns:.0} ns/query, ratios {:.1}x / {:.1}x",
        postgres_ns / shared,
        postgres_ns / owned
    );
    [
        ("sql_cached_hit_100_rows_multilevel", shared),
        ("sql_cached_hit_100_rows_multilevel_owned", owned),
    ]
    .into_iter()
    .map(|(name, ours)| Row {
        name: name.into(),
        ours,
        baseline: postgres_ns,
        baseline_name: "postgres_loopback_sqlx".into(),
        unit: "ns/query".into(),
        ratio: postgres_ns / ours,
    })
    .collect()
}

/// Fills Redis with keys of another application, `from..to` (in batches of 10,000).
async fn fill(con: &mut redis::aio::MultiplexedConnection, from: usize, to: usize) {
    let mut i = from;
    while i < to {
        let end = (i + 10_000).min(to);
        let mut cmd = redis::cmd("MSET");
        for k in i..end {
            cmd.arg(format!("other-app:{k}")).arg("x");
        }
        let _: () = cmd.query_async(con).await.unwrap();
        i = end;
    }
}

/// `execute(UPDATE)` + its invalidation, median ms over `rounds`, each with 100 cached
/// queries of the table.
async fn update_latency(cache: &SqlCache, rounds: usize) -> f64 {
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        for i in 0..100 {
            cache.query(QUERY, params![i]).await.unwrap();
        }
        let start = Instant::now();
        cache
            .execute(
                "UPDATE bench_rows SET price = price + 0 WHERE id = %s",
                params![round as i64 + 1],
            )
            .await
            .unwrap();
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    median(&mut samples)
}

/// The SCAN-based invalidation this crate used before generation tokens: the same UPDATE,
/// then a pattern delete of the table's entries and of the entries of unknown tables (two
/// SCANs of the whole keyspace); median ms.
async fn scan_latency(redis: &RedisCache, pool: &PgPool, rounds: usize) -> f64 {
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let start = Instant::now();
        sqlx::query("UPDATE bench_rows SET price = price + 0 WHERE id = $1")
            .bind(round as i64 + 1)
            .execute(pool)
            .await
            .unwrap();
        for pattern in ["sql:*|bench_rows|*", "sql:*|%|*"] {
            redis.clear_pattern(pattern).await.unwrap();
        }
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    median(&mut samples)
}

/// Invalidation latency with 1,000 and with 2,000,000 unrelated keys in Redis (flat: the cost
/// does not grow with the keyspace), and beside the SCAN-based baseline at 2,000,000 keys.
async fn invalidation_rows(server: &RedisServer, pool: &PgPool) -> Vec<Row> {
    let (small, large) = (1_000, 2_000_000);
    let rounds = if quick() { 15 } else { 41 };
    let mut config = RedisConfig::from_url(&server.url()).unwrap();
    config.key_prefix = "bench-inv:".into();
    config.health_check_interval = None;
    let redis = RedisCache::connect(config).await.unwrap();
    let cache = SqlCache::builder(
        redis.cache().clone(),
        PgExecutor::from_pool(pool.clone()).await.unwrap(),
    )
    .enable_performance_monitoring(false)
    .build()
    .unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    fill(&mut con, 0, small).await;
    let at_small = update_latency(&cache, rounds).await;
    fill(&mut con, small, large).await;
    let at_large = update_latency(&cache, rounds).await;
    let scan = scan_latency(&redis, pool, 3).await;
    println!(
        "sql_execute_update_invalidate: {at_small:.2} ms with {small} keys, {at_large:.2} ms with \
         {large} keys (ratio {:.2}); SCAN-based baseline {scan:.1} ms ({:.0}x)",
        at_small / at_large,
        scan / at_large
    );
    let _: redis::RedisResult<()> = redis::cmd("FLUSHALL").query_async(&mut con).await;
    vec![
        Row {
            name: "sql_execute_update_invalidate_2m_vs_1k_keys".into(),
            ours: at_large,
            baseline: at_small,
            baseline_name: "same_with_1000_keys".into(),
            unit: "ms".into(),
            ratio: at_small / at_large,
        },
        Row {
            name: "sql_execute_update_invalidate_2m_keys_vs_scan".into(),
            ours: at_large,
            baseline: scan,
            baseline_name: "scan_clear_pattern_2m_keys".into(),
            unit: "ms".into(),
            ratio: scan / at_large,
        },
    ]
}
