//! The data path: listeners that accept clients, and the connection task that serves one.
//! A connection goes through its stages, each a function below or a module of its own:
//! introduce (who the client is: its own address, or a PROXY header's with `accept_proxy`)
//! -> admit (allow/deny, a pool to pick from) -> pick and connect, retrying on another
//! backend (`connect`) -> the optional PROXY header (`proxy_protocol`) -> move bytes both
//! ways (`copy`, `splice`) -> judge the backend by how the connection went
//! (`health::judge`).
//! It reads service state; it never changes the pool's membership.

pub(crate) mod backlog;
pub(crate) mod connect;
pub(crate) mod copy;
mod direction;
pub(crate) mod listener;
mod pause;
mod progress;
pub mod proxy_protocol;
#[cfg(target_os = "linux")]
pub(crate) mod splice;
mod tracker;
#[cfg(target_os = "linux")]
pub(crate) mod uring;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::access_log;
use crate::config::{DataPath, ServiceConfig};
use crate::health::{judge, now_ms};
use crate::pool::Backend;
use crate::service::Service;
use crate::source_limits::{Refusal, SourceSlot};
use connect::{Connected, NoBackend, connect_any};
use copy::{Side, Transfer, proxy_streams, reset_on_close};

pub(crate) use crate::log_throttle::LogThrottle;

/// An IPv4 client reaching an IPv6 listener appears as `::ffff:a.b.c.d`; every rule about
/// clients (allow/deny, the Maglev key, per-source limits, the PROXY header) means `a.b.c.d`.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// True when `client` may use the service: not in `deny`, and in `allow` when it is set.
pub(crate) fn client_allowed(config: &ServiceConfig, client: IpAddr) -> bool {
    let ip = canonical_ip(client);
    if config.deny.iter().any(|net| net.contains(&ip)) {
        return false;
    }
    config.allow.is_empty() || config.allow.iter().any(|net| net.contains(&ip))
}

/// Counts the client in the service's active connections for as long as it lives.
struct ServiceActive<'a>(&'a Service);

