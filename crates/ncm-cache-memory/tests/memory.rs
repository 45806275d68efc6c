//! MemoryBackend: conformance, bounds, exact TTL under a manual clock, concurrency.

use std::sync::Arc;
use std::time::Duration;

use ncm_cache_core::{Bytes, CacheBackend, CacheError, KeyTtl, ManualClock, SharedBackend};
use ncm_cache_memory::MemoryBackend;
use ncm_cache_testkit::conformance::{self, ManualTime};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite_passes() {
    let clock = ManualClock::new();
    let backend = MemoryBackend::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .build()
        .unwrap();
    conformance::run(Arc::new(backend) as SharedBackend, &ManualTime(clock)).await;
}

#[tokio::test]
async fn bounds_hold_after_100k_inserts() {
    const MAX_ENTRIES: u64 = 5_000;
    const MAX_BYTES: u64 = 1024 * 1024;
    let cache = MemoryBackend::builder()
        .max_entries(MAX_ENTRIES)
        .max_bytes(MAX_BYTES)
        .build()
        .unwrap();
    for i in 0..100_000u64 {
        // Sizes from tiny (count-bound) to 2 KiB (byte-bound).
        let len = ((i * 7919) % 2048) as usize;
        cache
            .set(&format!("k{i}"), Bytes::from(vec![b'x'; len]), None)
            .await
            .unwrap();
        if i % 1000 == 999 {
            assert!(
                cache.len() as u64 <= MAX_ENTRIES,
                "entries {} at {i}",
                cache.len()
            );
            assert!(
                cache.weight() <= MAX_BYTES,
                "weight {} at {i}",
                cache.weight()
            );
            assert!(cache.used_bytes() <= MAX_BYTES);
        }
    }
    let stats = cache.get_stats();
    assert!(stats.evictions > 0, "{stats:?}");
    assert_eq!(stats.entries, Some(cache.len() as u64));
    assert!(stats.memory_usage.unwrap() <= MAX_BYTES);
    // Count-bound regime: tiny values only.
    let small = MemoryBackend::builder()
        .max_entries(1_000)
        .max_bytes(64 * 1024 * 1024)
        .build()
        .unwrap();
    for i in 0..100_000u64 {
        small
            .set(&format!("k{i}"), Bytes::from_static(b"v"), None)
            .await
            .unwrap();
    }
    assert!(small.len() <= 1_000, "{}", small.len());
    assert!(
        small.len() >= 500,
        "the cache should stay reasonably full: {}",
        small.len()
    );
}

#[tokio::test]
async fn ttl_expiry_is_exact_under_a_manual_clock() {
    let clock = ManualClock::new();
    let cache = MemoryBackend::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .build()
        .unwrap();
    let ttl = Duration::from_secs(10);
    cache
        .set("k", Bytes::from_static(b"v"), Some(ttl))
        .await
        .unwrap();
    clock.advance(ttl - Duration::from_nanos(1));
    assert!(
        cache.get("k").await.unwrap().is_some(),
        "alive 1 ns before its TTL"
    );
    assert_eq!(
        cache.get_ttl("k").await.unwrap(),
        KeyTtl::Expires(Duration::from_nanos(1))
    );
    clock.advance(Duration::from_nanos(1));
    assert!(
        cache.get("k").await.unwrap().is_none(),
        "gone exactly at its TTL"
    );
    assert_eq!(cache.len(), 0, "an expired entry is removed when touched");
    assert_eq!(cache.get_stats().expirations, 1);
}

#[tokio::test]
async fn untouched_expired_entries_are_reclaimed() {
    let clock = ManualClock::new();
    let cache = MemoryBackend::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .build()
        .unwrap();
    for i in 0..1000 {
        let ttl = (i % 2 == 0).then_some(Duration::from_secs(1));
        cache
            .set(&format!("k{i}"), Bytes::from_static(b"v"), ttl)
            .await
            .unwrap();
    }
    let before = cache.weight();
    clock.advance(Duration::from_secs(1));
    assert_eq!(cache.purge_expired(), 500);
    assert_eq!(cache.len(), 500);
    assert!(cache.weight() < before);
}

