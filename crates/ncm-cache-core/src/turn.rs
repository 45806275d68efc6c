//! A load's turn across processes ([`CacheBackend::begin_load`](crate::CacheBackend::begin_load)):
//! the hook through which loaders running over a backend get the backend's stampede
//! protection (a multi-level cache's distributed lock) without knowing how it is kept.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;

/// What a backend answers before a load of a key runs
/// ([`CacheBackend::begin_load`](crate::CacheBackend::begin_load)).
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadTurn {
    /// Run the load, holding the permit until its result is stored; then end it with
    /// [`LoadPermit::end`] (dropping it ends it too, as [`LoadEnd::Failed`]).
    Load(LoadPermit),
    /// Another process loaded the key while this one waited for its turn: its value, to serve
    /// instead of loading.
    Found(Bytes),
    /// Another process's load of the key found nothing at the source just now: the caller may
    /// answer "not found" without loading (or load, if it cannot answer that).
    Absent,
}

/// How a load ended, told to the processes waiting for its turn ([`LoadPermit::end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadEnd {
    /// The value was stored: waiters find it in the cache.
    Stored,
    /// The load answered, but nothing reached the cache (not cached, refused because the key
    /// was written or invalidated meanwhile, a failed write): waiters load at once, each on
    /// its own, instead of one after the other.
    NotStored,
    /// The load found nothing at the source (not cached): waiters answer "not found" too
    /// ([`LoadTurn::Absent`]) when they can, instead of loading again.
    NotFound,
    /// The load failed: the next waiter takes the turn and tries.
    Failed,
}

/// Which values found in the cache while waiting for a turn a caller takes
/// ([`CacheBackend::begin_load`](crate::CacheBackend::begin_load)): `None`, any value; a
/// caller whose values say what they were read under (`SqlCache`'s results carry their table
/// tokens) passes a check, and a value it refuses (stored before the invalidation that made
/// its read miss) is waited past as if the key were absent.
pub type Accept<'a> = Option<&'a (dyn Fn(&Bytes) -> bool + Send + Sync)>;

/// One load's turn to run (for instance a distributed lock, renewed while the load runs).
/// [`free`](Self::free) when the backend coordinates nothing.
///
/// ```
/// use ncm_cache_core::{LoadEnd, LoadPermit};
/// # async fn demo() {
/// let permit = LoadPermit::free();
/// assert!(!permit.is_held());
/// permit.end(LoadEnd::Stored).await;
/// # }
/// ```
#[must_use = "a permit is held until it is ended or dropped"]
pub struct LoadPermit(Option<Box<dyn LoadHold>>);

impl LoadPermit {
    /// A turn nobody else waits for: ending it does nothing.
    pub fn free() -> Self {
        Self(None)
    }

    /// A turn kept by `hold` until [`end`](Self::end) (or drop).
    pub fn held(hold: impl LoadHold) -> Self {
        Self(Some(Box::new(hold)))
    }

    /// Whether others may be waiting for this turn.
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }

    /// Ends the turn, telling the waiters how the load ended.
    pub async fn end(self, how: LoadEnd) {
        if let Some(hold) = self.0 {
            hold.end(how).await;
        }
    }
}

impl fmt::Debug for LoadPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LoadPermit").field(&self.is_held()).finish()
    }
}

/// What a backend keeps while a load holds its turn ([`LoadPermit::held`]). Dropped without
/// [`end`](Self::end) (the load panicked or was cancelled), it must let the others in by
/// itself.
#[async_trait]
pub trait LoadHold: Send + Sync + 'static {
    /// Lets the others in, telling them how the load ended.
    async fn end(self: Box<Self>, how: LoadEnd);
}
