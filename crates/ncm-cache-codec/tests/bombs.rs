//! Decompression bombs: zstd, gzip and LZ4 payloads expanding to 64 MiB inside a valid envelope
//! are rejected with `TooLarge` by a reader capped at 1 MiB — with an honest declared length
//! (before decompressing) and with a lying small one (the bounded decompressor stops) — and
//! the reader never allocates more than the cap.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A counting allocator needs `unsafe impl GlobalAlloc`; it only forwards to the system one.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ncm_cache_codec::{CompressionType, SerializationType, Serializer, inspect};
use ncm_cache_core::{Codec, CodecErrorKind};
use serde_bytes::ByteBuf;

/// Records the largest single allocation made by the current thread while tracking is on.
struct Tracking;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to `System` unchanged; the thread-locals are const-initialized
// `Cell`s, so recording allocates nothing and cannot recurse.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

fn record(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

/// Runs `f` and returns its result with the largest allocation it made on this thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    TRACK.with(|t| t.set(true));
    let r = f();
    TRACK.with(|t| t.set(false));
    (r, LARGEST.with(Cell::get))
}

const CAP: usize = 1 << 20;
const BOMB: usize = 64 << 20;

/// A 64 MiB run of zeros as a compressed envelope (MessagePack bytes when available, JSON
/// text otherwise).
fn bomb(compression: CompressionType) -> Vec<u8> {
    let (format, zeros): (_, Box<dyn erased::Ser>) = if SerializationType::MsgPack.is_enabled() {
        (
            SerializationType::MsgPack,
            Box::new(ByteBuf::from(vec![0u8; BOMB])),
        )
    } else {
        (SerializationType::Json, Box::new("0".repeat(BOMB)))
    };
    let writer = Serializer::builder()
        .format(format)
        .compression(compression)
        .max_decompressed_size(usize::MAX)
        .build()
        .unwrap();
    let bytes = zeros.encode_with(&writer);
    let header = inspect(&bytes).unwrap().unwrap();
    assert_eq!(header.compression, compression);
    assert!(header.uncompressed_len.unwrap() as usize > BOMB);
    assert!(
        bytes.len() < BOMB / 100,
        "{compression}: {} bytes",
        bytes.len()
    );
    bytes
}

/// Lets the bomb's value be a byte buffer or a string.
mod erased {
    use super::*;

    pub(super) trait Ser {
        fn encode_with(&self, codec: &Serializer) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Ser for T {
        fn encode_with(&self, codec: &Serializer) -> Vec<u8> {
            codec.encode_to_vec(self).unwrap()
        }
    }
}

fn capped_readers() -> Vec<Serializer> {
    [SerializationType::Json, SerializationType::MsgPack]
        .into_iter()
        .filter(|f| f.is_enabled())
        .map(|f| {
            Serializer::builder()
                .format(f)
                .max_decompressed_size(CAP)
                .build()
                .unwrap()
        })
        .collect()
}

fn check_bomb(compression: CompressionType) {
    if !compression.is_enabled() {
        return;
    }
    let honest = bomb(compression);
    let mut lying = honest.clone();
    lying[5..9].copy_from_slice(&1000u32.to_le_bytes());
    for reader in capped_readers() {
        for (what, bytes) in [("honest", &honest), ("lying", &lying)] {
            let (result, largest) = largest_allocation(|| reader.decode::<ByteBuf>(bytes));
            let err = result.unwrap_err();
            // Above the cap: too large for this reader (kept for a reader with a larger cap).
            // Expanding past its own declared length: damaged (removed).
            let expected = if what == "honest" {
                CodecErrorKind::TooLarge
            } else {
                CodecErrorKind::Corrupt
            };
            assert_eq!(err.kind(), expected, "{compression} {what}: {err}");
            assert!(
                largest <= CAP,
                "{compression} {what}: allocated {largest} bytes (cap {CAP})"
            );
        }
    }
    // An honest length under a cap big enough still decodes.
    let roomy = Serializer::builder()
        .format(inspect(&honest).unwrap().unwrap().format)
        .max_decompressed_size(128 << 20)
        .build()
        .unwrap();
    if roomy.format() == SerializationType::MsgPack {
        assert_eq!(roomy.decode::<ByteBuf>(&honest).unwrap().len(), BOMB);
    }
}

#[test]
fn zstd_bomb_is_rejected() {
    check_bomb(CompressionType::Zstd);
}

#[test]
fn gzip_bomb_is_rejected() {
    check_bomb(CompressionType::Gzip);
}

#[test]
fn lz4_bomb_is_rejected() {
    check_bomb(CompressionType::Lz4);
}

/// A stream shorter than its declared length is corrupt, not a partial value.
#[test]
fn short_streams_are_corrupt() {
    for compression in [
        CompressionType::Gzip,
        CompressionType::Lz4,
        CompressionType::Zstd,
    ] {
        if !compression.is_enabled() {
            continue;
        }
        let codec = Serializer::builder()
            .compression(compression)
            .compression_threshold(0)
            .build()
            .unwrap();
        let mut bytes = codec.encode_to_vec(&"x".repeat(5000)).unwrap();
        let declared = u32::from_le_bytes(bytes[5..9].try_into().unwrap());
        bytes[5..9].copy_from_slice(&(declared + 10).to_le_bytes());
        let err = codec.decode::<String>(&bytes).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Corrupt, "{compression}: {err}");
    }
}
