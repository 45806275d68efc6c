//! One worker process of the multi-process coherence checker (`tests/tests/coherence.rs`):
//! runs mixed set / delete / get / get_or_load / clear on shared keys with versioned values
//! through `MultiLevelCache::over_redis` (backplane + lock + fail-safe + eager refresh + loader
//! timeouts), and read-throughs through `CacheStrategies` over a second instance's
//! `as_backend()` (`NCM_WORKER_LAYERED=0`: none; `own`: that instance on a `RedisCache` of its
//! own), until its deadline, and writes what it did, with
//! wall-clock times, to a log file.
//!
//! Environment: `NCM_WORKER_ID`, `NCM_WORKER_SECS`, `NCM_WORKER_SEED`, `NCM_WORKER_LOG`, and
//! either `NCM_WORKER_URL` (one node) or `NCM_WORKER_NODES` (comma-separated cluster nodes);
//! `NCM_WORKER_COHERENCE` = `backplane` (default) | `tracking` | `both`; with
//! `NCM_WORKER_EPOCH=1` clears by epoch (`epoch_clear`); with
//! `NCM_WORKER_FOREIGN=1` the worker is *another program*: it only sets and deletes, with a
//! plain redis-rs client (values encoded as the cache would), never through the cache.
//!
//! Log lines (times in nanoseconds since the Unix epoch; `ok`/`err`):
//! - `S key version start end ok|err` — a set
//! - `D key start end ok|err` — a delete
//! - `C start end ok|err` — a clear
//! - `R key version|- start end source|err` — a get (source `L1`, `L2`, `Stale`, ...)
//! - `G key version|- start end source|err` — a get_or_load (`Loader`: this call's loader
//!   produced the value; `Joined`: another call's load, joined in flight)
//! - `L key version|- start end source|err` — a read-through over the layered instance
//!   (`Loader`: this call's loader produced the value; `Layered`: found in the cache)
//! - `P key version time` — a loader produced a version (also background refreshes)
//! - `A time 1|0` — this instance's L1 was found turned on / off (polled every 10 ms)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ncm_cache::multilevel::Coherence;
use ncm_cache::strategies::CacheStrategies;
use ncm_cache::{Cache, MultiLevelCache, RedisCache, RedisConfig, Serializer, ValueSource};
use serde::{Deserialize, Serialize};

/// Keys every worker uses.
const KEYS: u64 = 64;
/// Concurrent tasks per worker.
const TASKS: u64 = 4;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Val {
    key: String,
    version: u64,
}

fn now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

struct Log(Mutex<String>);

impl Log {
    fn line(&self, args: std::fmt::Arguments<'_>) {
        let mut s = self.0.lock().unwrap();
        let _ = s.write_fmt(args);
        s.push('\n');
    }
}

