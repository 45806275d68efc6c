//! Every strategy on a throwaway Redis (feature `redis`): the shared graph, cross-instance
//! events, keyspace notifications, and durable write-behind — including a process killed with
//! SIGKILL whose acknowledged writes are replayed by another.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ncm_cache_codec::Serializer;
use ncm_cache_core::Cache;
use ncm_cache_memory::MemoryBackend;
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_strategies::{CacheStrategies, DurableConfig, WriteBehindConfig};
use ncm_cache_testkit::{RedisCluster, RedisServer};
use support::{Database, Flaky, database, eventually, eventually_async};

const HOUR: Duration = Duration::from_secs(3600);

fn config(url: &str, prefix: &str) -> RedisConfig {
    let mut c = RedisConfig::from_url(url).unwrap();
    c.response_timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_secs(2);
    c.health_check_interval = None;
    c.key_prefix = prefix.to_owned();
    c
}

async fn cache(server: &RedisServer, prefix: &str) -> RedisCache {
    RedisCache::connect(config(&server.url(), prefix))
        .await
        .unwrap()
}

/// Two instances, each with its own in-process cache, coordinated through Redis.
async fn local_pair(server: &RedisServer, prefix: &str) -> (CacheStrategies, CacheStrategies) {
    let mut pair = Vec::new();
    for _ in 0..2 {
        let redis = cache(server, prefix).await;
        let local = Cache::new(MemoryBackend::new(), Serializer::default());
        let s = CacheStrategies::with_redis(local, redis.redis_backend().clone())
            .await
            .unwrap();
        pair.push(s);
    }
    let b = pair.pop().unwrap();
    (pair.pop().unwrap(), b)
}

fn durable(cache: &RedisCache) -> WriteBehindConfig {
    let d = DurableConfig::new(cache.redis_backend().clone())
        .lease(Duration::from_millis(500))
        .claim_min_idle(Duration::from_millis(50));
    WriteBehindConfig::default()
        .batch_size(500)
        .max_retries(2)
        .retry_backoff(Duration::from_millis(5))
        .durable(d)
}

async fn durable_strategies(cache: &RedisCache) -> CacheStrategies {
    durable_strategies_leased(cache, Duration::from_millis(500)).await
}

