//! Memory per L1 entry: heap bytes allocated (and still held) by 100,000 entries — key
//! `k{i}`, a 100-byte `String` value — in our L1, in `moka::sync::Cache` and in raw
//! `quick_cache::sync::Cache`, counted by a counting global allocator.
//!
//! Ours is what a `MultiLevelCache` user gets: `set_at(.., CacheLevel::L1)` (the L1 holds the
//! decoded value behind an `Arc`, with its freshness deadlines), and, in a second row, a
//! standalone `MemoryBackend` (encoded `Bytes` values). Every cache has room for 110,000 entries
//! (so none is evicted) and is built inside the measurement: quick_cache sizes its table when it
//! is built, moka as it fills, and both are real costs. Rows in bytes per entry; ratio =
//! baseline / ours (bigger is better for us). The split (construction / inserts) is printed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// A global allocator is an `unsafe impl`; it only forwards to `System` and counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use ncm_cache_bench::{Row, write_rows};
use ncm_cache_core::CacheLevel;
use ncm_cache_memory::MemoryBackend;
use ncm_cache_multilevel::MultiLevelCache;

/// Bytes currently allocated through the global allocator (requested sizes).
static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is forwarded unchanged to `System`; only a counter is updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            ALLOCATED.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ENTRIES: usize = 100_000;
/// Room of every cache: 10 % above ENTRIES, so sharded caches evict nothing.
const CAPACITY: usize = ENTRIES + ENTRIES / 10;
const TTL: Duration = Duration::from_secs(3600);

fn allocated() -> isize {
    ALLOCATED.load(Ordering::SeqCst)
}

/// Polls a future that completes without waiting (L1 writes without a backplane never wait).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("an L1 write without a backplane completes at once"),
    }
}

/// A 100-byte value (exactly: no spare capacity).
fn value(i: usize) -> String {
    let mut v = format!("{i:0>100}");
    v.shrink_to_fit();
    v
}

/// What one cache costs.
struct Footprint {
    name: &'static str,
    /// Bytes allocated by building the empty cache.
    built: isize,
    /// Bytes allocated by the ENTRIES inserts.
    inserted: isize,
    /// Entries held at the end.
    len: usize,
}

impl Footprint {
    fn per_entry(&self) -> f64 {
        (self.built + self.inserted) as f64 / ENTRIES as f64
    }
}

/// Builds a cache with `build`, fills it with `insert(cache, key, value)`, and counts the bytes
/// still allocated: the cache's structures plus the keys and values it keeps (the temporaries
/// of the loop are freed by then).
fn measure<C>(
    name: &'static str,
    build: impl FnOnce() -> C,
    insert: impl Fn(&C, String, String),
    len: impl Fn(&C) -> usize,
) -> Footprint {
    let before = allocated();
    let cache = build();
    let after_build = allocated();
    for i in 0..ENTRIES {
        insert(&cache, format!("k{i}"), value(i));
    }
    // Counted first: moka applies its pending writes here (and frees their queue).
    let len = len(&cache);
    let f = Footprint {
        name,
        built: after_build - before,
        inserted: allocated() - after_build,
        len,
    };
    drop(cache);
    f
}

fn main() {
    let filter = std::env::var("NCM_BENCH_FILTER").unwrap_or_default();
    if !filter.is_empty() && !"memory_footprint".contains(&filter) && !filter.contains("memory") {
        return;
    }

    let ours = measure(
        "MultiLevelCache L1 (set_at L1)",
        || {
            MultiLevelCache::builder(MemoryBackend::new())
                .l1_max_size(CAPACITY as u64)
                // The entry count is the bound here, not the bytes.
                .l1_max_bytes(1 << 30)
                .l1_default_ttl(TTL)
                .build()
                .unwrap()
        },
        |c, k, v| ready(c.set_at(&k, v, CacheLevel::L1)).unwrap(),
        |c| c.l1_len(),
    );
    let backend = measure(
        "MemoryBackend (Bytes)",
        || {
            MemoryBackend::builder()
                .max_entries(CAPACITY as u64)
                .max_bytes(1 << 30)
                .sweep_interval(None)
                .build()
                .unwrap()
        },
        |c, k, v| c.set_now(&k, Bytes::from(v), Some(TTL)).unwrap(),
        |c| c.len(),
    );
    let moka = measure(
        "moka::sync::Cache",
        || {
            moka::sync::Cache::<String, String>::builder()
                .max_capacity(CAPACITY as u64)
                .time_to_live(TTL)
                .build()
        },
        |c, k, v| c.insert(k, v),
        |c| {
            c.run_pending_tasks();
            c.entry_count() as usize
        },
    );
    let quick = measure(
        "quick_cache::sync::Cache",
        || quick_cache::sync::Cache::<String, String>::new(CAPACITY),
        |c, k, v| c.insert(k, v),
        |c| c.len(),
    );

    for f in [&ours, &backend, &moka, &quick] {
        println!(
            "{:<32} {:>7.1} B/entry (build {:>10} B, inserts {:>10} B = {:>6.1} B/entry), {} entries held",
            f.name,
            f.per_entry(),
            f.built,
            f.inserted,
            f.inserted as f64 / ENTRIES as f64,
            f.len
        );
        assert_eq!(f.len, ENTRIES, "{} evicted entries", f.name);
    }

    let row = |name: &str, ours: &Footprint, base: &Footprint| Row {
        name: name.into(),
        ours: ours.per_entry(),
        baseline: base.per_entry(),
        baseline_name: base.name.into(),
        unit: "B/entry".into(),
        ratio: base.per_entry() / ours.per_entry(),
    };
    let rows = vec![
        row("memory_footprint_l1_100000_entries_100B", &ours, &moka),
        row(
            "memory_footprint_l1_100000_entries_100B_vs_quick_cache",
            &ours,
            &quick,
        ),
        row(
            "memory_footprint_memory_backend_100000_entries_100B",
            &backend,
            &moka,
        ),
    ];
    for r in &rows {
        println!(
            "{:<56} ours {:>8.1} {:<7} baseline {:>8.1} ({}) ratio {:.2}",
            r.name, r.ours, r.unit, r.baseline, r.baseline_name, r.ratio
        );
    }
    let path = write_rows("memory_footprint", &rows).unwrap();
    println!("wrote {}", path.display());
}
