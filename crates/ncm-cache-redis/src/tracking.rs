//! Server-assisted invalidation: RESP3 `CLIENT TRACKING` in broadcast mode, on every primary.
//!
//! One RESP3 connection per primary (the server, the Sentinel-resolved primary, or every
//! primary of a cluster) sends `CLIENT TRACKING ON BCAST PREFIX <key prefix>`; Redis then
//! pushes the names of the keys under that prefix that any client changed, deleted, or that
//! expired or were evicted, and a null push on `FLUSHDB`/`FLUSHALL`. A connection lost, a ping
//! unanswered within `response_timeout`, or (cluster) a change in the set of primaries ends
//! the session: [`TrackingEvent::Disconnected`], then everything is connected and tracked
//! again and [`TrackingEvent::Reconnected`] is reported.

use std::fmt;
use std::time::Duration;

use ncm_cache_core::{CacheError, Result};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use crate::backend::RedisBackend;
use crate::config::RedisConfig;
use crate::error::map_err;

/// Something that happened on a [`Tracking`] session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrackingEvent {
    /// These keys (without the cache's prefix) changed, were deleted or expired.
    Invalidated(Vec<String>),
    /// The server dropped every key (`FLUSHDB` / `FLUSHALL`).
    Flushed,
    /// Tracking broke: invalidations may be lost until [`Reconnected`](Self::Reconnected).
    Disconnected,
    /// Every primary is tracked again. Anything cached before may be out of date.
    Reconnected,
}

/// A live tracking session; its background task ends when this is dropped.
pub struct Tracking {
    rx: mpsc::Receiver<TrackingEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Tracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracking").finish_non_exhaustive()
    }
}

