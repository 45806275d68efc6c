//! # ncm-cache-sql
//!
//! SQL query caching for [ncm-cache](https://github.com/ncm-foundation/ncm-cache) on
//! PostgreSQL, MySQL/MariaDB and SQLite, over any cache backend (memory, Redis, multi-level),
//! with invalidation by table — the original's `SQLCache`, made to invalidate itself.
//!
//! - [`SqlCache`] — `cache_query(sql, params, strategy, ttl)` with
//!   [`QueryCacheStrategy::{CacheFirst, DbFirst, CacheOnly}`](QueryCacheStrategy), a typed
//!   variant, [`execute`](SqlCache::execute) for writes that invalidates the tables they touch,
//!   `invalidate_query` / `invalidate_pattern` / `invalidate_table`, and
//!   [`get_performance_stats`](SqlCache::get_performance_stats).
//! - [`SqlExecutor`] — the database side, implemented over sqlx pools by [`PgExecutor`]
//!   (feature `postgres`), [`MySqlExecutor`] (`mysql`) and [`SqliteExecutor`] (`sqlite`, the
//!   default, with a bundled libsqlite3).
//! - [`SqlParams`] / [`params!`] — positional or named parameters; `%s`, `%(name)s` and
//!   `:name` placeholders are translated to the driver's (`$1` or `?`) with sqlparser's
//!   tokenizer, never inside literals or comments.
//! - [`Rows`] / [`SqlValue`] — a portable result (null, bool, integers, floats, text, bytes,
//!   timestamps, JSON) stored through the cache's codec; [`Rows::deserialize`] maps rows onto
//!   your types.
//! - [`referenced_tables`] / [`written_tables`] — table extraction with sqlparser (joins,
//!   subqueries, CTEs without their names, quoted and schema-qualified names).
//! - `listen_postgres` / [`install_triggers`](postgres::install_triggers) (feature
//!   `postgres`) — LISTEN/NOTIFY triggers so writes made by anyone invalidate the cache.
//!
//! ## How invalidation works
//!
//! Every table has a generation key beside the entries (`{namespace}:{identity}#gen:{table}`,
//! and `#gen*` for the whole database) holding a random token. A cached result records the
//! tokens of its tables read *before* its query ran, and a read is a hit only while every one
//! of them is still current (one batch read fetches the entry and the tokens).
//! [`SqlCache::invalidate_table`] replaces the tokens of the table and of what depends on it:
//! one batch write, whatever the number of entries — never a scan of the keyspace — and every
//! instance sharing the cache sees it on its next read. A result computed while one of its
//! tables was invalidated carries an old token, so it is never served. Statements whose
//! tables cannot be determined are not cached. See the crate's README for the reasoning.
//!
//! ```
//! use ncm_cache_codec::Serializer;
//! use ncm_cache_core::Cache;
//! use ncm_cache_memory::MemoryBackend;
//! use ncm_cache_sql::{params, QueryCacheStrategy, SqlCache, SqliteExecutor};
//!
//! #[derive(serde::Deserialize, Debug, PartialEq)]
//! struct Product { id: i64, name: String, price: f64 }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let sql_cache = SqlCache::builder(
//!     Cache::new(MemoryBackend::new(), Serializer::default()),
//!     SqliteExecutor::memory().await?,
//! )
//! .build()?;
//! sql_cache.execute(
//!     "CREATE TABLE products (id INTEGER, name TEXT, category TEXT, price REAL)", ()).await?;
//! sql_cache.execute("INSERT INTO products VALUES (1, 'Laptop', 'electronics', 999.5)", ()).await?;
//!
//! let products: Vec<Product> = sql_cache
//!     .cache_query_as("SELECT id, name, price FROM products WHERE category = %s",
//!                     params! { "category" => "electronics" },
//!                     QueryCacheStrategy::CacheFirst, None)
//!     .await?
//!     .unwrap_or_default();
//! assert_eq!(products, vec![Product { id: 1, name: "Laptop".into(), price: 999.5 }]);
//!
//! assert_eq!(sql_cache.invalidate_table("products").await?, 1);
//! # Ok::<(), ncm_cache_core::CacheError>(())
//! # }).unwrap();
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder;
mod cache;
mod de;
mod deps;
mod executor;
mod flow;
mod invalidate;
mod keys;
#[cfg(feature = "postgres")]
mod listener;
mod params;
mod rows;
mod rules;
mod stats;
mod tables;
mod value;

pub use builder::{DEFAULT_MAX_QUERY_SIZE, DEFAULT_TTL, SqlCacheBuilder};
pub use cache::{QueryCacheStrategy, SqlCache};
#[cfg(feature = "mysql")]
pub use executor::MySqlExecutor;
#[cfg(feature = "postgres")]
pub use executor::PgExecutor;
#[cfg(feature = "sqlite")]
pub use executor::SqliteExecutor;
pub use executor::{SqlDialect, SqlExecutor, database_error, database_error_code};
pub use params::SqlParams;
pub use rows::Rows;
pub use stats::{SlowQuery, SqlPerformanceStats};
pub use tables::{Writes, referenced_tables, written_tables};
pub use value::SqlValue;

/// PostgreSQL extras: LISTEN/NOTIFY triggers and the listener handle (feature `postgres`).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres {
    pub use crate::listener::{
        ListenerHandle, NOTIFY_CHANNEL, install_triggers, uninstall_triggers,
    };
}

/// The database drivers, re-exported so callers build pools with the same sqlx version.
pub use sqlx;
