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
use std::time::{Duration, Instant};

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

/// What a cluster session tracks.
struct Topology {
    /// Every primary tracked: those not failed, and failed ones still owning slots that
    /// answered.
    tracked: Vec<(String, u16)>,
    /// Every primary not failed or still owning slots (see [`union`]) when tracking started.
    known: Vec<(String, u16)>,
}

/// A push from the connection of session `session` (pushes of an older session are ignored).
type Push = (u64, PushInfo);

/// The tracked connections of one session, with what identifies the topology they track.
struct Session {
    conns: Vec<redis::aio::MultiplexedConnection>,
    /// Cluster: the primaries tracked and the view they came from, checked on every health
    /// check.
    topology: Option<Topology>,
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
        let first = connect(self, &push_tx, 0).await?;
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(run(self.clone_handle(), push_tx, push_rx, tx, first));
        Ok(Tracking { rx, task })
    }
}

/// How long tracking has held back for each Cluster failover under way, bounded by
/// `cluster_failover_wait`: a replica that is never promoted (its data too old, elections that
/// keep failing) must not keep L1 off for good. Kept by the backend, so a tracking session
/// started anew (after a first attempt that failed) does not restart the wait.
#[derive(Debug)]
pub(crate) struct FailoverWait {
    limit: Duration,
    waits: Vec<Waited>,
}

/// One failed primary waited for.
#[derive(Debug)]
struct Waited {
    node: String,
    /// First seen with a failover under way.
    since: Instant,
    /// Last seen so: a wait is forgotten only once no node has named it for `limit`, so a
    /// node whose view differs for a moment (the failed primary itself, back) does not
    /// restart it.
    last: Instant,
    gave_up: bool,
}

impl FailoverWait {
    pub(crate) fn new(limit: Duration) -> Self {
        Self {
            limit,
            waits: Vec::new(),
        }
    }

    /// Whether to hold back, `pending` being the failed primaries whose failover is under way
    /// (`commands::failover_pending`) in the view of `reporter` (the primary that answered, if
    /// it is one) as seen `now`: true while any of them has been waited for less than `limit`.
    /// A wait that runs out is given up once, with a warning, without hiding a failover of
    /// another primary that comes later.
    pub(crate) fn holds(
        &mut self,
        pending: &[String],
        reporter: Option<&str>,
        now: Instant,
    ) -> bool {
        let limit = self.limit;
        self.waits
            .retain(|w| pending.contains(&w.node) || now.duration_since(w.last) < limit);
        // A failed primary back up never flags itself: its own view says nothing of the
        // failover the others still see under way, so it neither ends nor renews the wait.
        let mut hold = reporter.is_some_and(|me| {
            self.waits
                .iter()
                .any(|w| w.node == me && now.duration_since(w.since) < limit)
        });
        for node in pending {
            let i = match self.waits.iter().position(|w| &w.node == node) {
                Some(i) => i,
                None => {
                    self.waits.push(Waited {
                        node: node.clone(),
                        since: now,
                        last: now,
                        gave_up: false,
                    });
                    self.waits.len() - 1
                }
            };
            let w = &mut self.waits[i];
            w.last = now;
            if now.duration_since(w.since) < limit {
                hold = true;
            } else if !w.gave_up {
                w.gave_up = true;
                if !limit.is_zero() {
                    tracing::warn!(
                        primary = %node,
                        waited = ?limit,
                        "client tracking: a failed primary's replica has not taken over within \
                         cluster_failover_wait; tracking the surviving primaries (a later \
                         promotion is caught by the next health check)"
                    );
                }
            }
        }
        hold
    }

    /// Whether a failover is being waited for (not given up) at `now`: reconnects retry soon.
    pub(crate) fn waiting(&self, now: Instant) -> bool {
        self.waits
            .iter()
            .any(|w| !w.gave_up && now.duration_since(w.since) < self.limit)
    }
}

