//! HMAC-SHA256 signing of envelopes (see [`SerializerBuilder::signing_key`]).
//!
//! A signed value is a version-3 envelope followed by a 32-byte tag,
//! `HMAC-SHA256(secret, u32-LE length of the stored key ‖ the stored key ‖ every byte before the
//! tag)` — header included, so neither the format, the compression, the declared length, the
//! payload nor the key it is stored under can be changed without the secret. Version 2 (written
//! by builds before key binding, and by [`Codec::encode`](ncm_cache_core::Codec::encode),
//! which knows no key) is the same without the key part.
//!
//! [`SerializerBuilder::signing_key`]: crate::SerializerBuilder::signing_key

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use ncm_cache_core::{CacheError, CodecError, CodecErrorKind};
use sha2::Sha256;

use crate::envelope::{KEY_BOUND_VERSION, MAGIC, SHORT_HEADER, SIGNED_VERSION, TAG_LEN};

type HmacSha256 = Hmac<Sha256>;

/// The shortest signing or verification key accepted, in bytes.
pub const MIN_SIGNING_KEY_LEN: usize = 16;

/// How a signing serializer binds signatures to the keys values are stored under (see
/// [`SerializerBuilder::signature_mode`](crate::SerializerBuilder::signature_mode)).
///
/// | mode | writes | reads |
/// |---|---|---|
/// | [`KeyBound`](Self::KeyBound) (default) | key-bound (version 3) | key-bound only |
/// | [`Migrating`](Self::Migrating) | key-bound | key-bound and unbound (version 2) |
/// | [`Unbound`](Self::Unbound) | unbound | key-bound and unbound |
///
/// A key-bound value verifies only under the key it was written to; an unbound one (what
/// builds before key binding wrote) verifies under any key, so a writer without the secret can
/// copy it from one key to another. Upgrading a signing deployment: see
/// `docs/configuration.md` ("Signing").
///
/// ```
/// use ncm_cache_codec::{Serializer, SignatureMode};
/// use ncm_cache_core::Codec;
///
/// let secret = "a-long-random-secret-0123456789";
/// let bound = Serializer::builder().signing_key(secret).build()?;
/// let bytes = bound.encode_for(&["app:", "user:1"], &7u32)?;
/// assert_eq!(bytes[2], 3); // key-bound
/// assert_eq!(bound.decode_for::<u32>(&["app:", "user:1"], &bytes)?, 7);
/// // The same bytes under another key do not verify.
/// assert!(bound.decode_for::<u32>(&["app:", "user:2"], &bytes).is_err());
///
/// // Values of builds before key binding (version 2) read only while migrating.
/// let old = Serializer::builder().signing_key(secret).signature_mode(SignatureMode::Unbound).build()?;
/// let legacy = old.encode_for(&["app:", "user:1"], &7u32)?;
/// assert_eq!(legacy[2], 2);
/// assert!(bound.decode_for::<u32>(&["app:", "user:1"], &legacy).is_err());
/// let migrating = Serializer::builder()
///     .signing_key(secret)
///     .signature_mode(SignatureMode::Migrating)
///     .build()?;
/// assert_eq!(migrating.decode_for::<u32>(&["app:", "user:1"], &legacy)?, 7);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SignatureMode {
    /// Write key-bound values, read only key-bound values (the default).
    #[default]
    KeyBound,
    /// Write key-bound values, read unbound ones too: while values written by builds before
    /// key binding (or in [`Unbound`](Self::Unbound) mode) have not expired yet.
    Migrating,
    /// Write unbound values (readable by builds before key binding), read both: while such
    /// builds still run beside this one.
    Unbound,
}

impl SignatureMode {
    /// Whether unbound (version 2) values verify on a keyed read.
    pub(crate) fn accepts_unbound(self) -> bool {
        !matches!(self, Self::KeyBound)
    }

    /// Whether keyed writes bind the key (version 3).
    pub(crate) fn binds(self) -> bool {
        !matches!(self, Self::Unbound)
    }
}

