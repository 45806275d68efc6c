//! Every strategy in process, on `MemoryBackend` (no server).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheError};
use ncm_cache_memory::MemoryBackend;
use ncm_cache_strategies::{
    CacheStrategies, OnFull, Store, WriteBehind, WriteBehindConfig, is_queue_full, store_fn,
};
use support::{Flaky, database, eventually, eventually_async};

const HOUR: Duration = Duration::from_secs(3600);

fn strategies() -> CacheStrategies {
    CacheStrategies::new(Cache::new(MemoryBackend::new(), Serializer::default()))
}

async fn with_config(config: WriteBehindConfig) -> CacheStrategies {
    CacheStrategies::builder(Cache::new(MemoryBackend::new(), Serializer::default()))
        .write_behind(config)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_coalesces_100k_writes_over_1000_keys() {
    let s = with_config(WriteBehindConfig::default().batch_size(500)).await;
    let (store, db) = database("users");
    support::write_behind_coalesces(&s, &store, &db, 100_000, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failures_retry_then_dead_letter_then_replay() {
    let s = with_config(
        WriteBehindConfig::default()
            .max_retries(2)
            .retry_backoff(Duration::from_millis(5)),
    )
    .await;
    let (store, db) = database("flaky-db");
    support::dead_letters(&s, &store, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_dead_letters_and_stays_idempotent() {
    let s = with_config(
        WriteBehindConfig::default()
            .max_retries(1)
            .retry_backoff(Duration::from_millis(1)),
    )
    .await;
    let (store, db) = database("down");
    db.failing.store(true, Ordering::SeqCst);
    s.write_behind("k", &"v".to_string(), HOUR, &store, HOUR)
        .await
        .unwrap();
    let err = s.shutdown().await.unwrap_err();
    assert!(matches!(err, CacheError::Store(_)), "{err}");
    assert!(s.shutdown().await.is_err(), "still reported");
    let queue = s.write_behind_queue(&store).await.unwrap();
    assert_eq!(queue.dead_letters().len(), 1);
    // Replay works after shutdown (inline), once the store is back.
    db.failing.store(false, Ordering::SeqCst);
    assert_eq!(queue.replay_dead_letters().await.unwrap(), 1);
    assert_eq!(db.get("k").as_deref(), Some("v"));
    s.shutdown().await.unwrap();
}

// One thread: every write wakes the worker, which persists early as soon as it sees the queue
// full; on two threads it could make room between the 10th and the 11th write (it did, under
// load), so the refused write is only deterministic when the worker runs at our awaits.
#[tokio::test]
async fn a_full_queue_errors_or_waits_while_it_persists_early() {
    let cache = Cache::new(MemoryBackend::new(), Serializer::default());
    let (store, db) = database("bounded");
    let config = WriteBehindConfig::default()
        .max_pending(10)
        .batch_size(5)
        .on_full(OnFull::Error);
    let queue = WriteBehind::start(cache.clone(), store.clone(), config)
        .await
        .unwrap();
    for i in 0..10 {
        queue
            .write(&format!("k{i}"), &"v".to_string(), HOUR, HOUR)
            .await
            .unwrap();
        if i == 0 {
            // The first write wakes the worker (its entry is the earliest due): let it look and
            // go back to sleep before the queue fills, or on a busy machine it may wake only
            // once the queue is full and make room before the refused write below.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let err = queue
        .write("k10", &"v".to_string(), HOUR, HOUR)
        .await
        .unwrap_err();
    assert!(is_queue_full(&err), "{err}");
    assert!(
        !cache.exists("k10").await.unwrap(),
        "a refused write is not cached"
    );
    // A key already waiting always fits (it coalesces). The refused write made the queue
    // persist its oldest entries early; k9, the newest, is still waiting.
    queue
        .write("k9", &"again".to_string(), HOUR, HOUR)
        .await
        .unwrap();
    assert!(queue.stats().rejected >= 1);
    queue.shutdown().await.unwrap();
    assert_eq!(db.len(), 10);
    assert_eq!(db.get("k9").as_deref(), Some("again"));

    // Wait mode: the writer waits while the queue persists its oldest entries early.
    let (store, db) = database("waiting");
    let config = WriteBehindConfig::default()
        .max_pending(10)
        .batch_size(5)
        .full_wait_timeout(Duration::from_secs(5));
    let queue = WriteBehind::start(cache.clone(), store, config)
        .await
        .unwrap();
    for i in 0..50 {
        queue
            .write(&format!("w{i}"), &"v".to_string(), HOUR, HOUR)
            .await
            .unwrap();
    }
    assert!(db.len() >= 40, "persisted early to make room: {}", db.len());
    assert!(queue.pending() <= 11);
    queue.shutdown().await.unwrap();
    assert_eq!(db.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_their_delay_and_flush_does_not() {
    let s = strategies();
    let (store, db) = database("delayed");
    s.write_behind(
        "d:1",
        &"a".to_string(),
        HOUR,
        &store,
        Duration::from_millis(150),
    )
    .await
    .unwrap();
    assert_eq!(
        s.cache().get::<String>("d:1").await.unwrap().as_deref(),
        Some("a")
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(db.len(), 0, "not before the delay");
    assert!(eventually(Duration::from_secs(3), || db.len() == 1).await);

    s.write_behind("d:2", &"b".to_string(), HOUR, &store, HOUR)
        .await
        .unwrap();
    s.flush().await.unwrap();
    assert_eq!(
        db.get("d:2").as_deref(),
        Some("b"),
        "flush persists at once"
    );
    assert_eq!(s.write_behind_stats().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_still_persists() {
    let (store, db) = database("dropped");
    {
        let s = strategies();
        for i in 0..100 {
            s.write_behind(&format!("x{i}"), &"v".to_string(), HOUR, &store, HOUR)
                .await
                .unwrap();
        }
    }
    assert!(
        eventually(Duration::from_secs(5), || db.len() == 100).await,
        "the worker drains after the last handle is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_store_first_then_cache() {
    let flaky = Flaky::default();
    let s = CacheStrategies::new(Cache::new(flaky.clone(), Serializer::default()));
    let (store, db) = database("wt");
    s.write_through("user:123", &"John".to_string(), HOUR, &store)
        .await
        .unwrap();
    assert_eq!(db.get("user:123").as_deref(), Some("John"));
    assert_eq!(
        s.cache()
            .get::<String>("user:123")
            .await
            .unwrap()
            .as_deref(),
        Some("John")
    );

    // The store fails: the cache keeps the old value, the store error comes back.
    db.failing.store(true, Ordering::SeqCst);
    let err = s
        .write_through("user:123", &"Jane".to_string(), HOUR, &store)
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Store(_)), "{err}");
    assert_eq!(
        s.cache()
            .get::<String>("user:123")
            .await
            .unwrap()
            .as_deref(),
        Some("John")
    );

    // The cache fails after the store succeeded: the key is invalidated, not left stale.
    db.failing.store(false, Ordering::SeqCst);
    flaky.fail_sets.store(true, Ordering::SeqCst);
    let err = s
        .write_through("user:123", &"Jane".to_string(), HOUR, &store)
        .await
        .unwrap_err();
    assert!(err.is_connection(), "{err}");
    assert_eq!(db.get("user:123").as_deref(), Some("Jane"), "persisted");
    assert_eq!(
        s.cache().get::<String>("user:123").await.unwrap(),
        None,
        "no stale value"
    );

    // Bad arguments never reach the store.
    let calls = db.calls();
    assert!(
        s.write_through("", &"x".to_string(), HOUR, &store)
            .await
            .is_err()
    );
    assert!(
        s.write_through("k", &"x".to_string(), Duration::ZERO, &store)
            .await
            .is_err()
    );
    assert_eq!(db.calls(), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_around_persists_and_invalidates() {
    let s = strategies();
    let (store, db) = database("wa");
    s.cache().set("user:123", &"old").await.unwrap();
    s.write_around("user:123", &"new".to_string(), &store)
        .await
        .unwrap();
    assert_eq!(db.get("user:123").as_deref(), Some("new"));
    assert_eq!(s.cache().get::<String>("user:123").await.unwrap(), None);
    db.failing.store(true, Ordering::SeqCst);
    s.cache().set("user:123", &"cached").await.unwrap();
    assert!(
        s.write_around("user:123", &"x".to_string(), &store)
            .await
            .is_err()
    );
    assert!(
        s.cache().exists("user:123").await.unwrap(),
        "untouched on failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_through_runs_the_loader_once_for_concurrent_callers() {
    let s = strategies();
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (s, runs, barrier) = (s.clone(), runs.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                s.read_through(
                    "rt:user",
                    || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, std::io::Error>("loaded".to_string())
                    },
                    HOUR,
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "loaded");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let err = s
        .read_through::<String, _, _, _>("rt:err", || async { Err("db down") }, HOUR)
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Loader(_)));
    assert!(!s.cache().exists("rt:err").await.unwrap());
    // Cache-aside, the explicit pattern.
    let v: u32 = s
        .cache_aside("ca:n", || async { Ok::<_, std::io::Error>(7) }, HOUR)
        .await
        .unwrap();
    assert_eq!(v, 7);
    let v: u32 = s
        .cache_aside("ca:n", || async { Ok::<_, std::io::Error>(8) }, HOUR)
        .await
        .unwrap();
    assert_eq!(v, 7, "served from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_store_works_for_single_writes() {
    let saved = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = saved.clone();
    let save_to_database = store_fn(move |key: String, value: u64| {
        let sink = sink.clone();
        async move {
            sink.lock().unwrap().push((key, value));
            Ok::<_, std::io::Error>(())
        }
    });
    let s = strategies();
    s.write_through("n", &1u64, HOUR, &save_to_database)
        .await
        .unwrap();
    s.write_behind("n", &2u64, HOUR, &save_to_database, Duration::ZERO)
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(
        *saved.lock().unwrap(),
        [("n".to_string(), 1), ("n".to_string(), 2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_graph_chain_and_diamond_with_cycles_from_two_instances() {
    let a = strategies();
    let b = a.clone(); // in process, "instances" share the process graph
    support::dependency_graph(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_patterns_events_and_time() {
    let s = strategies();
    support::tags(&s).await;
    support::pattern(&s).await;
    support::local_event(&s).await;
    support::time_based(&s).await;
    let stats = s.invalidation_stats();
    assert!(
        stats.keys_invalidated >= 8 && stats.events_triggered == 2,
        "{stats:?}"
    );
    assert_eq!(stats.expirations_observed, 1);
    assert!(!s.is_distributed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_callback_is_contained() {
    let s = strategies();
    s.cache().set("p", &1).await.unwrap();
    s.event_based_invalidation("boom", ["p"], |_, _| panic!("user bug"))
        .await
        .unwrap();
    assert_eq!(s.trigger_event_invalidation("boom").await.unwrap(), 1);
    assert_eq!(s.invalidation_stats().callback_panics, 1);
}

/// One entry the store refuses (a constraint violation) among 100 in one batch: the batch is
/// split until the bad entry is alone, so only it becomes a dead letter and the other 99 reach
/// the store (before: the whole batch of 100 was dead-lettered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_entry_dead_letters_alone() {
    let s = with_config(
        WriteBehindConfig::default()
            .max_retries(1)
            .retry_backoff(Duration::from_millis(1))
            .batch_size(100),
    )
    .await;
    let stored = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let rows = Arc::clone(&stored);
    let store = ncm_cache_strategies::batch_store_fn(move |batch: Vec<(String, String)>| {
        let rows = Arc::clone(&rows);
        async move {
            if batch.iter().any(|(_, v)| v == "poison") {
                return Err("value violates a constraint");
            }
            rows.lock().unwrap().extend(batch);
            Ok(())
        }
    })
    .named("split");
    for i in 0..100 {
        let value = if i == 37 {
            "poison".to_owned()
        } else {
            format!("v{i}")
        };
        s.write_behind(
            &format!("k{i}"),
            &value,
            HOUR,
            &store,
            Duration::from_millis(50),
        )
        .await
        .unwrap();
    }
    assert!(s.flush().await.is_err(), "the bad entry is reported");
    let queue = s.write_behind_queue(&store).await.unwrap();
    let dead = queue.dead_letters();
    assert_eq!(dead.len(), 1, "only the bad entry: {dead:?}");
    assert_eq!(dead[0].key, "k37");
    assert_eq!(stored.lock().unwrap().len(), 99);
}

/// Two write-throughs of one key in one process, the first with a slow store reply: they run
/// one after the other, so the cache ends with what the store ends with (before: the slow
/// one's value landed in the cache last while the store held the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_throughs_of_one_key_are_ordered_in_process() {
    let s = strategies();
    let rows = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let store_with = |delay: Duration| {
        let rows = Arc::clone(&rows);
        ncm_cache_strategies::store_fn(move |key: String, value: String| {
            let rows = Arc::clone(&rows);
            async move {
                rows.lock().unwrap().insert(key, value);
                tokio::time::sleep(delay).await;
                Ok::<_, std::io::Error>(())
            }
        })
    };
    let (slow, fast) = (
        store_with(Duration::from_millis(200)),
        store_with(Duration::ZERO),
    );
    let first = {
        let (s, slow) = (s.clone(), slow.clone());
        tokio::spawn(async move { s.write_through("k", &"a".to_string(), HOUR, &slow).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_through("k", &"b".to_string(), HOUR, &fast)
        .await
        .unwrap();
    first.await.unwrap().unwrap();
    let stored = rows.lock().unwrap().get("k").cloned();
    let cached: Option<String> = s.cache().get("k").await.unwrap();
    assert_eq!(cached, stored, "cache and store disagree");
}

/// A write-through whose caller stops waiting after the store committed (here: while the cache
/// write hangs) must not leave the older cached value in place (found by review). Before, the
/// cache kept `old` until its TTL while the store held `new`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_cancelled_after_the_store_write_evicts_the_key() {
    let flaky = Flaky::default();
    let s = CacheStrategies::new(Cache::new(flaky.clone(), Serializer::default()));
    let (store, db) = database("wt-cancel");
    s.write_through("k", &"old".to_string(), HOUR, &store)
        .await
        .unwrap();
    flaky.hang_sets.store(true, Ordering::SeqCst);
    let new = "new".to_string();
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        s.write_through("k", &new, HOUR, &store),
    )
    .await;
    assert!(cancelled.is_err(), "the cache write was meant to hang");
    flaky.hang_sets.store(false, Ordering::SeqCst);
    assert_eq!(db.get("k").as_deref(), Some("new"), "the store committed");
    assert!(
        eventually_async(Duration::from_secs(1), || async {
            s.cache().get::<String>("k").await.unwrap().as_deref() != Some("old")
        })
        .await,
        "the cache kept the value the committed write replaced"
    );
}

/// A write-around cancelled after its store call committed still evicts the key, and a
/// write-through of the key on the same instance cannot cache its value after the
/// write-around's eviction when the store applied the write-around last (review, helper-69:
/// the old value stayed cached in both cases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_around_is_ordered_and_evicts_also_when_cancelled() {
    let s = CacheStrategies::new(Cache::new(MemoryBackend::new(), Serializer::default()));
    let committed = Arc::new(std::sync::Mutex::new(None::<String>));
    let entered = Arc::new(AtomicUsize::new(0));
    let (c, n) = (Arc::clone(&committed), Arc::clone(&entered));
    // Commits at once, then takes 300 ms to answer.
    let slow: Store<String> = Store::from_fn(move |_key: String, value: String| {
        let (c, n) = (Arc::clone(&c), Arc::clone(&n));
        async move {
            *c.lock().unwrap() = Some(value);
            n.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<(), CacheError>(())
        }
    })
    .named("slow-around");
    s.cache().set("k", &"old".to_string()).await.unwrap();
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        s.write_around("k", &"new".to_string(), &slow),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "the store call was meant to outlast the timeout"
    );
    assert_eq!(
        committed.lock().unwrap().as_deref(),
        Some("new"),
        "committed"
    );
    assert!(
        eventually_async(Duration::from_secs(1), || async {
            s.cache().get::<String>("k").await.unwrap().is_none()
        })
        .await,
        "a cancelled write-around left the value its store write replaced"
    );

    // A write-around begun while a write-through of the key is in its store call (which has
    // committed): the store applies the write-around last, so the write-around must evict after
    // the write-through's cache write, not before it.
    let s2 = s.clone();
    let slow2 = slow.clone();
    let before = entered.load(Ordering::SeqCst);
    let through = tokio::spawn(async move {
        s2.write_through("j", &"through".to_string(), HOUR, &slow2)
            .await
    });
    // The write-through is in its store call (it has committed).
    assert!(
        eventually(Duration::from_secs(5), || entered.load(Ordering::SeqCst)
            > before)
        .await,
        "the write-through never reached its store"
    );
    let fast_committed = Arc::clone(&committed);
    let fast: Store<String> = Store::from_fn(move |_key: String, value: String| {
        let c = Arc::clone(&fast_committed);
        async move {
            *c.lock().unwrap() = Some(value);
            Ok::<(), CacheError>(())
        }
    })
    .named("fast-around");
    s.write_around("j", &"around".to_string(), &fast)
        .await
        .unwrap();
    through.await.unwrap().unwrap();
    assert_eq!(
        committed.lock().unwrap().as_deref(),
        Some("around"),
        "applied last"
    );
    assert_eq!(
        s.cache().get::<String>("j").await.unwrap(),
        None,
        "the cache holds the write-through's value while the store holds the write-around's"
    );
}

/// A backend over a store other instances share (it reports a key prefix) and that does not
/// say what to evict for another instance's message: the trait's default removes nothing
/// from it. One this process alone owns (no prefix) is deleted from.
#[tokio::test]
async fn evicting_for_another_instance_leaves_a_shared_store_alone() {
    use ncm_cache_core::{Bytes, CacheBackend, CacheStats, HealthReport, KeyTtl, async_trait};

    #[derive(Debug)]
    struct Shared(MemoryBackend);

    #[async_trait]
    impl CacheBackend for Shared {
        fn name(&self) -> &str {
            "shared"
        }
        async fn get(&self, key: &str) -> ncm_cache_core::Result<Option<Bytes>> {
            self.0.get(key).await
        }
        async fn set(
            &self,
            key: &str,
            value: Bytes,
            ttl: Option<Duration>,
        ) -> ncm_cache_core::Result<()> {
            self.0.set(key, value, ttl).await
        }
        async fn delete(&self, key: &str) -> ncm_cache_core::Result<bool> {
            self.0.delete(key).await
        }
        async fn exists(&self, key: &str) -> ncm_cache_core::Result<bool> {
            self.0.exists(key).await
        }
        async fn get_ttl(&self, key: &str) -> ncm_cache_core::Result<KeyTtl> {
            self.0.get_ttl(key).await
        }
        async fn extend_ttl(&self, key: &str, ttl: Duration) -> ncm_cache_core::Result<bool> {
            self.0.extend_ttl(key, ttl).await
        }
        async fn clear_pattern(&self, pattern: &str) -> ncm_cache_core::Result<u64> {
            self.0.clear_pattern(pattern).await
        }
        async fn health_report(&self) -> HealthReport {
            self.0.health_report().await
        }
        fn get_stats(&self) -> CacheStats {
            self.0.get_stats()
        }
        fn key_prefix(&self) -> Option<&str> {
            Some("app:")
        }
    }

    let shared = Shared(MemoryBackend::new());
    let own = MemoryBackend::new();
    for b in [&shared as &dyn CacheBackend, &own] {
        b.set("k", Bytes::from_static(b"v"), None).await.unwrap();
    }
    assert_eq!(shared.evict_local(&["k"]).await.unwrap(), 0);
    assert_eq!(shared.evict_local_matching("*").await.unwrap(), 0);
    assert!(shared.get("k").await.unwrap().is_some());
    assert_eq!(own.evict_local(&["k"]).await.unwrap(), 1);
    assert!(own.get("k").await.unwrap().is_none());
}

/// An in-process cache does not store a read-through's load when the key was written or
/// deleted while the loader read the source (the value may be older than that write).
#[tokio::test]
async fn a_load_overtaken_by_a_delete_is_not_cached_in_memory() {
    let cache = Cache::new(MemoryBackend::new(), Serializer::default());
    let c = cache.clone();
    let v: String = cache
        .read_through_with(
            "k",
            move || async move {
                c.delete("k").await.unwrap();
                Ok::<_, std::io::Error>("old".to_string())
            },
            Duration::from_secs(60),
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(v, "old");
    assert_eq!(cache.get::<String>("k").await.unwrap(), None);
    // Without a write in between, the load is stored.
    let v: String = cache
        .read_through_with(
            "k",
            || async { Ok::<_, std::io::Error>("fresh".to_string()) },
            Duration::from_secs(60),
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(v, "fresh");
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("fresh")
    );
}

/// A read-through whose cache read failed (fail-open) cannot tell whether the key is there:
/// its load replaces what is there rather than storing "only if still absent", which the
/// entry already present would refuse on every call (`Cache::read_through_with` alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_after_a_failed_read_replaces_the_entry() {
    let flaky = Flaky::default();
    let s = CacheStrategies::new(Cache::new(flaky.clone(), Serializer::default()));
    for key in ["rt", "rtw"] {
        s.cache().set(key, &"old").await.unwrap();
    }
    flaky.fail_gets.store(true, Ordering::SeqCst);
    let load = || async { Ok::<_, std::io::Error>("new".to_string()) };
    let v: String = s.read_through("rt", load, HOUR).await.unwrap();
    assert_eq!(v, "new");
    let v: String = s
        .cache()
        .read_through_with("rtw", load, HOUR, Default::default())
        .await
        .unwrap();
    assert_eq!(v, "new");
    flaky.fail_gets.store(false, Ordering::SeqCst);
    for key in ["rt", "rtw"] {
        assert_eq!(
            s.cache().get::<String>(key).await.unwrap().as_deref(),
            Some("new"),
            "{key}: the loaded value replaced the entry"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_write_behind_key_ends_with_the_persisted_value() {
    support::an_invalidated_write_behind_key_ends_with_the_persisted_value(&strategies()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_supersede_a_waiting_write_behind() {
    support::direct_writes_supersede_a_waiting_write_behind(&strategies()).await;
}

/// A direct write holds its key to its end (review of the fix above, helper-81): a flush
/// does not settle while it holds the key's taken write (#1: it returned at once, and the write
/// went back into the queue after a flush that said it was persisted); a write-behind of the
/// key waits until the write-through's cache write is done (#2: it cached `v3`, then the
/// write-through's `v2` landed over it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_write_holds_its_key_to_its_end() {
    let flaky = Flaky::default();
    let s = CacheStrategies::new(Cache::new(flaky.clone(), Serializer::default()));
    let (entered, gate) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let db = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    // Refuses `refused` after the gate opens; stores everything else.
    let store = {
        let (db, entered, gate) = (Arc::clone(&db), Arc::clone(&entered), Arc::clone(&gate));
        ncm_cache_strategies::batch_store_fn(move |rows: Vec<(String, String)>| {
            let (db, entered, gate) = (Arc::clone(&db), Arc::clone(&entered), Arc::clone(&gate));
            async move {
                if rows.iter().any(|(_, v)| v == "refused") {
                    entered.notify_one();
                    gate.notified().await;
                    return Err("refused");
                }
                db.lock().unwrap().extend(rows);
                Ok(())
            }
        })
        .named("held")
    };
    let row = |k: &str| db.lock().unwrap().get(k).cloned();
    s.write_behind("f", &"v1".to_string(), HOUR, &store, HOUR)
        .await
        .unwrap();
    let through = tokio::spawn({
        let (s, store) = (s.clone(), store.clone());
        async move {
            s.write_through("f", &"refused".to_string(), HOUR, &store)
                .await
        }
    });
    entered.notified().await;
    let flush = tokio::spawn({
        let s = s.clone();
        async move { s.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !flush.is_finished(),
        "a flush settled while the key's waiting write was taken out"
    );
    gate.notify_one();
    assert!(through.await.unwrap().is_err());
    flush.await.unwrap().unwrap();
    assert_eq!(
        row("f").as_deref(),
        Some("v1"),
        "the waiting write was lost"
    );

    // The write-through's cache write hangs; a write-behind of the key waits for it.
    *flaky.hang_value.lock().unwrap() = Some("v2".into());
    let through = tokio::spawn({
        let (s, store) = (s.clone(), store.clone());
        async move { s.write_through("g", &"v2".to_string(), HOUR, &store).await }
    });
    assert!(
        eventually(Duration::from_secs(2), || row("g").as_deref() == Some("v2")).await,
        "the write-through never stored"
    );
    let behind = tokio::spawn({
        let (s, store) = (s.clone(), store.clone());
        async move {
            s.write_behind("g", &"v3".to_string(), HOUR, &store, HOUR)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !behind.is_finished(),
        "the write-behind did not wait for the write-through's cache write"
    );
    *flaky.hang_value.lock().unwrap() = None;
    through.await.unwrap().unwrap();
    behind.await.unwrap().unwrap();
    assert_eq!(
        s.cache().get::<String>("g").await.unwrap().as_deref(),
        Some("v3"),
        "the write-through's older value landed over the write-behind's"
    );
}

/// A batch whose store call panics does not leave its keys "in flight" for good: a
/// write-through of one of them does not wait forever (review, helper-81 #3). The panic fails
/// the store call like an error (the write ends as a dead letter), and the queue goes on:
/// before (helper-82 #1), it ended the worker and every later flush waited forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_does_not_wait_for_a_batch_that_panicked() {
    let mut config = WriteBehindConfig::default();
    config.max_retries = 1;
    config.retry_backoff = Duration::from_millis(10);
    let s = with_config(config).await;
    let store = ncm_cache_strategies::batch_store_fn(|rows: Vec<(String, String)>| async move {
        assert!(
            rows.iter().all(|(_, v)| v != "boom"),
            "a store that panics (as intended by this test)"
        );
        Ok::<_, std::io::Error>(())
    })
    .named("panics");
    s.write_behind("x", &"boom".to_string(), HOUR, &store, Duration::ZERO)
        .await
        .unwrap();
    let queue = s.write_behind_queue(&store).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || queue.dead_letters().len() == 1).await,
        "the panicking batch did not end as a dead letter"
    );
    let through = tokio::time::timeout(
        Duration::from_secs(2),
        s.write_through("x", &"ok".to_string(), HOUR, &store),
    )
    .await;
    assert!(
        through.is_ok(),
        "the write-through waited for a batch that never ends"
    );
    s.write_behind("y", &"fine".to_string(), HOUR, &store, HOUR)
        .await
        .unwrap();
    let flushed = tokio::time::timeout(Duration::from_secs(5), s.flush()).await;
    assert!(flushed.is_ok(), "a flush after the panic never returned");
    assert_eq!(queue.pending(), 0);
    assert!(
        queue.dead_letters().is_empty(),
        "the write-through superseded the dead letter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_landing_after_a_persist_is_not_undone() {
    support::a_write_landing_after_a_persist_is_not_undone(&strategies()).await;
}

/// A dead letter replayed while a write-through of its key is under way is superseded by it,
/// not persisted after it (review, helper-82 #3): the replay put the older write back into the
/// queue without the key's lock, and the worker stored it over the write-through's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_during_a_write_through_is_superseded() {
    use std::sync::atomic::AtomicBool;
    let s = with_config(
        WriteBehindConfig::default()
            .max_retries(1)
            .retry_backoff(Duration::from_millis(1)),
    )
    .await;
    let db = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    // `old` fails while `down`; once replayed it waits for `old_gate`. The write-through's
    // `new` waits for `new_gate`.
    let down = Arc::new(AtomicBool::new(true));
    let (new_entered, new_gate, old_entered, old_gate) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let store = {
        let (db, down) = (Arc::clone(&db), Arc::clone(&down));
        let gates = (
            Arc::clone(&new_entered),
            Arc::clone(&new_gate),
            Arc::clone(&old_entered),
            Arc::clone(&old_gate),
        );
        ncm_cache_strategies::batch_store_fn(move |rows: Vec<(String, String)>| {
            let (db, down, gates) = (Arc::clone(&db), Arc::clone(&down), gates.clone());
            async move {
                let (new_entered, new_gate, old_entered, old_gate) = gates;
                if rows.iter().any(|(_, v)| v.starts_with("old")) && down.load(Ordering::SeqCst) {
                    return Err("down");
                }
                if rows.iter().any(|(_, v)| v == "old") {
                    old_entered.notify_one();
                    old_gate.notified().await;
                }
                if rows.iter().any(|(_, v)| v == "new" || v == "bad") {
                    new_entered.notify_one();
                    new_gate.notified().await;
                }
                if rows.iter().any(|(_, v)| v == "bad") {
                    return Err("refused");
                }
                db.lock().unwrap().extend(rows);
                Ok(())
            }
        })
        .named("gated")
    };
    let queue = s.write_behind_queue(&store).await.unwrap();
    // `key`'s write-behind of `old` becomes a dead letter; a write-through of `direct` reaches
    // the store; then the dead letters are replayed.
    let replay_during_write_through =
        |key: &'static str, old: &'static str, direct: &'static str| {
            let (s, store, queue, down, new_entered) = (
                s.clone(),
                store.clone(),
                queue.clone(),
                Arc::clone(&down),
                Arc::clone(&new_entered),
            );
            async move {
                down.store(true, Ordering::SeqCst);
                s.write_behind(key, &old.to_string(), HOUR, &store, Duration::ZERO)
                    .await
                    .unwrap();
                assert!(
                    eventually(Duration::from_secs(5), || queue.dead_letters().len() == 1).await,
                    "the write never became a dead letter"
                );
                down.store(false, Ordering::SeqCst);
                let through = tokio::spawn(async move {
                    s.write_through(key, &direct.to_string(), HOUR, &store)
                        .await
                });
                tokio::time::timeout(Duration::from_secs(5), new_entered.notified())
                    .await
                    .expect("the write-through never reached the store");
                let replay = tokio::spawn(async move { queue.replay_dead_letters().await });
                (through, replay)
            }
        };
    let (through, replay) = replay_during_write_through("k", "old", "new").await;
    // Before the fix the replayed write reached the store here, and waited there.
    let old_reached = tokio::time::timeout(Duration::from_millis(300), old_entered.notified())
        .await
        .is_ok();
    new_gate.notify_one();
    through.await.unwrap().unwrap();
    old_gate.notify_one();
    let replayed = tokio::time::timeout(Duration::from_secs(5), replay)
        .await
        .expect("the replay never returned");
    replayed.unwrap().unwrap();
    assert_eq!(
        db.lock().unwrap().get("k").map(String::as_str),
        Some("new"),
        "the replayed dead letter was stored over the write-through (it reached the store: \
         {old_reached})"
    );
    assert!(!old_reached, "the replayed dead letter reached the store");
    assert_eq!(queue.pending(), 0);
    assert!(queue.dead_letters().is_empty());

    // A write-through that fails: the dead letter replayed meanwhile is persisted after it,
    // and the replay (a flush) waits for that.
    let (through, replay) = replay_during_write_through("j", "old2", "bad").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !replay.is_finished(),
        "the replay returned before the write-through it waits for ended"
    );
    new_gate.notify_one();
    assert!(through.await.unwrap().is_err());
    let replayed = tokio::time::timeout(Duration::from_secs(5), replay)
        .await
        .expect("the replay never returned");
    assert_eq!(replayed.unwrap().unwrap(), 1);
    assert_eq!(
        db.lock().unwrap().get("j").map(String::as_str),
        Some("old2"),
        "the replayed write was lost with the failed write-through"
    );
    assert_eq!(queue.pending(), 0);
    assert!(queue.dead_letters().is_empty());
}
