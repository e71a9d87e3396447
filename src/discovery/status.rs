//! What operators see of a service's discovery (`/status`, `/metrics`): staleness, counts,
//! the last error, the empty hold, and whether the first lookup's outcome has reached the
//! pool. Written by the refresh policy only.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::health::now_ms;

/// What operators see of a service's discovery: shared with status and metrics.
#[derive(Debug, Default)]
pub(crate) struct DiscoveryStatus {
    /// The last lookup failed and the pool serves the last known good answer.
    pub(crate) stale: AtomicBool,
    pub(crate) refreshes: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// `now_ms` of the last successful lookup (0 = never).
    pub(crate) last_success_ms: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
    /// The first lookup's outcome (found, absent or failed) has reached the pool; for a
    /// static-only service, the static backends have. Static backends beside an SRV name
    /// are published before the first lookup, so a non-empty pool does not mean this.
    first_outcome: AtomicBool,
    first_outcome_notify: tokio::sync::Notify,
    /// Set while DNS says the service is absent (NXDOMAIN, NODATA, lone "."): the empty
    /// hold, and after it the emptied pool. Cleared when records are back.
    pub(crate) absence: Mutex<Option<Absence>>,
}

/// The registry's "absent" answer and the empty hold it started, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Absence {
    /// The answer that started it: "NXDOMAIN", "no SRV records (NODATA)", ...
    pub(crate) reason: String,
    /// Wall-clock time (ms since the Unix epoch) of the first absent answer.
    pub(crate) since_unix_ms: u64,
    /// When the hold ends and the SRV backends are removed (same clock).
    pub(crate) until_unix_ms: u64,
    /// The hold has elapsed and the pool's SRV backends were removed.
    pub(crate) emptied: bool,
}

impl Absence {
    /// True while the old backends still serve and the hold has not elapsed.
    pub(crate) fn in_hold(&self) -> bool {
        !self.emptied
    }

    /// Milliseconds left in the hold (0 once elapsed).
    pub(crate) fn remaining_ms(&self) -> u64 {
        if self.emptied {
            0
        } else {
            self.until_unix_ms.saturating_sub(unix_ms())
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch, for times shown to operators.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl DiscoveryStatus {
    pub(super) fn first_outcome_applied(&self) {
        if !self.first_outcome.swap(true, Ordering::AcqRel) {
            self.first_outcome_notify.notify_waiters();
        }
    }

    /// Returns once the first lookup's outcome is in the pool (see `first_outcome`).
    pub(crate) async fn wait_first_outcome(&self) {
        loop {
            // Registered before the flag is read, so a notification in between is not lost.
            let notified = self.first_outcome_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.first_outcome.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    pub(super) fn fail(&self, why: String) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(why);
        !self.stale.swap(true, Ordering::Relaxed)
    }

    /// A lookup of the whole set answered. True when that ends a stale mark.
    pub(super) fn succeed(&self) -> bool {
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        self.last_success_ms.store(now_ms(), Ordering::Relaxed);
        self.recover()
    }

    /// What failed resolves again (a partial round completed a current set): not stale, no
    /// error, though no lookup of the whole set was made. True when it was stale.
    pub(super) fn recover(&self) -> bool {
        *self.last_error.lock() = None;
        self.stale.swap(false, Ordering::Relaxed)
    }
}
