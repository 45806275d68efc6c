//! Cross-instance coordination on Redis (feature `redis`): invalidation messages over pub/sub,
//! the shared dependency/tag graph, and keyspace notifications for time-based invalidation.

mod graph;
mod keyspace;

use std::sync::{Arc, Weak};

use ncm_cache_core::{CacheError, Result, SharedBackend};
use ncm_cache_redis::{PubSubEvent, RedisBackend, Subscription};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

pub(crate) use graph::RedisGraph;

use crate::invalidation::{Broadcast, Graph, Invalidator};

/// The pub/sub channel (inside the cache's prefix: `{prefix}__ncm:strategies`).
pub(crate) const CHANNEL: &str = "strategies";

#[derive(Serialize, Deserialize)]
struct Envelope {
    origin: String,
    #[serde(flatten)]
    body: Broadcast,
}

/// The Redis side of one `CacheStrategies`.
pub(crate) struct Remote {
    backend: Arc<RedisBackend>,
    origin: String,
    /// The cache itself is this Redis: a deletion is seen by every instance at once.
    shared_cache: bool,
    /// See [`WRITE_LEASE`].
    lease: std::time::Duration,
    subscriber: JoinHandle<()>,
    keyspace: tokio::sync::Mutex<keyspace::Listener>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// Starts a write-through of a key: adds this write's token (scored by its deadline) to the
/// key's set of writes in flight, pruning the expired ones (a writer that died, was cancelled,
/// or is still in a store call longer than its lease), and records it as the key's latest
/// write. Returns how many are in flight, the pruned ones counted too: a write past its lease
/// may still commit, after this one (found by review). The set outlives its tokens (4 leases)
/// so that such a write is still seen.
static WRITE_BEGIN: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local pruned = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 4 * tonumber(ARGV[2]))
redis.call('SET', KEYS[2], ARGV[1], 'PX', 4 * tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1]) + pruned
",
    )
});

/// Ends it: 1 when another write-through of the key began since (it is no longer the latest),
/// or its own token was pruned (it outlived its lease: a later write may not have seen it).
static WRITE_END: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[1] then return 0 end
return 1
",
    )
});

/// How long a write-through's mark lives if its process dies (or its call is cancelled)
/// before ending it: later write-throughs of the key treat it as overlapping until then
/// (`CacheStrategiesBuilder::write_through_lease`).
pub(crate) const WRITE_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

/// One write-through of a key, as other instances see it.
pub(crate) struct WriteMark {
    keys: [String; 2],
    token: String,
    /// Another write-through of the key was in flight when this one began.
    overlapped: bool,
}

impl Remote {
    /// Marks a write-through of `key` as begun (cross-instance ordering, see
    /// `CacheStrategies::write_through`). The marks share one hash slot, named by a hash of the
    /// key (any key, braces included).
    pub(crate) async fn write_begin(&self, key: &str) -> Result<WriteMark> {
        let tag = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
        let base = self
            .backend
            .key_space()
            .reserved_key(&format!("wt:{{{tag:016x}}}"))?;
        let keys = [format!("{base}:w"), format!("{base}:last")];
        let token = format!("{:032x}", fastrand::u128(..));
        let n: i64 = self
            .backend
            .eval_script(
                ncm_cache_core::Operation::Set,
                &WRITE_BEGIN,
                &keys,
                &[
                    token.clone().into_bytes(),
                    self.lease.as_millis().max(1).to_string().into_bytes(),
                ],
            )
            .await?;
        Ok(WriteMark {
            keys,
            token,
            overlapped: n > 1,
        })
    }

    /// Ends a write-through; `true` when it overlapped another one of the key (in flight when
    /// it began, or begun since): which value the store kept is then unknown.
    pub(crate) async fn write_end(&self, mark: WriteMark) -> Result<bool> {
        let moved: i64 = self
            .backend
            .eval_script(
                ncm_cache_core::Operation::Set,
                &WRITE_END,
                &mark.keys,
                &[mark.token.into_bytes()],
            )
            .await?;
        Ok(mark.overlapped || moved == 1)
    }

    /// The set of keys registered (by any instance) under `event`.
    fn event_set(&self, event: &str) -> Result<String> {
        self.backend
            .key_space()
            .reserved_key(&format!("ev:{event}"))
    }

