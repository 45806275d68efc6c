//! The database side: the [`SqlExecutor`] trait and its sqlx implementations.

use std::fmt;

use async_trait::async_trait;
use ncm_cache_core::{CacheError, Result};
use sqlparser::dialect::{Dialect, GenericDialect, MySqlDialect, PostgreSqlDialect, SQLiteDialect};

use crate::rows::Rows;
use crate::value::SqlValue;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use mysql::MySqlExecutor;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::PgExecutor;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::SqliteExecutor;

/// The SQL dialect of a database: how statements are parsed and which placeholders it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SqlDialect {
    /// PostgreSQL: `$1, $2, …` placeholders.
    Postgres,
    /// MySQL and MariaDB: `?` placeholders.
    MySql,
    /// SQLite: `?` placeholders.
    Sqlite,
    /// Anything else (ANSI-ish parsing, `?` placeholders).
    Generic,
}

static POSTGRES: PostgreSqlDialect = PostgreSqlDialect {};
static MYSQL: MySqlDialect = MySqlDialect {};
static SQLITE: SQLiteDialect = SQLiteDialect {};
static GENERIC: GenericDialect = GenericDialect {};

impl SqlDialect {
    /// sqlparser's dialect for this database.
    pub fn parser_dialect(self) -> &'static dyn Dialect {
        match self {
            Self::Postgres => &POSTGRES,
            Self::MySql => &MYSQL,
            Self::Sqlite => &SQLITE,
            Self::Generic => &GENERIC,
        }
    }

    /// The dialect's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::MySql => "mysql",
            Self::Sqlite => "sqlite",
            Self::Generic => "generic",
        }
    }
}

impl fmt::Display for SqlDialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Runs statements against a database. [`SqlCache`](crate::SqlCache) calls it on a miss and
/// for writes.
///
/// Statements arrive with the dialect's own placeholders (`$1` or `?`) and their values in
/// order. Implementations return database failures as [`CacheError::Database`] (use
/// [`database_error`]) so callers can tell them from cache failures.
///
/// The sqlx implementations are [`PgExecutor`], [`MySqlExecutor`] and [`SqliteExecutor`]
/// (features `postgres`, `mysql`, `sqlite`). Your own, for example a test double:
///
/// ```
/// use ncm_cache_sql::{Rows, SqlDialect, SqlExecutor, SqlValue};
/// use ncm_cache_core::Result;
///
/// #[derive(Debug)]
/// struct Constant;
///
/// #[async_trait::async_trait]
/// impl SqlExecutor for Constant {
///     fn dialect(&self) -> SqlDialect { SqlDialect::Generic }
///     fn identity(&self) -> &str { "constant" }
///     async fn fetch_all(&self, _sql: &str, params: &[SqlValue]) -> Result<Rows> {
///         Ok(Rows::new(vec!["echo".into()], vec![params.to_vec()]))
///     }
///     async fn execute(&self, _sql: &str, _params: &[SqlValue]) -> Result<u64> { Ok(0) }
/// }
/// ```
#[async_trait]
pub trait SqlExecutor: Send + Sync + fmt::Debug + 'static {
    /// The dialect, used to translate placeholders, normalize statements and find tables.
    fn dialect(&self) -> SqlDialect;

    /// Which database this is, without credentials (e.g. `postgres://127.0.0.1:5432/app`).
    /// It is part of every cache key, so two databases never share entries.
    fn identity(&self) -> &str;

    /// Which database this is, whoever asks: the [`identity`](Self::identity) without what
    /// differs between sessions of one database (role, `search_path`). Invalidations
    /// (generation tokens) are kept per database identity, so a write by a service connected
    /// as one role invalidates the results cached by a service connected as another; entries
    /// stay per [`identity`](Self::identity), so results visible to one role (row-level
    /// security) are never served to another. The default is the identity.
    fn database_identity(&self) -> &str {
        self.identity()
    }

    /// Runs a statement and returns every row.
    async fn fetch_all(&self, sql: &str, params: &[SqlValue]) -> Result<Rows>;

    /// Runs a statement and returns the number of rows it affected.
    async fn execute(&self, sql: &str, params: &[SqlValue]) -> Result<u64>;

    /// Dependencies between tables that the catalog knows: `(written, affected)` pairs
    /// (bare table names) meaning a write to `written` changes what queries of `affected`
    /// return — views over a table, a partitioned table and its partitions (both ways),
    /// tables whose foreign keys cascade (`ON DELETE/UPDATE CASCADE / SET NULL / SET
    /// DEFAULT`) from it. The default knows none (SQLite: declare them with
    /// [`SqlCacheBuilder::dependency`](crate::SqlCacheBuilder::dependency)).
    async fn dependencies(&self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }
}

