//! Deterministic cache keys from a loader name and its arguments.
//!
//! The arguments are serialized to canonical JSON: object keys sorted (whatever serde_json's
//! map order is in this build), no whitespace, numbers as serde_json prints them. The same
//! arguments therefore give the same key in every process and on every machine — except a
//! hash-ordered collection (`HashSet`), which serializes in its iteration order: that differs
//! between processes and between two sets of the same elements. The attribute macros sort a
//! `HashSet` argument (a set nested in another argument is not seen) in the order a `BTreeSet`
//! of numbers, strings or tuples has; when calling `load` or `invalidate` yourself, pass a
//! `BTreeSet` or a sorted `Vec` of such elements (a set of enum variants sorts by their names
//! there, not their declaration order: pass the `HashSet` itself). Long argument
//! strings are replaced by a 128-bit xxh3 hash (`#` + 32 hex digits; canonical JSON never
//! starts with `#`, so a hash cannot collide with a literal argument string). A NaN or infinite
//! float has no key (JSON would write it as `null`, like `None`): `args_key` refuses it, and a
//! cached function called with one runs without the cache. (`Option<Option<T>>`'s `None` and
//! `Some(None)` are both `null` too: keep such arguments out of a key.)

use std::fmt::Write as _;

use ncm_cache_core::{CacheError, Result};
use serde::Serialize;
use serde_json::Value;

/// Argument strings longer than this many bytes are hashed.
pub const MAX_INLINE_ARGS: usize = 200;

/// The key prefix of every loader key: `loader:{name}:{args}`.
pub const KEY_PREFIX: &str = "loader:";

/// Canonical JSON of `args`, hashed when longer than [`MAX_INLINE_ARGS`].
///
/// ```
/// use std::collections::HashMap;
/// use ncm_cache_loader::args_key;
/// assert_eq!(args_key(&123).unwrap(), "123");
/// assert_eq!(args_key(&(1, "a")).unwrap(), r#"[1,"a"]"#);
/// // Map order never matters.
/// let a = HashMap::from([("b", 2), ("a", 1)]);
/// assert_eq!(args_key(&a).unwrap(), r#"{"a":1,"b":2}"#);
/// // Long arguments are hashed.
/// assert!(args_key(&"x".repeat(500)).unwrap().starts_with('#'));
/// ```
pub fn args_key<A: Serialize + ?Sized>(args: &A) -> Result<String> {
    let invalid = |e: serde_json::Error| {
        CacheError::InvalidArgument(format!("loader arguments cannot be serialized: {e}"))
    };
    // Fast path: without an object (no `{` anywhere) serde_json's compact output is already
    // canonical, so no value tree is needed.
    let compact = serde_json::to_string(args).map_err(invalid)?;
    // JSON writes NaN and ±infinity as `null`: `f(NaN)`, `f(inf)`, `f(-inf)` and `f(None)`
    // would share one key, and one caller get another's result (review, helper-71). Such an
    // argument has no key: a macro then calls its function without the cache.
    if compact.contains("null") && args.serialize(probe::NonFinite).is_err() {
        return Err(CacheError::InvalidArgument(
            "a loader argument holds a non-finite float (NaN or infinity), which has no cache key"
                .into(),
        ));
    }
    if !compact.contains('{') {
        return Ok(hash_if_long(compact));
    }
    Ok(value_key(&serde_json::to_value(args).map_err(invalid)?))
}

/// Canonical form of an already-built JSON value (used by warming configs).
pub(crate) fn value_key(value: &Value) -> String {
    hash_if_long(canonical(value))
}

/// Canonical JSON of `value`, never hashed.
pub(crate) fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(&mut out, value);
    out
}

fn hash_if_long(canonical: String) -> String {
    if canonical.len() > MAX_INLINE_ARGS {
        hashed(&canonical)
    } else {
        canonical
    }
}

/// `#` + the 128-bit xxh3 hash of `text` in 32 hex digits.
pub(crate) fn hashed(text: &str) -> String {
    let hash = xxhash_rust::xxh3::xxh3_128(text.as_bytes());
    format!("#{hash:032x}")
}