    /// Shares a registration: the keys of `event`, for every instance (also after this one is
    /// gone).
    pub(crate) async fn register_event_keys(&self, event: &str, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("SADD");
        cmd.arg(self.event_set(event)?);
        for k in keys {
            cmd.arg(k);
        }
        self.backend
            .query_cmd::<i64>(ncm_cache_core::Operation::Set, &cmd)
            .await
            .map(drop)
    }

    /// Every key registered under `event` by any instance.
    pub(crate) async fn event_keys(&self, event: &str) -> Result<Vec<String>> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(self.event_set(event)?);
        self.backend
            .query_cmd(ncm_cache_core::Operation::Get, &cmd)
            .await
    }

    /// `true` when the cache is this Redis and it is one node: a script may touch a cache key
    /// and the graph together.
    pub(crate) fn shares_cache_on_one_node(&self) -> bool {
        self.shared_cache && !self.backend.is_cluster()
    }

    /// The Redis key of cache key `key`.
    pub(crate) fn full_key(&self, key: &str) -> Result<String> {
        Ok(self.backend.key_space().full_key(key)?.into_owned())
    }

    /// `true` when other instances keep their own cache and must be told about deletions.
    pub(crate) fn needs_broadcast(&self) -> bool {
        !self.shared_cache
    }

    /// Publishes a message to every other instance.
    pub(crate) async fn publish(&self, body: &Broadcast) -> Result<()> {
        let payload = serde_json::to_vec(&Envelope {
            origin: self.origin.clone(),
            body: body.clone(),
        })
        .map_err(|e| CacheError::backend("encoding an invalidation message", Some(Box::new(e))))?;
        self.backend.publish(CHANNEL, &payload).await.map(drop)
    }

    /// Starts the keyspace-notification listener on first use; `false` when unavailable (the
    /// caller then uses timers).
    pub(crate) async fn keyspace_ready(&self, inv: &Arc<Invalidator>) -> bool {
        let mut listener = self.keyspace.lock().await;
        listener.ensure(&self.backend, self.shared_cache, inv).await
    }
}

/// Builds an invalidator coordinated through `redis`: subscribes (returning once subscribed),
/// and keeps the dependency/tag graph in Redis.
pub(crate) async fn connect(
    cache_backend: SharedBackend,
    redis: Arc<RedisBackend>,
    lease: std::time::Duration,
) -> Result<Arc<Invalidator>> {
    let shared_cache = std::ptr::addr_eq(Arc::as_ptr(&cache_backend), Arc::as_ptr(&redis));
    let subscription = redis.subscribe(&[CHANNEL]).await?;
    let origin = format!("{}-{:016x}", std::process::id(), fastrand::u64(..));
    let graph = Graph::Redis(RedisGraph::new(Arc::clone(&redis)));
    Ok(Arc::new_cyclic(|weak| {
        let subscriber = tokio::spawn(listen(weak.clone(), subscription, origin.clone()));
        let remote = Remote {
            backend: redis,
            origin,
            shared_cache,
            lease,
            subscriber,
            keyspace: tokio::sync::Mutex::new(keyspace::Listener::default()),
        };
        Invalidator::with_remote(cache_backend, graph, remote)
    }))
}

async fn listen(inv: Weak<Invalidator>, mut subscription: Subscription, origin: String) {
    while let Some(event) = subscription.recv().await {
        match event {
            PubSubEvent::Message { payload, .. } => {
                let envelope: Envelope = match serde_json::from_slice(&payload) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring a malformed invalidation message");
                        continue;
                    }
                };
                if envelope.origin == origin {
                    continue; // handled locally when it was sent
                }
                let Some(inv) = inv.upgrade() else { return };
                inv.apply_remote(envelope.body).await;
            }
            PubSubEvent::Disconnected => tracing::warn!(
                "invalidation channel disconnected: messages from other instances may be lost until it reconnects"
            ),
            PubSubEvent::Reconnected => {
                tracing::info!("invalidation channel reconnected");
                let Some(inv) = inv.upgrade() else { return };
                inv.resync().await;
            }
            _ => {}
        }
    }
}
