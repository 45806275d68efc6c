//! The error type shared by every ncm-cache crate.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A shareable boxed error: several waiters on one load can all hold the same source.
pub type BoxError = Arc<dyn StdError + Send + Sync + 'static>;

/// The result type of every fallible ncm-cache operation.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Everything that can go wrong in a cache operation.
///
/// The enum is `#[non_exhaustive]`: match the variants you handle and keep a wildcard arm.
/// For the common decisions use the predicates — [`is_timeout`](Self::is_timeout),
/// [`is_connection`](Self::is_connection), [`is_retryable`](Self::is_retryable),
/// [`is_codec`](Self::is_codec) — so a caller can fail open (treat the cache as a miss) or retry.
///
/// `CacheError` is `Clone` (sources are kept behind [`Arc`]) so that one loader error can be
/// handed to every caller waiting on the same load.
///
/// ```
/// use ncm_cache_core::CacheError;
/// let err = CacheError::invalid_key("", "keys must not be empty");
/// assert!(!err.is_retryable());
/// assert_eq!(err.to_string(), "invalid key \"\": keys must not be empty");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The key is empty, too long, or otherwise unusable; fix the key.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key (truncated to 128 bytes).
        key: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A glob pattern could not be compiled; fix the pattern.
    #[error("invalid pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The offending pattern (truncated to 128 bytes).
        pattern: String,
        /// Why it was rejected.
        reason: String,
    },

    /// An argument other than a key is out of range (for example a zero TTL).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The configuration is inconsistent or incomplete; the message names the option.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A value is larger than the configured maximum; store less or raise the limit.
    #[error("value of {size} bytes exceeds the maximum of {max} bytes")]
    ValueTooLarge {
        /// Size of the rejected value in bytes.
        size: usize,
        /// The configured maximum.
        max: usize,
    },

    /// Encoding or decoding a value failed (corrupt, truncated, foreign or oversized data).
    #[error(transparent)]
    Codec(#[from] CodecError),

    /// The backend could not be reached or the connection broke; retrying later may succeed.
    #[error("connection error: {message}")]
    Connection {
        /// What failed.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// An operation did not complete within its timeout; the backend may be slow or paused.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        operation: &'static str,
        /// The timeout that was exceeded.
        after: Duration,
    },

    /// The backend answered with an error (for example a Redis error reply).
    #[error("backend error: {message}")]
    Backend {
        /// What the backend said.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// Authentication or authorization failed; check the username, password or ACL rules.
    #[error("authentication failed: {0}")]
    Auth(String),

    /// A user-supplied loader failed; the error is shared by every caller that waited on it.
    #[error("loader failed: {0}")]
    Loader(#[source] BoxError),

    /// A user-supplied persistent store (write-through / write-behind) failed.
    #[error("persistent store failed: {0}")]
    Store(#[source] BoxError),

    /// The database behind a SQL cache failed.
    #[error("database error: {message}")]
    Database {
        /// What the database said.
        message: String,
        /// The underlying driver error.
        #[source]
        source: Option<BoxError>,
    },

    /// The cache (or a component of it) was closed; create a new one.
    #[error("the cache is closed")]
    Closed,

    /// A circuit breaker is open after repeated backend failures; the call was not attempted.
    #[error("circuit open for {0}: backend skipped during cool-down")]
    CircuitOpen(&'static str),

    /// The backend does not support this operation.
    #[error("unsupported operation: {0}")]
    Unsupported(&'static str),
}

impl CacheError {
    /// Builds [`CacheError::InvalidKey`], truncating long keys in the message.
    pub fn invalid_key(key: &str, reason: &'static str) -> Self {
        Self::InvalidKey {
            key: truncate(key, 128),
            reason,
        }
    }

    /// Builds [`CacheError::Connection`] from a message and an optional source.
    pub fn connection(
        message: impl Into<String>,
        source: Option<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self::Connection {
            message: message.into(),
            source: source.map(Arc::from),
        }
    }

    /// Builds [`CacheError::Backend`] from a message and an optional source.
    pub fn backend(
        message: impl Into<String>,
        source: Option<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self::Backend {
            message: message.into(),
            source: source.map(Arc::from),
        }
    }

    /// Wraps a loader's error so it can be shared by every waiter.
    pub fn loader<E: Into<Box<dyn StdError + Send + Sync>>>(err: E) -> Self {
        Self::Loader(Arc::from(err.into()))
    }

    /// Wraps a persistent store's error.
    pub fn store<E: Into<Box<dyn StdError + Send + Sync>>>(err: E) -> Self {
        Self::Store(Arc::from(err.into()))
    }

    /// `true` when the operation ran out of time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// `true` when the backend could not be reached (refused, reset, closed, DNS, ...).
    pub fn is_connection(&self) -> bool {
        matches!(self, Self::Connection { .. })
    }

    /// `true` when a value could not be encoded or decoded.
    pub fn is_codec(&self) -> bool {
        matches!(self, Self::Codec(_))
    }

    /// `true` when the input (key, pattern, argument, value size) was rejected before any I/O.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Self::InvalidKey { .. }
                | Self::InvalidPattern { .. }
                | Self::InvalidArgument(_)
                | Self::ValueTooLarge { .. }
        )
    }

    /// `true` when retrying the same call later may succeed (timeouts, connection loss,
    /// an open circuit).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. } | Self::Connection { .. } | Self::CircuitOpen(_)
        )
    }

    /// `true` when the backend itself is unavailable — the cases where serving a stale value
    /// or skipping the cache (fail-open) is the usual reaction.
    pub fn is_unavailable(&self) -> bool {
        self.is_retryable() || matches!(self, Self::Closed)
    }
}

/// What kind of codec failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CodecErrorKind {
    /// The value could not be serialized.
    Encode,
    /// The bytes are not a valid value of the expected type in this format.
    Decode,
    /// The envelope header is damaged or truncated.
    Corrupt,
    /// The bytes name a format or compression this build does not know or has not enabled.
    Unsupported,
    /// Decompression would exceed the configured output cap (a decompression bomb).
    TooLarge,
    /// The value's signature does not match: it was written without the signing key.
    Tampered,
    /// Compression or decompression failed.
    Compression,
}

