//! Read batches on a connection of their own (`RedisConfig::batch_socket`, on by default, on a
//! single node over plain TCP; see `wire.rs`, whose own tests cover a command larger than the
//! socket takes and a server that stops draining it): it authenticates and selects the
//! database as the pool does, counts as one of `max_connections`, closes with the cache, and
//! connects on the caller's runtime once the cache's has shut down. Its faults (stall, cut,
//! kill: every reply reaches its own caller) run in `batching.rs`, on the pool and on this
//! connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ncm_cache_core::{Bytes, CacheBackend};
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;

/// The connections of clients other than redis-cli itself.
fn clients(server: &RedisServer) -> Vec<String> {
    server
        .cli(&["CLIENT", "LIST"])
        .unwrap()
        .lines()
        .filter(|l| !l.contains("cmd=client"))
        .map(str::to_owned)
        .collect()
}

/// Creates the user `app` (password `app-pw`, every key, `+@all` then `extra` rules) and
/// makes `config` connect as it.
fn as_app_user(server: &RedisServer, config: &mut RedisConfig, extra: &[&str]) {
    let mut acl = vec!["ACL", "SETUSER", "app", "on", ">app-pw", "~*", "+@all"];
    acl.extend_from_slice(extra);
    server.cli(&acl).unwrap();
    config.username = Some("app".into());
    config.password = Some("app-pw".into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_use_the_configured_user_and_database() {
    let server = RedisServer::start().unwrap();
    let mut config = support::config(&server);
    as_app_user(&server, &mut config, &[]);
    config.batch_socket = true;
    config.db = 3;
    assert!(config.auto_batch);
    let cache = RedisCache::connect(config).await.unwrap().backend();
    // Concurrent calls: batched, on the batch connection.
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move {
                let k = format!("k{i}");
                cache.set(&k, Bytes::from(format!("v{i}")), None).await?;
                cache.get(&k).await
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(
            call.await.unwrap().unwrap(),
            Some(Bytes::from(format!("v{i}")))
        );
    }
    // Written in database 3, by the user `app`, nothing in database 0.
    assert_eq!(server.cli(&["-n", "3", "GET", "k7"]).unwrap().trim(), "v7");
    assert_eq!(server.cli(&["-n", "0", "DBSIZE"]).unwrap().trim(), "0");
    let ours = clients(&server);
    assert!(
        ours.iter()
            .all(|c| c.contains(" user=app ") && c.contains(" db=3 ")),
        "{ours:#?}"
    );
    // The default two connections: one of the pool, the batch connection, which ran the
    // batches.
    assert_eq!(ours.len(), 2, "{ours:#?}");
    let batches: Vec<_> = ours
        .iter()
        .filter(|c| c.contains(" name=ncm-cache-batches "))
        .collect();
    assert_eq!(batches.len(), 1, "{ours:#?}");
    assert!(
        ["cmd=get ", "cmd=mget "]
            .iter()
            .any(|c| batches[0].contains(c)),
        "{ours:#?}"
    );

    // A password the server refuses fails the batch with an authentication error.
    server
        .cli(&["ACL", "SETUSER", "app", "resetpass", ">new-pw"])
        .unwrap();
    server.cli(&["CLIENT", "KILL", "USER", "app"]).unwrap();
    let mut refused = None;
    for _ in 0..20 {
        match cache.get("k1").await {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let refused = refused.expect("reads went on after the password was changed");
    assert!(
        matches!(refused, ncm_cache_core::CacheError::Auth(_)),
        "{refused:?}"
    );

    // A user not allowed `CLIENT` (the batch connection's name) nor `PING` (the handshake's
    // last command, which the pool never sends: `+@read +@write` users lack both): batches
    // work all the same (review, helper-95 #1: a refused `PING` failed every read).
    server
        .cli(&[
            "ACL", "SETUSER", "limited", "on", ">l-pw", "~*", "+@all", "-client", "-ping",
        ])
        .unwrap();
    let mut config = support::config(&server);
    config.batch_socket = true;
    config.username = Some("limited".into());
    config.password = Some("l-pw".into());
    let cache = RedisCache::connect(config).await.unwrap().backend();
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.set(&format!("l{i}"), Bytes::from("v"), None).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(cache.get("l3").await.unwrap(), Some(Bytes::from("v")));
    let named = clients(&server)
        .iter()
        .filter(|c| c.contains(" user=limited ") && c.contains("cmd=get "))
        .count();
    assert_eq!(named, 1, "the read did not go on the batch connection");
}

/// A batch connection that cannot be made (here every new connection is closed as it is
/// accepted, as a server at `maxclients` does; a server still `LOADING` or refusing the user
/// fails the same way) is not tried again by every batch: failed connects back off from 5 ms
/// to 100 ms, batches meanwhile getting the last connect's error. Once connections are
/// accepted again, reads come back within the backoff (review, helper-95 #2: every read
/// opened a new TCP connection, one right after another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_batch_connects_back_off_instead_of_reconnecting_for_every_read() {
    let server = RedisServer::start().unwrap();
    server.cli(&["SET", "k", "v"]).unwrap();
    let (proxy, config) = support::proxied(&server);
    assert!(config.batch_socket, "the batch connection is the default");
    let cache = RedisCache::connect(config).await.unwrap().backend();
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Refuse);
    let before = proxy.accepted_connections();
    let (mut reads, mut failed) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        reads += 1;
        if cache.get("k").await.is_err() {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let connects = proxy.accepted_connections() - before;
    assert_eq!(
        failed, reads,
        "a read succeeded with every connection refused"
    );
    // Without backoff, one connect per read (hundreds); with it, about one per 100 ms.
    assert!(
        (1..=20).contains(&connects),
        "{connects} connects for {reads} reads in 500 ms"
    );
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    let back = Instant::now();
    loop {
        if let Ok(v) = cache.get("k").await {
            assert_eq!(v, Some(Bytes::from("v")));
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(1),
            "reads did not come back within the backoff"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_batch_socket_batches_use_the_pool() {
    let server = RedisServer::start().unwrap();
    let config = RedisConfig::from_url(&format!("{}?batch_socket=false", server.url())).unwrap();
    assert!(!config.batch_socket);
    let on = RedisConfig::from_url(&format!("{}?batch_socket=true", server.url())).unwrap();
    assert!(on.batch_socket);
    let cache = RedisCache::connect(config).await.unwrap().backend();
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.set(&format!("k{i}"), Bytes::from("v"), None).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // Both default connections are the pool's.
    let ours = clients(&server);
    assert_eq!(ours.len(), 2, "{ours:#?}");
    assert!(
        ours.iter().all(|c| !c.contains("name=ncm-cache-batches")),
        "{ours:#?}"
    );
}

/// Redis restarted before the batch connection was ever made (every read so far was served
/// elsewhere): its first connect checks the pool too, so a write after that first read does not
/// meet the pool's connection that sat idle through the restart (found while trying
/// `batch_socket` on by default: only a connect made *again* checked the pool, and
/// `set` failed with "broken pipe").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_first_batch_connect_that_follows_a_restart_reaches_redis() {
    // On a pool that speaks RESP2 (a server without `HELLO`), where nothing else brings the
    // pool's connection back: on RESP3 its background check usually does (see
    // `the_first_write_a_second_after_a_restart_lands`), and the pool's check at the batch
    // connect is then not what this test sees.
    let mut server = without_hello();
    let mut config = support::config(&server);
    config.batch_socket = true;
    let cache = RedisCache::connect(config).await.unwrap().backend();
    // On the pool: the batch connection is not made yet.
    cache.set("k", Bytes::from("v1"), None).await.unwrap();
    server.kill();
    server.restart().unwrap();
    // The first read makes the batch connection (the restarted server is empty).
    assert_eq!(cache.get("k").await.unwrap(), None);
    cache.set("k", Bytes::from("v2"), None).await.unwrap();
    assert_eq!(cache.get("k").await.unwrap(), Some(Bytes::from("v2")));
}

/// Closing the cache closes its batch connection at once (not when the backend is dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_cache_closes_its_batch_connection() {
    let server = RedisServer::start().unwrap();
    let mut config = support::config(&server);
    config.batch_socket = true;
    let cache = RedisCache::connect(config).await.unwrap().backend();
    cache.set("k", Bytes::from("v"), None).await.unwrap();
    assert_eq!(cache.get("k").await.unwrap(), Some(Bytes::from("v")));
    let named = |server: &RedisServer| {
        clients(server)
            .iter()
            .filter(|c| c.contains(" name=ncm-cache-batches "))
            .count()
    };
    assert_eq!(named(&server), 1);
    cache.close().await.unwrap();
    let start = Instant::now();
    while named(&server) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the batch connection outlived close()"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The backend is still held: only `close` let the connection go.
    assert!(cache.get("k").await.is_err());
}

/// The runtime the cache connected on shut down before its batch connection was ever made;
/// the first batched call on another runtime is a lone read, whose connect is spawned on the
/// dead runtime and dropped there unrun. Later calls connect on their own runtime (found by
/// review: the connect stayed "under way" for good and every batched call failed).
#[test]
fn a_lone_read_after_the_cache_runtime_shut_down_connects_on_the_callers_runtime() {
    let server = RedisServer::start().unwrap();
    server.cli(&["SET", "k", "v"]).unwrap();
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cache = first.block_on(async {
        let mut config = support::config(&server);
        config.batch_socket = true;
        RedisCache::connect(config).await.unwrap().backend()
    });
    drop(first);
    let second = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let mut ok = 0;
        for _ in 0..20 {
            if let Ok(v) = cache.get("k").await {
                assert_eq!(v, Some(Bytes::from("v")));
                ok += 1;
            }
        }
        assert!(ok >= 18, "only {ok} of 20 lone reads succeeded");
    });
}

/// Reads keep the batch connection busy while the pool's connection sits idle; a server
/// `timeout` (or a load balancer's idle timeout) then closes the pool's connection. The next
/// write must still reach Redis: it is not the caller's business which connection idled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_server_closed_the_idle_pool_connection_reaches_redis() {
    // Also for a user not allowed `PING`: the checks after a close take an error reply as an
    // answer (before, found while reviewing the background checks, every write batch after
    // the close asked a `PING` first, met `NOPERM`, and failed).
    for limited in [false, true] {
        a_write_after_an_idle_close(limited).await;
    }
}

async fn a_write_after_an_idle_close(limited: bool) {
    let server = RedisServer::builder()
        .arg("--timeout", "1")
        .start()
        .unwrap();
    let mut config = support::config(&server);
    assert!(config.batch_socket);
    if limited {
        as_app_user(&server, &mut config, &["-ping"]);
    }
    let cache = RedisCache::connect(config).await.unwrap().backend();
    cache
        .set("k", Bytes::from_static(b"v0"), None)
        .await
        .unwrap();
    for round in 1..=3 {
        // Reads only, on the batch connection, for longer than the server's idle timeout
        // (Redis checks each client's idle time about once a second).
        let until = Instant::now() + Duration::from_millis(2_500);
        while Instant::now() < until {
            assert!(cache.get("k").await.unwrap().is_some());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let v = Bytes::from(format!("v{round}"));
        cache.set("k", v.clone(), None).await.unwrap_or_else(|e| {
            panic!("limited {limited}, round {round}: the write after an idle close failed: {e}")
        });
        assert_eq!(cache.get("k").await.unwrap(), Some(v));
    }
}

/// The pool asks for RESP3 (see the test above); a server without `HELLO` (Redis before 6,
/// here one that renamed it away) gets RESP2 instead, and the cache works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_hello_gets_resp2_on_the_pool() {
    let server = without_hello();
    let mut config = support::config(&server);
    as_app_user(&server, &mut config, &[]);
    let cache = RedisCache::connect(config).await.unwrap().backend();
    cache
        .set("k", Bytes::from_static(b"v"), None)
        .await
        .unwrap();
    assert_eq!(
        cache.get("k").await.unwrap(),
        Some(Bytes::from_static(b"v"))
    );
    let app: Vec<String> = clients(&server)
        .into_iter()
        .filter(|c| c.contains("user=app"))
        .collect();
    assert!(!app.is_empty(), "{app:?}");
    assert!(app.iter().all(|c| c.contains("resp=2")), "{app:?}");
    // With `HELLO` allowed, the pool's connection speaks RESP3.
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(support::config(&server))
        .await
        .unwrap()
        .backend();
    cache
        .set("k", Bytes::from_static(b"v"), None)
        .await
        .unwrap();
    assert!(
        clients(&server).iter().any(|c| c.contains("resp=3")),
        "{:?}",
        clients(&server)
    );
}

/// Reads go on the batches' own connection, so a health check must ask it too: with that
/// connection lost and new connections refused (a server at `maxclients`, a firewall change)
/// while the pool's connection still answers, every read fails. Before, `health_report` and
/// the background health check asked the pool only and said healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_checks_see_a_batch_connection_that_cannot_be_made() {
    let server = RedisServer::start().unwrap();
    server.cli(&["SET", "k", "v"]).unwrap();
    let (proxy, mut config) = support::proxied(&server);
    config.health_check_interval = Some(Duration::from_millis(100));
    let cache = RedisCache::connect(config).await.unwrap();
    let backend = cache.redis_backend();
    assert_eq!(
        backend.get("k").await.unwrap(),
        Some(Bytes::from_static(b"v"))
    );
    assert!(backend.health_report().await.healthy);
    // The batch connection killed, new connections refused; the pool's stays.
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Refuse);
    let batches: Vec<String> = clients(&server)
        .into_iter()
        .filter(|c| c.contains("name=ncm-cache-batches"))
        .collect();
    assert_eq!(batches.len(), 1, "{batches:?}");
    let id = batches[0]
        .split_whitespace()
        .find_map(|f| f.strip_prefix("id="))
        .unwrap()
        .to_owned();
    server.cli(&["CLIENT", "KILL", "ID", &id]).unwrap();
    let start = Instant::now();
    while backend.get("k").await.is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "reads kept working"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = backend.health_report().await;
    assert!(!report.healthy, "{report:?}");
    assert!(report.detail.contains("read batches"), "{report:?}");
    // The background check too, within a few of its 100 ms intervals.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!backend.last_known_healthy());
    // A read's connect fails right before connections are accepted again, so its backoff (up
    // to 100 ms) still lasts when the health check runs: the check connects anyway instead of
    // reporting that failure (review, helper-97: the background check then said unhealthy
    // for its whole interval).
    let before = proxy.accepted_connections();
    let start = Instant::now();
    while proxy.accepted_connections() == before {
        assert!(backend.get("k").await.is_err());
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "no read connected"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    let report = backend.health_report().await;
    assert!(report.healthy, "{report:?}");
    assert_eq!(
        backend.get("k").await.unwrap(),
        Some(Bytes::from_static(b"v"))
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(backend.last_known_healthy());
}

/// Redis killed for a while and restarted; the pool's connection sat idle through it (reads on
/// the batch connection), so its manager's reconnect failed while Redis was away. The first
/// health check after the restart meets that failed reconnect on the pool: it asks once more
/// (the manager reconnects meanwhile) instead of reporting a healthy server as down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_health_check_after_a_restart_reports_healthy() {
    // RESP3 (the pool's background check may also bring it back first) and RESP2 (a server
    // without `HELLO`: only the second `PING` does).
    for resp2 in [false, true] {
        first_health_check_after_a_restart(resp2).await;
    }
}

