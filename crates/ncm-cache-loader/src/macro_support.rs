//! Runtime support for `#[cache_loader]` / `#[cache_method]`. Not a public API: the generated
//! code calls these items by absolute path, and they may change in any release.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

pub use ncm_cache_core::CacheStrategy;
use ncm_cache_core::{CacheError, Codec, Operation, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::fetch::Call;
pub use crate::fetch::{Mode, Split};
use crate::key::{args_key as canonical_args, loader_key};
use crate::loader::CacheLoader;

impl<C: Codec> CacheLoader<C> {
    /// Used by the attribute macros to reach the loader through any number of dereferences
    /// (`LazyLock`, `Arc`, `&`) with method-call syntax. Returns a cheap clone.
    #[doc(hidden)]
    pub fn __ncm_cache_loader(&self) -> Self {
        self.clone()
    }
}

/// A `ttl = <expr>` option must be a `Duration`.
#[inline]
pub fn ttl(ttl: Duration) -> Duration {
    ttl
}

/// The key's argument part from the function's arguments (a tuple of references).
#[inline]
pub fn args_key<A: Serialize + ?Sized>(args: &A) -> Result<String> {
    canonical_args(args)
}

/// The key's argument part from a `key = <expr>` option.
#[inline]
pub fn custom_key<K: Display + ?Sized>(key: &K) -> Result<String> {
    let key = key.to_string();
    if key.is_empty() {
        return Err(CacheError::InvalidArgument(
            "the `key` expression produced an empty string".into(),
        ));
    }
    Ok(key)
}

/// `crate::module::Type::method` from the type name of a fn item declared in the method's body
/// (`crate::module::Type::method::{{closure}}::__ncm_cache_fn`).
pub fn fn_path(nested_fn: &'static str) -> &'static str {
    let mut path = nested_fn
        .strip_suffix("::__ncm_cache_fn")
        .unwrap_or(nested_fn);
    while let Some(outer) = path.strip_suffix("::{{closure}}") {
        path = outer;
    }
    path
}

/// The call every annotated function makes: cache hit, or the body (once per key across
/// concurrent callers) and a cache write of what `mode` says is cacheable.
///
/// A key that cannot be built (arguments that do not serialize) skips the cache: the body runs
/// and the problem is logged (fail-open).
pub async fn cached<C, M, R, Fut>(
    loader: &CacheLoader<C>,
    name: &'static str,
    key: Result<String>,
    ttl: Option<Duration>,
    strategy: Option<CacheStrategy>,
    _mode: M,
    body: Fut,
) -> R
where
    C: Codec,
    M: Mode<R>,
    Fut: Future<Output = R>,
{
    let counters = loader.counters(name);
    let key = match key {
        Ok(args) => loader_key(name, &args),
        Err(e) => {
            counters.cache_error(Operation::Get);
            if loader.inner.enable_logging {
                tracing::warn!(loader = name, error = %e, "no cache key, calling without the cache");
            }
            return body.await;
        }
    };
    let call = Call {
        name,
        key: &key,
        ttl,
        strategy: strategy.unwrap_or_default(),
        force: false,
    };
    loader.run_cached::<M, R, Fut>(&counters, call, body).await
}

/// `Result<T, E>`: `Ok` is cached, `Err` is returned and never cached. A caller that waited on
/// a concurrent call which failed runs its own call (its `E` cannot be shared).
#[derive(Debug, Clone, Copy)]
pub struct ResultMode;

impl<T, E> Mode<std::result::Result<T, E>> for ResultMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Stored = T;
    fn split(output: std::result::Result<T, E>) -> Split<T, std::result::Result<T, E>> {
        match output {
            Ok(v) => Split::Store(v),
            Err(e) => Split::Fail(Err(e)),
        }
    }
    fn join(stored: T) -> std::result::Result<T, E> {
        Ok(stored)
    }
    fn empty() -> Option<std::result::Result<T, E>> {
        None
    }
    fn flight_error(_: &std::result::Result<T, E>) -> CacheError {
        CacheError::loader("a concurrent call of the same key failed")
    }
    fn shared_error(_: CacheError) -> Option<std::result::Result<T, E>> {
        None
    }
}

/// `Option<T>`: `Some` is cached; `None` is returned and not cached.
#[derive(Debug, Clone, Copy)]
pub struct OptionMode;

impl<T> Mode<Option<T>> for OptionMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Stored = T;
    fn split(output: Option<T>) -> Split<T, Option<T>> {
        match output {
            Some(v) => Split::Store(v),
            None => Split::Empty(None),
        }
    }
    fn join(stored: T) -> Option<T> {
        Some(stored)
    }
    fn empty() -> Option<Option<T>> {
        Some(None)
    }
    fn flight_error(_: &Option<T>) -> CacheError {
        CacheError::loader("unreachable: Option outputs never fail")
    }
    fn shared_error(_: CacheError) -> Option<Option<T>> {
        None
    }
}

/// `Option<T>` with `cache_none = true`: `None` is cached too (as a negative entry).
#[derive(Debug, Clone, Copy)]
pub struct OptionCacheNoneMode;

impl<T> Mode<Option<T>> for OptionCacheNoneMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Stored = Option<T>;
    fn split(output: Option<T>) -> Split<Option<T>, Option<T>> {
        Split::Store(output)
    }
    fn join(stored: Option<T>) -> Option<T> {
        stored
    }
    fn empty() -> Option<Option<T>> {
        None
    }
    fn flight_error(_: &Option<T>) -> CacheError {
        CacheError::loader("unreachable: Option outputs never fail")
    }
    fn shared_error(_: CacheError) -> Option<Option<T>> {
        None
    }
}

/// Any other owned, serializable value: always cached.
#[derive(Debug, Clone, Copy)]
pub struct PlainMode;

impl<T> Mode<T> for PlainMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Stored = T;
    fn split(output: T) -> Split<T, T> {
        Split::Store(output)
    }
    fn join(stored: T) -> T {
        stored
    }
    fn empty() -> Option<T> {
        None
    }
    fn flight_error(_: &T) -> CacheError {
        CacheError::loader("unreachable: plain outputs never fail")
    }
    fn shared_error(_: CacheError) -> Option<T> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::fn_path;

    #[test]
    fn fn_paths_drop_the_marker_and_closure_segments() {
        assert_eq!(
            fn_path("app::svc::UserService::get::{{closure}}::__ncm_cache_fn"),
            "app::svc::UserService::get"
        );
        assert_eq!(fn_path("app::get::__ncm_cache_fn"), "app::get");
    }
}
