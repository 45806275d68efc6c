//! Pub/sub with automatic reconnection, for cross-instance messages (L1 invalidation, events).

use std::fmt;
use std::time::Duration;

use futures_util::StreamExt;
use ncm_cache_core::{Bytes, CacheError, Operation, Result};
use tokio::sync::mpsc;

use crate::backend::RedisBackend;
use crate::config::RedisConfig;
use crate::error::map_err;

/// Something that happened on a [`Subscription`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PubSubEvent {
    /// A message on one of the subscribed channels (the channel without the cache's prefix).
    Message {
        /// The channel, as passed to `subscribe`.
        channel: String,
        /// The payload.
        payload: Bytes,
    },
    /// The connection broke: messages may be lost until [`Reconnected`](Self::Reconnected).
    Disconnected,
    /// Subscribed again after a break. Anything learned from messages may be out of date:
    /// consumers should resynchronise (e.g. clear their L1).
    Reconnected,
}

/// A live subscription; the background task ends when this is dropped.
pub struct Subscription {
    rx: mpsc::Receiver<PubSubEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next event; `None` once the subscription has ended.
    pub async fn recv(&mut self) -> Option<PubSubEvent> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RedisBackend {
    /// The Redis channel used for `channel`: inside the cache's prefix, so caches with different
    /// prefixes never hear each other.
    pub fn channel_name(&self, channel: &str) -> String {
        format!("{}__ncm:{channel}", self.key_space().prefix())
    }

    /// Publishes `payload` on `channel`; returns how many subscribers received it.
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<u64> {
        let name = self.channel_name(channel);
        self.inner()
            .run(Operation::Set, crate::backend::Retry::No, |mut h| {
                let mut c = redis::cmd("PUBLISH");
                c.arg(&name).arg(payload);
                async move { c.query_async(&mut h).await }
            })
            .await
    }

    /// Writes `key` and publishes `payload` on `channel` in one pipelined round trip (the
    /// write-then-notify of a multi-level cache whose L2 and backplane are this Redis).
    pub async fn set_and_publish(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<std::time::Duration>,
        channel: &str,
        payload: &[u8],
    ) -> Result<()> {
        let full = self.key_space().full_key(key)?;
        crate::commands::check_ttl(ttl)?;
        crate::commands::check_size(value.len(), self.config().max_value_size)?;
        let name = self.channel_name(channel);
        self.inner()
            .run(Operation::Set, crate::backend::Retry::No, |mut h| {
                let mut pipe = redis::pipe();
                pipe.add_command(crate::commands::set(&full, value, ttl))
                    .ignore();
                pipe.cmd("PUBLISH").arg(&name).arg(payload).ignore();
                async move { pipe.query_async::<()>(&mut h).await }
            })
            .await?;
        self.inner().stats.sets(1);
        Ok(())
    }

    /// Subscribes to `channels`. Returns once subscribed; then delivers messages, and keeps
    /// reconnecting (with backoff) when the connection breaks, reporting
    /// [`PubSubEvent::Disconnected`] / [`PubSubEvent::Reconnected`]. A ping every
    /// `health_check_interval` (at most 1 s) detects a silent connection.
    pub async fn subscribe(&self, channels: &[&str]) -> Result<Subscription> {
        let config = self.config().clone();
        let names: Vec<(String, String)> = channels
            .iter()
            .map(|c| (self.channel_name(c), (*c).to_owned()))
            .collect();
        let (tx, rx) = mpsc::channel(1024);
        let first = connect(&config, &names, 0).await?;
        let task = tokio::spawn(run(config, names, tx, first));
        Ok(Subscription { rx, task })
    }
}

type Conn = (redis::aio::PubSubSink, redis::aio::PubSubStream);

/// Connects and subscribes; `attempt` picks the cluster node (each retry tries the next one).
async fn connect(config: &RedisConfig, names: &[(String, String)], attempt: usize) -> Result<Conn> {
    let timeout = config.connect_timeout;
    let work = async {
        let client = pubsub_client(config, attempt).await?;
        let pubsub = client
            .get_async_pubsub()
            .await
            .map_err(|e| map_err("subscribe", e, timeout))?;
        let (mut sink, stream) = pubsub.split();
        for (full, _) in names {
            sink.subscribe(full)
                .await
                .map_err(|e| map_err("subscribe", e, timeout))?;
        }
        Ok((sink, stream))
    };
    tokio::time::timeout(timeout * 2, work)
        .await
        .map_err(|_| CacheError::Timeout {
            operation: "subscribe",
            after: timeout * 2,
        })?
}

/// The node to subscribe on: the server, the Sentinel-resolved primary, or a cluster node
/// (cluster PUBLISH reaches every node): seed node `attempt` modulo their number, so a
/// subscription whose node is lost moves on to the next one.
async fn pubsub_client(config: &RedisConfig, attempt: usize) -> Result<redis::Client> {
    let url = node_url(config, attempt).await?;
    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
        .map_err(|e| CacheError::Config(format!("invalid Redis address: {e}")))?
        .set_tcp_settings(crate::conn::tcp_settings(config));
    crate::conn::open_client(config, info, "subscribe")
}

/// The address of the server, of the Sentinel-resolved primary, or of cluster seed node
/// `attempt` modulo their number.
pub(crate) async fn node_url(config: &RedisConfig, attempt: usize) -> Result<String> {
    let timeout = config.connect_timeout;
    let url = if let Some(s) = &config.sentinel {
        let addrs: Vec<String> = s
            .nodes
            .iter()
            .map(|n| {
                if n.contains("://") {
                    n.clone()
                } else {
                    format!("redis://{n}")
                }
            })
            .collect();
        let mut sentinel = redis::sentinel::Sentinel::build(addrs)
            .map_err(|e| CacheError::Config(format!("sentinel: {e}")))?;
        let client = sentinel
            .async_master_for(
                &s.master_name,
                Some(&crate::conn::sentinel_node_info(
                    config,
                    redis::ProtocolVersion::RESP2,
                )),
            )
            .await
            .map_err(|e| map_err("sentinel", e, timeout))?;
        let info = client.get_connection_info();
        let (host, port) = match info.addr() {
            redis::ConnectionAddr::Tcp(h, p)
            | redis::ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => (h.clone(), *p),
            other => {
                return Err(CacheError::Config(format!(
                    "unsupported sentinel address {other:?}"
                )));
            }
        };
        config.node_url(&host, port)
    } else if !config.cluster_nodes.is_empty() {
        let mut urls = config.cluster_node_urls();
        let at = attempt % urls.len().max(1);
        urls.swap_remove(at)
    } else {
        config.node_url(&config.host, config.port)
    };
    Ok(url)
}

async fn run(
    config: RedisConfig,
    names: Vec<(String, String)>,
    tx: mpsc::Sender<PubSubEvent>,
    first: Conn,
) {
    let ping_every = config
        .health_check_interval
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let mut conn = Some(first);
    let mut backoff = Duration::from_millis(10);
    // Which node to try next (cluster): moves on after every break and every failed attempt.
    let mut attempt = 0usize;
    loop {
        let (mut sink, mut stream) = match conn.take() {
            Some(c) => c,
            None => match connect(&config, &names, attempt).await {
                Ok(c) => {
                    backoff = Duration::from_millis(10);
                    if tx.send(PubSubEvent::Reconnected).await.is_err() {
                        return;
                    }
                    c
                }
                Err(e) => {
                    tracing::debug!(error = %e, "pub/sub reconnect failed");
                    attempt = attempt.wrapping_add(1);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    let full = msg.get_channel_name();
                    let channel = names
                        .iter()
                        .find(|(f, _)| f == full)
                        .map(|(_, c)| c.clone())
                        .unwrap_or_else(|| full.to_owned());
                    let payload = Bytes::copy_from_slice(msg.get_payload_bytes());
                    if tx.send(PubSubEvent::Message { channel, payload }).await.is_err() {
                        return;
                    }
                }
                _ = ping.tick() => {
                    let alive = tokio::time::timeout(config.response_timeout, sink.ping::<redis::Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        attempt = attempt.wrapping_add(1);
        if tx.send(PubSubEvent::Disconnected).await.is_err() {
            return;
        }
    }
}
