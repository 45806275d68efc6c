//! serde deserializers over a result row and over one [`SqlValue`], so rows map onto the
//! caller's types without an intermediate JSON tree.

use serde::de::value::{Error, SeqDeserializer, StrDeserializer};
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::forward_to_deserialize_any;

use crate::value::SqlValue;

/// One row: a map (column → value) for structs and maps, a sequence for tuples, the single
/// value for scalars.
pub(crate) struct RowDeserializer<'a> {
    columns: &'a [String],
    values: &'a [SqlValue],
}

impl<'a> RowDeserializer<'a> {
    pub(crate) fn new(columns: &'a [String], values: &'a [SqlValue]) -> Self {
        Self { columns, values }
    }

    fn single(&self) -> Result<ValueDeserializer<'a>, Error> {
        match self.values {
            [one] => Ok(ValueDeserializer(one)),
            other => Err(de::Error::custom(format!(
                "expected a one-column row for a scalar, found {} columns",
                other.len()
            ))),
        }
    }
}

macro_rules! scalar_from_single {
    ($($method:ident),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.single()?.$method(visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for RowDeserializer<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(RowMap {
            columns: self.columns.iter(),
            values: self.values.iter(),
            pending: None,
        })
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(SeqDeserializer::new(
            self.values.iter().map(ValueDeserializer),
        ))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.values {
            [one] => ValueDeserializer(one).deserialize_option(visitor),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.single()?.deserialize_enum(name, variants, visitor)
    }

    scalar_from_single!(
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_unit
    );

    forward_to_deserialize_any! {
        unit_struct map struct identifier ignored_any
    }
}

struct RowMap<'a> {
    columns: std::slice::Iter<'a, String>,
    values: std::slice::Iter<'a, SqlValue>,
    pending: Option<&'a SqlValue>,
}

impl<'de> MapAccess<'de> for RowMap<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match (self.columns.next(), self.values.next()) {
            (Some(column), Some(value)) => {
                self.pending = Some(value);
                let key: StrDeserializer<'_, Error> = column.as_str().into_deserializer();
                seed.deserialize(key).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let value = self
            .pending
            .take()
            .ok_or_else(|| <Error as de::Error>::custom("value requested before its key"))?;
        seed.deserialize(ValueDeserializer(value))
    }
}

/// One value, with lenient conversions where databases disagree on representations.
#[derive(Clone, Copy)]
pub(crate) struct ValueDeserializer<'a>(pub(crate) &'a SqlValue);

impl<'de> IntoDeserializer<'de, Error> for ValueDeserializer<'_> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

/// A timestamp as text: RFC 3339 with offset (what `DateTime<Utc>` and `String` take), or
/// without one when the visitor is chrono's `NaiveDateTime` (which rejects an offset).
fn visit_timestamp<'de, V: Visitor<'de>>(
    t: &chrono::DateTime<chrono::Utc>,
    visitor: V,
) -> Result<V::Value, Error> {
    let expected = format!("{}", &visitor as &dyn de::Expected);
    if expected == "a formatted date and time string" {
        visitor.visit_string(t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.f").to_string())
    } else {
        visitor.visit_string(t.to_rfc3339())
    }
}

fn json<'de, V: Visitor<'de>>(
    value: &serde_json::Value,
    f: impl FnOnce(serde_json::Value, V) -> Result<V::Value, serde_json::Error>,
    visitor: V,
) -> Result<V::Value, Error> {
    f(value.clone(), visitor).map_err(de::Error::custom)
}

macro_rules! int_method {
    ($($method:ident),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.0 {
                SqlValue::Text(s) => match s.trim().parse::<i64>() {
                    Ok(n) => visitor.visit_i64(n),
                    Err(_) => self.deserialize_any(visitor),
                },
                SqlValue::Bool(b) => visitor.visit_i64(i64::from(*b)),
                // Seconds since the epoch (`chrono::serde::ts_seconds`).
                SqlValue::Timestamp(t) => visitor.visit_i64(t.timestamp()),
                SqlValue::Json(j) => json(j, |j, v| de::Deserializer::$method(j, v), visitor),
                _ => self.deserialize_any(visitor),
            }
        }
    )*};
}

