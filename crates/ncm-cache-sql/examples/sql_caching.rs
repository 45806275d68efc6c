//! The original README's "SQL Query Caching" section, in Rust, on SQLite and the in-process
//! memory backend (no server needed):
//!
//! ```text
//! cargo run -p ncm-cache-sql --example sql_caching
//! ```
//!
//! With Redis instead, build the cache from `RedisCache::builder()…build().await?.cache().clone()`;
//! with PostgreSQL or MySQL, use `PgExecutor::connect(url)` / `MySqlExecutor::connect(url)`
//! (features `postgres`, `mysql`).

use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheError};
use ncm_cache_memory::MemoryBackend;
use ncm_cache_sql::{QueryCacheStrategy, SqlCache, SqliteExecutor, params};

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct User {
    id: i64,
    name: String,
    active: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), CacheError> {
    // sql_cache = SQLCache(redis_cache, default_ttl=1800, max_query_size=1024 * 1024,
    //                      enable_query_logging=True, enable_performance_monitoring=True)
    let cache = Cache::new(MemoryBackend::new(), Serializer::default());
    let database = SqliteExecutor::memory().await?;
    let sql_cache = SqlCache::builder(cache, database)
        .default_ttl(Duration::from_secs(1800))
        .max_query_size(1024 * 1024)
        .enable_query_logging(true)
        .enable_performance_monitoring(true)
        .build()?;

    // Some data to query (writes through the cache invalidate what they touch).
    for ddl in [
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, active BOOLEAN)",
        "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT)",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER, date TEXT)",
        "CREATE TABLE cached_data (k TEXT, v TEXT)",
    ] {
        sql_cache.execute(ddl, ()).await?;
    }
    sql_cache
        .execute(
            "INSERT INTO users VALUES (123, 'John', %s), (124, 'Jane', %s)",
            params![true, false],
        )
        .await?;
    sql_cache
        .execute(
            "INSERT INTO products VALUES (1, 'Laptop', 'electronics'), (2, 'Desk', 'furniture')",
            (),
        )
        .await?;
    sql_cache
        .execute(
            "INSERT INTO orders VALUES (1, 123, '2024-01-05'), (2, 124, '2023-12-30')",
            (),
        )
        .await?;

    // result = await sql_cache.cache_query("SELECT * FROM users WHERE id = %s",
    //     params={"id": 123}, strategy=QueryCacheStrategy.CACHE_FIRST, ttl=1800)
    let result = sql_cache
        .cache_query(
            "SELECT * FROM users WHERE id = %s",
            params! { "id" => 123 },
            QueryCacheStrategy::CacheFirst,
            Some(Duration::from_secs(1800)),
        )
        .await?;
    println!("SQL result: {result:?}");

    // The same query, typed.
    let users: Vec<User> = sql_cache
        .query_as(
            "SELECT * FROM users WHERE active = %s",
            params! { "active" => true },
        )
        .await?;
    println!("active users: {users:?}");

    // Cache-first: try the cache, fall back to the database.
    let electronics = sql_cache
        .cache_query(
            "SELECT * FROM products WHERE category = %s",
            params! { "category" => "electronics" },
            QueryCacheStrategy::CacheFirst,
            None,
        )
        .await?;
    println!("electronics: {electronics:?}");
    // The second time it is a cache hit (whitespace and keyword case do not matter).
    let again = sql_cache
        .cache_query(
            "select *   from products where category = %s",
            params!["electronics"],
            QueryCacheStrategy::CacheFirst,
            None,
        )
        .await?;
    assert_eq!(again, electronics);
    println!("hits so far: {}", sql_cache.get_performance_stats().hits);

    // DB-first: query the database, cache the result (served from the cache if the database
    // fails).
    let count = sql_cache
        .cache_query(
            "SELECT COUNT(*) FROM orders WHERE date >= %s",
            params! { "date" => "2024-01-01" },
            QueryCacheStrategy::DbFirst,
            None,
        )
        .await?;
    println!("orders since 2024: {count:?}");

    // Cache-only: never touches the database (None on a miss).
    let cached = sql_cache
        .cache_query(
            "SELECT * FROM cached_data",
            (),
            QueryCacheStrategy::CacheOnly,
            None,
        )
        .await?;
    println!("cache-only (not cached yet): {cached:?}");
    assert!(cached.is_none());

    // Invalidate a specific query.
    let removed = sql_cache
        .invalidate_query("SELECT * FROM users WHERE id = %s", params! { "id" => 123 })
        .await?;
    println!("invalidate_query removed an entry: {removed}");

    // Invalidate by pattern (the key after the database reads `|tables|:hash`).
    let removed = sql_cache.invalidate_pattern("*users*").await?;
    println!("invalidate_pattern(\"*users*\") removed {removed}");

    // Invalidate by table.
    let removed = sql_cache.invalidate_table("products").await?;
    println!("invalidate_table(\"products\") invalidated {removed} table(s)");

    // A write through the cache invalidates the tables it touches.
    sql_cache
        .execute(
            "UPDATE orders SET date = %s WHERE id = %s",
            params!["2024-02-01", 2],
        )
        .await?;
    let count = sql_cache
        .cache_query(
            "SELECT COUNT(*) FROM orders WHERE date >= %s",
            params! { "date" => "2024-01-01" },
            QueryCacheStrategy::CacheFirst,
            None,
        )
        .await?;
    println!("orders since 2024 after the update: {count:?}");

    // sql_stats = sql_cache.get_performance_stats()
    let stats = sql_cache.get_performance_stats();
    println!("Query hit rate: {:.2}%", stats.hit_rate * 100.0);
    println!(
        "hits {} misses {} database p50 {:?} p99 {:?} cache p50 {:?} oversized {}",
        stats.hits,
        stats.misses,
        stats.db_time.p50,
        stats.db_time.p99,
        stats.cache_time.p50,
        stats.oversized
    );
    for slow in &stats.slowest_queries {
        println!("  slow: {:?} {}", slow.duration, slow.sql);
    }
    Ok(())
}
