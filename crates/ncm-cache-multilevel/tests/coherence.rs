//! Regression tests for the coherence model in docs/ARCHITECTURE.md ("Coherence of L1"): each
//! test puts one call's reply after another call's effect deterministically (a `Slow` layer over
//! a real backend, a `FaultProxy`, a killed server) and checks that no stale value survives in L1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ncm_cache_core::{ManualClock, SharedBackend, SharedClock, ValueSource};
use ncm_cache_memory::MemoryBackend;
use ncm_cache_multilevel::MultiLevelCache;
use support::{Mode, Slow};

type Io = std::io::Error;

fn memory(clock: &Arc<ManualClock>) -> SharedBackend {
    Arc::new(
        MemoryBackend::builder()
            .shared_clock(Arc::clone(clock) as SharedClock)
            .build()
            .unwrap(),
    )
}

/// A multi-level cache over a `Slow` memory L2 (both on one manual clock).
fn slow_cache() -> (Arc<Slow>, MultiLevelCache) {
    let (_, slow, cache) = slow_cache_with_clock();
    (slow, cache)
}

/// [`slow_cache`] and the manual clock it runs on.
fn slow_cache_with_clock() -> (Arc<ManualClock>, Arc<Slow>, MultiLevelCache) {
    let clock = Arc::new(ManualClock::new());
    let slow = Arc::new(Slow::new(memory(&clock)));
    let cache = MultiLevelCache::builder(Arc::clone(&slow) as SharedBackend)
        .clock(Arc::clone(&clock) as SharedClock)
        .build()
        .unwrap();
    (clock, slow, cache)
}

#[tokio::test]
async fn an_explicit_ttl_bounds_the_l1_copy_too() {
    let clock = Arc::new(ManualClock::new());
    let cache = MultiLevelCache::builder(memory(&clock))
        .clock(Arc::clone(&clock) as SharedClock)
        .build()
        .unwrap();
    cache
        .set_with_ttl("k", 1u64, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(cache.get::<u64>("k").await.unwrap(), Some(1));
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        cache.get::<u64>("k").await.unwrap(),
        None,
        "L1 kept a value past the TTL its writer gave it"
    );
}

/// Scenario (b) of the issue: a reader that started after a local write began reads L2 before
/// the write reaches it, and its reply arrives after the write finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_promotes_a_value_older_than_a_local_write() {
    let (slow, cache) = slow_cache();
    cache.set("k", 0u64).await.unwrap();
    cache.clear_l1();
    slow.set_request_delay(Duration::from_millis(200));
    slow.get_reply_delay(Duration::from_millis(400));
    let writer = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.set("k", 1u64).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The write has begun (its invalidation is done); its SET reaches L2 at 200 ms.
    let reader = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get::<u64>("k").await })
    };
    writer.await.unwrap().unwrap();
    assert_eq!(
        reader.await.unwrap().unwrap(),
        Some(0),
        "the reader read L2 before the write"
    );
    slow.get_reply_delay(Duration::ZERO);
    slow.set_request_delay(Duration::ZERO);
    assert_eq!(
        cache.get::<u64>("k").await.unwrap(),
        Some(1),
        "L1 holds the value the write replaced"
    );
}

/// A load's "not found" is not cached over a write that came between the miss's L2 read and
/// the load: that read found nothing, then the key was written (here a local write to L2; with
/// client tracking, a foreign write whose push is handled before the read's reply), and the
/// loader — which read the source before the write reached it — answers "not found". Before
/// (review, helper-75), the load's ticket was taken after the write, so the "not found" went
/// into L1 and was served over the written value for `negative_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_found_is_not_cached_over_a_write_made_after_the_miss() {
    use ncm_cache_core::CacheLevel;
    let clock = Arc::new(ManualClock::new());
    let slow = Arc::new(Slow::new(memory(&clock)));
    let cache = MultiLevelCache::builder(Arc::clone(&slow) as SharedBackend)
        .clock(clock as SharedClock)
        .negative_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    slow.get_reply_delay(Duration::from_millis(200));
    let load = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load_optional::<u64, _, _, _>("k", || async { Ok::<_, Io>(None) })
                .await
        })
    };
    // The miss's GET has read "absent"; its reply is held back.
    tokio::time::sleep(Duration::from_millis(50)).await;
    slow.get_reply_delay(Duration::ZERO);
    cache.set_at("k", 1u64, CacheLevel::L2).await.unwrap();
    assert_eq!(
        load.await.unwrap().unwrap(),
        None,
        "the loader found nothing"
    );
    assert_eq!(
        cache.get::<u64>("k").await.unwrap(),
        Some(1),
        "a not-found older than the write was served from L1"
    );
}

/// One key's invalidation must not stop another key's promotion (per-key versions, not one
/// cache-wide epoch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_of_another_key_does_not_cancel_a_promotion() {
    let (slow, cache) = slow_cache();
    cache.set("a", 1u64).await.unwrap();
    cache.clear_l1();
    slow.get_reply_delay(Duration::from_millis(200));
    let reader = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get::<u64>("a").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    cache.delete("b").await.unwrap();
    assert_eq!(reader.await.unwrap().unwrap(), Some(1));
    slow.get_reply_delay(Duration::ZERO);
    let (_, source) = cache.get_with_source::<u64>("a").await.unwrap().unwrap();
    assert_eq!(source, ValueSource::L1, "the read of `a` was not promoted");
}

/// A probe that is cancelled, or that ends with an error other than "unavailable", reports
/// back: the circuit does not stay half-open forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_recovers_after_a_cancelled_or_odd_probe() {
    for odd in [Mode::Hang, Mode::ServerError] {
        let clock = Arc::new(ManualClock::new());
        let slow = Arc::new(Slow::new(memory(&clock)));
        let cache = MultiLevelCache::builder(Arc::clone(&slow) as SharedBackend)
            .breaker_threshold(1)
            .breaker_cooldown(Duration::from_millis(50))
            .build()
            .unwrap();
        cache.set("k", 7u64).await.unwrap();
        cache.clear_l1();
        slow.mode(Mode::Unavailable);
        assert!(cache.get::<u64>("k").await.is_err());
        assert!(cache.l2_circuit_open(), "one failure opens the circuit");
        tokio::time::sleep(Duration::from_millis(80)).await;
        slow.mode(odd);
        // The probe: cancelled after 20 ms (Hang) or answered with a server error.
        let _ = tokio::time::timeout(Duration::from_millis(20), cache.get::<u64>("k")).await;
        slow.mode(Mode::Pass);
        let start = Instant::now();
        loop {
            if let Ok(Some(7)) = cache.get::<u64>("k").await {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "after a {odd:?} probe the circuit never closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A drop guard that records that the loader's future ended (finished or dropped).
struct Ended(Arc<AtomicBool>);
impl Drop for Ended {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A delete on this instance that lands in L2 while a load's store is held before it (the
/// delete stands for a change of the source the load read before): the store, landing after
/// the delete, is withdrawn — L2 ends without the older value (before: it stayed in L2 for
/// its TTL, and every read took it).
#[tokio::test]
async fn a_load_store_landing_after_a_local_delete_is_withdrawn() {
    use ncm_cache_core::CacheBackend as _;
    let (slow, cache) = slow_cache();
    slow.set_request_delay(Duration::from_millis(200));
    let load = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_load("k", || async { Ok::<_, Io>(1u64) })
                .await
                .unwrap()
        }
    });
    // The store is held before L2; the delete lands first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    cache.delete("k").await.unwrap();
    assert_eq!(load.await.unwrap(), 1, "the caller gets what it loaded");
    slow.set_request_delay(Duration::ZERO);
    assert_eq!(
        slow.get("k").await.unwrap(),
        None,
        "the older value stayed in L2"
    );
    assert_eq!(cache.get::<u64>("k").await.unwrap(), None);
    assert_eq!(cache.get_stats().loads_withdrawn, 1);
}

/// A cache with eager refresh whose `k` ("v1", loaded through `Slow` over memory) is past its
/// refresh point: the next read starts a refresh that loads "old".
async fn past_its_refresh_point() -> (Arc<Slow>, MultiLevelCache) {
    let clock = Arc::new(ManualClock::new());
    let slow = Arc::new(Slow::new(memory(&clock)));
    let cache = MultiLevelCache::builder(Arc::clone(&slow) as SharedBackend)
        .clock(Arc::clone(&clock) as SharedClock)
        .l1_default_ttl(Duration::from_secs(10))
        .eager_refresh(0.5)
        .build()
        .unwrap();
    let loaded: String = cache
        .get_or_load("k", || async { Ok::<_, Io>("v1".to_string()) })
        .await
        .unwrap();
    assert_eq!(loaded, "v1");
    clock.advance(Duration::from_secs(6));
    (slow, cache)
}

/// Reads `k`, starting its eager refresh (which loads "old"), and waits until the refresh's
/// loader has run.
async fn start_the_refresh(cache: &MultiLevelCache) {
    let called = Arc::new(tokio::sync::Notify::new());
    let hit: String = cache
        .get_or_load("k", {
            let called = Arc::clone(&called);
            || async move {
                called.notify_one();
                Ok::<_, Io>("old".to_string())
            }
        })
        .await
        .unwrap();
    assert_eq!(hit, "v1");
    called.notified().await;
}

/// A caller's `set` on this instance whose L2 write lands while an eager refresh's store (a
/// plain `SET` of the older value it read before) is held: the refresh lands after the write
/// and would be what L2 holds for its TTL; it is withdrawn once it lands.
#[tokio::test]
async fn an_eager_refresh_landing_after_a_local_write_is_withdrawn() {
    let (slow, cache) = past_its_refresh_point().await;
    // The refresh's store is held before L2; the caller's write lands first.
    slow.set_request_delay(Duration::from_millis(300));
    start_the_refresh(&cache).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    slow.set_request_delay(Duration::ZERO);
    cache.set("k", "new".to_string()).await.unwrap();
    let l2 = ncm_cache_multilevel::EntryOptions::new().skip_l1();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = cache.get_with::<String>("k", &l2).await.unwrap();
    assert_ne!(
        held.map(|(v, _)| v.to_string()).as_deref(),
        Some("old"),
        "the refresh's older value stayed in L2 over the caller's write"
    );
    assert_eq!(cache.get_stats().loads_withdrawn, 1);
}

/// The same with the caller's `set` cancelled (a request timeout) while it checks the
/// refresh's store that landed over its write: the check goes on without it. Before (review,
/// helper-77) the digests were taken out of `recent` and the check ran in the caller: a
/// cancelled caller dropped it, and L2 kept the older value over the write for its TTL.
#[tokio::test]
async fn an_eager_refresh_landing_after_a_cancelled_local_write_is_withdrawn() {
    let (slow, cache) = past_its_refresh_point().await;
    // The refresh's store is held 200 ms before L2.
    slow.set_request_delay(Duration::from_millis(200));
    start_the_refresh(&cache).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The caller's write lands first; its reply is held until the refresh has landed over
    // it, and the check that follows (a GET) is held past the caller's timeout.
    slow.set_request_delay(Duration::ZERO);
    slow.set_reply_delay(Duration::from_millis(400));
    slow.get_reply_delay(Duration::from_millis(600));
    let write = tokio::time::timeout(
        Duration::from_millis(700),
        cache.set("k", "new".to_string()),
    );
    assert!(
        write.await.is_err(),
        "the set was meant to be cancelled during its check"
    );
    slow.set_reply_delay(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    slow.get_reply_delay(Duration::ZERO);
    let l2 = ncm_cache_multilevel::EntryOptions::new().skip_l1();
    let held = cache.get_with::<String>("k", &l2).await.unwrap();
    assert_ne!(
        held.map(|(v, _)| v.to_string()).as_deref(),
        Some("old"),
        "the refresh's older value stayed in L2 over the cancelled caller's write"
    );
}

/// The same through `get_many_or_load` (one batch of stores) and a pattern delete through
/// `as_backend()`: each store landing after the delete is withdrawn.
#[tokio::test]
async fn batch_load_stores_landing_after_a_pattern_delete_are_withdrawn() {
    use ncm_cache_core::CacheBackend as _;
    let (slow, cache) = slow_cache();
    slow.set_request_delay(Duration::from_millis(200));
    let load = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_many_or_load::<u64, _, _, _>(&["p:1", "p:2"], |keys| async move {
                    Ok::<_, Io>(keys.into_iter().map(|k| (k, 1)).collect())
                })
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    cache.as_backend().clear_pattern("p:*").await.unwrap();
    assert_eq!(load.await.unwrap(), vec![Some(1), Some(1)]);
    slow.set_request_delay(Duration::ZERO);
    for k in ["p:1", "p:2"] {
        assert_eq!(
            slow.get(k).await.unwrap(),
            None,
            "{k}: the older value stayed in L2"
        );
    }
    assert_eq!(cache.get_stats().loads_withdrawn, 2);
}

/// `as_backend().get_many` with fail-safe: when its one L2 batch fails, the stale L1 copies
/// are served if every key it asked L2 for has one; if one has none, the call fails.
#[tokio::test]
async fn a_failed_backend_batch_read_serves_stale_copies_only_when_all_have_one() {
    use ncm_cache_core::{Bytes, CacheBackend};
    let clock = Arc::new(ManualClock::new());
    let slow = Arc::new(Slow::new(memory(&clock)));
    let cache = MultiLevelCache::builder(Arc::clone(&slow) as SharedBackend)
        .clock(Arc::clone(&clock) as SharedClock)
        .l1_default_ttl(Duration::from_secs(1))
        .fail_safe(Duration::from_secs(3600))
        .build()
        .unwrap();
    let backend = cache.as_backend();
    for k in ["a", "b"] {
        backend.set(k, Bytes::from(k), None).await.unwrap();
    }
    clock.advance(Duration::from_secs(2));
    slow.mode(Mode::Unavailable);
    assert_eq!(
        backend.get_many(&["a", "b"]).await.unwrap(),
        vec![Some(Bytes::from("a")), Some(Bytes::from("b"))]
    );
    assert!(
        backend.get_many(&["a", "never-cached"]).await.is_err(),
        "a key without a stale copy was answered as absent while L2 was down"
    );
}

/// After a soft timeout the load stays the key's one load in flight: requests that come while
/// it runs serve stale without starting another; the hard timeout ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_timeout_keeps_one_load_per_key_and_the_hard_timeout_bounds_it() {
    let clock = Arc::new(ManualClock::new());
    let cache = MultiLevelCache::builder(memory(&clock))
        .clock(Arc::clone(&clock) as SharedClock)
        .l1_default_ttl(Duration::from_secs(1))
        .l2_default_ttl(Duration::from_secs(1))
        .fail_safe(Duration::from_secs(3600))
        .loader_timeouts(
            Some(Duration::from_millis(20)),
            Some(Duration::from_millis(600)),
        )
        .build()
        .unwrap();
    let v: u64 = cache
        .get_or_load("k", || async { Ok::<_, Io>(1) })
        .await
        .unwrap();
    assert_eq!(v, 1);
    clock.advance(Duration::from_secs(2));
    let loads = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicBool::new(false));
    for _ in 0..10 {
        let (loads, ended) = (Arc::clone(&loads), Arc::clone(&ended));
        let (v, source) = cache
            .get_or_load_with_source::<u64, _, _, _>("k", move || async move {
                let _guard = Ended(ended);
                loads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<_, Io>(2)
            })
            .await
            .unwrap();
        assert_eq!((*v, source), (1, ValueSource::Stale));
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "each request after the soft timeout started its own background load"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        ended.load(Ordering::SeqCst),
        "the background load outlived the hard timeout"
    );
}

