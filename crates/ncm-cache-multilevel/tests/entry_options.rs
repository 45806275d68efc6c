//! Per-call controls on a throwaway Redis: `EntryOptions` (skip levels, backplane, TTLs,
//! compression, size, fail-safe, timeouts, eager refresh), adaptive caching ("do not cache",
//! TTL from the value), conditional refresh ("not modified" re-arms without a payload write,
//! counted with `INFO commandstats`) and sliding expiration on L1 and L2 (`GETEX`).
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ncm_cache_codec::{CompressionType, Serializer};
use ncm_cache_core::ValueSource;
use ncm_cache_multilevel::{EntryOptions, Loaded, MultiLevelCache};
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;

async fn redis(server: &RedisServer) -> RedisCache {
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.key_prefix = "app:".into();
    c.response_timeout = Duration::from_millis(300);
    c.connect_timeout = Duration::from_millis(300);
    RedisCache::connect(c).await.unwrap()
}

/// L2 + backplane, no lock (its `SET NX` would show in the SET counts).
async fn instance(redis: &RedisCache) -> MultiLevelCache {
    let cache = MultiLevelCache::builder(redis.backend())
        .backplane(Arc::clone(redis.redis_backend()))
        .build()
        .unwrap();
    let start = Instant::now();
    while !cache.l1_active() {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cache
}

fn in_l2(server: &RedisServer, key: &str) -> bool {
    server.command(&["EXISTS", &format!("app:{key}")]).unwrap() == "1"
}

fn pttl(server: &RedisServer, key: &str) -> i64 {
    server
        .command(&["PTTL", &format!("app:{key}")])
        .unwrap()
        .parse()
        .unwrap()
}

async fn source(cache: &MultiLevelCache, key: &str) -> Option<(String, ValueSource)> {
    cache
        .get_with_source::<String>(key)
        .await
        .unwrap()
        .map(|(v, s)| (v.to_string(), s))
}

/// Polls until `check` holds (bounded).
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < Duration::from_secs(3), "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A load whose loader answers `answer()` fails with a typed error that says `what` to do.
async fn refused(
    cache: &MultiLevelCache,
    key: &str,
    answer: impl FnOnce() -> Loaded<String> + Send + 'static,
    what: &str,
) {
    let err = cache
        .get_or_load_with::<String, _, _, _>(key, &EntryOptions::new(), move |_| async move {
            Ok::<_, std::io::Error>(answer())
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains(what), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_flags_keep_a_call_to_the_levels_it_names() {
    let server = RedisServer::start().unwrap();
    let (ra, rb) = (redis(&server).await, redis(&server).await);
    let (a, b) = (instance(&ra).await, instance(&rb).await);

    // skip_l2: this instance's L1 only.
    let local = EntryOptions::new().skip_l2();
    a.set_with("local", "mine".to_string(), &local)
        .await
        .unwrap();
    assert!(!in_l2(&server, "local"));
    let got = a.get_with::<String>("local", &local).await.unwrap();
    assert_eq!(
        got.map(|(v, s)| (v.to_string(), s)),
        Some(("mine".into(), ValueSource::L1))
    );
    assert_eq!(b.get::<String>("local").await.unwrap(), None);

    // skip_l1: L2 only, nothing kept locally.
    let before = a.l1_len();
    a.set_with("remote", "r".to_string(), &EntryOptions::new().skip_l1())
        .await
        .unwrap();
    assert!(in_l2(&server, "remote"));
    assert_eq!(a.l1_len(), before);
    let got = a
        .get_with::<String>("remote", &EntryOptions::new().skip_l1())
        .await
        .unwrap();
    assert_eq!(got.map(|(_, s)| s), Some(ValueSource::L2));
    assert_eq!(a.l1_len(), before, "skip_l1 must not promote");

    // skip_backplane: the other instance keeps its copy; a plain write reaches it.
    a.set("shared", "v1".to_string()).await.unwrap();
    eventually("b holds v1 in L1", async || {
        source(&b, "shared").await == Some(("v1".into(), ValueSource::L1))
    })
    .await;
    a.set_with(
        "shared",
        "v2".to_string(),
        &EntryOptions::new().skip_backplane(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        source(&b, "shared").await,
        Some(("v1".into(), ValueSource::L1))
    );
    a.set("shared", "v3".to_string()).await.unwrap();
    eventually("b sees v3", async || {
        b.get::<String>("shared").await.unwrap().as_deref() == Some("v3")
    })
    .await;

    // delete_with(skip_l2_write): the local copy goes, L2 keeps it.
    a.set("kept", "k".to_string()).await.unwrap();
    a.delete_with("kept", &EntryOptions::new().skip_l2_write())
        .await
        .unwrap();
    assert!(in_l2(&server, "kept"));
    assert_eq!(
        source(&a, "kept").await.map(|(_, s)| s),
        Some(ValueSource::L2)
    );
    // skip_l2_read: an L1 miss is a miss, although L2 has the value.
    a.clear_l1();
    assert!(
        a.get_with::<String>("kept", &EntryOptions::new().skip_l2_read())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_compression_and_size_are_per_call() {
    let server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    let codec = Serializer::builder()
        .compression(CompressionType::Gzip)
        .compression_threshold(64)
        .build()
        .unwrap();
    let cache = MultiLevelCache::builder(r.backend())
        .codec(codec)
        .build()
        .unwrap();
    cache
        .set_with(
            "short",
            1u32,
            &EntryOptions::new().ttl(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    let ttl = pttl(&server, "short");
    assert!((1..=2000).contains(&ttl), "PTTL {ttl}");
    assert!(pttl(&server, "other-default") < 0);

    let text = "abcdefgh".repeat(512);
    cache.set("zipped", text.clone()).await.unwrap();
    cache
        .set_with("plain", text.clone(), &EntryOptions::new().no_compression())
        .await
        .unwrap();
    let len = |k: &str| -> usize {
        server
            .command(&["STRLEN", &format!("app:{k}")])
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(len("zipped") < 500, "compressed: {}", len("zipped"));
    assert!(len("plain") > 4096, "uncompressed: {}", len("plain"));
    cache.clear_l1();
    assert_eq!(
        cache.get::<String>("plain").await.unwrap(),
        Some(text.clone())
    );
    assert_eq!(cache.get::<String>("zipped").await.unwrap(), Some(text));

    let weight = cache.l1_weight();
    cache
        .set_with("heavy", 1u8, &EntryOptions::new().size(100_000))
        .await
        .unwrap();
    assert!(cache.l1_weight() >= weight + 100_000);

    // l1_ttl: L1 forgets it first, L2 still has it.
    cache
        .set_with(
            "brief",
            "b".to_string(),
            &EntryOptions::new().l1_ttl(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    assert_eq!(
        source(&cache, "brief").await.map(|(_, s)| s),
        Some(ValueSource::L1)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = cache
        .get_with::<String>("brief", &EntryOptions::new().skip_l1_write())
        .await
        .unwrap();
    assert_eq!(got.map(|(_, s)| s), Some(ValueSource::L2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_safe_timeouts_and_eager_refresh_are_per_call() {
    let mut server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    // The builder has none of them.
    let cache = MultiLevelCache::builder(r.backend())
        .l1_default_ttl(Duration::from_millis(100))
        .build()
        .unwrap();
    let safe = EntryOptions::new().fail_safe(Duration::from_secs(60));
    cache.set_with("k", "old".to_string(), &safe).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.kill();
    // Without fail-safe the L2 error reaches the caller; with it, the stale copy is served.
    assert!(
        cache
            .get_with::<String>("k", &EntryOptions::new())
            .await
            .is_err()
    );
    let got = cache.get_with::<String>("k", &safe).await.unwrap();
    assert_eq!(
        got.map(|(v, s)| (v.to_string(), s)),
        Some(("old".into(), ValueSource::Stale))
    );
    server.restart().unwrap();

    // A soft timeout of this call serves the stale value while the slow load goes on.
    let r = redis(&server).await;
    let cache = MultiLevelCache::builder(r.backend())
        .l1_default_ttl(Duration::from_millis(100))
        .build()
        .unwrap();
    let slow = EntryOptions::new()
        .fail_safe(Duration::from_secs(60))
        .timeouts(
            Some(Duration::from_millis(50)),
            Some(Duration::from_secs(5)),
        );
    let loads = Arc::new(AtomicU32::new(0));
    let load = |loads: Arc<AtomicU32>, delay: u64| {
        move |_ctx| async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, std::io::Error>(Loaded::value(format!("v{n}")))
        }
    };
    cache
        .get_or_load_with::<String, _, _, _>("slow", &slow, load(Arc::clone(&loads), 0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // L1 stale; L2 is removed so the call must load.
    cache.l2().delete("slow").await.unwrap();
    let start = Instant::now();
    let got = cache
        .get_or_load_with::<String, _, _, _>("slow", &slow, load(Arc::clone(&loads), 400))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.0.as_str(), got.1), ("v1", ValueSource::Stale));
    assert!(start.elapsed() < Duration::from_millis(350));
    eventually("the slow load lands", async || {
        loads.load(Ordering::SeqCst) == 2
    })
    .await;

    // Eager refresh of this call's entries: a hit past half the L1 TTL refreshes in the background.
    let eager = EntryOptions::new()
        .l1_ttl(Duration::from_millis(400))
        .eager_refresh(0.5);
    let refreshes = Arc::new(AtomicU32::new(0));
    let background = cache.get_stats().background_refreshes;
    cache
        .get_or_load_with::<String, _, _, _>("eager", &eager, load(Arc::clone(&refreshes), 0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let got = cache
        .get_or_load_with::<String, _, _, _>("eager", &eager, load(Arc::clone(&refreshes), 0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.1, ValueSource::L1);
    eventually("refreshed", async || refreshes.load(Ordering::SeqCst) == 2).await;
    assert_eq!(cache.get_stats().background_refreshes, background + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_caching_decides_from_the_loaded_value() {
    let server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    let cache = instance(&r).await;
    let none = EntryOptions::new();
    let sets = || server.command_calls("set").unwrap();
    let before = sets();
    // "Do not cache": served to the caller, written nowhere.
    let got = cache
        .get_or_load_with::<String, _, _, _>("err", &none, |_| async {
            Ok::<_, std::io::Error>(Loaded::value("error page".to_string()).do_not_cache())
        })
        .await
        .unwrap();
    assert_eq!(
        got.map(|(v, s)| (v.to_string(), s)),
        Some(("error page".into(), ValueSource::Loader))
    );
    assert_eq!(sets(), before, "a value not to cache was written to L2");
    assert!(!in_l2(&server, "err"));
    assert_eq!(cache.l1_len(), 0);
    // The next call loads again.
    let again = cache
        .get_or_load_with::<String, _, _, _>("err", &none, |_| async {
            Ok::<_, std::io::Error>(Loaded::value("fixed".to_string()))
        })
        .await
        .unwrap();
    assert_eq!(again.unwrap().0.as_str(), "fixed");
    assert_eq!(sets(), before + 1);

    // A TTL chosen from the value: drafts live 2 s, the rest the default hour.
    for (key, draft) in [("doc:1", true), ("doc:2", false)] {
        cache
            .get_or_load_with::<String, _, _, _>(key, &none, move |_| async move {
                let answer = Loaded::value(format!("draft={draft}"));
                Ok::<_, std::io::Error>(if draft {
                    answer.ttl(Duration::from_secs(2))
                } else {
                    answer
                })
            })
            .await
            .unwrap();
    }
    assert!((1..=2000).contains(&pttl(&server, "doc:1")));
    assert!(pttl(&server, "doc:2") > 3_000_000);

    // Tags without a tag index: a typed error that says what to do, nothing cached.
    refused(
        &cache,
        "tagged",
        || Loaded::value("t".to_string()).tags(["docs"]),
        "tag_index",
    )
    .await;
    assert!(!in_l2(&server, "tagged"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_refresh_not_modified_rearms_without_writing_the_payload() {
    let server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    let cache = MultiLevelCache::builder(r.backend())
        .backplane(Arc::clone(r.redis_backend()))
        // Long enough that a loaded machine's oversleeping cannot cross a deadline: the
        // refresh point is at 1 s, the first load's L1 expiry at 2 s.
        .l1_default_ttl(Duration::from_millis(2000))
        .eager_refresh(0.5)
        .build()
        .unwrap();
    eventually("backplane up", async || cache.l1_active()).await;
    let seen = Arc::new(std::sync::Mutex::new(
        Vec::<(Option<String>, Option<String>)>::new(),
    ));
    let origin = {
        let seen = Arc::clone(&seen);
        move || {
            let seen = Arc::clone(&seen);
            move |ctx: ncm_cache_multilevel::LoadContext<String>| async move {
                seen.lock().unwrap().push((
                    ctx.stale_value().map(|v| v.to_string()),
                    ctx.validator().map(str::to_owned),
                ));
                // The origin's ETag is still "e1": nothing changed.
                Ok::<_, std::io::Error>(if ctx.validator() == Some("e1") {
                    Loaded::not_modified()
                } else {
                    Loaded::value("body".to_string()).validator("e1")
                })
            }
        }
    };
    let opts = EntryOptions::new();
    let loaded = std::time::Instant::now();
    cache
        .get_or_load_with::<String, _, _, _>("page", &opts, origin())
        .await
        .unwrap();
    let (sets, pexpires) = (
        server.command_calls("set").unwrap(),
        server.command_calls("pexpire").unwrap(),
    );
    assert_eq!(sets, 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // A hit past the refresh point: the background refresh asks the origin conditionally.
    let got = cache
        .get_or_load_with::<String, _, _, _>("page", &opts, origin())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.0.as_str(), got.1), ("body", ValueSource::L1));
    eventually("not modified", async || cache.get_stats().not_modified == 1).await;
    assert_eq!(
        seen.lock().unwrap()[1],
        (Some("body".into()), Some("e1".into())),
        "the loader sees the stale value and its validator"
    );
    assert_eq!(
        server.command_calls("set").unwrap(),
        sets,
        "no payload written"
    );
    assert_eq!(server.command_calls("pexpire").unwrap(), pexpires + 1);
    // Re-armed in L1 (for 2 s from the refresh, at 1.2 s or later): still fresh past the
    // first load's expiry.
    tokio::time::sleep(Duration::from_millis(2300).saturating_sub(loaded.elapsed())).await;
    assert_eq!(
        source(&cache, "page").await.map(|(_, s)| s),
        Some(ValueSource::L1)
    );
    // "Not modified" with nothing to keep is a typed error.
    refused(&cache, "fresh-key", Loaded::not_modified, "not modified").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_expiration_keeps_what_is_read_and_drops_what_is_idle() {
    let server = RedisServer::start().unwrap();
    let (ra, rb) = (redis(&server).await, redis(&server).await);
    let (a, b) = (instance(&ra).await, instance(&rb).await);
    let idle = Duration::from_millis(600);
    let sliding = EntryOptions::new().sliding(idle);
    a.set_with("s", "v".to_string(), &sliding).await.unwrap();
    assert!(pttl(&server, "s") <= 600);
    // Read for three idle periods: mostly from L1 (a copy lasts idle / 2), from L2 (GETEX,
    // re-arming it) when the copy ends; the entry stays.
    let start = Instant::now();
    let mut from_l1 = 0;
    while start.elapsed() < idle * 3 {
        let got = a.get_with::<String>("s", &sliding).await.unwrap();
        let source = got.map(|(_, s)| s);
        assert!(source.is_some(), "gone at {:?}", start.elapsed());
        from_l1 += usize::from(source == Some(ValueSource::L1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(from_l1 > 6, "L1 served {from_l1} reads");
    assert!(in_l2(&server, "s"), "L2 was not re-armed by the reads");

    // An L2 hit re-arms in the same round trip: one GETEX, no GET, no PEXPIRE.
    let (getex, get, pexpire) = (
        server.command_calls("getex").unwrap(),
        server.command_calls("get").unwrap(),
        server.command_calls("pexpire").unwrap(),
    );
    let got = b
        .get_with::<String>("s", &EntryOptions::new().sliding(idle).skip_l1())
        .await
        .unwrap();
    assert_eq!(got.map(|(_, s)| s), Some(ValueSource::L2));
    assert_eq!(server.command_calls("getex").unwrap(), getex + 1);
    assert_eq!(server.command_calls("get").unwrap(), get);
    assert_eq!(server.command_calls("pexpire").unwrap(), pexpire);
    assert!(pttl(&server, "s") > 400);

    // Idle: gone from both levels.
    tokio::time::sleep(idle + Duration::from_millis(200)).await;
    assert!(!in_l2(&server, "s"));
    assert!(a.get_with::<String>("s", &sliding).await.unwrap().is_none());
}

type Answer = Result<Loaded<String>, std::io::Error>;
type BoxedAnswer = std::pin::Pin<Box<dyn Future<Output = Answer> + Send>>;

/// A loader that counts its runs, waits `delay`, then answers `answer()`.
fn slow_loader<A>(
    runs: &Arc<AtomicU32>,
    delay: Duration,
    answer: A,
) -> impl FnOnce(ncm_cache_multilevel::LoadContext<String>) -> BoxedAnswer + Send + 'static
where
    A: FnOnce() -> Answer + Send + 'static,
{
    let runs = Arc::clone(runs);
    move |_ctx| {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            answer()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_eager_refresh_is_not_fail_safe_and_stale_is_not_served_past_its_age() {
    let server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    let cache = MultiLevelCache::builder(r.backend())
        .l1_default_ttl(Duration::from_millis(400))
        .eager_refresh(0.5)
        .fail_safe(Duration::from_secs(60))
        .build()
        .unwrap();
    let opts = EntryOptions::new();
    let runs = Arc::new(AtomicU32::new(0));
    let ok = || Ok(Loaded::value("v1".to_string()));
    let fail = || Err(std::io::Error::other("database down"));
    cache
        .get_or_load_with::<String, _, _, _>("k", &opts, slow_loader(&runs, Duration::ZERO, ok))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Past the refresh point: served from L1; the refresh fails in the background.
    let got = cache
        .get_or_load_with::<String, _, _, _>("k", &opts, slow_loader(&runs, Duration::ZERO, fail))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.1, ValueSource::L1);
    eventually("the refresh failed", async || {
        cache.get_stats().load_errors == 1
    })
    .await;
    // Nobody was served a stale value: the refresh was no fail-safe fallback.
    assert_eq!(cache.get_stats().stale_served, 0);

    // A stale value is served after a failed load only within the max stale age, checked
    // when the load ends (a slow load can outlast it).
    let short = MultiLevelCache::builder(r.backend())
        .l1_default_ttl(Duration::from_millis(100))
        .fail_safe(Duration::from_millis(300))
        .build()
        .unwrap();
    short.set("s", "old".to_string()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    short.l2().delete("s").await.unwrap();
    // Stale for 50 ms of its 300: a quick failure serves it ...
    let quick = short
        .get_or_load_with::<String, _, _, _>("s", &opts, slow_loader(&runs, Duration::ZERO, fail))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((quick.0.as_str(), quick.1), ("old", ValueSource::Stale));
    // ... a failure 400 ms later (past 100 + 300 ms) does not.
    let slow = short
        .get_or_load_with::<String, _, _, _>(
            "s",
            &opts,
            slow_loader(&runs, Duration::from_millis(400), fail),
        )
        .await;
    assert!(slow.is_err(), "served {slow:?} past the max stale age");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_fail_safe_serves_through_an_outage_of_the_backplanes_redis() {
    let mut server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    // The builder has no fail-safe; the backplane shares the Redis that dies.
    let cache = instance(&r).await;
    let safe = EntryOptions::new().fail_safe(Duration::from_secs(60));
    cache.set_with("k", "old".to_string(), &safe).await.unwrap();
    server.kill();
    eventually("the link is seen down", async || !cache.l1_active()).await;
    let got = cache.get_with::<String>("k", &safe).await.unwrap();
    assert_eq!(
        got.map(|(v, s)| (v.to_string(), s)),
        Some(("old".into(), ValueSource::Stale)),
        "the call's fail-safe kept nothing through the outage"
    );
    // A call without fail-safe gets the error, not the stale copy.
    assert!(
        cache
            .get_with::<String>("k", &EntryOptions::new())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_modified_rearms_only_the_value_its_loader_compared() {
    let server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    let cache = MultiLevelCache::over_redis(&r)
        .l1_default_ttl(Duration::from_millis(100))
        .fail_safe(Duration::from_secs(60))
        .build()
        .unwrap();
    eventually("backplane up", async || cache.l1_active()).await;
    let opts = EntryOptions::new();
    cache
        .get_or_load_with::<String, _, _, _>("page", &opts, |_| async {
            Ok::<_, std::io::Error>(Loaded::value("v1".to_string()).validator("e1"))
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // v1 is stale in L1 and gone from L2; another process holds the load lock.
    r.backend().delete("page").await.unwrap();
    server
        .command(&["SET", "app:__ncm:lock:load:page", "other", "PX", "400"])
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(None));
    let load = {
        let cache = cache.clone();
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            cache
                .get_or_load_with::<String, _, _, _>(
                    "page",
                    &EntryOptions::new(),
                    move |ctx| async move {
                        *seen.lock().unwrap() = Some((
                            ctx.stale_value().map(|v| v.to_string()),
                            ctx.validator().map(str::to_owned),
                        ));
                        Ok::<_, std::io::Error>(Loaded::not_modified())
                    },
                )
                .await
        })
    };
    // While the load waits for the lock, this instance writes v2 (its L1 only).
    tokio::time::sleep(Duration::from_millis(100)).await;
    cache
        .set_with(
            "page",
            "v2".to_string(),
            &EntryOptions::new()
                .skip_l2_write()
                .l1_ttl(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    let got = load.await.unwrap().unwrap().unwrap();
    // The loader saw v1 with v1's validator, and said v1 is current: v1 is its answer ...
    assert_eq!(
        *seen.lock().unwrap(),
        Some((Some("v1".into()), Some("e1".into())))
    );
    assert_eq!(got.0.as_str(), "v1");
    // ... but L1 holds v2 now, which "not modified" says nothing about: v2 stays, and v1 is
    // not written back to L2.
    assert_eq!(
        source(&cache, "page").await,
        Some(("v2".into(), ValueSource::L1))
    );
    assert!(!in_l2(&server, "page"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_follows_the_calls_options_and_the_loaders_answer() {
    let server = RedisServer::start().unwrap();
    let mut instances = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..5 {
        let r = redis(&server).await;
        let cache = MultiLevelCache::over_redis(&r).build().unwrap();
        eventually("backplane up", async || cache.l1_active()).await;
        instances.push(cache);
        connections.push(r);
    }
    let step = Duration::from_millis(300);

    // A holder whose answer is not cached: its waiters load at once, not one after another.
    let running = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let mut calls = Vec::new();
    for (i, cache) in instances.iter().enumerate() {
        let (cache, running, most) = (cache.clone(), Arc::clone(&running), Arc::clone(&most));
        calls.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(if i == 0 { 0 } else { 50 })).await;
            cache
                .get_or_load_with::<String, _, _, _>(
                    "draft",
                    &EntryOptions::new(),
                    move |_| async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(step).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, std::io::Error>(Loaded::value("d".to_string()).do_not_cache())
                    },
                )
                .await
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().unwrap().0.as_str(), "d");
    }
    assert!(
        most.load(Ordering::SeqCst) >= 2,
        "waiters of an uncached answer loaded one at a time"
    );

    // An uncached "not found" is no "not found" for the waiters: they load themselves.
    let (a, b) = (instances[0].clone(), instances[1].clone());
    let holder = tokio::spawn(async move {
        a.get_or_load_with::<String, _, _, _>("maybe", &EntryOptions::new(), move |_| async move {
            tokio::time::sleep(step).await;
            Ok::<_, std::io::Error>(Loaded::not_found().do_not_cache())
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiter = b
        .get_or_load_with::<String, _, _, _>("maybe", &EntryOptions::new(), |_| async {
            Ok::<_, std::io::Error>(Loaded::value("found".to_string()))
        })
        .await
        .unwrap();
    assert!(holder.await.unwrap().unwrap().is_none());
    assert_eq!(waiter.unwrap().0.as_str(), "found");

    // A call that skips reading L2 cannot see a holder's result: it does not wait for one.
    let a = instances[0].clone();
    let holder = tokio::spawn(async move {
        a.get_or_load_with::<String, _, _, _>("busy", &EntryOptions::new(), move |_| async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, std::io::Error>(Loaded::value("slow".to_string()))
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let own = instances[1]
        .get_or_load_with::<String, _, _, _>(
            "busy",
            &EntryOptions::new().skip_l2_read(),
            |_| async { Ok::<_, std::io::Error>(Loaded::value("own".to_string())) },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(own.0.as_str(), "own");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "waited {:?} for a lock whose result it cannot read",
        start.elapsed()
    );
    holder.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_reads_fall_back_when_getex_is_refused() {
    let server = RedisServer::builder()
        .args(["--rename-command", "GETEX", ""])
        .start()
        .unwrap();
    let r = redis(&server).await;
    let cache = MultiLevelCache::builder(r.backend()).build().unwrap();
    let sliding = EntryOptions::new()
        .sliding(Duration::from_secs(2))
        .skip_l1();
    cache
        .set_with("k", "v".to_string(), &sliding)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    for _ in 0..2 {
        let got = cache.get_with::<String>("k", &sliding).await.unwrap();
        assert_eq!(got.map(|(v, _)| v.to_string()).as_deref(), Some("v"));
        // Re-armed by the fallback's PEXPIRE.
        assert!(
            pttl(&server, "k") > 1_800,
            "TTL not re-armed: {}",
            pttl(&server, "k")
        );
    }
    assert_eq!(server.command_calls("pexpire").unwrap(), 2);

    // A loader's zero TTL is a typed error, not an entry that never expires.
    refused(
        &cache,
        "z",
        || Loaded::value("z".to_string()).ttl(Duration::ZERO),
        "do_not_cache",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_skip_backplane_write_is_not_announced_either() {
    let server = RedisServer::start().unwrap();
    let (ra, rb) = (redis(&server).await, redis(&server).await);
    let (a, b) = (instance(&ra).await, instance(&rb).await);
    a.set("k", "v0".to_string()).await.unwrap();
    eventually("B holds v0 in L1", async || {
        source(&b, "k").await == Some(("v0".into(), ValueSource::L1))
    })
    .await;
    // The write is cancelled while Redis does not answer (a request timeout around it).
    server.pause().unwrap();
    let quiet = EntryOptions::new().skip_backplane();
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        a.set_with("k", "v1".to_string(), &quiet),
    )
    .await;
    server.resume().unwrap();
    assert!(cancelled.is_err());
    // A cancelled write of a call that announces nothing queues no invalidation either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        source(&b, "k").await,
        Some(("v0".into(), ValueSource::L1)),
        "B was told about a write that asked for no backplane message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_waiter_whose_stale_value_aged_out_loads_instead_of_failing() {
    let server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    let cache = MultiLevelCache::builder(r.backend())
        .backplane(Arc::clone(r.redis_backend()))
        .distributed_lock(
            Arc::clone(r.redis_backend()),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .l1_default_ttl(Duration::from_millis(100))
        .fail_safe(Duration::from_millis(300))
        .build()
        .unwrap();
    eventually("backplane up", async || cache.l1_active()).await;
    cache.set("k", "v1".to_string()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Stale for 50 ms of its 300; gone from L2; another process holds the load lock for good.
    r.backend().delete("k").await.unwrap();
    server
        .command(&["SET", "app:__ncm:lock:load:k", "other", "PX", "10000"])
        .unwrap();
    // The wait gives up after 1 s, when the stale value is too old to serve: it loads.
    let got = cache
        .get_or_load_with::<String, _, _, _>("k", &EntryOptions::new(), |_| async {
            Ok::<_, std::io::Error>(Loaded::value("v2".to_string()))
        })
        .await;
    assert_eq!(
        got.map(|g| g.map(|(v, s)| (v.to_string(), s))).unwrap(),
        Some(("v2".into(), ValueSource::Loader))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_reads_fall_back_when_an_acl_forbids_getex() {
    let server = RedisServer::builder()
        .args(["--user", "app", "on", ">pw", "~*", "&*", "+@all", "-getex"])
        .start()
        .unwrap();
    let mut c =
        RedisConfig::from_url(&format!("redis://app:pw@127.0.0.1:{}", server.port())).unwrap();
    c.key_prefix = "app:".into();
    let r = RedisCache::connect(c).await.unwrap();
    let cache = MultiLevelCache::builder(r.backend()).build().unwrap();
    let sliding = EntryOptions::new()
        .sliding(Duration::from_secs(2))
        .skip_l1();
    cache
        .set_with("k", "v".to_string(), &sliding)
        .await
        .unwrap();
    let got = cache.get_with::<String>("k", &sliding).await.unwrap();
    assert_eq!(got.map(|(v, _)| v.to_string()).as_deref(), Some("v"));
}

/// Loads during an outage leave their values for fail-safe. Over `over_redis` (the backplane
/// on the Redis that dies, so L1 takes nothing as fresh): a load while Redis is down and the
/// source up serves the source's value and keeps it stale-only, so when the source fails too
/// that value is served — never as fresh before. And a batch load whose L2 write fails, on a
/// cache without a backplane, keeps its values the same way. Before (review, helper-74), both
/// removed the value with the older copy, and once the source failed the call did too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_during_an_outage_leave_their_values_for_fail_safe() {
    type Io = std::io::Error;
    let mut server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    let linked = MultiLevelCache::over_redis(&r)
        .name("linked")
        .l1_default_ttl(Duration::from_millis(300))
        .fail_safe(Duration::from_secs(60))
        .build()
        .unwrap();
    let alone = MultiLevelCache::builder(r.backend())
        .name("alone")
        .l1_default_ttl(Duration::from_millis(300))
        .fail_safe(Duration::from_secs(60))
        .build()
        .unwrap();
    eventually("backplane up", async || linked.l1_active()).await;
    let v1 = || async { Ok::<_, Io>("v1".to_string()) };
    assert_eq!(
        linked
            .get_or_load::<String, _, _, _>("k", v1)
            .await
            .unwrap(),
        "v1"
    );
    let batch = |v: Option<&'static str>| {
        let alone = alone.clone();
        async move {
            alone
                .get_many_or_load::<String, _, _, _>(&["b"], move |keys| async move {
                    match v {
                        Some(v) => Ok(keys.into_iter().map(|k| (k, v.to_string())).collect()),
                        None => Err(Io::other("database down")),
                    }
                })
                .await
        }
    };
    assert_eq!(
        batch(Some("v1")).await.unwrap(),
        vec![Some("v1".to_string())]
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.kill();
    eventually("the link is seen down", async || !linked.l1_active()).await;
    // The source is up: its value, served and kept (stale-only: asked for again next time).
    let v2 = || async { Ok::<_, Io>("v2".to_string()) };
    assert_eq!(
        linked
            .get_or_load::<String, _, _, _>("k", v2)
            .await
            .unwrap(),
        "v2"
    );
    let runs = Arc::new(AtomicU32::new(0));
    let failing = {
        let runs = Arc::clone(&runs);
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(Io::other("database down"))
        }
    };
    assert_eq!(
        linked
            .get_or_load::<String, _, _, _>("k", failing)
            .await
            .unwrap(),
        "v2",
        "the value loaded during the outage was not kept for fail-safe"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the kept value was served as fresh"
    );
    assert_eq!(
        batch(Some("v2")).await.unwrap(),
        vec![Some("v2".to_string())]
    );
    assert_eq!(
        batch(None).await.unwrap(),
        vec![Some("v2".to_string())],
        "the batch's value loaded during the outage was not kept for fail-safe"
    );
}

/// A loader's `Loaded::l1_ttl` does not lift the cap sliding expiration puts on L1 copies
/// (half the idle time): reads every third of the idle time still reach L2 often enough to
/// re-arm it, and the entry read that often stays — the loader runs once. Before (review,
/// helper-74), the loader's L1 TTL replaced the capped one: L1 served every read for the whole
/// idle time, nothing re-armed L2, and the entry expired under its readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaders_l1_ttl_keeps_the_sliding_cap() {
    let server = RedisServer::start().unwrap();
    let r = redis(&server).await;
    let cache = instance(&r).await;
    let idle = Duration::from_millis(600);
    let sliding = EntryOptions::new().sliding(idle);
    let runs = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    while start.elapsed() < idle * 4 {
        let runs = Arc::clone(&runs);
        let got = cache
            .get_or_load_with::<String, _, _, _>("s", &sliding, move |_| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(
                    Loaded::value("v".to_string()).l1_ttl(Duration::from_secs(60)),
                )
            })
            .await
            .unwrap();
        assert_eq!(got.map(|(v, _)| v.to_string()).as_deref(), Some("v"));
        tokio::time::sleep(idle / 3).await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "an entry read every third of its idle time expired under its readers"
    );
}

/// A local-only call (`skip_l2_write`) does not reach L2 through another instance: its
/// announcement drops the other instances' L1 copies only. Before, another instance took it
/// for a write or a delete of the key and withdrew its own recent load of the key from L2
/// (review, helper-85 #3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_only_write_or_delete_does_not_withdraw_another_instances_load() {
    let server = RedisServer::start().unwrap();
    let (ra, rb) = (redis(&server).await, redis(&server).await);
    let (a, b) = (instance(&ra).await, instance(&rb).await);
    let local = EntryOptions::new().skip_l2_write();
    for (key, delete) in [("deleted", true), ("written", false)] {
        // B's load: stored in L2, remembered as B's recent load.
        let loaded: String = b
            .get_or_load(key, || async {
                Ok::<_, std::io::Error>("loaded".to_string())
            })
            .await
            .unwrap();
        assert_eq!(loaded, "loaded");
        assert!(in_l2(&server, key));
        if delete {
            a.delete_with(key, &local).await.unwrap();
        } else {
            a.set_with(key, "local".to_string(), &local).await.unwrap();
        }
        // B's L1 copy goes (the announcement still reaches it) ...
        eventually("b's L1 copy dropped", async || {
            source(&b, key).await.map(|(_, s)| s) != Some(ValueSource::L1)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // ... and L2 keeps B's load.
        assert!(
            in_l2(&server, key),
            "a local-only {} made another instance withdraw its load from L2",
            if delete { "delete" } else { "write" }
        );
    }
}
