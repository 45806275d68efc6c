//! Cache stampede: 10,000 concurrent callers ask for one cold key whose loader sleeps 50 ms and
//! counts its calls.
//!
//! Ours: `MultiLevelCache::get_or_load` (L1 + a throwaway redis-server as L2) and
//! `CacheLoader::load` (memory backend). Baseline: an `async fn` under the `cached` crate's
//! `#[cached]` macro as a user typically writes it (`#[cached(ttl_secs = 60)]`), and with its
//! opt-in `sync_writes = "by_key"`. Rows: loader calls per stampede (ours must be exactly 1: the
//! bench panics otherwise) and the callers' p99 latency; ratio = baseline / ours.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cached::macros::cached;
use ncm_cache_bench::{Row, median, quick, write_rows};
use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheStrategy};
use ncm_cache_loader::CacheLoader;
use ncm_cache_memory::MemoryBackend;
use ncm_cache_multilevel::MultiLevelCache;
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;

const CALLERS: usize = 10_000;
const LOAD_TIME: Duration = Duration::from_millis(50);

static OURS_CALLS: AtomicU64 = AtomicU64::new(0);
static LOADER_CALLS: AtomicU64 = AtomicU64::new(0);
static CACHED_CALLS: AtomicU64 = AtomicU64::new(0);
static CACHED_BY_KEY_CALLS: AtomicU64 = AtomicU64::new(0);

/// The slow source: ~50 ms, counted.
async fn load(counter: &AtomicU64, id: u64) -> String {
    counter.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(LOAD_TIME).await;
    format!("{id:0>100}")
}

#[cached(ttl_secs = 60)]
async fn cached_default(id: u64) -> String {
    load(&CACHED_CALLS, id).await
}

#[cached(ttl_secs = 60, sync_writes = "by_key")]
async fn cached_by_key(id: u64) -> String {
    load(&CACHED_BY_KEY_CALLS, id).await
}

/// Latencies (ns) of CALLERS tasks released together, each calling `call` once.
async fn stampede<F, Fut>(call: F) -> Vec<f64>
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = String> + Send,
{
    let gate = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (gate, call) = (Arc::clone(&gate), call.clone());
            tokio::spawn(async move {
                gate.wait().await;
                let start = Instant::now();
                let v = call().await;
                let took = start.elapsed();
                assert_eq!(v.len(), 100);
                took.as_nanos() as f64
            })
        })
        .collect();
    let mut out = Vec::with_capacity(CALLERS);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// One contender: its loader calls and p99 per round.
#[derive(Default)]
struct Samples {
    calls: Vec<f64>,
    p99: Vec<f64>,
}

impl Samples {
    /// Runs one stampede and records the calls `counter` gained and the p99.
    fn record<F, Fut>(&mut self, rt: &tokio::runtime::Runtime, counter: &AtomicU64, call: F) -> u64
    where
        F: Fn() -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = String> + Send,
    {
        let before = counter.load(Ordering::SeqCst);
        let mut latencies = rt.block_on(stampede(call));
        let calls = counter.load(Ordering::SeqCst) - before;
        self.calls.push(calls as f64);
        self.p99.push(p99(&mut latencies));
        calls
    }
}