/// A write through `as_backend()` (what a `Cache` facade, `SqlCache`, strategies and loaders
/// over L1 + L2 use) that gives no TTL gets the builder's `l2_default_ttl` (found by review).
/// Before, it was stored without expiry — with `epoch_clear`, such keys outlived every clear.
#[tokio::test]
async fn a_write_through_as_backend_without_a_ttl_gets_the_l2_default_ttl() {
    use ncm_cache_core::{CacheBackend, KeyTtl};
    for epochs in [false, true] {
        let clock = Arc::new(ManualClock::new());
        let cache = MultiLevelCache::builder(memory(&clock))
            .clock(clock as SharedClock)
            .l2_default_ttl(Duration::from_secs(60))
            .epoch_clear(epochs)
            .build()
            .unwrap();
        let backend = cache.as_backend();
        backend
            .set("k", ncm_cache_core::Bytes::from_static(b"v"), None)
            .await
            .unwrap();
        let ttl = backend.get_ttl("k").await.unwrap();
        assert!(
            matches!(ttl, KeyTtl::Expires(t) if t <= Duration::from_secs(60)),
            "stored {ttl:?} (epochs: {epochs})"
        );
    }
}

/// A key asked for twice in one `get_many_or_load` gets its value at both positions, and the
/// loader sees it once (found by review; before: `[Some, None]` and the key passed twice).
#[tokio::test]
async fn a_repeated_key_in_a_batch_load_is_loaded_once_and_served_twice() {
    let clock = Arc::new(ManualClock::new());
    let cache = MultiLevelCache::builder(memory(&clock))
        .clock(clock as SharedClock)
        .build()
        .unwrap();
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let got = {
        let asked = Arc::clone(&asked);
        cache
            .get_many_or_load::<u64, _, _, _>(&["a", "a", "b"], move |missing| async move {
                asked.lock().unwrap().extend(missing.iter().cloned());
                Ok::<_, Io>(missing.into_iter().map(|k| (k, 7u64)).collect())
            })
            .await
            .unwrap()
    };
    assert_eq!(got, vec![Some(7), Some(7), Some(7)]);
    assert_eq!(*asked.lock().unwrap(), vec!["a".to_owned(), "b".to_owned()]);
    // The key's write was settled once: a later write is kept in L1 as a clean one.
    cache.set("a", 8u64).await.unwrap();
    let (v, source) = cache.get_with_source::<u64>("a").await.unwrap().unwrap();
    assert_eq!((*v, source), (8, ValueSource::L1));
}

/// A load whose store fails after a delete of its key was heard, cancelled while it withdraws
/// that store, still ends its write — through `get_or_load` and through `as_backend()`'s
/// `set_loaded` (a `CacheLoader` over the cache). Before (review, helper-74 #6) its stripe went
/// on counting the write as in flight, and every later write of the stripe's keys (1 in 4096
/// keys) was kept in L1 for 1 s only, as if another write overlapped it.
#[tokio::test]
async fn a_load_cancelled_while_withdrawing_a_failed_store_ends_its_write() {
    cancelled_while_withdrawing_a_failed_store(|cache| async move {
        cache
            .get_or_load("k", || async { Ok::<_, Io>(1u64) })
            .await
            .map(drop)
    })
    .await;
    cancelled_while_withdrawing_a_failed_store(|cache| async move {
        use ncm_cache_core::CacheBackend as _;
        let backend = cache.as_backend();
        let mark = backend.load_mark("k").map(|m| m.after_miss());
        let bytes = ncm_cache_core::Bytes::from(serde_json::to_vec(&1u64).unwrap());
        backend.set_loaded("k", bytes, None, mark).await.map(drop)
    })
    .await;
}

async fn cancelled_while_withdrawing_a_failed_store<F, Fut>(store: F)
where
    F: FnOnce(MultiLevelCache) -> Fut,
    Fut: std::future::Future<Output = ncm_cache_core::Result<()>> + Send + 'static,
{
    let (clock, slow, cache) = slow_cache_with_clock();
    // The load's store reaches L2 after 200 ms and its reply is lost.
    slow.set_request_delay(Duration::from_millis(200));
    slow.set_fails_after(true);
    let load = tokio::spawn(tokio::time::timeout(
        Duration::from_millis(500),
        store(cache.clone()),
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Heard while the store is in flight: the store is withdrawn once it lands, and the
    // withdrawal's look at L2 is held past the caller's timeout.
    cache.delete("k").await.unwrap();
    slow.get_reply_delay(Duration::from_millis(1_000));
    assert!(
        load.await.unwrap().is_err(),
        "the load was meant to be cancelled during the withdrawal"
    );
    slow.set_request_delay(Duration::ZERO);
    slow.set_fails_after(false);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    slow.get_reply_delay(Duration::ZERO);
    cache.set("k", 2u64).await.unwrap();
    clock.advance(Duration::from_secs(2));
    let (v, source) = cache.get_with_source::<u64>("k").await.unwrap().unwrap();
    assert_eq!(
        (*v, source),
        (2, ValueSource::L1),
        "the write was kept in L1 as one overlapping another (1 s)"
    );
}

/// An eager refresh whose loader answers "not found" (the row was deleted at the source)
/// removes the old value from L2 and L1 (found by review). Before, L2 kept it: the deleted
/// value was served on, and re-promoted from L2 for its whole L2 TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_finds_nothing_removes_the_old_value() {
    let clock = Arc::new(ManualClock::new());
    let cache = MultiLevelCache::builder(memory(&clock))
        .clock(Arc::clone(&clock) as SharedClock)
        .l1_default_ttl(Duration::from_secs(10))
        .l2_default_ttl(Duration::from_secs(3600))
        .eager_refresh(0.5)
        .build()
        .unwrap();
    let first = cache
        .get_or_load_optional::<u64, _, _, _>("k", || async { Ok::<_, Io>(Some(1)) })
        .await
        .unwrap();
    assert_eq!(first.as_deref(), Some(&1));
    clock.advance(Duration::from_secs(6));
    let refreshed = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&refreshed);
    // Past the refresh point: served from L1, one refresh starts and finds nothing.
    let _ = cache
        .get_or_load_optional::<u64, _, _, _>("k", move || async move {
            r.store(true, Ordering::SeqCst);
            Ok::<_, Io>(None)
        })
        .await
        .unwrap();
    let start = Instant::now();
    while cache.l2().get("k").await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "L2 kept the value the loader no longer finds (refresh ran: {})",
            refreshed.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(cache.get::<u64>("k").await.unwrap(), None);
}

