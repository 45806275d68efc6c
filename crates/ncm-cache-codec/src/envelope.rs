//! The self-describing envelope every stored value starts with (unless written in raw mode).
//!
//! | offset | size | field | value |
//! |---|---|---|---|
//! | 0 | 2 | magic | `0xC1 0x4E` |
//! | 2 | 1 | version | `1` unsigned, `2` signed, `3` signed and bound to the key |
//! | 3 | 1 | format | see below |
//! | 4 | 1 | compression | see below |
//! | 5 | 4 | uncompressed length, u32 little-endian | only when compression ≠ 0 |
//! | 5 or 9 | … | payload | the format's bytes, compressed when compression ≠ 0 |
//! | length − 32 | 32 | tag | version 2: HMAC-SHA256(secret, every byte before the tag); version 3: HMAC-SHA256(secret, u32-LE length of the stored key ‖ the stored key ‖ every byte before the tag) |
//!
//! Version 2 ("signed", written when the serializer has a
//! [`signing_key`](crate::SerializerBuilder::signing_key)) is version 1 with the version byte
//! set to 2 and a 32-byte HMAC-SHA256 tag appended; the tag covers the whole header (this version
//! byte included) and the payload. Version 3 ("key-bound") is version 2 whose tag also covers
//! the key the value is stored under (the full Redis key, prefix included), so a signed value
//! copied to another key does not verify there. Builds that predate a version read it as an
//! unsupported version (a miss), they never misread it.
//!
//! | format tag | format | | compression tag | compression |
//! |---|---|---|---|---|
//! | 1 | JSON | | 0 | none |
//! | 2 | JSON written by simd-json | | 1 | gzip (RFC 1952) |
//! | 3 | CBOR | | 2 | LZ4 block |
//! | 4 | MessagePack (named maps) | | 3 | Zstandard frame |
//! | 5 | Pickle | | | |
//!
//! Tags and version numbers are stable: never renumbered or reused. Tag 0 is no format.
//!
//! Why the magic cannot be mistaken for a raw value: `0xC1` is the one byte MessagePack never
//! uses, it is not valid UTF-8 (so no JSON text starts with it), and it is not a pickle opcode
//! (pickle ≥ 2 starts with `0x80`). In CBOR it would be tag 1 (an epoch date) applied to a
//! 14-byte byte string, which is invalid CBOR semantics and never written by serde.
//!
//! The uncompressed length lets a reader reject a decompression bomb before decompressing
//! (declared length above the cap), and bounds the decompressor's output buffer, so a lying
//! length is caught too.

use ncm_cache_core::{CodecError, CodecErrorKind};

use crate::types::{CompressionType, SerializationType};

/// The two magic bytes that open every envelope.
pub const MAGIC: [u8; 2] = [0xC1, 0x4E];

/// The envelope version of unsigned values.
pub const VERSION: u8 = 1;

/// The envelope version of signed values: a version-1 layout followed by a [`TAG_LEN`]-byte
/// HMAC-SHA256 tag over every byte before it (not over the key it is stored under: see
/// [`KEY_BOUND_VERSION`]).
pub const SIGNED_VERSION: u8 = 2;

/// The envelope version of signed values whose tag also covers the key they are stored under:
/// a version-1 layout followed by a [`TAG_LEN`]-byte HMAC-SHA256 tag over the stored key
/// (length-prefixed) and every byte before the tag. Written by a signing serializer when it is
/// told the key ([`Codec::encode_for`](ncm_cache_core::Codec::encode_for)); the newest
/// version this build reads.
pub const KEY_BOUND_VERSION: u8 = 3;

/// Length of the HMAC-SHA256 tag that ends a signed ([`SIGNED_VERSION`] or
/// [`KEY_BOUND_VERSION`]) value.
pub const TAG_LEN: usize = 32;

/// Length of the header without the uncompressed length.
pub(crate) const SHORT_HEADER: usize = 5;

/// Length of the header of a compressed value.
pub(crate) const LONG_HEADER: usize = 9;

