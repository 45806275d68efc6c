//! [`CodecConfig`]: the codec part of a cache configuration, deserializable from files.

use ncm_cache_core::CacheError;
use serde::{Deserialize, Serialize};

use crate::serializer::{DEFAULT_COMPRESSION_THRESHOLD, DEFAULT_MAX_DECOMPRESSED_SIZE, Serializer};
use crate::types::{CompressionType, SerializationType};

/// The codec settings of a cache config (the original's `serialization`, `compression` and
/// compression level, plus the threshold, the decompression cap and raw mode). Every field has
/// a default, so a config names only what it changes; it can be `#[serde(flatten)]`ed into a
/// backend's config.
///
/// ```
/// use ncm_cache_codec::{CodecConfig, CompressionType, SerializationType};
///
/// let config: CodecConfig = serde_json::from_str(
///     r#"{"serialization": "msgpack", "compression": "zstd", "compression_level": 5}"#,
/// ).unwrap();
/// assert_eq!(config.serialization, SerializationType::MsgPack);
/// assert_eq!(config.compression_threshold, 1024);
/// # #[cfg(all(feature = "msgpack", feature = "zstd"))]
/// let codec = config.build().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct CodecConfig {
    /// The format values are written in.
    pub serialization: SerializationType,
    /// The compression for values at or above `compression_threshold` bytes.
    pub compression: CompressionType,
    /// The compression level; `None` for the algorithm's default.
    pub compression_level: Option<i32>,
    /// Encoded values smaller than this are stored uncompressed.
    pub compression_threshold: usize,
    /// The largest decompressed value a reader accepts.
    pub max_decompressed_size: usize,
    /// Write bare format bytes (no envelope, no compression) for other programs.
    pub raw: bool,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            serialization: SerializationType::Json,
            compression: CompressionType::None,
            compression_level: None,
            compression_threshold: DEFAULT_COMPRESSION_THRESHOLD,
            max_decompressed_size: DEFAULT_MAX_DECOMPRESSED_SIZE,
            raw: false,
        }
    }
}

impl CodecConfig {
    /// Builds the serializer (see [`SerializerBuilder::build`](crate::SerializerBuilder::build)
    /// for the errors).
    pub fn build(&self) -> Result<Serializer, CacheError> {
        let builder = Serializer::builder()
            .format(self.serialization)
            .compression(self.compression)
            .compression_threshold(self.compression_threshold)
            .max_decompressed_size(self.max_decompressed_size)
            .raw(self.raw);
        match self.compression_level {
            Some(level) => builder.level(level),
            None => builder,
        }
        .build()
    }
}
