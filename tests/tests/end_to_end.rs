//! Across crates, through the umbrella: the same data seen by a typed Redis cache, a
//! multi-level cache over it, and the conformance suite on the embedded default.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use ncm_cache::prelude::*;
use ncm_cache::{SerializationType, ValueSource};
use ncm_cache_testkit::RedisServer;
use ncm_cache_testkit::conformance::{self, ManualTime};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    name: String,
    price: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_passes_the_conformance_suite() {
    let clock = ncm_cache_core::ManualClock::new();
    let backend = MemoryBackend::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .build()
        .unwrap();
    conformance::run(Arc::new(backend), &ManualTime(clock)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multilevel_cache_and_a_typed_cache_share_redis() {
    let server = RedisServer::start().unwrap();
    let redis = RedisCache::builder()
        .url(&server.url())
        .unwrap()
        .key_prefix("shop:")
        .serialization(SerializationType::MsgPack)
        .health_check_interval(None)
        .build()
        .await
        .unwrap();
    let products = MultiLevelCache::builder(redis.backend())
        .name("products")
        .backplane(Arc::clone(redis.redis_backend()))
        .build()
        .unwrap();
    // L1 is bypassed until the backplane is subscribed (never serve what it could not hear).
    let start = std::time::Instant::now();
    while !products.l1_active() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "backplane never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let laptop = Product {
        name: "Laptop".into(),
        price: 999.99,
    };
    // Written through the multi-level cache (JSON envelope), read by the MsgPack-configured
    // typed cache: the envelope says what it is.
    products.set("product:456", laptop.clone()).await.unwrap();
    assert_eq!(
        redis.get::<Product>("product:456").await.unwrap(),
        Some(laptop.clone())
    );
    // Written by the typed cache, read through the multi-level cache (L2 then L1).
    redis.set("product:789", &laptop).await.unwrap();
    let (_, first) = products
        .get_with_source::<Product>("product:789")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, ValueSource::L2);
    let (_, second) = products
        .get_with_source::<Product>("product:789")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second, ValueSource::L1);
    // Everything lives under the prefix.
    let keys = server.cli(&["--scan", "--pattern", "*"]).unwrap();
    assert!(keys.lines().all(|k| k.starts_with("shop:")), "{keys}");
    assert!(redis.get_ttl("product:456").await.unwrap().unwrap() <= Duration::from_secs(3600));
}