fn config() -> RedisConfig {
    let mut c = match env("NCM_WORKER_URL") {
        Some(url) => RedisConfig::from_url(&url).unwrap(),
        None => {
            let mut c = RedisConfig::default();
            c.cluster_nodes = env("NCM_WORKER_NODES")
                .expect("NCM_WORKER_URL or NCM_WORKER_NODES")
                .split(',')
                .map(str::to_owned)
                .collect();
            c
        }
    };
    c.key_prefix = "chk:".into();
    c.response_timeout = Duration::from_millis(300);
    c.connect_timeout = Duration::from_millis(300);
    c.health_check_interval = Some(Duration::from_millis(100));
    c
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let id: u64 = env("NCM_WORKER_ID").unwrap().parse().unwrap();
    let secs: f64 = env("NCM_WORKER_SECS").unwrap().parse().unwrap();
    let seed: u64 = env("NCM_WORKER_SEED").unwrap().parse().unwrap();
    let path = env("NCM_WORKER_LOG").unwrap();
    let redis = loop {
        match RedisCache::connect(config()).await {
            Ok(r) => break r,
            Err(e) => {
                eprintln!("worker {id}: connect: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let coherence = match env("NCM_WORKER_COHERENCE").as_deref() {
        Some("tracking") => Coherence::Tracking,
        Some("both") => Coherence::Both,
        _ => Coherence::Backplane,
    };
    let build = |redis: &RedisCache| {
        MultiLevelCache::over_redis(redis)
            .coherence(coherence)
            .name("checker")
            .epoch_clear(env("NCM_WORKER_EPOCH").is_some())
            .l1_default_ttl(Duration::from_secs(10))
            .fail_safe(Duration::from_secs(30))
            .eager_refresh(0.8)
            .loader_timeouts(
                Some(Duration::from_millis(50)),
                Some(Duration::from_secs(1)),
            )
            .build()
            .unwrap()
    };
    let cache = build(&redis);
    // A second instance in this process, under the layers as a byte-level backend:
    // `CacheStrategies::read_through` through `as_backend()` (its loads take the same stampede
    // lock as `get_or_load`'s; its fail-safe copies are re-checked after a failed load). Its
    // answers are checked as the others are.
    // `NCM_WORKER_LAYERED` (inherited from the checker's environment): `own` puts it on a
    // `RedisCache` of its own (its own pool and batcher), `0` leaves it out.
    let layered = match env("NCM_WORKER_LAYERED").as_deref() {
        Some("own") => Some(build(&RedisCache::connect(config()).await.unwrap())),
        Some("0") => None,
        _ => Some(build(&redis)),
    };
    let strategies = layered
        .as_ref()
        .map(|l| CacheStrategies::new(Cache::new(l.as_backend(), Serializer::default())));
    let log = Arc::new(Log(Mutex::new(String::new())));
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    if env("NCM_WORKER_FOREIGN").is_some() {
        foreign(&cache, id, seed, deadline, &log).await;
        std::fs::write(&path, log.0.lock().unwrap().clone()).unwrap();
        return;
    }
    let mut tasks = Vec::new();
    // When this instance's L1 was turned on and off (to place a violation against it).
    let (c, l) = (cache.clone(), Arc::clone(&log));
    tasks.push(tokio::spawn(async move {
        let mut was = None;
        while Instant::now() < deadline {
            let active = c.l1_active();
            if was != Some(active) {
                l.line(format_args!("A {} {}", now(), u8::from(active)));
                was = Some(active);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }));
    for t in 0..TASKS {
        let (cache, log, counter) = (cache.clone(), Arc::clone(&log), Arc::clone(&counter));
        let strategies = strategies.clone();
        let mut rng = fastrand::Rng::with_seed(seed ^ (id << 32) ^ t);
        tasks.push(tokio::spawn(async move {
            let next = || (id << 48) | counter.fetch_add(1, Ordering::Relaxed);
            while Instant::now() < deadline {
                let key = format!("k{}", rng.u64(..KEYS));
                let dice = rng.u32(..10_000);
                let start = now();
                if dice < 500 {
                    let version = next();
                    let val = Val {
                        key: key.clone(),
                        version,
                    };
                    let r = cache.set(&key, val).await;
                    let ok = if r.is_ok() { "ok" } else { "err" };
                    log.line(format_args!("S {key} {version} {start} {} {ok}", now()));
                } else if dice < 600 {
                    let r = cache.delete(&key).await;
                    let ok = if r.is_ok() { "ok" } else { "err" };
                    log.line(format_args!("D {key} {start} {} {ok}", now()));
                } else if dice < 601 {
                    let r = cache.clear().await;
                    let ok = if r.is_ok() { "ok" } else { "err" };
                    log.line(format_args!("C {start} {} {ok}", now()));
                } else if dice < 8600 {
                    let r = cache.get_with_source::<Val>(&key).await;
                    let end = now();
                    let (version, source) = match r {
                        Ok(Some((v, source))) => {
                            assert_eq!(v.key, key, "another key's value");
                            (v.version.to_string(), format!("{source:?}"))
                        }
                        Ok(None) => ("-".to_owned(), "None".to_owned()),
                        Err(_) => ("-".to_owned(), "err".to_owned()),
                    };
                    log.line(format_args!("R {key} {version} {start} {end} {source}"));
                } else if let Some(strategies) = strategies.as_ref().filter(|_| dice >= 9300) {
                    // A read-through over the layered instance; `Loader`: this call's loader
                    // produced the value.
                    let version = next();
                    let (log2, k2) = (Arc::clone(&log), key.clone());
                    let load = move || async move {
                        log2.line(format_args!("P {k2} {version} {}", now()));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        Ok::<_, std::io::Error>(Val { key: k2, version })
                    };
                    let r = strategies
                        .read_through::<Val, _, _, _>(&key, load, Duration::from_secs(60))
                        .await;
                    let end = now();
                    let (got, source) = match r {
                        Ok(v) => {
                            assert_eq!(v.key, key, "another key's value");
                            let source = if v.version == version {
                                "Loader"
                            } else {
                                "Layered"
                            };
                            (v.version.to_string(), source)
                        }
                        Err(_) => ("-".to_owned(), "err"),
                    };
                    log.line(format_args!("L {key} {got} {start} {end} {source}"));
                } else {
                    let version = next();
                    let (log2, k2) = (Arc::clone(&log), key.clone());
                    let r = cache
                        .get_or_load_with_source::<Val, _, _, _>(&key, move || async move {
                            log2.line(format_args!("P {k2} {version} {}", now()));
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Ok::<_, std::io::Error>(Val { key: k2, version })
                        })
                        .await;
                    let end = now();
                    let (got, source) = match r {
                        Ok((v, source)) => {
                            assert_eq!(v.key, key, "another key's value");
                            let source = match source {
                                // Another call's load, joined in flight: a read of it.
                                ValueSource::Loader if v.version != version => "Joined".to_owned(),
                                source => format!("{source:?}"),
                            };
                            (v.version.to_string(), source)
                        }
                        Err(_) => ("-".to_owned(), "err".to_owned()),
                    };
                    log.line(format_args!("G {key} {got} {start} {end} {source}"));
                }
                tokio::time::sleep(Duration::from_micros(rng.u64(0..2000))).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Background refreshes may still log their loads.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = log.0.lock().unwrap().clone();
    std::fs::write(&path, text).unwrap();
    let _ = cache.close().await;
    if let Some(layered) = &layered {
        let _ = layered.close().await;
    }
}

/// A plain client of the same Redis (one node or cluster), as another program would use.
enum Plain {
    Node(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Plain {
    async fn connect() -> redis::RedisResult<Self> {
        match env("NCM_WORKER_URL") {
            Some(url) => Ok(Self::Node(
                redis::Client::open(url)?
                    .get_multiplexed_async_connection()
                    .await?,
            )),
            None => {
                let nodes: Vec<String> = env("NCM_WORKER_NODES")
                    .unwrap()
                    .split(',')
                    .map(|n| format!("redis://{}", n.trim_start_matches("redis://")))
                    .collect();
                Ok(Self::Cluster(
                    redis::cluster::ClusterClient::builder(nodes)
                        .response_timeout(Duration::from_millis(300))
                        .connection_timeout(Duration::from_millis(300))
                        .build()?
                        .get_async_connection()
                        .await?,
                ))
            }
        }
    }

    async fn run(&mut self, cmd: &redis::Cmd) -> bool {
        let call = async {
            match self {
                Self::Node(c) => cmd.query_async::<redis::Value>(c).await,
                Self::Cluster(c) => cmd.query_async::<redis::Value>(c).await,
            }
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), call).await,
            Ok(Ok(_))
        )
    }
}

/// The foreign writer: SET (the cache's encoding, its TTL) and DEL of the shared keys.
async fn foreign(cache: &MultiLevelCache, id: u64, seed: u64, deadline: Instant, log: &Log) {
    let mut plain = loop {
        match Plain::connect().await {
            Ok(p) => break p,
            Err(e) => {
                eprintln!("foreign worker: connect: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut rng = fastrand::Rng::with_seed(seed ^ (id << 32));
    let mut n = 0u64;
    while Instant::now() < deadline {
        let key = format!("k{}", rng.u64(..KEYS));
        let start = now();
        if rng.u32(..10) < 8 {
            let version = (id << 48) | n;
            n += 1;
            let bytes = cache
                .codec_bytes(
                    &key,
                    &Val {
                        key: key.clone(),
                        version,
                    },
                )
                .unwrap();
            let mut cmd = redis::cmd("SET");
            cmd.arg(format!("chk:{key}"))
                .arg(bytes.as_ref())
                .arg("EX")
                .arg(3600);
            let ok = if plain.run(&cmd).await { "ok" } else { "err" };
            log.line(format_args!("S {key} {version} {start} {} {ok}", now()));
        } else {
            let mut cmd = redis::cmd("DEL");
            cmd.arg(format!("chk:{key}"));
            let ok = if plain.run(&cmd).await { "ok" } else { "err" };
            log.line(format_args!("D {key} {start} {} {ok}", now()));
        }
        tokio::time::sleep(Duration::from_micros(rng.u64(1000..5000))).await;
    }
}
