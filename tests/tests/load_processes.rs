//! Stampede protection across OS processes for the layers that run over a `MultiLevelCache`
//! (`MultiLevelCache::over_redis`: L1 + Redis L2 + backplane + distributed lock, through
//! `Cache::new(multi.as_backend(), codec)`): `CacheLoader`, `#[cache_loader]` and
//! `CacheStrategies::read_through`. Three processes call one key at once; its loader — slower
//! than the lock's TTL, so only a renewed lock holds — runs once in all of them, and every
//! call gets its value. On one node and on a 3+3 cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ncm_cache_testkit::{RedisCluster, RedisServer};

/// A worker process (`src/bin/load_worker.rs`), its stdin and its stdout lines.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn start(redis: (&str, &str), mode: &str, load_ms: u64, calls: usize) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_load_worker"))
            .env(redis.0, redis.1)
            .env("NCM_REDIS_PREFIX", "stampede:")
            .env("NCM_LOAD_MODE", mode)
            .env("NCM_LOAD_MS", load_ms.to_string())
            .env("NCM_LOAD_CALLS", calls.to_string())
            .env("NCM_LOCK_TTL_MS", LOCK_TTL_MS.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let worker = Self {
            child,
            stdin,
            lines,
        };
        worker.until("ready", Duration::from_secs(20));
        worker
    }

    fn go(&mut self, key: &str) {
        writeln!(self.stdin, "go {key}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The lines up to one equal to `last` (bounded wait).
    fn until(&self, last: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == last => return seen,
                Ok(line) => seen.push(line),
                Err(_) => panic!("no `{last}` line within {within:?}; saw {seen:?}"),
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Shorter than a load: only a lock renewed while its loader runs keeps the others out.
const LOCK_TTL_MS: u64 = 600;
const LOAD_MS: u64 = 1500;
const CALLS: usize = 4;

/// Three processes, `CALLS` concurrent calls each, one key: the loader runs once in all, and
/// every call gets its value.
fn one_load_across_processes(redis: (&str, &str), mode: &str) {
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| Worker::start(redis, mode, LOAD_MS, CALLS))
        .collect();
    for (round, key) in ["k1", "k2"].into_iter().enumerate() {
        for w in &mut workers {
            w.go(key);
        }
        let mut ran = 0;
        for w in &workers {
            let lines = w.until("done", Duration::from_secs(30));
            ran += lines.iter().filter(|l| l.starts_with("ran ")).count();
            let got: Vec<_> = lines.iter().filter(|l| l.starts_with("got ")).collect();
            assert_eq!(
                got.len(),
                CALLS,
                "{mode}, round {round}: every call answers: {lines:?}"
            );
            for g in got {
                assert_eq!(g, &format!("got value of {key}"), "{mode}: {lines:?}");
            }
        }
        assert_eq!(
            ran, 1,
            "{mode}, round {round}: the loader ran {ran} times across three processes \
             (stampede lock not taken, or not renewed past its TTL)"
        );
    }
}

#[test]
fn a_cache_loader_over_a_multilevel_cache_loads_once_across_processes() {
    let server = RedisServer::start().unwrap();
    one_load_across_processes(("NCM_REDIS_URL", &server.url()), "loader");
}

#[test]
fn a_cache_loader_macro_over_a_multilevel_cache_loads_once_across_processes() {
    let server = RedisServer::start().unwrap();
    one_load_across_processes(("NCM_REDIS_URL", &server.url()), "macro");
}

#[test]
fn strategies_read_through_over_a_multilevel_cache_loads_once_across_processes() {
    let server = RedisServer::start().unwrap();
    one_load_across_processes(("NCM_REDIS_URL", &server.url()), "strategies");
}

#[test]
fn loaders_over_a_multilevel_cache_load_once_across_processes_on_a_cluster() {
    let cluster = RedisCluster::start().unwrap();
    let nodes = cluster.node_urls().join(",");
    for mode in ["loader", "macro", "strategies"] {
        one_load_across_processes(("NCM_REDIS_NODES", &nodes), mode);
    }
}

/// A `#[cache_loader]` returning `Option` whose source has nothing: the holder's "not found"
/// is the other processes' answer too — the source is asked once, not once per process after
/// the holder's load (found by review: waiters loaded again after waiting).
#[test]
fn a_not_found_over_the_lock_is_every_processes_answer() {
    let server = RedisServer::start().unwrap();
    let url = server.url();
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| Worker::start(("NCM_REDIS_URL", &url), "option", LOAD_MS, CALLS))
        .collect();
    for w in &mut workers {
        w.go("gone");
    }
    let mut ran = 0;
    for w in &workers {
        let lines = w.until("done", Duration::from_secs(30));
        ran += lines.iter().filter(|l| l.starts_with("ran ")).count();
        let none = lines.iter().filter(|l| *l == "got none").count();
        assert_eq!(none, CALLS, "{lines:?}");
    }
    // One: the holder. (A waiter whose poll a loaded machine delays past the note's 250 ms
    // takes the lock and asks again: at most one more. Without the note: one per process.)
    assert!(
        ran < 3,
        "the source was asked {ran} times for a key it does not have"
    );
}

/// A `WriteAround` loader stores nothing for others to find, so it takes no lock: three
/// processes load at once, none waits for another's load first (found by review: they waited
/// a whole load for a lock whose holder left them nothing, then loaded).
#[test]
fn a_write_around_loader_does_not_wait_for_other_processes() {
    let server = RedisServer::start().unwrap();
    let url = server.url();
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| Worker::start(("NCM_REDIS_URL", &url), "around", LOAD_MS, CALLS))
        .collect();
    for w in &mut workers {
        w.go("k");
    }
    let mut began = Vec::new();
    for w in &workers {
        let lines = w.until("done", Duration::from_secs(30));
        let got = lines.iter().filter(|l| *l == "got value of k").count();
        assert_eq!(got, CALLS, "{lines:?}");
        began.extend(lines.iter().filter_map(|l| {
            l.strip_prefix("began k ")
                .map(|ms| ms.parse::<u64>().unwrap())
        }));
    }
    assert_eq!(began.len(), 3, "one load per process: {began:?}");
    // The three loads overlapped: none began after another's whole load (as it does when
    // it waits for a lock first).
    let spread = began.iter().max().unwrap() - began.iter().min().unwrap();
    assert!(spread < LOAD_MS, "loads began {spread} ms apart: {began:?}");
}

