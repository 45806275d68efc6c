//! [`PgExecutor`]: PostgreSQL over a sqlx pool.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, NaiveTime};
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
/// The identity (part of every cache key) comes from the server when built with
/// [`connect`](Self::connect) or [`from_pool`](Self::from_pool): the cluster's system
/// identifier, the database, the role and the `search_path`. [`new`](Self::new) (synchronous)
/// uses the connection string instead (`postgres://host:port/database` plus `options`), which
/// cannot tell two databases behind one pooler apart nor two host names of one server.
///
/// Parameters are typed: `Int` binds as `int8`, `Text` as `text`, `Timestamp` as `timestamptz`,
/// `Json` as `jsonb`, `Null` as an untyped NULL (the server infers it). Compare a text
/// parameter with a date column by casting it (`WHERE day >= %s::date`).
///
/// ```no_run
/// use ncm_cache_sql::PgExecutor;
/// # async fn demo() -> ncm_cache_core::Result<()> {
/// let db = PgExecutor::connect("postgres://app@127.0.0.1:5432/app").await?;
/// // postgres://7715298389250160788/app?user=app&search_path="$user",public
/// println!("{}", ncm_cache_sql::SqlExecutor::identity(&db));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgExecutor {
    pool: PgPool,
    identity: String,
    /// The identity without the role and search_path.
    database: String,
}

impl PgExecutor {
    /// An executor over an existing pool, identified by its connection string (prefer
    /// [`from_pool`](Self::from_pool), which asks the server).
    pub fn new(pool: PgPool) -> Self {
        let opts = pool.connect_options();
        let host = match opts.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => format!("{}:{}", opts.get_host(), opts.get_port()),
        };
        let database = opts.get_database().unwrap_or(opts.get_username());
        let mut identity = format!("postgres://{host}/{database}");
        let database = identity.clone();
        if let Some(options) = opts.get_options().filter(|o| !o.is_empty()) {
            identity.push_str("?options=");
            identity.push_str(options);
        }
        Self {
            pool,
            identity,
            database,
        }
    }

    /// Connects a pool to `url` (`postgres://user:password@host:port/database`); the identity
    /// comes from the server (see [`from_pool`](Self::from_pool)).
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .connect(url)
            .await
            .map_err(|e| database_error("cannot connect to PostgreSQL", e))?;
        Self::from_pool(pool).await
    }

    /// An executor over an existing pool, identified by the server rather than by the
    /// connection string: `postgres://{system identifier}/{database}?user={current_user}
    /// &search_path={search_path}`. Two host names (or a pooler) reaching one database share
    /// entries and invalidations; two databases behind one address, or two roles (row-level
    /// security), never share entries.
    ///
    /// # Errors
    ///
    /// [`CacheError::Config`](ncm_cache_core::CacheError::Config) when the role may not call
    /// `pg_control_system()` (some installations keep it for superusers and `pg_monitor`):
    /// nothing else identifies the server alike for every instance — its address depends on
    /// how a connection reached it (TCP or a Unix socket), its start time changes with every
    /// restart — and instances that disagree never see each other's invalidations. Grant
    /// `pg_monitor`, or build with [`new`](Self::new) and one
    /// [`with_identity`](Self::with_identity) shared by every instance.
    pub async fn from_pool(pool: PgPool) -> Result<Self> {
        let sysid = sqlx::query_scalar::<_, String>(
            "SELECT system_identifier::text FROM pg_control_system()",
        )
        .fetch_one(&pool)
        .await;
        let server = sysid.map_err(unidentified)?;
        let row = sqlx::query(
            "SELECT current_database()::text AS db, current_user::text AS usr, \
             current_setting('search_path') AS sp",
        )
        .fetch_one(&pool)
        .await
        .map_err(|e| database_error("cannot identify the PostgreSQL database", e))?;
        let get = |c: &str| -> Result<String> {
            row.try_get::<String, _>(c)
                .map_err(|e| database_error("bad identity row", e))
        };
        let database = format!("postgres://{server}/{}", get("db")?);
        let identity = format!(
            "{database}?user={}&search_path={}",
            get("usr")?,
            get("sp")?.replace(' ', "")
        );
        Ok(Self {
            pool,
            identity,
            database,
        })
    }

    /// Replaces the identity used in cache keys.
    #[must_use]
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self.database.clone_from(&self.identity);
        self
    }

    /// The pool (for the LISTEN/NOTIFY listener and your own queries).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Why the server's system identifier could not be read: a role without the right to call
