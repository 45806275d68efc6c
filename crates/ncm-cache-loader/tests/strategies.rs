//! Every `CacheStrategy` has its own behaviour in a loader (or is refused), and every
//! read-through path — `Cache::read_through`, `CacheStrategies::read_through` /
//! `cache_aside`, `CacheLoader` — treats a failing cache the same way (`CacheFailure`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Flaky;
use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheError, CacheFailure, CacheStrategy, Expiry};
use ncm_cache_loader::{CacheLoader, cache_loader};
use ncm_cache_strategies::CacheStrategies;

fn flaky_cache() -> (Flaky, Cache<Serializer>) {
    let flaky = Flaky::new();
    (flaky.clone(), Cache::new(flaky, Serializer::default()))
}

type Io = std::io::Error;

/// Registers `name` with `strategy`, counting loads.
fn register(
    loader: &CacheLoader,
    name: &str,
    strategy: CacheStrategy,
    runs: &Arc<AtomicUsize>,
) -> ncm_cache_core::Result<()> {
    let runs = Arc::clone(runs);
    loader
        .register_loader(
            name,
            move |id: u64| {
                let runs = Arc::clone(&runs);
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Io>(id * 10)
                }
            },
            None,
            strategy,
        )
        .map(drop)
}

#[tokio::test]
async fn cache_aside_skips_a_failing_cache_and_read_through_fails_with_it() {
    let (flaky, cache) = flaky_cache();
    let loader = CacheLoader::new(cache);
    let runs = Arc::new(AtomicUsize::new(0));
    register(&loader, "aside", CacheStrategy::CacheAside, &runs).unwrap();
    register(&loader, "through", CacheStrategy::ReadThrough, &runs).unwrap();
    flaky.set_writes_down(true);
    // CacheAside: the value is served although the cache did not take it.
    assert_eq!(loader.load::<u64, u64>("aside", 1).await.unwrap(), 10);
    // ReadThrough: the cache is in the read path; its failure is the call's.
    let err = loader.load::<u64, u64>("through", 1).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    flaky.set_writes_down(false);
    flaky.set_down(true);
    assert_eq!(loader.load::<u64, u64>("aside", 2).await.unwrap(), 20);
    assert!(loader.load::<u64, u64>("through", 2).await.is_err());
    flaky.set_down(false);
    assert_eq!(loader.load::<u64, u64>("through", 3).await.unwrap(), 30);
    assert_eq!(loader.load::<u64, u64>("through", 3).await.unwrap(), 30);
    // aside 1, 2; through 1 (loaded, then the write failed), 3 (once: then cached).
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn write_behind_returns_before_the_cache_write_and_write_around_never_writes() {
    let (flaky, cache) = flaky_cache();
    let loader = CacheLoader::new(cache.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    register(&loader, "behind", CacheStrategy::WriteBehind, &runs).unwrap();
    register(&loader, "around", CacheStrategy::WriteAround, &runs).unwrap();
    flaky.set_write_delay(Duration::from_millis(400));
    let start = Instant::now();
    assert_eq!(loader.load::<u64, u64>("behind", 1).await.unwrap(), 10);
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "WriteBehind waited for the cache write: {:?}",
        start.elapsed()
    );
    let key = "loader:behind:1";
    assert!(!cache.exists(key).await.unwrap(), "written already");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(cache.exists(key).await.unwrap(), "never written");
    flaky.set_write_delay(Duration::ZERO);
    for _ in 0..3 {
        assert_eq!(loader.load::<u64, u64>("around", 1).await.unwrap(), 10);
    }
    assert!(!cache.exists("loader:around:1").await.unwrap());
    // behind once; around every time (nothing cached).
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn write_through_is_not_a_loader_strategy() {
    let (_, cache) = flaky_cache();
    let loader = CacheLoader::new(cache);
    let runs = Arc::new(AtomicUsize::new(0));
    let err = register(&loader, "w", CacheStrategy::WriteThrough, &runs).unwrap_err();
    assert!(
        matches!(&err, CacheError::InvalidArgument(m) if m.contains("write strategy")),
        "{err:?}"
    );
}

static MACRO_LOADER: std::sync::LazyLock<(Flaky, CacheLoader)> = std::sync::LazyLock::new(|| {
    let (flaky, cache) = flaky_cache();
    (flaky, CacheLoader::new(cache))
});

#[derive(Debug)]
struct AppError(String);

impl From<CacheError> for AppError {
    fn from(e: CacheError) -> Self {
        Self(e.to_string())
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cache_loader(loader = MACRO_LOADER.1, strategy = ReadThrough)]
async fn through(id: u64) -> Result<u64, AppError> {
    Ok(id)
}

/// `CacheError` itself is `Clone` and `From<CacheError>`: both sharing and fail-closed apply.
#[cache_loader(loader = MACRO_LOADER.1, strategy = ReadThrough)]
async fn through_cache_error(id: u64) -> Result<u64, CacheError> {
    Ok(id + 100)
}

static OPTION_CALLS: AtomicUsize = AtomicUsize::new(0);

/// An `Option` cannot carry the cache's error: ReadThrough then goes on without the cache.
#[cache_loader(loader = MACRO_LOADER.1, strategy = ReadThrough)]
async fn through_option(id: u64) -> Option<u64> {
    OPTION_CALLS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    Some(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_through_function_fails_with_the_cache_when_its_error_can_say_so() {
    MACRO_LOADER.0.set_writes_down(true);
    let err = through(1).await.unwrap_err();
    assert!(err.0.contains("writes switched off"), "{err:?}");
    let err = through_cache_error(1).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    MACRO_LOADER.0.set_writes_down(false);
    assert_eq!(through(1).await.unwrap(), 1);
    assert_eq!(through_cache_error(1).await.unwrap(), 101);
    // The cache down, 50 concurrent callers of an `Option` function: one call (single-flight
    // kept), every caller served.
    MACRO_LOADER.0.set_down(true);
    let calls: Vec<_> = (0..50).map(|_| tokio::spawn(through_option(7))).collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), Some(7));
    }
    MACRO_LOADER.0.set_down(false);
    assert_eq!(OPTION_CALLS.load(Ordering::SeqCst), 1);
}

/// The same failing cache under every read-through path: fail-open serves the loaded value,
/// fail-closed returns the cache's error — no path differs.
#[tokio::test]
async fn every_read_through_path_treats_a_failing_cache_alike() {
    for on_failure in [CacheFailure::FailOpen, CacheFailure::FailClosed] {
        let (flaky, cache) = flaky_cache();
        let strategies = CacheStrategies::builder(cache.clone())
            .on_cache_failure(on_failure)
            .build()
            .await
            .unwrap();
        for (reads, writes) in [(true, false), (false, true)] {
            flaky.set_down(reads);
            flaky.set_writes_down(writes);
            let load = || async { Ok::<_, Io>(7u64) };
            let results = [
                cache
                    .read_through_with("k", load, Expiry::Default, on_failure)
                    .await,
                strategies.read_through("k", load, Expiry::Default).await,
                strategies.cache_aside("k", load, Expiry::Default).await,
            ];
            for (path, result) in ["core", "strategies read_through", "cache_aside"]
                .iter()
                .zip(results)
            {
                match on_failure {
                    CacheFailure::FailOpen => assert_eq!(result.unwrap(), 7, "{path}"),
                    CacheFailure::FailClosed => {
                        assert!(result.unwrap_err().is_unavailable(), "{path}")
                    }
                }
            }
        }
        // The default `read_through` is fail-open.
        flaky.set_down(true);
        let v: u64 = cache
            .read_through("k", || async { Ok::<_, Io>(8) }, Expiry::Default)
            .await
            .unwrap();
        assert_eq!(v, 8);
    }
}
