//! The stored form of [`SqlValue`]: compact and self-describing, so a cache hit decodes fast
//! in every format — null, booleans, integers, floats and text as themselves; the rest as
//! one-entry maps: `{"x": bytes}`, `{"t": [seconds, nanoseconds]}`, `{"j": document}`, and
//! `{"f": "NaN"}` for floats JSON cannot carry.

use std::fmt;

use chrono::DateTime;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::SqlValue;

impl Serialize for SqlValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Null => s.serialize_unit(),
            Self::Bool(b) => s.serialize_bool(*b),
            Self::Int(n) => s.serialize_i64(*n),
            Self::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Self::Float(f) => tagged(s, "f", &f.to_string()),
            Self::Text(t) => s.serialize_str(t),
            Self::Bytes(b) => tagged(s, "x", &RawBytes(b)),
            Self::Timestamp(t) => tagged(s, "t", &(t.timestamp(), t.timestamp_subsec_nanos())),
            Self::Json(j) => tagged(s, "j", j),
        }
    }
}

fn tagged<S: Serializer, T: Serialize + ?Sized>(
    s: S,
    tag: &str,
    value: &T,
) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(1))?;
    map.serialize_entry(tag, value)?;
    map.end()
}

struct RawBytes<'a>(&'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// Bytes from a byte string (CBOR, MessagePack) or a sequence of numbers (JSON).
struct ByteBuf(Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(ByteBuf(out))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

impl<'de> Deserialize<'de> for SqlValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// The key of a tagged value, read without allocating.
enum Tag {
    Bytes,
    Timestamp,
    Json,
    Float,
}

impl<'de> Deserialize<'de> for Tag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Tag;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SQL value tag (x, t, j or f)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Tag, E> {
                match v {
                    "x" => Ok(Tag::Bytes),
                    "t" => Ok(Tag::Timestamp),
                    "j" => Ok(Tag::Json),
                    "f" => Ok(Tag::Float),
                    other => Err(E::custom(format!("unknown SQL value tag {other:?}"))),
                }
            }
        }
        d.deserialize_identifier(V)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = SqlValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a SQL value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<SqlValue, E> {
        Ok(SqlValue::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<SqlValue, E> {
        Ok(SqlValue::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<SqlValue, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<SqlValue, E> {
        Ok(SqlValue::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<SqlValue, E> {
        Ok(SqlValue::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<SqlValue, E> {
        i64::try_from(v)
            .map(SqlValue::Int)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<SqlValue, E> {
        Ok(SqlValue::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<SqlValue, E> {
        Ok(SqlValue::Text(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<SqlValue, E> {
        Ok(SqlValue::Text(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<SqlValue, E> {
        Ok(SqlValue::Bytes(v.to_vec()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SqlValue, A::Error> {
        let Some(tag) = map.next_key::<Tag>()? else {
            return Err(de::Error::custom("empty tagged SQL value"));
        };
        let value = match tag {
            Tag::Bytes => SqlValue::Bytes(map.next_value::<ByteBuf>()?.0),
            Tag::Timestamp => {
                let (secs, nanos) = map.next_value::<(i64, u32)>()?;
                let t = DateTime::from_timestamp(secs, nanos)
                    .ok_or_else(|| de::Error::custom("timestamp out of range"))?;
                SqlValue::Timestamp(t)
            }
            Tag::Json => SqlValue::Json(map.next_value()?),
            Tag::Float => {
                let text = map.next_value::<String>()?;
                SqlValue::Float(text.parse().map_err(|_| de::Error::custom("bad float"))?)
            }
        };
        if map.next_key::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::custom(
                "tagged SQL value with more than one entry",
            ));
        }
        Ok(value)
    }
}
