//! One writer of the cross-process migration test (`tests/tests/migration_processes.rs`): a
//! `RedisCache` on a cluster writing pairs of keys of one slot, through `set_many` and through
//! a `RedisPipeline` (two SETs, then a GET of each), from several tasks, while the test moves
//! that slot to another primary.
//!
//! Environment: `NCM_REDIS_NODES` (cluster seed URLs, comma-separated), `NCM_WORKER_ID`,
//! `NCM_WORKER_SECS` (how long to write), `NCM_WORKER_KEYS` (keys `{mp}:k0`…), `NCM_WORKER_OUT`
//! (the log file).
//!
//! Log lines, one per call: `W <start µs> <end µs> <outcome> <key>=<value> <key>=<value>`, the
//! outcome `ok`, `timeout` (the call may or may not have been applied) or `error:<message>`;
//! values are `w<id>.<n>` (the test seeds `seed`). After a pipeline that succeeded, one line
//! per GET: `G <key>=<value>` (`bad-read <key> …` when it did not decode to a value).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ncm_cache::redis::PipelineResult;
use ncm_cache::{RedisCache, RedisConfig};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

const TASKS: u64 = 4;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let id: u64 = env("NCM_WORKER_ID").parse().unwrap();
    let secs: f64 = env("NCM_WORKER_SECS").parse().unwrap();
    let keys: u64 = env("NCM_WORKER_KEYS").parse().unwrap();
    let out = env("NCM_WORKER_OUT");
    let mut config = RedisConfig::default();
    config.cluster_nodes = env("NCM_REDIS_NODES")
        .split(',')
        .map(str::to_owned)
        .collect();
    config.key_prefix = "mig:".into();
    let cache = RedisCache::connect(config).await.unwrap();
    println!("ready");
    let log = Arc::new(Mutex::new(String::new()));
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (cache, log, counter) = (cache.clone(), Arc::clone(&log), Arc::clone(&counter));
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(id << 32 | t);
            while Instant::now() < deadline {
                let a = rng.u64(..keys);
                let b = (a + 1 + rng.u64(..keys - 1)) % keys;
                let (ka, kb) = (format!("{{mp}}:k{a}"), format!("{{mp}}:k{b}"));
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let (va, vb) = (format!("w{id}.{}", 2 * n), format!("w{id}.{}", 2 * n + 1));
                let start = micros();
                let outcome = if rng.bool() {
                    let pairs = [(ka.as_str(), va.as_str()), (kb.as_str(), vb.as_str())];
                    cache.set_many(pairs, Duration::from_secs(3600)).await
                } else {
                    let mut pipeline = cache.pipeline();
                    pipeline
                        .set(&ka, va.as_str())
                        .set(&kb, vb.as_str())
                        .get(&ka)
                        .get(&kb);
                    cache.execute_pipeline(pipeline).await.map(|results| {
                        for (k, r) in [&ka, &kb].into_iter().zip(&results[2..]) {
                            let line = match r.decode::<String>(cache.codec()) {
                                Ok(Some(v)) => format!("G {k}={v}\n"),
                                read => format!("bad-read {k} {read:?} {r:?}\n"),
                            };
                            log.lock().unwrap().push_str(&line);
                        }
                        assert!(matches!(results[0], PipelineResult::Done));
                    })
                };
                let end = micros();
                let outcome = match outcome {
                    Ok(()) => "ok".to_owned(),
                    Err(e) if e.is_timeout() => "timeout".to_owned(),
                    Err(e) => format!("error:{}", e.to_string().replace(' ', "_")),
                };
                let line = format!("W {start} {end} {outcome} {ka}={va} {kb}={vb}\n");
                log.lock().unwrap().push_str(&line);
                tokio::time::sleep(Duration::from_micros(rng.u64(0..3000))).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    std::fs::write(&out, log.lock().unwrap().as_str()).unwrap();
    println!("done");
}
