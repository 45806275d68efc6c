//! Feeds arbitrary bytes to the envelope decoder of every format, as several target types.
//! Decoding must return `Ok` or a `CodecError` — never panic, abort, hang or allocate past the
//! cap. Run with `cargo +nightly fuzz run envelope_decode` (see ../README.md).

#![no_main]

#[path = "common.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ncm_cache_codec::{SerializationType, Serializer};
use ncm_cache_core::Codec;
use serde::Deserialize;

/// A typical cached struct: exercises typed paths.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct Record {
    id: u64,
    name: String,
    email: Option<String>,
    score: f64,
    tags: Vec<String>,
    #[serde(with = "serde_bytes")]
    avatar: Vec<u8>,
    attributes: BTreeMap<String, common::Any>,
}

/// Per format: an envelope reader and a raw reader, capped at 1 MiB decompressed.
fn decoders() -> &'static [Serializer] {
    static DECODERS: OnceLock<Vec<Serializer>> = OnceLock::new();
    DECODERS.get_or_init(|| {
        let mut out = Vec::new();
        for format in SerializationType::ALL {
            for raw in [false, true] {
                if let Ok(s) = Serializer::builder()
                    .format(format)
                    .raw(raw)
                    .max_decompressed_size(1 << 20)
                    .build()
                {
                    out.push(s);
                }
            }
        }
        out
    })
}

fuzz_target!(|data: &[u8]| {
    for codec in decoders() {
        let _ = codec.decode::<common::Any>(data);
        let _ = codec.decode::<Vec<Record>>(data);
        let _ = codec.decode::<serde::de::IgnoredAny>(data);
    }
});
