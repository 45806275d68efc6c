//! [`SqliteExecutor`]: SQLite over a sqlx pool (bundled libsqlite3).

use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use ncm_cache_core::Result;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{AssertSqlSafe, Column, Row, TypeInfo, ValueRef};

use super::{SqlDialect, SqlExecutor, bind_values, database_error, decode_error, to_rows};
use crate::rows::Rows;
use crate::value::SqlValue;

/// Runs statements on SQLite through a sqlx [`SqlitePool`] (feature `sqlite`, the default; the
/// library is compiled in, nothing to install).
///
/// The identity is `sqlite://<file>`; an in-memory database gets one unique to this process
/// and pool. SQLite has no boolean or date types: values in a column declared `BOOLEAN` read
/// as `Bool`, text in a column declared `DATETIME`/`TIMESTAMP` as `Timestamp`, and `Json`
/// parameters are stored as text.
///
/// ```
/// use ncm_cache_sql::{SqlExecutor, SqliteExecutor, SqlValue};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let db = SqliteExecutor::memory().await?;
/// db.execute("CREATE TABLE t (id INTEGER, ok BOOLEAN)", &[]).await?;
/// db.execute("INSERT INTO t VALUES (?, ?)", &[SqlValue::Int(1), SqlValue::Bool(true)]).await?;
/// let rows = db.fetch_all("SELECT id, ok FROM t", &[]).await?;
/// assert_eq!(rows.rows, vec![vec![SqlValue::Int(1), SqlValue::Bool(true)]]);
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct SqliteExecutor {
    pool: SqlitePool,
    identity: String,
}

impl SqliteExecutor {
    /// An executor over an existing pool.
    pub fn new(pool: SqlitePool) -> Self {
        let opts = pool.connect_options();
        let file = opts.get_filename().display().to_string();
        let identity = if file.starts_with("file:sqlx-in-memory-") || file == ":memory:" {
            format!("sqlite::memory:{}:{file}", std::process::id())
        } else {
            // The canonical path: `./app.db`, `app.db` and a symlink to it are one database.
            let path = std::fs::canonicalize(opts.get_filename())
                .map_or(file, |p| p.display().to_string());
            format!("sqlite://{path}")
        };
        Self { pool, identity }
    }

    /// Opens (creating it if missing) the database at `url` (`sqlite://path/to/file.db`, or
    /// `sqlite::memory:`).
    pub async fn connect(url: &str) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| database_error("invalid SQLite URL", e))?
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .connect_with(opts)
            .await
            .map_err(|e| database_error("cannot open SQLite database", e))?;
        Ok(Self::new(pool))
    }

    /// A private in-memory database on one connection that lives as long as the executor.
    pub async fn memory() -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|e| database_error("invalid SQLite URL", e))?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await
            .map_err(|e| database_error("cannot open SQLite database", e))?;
        Ok(Self::new(pool))
    }

    /// Replaces the identity used in cache keys.
    #[must_use]
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

#[async_trait]
impl SqlExecutor for SqliteExecutor {
    fn dialect(&self) -> SqlDialect {
        SqlDialect::Sqlite
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    async fn fetch_all(&self, sql: &str, params: &[SqlValue]) -> Result<Rows> {
        let query = bind_values!(
            sqlx::query(AssertSqlSafe(sql.to_owned())),
            params,
            None::<i64>
        );
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| database_error("SQLite query failed", e))?;
        to_rows(&rows, |row, i, column| {
            cell(row, i, column.name(), column.type_info().name())
        })
    }

    async fn execute(&self, sql: &str, params: &[SqlValue]) -> Result<u64> {
        let query = bind_values!(
            sqlx::query(AssertSqlSafe(sql.to_owned())),
            params,
            None::<i64>
        );
        let done = query
            .execute(&self.pool)
            .await
            .map_err(|e| database_error("SQLite statement failed", e))?;
        Ok(done.rows_affected())
    }
}

fn cell(row: &SqliteRow, i: usize, name: &str, declared: &str) -> Result<SqlValue> {
    let get = |e: sqlx::Error| decode_error(name, declared, e);
    let raw = row.try_get_raw(i).map_err(get)?;
    if raw.is_null() {
        return Ok(SqlValue::Null);
    }
    let storage = raw.type_info().name().to_owned();
    drop(raw);
    Ok(match storage.as_str() {
        "INTEGER" | "BOOLEAN" => {
            let n: i64 = row.try_get_unchecked(i).map_err(get)?;
            if declared == "BOOLEAN" {
                SqlValue::Bool(n != 0)
            } else {
                SqlValue::Int(n)
            }
        }
        "REAL" => SqlValue::Float(row.try_get_unchecked(i).map_err(get)?),
        "BLOB" => SqlValue::Bytes(row.try_get_unchecked(i).map_err(get)?),
        _ => {
            let text: String = row.try_get_unchecked(i).map_err(get)?;
            match declared {
                "DATETIME" => {
                    parse_timestamp(&text).map_or(SqlValue::Text(text), SqlValue::Timestamp)
                }
                _ => SqlValue::Text(text),
            }
        }
    })
}

/// The text forms SQLite programs write for date-times.
fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M:%S%.f%:z"] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_sqlite_text_forms() {
        let expect = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        for s in [
            "2023-11-14T22:13:20+00:00",
            "2023-11-14 22:13:20",
            "2023-11-14T22:13:20.000",
            "2023-11-15 00:13:20+02:00",
        ] {
            assert_eq!(parse_timestamp(s), Some(expect), "{s}");
        }
        assert_eq!(parse_timestamp("yesterday"), None);
    }
}