/// A caller that starts after an acknowledged delete must not join a load that began before
/// it: that load may have read the deleted value (found by review). Before, the second caller
/// got the first load's result ("old") and its own loader never ran. Checked on both load
/// paths: the plain single-flight and the background load of the loader timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_after_a_delete_does_not_join_a_load_that_began_before_it() {
    for timeouts in [false, true] {
        let clock = Arc::new(ManualClock::new());
        let mut builder = MultiLevelCache::builder(memory(&clock)).clock(clock as SharedClock);
        if timeouts {
            builder = builder.loader_timeouts(None, Some(Duration::from_secs(30)));
        }
        let cache = builder.build().unwrap();
        let (inside_tx, inside_rx) = tokio::sync::oneshot::channel::<()>();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_load::<String, _, _, _>("k", move || async move {
                        let _ = inside_tx.send(());
                        let _ = release_rx.await;
                        Ok::<_, Io>("old".to_owned())
                    })
                    .await
            })
        };
        inside_rx.await.unwrap();
        cache.delete("k").await.unwrap();
        let ran = Arc::new(AtomicBool::new(false));
        let second = {
            let (cache, ran) = (cache.clone(), Arc::clone(&ran));
            tokio::spawn(async move {
                cache
                    .get_or_load::<String, _, _, _>("k", move || async move {
                        ran.store(true, Ordering::SeqCst);
                        Ok::<_, Io>("new".to_owned())
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        release_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), "old");
        assert_eq!(
            second.await.unwrap().unwrap(),
            "new",
            "a caller that began after the delete got the older load's result (timeouts: {timeouts})"
        );
        assert!(ran.load(Ordering::SeqCst));
        assert_eq!(
            cache.get::<String>("k").await.unwrap().as_deref(),
            Some("new")
        );
    }
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use ncm_cache_redis::{RedisCache, RedisConfig};
    use ncm_cache_testkit::{FaultProxy, ProxyMode, RedisCluster, RedisServer};

    fn config(url: &str) -> RedisConfig {
        let mut c = RedisConfig::from_url(url).unwrap();
        c.response_timeout = Duration::from_millis(300);
        c.connect_timeout = Duration::from_millis(300);
        c.health_check_interval = Some(Duration::from_millis(100));
        c.key_prefix = "app:".into();
        c
    }

    async fn wait_active(cache: &MultiLevelCache) {
        let start = Instant::now();
        while !cache.l1_active() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "backplane never subscribed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn instance(redis: &RedisCache) -> MultiLevelCache {
        let cache = MultiLevelCache::builder(redis.backend())
            .name("users")
            .backplane(Arc::clone(redis.redis_backend()))
            .build()
            .unwrap();
        wait_active(&cache).await;
        cache
    }

    /// Instance A ("users"): L2 on `server` directly, its backplane through `proxy` (whose
    /// delays the tests set), with timeouts long enough for them; `tune` adds options. Returns
    /// A's L2 cache, its backplane's connection and A.
    async fn late_instance(
        server: &RedisServer,
        proxy: &FaultProxy,
        tune: impl FnOnce(
            ncm_cache_multilevel::MultiLevelBuilder,
        ) -> ncm_cache_multilevel::MultiLevelBuilder,
    ) -> (RedisCache, RedisCache, MultiLevelCache) {
        let ra = RedisCache::connect(config(&server.url())).await.unwrap();
        let mut slow = config(&format!("redis://{}", proxy.addr()));
        slow.response_timeout = Duration::from_secs(3);
        slow.health_check_interval = None;
        let late = RedisCache::connect(slow).await.unwrap();
        let builder = MultiLevelCache::builder(ra.backend())
            .name("users")
            .backplane(Arc::clone(late.redis_backend()));
        let a = tune(builder).build().unwrap();
        wait_active(&a).await;
        (ra, late, a)
    }

    /// A delete heard late (cache-aside across processes): A's load read its source, B changed
    /// the source and deleted the key, A's store landed after that delete (the key was absent,
    /// so "only if absent" let it in), and B's message reached A only after the store. A
    /// withdraws what it stored once it hears the delete: L2 no longer holds the older value,
    /// and B's next read loads the new one (before: every instance read A's older value from
    /// L2 for its TTL). A's backplane is behind a proxy that delays its messages by 300 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_stored_after_a_delete_heard_late_is_withdrawn() {
        use ncm_cache_core::CacheBackend as _;
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.addr()).unwrap();
        let (ra, _late, a) = late_instance(&server, &proxy, |b| b).await;
        let rb = RedisCache::connect(config(&server.url())).await.unwrap();
        let b = instance(&rb).await;
        proxy.set_mode(ProxyMode::Delay(Duration::from_millis(300)));
        let (started, release) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let load = tokio::spawn({
            let (a, started, release) = (a.clone(), Arc::clone(&started), Arc::clone(&release));
            async move {
                a.get_or_load("k", || async move {
                    // The source is read ("old"), then the load waits.
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, Io>("old".to_string())
                })
                .await
                .unwrap()
            }
        });
        started.notified().await;
        // B changes the source, then deletes the key; A hears of it 300 ms later.
        b.delete("k").await.unwrap();
        release.notify_one();
        // (A's own announcement of its store also goes through the delayed backplane, so the
        // call returns only after B's message came: the withdrawal may be done by then.)
        assert_eq!(
            load.await.unwrap(),
            "old",
            "the loader's caller gets its value"
        );
        let start = Instant::now();
        while ra.backend().get("k").await.unwrap().is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "the value stored after the delete stayed in L2"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(a.get_stats().loads_withdrawn, 1);
        let fresh: String = b
            .get_or_load("k", || async { Ok::<_, Io>("new".to_string()) })
            .await
            .unwrap();
        assert_eq!(fresh, "new");
        // A's withdrawal reaches B after B stored the new value: it only evicts, so B's fresh
        // load stays (before: announced as a delete, it made B withdraw its own load too).
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            ra.backend().get("k").await.unwrap().is_some(),
            "a withdrawal made another instance withdraw a fresh load"
        );
        assert_eq!(b.get_stats().loads_withdrawn, 0);
        proxy.set_mode(ProxyMode::Pass);
    }

    /// An eager refresh read its source (`old`); B then changed the source and `set` the key
    /// (acknowledged); the refresh's store — a plain `SET`, not "only if absent" — landed
    /// after B's write, and every instance read the refresh's older value from L2 until its
    /// TTL (found by review). A hears B's SET message (300 ms late, through a proxy) and
    /// withdraws its refresh's bytes, which L2 still holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_eager_refresh_landing_after_another_instances_write_is_withdrawn() {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.addr()).unwrap();
        let (_ra, _late, a) = late_instance(&server, &proxy, |b| {
            b.l1_default_ttl(Duration::from_millis(600))
                .eager_refresh(0.5)
        })
        .await;
        let rb = RedisCache::connect(config(&server.url())).await.unwrap();
        let b = instance(&rb).await;
        let first: String = a
            .get_or_load("k", || async { Ok::<_, Io>("v1".to_string()) })
            .await
            .unwrap();
        assert_eq!(first, "v1");
        // Past the refresh point (300 ms), before the L1 expiry.
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.set_mode(ProxyMode::Delay(Duration::from_millis(300)));
        let (started, release) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let hit: String = a
            .get_or_load("k", {
                let (started, release) = (Arc::clone(&started), Arc::clone(&release));
                || async move {
                    // The source is read ("old"), then the refresh waits.
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, Io>("old".to_string())
                }
            })
            .await
            .unwrap();
        assert_eq!(hit, "v1", "a hit past the refresh point is served from L1");
        started.notified().await;
        // B changes the source and writes the key; A hears of it 300 ms later.
        b.set("k", "new".to_string()).await.unwrap();
        release.notify_one();
        let l2 = ncm_cache_multilevel::EntryOptions::new().skip_l1();
        let in_l2 = async || {
            b.get_with::<String>("k", &l2)
                .await
                .unwrap()
                .map(|(v, _)| v.to_string())
        };
        // The refresh's store lands after B's write…
        let start = Instant::now();
        while in_l2().await.as_deref() != Some("old") {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "scenario not reproduced: the refresh's store never landed over B's write"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // …and is withdrawn once A hears B's write.
        while in_l2().await.as_deref() == Some("old") {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "the refresh's older value stayed in L2 over B's acknowledged write"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(a.get_stats().loads_withdrawn, 1);
        proxy.set_mode(ProxyMode::Pass);
    }

    /// Two instances refresh a hot key at once and both store the same value: each heard the
    /// other's store as a write that its own refresh (landing after it, same bytes) may have
    /// overwritten, and withdrew it — L2 emptied, every instance missing and loading again
    /// (found by review of the refresh withdrawal). A load's or refresh's store is announced
    /// as a load now, which a refresh never takes for a write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_refreshes_of_one_value_do_not_withdraw_each_other() {
        use ncm_cache_core::CacheBackend as _;
        let server = RedisServer::start().unwrap();
        let mut caches = Vec::new();
        let mut redis = Vec::new();
        for _ in 0..2 {
            let r = RedisCache::connect(config(&server.url())).await.unwrap();
            let c = MultiLevelCache::builder(r.backend())
                .name("users")
                .backplane(Arc::clone(r.redis_backend()))
                .l1_default_ttl(Duration::from_millis(800))
                .eager_refresh(0.5)
                .build()
                .unwrap();
            wait_active(&c).await;
            caches.push(c);
            redis.push(r);
        }
        for c in &caches {
            let v: String = c
                .get_or_load("k", || async { Ok::<_, Io>("v".to_string()) })
                .await
                .unwrap();
            assert_eq!(v, "v");
        }
        // Each instance holds the key in L1 (the first load's announcement may have evicted
        // the second instance's promoted copy: read until it is back).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let any = ncm_cache_multilevel::EntryOptions::new();
        for c in &caches {
            let start = Instant::now();
            while c
                .get_with::<String>("k", &any)
                .await
                .unwrap()
                .map(|(_, s)| s)
                != Some(ValueSource::L1)
            {
                assert!(start.elapsed() < Duration::from_secs(1), "never in L1");
            }
        }
        // Past both refresh points (400 ms), before the L1 expiry.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let both = Arc::new(tokio::sync::Barrier::new(2));
        let hits = caches.iter().map(|c| {
            let both = Arc::clone(&both);
            async move {
                c.get_or_load("k", || async move {
                    // Both refreshes read the source, then store at once.
                    both.wait().await;
                    Ok::<_, Io>("v".to_string())
                })
                .await
                .unwrap()
            }
        });
        for hit in futures_util::future::join_all(hits).await {
            assert_eq!(hit, "v");
        }
        let start = Instant::now();
        while caches
            .iter()
            .map(|c| c.get_stats().background_refreshes)
            .sum::<u64>()
            < 2
        {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "the refreshes never ran"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for c in &caches {
            assert_eq!(c.get_stats().loads_withdrawn, 0, "a refresh was withdrawn");
        }
        assert!(
            redis[0].backend().get("k").await.unwrap().is_some(),
            "the refreshed value was removed from L2"
        );
    }

    /// Polls until `cache` returns `want` for `key`, failing after `bound`.
    async fn until_seen(cache: &MultiLevelCache, key: &str, want: u64, bound: Duration) {
        let start = Instant::now();
        loop {
            if cache.get::<u64>(key).await.ok().flatten() == Some(want) {
                return;
            }
            assert!(
                start.elapsed() < bound,
                "still serving an old value of {key} after {bound:?} (want {want})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Instance A, whose L2 calls go through a `Slow` layer (delays set by the test), and
    /// instance B, both on `server` with the backplane.
    async fn slow_writer_and_reader(
        server: &RedisServer,
    ) -> (Arc<Slow>, MultiLevelCache, MultiLevelCache) {
        let ra = RedisCache::connect(config(&server.url())).await.unwrap();
        let slow = Arc::new(Slow::new(ra.backend()));
        let a = MultiLevelCache::builder(Arc::clone(&slow) as SharedBackend)
            .name("users")
            .backplane(Arc::clone(ra.redis_backend()))
            .build()
            .unwrap();
        wait_active(&a).await;
        let rb = RedisCache::connect(config(&server.url())).await.unwrap();
        let b = instance(&rb).await;
        (slow, a, b)
    }

    /// Polls until `cache` no longer returns `old` for `key`, failing after 1 s.
    async fn until_not(cache: &MultiLevelCache, key: &str, old: Option<u64>) {
        let start = Instant::now();
        while cache.get::<u64>(key).await.unwrap() == old {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{key}: still served {old:?} after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Scenario (a) of the issue: an own write whose L1 insert lands after another instance's
    /// newer write (and its invalidation) must not stay in L1.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_own_write_never_lands_over_a_newer_remote_write() {
        let server = RedisServer::start().unwrap();
        let (slow, a, b) = slow_writer_and_reader(&server).await;
        slow.set_reply_delay(Duration::from_millis(300));
        let write = {
            let a = a.clone();
            tokio::spawn(async move { a.set("k", 1u64).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A's SET is in Redis; B overwrites it and publishes while A waits for its reply.
        b.set("k", 2u64).await.unwrap();
        write.await.unwrap().unwrap();
        slow.set_reply_delay(Duration::ZERO);
        until_seen(&a, "k", 2, Duration::from_secs(1)).await;
    }

    /// A write or delete whose caller is cancelled after its command reached Redis (a request
    /// timeout around `set`, a dropped handler) must still be announced: every instance stops
    /// serving the old value, the writer's own L1 included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_or_delete_cancelled_after_reaching_redis_still_invalidates() {
        let server = RedisServer::start().unwrap();
        let (slow, a, b) = slow_writer_and_reader(&server).await;
        a.set("k", 1u64).await.unwrap();
        until_seen(&b, "k", 1, Duration::from_secs(1)).await;
        assert_eq!(a.get::<u64>("k").await.unwrap(), Some(1));
        slow.set_reply_delay(Duration::from_millis(500));
        let cancelled = tokio::time::timeout(Duration::from_millis(100), a.set("k", 2u64)).await;
        assert!(cancelled.is_err(), "the set was meant to be cancelled");
        slow.set_reply_delay(Duration::ZERO);
        // The SET is in Redis: the old value must not outlive the stale-window bound.
        until_seen(&b, "k", 2, Duration::from_secs(1)).await;
        until_seen(&a, "k", 2, Duration::from_secs(1)).await;
        slow.delete_reply_delay(Duration::from_millis(500));
        let cancelled = tokio::time::timeout(Duration::from_millis(100), a.delete("k")).await;
        assert!(cancelled.is_err(), "the delete was meant to be cancelled");
        slow.delete_reply_delay(Duration::ZERO);
        // Another instance stops serving the key deleted by the cancelled delete.
        until_not(&b, "k", Some(2)).await;
        assert_eq!(
            b.get::<u64>("k").await.unwrap(),
            None,
            "the key was deleted"
        );
        // The writer's versions were released: its next write is kept in L1 (not 1 s).
        a.set("k", 3u64).await.unwrap();
        assert_eq!(
            a.get_with_source::<u64>("k")
                .await
                .unwrap()
                .map(|(v, s)| (*v, s)),
            Some((3, ValueSource::L1))
        );
    }

    /// Runs `call` with a 100 ms timeout, which must expire (its L2 reply is held back).
    async fn cancelled<F: std::future::Future>(what: &str, call: F) {
        let r = tokio::time::timeout(Duration::from_millis(100), call).await;
        assert!(r.is_err(), "{what} was meant to be cancelled");
    }

    /// The other cancellable writes (found by review): a level-2 `set_at`, a TTL change and a
    /// pattern delete through `as_backend()`, and `clear()` — without and with epochs — whose
    /// caller is cancelled after the L2 call reached Redis. Before, none was announced: other
    /// instances (and, for an epoch clear, the writer too) kept serving old values for their
    /// whole L1 TTL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_level_writes_ttl_changes_and_clears_are_still_announced() {
        use ncm_cache_core::{CacheBackend, CacheLevel};
        let server = RedisServer::start().unwrap();
        let (slow, a, b) = slow_writer_and_reader(&server).await;
        let bound = Duration::from_secs(1);

        a.set("k", 1u64).await.unwrap();
        until_seen(&b, "k", 1, bound).await;
        slow.set_reply_delay(Duration::from_millis(500));
        cancelled("set_at(L2)", a.set_at("k", 2u64, CacheLevel::L2)).await;
        slow.set_reply_delay(Duration::ZERO);
        until_seen(&b, "k", 2, bound).await;
        until_seen(&a, "k", 2, bound).await;

        slow.other_reply_delay(Duration::from_millis(500));
        a.set("t", 1u64).await.unwrap();
        until_seen(&b, "t", 1, bound).await;
        until_l1(&b, "t").await;
        cancelled(
            "extend_ttl",
            a.as_backend().extend_ttl("t", Duration::from_millis(300)),
        )
        .await;
        // B drops its L1 copy (which would outlive the shorter TTL) and asks L2 again.
        let start = Instant::now();
        while b.get_with_source::<u64>("t").await.unwrap().map(|(_, s)| s) == Some(ValueSource::L1)
        {
            assert!(start.elapsed() < bound, "B kept its L1 copy of t");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        a.set("p:1", 1u64).await.unwrap();
        until_seen(&b, "p:1", 1, bound).await;
        until_l1(&b, "p:1").await;
        cancelled("clear_pattern", a.as_backend().clear_pattern("p:*")).await;
        until_not(&b, "p:1", Some(1)).await;

        a.set("c", 1u64).await.unwrap();
        until_seen(&b, "c", 1, bound).await;
        until_l1(&b, "c").await;
        cancelled("clear", a.clear()).await;
        until_not(&b, "c", Some(1)).await;
        until_not(&a, "c", Some(1)).await;
        slow.other_reply_delay(Duration::ZERO);
    }

    /// A delete, a pattern delete or a `clear()` of a key this instance loaded — so after its
    /// L2 call it rechecks that load (a store that may have landed after the delete) — whose
    /// caller is cancelled during the recheck is still announced. Before (review, helper-74),
    /// the announcement came after the recheck: other instances served the deleted value for
    /// their whole L1 TTL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deletes_cancelled_while_rechecking_their_loads_are_still_announced() {
        use ncm_cache_core::CacheBackend;
        let server = RedisServer::start().unwrap();
        let (slow, a, b) = slow_writer_and_reader(&server).await;
        let bound = Duration::from_secs(1);
        for (key, what) in [("k", "delete"), ("p:1", "clear_pattern"), ("c", "clear")] {
            a.get_or_load(key, || async { Ok::<_, Io>(1u64) })
                .await
                .unwrap();
            until_seen(&b, key, 1, bound).await;
            until_l1(&b, key).await;
            // The recheck's GET is held back; the delete's own call is not.
            slow.get_reply_delay(Duration::from_millis(500));
            match what {
                "delete" => cancelled(what, a.delete(key)).await,
                "clear_pattern" => cancelled(what, a.as_backend().clear_pattern("p:*")).await,
                _ => cancelled(what, a.clear()).await,
            }
            slow.get_reply_delay(Duration::ZERO);
            until_not(&b, key, Some(1)).await;
            assert_eq!(b.get::<u64>(key).await.unwrap(), None, "{what}: deleted");
        }
    }

    /// An epoch `clear()` cancelled while its new epoch is being written: the writer forgets
    /// its token and every instance is told, so nobody reads the old epoch on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_epoch_clear_is_still_announced() {
        let server = RedisServer::start().unwrap();
        let epoch = |l2: SharedBackend, redis: &RedisCache| {
            MultiLevelCache::builder(l2)
                .name("users")
                .backplane(Arc::clone(redis.redis_backend()))
                .epoch_clear(true)
                .l2_default_ttl(Duration::from_secs(60))
                .build()
                .unwrap()
        };
        let ra = RedisCache::connect(config(&server.url())).await.unwrap();
        let slow = Arc::new(Slow::new(ra.backend()));
        let a = epoch(Arc::clone(&slow) as SharedBackend, &ra);
        let rb = RedisCache::connect(config(&server.url())).await.unwrap();
        let b = epoch(rb.backend(), &rb);
        wait_active(&a).await;
        wait_active(&b).await;
        let bound = Duration::from_secs(1);
        a.set("c", 1u64).await.unwrap();
        until_seen(&b, "c", 1, bound).await;
        until_seen(&a, "c", 1, bound).await;
        // The new epoch lands at 50 ms; the clear's reply would come at 550 ms.
        slow.set_request_delay(Duration::from_millis(50));
        slow.set_reply_delay(Duration::from_millis(500));
        // A reader of A re-reads the epoch key before the new epoch lands (the old token).
        let reader = {
            let a = a.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                a.get::<u64>("c").await
            })
        };
        cancelled("clear", a.clear()).await;
        let _ = reader.await.unwrap();
        slow.set_request_delay(Duration::ZERO);
        slow.set_reply_delay(Duration::ZERO);
        until_not(&b, "c", Some(1)).await;
        until_not(&a, "c", Some(1)).await;
    }

    /// With `epoch_clear`, a write whose caller gave up before its epoch check has its keys
    /// removed in the new epoch by a spawned task, after the caller's own announcement went
    /// out: they are announced again — also when the removal's reply is an error (it may have
    /// landed) — so an instance that cached what the new epoch held in between (here `heard`,
    /// reading all along) does not keep serving it for its L1 TTL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_removed_after_a_caller_gave_up_are_announced_again() {
        let server = RedisServer::start().unwrap();
        let build = |l2: SharedBackend, backplane: Option<&RedisCache>| {
            let mut b = MultiLevelCache::builder(l2)
                .name("users")
                .epoch_clear(true)
                .l2_default_ttl(Duration::from_secs(60));
            if let Some(redis) = backplane {
                b = b.backplane(Arc::clone(redis.redis_backend()));
            }
            b.build().unwrap()
        };
        let ra = RedisCache::connect(config(&server.url())).await.unwrap();
        let slow = Arc::new(Slow::new(ra.backend()));
        let late = build(Arc::clone(&slow) as SharedBackend, Some(&ra));
        let rb = RedisCache::connect(config(&server.url())).await.unwrap();
        let heard = build(rb.backend(), Some(&rb));
        let rc = RedisCache::connect(config(&server.url())).await.unwrap();
        let clearer = build(rc.backend(), None);
        wait_active(&late).await;
        wait_active(&heard).await;
        // `late` reads the epoch and keeps it (30 s with its link up); the clear is not
        // announced (`clearer` has no backplane), so it keeps the old one.
        late.set("s", 1u64).await.unwrap();
        clearer.clear().await.unwrap();
        for key in ["s", "p1"] {
            heard.set(key, 2u64).await.unwrap();
            until_seen(&heard, key, 2, Duration::from_secs(1)).await;
        }
        // The writes land at once, their epoch checks answer at 400 ms and 500 ms; the callers
        // give up at 100 and 200 ms, and `heard` reads (and caches the new epoch's 2) until
        // 350 ms. The removal of `s` lands and answers with an error.
        slow.reserved_reply_delay(Duration::from_millis(400));
        slow.delete_fails_after(true);
        let start = Instant::now();
        cancelled("set", late.set("s", 3u64)).await;
        let backend = late.as_backend();
        cancelled(
            "pattern delete",
            ncm_cache_core::CacheBackend::clear_pattern(&backend, "p*"),
        )
        .await;
        while start.elapsed() < Duration::from_millis(350) {
            for key in ["s", "p1"] {
                let _ = heard.get::<u64>(key).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for key in ["s", "p1"] {
            let deadline = Instant::now() + Duration::from_secs(2);
            while heard.get::<u64>(key).await.unwrap().is_some() {
                assert!(
                    Instant::now() < deadline,
                    "{key}: heard still serves the new epoch's older value"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        slow.reserved_reply_delay(Duration::ZERO);
        slow.delete_fails_after(false);
        assert_eq!(late.get::<u64>("s").await.unwrap(), None);
    }

    /// A batch load whose caller is cancelled during its L2 batch write: the keys that may
    /// have reached Redis are announced, so another instance stops serving its old copies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_load_cancelled_mid_write_still_invalidates() {
        let server = RedisServer::start().unwrap();
        let (slow, a, b) = slow_writer_and_reader(&server).await;
        let keys = ["m0", "m1", "m2"];
        for k in keys {
            b.set_at(k, 0u64, ncm_cache_core::CacheLevel::L1)
                .await
                .unwrap();
        }
        slow.set_reply_delay(Duration::from_millis(500));
        let load = a.get_many_or_load::<u64, _, _, _>(&keys, |missing| async move {
            Ok::<_, Io>(missing.into_iter().map(|k| (k, 7u64)).collect())
        });
        let cancelled = tokio::time::timeout(Duration::from_millis(150), load).await;
        assert!(
            cancelled.is_err(),
            "the batch load was meant to be cancelled"
        );
        slow.set_reply_delay(Duration::ZERO);
        for k in keys {
            until_not(&b, k, Some(0)).await;
        }
    }

    /// After an outage in which PUBLISHes failed (the flush task backing off towards 1 s), a
    /// write acknowledged once Redis answers again reaches the other instances within a round
    /// trip or two — not after the rest of the backoff (on a cluster: writes right after a
    /// failover, whose channel node was the one lost).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_after_an_outage_is_announced_without_waiting_out_the_backoff() {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.addr()).unwrap();
        let ra = RedisCache::connect(config(&format!("redis://{}", proxy.addr())))
            .await
            .unwrap();
        // The breaker out of the way: this is about the publish queue's own retries.
        let a = MultiLevelCache::builder(ra.backend())
            .name("users")
            .backplane(Arc::clone(ra.redis_backend()))
            .breaker_threshold(1_000_000)
            .build()
            .unwrap();
        wait_active(&a).await;
        let rb = RedisCache::connect(config(&server.url())).await.unwrap();
        let b = instance(&rb).await;
        let mut worst = Duration::ZERO;
        for round in 1..=3u64 {
            let old = round * 10;
            b.set("k", old).await.unwrap();
            until_seen(&b, "k", old, Duration::from_secs(1)).await;
            proxy.set_mode(ProxyMode::Refuse);
            proxy.cut();
            // A delete during the outage: its invalidation fails and is retried with backoff.
            let _ = a.delete("other").await;
            tokio::time::sleep(Duration::from_millis(2500)).await;
            proxy.set_mode(ProxyMode::Pass);
            let new = old + 1;
            let acked = loop {
                if a.set("k", new).await.is_ok() {
                    break Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            loop {
                if b.get::<u64>("k").await.unwrap() == Some(new) {
                    break;
                }
                assert!(acked.elapsed() < Duration::from_secs(3), "never announced");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            worst = worst.max(acked.elapsed());
        }
        assert!(
            worst < Duration::from_millis(300),
            "a write acknowledged after the outage reached the other instance only after {worst:?}"
        );
    }

    /// PUBLISH goes through L2's circuit breaker when the backplane is L2's Redis: with the
    /// circuit open, a delete's invalidation is queued (and sent once Redis answers again)
    /// instead of waiting a response timeout on a server known to be down.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_circuit_queues_publishes_instead_of_waiting_on_a_dead_server() {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.addr()).unwrap();
        let mut c = config(&format!("redis://{}", proxy.addr()));
        c.response_timeout = Duration::from_secs(1);
        let ra = RedisCache::connect(c).await.unwrap();
        let a = MultiLevelCache::builder(ra.backend())
            .name("users")
            .backplane(Arc::clone(ra.redis_backend()))
            .breaker_threshold(1)
            .breaker_cooldown(Duration::from_secs(2))
            .build()
            .unwrap();
        wait_active(&a).await;
        let rb = RedisCache::connect(config(&server.url())).await.unwrap();
        let b = instance(&rb).await;
        b.set("k", 1u64).await.unwrap();
        until_seen(&b, "k", 1, Duration::from_secs(1)).await;
        proxy.set_mode(ProxyMode::Stall);
        assert!(
            a.get::<u64>("k").await.is_err(),
            "the stalled read must fail"
        );
        assert!(a.l2_circuit_open());
        let start = Instant::now();
        let _ = a.delete("k").await;
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(300),
            "a delete with the circuit open waited {took:?} on its PUBLISH"
        );
        // The queued invalidation is delivered once Redis answers again: B drops its copy.
        assert_eq!(b.l1_len(), 1);
        proxy.set_mode(ProxyMode::Pass);
        let start = Instant::now();
        while b.l1_len() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the queued invalidation never reached the other instance"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// With the backplane on the same Redis as L2, Redis dying makes the backplane disconnect:
    /// fail-safe must still serve the last values (marked stale), then recover.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fail_safe_serves_stale_values_when_redis_and_its_backplane_die() {
        let mut server = RedisServer::start().unwrap();
        let redis = RedisCache::connect(config(&server.url())).await.unwrap();
        let cache = MultiLevelCache::builder(redis.backend())
            .name("users")
            .backplane(Arc::clone(redis.redis_backend()))
            .fail_safe(Duration::from_secs(600))
            .build()
            .unwrap();
        wait_active(&cache).await;
        let v: u64 = cache
            .get_or_load("k", || async { Ok::<_, Io>(1) })
            .await
            .unwrap();
        assert_eq!(v, 1);
        server.kill();
        let start = Instant::now();
        while cache.l1_active() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no disconnect seen"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (v, source) = cache
            .get_or_load_with_source::<u64, _, _, _>("k", || async {
                Err::<u64, _>(Io::other("database down too"))
            })
            .await
            .expect("fail-safe served nothing");
        assert_eq!((*v, source), (1, ValueSource::Stale));
        // Never served as fresh while disconnected.
        let read = cache.get_with_source::<u64>("k").await;
        assert!(
            matches!(read, Ok(Some((_, ValueSource::Stale)))),
            "a value kept through the outage was served as {read:?}"
        );
        server.restart().unwrap();
        wait_active(&cache).await;
        let (v, source) = cache
            .get_or_load_with_source::<u64, _, _, _>("k", || async { Ok::<_, Io>(2) })
            .await
            .unwrap();
        assert_eq!((*v, source), (2, ValueSource::Loader), "no recovery");
    }

    /// Eager refresh with the distributed lock on must call the loader (it used to find the old
    /// L2 value after taking the lock and stop there).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eager_refresh_with_the_lock_calls_the_loader() {
        let server = RedisServer::start().unwrap();
        let redis = RedisCache::connect(config(&server.url())).await.unwrap();
        let clock = Arc::new(ManualClock::new());
        let cache = MultiLevelCache::builder(redis.backend())
            .clock(Arc::clone(&clock) as SharedClock)
            .l1_default_ttl(Duration::from_secs(10))
            .eager_refresh(0.5)
            .distributed_lock(
                Arc::clone(redis.redis_backend()),
                Duration::from_secs(2),
                Duration::from_secs(2),
            )
            .build()
            .unwrap();
        let v: u64 = cache
            .get_or_load("k", || async { Ok::<_, Io>(1) })
            .await
            .unwrap();
        assert_eq!(v, 1);
        clock.advance(Duration::from_secs(6));
        let refreshed = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&refreshed);
        let v: u64 = cache
            .get_or_load("k", move || async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Io>(2)
            })
            .await
            .unwrap();
        assert_eq!(
            v, 1,
            "the hit serves the current value and refreshes behind it"
        );
        let start = Instant::now();
        while cache.get::<u64>("k").await.unwrap() != Some(2) {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "the eager refresh never called the loader (calls: {})",
                refreshed.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(refreshed.load(Ordering::SeqCst), 1);
    }

    /// A loader that runs longer than the lock TTL keeps the lock (renewed): a second instance
    /// waits for its value instead of loading too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_loader_longer_than_the_lock_ttl_runs_once() {
        let server = RedisServer::start().unwrap();
        let loads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..2u64 {
            let redis = RedisCache::connect(config(&server.url())).await.unwrap();
            let cache = MultiLevelCache::builder(redis.backend())
                .distributed_lock(
                    Arc::clone(redis.redis_backend()),
                    Duration::from_millis(300),
                    Duration::from_secs(5),
                )
                .build()
                .unwrap();
            let loads = Arc::clone(&loads);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100 * i)).await;
                cache
                    .get_or_load::<u64, _, _, _>("k", move || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(1200)).await;
                        Ok::<_, Io>(42)
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 42);
        }
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "a second holder got the lock"
        );
    }

    /// A loader that finds nothing, with instances of two processes waiting on the lock: the
    /// holder's "not found" is visible to the waiters (they return `None` without loading),
    /// with and without negative caching.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lock_waiters_see_the_holders_not_found() {
        let server = RedisServer::start().unwrap();
        for negative_ttl in [Some(Duration::from_secs(5)), None] {
            let key = format!("missing:{}", negative_ttl.is_some());
            let loads = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            // Three wait on the holder's lock; a fourth comes 100 ms after its release (500 ms
            // load), while the note lasts: it takes the answer too.
            for i in [0u64, 1, 2, 6] {
                let redis = RedisCache::connect(config(&server.url())).await.unwrap();
                let mut builder = MultiLevelCache::builder(redis.backend()).distributed_lock(
                    Arc::clone(redis.redis_backend()),
                    Duration::from_secs(5),
                    Duration::from_secs(5),
                );
                if let Some(ttl) = negative_ttl {
                    builder = builder.negative_ttl(ttl);
                }
                let cache = builder.build().unwrap();
                let (loads, key) = (Arc::clone(&loads), key.clone());
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100 * i)).await;
                    cache
                        .get_or_load_optional::<u64, _, _, _>(&key, move || async move {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            Ok::<_, Io>(None)
                        })
                        .await
                }));
            }
            for t in tasks {
                assert_eq!(t.await.unwrap().unwrap(), None);
            }
            assert_eq!(
                loads.load(Ordering::SeqCst),
                1,
                "waiters loaded again after the holder found nothing (negative_ttl {negative_ttl:?})"
            );
        }
    }

    type RowLoad =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<u64>, Io>> + Send>>;

    /// A loader that reads the row `source` holds (0: none), then takes `delay` to answer:
    /// a query whose answer predates what happens meanwhile.
    fn row_loader(
        source: &Arc<std::sync::atomic::AtomicU64>,
        delay: Duration,
    ) -> impl FnOnce() -> RowLoad + Send + 'static {
        let source = Arc::clone(source);
        move || {
            Box::pin(async move {
                let row = source.load(Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                Ok((row != 0).then_some(row))
            })
        }
    }

    /// A lock holder's "not found" is shared with the waiters through a note in the lock key
    /// (250 ms). A `delete` of the key during the holder's load (the row was just inserted)
    /// must end that answer: a read that begins after the delete asks the source — during the
    /// holder's load and after it, whether the holder hears of the delete or not (its
    /// backplane stalled): the delete overrules the holder's lock with an "uncached" note.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_holders_not_found_does_not_outlive_a_delete_during_its_load() {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.addr()).unwrap();
        let direct = RedisCache::connect(config(&server.url())).await.unwrap();
        // x's backplane goes through the proxy; its health check is too slow to notice the
        // stall within the test, so x releases without having heard the delete.
        let mut slow = config(&proxy.url());
        slow.health_check_interval = Some(Duration::from_secs(10));
        slow.response_timeout = Duration::from_secs(5);
        let proxied = RedisCache::connect(slow).await.unwrap();
        let locked = |bp: &RedisCache| {
            MultiLevelCache::builder(direct.backend())
                .name("users")
                .backplane(Arc::clone(bp.redis_backend()))
                .distributed_lock(
                    Arc::clone(direct.redis_backend()),
                    Duration::from_secs(5),
                    Duration::from_secs(5),
                )
                .negative_ttl(Duration::from_secs(60))
                .build()
                .unwrap()
        };
        let (x, y, z) = (locked(&proxied), locked(&direct), locked(&direct));
        for c in [&x, &y, &z] {
            wait_active(c).await;
        }
        for stalled in [false, true] {
            let key = format!("row:{stalled}");
            let source = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let hold = tokio::spawn({
                let (x, key) = (x.clone(), key.clone());
                let load = row_loader(&source, Duration::from_millis(400));
                async move { x.get_or_load_optional::<u64, _, _, _>(&key, load).await }
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            // z waits on x's lock: its call overlaps the delete.
            let wait = tokio::spawn({
                let (z, key) = (z.clone(), key.clone());
                let load = row_loader(&source, Duration::ZERO);
                async move { z.get_or_load_optional::<u64, _, _, _>(&key, load).await }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            if stalled {
                proxy.set_mode(ProxyMode::Stall);
            }
            source.store(1, Ordering::SeqCst);
            y.delete(&key).await.unwrap();
            // y reads again while x still holds the lock: its answer must not be x's.
            let during = y
                .get_or_load_optional::<u64, _, _, _>(&key, row_loader(&source, Duration::ZERO))
                .await
                .unwrap()
                .map(|v| *v);
            assert_eq!(
                during,
                Some(1),
                "y (x's backplane stalled: {stalled}) took the answer of x's load, begun before its delete"
            );
            assert_eq!(
                hold.await.unwrap().unwrap(),
                None,
                "x read before the insert"
            );
            let overlapped = wait.await.unwrap().unwrap().map(|v| *v);
            if stalled {
                // Either answer is one of a call that overlapped the delete.
                assert!(matches!(overlapped, None | Some(1)), "{overlapped:?}");
            } else {
                // The delete overruled x's lock: its waiter loads itself.
                assert_eq!(
                    overlapped,
                    Some(1),
                    "z was handed x's outdated \"not found\""
                );
            }
            // Well within the note's 250 ms: reads that begin after the delete.
            for (name, c) in [("y", &y), ("z", &z)] {
                let got = c
                    .get_or_load_optional::<u64, _, _, _>(&key, row_loader(&source, Duration::ZERO))
                    .await
                    .unwrap()
                    .map(|v| *v);
                assert_eq!(
                    got,
                    Some(1),
                    "{name} (x's backplane stalled: {stalled}) served the \"not found\" of a load that began before the delete"
                );
            }
            proxy.set_mode(ProxyMode::Pass);
        }
    }

    /// A PUBLISH that fails is retried: the other instance drops its copy once the backplane
    /// is reachable again, not when its L1 TTL (5 minutes) runs out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_publish_is_retried() {
        let server = RedisServer::start().unwrap();
        let proxy = FaultProxy::start(server.addr()).unwrap();
        // A: L2 direct, backplane through the proxy.
        let l2 = RedisCache::connect(config(&server.url())).await.unwrap();
        let bp = RedisCache::connect(config(&proxy.url())).await.unwrap();
        let a = MultiLevelCache::builder(l2.backend())
            .name("users")
            .backplane(Arc::clone(bp.redis_backend()))
            .build()
            .unwrap();
        wait_active(&a).await;
        let rb = RedisCache::connect(config(&server.url())).await.unwrap();
        let b = instance(&rb).await;
        a.set("k", 1u64).await.unwrap();
        until_seen(&b, "k", 1, Duration::from_secs(1)).await;
        proxy.set_mode(ProxyMode::Refuse);
        proxy.cut();
        a.set("k", 2u64).await.unwrap();
        proxy.set_mode(ProxyMode::Pass);
        until_seen(&b, "k", 2, Duration::from_secs(5)).await;
    }

    /// The default prefix is empty: `clear()` must not wipe the whole database (other
    /// applications' keys, lock keys).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clear_never_wipes_a_whole_database() {
        let server = RedisServer::start().unwrap();
        server.command(&["SET", "someone-else", "1"]).unwrap();
        let mut c = config(&server.url());
        c.key_prefix = String::new();
        let redis = RedisCache::connect(c).await.unwrap();
        let cache = instance(&redis).await;
        cache.set("mine", 1u64).await.unwrap();
        let cleared = cache.clear().await;
        assert_eq!(
            server.command(&["EXISTS", "someone-else"]).unwrap().trim(),
            "1",
            "clear() removed a key that is not the cache's (result: {cleared:?})"
        );
        assert!(
            cleared.is_err(),
            "clear() without a prefix should say why it refuses"
        );
    }

    /// On a real 3+3 cluster: writes with the backplane succeed (no CROSSSLOT) and invalidate
    /// the other instance; the lock works; `clear` reaches every primary.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_backplane_works_on_a_cluster() {
        let mut cluster = RedisCluster::start().unwrap();
        let mut c = config(&cluster.node_urls()[0]);
        c.cluster_nodes = cluster.node_urls();
        let ra = RedisCache::connect(c.clone()).await.unwrap();
        let rb = RedisCache::connect(c).await.unwrap();
        let (a, b) = (instance(&ra).await, instance(&rb).await);
        for i in 0..20u64 {
            let key = format!("user:{i}");
            a.set(&key, i)
                .await
                .expect("set with the backplane on a cluster");
            until_seen(&b, &key, i, Duration::from_secs(1)).await;
            b.get::<u64>(&key).await.unwrap();
            a.set(&key, i + 100).await.unwrap();
            until_seen(&b, &key, i + 100, Duration::from_secs(1)).await;
        }
        a.clear().await.unwrap();
        for i in 0..20u64 {
            until_gone(&b, &format!("user:{i}")).await;
        }

        // Lose the node A's subscription is on (the first seed): it moves to another node and
        // B's writes still reach A's L1.
        let first = cluster.nodes()[0].port();
        if cluster.primaries().unwrap().contains(&first) {
            cluster.kill_primary(first).unwrap();
            cluster.wait_for_failover(Duration::from_secs(30)).unwrap();
        } else {
            cluster.node_mut(first).unwrap().kill();
        }
        wait_active(&a).await;
        for i in 0..20u64 {
            let key = format!("user:{i}");
            let start = Instant::now();
            while b.set(&key, 500 + i).await.is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "no write after failover"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            until_seen(&a, &key, 500 + i, Duration::from_secs(2)).await;
            until_l1(&a, &key).await;
            b.set(&key, 600 + i).await.unwrap();
            until_seen(&a, &key, 600 + i, Duration::from_secs(1)).await;
        }
    }

    /// The node of the backplane channel's slot dies: a write on another node succeeds, and
    /// its PUBLISH still reaches the other instance at once, before the failover (the client
    /// does not pin PUBLISH to the channel's slot owner; a cluster PUBLISH reaches every node's
    /// subscribers). Written to test the guess that such a PUBLISH waits for the failover
    /// (docs/RELIABILITY.md, the cluster checker's exception): it does not (delivered in
    /// ~2–8 ms here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_is_retried_through_another_node_when_the_channels_node_dies() {
        let mut cluster = RedisCluster::start().unwrap();
        let seed = cluster.nodes()[0].port();
        // A cache name whose channel's slot is not on the seed node (both subscriptions are
        // there and must survive), and a key on a third node.
        let (name, channel_owner) = (0..64)
            .map(|i| format!("users{i}"))
            .find_map(|name| {
                let owner = cluster.owner_of(&format!("app:__ncm:l1:{name}")).unwrap();
                (owner != seed).then_some((name, owner))
            })
            .unwrap();
        let key = (0..64)
            .map(|i| format!("k{i}"))
            .find(|k| {
                let owner = cluster.owner_of(&format!("app:{k}")).unwrap();
                owner != channel_owner
            })
            .unwrap();
        let mut c = config(&cluster.node_urls()[0]);
        c.cluster_nodes = vec![cluster.node_urls()[0].clone()];
        let (ra, rb) = (
            RedisCache::connect(c.clone()).await.unwrap(),
            RedisCache::connect(c).await.unwrap(),
        );
        let build = |r: &RedisCache| {
            MultiLevelCache::builder(r.backend())
                .name(name.clone())
                .backplane(Arc::clone(r.redis_backend()))
                .build()
                .unwrap()
        };
        let (a, b) = (build(&ra), build(&rb));
        wait_active(&a).await;
        wait_active(&b).await;
        a.set(&key, 1u64).await.unwrap();
        until_seen(&b, &key, 1, Duration::from_secs(1)).await;
        until_l1(&b, &key).await;
        cluster.kill_primary(channel_owner).unwrap();
        let start = Instant::now();
        a.set(&key, 2u64).await.expect("the key's node is alive");
        until_seen(&b, &key, 2, Duration::from_millis(1500)).await;
        assert!(
            b.l1_active(),
            "B's subscription was lost: the test no longer shows a retried PUBLISH"
        );
        eprintln!(
            "delivered {:?} after the channel's node died",
            start.elapsed()
        );
    }

    async fn until_gone(cache: &MultiLevelCache, key: &str) {
        let start = Instant::now();
        while cache.get::<u64>(key).await.unwrap().is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{key} survived clear()"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reads until `cache` serves `key` from L1.
    async fn until_l1(cache: &MultiLevelCache, key: &str) {
        let start = Instant::now();
        while cache.get_with_source::<u64>(key).await.unwrap().unwrap().1 != ValueSource::L1 {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "L1 never used for {key}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Two instances with `epoch_clear` over one memory L2: `other` direct, `late` through a `Slow`
/// layer; `late` has read the epoch (and keeps it for its re-check interval: 1 s without a link).
async fn epoch_pair() -> (Arc<Slow>, MultiLevelCache, MultiLevelCache) {
    let mem: SharedBackend = Arc::new(MemoryBackend::new());
    let slow = Arc::new(Slow::new(Arc::clone(&mem)));
    let build = |l2: SharedBackend| {
        MultiLevelCache::builder(l2)
            .epoch_clear(true)
            .l2_default_ttl(Duration::from_secs(60))
            .build()
            .unwrap()
    };
    let other = build(mem);
    let late = build(Arc::clone(&slow) as SharedBackend);
    late.set("warm", 0u64).await.unwrap();
    (slow, other, late)
}

/// What `cache` reads of `key` from L2 (its current epoch).
async fn in_l2(cache: &MultiLevelCache, key: &str) -> Option<u64> {
    let l2_only = ncm_cache_multilevel::EntryOptions::new().skip_l1();
    cache
        .get_with::<u64>(key, &l2_only)
        .await
        .unwrap()
        .map(|(v, _)| *v)
}

/// Polls `read` until it gives `want` (or 3 s pass); the last reading.
async fn settles<T, F, Fut>(want: T, mut read: F) -> T
where
    T: PartialEq,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = read().await;
        if now == want || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With `epoch_clear`, a write reads the epoch key after it lands and is made again in the new
/// epoch if a clear it had not heard of moved it. A caller that gives up (a timeout, a dropped
/// future) between the two must not leave an older value in the new epoch, written there by
/// an instance that had heard of the clear, to be served for its whole L2 TTL: the check runs
/// in the background and removes the keys in the new epoch.
#[tokio::test]
async fn a_write_abandoned_before_its_epoch_check_leaves_no_older_value_in_the_new_epoch() {
    let (slow, heard, late) = epoch_pair().await;
    heard.clear().await.unwrap();
    for key in ["d", "s", "p1"] {
        heard.set(key, 2u64).await.unwrap();
    }
    // Every write of `late` lands at once; its epoch check answers after 200 ms.
    slow.reserved_reply_delay(Duration::from_millis(200));
    let give_up = Duration::from_millis(20);
    assert!(
        tokio::time::timeout(give_up, late.delete("d"))
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(give_up, late.set("s", 3u64))
            .await
            .is_err()
    );
    let backend = late.as_backend();
    let pattern = ncm_cache_core::CacheBackend::clear_pattern(&backend, "p*");
    assert!(tokio::time::timeout(give_up, pattern).await.is_err());
    let now = settles((None, None, None), || async {
        (
            in_l2(&heard, "d").await,
            in_l2(&heard, "s").await,
            in_l2(&heard, "p1").await,
        )
    })
    .await;
    assert_eq!(
        now,
        (None, None, None),
        "(d, s, p1) as every instance reads them"
    );
}

/// The background check of an abandoned write runs after its caller gave up: a write or a
/// clear that came since must not be undone by the abandoned value (found by review: the check
/// wrote it again in the new epoch, over a newer acknowledged write, or after a clear).
#[tokio::test]
async fn an_abandoned_write_does_not_undo_later_writes_or_clears() {
    // A newer write after the caller gave up.
    let (slow, other, late) = epoch_pair().await;
    other.clear().await.unwrap();
    slow.reserved_request_delay(Duration::from_millis(100));
    let give_up = Duration::from_millis(20);
    assert!(
        tokio::time::timeout(give_up, late.set("k", 2u64))
            .await
            .is_err()
    );
    other.set("k", 4u64).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let read = in_l2(&other, "k").await;
    assert_ne!(read, Some(2), "the abandoned write undid a newer one");

    // A clear after the caller gave up (no clear it had not heard of before).
    let (slow, other, late) = epoch_pair().await;
    slow.reserved_request_delay(Duration::from_millis(100));
    assert!(
        tokio::time::timeout(give_up, late.set("k", 2u64))
            .await
            .is_err()
    );
    other.clear().await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        in_l2(&other, "k").await,
        None,
        "a value from before the clear"
    );
}

/// A caller that gives up while its write is being made again in the new epoch (the redo not
/// sent yet): the background check must not take the moved epoch for settled.
#[tokio::test]
async fn a_write_abandoned_during_its_redo_leaves_no_older_value_in_the_new_epoch() {
    let (slow, heard, late) = epoch_pair().await;
    heard.clear().await.unwrap();
    heard.set("s", 2u64).await.unwrap();
    // The first write lands at once; the check answers at 100 ms; the redo is held 500 ms
    // before it reaches L2; the caller gives up at 200 ms.
    slow.reserved_reply_delay(Duration::from_millis(100));
    let hold = {
        let slow = Arc::clone(&slow);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            slow.set_request_delay(Duration::from_millis(500));
        })
    };
    let r = tokio::time::timeout(Duration::from_millis(200), late.set("s", 3u64)).await;
    assert!(
        r.is_err(),
        "the write was meant to be abandoned during its redo"
    );
    hold.await.unwrap();
    slow.set_request_delay(Duration::ZERO);
    let now = settles(None, || in_l2(&heard, "s")).await;
    assert_eq!(
        now, None,
        "the new epoch still holds the value from before the write"
    );
}

