//! Event-based invalidation: keys and callbacks registered under an event name, run when the
//! event is triggered — here or, with Redis, on any instance.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use ncm_cache_core::Result;

use super::{Broadcast, Invalidator, check_name};
use crate::stats::Kind;

/// Called with the event name and the keys it invalidated.
pub(crate) type EventCallback = Arc<dyn Fn(&str, &[String]) + Send + Sync>;

struct Handler {
    keys: Vec<String>,
    callback: EventCallback,
}

/// The registrations of this instance.
#[derive(Default)]
pub(crate) struct Events {
    handlers: Mutex<HashMap<String, Vec<Arc<Handler>>>>,
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<Handler>>>> {
        self.handlers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn handlers(&self, event: &str) -> Vec<Arc<Handler>> {
        self.lock().get(event).cloned().unwrap_or_default()
    }

    /// Events with registrations here.
    pub(crate) fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

impl Invalidator {
    /// Registers `keys` and `callback` under `event` (handlers accumulate; each trigger runs all).
    /// With Redis, the keys are also registered in Redis, for every instance: a trigger
    /// anywhere deletes them, also after this instance is gone; the callback runs here only.
    pub(crate) async fn register_event(
        &self,
        event: &str,
        keys: Vec<String>,
        callback: EventCallback,
    ) -> Result<()> {
        check_name("event", event)?;
        for key in &keys {
            ncm_cache_core::validate_key(key, ncm_cache_core::DEFAULT_MAX_KEY_LEN)?;
        }
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.remote {
            Box::pin(remote.register_event_keys(event, &keys)).await?;
        }
        self.events
            .lock()
            .entry(event.to_owned())
            .or_default()
            .push(Arc::new(Handler { keys, callback }));
        Ok(())
    }

    /// Triggers `event`: deletes every key registered for it — by any instance, with Redis —
    /// then tells the other instances (which run their callbacks), and runs this instance's
    /// callbacks. Returns how many keys existed.
    pub(crate) async fn trigger_event(&self, event: &str) -> Result<u64> {
        check_name("event", event)?;
        self.stats.event_triggered();
        #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
        let mut complete = true;
        #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
        let mut keys: BTreeSet<String> = self
            .events
            .handlers(event)
            .iter()
            .flat_map(|h| h.keys.iter().cloned())
            .collect();
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.remote {
            match Box::pin(remote.event_keys(event)).await {
                Ok(shared) => keys.extend(shared),
                Err(e) => {
                    complete = false;
                    tracing::warn!(event, error = %e, "event registrations of other instances unavailable; deleting this instance's keys, the others delete theirs")
                }
            }
        }
        let keys: Vec<String> = keys.into_iter().collect();
        let deleted = self.delete_keys(&keys, Kind::Event).await?;
        self.broadcast(Broadcast::Event {
            event: event.to_owned(),
            complete,
        })
        .await;
        self.run_event(event, false).await?;
        Ok(deleted)
    }

    /// Runs this instance's handlers of `event`: deletes their keys (each once), then calls
    /// the callbacks (after the keys are gone). `evict_only`: another instance triggered it
    /// and deleted the keys registered anywhere from the cache already; only what this
    /// instance keeps alone is evicted ([`CacheBackend::evict_local`]), so a write to a shared
    /// cache since the trigger stays.
    ///
    /// [`CacheBackend::evict_local`]: ncm_cache_core::CacheBackend::evict_local
    pub(crate) async fn run_event(&self, event: &str, evict_only: bool) -> Result<u64> {
        let handlers = self.events.handlers(event);
        if handlers.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = handlers
            .iter()
            .flat_map(|h| h.keys.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let deleted = if evict_only {
            self.evict_remote(&keys, Kind::Event).await?
        } else {
            self.delete_local(&keys, Kind::Event).await?
        };
        for h in &handlers {
            self.run_callback("event", || (h.callback)(event, &h.keys));
        }
        Ok(deleted)
    }
}
