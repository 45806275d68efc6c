//! RedisCache beside raw redis-rs (same connection type, same run) and `redis-benchmark`.
//!
//! A custom harness: starts a throwaway redis-server, measures throughput of 64 concurrent tasks
//! (and 1), interleaving ours and the baseline round by round, and writes rows to
//! `$NCM_BENCH_OUT/redis.json` (ratio = ours / baseline for throughput, baseline / ours for
//! latency, so bigger is always better for us).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ncm_cache_bench::{
    Row, interleaved_medians, quick, redis_and_raw, spread, throughput, write_rows,
};
use ncm_cache_core::{CacheBackend, SharedBackend};
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;
use redis::aio::ConnectionManager;

const KEYS: usize = 1000;

fn value(size: usize) -> Bytes {
    Bytes::from(vec![b'x'; size])
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn redis_benchmark(
    port: u16,
    clients: usize,
    pipeline: usize,
    requests: usize,
    size: usize,
) -> Option<(f64, f64)> {
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-c",
            &clients.to_string(),
        ])
        .args([
            "-n",
            &requests.to_string(),
            "-d",
            &size.to_string(),
            "-P",
            &pipeline.to_string(),
            "-t",
            "set,get",
            "--csv",
            "-q",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut set = None;
    let mut get = None;
    for line in text.lines() {
        let cols: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
        match (
            cols.first(),
            cols.get(1).and_then(|v| v.parse::<f64>().ok()),
        ) {
            (Some(&"SET"), Some(rps)) => set = Some(rps),
            (Some(&"GET"), Some(rps)) => get = Some(rps),
            _ => {}
        }
    }
    Some((set?, get?))
}

fn main() {
    let filter = std::env::var("NCM_BENCH_FILTER").unwrap_or_default();
    if !filter.is_empty() && !"redis".contains(&filter) && !filter.contains("redis")
        || filter.contains("ceiling")
    {
        return;
    }
    let server = RedisServer::start().expect("redis-server is needed for the Redis benches");
    let rt = rt();
    let (rounds, per_task) = if quick() { (4, 800) } else { (8, 3000) };
    let mut rows = Vec::new();

    // The baseline gets exactly our socket options: the rows measure library overhead.
    let (ours, raw): (SharedBackend, ConnectionManager) =
        rt.block_on(redis_and_raw(&server.url())).unwrap();

    for (size, size_name) in [(100usize, "100B"), (4096, "4KiB")] {
        rt.block_on(async {
            for i in 0..KEYS {
                ours.set(&format!("k{i}"), value(size), None).await.unwrap();
            }
        });
        for tasks in [1usize, 64, 256] {
            let n = match tasks {
                1 => per_task * 4,
                256 => per_task / 2,
                _ => per_task,
            };
            // GET
            let (o, b) = interleaved_medians(
                rounds,
                || {
                    let ours = Arc::clone(&ours);
                    rt.block_on(throughput(tasks, n, move |i| {
                        let ours = Arc::clone(&ours);
                        async move {
                            ours.get(&format!("k{}", spread(i, KEYS))).await.unwrap();
                        }
                    }))
                },
                || {
                    let raw = raw.clone();
                    rt.block_on(throughput(tasks, n, move |i| {
                        let mut raw = raw.clone();
                        async move {
                            let _: Option<Vec<u8>> = redis::cmd("GET")
                                .arg(format!("k{}", spread(i, KEYS)))
                                .query_async(&mut raw)
                                .await
                                .unwrap();
                        }
                    }))
                },
            );
            rows.push(Row {
                name: format!("redis_get_{tasks}tasks_{size_name}"),
                ours: o,
                baseline: b,
                baseline_name: "redis-rs ConnectionManager".into(),
                unit: "ops/s".into(),
                ratio: o / b,
            });
            // SET
            let v = value(size);
            let v2 = v.clone();
            let (o, b) = interleaved_medians(
                rounds,
                || {
                    let ours = Arc::clone(&ours);
                    let v = v.clone();
                    rt.block_on(throughput(tasks, n, move |i| {
                        let ours = Arc::clone(&ours);
                        let v = v.clone();
                        async move {
                            ours.set(
                                &format!("k{}", spread(i, KEYS)),
                                v,
                                Some(Duration::from_secs(3600)),
                            )
                            .await
                            .unwrap();
                        }
                    }))
                },
                || {
                    let raw = raw.clone();
                    let v = v2.clone();
                    rt.block_on(throughput(tasks, n, move |i| {
                        let mut raw = raw.clone();
                        let v = v.clone();
                        async move {
                            let _: () = redis::cmd("SET")
                                .arg(format!("k{}", spread(i, KEYS)))
                                .arg(&v[..])
                                .arg("PX")
                                .arg(3_600_000)
                                .query_async(&mut raw)
                                .await
                                .unwrap();
                        }
                    }))
                },
            );
            rows.push(Row {
                name: format!("redis_set_{tasks}tasks_{size_name}"),
                ours: o,
                baseline: b,
                baseline_name: "redis-rs ConnectionManager".into(),
                unit: "ops/s".into(),
                ratio: o / b,
            });
        }
    }

    // Ours at 64 tasks beside redis-benchmark -c 64 -P 1 (the server's limit without pipelining).
    let requests = if quick() { 20_000 } else { 100_000 };
    if let Some((set_rps, get_rps)) = redis_benchmark(server.port(), 64, 1, requests, 100) {
        for (op, rps) in [("get", get_rps), ("set", set_rps)] {
            if let Some(ours_row) = rows
                .iter()
                .find(|r| r.name == format!("redis_{op}_64tasks_100B"))
                .cloned()
            {
                rows.push(Row {
                    name: format!("redis_{op}_64tasks_100B"),
                    ours: ours_row.ours,
                    baseline: rps,
                    baseline_name: "redis-benchmark -c 64 -P 1".into(),
                    unit: "ops/s".into(),
                    ratio: ours_row.ours / rps,
                });
            }
        }
    } else {
        eprintln!("redis-benchmark not found: its rows are skipped");
    }
    // ... and beside redis-benchmark -c 64 -P 16 (near the server's limit: 16 commands per
    // round trip per client).
    if let Some((_, get_rps)) = redis_benchmark(server.port(), 64, 16, requests * 5, 100)
        && let Some(ours_row) = rows
            .iter()
            .find(|r| r.name == "redis_get_64tasks_100B")
            .cloned()
    {
        rows.push(Row {
            name: "redis_get_64tasks_100B".into(),
            ours: ours_row.ours,
            baseline: get_rps,
            baseline_name: "redis-benchmark -c 64 -P 16".into(),
            unit: "ops/s".into(),
            ratio: ours_row.ours / get_rps,
        });
    }

    // get_many of 100 keys (100 B values) beside 100 sequential gets (latency per batch).
    let keys: Vec<String> = (0..100).map(|i| format!("many{i}")).collect();
    rt.block_on(async {
        for k in &keys {
            ours.set(k, value(100), None).await.unwrap();
        }
    });
    let batches = if quick() { 50 } else { 300 };
    let (o, b) = interleaved_medians(
        rounds,
        || {
            rt.block_on(async {
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                let start = Instant::now();
                for _ in 0..batches {
                    ours.get_many(&refs).await.unwrap();
                }
                start.elapsed().as_nanos() as f64 / batches as f64
            })
        },
        || {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..batches {
                    for k in &keys {
                        ours.get(k).await.unwrap();
                    }
                }
                start.elapsed().as_nanos() as f64 / batches as f64
            })
        },
    );
    rows.push(Row {
        name: "redis_get_many_100".into(),
        ours: o,
        baseline: b,
        baseline_name: "100 sequential gets".into(),
        unit: "ns/batch".into(),
        ratio: b / o,
    });

    drop(server);
    cluster_get_row(&rt, rounds, per_task, &mut rows);

    for r in &rows {
        println!(
            "{:<28} ours {:>12.0} {:<10} baseline {:>12.0} ({}) ratio {:.2}",
            r.name, r.ours, r.unit, r.baseline, r.baseline_name, r.ratio
        );
    }
    let path = write_rows("redis", &rows).unwrap();
    println!("wrote {}", path.display());
}

