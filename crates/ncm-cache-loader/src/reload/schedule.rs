//! Timers: eager reloads and scheduled reloads, each with one owner across instances.
//!
//! Every tick, the instance holding the timer's lease (`reload:{name}` for a schedule,
//! `reload:{name}:eager` for an eager timer) renews it for 1.5 intervals and reloads; the
//! others fail to take it and skip the tick. If the owner stops (or dies), its lease is
//! released (or expires) and the next instance to tick takes over.

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

pub(crate) fn eager_task(name: &str) -> String {
    format!("reload:{name}:eager")
}

pub(crate) fn scheduled_task(name: &str) -> String {
    format!("reload:{name}")
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
            every,
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

impl<C: Codec> Timer<C> {
    async fn run(self, eager: bool, mut stopped: watch::Receiver<bool>) {
        let lease_ttl = self.every.mul_f64(1.5).max(Duration::from_millis(10));
        let start = if eager {
            Instant::now()
        } else {
            Instant::now() + self.every
        };
        let mut ticker = tokio::time::interval_at(start, self.every);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut owned: Option<Box<dyn Lease>> = None;
        loop {
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
            owned = self.own(&reloader, owned.take(), lease_ttl).await;
            if owned.is_none() {
                bump(&entry.counters.skipped_ticks);
                continue;
            }
            bump(&entry.counters.owned_ticks);
            tokio::select! {
                biased;
                _ = stopped.changed() => break,
                result = reloader.reload_entry(&entry, true) => {
                    if result.is_err() && eager {
                        // An eager value must not expire: retry well before it does.
                        ticker.reset_after(self.every / 4);
                    }
                }
            }
        }
        if let Some(lease) = owned {
            // Hand the timer over to another instance at its next tick.
            let _ = lease.release().await;
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
