//! RedisCache through Sentinel survives a failover.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use ncm_cache_redis::RedisCache;
use ncm_cache_testkit::RedisSentinelSet;

/// A cache on `set`'s primary through its sentinels, with 500 ms timeouts and no health loop.
async fn connect(set: &RedisSentinelSet) -> RedisCache {
    let sentinels: Vec<String> = set.sentinel_addrs().iter().map(|a| a.to_string()).collect();
    RedisCache::builder()
        .sentinel(set.master_name(), sentinels)
        .health_check_interval(None)
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_moves_the_cache_to_the_new_primary() {
    let mut set = RedisSentinelSet::start().unwrap();
    let cache = connect(&set).await;
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

/// The sentinels stop answering (paused: they accept connections, never reply) just as the
/// primary drops this client's connection: every call must re-resolve the primary. Before,
/// callers took the resolution lock one after another and each tried again after the one
/// before it had failed — the last of 16 concurrent calls waited about 16 × 2 ×
/// `connect_timeout` (found by review). Now one resolution runs at a time and callers that
/// waited while it failed share its failure: each call ends within about two resolutions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresponsive_sentinels_cost_each_call_a_bounded_wait() {
    let set = RedisSentinelSet::start().unwrap();
    let sentinels: Vec<String> = set.sentinel_addrs().iter().map(|a| a.to_string()).collect();
    let bound = Duration::from_millis(300);
    let cache = RedisCache::builder()
        .sentinel(set.master_name(), sentinels)
        .health_check_interval(None)
        .connect_timeout(bound)
        .response_timeout(bound)
        .build()
        .await
        .unwrap();
    cache.set("k", &1).await.unwrap();
    let primary = set.primary_addr().unwrap();
    let server = set
        .servers()
        .iter()
        .find(|s| s.addr() == primary)
        .expect("the primary is one of the set's servers");
    for s in set.sentinels() {
        s.pause().unwrap();
    }
    server
        .command(&["CLIENT", "KILL", "TYPE", "normal"])
        .unwrap();
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let r = cache.exists("k").await;
                (start.elapsed(), r.is_ok())
            })
        })
        .collect();
    let mut took = Vec::new();
    for c in calls {
        took.push(c.await.unwrap().0);
    }
    for s in set.sentinels() {
        s.resume().unwrap();
    }
    let longest = took.iter().max().copied().unwrap_or_default();
    // Two tries (a timeout is retried), each at most one resolution under way plus its own
    // (2 × 2 × 300 ms), and slack for a loaded machine.
    assert!(
        longest < Duration::from_millis(3500),
        "a call waited {longest:?} (all: {took:?})"
    );
}

/// The primary closes connections idle for a second (`timeout 1`, or a load balancer's idle
/// timeout). After each idle spell the next write — not resent after a lost connection, since
/// it may have landed — and the next read still reach Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_primary_closed_the_idle_connection_reaches_redis() {
    let set = RedisSentinelSet::start().unwrap();
    for s in set.servers() {
        s.command(&["CONFIG", "SET", "timeout", "1"]).unwrap();
    }
    let cache = connect(&set).await;
    cache.set("k", &0).await.unwrap();
    for round in 1..=2 {
        // Redis checks each client's idle time about once a second.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        cache
            .set("k", &round)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the write after an idle close failed: {e}"));
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let read = cache.get::<i32>("k").await;
        assert_eq!(read.unwrap(), Some(round));
    }
}

/// A primary without `HELLO` (before Redis 6; here renamed away) gets RESP2 on the cache's
/// connection, and the cache works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_hello_gets_resp2() {
    let set = RedisSentinelSet::start_with_data_args(&["--rename-command", "HELLO", ""]).unwrap();
    let cache = connect(&set).await;
    cache.set("k", &1).await.unwrap();
    assert_eq!(cache.get::<i32>("k").await.unwrap(), Some(1));
    assert!(cache.delete("k").await.unwrap());
}
