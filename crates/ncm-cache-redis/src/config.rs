//! `RedisConfig`: every option of the original, from serde, a URL, or a builder.

use std::fmt;
use std::time::Duration;

use ncm_cache_codec::{CompressionType, SerializationType};
use ncm_cache_core::{CacheError, CacheStrategy, Result, parse_duration, serde_duration};
use serde::{Deserialize, Serialize};

/// TCP keepalive tuning (the original's `socket_keepalive_options`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeepaliveOptions {
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    #[serde(with = "serde_duration::option")]
    pub idle: Option<Duration>,
    /// Time between probes (`TCP_KEEPINTVL`).
    #[serde(with = "serde_duration::option")]
    pub interval: Option<Duration>,
    /// Probes before the connection is dropped (`TCP_KEEPCNT`).
    pub count: Option<u32>,
}

/// Compression setting: `true`/`false` as in the original, or an algorithm by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Compression {
    /// `true` compresses large values with the default algorithm (LZ4), `false` never.
    Enabled(bool),
    /// A specific algorithm.
    Algorithm(CompressionType),
}

impl Default for Compression {
    fn default() -> Self {
        Self::Enabled(false)
    }
}

impl Compression {
    /// The algorithm to use.
    pub fn algorithm(self) -> CompressionType {
        match self {
            Self::Enabled(false) => CompressionType::None,
            Self::Enabled(true) => CompressionType::Lz4,
            Self::Algorithm(a) => a,
        }
    }
}

/// Connection through Redis Sentinel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The monitored master's name (`sentinel monitor <name> ...`).
    pub master_name: String,
    /// Sentinel addresses, `host:port` or `redis://host:port`.
    pub nodes: Vec<String>,
}

