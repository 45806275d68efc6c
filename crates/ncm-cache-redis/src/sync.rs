//! `RedisSyncCache`: the blocking twin of [`RedisCache`](crate::RedisCache).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ncm_cache_codec::Serializer;
use ncm_cache_core::{
    Bytes, CacheError, CacheStats, Codec, Expiry, HealthReport, KeySpace, KeyTtl, Operation,
    Result, StatsRecorder, TtlPolicy,
};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ConnectionLike, FromRedisValue, RedisResult, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cache::serializer_for;
use crate::commands;
use crate::config::RedisConfig;
use crate::conn::group_by_slot;
use crate::error::map_err;

/// A blocking Redis cache with its own connection pool (r2d2, up to `max_connections`).
///
/// Same methods as [`RedisCache`](crate::RedisCache), without `async`; usable from code with no
/// tokio runtime. Single node and Cluster (Sentinel: use the async cache).
///
/// ```no_run
/// use ncm_cache_redis::{RedisConfig, RedisSyncCache};
/// let cache = RedisSyncCache::connect(RedisConfig::from_url("redis://localhost:6379/0")?)?;
/// cache.set("user:123", &serde_json::json!({"name": "John"}))?;
/// let user: Option<serde_json::Value> = cache.get("user:123")?;
/// cache.delete("user:123")?;
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// ```
#[derive(Clone)]
pub struct RedisSyncCache {
    inner: Arc<SyncInner>,
}

struct SyncInner {
    pool: r2d2::Pool<Manager>,
    keys: KeySpace,
    stats: StatsRecorder,
    codec: Serializer,
    ttl: TtlPolicy,
    config: RedisConfig,
    cluster: bool,
    closed: AtomicBool,
}

impl fmt::Debug for RedisSyncCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSyncCache")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

enum Manager {
    Single(redis::Client, Duration, Duration),
    Cluster(redis::cluster::ClusterClient),
}

enum SyncConn {
    Single(Single),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

/// A single node's connection, with its reply bound and whether a pipeline left replies
/// unread (the pool then drops it).
struct Single {
    conn: redis::Connection,
    timeout: Duration,
    broken: bool,
    /// When it was last used: see [`SyncConn::usable`].
    used: Instant,
}

/// How long a pooled single-node connection may sit unused before it is checked with a `PING`
/// (see [`SyncConn::usable`]): Redis's `timeout` counts in seconds, and a load balancer's idle
/// timeout is longer.
const IDLE_CHECK: Duration = Duration::from_secs(1);

impl Single {
    /// A pipeline's replies under one bound for all of them. redis's own reads each wait the
    /// read timeout, so a stalled server cost a pipeline of N commands N × `response_timeout`
    /// (twice, with a retry: found by review). A timeout leaves replies unread: the connection
    /// is marked broken.
    fn pipeline(&mut self, cmd: &[u8], count: usize) -> RedisResult<Vec<Value>> {
        let deadline = Instant::now() + self.timeout;
        if let Err(e) = self.conn.send_packed_command(cmd) {
            self.broken = true;
            return Err(e);
        }
        let mut replies = Vec::with_capacity(count);
        let mut failed = None;
        while replies.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                failed = Some(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "pipeline replies past the response timeout",
                )));
                break;
            }
            if let Err(e) = self.conn.set_read_timeout(Some(left)) {
                failed = Some(e);
                break;
            }
            match self.conn.recv_response() {
                // RESP3 push data between replies is not a reply.
                Ok(Value::Push { .. }) => {}
                Ok(v) => replies.push(v),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let restored = self.conn.set_read_timeout(Some(self.timeout));
        if let Some(e) = failed {
            self.broken = true;
            return Err(e);
        }
        restored?;
        Ok(replies)
    }
}

