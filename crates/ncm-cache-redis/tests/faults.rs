//! Outages: a killed server costs at most the timeout per call and recovers by itself; a paused
//! server times out at the configured timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use ncm_cache_core::Operation;
use ncm_cache_redis::{RedisCache, RedisSyncCache};
use ncm_cache_testkit::RedisServer;

const TIMEOUT: Duration = Duration::from_millis(500);
/// Slack over the configured timeout for scheduling on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(700);

async fn until_ok(cache: &RedisCache, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if cache.set("probe", &1).await.is_ok() && cache.get::<i32>("probe").await.is_ok() {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "no recovery within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_fails_fast_and_recovers_after_restart() {
    let mut server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(support::config(&server)).await.unwrap();
    cache.set("k", &"v").await.unwrap();

    server.kill();
    for _ in 0..5 {
        let start = Instant::now();
        let err = cache.get::<String>("k").await.unwrap_err();
        let took = start.elapsed();
        assert!(
            err.is_connection() || err.is_timeout(),
            "typed error, got {err:?}"
        );
        assert!(
            took <= TIMEOUT * 2 + SLACK,
            "a call took {took:?} with the server down"
        );
    }
    assert!(!cache.health_check().await);
    assert!(cache.get_stats().errors >= 5);

    server.restart().unwrap();
    let took = until_ok(&cache, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(3), "recovered in {took:?}");
    assert!(cache.health_check().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_server_times_out_at_the_configured_timeout() {
    let server = RedisServer::start().unwrap();
    let mut config = support::config(&server);
    config.retry_on_timeout = false;
    let cache = RedisCache::connect(config).await.unwrap();
    cache.set("k", &"v").await.unwrap();
    server.pause().unwrap();
    let start = Instant::now();
    let err = cache.get::<String>("k").await.unwrap_err();
    let took = start.elapsed();
    assert!(err.is_timeout(), "expected a timeout, got {err:?}");
    assert!(
        took >= TIMEOUT - Duration::from_millis(50) && took <= TIMEOUT + SLACK,
        "took {took:?}"
    );
    server.resume().unwrap();
    until_ok(&cache, Duration::from_secs(5)).await;
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("v")
    );
}

#[test]
fn sync_cache_survives_a_restart() {
    let mut server = RedisServer::start().unwrap();
    let cache = RedisSyncCache::connect(support::config(&server)).unwrap();
    cache.set("k", &1).unwrap();
    server.kill();
    let start = Instant::now();
    let err = cache.get::<i32>("k").unwrap_err();
    assert!(err.is_connection() || err.is_timeout(), "{err:?}");
    assert!(
        start.elapsed() <= TIMEOUT * 4 + SLACK,
        "took {:?}",
        start.elapsed()
    );
    server.restart().unwrap();
    let start = Instant::now();
    while cache.set("k", &2).is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "no recovery");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cache.get::<i32>("k").unwrap(), Some(2));
}

#[tokio::test]
async fn connecting_to_nothing_is_a_typed_error_within_the_timeout() {
    // Held for the test: no other test's server starts on it meanwhile.
    let lease = ncm_cache_testkit::PortLease::reserve().unwrap();
    let port = lease.port();
    let start = Instant::now();
    let err = RedisCache::from_url(&format!("redis://127.0.0.1:{port}/?connect_timeout=300ms"))
        .await
        .unwrap_err();
    assert!(err.is_connection() || err.is_timeout(), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

/// A call while the connection is being re-established — the old one cut, the new one
/// accepted but never answered (a partition during the reconnect) — is still bounded by the
/// configured timeouts, not by the reconnect's retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_during_a_reconnect_is_bounded_by_the_timeouts() {
    let server = RedisServer::start().unwrap();
    let (proxy, config) = support::proxied(&server);
    let cache = RedisCache::connect(config).await.unwrap();
    cache.set("k", &"v").await.unwrap();
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Stall);
    proxy.cut();
    // Both timeouts once each (the retry on timeout included), plus scheduling slack.
    let bound = TIMEOUT * 3 + SLACK;
    for _ in 0..3 {
        let start = Instant::now();
        let err = cache.get::<String>("k").await.unwrap_err();
        let took = start.elapsed();
        assert!(err.is_timeout() || err.is_connection(), "{err:?}");
        assert!(
            took <= bound,
            "a call took {took:?} during a reconnect (bound {bound:?})"
        );
    }
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    let took = until_ok(&cache, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "recovered in {took:?}");
}

