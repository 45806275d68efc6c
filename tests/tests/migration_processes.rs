//! `set_many` and `RedisPipeline` on a 3+3 cluster from three OS processes while the slot
//! their keys share moves to another primary, as `redis-cli --cluster reshard` moves it (half
//! the keys migrated, a pause, the rest). Each process (`src/bin/migration_worker.rs`) writes
//! pairs of the slot's 24 keys from 4 tasks, half through `set_many`, half through a pipeline
//! of two SETs and a GET of each. Checked:
//! - the migration completes and the slot ends on the target (a SET run again on the target
//!   for a key the source still held makes `MIGRATE` fail with `BUSYKEY`);
//! - no call fails except by timing out (redis-rs's cluster connection can stall after the
//!   `MOVED` on tokio 1.54: see docs/ARCHITECTURE.md, `conn.rs` (cluster)); before the fix, a
//!   pipeline holding a moved key failed with the `ASK`;
//! - the migration was met: the primaries refused calls (`ASK`/`MOVED`), the source aborted
//!   transactions, and calls that succeeded overlapped the half-moved pause;
//! - every pipeline GET answered a value some call wrote (checked in the workers);
//! - each call's two SETs ran once (`INFO commandstats` on the primaries): sending a
//!   transaction's commands again after a plain pipeline had run some of them runs more;
//! - each key's final value was written by a call (or is the seed), and no call that succeeded
//!   began after that call had ended.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ncm_cache::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisCluster;

const WORKERS: u64 = 3;
const KEYS: u64 = 24;

fn micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// A worker, and its stdout lines.
fn spawn(
    nodes: &str,
    id: u64,
    secs: f64,
    out: &std::path::Path,
) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_migration_worker"))
        .env("NCM_REDIS_NODES", nodes)
        .env("NCM_WORKER_ID", id.to_string())
        .env("NCM_WORKER_SECS", secs.to_string())
        .env("NCM_WORKER_KEYS", KEYS.to_string())
        .env("NCM_WORKER_OUT", out)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits (bounded) for `line` from a worker.
fn expect(rx: &mpsc::Receiver<String>, line: &str, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l == line => return,
            Ok(_) => {}
            Err(e) => panic!("no `{line}` from a worker within {within:?}: {e}"),
        }
    }
}

/// One call's write of one key, from a worker's log.
struct Write {
    start: u128,
    end: u128,
    outcome: String,
    value: String,
}

fn config(cluster: &RedisCluster) -> RedisConfig {
    let mut c = RedisConfig::default();
    c.cluster_nodes = cluster.node_urls();
    c.key_prefix = "mig:".into();
    c
}

