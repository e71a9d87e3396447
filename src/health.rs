//! Passive failure detection: per-backend failure counting, ejection with growing backoff,
//! and re-admission. It owns only arithmetic on atomics; it never opens sockets and never
//! decides which backend a client gets (the selector reads `is_available`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::HealthConfig;

/// Milliseconds on a process-wide monotonic clock. Ejection deadlines are stored in this unit
/// so that the accept path compares two integers instead of touching `Instant` under a lock.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    // Start at 1 so that 0 can mean "never".
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// What happened when a failure was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureVerdict {
    /// Below the threshold, or already ejected: nothing changes for the selector.
    Counted { consecutive: u32 },
    /// The backend is now ejected for `duration`.
    Ejected {
        consecutive: u32,
        duration: Duration,
        /// How many times in a row (without a healthy pause) this backend was ejected.
        streak: u32,
    },
    /// The threshold was reached but ejecting would exceed `max_ejected_percent` of the tier.
    CapReached { consecutive: u32 },
}

/// Health state of one backend. All fields are atomics: the proxy records outcomes from many
/// connection tasks at once and the selector reads availability without locking.
#[derive(Debug, Default)]
pub struct Health {
    consecutive_failures: AtomicU32,
    /// Deadline (in `now_ms` units) before which the backend takes no traffic; 0 = not ejected.
    ejected_until: AtomicU64,
    /// When the last ejection started; used to tell repeat ejections from isolated ones.
    ejected_at: AtomicU64,
    /// Consecutive ejections without a healthy pause: the backoff exponent.
    streak: AtomicU32,
    /// When the last failure was recorded (for "least recently failed" fallback).
    last_failure: AtomicU64,
    total_ejections: AtomicU64,
}

