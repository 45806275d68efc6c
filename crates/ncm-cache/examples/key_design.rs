//! The original README's "Best Practices / 1. Cache Key Design" snippet in Rust: consistent key
//! patterns, namespaces (`KeySpace` / the Redis `key_prefix`), `escape_glob` for user text inside
//! patterns, and `clear_pattern("user:{id}:*")`.
//!
//! Runs on the in-process memory backend; with the `redis` feature and `REDIS_URL` set, on Redis,
//! where the `key_prefix` (`ncm-example:ncm:users:`) is put in front of every key and every
//! pattern stays inside it.
//!
//! ```text
//! cargo run -p ncm-cache --example key_design
//! ```

use ncm_cache::prelude::*;
use ncm_cache::{KeySpace, escape_glob};

async fn open_cache() -> Result<Cache<Serializer>, Box<dyn std::error::Error>> {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        // cache_key = f"ncm:users:{user_id}": the namespace is the cache's key prefix.
        let redis = RedisCache::builder()
            .url(&url)?
            .key_prefix("ncm-example:ncm:users:")
            .build()
            .await?;
        println!(
            "on Redis at {url}, key prefix {:?}",
            redis.config().key_prefix
        );
        return Ok(redis.cache().clone());
    }
    println!("on the in-process memory backend (set REDIS_URL and enable `redis` for Redis)");
    Ok(Cache::new(MemoryBackend::new(), Serializer::default()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Use consistent key patterns.
    let user_id = 42;
    let user_key = format!("user:{user_id}");
    let profile_key = format!("profile:{user_id}");
    let settings_key = format!("settings:{user_id}");
    println!("keys: {user_key}, {profile_key}, {settings_key}");

    // Use namespaces: a KeySpace puts the prefix in front of every key (Redis does this for you
    // with `key_prefix`), validates keys and scopes patterns to the prefix.
    let users = KeySpace::new("ncm:users:");
    println!(
        "namespaced: {} / pattern {}",
        users.full_key(&user_key)?,
        users.full_pattern("user:*")?
    );
    match users.full_key("") {
        Err(e) => println!("an empty key is rejected: {e}"),
        Ok(k) => println!("unexpected: {k}"),
    }

    // User text inside a pattern: escape it, so `*`, `?` and `[` match literally.
    let user_text = "bob*";
    let pattern = format!("user:{}:*", escape_glob(user_text));
    println!("escape_glob({user_text:?}) -> pattern {pattern:?}");

    let cache = open_cache().await?;
    for key in [
        "user:42:orders",
        "user:42:cart",
        "user:420:orders",
        "user:bob*:orders",
        "user:bobby:orders",
    ] {
        cache.set(key, &key).await?;
    }
    // await cache.clear_pattern(f"user:{user_id}:*")
    let removed = cache.clear_pattern(&format!("user:{user_id}:*")).await?;
    println!("clear_pattern(\"user:{user_id}:*\") removed {removed} (user:420:* is kept)");
    let removed = cache.clear_pattern(&pattern).await?;
    let bobby: Option<String> = cache.get("user:bobby:orders").await?;
    println!(
        "clear_pattern({pattern:?}) removed {removed}; user:bobby:orders kept = {}",
        bobby.is_some()
    );

    cache.clear_pattern("user:*").await?;
    cache.close().await?;
    Ok(())
}
