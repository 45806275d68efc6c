//! MultiLevelCache over an in-process L2: promotion, stampede, bounds, fail-safe, refresh.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ncm_cache_core::{CacheBackend, CacheError, CacheLevel, ManualClock, ValueSource};
use ncm_cache_memory::MemoryBackend;
use ncm_cache_multilevel::MultiLevelCache;

type Io = std::io::Error;

#[tokio::test]
async fn levels_promotion_and_sources() {
    let l2 = MemoryBackend::new();
    let cache = MultiLevelCache::builder(l2.clone())
        .promotion_threshold(2)
        .build()
        .unwrap();
    cache.set("user:1", "John".to_string()).await.unwrap();
    assert_eq!(
        cache
            .get_with_source::<String>("user:1")
            .await
            .unwrap()
            .unwrap()
            .1,
        ValueSource::L1
    );
    assert!(l2.get_now("user:1").unwrap().is_some(), "set writes L2 too");

    cache
        .set_at("only-l2", "x".to_string(), CacheLevel::L2)
        .await
        .unwrap();
    let src = |c: &MultiLevelCache, k: &'static str| {
        let c = c.clone();
        async move {
            c.get_with_source::<String>(k)
                .await
                .unwrap()
                .map(|(_, s)| s)
        }
    };
    assert_eq!(
        src(&cache, "only-l2").await,
        Some(ValueSource::L2),
        "1st L2 hit: not promoted yet"
    );
    assert_eq!(
        src(&cache, "only-l2").await,
        Some(ValueSource::L2),
        "2nd L2 hit: promoted now"
    );
    assert_eq!(src(&cache, "only-l2").await, Some(ValueSource::L1));
    assert_eq!(cache.get_stats().promotions, 1);

    cache
        .set_at("only-l1", "y".to_string(), CacheLevel::L1)
        .await
        .unwrap();
    assert!(l2.get_now("only-l1").unwrap().is_none());
    assert_eq!(src(&cache, "only-l1").await, Some(ValueSource::L1));

    assert!(cache.delete("user:1").await.unwrap());
    assert_eq!(cache.get::<String>("user:1").await.unwrap(), None);
    cache.clear().await.unwrap();
    assert_eq!(cache.l1_len(), 0);
    assert!(l2.is_empty());
    let stats = cache.get_stats();
    assert!(
        stats.l1_hits >= 2 && stats.l2_hits >= 2 && stats.misses >= 1,
        "{stats:?}"
    );
}

