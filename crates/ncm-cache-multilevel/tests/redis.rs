//! MultiLevelCache on real Redis: coherence across instances, backplane cuts, the distributed
//! stampede lock, and fail-safe through a Redis outage.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ncm_cache_core::ValueSource;
use ncm_cache_multilevel::MultiLevelCache;
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;

type Io = std::io::Error;

fn config(server: &RedisServer) -> RedisConfig {
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.response_timeout = Duration::from_millis(300);
    c.connect_timeout = Duration::from_millis(300);
    c.health_check_interval = Some(Duration::from_millis(100));
    c
}

async fn instance(server: &RedisServer) -> MultiLevelCache {
    let redis = RedisCache::connect(config(server)).await.unwrap();
    let cache = MultiLevelCache::builder(redis.backend())
        .name("users")
        .backplane(Arc::clone(redis.redis_backend()))
        .build()
        .unwrap();
    wait_active(&cache).await;
    cache
}

async fn wait_active(cache: &MultiLevelCache) {
    let start = Instant::now();
    while !cache.l1_active() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "backplane never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads until `cache` serves `key` from its L1 (a late invalidation may evict a fresh copy once).
async fn until_l1(cache: &MultiLevelCache, key: &str) {
    let start = Instant::now();
    while cache.get_with_source::<u64>(key).await.unwrap().unwrap().1 != ValueSource::L1 {
        assert!(start.elapsed() < Duration::from_secs(1), "L1 never used");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Polls `b` until it returns `want`; returns how long that took after the write returned.
async fn until_seen(b: &MultiLevelCache, key: &str, want: u64) -> Duration {
    let start = Instant::now();
    loop {
        if b.get::<u64>(key).await.unwrap() == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "B kept serving an old value"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// A message on the backplane channel carrying a pattern entry of a million `?` (a hostile or
/// broken publisher): the listener neither dies nor spends seconds compiling it, and a later
/// write on another instance still evicts B's L1. Before (review, helper-83 #1), compiling the
/// pattern panicked inside globset and the listener task died: B served its L1 copy for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_pattern_on_the_backplane_does_not_stop_the_listener() {
    let server = RedisServer::start().unwrap();
    let (a, b) = (instance(&server).await, instance(&server).await);
    a.set("user:1", 1u64).await.unwrap();
    until_seen(&b, "user:1", 1).await;
    until_l1(&b, "user:1").await;
    let pattern = "?".repeat(1_000_000);
    let mut frame = vec![b'B'];
    frame.extend_from_slice(&7u64.to_le_bytes());
    frame.push(b'P');
    frame.extend_from_slice(&u32::try_from(pattern.len()).unwrap().to_le_bytes());
    frame.extend_from_slice(pattern.as_bytes());
    let publisher = RedisCache::connect(config(&server)).await.unwrap();
    assert_eq!(
        publisher
            .redis_backend()
            .publish("l1:users", &frame)
            .await
            .unwrap(),
        2,
        "both instances listen"
    );
    // Heard (the pattern is refused), then a real write on A.
    let start = Instant::now();
    while b.get_stats().backplane_received == 0 {
        assert!(start.elapsed() < Duration::from_secs(2), "never heard");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    until_l1(&b, "user:1").await;
    a.set("user:1", 2u64).await.unwrap();
    let waited = until_seen(&b, "user:1", 2).await;
    assert!(
        waited < Duration::from_millis(500),
        "the listener was busy for {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_instance_evicts_the_others_l1() {
    let server = RedisServer::start().unwrap();
    let (a, b) = (instance(&server).await, instance(&server).await);
    let mut windows = Vec::new();
    for v in 0..50u64 {
        a.set("user:1", v).await.unwrap();
        windows.push(until_seen(&b, "user:1", v).await);
        // B serves it from L1 again; the next write on A must evict it there.
        until_l1(&b, "user:1").await;
    }
    windows.sort();
    let p99 = windows[windows.len() * 99 / 100 - 1];
    assert!(p99 < Duration::from_millis(250), "stale window p99 {p99:?}");
    assert!(b.get_stats().backplane_received >= 50);
    // An instance ignores its own messages: A's L1 keeps its own write.
    assert_eq!(
        a.get_with_source::<u64>("user:1").await.unwrap().unwrap().1,
        ValueSource::L1
    );
    a.delete("user:1").await.unwrap();
    let start = Instant::now();
    while b.get::<u64>("user:1").await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "delete not propagated"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_backplane_cut_no_value_older_than_the_last_write_is_served() {
    let server = RedisServer::start().unwrap();
    let (a, b) = (instance(&server).await, instance(&server).await);
    a.set("k", 1u64).await.unwrap();
    until_seen(&b, "k", 1).await;
    until_l1(&b, "k").await;
    // Cut every pub/sub connection, and write while B cannot hear.
    server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    a.set("k", 2u64).await.unwrap();
    let start = Instant::now();
    loop {
        let v = b.get::<u64>("k").await.unwrap();
        assert!(v == Some(1) || v == Some(2));
        if v == Some(2) {
            break;
        }
        // Until B notices the cut it may serve its L1 copy; it must not for long.
        assert!(
            start.elapsed() < Duration::from_millis(3000),
            "old value served after the cut"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Once the backplane is back, B never serves the old value again.
    wait_active(&b).await;
    for _ in 0..50 {
        assert_eq!(b.get::<u64>("k").await.unwrap(), Some(2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_instances_times_250_callers_run_the_loader_once() {
    let server = RedisServer::start().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut caches = Vec::new();
    for _ in 0..4 {
        let redis = RedisCache::connect(config(&server)).await.unwrap();
        caches.push(
            MultiLevelCache::builder(redis.backend())
                .distributed_lock(
                    Arc::clone(redis.redis_backend()),
                    Duration::from_secs(5),
                    Duration::from_secs(5),
                )
                .build()
                .unwrap(),
        );
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = Vec::new();
    for cache in &caches {
        for _ in 0..250 {
            let (cache, runs, barrier) = (cache.clone(), runs.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                cache
                    .get_or_load("report", move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, Io>(7u64)
                    })
                    .await
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 7);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the loader ran once across four instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_serves_stale_then_loads_and_recovers() {
    let mut server = RedisServer::start().unwrap();
    let redis = RedisCache::connect(config(&server)).await.unwrap();
    let cache = MultiLevelCache::builder(redis.backend())
        .l1_default_ttl(Duration::from_millis(200))
        .fail_safe(Duration::from_secs(30))
        .breaker_cooldown(Duration::from_millis(200))
        .build()
        .unwrap();
    cache
        .get_or_load("k", || async { Ok::<_, Io>(1u64) })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await; // stale in L1 now
    server.kill();
    // Redis down and the loader failing: the stale value, marked stale.
    let (v, src) = cache
        .get_or_load_with_source::<u64, _, _, _>("k", || async { Err(Io::other("db down too")) })
        .await
        .unwrap();
    assert_eq!((*v, src), (1, ValueSource::Stale));
    // Redis down, loader fine: the loader's value.
    let (v, src) = cache
        .get_or_load_with_source("k", || async { Ok::<_, Io>(2u64) })
        .await
        .unwrap();
    assert_eq!((*v, src), (2, ValueSource::Loader));
    assert!(cache.get_stats().l2_errors > 0);

    server.restart().unwrap();
    let start = Instant::now();
    loop {
        cache.clear_l1();
        let r = cache
            .get_or_load_with_source("k2", || async { Ok::<_, Io>(3u64) })
            .await;
        if let Ok((_, ValueSource::Loader)) = &r
            && redis.get::<u64>("k2").await.ok().flatten() == Some(3)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "L2 not used again: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cache.clear_l1();
    assert_eq!(
        cache.get_with_source::<u64>("k2").await.unwrap().unwrap().1,
        ValueSource::L2
    );
}

/// An idle backplane stays connected: its keep-alive pings must not be mistaken for failures
/// (Redis answers PING on a subscribed connection with an array, not a string), or L1 would be
/// cleared and bypassed every interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_backplane_stays_connected_and_keeps_l1() {
    let server = RedisServer::start().unwrap();
    let cache = instance(&server).await;
    cache.set("warm", 1u64).await.unwrap();
    assert_eq!(
        cache
            .get_with_source::<u64>("warm")
            .await
            .unwrap()
            .unwrap()
            .1,
        ValueSource::L1
    );
    let resyncs = cache.get_stats().resyncs;
    // Several keep-alive intervals (one second each) with no traffic.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(cache.l1_active(), "backplane dropped while idle");
    assert_eq!(
        cache.get_stats().resyncs,
        resyncs,
        "L1 was resynchronised while idle"
    );
    assert_eq!(
        cache
            .get_with_source::<u64>("warm")
            .await
            .unwrap()
            .unwrap()
            .1,
        ValueSource::L1,
        "L1 kept its entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_invalidation_messages_and_all_reach_the_other_instance() {
    let server = RedisServer::start().unwrap();
    let (a, b) = (instance(&server).await, instance(&server).await);
    const KEYS: usize = 200;
    for i in 0..KEYS {
        a.set(&format!("item:{i}"), 0u64).await.unwrap();
    }
    // B holds every key in L1 (version 0).
    for i in 0..KEYS {
        until_seen(&b, &format!("item:{i}"), 0).await;
        until_l1(&b, &format!("item:{i}")).await;
    }
    let before = server.command_calls("PUBLISH").unwrap();
    // 64 writers, each rewriting its share of the keys 5 times.
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let a = a.clone();
            tokio::spawn(async move {
                for round in 1..=5u64 {
                    for i in (t..KEYS).step_by(64) {
                        a.set(&format!("item:{i}"), round).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Every key's last write reaches B: no L1 copy of an older version survives.
    for i in 0..KEYS {
        until_seen(&b, &format!("item:{i}"), 5).await;
    }
    let writes = (KEYS * 5) as u64;
    let published = server.command_calls("PUBLISH").unwrap() - before;
    assert!(
        published < writes / 2,
        "{published} PUBLISH for {writes} concurrent writes: invalidations were not batched"
    );
    assert!(
        b.get_stats().backplane_received >= writes,
        "every write's invalidation is received: {:?}",
        b.get_stats()
    );
    assert_eq!(a.get_stats().backplane_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_are_rejected_on_the_l1_path_without_touching_l2() {
    let server = RedisServer::start().unwrap();
    let a = instance(&server).await;
    let huge = "k".repeat(1 << 20);
    for key in ["", huge.as_str()] {
        let err = a.get::<u64>(key).await.unwrap_err();
        assert!(
            matches!(err, ncm_cache_core::CacheError::InvalidKey { .. }),
            "{err:?}"
        );
    }
    let stats = a.get_stats();
    assert_eq!((stats.l2_errors, stats.misses), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_publishes_are_counted_while_the_write_itself_succeeds() {
    let mut server = RedisServer::start().unwrap();
    let redis = RedisCache::connect(config(&server)).await.unwrap();
    // L2 in memory, backplane on Redis: the write succeeds even when Redis is gone.
    let cache = MultiLevelCache::builder(ncm_cache_memory::MemoryBackend::new())
        .name("publish-failures")
        .backplane(Arc::clone(redis.redis_backend()))
        .build()
        .unwrap();
    wait_active(&cache).await;
    server.kill();
    // Concurrent writes: the first publishes itself, the others queue for the flush task.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.set(&format!("k{i}"), i).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let start = Instant::now();
    while cache.get_stats().backplane_errors < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "publish failures not counted: {:?}",
            cache.get_stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A lock that would expire before its first renewal, or waiters that never wait, are refused
/// at build time with a message naming the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_ttl_too_short_or_a_zero_wait_is_a_config_error() {
    let server = RedisServer::start().unwrap();
    let redis = RedisCache::connect(config(&server)).await.unwrap();
    for (ttl, wait) in [
        (Duration::ZERO, Duration::from_secs(1)),
        (Duration::from_millis(10), Duration::from_secs(1)),
        (Duration::from_secs(1), Duration::ZERO),
    ] {
        let err = MultiLevelCache::builder(redis.backend())
            .distributed_lock(Arc::clone(redis.redis_backend()), ttl, wait)
            .build()
            .unwrap_err();
        assert!(
            matches!(&err, ncm_cache_core::CacheError::Config(m) if m.contains("over_redis")),
            "{err}"
        );
    }
    assert!(
        MultiLevelCache::builder(redis.backend())
            .distributed_lock(
                Arc::clone(redis.redis_backend()),
                Duration::from_millis(100),
                Duration::from_millis(1)
            )
            .build()
            .is_ok()
    );
}

/// A batch load announces its keys in one PUBLISH (it used to send one per key, one round trip
/// after the other), and the other instance still drops every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_load_publishes_its_keys_in_one_message() {
    let server = RedisServer::start().unwrap();
    let instance = |redis: RedisCache| async move {
        let cache = MultiLevelCache::builder(redis.backend())
            .name("batch")
            .backplane(Arc::clone(redis.redis_backend()))
            .build()
            .unwrap();
        wait_active(&cache).await;
        cache
    };
    let a = instance(RedisCache::connect(config(&server)).await.unwrap()).await;
    let b = instance(RedisCache::connect(config(&server)).await.unwrap()).await;
    let keys: Vec<String> = (0..50).map(|i| format!("item:{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    // B holds an old copy of every key.
    for k in &refs {
        b.set_at(k, 0u64, ncm_cache_core::CacheLevel::L1)
            .await
            .unwrap();
    }
    let before = server.command_calls("publish").unwrap();
    let loaded = a
        .get_many_or_load::<u64, _, _, _>(&refs, |missing| async move {
            Ok::<_, std::io::Error>(missing.into_iter().map(|k| (k, 7u64)).collect())
        })
        .await
        .unwrap();
    assert!(loaded.iter().all(|v| *v == Some(7)));
    let publishes = server.command_calls("publish").unwrap() - before;
    assert!(
        publishes <= 2,
        "{publishes} PUBLISHes for one batch load of {} keys",
        refs.len()
    );
    let start = Instant::now();
    for k in &refs {
        while b.get::<u64>(k).await.unwrap() != Some(7) {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{k}: B kept its old copy"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// 10,000 concurrent callers of a cold key (a 50 ms loader), three rounds, the first on a
/// fresh connection, as the stampede bench runs them: the loader runs once per round. Callers
/// whose L2 miss comes back while the load's own store is being written used to name a new
/// flight (the store bumps the local-writes version) and load a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_callers_of_a_cold_key_run_the_loader_once_per_round() {
    let server = RedisServer::start().unwrap();
    let mut c = config(&server);
    c.health_check_interval = None;
    let redis = RedisCache::connect(c).await.unwrap();
    let cache = MultiLevelCache::builder(redis.backend())
        .name("stampede")
        .build()
        .unwrap();
    for round in 0..3u64 {
        let runs = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..10_000)
            .map(|_| {
                let (cache, runs) = (cache.clone(), Arc::clone(&runs));
                tokio::spawn(async move {
                    cache
                        .get_or_load(&format!("stampede:{round}"), move || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, Io>(round)
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), round);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "round {round}");
    }
}

/// A caller that starts after a `set` of the key returned does not join a load begun before
/// it, also when it cannot see the set's value (the set skipped L1, the caller skips the L2
/// read): a set is an invalidation of the key's flight, as a delete is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_after_a_set_does_not_join_an_older_load() {
    use ncm_cache_multilevel::{EntryOptions, Loaded};
    let server = RedisServer::start().unwrap();
    let cache = instance(&server).await;
    let (entered, release) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let old = tokio::spawn({
        let (cache, entered, release) = (cache.clone(), entered.clone(), release.clone());
        async move {
            cache
                .get_or_load("k", move || async move {
                    entered.notify_one();
                    release.notified().await;
                    Ok::<_, Io>(1u64)
                })
                .await
        }
    });
    entered.notified().await;
    cache
        .set_with("k", 2u64, &EntryOptions::new().skip_l1_write())
        .await
        .unwrap();
    let after = tokio::time::timeout(
        Duration::from_secs(2),
        cache.get_or_load_with::<u64, _, _, _>(
            "k",
            &EntryOptions::new().skip_l2_read(),
            |_| async { Ok::<_, Io>(Loaded::value(3u64)) },
        ),
    )
    .await
    .expect("the caller after the set waited for the older load")
    .unwrap();
    assert_eq!(
        after.map(|(v, _)| *v),
        Some(3),
        "joined the load begun before the set"
    );
    release.notify_one();
    assert_eq!(old.await.unwrap().unwrap(), 1);
}

/// `as_backend().get_many` (what `SqlCache` reads a result and its table tokens with) reads
/// L1 first and the rest in one L2 batch: one `MGET`, no `GET` (before: the trait's default
/// read the keys one by one, a round trip each; found by review). A key another instance
/// wrote is read from L2 and promoted; one in L1 is not asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_batch_read_is_one_l2_batch() {
    use ncm_cache_core::{Bytes, CacheBackend};
    let server = RedisServer::start().unwrap();
    let writer = instance(&server).await;
    let reader = instance(&server).await;
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    for k in &keys {
        writer
            .as_backend()
            .set(k, Bytes::from(k.clone()), None)
            .await
            .unwrap();
    }
    // One key already in the reader's L1.
    reader.as_backend().get("k0").await.unwrap();
    let refs: Vec<&str> = keys.iter().map(String::as_str).chain(["absent"]).collect();
    let (gets, mgets) = (
        server.command_calls("get").unwrap(),
        server.command_calls("mget").unwrap(),
    );
    let got = reader.as_backend().get_many(&refs).await.unwrap();
    assert_eq!(
        server.command_calls("get").unwrap(),
        gets,
        "read key by key"
    );
    assert_eq!(server.command_calls("mget").unwrap(), mgets + 1);
    for (k, v) in refs.iter().zip(&got) {
        let expected = (*k != "absent").then(|| Bytes::from(k.to_string()));
        assert_eq!(v, &expected, "{k}");
    }
    // Promoted: read again from L1 alone.
    reader.as_backend().get_many(&refs[..10]).await.unwrap();
    assert_eq!(server.command_calls("mget").unwrap(), mgets + 1);
}
