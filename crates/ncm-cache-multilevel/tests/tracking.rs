//! Server-assisted coherence (`Coherence::Tracking`): L1 copies evicted by Redis's own RESP3
//! client-tracking pushes, for changes made by any client — a plain redis-rs connection and
//! `redis-cli` standing in for other programs — by expiry and by a flush; a server restart and
//! a cluster failover make L1 untrusted until tracking is back.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ncm_cache_core::{CacheError, ValueSource};
use ncm_cache_multilevel::{Coherence, MultiLevelCache};
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::{RedisCluster, RedisServer};

/// How long after a foreign change an instance may still serve the old value (pushes arrive in
/// well under a millisecond on loopback; loose for a loaded CI machine).
const BOUND: Duration = Duration::from_millis(250);

fn config(url: &str) -> RedisConfig {
    let mut c = RedisConfig::from_url(url).unwrap();
    c.key_prefix = "app:".into();
    c.response_timeout = Duration::from_millis(300);
    c.connect_timeout = Duration::from_millis(300);
    c.health_check_interval = Some(Duration::from_millis(100));
    c
}

fn cluster_config(cluster: &RedisCluster) -> RedisConfig {
    let mut c = config("redis://127.0.0.1:6379");
    c.cluster_nodes = cluster.node_urls();
    c
}

async fn tracked(config: RedisConfig, mode: Coherence) -> MultiLevelCache {
    let redis = RedisCache::connect(config).await.unwrap();
    let cache = MultiLevelCache::over_redis(&redis)
        .name("users")
        .coherence(mode)
        .build()
        .unwrap();
    wait_active(&cache).await;
    cache
}

