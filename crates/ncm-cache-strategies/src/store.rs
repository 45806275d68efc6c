//! The persistent store (system of record) behind write-through, write-behind and write-around.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use ncm_cache_core::{CacheError, Result};

/// The error a persistent store returns: any error, boxed (`"text".into()` works too).
pub type StoreError = Box<dyn StdError + Send + Sync>;

/// The system of record a strategy writes to: a database table, a service, a file.
///
/// Implement [`store`](Self::store); override [`store_batch`](Self::store_batch) when the store
/// can write many entries in one call (write-behind batches its writes). For a plain async
/// closure, use [`store_fn`] or [`batch_store_fn`] instead of implementing the trait.
///
/// Stores should be idempotent (an upsert): write-behind retries failed calls, and a durable
/// queue replays writes after a crash, so an entry may reach the store more than once.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use ncm_cache_strategies::{async_trait, PersistentStore, Store, StoreError};
///
/// #[derive(Default)]
/// struct Table(Mutex<HashMap<String, String>>);
///
/// #[async_trait]
/// impl PersistentStore<String> for Table {
///     async fn store(&self, key: &str, value: &String) -> Result<(), StoreError> {
///         self.0.lock().map_err(|_| "poisoned")?.insert(key.to_owned(), value.clone());
///         Ok(())
///     }
/// }
///
/// let store: Store<String> = Store::new(Table::default()).named("users");
/// assert_eq!(store.name(), "users");
/// ```
#[async_trait]
pub trait PersistentStore<V>: Send + Sync + 'static
where
    V: Send + Sync + 'static,
{
    /// Persists one entry.
    async fn store(&self, key: &str, value: &V) -> Result<(), StoreError>;

    /// Persists several entries; the default calls [`store`](Self::store) for each in order and
    /// stops at the first error (the whole batch is then retried).
    async fn store_batch(&self, entries: &[(String, V)]) -> Result<(), StoreError> {
        for (key, value) in entries {
            self.store(key, value).await?;
        }
        Ok(())
    }

    /// Persists a write-behind batch with each entry's [`WriteVersion`] (`versions[i]` is
    /// `entries[i]`'s). The default ignores the versions and calls
    /// [`store_batch`](Self::store_batch); override it to write conditionally, which makes the
    /// order of writes exact even when several instances persist one key.
    async fn store_batch_versioned(
        &self,
        entries: &[(String, V)],
        versions: &[WriteVersion],
    ) -> Result<(), StoreError> {
        let _ = versions;
        self.store_batch(entries).await
    }
}

/// The order of one write-behind write, handed to
/// [`PersistentStore::store_batch_versioned`]: in durable mode the write's Redis Stream id
/// (milliseconds, sequence), ordered across every instance writing the queue and across
/// restarts — a store can keep it next to the row and write conditionally
/// (`... WHERE version < $v`), so that no write ever lands over a newer one. In memory mode it
/// is a sequence of this process (`ms` = 0) that restarts at zero with the process: do not
/// store it as a row version (a restarted process's writes would all be refused).
///
/// ```
/// use ncm_cache_strategies::WriteVersion;
/// let a = WriteVersion { ms: 1_700_000_000_000, seq: 1 };
/// let b = WriteVersion { ms: 1_700_000_000_000, seq: 2 };
/// assert!(a < b && a.as_u128() < b.as_u128());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteVersion {
    /// Milliseconds part of the stream id (0 in memory mode).
    pub ms: u64,
    /// Sequence part.
    pub seq: u64,
}

impl WriteVersion {
    /// One number, ordered like the versions (e.g. for a `NUMERIC` column).
    pub fn as_u128(self) -> u128 {
        (u128::from(self.ms) << 64) | u128::from(self.seq)
    }
}

/// A shared handle to a [`PersistentStore`], passed to the strategies (the original's
/// `persistent_store=`). Cloning is cheap; clones are the same store (and share one
/// write-behind queue).
///
/// The name identifies the store in metrics and, for durable write-behind, names the Redis
/// Stream that journals its pending writes — give each durable store a stable, unique name.
pub struct Store<V> {
    inner: Arc<dyn PersistentStore<V>>,
    name: Arc<str>,
}

impl<V> Clone for Store<V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            name: Arc::clone(&self.name),
        }
    }
}

