//! CacheLoader: cold-cache warm-up with `warm_cache` (64 at a time) beside a sequential loop of
//! the same loads, and the hit path of `load` beside a raw typed `Cache::get`.
//!
//! A custom harness on the memory backend (no server): the loader sleeps ~1 ms like a fast
//! database query, so the warm-up row measures how well warming overlaps loads. Writes rows to
//! `$NCM_BENCH_OUT/loader.json` (ratio = ours / baseline for throughput: bigger is better).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use ncm_cache_bench::{Row, interleaved_medians, quick, write_rows};
use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheStrategy};
use ncm_cache_loader::{CacheLoader, WarmConfig};
use ncm_cache_memory::MemoryBackend;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    id: u64,
    name: String,
    score: f64,
}

/// A fresh loader over an empty memory cache with one `record` loader sleeping ~1 ms.
fn cold_loader(keys: usize) -> CacheLoader {
    let backend = MemoryBackend::builder()
        .max_entries(keys as u64 * 2)
        .build()
        .unwrap();
    let loader = CacheLoader::builder(Cache::new(backend, Serializer::default()))
        .enable_logging(false)
        .build()
        .unwrap();
    loader
        .register_loader(
            "record",
            |id: u64| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok::<_, std::io::Error>(Record {
                    id,
                    name: format!("record {id}"),
                    score: id as f64 * 0.5,
                })
            },
            Duration::from_secs(3600),
            CacheStrategy::CacheAside,
        )
        .unwrap();
    loader
}

fn main() {
    let filter = std::env::var("NCM_BENCH_FILTER").unwrap_or_default();
    if !filter.is_empty() && !"loader".contains(&filter) && !filter.contains("loader") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = if quick() { 2_000 } else { 10_000 };
    let mut rows = Vec::new();

    // Warm-up of `keys` cold keys: warm_cache(concurrency 64) vs one load after another.
    let warm = rt.block_on(async {
        let loader = cold_loader(keys);
        let configs: Vec<WarmConfig> = (0..keys as u64)
            .map(|id| WarmConfig::new("record", id))
            .collect();
        let start = Instant::now();
        let results = loader.warm_cache(configs, 64).await;
        let took = start.elapsed();
        assert!(results.iter().all(|r| r.is_ok()));
        keys as f64 / took.as_secs_f64()
    });
    let sequential = rt.block_on(async {
        let loader = cold_loader(keys);
        let start = Instant::now();
        for id in 0..keys as u64 {
            let _: Record = loader.load("record", id).await.unwrap();
        }
        keys as f64 / start.elapsed().as_secs_f64()
    });
    rows.push(Row {
        name: "loader_warm_cold".into(),
        ours: warm,
        baseline: sequential,
        baseline_name: format!("sequential load() loop, {keys} keys"),
        unit: "keys/s".into(),
        ratio: warm / sequential,
    });

    // The hit path: load() on warm keys vs a raw typed Cache::get of the same keys.
    let hot = 1_000u64;
    let ops = if quick() { 50_000 } else { 200_000 };
    let loader = cold_loader(hot as usize);
    rt.block_on(async {
        let configs: Vec<WarmConfig> = (0..hot).map(|id| WarmConfig::new("record", id)).collect();
        loader.warm_cache(configs, 64).await;
    });
    let cache = loader.cache().clone();
    let (o, b) = interleaved_medians(
        if quick() { 3 } else { 7 },
        || {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..ops {
                    let _: Record = loader.load("record", i % hot).await.unwrap();
                }
                ops as f64 / start.elapsed().as_secs_f64()
            })
        },
        || {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..ops {
                    let key = format!("loader:record:{}", i % hot);
                    let _: Record = cache.get(&key).await.unwrap().unwrap();
                }
                ops as f64 / start.elapsed().as_secs_f64()
            })
        },
    );
    rows.push(Row {
        name: "loader_load_hit".into(),
        ours: o,
        baseline: b,
        baseline_name: "raw Cache::get".into(),
        unit: "ops/s".into(),
        ratio: o / b,
    });

    for r in &rows {
        println!(
            "{:<24} ours {:>12.0} {:<7} baseline {:>12.0} ({}) ratio {:.2}",
            r.name, r.ours, r.unit, r.baseline, r.baseline_name, r.ratio
        );
    }
    let path = write_rows("loader", &rows).unwrap();
    println!("wrote {}", path.display());
}
