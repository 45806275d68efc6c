//! `CacheReloader` on tokio's paused clock: lazy, eager and refresh-ahead reloading, scheduled
//! reloads with callbacks, `reload_key`, errors, and timers that end when asked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{alive_tasks, memory_cache};
use ncm_cache_core::{CacheError, KeyTtl};
use ncm_cache_loader::{CacheReloader, ReloadStrategy};

type CountFuture = std::pin::Pin<Box<dyn Future<Output = Result<u64, std::io::Error>> + Send>>;

/// A loader returning 1, 2, 3, ... (after `delay`), and its run counter.
fn counter(
    delay: Duration,
) -> (
    Arc<AtomicU64>,
    impl Fn() -> CountFuture + Send + Sync + 'static,
) {
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    let f = move || {
        let r = r.clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(r.fetch_add(1, Ordering::SeqCst) + 1)
        }) as CountFuture
    };
    (runs, f)
}

const SEC: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn lazy_reloads_on_access_after_expiry() {
    let reloader = CacheReloader::new(memory_cache());
    let (runs, f) = counter(Duration::ZERO);
    reloader
        .register_loader("fresh_data", f, 10 * SEC, ReloadStrategy::Lazy)
        .unwrap();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "lazy: nothing before the first read"
    );
    assert_eq!(reloader.get::<u64>("fresh_data").await.unwrap(), 1);
    tokio::time::advance(9 * SEC).await;
    assert_eq!(reloader.get::<u64>("fresh_data").await.unwrap(), 1);
    tokio::time::advance(2 * SEC).await;
    assert_eq!(reloader.get::<u64>("fresh_data").await.unwrap(), 2);
    let stats = reloader.stats("fresh_data").unwrap();
    assert_eq!(
        (stats.reads, stats.hits, stats.misses, stats.reloads),
        (3, 1, 2, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn eager_readers_never_miss_across_ten_expiry_periods() {
    let cache = memory_cache();
    let reloader = CacheReloader::new(cache.clone());
    let (runs, f) = counter(200 * Duration::from_millis(1));
    let ttl = 10 * SEC;
    reloader
        .register_loader("hot", f, ttl, ReloadStrategy::Eager)
        .unwrap();
    // The eager timer loads at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Constant load: 8 readers, each reading every 25 ms for 10 TTLs.
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let (reloader, cache) = (reloader.clone(), cache.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(3 * i)).await;
                let mut reads = 0u64;
                let end = tokio::time::Instant::now() + 10 * ttl;
                while tokio::time::Instant::now() < end {
                    assert!(
                        cache.get::<u64>("hot").await.unwrap().is_some(),
                        "a reader saw the key missing"
                    );
                    let _: u64 = reloader.get("hot").await.unwrap();
                    reads += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                reads
            })
        })
        .collect();
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    let stats = reloader.stats("hot").unwrap();
    assert_eq!(stats.misses, 0, "{stats:?}");
    assert_eq!(stats.hits, reads);
    assert!(reads > 8 * 3900, "{reads}");
    // One reload per 8 s (80 % of the TTL) over ~100 s.
    let n = runs.load(Ordering::SeqCst);
    assert!((13..=15).contains(&n), "{n} reloads");
    assert_eq!(stats.owned_ticks, n);
    reloader.shutdown().await;
}

