//! # ncm-cache-loader
//!
//! Loading values into an ncm-cache [`Cache`](ncm_cache_core::Cache) — the original's
//! `CacheLoader`, its decorators, cache warming, and `CacheReloader`.
//!
//! - [`CacheLoader`] — named loaders ([`register_loader`](CacheLoader::register_loader),
//!   [`load`](CacheLoader::load)) whose arguments form the key; a miss runs the loader once for
//!   all concurrent callers of a key (core's [`SingleFlight`](ncm_cache_core::SingleFlight));
//!   errors are returned, never cached. Warming ([`warm_cache`](CacheLoader::warm_cache),
//!   [`start_background_warming`](CacheLoader::start_background_warming)), statistics
//!   ([`get_loader_stats`](CacheLoader::get_loader_stats)) and health
//!   ([`get_health_status`](CacheLoader::get_health_status)).
//! - [`cache_loader`] and [`cache_method`] (feature `macros`, default) — attribute macros in
//!   the role of the original's `@loader.cache_loader(...)` / `@loader.cache_method(...)`.
//! - [`CacheReloader`] — keeps named values fresh: [`ReloadStrategy::Lazy`] (reload on access
//!   after expiry), [`ReloadStrategy::Eager`] (reload on a timer before expiry),
//!   [`ReloadStrategy::RefreshAhead`] (reload in the background when read late in the TTL),
//!   scheduled reloads and reload callbacks. With feature `redis`, [`RedisLeases`] make one
//!   instance at a time reload a key and give each schedule a single owner.
//!
//! ## Strategies for a loader
//!
//! A loader reads the cache first under every [`CacheStrategy`](ncm_cache_core::CacheStrategy);
//! they differ in how a loaded value is written:
//!
//! | strategy | on a miss |
//! |---|---|
//! | `CacheAside` (default), `ReadThrough`, `WriteThrough` | the value is written before the call returns |
//! | `WriteBehind` | the call returns at once; the value is written in the background (a `refresh` or warm, which replaces, is written before it returns, so two of them never land out of order) |
//! | `WriteAround` | the value is returned and not written (only values written by others are read) |
//!
//! ## The attribute macros
//!
//! ```
//! # #[cfg(feature = "macros")] {
//! use std::sync::LazyLock;
//! use ncm_cache_codec::Serializer;
//! use ncm_cache_core::Cache;
//! use ncm_cache_loader::{CacheLoader, cache_loader, cache_method};
//! use ncm_cache_memory::MemoryBackend;
//!
//! static LOADER: LazyLock<CacheLoader> =
//!     LazyLock::new(|| CacheLoader::new(Cache::new(MemoryBackend::new(), Serializer::default())));
//!
//! #[derive(Debug)]
//! struct DbError;
//! impl std::fmt::Display for DbError {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("db") }
//! }
//!
//! #[cache_loader(loader = LOADER, ttl = "1h", strategy = ReadThrough)]
//! async fn get_user_profile(user_id: u64) -> Result<String, DbError> {
//!     Ok(format!("profile of {user_id}"))
//! }
//!
//! struct UserService { loader: CacheLoader }
//!
//! impl UserService {
//!     #[cache_method(loader = self.loader, ttl = 1800, key = format!("email:{email}"))]
//!     async fn get_user_by_email(&self, email: &str) -> Result<String, DbError> {
//!         Ok(email.to_uppercase())
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! assert_eq!(get_user_profile(123).await.unwrap(), "profile of 123");
//! let service = UserService { loader: LOADER.clone() };
//! assert_eq!(service.get_user_by_email("john@example.com").await.unwrap(), "JOHN@EXAMPLE.COM");
//! # });
//! # }
//! ```
//!
//! Options: `loader` (required), `ttl` (`"1h"`, `"30m"`, seconds, or a `Duration`
//! expression), `strategy`, `key` (a `Display` expression over the arguments), `name`, and
//! `cache_none` (for `Option` returns). `Result` functions cache only `Ok`; `Option` functions
//! cache `Some` (and `None` with `cache_none = true`). The key is
//! `loader:{function path or name}:{arguments as canonical JSON, or the key expression}`;
//! `self` is never part of it. If the cache is down, the function runs (fail-open, logged).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod fetch;
mod key;
mod lease;
mod loader;
mod macro_support;
mod pending;
mod registry;
mod reload;
mod stats;
mod warm;

pub use key::{KEY_PREFIX, MAX_INLINE_ARGS, args_key, loader_key};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use lease::RedisLeases;
pub use lease::{Lease, LeaseProvider, LocalLeases};
pub use loader::{CacheLoader, CacheLoaderBuilder};
pub use registry::LoaderHandle;
pub use reload::{CacheReloader, CacheReloaderBuilder, ReloadStats, ReloadStrategy};
pub use stats::{LoaderHealth, LoaderStats, LoaderStatsReport};
pub use warm::{WarmConfig, WarmProgress, WarmResult};

#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
pub use ncm_cache_macros::{cache_loader, cache_method};

/// The error a panicking loader of `name` comes to (reloads and warming catch the panic: a
/// timer or a background round must not end with it).
pub(crate) fn panicked(
    name: &str,
    panic: &(dyn std::any::Any + Send),
) -> ncm_cache_core::CacheError {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".to_owned());
    ncm_cache_core::CacheError::loader(format!("the loader of {name:?} panicked: {what}"))
}

/// Runtime support for the attribute macros. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::macro_support::*;
}
