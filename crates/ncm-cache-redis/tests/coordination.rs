//! The cross-instance building blocks: the distributed lock and reconnecting pub/sub.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use ncm_cache_core::{Bytes, CacheBackend};
use ncm_cache_redis::{PubSubEvent, RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_is_exclusive_expires_and_only_its_holder_releases_it() {
    let server = RedisServer::start().unwrap();
    let a = RedisCache::connect(support::config(&server)).await.unwrap();
    let b = RedisCache::connect(support::config(&server)).await.unwrap();
    let (a, b) = (a.redis_backend(), b.redis_backend());
    let ttl = Duration::from_millis(300);

    let held = a.try_lock("job", ttl).await.unwrap().expect("free lock");
    assert!(b.try_lock("job", ttl).await.unwrap().is_none(), "exclusive");
    assert!(held.extend(Duration::from_secs(5)).await.unwrap());
    assert!(held.release().await.unwrap());
    let held_b = b
        .try_lock("job", ttl)
        .await
        .unwrap()
        .expect("released lock is free");

    // A crashed holder (never releases): the lock frees itself after its TTL.
    std::mem::forget(held_b);
    let start = Instant::now();
    let taken = a
        .lock("job", ttl, Duration::from_secs(3))
        .await
        .unwrap()
        .expect("expired");
    assert!(
        start.elapsed() <= ttl + Duration::from_millis(1000),
        "{:?}",
        start.elapsed()
    );

    // An expired holder can neither extend nor release the new holder's lock.
    let stale = b
        .try_lock("other", Duration::from_millis(50))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let fresh = a
        .try_lock("other", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(!stale.extend(Duration::from_secs(5)).await.unwrap());
    assert!(!stale.release().await.unwrap());
    assert!(
        b.try_lock("other", ttl).await.unwrap().is_none(),
        "fresh holder keeps it"
    );
    assert!(fresh.release().await.unwrap());
    assert!(taken.release().await.unwrap());
    // Lock keys live inside the prefix.
    assert!(server.cli(&["EXISTS", "lock:job"]).unwrap().contains('0'));
}

async fn next_message(sub: &mut ncm_cache_redis::Subscription) -> (String, Bytes) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("message in time")
        {
            Some(PubSubEvent::Message { channel, payload }) => return (channel, payload),
            Some(_) => continue,
            None => panic!("subscription ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_delivers_stays_in_its_prefix_and_reconnects() {
    let mut server = RedisServer::start().unwrap();
    let mut cfg = support::config(&server);
    cfg.key_prefix = "app:".into();
    cfg.health_check_interval = Some(Duration::from_millis(100));
    let a = RedisCache::connect(cfg.clone()).await.unwrap();
    let b = RedisCache::connect(cfg.clone()).await.unwrap();
    let mut other_cfg = support::config(&server);
    other_cfg.key_prefix = "other:".into();
    let other = RedisCache::connect(other_cfg).await.unwrap();

    let mut sub = a.redis_backend().subscribe(&["invalidate"]).await.unwrap();
    assert_eq!(
        other
            .redis_backend()
            .publish("invalidate", b"not for you")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        b.redis_backend()
            .publish("invalidate", b"k1")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        next_message(&mut sub).await,
        ("invalidate".into(), Bytes::from_static(b"k1"))
    );

    // Connection cut: Disconnected, then Reconnected once the server is back, then messages flow.
    server.kill();
    server.restart().unwrap();
    let start = Instant::now();
    let (mut saw_down, mut saw_up) = (false, false);
    while !(saw_down && saw_up) {
        match tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("events in time")
        {
            Some(PubSubEvent::Disconnected) => saw_down = true,
            Some(PubSubEvent::Reconnected) => saw_up = true,
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("subscription ended"),
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "resubscribed in {:?}",
        start.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while b
        .redis_backend()
        .publish("invalidate", b"k2")
        .await
        .unwrap_or(0)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "publisher never reached the subscriber"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(next_message(&mut sub).await.1, Bytes::from_static(b"k2"));
}

/// Lock keys live in the reserved `__ncm:` namespace: a user key named like a lock does not
/// collide with one, and a pattern delete (`clear_pattern("*")`, a multi-level `clear()`)
/// never removes a held lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_never_collide_with_user_keys_nor_vanish_in_a_clear() {
    let server = RedisServer::start().unwrap();
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    let cache = RedisCache::connect(c.clone()).await.unwrap();
    let backend = cache.redis_backend();
    cache.set("lock:job", &"user data").await.unwrap();
    let lock = backend
        .try_lock("job", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("a user key named lock:job does not hold the lock");
    assert_eq!(
        cache.get::<String>("lock:job").await.unwrap().as_deref(),
        Some("user data")
    );
    cache.clear_pattern("*").await.unwrap();
    assert!(
        backend
            .try_lock("job", Duration::from_secs(30))
            .await
            .unwrap()
            .is_none(),
        "clear_pattern(\"*\") removed a held lock"
    );
    assert_eq!(cache.get::<String>("lock:job").await.unwrap(), None);
    let sync = ncm_cache_redis::RedisSyncCache::connect(c).unwrap();
    sync.clear_pattern("*").unwrap();
    assert!(
        lock.release().await.unwrap(),
        "the lock survived both clears"
    );
}

/// No user call can name a key of the reserved namespace: a user key spelled like a lock (or
/// the multi-level cache's stampede lock) is refused with `InvalidKey`, so it can neither hold
/// a lock nobody took, nor delete another instance's lock, nor hide from a pattern clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_keys_cannot_reach_the_reserved_namespace() {
    let server = RedisServer::start().unwrap();
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    let cache = RedisCache::connect(c.clone()).await.unwrap();
    let backend = cache.redis_backend();
    let refused = cache.set("__ncm:lock:job", &"user data").await.unwrap_err();
    assert!(
        matches!(refused, ncm_cache_core::CacheError::InvalidKey { .. }),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("reserved"), "{refused}");
    assert!(
        backend
            .try_lock("job", Duration::from_secs(30))
            .await
            .unwrap()
            .is_some(),
        "a user write blocked the lock"
    );
    // Another instance's stampede lock cannot be deleted through the cache.
    let held = backend
        .try_lock("load:k", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert!(
        cache
            .delete("__ncm:lock:load:k")
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(
        backend
            .try_lock("load:k", Duration::from_secs(30))
            .await
            .unwrap()
            .is_none(),
        "the lock is still held"
    );
    assert!(held.release().await.unwrap());
    // Every user entry point refuses the namespace: reads, many-key calls, the blocking cache.
    let b = cache.backend();
    assert!(b.get("__ncm:x").await.unwrap_err().is_invalid_input());
    assert!(b.exists("__ncm:x").await.unwrap_err().is_invalid_input());
    assert!(
        b.get_many(&["a", "__ncm:x"])
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(
        b.set_many(&[("__ncm:x", Bytes::from_static(b"v"))], None)
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    let sync = ncm_cache_redis::RedisSyncCache::connect(c).unwrap();
    assert!(sync.set("__ncm:x", &1u8).unwrap_err().is_invalid_input());
    // The library's own keys still work through the reserved calls (the multi-level epoch).
    b.set_reserved("epoch:t", Bytes::from_static(b"abc"), None)
        .await
        .unwrap();
    assert_eq!(
        b.get_reserved("epoch:t").await.unwrap(),
        Some(Bytes::from_static(b"abc"))
    );
    assert_eq!(
        server.cli(&["GET", "app:__ncm:epoch:t"]).unwrap().trim(),
        "abc"
    );
}

/// A `release` (or `release_with_note`) that fails on a broken connection, or whose caller
/// stops waiting before the command reached Redis (the connection is being re-established
/// through a stalled network), still frees the lock once Redis is reachable again: the drop
/// guard releases it. Before, the lock was marked released before the call, so it stayed taken
/// for its whole TTL and waiters polled until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_failed_or_was_cancelled_still_frees_the_lock() {
    let server = RedisServer::start().unwrap();
    let (proxy, mut config) = support::proxied(&server);
    config.response_timeout = Duration::from_secs(2);
    config.connect_timeout = Duration::from_secs(2);
    let a = RedisCache::connect(config).await.unwrap();
    let b = RedisCache::connect(support::config(&server)).await.unwrap();
    for (noted, cancelled) in [(false, false), (true, false), (false, true), (true, true)] {
        let name = format!("job-{noted}-{cancelled}");
        let held = a
            .redis_backend()
            .try_lock(&name, Duration::from_secs(30))
            .await
            .unwrap()
            .expect("free lock");
        // Failed: the connection is cut first and new ones are refused, so the release fails
        // (the pool reconnects as soon as it sees the close, and that fails). Cancelled: the
        // release is sent into a stalled connection, its caller gives up, and the connection
        // is cut with the command still in flight (it never reaches Redis).
        if cancelled {
            proxy.set_mode(ncm_cache_testkit::ProxyMode::Stall);
        } else {
            proxy.set_mode(ncm_cache_testkit::ProxyMode::Refuse);
            proxy.cut();
        }
        let release = async {
            if noted {
                held.release_with_note("gone", Duration::from_millis(100))
                    .await
            } else {
                held.release().await
            }
        };
        // A stalled release is given up on after 200 ms; a refused one fails by itself, after
        // the pool's reconnect attempts (and those its background check starts) are refused,
        // which on a loaded machine can take longer than 200 ms (it did once in CI).
        let wait = if cancelled { 200 } else { 3_000 };
        let outcome = tokio::time::timeout(Duration::from_millis(wait), release).await;
        if cancelled {
            assert!(
                outcome.is_err(),
                "the release was meant to hang: {outcome:?}"
            );
            proxy.cut();
        } else {
            assert!(
                matches!(outcome, Ok(Err(_))),
                "the release was meant to fail: {outcome:?}"
            );
        }
        proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
        let free = b
            .redis_backend()
            .lock(&name, Duration::from_secs(1), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            free.is_some(),
            "{name}: the lock stayed taken after its release failed or was cancelled"
        );
    }
}

/// A `try_lock` whose `SET NX` reached Redis but whose reply came after the call's timeout
/// (or whose caller gave up): the lock was taken on the server with a token nobody kept, so
/// nobody could take it before its TTL (found by review). The unclaimed lock is now released
/// in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_by_a_timed_out_or_cancelled_try_lock_is_freed() {
    let server = RedisServer::start().unwrap();
    let (proxy, mut config) = support::proxied(&server);
    config.response_timeout = Duration::from_millis(200);
    let a = RedisCache::connect(config).await.unwrap();
    let b = RedisCache::connect(support::config(&server)).await.unwrap();
    for cancelled in [false, true] {
        let name = format!("job-{cancelled}");
        // A call answered first: after the round before, whose call timed out, the next call
        // would ask a `PING` first (the connection may be reconnecting), and a caller that
        // gives up during it never sends its `SET` — not the scenario here.
        a.redis_backend()
            .set("settle", Bytes::from_static(b"x"), None)
            .await
            .unwrap();
        // The command reaches Redis after 150 ms; its reply would come back 150 ms later.
        proxy.set_mode(ncm_cache_testkit::ProxyMode::Delay(Duration::from_millis(
            150,
        )));
        let attempt = a.redis_backend().try_lock(&name, Duration::from_secs(30));
        if cancelled {
            let gave_up = tokio::time::timeout(Duration::from_millis(180), attempt).await;
            assert!(gave_up.is_err(), "the caller was meant to give up first");
        } else {
            let r = attempt.await;
            assert!(r.is_err(), "the call was meant to time out: {r:?}");
        }
        // It was taken on the server all the same.
        let start = Instant::now();
        while server
            .command(&["EXISTS", &format!("__ncm:lock:{name}")])
            .unwrap()
            != "1"
        {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "scenario not reproduced: the SET never reached Redis"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
        let free = b
            .redis_backend()
            .lock(&name, Duration::from_secs(1), Duration::from_secs(3))
            .await
            .unwrap();
        assert!(
            free.is_some(),
            "{name}: the lock stayed taken after the try_lock that took it failed"
        );
    }
}