impl CodecErrorKind {
    /// `true` when the bytes are damaged or forged for every reader — they do not parse as
    /// the expected value ([`Decode`](Self::Decode)), the envelope or the compressed stream is
    /// broken ([`Corrupt`](Self::Corrupt), [`Compression`](Self::Compression)), or the
    /// signature does not verify ([`Tampered`](Self::Tampered)): the cache read paths count
    /// them, read a miss and **delete** the entry.
    ///
    /// `false` when another build or configuration may read them: a newer envelope version,
    /// format or compression ([`Unsupported`](Self::Unsupported), for example during a rolling
    /// deploy) or a value above this reader's size cap ([`TooLarge`](Self::TooLarge)). The read
    /// paths count them and read a miss, but **leave** the entry. [`Encode`](Self::Encode) is
    /// never a read error.
    ///
    /// ```
    /// use ncm_cache_core::CodecErrorKind;
    ///
    /// assert!(CodecErrorKind::Tampered.is_damaged());
    /// assert!(!CodecErrorKind::Unsupported.is_damaged());
    /// ```
    pub fn is_damaged(self) -> bool {
        match self {
            Self::Decode | Self::Corrupt | Self::Tampered | Self::Compression => true,
            Self::Encode | Self::Unsupported | Self::TooLarge => false,
        }
    }
}

impl fmt::Display for CodecErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Encode => "encode",
            Self::Decode => "decode",
            Self::Corrupt => "corrupt data",
            Self::Unsupported => "unsupported format",
            Self::TooLarge => "too large",
            Self::Tampered => "tampered",
            Self::Compression => "compression",
        })
    }
}

/// A value could not be encoded or decoded.
///
/// Read paths treat this as a miss, count it, and remove the entry; it is only returned by the
/// strict APIs (and by writes, where encoding failed).
///
/// ```
/// use ncm_cache_core::{CodecError, CodecErrorKind};
/// let err = CodecError::new(CodecErrorKind::Corrupt, "json", "bad magic");
/// assert_eq!(err.kind(), CodecErrorKind::Corrupt);
/// assert_eq!(err.to_string(), "json codec: corrupt data: bad magic");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[error("{format} codec: {kind}: {message}")]
pub struct CodecError {
    kind: CodecErrorKind,
    format: &'static str,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl CodecError {
    /// A codec error without an underlying source.
    pub fn new(kind: CodecErrorKind, format: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            format,
            message: message.into(),
            source: None,
        }
    }

    /// A codec error caused by another error (its message is kept as ours too).
    pub fn with_source<E>(kind: CodecErrorKind, format: &'static str, source: E) -> Self
    where
        E: StdError + Send + Sync + 'static,
    {
        Self {
            kind,
            format,
            message: source.to_string(),
            source: Some(Arc::new(source)),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> CodecErrorKind {
        self.kind
    }

    /// The format (or component) that failed, e.g. `"json"`, `"zstd"`, `"envelope"`.
    pub fn format(&self) -> &'static str {
        self.format
    }

    /// The human-readable detail.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Truncates `s` to at most `max` bytes on a char boundary, marking the cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_classify_errors() {
        let t = CacheError::Timeout {
            operation: "get",
            after: Duration::from_millis(5),
        };
        assert!(t.is_timeout() && t.is_retryable() && t.is_unavailable());
        let c = CacheError::connection("refused", None);
        assert!(c.is_connection() && c.is_retryable());
        let k = CacheError::invalid_key("", "empty");
        assert!(k.is_invalid_input() && !k.is_retryable());
        let codec: CacheError = CodecError::new(CodecErrorKind::Decode, "json", "eof").into();
        assert!(codec.is_codec() && !codec.is_retryable());
    }

    #[test]
    fn long_keys_are_truncated_in_messages() {
        let key = "é".repeat(200);
        let err = CacheError::invalid_key(&key, "too long");
        let CacheError::InvalidKey { key: shown, .. } = &err else {
            panic!("wrong variant")
        };
        assert!(shown.len() <= 128 + '…'.len_utf8());
        assert!(shown.ends_with('…'));
    }

    #[test]
    fn loader_errors_are_shared_by_clones() {
        let err = CacheError::loader("db down");
        let clone = err.clone();
        let (CacheError::Loader(a), CacheError::Loader(b)) = (&err, &clone) else {
            panic!("wrong variant")
        };
        assert!(Arc::ptr_eq(a, b));
        assert!(StdError::source(&err).is_some());
    }
}