/// With `ttl_jitter` the cache may store an Eager value for as little as half its TTL; the
/// timer reloads it before the shortest of them ends. Before, it reloaded at 80 % of the full
/// TTL, and readers missed in most periods (review, helper-71).
#[tokio::test(start_paused = true)]
async fn eager_readers_never_miss_with_ttl_jitter() {
    let cache = ncm_cache_core::Cache::builder(
        common::memory_backend(),
        ncm_cache_codec::Serializer::default(),
    )
    .ttl_jitter(0.5)
    .build();
    let reloader = CacheReloader::new(cache.clone());
    let (runs, f) = counter(200 * Duration::from_millis(1));
    let ttl = 10 * SEC;
    reloader
        .register_loader("jittered", f, ttl, ReloadStrategy::Eager)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let end = tokio::time::Instant::now() + 10 * ttl;
    let mut reads = 0u64;
    while tokio::time::Instant::now() < end {
        assert!(
            cache.get::<u64>("jittered").await.unwrap().is_some(),
            "a reader saw the key missing after {reads} reads"
        );
        reads += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(reloader.stats("jittered").unwrap().misses, 0);
    // One reload per 4 s (80 % of the shortest TTL, 5 s) over ~100 s.
    let n = runs.load(Ordering::SeqCst);
    assert!((24..=27).contains(&n), "{n} reloads");
    reloader.shutdown().await;
}

/// A schedule of `a:eager` is not the eager timer of `a`: both run (review, helper-71: the
/// schedule's timer name was `reload:{name}`, so it replaced `a`'s eager timer).
#[tokio::test(start_paused = true)]
async fn timers_of_names_that_look_alike_stay_apart() {
    let reloader = CacheReloader::new(memory_cache());
    let (eager_runs, f) = counter(Duration::from_millis(1));
    reloader
        .register_loader("a", f, 10 * SEC, ReloadStrategy::Eager)
        .unwrap();
    let (scheduled_runs, g) = counter(Duration::from_millis(1));
    reloader
        .schedule_reload("a:eager", 60 * SEC, g)
        .await
        .unwrap();
    tokio::time::sleep(100 * SEC).await;
    // `a` every 8 s (80 % of its TTL) from the start; `a:eager` every 60 s.
    let (eager, scheduled) = (
        eager_runs.load(Ordering::SeqCst),
        scheduled_runs.load(Ordering::SeqCst),
    );
    assert!(
        (12..=14).contains(&eager),
        "a's eager timer ran {eager} times"
    );
    assert_eq!(scheduled, 1, "a:eager's schedule");
    assert!(reloader.cancel_reload("a:eager").await);
    tokio::time::sleep(20 * SEC).await;
    assert!(
        eager_runs.load(Ordering::SeqCst) > eager,
        "cancelling a:eager's schedule stopped a's eager timer"
    );
    reloader.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_serves_the_old_value_and_reloads_in_the_background() {
    let reloader = CacheReloader::new(memory_cache());
    let (runs, f) = counter(SEC);
    reloader
        .register_loader("ra", f, 10 * SEC, ReloadStrategy::refresh_ahead())
        .unwrap();
    assert_eq!(reloader.get::<u64>("ra").await.unwrap(), 1);
    tokio::time::advance(5 * SEC).await;
    assert_eq!(reloader.get::<u64>("ra").await.unwrap(), 1);
    assert_eq!(reloader.stats("ra").unwrap().refresh_ahead, 0, "too early");

    tokio::time::advance(3 * SEC + Duration::from_millis(500)).await;
    // Past 80 % of the TTL: reads get the old value at once; one refresh starts.
    for _ in 0..10 {
        assert_eq!(reloader.get::<u64>("ra").await.unwrap(), 1);
    }
    assert_eq!(reloader.stats("ra").unwrap().refresh_ahead, 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(reloader.get::<u64>("ra").await.unwrap(), 2);
    let KeyTtl::Expires(left) = reloader.cache().ttl_state("ra").await.unwrap() else {
        panic!("no ttl")
    };
    assert!(left > 9 * SEC, "the refresh restarted the TTL: {left:?}");
    let stats = reloader.stats("ra").unwrap();
    assert_eq!(stats.misses, 1, "only the very first read missed");
}

#[tokio::test(start_paused = true)]
async fn scheduled_reloads_tick_run_callbacks_and_stop() {
    let reloader = CacheReloader::new(memory_cache());
    let (_, first) = counter(Duration::ZERO);
    reloader
        .register_loader("fresh_data", first, 300 * SEC, ReloadStrategy::Lazy)
        .unwrap();
    let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let s = seen.clone();
    reloader
        .add_reload_callback("fresh_data", move |key: &str, value: &u64| {
            s.lock().unwrap().push((key.to_owned(), *value));
        })
        .unwrap();
    let baseline = alive_tasks();

    let (runs, scheduled) = counter(Duration::ZERO);
    reloader
        .schedule_reload("fresh_data", 60 * SEC, scheduled)
        .await
        .unwrap();
    assert_eq!(alive_tasks(), baseline + 1);
    tokio::time::sleep(59 * SEC).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the first tick is one interval away"
    );
    tokio::time::sleep(4 * 60 * SEC).await;
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    assert_eq!(reloader.get::<u64>("fresh_data").await.unwrap(), 4);
    assert_eq!(
        *seen.lock().unwrap(),
        (1..=4)
            .map(|v| ("fresh_data".to_string(), v))
            .collect::<Vec<_>>()
    );
    assert_eq!(reloader.stats("fresh_data").unwrap().owned_ticks, 4);

    assert!(reloader.cancel_reload("fresh_data").await);
    assert_eq!(alive_tasks(), baseline);
    assert!(!reloader.cancel_reload("fresh_data").await);
    tokio::time::sleep(10 * 60 * SEC).await;
    assert_eq!(runs.load(Ordering::SeqCst), 4, "no ticks after cancel");
}

#[tokio::test(start_paused = true)]
async fn reload_key_forces_or_fills_only_missing_values() {
    let reloader = CacheReloader::new(memory_cache());
    let (runs, f) = counter(Duration::ZERO);
    reloader
        .register_loader("k", f, 10 * SEC, ReloadStrategy::Lazy)
        .unwrap();
    assert!(
        reloader.reload_key("k", false).await.unwrap(),
        "missing: loads"
    );
    assert!(
        !reloader.reload_key("k", false).await.unwrap(),
        "present: no load"
    );
    assert!(reloader.reload_key("k", true).await.unwrap());
    assert_eq!(reloader.get::<u64>("k").await.unwrap(), 2);
    tokio::time::advance(11 * SEC).await;
    assert!(
        reloader.reload_key("k", false).await.unwrap(),
        "expired: loads"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// A forced `reload_key` called while another forced reload of the name runs in this process
/// must not settle for that one: its loader read the source before this call began.
#[tokio::test(start_paused = true)]
async fn a_forced_reload_does_not_settle_for_one_begun_before_it() {
    let reloader = CacheReloader::new(memory_cache());
    let source = Arc::new(AtomicU64::new(1));
    let runs = Arc::new(AtomicU64::new(0));
    let (s, r) = (Arc::clone(&source), Arc::clone(&runs));
    reloader
        .register_loader(
            "k",
            move || {
                let (s, r) = (Arc::clone(&s), Arc::clone(&r));
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    // The source is read first, then the load takes a second.
                    let read = s.load(Ordering::SeqCst);
                    tokio::time::sleep(SEC).await;
                    Ok::<_, std::io::Error>(read)
                }
            },
            60 * SEC,
            ReloadStrategy::Lazy,
        )
        .unwrap();
    let reloader = Arc::new(reloader);
    let first = tokio::spawn({
        let reloader = Arc::clone(&reloader);
        async move { reloader.reload_key("k", true).await }
    });
    tokio::time::sleep(SEC / 10).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the first reload is running"
    );
    // The source changes, then a second forced reload is asked for.
    source.store(2, Ordering::SeqCst);
    let second = tokio::spawn({
        let reloader = Arc::clone(&reloader);
        async move { reloader.reload_key("k", true).await }
    });
    assert!(first.await.unwrap().unwrap());
    assert!(second.await.unwrap().unwrap());
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the second reload ran its own load"
    );
    assert_eq!(
        reloader.get::<u64>("k").await.unwrap(),
        2,
        "the cache kept a value read before the second reload was asked for"
    );
}

/// The same when the earlier forced reload fails: the later one is not handed its error (the
/// source may have recovered since), it runs its own load.
#[tokio::test(start_paused = true)]
async fn a_forced_reload_does_not_settle_for_the_error_of_one_begun_before_it() {
    let reloader = Arc::new(CacheReloader::new(memory_cache()));
    let runs = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&runs);
    reloader
        .register_loader(
            "k",
            move || {
                let r = Arc::clone(&r);
                async move {
                    // The first run finds the source down; it is back for the second.
                    let n = r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(SEC).await;
                    if n == 0 {
                        Err(std::io::Error::other("source down"))
                    } else {
                        Ok(7u64)
                    }
                }
            },
            60 * SEC,
            ReloadStrategy::Lazy,
        )
        .unwrap();
    let first = tokio::spawn({
        let reloader = Arc::clone(&reloader);
        async move { reloader.reload_key("k", true).await }
    });
    tokio::time::sleep(SEC / 10).await;
    let second = tokio::spawn({
        let reloader = Arc::clone(&reloader);
        async move { reloader.reload_key("k", true).await }
    });
    assert!(first.await.unwrap().is_err());
    assert!(
        second
            .await
            .unwrap()
            .expect("handed the error of a reload begun before it"),
        "no loader ran for the second reload"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(reloader.get::<u64>("k").await.unwrap(), 7);
}

/// A lazy read after this process deleted the value does not join a lazy load begun before
/// the delete (whose loader read the source before it): its flight is named by the value's
/// load mark, as `CacheLoader`'s are.
#[tokio::test(start_paused = true)]
async fn a_lazy_read_after_a_delete_does_not_join_a_load_begun_before_it() {
    let cache = memory_cache();
    let reloader = Arc::new(CacheReloader::new(cache.clone()));
    let source = Arc::new(AtomicU64::new(1));
    let s = Arc::clone(&source);
    reloader
        .register_loader(
            "k",
            move || {
                let s = Arc::clone(&s);
                async move {
                    let read = s.load(Ordering::SeqCst);
                    tokio::time::sleep(SEC).await;
                    Ok::<_, std::io::Error>(read)
                }
            },
            60 * SEC,
            ReloadStrategy::Lazy,
        )
        .unwrap();
    let first = tokio::spawn({
        let reloader = Arc::clone(&reloader);
        async move { reloader.get::<u64>("k").await }
    });
    tokio::time::sleep(SEC / 10).await;
    // The source changes, and the value is deleted (cache-aside), while the first load runs.
    source.store(2, Ordering::SeqCst);
    cache.delete("k").await.unwrap();
    let second = tokio::spawn({
        let reloader = Arc::clone(&reloader);
        async move { reloader.get::<u64>("k").await }
    });
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(
        second.await.unwrap().unwrap(),
        2,
        "a read after the delete was handed a load begun before it"
    );
    assert_eq!(reloader.get::<u64>("k").await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn schedule_reload_registers_unknown_names_and_checks_types() {
    let reloader = CacheReloader::builder(memory_cache())
        .default_ttl(120 * SEC)
        .build();
    reloader
        .schedule_reload("new", 30 * SEC, || async {
            Ok::<_, String>("v".to_string())
        })
        .await
        .unwrap();
    tokio::time::sleep(31 * SEC).await;
    assert_eq!(
        reloader
            .cache()
            .get::<String>("new")
            .await
            .unwrap()
            .as_deref(),
        Some("v")
    );
    let left = reloader.cache().get_ttl("new").await.unwrap().unwrap();
    assert!(left > 118 * SEC && left <= 120 * SEC, "{left:?}");

    let err = reloader
        .schedule_reload("new", 30 * SEC, || async { Ok::<_, String>(1u8) })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("holds `alloc::string::String`"),
        "{err}"
    );
    assert!(reloader.get::<u8>("new").await.is_err());
    assert!(
        reloader
            .add_reload_callback("new", |_: &str, _: &u8| {})
            .is_err()
    );
    assert!(reloader.get::<String>("missing").await.is_err());
    let bad = ReloadStrategy::RefreshAhead { fraction: 1.5 };
    assert!(
        reloader
            .register_loader("x", || async { Ok::<_, String>(1) }, SEC, bad)
            .is_err()
    );
    assert!(
        reloader
            .register_loader(
                "x",
                || async { Ok::<_, String>(1) },
                Duration::ZERO,
                ReloadStrategy::Lazy
            )
            .is_err()
    );
    reloader.shutdown().await;
}

/// A refresh-ahead entry with a TTL of `Duration::MAX` and a fraction so small that
/// `1 - fraction` rounds to 1: a cache hit computed `Duration::MAX × 1.0`, which overflows and
/// panicked in `mul_f64` (review, helper-83 #3). The TTL is capped first, as the eager timer's.
#[tokio::test]
async fn refresh_ahead_with_an_endless_ttl_and_a_tiny_fraction_never_panics() {
    let reloader = CacheReloader::new(memory_cache());
    let tiny = ReloadStrategy::RefreshAhead { fraction: 1e-20 };
    reloader
        .register_loader(
            "endless",
            || async { Ok::<_, String>(7u32) },
            Duration::MAX,
            tiny,
        )
        .unwrap();
    for _ in 0..3 {
        assert_eq!(reloader.get::<u32>("endless").await.unwrap(), 7);
    }
    reloader.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn loader_errors_are_returned_and_not_cached() {
    let reloader = CacheReloader::new(memory_cache());
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    reloader
        .register_loader(
            "flaky",
            move || {
                let r = r.clone();
                async move {
                    match r.fetch_add(1, Ordering::SeqCst) {
                        0 => Err("source down"),
                        n => Ok(n),
                    }
                }
            },
            10 * SEC,
            ReloadStrategy::Lazy,
        )
        .unwrap();
    let err = reloader.get::<u64>("flaky").await.unwrap_err();
    assert!(matches!(err, CacheError::Loader(_)) && err.to_string().contains("source down"));
    assert_eq!(reloader.get::<u64>("flaky").await.unwrap(), 1);
    assert_eq!(reloader.stats("flaky").unwrap().errors, 1);
}

#[tokio::test(start_paused = true)]
async fn eager_retries_a_failed_reload_before_expiry() {
    let reloader = CacheReloader::new(memory_cache());
    let runs = Arc::new(AtomicU64::new(0));
    let r = runs.clone();
    reloader
        .register_loader(
            "e",
            move || {
                let r = r.clone();
                async move {
                    // The second reload (at 8 s) fails; its retry at 10 s succeeds.
                    match r.fetch_add(1, Ordering::SeqCst) {
                        1 => Err("blip"),
                        n => Ok(n),
                    }
                }
            },
            10 * SEC,
            ReloadStrategy::Eager,
        )
        .unwrap();
    tokio::time::sleep(9 * SEC).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    tokio::time::sleep(1100 * Duration::from_millis(1)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "retried after a quarter interval"
    );
    assert_eq!(reloader.cache().get::<u64>("e").await.unwrap(), Some(2));
    reloader.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_and_drop_end_every_timer() {
    let baseline = alive_tasks();
    let reloader = CacheReloader::new(memory_cache());
    let (_, a) = counter(Duration::ZERO);
    let (_, b) = counter(Duration::ZERO);
    reloader
        .register_loader("a", a, 10 * SEC, ReloadStrategy::Eager)
        .unwrap();
    reloader.schedule_reload("b", 5 * SEC, b).await.unwrap();
    tokio::time::sleep(SEC).await;
    assert_eq!(alive_tasks(), baseline + 2);
    reloader.shutdown().await;
    assert_eq!(alive_tasks(), baseline);

    let (_, c) = counter(Duration::ZERO);
    reloader
        .register_loader("c", c, 10 * SEC, ReloadStrategy::Eager)
        .unwrap();
    tokio::time::sleep(SEC).await;
    assert_eq!(alive_tasks(), baseline + 1);
    drop(reloader);
    tokio::time::sleep(20 * SEC).await;
    assert_eq!(alive_tasks(), baseline, "a dropped reloader's timers end");
}

/// A loader that panics once (found by review): before, the panic ended an Eager timer for
/// good, and left refresh-ahead's "refreshing" flag set, so that name was never refreshed
/// again. Now a panic is a failed reload: counted, retried, and the next refresh runs.
#[tokio::test(start_paused = true)]
async fn a_panicking_loader_stops_neither_eager_reloads_nor_refresh_ahead() {
    fn panics_once(
        runs: &Arc<AtomicU64>,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<u64, String>> + Send>>
    + Send
    + Sync
    + 'static {
        let r = runs.clone();
        move || {
            let r = r.clone();
            Box::pin(async move {
                match r.fetch_add(1, Ordering::SeqCst) {
                    1 => panic!("a loader bug"),
                    n => Ok(n + 1),
                }
            })
        }
    }
    let reloader = CacheReloader::new(memory_cache());
    let eager = Arc::new(AtomicU64::new(0));
    reloader
        .register_loader("e", panics_once(&eager), 10 * SEC, ReloadStrategy::Eager)
        .unwrap();
    // Reloads at 0 s and 8 s (the panic); the retry a quarter interval later.
    tokio::time::sleep(9 * SEC).await;
    assert_eq!(eager.load(Ordering::SeqCst), 2);
    tokio::time::sleep(1100 * Duration::from_millis(1)).await;
    assert_eq!(
        eager.load(Ordering::SeqCst),
        3,
        "the timer ended with the panic"
    );
    assert_eq!(reloader.cache().get::<u64>("e").await.unwrap(), Some(3));
    assert!(
        reloader.stats("e").unwrap().errors >= 1,
        "the panic counts as an error"
    );

    let ahead = Arc::new(AtomicU64::new(0));
    reloader
        .register_loader(
            "ra",
            panics_once(&ahead),
            10 * SEC,
            ReloadStrategy::refresh_ahead(),
        )
        .unwrap();
    assert_eq!(reloader.get::<u64>("ra").await.unwrap(), 1);
    tokio::time::advance(8 * SEC + Duration::from_millis(500)).await;
    // The first refresh panics; the next read past 80 % starts another.
    assert_eq!(reloader.get::<u64>("ra").await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ahead.load(Ordering::SeqCst), 2);
    assert_eq!(reloader.get::<u64>("ra").await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        ahead.load(Ordering::SeqCst),
        3,
        "no refresh ran again after the panic"
    );
    assert_eq!(reloader.get::<u64>("ra").await.unwrap(), 3);
    reloader.shutdown().await;
}
