//! A rate limit for log lines: events that can repeat thousands of times a second (accept
//! errors, a failing backend under load, many backends flapping at once) are logged a few
//! times per interval, and the next line that gets through says how many were held back. It
//! owns no I/O; callers log when it says so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::health::now_ms;

/// Logs at most `burst` lines per `interval`: for events that can repeat thousands of times a
/// second (accept errors, a failing backend under load, many backends flapping at once)
/// without flooding the journal. What it holds back is counted and reported on the next line
/// it lets through, so an operator knows lines are missing.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    interval_ms: u64,
    burst: u64,
    window_start: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// One line per `interval`.
    pub(crate) const fn new(interval: Duration) -> LogThrottle {
        LogThrottle::with_burst(interval, 1)
    }

    /// Up to `burst` lines per `interval`.
    pub(crate) const fn with_burst(interval: Duration, burst: u64) -> LogThrottle {
        LogThrottle {
            interval_ms: interval.as_millis() as u64,
            burst,
            window_start: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// True when the caller should log now.
    pub(crate) fn allow(&self) -> bool {
        self.permit().is_some()
    }

    /// `Some(lines held back since the last permitted one)` when the caller should log now.
    pub(crate) fn permit(&self) -> Option<u64> {
        let now = now_ms();
        let start = self.window_start.load(Ordering::Relaxed);
        if (start == 0 || now.saturating_sub(start) >= self.interval_ms)
            && self
                .window_start
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // A racing caller may slip one extra line into the new window; harmless for logs.
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < self.burst {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}
