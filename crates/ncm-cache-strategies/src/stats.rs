//! Statistics of write-behind queues and invalidations, mirrored to the `metrics` crate.
//!
//! Emitted series (label `queue` = the store's name):
//! - `ncm_write_behind_accepted_total`, `ncm_write_behind_coalesced_total`,
//!   `ncm_write_behind_store_calls_total`, `ncm_write_behind_stored_total`,
//!   `ncm_write_behind_retries_total`, `ncm_write_behind_dead_lettered_total`,
//!   `ncm_write_behind_rejected_total`, `ncm_write_behind_recovered_total`
//! - `ncm_write_behind_pending` (gauge: keys waiting to be persisted)
//!
//! and (label `kind` = `event`, `pattern`, `dependency`, `tag`, `time`, `remote`)
//! `ncm_invalidations_total` (invalidation runs) and `ncm_invalidated_keys_total`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// A snapshot of one write-behind queue's counters.
///
/// Invariant once a queue is idle: `accepted = coalesced + stored + dead_letters + superseded`
/// (minus entries recovered from other processes, which count in `recovered`, not `accepted`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WriteBehindStats {
    /// The queue's name (the store's name).
    pub name: String,
    /// Writes acknowledged to callers.
    pub accepted: u64,
    /// Writes that replaced a still-pending value of the same key (last write wins).
    pub coalesced: u64,
    /// Calls made to the store (`store_batch`), retries included.
    pub store_calls: u64,
    /// Entries the store accepted.
    pub stored: u64,
    /// Failed store calls that were retried.
    pub retries: u64,
    /// Entries moved to the dead-letter list after the last retry failed.
    pub dead_lettered: u64,
    /// Dead letters put back into the queue by `replay_dead_letters`.
    pub replayed: u64,
    /// Dead letters dropped because a newer write of the same key was accepted.
    pub superseded: u64,
    /// Entries adopted from crashed processes (durable mode).
    pub recovered: u64,
    /// Writes refused: queue full (with `OnFull::Error` or after the wait) or closed.
    pub rejected: u64,
    /// Keys waiting to be persisted now (including a batch being stored).
    pub pending: u64,
    /// Entries in the dead-letter list now.
    pub dead_letters: u64,
}

const COUNTERS: [&str; 8] = [
    "ncm_write_behind_accepted_total",
    "ncm_write_behind_coalesced_total",
    "ncm_write_behind_store_calls_total",
    "ncm_write_behind_stored_total",
    "ncm_write_behind_retries_total",
    "ncm_write_behind_dead_lettered_total",
    "ncm_write_behind_rejected_total",
    "ncm_write_behind_recovered_total",
];

/// Counter slots, in the order of [`COUNTERS`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Accepted = 0,
    Coalesced = 1,
    StoreCalls = 2,
    Stored = 3,
    Retries = 4,
    DeadLettered = 5,
    Rejected = 6,
    Recovered = 7,
}

/// Atomic counters of one queue; `metrics` handles registered lazily on first use.
#[derive(Debug)]
pub(crate) struct WriteBehindRecorder {
    name: String,
    counts: [AtomicU64; 8],
    replayed: AtomicU64,
    superseded: AtomicU64,
    handles: [OnceLock<metrics::Counter>; 8],
    pending: OnceLock<metrics::Gauge>,
}

