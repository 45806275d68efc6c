//! `RedisCache`: the typed async cache over Redis.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use ncm_cache_codec::{CompressionType, SerializationType, Serializer};
use ncm_cache_core::{Cache, CacheStrategy, Codec, Result, SharedBackend, TtlPolicy};

use crate::backend::RedisBackend;
use crate::config::{Compression, RedisConfig, SentinelConfig};
use crate::pipeline::{PipelineResult, RedisPipeline};

/// The async Redis cache (the original's `RedisCache`).
///
/// It dereferences to [`Cache<Serializer>`](ncm_cache_core::Cache), so every typed operation
/// is available directly: `get::<T>`, `set`, `set_with_ttl`, `delete`, `exists`, `get_ttl`,
/// `extend_ttl`, `get_many`, `set_many`, `delete_many`, `clear_pattern`, `read_through`,
/// `health_check`, `get_stats`, `close`. Cloning is cheap; clones share the connections.
///
/// ```no_run
/// use std::time::Duration;
/// use ncm_cache_core::CacheStrategy;
/// use ncm_cache_redis::RedisCache;
///
/// # async fn demo() -> ncm_cache_core::Result<()> {
/// let cache = RedisCache::builder()
///     .host("localhost")
///     .port(6379)
///     .db(0)
///     .default_ttl(Duration::from_secs(3600))
///     .strategy(CacheStrategy::CacheAside)
///     .build()
///     .await?;
/// cache.set("user:123", &serde_json::json!({"name": "John", "email": "john@example.com"})).await?;
/// let user: Option<serde_json::Value> = cache.get("user:123").await?;
/// cache.delete("user:123").await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RedisCache {
    backend: Arc<RedisBackend>,
    cache: Cache<Serializer>,
}

impl Deref for RedisCache {
    type Target = Cache<Serializer>;
    fn deref(&self) -> &Self::Target {
        &self.cache
    }
}

impl RedisCache {
    /// A builder starting from [`RedisConfig::default`].
    pub fn builder() -> RedisCacheBuilder {
        RedisCacheBuilder {
            config: RedisConfig::default(),
        }
    }

    /// Connects with a configuration.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let serializer = serializer_for(&config)?;
        let ttl = TtlPolicy::new(config.default_ttl);
        let max_value_size = config.max_value_size;
        let backend = Arc::new(RedisBackend::connect(config).await?);
        let cache = Cache::builder_shared(Arc::clone(&backend) as SharedBackend, serializer)
            .ttl_policy(ttl)
            .max_value_size(max_value_size)
            .build();
        Ok(Self { backend, cache })
    }

    /// Connects to a `redis://` / `rediss://` URL (see [`RedisConfig::from_url`]).
    pub async fn from_url(url: &str) -> Result<Self> {
        Self::connect(RedisConfig::from_url(url)?).await
    }

    /// The byte-level backend, shareable as `Arc<dyn CacheBackend>` (e.g. as an L2).
    pub fn backend(&self) -> SharedBackend {
        Arc::clone(&self.backend) as SharedBackend
    }

    /// The concrete backend.
    pub fn redis_backend(&self) -> &Arc<RedisBackend> {
        &self.backend
    }

    /// The typed cache this dereferences to.
    pub fn cache(&self) -> &Cache<Serializer> {
        &self.cache
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisConfig {
        self.backend.config()
    }

    /// Starts a pipeline: commands added to it go to Redis in one round trip when passed to
    /// [`execute_pipeline`](Self::execute_pipeline).
    pub fn pipeline(&self) -> RedisPipeline {
        RedisPipeline::new(
            self.cache.codec().clone(),
            self.config().key_prefix.clone(),
            self.cache.ttl_policy(),
        )
    }

    /// Decodes the result of a pipelined `get` of `key` (the key given to
    /// [`RedisPipeline::get`]); with a signing codec the value must be bound to that key.
    pub fn decode_result<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        result: &PipelineResult,
    ) -> Result<Option<T>> {
        result.decode_with(|bytes| {
            self.cache
                .codec()
                .decode_for(&[&self.config().key_prefix, key], bytes)
        })
    }

    /// Runs a pipeline; one result per command, in order.
    ///
    /// A pipeline is not a transaction: `Err` when any command failed (a `get` of a key that
    /// holds a hash, a connection lost midway) — the other commands, before and after it, may
    /// have been applied all the same (on a cluster, each slot's group is its own round trip,
    /// sent as `MULTI`/`EXEC` so that a slot being migrated refuses it before running any of
    /// it; it is then sent command by command, in order, each to where its key now lives).
    /// Use a Lua script (`RedisBackend::eval_script`) for all-or-nothing.
    pub async fn execute_pipeline(&self, pipeline: RedisPipeline) -> Result<Vec<PipelineResult>> {
        pipeline.execute(&self.backend).await
    }
}

pub(crate) fn serializer_for(config: &RedisConfig) -> Result<Serializer> {
    let compression = config.compression.algorithm();
    let mut b = Serializer::builder()
        .format(config.serialization)
        .compression(compression)
        .compression_threshold(config.compression_threshold);
    if let Some(level) = config.compression_level {
        b = b.level(level);
    }
    if let Some(key) = &config.signing_key {
        b = b.signing_key(key);
    }
    // Without a signing key, `build` reports verification keys as a misconfiguration.
    b.verification_keys(&config.verification_keys)
        .signature_mode(config.signature_mode)
        .build()
}

