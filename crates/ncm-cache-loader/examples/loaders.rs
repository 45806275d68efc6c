//! The original README's "Cache Loaders" section in Rust: register + load, the function and
//! method decorators (attribute macros), cache warming, background warming, loader stats and
//! health.
//!
//! Runs on the in-process memory backend; with `--features redis` and `REDIS_URL` set, on Redis.
//!
//! ```text
//! cargo run -p ncm-cache-loader --example loaders
//! ```

use std::sync::OnceLock;
use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheError, CacheStrategy};
use ncm_cache_loader::{CacheLoader, WarmConfig, cache_loader, cache_method};
use ncm_cache_memory::MemoryBackend;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserData {
    id: u64,
    name: String,
    email: String,
}

/// Stands in for a database.
mod database {
    use std::time::Duration;

    use super::UserData;

    pub(crate) async fn get_user(user_id: u64) -> Result<UserData, std::io::Error> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(UserData {
            id: user_id,
            name: format!("User {user_id}"),
            email: format!("user{user_id}@example.com"),
        })
    }

    pub(crate) async fn get_user_by_email(email: &str) -> Result<UserData, std::io::Error> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(UserData {
            id: 1,
            name: "John".into(),
            email: email.into(),
        })
    }
}

/// The loader the decorated functions cache through.
static LOADER: OnceLock<CacheLoader> = OnceLock::new();

fn loader() -> &'static CacheLoader {
    LOADER.get_or_init(|| CacheLoader::new(Cache::new(MemoryBackend::new(), Serializer::default())))
}

/// `@loader.cache_loader(ttl=3600, strategy=CacheStrategy.READ_THROUGH)`
#[cache_loader(loader = loader(), ttl = "1h", strategy = ReadThrough)]
async fn get_user_profile(user_id: u64) -> Result<UserData, std::io::Error> {
    database::get_user(user_id).await
}

struct UserService {
    loader: CacheLoader,
}

impl UserService {
    /// `@loader.cache_method(ttl=1800, strategy=CacheStrategy.CACHE_ASIDE)`
    #[cache_method(loader = self.loader, ttl = 1800, strategy = CacheAside)]
    async fn get_user_by_email(&self, email: &str) -> Result<UserData, std::io::Error> {
        database::get_user_by_email(email).await
    }
}

#[cfg(feature = "redis")]
async fn redis_cache() -> Result<Option<Cache<Serializer>>, CacheError> {
    let Ok(url) = std::env::var("REDIS_URL") else {
        return Ok(None);
    };
    let cache = ncm_cache_redis::RedisCache::builder()
        .url(&url)?
        .key_prefix("ncm-example:loaders:")
        .build()
        .await?;
    Ok(Some(cache.cache().clone()))
}

#[cfg(not(feature = "redis"))]
async fn redis_cache() -> Result<Option<Cache<Serializer>>, CacheError> {
    Ok(None)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let on_redis = if let Some(cache) = redis_cache().await? {
        println!("using Redis at $REDIS_URL");
        let _ = LOADER.set(
            CacheLoader::builder(cache)
                .default_ttl(Duration::from_secs(3600))
                .enable_metrics(true)
                .enable_logging(true)
                .build()?,
        );
        true
    } else {
        false
    };
    let loader = loader();

    // Basic cache loading: loader.register_loader("user_data", load_user_data, ttl=3600, ...)
    loader.register_loader(
        "user_data",
        |user_id: u64| async move { database::get_user(user_id).await },
        Duration::from_secs(3600),
        CacheStrategy::CacheAside,
    )?;
    let user: UserData = loader.load("user_data", 123u64).await?;
    println!("loaded: {user:?}");
    let again: UserData = loader.load("user_data", 123u64).await?;
    println!("from the cache: {again:?}");

    // The decorators.
    let profile = get_user_profile(123).await?;
    let profile_again = get_user_profile(123).await?;
    println!("profile: {} / {}", profile.name, profile_again.name);
    let service = UserService {
        loader: loader.clone(),
    };
    let user = service.get_user_by_email("john@example.com").await?;
    let _ = service.get_user_by_email("john@example.com").await?;
    println!("by email: {user:?}");

    // Cache warming: loader.warm_cache(warming_config, concurrency=5)
    let warming_config = vec![
        WarmConfig::new("user_data", 123),
        WarmConfig::new("user_data", 456),
    ];
    for result in loader.warm_cache(warming_config.clone(), 5).await {
        println!(
            "warmed {} {:?}: {:?} in {:?}",
            result.name, result.key, result.outcome, result.elapsed
        );
    }

    // Background warming, with a progress hook.
    loader.on_warm_progress(|p| {
        if p.completed == p.total {
            println!(
                "background round {}: {} entries, {} failed",
                p.round, p.total, p.failed
            );
        }
    });
    loader
        .start_background_warming(warming_config, Duration::from_millis(200), 5)
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    loader.stop_background_warming().await;
    println!(
        "background warming stopped after {} rounds",
        loader.warming_rounds()
    );

    // Loader stats and health.
    let loader_stats = loader.get_loader_stats();
    println!(
        "Loader hit rate: {:.2}%",
        loader_stats.overall_hit_rate * 100.0
    );
    for (name, s) in &loader_stats.loaders {
        println!(
            "  {name}: {} calls, {} hits, {} misses, {} errors, mean load {:?}",
            s.calls, s.hits, s.misses, s.errors, s.mean_load_time
        );
    }
    let health = loader.get_health_status().await;
    println!("Loader healthy: {}", health.is_healthy);
    if on_redis {
        let cleared = loader.cache().clear_pattern("loader:*").await?;
        println!("removed {cleared} example keys from Redis");
    }
    Ok(())
}
