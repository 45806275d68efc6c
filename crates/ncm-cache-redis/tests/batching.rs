//! Automatic batching (`RedisConfig::auto_batch`, on by default): concurrent gets share MGETs
//! and concurrent sets pipelines, and still every reply reaches exactly its own caller — under
//! a stall, a cut and a kill, with callers cancelled mid-batch, and with a write refused for
//! one key among many.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ncm_cache_core::{Bytes, CacheBackend, CacheError, SharedBackend};
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::{FaultProxy, ProxyMode, RedisServer};

const KEYS: usize = 200;

fn key(i: usize) -> String {
    format!("k{i}")
}

/// The value stored under key `i`: names its key, so a reply given to the wrong caller shows.
fn value(i: usize) -> Bytes {
    Bytes::from(format!("value-of-k{i}"))
}

async fn preload(cache: &SharedBackend) {
    for i in 0..KEYS {
        cache.set(&key(i), value(i), None).await.unwrap();
    }
}

/// `tasks` tasks doing `per_task` gets of random keys (duplicates among concurrent calls
/// included); every answer must be its own key's value. Returns (ok, errors).
async fn storm(cache: &SharedBackend, tasks: usize, per_task: usize) -> (usize, usize) {
    storm_until(cache, tasks, per_task, None, false).await
}

/// [`storm`], for at least `until` when given (then `per_task` is ignored), with missing keys
/// allowed when `restarted` (a restarted server is empty).
async fn storm_until(
    cache: &SharedBackend,
    tasks: usize,
    per_task: usize,
    until: Option<Instant>,
    restarted: bool,
) -> (usize, usize) {
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let cache = Arc::clone(cache);
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(t as u64);
                let (mut ok, mut err) = (0, 0);
                let mut n = 0;
                while until.map_or(n < per_task, |u| Instant::now() < u) {
                    n += 1;
                    // A small hot set: many concurrent calls read the same key.
                    let i = if rng.bool() {
                        rng.usize(..4)
                    } else {
                        rng.usize(..KEYS)
                    };
                    match cache.get(&key(i)).await {
                        Ok(Some(v)) => {
                            assert_eq!(v, value(i), "a reply reached the wrong caller");
                            ok += 1;
                        }
                        Ok(None) => assert!(restarted, "k{i} read as missing"),
                        Err(e) => {
                            assert!(e.is_timeout() || e.is_connection(), "{e:?}");
                            err += 1;
                        }
                    }
                }
                (ok, err)
            })
        })
        .collect();
    let mut total = (0, 0);
    for h in handles {
        let (ok, err) = h.await.unwrap();
        total.0 += ok;
        total.1 += err;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_share_mgets_and_each_caller_gets_its_own_value() {
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(support::config(&server))
        .await
        .unwrap()
        .backend();
    preload(&cache).await;
    let gets_before = server.command_calls("GET").unwrap();
    let (ok, err) = storm(&cache, 128, 100).await;
    assert_eq!((ok, err), (12_800, 0));
    let mgets = server.command_calls("MGET").unwrap();
    let gets = server.command_calls("GET").unwrap() - gets_before;
    println!("12,800 gets sent as {mgets} MGETs and {gets} GETs");
    assert!(mgets > 0, "no batch was formed");
    assert!(
        mgets + gets < 12_800 / 2,
        "batching saved little: {mgets} MGETs + {gets} GETs for 12,800 calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_batch_every_get_is_its_own_command() {
    let server = RedisServer::start().unwrap();
    let config = RedisConfig::from_url(&format!("{}?auto_batch=false", server.url())).unwrap();
    assert!(!config.auto_batch);
    let cache = RedisCache::connect(config).await.unwrap().backend();
    preload(&cache).await;
    let (ok, _) = storm(&cache, 32, 20).await;
    assert_eq!(ok, 640);
    assert_eq!(server.command_calls("MGET").unwrap(), 0);
}

/// On the pool's connections (`batch_socket=false`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_stall_cut_and_kill_no_reply_reaches_the_wrong_caller() {
    stall_cut_and_kill("?batch_socket=false").await;
}

/// The same with read batches on their own connection (`batch_socket`, the default; `wire.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_stall_cut_and_kill_no_reply_reaches_the_wrong_caller_on_the_batch_socket() {
    stall_cut_and_kill("?batch_socket=true").await;
}

