//! Write-behind beside write-through over the same persistent store (a custom harness).
//!
//! The store models a database: every call (single or batch) takes ~200 µs, spent off the
//! async workers (`spawn_blocking` + `thread::sleep`) as a real driver's network wait would be.
//! The cache is the in-process `MemoryBackend`, so the rows measure the strategies, not Redis.
//! 64 writer tasks write over 1,000 keys; rounds of the two strategies are interleaved (ABBA).
//!
//! Rows (`$NCM_BENCH_OUT/strategies.json`), ratio = ours / baseline (bigger is better):
//! - `strategies_write_behind_accepted` — writes/s acknowledged to the callers;
//! - `strategies_write_behind_persisted` — writes/s until every write reached the store
//!   (the queue flushed);
//!
//! both against write-through writes/s. Each row also carries the store-call counts
//! (`store_calls_ours`, `store_calls_baseline`) and the number of writes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ncm_cache_bench::{median, quick};
use ncm_cache_codec::Serializer;
use ncm_cache_core::Cache;
use ncm_cache_memory::MemoryBackend;
use ncm_cache_strategies::{CacheStrategies, Store, WriteBehindConfig, batch_store_fn};

const TASKS: usize = 64;
const KEYS: usize = 1000;
const STORE_LATENCY: Duration = Duration::from_micros(200);

/// A store whose every call costs `STORE_LATENCY`; counts calls.
fn database(calls: Arc<AtomicU64>) -> Store<u64> {
    batch_store_fn(move |rows: Vec<(String, u64)>| {
        let calls = Arc::clone(&calls);
        async move {
            calls.fetch_add(1, Ordering::Relaxed);
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(STORE_LATENCY);
                drop(rows);
            })
            .await
            .map_err(|e| e.to_string())
        }
    })
    .named("bench")
}

fn strategies(rt: &tokio::runtime::Runtime) -> CacheStrategies {
    rt.block_on(
        CacheStrategies::builder(Cache::new(MemoryBackend::new(), Serializer::default()))
            .write_behind(
                WriteBehindConfig::default()
                    .batch_size(1000)
                    .max_pending(100_000),
            )
            .build(),
    )
    .unwrap()
}

#[derive(Clone, Copy)]
enum Mode {
    Through,
    Behind,
}

/// Runs `writes` writes from `TASKS` tasks; returns (writes/s accepted, writes/s persisted,
/// store calls).
fn round(rt: &tokio::runtime::Runtime, mode: Mode, writes: usize) -> (f64, f64, u64) {
    let s = strategies(rt);
    let calls = Arc::new(AtomicU64::new(0));
    let store = database(Arc::clone(&calls));
    let per_task = writes / TASKS;
    rt.block_on(async {
        let start = Instant::now();
        let handles: Vec<_> = (0..TASKS)
            .map(|t| {
                let (s, store) = (s.clone(), store.clone());
                tokio::spawn(async move {
                    for i in 0..per_task {
                        let key = format!("user:{}", (t * per_task + i) % KEYS);
                        let value = (t * per_task + i) as u64;
                        let ttl = Duration::from_secs(3600);
                        match mode {
                            Mode::Through => s.write_through(&key, &value, ttl, &store).await,
                            Mode::Behind => {
                                s.write_behind(&key, &value, ttl, &store, Duration::from_millis(5))
                                    .await
                            }
                        }
                        .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        let accepted = start.elapsed();
        s.shutdown().await.unwrap();
        let persisted = start.elapsed();
        let n = (per_task * TASKS) as f64;
        (
            n / accepted.as_secs_f64(),
            n / persisted.as_secs_f64(),
            calls.load(Ordering::Relaxed),
        )
    })
}

fn row(name: &str, ours: f64, baseline: f64, calls: (u64, u64), writes: usize) -> String {
    serde_json::json!({
        "name": name,
        "ours": ours,
        "baseline": baseline,
        "baseline_name": "write-through (same store, same writers)",
        "unit": "writes/s",
        "ratio": ours / baseline,
        "store_calls_ours": calls.0,
        "store_calls_baseline": calls.1,
        "writes": writes,
    })
    .to_string()
}

fn main() {
    let filter = std::env::var("NCM_BENCH_FILTER").unwrap_or_default();
    if !filter.is_empty()
        && !"strategies_write_behind".contains(&filter)
        && !filter.contains("strateg")
    {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (rounds, writes) = if quick() { (3, 32_000) } else { (7, 128_000) };
    let (mut through, mut accepted, mut persisted) = (Vec::new(), Vec::new(), Vec::new());
    let (mut calls_through, mut calls_behind) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let mut behind = || {
            let (a, p, c) = round(&rt, Mode::Behind, writes);
            accepted.push(a);
            persisted.push(p);
            calls_behind.push(c as f64);
        };
        let mut thru = || {
            let (a, _, c) = round(&rt, Mode::Through, writes);
            through.push(a);
            calls_through.push(c as f64);
        };
        if r % 2 == 0 {
            behind();
            thru();
        } else {
            thru();
            behind();
        }
    }
    let base = median(&mut through);
    let calls = (
        median(&mut calls_behind) as u64,
        median(&mut calls_through) as u64,
    );
    let rows = [
        row(
            "strategies_write_behind_accepted",
            median(&mut accepted),
            base,
            calls,
            writes,
        ),
        row(
            "strategies_write_behind_persisted",
            median(&mut persisted),
            base,
            calls,
            writes,
        ),
    ];
    for r in &rows {
        println!("{r}");
    }
    let dir = std::env::var_os("NCM_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench/extra"));
    std::fs::create_dir_all(&dir).unwrap();
    let json = format!("[\n  {}\n]\n", rows.join(",\n  "));
    std::fs::write(dir.join("strategies.json"), json).unwrap();
}
