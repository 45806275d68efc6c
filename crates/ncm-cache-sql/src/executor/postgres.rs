//! [`PgExecutor`]: PostgreSQL over a sqlx pool.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use ncm_cache_core::Result;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::{Oid, PgInterval};
use sqlx::postgres::{PgArgumentBuffer, PgPool, PgPoolOptions, PgRow, PgTypeInfo, PgTypeKind};
use sqlx::{AssertSqlSafe, Column, Encode, Postgres, Row, Type, TypeInfo, ValueRef};

use super::{SqlDialect, SqlExecutor, bind_values, database_error, decode_error, to_rows};
use crate::rows::Rows;
use crate::value::SqlValue;

/// Runs statements on PostgreSQL through a sqlx [`PgPool`] (feature `postgres`).
///
/// The identity (part of every cache key) is `postgres://host:port/database`, plus the
/// connection's `options` (where a `search_path` is usually set); no credentials.
///
/// Parameters are typed: `Int` binds as `int8`, `Text` as `text`, `Timestamp` as `timestamptz`,
/// `Json` as `jsonb`, `Null` as an untyped NULL (the server infers it). Compare a text
/// parameter with a date column by casting it (`WHERE day >= %s::date`).
///
/// ```no_run
/// use ncm_cache_sql::PgExecutor;
/// # async fn demo() -> ncm_cache_core::Result<()> {
/// let db = PgExecutor::connect("postgres://app@127.0.0.1:5432/app").await?;
/// assert_eq!(ncm_cache_sql::SqlExecutor::identity(&db), "postgres://127.0.0.1:5432/app");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgExecutor {
    pool: PgPool,
    identity: String,
}

impl PgExecutor {
    /// An executor over an existing pool.
    pub fn new(pool: PgPool) -> Self {
        let opts = pool.connect_options();
        let host = match opts.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", opts.get_host(), opts.get_port()),
        };
        let database = opts.get_database().unwrap_or(opts.get_username());
        let mut identity = format!("postgres://{host}/{database}");
        if let Some(options) = opts.get_options().filter(|o| !o.is_empty()) {
            identity.push_str("?options=");
            identity.push_str(options);
        }
        Self { pool, identity }
    }

    /// Connects a pool to `url` (`postgres://user:password@host:port/database`).
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .connect(url)
            .await
            .map_err(|e| database_error("cannot connect to PostgreSQL", e))?;
        Ok(Self::new(pool))
    }

    /// Replaces the identity used in cache keys.
    #[must_use]
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// The pool (for the LISTEN/NOTIFY listener and your own queries).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A NULL without a type: the server infers it from the context, so it fits any column.
struct UntypedNull;

impl Type<Postgres> for UntypedNull {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(0))
    }
}

impl Encode<'_, Postgres> for UntypedNull {
    fn encode_by_ref(
        &self,
        _buf: &mut PgArgumentBuffer,
    ) -> std::result::Result<IsNull, BoxDynError> {
        Ok(IsNull::Yes)
    }
}

#[async_trait]
impl SqlExecutor for PgExecutor {
    fn dialect(&self) -> SqlDialect {
        SqlDialect::Postgres
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    async fn fetch_all(&self, sql: &str, params: &[SqlValue]) -> Result<Rows> {
        let query = |persistent: bool| {
            bind_values!(
                sqlx::query(AssertSqlSafe(sql.to_owned())),
                params,
                UntypedNull
            )
            .persistent(persistent)
        };
        let rows = match query(true).fetch_all(&self.pool).await {
            // A table changed shape since this connection prepared the statement.
            Err(e) if is_stale_plan(&e) => match self.fresh_connection().await {
                Ok(mut conn) => query(true).fetch_all(&mut *conn).await,
                Err(e) => Err(e),
            },
            other => other,
        }
        .map_err(|e| database_error("PostgreSQL query failed", e))?;
        to_rows(&rows, |row, i, column| {
            cell(row, i, column.name(), column.type_info())
        })
    }

    async fn execute(&self, sql: &str, params: &[SqlValue]) -> Result<u64> {
        let query = |persistent: bool| {
            bind_values!(
                sqlx::query(AssertSqlSafe(sql.to_owned())),
                params,
                UntypedNull
            )
            .persistent(persistent)
        };
        let done = match query(true).execute(&self.pool).await {
            Err(e) if is_stale_plan(&e) => match self.fresh_connection().await {
                Ok(mut conn) => query(true).execute(&mut *conn).await,
                Err(e) => Err(e),
            },
            other => other,
        }
        .map_err(|e| database_error("PostgreSQL statement failed", e))?;
        Ok(done.rows_affected())
    }
}

impl PgExecutor {
    /// A pooled connection without prepared statements, for a retry after a stale plan (an
    /// unprepared retry is not enough: the statement may still be found in the cache of the
    /// connection the pool hands out).
    async fn fresh_connection(
        &self,
    ) -> std::result::Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
        use sqlx::Connection as _;
        let mut conn = self.pool.acquire().await?;
        conn.clear_cached_statements().await?;
        Ok(conn)
    }
}

