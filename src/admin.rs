//! The admin endpoint: `/metrics` (Prometheus text format), `/status` (JSON of services,
//! tiers, backends and their health) and `/healthz`. A deliberately tiny HTTP/1.1 responder:
//! one request per connection, GET only. It reads shared state and changes nothing.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::health::now_ms;
use crate::pool::BackendState;
use crate::service::Service;

/// Admin connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;

/// The whole exchange, from accept to close. A client that sends a request and never reads
/// the answer (or reads it a byte a minute) would otherwise hold a task and an fd for good.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin endpoint reports, updated by control.
#[derive(Debug, Default)]
pub struct AdminState {
    services: ArcSwap<Vec<Arc<Service>>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_reload: Mutex<Option<(bool, String)>>,
}

impl AdminState {
    pub fn set_services(&self, mut services: Vec<Arc<Service>>) {
        services.sort_by(|a, b| a.name.cmp(&b.name));
        self.services.store(Arc::new(services));
    }

    pub fn record_reload(&self, ok: bool, message: String) {
        if ok {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        }
        *self.last_reload.lock() = Some((ok, message));
    }

    /// "last reload: ok" / "last reload: refused: ..." / "no reload yet".
    pub fn last_reload(&self) -> String {
        match &*self.last_reload.lock() {
            None => "no reload yet".to_owned(),
            Some((true, _)) => "last reload: ok".to_owned(),
            Some((false, why)) => format!("last reload: refused: {why}"),
        }
    }
}

