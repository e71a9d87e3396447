//! The per-service and per-backend series of /metrics: the service counters and DNS
//! state, every backend's counters and state, and the connection histograms. Backends are
//! read from the pool once per scrape, so the label sets follow DNS without a registry.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::{COUNTER, GAUGE, describe, sample};
use crate::admin::histogram::Histogram;
use crate::pool::{BackendState, BackendStatus};
use crate::service::Service;

/// A per-service series: name, type, help text, and how to read it.
type ServiceMetric = (&'static str, MetricType, &'static str, fn(&Service) -> u64);

const SERVICE_METRICS: [ServiceMetric; 17] = [
    (
        "srvlb_service_connections_total",
        COUNTER,
        "Client connections accepted.",
        |s| s.stats.accepted.load(Ordering::Relaxed),
    ),
    (
        "srvlb_service_active_connections",
        GAUGE,
        "Client connections open now.",
        |s| s.stats.active.load(Ordering::Relaxed),
    ),
    (
        "srvlb_service_denied_total",
        COUNTER,
        "Client connections refused by allow/deny.",
        |s| s.stats.denied.load(Ordering::Relaxed),
    ),
    (
        "srvlb_service_no_backend_total",
        COUNTER,
        "Client connections closed because the service had no backend.",
        |s| s.stats.no_backend.load(Ordering::Relaxed),
    ),
    (
        "srvlb_service_connect_exhausted_total",
        COUNTER,
        "Client connections closed because every attempted backend failed.",
        |s| s.stats.connect_exhausted.load(Ordering::Relaxed),
    ),
    (
        "srvlb_service_retries_total",
        COUNTER,
        "Connect attempts beyond the first.",
        |s| s.stats.retries.load(Ordering::Relaxed),
    ),
    (
        "srvlb_service_proxy_header_rejected_total",
        COUNTER,
        "Client connections closed because accept_proxy is on and no valid PROXY header came in time.",
        |s| s.stats.proxy_header_rejected.load(Ordering::Relaxed),
    ),
    (
        "srvlb_service_source_connection_limited_total",
        COUNTER,
        "Client connections closed because their source had max_connections_per_source open.",
        |s| s.stats.source_connection_limited.load(Ordering::Relaxed),
    ),
    (
        "srvlb_service_source_rate_limited_total",
        COUNTER,
        "Client connections closed because their source exceeded rate_per_source.",
        |s| s.stats.source_rate_limited.load(Ordering::Relaxed),
    ),
    (
        "srvlb_service_tracked_sources",
        GAUGE,
        "Sources (IPv4 addresses, IPv6 /64s) the per-source limits track now.",
        |s| s.connection_limit().sources().tracked() as u64,
    ),
    (
        "srvlb_service_untracked_sources_total",
        COUNTER,
        "Connections let in untracked because the per-source table was full of busy sources.",
        |s| {
            s.connection_limit()
                .sources()
                .untracked
                .load(Ordering::Relaxed)
        },
    ),
    (
        "srvlb_dns_stale",
        GAUGE,
        "1 when the last DNS lookup failed and the last known backends are served.",
        |s| u64::from(s.discovery_status.stale.load(Ordering::Relaxed)),
    ),
    (
        "srvlb_dns_absent",
        GAUGE,
        "1 while DNS says the service is absent (NXDOMAIN, NODATA, target \".\").",
        |s| u64::from(s.discovery_status.absence.lock().is_some()),
    ),
    (
        "srvlb_dns_empty_hold",
        GAUGE,
        "1 during the empty hold: DNS says absent, the last backends still serve.",
        |s| {
            let absence = s.discovery_status.absence.lock();
            u64::from(absence.as_ref().is_some_and(|a| a.in_hold()))
        },
    ),
    (
        "srvlb_dns_empty_hold_remaining_seconds",
        GAUGE,
        "Seconds until the empty hold ends and the SRV backends are removed (0 when none).",
        |s| {
            let absence = s.discovery_status.absence.lock();
            absence
                .as_ref()
                .map_or(0, |a| a.remaining_ms().div_ceil(1000))
        },
    ),
    (
        "srvlb_dns_refreshes_total",
        COUNTER,
        "Successful DNS lookups.",
        |s| s.discovery_status.refreshes.load(Ordering::Relaxed),
    ),
    (
        "srvlb_dns_failures_total",
        COUNTER,
        "Failed DNS lookups (timeout, SERVFAIL, REFUSED, network).",
        |s| s.discovery_status.failures.load(Ordering::Relaxed),
    ),
];

pub(super) fn service_families(
    e: &mut DescriptorEncoder<'_>,
    services: &[Arc<Service>],
) -> fmt::Result {
    for (name, kind, help, read) in SERVICE_METRICS {
        let mut m = describe(e, name, help, kind)?;
        for s in services {
            sample(&mut m, &[("service", s.name.as_str())], kind, read(s))?;
        }
    }
    Ok(())
}

