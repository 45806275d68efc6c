//! `Serializer` beside the raw library calls doing the same work, measured in the same run.
//!
//! Rows (criterion groups) are `codec_{encode,decode}_<format>_<compression>_<size>`:
//! - every format uncompressed at 100 B, 1 KiB and 64 KiB;
//! - gzip, LZ4 and Zstd with JSON and MessagePack at 1 KiB and 64 KiB (and 100 B outside
//!   quick mode).
//!
//! In each group `ours` is the `Serializer` (envelope, compression threshold 0 so compressed
//! rows always compress) and `baseline_<library>` the bare library call: `serde_json`,
//! `simd_json` (+ `serde_json` in the simd rows, to show where simd-json wins), `ciborium`,
//! `rmp_serde`, `serde_pickle`, and `<format lib>_<compression lib>` for compressed rows (the
//! baselines reuse their zstd contexts too). The difference is the envelope's overhead.
//! The payload is a `Vec` of small product records.

// Bench harness code: a failed call is a broken benchmark.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::io::{Read, Write};
use std::time::Duration;

use criterion::{
    BenchmarkGroup, Criterion, criterion_group, criterion_main, measurement::WallTime,
};
use ncm_cache_codec::{CompressionType, SerializationType, Serializer};
use ncm_cache_core::Codec;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    id: u64,
    name: String,
    price: f64,
    in_stock: bool,
    tags: Vec<String>,
}

type Payload = Vec<Item>;

/// Records until the JSON encoding reaches `bytes`.
fn payload(bytes: usize) -> Payload {
    let mut out = Vec::new();
    let mut size = 2;
    let mut i = 0u64;
    while size < bytes {
        let item = Item {
            id: 10_000 + i,
            name: format!("Product {i} — size M"),
            price: 9.99 + i as f64 * 0.5,
            in_stock: !i.is_multiple_of(3),
            tags: vec!["sale".into(), format!("cat-{}", i % 7)],
        };
        size += serde_json::to_vec(&item).map_or(0, |v| v.len()) + 1;
        out.push(item);
        i += 1;
    }
    out
}

const SIZES: [(&str, usize); 3] = [("100B", 100), ("1KiB", 1024), ("64KiB", 64 * 1024)];

/// Short settings in quick mode so this file stays well under a minute.
fn tune(group: &mut BenchmarkGroup<'_, WallTime>) {
    if ncm_cache_bench::quick() {
        group
            .warm_up_time(Duration::from_millis(80))
            .measurement_time(Duration::from_millis(200))
            .sample_size(10)
            // The default 100,000 bootstrap resamples cost more than the measurement here.
            .nresamples(5_000);
    }
}

// ---- raw library calls (the baselines) ----------------------------------------------------

fn fmt_encode(format: SerializationType, v: &Payload) -> Vec<u8> {
    match format {
        SerializationType::Json => serde_json::to_vec(v).unwrap(),
        SerializationType::SimdJson => simd_json::serde::to_vec(v).unwrap(),
        SerializationType::Cbor => {
            let mut out = Vec::new();
            ciborium::into_writer(v, &mut out).unwrap();
            out
        }
        SerializationType::MsgPack => rmp_serde::to_vec_named(v).unwrap(),
        SerializationType::Pickle => {
            serde_pickle::to_vec(v, serde_pickle::SerOptions::new()).unwrap()
        }
        _ => unreachable!(),
    }
}

fn fmt_decode(format: SerializationType, bytes: &[u8]) -> Payload {
    match format {
        SerializationType::Json => serde_json::from_slice(bytes).unwrap(),
        SerializationType::SimdJson => simd_json::serde::from_slice(&mut bytes.to_vec()).unwrap(),
        SerializationType::Cbor => ciborium::from_reader(bytes).unwrap(),
        SerializationType::MsgPack => rmp_serde::from_slice(bytes).unwrap(),
        SerializationType::Pickle => {
            serde_pickle::from_slice(bytes, serde_pickle::DeOptions::new()).unwrap()
        }
        _ => unreachable!(),
    }
}

fn fmt_lib(format: SerializationType) -> &'static str {
    match format {
        SerializationType::Json => "serde_json",
        SerializationType::SimdJson => "simd_json",
        SerializationType::Cbor => "ciborium",
        SerializationType::MsgPack => "rmp_serde",
        SerializationType::Pickle => "serde_pickle",
        _ => unreachable!(),
    }
}

/// A compressor with reused contexts, as a careful user of the libraries would write it.
struct Raw {
    zstd_c: zstd::bulk::Compressor<'static>,
    zstd_d: zstd::bulk::Decompressor<'static>,
}

impl Raw {
    fn new() -> Self {
        Self {
            zstd_c: zstd::bulk::Compressor::new(3).unwrap(),
            zstd_d: zstd::bulk::Decompressor::new().unwrap(),
        }
    }

