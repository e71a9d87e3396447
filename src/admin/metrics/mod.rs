//! `/metrics`: every series srvlb exports, encoded by prometheus-client from the live state
//! at scrape time. The values stay where the data path keeps them (atomics in services,
//! backends, listeners and the connection histograms); a [`Collector`] reads them once per
//! scrape, so a backend that DNS removed simply stops being listed and no registry has to
//! follow the pool. Served in the Prometheus text format (0.0.4), or OpenMetrics when the
//! scraper asks for it. It reads; it never changes state.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet, prometheus_text, text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tracing::warn;

use super::AdminState;
use super::process::{ProcessStat, max_fds};
use crate::proxy::listener::{ListenerStatus, Pause};
use services::{backend_families, histogram_families, service_families};

mod services;

const COUNTER: MetricType = MetricType::Counter;
const GAUGE: MetricType = MetricType::Gauge;

/// The two text formats a scraper can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// Prometheus text format 0.0.4 (`text/plain`): the default.
    Prometheus,
    /// OpenMetrics 1.0 text, when the request's `Accept` names it (Prometheus does).
    OpenMetrics,
}

impl Format {
    /// The format a request's `Accept` header asks for.
    pub(super) fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub(super) fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The whole /metrics body, read now.
pub(super) fn render(state: &Arc<AdminState>, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(Arc::clone(state))));
    let mut out = String::with_capacity(64 << 10);
    let encoded = match format {
        Format::Prometheus => prometheus_text::encode(&mut out, &registry),
        Format::OpenMetrics => text::encode(&mut out, &registry),
    };
    // Writing to a String cannot fail; an error here is a collector's bug, so say so.
    if encoded.is_err() {
        warn!("encoding /metrics failed; the answer is cut short");
    }
    out
}

/// Reads the live state for one scrape.
#[derive(Debug)]
struct Scrape(Arc<AdminState>);

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let state = &*self.0;
        let services = state.services.load();
        service_families(&mut e, &services)?;
        backend_families(&mut e, &services)?;
        splice_families(&mut e)?;
        listener_families(&mut e, state)?;
        budget_families(&mut e, state)?;
        admin_families(&mut e, state)?;
        histogram_families(&mut e, &services)?;
        process_families(&mut e)?;
        let version = [("version", env!("CARGO_PKG_VERSION"))];
        let mut m = describe(
            &mut e,
            "srvlb_build_info",
            "Always 1; labels say which srvlb runs.",
            GAUGE,
        )?;
        sample(&mut m, &version, GAUGE, 1)
    }
}

/// Starts a family. Counters are described without their `_total` (prometheus-client adds
/// it back to every sample), so the series names stay the ones in the README.
fn describe<'s>(
    e: &'s mut DescriptorEncoder<'_>,
    name: &'s str,
    help: &str,
    kind: MetricType,
) -> Result<MetricEncoder<'s>, fmt::Error> {
    let base = match kind {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    };
    e.encode_descriptor(base, help, None, kind)
}

fn value(m: &mut MetricEncoder<'_>, kind: MetricType, v: u64) -> fmt::Result {
    match kind {
        MetricType::Counter => m.encode_counter::<NoLabelSet, u64, u64>(&v, None),
        _ => m.encode_gauge(&v),
    }
}

fn sample(
    m: &mut MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
    kind: MetricType,
    v: u64,
) -> fmt::Result {
    value(&mut m.encode_family(labels)?, kind, v)
}

/// A family without labels.
fn single(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    v: u64,
) -> fmt::Result {
    value(&mut describe(e, name, help, kind)?, kind, v)
}