/// [`durable_strategies`] with a consumer lease of `lease` (also how long another queue
/// waits for a direct write's store call).
async fn durable_strategies_leased(cache: &RedisCache, lease: Duration) -> CacheStrategies {
    let mut config = durable(cache);
    if let Some(d) = config.durable.take() {
        config = config.durable(d.lease(lease));
    }
    CacheStrategies::builder(cache.cache().clone())
        .redis(cache.redis_backend().clone())
        .write_behind(config)
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidation_strategies_on_a_shared_redis() {
    let server = RedisServer::start().unwrap();
    let (ca, cb) = (cache(&server, "app:").await, cache(&server, "app:").await);
    let a = CacheStrategies::from_redis_cache(&ca).await.unwrap();
    let b = CacheStrategies::from_redis_cache(&cb).await.unwrap();
    assert!(a.is_distributed());
    support::dependency_graph(&a, &b).await;
    support::tags(&a).await;
    support::pattern(&a).await;
    support::local_event(&a).await;
    support::time_based(&a).await;
    let flags = server
        .cli(&["CONFIG", "GET", "notify-keyspace-events"])
        .unwrap();
    assert!(
        flags.contains('E') && flags.contains('x'),
        "keyspace notifications on: {flags}"
    );
    // Proof that the notification, not a timer, drives the callback: the key expires long
    // before the registered TTL, and the callback follows at once.
    a.cache().set("app-ks", &1).await.unwrap();
    let fired = Arc::new(AtomicUsize::new(0));
    let count = fired.clone();
    a.time_based_invalidation("app-ks", HOUR, move |_| {
        count.fetch_add(1, Ordering::SeqCst);
    })
    .await
    .unwrap();
    server.cli(&["PEXPIRE", "app:app-ks", "20"]).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || fired.load(Ordering::SeqCst) == 1).await,
        "expired event delivered"
    );
    // The graph lives inside the prefix, in one hash slot; its edges stay (declared facts),
    // each set expiring with its last edge: nothing in it lives forever.
    let count = |script: &str| -> i64 {
        server
            .cli(&["EVAL", script, "0", "app:__ncm:{ncm-deps}*"])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let all = count("return #redis.call('KEYS', ARGV[1])");
    let forever = count(
        "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
         if redis.call('PTTL', k) < 0 then n = n + 1 end end return n",
    );
    assert!(all > 0, "the declared edges are kept");
    assert_eq!(forever, 0, "{forever} of {all} graph keys never expire");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_based_invalidation_falls_back_to_timers_when_config_is_refused() {
    let server = RedisServer::builder()
        .args(["--rename-command", "CONFIG", ""])
        .start()
        .unwrap();
    let c = cache(&server, "").await;
    let s = CacheStrategies::from_redis_cache(&c).await.unwrap();
    support::time_based(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_triggered_on_one_instance_run_on_another() {
    let server = RedisServer::start().unwrap();
    // Each instance keeps its own (local) cache; Redis only coordinates.
    let (a, b) = local_pair(&server, "ev:").await;

    let calls_a = Arc::new(AtomicUsize::new(0));
    let calls_b = Arc::new(Mutex::new(Vec::new()));
    for k in ["user:123", "user:456"] {
        b.cache().set(k, &k).await.unwrap();
    }
    a.cache().set("user:123", &"a").await.unwrap();
    let sink = calls_b.clone();
    b.event_based_invalidation("user_updated", ["user:123", "user:456"], move |e, keys| {
        sink.lock().unwrap().push((e.to_owned(), keys.len()));
    })
    .await
    .unwrap();
    let count = calls_a.clone();
    a.event_based_invalidation("user_updated", ["user:123"], move |_, _| {
        count.fetch_add(1, Ordering::SeqCst);
    })
    .await
    .unwrap();

    assert_eq!(
        a.trigger_event_invalidation("user_updated").await.unwrap(),
        1
    );
    assert_eq!(
        calls_a.load(Ordering::SeqCst),
        1,
        "A ran its handler at once"
    );
    assert!(
        eventually(Duration::from_secs(5), || calls_b.lock().unwrap().len()
            == 1)
        .await,
        "B's callback ran"
    );
    assert!(!b.cache().exists("user:123").await.unwrap());
    assert!(!b.cache().exists("user:456").await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        calls_a.load(Ordering::SeqCst),
        1,
        "A ignored its own message"
    );
    assert_eq!(*calls_b.lock().unwrap(), [("user_updated".to_string(), 2)]);
    assert!(b.invalidation_stats().remote_messages >= 1);

    // Deletions reach the other instance's local cache too.
    let (store, db) = database("around");
    b.cache().set("user:9", &"stale").await.unwrap();
    a.write_around("user:9", &"fresh".to_string(), &store)
        .await
        .unwrap();
    assert_eq!(db.get("user:9").as_deref(), Some("fresh"));
    let deleted = eventually_async(Duration::from_secs(5), || async {
        !b.cache().exists("user:9").await.unwrap()
    })
    .await;
    assert!(deleted, "write-around invalidated B's local copy");
    b.cache().set("dep:user:1", &"stale").await.unwrap();
    a.dependency_based_invalidation("dep:user:1", ["dep:profile:1"])
        .await
        .unwrap();
    assert_eq!(
        b.invalidate_dependencies("dep:profile:1").await.unwrap(),
        1,
        "shared graph"
    );
    assert!(!b.cache().exists("dep:user:1").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_write_behind_coalesces_and_leaves_an_empty_stream() {
    let server = RedisServer::start().unwrap();
    let c = cache(&server, "").await;
    let s = durable_strategies(&c).await;
    let (store, db) = database("orders");
    support::write_behind_coalesces(&s, &store, &db, 20_000, 200).await;
    assert_eq!(
        server.cli(&["XLEN", "__ncm:wb:{orders}"]).unwrap().trim(),
        "0"
    );
    let consumers = server
        .cli(&["SMEMBERS", "__ncm:wb:{orders}:consumers"])
        .unwrap();
    assert!(consumers.trim().is_empty(), "left the group: {consumers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_dead_letters_replay_and_are_adopted_after_shutdown() {
    let server = RedisServer::start().unwrap();
    let c = cache(&server, "").await;
    let s = durable_strategies(&c).await;
    let (store, db) = database("ledger");
    support::dead_letters(&s, &store, &db).await;
    s.shutdown().await.unwrap();
    assert_eq!(
        server.cli(&["XLEN", "__ncm:wb:{ledger}"]).unwrap().trim(),
        "0"
    );

    // A process stops with dead letters: they stay journaled, and another adopts them.
    let s1 = durable_strategies(&c).await;
    let (store1, db1) = database("payments");
    db1.failing.store(true, Ordering::SeqCst);
    for i in 0..5 {
        s1.write_behind(
            &format!("p{i}"),
            &format!("v{i}"),
            HOUR,
            &store1,
            Duration::ZERO,
        )
        .await
        .unwrap();
    }
    assert!(s1.shutdown().await.is_err(), "stopped with dead letters");
    drop(s1);
    let s2 = durable_strategies(&c).await;
    let (store2, db2) = database("payments");
    let q2 = s2.write_behind_queue(&store2).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while db2.len() < 5 && Instant::now() < deadline {
        q2.recover().await.unwrap();
        q2.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        db2.len(),
        5,
        "the second process persisted the first one's dead letters"
    );
    assert_eq!(db2.get("p3").as_deref(), Some("v3"));
    assert_eq!(q2.stats().recovered, 5);
    s2.shutdown().await.unwrap();
    assert_eq!(
        server.cli(&["XLEN", "__ncm:wb:{payments}"]).unwrap().trim(),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graph_tags_events_and_durable_write_behind_on_a_cluster() {
    let cluster = RedisCluster::start().unwrap();
    let connect = || async {
        let mut c = RedisConfig::default();
        c.cluster_nodes = cluster.node_urls();
        c.response_timeout = Duration::from_secs(2);
        c.connect_timeout = Duration::from_secs(2);
        c.health_check_interval = None;
        RedisCache::connect(c).await.unwrap()
    };
    let (ca, cb) = (connect().await, connect().await);
    let a = durable_strategies(&ca).await;
    let b = durable_strategies(&cb).await;
    // The graph's Lua walks stay in one slot ({ncm-deps}); deletions spread over the nodes.
    support::dependency_graph(&a, &b).await;
    support::tags(&a).await;
    support::pattern(&a).await;
    support::local_event(&a).await;
    support::time_based(&a).await; // timers: notifications are per node on a cluster
    let (store, db) = database("cluster-orders");
    support::write_behind_coalesces(&a, &store, &db, 8_000, 80).await;
    // Direct writes supersede a durable write-behind waiting in the queue (the journal's keys
    // and the worker's acknowledgments on a cluster).
    support::direct_writes_supersede_a_waiting_write_behind(&b).await;
    // ... and one waiting in another instance's queue (each instance its own consumer).
    let (a, b) = (
        durable_strategies_leased(&ca, SLOW_LEASE).await,
        durable_strategies_leased(&cb, SLOW_LEASE).await,
    );
    support::a_write_through_supersedes_another_instances_write_behind(&a, &b, "cluster-x").await;
}

/// A consumer lease longer than any wait of the tests that use it.
const SLOW_LEASE: Duration = Duration::from_secs(5);

const CHILD: &str = "NCM_STRATEGIES_SIGKILL_CHILD_URL";
const WRITES: usize = 500;
const KEYS: usize = 400;

/// The child: acknowledges `WRITES` durable writes (due in an hour), says so, and waits to be
/// killed.
async fn acknowledge_and_wait(url: &str) {
    let c = RedisCache::connect(config(url, "")).await.unwrap();
    let s = durable_strategies(&c).await;
    let (store, _db) = database("sigkill");
    for i in 0..WRITES {
        s.write_behind(
            &format!("k{}", i % KEYS),
            &format!("v{i}"),
            HOUR,
            &store,
            HOUR,
        )
        .await
        .unwrap();
    }
    println!("NCM_CHILD_ACKED {WRITES}");
    tokio::time::sleep(Duration::from_secs(60)).await;
    eprintln!("child was not killed");
    std::process::exit(3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_write_behind_survives_sigkill() {
    if let Ok(url) = std::env::var(CHILD) {
        return acknowledge_and_wait(&url).await;
    }
    let server = RedisServer::start().unwrap();
    let url = server.url();
    let child = ncm_cache_testkit::kill_child_after_marker(
        "durable_write_behind_survives_sigkill",
        (CHILD, &url),
        "NCM_CHILD_ACKED",
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(
        child.reached_marker,
        "the child acknowledged its writes (status {:?})",
        child.status
    );
    assert!(
        !child.status.success(),
        "killed before flushing: {:?}",
        child.status
    );
    let journaled: usize = server
        .cli(&["XLEN", "__ncm:wb:{sigkill}"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        journaled, WRITES,
        "every acknowledged write is in the stream"
    );

    let dead = only_consumer(&server, "__ncm:wb:{sigkill}");

    // A new process replays them.
    let c = cache(&server, "").await;
    let s = durable_strategies(&c).await;
    let (store, db) = database("sigkill");
    let queue = s.write_behind_queue(&store).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.len() < KEYS && Instant::now() < deadline {
        queue.recover().await.unwrap();
        queue.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(db.len(), KEYS, "every key reached the store");
    for k in 0..KEYS {
        let last = if k + KEYS < WRITES { k + KEYS } else { k };
        assert_eq!(
            db.get(&format!("k{k}")),
            Some(format!("v{last}")),
            "key k{k}"
        );
    }
    let stats = queue.stats();
    assert_eq!(stats.recovered, WRITES as u64, "{stats:?}");
    // The dead consumer is removed by a pass that finds it with nothing left pending: the pass
    // that claimed its last entries, or (when that one's removal met a failure, or ran beside
    // another pass still claiming) a later one — seen once under a loaded CI run.
    let consumers = || {
        server
            .cli(&["SMEMBERS", "__ncm:wb:{sigkill}:consumers"])
            .unwrap()
            .trim()
            .to_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while consumers().contains(&dead) && Instant::now() < deadline {
        let _ = queue.recover().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.shutdown().await.unwrap();
    assert_eq!(
        server.cli(&["XLEN", "__ncm:wb:{sigkill}"]).unwrap().trim(),
        "0"
    );
    let left = consumers();
    assert!(left.is_empty(), "the dead consumer was removed: {left}");
}

/// A store that keeps each key's version and refuses older ones (`UPDATE … WHERE version < $v`).
#[derive(Default)]
struct VersionedTable(Mutex<std::collections::HashMap<String, (String, u128)>>);

#[ncm_cache_strategies::async_trait]
impl ncm_cache_strategies::PersistentStore<String> for VersionedTable {
    async fn store(
        &self,
        _key: &str,
        _value: &String,
    ) -> Result<(), ncm_cache_strategies::StoreError> {
        Err("this store only takes versioned batches".into())
    }
    async fn store_batch_versioned(
        &self,
        entries: &[(String, String)],
        versions: &[ncm_cache_strategies::WriteVersion],
    ) -> Result<(), ncm_cache_strategies::StoreError> {
        let mut rows = self.0.lock().unwrap();
        for ((key, value), version) in entries.iter().zip(versions) {
            let v = version.as_u128();
            let row = rows.entry(key.clone()).or_insert((String::new(), 0));
            if row.1 < v {
                *row = (value.clone(), v);
            }
        }
        Ok(())
    }
}

/// Durable write-behind hands the store each write's stream id: increasing per key across
/// instances, so a conditional store keeps the newest value whatever order batches arrive in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_sees_each_writes_stream_id_in_write_order() {
    let server = RedisServer::start().unwrap();
    let (ca, cb) = (cache(&server, "").await, cache(&server, "").await);
    let table = Arc::new(VersionedTable::default());
    let store =
        ncm_cache_strategies::Store::new(SharedTable(Arc::clone(&table))).named("versioned");
    let a = durable_strategies(&ca).await;
    let b = durable_strategies(&cb).await;
    let qa = a.write_behind_queue(&store).await.unwrap();
    let qb = b.write_behind_queue(&store).await.unwrap();
    for round in 0..5u32 {
        let (q, who) = if round % 2 == 0 {
            (&qa, "a")
        } else {
            (&qb, "b")
        };
        for k in 0..20 {
            q.write(
                &format!("k{k}"),
                &format!("{who}{round}"),
                HOUR,
                Duration::ZERO,
            )
            .await
            .unwrap();
        }
    }
    qa.flush().await.unwrap();
    qb.flush().await.unwrap();
    let rows = table.0.lock().unwrap().clone();
    assert_eq!(rows.len(), 20);
    for (key, (value, version)) in rows {
        assert_eq!(value, "a4", "{key}");
        assert!(version > 0, "a durable write's version is its stream id");
    }
}

/// `Store::new` takes the implementation by value; share one table between the two instances.
struct SharedTable(Arc<VersionedTable>);

#[ncm_cache_strategies::async_trait]
impl ncm_cache_strategies::PersistentStore<String> for SharedTable {
    async fn store(
        &self,
        key: &str,
        value: &String,
    ) -> Result<(), ncm_cache_strategies::StoreError> {
        self.0.store(key, value).await
    }
    async fn store_batch_versioned(
        &self,
        entries: &[(String, String)],
        versions: &[ncm_cache_strategies::WriteVersion],
    ) -> Result<(), ncm_cache_strategies::StoreError> {
        self.0.store_batch_versioned(entries, versions).await
    }
}

/// The one consumer registered for journal `stream` (a crashed process's).
fn only_consumer(server: &RedisServer, stream: &str) -> String {
    let dead = server
        .cli(&["SMEMBERS", &format!("{stream}:consumers")])
        .unwrap()
        .trim()
        .to_owned();
    assert!(!dead.is_empty() && !dead.contains('\n'), "{dead:?}");
    dead
}

/// Appends to journal `stream` an entry of `key` that cannot be decoded, pending with
/// `consumer`.
fn pending_undecodable_entry(server: &RedisServer, stream: &str, consumer: &str, key: &str) {
    let id = server
        .cli(&["XADD", stream, "*", "k", key, "v", "not a value"])
        .unwrap();
    server
        .cli(&[
            "XCLAIM",
            stream,
            "ncm-wb",
            consumer,
            "0",
            id.trim(),
            "FORCE",
            "JUSTID",
        ])
        .unwrap();
}

/// An entry of a dead consumer that cannot be decoded (another writer's format, damage) goes
/// to the queue's dead-entry stream when adopted, instead of staying in the journal forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_journal_entries_go_to_the_dead_entry_stream() {
    let server = RedisServer::start().unwrap();
    let stream = "__ncm:wb:{ghosts}";
    server
        .cli(&["XGROUP", "CREATE", stream, "ncm-wb", "$", "MKSTREAM"])
        .unwrap();
    pending_undecodable_entry(&server, stream, "ghost", "order:1");
    server
        .cli(&["SADD", "__ncm:wb:{ghosts}:consumers", "ghost"])
        .unwrap();
    let c = cache(&server, "").await;
    let s = durable_strategies(&c).await;
    let (store, db) = database("ghosts");
    let queue = s.write_behind_queue(&store).await.unwrap();
    // Entries are adopted once idle for `claim_min_idle` (50 ms here).
    tokio::time::sleep(Duration::from_millis(100)).await;
    queue.recover().await.unwrap();
    let len = |key: &str| -> u64 { server.cli(&["XLEN", key]).unwrap().trim().parse().unwrap() };
    assert_eq!(len(stream), 0, "the bad entry left the journal");
    assert_eq!(
        len("__ncm:wb:{ghosts}:dead"),
        1,
        "and is kept for inspection"
    );
    let kept = server
        .cli(&["XRANGE", "__ncm:wb:{ghosts}:dead", "-", "+"])
        .unwrap();
    assert!(
        kept.contains("order:1") && kept.contains("not a value"),
        "{kept}"
    );
    let members = server
        .cli(&["SMEMBERS", "__ncm:wb:{ghosts}:consumers"])
        .unwrap();
    assert!(!members.contains("ghost"), "{members}");
    assert_eq!(db.len(), 0);
    s.shutdown().await.unwrap();
}

/// A process that wrote `n` durable writes (`k{i}` = `v{i}`, due in an hour) to the queue of
/// `store` and was killed: its runtime is dropped without the queue's drop (which would flush).
fn crashed_with_pending_writes(url: &str, store: &'static str, n: usize) {
    crashed_with_pending_writes_leased(url, store, n, Duration::from_millis(500));
}

/// [`crashed_with_pending_writes`] by a process whose lease was `lease`.
fn crashed_with_pending_writes_leased(url: &str, store: &'static str, n: usize, lease: Duration) {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = RedisCache::connect(config(&url, "")).await.unwrap();
            let s = durable_strategies_leased(&c, lease).await;
            let (store, _) = database(store);
            let queue = s.write_behind_queue(&store).await.unwrap();
            for i in 0..n {
                queue
                    .write(&format!("k{i}"), &format!("v{i}"), HOUR, HOUR)
                    .await
                    .unwrap();
            }
            std::mem::forget(queue);
            std::mem::forget(s);
            std::mem::forget(c);
        });
        drop(rt);
    })
    .join()
    .unwrap();
}

/// A crashed process left 50 pending writes; the process adopting them has `max_pending` 10:
/// it never holds more than 10 at once, and still persists all 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adoption_respects_max_pending() {
    let server = RedisServer::start().unwrap();
    let url = server.url();
    crashed_with_pending_writes(&url, "bounded", 50);
    // Past the dead process's lease (500 ms).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let c = cache(&server, "").await;
    let s = CacheStrategies::builder(c.cache().clone())
        .redis(c.redis_backend().clone())
        .write_behind(durable(&c).max_pending(10))
        .build()
        .await
        .unwrap();
    let (store, db) = database("bounded");
    let queue = s.write_behind_queue(&store).await.unwrap();
    let mut most = queue.pending();
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.len() < 50 && Instant::now() < deadline {
        queue.recover().await.unwrap();
        most = most.max(queue.pending());
        queue.flush().await.unwrap();
    }
    assert_eq!(db.len(), 50, "every adopted write reached the store");
    assert!(most <= 10, "held {most} pending writes with max_pending 10");
    s.shutdown().await.unwrap();
}

/// A recovery pass that fails part-way (here: a bad entry after 20 good ones, whose move to the
/// `:dead` stream fails because that key holds a string) keeps the writes it had already
/// claimed: they are persisted. Before, the error dropped them, and they stayed in the adopting
/// process's own pending list, where no later pass looks (review, helper-69).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_pass_that_fails_part_way_keeps_what_it_claimed() {
    let server = RedisServer::start().unwrap();
    let url = server.url();
    crashed_with_pending_writes(&url, "partway", 20);
    let stream = "__ncm:wb:{partway}";
    let dead = only_consumer(&server, stream);
    // A bad entry, newest, pending with the crashed consumer; its burial will fail.
    pending_undecodable_entry(&server, stream, &dead, "bad");
    server
        .cli(&["SET", "__ncm:wb:{partway}:dead", "not a stream"])
        .unwrap();
    // Past the crashed process's lease (500 ms).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let c = cache(&server, "").await;
    let s = durable_strategies(&c).await;
    let (store, db) = database("partway");
    // Creating the queue runs a first pass.
    let queue = s.write_behind_queue(&store).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while db.len() < 20 && Instant::now() < deadline {
        let _ = queue.recover().await;
        queue.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        db.len(),
        20,
        "the claimed writes of a failed pass were never persisted"
    );
    s.shutdown().await.unwrap();
}

/// A store whose writes land at once but whose reply comes `delay` later (a slow database).
struct SlowReplyStore {
    rows: Arc<Mutex<std::collections::HashMap<String, String>>>,
    delay: Duration,
}

#[ncm_cache_strategies::async_trait]
impl ncm_cache_strategies::PersistentStore<String> for SlowReplyStore {
    async fn store(
        &self,
        key: &str,
        value: &String,
    ) -> Result<(), ncm_cache_strategies::StoreError> {
        self.rows
            .lock()
            .unwrap()
            .insert(key.to_owned(), value.clone());
        tokio::time::sleep(self.delay).await;
        Ok(())
    }
}

/// Two instances write-through one key at once: A's store write lands first but replies late,
/// B's lands second and replies at once, so B writes the cache first and A last. The cache must
/// not end older than the store (before: A's value stayed cached, the store held B's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_write_through_of_one_key_never_leaves_the_cache_older_than_the_store() {
    let server = RedisServer::start().unwrap();
    let (ca, cb) = (cache(&server, "app:").await, cache(&server, "app:").await);
    let a = CacheStrategies::from_redis_cache(&ca).await.unwrap();
    let b = CacheStrategies::from_redis_cache(&cb).await.unwrap();
    let rows = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let slow = ncm_cache_strategies::Store::new(SlowReplyStore {
        rows: Arc::clone(&rows),
        delay: Duration::from_millis(300),
    });
    let fast = ncm_cache_strategies::Store::new(SlowReplyStore {
        rows: Arc::clone(&rows),
        delay: Duration::ZERO,
    });
    for round in 0..3 {
        let (va, vb) = (format!("a{round}"), format!("b{round}"));
        let write_a = {
            let (a, slow, va) = (a.clone(), slow.clone(), va.clone());
            tokio::spawn(async move { a.write_through("k", &va, HOUR, &slow).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.write_through("k", &vb, HOUR, &fast).await.unwrap();
        write_a.await.unwrap().unwrap();
        let stored = rows.lock().unwrap().get("k").cloned();
        assert_eq!(
            stored.as_deref(),
            Some(vb.as_str()),
            "the store applied B last"
        );
        let cached: Option<String> = a.cache().get("k").await.unwrap();
        assert!(
            cached.is_none() || cached == stored,
            "round {round}: the cache holds {cached:?} while the store holds {stored:?}"
        );
    }
}

/// Declared dependencies are facts, shared by the instances: a walk from one dependency leaves
/// the dependent's other edges (before: invalidating `profile:1` also dropped
/// `user:1 → settings:1`); an edge ends with its dependent's TTL or its deletion, so the graph
/// in Redis is bounded by the keys alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_edges_persist_until_their_key_is_deleted_or_expires() {
    let server = RedisServer::start().unwrap();
    let (ca, cb) = (cache(&server, "app:").await, cache(&server, "app:").await);
    let a = CacheStrategies::from_redis_cache(&ca).await.unwrap();
    let b = CacheStrategies::from_redis_cache(&cb).await.unwrap();
    a.set_with_dependencies("user:1", &"u1", HOUR, ["profile:1", "settings:1"])
        .await
        .unwrap();
    assert_eq!(b.invalidate_dependencies("profile:1").await.unwrap(), 1);
    assert_eq!(a.cache().get::<String>("user:1").await.unwrap(), None);
    // Cached again with a plain set: the declared edge to settings:1 still reaches it.
    a.cache().set("user:1", &"u1 again").await.unwrap();
    assert_eq!(b.invalidate_dependencies("settings:1").await.unwrap(), 1);
    assert_eq!(a.cache().get::<String>("user:1").await.unwrap(), None);
    // Deleting the key ends its edges.
    a.invalidate("user:1").await.unwrap();
    assert_eq!(b.invalidate_dependencies("settings:1").await.unwrap(), 0);
    // An edge lives as long as its key's TTL.
    a.set_with_dependencies("short:1", &"s", Duration::from_millis(300), ["root:1"])
        .await
        .unwrap();
    let graph = "app:__ncm:{ncm-deps}:d:k:root:1";
    assert_eq!(server.cli(&["EXISTS", graph]).unwrap().trim(), "1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        server.cli(&["EXISTS", graph]).unwrap().trim(),
        "0",
        "the edge set outlived its only edge"
    );
    assert_eq!(b.invalidate_dependencies("root:1").await.unwrap(), 0);
}

/// A Redis restart loses `notify-keyspace-events` (a `CONFIG SET`): the listener sets it again
/// when it reconnects, so time-based callbacks keep firing on expiry (before: they stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_based_callbacks_survive_a_redis_restart() {
    let mut server = RedisServer::start().unwrap();
    let c = cache(&server, "app:").await;
    let s = CacheStrategies::from_redis_cache(&c).await.unwrap();
    let fired = Arc::new(AtomicUsize::new(0));
    let register = |key: &'static str| {
        let (s, fired) = (s.clone(), Arc::clone(&fired));
        async move {
            s.cache().set(key, &1).await.unwrap();
            assert!(
                s.time_based_invalidation(key, HOUR, move |_| {
                    fired.fetch_add(1, Ordering::SeqCst);
                })
                .await
                .unwrap()
            );
        }
    };
    register("before").await;
    server.cli(&["PEXPIRE", "app:before", "20"]).unwrap();
    assert!(eventually(Duration::from_secs(3), || fired.load(Ordering::SeqCst) == 1).await);
    server.restart().unwrap();
    // Until the cache and the listener are back.
    let start = Instant::now();
    while s.cache().set("probe", &1).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "no reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flags = || {
        server
            .cli(&["CONFIG", "GET", "notify-keyspace-events"])
            .unwrap()
    };
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            let f = flags();
            f.contains('E') && f.contains('x')
        })
        .await,
        "notifications not enabled again after the restart: {}",
        flags()
    );
    register("after").await;
    server.cli(&["PEXPIRE", "app:after", "20"]).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || fired.load(Ordering::SeqCst) == 2).await,
        "the expiry after the restart fired no callback"
    );
}

