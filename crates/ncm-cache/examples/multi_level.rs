//! The original README's "Multi-Level Cache Usage" and "Advanced Features / Multi-Level Caching"
//! snippets in Rust: a `MultiLevelCache` with the original's options, `set` / `get`, `get` with a
//! loader (`get_or_load`), and writes to one level only (`set_at(.., CacheLevel::L1 / L2)`).
//!
//! L2 is an in-process memory backend here; with the `redis` feature and `REDIS_URL` set, it is
//! Redis (keys under the prefix `ncm-example:`), with the pub/sub backplane that keeps the L1 of
//! every instance coherent.
//!
//! ```text
//! cargo run -p ncm-cache --features multilevel --example multi_level
//! ```

use std::time::Duration;

use ncm_cache::ValueSource;
use ncm_cache::multilevel::MultiLevelBuilder;
use ncm_cache::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    name: String,
    price: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

/// Stands in for `database.get_user(user_id)`.
async fn load_user(user_id: u64) -> Result<User, std::io::Error> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(User {
        id: user_id,
        name: format!("User {user_id}"),
    })
}

/// `l2_cache = RedisSyncCache(host="localhost", port=6379, db=0)` (or the memory backend).
async fn l2_builder() -> Result<MultiLevelBuilder, Box<dyn std::error::Error>> {
    #[cfg(feature = "redis")]
    if let Ok(url) = std::env::var("REDIS_URL") {
        let redis = RedisCache::builder()
            .url(&url)?
            .key_prefix("ncm-example:")
            .build()
            .await?;
        println!("L2 is Redis at {url} (with the L1 backplane)");
        return Ok(MultiLevelCache::builder(redis.backend())
            .backplane(std::sync::Arc::clone(redis.redis_backend())));
    }
    println!("L2 is an in-process memory backend (set REDIS_URL and enable `redis` for Redis)");
    Ok(MultiLevelCache::builder(MemoryBackend::new()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // multi_cache = MultiLevelCache(l2_cache=l2_cache, l1_max_size=1000, l1_default_ttl=300,
    //     l2_default_ttl=3600, enable_promotion=True, enable_stampede_prevention=True,
    //     promotion_threshold=2)
    let multi_cache = l2_builder()
        .await?
        .name("example")
        .l1_max_size(1000)
        .l1_default_ttl(Duration::from_secs(300)) // 5 minutes
        .l2_default_ttl(Duration::from_secs(3600)) // 1 hour
        .enable_promotion(true)
        .enable_stampede_prevention(true)
        .promotion_threshold(2)
        .build()?;

    // await multi_cache.set("product:456", {"name": "Laptop", "price": 999.99})
    let laptop = Product {
        name: "Laptop".into(),
        price: 999.99,
    };
    multi_cache.set("product:456", laptop.clone()).await?;
    // product = await multi_cache.get("product:456")
    let product: Option<Product> = multi_cache.get("product:456").await?;
    println!("get(\"product:456\") = {product:?}");

    // user = await multi_cache.get("user:123", loader=lambda: load_user(123))
    let (user, source) = multi_cache
        .get_or_load_with_source("user:123", || load_user(123))
        .await?;
    println!("get_or_load(\"user:123\") = {user:?} from {source:?}");
    let (_, source) = multi_cache
        .get_or_load_with_source("user:123", || load_user(123))
        .await?;
    println!("second get_or_load(\"user:123\") came from {source:?}");

    // Stampede prevention: 10 concurrent callers, one loader run.
    let loads_before = multi_cache.get_stats().loads;
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let cache = multi_cache.clone();
            tokio::spawn(async move { cache.get_or_load("user:999", || load_user(999)).await })
        })
        .collect();
    for call in calls {
        call.await??;
    }
    println!(
        "10 concurrent get_or_load(\"user:999\") ran the loader {} time(s)",
        multi_cache.get_stats().loads - loads_before
    );

    // await multi_cache.set("user:456", user_data, level=CacheLevel.L1)
    // await multi_cache.set("user:789", user_data, level=CacheLevel.L2)
    let user_data = load_user(456).await?;
    multi_cache
        .set_at("user:456", user_data.clone(), CacheLevel::L1)
        .await?;
    multi_cache
        .set_at("user:789", user_data, CacheLevel::L2)
        .await?;
    for key in ["user:456", "user:789"] {
        let found = multi_cache.get_with_source::<User>(key).await?;
        let source = found.map(|(_, s)| s);
        println!("get_with_source({key:?}) answered by {source:?}");
    }
    // promotion_threshold = 2: the second L2 hit copies the value into L1.
    let source = multi_cache
        .get_with_source::<User>("user:789")
        .await?
        .map(|(_, s)| s);
    let promoted = multi_cache
        .get_with_source::<User>("user:789")
        .await?
        .map(|(_, s)| s);
    println!("after two L2 reads of \"user:789\": {source:?}, then {promoted:?}");
    if promoted != Some(ValueSource::L1) {
        println!("(not promoted: L1 may be bypassed while the backplane reconnects)");
    }

    let stats = multi_cache.get_stats();
    println!(
        "stats: l1_hits {}, l2_hits {}, misses {}, loads {}, promotions {}, L1 entries {}",
        stats.l1_hits,
        stats.l2_hits,
        stats.misses,
        stats.loads,
        stats.promotions,
        multi_cache.l1_len()
    );

    for key in [
        "product:456",
        "user:123",
        "user:999",
        "user:456",
        "user:789",
    ] {
        multi_cache.delete(key).await?;
    }
    multi_cache.close().await?;
    Ok(())
}