/// `pg_control_system()` is a configuration error that says what to do (found by review: a
/// fallback on the server's address differed between TCP and Unix-socket connections, one on
/// its start time between instances started before and after a restart); anything else is
/// the database's error.
fn unidentified(e: sqlx::Error) -> ncm_cache_core::CacheError {
    let denied = matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("42501"));
    if !denied {
        return database_error("cannot identify the PostgreSQL server", e);
    }
    ncm_cache_core::CacheError::Config(format!(
        "cannot identify the PostgreSQL server: this role may not call pg_control_system() \
         ({e}), and no other value names the server alike for every instance; grant it \
         pg_monitor (GRANT pg_monitor TO <role>), or build the executor with \
         PgExecutor::new(pool).with_identity(\"postgres://<server>/<database>\") using the same \
         identity in every instance"
    ))
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

    fn database_identity(&self) -> &str {
        &self.database
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

    /// Views (and materialized views) over each table, and the tables under each view (a
    /// write through an updatable view writes them), partitions and their parents (both
    /// ways), and tables whose foreign keys cascade from each table (`CASCADE`, `SET NULL`,
    /// `SET DEFAULT` on delete or update), from `pg_depend`, `pg_inherits` and
    /// `pg_constraint`.
    async fn dependencies(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT DISTINCT src.relname::text AS written, v.relname::text AS affected \
               FROM pg_depend d \
               JOIN pg_rewrite r ON r.oid = d.objid \
               JOIN pg_class v ON v.oid = r.ev_class \
               JOIN pg_class src ON src.oid = d.refobjid \
              WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass \
                AND v.oid <> src.oid AND v.relkind IN ('v', 'm') \
             UNION \
             SELECT DISTINCT v.relname::text, src.relname::text \
               FROM pg_depend d \
               JOIN pg_rewrite r ON r.oid = d.objid \
               JOIN pg_class v ON v.oid = r.ev_class \
               JOIN pg_class src ON src.oid = d.refobjid \
              WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass \
                AND v.oid <> src.oid AND v.relkind = 'v' AND src.relkind IN ('r', 'p') \
             UNION \
             SELECT c.relname::text, p.relname::text FROM pg_inherits i \
               JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent \
             UNION \
             SELECT p.relname::text, c.relname::text FROM pg_inherits i \
               JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent \
             UNION \
             SELECT parent.relname::text, child.relname::text FROM pg_constraint con \
               JOIN pg_class child ON child.oid = con.conrelid \
               JOIN pg_class parent ON parent.oid = con.confrelid \
              WHERE con.contype = 'f' \
                AND (con.confdeltype IN ('c', 'n', 'd') OR con.confupdtype IN ('c', 'n', 'd'))",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| database_error("cannot read table dependencies from pg_catalog", e))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>(0)
                        .map_err(|e| database_error("bad catalog row", e))?,
                    r.try_get::<String, _>(1)
                        .map_err(|e| database_error("bad catalog row", e))?,
                ))
            })
            .collect()
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
    if raw.format() == sqlx::postgres::PgValueFormat::Text {
        return raw
            .as_str()
            .map(|s| SqlValue::Text(s.to_owned()))
            .map_err(|e| decode_error(name, ty.name(), e));
    }
    let bytes = raw
        .as_bytes()
        .map_err(|e| decode_error(name, ty.name(), e))?;
    let oid = match ty.kind() {
        PgTypeKind::Enum(_) => 25,
        PgTypeKind::Domain(base) => base.oid().map_or(0, |o| o.0),
        _ => ty.oid().map_or(0, |o| o.0),
    };
    // A value the decoder does not know, or malformed for its type, is returned as its
    // binary wire form: the query the database answered never fails here (cast the column to
    // text in SQL for a readable value).
    Ok(binary(oid, bytes).unwrap_or_else(|| SqlValue::Bytes(bytes.to_vec())))
}

/// Days from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;
/// Microseconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH_MICROS: i64 = PG_EPOCH_DAYS * 86_400 * 1_000_000;

