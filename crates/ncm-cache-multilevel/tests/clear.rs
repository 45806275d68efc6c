//! O(1) `clear()` with epochs (`epoch_clear`) on a throwaway Redis holding 2,000,000 keys of
//! other programs: one write and no SCAN, whatever the keyspace; afterwards no instance — over
//! the backplane, over client tracking, or with no coherence link at all (after its re-check
//! interval) — serves anything of the cleared cache; caches of other names on the same prefix
//! keep their entries.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ncm_cache_core::CacheError;
use ncm_cache_multilevel::{Coherence, EntryOptions, MultiLevelCache};
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;

const KEYS: usize = 100;

async fn redis(server: &RedisServer) -> RedisCache {
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    c.response_timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_millis(500);
    RedisCache::connect(c).await.unwrap()
}

async fn instance(r: &RedisCache, name: &str, coherence: Option<Coherence>) -> MultiLevelCache {
    let mut b = MultiLevelCache::builder(r.backend())
        .name(name)
        .epoch_clear(true)
        .l1_max_size(10_000);
    if let Some(mode) = coherence {
        b = b.backplane(Arc::clone(r.redis_backend())).coherence(mode);
    }
    let cache = b.build().unwrap();
    let start = Instant::now();
    while !cache.l1_active() {
        assert!(start.elapsed() < Duration::from_secs(10), "link never up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cache
}

/// How many of the test keys `cache` still serves (L1 or L2).
async fn served(cache: &MultiLevelCache, options: &EntryOptions) -> usize {
    let mut n = 0;
    for i in 0..KEYS {
        if cache
            .get_with::<u64>(&format!("k{i}"), options)
            .await
            .unwrap()
            .is_some()
        {
            n += 1;
        }
    }
    n
}

async fn until_none(cache: &MultiLevelCache, options: &EntryOptions, limit: Duration) {
    let start = Instant::now();
    loop {
        let n = served(cache, options).await;
        if n == 0 {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{n} keys still served after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_is_one_write_on_a_redis_holding_two_million_other_keys() {
    let server = RedisServer::builder()
        .arg("--enable-debug-command", "yes")
        .start()
        .unwrap();
    server
        .command_with_timeout(
            &["DEBUG", "POPULATE", "2000000", "other", "16"],
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(server.command(&["DBSIZE"]).unwrap(), "2000000");
    let (ra, rb, rc, rd) = (
        redis(&server).await,
        redis(&server).await,
        redis(&server).await,
        redis(&server).await,
    );
    let a = instance(&ra, "users", Some(Coherence::Backplane)).await;
    let b = instance(&rb, "users", Some(Coherence::Backplane)).await;
    let t = instance(&rc, "users", Some(Coherence::Tracking)).await;
    // No coherence link: L1 is its own business, but its L2 reads follow the epoch.
    let lone = instance(&rd, "users", None).await;
    // Another cache on the same prefix.
    let orders = instance(&ra, "orders", Some(Coherence::Backplane)).await;
    for i in 0..KEYS {
        a.set(&format!("k{i}"), i as u64).await.unwrap();
        orders
            .set(&format!("k{i}"), i as u64 + 1_000_000)
            .await
            .unwrap();
    }
    let all = EntryOptions::new();
    let l2_only = EntryOptions::new().skip_l1();
    // Apart in L2 before either was cleared (they shared the first epoch's keys before).
    let in_l2 = async |cache: &MultiLevelCache| {
        let read = cache.get_with::<u64>("k1", &l2_only).await.unwrap();
        read.map(|(v, _)| *v)
    };
    assert_eq!(in_l2(&b).await, Some(1));
    assert_eq!(in_l2(&orders).await, Some(1_000_001));
    for cache in [&a, &b, &t, &lone] {
        assert_eq!(served(cache, &all).await, KEYS);
        // Read twice: the second from L1.
        assert_eq!(served(cache, &all).await, KEYS);
    }

    let (sets, scans, unlinks) = (
        server.command_calls("set").unwrap(),
        server.command_calls("scan").unwrap(),
        server.command_calls("unlink").unwrap(),
    );
    let start = Instant::now();
    a.clear().await.unwrap();
    let took = start.elapsed();
    assert_eq!(server.command_calls("set").unwrap(), sets + 1, "one write");
    assert_eq!(server.command_calls("scan").unwrap(), scans, "no SCAN");
    assert_eq!(
        server.command_calls("unlink").unwrap(),
        unlinks,
        "no delete"
    );
    // Generous for a loaded CI machine; a SCAN of 2M keys takes seconds (bench: clear rows).
    assert!(took < Duration::from_millis(250), "clear took {took:?}");
    eprintln!("epoch clear with 2M other keys: {took:?}");

    // Nothing of the cleared cache is served by any instance.
    assert_eq!(served(&a, &all).await, 0);
    until_none(&b, &all, Duration::from_millis(500)).await;
    until_none(&t, &all, Duration::from_millis(500)).await;
    until_none(&lone, &l2_only, Duration::from_millis(1500)).await;
    // Written again after the clear: seen by all, from the new epoch.
    a.set("k0", 7u64).await.unwrap();
    assert_eq!(b.get::<u64>("k0").await.unwrap(), Some(7));
    assert_eq!(t.get::<u64>("k0").await.unwrap(), Some(7));
    // The other cache and the other program's keys are untouched.
    assert_eq!(served(&orders, &all).await, KEYS);
    assert_eq!(server.command(&["EXISTS", "other:0"]).unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_need_an_l2_ttl() {
    let server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    let err = MultiLevelCache::builder(r.backend())
        .epoch_clear(true)
        .l2_default_ttl(None)
        .build()
        .unwrap_err();
    assert!(matches!(err, CacheError::Config(_)), "{err}");
    assert!(err.to_string().contains("l2_default_ttl"), "{err}");
}

/// An instance that has not heard of a clear yet (its announcement still on the way; here no
/// link at all and a token younger than the re-check interval) writes with the old token. Its
/// write and delete must still win over older writes made in the new epoch by instances that
/// did hear: before the fix they landed in the old epoch, and the older value was served by
/// every instance for its whole L2 TTL (the multi-process checker found this as an L1 read of
/// a superseded version, `coherence_checker_epoch_clear_single_node`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_with_an_old_epoch_still_supersedes_older_writes() {
    let server = RedisServer::start().unwrap();
    let (ra, rb) = (redis(&server).await, redis(&server).await);
    let heard = instance(&ra, "users", Some(Coherence::Backplane)).await;
    let late = instance(&rb, "users", None).await;
    let l2_only = EntryOptions::new().skip_l1();
    // `late` reads the epoch now and keeps it for its re-check interval (1 s without a link).
    late.set("k", 1u64).await.unwrap();
    heard.clear().await.unwrap();
    heard.set("k", 2u64).await.unwrap();
    late.set("k", 3u64).await.unwrap();
    assert_eq!(
        heard
            .get_with::<u64>("k", &l2_only)
            .await
            .unwrap()
            .map(|(v, _)| *v),
        Some(3)
    );
    assert_eq!(
        late.get_with::<u64>("k", &l2_only)
            .await
            .unwrap()
            .map(|(v, _)| *v),
        Some(3)
    );

    // The same for a delete and a pattern delete.
    late.set("d", 1u64).await.unwrap();
    heard.clear().await.unwrap();
    heard.set("d", 2u64).await.unwrap();
    heard.set("p1", 2u64).await.unwrap();
    assert!(late.delete("d").await.unwrap());
    assert_eq!(
        ncm_cache_core::CacheBackend::clear_pattern(&late.as_backend(), "p*")
            .await
            .unwrap(),
        1
    );
    assert!(
        heard
            .get_with::<u64>("d", &l2_only)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        heard
            .get_with::<u64>("p1", &l2_only)
            .await
            .unwrap()
            .is_none()
    );
}

/// A lost epoch key (evicted) is created again with a new token by the next instance that
/// looks; the others, still on the previous token (nobody announced the loss), read the
/// previous epoch's entries for up to their 30 s re-check interval — after a write of the new
/// epoch evicted their L1 copy, its older value (found by review). The creation is now
/// announced as a clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_epoch_key_moves_every_instance_to_the_new_epoch_at_once() {
    let server = RedisServer::start().unwrap();
    let (ra, rb) = (redis(&server).await, redis(&server).await);
    let a = instance(&ra, "users", Some(Coherence::Backplane)).await;
    let b = instance(&rb, "users", Some(Coherence::Backplane)).await;
    a.set("k", 1u64).await.unwrap();
    assert_eq!(b.get::<u64>("k").await.unwrap(), Some(1));
    // The epoch key is lost; A forgets its token (as after any link blip) and B does not.
    server.command(&["DEL", "app:__ncm:epoch:users"]).unwrap();
    let l2 = EntryOptions::new().skip_l1();
    // A's write lands under its kept token, then (the key absent) creates a new epoch and is
    // made again there; its next write goes to the new epoch only.
    a.set("k", 2u64).await.unwrap();
    a.set("k", 3u64).await.unwrap();
    let start = Instant::now();
    loop {
        let read = b.get_with::<u64>("k", &l2).await.unwrap().map(|(v, _)| *v);
        if read == Some(3) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "B kept reading the previous epoch"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
