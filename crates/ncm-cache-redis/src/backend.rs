//! `RedisBackend`: the byte-level [`CacheBackend`] over Redis.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use ncm_cache_core::{
    Bytes, CacheBackend, CacheError, CacheStats, HealthReport, KeySpace, KeyTtl, Operation, Result,
    StatsRecorder, async_trait,
};
use redis::{FromRedisValue, RedisResult, Value};

use crate::commands;

/// Writes `ARGV[1]` (with a TTL of `ARGV[2]` ms unless 0) over a key that holds another type
/// than a string (see `set_if_absent`); 1 when written.
static REPLACE_OTHER_TYPE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "local t = redis.call('type', KEYS[1])['ok'] \
         if t == 'string' or t == 'none' then return 0 end \
         if ARGV[2] == '0' then redis.call('set', KEYS[1], ARGV[1]) \
         else redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) end \
         return 1",
    )
});
use crate::config::RedisConfig;
use crate::conn::{Conn, Handle, group_by_slot};
use crate::error::map_err;

/// The byte-level Redis backend. Most users hold a [`RedisCache`](crate::RedisCache), which
/// wraps this with a codec; use [`RedisCache::backend`](crate::RedisCache::backend) to compose
/// it (for example as the L2 of a multi-level cache).
pub struct RedisBackend {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) conn: Conn,
    /// What the server can do, probed at connect.
    pub(crate) capabilities: crate::capabilities::Capabilities,
    /// Queues of automatic batching (`RedisConfig::auto_batch`).
    pub(crate) batcher: Option<crate::batch::Batcher>,
    pub(crate) keys: KeySpace,
    pub(crate) stats: StatsRecorder,
    pub(crate) config: RedisConfig,
    closed: AtomicBool,
    /// The server refused `GETEX` (before Redis 6.2, or renamed away): sliding reads are a
    /// `GET` then a `PEXPIRE`.
    no_getex: AtomicBool,
    healthy: AtomicBool,
    used_memory: AtomicU64,
    health_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Client tracking's wait for Cluster failovers under way, across its sessions.
    failover_wait: std::sync::Mutex<crate::tracking::FailoverWait>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Whether a failed operation may be retried after a timeout.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idempotent {
    /// A read: again on any connection.
    Yes,
    /// A write that is safe to repeat (a delete, a TTL change) but not to reorder: again only
    /// on the connection of the first try, behind it. The first try is still queued there
    /// (a timeout does not cancel it); retried on another connection, it could run after a
    /// write the caller made once the retry returned, and undo it (found by review).
    InOrder,
    No,
}

/// A cluster's primaries as one node sees them (see [`RedisBackend::cluster_masters`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClusterPrimaries {
    /// Every primary not flagged failed, sorted.
    pub(crate) nodes: Vec<(String, u16)>,
    /// `host:port` of each failed primary that still owns slots while a replica of it may take
    /// over: a failover is under way, and the replica's writes will not reach a client
    /// tracking only `nodes`.
    pub(crate) failing_over: Vec<String>,
    /// `host:port` of the node that answered, if it is a primary owning slots.
    pub(crate) reporter: Option<String>,
    /// Primaries flagged failed that still own slots (see `commands::failed_slot_owners`).
    pub(crate) failed: Vec<(String, u16)>,
}

impl RedisBackend {
    /// Connects with `config` (validated first). Fails with a connection error or timeout
    /// when Redis cannot be reached within `connect_timeout`.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let config = config.capped();
        let conn = Conn::connect(&config).await?;
        let capabilities = crate::capabilities::probe(&config).await;
        // On a cluster, reads only (one pipeline per primary: see `batch.rs`).
        let cluster = conn.is_cluster();
        let batcher = config
            .auto_batch
            .then(|| crate::batch::Batcher::new(cluster, config.batches_on_own_socket()));
        let inner = Arc::new(Inner {
            conn,
            capabilities,
            batcher,
            keys: KeySpace::new(config.key_prefix.clone()).with_max_key_len(config.max_key_len),
            stats: StatsRecorder::new(config.name.as_str(), "redis"),
            closed: AtomicBool::new(false),
            no_getex: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            used_memory: AtomicU64::new(0),
            health_task: std::sync::Mutex::new(None),
            failover_wait: std::sync::Mutex::new(crate::tracking::FailoverWait::new(
                config.cluster_failover_wait,
            )),
            config,
        });
        if let Some(b) = &inner.batcher {
            b.owned_by(Arc::downgrade(&inner));
        }
        if let Some(every) = inner.config.health_check_interval {
            let task = tokio::spawn(health_loop(Arc::downgrade(&inner), every));
            if let Ok(mut slot) = inner.health_task.lock() {
                *slot = Some(task);
            }
        }
        Ok(Self { inner })
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// The key space (prefix and key rules).
    pub fn key_space(&self) -> &KeySpace {
        &self.inner.keys
    }

