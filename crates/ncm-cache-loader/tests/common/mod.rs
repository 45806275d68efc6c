//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::{
    Bytes, Cache, CacheBackend, CacheError, CacheStats, Clock, HealthReport, KeyTtl, Result,
    async_trait,
};
use ncm_cache_memory::MemoryBackend;

/// A clock that reads tokio's time, so the memory backend's TTLs follow a paused test clock.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// A memory backend on tokio's clock, without a sweeper task.
pub fn memory_backend() -> MemoryBackend {
    MemoryBackend::builder()
        .clock(TokioClock)
        .sweep_interval(None)
        .build()
        .unwrap()
}

/// A typed cache over [`memory_backend`].
pub fn memory_cache() -> Cache<Serializer> {
    Cache::new(memory_backend(), Serializer::default())
}

/// A backend that can be switched off: every call then fails with a connection error.
#[derive(Debug, Clone)]
pub struct Flaky {
    inner: Arc<MemoryBackend>,
    down: Arc<AtomicBool>,
    reads_down: Arc<AtomicBool>,
    writes_down: Arc<AtomicBool>,
    write_delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Flaky {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(memory_backend()),
            down: Arc::new(AtomicBool::new(false)),
            reads_down: Arc::new(AtomicBool::new(false)),
            writes_down: Arc::new(AtomicBool::new(false)),
            write_delay_ms: Arc::default(),
        }
    }

    /// Reads fail (writes work).
    pub fn set_reads_down(&self, down: bool) {
        self.reads_down.store(down, Ordering::SeqCst);
    }

    /// Writes fail (reads work).
    pub fn set_writes_down(&self, down: bool) {
        self.writes_down.store(down, Ordering::SeqCst);
    }

    /// Writes take this long.
    pub fn set_write_delay(&self, delay: Duration) {
        self.write_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(CacheError::connection("backend switched off", None))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl CacheBackend for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.check()?;
        if self.reads_down.load(Ordering::SeqCst) {
            return Err(CacheError::connection("reads switched off", None));
        }
        self.inner.get(key).await
    }
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.check()?;
        if self.writes_down.load(Ordering::SeqCst) {
            return Err(CacheError::connection("writes switched off", None));
        }
        let delay = self.write_delay_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        self.inner.set(key, value, ttl).await
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        self.check()?;
        self.inner.delete(key).await
    }
    async fn exists(&self, key: &str) -> Result<bool> {
        self.check()?;
        self.inner.exists(key).await
    }
    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        self.check()?;
        self.inner.get_ttl(key).await
    }
    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.check()?;
        self.inner.extend_ttl(key, ttl).await
    }
    async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        self.check()?;
        self.inner.clear_pattern(pattern).await
    }
    async fn health_report(&self) -> HealthReport {
        match self.check() {
            Ok(()) => HealthReport::new(true, Duration::ZERO, "flaky", "up"),
            Err(e) => HealthReport::new(false, Duration::ZERO, "flaky", e.to_string()),
        }
    }
    fn get_stats(&self) -> CacheStats {
        self.inner.get_stats()
    }
}

/// Live tokio tasks on the current runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}