/// Event registrations live in Redis: an event triggered on an instance that registered
/// nothing deletes the keys another instance registered, also after that one is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_registrations_are_shared_through_redis() {
    let server = RedisServer::start().unwrap();
    let (ca, cb) = (cache(&server, "app:").await, cache(&server, "app:").await);
    {
        let a = CacheStrategies::from_redis_cache(&ca).await.unwrap();
        a.event_based_invalidation("user_updated", ["ev:user:1", "ev:user:2"], |_, _| {})
            .await
            .unwrap();
        a.shutdown().await.unwrap();
    }
    let b = CacheStrategies::from_redis_cache(&cb).await.unwrap();
    b.cache().set("ev:user:1", &1).await.unwrap();
    b.cache().set("ev:user:2", &2).await.unwrap();
    assert!(b.registered_events().is_empty());
    assert_eq!(
        b.trigger_event_invalidation("user_updated").await.unwrap(),
        2
    );
    assert!(!b.cache().exists("ev:user:1").await.unwrap());
    assert!(!b.cache().exists("ev:user:2").await.unwrap());
}

/// An instance with a cache of its own empties it when its invalidation channel reconnects:
/// invalidations sent by others during the break may have been lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_cache_is_resynchronised_after_the_channel_reconnects() {
    let server = RedisServer::start().unwrap();
    let c = cache(&server, "app:").await;
    let local = Cache::new(MemoryBackend::new(), Serializer::default());
    let s = CacheStrategies::builder(local.clone())
        .redis(c.redis_backend().clone())
        .build()
        .await
        .unwrap();
    local.set("mine", &1).await.unwrap();
    server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            !local.exists("mine").await.unwrap()
        })
        .await,
        "the local cache kept a value across a break in the invalidation channel"
    );
    assert!(s.is_distributed());
}

