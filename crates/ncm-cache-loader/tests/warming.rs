//! Warming: `warm_cache` results and concurrency bound, the progress hook, and background
//! warming rounds on tokio's paused clock, with no task left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{alive_tasks, memory_cache};
use ncm_cache_core::CacheStrategy;
use ncm_cache_loader::{CacheLoader, WarmConfig, WarmProgress};
use serde_json::json;

struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A loader whose `user` loader sleeps 10 ms, tracks how many run at once, and fails for 0.
fn loader_with_gauge() -> (CacheLoader, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let loader = CacheLoader::new(memory_cache());
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, p) = (now.clone(), peak.clone());
    loader
        .register_loader(
            "user",
            move |id: u64| {
                let (n, p) = (n.clone(), p.clone());
                async move {
                    let running = n.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(running, Ordering::SeqCst);
                    // Decrements when the load ends or is abandoned.
                    let _running = Running(n);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if id == 0 {
                        Err(std::io::Error::other("no user 0"))
                    } else {
                        Ok(format!("user {id}"))
                    }
                }
            },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    (loader, now, peak)
}

#[tokio::test(start_paused = true)]
async fn warm_cache_reports_every_entry_in_order_with_bounded_concurrency() {
    let (loader, _, peak) = loader_with_gauge();
    let progress: Arc<Mutex<Vec<WarmProgress>>> = Arc::default();
    let seen = progress.clone();
    loader.on_warm_progress(move |p| seen.lock().unwrap().push(p));

    let mut configs: Vec<WarmConfig> = (1..=40).map(|id| WarmConfig::new("user", id)).collect();
    configs.push(WarmConfig::new("user", 0));
    configs.push(WarmConfig::new("user", json!("not a number")));
    configs.push(WarmConfig::new("nobody", 1));
    let results = loader.warm_cache(configs, 5).await;

    assert_eq!(results.len(), 43);
    assert!(results[..40].iter().all(|r| r.is_ok()));
    assert_eq!(results[0].key.as_deref(), Some("loader:user:1"));
    assert_eq!(results[39].key.as_deref(), Some("loader:user:40"));
    assert!(results[0].elapsed >= Duration::from_millis(10));
    assert!(
        results[40]
            .outcome
            .as_ref()
            .unwrap_err()
            .contains("no user 0")
    );
    assert!(
        results[41]
            .outcome
            .as_ref()
            .unwrap_err()
            .contains("do not fit `u64`")
    );
    assert_eq!(results[41].key, None);
    assert!(
        results[42]
            .outcome
            .as_ref()
            .unwrap_err()
            .contains("no loader registered")
    );
    assert_eq!(
        peak.load(Ordering::SeqCst),
        5,
        "at most `concurrency` at once"
    );

    // The values are cached now.
    let v: String = loader.load("user", 7u64).await.unwrap();
    assert_eq!(v, "user 7");
    assert_eq!(loader.get_loader_stats().loaders["user"].hits, 1);

    let progress = progress.lock().unwrap();
    assert_eq!(progress.len(), 43);
    let last = progress.last().unwrap();
    assert_eq!(
        (last.completed, last.total, last.failed, last.round),
        (43, 43, 3, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn warming_overwrites_cached_values() {
    let loader = CacheLoader::new(memory_cache());
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    loader
        .register_loader(
            "counter",
            move |(): ()| {
                let r = r.clone();
                async move { Ok::<_, std::io::Error>(r.fetch_add(1, Ordering::SeqCst)) }
            },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    assert_eq!(loader.load::<(), usize>("counter", ()).await.unwrap(), 0);
    let results = loader
        .warm_cache([WarmConfig::new("counter", json!(null))], 1)
        .await;
    assert!(results[0].is_ok());
    assert_eq!(loader.load::<(), usize>("counter", ()).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn background_warming_runs_rounds_until_stopped_and_leaves_no_task() {
    let (loader, _, _) = loader_with_gauge();
    let rounds_seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let seen = rounds_seen.clone();
    loader.on_warm_progress(move |p| {
        if p.completed == p.total {
            seen.lock().unwrap().push(p.round);
        }
    });
    let baseline = alive_tasks();
    let configs: Vec<WarmConfig> = (1..=10).map(|id| WarmConfig::new("user", id)).collect();
    loader
        .start_background_warming(configs, Duration::from_secs(3600), 5)
        .await
        .unwrap();
    assert!(loader.is_background_warming());
    assert_eq!(alive_tasks(), baseline + 1);

    // Rounds at 0 h, 1 h and 2 h.
    tokio::time::sleep(Duration::from_secs(2 * 3600 + 1800)).await;
    assert_eq!(loader.warming_rounds(), 3);
    assert_eq!(*rounds_seen.lock().unwrap(), vec![1, 2, 3]);
    assert!(loader.get_health_status().await.background_warming);

    assert!(loader.stop_background_warming().await);
    assert!(!loader.is_background_warming());
    assert_eq!(
        alive_tasks(),
        baseline,
        "no task survives stop_background_warming()"
    );
    assert!(
        !loader.stop_background_warming().await,
        "stopping twice is harmless"
    );

    tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
    assert_eq!(loader.warming_rounds(), 3, "no rounds after stop");
}

#[tokio::test(start_paused = true)]
async fn stopping_mid_round_and_restarting_replace_the_task() {
    let (loader, running, _) = loader_with_gauge();
    let baseline = alive_tasks();
    let configs: Vec<WarmConfig> = (1..=100).map(|id| WarmConfig::new("user", id)).collect();
    loader
        .start_background_warming(configs.clone(), Duration::from_secs(60), 2)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(25)).await;
    assert!(running.load(Ordering::SeqCst) > 0, "a round is in progress");
    // Starting again replaces the running warming.
    loader
        .start_background_warming(configs, Duration::from_secs(60), 2)
        .await
        .unwrap();
    assert_eq!(alive_tasks(), baseline + 1);
    tokio::time::sleep(Duration::from_millis(25)).await;
    assert!(loader.stop_background_warming().await);
    assert_eq!(
        running.load(Ordering::SeqCst),
        0,
        "in-flight loads were abandoned"
    );
    assert_eq!(alive_tasks(), baseline);
    assert!(
        loader
            .start_background_warming(vec![], Duration::ZERO, 1)
            .await
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_loader_ends_background_warming() {
    let (loader, _, _) = loader_with_gauge();
    let baseline = alive_tasks();
    loader
        .start_background_warming(vec![WarmConfig::new("user", 1)], Duration::from_secs(60), 1)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(alive_tasks(), baseline + 1);
    drop(loader);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(alive_tasks(), baseline);
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Search {
    query: String,
    limit: u32,
}

/// The original's warming config, as JSON, works as written: positional `args` (a list, one
/// entry per parameter), named `kwargs` (the fields of a struct argument), and an unknown field
/// is an error rather than silently ignored. `load_named` is the original's `load(name, **kw)`.
#[tokio::test]
async fn the_originals_warming_config_works_as_written() {
    let loader = CacheLoader::new(memory_cache());
    let user = loader
        .register_loader(
            "user_data",
            |id: u64| async move { Ok::<_, std::io::Error>(format!("user {id}")) },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let search = loader
        .register_loader(
            "search",
            |s: Search| async move { Ok::<_, std::io::Error>(format!("{}:{}", s.query, s.limit)) },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let pair = loader
        .register_loader(
            "pair",
            |(a, b): (String, u32)| async move { Ok::<_, std::io::Error>(format!("{a}{b}")) },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let configs: Vec<WarmConfig> = serde_json::from_value(json!([
        {"name": "user_data", "args": [123], "kwargs": {}},
        {"name": "search", "kwargs": {"query": "rust", "limit": 10}},
        {"name": "pair", "args": ["a", 1]},
        {"name": "user_data", "args": 7}
    ]))
    .unwrap();
    let results = loader.warm_cache(configs, 2).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    // Warmed under the keys the typed calls use.
    for key in [
        user.key(&123).unwrap(),
        user.key(&7).unwrap(),
        search
            .key(&Search {
                query: "rust".into(),
                limit: 10,
            })
            .unwrap(),
        pair.key(&("a".into(), 1)).unwrap(),
    ] {
        assert!(
            loader.cache().exists(&key).await.unwrap(),
            "{key} not warmed"
        );
    }
    // Named arguments, like the original's `load("search", query="rust", limit=10)`.
    let found: String = loader
        .load_named("search", json!({"query": "go", "limit": 3}))
        .await
        .unwrap();
    assert_eq!(found, "go:3");
    // Mistakes are errors that say what is wrong.
    let unknown = serde_json::from_value::<WarmConfig>(json!({"name": "x", "argz": [1]}));
    assert!(unknown.unwrap_err().to_string().contains("argz"));
    let mixed: Vec<WarmConfig> = serde_json::from_value(
        json!([{"name": "search", "args": ["rust"], "kwargs": {"limit": 1}}]),
    )
    .unwrap();
    let result = &loader.warm_cache(mixed, 1).await[0];
    assert!(
        result.outcome.as_ref().unwrap_err().contains("both"),
        "{result:?}"
    );
}

/// A loader that panics for one entry: `warm_cache` reports that entry as failed (and warms
/// the others) instead of panicking in the caller, and background warming keeps running its
/// rounds (before: the panic unwound out of the round and ended the background task for good,
/// silently; found by review).
#[tokio::test(start_paused = true)]
async fn a_panicking_loader_fails_its_entry_and_warming_goes_on() {
    let loader = CacheLoader::new(memory_cache());
    loader
        .register_loader(
            "user",
            move |id: u64| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                assert!(id != 2, "bad row {id}");
                Ok::<_, std::io::Error>(format!("user {id}"))
            },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let configs: Vec<WarmConfig> = (1..=3).map(|id| WarmConfig::new("user", id)).collect();
    let results = loader.warm_cache(configs.clone(), 2).await;
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[2].is_ok());
    let failed = results[1].outcome.as_ref().unwrap_err();
    assert!(failed.contains("panicked"), "{failed}");
    assert!(failed.contains("bad row 2"), "{failed}");

    loader
        .start_background_warming(configs, Duration::from_millis(50), 2)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(180)).await;
    assert!(
        loader.is_background_warming(),
        "a panicking loader ended background warming"
    );
    assert!(loader.warming_rounds() >= 3, "{}", loader.warming_rounds());
    assert!(loader.stop_background_warming().await);
}
