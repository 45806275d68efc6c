//! The codec trait: typed values to bytes and back.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;

/// Turns typed values into stored bytes and back. Synchronous: bytes in, bytes out.
///
/// Implementations live in `ncm-cache-codec` (JSON, fast JSON, CBOR, MessagePack, Pickle, with
/// gzip / LZ4 / Zstd inside a self-describing envelope). Decoding must never panic on foreign or
/// corrupt input: it returns a [`CodecError`].
///
/// ```
/// use bytes::Bytes;
/// use serde::{Serialize, de::DeserializeOwned};
/// use ncm_cache_core::{Codec, CodecError, CodecErrorKind};
///
/// /// A codec for tests: JSON without an envelope.
/// #[derive(Debug, Clone, Copy)]
/// struct PlainJson;
///
/// impl Codec for PlainJson {
///     fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
///         serde_json::to_vec(value)
///             .map(Bytes::from)
///             .map_err(|e| CodecError::with_source(CodecErrorKind::Encode, "json", e))
///     }
///     fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
///         serde_json::from_slice(bytes)
///             .map_err(|e| CodecError::with_source(CodecErrorKind::Decode, "json", e))
///     }
/// }
///
/// let bytes = PlainJson.encode(&vec![1, 2, 3]).unwrap();
/// assert_eq!(&bytes[..], b"[1,2,3]");
/// assert_eq!(PlainJson.decode::<Vec<i32>>(&bytes).unwrap(), vec![1, 2, 3]);
/// assert!(PlainJson.decode::<Vec<i32>>(b"\xff").is_err());
/// ```
pub trait Codec: Send + Sync + 'static {
    /// Serializes a value into the bytes to store.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError>;

    /// Deserializes stored bytes.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

impl<C: Codec> Codec for std::sync::Arc<C> {
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
        (**self).encode(value)
    }
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        (**self).decode(bytes)
    }
}
