//! The original README's "Best Practices / 3. Cache Invalidation" snippet in Rust:
//! `update_user` updates the database, then deletes the related keys and clears the
//! `user:{id}:*` pattern, so no reader sees the old data.
//!
//! Runs on the in-process memory backend with a simulated database; with the `redis` feature and
//! `REDIS_URL` set, on Redis (keys under the prefix `ncm-example:`).
//!
//! ```text
//! cargo run -p ncm-cache --example best_practices_invalidation
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ncm_cache::escape_glob;
use ncm_cache::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    name: String,
    email: String,
}

/// Stands in for the database.
#[derive(Debug, Default, Clone)]
struct Database(Arc<Mutex<HashMap<u64, User>>>);

impl Database {
    async fn get_user(&self, user_id: u64) -> Result<Option<User>, std::io::Error> {
        let users = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        Ok(users.get(&user_id).cloned())
    }

    async fn update_user(&self, user_id: u64, data: User) -> Result<(), std::io::Error> {
        let mut users = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        users.insert(user_id, data);
        Ok(())
    }
}

async fn open_cache() -> Result<Cache<Serializer>, Box<dyn std::error::Error>> {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        let redis = RedisCache::builder()
            .url(&url)?
            .key_prefix("ncm-example:")
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

/// `async def update_user(user_id, data)`.
async fn update_user(
    cache: &Cache<Serializer>,
    database: &Database,
    user_id: u64,
    data: User,
) -> Result<(), Box<dyn std::error::Error>> {
    // Update database
    database.update_user(user_id, data).await?;

    // Invalidate related cache entries
    cache.delete(&format!("user:{user_id}")).await?;
    cache.delete(&format!("profile:{user_id}")).await?;
    let id = user_id.to_string();
    let removed = cache
        .clear_pattern(&format!("user:{}:*", escape_glob(&id)))
        .await?;
    println!("update_user({user_id}): deleted user/profile keys, clear_pattern removed {removed}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache = open_cache().await?;
    let database = Database::default();
    let john = User {
        name: "John".into(),
        email: "john@example.com".into(),
    };
    database.update_user(123, john).await?;

    // Readers fill the cache (cache-aside via read_through).
    let db = database.clone();
    let user: Option<User> = cache
        .read_through(
            "user:123",
            || async move { db.get_user(123).await },
            Expiry::Default,
        )
        .await?;
    cache.set("profile:123", &"profile of John").await?;
    cache.set("user:123:orders", &vec![1, 2, 3]).await?;
    cache.set("user:123:cart", &vec![4]).await?;
    println!("cached before the update: {user:?}");

    update_user(
        &cache,
        &database,
        123,
        User {
            name: "John Smith".into(),
            email: "john.smith@example.com".into(),
        },
    )
    .await?;

    for key in [
        "user:123",
        "profile:123",
        "user:123:orders",
        "user:123:cart",
    ] {
        println!("  {key} still cached: {}", cache.exists(key).await?);
    }
    let db = database.clone();
    let user: Option<User> = cache
        .read_through(
            "user:123",
            || async move { db.get_user(123).await },
            Expiry::Default,
        )
        .await?;
    println!("next read reloads the new data: {user:?}");

    cache.delete("user:123").await?;
    cache.close().await?;
    Ok(())
}