impl<'a> ServiceActive<'a> {
    fn new(service: &'a Service) -> ServiceActive<'a> {
        service.stats.accepted.fetch_add(1, Ordering::Relaxed);
        service.stats.active.fetch_add(1, Ordering::Relaxed);
        ServiceActive(service)
    }
}

impl Drop for ServiceActive<'_> {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one accepted client from start to close.
///
/// `tracked` counts the connection for the shutdown drain and tells it when the drain's
/// grace has elapsed, so that the connection is ended by its own task, which knows whether
/// bytes are still in flight (and then resets both sides instead of closing them cleanly).
/// `permits` (the accept loop's connection permits) are held until the connection ends.
///
/// Spawned as it is: a wrapping `async` block that held the permits would store this
/// function's arguments a second time in every connection's task.
#[allow(clippy::manual_async_fn)] // see the comment in the body
pub(crate) fn serve_client(
    service: Arc<Service>,
    mut client: TcpStream,
    mut peer: SocketAddr,
    tracked: listener::Tracked,
    permits: impl Send + 'static,
) -> impl Future<Output = ()> + Send {
    // Not an `async fn`: its arguments would be stored twice in the future (see
    // `proxy::tests::a_connection_task_stays_small`).
    async move {
        let started = Instant::now();
        let _active = ServiceActive::new(&service);
        let config = service.config();
        // The address the PROXY header announced replaces the peer's in place: a second
        // binding would be a second copy in the task's state for the connection's life.
        let Some((client_addr, local)) =
            introduce(&service, &config, &mut client, peer, started).await
        else {
            return;
        };
        peer = client_addr;
        let Some(_source_slot) = admit(&service, &config, &client, peer, started) else {
            return;
        };
        let Some((connected, backend)) =
            pick_and_connect(&service, &config, &client, peer, started).await
        else {
            return;
        };
        // The client leg has its keepalive (and TCP_NODELAY) from the listening socket. Failing
        // only means the connection is already gone; the transfer will report that.
        let _ = set_keepalive((&backend).into(), config.tcp_keepalive);
        // Awaited in a statement of its own: a future awaited in a `match` scrutinee would stay
        // part of this task's state through the whole transfer in the arm.
        // Only the error's kind is kept: an `io::Error` would be held (to be dropped) through
        // the whole transfer.
        let header_sent = send_proxy_header(&config, &client, peer, local, &backend)
            .await
            .map_err(|e| e.kind());
        let transfer = match header_sent {
            Ok(()) => {
                // Pinned here and lent down: a future passed by value is stored again by every
                // async fn it passes through, for the connection's whole life.
                let cut = std::pin::pin!(tracked.cut());
                // One future awaited in one place, whichever the path: two awaits would each
                // get their own room in this task's state.
                #[cfg(target_os = "linux")]
                let path = if uring::wanted(&config) == DataPath::IoUring && uring::ready() {
                    // Converted here, not in the transfer: moved into its future, both sockets
                    // would be stored a second time for the connection's life.
                    match leave_epoll(client, backend) {
                        Ok(legs) => Path::Ring {
                            transfer: transfer_on_ring(&service, &config, legs, &connected, cut),
                        },
                        Err(kind) => Path::Failed { kind },
                    }
                } else {
                    let legs = (&client, &backend);
                    Path::Epoll {
                        transfer: transfer(&service, &config, legs, &connected, cut),
                    }
                };
                #[cfg(not(target_os = "linux"))]
                let path = Path::<_, std::future::Pending<Transfer>>::Epoll {
                    transfer: transfer(&service, &config, (&client, &backend), &connected, cut),
                };
                path.await
            }
            Err(kind) => {
                reset_on_close(&client);
                Transfer::failed_before_data(kind)
            }
        };
        finish(&service, &config, peer, &connected, &transfer, started);
        // Held to here (and on every early return, dropped with the task's state); moved out
        // of the captured value, not into a second binding for the connection's life.
        drop(permits);
    }
}

/// The last stage: the health verdict on the backend, the service's histograms, the access
/// log record and the connection's log line.
fn finish(
    service: &Service,
    config: &ServiceConfig,
    peer: SocketAddr,
    connected: &Connected,
    transfer: &Transfer,
    started: Instant,
) {
    let backend = connected.backend.backend();
    judge::judge_transfer(service, config, backend, connected.at, transfer);
    service.stats.histograms.observe_connection(
        started.elapsed(),
        transfer.client_to_backend,
        transfer.backend_to_client,
    );
    let reason = transfer.end.label();
    access(
        service,
        peer,
        Some(backend),
        connected.attempts,
        (transfer.client_to_backend, transfer.backend_to_client),
        started,
        &reason,
    );
    info!(
        service = %service.name,
        client = %peer,
        backend = %backend.addr(),
        target = %backend.key.target,
        attempts = connected.attempts,
        bytes_in = transfer.client_to_backend,
        bytes_out = transfer.backend_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        reason = %reason,
        reset_pending = transfer.cut_pending,
        "connection closed"
    );
}

static PROXY_HEADER_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));