const _: fn(&dyn SqlExecutor) = |_| {};

/// Wraps a driver error as [`CacheError::Database`]; the message carries the database's text
/// and the source keeps the original error (downcast it to `sqlx::Error` for the SQLSTATE).
pub fn database_error<E>(context: &str, err: E) -> CacheError
where
    E: std::error::Error + Send + Sync + 'static,
{
    CacheError::Database {
        message: format!("{context}: {err}"),
        source: Some(std::sync::Arc::new(err)),
    }
}

/// The SQLSTATE / error code of a database error, when the driver reported one.
///
/// ```
/// use ncm_cache_core::CacheError;
/// let err = CacheError::Database { message: "x".into(), source: None };
/// assert_eq!(ncm_cache_sql::database_error_code(&err), None);
/// ```
pub fn database_error_code(err: &CacheError) -> Option<String> {
    let CacheError::Database {
        source: Some(source),
        ..
    } = err
    else {
        return None;
    };
    let sqlx_err = source.downcast_ref::<sqlx::Error>()?;
    sqlx_err
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

/// A column's value could not be turned into a [`SqlValue`].
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) fn decode_error(column: &str, type_name: &str, err: impl fmt::Display) -> CacheError {
    CacheError::Database {
        message: format!(
            "cannot read column {column:?} of type {type_name}: {err} (cast it in SQL, e.g. to text)"
        ),
        source: None,
    }
}

/// Turns a driver's rows into [`Rows`]: column names from the first row, each cell through
/// the driver's `cell` conversion (index, column).
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) fn to_rows<R: sqlx::Row>(
    rows: &[R],
    cell: impl Fn(&R, usize, &<R::Database as sqlx::Database>::Column) -> Result<SqlValue>,
) -> Result<Rows> {
    use sqlx::Column;
    let columns: Vec<String> = rows
        .first()
        .map(|r| r.columns().iter().map(|c| c.name().to_owned()).collect())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let values = row
            .columns()
            .iter()
            .enumerate()
            .map(|(i, column)| cell(row, i, column))
            .collect::<Result<Vec<_>>>()?;
        out.push(values);
    }
    Ok(Rows::new(columns, out))
}

/// Binds [`SqlValue`]s onto a sqlx query, with the same code for every driver.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
macro_rules! bind_values {
    ($query:expr, $params:expr, $null:expr) => {{
        let mut q = $query;
        for value in $params {
            q = match value {
                $crate::SqlValue::Null => q.bind($null),
                $crate::SqlValue::Bool(b) => q.bind(*b),
                $crate::SqlValue::Int(n) => q.bind(*n),
                $crate::SqlValue::Float(f) => q.bind(*f),
                $crate::SqlValue::Text(s) => q.bind(s.as_str()),
                $crate::SqlValue::Bytes(b) => q.bind(b.as_slice()),
                $crate::SqlValue::Timestamp(t) => q.bind(*t),
                $crate::SqlValue::Json(j) => q.bind(sqlx::types::Json(j)),
            };
        }
        q
    }};
}
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) use bind_values;
