//! Compression with bounded output: gzip (flate2), LZ4 (lz4_flex block format), Zstandard.
//!
//! Decompression always knows the declared uncompressed length (from the envelope, already
//! checked against the cap) and writes into a buffer of exactly that size; a stream that would
//! write more is rejected with [`CodecErrorKind::TooLarge`] without allocating more.

use ncm_cache_core::{CodecError, CodecErrorKind};

use crate::types::CompressionType;

/// Appends the compression of `src` to `out`.
pub(crate) fn compress(
    kind: CompressionType,
    level: i32,
    src: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    match kind {
        CompressionType::None => {
            out.extend_from_slice(src);
            Ok(())
        }
        CompressionType::Gzip => gzip::compress(level, src, out),
        CompressionType::Lz4 => lz4::compress(src, out),
        CompressionType::Zstd => zstd_impl::compress(level, src, out),
    }
}

/// Decompresses `src`, which must expand to exactly `declared` bytes (`declared` ≤ the cap).
pub(crate) fn decompress(
    kind: CompressionType,
    src: &[u8],
    declared: usize,
) -> Result<Vec<u8>, CodecError> {
    match kind {
        CompressionType::None => Ok(src.to_vec()),
        CompressionType::Gzip => gzip::decompress(src, declared),
        CompressionType::Lz4 => lz4::decompress(src, declared),
        CompressionType::Zstd => zstd_impl::decompress(src, declared),
    }
}

/// A standard compressed frame found where a raw (envelope-less) value was expected: what
/// other programs write when they compress a value themselves (Python's `gzip.compress`,
/// `zlib.compress`, `zstandard`, `lz4.frame`). zlib needs the `gzip` feature (same library).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForeignFrame {
    /// RFC 1952 gzip (`1f 8b 08`).
    Gzip,
    /// RFC 1950 zlib (`78` and a check byte: Python's `zlib.compress`).
    Zlib,
    /// A Zstandard frame (`28 b5 2f fd`).
    Zstd,
    /// An LZ4 frame (`04 22 4d 18`); only LZ4's block format is compiled in.
    Lz4Frame,
}

/// The compressed frame `bytes` start with, if any.
pub(crate) fn foreign_frame(bytes: &[u8]) -> Option<ForeignFrame> {
    match bytes {
        [0x1f, 0x8b, 0x08, ..] => Some(ForeignFrame::Gzip),
        // CMF 0x78 (deflate, 32 KiB window) and a FLG that makes the pair a multiple of 31.
        [0x78, flg, ..] if (0x7800u16 | u16::from(*flg)).is_multiple_of(31) => {
            Some(ForeignFrame::Zlib)
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(ForeignFrame::Zstd),
        [0x04, 0x22, 0x4d, 0x18, ..] => Some(ForeignFrame::Lz4Frame),
        _ => None,
    }
}

/// Decompresses a foreign frame, refusing to produce more than `cap` bytes
/// ([`CodecErrorKind::TooLarge`]). Frames whose decompressor is not compiled in are
/// [`CodecErrorKind::Unsupported`].
pub(crate) fn decompress_foreign(
    frame: ForeignFrame,
    src: &[u8],
    cap: usize,
) -> Result<Vec<u8>, CodecError> {
    match frame {
        ForeignFrame::Gzip => gzip::decompress_capped(src, cap),
        ForeignFrame::Zlib => gzip::decompress_zlib_capped(src, cap),
        ForeignFrame::Zstd => zstd_impl::decompress_capped(src, cap),
        ForeignFrame::Lz4Frame => Err(CodecError::new(
            CodecErrorKind::Unsupported,
            "lz4",
            "an LZ4 *frame* (as Python's lz4.frame writes) is not readable: this crate reads \
             LZ4 blocks inside its envelope",
        )),
    }
}

/// Reads `reader` to its end, failing with [`CodecErrorKind::TooLarge`] past `cap` bytes. The
/// buffer grows by doubling but never beyond `cap + 1` bytes (no doubling past the cap).
#[allow(dead_code, reason = "unused when no compression feature is enabled")]
fn read_capped(
    mut reader: impl std::io::Read,
    cap: usize,
    what: &'static str,
) -> Result<Vec<u8>, CodecError> {
    let limit = cap.saturating_add(1);
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CodecError::with_source(CodecErrorKind::Corrupt, what, e)),
        };
        let n = n.min(limit - out.len());
        if out.capacity() - out.len() < n {
            let want = (out.capacity() * 2).max(out.len() + n).min(limit);
            out.reserve_exact(want - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
        if out.len() > cap {
            return Err(CodecError::new(
                CodecErrorKind::TooLarge,
                what,
                format!("decompresses past the cap of {cap} bytes (`max_decompressed_size`)"),
            ));
        }
    }
    Ok(out)
}

/// The error for a compression that is not compiled in.
pub(crate) fn unsupported(kind: CompressionType) -> CodecError {
    CodecError::new(
        CodecErrorKind::Unsupported,
        kind.name(),
        format!(
            "{kind} support is not compiled in: enable the `{}` cargo feature of ncm-cache-codec",
            kind.feature().unwrap_or("none")
        ),
    )
}