#[cfg(target_os = "linux")]
fn splice_families(e: &mut DescriptorEncoder<'_>) -> fmt::Result {
    use crate::proxy::splice::PIPES;
    single(
        e,
        "srvlb_splice_pipes_idle",
        "Empty splice pipes kept for reuse (two file descriptors each).",
        GAUGE,
        PIPES.idle() as u64,
    )?;
    single(
        e,
        "srvlb_splice_pipes_created_total",
        "Splice pipes created.",
        COUNTER,
        PIPES.created(),
    )?;
    let ring = &crate::proxy::uring::STATS;
    single(
        e,
        "srvlb_io_uring_rings",
        "io_uring rings set up, one per worker that served a data_path = \"io_uring\" connection (two file descriptors each).",
        GAUGE,
        ring.rings.load(Ordering::Relaxed),
    )?;
    single(
        e,
        "srvlb_io_uring_connections_total",
        "Connections whose bytes moved on an io_uring ring.",
        COUNTER,
        ring.connections.load(Ordering::Relaxed),
    )?;
    single(
        e,
        "srvlb_io_uring_buffer_waits_total",
        "Receives that found their worker's io_uring buffer pool empty and waited for a buffer to come back.",
        COUNTER,
        ring.buffer_waits.load(Ordering::Relaxed),
    )?;
    single(
        e,
        "srvlb_io_uring_fallbacks_total",
        "Connections that asked for io_uring and took the epoll path: no ring could be set up (see the log).",
        COUNTER,
        ring.fallbacks.load(Ordering::Relaxed),
    )
}

#[cfg(not(target_os = "linux"))]
fn splice_families(_: &mut DescriptorEncoder<'_>) -> fmt::Result {
    Ok(())
}

fn listener_families(e: &mut DescriptorEncoder<'_>, state: &AdminState) -> fmt::Result {
    let rows = super::status::listeners_with_backlog(state);
    let names: Vec<(String, String)> = rows
        .iter()
        .map(|(l, _)| (l.addr.to_string(), l.service_name()))
        .collect();
    let labels = |i: usize| {
        [
            ("listen", names[i].0.as_str()),
            ("service", names[i].1.as_str()),
        ]
    };
    let mut m = describe(
        e,
        "srvlb_listener_backlog",
        "Clients whose connection the kernel completed and srvlb has not accepted yet.",
        GAUGE,
    )?;
    for (i, (_, backlog)) in rows.iter().enumerate() {
        if let Some(b) = backlog {
            sample(&mut m, &labels(i), GAUGE, b.queued)?;
        }
    }
    if let Some(capacity) = super::status::backlog_capacity() {
        let mut m = describe(
            e,
            "srvlb_listener_backlog_capacity",
            "Size of the listen backlog (4096, capped by net.core.somaxconn); beyond it SYNs are dropped.",
            GAUGE,
        )?;
        for i in 0..rows.len() {
            sample(&mut m, &labels(i), GAUGE, capacity)?;
        }
    }
    let mut m = describe(
        e,
        "srvlb_listener_accepting",
        "1 when the listener accepts new clients, 0 while it waits (see srvlb_listener_paused).",
        GAUGE,
    )?;
    for (i, (l, _)) in rows.iter().enumerate() {
        sample(&mut m, &labels(i), GAUGE, u64::from(l.paused().is_none()))?;
    }
    pause_families(e, &rows, &labels)
}

fn pause_families<'a, B>(
    e: &mut DescriptorEncoder<'_>,
    rows: &[(Arc<ListenerStatus>, B)],
    labels: &impl Fn(usize) -> [(&'a str, &'a str); 2],
) -> fmt::Result {
    let mut m = describe(
        e,
        "srvlb_listener_paused",
        "1 for the reason the listener is not accepting now (max_connections, fd_cap, accept_backoff).",
        GAUGE,
    )?;
    for (i, (l, _)) in rows.iter().enumerate() {
        let current = l.paused().map(|(reason, _)| reason);
        for reason in Pause::ALL {
            let [listen, service] = labels(i);
            let v = u64::from(current == Some(reason));
            sample(
                &mut m,
                &[listen, service, ("reason", reason.label())],
                GAUGE,
                v,
            )?;
        }
    }
    let mut m = describe(
        e,
        "srvlb_listener_pauses_total",
        "Times the listener stopped accepting, by reason.",
        COUNTER,
    )?;
    for (i, (l, _)) in rows.iter().enumerate() {
        for reason in Pause::ALL {
            let [listen, service] = labels(i);
            let v = l.pauses_total(reason);
            sample(
                &mut m,
                &[listen, service, ("reason", reason.label())],
                COUNTER,
                v,
            )?;
        }
    }
    Ok(())
}

