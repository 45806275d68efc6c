//! The reloader across OS processes: the owner of an Eager value is SIGKILLed in the middle of
//! a reload; another process takes its timer over and reloads before the value expires, so a
//! reader never finds the key missing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ncm_cache::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;

const TTL_MS: u64 = 3000;

/// A worker process and its stdout lines.
struct Worker {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn start(server: &RedisServer, id: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_reload_worker"))
            .env("NCM_REDIS_URL", server.url())
            .env("NCM_REDIS_PREFIX", "reload:")
            .env("NCM_WORKER_ID", id)
            .env("NCM_RELOAD_TTL_MS", TTL_MS.to_string())
            .env("NCM_RELOAD_FRACTION", "0.5")
            .env("NCM_RELOAD_LOAD_MS", "200")
            .env("NCM_RELOAD_LOCK_MS", "500")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
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
