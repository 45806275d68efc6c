//! [`Serializer`]: the codec users hold, its builder, and [`SerializerFactory`].

use bytes::Bytes;
use ncm_cache_core::{CacheError, Codec, CodecError, CodecErrorKind};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::{self, KEY_BOUND_VERSION, LONG_HEADER, SHORT_HEADER, SIGNED_VERSION};
use crate::signing::{SecretBytes, SignatureMode, SigningKeys};
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
/// - **Signed** ([`SerializerBuilder::signing_key`]): every value is written in a signed
///   envelope (HMAC-SHA256 tag appended), and only values signed with one of the configured
///   keys are read; see the builder method for the exact semantics.
///
/// Decoding never panics: corrupt, truncated, foreign or unknown bytes give a [`CodecError`];
/// a value that would decompress past [`max_decompressed_size`](Self::max_decompressed_size)
/// is rejected with [`CodecErrorKind::TooLarge`] without allocating it.
///
/// `Debug` never prints signing keys.
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
    signing: Option<SigningKeys>,
    signature_mode: SignatureMode,
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
            signing: None,
            signature_mode: SignatureMode::KeyBound,
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

    /// `true` when values are signed on write and verified on read
    /// ([`SerializerBuilder::signing_key`]).
    pub fn is_signing(&self) -> bool {
        self.signing.is_some()
    }

    /// How signatures are bound to keys ([`SerializerBuilder::signature_mode`]).
    pub fn signature_mode(&self) -> SignatureMode {
        self.signature_mode
    }

    /// Encodes a value into a `Vec` (what [`Codec::encode`] wraps in [`Bytes`]). A signing
    /// serializer writes an unbound signature (version 2): no key is known here; the cache
    /// paths use [`encode_vec_for`](Self::encode_vec_for).
    pub fn encode_to_vec<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        self.encode_signed(value, None)
    }

    /// Encodes a value stored under `key` (its parts; see [`Codec::encode_for`]) into a `Vec`:
    /// a signing serializer binds the signature to the key (version 3) unless its
    /// [`SignatureMode`] is [`Unbound`](SignatureMode::Unbound).
    pub fn encode_vec_for<T: Serialize + ?Sized>(
        &self,
        key: &[&str],
        value: &T,
    ) -> Result<Vec<u8>, CodecError> {
        self.encode_signed(value, Some(key))
    }

    fn encode_signed<T: Serialize + ?Sized>(
        &self,
        value: &T,
        key: Option<&[&str]>,
    ) -> Result<Vec<u8>, CodecError> {
        self.encode_signed_with(value, key, true)
    }

    fn encode_signed_with<T: Serialize + ?Sized>(
        &self,
        value: &T,
        key: Option<&[&str]>,
        compress: bool,
    ) -> Result<Vec<u8>, CodecError> {
        let mut out = self.encode_unsigned(value, compress)?;
        if let Some(keys) = &self.signing {
            let key = key.filter(|_| self.signature_mode.binds());
            // `build` rejects raw mode with a key, so `out` is an envelope: mark it signed, then
            // append the tag over everything before it (the version byte included).
            if let Some(version) = out.get_mut(2) {
                *version = if key.is_some() {
                    KEY_BOUND_VERSION
                } else {
                    SIGNED_VERSION
                };
            }
            keys.append_tag(&mut out, key);
        }
        Ok(out)
    }

    /// The raw bytes or the unsigned (version 1) envelope of a value.
    fn encode_unsigned<T: Serialize + ?Sized>(
        &self,
        value: &T,
        compress: bool,
    ) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(128);
        if self.raw {
            formats::encode_into(self.format, value, &mut out)?;
            self.check_encoded_size(out.len())?;
            return Ok(out);
        }
        out.extend_from_slice(&envelope::short_header(self.format));
        formats::encode_into(self.format, value, &mut out)?;
        let payload = &out[SHORT_HEADER..];
        // Never write what a reader with the same cap would reject.
        self.check_encoded_size(payload.len())?;
        if !compress || self.compression == CompressionType::None || payload.len() < self.threshold
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
    ///
    /// With a signing key, only values signed with one of the keys decode; everything else is
    /// [`CodecErrorKind::Tampered`] (see [`SerializerBuilder::signing_key`]).
    pub fn decode_slice<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        if let Some(keys) = &self.signing {
            // Before anything else looks at the bytes. Without a key only unbound signatures
            // can be checked.
            keys.verify(bytes, None, true)?;
        }
        self.decode_verified(bytes)
    }

    /// Decodes bytes read from `key` (its parts; see [`Codec::decode_for`]). A signing
    /// serializer accepts a key-bound signature only for that key, and an unbound one only in
    /// [`SignatureMode::Migrating`] or [`SignatureMode::Unbound`].
    pub fn decode_slice_for<T: DeserializeOwned>(
        &self,
        key: &[&str],
        bytes: &[u8],
    ) -> Result<T, CodecError> {
        if let Some(keys) = &self.signing {
            keys.verify(bytes, Some(key), self.signature_mode.accepts_unbound())?;
        }
        self.decode_verified(bytes)
    }

    /// Decodes once the signature (if any is required) has been checked.
    fn decode_verified<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let fast_json = self.format == SerializationType::SimdJson;
        let budget = u64::try_from(self.max_decompressed).unwrap_or(u64::MAX);
        let Some(header) = envelope::inspect(bytes)? else {
            if let Some(frame) = compress::foreign_frame(bytes) {
                // A standard compressed frame without our envelope (what Python's
                // `gzip.compress`, `zlib.compress` or `zstandard` write around a value),
                // bounded by the cap. Bytes that only look like a frame (a raw CBOR text string
                // can start like zlib) are read as the raw format instead.
                match compress::decompress_foreign(frame, bytes, self.max_decompressed) {
                    Ok(data) => return formats::decode(self.format, &data, fast_json, budget),
                    Err(e) => {
                        if self.check_size(bytes.len(), "raw").is_ok()
                            && let Ok(value) =
                                formats::decode(self.format, bytes, fast_json, budget)
                        {
                            return Ok(value);
                        }
                        return Err(e);
                    }
                }
            }
            self.check_size(bytes.len(), "raw")?;
            return formats::decode(self.format, bytes, fast_json, budget);
        };
        let payload = header.payload(bytes);
        let Some(declared) = header.uncompressed_len else {
            self.check_size(payload.len(), header.format.name())?;
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

    /// A payload above the cap is refused on write: readers with the same cap would refuse it.
    fn check_encoded_size(&self, len: usize) -> Result<(), CodecError> {
        if len > self.max_decompressed {
            return Err(CodecError::new(
                CodecErrorKind::Encode,
                self.format.name(),
                format!(
                    "the encoded value is {len} bytes, above `max_decompressed_size` ({} \
                     bytes): readers would refuse it; raise the cap on every reader and writer",
                    self.max_decompressed
                ),
            ));
        }
        Ok(())
    }

    /// The cap applies to every payload, compressed or not.
    fn check_size(&self, len: usize, what: &'static str) -> Result<(), CodecError> {
        if len > self.max_decompressed {
            return Err(CodecError::new(
                CodecErrorKind::TooLarge,
                what,
                format!(
                    "payload of {len} bytes is above the cap of {} bytes \
                     (`max_decompressed_size`)",
                    self.max_decompressed
                ),
            ));
        }
        Ok(())
    }
}