/// `set_with_dependencies` on a Redis that holds both the cache and the graph: one round trip
/// (measured through a proxy adding 100 ms each way), and the edges and the value are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_with_dependencies_is_one_round_trip() {
    let server = RedisServer::start().unwrap();
    let proxy = ncm_cache_testkit::FaultProxy::start(server.addr()).unwrap();
    let c = RedisCache::connect(config(&proxy.url(), "app:"))
        .await
        .unwrap();
    let s = CacheStrategies::from_redis_cache(&c).await.unwrap();
    s.set_with_dependencies("warm", &0, HOUR, ["warm-dep"])
        .await
        .unwrap();
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Delay(Duration::from_millis(
        100,
    )));
    let start = Instant::now();
    s.set_with_dependencies("order:1", &"o1", HOUR, ["user:1", "cart:1"])
        .await
        .unwrap();
    let took = start.elapsed();
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    assert!(
        took < Duration::from_millis(350),
        "{took:?}: more than one round trip of 200 ms"
    );
    assert_eq!(
        s.cache().get::<String>("order:1").await.unwrap().as_deref(),
        Some("o1")
    );
    assert_eq!(s.invalidate_dependencies("cart:1").await.unwrap(), 1);
    assert_eq!(s.cache().get::<String>("order:1").await.unwrap(), None);
}

/// A write-behind whose cache write times out but lands all the same (the connection stalled,
/// then healed) is refused and its value removed from the cache: the cache does not keep a value
/// the store never gets, while the key's older acknowledged write is persisted (review,
/// helper-69: "big" stayed cached for its TTL while the store held "small").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_behind_whose_cache_write_landed_is_removed() {
    let server = RedisServer::start().unwrap();
    let proxy = ncm_cache_testkit::FaultProxy::start(server.addr()).unwrap();
    let mut cfg = config(&proxy.url(), "wb:");
    cfg.response_timeout = Duration::from_millis(300);
    let c = RedisCache::connect(cfg).await.unwrap();
    let s = CacheStrategies::from_redis_cache(&c).await.unwrap();
    let (store, db) = database("landed");
    let queue = s.write_behind_queue(&store).await.unwrap();
    queue
        .write("k", &"small".to_string(), HOUR, Duration::from_millis(300))
        .await
        .unwrap();
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Stall);
    let err = queue
        .write("k", &"big".to_string(), HOUR, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    // The stalled SET reaches the server once the connection heals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    queue.flush().await.unwrap();
    assert_eq!(db.get("k").as_deref(), Some("small"));
    let direct = cache(&server, "wb:").await;
    assert!(
        eventually_async(Duration::from_secs(2), || async {
            direct.get::<String>("k").await.unwrap().as_deref() != Some("big")
        })
        .await,
        "the cache kept a refused write's value that the store never got"
    );
}

/// A write whose cache write fails after its journal append (here: a value above the cache's
/// size cap) is withdrawn — and the key's older acknowledged write is still stored (the newest-id
/// record goes back to it; before, the older write was skipped as superseded and lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_write_does_not_supersede_the_older_acknowledged_one() {
    let server = RedisServer::start().unwrap();
    let mut cfg = config(&server.url(), "");
    cfg.max_value_size = 64;
    let c = RedisCache::connect(cfg).await.unwrap();
    let s = durable_strategies(&c).await;
    let (store, db) = database("withdraw");
    let queue = s.write_behind_queue(&store).await.unwrap();
    queue
        .write("k", &"small".to_string(), HOUR, Duration::from_millis(200))
        .await
        .unwrap();
    let err = queue
        .write("k", &"x".repeat(1000), HOUR, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ncm_cache_core::CacheError::ValueTooLarge { .. }),
        "{err:?}"
    );
    queue.flush().await.unwrap();
    assert_eq!(
        db.get("k").as_deref(),
        Some("small"),
        "the acknowledged write was lost"
    );
    assert_eq!(
        server.cli(&["XLEN", "__ncm:wb:{withdraw}"]).unwrap().trim(),
        "0"
    );
    s.shutdown().await.unwrap();
}

/// A Redis (journal) outage of a second or two while a durable batch comes due: the batch
/// waits for the journal (up to the consumer's lease) instead of spending the store's retries,
/// so a healthy store gets every write and nothing is dead-lettered (review, helper-69: the
/// whole batch became dead letters within milliseconds of the outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_outage_during_a_flush_does_not_dead_letter_the_batch() {
    let server = RedisServer::start().unwrap();
    let proxy = ncm_cache_testkit::FaultProxy::start(server.addr()).unwrap();
    let mut cfg = config(&proxy.url(), "");
    cfg.response_timeout = Duration::from_millis(300);
    cfg.connect_timeout = Duration::from_millis(300);
    let c = RedisCache::connect(cfg).await.unwrap();
    let local = Cache::new(MemoryBackend::new(), Serializer::default());
    let d = DurableConfig::new(c.redis_backend().clone())
        .lease(Duration::from_secs(10))
        .claim_min_idle(Duration::from_millis(50));
    let s = CacheStrategies::builder(local)
        .redis(c.redis_backend().clone())
        .write_behind(
            WriteBehindConfig::default()
                .max_retries(2)
                .retry_backoff(Duration::from_millis(5))
                .durable(d),
        )
        .build()
        .await
        .unwrap();
    let (store, db) = database("outage");
    let queue = s.write_behind_queue(&store).await.unwrap();
    for i in 0..20 {
        queue
            .write(
                &format!("k{i}"),
                &format!("v{i}"),
                HOUR,
                Duration::from_millis(200),
            )
            .await
            .unwrap();
    }
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Refuse);
    proxy.cut();
    // The batch comes due during the outage.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    queue.flush().await.unwrap();
    assert!(
        queue.dead_letters().is_empty(),
        "{} writes dead-lettered by a journal outage",
        queue.dead_letters().len()
    );
    for i in 0..20 {
        assert_eq!(db.get(&format!("k{i}")), Some(format!("v{i}")), "k{i}");
    }
    s.shutdown().await.unwrap();
}

/// The journal side of a queue over a [`Flaky`] local cache, with `config` for the journal's
/// connection: only the journal talks to Redis.
async fn flaky_queue(
    journal: RedisConfig,
    store: &ncm_cache_strategies::Store<String>,
) -> (
    CacheStrategies,
    Flaky,
    Cache<Serializer>,
    ncm_cache_strategies::WriteBehind<String>,
) {
    flaky_queue_over(journal, store, Flaky::default()).await
}

/// [`flaky_queue`] over a given cache (shared by two instances, as Redis would be).
async fn flaky_queue_over(
    journal: RedisConfig,
    store: &ncm_cache_strategies::Store<String>,
    flaky: Flaky,
) -> (
    CacheStrategies,
    Flaky,
    Cache<Serializer>,
    ncm_cache_strategies::WriteBehind<String>,
) {
    let c = RedisCache::connect(journal).await.unwrap();
    let local = Cache::new(flaky.clone(), Serializer::default());
    let s = CacheStrategies::builder(local.clone())
        .redis(c.redis_backend().clone())
        .write_behind(durable(&c))
        .build()
        .await
        .unwrap();
    let queue = s.write_behind_queue(store).await.unwrap();
    (s, flaky, local, queue)
}

/// After a flush, the acknowledged write is stored (or the newer unacknowledged one, which may
/// or may not have happened), cache and store agree, and the journal is empty.
async fn acknowledged_write_survived(
    server: &RedisServer,
    stream: &str,
    db: &support::Database,
    local: &Cache<Serializer>,
) {
    let stored = db.get("k");
    assert!(
        matches!(stored.as_deref(), Some("small" | "big")),
        "the acknowledged write was lost: the store holds {stored:?}"
    );
    let cached: Option<String> = local.get("k").await.unwrap();
    assert!(
        cached.is_none() || cached == stored,
        "the cache holds {cached:?} but the store {stored:?}"
    );
    assert_eq!(
        server.cli(&["XLEN", stream]).unwrap().trim(),
        "0",
        "a journal entry was left behind"
    );
}

/// A write whose journal append timed out but ran late (Redis stalled, then caught up) left an
/// entry this process did not know: the older acknowledged write was judged superseded by it and
/// acknowledged without being stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_append_that_lands_late_does_not_lose_the_older_acknowledged_write() {
    let server = RedisServer::start().unwrap();
    let proxy = ncm_cache_testkit::FaultProxy::start(server.addr()).unwrap();
    let mut cfg = config(&proxy.url(), "");
    cfg.response_timeout = Duration::from_millis(300);
    let (store, db) = database("late");
    let (s, _flaky, local, queue) = flaky_queue(cfg, &store).await;
    queue
        .write("k", &"small".to_string(), HOUR, Duration::from_millis(500))
        .await
        .unwrap();
    let newest = || {
        server
            .cli(&["HGET", "__ncm:wb:{late}:newest", "k"])
            .unwrap()
    };
    let first = newest();
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Stall);
    let err = queue.write("k", &"big".to_string(), HOUR, HOUR).await;
    assert!(err.is_err(), "the append was meant to time out");
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    assert!(
        eventually(Duration::from_secs(3), || newest() != first).await,
        "scenario not reproduced: the timed-out append never landed"
    );
    queue.flush().await.unwrap();
    acknowledged_write_survived(&server, "__ncm:wb:{late}", &db, &local).await;
    s.shutdown().await.unwrap();
}

