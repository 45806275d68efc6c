//! [`SqlValue`]: one portable SQL value, used for parameters and for result cells.

use std::fmt;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

mod stored;

/// One SQL value: a query parameter or a cell of a result row.
///
/// The same type travels in both directions, so a cached result is portable between
/// databases and between processes (it is stored through the cache's codec).
///
/// How database types map onto it:
///
/// | `SqlValue` | PostgreSQL | MySQL / MariaDB | SQLite |
/// |---|---|---|---|
/// | `Null` | `NULL` (any type) | `NULL` | `NULL` |
/// | `Bool` | `bool` | `BOOLEAN` (`TINYINT(1)`) | integer in a `BOOLEAN` column |
/// | `Int` | `int2`, `int4`, `int8`, `oid` | integer types, `BIT`, `YEAR` | `INTEGER` |
/// | `Float` | `float4`, `float8` | `FLOAT`, `DOUBLE` | `REAL` |
/// | `Text` | text types, enums, `numeric`, `date`, `time`, `uuid`, `interval`… | text types, `DECIMAL`, `DATE`, `TIME`, `ENUM`, `SET` | `TEXT` |
/// | `Bytes` | `bytea` | binary / blob types | `BLOB` |
/// | `Timestamp` | `timestamp`, `timestamptz` | `DATETIME`, `TIMESTAMP` | text in a `DATETIME` column |
/// | `Json` | `json`, `jsonb` | `JSON` (MySQL; MariaDB reports `LONGTEXT`) | — (text) |
///
/// Exact numbers (`numeric`, `DECIMAL`) come back as `Text` so no digit is lost; cast in SQL
/// (`::float8`) when a float is wanted. Naive timestamps are read as UTC.
///
/// ```
/// use ncm_cache_sql::SqlValue;
/// assert_eq!(SqlValue::from(42), SqlValue::Int(42));
/// assert_eq!(SqlValue::from("Zoë"), SqlValue::Text("Zoë".into()));
/// assert_eq!(SqlValue::from(None::<i64>), SqlValue::Null);
/// assert_eq!(SqlValue::Int(7).as_i64(), Some(7));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    /// SQL `NULL`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer (every integer type up to 64 bits).
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// Text (also exact decimals, dates, times, UUIDs and other types without a closer match).
    Text(String),
    /// Binary data.
    Bytes(Vec<u8>),
    /// A point in time, in UTC.
    Timestamp(DateTime<Utc>),
    /// A JSON document.
    Json(serde_json::Value),
}

impl SqlValue {
    /// `true` for [`SqlValue::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }

    /// The integer, if this is an `Int` (or a `Bool`, as 0/1).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Int(v) => Some(*v),
            Self::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// The number, if this is a `Float` or an `Int`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(v) => Some(*v),
            Self::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// The boolean, if this is a `Bool` (or an `Int` 0/1, as SQLite and MySQL store them).
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            Self::Int(0) => Some(false),
            Self::Int(1) => Some(true),
            _ => None,
        }
    }

    /// The text, if this is `Text`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The bytes, if this is `Bytes`.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Self::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The timestamp, if this is a `Timestamp`.
    pub fn as_timestamp(&self) -> Option<DateTime<Utc>> {
        match self {
            Self::Timestamp(t) => Some(*t),
            _ => None,
        }
    }

    /// The JSON document, if this is `Json`.
    pub fn as_json(&self) -> Option<&serde_json::Value> {
        match self {
            Self::Json(j) => Some(j),
            _ => None,
        }
    }

    /// The variant's name (`"null"`, `"int"`, ...), for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "bool",
            Self::Int(_) => "int",
            Self::Float(_) => "float",
            Self::Text(_) => "text",
            Self::Bytes(_) => "bytes",
            Self::Timestamp(_) => "timestamp",
            Self::Json(_) => "json",
        }
    }

    /// Feeds a stable, unambiguous encoding of the value to `out` (used for cache keys: equal
    /// values give equal bytes on every platform and in every release).
    pub(crate) fn stable_bytes(&self, out: &mut Vec<u8>) {
        fn framed(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
            out.push(tag);
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        match self {
            Self::Null => out.push(0),
            Self::Bool(b) => out.extend_from_slice(&[1, u8::from(*b)]),
            Self::Int(v) => framed(out, 2, &v.to_le_bytes()),
            Self::Float(v) => framed(out, 3, &v.to_bits().to_le_bytes()),
            Self::Text(s) => framed(out, 4, s.as_bytes()),
            Self::Bytes(b) => framed(out, 5, b),
            // Nanoseconds since the epoch where they fit in an i64 (1677–2262; the encoding
            // of every release so far); outside, seconds and nanoseconds under another tag, so
            // two instants never share bytes (before, whole seconds under the same tag: a
            // far-future instant collided with one in 1970, and sub-second parts were lost).
            Self::Timestamp(t) => match t.timestamp_nanos_opt() {
                Some(nanos) => framed(out, 6, &nanos.to_le_bytes()),
                None => {
                    let mut wide = [0u8; 12];
                    wide[..8].copy_from_slice(&t.timestamp().to_le_bytes());
                    wide[8..].copy_from_slice(&t.timestamp_subsec_nanos().to_le_bytes());
                    framed(out, 8, &wide);
                }
            },
            // serde_json keeps object keys sorted (no `preserve_order`), so equal documents
            // print equal text.
            Self::Json(j) => framed(out, 7, j.to_string().as_bytes()),
        }
    }
}

