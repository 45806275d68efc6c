//! The original README's "TTL Management" snippet in Rust: `get_ttl` and `extend_ttl`, plus
//! `ttl_state` (missing vs. persistent vs. expiring) and per-call TTLs (`Expiry`).
//!
//! Runs on the in-process memory backend; with the `redis` feature and `REDIS_URL` set, on Redis
//! (keys under the prefix `ncm-example:`).
//!
//! ```text
//! cargo run -p ncm-cache --example ttl_management
//! ```

use std::time::Duration;

use ncm_cache::prelude::*;

async fn open_cache() -> Result<Cache<Serializer>, Box<dyn std::error::Error>> {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        let redis = RedisCache::builder()
            .url(&url)?
            .key_prefix("ncm-example:")
            .default_ttl(Duration::from_secs(3600))
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
    cache.set("user:123", &"John").await?; // default TTL: 1 hour

    // ttl = await cache.get_ttl("user:123")
    let ttl = cache.get_ttl("user:123").await?;
    println!("get_ttl(\"user:123\") = {ttl:?} (default TTL 1h)");

    // await cache.extend_ttl("user:123", 7200)  # 2 hours
    let extended = cache
        .extend_ttl("user:123", Duration::from_secs(7200))
        .await?;
    let ttl = cache.get_ttl("user:123").await?;
    println!("extend_ttl(\"user:123\", 2h) = {extended}; get_ttl now = {ttl:?}");

    // extend_ttl on a missing key returns false instead of failing.
    let missing = cache
        .extend_ttl("user:missing", Duration::from_secs(60))
        .await?;
    println!("extend_ttl on a missing key = {missing}");

    // "Best Practices / 2. TTL Strategy": different TTLs for different data types.
    let user_data_ttl = Duration::from_secs(3600); // 1 hour
    let profile_data_ttl = Duration::from_secs(1800); // 30 minutes
    let settings_ttl = Duration::from_secs(7200); // 2 hours
    cache.set_with_ttl("user:1", &"u", user_data_ttl).await?;
    cache
        .set_with_ttl("profile:1", &"p", profile_data_ttl)
        .await?;
    cache.set_with_ttl("settings:1", &"s", settings_ttl).await?;
    cache
        .set_with_expiry("config:1", &"forever", Expiry::Never)
        .await?;
    for key in ["user:1", "profile:1", "settings:1", "config:1", "nope:1"] {
        println!("ttl_state({key:?}) = {:?}", cache.ttl_state(key).await?);
    }

    // A zero TTL is rejected (delete the key instead).
    match cache.extend_ttl("user:1", Duration::ZERO).await {
        Err(e) => println!("extend_ttl(.., 0) is rejected: {e}"),
        Ok(v) => println!("extend_ttl(.., 0) unexpectedly returned {v}"),
    }

    cache
        .delete_many(&["user:123", "user:1", "profile:1", "settings:1", "config:1"])
        .await?;
    cache.close().await?;
    Ok(())
}