#[tokio::test]
async fn promotion_can_be_turned_off_and_types_are_checked() {
    let l2 = MemoryBackend::new();
    let cache = MultiLevelCache::builder(l2)
        .enable_promotion(false)
        .build()
        .unwrap();
    cache.set_at("k", 5u32, CacheLevel::L2).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            cache.get_with_source::<u32>("k").await.unwrap().unwrap().1,
            ValueSource::L2
        );
    }
    // The same key read as another type decodes from L2 rather than misreading L1.
    cache.set("n", 7u64).await.unwrap();
    assert_eq!(cache.get::<f64>("n").await.unwrap(), Some(7.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_loads_run_the_loader_once() {
    let cache = MultiLevelCache::builder(MemoryBackend::new())
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (cache, runs, barrier) = (cache.clone(), runs.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                cache
                    .get_or_load("cold", move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, Io>(42u64)
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 42);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A failing loader reaches every waiter, and the next call runs it again.
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (cache, runs, barrier) = (cache.clone(), runs.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                cache
                    .get_or_load::<u64, _, _, _>("failing", move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Err(Io::other("db down"))
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Err(CacheError::Loader(_))));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let v = cache
        .get_or_load("failing", || async { Ok::<_, Io>(1u64) })
        .await
        .unwrap();
    assert_eq!(v, 1, "the error was not cached");
}

#[tokio::test]
async fn l1_bounds_hold_under_100k_keys() {
    let cache = MultiLevelCache::builder(MemoryBackend::new())
        .l1_max_size(1_000)
        .l1_max_bytes(256 * 1024)
        .build()
        .unwrap();
    for i in 0..100_000u64 {
        cache
            .set_at(
                &format!("k{i}"),
                "v".repeat((i % 500) as usize),
                CacheLevel::L1,
            )
            .await
            .unwrap();
        if i % 5_000 == 0 {
            assert!(cache.l1_len() <= 1_000);
            assert!(cache.l1_weight() <= 256 * 1024);
        }
    }
    assert!(cache.l1_len() <= 1_000 && cache.l1_weight() <= 256 * 1024);
    assert!(cache.get_stats().l1.evictions > 90_000);
}

#[tokio::test]
async fn fail_safe_serves_stale_when_the_loader_and_l2_fail() {
    let clock = ManualClock::new();
    let l2 = MemoryBackend::new();
    let cache = MultiLevelCache::builder(l2.clone())
        .clock(Arc::new(clock.clone()))
        .l1_default_ttl(Duration::from_secs(60))
        .fail_safe(Duration::from_secs(600))
        .build()
        .unwrap();
    cache
        .get_or_load("k", || async { Ok::<_, Io>("v1".to_string()) })
        .await
        .unwrap();
    clock.advance(Duration::from_secs(61)); // stale in L1 now
    l2.close().await.unwrap(); // L2 down
    let (v, source) = cache
        .get_or_load_with_source::<String, _, _, _>("k", || async { Err(Io::other("db down")) })
        .await
        .unwrap();
    assert_eq!((v.as_str(), source), ("v1", ValueSource::Stale));
    // Past the max stale age there is nothing to fall back on.
    clock.advance(Duration::from_secs(600));
    let err = cache
        .get_or_load::<String, _, _, _>("k", || async { Err(Io::other("db down")) })
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Loader(_)), "{err:?}");
    assert!(cache.get_stats().stale_served >= 1);
}

#[tokio::test]
async fn circuit_breaker_skips_a_failing_l2() {
    let l2 = MemoryBackend::new();
    let cache = MultiLevelCache::builder(l2.clone())
        .breaker_threshold(3)
        .breaker_cooldown(Duration::from_secs(60))
        .build()
        .unwrap();
    l2.close().await.unwrap();
    for _ in 0..3 {
        assert!(cache.get::<u8>("k").await.unwrap_err().is_unavailable());
    }
    assert!(cache.l2_circuit_open());
    assert!(matches!(
        cache.get::<u8>("k").await,
        Err(CacheError::CircuitOpen(_))
    ));
    // The loader still serves while L2 is skipped.
    let v = cache
        .get_or_load("k", || async { Ok::<_, Io>(9u8) })
        .await
        .unwrap();
    assert_eq!(v, 9);
    assert_eq!(cache.get_stats().circuit_trips, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_refresh_reloads_in_the_background_once() {
    let clock = ManualClock::new();
    let cache = MultiLevelCache::builder(MemoryBackend::new())
        .clock(Arc::new(clock.clone()))
        .l1_default_ttl(Duration::from_secs(100))
        .eager_refresh(0.5)
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let load = |runs: Arc<AtomicUsize>| {
        move || async move { Ok::<_, Io>(runs.fetch_add(1, Ordering::SeqCst) as u64) }
    };
    assert_eq!(cache.get_or_load("k", load(runs.clone())).await.unwrap(), 0);
    clock.advance(Duration::from_secs(60)); // past 50 % of the TTL
    let mut refreshed = false;
    for _ in 0..20 {
        // Callers keep getting the current value while the one refresh runs, and the new one
        // once it landed (it runs on the other worker thread: it may land during this loop).
        let v = cache.get_or_load("k", load(runs.clone())).await.unwrap();
        assert!(
            v == 1 || (v == 0 && !refreshed),
            "got {v} (refreshed: {refreshed})"
        );
        refreshed |= v == 1;
    }
    for _ in 0..100 {
        if cache.get::<u64>("k").await.unwrap() == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        cache.get::<u64>("k").await.unwrap(),
        Some(1),
        "refreshed in the background"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "one load, then exactly one refresh"
    );
}

/// A refresh whose loader panics must not leave the key marked "refreshing": the next hit
/// past the refresh point starts a new refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_refresh_does_not_stop_later_refreshes() {
    let clock = ManualClock::new();
    let cache = MultiLevelCache::builder(MemoryBackend::new())
        .clock(Arc::new(clock.clone()))
        .l1_default_ttl(Duration::from_secs(100))
        .eager_refresh(0.5)
        .build()
        .unwrap();
    let v: u64 = cache
        .get_or_load("k", || async { Ok::<_, Io>(0) })
        .await
        .unwrap();
    assert_eq!(v, 0);
    clock.advance(Duration::from_secs(60)); // past 50 % of the TTL
    let panicked = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&panicked);
    let v: u64 = cache
        .get_or_load("k", move || async move {
            p.fetch_add(1, Ordering::SeqCst);
            if p.load(Ordering::SeqCst) > 0 {
                panic!("loader bug");
            }
            Ok::<u64, Io>(9)
        })
        .await
        .unwrap();
    assert_eq!(v, 0, "the current value is served while the refresh runs");
    for _ in 0..100 {
        if panicked.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The next hit refreshes again.
    for _ in 0..100 {
        let v: u64 = cache
            .get_or_load("k", || async { Ok::<_, Io>(1) })
            .await
            .unwrap();
        if v == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no refresh ever ran again after a refresh's loader panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_timeout_serves_stale_and_hard_timeout_gives_up() {
    let clock = ManualClock::new();
    let l2 = MemoryBackend::new();
    let cache = MultiLevelCache::builder(l2.clone())
        .clock(Arc::new(clock.clone()))
        .l1_default_ttl(Duration::from_secs(10))
        .fail_safe(Duration::from_secs(100))
        .loader_timeouts(
            Some(Duration::from_millis(50)),
            Some(Duration::from_secs(2)),
        )
        .build()
        .unwrap();
    cache
        .get_or_load("k", || async { Ok::<_, Io>(1u32) })
        .await
        .unwrap();
    clock.advance(Duration::from_secs(11)); // stale in L1
    l2.delete("k").await.unwrap(); // and gone from L2: the loader must run
    let slow = || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<_, Io>(2u32)
    };
    let (v, src) = cache.get_or_load_with_source("k", slow).await.unwrap();
    assert_eq!(
        (*v, src),
        (1, ValueSource::Stale),
        "soft timeout: stale now"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        cache.get::<u32>("k").await.unwrap(),
        Some(2),
        "the load finished in the background"
    );

    let hard = MultiLevelCache::builder(MemoryBackend::new())
        .loader_timeouts(None, Some(Duration::from_millis(50)))
        .build()
        .unwrap();
    let err = hard
        .get_or_load("x", || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, Io>(0u8)
        })
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
}

#[tokio::test]
async fn negative_caching_and_batch_loads_of_misses_only() {
    let cache = MultiLevelCache::builder(MemoryBackend::new())
        .negative_ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    for _ in 0..5 {
        let runs = runs.clone();
        let v = cache
            .get_or_load_optional::<String, _, _, _>("ghost", move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Io>(None)
            })
            .await
            .unwrap();
        assert!(v.is_none());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "not-found is cached");

    cache.set("a", 1i32).await.unwrap();
    cache.set("c", 3i32).await.unwrap();
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let asked2 = asked.clone();
    let got = cache
        .get_many_or_load(&["a", "b", "c", "d"], move |missing| async move {
            asked2.lock().unwrap().extend(missing.clone());
            Ok::<_, Io>(
                missing
                    .into_iter()
                    .filter(|k| k == "b")
                    .map(|k| (k, 2i32))
                    .collect::<HashMap<_, _>>(),
            )
        })
        .await
        .unwrap();
    assert_eq!(got, vec![Some(1), Some(2), Some(3), None]);
    assert_eq!(
        *asked.lock().unwrap(),
        vec!["b".to_string(), "d".to_string()]
    );
    assert_eq!(
        cache.get::<i32>("b").await.unwrap(),
        Some(2),
        "loaded values are cached"
    );
}

