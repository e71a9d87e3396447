//! Listening sockets and their accept loops. A listener takes a connection permit of its
//! service (`max_connections`) and one of the process-wide descriptor cap before it accepts,
//! so at either limit clients wait in the kernel backlog instead of being reset, and accept
//! errors such as EMFILE back off instead of spinning a core. Each listener publishes whether
//! it is accepting and, when not, why (`ListenerStatus`), and logs a pause once.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::pause::PAUSE_LOG_AFTER;
pub(crate) use super::pause::{ListenerStatus, Pause};
pub(crate) use super::tracker::{ConnectionTracker, Tracked};
use super::{LogThrottle, serve_client, set_keepalive};
use crate::service::Service;
use crate::workers::Workers;

/// Kernel accept queue length; the kernel caps it at net.core.somaxconn.
pub(crate) const BACKLOG: i32 = 4096;

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
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
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

/// A running listener: one socket and an accept loop on every worker. The service it feeds
/// can be swapped on reload without touching the socket.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) addr: SocketAddr,
    service: Arc<ArcSwap<Service>>,
    status: Arc<ListenerStatus>,
    /// Ticks after each swap, so an accept loop waiting for a permit of the old service's
    /// limit (which may never come: the old service can sit at its limit for hours) starts
    /// over with the new service's.
    swapped: watch::Sender<()>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<usize>>,
}

/// A socket bound and registered with every worker's runtime but not yet accepting.
/// Everything that can fail happens before this exists, so a reload can bind all its new
/// addresses first and then start them without a step that could fail half-way.
#[derive(Debug)]
pub(crate) struct Bound {
    pub(crate) addr: SocketAddr,
    /// The same socket once per worker (duplicated descriptors), each registered with that
    /// worker's reactor, with the worker's handle to run its accept loop on.
    loops: Vec<(TcpListener, Handle)>,
}

impl Bound {
    /// Binds `addr` (see [`bind`]) and registers the socket with each worker.
    pub(crate) fn bind(addr: SocketAddr, workers: &Workers) -> io::Result<Bound> {
        let socket = bind(addr)?;
        let addr = socket.local_addr()?;
        let mut loops = Vec::with_capacity(workers.count());
        for handle in workers.handles() {
            let copy = socket.try_clone()?;
            // Registers the descriptor with this worker's reactor, not the caller's.
            let _in_worker = handle.enter();
            loops.push((TcpListener::from_std(copy)?, handle.clone()));
        }
        Ok(Bound { addr, loops })
    }

    /// Sets the keepalive that accepted sockets inherit, before the listener starts: the
    /// kernel completes handshakes from the backlog while a new service waits for its first
    /// DNS answer, and those sockets copy the listener's options at that moment.
    pub(crate) fn set_keepalive(&self, every: Option<Duration>) -> io::Result<()> {
        match self.loops.first() {
            Some((listener, _)) => set_keepalive(listener.into(), every),
            None => Ok(()),
        }
    }
}

impl Listener {
    /// Starts an accept loop on every worker the socket was bound for.
    pub(crate) fn start(
        bound: Bound,
        service: Arc<Service>,
        tracker: ConnectionTracker,
    ) -> Listener {
        let slot = Arc::new(ArcSwap::new(service));
        let inode = bound
            .loops
            .first()
            .and_then(|(listener, _)| super::backlog::socket_inode(listener));
        let status = Arc::new(ListenerStatus::new(
            bound.addr,
            inode,
            Arc::clone(&slot),
            bound.loops.len(),
        ));
        let (stop, stop_rx) = watch::channel(false);
        let (swapped, swapped_rx) = watch::channel(());
        let tasks = bound
            .loops
            .into_iter()
            .enumerate()
            .map(|(index, (listener, worker))| {
                worker.spawn(accept_loop(
                    AcceptLoop {
                        index,
                        listener,
                        slot: Arc::clone(&slot),
                        tracker: tracker.clone(),
                        status: Arc::clone(&status),
                    },
                    swapped_rx.clone(),
                    stop_rx.clone(),
                ))
            })
            .collect();
        Listener {
            addr: bound.addr,
            service: slot,
            status,
            swapped,
            stop,
            tasks,
        }
    }

