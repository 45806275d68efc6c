//! What the server can do, probed once at connect: RESP3, client tracking, sharded pub/sub,
//! hash-field expiry, functions, and the server's kind and version. Managed services and
//! hardened setups rename or disable commands; the cache uses what is there and says why it
//! does without the rest ([`RedisBackend::capabilities`], `health_report`).

use std::fmt;

use ncm_cache_core::{CacheError, Result};
use redis::Value;
use serde::Serialize;

use crate::backend::RedisBackend;
use crate::config::RedisConfig;

/// The server's capabilities as probed at connect (on the primary, or one cluster node).
///
/// ```no_run
/// # async fn demo(redis: ncm_cache_redis::RedisBackend) {
/// let caps = redis.capabilities();
/// if !caps.client_tracking {
///     println!("no client tracking: {:?}", caps.notes);
/// }
/// println!("{caps}"); // e.g. "redis 7.0.15: RESP3, client tracking, sharded pub/sub, functions"
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// `redis`, `valkey`, or what `INFO server` names (empty if it could not be read).
    pub server: String,
    /// The server's version (`redis_version` / `valkey_version`).
    pub version: String,
    /// `HELLO 3` accepted.
    pub resp3: bool,
    /// `CLIENT TRACKING` usable (RESP3 and the command allowed).
    pub client_tracking: bool,
    /// `SPUBLISH` / `SSUBSCRIBE` (Redis 7+).
    pub sharded_pubsub: bool,
    /// `HEXPIRE` (Redis 7.4+).
    pub hash_field_expiry: bool,
    /// `FUNCTION` usable.
    pub functions: bool,
    /// Why each missing capability is missing (a refused, renamed or unknown command).
    pub notes: Vec<String>,
    /// The server refused client tracking for certain (an unknown, renamed or forbidden
    /// command, no RESP3) — not merely a probe that failed or timed out.
    pub tracking_refused: bool,
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = if self.server.is_empty() {
            "unknown server"
        } else {
            &self.server
        };
        write!(f, "{server} {}:", self.version)?;
        let mut any = false;
        for (on, name) in [
            (self.resp3, "RESP3"),
            (self.client_tracking, "client tracking"),
            (self.sharded_pubsub, "sharded pub/sub"),
            (self.hash_field_expiry, "hash-field expiry"),
            (self.functions, "functions"),
        ] {
            if on {
                write!(f, "{} {name}", if any { "," } else { "" })?;
                any = true;
            }
        }
        if !any {
            write!(f, " none of the optional commands")?;
        }
        if !self.notes.is_empty() {
            write!(f, " (missing: {})", self.notes.join("; "))?;
        }
        Ok(())
    }
}

impl RedisBackend {
    /// The capabilities probed at connect.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner().capabilities
    }
}

/// Probes the server behind `config` (its primary, or its first reachable cluster seed). Never
/// fails the connect: what cannot be probed counts as missing, with the reason in `notes`.
pub(crate) async fn probe(config: &RedisConfig) -> Capabilities {
    let mut caps = Capabilities::default();
    let timeout = config.connect_timeout + config.response_timeout;
    let work = async {
        // The first node that answers (a cluster's first seed may be down).
        let seeds = config.cluster_nodes.len().max(1);
        let mut last = None;
        for attempt in 0..seeds {
            let url = crate::pubsub::node_url(config, attempt).await?;
            match connect(config, &url, false).await {
                Ok(resp2) => {
                    probe_with(&mut caps, config, &url, resp2).await;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(CacheError::Closed))
    };
    match tokio::time::timeout(timeout * 2, work).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => caps.notes.push(format!("probe failed: {e}")),
        Err(_) => caps
            .notes
            .push(format!("probe timed out after {:?}", timeout * 2)),
    }
    // Not louder: what the cache would use and cannot is logged where it falls back.
    tracing::debug!(capabilities = %caps, "Redis capabilities");
    caps
}

async fn connect(
    config: &RedisConfig,
    url: &str,
    resp3: bool,
) -> Result<redis::aio::MultiplexedConnection> {
    connect_raw(config, url, resp3)
        .await
        .map_err(|e| crate::error::map_err("capability probe", e, config.connect_timeout))
}

async fn connect_raw(
    config: &RedisConfig,
    url: &str,
    resp3: bool,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    let info = if resp3 {
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        info.set_redis_settings(settings)
    } else {
        info
    };
    let info = info.set_tcp_settings(crate::conn::tcp_settings(config));
    let client = crate::conn::open_client(config, info, "capability probe").map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "capability probe",
            e.to_string(),
        ))
    })?;
    let conn_config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.response_timeout));
    client
        .get_multiplexed_async_connection_with_config(&conn_config)
        .await
}

