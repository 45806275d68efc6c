//! Untrusted input: random and mutated bytes never panic any decoder, only typed errors come
//! back; hostile pickles (deep nesting, memo amplification, recursion) are rejected up front.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Instant;

use common::{Record, Value, envelope_configs, formats, raw_configs, records};
use ncm_cache_codec::{MAGIC, SerializationType, Serializer};
use ncm_cache_core::{Codec, CodecErrorKind};

const INPUTS: usize = 10_000;

/// Valid encodings to mutate: every format × compression (compressing from 16 bytes), raw
/// mode, and the Python fixtures.
fn seeds() -> Vec<Vec<u8>> {
    let value = Value::List(vec![
        Value::Str("Zoë 日本".into()),
        Value::Float(1.5),
        Value::Bytes(vec![0, 1, 2, 255]),
        Value::Map([("k".to_string(), Value::Int(-7))].into()),
    ]);
    let mut seeds = Vec::new();
    for codec in envelope_configs(16).into_iter().chain(raw_configs()) {
        seeds.push(codec.encode(&value).unwrap().to_vec());
        seeds.push(codec.encode(&records(3)).unwrap().to_vec());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in [
        "data.json",
        "data.msgpack",
        "data.cbor",
        "data.p2.pickle",
        "data.p4.pickle",
    ] {
        seeds.push(std::fs::read(dir.join(name)).unwrap());
    }
    seeds
}

fn random_bytes(rng: &mut fastrand::Rng, max: usize) -> Vec<u8> {
    let len = rng.usize(0..=max);
    std::iter::repeat_with(|| rng.u8(..)).take(len).collect()
}

fn mutate(rng: &mut fastrand::Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seeds[rng.usize(..seeds.len())].clone();
    for _ in 0..rng.usize(1..=3) {
        let len = b.len();
        match rng.u8(0..8) {
            0 if len > 0 => {
                for _ in 0..rng.usize(1..=4) {
                    let i = rng.usize(..len);
                    b[i] ^= 1 << rng.u8(0..8);
                }
            }
            1 => b.truncate(rng.usize(0..=len)),
            2 => b.extend(random_bytes(rng, 64)),
            3 if len > 0 => {
                let start = rng.usize(..len);
                let end = rng.usize(start..=len.min(start + 16));
                for x in &mut b[start..end] {
                    *x = rng.u8(..);
                }
            }
            // Header fields: version, format, compression.
            4 if len > 4 => b[rng.usize(2..5)] = rng.u8(..),
            // The declared uncompressed length.
            5 if len >= 9 => b[5..9].copy_from_slice(&rng.u32(..).to_le_bytes()),
            6 => {
                let other = &seeds[rng.usize(..seeds.len())];
                let at = rng.usize(0..=len);
                let from = rng.usize(0..=other.len());
                b.splice(at..at, other[from..].iter().copied());
            }
            7 if len > 0 => {
                let start = rng.usize(..len);
                let end = rng.usize(start..=len);
                b.drain(start..end);
            }
            _ => b.reverse(),
        }
    }
    b
}

fn input(rng: &mut fastrand::Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    match rng.u8(0..10) {
        0..=1 => random_bytes(rng, 300),
        2 => {
            // A plausible header over random bytes.
            let mut b = vec![MAGIC[0], MAGIC[1], 1, rng.u8(0..7), rng.u8(0..5)];
            b.extend(random_bytes(rng, 200));
            b
        }
        _ => mutate(rng, seeds),
    }
}

/// Decoders: per format an envelope reader and a raw reader, with a 1 MiB cap.
fn decoders() -> Vec<Serializer> {
    decoders_with_cap(1 << 20)
}

#[test]
fn ten_thousand_random_and_mutated_inputs_never_panic() {
    let seeds = seeds();
    let decoders = decoders();
    let mut rng = fastrand::Rng::with_seed(0x5EED_C0DE);
    let mut errors = 0usize;
    for n in 0..INPUTS {
        let bytes = input(&mut rng, &seeds);
        for codec in &decoders {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let results = [
                    codec.decode::<Value>(&bytes).err(),
                    codec.decode::<Vec<Record>>(&bytes).err(),
                    codec.decode::<serde::de::IgnoredAny>(&bytes).err(),
                ];
                results.into_iter().flatten().collect::<Vec<_>>()
            }));
            match outcome {
                Ok(errs) => {
                    for e in &errs {
                        assert_ne!(e.kind(), CodecErrorKind::Encode, "{e}");
                    }
                    errors += errs.len();
                }
                Err(_) => panic!(
                    "input #{n} panicked the {} decoder: {bytes:02x?}",
                    common::label(codec)
                ),
            }
        }
    }
    assert!(
        errors > INPUTS,
        "most inputs should fail to decode ({errors} errors)"
    );
}

