//! The load path: single-flight, distributed lock, loader timeouts, fail-safe, eager refresh.

use std::collections::HashMap;
use std::sync::Arc;

use ncm_cache_core::{CacheError, Codec, Result, ValueSource};
use tokio::sync::watch;

use crate::cache::{CacheValue, Fill, Found, Inner, L1Read, L2Read, Object};
use crate::epoch::Placed;
use crate::options::{Answer, Eff, LoadContext, Loaded};
use crate::stats::Counters;
use crate::versions::Ticket;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The value a load starts from: what its loader sees (conditional refresh: the value and its
/// validator, taken together from L1) and, for a caller's load, until when fail-safe may serve
/// it if the load fails. An eager refresh has a value but no fail-safe: nobody waits for it.
#[derive(Clone)]
pub(crate) struct Prior {
    pub(crate) value: Object,
    pub(crate) validator: Option<Arc<str>>,
    /// Clock nanos; `None`: never served in place of the load's result.
    pub(crate) serve_until: Option<u64>,
}

impl Prior {
    /// What fail-safe may serve now, if anything.
    fn servable(&self, now: u64) -> Option<Object> {
        self.serve_until
            .filter(|until| now <= *until)
            .map(|_| Arc::clone(&self.value))
    }
}

impl<C: Codec> Inner<C> {
    /// L1 → L2 → (single-flight) loader, with fail-safe. `None` in the result: the loader
    /// found nothing.
    pub(crate) fn get_or_load_erased<'a, T, F, Fut, E>(
        self: Arc<Self>,
        key: &'a str,
        eff: Eff,
        loader: F,
    ) -> BoxFuture<'a, Result<Found>>
    where
        T: CacheValue,
        F: FnOnce(LoadContext<T>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let span = tracing::info_span!(
            "ncm_cache.get_or_load",
            cache = %self.opts.name,
            key,
            l1 = tracing::field::Empty,
            source = tracing::field::Empty
        );
        // Boxed so the public async fns that call this stay small types.
        Box::pin(tracing::Instrument::instrument(
            self.get_or_load_inner::<T, F, Fut, E>(key, eff, loader),
            span,
        ))
    }

    async fn get_or_load_inner<T, F, Fut, E>(
        self: Arc<Self>,
        key: &str,
        eff: Eff,
        loader: F,
    ) -> Result<Found>
    where
        T: CacheValue,
        F: FnOnce(LoadContext<T>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let span = tracing::Span::current();
        let stale = match self.l1_read::<T>(key, &eff)? {
            L1Read::Fresh(v, refresh) => {
                span.record("l1", "hit");
                span.record("source", "L1");
                self.counters.l1_hits.bump();
                // One background refresh per key at a time.
                if refresh && self.refreshing.begin(key) {
                    Counters::bump(&self.counters.background_refreshes);
                    let this = Arc::clone(&self);
                    let key = key.to_owned();
                    // The loader sees the value it refreshes (conditional refresh); a failed
                    // refresh serves nobody, so it has no fail-safe.
                    let current = v.clone().map(|v| {
                        let value = v as Object;
                        Prior {
                            validator: self.l1_validator(&key, &value),
                            value,
                            serve_until: None,
                        }
                    });
                    tokio::spawn(async move {
                        // Ends the refresh also when the loader panics (the task unwinds).
                        let _done = RefreshDone(&this, &key);
                        if let Err(e) = this
                            .load_flight::<T, F, Fut, E>(&key, eff, loader, current, Began::Refresh)
                            .await
                        {
                            tracing::debug!(key, error = %e, "eager refresh failed");
                        }
                    });
                }
                return Ok((v.map(|v| v as Object), ValueSource::L1));
            }
            L1Read::Stale(v, until) => {
                span.record("l1", "stale");
                v.map(|v| {
                    let value = v as Object;
                    Prior {
                        validator: self.l1_validator(key, &value),
                        value,
                        serve_until: Some(until),
                    }
                })
            }
            L1Read::Miss => {
                span.record("l1", "miss");
                None
            }
        };
        let ticket = self.versions.ticket(key);
        // Only an L2 read that found nothing lets the load store "only if still absent": not
        // a skipped, failed or unreadable read, whose load must replace what is there.
        let mut absent = false;
        match self.l2_lookup::<T>(key, &eff).await {
            Ok(L2Read::Found(v, size)) => {
                span.record("source", "L2");
                Counters::bump(&self.counters.l2_hits);
                let v = v as Object;
                self.promote(key, Arc::clone(&v), size, &ticket, &eff);
                return Ok((Some(v), ValueSource::L2));
            }
            Ok(read) => {
                absent = matches!(read, L2Read::Absent);
                Counters::bump(&self.counters.misses);
            }
            // L2 unavailable: the loader is the source of truth; go on.
            Err(e) => tracing::debug!(key, error = %e, "L2 read failed; loading"),
        }
        let found = self
            .load_flight::<T, F, Fut, E>(
                key,
                eff,
                loader,
                stale,
                Began::Miss {
                    absent,
                    since: ticket,
                },
            )
            .await;
        span.record(
            "source",
            match &found {
                Ok((_, source)) => source_name(*source),
                Err(_) => "error",
            },
        );
        found
    }

    /// Runs the load once per key (single-flight) unless stampede prevention is off.
    ///
    /// After a miss, the flight first looks at L1 again: a caller that missed just before
    /// an earlier flight stored its value would otherwise start a second load. Not for eager
    /// refreshes ([`Began::Refresh`]), which must reach the loader.
    pub(crate) async fn load_flight<T, F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        eff: Eff,
        loader: F,
        stale: Option<Prior>,
        began: Began,
    ) -> Result<Found>
    where
        T: CacheValue,
        F: FnOnce(LoadContext<T>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        // Named by the key's invalidation versions now: a caller that starts after an
        // invalidation of the key does not join a load begun before it.
        let flight = self
            .opts
            .enable_stampede_prevention
            .then(|| self.versions.flight_key(key));
        let result = if eff.soft_timeout.is_some() || eff.hard_timeout.is_some() {
            self.load_in_background::<T, F, Fut, E>(
                key,
                flight.as_deref(),
                eff,
                loader,
                stale.clone(),
                began,
            )
            .await
        } else {
            // Boxed: erases the loader's future type here, keeping the caller's future small
            // and its `Send` check shallow.
            let work = {
                let this = Arc::clone(self);
                let key = key.to_owned();
                let stale = stale.clone();
                move || -> BoxFuture<'static, Result<Found>> {
                    Box::pin(async move {
                        if began.recheck()
                            && let L1Read::Fresh(v, _) = this.l1_read::<T>(&key, &eff)?
                        {
                            return Ok((v.map(|v| v as Object), ValueSource::L1));
                        }
                        this.load_and_store::<T, F, Fut, E>(key, eff, loader, began, stale)
                            .await
                    })
                }
            };
            match flight {
                Some(flight) => self.flight.run(flight, work).await,
                None => work().await,
            }
        };
        // The stale value's age is checked again now: the load may have taken up to the
        // hard timeout, past the max stale age.
        let now = self.opts.now_nanos();
        match (result, stale.and_then(|s| s.servable(now))) {
            (Ok(v), _) => Ok(v),
            (Err(e), Some(stale)) => {
                tracing::warn!(key, error = %e, "serving a stale value (fail-safe)");
                Counters::bump(&self.counters.stale_served);
                Ok((Some(stale), ValueSource::Stale))
            }
            (Err(e), None) => Err(e),
        }
    }

    /// With loader timeouts: the load runs as a task bounded by the hard timeout, and stays
    /// the key's one load in flight until it ends, whoever waits for it. A caller with a stale
    /// value waits at most the soft timeout, then serves the stale value.
    async fn load_in_background<T, F, Fut, E>(
        self: &Arc<Self>,
        key: &str,
        flight: Option<&str>,
        eff: Eff,
        loader: F,
        stale: Option<Prior>,
        began: Began,
    ) -> Result<Found>
    where
        T: CacheValue,
        F: FnOnce(LoadContext<T>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        if began.recheck()
            && let L1Read::Fresh(v, _) = self.l1_read::<T>(key, &eff)?
        {
            return Ok((v.map(|v| v as Object), ValueSource::L1));
        }
        let start = {
            let this = Arc::clone(self);
            let key = key.to_owned();
            let stale = stale.clone();
            move || -> BoxFuture<'static, Result<Found>> {
                let hard = eff.hard_timeout;
                Box::pin(async move {
                    let load = this
                        .clone()
                        .load_and_store::<T, F, Fut, E>(key, eff, loader, began, stale);
                    let Some(hard) = hard else {
                        return load.await;
                    };
                    match tokio::time::timeout(hard, load).await {
                        Ok(r) => r,
                        Err(_) => {
                            Counters::bump(&this.counters.load_errors);
                            Err(CacheError::Timeout {
                                operation: "load",
                                after: hard,
                            })
                        }
                    }
                })
            }
        };
        let mut rx = self.join_or_start(flight, start);
        let wait = async move {
            match rx.wait_for(Option::is_some).await {
                Ok(done) => done.clone().unwrap_or_else(|| Err(ended())),
                Err(_) => Err(ended()),
            }
        };
        let servable = stale.filter(|s| s.serve_until.is_some());
        match (eff.soft_timeout, servable) {
            (Some(soft), Some(stale)) => {
                let mut wait = std::pin::pin!(wait);
                match tokio::time::timeout(soft, wait.as_mut()).await {
                    Ok(r) => r,
                    Err(_) => match stale.servable(self.opts.now_nanos()) {
                        Some(stale) => {
                            // The load goes on in the background and will refresh the cache.
                            Counters::bump(&self.counters.background_refreshes);
                            Counters::bump(&self.counters.stale_served);
                            Ok((Some(stale), ValueSource::Stale))
                        }
                        // Too old to serve by now: wait for the load.
                        None => wait.await,
                    },
                }
            }
            _ => wait.await,
        }
    }

    /// Runs the loader (under the distributed lock when configured) and stores its result in
    /// L2 and L1 — in L1 only if no invalidation of the key happened since the load began, and
    /// in L2 only if none happened before the write (a newer write must not be overwritten by
    /// what the loader read before it).
    async fn load_and_store<T, F, Fut, E>(
        self: Arc<Self>,
        key: String,
        eff: Eff,
        loader: F,
        began: Began,
        stale: Option<Prior>,
    ) -> Result<Found>
    where
        T: CacheValue,
        F: FnOnce(LoadContext<T>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Loaded<T>, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        // A waiter that gives up on the lock serves its stale value instead of loading, while
        // fail-safe may still serve it.
        let serve_until = stale.as_ref().and_then(|s| s.serve_until);
        let check_first = began.recheck();
        // Boxed: redis-rs futures are deep; keep them out of the caller's future type.
        #[cfg(feature = "redis")]
        let lock = {
            let wait: BoxFuture<'_, _> = Box::pin(self.lock_or_wait(
                &key,
                check_first,
                serve_until,
                &eff,
                (|ticket| self.found_in_l2::<T>(&key, &eff, ticket), true),
            ));
            match wait.await? {
                crate::backplane::LockOutcome::Found(v) => return Ok(v),
                crate::backplane::LockOutcome::Absent => return Ok((None, ValueSource::L2)),
                crate::backplane::LockOutcome::Proceed(guard) => guard,
            }
        };
        #[cfg(not(feature = "redis"))]
        let _ = (check_first, serve_until);
        let ticket = self.versions.ticket(&key);
        // The epoch the load begins in: its store is not made in a later one.
        let epoch_since = self.epoch_changes();
        Counters::bump(&self.counters.loads);
        let (stale, validator) = match stale {
            Some(p) => (p.value.downcast::<T>().ok(), p.validator),
            None => (None, None),
        };
        let context = LoadContext {
            validator: stale.as_ref().and(validator.clone()),
            key: key.clone(),
            stale: stale.clone(),
        };
        let span = tracing::info_span!(
            "ncm_cache.load",
            cache = %self.opts.name,
            key = %key,
            answer = tracing::field::Empty
        );
        let load = tracing::Instrument::instrument(loader(context), span.clone());
        #[cfg(feature = "redis")]
        let loaded = match &lock {
            Some(guard) => self.renewing(guard, load).await,
            None => load.await,
        };
        #[cfg(not(feature = "redis"))]
        let loaded = load.await;
        let loaded = loaded.map_err(|e| {
            Counters::bump(&self.counters.load_errors);
            CacheError::loader(e)
        });
        span.record(
            "answer",
            match &loaded {
                Ok(l) => match l.answer {
                    Answer::Value(_) if !l.cache => "value, not cached",
                    Answer::Value(_) => "value",
                    Answer::NotFound => "not found",
                    Answer::NotModified => "not modified",
                },
                Err(_) => "error",
            },
        );
        let result = match loaded {
            Err(e) => Err(e),
            Ok(loaded) => {
                let stored = self
                    .store_answer(
                        &key,
                        eff,
                        loaded,
                        (stale, validator),
                        &ticket,
                        epoch_since,
                        began,
                    )
                    .await;
                match stored {
                    Ok((found, Stored::Missed(held, ticket))) => Ok((
                        self.answer_missed::<T>(&key, &eff, found, &held, &ticket),
                        Stored::Cached,
                    )),
                    other => other,
                }
            }
        };
        #[cfg(feature = "redis")]
        if let Some(lock) = lock {
            use crate::backplane::LockNote;
            let note = match &result {
                // Waiters in other processes see the "not found" instead of loading again.
                Ok(((None, _), Stored::Cached)) => Some(LockNote::NotFound),
                // Nothing reached L2 for waiters to find: they load at once, not one by one.
                Ok((_, Stored::NotCached | Stored::Failed(_))) => Some(LockNote::NotCached),
                _ => None,
            };
            let release: BoxFuture<'_, ()> = match note {
                Some(note) => Box::pin(self.release_with_note(lock, note)),
                None => Box::pin(async move {
                    let _ = lock.release().await;
                }),
            };
            release.await;
        }
        result.map(|(found, _)| found)
    }

    /// The answer of a load whose read missed the value `held` that the cache held
    /// ([`Stored::Missed`], read with `ticket` taken before): that value, as from L2 (promoted
    /// as a read's would be), or the loaded one, served and not cached, if this build cannot
    /// decode it.
    fn answer_missed<T: CacheValue>(
        &self,
        key: &str,
        eff: &Eff,
        loaded: Found,
        held: &ncm_cache_core::Bytes,
        ticket: &Ticket,
    ) -> Found {
        match self.decode::<T>(key, held) {
            Ok(v) => {
                // (Counted once, as the miss it began as.)
                let v = Arc::new(v) as Object;
                self.promote(key, Arc::clone(&v), held.len(), ticket, eff);
                (Some(v), ValueSource::L2)
            }
            Err(e) => {
                tracing::debug!(key, error = %e, "the new epoch's value is unreadable here; \
                    the load's result served, not cached");
                Counters::bump(&self.counters.loads_not_cached);
                loaded
            }
        }
    }

    /// Caches what the loader answered, as it asked (adaptive caching), and says whether
    /// L2 got it (for the lock's waiters). After a miss whose L2 read found nothing (not an
    /// eager refresh), its value goes to L2 only while the key is still absent there.
    #[allow(clippy::too_many_arguments)]
    async fn store_answer<T: CacheValue>(
        &self,
        key: &str,
        mut eff: Eff,
        loaded: Loaded<T>,
        (stale, stale_validator): (Option<Arc<T>>, Option<Arc<str>>),
        ticket: &Ticket,
        epoch_since: Option<u64>,
        began: Began,
    ) -> Result<(Found, Stored)> {
        let after_miss = began.absent();
        let stored = if loaded.cache && eff.write_l2() {
            Stored::Cached
        } else {
            Stored::NotCached
        };
        if let Some(ttl) = loaded.ttl {
            if ttl.is_zero() {
                return Err(CacheError::InvalidArgument(format!(
                    "the loader of {key:?} answered with a zero TTL: answer \
                     Loaded::do_not_cache() for a value not to keep"
                )));
            }
            eff.l2_ttl = Some(ttl);
        }
        if let Some(ttl) = loaded.l1_ttl {
            if ttl.is_zero() {
                return Err(CacheError::InvalidArgument(format!(
                    "the loader of {key:?} answered with a zero L1 TTL: answer with \
                     EntryOptions::skip_l1_write on the call, or Loaded::do_not_cache()"
                )));
            }
            // A sliding entry's L1 copy still lasts half its idle time at most (see
            // `EntryOptions::resolve`): L1 hits re-arm nothing in L2 (review, helper-74).
            eff.l1_ttl = eff.sliding.map_or(ttl, |idle| ttl.min(idle / 2));
        }
        let (value, validator) = match loaded.answer {
            Answer::NotFound => {
                // The value this load refreshed (or stood in for) no longer exists at the
                // source: removed everywhere, unless the key was written or invalidated since.
                let mut ticket = *ticket;
                // Nor written or invalidated since the miss's L2 read, which found nothing: a
                // write between that read and the load's ticket (with client tracking, a
                // foreign write whose push came before the read's reply) stored nothing this
                // "not found" may replace or hide (review, helper-75).
                let since_miss = began.since().is_none_or(|t| self.versions.current(&t));
                if stale.is_some() && since_miss && self.versions.current(&ticket) {
                    if let Err(e) = self.delete_everywhere(key, &eff).await {
                        tracing::warn!(key, error = %e, "the loader found nothing, but the old value could not be removed");
                    }
                    ticket = self.versions.ticket(key);
                }
                if loaded.cache && eff.negative_ttl.is_some() && since_miss {
                    self.l1_fill(key, Fill::negative(), &ticket, &eff);
                }
                // Written or invalidated during the load (a delete because the row was just
                // inserted), or a link down (such an invalidation may be unheard): this "not
                // found" may be older than that, so the lock's waiters are not told it (they
                // load themselves).
                let stored = if since_miss
                    && self.versions.current(&ticket)
                    && self.l1_enabled.load(std::sync::atomic::Ordering::Acquire)
                {
                    stored
                } else {
                    Stored::NotCached
                };
                return Ok(((None, ValueSource::Loader), stored));
            }
            Answer::NotModified => {
                let Some(stale) = stale else {
                    return Err(CacheError::InvalidArgument(format!(
                        "the loader of {key:?} answered \"not modified\" but there was no value \
                         to keep (LoadContext::stale_value was None): answer Loaded::value"
                    )));
                };
                Counters::bump(&self.counters.not_modified);
                if !loaded.cache {
                    return Ok(((Some(stale as Object), ValueSource::Loader), stored));
                }
                self.tag(key, &loaded.tags, &eff).await?;
                let validator = loaded.validator.or(stale_validator);
                return self
                    .rearm(key, stale, validator, &eff, ticket, epoch_since)
                    .await;
            }
            Answer::Value(v) => (v, loaded.validator),
        };
        if !loaded.cache {
            return Ok((
                (Some(Arc::new(value) as Object), ValueSource::Loader),
                stored,
            ));
        }
        self.tag(key, &loaded.tags, &eff).await?;
        self.store_loaded(
            key,
            value,
            (ticket, epoch_since),
            &eff,
            validator,
            after_miss,
        )
        .await
    }

    /// Records a loader's tags before its value is written: a tag pointing at a key not yet
    /// written is harmless; the reverse is not. A sliding entry's tags do not expire (its
    /// lifetime has no bound known here): they stay until the tag is invalidated.
    async fn tag(&self, key: &str, tags: &[String], eff: &Eff) -> Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let Some(index) = self.tags.get() else {
            return Err(CacheError::Config(format!(
                "the loader of {key:?} tagged its value but the cache has no tag index: \
                 give one with MultiLevelBuilder::tag_index (e.g. a CacheStrategies' \
                 tag_index()) or drop the tags"
            )));
        };
        let lifetime = if eff.sliding.is_some() {
            None
        } else {
            eff.l2_ttl
        };
        index.tag(key, tags, lifetime).await
    }

    /// "Not modified": the stale value stays, its TTL re-armed in L2 (`PEXPIRE`, no payload
    /// write unless L2 lost the entry) and in L1 — only while L1 still holds that very value
    /// and no write or invalidation of the key came since the load began: otherwise what the
    /// loader compared against is no longer what is cached, and nothing is stored.
    async fn rearm<T: CacheValue>(
        &self,
        key: &str,
        value: Arc<T>,
        validator: Option<Arc<str>>,
        eff: &Eff,
        ticket: &Ticket,
        epoch_since: Option<u64>,
    ) -> Result<(Found, Stored)> {
        let object = Arc::clone(&value) as Object;
        // Whatever L2 holds stays there for the lock's waiters to find.
        let served = |stored| Ok(((Some(Arc::clone(&object)), ValueSource::Loader), stored));
        if self.l1_holds(key, &object).is_none() || !self.versions.current(ticket) {
            return served(Stored::Cached);
        }
        if eff.write_l2() {
            let kept = match eff.l2_ttl {
                Some(ttl) => self.l2_call("expire", self.l2.extend_ttl(key, ttl)).await,
                // No TTL to re-arm: only whether L2 still has it.
                None => self.l2_call("exists", self.l2.exists(key)).await,
            };
            match kept {
                Ok(true) => {}
                // Gone from L2 meanwhile: write it again, unless something else is there by
                // the time it lands.
                Ok(false) => {
                    let bytes = self.encode_with(key, &*value, eff)?;
                    return self
                        .store_encoded(
                            key,
                            Arc::clone(&object),
                            bytes,
                            (ticket, epoch_since),
                            eff,
                            validator,
                            true,
                        )
                        .await;
                }
                // L2's TTL unknown: L1 keeps its old deadlines (never past L2's).
                Err(e) => {
                    tracing::warn!(key, error = %e, "not-modified value: L2 TTL not re-armed");
                    return served(Stored::NotCached);
                }
            }
        }
        // Checked again after the L2 call: a promotion meanwhile (which bumps no version) may
        // have put a newer value there.
        if let Some(size) = self.l1_holds(key, &object) {
            let mut fill = Fill::value(Arc::clone(&object), size as usize, eff.l2_ttl);
            fill.validator = validator;
            self.l1_fill(key, fill, ticket, eff);
        }
        served(Stored::Cached)
    }

    async fn store_loaded<T: CacheValue>(
        &self,
        key: &str,
        v: T,
        since: (&Ticket, Option<u64>),
        eff: &Eff,
        validator: Option<Arc<str>>,
        after_miss: bool,
    ) -> Result<(Found, Stored)> {
        let bytes = self.encode_with(key, &v, eff)?;
        self.store_encoded(key, Arc::new(v), bytes, since, eff, validator, after_miss)
            .await
    }

    /// Writes L2 (only if the key is absent there, `after_miss`), then L1, then announces.
    /// `since`: the key's versions and the epoch's change count when the load began; a store
    /// after either moved is not made.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn store_encoded(
        &self,
        key: &str,
        object: Object,
        bytes: ncm_cache_core::Bytes,
        (ticket, epoch_since): (&Ticket, Option<u64>),
        eff: &Eff,
        validator: Option<Arc<str>>,
        after_miss: bool,
    ) -> Result<(Found, Stored)> {
        let size = bytes.len();
        // Remembered for deletes heard late (`recent.rs`), from before the version check.
        let tracked = eff
            .write_l2()
            .then(|| crate::cache::Tracked::begin(self, key, &bytes, eff, !after_miss));
        if !self.versions.current(ticket) {
            if let Some(t) = tracked {
                t.abandon();
            }
            Counters::bump(&self.counters.loads_not_cached);
            tracing::debug!(
                key,
                "key invalidated during the load; result served, not cached"
            );
            return Ok(((Some(object), ValueSource::Loader), Stored::NotCached));
        }
        let ttl = eff.l2_ttl;
        let write = self.versions.write_begin(key);
        let mut guard =
            crate::cache::Unannounced::new(self, key, Some(write)).announce(eff.announce());
        let written = if !eff.write_l2() {
            Ok(Placed::Stored)
        } else {
            let how = if after_miss {
                crate::epoch::Store::IfAbsent
            } else {
                crate::epoch::Store::Replace
            };
            self.l2_call("set", self.place(key, bytes, ttl, how, epoch_since))
                .await
        };
        // Disarmed only after the withdrawal a failed store may owe: as in `write_loaded`.
        let tracked = crate::cache::Tracked::after(
            tracked,
            written.as_ref().map(|placed| *placed == Placed::Stored),
        )
        .await;
        guard.disarm();
        let mut fill = Fill::value(Arc::clone(&object), size, ttl);
        fill.validator = validator;
        let stored = match written {
            // Written since the miss, here or elsewhere (announced or not): what L2 holds
            // is at least as new as this load, and its waiters find it there.
            Ok(placed @ (Placed::Refused | Placed::Moved)) => {
                let _ = self.versions.write_end(&write);
                // A "not modified" value whose L2 copy was gone (`rearm`): L1 holds it and L2
                // now holds something else.
                if self.l1_holds(key, &object).is_some() {
                    let _ = self.l1.remove(key);
                }
                // The load's read may have looked in an epoch a clear had left: the new one's
                // value is the answer (read with a ticket taken first, as every fill's read).
                // Nothing there (or the read failed): nothing in L2 for the lock's waiters.
                let moved = placed == Placed::Moved;
                let held = if moved {
                    let ticket = self.versions.ticket(key);
                    match self.l2_get(key, eff).await {
                        Ok(Some(held)) => Some(Stored::Missed(held, ticket)),
                        _ => None,
                    }
                } else {
                    None
                };
                held.unwrap_or_else(|| {
                    Counters::bump(&self.counters.loads_not_cached);
                    tracing::debug!(
                        key,
                        "written since the load's miss; result served, not cached"
                    );
                    if moved {
                        Stored::NotCached
                    } else {
                        Stored::Cached
                    }
                })
            }
            Ok(Placed::Stored) => {
                self.settle_load(key, fill, &write, eff);
                if let Some(t) = tracked {
                    t.finish().await;
                }
                if eff.write_l2() && eff.announce() {
                    self.publish_loaded(key).await;
                }
                if eff.write_l2() {
                    Stored::Cached
                } else {
                    Stored::NotCached
                }
            }
            // The value is still good: serve it and keep it in L1; count the failure. (After a
            // miss, as a load's store: an "only if absent" write that landed came before any
            // caller's write that overlapped it.)
            Err(e) => {
                tracing::warn!(key, error = %e, "loaded value not written to L2");
                if after_miss {
                    self.settle_load(key, fill, &write, eff);
                } else {
                    self.settle_write(key, fill, &write, eff);
                }
                Stored::Failed(e)
            }
        };
        Ok(((Some(object), ValueSource::Loader), stored))
    }
}

