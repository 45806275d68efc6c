//! The attribute macros' keys and failures: the key format is pinned (module path + function
//! name, never the compiler's `type_name` of the function), generic instantiations never share
//! a key, a `Result` or `Option` behind any alias is recognised, and the callers waiting on a
//! failing call share its error (one call per key, also on failure).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use common::memory_cache;
use ncm_cache_core::CacheError;
use ncm_cache_loader::{CacheLoader, cache_loader, cache_method};
use serde::{Deserialize, Serialize};

static LOADER: LazyLock<CacheLoader> = LazyLock::new(|| CacheLoader::new(memory_cache()));

mod accounts {
    use super::*;

    pub(crate) static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[cache_loader(loader = LOADER)]
    pub(crate) async fn balance(account: u64, currency: String) -> Result<u64, String> {
        RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(account * 100 + currency.len() as u64)
    }
}

/// The documented key format, pinned: `loader:{module path}::{fn}:{arguments as canonical JSON}`
/// and `loader:{module path}::{Type}::{method}:{...}`. A change here changes every key users
/// have in Redis; it must be deliberate.
#[tokio::test]
async fn the_key_format_is_pinned() {
    assert_eq!(accounts::balance(7, "EUR".into()).await, Ok(703));
    let key = r#"loader:macro_keys::accounts::balance:[7,"EUR"]"#;
    assert!(
        LOADER.cache().exists(key).await.unwrap(),
        "key moved: {key}"
    );
    let repo = Repo::<Order>::new();
    repo.find(3).await.unwrap();
    let key = "loader:macro_keys::Repo<macro_keys::Order>::find:[3]";
    assert!(
        repo.loader.cache().exists(key).await.unwrap(),
        "key moved: {key}"
    );
    let plain = Plain {
        loader: CacheLoader::new(memory_cache()),
    };
    plain.get(1).await;
    let key = "loader:macro_keys::Plain::get:[1]";
    assert!(
        plain.loader.cache().exists(key).await.unwrap(),
        "key moved: {key}"
    );
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct User {
    name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct Order {
    total: u64,
}

trait Kind: Default + Serialize + serde::de::DeserializeOwned + Send + Sync + 'static {}
impl Kind for User {}
impl Kind for Order {}

/// One generic impl, two instantiations: each gets its own keys.
struct Repo<T> {
    loader: CacheLoader,
    _kind: std::marker::PhantomData<T>,
}

impl<T: Kind> Repo<T> {
    fn new() -> Self {
        Self {
            loader: CacheLoader::new(memory_cache()),
            _kind: std::marker::PhantomData,
        }
    }

    #[cache_method(loader = self.loader)]
    async fn find(&self, id: u64) -> Result<T, String> {
        let _ = id;
        Ok(T::default())
    }
}

struct Plain {
    loader: CacheLoader,
}

impl Plain {
    #[cache_method(loader = self.loader)]
    async fn get(&self, id: u64) -> u64 {
        id
    }
}

/// A generic function is keyed by what its `key` says (required by the macro).
#[cache_loader(loader = LOADER, key = format!("{}:{id}", std::any::type_name::<T>()))]
async fn fetch<T: Kind>(id: u64) -> Result<T, String> {
    let _ = id;
    Ok(T::default())
}

#[tokio::test]
async fn generic_instantiations_never_share_a_key() {
    // Same loader (one cache): a `User` and an `Order` under the same id.
    let shared = CacheLoader::new(memory_cache());
    let users = Repo::<User> {
        loader: shared.clone(),
        _kind: std::marker::PhantomData,
    };
    let orders = Repo::<Order> {
        loader: shared,
        _kind: std::marker::PhantomData,
    };
    assert_eq!(users.find(1).await.unwrap(), User::default());
    // Sharing a key, the second read would find the User's entry and fail to decode it as an
    // Order (or, with compatible shapes, return the other type's value). A generic *function*
    // without `key = ...` is refused at compile time (tests/ui/fail_generic_without_key.rs).
    assert_eq!(orders.find(1).await.unwrap(), Order::default());
    assert_eq!(fetch::<User>(1).await.unwrap(), User::default());
    assert_eq!(fetch::<Order>(1).await.unwrap(), Order::default());
    let stats = LOADER.get_loader_stats();
    let s = stats
        .loaders
        .get("macro_keys::fetch")
        .expect("stats under the fn path");
    assert_eq!(s.loads, 2, "each instantiation loads once: {s:?}");
}

/// `Result` and `Option` behind aliases whose names say nothing.
type Lookup<T> = Result<T, String>;
type Maybe<T> = Option<T>;

static ALIAS_RUNS: AtomicUsize = AtomicUsize::new(0);

#[cache_loader(loader = LOADER)]
async fn aliased_result(fail: bool) -> Lookup<u32> {
    ALIAS_RUNS.fetch_add(1, Ordering::SeqCst);
    if fail { Err("boom".into()) } else { Ok(1) }
}

#[cache_loader(loader = LOADER)]
async fn aliased_option(id: u32) -> Maybe<u32> {
    ALIAS_RUNS.fetch_add(1, Ordering::SeqCst);
    (id > 0).then_some(id)
}

#[tokio::test]
async fn errors_and_none_behind_any_alias_are_not_cached() {
    for _ in 0..3 {
        assert_eq!(aliased_result(true).await, Err("boom".into()));
        assert_eq!(aliased_option(0).await, None);
    }
    // Before: the alias was cached as a plain value, so the error and `None` were cached.
    assert_eq!(ALIAS_RUNS.load(Ordering::SeqCst), 6);
}

#[derive(Debug, Clone, PartialEq)]
struct DbDown(String);

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

static CLONE_CALLS: AtomicUsize = AtomicUsize::new(0);
static FROM_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cache_loader(loader = LOADER)]
async fn failing_clone(id: u64) -> Result<u64, DbDown> {
    CLONE_CALLS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    Err(DbDown(format!("db down for {id}")))
}

#[cache_loader(loader = LOADER)]
async fn failing_from(id: u64) -> Result<u64, AppError> {
    FROM_CALLS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    Err(AppError(format!("db down for {id}")))
}

/// 1,000 callers of one key while its call fails: exactly one call; every caller gets the
/// failure (a clone of the error when it is `Clone`, `From<CacheError>` otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiters_on_a_failing_call_cause_exactly_one_call() {
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                failing_clone(1).await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), Err(DbDown("db down for 1".into())));
    }
    assert_eq!(
        CLONE_CALLS.load(Ordering::SeqCst),
        1,
        "the waiters ran their own calls"
    );

    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                failing_from(1).await
            })
        })
        .collect();
    for t in tasks {
        // Every caller sees the leader's message (waiters through `From<CacheError>`).
        let AppError(msg) = t.await.unwrap().unwrap_err();
        assert!(msg.contains("db down for 1"), "{msg}");
    }
    assert_eq!(
        FROM_CALLS.load(Ordering::SeqCst),
        1,
        "the waiters ran their own calls"
    );
}

