//! Timers: eager reloads and scheduled reloads, each with one owner across instances.
//!
//! One instance at a time owns a timer: it holds the timer's lease (`reload:{name}:schedule`
//! for a schedule, `reload:{name}:eager` for an eager timer), renews it every third of its TTL (also
//! while a load runs) and reloads when a reload is due; the others try to take the lease as
//! often, and skip. The lease is short (see [`timer_lease_ttl`]): if the owner stops, it is
//! released; if it dies, it expires and another instance takes over, reloading an eager value
//! at its reload point (at once when the value is missing) — before it expires.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ncm_cache_core::Codec;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::entry::bump;
use super::{CacheReloader, Inner};
use crate::lease::Lease;

/// A running timer task.
pub(crate) struct Task {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl Task {
    /// Signals the task and waits until it has ended (and released its lease).
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.handle.await {
            tracing::warn!(error = %e, "reload timer ended abnormally");
        }
    }
}

/// The eager timer of `name` (also its lease's name). Every timer and lease name ends with its
/// kind (`:eager`, `:schedule`, and the run lease's `:run`), so no two names of different kinds
/// or values are equal: the schedule's was `reload:{name}`, and a schedule of `a:eager`
/// replaced the eager timer of `a`, one of `a:run` held `a`'s run lease (review, helper-71).
pub(crate) fn eager_task(name: &str) -> String {
    format!("reload:{name}:eager")
}