/// Inputs far above simd-json's 4 KiB threshold, up to a few MiB, for every format and
/// compression: large valid values (about 1 MiB of records, and 4 MiB in one format), mutated,
/// and deep nesting spliced into them. Every decoder returns a value or a typed error; none
/// panics or aborts.
#[test]
fn large_and_deep_inputs_up_to_mebibytes_never_panic() {
    let mut rng = fastrand::Rng::with_seed(0xB16_B00B5);
    let value = records(4_000);
    let mut seeds: Vec<Vec<u8>> = envelope_configs(1024)
        .into_iter()
        .chain(raw_configs())
        .map(|codec| codec.encode(&value).unwrap().to_vec())
        .collect();
    seeds.push(
        Serializer::default()
            .encode(&records(16_000))
            .unwrap()
            .to_vec(),
    );
    assert!(seeds.iter().all(|s| s.len() > 64 * 1024));
    assert!(seeds.iter().any(|s| s.len() > 3 << 20));
    let deep: [&[u8]; 4] = [b"[", b"{\"a\":", &[0x81], &[0x91]];
    let decoders: Vec<Serializer> = decoders_with_cap(8 << 20);
    for (n, seed) in seeds.iter().enumerate() {
        let mut inputs = vec![mutate(&mut rng, std::slice::from_ref(seed))];
        // Deep nesting spliced into the middle of a large value.
        let mut spliced = seed.clone();
        let at = rng.usize(..spliced.len());
        let head = deep[rng.usize(..deep.len())];
        spliced.splice(at..at, head.repeat(200_000));
        inputs.push(spliced);
        for bytes in &inputs {
            for codec in &decoders {
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    let _ = codec.decode::<Value>(bytes);
                    let _ = codec.decode::<serde::de::IgnoredAny>(bytes);
                }));
                assert!(
                    outcome.is_ok(),
                    "seed #{n} ({} bytes) panicked the {} decoder",
                    bytes.len(),
                    common::label(codec)
                );
            }
        }
    }
}

/// Decoders: per format an envelope reader and a raw reader, with the given cap.
fn decoders_with_cap(cap: usize) -> Vec<Serializer> {
    let mut out = Vec::new();
    for f in formats() {
        for raw in [false, true] {
            out.push(
                Serializer::builder()
                    .format(f)
                    .raw(raw)
                    .max_decompressed_size(cap)
                    .build()
                    .unwrap(),
            );
        }
    }
    out
}

#[test]
fn truncations_of_every_seed_are_typed_errors() {
    for seed in seeds() {
        for codec in decoders() {
            for cut in 0..seed.len() {
                let _ = codec.decode::<Vec<Record>>(&seed[..cut]);
            }
        }
    }
}

#[test]
fn foreign_and_unknown_bytes_are_typed_errors() {
    let json = Serializer::default();
    let kind = |b: &[u8]| json.decode::<Value>(b).unwrap_err().kind();
    assert_eq!(kind(b"\xff\xfe garbage"), CodecErrorKind::Decode);
    assert_eq!(kind(&[0xC1, 0x4E]), CodecErrorKind::Corrupt);
    assert_eq!(
        kind(&[0xC1, 0x4E, 9, 1, 0, b'1']),
        CodecErrorKind::Unsupported
    );
    assert_eq!(
        kind(&[0xC1, 0x4E, 1, 77, 0, b'1']),
        CodecErrorKind::Unsupported
    );
    assert_eq!(
        kind(&[0xC1, 0x4E, 1, 1, 77, b'1']),
        CodecErrorKind::Unsupported
    );
    assert_eq!(kind(&[0xC1, 0x4E, 1, 1, 0, b'{']), CodecErrorKind::Decode);
}

/// A pickle nesting lists 100,000 deep: serde-pickle would recurse once per level.
#[test]
fn deeply_nested_pickle_is_rejected_without_overflowing_the_stack() {
    if !SerializationType::Pickle.is_enabled() {
        return;
    }
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', 100_000)); // EMPTY_LIST
    p.extend(std::iter::repeat_n(b'a', 99_999)); // APPEND
    p.push(b'.');
    let codec = Serializer::builder()
        .format(SerializationType::Pickle)
        .build()
        .unwrap();
    let err = codec.decode::<Value>(&p).unwrap_err();
    assert_eq!(err.kind(), CodecErrorKind::Decode, "{err}");
    assert!(err.message().contains("deeper"), "{err}");
    // 100 levels are fine.
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', 100));
    p.extend(std::iter::repeat_n(b'a', 99));
    p.push(b'.');
    codec.decode::<serde::de::IgnoredAny>(&p).unwrap();
}

/// "Billion laughs": each step memoizes a list holding the previous one twice.
#[test]
fn pickle_memo_amplification_is_rejected() {
    if !SerializationType::Pickle.is_enabled() {
        return;
    }
    let mut p = vec![0x80, 2, b'X', 4, 0, 0, 0];
    p.extend(b"boom");
    p.extend([b'q', 0]); // BINPUT 0
    for i in 0..60u8 {
        p.extend([b'(', b'h', i, b'h', i, b'l', b'q', i + 1]); // MARK GET GET LIST PUT
    }
    p.push(b'.');
    let codec = Serializer::builder()
        .format(SerializationType::Pickle)
        .build()
        .unwrap();
    let started = Instant::now();
    let err = codec.decode::<Value>(&p).unwrap_err();
    assert_eq!(err.kind(), CodecErrorKind::TooLarge, "{err}");
    assert!(
        started.elapsed().as_secs() < 5,
        "rejected up front, not after expanding"
    );
}

#[test]
fn recursive_pickle_is_an_error() {
    if !SerializationType::Pickle.is_enabled() {
        return;
    }
    // l = []; l.append(l)
    let p = [0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'.'];
    let codec = Serializer::builder()
        .format(SerializationType::Pickle)
        .build()
        .unwrap();
    assert_eq!(
        codec.decode::<Value>(&p).unwrap_err().kind(),
        CodecErrorKind::Decode
    );
}

/// Pickles that name arbitrary callables are refused, never run.
#[test]
fn pickle_globals_are_not_executed() {
    if !SerializationType::Pickle.is_enabled() {
        return;
    }
    // os.system("echo pwned")
    let p = b"cos\nsystem\n(S'echo pwned'\ntR.";
    let codec = Serializer::builder()
        .format(SerializationType::Pickle)
        .build()
        .unwrap();
    let err = codec.decode::<Value>(p).unwrap_err();
    assert_eq!(err.kind(), CodecErrorKind::Decode, "{err}");
}
