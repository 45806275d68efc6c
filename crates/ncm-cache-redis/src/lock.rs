//! A distributed lock: `SET key token NX PX ttl`, released and extended by Lua only by its
//! holder, expiring by itself if the holder crashes.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use ncm_cache_core::{CacheError, Operation, Result};
use redis::Script;

use crate::backend::{Inner, RedisBackend};
use crate::commands;

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end",
    )
});

static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end",
    )
});

/// Replaces the holder's token with a note that keeps the lock taken for a while.
static RELEASE_WITH_NOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 else return 0 end",
    )
});

/// How many times a lock dropped unreleased is released in the background before it is left
/// to expire (pauses of 50 ms doubling between attempts: about 0.75 s in all, plus the calls).
const BACKGROUND_RELEASE_ATTEMPTS: u32 = 5;

/// What a lock's value starts with when it holds a note (a token is 32 hex digits).
const NOTE: &str = "note:";

/// A held lock. Release it with [`release`](Self::release); if dropped unreleased — also when a
/// release failed, or its future was dropped before it completed — it is released in the
/// background (when a tokio runtime is running), and in any case it expires after its TTL, so a
/// crashed holder never blocks others for longer than that.
///
/// ```no_run
/// # async fn demo(cache: ncm_cache_redis::RedisCache) -> ncm_cache_core::Result<()> {
/// use std::time::Duration;
/// let backend = cache.redis_backend();
/// if let Some(lock) = backend.try_lock("reload:users", Duration::from_secs(10)).await? {
///     // ... only one instance gets here at a time ...
///     lock.release().await?;
/// }
/// # Ok(()) }
/// ```
pub struct RedisLock {
    inner: Arc<Inner>,
    key: String,
    token: String,
    released: AtomicBool,
    /// For a lock whose `SET` failed or was abandoned: the connection it went on. Its release
    /// goes behind it there (on another connection, it could run first and find nothing).
    via: std::sync::Mutex<Option<crate::conn::Handle>>,
}

impl fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

impl RedisBackend {
    /// Takes the lock `name` (under the cache's prefix, in the reserved `__ncm:lock:` namespace,
    /// so no user key collides with it and `clear_pattern` never removes it) for `ttl` if nobody
    /// holds it; `None` when it is held.
    pub async fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<RedisLock>> {
        commands::check_ttl(Some(ttl))?;
        let key = self.key_space().reserved_key(&format!("lock:{name}"))?;
        // Released in the background when dropped unclaimed: a `SET` that failed or whose
        // caller was cancelled may still have landed, and nobody would free the lock before
        // its TTL (found by review). The release checks the token.
        let lock = RedisLock {
            inner: Arc::clone(self.inner()),
            key,
            token: token(),
            released: AtomicBool::new(false),
            via: std::sync::Mutex::new(None),
        };
        let (key, token, via) = (&lock.key, &lock.token, &lock.via);
        let got: Option<String> = self
            .inner()
            .run(Operation::Set, crate::backend::Retry::No, |mut h| {
                if let Ok(mut via) = via.lock() {
                    *via = Some(h.clone());
                }
                let mut c = redis::cmd("SET");
                c.arg(key)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(commands::millis(ttl));
                async move { c.query_async(&mut h).await }
            })
            .await?;
        if got.is_none() {
            // Held by someone else: nothing of ours to release.
            lock.released.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        // Taken: released like any lock from now on.
        if let Ok(mut via) = lock.via.lock() {
            *via = None;
        }
        Ok(Some(lock))
    }

    /// The note a holder left in the lock `name` on release
    /// ([`RedisLock::release_with_note`]), while it lasts; `None` when the lock is free or held.
    ///
    /// ```no_run
    /// # async fn demo(redis: &ncm_cache_redis::RedisBackend) -> ncm_cache_core::Result<()> {
    /// if redis.lock_note("load:user:1").await?.as_deref() == Some("none") {
    ///     // the holder found nothing: don't load again
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn lock_note(&self, name: &str) -> Result<Option<String>> {
        let key = self.key_space().reserved_key(&format!("lock:{name}"))?;
        let value: Option<String> = self
            .inner()
            .run(Operation::Get, crate::backend::Retry::Anywhere, |mut h| {
                let c = redis::cmd("GET").arg(&key).take();
                async move { c.query_async(&mut h).await }
            })
            .await?;
        Ok(value.and_then(|v| v.strip_prefix(NOTE).map(str::to_owned)))
    }

    /// Replaces what the lock `name` holds — a holder's token or a note — with `note` for
    /// `keep`, if it holds anything; `false` when it was free (nothing is written then). The
    /// holder's release and renewal then fail (the lock is no longer its own), and whoever
    /// reads [`lock_note`](Self::lock_note) meanwhile reads `note`. For when the answer a
    /// holder is computing is known to be outdated — its key was deleted during the load.
    ///
    /// ```no_run
    /// # async fn demo(redis: &ncm_cache_redis::RedisBackend) -> ncm_cache_core::Result<()> {
    /// use std::time::Duration;
    /// redis.overrule_lock("load:user:1", "uncached", Duration::from_millis(250)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn overrule_lock(&self, name: &str, note: &str, keep: Duration) -> Result<bool> {
        commands::check_ttl(Some(keep))?;
        let key = self.key_space().reserved_key(&format!("lock:{name}"))?;
        let value = format!("{NOTE}{note}");
        let set: Option<String> = self
            .inner()
            .run(Operation::Set, crate::backend::Retry::No, |mut h| {
                let c = redis::cmd("SET")
                    .arg(&key)
                    .arg(&value)
                    .arg("PX")
                    .arg(commands::millis(keep))
                    .arg("XX")
                    .take();
                async move { c.query_async(&mut h).await }
            })
            .await?;
        Ok(set.is_some())
    }