/// Key material held by a builder: never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct SecretBytes(pub(crate) Vec<u8>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The keys of a signing serializer: the first signs (and verifies), the others only verify.
///
/// Holds the keyed HMAC states, computed once, so signing and verifying clone a state instead
/// of re-keying. Cheap to clone (an [`Arc`]). `Debug` shows how many keys there are, never the
/// keys.
#[derive(Clone)]
pub(crate) struct SigningKeys {
    inner: Arc<Keys>,
}

struct Keys {
    /// The raw keys, signing key first (for `PartialEq` only).
    raw: Vec<Vec<u8>>,
    /// One keyed HMAC state per key, same order; never empty.
    macs: Vec<HmacSha256>,
}

impl SigningKeys {
    /// Checks every key's length and keys the HMAC states.
    pub(crate) fn new(
        signing: &SecretBytes,
        verification: &[SecretBytes],
    ) -> Result<Self, CacheError> {
        let mut raw = Vec::with_capacity(1 + verification.len());
        let mut macs = Vec::with_capacity(1 + verification.len());
        for (i, key) in std::iter::once(signing).chain(verification).enumerate() {
            let what = if i == 0 {
                "signing_key".to_owned()
            } else {
                format!("verification key #{i}")
            };
            if key.0.len() < MIN_SIGNING_KEY_LEN {
                return Err(CacheError::Config(format!(
                    "{what} is {} bytes, shorter than the minimum of {MIN_SIGNING_KEY_LEN}; use a \
                     random secret of at least 32 bytes (for example the text printed by \
                     `openssl rand -base64 32`)",
                    key.0.len()
                )));
            }
            let mac = HmacSha256::new_from_slice(&key.0)
                .map_err(|e| CacheError::Config(format!("{what} is unusable for HMAC: {e}")))?;
            raw.push(key.0.clone());
            macs.push(mac);
        }
        Ok(Self {
            inner: Arc::new(Keys { raw, macs }),
        })
    }

    /// How many keys are accepted on read (the signing key included).
    pub(crate) fn len(&self) -> usize {
        self.inner.macs.len()
    }

    /// Appends the tag of `out` (everything written so far) computed with the signing key;
    /// with `key` (the parts of the stored key), the tag covers the key too (version 3).
    pub(crate) fn append_tag(&self, out: &mut Vec<u8>, key: Option<&[&str]>) {
        let Some(first) = self.inner.macs.first() else {
            return;
        };
        let mut mac = first.clone();
        if let Some(key) = key {
            feed_key(&mut mac, key);
        }
        mac.update(out);
        let tag = mac.finalize().into_bytes();
        out.extend_from_slice(&tag);
    }

    /// Checks that `bytes` is a signed envelope whose tag one of the keys produced; anything
    /// else is [`CodecErrorKind::Tampered`]. Nothing but the magic, the version byte and the
    /// length is looked at before the tag is verified.
    ///
    /// `key`: the parts of the key the value was read from. A key-bound (version 3) value
    /// verifies only with its key; an unbound (version 2) value only when `accept_unbound`.
    pub(crate) fn verify(
        &self,
        bytes: &[u8],
        key: Option<&[&str]>,
        accept_unbound: bool,
    ) -> Result<(), CodecError> {
        if !bytes.starts_with(&MAGIC) {
            return Err(tampered(
                "value is not a signed envelope (raw or foreign bytes); this codec has a signing \
                 key and reads only values signed with one of its keys",
            ));
        }
        let bound_to = match (bytes.get(2), key) {
            (Some(&KEY_BOUND_VERSION), Some(key)) => Some(key),
            (Some(&KEY_BOUND_VERSION), None) => {
                return Err(tampered(
                    "value is signed for the key it is stored under, and was read without a \
                     key (use `Codec::decode_for`)",
                ));
            }
            (Some(&SIGNED_VERSION), _) if accept_unbound => None,
            (Some(&SIGNED_VERSION), _) => {
                return Err(tampered(
                    "value is signed without its key (an older build's envelope version 2, or \
                     a value copied from another key); set `SignatureMode::Migrating` while \
                     values of older builds remain",
                ));
            }
            // A newer build's envelope: not forged, just not readable here (left in place).
            (Some(&version), _) if version > KEY_BOUND_VERSION => {
                return Err(CodecError::new(
                    CodecErrorKind::Unsupported,
                    "envelope",
                    format!(
                        "envelope version {version} is newer than this build reads \
                         (up to {KEY_BOUND_VERSION}); the entry is left for the newer build"
                    ),
                ));
            }
            (Some(version), _) => {
                return Err(tampered(format!(
                    "value is not signed (envelope version {version}); this codec has a signing \
                     key and reads only values signed with one of its keys"
                )));
            }
            (None, _) => return Err(tampered("truncated envelope, no signature")),
        };
        let Some(split) = bytes
            .len()
            .checked_sub(TAG_LEN)
            .filter(|&s| s >= SHORT_HEADER)
        else {
            return Err(tampered("signed envelope too short to hold its signature"));
        };
        let (body, tag) = bytes.split_at(split);
        for secret in &self.inner.macs {
            let mut mac = secret.clone();
            if let Some(key) = bound_to {
                feed_key(&mut mac, key);
            }
            mac.update(body);
            // Constant-time comparison.
            if mac.verify_slice(tag).is_ok() {
                return Ok(());
            }
        }
        Err(tampered(
            "signature does not match (the value was written with another key or altered)",
        ))
    }
}

