//! `bench`: a closed-loop workload generator over a Zipf-distributed key space.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use ncm_cache::{Cache, MemoryBackend, Serializer};

use crate::CliResult;

/// Options of `bench`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Run against this Redis instead of the in-process memory backend.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, value_name = "B", default_value_t = 256)]
    value_size: usize,
    /// Fraction of operations that are reads (0.0..=1.0); a read miss writes the key.
    #[arg(long, value_name = "F", default_value_t = 0.9)]
    read_ratio: f64,
    /// Concurrent workers.
    #[arg(long, value_name = "C", default_value_t = 16)]
    concurrency: usize,
    /// Run time in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    duration: f64,
    /// Zipf exponent of key popularity (0 = uniform).
    #[arg(long, value_name = "S", default_value_t = 0.99)]
    zipf: f64,
}

/// A log-linear latency histogram (16 sub-buckets per power of two, ~6 % resolution).
#[derive(Clone)]
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: vec![0; 64 * SUB as usize],
            count: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let exp = 63 - u64::from(v.leading_zeros()); // >= SUB_BITS
        let sub = (v >> (exp - u64::from(SUB_BITS))) & (SUB - 1);
        ((exp - u64::from(SUB_BITS) + 1) * SUB + sub) as usize
    }

    /// The lower bound of bucket `i`.
    fn lower(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let exp = i / SUB - 1 + u64::from(SUB_BITS);
        let sub = i % SUB;
        (1u64 << exp) | (sub << (exp - u64::from(SUB_BITS)))
    }

    fn record(&mut self, nanos: u64) {
        let i = Self::index(nanos).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
        self.max = self.max.max(nanos);
    }

    fn merge(&mut self, other: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Duration::from_nanos(Self::lower(i).min(self.max));
            }
        }
        Duration::from_nanos(self.max)
    }
}

/// xorshift64*: a tiny, fast PRNG (no dependency needed for a load generator).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Key popularity: the cumulative Zipf distribution over `n` ranks.
fn zipf_cdf(n: u64, s: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(n as usize);
    let mut sum = 0.0;
    for rank in 1..=n {
        sum += 1.0 / (rank as f64).powf(s);
        cdf.push(sum);
    }
    for v in &mut cdf {
        *v /= sum;
    }
    cdf
}

#[derive(Default, Clone, Copy)]
struct Counts {
    reads: u64,
    writes: u64,
    hits: u64,
    misses: u64,
    errors: u64,
}

fn validate(args: &BenchArgs) -> CliResult {
    if args.keys == 0 || args.keys > 50_000_000 {
        return Err("--keys must be between 1 and 50000000".into());
    }
    if !(0.0..=1.0).contains(&args.read_ratio) {
        return Err("--read-ratio must be between 0.0 and 1.0".into());
    }
    if args.concurrency == 0 || args.concurrency > 10_000 {
        return Err("--concurrency must be between 1 and 10000".into());
    }
    if !(args.duration > 0.0 && args.duration <= 86_400.0) {
        return Err("--duration must be between 0 and 86400 seconds".into());
    }
    if !(args.zipf >= 0.0 && args.zipf.is_finite()) {
        return Err("--zipf must be a finite number >= 0".into());
    }
    if args.value_size > 64 * 1024 * 1024 {
        return Err("--value-size must be at most 64 MiB".into());
    }
    Ok(())
}

