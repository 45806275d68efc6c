//! Helpers shared by the side-by-side benchmarks (`cargo xtask bench`).
//!
//! Criterion groups follow one convention, read by `cargo xtask bench`: a group is a row, the
//! function id `ours` is ncm-cache, and each other id is `baseline_<name>`. Custom harnesses
//! (load tests) write finished rows with [`write_rows`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// `true` when `cargo xtask bench --quick` is running.
pub fn quick() -> bool {
    std::env::var_os("NCM_BENCH_QUICK").is_some_and(|v| v == "1")
}

/// Criterion configured for this suite: short in quick mode, no plots.
pub fn criterion() -> criterion::Criterion {
    let c = criterion::Criterion::default().without_plots();
    let c = if quick() {
        c.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(700))
            .sample_size(10)
    } else {
        // ~150 criterion functions: 2 s each keeps the full suite under 15 minutes on a busy
        // 2-core machine (ns-to-µs operations: millions of iterations per sample either way).
        c.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_millis(1500))
    };
    c.configure_from_args()
}

/// One finished row of `target/bench/results.json`.
#[derive(Debug, Clone)]
pub struct Row {
    /// Row name.
    pub name: String,
    /// Our measurement.
    pub ours: f64,
    /// The baseline's measurement in the same run.
    pub baseline: f64,
    /// Which baseline.
    pub baseline_name: String,
    /// Unit of `ours` and `baseline`.
    pub unit: String,
    /// ours/baseline oriented so that bigger is better for us.
    pub ratio: f64,
}

/// Writes rows as a JSON array to `$NCM_BENCH_OUT/<file>.json` (default `target/bench/extra`).
pub fn write_rows(file: &str, rows: &[Row]) -> std::io::Result<PathBuf> {
    let dir = std::env::var_os("NCM_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench/extra"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{file}.json"));
    let mut out = std::fs::File::create(&path)?;
    writeln!(out, "[")?;
    for (i, r) in rows.iter().enumerate() {
        let comma = if i + 1 < rows.len() { "," } else { "" };
        writeln!(
            out,
            "  {{\"name\": {:?}, \"ours\": {}, \"baseline\": {}, \"baseline_name\": {:?}, \"unit\": {:?}, \"ratio\": {}}}{comma}",
            r.name, r.ours, r.baseline, r.baseline_name, r.unit, r.ratio
        )?;
    }
    writeln!(out, "]")?;
    Ok(path)
}

/// Runs `f` `rounds` times alternating with `g` and returns the median of each (the same run,
/// interleaved, so drift on a noisy machine hits both sides alike).
pub fn interleaved_medians(
    rounds: usize,
    mut f: impl FnMut() -> f64,
    mut g: impl FnMut() -> f64,
) -> (f64, f64) {
    let mut a = Vec::with_capacity(rounds);
    let mut b = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // ABBA order: neither side always runs first (warm caches, frequency ramps).
        if round % 2 == 0 {
            a.push(f());
            b.push(g());
        } else {
            b.push(g());
            a.push(f());
        }
    }
    (median(&mut a), median(&mut b))
}

/// Ops/s of `tasks` tokio tasks, each running `per_task` calls of `op` in turn (call `i` of
/// task `t` gets `t * per_task + i`).
///
/// # Panics
/// When a task panics (an `op` failed).
#[allow(clippy::expect_used)] // a failed op fails the benchmark run
pub async fn throughput<F, Fut>(tasks: usize, per_task: usize, op: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = std::sync::Arc::new(op);
    let start = std::time::Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let op = std::sync::Arc::clone(&op);
            tokio::spawn(async move {
                for i in 0..per_task {
                    op(t * per_task + i).await;
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("a benchmark task panicked");
    }
    (tasks * per_task) as f64 / start.elapsed().as_secs_f64()
}

/// A `RedisCache` backend (no health checks) with its reads on one socket (the read batches'
/// own) and its writes on one pool connection — or everything on one pool connection with
/// `NCM_BENCH_BATCH_SOCKET=0` — and, as its baseline, a raw
/// redis-rs `ConnectionManager` with exactly our socket options: a row beside it measures
/// library overhead.
///
/// # Errors
/// When either cannot connect to `url`.
pub async fn redis_and_raw(
    url: &str,
) -> Result<
    (ncm_cache_core::SharedBackend, redis::aio::ConnectionManager),
    Box<dyn std::error::Error>,
> {
    let mut config = ncm_cache_redis::RedisConfig::from_url(url)?;
    config.max_connections = 1;
    config.health_check_interval = None;
    // Read batches on their own connection (`batch_socket`, the default; issue 21), the pool
    // keeping one connection for writes: reads then use one socket, as the baseline does.
    // `NCM_BENCH_BATCH_SOCKET=0`: every call on one pool connection instead.
    if std::env::var("NCM_BENCH_BATCH_SOCKET").is_ok_and(|v| v == "0") {
        config.batch_socket = false;
    } else {
        config.max_connections = 2;
    }
    let info = redis::IntoConnectionInfo::into_connection_info(url)?
        .set_tcp_settings(ncm_cache_redis::tcp_settings(&config));
    let ours = ncm_cache_redis::RedisCache::connect(config)
        .await?
        .backend();
    let raw = redis::aio::ConnectionManager::new(redis::Client::open(info)?).await?;
    Ok((ours, raw))
}

/// Call `i`'s key among `n`, spread pseudo-randomly (splitmix64): tasks whose call numbers
/// differ read unrelated keys, so concurrent tasks do not read one key in step (which would
/// flatter a client that merges duplicate reads).
pub fn spread(i: usize, n: usize) -> usize {
    let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % n.max(1) as u64) as usize
}

/// The median of a sample (0 when empty).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A Zipf(s) sampler over `0..n` (rank 0 most popular), from a precomputed CDF.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// Zipf over `n` items with exponent `s` (1.0 is the classic web-cache skew).
    pub fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += 1.0 / (k as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Self { cdf }
    }

    /// A sample.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> usize {
        let u = rng.f64();
        self.cdf
            .partition_point(|&c| c < u)
            .min(self.cdf.len().saturating_sub(1))
    }
}
