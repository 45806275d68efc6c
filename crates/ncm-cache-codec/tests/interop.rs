//! Interop with Python: fixtures written by `tests/fixtures/gen_fixtures.py` (json, msgpack,
//! cbor2, pickle protocols 2–5) decode in Rust, Rust's raw JSON / MessagePack / CBOR bytes are
//! identical to Python's, and Python reads Rust's raw output of every format
//! (`tests/fixtures/verify_rust_outputs.py`, run when python3 has msgpack and cbor2).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ncm_cache_codec::{SerializationType, Serializer};
use ncm_cache_core::Codec;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// `DATA["nested"]` of gen_fixtures.py.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Nested {
    level: i64,
    items: Vec<i64>,
    empty: BTreeMap<String, i64>,
}

/// `DATA` of gen_fixtures.py, field for field in the same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Data {
    id: i64,
    name: String,
    score: f64,
    tiny: f64,
    big: i64,
    negative: i64,
    active: bool,
    deleted: bool,
    nothing: Option<i64>,
    tags: Vec<String>,
    nested: Nested,
    empty_list: Vec<i64>,
    empty_str: String,
    /// Absent from the JSON data set (JSON has no byte strings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blob: Option<ByteBuf>,
}

fn expected(with_blob: bool) -> Data {
    Data {
        id: 42,
        name: "Zoë — 日本語 🚀".into(),
        score: 0.1,
        tiny: 0.00125,
        big: i64::MAX,
        negative: -123_456,
        active: true,
        deleted: false,
        nothing: None,
        tags: vec!["alpha".into(), "beta".into(), String::new()],
        nested: Nested {
            level: 2,
            items: vec![1, -2, 300, 70_000],
            empty: BTreeMap::new(),
        },
        empty_list: Vec::new(),
        empty_str: String::new(),
        blob: with_blob.then(|| ByteBuf::from(b"\x00\x01\xfe\xff binary".to_vec())),
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap_or_else(|e| panic!("reading fixture {name}: {e}"))
}

/// Raw and envelope readers of `format`: a raw Python value reads through both.
fn readers(format: SerializationType) -> [Serializer; 2] {
    [
        Serializer::builder()
            .format(format)
            .raw(true)
            .build()
            .unwrap(),
        Serializer::builder().format(format).build().unwrap(),
    ]
}

fn raw(format: SerializationType) -> Serializer {
    Serializer::builder()
        .format(format)
        .raw(true)
        .build()
        .unwrap()
}

#[test]
fn python_fixtures_decode() {
    let mut cases = vec![
        (SerializationType::Json, "data.json", false),
        (SerializationType::MsgPack, "data.msgpack", true),
        (SerializationType::Cbor, "data.cbor", true),
    ];
    for proto in 2..=5 {
        let name: &'static str = format!("data.p{proto}.pickle").leak();
        cases.push((SerializationType::Pickle, name, true));
    }
    decode_fixtures(&cases);
}

/// Every fixture decodes to `DATA` through the raw and the envelope reader of its format.
fn decode_fixtures(cases: &[(SerializationType, &str, bool)]) {
    for &(format, file, with_blob) in cases {
        if !format.is_enabled() {
            continue;
        }
        let bytes = fixture(file);
        for reader in readers(format) {
            let data: Data = reader
                .decode(&bytes)
                .unwrap_or_else(|e| panic!("{file} via {format}: {e}"));
            assert_eq!(data, expected(with_blob), "{file}");
        }
    }
}

/// Values Python compressed itself around the format's bytes (`gzip.compress` of JSON,
/// `zlib.compress` of a pickle; fixtures written by gen_fixtures.py) read like their
/// uncompressed fixtures, through raw and envelope readers.
#[cfg(feature = "gzip")]
#[test]
fn python_compressed_values_decode() {
    decode_fixtures(&[
        (SerializationType::Json, "data.json.gz", false),
        (SerializationType::Pickle, "data.p4.pickle.zlib", true),
    ]);
}

/// Known limitation of serde-pickle 1.2 (its memo reference counting, upstream
/// birkenfeld/serde-pickle#24): a container that Python references more than once (the same
/// dict twice, or lists shared by shallow copies) whose own children are memoized fails with
/// "recursive structure found" — a typed error, never wrong data. Shared strings are fine
/// (`python_fixtures_decode`). When this test fails because the values decode, upstream fixed
/// it: assert equality with `vec![expected(true); 3]` instead.
#[test]
fn python_pickles_sharing_containers_are_a_typed_error() {
    if !SerializationType::Pickle.is_enabled() {
        return;
    }
    for file in ["data.shared.pickle", "data.copies.pickle"] {
        let bytes = fixture(file);
        for reader in readers(SerializationType::Pickle) {
            let err = reader.decode::<Vec<Data>>(&bytes).unwrap_err();
            assert_eq!(err.kind(), ncm_cache_core::CodecErrorKind::Decode, "{file}");
            assert!(err.message().contains("recursive"), "{file}: {err}");
        }
    }
}

#[test]
fn json_fixture_also_reads_with_simd_json() {
    if !SerializationType::SimdJson.is_enabled() {
        return;
    }
    let data: Data = raw(SerializationType::SimdJson)
        .decode(&fixture("data.json"))
        .unwrap();
    assert_eq!(data, expected(false));
}

#[test]
fn raw_json_msgpack_and_cbor_are_byte_identical_to_python() {
    for (format, file, with_blob) in [
        (SerializationType::Json, "data.json", false),
        (SerializationType::SimdJson, "data.json", false),
        (SerializationType::MsgPack, "data.msgpack", true),
        (SerializationType::Cbor, "data.cbor", true),
    ] {
        if !format.is_enabled() {
            continue;
        }
        let ours = raw(format).encode(&expected(with_blob)).unwrap();
        let python = fixture(file);
        assert!(
            ours[..] == python[..],
            "{format}: Rust raw output differs from Python's {file}\n rust:   {:02x?}\n python: {:02x?}",
            &ours[..],
            &python[..]
        );
    }
}

/// Writes Rust's raw encodings of the data set and runs verify_rust_outputs.py on them.
#[test]
fn python_reads_rust_raw_outputs() {
    let needed = [
        SerializationType::Json,
        SerializationType::MsgPack,
        SerializationType::Cbor,
        SerializationType::Pickle,
    ];
    if needed.iter().any(|f| !f.is_enabled()) {
        return; // a build without these formats has nothing to check (CI runs --all-features)
    }
    let probe = Command::new("python3")
        .args(["-c", "import msgpack, cbor2"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        return skip(
            "python_reads_rust_raw_outputs: python3 with msgpack and cbor2 not found \
             (pip install msgpack cbor2)",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    for (format, name, with_blob) in [
        (SerializationType::Json, "rust.json", false),
        (SerializationType::MsgPack, "rust.msgpack", true),
        (SerializationType::Cbor, "rust.cbor", true),
        (SerializationType::Pickle, "rust.pickle", true),
    ] {
        let bytes = raw(format).encode(&expected(with_blob)).unwrap();
        std::fs::write(dir.path().join(name), &bytes).unwrap();
    }
    let out = Command::new("python3")
        .arg(fixtures().join("verify_rust_outputs.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "Python could not read Rust's raw output:\n{stdout}"
    );
    assert_eq!(stdout.matches("ok   ").count(), 4, "{stdout}");
}

/// Prints a skip notice and records it in `$NCM_CACHE_SKIP_LOG` (read by `cargo xtask ci`).
fn skip(reason: &str) {
    println!("SKIPPED: {reason}");
    if let Some(path) = std::env::var_os("NCM_CACHE_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "ncm-cache-codec: {reason}");
        }
    }
}
