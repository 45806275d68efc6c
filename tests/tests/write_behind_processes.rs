//! Durable write-behind across OS processes writing the same keys: the store (a Redis hash, a
//! real shared system of record) ends with the newest acknowledged value of every key after a
//! crash between persist and ack, after a stalled consumer resumes, and with two live
//! instances writing the same keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ncm_cache_testkit::{FaultProxy, ProxyMode, RedisServer};

const LEASE_MS: u64 = 500;

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn start(server: &RedisServer, abort_after_store: bool) -> Self {
        Self::start_with(server, abort_after_store, None)
    }

    fn start_with(server: &RedisServer, abort_after_store: bool, journal: Option<String>) -> Self {
        Self::start_on(server.url(), abort_after_store, journal)
    }

    /// A worker whose queue is its `CacheStrategies`' (it can also write through).
    fn start_strategies(server: &RedisServer) -> Self {
        Self::start_env(server.url(), false, None, true)
    }

    /// A worker whose cache and store are at `url` (the server, or a proxy in front of it).
    fn start_on(url: String, abort_after_store: bool, journal: Option<String>) -> Self {
        Self::start_env(url, abort_after_store, journal, false)
    }

    fn start_env(
        url: String,
        abort_after_store: bool,
        journal: Option<String>,
        strategies: bool,
    ) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wb_worker"))
            .env("NCM_REDIS_URL", url)
            .env("NCM_WB_STRATEGIES", if strategies { "1" } else { "0" })
            .env("NCM_WB_JOURNAL_URL", journal.unwrap_or_default())
            .env("NCM_WB_LEASE_MS", LEASE_MS.to_string())
            .env(
                "NCM_WB_ABORT_AFTER_STORE",
                if abort_after_store { "1" } else { "0" },
            )
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
        let w = Self {
            child,
            stdin,
            lines,
        };
        w.expect("ready", Duration::from_secs(10));
        w
    }

    /// Waits (bounded) for a line starting with `prefix`, skipping `stored` reports.
    fn expect(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) if line.starts_with("err") => panic!("worker error: {line}"),
                Ok(_) => {}
                Err(_) => panic!("no `{prefix}` line within {within:?}"),
            }
        }
    }

    fn command(&mut self, line: &str) -> String {
        self.send(line);
        self.expect("ok", Duration::from_secs(10))
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn write_all(&mut self, keys: usize, value: &str, delay_ms: u64) {
        for k in 0..keys {
            self.command(&format!("write k{k} {value} {delay_ms}"));
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The store's content.
fn store(server: &RedisServer) -> HashMap<String, String> {
    let out = server.cli(&["HGETALL", "db"]).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_owned(), c[1].to_owned()))
        .collect()
}

fn assert_store(server: &RedisServer, keys: usize, want: &str) {
    let db = store(server);
    let stale: Vec<_> = (0..keys)
        .map(|k| format!("k{k}"))
        .filter(|k| db.get(k).map(String::as_str) != Some(want))
        .map(|k| (k.clone(), db.get(&k).cloned()))
        .collect();
    assert!(
        stale.is_empty(),
        "{} of {keys} keys do not hold the newest acknowledged value {want:?}: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
}

/// P1 persists v1 and dies before acknowledging it in the journal; its restart P2 writes and
/// persists v2; when P1's lease expires P2 adopts P1's entries — which must not put v1 back.
#[test]
fn a_crash_between_persist_and_ack_never_puts_an_older_value_back() {
    let server = RedisServer::start().unwrap();
    let mut p1 = Worker::start(&server, true);
    p1.write_all(50, "v1", 300);
    p1.expect("stored", Duration::from_secs(10));
    let status = p1.child.wait().unwrap();
    assert!(!status.success(), "P1 aborted after its store call");
    let mut p2 = Worker::start(&server, false);
    p2.write_all(50, "v2", 0);
    p2.command("flush");
    assert_store(&server, 50, "v2");
    // P1's lease expires; P2 adopts its entries (also on its own, every lease / 3).
    std::thread::sleep(Duration::from_millis(LEASE_MS * 3));
    p2.command("recover");
    p2.command("flush");
    assert_store(&server, 50, "v2");
    let left: u64 = server
        .cli(&["XLEN", "__ncm:wb:{orders}"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(left, 0, "superseded entries are acknowledged and removed");
}

/// P1 is stopped (SIGSTOP) with writes waiting; P2 adopts and persists them, then persists
/// newer values; P1 resumes (SIGCONT) — and must not persist its old values.
#[test]
fn a_stalled_consumer_that_resumes_persists_nothing_stale() {
    let server = RedisServer::start().unwrap();
    let mut p1 = Worker::start(&server, false);
    p1.write_all(50, "v1", 3000);
    let written = Instant::now();
    p1.signal("STOP");
    let mut p2 = Worker::start(&server, false);
    std::thread::sleep(Duration::from_millis(LEASE_MS * 3));
    p2.command("recover");
    p2.command("flush");
    assert_store(&server, 50, "v1");
    p2.write_all(50, "v2", 0);
    p2.command("flush");
    assert_store(&server, 50, "v2");
    p1.signal("CONT");
    // Past P1's due time, with room for its worker to act.
    let wait = Duration::from_millis(4500).saturating_sub(written.elapsed());
    std::thread::sleep(wait);
    p1.command("flush");
    assert_store(&server, 50, "v2");
}

/// Two live instances write the same 100 keys, one after the other; the first one's writes
/// wait longer before they are persisted. The store ends with the second one's values.
#[test]
fn two_live_instances_writing_the_same_keys_leave_the_last_write() {
    let server = RedisServer::start().unwrap();
    let mut a = Worker::start(&server, false);
    let mut b = Worker::start(&server, false);
    a.write_all(100, "a1", 1000);
    b.write_all(100, "b2", 0);
    b.command("flush");
    std::thread::sleep(Duration::from_millis(1500));
    a.command("flush");
    b.command("flush");
    assert_store(&server, 100, "b2");
}

/// A write is journaled before it is cached: a process that dies while its journal append
/// hangs leaves nothing in the cache (before: the cache held a value no journal had, so it was
/// never persisted — the store and the cache disagreed until the TTL).
#[test]
fn a_crash_before_the_journal_append_leaves_no_cached_value() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let mut p1 = Worker::start_with(&server, false, Some(proxy.url()));
    proxy.set_mode(ProxyMode::Stall);
    p1.send("write k0 v1 0");
    std::thread::sleep(Duration::from_millis(500));
    p1.child.kill().unwrap();
    p1.child.wait().unwrap();
    let cached = server.cli(&["EXISTS", "k0"]).unwrap();
    assert_eq!(
        cached.trim(),
        "0",
        "a value was cached without being journaled"
    );
    assert!(store(&server).is_empty());
}

/// The other side: a process dies after journaling v2 but before caching it (its cache
/// connection hangs), while the cache still holds v1. The process that adopts v2 persists it
/// and evicts the key — or caches v2, the key's newest journaled write while it is not yet
/// acknowledged — so the cache does not keep serving v1 against a store holding v2.
#[test]
fn an_adopted_write_evicts_the_older_cached_value_once_persisted() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let mut p1 = Worker::start_on(proxy.url(), false, Some(server.url()));
    p1.command("write k0 v1 0");
    p1.command("flush");
    assert_store(&server, 1, "v1");
    assert_eq!(server.cli(&["EXISTS", "k0"]).unwrap().trim(), "1");
    proxy.set_mode(ProxyMode::Stall);
    p1.send("write k0 v2 0");
    std::thread::sleep(Duration::from_millis(500));
    p1.child.kill().unwrap();
    p1.child.wait().unwrap();
    let mut p2 = Worker::start(&server, false);
    std::thread::sleep(Duration::from_millis(LEASE_MS * 3));
    p2.command("recover");
    p2.command("flush");
    assert_store(&server, 1, "v2");
    let cached = server.cli(&["GET", "k0"]).unwrap();
    assert!(
        cached.trim().is_empty() || (cached.contains("v2") && !cached.contains("v1")),
        "the cache still holds v1 while the store has v2: {cached:?}"
    );
}

/// Two processes over one Redis: P1's write-behind of `k0` (`v1`) waits in P1's durable queue;
/// P2 writes `k0` through (`v2`) to the same store; then P1 flushes. P2's direct write was
/// journaled as the key's newest write, so P1's fence finds `v1` superseded: the store keeps
/// `v2` (before: P1's flush stored `v1` over it).
#[test]
fn a_write_through_in_another_process_supersedes_its_waiting_write_behind() {
    let server = RedisServer::start().unwrap();
    let mut p1 = Worker::start_strategies(&server);
    let mut p2 = Worker::start_strategies(&server);
    p1.command("write k0 v1 60000");
    p2.command("through k0 v2");
    assert_store(&server, 1, "v2");
    p1.command("flush");
    p2.command("flush");
    assert_store(&server, 1, "v2");
    // Every journal entry acknowledged (P2's own once its worker ran).
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.cli(&["XLEN", "__ncm:wb:{orders}"]).unwrap().trim() != "0" {
        assert!(Instant::now() < deadline, "journal entries left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
}