async fn stall_cut_and_kill(options: &str) {
    let mut server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let cache = preloaded(&format!("{}{options}", proxy.url()), 200, 200).await;
    let faults = {
        let proxy_handle = std::thread::spawn(move || {
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(150));
                proxy.set_mode(ProxyMode::Stall);
                std::thread::sleep(Duration::from_millis(300));
                proxy.set_mode(ProxyMode::Pass);
                std::thread::sleep(Duration::from_millis(150));
                proxy.cut();
            }
            proxy
        });
        let until = Instant::now() + Duration::from_millis(1900);
        let (ok, err) = storm_until(&cache, 64, 0, Some(until), false).await;
        println!("under faults: {ok} answers, {err} errors");
        assert!(ok > 1000, "too few answers");
        assert!(err > 0, "the faults were not felt");
        proxy_handle.join().unwrap()
    };
    // A kill in the middle of a storm, then a restart: answers are right or typed errors.
    let storm_cache = Arc::clone(&cache);
    let until = Instant::now() + Duration::from_millis(1000);
    let during =
        tokio::spawn(async move { storm_until(&storm_cache, 64, 0, Some(until), true).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().unwrap();
    let (ok, err) = during.await.unwrap();
    println!("across a kill: {ok} answers, {err} errors");
    drop(faults);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_callers_do_not_fail_the_others_in_their_batch() {
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(support::config(&server))
        .await
        .unwrap()
        .backend();
    preload(&cache).await;
    for round in 0..20u64 {
        let handles: Vec<_> = (0..64usize)
            .map(|t| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move {
                    let i = (t * 7 + round as usize) % KEYS;
                    if t % 2 == 0 {
                        // Cancelled almost at once: maybe while leading a batch.
                        let _ = tokio::time::timeout(Duration::from_micros(20), cache.get(&key(i)))
                            .await;
                        None
                    } else {
                        Some((i, cache.get(&key(i)).await))
                    }
                })
            })
            .collect();
        for h in handles {
            if let Some((i, r)) = h.await.unwrap() {
                assert_eq!(r.unwrap(), Some(value(i)));
            }
        }
    }
}

/// A cache (keys preloaded) reaching its server through a proxy that now stalls: connect and
/// response timeouts in milliseconds.
async fn stalled(connect: u64, response: u64) -> (RedisServer, FaultProxy, SharedBackend) {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let cache = preloaded(&proxy.url(), connect, response).await;
    proxy.set_mode(ProxyMode::Stall);
    (server, proxy, cache)
}

/// A cache of `url` (no health checks; connect and response timeouts in milliseconds), its
/// keys preloaded.
async fn preloaded(url: &str, connect: u64, response: u64) -> SharedBackend {
    let mut config = RedisConfig::from_url(url).unwrap();
    config.response_timeout = Duration::from_millis(response);
    config.connect_timeout = Duration::from_millis(connect);
    config.health_check_interval = None;
    let cache = RedisCache::connect(config).await.unwrap().backend();
    preload(&cache).await;
    cache
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_times_each_batched_call_out_within_one_call_bound() {
    let (_server, proxy, cache) = stalled(200, 200).await;
    let handles: Vec<_> = (0..100usize)
        .map(|i| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move {
                let start = Instant::now();
                let r = if i % 2 == 0 {
                    cache.get(&key(i)).await.map(|_| ())
                } else {
                    cache.set(&key(i), value(i), None).await
                };
                (r, start.elapsed())
            })
        })
        .collect();
    for h in handles {
        let (r, took) = h.await.unwrap();
        let e = r.unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        // connect 200 ms + two read attempts of 200 ms, plus scheduling slack.
        assert!(took < Duration::from_millis(600 + 700), "waited {took:?}");
    }
    // Every failed call is counted, not one per failed batch.
    assert!(
        cache.get_stats().errors >= 100,
        "{} errors counted for 100 failed calls",
        cache.get_stats().errors
    );
    proxy.set_mode(ProxyMode::Pass);
}

/// Reads answered `Timeout` by their batch (their bound passed while it was in flight, or
/// while they were queued) are each counted once in the stats: a batch counts a timeout only
/// when its caller gets it, and a batch whose reads were all answered stops waiting without
/// counting the failure of its own request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_batched_read_that_times_out_is_counted_once() {
    let (_server, proxy, cache) = stalled(200, 200).await;
    sixty_four_reads_time_out_each_counted_once(&cache).await;
    proxy.set_mode(ProxyMode::Pass);
}