/// The error for a stream that expands past its declared length: it lies about its length, so
/// it is damaged (no reader accepts it), not merely large.
#[allow(dead_code, reason = "unused when no compression feature is enabled")]
fn too_large(kind: CompressionType, declared: usize) -> CodecError {
    CodecError::new(
        CodecErrorKind::Corrupt,
        kind.name(),
        format!("decompressed data exceeds its declared length of {declared} bytes"),
    )
}

/// The error for a stream that expands to less than its declared length.
#[allow(dead_code, reason = "unused when no compression feature is enabled")]
fn short(kind: CompressionType, got: usize, declared: usize) -> CodecError {
    CodecError::new(
        CodecErrorKind::Corrupt,
        kind.name(),
        format!("decompressed to {got} bytes, the envelope declared {declared}"),
    )
}

#[cfg(feature = "gzip")]
mod gzip {
    use std::io::{Read, Write};

    use flate2::Compression;
    use flate2::read::GzDecoder;
    use flate2::write::GzEncoder;

    use super::*;

    pub(super) fn compress(level: i32, src: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        let level = u32::try_from(level).unwrap_or(6).min(9);
        out.reserve(src.len() / 2 + 64);
        let mut encoder = GzEncoder::new(out, Compression::new(level));
        encoder
            .write_all(src)
            .and_then(|()| encoder.try_finish())
            .map_err(|e| CodecError::with_source(CodecErrorKind::Compression, "gzip", e))
    }

    pub(super) fn decompress_capped(src: &[u8], cap: usize) -> Result<Vec<u8>, CodecError> {
        read_capped(GzDecoder::new(src), cap, "gzip")
    }

    pub(super) fn decompress_zlib_capped(src: &[u8], cap: usize) -> Result<Vec<u8>, CodecError> {
        read_capped(flate2::read::ZlibDecoder::new(src), cap, "zlib")
    }

    pub(super) fn decompress(src: &[u8], declared: usize) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(declared);
        // One byte more than declared tells "too long" from "exactly right".
        let limit = u64::try_from(declared)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        GzDecoder::new(src)
            .take(limit)
            .read_to_end(&mut out)
            .map_err(|e| CodecError::with_source(CodecErrorKind::Corrupt, "gzip", e))?;
        match out.len() {
            n if n > declared => Err(too_large(CompressionType::Gzip, declared)),
            n if n < declared => Err(short(CompressionType::Gzip, n, declared)),
            _ => Ok(out),
        }
    }
}

#[cfg(not(feature = "gzip"))]
mod gzip {
    use super::*;

    pub(super) fn compress(_: i32, _: &[u8], _: &mut Vec<u8>) -> Result<(), CodecError> {
        Err(unsupported(CompressionType::Gzip))
    }

    pub(super) fn decompress(_: &[u8], _: usize) -> Result<Vec<u8>, CodecError> {
        Err(unsupported(CompressionType::Gzip))
    }

    pub(super) fn decompress_capped(_: &[u8], _: usize) -> Result<Vec<u8>, CodecError> {
        Err(unsupported(CompressionType::Gzip))
    }

    pub(super) fn decompress_zlib_capped(_: &[u8], _: usize) -> Result<Vec<u8>, CodecError> {
        Err(unsupported(CompressionType::Gzip))
    }
}

#[cfg(feature = "lz4")]
mod lz4 {
    use lz4_flex::block::{self, DecompressError};

    use super::*;

    pub(super) fn compress(src: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        let start = out.len();
        out.resize(start + block::get_maximum_output_size(src.len()), 0);
        match block::compress_into(src, &mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(CodecError::with_source(
                    CodecErrorKind::Compression,
                    "lz4",
                    e,
                ))
            }
        }
    }

    pub(super) fn decompress(src: &[u8], declared: usize) -> Result<Vec<u8>, CodecError> {
        let mut out = vec![0; declared];
        match block::decompress_into(src, &mut out) {
            Ok(n) if n == declared => Ok(out),
            Ok(n) => Err(short(CompressionType::Lz4, n, declared)),
            Err(DecompressError::OutputTooSmall { .. }) => {
                Err(too_large(CompressionType::Lz4, declared))
            }
            Err(e) => Err(CodecError::with_source(CodecErrorKind::Corrupt, "lz4", e)),
        }
    }
}

#[cfg(not(feature = "lz4"))]
mod lz4 {
    use super::*;

    pub(super) fn compress(_: &[u8], _: &mut Vec<u8>) -> Result<(), CodecError> {
        Err(unsupported(CompressionType::Lz4))
    }

    pub(super) fn decompress(_: &[u8], _: usize) -> Result<Vec<u8>, CodecError> {
        Err(unsupported(CompressionType::Lz4))
    }
}

#[cfg(feature = "zstd")]
mod zstd_impl {
    use std::cell::RefCell;

    use zstd::bulk::Compressor;
    use zstd::zstd_safe::{self, DCtx, zstd_sys::ZSTD_ErrorCode};

