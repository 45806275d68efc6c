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

    /// Serializes a value that will be stored under `key`: the parts of the stored key, which
    /// concatenated give the key as the store sees it (for example the backend's prefix and the
    /// cache key). A codec that authenticates values binds them to the key here (a signing
    /// `Serializer` of `ncm-cache-codec` does), so that a value copied to another key does not
    /// read there. The default ignores the key and calls [`encode`](Self::encode).
    ///
    /// Every path of this workspace that stores bytes or reads stored bytes goes through
    /// `encode_for` / [`decode_for`](Self::decode_for) (values only passed between tasks in
    /// memory, e.g. a single-flight's shared result, may use `encode` / `decode`).
    ///
    /// ```
    /// # use ncm_cache_core::Codec;
    /// # #[derive(Debug, Clone, Copy)] struct PlainJson;
    /// # impl Codec for PlainJson {
    /// #   fn encode<T: serde::Serialize + ?Sized>(&self, v: &T) -> Result<bytes::Bytes, ncm_cache_core::CodecError> { Ok(serde_json::to_vec(v).unwrap().into()) }
    /// #   fn decode<T: serde::de::DeserializeOwned>(&self, b: &[u8]) -> Result<T, ncm_cache_core::CodecError> { Ok(serde_json::from_slice(b).unwrap()) }
    /// # }
    /// // Without an override, the key changes nothing.
    /// let bytes = PlainJson.encode_for(&["app:", "user:1"], &7).unwrap();
    /// assert_eq!(bytes, PlainJson.encode(&7).unwrap());
    /// assert_eq!(PlainJson.decode_for::<i32>(&["app:", "user:2"], &bytes).unwrap(), 7);
    /// ```
    fn encode_for<T: Serialize + ?Sized>(
        &self,
        key: &[&str],
        value: &T,
    ) -> Result<Bytes, CodecError> {
        let _ = key;
        self.encode(value)
    }

    /// [`encode_for`](Self::encode_for) without compression (a per-call "no compression", e.g.
    /// for values read often and already small or incompressible). Whatever the codec writes
    /// must still decode with [`decode_for`](Self::decode_for). The default is `encode_for`
    /// (a codec that never compresses has nothing to skip).
    fn encode_uncompressed_for<T: Serialize + ?Sized>(
        &self,
        key: &[&str],
        value: &T,
    ) -> Result<Bytes, CodecError> {
        self.encode_for(key, value)
    }

    /// Deserializes bytes read from `key` (its parts, as for [`encode_for`](Self::encode_for)).
    /// The default ignores the key and calls [`decode`](Self::decode).
    fn decode_for<T: DeserializeOwned>(&self, key: &[&str], bytes: &[u8]) -> Result<T, CodecError> {
        let _ = key;
        self.decode(bytes)
    }
}

impl<C: Codec> Codec for std::sync::Arc<C> {
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
        (**self).encode(value)
    }
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        (**self).decode(bytes)
    }
    fn encode_for<T: Serialize + ?Sized>(
        &self,
        key: &[&str],
        value: &T,
    ) -> Result<Bytes, CodecError> {
        (**self).encode_for(key, value)
    }
    fn encode_uncompressed_for<T: Serialize + ?Sized>(
        &self,
        key: &[&str],
        value: &T,
    ) -> Result<Bytes, CodecError> {
        (**self).encode_uncompressed_for(key, value)
    }
    fn decode_for<T: DeserializeOwned>(&self, key: &[&str], bytes: &[u8]) -> Result<T, CodecError> {
        (**self).decode_for(key, bytes)
    }
}
