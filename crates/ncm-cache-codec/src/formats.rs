//! The formats: serde values to bytes and back, one module per cargo feature.
//!
//! A disabled format compiles to stubs that return [`CodecErrorKind::Unsupported`] naming the
//! feature to enable.

use ncm_cache_core::{CodecError, CodecErrorKind};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::types::SerializationType;

/// Payloads at least this long are parsed with simd-json when the reader is configured for
/// [`SerializationType::SimdJson`]; below it serde_json is faster (it needs no mutable copy).
/// Measured by `benches/codec.rs` (`codec_decode_simd_json_*`).
#[cfg(feature = "simd-json")]
pub(crate) const SIMD_JSON_DECODE_THRESHOLD: usize = 4 * 1024;

/// Appends the encoding of `value` in `format` to `out`.
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    format: SerializationType,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let start = out.len();
    match format {
        SerializationType::Json => json::encode(value, out),
        SerializationType::SimdJson => json::encode_fast(value, out),
        SerializationType::Cbor => cbor::encode(value, out),
        SerializationType::MsgPack => msgpack::encode(value, out),
        SerializationType::Pickle => pickle::encode(value, out),
    }?;
    // Never write what a reader refuses: a value nested past the depth limit.
    check_depth(format, out.get(start..).unwrap_or_default()).map_err(|e| {
        CodecError::new(
            CodecErrorKind::Encode,
            format.name(),
            format!("cannot store this value: {e}"),
        )
    })
}

/// Rejects a value nested [`MAX_DEPTH`](crate::depth::MAX_DEPTH) levels or more, without
/// recursion (see [`crate::depth`]).
fn check_depth(format: SerializationType, bytes: &[u8]) -> Result<(), CodecError> {
    // Each level opens with at least one byte in every format checked here: a shorter
    // encoding cannot reach the limit. (The scan was ~2 % of the client's CPU in a `perf`
    // profile of 64 tasks writing 100-byte strings through a multi-level cache.)
    if bytes.len() < crate::depth::MAX_DEPTH {
        return Ok(());
    }
    match format {
        SerializationType::Json | SerializationType::SimdJson => crate::depth::check_json(bytes),
        SerializationType::Cbor => crate::depth::check_cbor(bytes),
        SerializationType::MsgPack => crate::depth::check_msgpack(bytes),
        // Checked by the pickle guard on read; pickle writers are rare and its guard is a
        // full opcode walk, so it is not repeated on write.
        SerializationType::Pickle => Ok(()),
    }
}

/// Decodes `bytes` written in `format`. `fast_json`: the reader is configured for simd-json, so
/// large JSON payloads may be parsed by it (either JSON tag decodes with either parser).
pub(crate) fn decode<T: DeserializeOwned>(
    format: SerializationType,
    bytes: &[u8],
    fast_json: bool,
    pickle_budget: u64,
) -> Result<T, CodecError> {
    match format {
        SerializationType::Json | SerializationType::SimdJson => json::decode(bytes, fast_json),
        SerializationType::Cbor => cbor::decode(bytes),
        SerializationType::MsgPack => msgpack::decode(bytes),
        SerializationType::Pickle => pickle::decode(bytes, pickle_budget),
    }
}

/// The error for a format that is not compiled in.
#[allow(dead_code, reason = "only used by the stubs of disabled features")]
pub(crate) fn unsupported(format: SerializationType) -> CodecError {
    CodecError::new(
        CodecErrorKind::Unsupported,
        format.name(),
        format!(
            "{format} support is not compiled in: enable the `{}` cargo feature of ncm-cache-codec",
            format.feature()
        ),
    )
}

#[cfg(feature = "json")]
pub(crate) mod json {
    use super::*;

    pub(super) fn encode<T: Serialize + ?Sized>(
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        serde_json::to_writer(out, value)
            .map_err(|e| CodecError::with_source(CodecErrorKind::Encode, "json", e))
    }

