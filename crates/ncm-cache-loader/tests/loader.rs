//! `CacheLoader`: registration, keys, single-flight, errors, strategies, TTL, fail-open,
//! stats and health.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Flaky, memory_cache};
use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheError, CacheStrategy};
use ncm_cache_loader::{CacheLoader, args_key, loader_key};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

fn counting_loader(loader: &CacheLoader, name: &str, strategy: CacheStrategy) -> Arc<AtomicUsize> {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    loader
        .register_loader(
            name,
            move |id: u64| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    if id == 0 {
                        return Err(std::io::Error::other("no user 0"));
                    }
                    Ok(User {
                        id,
                        name: format!("User {id}"),
                    })
                }
            },
            Duration::from_secs(60),
            strategy,
        )
        .unwrap();
    runs
}

#[tokio::test(start_paused = true)]
async fn load_caches_by_arguments_and_expires_after_the_ttl() {
    let loader = CacheLoader::new(memory_cache());
    let runs = counting_loader(&loader, "user", CacheStrategy::CacheAside);

    let a: User = loader.load("user", 123u64).await.unwrap();
    let b: User = loader.load("user", 123u64).await.unwrap();
    let c: User = loader.load("user", 456u64).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(c.id, 456);
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // The key is deterministic and readable by anyone sharing the cache.
    let key = loader_key("user", &args_key(&123u64).unwrap());
    assert_eq!(key, "loader:user:123");
    assert_eq!(loader.cache().get::<User>(&key).await.unwrap(), Some(a));

    tokio::time::advance(Duration::from_secs(61)).await;
    let _: User = loader.load("user", 123u64).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 3, "expired after the TTL");

    let stats = loader.get_loader_stats();
    let user = stats.loaders["user"];
    assert_eq!(
        (user.calls, user.hits, user.misses, user.loads),
        (4, 1, 3, 3)
    );
    assert_eq!(stats.overall_hit_rate, 0.25);
}