#[tokio::test]
async fn background_sweeper_reclaims_without_reads() {
    let clock = ManualClock::new();
    let cache = MemoryBackend::builder()
        .clock(clock.clone())
        .sweep_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    for i in 0..100 {
        cache
            .set(
                &format!("k{i}"),
                Bytes::from_static(b"v"),
                Some(Duration::from_secs(60)),
            )
            .await
            .unwrap();
    }
    clock.advance(Duration::from_secs(60));
    // Bounded wait for the sweeper (it ticks every 20 ms).
    for _ in 0..100 {
        if cache.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        cache.len(),
        0,
        "sweeper should have removed every expired entry"
    );
    assert_eq!(cache.get_stats().expirations, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_tasks_see_no_torn_state() {
    let cache = Arc::new(
        MemoryBackend::builder()
            .max_entries(64)
            .max_bytes(256 * 1024)
            .build()
            .unwrap(),
    );
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let cache = Arc::clone(&cache);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            for i in 0..5_000u64 {
                let key = format!("k{}", (t + i) % 128);
                match i % 4 {
                    0 => {
                        let word = (t << 32 | i).to_le_bytes();
                        cache
                            .set(&key, Bytes::from(word.repeat(64)), None)
                            .await
                            .unwrap();
                    }
                    1 => {
                        cache.delete(&key).await.unwrap();
                    }
                    _ => {
                        if let Some(v) = cache.get(&key).await.unwrap() {
                            assert_eq!(v.len(), 512);
                            assert!(v.chunks(8).all(|c| c == &v[..8]), "torn value");
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(cache.len() <= 64);
    assert!(cache.weight() <= 256 * 1024);
    let stats = cache.get_stats();
    assert_eq!(stats.total_requests, stats.hits + stats.misses);
    assert_eq!(stats.total_requests, 16 * 2_500);
}

#[tokio::test]
async fn oversized_values_and_closed_backend_are_typed_errors() {
    let cache = MemoryBackend::builder()
        .max_value_size(1024)
        .build()
        .unwrap();
    let err = cache
        .set("k", Bytes::from(vec![0; 1025]), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::ValueTooLarge {
                size: 1025,
                max: 1024
            }
        ),
        "{err}"
    );
    assert_eq!(cache.get_stats().errors, 1);
    // A value that cannot fit one shard of a small cache is rejected, not silently dropped.
    let tiny = MemoryBackend::builder()
        .max_bytes(4096)
        .shards(4)
        .build()
        .unwrap();
    assert!(matches!(
        tiny.set("k", Bytes::from(vec![0; 4096]), None).await,
        Err(CacheError::ValueTooLarge { .. })
    ));
    cache
        .set("k", Bytes::from_static(b"v"), None)
        .await
        .unwrap();
    cache.close().await.unwrap();
    assert!(matches!(cache.get("k").await, Err(CacheError::Closed)));
    assert!(!cache.health_check().await);
    assert!(MemoryBackend::builder().max_entries(0).build().is_err());
    // A zero sweep interval is refused (it panicked the sweeper task, so expired entries were
    // never swept; found by review); `None` turns the sweeper off.
    assert!(matches!(
        MemoryBackend::builder()
            .sweep_interval(Duration::ZERO)
            .build(),
        Err(CacheError::Config(_))
    ));
    assert!(
        MemoryBackend::builder()
            .sweep_interval(None)
            .build()
            .is_ok()
    );
}

#[test]
fn store_deadlines_follow_the_clock_exactly() {
    use ncm_cache_core::Clock;
    let clock = ManualClock::new();
    let store = MemoryBackend::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .build_store::<Bytes>("l1")
        .unwrap();
    store
        .insert("k", Bytes::from_static(b"v"), Some(Duration::from_secs(10)))
        .unwrap();
    store
        .insert("forever", Bytes::from_static(b"v"), None)
        .unwrap();
    clock.advance(Duration::from_secs(4));
    let (_, at) = store.get_with_expiry("k").unwrap().unwrap();
    assert_eq!(at.unwrap() - clock.now(), Duration::from_secs(6));
    assert_eq!(store.get_with_expiry("forever").unwrap().unwrap().1, None);
    assert!(store.expire("k", Duration::from_secs(1)).unwrap());
    clock.advance(Duration::from_millis(999));
    assert!(store.peek_unvalidated("k").unwrap().is_some());
    clock.advance(Duration::from_millis(1));
    assert!(
        store.peek_unvalidated("k").unwrap().is_none(),
        "expired at its deadline"
    );
    // A TTL too large for the clock's range never expires instead of wrapping.
    store
        .insert("far", Bytes::from_static(b"v"), Some(Duration::MAX))
        .unwrap();
    clock.advance(Duration::from_secs(86_400 * 365 * 100));
    assert!(store.get("far").unwrap().is_some());
    assert_eq!(store.get_with_expiry("forever").unwrap().unwrap().1, None);
}

/// A shard count that cannot be a power of two (`usize::MAX`) is a configuration error. Before
/// (review, helper-83 #5) `next_power_of_two` overflowed: a panic in debug builds, a division
/// by zero in release.
#[test]
fn an_impossible_shard_count_is_a_config_error() {
    let err = MemoryBackend::builder()
        .shards(usize::MAX)
        .build()
        .unwrap_err();
    assert!(matches!(err, CacheError::Config(_)), "{err:?}");
    assert!(MemoryBackend::builder().shards(4096).build().is_ok());
}