/// 64 concurrent reads of a stalled server: each times out, and the error count grows by 64.
async fn sixty_four_reads_time_out_each_counted_once(cache: &SharedBackend) {
    let before = cache.get_stats().errors;
    let reads: Vec<_> = (0..64usize)
        .map(|i| {
            let cache = Arc::clone(cache);
            tokio::spawn(async move { cache.get(&key(i)).await })
        })
        .collect();
    for r in reads {
        let e = r.await.unwrap().unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
    }
    // Requests abandoned when their reads timed out may still end later: wait past them.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(cache.get_stats().errors - before, 64);
}

/// The same on a batch connection already made (a read answered before the stall): what the
/// test above counts is a handshake that timed out, this one a batch that timed out on an
/// established connection (each read counted once, whether its batch was retried on a new
/// connection or not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_batched_read_that_times_out_on_an_established_connection_is_counted_once() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let cache = preloaded(&proxy.url(), 200, 200).await;
    assert_eq!(cache.get(&key(0)).await.unwrap(), Some(value(0)));
    proxy.set_mode(ProxyMode::Stall);
    sixty_four_reads_time_out_each_counted_once(&cache).await;
    proxy.set_mode(ProxyMode::Pass);
}

/// Reads queued behind batches already stalled still time out within their own bound (connect
/// + two response timeouts), counted from their call, not from when a batch took them: a
/// stalled batch holds its slot for two response timeouts, so a read that waited for one and
/// was then sent would take about four. A read's batch answers `Timeout` at the read's bound
/// (one timer per batch): the reads in flight, made earlier, reach theirs first, and a slot
/// whose reads are all answered takes the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_queued_behind_stalled_batches_time_out_within_their_own_bound() {
    let (_server, proxy, cache) = stalled(300, 500).await;
    let bound = Duration::from_millis(300 + 2 * 500);
    // Waves: the first ones take every batch slot; the later ones queue behind them.
    let mut handles = Vec::new();
    for wave in 0..4usize {
        for i in 0..16usize {
            let cache = Arc::clone(&cache);
            handles.push(tokio::spawn(async move {
                let start = Instant::now();
                let r = cache.get(&key(wave * 16 + i)).await;
                (r, start.elapsed())
            }));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for h in handles {
        let (r, took) = h.await.unwrap();
        let e = r.unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        assert!(
            took < bound + Duration::from_millis(350),
            "a read waited {took:?} (its bound {bound:?})"
        );
    }
    proxy.set_mode(ProxyMode::Pass);
}

/// A server whose user `app` may read and write `app:ok*` keys only, and a cache of that user.
async fn acl_cache() -> (RedisServer, SharedBackend) {
    let server = RedisServer::builder()
        .args([
            "--user", "app", "on", ">pw", "~app:ok*", "&*", "+@all", "--user", "default", "off",
        ])
        .start()
        .unwrap();
    let mut config = RedisConfig::from_url(&format!("redis://app:pw@{}", server.addr())).unwrap();
    config.key_prefix = "app:".into();
    config.health_check_interval = None;
    let cache = RedisCache::connect(config).await.unwrap().backend();
    (server, cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_fails_only_its_own_call() {
    // This user may write `app:ok*` keys only.
    let (_server, cache) = acl_cache().await;
    for _ in 0..20 {
        let handles: Vec<_> = (0..64usize)
            .map(|i| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move {
                    let k = if i % 3 == 0 {
                        format!("no{i}")
                    } else {
                        format!("ok{i}")
                    };
                    (i, cache.set(&k, value(i), None).await)
                })
            })
            .collect();
        for h in handles {
            let (i, r) = h.await.unwrap();
            if i % 3 == 0 {
                assert!(matches!(r, Err(CacheError::Auth(_))), "{r:?}");
            } else {
                r.unwrap();
            }
        }
    }
    assert_eq!(
        cache.get("ok1").await.unwrap(),
        Some(value(1)),
        "the allowed writes landed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_write_whose_caller_was_dropped_is_never_sent() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let mut config = RedisConfig::from_url(&proxy.url()).unwrap();
    config.response_timeout = Duration::from_secs(3);
    config.health_check_interval = None;
    let cache = RedisCache::connect(config).await.unwrap().backend();
    cache.set("k", value(0), None).await.unwrap();
    // Every write now takes 600 ms: four lone writes fill every batch slot, so the next write
    // is queued behind them.
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(300)));
    let busy: Vec<_> = (1..=4usize)
        .map(|i| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.set(&key(i), value(i), None).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The caller gives up on its own (its future is dropped while the write is queued) ...
    let gave_up =
        tokio::time::timeout(Duration::from_millis(20), cache.set("k", value(1), None)).await;
    assert!(gave_up.is_err(), "the write was expected to be queued");
    // ... and deletes the key; the delete is acknowledged before any slot frees up.
    assert!(cache.delete("k").await.unwrap());
    for b in busy {
        b.await.unwrap().unwrap();
    }
    proxy.set_mode(ProxyMode::Pass);
    // Had the dropped write gone out with the next batch, it would have landed after the delete.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        cache.get("k").await.unwrap(),
        None,
        "a write whose caller was dropped before it was sent came back after a later delete"
    );
}

