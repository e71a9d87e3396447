//! The data path: listeners that accept clients, and the connection task that picks a
//! backend, connects (retrying on another backend when a connect fails), writes the optional
//! PROXY header, and moves bytes until either side is done. It reads service state; it never
//! changes the pool's membership.

pub mod copy;
pub mod listener;
pub mod proxy_protocol;
#[cfg(target_os = "linux")]
pub mod splice;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::balance::select::{Selector, client_key};
use crate::config::ServiceConfig;
use crate::health::{FailureVerdict, now_ms};
use crate::pool::{Backend, Snapshot};
use crate::service::Service;
use copy::{End, Side, Transfer, proxy_streams, reset_on_close};

/// Logs at most `burst` lines per `interval`: for events that can repeat thousands of times a
/// second (accept errors, a failing backend under load, many backends flapping at once)
/// without flooding the journal. What it holds back is counted and reported on the next line
/// it lets through, so an operator knows lines are missing.
#[derive(Debug)]
pub struct LogThrottle {
    interval_ms: u64,
    burst: u64,
    window_start: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// One line per `interval`.
    pub const fn new(interval: Duration) -> LogThrottle {
        LogThrottle::with_burst(interval, 1)
    }

    /// Up to `burst` lines per `interval`.
    pub const fn with_burst(interval: Duration, burst: u64) -> LogThrottle {
        LogThrottle {
            interval_ms: interval.as_millis() as u64,
            burst,
            window_start: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// True when the caller should log now.
    pub fn allow(&self) -> bool {
        self.permit().is_some()
    }

    /// `Some(lines held back since the last permitted one)` when the caller should log now.
    pub fn permit(&self) -> Option<u64> {
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

/// True when `client` may use the service: not in `deny`, and in `allow` when it is set.
pub fn client_allowed(config: &ServiceConfig, client: IpAddr) -> bool {
    let ip = match client {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    if config.deny.iter().any(|net| net.contains(&ip)) {
        return false;
    }
    config.allow.is_empty() || config.allow.iter().any(|net| net.contains(&ip))
}

/// A backend's share of one client connection, from selection to close: it counts in the
/// backend's active connections while the connect is still in flight, so that P2C sees a
/// backend that is slow to accept as busy rather than idle during a burst. Dropped on a
/// failed connect, and keeps the count right however the task ends.
struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    fn new(backend: Arc<Backend>) -> ActiveGuard {
        backend.stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(backend)
    }

    /// The connect succeeded: only now is it a connection of the backend's.
    fn connected(&self) {
        self.0.stats.connections.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct ServiceActive<'a>(&'a Service);

impl Drop for ServiceActive<'_> {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

static CONNECT_FAILURE_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));
static LOCAL_RESOURCE_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));
// Ejections and re-admissions happen at most once per `base_ejection` per backend, but a
// large pool losing a rack at once would still print a line per backend.
static EJECTION_LOG: LogThrottle = LogThrottle::with_burst(Duration::from_secs(1), 20);
static READMISSION_LOG: LogThrottle = LogThrottle::with_burst(Duration::from_secs(1), 20);

/// Serves one accepted client from start to close.
///
/// `tracked` counts the connection for the shutdown drain and tells it when the drain's
/// grace has elapsed, so that the connection is ended by its own task, which knows whether
/// bytes are still in flight (and then resets both sides instead of closing them cleanly).
pub async fn serve_client(
    service: Arc<Service>,
    client: TcpStream,
    peer: SocketAddr,
    tracked: listener::Tracked,
) {
    let started = Instant::now();
    service.stats.accepted.fetch_add(1, Ordering::Relaxed);
    service.stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = ServiceActive(&service);
    let config = service.config();
    if !client_allowed(&config, peer.ip()) {
        service.stats.denied.fetch_add(1, Ordering::Relaxed);
        debug!(service = %service.name, client = %peer, "client denied by allow/deny");
        return;
    }
    let _ = client.set_nodelay(true);
    let snapshot = service.pool.snapshot();
    if snapshot.is_empty() {
        service.stats.no_backend.fetch_add(1, Ordering::Relaxed);
        reset_on_close(&client);
        info!(service = %service.name, client = %peer, reason = "no_backend", "connection closed");
        return;
    }
    let (backend_active, stream, attempts, connected_at) =
        match connect_any(&service, &config, &snapshot, peer).await {
            Ok(found) => found,
            Err(failure) => {
                let reason = match failure {
                    NoBackend::Exhausted => {
                        service
                            .stats
                            .connect_exhausted
                            .fetch_add(1, Ordering::Relaxed);
                        "all_backends_failed"
                    }
                    NoBackend::Local => "local_resources",
                };
                reset_on_close(&client);
                info!(
                    service = %service.name,
                    client = %peer,
                    reason,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "connection closed"
                );
                return;
            }
        };
    let backend = &backend_active.0;
    set_keepalive(&client, config.tcp_keepalive);
    set_keepalive(&stream, config.tcp_keepalive);
    let transfer = match send_proxy_header(&config, &client, peer, &stream).await {
        Ok(()) => {
            // The first byte either way proves the backend works: record the success then,
            // not at close, so a long-lived connection re-admits an ejected backend (and
            // resets its failure count) as soon as it carries data.
            let proven = AtomicBool::new(false);
            let count = |side: Side, n: u64| {
                match side {
                    Side::Client => backend.stats.bytes_sent.fetch_add(n, Ordering::Relaxed),
                    Side::Backend => backend.stats.bytes_received.fetch_add(n, Ordering::Relaxed),
                };
                if !proven.load(Ordering::Relaxed) && !proven.swap(true, Ordering::Relaxed) {
                    record_success(&service, backend, connected_at);
                }
            };
            proxy_streams(&client, &stream, config.idle_timeout, tracked.cut(), &count).await
        }
        Err(e) => {
            reset_on_close(&client);
            Transfer {
                client_to_backend: 0,
                backend_to_client: 0,
                first_to_finish: Some(Side::Backend),
                first_finish_at: Some(now_ms()),
                end: End::Reset(Side::Backend, e.kind()),
                cut_pending: false,
            }
        }
    };
    judge_backend(
        &service,
        &config,
        &snapshot,
        backend,
        connected_at,
        &transfer,
    );
    info!(
        service = %service.name,
        client = %peer,
        backend = %backend.addr(),
        target = %backend.key.target,
        attempts,
        bytes_in = transfer.client_to_backend,
        bytes_out = transfer.backend_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        reason = %transfer.end.label(),
        reset_pending = transfer.cut_pending,
        "connection closed"
    );
}

/// A backend that reset before a single byte moved either way, or closed within
/// `connect_timeout` of the connect, failed: it accepted and then refused to serve. A clean
/// close later than that is a backend timing out a silent client (Postgres'
/// authentication_timeout, an SMTP greeting wait): normal for protocols where the client
/// speaks first, and no sign of trouble. Success was recorded when the first byte moved; a
/// reset after that is passed on to the client but says nothing reliable about new
/// connections, and the client leaving first says nothing about the backend at all.
fn judge_backend(
    service: &Service,
    config: &ServiceConfig,
    snapshot: &Snapshot,
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
    record_failure(service, config, snapshot, backend, why);
}

fn record_success(service: &Service, backend: &Backend, connected_at: u64) {
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

async fn send_proxy_header(
    config: &ServiceConfig,
    client: &TcpStream,
    peer: SocketAddr,
    backend: &TcpStream,
) -> io::Result<()> {
    let Some(version) = config.send_proxy else {
        return Ok(());
    };
    let local = client.local_addr()?;
    let header = proxy_protocol::header(version, peer, local);
    copy::write_all(backend, &header).await
}

/// Why `connect_any` found no backend for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoBackend {
    /// Every candidate it was allowed to try failed.
    Exhausted,
    /// This host could not make a connection at all (out of descriptors, ports or memory).
    Local,
}

/// Walks the selector's candidates until one connects, at most `1 + connect_retries` times.
async fn connect_any(
    service: &Service,
    config: &ServiceConfig,
    snapshot: &Snapshot,
    peer: SocketAddr,
) -> Result<(ActiveGuard, TcpStream, u32, u64), NoBackend> {
    let key = client_key(peer, config.hash_key);
    let mut selector = Selector::new(snapshot, config.balance, key, now_ms())
        .with_attempts(config.connect_retries.saturating_add(1));
    let mut attempts = 0u32;
    while attempts <= config.connect_retries {
        let active = {
            let mut rng = rand::rng();
            ActiveGuard::new(
                selector
                    .next_backend(&mut rng)
                    .ok_or(NoBackend::Exhausted)?,
            )
        };
        let backend = &active.0;
        attempts += 1;
        if attempts > 1 {
            service.stats.retries.fetch_add(1, Ordering::Relaxed);
        }
        let e = match connect(backend.addr(), config.connect_timeout).await {
            Ok(stream) => {
                active.connected();
                return Ok((active, stream, attempts, now_ms()));
            }
            Err(e) => e,
        };
        if e.blame == Blame::Local {
            // Every other backend would fail the same way, and none of them is at fault:
            // trying them would only spread wrong failure counts across the pool.
            if let Some(suppressed) = LOCAL_RESOURCE_LOG.permit() {
                warn!(
                    service = %service.name,
                    backend = %backend.addr(),
                    client = %peer,
                    error = %e.error,
                    suppressed,
                    "cannot connect to backends: out of local resources (descriptors, ports \
                     or memory); client closed, backend not blamed"
                );
            }
            return Err(NoBackend::Local);
        }
        let why = if e.error.kind() == io::ErrorKind::TimedOut {
            "connect timeout".to_owned()
        } else {
            format!("connect: {}", e.error)
        };
        if let Some(suppressed) = CONNECT_FAILURE_LOG.permit() {
            warn!(
                service = %service.name,
                backend = %backend.addr(),
                client = %peer,
                attempt = attempts,
                retrying = attempts <= config.connect_retries,
                error = %why,
                blamed = e.blame == Blame::Backend,
                suppressed,
                "backend connect failed"
            );
        }
        if e.blame == Blame::Backend {
            backend
                .stats
                .connect_failures
                .fetch_add(1, Ordering::Relaxed);
            record_failure(service, config, snapshot, backend, &why);
        }
    }
    Err(NoBackend::Exhausted)
}

fn record_failure(
    service: &Service,
    config: &ServiceConfig,
    snapshot: &Snapshot,
    backend: &Arc<Backend>,
    why: &str,
) {
    let policy = &config.health;
    let count = backend.health.count_failure(now_ms(), policy);
    let verdict = if count.ejection_due {
        // Held across the cap check and the ejection so that concurrent failures of
        // different backends cannot together exceed max_ejected_percent. Taken only at the
        // threshold: failures below it touch nothing shared but the backend's own atomics.
        let _gate = service.pool.ejection_gate();
        let now = now_ms();
        backend.health.try_eject(now, policy, || {
            snapshot
                .tier_of(backend)
                .is_some_and(|tier| tier.may_eject_one(now, policy.max_ejected_percent))
        })
    } else {
        FailureVerdict::Counted {
            consecutive: count.consecutive,
        }
    };
    match verdict {
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

/// Whose fault a failed connect is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// Refused, reset, aborted, timed out or unreachable: the backend (or the path to it)
    /// failed. Counts against its health; another backend is tried.
    Backend,
    /// This host is out of descriptors, ephemeral ports or memory. Says nothing about the
    /// backend, and every other backend would fail the same way: nothing is counted and no
    /// other backend is tried.
    Local,
    /// Anything else (EACCES/EPERM from a local firewall rule, an unexpected errno): not
    /// known to be the backend's fault, so not counted, but another backend may work.
    Unknown,
}

/// A failed connect and whose fault it is.
#[derive(Debug)]
pub struct ConnectError {
    pub blame: Blame,
    pub error: io::Error,
}

/// Classifies an error of `connect(2)` (or of the timeout around it).
pub fn blame(e: &io::Error) -> Blame {
    use rustix::io::Errno;
    if e.kind() == io::ErrorKind::TimedOut {
        return Blame::Backend;
    }
    match Errno::from_io_error(e) {
        Some(
            Errno::CONNREFUSED
            | Errno::CONNRESET
            | Errno::CONNABORTED
            | Errno::HOSTUNREACH
            | Errno::NETUNREACH
            // An address family this host cannot use (an AAAA target on a host with IPv6
            // disabled): that backend address is unreachable from here, like NETUNREACH.
            | Errno::AFNOSUPPORT
            | Errno::PROTONOSUPPORT,
        ) => Blame::Backend,
        Some(Errno::ADDRNOTAVAIL | Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM) => {
            Blame::Local
        }
        _ => Blame::Unknown,
    }
}

/// Turns on TCP keepalive so that a peer that vanished (a host powered off, a NAT entry
/// dropped) is noticed after about `(1 + KEEPALIVE_PROBES) * every` of silence instead of at
/// the idle timeout, which is typically an hour.
fn set_keepalive(stream: &TcpStream, every: Option<Duration>) {
    let Some(every) = every else {
        return;
    };
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(every)
        .with_interval(every)
        .with_retries(crate::config::KEEPALIVE_PROBES);
    // Fails only when the connection is already gone; the transfer will report that.
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Connects with TCP_NODELAY within `timeout`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    // EMFILE/ENFILE/ENOBUFS/ENOMEM here are local shortages; EAFNOSUPPORT means this
    // backend's address family is unusable on this host (see `blame`).
    let socket = socket.map_err(|error| ConnectError {
        blame: blame(&error),
        error,
    })?;
    let stream = match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return Err(ConnectError {
                blame: blame(&error),
                error,
            });
        }
        Err(_) => {
            return Err(ConnectError {
                blame: Blame::Backend,
                error: io::ErrorKind::TimedOut.into(),
            });
        }
    };
    // Only fails when the connection is already gone; the transfer will report that.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(e: rustix::io::Errno) -> io::Error {
        io::Error::from_raw_os_error(e.raw_os_error())
    }

    #[test]
    fn only_backend_failures_are_blamed_on_the_backend() {
        use rustix::io::Errno;
        for e in [
            Errno::CONNREFUSED,
            Errno::CONNRESET,
            Errno::CONNABORTED,
            Errno::HOSTUNREACH,
            Errno::NETUNREACH,
            Errno::TIMEDOUT,
            Errno::AFNOSUPPORT,
        ] {
            assert_eq!(blame(&errno(e)), Blame::Backend, "{e:?}");
        }
        assert_eq!(
            blame(&io::ErrorKind::TimedOut.into()),
            Blame::Backend,
            "the connect_timeout"
        );
        for e in [
            Errno::ADDRNOTAVAIL,
            Errno::MFILE,
            Errno::NFILE,
            Errno::NOBUFS,
            Errno::NOMEM,
        ] {
            assert_eq!(blame(&errno(e)), Blame::Local, "{e:?}");
        }
        for e in [Errno::ACCESS, Errno::PERM, Errno::INVAL] {
            assert_eq!(blame(&errno(e)), Blame::Unknown, "{e:?}");
        }
    }
}
