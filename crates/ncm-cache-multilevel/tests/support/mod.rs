//! Test support: `Slow`, a layer over a real backend that delays replies or fails calls on
//! demand, so a test can put one call's reply after another call's effect deterministically
//! (as a slow network or a stalled server does).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;
use std::time::Duration;

use ncm_cache_core::{
    Bytes, CacheBackend, CacheError, CacheStats, HealthReport, KeyTtl, Result, SharedBackend,
    async_trait,
};

/// What `Slow` does to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Mode {
    /// Forward at once.
    #[default]
    Pass,
    /// Fail with a connection error (the server is unreachable).
    Unavailable,
    /// Fail with an error that is not about availability (the server answered with an error).
    ServerError,
    /// Never answer (within the test's lifetime).
    Hang,
}

#[derive(Debug, Default)]
struct Settings {
    mode: Mode,
    /// `get` reads at once and delivers its reply after this delay.
    get_reply_delay: Duration,
    /// `set` waits this long before it reaches the backend.
    set_request_delay: Duration,
    /// `set` writes at once and returns after this delay.
    set_reply_delay: Duration,
    /// `delete` deletes at once and returns after this delay.
    delete_reply_delay: Duration,
    /// `extend_ttl` and `clear_pattern` act at once and return after this delay.
    other_reply_delay: Duration,
    /// `get_reserved` reads at once and delivers its reply after this delay.
    reserved_reply_delay: Duration,
    /// `get_reserved` waits this long before it reads.
    reserved_request_delay: Duration,
    /// `delete` deletes, then answers with an error (a reply lost after the command ran).
    delete_fails_after: bool,
    /// `get` reads, waits `get_reply_delay`, then answers with a connection error (a read
    /// that times out).
    get_fails_after: bool,
    /// `set` writes, then answers with a connection error (a reply lost after the command ran).
    set_fails_after: bool,
}

/// A backend layer with injectable delays and failures.
#[derive(Debug)]
pub(crate) struct Slow {
    inner: SharedBackend,
    settings: Mutex<Settings>,
}

impl Slow {
    pub(crate) fn new(inner: SharedBackend) -> Self {
        Self {
            inner,
            settings: Mutex::new(Settings::default()),
        }
    }

    pub(crate) fn mode(&self, mode: Mode) {
        self.settings.lock().unwrap().mode = mode;
    }

    pub(crate) fn get_reply_delay(&self, d: Duration) {
        self.settings.lock().unwrap().get_reply_delay = d;
    }

    pub(crate) fn set_request_delay(&self, d: Duration) {
        self.settings.lock().unwrap().set_request_delay = d;
    }

    pub(crate) fn set_reply_delay(&self, d: Duration) {
        self.settings.lock().unwrap().set_reply_delay = d;
    }

    pub(crate) fn delete_reply_delay(&self, d: Duration) {
        self.settings.lock().unwrap().delete_reply_delay = d;
    }

    pub(crate) fn other_reply_delay(&self, d: Duration) {
        self.settings.lock().unwrap().other_reply_delay = d;
    }

    pub(crate) fn reserved_reply_delay(&self, d: Duration) {
        self.settings.lock().unwrap().reserved_reply_delay = d;
    }

    pub(crate) fn reserved_request_delay(&self, d: Duration) {
        self.settings.lock().unwrap().reserved_request_delay = d;
    }

    pub(crate) fn get_fails_after(&self, fails: bool) {
        self.settings.lock().unwrap().get_fails_after = fails;
    }

    pub(crate) fn set_fails_after(&self, fails: bool) {
        self.settings.lock().unwrap().set_fails_after = fails;
    }

    pub(crate) fn delete_fails_after(&self, fails: bool) {
        self.settings.lock().unwrap().delete_fails_after = fails;
    }

    async fn after_other(&self) {
        let delay = self.settings.lock().unwrap().other_reply_delay;
        tokio::time::sleep(delay).await;
    }

    /// A write: held back by `set_request_delay` before it reaches the backend, its reply by
    /// `set_reply_delay`.
    async fn delayed_write(
        &self,
        write: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        self.gate().await?;
        let (before, after, fails) = {
            let s = self.settings.lock().unwrap();
            (s.set_request_delay, s.set_reply_delay, s.set_fails_after)
        };
        tokio::time::sleep(before).await;
        write.await?;
        tokio::time::sleep(after).await;
        if fails {
            return Err(CacheError::connection("slow: reply lost", None));
        }
        Ok(())
    }

    async fn gate(&self) -> Result<()> {
        let mode = self.settings.lock().unwrap().mode;
        match mode {
            Mode::Pass => Ok(()),
            Mode::Unavailable => Err(CacheError::connection("slow: down", None)),
            Mode::ServerError => Err(CacheError::backend("slow: WRONGTYPE", None)),
            Mode::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        }
    }
}

#[async_trait]
impl CacheBackend for Slow {
    fn name(&self) -> &str {
        "slow"
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.gate().await?;
        let (delay, fails) = {
            let s = self.settings.lock().unwrap();
            (s.get_reply_delay, s.get_fails_after)
        };
        let v = self.inner.get(key).await?;
        tokio::time::sleep(delay).await;
        if fails {
            return Err(CacheError::connection("slow: read timed out", None));
        }
        Ok(v)
    }
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.delayed_write(self.inner.set(key, value, ttl)).await
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        self.gate().await?;
        let (delay, fails) = {
            let s = self.settings.lock().unwrap();
            (s.delete_reply_delay, s.delete_fails_after)
        };
        let found = self.inner.delete(key).await?;
        tokio::time::sleep(delay).await;
        if fails {
            return Err(CacheError::connection("slow: reply lost", None));
        }
        Ok(found)
    }
    async fn exists(&self, key: &str) -> Result<bool> {
        self.gate().await?;
        self.inner.exists(key).await
    }
    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        self.gate().await?;
        self.inner.get_ttl(key).await
    }
    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.gate().await?;
        let changed = self.inner.extend_ttl(key, ttl).await?;
        self.after_other().await;
        Ok(changed)
    }
    async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        self.gate().await?;
        let removed = self.inner.clear_pattern(pattern).await?;
        self.after_other().await;
        Ok(removed)
    }
    async fn get_reserved(&self, name: &str) -> Result<Option<Bytes>> {
        self.gate().await?;
        let (before, delay) = {
            let s = self.settings.lock().unwrap();
            (s.reserved_request_delay, s.reserved_reply_delay)
        };
        tokio::time::sleep(before).await;
        let v = self.inner.get_reserved(name).await?;
        tokio::time::sleep(delay).await;
        Ok(v)
    }
    /// Delayed like `set` (the epoch of an epoch clear is written here).
    async fn set_reserved(&self, name: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.delayed_write(self.inner.set_reserved(name, value, ttl))
            .await
    }
    async fn health_report(&self) -> HealthReport {
        self.inner.health_report().await
    }
    fn get_stats(&self) -> CacheStats {
        self.inner.get_stats()
    }
    fn key_prefix(&self) -> Option<&str> {
        self.inner.key_prefix()
    }
}
