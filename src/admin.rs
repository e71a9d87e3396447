//! The admin endpoint: `/metrics` (Prometheus text format), `/status` (JSON of services,
//! listeners, tiers, backends and their health, and the descriptor budget) and `/healthz`. A
//! deliberately tiny HTTP/1.1 responder: one request per connection, GET only. It reads shared
//! state and changes nothing.
//!
//! It must answer when the rest of the process is under stress, so no client can hold it:
//! a request head must arrive within `HEAD_TIMEOUT`, anything that is not HTTP gets a 400 as
//! soon as that is clear, and when every slot is taken a new connection evicts the oldest one
//! still sending its head instead of waiting behind it. Its descriptors are part of the
//! reserve `fd_budget` keeps free of proxied connections, and a spare descriptor lets it
//! accept one more even when something else has used up the process's limit.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::fd_budget::{FdBudget, MAX_ADMIN_SLOTS};
use crate::health::now_ms;
use crate::pool::{BackendState, BackendStatus};
use crate::proxy::LogThrottle;
use crate::proxy::backlog::Backlog;
use crate::proxy::listener::{ConnectionTracker, ListenerStatus, Pause};
use crate::service::Service;

/// From accept to the end of the request head. An operator's client sends its request at
/// once; a client that trickles it (a byte a second) is cut off here.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// The whole exchange, from accept to close. A client that sends a request and never reads
/// the answer (or reads it a byte a minute) would otherwise hold a task and an fd for good.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head read; a longer one gets 431.
const MAX_HEAD: usize = 8192;

/// After an error answer, how long unread request bytes are drained before closing, so the
/// kernel does not turn the close into a reset that destroys the answer in flight.
const LINGER: Duration = Duration::from_millis(200);

/// What the admin endpoint reports, updated by control.
#[derive(Debug, Default)]
pub struct AdminState {
    services: ArcSwap<Vec<Arc<Service>>>,
    listeners: ArcSwap<Vec<Arc<ListenerStatus>>>,
    process: Mutex<Option<(FdBudget, ConnectionTracker)>>,
    /// Admin connections served at once (from the budget); 0 until set means the maximum.
    slots: AtomicUsize,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_reload: Mutex<Option<(bool, String)>>,
    evictions: AtomicU64,
    bad_requests: AtomicU64,
}

impl AdminState {
    pub fn set_services(&self, mut services: Vec<Arc<Service>>) {
        services.sort_by(|a, b| a.name.cmp(&b.name));
        self.services.store(Arc::new(services));
    }

    /// The proxy listeners to report, in any order.
    pub fn set_listeners(&self, mut listeners: Vec<Arc<ListenerStatus>>) {
        listeners.sort_by_key(|l| l.addr);
        self.listeners.store(Arc::new(listeners));
    }

    /// The descriptor budget in force and the tracker of proxied connections.
    pub fn set_budget(&self, budget: FdBudget, tracker: ConnectionTracker) {
        self.slots.store(budget.admin_slots, Ordering::Relaxed);
        *self.process.lock() = Some((budget, tracker));
    }

