//! The layers over a `MultiLevelCache`: `SqlCache`, `CacheStrategies` and `CacheLoader` each
//! run over two L1 + Redis L2 instances (with the backplane) through `Cache::new(multi.as_backend(), codec)`,
//! and a change made through one instance reaches the other's L1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ncm_cache::loader::CacheLoader;
use ncm_cache::sql::{QueryCacheStrategy, SqlCache, SqlValue, SqliteExecutor, params};
use ncm_cache::strategies::{CacheStrategies, store_fn};
use ncm_cache::{Cache, CacheStrategy, MultiLevelCache, RedisCache, RedisConfig, Serializer};
use ncm_cache_testkit::RedisServer;

async fn instance(server: &RedisServer) -> MultiLevelCache {
    instance_on(RedisConfig::from_url(&server.url()).unwrap()).await
}

/// A multi-level instance (L1 + Redis L2 + backplane) over a single node or a cluster.
async fn instance_on(mut c: RedisConfig) -> MultiLevelCache {
    c.key_prefix = "app:".into();
    c.response_timeout = Duration::from_millis(500);
    c.health_check_interval = Some(Duration::from_millis(100));
    let redis = RedisCache::connect(c).await.unwrap();
    let multi = MultiLevelCache::builder(redis.backend())
        .name("layered")
        .backplane(Arc::clone(redis.redis_backend()))
        .build()
        .unwrap();
    let start = Instant::now();
    while !multi.l1_active() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "backplane never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    multi
}

/// Polls `read` until it returns `want`, failing after one second.
async fn eventually<T, F, Fut>(want: T, mut read: F)
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let start = Instant::now();
    loop {
        let got = read().await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "still {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A store writing into `db` (the "database" of the strategies tests).
fn map_store(db: &Arc<Mutex<HashMap<String, String>>>) -> ncm_cache::strategies::Store<String> {
    let db = Arc::clone(db);
    store_fn(move |key: String, value: String| {
        let db = Arc::clone(&db);
        async move {
            db.lock().unwrap().insert(key, value);
            Ok::<_, std::io::Error>(())
        }
    })
}

/// Polls `done` until it holds, failing after two seconds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(2), "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_cache_over_two_multilevel_instances() {
    let server = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let (ma, mb) = (instance(&server).await, instance(&server).await);
    let sql_a = SqlCache::builder(
        Cache::new(ma.as_backend(), Serializer::default()),
        SqliteExecutor::connect(&url).await.unwrap(),
    )
    .build()
    .unwrap();
    let sql_b = SqlCache::builder(
        Cache::new(mb.as_backend(), Serializer::default()),
        SqliteExecutor::connect(&url).await.unwrap(),
    )
    .build()
    .unwrap();
    sql_a
        .execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)", ())
        .await
        .unwrap();
    sql_a
        .execute("INSERT INTO users VALUES (%s, %s)", params![1, "Ada"])
        .await
        .unwrap();
    let query = "SELECT name FROM users WHERE id = %s";
    let name = |rows: Option<ncm_cache::sql::Rows>| {
        rows.and_then(|r| r.get(0, "name").cloned())
            .unwrap_or(SqlValue::Null)
    };
    for cache in [&sql_a, &sql_b] {
        let rows = cache
            .cache_query(query, params![1], QueryCacheStrategy::CacheFirst, None)
            .await
            .unwrap();
        assert_eq!(name(rows), SqlValue::Text("Ada".into()));
    }
    assert!(
        mb.get_stats().l1_hits + mb.get_stats().l2_hits > 0,
        "B read A's entry"
    );
    // B's cached copy sits in B's L1 now; A's write must evict it there.
    sql_a
        .execute(
            "UPDATE users SET name = %s WHERE id = %s",
            params!["Grace", 1],
        )
        .await
        .unwrap();
    eventually(SqlValue::Text("Grace".into()), || async {
        name(
            sql_b
                .cache_query(query, params![1], QueryCacheStrategy::CacheFirst, None)
                .await
                .unwrap(),
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_over_two_multilevel_instances() {
    let server = RedisServer::start().unwrap();
    let (ma, mb) = (instance(&server).await, instance(&server).await);
    let db: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let store = map_store(&db);
    let a = CacheStrategies::new(Cache::new(ma.as_backend(), Serializer::default()));
    let b = Cache::new(mb.as_backend(), Serializer::default());
    a.write_through(
        "user:1",
        &"Ada".to_string(),
        Duration::from_secs(60),
        &store,
    )
    .await
    .unwrap();
    // A's invalidation may still be on its way (it cancels a promotion it overtakes): read
    // until B serves from its L1.
    let start = Instant::now();
    while mb.get_stats().l1_hits == 0 {
        let v = b.get::<String>("user:1").await.unwrap();
        assert_eq!(v.as_deref(), Some("Ada"));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "B never used its L1"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.write_through(
        "user:1",
        &"Grace".to_string(),
        Duration::from_secs(60),
        &store,
    )
    .await
    .unwrap();
    eventually(Some("Grace".to_string()), || async {
        b.get::<String>("user:1").await.unwrap()
    })
    .await;
    assert_eq!(db.lock().unwrap()["user:1"], "Grace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loader_over_two_multilevel_instances() {
    let server = RedisServer::start().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut loaders = Vec::new();
    for _ in 0..2 {
        let multi = instance(&server).await;
        let loader = CacheLoader::new(Cache::new(multi.as_backend(), Serializer::default()));
        let r = Arc::clone(&runs);
        loader
            .register_loader(
                "user",
                move |id: u64| {
                    let r = Arc::clone(&r);
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::io::Error>(format!("user {id}"))
                    }
                },
                Duration::from_secs(60),
                CacheStrategy::CacheAside,
            )
            .unwrap();
        loaders.push((multi, loader));
    }
    let (ma, a) = &loaders[0];
    let (mb, b) = &loaders[1];
    let v: String = a.load("user", 7u64).await.unwrap();
    assert_eq!(v, "user 7");
    // B finds A's load in L2, then (once A's invalidation has passed) serves it from L1.
    let start = Instant::now();
    while mb.get_stats().l1_hits == 0 {
        let v: String = b.load("user", 7u64).await.unwrap();
        assert_eq!(v, "user 7");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "B never used its L1"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "B found A's load in L2");
    assert!(mb.get_stats().l2_hits >= 1);
    assert!(ma.l1_len() >= 1);
}

/// `max_value_size` holds on every path that writes the cache: the typed API, write-through,
/// write-behind, the loader and the reloader. A value above it is never stored; the paths that
/// must still return the value (the loader) serve it uncached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_path_enforces_max_value_size() {
    use ncm_cache::loader::{CacheReloader, ReloadStrategy};
    let cache = Cache::builder(ncm_cache::MemoryBackend::new(), Serializer::default())
        .max_value_size(256)
        .build();
    let big = "x".repeat(1024);
    let err = cache.set("typed", &big).await.unwrap_err();
    assert!(
        matches!(err, ncm_cache::CacheError::ValueTooLarge { .. }),
        "{err:?}"
    );

    let strategies = CacheStrategies::new(cache.clone());
    let store = store_fn(|_k: String, _v: String| async { Ok::<_, std::io::Error>(()) });
    let err = strategies
        .write_through("wt", &big, Duration::from_secs(60), &store)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ncm_cache::CacheError::ValueTooLarge { .. }),
        "{err:?}"
    );
    let err = strategies
        .write_behind("wb", &big, Duration::from_secs(60), &store, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ncm_cache::CacheError::ValueTooLarge { .. }),
        "{err:?}"
    );

    let loader = CacheLoader::new(cache.clone());
    let value = big.clone();
    loader
        .register_loader(
            "big",
            move |_: u32| {
                let value = value.clone();
                async move { Ok::<_, std::io::Error>(value) }
            },
            None,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    assert_eq!(
        loader.load::<u32, String>("big", 1).await.unwrap().len(),
        1024
    );

    let reloader = CacheReloader::new(cache.clone());
    let value = big.clone();
    reloader
        .register_loader(
            "big-reload",
            move || {
                let value = value.clone();
                async move { Ok::<_, std::io::Error>(value) }
            },
            Duration::from_secs(60),
            ReloadStrategy::Lazy,
        )
        .unwrap();
    assert!(reloader.get::<String>("big-reload").await.is_err());

    for key in ["typed", "wt", "wb", "loader:big:1", "big-reload"] {
        assert!(
            !cache.exists(key).await.unwrap(),
            "{key} stored a value above the cap"
        );
    }
    assert_eq!(
        strategies
            .write_behind_queue(&store)
            .await
            .unwrap()
            .pending(),
        0
    );
}

/// Adaptive caching with tags: a loader over instance A tags its value; the strategies' tag
/// graph (in Redis) records it, and invalidating the tag removes the entry from L2 and from
/// both instances' L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaders_tags_are_invalidated_through_the_strategies() {
    use ncm_cache::{EntryOptions, Loaded, ValueSource};
    let server = RedisServer::start().unwrap();
    let (ma, mb) = (instance(&server).await, instance(&server).await);
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    let redis = RedisCache::connect(c).await.unwrap();
    let strategies = CacheStrategies::builder(Cache::new(ma.as_backend(), Serializer::default()))
        .redis(Arc::clone(redis.redis_backend()))
        .build()
        .await
        .unwrap();
    ma.set_tag_index(strategies.tag_index()).unwrap();
    for key in ["doc:1", "doc:2"] {
        let got = ma
            .get_or_load_with::<String, _, _, _>(key, &EntryOptions::new(), |ctx| async move {
                let tag = if ctx.key() == "doc:1" {
                    "docs"
                } else {
                    "other"
                };
                Ok::<_, std::io::Error>(Loaded::value(format!("body of {}", ctx.key())).tags([tag]))
            })
            .await
            .unwrap();
        assert_eq!(got.map(|(_, s)| s), Some(ValueSource::Loader));
    }
    // B holds doc:1 in its L1.
    let start = Instant::now();
    while mb
        .get_with_source::<String>("doc:1")
        .await
        .unwrap()
        .map(|(_, s)| s)
        != Some(ValueSource::L1)
    {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "B never used its L1"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(strategies.invalidate_tag("docs").await.unwrap(), 1);
    assert_eq!(ma.get::<String>("doc:1").await.unwrap(), None);
    assert!(ma.l2().get("doc:1").await.unwrap().is_none());
    eventually(None, || async { mb.get::<String>("doc:1").await.unwrap() }).await;
    // The other tag's entry stays.
    assert!(ma.get::<String>("doc:2").await.unwrap().is_some());
}

/// Tags outlive a short first TTL when the entry does: a sliding entry read within its idle
/// time, and an entry a conditional refresh re-armed with "not modified" (giving its tags
/// again), are still found by their tag after that first TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_follow_entries_whose_ttl_is_extended() {
    use ncm_cache::{EntryOptions, Loaded};
    let server = RedisServer::start().unwrap();
    let multi = instance(&server).await;
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    let redis = RedisCache::connect(c).await.unwrap();
    let strategies =
        CacheStrategies::builder(Cache::new(multi.as_backend(), Serializer::default()))
            .redis(Arc::clone(redis.redis_backend()))
            .build()
            .await
            .unwrap();
    multi.set_tag_index(strategies.tag_index()).unwrap();
    let ttl = Duration::from_millis(600);

    // Sliding: read every 150 ms for 1.2 s (twice its idle time), then invalidated by tag.
    let sliding = EntryOptions::new().sliding(ttl);
    let tagged = |tag: &'static str| {
        move |_ctx: ncm_cache::LoadContext<String>| async move {
            Ok::<_, std::io::Error>(Loaded::value("body".to_string()).tags([tag]))
        }
    };
    multi
        .get_or_load_with::<String, _, _, _>("slide", &sliding, tagged("s"))
        .await
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < 2 * ttl {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            multi
                .get_with::<String>("slide", &sliding)
                .await
                .unwrap()
                .is_some(),
            "the sliding entry expired while read"
        );
    }
    assert_eq!(strategies.invalidate_tag("s").await.unwrap(), 1);
    assert!(multi.get::<String>("slide").await.unwrap().is_none());

    // Conditional refresh: a hit past half the TTL asks the origin, which answers "not
    // modified" with the same tags; 750 ms after the first load the tag still finds it.
    let eager = EntryOptions::new().ttl(ttl).eager_refresh(0.5);
    let origin = || {
        move |ctx: ncm_cache::LoadContext<String>| async move {
            Ok::<_, std::io::Error>(if ctx.validator() == Some("e1") {
                Loaded::not_modified().tags(["c"])
            } else {
                Loaded::value("page".to_string())
                    .validator("e1")
                    .tags(["c"])
            })
        }
    };
    let first = Instant::now();
    multi
        .get_or_load_with::<String, _, _, _>("cond", &eager, origin())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    multi
        .get_or_load_with::<String, _, _, _>("cond", &eager, origin())
        .await
        .unwrap();
    let start = Instant::now();
    while multi.get_stats().not_modified == 0 {
        assert!(start.elapsed() < Duration::from_secs(2), "never refreshed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(750).saturating_sub(first.elapsed())).await;
    assert_eq!(strategies.invalidate_tag("c").await.unwrap(), 1);
    assert!(multi.l2().get("cond").await.unwrap().is_none());
}

/// Per-use entry options through the byte-level layer: a loader whose cache is
/// `as_backend_with(skip_l1 + sliding)` keeps nothing in L1 and its L2 entries slide, while
/// another loader over the same multi-level cache uses L1 as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaders_over_as_backend_with_use_their_entry_options() {
    use ncm_cache::EntryOptions;
    let server = RedisServer::start().unwrap();
    let multi = instance(&server).await;
    let options = EntryOptions::new()
        .skip_l1()
        .sliding(Duration::from_millis(800));
    let sliding = CacheLoader::new(Cache::new(
        multi.as_backend_with(&options).unwrap(),
        Serializer::default(),
    ));
    let plain = CacheLoader::new(Cache::new(multi.as_backend(), Serializer::default()));
    let runs = Arc::new(AtomicUsize::new(0));
    for loader in [&sliding, &plain] {
        let runs = Arc::clone(&runs);
        loader
            .register_loader(
                "user",
                move |id: u64| {
                    let runs = Arc::clone(&runs);
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::io::Error>(format!("user {id}"))
                    }
                },
                Duration::from_millis(800),
                CacheStrategy::CacheAside,
            )
            .unwrap();
    }
    let v: String = sliding.load("user", 1u64).await.unwrap();
    assert_eq!(v, "user 1");
    assert_eq!(multi.l1_len(), 0, "skip_l1: nothing in L1");
    let getex = server.command_calls("getex").unwrap();
    // Read every 300 ms for 2.4 s: each read re-arms the 800 ms TTL in L2 (GETEX).
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v: String = sliding.load("user", 1u64).await.unwrap();
        assert_eq!(v, "user 1");
    }
    assert!(server.command_calls("getex").unwrap() >= getex + 8);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the sliding entry expired");
    assert_eq!(multi.l1_len(), 0);
    // The plain loader's entry goes into L1.
    let _: String = plain.load("user", 2u64).await.unwrap();
    assert!(multi.l1_len() >= 1);
}