/// A pool call made right after the server closed the connection (no call failed first) while
/// new connections stall: the pool's connection manager heard of the close and is
/// reconnecting (see `batch_socket.rs::a_write_after_the_server_closed_the_idle_pool_connection_reaches_redis`),
/// and the call, which waits for that, is still bounded by one connect and one response
/// timeout, not by the reconnect's attempts (3 × `connect_timeout` and backoff: found by
/// review, helper-96).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_call_while_the_pool_reconnects_on_its_own_is_bounded_by_the_timeouts() {
    let server = RedisServer::start().unwrap();
    let (proxy, mut config) = support::proxied(&server);
    config.connect_timeout = Duration::from_secs(1);
    config.response_timeout = Duration::from_millis(200);
    let bound = config.connect_timeout + config.response_timeout + SLACK;
    let cache = RedisCache::connect(config).await.unwrap();
    let ping = redis::cmd("PING");
    let backend = cache.redis_backend();
    let _: String = backend.query_cmd(Operation::Get, &ping).await.unwrap();
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Stall);
    proxy.cut();
    // The close heard, the reconnect (into the stalled proxy) under way.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..2 {
        let start = Instant::now();
        let r = backend.query_cmd::<String>(Operation::Get, &ping).await;
        let took = start.elapsed();
        let err = r.unwrap_err();
        assert!(err.is_timeout() || err.is_connection(), "{err:?}");
        assert!(took <= bound, "a pool call took {took:?} (bound {bound:?})");
    }
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    let start = Instant::now();
    while backend
        .query_cmd::<String>(Operation::Get, &ping)
        .await
        .is_err()
    {
        assert!(start.elapsed() < Duration::from_secs(10), "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call that must not run twice (`query_cmd`: here a `BLMOVE`) whose reply is lost after
/// Redis ran it is not sent again, on a single node too (the cluster case:
/// `cluster.rs::a_call_that_must_not_run_twice_is_not_sent_again_after_a_lost_reply`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_must_not_run_twice_is_not_sent_again_after_a_lost_reply() {
    let server = RedisServer::start().unwrap();
    let mut c = support::config(&server);
    c.response_timeout = Duration::from_secs(3);
    c.retry_on_timeout = true;
    let cache = RedisCache::connect(c).await.unwrap();
    let (result, took) =
        support::lose_the_reply_of_a_command_that_ran(&server, cache.redis_backend()).await;
    assert!(result.is_err(), "the reply was lost: {result:?}");
    assert!(took < Duration::from_secs(2), "failed after {took:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        server.command_calls("blmove").unwrap(),
        1,
        "BLMOVE sent again"
    );
    assert_eq!(server.command(&["LLEN", "{nsa}dst"]).unwrap(), "1");
}

/// A delete that timed out on one pool connection (stuck behind a blocking command) was
/// retried on the other; its first try, still queued, ran after a write the caller made once
/// the retry had returned, and removed it (found by review). A delete's retry now goes behind
/// its first try on the same connection: a delete that returned `Ok` never undoes a later
/// write (here it times out, as its first try did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_delete_never_undoes_a_later_write() {
    use ncm_cache_core::{Bytes, CacheBackend as _, Operation};
    let server = RedisServer::start().unwrap();
    let mut c = support::config(&server);
    c.auto_batch = false;
    c.response_timeout = Duration::from_millis(300);
    c.max_connections = 2;
    c.retry_on_timeout = true;
    let cache = RedisCache::connect(c.clone()).await.unwrap();
    let b = cache.redis_backend();
    // The later write comes from another client (its own connections).
    let writer = RedisCache::connect(c).await.unwrap();
    let v = |s: &'static [u8]| Bytes::from_static(s);
    // Calls alternate between the two connections: 0, 1, 0, 1, …
    b.set("k", v(b"v1"), None).await.unwrap();
    b.exists("z").await.unwrap();
    // Connection 0 is blocked on the server for 2 s; the client gives up after 300 ms.
    let mut blpop = redis::cmd("BLPOP");
    blpop.arg("q").arg(2);
    let blocked: ncm_cache_core::Result<redis::Value> = b.query_cmd(Operation::Get, &blpop).await;
    assert!(blocked.is_err(), "BLPOP was meant to time out");
    b.exists("z").await.unwrap();
    // First try on connection 0 (queued behind BLPOP).
    let deleted = b.delete("k").await;
    writer
        .redis_backend()
        .set("k", v(b"v2"), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let now = b.get("k").await.unwrap();
    match deleted {
        Ok(_) => assert_eq!(
            now.as_deref(),
            Some(&b"v2"[..]),
            "a delete acknowledged before the write undid it"
        ),
        Err(e) => assert!(e.is_timeout(), "{e}"),
    }
}

/// The blocking client's `set_many` on a stalled server: its pipeline's replies were each
/// awaited for `response_timeout`, and the call retried — 50 entries cost about 2 × 50 ×
/// the timeout (found by review). One bound now covers the whole pipeline, and a write is not
/// retried.
#[test]
fn a_stalled_server_costs_a_sync_pipeline_one_timeout() {
    let server = RedisServer::start().unwrap();
    let (proxy, mut c) = support::proxied(&server);
    c.response_timeout = Duration::from_millis(200);
    let cache = RedisSyncCache::connect(c).unwrap();
    cache.set_bytes("warm", b"1", None).unwrap();
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Stall);
    let entries: Vec<(String, Vec<u8>)> =
        (0..50).map(|i| (format!("k{i}"), vec![1u8; 10])).collect();
    let refs: Vec<(&str, &[u8])> = entries
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let start = Instant::now();
    let r = cache.set_many_bytes(&refs, None);
    let took = start.elapsed();
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    assert!(r.is_err(), "the stalled pipeline was meant to fail");
    assert!(
        took < Duration::from_millis(200) + Duration::from_millis(700),
        "took {took:?}"
    );
    // The connection that timed out is not reused with replies pending: reads stay right.
    cache.set_bytes("after", b"2", None).unwrap();
    assert_eq!(
        cache.get_bytes("after").unwrap().as_deref(),
        Some(&b"2"[..])
    );
    assert_eq!(cache.get_bytes("warm").unwrap().as_deref(), Some(&b"1"[..]));
}
