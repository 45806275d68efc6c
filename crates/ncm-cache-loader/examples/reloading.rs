//! The original README's "Cache Reloading" section in Rust: a `CacheReloader` with a lazy
//! loader, a reload callback, a scheduled reload and a forced manual reload, plus the eager and
//! refresh-ahead strategies.
//!
//! Runs on the in-process memory backend; with `--features redis` and `REDIS_URL` set, on Redis
//! with cross-instance leases (run it twice at once: each tick reloads on one of them).
//!
//! ```text
//! cargo run -p ncm-cache-loader --example reloading
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheError};
use ncm_cache_loader::{CacheReloader, ReloadStrategy};
use ncm_cache_memory::MemoryBackend;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FreshData {
    timestamp: u128,
    data: String,
}

/// `async def load_fresh_data(): return {"timestamp": ..., "data": "Fresh data"}`
async fn load_fresh_data() -> Result<FreshData, std::io::Error> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    Ok(FreshData {
        timestamp,
        data: "Fresh data".into(),
    })
}

#[cfg(feature = "redis")]
async fn reloader() -> Result<CacheReloader, CacheError> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        println!("using Redis at $REDIS_URL with cross-instance leases");
        let cache = ncm_cache_redis::RedisCache::builder()
            .url(&url)?
            .key_prefix("ncm-example:reloading:")
            .build()
            .await?;
        return Ok(CacheReloader::redis(&cache).build());
    }
    Ok(CacheReloader::new(memory_cache()))
}

#[cfg(not(feature = "redis"))]
async fn reloader() -> Result<CacheReloader, CacheError> {
    Ok(CacheReloader::new(memory_cache()))
}

fn memory_cache() -> Cache<Serializer> {
    Cache::new(MemoryBackend::new(), Serializer::default())
}

#[tokio::main]
async fn main() -> Result<(), CacheError> {
    // reloader = CacheReloader(cache)
    let reloader = reloader().await?;

    // reloader.register_loader("fresh_data", load_fresh_data, ttl=300, strategy=ReloadStrategy.LAZY)
    reloader.register_loader(
        "fresh_data",
        load_fresh_data,
        Duration::from_secs(300),
        ReloadStrategy::Lazy,
    )?;

    // reloader.add_reload_callback("fresh_data", reload_callback)
    reloader.add_reload_callback("fresh_data", |key: &str, value: &FreshData| {
        println!("Reloaded {key}: {value:?}");
    })?;

    let first: FreshData = reloader.get("fresh_data").await?;
    println!("first read (lazy load): {first:?}");

    // await reloader.schedule_reload("fresh_data", interval=60, loader=load_fresh_data)
    // (every 250 ms here, so the example finishes quickly)
    reloader
        .schedule_reload("fresh_data", Duration::from_millis(250), load_fresh_data)
        .await?;
    tokio::time::sleep(Duration::from_millis(800)).await;

    // await reloader.reload_key("fresh_data", force=True)
    let reloaded = reloader.reload_key("fresh_data", true).await?;
    println!("manual reload ran: {reloaded}");

    // Eager: reloaded before every expiry, so readers never wait for a load.
    reloader.register_loader(
        "config",
        || async {
            Ok::<_, std::io::Error>(vec!["feature-a".to_string(), "feature-b".to_string()])
        },
        Duration::from_millis(500),
        ReloadStrategy::Eager,
    )?;
    // Refresh-ahead: a read late in the TTL returns at once and refreshes in the background.
    reloader.register_loader(
        "rates",
        || async { Ok::<_, std::io::Error>(1.0825_f64) },
        Duration::from_secs(1),
        ReloadStrategy::refresh_ahead(),
    )?;
    for _ in 0..8 {
        let config: Vec<String> = reloader.get("config").await?;
        let rate: f64 = reloader.get("rates").await?;
        println!("config {config:?}, rate {rate}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    reloader.shutdown().await;
    for (name, stats) in reloader.get_stats() {
        println!(
            "{name}: {} reads, {} misses, {} reloads, {} refresh-ahead, {} timer ticks",
            stats.reads, stats.misses, stats.reloads, stats.refresh_ahead, stats.owned_ticks
        );
    }
    Ok(())
}
