//! Leases: who may reload a key, and who owns a schedule, across instances.
//!
//! In one process, [`SingleFlight`](ncm_cache_core::SingleFlight) already makes concurrent
//! reloads of a key run once, so [`LocalLeases`] grants every request. Instances sharing a
//! Redis use [`RedisLeases`] (feature `redis`): a lease is a Redis lock with a TTL
//! (`SET NX PX`, released and extended by its holder only), so a crashed holder blocks the
//! others for at most that TTL.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use ncm_cache_core::Result;

/// A held lease. It expires by itself after its TTL unless extended.
#[async_trait]
pub trait Lease: Send + Sync + Debug {
    /// Extends the lease to `ttl` from now; `false` when it was lost (expired and maybe taken).
    async fn extend(&self, ttl: Duration) -> Result<bool>;

    /// Gives the lease up; `false` when it had already expired.
    async fn release(self: Box<Self>) -> Result<bool>;
}

/// Hands out named leases.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_loader::{LeaseProvider, LocalLeases};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let leases = LocalLeases;
/// let lease = leases.try_acquire("reload:users", Duration::from_secs(10)).await?.unwrap();
/// assert!(lease.extend(Duration::from_secs(10)).await?);
/// lease.release().await?;
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait LeaseProvider: Send + Sync + Debug + 'static {
    /// Takes the lease `name` for `ttl` if nobody holds it.
    async fn try_acquire(&self, name: &str, ttl: Duration) -> Result<Option<Box<dyn Lease>>>;

    /// Waits up to `wait` for the lease, polling with backoff (5 ms doubling to 100 ms).
    async fn acquire(
        &self,
        name: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<Box<dyn Lease>>> {
        let deadline = tokio::time::Instant::now() + ncm_cache_core::capped(wait);
        let mut backoff = Duration::from_millis(5);
        loop {
            if let Some(lease) = self.try_acquire(name, ttl).await? {
                return Ok(Some(lease));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// `true` when leases are shared with other processes (and worth a round trip).
    fn is_distributed(&self) -> bool;
}

/// Leases for a single process: every request is granted at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalLeases;

#[derive(Debug)]
struct LocalLease;

#[async_trait]
impl Lease for LocalLease {
    async fn extend(&self, _ttl: Duration) -> Result<bool> {
        Ok(true)
    }
    async fn release(self: Box<Self>) -> Result<bool> {
        Ok(true)
    }
}

#[async_trait]
impl LeaseProvider for LocalLeases {
    async fn try_acquire(&self, _name: &str, _ttl: Duration) -> Result<Option<Box<dyn Lease>>> {
        Ok(Some(Box::new(LocalLease)))
    }
    fn is_distributed(&self) -> bool {
        false
    }
}

#[cfg(feature = "redis")]
mod redis {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use ncm_cache_core::Result;
    use ncm_cache_redis::{RedisBackend, RedisLock};

    use super::{Lease, LeaseProvider};

    /// Leases held as Redis locks (`RedisBackend::try_lock`), under the cache's prefix in the
    /// `lock:` namespace: one instance at a time holds a given lease.
    ///
    /// ```no_run
    /// # async fn demo() -> ncm_cache_core::Result<()> {
    /// use ncm_cache_loader::{CacheReloader, RedisLeases};
    /// let cache = ncm_cache_redis::RedisCache::from_url("redis://127.0.0.1:6379").await?;
    /// let reloader = CacheReloader::builder((*cache).clone())
    ///     .leases(RedisLeases::new(cache.redis_backend().clone()))
    ///     .build();
    /// # Ok(()) }
    /// ```
    #[derive(Debug, Clone)]
    pub struct RedisLeases {
        backend: Arc<RedisBackend>,
    }

    impl RedisLeases {
        /// Leases on `backend` (from `RedisCache::redis_backend()`).
        pub fn new(backend: Arc<RedisBackend>) -> Self {
            Self { backend }
        }
    }

    #[derive(Debug)]
    struct RedisLease(RedisLock);

    #[async_trait]
    impl Lease for RedisLease {
        async fn extend(&self, ttl: Duration) -> Result<bool> {
            self.0.extend(ttl).await
        }
        async fn release(self: Box<Self>) -> Result<bool> {
            self.0.release().await
        }
    }

    #[async_trait]
    impl LeaseProvider for RedisLeases {
        async fn try_acquire(&self, name: &str, ttl: Duration) -> Result<Option<Box<dyn Lease>>> {
            Ok(self
                .backend
                .try_lock(name, ttl)
                .await?
                .map(|lock| Box::new(RedisLease(lock)) as Box<dyn Lease>))
        }
        fn is_distributed(&self) -> bool {
            true
        }
    }
}

#[cfg(feature = "redis")]
pub use self::redis::RedisLeases;
