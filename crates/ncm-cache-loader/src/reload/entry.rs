//! One registered name of a `CacheReloader`: its loader (type-erased), callbacks and counters.

use std::any::{Any, TypeId, type_name};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use ncm_cache_core::{Cache, CacheError, Codec, Result};
use serde::Serialize;

use super::ReloadStrategy;
use crate::loader::{BoxFuture, read, write};

/// A loaded value: its encoding (for the cache and for waiters) and the value itself.
pub(crate) struct Loaded {
    pub(crate) bytes: Bytes,
    pub(crate) value: Box<dyn Any + Send>,
}

pub(crate) type LoadFn = dyn Fn() -> BoxFuture<'static, Result<Loaded>> + Send + Sync;
pub(crate) type Callback = Arc<dyn Fn(&str, &dyn Any) + Send + Sync>;

/// Wraps a user loader: run it, map its error, encode its value with the cache's codec.
pub(crate) fn erase_loader<C, T, F, Fut, E>(cache: Cache<C>, name: &str, f: F) -> Arc<LoadFn>
where
    C: Codec,
    T: Serialize + Send + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let f = Arc::new(f);
    let name: Arc<str> = name.into();
    Arc::new(move || {
        let (f, cache, name) = (Arc::clone(&f), cache.clone(), Arc::clone(&name));
        Box::pin(async move {
            let value = f().await.map_err(CacheError::loader)?;
            // Bound to the key by a signing codec, checked against `max_value_size`.
            let bytes = cache.encode_for(&name, &value)?;
            Ok(Loaded {
                bytes,
                value: Box::new(value),
            })
        })
    })
}

/// Counters of one name on this instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[non_exhaustive]
pub struct ReloadStats {
    /// Reads through [`CacheReloader::get`](crate::CacheReloader::get).
    pub reads: u64,
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that found no value and waited for a load.
    pub misses: u64,
    /// Times the loader ran on this instance.
    pub reloads: u64,
    /// Loader failures on this instance.
    pub errors: u64,
    /// Background reloads started by refresh-ahead reads.
    pub refresh_ahead: u64,
    /// Timer ticks (eager or scheduled) this instance ran as the owner.
    pub owned_ticks: u64,
    /// Timer ticks skipped because another instance owns the timer.
    pub skipped_ticks: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) reads: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) reloads: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) refresh_ahead: AtomicU64,
    pub(crate) owned_ticks: AtomicU64,
    pub(crate) skipped_ticks: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// A registered name.
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) ttl: Duration,
    pub(crate) strategy: ReloadStrategy,
    pub(crate) value_type: TypeId,
    pub(crate) value_type_name: &'static str,
    load: RwLock<Arc<LoadFn>>,
    callbacks: RwLock<Vec<Callback>>,
    pub(crate) counters: Counters,
    /// A refresh-ahead reload is running (at most one at a time per name).
    pub(crate) refreshing: AtomicBool,
    /// Refresh-ahead: until this instant (nanoseconds since [`clock_base`], 0 = unknown) the
    /// value cannot be due for a refresh, from the TTL last read: a hit before it reads no
    /// TTL (before, every hit read it — over a multi-level cache a Redis round trip per L1
    /// hit: review, helper-86 #3). A value rewritten with its registered TTL only becomes due
    /// later; one rewritten with a shorter TTL is seen late (then it expires and loads).
    refresh_due: AtomicU64,
}

/// The reloaders' clock origin (tokio's clock: a paused test clock moves it too).
fn clock_base() -> tokio::time::Instant {
    static BASE: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(tokio::time::Instant::now)
}

fn clock_nanos() -> u64 {
    u64::try_from(clock_base().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Entry {
    pub(crate) fn new<T: 'static>(
        name: &str,
        ttl: Duration,
        strategy: ReloadStrategy,
        load: Arc<LoadFn>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            ttl,
            strategy,
            value_type: TypeId::of::<T>(),
            value_type_name: type_name::<T>(),
            load: RwLock::new(load),
            callbacks: RwLock::new(Vec::new()),
            counters: Counters::default(),
            refreshing: AtomicBool::new(false),
            refresh_due: AtomicU64::new(0),
        }
    }

    /// Refresh-ahead: whether a hit now may skip reading the TTL (see `refresh_due`).
    pub(crate) fn refresh_not_due(&self) -> bool {
        let due = self.refresh_due.load(Relaxed);
        due != 0 && clock_nanos() < due
    }

    /// Refresh-ahead: the TTL read now had `left`; the value becomes due when `left` falls to
    /// `ttl × (1 − fraction)`.
    pub(crate) fn note_ttl_left(&self, left: Duration, fraction: f64) {
        let at = ncm_cache_core::capped(self.ttl).mul_f64((1.0 - fraction).clamp(0.0, 1.0));
        let wait = u64::try_from(left.saturating_sub(at).as_nanos()).unwrap_or(u64::MAX);
        self.refresh_due
            .store(clock_nanos().saturating_add(wait).max(1), Relaxed);
    }

    pub(crate) fn loader(&self) -> Arc<LoadFn> {
        Arc::clone(&read(&self.load))
    }

    pub(crate) fn set_loader(&self, load: Arc<LoadFn>) {
        *write(&self.load) = load;
    }

    pub(crate) fn add_callback(&self, callback: Callback) {
        write(&self.callbacks).push(callback);
    }

    /// Runs every callback; a panicking callback is logged and does not stop the others.
    pub(crate) fn notify(&self, value: &dyn Any) {
        let callbacks = read(&self.callbacks).clone();
        for cb in callbacks {
            let run = std::panic::AssertUnwindSafe(|| cb(&self.name, value));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!(name = %self.name, "a reload callback panicked");
            }
        }
    }

    pub(crate) fn stats(&self) -> ReloadStats {
        let c = &self.counters;
        ReloadStats {
            reads: c.reads.load(Relaxed),
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            reloads: c.reloads.load(Relaxed),
            errors: c.errors.load(Relaxed),
            refresh_ahead: c.refresh_ahead.load(Relaxed),
            owned_ticks: c.owned_ticks.load(Relaxed),
            skipped_ticks: c.skipped_ticks.load(Relaxed),
        }
    }
}
