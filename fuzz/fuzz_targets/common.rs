//! Shared by the per-format targets: target types, input amplification and the decoders.

#![allow(dead_code)] // each target uses a part

use std::collections::BTreeMap;

use ncm_cache_codec::{SerializationType, Serializer};
use ncm_cache_core::Codec;
use serde::Deserialize;

/// A self-describing value: exercises `deserialize_any` paths.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Any {
    Null(()),
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    List(Vec<Any>),
    Map(BTreeMap<String, Any>),
}

/// Inputs of at least this many bytes are always tried: amplification guarantees it.
pub const LARGE: usize = 64 * 1024;

/// The input as given, and amplified past [`LARGE`]: the first byte picks how the rest is
/// repeated (whole, or a prefix as nesting opened many times, then the remainder), so that a
/// small corpus entry reaches the paths only large payloads take (simd-json from 4 KiB,
/// compression, deep nesting), up to 4 MiB.
pub fn inputs(data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![data.to_vec()];
    let Some((&mode, rest)) = data.split_first() else {
        return out;
    };
    if rest.is_empty() {
        return out;
    }
    let target = LARGE << (mode & 0x06); // 64 KiB .. 4 MiB
    let split = (usize::from(mode >> 3) % rest.len()).max(1);
    let (head, tail) = rest.split_at(split);
    let mut big = Vec::with_capacity(target + rest.len());
    while big.len() < target {
        big.extend_from_slice(head);
    }
    big.extend_from_slice(tail);
    out.push(big);
    out
}

/// An envelope reader and a raw reader of `format`, 8 MiB cap.
pub fn decoders(format: SerializationType) -> Vec<Serializer> {
    [false, true]
        .into_iter()
        .filter_map(|raw| {
            Serializer::builder()
                .format(format)
                .raw(raw)
                .max_decompressed_size(8 << 20)
                .build()
                .ok()
        })
        .collect()
}

/// Decodes every input with every decoder of `format`, as an any-value and as `IgnoredAny`.
pub fn run(format: SerializationType, data: &[u8]) {
    for input in inputs(data) {
        for codec in decoders(format) {
            let _ = codec.decode::<Any>(&input);
            let _ = codec.decode::<serde::de::IgnoredAny>(&input);
        }
    }
}