/// `CacheStrategies` with Redis coordination, one per process, each over its own
/// `MultiLevelCache` (L1 + the shared Redis L2). Their invalidation messages ask other
/// instances to drop what they keep themselves: the L1, never the shared L2 (found by review:
/// every write by one instance was deleted from L2 by every other, and a write-behind value
/// not yet persisted was replaced by the store's older one for the cache TTL). A pattern
/// invalidation deletes from L2 once, not once per instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_instances_coordinated_over_redis_keep_each_others_writes() {
    let server = RedisServer::start().unwrap();
    let strategies = |multi: MultiLevelCache| {
        let url = server.url();
        async move {
            let mut c = RedisConfig::from_url(&url).unwrap();
            c.key_prefix = "app:".into();
            let coordination = RedisCache::connect(c).await.unwrap();
            CacheStrategies::builder(Cache::new(multi.as_backend(), Serializer::default()))
                .redis(Arc::clone(coordination.redis_backend()))
                .build()
                .await
                .unwrap()
        }
    };
    let (ma, mb) = (instance(&server).await, instance(&server).await);
    let (sa, sb) = (strategies(ma.clone()).await, strategies(mb.clone()).await);
    let db: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    db.lock().unwrap().insert("user:1".into(), "v1".into());
    let store = map_store(&db);
    let in_l2 = |key: &'static str| {
        let ma = ma.clone();
        async move { ma.l2().get(key).await.unwrap().is_some() }
    };

    let received = sb.invalidation_stats().remote_messages;
    // A write-behind: acknowledged, persisted in 2 s; until then every reader sees it.
    sa.write_behind(
        "user:1",
        &"v2".to_string(),
        Duration::from_secs(60),
        &store,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    sa.write_through(
        "user:2",
        &"Ada".to_string(),
        Duration::from_secs(60),
        &store,
    )
    .await
    .unwrap();
    // B received A's two messages (counted on arrival; then a moment to apply them).
    until("A's messages reach B", || {
        sb.invalidation_stats().remote_messages >= received + 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(in_l2("user:1").await, "B deleted A's write-behind value");
    assert!(in_l2("user:2").await, "B deleted A's write-through value");
    let from_store = {
        let db = Arc::clone(&db);
        move || async move { Ok::<_, std::io::Error>(db.lock().unwrap()["user:1"].clone()) }
    };
    let read: String = sb
        .read_through("user:1", from_store, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(read, "v2", "B read the store's older value");

    // One pattern invalidation: one SCAN pass over L2, whoever receives the message.
    for i in 0..50 {
        ma.set(&format!("p:{i}"), i).await.unwrap();
    }
    let scans = || server.command_calls("SCAN").unwrap();
    let before = scans();
    assert_eq!(
        sa.pattern_based_invalidation("p:*", |_, _| {})
            .await
            .unwrap(),
        50
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let passes = scans() - before;
    assert!(passes >= 1, "the pattern delete scanned nothing");
    let one_pass = passes;
    // B's copy of the message must not SCAN again: compare with a pattern only A handles.
    for i in 0..50 {
        ma.set(&format!("p:{i}"), i).await.unwrap();
    }
    let before = scans();
    ncm_cache::core::CacheBackend::clear_pattern(&ma.as_backend(), "p:*")
        .await
        .unwrap();
    assert_eq!(
        scans() - before,
        one_pass,
        "B's copy of the message scanned L2 again"
    );
    eventually(None, || async { mb.get::<i32>("p:7").await.unwrap() }).await;
}

/// Runs `load` (spawned); once its source read began, `invalidate` (on another instance); then
/// lets the load finish.
async fn overtaken(
    entered: &tokio::sync::Notify,
    release: &tokio::sync::Notify,
    load: tokio::task::JoinHandle<String>,
    invalidate: impl std::future::Future<Output = ()>,
) {
    entered.notified().await;
    invalidate.await;
    // Time for the invalidation to reach the loading instance over the backplane.
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.notify_one();
    assert_eq!(load.await.unwrap(), "old", "the caller gets what it loaded");
}

/// Deletes `key` through `multi`'s `as_backend()` (as a layer over it does).
async fn delete_on(multi: &MultiLevelCache, key: &str) {
    Cache::new(multi.as_backend(), Serializer::default())
        .delete(key)
        .await
        .unwrap();
}

/// A load over a `MultiLevelCache` through `as_backend()` (CacheLoader, CacheStrategies'
/// read-through, `Cache::read_through_with`) whose key another instance invalidates while the
/// loader reads the source: the loaded value may be older than the write behind that
/// invalidation, and is served but not cached — as `MultiLevelCache::get_or_load` does (found by
/// review: it was stored and announced, and every instance served it for the TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_overtaken_by_an_invalidation_elsewhere_is_not_cached() {
    let server = RedisServer::start().unwrap();
    let (ma, mb) = (instance(&server).await, instance(&server).await);
    overtaken_loads_are_not_cached(&ma, &mb).await;
}

/// The same on a 3+3 Redis Cluster (the backplane, the keys and the invalidation on
/// different nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_overtaken_by_an_invalidation_elsewhere_is_not_cached_on_a_cluster() {
    let cluster = ncm_cache_testkit::RedisCluster::start().unwrap();
    let config = || {
        let mut c = RedisConfig::default();
        c.cluster_nodes = cluster.node_urls();
        c
    };
    let (ma, mb) = (instance_on(config()).await, instance_on(config()).await);
    overtaken_loads_are_not_cached(&ma, &mb).await;
}

/// What a source read of the overtaken-load tests returns.
type SourceRead =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, std::io::Error>> + Send>>;

/// A source read that tells it began (`entered`), then waits to be released; answers "old".
fn slow_source(
    entered: &Arc<tokio::sync::Notify>,
    release: &Arc<tokio::sync::Notify>,
) -> impl Fn() -> SourceRead + Clone + Send + Sync + 'static {
    let (entered, release) = (Arc::clone(entered), Arc::clone(release));
    move || {
        let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
        Box::pin(async move {
            entered.notify_one();
            release.notified().await;
            Ok("old".to_string())
        })
    }
}

/// `CacheLoader`s of instances A and B with a loader `user`: A's reads `source`, B's answers
/// "new".
fn user_loaders(
    a: Cache<Serializer>,
    b: Cache<Serializer>,
    source: impl Fn() -> SourceRead + Send + Sync + 'static,
) -> (CacheLoader<Serializer>, CacheLoader<Serializer>) {
    let (loader_a, loader_b) = (CacheLoader::new(a), CacheLoader::new(b));
    loader_a
        .register_loader(
            "user",
            move |_id: u64| source(),
            Duration::from_secs(60),
            CacheStrategy::CacheAside,
        )
        .unwrap();
    loader_b
        .register_loader(
            "user",
            |_id: u64| async { Ok::<_, std::io::Error>("new".to_string()) },
            Duration::from_secs(60),
            CacheStrategy::CacheAside,
        )
        .unwrap();
    (loader_a, loader_b)
}

/// A (loading) and B (invalidating) as in the two tests above.
async fn overtaken_loads_are_not_cached(ma: &MultiLevelCache, mb: &MultiLevelCache) {
    use tokio::sync::Notify;
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let slow_source = slow_source(&entered, &release);
    // CacheLoader.
    let (loader_a, loader_b) = user_loaders(
        Cache::new(ma.as_backend(), Serializer::default()),
        Cache::new(mb.as_backend(), Serializer::default()),
        slow_source.clone(),
    );
    let load = tokio::spawn({
        let a = loader_a.clone();
        async move { a.load::<u64, String>("user", 1).await.unwrap() }
    });
    overtaken(&entered, &release, load, async {
        loader_b.invalidate("user", &1u64).await.unwrap();
    })
    .await;
    let v: String = loader_b.load("user", 1u64).await.unwrap();
    assert_eq!(v, "new", "CacheLoader cached the overtaken load");
    assert_eq!(ma.get_stats().loads_not_cached, 1);

    // CacheStrategies::read_through and Cache::read_through_with.
    let strategies = CacheStrategies::new(Cache::new(ma.as_backend(), Serializer::default()));
    let source = slow_source.clone();
    let load = tokio::spawn(async move {
        strategies
            .read_through("k2", source, Duration::from_secs(60))
            .await
            .unwrap()
    });
    overtaken(&entered, &release, load, delete_on(mb, "k2")).await;
    assert!(
        mb.l2().get("k2").await.unwrap().is_none(),
        "read_through cached the overtaken load"
    );
    let cache = Cache::new(ma.as_backend(), Serializer::default());
    let source = slow_source.clone();
    let load = tokio::spawn(async move {
        cache
            .read_through_with("k3", source, Duration::from_secs(60), Default::default())
            .await
            .unwrap()
    });
    overtaken(&entered, &release, load, delete_on(mb, "k3")).await;
    assert!(
        mb.l2().get("k3").await.unwrap().is_none(),
        "read_through_with cached the overtaken load"
    );
    assert_eq!(ma.get_stats().loads_not_cached, 3);
}

/// Two strategies instances over multi-level caches *without* a backplane (nothing keeps their
/// L1s coherent but the strategies' messages), on one Redis under `prefix`.
async fn quiet_strategies_pair(
    server: &RedisServer,
    prefix: &str,
    name: &str,
    fail_safe: Option<Duration>,
) -> Vec<(MultiLevelCache, CacheStrategies)> {
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = prefix.into();
    let mut caches = Vec::new();
    for _ in 0..2 {
        let redis = RedisCache::connect(c.clone()).await.unwrap();
        let mut multi = MultiLevelCache::builder(redis.backend()).name(name);
        if let Some(age) = fail_safe {
            multi = multi.fail_safe(age);
        }
        let multi = multi.build().unwrap();
        let strategies =
            CacheStrategies::builder(Cache::new(multi.as_backend(), Serializer::default()))
                .redis(Arc::clone(redis.redis_backend()))
                .build()
                .await
                .unwrap();
        caches.push((multi, strategies));
    }
    caches
}

/// The same two strategies instances over multi-level caches *without* a backplane (nothing
/// keeps their L1s coherent but the strategies' messages): A's write reaches B's L1 through
/// `evict_local`, which evicts B's L1 copy and leaves the shared L2 alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_messages_evict_the_l1_of_a_multilevel_cache_without_a_backplane() {
    let server = RedisServer::start().unwrap();
    let caches =
        quiet_strategies_pair(&server, "app:", "quiet", Some(Duration::from_secs(600))).await;
    let (ma, sa) = &caches[0];
    let (mb, sb) = &caches[1];
    let db: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let store = map_store(&db);
    let hour = Duration::from_secs(3600);
    sa.write_through("k", &"v1".to_string(), hour, &store)
        .await
        .unwrap();
    // B reads it into its L1 (served from there from now on).
    let b = sb.cache().clone();
    let (hits, start) = (mb.get_stats().l1_hits, Instant::now());
    while mb.get_stats().l1_hits == hits {
        assert_eq!(b.get::<String>("k").await.unwrap().as_deref(), Some("v1"));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "B never used its L1"
        );
    }
    let before = sb.invalidation_stats().remote_messages;
    sa.write_through("k", &"v2".to_string(), hour, &store)
        .await
        .unwrap();
    eventually(Some("v2".to_string()), || async {
        b.get::<String>("k").await.unwrap()
    })
    .await;
    assert!(sb.invalidation_stats().remote_messages > before);
    assert!(
        ma.l2().get("k").await.unwrap().is_some(),
        "B deleted A's write"
    );

    // Another instance's `pattern_based_invalidation("*")`: B's L1 is emptied, not kept as
    // stale-only for fail-safe.
    assert!(mb.l1_len() > 0);
    sa.pattern_based_invalidation("*", |_, _| {}).await.unwrap();
    until("B's L1 drops the cleared entries", || mb.l1_len() == 0).await;
}