/// Stage 0: who the client is. Normally the connection's own addresses (client, and the
/// listening address it reached); with `accept_proxy`, the ones the PROXY header of the
/// balancer in front carries, which then count for allow/deny, the Maglev key, logs and the
/// PROXY header srvlb sends on. `None` after a connection without a valid header in time was
/// reset and counted.
async fn introduce(
    service: &Service,
    config: &ServiceConfig,
    client: &mut TcpStream,
    peer: SocketAddr,
    started: Instant,
) -> Option<(SocketAddr, Option<SocketAddr>)> {
    if !config.accept_proxy {
        return Some((peer, None));
    }
    let trusted = config.accept_proxy_from.is_empty()
        || config
            .accept_proxy_from
            .iter()
            .any(|net| net.contains(&canonical_ip(peer.ip())));
    let header = if trusted {
        // Boxed: the header's buffer and timer are needed for the first bytes only, and
        // inline they would make every connection's task larger for its whole life.
        Box::pin(proxy_protocol::read_header(
            client,
            config.accept_proxy_timeout,
        ))
        .await
    } else {
        Err(proxy_protocol::ReadHeaderError::Untrusted)
    };
    match header {
        Ok(header) => Some(match header.addresses {
            Some((source, destination)) => (source, Some(destination)),
            // LOCAL (the balancer's own health check) or UNKNOWN: the connection's own.
            None => (peer, None),
        }),
        Err(e) => {
            service
                .stats
                .proxy_header_rejected
                .fetch_add(1, Ordering::Relaxed);
            reset_on_close(client);
            access(service, peer, None, 0, (0, 0), started, "bad_proxy_header");
            if let Some(suppressed) = PROXY_HEADER_LOG.permit() {
                info!(
                    service = %service.name,
                    client = %peer,
                    error = %e,
                    suppressed,
                    reason = "bad_proxy_header",
                    "connection closed"
                );
            }
            None
        }
    }
}

/// A client that passed admission; what it holds (its per-source slot, when per-source
/// limits are set) is given back when this is dropped at the end of the connection.
struct Admission(#[allow(dead_code)] Option<SourceSlot>);

static SOURCE_LIMIT_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));

/// Stage 1: the client passes allow/deny and its source's limits, and the service has
/// backends to pick from. A client refused here is closed (denied) or reset (over a
/// per-source limit, no backend) and counted.
fn admit(
    service: &Service,
    config: &ServiceConfig,
    client: &TcpStream,
    peer: SocketAddr,
    started: Instant,
) -> Option<Admission> {
    if !client_allowed(config, peer.ip()) {
        service.stats.denied.fetch_add(1, Ordering::Relaxed);
        access(service, peer, None, 0, (0, 0), started, "denied");
        debug!(service = %service.name, client = %peer, "client denied by allow/deny");
        return None;
    }
    let sources = service.connection_limit().sources();
    let slot = match sources.admit(config, peer.ip(), now_ms()) {
        Ok(slot) => slot,
        Err(refusal) => {
            let (counter, reason) = match refusal {
                Refusal::Connections => (
                    &service.stats.source_connection_limited,
                    "source_connection_limit",
                ),
                Refusal::Rate => (&service.stats.source_rate_limited, "source_rate_limit"),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            reset_on_close(client);
            access(service, peer, None, 0, (0, 0), started, reason);
            if let Some(suppressed) = SOURCE_LIMIT_LOG.permit() {
                info!(service = %service.name, client = %peer, reason, suppressed, "connection closed");
            }
            return None;
        }
    };
    if service.pool.snapshot().is_empty() {
        service.stats.no_backend.fetch_add(1, Ordering::Relaxed);
        reset_on_close(client);
        access(service, peer, None, 0, (0, 0), started, "no_backend");
        info!(service = %service.name, client = %peer, reason = "no_backend", "connection closed");
        return None;
    }
    Some(Admission(slot))
}

/// Stage 2: a connected backend, or `None` after the client was reset because every allowed
/// attempt failed or this host is out of resources. The pool snapshot is held only for the
/// selection, not for the life of the connection.
#[allow(clippy::manual_async_fn)] // see the comment in the body
fn pick_and_connect<'a>(
    service: &'a Service,
    config: &'a ServiceConfig,
    client: &'a TcpStream,
    peer: SocketAddr,
    started: Instant,
) -> impl Future<Output = Option<(Connected, TcpStream)>> + 'a {
    // Not an `async fn`: its arguments would be stored twice in the future (see
    // `proxy::tests::a_connection_task_stays_small`).
    async move {
        let snapshot = service.pool.snapshot();
        let failure = match connect_any(service, config, &snapshot, peer).await {
            Ok(connected) => return Some(connected),
            Err(failure) => failure,
        };
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
        reset_on_close(client);
        access(service, peer, None, 0, (0, 0), started, reason);
        info!(
            service = %service.name,
            client = %peer,
            reason,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        );
        None
    }
}

