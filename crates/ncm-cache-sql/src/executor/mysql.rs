//! [`MySqlExecutor`]: MySQL and MariaDB over a sqlx pool.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use ncm_cache_core::Result;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::{AssertSqlSafe, Column, Row, TypeInfo, ValueRef};

use super::{SqlDialect, SqlExecutor, bind_values, database_error, decode_error, to_rows};
use crate::rows::Rows;
use crate::value::SqlValue;

/// Runs statements on MySQL or MariaDB through a sqlx [`MySqlPool`] (feature `mysql`).
///
/// The identity (part of every cache key) is `mysql://host:port/database`, no credentials.
/// `BOOLEAN` (`TINYINT(1)`) columns read as `Bool`; `DECIMAL`, `DATE` and `TIME` as text;
/// unsigned 64-bit values beyond `i64::MAX` as text. MariaDB stores `JSON` as `LONGTEXT`, so
/// JSON columns read back as text there (MySQL 8 reports them as `Json`).
///
/// ```no_run
/// use ncm_cache_sql::MySqlExecutor;
/// # async fn demo() -> ncm_cache_core::Result<()> {
/// let db = MySqlExecutor::connect("mysql://root@127.0.0.1:3306/app").await?;
/// assert_eq!(ncm_cache_sql::SqlExecutor::identity(&db), "mysql://127.0.0.1:3306/app");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MySqlExecutor {
    pool: MySqlPool,
    identity: String,
}

impl MySqlExecutor {
    /// An executor over an existing pool.
    pub fn new(pool: MySqlPool) -> Self {
        let opts = pool.connect_options();
        let host = match opts.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", opts.get_host(), opts.get_port()),
        };
        let identity = format!("mysql://{host}/{}", opts.get_database().unwrap_or(""));
        Self { pool, identity }
    }

    /// Connects a pool to `url` (`mysql://user:password@host:port/database`).
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = MySqlPoolOptions::new()
            .connect(url)
            .await
            .map_err(|e| database_error("cannot connect to MySQL", e))?;
        Ok(Self::new(pool))
    }

    /// Replaces the identity used in cache keys.
    #[must_use]
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// The pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }
}

#[async_trait]
impl SqlExecutor for MySqlExecutor {
    fn dialect(&self) -> SqlDialect {
        SqlDialect::MySql
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
            .map_err(|e| database_error("MySQL query failed", e))?;
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
            .map_err(|e| database_error("MySQL statement failed", e))?;
        Ok(done.rows_affected())
    }
}

fn cell(row: &MySqlRow, i: usize, name: &str, ty: &str) -> Result<SqlValue> {
    let get = |e: sqlx::Error| decode_error(name, ty, e);
    let raw = row.try_get_raw(i).map_err(get)?;
    if raw.is_null() {
        return Ok(SqlValue::Null);
    }
    Ok(match ty {
        "NULL" => SqlValue::Null,
        "BOOLEAN" => SqlValue::Bool(row.try_get(i).map_err(get)?),
        "TINYINT" | "SMALLINT" | "INT" | "MEDIUMINT" | "BIGINT" => {
            SqlValue::Int(row.try_get(i).map_err(get)?)
        }
        "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "INT UNSIGNED" | "MEDIUMINT UNSIGNED"
        | "BIGINT UNSIGNED" | "BIT" | "YEAR" => {
            let v: u64 = row.try_get_unchecked(i).map_err(get)?;
            i64::try_from(v).map_or_else(|_| SqlValue::Text(v.to_string()), SqlValue::Int)
        }
        "FLOAT" => SqlValue::Float(row.try_get::<f32, _>(i).map_err(get)?.into()),
        "DOUBLE" => SqlValue::Float(row.try_get(i).map_err(get)?),
        "DECIMAL" | "SET" => SqlValue::Text(row.try_get_unchecked(i).map_err(get)?),
        "VARCHAR" | "CHAR" | "TEXT" | "TINYTEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM" => {
            SqlValue::Text(row.try_get(i).map_err(get)?)
        }
        // The name says "binary" for `_bin` collations too; only the binary collation is bytes.
        "VARBINARY" | "BINARY" | "BLOB" | "TINYBLOB" | "MEDIUMBLOB" | "LONGBLOB" => {
            match row.try_get::<String, _>(i) {
                Ok(text) => SqlValue::Text(text),
                Err(_) => SqlValue::Bytes(row.try_get_unchecked(i).map_err(get)?),
            }
        }
        "GEOMETRY" => SqlValue::Bytes(row.try_get_unchecked(i).map_err(get)?),
        "DATETIME" => {
            SqlValue::Timestamp(row.try_get::<NaiveDateTime, _>(i).map_err(get)?.and_utc())
        }
        "TIMESTAMP" => SqlValue::Timestamp(row.try_get::<DateTime<Utc>, _>(i).map_err(get)?),
        "DATE" => SqlValue::Text(
            row.try_get::<NaiveDate, _>(i)
                .map_err(get)?
                .format("%Y-%m-%d")
                .to_string(),
        ),
        "TIME" => SqlValue::Text(
            row.try_get::<NaiveTime, _>(i)
                .map_err(get)?
                .format("%H:%M:%S%.f")
                .to_string(),
        ),
        "JSON" => SqlValue::Json(
            row.try_get::<sqlx::types::Json<serde_json::Value>, _>(i)
                .map_err(get)?
                .0,
        ),
        other => return Err(decode_error(name, other, "unsupported type")),
    })
}