    use super::*;

    /// How many levels keep a compression context per thread.
    const CACHED_LEVELS: usize = 4;

    thread_local! {
        /// Compression contexts by level, reused: no per-call context setup.
        static COMPRESSORS: RefCell<Vec<(i32, Compressor<'static>)>> =
            const { RefCell::new(Vec::new()) };
        /// The decompression context, reused.
        static DECOMPRESSOR: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
    }

    fn compression_error(e: std::io::Error) -> CodecError {
        CodecError::with_source(CodecErrorKind::Compression, "zstd", e)
    }

    fn with_compressor<R>(
        level: i32,
        f: impl FnOnce(&mut Compressor<'static>) -> R,
    ) -> Result<R, CodecError> {
        COMPRESSORS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut cache) => {
                let i = match cache.iter().position(|(l, _)| *l == level) {
                    Some(i) => i,
                    None => {
                        if cache.len() >= CACHED_LEVELS {
                            cache.remove(0);
                        }
                        cache.push((level, Compressor::new(level).map_err(compression_error)?));
                        cache.len() - 1
                    }
                };
                Ok(f(&mut cache[i].1))
            }
            // Re-entered (a Serialize impl encoding inside an encode): a one-off context.
            Err(_) => Ok(f(&mut Compressor::new(level).map_err(compression_error)?)),
        })
    }

    pub(super) fn compress(level: i32, src: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        let start = out.len();
        out.resize(start + zstd_safe::compress_bound(src.len()), 0);
        match with_compressor(level, |c| c.compress_to_buffer(src, &mut out[start..]))? {
            Ok(n) => {
                out.truncate(start + n);
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(compression_error(e))
            }
        }
    }

    pub(super) fn decompress(src: &[u8], declared: usize) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(declared);
        // Single-shot decompression writes straight into `out` (no window buffer) and stops
        // with "destination too small" as soon as the stream would pass `declared`.
        let result = DECOMPRESSOR.with(|cell| match cell.try_borrow_mut() {
            Ok(mut slot) => match &mut *slot {
                Some(dctx) => Ok(dctx.decompress(&mut out, src)),
                None => {
                    let mut dctx = new_dctx()?;
                    let result = dctx.decompress(&mut out, src);
                    *slot = Some(dctx);
                    Ok(result)
                }
            },
            // Re-entered (a Deserialize impl decoding inside a decode): a one-off context.
            Err(_) => Ok(new_dctx()?.decompress(&mut out, src)),
        })?;
        match result {
            Ok(n) if n == declared => Ok(out),
            Ok(n) => Err(short(CompressionType::Zstd, n, declared)),
            Err(code) if code == dst_too_small() => Err(too_large(CompressionType::Zstd, declared)),
            Err(code) => Err(CodecError::new(
                CodecErrorKind::Corrupt,
                "zstd",
                zstd_safe::get_error_name(code),
            )),
        }
    }

    pub(super) fn decompress_capped(src: &[u8], cap: usize) -> Result<Vec<u8>, CodecError> {
        let mut decoder = zstd::stream::read::Decoder::with_buffer(src)
            .map_err(|e| CodecError::with_source(CodecErrorKind::Compression, "zstd", e))?;
        // A frame may ask for a window up to 2^27 bytes by default: no larger than the cap.
        let log = usize::BITS - cap.max(1 << 10).saturating_sub(1).leading_zeros();
        decoder
            .window_log_max(log.clamp(10, 31))
            .map_err(|e| CodecError::with_source(CodecErrorKind::Compression, "zstd", e))?;
        read_capped(decoder, cap, "zstd").map_err(|e| {
            // A frame whose window is larger than the cap allows is too large, not damaged.
            if e.to_string().contains("memory") {
                CodecError::new(
                    CodecErrorKind::TooLarge,
                    "zstd",
                    format!("the frame needs a window larger than the cap of {cap} bytes"),
                )
            } else {
                e
            }
        })
    }

    fn new_dctx() -> Result<DCtx<'static>, CodecError> {
        DCtx::try_create().ok_or_else(|| {
            CodecError::new(
                CodecErrorKind::Compression,
                "zstd",
                "could not allocate a decompression context",
            )
        })
    }

    /// The raw error code zstd returns when the output buffer is too small (`-70` as `usize`;
    /// zstd's error enum values are stable).
    fn dst_too_small() -> usize {
        (ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall as usize).wrapping_neg()
    }
}

#[cfg(not(feature = "zstd"))]
mod zstd_impl {
    use super::*;

    pub(super) fn compress(_: i32, _: &[u8], _: &mut Vec<u8>) -> Result<(), CodecError> {
        Err(unsupported(CompressionType::Zstd))
    }

    pub(super) fn decompress(_: &[u8], _: usize) -> Result<Vec<u8>, CodecError> {
        Err(unsupported(CompressionType::Zstd))
    }

    pub(super) fn decompress_capped(_: &[u8], _: usize) -> Result<Vec<u8>, CodecError> {
        Err(unsupported(CompressionType::Zstd))
    }
}
