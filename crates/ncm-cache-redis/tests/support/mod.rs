//! Shared helpers for the Redis integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use ncm_cache_core::{
    Bytes, CacheBackend, CacheStats, HealthReport, KeyTtl, Result, SharedBackend, async_trait,
};
use ncm_cache_redis::{RedisConfig, RedisSyncCache};
use ncm_cache_testkit::RedisServer;

/// A config for a testkit server with short timeouts and no background health loop.
pub(crate) fn config(server: &RedisServer) -> RedisConfig {
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.response_timeout = Duration::from_millis(500);
    c.connect_timeout = Duration::from_millis(500);
    c.health_check_interval = None;
    c
}

/// A [`FaultProxy`](ncm_cache_testkit::FaultProxy) in front of `server`, and a [`config`] that
/// goes through it.
pub(crate) fn proxied(server: &RedisServer) -> (ncm_cache_testkit::FaultProxy, RedisConfig) {
    let proxy = ncm_cache_testkit::FaultProxy::start(server.addr()).unwrap();
    let mut c = config(server);
    c.host = "127.0.0.1".into();
    c.port = proxy.port();
    (proxy, c)
}

/// Runs a [`RedisSyncCache`]'s blocking methods on tokio's blocking pool, so the conformance
/// suite (async) exercises the blocking client for real.
#[derive(Debug, Clone)]
pub(crate) struct SyncAdapter(pub(crate) RedisSyncCache);

macro_rules! blocking {
    ($self:ident, |$c:ident| $body:expr) => {{
        let $c = $self.0.clone();
        tokio::task::spawn_blocking(move || $body)
            .await
            .expect("blocking task panicked")
    }};
}

#[async_trait]
impl CacheBackend for SyncAdapter {
    fn name(&self) -> &str {
        "redis-sync"
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let key = key.to_owned();
        blocking!(self, |c| c.get_bytes(&key))
    }
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        let key = key.to_owned();
        blocking!(self, |c| c.set_bytes(&key, &value, ttl))
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_owned();
        blocking!(self, |c| c.delete(&key))
    }
    async fn exists(&self, key: &str) -> Result<bool> {
        let key = key.to_owned();
        blocking!(self, |c| c.exists(&key))
    }
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        blocking!(self, |c| c.get_many_bytes(
            &keys.iter().map(String::as_str).collect::<Vec<_>>()
        ))
    }
    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Option<Duration>) -> Result<()> {
        let entries: Vec<(String, Bytes)> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        blocking!(self, |c| c.set_many_bytes(
            &entries
                .iter()
                .map(|(k, v)| (k.as_str(), &v[..]))
                .collect::<Vec<_>>(),
            ttl
        ))
    }
    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        blocking!(self, |c| c
            .delete_many(&keys.iter().map(String::as_str).collect::<Vec<_>>()))
    }
    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        let key = key.to_owned();
        blocking!(self, |c| c.ttl_state(&key))
    }
    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        let key = key.to_owned();
        blocking!(self, |c| c.extend_ttl(&key, ttl))
    }
    async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        let pattern = pattern.to_owned();
        blocking!(self, |c| c.clear_pattern(&pattern))
    }
    async fn health_report(&self) -> HealthReport {
        blocking!(self, |c| c.health_report())
    }
    fn get_stats(&self) -> CacheStats {
        self.0.get_stats()
    }
}

/// The adapter as a shared backend.
pub(crate) fn sync_backend(cache: RedisSyncCache) -> SharedBackend {
    Arc::new(SyncAdapter(cache))
}

