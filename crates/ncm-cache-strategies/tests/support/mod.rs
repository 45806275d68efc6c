//! Scenarios shared by the in-process tests (`memory.rs`) and the Redis tests (`redis.rs`),
//! so every strategy is checked on both.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ncm_cache_core::{
    Bytes, CacheBackend, CacheStats, Codec, HealthReport, KeyTtl, Result, async_trait,
};
use ncm_cache_memory::MemoryBackend;
use ncm_cache_strategies::{CacheStrategies, Store, batch_store_fn};

/// A persistent store in memory that records every call and can be told to fail.
#[derive(Debug, Default)]
pub(crate) struct Database {
    pub(crate) rows: Mutex<HashMap<String, String>>,
    pub(crate) calls: AtomicU64,
    pub(crate) entries: AtomicU64,
    pub(crate) failing: AtomicBool,
    /// While set, a store call waits (once counted in `calls`).
    pub(crate) hang: AtomicBool,
    /// A store call with a row of this value fails (after any `hang`).
    pub(crate) refuse: Mutex<Option<String>>,
}

impl Database {
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        self.rows.lock().unwrap().get(key).cloned()
    }
    pub(crate) fn len(&self) -> usize {
        self.rows.lock().unwrap().len()
    }
    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A batch store writing into a [`Database`].
pub(crate) fn database(name: &str) -> (Store<String>, Arc<Database>) {
    let db = Arc::new(Database::default());
    let d = Arc::clone(&db);
    let store = batch_store_fn(move |rows: Vec<(String, String)>| {
        let d = Arc::clone(&d);
        async move {
            d.calls.fetch_add(1, Ordering::SeqCst);
            while d.hang.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if d.failing.load(Ordering::SeqCst) {
                return Err("database unavailable");
            }
            let refused = d.refuse.lock().unwrap().clone();
            if refused.is_some_and(|r| rows.iter().any(|(_, v)| *v == r)) {
                return Err("value refused");
            }
            d.entries.fetch_add(rows.len() as u64, Ordering::SeqCst);
            d.rows.lock().unwrap().extend(rows);
            Ok(())
        }
    })
    .named(name);
    (store, db)
}

/// Polls `check` until it holds, for at most `limit`.
pub(crate) async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

/// Polls the async `check` until it holds, for at most `limit`.
pub(crate) async fn eventually_async<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check().await
}

/// A memory backend whose writes (or reads) can be made to fail, or writes to hang until the
/// flag is cleared.
#[derive(Debug, Clone, Default)]
pub(crate) struct Flaky {
    pub(crate) inner: MemoryBackend,
    pub(crate) fail_gets: Arc<AtomicBool>,
    pub(crate) fail_sets: Arc<AtomicBool>,
    pub(crate) hang_sets: Arc<AtomicBool>,
    /// Stands for a store several instances share (as Redis is): reports a key prefix, so
    /// another instance's messages remove nothing from it (`CacheBackend::evict_local`).
    pub(crate) shared: bool,
    /// While set, a write whose encoded value contains this text waits (until cleared).
    pub(crate) hang_value: Arc<Mutex<Option<String>>>,
}

#[async_trait]
impl CacheBackend for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        if self.fail_gets.load(Ordering::SeqCst) {
            return Err(ncm_cache_core::CacheError::connection(
                "injected failure",
                None,
            ));
        }
        self.inner.get(key).await
    }
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        while self.hang_sets.load(Ordering::SeqCst)
            || self
                .hang_value
                .lock()
                .unwrap()
                .as_deref()
                .is_some_and(|v| String::from_utf8_lossy(&value).contains(v))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if self.fail_sets.load(Ordering::SeqCst) {
            return Err(ncm_cache_core::CacheError::connection(
                "injected failure",
                None,
            ));
        }
        self.inner.set(key, value, ttl).await
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        self.inner.delete(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key).await
    }
    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        self.inner.get_ttl(key).await
    }
    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.inner.extend_ttl(key, ttl).await
    }
    async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        self.inner.clear_pattern(pattern).await
    }
    async fn health_report(&self) -> HealthReport {
        self.inner.health_report().await
    }
    fn get_stats(&self) -> CacheStats {
        self.inner.get_stats()
    }
    fn key_prefix(&self) -> Option<&str> {
        self.shared.then_some("")
    }
}