/// A load whose key is invalidated while the loader runs is served, not cached, and counted
/// (`loads_not_cached`), through `get_or_load` and through `as_backend()`'s `set_loaded`.
#[tokio::test]
async fn loads_overtaken_by_an_invalidation_are_served_not_cached_and_counted() {
    use ncm_cache_core::{Bytes, CacheBackend};
    let cache = MultiLevelCache::builder(Arc::new(MemoryBackend::new()) as SharedBackend)
        .build()
        .unwrap();
    let c = cache.clone();
    let v: u64 = cache
        .get_or_load("k", move || async move {
            c.delete("k").await.unwrap();
            Ok::<_, Io>(1)
        })
        .await
        .unwrap();
    assert_eq!(v, 1);
    assert!(cache.l2().get("k").await.unwrap().is_none());
    assert_eq!(cache.get_stats().loads_not_cached, 1);

    let backend = cache.as_backend();
    let mark = backend.load_mark("b");
    backend.delete("b").await.unwrap();
    let stored = backend
        .set_loaded("b", Bytes::from_static(b"v"), None, mark)
        .await
        .unwrap();
    assert!(!stored);
    assert_eq!(cache.get_stats().loads_not_cached, 2);
    let mark = backend.load_mark("b");
    let stored = backend
        .set_loaded("b", Bytes::from_static(b"v"), None, mark)
        .await
        .unwrap();
    assert!(stored, "nothing happened to the key since the mark");
}