/// The full key of a loader call: `loader:{name}:{args}`.
///
/// ```
/// assert_eq!(ncm_cache_loader::loader_key("user", "123"), "loader:user:123");
/// ```
pub fn loader_key(name: &str, args: &str) -> String {
    let mut key = String::with_capacity(KEY_PREFIX.len() + name.len() + 1 + args.len());
    key.push_str(KEY_PREFIX);
    key.push_str(name);
    key.push(':');
    key.push_str(args);
    key
}

fn write_canonical(out: &mut String, value: &Value) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, k);
                out.push(':');
                write_canonical(out, v);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, v);
            }
            out.push(']');
        }
        Value::String(s) => write_string(out, s),
        // Null, booleans and numbers print canonically on their own.
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    // serde_json's string escaping is deterministic; reuse it.
    let _ = write!(out, "{}", Value::String(s.to_owned()));
}

/// A serializer that only looks for a non-finite float anywhere in a value.
mod probe {
    use serde::Serialize;
    use serde::ser;

    /// Walks a value; fails at the first NaN or infinity.
    pub(super) struct NonFinite;

    #[derive(Debug)]
    pub(super) struct Found;

    impl std::fmt::Display for Found {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a non-finite float")
        }
    }

    impl std::error::Error for Found {}

    impl ser::Error for Found {
        fn custom<T: std::fmt::Display>(_msg: T) -> Self {
            Found
        }
    }

    type R = Result<(), Found>;

    macro_rules! ignore {
        ($($name:ident: $ty:ty),* $(,)?) => {
            $(fn $name(self, _v: $ty) -> R { Ok(()) })*
        };
    }

    impl ser::Serializer for NonFinite {
        type Ok = ();
        type Error = Found;
        type SerializeSeq = Self;
        type SerializeTuple = Self;
        type SerializeTupleStruct = Self;
        type SerializeTupleVariant = Self;
        type SerializeMap = Self;
        type SerializeStruct = Self;
        type SerializeStructVariant = Self;

        ignore!(
            serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
            serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16,
            serialize_u32: u32, serialize_u64: u64, serialize_u128: u128, serialize_char: char,
            serialize_str: &str, serialize_bytes: &[u8],
        );

        fn serialize_f32(self, v: f32) -> R {
            if v.is_finite() { Ok(()) } else { Err(Found) }
        }
        fn serialize_f64(self, v: f64) -> R {
            if v.is_finite() { Ok(()) } else { Err(Found) }
        }
        fn serialize_none(self) -> R {
            Ok(())
        }
        fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> R {
            value.serialize(self)
        }
        fn serialize_unit(self) -> R {
            Ok(())
        }
        fn serialize_unit_struct(self, _name: &'static str) -> R {
            Ok(())
        }
        fn serialize_unit_variant(self, _n: &'static str, _i: u32, _v: &'static str) -> R {
            Ok(())
        }
        fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _n: &'static str, v: &T) -> R {
            v.serialize(self)
        }
        fn serialize_newtype_variant<T: ?Sized + Serialize>(
            self,
            _n: &'static str,
            _i: u32,
            _variant: &'static str,
            v: &T,
        ) -> R {
            v.serialize(self)
        }
        fn serialize_seq(self, _len: Option<usize>) -> Result<Self, Found> {
            Ok(self)
        }
        fn serialize_tuple(self, _len: usize) -> Result<Self, Found> {
            Ok(self)
        }
        fn serialize_tuple_struct(self, _n: &'static str, _len: usize) -> Result<Self, Found> {
            Ok(self)
        }
        fn serialize_tuple_variant(
            self,
            _n: &'static str,
            _i: u32,
            _v: &'static str,
            _len: usize,
        ) -> Result<Self, Found> {
            Ok(self)
        }
        fn serialize_map(self, _len: Option<usize>) -> Result<Self, Found> {
            Ok(self)
        }
        fn serialize_struct(self, _n: &'static str, _len: usize) -> Result<Self, Found> {
            Ok(self)
        }
        fn serialize_struct_variant(
            self,
            _n: &'static str,
            _i: u32,
            _v: &'static str,
            _len: usize,
        ) -> Result<Self, Found> {
            Ok(self)
        }
    }

    /// A compound's parts are walked one by one.
    macro_rules! walk {
        ($trait:ident, $method:ident $(, $key:ty)?) => {
            impl ser::$trait for NonFinite {
                type Ok = ();
                type Error = Found;
                fn $method<T: ?Sized + Serialize>(&mut self, $(_key: $key,)? v: &T) -> R {
                    v.serialize(NonFinite)
                }
                fn end(self) -> R {
                    Ok(())
                }
            }
        };
    }

    walk!(SerializeSeq, serialize_element);
    walk!(SerializeTuple, serialize_element);
    walk!(SerializeTupleStruct, serialize_field);
    walk!(SerializeTupleVariant, serialize_field);
    walk!(SerializeStruct, serialize_field, &'static str);
    walk!(SerializeStructVariant, serialize_field, &'static str);

    impl ser::SerializeMap for NonFinite {
        type Ok = ();
        type Error = Found;
        fn serialize_key<T: ?Sized + Serialize>(&mut self, k: &T) -> R {
            k.serialize(NonFinite)
        }
        fn serialize_value<T: ?Sized + Serialize>(&mut self, v: &T) -> R {
            v.serialize(NonFinite)
        }
        fn end(self) -> R {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    /// NaN, +∞ and −∞ are all `null` in JSON, as is `None`: such an argument has no key, rather
    /// than one it shares with the others (review, helper-71).
    #[test]
    fn non_finite_floats_have_no_key() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(args_key(&bad).is_err(), "{bad}");
            assert!(args_key(&(1u8, Some(bad))).is_err(), "{bad}");
            assert!(args_key(&vec![0.5, bad]).is_err(), "{bad}");
            let map: std::collections::BTreeMap<&str, f32> = [("x", bad as f32)].into();
            assert!(args_key(&map).is_err(), "{bad}");
        }
        assert_eq!(args_key(&None::<f64>).unwrap(), "null");
        assert_eq!(args_key(&(1.5f64, None::<f64>)).unwrap(), "[1.5,null]");
    }

    #[test]
    fn keys_are_canonical_and_stable() {
        assert_eq!(args_key(&()).unwrap(), "null");
        assert_eq!(args_key(&(&5u64,)).unwrap(), "[5]");
        assert_eq!(args_key(&"a\"b").unwrap(), r#""a\"b""#);
        let nested = serde_json::json!({"z": {"y": 1, "x": [true, null]}, "a": 1.5});
        assert_eq!(
            value_key(&nested),
            r#"{"a":1.5,"z":{"x":[true,null],"y":1}}"#
        );
        let h: HashMap<String, u8> = (0..50).map(|i| (format!("k{i}"), i)).collect();
        let b: BTreeMap<String, u8> = h.clone().into_iter().collect();
        assert_eq!(args_key(&h).unwrap(), args_key(&b).unwrap());
    }

    #[test]
    fn the_fast_path_agrees_with_the_canonical_writer() {
        let samples = [
            serde_json::json!([1, -2, 3.5, 1e300, "a{b", "é\n\"", null, true, [[]]]),
            serde_json::json!("plain"),
            serde_json::json!(18446744073709551615u64),
            serde_json::json!({"b": [1, {"d": 1, "c": 2}], "a": "{"}),
        ];
        for v in samples {
            assert_eq!(args_key(&v).unwrap(), value_key(&v), "{v}");
        }
        // (An `f32` prints in its own shortest form here and widened to f64 in a value tree;
        // either way one argument value always gives one key.)
    }

    #[test]
    fn long_arguments_are_hashed_deterministically() {
        let long = "é".repeat(300);
        let a = args_key(&long).unwrap();
        assert_eq!(a, args_key(&long).unwrap());
        assert_eq!(a.len(), 33);
        assert_ne!(a, args_key(&format!("{long}x")).unwrap());
    }

    #[test]
    fn unserializable_arguments_are_an_error() {
        let bad: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
        assert!(matches!(
            args_key(&bad),
            Err(CacheError::InvalidArgument(_))
        ));
    }
}