/// A write whose caller stops waiting after its journal append (here: while its cache write
/// hangs) is not left orphaned in the journal: before, it stayed pending under this live consumer,
/// the key's older acknowledged write was then judged superseded by it and acknowledged without
/// being stored, and the orphan itself was stored only when the process exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_write_does_not_make_the_older_acknowledged_one_superseded() {
    let server = RedisServer::start().unwrap();
    let (store, db) = database("cancelled");
    let (s, flaky, local, queue) = flaky_queue(config(&server.url(), ""), &store).await;
    queue
        .write("k", &"small".to_string(), HOUR, Duration::from_millis(200))
        .await
        .unwrap();
    flaky.hang_sets.store(true, Ordering::SeqCst);
    let big = "big".to_string();
    // "k" has an older acknowledged write waiting; "solo" has none (nothing would ever fence
    // its orphan before the process exits).
    for key in ["k", "solo"] {
        let gave_up = tokio::time::timeout(
            Duration::from_millis(150),
            queue.write(key, &big, HOUR, HOUR),
        )
        .await;
        assert!(gave_up.is_err(), "the cache write was meant to hang");
    }
    flaky.hang_sets.store(false, Ordering::SeqCst);
    queue.flush().await.unwrap();
    let cached: Option<String> = local.get("solo").await.unwrap();
    assert!(
        cached.is_none() || cached == db.get("solo"),
        "the cache holds {cached:?} but the store {:?}",
        db.get("solo")
    );
    acknowledged_write_survived(&server, "__ncm:wb:{cancelled}", &db, &local).await;
    s.shutdown().await.unwrap();
}

/// The fence judged an older acknowledged write of `k` superseded (and acknowledged it) while a
/// newer write of `k` was between its journal append and its cache write; that cache write then
/// failed and the newer write was withdrawn: neither value was ever stored. `same` runs the newer
/// write on the instance that queued the older one; otherwise on a second instance (another
/// consumer of the journal, over the same cache).
async fn superseded_by_a_write_that_is_then_withdrawn(same: bool, name: &str) {
    let server = RedisServer::start().unwrap();
    let (store, db) = database(name);
    let (sa, flaky, local, a) = flaky_queue(config(&server.url(), ""), &store).await;
    let second = if same {
        None
    } else {
        Some(flaky_queue_over(config(&server.url(), ""), &store, flaky.clone()).await)
    };
    let b = second.as_ref().map_or(&a, |(.., queue)| queue);
    let stream = format!("__ncm:wb:{{{name}}}");
    a.write("k", &"small".to_string(), HOUR, Duration::from_millis(300))
        .await
        .unwrap();
    flaky.hang_sets.store(true, Ordering::SeqCst);
    flaky.fail_sets.store(true, Ordering::SeqCst);
    let newer = {
        let b = b.clone();
        tokio::spawn(async move { b.write("k", &"big".to_string(), HOUR, HOUR).await })
    };
    // The older write's batch comes due, is fenced against the newer entry and acknowledged.
    let xlen = || server.cli(&["XLEN", &stream]).unwrap().trim().to_owned();
    assert!(
        eventually(Duration::from_secs(3), || xlen() == "2").await,
        "the newer write was never appended"
    );
    assert!(
        eventually(Duration::from_secs(3), || xlen() == "1").await,
        "scenario not reproduced: the older write was never judged superseded"
    );
    // Now the newer write's cache write fails.
    flaky.hang_sets.store(false, Ordering::SeqCst);
    let err = newer.await.unwrap();
    assert!(
        err.is_err(),
        "the newer write's cache write was meant to fail"
    );
    flaky.fail_sets.store(false, Ordering::SeqCst);
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    acknowledged_write_survived(&server, &stream, &db, &local).await;
    assert_eq!(
        db.get("k").as_deref(),
        Some("big"),
        "the write the older one was acknowledged as superseded by was not persisted"
    );
    for record in ["newest", "counts", "pinned"] {
        assert_eq!(
            server
                .cli(&["HLEN", &format!("{stream}:{record}")])
                .unwrap()
                .trim(),
            "0",
            "the journal's {record} record of the key was left behind"
        );
    }
    if let Some((s, ..)) = second {
        s.shutdown().await.unwrap();
    }
    sa.shutdown().await.unwrap();
}

/// See [`superseded_by_a_write_that_is_then_withdrawn`]: both writes on one instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_write_superseded_by_a_withdrawn_local_write_is_still_stored() {
    superseded_by_a_write_that_is_then_withdrawn(true, "withdrawn-local").await;
}

/// See [`superseded_by_a_write_that_is_then_withdrawn`]: the newer write on another instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_write_superseded_by_another_instances_withdrawn_write_is_still_stored() {
    superseded_by_a_write_that_is_then_withdrawn(false, "withdrawn-remote").await;
}

/// A write-through whose store call outlived its mark's lease (200 ms here): B's write-through
/// of the key, begun after the lease, pruned A's mark and did not count it as an overlap; A's
/// store committed after B's, yet B kept its own value cached — cache `b`, store `a` until the
/// TTL (found by review). A pruned mark now counts as an overlap, and a write whose own mark
/// was pruned counts itself as overlapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_slower_than_its_lease_still_counts_as_an_overlap() {
    use std::collections::HashMap;
    let server = RedisServer::start().unwrap();
    let redis = cache(&server, "lease:").await;
    // Both instances cache in that Redis, as two processes would.
    let shared = redis.cache().clone();
    let mut instances = Vec::new();
    for _ in 0..2 {
        instances.push(
            CacheStrategies::builder(shared.clone())
                .redis(redis.redis_backend().clone())
                .write_through_lease(Duration::from_millis(200))
                .build()
                .await
                .unwrap(),
        );
    }
    let db: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let (gate_a, gate_b) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let store = {
        let (db, gate_a, gate_b) = (Arc::clone(&db), Arc::clone(&gate_a), Arc::clone(&gate_b));
        ncm_cache_strategies::store_fn(move |k: String, v: String| {
            let (db, gate_a, gate_b) = (Arc::clone(&db), Arc::clone(&gate_a), Arc::clone(&gate_b));
            async move {
                if v == "a" {
                    // A's store call hangs past its lease, then commits.
                    gate_a.notified().await;
                    db.lock().unwrap().insert(k, v);
                } else {
                    // B's commits at once, and its reply is slow.
                    db.lock().unwrap().insert(k, v);
                    gate_b.notified().await;
                }
                Ok::<_, std::io::Error>(())
            }
        })
    };
    let a = {
        let (s, store) = (instances[0].clone(), store.clone());
        tokio::spawn(async move { s.write_through("k", &"a".to_string(), HOUR, &store).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = {
        let (s, store) = (instances[1].clone(), store.clone());
        tokio::spawn(async move { s.write_through("k", &"b".to_string(), HOUR, &store).await })
    };
    assert!(
        eventually(Duration::from_secs(3), || db
            .lock()
            .unwrap()
            .get("k")
            .map(String::as_str)
            == Some("b"))
        .await,
        "B's store never committed"
    );
    gate_a.notify_one();
    a.await.unwrap().unwrap();
    gate_b.notify_one();
    b.await.unwrap().unwrap();
    let stored = db.lock().unwrap().get("k").cloned();
    assert_eq!(stored.as_deref(), Some("a"));
    let cached: Option<String> = shared.get("k").await.unwrap();
    assert!(
        cached.is_none() || cached == stored,
        "the cache holds {cached:?} but the store {stored:?}"
    );
}

/// A write-through cancelled while it ends its mark (its coordination Redis stalled) after an
/// overlapping write-through of another instance: B stored `b` last and evicted after its
/// cache write, then A's slower cache write landed `a`. A's cancelled call now evicts the key
/// (review, helper-80 #5: the guard was disarmed before the mark's end, and the cache kept
/// `a` while the store held `b`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_cancelled_while_ending_its_mark_still_evicts() {
    use std::collections::HashMap;
    let server = RedisServer::start().unwrap();
    let proxy = ncm_cache_testkit::FaultProxy::start(server.addr()).unwrap();
    let direct = cache(&server, "wtm:").await;
    let proxied = RedisCache::connect(config(&proxy.url(), "wtm:"))
        .await
        .unwrap();
    let shared = direct.cache().clone();
    let a = CacheStrategies::builder(shared.clone())
        .redis(proxied.redis_backend().clone())
        .build()
        .await
        .unwrap();
    let b = CacheStrategies::builder(shared.clone())
        .redis(direct.redis_backend().clone())
        .build()
        .await
        .unwrap();
    let db: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let (entered, gate) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let store = {
        let (db, entered, gate) = (Arc::clone(&db), Arc::clone(&entered), Arc::clone(&gate));
        ncm_cache_strategies::store_fn(move |k: String, v: String| {
            let (db, entered, gate) = (Arc::clone(&db), Arc::clone(&entered), Arc::clone(&gate));
            async move {
                let slow = v == "a";
                db.lock().unwrap().insert(k, v);
                if slow {
                    // A commits at once, and its reply is slow.
                    entered.notify_one();
                    gate.notified().await;
                }
                Ok::<_, std::io::Error>(())
            }
        })
    };
    let writer = {
        let (a, store) = (a.clone(), store.clone());
        tokio::spawn(async move { a.write_through("k", &"a".to_string(), HOUR, &store).await })
    };
    entered.notified().await;
    b.write_through("k", &"b".to_string(), HOUR, &store)
        .await
        .unwrap();
    assert_eq!(db.lock().unwrap().get("k").map(String::as_str), Some("b"));
    // A's cache write lands; ending its mark stalls.
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Stall);
    gate.notify_one();
    assert!(
        eventually_async(Duration::from_secs(2), || async {
            shared.get::<String>("k").await.unwrap().as_deref() == Some("a")
        })
        .await,
        "A's cache write never landed"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    writer.abort();
    let _ = writer.await;
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    assert!(
        eventually_async(Duration::from_secs(3), || async {
            shared.get::<String>("k").await.unwrap().as_deref() != Some("a")
        })
        .await,
        "the cache kept `a` while the store holds `b`"
    );
}

/// Two instances of one durable queue over one cache (as Redis would be), A's faults its own.
async fn durable_pair(
    server: &RedisServer,
    store: &ncm_cache_strategies::Store<String>,
) -> (
    (
        CacheStrategies,
        Flaky,
        ncm_cache_strategies::WriteBehind<String>,
    ),
    (CacheStrategies, ncm_cache_strategies::WriteBehind<String>),
    Cache<Serializer>,
) {
    let fa = Flaky {
        shared: true,
        ..Flaky::default()
    };
    let (sa, fa, local, a) = flaky_queue_over(config(&server.url(), ""), store, fa).await;
    let fb = Flaky {
        inner: fa.inner.clone(),
        shared: true,
        ..Flaky::default()
    };
    let (sb, _, _, b) = flaky_queue_over(config(&server.url(), ""), store, fb).await;
    ((sa, fa, a), (sb, b), local)
}

/// A's durable write is journaled first, but its cache write lands after B's newer write of
/// the key (journaled and cached meanwhile): the cache kept A's older value for good while the
/// store ended with B's (found by review). A's write now caches the key's newest journaled
/// write after its own cache write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cache_write_does_not_outlive_another_instances_newer_write() {
    let server = RedisServer::start().unwrap();
    let (store, db) = database("slow-cache");
    let ((sa, fa, a), (sb, b), local) = durable_pair(&server, &store).await;
    let newest = || {
        server
            .cli(&["HGET", "__ncm:wb:{slow-cache}:newest", "k"])
            .unwrap()
    };
    fa.hang_sets.store(true, Ordering::SeqCst);
    let older = {
        let a = a.clone();
        tokio::spawn(async move { a.write("k", &"older".to_string(), HOUR, HOUR).await })
    };
    assert!(
        eventually(Duration::from_secs(3), || !newest().trim().is_empty()).await,
        "A's write was never journaled"
    );
    b.write("k", &"newer".to_string(), HOUR, HOUR)
        .await
        .unwrap();
    // A's cache write lands now, after B's.
    fa.hang_sets.store(false, Ordering::SeqCst);
    older.await.unwrap().unwrap();
    let cached: Option<String> = local.get("k").await.unwrap();
    assert_eq!(
        cached.as_deref(),
        Some("newer"),
        "the cache kept the older write"
    );
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(db.get("k").as_deref(), Some("newer"));
    let cached: Option<String> = local.get("k").await.unwrap();
    assert_eq!(cached.as_deref(), Some("newer"));
    sb.shutdown().await.unwrap();
    sa.shutdown().await.unwrap();
}