#[tokio::test]
async fn undecodable_l2_values_are_misses_and_removed_unless_from_a_newer_build() {
    let l2 = MemoryBackend::new();
    let cache = MultiLevelCache::builder(l2.clone()).build().unwrap();
    l2.set_now(
        "bad",
        ncm_cache_core::Bytes::from_static(b"\xc1\x4e\x01\x01\x00 garbage"),
        None,
    )
    .unwrap();
    assert_eq!(cache.get::<String>("bad").await.unwrap(), None);
    assert!(l2.get_now("bad").unwrap().is_none());
    assert_eq!(cache.get_stats().l2.codec_errors, 1);
    // An envelope of a newer build (unknown format tag) is a miss, counted, and left.
    l2.set_now(
        "newer",
        ncm_cache_core::Bytes::from_static(b"\xc1\x4e\x01\xff\xff payload"),
        None,
    )
    .unwrap();
    assert_eq!(cache.get::<String>("newer").await.unwrap(), None);
    assert!(l2.get_now("newer").unwrap().is_some());
    assert_eq!(cache.get_stats().l2.codec_errors, 2);
}

/// An L2 whose reads answer `delay` late (the value is read first, as when the reply is slow
/// on the wire).
#[derive(Debug)]
struct SlowReads {
    inner: MemoryBackend,
    delay: Duration,
}

