//! Invalidation: by time, event, pattern, dependency and tag — in process, or shared across
//! instances through Redis (feature `redis`).

mod dependency;
mod event;
mod pattern;
mod tags;
mod time;

use ncm_cache_core::{Result, SharedBackend};

pub(crate) use dependency::{Graph, key_node};

use crate::stats::{InvalidationRecorder, Kind};

/// Deletes are sent to the backend in chunks of this many keys.
const DELETE_CHUNK: usize = 1000;

/// A message between instances (carried by Redis pub/sub when the feature is on).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "redis", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "redis", serde(tag = "kind", rename_all = "snake_case"))]
pub(crate) enum Broadcast {
    /// An event was triggered: run its local handlers. `complete`: the trigger deleted every
    /// key registered for it by any instance (it could read the shared registrations), so a
    /// receiver only evicts what it keeps alone; otherwise (or from a sender that predates the
    /// flag) the receiver deletes its handlers' keys from the cache itself.
    Event {
        event: String,
        #[cfg_attr(feature = "redis", serde(default))]
        complete: bool,
    },
    /// These keys were invalidated: delete them from the local cache.
    Keys { keys: Vec<String> },
    /// A pattern was invalidated: clear it in the local cache.
    Pattern { pattern: String },
}

/// The shared state behind every invalidation strategy of one `CacheStrategies`.
pub(crate) struct Invalidator {
    pub(crate) backend: SharedBackend,
    pub(crate) graph: Graph,
    pub(crate) events: event::Events,
    pub(crate) timers: time::Timers,
    pub(crate) stats: InvalidationRecorder,
    #[cfg(feature = "redis")]
    pub(crate) remote: Option<crate::remote::Remote>,
}

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator")
            .field("backend", &self.backend.name())
            .field("distributed", &self.is_distributed())
            .finish_non_exhaustive()
    }
}

/// A write-through in flight, as other instances see it (`None`: in-process coordination, or
/// Redis unreachable when it began).
pub(crate) type WriteMark = Option<WriteMarkInner>;

#[cfg(feature = "redis")]
pub(crate) type WriteMarkInner = crate::remote::WriteMark;
#[cfg(not(feature = "redis"))]
pub(crate) type WriteMarkInner = ();

impl Invalidator {
    /// Begins a write-through of `key` across instances (see `CacheStrategies::write_through`).
    pub(crate) async fn write_begin(&self, key: &str) -> WriteMark {
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.remote {
            return match remote.write_begin(key).await {
                Ok(mark) => Some(mark),
                Err(e) => {
                    tracing::warn!(key, error = %e, "write-through: cross-instance order unknown (Redis unreachable); the key will be evicted after the write");
                    None
                }
            };
        }
        let _ = key;
        None
    }

    /// Ends it; `true` when the cached value must not be kept (it overlapped another
    /// instance's write-through of the key, or the order could not be checked).
    pub(crate) async fn write_end(&self, mark: WriteMark) -> bool {
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.remote {
            return match mark {
                Some(mark) => remote.write_end(mark).await.unwrap_or(true),
                None => true,
            };
        }
        let _ = mark;
        false
    }

    /// In-process coordination: graph, events and timers in this process only.
    pub(crate) fn local(backend: SharedBackend) -> Self {
        Self {
            backend,
            graph: Graph::local(),
            events: event::Events::default(),
            timers: time::Timers::default(),
            stats: InvalidationRecorder::default(),
            #[cfg(feature = "redis")]
            remote: None,
        }
    }

    /// Coordination through Redis (see `crate::remote::connect`).
    #[cfg(feature = "redis")]
    pub(crate) fn with_remote(
        backend: SharedBackend,
        graph: Graph,
        remote: crate::remote::Remote,
    ) -> Self {
        Self {
            backend,
            graph,
            events: event::Events::default(),
            timers: time::Timers::default(),
            stats: InvalidationRecorder::default(),
            remote: Some(remote),
        }
    }

    /// `true` when invalidations reach other instances (Redis coordination).
    pub(crate) fn is_distributed(&self) -> bool {
        #[cfg(feature = "redis")]
        {
            self.remote.is_some()
        }
        #[cfg(not(feature = "redis"))]
        {
            false
        }
    }