/// A write persisted as adopted (here: its caller gave up during its cache write) is followed
/// by an eviction of its key, since its value may never have been cached. That eviction removed
/// B's newer write, cached while A's store call ran; a read-through then cached A's older row
/// from the store, and B's write, persisted later, evicted nothing (found by review). The
/// cache is now left with the key's newest journaled write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisting_an_adopted_write_does_not_evict_another_instances_newer_write() {
    another_instances_newer_write_survives_a_persist(true).await;
}

/// The same for A's ordinary (not adopted) write: the check after its persist found the cache
/// holding B's newer journaled write, not A's bytes, and evicted it; a read-through then cached
/// A's older row until B persisted (review, helper-80 #2). The check now leaves a key whose
/// newest journaled write is another one with that write cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisting_a_write_does_not_evict_another_instances_newer_write() {
    another_instances_newer_write_survives_a_persist(false).await;
}

/// A's write of `older` (`adopted`: its caller gave up during the cache write) is in its store
/// call when B journals and caches `newer`; after A's persist a read-through returns `newer`.
async fn another_instances_newer_write_survives_a_persist(adopted: bool) {
    let server = RedisServer::start().unwrap();
    let (store, db) = database(if adopted {
        "adopted-evict"
    } else {
        "plain-evict"
    });
    let ((sa, fa, a), (sb, b), _) = durable_pair(&server, &store).await;
    if adopted {
        fa.hang_sets.store(true, Ordering::SeqCst);
        let gave_up = tokio::time::timeout(
            Duration::from_millis(150),
            a.write("k", &"older".to_string(), HOUR, Duration::from_millis(50)),
        )
        .await;
        assert!(gave_up.is_err(), "the cache write was meant to hang");
        fa.hang_sets.store(false, Ordering::SeqCst);
    } else {
        a.write("k", &"older".to_string(), HOUR, Duration::from_millis(50))
            .await
            .unwrap();
    }
    // A's store call waits while B writes the key.
    db.hang.store(true, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(3), || db.calls.load(Ordering::SeqCst)
            >= 1)
        .await,
        "A never began to persist its write"
    );
    b.write("k", &"newer".to_string(), HOUR, HOUR)
        .await
        .unwrap();
    db.hang.store(false, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(3), || db.get("k").as_deref()
            == Some("older"))
        .await,
        "A's write was not persisted"
    );
    a.flush().await.unwrap();
    let read: String = sb
        .read_through(
            "k",
            || async { Ok::<_, std::io::Error>(db.get("k").unwrap_or_default()) },
            HOUR,
        )
        .await
        .unwrap();
    assert_eq!(
        read, "newer",
        "a read-through brought the older stored row back"
    );
    b.flush().await.unwrap();
    assert_eq!(db.get("k").as_deref(), Some("newer"));
    sb.shutdown().await.unwrap();
    sa.shutdown().await.unwrap();
}

/// An adopted write (its caller gave up during the cache write) is persisted; right after its
/// store call another writer's write-through stores and caches `v3` (not journaled). The
/// check after the persist found the persisted entry still the key's newest journaled write
/// (acknowledged only later) and cached it again over `v3`, with no expiry on a cache without
/// a default TTL (review, helper-80 #3). A persisted entry no longer counts as newer than
/// what the store holds: the key is evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisting_an_adopted_write_does_not_undo_a_write_landing_after_it() {
    let server = RedisServer::start().unwrap();
    let db = Arc::new(Database::default());
    let other: Arc<std::sync::OnceLock<Cache<Serializer>>> = Arc::default();
    let store = {
        let (db, other) = (Arc::clone(&db), Arc::clone(&other));
        ncm_cache_strategies::batch_store_fn(move |rows: Vec<(String, String)>| {
            let (db, other) = (Arc::clone(&db), Arc::clone(&other));
            async move {
                db.rows.lock().unwrap().extend(rows);
                // Right after this batch: another writer's write-through of `k`.
                db.rows.lock().unwrap().insert("k".into(), "v3".into());
                other
                    .get()
                    .expect("set before the write")
                    .set_with_ttl("k", &"v3".to_string(), HOUR)
                    .await
                    .map_err(|e| e.to_string())
            }
        })
        .named("adopted-landing")
    };
    let ((sa, fa, a), (sb, _), _) = durable_pair(&server, &store).await;
    let _ = other.set(sb.cache().clone());
    fa.hang_sets.store(true, Ordering::SeqCst);
    let gave_up = tokio::time::timeout(
        Duration::from_millis(150),
        a.write("k", &"v2".to_string(), HOUR, HOUR),
    )
    .await;
    assert!(gave_up.is_err(), "the cache write was meant to hang");
    fa.hang_sets.store(false, Ordering::SeqCst);
    a.flush().await.unwrap();
    assert_eq!(db.get("k").as_deref(), Some("v3"));
    assert_ne!(
        sb.cache().get::<String>("k").await.unwrap().as_deref(),
        Some("v2"),
        "the persisted write was cached again over a newer one"
    );
    sb.shutdown().await.unwrap();
    sa.shutdown().await.unwrap();
}

/// Instances that each keep their own in-process cache, coordinated through Redis: B's
/// read-through misses and reads the source slowly; meanwhile A writes the key through and
/// tells B; B's load, which may have read the source before A's write, is returned but not
/// cached (B's next read loads again) — before, B cached the older value for the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_through_overtaken_by_another_instances_write_is_not_cached() {
    let server = RedisServer::start().unwrap();
    let (a, b) = local_pair(&server, "rt:").await;
    let db: Arc<Mutex<std::collections::HashMap<String, String>>> = Arc::default();
    db.lock().unwrap().insert("k".into(), "old".into());
    let store = {
        let db = Arc::clone(&db);
        ncm_cache_strategies::store_fn(move |key: String, value: String| {
            let db = Arc::clone(&db);
            async move {
                db.lock().unwrap().insert(key, value);
                Ok::<_, std::io::Error>(())
            }
        })
    };
    let (entered, release) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let load = {
        let (b, db) = (b.clone(), Arc::clone(&db));
        let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
        tokio::spawn(async move {
            b.read_through::<String, _, _, _>(
                "k",
                move || async move {
                    let read = db.lock().unwrap()["k"].clone();
                    entered.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>(read)
                },
                HOUR,
            )
            .await
            .unwrap()
        })
    };
    entered.notified().await;
    let before = b.invalidation_stats().remote_messages;
    a.write_through("k", &"new".to_string(), HOUR, &store)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(2), || {
            b.invalidation_stats().remote_messages > before
        })
        .await,
        "A's message never reached B"
    );
    // The message is counted when it arrives: give its eviction a moment to run.
    tokio::time::sleep(Duration::from_millis(50)).await;
    release.notify_one();
    assert_eq!(load.await.unwrap(), "old", "the caller gets what it loaded");
    assert_eq!(
        b.cache().get::<String>("k").await.unwrap(),
        None,
        "B cached a load older than A's write"
    );
}

/// On a Redis cache, in memory mode and in durable mode (the superseded entry's journal
/// record acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_supersede_a_waiting_write_behind_on_redis() {
    let server = RedisServer::start().unwrap();
    let plain = cache(&server, "dwm:").await;
    support::direct_writes_supersede_a_waiting_write_behind(&CacheStrategies::new(
        plain.cache().clone(),
    ))
    .await;
    let journaled = cache(&server, "dwd:").await;
    support::direct_writes_supersede_a_waiting_write_behind(&durable_strategies(&journaled).await)
        .await;
    // The superseded writes' journal entries were acknowledged (removed) too.
    assert!(
        eventually(Duration::from_secs(3), || server
            .cli(&["XLEN", "dwd:__ncm:wb:{direct}"])
            .unwrap()
            .trim()
            == "0")
        .await,
        "superseded writes stayed in the journal"
    );
}