/// The configuration of a [`RedisCache`](crate::RedisCache) or
/// [`RedisSyncCache`](crate::RedisSyncCache).
///
/// Deserializable (durations as seconds or `"30s"`, `"1h"`), buildable from a URL, and
/// adjustable with the `with_*` methods or [`RedisCache::builder`](crate::RedisCache::builder).
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_redis::RedisConfig;
/// let config = RedisConfig::from_url("redis://:secret@localhost:6380/2?key_prefix=ncm:&default_ttl=1h").unwrap();
/// assert_eq!(config.port, 6380);
/// assert_eq!(config.db, 2);
/// assert_eq!(config.password.as_deref(), Some("secret"));
/// assert_eq!(config.key_prefix, "ncm:");
/// assert_eq!(config.default_ttl, Some(Duration::from_secs(3600)));
///
/// let json = r#"{"host": "redis", "max_connections": 8, "response_timeout": "250ms", "compression": "zstd"}"#;
/// let config: RedisConfig = serde_json::from_str(json).unwrap();
/// assert_eq!(config.response_timeout, Duration::from_millis(250));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Server host (default `127.0.0.1`).
    pub host: String,
    /// Server port (default 6379).
    pub port: u16,
    /// Database index (default 0; ignored by Cluster).
    pub db: i64,
    /// ACL username (Redis 6+); `None` uses `default`.
    pub username: Option<String>,
    /// Password (never printed by `Debug`).
    pub password: Option<String>,
    /// Connections to a single node (default 2, at most 1024): the pool's multiplexed
    /// connections and, with [`batch_socket`](Self::batch_socket) (the default), the read
    /// batches' own connection, one of them. Each carries many concurrent requests,
    /// pipelined; more connections rarely help on a single server. The pool's speak RESP3
    /// where the server has `HELLO` (Redis 6+; RESP2 otherwise), so a connection the server
    /// closes (its `timeout`, a load balancer) is reconnected at once rather than failing
    /// the next call on it.
    pub max_connections: usize,
    /// Retry a read once when it timed out (default true); a delete or a TTL change is retried
    /// only on the connection of its first try (behind it, so it cannot be reordered with a
    /// later write). Other writes are never retried.
    pub retry_on_timeout: bool,
    /// Automatic batching (default true): concurrent `get`s share one `MGET`, concurrent
    /// `set`s one pipeline, with no timer (an idle connection sends at once); on a cluster,
    /// concurrent `get`s go as one pipeline per primary and `set`s are not batched. See
    /// docs/BENCHMARKS.md for where it wins and where it costs.
    pub auto_batch: bool,
    /// Read batches on a connection of their own (default true): with `auto_batch` on a
    /// single node over plain TCP and `max_connections` of at least 2, batched reads go on one
    /// socket the batcher writes and reads itself (RESP2, connected again on demand, closed at
    /// any doubt), counted as one of the `max_connections`, instead of through the pool's
    /// redis-rs connections: more reads per second under concurrency, most with larger values
    /// (docs/BENCHMARKS.md, issue 21). Writes always go on the pool's (docs/ARCHITECTURE.md
    /// says why), and so do TLS, Sentinel and Cluster. `false` (URL `batch_socket=false`)
    /// keeps every call on the pool. See docs/ARCHITECTURE.md (`wire.rs`).
    pub batch_socket: bool,
    /// Enable TCP keepalive (default true).
    pub socket_keepalive: bool,
    /// Disable Nagle's algorithm (default true): lowest latency per call. `false` lets the
    /// kernel coalesce small writes, which can raise throughput under heavy concurrency at the
    /// cost of latency for sequential calls.
    pub tcp_nodelay: bool,
    /// Keepalive tuning.
    pub socket_keepalive_options: KeepaliveOptions,
    /// How often the background health check pings the server (default 30 s; `None`: off).
    #[serde(with = "serde_duration::option")]
    pub health_check_interval: Option<Duration>,
    /// Prefix put in front of every key (default empty). Pattern operations stay inside it.
    pub key_prefix: String,
    /// TTL of `set` without an explicit TTL (default 1 h; `None`: no expiry).
    #[serde(with = "serde_duration::option")]
    pub default_ttl: Option<Duration>,
    /// Serialization format of the typed API (default JSON).
    pub serialization: SerializationType,
    /// Compression of large values (default off).
    pub compression: Compression,
    /// Compression level (algorithm default when `None`).
    pub compression_level: Option<i32>,
    /// Values smaller than this are not compressed (default 1024 bytes).
    pub compression_threshold: usize,
    /// HMAC-SHA256 key signing every stored value (default `None`: unsigned; never printed by
    /// `Debug`). With a key, values not signed with it — written by anyone without the key, or
    /// altered in Redis — read as misses, are counted in `codec_errors` and are deleted. At
    /// least 16 bytes (use 32 random bytes); the string's bytes are the key. See
    /// [`SerializerBuilder::signing_key`](ncm_cache_codec::SerializerBuilder::signing_key) for
    /// the exact semantics and the rollout.
    pub signing_key: Option<String>,
    /// Previous signing keys still accepted on read, for key rotation (default empty; never
    /// printed by `Debug`). Only used with a `signing_key`.
    pub verification_keys: Vec<String>,
    /// How signatures are bound to the keys values are stored under (default key-bound; config
    /// files: `"key_bound"`, `"migrating"`, `"unbound"`). Only used with a `signing_key`; see
    /// [`SignatureMode`](ncm_cache_codec::SignatureMode) and docs/configuration.md for the
    /// upgrade from builds before key binding.
    pub signature_mode: ncm_cache_codec::SignatureMode,
    /// The caching strategy label of this cache (informational, as in the original).
    pub strategy: CacheStrategy,
    /// Time allowed to establish a connection (default 2 s).
    #[serde(with = "serde_duration")]
    pub connect_timeout: Duration,
    /// Time allowed for one command's reply (default 1 s). Every call is bounded by it.
    #[serde(with = "serde_duration")]
    pub response_timeout: Duration,
    /// Cluster with client tracking: how long L1 stays off while a failed primary's replica has
    /// not taken over yet (default 15 s), counted for each failover from when this instance
    /// first saw it. Past it, a warning is logged and the surviving primaries are tracked; a
    /// replica promoted later is then caught by the next topology read (its writes can go
    /// unseen for up to about `health_check_interval`, at most 1 s, plus twice
    /// `response_timeout`).
    #[serde(with = "serde_duration")]
    pub cluster_failover_wait: Duration,
    /// Use TLS (`rediss://`); requires the `tls` feature.
    pub tls: bool,
    /// Accept invalid certificates and host names (tests only).
    pub tls_insecure: bool,
    /// Trust this CA certificate (a PEM file) for `rediss://` instead of only the system's
    /// trust store — for servers with a private CA (single-node connections, async, blocking
    /// and pub/sub; a cluster or Sentinel uses the system trust store and rejects this option).
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Cluster seed nodes (`host:port`); when non-empty, connects to a Redis Cluster.
    pub cluster_nodes: Vec<String>,
    /// Connect through Sentinel.
    pub sentinel: Option<SentinelConfig>,
    /// Name of the cache in stats and metrics (default `redis`).
    pub name: String,
    /// Reject encoded values larger than this (default 512 MiB, Redis's limit).
    pub max_value_size: usize,
    /// Maximum key length in bytes, prefix excluded (default 4096).
    pub max_key_len: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 6379,
            db: 0,
            username: None,
            password: None,
            max_connections: 2,
            retry_on_timeout: true,
            auto_batch: true,
            batch_socket: true,
            socket_keepalive: true,
            tcp_nodelay: true,
            socket_keepalive_options: KeepaliveOptions::default(),
            health_check_interval: Some(Duration::from_secs(30)),
            key_prefix: String::new(),
            default_ttl: Some(Duration::from_secs(3600)),
            serialization: SerializationType::default(),
            compression: Compression::default(),
            compression_level: None,
            compression_threshold: 1024,
            signing_key: None,
            verification_keys: Vec::new(),
            signature_mode: ncm_cache_codec::SignatureMode::KeyBound,
            strategy: CacheStrategy::CacheAside,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(1),
            cluster_failover_wait: Duration::from_secs(15),
            tls: false,
            tls_insecure: false,
            tls_ca_file: None,
            cluster_nodes: Vec::new(),
            sentinel: None,
            name: "redis".into(),
            max_value_size: 512 * 1024 * 1024,
            max_key_len: ncm_cache_core::DEFAULT_MAX_KEY_LEN,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("max_connections", &self.max_connections)
            .field("key_prefix", &self.key_prefix)
            .field("default_ttl", &self.default_ttl)
            .field("serialization", &self.serialization)
            .field("compression", &self.compression)
            .field(
                "signing_key",
                &self.signing_key.as_ref().map(|_| "<redacted>"),
            )
            .field("verification_keys", &self.verification_keys.len())
            .field("signature_mode", &self.signature_mode)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("cluster_failover_wait", &self.cluster_failover_wait)
            .field("tls", &self.tls)
            .field("cluster_nodes", &self.cluster_nodes)
            .field("sentinel", &self.sentinel)
            .field("name", &self.name)
            .field("auto_batch", &self.auto_batch)
            .field("batch_socket", &self.batch_socket)
            .finish_non_exhaustive()
    }
}