    /// simd-json's serializer is not faster than serde_json's (see the benches), so the fast
    /// JSON format writes with serde_json too; the bytes are the same.
    #[cfg(feature = "simd-json")]
    pub(super) fn encode_fast<T: Serialize + ?Sized>(
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        encode(value, out)
    }

    #[cfg(not(feature = "simd-json"))]
    pub(super) fn encode_fast<T: Serialize + ?Sized>(
        _value: &T,
        _out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        Err(unsupported(SerializationType::SimdJson))
    }

    pub(super) fn decode<T: DeserializeOwned>(
        bytes: &[u8],
        fast_json: bool,
    ) -> Result<T, CodecError> {
        // simd-json's serde path recurses once per level without a limit: scan first.
        // (serde_json has its own limit, the same one.)
        #[cfg(feature = "simd-json")]
        if fast_json && bytes.len() >= SIMD_JSON_DECODE_THRESHOLD {
            crate::depth::check_json(bytes)?;
            if let Ok(value) = simd::decode(bytes) {
                return Ok(value);
            }
        }
        // Otherwise (or when simd-json refused the input) serde_json decides and words the error.
        let _ = fast_json;
        serde_json::from_slice(bytes)
            .map_err(|e| CodecError::with_source(CodecErrorKind::Decode, "json", e))
    }

    #[cfg(feature = "simd-json")]
    pub(crate) mod simd {
        use std::cell::RefCell;

        use super::*;

        thread_local! {
            /// simd-json's parse buffers and the mutable input copy, reused per thread.
            static STATE: RefCell<(Option<simd_json::Buffers>, Vec<u8>)> =
                const { RefCell::new((None, Vec::new())) };
        }

        pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, simd_json::Error> {
            STATE.with(|state| match state.try_borrow_mut() {
                Ok(mut state) => {
                    let (buffers, copy) = &mut *state;
                    copy.clear();
                    copy.extend_from_slice(bytes);
                    let buffers =
                        buffers.get_or_insert_with(|| simd_json::Buffers::new(bytes.len()));
                    let result = simd_json::serde::from_slice_with_buffers(copy, buffers);
                    if copy.capacity() > 1 << 20 {
                        *copy = Vec::new();
                    }
                    result
                }
                // Re-entered from a Deserialize impl: use fresh buffers.
                Err(_) => simd_json::serde::from_slice(&mut bytes.to_vec()),
            })
        }
    }
}

#[cfg(not(feature = "json"))]
mod json {
    use super::*;

    pub(super) fn encode<T: Serialize + ?Sized>(_: &T, _: &mut Vec<u8>) -> Result<(), CodecError> {
        Err(unsupported(SerializationType::Json))
    }

    pub(super) fn encode_fast<T: Serialize + ?Sized>(
        _: &T,
        _: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        Err(unsupported(SerializationType::SimdJson))
    }

    pub(super) fn decode<T: DeserializeOwned>(_: &[u8], _: bool) -> Result<T, CodecError> {
        Err(unsupported(SerializationType::Json))
    }
}

#[cfg(feature = "cbor")]
mod cbor {
    use super::*;

    pub(super) fn encode<T: Serialize + ?Sized>(
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        ciborium::into_writer(value, out)
            .map_err(|e| CodecError::with_source(CodecErrorKind::Encode, "cbor", e))
    }

    pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        crate::depth::check_cbor(bytes)?;
        ciborium::from_reader(bytes)
            .map_err(|e| CodecError::with_source(CodecErrorKind::Decode, "cbor", e))
    }
}

#[cfg(not(feature = "cbor"))]
mod cbor {
    use super::*;

    pub(super) fn encode<T: Serialize + ?Sized>(_: &T, _: &mut Vec<u8>) -> Result<(), CodecError> {
        Err(unsupported(SerializationType::Cbor))
    }

    pub(super) fn decode<T: DeserializeOwned>(_: &[u8]) -> Result<T, CodecError> {
        Err(unsupported(SerializationType::Cbor))
    }
}