/// On a Redis cache, in memory mode and in durable mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_write_behind_key_ends_with_the_persisted_value_on_redis() {
    let server = RedisServer::start().unwrap();
    let plain = cache(&server, "wbm:").await;
    support::an_invalidated_write_behind_key_ends_with_the_persisted_value(&CacheStrategies::new(
        plain.cache().clone(),
    ))
    .await;
    let journaled = cache(&server, "wbd:").await;
    support::an_invalidated_write_behind_key_ends_with_the_persisted_value(
        &durable_strategies(&journaled).await,
    )
    .await;
    let landing = cache(&server, "wbl:").await;
    support::a_write_landing_after_a_persist_is_not_undone(&durable_strategies(&landing).await)
        .await;
}

/// A crashed process's journaled write adopted while a write-through of its key is under way
/// is superseded by it, not persisted after it (review, helper-82 #4): adoption queued it
/// without the key's lock, and the worker stored the older value over the write-through's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_adopted_during_a_write_through_is_superseded() {
    let server = RedisServer::start().unwrap();
    // A lease long enough for the setup below, whatever the machine's load.
    let lease = Duration::from_secs(3);
    crashed_with_pending_writes_leased(&server.url(), "adopt-gated", 1, lease);
    let crashed = Instant::now();
    // Created within the crashed consumer's lease: its first recovery pass adopts nothing.
    let c = cache(&server, "").await;
    let s = durable_strategies(&c).await;
    let db = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let (new_entered, new_gate, old_entered, old_gate) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let store = {
        let db = Arc::clone(&db);
        let gates = (
            Arc::clone(&new_entered),
            Arc::clone(&new_gate),
            Arc::clone(&old_entered),
            Arc::clone(&old_gate),
        );
        ncm_cache_strategies::batch_store_fn(move |rows: Vec<(String, String)>| {
            let (db, gates) = (Arc::clone(&db), gates.clone());
            async move {
                let (new_entered, new_gate, old_entered, old_gate) = gates;
                // The crashed process wrote `v0`.
                if rows.iter().any(|(_, v)| v == "v0") {
                    old_entered.notify_one();
                    old_gate.notified().await;
                }
                if rows.iter().any(|(_, v)| v == "new") {
                    new_entered.notify_one();
                    new_gate.notified().await;
                }
                db.lock().unwrap().extend(rows);
                Ok::<_, std::io::Error>(())
            }
        })
        .named("adopt-gated")
    };
    let queue = s.write_behind_queue(&store).await.unwrap();
    assert_eq!(
        queue.pending(),
        0,
        "adopted within the crashed consumer's lease"
    );
    let through = tokio::spawn({
        let (s, store) = (s.clone(), store.clone());
        async move {
            s.write_through("k0", &"new".to_string(), HOUR, &store)
                .await
        }
    });
    tokio::time::timeout(Duration::from_secs(5), new_entered.notified())
        .await
        .expect("the write-through never reached the store");
    // (Renewed up to a third of a lease before the crash: expired 2 s after it at the soonest.)
    assert!(
        crashed.elapsed() < lease / 2,
        "the setup outlived the crashed consumer's lease: the write was adopted before the \
         write-through began (rerun on a less loaded machine)"
    );
    // Past the crashed consumer's lease: adopted now, during the write-through. (The queue's
    // own periodic pass may have adopted it already.)
    tokio::time::sleep((lease + Duration::from_millis(300)).saturating_sub(crashed.elapsed()))
        .await;
    queue.recover().await.unwrap();
    let old_reached = tokio::time::timeout(Duration::from_millis(300), old_entered.notified())
        .await
        .is_ok();
    new_gate.notify_one();
    tokio::time::timeout(Duration::from_secs(5), through)
        .await
        .expect("the write-through never returned")
        .unwrap()
        .unwrap();
    old_gate.notify_one();
    tokio::time::timeout(Duration::from_secs(5), queue.flush())
        .await
        .expect("the flush never returned")
        .unwrap();
    let stored = db.lock().unwrap().get("k0").cloned();
    assert_eq!(
        stored.as_deref(),
        Some("new"),
        "the adopted write was stored over the write-through (it reached the store: \
         {old_reached})"
    );
    assert!(!old_reached, "the adopted write reached the store");
    assert_eq!(queue.pending(), 0);
    s.shutdown().await.unwrap();
}

/// A write-through by one instance supersedes an older write-behind of the key waiting in
/// *another* instance's durable queue (each instance its own journal consumer, as two
/// processes are): the direct write is journaled as the key's newest write before its store
/// call, so the other queue's fence finds its write superseded and never persists it. Before,
/// the other queue's flush stored the older value over the write-through's. Also: a failed
/// write-through takes its journal entry back (the other instance's write is persisted), and
/// one that fails after the other queue already dropped its write as superseded is persisted
/// by its own queue (the older write is not lost to one that did not happen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_supersedes_another_instances_waiting_write_behind() {
    let server = RedisServer::start().unwrap();
    let (ca, cb) = (cache(&server, "").await, cache(&server, "").await);
    // A lease well past the test's waits: within it another queue waits for a direct write.
    let (a, b) = (
        durable_strategies_leased(&ca, SLOW_LEASE).await,
        durable_strategies_leased(&cb, SLOW_LEASE).await,
    );
    support::a_write_through_supersedes_another_instances_write_behind(&a, &b, "xinstance").await;
    // Every journal entry acknowledged.
    let len: i64 = server
        .cli(&["XLEN", "__ncm:wb:{xinstance}"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(len, 0, "journal entries left behind");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A write-through's journal entry (instance B) is never cached from the journal by another
/// instance (A) while B's store call is under way: A, settling a persisted write of the key
/// whose cached value is gone, found B's entry as the key's newest write and cached B's value
/// — which B's store call then refused (review, helper-87 #1). It evicts instead; B caches
/// its own value once its store accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_throughs_journal_entry_is_not_cached_before_its_store_accepts_it() {
    let server = RedisServer::start().unwrap();
    let (ca, cb) = (cache(&server, "").await, cache(&server, "").await);
    let (a, b) = (durable_strategies(&ca).await, durable_strategies(&cb).await);
    let db = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let gates: [Arc<tokio::sync::Notify>; 4] = Default::default();
    let [old_entered, old_gate, new_entered, new_gate] = gates.clone();
    let store = {
        let db = Arc::clone(&db);
        ncm_cache_strategies::batch_store_fn(move |rows: Vec<(String, String)>| {
            let (db, gates) = (Arc::clone(&db), gates.clone());
            async move {
                let [old_entered, old_gate, new_entered, new_gate] = gates;
                if rows.iter().any(|(_, v)| v == "old") {
                    old_entered.notify_one();
                    old_gate.notified().await;
                }
                if rows.iter().any(|(_, v)| v == "new") {
                    new_entered.notify_one();
                    new_gate.notified().await;
                    return Err(std::io::Error::other("refused"));
                }
                db.lock().unwrap().extend(rows);
                Ok(())
            }
        })
        .named("cache-newest")
    };
    let _queue_b = b.write_behind_queue(&store).await.unwrap();
    // Entries ever added to the journal (an entry added and acknowledged since counts too).
    let xlen = || {
        let info = server
            .cli(&["XINFO", "STREAM", "__ncm:wb:{cache-newest}"])
            .unwrap();
        let mut lines = info.lines().map(str::trim);
        lines.by_ref().find(|l| *l == "entries-added").map_or_else(
            || "0".to_owned(),
            |_| lines.next().unwrap_or("0").to_owned(),
        )
    };
    // A write-through of a key with no journaled write journals nothing (no round trip's
    // worth of stream writes and acknowledgments for nothing: review, helper-87 #6).
    b.write_through("fresh", &"x".to_string(), HOUR, &store)
        .await
        .unwrap();
    assert_eq!(
        xlen(),
        "0",
        "a write-through of an unjournaled key was journaled"
    );
    let wait = |n: Arc<tokio::sync::Notify>| async move {
        tokio::time::timeout(Duration::from_secs(5), n.notified())
            .await
            .expect("the store was never called");
    };
    // A's write is in its store call; its cached value is gone meanwhile.
    a.write_behind("k", &"old".to_string(), HOUR, &store, Duration::ZERO)
        .await
        .unwrap();
    wait(Arc::clone(&old_entered)).await;
    server.cli(&["DEL", "k"]).unwrap();
    // B's write-through is journaled (A's entry is still there), its store call hangs.
    let through = tokio::spawn({
        let (b, store) = (b.clone(), store.clone());
        async move { b.write_through("k", &"new".to_string(), HOUR, &store).await }
    });
    wait(Arc::clone(&new_entered)).await;
    // A's persist settles: the key's newest journaled write is B's.
    old_gate.notify_one();
    tokio::time::timeout(Duration::from_secs(5), a.flush())
        .await
        .expect("A's flush never returned")
        .unwrap();
    assert_ne!(
        ca.get::<String>("k").await.unwrap().as_deref(),
        Some("new"),
        "B's value was cached while B's store call was under way"
    );
    // B's store call fails: its entry is taken back, nothing of it stays cached.
    new_gate.notify_one();
    assert!(through.await.unwrap().is_err());
    b.flush().await.unwrap();
    assert_ne!(ca.get::<String>("k").await.unwrap().as_deref(), Some("new"));
    assert_eq!(db.lock().unwrap().get("k").map(String::as_str), Some("old"));

    // After B's shutdown its write-throughs journal nothing: nothing would acknowledge the
    // entry (review, helper-87 #2: it stayed in the journal for good).
    b.shutdown().await.unwrap();
    a.write_behind("s", &"a1".to_string(), HOUR, &store, HOUR)
        .await
        .unwrap();
    let before = xlen();
    b.write_through("s", &"b1".to_string(), HOUR, &store)
        .await
        .unwrap();
    assert_eq!(
        xlen(),
        before,
        "a write-through after shutdown was journaled"
    );
    a.shutdown().await.unwrap();
}

/// A write-through that fails takes its journal entry back and gives the key's "newest"
/// record back to the write it replaced — also when that write is acknowledged already, while
/// older entries of the key are left: an older dead letter replayed later is still found
/// superseded (review, helper-88 #1: the record was deleted, and the replayed dead letter was
/// persisted over the newer write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_through_leaves_an_older_dead_letter_superseded() {
    let server = RedisServer::start().unwrap();
    let (ca, cb) = (cache(&server, "").await, cache(&server, "").await);
    let (a, b) = (durable_strategies(&ca).await, durable_strategies(&cb).await);
    let (store, db) = database("withdrawn");
    let queue_a = a.write_behind_queue(&store).await.unwrap();
    let _queue_b = b.write_behind_queue(&store).await.unwrap();
    // A's `a0` becomes a dead letter (its journal entry stays).
    *db.refuse.lock().unwrap() = Some("a0".into());
    a.write_behind("k", &"a0".to_string(), HOUR, &store, Duration::ZERO)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || queue_a.dead_letters().len() == 1).await,
        "a0 never became a dead letter"
    );
    // B's newer `c1` is persisted and acknowledged.
    *db.refuse.lock().unwrap() = None;
    b.write_behind("k", &"c1".to_string(), HOUR, &store, Duration::ZERO)
        .await
        .unwrap();
    b.flush().await.unwrap();
    assert_eq!(db.get("k").as_deref(), Some("c1"));
    // B's write-through fails: its entry is taken back.
    *db.refuse.lock().unwrap() = Some("bad".into());
    assert!(
        b.write_through("k", &"bad".to_string(), HOUR, &store)
            .await
            .is_err()
    );
    *db.refuse.lock().unwrap() = None;
    // The older dead letter, replayed, is superseded by `c1`.
    queue_a.replay_dead_letters().await.unwrap();
    assert_eq!(
        db.get("k").as_deref(),
        Some("c1"),
        "a replayed older dead letter was persisted over a newer write"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Three durable instances over one Redis and a store whose `d1` and `d2` calls wait for their
/// gates and then fail (and whose `a0` fails while `refuse_a0`): the setting of the tests of
/// failed write-throughs overlapping other instances' write-behinds.
struct FailingThroughs {
    _server: RedisServer,
    s: Vec<CacheStrategies>,
    db: Arc<Mutex<std::collections::HashMap<String, String>>>,
    store: ncm_cache_strategies::Store<String>,
    refuse_a0: Arc<std::sync::atomic::AtomicBool>,
    gates: [Arc<tokio::sync::Notify>; 4],
}

impl FailingThroughs {
    async fn start(name: &str) -> Self {
        let server = RedisServer::start().unwrap();
        let mut s = Vec::new();
        for _ in 0..3 {
            s.push(durable_strategies_leased(&cache(&server, "").await, SLOW_LEASE).await);
        }
        let db = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let refuse_a0 = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let gates: [Arc<tokio::sync::Notify>; 4] = Default::default();
        let store = {
            let (db, refuse_a0, gates) = (Arc::clone(&db), Arc::clone(&refuse_a0), gates.clone());
            ncm_cache_strategies::batch_store_fn(move |rows: Vec<(String, String)>| {
                let (db, refuse_a0) = (Arc::clone(&db), Arc::clone(&refuse_a0));
                let [d1_entered, d1_gate, d2_entered, d2_gate] = gates.clone();
                async move {
                    if rows.iter().any(|(_, v)| v == "a0") && refuse_a0.load(Ordering::SeqCst) {
                        return Err(std::io::Error::other("refused"));
                    }
                    for (value, entered, gate) in
                        [("d1", &d1_entered, &d1_gate), ("d2", &d2_entered, &d2_gate)]
                    {
                        if rows.iter().any(|(_, v)| v == value) {
                            entered.notify_one();
                            gate.notified().await;
                            return Err(std::io::Error::other("refused"));
                        }
                    }
                    db.lock().unwrap().extend(rows);
                    Ok(())
                }
            })
            .named(name)
        };
        for x in &s {
            x.write_behind_queue(&store).await.unwrap();
        }
        Self {
            _server: server,
            s,
            db,
            store,
            refuse_a0,
            gates,
        }
    }

    /// B writes `k` through (`d1`), then C (`d2`), both in their store calls at once; both
    /// fail, B's first.
    async fn fail_both(&self) {
        let [d1_entered, d1_gate, d2_entered, d2_gate] = &self.gates;
        let through = |x: &CacheStrategies, v: &'static str| {
            let (x, store) = (x.clone(), self.store.clone());
            tokio::spawn(async move { x.write_through("k", &v.to_string(), HOUR, &store).await })
        };
        let entered = |n: &Arc<tokio::sync::Notify>| {
            let n = Arc::clone(n);
            async move {
                tokio::time::timeout(Duration::from_secs(5), n.notified())
                    .await
                    .expect("the store was never called");
            }
        };
        let d1 = through(&self.s[1], "d1");
        entered(d1_entered).await;
        let d2 = through(&self.s[2], "d2");
        entered(d2_entered).await;
        d1_gate.notify_one();
        assert!(d1.await.unwrap().is_err());
        d2_gate.notify_one();
        assert!(d2.await.unwrap().is_err());
    }

    fn stored(&self, key: &str) -> Option<String> {
        self.db.lock().unwrap().get(key).cloned()
    }

    async fn shutdown(&self) {
        for x in &self.s {
            x.shutdown().await.unwrap();
        }
    }
}