/// Hands the connection's line to the access log, when one is configured.
fn access(
    service: &Service,
    client: SocketAddr,
    backend: Option<&Backend>,
    attempts: u32,
    (bytes_in, bytes_out): (u64, u64),
    started: Instant,
    reason: &str,
) {
    if !access_log::enabled() {
        return;
    }
    access_log::record(access_log::AccessRecord {
        at: std::time::SystemTime::now(),
        service: Arc::from(service.name.as_str()),
        client,
        backend: backend.map(|b| (b.addr(), Arc::clone(&b.key.target))),
        attempts,
        bytes_in,
        bytes_out,
        duration_ms: started.elapsed().as_millis() as u64,
        reason: reason.to_owned(),
    });
}

/// Stage 3: the PROXY header, when the service sends one, before any client byte. `local`
/// is the address the client reached as a PROXY header in front said, else srvlb's own.
async fn send_proxy_header(
    config: &ServiceConfig,
    client: &TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    backend: &TcpStream,
) -> io::Result<()> {
    let Some(version) = config.send_proxy else {
        return Ok(());
    };
    let local = match local {
        Some(local) => local,
        None => client.local_addr()?,
    };
    let header = proxy_protocol::header(version, peer, local);
    copy::write_all(backend, &header).await
}

pin_project_lite::pin_project! {
    /// The transfer of one connection, on the data path it takes.
    #[project = PathProj]
    enum Path<E, R> {
        Epoll { #[pin] transfer: E },
        Ring { #[pin] transfer: R },
        /// The sockets could not be moved to the ring: a local failure.
        Failed { kind: io::ErrorKind },
    }
}

impl<E: Future<Output = Transfer>, R: Future<Output = Transfer>> Future for Path<E, R> {
    type Output = Transfer;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Transfer> {
        match self.project() {
            PathProj::Epoll { transfer } => transfer.poll(cx),
            PathProj::Ring { transfer } => transfer.poll(cx),
            PathProj::Failed { kind } => std::task::Poll::Ready(Transfer::failed_locally(*kind)),
        }
    }
}

/// Stage 4: bytes both ways until the connection ends. The first byte either way proves the
/// backend works: the success is recorded then, not at close, so a long-lived connection
/// re-admits an ejected backend (and resets its failure count) as soon as it carries data.
#[allow(clippy::manual_async_fn)] // see the comment in the body
fn transfer(
    service: &Service,
    config: &ServiceConfig,
    (client, backend): (&TcpStream, &TcpStream),
    connected: &Connected,
    cut: impl Future<Output = ()> + Unpin,
) -> impl Future<Output = Transfer> {
    // Not an `async fn`: its arguments would be stored twice in the future (see
    // `proxy::tests::a_connection_task_stays_small`).
    async move {
        let proven = AtomicBool::new(false);
        let count = counter(service, connected, &proven);
        proxy_streams(client, backend, config.idle_timeout, cut, &count).await
    }
}

/// Takes both sockets out of the worker's epoll set for the io_uring data path: a socket
/// still registered there would wake the thread for every segment as well.
#[cfg(target_os = "linux")]
fn leave_epoll(
    client: TcpStream,
    backend: TcpStream,
) -> Result<(std::net::TcpStream, std::net::TcpStream), io::ErrorKind> {
    match (client.into_std(), backend.into_std()) {
        (Ok(client), Ok(backend)) => Ok((client, backend)),
        // Leaving epoll failed (it does not, short of a kernel bug): whatever socket is left
        // is closed with a reset; nobody is to blame.
        (client, backend) => {
            let mut kind = io::ErrorKind::Other;
            for leg in [client, backend] {
                match leg {
                    Ok(socket) => reset_on_close(&socket),
                    Err(e) => kind = e.kind(),
                }
            }
            Err(kind)
        }
    }
}

/// Stage 4 on the worker's io_uring ring (`data_path = "io_uring"`).
#[cfg(target_os = "linux")]
#[allow(clippy::manual_async_fn)] // see the comment in the body
fn transfer_on_ring<'a>(
    service: &'a Service,
    config: &'a ServiceConfig,
    (client, backend): (std::net::TcpStream, std::net::TcpStream),
    connected: &'a Connected,
    cut: impl Future<Output = ()> + Unpin + 'a,
) -> impl Future<Output = Transfer> + 'a {
    // Not an `async fn`: its arguments would be stored twice in the future.
    async move {
        let proven = AtomicBool::new(false);
        let count = counter(service, connected, &proven);
        uring::proxy_streams(client, backend, config.idle_timeout, cut, &count).await
    }
}