/// With `epoch_clear`, an instance that has not heard of a clear yet (no link: it keeps its
/// token up to 1 s) reads a key in the old epoch, finds it absent, and loads. Found by the
/// coherence checker (epoch, one node): the load's store ("only if absent") went into the old
/// epoch and was refused by the epoch check, and the caller got its loaded value while every
/// read after it got the value the new epoch had held since before the call. Now the caller
/// gets what the new epoch holds, as a read in the right epoch would have.
#[tokio::test]
async fn a_load_after_an_unheard_clear_answers_with_what_the_new_epoch_holds() {
    let (_slow, heard, late) = epoch_pair().await;
    heard.clear().await.unwrap();
    heard.set("k", 2u64).await.unwrap();
    let (hits, misses) = (late.get_stats().l2_hits, late.get_stats().misses);
    let (v, source) = late
        .get_or_load_with_source::<u64, _, _, _>("k", || async { Ok::<_, Io>(3) })
        .await
        .unwrap();
    assert_eq!(
        (*v, source),
        (2, ValueSource::L2),
        "the caller got a value the cache does not hold"
    );
    // Counted once: the miss it began as.
    assert_eq!(
        (late.get_stats().l2_hits, late.get_stats().misses),
        (hits, misses + 1)
    );
    assert_eq!(late.get_stats().loads_not_cached, 0);
    // Promoted: `late`'s L1 holds it.
    let l1_only = ncm_cache_multilevel::EntryOptions::new().skip_l2_read();
    let held = late.get_with::<u64>("k", &l1_only).await.unwrap();
    assert_eq!(held.map(|(v, _)| *v), Some(2));
    assert_eq!(in_l2(&heard, "k").await, Some(2));
}