/// `cached plan must not change result type`: the connection's prepared statement predates a
/// DDL change (e.g. `ALTER TABLE … ADD COLUMN` under `SELECT *`). The statement is run again
/// on a connection whose statement cache was cleared.
fn is_stale_plan(err: &sqlx::Error) -> bool {
    err.as_database_error().is_some_and(|e| {
        e.code().as_deref() == Some("0A000") && e.message().contains("cached plan")
    })
}

fn cell(row: &PgRow, i: usize, name: &str, ty: &PgTypeInfo) -> Result<SqlValue> {
    let raw = row
        .try_get_raw(i)
        .map_err(|e| decode_error(name, ty.name(), e))?;
    if raw.is_null() {
        return Ok(SqlValue::Null);
    }
    let err = |e: &dyn std::fmt::Display| decode_error(name, ty.name(), e);
    let get = |e: sqlx::Error| decode_error(name, ty.name(), e);
    let text = || -> Result<SqlValue> {
        raw.as_str()
            .map(|s| SqlValue::Text(s.to_owned()))
            .map_err(|e| err(&e))
    };
    let oid = match ty.kind() {
        PgTypeKind::Enum(_) => return text(),
        PgTypeKind::Domain(base) => base.oid(),
        _ => ty.oid(),
    };
    Ok(match oid.map(|o| o.0) {
        Some(16) => SqlValue::Bool(row.try_get(i).map_err(get)?),
        Some(21) => SqlValue::Int(row.try_get::<i16, _>(i).map_err(get)?.into()),
        Some(23) => SqlValue::Int(row.try_get::<i32, _>(i).map_err(get)?.into()),
        Some(20) => SqlValue::Int(row.try_get(i).map_err(get)?),
        Some(26) => SqlValue::Int(row.try_get::<Oid, _>(i).map_err(get)?.0.into()),
        Some(700) => SqlValue::Float(row.try_get::<f32, _>(i).map_err(get)?.into()),
        Some(701) => SqlValue::Float(row.try_get(i).map_err(get)?),
        // text, "char", name, bpchar, varchar, xml: the binary form is the text.
        Some(25 | 18 | 19 | 1042 | 1043 | 142) => return text(),
        Some(17) => SqlValue::Bytes(row.try_get(i).map_err(get)?),
        Some(1114) => {
            SqlValue::Timestamp(row.try_get::<NaiveDateTime, _>(i).map_err(get)?.and_utc())
        }
        Some(1184) => SqlValue::Timestamp(row.try_get::<DateTime<Utc>, _>(i).map_err(get)?),
        Some(1082) => SqlValue::Text(
            row.try_get::<NaiveDate, _>(i)
                .map_err(get)?
                .format("%Y-%m-%d")
                .to_string(),
        ),
        Some(1083) => SqlValue::Text(
            row.try_get::<NaiveTime, _>(i)
                .map_err(get)?
                .format("%H:%M:%S%.f")
                .to_string(),
        ),
        Some(114 | 3802) => SqlValue::Json(
            row.try_get::<sqlx::types::Json<serde_json::Value>, _>(i)
                .map_err(get)?
                .0,
        ),
        Some(1700) => {
            let bytes = raw.as_bytes().map_err(|e| err(&e))?;
            SqlValue::Text(numeric_text(bytes).ok_or_else(|| err(&"malformed numeric"))?)
        }
        Some(2950) => {
            let bytes = raw.as_bytes().map_err(|e| err(&e))?;
            SqlValue::Text(uuid_text(bytes).ok_or_else(|| err(&"malformed uuid"))?)
        }
        Some(1186) => {
            let iv: PgInterval = row.try_get(i).map_err(get)?;
            SqlValue::Text(interval_text(&iv))
        }
        Some(1000) => SqlValue::Json(serde_json::json!(
            row.try_get::<Vec<Option<bool>>, _>(i).map_err(get)?
        )),
        Some(1005) => SqlValue::Json(serde_json::json!(
            row.try_get::<Vec<Option<i16>>, _>(i).map_err(get)?
        )),
        Some(1007) => SqlValue::Json(serde_json::json!(
            row.try_get::<Vec<Option<i32>>, _>(i).map_err(get)?
        )),
        Some(1016) => SqlValue::Json(serde_json::json!(
            row.try_get::<Vec<Option<i64>>, _>(i).map_err(get)?
        )),
        Some(1021) => SqlValue::Json(serde_json::json!(
            row.try_get::<Vec<Option<f32>>, _>(i).map_err(get)?
        )),
        Some(1022) => SqlValue::Json(serde_json::json!(
            row.try_get::<Vec<Option<f64>>, _>(i).map_err(get)?
        )),
        Some(1009 | 1015) => SqlValue::Json(serde_json::json!(
            row.try_get::<Vec<Option<String>>, _>(i).map_err(get)?
        )),
        _ => return Err(err(&"unsupported type")),
    })
}

