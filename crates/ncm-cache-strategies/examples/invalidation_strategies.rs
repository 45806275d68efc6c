//! The original README's invalidation strategies in Rust: time-based, event-based,
//! pattern-based and dependency-based invalidation, plus tags.
//!
//! Runs on the in-process memory backend; with `REDIS_URL` set (and the `redis` feature), on
//! Redis: events reach every instance, the dependency graph is shared, expirations arrive as
//! keyspace notifications.
//!
//! ```text
//! cargo run -p ncm-cache-strategies --example invalidation_strategies
//! ```

use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::Cache;
use ncm_cache_memory::MemoryBackend;
use ncm_cache_strategies::CacheStrategies;
use tokio::sync::mpsc;

async fn strategies() -> Result<CacheStrategies, Box<dyn std::error::Error>> {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        let cache = ncm_cache_redis::RedisCache::from_url(&url).await?;
        println!("on Redis at {url}");
        return Ok(CacheStrategies::from_redis_cache(&cache).await?);
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
    let cache = strategies.cache();
    for key in ["user:123", "user:456", "profile:123", "settings:123"] {
        cache.set(key, &format!("data of {key}")).await?;
    }

    // 1. Time-based invalidation: automatic expiration, then a callback. (The README uses one
    //    hour; 100 ms here.)
    let (expired_tx, mut expired) = mpsc::unbounded_channel();
    let cleanup_callback = move |key: &str| {
        let _ = expired_tx.send(key.to_owned());
    };
    strategies
        .time_based_invalidation("user:123", Duration::from_millis(100), cleanup_callback)
        .await?;
    let key = tokio::time::timeout(Duration::from_secs(5), expired.recv()).await?;
    println!("time-based: {key:?} expired and the callback ran");

    // 2. Event-based invalidation: keys and a callback registered under an event...
    cache.set("user:123", &"John").await?;
    let invalidation_callback = |event: &str, keys: &[String]| {
        println!("event-based: {event:?} invalidated {keys:?}");
    };
    strategies
        .event_based_invalidation(
            "user_updated",
            ["user:123", "user:456"],
            invalidation_callback,
        )
        .await?;
    // ... and the trigger (on Redis it reaches every instance).
    let deleted = strategies
        .trigger_event_invalidation("user_updated")
        .await?;
    println!("event-based: {deleted} keys deleted here");

    // 3. Pattern-based invalidation.
    for key in ["user:1", "user:2", "user:3"] {
        cache.set(key, &key).await?;
    }
    let pattern_callback = |pattern: &str, removed: u64| {
        println!("pattern-based: {removed} keys matched {pattern:?}");
    };
    strategies
        .pattern_based_invalidation("user:*", pattern_callback)
        .await?;

    // 4. Dependency-based invalidation: user:123 depends on its profile and settings.
    cache.set("user:123", &"John").await?;
    strategies
        .dependency_based_invalidation("user:123", ["profile:123", "settings:123"])
        .await?;
    let n = strategies.invalidate_dependencies("profile:123").await?;
    println!(
        "dependency-based: {n} dependent key(s) invalidated; user:123 cached = {}",
        cache.exists("user:123").await?
    );

    // 5. Tags: tag on write, invalidate by tag.
    strategies
        .set_with_tags("user:7", &"Ann", Duration::from_secs(3600), ["team:7"])
        .await?;
    strategies
        .set_with_tags("user:8", &"Bob", Duration::from_secs(3600), ["team:7"])
        .await?;
    println!(
        "tags: {} keys of team:7 invalidated",
        strategies.invalidate_tag("team:7").await?
    );

    println!("{:?}", strategies.invalidation_stats());
    Ok(())
}