/// The descriptor budget and the descriptors in use.
fn budget_families(e: &mut DescriptorEncoder<'_>, state: &AdminState) -> fmt::Result {
    if let Some((budget, tracker)) = state.process.lock().clone() {
        if let Some(limit) = budget.limit {
            single(
                e,
                "srvlb_fd_limit",
                "The soft RLIMIT_NOFILE the descriptor cap was derived from (absent: unlimited).",
                GAUGE,
                limit,
            )?;
        }
        single(
            e,
            "srvlb_fd_reserve",
            "Descriptors kept free of proxied connections (admin, DNS, pipes, listeners).",
            GAUGE,
            budget.reserve,
        )?;
        single(
            e,
            "srvlb_connection_cap",
            "Proxied connections allowed at once across all services (from RLIMIT_NOFILE).",
            GAUGE,
            budget.connection_cap as u64,
        )?;
        single(
            e,
            "srvlb_proxied_connections",
            "Proxied connections open now, across all services.",
            GAUGE,
            tracker.open() as u64,
        )?;
    }
    if let Some(open) = crate::fd_budget::open_fds() {
        single(
            e,
            "srvlb_fd_open",
            "Descriptors the process has open now.",
            GAUGE,
            open,
        )?;
    }
    Ok(())
}

/// The admin endpoint's own counters, the access log's and the reloads.
fn admin_families(e: &mut DescriptorEncoder<'_>, state: &AdminState) -> fmt::Result {
    let counters = [
        (
            "srvlb_admin_evictions_total",
            "Admin connections closed to make room for a newer one (all slots taken).",
            state.evictions.load(Ordering::Relaxed),
        ),
        (
            "srvlb_admin_bad_requests_total",
            "Admin requests answered 400 or 431.",
            state.bad_requests.load(Ordering::Relaxed),
        ),
        (
            "srvlb_admin_unauthorized_total",
            "Admin requests answered 401 (admin_token_file is set and the bearer token was missing or wrong).",
            state.unauthorized.load(Ordering::Relaxed),
        ),
        (
            "srvlb_access_log_lines_total",
            "Lines written to the access log.",
            crate::access_log::WRITTEN.load(Ordering::Relaxed),
        ),
        (
            "srvlb_access_log_dropped_total",
            "Access log lines dropped because the writer could not keep up.",
            crate::access_log::DROPPED.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, v) in counters {
        single(e, name, help, COUNTER, v)?;
    }
    let mut m = describe(
        e,
        "srvlb_reloads_total",
        "Configuration reloads by result.",
        COUNTER,
    )?;
    let ok = state.reloads_ok.load(Ordering::Relaxed);
    sample(&mut m, &[("result", "ok")], COUNTER, ok)?;
    let refused = state.reloads_failed.load(Ordering::Relaxed);
    sample(&mut m, &[("result", "refused")], COUNTER, refused)
}

/// The standard `process_*` series, with the names every Prometheus client library uses.
fn process_families(e: &mut DescriptorEncoder<'_>) -> fmt::Result {
    if let Some(open) = crate::fd_budget::open_fds() {
        single(
            e,
            "process_open_fds",
            "Number of open file descriptors.",
            GAUGE,
            open,
        )?;
    }
    if let Some(max) = max_fds() {
        single(
            e,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            GAUGE,
            max,
        )?;
    }
    let Some(stat) = ProcessStat::read() else {
        return Ok(());
    };
    let gauges = [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            stat.resident_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stat.virtual_bytes,
        ),
        (
            "process_threads",
            "Number of OS threads in the process.",
            stat.threads,
        ),
    ];
    for (name, help, v) in gauges {
        single(e, name, help, GAUGE, v)?;
    }
    let mut m = describe(
        e,
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
        COUNTER,
    )?;
    m.encode_counter::<NoLabelSet, f64, f64>(&stat.cpu_seconds, None)?;
    let mut m = describe(
        e,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        GAUGE,
    )?;
    m.encode_gauge(&stat.start_time_seconds)
}