impl SyncConn {
    /// Whether this connection may carry a call: a single node's connection unused for
    /// [`IDLE_CHECK`] or longer is asked a `PING` first, since the server (its `timeout`, a
    /// load balancer's idle timeout) may have closed it meanwhile, and a write on it would
    /// then fail — it is not resent, since it may have landed
    /// (`tests/redis.rs::sync_calls_after_the_server_closed_the_idle_connections_reach_redis`).
    /// Unanswered, it is marked broken (the pool drops it). An error reply is an answer.
    fn usable(&mut self) -> bool {
        match self {
            Self::Single(c) if c.used.elapsed() >= IDLE_CHECK => {
                let ping = redis::cmd("PING").query::<()>(&mut c.conn);
                let up = crate::conn::answered(ping).is_ok();
                c.broken |= !up;
                c.used = Instant::now();
                up
            }
            _ => true,
        }
    }

    /// Records a use (see [`usable`](Self::usable)).
    fn used(&mut self) {
        if let Self::Single(c) = self {
            c.used = Instant::now();
        }
    }
}

impl ConnectionLike for SyncConn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            Self::Single(c) => c.conn.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            // No transactions are sent here (`offset` is for MULTI's replies).
            Self::Single(c) if offset == 0 => c.pipeline(cmd, count),
            Self::Single(c) => c.conn.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }
    fn req_command(&mut self, cmd: &redis::Cmd) -> RedisResult<Value> {
        match self {
            Self::Single(c) => c.conn.req_command(cmd),
            Self::Cluster(c) => c.req_command(cmd),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.conn.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
    fn check_connection(&mut self) -> bool {
        match self {
            Self::Single(c) => c.conn.check_connection(),
            Self::Cluster(c) => c.check_connection(),
        }
    }
    fn is_open(&self) -> bool {
        match self {
            Self::Single(c) => !c.broken && c.conn.is_open(),
            Self::Cluster(c) => c.is_open(),
        }
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = SyncConn;
    type Error = redis::RedisError;

    fn connect(&self) -> RedisResult<SyncConn> {
        match self {
            Self::Single(client, connect, response) => {
                let c = client.get_connection_with_timeout(*connect)?;
                c.set_read_timeout(Some(*response))?;
                c.set_write_timeout(Some(*response))?;
                Ok(SyncConn::Single(Single {
                    conn: c,
                    timeout: *response,
                    broken: false,
                    used: Instant::now(),
                }))
            }
            Self::Cluster(client) => client
                .get_connection()
                .map(|c| SyncConn::Cluster(Box::new(c))),
        }
    }

    fn is_valid(&self, conn: &mut SyncConn) -> RedisResult<()> {
        redis::cmd("PING").query::<String>(conn).map(|_| ())
    }

    fn has_broken(&self, conn: &mut SyncConn) -> bool {
        !conn.is_open()
    }
}

impl RedisSyncCache {
    /// Connects with `config`; the pool opens one connection now and up to
    /// `max_connections` on demand.
    pub fn connect(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let config = config.capped();
        if config.sentinel.is_some() {
            return Err(CacheError::Config(
                "RedisSyncCache supports single nodes and clusters; use RedisCache for Sentinel"
                    .into(),
            ));
        }
        let cluster = !config.cluster_nodes.is_empty();
        let manager = if cluster {
            let nodes = config.cluster_node_urls();
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.response_timeout)
                .tcp_settings(crate::conn::tcp_settings(&config))
                // redis-rs waits at least 1.28 s before a retry by default (every "wait and
                // retry" error: `TRYAGAIN`, `CLUSTERDOWN`, `LOADING`, ...): a `TRYAGAIN` during
                // a slot migration cost a `get_many` 2.6 s with a 1 s response timeout. Now
                // its 2 retries wait a random 10–40 ms, then 10–160 ms (redis-rs draws each
                // wait between the minimum and 10 × 4^n, n counting from 1): a call gives up
                // after at most ~0.2 s of waiting, where it waited out ~2.6 s of a failover
                // before. Unlike the async client (`conn.rs`'s `cluster_call`), redis-rs's
                // blocking client also retries a timed-out or lost call, writes included.
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(160)
                .retry_wait_formula(10, 4)
                .build()
                .map_err(|e| CacheError::Config(format!("cluster: {e}")))?;
            Manager::Cluster(client)
        } else {
            let url = config.node_url(&config.host, config.port);
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| CacheError::Config(format!("invalid Redis address: {e}")))?
                .set_tcp_settings(crate::conn::tcp_settings(&config));
            let client = crate::conn::open_client(&config, info, "connect")?;
            Manager::Single(client, config.connect_timeout, config.response_timeout)
        };
        let max = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
        let pool = r2d2::Pool::builder()
            .max_size(max)
            .min_idle(Some(1))
            .connection_timeout(config.connect_timeout)
            .test_on_check_out(false)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build(manager)
            .map_err(|e| CacheError::connection(format!("connect: {e}"), Some(Box::new(e))))?;
        let codec = serializer_for(&config)?;
        Ok(Self {
            inner: Arc::new(SyncInner {
                pool,
                keys: KeySpace::new(config.key_prefix.clone()).with_max_key_len(config.max_key_len),
                stats: StatsRecorder::new(config.name.as_str(), "redis"),
                codec,
                ttl: TtlPolicy::new(config.default_ttl),
                config,
                cluster,
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Connects to a `redis://` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::connect(RedisConfig::from_url(url)?)
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// The codec used by the typed methods.
    pub fn codec(&self) -> &Serializer {
        &self.inner.codec
    }

    /// A pooled connection that is [usable](SyncConn::usable): one that sat idle and does
    /// not answer is dropped and another taken (made anew when none is idle), a few times at
    /// most.
    fn checked_out(&self, op: Operation) -> Result<r2d2::PooledConnection<Manager>> {
        let mut tries = 0;
        loop {
            let mut conn = self.inner.pool.get().map_err(|e| {
                CacheError::connection(
                    format!("{}: no connection available: {e}", op.as_str()),
                    Some(Box::new(e)),
                )
            })?;
            tries += 1;
            if conn.usable() || tries > 3 {
                return Ok(conn);
            }
        }
    }

    fn run<T>(&self, op: Operation, f: impl Fn(&mut SyncConn) -> RedisResult<T>) -> Result<T> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(CacheError::Closed);
        }
        let timeout = self.inner.config.response_timeout;
        // Reads only: a write retried on another pool connection could run before its first
        // try, still queued on the first one, and be undone by it (as on the async side).
        let read = matches!(
            op,
            Operation::Get
                | Operation::GetMany
                | Operation::Exists
                | Operation::GetTtl
                | Operation::HealthCheck
        );
        let attempts = if read && self.inner.config.retry_on_timeout {
            2
        } else {
            1
        };
        let start = Instant::now();
        let mut result = Err(CacheError::Closed);
        for _ in 0..attempts {
            result = match self.checked_out(op) {
                Err(e) => Err(e),
                Ok(mut conn) => {
                    let r = f(&mut conn).map_err(|e| map_err(op.as_str(), e, timeout));
                    conn.used();
                    r
                }
            };
            if !matches!(&result, Err(e) if e.is_timeout()) {
                break;
            }
        }
        self.inner.stats.latency(op, start.elapsed());
        if result.is_err() {
            self.inner.stats.error(op);
        }
        result
    }

    /// Runs `cmd` on several keys, on a cluster one slot at a time: for each group of key
    /// indices, the replies — one for the group's command, or one per key when a slot
    /// migration refused it (`ASK`, or `TRYAGAIN`: its keys on two nodes; it ran nowhere, and
    /// each key alone follows its own `ASK`). redis-rs's blocking cluster client would split a
    /// command across slots itself, and panics when a part of it is redirected during a
    /// migration (redis 1.8.2: an index out of bounds in `combine_and_sort_array_results`).
    fn by_slot<K: AsRef<[u8]>, T: FromRedisValue>(
        &self,
        op: Operation,
        keys: &[K],
        cmd: impl Fn(&[&K]) -> redis::Cmd,
    ) -> Result<Vec<(Vec<usize>, Vec<T>)>> {
        let groups = if self.inner.cluster {
            group_by_slot(&keys.iter().map(AsRef::as_ref).collect::<Vec<_>>())
        } else {
            vec![(0..keys.len()).collect()]
        };
        groups
            .into_iter()
            .map(|group| {
                let of_group: Vec<&K> = group.iter().map(|&i| &keys[i]).collect();
                let replies = self.run(op, |c| match cmd(&of_group).query::<T>(c) {
                    Err(e) if of_group.len() > 1 && crate::conn::split_by_a_migration(&e) => {
                        of_group.iter().map(|k| cmd(&[*k]).query::<T>(c)).collect()
                    }
                    r => r.map(|one| vec![one]),
                })?;
                Ok((group, replies))
            })
            .collect()
    }

    fn full(&self, key: &str) -> Result<String> {
        Ok(self.inner.keys.full_key(key)?.into_owned())
    }

    // ---- byte level -------------------------------------------------------------------------

    /// Reads raw bytes.
    pub fn get_bytes(&self, key: &str) -> Result<Option<Bytes>> {
        let full = self.full(key)?;
        let v: Option<Vec<u8>> = self.run(Operation::Get, |c| commands::get(&full).query(c))?;
        if v.is_some() {
            self.inner.stats.hit();
        } else {
            self.inner.stats.miss();
        }
        Ok(v.map(Bytes::from))
    }

    /// Writes raw bytes (`ttl: None`: no expiry).
    pub fn set_bytes(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<()> {
        let full = self.full(key)?;
        commands::check_ttl(ttl)?;
        commands::check_size(value.len(), self.inner.config.max_value_size)?;
        self.run(Operation::Set, |c| {
            commands::set(&full, value, ttl).query::<()>(c)
        })?;
        self.inner.stats.sets(1);
        Ok(())
    }

    /// Reads several keys' raw bytes, in key order.
    pub fn get_many_bytes(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let full = keys
            .iter()
            .map(|k| self.full(k))
            .collect::<Result<Vec<_>>>()?;
        if full.is_empty() {
            return Ok(Vec::new());
        }
        let mut values: Vec<Option<Vec<u8>>> = vec![None; full.len()];
        let parts = self.by_slot::<_, Vec<Option<Vec<u8>>>>(Operation::GetMany, &full, |keys| {
            commands::mget(keys)
        })?;
        for (group, replies) in parts {
            let got: Vec<Option<Vec<u8>>> = replies.into_iter().flatten().collect();
            commands::check_mget(got.len(), group.len())?;
            for (i, v) in group.into_iter().zip(got) {
                values[i] = v;
            }
        }
        let hits = values.iter().filter(|v| v.is_some()).count() as u64;
        self.inner.stats.hits(hits);
        self.inner.stats.misses(values.len() as u64 - hits);
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    /// Writes several raw values in one pipelined round trip (per slot on a cluster).
    pub fn set_many_bytes(&self, entries: &[(&str, &[u8])], ttl: Option<Duration>) -> Result<()> {
        commands::check_ttl(ttl)?;
        let mut full = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            full.push(self.full(k)?);
            commands::check_size(v.len(), self.inner.config.max_value_size)?;
        }
        if entries.is_empty() {
            return Ok(());
        }
        let groups = if self.inner.cluster {
            group_by_slot(&full.iter().map(|k| k.as_bytes()).collect::<Vec<_>>())
        } else {
            vec![(0..entries.len()).collect()]
        };
        for group in groups {
            self.run(Operation::SetMany, |c| {
                let sets = group
                    .iter()
                    .map(|&i| commands::set(&full[i], entries[i].1, ttl));
                match &mut *c {
                    // A cluster pipeline (redis-rs's, split by node) whose commands a slot
                    // migration refused (`ASK`: the key has moved; `MOVED`: the slot has) ran
                    // nowhere: each is sent again alone, following its redirect; the others
                    // ran once. A plain pipeline on a cluster connection is sent again whole
                    // by redis-rs, to the node an `ASK` names, behind one `ASKING`: its first
                    // command ran a second time there (a key still on the source was created
                    // on the target too, and the migration then failed with `BUSYKEY`).
                    SyncConn::Cluster(cc) => {
                        let sets: Vec<redis::Cmd> = sets.collect();
                        let mut pipe = redis::cluster::cluster_pipe();
                        for set in &sets {
                            pipe.add_command(set.clone()).ignore();
                        }
                        match pipe.query::<()>(cc) {
                            Err(e) => match redirected(&e) {
                                Some(again) => again.into_iter().try_for_each(|i| {
                                    // An index the pipeline does not have: its error stands.
                                    let set = sets.get(i).ok_or_else(|| e.clone())?;
                                    set.query::<()>(&mut **cc)
                                }),
                                None => Err(e),
                            },
                            ok => ok,
                        }
                    }
                    SyncConn::Single(_) => {
                        let mut pipe = redis::pipe();
                        for set in sets {
                            pipe.add_command(set).ignore();
                        }
                        pipe.query::<()>(c)
                    }
                }
            })?;
        }
        self.inner.stats.sets(entries.len() as u64);
        Ok(())
    }

    // ---- typed ------------------------------------------------------------------------------

    /// Reads and decodes a value; undecodable values read as a miss (removed when damaged, left
    /// when another build may read them).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.get_bytes(key)? {
            None => Ok(None),
            Some(bytes) => Ok(self.decode_or_repair(key, &bytes)),
        }
    }

    /// As `Cache::decode_entry`: a miss, counted; removed only when damaged or forged.
    fn decode_or_repair<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Option<T> {
        match self
            .inner
            .codec
            .decode_for(&[self.inner.keys.prefix(), key], bytes)
        {
            Ok(v) => Some(v),
            Err(e) => {
                self.inner.stats.undecodable();
                if !e.kind().is_damaged() {
                    tracing::debug!(key, error = %e, "unreadable cache entry left in place");
                    return None;
                }
                tracing::warn!(key, error = %e, "undecodable cache entry removed");
                let _ = self.delete(key);
                None
            }
        }
    }

    /// Encodes and stores a value with the default TTL.
    pub fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        self.set_with_expiry(key, value, Expiry::Default)
    }

    /// Encodes and stores a value that expires after `ttl`.
    pub fn set_with_ttl<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        self.set_with_expiry(key, value, Expiry::After(ttl))
    }

    /// Encodes and stores a value with an explicit expiry.
    pub fn set_with_expiry<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        expiry: Expiry,
    ) -> Result<()> {
        let ttl = self.inner.ttl.resolve(expiry)?;
        let bytes = self
            .inner
            .codec
            .encode_for(&[self.inner.keys.prefix(), key], value)?;
        self.set_bytes(key, &bytes, ttl)
    }

    /// Removes a key; `true` when it existed.
    pub fn delete(&self, key: &str) -> Result<bool> {
        let full = self.full(key)?;
        let n: u64 = self.run(Operation::Delete, |c| {
            commands::unlink(full.as_str()).query(c)
        })?;
        self.inner.stats.deletes(n);
        Ok(n > 0)
    }

    /// `true` when the key exists.
    pub fn exists(&self, key: &str) -> Result<bool> {
        let full = self.full(key)?;
        let n: u64 = self.run(Operation::Exists, |c| commands::exists(&full).query(c))?;
        Ok(n > 0)
    }

    /// The remaining TTL (`None` when missing or persistent).
    pub fn get_ttl(&self, key: &str) -> Result<Option<Duration>> {
        Ok(self.ttl_state(key)?.remaining())
    }

    /// The key's TTL state.
    pub fn ttl_state(&self, key: &str) -> Result<KeyTtl> {
        let full = self.full(key)?;
        let ms: i64 = self.run(Operation::GetTtl, |c| commands::pttl(&full).query(c))?;
        Ok(commands::key_ttl(ms))
    }

    /// Sets the remaining lifetime to `ttl`; `false` when the key is missing.
    pub fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        let full = self.full(key)?;
        commands::check_ttl(Some(ttl))?;
        let n: u64 = self.run(Operation::ExtendTtl, |c| {
            commands::pexpire(&full, ttl).query(c)
        })?;
        Ok(n > 0)
    }

    /// Reads and decodes several keys, in key order.
    pub fn get_many<T: DeserializeOwned>(&self, keys: &[&str]) -> Result<Vec<Option<T>>> {
        let raw = self.get_many_bytes(keys)?;
        Ok(keys
            .iter()
            .zip(raw)
            .map(|(k, v)| v.and_then(|b| self.decode_or_repair(k, &b)))
            .collect())
    }

    /// Encodes and writes several values in one round trip.
    pub fn set_many<K, T, I>(&self, entries: I, expiry: impl Into<Expiry>) -> Result<()>
    where
        I: IntoIterator<Item = (K, T)>,
        K: AsRef<str>,
        T: Serialize,
    {
        let ttl = self.inner.ttl.resolve(expiry.into())?;
        let encoded = entries
            .into_iter()
            .map(|(k, v)| {
                let bytes = self
                    .inner
                    .codec
                    .encode_for(&[self.inner.keys.prefix(), k.as_ref()], &v)?;
                Ok((k, bytes))
            })
            .collect::<Result<Vec<_>>>()?;
        let borrowed: Vec<(&str, &[u8])> =
            encoded.iter().map(|(k, v)| (k.as_ref(), &v[..])).collect();
        self.set_many_bytes(&borrowed, ttl)
    }

    /// Removes several keys; returns how many existed.
    pub fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        let full = keys
            .iter()
            .map(|k| self.full(k))
            .collect::<Result<Vec<_>>>()?;
        if full.is_empty() {
            return Ok(0);
        }
        let n: u64 = self
            .by_slot(Operation::DeleteMany, &full, |keys| commands::unlink(keys))?
            .into_iter()
            .flat_map(|(_, counts): (_, Vec<u64>)| counts)
            .sum();
        self.inner.stats.deletes(n);
        Ok(n)
    }

    /// Removes every key of this cache matching a Redis glob (SCAN + UNLINK, every primary).
    pub fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        let full = self.inner.keys.full_pattern(pattern)?;
        let mut removed = 0;
        let nodes: Vec<Option<(String, u16)>> = if self.inner.cluster {
            let slots: Value = self.run(Operation::ClearPattern, |c| {
                redis::cmd("CLUSTER").arg("SLOTS").query(c)
            })?;
            commands::cluster_primaries(slots)
                .into_iter()
                .map(Some)
                .collect()
        } else {
            vec![None]
        };
        for node in nodes {
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = self.run(Operation::ClearPattern, |c| {
                    let scan = commands::scan(cursor, &full);
                    match (&node, &mut *c) {
                        (Some((host, port)), SyncConn::Cluster(cc)) => {
                            let v = cc.route_command(
                                &scan,
                                RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                    host: host.clone(),
                                    port: *port,
                                }),
                            )?;
                            <(u64, Vec<Vec<u8>>)>::from_redis_value(v).map_err(Into::into)
                        }
                        _ => scan.query(c),
                    }
                })?;
                // The library's own keys (locks, journals) are never removed by a pattern.
                // Bytes: a name under the prefix need not be UTF-8.
                let internal = format!("{}__ncm:", self.inner.keys.prefix());
                let keys: Vec<Vec<u8>> = keys
                    .into_iter()
                    .filter(|k| !k.starts_with(internal.as_bytes()))
                    .collect();
                if !keys.is_empty() {
                    removed += self
                        .by_slot(Operation::ClearPattern, &keys, |keys| {
                            commands::unlink(keys)
                        })?
                        .into_iter()
                        .flat_map(|(_, counts): (_, Vec<u64>)| counts)
                        .sum::<u64>();
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        self.inner.stats.deletes(removed);
        Ok(removed)
    }

    /// Returns the cached value or runs `loader`, caches and returns its result.
    ///
    /// After a miss the result is stored only if the key is still absent (`SET NX`), as the
    /// async caches' loads are: a value another instance wrote while the loader ran is newer
    /// than what the loader read, and stays (the caller still gets its loaded value). An
    /// entry this build cannot read (another build's, left in place) is replaced.
    pub fn read_through<T, F, E>(
        &self,
        key: &str,
        loader: F,
        expiry: impl Into<Expiry>,
    ) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> std::result::Result<T, E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let absent = match self.get_bytes(key)? {
            None => true,
            Some(bytes) => match self.decode_or_repair(key, &bytes) {
                Some(v) => return Ok(v),
                None => false,
            },
        };
        let v = loader().map_err(CacheError::loader)?;
        let expiry = expiry.into();
        if !absent {
            self.set_with_expiry(key, &v, expiry)?;
            return Ok(v);
        }
        let ttl = self.inner.ttl.resolve(expiry)?;
        let bytes = self
            .inner
            .codec
            .encode_for(&[self.inner.keys.prefix(), key], &v)?;
        let full = self.full(key)?;
        commands::check_ttl(ttl)?;
        commands::check_size(bytes.len(), self.inner.config.max_value_size)?;
        let written: Option<String> = self.run(Operation::Set, |c| {
            commands::set_nx(&full, &bytes, ttl).query(c)
        })?;
        if written.is_some() {
            self.inner.stats.sets(1);
        } else {
            tracing::debug!(
                key,
                "written since the load's miss; result served, not cached"
            );
        }
        Ok(v)
    }

    /// `true` when Redis answers PING.
    pub fn health_check(&self) -> bool {
        self.health_report().healthy
    }

    /// PING with its latency.
    pub fn health_report(&self) -> HealthReport {
        let start = Instant::now();
        let pong: Result<String> =
            self.run(Operation::HealthCheck, |c| redis::cmd("PING").query(c));
        let latency = start.elapsed();
        match pong {
            Ok(p) => HealthReport::new(p == "PONG", latency, "redis", p),
            Err(e) => HealthReport::new(false, latency, "redis", e.to_string()),
        }
    }

    /// Statistics, with `memory_usage` read from `INFO memory` now.
    pub fn get_stats(&self) -> CacheStats {
        let mut stats = self.inner.stats.snapshot();
        if let Ok(info) = self.run(Operation::HealthCheck, |c| {
            redis::cmd("INFO").arg("memory").query::<String>(c)
        }) {
            stats.memory_usage = commands::used_memory(&info);
        }
        stats
    }

    /// Stops handing out connections; later calls fail with `Closed`.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
    }
}