/// A server the pool speaks RESP2 to: `HELLO` renamed away, as on Redis before 6.
fn without_hello() -> RedisServer {
    RedisServer::builder()
        .args(["--rename-command", "HELLO", ""])
        .start()
        .unwrap()
}

async fn first_health_check_after_a_restart(resp2: bool) {
    let mut server = if resp2 {
        without_hello()
    } else {
        RedisServer::start().unwrap()
    };
    let cache = RedisCache::connect(support::config(&server)).await.unwrap();
    let backend = cache.redis_backend();
    backend.set("k", Bytes::from("v"), None).await.unwrap();
    assert!(backend.get("k").await.unwrap().is_some());
    server.kill();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    server.restart().unwrap();
    let report = backend.health_report().await;
    assert!(report.healthy, "resp2 {resp2}: {report:?}");
}

/// Redis killed for a while and restarted while nothing used the pool (its manager's own
/// reconnect failed meanwhile); a second later the first call is a write, with no read first
/// (whose batch connect would have checked the pool). The pool's connection was brought back
/// in the background, so the write lands instead of meeting the failed reconnect
/// ("Connection refused").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_write_a_second_after_a_restart_lands() {
    let mut server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(support::config(&server)).await.unwrap();
    let backend = cache.redis_backend();
    backend.set("k", Bytes::from("v1"), None).await.unwrap();
    for round in 0..2 {
        server.kill();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        server.restart().unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let v = Bytes::from(format!("v{round}"));
        backend
            .set("k", v.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the first write after a restart: {e}"));
        assert_eq!(backend.get("k").await.unwrap(), Some(v));
    }
}

