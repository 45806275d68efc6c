//! The original README's write strategies in Rust: write-through, write-behind, write-around,
//! cache-aside and read-through.
//!
//! Runs on the in-process memory backend; with `REDIS_URL` set (and the `redis` feature), on
//! Redis, with durable write-behind.
//!
//! ```text
//! cargo run -p ncm-cache-strategies --example write_strategies
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p ncm-cache-strategies --all-features --example write_strategies
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::Cache;
use ncm_cache_memory::MemoryBackend;
use ncm_cache_strategies::{CacheStrategies, store_fn};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    name: String,
    email: String,
}

type Database = Arc<Mutex<HashMap<String, User>>>;

async fn strategies() -> Result<CacheStrategies, Box<dyn std::error::Error>> {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        use ncm_cache_strategies::{DurableConfig, WriteBehindConfig};
        let cache = ncm_cache_redis::RedisCache::from_url(&url).await?;
        println!("on Redis at {url} (durable write-behind)");
        let durable = DurableConfig::new(cache.redis_backend().clone());
        return Ok(CacheStrategies::builder(cache.cache().clone())
            .redis(cache.redis_backend().clone())
            .write_behind(WriteBehindConfig::default().durable(durable))
            .build()
            .await?);
    }
    #[cfg(not(feature = "redis"))]
    if std::env::var_os("REDIS_URL").is_some() {
        println!("REDIS_URL is set but the `redis` feature is off: using the memory backend");
    }
    println!("on the in-process memory backend");
    Ok(CacheStrategies::new(Cache::new(
        MemoryBackend::new(),
        Serializer::default(),
    )))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let strategies = strategies().await?;
    let database: Database = Arc::default();
    let db = Arc::clone(&database);
    // `persistent_store=save_to_database`: any async closure (or a `PersistentStore`).
    let save_to_database = store_fn(move |key: String, user: User| {
        let db = Arc::clone(&db);
        async move {
            db.lock().map_err(|_| "poisoned")?.insert(key, user);
            Ok::<_, &'static str>(())
        }
    })
    .named("users");
    let user_data = User {
        name: "John".into(),
        email: "john@example.com".into(),
    };
    let ttl = Duration::from_secs(3600);

    // 1. Write-through: the persistent store, then the cache.
    strategies
        .write_through("user:123", &user_data, ttl, &save_to_database)
        .await?;
    println!(
        "write-through: cached {:?}",
        strategies.cache().get::<User>("user:123").await?
    );

    // 2. Write-behind: the cache now, the store in the background. (The README waits 5 s;
    //    200 ms here so the example finishes quickly.)
    let renamed = User {
        name: "Johnny".into(),
        ..user_data.clone()
    };
    strategies
        .write_behind(
            "user:123",
            &renamed,
            ttl,
            &save_to_database,
            Duration::from_millis(200),
        )
        .await?;
    println!(
        "write-behind: cached {:?}, stored {:?}",
        strategies
            .cache()
            .get::<User>("user:123")
            .await?
            .map(|u| u.name),
        database
            .lock()
            .map_err(|_| "poisoned")?
            .get("user:123")
            .map(|u| u.name.clone())
    );
    strategies.flush().await?;
    println!(
        "after flush: stored {:?}",
        database
            .lock()
            .map_err(|_| "poisoned")?
            .get("user:123")
            .map(|u| u.name.clone())
    );

    // 3. Write-around: the store only; the cached copy is invalidated.
    strategies
        .write_around("user:123", &user_data, &save_to_database)
        .await?;
    println!(
        "write-around: cached {:?}",
        strategies.cache().get::<User>("user:123").await?
    );

    // 4. Cache-aside: the application manages the cache explicitly.
    let cache = strategies.cache();
    let value = match cache.get::<String>("key").await? {
        Some(value) => value,
        None => {
            let value = load_from_source().await;
            cache.set_with_ttl("key", &value, ttl).await?;
            value
        }
    };
    println!("cache-aside: {value}");

    // 5. Read-through: the cache loads from the source on a miss.
    let value: String = strategies
        .read_through("key2", loader_function, ttl)
        .await?;
    println!("read-through: {value}");

    strategies.shutdown().await?;
    for stats in strategies.write_behind_stats() {
        println!(
            "write-behind queue {:?}: {} writes, {} store calls, {} pending",
            stats.name, stats.accepted, stats.store_calls, stats.pending
        );
    }
    Ok(())
}

async fn load_from_source() -> String {
    "value from the source".into()
}

async fn loader_function() -> Result<String, std::io::Error> {
    Ok("loaded value".into())
}