impl fmt::Display for SqlValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => f.write_str("NULL"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Int(v) => write!(f, "{v}"),
            Self::Float(v) => write!(f, "{v}"),
            Self::Text(s) => write!(f, "{s:?}"),
            Self::Bytes(b) => write!(f, "<{} bytes>", b.len()),
            Self::Timestamp(t) => write!(f, "{}", t.to_rfc3339()),
            Self::Json(j) => write!(f, "{j}"),
        }
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for SqlValue {
            fn from(v: $t) -> Self {
                Self::Int(i64::from(v))
            }
        }
    )*};
}
from_int!(i8, i16, i32, i64, u8, u16, u32);

impl From<bool> for SqlValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}

impl From<f32> for SqlValue {
    fn from(v: f32) -> Self {
        Self::Float(f64::from(v))
    }
}

impl From<f64> for SqlValue {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

impl From<&str> for SqlValue {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}

impl From<String> for SqlValue {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}

impl From<&String> for SqlValue {
    fn from(v: &String) -> Self {
        Self::Text(v.clone())
    }
}

impl From<Vec<u8>> for SqlValue {
    fn from(v: Vec<u8>) -> Self {
        Self::Bytes(v)
    }
}

impl From<&[u8]> for SqlValue {
    fn from(v: &[u8]) -> Self {
        Self::Bytes(v.to_vec())
    }
}

impl From<DateTime<Utc>> for SqlValue {
    fn from(v: DateTime<Utc>) -> Self {
        Self::Timestamp(v)
    }
}

impl From<NaiveDateTime> for SqlValue {
    /// A naive date-time is taken as UTC.
    fn from(v: NaiveDateTime) -> Self {
        Self::Timestamp(v.and_utc())
    }
}

impl From<NaiveDate> for SqlValue {
    /// A date is bound as ISO text (`2024-01-31`), which every database compares with dates.
    fn from(v: NaiveDate) -> Self {
        Self::Text(v.format("%Y-%m-%d").to_string())
    }
}

impl From<serde_json::Value> for SqlValue {
    fn from(v: serde_json::Value) -> Self {
        Self::Json(v)
    }
}

impl<T: Into<SqlValue>> From<Option<T>> for SqlValue {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_round_trip_keeps_every_variant() {
        let values = vec![
            SqlValue::Null,
            SqlValue::Bool(true),
            SqlValue::Int(i64::MIN),
            SqlValue::Float(0.1),
            SqlValue::Text("a'b\"c".into()),
            SqlValue::Bytes(vec![0, 255, 7]),
            SqlValue::Timestamp(DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap()),
            SqlValue::Json(serde_json::json!({"a": [1, 2], "b": null})),
            SqlValue::Float(f64::NAN),
            SqlValue::Float(f64::NEG_INFINITY),
            SqlValue::Float(5.0),
            SqlValue::Int(i64::MAX),
            SqlValue::Text(String::new()),
            SqlValue::Bytes(Vec::new()),
        ];
        let text = serde_json::to_string(&values).unwrap();
        let back: Vec<SqlValue> = serde_json::from_str(&text).unwrap();
        // NaN != NaN: compare the NaN separately.
        assert!(matches!(back[8], SqlValue::Float(f) if f.is_nan()));
        let strip = |v: &[SqlValue]| {
            v.iter()
                .filter(|x| !matches!(x, SqlValue::Float(f) if f.is_nan()))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&back), strip(&values));
        assert!(
            text.starts_with("[null,true,-9223372036854775808,0.1,"),
            "{text}"
        );
        for bad in [
            r#"{"q": 1}"#,
            r#"{}"#,
            r#"{"t": [1, 2], "j": 1}"#,
            r#"{"t": [99999999999999999, 0]}"#,
            "18446744073709551615",
        ] {
            assert!(serde_json::from_str::<SqlValue>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stable_bytes_distinguish_types() {
        let enc = |v: SqlValue| {
            let mut out = Vec::new();
            v.stable_bytes(&mut out);
            out
        };
        assert_ne!(enc(SqlValue::Int(1)), enc(SqlValue::Bool(true)));
        assert_ne!(enc(SqlValue::Int(1)), enc(SqlValue::Text("1".into())));
        assert_ne!(enc(SqlValue::Text("".into())), enc(SqlValue::Null));
        assert_ne!(
            enc(SqlValue::Text("ab".into())),
            enc(SqlValue::Bytes(b"ab".to_vec()))
        );
        assert_eq!(
            enc(SqlValue::Json(serde_json::json!({"b": 1, "a": 2}))),
            enc(SqlValue::Json(serde_json::json!({"a": 2, "b": 1})))
        );
    }

    /// Instants outside what i64 nanoseconds hold (before 1677, after 2262) keep their
    /// sub-second part and never share bytes with an instant inside that range (found by
    /// review: they were encoded as whole seconds under the nanoseconds' tag).
    #[test]
    fn stable_bytes_keep_every_instant_apart() {
        let enc = |t: DateTime<Utc>| {
            let mut out = Vec::new();
            SqlValue::Timestamp(t).stable_bytes(&mut out);
            out
        };
        let far = DateTime::from_timestamp(10_000_000_000, 0).unwrap(); // 2286
        let far_and_a_bit = DateTime::from_timestamp(10_000_000_000, 500).unwrap();
        assert_ne!(enc(far), enc(far_and_a_bit));
        // 10^10 ns after the epoch (1970) against 10^10 s after it.
        let near = DateTime::from_timestamp_nanos(10_000_000_000);
        assert_ne!(enc(far), enc(near));
        let old = DateTime::from_timestamp(-10_000_000_000, 1).unwrap(); // 1653
        assert_ne!(
            enc(old),
            enc(DateTime::from_timestamp(-10_000_000_000, 2).unwrap())
        );
        // Inside the range, the encoding of earlier releases (cache keys stay the same).
        let mut expected = vec![6];
        expected.extend_from_slice(&8u64.to_le_bytes());
        expected.extend_from_slice(&10_000_000_000i64.to_le_bytes());
        assert_eq!(enc(near), expected);
    }

    #[test]
    fn conversions() {
        assert_eq!(SqlValue::from(Some("x")), SqlValue::Text("x".into()));
        assert_eq!(SqlValue::from(1.5f32), SqlValue::Float(1.5));
        assert_eq!(SqlValue::from(u32::MAX), SqlValue::Int(i64::from(u32::MAX)));
        let d = NaiveDate::from_ymd_opt(2024, 1, 31).unwrap();
        assert_eq!(SqlValue::from(d), SqlValue::Text("2024-01-31".into()));
        assert_eq!(SqlValue::Int(1).as_bool(), Some(true));
        assert_eq!(SqlValue::Int(1).as_f64(), Some(1.0));
        assert_eq!(SqlValue::Null.to_string(), "NULL");
    }
}
