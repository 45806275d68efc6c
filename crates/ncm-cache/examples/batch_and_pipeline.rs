//! The original README's "Batch Operations" snippet in Rust: `get_many`, `set_many` and a
//! pipeline (`pipeline()` / `execute_pipeline()`).
//!
//! Batch reads and writes run on any backend (the in-process memory backend here); the pipeline
//! is a Redis feature: it runs when the `redis` feature is on and `REDIS_URL` is set (keys under
//! the prefix `ncm-example:`).
//!
//! ```text
//! cargo run -p ncm-cache --example batch_and_pipeline
//! REDIS_URL=redis://127.0.0.1:6379/0 cargo run -p ncm-cache --all-features --example batch_and_pipeline
//! ```

use std::time::Duration;

use ncm_cache::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UserData {
    id: u64,
    name: String,
}

fn user(id: u64, name: &str) -> UserData {
    UserData {
        id,
        name: name.into(),
    }
}

async fn batch(cache: &Cache<Serializer>) -> Result<(), CacheError> {
    // await cache.set_many({"user:123": user_data_1, ...}, ttl=3600)
    cache
        .set_many(
            [
                ("user:123", user(123, "John")),
                ("user:456", user(456, "Jane")),
                ("user:789", user(789, "Joe")),
            ],
            Duration::from_secs(3600),
        )
        .await?;
    println!("set_many: 3 users written with a 1h TTL");

    // values = await cache.get_many(["user:123", "user:456", "user:789"])
    let values: Vec<Option<UserData>> = cache
        .get_many(&["user:123", "user:456", "user:789", "user:000"])
        .await?;
    println!("get_many (in key order, misses as None): {values:?}");

    let removed = cache
        .delete_many(&["user:123", "user:456", "user:789"])
        .await?;
    println!("delete_many removed {removed} keys");
    Ok(())
}

#[cfg(feature = "redis")]
async fn pipeline(redis: &RedisCache) -> Result<(), CacheError> {
    // pipeline = await cache.pipeline(); pipeline.set("key1", "value1"); ...
    let mut pipeline = redis.pipeline();
    pipeline
        .set("key1", "value1")
        .set("key2", "value2")
        .set("key3", "value3")
        .get("key1")
        .ttl("key2")
        .delete("key3");
    // results = await cache.execute_pipeline(pipeline)
    let results = redis.execute_pipeline(pipeline).await?;
    println!(
        "execute_pipeline: {} results in one round trip",
        results.len()
    );
    for (i, result) in results.iter().enumerate() {
        println!("  [{i}] {result:?}");
    }
    if let Some(get) = results.get(3) {
        let value: Option<String> = get.decode(redis.codec())?;
        println!("  decoded get(\"key1\") = {value:?}");
    }
    redis.delete_many(&["key1", "key2", "key3"]).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        let redis = RedisCache::builder()
            .url(&url)?
            .key_prefix("ncm-example:")
            .build()
            .await?;
        println!("on Redis at {url}");
        batch(redis.cache()).await?;
        pipeline(&redis).await?;
        redis.close().await?;
        return Ok(());
    }

    println!("on the in-process memory backend");
    let cache = Cache::new(MemoryBackend::new(), Serializer::default());
    batch(&cache).await?;
    println!(
        "pipeline: skipped; it is a Redis feature (RedisCache::pipeline / execute_pipeline) - \
         run with `--features redis` and REDIS_URL=redis://127.0.0.1:6379 to see it"
    );
    cache.close().await?;
    Ok(())
}