/// What a transfer tells about every chunk that reached its destination: the backend's byte
/// counters, and the first byte (`proven`), which records the backend's success.
fn counter<'a>(
    service: &'a Service,
    connected: &'a Connected,
    proven: &'a AtomicBool,
) -> impl Fn(Side, u64) + Sync + 'a {
    let backend: &Backend = connected.backend.backend();
    move |side: Side, n: u64| {
        match side {
            Side::Client => backend.stats.bytes_sent.fetch_add(n, Ordering::Relaxed),
            Side::Backend => backend.stats.bytes_received.fetch_add(n, Ordering::Relaxed),
        };
        if !proven.load(Ordering::Relaxed) && !proven.swap(true, Ordering::Relaxed) {
            judge::record_success(service, backend, connected.at);
        }
    }
}

/// Sets TCP keepalive on a socket, or turns it off (`None`), so that a peer that vanished (a
/// host powered off, a NAT entry dropped) is noticed after about
/// `(1 + KEEPALIVE_PROBES) * every` of silence instead of at the idle timeout, which is
/// typically an hour. Set on a listening socket, it is inherited by every accepted one (as
/// TCP_NODELAY is), which saves four syscalls per client connection.
pub(crate) fn set_keepalive(
    socket: socket2::SockRef<'_>,
    every: Option<Duration>,
) -> io::Result<()> {
    let Some(every) = every else {
        return socket.set_keepalive(false);
    };
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(every)
        .with_interval(every)
        .with_retries(crate::config::KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    /// Every open connection holds its task's future for its whole life, idle or not, so the
    /// future's size is most of srvlb's memory per connection (`scripts/bench-compare`'s
    /// idle row). Buffers, pipes, the splice state and the waits of a blocked writer are
    /// boxed and held only while in use; this fails when a change puts something large back
    /// inline (an awaited future kept alive across the transfer, a value passed by value
    /// through several async fns).
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        fn size<F: Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let text =
            "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"]\nstatic = [\"127.0.0.1:2\"]\n";
        let config = crate::config::Config::parse(text, "t").expect("config");
        let resolver = crate::discovery::Resolver::new(&config.resolver).expect("resolver");
        let service = crate::service::Service::start(
            config.services[0].clone(),
            &resolver,
            config.resolver.clone(),
        );
        let tracker = super::listener::ConnectionTracker::default();
        // What the accept loop hands over: a service permit and a descriptor-cap permit.
        let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(2));
        let permit = || {
            std::sync::Arc::clone(&semaphore)
                .try_acquire_owned()
                .expect("permit")
        };
        let permits = (permit(), permit());
        let task = super::serve_client(service, client, addr, tracker.track(), permits);
        let bytes = size(&task);
        println!("connection task: {bytes} bytes");
        // tokio allocates a task as one 128-byte-aligned cell: a 32-byte header, the future
        // with 24 bytes of its own, a 48-byte trailer (tokio 1.5x). Up to 920 bytes of future
        // the cell is 1,024 bytes; one byte more and every connection costs 1,152.
        assert!(bytes <= 920, "a connection's future grew to {bytes} bytes");
    }
}
