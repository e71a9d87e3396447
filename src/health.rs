//! Passive failure detection: per-backend failure counting, ejection with growing backoff,
//! and re-admission. `Health` owns only arithmetic on atomics; [`judge`] applies the policy
//! to real connections (what counts against a backend, ejection under the tier cap). Neither
//! opens sockets or decides which backend a client gets (selection sees `is_available`
//! through the pool's `Candidate` view of a backend).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::HealthConfig;

pub(crate) mod judge;

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
pub(crate) enum FailureVerdict {
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

/// A failure as counted by `Health::count_failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FailureCount {
    pub(crate) consecutive: u32,
    /// The threshold is reached and the backend is not ejected yet: call `try_eject`.
    pub(crate) ejection_due: bool,
}

/// Health state of one backend. All fields are atomics: the proxy records outcomes from many
/// connection tasks at once and the selector reads availability without locking.
#[derive(Debug, Default)]
pub(crate) struct Health {
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
    /// Set by an ejection, cleared by the first success after it: that success is the
    /// re-admission, which the proxy logs and counts exactly once.
    readmission_pending: AtomicBool,
    total_readmissions: AtomicU64,
    /// Deadline before which the backend is known to fail but was kept in service because
    /// ejecting it would exceed `max_ejected_percent` (0 = not held). The selector skips a
    /// tier whose usable backends are all held when another tier can serve.
    held_until: AtomicU64,
}

/// A success that ended an ejection: the backend is taking traffic again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Readmission {
    /// From the start of the ejection to the success that ended it.
    pub(crate) out_ms: u64,
    /// True when the success came from a connection made during the ejection window (the
    /// "every backend is failing" fallback) and therefore ended the ejection before its time.
    pub(crate) early: bool,
}