    /// Another handle to the same connection (for background tasks of this crate).
    pub(crate) fn clone_handle(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Every primary of a cluster that is not marked failed, from `CLUSTER NODES` — also one
    /// that owns no slot yet (a resharding target) — sorted, and the failed primary whose
    /// replica has yet to take over, if a failover is under way; `None` for a single node or
    /// Sentinel. An empty list is an error (the node asked does not know the cluster yet).
    pub(crate) async fn cluster_masters(&self) -> Result<Option<ClusterPrimaries>> {
        let timeout = self.inner.config.response_timeout;
        let Some(text) = self.inner.conn.cluster_nodes(timeout).await? else {
            return Ok(None);
        };
        let masters = commands::cluster_masters(&text);
        if masters.is_empty() {
            return Err(CacheError::Connection {
                message: "CLUSTER NODES lists no primary".into(),
                source: None,
            });
        }
        Ok(Some(ClusterPrimaries {
            nodes: masters,
            failing_over: commands::failover_pending(&text),
            reporter: commands::reporting_primary(&text),
            failed: commands::failed_slot_owners(&text),
        }))
    }

    /// Whether client tracking holds back for the failovers under way in `view` (see
    /// `tracking::FailoverWait::holds`).
    pub(crate) fn failover_holds(&self, view: &ClusterPrimaries) -> bool {
        let mut wait = self
            .inner
            .failover_wait
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        wait.holds(
            &view.failing_over,
            view.reporter.as_deref(),
            std::time::Instant::now(),
        )
    }

    /// Whether client tracking is waiting for a failover (reconnects retry soon).
    pub(crate) fn failover_waiting(&self) -> bool {
        self.inner
            .failover_wait
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .waiting(std::time::Instant::now())
    }

    /// `true` when connected to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.conn.is_cluster()
    }

