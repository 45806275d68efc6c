//! The write-behind stores still in flight, per key, so that an invalidation made through the
//! loader after a load lands after that load's store.
//!
//! A `WriteBehind` load returns before its store (a spawned task). A caller that then
//! invalidates the key (`CacheLoader::invalidate`, `invalidate_all`, a handle's `invalidate`)
//! expects the value gone; on a backend that keeps no load marks (plain Redis), the spawned
//! store could reach Redis after the `DEL` and put the value back for its TTL. The store holds
//! a read guard of its key's lock; an invalidation takes the write guard first, so it waits
//! for the stores begun before it (at most [`SETTLE_BOUND`]). Stores begun while an
//! invalidation waits are concurrent with it and do not hold it up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, RwLock};

/// How long an invalidation waits for the stores begun before it. Each store is bounded by
/// its backend's own timeouts; this only keeps a backend without any from holding an
/// invalidation up for good (it then goes ahead, and the store may land after it).
pub(crate) const SETTLE_BOUND: Duration = Duration::from_secs(10);

/// Shards of the map, so that loads of different keys rarely meet on one mutex.
const SHARDS: usize = 16;

/// Keys with stores in flight, each with the lock its stores read-hold.
#[derive(Default)]
pub(crate) struct PendingStores {
    shards: [Mutex<HashMap<String, Arc<RwLock<()>>>>; SHARDS],
}

/// Held by one spawned store until it ends.
pub(crate) struct PendingGuard {
    stores: Arc<PendingStores>,
    key: String,
    held: Option<OwnedRwLockReadGuard<()>>,
}

impl PendingStores {
    /// Marks a store of `key` as in flight (before it is spawned, so that an invalidation
    /// the caller makes next sees it).
    pub(crate) fn enter(self: &Arc<Self>, key: &str) -> PendingGuard {
        let mut keys = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let lock = keys.entry(key.to_owned()).or_default();
        // Refused while an invalidation waits on this lock (a waiting writer refuses new
        // readers): that invalidation keeps it, and this store and the invalidations after it
        // take a new one, so one made after this store's load returned still waits for it
        // (review, helper-94 #1). A new lock has no writer: its read guard is always given.
        let held = Arc::clone(lock).try_read_owned().ok().or_else(|| {
            *lock = Arc::default();
            Arc::clone(lock).try_read_owned().ok()
        });
        PendingGuard {
            stores: Arc::clone(self),
            key: key.to_owned(),
            held,
        }
    }

    /// The shard of `key`.
    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Arc<RwLock<()>>>> {
        let i = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) as usize % SHARDS;
        &self.shards[i]
    }

    /// Waits until the stores of `key` begun before this call have ended.
    pub(crate) async fn settled(&self, key: &str) {
        let lock = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned();
        if let Some(lock) = lock {
            let _ = tokio::time::timeout(SETTLE_BOUND, self.wait(key.to_owned(), lock)).await;
        }
    }

    /// Waits until the stores of every key starting with `prefix` begun before this call have
    /// ended.
    pub(crate) async fn settled_under(&self, prefix: &str) {
        let mut locks: Vec<(String, Arc<RwLock<()>>)> = Vec::new();
        for shard in &self.shards {
            let keys = shard.lock().unwrap_or_else(PoisonError::into_inner);
            locks.extend(
                keys.iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, l)| (k.clone(), Arc::clone(l))),
            );
        }
        let waits = locks.into_iter().map(|(k, l)| self.wait(k, l));
        let _ = tokio::time::timeout(SETTLE_BOUND, futures_util::future::join_all(waits)).await;
    }

    /// Waits for `lock`'s write guard; `key`'s entry is dropped afterwards if idle, also when
    /// this wait is cancelled (review, helper-94 #2: the entry stayed).
    async fn wait(&self, key: String, lock: Arc<RwLock<()>>) {
        let waiting = Waiting {
            stores: self,
            key,
            lock: Some(lock),
        };
        if let Some(lock) = &waiting.lock {
            drop(lock.write().await);
        }
    }

    /// Drops `key`'s entry once no store or invalidation holds its lock.
    fn forget_if_idle(&self, key: &str) {
        let mut keys = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if keys.get(key).is_some_and(|l| Arc::strong_count(l) == 1) {
            keys.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// An invalidation's wait for one key's lock.
struct Waiting<'a> {
    stores: &'a PendingStores,
    key: String,
    lock: Option<Arc<RwLock<()>>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        drop(self.lock.take());
        self.stores.forget_if_idle(&self.key);
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        // The guard's own `Arc` of the lock goes first, so the count below sees only others.
        drop(self.held.take());
        self.stores.forget_if_idle(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_invalidation_waits_for_the_stores_begun_before_it_and_entries_are_dropped() {
        let stores = Arc::new(PendingStores::default());
        let first = stores.enter("loader:a:1");
        let other = stores.enter("loader:b:1");
        let waiting = {
            let stores = Arc::clone(&stores);
            tokio::spawn(async move { stores.settled("loader:a:1").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "did not wait for the store");
        // Begun while the invalidation waits: does not hold it up, but one made after it
        // waits for it (review, helper-94 #1: it did not).
        let later = stores.enter("loader:a:1");
        let after_later = {
            let stores = Arc::clone(&stores);
            tokio::spawn(async move { stores.settled("loader:a:1").await })
        };
        drop(first);
        waiting.await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !after_later.is_finished(),
            "an invalidation after the later store did not wait for it"
        );
        drop(later);
        after_later.await.unwrap();
        // A wait cancelled after its store ended leaves no entry behind (helper-94 #2).
        let cancelled = stores.enter("loader:c:1");
        let waiter = {
            let stores = Arc::clone(&stores);
            tokio::spawn(async move { stores.settled("loader:c:1").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiter.abort();
        drop(cancelled);
        let _ = waiter.await;
        let under = {
            let stores = Arc::clone(&stores);
            tokio::spawn(async move { stores.settled_under("loader:b:").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !under.is_finished(),
            "did not wait for the store under the prefix"
        );
        drop(other);
        under.await.unwrap();
        assert_eq!(stores.len(), 0);
        // Nothing in flight: no wait.
        stores.settled("loader:a:1").await;
    }
}
