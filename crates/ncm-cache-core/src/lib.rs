//! # ncm-cache-core
//!
//! The foundation of [ncm-cache](https://github.com/ncm-foundation/ncm-cache): the pieces every
//! other crate builds on, and nothing that talks to a network.
//!
//! - [`CacheBackend`] — the object-safe, byte-level store trait (memory, Redis, multi-level, ...).
//! - [`Codec`] and the typed facade [`Cache`] — `get::<T>` / `set` over any backend and codec.
//! - [`CacheError`] — one error type with predicates (`is_timeout`, `is_connection`, ...).
//! - [`KeySpace`], [`escape_glob`], [`GlobPattern`] — prefixes, key rules, Redis glob syntax.
//! - [`TtlPolicy`], [`Expiry`], [`KeyTtl`] — default TTL, per-call TTL, no expiry, jitter.
//! - [`StatsRecorder`], [`CacheStats`] — atomic counters mirrored to the `metrics` crate.
//! - [`Clock`], [`ManualClock`] — so TTL logic is testable without sleeping.
//! - [`SingleFlight`] — concurrent loads of one key run once and share the result.
//! - [`CacheStrategy`], [`CacheLevel`], [`ValueSource`] — shared enums.
//!
//! Architecture Invariant: this crate names neither `redis` nor `sqlx`; it has no I/O
//! (it uses only tokio's `sync` primitives).

mod backend;
mod cache;
mod clock;
mod codec;
mod duration;
mod error;
mod flight;
mod key;
mod stats;
mod ttl;
mod turn;
mod types;

pub use backend::{
    CacheBackend, HealthReport, LoadMark, LoadRead, SharedBackend, TagIndex, get_then_extend,
};
pub use cache::{Cache, CacheBuilder, Found};
pub use clock::{
    Clock, CoarseClock, ManualClock, NO_DEADLINE, SharedClock, SystemClock, deadline_after,
    duration_nanos, system_clock,
};
pub use codec::Codec;
pub use duration::{MAX_WAIT, capped, parse_duration, serde_duration};
pub use error::{BoxError, CacheError, CodecError, CodecErrorKind, Result};
pub use flight::{SingleFlight, loader_error};
pub use key::{
    DEFAULT_MAX_KEY_LEN, GlobPattern, KeySpace, RESERVED_KEY_PREFIX, RESERVED_NAME_ROOM,
    escape_glob, validate_key,
};
pub use stats::{CacheStats, LatencySummary, Operation, Outcome, StatsRecorder, StripedCounter};
pub use ttl::{Expiry, KeyTtl, TtlPolicy};
pub use turn::{Accept, LoadEnd, LoadHold, LoadPermit, LoadTurn};
pub use types::{CacheFailure, CacheLevel, CacheStrategy, ValueSource};

/// Re-exported so backend implementors use the same `async_trait` and `Bytes` as the trait.
pub use async_trait::async_trait;
pub use bytes::Bytes;
