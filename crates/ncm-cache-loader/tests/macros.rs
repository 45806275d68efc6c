//! `#[cache_loader]` and `#[cache_method]`: 10,000 calls over 100 arguments run the body 100
//! times, `Err` and `None` are not cached, options work, the cache failing is skipped, and
//! misuse is a clear compile error (trybuild).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use common::{Flaky, memory_cache};
use ncm_cache_codec::Serializer;
use ncm_cache_core::Cache;
use ncm_cache_loader::{CacheLoader, cache_loader, cache_method};
use serde::{Deserialize, Serialize};

static LOADER: LazyLock<CacheLoader> = LazyLock::new(|| CacheLoader::new(memory_cache()));

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    user_id: u64,
    bio: String,
}

#[derive(Debug, PartialEq)]
struct MyError(String);

static PROFILE_RUNS: AtomicUsize = AtomicUsize::new(0);

#[cache_loader(loader = LOADER, ttl = "1h", strategy = ReadThrough)]
async fn get_user_profile(user_id: u64) -> Result<Profile, MyError> {
    PROFILE_RUNS.fetch_add(1, Ordering::SeqCst);
    if user_id == 666 {
        return Err(MyError(format!("no profile for {user_id}")));
    }
    let bio: String = format!("bio {user_id}")
        .parse()
        .map_err(|_| MyError("parse".into()))?;
    Ok(Profile { user_id, bio })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    email: String,
}

struct UserService {
    loader: CacheLoader,
    runs: AtomicUsize,
    misses: AtomicUsize,
}

impl UserService {
    #[cache_method(loader = self.loader, ttl = 1800, key = format!("email:{}", email))]
    async fn get_user_by_email(&self, email: &str) -> Result<User, MyError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if email.is_empty() {
            return Err(MyError("empty email".into()));
        }
        Ok(User {
            email: email.to_owned(),
        })
    }

    #[cache_method(loader = self.loader, ttl = 60)]
    async fn find(&self, id: u32, tag: String) -> Option<String> {
        self.misses.fetch_add(1, Ordering::SeqCst);
        id.is_multiple_of(2).then(|| format!("{tag}{id}"))
    }

    #[cache_method(loader = self.loader, ttl = Duration::from_secs(60), cache_none = true, name = "svc.find_cached")]
    async fn find_cached(&self, id: u32) -> Option<u32> {
        self.misses.fetch_add(1, Ordering::SeqCst);
        id.is_multiple_of(2).then_some(id)
    }
}

fn service(cache: Cache<Serializer>) -> UserService {
    UserService {
        loader: CacheLoader::new(cache),
        runs: AtomicUsize::new(0),
        misses: AtomicUsize::new(0),
    }
}

#[tokio::test]
async fn ten_thousand_calls_over_a_hundred_arguments_run_the_bodies_a_hundred_times() {
    let svc = service(memory_cache());
    let emails: Vec<String> = (0..100).map(|i| format!("u{i}@example.com")).collect();
    for i in 0..10_000u64 {
        let id = i % 100;
        let profile = get_user_profile(id).await.unwrap();
        assert_eq!(profile.user_id, id);
        let user = svc.get_user_by_email(&emails[id as usize]).await.unwrap();
        assert_eq!(user.email, emails[id as usize]);
    }
    assert_eq!(PROFILE_RUNS.load(Ordering::SeqCst), 100);
    assert_eq!(svc.runs.load(Ordering::SeqCst), 100);

    // Stats are kept under the function's path (or its `name`).
    let stats = LOADER.get_loader_stats();
    let (name, s) = stats
        .loaders
        .iter()
        .find(|(name, _)| name.ends_with("get_user_profile"))
        .unwrap();
    assert_eq!(name, "macros::get_user_profile");
    assert_eq!((s.calls, s.hits, s.loads), (10_000, 9_900, 100));
    let method = svc.loader.get_loader_stats();
    assert!(
        method
            .loaders
            .contains_key("macros::UserService::get_user_by_email")
    );
    // The custom key replaces the arguments part.
    let key = "loader:macros::UserService::get_user_by_email:email:u1@example.com";
    assert!(svc.loader.cache().exists(key).await.unwrap());

    // `Err` is returned and not cached.
    for _ in 0..3 {
        assert_eq!(
            get_user_profile(666).await,
            Err(MyError("no profile for 666".into()))
        );
        assert!(svc.get_user_by_email("").await.is_err());
    }
    assert_eq!(PROFILE_RUNS.load(Ordering::SeqCst), 103);
    assert_eq!(svc.runs.load(Ordering::SeqCst), 103);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_share_one_body_run_per_argument() {
    let svc = Arc::new(service(memory_cache()));
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|t| {
            let (svc, barrier) = (svc.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                for i in 0..100 {
                    let email = format!("c{}@x", (i + t) % 100);
                    assert_eq!(svc.get_user_by_email(&email).await.unwrap().email, email);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(svc.runs.load(Ordering::SeqCst), 100);
}

#[tokio::test]
async fn none_is_not_cached_unless_asked() {
    let svc = service(memory_cache());
    for _ in 0..3 {
        assert_eq!(svc.find(1, "t".into()).await, None);
        assert_eq!(svc.find(2, "t".into()).await, Some("t2".into()));
    }
    // id 1 ran 3 times (None is not cached), id 2 once.
    assert_eq!(svc.misses.swap(0, Ordering::SeqCst), 4);
    for _ in 0..3 {
        assert_eq!(svc.find_cached(1).await, None);
        assert_eq!(svc.find_cached(2).await, Some(2));
    }
    assert_eq!(
        svc.misses.load(Ordering::SeqCst),
        2,
        "None cached with cache_none"
    );
    assert!(
        svc.loader
            .get_loader_stats()
            .loaders
            .contains_key("svc.find_cached")
    );
}

#[tokio::test]
async fn a_failing_cache_falls_back_to_calling_the_function() {
    let backend = Flaky::new();
    let svc = service(Cache::new(backend.clone(), Serializer::default()));
    backend.set_down(true);
    for _ in 0..3 {
        assert!(svc.get_user_by_email("a@b").await.is_ok());
    }
    assert_eq!(svc.runs.load(Ordering::SeqCst), 3);
    let stats = svc.loader.get_loader_stats().total;
    assert!(stats.cache_errors >= 3, "{stats:?}");
    backend.set_down(false);
    for _ in 0..3 {
        assert!(svc.get_user_by_email("a@b").await.is_ok());
    }
    assert_eq!(svc.runs.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn the_ttl_option_sets_the_expiry() {
    let svc = service(memory_cache());
    svc.get_user_by_email("ttl@x").await.unwrap();
    let key = "loader:macros::UserService::get_user_by_email:email:ttl@x";
    let ttl = svc.loader.cache().get_ttl(key).await.unwrap().unwrap();
    assert!(ttl <= Duration::from_secs(1800) && ttl > Duration::from_secs(1790));
    tokio::time::advance(Duration::from_secs(1801)).await;
    svc.get_user_by_email("ttl@x").await.unwrap();
    assert_eq!(svc.runs.load(Ordering::SeqCst), 2);
}

#[test]
fn misuse_is_a_clear_compile_error() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass.rs");
    t.compile_fail("tests/ui/fail_*.rs");
}
