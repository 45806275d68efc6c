//! Registered loaders: the typed record behind a name, its type-erased view for the by-name
//! paths (`load`, warming), and the typed [`LoaderHandle`].

use std::any::{Any, TypeId, type_name};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::{CacheError, CacheStrategy, Codec, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

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
            fail_closed: false,
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
        kwargs: Map<String, Value>,
    ) -> BoxFuture<'a, (Option<String>, Result<()>)>;
    /// The value's type.
    fn value_type(&self) -> TypeId;
    /// Loads (cached, single-flight) for JSON arguments; the value boxed (of `value_type`).
    fn load_json<'a>(
        &'a self,
        loader: &'a CacheLoader<C>,
        args: Value,
        kwargs: Map<String, Value>,
    ) -> BoxFuture<'a, Result<Box<dyn Any + Send>>>;
}

/// The loader's argument from the original's positional `args` and named `kwargs` (see
/// [`WarmConfig`](crate::WarmConfig)).
fn from_json<A: DeserializeOwned>(
    name: &str,
    args: Value,
    kwargs: Map<String, Value>,
) -> Result<A> {
    let misfit = |e: serde_json::Error| {
        CacheError::InvalidArgument(format!(
            "arguments for loader {name:?} do not fit `{}`: {e}",
            type_name::<A>()
        ))
    };
    let positional = !matches!(&args, Value::Null) && args != Value::Array(Vec::new());
    if positional && !kwargs.is_empty() {
        return Err(CacheError::InvalidArgument(format!(
            "loader {name:?} got both positional `args` and named `kwargs`; a Rust loader takes \
             one value (`{}`): give its fields as `kwargs`, or the value as `args`",
            type_name::<A>()
        )));
    }
    if !kwargs.is_empty() {
        return serde_json::from_value(Value::Object(kwargs)).map_err(misfit);
    }
    // The value as written first (what `WarmConfig::with_args` produces, so it round-trips);
    // then the original's forms: one positional argument `[x]` is `x`, and `[]` is no
    // argument (`()`).
    let exact = serde_json::from_value::<A>(args.clone());
    exact.or_else(|first| match args {
        Value::Array(mut items) if items.len() == 1 => {
            serde_json::from_value(items.pop().unwrap_or(Value::Null)).map_err(|_| misfit(first))
        }
        Value::Array(items) if items.is_empty() => {
            serde_json::from_value(Value::Null).map_err(|_| misfit(first))
        }
        _ => Err(misfit(first)),
    })
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
        kwargs: Map<String, Value>,
    ) -> BoxFuture<'a, (Option<String>, Result<()>)> {
        Box::pin(async move {
            let args: A = match from_json(&self.name, args, kwargs) {
                Ok(args) => args,
                Err(e) => return (None, Err(e)),
            };
            let key = self.key(&args).ok();
            let result = self.load(loader, args, true).await.map(drop);
            (key, result)
        })
    }

    fn value_type(&self) -> TypeId {
        TypeId::of::<T>()
    }

    fn load_json<'a>(
        &'a self,
        loader: &'a CacheLoader<C>,
        args: Value,
        kwargs: Map<String, Value>,
    ) -> BoxFuture<'a, Result<Box<dyn Any + Send>>> {
        Box::pin(async move {
            let args: A = from_json(&self.name, args, kwargs)?;
            let value = self.load(loader, args, false).await?;
            Ok(Box::new(value) as Box<dyn Any + Send>)
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
        self.loader.invalidate_key(&self.key(args)?).await
    }
}