/// A pipeline's failed commands, by index, if `e` is redis-rs's error for a pipeline some of
/// whose commands failed. redis-rs has no accessor telling it from a lone server error (which
/// [`redis::RedisError::into_server_errors`] also returns, at index 0) but its message:
/// "Pipeline failure: [...]" or "Pipeline failures: [...]" (redis 1.8.2; pinned by a test).
fn pipeline_failures(e: &redis::RedisError) -> Option<Arc<[(usize, redis::ServerError)]>> {
    if !e.to_string().starts_with("Pipeline failure") {
        return None;
    }
    e.clone().into_server_errors()
}

/// The commands of a pipeline that failed only because a slot migration redirected them
/// (`ASK`, `MOVED`: none of them ran), by index; `None` if anything else failed, or if the
/// error is not the pipeline's list of failed commands (a lone server error also converts to
/// one at index 0, which would name a command that may have run).
fn redirected(e: &redis::RedisError) -> Option<Vec<usize>> {
    let failed = pipeline_failures(e)?;
    failed
        .iter()
        .map(|(i, err)| matches!(err.code(), "ASK" | "MOVED").then_some(*i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pipeline_failures` tells a pipeline's failures from a lone server error by redis-rs's
    /// message: this pins that message (a redis-rs upgrade that rewords it fails here, not
    /// silently in `set_many`, which would then return the error instead of sending the
    /// redirected SETs again).
    #[test]
    fn pipeline_failures_are_told_from_a_lone_error() {
        let server = ncm_cache_testkit::RedisServer::start().expect("redis-server");
        let client = redis::Client::open(server.url()).unwrap();
        let mut c = client.get_connection().unwrap();
        redis::cmd("SET").arg("s").arg("text").exec(&mut c).unwrap();
        let e = redis::pipe()
            .cmd("GET")
            .arg("s")
            .cmd("INCR")
            .arg("s")
            .query::<()>(&mut c)
            .unwrap_err();
        let failed = pipeline_failures(&e).expect("a pipeline's failures");
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, 1, "the INCR's index");
        let lone = redis::cmd("INCR").arg("s").query::<()>(&mut c).unwrap_err();
        assert!(lone.clone().into_server_errors().is_some());
        assert!(pipeline_failures(&lone).is_none(), "a lone error: {lone}");
        assert_eq!(redirected(&e), None, "not a redirect");
    }
}
