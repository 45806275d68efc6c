//! The one read path every load goes through: cache → single-flight → loader → cache.
//!
//! Registered loaders (`load(name, args)`) and the attribute macros differ only in what their
//! function returns (`Result<T, CacheError>`, `Result<T, E>`, `Option<T>`, `T`); a [`Mode`]
//! tells this path which part of a return value is stored and how waiters rebuild it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ncm_cache_core::{
    CacheError, CacheFailure, CacheStrategy, Codec, Expiry, Found, LoadEnd, LoadPermit, LoadRead,
    LoadTurn, Operation,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::loader::CacheLoader;
use crate::stats::LoaderCounters;

/// How a return value splits into what is cached and what is returned.
#[doc(hidden)]
pub enum Split<S, R> {
    /// Cache `S`; the caller gets it back (rebuilt with [`Mode::join`]).
    Store(S),
    /// Not cached, not an error (e.g. `None`); the caller gets `R`.
    Empty(R),
    /// A failure: never cached; the caller gets `R`.
    Fail(R),
}

/// How one kind of function output is cached. Implemented by the zero-sized modes the
/// attribute macros pick from the return type, and by the registered-loader path.
#[doc(hidden)]
pub trait Mode<R>: Copy + Send + Sync + 'static {
    /// The part of `R` that is stored.
    type Stored: Serialize + DeserializeOwned + Send;
    /// Splits an output.
    fn split(output: R) -> Split<Self::Stored, R>;
    /// Rebuilds an output from a stored value.
    fn join(stored: Self::Stored) -> R;
    /// What a waiter returns when the shared load produced an [`Split::Empty`] output; `None`
    /// makes the waiter run its own call.
    fn empty() -> Option<R>;
    /// The error shared with waiters when the leader's output was a [`Split::Fail`].
    fn flight_error(output: &R) -> CacheError;
    /// Turns a shared error into this waiter's output; `None` makes the waiter run its own
    /// call (for error types that cannot be shared).
    fn shared_error(err: CacheError) -> Option<R>;
    /// Whether [`shared_error`](Self::shared_error) can turn any `CacheError` (a failing
    /// cache, not only a shared load failure) into an output: only then can a `ReadThrough`
    /// call fail closed.
    fn carries_cache_error() -> bool {
        false
    }
}

/// The registered-loader mode: `Result<T, CacheError>`, errors shared with every waiter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadMode;

impl<T: Serialize + DeserializeOwned + Send + 'static> Mode<Result<T, CacheError>> for LoadMode {
    type Stored = T;
    fn split(output: Result<T, CacheError>) -> Split<T, Result<T, CacheError>> {
        match output {
            Ok(v) => Split::Store(v),
            Err(e) => Split::Fail(Err(e)),
        }
    }
    fn join(stored: T) -> Result<T, CacheError> {
        Ok(stored)
    }
    fn empty() -> Option<Result<T, CacheError>> {
        None
    }
    fn flight_error(output: &Result<T, CacheError>) -> CacheError {
        match output {
            Err(e) => e.clone(),
            Ok(_) => CacheError::loader("the loader failed"),
        }
    }
    fn shared_error(err: CacheError) -> Option<Result<T, CacheError>> {
        Some(Err(err))
    }
    fn carries_cache_error() -> bool {
        true
    }
}

/// One call's parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call<'a> {
    pub(crate) name: &'a str,
    pub(crate) key: &'a str,
    pub(crate) ttl: Option<Duration>,
    pub(crate) strategy: CacheStrategy,
    /// Skip the cache read: run the loader and overwrite (warming, refresh).
    pub(crate) force: bool,
    /// A failing cache fails the call (set by `run_cached` from the strategy and the mode).
    pub(crate) fail_closed: bool,
}

impl Call<'_> {
    /// What a cache failure does to this call: [`CacheStrategy::ReadThrough`] reads through
    /// the cache, so its failures fail the call ([`CacheFailure::FailClosed`]) — when the
    /// output can carry a `CacheError` (a registered loader; a macro whose error type is
    /// `From<CacheError>`); otherwise, and for every other strategy, the call goes on without
    /// the cache.
    pub(crate) fn on_failure(&self) -> CacheFailure {
        if self.fail_closed {
            CacheFailure::FailClosed
        } else {
            CacheFailure::FailOpen
        }
    }
}

