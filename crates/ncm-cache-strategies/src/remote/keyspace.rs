//! Keyspace notifications for time-based invalidation: `notify-keyspace-events` gets `Ex`
//! (`CONFIG SET`, keeping the flags already set), and a dedicated pub/sub connection listens on
//! `__keyevent@<db>__:expired`; after every reconnect the flags are set again (a restarted Redis
//! has lost them) and the watched keys are checked for expirations missed meanwhile. Where that
//! is not possible — the cache is not this Redis, a
//! Cluster or Sentinel deployment (notifications are per node), or `CONFIG` is refused — the
//! caller falls back to timers; the reason is logged once.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use ncm_cache_core::{CacheError, KeySpace, Operation, Result};
use ncm_cache_redis::{RedisBackend, RedisConfig};
use tokio::task::JoinHandle;

use crate::invalidation::Invalidator;

/// The listener's state, decided on first use.
#[derive(Default)]
pub(crate) enum Listener {
    #[default]
    Untried,
    Active(JoinHandle<()>),
    Unavailable,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Active(task) = self {
            task.abort();
        }
    }
}

impl Listener {
    pub(crate) async fn ensure(
        &mut self,
        backend: &Arc<RedisBackend>,
        shared_cache: bool,
        inv: &Arc<Invalidator>,
    ) -> bool {
        match self {
            Self::Active(_) => return true,
            Self::Unavailable => return false,
            Self::Untried => {}
        }
        // Boxed: redis-rs connection futures nest deeply; this keeps callers' futures small.
        match Box::pin(start(backend, shared_cache, inv)).await {
            Ok(task) => {
                *self = Self::Active(task);
                true
            }
            Err(reason) => {
                tracing::info!(%reason, "time-based invalidation uses timers (no keyspace notifications)");
                *self = Self::Unavailable;
                false
            }
        }
    }
}

async fn start(
    backend: &Arc<RedisBackend>,
    shared_cache: bool,
    inv: &Arc<Invalidator>,
) -> std::result::Result<JoinHandle<()>, String> {
    let config = backend.config();
    if !shared_cache {
        return Err("the cache is not stored in this Redis".into());
    }
    if backend.is_cluster() || config.sentinel.is_some() {
        return Err("keyspace notifications are per node on Cluster/Sentinel".into());
    }
    enable_notifications(backend)
        .await
        .map_err(|e| e.to_string())?;
    let client = client_for(config).map_err(|e| e.to_string())?;
    let channel = format!("__keyevent@{}__:expired", config.db);
    let conn = subscribe(&client, &channel, config.connect_timeout)
        .await
        .map_err(|e| e.to_string())?;
    let keys = backend.key_space().clone();
    let every = config.response_timeout;
    Ok(tokio::spawn(run(
        Arc::downgrade(inv),
        Arc::clone(backend),
        client,
        channel,
        conn,
        keys,
        every,
    )))
}

/// Adds `E` and `x` to `notify-keyspace-events`, keeping the flags already set.
async fn enable_notifications(backend: &RedisBackend) -> Result<()> {
    let mut get = redis::cmd("CONFIG");
    get.arg("GET").arg("notify-keyspace-events");
    let reply: Vec<String> = backend.query_cmd(Operation::Get, &get).await?;
    let flags = reply.get(1).cloned().unwrap_or_default();
    let mut wanted = flags.clone();
    if !flags.contains('E') {
        wanted.push('E');
    }
    if !flags.contains('x') && !flags.contains('A') {
        wanted.push('x');
    }
    if wanted != flags {
        let mut set = redis::cmd("CONFIG");
        set.arg("SET").arg("notify-keyspace-events").arg(&wanted);
        backend.query_cmd::<()>(Operation::Set, &set).await?;
    }
    Ok(())
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn client_for(config: &RedisConfig) -> Result<redis::Client> {
    let scheme = if config.tls { "rediss" } else { "redis" };
    let auth = match (&config.username, &config.password) {
        (Some(u), Some(p)) => format!("{}:{}@", encode(u), encode(p)),
        (None, Some(p)) => format!(":{}@", encode(p)),
        (Some(u), None) => format!("{}@", encode(u)),
        (None, None) => String::new(),
    };
    let host = if config.host.contains(':') {
        format!("[{}]", config.host)
    } else {
        config.host.clone()
    };
    let url = format!("{scheme}://{auth}{host}:{}/{}", config.port, config.db);
    redis::Client::open(url.as_str())
        .map_err(|e| CacheError::Config(format!("keyspace listener: {e}")))
}

type Conn = (redis::aio::PubSubSink, redis::aio::PubSubStream);

async fn subscribe(client: &redis::Client, channel: &str, timeout: Duration) -> Result<Conn> {
    let work = async {
        let pubsub = client
            .get_async_pubsub()
            .await
            .map_err(|e| CacheError::connection(format!("keyspace listener: {e}"), None))?;
        let (mut sink, stream) = pubsub.split();
        sink.subscribe(channel)
            .await
            .map_err(|e| CacheError::connection(format!("keyspace listener: {e}"), None))?;
        Ok((sink, stream))
    };
    tokio::time::timeout(timeout * 2, work)
        .await
        .map_err(|_| CacheError::Timeout {
            operation: "keyspace subscribe",
            after: timeout * 2,
        })?
}

async fn run(
    inv: Weak<Invalidator>,
    backend: Arc<RedisBackend>,
    client: redis::Client,
    channel: String,
    first: Conn,
    keys: KeySpace,
    timeout: Duration,
) {
    let mut conn = Some(first);
    let mut backoff = Duration::from_millis(10);
    loop {
        let (mut sink, mut stream) = match conn.take() {
            Some(c) => c,
            None => match subscribe(&client, &channel, timeout).await {
                Ok(c) => {
                    backoff = Duration::from_millis(10);
                    // A restarted Redis has lost `notify-keyspace-events` (a CONFIG SET).
                    if let Err(e) = enable_notifications(&backend).await {
                        tracing::warn!(error = %e, "keyspace notifications could not be enabled again after a reconnect; time-based callbacks wait for the sweep");
                    }
                    // Expirations during the break were missed: check the watched keys now.
                    let Some(inv) = inv.upgrade() else { return };
                    sweep(&inv).await;
                    c
                }
                Err(e) => {
                    tracing::debug!(error = %e, "keyspace listener reconnect failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let mut ping = tokio::time::interval(Duration::from_secs(1));
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    let Some(inv) = inv.upgrade() else { return };
                    let full = String::from_utf8_lossy(msg.get_payload_bytes());
                    if let Some(key) = keys.strip(&full) {
                        inv.fire_expired(key, None).await;
                    }
                }
                _ = ping.tick() => {
                    let alive = tokio::time::timeout(timeout, sink.ping::<String>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        tracing::warn!("keyspace listener disconnected; reconnecting");
    }
}

async fn sweep(inv: &Invalidator) {
    for key in inv.timers.notified_keys() {
        if let Ok(false) = inv.backend.exists(&key).await {
            inv.fire_expired(&key, None).await;
        }
    }
}
