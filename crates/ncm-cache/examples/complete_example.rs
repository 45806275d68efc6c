//! The original README's "Examples / Complete Example" in Rust: one cache shared by a
//! `SqlCache` and a `CacheLoader`; register a loader, load a user, cache a SQL query, print the
//! statistics, close.
//!
//! Runs on the in-process memory backend and an in-memory SQLite database; with the `redis`
//! feature and `REDIS_URL` set, the cache is Redis (keys under the prefix `ncm-example:`).
//!
//! ```text
//! cargo run -p ncm-cache --features loader,sqlite --example complete_example
//! ```

use std::time::Duration;

use ncm_cache::loader::CacheLoader;
use ncm_cache::prelude::*;
use ncm_cache::sql::{QueryCacheStrategy, SqlCache, SqliteExecutor, params};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

/// `cache = RedisCache(host="localhost", port=6379, default_ttl=3600, strategy=CACHE_ASIDE)`
async fn open_cache() -> Result<Cache<Serializer>, Box<dyn std::error::Error>> {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        let redis = RedisCache::builder()
            .url(&url)?
            .key_prefix("ncm-example:")
            .default_ttl(Duration::from_secs(3600))
            .strategy(CacheStrategy::CacheAside)
            .build()
            .await?;
        println!("on Redis at {url}");
        return Ok(redis.cache().clone());
    }
    println!("on the in-process memory backend (set REDIS_URL and enable `redis` for Redis)");
    Ok(Cache::builder(MemoryBackend::new(), Serializer::default())
        .default_ttl(Duration::from_secs(3600))
        .build())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Initialize cache
    let cache = open_cache().await?;

    // Initialize SQL cache (the original passes only the cache; Rust also needs the database)
    let database = SqliteExecutor::memory().await?;
    let sql_cache = SqlCache::builder(cache.clone(), database).build()?;
    sql_cache
        .execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)", ())
        .await?;
    sql_cache
        .execute("INSERT INTO users VALUES (123, 'John')", ())
        .await?;

    // Initialize cache loader
    let loader = CacheLoader::new(cache.clone());

    // Register loader: `async def load_user(user_id)` simulating a database query
    loader.register_loader(
        "user",
        |user_id: u64| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, std::io::Error>(User {
                id: user_id,
                name: format!("User {user_id}"),
            })
        },
        Duration::from_secs(1800),
        CacheStrategy::CacheAside,
    )?;

    // Use cache
    let user: User = loader.load("user", 123u64).await?;
    println!("Loaded user: {user:?}");
    let user: User = loader.load("user", 123u64).await?;
    println!("Loaded user again (from the cache): {user:?}");

    // Cache SQL query
    for _ in 0..2 {
        let result = sql_cache
            .cache_query(
                "SELECT * FROM users WHERE id = %s",
                params! { "id" => 123 },
                QueryCacheStrategy::CacheFirst,
                None,
            )
            .await?;
        println!("SQL result: {result:?}");
    }

    // Get statistics
    let stats = cache.get_stats();
    println!("Cache hit rate: {:.2}%", stats.hit_rate * 100.0);
    println!(
        "Query hit rate: {:.2}%",
        sql_cache.get_performance_stats().hit_rate * 100.0
    );

    // Clean up the example's keys, close cache
    cache.clear_pattern("*").await?;
    cache.close().await?;
    Ok(())
}