/// Redis killed for 3 s (the pool's background checks back off to about a second, each
/// meeting a failed reconnect) and restarted; the first call right after the restart is a
/// write, with no read first: a batched `set`, an unbatched `delete`, a load's
/// `set_if_absent`, one per round. Each lands: a call on a connection whose reconnect failed
/// first asks a `PING`, and once more if that met the failed reconnect (the manager answers
/// the first request with the old failure and starts a new reconnect, which the second
/// waits for). Before, the call itself met the failure and, since a write is not resent,
/// failed with "Connection refused".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_right_after_a_restart_land() {
    use ncm_cache_core::CacheBackend as _;
    let mut server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(support::config(&server)).await.unwrap();
    let backend = cache.redis_backend();
    for first in ["set", "delete", "set_if_absent"] {
        backend.set("k", Bytes::from("v"), None).await.unwrap();
        server.kill();
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        server.restart().unwrap();
        let v = Bytes::from(first);
        let landed = match first {
            "set" => backend.set("k", v.clone(), None).await.map(|()| true),
            "delete" => backend.delete("k").await.map(|existed| !existed),
            _ => backend.set_if_absent("k", v.clone(), None).await,
        };
        let landed = landed
            .unwrap_or_else(|e| panic!("{first}: the first write right after a restart: {e}"));
        assert!(landed, "{first}: the restarted server is empty");
        let expected = (first != "delete").then_some(v);
        assert_eq!(backend.get("k").await.unwrap(), expected, "{first}");
    }
}