    pub(crate) fn service(&self) -> Arc<Service> {
        self.service.load_full()
    }

    /// What /metrics and /status show of this listener.
    pub(crate) fn status(&self) -> &Arc<ListenerStatus> {
        &self.status
    }

    pub(crate) fn set_service(&self, service: Arc<Service>) {
        // A reload that keeps the service must not make the loops give up their permits and
        // queue again behind everyone else.
        if Arc::ptr_eq(&self.service.load(), &service) {
            return;
        }
        self.service.store(service);
        // After the store: a loop that sees the tick loads the new service.
        self.swapped.send_replace(());
    }

    /// Stops accepting and closes the socket (once every loop has let go of it); open
    /// connections are not touched.
    pub(crate) async fn close(self) {
        let _ = self.stop.send(true);
        let mut drained = 0;
        for task in self.tasks {
            drained += task.await.unwrap_or(0);
        }
        info!(listener = %self.addr, drained, "listener closed");
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
    accept_loop: usize,
    swapped: &mut watch::Receiver<()>,
    stop: &mut watch::Receiver<bool>,
) -> Step<OwnedSemaphorePermit> {
    let pauses = &status.log;
    if let Ok(permit) = Arc::clone(limit).try_acquire_owned() {
        pauses.leave(status, reason);
        return Step::Got(permit);
    }
    status.set_paused(accept_loop, Some(reason));
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
    status.set_paused(accept_loop, None);
    pauses.maybe_log(status, reason, false);
    if matches!(step, Step::Got(_)) && limit.available_permits() > 0 {
        pauses.leave(status, reason);
    }
    step
}

/// One worker's accept loop on a listener's socket.
struct AcceptLoop {
    /// Which of the listener's loops this is (its worker's index).
    index: usize,
    listener: TcpListener,
    slot: Arc<ArcSwap<Service>>,
    tracker: ConnectionTracker,
    status: Arc<ListenerStatus>,
}

/// Runs one accept loop until the listener closes; returns how many clients it took from
/// the backlog on the way out.
async fn accept_loop(
    this: AcceptLoop,
    mut swapped: watch::Receiver<()>,
    mut stop: watch::Receiver<bool>,
) -> usize {
    let mut backoff = AcceptBackoff::default();
    let mut keepalive_set = None;
    loop {
        // Marked seen before the load, so a swap after the load is never missed.
        swapped.borrow_and_update();
        let service = this.slot.load_full();
        // Accepted sockets inherit the listener's keepalive; a reload may change it.
        let keepalive = service.config().tcp_keepalive;
        if keepalive_set != Some(keepalive) {
            this.set_keepalive(keepalive);
            keepalive_set = Some(keepalive);
        }
        let permits = match this.take_permits(&service, &mut swapped, &mut stop).await {
            Step::Got(permits) => permits,
            Step::Restart => continue,
            Step::Stop => break,
        };
        let accepted = match this.accept(&mut swapped, &mut stop).await {
            Step::Got(accepted) => accepted,
            Step::Restart => continue,
            Step::Stop => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.success();
                this.status.log.leave(&this.status, Pause::AcceptBackoff);
                // Served by the service whose permit it holds; a swap since then restarts
                // the loop for the next client (`swapped`). Spawned on this worker.
                let tracked = this.tracker.track();
                tokio::spawn(serve_client(service, stream, peer, tracked, permits));
            }
            Err(e) => {
                if this.back_off(&mut backoff, &e, &mut stop).await {
                    break;
                }
            }
        }
    }
    this.status.set_paused(this.index, None);
    drain_backlog(&this.listener, &this.slot, &this.tracker)
}