    /// Deletes `keys` from the cache (in chunks), then tells other instances with their own
    /// cache to do the same — after, not before: an instance told first could miss, read the
    /// shared L2 before the delete reached it and keep the old value for its L1 TTL (found by
    /// review). Told also when the delete failed (part of it may have landed). Returns how
    /// many existed here.
    pub(crate) async fn delete_keys(&self, keys: &[String], kind: Kind) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let removed = self.delete_local(keys, kind).await;
        self.broadcast(Broadcast::Keys {
            keys: keys.to_vec(),
        })
        .await;
        removed
    }

    /// Deletes `keys` from this instance's cache, without telling other instances.
    pub(crate) async fn delete_local(&self, keys: &[String], kind: Kind) -> Result<u64> {
        self.remove_here(keys, kind, false).await
    }

    /// Another instance deleted `keys`: removes them from what this instance keeps alone.
    pub(crate) async fn evict_remote(&self, keys: &[String], kind: Kind) -> Result<u64> {
        self.remove_here(keys, kind, true).await
    }

    /// Removes `keys` in chunks: from the cache, or (`evict_only`) from what this instance
    /// keeps alone ([`CacheBackend::evict_local`](ncm_cache_core::CacheBackend::evict_local)).
    async fn remove_here(&self, keys: &[String], kind: Kind, evict_only: bool) -> Result<u64> {
        let mut removed = 0;
        for chunk in keys.chunks(DELETE_CHUNK) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            removed += if evict_only {
                self.backend.evict_local(&refs).await?
            } else {
                self.backend.delete_many(&refs).await?
            };
        }
        self.stats.invalidated(kind, removed);
        Ok(removed)
    }

    /// Sends `message` to the other instances, when they keep their own cache (with a shared
    /// Redis cache, deleting it once is enough — except for events, whose handlers are local).
    /// Failures are logged: the local invalidation still happens.
    pub(crate) async fn broadcast(&self, message: Broadcast) {
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.remote
            && (remote.needs_broadcast() || matches!(message, Broadcast::Event { .. }))
            && let Err(e) = Box::pin(remote.publish(&message)).await
        {
            tracing::warn!(error = %e, ?message, "could not publish an invalidation to other instances");
        }
        #[cfg(not(feature = "redis"))]
        let _ = message;
    }

    /// After a break in the invalidation channel: messages from other instances may have been
    /// lost. A cache of this instance's own (not the shared Redis) is emptied, as it may hold
    /// keys others invalidated meanwhile; a shared cache needs nothing (their deletes reached
    /// it). Callbacks of events triggered meanwhile elsewhere do not run here.
    #[cfg(feature = "redis")]
    pub(crate) async fn resync(&self) {
        let Some(remote) = &self.remote else { return };
        // Only what this instance keeps alone (in-process memory, a multi-level cache's L1);
        // a shared store (Redis, a multi-level cache's L2) is kept coherent by its own means,
        // and emptying it would wipe it for every instance.
        if !remote.needs_broadcast() {
            return;
        }
        match self.backend.evict_local_matching("*").await {
            Ok(n) => {
                self.stats.invalidated(Kind::Remote, n);
                tracing::warn!(
                    cleared = n,
                    "local cache emptied after the invalidation channel reconnected (messages may have been lost)"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "could not empty the local cache after a reconnect: it may serve values invalidated elsewhere until they expire")
            }
        }
    }

    /// Applies a message received from another instance.
    #[cfg(feature = "redis")]
    pub(crate) async fn apply_remote(&self, message: Broadcast) {
        self.stats.remote_message();
        let result = match message {
            Broadcast::Event { event, complete } => {
                self.run_event(&event, complete).await.map(drop)
            }
            // What this instance keeps alone (a shared store was deleted from by the sender,
            // which may have written to it since).
            Broadcast::Keys { keys } => self.evict_remote(&keys, Kind::Remote).await.map(drop),
            Broadcast::Pattern { pattern } => self
                .backend
                .evict_local_matching(&pattern)
                .await
                .map(|n| self.stats.invalidated(Kind::Remote, n)),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not apply an invalidation from another instance");
        }
    }

    /// Runs a user callback, catching and counting a panic so background tasks survive it.
    pub(crate) fn run_callback(&self, what: &str, f: impl FnOnce()) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            self.stats.callback_panicked();
            tracing::error!(callback = what, "an invalidation callback panicked");
        }
    }
}

/// Validates a user-supplied name (event, tag, dependency).
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(ncm_cache_core::CacheError::InvalidArgument(format!(
            "{what} names must not be empty"
        )));
    }
    Ok(())
}