/// The schedule of `name` (also its lease's name); see [`eager_task`].
pub(crate) fn scheduled_task(name: &str) -> String {
    format!("reload:{name}:schedule")
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single map operations only: a panic cannot leave the map inconsistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<C: Codec> CacheReloader<C> {
    /// Starts the timer `task` (also its lease name) reloading `name` every `every`. An
    /// `eager` timer reloads at once, and retries a failed reload after a quarter interval; a
    /// schedule first reloads after one interval.
    pub(super) fn spawn_task(
        &self,
        runtime: &Handle,
        task: String,
        name: &str,
        every: Duration,
        eager: bool,
    ) {
        let (stop, stopped) = watch::channel(false);
        let timer = Timer {
            reloader: Arc::downgrade(&self.inner),
            lease_name: task.clone(),
            name: name.to_owned(),
            // `Duration::MAX` ("never again") must not overflow the timer's deadlines.
            every: ncm_cache_core::capped(every),
        };
        let handle = runtime.spawn(timer.run(eager, stopped));
        let old = lock(&self.inner.tasks).insert(task, Task { stop, handle });
        if let Some(old) = old {
            // Replaced without waiting (we may be in a sync caller): it ends at its next poll.
            let _ = old.stop.send(true);
        }
    }

    /// Signals the timer `task` to stop without waiting for it.
    pub(super) fn stop_task(&self, task: &str) {
        if let Some(old) = lock(&self.inner.tasks).remove(task) {
            let _ = old.stop.send(true);
        }
    }

    /// Stops the timer `task` and waits for it; `false` when there was none.
    pub(super) async fn cancel_task(&self, task: &str) -> bool {
        let Some(old) = lock(&self.inner.tasks).remove(task) else {
            return false;
        };
        old.stop().await;
        true
    }
}

struct Timer<C> {
    reloader: Weak<Inner<C>>,
    lease_name: String,
    name: String,
    every: Duration,
}

/// The timer lease's TTL: for an eager value a quarter of the time between a reload and the
/// value's expiry (so that, when the owner dies, another instance — which tries every third
/// of it — takes over and reloads well before the value expires); for a schedule a quarter of
/// the interval. At least 30 ms, at most 15 s.
pub(crate) fn timer_lease_ttl(every: Duration, value_ttl: Option<Duration>) -> Duration {
    let slack = match value_ttl {
        Some(ttl) => ttl.saturating_sub(every),
        None => every,
    };
    (slack / 4).clamp(Duration::from_millis(30), Duration::from_secs(15))
}

impl<C: Codec> Timer<C> {
    /// Every third of the lease TTL, the owner renews its lease and the others try to take
    /// it; the owner reloads when a reload is due, renewing the lease while the load runs.
    async fn run(self, eager: bool, mut stopped: watch::Receiver<bool>) {
        let (value_ttl, shortest) = match self.reloader.upgrade() {
            Some(inner) => {
                let reloader = CacheReloader { inner };
                match reloader.entry(&self.name) {
                    // An eager value's takeover must come before the shortest TTL the cache's
                    // jitter may store it with (review, helper-72), as the timer itself does.
                    Ok(entry) => (
                        entry.ttl,
                        ncm_cache_core::capped(entry.ttl)
                            .mul_f64(1.0 - reloader.inner.cache.ttl_policy().jitter()),
                    ),
                    Err(_) => return,
                }
            }
            None => return,
        };
        let lease_ttl = timer_lease_ttl(self.every, eager.then_some(shortest));
        let mut ticker = tokio::time::interval(lease_ttl / 3);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut owned: Option<Box<dyn Lease>> = None;
        // When this instance, owning the timer, reloads next.
        let mut due: Option<Instant> = None;
        // Interval ticks a non-owner lets pass (`skipped_ticks`).
        let mut next_skip = Instant::now() + self.every;
        'ticks: loop {
            tokio::select! {
                biased;
                _ = stopped.changed() => break,
                _ = ticker.tick() => {}
            }
            // The task holds only a weak reference: dropping the reloader ends it.
            let Some(inner) = self.reloader.upgrade() else {
                break;
            };
            let reloader = CacheReloader { inner };
            let Ok(entry) = reloader.entry(&self.name) else {
                break;
            };
            let was_owner = owned.is_some();
            owned = self.own(&reloader, owned.take(), lease_ttl).await;
            if owned.is_none() {
                due = None;
                if Instant::now() >= next_skip {
                    bump(&entry.counters.skipped_ticks);
                    next_skip = Instant::now() + self.every;
                }
                continue;
            }
            if !was_owner {
                due = Some(self.first_due(&reloader, eager, value_ttl).await);
            }
            let now = Instant::now();
            if due.is_some_and(|d| now < d) {
                continue;
            }
            bump(&entry.counters.owned_ticks);
            // A schedule skips a run when another instance's reload wrote the value less than
            // half an interval ago (it held the run lease while this one took the timer over,
            // e.g. after the old owner stalled past its lease).
            let fresh_within = (!eager).then_some(self.every / 2);
            let reload = reloader.reload_entry(&entry, super::run::Force::Timer, fresh_within);
            let mut reload = std::pin::pin!(reload);
            let result = loop {
                tokio::select! {
                    biased;
                    _ = stopped.changed() => break 'ticks,
                    result = &mut reload => break result,
                    // A long load keeps the timer: renew while it runs.
                    _ = ticker.tick() => {
                        owned = self.own(&reloader, owned.take(), lease_ttl).await;
                    }
                }
            };
            due = Some(match result {
                // An eager value must not expire: retry well before it does.
                Err(_) if eager => Instant::now() + self.every / 4,
                // Another instance's reload held the run lease and left no value: look again
                // soon, not an interval later.
                Err(e) if e.is_timeout() => Instant::now() + lease_ttl,
                // Another instance held the reload (and may have died holding it): look
                // again soon.
                Ok(r) if eager && !r.ran => Instant::now() + lease_ttl,
                // Skipped, the value being fresh: one interval after it was written.
                Ok(r) if !r.ran => self.first_due(&reloader, false, value_ttl).await,
                _ => now + self.every,
            });
        }
        if let Some(lease) = owned {
            // Hand the timer over to another instance at its next try.
            let _ = lease.release().await;
        }
    }

    /// When a new owner reloads first: one interval after the value was last written (its age
    /// is its TTL minus what is left of it), so a change of owner (a restart, a deploy) neither
    /// restarts the countdown nor reloads early. Without a value to tell: an eager timer at
    /// once, a schedule after one interval.
    async fn first_due(
        &self,
        reloader: &CacheReloader<C>,
        eager: bool,
        value_ttl: Duration,
    ) -> Instant {
        let now = Instant::now();
        match reloader.value_age(&self.name, value_ttl).await {
            Some(age) => now + self.every.saturating_sub(age),
            None if eager => now,
            None => now + self.every,
        }
    }

    /// Renews the lease this instance holds, or tries to take it.
    async fn own(
        &self,
        reloader: &CacheReloader<C>,
        held: Option<Box<dyn Lease>>,
        ttl: Duration,
    ) -> Option<Box<dyn Lease>> {
        if let Some(lease) = held {
            match lease.extend(ttl).await {
                Ok(true) => return Some(lease),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(timer = %self.lease_name, error = %e, "could not renew a reload lease");
                    return None;
                }
            }
        }
        match reloader
            .inner
            .leases
            .try_acquire(&self.lease_name, ttl)
            .await
        {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(timer = %self.lease_name, error = %e, "could not take a reload lease");
                None
            }
        }
    }
}