/// Futures of `get` polled once and then left unpolled (kept alive, not dropped: a `select!`
/// arm the task no longer looks at, a task busy elsewhere) do not hold up everyone else's
/// reads: before, each held a batch slot until it was polled again, and four of them left no
/// slot, so every other `get` waited out its timeout. On the pool's connections
/// (`batch_socket=false`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_polled_once_then_parked_do_not_block_other_reads() {
    parked_gets("?batch_socket=false").await;
}

/// The same with read batches on their own connection (`batch_socket`, `wire.rs`): a lone
/// read sent from its caller's future holds no lock of that connection when left unpolled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_polled_once_then_parked_do_not_block_other_reads_on_the_batch_socket() {
    parked_gets("?batch_socket=true").await;
}

async fn parked_gets(options: &str) {
    let server = RedisServer::start().unwrap();
    let mut config = RedisConfig::from_url(&format!("{}{options}", server.url())).unwrap();
    config.response_timeout = Duration::from_millis(500);
    config.connect_timeout = Duration::from_millis(500);
    config.health_check_interval = None;
    let cache = RedisCache::connect(config).await.unwrap().backend();
    preload(&cache).await;
    let keys: Vec<String> = (0..8).map(key).collect();
    let mut parked = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let mut f = Box::pin(cache.get(k));
        // One poll sends it; then it is kept but not polled. (A reply fast enough to be read in
        // that very poll ends it there: it holds nothing, but its answer must be right. Seen
        // once in a loaded CI run.)
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await;
        match first {
            std::task::Poll::Pending => parked.push((i, f)),
            std::task::Poll::Ready(answer) => assert_eq!(answer.unwrap(), Some(value(i))),
        }
    }
    // More than the batch slots (4): enough to have held every one of them.
    assert!(parked.len() > 4, "only {} parked", parked.len());
    let start = Instant::now();
    let (ok, err) = storm(&cache, 16, 20).await;
    assert_eq!(
        err,
        0,
        "{err} of {} reads failed behind the parked ones",
        ok + err
    );
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "reads took {:?} behind the parked ones",
        start.elapsed()
    );
    // The parked ones still get their answers.
    for (i, f) in parked {
        assert_eq!(f.await.unwrap(), Some(value(i)));
    }
}