impl<C: Codec> CacheLoader<C> {
    /// Reads `call.key`; on a miss runs `body` once across concurrent callers of the key, stores
    /// what `M` says to store, and returns the output. The cache failing never fails the call
    /// (it is counted and logged, and the body runs).
    pub(crate) async fn run_cached<M, R, Fut>(
        &self,
        counters: &Arc<LoaderCounters>,
        call: Call<'_>,
        body: Fut,
    ) -> R
    where
        M: Mode<R>,
        Fut: Future<Output = R>,
    {
        let call = Call {
            fail_closed: call.strategy == CacheStrategy::ReadThrough && M::carries_cache_error(),
            ..call
        };
        // A copy a fail-safe backend kept while its shared store failed: served only if the
        // load fails too (before, it was served as a hit and the loader never ran).
        let mut stale = None;
        if !call.force {
            match self.read::<M::Stored>(counters, call).await {
                Ok((Some(value), _)) => {
                    counters.hit();
                    return M::join(value);
                }
                Ok((None, copy)) => stale = copy,
                // Fail-closed (ReadThrough): the cache's error, when the output can carry it.
                Err(e) => {
                    if let Some(output) = M::shared_error(e) {
                        counters.error();
                        return output;
                    }
                }
            }
        }
        // The body is polled in place: by the flight below if this caller leads, or afterwards
        // if it has to run its own call. `slot` receives the leader's own output, so the leader
        // never decodes what it just encoded.
        let mut body = std::pin::pin!(body);
        let mut slot: Option<(R, bool)> = None;
        // A forced call that joined a flight runs one more: the flight it joined began before
        // it (its source read may predate this call), while the next one begins after it.
        // Concurrent refreshes thus share the run begun after all of them.
        let mut rounds = if call.force { 2 } else { 1 };
        // Only a copy this caller can serve lets a wait for another process's load give up.
        let has_stale = stale.is_some()
            && self
                .inner
                .cache
                .decode_stale::<M::Stored>(call.key, stale.as_ref())
                .is_some();
        let (shared, ran) = loop {
            rounds -= 1;
            let (body, slot) = (&mut body, &mut slot);
            // Named by the key's mark now: a caller after an invalidation or write of the key
            // does not join a load begun before it (whose source read may be older). Forced
            // calls (`refresh`, warming) fly apart from lazy ones, as `CacheReloader`'s do: a
            // refresh never settles for a lazy load begun before it.
            let mut flight = ncm_cache_core::LoadMark::flight_key(
                call.key,
                self.inner.cache.load_mark(call.key),
            );
            if call.force {
                flight.push_str("\0force");
            }
            let landed = self
                .inner
                .flight
                .run_with_role(flight, || async move {
                    // Whether the load replaces what is there (see `run_body`).
                    let mut replace = call.force;
                    // The key's turn across processes (a multi-level cache's stampede lock),
                    // taken after a miss and held until the value is stored.
                    let mut permit = LoadPermit::free();
                    if !call.force {
                        // Double check: a flight that landed just before this one was started
                        // has already written the value.
                        // Only bytes this build can read: an entry left in place because a
                        // newer build wrote it (or it is above the size cap) is a miss, and
                        // the load below overwrites it; so does a load after a failed read
                        // (fail-open), which cannot tell whether the key is there.
                        match self.read_raw(counters, call).await? {
                            Ok(Some(bytes))
                                if self
                                    .inner
                                    .cache
                                    .decode_for::<serde::de::IgnoredAny>(call.key, &bytes)
                                    .is_ok() =>
                            {
                                return Ok(Some(bytes));
                            }
                            Ok(None) => match self.take_turn::<M, R>(call, has_stale).await {
                                Turn::Found(bytes) => return Ok(Some(bytes)),
                                Turn::Absent => return Ok(None),
                                Turn::GaveUp(e) => return Err(e),
                                Turn::Load(turn, unreadable) => {
                                    permit = turn;
                                    replace = unreadable;
                                }
                            },
                            Ok(Some(_)) | Err(()) => replace = true,
                        }
                    }
                    let (output, bytes, failed) = self
                        .run_body::<M, R>(counters, call, body, replace, permit)
                        .await;
                    let shared = match (&bytes, failed) {
                        (_, true) => Err(M::flight_error(&output)),
                        (bytes, false) => Ok(bytes.clone()),
                    };
                    *slot = Some((output, failed));
                    shared
                })
                .await;
            if landed.1 || rounds == 0 {
                break landed;
            }
        };
        // (A leader without output gave up waiting for another process's load: failed.)
        let load_failed = match &slot {
            Some((_, failed)) if ran => *failed,
            _ => shared.is_err(),
        };
        if load_failed
            && let Some(value) = self
                .inner
                .cache
                .stale_after_load::<M::Stored>(call.key, stale.as_ref())
                .await
        {
            counters.miss();
            counters.error();
            return M::join(value);
        }
        if ran && let Some((output, failed)) = slot {
            counters.miss();
            if failed {
                counters.error();
            }
            return output;
        }
        match shared {
            Ok(Some(bytes)) => match self.inner.cache.decode_for::<M::Stored>(call.key, &bytes) {
                Ok(value) => {
                    if ran {
                        counters.hit();
                    } else {
                        counters.miss();
                    }
                    return M::join(value);
                }
                Err(e) => self.log_cache_error(call, Operation::Get, &e),
            },
            Ok(None) => {
                if let Some(output) = M::empty() {
                    counters.miss();
                    return output;
                }
            }
            Err(e) => {
                if let Some(output) = M::shared_error(e) {
                    counters.miss();
                    counters.error();
                    return output;
                }
            }
        }
        // The shared load cannot hand this caller a value of its type (its error is not
        // shareable, or the value did not decode): run this caller's own body.
        let (output, _, failed) = self
            .run_body::<M, R>(counters, call, body, call.force, LoadPermit::free())
            .await;
        counters.miss();
        if failed {
            counters.error();
        }
        output
    }

