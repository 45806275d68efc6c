//! The reloader across OS processes: the owner of an Eager value is SIGKILLed in the middle of
//! a reload; another process takes its timer over and reloads before the value expires, so a
//! reader never finds the key missing. And refresh-ahead read at once by three processes past
//! its refresh point loads once in all, on one node and on a 3+3 cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ncm_cache::{RedisCache, RedisConfig};
use ncm_cache_testkit::{RedisCluster, RedisServer};

const TTL_MS: u64 = 3000;

/// A worker process (`src/bin/reload_worker.rs`), its stdin and its stdout lines.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn start(server: &RedisServer, id: &str) -> Self {
        Self::start_with(("NCM_REDIS_URL", &server.url()), id, "eager")
    }

    /// A worker on `redis` (`NCM_REDIS_URL` or `NCM_REDIS_NODES`, and its value) reloading
    /// with `strategy` (`eager` or `refresh_ahead`).
    fn start_with(redis: (&str, &str), id: &str, strategy: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_reload_worker"))
            .env(redis.0, redis.1)
            .env("NCM_REDIS_PREFIX", "reload:")
            .env("NCM_WORKER_ID", id)
            .env("NCM_RELOAD_TTL_MS", TTL_MS.to_string())
            .env("NCM_RELOAD_FRACTION", "0.5")
            .env("NCM_RELOAD_LOAD_MS", "200")
            .env("NCM_RELOAD_LOCK_MS", "500")
            .env("NCM_RELOAD_STRATEGY", strategy)
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
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn get(&mut self) {
        writeln!(self.stdin, "get").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Every line printed within `window`.
    fn lines_within(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            seen.push(line);
        }
        seen
    }

    /// Waits (bounded) for a line starting with `prefix`.
    fn wait_for(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(_) => panic!("no `{prefix}` line within {within:?}"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eager_values_owner_killed_mid_reload_is_replaced_before_the_value_expires() {
    let server = RedisServer::start().unwrap();
    let mut config = RedisConfig::from_url(&server.url()).unwrap();
    config.key_prefix = "reload:".into();
    let reader = RedisCache::connect(config).await.unwrap();
    let mut a = Worker::start(&server, "A");
    a.wait_for("ready", Duration::from_secs(10));
    a.wait_for("loaded 1", Duration::from_secs(5));
    // "loaded" is printed by the loader, just before the reloader writes the value.
    let start = Instant::now();
    while reader.get::<String>("config").await.unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the first load was never stored"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = Worker::start(&server, "B");
    b.wait_for("ready", Duration::from_secs(10));
    // A owns the timer: kill it in the middle of its next reload (it holds the run lease and
    // the timer lease, and its value has half of its TTL left).
    a.wait_for("loading 2", Duration::from_millis(TTL_MS * 2));
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    let mut b_value = None;
    let mut samples = 0;
    while killed.elapsed() < Duration::from_millis(TTL_MS * 3) {
        let value = reader.get::<String>("config").await.unwrap();
        let Some(value) = value else {
            panic!(
                "the value was missing {:?} after its owner was killed (no other instance \
                 reloaded it in time)",
                killed.elapsed()
            );
        };
        if value.starts_with("B:") && b_value.is_none() {
            b_value = Some((value, killed.elapsed()));
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (value, after) = b_value.expect("B never reloaded the value");
    eprintln!("B took over: {value} after {after:?}; {samples} reads, none missing");
}

/// Three processes read a `RefreshAhead` value at once past its refresh point: each starts a
/// background refresh, and the loader runs once in all of them — the refreshes that get the
/// run lease after the first take its value, younger than the refresh point, instead of
/// loading again (before stop 50 each instance loaded in turn). Then every process reads the
/// refreshed value.
fn refresh_ahead_loads_once_across_processes(redis: (&str, &str)) {
    let mut workers: Vec<Worker> = ["A", "B", "C"]
        .into_iter()
        .map(|id| Worker::start_with(redis, id, "refresh_ahead"))
        .collect();
    for w in &workers {
        w.wait_for("ready", Duration::from_secs(20));
    }
    // A loads the value; B and C read it.
    workers[0].get();
    assert_eq!(
        workers[0].wait_for("got ", Duration::from_secs(5)),
        "got A:1"
    );
    let stored = Instant::now();
    for w in &mut workers[1..] {
        w.get();
        assert_eq!(w.wait_for("got ", Duration::from_secs(5)), "got A:1");
    }
    // Past half the TTL (the refresh point), before the end of it.
    std::thread::sleep(Duration::from_millis(TTL_MS * 6 / 10).saturating_sub(stored.elapsed()));
    for w in &mut workers {
        w.get();
    }
    // The reads answer at once; the refreshes (200 ms loads, a 500 ms lease) end well within
    // a second.
    let seen: Vec<Vec<String>> = workers
        .iter()
        .map(|w| w.lines_within(Duration::from_millis(1_200)))
        .collect();
    for lines in &seen {
        assert!(
            lines.contains(&"got A:1".to_owned()),
            "a read past the refresh point answers the current value: {seen:?}"
        );
    }
    let loads = seen
        .iter()
        .flatten()
        .filter(|l| l.starts_with("loading"))
        .count();
    assert_eq!(
        loads, 1,
        "refresh-ahead ran the loader {loads} times across three processes: {seen:?}"
    );
    // Everyone reads the refreshed value.
    let mut refreshed = Vec::new();
    for w in &mut workers {
        w.get();
        refreshed.push(w.wait_for("got ", Duration::from_secs(5)));
    }
    assert!(
        refreshed[0] != "got A:1" && refreshed.iter().all(|r| *r == refreshed[0]),
        "every process reads the one refreshed value: {refreshed:?}"
    );
}

#[test]
fn refresh_ahead_on_three_processes_loads_once() {
    let server = RedisServer::start().unwrap();
    refresh_ahead_loads_once_across_processes(("NCM_REDIS_URL", &server.url()));
}

#[test]
fn refresh_ahead_on_three_processes_loads_once_on_a_cluster() {
    let cluster = RedisCluster::start().unwrap();
    let nodes = cluster.node_urls().join(",");
    refresh_ahead_loads_once_across_processes(("NCM_REDIS_NODES", &nodes));
}
