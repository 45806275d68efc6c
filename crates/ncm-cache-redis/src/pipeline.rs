//! A typed pipeline: many commands, one round trip, one result per command.

use std::time::Duration;

use futures_util::future::try_join_all;
use ncm_cache_codec::Serializer;
use ncm_cache_core::{Bytes, CacheError, Codec, Expiry, KeyTtl, Operation, Result, TtlPolicy};
use redis::{Cmd, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::{RedisBackend, parse};
use crate::commands;
use crate::conn::group_by_slot;

#[derive(Debug, Clone)]
enum Op {
    Set {
        key: String,
        value: Bytes,
        ttl: Option<Duration>,
    },
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
    Exists {
        key: String,
    },
    Expire {
        key: String,
        ttl: Duration,
    },
    Ttl {
        key: String,
    },
}

impl Op {
    fn key(&self) -> &str {
        match self {
            Op::Set { key, .. }
            | Op::Get { key }
            | Op::Delete { key }
            | Op::Exists { key }
            | Op::Expire { key, .. }
            | Op::Ttl { key } => key,
        }
    }
}

/// The result of one pipelined command.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PipelineResult {
    /// A write succeeded.
    Done,
    /// A read's raw value (`None`: missing). Decode it with [`PipelineResult::decode`].
    Value(Option<Bytes>),
    /// `delete` / `exists` / `expire`: whether the key existed.
    Bool(bool),
    /// `ttl`: the key's TTL.
    Ttl(KeyTtl),
}

impl PipelineResult {
    /// Decodes a `get` result with the cache's codec (any envelope format is understood),
    /// without knowing its key.
    ///
    /// With a signing codec this cannot verify values bound to their key (what `set` writes):
    /// use [`RedisCache::decode_result`](crate::RedisCache::decode_result), which knows the key
    /// and works with every codec.
    pub fn decode<T: DeserializeOwned>(&self, codec: &Serializer) -> Result<Option<T>> {
        self.decode_with(|bytes| codec.decode(bytes))
    }

    pub(crate) fn decode_with<T>(
        &self,
        decode: impl FnOnce(&[u8]) -> std::result::Result<T, ncm_cache_core::CodecError>,
    ) -> Result<Option<T>> {
        match self {
            Self::Value(Some(bytes)) => Ok(Some(decode(bytes)?)),
            Self::Value(None) => Ok(None),
            other => Err(CacheError::InvalidArgument(format!(
                "pipeline result {other:?} is not a value"
            ))),
        }
    }
}

/// Commands queued for one round trip (the original's `pipeline()`).
///
/// ```no_run
/// # async fn demo(cache: ncm_cache_redis::RedisCache) -> ncm_cache_core::Result<()> {
/// let mut pipeline = cache.pipeline();
/// pipeline.set("key1", &"value1").set("key2", &"value2").set("key3", &"value3");
/// pipeline.get("key1");
/// let results = cache.execute_pipeline(pipeline).await?;
/// assert_eq!(results.len(), 4);
/// // The result of `get("key1")`, decoded for its key (required with a signing codec).
/// let v: Option<String> = cache.decode_result("key1", &results[3])?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a pipeline does nothing until passed to execute_pipeline"]
pub struct RedisPipeline {
    ops: Vec<Op>,
    codec: Serializer,
    /// The cache's key prefix: values are bound to their stored key by a signing codec.
    prefix: String,
    ttl: TtlPolicy,
    error: Option<CacheError>,
}

impl RedisPipeline {
    pub(crate) fn new(codec: Serializer, prefix: String, ttl: TtlPolicy) -> Self {
        Self {
            ops: Vec::new(),
            codec,
            prefix,
            ttl,
            error: None,
        }
    }

