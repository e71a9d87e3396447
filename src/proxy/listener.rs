//! Listening sockets and their accept loops. A listener takes a connection permit of its
//! service (`max_connections`) and one of the process-wide descriptor cap before it accepts,
//! so at either limit clients wait in the kernel backlog instead of being reset, and accept
//! errors such as EMFILE back off instead of spinning a core. Each listener publishes whether
//! it is accepting and, when not, why (`ListenerStatus`), and logs a pause once.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::{LogThrottle, serve_client, set_keepalive};
use crate::health::now_ms;
use crate::service::{ConnectionLimit, Service};

/// Kernel accept queue length; the kernel caps it at net.core.somaxconn.
pub const BACKLOG: i32 = 4096;

/// Binds a listening socket the way a long-running proxy needs it: SO_REUSEADDR so a restart
/// does not wait for TIME_WAIT, SO_REUSEPORT so several acceptors can share a port,
/// IPV6_V6ONLY on IPv6 so "0.0.0.0:P" and "[::]:P" can both be listed, and TCP_NODELAY for
/// the accepted sockets to inherit.
///
/// SO_REUSEPORT only lets a bind succeed next to sockets that also set it and belong to the
/// same user, so a reload still fails on a port held by any other program. It is what lets a
/// reload replace "0.0.0.0:P" by "127.0.0.1:P" without a gap (the new socket is bound while the
/// old one still listens). The price: a second srvlb started by mistake under the same user
/// shares the port silently instead of failing.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Inherited by every accepted socket: one syscall here instead of one per client.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Counts open client connections across all listeners so shutdown can wait for them, and
/// holds the process-wide connection cap (derived from RLIMIT_NOFILE, see `fd_budget`) that
/// every listener takes a permit of before it accepts. Unlimited until `set_cap`.
#[derive(Debug, Clone)]
pub struct ConnectionTracker {
    inner: Arc<TrackerInner>,
    cap: Arc<ConnectionLimit>,
}

impl Default for ConnectionTracker {
    fn default() -> ConnectionTracker {
        ConnectionTracker {
            inner: Arc::default(),
            cap: Arc::new(ConnectionLimit::new(ConnectionLimit::MAX)),
        }
    }
}

#[derive(Debug)]
struct TrackerInner {
    open: AtomicUsize,
    idle: Notify,
    /// Set once the shutdown grace has elapsed: every open connection ends now.
    cut: watch::Sender<bool>,
}

impl Default for TrackerInner {
    fn default() -> TrackerInner {
        TrackerInner {
            open: AtomicUsize::new(0),
            idle: Notify::new(),
            cut: watch::Sender::new(false),
        }
    }
}

/// Held by a connection task; the count drops when it ends, however it ends.
pub struct Tracked(Arc<TrackerInner>);