/// Total calls of `command` (lowercase, e.g. "keys") in `INFO commandstats`.
pub(crate) fn command_calls(server: &RedisServer, command: &str) -> u64 {
    let info = server.cli(&["INFO", "commandstats"]).unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Runs `BLMOVE {nsa}src {nsa}dst` (a write, through `query_cmd`: a call that must not run
/// twice) on `backend`, whose keys live on `node`; once it is blocked there, another client
/// pushes an element and, in the same pipeline, kills the blocked connection: Redis runs the
/// `BLMOVE` on the push and then drops the connection before its reply is written, so the
/// client loses the reply of a command that ran. Returns the call's result and how long it took.
pub(crate) async fn lose_the_reply_of_a_command_that_ran(
    node: &RedisServer,
    backend: &ncm_cache_redis::RedisBackend,
) -> (ncm_cache_core::Result<redis::Value>, Duration) {
    use std::io::{Read as _, Write as _};
    let mut blmove = redis::cmd("BLMOVE");
    blmove
        .arg("{nsa}src")
        .arg("{nsa}dst")
        .arg("LEFT")
        .arg("RIGHT")
        .arg(0);
    let start = std::time::Instant::now();
    let call = backend.query_cmd(ncm_cache_core::Operation::Set, &blmove);
    let kill = async {
        // The blocked client's ID, once it is blocked (bounded: 5 s).
        let mut id = None;
        for _ in 0..250 {
            let list = node.command(&["CLIENT", "LIST"]).unwrap();
            id = list
                .lines()
                .find(|l| l.contains("cmd=blmove"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|f| f.strip_prefix("id="))
                .map(str::to_owned);
            if id.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let id = id.expect("BLMOVE never blocked on the node");
        // One write: both commands are read in one go, so Redis serves the blocked BLMOVE
        // right after the LPUSH and frees its client (output buffer unsent) on the kill.
        let mut s = std::net::TcpStream::connect(node.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let req = format!(
            "*3\r\n$5\r\nLPUSH\r\n$8\r\n{{nsa}}src\r\n$1\r\nx\r\n*4\r\n$6\r\nCLIENT\r\n$4\r\nKILL\r\n$2\r\nID\r\n${}\r\n{id}\r\n",
            id.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        // ":1\r\n" twice (one element pushed, one client killed).
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < 8 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the server closed the control connection");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&got[..], b":1\r\n:1\r\n", "LPUSH + CLIENT KILL replies");
    };
    let (result, ()) = tokio::join!(call, kill);
    (result, start.elapsed())
}

/// One round of the runtime-shutdown tests (`batching.rs`, `cluster.rs`): `tasks` tasks of 20
/// calls each on keys `k{i}` (`i < keys`) preloaded with `value-of-k{i}` — a write every fourth
/// call, reads checked against the key's value — each bounded to 5 s (a call that hangs fails
/// the test). Returns the calls answered, given up as abandoned, and failed otherwise.
pub(crate) async fn mixed_round(
    cache: &SharedBackend,
    tasks: usize,
    keys: usize,
    round: usize,
) -> (usize, usize, usize) {
    let value = |i: usize| Bytes::from(format!("value-of-k{i}"));
    let calls: Vec<_> = (0..tasks)
        .map(|t| {
            let cache = Arc::clone(cache);
            tokio::spawn(async move {
                let (mut ok, mut abandoned, mut failed) = (0, 0, 0);
                for i in 0..20 {
                    let k = (t * 7 + i) % keys;
                    let key = format!("k{k}");
                    let call = async {
                        if i % 4 == 0 {
                            cache.set(&key, value(k), None).await.map(|()| None)
                        } else {
                            cache.get(&key).await
                        }
                    };
                    match tokio::time::timeout(Duration::from_secs(5), call).await {
                        Ok(Ok(Some(v))) => {
                            assert_eq!(v, value(k), "round {round}");
                            ok += 1;
                        }
                        Ok(Ok(None)) => ok += 1,
                        Ok(Err(e)) if e.to_string().contains("abandoned") => abandoned += 1,
                        Ok(Err(_)) => failed += 1,
                        Err(_) => panic!("round {round}: a call hung"),
                    }
                }
                (ok, abandoned, failed)
            })
        })
        .collect();
    let mut sum = (0, 0, 0);
    for c in calls {
        let (o, a, f) = c.await.unwrap();
        sum = (sum.0 + o, sum.1 + a, sum.2 + f);
    }
    sum
}

/// Two rounds, each of 2.5 s idle, a `set`, 2.5 s idle and a `get` of the value just written,
/// on a blocking cache whose server closes connections idle for a second (Redis checks each
/// client's idle time about once a second).
pub(crate) fn sync_calls_after_idle_spells(cache: &RedisSyncCache) {
    cache.set("k", &0).unwrap();
    for round in 1..=2 {
        std::thread::sleep(Duration::from_millis(2_500));
        cache
            .set("k", &round)
            .unwrap_or_else(|e| panic!("round {round}: the write after an idle close failed: {e}"));
        std::thread::sleep(Duration::from_millis(2_500));
        assert_eq!(cache.get::<i32>("k").unwrap(), Some(round), "round {round}");
    }
}