/// The other side of the case above (found by review of its first fix, which made the store
/// again in the new epoch): a load whose source read came before a clear it has not heard of
/// (no link) must not put that value into the new epoch, where every instance would serve a
/// value from before the clear for its whole L2 TTL. Served, not cached.
#[tokio::test]
async fn a_load_spanning_an_unheard_clear_is_not_stored_in_the_new_epoch() {
    let (_slow, heard, late) = epoch_pair().await;
    let clearer = heard.clone();
    let v: u64 = late
        .get_or_load("j", move || async move {
            // The source read, then a clear elsewhere before the load's store.
            clearer.clear().await.unwrap();
            Ok::<_, Io>(4)
        })
        .await
        .unwrap();
    assert_eq!(v, 4);
    assert_eq!(
        in_l2(&heard, "j").await,
        None,
        "a value loaded before the clear is in the new epoch"
    );
    assert_eq!(late.get_stats().loads_not_cached, 1);
}

/// An eager refresh that spans a clear this instance has not heard of: its store (a plain
/// `SET`) landed in the old epoch, the epoch check saw the move, and the write was made again
/// in the new one — a value loaded before the clear, read by every instance from the new epoch
/// (found by review). Now it is not made again.
#[tokio::test]
async fn an_eager_refresh_spanning_an_unheard_clear_is_not_stored_in_the_new_epoch() {
    let mem: SharedBackend = Arc::new(MemoryBackend::new());
    let build = || {
        MultiLevelCache::builder(Arc::clone(&mem))
            .epoch_clear(true)
            .l2_default_ttl(Duration::from_secs(60))
            .l1_default_ttl(Duration::from_millis(400))
            .eager_refresh(0.5)
            .build()
            .unwrap()
    };
    let (heard, late) = (build(), build());
    let first: u64 = late
        .get_or_load("k", || async { Ok::<_, Io>(1) })
        .await
        .unwrap();
    assert_eq!(first, 1);
    // Past the refresh point (200 ms), before the L1 expiry.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (clearer, cleared) = (heard.clone(), Arc::new(AtomicBool::new(false)));
    let done = Arc::clone(&cleared);
    let hit: u64 = late
        .get_or_load("k", move || async move {
            // The source read, then a clear elsewhere before the refresh's store.
            clearer.clear().await.unwrap();
            done.store(true, Ordering::SeqCst);
            Ok::<_, Io>(4)
        })
        .await
        .unwrap();
    assert_eq!(hit, 1, "served from L1 while the refresh runs");
    // The refresh ends: not cached (counted), or stored in the new epoch.
    let start = std::time::Instant::now();
    while !cleared.load(Ordering::SeqCst)
        || (late.get_stats().loads_not_cached == 0 && in_l2(&heard, "k").await.is_none())
    {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the refresh never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        in_l2(&heard, "k").await,
        None,
        "a value refreshed before the clear is in the new epoch"
    );
}