const HOUR: Duration = Duration::from_secs(3600);

async fn put<C: Codec>(s: &CacheStrategies<C>, keys: &[String]) {
    let entries: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
    s.cache().set_many(entries, HOUR).await.unwrap();
}

async fn none_left<C: Codec>(s: &CacheStrategies<C>, keys: &[String]) -> bool {
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut left = 0;
    for chunk in refs.chunks(500) {
        left += s
            .cache()
            .get_many::<String>(chunk)
            .await
            .unwrap()
            .iter()
            .flatten()
            .count();
    }
    left == 0
}

/// A chain and a diamond lattice of 1,000 keys each, both with a cycle, invalidated from two
/// instances at once: every key is invalidated, exactly once in total.
pub(crate) async fn dependency_graph<C: Codec>(a: &CacheStrategies<C>, b: &CacheStrategies<C>) {
    // The chain: k0 <- k1 <- ... <- k999, k0 also depends on k999 (a cycle), k0 on the root.
    let chain: Vec<String> = (0..1000).map(|i| format!("chain:{i}")).collect();
    a.dependency_based_invalidation(&chain[0], ["chain-root", chain[999].as_str()])
        .await
        .unwrap();
    for i in 1..1000 {
        let s = if i % 2 == 0 { a } else { b }; // both instances build the shared graph
        s.dependency_based_invalidation(&chain[i], [chain[i - 1].as_str()])
            .await
            .unwrap();
    }
    // The lattice: 10 layers of 100; each key depends on two keys of the layer below
    // (diamonds everywhere), layer 0 on the root, and 0/0 on 9/99 (a cycle).
    let node = |layer: usize, j: usize| format!("lattice:{layer}:{j}");
    let mut lattice = Vec::new();
    for layer in 0..10 {
        for j in 0..100 {
            let key = node(layer, j);
            let deps: Vec<String> = if layer == 0 {
                vec!["lattice-root".into()]
            } else {
                vec![node(layer - 1, j), node(layer - 1, (j + 1) % 100)]
            };
            b.dependency_based_invalidation(&key, deps).await.unwrap();
            lattice.push(key);
        }
    }
    a.dependency_based_invalidation(&node(0, 0), [node(9, 99)])
        .await
        .unwrap();

    for (root, keys) in [("chain-root", &chain), ("lattice-root", &lattice)] {
        put(a, keys).await;
        let (x, y) = tokio::join!(
            a.invalidate_dependencies(root),
            b.invalidate_dependencies(root)
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        // Each walk reaches every key once (cycles and diamonds included).
        assert_eq!((x, y), (1000, 1000), "{root}");
        assert!(none_left(a, keys).await, "{root}: every key deleted");
        assert!(none_left(b, keys).await, "{root}: every key deleted (b)");
        // The edges are declared facts: cached again, the keys go again with the next walk.
        put(b, keys).await;
        assert_eq!(a.invalidate_dependencies(root).await.unwrap(), 1000);
        assert!(none_left(b, keys).await, "{root}: deleted again");
    }
}

/// Tags: keys tagged on write, invalidated by tag; other keys untouched.
pub(crate) async fn tags<C: Codec>(s: &CacheStrategies<C>) {
    s.set_with_tags("tag:user:1", &"u1", HOUR, ["user:1", "team:7"])
        .await
        .unwrap();
    s.set_with_tags("tag:user:2", &"u2", HOUR, ["user:2", "team:7"])
        .await
        .unwrap();
    s.set_with_tags("tag:user:3", &"u3", HOUR, ["user:3"])
        .await
        .unwrap();
    // A key depending on a tagged key goes with it.
    s.cache().set("tag:feed:1", &"f1").await.unwrap();
    s.dependency_based_invalidation("tag:feed:1", ["tag:user:1"])
        .await
        .unwrap();
    assert_eq!(s.invalidate_tag("team:7").await.unwrap(), 3);
    for gone in ["tag:user:1", "tag:user:2", "tag:feed:1"] {
        assert_eq!(s.cache().get::<String>(gone).await.unwrap(), None, "{gone}");
    }
    assert_eq!(
        s.cache()
            .get::<String>("tag:user:3")
            .await
            .unwrap()
            .as_deref(),
        Some("u3")
    );
    // Tags stay on their keys (declared facts, for the key's TTL): a second invalidation
    // reaches the same keys (already gone); a key deleted explicitly loses its tags.
    assert_eq!(s.invalidate_tag("team:7").await.unwrap(), 3);
    assert!(s.invalidate("tag:user:2").await.is_ok());
    assert_eq!(s.invalidate_tag("team:7").await.unwrap(), 2);
    assert_eq!(s.invalidate_tag("user:3").await.unwrap(), 1);
    assert!(s.invalidate_tag("").await.is_err());
}

/// Pattern invalidation with its callback.
pub(crate) async fn pattern<C: Codec>(s: &CacheStrategies<C>) {
    for k in ["pat:user:1", "pat:user:2", "pat:user:3", "pat:team:1"] {
        s.cache().set(k, &k).await.unwrap();
    }
    let seen = Arc::new(Mutex::new(None));
    let sink = Arc::clone(&seen);
    let n = s
        .pattern_based_invalidation("pat:user:*", move |pattern, n| {
            *sink.lock().unwrap() = Some((pattern.to_owned(), n));
        })
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(*seen.lock().unwrap(), Some(("pat:user:*".to_string(), 3)));
    assert!(s.cache().exists("pat:team:1").await.unwrap());
}

/// Event invalidation on one instance: keys deleted, then the callback, once per trigger.
pub(crate) async fn local_event<C: Codec>(s: &CacheStrategies<C>) {
    s.cache().set("ev:user:123", &1).await.unwrap();
    s.cache().set("ev:user:456", &2).await.unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&calls);
    s.event_based_invalidation(
        "user_updated",
        ["ev:user:123", "ev:user:456"],
        move |e, keys| {
            sink.lock().unwrap().push((e.to_owned(), keys.to_vec()));
        },
    )
    .await
    .unwrap();
    assert_eq!(
        s.trigger_event_invalidation("user_updated").await.unwrap(),
        2
    );
    assert!(!s.cache().exists("ev:user:123").await.unwrap());
    assert_eq!(
        *calls.lock().unwrap(),
        [(
            "user_updated".to_string(),
            vec!["ev:user:123".to_string(), "ev:user:456".to_string()]
        )]
    );
    assert_eq!(
        s.trigger_event_invalidation("nobody_listens")
            .await
            .unwrap(),
        0
    );
    assert!(s.registered_events().contains(&"user_updated".to_string()));
}

