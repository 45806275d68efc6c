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
//! starts with `#`, so a hash cannot collide with a literal argument string).

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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

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
