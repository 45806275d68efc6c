//! Soak: minutes of mixed load against a throwaway Redis that is killed and restarted at random.
//!
//! Not part of the normal suite or CI: it does nothing unless `NCM_SOAK_SECS` is set, which
//! `cargo xtask bench --soak [--minutes N]` does. Every interval it prints operations per
//! second, errors by kind, the p99 latency and the process's RSS; at the end it writes
//! `soak.json` next to the bench results and exits non-zero when a wrong value was read, an
//! error was not typed, or service took longer than 2 s to come back after a restart.
//!
//! The load: 32 tasks, half on a `RedisCache`, half on a `MultiLevelCache` (with backplane) over
//! the same server; each task owns 16 keys holding `{key, version}` values and mixes writes,
//! reads (checked: the last acknowledged version or one whose write failed, never anything
//! else), batch reads, deletes and `get_or_load`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ncm_cache_core::CacheError;
use ncm_cache_multilevel::MultiLevelCache;
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;
use serde::{Deserialize, Serialize};

const TASKS: usize = 32;
const KEYS: usize = 16;
const RECOVERY: Duration = Duration::from_secs(2);
/// Latency buckets: bucket i holds latencies below 2^(i/4) µs.
const BUCKETS: usize = 96;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Versioned {
    key: String,
    version: u64,
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    timeouts: AtomicU64,
    connection: AtomicU64,
    other: AtomicU64,
    wrong: AtomicU64,
    latency: Vec<AtomicU64>,
}

impl Counters {
    fn new() -> Self {
        Self {
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        }
    }

    fn record(&self, took: Duration) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let us = took.as_secs_f64() * 1e6;
        let bucket = if us <= 1.0 {
            0
        } else {
            ((us.log2() * 4.0).ceil() as usize).min(BUCKETS - 1)
        };
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, e: &CacheError, untyped: &Mutex<Vec<String>>) {
        if e.is_timeout() {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        } else if e.is_connection() || e.is_unavailable() {
            self.connection.fetch_add(1, Ordering::Relaxed);
        } else {
            self.other.fetch_add(1, Ordering::Relaxed);
            let mut u = untyped.lock().unwrap();
            if u.len() < 20 {
                u.push(format!("{e:?}"));
            }
        }
    }

    /// Takes (and resets) this interval's numbers: ops, timeouts, connection, other, wrong, p99 µs.
    fn take(&self) -> (u64, u64, u64, u64, u64, f64) {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let mut seen = 0;
        let mut p99 = 0.0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if total > 0 && seen * 100 >= total * 99 {
                p99 = 2f64.powf(i as f64 / 4.0);
                break;
            }
        }
        (
            self.ops.swap(0, Ordering::Relaxed),
            self.timeouts.swap(0, Ordering::Relaxed),
            self.connection.swap(0, Ordering::Relaxed),
            self.other.swap(0, Ordering::Relaxed),
            self.wrong.swap(0, Ordering::Relaxed),
            p99,
        )
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

enum Client {
    Redis(RedisCache),
    Multi(MultiLevelCache),
}

impl Client {
    async fn set(&self, key: &str, v: Versioned) -> Result<(), CacheError> {
        match self {
            Self::Redis(c) => c.set(key, &v).await,
            Self::Multi(c) => c.set(key, v).await,
        }
    }
    async fn get(&self, key: &str) -> Result<Option<Versioned>, CacheError> {
        match self {
            Self::Redis(c) => c.get(key).await,
            Self::Multi(c) => c.get(key).await,
        }
    }
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Versioned>>, CacheError> {
        match self {
            Self::Redis(c) => c.get_many(keys).await,
            Self::Multi(c) => c.get_many(keys).await,
        }
    }
    async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        match self {
            Self::Redis(c) => c.delete(key).await,
            Self::Multi(c) => c.delete(key).await,
        }
    }
}

/// How long a write whose outcome is unknown (it returned an error) may still land. Older
/// failed versions are forgotten, which keeps the checker's memory bounded (so RSS measures the
/// cache) and makes the check stricter, not looser.
const LATE_WRITE_WINDOW: Duration = Duration::from_secs(30);

struct KeyState {
    acked: Option<u64>,
    deleted: bool,
    /// Versions whose write failed, with when it failed.
    failed: BTreeMap<u64, Instant>,
}

impl KeyState {
    fn legit(&self, key: &str, v: &Versioned) -> bool {
        v.key == key && (Some(v.version) == self.acked || self.failed.contains_key(&v.version))
    }