/// Builds a [`RedisCache`]; every option of [`RedisConfig`] has a method.
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisCacheBuilder {
    config: RedisConfig,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.config.$name = value;
                self
            }
        )*
    };
}

impl RedisCacheBuilder {
    /// Server host.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.config.host = host.into();
        self
    }

    /// Key prefix.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.key_prefix = prefix.into();
        self
    }

    /// Name in stats and metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    setters! {
        /// Server port.
        port: u16,
        /// Database index.
        db: i64,
        /// Connections to a single node: the pool's, and the read batches' own (one of them).
        max_connections: usize,
        /// Retry reads once after a timeout.
        retry_on_timeout: bool,
        /// Automatic batching of concurrent gets and sets (default true).
        auto_batch: bool,
        /// Read batches on a connection of their own (default true; single node, plain TCP).
        batch_socket: bool,
        /// TCP keepalive.
        socket_keepalive: bool,
        /// TCP_NODELAY.
        tcp_nodelay: bool,
        /// TCP keepalive tuning.
        socket_keepalive_options: crate::config::KeepaliveOptions,
        /// Serialization format.
        serialization: SerializationType,
        /// Strategy label.
        strategy: CacheStrategy,
        /// Connect timeout.
        connect_timeout: Duration,
        /// Per-command timeout.
        response_timeout: Duration,
        /// TLS (requires the `tls` feature).
        tls: bool,
        /// Accept invalid TLS certificates (tests only).
        tls_insecure: bool,
        /// Values below this size are not compressed.
        compression_threshold: usize,
        /// Maximum encoded value size.
        max_value_size: usize,
    }

    /// Starts from a full configuration.
    pub fn config(mut self, config: RedisConfig) -> Self {
        self.config = config;
        self
    }

    /// Starts from a URL; later calls override its options.
    pub fn url(mut self, url: &str) -> Result<Self> {
        self.config = RedisConfig::from_url(url)?;
        Ok(self)
    }

    /// Trusts this CA certificate (PEM file) for `rediss://`; see [`RedisConfig::tls_ca_file`].
    pub fn tls_ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.tls_ca_file = Some(path.into());
        self
    }

    /// ACL username.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.config.username = Some(username.into());
        self
    }

    /// Password.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.config.password = Some(password.into());
        self
    }

    /// Background health check interval (`None`: off).
    pub fn health_check_interval(mut self, every: impl Into<Option<Duration>>) -> Self {
        self.config.health_check_interval = every.into();
        self
    }

    /// Cluster with client tracking: the longest L1 stays off waiting for a failed primary's
    /// replica to take over (default 15 s; see [`RedisConfig::cluster_failover_wait`]).
    pub fn cluster_failover_wait(mut self, wait: Duration) -> Self {
        self.config.cluster_failover_wait = wait;
        self
    }

    /// Default TTL of `set` (`None`: no expiry).
    pub fn default_ttl(mut self, ttl: impl Into<Option<Duration>>) -> Self {
        self.config.default_ttl = ttl.into();
        self
    }

    /// Compression: `true`/`false` (as in the original) or a [`CompressionType`].
    pub fn compression(mut self, compression: impl IntoCompression) -> Self {
        self.config.compression = compression.into_compression();
        self
    }

    /// Compression level.
    pub fn compression_level(mut self, level: i32) -> Self {
        self.config.compression_level = Some(level);
        self
    }

    /// Signs every stored value with HMAC-SHA256 under `key` and reads only values signed with
    /// it (see [`RedisConfig::signing_key`]); at least 16 bytes.
    pub fn signing_key(mut self, key: impl Into<String>) -> Self {
        self.config.signing_key = Some(key.into());
        self
    }

    /// How signatures are bound to keys (see [`RedisConfig::signature_mode`]).
    pub fn signature_mode(mut self, mode: ncm_cache_codec::SignatureMode) -> Self {
        self.config.signature_mode = mode;
        self
    }

    /// Previous signing keys still accepted on read (key rotation; see
    /// [`RedisConfig::verification_keys`]).
    pub fn verification_keys<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.verification_keys = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Connect to a Redis Cluster through these seed nodes (`host:port`).
    pub fn cluster_nodes<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.cluster_nodes = nodes.into_iter().map(Into::into).collect();
        self
    }

    /// Connect through Sentinel.
    pub fn sentinel<I, S>(mut self, master_name: impl Into<String>, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.sentinel = Some(SentinelConfig {
            master_name: master_name.into(),
            nodes: nodes.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// The configuration built so far.
    pub fn as_config(&self) -> &RedisConfig {
        &self.config
    }

    /// Connects.
    pub async fn build(self) -> Result<RedisCache> {
        RedisCache::connect(self.config).await
    }

    /// Builds a blocking [`RedisSyncCache`](crate::RedisSyncCache) with this configuration.
    pub fn build_sync(self) -> Result<crate::RedisSyncCache> {
        crate::RedisSyncCache::connect(self.config)
    }
}

/// Things [`RedisCacheBuilder::compression`] accepts.
pub trait IntoCompression {
    /// The setting.
    fn into_compression(self) -> Compression;
}

impl IntoCompression for bool {
    fn into_compression(self) -> Compression {
        Compression::Enabled(self)
    }
}

impl IntoCompression for CompressionType {
    fn into_compression(self) -> Compression {
        Compression::Algorithm(self)
    }
}

impl IntoCompression for Compression {
    fn into_compression(self) -> Compression {
        self
    }
}
