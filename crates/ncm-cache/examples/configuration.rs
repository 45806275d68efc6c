//! The original README's "Configuration" section in Rust: `RedisConfig` with every option of the
//! "Redis Configuration" and "Connection Pooling" snippets (built, validated and printed, not
//! connected), the same configuration from a URL, the "Cache Loader Configuration" and the
//! "SQL Cache Configuration" snippets.
//!
//! Nothing connects to Redis unless `REDIS_URL` is set; the loader and the SQL cache run on the
//! in-process memory backend and an in-memory SQLite database.
//!
//! ```text
//! cargo run -p ncm-cache --features redis,loader,sqlite --example configuration
//! ```

use std::time::Duration;

use ncm_cache::loader::CacheLoader;
use ncm_cache::prelude::*;
use ncm_cache::redis::{KeepaliveOptions, RedisCacheBuilder};
use ncm_cache::sql::{SqlCache, SqliteExecutor};

/// `RedisCache(host="localhost", port=6379, db=0, password="your_password", max_connections=20,
/// retry_on_timeout=True, socket_keepalive=True, health_check_interval=30, key_prefix="ncm:",
/// default_ttl=3600, serialization=SerializationType.JSON, compression=True,
/// strategy=CacheStrategy.CACHE_ASIDE)` plus the connection-pooling snippet's
/// `socket_keepalive_options={"TCP_KEEPIDLE": 1, "TCP_KEEPINTVL": 3, "TCP_KEEPCNT": 5}`.
fn redis_builder() -> RedisCacheBuilder {
    let keepalive = KeepaliveOptions {
        idle: Some(Duration::from_secs(1)),     // TCP_KEEPIDLE
        interval: Some(Duration::from_secs(3)), // TCP_KEEPINTVL
        count: Some(5),                         // TCP_KEEPCNT
    };
    RedisCache::builder()
        .host("localhost")
        .port(6379)
        .db(0)
        .password("your_password")
        .max_connections(20)
        .retry_on_timeout(true)
        .socket_keepalive(true)
        .socket_keepalive_options(keepalive)
        .health_check_interval(Duration::from_secs(30))
        .key_prefix("ncm:")
        .default_ttl(Duration::from_secs(3600))
        .serialization(SerializationType::Json)
        .compression(true) // LZ4 for values of at least `compression_threshold` bytes
        .strategy(CacheStrategy::CacheAside)
        // Beyond the original: every call is bounded by these.
        .connect_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(1))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // --- Redis Configuration -------------------------------------------------------------
    let builder = redis_builder();
    let config = builder.as_config();
    config.validate()?;
    println!("RedisConfig (Debug redacts the password): {config:?}");
    println!(
        "  also set: retry_on_timeout={}, socket_keepalive={}, keepalive={:?}, \
         health_check_interval={:?}, strategy={:?}, compression algorithm={}, threshold={} bytes",
        config.retry_on_timeout,
        config.socket_keepalive,
        config.socket_keepalive_options,
        config.health_check_interval,
        config.strategy,
        config.compression.algorithm(),
        config.compression_threshold,
    );

    // The same settings as a URL (serde works too: see docs/configuration.md).
    let from_url = RedisConfig::from_url(
        "redis://:your_password@localhost:6379/0?key_prefix=ncm:&default_ttl=1h\
         &max_connections=20&health_check_interval=30s&serialization=json&compression=true",
    )?;
    println!(
        "from_url: host={} port={} db={} key_prefix={:?} default_ttl={:?} max_connections={} \
         compression={:?}",
        from_url.host,
        from_url.port,
        from_url.db,
        from_url.key_prefix,
        from_url.default_ttl,
        from_url.max_connections,
        from_url.compression
    );

    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        // Connect for real: the URL gives the server, the rest comes from the snippet.
        let live = RedisCache::builder()
            .url(&url)?
            .key_prefix("ncm-example:")
            .max_connections(4)
            .compression(true)
            .build()
            .await?;
        println!(
            "connected to {url}: health_check = {}",
            live.health_check().await
        );
        live.close().await?;
    }

    // --- Cache Loader Configuration ------------------------------------------------------
    // loader = CacheLoader(redis_cache, default_ttl=3600, enable_metrics=True, enable_logging=True)
    let cache = Cache::new(MemoryBackend::new(), Serializer::default());
    let loader = CacheLoader::builder(cache.clone())
        .default_ttl(Duration::from_secs(3600))
        .enable_metrics(true)
        .enable_logging(true)
        .build()?;
    println!(
        "CacheLoader: default_ttl={:?} ({loader:?})",
        loader.default_ttl()
    );

    // --- SQL Cache Configuration ---------------------------------------------------------
    // sql_cache = SQLCache(redis_cache, default_ttl=1800, max_query_size=1024 * 1024,
    //                      enable_query_logging=True, enable_performance_monitoring=True)
    let database = SqliteExecutor::memory().await?;
    let sql_cache = SqlCache::builder(cache.clone(), database)
        .default_ttl(Duration::from_secs(1800))
        .max_query_size(1024 * 1024) // 1 MiB
        .enable_query_logging(true)
        .enable_performance_monitoring(true)
        .build()?;
    println!("SqlCache: {sql_cache:?}");

    cache.close().await?;
    Ok(())
}
