//! A circuit breaker around L2: after `threshold` consecutive failures, L2 is skipped for a
//! cool-down; then one probe call is let through (half-open).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    /// When the outstanding half-open probe started (nanoseconds since `base`, 0: none). A
    /// probe that has not reported within a cool-down no longer blocks the next one.
    probe_since: AtomicU64,
    trips: AtomicU64,
}

/// Leave to make one L2 call. Report how it went with [`success`](Self::success) or
/// [`failure`](Self::failure); a probe dropped without a report (its call was cancelled)
/// counts as a failure, so half-open never lasts past the next cool-down.
#[must_use]
pub(crate) struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    reported: bool,
    /// How many times the circuit had opened when the call began: the failure of a call
    /// begun before the circuit last opened is not counted (see [`CircuitBreaker::failure`]).
    opened: u64,
}

impl Permit<'_> {
    /// The call reached L2 (an answer, even an error answer, means it is up).
    pub(crate) fn success(mut self) {
        self.reported = true;
        self.breaker.success();
    }

    /// L2 was unreachable or timed out.
    pub(crate) fn failure(mut self) {
        self.reported = true;
        self.breaker.failure(self.probe, self.opened);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.failure(true, self.opened);
        }
    }
}

impl CircuitBreaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            base: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probe_since: AtomicU64::new(0),
            trips: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        // Never 0, which means "none" in the fields above.
        ncm_cache_core::duration_nanos(self.base.elapsed()).max(1)
    }

    /// A permit when a call may go to L2: always while closed; once the cool-down is over, one
    /// probe at a time (another if the last one has not reported within a cool-down).
    pub(crate) fn allow(&self) -> Option<Permit<'_>> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Some(Permit {
                breaker: self,
                probe: false,
                reported: false,
                opened: self.trips(),
            });
        }
        let now = self.now();
        if now < until {
            return None;
        }
        let since = self.probe_since.load(Ordering::Acquire);
        if since != 0 && now.saturating_sub(since) < ncm_cache_core::duration_nanos(self.cooldown) {
            return None;
        }
        self.probe_since
            .compare_exchange(since, now, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| Permit {
                breaker: self,
                probe: true,
                reported: false,
                opened: self.trips(),
            })
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("L2 circuit closed");
        }
        self.probe_since.store(0, Ordering::Release);
    }

    /// A failed call. One begun before the circuit last opened (`opened` is older than
    /// `trips`) is old news — L2 was already known to be down then — and is not counted: it
    /// neither extends an open circuit nor reopens one a probe has closed meanwhile. Before,
    /// calls still in flight when L2 went down reported their timeouts after the probe had
    /// closed the circuit and opened it again for another cool-down (with the default 1 s
    /// cool-down and 1 s response timeout, retried once, such calls can outlive the
    /// cool-down).
    fn failure(&self, probe: bool, opened: u64) {
        if !probe && opened != self.trips() {
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if probe || n >= self.threshold {
            self.failures.store(0, Ordering::Relaxed);
            let until = deadline_after(self.now(), self.cooldown);
            self.open_until.store(until.max(1), Ordering::Release);
            self.probe_since.store(0, Ordering::Release);
            self.trips.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(cooldown = ?self.cooldown, "L2 circuit opened after repeated failures");
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
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
            b.allow().unwrap().failure();
        }
        b.allow().unwrap().failure();
        assert!(b.is_open() && b.allow().is_none());
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.allow().expect("one probe after the cool-down");
        assert!(b.allow().is_none(), "only one probe at a time");
        probe.failure();
        assert!(b.is_open(), "a failed probe reopens at once");
        std::thread::sleep(Duration::from_millis(40));
        b.allow().unwrap().success();
        assert!(!b.is_open());
        assert!(b.allow().is_some() && b.allow().is_some());
        assert_eq!(b.trips(), 2);
    }

    #[test]
    fn calls_begun_before_the_circuit_opened_do_not_reopen_it_when_they_fail_late() {
        let b = CircuitBreaker::new(2, Duration::from_millis(30));
        // In flight when L2 goes down; their timeouts come after the probe's success.
        let late: Vec<_> = (0..3).map(|_| b.allow().unwrap()).collect();
        b.allow().unwrap().failure();
        b.allow().unwrap().failure();
        assert!(b.is_open());
        std::thread::sleep(Duration::from_millis(40));
        b.allow().expect("probe").success();
        assert!(!b.is_open());
        for call in late {
            call.failure();
        }
        assert!(!b.is_open(), "old failures reopened the circuit");
        // Calls begun since count as before.
        b.allow().unwrap().failure();
        b.allow().unwrap().failure();
        assert!(b.is_open());
        assert_eq!(b.trips(), 2);
    }

    #[test]
    fn a_dropped_probe_reopens_and_a_silent_one_expires() {
        let b = CircuitBreaker::new(1, Duration::from_millis(30));
        b.allow().unwrap().failure();
        std::thread::sleep(Duration::from_millis(40));
        drop(b.allow().expect("probe"));
        assert!(b.is_open(), "a cancelled probe counts as a failure");
        std::thread::sleep(Duration::from_millis(40));
        let silent = b.allow().expect("probe");
        std::mem::forget(silent);
        assert!(b.allow().is_none());
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            b.allow().is_some(),
            "a probe that never reports blocks one cool-down at most"
        );
    }
}
