//! [`Serializer`]: the codec users hold, its builder, and [`SerializerFactory`].

use bytes::Bytes;
use ncm_cache_core::{CacheError, Codec, CodecError, CodecErrorKind};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::{self, LONG_HEADER, SHORT_HEADER};
use crate::types::{CompressionType, SerializationType};
use crate::{compress, formats};

/// Values whose encoded size is at least this many bytes are compressed (when a compression is
/// configured).
pub const DEFAULT_COMPRESSION_THRESHOLD: usize = 1024;

/// The default cap on a decompressed value: 64 MiB.
pub const DEFAULT_MAX_DECOMPRESSED_SIZE: usize = 64 * 1024 * 1024;

/// Encodes values in a format, compresses large ones, and wraps them in the self-describing
/// envelope (see the [crate docs](crate) for the layout); decodes whatever any configuration
/// wrote.
///
/// Cheap to clone (a few words), `Send + Sync`. Implements [`Codec`], so it plugs into
/// [`ncm_cache_core::Cache`] and every backend.
///
/// - **Envelope mode** (default): every value starts with a 5-byte header (9 when compressed)
///   naming format and compression. A reader decodes any envelope whatever its own
///   configuration (if the format's feature is compiled in), so changing the codec never
///   misreads old data. Bytes without the envelope magic are decoded as the configured format,
///   so raw values written by other programs still read.
/// - **Raw mode** ([`SerializerBuilder::raw`]): the bare format bytes, uncompressed — exactly
///   what Python's `json`, `msgpack`, `cbor2` or `pickle` read and write.
///
/// Decoding never panics: corrupt, truncated, foreign or unknown bytes give a [`CodecError`];
/// a value that would decompress past [`max_decompressed_size`](Self::max_decompressed_size)
/// is rejected with [`CodecErrorKind::TooLarge`] without allocating it.
///
/// ```
/// use ncm_cache_codec::{CompressionType, SerializationType, Serializer};
/// use ncm_cache_core::Codec;
///
/// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
/// struct User { id: u64, name: String }
///
/// let codec = Serializer::builder()
///     .format(SerializationType::Json)
///     .compression(CompressionType::None)
///     .build()?;
/// let user = User { id: 7, name: "Zoë".into() };
/// let bytes = codec.encode(&user)?;
/// assert_eq!(&bytes[..5], &[0xC1, 0x4E, 1, 1, 0]); // magic, version, json, none
/// assert_eq!(codec.decode::<User>(&bytes)?, user);
///
/// // Raw mode: the bare JSON text, for other programs.
/// let raw = Serializer::builder().raw(true).build()?;
/// assert_eq!(&raw.encode(&user)?[..], r#"{"id":7,"name":"Zoë"}"#.as_bytes());
/// // Either reads the other's output.
/// assert_eq!(codec.decode::<User>(&raw.encode(&user)?)?, user);
/// assert_eq!(raw.decode::<User>(&bytes)?, user);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serializer {
    format: SerializationType,
    compression: CompressionType,
    level: i32,
    threshold: usize,
    max_decompressed: usize,
    raw: bool,
}

impl Default for Serializer {
    /// JSON in the envelope, no compression.
    fn default() -> Self {
        Self {
            format: SerializationType::Json,
            compression: CompressionType::None,
            level: 0,
            threshold: DEFAULT_COMPRESSION_THRESHOLD,
            max_decompressed: DEFAULT_MAX_DECOMPRESSED_SIZE,
            raw: false,
        }
    }
}

impl Serializer {
    /// A builder starting from [`Serializer::default`].
    pub fn builder() -> SerializerBuilder {
        SerializerBuilder::default()
    }

    /// The format values are written in.
    pub fn format(&self) -> SerializationType {
        self.format
    }

    /// The compression applied to values at or above the threshold.
    pub fn compression(&self) -> CompressionType {
        self.compression
    }

    /// The compression level in effect.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Encoded values smaller than this are stored uncompressed.
    pub fn compression_threshold(&self) -> usize {
        self.threshold
    }

    /// The largest decompressed value accepted.
    pub fn max_decompressed_size(&self) -> usize {
        self.max_decompressed
    }

    /// `true` in raw mode (bare format bytes, no envelope, no compression).
    pub fn is_raw(&self) -> bool {
        self.raw
    }