impl<V> fmt::Debug for Store<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<V: Send + Sync + 'static> Store<V> {
    /// Wraps a store implementation (named `"default"`; see [`named`](Self::named)).
    pub fn new(store: impl PersistentStore<V>) -> Self {
        Self {
            inner: Arc::new(store),
            name: Arc::from("default"),
        }
    }

    /// A store from an async closure that persists one entry; see [`store_fn`].
    pub fn from_fn<F, Fut, E>(f: F) -> Self
    where
        V: Clone,
        F: Fn(String, V) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<StoreError> + 'static,
    {
        Self::new(FnStore { f, _v: PhantomData })
    }

    /// A store from an async closure that persists a batch; see [`batch_store_fn`].
    pub fn from_batch_fn<F, Fut, E>(f: F) -> Self
    where
        V: Clone,
        F: Fn(Vec<(String, V)>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<StoreError> + 'static,
    {
        Self::new(BatchFnStore { f, _v: PhantomData })
    }

    /// Sets the store's name (metrics label; the stream name of a durable write-behind queue).
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Arc::from(name.into());
        self
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Persists one entry, mapping a failure to [`CacheError::Store`].
    pub async fn store(&self, key: &str, value: &V) -> Result<()> {
        self.inner
            .store(key, value)
            .await
            .map_err(CacheError::store)
    }

    /// Persists a batch, mapping a failure to [`CacheError::Store`].
    pub async fn store_batch(&self, entries: &[(String, V)]) -> Result<()> {
        self.inner
            .store_batch(entries)
            .await
            .map_err(CacheError::store)
    }

    /// Persists a write-behind batch with its versions, mapping a failure to
    /// [`CacheError::Store`].
    pub async fn store_batch_versioned(
        &self,
        entries: &[(String, V)],
        versions: &[WriteVersion],
    ) -> Result<()> {
        self.inner
            .store_batch_versioned(entries, versions)
            .await
            .map_err(CacheError::store)
    }

    /// Identity of the underlying store (clones share it).
    pub(crate) fn id(&self) -> usize {
        Arc::as_ptr(&self.inner).cast::<()>() as usize
    }
}

/// A [`Store`] from an async closure persisting one entry: `|key, value| async move { .. }`.
///
/// The closure receives owned copies, so its future may outlive the call.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use ncm_cache_strategies::store_fn;
///
/// let saved = Arc::new(Mutex::new(Vec::new()));
/// let sink = saved.clone();
/// let save_to_database = store_fn(move |key: String, name: String| {
///     let sink = sink.clone();
///     async move {
///         sink.lock().unwrap().push((key, name));
///         Ok::<_, std::io::Error>(())
///     }
/// })
/// .named("users");
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// save_to_database.store("user:1", &"John".to_string()).await.unwrap();
/// # });
/// assert_eq!(saved.lock().unwrap().len(), 1);
/// ```
pub fn store_fn<V, F, Fut, E>(f: F) -> Store<V>
where
    V: Clone + Send + Sync + 'static,
    F: Fn(String, V) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<StoreError> + 'static,
{
    Store::from_fn(f)
}

/// A [`Store`] from an async closure persisting a batch of entries in one call (a multi-row
/// upsert); single writes arrive as a batch of one.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use ncm_cache_strategies::batch_store_fn;
///
/// let calls = Arc::new(Mutex::new(0));
/// let counter = calls.clone();
/// let upsert = batch_store_fn(move |rows: Vec<(String, u32)>| {
///     let counter = counter.clone();
///     async move {
///         *counter.lock().unwrap() += 1;
///         assert!(!rows.is_empty());
///         Ok::<_, &'static str>(())
///     }
/// });
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// upsert.store_batch(&[("a".into(), 1), ("b".into(), 2)]).await.unwrap();
/// # });
/// assert_eq!(*calls.lock().unwrap(), 1);
/// ```
pub fn batch_store_fn<V, F, Fut, E>(f: F) -> Store<V>
where
    V: Clone + Send + Sync + 'static,
    F: Fn(Vec<(String, V)>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<StoreError> + 'static,
{
    Store::from_batch_fn(f)
}

struct FnStore<F, V> {
    f: F,
    _v: PhantomData<fn(V)>,
}

#[async_trait]
impl<V, F, Fut, E> PersistentStore<V> for FnStore<F, V>
where
    V: Clone + Send + Sync + 'static,
    F: Fn(String, V) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<StoreError> + 'static,
{
    async fn store(&self, key: &str, value: &V) -> Result<(), StoreError> {
        (self.f)(key.to_owned(), value.clone())
            .await
            .map_err(Into::into)
    }
}

struct BatchFnStore<F, V> {
    f: F,
    _v: PhantomData<fn(V)>,
}

#[async_trait]
impl<V, F, Fut, E> PersistentStore<V> for BatchFnStore<F, V>
where
    V: Clone + Send + Sync + 'static,
    F: Fn(Vec<(String, V)>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<StoreError> + 'static,
{
    async fn store(&self, key: &str, value: &V) -> Result<(), StoreError> {
        (self.f)(vec![(key.to_owned(), value.clone())])
            .await
            .map_err(Into::into)
    }

    async fn store_batch(&self, entries: &[(String, V)]) -> Result<(), StoreError> {
        (self.f)(entries.to_vec()).await.map_err(Into::into)
    }
}