/// `bench`.
pub(crate) async fn run(args: BenchArgs) -> CliResult {
    validate(&args)?;
    let mut memory: Option<Arc<MemoryBackend>> = None;
    let (cache, label, redis): (Cache<Serializer>, String, _) = match &args.redis {
        None => {
            let backend = Arc::new(
                MemoryBackend::builder()
                    .name("bench")
                    .max_entries(args.keys.saturating_mul(2).max(1024))
                    .build()?,
            );
            memory = Some(Arc::clone(&backend));
            let cache = Cache::builder_shared(backend, Serializer::default())
                .default_ttl(Duration::from_secs(3600))
                .build();
            (cache, "memory (in-process)".to_string(), None)
        }
        Some(url) => {
            let redis = crate::redis_tools::connect(url, Some("ncm-bench:")).await?;
            redis.clear_pattern("*").await?;
            (
                redis.cache().clone(),
                "redis (key prefix ncm-bench:)".to_string(),
                Some(redis),
            )
        }
    };
    let cdf = Arc::new(zipf_cdf(args.keys, args.zipf));
    let keys: Arc<Vec<String>> = Arc::new((0..args.keys).map(|i| format!("k:{i}")).collect());
    let value = Arc::new("x".repeat(args.value_size));
    let duration = Duration::from_secs_f64(args.duration);

    println!(
        "bench: {label}, {} keys, {} B values, read ratio {:.2}, zipf {:.2}, {} workers, {:.1} s",
        args.keys, args.value_size, args.read_ratio, args.zipf, args.concurrency, args.duration
    );

    let total_ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let bar = ProgressBar::new(duration.as_millis() as u64);
    let style = ProgressStyle::with_template("{bar:40.cyan/blue} {elapsed:>4} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);

    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.concurrency {
        let cache = cache.clone();
        let cdf = Arc::clone(&cdf);
        let keys = Arc::clone(&keys);
        let value = Arc::clone(&value);
        let total_ops = Arc::clone(&total_ops);
        let stop = Arc::clone(&stop);
        let read_ratio = args.read_ratio;
        workers.spawn(async move {
            let mut rng = Rng::new(w as u64 + 1);
            let mut hist = Histogram::new();
            let mut counts = Counts::default();
            let mut batch = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let u = rng.next_f64();
                let idx = cdf.partition_point(|&c| c < u).min(keys.len() - 1);
                let key = &keys[idx];
                let t = Instant::now();
                if rng.next_f64() < read_ratio {
                    counts.reads += 1;
                    match cache.get::<String>(key).await {
                        Ok(Some(_)) => counts.hits += 1,
                        Ok(None) => {
                            counts.misses += 1;
                            if cache.set(key, value.as_str()).await.is_err() {
                                counts.errors += 1;
                            }
                        }
                        Err(_) => counts.errors += 1,
                    }
                } else {
                    counts.writes += 1;
                    if cache.set(key, value.as_str()).await.is_err() {
                        counts.errors += 1;
                    }
                }
                hist.record(t.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64);
                batch += 1;
                if batch == 256 {
                    total_ops.fetch_add(batch, Ordering::Relaxed);
                    batch = 0;
                    // Memory-backend operations never yield; let the ticker run.
                    tokio::task::yield_now().await;
                }
            }
            total_ops.fetch_add(batch, Ordering::Relaxed);
            (hist, counts)
        });
    }

    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let elapsed = started.elapsed();
        let ops = total_ops.load(Ordering::Relaxed);
        bar.set_position(elapsed.as_millis().min(duration.as_millis()) as u64);
        bar.set_message(format!(
            "{ops} ops, {:.0} ops/s",
            ops as f64 / elapsed.as_secs_f64().max(1e-9)
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::new();
    let mut counts = Counts::default();
    while let Some(joined) = workers.join_next().await {
        let (h, c) = joined.map_err(|e| format!("a worker failed: {e}"))?;
        hist.merge(&h);
        counts.reads += c.reads;
        counts.writes += c.writes;
        counts.hits += c.hits;
        counts.misses += c.misses;
        counts.errors += c.errors;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    let ops = hist.count;
    let hit_rate = if counts.reads == 0 {
        0.0
    } else {
        counts.hits as f64 / counts.reads as f64
    };
    println!("operations   {ops} in {:.2} s", elapsed.as_secs_f64());
    println!(
        "throughput   {:.0} ops/s",
        ops as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency      p50 {:?}  p99 {:?}  p999 {:?}  max {:?}",
        hist.quantile(0.50),
        hist.quantile(0.99),
        hist.quantile(0.999),
        Duration::from_nanos(hist.max)
    );
    println!(
        "reads        {} (hits {}, misses {}), writes {}, errors {}",
        counts.reads, counts.hits, counts.misses, counts.writes, counts.errors
    );
    println!("hit rate     {:.2}%", hit_rate * 100.0);
    let stats = cache.get_stats();
    if let Some(backend) = &memory {
        println!(
            "memory       {} entries, {} (key + value + overhead)",
            backend.len(),
            crate::demo::human_bytes(backend.used_bytes())
        );
    } else if let Some(mem) = stats.memory_usage {
        println!(
            "memory       {} (Redis used_memory)",
            crate::demo::human_bytes(mem)
        );
    }
    if let Some(redis) = redis {
        redis.clear_pattern("*").await.ok();
        redis.close().await.ok();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_close() {
        for v in [0u64, 1, 15, 16, 17, 100, 1_000, 123_456, 9_999_999_999] {
            let i = Histogram::index(v);
            let lo = Histogram::lower(i);
            assert!(lo <= v, "{v}: lower {lo}");
            assert!(v - lo <= v / 16 + 1, "{v}: lower {lo}");
        }
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).as_nanos() as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.07, "{p50}");
    }

    #[test]
    fn zipf_is_a_cdf() {
        let cdf = zipf_cdf(100, 0.99);
        assert_eq!(cdf.len(), 100);
        assert!((cdf[99] - 1.0).abs() < 1e-9);
        assert!(cdf.windows(2).all(|w| w[0] <= w[1]));
    }
}