/// Two local writes of one hot key overlap (which of the two L2 applied last is unknown): each
/// writer keeps its value in L1 for at most 1 s (`CONTENDED_TTL`), after which L1 asks L2 —
/// not evicted at once. Found by review: once a caller's write renamed the key's load flight
/// by bumping its invalidation version, every overlapping write evicted the key, and a hot key
/// written by several tasks was read from L2 after almost every write.
#[tokio::test]
async fn overlapping_local_writes_keep_the_key_in_l1_for_at_most_a_second() {
    let (clock, slow, cache) = slow_cache_with_clock();
    slow.set_reply_delay(Duration::from_millis(200));
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.set("k", 1u64).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    slow.set_reply_delay(Duration::ZERO);
    // Lands in L2 after the first write, and returns before it.
    cache.set("k", 2u64).await.unwrap();
    first.await.unwrap();
    let l1_only = ncm_cache_multilevel::EntryOptions::new().skip_l2_read();
    let held = cache
        .get_with::<u64>("k", &l1_only)
        .await
        .unwrap()
        .map(|(v, _)| *v);
    assert!(held.is_some(), "overlapping writes evicted the key");
    clock.advance(Duration::from_millis(1500));
    assert_eq!(
        cache.get::<u64>("k").await.unwrap(),
        Some(2),
        "L1 kept a contended value past 1 s"
    );
}

/// The same two overlapping writes made through `as_backend()` — what `SqlCache` writes its
/// table tokens with, and strategies and loaders their values — leave nothing uncertain in L1:
/// the later-settling write evicts, and a read after both returned gets what L2 applied last.
/// Before (review, helper-79 #1) it kept its older value for 1 s: two concurrent `execute`s
/// of one table left the superseded token in this process's L1, and a query here served a
/// result cached under it, older than a write this process had acknowledged.
#[tokio::test]
async fn overlapping_backend_writes_leave_l2s_value_in_l1() {
    use ncm_cache_core::CacheBackend as _;
    let (slow, cache) = slow_cache();
    let backend = cache.as_backend();
    slow.set_reply_delay(Duration::from_millis(200));
    let first = tokio::spawn({
        let backend = backend.clone();
        async move { backend.set("k", "1".into(), None).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    slow.set_reply_delay(Duration::ZERO);
    // Lands in L2 after the first write, and returns before it.
    backend.set("k", "2".into(), None).await.unwrap();
    first.await.unwrap();
    assert_eq!(
        backend.get("k").await.unwrap().as_deref(),
        Some(&b"2"[..]),
        "L1 kept the write L2 applied first"
    );
}

/// A cached "not found" (`negative_ttl`) read through `as_backend()` looks like an absent key,
/// so a load after it stores "only if absent"; when another instance wrote the key to L2
/// meanwhile (unheard: no link), the store is refused. Found by review: the negative entry
/// stayed, so every such load ran the loader again until `negative_ttl` ended. A refused store
/// now drops it, and the next read finds the other instance's value in L2.
#[tokio::test]
async fn a_refused_load_after_a_cached_not_found_drops_it() {
    let mem: SharedBackend = Arc::new(MemoryBackend::new());
    let a = MultiLevelCache::builder(Arc::clone(&mem))
        .negative_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let b = MultiLevelCache::builder(mem).build().unwrap();
    let none = a
        .get_or_load_optional::<String, _, _, _>("k", || async { Ok::<_, Io>(None) })
        .await
        .unwrap();
    assert!(none.is_none());
    b.set("k", "new".to_owned()).await.unwrap();
    let cache = ncm_cache_core::Cache::new(a.as_backend(), ncm_cache_codec::Serializer::default());
    let loads = Arc::new(AtomicUsize::new(0));
    for _ in 0..2 {
        let loads = Arc::clone(&loads);
        let v: String = cache
            .read_through_with(
                "k",
                move || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Io>("old".to_owned())
                },
                Duration::from_secs(60),
                Default::default(),
            )
            .await
            .unwrap();
        assert!(v == "old" || v == "new", "{v}");
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "the cached \"not found\" kept sending loads to a refused store"
    );
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("new")
    );
}

/// A load's "only if absent" store that succeeded came before any write of the key that
/// overlapped it: here a caller's `set` lands in L2 after the load's store and returns first.
/// The load must not then put its older value in L1 over the set's (found by review: once
/// overlapping writes were kept up to 1 s again, a load's store was kept too, and the writer's
/// next read on this instance got the loaded value for up to 1 s).
#[tokio::test]
async fn a_load_store_overlapped_by_a_set_does_not_shadow_it_in_l1() {
    let (slow, cache) = slow_cache();
    slow.set_reply_delay(Duration::from_millis(200));
    let load = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_load("k", || async { Ok::<_, Io>(1u64) })
                .await
                .unwrap()
        }
    });
    // The load's store has landed; its reply is held.
    tokio::time::sleep(Duration::from_millis(50)).await;
    slow.set_reply_delay(Duration::ZERO);
    cache.set("k", 2u64).await.unwrap();
    assert_eq!(load.await.unwrap(), 1, "the caller gets what it loaded");
    assert_eq!(
        cache.get::<u64>("k").await.unwrap(),
        Some(2),
        "the load's older value shadowed the set in L1"
    );
}

/// The same, with the set already under way when the load's store begins: the set's L2 write
/// is held before it reaches L2, the load misses and stores first, then the set lands, returns
/// and keeps its value in L1; the load's reply comes last. Its store came before the set's, so
/// it must not replace the set's value in L1 (before: `settle_load` saw only a set that began
/// during its store, and served the loaded value here for up to 1 s).
#[tokio::test]
async fn a_load_store_overlapped_by_a_set_begun_before_it_does_not_shadow_it_in_l1() {
    let (slow, cache) = slow_cache();
    slow.set_request_delay(Duration::from_millis(100));
    let set = tokio::spawn({
        let cache = cache.clone();
        async move { cache.set("k", 2u64).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The set is held before L2; the load's store lands at once, its reply comes late.
    slow.set_request_delay(Duration::ZERO);
    slow.set_reply_delay(Duration::from_millis(300));
    let load = tokio::spawn({
        let cache = cache.clone();
        async move {
            cache
                .get_or_load("k", || async { Ok::<_, Io>(1u64) })
                .await
                .unwrap()
        }
    });
    set.await.unwrap();
    assert_eq!(load.await.unwrap(), 1, "the caller gets what it loaded");
    slow.set_reply_delay(Duration::ZERO);
    assert_eq!(
        cache.get::<u64>("k").await.unwrap(),
        Some(2),
        "the load's older value shadowed the set in L1"
    );
}

/// The keys of one `get_many_or_load` batch that share a stripe (about a tenth of 1,000 keys
/// over 4,096 stripes) all reach L1. Two bugs kept them out: the batch checked each key's
/// ticket after the writes of earlier keys had begun (bumping their stripes), so a key sharing
/// a stripe with an earlier one looked overtaken and was never put in L1 (114 of 1,000 here);
/// and the first `settle_load` evicted every contended load store, also when only the batch's
/// own stores overlapped (found by review).
#[tokio::test]
async fn a_batch_load_keeps_every_key_in_l1() {
    let cache = MultiLevelCache::builder(Arc::new(MemoryBackend::new()) as SharedBackend)
        .l1_max_size(100_000)
        .build()
        .unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("b{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let got = cache
        .get_many_or_load::<u64, _, _, _>(&refs, |keys| async move {
            Ok::<_, Io>(keys.into_iter().map(|k| (k, 1)).collect())
        })
        .await
        .unwrap();
    assert!(got.iter().all(Option::is_some));
    let l1_only = ncm_cache_multilevel::EntryOptions::new().skip_l2_read();
    let mut missing = 0;
    for k in &refs {
        if cache.get_with::<u64>(k, &l1_only).await.unwrap().is_none() {
            missing += 1;
        }
    }
    assert_eq!(missing, 0, "keys of the batch not in L1");
}

/// A batch load of a key L2 held but this build could not read (a damaged entry, or another
/// build's during a rolling deploy) replaces what L2 holds — a plain `SET` — and so, like an
/// eager refresh, can land after a caller's newer write. It is withdrawn once it lands (found
/// by review: `get_many_or_load` remembered such stores as "after a miss", which nothing
/// withdraws, and the older value stayed in L2 for its TTL).
#[tokio::test]
async fn a_batch_load_replacing_an_unreadable_entry_is_withdrawn_after_a_local_write() {
    use ncm_cache_core::{Bytes, CacheBackend as _};
    let (slow, cache) = slow_cache();
    slow.set("k", Bytes::from_static(b"\xff\xfenot an envelope"), None)
        .await
        .unwrap();
    slow.set_request_delay(Duration::from_millis(300));
    let called = Arc::new(tokio::sync::Notify::new());
    let load = tokio::spawn({
        let (cache, called) = (cache.clone(), Arc::clone(&called));
        async move {
            cache
                .get_many_or_load::<u64, _, _, _>(&["k"], |keys| async move {
                    called.notify_one();
                    Ok::<_, Io>(keys.into_iter().map(|k| (k, 1)).collect())
                })
                .await
                .unwrap()
        }
    });
    called.notified().await;
    // The batch's store is held before L2; the caller's write lands first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    slow.set_request_delay(Duration::ZERO);
    cache.set("k", 2u64).await.unwrap();
    assert_eq!(load.await.unwrap(), vec![Some(1)]);
    let l2 = ncm_cache_multilevel::EntryOptions::new().skip_l1();
    let held = cache.get_with::<u64>("k", &l2).await.unwrap();
    assert_ne!(
        held.map(|(v, _)| *v),
        Some(1),
        "the batch load's older value stayed in L2 over the caller's write"
    );
    assert_eq!(cache.get_stats().loads_withdrawn, 1);
}

/// With `epoch_clear`, the same batch store spanning a clear this instance has not heard of
/// (no link): it lands in the old epoch, the epoch check sees the move, and it must not be made
/// again in the new one (found by review: it was, through the plain `set`, and every instance
/// then read a value loaded before the clear from the new epoch).
#[tokio::test]
async fn a_batch_load_replacing_an_entry_across_an_unheard_clear_is_not_stored_in_the_new_epoch() {
    use ncm_cache_core::{Bytes, CacheBackend as _};
    let (_slow, heard, late) = epoch_pair().await;
    late.as_backend()
        .set("k", Bytes::from_static(b"\xff\xfenot an envelope"), None)
        .await
        .unwrap();
    let clearer = heard.clone();
    let got = late
        .get_many_or_load::<u64, _, _, _>(&["k"], move |keys| async move {
            // The source read, then a clear elsewhere before the batch's store.
            clearer.clear().await.unwrap();
            Ok::<_, Io>(keys.into_iter().map(|k| (k, 4)).collect())
        })
        .await
        .unwrap();
    assert_eq!(got, vec![Some(4)]);
    assert_eq!(
        in_l2(&heard, "k").await,
        None,
        "a value loaded before the clear is in the new epoch"
    );
}

/// The same, with a load that outlives the kept token's re-check (1 s without a link): the
/// store read the epoch key again, found the new token, and put a value loaded before the
/// clear into the new epoch, where every instance served it for its L2 TTL (found by review:
/// nothing tied the store's epoch to the one the load began in). Now a store whose epoch moved
/// since the load began is not made.
#[tokio::test]
async fn a_load_outliving_the_token_recheck_is_not_stored_in_a_new_epoch() {
    let (_slow, heard, late) = epoch_pair().await;
    let clearer = heard.clone();
    let v: u64 = late
        .get_or_load("j", move || async move {
            // The source read, then a clear elsewhere, then more than the re-check interval.
            clearer.clear().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1100)).await;
            Ok::<_, Io>(4)
        })
        .await
        .unwrap();
    assert_eq!(v, 4);
    assert_eq!(
        in_l2(&heard, "j").await,
        None,
        "a value loaded before the clear is in the new epoch"
    );
    // The batch form.
    let clearer = heard.clone();
    let got = late
        .get_many_or_load::<u64, _, _, _>(&["m"], move |keys| async move {
            clearer.clear().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1100)).await;
            Ok::<_, Io>(keys.into_iter().map(|k| (k, 5)).collect())
        })
        .await
        .unwrap();
    assert_eq!(got, vec![Some(5)]);
    assert_eq!(
        in_l2(&heard, "m").await,
        None,
        "a batch value loaded before the clear is in the new epoch"
    );
    // Through `as_backend()` (`CacheLoader`, the macros, the strategies' read-through): the
    // load's mark carries the epoch (before, `set_loaded` stored into the new one), after a
    // miss and for a replacing load alike.
    let cache =
        ncm_cache_core::Cache::new(late.as_backend(), ncm_cache_codec::Serializer::default());
    for (key, after_miss) in [("b1", true), ("b2", false)] {
        let mark = if after_miss {
            cache.miss_mark(key)
        } else {
            cache.load_mark(key)
        };
        heard.clear().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let bytes = cache.encode_for(key, &6u64).unwrap();
        let stored = cache
            .store_loaded_since(
                key,
                bytes,
                ncm_cache_core::Expiry::Default,
                ncm_cache_core::CacheFailure::FailClosed,
                mark,
            )
            .await
            .unwrap();
        assert!(!stored, "{key}: stored in the new epoch");
        assert_eq!(
            in_l2(&heard, key).await,
            None,
            "{key}: a value loaded through as_backend before the clear is in the new epoch"
        );
    }
}

