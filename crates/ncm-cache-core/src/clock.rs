//! Time sources: the system clock, and a manual clock so TTL logic is testable without sleeping.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
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

    /// The current time in nanoseconds since a fixed origin of this clock (the same origin on
    /// every call). In-process stores keep deadlines in this form: a `u64` is half the size of an
    /// `Instant` and compares without conversions.
    ///
    /// The default measures [`now`](Self::now) from a process-wide anchor one day before the
    /// first call (earlier instants read as 0); the built-in clocks override it with a cheaper
    /// reading of their own.
    ///
    /// ```
    /// use std::time::Duration;
    /// use ncm_cache_core::{Clock, ManualClock};
    /// let clock = ManualClock::new();
    /// let t0 = clock.now_nanos();
    /// clock.advance(Duration::from_millis(5));
    /// assert_eq!(clock.now_nanos() - t0, 5_000_000);
    /// ```
    #[inline]
    fn now_nanos(&self) -> u64 {
        nanos_since_anchor(self.now())
    }
}

/// `t` in nanoseconds since a process-wide anchor (one day before the first call, or the
/// first call itself where the platform's monotonic clock cannot go back that far).
fn nanos_since_anchor(t: Instant) -> u64 {
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    let anchor = *ANCHOR.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now)
    });
    duration_nanos(t.saturating_duration_since(anchor))
}

/// A duration in whole nanoseconds, saturating at `u64::MAX` (584 years).
#[inline]
pub fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A deadline in [`Clock::now_nanos`] time that never comes (an entry without expiry).
pub const NO_DEADLINE: u64 = u64::MAX;

/// The deadline `d` after `now` (both in [`Clock::now_nanos`] time); saturates below
/// [`NO_DEADLINE`], so a huge TTL is a far deadline, never "no deadline" or a wrap-around.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_core::{NO_DEADLINE, deadline_after};
/// assert_eq!(deadline_after(1_000, Duration::from_micros(1)), 2_000);
/// assert_eq!(deadline_after(1_000, Duration::MAX), NO_DEADLINE - 1);
/// ```
#[inline]
pub fn deadline_after(now: u64, d: Duration) -> u64 {
    now.saturating_add(duration_nanos(d)).min(NO_DEADLINE - 1)
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

    /// Nanoseconds since this clock was created: one coarse reading, no conversion to `Instant`.
    #[inline]
    fn now_nanos(&self) -> u64 {
        coarsetime::Instant::now()
            .duration_since(self.coarse_base)
            .as_nanos()
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
        self.inner
            .offset_nanos
            .fetch_add(duration_nanos(by), Ordering::SeqCst);
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

    /// Nanoseconds advanced since creation.
    fn now_nanos(&self) -> u64 {
        self.inner.offset_nanos.load(Ordering::SeqCst)
    }
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The default shared clock: the system clock.
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock with only `now` (the default `now_nanos`).
    #[derive(Debug)]
    struct Plain;
    impl Clock for Plain {
        fn now(&self) -> Instant {
            Instant::now()
        }
    }

    #[test]
    fn every_clock_reads_nanos_that_follow_now() {
        let clocks: [(&str, Box<dyn Clock>); 3] = [
            ("default", Box::new(Plain)),
            ("system", Box::new(SystemClock)),
            ("coarse", Box::new(CoarseClock::new())),
        ];
        for (name, clock) in clocks {
            let (n0, t0) = (clock.now_nanos(), clock.now());
            assert!(
                n0 > 0 || name == "coarse",
                "{name}: the anchor lies before now"
            );
            std::thread::sleep(Duration::from_millis(40));
            let (n1, t1) = (clock.now_nanos(), clock.now());
            let by_nanos = Duration::from_nanos(n1 - n0);
            let by_now = t1 - t0;
            let diff = by_nanos.abs_diff(by_now);
            // The coarse clock ticks every few ms; the others agree to the microsecond.
            assert!(
                diff < Duration::from_millis(10),
                "{name}: {by_nanos:?} vs {by_now:?}"
            );
            assert!(
                by_nanos >= Duration::from_millis(30),
                "{name}: {by_nanos:?}"
            );
        }
    }

    #[test]
    fn durations_convert_to_nanos_saturating() {
        assert_eq!(duration_nanos(Duration::from_millis(3)), 3_000_000);
        assert_eq!(duration_nanos(Duration::MAX), u64::MAX);
    }
}