#[tokio::test]
async fn errors_are_returned_and_never_cached() {
    let loader = CacheLoader::new(memory_cache());
    let runs = counting_loader(&loader, "user", CacheStrategy::ReadThrough);
    for _ in 0..3 {
        let err = loader.load::<u64, User>("user", 0).await.unwrap_err();
        assert!(matches!(err, CacheError::Loader(_)), "{err}");
        assert!(err.to_string().contains("no user 0"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let stats = loader.get_loader_stats().loaders["user"];
    assert_eq!((stats.errors, stats.loads), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_loads_of_one_key_run_the_loader_once() {
    let loader = CacheLoader::new(memory_cache());
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handle = loader
        .register_loader(
            "slow",
            move |id: u64| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, std::io::Error>(id * 2)
                }
            },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(500));
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let (loader, handle, barrier) = (loader.clone(), handle.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                if i % 2 == 0 {
                    loader.load::<u64, u64>("slow", 21).await
                } else {
                    handle.load(21).await
                }
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 42);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stats = loader.get_loader_stats().loaders["slow"];
    assert_eq!(stats.calls, 500);
    assert_eq!(stats.loads, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_failures_are_shared_and_not_cached() {
    let loader = CacheLoader::new(memory_cache());
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    loader
        .register_loader(
            "down",
            move |(): ()| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<u8, _>("database down")
                }
            },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (loader, barrier) = (loader.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                loader.load::<(), u8>("down", ()).await
            })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("database down"));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one load for all waiters");
    assert!(loader.load::<(), u8>("down", ()).await.is_err());
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the error was not cached");
    assert_eq!(loader.get_loader_stats().loaders["down"].errors, 101);
}

#[tokio::test]
async fn wrong_types_and_unknown_names_are_clear_errors() {
    let loader = CacheLoader::new(memory_cache());
    counting_loader(&loader, "user", CacheStrategy::CacheAside);
    let err = loader
        .load::<String, User>("user", "x".into())
        .await
        .unwrap_err();
    let CacheError::InvalidArgument(msg) = &err else {
        panic!("{err}")
    };
    assert!(msg.contains("takes `u64`"), "{msg}");
    let err = loader.load::<u64, String>("user", 1).await.unwrap_err();
    assert!(err.to_string().contains("returns `"), "{err}");
    let err = loader.load::<u64, User>("nobody", 1).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("no loader registered as \"nobody\"")
    );
    assert!(
        loader
            .register_loader(
                "z",
                |(): ()| async { Ok::<_, String>(1) },
                Duration::ZERO,
                CacheStrategy::CacheAside
            )
            .is_err()
    );
    assert!(
        CacheLoader::builder(memory_cache())
            .default_ttl(Duration::ZERO)
            .build()
            .is_err()
    );
}

#[tokio::test]
async fn write_around_never_writes_and_write_behind_writes_in_the_background() {
    let loader = CacheLoader::new(memory_cache());
    let around = counting_loader(&loader, "around", CacheStrategy::WriteAround);
    let behind = counting_loader(&loader, "behind", CacheStrategy::WriteBehind);
    for _ in 0..3 {
        let _: User = loader.load("around", 1u64).await.unwrap();
    }
    assert_eq!(around.load(Ordering::SeqCst), 3);

    let _: User = loader.load("behind", 1u64).await.unwrap();
    for _ in 0..100 {
        if loader.cache().exists("loader:behind:1").await.unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _: User = loader.load("behind", 1u64).await.unwrap();
    assert_eq!(behind.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn handles_refresh_and_invalidate() {
    let loader = CacheLoader::new(memory_cache());
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handle = loader
        .register_loader(
            "search",
            move |(q, page): (String, u32)| {
                let r = r.clone();
                async move {
                    let n = r.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(format!("{q}/{page}/{n}"))
                }
            },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let args = ("rust".to_string(), 2);
    assert_eq!(handle.key(&args).unwrap(), r#"loader:search:["rust",2]"#);
    assert_eq!(handle.load(args.clone()).await.unwrap(), "rust/2/0");
    assert_eq!(handle.load(args.clone()).await.unwrap(), "rust/2/0");
    assert_eq!(handle.refresh(args.clone()).await.unwrap(), "rust/2/1");
    assert_eq!(handle.load(args.clone()).await.unwrap(), "rust/2/1");
    assert!(handle.invalidate(&args).await.unwrap());
    assert_eq!(handle.load(args.clone()).await.unwrap(), "rust/2/2");
    let _ = handle.load(("go".to_string(), 1)).await.unwrap();
    assert_eq!(loader.invalidate_all("search").await.unwrap(), 2);
    assert!(!loader.invalidate("search", &args).await.unwrap());
    assert_eq!(loader.loader_names(), vec!["search".to_string()]);
}

#[tokio::test]
async fn a_failing_cache_is_skipped_and_reported_by_health() {
    let backend = Flaky::new();
    let cache = Cache::new(backend.clone(), Serializer::default());
    let loader = CacheLoader::builder(cache)
        .max_error_rate(0.5)
        .build()
        .unwrap();
    let runs = counting_loader(&loader, "user", CacheStrategy::CacheAside);

    let health = loader.get_health_status().await;
    assert!(health.is_healthy && health.backend_healthy, "{health:?}");
    assert_eq!(health.registered_loaders, 1);

    backend.set_down(true);
    // Fail-open: every call still answers, from the loader.
    for _ in 0..3 {
        let user: User = loader.load("user", 7u64).await.unwrap();
        assert_eq!(user.id, 7);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let stats = loader.get_loader_stats().loaders["user"];
    assert!(stats.cache_errors >= 6, "{stats:?}");
    let health = loader.get_health_status().await;
    assert!(!health.is_healthy && !health.backend_healthy);
    assert_eq!(health.issues.len(), 2, "{:?}", health.issues);

    backend.set_down(false);
    let _: User = loader.load("user", 7u64).await.unwrap();
    let _: User = loader.load("user", 7u64).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 4, "caching resumes by itself");
}

#[tokio::test]
async fn a_high_loader_error_rate_is_unhealthy() {
    let loader = CacheLoader::new(memory_cache());
    counting_loader(&loader, "user", CacheStrategy::CacheAside);
    let _: User = loader.load("user", 1u64).await.unwrap();
    assert!(loader.get_health_status().await.is_healthy);
    let _ = loader.load::<u64, User>("user", 0).await;
    let health = loader.get_health_status().await;
    assert!(!health.is_healthy);
    assert!(health.error_rate > 0.4 && health.backend_healthy);
    assert!(
        health.issues[0].contains("error rate"),
        "{:?}",
        health.issues
    );
}

#[tokio::test]
async fn disabled_metrics_collect_nothing() {
    let loader = CacheLoader::builder(memory_cache())
        .enable_metrics(false)
        .enable_logging(false)
        .build()
        .unwrap();
    counting_loader(&loader, "user", CacheStrategy::CacheAside);
    let _: User = loader.load("user", 1u64).await.unwrap();
    assert_eq!(loader.get_loader_stats().total.calls, 0);
}

/// A load whose cache read failed (fail-open) cannot tell whether the key is there: it
/// replaces what is there rather than storing "only if still absent", which the entry
/// already present would refuse on every call (the loader running each time).
#[tokio::test]
async fn a_load_after_a_failed_read_replaces_the_entry() {
    let backend = Flaky::new();
    let cache = Cache::new(backend.clone(), Serializer::default());
    let loader = CacheLoader::new(cache.clone());
    let runs = counting_loader(&loader, "user", CacheStrategy::CacheAside);
    let key = loader_key("user", &args_key(&7u64).unwrap());
    cache.set(&key, &"stale").await.unwrap();
    backend.set_reads_down(true);
    let user: User = loader.load("user", 7u64).await.unwrap();
    assert_eq!(user.id, 7);
    backend.set_reads_down(false);
    let stored: Option<User> = cache.get(&key).await.unwrap();
    assert_eq!(
        stored.map(|u| u.id),
        Some(7),
        "the loaded value replaced the entry"
    );
    let _: User = loader.load("user", 7u64).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the next call is a hit");
}

/// A `refresh` runs the loader now: it never joins a lazy load of the key already in flight,
/// whose source read may be older (found by review: both flights were named by the key's mark
/// alone, so `refresh` waited for and returned the lazy load's value, and the cache kept it).
#[tokio::test]
async fn a_refresh_does_not_join_a_lazy_load_in_flight() {
    let loader = CacheLoader::new(memory_cache());
    let runs = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let handle = loader
        .register_loader(
            "slow",
            {
                let (runs, release) = (Arc::clone(&runs), Arc::clone(&release));
                move |_: u32| {
                    let (runs, release) = (Arc::clone(&runs), Arc::clone(&release));
                    async move {
                        let n = runs.fetch_add(1, Ordering::SeqCst);
                        if n == 0 {
                            release.notified().await;
                        }
                        Ok::<_, std::io::Error>(format!("v{n}"))
                    }
                }
            },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let lazy = tokio::spawn({
        let handle = handle.clone();
        async move { handle.load(1).await.unwrap() }
    });
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refreshed = tokio::time::timeout(Duration::from_secs(2), handle.refresh(1))
        .await
        .expect("the refresh waited for the lazy load")
        .unwrap();
    assert_eq!(refreshed, "v1");
    release.notify_one();
    assert_eq!(lazy.await.unwrap(), "v0");
    assert_eq!(
        handle.load(1).await.unwrap(),
        "v1",
        "the refresh's value is not what is cached"
    );
}

/// A refresh called while another refresh of the key runs must not be handed that one's value:
/// its source read began before this call (a write to the source in between would be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_does_not_settle_for_a_refresh_begun_before_it() {
    let loader = CacheLoader::new(memory_cache());
    let runs = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let handle = loader
        .register_loader(
            "slow_refresh",
            {
                let (runs, release) = (Arc::clone(&runs), Arc::clone(&release));
                move |_: u32| {
                    let (runs, release) = (Arc::clone(&runs), Arc::clone(&release));
                    async move {
                        let n = runs.fetch_add(1, Ordering::SeqCst);
                        if n == 0 {
                            release.notified().await;
                        }
                        Ok::<_, std::io::Error>(format!("v{n}"))
                    }
                }
            },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let first = tokio::spawn({
        let handle = handle.clone();
        async move { handle.refresh(1).await.unwrap() }
    });
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Called now, while the first refresh's loader (which read the source as "v0") runs.
    let second = tokio::spawn({
        let handle = handle.clone();
        async move { handle.refresh(1).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    release.notify_one();
    assert_eq!(first.await.unwrap(), "v0");
    assert_eq!(
        second.await.unwrap(),
        "v1",
        "the second refresh was handed the value of a refresh begun before it"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        handle.load(1).await.unwrap(),
        "v1",
        "the newer refresh is not what is cached"
    );
}

/// Two refreshes one after the other under `WriteBehind`: the first one's store must not land
/// after the second's (a forced store replaces, so two of them in flight at once could apply
/// in either order). Here the first store is slow and the second fast (found by review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_refreshes_store_in_the_order_they_were_made() {
    let backend = Flaky::new();
    let cache = Cache::new(backend.clone(), Serializer::default());
    let loader = CacheLoader::new(cache);
    let runs = Arc::new(AtomicUsize::new(0));
    let handle = loader
        .register_loader(
            "wb",
            {
                let runs = Arc::clone(&runs);
                move |_: u32| {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    async move { Ok::<_, std::io::Error>(format!("v{n}")) }
                }
            },
            None,
            CacheStrategy::WriteBehind,
        )
        .unwrap();
    backend.set_write_delay(Duration::from_millis(300));
    assert_eq!(handle.refresh(1).await.unwrap(), "v0");
    // Let a background store, if any, start with the slow delay.
    tokio::time::sleep(Duration::from_millis(50)).await;
    backend.set_write_delay(Duration::ZERO);
    assert_eq!(handle.refresh(1).await.unwrap(), "v1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        handle.load(1).await.unwrap(),
        "v1",
        "the first refresh's store landed after the second's"
    );
}