/// The same caches, with write-behind: A's queue evicts the key after persisting a write the
/// cache no longer held (an invalidation let B's read-through cache the store's older row).
/// That eviction is announced: B's L1 drops the older row too. Before (review, helper-80 #4)
/// the queue's own cache changes were never announced, and B served the older row from its
/// L1 for its TTL while the store held A's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_behind_queues_evictions_reach_other_instances_l1() {
    let server = RedisServer::start().unwrap();
    let caches = quiet_strategies_pair(&server, "wbq:", "quiet", None).await;
    let (_, sa) = &caches[0];
    let (mb, sb) = &caches[1];
    let db: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    db.lock().unwrap().insert("k".into(), "v1".into());
    let store = map_store(&db);
    let hour = Duration::from_secs(3600);
    sa.write_behind("k", &"v2".to_string(), hour, &store, hour)
        .await
        .unwrap();
    sa.invalidate("k").await.unwrap();
    // B reads the store's older row through, into L2 and its L1 (once A's messages are in).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let read_b = || {
        let db = Arc::clone(&db);
        async move {
            sb.read_through::<String, _, _, _>(
                "k",
                move || async move { Ok::<_, std::io::Error>(db.lock().unwrap()["k"].clone()) },
                hour,
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(read_b().await, "v1");
    let hits = mb.get_stats().l1_hits;
    assert_eq!(read_b().await, "v1");
    assert!(mb.get_stats().l1_hits > hits, "B never used its L1");
    sa.flush().await.unwrap();
    assert_eq!(db.lock().unwrap()["k"], "v2");
    eventually("v2".to_string(), read_b).await;
}

/// Multi-level caches without a backplane, coordinated by the strategies' messages: A's
/// `invalidate` told B before its delete reached the shared L2, so B missed, read the old value
/// from L2 and kept it in L1 for its TTL (found by review). A's L2 goes through a proxy that
/// delays it; its coordination connection does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_reaches_other_instances_after_the_shared_delete() {
    let server = RedisServer::start().unwrap();
    let proxy = ncm_cache_testkit::FaultProxy::start(server.addr()).unwrap();
    let mut direct = RedisConfig::from_url(&server.url()).unwrap();
    direct.key_prefix = "app:".into();
    let mut slow = RedisConfig::from_url(&proxy.url()).unwrap();
    slow.key_prefix = "app:".into();
    slow.response_timeout = Duration::from_secs(5);
    slow.health_check_interval = None;
    let mut caches = Vec::new();
    for l2 in [slow, direct.clone()] {
        let redis = RedisCache::connect(l2).await.unwrap();
        let multi = MultiLevelCache::builder(redis.backend())
            .name("quiet")
            .build()
            .unwrap();
        let coordination = RedisCache::connect(direct.clone()).await.unwrap();
        let strategies =
            CacheStrategies::builder(Cache::new(multi.as_backend(), Serializer::default()))
                .redis(Arc::clone(coordination.redis_backend()))
                .build()
                .await
                .unwrap();
        caches.push((multi, strategies));
    }
    let (_, sa) = &caches[0];
    let (mb, sb) = &caches[1];
    let b = sb.cache().clone();
    b.set("k", &"v1".to_string()).await.unwrap();
    let hits = mb.get_stats().l1_hits;
    assert_eq!(b.get::<String>("k").await.unwrap().as_deref(), Some("v1"));
    assert!(mb.get_stats().l1_hits > hits, "B serves k from its L1");
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Delay(Duration::from_millis(
        300,
    )));
    let before = sb.invalidation_stats().remote_messages;
    let invalidate = {
        let a = sa.clone();
        tokio::spawn(async move { a.invalidate("k").await })
    };
    // Reads while A's invalidation is under way may see v1; the first read after B hears it
    // must not bring v1 back into L1.
    let start = Instant::now();
    while sb.invalidation_stats().remote_messages == before {
        assert!(start.elapsed() < Duration::from_secs(5), "B never heard A");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = b.get::<String>("k").await.unwrap();
    assert!(invalidate.await.unwrap().unwrap(), "A deleted k");
    proxy.set_mode(ncm_cache_testkit::ProxyMode::Pass);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        b.get::<String>("k").await.unwrap(),
        None,
        "B kept the invalidated value in its L1"
    );
}

