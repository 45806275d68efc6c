//! Mapping redis-rs errors to [`CacheError`].

use std::time::Duration;

use ncm_cache_core::CacheError;
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Classifies a redis-rs error so callers can use `is_connection()`, `is_timeout()`, ...
pub(crate) fn map_err(op: &'static str, err: RedisError, timeout: Duration) -> CacheError {
    if err.is_timeout() {
        return CacheError::Timeout {
            operation: op,
            after: timeout,
        };
    }
    let code = err.code().unwrap_or_default();
    if matches!(err.kind(), ErrorKind::AuthenticationFailed)
        || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
        || matches!(err.kind(), ErrorKind::Server(ServerErrorKind::NoPerm))
    {
        return CacheError::Auth(format!(
            "{op}: {err} (check the username/password and the user's ACL rules)"
        ));
    }
    if err.is_io_error()
        || err.is_connection_refusal()
        || err.is_connection_dropped()
        || err.is_unrecoverable_error()
        || matches!(
            err.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::MasterNameNotFoundBySentinel
                | ErrorKind::NoValidReplicasFoundBySentinel
                | ErrorKind::EmptySentinelList
                | ErrorKind::Server(
                    ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::BusyLoading
                        | ServerErrorKind::ReadOnly
                        // Redirections still pending after the cluster client's own retries:
                        // the cluster is moving slots (a failover or a reshard), try again.
                        | ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                )
        )
    {
        return CacheError::connection(format!("{op}: {err}"), Some(Box::new(err)));
    }
    // TLS failures reach us as client errors wrapping the TLS library's error (redis-rs keeps
    // its type private), so they are recognised by their message.
    if matches!(err.kind(), ErrorKind::Client) && {
        let text = err.to_string();
        text.contains("certificate") || text.contains("SSL") || text.contains("TLS")
    } {
        return CacheError::connection(
            format!(
                "{op}: TLS handshake failed: {err} (check `tls_ca_file`, that the server \
                 certificate names the host you connect to, and that the port speaks TLS)"
            ),
            Some(Box::new(err)),
        );
    }
    if matches!(err.kind(), ErrorKind::InvalidClientConfig) {
        return CacheError::Config(format!("{op}: {err}"));
    }
    CacheError::backend(format!("{op}: {err}"), Some(Box::new(err)))
}
