//! The failure policy applied to real connections: what counts against a backend (a failed
//! connect, a reset or early close before any byte), what proves it healthy (the first byte
//! either way), and how a failure at the threshold becomes an ejection without breaking the
//! tier's `max_ejected_percent` cap. The proxy reports what happened; this module decides and
//! logs; `Health` holds the arithmetic.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{FailureVerdict, now_ms};
use crate::config::ServiceConfig;
use crate::log_throttle::LogThrottle;
use crate::pool::{Backend, sibling_usable};
use crate::proxy::copy::{End, Side, Transfer};
use crate::service::Service;

// Ejections and re-admissions happen at most once per `base_ejection` per backend, but a
// large pool losing a rack at once would still print a line per backend.
static EJECTION_LOG: LogThrottle = LogThrottle::with_burst(Duration::from_secs(1), 20);
static READMISSION_LOG: LogThrottle = LogThrottle::with_burst(Duration::from_secs(1), 20);

/// Judges a finished connection. A backend that reset before a single byte moved either way,
/// or closed within `connect_timeout` of the connect, failed: it accepted and then refused to
/// serve. A clean close later than that is a backend timing out a silent client (Postgres'
/// authentication_timeout, an SMTP greeting wait): normal for protocols where the client
/// speaks first, and no sign of trouble. Success was recorded when the first byte moved (see
/// [`record_success`]); a reset after that is passed on to the client but says nothing
/// reliable about new connections, and the client leaving first says nothing about the
/// backend at all.
pub(crate) fn judge_transfer(
    service: &Service,
    config: &ServiceConfig,
    backend: &Arc<Backend>,
    connected_at: u64,
    transfer: &Transfer,
) {
    let moved = transfer.client_to_backend + transfer.backend_to_client;
    if moved != 0 || transfer.first_to_finish != Some(Side::Backend) {
        return;
    }
    let why = if matches!(transfer.end, End::Reset(Side::Backend, _)) {
        "reset before any data"
    } else {
        let window = u64::try_from(config.connect_timeout.as_millis()).unwrap_or(u64::MAX);
        let closed_after = transfer
            .first_finish_at
            .map_or(u64::MAX, |at| at.saturating_sub(connected_at));
        if closed_after > window {
            return;
        }
        "closed before any data"
    };
    record_failure(service, config, backend, why);
}

/// The first byte moved on a connection made at `connected_at`: the backend works. Resets its
/// failure count and, when it was ejected, re-admits it (logged).
pub(crate) fn record_success(service: &Service, backend: &Backend, connected_at: u64) {
    let Some(readmission) = backend.health.record_success(connected_at, now_ms()) else {
        return;
    };
    if let Some(suppressed) = READMISSION_LOG.permit() {
        info!(
            service = %service.name,
            backend = %backend.addr(),
            target = %backend.key.target,
            out_ms = readmission.out_ms,
            early = readmission.early,
            readmissions = backend.health.total_readmissions(),
            suppressed,
            "backend re-admitted"
        );
    }
}

/// Counts one failure of `backend` (`why` is logged) and ejects it at the threshold, unless
/// that would take its tier over `max_ejected_percent`.
pub(crate) fn record_failure(
    service: &Service,
    config: &ServiceConfig,
    backend: &Arc<Backend>,
    why: &str,
) {
    let (verdict, address_unused) = count_and_maybe_eject(service, config, backend);
    log_verdict(service, backend, why, verdict, address_unused);
}

/// The health arithmetic of one failure: counted, and at the threshold an ejection under
/// the tier's cap. Also says whether another address of the same target is usable (then an
/// ejection only leaves this address unused).
fn count_and_maybe_eject(
    service: &Service,
    config: &ServiceConfig,
    backend: &Arc<Backend>,
) -> (FailureVerdict, bool) {
    let policy = &config.health;
    let count = backend.health.count_failure(now_ms(), policy);
    if !count.ejection_due {
        let verdict = FailureVerdict::Counted {
            consecutive: count.consecutive,
        };
        return (verdict, false);
    }
    // Held across the cap check and the ejection so that concurrent failures of
    // different backends cannot together exceed max_ejected_percent. Taken only at the
    // threshold: failures below it touch nothing shared but the backend's own atomics.
    // The cap is checked against the pool as it is now, not as the connection found it.
    let _gate = service.pool.ejection_gate();
    let snapshot = service.pool.snapshot();
    let now = now_ms();
    let tier = snapshot.tier_of(backend);
    let address_unused = tier.is_some_and(|tier| sibling_usable(tier, backend, now));
    let verdict = backend.health.try_eject(now, policy, || {
        tier.is_some_and(|tier| tier.may_eject_one(now, policy.max_ejected_percent))
    });
    (verdict, address_unused)
}

/// The log line of a failure's verdict (ejections are throttled; a count below the
/// threshold logs nothing here).
fn log_verdict(
    service: &Service,
    backend: &Backend,
    why: &str,
    verdict: FailureVerdict,
    address_unused: bool,
) {
    match verdict {
        // One address of a target failing while another works (an AAAA record on a host
        // without IPv6 reachability, say) is not a broken backend: the target keeps serving,
        // /status shows the address as `address_unused`, and the log says so plainly.
        FailureVerdict::Ejected {
            consecutive,
            duration,
            ..
        } if address_unused => {
            if let Some(suppressed) = EJECTION_LOG.permit() {
                info!(
                    service = %service.name,
                    backend = %backend.addr(),
                    target = %backend.key.target,
                    failures = consecutive,
                    ejection_ms = duration.as_millis() as u64,
                    reason = why,
                    suppressed,
                    "address unused: it fails while another address of the same target works"
                );
            }
        }
        FailureVerdict::Ejected {
            consecutive,
            duration,
            streak,
        } => {
            if let Some(suppressed) = EJECTION_LOG.permit() {
                warn!(
                    service = %service.name,
                    backend = %backend.addr(),
                    target = %backend.key.target,
                    failures = consecutive,
                    ejection_ms = duration.as_millis() as u64,
                    streak,
                    reason = why,
                    suppressed,
                    "backend ejected"
                );
            }
        }
        FailureVerdict::CapReached { consecutive } => debug!(
            service = %service.name,
            backend = %backend.addr(),
            failures = consecutive,
            "backend failing but max_ejected_percent reached; keeping it"
        ),
        FailureVerdict::Counted { .. } => {}
    }
}