/// `time_based_invalidation` over multi-level caches (no backplane, coordinated by the
/// strategies): B promoted the key into its L1 after A gave it a 1 s TTL; the promotion does not
/// know the entry's remaining TTL, so B kept serving the key after it expired and A's callback
/// ran (found by review). The expiry now evicts the local copies, here and elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_is_not_served_from_l1_after_its_time_based_callback() {
    use std::sync::atomic::AtomicBool;
    let server = RedisServer::start().unwrap();
    let caches = quiet_strategies_pair(&server, "app:", "expiring", None).await;
    let (ma, sa) = &caches[0];
    let (mb, sb) = &caches[1];
    let (a, b) = (sa.cache().clone(), sb.cache().clone());
    a.set("k", &"v".to_string()).await.unwrap();
    let fired = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&fired);
    assert!(
        sa.time_based_invalidation("k", Duration::from_secs(1), move |_| {
            f.store(true, Ordering::SeqCst);
        })
        .await
        .unwrap()
    );
    // Both instances read it into their L1 (served from there from now on).
    for (cache, multi) in [(&a, ma), (&b, mb)] {
        let (hits, start) = (multi.get_stats().l1_hits, Instant::now());
        while multi.get_stats().l1_hits == hits {
            assert_eq!(
                cache.get::<String>("k").await.unwrap().as_deref(),
                Some("v")
            );
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "never served from L1"
            );
        }
    }
    let start = Instant::now();
    while !fired.load(Ordering::SeqCst) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the callback never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eventually(None, || async { b.get::<String>("k").await.unwrap() }).await;
    assert_eq!(a.get::<String>("k").await.unwrap(), None);
}

/// Another instance's event reaches B after A wrote one of the event's keys again: B runs its
/// handlers and evicts the keys from its L1 only (the trigger deleted them from the shared
/// L2 already), so A's newer write stays (found by review: B deleted it from L2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_event_does_not_delete_a_newer_write_from_the_shared_l2() {
    use std::sync::atomic::AtomicBool;
    let server = RedisServer::start().unwrap();
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    let coordination = RedisCache::connect(c).await.unwrap();
    let (ma, mb) = (instance(&server).await, instance(&server).await);
    let sb = CacheStrategies::builder(Cache::new(mb.as_backend(), Serializer::default()))
        .redis(Arc::clone(coordination.redis_backend()))
        .build()
        .await
        .unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&ran);
    sb.event_based_invalidation("user_updated", ["user:1"], move |_, _| {
        r.store(true, Ordering::SeqCst);
    })
    .await
    .unwrap();
    // A's write after the trigger deleted the key; then the trigger's message reaches B.
    Cache::new(ma.as_backend(), Serializer::default())
        .set("user:1", &"v2".to_string())
        .await
        .unwrap();
    let event = |complete: bool| {
        let (ran, backend) = (Arc::clone(&ran), Arc::clone(coordination.redis_backend()));
        async move {
            ran.store(false, Ordering::SeqCst);
            let message = format!(
                r#"{{"origin":"another-instance","kind":"event","event":"user_updated","complete":{complete}}}"#
            );
            backend
                .publish("strategies", message.as_bytes())
                .await
                .unwrap();
            until("B runs its handler", || ran.load(Ordering::SeqCst)).await;
        }
    };
    event(true).await;
    assert!(
        ma.l2().get("user:1").await.unwrap().is_some(),
        "B's handler deleted A's newer write from L2"
    );
    // A trigger that could not read the other instances' registrations (so did not delete
    // B's keys): B deletes them from the cache itself.
    event(false).await;
    assert!(
        ma.l2().get("user:1").await.unwrap().is_none(),
        "B left its registered key in L2 after an incomplete trigger"
    );
}

/// A load that misses, reads the source (`old`), and meanwhile sees another instance write a
/// newer value (`new`) to the shared Redis without hearing of it before its store (a plain
/// Redis cache has nothing to hear it with; a multi-level cache without a backplane neither):
/// the load's older value must not overwrite the newer write. The caller still gets what it
/// loaded. Covers `CacheLoader` (the other instance invalidates, then loads `new` itself; and
/// a write-behind loader), `CacheStrategies::read_through`, `Cache::read_through_with` and, for
/// multi-level caches, `MultiLevelCache::get_or_load` and `get_many_or_load`.
async fn loads_do_not_overwrite_a_newer_write(
    a: impl ncm_cache::core::CacheBackend,
    b: impl ncm_cache::core::CacheBackend,
    multi: Option<(&MultiLevelCache, &MultiLevelCache)>,
) {
    use tokio::sync::Notify;
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let slow_source = slow_source(&entered, &release);
    let (cache_a, cache_b) = (
        Cache::new(a, Serializer::default()),
        Cache::new(b, Serializer::default()),
    );
    let newest = |key: &'static str| {
        let (ca, cb) = (cache_a.clone(), cache_b.clone());
        async move {
            let on_b: Option<String> = cb.get(key).await.unwrap();
            let on_a: Option<String> = ca.get(key).await.unwrap();
            (on_b, on_a)
        }
    };
    let want = (Some("new".to_string()), Some("new".to_string()));

    // CacheLoader: B invalidates and loads `new` while A's load of `old` is under way.
    let (loader_a, loader_b) = user_loaders(cache_a.clone(), cache_b.clone(), slow_source.clone());
    let load = tokio::spawn({
        let a = loader_a.clone();
        async move { a.load::<u64, String>("user", 1).await.unwrap() }
    });
    overtaken(&entered, &release, load, async {
        loader_b.invalidate("user", &1u64).await.unwrap();
        let v: String = loader_b.load("user", 1u64).await.unwrap();
        assert_eq!(v, "new");
    })
    .await;
    let key = ncm_cache::loader::loader_key("user", &ncm_cache::loader::args_key(&1u64).unwrap());
    let on_b: Option<String> = cache_b.get(&key).await.unwrap();
    let on_a: Option<String> = cache_a.get(&key).await.unwrap();
    assert_eq!(
        (on_b, on_a),
        want,
        "CacheLoader: the overtaken load overwrote the newer value"
    );

    // A write-behind loader: its store runs in the background after the call returns.
    let source = slow_source.clone();
    loader_a
        .register_loader(
            "later",
            move |_id: u64| source(),
            Duration::from_secs(60),
            CacheStrategy::WriteBehind,
        )
        .unwrap();
    let load = tokio::spawn({
        let a = loader_a.clone();
        async move { a.load::<u64, String>("later", 1).await.unwrap() }
    });
    let key = ncm_cache::loader::loader_key("later", &ncm_cache::loader::args_key(&1u64).unwrap());
    overtaken(&entered, &release, load, async {
        cache_b.set(&key, &"new".to_string()).await.unwrap();
    })
    .await;
    // The background store has had its time (`overtaken` waited for the caller).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let on_b: Option<String> = cache_b.get(&key).await.unwrap();
    let on_a: Option<String> = cache_a.get(&key).await.unwrap();
    assert_eq!(
        (on_b, on_a),
        want,
        "write-behind CacheLoader: the overtaken load overwrote the newer value"
    );

    // CacheStrategies::read_through: B writes `new` while A's read-through loads.
    let strategies = CacheStrategies::new(cache_a.clone());
    let source = slow_source.clone();
    let load = tokio::spawn(async move {
        strategies
            .read_through("k2", source, Duration::from_secs(60))
            .await
            .unwrap()
    });
    overtaken(&entered, &release, load, async {
        cache_b.set("k2", &"new".to_string()).await.unwrap();
    })
    .await;
    assert_eq!(
        newest("k2").await,
        want,
        "read_through: the overtaken load overwrote the newer value"
    );

    // Cache::read_through_with.
    let source = slow_source.clone();
    let load = tokio::spawn({
        let cache = cache_a.clone();
        async move {
            cache
                .read_through_with("k3", source, Duration::from_secs(60), Default::default())
                .await
                .unwrap()
        }
    });
    overtaken(&entered, &release, load, async {
        cache_b.set("k3", &"new".to_string()).await.unwrap();
    })
    .await;
    assert_eq!(
        newest("k3").await,
        want,
        "read_through_with: the overtaken load overwrote the newer value"
    );

    // MultiLevelCache::get_or_load.
    if let Some((ma, mb)) = multi {
        let source = slow_source.clone();
        let load = tokio::spawn({
            let ma = ma.clone();
            async move {
                ma.get_or_load::<String, _, _, _>("k4", source)
                    .await
                    .unwrap()
            }
        });
        overtaken(&entered, &release, load, async {
            mb.set("k4", "new".to_string()).await.unwrap();
        })
        .await;
        assert_eq!(
            newest("k4").await,
            want,
            "get_or_load: the overtaken load overwrote the newer value"
        );
        let fresh: Option<String> = ma.get("k4").await.unwrap();
        assert_eq!(
            fresh.as_deref(),
            Some("new"),
            "get_or_load kept its older value in L1"
        );

        // MultiLevelCache::get_many_or_load: `k5` written meanwhile, `k6` not.
        let source = slow_source.clone();
        let load = tokio::spawn({
            let ma = ma.clone();
            async move {
                let got = ma
                    .get_many_or_load::<String, _, _, _>(&["k5", "k6"], move |keys| async move {
                        let old = source().await?;
                        Ok::<_, std::io::Error>(
                            keys.into_iter().map(|k| (k, old.clone())).collect(),
                        )
                    })
                    .await
                    .unwrap();
                assert_eq!(got[1].as_deref(), Some("old"));
                got[0].clone().unwrap()
            }
        });
        overtaken(&entered, &release, load, async {
            mb.set("k5", "new".to_string()).await.unwrap();
        })
        .await;
        assert_eq!(
            newest("k5").await,
            want,
            "get_many_or_load: the overtaken load overwrote the newer value"
        );
        let k6: Option<String> = mb.get("k6").await.unwrap();
        assert_eq!(
            k6.as_deref(),
            Some("old"),
            "get_many_or_load stored what nobody wrote over"
        );
    }
}

