//! The original README's "Performance Monitoring" (cache statistics, health monitoring),
//! "Monitoring and Alerting" and "Troubleshooting" snippets in Rust: `get_stats()` (hit rate,
//! total requests, errors, memory usage), `health_check()` / `health_report()`, and the
//! original's alert thresholds (hit rate < 80 %, errors > 100, memory usage, hit rate < 50 %).
//!
//! Runs on the in-process memory backend; with the `redis` feature and `REDIS_URL` set, on Redis
//! (keys under the prefix `ncm-example:`). Every number shown is also emitted through the
//! `metrics` crate (`ncm_cache_operations_total`, `ncm_cache_memory_bytes`, ...).
//!
//! ```text
//! cargo run -p ncm-cache --example monitoring
//! ```

use std::time::Duration;

use ncm_cache::prelude::*;

async fn open_cache() -> Result<Cache<Serializer>, Box<dyn std::error::Error>> {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        let redis = RedisCache::builder()
            .url(&url)?
            .key_prefix("ncm-example:")
            .name("monitoring-example")
            .build()
            .await?;
        println!("on Redis at {url}");
        return Ok(redis.cache().clone());
    }
    println!("on the in-process memory backend (set REDIS_URL and enable `redis` for Redis)");
    let backend = MemoryBackend::builder()
        .name("monitoring-example")
        .max_entries(10_000)
        .max_bytes(16 * 1024 * 1024)
        .build()?;
    Ok(Cache::builder(backend, Serializer::default())
        .default_ttl(Duration::from_secs(300))
        .build())
}

/// `async def monitor_cache_performance()` from "Best Practices / 5. Monitoring and Alerting",
/// plus the "Troubleshooting" checks. Returns the alerts raised.
fn monitor_cache_performance(stats: &ncm_cache::CacheStats, memory_threshold: u64) -> Vec<String> {
    let mut alerts = Vec::new();
    if stats.hit_rate < 0.8 {
        // 80% hit rate threshold
        alerts.push(format!(
            "WARNING low cache hit rate: {:.2}%",
            stats.hit_rate * 100.0
        ));
    }
    if stats.errors > 100 {
        // Error threshold
        alerts.push(format!("ERROR high cache error count: {}", stats.errors));
    }
    if stats
        .memory_usage
        .is_some_and(|bytes| bytes > memory_threshold)
    {
        alerts.push("WARNING high cache memory usage".to_owned());
    }
    if stats.hit_rate < 0.5 {
        alerts.push("WARNING low cache hit rate (< 50%)".to_owned());
    }
    alerts
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache = open_cache().await?;

    // Some traffic: 20 writes, 30 hits, 10 misses.
    for i in 0..20 {
        cache
            .set(&format!("item:{i}"), &format!("value {i}"))
            .await?;
    }
    for i in 0..40 {
        let _: Option<String> = cache.get(&format!("item:{}", i % 30)).await?;
    }

    // stats = cache.get_stats()
    let stats = cache.get_stats();
    println!("Hit rate: {:.2}%", stats.hit_rate * 100.0);
    println!("Total requests: {}", stats.total_requests);
    println!(
        "hits {}, misses {}, sets {}, errors {}, entries {:?}, memory_usage {:?} bytes",
        stats.hits, stats.misses, stats.sets, stats.errors, stats.entries, stats.memory_usage
    );
    if let Some(latency) = stats.latency {
        println!(
            "latency: p50 {:?}, p99 {:?}, max {:?}",
            latency.p50, latency.p99, latency.max
        );
    }

    // is_healthy = await cache.health_check()
    let is_healthy = cache.health_check().await;
    println!("Cache healthy: {is_healthy}");
    if !is_healthy {
        println!("ERROR cache connection failed");
    }
    let report = cache.health_report().await;
    println!(
        "health_report: healthy={} backend={} latency={:?} detail={:?}",
        report.healthy, report.backend, report.latency, report.detail
    );

    // The original's thresholds (memory threshold: 1 MiB for this example).
    let alerts = monitor_cache_performance(&stats, 1024 * 1024);
    if alerts.is_empty() {
        println!("monitor_cache_performance: no alerts");
    }
    for alert in &alerts {
        println!("monitor_cache_performance: {alert}");
    }

    let removed = cache.clear_pattern("item:*").await?;
    println!("cleaned up {removed} keys");
    cache.close().await?;
    Ok(())
}