    /// Runs the body, times it, and stores what is to be stored. Returns the output, the
    /// encoded stored value (shared with waiters) and whether the output is a failure.
    /// `replace`: the load replaces what the cache holds (warming, refresh, an entry this
    /// build cannot read); otherwise it followed a miss and is stored only while the key is
    /// still absent. `permit`: the key's turn across processes, ended once the value is
    /// stored (or not).
    async fn run_body<M, R>(
        &self,
        counters: &Arc<LoaderCounters>,
        call: Call<'_>,
        body: impl Future<Output = R>,
        replace: bool,
        permit: LoadPermit,
    ) -> (R, Option<Bytes>, bool)
    where
        M: Mode<R>,
    {
        // Before the source is read: an invalidation of the key seen meanwhile keeps the
        // (maybe older) value out of the cache.
        // A forced load (warming, refresh) replaces a value on purpose; any other followed a
        // miss and must not overwrite a value written since.
        let mark = if replace {
            self.inner.cache.load_mark(call.key)
        } else {
            self.inner.cache.miss_mark(call.key)
        };
        let started = Instant::now();
        let output = body.await;
        let elapsed = started.elapsed();
        let (output, bytes, failed) = match M::split(output) {
            Split::Store(value) => {
                // Encode before awaiting anything: no `&T` lives across an await (so `T` need
                // not be `Sync`).
                let bytes = self.encode(counters, call, &value);
                let written = match &bytes {
                    Some(bytes) => {
                        self.write(counters, call, bytes.clone(), mark, permit)
                            .await
                    }
                    None => {
                        permit.end(LoadEnd::NotStored).await;
                        Ok(())
                    }
                };
                // Fail-closed (ReadThrough): a value the cache did not take is not returned,
                // when the output can carry the cache's error.
                match written.map_err(M::shared_error) {
                    Err(Some(failure)) => (failure, None, true),
                    _ => (M::join(value), bytes, false),
                }
            }
            Split::Empty(output) => {
                // Waiters elsewhere take "not found" too, when their mode answers it.
                let end = if M::empty().is_some() {
                    LoadEnd::NotFound
                } else {
                    LoadEnd::NotStored
                };
                permit.end(end).await;
                (output, None, false)
            }
            Split::Fail(output) => {
                permit.end(LoadEnd::Failed).await;
                (output, None, true)
            }
        };
        counters.load(elapsed, !failed);
        if self.inner.enable_logging {
            tracing::debug!(
                loader = call.name,
                key = call.key,
                ?elapsed,
                failed,
                "loader ran"
            );
        }
        (output, bytes, failed)
    }

