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
//! both against write-through writes/s; and durable write-behind (journaled in a Redis Stream on
//! a throwaway `redis-server` before each write is acknowledged, same cache and store):
//! - `strategies_durable_write_behind_accepted` — against write-through;
//! - `strategies_durable_write_behind_accepted_vs_memory` — against in-memory write-behind;
//! - `strategies_durable_replay_after_crash` — entries/s a new process adopts and persists
//!   from a crashed one's journal, against in-memory write-behind's persisted writes/s.
//!
//! Each row also carries the store-call counts (`store_calls_ours`, `store_calls_baseline`)
//! and the number of writes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ncm_cache_bench::{median, quick};
use ncm_cache_codec::Serializer;
use ncm_cache_core::Cache;
use ncm_cache_memory::MemoryBackend;
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_strategies::{
    CacheStrategies, DurableConfig, Store, WriteBehindConfig, batch_store_fn,
};
use ncm_cache_testkit::RedisServer;

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

fn config() -> WriteBehindConfig {
    WriteBehindConfig::default()
        .batch_size(1000)
        .max_pending(100_000)
}

/// The journal's Redis for durable rounds: its own stream name per round.
fn journal(rt: &tokio::runtime::Runtime, server: &RedisServer, prefix: &str) -> DurableConfig {
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = prefix.to_owned();
    c.health_check_interval = None;
    let redis = rt.block_on(RedisCache::connect(c)).unwrap();
    DurableConfig::new(Arc::clone(redis.redis_backend())).lease(Duration::from_secs(2))
}

fn strategies(rt: &tokio::runtime::Runtime, durable: Option<DurableConfig>) -> CacheStrategies {
    let config = match durable {
        Some(d) => config().durable(d),
        None => config(),
    };
    rt.block_on(
        CacheStrategies::builder(Cache::new(MemoryBackend::new(), Serializer::default()))
            .write_behind(config)
            .build(),
    )
    .unwrap()
}

#[derive(Clone, Copy)]
enum Mode {
    Through,
    Behind,
    Durable,
}

/// Runs `writes` writes from `TASKS` tasks; returns (writes/s accepted, writes/s persisted,
/// store calls).
fn round(
    rt: &tokio::runtime::Runtime,
    server: &RedisServer,
    mode: Mode,
    writes: usize,
) -> (f64, f64, u64) {
    let durable = matches!(mode, Mode::Durable)
        .then(|| journal(rt, server, &format!("r{}:", fastrand::u64(..))));
    let s = strategies(rt, durable);
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
                            Mode::Behind | Mode::Durable => {
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

/// A crashed process's journal of `writes` writes (1,000 keys, so coalesced on adoption to
/// what is pending per key... kept distinct here: `writes` distinct keys), then a new process
/// that adopts and persists them: entries/s from its start until the store has them all.
fn replay(rt: &tokio::runtime::Runtime, server: &RedisServer, writes: usize) -> f64 {
    let prefix = format!("crash{}:", fastrand::u64(..));
    // The crashed process: its runtime is dropped with every write waiting an hour.
    {
        let crashed = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let d = journal(&crashed, server, &prefix).lease(Duration::from_millis(200));
        let s = strategies(&crashed, Some(d));
        let store = database(Arc::new(AtomicU64::new(0)));
        crashed.block_on(async {
            let queue = s.write_behind_queue(&store).await.unwrap();
            for i in 0..writes {
                queue
                    .write(
                        &format!("k{i}"),
                        &(i as u64),
                        Duration::from_secs(3600),
                        Duration::from_secs(3600),
                    )
                    .await
                    .unwrap();
            }
            std::mem::forget(queue);
        });
        std::mem::forget(s);
        drop(crashed);
    }
    std::thread::sleep(Duration::from_millis(400));
    let calls = Arc::new(AtomicU64::new(0));
    let stored = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&stored);
    let store = batch_store_fn(move |rows: Vec<(String, u64)>| {
        let (calls, counted) = (Arc::clone(&calls), Arc::clone(&counted));
        async move {
            calls.fetch_add(1, Ordering::Relaxed);
            let n = rows.len() as u64;
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(STORE_LATENCY);
                drop(rows);
            })
            .await
            .map_err(|e| e.to_string())?;
            counted.fetch_add(n, Ordering::Relaxed);
            Ok::<_, String>(())
        }
    })
    .named("bench");
    let start = Instant::now();
    let d = journal(rt, server, &prefix);
    let s = strategies(rt, Some(d));
    rt.block_on(async {
        let queue = s.write_behind_queue(&store).await.unwrap();
        while stored.load(Ordering::Relaxed) < writes as u64 {
            queue.recover().await.unwrap();
            queue.flush().await.unwrap();
            assert!(start.elapsed() < Duration::from_secs(300), "replay stalled");
        }
        s.shutdown().await.unwrap();
    });
    writes as f64 / start.elapsed().as_secs_f64()
}