/// Fail-safe serves a stale copy no older than the max stale age — also when that age passes
/// while the L2 read is in flight and the read then fails (typed, byte-level and batch reads).
/// Before (found by review), the age was checked before the read only, so a read failing after
/// its timeouts (`connect_timeout` + 2 × `response_timeout` on Redis) served a copy older than
/// promised.
#[tokio::test]
async fn a_stale_copy_is_not_served_past_its_max_stale_age_after_a_slow_failed_read() {
    use ncm_cache_core::CacheBackend as _;
    let clock = Arc::new(ManualClock::new());
    let slow = Arc::new(Slow::new(memory(&clock)));
    let cache = MultiLevelCache::builder(Arc::clone(&slow) as SharedBackend)
        .clock(Arc::clone(&clock) as SharedClock)
        .l1_default_ttl(Duration::from_secs(1))
        .fail_safe(Duration::from_secs(10))
        .build()
        .unwrap();
    let bytes = cache.as_backend();
    for k in ["t", "b", "m"] {
        cache.set(k, 1u64).await.unwrap();
    }
    // Fresh until 1 s, servable as stale until 11 s.
    clock.advance(Duration::from_millis(10_500));
    slow.get_reply_delay(Duration::from_millis(200));
    slow.get_fails_after(true);
    // Within the age all the way: served, marked stale.
    let (v, source) = cache.get_with_source::<u64>("t").await.unwrap().unwrap();
    assert_eq!((*v, source), (1, ValueSource::Stale));
    // The age passes during each read.
    let typed = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get_with_source::<u64>("t").await }
    });
    let single = tokio::spawn({
        let bytes = bytes.clone();
        async move { bytes.get("b").await }
    });
    let batch = tokio::spawn({
        let bytes = bytes.clone();
        async move { bytes.get_many(&["m"]).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    clock.advance(Duration::from_secs(1));
    let typed = typed.await.unwrap();
    assert!(
        typed.is_err(),
        "a copy past its max stale age was served: {typed:?}"
    );
    let single = single.await.unwrap();
    assert!(single.is_err(), "byte-level read served {single:?}");
    let batch = batch.await.unwrap();
    assert!(batch.is_err(), "batch read served {batch:?}");
}

/// The typed batch calls keep fail-safe while L2 is down, as the single-key ones do: `get_many`
/// serves stale copies when every key it had to ask L2 for has one (as the byte-level batch
/// does), and `get_many_or_load` loads (its values served, not cached), serving the stale
/// copies only when the loader fails too (found by review: both failed with L2's error, and
/// stale copies were never served by the typed batch calls).
#[tokio::test]
async fn typed_batch_calls_keep_fail_safe_while_l2_is_down() {
    let clock = Arc::new(ManualClock::new());
    let slow = Arc::new(Slow::new(memory(&clock)));
    let cache = MultiLevelCache::builder(Arc::clone(&slow) as SharedBackend)
        .clock(Arc::clone(&clock) as SharedClock)
        .l1_default_ttl(Duration::from_secs(1))
        .fail_safe(Duration::from_secs(60))
        .build()
        .unwrap();
    for (k, v) in [("a", 1u64), ("b", 2), ("e", 5)] {
        cache.set(k, v).await.unwrap();
    }
    clock.advance(Duration::from_secs(2));
    slow.mode(Mode::Unavailable);
    assert_eq!(
        cache.get_many::<u64>(&["a", "b"]).await.unwrap(),
        vec![Some(1), Some(2)]
    );
    assert!(
        cache.get_many::<u64>(&["a", "c"]).await.is_err(),
        "a key without a copy fails the call"
    );
    let loaded = cache
        .get_many_or_load::<u64, _, _, _>(&["a", "c"], |keys| async move {
            Ok::<_, Io>(keys.into_iter().map(|k| (k, 10)).collect())
        })
        .await
        .unwrap();
    assert_eq!(loaded, vec![Some(10), Some(10)], "the loader was not asked");
    let stale = cache
        .get_many_or_load::<u64, _, _, _>(&["b", "e"], |_| async {
            Err::<std::collections::HashMap<String, u64>, _>(Io::other("database down"))
        })
        .await
        .unwrap();
    assert_eq!(stale, vec![Some(2), Some(5)]);
    assert!(
        cache
            .get_many_or_load::<u64, _, _, _>(&["b", "f"], |_| async {
                Err::<std::collections::HashMap<String, u64>, _>(Io::other("database down"))
            })
            .await
            .is_err(),
        "a key without a copy fails the call"
    );
}

/// Fail-safe's main case — L2's copy has expired and the source is down — on every load path:
/// a stale L1 copy within the max stale age is served when the loader fails, by the typed
/// `get_or_load`, by `get_many_or_load`, and through `as_backend()` (the path of `CacheLoader`,
/// the macros, `read_through`, `CacheStrategies` and `SqlCache`); past the max stale age it is
/// not. Before (review, helper-74), L2's "absent" dropped the copy on the last two paths: they
/// returned the loader's error.
#[tokio::test]
async fn fail_safe_serves_a_stale_copy_when_l2_expired_and_the_loader_fails() {
    let clock = Arc::new(ManualClock::new());
    let cache = MultiLevelCache::builder(memory(&clock))
        .clock(Arc::clone(&clock) as SharedClock)
        .l1_default_ttl(Duration::from_secs(1))
        .fail_safe(Duration::from_secs(60))
        .build()
        .unwrap();
    let core =
        ncm_cache_core::Cache::new(cache.as_backend(), ncm_cache_codec::Serializer::default());
    let ttl = Duration::from_secs(1);
    for (k, v) in [("a", 1u64), ("b", 2)] {
        cache.set_with_ttl(k, v, ttl).await.unwrap();
    }
    for (k, v) in [("c", 3u64), ("d", 4)] {
        core.set_with_ttl(k, &v, ttl).await.unwrap();
    }
    clock.advance(Duration::from_secs(2));
    fn down() -> Io {
        Io::other("database down")
    }
    let a: u64 = cache
        .get_or_load("a", || async move { Err::<u64, _>(down()) })
        .await
        .unwrap();
    assert_eq!(a, 1, "get_or_load");
    let many = cache
        .get_many_or_load::<u64, _, _, _>(&["b"], |_| async move {
            Err::<std::collections::HashMap<String, u64>, _>(down())
        })
        .await;
    assert_eq!(many.unwrap(), vec![Some(2)], "get_many_or_load");
    let c: u64 = core
        .read_through("c", || async move { Err::<u64, _>(down()) }, ttl)
        .await
        .expect("read_through over as_backend() serves the stale copy");
    assert_eq!(c, 3);
    clock.advance(Duration::from_secs(60));
    assert!(
        core.read_through("d", || async move { Err::<u64, _>(down()) }, ttl)
            .await
            .is_err(),
        "a copy past the max stale age was served"
    );
}

/// A `get_many_or_load` whose loader fails returns its error when a key it asked for has no
/// copy to serve — here a key L1 answered with a cached "not found" (negative caching), with
/// fail-safe off. Before (review, helper-77), no key had reached L2, so no copy was checked
/// and the call answered `Ok([None])`, swallowing the error.
#[tokio::test]
async fn a_batch_load_that_fails_without_copies_returns_the_error() {
    let clock = Arc::new(ManualClock::new());
    let cache = MultiLevelCache::builder(memory(&clock))
        .clock(Arc::clone(&clock) as SharedClock)
        .negative_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let none = cache
        .get_or_load_optional::<u64, _, _, _>("x", || async { Ok::<_, Io>(None) })
        .await
        .unwrap();
    assert_eq!(none, None);
    let failed = cache
        .get_many_or_load::<u64, _, _, _>(&["x"], |_| async {
            Err::<std::collections::HashMap<String, u64>, _>(Io::other("database down"))
        })
        .await;
    assert!(
        failed.is_err(),
        "the loader's error was swallowed: {failed:?}"
    );
}

/// The other side of the epoch check on a load's store: a load longer than the token's
/// re-check interval with no clear meanwhile re-reads the same token and is stored (the
/// change count moves only when the token itself changes).
#[tokio::test]
async fn a_load_outliving_the_token_recheck_without_a_clear_is_stored() {
    let (_slow, heard, late) = epoch_pair().await;
    let v: u64 = late
        .get_or_load("j", || async {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            Ok::<_, Io>(4)
        })
        .await
        .unwrap();
    assert_eq!(v, 4);
    assert_eq!(in_l2(&heard, "j").await, Some(4));
    assert_eq!(late.get_stats().loads_not_cached, 0);
}

/// A replacing load's store through `as_backend().set_loaded` (a plain mark: a forced load, a
/// load after a failed read) whose L2 write fails: its caller learns the error (a fail-closed
/// read-through fails, a loader counts it) while the value stays in L1 for fail-safe; with
/// `skip_l2_write` it is a local write, stored (found by review of this stop's change, which
/// answered `Ok(false)` in both cases).
#[tokio::test]
async fn a_replacing_load_store_that_fails_in_l2_is_an_error_and_stays_in_l1() {
    use ncm_cache_core::{Bytes, CacheBackend as _};
    let (slow, cache) = slow_cache();
    let backend = cache.as_backend();
    let mark = backend.load_mark("k");
    slow.mode(Mode::Unavailable);
    let stored = backend
        .set_loaded("k", Bytes::from_static(b"v"), None, mark)
        .await;
    assert!(
        stored.is_err(),
        "the failed store was not reported: {stored:?}"
    );
    let l1_only = ncm_cache_multilevel::EntryOptions::new().skip_l2_read();
    let held = cache
        .as_backend_with(&l1_only)
        .unwrap()
        .get("k")
        .await
        .unwrap();
    assert_eq!(held.as_deref(), Some(&b"v"[..]), "the loaded value left L1");
    slow.mode(Mode::Pass);
    let local = cache
        .as_backend_with(&ncm_cache_multilevel::EntryOptions::new().skip_l2_write())
        .unwrap();
    let mark = local.load_mark("j");
    assert!(
        local
            .set_loaded("j", Bytes::from_static(b"w"), None, mark)
            .await
            .unwrap(),
        "a local load's store is stored"
    );
}

/// `set_many` through `as_backend()` writes every key also after one failed, so a failed
/// batch leaves no key behind in L1 with its older value (a `SqlCache` invalidation of several
/// tables during an outage: the first failure stopped the batch, and the other tables' token
/// copies kept validating results from before the write; found by review).
#[tokio::test]
async fn a_failed_backend_batch_write_evicts_every_key() {
    use ncm_cache_core::{Bytes, CacheBackend as _};
    let (slow, cache) = slow_cache();
    let backend = cache.as_backend();
    for k in ["a", "b"] {
        backend
            .set(k, Bytes::from_static(b"old"), None)
            .await
            .unwrap();
    }
    slow.mode(Mode::Unavailable);
    let written = backend
        .set_many(
            &[
                ("a", Bytes::from_static(b"new")),
                ("b", Bytes::from_static(b"new")),
            ],
            None,
        )
        .await;
    assert!(written.is_err());
    let l1_only = cache
        .as_backend_with(&ncm_cache_multilevel::EntryOptions::new().skip_l2_read())
        .unwrap();
    for k in ["a", "b"] {
        assert_eq!(
            l1_only.get(k).await.unwrap(),
            None,
            "{k} kept its older value"
        );
    }
}