    /// Encodes a value into a `Vec` (what [`Codec::encode`] wraps in [`Bytes`]).
    pub fn encode_to_vec<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(128);
        if self.raw {
            formats::encode_into(self.format, value, &mut out)?;
            return Ok(out);
        }
        out.extend_from_slice(&envelope::short_header(self.format));
        formats::encode_into(self.format, value, &mut out)?;
        let payload = &out[SHORT_HEADER..];
        if self.compression == CompressionType::None
            || payload.len() < self.threshold
            // Never write what a reader with the same cap would reject.
            || payload.len() > self.max_decompressed
        {
            return Ok(out);
        }
        let Ok(declared) = u32::try_from(payload.len()) else {
            return Ok(out);
        };
        let mut compressed = Vec::with_capacity(LONG_HEADER + payload.len() / 2);
        compressed.extend_from_slice(&envelope::long_header(
            self.format,
            self.compression,
            declared,
        ));
        compress::compress(self.compression, self.level, payload, &mut compressed)?;
        // Keep the compressed form only when it is actually smaller.
        Ok(if compressed.len() < out.len() {
            compressed
        } else {
            out
        })
    }

    /// Decodes bytes written by any configuration (or raw bytes in the configured format).
    pub fn decode_slice<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let fast_json = self.format == SerializationType::SimdJson;
        let budget = u64::try_from(self.max_decompressed).unwrap_or(u64::MAX);
        let Some(header) = envelope::inspect(bytes)? else {
            return formats::decode(self.format, bytes, fast_json, budget);
        };
        let payload = bytes.get(header.header_len..).unwrap_or_default();
        let Some(declared) = header.uncompressed_len else {
            return formats::decode(header.format, payload, fast_json, budget);
        };
        if !header.compression.is_enabled() {
            return Err(compress::unsupported(header.compression));
        }
        let declared = usize::try_from(declared).unwrap_or(usize::MAX);
        if declared > self.max_decompressed {
            return Err(CodecError::new(
                CodecErrorKind::TooLarge,
                header.compression.name(),
                format!(
                    "value declares {declared} bytes decompressed, above the cap of {} bytes",
                    self.max_decompressed
                ),
            ));
        }
        let data = compress::decompress(header.compression, payload, declared)?;
        formats::decode(header.format, &data, fast_json, budget)
    }
}

impl Codec for Serializer {
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
        self.encode_to_vec(value).map(Bytes::from)
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        self.decode_slice(bytes)
    }
}

/// Builds a [`Serializer`]; [`build`](Self::build) checks that the format and compression are
/// compiled in and that the level is valid.
///
/// ```
/// use ncm_cache_codec::{CompressionType, SerializationType, Serializer};
///
/// let codec = Serializer::builder()
///     .format(SerializationType::Json)
///     .compression_threshold(4096)
///     .max_decompressed_size(8 << 20)
///     .build()
///     .unwrap();
/// assert_eq!(codec.compression_threshold(), 4096);
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct SerializerBuilder {
    inner: Serializer,
    level: Option<i32>,
}

impl SerializerBuilder {
    /// The format to write (default JSON).
    pub fn format(mut self, format: SerializationType) -> Self {
        self.inner.format = format;
        self
    }

    /// The compression for values at or above the threshold (default none).
    pub fn compression(mut self, compression: CompressionType) -> Self {
        self.inner.compression = compression;
        self
    }

    /// The compression level (default: the algorithm's, see [`CompressionType::default_level`]).
    pub fn level(mut self, level: i32) -> Self {
        self.level = Some(level);
        self
    }

    /// Compress only values whose encoded size is at least `bytes` (default 1024).
    pub fn compression_threshold(mut self, bytes: usize) -> Self {
        self.inner.threshold = bytes;
        self
    }

    /// Reject values that would decompress past `bytes` (default 64 MiB). Also bounds how far
    /// a pickle may expand through shared (memo) references.
    pub fn max_decompressed_size(mut self, bytes: usize) -> Self {
        self.inner.max_decompressed = bytes;
        self
    }

    /// Raw mode: write the bare format, without envelope or compression (default off).
    pub fn raw(mut self, raw: bool) -> Self {
        self.inner.raw = raw;
        self
    }

    /// Checks the configuration and builds the serializer.
    ///
    /// Fails with [`CacheError::Config`] when the format or compression is not compiled in
    /// (the message names the cargo feature), when the level is out of range, or when raw mode
    /// is combined with a compression.
    pub fn build(self) -> Result<Serializer, CacheError> {
        let mut s = self.inner;
        if !s.format.is_enabled() {
            return Err(CacheError::Config(format!(
                "serialization {} needs the `{}` cargo feature of ncm-cache-codec",
                s.format,
                s.format.feature()
            )));
        }
        if let Some(feature) = s.compression.feature()
            && !s.compression.is_enabled()
        {
            return Err(CacheError::Config(format!(
                "compression {} needs the `{feature}` cargo feature of ncm-cache-codec",
                s.compression
            )));
        }
        if s.raw && s.compression != CompressionType::None {
            return Err(CacheError::Config(format!(
                "raw mode writes bare {} bytes and cannot compress (compression {})",
                s.format, s.compression
            )));
        }
        let level = self.level.unwrap_or(s.compression.default_level());
        s.compression.validate_level(level)?;
        s.level = level;
        Ok(s)
    }
}