impl Health {
    /// True unless the backend is inside an ejection window.
    pub fn is_available(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// The ejection deadline if the backend is currently ejected.
    pub fn ejected_until(&self, now: u64) -> Option<u64> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn last_failure(&self) -> u64 {
        self.last_failure.load(Ordering::Relaxed)
    }

    pub fn total_ejections(&self) -> u64 {
        self.total_ejections.load(Ordering::Relaxed)
    }

    pub fn streak(&self) -> u32 {
        self.streak.load(Ordering::Relaxed)
    }

    /// A connection to the backend completed and carried data: the failure count resets.
    pub fn record_success(&self) {
        // Avoid dirtying the cache line on the common path where nothing failed.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Records one failure. `may_eject` is asked only when the threshold is reached and says
    /// whether ejecting this backend keeps its tier within `max_ejected_percent`.
    pub fn record_failure(
        &self,
        now: u64,
        policy: &HealthConfig,
        may_eject: impl FnOnce() -> bool,
    ) -> FailureVerdict {
        self.last_failure.store(now, Ordering::Relaxed);
        let consecutive = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if consecutive < policy.consecutive_failures || !self.is_available(now) {
            return FailureVerdict::Counted { consecutive };
        }
        if !may_eject() {
            return FailureVerdict::CapReached { consecutive };
        }
        let previous_end = self.ejected_until.load(Ordering::Relaxed);
        let streak = next_streak(
            self.streak.load(Ordering::Relaxed),
            previous_end,
            now,
            policy,
        );
        let duration = ejection_duration(policy, streak);
        let until = now.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        // Two tasks may cross the threshold together; only the one that moves the deadline
        // from the value it saw reports the ejection, so it is logged and counted once.
        if self
            .ejected_until
            .compare_exchange(previous_end, until, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return FailureVerdict::Counted { consecutive };
        }
        self.streak.store(streak, Ordering::Relaxed);
        self.ejected_at.store(now, Ordering::Relaxed);
        self.total_ejections.fetch_add(1, Ordering::Relaxed);
        FailureVerdict::Ejected {
            consecutive,
            duration,
            streak,
        }
    }
}

/// The backoff exponent of a new ejection. Each `base_ejection` of healthy time since the
/// previous ejection ended forgives one step, so a backend that flaps keeps growing its
/// ejection while one that failed once long ago starts again from `base_ejection`.
fn next_streak(streak: u32, previous_end: u64, now: u64, policy: &HealthConfig) -> u32 {
    if previous_end == 0 {
        return 1;
    }
    let base_ms = u64::try_from(policy.base_ejection.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let healthy_steps = now.saturating_sub(previous_end) / base_ms;
    let forgiven = u32::try_from(healthy_steps).unwrap_or(u32::MAX);
    streak.saturating_sub(forgiven).saturating_add(1)
}

/// `base_ejection * 2^(streak-1)`, capped at `max_ejection`.
pub fn ejection_duration(policy: &HealthConfig, streak: u32) -> Duration {
    let doublings = streak.saturating_sub(1).min(31);
    policy
        .base_ejection
        .checked_mul(1u32 << doublings)
        .unwrap_or(policy.max_ejection)
        .min(policy.max_ejection)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthConfig {
        HealthConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn ejects_at_threshold_and_not_before() {
        let h = Health::default();
        let p = policy();
        assert_eq!(
            h.record_failure(1000, &p, || true),
            FailureVerdict::Counted { consecutive: 1 }
        );
        assert_eq!(
            h.record_failure(1001, &p, || true),
            FailureVerdict::Counted { consecutive: 2 }
        );
        assert!(h.is_available(1002));
        let v = h.record_failure(1002, &p, || true);
        assert_eq!(
            v,
            FailureVerdict::Ejected {
                consecutive: 3,
                duration: Duration::from_secs(10),
                streak: 1
            }
        );
        assert!(!h.is_available(1003));
        assert!(!h.is_available(11_001));
        assert!(h.is_available(11_002));
    }

    #[test]
    fn success_resets_the_count() {
        let h = Health::default();
        let p = policy();
        h.record_failure(1, &p, || true);
        h.record_failure(2, &p, || true);
        h.record_success();
        assert_eq!(
            h.record_failure(3, &p, || true),
            FailureVerdict::Counted { consecutive: 1 }
        );
    }

    #[test]
    fn first_connection_after_ejection_decides_and_backoff_doubles_up_to_max() {
        let h = Health::default();
        let p = policy();
        for t in 0..3 {
            h.record_failure(100 + t, &p, || true);
        }
        let mut now = 102;
        let mut expected = 10u64;
        for _ in 0..8 {
            let until = h.ejected_until(now).expect("ejected");
            now = until; // the ejection just ended
            assert!(h.is_available(now));
            match h.record_failure(now, &p, || true) {
                FailureVerdict::Ejected { duration, .. } => {
                    expected = (expected * 2).min(300);
                    assert_eq!(duration, Duration::from_secs(expected));
                }
                other => panic!("expected a repeat ejection, got {other:?}"),
            }
        }
        assert_eq!(expected, 300);
    }

    #[test]
    fn healthy_time_forgives_the_streak() {
        let h = Health::default();
        let p = policy();
        for t in 0..3 {
            h.record_failure(t, &p, || true);
        }
        let end = h.ejected_until(0).expect("ejected");
        // Re-ejected right away: streak 2 (20 s).
        for _ in 0..3 {
            h.record_failure(end, &p, || true);
        }
        let end2 = h.ejected_until(end).expect("ejected again");
        assert_eq!(end2 - end, 20_000);
        // Healthy for far longer than base_ejection * streak: back to the base duration.
        let later = end2 + 600_000;
        h.record_success();
        for _ in 0..3 {
            h.record_failure(later, &p, || true);
        }
        assert_eq!(h.ejected_until(later).expect("ejected") - later, 10_000);
    }

    #[test]
    fn cap_prevents_ejection() {
        let h = Health::default();
        let p = policy();
        for t in 0..2 {
            h.record_failure(t, &p, || false);
        }
        assert_eq!(
            h.record_failure(3, &p, || false),
            FailureVerdict::CapReached { consecutive: 3 }
        );
        assert!(h.is_available(4));
    }
}