/// Plain `RedisCache` instances (no L1: nothing to hear another instance's write with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_does_not_overwrite_a_write_made_during_it_on_plain_redis() {
    let server = RedisServer::start().unwrap();
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    let a = RedisCache::connect(c.clone()).await.unwrap();
    let b = RedisCache::connect(c).await.unwrap();
    loads_do_not_overwrite_a_newer_write(a.backend(), b.backend(), None).await;
}

/// Two multi-level instances without a backplane (L2 shared, nothing tells A of B's write),
/// on a single node and on a 3+3 cluster.
/// With `epoch_clear`, L2 keys live in the cache's epoch (a load's store checks it too).
async fn quiet_pair(
    config: impl Fn() -> RedisConfig,
    epoch_clear: bool,
) -> (MultiLevelCache, MultiLevelCache) {
    let mut pair = Vec::new();
    for _ in 0..2 {
        let mut c = config();
        c.key_prefix = if epoch_clear { "epoch:" } else { "app:" }.into();
        let redis = RedisCache::connect(c).await.unwrap();
        pair.push(
            MultiLevelCache::builder(redis.backend())
                .name("quiet")
                .epoch_clear(epoch_clear)
                .build()
                .unwrap(),
        );
    }
    let b = pair.pop().unwrap();
    (pair.pop().unwrap(), b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_does_not_overwrite_a_write_made_during_it_on_multilevel_caches() {
    let server = RedisServer::start().unwrap();
    for epoch_clear in [false, true] {
        let (ma, mb) = quiet_pair(
            || RedisConfig::from_url(&server.url()).unwrap(),
            epoch_clear,
        )
        .await;
        loads_do_not_overwrite_a_newer_write(ma.as_backend(), mb.as_backend(), Some((&ma, &mb)))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_does_not_overwrite_a_write_made_during_it_on_a_cluster() {
    let cluster = ncm_cache_testkit::RedisCluster::start().unwrap();
    let config = || {
        let mut c = RedisConfig::default();
        c.cluster_nodes = cluster.node_urls();
        c
    };
    let (ma, mb) = quiet_pair(config, false).await;
    loads_do_not_overwrite_a_newer_write(ma.as_backend(), mb.as_backend(), Some((&ma, &mb))).await;
    let (mut ca, mut cb) = (config(), config());
    ca.key_prefix = "plain:".into();
    cb.key_prefix = "plain:".into();
    let a = RedisCache::connect(ca).await.unwrap();
    let b = RedisCache::connect(cb).await.unwrap();
    loads_do_not_overwrite_a_newer_write(a.backend(), b.backend(), None).await;
}

/// A load that did not find its key absent — the entry there is another build's (a newer
/// envelope this build cannot read, left in place), or the call skipped the L2 read — replaces
/// it, as before stores became "only if still absent": such an entry would otherwise refuse
/// every load's store until it expires, and each read would run the loader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_replaces_what_it_could_not_read_or_did_not_read() {
    use ncm_cache::{EntryOptions, Loaded};
    let server = RedisServer::start().unwrap();
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    let redis = RedisCache::connect(c.clone()).await.unwrap();
    let multi = MultiLevelCache::builder(redis.backend()).build().unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let raw = client.get_multiplexed_async_connection().await.unwrap();
    // A newer envelope version: `Unsupported` here, left in place by reads.
    let newer = |key: &'static str| {
        let mut raw = raw.clone();
        async move {
            let _: () = redis::cmd("SET")
                .arg(format!("app:{key}"))
                .arg(&[0xC1_u8, 0x4E, 9, 1, 0, b'1'][..])
                .query_async(&mut raw)
                .await
                .unwrap();
        }
    };
    let cache = redis.cache().clone();
    let load = || async { Ok::<_, std::io::Error>(7u32) };

    newer("rt").await;
    let v: u32 = cache
        .read_through_with("rt", load, Duration::from_secs(60), Default::default())
        .await
        .unwrap();
    assert_eq!(v, 7);
    assert_eq!(
        cache.get::<u32>("rt").await.unwrap(),
        Some(7),
        "read_through_with"
    );

    newer("st").await;
    let strategies = CacheStrategies::new(cache.clone());
    let v: u32 = strategies
        .read_through("st", load, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(v, 7);
    assert_eq!(
        cache.get::<u32>("st").await.unwrap(),
        Some(7),
        "read_through"
    );

    let loader = CacheLoader::new(cache.clone());
    loader
        .register_loader(
            "n",
            move |_id: u64| load(),
            Duration::from_secs(60),
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let key = ncm_cache::loader::loader_key("n", &ncm_cache::loader::args_key(&1u64).unwrap());
    let mut conn = raw.clone();
    let _: () = redis::cmd("SET")
        .arg(format!("app:{key}"))
        .arg(&[0xC1_u8, 0x4E, 9, 1, 0, b'1'][..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let v: u32 = loader.load("n", 1u64).await.unwrap();
    assert_eq!(v, 7);
    assert_eq!(
        cache.get::<u32>(&key).await.unwrap(),
        Some(7),
        "CacheLoader"
    );

    newer("ml").await;
    let v = multi
        .get_or_load("ml", || async { Ok::<_, std::io::Error>(7u32) })
        .await
        .unwrap();
    assert_eq!(v, 7);
    assert_eq!(
        cache.get::<u32>("ml").await.unwrap(),
        Some(7),
        "get_or_load"
    );

    newer("gm").await;
    let got = multi
        .get_many_or_load::<u32, _, _, _>(&["gm"], |keys| async move {
            Ok::<_, std::io::Error>(keys.into_iter().map(|k| (k, 7u32)).collect())
        })
        .await
        .unwrap();
    assert_eq!(got, vec![Some(7)]);
    assert_eq!(
        cache.get::<u32>("gm").await.unwrap(),
        Some(7),
        "get_many_or_load"
    );

    // `skip_l2_read`: L2 holds 1, the call loads 2 without reading it, and keeps it.
    cache.set("skip", &1u32).await.unwrap();
    let skip = EntryOptions::new().skip_l2_read();
    let got = multi
        .get_or_load_with::<u32, _, _, _>("skip", &skip, |_| async {
            Ok::<_, std::io::Error>(Loaded::value(2u32))
        })
        .await
        .unwrap();
    assert_eq!(got.map(|(v, _)| *v), Some(2));
    assert_eq!(
        cache.get::<u32>("skip").await.unwrap(),
        Some(2),
        "skip_l2_read: L2"
    );
    assert_eq!(
        multi.get::<u32>("skip").await.unwrap(),
        Some(2),
        "skip_l2_read: L1"
    );
    // The same through the facade over `as_backend_with(skip_l2_read)`.
    cache.set("skip2", &1u32).await.unwrap();
    let facade = Cache::new(multi.as_backend_with(&skip).unwrap(), Serializer::default());
    let v: u32 = facade
        .read_through_with(
            "skip2",
            || async { Ok::<_, std::io::Error>(2u32) },
            Duration::from_secs(60),
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(v, 2);
    assert_eq!(
        cache.get::<u32>("skip2").await.unwrap(),
        Some(2),
        "as_backend_with(skip_l2_read)"
    );
}

/// A caller that arrives after an invalidation of a key does not join a load of it that began
/// before (single-flight): that load may have read the source before the write behind the
/// invalidation, and would hand this caller the older value (read-your-writes). The caller
/// starts its own load; the earlier one is served to its own callers and not stored.
/// `CacheStrategies::read_through` and `CacheLoader`, over a `MemoryBackend` and over a
/// multi-level cache (as `MultiLevelCache::get_or_load` already does).
async fn later_callers_do_not_join_an_older_load(backend: impl ncm_cache::core::CacheBackend) {
    use tokio::sync::Notify;
    let cache = Cache::new(backend, Serializer::default());
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    // The first read of the source is slow and finds `old`; later ones find `new`.
    let source = {
        let (entered, release, calls) = (
            Arc::clone(&entered),
            Arc::clone(&release),
            Arc::clone(&calls),
        );
        move || {
            let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
            let first = calls.fetch_add(1, Ordering::SeqCst) % 2 == 0;
            async move {
                if !first {
                    return Ok::<_, std::io::Error>("new".to_string());
                }
                entered.notify_one();
                release.notified().await;
                Ok("old".to_string())
            }
        }
    };
    let ttl = Duration::from_secs(60);

    let strategies = CacheStrategies::new(cache.clone());
    let first = tokio::spawn({
        let (s, source) = (strategies.clone(), source.clone());
        async move { s.read_through("j", source, ttl).await.unwrap() }
    });
    entered.notified().await;
    cache.delete("j").await.unwrap();
    let second = tokio::time::timeout(
        Duration::from_secs(2),
        strategies.read_through("j", source.clone(), ttl),
    )
    .await
    .expect("read_through: the caller after the delete waited for the older load")
    .unwrap();
    assert_eq!(second, "new", "read_through: joined the older load");
    release.notify_one();
    assert_eq!(first.await.unwrap(), "old");
    let cached: Option<String> = cache.get("j").await.unwrap();
    assert_eq!(cached.as_deref(), Some("new"), "read_through");

    let loader = CacheLoader::new(cache.clone());
    let s = source.clone();
    loader
        .register_loader("u", move |_id: u64| s(), ttl, CacheStrategy::CacheAside)
        .unwrap();
    let first = tokio::spawn({
        let loader = loader.clone();
        async move { loader.load::<u64, String>("u", 1).await.unwrap() }
    });
    entered.notified().await;
    loader.invalidate("u", &1u64).await.unwrap();
    let second: String = tokio::time::timeout(Duration::from_secs(2), loader.load("u", 1u64))
        .await
        .expect("CacheLoader: the caller after the invalidation waited for the older load")
        .unwrap();
    assert_eq!(second, "new", "CacheLoader: joined the older load");
    release.notify_one();
    assert_eq!(first.await.unwrap(), "old");
    let key = ncm_cache::loader::loader_key("u", &ncm_cache::loader::args_key(&1u64).unwrap());
    let cached: Option<String> = cache.get(&key).await.unwrap();
    assert_eq!(cached.as_deref(), Some("new"), "CacheLoader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_callers_do_not_join_a_load_begun_before_an_invalidation() {
    later_callers_do_not_join_an_older_load(ncm_cache::MemoryBackend::new()).await;
    let server = RedisServer::start().unwrap();
    let multi = instance(&server).await;
    later_callers_do_not_join_an_older_load(multi.as_backend()).await;
}

/// Naming flights by the key's load mark does not split a cold key's stampede: 50 concurrent
/// callers of one missing key over a multi-level cache run the loader once, through
/// `CacheStrategies::read_through` and `CacheLoader`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_of_a_cold_key_share_one_load_over_a_multilevel_cache() {
    let server = RedisServer::start().unwrap();
    let multi = instance(&server).await;
    let cache = Cache::new(multi.as_backend(), Serializer::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let source = {
        let calls = Arc::clone(&calls);
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<_, std::io::Error>("v".to_string())
            }
        }
    };
    let ttl = Duration::from_secs(60);
    let strategies = CacheStrategies::new(cache.clone());
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let (s, source) = (strategies.clone(), source.clone());
            tokio::spawn(async move { s.read_through("hot", source, ttl).await.unwrap() })
        })
        .collect();
    for c in callers {
        assert_eq!(c.await.unwrap(), "v");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "read_through");

    calls.store(0, Ordering::SeqCst);
    let loader = CacheLoader::new(cache.clone());
    let s = source.clone();
    loader
        .register_loader("hot", move |_id: u64| s(), ttl, CacheStrategy::CacheAside)
        .unwrap();
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let loader = loader.clone();
            tokio::spawn(async move { loader.load::<u64, String>("hot", 1).await.unwrap() })
        })
        .collect();
    for c in callers {
        assert_eq!(c.await.unwrap(), "v");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "CacheLoader");
}

/// L1 (300 ms) + Redis L2 with fail-safe (1 h), short Redis timeouts: the fail-safe rig.
async fn fail_safe_instance(server: &RedisServer, prefix: &str) -> MultiLevelCache {
    fail_safe_instance_aged(server, prefix, Duration::from_secs(3600)).await
}

/// [`fail_safe_instance`] whose stale copies are served for `age` past their L1 TTL.
async fn fail_safe_instance_aged(
    server: &RedisServer,
    prefix: &str,
    age: Duration,
) -> MultiLevelCache {
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = prefix.into();
    c.health_check_interval = None;
    c.connect_timeout = Duration::from_millis(300);
    c.response_timeout = Duration::from_millis(300);
    let redis = RedisCache::connect(c).await.unwrap();
    MultiLevelCache::builder(redis.backend())
        .name("fail-safe")
        .l1_default_ttl(Duration::from_millis(300))
        .fail_safe(age)
        .build()
        .unwrap()
}

/// A source answering "v1" until the test sets another answer (`None`: it fails), and its
/// read as a loader.
#[allow(clippy::type_complexity)]
fn switchable_source() -> (
    Arc<Mutex<Option<&'static str>>>,
    impl Fn() -> std::future::Ready<std::result::Result<String, std::io::Error>>
    + Clone
    + Send
    + Sync
    + 'static,
) {
    let source: Arc<Mutex<Option<&'static str>>> = Arc::new(Mutex::new(Some("v1")));
    let read = {
        let source = Arc::clone(&source);
        move || {
            let now = *source.lock().unwrap();
            std::future::ready(
                now.map(str::to_owned)
                    .ok_or_else(|| std::io::Error::other("database down")),
            )
        }
    };
    (source, read)
}

/// The README's setup with fail-safe: L1 (300 ms) + Redis L2, fail-safe 1 h. Redis dies; a
/// loader, a macro-style `CacheLoader` load, a `CacheReloader` read, `Cache::read_through` and
/// `CacheStrategies::read_through` whose key has only a stale L1 copy left run their load (the
/// database is up: its newer value is served), and serve the stale copy only when the load
/// fails too. Before (found by review), the byte-level read served the stale copy as a hit, so
/// none of them asked the source for the whole outage (up to the max stale age).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_over_a_fail_safe_cache_ask_the_source_while_redis_is_down() {
    use ncm_cache::ReloadStrategy;
    use ncm_cache::loader::CacheReloader;
    let mut server = RedisServer::start().unwrap();
    let multi = fail_safe_instance(&server, "fs:").await;
    let cache = Cache::new(multi.as_backend(), Serializer::default());
    // The source: "v1" now, then down, then "v2".
    let (source, read) = switchable_source();
    let loader = CacheLoader::new(cache.clone());
    let read_user = read.clone();
    loader
        .register_loader(
            "user",
            move |_id: u64| read_user(),
            Duration::from_secs(60),
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let reloader = CacheReloader::new(cache.clone());
    let read_cfg = read.clone();
    reloader
        .register_loader(
            "cfg",
            read_cfg,
            Some(Duration::from_secs(60)),
            ReloadStrategy::Lazy,
        )
        .unwrap();
    let strategies = CacheStrategies::new(cache.clone());
    let reads = |round: &'static str| {
        let (loader, reloader, cache, strategies, read) = (
            loader.clone(),
            &reloader,
            cache.clone(),
            &strategies,
            read.clone(),
        );
        async move {
            let user: std::result::Result<String, _> = loader.load("user", 1u64).await;
            let cfg: std::result::Result<String, _> = reloader.get("cfg").await;
            let through: std::result::Result<String, _> = cache
                .read_through("through", read.clone(), Duration::from_secs(60))
                .await;
            let strat: std::result::Result<String, _> = strategies
                .read_through("strat", read, Duration::from_secs(60))
                .await;
            let all =
                [user, cfg, through, strat].map(|r| r.unwrap_or_else(|e| format!("error: {e}")));
            eprintln!("{round}: {all:?}");
            all
        }
    };
    assert_eq!(reads("warm").await, ["v1"; 4].map(String::from));
    // L1's copies go stale, Redis dies, and the source fails too: the stale copies (within
    // the max stale age) are served.
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.kill();
    *source.lock().unwrap() = None;
    assert_eq!(
        reads("both down").await,
        ["v1"; 4].map(String::from),
        "a stale copy was not served when the load failed too"
    );
    // The source is back with a newer value, Redis still down: the loads ask it.
    *source.lock().unwrap() = Some("v2");
    assert_eq!(
        reads("redis down").await,
        ["v2"; 4].map(String::from),
        "a stale copy was served while the source was up"
    );
    // Those loads' L2 stores failed: their values stay in L1 (as `get_or_load` keeps one), so
    // when the source fails again once they are stale, they are what fail-safe serves (before:
    // the failed store evicted the key, and every later read of the outage failed; found by
    // review).
    *source.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        reads("both down again").await,
        ["v2"; 4].map(String::from),
        "the loads of the outage left nothing for fail-safe"
    );
}