    /// Number of queued commands.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// `true` when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn fail(&mut self, e: CacheError) -> &mut Self {
        if self.error.is_none() {
            self.error = Some(e);
        }
        self
    }

    /// Queues a write with the default TTL.
    pub fn set<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> &mut Self {
        self.set_with_expiry(key, value, Expiry::Default)
    }

    /// Queues a write that expires after `ttl`.
    pub fn set_with_ttl<T: Serialize + ?Sized>(
        &mut self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> &mut Self {
        self.set_with_expiry(key, value, Expiry::After(ttl))
    }

    /// Queues a write with an explicit expiry. Encoding errors surface from `execute_pipeline`.
    pub fn set_with_expiry<T: Serialize + ?Sized>(
        &mut self,
        key: &str,
        value: &T,
        expiry: Expiry,
    ) -> &mut Self {
        let ttl = match self.ttl.resolve(expiry) {
            Ok(t) => t,
            Err(e) => return self.fail(e),
        };
        match self.codec.encode_for(&[&self.prefix, key], value) {
            Ok(value) => {
                self.ops.push(Op::Set {
                    key: key.to_owned(),
                    value,
                    ttl,
                });
                self
            }
            Err(e) => self.fail(e.into()),
        }
    }

    /// Queues a read.
    pub fn get(&mut self, key: &str) -> &mut Self {
        self.ops.push(Op::Get {
            key: key.to_owned(),
        });
        self
    }

    /// Queues a delete.
    pub fn delete(&mut self, key: &str) -> &mut Self {
        self.ops.push(Op::Delete {
            key: key.to_owned(),
        });
        self
    }

    /// Queues an existence check.
    pub fn exists(&mut self, key: &str) -> &mut Self {
        self.ops.push(Op::Exists {
            key: key.to_owned(),
        });
        self
    }

    /// Queues a TTL change.
    pub fn expire(&mut self, key: &str, ttl: Duration) -> &mut Self {
        if ttl.is_zero() {
            return self.fail(CacheError::InvalidArgument(
                "a TTL must be greater than zero".into(),
            ));
        }
        self.ops.push(Op::Expire {
            key: key.to_owned(),
            ttl,
        });
        self
    }

    /// Queues a TTL read.
    pub fn ttl(&mut self, key: &str) -> &mut Self {
        self.ops.push(Op::Ttl {
            key: key.to_owned(),
        });
        self
    }

    pub(crate) async fn execute(self, backend: &RedisBackend) -> Result<Vec<PipelineResult>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.ops.is_empty() {
            return Ok(Vec::new());
        }
        let inner = backend.inner();
        let max = inner.config.max_value_size;
        let mut cmds = Vec::with_capacity(self.ops.len());
        let mut full_keys = Vec::with_capacity(self.ops.len());
        for op in &self.ops {
            let full = inner.keys.full_key(op.key())?.into_owned();
            cmds.push(match op {
                Op::Set { value, ttl, .. } => {
                    commands::check_size(value.len(), max)?;
                    commands::set(&full, value, *ttl)
                }
                Op::Get { .. } => commands::get(&full),
                Op::Delete { .. } => commands::unlink(full.as_str()),
                Op::Exists { .. } => commands::exists(&full),
                Op::Expire { ttl, .. } => commands::pexpire(&full, *ttl),
                Op::Ttl { .. } => commands::pttl(&full),
            });
            full_keys.push(full);
        }
        let cluster = backend.is_cluster();
        let groups = if cluster {
            let keys: Vec<&[u8]> = full_keys.iter().map(|k| k.as_bytes()).collect();
            group_by_slot(&keys)
        } else {
            vec![(0..cmds.len()).collect()]
        };
        let replies = try_join_all(groups.into_iter().map(|group| {
            let cmds: Vec<Cmd> = group.iter().filter_map(|&i| cmds.get(i).cloned()).collect();
            async move {
                let values: Vec<Value> = inner
                    .run(Operation::SetMany, crate::backend::Retry::No, |mut h| {
                        // On a cluster, a slot's commands go as one transaction: while the
                        // slot is being migrated, the source refuses it whole when any of its
                        // keys has moved, so none ran, and they are then sent one by one in
                        // the pipeline's order, each following its own `ASK` (as `set_many`
                        // does, see `backend.rs`). A plain pipeline would have run the
                        // commands on the keys still on the source, and which ran is unknown
                        // once redis-rs reports the `ASK` for the whole pipeline. A slot's
                        // lone command goes as a command.
                        let mut pipe = redis::pipe();
                        if cluster {
                            pipe.atomic();
                        }
                        for c in &cmds {
                            pipe.add_command(c.clone());
                        }
                        let cmds = &cmds;
                        async move {
                            if let [cmd] = cmds.as_slice()
                                && cluster
                            {
                                return cmd.query_async::<Value>(&mut h).await.map(|v| vec![v]);
                            }
                            match pipe.query_async::<Vec<Value>>(&mut h).await {
                                Err(e)
                                    if cluster && crate::backend::refused_whole(&e, cmds.len()) =>
                                {
                                    one_by_one(cmds, h).await
                                }
                                r => r,
                            }
                        }
                    })
                    .await?;
                Ok::<_, CacheError>(group.into_iter().zip(values).collect::<Vec<_>>())
            }
        }))
        .await?;
        let mut slots: Vec<Option<Value>> = vec![None; self.ops.len()];
        for (i, v) in replies.into_iter().flatten() {
            if let Some(slot) = slots.get_mut(i) {
                *slot = Some(v);
            }
        }
        self.ops
            .iter()
            .zip(slots)
            .map(|(op, v)| {
                let v = v.ok_or_else(|| {
                    CacheError::backend("pipeline reply missing for a command", None)
                })?;
                convert(op, v)
            })
            .collect()
    }
}

/// The commands of a cluster transaction refused whole (none ran), sent one by one in their
/// order, each with the redirects and retries of a lone command. An error reply does not stop
/// the others (as in a pipeline; the first is then the outcome); a failure to get a reply (a
/// timeout, a lost connection) does, and is the outcome (whether that command ran is not
/// known): the commands after it are not sent, so a node that stopped answering costs one
/// response timeout, not one per command.
async fn one_by_one(cmds: &[Cmd], mut h: crate::conn::Handle) -> redis::RedisResult<Vec<Value>> {
    let mut values = Vec::with_capacity(cmds.len());
    let mut failed = None;
    for cmd in cmds {
        match cmd.query_async::<Value>(&mut h).await {
            Ok(v) => values.push(v),
            Err(e)
                if matches!(
                    e.kind(),
                    redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                ) =>
            {
                failed.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(values),
    }
}

fn convert(op: &Op, v: Value) -> Result<PipelineResult> {
    let bad = |e: redis::RedisError| CacheError::backend(format!("pipeline reply: {e}"), None);
    if let Value::ServerError(e) = &v {
        return Err(CacheError::backend(
            format!("pipeline command failed: {e:?}"),
            None,
        ));
    }
    Ok(match op {
        Op::Set { .. } => PipelineResult::Done,
        Op::Get { .. } => {
            PipelineResult::Value(parse::<Option<Vec<u8>>>(v).map_err(bad)?.map(Bytes::from))
        }
        Op::Delete { .. } | Op::Exists { .. } | Op::Expire { .. } => {
            PipelineResult::Bool(parse::<u64>(v).map_err(bad)? > 0)
        }
        Op::Ttl { .. } => PipelineResult::Ttl(commands::key_ttl(parse::<i64>(v).map_err(bad)?)),
    })
}