    /// The result of the last background health check (`true` before the first one).
    pub fn last_known_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Runs one request with the timeout, stats, retry-on-timeout and error mapping.
    async fn run<T, F, Fut>(&self, op: Operation, idempotent: Idempotent, f: F) -> Result<T>
    where
        F: Fn(Handle) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let retry = match idempotent {
            Idempotent::Yes => Retry::Anywhere,
            Idempotent::InOrder => Retry::SameConnection,
            Idempotent::No => Retry::No,
        };
        self.inner.run(op, retry, f).await
    }

    fn full<'k>(&self, key: &'k str) -> Result<std::borrow::Cow<'k, str>> {
        self.inner.keys.full_key(key)
    }

    /// GET of a full key (batched when batching is on), counted as a hit or a miss.
    async fn get_full(&self, full: std::borrow::Cow<'_, str>) -> Result<Option<Bytes>> {
        let v: Option<Bytes> = match &self.inner.batcher {
            Some(batcher) => {
                self.check_open()?;
                crate::batch::get(&self.inner, batcher, full.into_owned()).await?
            }
            // Boxed: a Redis call's future is kilobytes, and inline it would make every
            // batched read's future (allocated per call by the trait) as large.
            None => Box::pin(self.run(Operation::Get, Idempotent::Yes, |mut h| {
                let c = commands::get(&full);
                async move { c.query_async::<Option<Vec<u8>>>(&mut h).await }
            }))
            .await?
            .map(Bytes::from),
        };
        match v {
            Some(v) => {
                self.inner.stats.hit();
                Ok(Some(v))
            }
            None => {
                self.inner.stats.miss();
                Ok(None)
            }
        }
    }

    /// SET of a full key (batched when batching is on).
    async fn set_full(
        &self,
        full: std::borrow::Cow<'_, str>,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<()> {
        commands::check_ttl(ttl)?;
        commands::check_size(value.len(), self.inner.config.max_value_size)?;
        match &self.inner.batcher {
            // Writes are not batched on a cluster (see `batch.rs`).
            Some(batcher) if !batcher.is_cluster() => {
                self.check_open()?;
                crate::batch::set(&self.inner, batcher, full.into_owned(), value, ttl).await?;
            }
            _ => {
                // Boxed, as in `get_full`.
                Box::pin(self.run(Operation::Set, Idempotent::No, |mut h| {
                    let c = commands::set(&full, &value, ttl);
                    async move { c.query_async::<()>(&mut h).await }
                }))
                .await?;
            }
        }
        self.inner.stats.sets(1);
        Ok(())
    }

    /// `SET NX` of a full key (checked like any write); whether it was written.
    async fn set_nx_full(&self, full: &str, value: &Bytes, ttl: Option<Duration>) -> Result<bool> {
        commands::check_ttl(ttl)?;
        commands::check_size(value.len(), self.inner.config.max_value_size)?;
        self.check_open()?;
        let written: Option<String> = self
            .run(Operation::Set, Idempotent::No, |mut h| {
                let c = commands::set_nx(full, value, ttl);
                async move { c.query_async(&mut h).await }
            })
            .await?;
        Ok(written.is_some())
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.is_closed() {
            return Err(CacheError::Closed);
        }
        Ok(())
    }

    /// Refreshes `memory_usage` from `INFO memory` now (the health loop does it periodically).
    pub async fn refresh_memory_usage(&self) -> Result<u64> {
        let info: String = self
            .run(
                Operation::HealthCheck,
                Idempotent::Yes,
                |mut h| async move { redis::cmd("INFO").arg("memory").query_async(&mut h).await },
            )
            .await?;
        let used = commands::used_memory(&info).unwrap_or(0);
        self.inner.used_memory.store(used, Ordering::Relaxed);
        Ok(used)
    }

    async fn scan_and_unlink(&self, pattern: &str) -> Result<u64> {
        let timeout = self.inner.config.response_timeout;
        let mut removed = 0u64;
        match self.inner.conn.primaries(timeout).await? {
            None => {
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<Vec<u8>>) = self
                        .run(Operation::ClearPattern, Idempotent::Yes, |mut h| {
                            let c = commands::scan(cursor, pattern);
                            async move { c.query_async(&mut h).await }
                        })
                        .await?;
                    removed += self.unlink_batch(&keys).await?;
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            Some(primaries) => {
                for (host, port) in primaries {
                    let mut cursor = 0u64;
                    loop {
                        let step = self.inner.conn.query_node::<(u64, Vec<Vec<u8>>)>(
                            &host,
                            port,
                            commands::scan(cursor, pattern),
                        );
                        let (next, keys) = tokio::time::timeout(timeout, step)
                            .await
                            .map_err(|_| CacheError::Timeout {
                                operation: "scan",
                                after: timeout,
                            })?
                            .map_err(|e| map_err("scan", e, timeout))?;
                        removed += self.unlink_batch(&keys).await?;
                        cursor = next;
                        if cursor == 0 {
                            break;
                        }
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Unlinks what a SCAN found, except the library's own keys (`{prefix}__ncm:*`: locks,
    /// write-behind journals, dependency graphs), which a pattern delete never removes. Keys
    /// are bytes: another program may have written names that are not UTF-8 under the prefix.
    async fn unlink_batch(&self, keys: &[Vec<u8>]) -> Result<u64> {
        let internal = format!("{}__ncm:", self.key_space().prefix());
        let internal = internal.as_bytes();
        let owned;
        let keys = if keys.iter().any(|k| k.starts_with(internal)) {
            owned = keys
                .iter()
                .filter(|k| !k.starts_with(internal))
                .cloned()
                .collect::<Vec<Vec<u8>>>();
            owned.as_slice()
        } else {
            keys
        };
        if keys.is_empty() {
            return Ok(0);
        }
        self.run(Operation::ClearPattern, Idempotent::InOrder, |mut h| {
            let c = commands::unlink(keys);
            async move { c.query_async(&mut h).await }
        })
        .await
    }
}

/// Whether [`Inner::run`] tries a call again after a timeout (with
/// `RedisConfig::retry_on_timeout`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Retry {
    No,
    /// On any connection (a read).
    Anywhere,
    /// On the connection of the first try only (see `Idempotent::InOrder`).
    SameConnection,
}

impl Inner {
    /// Whether the backend was closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub(crate) async fn run<T, F, Fut>(&self, op: Operation, retry: Retry, f: F) -> Result<T>
    where
        F: Fn(Handle) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.closed.load(Ordering::Relaxed) {
            return Err(CacheError::Closed);
        }
        let timeout = self.config.response_timeout;
        let attempts = if retry != Retry::No && self.config.retry_on_timeout {
            2
        } else {
            1
        };
        let start = Instant::now();
        let mut result = Err(CacheError::Closed);
        // The connection a retry must use (`Retry::SameConnection`): the first try's handle
        // itself — a pool slot's manager, or the Sentinel connection even after `on_error`
        // dropped it for later calls (a new one would let the retry overtake the first try).
        let mut pinned: Option<Handle> = None;
        // The Sentinel connection the last try used (see `Conn::on_error`).
        let mut generation = None;
        for _ in 0..attempts {
            // No timer here: every connection type is configured with `response_timeout`
            // (ConnectionManager, ClusterConnection, MultiplexedConnection), which bounds each
            // request; a second timer per call cost ~10 % throughput under load.
            // (Not a second awaited call: the future of every Redis call would nest deeper.)
            let handle = match pinned.take() {
                Some(same) => Ok(same),
                None => self.conn.handle(self.config.connect_timeout).await,
            };
            // A call not to be retried is not sent again by the cluster connection either.
            let handle = match retry {
                Retry::No => handle.map(Handle::no_resend),
                _ => handle,
            };
            result = match handle {
                Err(e) => Err(e),
                Ok(handle) => {
                    let slot = handle.slot();
                    generation = handle.generation();
                    if retry == Retry::SameConnection {
                        pinned = Some(handle.clone());
                    }
                    // A pool connection that may be reconnecting (a call on it failed, or
                    // the server closed it) holds a request until the new connection is
                    // up, bounded only by the reconnect's attempts: such a call gets one
                    // connect and one response timeout. (Only then: a timer per call costs
                    // throughput, see above.)
                    let reconnecting = self.conn.may_be_reconnecting(slot);
                    let answer = match reconnecting {
                        None => f(handle)
                            .await
                            .map_err(|e| map_err(op.as_str(), e, timeout)),
                        Some(seen) => {
                            let bound = self.config.connect_timeout + timeout;
                            // A `PING` first (twice if it met a failed reconnect: see
                            // `conn::ping_up`), so that a call not to be resent is not lost to
                            // a reconnect that had failed while Redis was away
                            // (`batch_socket.rs::writes_right_after_a_restart_land`). Boxed:
                            // only this rare path pays for the deeper future.
                            let checked = Box::pin(async {
                                let mut ping = handle.clone();
                                crate::conn::ping_up(&mut ping).await?;
                                self.conn.connected(slot, seen);
                                f(handle).await
                            });
                            match tokio::time::timeout(bound, checked).await {
                                Ok(r) => r.map_err(|e| map_err(op.as_str(), e, timeout)),
                                Err(_) => Err(CacheError::Timeout {
                                    operation: op.as_str(),
                                    after: bound,
                                }),
                            }
                        }
                    };
                    match answer {
                        Err(e) => {
                            self.conn.on_call_error(slot, &e);
                            Err(e)
                        }
                        Ok(v) => {
                            if let Some(seen) = reconnecting {
                                self.conn.connected(slot, seen);
                            }
                            self.conn.answered();
                            Ok(v)
                        }
                    }
                }
            };
            match &result {
                Err(e) if e.is_timeout() => {
                    self.conn.on_error(e, generation);
                    continue;
                }
                _ => break,
            }
        }
        self.stats.latency(op, start.elapsed());
        if let Err(e) = &result {
            self.stats.error(op);
            self.conn.on_error(e, generation);
            tracing::debug!(operation = op.as_str(), error = %e, "redis operation failed");
        }
        result
    }
}

async fn health_loop(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { break };
        if inner.closed.load(Ordering::Relaxed) {
            break;
        }
        let info: Result<String> = inner
            .run(
                Operation::HealthCheck,
                crate::backend::Retry::No,
                |mut h| async move { redis::cmd("INFO").arg("memory").query_async(&mut h).await },
            )
            .await;
        // The read batches' own connection too (see `health_report`).
        let info = match info {
            Ok(info) => match crate::wire::answers(&inner).await {
                Some(Err(e)) => Err(e),
                _ => Ok(info),
            },
            failed => failed,
        };
        let ok = info.is_ok();
        if let Ok(info) = info
            && let Some(used) = commands::used_memory(&info)
        {
            inner.used_memory.store(used, Ordering::Relaxed);
        }
        let was = inner.healthy.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!(cache = inner.stats.name(), "redis is reachable again");
            } else {
                tracing::warn!(cache = inner.stats.name(), "redis health check failed");
            }
        }
    }
}