fn row(name: &str, ours: f64, baseline: f64, calls: (u64, u64), writes: usize) -> String {
    row_vs(
        name,
        ours,
        baseline,
        "write-through (same store, same writers)",
        calls,
        writes,
    )
}

fn row_vs(
    name: &str,
    ours: f64,
    baseline: f64,
    baseline_name: &str,
    calls: (u64, u64),
    writes: usize,
) -> String {
    serde_json::json!({
        "name": name,
        "ours": ours,
        "baseline": baseline,
        "baseline_name": baseline_name,
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
    let server = RedisServer::start().expect("redis-server is needed for the durable rows");
    let (rounds, writes) = if quick() { (3, 32_000) } else { (7, 128_000) };
    let (mut through, mut accepted, mut persisted) = (Vec::new(), Vec::new(), Vec::new());
    let (mut calls_through, mut calls_behind) = (Vec::new(), Vec::new());
    let (mut durable_accepted, mut calls_durable) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let mut behind = || {
            let (a, p, c) = round(&rt, &server, Mode::Behind, writes);
            accepted.push(a);
            persisted.push(p);
            calls_behind.push(c as f64);
        };
        let mut thru = || {
            let (a, _, c) = round(&rt, &server, Mode::Through, writes);
            through.push(a);
            calls_through.push(c as f64);
        };
        let mut durable = || {
            let (a, _, c) = round(&rt, &server, Mode::Durable, writes);
            durable_accepted.push(a);
            calls_durable.push(c as f64);
        };
        if r % 2 == 0 {
            behind();
            thru();
            durable();
        } else {
            durable();
            thru();
            behind();
        }
    }
    let replay_writes = writes / 4;
    let mut replays: Vec<f64> = (0..rounds.min(3))
        .map(|_| replay(&rt, &server, replay_writes))
        .collect();
    let base = median(&mut through);
    let calls = (
        median(&mut calls_behind) as u64,
        median(&mut calls_through) as u64,
    );
    let memory_accepted = median(&mut accepted);
    let memory_persisted = median(&mut persisted);
    let durable_calls = (
        median(&mut calls_durable) as u64,
        median(&mut calls_through) as u64,
    );
    let durable = median(&mut durable_accepted);
    let rows = [
        row(
            "strategies_write_behind_accepted",
            memory_accepted,
            base,
            calls,
            writes,
        ),
        row(
            "strategies_write_behind_persisted",
            memory_persisted,
            base,
            calls,
            writes,
        ),
        row(
            "strategies_durable_write_behind_accepted",
            durable,
            base,
            durable_calls,
            writes,
        ),
        row_vs(
            "strategies_durable_write_behind_accepted_vs_memory",
            durable,
            memory_accepted,
            "in-memory write-behind (same store, same writers)",
            (durable_calls.0, calls.0),
            writes,
        ),
        row_vs(
            "strategies_durable_replay_after_crash",
            median(&mut replays),
            memory_persisted,
            "in-memory write-behind, persisted writes/s",
            (0, 0),
            replay_writes,
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