/// A write whose caller gives up while the connection is being re-established (the old one
/// cut after a failure, the new one stalled) is never applied once the connection is back —
/// as without batching, where the dropped call never reaches a socket. Before, the batch
/// claimed the write as soon as it had the connection manager, which then waited for the
/// reconnect and sent it seconds after its caller had gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_caller_gave_up_during_a_reconnect_is_never_applied() {
    let server = RedisServer::start().unwrap();
    // Batched on the batches' own connection (the default), batched on the pool's, unbatched.
    for (auto_batch, batch_socket) in [(true, true), (true, false), (false, false)] {
        let proxy = FaultProxy::start(server.addr()).unwrap();
        let mut config = RedisConfig::from_url(&proxy.url()).unwrap();
        config.connect_timeout = Duration::from_millis(400);
        config.response_timeout = Duration::from_millis(500);
        config.health_check_interval = None;
        config.auto_batch = auto_batch;
        config.batch_socket = batch_socket;
        let cache = RedisCache::connect(config).await.unwrap().backend();
        let k = format!("k:{auto_batch}:{batch_socket}");
        cache.set(&k, value(0), None).await.unwrap();
        proxy.set_mode(ProxyMode::Stall);
        proxy.cut();
        // Calls meet the cut connection until the connection manager is reconnecting (to a
        // stalled proxy): a call then waits for that and times out. (With the read batches on
        // their own connection, writes of the value the key holds.)
        let mut reconnecting = false;
        for _ in 0..10 {
            let call = if batch_socket {
                cache.set(&k, value(0), None).await
            } else {
                cache.get(&k).await.map(|_| ())
            };
            if let Err(e) = call
                && e.is_timeout()
            {
                reconnecting = true;
                break;
            }
        }
        assert!(reconnecting, "no call ever waited for the reconnect");
        // The caller gives up on its own while the reconnect is under way (or the call fails
        // first: a reconnect attempt under way since the cut may time out within the 100 ms,
        // and the write's batch, waiting for it, fails before it claimed the write).
        let label = format!("auto_batch {auto_batch}, batch_socket {batch_socket}");
        give_up_on_a_write_then_heal(&cache, &proxy, &k, &label).await;
    }
}

/// A write of `value(1)` to `k` (holding `value(0)`) whose caller gives up after 100 ms while
/// the connection is being re-established (or that fails at once); then the proxy heals: the
/// write must not have been applied after its caller had gone.
async fn give_up_on_a_write_then_heal(
    cache: &SharedBackend,
    proxy: &FaultProxy,
    k: &str,
    label: &str,
) {
    let gave_up =
        tokio::time::timeout(Duration::from_millis(100), cache.set(k, value(1), None)).await;
    assert!(
        !matches!(gave_up, Ok(Ok(()))),
        "{label}: the write was expected to wait for the reconnect: {gave_up:?}"
    );
    proxy.set_mode(ProxyMode::Pass);
    let start = Instant::now();
    while cache.get("probe").await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        cache.get(k).await.unwrap(),
        Some(value(0)),
        "{label}: a write whose caller gave up during a reconnect was applied after it"
    );
}

/// The same with no failed call first: the pool's connection is closed, so its connection
/// manager reconnects on its own (RESP3's disconnect notice) to a stalled proxy, and the very
/// first write after that is one whose caller gives up. The batch must wait for the new
/// connection before it claims the write, as after a failed call; before the notice marked
/// the connection, the write was claimed at once and applied when the connection came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_caller_gave_up_after_the_server_closed_the_connection_is_never_applied() {
    let server = RedisServer::start().unwrap();
    for batch_socket in [true, false] {
        let proxy = FaultProxy::start(server.addr()).unwrap();
        let mut config = RedisConfig::from_url(&proxy.url()).unwrap();
        config.connect_timeout = Duration::from_millis(400);
        config.response_timeout = Duration::from_millis(500);
        config.health_check_interval = None;
        config.batch_socket = batch_socket;
        let cache = RedisCache::connect(config).await.unwrap().backend();
        let k = format!("k:closed:{batch_socket}");
        cache.set(&k, value(0), None).await.unwrap();
        proxy.set_mode(ProxyMode::Stall);
        proxy.cut();
        // The close is seen and the reconnect (to the stalled proxy) under way. (On a busy
        // machine the write may instead meet the closed connection and fail at once: what
        // matters is that it is not applied later.)
        tokio::time::sleep(Duration::from_millis(100)).await;
        let label = format!("batch_socket {batch_socket}");
        give_up_on_a_write_then_heal(&cache, &proxy, &k, &label).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_refused_for_one_key_fails_only_its_own_call() {
    // This user may read and write `app:ok*` keys only: Redis refuses a whole MGET that
    // names any other key.
    let (_server, cache) = acl_cache().await;
    for i in 0..64 {
        cache.set(&format!("ok{i}"), value(i), None).await.unwrap();
    }
    let mut refused = 0;
    for _ in 0..20 {
        let handles: Vec<_> = (0..64usize)
            .map(|i| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move {
                    let k = if i % 3 == 0 {
                        format!("no{i}")
                    } else {
                        format!("ok{i}")
                    };
                    (i, cache.get(&k).await)
                })
            })
            .collect();
        for h in handles {
            let (i, r) = h.await.unwrap();
            if i % 3 == 0 {
                assert!(matches!(r, Err(CacheError::Auth(_))), "{r:?}");
                refused += 1;
            } else {
                assert_eq!(r.unwrap(), Some(value(i)), "an allowed read of ok{i}");
            }
        }
    }
    assert_eq!(refused, 20 * 22);
    // Each refused call counted once.
    assert_eq!(cache.get_stats().errors, 20 * 22);
}