#[ncm_cache_core::async_trait]
impl CacheBackend for SlowReads {
    fn name(&self) -> &str {
        "slow-reads"
    }
    async fn get(&self, key: &str) -> ncm_cache_core::Result<Option<ncm_cache_core::Bytes>> {
        let v = self.inner.get(key).await;
        tokio::time::sleep(self.delay).await;
        v
    }
    async fn set(
        &self,
        key: &str,
        value: ncm_cache_core::Bytes,
        ttl: Option<Duration>,
    ) -> ncm_cache_core::Result<()> {
        self.inner.set(key, value, ttl).await
    }
    async fn delete(&self, key: &str) -> ncm_cache_core::Result<bool> {
        self.inner.delete(key).await
    }
    async fn exists(&self, key: &str) -> ncm_cache_core::Result<bool> {
        self.inner.exists(key).await
    }
    async fn get_ttl(&self, key: &str) -> ncm_cache_core::Result<ncm_cache_core::KeyTtl> {
        self.inner.get_ttl(key).await
    }
    async fn extend_ttl(&self, key: &str, ttl: Duration) -> ncm_cache_core::Result<bool> {
        self.inner.extend_ttl(key, ttl).await
    }
    async fn clear_pattern(&self, pattern: &str) -> ncm_cache_core::Result<u64> {
        self.inner.clear_pattern(pattern).await
    }
    async fn health_report(&self) -> ncm_cache_core::HealthReport {
        self.inner.health_report().await
    }
    fn get_stats(&self) -> ncm_cache_core::CacheStats {
        self.inner.get_stats()
    }
}

/// A caller whose L2 read missed just before an earlier load stored its value, and who reaches
/// the single-flight after that load finished, must find the value instead of loading again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_caller_after_a_finished_load_does_not_load_again() {
    let l2 = SlowReads {
        inner: MemoryBackend::new(),
        delay: Duration::from_millis(100),
    };
    let cache = MultiLevelCache::builder(l2).build().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let call = |cache: MultiLevelCache, runs: Arc<AtomicUsize>| async move {
        cache
            .get_or_load("k", move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok::<_, std::io::Error>(7u64)
            })
            .await
    };
    // The first caller's read misses at 0 ms and answers at 100; its load stores at ~110.
    let first = tokio::spawn(call(cache.clone(), runs.clone()));
    tokio::time::sleep(Duration::from_millis(60)).await;
    // The second reads at 60 ms (a miss) and answers at 160, after the first load finished.
    let second = tokio::spawn(call(cache.clone(), runs.clone()));
    assert_eq!(first.await.unwrap().unwrap(), 7);
    assert_eq!(second.await.unwrap().unwrap(), 7);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the late caller loaded again"
    );
}

/// `l1_max_size(u64::MAX)` — a natural way to say "no count limit" — builds a cache. Before
/// (review, helper-83 #4) sizing the side tables multiplied it by 256 and overflowed (a panic
/// in debug builds, a meaningless budget in release).
#[tokio::test]
async fn an_unbounded_l1_size_builds() {
    let cache = MultiLevelCache::builder(Arc::new(MemoryBackend::new()))
        .l1_max_size(u64::MAX)
        .build()
        .unwrap();
    cache.set("k", 1u64).await.unwrap();
    assert_eq!(cache.get::<u64>("k").await.unwrap(), Some(1));
}