#[cfg(feature = "msgpack")]
mod msgpack {
    use super::*;

    pub(super) fn encode<T: Serialize + ?Sized>(
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        rmp_serde::encode::write_named(out, value)
            .map_err(|e| CodecError::with_source(CodecErrorKind::Encode, "msgpack", e))
    }

    pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        crate::depth::check_msgpack(bytes)?;
        rmp_serde::from_slice(bytes)
            .map_err(|e| CodecError::with_source(CodecErrorKind::Decode, "msgpack", e))
    }
}

#[cfg(not(feature = "msgpack"))]
mod msgpack {
    use super::*;

    pub(super) fn encode<T: Serialize + ?Sized>(_: &T, _: &mut Vec<u8>) -> Result<(), CodecError> {
        Err(unsupported(SerializationType::MsgPack))
    }

    pub(super) fn decode<T: DeserializeOwned>(_: &[u8]) -> Result<T, CodecError> {
        Err(unsupported(SerializationType::MsgPack))
    }
}

#[cfg(feature = "pickle")]
mod pickle {
    use super::*;

    pub(super) fn encode<T: Serialize + ?Sized>(
        value: &T,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        // What serde_pickle::to_writer does, for unsized values too: PROTO 3 (the default of
        // SerOptions: Python 3 reads it, bytes stay bytes), the value, STOP.
        out.extend_from_slice(&[0x80, 3]);
        let mut serializer =
            serde_pickle::Serializer::new(&mut *out, serde_pickle::SerOptions::new());
        value
            .serialize(&mut serializer)
            .map_err(|e| CodecError::with_source(CodecErrorKind::Encode, "pickle", e))?;
        out.push(b'.');
        Ok(())
    }

    /// serde-pickle only builds data: it maps a handful of builtins (`set`, `frozenset`,
    /// `bytearray`, `list`, `int`, `_codecs.encode`, `copy_reg._reconstructor`) to values and
    /// refuses every other global, so no code runs. The guard rejects what serde-pickle would
    /// turn into a stack overflow or an exponential copy before serde-pickle sees it.
    pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8], budget: u64) -> Result<T, CodecError> {
        crate::pickle_guard::check(bytes, budget)?;
        serde_pickle::from_slice(bytes, serde_pickle::DeOptions::new())
            .map_err(|e| CodecError::with_source(CodecErrorKind::Decode, "pickle", e))
    }
}

#[cfg(not(feature = "pickle"))]
mod pickle {
    use super::*;

    pub(super) fn encode<T: Serialize + ?Sized>(_: &T, _: &mut Vec<u8>) -> Result<(), CodecError> {
        Err(unsupported(SerializationType::Pickle))
    }

    pub(super) fn decode<T: DeserializeOwned>(_: &[u8], _: u64) -> Result<T, CodecError> {
        Err(unsupported(SerializationType::Pickle))
    }
}

#[cfg(all(test, feature = "simd-json"))]
mod tests {
    use std::collections::BTreeMap;

    /// The fast path itself parses (the serde_json fallback must not hide simd-json failures).
    #[test]
    fn simd_json_parses_large_payloads_itself() {
        let mut value: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for i in 0..200 {
            value.insert(
                format!("kéy {i} 🚀"),
                vec![i as f64 / 3.0, -1e300, 0.1, 5e-324],
            );
        }
        let bytes = serde_json::to_vec(&value).unwrap();
        assert!(bytes.len() >= super::SIMD_JSON_DECODE_THRESHOLD);
        let back: BTreeMap<String, Vec<f64>> = super::json::simd::decode(&bytes).unwrap();
        assert_eq!(back, value, "simd-json reads floats back exactly");
        // Twice: the reused per-thread buffers work again.
        let again: BTreeMap<String, Vec<f64>> = super::json::simd::decode(&bytes).unwrap();
        assert_eq!(again, value);
    }
}