#[async_trait]
impl CacheBackend for RedisBackend {
    fn name(&self) -> &str {
        self.inner.stats.name()
    }

    fn key_prefix(&self) -> Option<&str> {
        Some(self.key_space().prefix())
    }

    /// Nothing: every instance shares what Redis keeps.
    async fn evict_local(&self, _keys: &[&str]) -> Result<u64> {
        Ok(0)
    }

    /// Nothing: every instance shares what Redis keeps.
    async fn evict_local_matching(&self, _pattern: &str) -> Result<u64> {
        Ok(0)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.get_full(self.full(key)?).await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.set_full(self.full(key)?, value, ttl).await
    }

    /// One `SET … NX` (not batched, not retried: a write that landed before a lost reply
    /// would read as refused on a retry). Refused, the key's type is looked at (one script,
    /// only then): a key of another type (a hash, a list: another program's) reads as nil
    /// through a batched `MGET`, so a load after such a read would be refused until the key
    /// goes, and each read would run the loader; it is replaced instead, as a plain write
    /// (and a load after an unbatched read, which sees `WRONGTYPE`) replaces it. A string —
    /// or nothing, if the key went meanwhile — stays refused, as does every store when the look
    /// fails (scripts forbidden by an ACL: the error is counted, the store refused).
    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        let full = self.full(key)?;
        let written = match self.set_nx_full(&full, &value, ttl).await? {
            true => true,
            false => {
                let ms = ttl.map_or(0, commands::millis);
                let replaced: Result<i64> = self
                    .eval_script(
                        Operation::Set,
                        &REPLACE_OTHER_TYPE,
                        &[full.into_owned()],
                        &[value.to_vec(), ms.to_string().into_bytes()],
                    )
                    .await;
                // Scripts forbidden (an ACL), or the call failed: refused, as before the look.
                replaced.inspect_err(|e| {
                    tracing::debug!(key, error = %e, "refused load store: the key's type was not looked at");
                }).is_ok_and(|n| n == 1)
            }
        };
        if written {
            self.inner.stats.sets(1);
        }
        Ok(written)
    }

    async fn get_reserved(&self, name: &str) -> Result<Option<Bytes>> {
        let full = self.inner.keys.reserved_key(name)?;
        self.get_full(full.into()).await
    }

    async fn set_reserved(&self, name: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        let full = self.inner.keys.reserved_key(name)?;
        self.set_full(full.into(), value, ttl).await
    }

    /// `SET NX` (one atomic command).
    async fn set_reserved_if_absent(
        &self,
        name: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let full = self.inner.keys.reserved_key(name)?;
        let written = self.set_nx_full(&full, &value, ttl).await?;
        if written {
            self.inner.stats.sets(1);
        }
        Ok(written)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let full = self.full(key)?;
        let n: u64 = self
            .run(Operation::Delete, Idempotent::InOrder, |mut h| {
                let c = commands::unlink(full.as_ref());
                async move { c.query_async(&mut h).await }
            })
            .await?;
        self.inner.stats.deletes(n);
        Ok(n > 0)
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let full = self.full(key)?;
        let n: u64 = self
            .run(Operation::Exists, Idempotent::Yes, |mut h| {
                let c = commands::exists(&full);
                async move { c.query_async(&mut h).await }
            })
            .await?;
        Ok(n > 0)
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        self.check_open()?;
        let full = keys
            .iter()
            .map(|k| self.full(k).map(|f| f.into_owned()))
            .collect::<Result<Vec<_>>>()?;
        if full.is_empty() {
            return Ok(Vec::new());
        }
        // One MGET; on a cluster, redis-rs splits it per slot and restores the order.
        let values: Vec<Option<Vec<u8>>> = self
            .run(Operation::GetMany, Idempotent::Yes, |mut h| {
                let c = commands::mget(&full);
                async move { c.query_async(&mut h).await }
            })
            .await?;
        commands::check_mget(values.len(), full.len())?;
        let hits = values.iter().filter(|v| v.is_some()).count() as u64;
        self.inner.stats.hits(hits);
        self.inner.stats.misses(values.len() as u64 - hits);
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Option<Duration>) -> Result<()> {
        self.check_open()?;
        commands::check_ttl(ttl)?;
        let mut full = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            full.push(self.full(key)?.into_owned());
            commands::check_size(value.len(), self.inner.config.max_value_size)?;
        }
        if entries.is_empty() {
            return Ok(());
        }
        // One pipelined round trip (per slot on a cluster, the slots in parallel).
        let cluster = self.inner.conn.is_cluster();
        let groups = if cluster {
            let keys: Vec<&[u8]> = full.iter().map(|k| k.as_bytes()).collect();
            group_by_slot(&keys)
        } else {
            vec![(0..entries.len()).collect()]
        };
        try_join_all(groups.into_iter().map(|group| {
            let full = &full;
            self.run(Operation::SetMany, Idempotent::No, move |mut h| {
                let mut pipe = redis::pipe();
                // On a cluster, a slot's SETs go as one transaction: while the slot is being
                // migrated, the source refuses it whole when any of its keys has moved (`ASK`
                // as a SET is queued, or `TRYAGAIN` at `EXEC`: Redis checks every key then
                // too), so none ran and each SET is then sent alone, following its own
                // `ASK`. A plain pipeline would have run the SETs of the keys still on the
                // source, and which ran is unknown once redis-rs reports the `ASK` for the
                // whole pipeline. A slot's lone SET goes alone (no transaction to pay for):
                // it follows its own `ASK`. A key given twice is set once, to its last value
                // (as the pipeline would leave it): the SETs sent alone go in parallel.
                let sets: Vec<redis::Cmd> = if cluster {
                    let last: HashMap<&str, usize> =
                        group.iter().map(|&i| (full[i].as_str(), i)).collect();
                    group
                        .iter()
                        .filter(|&&i| last.get(full[i].as_str()) == Some(&i))
                        .filter_map(|&i| {
                            let (_, value) = entries.get(i)?;
                            Some(commands::set(&full[i], value, ttl))
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                if cluster {
                    pipe.atomic();
                    for set in &sets {
                        pipe.add_command(set.clone()).ignore();
                    }
                } else {
                    for &i in &group {
                        if let Some((_, value)) = entries.get(i) {
                            pipe.add_command(commands::set(&full[i], value, ttl))
                                .ignore();
                        }
                    }
                }
                async move {
                    if let [set] = sets.as_slice() {
                        return set.query_async::<()>(&mut h).await;
                    }
                    match pipe.query_async::<()>(&mut h).await {
                        Err(e) if cluster && refused_whole(&e, sets.len()) => {
                            try_join_all(sets.iter().map(|set| {
                                let mut h = h.clone();
                                async move { set.query_async::<()>(&mut h).await }
                            }))
                            .await
                            .map(drop)
                        }
                        r => r,
                    }
                }
            })
        }))
        .await?;
        self.inner.stats.sets(entries.len() as u64);
        Ok(())
    }

    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        self.check_open()?;
        let full = keys
            .iter()
            .map(|k| self.full(k).map(|f| f.into_owned()))
            .collect::<Result<Vec<_>>>()?;
        if full.is_empty() {
            return Ok(0);
        }
        let n: u64 = self
            .run(Operation::DeleteMany, Idempotent::InOrder, |mut h| {
                let c = commands::unlink(&full);
                async move { c.query_async(&mut h).await }
            })
            .await?;
        self.inner.stats.deletes(n);
        Ok(n)
    }

    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        let full = self.full(key)?;
        let ms: i64 = self
            .run(Operation::GetTtl, Idempotent::Yes, |mut h| {
                let c = commands::pttl(&full);
                async move { c.query_async(&mut h).await }
            })
            .await?;
        Ok(commands::key_ttl(ms))
    }

    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        let full = self.full(key)?;
        commands::check_ttl(Some(ttl))?;
        let n: u64 = self
            .run(Operation::ExtendTtl, Idempotent::InOrder, |mut h| {
                let c = commands::pexpire(&full, ttl);
                async move { c.query_async(&mut h).await }
            })
            .await?;
        Ok(n > 0)
    }

    async fn get_and_touch(&self, key: &str, ttl: Duration) -> Result<Option<Bytes>> {
        let full = self.full(key)?;
        commands::check_ttl(Some(ttl))?;
        if self.inner.no_getex.load(Ordering::Relaxed) {
            return ncm_cache_core::get_then_extend(self, key, ttl).await;
        }
        // Not batched: GETEX writes (the TTL), so it goes straight to the primary.
        let read: Result<Option<Vec<u8>>> = self
            .run(Operation::Get, Idempotent::InOrder, |mut h| {
                let c = commands::getex(&full, ttl);
                async move { c.query_async(&mut h).await }
            })
            .await;
        let v = match read {
            Err(e) if getex_refused(&e) => {
                if !self.inner.no_getex.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "the server refused GETEX (it needs Redis 6.2+); sliding expiration \
                         reads with GET then PEXPIRE (two round trips)"
                    );
                }
                return ncm_cache_core::get_then_extend(self, key, ttl).await;
            }
            read => read?,
        };
        match v {
            Some(v) => {
                self.inner.stats.hit();
                Ok(Some(Bytes::from(v)))
            }
            None => {
                self.inner.stats.miss();
                Ok(None)
            }
        }
    }

    async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        self.check_open()?;
        let full = self.inner.keys.full_pattern(pattern)?;
        let n = self.scan_and_unlink(&full).await?;
        self.inner.stats.deletes(n);
        Ok(n)
    }

    async fn health_report(&self) -> HealthReport {
        let start = Instant::now();
        let ping = || {
            self.run(Operation::HealthCheck, Idempotent::No, |mut h| async move {
                redis::cmd("PING").query_async::<String>(&mut h).await
            })
        };
        let mut pong = ping().await;
        // With batches on their own connection, the pool's connections may sit idle through a
        // restart: the first call on one meets the dropped connection (and its manager then
        // reconnects). That is a stale connection, not an unhealthy server: asked once more.
        if matches!(&pong, Err(e) if e.is_connection()) && self.inner.config.batches_on_own_socket()
        {
            pong = ping().await;
        }
        // Reads go on a connection of their own: it must answer too (made now if it is down).
        let batches = match &pong {
            Ok(_) => crate::wire::answers(&self.inner).await,
            Err(_) => None,
        };
        let latency = start.elapsed();
        let topology = if self.is_cluster() {
            "cluster"
        } else if self.inner.config.sentinel.is_some() {
            "sentinel"
        } else {
            "single node"
        };
        if let Some(Err(e)) = batches {
            self.inner.healthy.store(false, Ordering::Relaxed);
            return HealthReport::new(
                false,
                latency,
                "redis",
                format!("{topology}: PONG, but the read batches' connection failed: {e}"),
            );
        }
        match pong {
            Ok(p) if p == "PONG" => {
                self.inner.healthy.store(true, Ordering::Relaxed);
                HealthReport::new(
                    true,
                    latency,
                    "redis",
                    format!("{topology}: PONG; {}", self.inner.capabilities),
                )
            }
            Ok(other) => HealthReport::new(
                false,
                latency,
                "redis",
                format!("{topology}: unexpected PING reply {other:?}"),
            ),
            Err(e) => {
                self.inner.healthy.store(false, Ordering::Relaxed);
                HealthReport::new(false, latency, "redis", format!("{topology}: {e}"))
            }
        }
    }

    fn get_stats(&self) -> CacheStats {
        let mut stats = self.inner.stats.snapshot();
        let used = self.inner.used_memory.load(Ordering::Relaxed);
        stats.memory_usage = (used > 0).then_some(used);
        self.inner.stats.publish_gauges(None, stats.memory_usage);
        stats
    }

    fn record_decode_error(&self, _key: &str) {
        self.inner.stats.undecodable();
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.conn.close();
        if let Some(b) = &self.inner.batcher {
            b.close();
        }
        if let Ok(mut task) = self.inner.health_task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut task) = self.health_task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }
}