impl Health {
    /// True unless the backend is inside an ejection window.
    pub(crate) fn is_available(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// The ejection deadline if the backend is currently ejected.
    pub(crate) fn ejected_until(&self, now: u64) -> Option<u64> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub(crate) fn last_failure(&self) -> u64 {
        self.last_failure.load(Ordering::Relaxed)
    }

    pub(crate) fn total_ejections(&self) -> u64 {
        self.total_ejections.load(Ordering::Relaxed)
    }

    /// True while the backend failed past the threshold but the ejection cap kept it in.
    pub(crate) fn is_held(&self, now: u64) -> bool {
        self.held_until.load(Ordering::Relaxed) > now
    }

    pub(crate) fn total_readmissions(&self) -> u64 {
        self.total_readmissions.load(Ordering::Relaxed)
    }

    /// A connection made at `connected_at` carried data (observed at `now`): the failure
    /// count resets. Returns the re-admission when this success is the first one since an
    /// ejection.
    ///
    /// Only a connection made after the last ejection started is evidence: a connection
    /// opened before the backend began failing can carry data while new connects time out
    /// (a full backlog), and must neither end the ejection nor spoil "the first connection
    /// after the ejection decides". A connection made during the ejection (the selector's
    /// fallback when everything is failing) proves the backend is back, so it ends the
    /// ejection at once instead of letting clients wait for the deadline.
    pub(crate) fn record_success(&self, connected_at: u64, now: u64) -> Option<Readmission> {
        // The common path (nothing ever failed) only reads: no cache line is dirtied.
        if self.consecutive_failures.load(Ordering::Relaxed) == 0
            && !self.readmission_pending.load(Ordering::Relaxed)
        {
            return None;
        }
        let ejected_at = self.ejected_at.load(Ordering::Acquire);
        if connected_at < ejected_at {
            return None;
        }
        let readmitting = self.readmission_pending.swap(false, Ordering::AcqRel);
        let ejected_at = if readmitting {
            // An ejection may have been published between the first read and the swap (the
            // flag is stored after `ejected_at`, so this read is fresh): re-check the evidence.
            let fresh = self.ejected_at.load(Ordering::Acquire);
            if connected_at < fresh {
                self.readmission_pending.store(true, Ordering::Release);
                return None;
            }
            fresh
        } else {
            ejected_at
        };
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.held_until.store(0, Ordering::Relaxed);
        if !readmitting {
            return None;
        }
        let until = self.ejected_until.load(Ordering::Acquire);
        // Ending early moves the deadline to now (not 0: 0 means "never ejected" to the
        // backoff arithmetic, which must see this ejection as the previous one).
        let early = until > now
            && self
                .ejected_until
                .compare_exchange(until, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok();
        self.total_readmissions.fetch_add(1, Ordering::Relaxed);
        Some(Readmission {
            out_ms: now.saturating_sub(ejected_at),
            early,
        })
    }

    /// Both halves at once, for the tests of the arithmetic: counts one failure and, at the
    /// threshold, ejects when `may_eject` (asked only then) says the tier stays within
    /// `max_ejected_percent`. The proxy calls the halves itself, taking the ejection gate
    /// between them (`health::judge::record_failure`).
    #[cfg(test)]
    pub(crate) fn count_and_try_eject(
        &self,
        now: u64,
        policy: &HealthConfig,
        may_eject: impl FnOnce() -> bool,
    ) -> FailureVerdict {
        let count = self.count_failure(now, policy);
        if !count.ejection_due {
            return FailureVerdict::Counted {
                consecutive: count.consecutive,
            };
        }
        self.try_eject(now, policy, may_eject)
    }

    /// The lock-free half of recording a failure: counts the failure and says whether an
    /// ejection is due. Most failures stop here, so the proxy takes its ejection lock (and
    /// scans the tier for the cap) only when this says so.
    pub(crate) fn count_failure(&self, now: u64, policy: &HealthConfig) -> FailureCount {
        self.last_failure.store(now, Ordering::Relaxed);
        let consecutive = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        FailureCount {
            consecutive,
            ejection_due: consecutive >= policy.consecutive_failures && self.is_available(now),
        }
    }

    /// The second half of recording a failure, after `count_failure` said an ejection is due.
    /// Callers that must keep `max_ejected_percent` across backends hold their lock around
    /// this call; the count is checked again because a success (or another task's
    /// ejection) may have come in between.
    pub(crate) fn try_eject(
        &self,
        now: u64,
        policy: &HealthConfig,
        may_eject: impl FnOnce() -> bool,
    ) -> FailureVerdict {
        let consecutive = self.consecutive_failures.load(Ordering::Relaxed);
        if consecutive < policy.consecutive_failures || !self.is_available(now) {
            return FailureVerdict::Counted { consecutive };
        }
        if !may_eject() {
            // Kept in service, but a tier of such backends should not hold traffic back
            // from a healthy lower-priority tier; the hold lasts one base ejection, after
            // which the next connection decides again.
            let hold = u64::try_from(policy.base_ejection.as_millis()).unwrap_or(u64::MAX);
            self.held_until
                .store(now.saturating_add(hold), Ordering::Relaxed);
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
        self.held_until.store(0, Ordering::Relaxed);
        self.ejected_at.store(now, Ordering::Release);
        self.readmission_pending.store(true, Ordering::Release);
        self.total_ejections.fetch_add(1, Ordering::Relaxed);
        FailureVerdict::Ejected {
            consecutive,
            duration,
            streak,
        }
    }
}

/// The backoff exponent of a new ejection. Each `max_ejection` of healthy time since the
/// previous ejection ended forgives one step, so a backend that flaps (healthy for less than
/// the longest ejection between failures) keeps growing its ejection up to the cap, while one
/// that failed once long ago starts again from `base_ejection`. Forgiving per
/// `base_ejection` instead would never grow: a backend up for one base period between
/// failures would be forgiven exactly the step its last ejection added.
fn next_streak(streak: u32, previous_end: u64, now: u64, policy: &HealthConfig) -> u32 {
    if previous_end == 0 {
        return 1;
    }
    let unit_ms = u64::try_from(policy.max_ejection.max(policy.base_ejection).as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let healthy_steps = now.saturating_sub(previous_end) / unit_ms;
    let forgiven = u32::try_from(healthy_steps).unwrap_or(u32::MAX);
    streak.saturating_sub(forgiven).saturating_add(1)
}

/// `base_ejection * 2^(streak-1)`, capped at `max_ejection`.
pub(crate) fn ejection_duration(policy: &HealthConfig, streak: u32) -> Duration {
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
            h.count_and_try_eject(1000, &p, || true),
            FailureVerdict::Counted { consecutive: 1 }
        );
        assert_eq!(
            h.count_and_try_eject(1001, &p, || true),
            FailureVerdict::Counted { consecutive: 2 }
        );
        assert!(h.is_available(1002));
        let v = h.count_and_try_eject(1002, &p, || true);
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
        h.count_and_try_eject(1, &p, || true);
        h.count_and_try_eject(2, &p, || true);
        assert_eq!(
            h.record_success(2, 3),
            None,
            "never ejected: nothing to re-admit"
        );
        assert_eq!(
            h.count_and_try_eject(3, &p, || true),
            FailureVerdict::Counted { consecutive: 1 }
        );
    }

    #[test]
    fn first_connection_after_ejection_decides_and_backoff_doubles_up_to_max() {
        let h = Health::default();
        let p = policy();
        for t in 0..3 {
            h.count_and_try_eject(100 + t, &p, || true);
        }
        let mut now = 102;
        let mut expected = 10u64;
        for _ in 0..8 {
            let until = h.ejected_until(now).expect("ejected");
            now = until; // the ejection just ended
            assert!(h.is_available(now));
            match h.count_and_try_eject(now, &p, || true) {
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
            h.count_and_try_eject(t, &p, || true);
        }
        let end = h.ejected_until(0).expect("ejected");
        // Re-ejected right away: streak 2 (20 s).
        for _ in 0..3 {
            h.count_and_try_eject(end, &p, || true);
        }
        let end2 = h.ejected_until(end).expect("ejected again");
        assert_eq!(end2 - end, 20_000);
        // Healthy for two max_ejection periods: both steps forgiven, back to the base.
        let later = end2 + 600_000;
        assert!(h.record_success(end2, end2 + 1).is_some());
        for _ in 0..3 {
            h.count_and_try_eject(later, &p, || true);
        }
        assert_eq!(h.ejected_until(later).expect("ejected") - later, 10_000);
    }

    #[test]
    fn try_eject_checks_again_after_a_success_came_in_between() {
        let h = Health::default();
        let p = policy();
        assert!(!h.count_failure(1, &p).ejection_due);
        assert!(!h.count_failure(2, &p).ejection_due);
        assert!(h.count_failure(3, &p).ejection_due);
        // While this task waited for the ejection lock, a connection carried data.
        assert_eq!(h.record_success(3, 4), None);
        assert_eq!(
            h.try_eject(5, &p, || panic!("the cap must not even be asked")),
            FailureVerdict::Counted { consecutive: 0 }
        );
        assert!(h.is_available(6));
    }

    #[test]
    fn cap_prevents_ejection() {
        let h = Health::default();
        let p = policy();
        for t in 0..2 {
            h.count_and_try_eject(t, &p, || false);
        }
        assert_eq!(
            h.count_and_try_eject(3, &p, || false),
            FailureVerdict::CapReached { consecutive: 3 }
        );
        assert!(h.is_available(4));
    }

    fn eject_at(h: &Health, p: &HealthConfig, now: u64) {
        for _ in 0..p.consecutive_failures {
            h.count_and_try_eject(now, p, || true);
        }
        assert!(!h.is_available(now), "setup: the backend should be ejected");
    }

    #[test]
    fn first_success_after_the_ejection_readmits_once() {
        let h = Health::default();
        let p = policy();
        eject_at(&h, &p, 1_000);
        let end = h.ejected_until(1_000).expect("ejected");
        assert_eq!(
            h.record_success(end + 5, end + 10),
            Some(Readmission {
                out_ms: end + 10 - 1_000,
                early: false
            })
        );
        assert_eq!(h.total_readmissions(), 1);
        assert_eq!(h.consecutive_failures(), 0);
        // A second success is an ordinary one.
        assert_eq!(h.record_success(end + 20, end + 30), None);
        assert_eq!(h.total_readmissions(), 1);
    }

    #[test]
    fn a_connection_older_than_the_ejection_proves_nothing() {
        let h = Health::default();
        let p = policy();
        eject_at(&h, &p, 1_000);
        // Opened at 500 (before the backend started failing), carried data at 1_500.
        assert_eq!(h.record_success(500, 1_500), None);
        assert!(!h.is_available(1_500), "a stale success ended the ejection");
        let end = h.ejected_until(1_500).expect("still ejected");
        // The first connection after the ejection still decides: one failure re-ejects.
        assert!(matches!(
            h.count_and_try_eject(end, &p, || true),
            FailureVerdict::Ejected { streak: 2, .. }
        ));
    }

    #[test]
    fn success_of_a_connection_made_during_the_ejection_ends_it_early() {
        let h = Health::default();
        let p = policy();
        eject_at(&h, &p, 1_000);
        // The fallback picked the ejected backend at 2_000 and it answered.
        let r = h.record_success(2_000, 2_001).expect("re-admitted");
        assert!(r.early);
        assert!(h.is_available(2_001));
        // The ended ejection still counts as the previous one for the backoff.
        eject_at(&h, &p, 2_002);
        assert_eq!(
            h.ejected_until(2_002).map(|u| u - 2_002),
            Some(20_000),
            "a repeat ejection right after re-admission must double"
        );
    }

    #[test]
    fn a_flapping_backend_keeps_growing_until_healthy_for_max_ejection() {
        let h = Health::default();
        let p = policy(); // base 10 s, max 300 s
        eject_at(&h, &p, 0);
        let mut expected = 10_000;
        let mut now = 0;
        for _ in 0..4 {
            let end = h.ejected_until(now).expect("ejected");
            // Back for a while (less than max_ejection), carries data, then fails again.
            h.record_success(end, end + 1);
            now = end + 60_000;
            eject_at(&h, &p, now);
            expected *= 2;
            assert_eq!(h.ejected_until(now).map(|u| u - now), Some(expected));
        }
        // One max_ejection of health forgives one step only.
        let end = h.ejected_until(now).expect("ejected");
        h.record_success(end, end + 1);
        now = end + 300_000;
        eject_at(&h, &p, now);
        assert_eq!(h.ejected_until(now).map(|u| u - now), Some(expected));
    }
}