/// The lock holder is killed in the middle of its load: its lock expires after its TTL (no
/// one renews it) and a waiter in another process loads; every call of the survivor answers.
#[test]
fn a_holder_killed_mid_load_lets_another_process_load() {
    let server = RedisServer::start().unwrap();
    let redis = ("NCM_REDIS_URL", server.url());
    let mut holder = Worker::start((redis.0, &redis.1), "loader", 5_000, 1);
    let mut waiter = Worker::start((redis.0, &redis.1), "loader", LOAD_MS, CALLS);
    holder.go("k");
    let seen = holder.until("ran k", Duration::from_secs(10));
    assert!(seen.is_empty(), "{seen:?}");
    waiter.go("k");
    // Waiting for the holder's lock, not loading.
    std::thread::sleep(Duration::from_millis(LOCK_TTL_MS));
    holder.child.kill().unwrap();
    let start = Instant::now();
    let lines = waiter.until("done", Duration::from_secs(30));
    let ran = lines.iter().filter(|l| l.starts_with("ran ")).count();
    assert_eq!(ran, 1, "{lines:?}");
    let got = lines.iter().filter(|l| *l == "got value of k").count();
    assert_eq!(got, CALLS, "{lines:?}");
    // The lock's TTL, the load, and polling: well under the waiters' wait (10 × TTL) + load.
    assert!(
        start.elapsed() < Duration::from_millis(LOCK_TTL_MS * 3 + LOAD_MS + 2_000),
        "{:?}",
        start.elapsed()
    );
}