    fn compress(&mut self, c: CompressionType, data: &[u8]) -> Vec<u8> {
        match c {
            CompressionType::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            CompressionType::Lz4 => lz4_flex::compress_prepend_size(data),
            CompressionType::Zstd => self.zstd_c.compress(data).unwrap(),
            _ => unreachable!(),
        }
    }

    fn decompress(&mut self, c: CompressionType, data: &[u8], len: usize) -> Vec<u8> {
        match c {
            CompressionType::Gzip => {
                let mut out = Vec::with_capacity(len);
                flate2::read::GzDecoder::new(data)
                    .read_to_end(&mut out)
                    .unwrap();
                out
            }
            CompressionType::Lz4 => lz4_flex::decompress_size_prepended(data).unwrap(),
            CompressionType::Zstd => self.zstd_d.decompress(data, len).unwrap(),
            _ => unreachable!(),
        }
    }
}

fn comp_lib(c: CompressionType) -> &'static str {
    match c {
        CompressionType::Gzip => "flate2",
        CompressionType::Lz4 => "lz4_flex",
        CompressionType::Zstd => "zstd",
        _ => unreachable!(),
    }
}

// ---- rows ------------------------------------------------------------------------------------

fn ours(format: SerializationType, compression: CompressionType) -> Serializer {
    Serializer::builder()
        .format(format)
        .compression(compression)
        .compression_threshold(0)
        .build()
        .unwrap()
}

fn uncompressed(c: &mut Criterion) {
    for format in SerializationType::ALL {
        for (size_name, size) in SIZES {
            let value = payload(size);
            let codec = ours(format, CompressionType::None);
            let name = format!("{format}_none_{size_name}");

            let mut g = c.benchmark_group(format!("codec_encode_{name}"));
            tune(&mut g);
            g.bench_function("ours", |b| {
                b.iter(|| codec.encode(black_box(&value)).unwrap())
            });
            g.bench_function(format!("baseline_{}", fmt_lib(format)), |b| {
                b.iter(|| fmt_encode(format, black_box(&value)))
            });
            if format == SerializationType::SimdJson {
                g.bench_function("baseline_serde_json", |b| {
                    b.iter(|| serde_json::to_vec(black_box(&value)).unwrap())
                });
            }
            g.finish();

            let enveloped = codec.encode(&value).unwrap();
            let bare = fmt_encode(format, &value);
            let mut g = c.benchmark_group(format!("codec_decode_{name}"));
            tune(&mut g);
            g.bench_function("ours", |b| {
                b.iter(|| codec.decode::<Payload>(black_box(&enveloped)).unwrap())
            });
            g.bench_function(format!("baseline_{}", fmt_lib(format)), |b| {
                b.iter(|| fmt_decode(format, black_box(&bare)))
            });
            if format == SerializationType::SimdJson {
                g.bench_function("baseline_serde_json", |b| {
                    b.iter(|| serde_json::from_slice::<Payload>(black_box(&bare)).unwrap())
                });
            }
            g.finish();
        }
    }
}

fn compressed(c: &mut Criterion) {
    let sizes: &[(&str, usize)] = if ncm_cache_bench::quick() {
        &SIZES[1..]
    } else {
        &SIZES
    };
    let mut raw = Raw::new();
    for compression in [
        CompressionType::Gzip,
        CompressionType::Lz4,
        CompressionType::Zstd,
    ] {
        for format in [SerializationType::Json, SerializationType::MsgPack] {
            for &(size_name, size) in sizes {
                let value = payload(size);
                let codec = ours(format, compression);
                let name = format!("{format}_{compression}_{size_name}");
                let baseline = format!("baseline_{}_{}", fmt_lib(format), comp_lib(compression));

                let mut g = c.benchmark_group(format!("codec_encode_{name}"));
                tune(&mut g);
                g.bench_function("ours", |b| {
                    b.iter(|| codec.encode(black_box(&value)).unwrap())
                });
                g.bench_function(&baseline, |b| {
                    b.iter(|| raw.compress(compression, &fmt_encode(format, black_box(&value))))
                });
                g.finish();

                let enveloped = codec.encode(&value).unwrap();
                let bare = fmt_encode(format, &value);
                let packed = raw.compress(compression, &bare);
                let mut g = c.benchmark_group(format!("codec_decode_{name}"));
                tune(&mut g);
                g.bench_function("ours", |b| {
                    b.iter(|| codec.decode::<Payload>(black_box(&enveloped)).unwrap())
                });
                g.bench_function(&baseline, |b| {
                    b.iter(|| {
                        let data = raw.decompress(compression, black_box(&packed), bare.len());
                        fmt_decode(format, &data)
                    })
                });
                g.finish();
            }
        }
    }
}

criterion_group! {
    name = benches;
    config = ncm_cache_bench::criterion();
    targets = uncompressed, compressed
}
criterion_main!(benches);
