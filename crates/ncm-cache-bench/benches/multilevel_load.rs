//! Load rows of the multi-level cache, on a throwaway redis-server:
//! - a Zipf 90/10 read/write workload through MultiLevelCache (L1 + Redis, with the backplane)
//!   beside the same workload on Redis only (ops/s, 64 tasks);
//! - the backplane's stale window: after `set` returns on instance A, how long instance B can
//!   still return the old value (p99), beside the window without a backplane (the L1 TTL).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ncm_cache_bench::{Row, Zipf, interleaved_medians, quick, write_rows};
use ncm_cache_multilevel::MultiLevelCache;
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;

const TASKS: usize = 64;

async fn multilevel(server: &RedisServer, name: &str) -> MultiLevelCache {
    let mut config = RedisConfig::from_url(&server.url()).unwrap();
    config.health_check_interval = None;
    let redis = RedisCache::connect(config).await.unwrap();
    let cache = MultiLevelCache::builder_shared(redis.backend())
        .name(name)
        .l1_max_size(200_000)
        .backplane(Arc::clone(redis.redis_backend()))
        .build()
        .unwrap();
    let start = Instant::now();
    while !cache.l1_active() && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cache
}

fn value(i: usize) -> String {
    format!("{i:0>100}")
}

/// ops/s of TASKS tasks doing `per_task` Zipf-distributed ops (90 % reads).
async fn zipf_run<R, W, RF, WF>(zipf: Arc<Zipf>, per_task: usize, read: R, write: W) -> f64
where
    R: Fn(usize) -> RF + Send + Sync + Clone + 'static,
    W: Fn(usize) -> WF + Send + Sync + Clone + 'static,
    RF: Future<Output = ()> + Send,
    WF: Future<Output = ()> + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (zipf, read, write) = (Arc::clone(&zipf), read.clone(), write.clone());
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(t as u64);
                for _ in 0..per_task {
                    let k = zipf.sample(&mut rng);
                    if rng.u8(..10) == 0 {
                        write(k).await;
                    } else {
                        read(k).await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (TASKS * per_task) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let filter = std::env::var("NCM_BENCH_FILTER").unwrap_or_default();
    if !filter.is_empty() && !"multilevel_zipf backplane_stale_window".contains(&filter) {
        return;
    }
    let server = RedisServer::start().expect("redis-server is needed for the multi-level benches");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (keys, per_task, rounds) = if quick() {
        (20_000, 400, 3)
    } else {
        (100_000, 2_000, 5)
    };
    let mut rows = Vec::new();

    let (ml, redis_only) = rt.block_on(async {
        let ml = multilevel(&server, "zipf").await;
        let mut config = RedisConfig::from_url(&server.url()).unwrap();
        config.health_check_interval = None;
        config.key_prefix = "plain:".into();
        let redis_only = RedisCache::connect(config).await.unwrap();
        // Preload both key spaces.
        let batch: Vec<(String, String)> = (0..keys).map(|i| (format!("k{i}"), value(i))).collect();
        for chunk in batch.chunks(1000) {
            redis_only
                .set_many(
                    chunk.iter().map(|(k, v)| (k.as_str(), v)),
                    ncm_cache_core::Expiry::Default,
                )
                .await
                .unwrap();
            ml.l2()
                .set_many(
                    &chunk
                        .iter()
                        .map(|(k, v)| (k.as_str(), ml.codec_bytes(v).unwrap()))
                        .collect::<Vec<_>>(),
                    Some(Duration::from_secs(3600)),
                )
                .await
                .unwrap();
        }
        (ml, redis_only)
    });
    let zipf = Arc::new(Zipf::new(keys, 1.0));
    // Warm-up (not measured): the rows compare steady states, not L1's cold start.
    {
        let r = ml.clone();
        rt.block_on(zipf_run(
            Arc::clone(&zipf),
            per_task * 2,
            move |k| {
                let c = r.clone();
                async move {
                    c.get::<String>(&format!("k{k}")).await.unwrap();
                }
            },
            |_| async {},
        ));
    }
    let (o, b) = interleaved_medians(
        rounds,
        || {
            let (r, w) = (ml.clone(), ml.clone());
            rt.block_on(zipf_run(
                Arc::clone(&zipf),
                per_task,
                move |k| {
                    let c = r.clone();
                    async move {
                        c.get::<String>(&format!("k{k}")).await.unwrap();
                    }
                },
                move |k| {
                    let c = w.clone();
                    async move {
                        c.set(&format!("k{k}"), value(k)).await.unwrap();
                    }
                },
            ))
        },
        || {
            let (r, w) = (redis_only.clone(), redis_only.clone());
            rt.block_on(zipf_run(
                Arc::clone(&zipf),
                per_task,
                move |k| {
                    let c = r.clone();
                    async move {
                        c.get::<String>(&format!("k{k}")).await.unwrap();
                    }
                },
                move |k| {
                    let c = w.clone();
                    async move {
                        c.set(&format!("k{k}"), &value(k)).await.unwrap();
                    }
                },
            ))
        },
    );
    rows.push(Row {
        name: format!("multilevel_zipf_90r10w_{keys}keys_64tasks"),
        ours: o,
        baseline: b,
        baseline_name: "RedisCache only".into(),
        unit: "ops/s".into(),
        ratio: o / b,
    });

    // Stale window of the backplane.
    let samples = if quick() { 100 } else { 500 };
    let p99 = rt.block_on(async {
        let a = multilevel(&server, "window").await;
        let b = multilevel(&server, "window").await;
        let mut windows = Vec::with_capacity(samples);
        for v in 0..samples as u64 {
            a.set("hot", v).await.unwrap();
            let start = Instant::now();
            loop {
                if b.get::<u64>("hot").await.unwrap() == Some(v) {
                    break;
                }
                tokio::task::yield_now().await;
                assert!(start.elapsed() < Duration::from_secs(2));
            }
            windows.push(start.elapsed().as_nanos() as f64);
            // Make sure B holds it in L1 before the next write.
            for _ in 0..3 {
                b.get::<u64>("hot").await.unwrap();
            }
        }
        ncm_cache_bench::median(&mut windows.clone());
        windows.sort_by(f64::total_cmp);
        windows[(windows.len() * 99 / 100).min(windows.len() - 1)]
    });
    let ttl_ns = Duration::from_secs(300).as_nanos() as f64;
    rows.push(Row {
        name: "backplane_stale_window_p99".into(),
        ours: p99,
        baseline: ttl_ns,
        baseline_name: "no backplane (L1 TTL 300 s)".into(),
        unit: "ns".into(),
        ratio: ttl_ns / p99,
    });

    for r in &rows {
        println!(
            "{:<44} ours {:>14.0} {:<6} baseline {:>14.0} ({}) ratio {:.2}",
            r.name, r.ours, r.unit, r.baseline, r.baseline_name, r.ratio
        );
    }
    write_rows("multilevel", &rows).unwrap();
}