/// How a load began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Began {
    /// An eager refresh of a fresh L1 value (it replaces the value in L2).
    Refresh,
    /// A miss; `absent`: L2 was read and held nothing, so the load stores only while the key
    /// is still absent there (not after a skipped, failed or unreadable L2 read). `since`: the
    /// ticket taken before that read.
    Miss { absent: bool, since: Ticket },
}

impl Began {
    /// Whether the flight looks at L1 (and the lock's holder at L2) again first.
    fn recheck(self) -> bool {
        matches!(self, Self::Miss { .. })
    }

    fn absent(self) -> bool {
        matches!(self, Self::Miss { absent: true, .. })
    }

    /// The ticket taken before the miss's L2 read (`None` for a refresh).
    fn since(self) -> Option<Ticket> {
        match self {
            Self::Miss { since, .. } => Some(since),
            Self::Refresh => None,
        }
    }
}

/// Whether a load's answer reached L2, where the lock's waiters look.
#[derive(Debug, Clone)]
pub(crate) enum Stored {
    Cached,
    NotCached,
    /// Not stored: the load's L2 read looked in an epoch a clear had already left (not heard
    /// of yet), and the new epoch holds this entry (read with this ticket). That value is the
    /// caller's answer, as a read in the right epoch would have found it
    /// (`Inner::answer_missed`); the lock's waiters find it in L2.
    Missed(ncm_cache_core::Bytes, Ticket),
    /// Not stored: the L2 write failed (the value kept in L1, served). Treated as
    /// [`Stored::NotCached`] but by `set_loaded`, whose caller learns the error.
    Failed(CacheError),
}