impl Tracked {
    /// Resolves when the connection must end now (the shutdown grace elapsed).
    pub async fn cut(&self) {
        let mut cut = self.0.cut.subscribe();
        // Err only if the sender is gone, which cannot happen while `self` holds it; treat it
        // as "never".
        if cut.wait_for(|cut| *cut).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl ConnectionTracker {
    pub fn track(&self) -> Tracked {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        Tracked(Arc::clone(&self.inner))
    }

    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Tells every open connection to end now. Each ends in its own task: with a reset
    /// when bytes were still in flight, else with a clean close.
    pub fn cut_all(&self) {
        self.inner.cut.send_replace(true);
    }

    /// Sets the process-wide cap on proxied connections. Lowering it below the connections
    /// open closes none: listeners wait until enough have ended.
    pub fn set_cap(&self, cap: usize) {
        self.cap.resize("(process descriptor cap)", cap);
    }

    /// The semaphore of the process-wide cap.
    pub fn cap(&self) -> &Arc<Semaphore> {
        self.cap.semaphore()
    }

    /// Resolves once no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Why a listener is not accepting right now. Clients meanwhile wait in its backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// The service has `max_connections` open.
    MaxConnections,
    /// The process has as many proxied connections as its descriptors allow (`fd_budget`).
    FdCap,
    /// accept(2) failed (EMFILE and the like) and the loop is backing off.
    AcceptBackoff,
}

impl Pause {
    pub const ALL: [Pause; 3] = [Pause::MaxConnections, Pause::FdCap, Pause::AcceptBackoff];

    /// The label in metrics, status and logs.
    pub fn label(self) -> &'static str {
        match self {
            Pause::MaxConnections => "max_connections",
            Pause::FdCap => "fd_cap",
            Pause::AcceptBackoff => "accept_backoff",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What one listener shows /metrics and /status: its address, the service it feeds, whether
/// its accept loop is waiting and for what, and how often it had to.
#[derive(Debug)]
pub struct ListenerStatus {
    pub addr: SocketAddr,
    /// The socket's inode, by which its accept queue is found (`backlog::read`).
    inode: Option<u64>,
    service: Arc<ArcSwap<Service>>,
    /// 0 while accepting (or waiting for a client), else 1 + `Pause::index`.
    paused: AtomicU8,
    /// When the current wait began, on the `now_ms` clock.
    paused_since_ms: AtomicU64,
    /// Pause episodes (as logged) per reason.
    pauses: [AtomicU64; 3],
}

impl ListenerStatus {
    fn new(addr: SocketAddr, inode: Option<u64>, service: Arc<ArcSwap<Service>>) -> Self {
        ListenerStatus {
            addr,
            inode,
            service,
            paused: AtomicU8::new(0),
            paused_since_ms: AtomicU64::new(0),
            pauses: Default::default(),
        }
    }

    pub fn service_name(&self) -> String {
        self.service.load().name.clone()
    }

    pub fn inode(&self) -> Option<u64> {
        self.inode
    }

    /// Why the loop is waiting now, and since when (`now_ms` clock); `None` while accepting.
    pub fn paused(&self) -> Option<(Pause, u64)> {
        let code = self.paused.load(Ordering::Relaxed);
        let reason = *Pause::ALL.get(usize::from(code).checked_sub(1)?)?;
        Some((reason, self.paused_since_ms.load(Ordering::Relaxed)))
    }

    /// Pause episodes for `reason` since the listener started.
    pub fn pauses_total(&self, reason: Pause) -> u64 {
        self.pauses[reason.index()].load(Ordering::Relaxed)
    }

    fn set_paused(&self, reason: Option<Pause>) {
        if let Some(reason) = reason {
            self.paused_since_ms.store(now_ms(), Ordering::Relaxed);
            self.paused
                .store(reason.index() as u8 + 1, Ordering::Relaxed);
        } else {
            self.paused.store(0, Ordering::Relaxed);
        }
    }
}

/// A pause shorter than this is not logged (nor counted): at a limit with connections
/// churning, a listener waits a few milliseconds for each permit, and one line per
/// connection would flood the log while telling nothing the gauges do not.
const PAUSE_LOG_AFTER: Duration = Duration::from_millis(250);

/// One pause of a listener: from the first wait for a permit until nobody waits any more.
#[derive(Debug, Clone, Copy)]
struct Episode {
    since: std::time::Instant,
    logged: bool,
}

/// Logs each pause of a listener once, when it has lasted `PAUSE_LOG_AFTER`, and once when it
/// ends. A pause spans the short waits for one permit after another while clients keep
/// waiting; it ends when there is room again (a permit without waiting) or nobody is left
/// in the backlog (the listener holds its permits and waits for a client).
#[derive(Debug)]
struct PauseLog {
    episodes: [Option<Episode>; 3],
}

impl PauseLog {
    fn new() -> PauseLog {
        PauseLog {
            episodes: [None; 3],
        }
    }

    /// A wait for `reason` begins; returns the episode it belongs to.
    fn enter(&mut self, reason: Pause) -> Episode {
        *self.episodes[reason.index()].get_or_insert(Episode {
            since: std::time::Instant::now(),
            logged: false,
        })
    }

    /// Logs the pause if it has lasted long enough (or at once with `now`).
    fn maybe_log(&mut self, status: &ListenerStatus, reason: Pause, now: bool) {
        let Some(episode) = &mut self.episodes[reason.index()] else {
            return;
        };
        if episode.logged || (!now && episode.since.elapsed() < PAUSE_LOG_AFTER) {
            return;
        }
        episode.logged = true;
        status.pauses[reason.index()].fetch_add(1, Ordering::Relaxed);
        warn!(
            listener = %status.addr,
            service = %status.service_name(),
            reason = reason.label(),
            "accepting paused; new clients wait in the listen backlog"
        );
    }

    fn leave(&mut self, status: &ListenerStatus, reason: Pause) {
        let Some(episode) = self.episodes[reason.index()].take() else {
            return;
        };
        if episode.logged {
            info!(
                listener = %status.addr,
                service = %status.service_name(),
                reason = reason.label(),
                paused_ms = episode.since.elapsed().as_millis() as u64,
                "accepting resumed"
            );
        }
    }
}

/// A running accept loop. The service it feeds can be swapped on reload without touching
/// the socket.
#[derive(Debug)]
pub struct Listener {
    pub addr: SocketAddr,
    service: Arc<ArcSwap<Service>>,
    status: Arc<ListenerStatus>,
    /// Ticks after each swap, so an accept loop waiting for a permit of the old service's
    /// limit (which may never come: the old service can sit at its limit for hours) starts
    /// over with the new service's.
    swapped: watch::Sender<()>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A socket bound and registered with the runtime but not yet accepting. Everything that can
/// fail happens before this exists, so a reload can bind all its new addresses first and then
/// start them without a step that could fail half-way.
#[derive(Debug)]
pub struct Bound {
    pub addr: SocketAddr,
    listener: TcpListener,
}

impl Bound {
    /// Binds `addr` (see [`bind`]). Must run inside the tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<Bound> {
        let socket = bind(addr)?;
        let addr = socket.local_addr()?;
        let listener = TcpListener::from_std(socket)?;
        Ok(Bound { addr, listener })
    }
}

impl Bound {
    /// Sets the keepalive that accepted sockets inherit, before the listener starts: the
    /// kernel completes handshakes from the backlog while a new service waits for its first
    /// DNS answer, and those sockets copy the listener's options at that moment.
    pub fn set_keepalive(&self, every: Option<Duration>) -> io::Result<()> {
        set_keepalive((&self.listener).into(), every)
    }
}

impl Listener {
    /// Starts accepting on a bound socket. Must run inside the tokio runtime.
    pub fn start(bound: Bound, service: Arc<Service>, tracker: ConnectionTracker) -> Listener {
        let slot = Arc::new(ArcSwap::new(service));
        let inode = super::backlog::socket_inode(&bound.listener);
        let status = Arc::new(ListenerStatus::new(bound.addr, inode, Arc::clone(&slot)));
        let (stop, stop_rx) = watch::channel(false);
        let (swapped, swapped_rx) = watch::channel(());
        let task = tokio::spawn(accept_loop(
            bound.listener,
            Arc::clone(&slot),
            tracker,
            Arc::clone(&status),
            swapped_rx,
            stop_rx,
        ));
        Listener {
            addr: bound.addr,
            service: slot,
            status,
            swapped,
            stop,
            task,
        }
    }

    pub fn service(&self) -> Arc<Service> {
        self.service.load_full()
    }

    /// What /metrics and /status show of this listener.
    pub fn status(&self) -> &Arc<ListenerStatus> {
        &self.status
    }

    pub fn set_service(&self, service: Arc<Service>) {
        // A reload that keeps the service must not make the loop give up its permit and
        // queue again behind everyone else.
        if Arc::ptr_eq(&self.service.load(), &service) {
            return;
        }
        self.service.store(service);
        // After the store: a loop that sees the tick loads the new service.
        self.swapped.send_replace(());
    }

    /// Stops accepting and closes the socket; open connections are not touched.
    pub async fn close(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

static ACCEPT_ERROR_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));

/// What a wait inside the accept loop ended with.
enum Step<T> {
    Got(T),
    /// The service was swapped: start over with the new one's limit.
    Restart,
    /// The listener is closing.
    Stop,
}

/// Takes a permit of `limit`, showing the listener paused for `reason` while it waits.
async fn take_permit(
    limit: &Arc<Semaphore>,
    reason: Pause,
    status: &ListenerStatus,
    pauses: &mut PauseLog,
    swapped: &mut watch::Receiver<()>,
    stop: &mut watch::Receiver<bool>,
) -> Step<OwnedSemaphorePermit> {
    if let Ok(permit) = Arc::clone(limit).try_acquire_owned() {
        pauses.leave(status, reason);
        return Step::Got(permit);
    }
    status.set_paused(Some(reason));
    let episode = pauses.enter(reason);
    let log_at = tokio::time::Instant::from_std(episode.since + PAUSE_LOG_AFTER);
    let mut logged = episode.logged;
    let step = loop {
        tokio::select! {
            permit = Arc::clone(limit).acquire_owned() => break match permit {
                Ok(permit) => Step::Got(permit),
                Err(_) => Step::Stop, // the semaphore is never closed; nothing sensible to do
            },
            changed = swapped.changed() => break match changed {
                Ok(()) => Step::Restart,
                Err(_) => Step::Stop, // the Listener was dropped
            },
            _ = stop.wait_for(|stop| *stop) => break Step::Stop,
            () = tokio::time::sleep_until(log_at), if !logged => {
                pauses.maybe_log(status, reason, false);
                logged = true;
            }
        }
    };
    status.set_paused(None);
    pauses.maybe_log(status, reason, false);
    if matches!(step, Step::Got(_)) && limit.available_permits() > 0 {
        pauses.leave(status, reason);
    }
    step
}

async fn accept_loop(
    listener: TcpListener,
    slot: Arc<ArcSwap<Service>>,
    tracker: ConnectionTracker,
    status: Arc<ListenerStatus>,
    mut swapped: watch::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) {
    let addr = listener.local_addr().ok();
    let mut backoff = AcceptBackoff::default();
    let mut keepalive_set = None;
    let mut pauses = PauseLog::new();
    let cap = Arc::clone(tracker.cap());
    loop {
        // Marked seen before the load, so a swap after the load is never missed.
        swapped.borrow_and_update();
        let service = slot.load_full();
        // Accepted sockets inherit the listener's keepalive; a reload may change it.
        let keepalive = service.config().tcp_keepalive;
        if keepalive_set != Some(keepalive) {
            if let Err(e) = set_keepalive((&listener).into(), keepalive) {
                warn!(listener = ?addr, error = %e, "cannot set TCP keepalive on the listener");
            }
            keepalive_set = Some(keepalive);
        }
        // On a swap, start over: the permit must come from the limit of the service that
        // will serve the connection (when the name stays, that is the same, resized, limit).
        let limit = Arc::clone(service.connection_permits());
        let permit = match take_permit(
            &limit,
            Pause::MaxConnections,
            &status,
            &mut pauses,
            &mut swapped,
            &mut stop,
        )
        .await
        {
            Step::Got(permit) => permit,
            Step::Restart => continue,
            Step::Stop => break,
        };
        // The process-wide cap second: a service at its own limit does not hold a
        // descriptor permit other services could use.
        let fd_permit = match take_permit(
            &cap,
            Pause::FdCap,
            &status,
            &mut pauses,
            &mut swapped,
            &mut stop,
        )
        .await
        {
            Step::Got(permit) => permit,
            Step::Restart => continue,
            Step::Stop => break,
        };
        // A client already waiting is taken at once. Otherwise nobody is left in the
        // backlog, and a pause for a limit is over.
        let immediate = {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            listener.poll_accept(&mut cx)
        };
        let accepted = match immediate {
            Poll::Ready(accepted) => accepted,
            Poll::Pending => {
                pauses.leave(&status, Pause::MaxConnections);
                pauses.leave(&status, Pause::FdCap);
                tokio::select! {
                    accepted = listener.accept() => accepted,
                    changed = swapped.changed() => match changed {
                        Ok(()) => continue, // accept is cancel-safe: nothing is lost
                        Err(_) => break,
                    },
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.success();
                pauses.leave(&status, Pause::AcceptBackoff);
                // Served by the service whose permit it holds; a swap since then restarts
                // the loop for the next client (`swapped`).
                let tracked = tracker.track();
                tokio::spawn(async move {
                    let _permits = (permit, fd_permit);
                    serve_client(service, stream, peer, tracked).await;
                });
            }
            Err(e) => {
                let delay = backoff.error(&e);
                if delay.is_zero() {
                    // ECONNABORTED and friends: the client gave up before we accepted it.
                    debug!(listener = ?addr, error = %e, "accept error");
                    continue;
                }
                if ACCEPT_ERROR_LOG.allow() {
                    let backoff_ms = delay.as_millis() as u64;
                    if is_resource_exhaustion(&e) {
                        error!(listener = ?addr, error = %e, backoff_ms, "accept failed: out of resources; backing off");
                    } else {
                        warn!(listener = ?addr, error = %e, consecutive = backoff.consecutive, backoff_ms, "accept keeps failing; backing off");
                    }
                }
                status.set_paused(Some(Pause::AcceptBackoff));
                pauses.enter(Pause::AcceptBackoff);
                pauses.maybe_log(&status, Pause::AcceptBackoff, true);
                let stopped = tokio::select! {
                    _ = tokio::time::sleep(delay) => false,
                    _ = stop.wait_for(|stop| *stop) => true,
                };
                status.set_paused(None);
                if stopped {
                    break;
                }
            }
        }
    }
    status.set_paused(None);
    let drained = drain_backlog(&listener, &slot, &tracker);
    info!(listener = ?addr, drained, "listener closed");
}

/// Serves the connections the kernel has already completed in the backlog: closing the socket
/// would reset them although they arrived while the listener was still configured. Stops at
/// the first empty poll, at the connection limit or the descriptor cap, or after one
/// backlog's worth.
fn drain_backlog(
    listener: &TcpListener,
    slot: &ArcSwap<Service>,
    tracker: &ConnectionTracker,
) -> usize {
    let service = slot.load_full();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut drained = 0;
    for _ in 0..BACKLOG {
        let Ok(permit) = Arc::clone(service.connection_permits()).try_acquire_owned() else {
            break;
        };
        let Ok(fd_permit) = Arc::clone(tracker.cap()).try_acquire_owned() else {
            break;
        };
        let (stream, peer) = match listener.poll_accept(&mut cx) {
            Poll::Ready(Ok(accepted)) => accepted,
            Poll::Ready(Err(e)) => {
                debug!(error = %e, "accept error while draining the backlog");
                continue;
            }
            Poll::Pending => break,
        };
        drained += 1;
        let service = Arc::clone(&service);
        let tracked = tracker.track();
        tokio::spawn(async move {
            let _permits = (permit, fd_permit);
            serve_client(service, stream, peer, tracked).await;
        });
    }
    drained
}

/// How long an accept loop pauses after an error, reset by the next successful accept.
///
/// Running out of resources (EMFILE and the like) backs off from the first error: accepting
/// again at once cannot succeed. Any other error is normally one client's (ECONNABORTED: it
/// gave up before we accepted it) and costs no pause, but a run of them with no success in
/// between (a persistent EPERM from a security module, say) backs off the same way, so no
/// error, known or not, can spin a core.
#[derive(Debug, Default)]
struct AcceptBackoff {
    /// Errors since the last successful accept.
    consecutive: u32,
    delay: Duration,
}

impl AcceptBackoff {
    /// Errors in a row, other than resource exhaustion, that are retried without a pause.
    const FREE_ERRORS: u32 = 8;
    const MIN: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn success(&mut self) {
        *self = AcceptBackoff::default();
    }

    /// The pause before the next accept; zero for an isolated per-client error.
    fn error(&mut self, e: &io::Error) -> Duration {
        self.consecutive = self.consecutive.saturating_add(1);
        if !is_resource_exhaustion(e) && self.consecutive <= Self::FREE_ERRORS {
            return Duration::ZERO;
        }
        self.delay = (self.delay * 2).clamp(Self::MIN, Self::MAX);
        self.delay
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12)) || e.kind() == io::ErrorKind::OutOfMemory
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os_error(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    /// The client leg's TCP_NODELAY and keepalive are set once on the listener; this holds
    /// only because accepted sockets inherit them, which this checks on the running kernel.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let every = Duration::from_secs(7);
        set_keepalive((&listener).into(), Some(every)).expect("keepalive");
        let addr = listener.local_addr().expect("addr");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        listener.set_nonblocking(false).expect("blocking");
        let (accepted, _) = listener.accept().expect("accept");
        let sock = socket2::SockRef::from(&accepted);
        assert!(
            sock.tcp_nodelay().expect("nodelay"),
            "TCP_NODELAY not inherited"
        );
        assert!(
            sock.keepalive().expect("keepalive"),
            "SO_KEEPALIVE not inherited"
        );
        assert_eq!(sock.tcp_keepalive_time().expect("idle"), every);
        assert_eq!(sock.tcp_keepalive_interval().expect("interval"), every);
        assert_eq!(
            sock.tcp_keepalive_retries().expect("probes"),
            crate::config::KEEPALIVE_PROBES
        );
        set_keepalive((&listener).into(), None).expect("off");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        let sock = socket2::SockRef::from(&accepted);
        assert!(!sock.keepalive().expect("keepalive"), "keepalive still on");
    }

    #[test]
    fn resource_exhaustion_backs_off_at_once_and_doubles_to_the_cap() {
        let mut backoff = AcceptBackoff::default();
        let delays: Vec<_> = (0..10).map(|_| backoff.error(&os_error(24))).collect();
        assert_eq!(delays[0], AcceptBackoff::MIN);
        assert_eq!(delays[1], AcceptBackoff::MIN * 2);
        assert_eq!(delays[9], AcceptBackoff::MAX);
    }

    #[test]
    fn a_persistent_other_error_backs_off_after_a_few_and_success_resets() {
        let eperm = os_error(1);
        let mut backoff = AcceptBackoff::default();
        for _ in 0..AcceptBackoff::FREE_ERRORS {
            assert_eq!(
                backoff.error(&eperm),
                Duration::ZERO,
                "isolated errors are free"
            );
        }
        assert_eq!(backoff.error(&eperm), AcceptBackoff::MIN);
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = backoff.error(&eperm);
        }
        assert_eq!(last, AcceptBackoff::MAX, "capped, never zero again");
        backoff.success();
        assert_eq!(backoff.error(&eperm), Duration::ZERO);
        assert_eq!(backoff.consecutive, 1);
    }
}
