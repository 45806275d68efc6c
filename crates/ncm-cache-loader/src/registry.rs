//! Registered loaders: the typed record behind a name, its type-erased view for the by-name
//! paths (`load`, warming), and the typed [`LoaderHandle`].

use std::any::{Any, type_name};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::{CacheError, CacheStrategy, Codec, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::fetch::{Call, LoadMode};
use crate::key::{args_key, loader_key};
use crate::loader::{BoxFuture, CacheLoader};
use crate::stats::LoaderCounters;

pub(crate) type LoadFn<A, T> = dyn Fn(A) -> BoxFuture<'static, Result<T>> + Send + Sync;

/// A registered loader, typed.
pub(crate) struct Registered<A, T> {
    name: String,
    ttl: Option<Duration>,
    strategy: CacheStrategy,
    counters: Arc<LoaderCounters>,
    load: Box<LoadFn<A, T>>,
}

impl<A, T> Registered<A, T>
where
    A: Serialize + Send + 'static,
    T: Serialize + DeserializeOwned + Send + 'static,
{
    pub(crate) fn new(
        name: &str,
        ttl: Option<Duration>,
        strategy: CacheStrategy,
        counters: Arc<LoaderCounters>,
        load: Box<LoadFn<A, T>>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            ttl,
            strategy,
            counters,
            load,
        }
    }

    pub(crate) fn key(&self, args: &A) -> Result<String> {
        Ok(loader_key(&self.name, &args_key(args)?))
    }

    /// Loads (or, with `force`, reloads and overwrites) the value for `args`.
    pub(crate) async fn load<C: Codec>(
        &self,
        loader: &CacheLoader<C>,
        args: A,
        force: bool,
    ) -> Result<T> {
        let key = self.key(&args)?;
        let call = Call {
            name: &self.name,
            key: &key,
            ttl: self.ttl,
            strategy: self.strategy,
            force,
        };
        let body = (self.load)(args);
        loader
            .run_cached::<LoadMode, _, _>(&self.counters, call, body)
            .await
    }
}

/// What the by-name paths (`load`, warming) need from a registered loader of unknown types.
pub(crate) trait ErasedLoader<C>: Send + Sync {
    fn as_any(&self) -> &dyn Any;
    /// Type names of the arguments and the value.
    fn signature(&self) -> (&'static str, &'static str);
    /// Loads the value for JSON arguments, overwriting the cached one; returns the key.
    fn warm<'a>(
        &'a self,
        loader: &'a CacheLoader<C>,
        args: Value,
    ) -> BoxFuture<'a, (Option<String>, Result<()>)>;
}

impl<C, A, T> ErasedLoader<C> for Registered<A, T>
where
    C: Codec,
    A: Serialize + DeserializeOwned + Send + 'static,
    T: Serialize + DeserializeOwned + Send + 'static,
{
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn signature(&self) -> (&'static str, &'static str) {
        (type_name::<A>(), type_name::<T>())
    }

    fn warm<'a>(
        &'a self,
        loader: &'a CacheLoader<C>,
        args: Value,
    ) -> BoxFuture<'a, (Option<String>, Result<()>)> {
        Box::pin(async move {
            let args: A = match serde_json::from_value(args) {
                Ok(args) => args,
                Err(e) => {
                    let err = CacheError::InvalidArgument(format!(
                        "arguments for loader {:?} do not fit `{}`: {e}",
                        self.name,
                        type_name::<A>()
                    ));
                    return (None, Err(err));
                }
            };
            let key = self.key(&args).ok();
            let result = self.load(loader, args, true).await.map(drop);
            (key, result)
        })
    }
}

/// A typed handle on a registered loader, returned by
/// [`CacheLoader::register_loader`]: no name lookup and no type check per call.
pub struct LoaderHandle<A, T, C = Serializer> {
    loader: CacheLoader<C>,
    registered: Arc<Registered<A, T>>,
    _marker: PhantomData<fn(A) -> T>,
}

impl<A, T, C> Clone for LoaderHandle<A, T, C> {
    fn clone(&self) -> Self {
        Self {
            loader: self.loader.clone(),
            registered: Arc::clone(&self.registered),
            _marker: PhantomData,
        }
    }
}

impl<A, T, C> fmt::Debug for LoaderHandle<A, T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoaderHandle")
            .field("name", &self.registered.name)
            .field("ttl", &self.registered.ttl)
            .field("strategy", &self.registered.strategy)
            .finish_non_exhaustive()
    }
}

impl<A, T, C> LoaderHandle<A, T, C> {
    pub(crate) fn new(loader: CacheLoader<C>, registered: Arc<Registered<A, T>>) -> Self {
        Self {
            loader,
            registered,
            _marker: PhantomData,
        }
    }
}

impl<A, T, C> LoaderHandle<A, T, C>
where
    C: Codec,
    A: Serialize + Send + 'static,
    T: Serialize + DeserializeOwned + Send + 'static,
{
    /// The loader's name.
    pub fn name(&self) -> &str {
        &self.registered.name
    }

    /// The cache key of `args`.
    pub fn key(&self, args: &A) -> Result<String> {
        self.registered.key(args)
    }

    /// Loads the value for `args` (cached, single-flight).
    pub async fn load(&self, args: A) -> Result<T> {
        self.registered.load(&self.loader, args, false).await
    }

    /// Runs the loader for `args` now and overwrites the cached value.
    pub async fn refresh(&self, args: A) -> Result<T> {
        self.registered.load(&self.loader, args, true).await
    }

    /// Removes the cached value for `args`; `true` when it was cached.
    pub async fn invalidate(&self, args: &A) -> Result<bool> {
        self.loader.cache().delete(&self.key(args)?).await
    }
}