const BACKEND_METRICS: [(&str, MetricType, &str); 8] = [
    (
        "srvlb_backend_active_connections",
        GAUGE,
        "Connections open to the backend.",
    ),
    (
        "srvlb_backend_connections_total",
        COUNTER,
        "Connections made to the backend.",
    ),
    (
        "srvlb_backend_connect_failures_total",
        COUNTER,
        "Failed connects to the backend.",
    ),
    (
        "srvlb_backend_ejections_total",
        COUNTER,
        "Times the backend was ejected.",
    ),
    (
        "srvlb_backend_readmissions_total",
        COUNTER,
        "Times an ejected backend carried data again and was re-admitted.",
    ),
    (
        "srvlb_backend_bytes_sent_total",
        COUNTER,
        "Bytes from clients to the backend.",
    ),
    (
        "srvlb_backend_bytes_received_total",
        COUNTER,
        "Bytes from the backend to clients.",
    ),
    (
        "srvlb_backend_up",
        GAUGE,
        "1 when the backend takes new connections (active), else 0.",
    ),
];

const BACKEND_STATES: [&str; 5] = ["active", "ejected", "draining", "standby", "address_unused"];

/// One backend's labels and readings, taken once per scrape.
struct BackendRow {
    service: Arc<str>,
    addr: String,
    target: Arc<str>,
    values: [u64; BACKEND_METRICS.len()],
    state: &'static str,
}

impl BackendRow {
    /// No state label: a label that changes would split every counter into a new series
    /// and break rate(); the state has its own gauge.
    fn labels(&self) -> [(&str, &str); 3] {
        [
            ("service", &self.service),
            ("backend", &self.addr),
            ("target", &self.target),
        ]
    }
}

fn backend_rows(services: &[Arc<Service>]) -> Vec<BackendRow> {
    let mut rows = Vec::new();
    for s in services {
        let service: Arc<str> = Arc::from(s.name.as_str());
        for BackendStatus {
            backend: b, state, ..
        } in s.pool.states()
        {
            rows.push(BackendRow {
                service: Arc::clone(&service),
                addr: b.addr().to_string(),
                target: Arc::clone(&b.key.target),
                values: [
                    b.stats.active.load(Ordering::Relaxed),
                    b.stats.connections.load(Ordering::Relaxed),
                    b.stats.connect_failures.load(Ordering::Relaxed),
                    b.health.total_ejections(),
                    b.health.total_readmissions(),
                    b.stats.bytes_sent.load(Ordering::Relaxed),
                    b.stats.bytes_received.load(Ordering::Relaxed),
                    u64::from(state == BackendState::Active),
                ],
                state: state.label(),
            });
        }
    }
    rows
}

pub(super) fn backend_families(
    e: &mut DescriptorEncoder<'_>,
    services: &[Arc<Service>],
) -> fmt::Result {
    let rows = backend_rows(services);
    for (i, (name, kind, help)) in BACKEND_METRICS.into_iter().enumerate() {
        let mut m = describe(e, name, help, kind)?;
        for row in &rows {
            sample(&mut m, &row.labels(), kind, row.values[i])?;
        }
    }
    let mut m = describe(
        e,
        "srvlb_backend_state",
        "1 for the backend's current state (active, ejected, draining, standby), else 0.",
        GAUGE,
    )?;
    for row in &rows {
        let [service, backend, target] = row.labels();
        for state in BACKEND_STATES {
            let labels = [service, backend, target, ("state", state)];
            sample(&mut m, &labels, GAUGE, u64::from(row.state == state))?;
        }
    }
    Ok(())
}

pub(super) fn histogram_families(
    e: &mut DescriptorEncoder<'_>,
    services: &[Arc<Service>],
) -> fmt::Result {
    let encode = |m: &mut MetricEncoder<'_>, labels: &[(&str, &str)], h: &Histogram| {
        h.encode(m.encode_family(&labels)?)
    };
    let mut m = e.encode_descriptor(
        "srvlb_service_connect_duration",
        "Successful backend connects: time from the connect call until the connection was up.",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    for s in services {
        encode(&mut m, &[("service", &s.name)], &s.stats.histograms.connect)?;
    }
    let mut m = e.encode_descriptor(
        "srvlb_service_connection_duration",
        "Client connections that reached a backend: time from accept to close.",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    for s in services {
        encode(
            &mut m,
            &[("service", &s.name)],
            &s.stats.histograms.duration,
        )?;
    }
    let mut m = e.encode_descriptor(
        "srvlb_service_connection",
        "Bytes per client connection that reached a backend: direction sent is client to backend, received is backend to client.",
        Some(&Unit::Bytes),
        MetricType::Histogram,
    )?;
    for s in services {
        let h = &s.stats.histograms;
        encode(
            &mut m,
            &[("service", &s.name), ("direction", "sent")],
            &h.sent,
        )?;
        encode(
            &mut m,
            &[("service", &s.name), ("direction", "received")],
            &h.received,
        )?;
    }
    Ok(())
}
