#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! MemoryBackend beside raw quick_cache and moka, measured in the same run.
//!
//! Rows (criterion groups): `memory_get_hit_100B`, `memory_get_now_hit_100B` (the sync L1 fast
//! path), `memory_set_100B`. Each has `ours` and `baseline_quick_cache` / `baseline_moka`.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use ncm_cache_core::CacheBackend;
use ncm_cache_memory::MemoryBackend;

const KEYS: usize = 10_000;

/// Polls a future that completes without waiting (the memory backend never waits).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("memory backend futures complete immediately"),
    }
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("user:{i}")).collect()
}

fn value() -> Bytes {
    Bytes::from(vec![b'v'; 100])
}

fn ours() -> MemoryBackend {
    MemoryBackend::builder()
        .max_entries(KEYS as u64 * 2)
        .max_bytes(64 * 1024 * 1024)
        .sweep_interval(None)
        .build()
        .unwrap()
}

fn quick() -> quick_cache::sync::Cache<String, Bytes> {
    quick_cache::sync::Cache::new(KEYS * 2)
}

fn moka() -> moka::sync::Cache<String, Bytes> {
    moka::sync::Cache::builder()
        .max_capacity(KEYS as u64 * 2)
        .time_to_live(Duration::from_secs(3600))
        .build()
}

fn get_hit(c: &mut Criterion) {
    let keys = keys();
    let (o, q, m) = (ours(), quick(), moka());
    for k in &keys {
        o.set_now(k, value(), Some(Duration::from_secs(3600)))
            .unwrap();
        q.insert(k.clone(), value());
        m.insert(k.clone(), value());
    }
    let mut g = c.benchmark_group("memory_get_hit_100B");
    let mut i = 0;
    g.bench_function("ours", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(ready(o.get(&keys[i])).unwrap())
        })
    });
    g.bench_function("baseline_quick_cache", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(q.get(keys[i].as_str()))
        })
    });
    g.bench_function("baseline_moka", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(m.get(keys[i].as_str()))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("memory_get_now_hit_100B");
    g.bench_function("ours", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(o.get_now(&keys[i]).unwrap())
        })
    });
    g.bench_function("baseline_quick_cache", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(q.get(keys[i].as_str()))
        })
    });
    g.finish();
}

fn set(c: &mut Criterion) {
    let keys = keys();
    let (o, q, m) = (ours(), quick(), moka());
    let v = value();
    let mut g = c.benchmark_group("memory_set_100B");
    let mut i = 0;
    g.bench_function("ours", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            ready(o.set(&keys[i], v.clone(), Some(Duration::from_secs(3600)))).unwrap()
        })
    });
    g.bench_function("baseline_quick_cache", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            q.insert(keys[i].clone(), v.clone())
        })
    });
    g.bench_function("baseline_moka", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            m.insert(keys[i].clone(), v.clone())
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = ncm_cache_bench::criterion();
    targets = get_hit, set
}
criterion_main!(benches);
