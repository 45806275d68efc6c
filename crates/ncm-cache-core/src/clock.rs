//! Time sources: the system clock, and a manual clock so TTL logic is testable without sleeping.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A monotonic time source.
///
/// Backends that keep expiry times in process (the memory backend, L1) read the time through a
/// `Clock`, so tests can move time forward with [`ManualClock`] instead of sleeping.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_core::{Clock, ManualClock};
/// let clock = ManualClock::new();
/// let t0 = clock.now();
/// clock.advance(Duration::from_secs(60));
/// assert_eq!(clock.now() - t0, Duration::from_secs(60));
/// ```
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock ([`Instant::now`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A coarse monotonic clock: reading it costs a few nanoseconds instead of ~25 ns, at a
/// resolution of a few milliseconds (the kernel tick, `CLOCK_MONOTONIC_COARSE` on Linux).
///
/// Used by the L1 of the multi-level cache, whose hit path must stay close to a bare hash
/// lookup: an L1 entry may live up to one tick longer or shorter than its TTL. Use
/// [`SystemClock`] where TTLs must be exact to the microsecond.
///
/// ```
/// use ncm_cache_core::{Clock, CoarseClock};
/// let clock = CoarseClock::new();
/// let a = clock.now();
/// std::thread::sleep(std::time::Duration::from_millis(30));
/// assert!(clock.now() > a);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct CoarseClock {
    base: Instant,
    coarse_base: coarsetime::Instant,
}

impl Default for CoarseClock {
    fn default() -> Self {
        Self::new()
    }
}

impl CoarseClock {
    /// A coarse clock aligned with [`Instant::now`] at creation.
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            coarse_base: coarsetime::Instant::now(),
        }
    }
}

impl Clock for CoarseClock {
    #[inline]
    fn now(&self) -> Instant {
        let since = coarsetime::Instant::now().duration_since(self.coarse_base);
        self.base + Duration::from(since)
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

#[derive(Debug)]
struct ManualInner {
    base: Instant,
    offset_nanos: AtomicU64,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A manual clock starting at the current instant.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ManualInner {
                base: Instant::now(),
                offset_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.inner.offset_nanos.fetch_add(nanos, Ordering::SeqCst);
    }

    /// How far this clock has been advanced in total.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.inner.offset_nanos.load(Ordering::SeqCst))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.inner.base + self.elapsed()
    }
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The default shared clock: the system clock.
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock)
}