/// A running admin listener.
#[derive(Debug)]
pub struct Admin {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Admin {
    /// Binds synchronously (so a reload can refuse an unusable address) and starts serving.
    pub fn bind(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<Admin> {
        let socket = crate::proxy::listener::bind(addr)?;
        let addr = socket.local_addr()?;
        let listener = TcpListener::from_std(socket)?;
        let task = tokio::spawn(async move {
            // A permit is taken before accepting, as the proxy listeners do: beyond the cap,
            // clients wait in the kernel backlog (holding no fd or task of ours) and are
            // served as soon as a slot frees, at the latest one RESPONSE_TIMEOUT later. Closing
            // them at once instead would fail a legitimate scrape that happens to arrive
            // during a flood, and save nothing the backlog does not already bound.
            let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            loop {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    return; // never closed
                };
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(RESPONSE_TIMEOUT, respond(stream, &state)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(error = %e, "admin request failed"),
                        Err(_) => debug!("admin client too slow; connection closed"),
                    }
                });
            }
        });
        Ok(Admin { addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and closes the socket; the same as dropping it.
    pub fn close(self) {}
}

/// A reload that binds a new admin listener and then fails a later step drops it: the
/// accept task (which owns the socket) must go with it, or the refused config's endpoint
/// would keep serving and every retry would bind another one beside it (SO_REUSEPORT).
impl Drop for Admin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn respond(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // Read the request head (bounded in size and time; this endpoint serves operators).
    let head_complete = tokio::time::timeout(Duration::from_secs(5), async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(head_complete, Ok(Ok(()))) {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&request);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics(state)),
        ("GET", "/status") => ("200 OK", "application/json", status_json(state)),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A per-service metric: name, Prometheus type, help text, and how to read it.
type ServiceMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Service) -> u64,
);

fn metrics(state: &AdminState) -> String {
    let services = state.services.load();
    let mut out = String::with_capacity(4096);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let service_counters: [ServiceMetric; 15] = [
        (
            "srvlb_service_connections_total",
            "counter",
            "Client connections accepted.",
            |s| s.stats.accepted.load(Ordering::Relaxed),
        ),
        (
            "srvlb_service_active_connections",
            "gauge",
            "Client connections open now.",
            |s| s.stats.active.load(Ordering::Relaxed),
        ),
        (
            "srvlb_service_denied_total",
            "counter",
            "Client connections refused by allow/deny.",
            |s| s.stats.denied.load(Ordering::Relaxed),
        ),
        (
            "srvlb_service_no_backend_total",
            "counter",
            "Client connections closed because the service had no backend.",
            |s| s.stats.no_backend.load(Ordering::Relaxed),
        ),
        (
            "srvlb_service_connect_exhausted_total",
            "counter",
            "Client connections closed because every attempted backend failed.",
            |s| s.stats.connect_exhausted.load(Ordering::Relaxed),
        ),
        (
            "srvlb_service_retries_total",
            "counter",
            "Connect attempts beyond the first.",
            |s| s.stats.retries.load(Ordering::Relaxed),
        ),
        (
            "srvlb_service_proxy_header_rejected_total",
            "counter",
            "Client connections closed because accept_proxy is on and no valid PROXY header came in time.",
            |s| s.stats.proxy_header_rejected.load(Ordering::Relaxed),
        ),
        (
            "srvlb_service_source_connection_limited_total",
            "counter",
            "Client connections closed because their source had max_connections_per_source open.",
            |s| s.stats.source_connection_limited.load(Ordering::Relaxed),
        ),
        (
            "srvlb_service_source_rate_limited_total",
            "counter",
            "Client connections closed because their source exceeded rate_per_source.",
            |s| s.stats.source_rate_limited.load(Ordering::Relaxed),
        ),
        (
            "srvlb_service_tracked_sources",
            "gauge",
            "Sources (IPv4 addresses, IPv6 /64s) the per-source limits track now.",
            |s| s.connection_limit().sources().tracked() as u64,
        ),
        (
            "srvlb_service_untracked_sources_total",
            "counter",
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
            "gauge",
            "1 when the last DNS lookup failed and the last known backends are served.",
            |s| u64::from(s.discovery.stale.load(Ordering::Relaxed)),
        ),
        (
            "srvlb_dns_absent",
            "gauge",
            "1 while DNS says the service is absent (NXDOMAIN, NODATA, target \".\").",
            |s| u64::from(s.discovery.absence.lock().is_some()),
        ),
        (
            "srvlb_dns_empty_hold",
            "gauge",
            "1 during the empty hold: DNS says absent, the last backends still serve.",
            |s| {
                u64::from(
                    s.discovery
                        .absence
                        .lock()
                        .as_ref()
                        .is_some_and(|a| a.in_hold()),
                )
            },
        ),
        (
            "srvlb_dns_empty_hold_remaining_seconds",
            "gauge",
            "Seconds until the empty hold ends and the SRV backends are removed (0 when none).",
            |s| {
                s.discovery
                    .absence
                    .lock()
                    .as_ref()
                    .map_or(0, |a| a.remaining_ms().div_ceil(1000))
            },
        ),
    ];
    for (name, kind, help, read) in service_counters {
        family(&mut out, name, kind, help);
        for s in services.iter() {
            let _ = writeln!(out, "{name}{{service=\"{}\"}} {}", label(&s.name), read(s));
        }
    }
    family(
        &mut out,
        "srvlb_dns_refreshes_total",
        "counter",
        "Successful DNS lookups.",
    );
    for s in services.iter() {
        let _ = writeln!(
            out,
            "srvlb_dns_refreshes_total{{service=\"{}\"}} {}",
            label(&s.name),
            s.discovery.refreshes.load(Ordering::Relaxed)
        );
    }
    family(
        &mut out,
        "srvlb_dns_failures_total",
        "counter",
        "Failed DNS lookups (timeout, SERVFAIL, REFUSED, network).",
    );
    for s in services.iter() {
        let _ = writeln!(
            out,
            "srvlb_dns_failures_total{{service=\"{}\"}} {}",
            label(&s.name),
            s.discovery.failures.load(Ordering::Relaxed)
        );
    }
    let backend_metrics: [(&str, &str, &str); 8] = [
        (
            "srvlb_backend_active_connections",
            "gauge",
            "Connections open to the backend.",
        ),
        (
            "srvlb_backend_connections_total",
            "counter",
            "Connections made to the backend.",
        ),
        (
            "srvlb_backend_connect_failures_total",
            "counter",
            "Failed connects to the backend.",
        ),
        (
            "srvlb_backend_ejections_total",
            "counter",
            "Times the backend was ejected.",
        ),
        (
            "srvlb_backend_readmissions_total",
            "counter",
            "Times an ejected backend carried data again and was re-admitted.",
        ),
        (
            "srvlb_backend_bytes_sent_total",
            "counter",
            "Bytes from clients to the backend.",
        ),
        (
            "srvlb_backend_bytes_received_total",
            "counter",
            "Bytes from the backend to clients.",
        ),
        (
            "srvlb_backend_up",
            "gauge",
            "1 when the backend takes new connections (active), else 0.",
        ),
    ];
    let mut rows: Vec<String> = vec![String::new(); backend_metrics.len()];
    let mut states = String::new();
    for s in services.iter() {
        for (b, _, _, st) in s.pool.states() {
            // No state label here: a label that changes would split every counter into a
            // new series and break rate(); the state has its own gauge below.
            let labels = format!(
                "service=\"{}\",backend=\"{}\",target=\"{}\"",
                label(&s.name),
                b.addr(),
                label(&b.key.target),
            );
            let values = [
                b.stats.active.load(Ordering::Relaxed),
                b.stats.connections.load(Ordering::Relaxed),
                b.stats.connect_failures.load(Ordering::Relaxed),
                b.health.total_ejections(),
                b.health.total_readmissions(),
                b.stats.bytes_sent.load(Ordering::Relaxed),
                b.stats.bytes_received.load(Ordering::Relaxed),
                u64::from(st == BackendState::Active),
            ];
            for (i, v) in values.iter().enumerate() {
                let _ = writeln!(rows[i], "{}{{{labels}}} {v}", backend_metrics[i].0);
            }
            for state in ["active", "ejected", "draining", "standby", "address_unused"] {
                let _ = writeln!(
                    states,
                    "srvlb_backend_state{{{labels},state=\"{state}\"}} {}",
                    u8::from(st.label() == state)
                );
            }
        }
    }
    for ((name, kind, help), row) in backend_metrics.iter().zip(rows) {
        family(&mut out, name, kind, help);
        out.push_str(&row);
    }
    family(
        &mut out,
        "srvlb_backend_state",
        "gauge",
        "1 for the backend's current state (active, ejected, draining, standby), else 0.",
    );
    out.push_str(&states);
    #[cfg(target_os = "linux")]
    {
        use crate::proxy::splice::PIPES;
        family(
            &mut out,
            "srvlb_splice_pipes_idle",
            "gauge",
            "Empty splice pipes kept for reuse (two file descriptors each).",
        );
        let _ = writeln!(out, "srvlb_splice_pipes_idle {}", PIPES.idle());
        family(
            &mut out,
            "srvlb_splice_pipes_created_total",
            "counter",
            "Splice pipes created.",
        );
        let _ = writeln!(out, "srvlb_splice_pipes_created_total {}", PIPES.created());
    }
    for (name, help, value) in [
        (
            "srvlb_access_log_lines_total",
            "Lines written to the access log.",
            &crate::access_log::WRITTEN,
        ),
        (
            "srvlb_access_log_dropped_total",
            "Access log lines dropped because the writer could not keep up.",
            &crate::access_log::DROPPED,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
    }
    family(
        &mut out,
        "srvlb_reloads_total",
        "counter",
        "Configuration reloads by result.",
    );
    let _ = writeln!(
        out,
        "srvlb_reloads_total{{result=\"ok\"}} {}",
        state.reloads_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "srvlb_reloads_total{{result=\"refused\"}} {}",
        state.reloads_failed.load(Ordering::Relaxed)
    );
    out
}

fn status_json(state: &AdminState) -> String {
    let now = now_ms();
    let services: Vec<serde_json::Value> = state
        .services
        .load()
        .iter()
        .map(|s| {
            let cfg = s.config();
            let backends: Vec<serde_json::Value> = s
                .pool
                .states()
                .into_iter()
                .map(|(b, priority, weight, st)| {
                    let mut v = json!({
                        "address": b.addr().to_string(),
                        "target": &*b.key.target,
                        "port": b.key.port,
                        "priority": priority,
                        "weight": weight,
                        "state": st.label(),
                        "active_connections": b.active(),
                        "connections": b.stats.connections.load(Ordering::Relaxed),
                        "connect_failures": b.stats.connect_failures.load(Ordering::Relaxed),
                        "consecutive_failures": b.health.consecutive_failures(),
                        "ejections": b.health.total_ejections(),
                    });
                    match st {
                        BackendState::Ejected { until_ms, failures } => {
                            v["ejected_for_ms"] = json!(until_ms.saturating_sub(now));
                            v["reason"] = json!(format!("{failures} consecutive failures"));
                        }
                        BackendState::Draining { connections } => {
                            v["reason"] =
                                json!(format!("removed from DNS; {connections} connections open"));
                        }
                        BackendState::Standby => {
                            v["reason"] = json!("a preferred tier has usable backends")
                        }
                        BackendState::AddressUnused { until_ms, failures } => {
                            v["ejected_for_ms"] = json!(until_ms.saturating_sub(now));
                            v["reason"] = json!(format!(
                                "this address fails ({failures} consecutive failures); the target is served on its other addresses"
                            ));
                        }
                        BackendState::Active if b.is_removal_pending() => {
                            v["reason"] = json!(
                                "left out of the latest DNS answer; kept until the next lookup confirms the removal"
                            );
                        }
                        BackendState::Active if b.health.is_held(now) => {
                            v["reason"] = json!(format!(
                                "{} consecutive failures; kept in service by max_ejected_percent",
                                b.health.consecutive_failures()
                            ));
                        }
                        BackendState::Active => {}
                    }
                    v
                })
                .collect();
            json!({
                "name": s.name,
                "listen": cfg.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "srv": cfg.srv,
                "balance": format!("{:?}", cfg.balance).to_lowercase(),
                "active_connections": s.stats.active.load(Ordering::Relaxed),
                "dns": {
                    "stale": s.discovery.stale.load(Ordering::Relaxed),
                    "refreshes": s.discovery.refreshes.load(Ordering::Relaxed),
                    "failures": s.discovery.failures.load(Ordering::Relaxed),
                    "last_error": s.discovery.last_error.lock().clone(),
                    "empty_hold": s.discovery.absence.lock().as_ref().map(|a| json!({
                        "in_hold": a.in_hold(),
                        "emptied": a.emptied,
                        "reason": a.reason,
                        "since_unix_ms": a.since_unix_ms,
                        "until_unix_ms": a.until_unix_ms,
                        "remaining_ms": a.remaining_ms(),
                    })),
                },
                "backends": backends,
            })
        })
        .collect();
    let body = json!({
        "services": services,
        "reload": state.last_reload(),
    });
    let mut text = serde_json::to_string_pretty(&body).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_the_admin_closes_its_socket() {
        let state = Arc::new(AdminState::default());
        let admin = Admin::bind("127.0.0.1:0".parse().expect("addr"), state).expect("bind");
        let addr = admin.addr();
        assert!(
            TcpStream::connect(addr).await.is_ok(),
            "serving before drop"
        );
        drop(admin);
        // The abort takes effect when the runtime next polls the task.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a dropped Admin still accepts on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