/// `FromRedisValue` is used by the pipeline module.
pub(crate) fn parse<T: FromRedisValue>(v: redis::Value) -> RedisResult<T> {
    T::from_redis_value(v).map_err(Into::into)
}

/// A server (or proxy, or ACL) that does not run `GETEX`: an unknown or renamed command, an
/// ACL refusal (`NOPERM`), an unsupported command. (Not a wrong password: GET would fail too.)
fn getex_refused(e: &CacheError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    ["unknown command", "noperm", "not supported", "unsupported"]
        .iter()
        .any(|s| text.contains(s))
}

/// Whether a cluster transaction of `commands` commands was refused whole, so that none of
/// them ran: `ASK` or `TRYAGAIN` for all of it (a slot being migrated: `TRYAGAIN` when Redis
/// checks every key at `EXEC`), or `EXECABORT` (redis-rs's "transaction aborted": a command
/// refused as it was queued — `ASK` or `MOVED` during a migration, `CLUSTERDOWN`, `LOADING`,
/// ... — and the transaction discarded). Its commands may then be sent one by one, each with
/// the retries a lone command gets.
///
/// Not when `MULTI` itself was refused (an ACL user without `MULTI`, a renamed command): the
/// server then ran each command as it came, and redis-rs still reports an aborted transaction
/// (found by review: sending the commands again ran them twice). So an abort is taken as
/// refused whole only when every error belongs to one of the `commands` (redis-rs 1.8.2 puts
/// the `MULTI`'s at no command's index) and is a refusal of the cluster's (`MOVED`, `ASK`,
/// `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`, `READONLY`: a `MULTI` refused so, if
/// ever, refuses its commands too), not an `ERR`, `NOPERM` or any other reply: whatever index
/// a later redis-rs gives a refused `MULTI`, its refusal is not one of those.
pub(crate) fn refused_whole(e: &redis::RedisError, commands: usize) -> bool {
    use redis::ServerErrorKind as K;
    if crate::conn::split_by_a_migration(e) {
        return true;
    }
    e.kind() == redis::ErrorKind::Server(K::ExecAbort)
        && e.clone().into_server_errors().is_some_and(|errors| {
            !errors.is_empty()
                && errors.iter().all(|(at, error)| {
                    *at < commands
                        && matches!(
                            error.kind(),
                            Some(
                                K::Moved
                                    | K::Ask
                                    | K::TryAgain
                                    | K::ClusterDown
                                    | K::MasterDown
                                    | K::BusyLoading
                                    | K::ReadOnly
                            )
                        )
                })
        })
}