/// PostgreSQL's binary `numeric` as exact decimal text.
fn numeric_text(b: &[u8]) -> Option<String> {
    let word =
        |at: usize| -> Option<u16> { Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?])) };
    let ndigits = usize::from(word(0)?);
    let weight = i64::from(word(2)? as i16);
    let sign = word(4)?;
    let dscale = usize::from(word(6)?);
    let digits: Vec<u16> = (0..ndigits)
        .map(|k| word(8 + 2 * k))
        .collect::<Option<_>>()?;
    let negative = match sign {
        0x0000 => false,
        0x4000 => true,
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        _ => return None,
    };
    let digit = |k: i64| -> u16 {
        usize::try_from(k)
            .ok()
            .and_then(|k| digits.get(k).copied())
            .unwrap_or(0)
    };
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        out.push_str(&digit(0).to_string());
        for k in 1..=weight {
            out.push_str(&format!("{:04}", digit(k)));
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut k = weight + 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", digit(k)));
            k += 1;
        }
        frac.truncate(dscale);
        out.push('.');
        out.push_str(&frac);
    }
    Some(out)
}

fn uuid_text(b: &[u8]) -> Option<String> {
    if b.len() != 16 {
        return None;
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8)?,
        hex.get(8..12)?,
        hex.get(12..16)?,
        hex.get(16..20)?,
        hex.get(20..32)?
    ))
}

/// An interval as ISO 8601 (`P1Y2M3DT4H5M6.5S`).
fn interval_text(iv: &PgInterval) -> String {
    let mut out = String::from("P");
    let (years, months) = (iv.months / 12, iv.months % 12);
    if years != 0 {
        out.push_str(&format!("{years}Y"));
    }
    if months != 0 {
        out.push_str(&format!("{months}M"));
    }
    if iv.days != 0 {
        out.push_str(&format!("{}D", iv.days));
    }
    if iv.microseconds != 0 {
        let secs = iv.microseconds as f64 / 1e6;
        out.push_str(&format!("T{secs}S"));
    }
    if out == "P" {
        out.push_str("T0S");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [ndigits, weight as u16, sign, dscale] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    #[test]
    fn numeric_binary_to_text() {
        assert_eq!(
            numeric_text(&numeric(2, 0, 0, 2, &[12, 5000])).unwrap(),
            "12.50"
        );
        assert_eq!(
            numeric_text(&numeric(2, 1, 0x4000, 0, &[1, 2])).unwrap(),
            "-10002"
        );
        assert_eq!(
            numeric_text(&numeric(1, -2, 0, 8, &[1234])).unwrap(),
            "0.00001234"
        );
        assert_eq!(numeric_text(&numeric(0, 0, 0, 0, &[])).unwrap(), "0");
        assert_eq!(
            numeric_text(&numeric(1, 2, 0, 0, &[7])).unwrap(),
            "700000000"
        );
        assert_eq!(numeric_text(&numeric(0, 0, 0xC000, 0, &[])).unwrap(), "NaN");
        assert_eq!(numeric_text(&[0, 1]), None);
        assert_eq!(numeric_text(&numeric(3, 0, 0, 0, &[1])), None);
    }

    #[test]
    fn uuid_and_interval_text() {
        let b: Vec<u8> = (0u8..16).collect();
        assert_eq!(
            uuid_text(&b).unwrap(),
            "00010203-0405-0607-0809-0a0b0c0d0e0f"
        );
        assert_eq!(uuid_text(&b[..3]), None);
        let iv = PgInterval {
            months: 14,
            days: 3,
            microseconds: 1_500_000,
        };
        assert_eq!(interval_text(&iv), "P1Y2M3DT1.5S");
        let zero = PgInterval {
            months: 0,
            days: 0,
            microseconds: 0,
        };
        assert_eq!(interval_text(&zero), "PT0S");
    }
}