/// The parsed header of an enveloped value.
///
/// ```
/// use ncm_cache_codec::{inspect, CompressionType, SerializationType, Serializer};
/// use ncm_cache_core::Codec;
///
/// let codec = Serializer::builder().format(SerializationType::Json).build().unwrap();
/// let bytes = codec.encode(&"hello").unwrap();
/// let header = inspect(&bytes).unwrap().expect("enveloped");
/// assert_eq!(header.format, SerializationType::Json);
/// assert_eq!(header.compression, CompressionType::None);
/// assert_eq!(&bytes[header.header_len..], b"\"hello\"");
/// assert_eq!(header.payload(&bytes), b"\"hello\"");
/// assert!(!header.is_signed());
/// // Bytes without the magic are not an envelope.
/// assert!(inspect(b"\"hello\"").unwrap().is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct EnvelopeHeader {
    /// The envelope version.
    pub version: u8,
    /// The format of the payload.
    pub format: SerializationType,
    /// The compression of the payload.
    pub compression: CompressionType,
    /// The declared uncompressed payload length (compressed values only).
    pub uncompressed_len: Option<u32>,
    /// Where the payload starts.
    pub header_len: usize,
}

impl EnvelopeHeader {
    /// `true` for a signed ([`SIGNED_VERSION`] or [`KEY_BOUND_VERSION`]) value: the last
    /// [`TAG_LEN`] bytes are the tag.
    ///
    /// `inspect` does not verify the tag; only a [`Serializer`](crate::Serializer) with the key
    /// can.
    pub fn is_signed(&self) -> bool {
        self.version == SIGNED_VERSION || self.version == KEY_BOUND_VERSION
    }

    /// The payload of `bytes` (the value this header was parsed from): after the header, and
    /// before the tag of a signed value.
    pub fn payload<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        let end = if self.is_signed() {
            bytes.len().saturating_sub(TAG_LEN)
        } else {
            bytes.len()
        };
        bytes.get(self.header_len..end).unwrap_or_default()
    }
}

/// Parses the envelope header of `bytes`.
///
/// `Ok(None)` when the bytes do not start with the magic (a raw value); an error when they do
/// but the header is truncated or a signed value is too short to hold its tag
/// ([`CodecErrorKind::Corrupt`]), or it names a version, format or compression this build does
/// not know ([`CodecErrorKind::Unsupported`]). Whether the format's cargo feature is compiled in
/// is not checked here, nor is a signed value's tag.
pub fn inspect(bytes: &[u8]) -> Result<Option<EnvelopeHeader>, CodecError> {
    if !bytes.starts_with(&MAGIC) {
        return Ok(None);
    }
    let &[_, _, version, format, compression, ref rest @ ..] = bytes else {
        return Err(corrupt("truncated envelope header"));
    };
    if !(VERSION..=KEY_BOUND_VERSION).contains(&version) {
        return Err(CodecError::new(
            CodecErrorKind::Unsupported,
            "envelope",
            format!(
                "envelope version {version} is not supported (this build reads versions \
                 {VERSION} to {KEY_BOUND_VERSION}); it was probably written by a newer build: \
                 the entry is left for it"
            ),
        ));
    }
    let format = SerializationType::from_tag(format).ok_or_else(|| {
        CodecError::new(
            CodecErrorKind::Unsupported,
            "envelope",
            format!("unknown format tag {format}"),
        )
    })?;
    let compression = CompressionType::from_tag(compression).ok_or_else(|| {
        CodecError::new(
            CodecErrorKind::Unsupported,
            "envelope",
            format!("unknown compression tag {compression}"),
        )
    })?;
    let (uncompressed_len, header_len) = if compression == CompressionType::None {
        (None, SHORT_HEADER)
    } else {
        let &[a, b, c, d, ..] = rest else {
            return Err(corrupt("truncated envelope header (uncompressed length)"));
        };
        (Some(u32::from_le_bytes([a, b, c, d])), LONG_HEADER)
    };
    if version != VERSION && bytes.len() < header_len + TAG_LEN {
        return Err(corrupt("truncated signed envelope (no room for the tag)"));
    }
    Ok(Some(EnvelopeHeader {
        version,
        format,
        compression,
        uncompressed_len,
        header_len,
    }))
}