/// The most connections [`RedisConfig::max_connections`] may ask for.
pub(crate) const MAX_CONNECTIONS: usize = 1024;

impl RedisConfig {
    /// Parses `redis://[user][:password@]host[:port][/db][?option=value&...]` (or `rediss://`
    /// for TLS). Query options: `key_prefix`, `default_ttl`, `max_connections`,
    /// `connect_timeout`, `response_timeout`, `health_check_interval`, `cluster_failover_wait`,
    /// `name`, `serialization`, `compression`, `insecure`, `auto_batch`, `batch_socket`. Unknown options are
    /// rejected.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| CacheError::Config(format!("invalid Redis URL: {e}")))?;
        let mut c = Self::default();
        match parsed.scheme() {
            "redis" => {}
            "rediss" => c.tls = true,
            other => {
                return Err(CacheError::Config(format!(
                    "unsupported URL scheme {other:?} (use redis:// or rediss://)"
                )));
            }
        }
        if let Some(host) = parsed.host_str() {
            c.host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
        }
        if let Some(port) = parsed.port() {
            c.port = port;
        }
        if !parsed.username().is_empty() {
            c.username = Some(decode(parsed.username()));
        }
        c.password = parsed.password().map(decode);
        let path = parsed.path().trim_matches('/');
        if !path.is_empty() {
            c.db = path
                .parse()
                .map_err(|_| CacheError::Config(format!("invalid database {path:?} in URL")))?;
        }
        for (k, v) in parsed.query_pairs() {
            c.apply_option(&k, &v)?;
        }
        Ok(c)
    }

    fn apply_option(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |what: &str| CacheError::Config(format!("invalid {what} {value:?} in URL"));
        match key {
            "key_prefix" | "prefix" => self.key_prefix = value.to_owned(),
            "default_ttl" => self.default_ttl = Some(parse_duration(value)?),
            "max_connections" => {
                self.max_connections = value.parse().map_err(|_| bad("max_connections"))?;
            }
            "auto_batch" => self.auto_batch = value.parse().map_err(|_| bad("auto_batch"))?,
            "batch_socket" => {
                self.batch_socket = value.parse().map_err(|_| bad("batch_socket"))?;
            }
            "connect_timeout" => self.connect_timeout = parse_duration(value)?,
            "response_timeout" | "timeout" => self.response_timeout = parse_duration(value)?,
            // 0 turns it off, as in redis-py.
            "health_check_interval" => {
                self.health_check_interval = Some(parse_duration(value)?).filter(|d| !d.is_zero());
            }
            "cluster_failover_wait" => self.cluster_failover_wait = parse_duration(value)?,
            "name" => self.name = value.to_owned(),
            "serialization" => self.serialization = value.parse()?,
            "compression" => {
                self.compression = match value {
                    "true" => Compression::Enabled(true),
                    "false" => Compression::Enabled(false),
                    other => Compression::Algorithm(other.parse()?),
                }
            }
            "insecure" => self.tls_insecure = value == "true" || value == "1",
            other => {
                return Err(CacheError::Config(format!(
                    "unknown Redis URL option {other:?}"
                )));
            }
        }
        Ok(())
    }

    /// Checks the configuration for contradictions.
    pub fn validate(&self) -> Result<()> {
        if self.max_connections == 0 {
            return Err(CacheError::Config(
                "max_connections must be at least 1".into(),
            ));
        }
        // Every connection is opened at start (the async pool) or may be (the blocking one):
        // a huge number is a mistake, and `usize::MAX` panicked sizing the pool (review,
        // helper-83 #2).
        if self.max_connections > MAX_CONNECTIONS {
            return Err(CacheError::Config(format!(
                "max_connections must be at most {MAX_CONNECTIONS} (it is {}); each is a multiplexed connection carrying many requests",
                self.max_connections
            )));
        }
        if self.response_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(CacheError::Config(
                "timeouts must be greater than zero".into(),
            ));
        }
        if !self.cluster_nodes.is_empty() && self.sentinel.is_some() {
            return Err(CacheError::Config(
                "cluster_nodes and sentinel are mutually exclusive".into(),
            ));
        }
        if self.tls && !cfg!(feature = "tls") {
            return Err(CacheError::Config(
                "TLS requested but ncm-cache-redis was built without the `tls` feature".into(),
            ));
        }
        if self.health_check_interval.is_some_and(|d| d.is_zero()) {
            return Err(CacheError::Config(
                "health_check_interval must be greater than zero (None turns health checks off)"
                    .into(),
            ));
        }
        if self.default_ttl.is_some_and(|t| t.is_zero()) {
            return Err(CacheError::Config(
                "default_ttl must be greater than zero".into(),
            ));
        }
        Ok(())
    }

    /// The configuration with every wait at most [`ncm_cache_core::MAX_WAIT`] (about 30
    /// years): `Duration::MAX` means "no bound" to a user, and an overflow to the deadline
    /// arithmetic. Applied when a connection is made.
    pub(crate) fn capped(mut self) -> Self {
        use ncm_cache_core::capped;
        self.connect_timeout = capped(self.connect_timeout);
        self.response_timeout = capped(self.response_timeout);
        self.cluster_failover_wait = capped(self.cluster_failover_wait);
        self.health_check_interval = self.health_check_interval.map(capped);
        self
    }

    /// The URLs (credentials included) of the configured cluster seed nodes, which may be
    /// written `host:port`, `redis://host:port` or `rediss://host:port`.
    pub(crate) fn cluster_node_urls(&self) -> Vec<String> {
        self.cluster_seeds()
            .iter()
            .map(|(host, port)| self.node_url(host, *port))
            .collect()
    }

    /// The host and port of each of `cluster_nodes`.
    pub(crate) fn cluster_seeds(&self) -> Vec<(String, u16)> {
        self.cluster_nodes
            .iter()
            .map(|n| {
                let n = n
                    .trim_start_matches("redis://")
                    .trim_start_matches("rediss://")
                    .trim_end_matches('/');
                let (host, port) = n.rsplit_once(':').unwrap_or((n, "6379"));
                (host.to_owned(), port.parse().unwrap_or(6379))
            })
            .collect()
    }

    /// Whether read batches go on a connection of their own (`batch_socket`; see `wire.rs`): with
    /// `auto_batch`, on a single node over plain TCP, and with `max_connections` of at least 2
    /// (that connection is one of them).
    pub(crate) fn batches_on_own_socket(&self) -> bool {
        self.auto_batch
            && self.batch_socket
            && !self.tls
            && self.cluster_nodes.is_empty()
            && self.sentinel.is_none()
            && self.max_connections >= 2
    }

    /// The `redis://` URL of the configured single node (credentials included).
    pub(crate) fn node_url(&self, host: &str, port: u16) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(p)) => format!("{}:{}@", encode(u), encode(p)),
            (None, Some(p)) => format!(":{}@", encode(p)),
            (Some(u), None) => format!("{}@", encode(u)),
            (None, None) => String::new(),
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let insecure = if self.tls && self.tls_insecure {
            "#insecure"
        } else {
            ""
        };
        format!("{scheme}://{auth}{host}:{port}/{}{insecure}", self.db)
    }
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_round_trip_and_options() {
        let c = RedisConfig::from_url(
            "rediss://alice:p%40ss@example.com:7000/3?name=users&compression=true&insecure=1",
        )
        .unwrap();
        assert!(c.tls && c.tls_insecure);
        assert_eq!(c.username.as_deref(), Some("alice"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert_eq!((c.host.as_str(), c.port, c.db), ("example.com", 7000, 3));
        assert_eq!(c.compression.algorithm(), CompressionType::Lz4);
        assert_eq!(c.name, "users");
        assert!(
            c.node_url("h", 1)
                .starts_with("rediss://alice:p%40ss@h:1/3")
        );
        assert!(RedisConfig::from_url("http://x").is_err());
        assert!(RedisConfig::from_url("redis://x/?bogus=1").is_err());
        assert!(RedisConfig::from_url("redis://x/notanumber").is_err());
    }

    #[test]
    fn debug_redacts_the_password() {
        let c = RedisConfig {
            password: Some("hunter2".into()),
            ..RedisConfig::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn signing_keys_deserialize_are_redacted_and_reach_the_serializer() {
        let c: RedisConfig = serde_json::from_str(
            r#"{"signing_key": "s3cret-signing-key-0123", "verification_keys": ["old-s3cret-key-456789"]}"#,
        )
        .unwrap();
        assert_eq!(c.signing_key.as_deref(), Some("s3cret-signing-key-0123"));
        assert_eq!(c.verification_keys.len(), 1);
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(crate::cache::serializer_for(&c).unwrap().is_signing());
        assert!(
            !crate::cache::serializer_for(&RedisConfig::default())
                .unwrap()
                .is_signing()
        );
        let short = RedisConfig {
            signing_key: Some("short".into()),
            ..RedisConfig::default()
        };
        let err = crate::cache::serializer_for(&short).unwrap_err();
        assert!(matches!(err, CacheError::Config(_)), "{err}");
    }

    #[test]
    fn validation_catches_contradictions() {
        let mut c = RedisConfig::default();
        assert!(c.validate().is_ok());
        c.max_connections = 0;
        assert!(c.validate().is_err());
        // Not a panic sizing the pool (review, helper-83 #2).
        c.max_connections = usize::MAX;
        assert!(matches!(c.validate(), Err(CacheError::Config(_))));
        let url = format!("redis://h/?max_connections={}", usize::MAX);
        assert!(matches!(
            RedisConfig::from_url(&url).unwrap().validate(),
            Err(CacheError::Config(_))
        ));
        c.max_connections = MAX_CONNECTIONS;
        assert!(c.validate().is_ok());
        c.max_connections = 1;
        c.cluster_nodes = vec!["127.0.0.1:7000".into()];
        c.sentinel = Some(SentinelConfig {
            master_name: "m".into(),
            nodes: vec![],
        });
        assert!(c.validate().is_err());
    }
}