struct UserTable;
struct OrderTable;

impl UserTable {
    #[cache_loader(loader = LOADER)]
    async fn get(id: u64) -> Result<String, String> {
        Ok(format!("user {id}"))
    }
}

impl OrderTable {
    #[cache_loader(loader = LOADER)]
    async fn get(id: u64) -> Result<String, String> {
        Ok(format!("order {id}"))
    }
}

trait UserRepo {
    async fn find(&self, id: u64) -> Result<String, String>;
}

trait OrderRepo {
    async fn find(&self, id: u64) -> Result<String, String>;
}

struct Pg {
    loader: CacheLoader,
}

impl UserRepo for Pg {
    #[cache_method(loader = self.loader)]
    async fn find(&self, id: u64) -> Result<String, String> {
        Ok(format!("user {id}"))
    }
}

impl OrderRepo for Pg {
    #[cache_method(loader = self.loader)]
    async fn find(&self, id: u64) -> Result<String, String> {
        Ok(format!("order {id}"))
    }
}

/// Associated functions of one name in two impls of one module, and methods of one name from
/// two traits on one type, never share a key.
#[tokio::test]
async fn namesakes_in_impls_and_trait_impls_have_their_own_keys() {
    assert_eq!(UserTable::get(1).await.unwrap(), "user 1");
    assert_eq!(OrderTable::get(1).await.unwrap(), "order 1");
    assert_eq!(UserTable::get(1).await.unwrap(), "user 1");
    let pg = Pg {
        loader: CacheLoader::new(memory_cache()),
    };
    assert_eq!(UserRepo::find(&pg, 1).await.unwrap(), "user 1");
    assert_eq!(OrderRepo::find(&pg, 1).await.unwrap(), "order 1");
    assert_eq!(UserRepo::find(&pg, 1).await.unwrap(), "user 1");
    let names: Vec<String> = pg.loader.get_loader_stats().loaders.into_keys().collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

mod sets {
    use std::collections::HashSet;

    use super::*;

    pub(crate) static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[cache_loader(loader = LOADER)]
    pub(crate) async fn count(ids: HashSet<u64>) -> usize {
        RUNS.fetch_add(1, Ordering::SeqCst);
        ids.len()
    }

    #[cache_loader(loader = LOADER)]
    pub(crate) async fn count_ref(ids: &HashSet<u64>, tag: &str) -> usize {
        RUNS.fetch_add(1, Ordering::SeqCst);
        ids.len() + tag.len()
    }
}

/// A `HashSet` argument gives one key whatever its iteration order, which differs between
/// processes and between two sets of the same elements (found by review: the key followed the
/// order, so another process's `invalidate` missed, and each process cached its own copy).
#[tokio::test]
async fn hash_set_arguments_give_one_key_whatever_their_order() {
    use std::collections::HashSet;
    let a: HashSet<u64> = (0..64).collect();
    let b: HashSet<u64> = (0..64).rev().collect();
    assert_ne!(
        a.iter().collect::<Vec<_>>(),
        b.iter().collect::<Vec<_>>(),
        "two sets iterating in one order prove nothing"
    );
    let before = sets::RUNS.load(Ordering::SeqCst);
    assert_eq!(sets::count(a.clone()).await, 64);
    assert_eq!(sets::count(b.clone()).await, 64);
    assert_eq!(sets::count_ref(&a, "x").await, 65);
    assert_eq!(sets::count_ref(&b, "x").await, 65);
    assert_eq!(
        sets::RUNS.load(Ordering::SeqCst) - before,
        2,
        "one run per key"
    );
    // Sorted as a `BTreeSet` of the same elements is (numbers by value, not as text), so
    // `invalidate` with one reaches the entry.
    let small: HashSet<u64> = [10, 2, 3].into();
    sets::count(small.clone()).await;
    let key = "loader:macro_keys::sets::count:[[2,3,10]]";
    assert!(
        LOADER.cache().exists(key).await.unwrap(),
        "key moved: {key}"
    );
    let sorted: std::collections::BTreeSet<u64> = small.iter().copied().collect();
    assert!(
        LOADER
            .invalidate("macro_keys::sets::count", &(&sorted,))
            .await
            .unwrap(),
        "invalidating with a BTreeSet missed"
    );
}

mod search {
    use super::*;

    pub(crate) static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[cache_loader(loader = LOADER, key = format!("q:{query}"))]
    pub(crate) async fn search(query: String) -> Result<usize, CacheError> {
        RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(query.len())
    }
}

/// A `key = ...` built from a caller's input may be longer than the cache's key limit (4 KiB by
/// default): it is hashed as long arguments are, so the call is cached like any other. Before,
/// the read failed with `InvalidKey` and the call returned it without running (review,
/// helper-71).
#[tokio::test]
async fn a_long_custom_key_is_hashed_not_refused() {
    let long = "x".repeat(5_000);
    for _ in 0..3 {
        assert_eq!(search::search(long.clone()).await.unwrap(), 5_000);
    }
    assert_eq!(search::RUNS.load(Ordering::SeqCst), 1, "cached once");
    let hashed = ncm_cache_loader::__private::custom_key(&format!("q:{long}")).unwrap();
    assert!(hashed.starts_with('#') && hashed.len() == 33, "{hashed}");
    assert!(
        LOADER
            .cache()
            .exists(&format!("loader:macro_keys::search::search:{hashed}"))
            .await
            .unwrap()
    );
    // A short key is kept as written; one that begins with `#` is hashed, so no literal key
    // can equal another's hash.
    assert_eq!(search::search("abc".into()).await.unwrap(), 3);
    assert!(
        LOADER
            .cache()
            .exists("loader:macro_keys::search::search:q:abc")
            .await
            .unwrap()
    );
    let literal = ncm_cache_loader::__private::custom_key(&hashed).unwrap();
    assert_ne!(literal, hashed);
    // A NUL (the separator of in-process load flights: `victim\0force` named the forced
    // refresh of `victim`) is never part of a key as written.
    assert!(
        ncm_cache_loader::__private::custom_key("victim\0force")
            .unwrap()
            .starts_with('#')
    );
}

mod scores {
    use super::*;

    pub(crate) static RUNS: AtomicUsize = AtomicUsize::new(0);

    #[cache_loader(loader = LOADER)]
    pub(crate) async fn above(threshold: f64) -> Result<String, CacheError> {
        RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(format!("above {threshold}"))
    }
}

/// NaN, +∞ and −∞ all serialize to JSON `null`: a call with one of them runs without the cache
/// instead of sharing a key with the others (review, helper-71: `above(-inf)` returned the
/// cached result of `above(inf)`).
#[tokio::test]
async fn non_finite_float_arguments_never_share_a_result() {
    assert_eq!(scores::above(f64::INFINITY).await.unwrap(), "above inf");
    assert_eq!(
        scores::above(f64::NEG_INFINITY).await.unwrap(),
        "above -inf"
    );
    assert_eq!(scores::above(f64::NAN).await.unwrap(), "above NaN");
    assert_eq!(scores::above(f64::INFINITY).await.unwrap(), "above inf");
    assert_eq!(
        scores::RUNS.load(Ordering::SeqCst),
        4,
        "none of them cached"
    );
    // A finite argument is cached as before.
    scores::above(1.5).await.unwrap();
    scores::above(1.5).await.unwrap();
    assert_eq!(scores::RUNS.load(Ordering::SeqCst), 5);
}