impl PartialEq for SigningKeys {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) || self.inner.raw == other.inner.raw
    }
}

impl Eq for SigningKeys {}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeys")
            .field("signing_key", &"<redacted>")
            .field("verification_keys", &self.len().saturating_sub(1))
            .finish()
    }
}

/// The stored key's part of a version-3 tag: its length (u32 little-endian, saturated) and
/// its bytes, so that no key and body split can be mistaken for another.
fn feed_key(mac: &mut HmacSha256, key: &[&str]) {
    let len: usize = key.iter().map(|part| part.len()).sum();
    mac.update(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    for part in key {
        mac.update(part.as_bytes());
    }
}

fn tampered(message: impl Into<String>) -> CodecError {
    CodecError::new(CodecErrorKind::Tampered, "signature", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SecretBytes {
        SecretBytes(vec![b; 32])
    }

    /// RFC 4231 test case 3 (20 × 0xaa key, 50 × 0xdd data): the tag is plain HMAC-SHA256,
    /// so programs in other languages can verify and produce it.
    #[test]
    fn tag_is_standard_hmac_sha256() {
        let keys = SigningKeys::new(&SecretBytes(vec![0xaa; 20]), &[]).unwrap();
        let mut out = vec![0xdd; 50];
        keys.append_tag(&mut out, None);
        let expected = "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe";
        let hex: String = out[50..].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
    }

    #[test]
    fn short_keys_are_config_errors_naming_the_fix() {
        for len in [0, 1, 15] {
            let err = SigningKeys::new(&SecretBytes(vec![1; len]), &[]).unwrap_err();
            let CacheError::Config(msg) = err else {
                panic!("not a config error: {err}");
            };
            assert!(
                msg.contains("signing_key") && msg.contains("at least 32 bytes"),
                "{msg}"
            );
        }
        let err = SigningKeys::new(&key(1), &[key(2), SecretBytes(vec![3; 8])]).unwrap_err();
        assert!(err.to_string().contains("verification key #2"), "{err}");
        assert!(SigningKeys::new(&SecretBytes(vec![1; 16]), &[]).is_ok());
    }

    #[test]
    fn debug_never_prints_keys() {
        let keys = SigningKeys::new(
            &SecretBytes(b"correct horse battery staple".to_vec()),
            &[key(b'z')],
        )
        .unwrap();
        let debug = format!("{keys:?}");
        assert!(
            !debug.contains("horse") && !debug.contains("zzzz"),
            "{debug}"
        );
        assert!(debug.contains("<redacted>") && debug.contains("verification_keys: 1"));
        assert_eq!(format!("{:?}", key(b'q')), "<redacted>");
    }

    #[test]
    fn equality_follows_the_keys() {
        let a = SigningKeys::new(&key(1), &[]).unwrap();
        assert_eq!(a, a.clone());
        assert_eq!(a, SigningKeys::new(&key(1), &[]).unwrap());
        assert_ne!(a, SigningKeys::new(&key(2), &[]).unwrap());
        assert_ne!(a, SigningKeys::new(&key(1), &[key(2)]).unwrap());
    }
}
