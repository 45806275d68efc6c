//! Round trips: every format × compression over arbitrary serde data (proptest), and values
//! written by one configuration read by every other.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use common::{Value, envelope_configs, formats, label, raw_configs, records};
use ncm_cache_codec::{CompressionType, SerializationType, Serializer, inspect};
use ncm_cache_core::Codec;
use proptest::prelude::*;

/// Arbitrary values: nested maps with string keys, unicode, finite floats, integers, bools,
/// options, unit, byte strings, and empty strings / maps / lists.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Unit),
        Just(Value::Str(String::new())),
        Just(Value::List(Vec::new())),
        Just(Value::Map(BTreeMap::new())),
        Just(Value::Bytes(Vec::new())),
        Just(Value::Opt(None)),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<u64>().prop_map(Value::UInt),
        // JSON cannot carry NaN or infinities.
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::Float),
        ".*".prop_map(Value::Str),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Value::Bytes),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::List),
            proptest::collection::btree_map(".{0,12}", inner.clone(), 0..8).prop_map(Value::Map),
            inner.prop_map(|v| Value::Opt(Some(Box::new(v)))),
        ]
    })
}

/// Wraps a value with 5 KB of padding, so large-payload paths (simd-json, compression) run.
fn padded(value: Value, pad: bool) -> Value {
    if pad {
        Value::List(vec![value, Value::Str("päd ".repeat(1250))])
    } else {
        value
    }
}

/// Every compression with a low threshold (so compression runs), plus raw mode.
fn configs_for(format: SerializationType) -> Vec<Serializer> {
    let mut out: Vec<Serializer> = envelope_configs(16)
        .into_iter()
        .filter(|s| s.format() == format)
        .collect();
    out.extend(raw_configs().into_iter().filter(|s| s.format() == format));
    out
}

/// serde-pickle decodes integers only up to `i64::MAX` (a documented limitation): keep unsigned
/// values in that range for pickle.
fn fit_for(format: SerializationType, value: Value) -> Value {
    if format != SerializationType::Pickle {
        return value;
    }
    let fit = |v| fit_for(format, v);
    match value {
        Value::UInt(u) => Value::UInt(u & (i64::MAX as u64)),
        Value::Opt(v) => Value::Opt(v.map(|v| Box::new(fit(*v)))),
        Value::List(v) => Value::List(v.into_iter().map(fit).collect()),
        Value::Map(m) => Value::Map(m.into_iter().map(|(k, v)| (k, fit(v))).collect()),
        other => other,
    }
}

fn round_trip(format: SerializationType, value: &Value) -> Result<(), TestCaseError> {
    for codec in configs_for(format) {
        let bytes = codec
            .encode(value)
            .map_err(|e| TestCaseError::fail(format!("{}: encode failed: {e}", label(&codec))))?;
        let back: Value = codec
            .decode(&bytes)
            .map_err(|e| TestCaseError::fail(format!("{}: decode failed: {e}", label(&codec))))?;
        prop_assert_eq!(&back, value, "{}", label(&codec));
    }
    Ok(())
}

macro_rules! round_trip_tests {
    ($($name:ident => $format:expr),* $(,)?) => {
        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 64,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]
            $(
                #[test]
                fn $name(v in value(), pad in any::<bool>()) {
                    if $format.is_enabled() {
                        round_trip($format, &padded(fit_for($format, v), pad))?;
                    }
                }
            )*
        }
    };
}

round_trip_tests! {
    round_trip_json => SerializationType::Json,
    round_trip_simd_json => SerializationType::SimdJson,
    round_trip_cbor => SerializationType::Cbor,
    round_trip_msgpack => SerializationType::MsgPack,
    round_trip_pickle => SerializationType::Pickle,
}