impl WriteBehindRecorder {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            counts: Default::default(),
            replayed: AtomicU64::new(0),
            superseded: AtomicU64::new(0),
            handles: Default::default(),
            pending: OnceLock::new(),
        }
    }

    pub(crate) fn add(&self, counter: Counter, n: u64) {
        if n == 0 {
            return;
        }
        let i = counter as usize;
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(n, Relaxed);
        }
        if let (Some(cell), Some(name)) = (self.handles.get(i), COUNTERS.get(i)) {
            cell.get_or_init(|| metrics::counter!(*name, "queue" => self.name.clone()))
                .increment(n);
        }
    }

    pub(crate) fn get(&self, counter: Counter) -> u64 {
        self.counts
            .get(counter as usize)
            .map_or(0, |c| c.load(Relaxed))
    }

    pub(crate) fn replayed(&self, n: u64) {
        self.replayed.fetch_add(n, Relaxed);
    }

    pub(crate) fn superseded(&self, n: u64) {
        self.superseded.fetch_add(n, Relaxed);
    }

    pub(crate) fn pending_gauge(&self, pending: usize) {
        self.pending
            .get_or_init(
                || metrics::gauge!("ncm_write_behind_pending", "queue" => self.name.clone()),
            )
            .set(pending as f64);
    }

    pub(crate) fn snapshot(&self, pending: u64, dead_letters: u64) -> WriteBehindStats {
        WriteBehindStats {
            name: self.name.clone(),
            accepted: self.get(Counter::Accepted),
            coalesced: self.get(Counter::Coalesced),
            store_calls: self.get(Counter::StoreCalls),
            stored: self.get(Counter::Stored),
            retries: self.get(Counter::Retries),
            dead_lettered: self.get(Counter::DeadLettered),
            replayed: self.replayed.load(Relaxed),
            superseded: self.superseded.load(Relaxed),
            recovered: self.get(Counter::Recovered),
            rejected: self.get(Counter::Rejected),
            pending,
            dead_letters,
        }
    }
}

/// A snapshot of the invalidation counters of one [`CacheStrategies`](crate::CacheStrategies).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InvalidationStats {
    /// Events triggered on this instance.
    pub events_triggered: u64,
    /// Invalidation messages received from other instances (Redis pub/sub).
    pub remote_messages: u64,
    /// Keys deleted from the cache by any invalidation.
    pub keys_invalidated: u64,
    /// Time-based callbacks that ran.
    pub expirations_observed: u64,
    /// Callbacks that panicked (caught and logged).
    pub callback_panics: u64,
}

/// What kind of invalidation ran (the `kind` metrics label).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Event,
    Pattern,
    Dependency,
    Tag,
    Time,
    #[cfg(feature = "redis")]
    Remote,
    Key,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Pattern => "pattern",
            Self::Dependency => "dependency",
            Self::Tag => "tag",
            Self::Time => "time",
            #[cfg(feature = "redis")]
            Self::Remote => "remote",
            Self::Key => "key",
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct InvalidationRecorder {
    events_triggered: AtomicU64,
    remote_messages: AtomicU64,
    keys_invalidated: AtomicU64,
    expirations_observed: AtomicU64,
    callback_panics: AtomicU64,
}

impl InvalidationRecorder {
    pub(crate) fn invalidated(&self, kind: Kind, keys: u64) {
        self.keys_invalidated.fetch_add(keys, Relaxed);
        metrics::counter!("ncm_invalidations_total", "kind" => kind.as_str()).increment(1);
        metrics::counter!("ncm_invalidated_keys_total", "kind" => kind.as_str()).increment(keys);
    }

    pub(crate) fn event_triggered(&self) {
        self.events_triggered.fetch_add(1, Relaxed);
    }

    #[cfg(feature = "redis")]
    pub(crate) fn remote_message(&self) {
        self.remote_messages.fetch_add(1, Relaxed);
    }

    pub(crate) fn expiration_observed(&self) {
        self.expirations_observed.fetch_add(1, Relaxed);
    }

    pub(crate) fn callback_panicked(&self) {
        self.callback_panics.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> InvalidationStats {
        InvalidationStats {
            events_triggered: self.events_triggered.load(Relaxed),
            remote_messages: self.remote_messages.load(Relaxed),
            keys_invalidated: self.keys_invalidated.load(Relaxed),
            expirations_observed: self.expirations_observed.load(Relaxed),
            callback_panics: self.callback_panics.load(Relaxed),
        }
    }
}
