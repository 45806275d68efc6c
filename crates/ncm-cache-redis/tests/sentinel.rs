//! RedisCache through Sentinel survives a failover.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use ncm_cache_redis::RedisCache;
use ncm_cache_testkit::RedisSentinelSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_moves_the_cache_to_the_new_primary() {
    let mut set = RedisSentinelSet::start().unwrap();
    let sentinels: Vec<String> = set.sentinel_addrs().iter().map(|a| a.to_string()).collect();
    let cache = RedisCache::builder()
        .sentinel(set.master_name(), sentinels)
        .health_check_interval(None)
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    cache.set("before", &1).await.unwrap();
    assert_eq!(cache.get::<i32>("before").await.unwrap(), Some(1));

    let old = set.primary_addr().unwrap();
    set.kill_primary().unwrap();
    set.wait_for_failover(Duration::from_secs(30)).unwrap();
    let new = set.primary_addr().unwrap();
    assert_ne!(old, new, "sentinel promoted the replica");

    let start = Instant::now();
    loop {
        match cache.set("after", &2).await {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    e.is_connection() || e.is_timeout(),
                    "typed error during failover: {e:?}"
                );
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "no recovery: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(cache.get::<i32>("after").await.unwrap(), Some(2));
    assert!(cache.health_check().await);
}