/// Connects to every primary and turns tracking on; pushes go to `push_tx` tagged `session`.
async fn connect(
    backend: &RedisBackend,
    push_tx: &mpsc::UnboundedSender<Push>,
    session: u64,
) -> Result<Session> {
    let config = backend.config();
    let timeout = config.connect_timeout;
    let (masters, failed) = match backend.cluster_masters().await? {
        Some(primaries) => {
            // Tracking the survivors now would miss the replica's writes once it is promoted,
            // until the next topology check: L1 stays off until it has taken over (or for
            // `cluster_failover_wait` at most).
            if backend.failover_holds(&primaries) {
                return Err(CacheError::Connection {
                    message: format!(
                        "client tracking: a failover is under way (primary {} failed and a \
                         replica of it has not taken over yet); L1 stays off until it has",
                        primaries.failing_over.join(", ")
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
    // At least the health check's probe (`answers`): a node that answered it gets as long.
    let revive_within = timeout.max(config.response_timeout);
    let revived = failed_urls.iter().map(|url| {
        let work = track_node(config, url, &prefix, push_tx.clone(), session);
        async move {
            tokio::time::timeout(revive_within, work)
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
    let mut revived_nodes = Vec::new();
    for (node, conn) in failed.iter().cloned().zip(revived) {
        match conn {
            Some(conn) => {
                conns.push(conn);
                revived_nodes.push(node);
            }
            None => absent.push(node),
        }
    }
    let topology = masters.as_ref().map(|nodes| Topology {
        tracked: nodes.iter().chain(&revived_nodes).cloned().collect(),
        known: union(nodes, &failed),
    });
    Ok(Session {
        conns,
        check_role: topology.is_some() || config.sentinel.is_some(),
        topology,
        absent,
    })
}

/// The primaries of a cluster's view that own slots or take writes: the ones not failed and
/// the failed ones still owning slots — the same set whether or not a node flags one of them
/// failed (a failed primary back up never flags itself).
fn union(nodes: &[(String, u16)], failed: &[(String, u16)]) -> Vec<(String, u16)> {
    let mut all: Vec<(String, u16)> = nodes.iter().chain(failed).cloned().collect();
    all.sort();
    all.dedup();
    all
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
                match connect(&backend, &push_tx, session).await {
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
                        if backend.failover_waiting() {
                            // The promotion (or the end of the wait) can come at any moment;
                            // L1 comes back soon after, not a long backoff later.
                            backoff = Duration::from_millis(10);
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
        let health = watch(&backend, &live);
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
async fn watch(backend: &RedisBackend, session: &Session) -> &'static str {
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
        // All at once: a probe of an unresponsive node does not delay the topology read.
        let view = async {
            match &session.topology {
                Some(_) => Some(backend.cluster_masters().await),
                None => None,
            }
        };
        let (checks, probes, view) = futures_util::future::join3(
            futures_util::future::join_all(checks),
            futures_util::future::join_all(probes),
            view,
        )
        .await;
        if !checks.into_iter().all(|ok| ok) {
            return "a tracked node did not answer in time or is no longer a primary";
        }
        if probes.into_iter().any(|up| up) {
            return "a failed primary that still owns slots answers again";
        }
        let (Some(topology), Some(view)) = (&session.topology, view) else {
            continue;
        };
        match view {
            Ok(Some(now)) if backend.failover_holds(&now) => {
                return "a primary failed and its replica is about to take over";
            }
            Ok(Some(now)) if union(&now.nodes, &now.failed) != topology.known => {
                return "the cluster's primaries changed";
            }
            Ok(Some(now)) if now.nodes.iter().any(|n| !topology.tracked.contains(n)) => {
                return "a primary that was not tracked takes writes";
            }
            Ok(Some(_)) => unreadable = 0,
            Ok(None) => return "the server is no longer a cluster",
            Err(_) => {
                unreadable += 1;
                if unreadable >= 3 {
                    return "the cluster's topology could not be read";
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

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn each_failover_is_waited_for_on_its_own_and_at_most_the_limit() {
        let limit = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut wait = FailoverWait::new(limit);
        assert!(!wait.holds(&[], None, at(0)));
        // A stuck failover: held, then given up after the limit.
        assert!(wait.holds(&nodes(&["p1"]), None, at(0)));
        assert!(wait.waiting(at(5)));
        assert!(wait.holds(&nodes(&["p1"]), None, at(9)));
        assert!(!wait.holds(&nodes(&["p1"]), None, at(10)));
        assert!(!wait.waiting(at(10)));
        // Another failover while the first is still stuck: waited for, not hidden by it.
        assert!(wait.holds(&nodes(&["p1", "p2"]), None, at(20)));
        assert!(wait.waiting(at(20)));
        // A view that does not list p1 for a moment (p1 itself, back) does not restart its
        // wait; p2 has taken over meanwhile.
        assert!(!wait.holds(&[], None, at(25)));
        assert!(!wait.holds(&nodes(&["p1"]), None, at(26)));
        // Forgotten once nobody has named it for the limit: a new failover of it is waited for.
        assert!(!wait.holds(&[], None, at(40)));
        assert!(wait.holds(&nodes(&["p1"]), None, at(41)));
    }

    #[test]
    fn a_failed_primarys_own_view_does_not_end_the_wait_for_it() {
        let limit = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut wait = FailoverWait::new(limit);
        assert!(wait.holds(&nodes(&["p1"]), None, at(0)));
        // p1, back, answers: it lists no failover, but the others still do.
        assert!(wait.holds(&[], Some("p1"), at(2)));
        assert!(!wait.holds(&[], Some("p2"), at(2)));
        assert!(wait.holds(&nodes(&["p1"]), Some("p2"), at(3)));
        // Not past the limit, and not once the others have stopped naming it for the limit.
        assert!(!wait.holds(&[], Some("p1"), at(10)));
        assert!(!wait.holds(&[], Some("p1"), at(30)));
    }

    #[test]
    fn a_zero_limit_never_holds_back() {
        let mut wait = FailoverWait::new(Duration::ZERO);
        let now = Instant::now();
        assert!(!wait.holds(&nodes(&["p1"]), None, now));
        assert!(!wait.waiting(now));
    }
}