impl Codec for Serializer {
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
        self.encode_to_vec(value).map(Bytes::from)
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        self.decode_slice(bytes)
    }

    fn encode_for<T: Serialize + ?Sized>(
        &self,
        key: &[&str],
        value: &T,
    ) -> Result<Bytes, CodecError> {
        self.encode_vec_for(key, value).map(Bytes::from)
    }

    fn encode_uncompressed_for<T: Serialize + ?Sized>(
        &self,
        key: &[&str],
        value: &T,
    ) -> Result<Bytes, CodecError> {
        self.encode_signed_with(value, Some(key), false)
            .map(Bytes::from)
    }

    fn decode_for<T: DeserializeOwned>(&self, key: &[&str], bytes: &[u8]) -> Result<T, CodecError> {
        self.decode_slice_for(key, bytes)
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
    signing_key: Option<SecretBytes>,
    verification_keys: Vec<SecretBytes>,
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

    /// Reject values whose payload is larger than `bytes` (default 64 MiB): compressed values
    /// whose declared or actual decompressed size is larger (before decompressing), and
    /// uncompressed or raw payloads of that size. Such a value reads as
    /// [`CodecErrorKind::TooLarge`] (a miss; the entry is left, since a reader with a larger cap
    /// reads it). Values this large are never written compressed. Also bounds how far a pickle
    /// may expand through shared (memo) references.
    pub fn max_decompressed_size(mut self, bytes: usize) -> Self {
        self.inner.max_decompressed = bytes;
        self
    }

    /// Raw mode: write the bare format, without envelope or compression (default off).
    pub fn raw(mut self, raw: bool) -> Self {
        self.inner.raw = raw;
        self
    }

    /// Signs every value written with HMAC-SHA256 under `key`, and reads only values signed
    /// with `key` (or one of the [`verification_keys`](Self::verification_keys)): a defence
    /// against cache poisoning by anyone who can write to the cache's store but does not hold
    /// the key. Default: no key.
    ///
    /// The key is used as the bytes given (a base64 or hex string is used as its text, not
    /// decoded); it must be at least [`MIN_SIGNING_KEY_LEN`](crate::MIN_SIGNING_KEY_LEN)
    /// (16) bytes, else [`build`](Self::build) fails with [`CacheError::Config`]. Use a random
    /// secret of 32 bytes or more, shared by every reader and writer of the cache.
    ///
    /// **With a key:**
    /// - every value a cache writes is a signed envelope bound to the key it is stored under
    ///   (version 3: the usual envelope, then a 32-byte tag over the stored key, the header and
    ///   the payload; see the [crate docs](crate)). [`Codec::encode`], which knows no key,
    ///   writes version 2 (tag over header and payload only);
    /// - a value decodes only when it is a signed envelope whose tag verifies (in constant time)
    ///   under one of the keys — and, read through a cache ([`Codec::decode_for`]), for the key
    ///   it was read from. Everything else — unsigned envelopes, raw or foreign bytes, values
    ///   signed with another secret, a signed value copied to another key, any altered,
    ///   truncated or extended value — fails with [`CodecErrorKind::Tampered`], before the
    ///   payload is parsed or decompressed. The cache read paths treat that as damage: a miss,
    ///   counted in `CacheStats::codec_errors`, and the entry is deleted;
    /// - raw mode is refused by `build` (raw values cannot carry a tag), and so is reading raw
    ///   values written by other programs.
    ///
    /// **Without a key**, signed values still decode: the tag is skipped, not checked (there is
    /// nothing to check it with), so readers can be upgraded before writers start signing.
    /// Rollout, rotation and the upgrade from unbound signatures are step lists in
    /// `docs/configuration.md` ("Signing"); each is checked by a test that runs instances of
    /// both steps side by side. In short, rotation: (1) every instance verifies the new key
    /// (`verification_keys`) while still signing with the old one; (2) every instance signs
    /// with the new key and verifies the old one; (3) after the longest TTL, drop the old key.
    /// Skipping step 1 makes the instances not yet rotated delete what the rotated ones write.
    ///
    /// **Not covered:** signing is not encryption (anyone who can read the store reads the
    /// payloads); the tag does not cover the TTL nor the time of writing, so a writer without
    /// the key can still delete entries or put back an older value of the same key.
    ///
    /// ```
    /// use ncm_cache_codec::Serializer;
    /// use ncm_cache_core::{Codec, CodecErrorKind};
    ///
    /// let signed = Serializer::builder()
    ///     .signing_key("0123456789abcdef-a-long-random-secret")
    ///     .build()?;
    /// let bytes = signed.encode(&"hello")?;
    /// assert_eq!(bytes[2], 2); // envelope version 2: signed
    /// assert_eq!(signed.decode::<String>(&bytes)?, "hello");
    ///
    /// // A value written without the key is rejected...
    /// let plain = Serializer::default();
    /// let forged = plain.encode(&"evil")?;
    /// let err = signed.decode::<String>(&forged).unwrap_err();
    /// assert_eq!(err.kind(), CodecErrorKind::Tampered);
    /// // ...and so is any altered byte of a signed one.
    /// let mut flipped = bytes.to_vec();
    /// flipped[7] ^= 1;
    /// assert_eq!(signed.decode::<String>(&flipped).unwrap_err().kind(), CodecErrorKind::Tampered);
    ///
    /// // A reader without a key still reads signed values (tag not checked).
    /// assert_eq!(plain.decode::<String>(&bytes)?, "hello");
    ///
    /// // Keys shorter than 16 bytes are refused.
    /// assert!(Serializer::builder().signing_key("short").build().is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn signing_key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.signing_key = Some(SecretBytes(key.as_ref().to_vec()));
        self
    }

    /// Extra keys accepted on read, besides the [`signing_key`](Self::signing_key) (which is
    /// always tried first): for key rotation. Replaces any keys set before. Each must be at
    /// least 16 bytes; `build` fails when these are set without a signing key.
    ///
    /// ```
    /// use ncm_cache_codec::Serializer;
    /// use ncm_cache_core::Codec;
    ///
    /// let old = Serializer::builder().signing_key("the-old-key-0123456789").build()?;
    /// let rotated = Serializer::builder()
    ///     .signing_key("the-new-key-0123456789")
    ///     .verification_keys(["the-old-key-0123456789"])
    ///     .build()?;
    /// // Values signed with the old key still read; new values are signed with the new key.
    /// assert_eq!(rotated.decode::<u32>(&old.encode(&7u32)?)?, 7);
    /// assert!(old.decode::<u32>(&rotated.encode(&7u32)?).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn verification_keys<I, K>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        self.verification_keys = keys
            .into_iter()
            .map(|k| SecretBytes(k.as_ref().to_vec()))
            .collect();
        self
    }

    /// How signatures are bound to the keys values are stored under (default
    /// [`SignatureMode::KeyBound`]); only meaningful with a [`signing_key`](Self::signing_key).
    pub fn signature_mode(mut self, mode: SignatureMode) -> Self {
        self.inner.signature_mode = mode;
        self
    }

    /// Checks the configuration and builds the serializer.
    ///
    /// Fails with [`CacheError::Config`] when the format or compression is not compiled in
    /// (the message names the cargo feature), when the level is out of range, when raw mode
    /// is combined with a compression or a signing key, when a signing or verification key is
    /// shorter than 16 bytes, or when verification keys are given without a signing key.
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
        s.signing = match &self.signing_key {
            Some(_) if s.raw => {
                return Err(CacheError::Config(
                    "raw mode writes bare bytes and cannot carry a signature; drop `raw` or the \
                     signing key"
                        .into(),
                ));
            }
            Some(key) => Some(SigningKeys::new(key, &self.verification_keys)?),
            None if !self.verification_keys.is_empty() => {
                return Err(CacheError::Config(
                    "verification_keys are set without a signing_key; set the signing key too \
                     (a reader without any key already reads signed values, unverified)"
                        .into(),
                ));
            }
            None => None,
        };
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

    const KEY: &str = "test-signing-key-0123456789abcdef";

    fn signed() -> Serializer {
        Serializer::builder().signing_key(KEY).build().unwrap()
    }

    /// Rejected as forged — or, when the change made the version byte name a newer envelope
    /// version, as unsupported (a miss either way; never served).
    fn tampered<T: DeserializeOwned + std::fmt::Debug>(codec: &Serializer, bytes: &[u8]) {
        let err = codec.decode::<T>(bytes).unwrap_err();
        let newer = bytes.get(2).is_some_and(|&v| v > KEY_BOUND_VERSION);
        let expected = if newer && bytes.starts_with(&crate::MAGIC) {
            CodecErrorKind::Unsupported
        } else {
            CodecErrorKind::Tampered
        };
        assert_eq!(err.kind(), expected, "{err}");
    }

    /// Signed values round-trip in every compiled-in format and compression, as a version-2
    /// envelope ending in a 32-byte tag; an unkeyed reader reads them too (tag skipped).
    #[test]
    fn signed_values_round_trip_in_every_format_and_compression() {
        let value: Vec<String> = (0..300).map(|i| format!("item-{i}")).collect();
        let unkeyed = Serializer::default();
        for format in SerializationType::ALL
            .into_iter()
            .filter(|f| f.is_enabled())
        {
            for compression in CompressionType::ALL.into_iter().filter(|c| c.is_enabled()) {
                let codec = Serializer::builder()
                    .format(format)
                    .compression(compression)
                    .compression_threshold(64)
                    .signing_key(KEY)
                    .build()
                    .unwrap();
                assert!(codec.is_signing());
                let bytes = codec.encode(&value).unwrap();
                let header = envelope::inspect(&bytes).unwrap().unwrap();
                assert!(header.is_signed(), "{format} {compression}");
                assert_eq!(header.format.tag(), format.tag());
                assert_eq!(header.compression, compression);
                assert_eq!(codec.decode::<Vec<String>>(&bytes).unwrap(), value);
                assert_eq!(unkeyed.decode::<Vec<String>>(&bytes).unwrap(), value);
                // The same value unsigned is the same bytes, version 1, without the tag.
                let plain = Serializer::builder()
                    .format(format)
                    .compression(compression)
                    .compression_threshold(64)
                    .build()
                    .unwrap()
                    .encode(&value)
                    .unwrap();
                assert_eq!(bytes.len(), plain.len() + envelope::TAG_LEN);
                assert_eq!(bytes[2], SIGNED_VERSION);
                assert_eq!(bytes[3..plain.len()], plain[3..]);
            }
        }
    }

    /// Flipping any single bit of a signed value (header, payload or tag) is `Tampered`, and so
    /// are truncating and extending it.
    #[test]
    fn every_bit_flip_truncation_and_extension_is_tampered() {
        let codec = signed();
        let bytes = codec.encode(&("user", 42u32)).unwrap().to_vec();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut copy = bytes.clone();
                copy[i] ^= 1 << bit;
                tampered::<(String, u32)>(&codec, &copy);
            }
        }
        for len in 0..bytes.len() {
            tampered::<(String, u32)>(&codec, &bytes[..len]);
        }
        let mut longer = bytes.clone();
        longer.push(0);
        tampered::<(String, u32)>(&codec, &longer);
        assert_eq!(
            codec.decode::<(String, u32)>(&bytes).unwrap(),
            ("user".to_owned(), 42)
        );
    }

    /// With a key, unsigned envelopes, raw bytes and values signed with another key are
    /// `Tampered`.
    #[test]
    fn a_keyed_reader_rejects_everything_not_signed_with_its_keys() {
        let codec = signed();
        tampered::<String>(&codec, &Serializer::default().encode(&"x").unwrap());
        tampered::<String>(&codec, b"\"x\"");
        tampered::<String>(&codec, b"");
        tampered::<String>(&codec, &[0xC1, 0x4E]);
        let other = Serializer::builder()
            .signing_key("another-key-0123456789abcdef")
            .build()
            .unwrap();
        tampered::<String>(&codec, &other.encode(&"x").unwrap());
        // A forged version-2 envelope with a zero tag.
        let mut forged = envelope::short_header(SerializationType::Json).to_vec();
        forged[2] = SIGNED_VERSION;
        forged.extend_from_slice(b"\"x\"");
        forged.extend_from_slice(&[0; envelope::TAG_LEN]);
        tampered::<String>(&codec, &forged);
        // An unkeyed reader parses the forgery: only a keyed reader checks tags.
        assert_eq!(
            Serializer::default().decode::<String>(&forged).unwrap(),
            "x"
        );
    }

    /// Verification keys are accepted on read, in addition to the signing key.
    #[test]
    fn verification_keys_allow_rotation() {
        let old = signed();
        let new = Serializer::builder()
            .signing_key("the-new-signing-key-0123456789")
            .verification_keys([KEY])
            .build()
            .unwrap();
        assert_eq!(new.decode::<u8>(&old.encode(&1u8).unwrap()).unwrap(), 1);
        assert_eq!(new.decode::<u8>(&new.encode(&2u8).unwrap()).unwrap(), 2);
        tampered::<u8>(&old, &new.encode(&3u8).unwrap());
    }

    #[test]
    fn signing_configuration_errors() {
        let msg = |b: SerializerBuilder| match b.build() {
            Err(CacheError::Config(msg)) => msg,
            other => panic!("expected a config error, got {other:?}"),
        };
        let m = msg(Serializer::builder().signing_key("0123456789abcde"));
        assert!(
            m.contains("15 bytes") && m.contains("at least 32 bytes"),
            "{m}"
        );
        let m = msg(Serializer::builder().signing_key(KEY).raw(true));
        assert!(m.contains("raw"), "{m}");
        let m = msg(Serializer::builder().verification_keys([KEY]));
        assert!(m.contains("signing_key"), "{m}");
        let m = msg(Serializer::builder()
            .signing_key(KEY)
            .verification_keys(["short"]));
        assert!(m.contains("verification key #1"), "{m}");
        assert!(Serializer::builder().signing_key([7u8; 16]).build().is_ok());
    }

    /// `Debug` of the serializer and of its builder never shows a key; equality follows keys.
    #[test]
    fn keys_are_redacted_and_compared() {
        let builder = Serializer::builder()
            .signing_key("SECRET-signing-key-1234")
            .verification_keys(["SECRET-verify-key-5678"]);
        let debug = format!("{builder:?} {:?}", builder.clone().build().unwrap());
        assert!(
            !debug.contains("SECRET") && !debug.contains("1234"),
            "{debug}"
        );
        assert!(debug.contains("<redacted>"), "{debug}");
        assert_eq!(signed(), signed());
        assert_ne!(signed(), Serializer::default());
        assert_ne!(
            signed(),
            Serializer::builder()
                .signing_key("another-key-0123456789abcdef")
                .build()
                .unwrap()
        );
        assert!(!Serializer::default().is_signing());
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

    /// Values nested a million levels deep, inside compressed envelopes of every compression
    /// and for every format: the depth check runs on the decompressed bytes, before any
    /// recursive parser (without it, this test would abort on a stack overflow).
    #[test]
    fn deep_values_inside_compressed_envelopes_are_rejected() {
        const N: usize = 1_000_000;
        let deep: Vec<(SerializationType, Vec<u8>)> = vec![
            (
                SerializationType::Json,
                [vec![b'['; N], vec![b']'; N]].concat(),
            ),
            (
                SerializationType::SimdJson,
                [vec![b'['; N], vec![b']'; N]].concat(),
            ),
            (SerializationType::Cbor, [vec![0x81; N], vec![0]].concat()),
            (
                SerializationType::MsgPack,
                [vec![0x91; N], vec![0]].concat(),
            ),
        ];
        let reader = Serializer::builder()
            .format(SerializationType::SimdJson)
            .build()
            .unwrap();
        for compression in CompressionType::ALL {
            if !compression.is_enabled() {
                continue;
            }
            for (format, payload) in &deep {
                if !format.is_enabled() {
                    continue;
                }
                let declared = u32::try_from(payload.len()).unwrap();
                let mut bytes = envelope::long_header(*format, compression, declared).to_vec();
                compress::compress(
                    compression,
                    compression.default_level(),
                    payload,
                    &mut bytes,
                )
                .unwrap();
                if compression == CompressionType::None {
                    bytes = [&envelope::short_header(*format)[..], payload].concat();
                }
                let err = reader.decode::<serde_json::Value>(&bytes).unwrap_err();
                assert_eq!(
                    err.kind(),
                    CodecErrorKind::Corrupt,
                    "{format} {compression}: {err}"
                );
                assert!(err.to_string().contains("levels"), "{err}");
            }
        }
    }

    /// Nothing this crate writes is refused by its readers: a value nested past the limit is
    /// an encode error, one level less encodes and reads back.
    #[cfg(feature = "full")]
    #[test]
    fn encode_refuses_values_nested_past_the_limit() {
        fn nest(levels: usize) -> serde_json::Value {
            let mut v = serde_json::Value::from(1);
            for _ in 0..levels {
                v = serde_json::Value::Array(vec![v]);
            }
            v
        }
        for format in [
            SerializationType::Json,
            SerializationType::SimdJson,
            SerializationType::Cbor,
            SerializationType::MsgPack,
        ] {
            let codec = Serializer::builder().format(format).build().unwrap();
            let ok = nest(crate::MAX_DEPTH - 1);
            let bytes = codec.encode(&ok).unwrap();
            assert_eq!(
                codec.decode::<serde_json::Value>(&bytes).unwrap(),
                ok,
                "{format}"
            );
            let err = codec.encode(&nest(crate::MAX_DEPTH)).unwrap_err();
            assert_eq!(err.kind(), CodecErrorKind::Encode, "{format}: {err}");
            // The shortest encoding refused: MAX_DEPTH levels around an empty array (which
            // opens no level of its own), one byte a level in MessagePack and CBOR. Encodings
            // shorter than the limit skip the scan; this one must not.
            let mut shortest = serde_json::Value::Array(Vec::new());
            for _ in 0..crate::MAX_DEPTH {
                shortest = serde_json::Value::Array(vec![shortest]);
            }
            let err = codec.encode(&shortest).unwrap_err();
            assert_eq!(err.kind(), CodecErrorKind::Encode, "{format}: {err}");
        }
    }

    /// The cap applies to payloads that are not compressed (enveloped or raw) too.
    #[test]
    fn uncompressed_payloads_above_the_cap_are_too_large() {
        let writer = Serializer::default();
        let reader = Serializer::builder()
            .max_decompressed_size(1000)
            .build()
            .unwrap();
        let big = "x".repeat(2000);
        let bytes = writer.encode(&big).unwrap();
        assert_eq!(
            reader.decode::<String>(&bytes).unwrap_err().kind(),
            CodecErrorKind::TooLarge
        );
        let raw = serde_json::to_vec(&big).unwrap();
        assert_eq!(
            reader.decode::<String>(&raw).unwrap_err().kind(),
            CodecErrorKind::TooLarge
        );
        // At the cap: read.
        let fits = "x".repeat(998);
        assert_eq!(
            reader
                .decode::<String>(&writer.encode(&fits).unwrap())
                .unwrap(),
            fits
        );
        // A writer never writes what a reader with its cap refuses (raw mode too).
        let capped = Serializer::builder()
            .max_decompressed_size(1000)
            .build()
            .unwrap();
        assert_eq!(
            capped.encode(&big).unwrap_err().kind(),
            CodecErrorKind::Encode
        );
        let capped_raw = Serializer::builder()
            .raw(true)
            .max_decompressed_size(1000)
            .build()
            .unwrap();
        assert_eq!(
            capped_raw.encode(&big).unwrap_err().kind(),
            CodecErrorKind::Encode
        );
    }

    /// A signing reader leaves a newer build's envelope (unknown version) in place: it is
    /// `Unsupported`, not `Tampered`.
    #[test]
    fn signing_readers_treat_newer_versions_as_unsupported() {
        let signed = Serializer::builder()
            .signing_key("a-long-random-secret-0123456789")
            .build()
            .unwrap();
        let mut newer = vec![0xC1, 0x4E, 9, 1, 0, b'1'];
        newer.extend_from_slice(&[0; 32]);
        let err = signed.decode_for::<u32>(&["p:", "k"], &newer).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Unsupported);
        assert!(!err.kind().is_damaged());
        // An unsigned (version 1) value is still forged for a signing reader.
        let plain = Serializer::default().encode(&1u32).unwrap();
        let err = signed.decode_for::<u32>(&["p:", "k"], &plain).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Tampered);
    }

    /// Values another program compressed itself (a gzip, zlib or zstd frame around the
    /// format's bytes, as Python's `gzip.compress(json.dumps(v).encode())` writes) read under
    /// the cap; a raw CBOR string that starts like zlib still reads as CBOR;
    /// past the cap they are too large; an LZ4 frame is unsupported (left, not deleted).
    #[cfg(all(feature = "gzip", feature = "zstd"))]
    #[test]
    fn foreign_compressed_frames_read_under_the_cap() {
        let text = br#"{"id": 7, "name": "Zo\u00eb"}"#;
        let mut gz = Vec::new();
        compress::compress(CompressionType::Gzip, 6, text, &mut gz).unwrap();
        let zst = zstd::stream::encode_all(&text[..], 3).unwrap();
        let mut zlib = Vec::new();
        {
            use std::io::Write;
            let mut e = flate2::write::ZlibEncoder::new(&mut zlib, flate2::Compression::new(6));
            e.write_all(text).unwrap();
            e.finish().unwrap();
        }
        assert_eq!(&zlib[..2], &[0x78, 0x9c]);
        let reader = Serializer::default();
        for frame in [&gz, &zst, &zlib] {
            let v: serde_json::Value = reader.decode(frame).unwrap();
            assert_eq!(v["name"], "Zoë");
        }
        let small = Serializer::builder()
            .max_decompressed_size(10)
            .build()
            .unwrap();
        for frame in [&gz, &zst] {
            let err = small.decode::<serde_json::Value>(frame).unwrap_err();
            assert_eq!(err.kind(), CodecErrorKind::TooLarge);
        }
        let lz4_frame = [0x04, 0x22, 0x4d, 0x18, 0x64, 0x40, 0xa7, 0, 0, 0, 0];
        let err = reader.decode::<serde_json::Value>(&lz4_frame).unwrap_err();
        assert_eq!(err.kind(), CodecErrorKind::Unsupported);
        assert!(!err.kind().is_damaged());
        // A raw CBOR text string of 156 bytes starts with 78 9c, like zlib: read as CBOR.
        #[cfg(feature = "cbor")]
        {
            let cbor = Serializer::builder()
                .format(SerializationType::Cbor)
                .raw(true)
                .build()
                .unwrap();
            let text = "z".repeat(0x9c);
            let bytes = cbor.encode(&text).unwrap();
            assert_eq!(&bytes[..2], &[0x78, 0x9c]);
            assert_eq!(cbor.decode::<String>(&bytes).unwrap(), text);
        }
        // A damaged frame is damaged.
        let mut broken = gz.clone();
        let at = broken.len() - 6;
        broken[at] ^= 0xff;
        let err = reader.decode::<serde_json::Value>(&broken).unwrap_err();
        assert!(err.kind().is_damaged(), "{err}");
    }
}
