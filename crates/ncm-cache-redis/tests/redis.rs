//! RedisCache and RedisSyncCache against a throwaway single server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use ncm_cache_codec::{CompressionType, SerializationType, Serializer};
use ncm_cache_core::{CacheError, Codec, Expiry};
use ncm_cache_redis::{PipelineResult, RedisCache, RedisSyncCache};
use ncm_cache_testkit::RedisServer;
use ncm_cache_testkit::conformance::{self, RealTime};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    name: String,
    email: String,
}

fn john() -> User {
    User {
        name: "John".into(),
        email: "john@example.com".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_async_and_sync_with_no_keys_command() {
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(support::config(&server)).await.unwrap();
    conformance::run(cache.backend(), &RealTime).await;

    let mut prefixed = support::config(&server);
    prefixed.key_prefix = "pre[fix]*:".into();
    let cache = RedisCache::connect(prefixed).await.unwrap();
    conformance::run(cache.backend(), &RealTime).await;

    let sync = RedisSyncCache::connect(support::config(&server)).unwrap();
    conformance::run(support::sync_backend(sync), &RealTime).await;

    assert_eq!(
        support::command_calls(&server, "keys"),
        0,
        "KEYS must never be sent"
    );
    assert!(support::command_calls(&server, "scan") > 0);
    assert!(support::command_calls(&server, "mget") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_api_round_trips_with_every_codec() {
    let server = RedisServer::start().unwrap();
    for format in [
        SerializationType::Json,
        SerializationType::MsgPack,
        SerializationType::Cbor,
        SerializationType::Pickle,
        SerializationType::SimdJson,
    ] {
        let cache = RedisCache::builder()
            .config(support::config(&server))
            .serialization(format)
            .compression(CompressionType::Zstd)
            .compression_threshold(16usize)
            .key_prefix(format!("{format}:"))
            .build()
            .await
            .unwrap();
        cache.set("user:123", &john()).await.unwrap();
        assert_eq!(
            cache.try_get::<User>("user:123").await.unwrap(),
            Some(john()),
            "{format}"
        );
        let ttl = cache.get_ttl("user:123").await.unwrap().unwrap();
        assert!(ttl <= Duration::from_secs(3600) && ttl > Duration::from_secs(3590));
        assert!(
            cache
                .extend_ttl("user:123", Duration::from_secs(7200))
                .await
                .unwrap()
        );
        assert!(cache.get_ttl("user:123").await.unwrap().unwrap() > Duration::from_secs(7100));
    }
    // Values written with one codec are read by a cache configured with another.
    let json = RedisCache::builder()
        .config(support::config(&server))
        .key_prefix("msgpack:")
        .build()
        .await
        .unwrap();
    assert_eq!(json.get::<User>("user:123").await.unwrap(), Some(john()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_pipeline_and_read_through() {
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(support::config(&server)).await.unwrap();
    let users = [("user:1", john()), ("user:2", john()), ("user:3", john())];
    cache
        .set_many(users.iter().map(|(k, v)| (*k, v)), Duration::from_secs(60))
        .await
        .unwrap();
    let got = cache
        .get_many::<User>(&["user:1", "nope", "user:3"])
        .await
        .unwrap();
    assert_eq!(got, vec![Some(john()), None, Some(john())]);

    let before = support::command_calls(&server, "set");
    let mut pipeline = cache.pipeline();
    pipeline
        .set("key1", "value1")
        .set("key2", "value2")
        .set_with_ttl("key3", "value3", Duration::from_secs(5));
    pipeline
        .get("key1")
        .exists("key2")
        .delete("key2")
        .ttl("key3")
        .expire("key1", Duration::from_secs(9));
    let results = cache.execute_pipeline(pipeline).await.unwrap();
    assert_eq!(results.len(), 8);
    assert_eq!(results[0], PipelineResult::Done);
    assert_eq!(
        results[3]
            .decode::<String>(cache.codec())
            .unwrap()
            .as_deref(),
        Some("value1")
    );
    assert_eq!(results[4], PipelineResult::Bool(true));
    assert_eq!(results[5], PipelineResult::Bool(true));
    assert!(matches!(
        results[6],
        PipelineResult::Ttl(ncm_cache_core::KeyTtl::Expires(_))
    ));
    assert_eq!(results[7], PipelineResult::Bool(true));
    assert_eq!(support::command_calls(&server, "set") - before, 3);
    // Not a transaction (as documented): one failing command fails the call, and the others
    // were applied all the same.
    server.command(&["HSET", "hash", "f", "1"]).unwrap();
    let mut pipeline = cache.pipeline();
    pipeline.set("before", "b").get("hash").set("after", "a");
    assert!(cache.execute_pipeline(pipeline).await.is_err());
    for key in ["before", "after"] {
        assert!(cache.exists(key).await.unwrap(), "{key} was not applied");
    }

    let mut calls = 0;
    for _ in 0..3 {
        let v: String = cache
            .read_through(
                "profile:1",
                || {
                    calls += 1;
                    async { Ok::<_, std::io::Error>("loaded".to_string()) }
                },
                Expiry::Default,
            )
            .await
            .unwrap();
        assert_eq!(v, "loaded");
    }
    assert_eq!(calls, 1, "read_through loads once, then serves the cache");
    let err = cache
        .read_through::<String, _, _, _>(
            "profile:2",
            || async { Err(std::io::Error::other("db down")) },
            Expiry::Default,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Loader(_)));
    assert!(
        !cache.exists("profile:2").await.unwrap(),
        "loader errors are not cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_bytes_read_as_a_counted_miss_and_are_removed() {
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(support::config(&server)).await.unwrap();
    server
        .cli(&["SET", "poisoned", "\u{1}\u{2}garbage{"])
        .unwrap();
    assert_eq!(cache.get::<User>("poisoned").await.unwrap(), None);
    assert_eq!(
        server.cli(&["EXISTS", "poisoned"]).unwrap().trim(),
        "0",
        "entry removed"
    );
    let stats = cache.get_stats();
    assert_eq!(stats.codec_errors, 1);
    assert_eq!(stats.misses, 1);
    assert_eq!(stats.hits, 0);
    assert!(matches!(cache.set("k", &vec![0u8; 2048]).await, Ok(())));
    let small = RedisCache::builder()
        .config(support::config(&server))
        .max_value_size(64usize)
        .build()
        .await
        .unwrap();
    assert!(matches!(
        small.set("k", &vec![0u8; 2048]).await,
        Err(CacheError::ValueTooLarge { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_health_and_connection_limit() {
    let server = RedisServer::start().unwrap();
    let mut config = support::config(&server);
    config.max_connections = 3;
    config.health_check_interval = Some(Duration::from_millis(50));
    let cache = RedisCache::connect(config).await.unwrap();
    assert!(cache.health_check().await);
    let report = cache.health_report().await;
    assert!(
        report.healthy && report.latency < Duration::from_millis(500),
        "{report:?}"
    );
    // Many concurrent requests still use only the configured connections.
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let c = cache.clone();
            tokio::spawn(async move { c.set(&format!("k{i}"), &i).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let clients = server.cli(&["CLIENT", "LIST"]).unwrap();
    let ours = clients
        .lines()
        .filter(|l| !l.contains("cmd=client"))
        .count();
    assert!(
        ours <= 3,
        "at most max_connections connections, saw {ours}:\n{clients}"
    );
    cache.get::<i32>("k1").await.unwrap();
    cache.get::<i32>("missing").await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let stats = cache.get_stats();
    assert_eq!((stats.hits, stats.misses, stats.sets), (1, 1, 200));
    assert!(
        stats.memory_usage.unwrap_or(0) > 0,
        "used_memory from INFO: {stats:?}"
    );
    assert!(stats.latency.is_some());
    cache.close().await.unwrap();
    assert!(matches!(
        cache.get::<i32>("k1").await,
        Err(CacheError::Closed)
    ));

    let sync = RedisSyncCache::connect(support::config(&server)).unwrap();
    sync.set("s", &john()).unwrap();
    assert_eq!(sync.get::<User>("s").unwrap(), Some(john()));
    assert!(sync.health_check());
    assert!(sync.get_stats().memory_usage.is_some());
}

#[test]
fn sync_cache_needs_no_runtime() {
    let server = RedisServer::start().unwrap();
    let cache = RedisSyncCache::connect(support::config(&server)).unwrap();
    cache
        .set_with_ttl("user:123", &john(), Duration::from_secs(30))
        .unwrap();
    assert_eq!(cache.get::<User>("user:123").unwrap(), Some(john()));
    cache.set_many([("a", 1), ("b", 2)], Expiry::Never).unwrap();
    assert_eq!(
        cache.get_many::<i32>(&["a", "x", "b"]).unwrap(),
        vec![Some(1), None, Some(2)]
    );
    let v: i32 = cache
        .read_through("rt", || Ok::<_, std::io::Error>(7), Expiry::Default)
        .unwrap();
    assert_eq!(v, 7);
    assert_eq!(cache.clear_pattern("*").unwrap(), 4);
    // An explicit codec works with the sync cache too.
    let s = Serializer::builder()
        .format(SerializationType::MsgPack)
        .build()
        .unwrap();
    assert_eq!(s.decode::<i32>(&s.encode(&5).unwrap()).unwrap(), 5);
}

/// The blocking cache's pooled connections idle past the server's `timeout` (or a load
/// balancer's) and are closed by it; the next write — not resent after a lost connection,
/// since it may have landed — and the next read still reach Redis (a connection idle for a
/// second or more is asked a `PING` first; before, the write failed with "unexpected end of
/// file"). On a cluster: `cluster.rs::sync_calls_after_every_node_closed_the_idle_connections_reach_redis`.
#[test]
fn sync_calls_after_the_server_closed_the_idle_connections_reach_redis() {
    let server = RedisServer::builder()
        .arg("--timeout", "1")
        .start()
        .unwrap();
    let cache = RedisSyncCache::connect(support::config(&server)).unwrap();
    support::sync_calls_after_idle_spells(&cache);
}

/// Client tracking reports what any client changes under the prefix (without the prefix), a
/// flush, and a restart as Disconnected then Reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tracking_reports_changes_flushes_and_reconnects() {
    use ncm_cache_redis::TrackingEvent;
    let mut server = RedisServer::start().unwrap();
    let mut config = ncm_cache_redis::RedisConfig::from_url(&server.url()).unwrap();
    config.key_prefix = "app:".into();
    config.connect_timeout = Duration::from_millis(300);
    config.response_timeout = Duration::from_millis(300);
    config.health_check_interval = Some(Duration::from_millis(100));
    let redis = RedisCache::connect(config).await.unwrap();
    let mut tracking = redis.redis_backend().track_changes().await.unwrap();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), tracking.recv())
            .await
            .expect("no tracking event within 5 s")
            .expect("tracking ended")
    };
    server.command(&["SET", "other:x", "1"]).unwrap();
    server.command(&["SET", "app:user:1", "1"]).unwrap();
    assert_eq!(
        next().await,
        TrackingEvent::Invalidated(vec!["user:1".into()]),
        "only keys under the prefix, without it"
    );
    server.command(&["FLUSHALL"]).unwrap();
    assert_eq!(next().await, TrackingEvent::Flushed);
    server.kill();
    assert_eq!(next().await, TrackingEvent::Disconnected);
    server.restart().unwrap();
    assert_eq!(next().await, TrackingEvent::Reconnected);
    server.command(&["DEL", "app:user:1"]).unwrap();
    server.command(&["SET", "app:user:2", "2"]).unwrap();
    let mut seen = Vec::new();
    while seen.is_empty() {
        if let TrackingEvent::Invalidated(keys) = next().await {
            seen.extend(keys);
        }
    }
    assert!(seen.contains(&"user:2".to_owned()), "{seen:?}");
}

/// The blocking cache's `read_through` after a miss stores only if the key is still absent, as
/// the async paths do (found by review: it stored with a plain `SET`). Another instance writes
/// `new` while the loader reads `old`: the cache keeps `new`, the caller gets what it loaded.
/// An entry this build cannot read (another build's newer envelope, left in place) is replaced.
#[test]
fn sync_read_through_does_not_overwrite_a_write_made_during_its_load() {
    let server = RedisServer::start().unwrap();
    let a = RedisSyncCache::connect(support::config(&server)).unwrap();
    let b = RedisSyncCache::connect(support::config(&server)).unwrap();
    let v: String = a
        .read_through(
            "k",
            || {
                b.set("k", "new").unwrap();
                Ok::<_, std::io::Error>("old".to_owned())
            },
            Expiry::Default,
        )
        .unwrap();
    assert_eq!(v, "old", "the caller gets what it loaded");
    assert_eq!(
        b.get::<String>("k").unwrap().as_deref(),
        Some("new"),
        "the load overwrote a newer write"
    );

    // A newer envelope (unreadable here, left in place): replaced by the load.
    b.set_bytes("n", &[0xC1, 0x4E, 9, 1, 0, b'1'], None)
        .unwrap();
    let v: String = a
        .read_through(
            "n",
            || Ok::<_, std::io::Error>("loaded".to_owned()),
            Expiry::Default,
        )
        .unwrap();
    assert_eq!(v, "loaded");
    assert_eq!(b.get::<String>("n").unwrap().as_deref(), Some("loaded"));
}

/// Raw replies (`query_cmd`, `eval_script`) have the shapes a RESP2 connection gives, although
/// a single node's pool speaks RESP3 (maps, sets, doubles, pairs): each command here is run
/// through `query_cmd` and on a plain RESP2 redis-rs connection, and the replies must be
/// equal. Before (review, helper-96, helper-97), `CONFIG GET` read as `Vec<String>` failed,
/// `XREAD` came back as a flat list and `ZRANGE … WITHSCORES` as nested pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_replies_have_their_resp2_shapes_on_a_resp3_pool() {
    use ncm_cache_core::Operation;
    use redis::Value;
    let server = RedisServer::start().unwrap();
    for cmd in [
        "HSET h f1 v1 f2 v2",
        "ZADD z 1 a 2.5 b 3 c",
        "SADD s x y z",
        "XADD x1 1-1 f v",
        "XADD x2 2-1 g w",
    ] {
        server.cli(&cmd.split(' ').collect::<Vec<_>>()).unwrap();
    }
    let cache = RedisCache::connect(support::config(&server)).await.unwrap();
    let backend = cache.redis_backend();
    let mut resp2 = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for line in [
        "HGETALL h",
        "CONFIG GET maxmemory-policy",
        "ZRANGE z 0 -1 WITHSCORES",
        "ZRANGE z 0 -1",
        "ZRANGEBYSCORE z 0 10 WITHSCORES",
        "ZREVRANGE z 0 1 WITHSCORES",
        "ZUNION 1 z WITHSCORES",
        "ZSCORE z b",
        "ZMSCORE z a b nope",
        "SMEMBERS s",
        "XREAD COUNT 5 STREAMS x1 x2 0 0",
        "XRANGE x1 - +",
        "HRANDFIELD h 2 WITHVALUES",
        "EXISTS h",
        "GET nope",
    ] {
        let mut cmd = redis::Cmd::new();
        for arg in line.split(' ') {
            cmd.arg(arg);
        }
        let ours: Value = backend.query_cmd(Operation::Get, &cmd).await.unwrap();
        let theirs: Value = cmd.query_async(&mut resp2).await.unwrap();
        // HRANDFIELD's order is random: compared as sorted pairs.
        let sorted = |v: Value| match v {
            Value::Array(items) if line.starts_with("HRANDFIELD") => {
                let mut pairs: Vec<Vec<Value>> = items.chunks(2).map(<[Value]>::to_vec).collect();
                pairs.sort_by_key(|p| format!("{p:?}"));
                pairs.concat()
            }
            Value::Array(items) => items,
            other => vec![other],
        };
        assert_eq!(sorted(ours), sorted(theirs), "{line}");
    }
    // The typed reads that failed on RESP3's map.
    let config: Vec<String> = backend
        .query_cmd(
            Operation::Get,
            redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"),
        )
        .await
        .unwrap();
    assert_eq!(config, ["maxmemory-policy", "noeviction"]);
    let script = redis::Script::new("return {1, 'two', {3}}");
    let scripted: Value = backend
        .eval_script(Operation::Get, &script, &[], &[])
        .await
        .unwrap();
    let theirs: Value = script.invoke_async(&mut resp2).await.unwrap();
    assert_eq!(scripted, theirs);
}