/// A cache that outlives a runtime its calls ran on (a cache in a `static` shared by several
/// `#[tokio::test]`s, a runtime per request batch): the runtime is shut down while reads are
/// queued behind batches in flight. A task that a batch slot was handed to is then dropped
/// before it ever ran; its slot must still be given back. Before, each such shutdown lost
/// slots for good, and once all four were gone every read waited out its bound.
#[test]
fn batch_slots_survive_the_shutdown_of_a_runtime_the_reads_ran_on() {
    let server = RedisServer::start().unwrap();
    // The connection lives on this runtime, which outlives the others.
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cache = main.block_on(preloaded(&server.url(), 500, 500));
    for round in 0..20 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for t in 0..64usize {
            let cache = Arc::clone(&cache);
            rt.spawn(async move {
                for i in 0.. {
                    let _ = cache.get(&key((t * 7 + i) % KEYS)).await;
                }
            });
        }
        std::thread::sleep(Duration::from_millis(5 + round % 7));
        rt.shutdown_background();
        // Reads from the long-lived runtime still get batch slots at once.
        let took = main.block_on(async {
            let start = Instant::now();
            let reads: Vec<_> = (0..8)
                .map(|i| {
                    let cache = Arc::clone(&cache);
                    tokio::spawn(async move { cache.get(&key(i)).await })
                })
                .collect();
            for (i, r) in reads.into_iter().enumerate() {
                assert_eq!(r.await.unwrap().unwrap(), Some(value(i)), "round {round}");
            }
            start.elapsed()
        });
        assert!(
            took < Duration::from_millis(400),
            "round {round}: reads took {took:?} after a runtime was shut down (batch slots lost?)"
        );
    }
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// The runtime the cache connected on is shut down, as with a `static` cache first used by one
/// `#[tokio::test]` and then by the next ones: batch tasks spawned there would be dropped before
/// they ran (their slots lost: after four, every read waited out its bound, or forever once
/// reads kept no timer of their own). They run on their caller's runtime instead, and reads and
/// writes go on (after the connection, whose task died with that runtime, reconnects).
#[test]
fn batched_calls_go_on_after_the_runtime_the_cache_connected_on_shut_down() {
    let server = RedisServer::start().unwrap();
    let first = runtime(1);
    let cache = first.block_on(preloaded(&server.url(), 500, 500));
    drop(first);
    let callers = runtime(2);
    for round in 0..4 {
        let (ok, abandoned, failed) =
            callers.block_on(support::mixed_round(&cache, 64, KEYS, round));
        // The first calls may fail while the connection reconnects on this runtime; later a
        // rare timeout on a loaded machine is tolerated, a batch given up as abandoned is not.
        if round > 0 {
            assert_eq!(abandoned, 0, "round {round}: {abandoned} calls abandoned");
            assert!(
                failed <= 12,
                "round {round}: {failed} calls failed, {ok} answered"
            );
        }
    }
}

/// The runtime the cache connected on is alive but no longer driven (a `current_thread`
/// runtime whose `block_on` returned): neither the connection's task nor batch tasks run
/// there. A read from another runtime still ends within its bound (connect + two response
/// timeouts), by its own timer, instead of waiting for a batch that never runs.
#[test]
fn batched_reads_keep_their_bound_when_the_cache_runtime_is_not_driven() {
    let server = RedisServer::start().unwrap();
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = first.block_on(preloaded(&server.url(), 200, 200));
    let bound = Duration::from_millis(200 + 2 * 200);
    runtime(2).block_on(async {
        let reads: Vec<_> = (0..32usize)
            .map(|i| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move {
                    let start = Instant::now();
                    let r = tokio::time::timeout(Duration::from_secs(5), cache.get(&key(i))).await;
                    (r.is_ok(), start.elapsed())
                })
            })
            .collect();
        for r in reads {
            let (ended, took) = r.await.unwrap();
            assert!(ended, "a read hung");
            assert!(
                took < bound + Duration::from_millis(500),
                "a read took {took:?}"
            );
        }
    });
    drop(first);
}