/// Decodes a value in PostgreSQL's binary format by type oid (`None`: unknown or malformed).
fn binary(oid: u32, b: &[u8]) -> Option<SqlValue> {
    let be8 = || -> Option<[u8; 8]> { b.try_into().ok() };
    let be4 = || -> Option<[u8; 4]> { b.try_into().ok() };
    let text = || {
        std::str::from_utf8(b)
            .ok()
            .map(|s| SqlValue::Text(s.to_owned()))
    };
    Some(match oid {
        16 => SqlValue::Bool(*b.first()? != 0),
        21 => SqlValue::Int(i16::from_be_bytes(b.try_into().ok()?).into()),
        23 => SqlValue::Int(i32::from_be_bytes(be4()?).into()),
        20 => SqlValue::Int(i64::from_be_bytes(be8()?)),
        26 => SqlValue::Int(u32::from_be_bytes(be4()?).into()),
        700 => SqlValue::Float(f32::from_be_bytes(be4()?).into()),
        701 => SqlValue::Float(f64::from_be_bytes(be8()?)),
        // text, "char", name, bpchar, varchar, xml, unknown, citext-like: the binary form is
        // the text.
        25 | 18 | 19 | 1042 | 1043 | 142 | 705 => return text(),
        17 => SqlValue::Bytes(b.to_vec()),
        // timestamp, timestamptz: microseconds since 2000-01-01; ±infinity as text.
        1114 | 1184 => match i64::from_be_bytes(be8()?) {
            i64::MAX => SqlValue::Text("infinity".into()),
            i64::MIN => SqlValue::Text("-infinity".into()),
            us => SqlValue::Timestamp(DateTime::from_timestamp_micros(
                us.checked_add(PG_EPOCH_MICROS)?,
            )?),
        },
        // date: days since 2000-01-01.
        1082 => match i32::from_be_bytes(be4()?) {
            i32::MAX => SqlValue::Text("infinity".into()),
            i32::MIN => SqlValue::Text("-infinity".into()),
            days => {
                let date = NaiveDate::from_num_days_from_ce_opt(
                    i32::try_from(i64::from(days) + PG_EPOCH_DAYS + 719_163).ok()?,
                )?;
                SqlValue::Text(date.format("%Y-%m-%d").to_string())
            }
        },
        // time: microseconds since midnight.
        1083 => {
            let us = i64::from_be_bytes(be8()?);
            let secs = u32::try_from(us.div_euclid(1_000_000)).ok()?;
            let nanos = u32::try_from(us.rem_euclid(1_000_000) * 1000).ok()?;
            let t = NaiveTime::from_num_seconds_from_midnight_opt(secs, nanos)?;
            SqlValue::Text(t.format("%H:%M:%S%.f").to_string())
        }
        114 => SqlValue::Json(serde_json::from_slice(b).ok()?),
        // jsonb: a version byte (1), then the text.
        3802 => match b.split_first() {
            Some((1, rest)) => SqlValue::Json(serde_json::from_slice(rest).ok()?),
            _ => return None,
        },
        1700 => SqlValue::Text(numeric_text(b)?),
        2950 => SqlValue::Text(uuid_text(b)?),
        1186 => {
            let iv = PgInterval {
                microseconds: i64::from_be_bytes(b.get(0..8)?.try_into().ok()?),
                days: i32::from_be_bytes(b.get(8..12)?.try_into().ok()?),
                months: i32::from_be_bytes(b.get(12..16)?.try_into().ok()?),
            };
            SqlValue::Text(interval_text(&iv))
        }
        // inet, cidr.
        869 | 650 => SqlValue::Text(inet_text(b, oid == 650)?),
        // money: an int8 of cents (with the default lc_monetary's two decimals).
        790 => {
            let cents = i64::from_be_bytes(be8()?);
            let sign = if cents < 0 { "-" } else { "" };
            let abs = cents.unsigned_abs();
            SqlValue::Text(format!("{sign}{}.{:02}", abs / 100, abs % 100))
        }
        // Arrays of anything this decoder reads, as JSON (nested for several dimensions).
        _ if is_array(oid) => SqlValue::Json(array_json(b)?),
        _ => return None,
    })
}

/// The oids of PostgreSQL's built-in array types (`_bool`, `_int4`, `_numeric`, `_uuid`,
/// `_date`, `_timestamptz`, `_jsonb`, …).
fn is_array(oid: u32) -> bool {
    matches!(
        oid,
        1000 | 1001
            | 1005
            | 1007
            | 1016
            | 1028
            | 1021
            | 1022
            | 1009
            | 1014
            | 1015
            | 199
            | 3807
            | 1231
            | 2951
            | 1182
            | 1115
            | 1185
            | 1183
            | 1187
            | 1041
            | 651
            | 791
            | 1002
            | 1003
    )
}