    fn slots(&self) -> usize {
        match self.slots.load(Ordering::Relaxed) {
            0 => MAX_ADMIN_SLOTS,
            n => n,
        }
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
        let task = tokio::spawn(accept_loop(listener, state));
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

/// One admin connection, as the slot table sees it.
#[derive(Debug)]
struct Slot {
    id: u64,
    /// True once the request head is complete and the answer is being written: such a
    /// connection is evicted only when no connection is still sending its head.
    answering: AtomicBool,
    /// Told to close; it stays in the table (and counts) until its task has ended.
    evicted: AtomicBool,
    evict: Notify,
}

/// The open admin connections, oldest first. At most `max` live ones, plus at most one that
/// was evicted and is closing, so the endpoint never holds more than `max + 1` descriptors.
#[derive(Debug, Default)]
struct Slots {
    open: Mutex<VecDeque<Arc<Slot>>>,
    next_id: AtomicU64,
    released: Notify,
}

impl Slots {
    /// Registers a new connection; when `max` are live already, evicts the oldest one still
    /// sending its head (or, if every one is answering, the oldest). True when one was
    /// evicted.
    fn admit(&self, max: usize) -> (Arc<Slot>, bool) {
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            answering: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        let mut open = self.open.lock();
        let mut evicted = false;
        loop {
            let live: Vec<&Arc<Slot>> = open
                .iter()
                .filter(|s| !s.evicted.load(Ordering::Relaxed))
                .collect();
            if live.len() < max.max(1) {
                break;
            }
            let victim = live
                .iter()
                .find(|s| !s.answering.load(Ordering::Relaxed))
                .unwrap_or(&live[0]);
            victim.evicted.store(true, Ordering::Relaxed);
            // notify_one keeps the wake-up if the task is not waiting yet.
            victim.evict.notify_one();
            evicted = true;
        }
        open.push_back(Arc::clone(&slot));
        (slot, evicted)
    }

    fn release(&self, id: u64) {
        let mut open = self.open.lock();
        if let Some(i) = open.iter().position(|s| s.id == id) {
            open.remove(i);
        }
        drop(open);
        self.released.notify_waiters();
    }

    /// Waits until at most `max` connections (live or closing) are open, so that accepting
    /// one more stays within `max + 1`. Evicted connections close within moments.
    async fn room(&self, max: usize) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.open.lock().len() <= max.max(1) {
                return;
            }
            released.await;
        }
    }
}

static ADMIN_ACCEPT_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));

async fn accept_loop(listener: TcpListener, state: Arc<AdminState>) {
    let slots = Arc::new(Slots::default());
    // Closed to make room for one accept when the process is out of descriptors.
    let mut spare = open_spare();
    loop {
        slots.room(state.slots()).await;
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                let exhausted = matches!(e.raw_os_error(), Some(23 | 24));
                if exhausted && spare.take().is_some() {
                    // The spare's descriptor is free now: this accept can succeed.
                    if ADMIN_ACCEPT_LOG.allow() {
                        warn!(error = %e, "admin accept: out of descriptors; using the spare");
                    }
                    continue;
                }
                if ADMIN_ACCEPT_LOG.allow() {
                    warn!(error = %e, "admin accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                spare = spare.or_else(open_spare);
                continue;
            }
        };
        let (slot, evicted) = slots.admit(state.slots());
        if evicted {
            state.evictions.fetch_add(1, Ordering::Relaxed);
        }
        let (state, slots) = (Arc::clone(&state), Arc::clone(&slots));
        tokio::spawn(async move {
            let serve = tokio::time::timeout(RESPONSE_TIMEOUT, serve(stream, &slot, &state));
            tokio::select! {
                result = serve => match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(error = %e, "admin request failed"),
                    Err(_) => debug!("admin client too slow; connection closed"),
                },
                () = slot.evict.notified() => debug!("admin connection evicted for a newer one"),
            }
            slots.release(slot.id);
        });
        if spare.is_none() {
            spare = open_spare();
        }
    }
}

/// A descriptor held in reserve (see the module doc); `None` if none can be had now.
fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// How a request head ended.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// Complete: method and path (query string removed).
    Request { method: String, path: String },
    /// Not HTTP/1.x, as far as it got; answered with 400 at once.
    Malformed(&'static str),
    /// Longer than `MAX_HEAD`.
    TooLarge,
    /// The bytes so far are a valid start: read more.
    Incomplete,
}