/// Creates `users (id, name)` holding `(1, 'Ada')` through `sql`.
async fn users_with_ada(sql: &SqlCache) {
    sql.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)", ())
        .await
        .unwrap();
    sql.execute("INSERT INTO users VALUES (%s, %s)", params![1, "Ada"])
        .await
        .unwrap();
}

/// `SqlCache` over a fail-safe multi-level cache while Redis is down: a query whose cached
/// result has only a stale L1 copy left goes to the database (the database's newer row is
/// served), and the stale copy is served only when the database fails too (found by review:
/// the entry and its table tokens were read with `get_many`, which served the copies as hits,
/// so the database was never asked during the outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_a_fail_safe_cache_asks_the_database_while_redis_is_down() {
    let mut server = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let multi = fail_safe_instance(&server, "sqlfs:").await;
    let sql = SqlCache::builder(
        Cache::new(multi.as_backend(), Serializer::default()),
        SqliteExecutor::connect(&url).await.unwrap(),
    )
    .build()
    .unwrap();
    users_with_ada(&sql).await;
    let query = "SELECT name FROM users WHERE id = %s";
    let name = |rows: Option<ncm_cache::sql::Rows>| {
        rows.and_then(|r| r.get(0, "name").cloned())
            .unwrap_or(SqlValue::Null)
    };
    let read = |strategy| {
        let sql = sql.clone();
        async move {
            sql.cache_query(query, params![1], strategy, None)
                .await
                .map(name)
        }
    };
    assert_eq!(
        read(QueryCacheStrategy::CacheFirst).await.unwrap(),
        SqlValue::Text("Ada".into())
    );
    // A slow query (a 300,000-row count), cached too.
    let slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) \
                SELECT (SELECT name FROM users WHERE id = %s) AS name, count(*) AS n FROM c";
    let read_slow = || {
        let sql = sql.clone();
        async move {
            sql.cache_query(slow, params![1], QueryCacheStrategy::CacheFirst, None)
                .await
                .map(name)
        }
    };
    assert_eq!(read_slow().await.unwrap(), SqlValue::Text("Ada".into()));
    // The copies go stale, Redis dies, and the row changes behind the cache's back (another
    // program: the cache cannot hear of it while Redis is down).
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.kill();
    let other = SqliteExecutor::connect(&url).await.unwrap();
    ncm_cache::sql::SqlExecutor::execute(
        &other,
        "UPDATE users SET name = ? WHERE id = ?",
        &[SqlValue::Text("Grace".into()), SqlValue::Int(1)],
    )
    .await
    .unwrap();
    assert_eq!(
        read(QueryCacheStrategy::CacheFirst).await.unwrap(),
        SqlValue::Text("Grace".into()),
        "a stale copy was served while the database was up"
    );
    // Concurrent callers that saw the same copies share one query (found by review: each
    // asked the database).
    let before = sql.get_performance_stats().db_queries;
    let callers: Vec<_> = (0..10).map(|_| tokio::spawn(read_slow())).collect();
    for caller in callers {
        assert_eq!(
            caller.await.unwrap().unwrap(),
            SqlValue::Text("Grace".into())
        );
    }
    let queries = sql.get_performance_stats().db_queries - before;
    assert!(queries <= 2, "10 concurrent callers ran {queries} queries");
    // The cache alone answers with its copy.
    assert_eq!(
        read(QueryCacheStrategy::CacheOnly).await.unwrap(),
        SqlValue::Text("Ada".into())
    );
    // The database fails too (the table is gone): the stale copy is served.
    ncm_cache::sql::SqlExecutor::execute(&other, "DROP TABLE users", &[])
        .await
        .unwrap();
    assert_eq!(
        read(QueryCacheStrategy::CacheFirst).await.unwrap(),
        SqlValue::Text("Ada".into()),
        "the stale copy was not served when the database failed"
    );
}

