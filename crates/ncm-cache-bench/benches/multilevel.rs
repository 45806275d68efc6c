//! L1 hit latency of MultiLevelCache beside raw quick_cache and moka holding the same `Arc`s.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ncm_cache_memory::MemoryBackend;
use ncm_cache_multilevel::MultiLevelCache;

const KEYS: usize = 10_000;

/// Polls a future that completes without waiting (an L1 hit never waits). Inlined, like the
/// `.await` of a caller's async fn: the future is built in place instead of being passed by
/// value into a function (a copy real callers don't pay).
#[inline(always)]
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("an L1 hit completes immediately"),
    }
}

fn l1_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("user:{i}")).collect();
    let value = "x".repeat(100);
    let cache = MultiLevelCache::builder(MemoryBackend::new())
        .l1_max_size(KEYS as u64 * 2)
        .build()
        .unwrap();
    let quick: quick_cache::sync::Cache<String, Arc<String>> =
        quick_cache::sync::Cache::new(KEYS * 2);
    let moka: moka::sync::Cache<String, Arc<String>> = moka::sync::Cache::builder()
        .max_capacity(KEYS as u64 * 2)
        .time_to_live(Duration::from_secs(300))
        .build();
    for k in &keys {
        rt.block_on(cache.set_at(k, value.clone(), ncm_cache_core::CacheLevel::L1))
            .unwrap();
        quick.insert(k.clone(), Arc::new(value.clone()));
        moka.insert(k.clone(), Arc::new(value.clone()));
    }
    let mut g = c.benchmark_group("l1_get_hit_100B");
    let mut i = 0;
    g.bench_function("ours", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(ready(cache.get_arc::<String>(&keys[i])).unwrap())
        })
    });
    g.bench_function("baseline_quick_cache", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(quick.get(keys[i].as_str()))
        })
    });
    g.bench_function("baseline_moka", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(moka.get(keys[i].as_str()))
        })
    });
    g.finish();
    // The same hit through get_or_load (the loader is not called).
    let mut g = c.benchmark_group("l1_get_or_load_hit_100B");
    g.bench_function("ours", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(
                ready(
                    cache.get_or_load_with_source::<String, _, _, _>(&keys[i], || async {
                        Err::<String, _>(std::io::Error::other("never called on a hit"))
                    }),
                )
                .unwrap(),
            )
        })
    });
    g.bench_function("baseline_quick_cache", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(quick.get(keys[i].as_str()))
        })
    });
    g.finish();
    let stats = cache.get_stats();
    assert!(
        stats.l2_hits == 0 && stats.misses == 0,
        "every read of the L1 row must be an L1 hit: {stats:?}"
    );
}

criterion_group! {
    name = benches;
    config = ncm_cache_bench::criterion();
    targets = l1_hit
}
criterion_main!(benches);