impl Tracking {
    /// The next event; `None` once the session has ended.
    pub async fn recv(&mut self) -> Option<TrackingEvent> {
        self.rx.recv().await
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A push from the connection of session `session` (pushes of an older session are ignored).
type Push = (u64, PushInfo);

/// The tracked connections of one session, with what identifies the topology they track.
struct Session {
    conns: Vec<redis::aio::MultiplexedConnection>,
    /// Cluster: every primary (from `CLUSTER NODES`), compared again on every health check.
    masters: Option<Vec<(String, u16)>>,
    /// Cluster: primaries flagged failed that still own slots and did not answer; each health
    /// check tries them again, since one that answers takes writes for its slots at once.
    absent: Vec<(String, u16)>,
    /// Sentinel and cluster: each tracked node must still answer `ROLE` with `master` (a
    /// demoted primary that stays up stops receiving writes).
    check_role: bool,
}

impl RedisBackend {
    /// Starts server-assisted invalidation (RESP3 client tracking in broadcast mode for the
    /// cache's key prefix) on every primary. Returns once every primary is tracked; then
    /// reports what Redis pushes, reconnecting with backoff when a connection breaks.
    ///
    /// Fails with [`CacheError::Config`] when a server refuses `HELLO 3` or `CLIENT TRACKING`
    /// (Redis before 6, a proxy or a managed service that disabled them).
    ///
    /// ```no_run
    /// # async fn demo(redis: ncm_cache_redis::RedisBackend) -> ncm_cache_core::Result<()> {
    /// use ncm_cache_redis::TrackingEvent;
    /// let mut tracking = redis.track_changes().await?;
    /// while let Some(event) = tracking.recv().await {
    ///     if let TrackingEvent::Invalidated(keys) = event {
    ///         println!("changed: {keys:?}");
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn track_changes(&self) -> Result<Tracking> {
        let (push_tx, push_rx) = mpsc::unbounded_channel::<Push>();
        let mut wait = FailoverWait::new(self.config().cluster_failover_wait);
        let first = connect(self, &push_tx, 0, &mut wait).await?;
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(run(self.clone_handle(), push_tx, push_rx, tx, first, wait));
        Ok(Tracking { rx, task })
    }
}

/// How long tracking has held back for a Cluster failover under way, bounded by
/// `cluster_failover_wait`: a replica that is never promoted (its data too old, elections that
/// keep failing) must not keep L1 off for good.
struct FailoverWait {
    limit: Duration,
    /// The failed primary waited for, since when, and whether the wait was given up.
    since: Option<(String, std::time::Instant, bool)>,
}

impl FailoverWait {
    fn new(limit: Duration) -> Self {
        Self { limit, since: None }
    }

    /// Whether to hold back for `failing` (a pending failover's failed primary, or `None`):
    /// true until the same failover has been waited for `limit`; then false, with a warning.
    fn holds(&mut self, failing: Option<&str>) -> bool {
        let Some(failed) = failing else {
            self.since = None;
            return false;
        };
        let now = std::time::Instant::now();
        match &mut self.since {
            Some((node, since, gave_up)) if node == failed => {
                if now.duration_since(*since) < self.limit {
                    return true;
                }
                if !*gave_up {
                    *gave_up = true;
                    tracing::warn!(
                        primary = %failed,
                        waited = ?self.limit,
                        "client tracking: a failed primary's replica has not taken over within \
                         cluster_failover_wait; tracking the surviving primaries (a later \
                         promotion is caught by the next health check)"
                    );
                }
                false
            }
            _ => {
                self.since = Some((failed.to_owned(), now, false));
                !self.limit.is_zero()
            }
        }
    }

    /// Whether a failover is being waited for (not given up): reconnects retry soon.
    fn waiting(&self) -> bool {
        matches!(self.since, Some((_, _, false)))
    }
}

/// Connects to every primary and turns tracking on; pushes go to `push_tx` tagged `session`.
async fn connect(
    backend: &RedisBackend,
    push_tx: &mpsc::UnboundedSender<Push>,
    session: u64,
    wait: &mut FailoverWait,
) -> Result<Session> {
    let config = backend.config();
    let timeout = config.connect_timeout;
    let (masters, failed) = match backend.cluster_masters().await? {
        Some(primaries) => {
            // Tracking the survivors now would miss the replica's writes once it is promoted,
            // until the next topology check: L1 stays off until it has taken over (or for
            // `cluster_failover_wait` at most).
            if wait.holds(primaries.failing_over.as_deref()) {
                let failed = primaries.failing_over.unwrap_or_default();
                return Err(CacheError::Connection {
                    message: format!(
                        "client tracking: a failover is under way (primary {failed} failed and \
                         a replica of it has not taken over yet); L1 stays off until it has"
                    ),
                    source: None,
                });
            }
            (Some(primaries.nodes), primaries.failed)
        }
        None => (None, Vec::new()),
    };
    let urls: Vec<String> = match &masters {
        Some(list) => list.iter().map(|(h, p)| config.node_url(h, *p)).collect(),
        None => vec![crate::pubsub::node_url(config, 0).await?],
    };
    let prefix = backend.key_space().prefix().to_owned();
    let track = urls.iter().map(|url| {
        let work = track_node(config, url, &prefix, push_tx.clone(), session);
        async move {
            tokio::time::timeout(timeout * 2, work)
                .await
                .map_err(|_| CacheError::Timeout {
                    operation: "client tracking",
                    after: timeout * 2,
                })?
        }
    });
    // A failed primary that still owns its slots is tracked too if it answers (it takes
    // writes for them); if it does not, the health checks keep trying it.
    let failed_urls: Vec<String> = failed.iter().map(|(h, p)| config.node_url(h, *p)).collect();
    let revived = failed_urls.iter().map(|url| {
        let work = track_node(config, url, &prefix, push_tx.clone(), session);
        async move {
            tokio::time::timeout(config.response_timeout, work)
                .await
                .ok()
                .and_then(|r| r.ok())
        }
    });
    let (conns, revived) = futures_util::future::join(
        futures_util::future::try_join_all(track),
        futures_util::future::join_all(revived),
    )
    .await;
    let mut conns = conns?;
    let mut absent = Vec::new();
    for (node, conn) in failed.into_iter().zip(revived) {
        match conn {
            Some(conn) => conns.push(conn),
            None => absent.push(node),
        }
    }
    Ok(Session {
        conns,
        check_role: masters.is_some() || config.sentinel.is_some(),
        masters,
        absent,
    })
}

/// One RESP3 connection to `url` with broadcast tracking of `prefix`.
async fn track_node(
    config: &RedisConfig,
    url: &str,
    prefix: &str,
    push_tx: mpsc::UnboundedSender<Push>,
    session: u64,
) -> Result<redis::aio::MultiplexedConnection> {
    let timeout = config.connect_timeout;
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| CacheError::Config(format!("invalid Redis address: {e}")))?;
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    let info = info
        .set_redis_settings(settings)
        .set_tcp_settings(crate::conn::tcp_settings(config));
    let client = crate::conn::open_client(config, info, "client tracking")?;
    let sender = move |push: PushInfo| push_tx.send((session, push));
    let conn_config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(config.response_timeout))
        .set_push_sender(sender);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&conn_config)
        .await
        .map_err(|e| refused_or(e, "client tracking", timeout))?;
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("TRACKING").arg("ON").arg("BCAST");
    if !prefix.is_empty() {
        cmd.arg("PREFIX").arg(prefix);
    }
    cmd.query_async::<()>(&mut conn)
        .await
        .map_err(|e| refused_or(e, "client tracking", timeout))?;
    Ok(conn)
}