/// Parses as much of a request head as `buf` holds. Lines may end in CRLF or a bare LF
/// (RFC 9112 §2.2 lets a recipient accept LF alone; curl never sends it, people with nc do).
fn parse_head(buf: &[u8]) -> Head {
    let mut lines = buf.split_inclusive(|&b| b == b'\n');
    let Some(first) = lines.next() else {
        return Head::Incomplete;
    };
    let complete = first.ends_with(b"\n");
    let line = trim_eol(first);
    if let Some(why) = request_line_problem(line, complete) {
        return Head::Malformed(why);
    }
    if !complete {
        return if buf.len() >= MAX_HEAD {
            Head::TooLarge
        } else {
            Head::Incomplete
        };
    }
    for raw in lines {
        let complete = raw.ends_with(b"\n");
        let field = trim_eol(raw);
        if complete && field.is_empty() {
            let text = String::from_utf8_lossy(line);
            let mut parts = text.split(' ');
            let method = parts.next().unwrap_or("").to_owned();
            let target = parts.next().unwrap_or("");
            let path = target.split('?').next().unwrap_or("").to_owned();
            return Head::Request { method, path };
        }
        if let Some(why) = field_problem(field, complete) {
            return Head::Malformed(why);
        }
    }
    if buf.len() >= MAX_HEAD {
        Head::TooLarge
    } else {
        Head::Incomplete
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Why `line` (possibly only its beginning) cannot be an HTTP/1.x request line.
fn request_line_problem(line: &[u8], complete: bool) -> Option<&'static str> {
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or(b"");
    if !method.iter().all(u8::is_ascii_uppercase) || method.len() > 16 {
        return Some("the method is not an upper-case token");
    }
    let Some(target) = parts.next() else {
        // Only (part of) the method so far.
        return complete.then_some("no request target");
    };
    if method.is_empty() {
        return Some("empty method");
    }
    if !target.iter().all(|b| b.is_ascii_graphic()) {
        return Some("the request target has control or non-ASCII bytes");
    }
    let version = parts.next();
    if parts.next().is_some() {
        return Some("too many spaces in the request line");
    }
    match version {
        None if complete => Some("no HTTP version"),
        None => None,
        Some(v) => {
            let want: &[u8] = b"HTTP/1.";
            let prefix_ok = if v.len() <= want.len() {
                want.starts_with(v)
            } else {
                v.starts_with(want) && v.len() == want.len() + 1 && matches!(v[7], b'0' | b'1')
            };
            if !prefix_ok || (complete && v.len() != want.len() + 1) {
                Some("not HTTP/1.0 or HTTP/1.1")
            } else if complete && !target.starts_with(b"/") && target != b"*" {
                Some("the request target is not a path")
            } else {
                None
            }
        }
    }
}

/// Why `field` (possibly only its beginning) cannot be a header line.
fn field_problem(field: &[u8], complete: bool) -> Option<&'static str> {
    if field.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Some("obsolete line folding");
    }
    if field.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
        return Some("control bytes in a header");
    }
    if complete && !field.contains(&b':') {
        return Some("a header line without a colon");
    }
    None
}

/// Reads the request head until it is complete, malformed or too large; `None` when the
/// client closed or `HEAD_TIMEOUT` passed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Head>> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let reading = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            request.extend_from_slice(&buf[..n]);
            match parse_head(&request) {
                Head::Incomplete => continue,
                head => return Ok(Some(head)),
            }
        }
    };
    match tokio::time::timeout(HEAD_TIMEOUT, reading).await {
        Ok(result) => result,
        Err(_) => Ok(None),
    }
}