fn main() {
    let filter = std::env::var("NCM_BENCH_FILTER").unwrap_or_default();
    if !filter.is_empty() && !"stampede".contains(&filter) && !filter.contains("stampede") {
        return;
    }
    let server = RedisServer::start().expect("redis-server is needed for the stampede bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rounds = if quick() { 3 } else { 7 };

    let ml = rt.block_on(async {
        let mut config = RedisConfig::from_url(&server.url()).unwrap();
        config.health_check_interval = None;
        let redis = RedisCache::connect(config).await.unwrap();
        MultiLevelCache::builder(redis.backend())
            .name("stampede")
            .build()
            .unwrap()
    });
    let loader = {
        let backend = MemoryBackend::builder().build().unwrap();
        let loader = CacheLoader::builder(Cache::new(backend, Serializer::default()))
            .enable_logging(false)
            .build()
            .unwrap();
        loader
            .register_loader(
                "record",
                |id: u64| async move { Ok::<_, std::io::Error>(load(&LOADER_CALLS, id).await) },
                Duration::from_secs(60),
                CacheStrategy::CacheAside,
            )
            .unwrap();
        loader
    };

    // 0: MultiLevelCache, 1: CacheLoader, 2: #[cached], 3: #[cached(sync_writes = "by_key")].
    let mut samples: [Samples; 4] = Default::default();
    // Stampedes where ours ran the loader more than once: the bench fails (after writing its
    // rows, so the numbers are there to see).
    let mut failures: Vec<String> = Vec::new();
    for round in 0..rounds {
        // A fresh cold key per round for every contender.
        let id = round as u64;
        let mut order = [0, 1, 2, 3];
        order.rotate_left(round % 4);
        if round % 2 == 1 {
            order.reverse();
        }
        for which in order {
            let s = &mut samples[which];
            match which {
                0 => {
                    let ml = ml.clone();
                    let calls = s.record(&rt, &OURS_CALLS, move || {
                        let ml = ml.clone();
                        async move {
                            ml.get_or_load(&format!("stampede:{id}"), move || async move {
                                Ok::<_, std::io::Error>(load(&OURS_CALLS, id).await)
                            })
                            .await
                            .unwrap()
                        }
                    });
                    if calls != 1 {
                        failures.push(format!(
                            "round {round}: MultiLevelCache::get_or_load ran the loader {calls} \
                             times for {CALLERS} concurrent callers (expected exactly 1)"
                        ));
                    }
                }
                1 => {
                    let loader = loader.clone();
                    let calls = s.record(&rt, &LOADER_CALLS, move || {
                        let loader = loader.clone();
                        async move { loader.load::<u64, String>("record", id).await.unwrap() }
                    });
                    if calls != 1 {
                        failures.push(format!(
                            "round {round}: CacheLoader::load ran the loader {calls} times for \
                             {CALLERS} concurrent callers (expected exactly 1)"
                        ));
                    }
                }
                2 => {
                    s.record(&rt, &CACHED_CALLS, move || cached_default(id));
                }
                _ => {
                    s.record(&rt, &CACHED_BY_KEY_CALLS, move || cached_by_key(id));
                }
            }
        }
    }
    // (median loader calls, median p99) of each contender.
    let summary: Vec<(f64, f64)> = samples
        .iter_mut()
        .map(|s| (median(&mut s.calls), median(&mut s.p99)))
        .collect();
    println!(
        "per stampede (median of {rounds}): loader calls / p99 ms: MultiLevelCache {:.0} / {:.1}, \
         CacheLoader {:.0} / {:.1}, #[cached] {:.0} / {:.1}, #[cached(sync_writes)] {:.0} / {:.1}",
        summary[0].0,
        summary[0].1 / 1e6,
        summary[1].0,
        summary[1].1 / 1e6,
        summary[2].0,
        summary[2].1 / 1e6,
        summary[3].0,
        summary[3].1 / 1e6,
    );

    let mut rows = Vec::new();
    let prefix = format!("stampede_{CALLERS}_callers");
    let plain = "cached #[cached(ttl_secs = 60)]";
    let by_key = "cached #[cached(ttl_secs = 60, sync_writes = \"by_key\")]";
    for (ours_name, ours, theirs_name, theirs, base) in [
        ("", 0, "", 2, plain),
        ("", 0, "_vs_sync_writes", 3, by_key),
        ("_cache_loader", 1, "", 2, plain),
    ] {
        let ((oc, op), (bc, bp)) = (summary[ours], summary[theirs]);
        rows.push(Row {
            name: format!("{prefix}{ours_name}_loader_calls{theirs_name}"),
            ours: oc,
            baseline: bc,
            baseline_name: base.into(),
            unit: "calls".into(),
            ratio: bc / oc,
        });
        rows.push(Row {
            name: format!("{prefix}{ours_name}_p99{theirs_name}"),
            ours: op,
            baseline: bp,
            baseline_name: base.into(),
            unit: "ns".into(),
            ratio: bp / op,
        });
    }

    for r in &rows {
        println!(
            "{:<56} ours {:>12.0} {:<5} baseline {:>12.0} ({}) ratio {:.2}",
            r.name, r.ours, r.unit, r.baseline, r.baseline_name, r.ratio
        );
    }
    let path = write_rows("stampede", &rows).unwrap();
    println!("wrote {}", path.display());
    if !failures.is_empty() {
        panic!("stampede prevention failed:\n{}", failures.join("\n"));
    }
}