#[test]
fn writes_of_several_processes_follow_a_slot_being_migrated_on_a_cluster() {
    let cluster = RedisCluster::start().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cache = runtime
        .block_on(RedisCache::connect(config(&cluster)))
        .unwrap();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("{{mp}}:k{i}")).collect();
    for k in &keys {
        runtime.block_on(cache.set(k, "seed")).unwrap();
    }
    let seeded = micros();
    let stored = format!("mig:{}", keys[0]);
    let slot = cluster.slot_of(&stored).unwrap();
    let from = cluster.owner_of(&stored).unwrap();
    let to = cluster.other_primary(from).unwrap();
    let refused = || cluster.rejected_calls_on_primaries().unwrap();
    let aborted = || {
        cluster
            .node(from)
            .unwrap()
            .command_failures("exec")
            .unwrap()
    };
    // SETs run on the primaries (replicas run them again): each call's two SETs run once.
    let sets_run = || cluster.command_calls_on_primaries("set").unwrap();
    let (refused_before, aborted_before, sets_before) = (refused(), aborted(), sets_run());

    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster.node_urls().join(",");
    let mut workers: Vec<_> = (1..=WORKERS)
        .map(|id| {
            let out = dir.path().join(format!("w{id}.log"));
            let (child, rx) = spawn(&nodes, id, 7.0, &out);
            (child, rx, out)
        })
        .collect();
    for (_, rx, _) in &workers {
        expect(rx, "ready", Duration::from_secs(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let moving = micros();
    cluster
        .move_slot(slot, from, to, Duration::from_secs(2))
        .unwrap();
    let moved = micros();
    for (child, rx, _) in &mut workers {
        expect(rx, "done", Duration::from_secs(30));
        assert!(child.wait().unwrap().success(), "a worker failed");
    }
    let (refused_after, aborted_after) = (refused(), aborted());
    let sets = sets_run() - sets_before;
    // After the counts: asking the primaries for the owner meets `MOVED` too.
    assert_eq!(cluster.owner_of(&stored).unwrap(), to, "the slot's owner");

    // The logs: every call's outcome, and each key's writes.
    let mut writes: HashMap<String, Vec<Write>> = HashMap::new();
    let (mut ok, mut timed_out, mut ok_while_moving) = (0u64, 0u64, 0u64);
    let mut reads: Vec<(String, String)> = Vec::new();
    for (_, _, out) in &workers {
        for line in std::fs::read_to_string(out).unwrap().lines() {
            assert!(!line.starts_with("bad-read"), "{line}");
            if let Some(read) = line.strip_prefix("G ") {
                let (k, v) = read.split_once('=').unwrap();
                reads.push((k.to_owned(), v.to_owned()));
                continue;
            }
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!((f[0], f.len()), ("W", 6), "{line}");
            let (start, end): (u128, u128) = (f[1].parse().unwrap(), f[2].parse().unwrap());
            match f[3] {
                "ok" => {
                    ok += 1;
                    if start < moved && end > moving {
                        ok_while_moving += 1;
                    }
                }
                "timeout" => timed_out += 1,
                other => panic!("a call failed: {other} ({line})"),
            }
            for kv in &f[4..] {
                let (k, v) = kv.split_once('=').unwrap();
                writes.entry(k.to_owned()).or_default().push(Write {
                    start,
                    end,
                    outcome: f[3].to_owned(),
                    value: v.to_owned(),
                });
            }
        }
    }
    eprintln!(
        "{ok} calls ok ({ok_while_moving} overlapping the migration), {timed_out} timed out, {sets} SETs run; \
         {} commands refused, {} EXECs aborted",
        refused_after - refused_before,
        aborted_after - aborted_before
    );
    // A timed-out call may have run none, one or both of its SETs.
    assert!(
        (2 * ok..=2 * (ok + timed_out)).contains(&sets),
        "{sets} SETs run for {ok} calls ok and {timed_out} timed out (two SETs each)"
    );
    assert!(ok_while_moving > 0, "no call overlapped the migration");
    assert!(refused_after > refused_before, "no call met ASK or MOVED");
    assert!(
        aborted_after > aborted_before,
        "the source aborted no transaction"
    );

    // Every pipeline read answers a value some call wrote to its key (or the seed).
    assert!(!reads.is_empty(), "no pipeline read");
    for (k, v) in &reads {
        assert!(
            v == "seed"
                || writes
                    .get(k)
                    .is_some_and(|ws| ws.iter().any(|w| &w.value == v)),
            "a pipeline read of {k} answered {v}, which no call wrote to it"
        );
    }

    // The last write of each key: made by some call, and no successful call began after it
    // had ended.
    for k in &keys {
        let last: Option<String> = runtime.block_on(cache.get(k)).unwrap();
        let last = last.unwrap_or_else(|| panic!("{k} has no value"));
        let empty = Vec::new();
        let ws = writes.get(k).unwrap_or(&empty);
        let end = if last == "seed" {
            seeded
        } else {
            let w = ws
                .iter()
                .find(|w| w.value == last)
                .unwrap_or_else(|| panic!("{k}: {last} was written by no call"));
            // A call that timed out may still be applied after it returned.
            if w.outcome == "timeout" {
                u128::MAX
            } else {
                w.end
            }
        };
        if let Some(later) = ws.iter().find(|w| w.outcome == "ok" && w.start > end) {
            panic!(
                "{k} holds {last}, but {} was written by a call that began after that one ended",
                later.value
            );
        }
    }
}