/// Fail-safe's main case over a multi-level cache, Redis up: the entries' L2 copies expired
/// (a 500 ms TTL; L1 300 ms) and the source is down — a `CacheLoader` load, a `CacheReloader`
/// read, `Cache::read_through`, `CacheStrategies::read_through` and a `SqlCache` query serve
/// their stale L1 copy; once the source is back they serve its newer value, not the copy.
/// Before (review, helper-74), L2's "absent" dropped the copy on the byte-level path all of
/// them take, and each returned the source's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_over_a_fail_safe_cache_serve_the_copy_of_an_expired_entry_when_the_source_fails() {
    use ncm_cache::ReloadStrategy;
    use ncm_cache::loader::CacheReloader;
    let server = RedisServer::start().unwrap();
    let multi = fail_safe_instance(&server, "fsx:").await;
    let cache = Cache::new(multi.as_backend(), Serializer::default());
    let ttl = Duration::from_millis(500);
    let (source, read) = switchable_source();
    let loader = CacheLoader::new(cache.clone());
    let read_user = read.clone();
    loader
        .register_loader(
            "user",
            move |_id: u64| read_user(),
            ttl,
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let reloader = CacheReloader::new(cache.clone());
    reloader
        .register_loader("cfg", read.clone(), Some(ttl), ReloadStrategy::Lazy)
        .unwrap();
    let strategies = CacheStrategies::new(cache.clone());
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let sql = SqlCache::builder(cache.clone(), SqliteExecutor::connect(&url).await.unwrap())
        .build()
        .unwrap();
    users_with_ada(&sql).await;
    let reads = |round: &'static str| {
        let (loader, reloader, cache, strategies, read, sql) = (
            loader.clone(),
            &reloader,
            cache.clone(),
            &strategies,
            read.clone(),
            sql.clone(),
        );
        async move {
            let user: std::result::Result<String, _> = loader.load("user", 1u64).await;
            let cfg: std::result::Result<String, _> = reloader.get("cfg").await;
            let through: std::result::Result<String, _> =
                cache.read_through("through", read.clone(), ttl).await;
            let strat: std::result::Result<String, _> =
                strategies.read_through("strat", read, ttl).await;
            let query: std::result::Result<String, _> = sql
                .cache_query(
                    "SELECT name FROM users WHERE id = %s",
                    params![1],
                    QueryCacheStrategy::CacheFirst,
                    Some(ttl),
                )
                .await
                .map(|rows| match rows.and_then(|r| r.get(0, "name").cloned()) {
                    Some(SqlValue::Text(name)) => name,
                    other => format!("{other:?}"),
                });
            let all = [user, cfg, through, strat, query]
                .map(|r| r.unwrap_or_else(|e| format!("error: {e}")));
            eprintln!("{round}: {all:?}");
            all
        }
    };
    assert_eq!(
        reads("warm").await,
        ["v1", "v1", "v1", "v1", "Ada"].map(String::from)
    );
    // L2's copies expire (L1's go stale), and the source fails: the copies are served.
    tokio::time::sleep(Duration::from_millis(800)).await;
    *source.lock().unwrap() = None;
    let other = SqliteExecutor::connect(&url).await.unwrap();
    ncm_cache::sql::SqlExecutor::execute(&other, "DROP TABLE users", &[])
        .await
        .unwrap();
    assert_eq!(
        reads("source down").await,
        ["v1", "v1", "v1", "v1", "Ada"].map(String::from),
        "a stale copy was not served when the source failed"
    );
    // The source is back, newer: it is asked, and its values served.
    *source.lock().unwrap() = Some("v2");
    for statement in [
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
        "INSERT INTO users VALUES (1, 'Grace')",
    ] {
        ncm_cache::sql::SqlExecutor::execute(&other, statement, &[])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        reads("source back").await,
        ["v2", "v2", "v2", "v2", "Grace"].map(String::from),
        "a stale copy was served while the source was up"
    );
    // A query's copy whose table was written through the cache since (its generation token
    // moved) is not served, even when the database fails.
    tokio::time::sleep(Duration::from_millis(800)).await;
    sql.execute(
        "UPDATE users SET name = %s WHERE id = %s",
        params!["Ada", 1],
    )
    .await
    .unwrap();
    ncm_cache::sql::SqlExecutor::execute(&other, "DROP TABLE users", &[])
        .await
        .unwrap();
    let after = sql
        .cache_query(
            "SELECT name FROM users WHERE id = %s",
            params![1],
            QueryCacheStrategy::CacheFirst,
            Some(ttl),
        )
        .await;
    assert!(
        after.is_err(),
        "a copy older than a write to its table was served: {after:?}"
    );
}

/// Over a multi-level cache with the distributed lock (`over_redis`), a `CacheLoader` whose
/// load fails releases the key's lock at once: a caller on another instance that waited for
/// it takes it and loads right away, not after the lock's TTL (10 s) or wait (15 s). (The
/// cross-process case of one load for many callers: `load_processes.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_over_the_lock_lets_another_instance_load_at_once() {
    let server = RedisServer::start().unwrap();
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    let redis = RedisCache::connect(c).await.unwrap();
    let locked = || {
        MultiLevelCache::over_redis(&redis)
            .name("locked")
            .build()
            .unwrap()
    };
    let (a, b) = (locked(), locked());
    let la = CacheLoader::new(Cache::new(a.as_backend(), Serializer::default()));
    let lb = CacheLoader::new(Cache::new(b.as_backend(), Serializer::default()));
    la.register_loader(
        "item",
        |_: String| async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Err::<String, _>(std::io::Error::other("the source is down"))
        },
        Duration::from_secs(60),
        CacheStrategy::CacheAside,
    )
    .unwrap();
    lb.register_loader(
        "item",
        |k: String| async move { Ok::<_, std::io::Error>(format!("b:{k}")) },
        Duration::from_secs(60),
        CacheStrategy::CacheAside,
    )
    .unwrap();
    let first = tokio::spawn(async move { la.load::<String, String>("item", "k".into()).await });
    // A holds the lock by now; B waits for it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let start = Instant::now();
    let got = lb.load::<String, String>("item", "k".into()).await.unwrap();
    assert_eq!(got, "b:k");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "B waited {:?} for a failed load's lock",
        start.elapsed()
    );
    assert!(first.await.unwrap().is_err());
}

/// A real database (SQLite) whose reads are counted, answer `delay` late, and fail (after
/// the delay `failing` holds) while `failing` says so.
#[derive(Debug)]
struct TestDb {
    inner: SqliteExecutor,
    delay: Duration,
    reads: Arc<AtomicUsize>,
    failing: Arc<Mutex<Option<Duration>>>,
}

impl TestDb {
    async fn open(url: &str, delay: Duration) -> Self {
        Self {
            inner: SqliteExecutor::connect(url).await.unwrap(),
            delay,
            reads: Arc::default(),
            failing: Arc::default(),
        }
    }
}

#[async_trait::async_trait]
impl ncm_cache::sql::SqlExecutor for TestDb {
    fn dialect(&self) -> ncm_cache::sql::SqlDialect {
        self.inner.dialect()
    }
    fn identity(&self) -> &str {
        self.inner.identity()
    }
    fn database_identity(&self) -> &str {
        self.inner.database_identity()
    }
    async fn fetch_all(
        &self,
        sql: &str,
        params: &[SqlValue],
    ) -> ncm_cache::core::Result<ncm_cache::sql::Rows> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let failing = *self.failing.lock().unwrap();
        if let Some(after) = failing {
            tokio::time::sleep(after).await;
            return Err(ncm_cache::core::CacheError::backend("database down", None));
        }
        let rows = self.inner.fetch_all(sql, params).await;
        tokio::time::sleep(self.delay).await;
        rows
    }
    async fn execute(&self, sql: &str, params: &[SqlValue]) -> ncm_cache::core::Result<u64> {
        self.inner.execute(sql, params).await
    }
    async fn dependencies(&self) -> ncm_cache::core::Result<Vec<(String, String)>> {
        self.inner.dependencies().await
    }
}

/// `SqlCache`s over `ma` and `mb` on one SQLite database, B's reads slowed by `b_delay`, with
/// an empty table `t (id, v)`; and the count of each one's database reads.
async fn sql_pair_with_table_t(
    url: &str,
    (ma, mb): (&MultiLevelCache, &MultiLevelCache),
    b_delay: Duration,
) -> (SqlCache, SqlCache, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (db_a, db_b) = (
        TestDb::open(url, Duration::ZERO).await,
        TestDb::open(url, b_delay).await,
    );
    let (reads_a, reads_b) = (Arc::clone(&db_a.reads), Arc::clone(&db_b.reads));
    let sql = |multi: &MultiLevelCache, db| {
        SqlCache::builder(Cache::new(multi.as_backend(), Serializer::default()), db)
            .build()
            .unwrap()
    };
    let (a, b) = (sql(ma, db_a), sql(mb, db_b));
    a.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", ())
        .await
        .unwrap();
    (a, b, reads_a, reads_b)
}

