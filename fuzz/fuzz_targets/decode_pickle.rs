//! Arbitrary bytes, and the same amplified past 64 KiB (up to 4 MiB), through the Pickle decoders
//! (envelope and raw): only `Ok` or a typed `CodecError` — never a panic, an abort (stack
//! overflow from deep nesting), a hang or an allocation past the cap.
//! Run: `cargo +nightly fuzz run decode_pickle` (see ../README.md).

#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use ncm_cache_codec::SerializationType;

fuzz_target!(|data: &[u8]| common::run(SerializationType::Pickle, data));
