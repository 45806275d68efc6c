//! The original README's "Best Practices / 4. Error Handling" snippet in Rust: `safe_cache_get`
//! reads the cache and falls back to the source when the cache misses *or fails*, logging the
//! error. The failure is demonstrated with a closed backend; with Redis, a dead server gives a
//! connection or timeout error the same way (bounded by `response_timeout`).
//!
//! ```text
//! cargo run -p ncm-cache --example error_handling
//! ```

use std::future::Future;

use ncm_cache::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// `async def safe_cache_get(key, fallback_func)`: never lets a cache failure reach the caller.
async fn safe_cache_get<T, F, Fut>(cache: &Cache<Serializer>, key: &str, fallback: F) -> T
where
    T: Serialize + DeserializeOwned,
    F: FnOnce() -> Fut,
    Fut: Future<Output = T>,
{
    match cache.get::<T>(key).await {
        Ok(Some(value)) => return value,
        Ok(None) => {}
        Err(e) => println!(
            "  logger.error: cache get failed for key {key}: {e} \
             (timeout={}, connection={}, retryable={}, unavailable={})",
            e.is_timeout(),
            e.is_connection(),
            e.is_retryable(),
            e.is_unavailable()
        ),
    }
    // Fallback to source
    let value = fallback().await;
    if let Err(e) = cache.set(key, &value).await {
        println!("  logger.warning: could not cache {key}: {e}");
    }
    value
}

async fn load_from_source(user_id: u64) -> String {
    format!("User {user_id} (from the database)")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache = Cache::new(MemoryBackend::new(), Serializer::default());

    println!("1. cache miss -> source, then cached:");
    let user = safe_cache_get(&cache, "user:123", || load_from_source(123)).await;
    println!("  got {user:?}");
    let user = safe_cache_get(&cache, "user:123", || load_from_source(123)).await;
    println!("  second call (from the cache): {user:?}");

    // Invalid input is an error too, never a panic.
    match cache.get::<String>("").await {
        Err(e) => println!(
            "2. an empty key is rejected: {e} (invalid input: {})",
            e.is_invalid_input()
        ),
        Ok(v) => println!("2. unexpected: {v:?}"),
    }

    println!("3. the cache fails (backend closed) -> source, no error for the caller:");
    cache.close().await?;
    let user = safe_cache_get(&cache, "user:456", || load_from_source(456)).await;
    println!("  got {user:?}");

    // Errors are typed: match on them when the difference matters.
    match cache.get::<String>("user:456").await {
        Err(CacheError::Closed) => println!("4. a direct get now returns CacheError::Closed"),
        Err(other) => println!("4. a direct get now returns {other}"),
        Ok(v) => println!("4. unexpected: {v:?}"),
    }
    println!("errors counted in stats: {}", cache.get_stats().errors);
    Ok(())
}