/// The 5-byte header of an uncompressed value.
pub(crate) const fn short_header(format: SerializationType) -> [u8; SHORT_HEADER] {
    [
        MAGIC[0],
        MAGIC[1],
        VERSION,
        format.tag(),
        CompressionType::None.tag(),
    ]
}

/// The 9-byte header of a compressed value.
pub(crate) fn long_header(
    format: SerializationType,
    compression: CompressionType,
    uncompressed_len: u32,
) -> [u8; LONG_HEADER] {
    let [a, b, c, d] = uncompressed_len.to_le_bytes();
    [
        MAGIC[0],
        MAGIC[1],
        VERSION,
        format.tag(),
        compression.tag(),
        a,
        b,
        c,
        d,
    ]
}

fn corrupt(message: &str) -> CodecError {
    CodecError::new(CodecErrorKind::Corrupt, "envelope", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_back() {
        let h = short_header(SerializationType::Cbor);
        let parsed = inspect(&h).unwrap().unwrap();
        assert_eq!(parsed.format, SerializationType::Cbor);
        assert_eq!(parsed.compression, CompressionType::None);
        assert_eq!(parsed.header_len, 5);
        assert_eq!(parsed.uncompressed_len, None);

        let h = long_header(SerializationType::Pickle, CompressionType::Zstd, 70_000);
        let parsed = inspect(&h).unwrap().unwrap();
        assert_eq!(parsed.compression, CompressionType::Zstd);
        assert_eq!(parsed.uncompressed_len, Some(70_000));
        assert_eq!(parsed.header_len, 9);
    }

    #[test]
    fn damaged_headers_are_typed_errors() {
        assert_eq!(inspect(&[0xC1]).unwrap(), None);
        assert_eq!(inspect(b"{}").unwrap(), None);
        let kind = |b: &[u8]| inspect(b).unwrap_err().kind();
        assert_eq!(kind(&[0xC1, 0x4E]), CodecErrorKind::Corrupt);
        assert_eq!(kind(&[0xC1, 0x4E, 1, 1]), CodecErrorKind::Corrupt);
        assert_eq!(kind(&[0xC1, 0x4E, 4, 1, 0]), CodecErrorKind::Unsupported);
        assert_eq!(kind(&[0xC1, 0x4E, 3, 1, 0]), CodecErrorKind::Corrupt);
        // Version 2 (signed) needs room for the 32-byte tag.
        assert_eq!(kind(&[0xC1, 0x4E, 2, 1, 0]), CodecErrorKind::Corrupt);
        assert_eq!(kind(&[0xC1, 0x4E, 2, 1, 0, b'1']), CodecErrorKind::Corrupt);
        assert_eq!(kind(&[0xC1, 0x4E, 1, 0, 0]), CodecErrorKind::Unsupported);
        assert_eq!(kind(&[0xC1, 0x4E, 1, 9, 0]), CodecErrorKind::Unsupported);
        assert_eq!(kind(&[0xC1, 0x4E, 1, 1, 7]), CodecErrorKind::Unsupported);
        assert_eq!(kind(&[0xC1, 0x4E, 1, 1, 3, 0, 0]), CodecErrorKind::Corrupt);
    }

    #[test]
    fn signed_headers_strip_the_tag() {
        let mut bytes = short_header(SerializationType::Json).to_vec();
        bytes[2] = SIGNED_VERSION;
        bytes.extend_from_slice(b"[1]");
        bytes.extend_from_slice(&[0xAB; TAG_LEN]);
        let h = inspect(&bytes).unwrap().unwrap();
        assert!(h.is_signed());
        assert_eq!(h.version, 2);
        assert_eq!(h.payload(&bytes), b"[1]");
        // An empty payload still parses (the tag alone follows the header).
        let empty = [&bytes[..SHORT_HEADER], &[0; TAG_LEN][..]].concat();
        assert_eq!(inspect(&empty).unwrap().unwrap().payload(&empty), b"");
    }
}