fn source_name(source: ValueSource) -> &'static str {
    match source {
        ValueSource::L1 => "L1",
        ValueSource::L2 => "L2",
        ValueSource::Stale => "Stale",
        ValueSource::Loader => "Loader",
        _ => "other",
    }
}

fn ended() -> CacheError {
    CacheError::loader("the load task ended without a result (it panicked or was aborted)")
}

type LoadResult = Option<Result<Found>>;

/// Background loads in flight (with loader timeouts): key → the receiver of its result.
#[derive(Default)]
pub(crate) struct Loads(std::sync::Mutex<HashMap<String, watch::Receiver<LoadResult>>>);

/// Frees the key when the load task ends, however it ends (also when it panics).
struct Landed<'a> {
    loads: &'a Loads,
    key: Option<String>,
    rx: watch::Receiver<LoadResult>,
}

impl Drop for Landed<'_> {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            let mut map = self.loads.lock();
            if map.get(key).is_some_and(|rx| rx.same_channel(&self.rx)) {
                map.remove(key);
            }
        }
    }
}

impl Loads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<LoadResult>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<C: Codec> Inner<C> {
    /// Joins the background load named `key` (a [`flight_key`](crate::versions::Versions::flight_key))
    /// in flight, or starts one as a task (`key` `None`: a load of its own, not shared).
    fn join_or_start(
        self: &Arc<Self>,
        key: Option<&str>,
        start: impl FnOnce() -> BoxFuture<'static, Result<Found>>,
    ) -> watch::Receiver<LoadResult> {
        let (tx, rx) = watch::channel(None);
        if let Some(key) = key {
            let mut map = self.loads.lock();
            if let Some(rx) = map.get(key) {
                return rx.clone();
            }
            map.insert(key.to_owned(), rx.clone());
        }
        let work = start();
        let this = Arc::clone(self);
        let key = key.map(str::to_owned);
        let watched = rx.clone();
        tokio::spawn(async move {
            let landed = Landed {
                loads: &this.loads,
                key,
                rx: watched,
            };
            let result = work.await;
            // Free the key first: a caller arriving after this load ended starts its own
            // instead of joining a finished one (whose result may predate its call).
            drop(landed);
            tx.send_replace(Some(result));
        });
        rx
    }
}

/// How long a waiter sleeps between L2 polls, growing from 5 ms to 100 ms.
#[cfg(feature = "redis")]
pub(crate) fn backoff(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_millis((5u64 << attempt.min(5)).min(100))
}

/// Ends a key's background refresh when dropped (finished, failed, cancelled or panicked).
struct RefreshDone<'a, C>(&'a Arc<Inner<C>>, &'a str);

impl<C> Drop for RefreshDone<'_, C> {
    fn drop(&mut self) {
        self.0.refreshing.end(self.1);
    }
}

/// Keys with a background refresh under way.
#[derive(Debug, Default)]
pub(crate) struct Refreshing(std::sync::Mutex<std::collections::HashSet<String>>);

impl Refreshing {
    /// `true` when the caller should start the refresh (nobody else is).
    pub(crate) fn begin(&self, key: &str) -> bool {
        self.0
            .lock()
            .map(|mut set| set.insert(key.to_owned()))
            .unwrap_or(false)
    }

    pub(crate) fn end(&self, key: &str) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(key);
        }
    }
}