/// Two write-throughs of `k` (instances B and C) journaled after A's waiting write-behind, both
/// failing, B's taken back first: A's write is persisted. The key's newest record went back to
/// B's entry, itself taken back, and A's fence took A's write for superseded by it (review,
/// helper-89 #1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_failed_write_throughs_leave_the_waiting_write_behind_to_persist() {
    let f = FailingThroughs::start("two-failed").await;
    let a = &f.s[0];
    a.write_behind("k", &"a".to_string(), HOUR, &f.store, HOUR)
        .await
        .unwrap();
    f.fail_both().await;
    tokio::time::timeout(Duration::from_secs(5), a.flush())
        .await
        .expect("A's flush never returned")
        .unwrap();
    assert_eq!(
        f.stored("k").as_deref(),
        Some("a"),
        "the waiting write-behind was lost to two write-throughs that failed"
    );
    f.shutdown().await;
}

/// Two instances each waiting, in a flush, for the other's write-through of a key of its batch
/// (busy), both write-throughs then stored: each acknowledges its own stored direct write while
/// it waits, so both flushes end at once. Before, a worker acknowledged only between batches,
/// and each waited out the other's lease (review, helper-89 #3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_waiting_on_each_others_write_throughs_do_not_wait_a_lease() {
    let server = RedisServer::start().unwrap();
    let (cp, cq) = (cache(&server, "").await, cache(&server, "").await);
    let (p, q) = (
        durable_strategies_leased(&cp, SLOW_LEASE).await,
        durable_strategies_leased(&cq, SLOW_LEASE).await,
    );
    let (store, db) = database("mutual");
    p.write_behind_queue(&store).await.unwrap();
    q.write_behind_queue(&store).await.unwrap();
    // P waits to persist `y`, Q to persist `x`.
    p.write_behind("y", &"p-y".to_string(), HOUR, &store, HOUR)
        .await
        .unwrap();
    q.write_behind("x", &"q-x".to_string(), HOUR, &store, HOUR)
        .await
        .unwrap();
    // P writes `x` through, Q writes `y` through: both store calls hang.
    db.hang.store(true, Ordering::SeqCst);
    let calls = db.calls();
    let through = |s: &CacheStrategies, k: &'static str, v: &'static str| {
        let (s, store) = (s.clone(), store.clone());
        tokio::spawn(async move { s.write_through(k, &v.to_string(), HOUR, &store).await })
    };
    let (px, qy) = (through(&p, "x", "p-x"), through(&q, "y", "q-y"));
    assert!(
        eventually(Duration::from_secs(5), || db.calls() >= calls + 2).await,
        "the write-throughs never reached the store"
    );
    // Each flush finds its key busy with the other's write-through.
    let flush = |s: &CacheStrategies| {
        let s = s.clone();
        tokio::spawn(async move { s.flush().await })
    };
    let (fp, fq) = (flush(&p), flush(&q));
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.hang.store(false, Ordering::SeqCst);
    px.await.unwrap().unwrap();
    qy.await.unwrap().unwrap();
    let started = Instant::now();
    for f in [fp, fq] {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("a flush never returned")
            .unwrap()
            .unwrap();
    }
    assert!(
        started.elapsed() < SLOW_LEASE / 2,
        "the flushes waited {:?} for write-throughs already stored",
        started.elapsed()
    );
    assert_eq!(db.get("x").as_deref(), Some("p-x"));
    assert_eq!(db.get("y").as_deref(), Some("q-y"));
    p.shutdown().await.unwrap();
    q.shutdown().await.unwrap();
}

/// An older dead letter of `k`, a newer `c1` persisted and acknowledged, then two overlapping
/// write-throughs of `k` (B's, then C's) that both fail, B's taken back first: the newest
/// record goes back along the chain to `c1`, and the replayed dead letter is superseded by it
/// (review, helper-90: with the second withdrawal finding the first's entry taken back, the
/// record was deleted, and the dead letter was persisted over `c1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_failed_write_throughs_leaves_an_older_dead_letter_superseded() {
    let f = FailingThroughs::start("chain").await;
    let (a, b) = (&f.s[0], &f.s[1]);
    let queue_a = a.write_behind_queue(&f.store).await.unwrap();
    a.write_behind("k", &"a0".to_string(), HOUR, &f.store, Duration::ZERO)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || queue_a.dead_letters().len() == 1).await,
        "a0 never became a dead letter"
    );
    f.refuse_a0.store(false, Ordering::SeqCst);
    b.write_behind("k", &"c1".to_string(), HOUR, &f.store, Duration::ZERO)
        .await
        .unwrap();
    b.flush().await.unwrap();
    assert_eq!(f.stored("k").as_deref(), Some("c1"));
    f.fail_both().await;
    queue_a.replay_dead_letters().await.unwrap();
    assert_eq!(
        f.stored("k").as_deref(),
        Some("c1"),
        "a replayed older dead letter was persisted over a newer write"
    );
    f.shutdown().await;
}