/// Raw access for crates that build on Redis (strategies: streams, Lua graphs, `CONFIG`).
impl RedisBackend {
    /// Runs one raw command through the connection pool, with the response timeout, stats
    /// (labelled `op`) and error mapping of every other call. Not retried: the command may not
    /// be idempotent. Key names are passed as they are: apply [`key_space`](Self::key_space)
    /// yourself. Replies come in their RESP2 shape on every topology (a map as a flat array of
    /// keys and values, a double as a bulk string, a boolean as 0 or 1), although a single
    /// node's pool speaks RESP3 where the server can.
    pub async fn query_cmd<T: FromRedisValue>(&self, op: Operation, cmd: &redis::Cmd) -> Result<T> {
        let v: Value = self
            .inner
            .run(op, crate::backend::Retry::No, |mut h| async move {
                cmd.query_async(&mut h).await
            })
            .await?;
        let name = match cmd.args_iter().next() {
            Some(redis::Arg::Simple(name)) => Some(name),
            _ => None,
        };
        self.converted(op, crate::conn::resp2_reply(name, v))
    }

    /// Runs a Lua script (`EVALSHA`, loading it on `NOSCRIPT`) with these keys and arguments,
    /// like [`query_cmd`](Self::query_cmd). On a cluster every key must hash to one slot.
    pub async fn eval_script<T: FromRedisValue>(
        &self,
        op: Operation,
        script: &redis::Script,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> Result<T> {
        self.inner
            .run(op, Retry::No, |mut h| async move {
                let mut invocation = script.prepare_invoke();
                for key in keys {
                    invocation.key(key);
                }
                for arg in args {
                    invocation.arg(arg.as_slice());
                }
                invocation.invoke_async::<Value>(&mut h).await
            })
            .await
            .and_then(|v| self.converted(op, crate::conn::resp2_shape(v)))
    }

    /// A raw reply, already in its RESP2 shape ([`resp2_reply`](crate::conn::resp2_reply)),
    /// converted to what its caller asked for; a reply that does not convert is counted as a
    /// failed call, as before the conversion moved out of the call.
    fn converted<T: FromRedisValue>(&self, op: Operation, v: Value) -> Result<T> {
        T::from_redis_value(v).map_err(|e| {
            self.inner.stats.error(op);
            map_err(op.as_str(), e.into(), self.inner.config.response_timeout)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every call's future is allocated by the trait's boxing: a Redis call's future (kilobytes)
    /// inlined into it made each batched call allocate and move ~4.4 KB, which cost a fifth of
    /// the 64-task GET throughput (`redis_ceiling` bench, docs/BENCHMARKS.md, issue 21).
    #[tokio::test]
    async fn batched_calls_have_small_futures() {
        let server = ncm_cache_testkit::RedisServer::start().expect("redis-server");
        let backend = RedisBackend::connect(crate::RedisConfig::from_url(&server.url()).unwrap())
            .await
            .unwrap();
        let batcher = backend
            .inner
            .batcher
            .as_ref()
            .expect("batching is on by default");
        let read = backend.get_full(std::borrow::Cow::Borrowed("k"));
        let queued = crate::batch::get(&backend.inner, batcher, "k".into());
        let write = backend.set_full(std::borrow::Cow::Borrowed("k"), Bytes::new(), None);
        for (what, size) in [
            ("get_full", std::mem::size_of_val(&read)),
            ("set_full", std::mem::size_of_val(&write)),
            ("batch::get", std::mem::size_of_val(&queued)),
        ] {
            assert!(size <= 512, "{what}'s future is {size} bytes");
        }
    }
}
