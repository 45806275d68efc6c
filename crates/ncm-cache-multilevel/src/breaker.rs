//! A circuit breaker around L2: after `threshold` consecutive failures, L2 is skipped for a
//! cool-down; then one probe call is let through (half-open).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ncm_cache_core::deadline_after;

#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    base: Instant,
    failures: AtomicU32,
    /// Nanoseconds since `base` until which the circuit is open (0: closed).
    open_until: AtomicU64,
    half_open: AtomicBool,
    trips: AtomicU64,
}

impl CircuitBreaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            base: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            half_open: AtomicBool::new(false),
            trips: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        ncm_cache_core::duration_nanos(self.base.elapsed())
    }

    /// `true` when a call may go to L2.
    pub(crate) fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if self.now() < until {
            return false;
        }
        // Cool-down over: let one probe through; the others keep skipping until it reports.
        self.half_open
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    pub(crate) fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open_until.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!("L2 circuit closed");
        }
        self.half_open.store(false, Ordering::Relaxed);
    }

    pub(crate) fn failure(&self) {
        let was_half_open = self.half_open.swap(false, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if was_half_open || n >= self.threshold {
            self.failures.store(0, Ordering::Relaxed);
            let until = deadline_after(self.now(), self.cooldown);
            self.open_until.store(until.max(1), Ordering::Relaxed);
            self.trips.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(cooldown = ?self.cooldown, "L2 circuit opened after repeated failures");
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        until != 0 && self.now() < until
    }

    pub(crate) fn trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let b = CircuitBreaker::new(3, Duration::from_millis(30));
        for _ in 0..2 {
            assert!(b.allow());
            b.failure();
        }
        assert!(b.allow());
        b.failure();
        assert!(b.is_open() && !b.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow(), "one probe after the cool-down");
        assert!(!b.allow(), "only one probe at a time");
        b.failure();
        assert!(b.is_open(), "a failed probe reopens at once");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.allow());
        b.success();
        assert!(!b.is_open() && b.allow() && b.allow());
        assert_eq!(b.trips(), 2);
    }
}