async fn serve(mut stream: TcpStream, slot: &Slot, state: &AdminState) -> std::io::Result<()> {
    let Some(head) = read_head(&mut stream).await? else {
        return Ok(());
    };
    let (status, content_type, body) = match head {
        Head::Request { method, path } => {
            slot.answering.store(true, Ordering::Relaxed);
            match (method.as_str(), path.as_str()) {
                ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics(state)),
                ("GET", "/status") => ("200 OK", "application/json", status_json(state)),
                ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_owned(),
                ),
            }
        }
        Head::Malformed(why) => {
            state.bad_requests.fetch_add(1, Ordering::Relaxed);
            debug!(why, "malformed admin request");
            (
                "400 Bad Request",
                "text/plain",
                format!("bad request: {why}\n"),
            )
        }
        Head::TooLarge => {
            state.bad_requests.fetch_add(1, Ordering::Relaxed);
            (
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n".to_owned(),
            )
        }
        Head::Incomplete => return Ok(()), // read_head never returns it
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    if !status.starts_with("200") {
        // The client may still be sending: read what it sends for a moment, so that the
        // close is a FIN and not a reset that could destroy the answer before it is read.
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(LINGER, async {
            while let Ok(n) = stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
    Ok(())
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
            |s| u64::from(s.discovery_status.stale.load(Ordering::Relaxed)),
        ),
        (
            "srvlb_dns_absent",
            "gauge",
            "1 while DNS says the service is absent (NXDOMAIN, NODATA, target \".\").",
            |s| u64::from(s.discovery_status.absence.lock().is_some()),
        ),
        (
            "srvlb_dns_empty_hold",
            "gauge",
            "1 during the empty hold: DNS says absent, the last backends still serve.",
            |s| {
                u64::from(
                    s.discovery_status
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
                s.discovery_status
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
            s.discovery_status.refreshes.load(Ordering::Relaxed)
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
            s.discovery_status.failures.load(Ordering::Relaxed)
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
        for BackendStatus {
            backend: b,
            state: st,
            ..
        } in s.pool.states()
        {
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
    listener_metrics(&mut out, state);
    process_metrics(&mut out, state);
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

/// The listeners with their accept queues, read now.
fn listeners_with_backlog(state: &AdminState) -> Vec<(Arc<ListenerStatus>, Option<Backlog>)> {
    let listeners = state.listeners.load();
    let inodes: Vec<u64> = listeners.iter().filter_map(|l| l.inode()).collect();
    let backlogs = crate::proxy::backlog::read(&inodes);
    listeners
        .iter()
        .map(|l| {
            let backlog = l.inode().and_then(|i| backlogs.get(&i).copied());
            (Arc::clone(l), backlog)
        })
        .collect()
}

fn backlog_capacity() -> Option<u64> {
    crate::proxy::backlog::capacity(crate::proxy::listener::BACKLOG as u64)
}

fn listener_metrics(out: &mut String, state: &AdminState) {
    let rows = listeners_with_backlog(state);
    let labels = |l: &ListenerStatus| {
        format!(
            "listen=\"{}\",service=\"{}\"",
            l.addr,
            label(&l.service_name())
        )
    };
    family(
        out,
        "srvlb_listener_backlog",
        "gauge",
        "Clients whose connection the kernel completed and srvlb has not accepted yet.",
    );
    for (l, backlog) in &rows {
        if let Some(b) = backlog {
            let _ = writeln!(out, "srvlb_listener_backlog{{{}}} {}", labels(l), b.queued);
        }
    }
    if let Some(capacity) = backlog_capacity() {
        family(
            out,
            "srvlb_listener_backlog_capacity",
            "gauge",
            "Size of the listen backlog (4096, capped by net.core.somaxconn); beyond it SYNs are dropped.",
        );
        for (l, _) in &rows {
            let _ = writeln!(
                out,
                "srvlb_listener_backlog_capacity{{{}}} {capacity}",
                labels(l)
            );
        }
    }
    family(
        out,
        "srvlb_listener_accepting",
        "gauge",
        "1 when the listener accepts new clients, 0 while it waits (see srvlb_listener_paused).",
    );
    for (l, _) in &rows {
        let accepting = u8::from(l.paused().is_none());
        let _ = writeln!(out, "srvlb_listener_accepting{{{}}} {accepting}", labels(l));
    }
    family(
        out,
        "srvlb_listener_paused",
        "gauge",
        "1 for the reason the listener is not accepting now (max_connections, fd_cap, accept_backoff).",
    );
    for (l, _) in &rows {
        let current = l.paused().map(|(reason, _)| reason);
        for reason in Pause::ALL {
            let _ = writeln!(
                out,
                "srvlb_listener_paused{{{},reason=\"{}\"}} {}",
                labels(l),
                reason.label(),
                u8::from(current == Some(reason))
            );
        }
    }
    family(
        out,
        "srvlb_listener_pauses_total",
        "counter",
        "Times the listener stopped accepting, by reason.",
    );
    for (l, _) in &rows {
        for reason in Pause::ALL {
            let _ = writeln!(
                out,
                "srvlb_listener_pauses_total{{{},reason=\"{}\"}} {}",
                labels(l),
                reason.label(),
                l.pauses_total(reason)
            );
        }
    }
}

fn process_metrics(out: &mut String, state: &AdminState) {
    let process = state.process.lock().clone();
    let mut gauge = |name: &str, help: &str, value: Option<u64>| {
        if let Some(value) = value {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
    };
    if let Some((budget, tracker)) = &process {
        gauge(
            "srvlb_fd_limit",
            "The soft RLIMIT_NOFILE the descriptor cap was derived from (absent: unlimited).",
            budget.limit,
        );
        gauge(
            "srvlb_fd_reserve",
            "Descriptors kept free of proxied connections (admin, DNS, pipes, listeners).",
            Some(budget.reserve),
        );
        gauge(
            "srvlb_connection_cap",
            "Proxied connections allowed at once across all services (from RLIMIT_NOFILE).",
            Some(budget.connection_cap as u64),
        );
        gauge(
            "srvlb_proxied_connections",
            "Proxied connections open now, across all services.",
            Some(tracker.open() as u64),
        );
    }
    gauge(
        "srvlb_fd_open",
        "Descriptors the process has open now.",
        crate::fd_budget::open_fds(),
    );
    family(
        out,
        "srvlb_admin_evictions_total",
        "counter",
        "Admin connections closed to make room for a newer one (all slots taken).",
    );
    let _ = writeln!(
        out,
        "srvlb_admin_evictions_total {}",
        state.evictions.load(Ordering::Relaxed)
    );
    family(
        out,
        "srvlb_admin_bad_requests_total",
        "counter",
        "Admin requests answered 400 or 431.",
    );
    let _ = writeln!(
        out,
        "srvlb_admin_bad_requests_total {}",
        state.bad_requests.load(Ordering::Relaxed)
    );
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
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
                .map(|BackendStatus { backend: b, priority, weight, state: st }| {
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
                    "stale": s.discovery_status.stale.load(Ordering::Relaxed),
                    "refreshes": s.discovery_status.refreshes.load(Ordering::Relaxed),
                    "failures": s.discovery_status.failures.load(Ordering::Relaxed),
                    "last_error": s.discovery_status.last_error.lock().clone(),
                    "empty_hold": s.discovery_status.absence.lock().as_ref().map(|a| json!({
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
    let now = now_ms();
    let listeners: Vec<serde_json::Value> = listeners_with_backlog(state)
        .into_iter()
        .map(|(l, backlog)| {
            let paused = l.paused();
            json!({
                "address": l.addr.to_string(),
                "service": l.service_name(),
                "accepting": paused.is_none(),
                "paused_reason": paused.map(|(reason, _)| reason.label()),
                "paused_for_ms": paused.map(|(_, since)| now.saturating_sub(since)),
                "backlog": backlog.map(|b| b.queued),
                "backlog_capacity": backlog_capacity(),
                "pauses": Pause::ALL
                    .iter()
                    .map(|r| (r.label().to_owned(), json!(l.pauses_total(*r))))
                    .collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    let process = state.process.lock().clone().map(|(budget, tracker)| {
        json!({
            "fd_limit": budget.limit,
            "fd_reserve": budget.reserve,
            "fd_open": crate::fd_budget::open_fds(),
            "connection_cap": budget.connection_cap,
            "proxied_connections": tracker.open(),
            "admin_slots": budget.admin_slots,
        })
    });
    let body = json!({
        "services": services,
        "listeners": listeners,
        "process": process,
        "reload": state.last_reload(),
    });
    let mut text = serde_json::to_string_pretty(&body).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str) -> Head {
        Head::Request {
            method: method.to_owned(),
            path: path.to_owned(),
        }
    }

    #[test]
    fn heads_with_crlf_or_bare_lf_are_complete() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            request("GET", "/metrics")
        );
        assert_eq!(
            parse_head(b"GET /healthz?x=1 HTTP/1.0\nHost: x\n\n"),
            request("GET", "/healthz")
        );
        assert_eq!(
            parse_head(b"GET /status HTTP/1.1\n\n"),
            request("GET", "/status")
        );
        assert_eq!(parse_head(b"POST / HTTP/1.1\r\n\r\n"), request("POST", "/"));
    }

    #[test]
    fn a_valid_beginning_is_incomplete() {
        for prefix in [
            &b""[..],
            b"G",
            b"GET",
            b"GET ",
            b"GET /met",
            b"GET /metrics HTT",
            b"GET /metrics HTTP/1.1\r",
            b"GET /metrics HTTP/1.1\r\nHost: x",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert_eq!(
                parse_head(prefix),
                Head::Incomplete,
                "{:?}",
                String::from_utf8_lossy(prefix)
            );
        }
    }

    #[test]
    fn anything_else_is_malformed_as_soon_as_it_shows() {
        for bad in [
            &b"\x16\x03\x01\x02\x00"[..], // a TLS ClientHello
            b"\x00\xff",
            b"get / HTTP/1.1\r\n",
            b"GET\r\n",
            b"GET / FTP/1.0",
            b"GET / HTTP/2.0\r\n",
            b"GET  / HTTP/1.1",
            b"GET / HTTP/1.1 x",
            b"GET /\x01 HTTP/1.1",
            b"GET x HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\n folded\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n",
            b"GET / HTTP/1.1\r\nA: \x00\r\n",
            b"\r\n",
        ] {
            assert!(
                matches!(parse_head(bad), Head::Malformed(_)),
                "{:?} -> {:?}",
                String::from_utf8_lossy(bad),
                parse_head(bad)
            );
        }
    }

    #[test]
    fn an_endless_head_is_too_large() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        while head.len() < MAX_HEAD {
            head.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(parse_head(&head), Head::TooLarge);
        let long_line = vec![b'/'; MAX_HEAD];
        let mut line = b"GET ".to_vec();
        line.extend_from_slice(&long_line);
        assert_eq!(parse_head(&line), Head::TooLarge);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_still_sending_its_head() {
        let slots = Slots::default();
        let evicted = |slots: &Slots| -> Vec<u64> {
            let open = slots.open.lock();
            open.iter()
                .filter(|s| s.evicted.load(Ordering::Relaxed))
                .map(|s| s.id)
                .collect()
        };
        let (a, _) = slots.admit(3);
        let (b, _) = slots.admit(3);
        let (c, _) = slots.admit(3);
        a.answering.store(true, Ordering::Relaxed);
        let (d, was_evicted) = slots.admit(3);
        assert!(was_evicted);
        assert_eq!(evicted(&slots), vec![b.id], "b: the oldest not answering");
        slots.release(b.id);
        // Everyone answering: the oldest goes.
        for s in [&c, &d] {
            s.answering.store(true, Ordering::Relaxed);
        }
        let (_e, _) = slots.admit(3);
        assert_eq!(evicted(&slots), vec![a.id]);
        assert_eq!(slots.open.lock().len(), 4, "three live and one closing");
        slots.release(a.id);
        assert_eq!(slots.open.lock().len(), 3);
    }

    #[tokio::test]
    async fn accepting_waits_for_an_evicted_connection_to_close() {
        let slots = Arc::new(Slots::default());
        let (first, _) = slots.admit(1);
        let (_second, evicted) = slots.admit(1);
        assert!(evicted && first.evicted.load(Ordering::Relaxed));
        let waiting = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.room(1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "two open: no room for a third");
        slots.release(first.id);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("room once the evicted one closed")
            .expect("task");
    }

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
