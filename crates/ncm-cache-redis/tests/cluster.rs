//! RedisCache on a throwaway 3-primary Redis Cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use ncm_cache_core::{Bytes, CacheBackend};
use ncm_cache_redis::{PipelineResult, RedisCache, RedisConfig, RedisSyncCache};
use ncm_cache_testkit::RedisCluster;
use ncm_cache_testkit::conformance::{self, RealTime};

fn config(cluster: &RedisCluster) -> RedisConfig {
    let mut c = RedisConfig::default();
    c.cluster_nodes = cluster.node_urls();
    c.response_timeout = Duration::from_secs(1);
    c.connect_timeout = Duration::from_secs(1);
    c.health_check_interval = None;
    c
}

/// Writes `{prefix}:0` … `{prefix}:{n - 1}`, each holding its own name, in one batch; their
/// names.
async fn write_own_names(
    backend: &ncm_cache_core::SharedBackend,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}:{i}")).collect();
    let entries: Vec<(&str, Bytes)> = keys
        .iter()
        .map(|k| (k.as_str(), Bytes::from(k.clone())))
        .collect();
    backend.set_many(&entries, None).await.unwrap();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_conformance_spread_batches_patterns_and_failover() {
    let mut cluster = RedisCluster::start().unwrap();
    let cache = RedisCache::connect(config(&cluster)).await.unwrap();
    assert!(cache.redis_backend().is_cluster());
    conformance::run(cache.backend(), &RealTime).await;
    let sync = RedisSyncCache::connect(config(&cluster)).unwrap();
    conformance::run(support::sync_backend(sync), &RealTime).await;

    // Keys spread over all three primaries.
    let backend = cache.backend();
    let keys = write_own_names(&backend, "spread", 300).await;
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let primaries = cluster.primaries().unwrap();
    assert_eq!(primaries.len(), 3);
    for port in &primaries {
        let n: u64 = cluster
            .node(*port)
            .unwrap()
            .cli(&["DBSIZE"])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(n > 50, "primary {port} holds {n} keys: not spread");
    }
    // Cross-slot batches come back complete and in order.
    let mut mixed: Vec<&str> = refs.clone();
    mixed.insert(7, "missing:a");
    mixed.insert(150, "missing:b");
    let got = backend.get_many(&mixed).await.unwrap();
    for (k, v) in mixed.iter().zip(&got) {
        if k.starts_with("missing") {
            assert!(v.is_none());
        } else {
            assert_eq!(v.as_deref(), Some(k.as_bytes()), "{k}");
        }
    }
    // clear_pattern reaches every primary and nothing else.
    backend
        .set("other:1", Bytes::from_static(b"x"), None)
        .await
        .unwrap();
    assert_eq!(backend.clear_pattern("spread:1*").await.unwrap(), 111);
    assert_eq!(backend.delete_many(&refs).await.unwrap(), 300 - 111);
    assert!(backend.exists("other:1").await.unwrap());
    for port in &primaries {
        let node = cluster.node(*port).unwrap();
        assert_eq!(
            node.cli(&["INFO", "commandstats"])
                .unwrap()
                .matches("cmdstat_keys:")
                .count(),
            0
        );
    }

    // Kill a primary; after failover the cache keeps working.
    let victim = primaries[0];
    cluster.kill_primary(victim).unwrap();
    cluster.wait_for_failover(Duration::from_secs(30)).unwrap();
    let start = Instant::now();
    loop {
        let ok = async {
            for i in 0..30 {
                let k = format!("after:{i}");
                cache.set(&k, &i).await?;
                if cache.get::<i32>(&k).await? != Some(i) {
                    return Err(ncm_cache_core::CacheError::InvalidArgument(
                        "wrong value".into(),
                    ));
                }
            }
            Ok::<_, ncm_cache_core::CacheError>(())
        }
        .await;
        if ok.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "cache not working after failover: {ok:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// While a primary is down (before and during its failover), every call is still bounded by
/// the configured timeouts: the cluster client's own retries and slot refreshes do not add up
/// to many seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_during_a_failover_are_bounded_by_the_timeouts() {
    let mut cluster = RedisCluster::start().unwrap();
    let cache = RedisCache::connect(config(&cluster)).await.unwrap();
    let keys: Vec<String> = (0..30).map(|i| format!("fo:{i}")).collect();
    for k in &keys {
        cache.set(k, &1u32).await.unwrap();
    }
    let primaries = cluster.primaries().unwrap();
    cluster.kill_primary(primaries[0]).unwrap();
    // response_timeout + connect_timeout (1 s each) + scheduling slack.
    let bound = Duration::from_millis(2700);
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(6) {
        for k in &keys {
            let t = Instant::now();
            let _ = cache.get::<u32>(k).await;
            worst = worst.max(t.elapsed());
        }
    }
    cluster.wait_for_failover(Duration::from_secs(30)).unwrap();
    assert!(
        worst <= bound,
        "a call took {worst:?} during the failover (bound {bound:?})"
    );
}

/// Concurrent gets on a cluster are batched per primary (one pipeline of GETs for each primary
/// owning two or more of a batch's keys): every caller still gets its own key's value, missing
/// keys included, and a hash-tagged group of keys reads like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_on_a_cluster_each_get_their_own_value() {
    let cluster = RedisCluster::start().unwrap();
    let cache = RedisCache::connect(config(&cluster)).await.unwrap();
    let backend = cache.backend();
    let key = |i: usize| match i % 10 {
        0 => format!("{{tag}}:{i}"),
        _ => format!("batched:{i}"),
    };
    for i in 0..200 {
        backend
            .set(&key(i), Bytes::from(key(i)), None)
            .await
            .unwrap();
    }
    let tasks: Vec<_> = (0..64usize)
        .map(|t| {
            let backend = backend.clone();
            tokio::spawn(async move {
                for n in 0..40usize {
                    let i = (t * 13 + n * 7) % 230;
                    let got = backend.get(&key(i)).await.unwrap();
                    if i < 200 {
                        assert_eq!(got, Some(Bytes::from(key(i))), "{}", key(i));
                    } else {
                        assert_eq!(got, None, "{}", key(i));
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// A primary that stops answering (paused, as a host that hangs) holds up only the reads of
/// its own keys: a batch is sent as one part per primary, each answered as soon as its primary
/// answers, and gives its slot back once its first part is answered (10 ms at most), so reads
/// of the other primaries' keys, in the same batches or in later ones, come back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_primary_holds_up_only_its_own_keys_reads() {
    let cluster = RedisCluster::start().unwrap();
    let mut c = config(&cluster);
    c.response_timeout = Duration::from_millis(1500);
    let cache = RedisCache::connect(c).await.unwrap();
    let backend = cache.backend();
    let keys: Vec<String> = (0..90).map(|i| format!("stall:{i}")).collect();
    for k in &keys {
        backend.set(k, Bytes::from(k.clone()), None).await.unwrap();
    }
    // Concurrent reads first, so that the slot map is known.
    let warm: Vec<_> = keys
        .iter()
        .map(|k| {
            let (backend, k) = (backend.clone(), k.clone());
            tokio::spawn(async move { backend.get(&k).await.unwrap() })
        })
        .collect();
    for w in warm {
        assert!(w.await.unwrap().is_some());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let victim = cluster.primaries().unwrap()[0];
    let stalled: Vec<bool> = keys
        .iter()
        .map(|k| cluster.owner_of(k).unwrap() == victim)
        .collect();
    cluster.node(victim).unwrap().pause().unwrap();
    // In waves, so that batch slots are taken again and again while the primary is stalled
    // (each wave's batches hold some of its keys).
    let mut reads = Vec::new();
    for wave in keys.chunks(15) {
        for k in wave {
            let (backend, k) = (backend.clone(), k.clone());
            reads.push(tokio::spawn(async move {
                let start = Instant::now();
                let r = backend.get(&k).await;
                (r, start.elapsed())
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut results = Vec::new();
    for r in reads {
        results.push(r.await.unwrap());
    }
    cluster.node(victim).unwrap().resume().unwrap();
    let mut healthy = 0;
    for ((k, stalled), (r, took)) in keys.iter().zip(stalled).zip(results) {
        if stalled {
            continue;
        }
        healthy += 1;
        assert_eq!(r.unwrap(), Some(Bytes::from(k.clone())), "{k}");
        assert!(
            took < Duration::from_millis(700),
            "{k}, on a primary that answers, took {took:?} (held up by the stalled one?)"
        );
    }
    assert!(healthy >= 30, "{healthy} keys on the answering primaries");
}

/// Reads of many tasks at once (batched, one pipeline per primary) on `keys`: a read that gets
/// a value must get its key's own; returns the reads that failed and the slowest read.
/// SETs run since they started on the cluster's primaries and on `also` (a node just added,
/// owning no slot yet): replicas are left out, as they run their primaries' SETs again.
fn sets_run_on_primaries(cluster: &RedisCluster, also: Option<u16>) -> u64 {
    let mut nodes = cluster.primaries().unwrap();
    nodes.extend(also.filter(|p| !nodes.contains(p)));
    nodes
        .iter()
        .map(|p| cluster.node(*p).unwrap().command_calls("set").unwrap())
        .sum()
}

/// A `RedisPipeline` of SET and GET of `a`, SET and GET of `b`, and EXISTS of `a`: it ends
/// within 1 s and each GET answers its SET's value.
async fn pipeline_writes_and_reads(cache: &RedisCache, a: &str, b: &str) {
    let mut pipeline = cache.pipeline();
    pipeline
        .set(a, "piped")
        .get(a)
        .set(b, "piped")
        .get(b)
        .exists(a);
    let started = Instant::now();
    let results = cache.execute_pipeline(pipeline).await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "the pipeline took {took:?}");
    assert_eq!(results.len(), 5);
    for at in [1, 3] {
        assert_eq!(
            results[at]
                .decode::<String>(cache.codec())
                .unwrap()
                .as_deref(),
            Some("piped"),
            "pipeline read {at} of {a}, {b}"
        );
    }
    assert_eq!(results[4], PipelineResult::Bool(true));
}

async fn read_all_concurrently(
    backend: &ncm_cache_core::SharedBackend,
    keys: &[String],
    rounds: usize,
) -> (Vec<String>, Duration) {
    let tasks: Vec<_> = (0..64usize)
        .map(|t| {
            let backend = backend.clone();
            let keys = keys.to_vec();
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut worst = Duration::ZERO;
                for n in 0..rounds {
                    let k = &keys[(t * 13 + n * 7) % keys.len()];
                    let start = Instant::now();
                    let got = backend.get(k).await;
                    worst = worst.max(start.elapsed());
                    match got {
                        Ok(Some(v)) => assert_eq!(v, Bytes::from(k.clone()), "{k}: a wrong value"),
                        other => failures.push(format!("{k}: {other:?}")),
                    }
                }
                (failures, worst)
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut worst = Duration::ZERO;
    for t in tasks {
        let (f, w) = t.await.unwrap();
        failures.extend(f);
        worst = worst.max(w);
    }
    (failures, worst)
}

/// A slot moved from one primary to another while many tasks read (and `get_many`,
/// `delete_many` and writes run on its keys). While the slot is half
/// migrated its source answers `ASK` for the keys it no longer holds; redis-rs's own `ASK`
/// handling sent `ASKING` apart from the command on the shared connection, and under
/// concurrent reads that wedged the cluster connection: every later call timed out, on every
/// node (each round of this test failed with `Timeout`s). Now (redis-rs's retries off, `ASK`
/// followed by `conn.rs`'s `cluster_call` with `ASKING` and the command in one pipeline) every
/// read while the slot is half moved gets its own key's value, none fails, and none waits
/// anywhere near the response timeout; after the move, see below.
async fn reads_follow_a_slot_being_migrated(auto_batch: bool, onto_a_new_node: bool) {
    let mut cluster = RedisCluster::start().unwrap();
    let mut c = config(&cluster);
    c.auto_batch = auto_batch;
    let cache = RedisCache::connect(c).await.unwrap();
    let backend = cache.backend();
    // 40 keys in one slot (a hash tag), and 120 spread over every primary, some of them on
    // the slot's own primary: batches mix moved, not yet moved and untouched keys.
    let moving: Vec<String> = (0..40).map(|i| format!("{{mig}}:{i}")).collect();
    let mut keys: Vec<String> = (0..120).map(|i| format!("around:{i}")).collect();
    keys.extend(moving.iter().cloned());
    for k in &keys {
        backend.set(k, Bytes::from(k.clone()), None).await.unwrap();
    }
    // Keys to delete while the slot moves: 10 of the slot, half of them moved first, and 10 of
    // other slots (a delete of all of them is refused for the slot only).
    let mut gone: Vec<String> = (0..10).map(|i| format!("{{mig}}:gone:{i}")).collect();
    gone.extend((0..10).map(|i| format!("gone-elsewhere:{i}")));
    for k in &gone {
        backend
            .set(k, Bytes::from_static(b"x"), None)
            .await
            .unwrap();
    }
    // Concurrent reads first, so that the slot map is known.
    let (failures, _) = read_all_concurrently(&backend, &keys, 20).await;
    assert!(failures.is_empty(), "before the move: {failures:?}");
    // A `RedisPipeline` of one slot's keys goes as one transaction, which runs (see below for
    // one during the migration).
    let execs = || {
        let node = cluster.node(cluster.owner_of(&moving[0]).unwrap()).unwrap();
        (
            node.command_calls("exec").unwrap(),
            node.command_failures("exec").unwrap(),
        )
    };
    let before = execs();
    pipeline_writes_and_reads(&cache, &moving[10], &moving[11]).await;
    let after = execs();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 0),
        "EXECs, and failed ones, for a pipeline on one slot"
    );
    for k in [&moving[10], &moving[11]] {
        backend.set(k, Bytes::from(k.clone()), None).await.unwrap();
    }
    let slot = cluster.slot_of(&moving[0]).unwrap();
    let from = cluster.owner_of(&moving[0]).unwrap();
    // A new node owns no slot, so the cluster client has no connection to it when the first
    // `ASK` names it (as in a resharding onto a node just added).
    let to = if onto_a_new_node {
        cluster.add_node().unwrap()
    } else {
        cluster.other_primary(from).unwrap()
    };
    cluster.begin_slot_migration(slot, from, to).unwrap();
    let mut half: Vec<&str> = moving[..20].iter().map(String::as_str).collect();
    half.extend(gone[..5].iter().map(String::as_str));
    cluster.migrate_keys(from, to, &half).unwrap();
    // The first `ASK`s come to many tasks at once: one connection to the node named is made
    // for all of them.
    let connections = || -> u64 {
        let info = cluster
            .node(to)
            .unwrap()
            .command(&["INFO", "stats"])
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    };
    let before = connections();
    let (failures, _) = read_all_concurrently(&backend, &keys, 10).await;
    assert!(failures.is_empty(), "first ASKs: {failures:?}");
    let made = connections() - before;
    assert!(made <= 2, "{made} connections to the node an ASK named");
    // Writes of the slot's keys while it moves, each read back from where it now lives.
    for k in moving.iter().step_by(5) {
        backend.set(k, Bytes::from(k.clone()), None).await.unwrap();
    }
    // Calls on many keys, the slot's moved and not-yet-moved ones among them (the source
    // refuses such an `MGET` or `UNLINK` with `TRYAGAIN`): asked again key by key.
    let all: Vec<&str> = keys.iter().map(String::as_str).collect();
    let got = backend.get_many(&all).await.unwrap();
    for (k, v) in all.iter().zip(&got) {
        assert_eq!(
            v.as_deref(),
            Some(k.as_bytes()),
            "get_many while half moved: {k}"
        );
    }
    let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
    assert_eq!(backend.delete_many(&gone).await.unwrap(), 20);
    let got = backend.get_many(&gone).await.unwrap();
    assert!(
        got.iter().all(Option::is_none),
        "deleted while half moved: {got:?}"
    );
    // `set_many` of moved and not yet moved keys of the slot, in both orders: each value is
    // written once (two SETs run in all), where its key now lives. Before, the slot's
    // pipeline failed with the `ASK` after the source had run the SETs of the keys it still
    // held (the caller got an error for writes that were made; sending each SET again after
    // that runs three).
    // On the primaries, and the target when it is a node just added (no slot yet).
    let sets_run = || sets_run_on_primaries(&cluster, Some(to));
    // And a moved key alone (a slot's lone SET goes as a command, following its `ASK`; the
    // pipeline of one SET failed with the `ASK` before). A pair whose keys are one key given
    // twice is set once, to its last value.
    let lone = [(moving[2].as_str(), Bytes::from_static(b"other"))];
    let before = sets_run();
    backend.set_many(&lone, None).await.unwrap();
    assert_eq!(sets_run() - before, 1, "SETs run for a set_many of 1 key");
    let twice = [
        (moving[3].as_str(), Bytes::from_static(b"first")),
        (moving[3].as_str(), Bytes::from_static(b"other")),
    ];
    backend.set_many(&twice, None).await.unwrap();
    for k in [&moving[2], &moving[3]] {
        assert_eq!(
            backend.get(k).await.unwrap().as_deref(),
            Some(&b"other"[..]),
            "{k}"
        );
        backend.set(k, Bytes::from(k.clone()), None).await.unwrap();
    }
    for (a, b) in [(0, 30), (31, 1)] {
        let pair = [
            (moving[a].as_str(), Bytes::from_static(b"other")),
            (moving[b].as_str(), Bytes::from_static(b"other")),
        ];
        let before = sets_run();
        let started = Instant::now();
        backend.set_many(&pair, None).await.unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "set_many took {took:?}");
        assert_eq!(sets_run() - before, 2, "SETs run for a set_many of 2 keys");
        for (k, _) in &pair {
            assert_eq!(
                backend.get(k).await.unwrap().as_deref(),
                Some(&b"other"[..])
            );
            backend
                .set(k, Bytes::from(k.to_string()), None)
                .await
                .unwrap();
        }
    }
    // A `RedisPipeline` on a moved and a not yet moved key of the slot, in both orders, with
    // a read of each after its write: every command runs once, where its key now lives, in
    // the pipeline's order. Before, the slot's pipeline failed with the `ASK` after the
    // source had run the commands on the keys it still held.
    let aborted = || {
        cluster
            .node(from)
            .unwrap()
            .command_failures("exec")
            .unwrap()
    };
    for (a, b) in [(4, 33), (34, 5)] {
        let (before, aborted_before) = (sets_run(), aborted());
        pipeline_writes_and_reads(&cache, &moving[a], &moving[b]).await;
        assert_eq!(sets_run() - before, 2, "SETs run for a pipeline of 2 SETs");
        assert_eq!(aborted() - aborted_before, 1, "the source's aborted EXECs");
        for k in [&moving[a], &moving[b]] {
            backend.set(k, Bytes::from(k.clone()), None).await.unwrap();
        }
    }
    // Over more than the second for which batched pipelines are held back after a redirect.
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    while start.elapsed() < Duration::from_millis(2500) {
        let (failures, w) = read_all_concurrently(&backend, &keys, 30).await;
        assert!(
            failures.is_empty(),
            "slot half moved: {} failed reads, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        worst = worst.max(w);
    }
    assert!(
        worst < Duration::from_millis(500),
        "a read took {worst:?} while the slot was half moved (response timeout 1 s)"
    );
    let rest: Vec<&str> = moving[20..].iter().map(String::as_str).collect();
    cluster.migrate_keys(from, to, &rest).unwrap();
    cluster.end_slot_migration(slot, from, to).unwrap();
    assert_eq!(cluster.owner_of(&moving[0]).unwrap(), to);
    // After the move (`MOVED`, and redis-rs reading the slot map again under many concurrent
    // calls), redis-rs's connection sometimes stops sending anything at all (with tokio
    // 1.54.1, about one run in five here; the likely cause is in docs/ARCHITECTURE.md), also
    // after reads have answered again for a round; it is then replaced (`conn.rs`'s
    // `ClusterConn`). So reads may time out for a while, but never get a wrong value, and
    // within 10 s three rounds in a row answer every read.
    let start = Instant::now();
    let (mut timed_out, mut clean) = (0, 0);
    while clean < 3 {
        let (failures, _) = read_all_concurrently(&backend, &keys, 30).await;
        for f in &failures {
            assert!(f.contains("Timeout"), "slot moved: {f}");
        }
        if failures.is_empty() {
            clean += 1;
        } else {
            clean = 0;
            timed_out += failures.len();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "slot moved: reads still fail after {:?} ({timed_out} timed out)",
            start.elapsed()
        );
    }
    eprintln!(
        "slot moved: three clean rounds after {:?} ({timed_out} timed out)",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_reads_follow_a_slot_being_migrated() {
    reads_follow_a_slot_being_migrated(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_reads_follow_a_slot_moving_onto_a_new_node() {
    reads_follow_a_slot_being_migrated(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbatched_reads_follow_a_slot_being_migrated() {
    reads_follow_a_slot_being_migrated(false, false).await;
}

/// A primary killed while many tasks read (batched pipelines in flight to it): no read ever
/// gets another key's value or an invented one, every read is bounded by the timeouts, and
/// once the replica has taken over, reads of every key succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_reads_through_a_failover_are_bounded_and_recover() {
    let mut cluster = RedisCluster::start().unwrap();
    let cache = RedisCache::connect(config(&cluster)).await.unwrap();
    let backend = cache.backend();
    let keys: Vec<String> = (0..150).map(|i| format!("fobatch:{i}")).collect();
    for k in &keys {
        backend.set(k, Bytes::from(k.clone()), None).await.unwrap();
    }
    let (failures, _) = read_all_concurrently(&backend, &keys, 20).await;
    assert!(failures.is_empty(), "before the failover: {failures:?}");
    let victim = cluster.owner_of(&keys[0]).unwrap();
    let readers: Vec<_> = (0..64usize)
        .map(|t| {
            let backend = backend.clone();
            let keys = keys.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let (mut ok, mut failed, mut worst) = (0u32, 0u32, Duration::ZERO);
                let mut n = 0usize;
                while start.elapsed() < Duration::from_secs(5) {
                    let k = &keys[(t * 13 + n * 7) % keys.len()];
                    n += 1;
                    let began = Instant::now();
                    match backend.get(k).await {
                        Ok(Some(v)) => {
                            assert_eq!(v, Bytes::from(k.clone()), "{k} read another value");
                            ok += 1;
                        }
                        Ok(None) => panic!("{k} read as missing"),
                        Err(_) => {
                            failed += 1;
                            // Errors come fast while the primary is down: not a busy loop.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    worst = worst.max(began.elapsed());
                }
                (ok, failed, worst)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill_primary(victim).unwrap();
    let (mut ok, mut failed, mut worst) = (0, 0, Duration::ZERO);
    for r in readers {
        let (o, f, w) = r.await.unwrap();
        ok += o;
        failed += f;
        worst = worst.max(w);
    }
    assert!(ok > 0, "no read succeeded ({failed} failed)");
    // response_timeout + connect_timeout (1 s each) + scheduling slack.
    assert!(
        worst <= Duration::from_millis(2700),
        "a read took {worst:?} during the failover"
    );
    cluster.wait_for_failover(Duration::from_secs(30)).unwrap();
    // Once the replica serves the slots, every key reads again (within a few seconds: the
    // client learns the new primary on its next slot refresh).
    let start = Instant::now();
    loop {
        let (failures, _) = read_all_concurrently(&backend, &keys, 10).await;
        if failures.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "10 s after the failover, reads still fail: {:?}",
            &failures[..failures.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A call that must not run twice (`query_cmd`: here a `BLMOVE`) whose reply is lost after
/// Redis ran it is not sent again: it fails at once, and the server ran it once. Before
/// c2d08bd the cluster connection sent it again after the lost connection (redis-rs's
/// retries, then `cluster_call`'s): a second `BLMOVE` blocked until the response timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_must_not_run_twice_is_not_sent_again_after_a_lost_reply() {
    let cluster = RedisCluster::start().unwrap();
    let mut c = config(&cluster);
    c.response_timeout = Duration::from_secs(3);
    let cache = RedisCache::connect(c).await.unwrap();
    let owner = cluster.owner_of("{nsa}src").unwrap();
    let node = cluster.node(owner).unwrap();
    let (result, took) =
        support::lose_the_reply_of_a_command_that_ran(node, cache.redis_backend()).await;
    assert!(result.is_err(), "the reply was lost: {result:?}");
    assert!(took < Duration::from_secs(2), "failed after {took:?}");
    // A second try would be blocked now (the source list is empty): wait past where it would
    // have been sent, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        node.command_calls("blmove").unwrap(),
        1,
        "BLMOVE sent again"
    );
    assert_eq!(node.command(&["LLEN", "{nsa}dst"]).unwrap(), "1");
    // The cache works on.
    let backend = cache.backend();
    backend
        .set("{nsa}after", Bytes::from_static(b"v"), None)
        .await
        .unwrap();
    assert_eq!(
        backend.get("{nsa}after").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

/// `RedisSyncCache` (redis-rs's blocking cluster client, one pooled connection per thread)
/// while a slot is moved to another primary: reads from 8 threads, `get_many`, `delete_many`
/// across slots and writes of the slot's keys while it is half moved, then after the move.
/// Before, `get_many` panicked inside redis-rs (its split of an `MGET` across slots, one part
/// redirected: index out of bounds), and with that split by slot here it took 2.6 s with a
/// 1 s response timeout (redis-rs waited at least 1.28 s before each of its retries of
/// `TRYAGAIN`).
#[test]
fn sync_calls_follow_a_slot_being_migrated() {
    let cluster = RedisCluster::start().unwrap();
    let mut c = config(&cluster);
    c.max_connections = 8;
    let sync = RedisSyncCache::connect(c).unwrap();
    let moving: Vec<String> = (0..40).map(|i| format!("{{smig}}:{i}")).collect();
    let mut keys: Vec<String> = (0..60).map(|i| format!("saround:{i}")).collect();
    keys.extend(moving.iter().cloned());
    for k in &keys {
        sync.set_bytes(k, k.as_bytes(), None).unwrap();
    }
    let mut gone: Vec<String> = (0..10).map(|i| format!("{{smig}}:gone:{i}")).collect();
    gone.extend((0..10).map(|i| format!("sgone-elsewhere:{i}")));
    for k in &gone {
        sync.set_bytes(k, b"x", None).unwrap();
    }
    let read_all = |keys: &[String], for_: Duration| -> Vec<String> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..8usize)
                .map(|t| {
                    let sync = sync.clone();
                    s.spawn(move || {
                        let mut failures = Vec::new();
                        let start = Instant::now();
                        let mut n = 0;
                        while start.elapsed() < for_ {
                            let k = &keys[(t * 13 + n * 7) % keys.len()];
                            n += 1;
                            match sync.get_bytes(k) {
                                Ok(Some(v)) => assert_eq!(v, k.as_bytes(), "{k}: a wrong value"),
                                other => failures.push(format!("{k}: {other:?}")),
                            }
                        }
                        failures
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        })
    };
    assert_eq!(
        read_all(&keys, Duration::from_millis(300)),
        Vec::<String>::new()
    );
    let slot = cluster.slot_of("{smig}").unwrap();
    let from = cluster.owner_of("{smig}").unwrap();
    let to = cluster.other_primary(from).unwrap();
    cluster.begin_slot_migration(slot, from, to).unwrap();
    let mut half: Vec<&str> = moving[..20].iter().map(String::as_str).collect();
    half.extend(gone[..5].iter().map(String::as_str));
    cluster.migrate_keys(from, to, &half).unwrap();
    for k in moving.iter().step_by(5) {
        sync.set_bytes(k, k.as_bytes(), None).unwrap();
    }
    // Calls on many keys, some of the slot's moved and some not (the source refuses them
    // with `TRYAGAIN`): split by slot and asked again key by key, within the response timeout.
    let all: Vec<&str> = keys.iter().map(String::as_str).collect();
    let started = Instant::now();
    let got = sync.get_many_bytes(&all).unwrap();
    for (k, v) in all.iter().zip(&got) {
        assert_eq!(
            v.as_deref(),
            Some(k.as_bytes()),
            "get_many while half moved: {k}"
        );
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "get_many took {took:?}");
    let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
    let started = Instant::now();
    assert_eq!(sync.delete_many(&gone).unwrap(), 20);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "delete_many took {took:?}");
    assert!(
        sync.get_many_bytes(&gone)
            .unwrap()
            .iter()
            .all(Option::is_none)
    );
    // Pipelines on moved and not yet moved keys of the slot (`set_many`), in both orders:
    // every value is written once (two SETs run in all), where its key now lives. Before,
    // redis-rs's plain pipeline failed with the `ASK` and was sent again whole to the target
    // behind one `ASKING`: with the not yet moved key first, that key was created on the
    // target too, and the rest of the migration failed with `BUSYKEY`.
    let sets_run = || sets_run_on_primaries(&cluster, None);
    for (a, b) in [(0, 30), (31, 1)] {
        let pair = [
            (moving[a].as_str(), &b"other"[..]),
            (moving[b].as_str(), &b"other"[..]),
        ];
        let before = sets_run();
        let started = Instant::now();
        sync.set_many_bytes(&pair, None).unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "set_many took {took:?}");
        assert_eq!(sets_run() - before, 2, "SETs run for a set_many of 2 keys");
        for (k, _) in &pair {
            assert_eq!(sync.get_bytes(k).unwrap().as_deref(), Some(&b"other"[..]));
            sync.set_bytes(k, k.as_bytes(), None).unwrap();
        }
    }
    let failures = read_all(&keys, Duration::from_secs(2));
    assert!(failures.is_empty(), "slot half moved: {failures:?}");
    let rest: Vec<&str> = moving[20..].iter().map(String::as_str).collect();
    cluster.migrate_keys(from, to, &rest).unwrap();
    cluster.end_slot_migration(slot, from, to).unwrap();
    let failures = read_all(&keys, Duration::from_secs(2));
    assert!(failures.is_empty(), "slot moved: {failures:?}");
}

/// The runtime a cluster cache connected on is shut down (a `static` cache first used by one
/// `#[tokio::test]`, then by the next ones): the cluster connection's task died with it, so
/// every call on that connection fails at once. The cache replaces it on the callers' runtime
/// and goes on — first with 2 callers (too few to start a batch slot's task, whose loss marked
/// the runtime gone; their batches' slower parts go on in tasks of their own), then with 64.
/// Before (review, helper-76), only a timeout replaced the cluster connection: it stayed dead
/// for the life of the process, and those parts kept being spawned on the dead runtime (their
/// reads answered "abandoned").
#[test]
fn a_cluster_cache_goes_on_after_the_runtime_it_connected_on_shut_down() {
    let cluster = RedisCluster::start().unwrap();
    let keys = 200usize;
    let value = |i: usize| Bytes::from(format!("value-of-k{i}"));
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cache = first.block_on(async {
        let cache = RedisCache::connect(config(&cluster))
            .await
            .unwrap()
            .backend();
        for i in 0..keys {
            cache.set(&format!("k{i}"), value(i), None).await.unwrap();
        }
        cache
    });
    drop(first);
    let callers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (round, tasks) in [2usize, 2, 2, 64, 64].into_iter().enumerate() {
        let (ok, abandoned, failed) =
            callers.block_on(support::mixed_round(&cache, tasks, keys, round));
        eprintln!("round {round} ({tasks} tasks): {ok} ok, {abandoned} abandoned, {failed} failed");
        // The first round's calls may fail until the connection is replaced.
        if round > 0 {
            assert_eq!(abandoned, 0, "round {round}: {abandoned} calls abandoned");
            assert!(
                failed <= 1 + tasks / 5,
                "round {round}: {failed} calls failed, {ok} answered (the cluster connection \
                 was never replaced)"
            );
        }
    }
}

/// A cluster whose nodes close connections idle for a second (set once it is made: `redis-cli
/// --cluster create` idles its own connections).
fn closing_idle_connections() -> RedisCluster {
    let cluster = RedisCluster::start().unwrap();
    for node in cluster.nodes() {
        node.command(&["CONFIG", "SET", "timeout", "1"]).unwrap();
    }
    cluster
}

/// Every node closes connections idle for a second (`timeout 1`, or a load balancer's idle
/// timeout). After each idle spell, the next call of each kind — a write, a read, a batch, a
/// delete, a script (the lock) — still reaches Redis: it is not the caller's business that the
/// cluster's connections were closed while nothing used them. Before (RESP2, no close
/// notice), the first write failed with "broken pipe": a write is not resent after a lost
/// connection, since it may have landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_every_node_closed_the_idle_connections_reach_redis() {
    let cluster = closing_idle_connections();
    let cache = RedisCache::connect(config(&cluster)).await.unwrap();
    let backend = cache.backend();
    let keys: Vec<String> = (0..30).map(|i| format!("idle:{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let v = Bytes::from_static(b"v");
    // Redis checks each client's idle time about once a second.
    let idle = || tokio::time::sleep(Duration::from_millis(2_500));
    idle().await;
    let started = Instant::now();
    backend
        .set("idle:0", v.clone(), None)
        .await
        .unwrap_or_else(|e| panic!("the write after an idle close failed: {e}"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the write took {:?}",
        started.elapsed()
    );
    idle().await;
    let read = backend.get("idle:0").await;
    assert_eq!(read.unwrap(), Some(v.clone()));
    idle().await;
    let entries: Vec<(&str, Bytes)> = refs.iter().map(|k| (*k, v.clone())).collect();
    backend
        .set_many(&entries, None)
        .await
        .unwrap_or_else(|e| panic!("the batch write after an idle close failed: {e}"));
    let got = backend.get_many(&refs).await.unwrap();
    assert!(got.iter().all(|g| g.as_ref() == Some(&v)), "{got:?}");
    idle().await;
    let deleted = backend.delete("idle:1").await;
    assert!(deleted.unwrap_or_else(|e| panic!("the delete after an idle close failed: {e}")));
    idle().await;
    let lock = cache
        .redis_backend()
        .try_lock("idle:lock", Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("the lock after an idle close failed: {e}"))
        .expect("the lock was refused");
    assert!(lock.release().await.unwrap(), "not released");
}

/// The blocking cache on a cluster whose nodes close idle connections: redis-rs's blocking
/// cluster client resends a call whose connection was lost (writes included: see `sync.rs`),
/// so the next write and read after each idle spell reach Redis.
#[test]
fn sync_calls_after_every_node_closed_the_idle_connections_reach_redis() {
    let cluster = closing_idle_connections();
    let cache = RedisSyncCache::connect(config(&cluster)).unwrap();
    support::sync_calls_after_idle_spells(&cache);
}

/// Nodes without `HELLO` (before Redis 6; here renamed away) get RESP2 on the cluster
/// connection, and the cache works as before — also when a seed is down: redis-rs reports
/// only the last seed's error, which could be that one's (review, helper-99), so every seed
/// is asked on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_hello_gets_resp2() {
    let cluster = RedisCluster::start_with(ncm_cache_testkit::RedisServer::builder().args([
        "--rename-command",
        "HELLO",
        "",
    ]))
    .unwrap();
    let mut c = config(&cluster);
    // A seed nothing listens on, first and last.
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("redis://{}", listener.local_addr().unwrap())
    };
    c.cluster_nodes.insert(0, down.clone());
    c.cluster_nodes.push(down);
    let cache = RedisCache::connect(c).await.unwrap();
    let backend = cache.backend();
    let keys = write_own_names(&backend, "old", 30).await;
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let got = backend.get_many(&refs).await.unwrap();
    for (k, g) in refs.iter().zip(&got) {
        assert_eq!(g.as_deref(), Some(k.as_bytes()));
    }
    assert!(backend.delete("old:0").await.unwrap());
}

/// A slot is being migrated: writes of its moved keys go to the node an `ASK` names, on a
/// connection of the cache's own to that node. That node closes it after a second idle
/// (`timeout 1`); the next write redirected there still lands (the close notice drops the
/// connection, and the next `ASK` makes a new one). Before (review, helper-99), that
/// connection spoke RESP2 and lived on closed: the write failed with "broken pipe" (a write
/// is not resent after a lost connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_node_an_ask_named_closed_the_idle_connection_lands() {
    let cluster = closing_idle_connections();
    let cache = RedisCache::connect(config(&cluster)).await.unwrap();
    let backend = cache.backend();
    let keys: Vec<String> = (0..4).map(|i| format!("{{askidle}}:{i}")).collect();
    for k in &keys {
        backend
            .set(k, Bytes::from_static(b"v0"), None)
            .await
            .unwrap();
    }
    let slot = cluster.slot_of(&keys[0]).unwrap();
    let from = cluster.owner_of(&keys[0]).unwrap();
    let to = cluster.other_primary(from).unwrap();
    cluster.begin_slot_migration(slot, from, to).unwrap();
    cluster.migrate_keys(from, to, &[keys[0].as_str()]).unwrap();
    for round in 1..=2 {
        let v = Bytes::from(format!("v{round}"));
        backend
            .set(&keys[0], v.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the redirected write failed: {e}"));
        // Read back through the same redirect (the key lives on the target now).
        assert_eq!(
            backend.get(&keys[0]).await.unwrap(),
            Some(v),
            "round {round}"
        );
        // Redis checks each client's idle time about once a second.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
    }
    cluster
        .migrate_keys(
            from,
            to,
            &[keys[1].as_str(), keys[2].as_str(), keys[3].as_str()],
        )
        .unwrap();
    cluster.end_slot_migration(slot, from, to).unwrap();
}
