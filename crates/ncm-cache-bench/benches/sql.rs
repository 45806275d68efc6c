//! SqlCache hit beside the same query run on PostgreSQL over loopback (100-row result).
//!
//! A custom harness: creates a 100-row table in its own schema, then measures, interleaving
//! rounds (ABBA), `SqlCache::cache_query(.., CacheFirst, ..)` over the in-process memory
//! backend (every call a hit) against `sqlx::query(..).fetch_all(&pool)` on the same pool.
//! Writes one row to `$NCM_BENCH_OUT/sql.json` (unit ns/query, ratio = baseline / ours).
//! Skips with a message when PostgreSQL is unreachable (`DATABASE_URL` or
//! `postgres://postgres@127.0.0.1:5432/test`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use ncm_cache_bench::{Row, interleaved_medians, quick, write_rows};
use ncm_cache_codec::Serializer;
use ncm_cache_core::Cache;
use ncm_cache_memory::MemoryBackend;
use ncm_cache_sql::sqlx::postgres::{PgPool, PgPoolOptions};
use ncm_cache_sql::sqlx::{self, AssertSqlSafe};
use ncm_cache_sql::{PgExecutor, QueryCacheStrategy, SqlCache, params};

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

    rt.block_on(async {
        pool.close().await;
        let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&admin)
            .await;
        admin.close().await;
    });

    println!(
        "sql_cached_hit_100_rows: ours {ours:.0} ns/query, postgres loopback {baseline:.0} ns/query, \
         ratio {:.1}x",
        baseline / ours
    );
    let path = write_rows(
        "sql",
        &[Row {
            name: "sql_cached_hit_100_rows".into(),
            ours,
            baseline,
            baseline_name: "postgres_loopback_sqlx".into(),
            unit: "ns/query".into(),
            ratio: baseline / ours,
        }],
    )
    .unwrap();
    println!("wrote {}", path.display());
}
