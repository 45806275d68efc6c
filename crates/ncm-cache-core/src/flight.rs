//! Single-flight: concurrent loads of one key run the loader once and share its result.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use crate::error::{CacheError, Result};

type Call<V> = Arc<OnceCell<Result<V>>>;

/// Deduplicates concurrent work per key: while one caller runs the loader for a key, every
/// other caller of that key waits for the same result — value or error — instead of running
/// it again. Once the flight lands, the key is free: the next call runs the loader again, so
/// errors are never cached.
///
/// If the caller running the loader is cancelled (its future dropped), one of the waiters takes
/// over and runs its own loader, so a cancelled request never strands the others.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use ncm_cache_core::SingleFlight;
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// let flight = Arc::new(SingleFlight::<String, u64>::new());
/// let runs = Arc::new(AtomicUsize::new(0));
/// let tasks: Vec<_> = (0..100)
///     .map(|_| {
///         let (flight, runs) = (flight.clone(), runs.clone());
///         tokio::spawn(async move {
///             flight
///                 .run("user:1".to_string(), || async move {
///                     runs.fetch_add(1, Ordering::SeqCst);
///                     tokio::time::sleep(std::time::Duration::from_millis(50)).await;
///                     Ok(42)
///                 })
///                 .await
///         })
///     })
///     .collect();
/// for t in tasks {
///     assert_eq!(t.await.unwrap().unwrap(), 42);
/// }
/// assert_eq!(runs.load(Ordering::SeqCst), 1);
/// # });
/// ```
#[derive(Debug)]
pub struct SingleFlight<K, V> {
    calls: Mutex<HashMap<K, Call<V>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            calls: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    /// An empty single-flight group.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `load` for `key` unless a load for `key` is already in flight, in which case waits
    /// for that one and returns a clone of its result.
    pub async fn run<F, Fut>(&self, key: K, load: F) -> Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>>,
    {
        self.run_with_role(key, load).await.0
    }

    /// Like [`run`](Self::run), also telling whether this caller's loader was the one that ran.
    pub async fn run_with_role<F, Fut>(&self, key: K, load: F) -> (Result<V>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>>,
    {
        let call: Call<V> = {
            let mut calls = lock(&self.calls);
            Arc::clone(calls.entry(key.clone()).or_default())
        };
        // Frees the key when this caller leaves, landed or cancelled (see `Leave`).
        let leave = Leave {
            calls: &self.calls,
            key,
            call,
        };
        let mut ran = false;
        let result = leave
            .call
            .get_or_init(|| {
                ran = true;
                load()
            })
            .await
            .clone();
        drop(leave);
        (result, ran)
    }

    /// Number of keys with a load in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.calls).len()
    }
}

/// One caller's share of a flight. When it ends — the flight landed, or the caller's future
/// was dropped — the key is freed if the flight is still the key's and either landed or has
/// no other caller left (only the map's reference is left once this one is released): a lone caller
/// cancelled mid-load leaves no entry behind, while a cancelled leader with waiters leaves
/// the flight to them (one of them runs its own loader).
struct Leave<'a, K: Hash + Eq, V> {
    calls: &'a Mutex<HashMap<K, Call<V>>>,
    key: K,
    call: Call<V>,
}

impl<K: Hash + Eq, V> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        // Every clone of a flight is made and released under this lock, so the count read
        // below is exact.
        let mut calls = lock(self.calls);
        let call = std::mem::take(&mut self.call);
        let ours = calls.get(&self.key).is_some_and(|c| Arc::ptr_eq(c, &call));
        let landed = call.initialized();
        drop(call);
        if ours
            && (landed
                || calls
                    .get(&self.key)
                    .is_some_and(|c| Arc::strong_count(c) == 1))
        {
            calls.remove(&self.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent (single insert/remove).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Converts a loader's error type into the shared [`CacheError::Loader`].
pub fn loader_error<E: Into<Box<dyn std::error::Error + Send + Sync>>>(e: E) -> CacheError {
    CacheError::loader(e)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_caller_cancelled_mid_load_leaves_no_entry_behind() {
        let flight = SingleFlight::<u32, u32>::new();
        for i in 0..1000 {
            let gave_up = tokio::time::timeout(
                Duration::from_millis(1),
                flight.run(i, std::future::pending::<Result<u32>>),
            )
            .await;
            assert!(gave_up.is_err());
        }
        assert_eq!(flight.in_flight(), 0, "cancelled flights stayed in the map");
        // A cancelled leader with a waiter still hands over, and the key is then freed.
        let flight = Arc::new(SingleFlight::<&'static str, u32>::new());
        let f = Arc::clone(&flight);
        let leader =
            tokio::spawn(async move { f.run("k", std::future::pending::<Result<u32>>).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let f = Arc::clone(&flight);
        let waiter = tokio::spawn(async move { f.run("k", || async { Ok(7) }).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(flight.in_flight(), 1);
        leader.abort();
        assert_eq!(waiter.await.unwrap().unwrap(), 7);
        assert_eq!(flight.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_thousand_waiters_share_one_error_and_the_next_call_runs_again() {
        let flight = Arc::new(SingleFlight::<&'static str, u32>::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(tokio::sync::Barrier::new(1000));
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let (flight, runs, barrier) = (flight.clone(), runs.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    flight
                        .run("k", || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Err(CacheError::loader("db down"))
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Err(CacheError::Loader(_))));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(flight.in_flight(), 0);
        let again = flight.run("k", || async { Ok(7) }).await.unwrap();
        assert_eq!(again, 7, "errors are not cached");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_leader_hands_over_to_a_waiter() {
        let flight = Arc::new(SingleFlight::<u8, u8>::new());
        let f2 = flight.clone();
        let leader = tokio::spawn(async move {
            f2.run(1, || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(1)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let f3 = flight.clone();
        let waiter = tokio::spawn(async move { f3.run(1, || async { Ok(2) }).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter must not hang")
            .unwrap()
            .unwrap();
        assert_eq!(got, 2);
    }
}