/// A server's refusal (the command unknown or renamed, no permission, RESP3 not spoken) as a
/// configuration error; anything else (including other error replies, such as "max number of
/// clients reached") as a connection error, retried.
pub(crate) fn refused_or(e: redis::RedisError, op: &'static str, timeout: Duration) -> CacheError {
    use redis::{ErrorKind, ServerErrorKind};
    let text = e.to_string().to_ascii_lowercase();
    let refused = match e.kind() {
        ErrorKind::Server(ServerErrorKind::NoPerm) | ErrorKind::RESP3NotSupported => true,
        ErrorKind::Server(ServerErrorKind::ResponseError) | ErrorKind::Extension => {
            text.contains("unknown") || text.contains("not supported") || text.contains("disabled")
        }
        _ => false,
    };
    if refused {
        CacheError::Config(format!(
            "{op}: the server refused RESP3 client tracking ({e}); it needs Redis 6+ with \
             HELLO and CLIENT TRACKING available — use the pub/sub backplane instead"
        ))
    } else {
        map_err(op, e, timeout)
    }
}

async fn run(
    backend: RedisBackend,
    push_tx: mpsc::UnboundedSender<Push>,
    mut push_rx: mpsc::UnboundedReceiver<Push>,
    tx: mpsc::Sender<TrackingEvent>,
    first: Session,
    mut wait: FailoverWait,
) {
    let prefix = backend.key_space().prefix().to_owned();
    let mut session = 0u64;
    let mut current = Some(first);
    let mut backoff = Duration::from_millis(10);
    let mut refused = false;
    loop {
        let live = match current.take() {
            Some(s) => s,
            None => {
                // A new number for every attempt: pushes (a Disconnection) of a half-built
                // earlier attempt are ignored.
                session += 1;
                match connect(&backend, &push_tx, session, &mut wait).await {
                    Ok(s) => {
                        backoff = Duration::from_millis(10);
                        refused = false;
                        if tx.send(TrackingEvent::Reconnected).await.is_err() {
                            return;
                        }
                        s
                    }
                    Err(e) => {
                        if matches!(e, CacheError::Config(_)) && !refused {
                            refused = true;
                            tracing::error!(error = %e, "client tracking refused on reconnect; L1 stays off until it is accepted");
                        } else {
                            tracing::debug!(error = %e, "client tracking: reconnect failed");
                        }
                        if wait.waiting() {
                            // The promotion can come at any moment; L1 comes back soon after.
                            tokio::time::sleep(FAILOVER_POLL).await;
                            continue;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                }
            }
        };
        // Health checks run beside the pushes, never in front of them.
        let health = watch(&backend, &live, &mut wait);
        tokio::pin!(health);
        loop {
            tokio::select! {
                biased;
                push = push_rx.recv() => {
                    let Some((from, push)) = push else { return };
                    if from != session {
                        continue;
                    }
                    let event = match push.kind {
                        PushKind::Invalidate => invalidation(&push.data, &prefix),
                        PushKind::Disconnection => {
                            tracing::info!("client tracking: a connection closed; tracking again");
                            break;
                        }
                        _ => None,
                    };
                    if let Some(event) = event
                        && tx.send(event).await.is_err()
                    {
                        return;
                    }
                }
                reason = &mut health => {
                    tracing::info!(reason, "client tracking: tracking again");
                    break;
                }
            }
        }
        if tx.send(TrackingEvent::Disconnected).await.is_err() {
            return;
        }
    }
}

/// Ends (with the reason) when the session can no longer be trusted: a tracked node that does
/// not answer within `response_timeout` (or is no longer a primary), or a cluster whose
/// primaries changed (or whose topology cannot be read three times in a row). Checks every
/// `health_check_interval`, at most 1 s apart.
async fn watch(backend: &RedisBackend, session: &Session, wait: &mut FailoverWait) -> &'static str {
    let config = backend.config();
    let every = config
        .health_check_interval
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let timeout = config.response_timeout;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut unreadable = 0;
    loop {
        tick.tick().await;
        let checks = session.conns.iter().map(|conn| {
            let mut conn = conn.clone();
            let cmd = redis::cmd(if session.check_role { "ROLE" } else { "PING" });
            async move {
                match tokio::time::timeout(timeout, cmd.query_async::<Value>(&mut conn)).await {
                    Ok(Ok(reply)) => !session.check_role || is_primary(&reply),
                    _ => false,
                }
            }
        });
        let probes = session.absent.iter().map(|(host, port)| {
            let url = config.node_url(host, *port);
            async move { answers(config, &url).await }
        });
        let (checks, probes) = futures_util::future::join(
            futures_util::future::join_all(checks),
            futures_util::future::join_all(probes),
        )
        .await;
        if !checks.into_iter().all(|ok| ok) {
            return "a tracked node did not answer in time or is no longer a primary";
        }
        if probes.into_iter().any(|up| up) {
            return "a failed primary that still owns slots answers again";
        }
        if let Some(masters) = &session.masters {
            match backend.cluster_masters().await {
                Ok(Some(now)) if wait.holds(now.failing_over.as_deref()) => {
                    return "a primary failed and its replica is about to take over";
                }
                Ok(now) if now.as_ref().map(|p| &p.nodes) != Some(masters) => {
                    return "the cluster's primaries changed";
                }
                Ok(_) => unreadable = 0,
                Err(_) => {
                    unreadable += 1;
                    if unreadable >= 3 {
                        return "the cluster's topology could not be read";
                    }
                }
            }
        }
    }
}

/// Whether the node at `url` answers `PING` within `response_timeout` (connecting included).
async fn answers(config: &RedisConfig, url: &str) -> bool {
    let probe = async {
        let info = redis::IntoConnectionInfo::into_connection_info(url).ok()?;
        let info = info.set_tcp_settings(crate::conn::tcp_settings(config));
        let client = crate::conn::open_client(config, info, "client tracking").ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING").query_async::<()>(&mut conn).await.ok()
    };
    tokio::time::timeout(config.response_timeout, probe)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// `ROLE`'s reply names a primary.
fn is_primary(reply: &Value) -> bool {
    let Value::Array(items) = reply else {
        return false;
    };
    match items.first() {
        Some(Value::BulkString(b)) => b == b"master",
        Some(Value::SimpleString(s)) => s == "master",
        _ => false,
    }
}

/// How often a reconnect is tried while a failover is being waited for.
const FAILOVER_POLL: Duration = Duration::from_millis(100);

/// The event of an `invalidate` push: its keys without `prefix`, or a flush (null payload).
fn invalidation(data: &[Value], prefix: &str) -> Option<TrackingEvent> {
    match data.first()? {
        Value::Nil => Some(TrackingEvent::Flushed),
        Value::Array(keys) | Value::Set(keys) => {
            let keys = keys
                .iter()
                .filter_map(|k| match k {
                    Value::BulkString(b) => std::str::from_utf8(b).ok(),
                    Value::SimpleString(s) => Some(s.as_str()),
                    _ => None,
                })
                .map(|k| k.strip_prefix(prefix).unwrap_or(k).to_owned())
                .collect();
            Some(TrackingEvent::Invalidated(keys))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_become_events() {
        let keys = Value::Array(vec![
            Value::BulkString(b"app:a".to_vec()),
            Value::BulkString(b"app:b".to_vec()),
        ]);
        assert_eq!(
            invalidation(&[keys], "app:"),
            Some(TrackingEvent::Invalidated(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            invalidation(&[Value::Nil], "app:"),
            Some(TrackingEvent::Flushed)
        );
        assert_eq!(invalidation(&[], "app:"), None);
        assert_eq!(invalidation(&[Value::Int(1)], "app:"), None);
    }
}