/// Builds serializers by type, like the original's `SerializerFactory.create_serializer`.
///
/// ```
/// use ncm_cache_codec::{CompressionType, SerializationType, SerializerFactory};
/// use ncm_cache_core::Codec;
///
/// let codec = SerializerFactory::create_serializer(
///     SerializationType::Json,
///     CompressionType::None,
///     None,
/// )?;
/// assert_eq!(codec.decode::<Vec<u8>>(&codec.encode(&vec![1u8, 2])?)?, vec![1, 2]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SerializerFactory;

impl SerializerFactory {
    /// A serializer writing `serialization`, compressing values of at least
    /// [`DEFAULT_COMPRESSION_THRESHOLD`] bytes with `compression` at `level` (the algorithm's
    /// default when `None`).
    ///
    /// Fails with [`CacheError::Config`] naming the cargo feature when the format or the
    /// compression is not compiled in, or when the level is out of range.
    pub fn create_serializer(
        serialization: SerializationType,
        compression: CompressionType,
        level: Option<i32>,
    ) -> Result<Serializer, CacheError> {
        let builder = Serializer::builder()
            .format(serialization)
            .compression(compression);
        match level {
            Some(level) => builder.level(level),
            None => builder,
        }
        .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_validates_level_and_raw_compression() {
        let err = Serializer::builder()
            .compression(CompressionType::Gzip)
            .level(42)
            .build();
        assert!(matches!(err, Err(CacheError::Config(_))));
        let err = Serializer::builder()
            .raw(true)
            .compression(CompressionType::Zstd)
            .build();
        assert!(matches!(err, Err(CacheError::Config(_))));
        let default = Serializer::default();
        assert_eq!(default.format(), SerializationType::Json);
        assert_eq!(default.compression(), CompressionType::None);
        assert_eq!(
            default.compression_threshold(),
            DEFAULT_COMPRESSION_THRESHOLD
        );
        assert_eq!(
            default.max_decompressed_size(),
            DEFAULT_MAX_DECOMPRESSED_SIZE
        );
        assert!(!default.is_raw());
    }

    /// A disabled format or compression is a config error naming the cargo feature.
    #[test]
    fn disabled_features_are_named() {
        for format in SerializationType::ALL {
            let result = SerializerFactory::create_serializer(format, CompressionType::None, None);
            match result {
                Ok(_) => assert!(format.is_enabled()),
                Err(CacheError::Config(msg)) => {
                    assert!(!format.is_enabled());
                    assert!(msg.contains(format.feature()), "{msg}");
                }
                Err(other) => panic!("unexpected error {other}"),
            }
        }
        for compression in CompressionType::ALL {
            let result =
                SerializerFactory::create_serializer(SerializationType::Json, compression, None);
            match result {
                Ok(_) => assert!(compression.is_enabled()),
                Err(CacheError::Config(msg)) => {
                    assert!(!compression.is_enabled());
                    assert!(msg.contains(compression.feature().unwrap_or("?")), "{msg}");
                }
                Err(other) => panic!("unexpected error {other}"),
            }
        }
    }

    /// Reading an envelope whose compression or format is not compiled in is `Unsupported`,
    /// naming the feature.
    #[test]
    fn envelopes_needing_disabled_features_are_unsupported() {
        let reader = Serializer::default();
        for compression in [
            CompressionType::Gzip,
            CompressionType::Lz4,
            CompressionType::Zstd,
        ] {
            if compression.is_enabled() {
                continue;
            }
            let mut bytes = envelope::long_header(SerializationType::Json, compression, 2).to_vec();
            bytes.extend_from_slice(b"[]");
            let err = reader.decode::<Vec<u8>>(&bytes).unwrap_err();
            assert_eq!(err.kind(), CodecErrorKind::Unsupported);
            assert!(err.message().contains(compression.feature().unwrap_or("?")));
        }
        for format in [
            SerializationType::Cbor,
            SerializationType::MsgPack,
            SerializationType::Pickle,
        ] {
            if format.is_enabled() {
                continue;
            }
            let mut bytes = envelope::short_header(format).to_vec();
            bytes.push(0x80);
            let err = reader.decode::<Vec<u8>>(&bytes).unwrap_err();
            assert_eq!(err.kind(), CodecErrorKind::Unsupported);
            assert!(err.message().contains(format.feature()), "{err}");
        }
    }

    /// The JSON tags decode with either JSON implementation.
    #[test]
    fn both_json_tags_decode() {
        let reader = Serializer::default();
        for format in [SerializationType::Json, SerializationType::SimdJson] {
            let mut bytes = envelope::short_header(format).to_vec();
            bytes.extend_from_slice(b"[1,2]");
            assert_eq!(reader.decode::<Vec<u8>>(&bytes).unwrap(), vec![1, 2]);
        }
    }
}