macro_rules! float_method {
    ($($method:ident),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.0 {
                SqlValue::Text(s) => match s.trim().parse::<f64>() {
                    Ok(n) => visitor.visit_f64(n),
                    Err(_) => self.deserialize_any(visitor),
                },
                SqlValue::Json(j) => json(j, |j, v| de::Deserializer::$method(j, v), visitor),
                _ => self.deserialize_any(visitor),
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for ValueDeserializer<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            SqlValue::Null => visitor.visit_unit(),
            SqlValue::Bool(b) => visitor.visit_bool(*b),
            SqlValue::Int(n) => visitor.visit_i64(*n),
            SqlValue::Float(f) => visitor.visit_f64(*f),
            SqlValue::Text(s) => visitor.visit_str(s),
            SqlValue::Bytes(b) => visitor.visit_seq(SeqDeserializer::new(b.iter().copied())),
            SqlValue::Timestamp(t) => visit_timestamp(t, visitor),
            SqlValue::Json(j) => json(j, de::Deserializer::deserialize_any, visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            SqlValue::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            SqlValue::Int(n @ (0 | 1)) => visitor.visit_bool(*n == 1),
            SqlValue::Json(serde_json::Value::Bool(b)) => visitor.visit_bool(*b),
            _ => self.deserialize_any(visitor),
        }
    }

    int_method!(
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128
    );
    float_method!(deserialize_f32, deserialize_f64);

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            SqlValue::Int(n) => visitor.visit_string(n.to_string()),
            SqlValue::Float(f) => visitor.visit_string(f.to_string()),
            SqlValue::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => visitor.visit_str(s),
                Err(_) => visitor.visit_bytes(b),
            },
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            SqlValue::Bytes(b) => visitor.visit_bytes(b),
            SqlValue::Text(s) => visitor.visit_bytes(s.as_bytes()),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            SqlValue::Null => visitor.visit_unit(),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            SqlValue::Text(s) => {
                let access: StrDeserializer<'_, Error> = s.as_str().into_deserializer();
                visitor.visit_enum(access)
            }
            SqlValue::Json(j) => json(
                j,
                |j, v| de::Deserializer::deserialize_enum(j, name, variants, v),
                visitor,
            ),
            _ => self.deserialize_any(visitor),
        }
    }

    forward_to_deserialize_any! {
        char unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{DateTime, NaiveDate, Utc};
    use serde::Deserialize;

    use crate::{Rows, SqlValue};

    fn rows(columns: &[&str], row: Vec<SqlValue>) -> Rows {
        Rows::new(columns.iter().map(|c| c.to_string()).collect(), vec![row])
    }

    #[test]
    fn structs_with_every_type() {
        #[derive(Deserialize, Debug, PartialEq)]
        enum Kind {
            Admin,
            User,
        }
        #[derive(Deserialize, Debug, PartialEq)]
        struct Meta {
            tags: Vec<String>,
        }
        #[derive(Deserialize, Debug)]
        struct All {
            n: Option<i32>,
            flag: bool,
            flag_int: bool,
            small: u8,
            price: f64,
            exact: f64,
            name: String,
            id_text: String,
            blob: Vec<u8>,
            at: DateTime<Utc>,
            at_naive: chrono::NaiveDateTime,
            at_secs: i64,
            at_text: String,
            day: NaiveDate,
            meta: Meta,
            raw: serde_json::Value,
            kind: Kind,
        }
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let r = rows(
            &[
                "n", "flag", "flag_int", "small", "price", "exact", "name", "id_text", "blob",
                "at", "at_naive", "at_secs", "at_text", "day", "meta", "raw", "kind",
            ],
            vec![
                SqlValue::Null,
                SqlValue::Bool(true),
                SqlValue::Int(0),
                SqlValue::Int(200),
                SqlValue::Int(3),
                SqlValue::Text("12.50".into()),
                SqlValue::Text("Zoë".into()),
                SqlValue::Int(42),
                SqlValue::Bytes(vec![1, 2, 3]),
                SqlValue::Timestamp(at),
                SqlValue::Timestamp(at),
                SqlValue::Timestamp(at),
                SqlValue::Timestamp(at),
                SqlValue::Text("2024-02-29".into()),
                SqlValue::Json(serde_json::json!({"tags": ["a", "b"]})),
                SqlValue::Json(serde_json::json!([1, {"x": null}])),
                SqlValue::Text("Admin".into()),
            ],
        );
        let all: Vec<All> = r.deserialize().unwrap();
        let a = &all[0];
        assert_eq!(a.n, None);
        assert!(a.flag && !a.flag_int);
        assert_eq!(a.small, 200);
        assert_eq!((a.price, a.exact), (3.0, 12.5));
        assert_eq!((a.name.as_str(), a.id_text.as_str()), ("Zoë", "42"));
        assert_eq!(a.blob, vec![1, 2, 3]);
        assert_eq!(a.at, at);
        assert_eq!(a.at_naive, at.naive_utc());
        assert_eq!(a.at_secs, 1_700_000_000);
        assert_eq!(a.at_text, "2023-11-14T22:13:20+00:00");
        assert_eq!(a.day, NaiveDate::from_ymd_opt(2024, 2, 29).unwrap());
        assert_eq!(a.meta.tags, vec!["a", "b"]);
        assert_eq!(a.raw, serde_json::json!([1, {"x": null}]));
        assert_eq!(a.kind, Kind::Admin);
        let _ = Kind::User;
    }

    #[test]
    fn tuples_scalars_and_maps() {
        let r = rows(&["a", "b"], vec![SqlValue::Int(1), SqlValue::from("x")]);
        let t: Vec<(i64, String)> = r.deserialize().unwrap();
        assert_eq!(t, vec![(1, "x".into())]);
        let m: Vec<BTreeMap<String, serde_json::Value>> = r.deserialize().unwrap();
        assert_eq!(m[0]["b"], serde_json::json!("x"));
        let one = rows(&["count"], vec![SqlValue::Int(7)]);
        assert_eq!(one.deserialize::<i64>().unwrap(), vec![7]);
        assert_eq!(one.deserialize::<Option<i64>>().unwrap(), vec![Some(7)]);
        let null = rows(&["x"], vec![SqlValue::Null]);
        assert_eq!(null.deserialize::<Option<String>>().unwrap(), vec![None]);
        // A scalar from a two-column row is an error, not a panic.
        assert!(r.deserialize::<i64>().is_err());
        // A missing field names the problem.
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Needs {
            missing: i64,
        }
        let err = r.deserialize::<Needs>().unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