/// The background checks of a closed pool connection (see the test above) while Redis stays
/// away: about three connects a second per pool connection at most (each `PING` that meets a
/// failed reconnect starts another of three attempts, checks backing off to about 1 s); none
/// once the backend is closed or dropped (review, helper-98: a closed backend still held kept
/// connecting for as long as the outage lasted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_checks_of_the_pool_stop_when_the_backend_is_closed_or_dropped() {
    use ncm_cache_core::CacheBackend as _;
    let server = RedisServer::start().unwrap();
    let (open_proxy, open_config) = support::proxied(&server);
    let (closed_proxy, closed_config) = support::proxied(&server);
    let open = RedisCache::connect(open_config).await.unwrap();
    let closed = RedisCache::connect(closed_config).await.unwrap();
    for cache in [&open, &closed] {
        cache
            .redis_backend()
            .set("k", Bytes::from("v"), None)
            .await
            .unwrap();
    }
    closed.redis_backend().close().await.unwrap();
    let before = [
        open_proxy.accepted_connections(),
        closed_proxy.accepted_connections(),
    ];
    for proxy in [&open_proxy, &closed_proxy] {
        proxy.set_mode(ncm_cache_testkit::ProxyMode::Refuse);
        proxy.cut();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let open_connects = open_proxy.accepted_connections() - before[0];
    let closed_connects = closed_proxy.accepted_connections() - before[1];
    // The manager's own reconnect (three attempts) and the checks: 50 ms after the close,
    // then backing off to about a second, each check meeting a failed reconnect starting
    // another of three.
    assert!(
        (6..=30).contains(&open_connects),
        "{open_connects} connects in 3 s while open"
    );
    assert!(
        closed_connects <= 3,
        "{closed_connects} connects in 3 s after close()"
    );
    // Dropped: the checks end.
    drop(open);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after_drop = open_proxy.accepted_connections();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        open_proxy.accepted_connections(),
        after_drop,
        "connects after the backend was dropped"
    );
}