async fn probe_with(
    caps: &mut Capabilities,
    config: &RedisConfig,
    url: &str,
    mut conn: redis::aio::MultiplexedConnection,
) {
    match redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(&mut conn)
        .await
    {
        Ok(info) => {
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
            };
            if let Some(v) = field("valkey_version:") {
                caps.server = "valkey".into();
                caps.version = v;
            } else {
                caps.server = field("server_name:").unwrap_or_else(|| "redis".into());
                caps.version = field("redis_version:").unwrap_or_default();
            }
        }
        Err(e) => caps.notes.push(format!("INFO server: {e}")),
    }
    // Commands the server knows (a renamed or disabled one is unknown to COMMAND INFO).
    let known = |name: &'static str| {
        let mut conn = conn.clone();
        async move {
            match redis::cmd("COMMAND")
                .arg("INFO")
                .arg(name)
                .query_async::<Vec<Value>>(&mut conn)
                .await
            {
                Ok(v) => Ok(!matches!(v.first(), None | Some(Value::Nil))),
                Err(e) => Err(format!("COMMAND INFO {name}: {e}")),
            }
        }
    };
    match known("spublish").await {
        Ok(true) => caps.sharded_pubsub = true,
        Ok(false) => caps
            .notes
            .push("sharded pub/sub: SPUBLISH unknown (Redis 7+)".into()),
        Err(e) => caps.notes.push(e),
    }
    match known("hexpire").await {
        Ok(true) => caps.hash_field_expiry = true,
        Ok(false) => caps
            .notes
            .push("hash-field expiry: HEXPIRE unknown (Redis 7.4+)".into()),
        Err(e) => caps.notes.push(e),
    }
    match redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg("__ncm_probe__")
        .query_async::<Value>(&mut conn)
        .await
    {
        Ok(_) => caps.functions = true,
        Err(e) => caps
            .notes
            .push(format!("functions: FUNCTION LIST refused ({e})")),
    }
    // RESP3, and client tracking as the cache would turn it on (broadcast, the key prefix),
    // on a connection dropped right after.
    match connect_raw(config, url, true).await {
        Ok(mut resp3) => {
            caps.resp3 = true;
            let mut cmd = redis::cmd("CLIENT");
            cmd.arg("TRACKING").arg("ON").arg("BCAST");
            if !config.key_prefix.is_empty() {
                cmd.arg("PREFIX").arg(&config.key_prefix);
            }
            match cmd.query_async::<Value>(&mut resp3).await {
                Ok(_) => caps.client_tracking = true,
                Err(e) => {
                    let e =
                        crate::tracking::refused_or(e, "client tracking", config.response_timeout);
                    caps.tracking_refused = matches!(e, CacheError::Config(_));
                    caps.notes.push(format!("client tracking: {e}"));
                }
            }
        }
        Err(e) => {
            let e = crate::tracking::refused_or(e, "RESP3", config.connect_timeout);
            caps.tracking_refused = matches!(e, CacheError::Config(_));
            caps.notes.push(format!("RESP3: {e}"));
            caps.notes.push("client tracking: needs RESP3".into());
        }
    }
}