/// Time-based invalidation: the callback runs once the key expired; a missing key is refused.
pub(crate) async fn time_based<C: Codec>(s: &CacheStrategies<C>) {
    s.cache().set("tb:session", &"s").await.unwrap();
    let fired = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&fired);
    let start = Instant::now();
    assert!(
        s.time_based_invalidation("tb:session", Duration::from_millis(150), move |key| {
            sink.lock().unwrap().push(key.to_owned());
        })
        .await
        .unwrap()
    );
    assert!(
        eventually(Duration::from_secs(5), || !fired.lock().unwrap().is_empty()).await,
        "callback ran"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(140),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(*fired.lock().unwrap(), ["tb:session"]);
    assert!(!s.cache().exists("tb:session").await.unwrap());
    assert!(
        !s.time_based_invalidation("tb:missing", Duration::from_secs(1), |_| {})
            .await
            .unwrap()
    );
    // A cancelled registration never fires.
    s.cache().set("tb:cancelled", &"c").await.unwrap();
    let never = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&never);
    s.time_based_invalidation("tb:cancelled", Duration::from_millis(50), move |_| {
        flag.store(true, Ordering::SeqCst);
    })
    .await
    .unwrap();
    assert!(s.cancel_time_based_invalidation("tb:cancelled"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!never.load(Ordering::SeqCst));
    assert_eq!(fired.lock().unwrap().len(), 1, "fired once");
}