impl AcceptLoop {
    fn set_keepalive(&self, keepalive: Option<Duration>) {
        if let Err(e) = set_keepalive((&self.listener).into(), keepalive) {
            warn!(listener = %self.status.addr, error = %e, "cannot set TCP keepalive on the listener");
        }
    }

    /// A permit of the service's limit, then one of the process-wide descriptor cap.
    async fn take_permits(
        &self,
        service: &Service,
        swapped: &mut watch::Receiver<()>,
        stop: &mut watch::Receiver<bool>,
    ) -> Step<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        // On a swap, start over: the permit must come from the limit of the service that
        // will serve the connection (when the name stays, that is the same, resized, limit).
        let limit = service.connection_permits();
        let (status, index) = (&*self.status, self.index);
        let permit =
            match take_permit(limit, Pause::MaxConnections, status, index, swapped, stop).await {
                Step::Got(permit) => permit,
                Step::Restart => return Step::Restart,
                Step::Stop => return Step::Stop,
            };
        // The process-wide cap second: a service at its own limit does not hold a
        // descriptor permit other services could use.
        let cap = self.tracker.cap();
        match take_permit(cap, Pause::FdCap, status, index, swapped, stop).await {
            Step::Got(fd_permit) => Step::Got((permit, fd_permit)),
            Step::Restart => Step::Restart,
            Step::Stop => Step::Stop,
        }
    }

    /// The next client. One already waiting is taken at once; otherwise nobody is left in
    /// the backlog, a pause for a limit is over, and the loop waits for one.
    async fn accept(
        &self,
        swapped: &mut watch::Receiver<()>,
        stop: &mut watch::Receiver<bool>,
    ) -> Step<io::Result<(TcpStream, SocketAddr)>> {
        let immediate = {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            self.listener.poll_accept(&mut cx)
        };
        if let Poll::Ready(accepted) = immediate {
            return Step::Got(accepted);
        }
        self.status.log.leave(&self.status, Pause::MaxConnections);
        self.status.log.leave(&self.status, Pause::FdCap);
        tokio::select! {
            accepted = self.listener.accept() => Step::Got(accepted),
            changed = swapped.changed() => match changed {
                Ok(()) => Step::Restart, // accept is cancel-safe: nothing is lost
                Err(_) => Step::Stop,
            },
            _ = stop.wait_for(|stop| *stop) => Step::Stop,
        }
    }

    /// After a failed accept: pauses as `backoff` says, showing the listener paused.
    /// Returns true when the listener closed meanwhile.
    async fn back_off(
        &self,
        backoff: &mut AcceptBackoff,
        e: &io::Error,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let addr = self.status.addr;
        let delay = backoff.error(e);
        if delay.is_zero() {
            // ECONNABORTED and friends: the client gave up before we accepted it.
            debug!(listener = %addr, error = %e, "accept error");
            return false;
        }
        if ACCEPT_ERROR_LOG.allow() {
            let backoff_ms = delay.as_millis() as u64;
            if is_resource_exhaustion(e) {
                error!(listener = %addr, error = %e, backoff_ms, "accept failed: out of resources; backing off");
            } else {
                warn!(listener = %addr, error = %e, consecutive = backoff.consecutive, backoff_ms, "accept keeps failing; backing off");
            }
        }
        self.status
            .set_paused(self.index, Some(Pause::AcceptBackoff));
        self.status.log.enter(Pause::AcceptBackoff);
        self.status
            .log
            .maybe_log(&self.status, Pause::AcceptBackoff, true);
        let stopped = tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = stop.wait_for(|stop| *stop) => true,
        };
        self.status.set_paused(self.index, None);
        stopped
    }
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
        tokio::spawn(serve_client(
            service,
            stream,
            peer,
            tracked,
            (permit, fd_permit),
        ));
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

use crate::os_error::out_of_resources as is_resource_exhaustion;

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