    fn fail(&mut self, version: u64) {
        let now = Instant::now();
        self.failed
            .retain(|_, at| now.duration_since(*at) < LATE_WRITE_WINDOW);
        self.failed.insert(version, now);
    }
}

#[allow(clippy::too_many_arguments)]
async fn task(
    t: usize,
    client: Arc<Client>,
    counters: Arc<Counters>,
    untyped: Arc<Mutex<Vec<String>>>,
    wrong: Arc<Mutex<Vec<String>>>,
    progress: Arc<Vec<AtomicU64>>,
    base: Instant,
    stop: Arc<AtomicBool>,
) {
    let keys: Vec<String> = (0..KEYS).map(|j| format!("t{t}:k{j}")).collect();
    let mut state: Vec<KeyState> = (0..KEYS)
        .map(|_| KeyState {
            acked: None,
            deleted: true,
            failed: BTreeMap::new(),
        })
        .collect();
    let mut rng = fastrand::Rng::with_seed(t as u64);
    let mut version = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let j = rng.usize(..KEYS);
        let key = keys[j].as_str();
        let roll = rng.u32(..100);
        let start = Instant::now();
        let ok = if roll < 30 {
            version += 1;
            match client
                .set(
                    key,
                    Versioned {
                        key: key.to_owned(),
                        version,
                    },
                )
                .await
            {
                Ok(()) => {
                    state[j].acked = Some(version);
                    state[j].deleted = false;
                    true
                }
                Err(e) => {
                    state[j].fail(version);
                    counters.error(&e, &untyped);
                    false
                }
            }
        } else if roll < 85 {
            match client.get(key).await {
                Ok(Some(v)) => {
                    if !state[j].legit(key, &v) {
                        counters.wrong.fetch_add(1, Ordering::Relaxed);
                        wrong.lock().unwrap().push(format!("{key} -> {v:?}"));
                    }
                    true
                }
                Ok(None) => true,
                Err(e) => {
                    counters.error(&e, &untyped);
                    false
                }
            }
        } else if roll < 95 {
            let batch: Vec<&str> = keys.iter().map(String::as_str).collect();
            match client.get_many(&batch).await {
                Ok(values) => {
                    for (j, v) in values.iter().enumerate() {
                        if let Some(v) = v
                            && !state[j].legit(&keys[j], v)
                        {
                            counters.wrong.fetch_add(1, Ordering::Relaxed);
                            wrong.lock().unwrap().push(format!("{} -> {v:?}", keys[j]));
                        }
                    }
                    true
                }
                Err(e) => {
                    counters.error(&e, &untyped);
                    false
                }
            }
        } else {
            match client.delete(key).await {
                Ok(_) => {
                    // Deleted: only a later write (or a failed one landing late) may show up.
                    state[j].acked = None;
                    state[j].deleted = true;
                    true
                }
                Err(e) => {
                    counters.error(&e, &untyped);
                    // The delete may or may not have happened: both outcomes stay legal.
                    if let Some(v) = state[j].acked {
                        state[j].fail(v);
                    }
                    false
                }
            }
        };
        counters.record(start.elapsed());
        if ok {
            progress[t].store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        if rng.u32(..8) == 0 {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
}

fn main() {
    let Some(secs) = std::env::var("NCM_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    else {
        return; // only `cargo xtask bench --soak` runs the soak
    };
    let duration = Duration::from_secs_f64(secs);
    let interval = Duration::from_secs_f64((secs / 30.0).clamp(2.0, 20.0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = Arc::new(Mutex::new(
        RedisServer::start().expect("redis-server is needed for the soak"),
    ));
    let url = server.lock().unwrap().url();
    let counters = Arc::new(Counters::new());
    let untyped = Arc::new(Mutex::new(Vec::new()));
    let wrong = Arc::new(Mutex::new(Vec::new()));
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..TASKS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let base = Instant::now();
    let mut restarts = Vec::new();
    let mut intervals = Vec::new();

    rt.block_on(async {
        let mut config = RedisConfig::from_url(&url).unwrap();
        config.response_timeout = Duration::from_millis(300);
        config.connect_timeout = Duration::from_millis(300);
        config.key_prefix = "soak:".into();
        let redis = RedisCache::connect(config.clone()).await.unwrap();
        config.key_prefix = "soak-ml:".into();
        let l2 = RedisCache::connect(config).await.unwrap();
        let multi = MultiLevelCache::builder(l2.backend())
            .name("soak")
            .backplane(Arc::clone(l2.redis_backend()))
            .build()
            .unwrap();
        let (redis, multi) = (Arc::new(Client::Redis(redis)), Arc::new(Client::Multi(multi)));
        let handles: Vec<_> = (0..TASKS)
            .map(|t| {
                let client = if t % 2 == 0 { &redis } else { &multi };
                tokio::spawn(task(
                    t,
                    Arc::clone(client),
                    Arc::clone(&counters),
                    Arc::clone(&untyped),
                    Arc::clone(&wrong),
                    Arc::clone(&progress),
                    base,
                    Arc::clone(&stop),
                ))
            })
            .collect();

        let mut rng = fastrand::Rng::with_seed(7);
        let mut next_fault = base + Duration::from_secs_f64(rng.f64() * 20.0 + 5.0);
        let mut next_report = base + interval;
        println!(
            "{:>7} {:>10} {:>9} {:>9} {:>7} {:>6} {:>10} {:>9}",
            "t (s)", "ops/s", "timeouts", "conn", "other", "wrong", "p99 (µs)", "RSS (MiB)"
        );
        while base.elapsed() < duration {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = Instant::now();
            if now >= next_fault {
                // Kill, stay down 0.2–3 s, restart; then wait for every task to succeed again.
                let down = Duration::from_secs_f64(0.2 + rng.f64() * 2.8);
                server.lock().unwrap().kill();
                tokio::time::sleep(down).await;
                server.lock().unwrap().restart().expect("restarting redis");
                let back = Instant::now();
                let back_ns = back.duration_since(base).as_nanos() as u64;
                let recovered = loop {
                    if progress
                        .iter()
                        .all(|p| p.load(Ordering::Relaxed) > back_ns)
                    {
                        break back.elapsed();
                    }
                    if back.elapsed() > Duration::from_secs(30) {
                        break back.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                println!(
                    "        restart at {:.1} s: down {down:.1?}, every task recovered in {recovered:.2?}",
                    back.duration_since(base).as_secs_f64()
                );
                restarts.push((back.duration_since(base).as_secs_f64(), down, recovered));
                next_fault = Instant::now() + Duration::from_secs_f64(15.0 + rng.f64() * 30.0);
            }
            if now >= next_report {
                let (ops, to, conn, other, bad, p99) = counters.take();
                let rss = rss_kib() as f64 / 1024.0;
                let t = base.elapsed().as_secs_f64();
                let rate = ops as f64 / interval.as_secs_f64();
                println!(
                    "{t:>7.0} {rate:>10.0} {to:>9} {conn:>9} {other:>7} {bad:>6} {p99:>10.0} {rss:>9.1}"
                );
                intervals.push(format!(
                    "{{\"t\":{t:.1},\"ops_per_sec\":{rate:.0},\"timeouts\":{to},\"connection_errors\":{conn},\"other_errors\":{other},\"wrong_values\":{bad},\"p99_us\":{p99:.0},\"rss_mib\":{rss:.1}}}"
                ));
                next_report += interval;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.await.expect("a load task panicked");
        }
    });

    let untyped = untyped.lock().unwrap();
    let wrong = wrong.lock().unwrap();
    let slow: Vec<_> = restarts.iter().filter(|r| r.2 > RECOVERY).collect();
    let json = format!(
        "{{\"seconds\":{secs},\"restarts\":[{}],\"intervals\":[{}],\"untyped_errors\":{},\"wrong_values\":{}}}\n",
        restarts
            .iter()
            .map(|(t, down, rec)| format!(
                "{{\"at\":{t:.1},\"down_ms\":{},\"recovered_ms\":{}}}",
                down.as_millis(),
                rec.as_millis()
            ))
            .collect::<Vec<_>>()
            .join(","),
        intervals.join(","),
        untyped.len(),
        wrong.len()
    );
    if let Ok(dir) = std::env::var("NCM_BENCH_OUT") {
        let path = std::path::Path::new(&dir).join("soak.json");
        std::fs::write(&path, json).unwrap();
        println!("wrote {}", path.display());
    }
    println!(
        "soak: {} restarts, slowest recovery {:.2?}, {} untyped errors, {} wrong values",
        restarts.len(),
        restarts.iter().map(|r| r.2).max().unwrap_or_default(),
        untyped.len(),
        wrong.len()
    );
    if !untyped.is_empty() || !wrong.is_empty() || !slow.is_empty() {
        eprintln!("untyped: {untyped:?}\nwrong: {wrong:?}\nslow recoveries: {slow:?}");
        std::process::exit(1);
    }
}
