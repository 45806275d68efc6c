//! Two `CacheReloader` instances on one real Redis (a throwaway `redis-server`): a scheduled
//! reload has one owner, so each tick runs the loader once in total; a lazy miss on both
//! instances at once loads once; the schedule moves to the other instance when its owner stops.
//!
//! Also a `CacheLoader` (not a reloader) over plain Redis: an invalidation made right after
//! a `WriteBehind` load lands after that load's store.
//!
//! Redis has no paused clock, so these tests use real time with short intervals and count
//! loader runs per tick window.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ncm_cache_loader::{CacheReloader, ReloadStrategy};
use ncm_cache_redis::RedisCache;
use ncm_cache_testkit::RedisServer;

type Runs = Arc<Mutex<Vec<(&'static str, Instant)>>>;

fn recording_loader(
    instance: &'static str,
    runs: Runs,
    work: Duration,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<String, String>> + Send>>
+ Send
+ Sync
+ 'static {
    move || {
        let runs = runs.clone();
        Box::pin(async move {
            runs.lock().unwrap().push((instance, Instant::now()));
            tokio::time::sleep(work).await;
            Ok(format!("from {instance}"))
        })
    }
}

async fn two_instances(server: &RedisServer) -> (CacheReloader, CacheReloader) {
    let a = RedisCache::from_url(&server.url()).await.unwrap();
    let b = RedisCache::from_url(&server.url()).await.unwrap();
    let lock_wait = Duration::from_secs(2);
    (
        CacheReloader::redis(&a).lock_wait(lock_wait).build(),
        CacheReloader::redis(&b).lock_wait(lock_wait).build(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scheduled_tick_runs_the_loader_once_across_two_instances() {
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let (a, b) = two_instances(&server).await;
    let runs: Runs = Arc::default();
    let interval = Duration::from_millis(200);
    let work = Duration::from_millis(20);

    let started = Instant::now();
    a.schedule_reload(
        "shared",
        interval,
        recording_loader("a", runs.clone(), work),
    )
    .await
    .unwrap();
    // Offset the second instance's ticks by a third of an interval.
    tokio::time::sleep(Duration::from_millis(70)).await;
    b.schedule_reload(
        "shared",
        interval,
        recording_loader("b", runs.clone(), work),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let elapsed = started.elapsed();

    let seen = runs.lock().unwrap().clone();
    let ticks = (elapsed.as_millis() / interval.as_millis()) as usize;
    // At most one run per tick (fewer only if this machine stalls the timers).
    assert!(
        (ticks / 2..=ticks).contains(&seen.len()),
        "{} runs for {ticks} ticks: {seen:?}",
        seen.len()
    );
    // One owner at a time: `a`, which scheduled first, keeps the timer while it renews its
    // lease (a quarter of the interval: 50 ms) in time. On a loaded machine a renewal can come
    // late and `b` then takes over (seen once in CI: five runs by `a`, then five by `b`); a
    // change of owner never adds a run (the gaps below), so it is allowed, but rarely.
    let changes = seen.windows(2).filter(|p| p[0].0 != p[1].0).count();
    assert!(
        seen.first().is_some_and(|(who, _)| *who == "a") && changes <= 2,
        "one owner at a time, rarely changing: {seen:?}"
    );
    for pair in seen.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap >= interval / 2,
            "two runs in one tick window ({gap:?}): {seen:?}"
        );
    }
    // Each run counted as a tick owned by the instance that ran it; the ticks the other
    // instance let pass (all `b`'s while `a` owns the timer).
    let (sa, sb) = (a.stats("shared").unwrap(), b.stats("shared").unwrap());
    let ran_by = |who: &str| seen.iter().filter(|(w, _)| *w == who).count();
    assert_eq!(sa.owned_ticks as usize, ran_by("a"));
    assert_eq!(sb.owned_ticks as usize, ran_by("b"));
    assert!(
        (sa.skipped_ticks + sb.skipped_ticks) as usize >= ticks / 2,
        "{sa:?} {sb:?}"
    );

    // `a` stops: its lease (if it holds it) is released and `b` runs the schedule.
    assert!(a.cancel_reload("shared").await);
    let before = runs.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while runs.lock().unwrap().len() < before + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after: Vec<_> = runs.lock().unwrap()[before..].to_vec();
    assert!(
        after.len() >= 2 && after.iter().all(|(who, _)| *who == "b"),
        "{after:?}"
    );
    b.shutdown().await;
    a.shutdown().await;
    let value: Option<String> = b.cache().get("shared").await.unwrap();
    assert_eq!(value.as_deref(), Some("from b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_on_two_instances_at_once_loads_once() {
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let (a, b) = two_instances(&server).await;
    let runs: Runs = Arc::default();
    let work = Duration::from_millis(300);
    let ttl = Duration::from_secs(60);
    a.register_loader(
        "cold",
        recording_loader("a", runs.clone(), work),
        ttl,
        ReloadStrategy::Lazy,
    )
    .unwrap();
    b.register_loader(
        "cold",
        recording_loader("b", runs.clone(), work),
        ttl,
        ReloadStrategy::Lazy,
    )
    .unwrap();

    let readers: Vec<_> = (0..20)
        .map(|i| {
            let r = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { r.get::<String>("cold").await.unwrap() })
        })
        .collect();
    let mut values = Vec::new();
    for r in readers {
        values.push(r.await.unwrap());
    }
    assert_eq!(
        runs.lock().unwrap().len(),
        1,
        "one load across both instances"
    );
    assert!(values.windows(2).all(|w| w[0] == w[1]), "{values:?}");

    // A forced reload on each instance at once: they take turns, never overlap.
    runs.lock().unwrap().clear();
    let (fa, fb) = tokio::join!(a.reload_key("cold", true), b.reload_key("cold", true));
    let ran = [fa.unwrap(), fb.unwrap()];
    let seen = runs.lock().unwrap().clone();
    assert_eq!(seen.len(), ran.iter().filter(|r| **r).count());
    assert!(!seen.is_empty());
    if let [first, second] = seen.as_slice() {
        assert!(second.1 - first.1 >= work, "reloads overlapped: {seen:?}");
    }
}

/// An instance that takes a schedule over while another instance's reload of the value is
/// still running (as when the old owner stalled past its short timer lease — a loaded CI run
/// saw two runs 52 ms apart) does not run the loader again at once: the reload was due by
/// the old value's age, but once the run lease is free the value is fresh, so the new owner
/// skips and runs one interval after that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_skips_the_run_another_instances_reload_just_made() {
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let (a, b) = two_instances(&server).await;
    let runs: Runs = Arc::default();
    let interval = Duration::from_millis(600);
    a.register_loader(
        "shared",
        recording_loader("a", runs.clone(), Duration::from_millis(300)),
        None,
        ReloadStrategy::Lazy,
    )
    .unwrap();
    assert!(a.reload_key("shared", true).await.unwrap());
    // Older than an interval: due at once for whoever owns the timer next.
    tokio::time::sleep(interval).await;
    // A's slow reload holds the run lease while B takes the schedule over.
    let a = Arc::new(a);
    let slow = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.reload_key("shared", true).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.schedule_reload(
        "shared",
        interval,
        recording_loader("b", runs.clone(), Duration::from_millis(10)),
    )
    .await
    .unwrap();
    assert!(slow.await.unwrap().unwrap());
    let written = Instant::now();
    tokio::time::sleep(interval / 3).await;
    let seen = runs.lock().unwrap().clone();
    assert!(
        seen.iter().all(|(who, _)| *who == "a"),
        "B ran right after A's reload wrote the value: {seen:?}"
    );
    // The schedule goes on: B runs about one interval after A's write.
    let start = Instant::now();
    while !runs.lock().unwrap().iter().any(|(who, _)| *who == "b") {
        assert!(
            start.elapsed() < interval * 3,
            "B never ran: {:?}",
            runs.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_b = runs
        .lock()
        .unwrap()
        .iter()
        .find(|(who, _)| *who == "b")
        .map(|(_, at)| *at)
        .unwrap();
    assert!(
        first_b >= written + interval / 2,
        "B ran {:?} after A's write",
        first_b - written
    );
    b.shutdown().await;
}

/// A reload whose run lease was lost mid-load (here: the lease key removed, as when its process
/// stalls past the lease TTL and another instance takes the lease) must not store its result
/// over the value the new holder stored meanwhile (found by review). Before, it did.
/// Registers `k` on `a` with a loader that signals `entered` and then waits for `gate` before
/// returning `from a, read before b's`, and on `b` with one returning `from b` at once.
fn gated_on_a(
    a: &CacheReloader,
    b: &CacheReloader,
) -> (Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>) {
    let entered = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Notify::new());
    let (e, g) = (Arc::clone(&entered), Arc::clone(&gate));
    a.register_loader(
        "k",
        move || {
            let (e, g) = (Arc::clone(&e), Arc::clone(&g));
            async move {
                e.notify_one();
                g.notified().await;
                Ok::<_, String>("from a, read before b's".to_owned())
            }
        },
        Duration::from_secs(60),
        ReloadStrategy::Lazy,
    )
    .unwrap();
    b.register_loader(
        "k",
        || async { Ok::<_, String>("from b".to_owned()) },
        Duration::from_secs(60),
        ReloadStrategy::Lazy,
    )
    .unwrap();
    (entered, gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_lost_its_lease_does_not_overwrite_the_new_holders_value() {
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let (a, b) = two_instances(&server).await;
    let (entered, gate) = gated_on_a(&a, &b);
    let slow = {
        let a = a.clone();
        tokio::spawn(async move { a.reload_key("k", true).await })
    };
    entered.notified().await;
    assert_eq!(
        server
            .cli(&["DEL", "__ncm:lock:reload:k:run"])
            .unwrap()
            .trim(),
        "1",
        "the run lease is held under its reserved key"
    );
    assert!(
        b.reload_key("k", true).await.unwrap(),
        "b took the lease and reloaded"
    );
    gate.notify_one();
    let _ = slow.await.unwrap();
    assert_eq!(
        b.get::<String>("k").await.unwrap(),
        "from b",
        "the reload that lost its lease overwrote the new holder's value"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// The same, when the lease check itself fails: A's connection stalls (its extend times out)
/// after B has taken the lease and stored. A must not store then: its `SET`, queued in the
/// stalled connection, would land once it heals and bring A's older read back (review,
/// helper-71: a failed check counted as "still ours").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_lease_check_fails_does_not_store() {
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let proxy = ncm_cache_testkit::FaultProxy::start(server.addr()).unwrap();
    let mut config = ncm_cache_redis::RedisConfig::from_url(&proxy.url()).unwrap();
    config.response_timeout = Duration::from_millis(300);
    config.health_check_interval = None;
    let a = RedisCache::connect(config).await.unwrap();
    let a = CacheReloader::redis(&a)
        .lock_wait(Duration::from_secs(2))
        .build();
    let b = RedisCache::from_url(&server.url()).await.unwrap();
    let b = CacheReloader::redis(&b)
        .lock_wait(Duration::from_secs(2))
        .build();
    let (entered, gate) = gated_on_a(&a, &b);
    let slow = {
        let a = a.clone();
        tokio::spawn(async move { a.reload_key("k", true).await })
    };
    entered.notified().await;
    server.cli(&["DEL", "__ncm:lock:reload:k:run"]).unwrap();
    assert!(b.reload_key("k", true).await.unwrap(), "b reloaded");
    // A's connection stalls: its lease check times out.
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Stall);
    gate.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("a's reload ends within its timeouts");
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    // Whatever the stalled connection held has reached the server by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored = server.cli(&["GET", "k"]).unwrap();
    assert!(
        stored.trim_end().ends_with("from b\""),
        "a's reload stored although its lease check failed: {stored:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Two instances read a refresh-ahead value late in its TTL at once: one reloads, the other
/// waits for the run lease and then takes the value just reloaded (review, helper-71: each
/// instance ran the loader in turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_on_two_instances_at_once_loads_once() {
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let (a, b) = two_instances(&server).await;
    let runs: Runs = Arc::default();
    let ttl = Duration::from_secs(4);
    for (r, name) in [(&a, "a"), (&b, "b")] {
        r.register_loader(
            "ra",
            recording_loader(name, runs.clone(), Duration::from_millis(300)),
            ttl,
            ReloadStrategy::RefreshAhead { fraction: 0.5 },
        )
        .unwrap();
    }
    let _: String = a.get("ra").await.unwrap();
    runs.lock().unwrap().clear();
    // Past half the TTL: a read starts a background refresh.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let (x, y) = tokio::join!(a.get::<String>("ra"), b.get::<String>("ra"));
    x.unwrap();
    y.unwrap();
    // Both refreshes end: one loads (300 ms), the other waits for its lease, then reads.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let ran = runs.lock().unwrap().len();
    assert_eq!(ran, 1, "refresh-ahead ran the loader on {ran} instances");
    a.shutdown().await;
    b.shutdown().await;
}

/// A lazy load after a miss stores only while the value is still absent: a write another
/// process made while the loader ran stays (before: the reload stored with a plain `SET` and
/// every instance read its older value for the TTL; found by review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_reload_after_a_miss_does_not_overwrite_a_write_made_during_it() {
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let ours = RedisCache::from_url(&server.url()).await.unwrap();
    let other = RedisCache::from_url(&server.url()).await.unwrap();
    let reloader = Arc::new(CacheReloader::redis(&ours).build());
    let runs: Runs = Arc::default();
    reloader
        .register_loader(
            "cfg",
            recording_loader("a", runs.clone(), Duration::from_millis(300)),
            None,
            ReloadStrategy::Lazy,
        )
        .unwrap();
    let read = tokio::spawn({
        let reloader = Arc::clone(&reloader);
        async move { reloader.get::<String>("cfg").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(runs.lock().unwrap().len(), 1, "the lazy load is running");
    // Another process writes the value (the source changed) while the load runs.
    other.set("cfg", &"from b".to_string()).await.unwrap();
    assert_eq!(
        read.await.unwrap().unwrap(),
        "from a",
        "the caller gets its load"
    );
    assert_eq!(
        other.get::<String>("cfg").await.unwrap().as_deref(),
        Some("from b"),
        "the lazy reload overwrote a newer write"
    );
}

/// An explicit forced `reload_key` that cannot get the run lease within `lock_wait` (another
/// instance's reload, begun before the call, holds it longer) does not report success with the
/// value that reload will store (its source read predates the call): it fails with a timeout
/// the caller can retry. Before (found by review) it answered `Ok(false)` with the older value,
/// and the source's change waited for the next interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_reload_that_cannot_get_the_lease_fails_instead_of_settling() {
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let (a, b) = two_instances(&server).await;
    let a = Arc::new(a);
    let source = Arc::new(Mutex::new("v1".to_string()));
    let reads_source = |work: Duration| {
        let source = Arc::clone(&source);
        move || {
            let seen = source.lock().unwrap().clone();
            Box::pin(async move {
                tokio::time::sleep(work).await;
                Ok::<_, String>(seen)
            }) as std::pin::Pin<Box<dyn Future<Output = Result<String, String>> + Send>>
        }
    };
    a.register_loader(
        "cfg",
        reads_source(Duration::from_secs(3)),
        Some(Duration::from_secs(60)),
        ReloadStrategy::Lazy,
    )
    .unwrap();
    b.register_loader(
        "cfg",
        reads_source(Duration::ZERO),
        Some(Duration::from_secs(60)),
        ReloadStrategy::Lazy,
    )
    .unwrap();
    let slow = tokio::spawn({
        let a = Arc::clone(&a);
        async move { a.reload_key("cfg", true).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    *source.lock().unwrap() = "v2".to_string();
    let forced = b.reload_key("cfg", true).await;
    assert!(
        matches!(forced, Err(ref e) if e.is_retryable()),
        "a forced reload settled for a load begun before it: {forced:?}"
    );
    assert!(slow.await.unwrap().unwrap());
    // Retried once the other reload ended: it runs and stores the source's new value.
    assert!(b.reload_key("cfg", true).await.unwrap());
    assert_eq!(b.get::<String>("cfg").await.unwrap(), "v2");
    a.shutdown().await;
    b.shutdown().await;
}

/// A scheduled reload refused the run lease (another instance's reload holds it) whose read of
/// the value fails (here: bytes this build cannot decode) does not load beside the holder:
/// without the lease its store could land after the holder's (review, helper-86 #2: it ran the
/// loader and stored with a plain `SET`, no lease check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_reload_refused_the_lease_does_not_load_beside_it_after_a_failed_read() {
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let ours = RedisCache::from_url(&server.url()).await.unwrap();
    let reloader = CacheReloader::redis(&ours)
        .lock_wait(Duration::from_millis(100))
        .build();
    // Another instance's reload holds the run lease; the value is unreadable here.
    server
        .cli(&["SET", "__ncm:lock:reload:cfg:run", "another", "PX", "60000"])
        .unwrap();
    server.cli(&["SET", "cfg", "not json {"]).unwrap();
    let runs: Runs = Arc::default();
    reloader
        .schedule_reload(
            "cfg",
            Duration::from_millis(150),
            recording_loader("a", runs.clone(), Duration::ZERO),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        runs.lock().unwrap().len(),
        0,
        "a timer reload ran beside the lease holder"
    );
    assert_eq!(server.cli(&["GET", "cfg"]).unwrap().trim(), "not json {");
    reloader.shutdown().await;
}

/// A refresh-ahead hit reads the value's TTL only once it may be due for a refresh (from the
/// TTL read last), not on every hit: before, each hit cost a `PTTL` round trip — over a
/// multi-level cache, a Redis call per L1 hit (review, helper-86 #3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_hits_read_the_ttl_once_per_refresh_point() {
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let ours = RedisCache::from_url(&server.url()).await.unwrap();
    let reloader = CacheReloader::redis(&ours).build();
    let runs: Runs = Arc::default();
    reloader
        .register_loader(
            "ra",
            recording_loader("a", runs.clone(), Duration::ZERO),
            Duration::from_secs(60),
            ReloadStrategy::RefreshAhead { fraction: 0.5 },
        )
        .unwrap();
    let _: String = reloader.get("ra").await.unwrap();
    let before = server.command_calls("PTTL").unwrap();
    for _ in 0..50 {
        let _: String = reloader.get("ra").await.unwrap();
    }
    let reads = server.command_calls("PTTL").unwrap() - before;
    assert!(
        reads <= 1,
        "{reads} TTL reads for 50 hits far from the refresh point"
    );
    assert_eq!(runs.lock().unwrap().len(), 1, "no refresh was due");
    reloader.shutdown().await;
}

/// A `WriteBehind` load returns before its store (a spawned task); the same task then
/// invalidates the key. On plain Redis (no load marks) the store was sent after the `DEL`
/// and put the value back for its TTL (review, helper-86 #4). On a current-thread runtime
/// the spawned store runs only once the caller waits on its `DEL`: before the fix, every run.
#[tokio::test(flavor = "current_thread")]
async fn an_invalidation_right_after_a_write_behind_load_lands_after_its_store() {
    use ncm_cache_core::CacheStrategy;
    use ncm_cache_loader::CacheLoader;
    let server = RedisServer::start().expect("redis-server (apt-get install redis-server)");
    let redis = RedisCache::from_url(&server.url()).await.unwrap();
    let loader = CacheLoader::new(redis.cache().clone());
    let handle = loader
        .register_loader(
            "user",
            |id: u32| async move { Ok::<_, std::io::Error>(format!("user {id}")) },
            None,
            CacheStrategy::WriteBehind,
        )
        .unwrap();
    for id in 0..20u32 {
        assert_eq!(handle.load(id).await.unwrap(), format!("user {id}"));
        // Three ways to invalidate, each right after the load: each finds the stored value.
        let removed = match id % 3 {
            0 => u64::from(handle.invalidate(&id).await.unwrap()),
            1 => u64::from(loader.invalidate("user", &id).await.unwrap()),
            _ => loader.invalidate_all("user").await.unwrap(),
        };
        assert_eq!(removed, 1, "load {id}: its store had not landed");
    }
    // Any store that was still to land has had time to.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left = server.cli(&["KEYS", "*loader:user:*"]).unwrap();
    assert!(
        left.trim().is_empty(),
        "values back after their invalidation: {left}"
    );
}
