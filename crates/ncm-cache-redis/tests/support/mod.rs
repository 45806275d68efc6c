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