#[test]
fn every_configuration_reads_every_other() {
    let small = records(1);
    let large = records(40); // ~10 KB: compressed with the default threshold
    let readers: Vec<Serializer> = formats()
        .into_iter()
        .map(|f| Serializer::builder().format(f).build().unwrap())
        .chain(raw_configs())
        .collect();
    for writer in envelope_configs(1024) {
        for value in [&small, &large] {
            let bytes = writer.encode(value).unwrap();
            let header = inspect(&bytes).unwrap().expect("enveloped");
            assert_eq!(header.format, writer.format());
            if value.len() > 1 && writer.compression() != CompressionType::None {
                assert_eq!(
                    header.compression,
                    writer.compression(),
                    "{}",
                    label(&writer)
                );
            } else {
                assert_eq!(
                    header.compression,
                    CompressionType::None,
                    "{}",
                    label(&writer)
                );
            }
            for reader in &readers {
                let back: Vec<common::Record> = reader.decode(&bytes).unwrap_or_else(|e| {
                    panic!("{} wrote, {} failed: {e}", label(&writer), label(reader))
                });
                assert_eq!(&back, value, "{} -> {}", label(&writer), label(reader));
            }
        }
    }
}

#[test]
fn json_flavours_read_each_other_raw() {
    if !SerializationType::SimdJson.is_enabled() {
        return;
    }
    let value = records(60); // above the simd-json threshold
    let json = Serializer::builder().raw(true).build().unwrap();
    let simd = Serializer::builder()
        .format(SerializationType::SimdJson)
        .raw(true)
        .build()
        .unwrap();
    let a = json.encode(&value).unwrap();
    let b = simd.encode(&value).unwrap();
    assert_eq!(a, b, "both write plain JSON");
    assert_eq!(simd.decode::<Vec<common::Record>>(&a).unwrap(), value);
    assert_eq!(json.decode::<Vec<common::Record>>(&b).unwrap(), value);
}

#[test]
fn compression_is_kept_only_when_smaller_and_above_threshold() {
    for c in common::compressions() {
        if c == CompressionType::None {
            continue;
        }
        let codec = Serializer::builder().compression(c).build().unwrap();
        // Below the threshold: stored plain.
        let bytes = codec.encode(&records(1)).unwrap();
        assert_eq!(
            inspect(&bytes).unwrap().unwrap().compression,
            CompressionType::None
        );
        // Incompressible above the threshold: stored plain because compression would not help
        // (a binary format, so random bytes stay random).
        if SerializationType::MsgPack.is_enabled() {
            let binary = Serializer::builder()
                .format(SerializationType::MsgPack)
                .compression(c)
                .build()
                .unwrap();
            let mut rng = fastrand::Rng::with_seed(7);
            let noise: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(4096).collect();
            let noise = serde_bytes::ByteBuf::from(noise);
            let bytes = binary.encode(&noise).unwrap();
            let header = inspect(&bytes).unwrap().unwrap();
            assert_eq!(header.compression, CompressionType::None, "{c}");
        }
        // Compressible above the threshold: compressed, with the declared length.
        let bytes = codec.encode(&records(40)).unwrap();
        let header = inspect(&bytes).unwrap().unwrap();
        assert_eq!(header.compression, c);
        let plain = Serializer::default().encode(&records(40)).unwrap();
        assert_eq!(header.uncompressed_len, Some((plain.len() - 5) as u32));
        assert!(
            bytes.len() < plain.len() / 2,
            "{c}: {} vs {}",
            bytes.len(),
            plain.len()
        );
    }
}

#[test]
fn levels_change_the_output_but_not_the_value() {
    for (c, levels) in [
        (CompressionType::Gzip, [1, 9]),
        (CompressionType::Zstd, [1, 19]),
    ] {
        if !c.is_enabled() {
            continue;
        }
        let value = records(200);
        for level in levels {
            let codec = Serializer::builder()
                .compression(c)
                .level(level)
                .build()
                .unwrap();
            assert_eq!(codec.level(), level);
            let back: Vec<common::Record> = codec.decode(&codec.encode(&value).unwrap()).unwrap();
            assert_eq!(back, value);
        }
    }
}