/// GET 100 B at 64 tasks on a throwaway 3+3 cluster: RedisCache beside redis-rs's own
/// cluster-async connection.
fn cluster_get_row(
    rt: &tokio::runtime::Runtime,
    rounds: usize,
    per_task: usize,
    rows: &mut Vec<Row>,
) {
    let Ok(cluster) = ncm_cache_testkit::RedisCluster::start() else {
        eprintln!("no cluster: the cluster row is skipped");
        return;
    };
    let (ours, raw) = rt.block_on(async {
        let urls = cluster.node_urls();
        let mut config = RedisConfig::from_url(&urls[0]).unwrap();
        config.cluster_nodes = urls.clone();
        config.health_check_interval = None;
        // The baseline gets our timeouts (each a timer per request in redis-rs's cluster
        // client) and socket options: the row measures library overhead, not settings.
        let raw = redis::cluster::ClusterClientBuilder::new(urls)
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.response_timeout)
            .tcp_settings(ncm_cache_redis::tcp_settings(&config))
            .build()
            .unwrap()
            .get_async_connection()
            .await
            .unwrap();
        let cache = RedisCache::connect(config).await.unwrap();
        let ours = cache.backend();
        for i in 0..KEYS {
            ours.set(&format!("k{i}"), value(100), None).await.unwrap();
        }
        (ours, raw)
    });
    let tasks = 64;
    let (o, b) = interleaved_medians(
        rounds,
        || {
            let ours = Arc::clone(&ours);
            rt.block_on(throughput(tasks, per_task, move |i| {
                let ours = Arc::clone(&ours);
                async move {
                    ours.get(&format!("k{}", spread(i, KEYS))).await.unwrap();
                }
            }))
        },
        || {
            let raw = raw.clone();
            rt.block_on(throughput(tasks, per_task, move |i| {
                let mut raw = raw.clone();
                async move {
                    let _: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(format!("k{}", spread(i, KEYS)))
                        .query_async(&mut raw)
                        .await
                        .unwrap();
                }
            }))
        },
    );
    rows.push(Row {
        name: "redis_get_64tasks_100B_cluster".into(),
        ours: o,
        baseline: b,
        baseline_name: "redis-rs cluster-async (same timeouts, socket options)".into(),
        unit: "ops/s".into(),
        ratio: o / b,
    });
}
