//! Time-based invalidation: give a key a TTL and run a callback when it is gone.
//!
//! With a Redis cache (feature `redis`), expirations are observed through keyspace
//! notifications (`__keyevent@<db>__:expired`); otherwise — or when the server refuses
//! `CONFIG SET` — a timer checks the key when its TTL runs out (and again if the TTL was
//! extended meanwhile).
//!
//! Trade-off of notifications: every instance receives the expiry events of the whole database
//! (filtered here by prefix and registration), in exchange for one connection and callbacks that
//! follow the real expiry. Both paths are at-most-once per registration; after a break of the
//! notification connection, the watched keys are checked again so no expiry is missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use ncm_cache_core::{CacheError, KeyTtl, Result};
use tokio::task::JoinHandle;

use super::Invalidator;
use crate::stats::Kind;

/// Called with the key once it has expired.
pub(crate) type ExpiryCallback = Arc<dyn Fn(&str) + Send + Sync>;

struct Entry {
    token: u64,
    callback: ExpiryCallback,
    task: Option<JoinHandle<()>>,
}

/// The keys watched by this instance.
#[derive(Default)]
pub(crate) struct Timers {
    entries: Mutex<HashMap<String, Entry>>,
    next: AtomicU64,
}

impl Timers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes the registration of `key` if it is still `token`'s (any when `None`).
    fn take(&self, key: &str, token: Option<u64>) -> Option<Entry> {
        let mut entries = self.lock();
        match entries.get(key) {
            Some(e) if token.is_none_or(|t| t == e.token) => entries.remove(key),
            _ => None,
        }
    }

    /// Keys watched through keyspace notifications (no timer of their own).
    #[cfg(feature = "redis")]
    pub(crate) fn notified_keys(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, e)| e.task.is_none())
            .map(|(k, _)| k.clone())
            .collect()
    }
}

impl Drop for Timers {
    fn drop(&mut self) {
        for (_, e) in self.lock().drain() {
            if let Some(task) = e.task {
                task.abort();
            }
        }
    }
}

impl Invalidator {
    /// Sets `key` to expire after `ttl` and runs `callback` once it is gone. Returns `false`
    /// (registering nothing) when the key does not exist. A new registration for the same key
    /// replaces the previous one.
    pub(crate) async fn time_based(
        self: &Arc<Self>,
        key: &str,
        ttl: Duration,
        callback: ExpiryCallback,
    ) -> Result<bool> {
        if ttl.is_zero() {
            return Err(CacheError::InvalidArgument(
                "a TTL must be greater than zero (delete the key instead)".into(),
            ));
        }
        let notified = self.expirations_notified().await;
        let token = self.timers.next.fetch_add(1, Ordering::Relaxed);
        // Registered before the TTL is set, so a notification for a tiny TTL is not missed.
        let previous = self.timers.lock().insert(
            key.to_owned(),
            Entry {
                token,
                callback,
                task: None,
            },
        );
        if let Some(task) = previous.and_then(|p| p.task) {
            task.abort();
        }
        let exists = match self.backend.extend_ttl(key, ttl).await {
            Ok(exists) => exists,
            Err(e) => {
                self.timers.take(key, Some(token));
                return Err(e);
            }
        };
        if !exists {
            self.timers.take(key, Some(token));
            return Ok(false);
        }
        if !notified {
            let task = tokio::spawn(watch(Arc::downgrade(self), key.to_owned(), token, ttl));
            match self.timers.lock().get_mut(key) {
                Some(e) if e.token == token => e.task = Some(task),
                _ => task.abort(), // replaced or fired meanwhile
            }
        }
        Ok(true)
    }

    /// `true` when expirations arrive as Redis keyspace notifications (else timers are used).
    async fn expirations_notified(self: &Arc<Self>) -> bool {
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.remote {
            return remote.keyspace_ready(self).await;
        }
        false
    }

    /// Runs the callback of `key` (once) if it is still registered under `token`, after
    /// dropping this instance's own copy of it (a multi-level cache's L1, an in-process cache
    /// coordinated through Redis), and tells other instances to drop theirs (through the
    /// strategies' Redis coordination) after it. Those copies may outlive the shared entry (a
    /// promotion does not know the entry's remaining TTL), so the callback ran while they were
    /// still served (found by review).
    pub(crate) async fn fire_expired(&self, key: &str, token: Option<u64>) {
        let Some(entry) = self.timers.take(key, token) else {
            return;
        };
        self.stats.expiration_observed();
        self.stats.invalidated(Kind::Time, 0);
        // Local first (no network), then the callback, then the other instances.
        if let Err(e) = self.backend.evict_local(&[key]).await {
            tracing::warn!(key, error = %e, "could not evict an expired key's local copy");
        }
        self.run_callback("time", || (entry.callback)(key));
        self.broadcast(super::Broadcast::Keys {
            keys: vec![key.to_owned()],
        })
        .await;
    }

    /// Stops watching `key`; `true` when it was watched.
    pub(crate) fn cancel_time_based(&self, key: &str) -> bool {
        match self.timers.take(key, None) {
            Some(e) => {
                if let Some(task) = e.task {
                    task.abort();
                }
                true
            }
            None => false,
        }
    }
}

/// Waits for the TTL, then checks the key: gone → callback; TTL extended → wait again;
/// persistent now → stop watching.
async fn watch(inv: Weak<Invalidator>, key: String, token: u64, first: Duration) {
    let mut wait = first;
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(wait).await;
        let Some(inv) = inv.upgrade() else { return };
        match inv.backend.get_ttl(&key).await {
            Ok(KeyTtl::Missing) => {
                inv.fire_expired(&key, Some(token)).await;
                return;
            }
            Ok(KeyTtl::Expires(left)) => {
                failures = 0;
                wait = left.saturating_add(Duration::from_millis(1));
            }
            Ok(KeyTtl::Persistent) => {
                tracing::debug!(
                    key,
                    "key no longer expires: time-based invalidation dropped"
                );
                inv.timers.take(&key, Some(token));
                return;
            }
            Err(e) => {
                failures += 1;
                wait = (Duration::from_millis(50) * 2u32.pow(failures.min(7)))
                    .min(Duration::from_secs(5));
                tracing::debug!(key, error = %e, retry_in = ?wait, "could not check an expiring key");
            }
        }
    }
}