/// Starts `b`'s `CacheFirst` run of `query` (a miss: it takes the query's lock and reads its
/// slow database) and waits until it is reading.
async fn holding_the_query_lock(
    b: SqlCache,
    query: &'static str,
    ttl: Option<Duration>,
    reads_b: &AtomicUsize,
) -> tokio::task::JoinHandle<ncm_cache::core::Result<Option<ncm_cache::sql::Rows>>> {
    let holder = tokio::spawn(async move {
        b.cache_query(query, (), QueryCacheStrategy::CacheFirst, ttl)
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        reads_b.load(Ordering::SeqCst),
        1,
        "B holds the query's lock"
    );
    holder
}

/// `DbFirst` reads the database also while a `CacheFirst` call of the same query on this
/// instance waits for another instance's load of it under the stampede lock (found by review:
/// both named their flight by the key and tokens, so the `DbFirst` call joined the waiting
/// one and was answered by the other instance's result, with no database read here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_first_reads_the_database_while_cache_first_waits_for_another_instance() {
    let server = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    let redis = RedisCache::connect(c).await.unwrap();
    let (ma, mb) = (
        MultiLevelCache::over_redis(&redis).build().unwrap(),
        MultiLevelCache::over_redis(&redis).build().unwrap(),
    );
    let (a, b, reads_a, reads_b) =
        sql_pair_with_table_t(&url, (&ma, &mb), Duration::from_millis(800)).await;
    a.execute("INSERT INTO t VALUES (1, 'x'), (2, 'y')", ())
        .await
        .unwrap();
    // The table's tokens exist, so both instances read the same ones.
    a.cache_query(
        "SELECT v FROM t WHERE id = 2",
        (),
        QueryCacheStrategy::CacheFirst,
        None,
    )
    .await
    .unwrap();
    let query = "SELECT v FROM t WHERE id = 1";
    // B loads the query under the lock (800 ms).
    let holder = holding_the_query_lock(b, query, None, &reads_b).await;
    // A's CacheFirst call waits for B's load ...
    let waiting = tokio::spawn({
        let a = a.clone();
        async move {
            a.cache_query(query, (), QueryCacheStrategy::CacheFirst, None)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = reads_a.load(Ordering::SeqCst);
    // ... while A's DbFirst call reads the database.
    let rows = a
        .cache_query(query, (), QueryCacheStrategy::DbFirst, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rows.get(0, "v").and_then(SqlValue::as_str), Some("x"));
    assert_eq!(
        reads_a.load(Ordering::SeqCst),
        before + 1,
        "DbFirst was answered without reading the database"
    );
    assert!(waiting.await.unwrap().unwrap().is_some());
    assert!(holder.await.unwrap().unwrap().is_some());
    assert_eq!(reads_b.load(Ordering::SeqCst), 1);
}

/// `CacheFirst` over a fail-safe multi-level cache, the query's entry expired in L2 with a
/// copy left in L1, while another instance holds the query's lock with a slow query: the call
/// waits (up to `lock_wait`) and then reads its own, healthy database. Before (review,
/// helper-79 #3) it gave up after `lock_wait` as a waiter with a fail-safe copy does and
/// served the expired rows without asking the database; ARCHITECTURE.md said `SqlCache`
/// never gives up so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_first_over_an_expired_copy_waits_then_reads_the_database() {
    let server = RedisServer::start().unwrap();
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "fsw:".into();
    cache_first_over_an_expired_copy(c).await;
}

/// The same on a 3+3 Redis Cluster (the lock, the tokens and the entry on different nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_first_over_an_expired_copy_waits_then_reads_the_database_on_a_cluster() {
    let cluster = ncm_cache_testkit::RedisCluster::start().unwrap();
    let mut c = RedisConfig::default();
    c.cluster_nodes = cluster.node_urls();
    cache_first_over_an_expired_copy(c).await;
}

async fn cache_first_over_an_expired_copy(c: RedisConfig) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let redis = RedisCache::connect(c).await.unwrap();
    let multi = || {
        MultiLevelCache::over_redis(&redis)
            .fail_safe(Duration::from_secs(3600))
            .distributed_lock(
                Arc::clone(redis.redis_backend()),
                Duration::from_secs(2),
                Duration::from_millis(300),
            )
            .build()
            .unwrap()
    };
    let (ma, mb) = (multi(), multi());
    let (a, b, reads_a, reads_b) =
        sql_pair_with_table_t(&url, (&ma, &mb), Duration::from_millis(1500)).await;
    a.execute("INSERT INTO t VALUES (1, 'x')", ())
        .await
        .unwrap();
    let query = "SELECT v FROM t WHERE id = 1";
    let ttl = Some(Duration::from_millis(300));
    let value = |rows: Option<ncm_cache::sql::Rows>| {
        rows.and_then(|r| r.get(0, "v").and_then(SqlValue::as_str).map(str::to_owned))
    };
    let warm = a
        .cache_query(query, (), QueryCacheStrategy::CacheFirst, ttl)
        .await
        .unwrap();
    assert_eq!(value(warm).as_deref(), Some("x"));
    // The database changes behind the cache's back; the entry expires in L2.
    let other = SqliteExecutor::connect(&url).await.unwrap();
    ncm_cache::sql::SqlExecutor::execute(&other, "UPDATE t SET v = 'z' WHERE id = 1", &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // B loads the query under the lock (1.5 s).
    let holder = holding_the_query_lock(b, query, ttl, &reads_b).await;
    let before = reads_a.load(Ordering::SeqCst);
    let rows = a
        .cache_query(query, (), QueryCacheStrategy::CacheFirst, ttl)
        .await
        .unwrap();
    assert_eq!(
        value(rows).as_deref(),
        Some("z"),
        "the expired copy was served while the database answers"
    );
    assert_eq!(reads_a.load(Ordering::SeqCst), before + 1);
    assert!(holder.await.unwrap().unwrap().is_some());
}

/// A stale copy served because a load failed is still within its max stale age when it is
/// served: a failing load that outlives what was left of the copy's age fails instead, for
/// `Cache::read_through`, `CacheLoader` and `CacheStrategies::read_through` over a fail-safe
/// multi-level cache (found by review: they served the copy handed back before the load,
/// however long the load took; `get_or_load` already re-checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_is_not_served_after_a_load_that_outlived_its_max_stale_age() {
    let mut server = RedisServer::start().unwrap();
    // Fresh in L1 for 300 ms, then served stale for 2 s more.
    let multi = fail_safe_instance_aged(&server, "age:", Duration::from_secs(2)).await;
    let cache = Cache::new(multi.as_backend(), Serializer::default());
    let loader = CacheLoader::new(cache.clone());
    let strategies = CacheStrategies::new(cache.clone());
    // The source: up ("v1"), then failing at once, then failing after `slow`.
    let state: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
    let source = {
        let state = Arc::clone(&state);
        move || {
            let now = *state.lock().unwrap();
            async move {
                match now {
                    None => Ok("v1".to_owned()),
                    Some(after) => {
                        tokio::time::sleep(after).await;
                        Err(std::io::Error::other("database down"))
                    }
                }
            }
        }
    };
    loader
        .register_loader(
            "user",
            {
                let source = source.clone();
                move |_: u64| source()
            },
            Duration::from_secs(60),
            CacheStrategy::CacheAside,
        )
        .unwrap();
    let read_all = || async {
        let through: std::result::Result<String, _> = cache
            .read_through("through", source.clone(), Duration::from_secs(60))
            .await;
        let user: std::result::Result<String, _> = loader.load("user", 1u64).await;
        let strat: std::result::Result<String, _> = strategies
            .read_through("strat", source.clone(), Duration::from_secs(60))
            .await;
        [through, user, strat]
    };
    for r in read_all().await {
        assert_eq!(r.unwrap(), "v1");
    }
    server.kill();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Failing at once, within the copies' age: the copies are served.
    *state.lock().unwrap() = Some(Duration::ZERO);
    let served = multi.get_stats().stale_served;
    for r in read_all().await {
        assert_eq!(r.unwrap(), "v1", "a stale copy within its age");
    }
    assert_eq!(
        multi.get_stats().stale_served - served,
        3,
        "the copies served are counted as stale"
    );
    // Failing after 2.5 s: by then the copies are past their age (2.3 s after the write).
    *state.lock().unwrap() = Some(Duration::from_millis(2500));
    let (through, user, strat) = tokio::join!(
        cache.read_through::<String, _, _, _>("through", source.clone(), Duration::from_secs(60)),
        loader.load::<u64, String>("user", 1u64),
        strategies.read_through::<String, _, _, _>(
            "strat",
            source.clone(),
            Duration::from_secs(60)
        ),
    );
    assert!(through.is_err(), "Cache::read_through served {through:?}");
    assert!(user.is_err(), "CacheLoader served {user:?}");
    assert!(
        strat.is_err(),
        "CacheStrategies::read_through served {strat:?}"
    );
}

/// `SqlCache` over a fail-safe multi-level cache serves its stale result after a failed query
/// only while the copy is within its max stale age: a query failing at once gets the copy, one
/// failing after the age ran out gets the error (found by review: the copy handed back before
/// the query was served, however long the query took).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_serves_a_stale_result_after_a_failed_query_only_within_its_age() {
    let mut server = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let multi = fail_safe_instance_aged(&server, "sqlage:", Duration::from_secs(2)).await;
    let db = TestDb::open(&url, Duration::ZERO).await;
    let failing = Arc::clone(&db.failing);
    let sql = SqlCache::builder(Cache::new(multi.as_backend(), Serializer::default()), db)
        .build()
        .unwrap();
    users_with_ada(&sql).await;
    let query = "SELECT name FROM users WHERE id = %s";
    let read = || async {
        sql.cache_query(query, params![1], QueryCacheStrategy::CacheFirst, None)
            .await
            .map(|rows| rows.and_then(|r| r.get(0, "name").cloned()))
    };
    assert_eq!(read().await.unwrap(), Some(SqlValue::Text("Ada".into())));
    server.kill();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Failing at once: the copy (2.3 s after its write at most) is served.
    *failing.lock().unwrap() = Some(Duration::ZERO);
    assert_eq!(read().await.unwrap(), Some(SqlValue::Text("Ada".into())));
    // Failing after 2.5 s: past the copy's age.
    *failing.lock().unwrap() = Some(Duration::from_millis(2500));
    let late = read().await;
    assert!(late.is_err(), "a copy past its age was served: {late:?}");
}