    /// After a miss: the key's turn across processes (a multi-level cache's stampede lock,
    /// `CacheBackend::begin_load`), waiting for another process's load of it.
    async fn take_turn<M, R>(&self, call: Call<'_>, has_stale: bool) -> Turn
    where
        M: Mode<R>,
    {
        // Nothing is stored for others to wait for.
        if call.strategy == CacheStrategy::WriteAround {
            return Turn::Load(LoadPermit::free(), false);
        }
        let cache = &self.inner.cache;
        match cache.backend().begin_load(call.key, has_stale, None).await {
            Ok(LoadTurn::Found(bytes))
                if cache
                    .decode_for::<serde::de::IgnoredAny>(call.key, &bytes)
                    .is_ok() =>
            {
                Turn::Found(bytes)
            }
            // Stored by a build that writes what this one cannot read: load and replace it.
            Ok(LoadTurn::Found(_)) => Turn::Load(LoadPermit::free(), true),
            Ok(LoadTurn::Load(permit)) => Turn::Load(permit, false),
            // Its load found nothing: the waiters' answer when their mode has one.
            Ok(_) if M::empty().is_some() => Turn::Absent,
            Ok(_) => Turn::Load(LoadPermit::free(), false),
            // Gave up waiting while its stale copy may be served: the copy is the answer.
            Err(e) if has_stale => Turn::GaveUp(e),
            Err(_) => Turn::Load(LoadPermit::free(), false),
        }
    }

    /// Encodes a loaded value (shared with waiters); `None` when it cannot be encoded.
    fn encode<S: Serialize>(
        &self,
        counters: &Arc<LoaderCounters>,
        call: Call<'_>,
        value: &S,
    ) -> Option<Bytes> {
        // Bound to the key by a signing codec, checked against `max_value_size`.
        match self.inner.cache.encode_for(call.key, value) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                counters.cache_error(Operation::Set);
                self.log_cache_error(call, Operation::Set, &e);
                None
            }
        }
    }

    /// Writes an encoded value according to the strategy (see [`Call::on_failure`]); failures
    /// are counted and logged, and returned under fail-closed. `permit` ends once the write
    /// is done (with write-behind, in the background after it).
    async fn write(
        &self,
        counters: &Arc<LoaderCounters>,
        call: Call<'_>,
        bytes: Bytes,
        mark: Option<ncm_cache_core::LoadMark>,
        permit: LoadPermit,
    ) -> Result<(), CacheError> {
        let cache = &self.inner.cache;
        if call.strategy == CacheStrategy::WriteAround {
            permit.end(LoadEnd::NotStored).await;
            return Ok(());
        }
        let ttl = call.ttl.unwrap_or(self.inner.default_ttl);
        let ttl = match cache.ttl_policy().resolve(Expiry::After(ttl)) {
            Ok(ttl) => ttl,
            Err(e) => {
                permit.end(LoadEnd::NotStored).await;
                counters.cache_error(Operation::Set);
                self.log_cache_error(call, Operation::Set, &e);
                return Err(e);
            }
        };
        let backend = Arc::clone(cache.backend());
        let runtime = tokio::runtime::Handle::try_current();
        match (call.strategy, runtime) {
            // A forced load (refresh, warming) replaces what is there, so two of its stores in
            // flight at once could apply out of order: it is stored before the call returns.
            (CacheStrategy::WriteBehind, Ok(runtime)) if !call.force => {
                let (key, value, counters) = (call.key.to_owned(), bytes, Arc::clone(counters));
                let (name, logging) = (call.name.to_owned(), self.inner.enable_logging);
                // In flight until it ends: an invalidation through the loader waits for it.
                let pending = self.inner.pending.enter(&key);
                runtime.spawn(async move {
                    let _pending = pending;
                    let stored = backend.set_loaded(&key, value, ttl, mark).await;
                    permit.end(stored_end(&stored)).await;
                    if let Err(e) = stored {
                        counters.cache_error(Operation::Set);
                        if logging {
                            tracing::warn!(loader = %name, %key, error = %e, "write-behind failed");
                        }
                    }
                });
            }
            _ => {
                let stored = backend.set_loaded(call.key, bytes, ttl, mark).await;
                permit.end(stored_end(&stored)).await;
                if let Err(e) = stored {
                    counters.cache_error(Operation::Set);
                    return call.on_failure().apply(call.key, "set", e);
                }
            }
        }
        Ok(())
    }

    /// A typed read; a failing cache is a miss (fail-open) or the error (fail-closed).
    /// The read before a load: a value, or none and maybe a fail-safe backend's stale copy
    /// (see [`Cache::get_for_load`](ncm_cache_core::Cache::get_for_load)); a failing cache is
    /// `Ok` (fail-open) or its error (fail-closed, which takes a stale copy as the answer).
    async fn read<S: DeserializeOwned>(
        &self,
        counters: &LoaderCounters,
        call: Call<'_>,
    ) -> Result<(Option<S>, Option<Bytes>), CacheError> {
        let cache = &self.inner.cache;
        let (error, copy) = match cache.get_for_load::<S>(call.key).await {
            Ok(Found::Value(value)) => return Ok((Some(value), None)),
            Ok(Found::Stale(bytes, e)) => (e, Some(bytes)),
            // The cache answered "absent"; its fail-safe copy is kept for a load that fails.
            Ok(Found::Expired(bytes)) => return Ok((None, Some(bytes))),
            Ok(_) => return Ok((None, None)),
            Err(e) => (e, None),
        };
        counters.cache_error(Operation::Get);
        if call.on_failure() == CacheFailure::FailClosed
            && let Some(value) = cache.decode_stale::<S>(call.key, copy.as_ref())
        {
            return Ok((Some(value), None));
        }
        call.on_failure()
            .apply(call.key, "get", error)
            .map(|()| (None, copy))
    }

    /// A raw read; a failing cache is `Err(())` (fail-open: the read failed, the call goes on)
    /// or the error (fail-closed).
    async fn read_raw(
        &self,
        counters: &LoaderCounters,
        call: Call<'_>,
    ) -> Result<Result<Option<Bytes>, ()>, CacheError> {
        // A fail-safe copy is no value stored since: the read failed.
        let error = match self.inner.cache.backend().get_for_load(call.key).await {
            Ok(LoadRead::Hit(bytes)) => return Ok(Ok(Some(bytes))),
            Ok(LoadRead::Miss | LoadRead::Expired { .. }) => return Ok(Ok(None)),
            Ok(LoadRead::Stale { error, .. }) => error,
            Ok(_) => return Ok(Err(())),
            Err(e) => e,
        };
        counters.cache_error(Operation::Get);
        call.on_failure()
            .apply(call.key, "get", error)
            .map(|()| Err(()))
    }

    fn log_cache_error(&self, call: Call<'_>, op: Operation, err: &CacheError) {
        if self.inner.enable_logging {
            tracing::warn!(
                loader = call.name,
                key = call.key,
                operation = op.as_str(),
                error = %err,
                "cache unavailable, going on without it"
            );
        }
    }
}

/// How a load's store ended, for the processes waiting for its turn.
fn stored_end(stored: &Result<bool, CacheError>) -> LoadEnd {
    match stored {
        Ok(true) => LoadEnd::Stored,
        _ => LoadEnd::NotStored,
    }
}

/// What a flight's turn across processes gave it ([`CacheLoader::take_turn`]).
enum Turn {
    /// Another process's value.
    Found(Bytes),
    /// Another process's load found nothing.
    Absent,
    /// Gave up waiting; the caller serves its stale copy.
    GaveUp(CacheError),
    /// Load, holding the permit; `true`: replace what the cache holds (unreadable here).
    Load(LoadPermit, bool),
}