/// A binary array as JSON: header (dimensions, flags, element oid, per dimension its length
/// and lower bound), then each element as a length (-1: NULL) and its bytes.
fn array_json(b: &[u8]) -> Option<serde_json::Value> {
    let i32_at = |at: usize| -> Option<i32> {
        Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let ndim = usize::try_from(i32_at(0)?).ok()?;
    let elem = u32::try_from(i32_at(8)?).ok()?;
    // Elements are never arrays (PostgreSQL arrays are multi-dimensional instead): refusing
    // them bounds the recursion whatever the bytes say.
    if is_array(elem) {
        return None;
    }
    if ndim == 0 {
        return Some(serde_json::Value::Array(Vec::new()));
    }
    if ndim > 6 {
        return None;
    }
    let mut dims = Vec::with_capacity(ndim);
    for d in 0..ndim {
        dims.push(usize::try_from(i32_at(12 + 8 * d)?).ok()?);
    }
    let mut at = 12 + 8 * ndim;
    let total = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    // Every element takes at least its 4-byte length: a header claiming more is malformed.
    if total > b.len().saturating_sub(12 + 8 * ndim) / 4 {
        return None;
    }
    let mut flat = Vec::with_capacity(total);
    for _ in 0..total {
        let len = i32_at(at)?;
        at += 4;
        if len < 0 {
            flat.push(serde_json::Value::Null);
            continue;
        }
        let len = usize::try_from(len).ok()?;
        let bytes = b.get(at..at.checked_add(len)?)?;
        at += len;
        flat.push(to_json(binary(elem, bytes)?));
    }
    // Fold the flat list into nested arrays, innermost dimension first.
    for &d in dims.iter().skip(1).rev() {
        if d == 0 {
            return Some(serde_json::Value::Array(Vec::new()));
        }
        flat = flat
            .chunks(d)
            .map(|c| serde_json::Value::Array(c.to_vec()))
            .collect();
    }
    Some(serde_json::Value::Array(flat))
}

fn to_json(v: SqlValue) -> serde_json::Value {
    match v {
        SqlValue::Null => serde_json::Value::Null,
        SqlValue::Bool(b) => b.into(),
        SqlValue::Int(n) => n.into(),
        SqlValue::Float(f) => {
            serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, Into::into)
        }
        SqlValue::Text(s) => s.into(),
        SqlValue::Bytes(b) => b.into(),
        SqlValue::Timestamp(t) => t
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            .into(),
        SqlValue::Json(j) => j,
    }
}

/// `inet` / `cidr` binary: family (2: IPv4, 3: IPv6), prefix bits, is-cidr, address length,
/// address. A host address (full-length prefix) of `inet` prints without the prefix.
fn inet_text(b: &[u8], cidr: bool) -> Option<String> {
    let (&family, rest) = b.split_first()?;
    let (&bits, rest) = rest.split_first()?;
    let addr = rest.get(2..)?;
    let (text, full) = match (family, addr.len()) {
        (2, 4) => (
            std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string(),
            32,
        ),
        (3, 16) => {
            let octets: [u8; 16] = addr.try_into().ok()?;
            (std::net::Ipv6Addr::from(octets).to_string(), 128)
        }
        _ => return None,
    };
    Some(if !cidr && bits == full {
        text
    } else {
        format!("{text}/{bits}")
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

    /// A role that may not call `pg_control_system()` gets a configuration error that says
    /// what to do (a permission error, 42501, made for real by a role without the right to
    /// read server files); any other failure stays the database's error. Skipped without a
    /// local PostgreSQL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_system_identifier_is_a_config_error_that_says_what_to_do() {
        let Ok(pool) = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(3))
            .connect("postgres://postgres@127.0.0.1:5432/test")
            .await
        else {
            eprintln!("skipped: no PostgreSQL on 127.0.0.1:5432");
            return;
        };
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SET ROLE pg_monitor")
            .execute(&mut *conn)
            .await
            .unwrap();
        let denied = sqlx::query_scalar::<_, String>("SELECT pg_read_file('/etc/hostname')")
            .fetch_one(&mut *conn)
            .await
            .unwrap_err();
        let e = unidentified(denied);
        assert!(
            matches!(&e, ncm_cache_core::CacheError::Config(m)
                if m.contains("GRANT pg_monitor") && m.contains("with_identity")),
            "{e:?}"
        );
        let other = sqlx::query_scalar::<_, String>("SELECT no_such_column FROM pg_class")
            .fetch_one(&mut *conn)
            .await
            .unwrap_err();
        assert!(
            matches!(
                unidentified(other),
                ncm_cache_core::CacheError::Database { .. }
            ),
            "another failure is the database's error"
        );
        sqlx::query("RESET ROLE").execute(&mut *conn).await.unwrap();
    }

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