async fn wait_active(cache: &MultiLevelCache) {
    let start = Instant::now();
    while !cache.l1_active() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tracking never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads until `cache` serves `key` from its L1.
async fn until_l1(cache: &MultiLevelCache, key: &str) {
    let start = Instant::now();
    loop {
        if let Ok(Some((_, ValueSource::L1))) = cache.get_with_source::<u64>(key).await {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "L1 never used");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Polls until `cache` returns `want` for `key`; returns how long that took. Fails past `limit`.
async fn until_seen(
    cache: &MultiLevelCache,
    key: &str,
    want: Option<u64>,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(got) = cache.get::<u64>(key).await
            && got == want
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "kept serving an old value of {key} for {:?} (want {want:?}, have {:?})",
            start.elapsed(),
            cache.get_with_source::<u64>(key).await
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// A plain redis-rs connection: another program writing the cache's keys.
async fn foreign(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Another program's `SET` of the full key `key`.
async fn put<K: redis::ToRedisArgs>(
    conn: &mut impl redis::aio::ConnectionLike,
    key: K,
    bytes: &[u8],
) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(bytes)
        .query_async(conn)
        .await
        .unwrap();
}

fn p99(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[(d.len() * 99 / 100).min(d.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_by_another_program_evict_every_instance_l1() {
    let server = RedisServer::start().unwrap();
    let (a, b) = (
        tracked(config(&server.url()), Coherence::Tracking).await,
        tracked(config(&server.url()), Coherence::Tracking).await,
    );
    let mut other = foreign(&server.url()).await;
    a.set("user:1", 0u64).await.unwrap();
    let mut windows = Vec::new();
    for v in 1..=40u64 {
        until_l1(&a, "user:1").await;
        until_l1(&b, "user:1").await;
        let bytes = a.codec_bytes("user:1", &v).unwrap();
        put(&mut other, "app:user:1", &bytes).await;
        windows.push(until_seen(&b, "user:1", Some(v), BOUND).await);
        until_seen(&a, "user:1", Some(v), BOUND).await;
    }
    println!(
        "foreign write → other instances' L1: p99 {:?}",
        p99(windows)
    );
    assert!(b.get_stats().tracking_received >= 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_rename_del_expire_and_flushall_are_seen() {
    let server = RedisServer::start().unwrap();
    // Two instances: each must stop serving its copy.
    let (cache, other_instance) = (
        tracked(config(&server.url()), Coherence::Tracking).await,
        tracked(config(&server.url()), Coherence::Tracking).await,
    );
    let both = [&cache, &other_instance];
    let mut other = foreign(&server.url()).await;
    // A write by redis-cli: RENAME of a key another program prepared.
    cache.set("k", 1u64).await.unwrap();
    for c in both {
        until_l1(c, "k").await;
    }
    let bytes = cache.codec_bytes("k", &2u64).unwrap();
    put(&mut other, "staging", &bytes).await;
    server.cli(&["RENAME", "staging", "app:k"]).unwrap();
    for c in both {
        until_seen(c, "k", Some(2), BOUND).await;
    }
    // DEL.
    for c in both {
        until_l1(c, "k").await;
    }
    server.cli(&["DEL", "app:k"]).unwrap();
    for c in both {
        until_seen(c, "k", None, BOUND).await;
    }
    // Expiry by the server: the EXPIRE itself, then the key's removal when it expires.
    cache.set("k", 3u64).await.unwrap();
    for c in both {
        until_l1(c, "k").await;
    }
    server.cli(&["PEXPIRE", "app:k", "300"]).unwrap();
    let set_at = Instant::now();
    for c in both {
        until_l1(c, "k").await;
    }
    // Read from L1 only from here: a read of L2 would expire the key itself (lazily).
    for c in both {
        until_seen(
            c,
            "k",
            None,
            Duration::from_millis(300) + Duration::from_secs(2),
        )
        .await;
    }
    assert!(
        set_at.elapsed() >= Duration::from_millis(290),
        "gone before it expired"
    );
    // FLUSHALL empties every key of L1.
    for i in 0..20u64 {
        cache.set(&format!("f{i}"), i).await.unwrap();
        for c in both {
            until_l1(c, &format!("f{i}")).await;
        }
    }
    server.cli(&["FLUSHALL"]).unwrap();
    for i in 0..20u64 {
        for c in both {
            until_seen(c, &format!("f{i}"), None, BOUND).await;
        }
    }
    // FLUSHDB of another database than the cache's: tracking is not per database, so the
    // push is heard as a flush and L1 is emptied (L2, in database 0, still holds the keys).
    for i in 0..5u64 {
        cache.set(&format!("d{i}"), i).await.unwrap();
        for c in both {
            until_l1(c, &format!("d{i}")).await;
        }
    }
    server.cli(&["-n", "1", "FLUSHDB"]).unwrap();
    for i in 0..5u64 {
        for c in both {
            let start = Instant::now();
            loop {
                let read = c.get_with_source::<u64>(&format!("d{i}")).await.unwrap();
                match read.map(|(v, s)| (*v, s)) {
                    Some((v, ValueSource::L2)) if v == i => break,
                    other => assert!(
                        start.elapsed() < BOUND,
                        "d{i}: still {other:?} after a FLUSHDB of database 1"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_racing_a_foreign_write_never_leaves_the_old_value_in_l1() {
    let server = RedisServer::start().unwrap();
    let cache = tracked(config(&server.url()), Coherence::Tracking).await;
    let mut other = foreign(&server.url()).await;
    for round in 0..30u64 {
        let last = (round + 1) * 100;
        let writer = {
            let encoded: Vec<_> = (round * 100 + 1..=last)
                .map(|v| cache.codec_bytes("hot", &v).unwrap())
                .collect();
            let mut other = other.clone();
            tokio::spawn(async move {
                for bytes in encoded {
                    put(&mut other, "app:hot", &bytes).await;
                }
            })
        };
        // Readers promote whatever they read while the writes go on.
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    for _ in 0..200 {
                        let _ = cache.get::<u64>("hot").await;
                    }
                })
            })
            .collect();
        writer.await.unwrap();
        for r in readers {
            r.await.unwrap();
        }
        until_seen(&cache, "hot", Some(last), BOUND).await;
        // And it stays the last value (nothing older lands in L1 afterwards).
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(cache.get::<u64>("hot").await.unwrap(), Some(last));
    }
    let _: () = redis::cmd("DEL")
        .arg("app:hot")
        .query_async(&mut other)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_nothing_from_before_is_served_as_fresh() {
    let mut server = RedisServer::start().unwrap();
    let cache = tracked(config(&server.url()), Coherence::Tracking).await;
    cache.set("k", 1u64).await.unwrap();
    until_l1(&cache, "k").await;
    server.kill();
    // Down: L1 is not trusted (no fail-safe configured: nothing is served).
    let start = Instant::now();
    while cache.l1_active() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "outage not noticed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!matches!(
        cache.get_with_source::<u64>("k").await,
        Ok(Some((_, ValueSource::L1)))
    ));
    server.restart().unwrap();
    wait_active(&cache).await;
    // The restarted server is empty: the old value is gone everywhere.
    until_seen(&cache, "k", None, BOUND).await;
    // And tracking works again: a foreign write is seen.
    cache.set("k", 2u64).await.unwrap();
    until_l1(&cache, "k").await;
    let mut other = foreign(&server.url()).await;
    let bytes = cache.codec_bytes("k", &3u64).unwrap();
    put(&mut other, "app:k", &bytes).await;
    until_seen(&cache, "k", Some(3), BOUND).await;
    assert!(cache.get_stats().resyncs >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_together_hear_other_programs_and_other_instances() {
    let server = RedisServer::start().unwrap();
    let (a, b) = (
        tracked(config(&server.url()), Coherence::Both).await,
        tracked(config(&server.url()), Coherence::Both).await,
    );
    a.set("k", 1u64).await.unwrap();
    until_l1(&b, "k").await;
    a.set("k", 2u64).await.unwrap();
    until_seen(&b, "k", Some(2), BOUND).await;
    until_l1(&b, "k").await;
    server.cli(&["DEL", "app:k"]).unwrap();
    until_seen(&b, "k", None, BOUND).await;
    assert!(b.get_stats().backplane_received >= 1);
    assert!(b.get_stats().tracking_received >= 1);
}

/// A server with `CLIENT` and `FUNCTION` renamed away (as managed services do): the probe at
/// connect reports them missing, `health_report` shows it, tracking refuses with a clear error,
/// and a cache asking for tracking falls back to the backplane (L1 on, other instances' writes
/// heard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_client_tracking_falls_back_to_the_backplane() {
    let server = RedisServer::builder()
        .args(["--rename-command", "CLIENT", ""])
        .args(["--rename-command", "FUNCTION", ""])
        .start()
        .unwrap();
    let redis = RedisCache::connect(config(&server.url())).await.unwrap();
    let caps = redis.redis_backend().capabilities().clone();
    println!("{caps}");
    assert!(
        caps.resp3 && !caps.client_tracking && !caps.functions,
        "{caps:?}"
    );
    assert!(
        caps.tracking_refused,
        "a refusal, not a failed probe: {caps:?}"
    );
    assert_eq!(caps.server, "redis");
    assert!(
        caps.version.starts_with(|c: char| c.is_ascii_digit()),
        "{caps:?}"
    );
    assert!(
        caps.notes.iter().any(|n| n.contains("CLIENT TRACKING")),
        "{caps:?}"
    );
    let report = ncm_cache_core::CacheBackend::health_report(&**redis.redis_backend()).await;
    assert!(report.detail.contains("missing: "), "{}", report.detail);
    let refused = redis.redis_backend().track_changes().await.unwrap_err();
    assert!(matches!(refused, CacheError::Config(_)), "{refused}");
    assert!(refused.to_string().contains("backplane"), "{refused}");
    let (a, b) = (
        tracked(config(&server.url()), Coherence::Tracking).await,
        tracked(config(&server.url()), Coherence::Tracking).await,
    );
    assert_eq!(b.coherence(), Some(Coherence::Backplane));
    a.set("k", 1u64).await.unwrap();
    until_l1(&b, "k").await;
    a.set("k", 2u64).await.unwrap();
    until_seen(&b, "k", Some(2), BOUND).await;
    // Tracking asked for without any Redis to track: a clear error at build time.
    let err = MultiLevelCache::builder(ncm_cache_memory::MemoryBackend::new())
        .coherence(Coherence::Tracking)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("needs a Redis"), "{err}");
}

/// On a full server every capability this Redis version has is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_finds_what_a_plain_server_has() {
    let server = RedisServer::start().unwrap();
    let redis = RedisCache::connect(config(&server.url())).await.unwrap();
    let caps = redis.redis_backend().capabilities();
    println!("{caps}");
    assert!(
        caps.resp3 && caps.client_tracking && caps.functions && caps.sharded_pubsub,
        "{caps:?}"
    );
    assert!(!caps.tracking_refused);
    let cache = tracked(config(&server.url()), Coherence::Tracking).await;
    assert_eq!(cache.coherence(), Some(Coherence::Tracking));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_every_primary_is_tracked_and_a_failover_is_survived() {
    let mut cluster = RedisCluster::start().unwrap();
    let (a, b) = (
        tracked(cluster_config(&cluster), Coherence::Tracking).await,
        tracked(cluster_config(&cluster), Coherence::Tracking).await,
    );
    let mut other = cluster_client(&cluster).await;
    // Keys on every primary: each one's foreign write is seen.
    let keys: Vec<String> = (0..12).map(|i| format!("c{i}")).collect();
    let owners: std::collections::HashSet<u16> = keys
        .iter()
        .map(|k| cluster.owner_of(&format!("app:{k}")).unwrap())
        .collect();
    assert_eq!(owners.len(), 3, "keys must cover every primary");
    for (i, key) in keys.iter().enumerate() {
        a.set(key, 1u64).await.unwrap();
        until_l1(&b, key).await;
        let bytes = a.codec_bytes(key, &(i as u64 + 10)).unwrap();
        put(&mut other, format!("app:{key}"), &bytes).await;
        until_seen(&b, key, Some(i as u64 + 10), BOUND).await;
    }
    // A failover: the primary of c0 dies; its replica takes over. Once the new primary has
    // acknowledged a newer value, B must not serve the old one from L1.
    until_l1(&b, "c0").await;
    let old_primary = cluster.owner_of("app:c0").unwrap();
    cluster.kill_primary(old_primary).unwrap();
    cluster.wait_for_failover(Duration::from_secs(30)).unwrap();
    followed_on_the_new_topology(&b, &mut other, "c0", 99).await;
}

/// Writes `v` to `key` with the cluster client until a primary accepts it; returns when.
async fn foreign_write_until_accepted(
    other: &mut redis::cluster_async::ClusterConnection,
    codec: &MultiLevelCache,
    key: &str,
    v: u64,
) -> Instant {
    let bytes = codec.codec_bytes(key, &v).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("app:{key}"))
            .arg(bytes.as_ref())
            .query_async(other)
            .await;
        if w.is_ok() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "no primary took the write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After a topology change: a foreign write of `v` to `key` (retried until a primary takes
/// it) is never followed by an L1 read of the old value beginning more than [`BOUND`] after its
/// acknowledgement; once tracking is back, a second foreign write (`v + 1`) is seen within
/// [`BOUND`] — tracking covers the primary that now owns `key`.
async fn followed_on_the_new_topology(
    b: &MultiLevelCache,
    other: &mut redis::cluster_async::ClusterConnection,
    key: &str,
    v: u64,
) {
    let acked = foreign_write_until_accepted(other, b, key, v).await;
    never_old_from_l1(b, key, v, acked).await;
    wait_active(b).await;
    until_l1(b, key).await;
    let bytes = b.codec_bytes(key, &(v + 1)).unwrap();
    put(other, &format!("app:{key}"), &bytes).await;
    until_seen(b, key, Some(v + 1), BOUND).await;
}

/// Reads `key` on `b` until it returns `want`: a read that began more than [`BOUND`] after the
/// write was acknowledged (`acked`) must not return anything else from L1. (L2 reads may fail
/// while the cluster client learns the new topology.)
async fn never_old_from_l1(b: &MultiLevelCache, key: &str, want: u64, acked: Instant) {
    loop {
        let began = Instant::now();
        match b.get_with_source::<u64>(key).await {
            Ok(Some((v, _))) if *v == want => return,
            Ok(Some((v, ValueSource::L1))) => assert!(
                began < acked + BOUND,
                "L1 served {v} {:?} after the new value was acknowledged",
                began - acked
            ),
            _ => {}
        }
        assert!(
            acked.elapsed() < Duration::from_secs(10),
            "never saw {want}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A manual failover leaves the old primary up (now a replica): tracking moves to the new
/// primary at the next health check, so B does not keep serving its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_manual_failover_moves_tracking_to_the_new_primary() {
    let cluster = RedisCluster::start().unwrap();
    let (a, b) = (
        tracked(cluster_config(&cluster), Coherence::Tracking).await,
        tracked(cluster_config(&cluster), Coherence::Tracking).await,
    );
    let mut other = cluster_client(&cluster).await;
    a.set("m", 1u64).await.unwrap();
    until_l1(&b, "m").await;
    let primary = cluster.owner_of("app:m").unwrap();
    let replica = cluster.replica_of(primary).unwrap();
    cluster
        .node(replica)
        .unwrap()
        .command(&["CLUSTER", "FAILOVER"])
        .unwrap();
    let start = Instant::now();
    // Mid-failover every node may redirect the key for a moment: not yet.
    while cluster.owner_of("app:m").ok() != Some(replica) {
        assert!(start.elapsed() < Duration::from_secs(20), "no failover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cluster.node(primary).unwrap().is_running(),
        "the old primary stays up"
    );
    followed_on_the_new_topology(&b, &mut other, "m", 2).await;
}

/// A failover under way: the cluster has flagged a dead primary `fail`, and its replica, alive,
/// has not taken over yet. Tracking only the surviving primaries at that moment would turn L1
/// back on and miss the writes the replica acknowledges once promoted, until the next topology
/// check (a chaos run found such stale reads 1–2 s after a failover). L1 stays off until the
/// replica has taken over, then follows the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_stays_off_until_a_failed_primarys_replica_has_taken_over() {
    // The replica must be frozen within its election delay (half a second or more after it
    // flags its primary); a machine stalled longer than that lets it take over first, and the
    // scenario is set up again on a new cluster.
    for attempt in 1..=3 {
        let mut cluster = RedisCluster::start().unwrap();
        let b = tracked(cluster_config(&cluster), Coherence::Tracking).await;
        let mut other = cluster_client(&cluster).await;
        b.set("f", 1u64).await.unwrap();
        until_l1(&b, "f").await;
        let primary = cluster.owner_of("app:f").unwrap();
        let replica = cluster.replica_of(primary).unwrap();
        cluster.kill_primary(primary).unwrap();
        // The window between "flagged failed" and "replica promoted" lasts half a second or
        // more (the replica's election delay). Frozen as soon as it flags its primary, the
        // replica holds it open for 3 s, longer than tracking's slowest reconnect backoff
        // (1 s); the others' node timeout, raised at once to 6 s, keeps them from suspecting
        // the frozen replica.
        let start = Instant::now();
        while !flags_failed(cluster.node(replica).unwrap(), primary) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{replica} never flagged its primary {primary} as failed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cluster.node(replica).unwrap().pause().unwrap();
        let flagged = Instant::now();
        if seen_as_primary(&cluster, replica) {
            eprintln!("attempt {attempt}: {replica} took over before it was frozen; again");
            continue;
        }
        for node in cluster.nodes() {
            if node.is_running() && node.port() != replica {
                node.command(&["CONFIG", "SET", "cluster-node-timeout", "6000"])
                    .unwrap();
            }
        }
        // Reconnect attempts (every 100 ms while a failover is pending) and topology checks
        // come and go: L1 stays off while the shard has a replica that may take over at any
        // moment.
        while flagged.elapsed() < Duration::from_secs(3) {
            assert!(
                !b.l1_active(),
                "L1 was turned on {:?} after {primary} was flagged failed, before its replica \
                 {replica} took over",
                flagged.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cluster.node(replica).unwrap().resume().unwrap();
        cluster.wait_for_failover(Duration::from_secs(30)).unwrap();
        followed_on_the_new_topology(&b, &mut other, "f", 2).await;
        return;
    }
    panic!("the replica took over before it could be frozen, three times");
}

/// Some other running node lists the node on `port` as a primary.
fn seen_as_primary(cluster: &RedisCluster, port: u16) -> bool {
    cluster
        .nodes()
        .iter()
        .filter(|n| n.is_running() && n.port() != port)
        .any(|n| flags_of(n, port).iter().any(|f| f == "master"))
}

/// A replica set to `cluster-replica-no-failover` never promotes itself: its primary's death
/// is a lost shard, not a failover to wait for, so L1 comes back over the surviving primaries
/// (a key of another shard is tracked again), and a manual failover later is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_comes_back_over_the_survivors_when_the_replica_will_not_take_over() {
    let mut cluster = RedisCluster::start().unwrap();
    let b = tracked(cluster_config(&cluster), Coherence::Tracking).await;
    let mut other = cluster_client(&cluster).await;
    b.set("n", 1u64).await.unwrap();
    let primary = cluster.owner_of("app:n").unwrap();
    let elsewhere = key_not_on(&cluster, primary);
    let replica = cluster.replica_of(primary).unwrap();
    cluster
        .node(replica)
        .unwrap()
        .command(&["CONFIG", "SET", "cluster-replica-no-failover", "yes"])
        .unwrap();
    // The other shards keep serving while this one is down.
    for node in cluster.nodes() {
        node.command(&["CONFIG", "SET", "cluster-require-full-coverage", "no"])
            .unwrap();
    }
    cluster.kill_primary(primary).unwrap();
    wait_flagged_failed(&cluster, primary).await;
    let flagged = Instant::now();
    while !b.l1_active() {
        assert!(
            flagged.elapsed() < Duration::from_secs(3),
            "L1 stayed off although {primary}'s only replica never takes over on its own"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.set(&elsewhere, 1u64).await.unwrap();
    until_l1(&b, &elsewhere).await;
    let bytes = b.codec_bytes(&elsewhere, &2u64).unwrap();
    put(&mut other, &format!("app:{elsewhere}"), &bytes).await;
    until_seen(&b, &elsewhere, Some(2), BOUND).await;
    // Told to, the replica takes over; tracking follows it at the next health check.
    cluster
        .node(replica)
        .unwrap()
        .command(&["CLUSTER", "FAILOVER", "FORCE"])
        .unwrap();
    cluster.wait_for_failover(Duration::from_secs(30)).unwrap();
    followed_on_the_new_topology(&b, &mut other, "n", 2).await;
}

/// A replica whose data is too old to be promoted (`cluster-replica-validity-factor`) looks
/// like any other, so its shard's failover never completes: L1 stays off for
/// `cluster_failover_wait`, then comes back over the survivors. When the frozen primary answers
/// again it still owns its slots (the cluster clears its `fail` flag only later) and takes
/// writes at once: tracking takes it back at the next health check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_comes_back_when_a_failover_outlasts_cluster_failover_wait() {
    const WAIT: Duration = Duration::from_secs(1);
    let cluster = RedisCluster::start().unwrap();
    let mut config = cluster_config(&cluster);
    config.cluster_failover_wait = WAIT;
    let b = tracked(config.clone(), Coherence::Tracking).await;
    let mut other = cluster_client(&cluster).await;
    b.set("w", 1u64).await.unwrap();
    until_l1(&b, "w").await;
    let primary = cluster.owner_of("app:w").unwrap();
    let replica = cluster.replica_of(primary).unwrap();
    // The replica refuses to fail over when it last heard from its primary more than
    // repl-ping-replica-period + node-timeout × validity-factor (1 s + 2 s) before the primary
    // stopped answering; the primary pings it only once an hour and gets no writes meanwhile.
    let rep = cluster.node(replica).unwrap();
    rep.command(&["CONFIG", "SET", "cluster-replica-validity-factor", "1"])
        .unwrap();
    rep.command(&["CONFIG", "SET", "repl-ping-replica-period", "1"])
        .unwrap();
    let pri = cluster.node(primary).unwrap();
    pri.command(&["CONFIG", "SET", "repl-ping-replica-period", "3600"])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    pri.pause().unwrap();
    wait_flagged_failed(&cluster, primary).await;
    let flagged = Instant::now();
    while !b.l1_active() {
        assert!(
            flagged.elapsed() < WAIT + Duration::from_secs(6),
            "L1 stayed off for more than cluster_failover_wait ({WAIT:?}) plus 6 s of reconnects"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let off_for = flagged.elapsed();
    eprintln!("L1 back {off_for:?} after the primary was flagged failed");
    assert!(
        !cluster
            .cluster_nodes(replica)
            .unwrap()
            .lines()
            .any(|l| l.contains("myself,master")),
        "setup: the replica {replica} took over, so there was no failover that never completes"
    );
    assert!(
        off_for >= WAIT - Duration::from_millis(200),
        "L1 came back {off_for:?} after the primary was flagged failed, before \
         cluster_failover_wait ({WAIT:?}) while its replica could still take over"
    );
    // An instance started while the failover is stuck waits for it no longer either (its
    // first tracking attempts fail, and the wait is not restarted by each of them):
    // `tracked` fails unless its L1 is on within 10 s.
    let _late = tracked(config, Coherence::Tracking).await;
    // The primary answers again, still flagged failed by the others (for up to twice the node
    // timeout): its writes reach this instance once the next health check has found it. Its
    // replica, now up to date again, is kept from taking over meanwhile.
    rep.command(&["CONFIG", "SET", "cluster-replica-no-failover", "yes"])
        .unwrap();
    pri.resume().unwrap();
    until_l1(&b, "w").await;
    followed_on_the_new_topology(&b, &mut other, "w", 2).await;
}

/// A cluster client for writes from "another program".
async fn cluster_client(cluster: &RedisCluster) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.node_urls())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

/// A key (without the `app:` prefix) whose slot the primary on `port` does not own.
fn key_not_on(cluster: &RedisCluster, port: u16) -> String {
    (0..100)
        .map(|i| format!("k{i}"))
        .find(|k| cluster.owner_of(&format!("app:{k}")).unwrap() != port)
        .unwrap()
}

/// Waits until every other running node flags the node on `port` `fail`.
async fn wait_flagged_failed(cluster: &RedisCluster, port: u16) {
    let start = Instant::now();
    while !cluster
        .nodes()
        .iter()
        .filter(|n| n.is_running() && n.port() != port)
        .all(|n| flags_failed(n, port))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the cluster never flagged {port} as failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `node`'s `CLUSTER NODES` flags the node on `port` `fail` (not just `fail?`).
fn flags_failed(node: &ncm_cache_testkit::RedisServer, port: u16) -> bool {
    flags_of(node, port).iter().any(|f| f == "fail")
}

/// The flags `node`'s `CLUSTER NODES` gives the node on `port` (none if it cannot be read).
fn flags_of(node: &ncm_cache_testkit::RedisServer, port: u16) -> Vec<String> {
    let needle = format!(":{port}@");
    let text = node.command(&["CLUSTER", "NODES"]).unwrap_or_default();
    text.lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields
                .next()
                .filter(|addr| addr.contains(&needle))
                .and(fields.next())
        })
        .map(|flags| flags.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

/// A `RedisCache` on the primary a Sentinel set names, with short timeouts.
async fn through_sentinel(
    set: &ncm_cache_testkit::RedisSentinelSet,
    password: Option<&str>,
) -> RedisCache {
    let sentinels: Vec<String> = set.sentinel_addrs().iter().map(|a| a.to_string()).collect();
    let mut builder = RedisCache::builder()
        .sentinel(set.master_name(), sentinels)
        .key_prefix("app:")
        .health_check_interval(Some(Duration::from_millis(100)))
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500));
    if let Some(password) = password {
        builder = builder.password(password);
    }
    builder.build().await.unwrap()
}

/// Through Sentinel: the resolved primary is tracked; after a failover, tracking follows the
/// new primary and a foreign write there is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_sentinel_tracking_follows_a_failover() {
    let mut set = ncm_cache_testkit::RedisSentinelSet::start().unwrap();
    let redis = through_sentinel(&set, None).await;
    let b = MultiLevelCache::over_redis(&redis)
        .coherence(Coherence::Tracking)
        .build()
        .unwrap();
    wait_active(&b).await;
    let url = |addr: std::net::SocketAddr| format!("redis://{addr}");
    b.set("s", 1u64).await.unwrap();
    until_l1(&b, "s").await;
    let mut other = foreign(&url(set.primary_addr().unwrap())).await;
    let bytes = b.codec_bytes("s", &2u64).unwrap();
    put(&mut other, "app:s", &bytes).await;
    until_seen(&b, "s", Some(2), BOUND).await;
    // Failover: the primary dies, a replica is promoted.
    until_l1(&b, "s").await;
    set.kill_primary().unwrap();
    set.wait_for_failover(Duration::from_secs(30)).unwrap();
    let mut other = foreign(&url(set.primary_addr().unwrap())).await;
    let bytes = b.codec_bytes("s", &3u64).unwrap();
    put(&mut other, "app:s", &bytes).await;
    let acked = Instant::now();
    never_old_from_l1(&b, "s", 3, acked).await;
    wait_active(&b).await;
    until_l1(&b, "s").await;
    let bytes = b.codec_bytes("s", &4u64).unwrap();
    put(&mut other, "app:s", &bytes).await;
    until_seen(&b, "s", Some(4), BOUND).await;
}

/// A password-protected primary behind Sentinel: the data connection, the backplane's
/// subscription, client tracking (its `ROLE` checks) and the capability probe all log in, so
/// `Coherence::Both` comes up and another instance's write and a foreign write are both seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_sentinel_primary_is_subscribed_and_tracked() {
    let set = ncm_cache_testkit::RedisSentinelSet::start_with_password("s3cret").unwrap();
    let (ra, rb) = (
        through_sentinel(&set, Some("s3cret")).await,
        through_sentinel(&set, Some("s3cret")).await,
    );
    assert!(
        !rb.redis_backend().capabilities().tracking_refused,
        "{}",
        rb.redis_backend().capabilities()
    );
    let a = MultiLevelCache::over_redis(&ra).build().unwrap();
    let b = MultiLevelCache::over_redis(&rb)
        .coherence(Coherence::Both)
        .build()
        .unwrap();
    wait_active(&a).await;
    wait_active(&b).await;
    assert_eq!(b.coherence(), Some(Coherence::Both));
    a.set("p", 1u64).await.unwrap();
    until_l1(&b, "p").await;
    a.set("p", 2u64).await.unwrap();
    until_seen(&b, "p", Some(2), BOUND).await;
    until_l1(&b, "p").await;
    let primary = set.primary_addr().unwrap();
    let mut other = foreign(&format!("redis://:s3cret@{primary}")).await;
    let bytes = b.codec_bytes("p", &3u64).unwrap();
    put(&mut other, "app:p", &bytes).await;
    until_seen(&b, "p", Some(3), BOUND).await;
}

/// A "not found" cached in L1 (`negative_ttl`) has no Redis key behind it, so a delete or a
/// clear elsewhere changes nothing Redis would push about. The instance that invalidates
/// still has to reach the others: a source that now has the key must be asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_or_clear_elsewhere_ends_a_cached_not_found() {
    let server = RedisServer::start().unwrap();
    for epoch in [false, true] {
        let build = || async {
            let mut c = config(&server.url());
            c.max_key_len = 64;
            let redis = RedisCache::connect(c).await.unwrap();
            let cache = MultiLevelCache::over_redis(&redis)
                .name("users")
                .coherence(Coherence::Tracking)
                .negative_ttl(Duration::from_secs(60))
                .epoch_clear(epoch)
                .build()
                .unwrap();
            wait_active(&cache).await;
            cache
        };
        let (a, b) = (build().await, build().await);
        // With epochs, the first read creates the epoch key, whose push every instance hears
        // as a clear: a "not found" loaded across it is not cached (it may predate the clear).
        a.get::<u64>("warm-up").await.unwrap();
        tokio::time::sleep(BOUND).await;
        for (i, by) in ["delete", "pattern", "clear"].into_iter().enumerate() {
            // As long as a key may be (with epochs, less the `@{token}:` in front of it in
            // L2): its marker's name is longer still.
            let len = if epoch { 64 - 18 } else { 64 };
            let key = format!("absent:{epoch}:{i}:{}", "x".repeat(64))[..len].to_owned();
            let none = a
                .get_or_load_optional::<u64, _, _, std::io::Error>(&key, || async { Ok(None) })
                .await
                .unwrap();
            assert_eq!(none, None);
            // The "not found" is served from L1 now: the loader is not asked.
            let cached = a
                .get_or_load_optional::<u64, _, _, std::io::Error>(&key, || async { Ok(Some(7)) })
                .await
                .unwrap();
            assert_eq!(
                cached, None,
                "epoch {epoch}, {by}: the not-found was not cached"
            );
            match by {
                "delete" => {
                    b.delete(&key).await.unwrap();
                }
                "pattern" => {
                    use ncm_cache_core::CacheBackend;
                    b.as_backend()
                        .clear_pattern(&format!("absent:{epoch}:*"))
                        .await
                        .unwrap();
                }
                _ => b.clear().await.unwrap(),
            }
            tokio::time::sleep(BOUND).await;
            let after = a
                .get_or_load_optional::<u64, _, _, std::io::Error>(&key, || async { Ok(Some(1)) })
                .await
                .unwrap();
            assert_eq!(
                after.as_deref(),
                Some(&1),
                "epoch_clear {epoch}, by {by}: a cached not-found outlived the invalidation"
            );
        }
    }
}

/// A delete, a pattern delete or a `clear()` whose caller is cancelled after its L2 call
/// reached Redis — or whose delete fails after it ran — still writes its marker, so tracking
/// instances drop a cached "not found" within the bound. Before (review, helper-75) the marker
/// was written only by a call that ended well: the others kept the "not found" for their whole
/// `negative_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_failed_delete_still_ends_a_cached_not_found() {
    use ncm_cache_core::{CacheBackend, SharedBackend};
    let server = RedisServer::start().unwrap();
    let ra = RedisCache::connect(config(&server.url())).await.unwrap();
    let a = MultiLevelCache::over_redis(&ra)
        .name("users")
        .coherence(Coherence::Tracking)
        .negative_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    // B's L2 calls go through `Slow`; its markers through its tracking Redis.
    let rb = RedisCache::connect(config(&server.url())).await.unwrap();
    let slow = Arc::new(support::Slow::new(rb.backend()));
    let b = MultiLevelCache::builder(Arc::clone(&slow) as SharedBackend)
        .name("users")
        .client_tracking(Arc::clone(rb.redis_backend()))
        .build()
        .unwrap();
    wait_active(&a).await;
    wait_active(&b).await;
    for (i, by) in ["delete", "delete fails", "pattern", "clear"]
        .into_iter()
        .enumerate()
    {
        let key = format!("gone:{i}");
        let none = a
            .get_or_load_optional::<u64, _, _, std::io::Error>(&key, || async { Ok(None) })
            .await
            .unwrap();
        assert_eq!(none, None);
        let cached = a
            .get_or_load_optional::<u64, _, _, std::io::Error>(&key, || async { Ok(Some(7)) })
            .await
            .unwrap();
        assert_eq!(cached, None, "the not-found was not cached");
        let held = Duration::from_millis(300);
        match by {
            "delete" => {
                slow.delete_reply_delay(held);
                let r = tokio::time::timeout(Duration::from_millis(100), b.delete(&key)).await;
                assert!(r.is_err(), "the delete was meant to be cancelled");
            }
            "delete fails" => {
                slow.delete_fails_after(true);
                assert!(
                    b.delete(&key).await.is_err(),
                    "the delete was meant to fail"
                );
                slow.delete_fails_after(false);
            }
            "pattern" => {
                slow.other_reply_delay(held);
                let r = tokio::time::timeout(
                    Duration::from_millis(100),
                    b.as_backend().clear_pattern(&format!("gone:{i}*")),
                )
                .await;
                assert!(r.is_err(), "the pattern delete was meant to be cancelled");
            }
            _ => {
                slow.other_reply_delay(held);
                let r = tokio::time::timeout(Duration::from_millis(100), b.clear()).await;
                assert!(r.is_err(), "the clear was meant to be cancelled");
            }
        }
        tokio::time::sleep(held + BOUND).await;
        slow.delete_reply_delay(Duration::ZERO);
        slow.other_reply_delay(Duration::ZERO);
        let after = a
            .get_or_load_optional::<u64, _, _, std::io::Error>(&key, || async { Ok(Some(1)) })
            .await
            .unwrap();
        assert_eq!(
            after.as_deref(),
            Some(&1),
            "by a {by}: a cached not-found outlived the invalidation"
        );
    }
}

/// Client tracking on a Redis whose key prefix is not L2's is refused at build: its pushes
/// name keys no L1 key maps to, so L1 would have kept old values for their whole TTL without
/// a word (review, helper-75). The same prefix builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_under_another_prefix_than_l2s_is_refused() {
    let server = RedisServer::start().unwrap();
    let mut c = config(&server.url());
    c.key_prefix = "app:v2:".into();
    let l2 = RedisCache::connect(c).await.unwrap();
    let tracker = RedisCache::connect(config(&server.url())).await.unwrap();
    let refused = MultiLevelCache::builder(l2.backend())
        .client_tracking(Arc::clone(tracker.redis_backend()))
        .build();
    let Err(CacheError::Config(message)) = refused else {
        panic!("a tracker under another prefix was accepted");
    };
    assert!(message.contains("app:v2:"), "{message}");
    assert!(
        MultiLevelCache::builder(l2.backend())
            .client_tracking(Arc::clone(l2.redis_backend()))
            .build()
            .is_ok()
    );
}
