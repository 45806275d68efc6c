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
        let mut ran = false;
        let result = call
            .get_or_init(|| {
                ran = true;
                load()
            })
            .await
            .clone();
        // The first caller to see the landed flight frees the key (only if it is still ours).
        let mut calls = lock(&self.calls);
        if calls.get(&key).is_some_and(|c| Arc::ptr_eq(c, &call)) {
            calls.remove(&key);
        }
        (result, ran)
    }

    /// Number of keys with a load in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.calls).len()
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