/// `writes` write-behind writes over `keys` keys from 8 tasks (each task owns its keys, so the
/// final value of each key is known): the store ends with every final value, in far fewer
/// calls than writes, and nothing is left pending after shutdown. Returns (store calls, time).
pub(crate) async fn write_behind_coalesces<C: Codec>(
    s: &CacheStrategies<C>,
    store: &Store<String>,
    db: &Database,
    writes: usize,
    keys: usize,
) -> (u64, Duration) {
    let start = Instant::now();
    let tasks = 8;
    let per_task = writes / tasks;
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (s, store) = (s.clone(), store.clone());
            tokio::spawn(async move {
                for i in 0..per_task {
                    // Task t owns keys t, t + 8, t + 16, ...
                    let k = (t + tasks * (i % (keys / tasks))) % keys;
                    let value = format!("{t}:{i}");
                    s.write_behind(
                        &format!("wb:{k}"),
                        &value,
                        HOUR,
                        &store,
                        Duration::from_millis(20),
                    )
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let accepted = start.elapsed();
    s.shutdown().await.unwrap();
    let elapsed = start.elapsed();
    let queue = s.write_behind_queue(store).await.unwrap();
    let stats = queue.stats();
    assert_eq!(stats.accepted, (per_task * tasks) as u64);
    assert_eq!(stats.pending, 0, "shutdown leaves nothing pending");
    assert_eq!(queue.pending(), 0);
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(db.len(), keys, "every key reached the store");
    // The final value of key k: its owner task's last write to it.
    let per_key = per_task / (keys / tasks);
    for t in 0..tasks {
        for slot in 0..keys / tasks {
            let k = (t + tasks * slot) % keys;
            let last_i = slot + (keys / tasks) * (per_key - 1);
            let want = format!("{t}:{last_i}");
            assert_eq!(
                db.get(&format!("wb:{k}")).as_deref(),
                Some(want.as_str()),
                "key {k}"
            );
            assert_eq!(
                s.cache()
                    .get::<String>(&format!("wb:{k}"))
                    .await
                    .unwrap()
                    .as_deref(),
                Some(want.as_str()),
                "the cache agrees with the store for key {k}"
            );
        }
    }
    assert_eq!(stats.store_calls, db.calls());
    // Durable mode skips a write superseded by a newer one of its key while its batch was
    // being fenced (`superseded`); the invariant of WriteBehindStats.
    assert_eq!(
        stats.accepted,
        stats.coalesced + stats.stored + stats.superseded,
        "{stats:?}"
    );
    println!(
        "{} writes over {keys} keys: {} store calls ({} entries stored), accepted in {accepted:?}, persisted in {elapsed:?}",
        stats.accepted, stats.store_calls, stats.stored
    );
    // Batched: many writes per store call. How many depends on how fast the writers run
    // against the 20 ms flush (a loaded 2-core machine measured 19 per call, 416 calls for
    // 8,000 writes); one per write would be no batching at all.
    assert!(
        stats.store_calls * 5 < stats.accepted,
        "far fewer store calls than writes: {stats:?}"
    );
    assert!(matches!(
        s.write_behind("wb:late", &"x".to_string(), HOUR, store, Duration::ZERO)
            .await,
        Err(ncm_cache_core::CacheError::Closed)
    ));
    (stats.store_calls, elapsed)
}

/// Store failures: retries, then dead letters; replaying them (once the store is back)
/// persists them; a newer write supersedes a dead letter.
pub(crate) async fn dead_letters<C: Codec>(
    s: &CacheStrategies<C>,
    store: &Store<String>,
    db: &Database,
) {
    let queue = s.write_behind_queue(store).await.unwrap();
    db.failing.store(true, Ordering::SeqCst);
    for i in 0..10 {
        s.write_behind(
            &format!("dl:{i}"),
            &format!("v{i}"),
            HOUR,
            store,
            Duration::ZERO,
        )
        .await
        .unwrap();
    }
    assert!(
        queue.flush().await.is_err(),
        "flush reports the dead letters"
    );
    let dead = queue.dead_letters();
    assert_eq!(dead.len(), 10);
    // 3 tries of the batch, then one of each half (both fail: the store is down, so the
    // halves are not split further); a write the flusher took alone (it came before the
    // others were queued) has no halves: 3 tries.
    assert!(
        dead.iter()
            .all(|d| (3..=4).contains(&d.attempts) && d.error.to_string().contains("unavailable")),
        "{dead:?}"
    );
    assert!(
        dead.iter().filter(|d| d.attempts == 4).count() >= 2,
        "no batch of several writes was split: {dead:?}"
    );
    let stats = queue.stats();
    assert!(stats.retries >= 2, "{stats:?}");
    assert_eq!((stats.dead_lettered, stats.pending), (10, 0));
    assert_eq!(db.len(), 0);

    // A newer write of dl:0 replaces its dead letter.
    db.failing.store(false, Ordering::SeqCst);
    s.write_behind("dl:0", &"newer".to_string(), HOUR, store, Duration::ZERO)
        .await
        .unwrap();
    queue.flush().await.unwrap();
    assert_eq!(queue.dead_letters().len(), 9);
    assert_eq!(db.get("dl:0").as_deref(), Some("newer"));

    assert_eq!(queue.replay_dead_letters().await.unwrap(), 9);
    assert!(queue.dead_letters().is_empty());
    for i in 1..10 {
        assert_eq!(db.get(&format!("dl:{i}")), Some(format!("v{i}")));
    }
    assert_eq!(
        db.get("dl:0").as_deref(),
        Some("newer"),
        "the replay did not regress dl:0"
    );
    let stats = queue.stats();
    assert_eq!(
        (stats.replayed, stats.superseded, stats.dead_letters),
        (9, 1, 0)
    );
}

/// A write-behind of a key is pending; the key is invalidated through the strategies (`k`) or
/// removed from the cache behind their back, as an eviction would (`e`), and read through the
/// store, which still has the older row: that row is cached. Once the write is persisted the
/// cache must not keep that row (before, review helper-69: it stayed until its TTL).
pub(crate) async fn an_invalidated_write_behind_key_ends_with_the_persisted_value(
    s: &CacheStrategies,
) {
    let (store, db) = database("invalidated");
    let hour = Duration::from_secs(3600);
    for key in ["k", "e"] {
        db.rows.lock().unwrap().insert(key.into(), "v1".into());
        s.write_behind(key, &"v2".to_string(), hour, &store, hour)
            .await
            .unwrap();
    }
    s.invalidate("k").await.unwrap();
    s.cache().delete("e").await.unwrap();
    for key in ["k", "e"] {
        let row = db.get(key);
        let read: String = s
            .read_through(key, move || async move { row.ok_or("no row") }, hour)
            .await
            .unwrap();
        assert_eq!(
            read, "v1",
            "{key}: the store's row, the write not yet persisted"
        );
    }
    s.flush().await.unwrap();
    for key in ["k", "e"] {
        assert_eq!(db.get(key).as_deref(), Some("v2"));
        let cached = s.cache().get::<String>(key).await.unwrap();
        assert_ne!(
            cached.as_deref(),
            Some("v1"),
            "{key}: the cache kept the store's older row after the write was persisted"
        );
        let row = db.get(key);
        let read: String = s
            .read_through(key, move || async move { row.ok_or("no row") }, hour)
            .await
            .unwrap();
        assert_eq!(read, "v2", "{key}: read after the persist");
    }
}

/// A write landing right after a batch's store call — another writer's write-through: the
/// store, then the cache — is not undone by the check that follows the persist (review,
/// helper-78: a first version cached the persisted write again over it).
pub(crate) async fn a_write_landing_after_a_persist_is_not_undone(s: &CacheStrategies) {
    let hour = Duration::from_secs(3600);
    let db = Arc::new(Database::default());
    let (d, other) = (Arc::clone(&db), s.clone());
    let store = batch_store_fn(move |rows: Vec<(String, String)>| {
        let (d, other) = (Arc::clone(&d), other.clone());
        async move {
            d.rows.lock().unwrap().extend(rows);
            // Right after this batch: another writer's write-through of `k`.
            d.rows.lock().unwrap().insert("k".into(), "v3".into());
            other
                .cache()
                .set_with_ttl("k", &"v3".to_string(), hour)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .named("landing");
    s.write_behind("k", &"v2".to_string(), hour, &store, hour)
        .await
        .unwrap();
    s.flush().await.unwrap();
    assert_eq!(db.get("k").as_deref(), Some("v3"));
    let cached = s.cache().get::<String>("k").await.unwrap();
    assert_ne!(
        cached.as_deref(),
        Some("v2"),
        "the persisted write was cached again over a newer one"
    );
}

/// A write-through or write-around of a key whose write-behind waits in this instance's queue
/// of the same store supersedes it: the store and reads end with the direct write. Before
/// (review, helper-80 #1) the flush persisted the older write-behind over it. A direct write
/// whose store call fails puts the waiting write back (still persisted), and one made while
/// the key's batch is in the store call waits for that batch before calling the store.
pub(crate) async fn direct_writes_supersede_a_waiting_write_behind(s: &CacheStrategies) {
    let hour = Duration::from_secs(3600);
    let (store, db) = database("direct");
    let (v1, v2) = ("v1".to_string(), "v2".to_string());
    s.write_behind("t", &v1, hour, &store, hour).await.unwrap();
    s.write_through("t", &v2, hour, &store).await.unwrap();
    s.write_behind("a", &v1, hour, &store, hour).await.unwrap();
    s.write_around("a", &v2, &store).await.unwrap();
    s.write_behind("f", &v1, hour, &store, hour).await.unwrap();
    db.failing.store(true, Ordering::SeqCst);
    assert!(s.write_through("f", &v2, hour, &store).await.is_err());
    db.failing.store(false, Ordering::SeqCst);
    s.flush().await.unwrap();
    assert_eq!(
        db.get("t").as_deref(),
        Some("v2"),
        "the waiting write-behind was persisted over the write-through"
    );
    assert_eq!(
        db.get("a").as_deref(),
        Some("v2"),
        "the waiting write-behind was persisted over the write-around"
    );
    assert_eq!(
        db.get("f").as_deref(),
        Some("v1"),
        "a failed write-through dropped the waiting write"
    );
    for key in ["t", "a", "f"] {
        let row = db.get(key);
        let read: String = s
            .read_through(key, move || async move { row.ok_or("no row") }, hour)
            .await
            .unwrap();
        assert_eq!(Some(read), db.get(key), "{key}: read after the flush");
    }
    assert_eq!(s.write_behind_queue(&store).await.unwrap().pending(), 0);

    // The key's batch is in the store call: the write-through waits for it.
    db.hang.store(true, Ordering::SeqCst);
    s.write_behind("h", &v1, hour, &store, Duration::ZERO)
        .await
        .unwrap();
    let calls = db.calls();
    assert!(
        eventually(Duration::from_secs(5), || db.calls() > calls).await,
        "the batch never reached the store"
    );
    let through = tokio::spawn({
        let (s, store, v2) = (s.clone(), store.clone(), v2.clone());
        async move { s.write_through("h", &v2, hour, &store).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        db.calls(),
        calls + 1,
        "the write-through called the store while the key's older write was being persisted"
    );
    db.hang.store(false, Ordering::SeqCst);
    through.await.unwrap().unwrap();
    assert_eq!(db.get("h").as_deref(), Some("v2"));
    assert_eq!(
        s.cache().get::<String>("h").await.unwrap().as_deref(),
        Some("v2")
    );
}

/// Two durable instances (each its own journal consumer, as two processes): a write-through by
/// `b` supersedes `a`'s older write-behind of the key waiting in `a`'s queue; a failed one
/// does not lose it; one that fails after `a` dropped its write as superseded is persisted by
/// `b`'s queue. (`redis.rs::a_write_through_supersedes_another_instances_waiting_write_behind`.)
pub(crate) async fn a_write_through_supersedes_another_instances_write_behind(
    a: &CacheStrategies,
    b: &CacheStrategies,
    name: &str,
) {
    let (store, db) = database(name);
    let queue_a = a.write_behind_queue(&store).await.unwrap();
    // B journals its direct writes of the store: it holds the store's durable queue.
    let queue_b = b.write_behind_queue(&store).await.unwrap();

    // Superseded: A's waiting `old` is not persisted after B's `new`.
    a.write_behind("k", &"old".to_string(), HOUR, &store, HOUR)
        .await
        .unwrap();
    b.write_through("k", &"new".to_string(), HOUR, &store)
        .await
        .unwrap();
    assert_eq!(db.get("k").as_deref(), Some("new"));
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(
        db.get("k").as_deref(),
        Some("new"),
        "the other instance's older write-behind was persisted over the write-through"
    );
    assert_eq!(queue_a.pending(), 0);

    // A failed write-through: A's waiting write is still persisted.
    a.write_behind("j", &"old2".to_string(), HOUR, &store, HOUR)
        .await
        .unwrap();
    db.failing.store(true, Ordering::SeqCst);
    assert!(
        b.write_through("j", &"bad".to_string(), HOUR, &store)
            .await
            .is_err()
    );
    db.failing.store(false, Ordering::SeqCst);
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(
        db.get("j").as_deref(),
        Some("old2"),
        "a failed write-through lost the other instance's waiting write"
    );

    // B's write-through is in its store call when A's batch of the key comes: A waits for its
    // outcome (its fence says "busy") instead of dropping its write as superseded. B's store
    // call fails and takes its entry back: A's write is the newest again and is persisted.
    a.write_behind("p", &"old3".to_string(), HOUR, &store, HOUR)
        .await
        .unwrap();
    *db.refuse.lock().unwrap() = Some("new3".into());
    db.hang.store(true, Ordering::SeqCst);
    let calls = db.calls();
    let through = tokio::spawn({
        let (b, store) = (b.clone(), store.clone());
        async move {
            b.write_through("p", &"new3".to_string(), HOUR, &store)
                .await
        }
    });
    assert!(
        eventually(Duration::from_secs(5), || db.calls() > calls).await,
        "the write-through never reached the store"
    );
    let flush = tokio::spawn({
        let a = a.clone();
        async move { a.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !flush.is_finished(),
        "A's flush did not wait for the write-through under way"
    );
    assert_eq!(
        db.get("p"),
        None,
        "A persisted while the write-through was under way"
    );
    db.hang.store(false, Ordering::SeqCst);
    assert!(through.await.unwrap().is_err());
    tokio::time::timeout(Duration::from_secs(5), flush)
        .await
        .expect("A's flush never returned")
        .unwrap()
        .unwrap();
    *db.refuse.lock().unwrap() = None;
    b.flush().await.unwrap();
    assert_eq!(
        db.get("p").as_deref(),
        Some("old3"),
        "the failed write-through lost the write it overlapped"
    );
    assert_eq!(queue_b.pending(), 0);
}
