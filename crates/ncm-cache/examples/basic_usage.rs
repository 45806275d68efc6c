//! The original README's "Basic Usage" snippet in Rust: create a cache with a default TTL and the
//! cache-aside strategy, then `set` / `get` / `delete` a user.
//!
//! Runs on the in-process memory backend (no server needed); with the `redis` feature and
//! `REDIS_URL` set, on Redis (keys under the prefix `ncm-example:`).
//!
//! ```text
//! cargo run -p ncm-cache --example basic_usage
//! REDIS_URL=redis://127.0.0.1:6379/0 cargo run -p ncm-cache --all-features --example basic_usage
//! ```

use std::time::Duration;

use ncm_cache::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    name: String,
    email: String,
}

/// `RedisSyncCache(host=..., port=6379, db=0, default_ttl=3600, strategy=CacheStrategy.CACHE_ASIDE)`
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
    let cache = open_cache().await?;

    // await cache.set("user:123", {"name": "John", "email": "john@example.com"})
    let john = User {
        name: "John".into(),
        email: "john@example.com".into(),
    };
    cache.set("user:123", &john).await?;

    // user = await cache.get("user:123")
    let user: Option<User> = cache.get("user:123").await?;
    println!("get(\"user:123\") = {user:?}");
    if user.as_ref() != Some(&john) {
        return Err("the cached user differs from the one written".into());
    }

    // await cache.delete("user:123")
    let existed = cache.delete("user:123").await?;
    let after: Option<User> = cache.get("user:123").await?;
    println!("delete(\"user:123\") = {existed}; get afterwards = {after:?}");

    cache.close().await?;
    Ok(())
}