    /// Waits up to `wait` for the lock, polling with backoff (5 ms doubling to 100 ms).
    pub async fn lock(
        &self,
        name: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<RedisLock>> {
        let deadline = Instant::now() + ncm_cache_core::capped(wait);
        let mut backoff = Duration::from_millis(5);
        loop {
            if let Some(lock) = self.try_lock(name, ttl).await? {
                return Ok(Some(lock));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }
}

impl RedisLock {
    /// The full Redis key of the lock.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Releases the lock; `false` when it had already expired (and maybe been taken by another).
    /// On an error (or when this future is dropped first), the lock is released in the
    /// background (up to 5 attempts).
    pub async fn release(self) -> Result<bool> {
        let released = release(&self.inner, &self.key, &self.token).await?;
        // Only now: a failed or cancelled call leaves the drop guard armed.
        self.released.store(true, Ordering::Relaxed);
        Ok(released)
    }

    /// Releases the lock by leaving `note` in it for `keep`: the lock stays taken that long
    /// (nobody else gets it), and others read the note with
    /// [`RedisBackend::lock_note`] — e.g. a loader's "not found" for the callers that waited
    /// for it. `false` when the lock was no longer ours (nothing is written then). On an error
    /// (or when this future is dropped first), the lock is released without the note in the
    /// background.
    pub async fn release_with_note(self, note: &str, keep: Duration) -> Result<bool> {
        commands::check_ttl(Some(keep))?;
        let value = format!("{NOTE}{note}");
        let n: i64 = self
            .inner
            .run(Operation::Delete, crate::backend::Retry::No, |mut h| {
                let (key, token, value) = (self.key.clone(), self.token.clone(), value.clone());
                async move {
                    RELEASE_WITH_NOTE
                        .key(key)
                        .arg(token)
                        .arg(value)
                        .arg(commands::millis(keep))
                        .invoke_async(&mut h)
                        .await
                }
            })
            .await?;
        // Only now: a failed or cancelled call leaves the drop guard armed.
        self.released.store(true, Ordering::Relaxed);
        Ok(n == 1)
    }

    /// Extends the lock to `ttl` from now; `false` when it is no longer ours.
    pub async fn extend(&self, ttl: Duration) -> Result<bool> {
        commands::check_ttl(Some(ttl))?;
        let n: i64 = self
            .inner
            .run(Operation::ExtendTtl, crate::backend::Retry::No, |mut h| {
                let (key, token) = (self.key.clone(), self.token.clone());
                async move {
                    EXTEND
                        .key(key)
                        .arg(token)
                        .arg(commands::millis(ttl))
                        .invoke_async(&mut h)
                        .await
                }
            })
            .await?;
        Ok(n == 1)
    }
}

async fn release(inner: &Inner, key: &str, token: &str) -> Result<bool> {
    let n: i64 = inner
        .run(Operation::Delete, crate::backend::Retry::No, |mut h| {
            let (key, token) = (key.to_owned(), token.to_owned());
            async move { RELEASE.key(key).arg(token).invoke_async(&mut h).await }
        })
        .await?;
    Ok(n == 1)
}

impl Drop for RedisLock {
    fn drop(&mut self) {
        if self.released.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (inner, key, token) = (
                Arc::clone(&self.inner),
                self.key.clone(),
                self.token.clone(),
            );
            let via = self.via.lock().ok().and_then(|mut v| v.take());
            handle.spawn(async move {
                // An unclaimed lock: first behind its `SET` on that connection.
                if let Some(mut h) = via {
                    let timeout = inner.config.response_timeout;
                    let behind = tokio::time::timeout(
                        timeout,
                        RELEASE.key(&key).arg(&token).invoke_async::<i64>(&mut h),
                    )
                    .await;
                    if matches!(behind, Ok(Ok(_))) {
                        return;
                    }
                }
                // Bounded retries (the release is idempotent: it checks the token): a lock
                // left after a connection failure would block waiters for its whole TTL.
                let mut pause = Duration::from_millis(50);
                for attempt in 1..=BACKGROUND_RELEASE_ATTEMPTS {
                    match release(&inner, &key, &token).await {
                        Ok(_) | Err(CacheError::Closed) => return,
                        Err(e) => {
                            tracing::debug!(lock = %key, attempt, error = %e, "background lock release failed");
                            tokio::time::sleep(pause).await;
                            pause *= 2;
                        }
                    }
                }
                tracing::warn!(lock = %key, "could not release a lock in the background; it frees itself at its TTL");
            });
        }
    }
}
