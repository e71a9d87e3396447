//! Picking a backend and connecting to it: walks the selector's candidates, connects with
//! a timeout, and on failure classifies the error (the backend's fault, this host's, or
//! unknown), reports a backend failure to the health policy and tries the next candidate,
//! up to `connect_retries`. A host out of descriptors or ports tries nobody else and blames
//! nobody.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tracing::warn;

use crate::balance::select::{Selector, client_key};
use crate::config::ServiceConfig;
use crate::health::{judge, now_ms};
use crate::log_throttle::LogThrottle;
use crate::pool::{Backend, Snapshot};
use crate::service::Service;

static CONNECT_FAILURE_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));
static LOCAL_RESOURCE_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));

/// A backend's share of one client connection, from selection to close: it counts in the
/// backend's active connections while the connect is still in flight, so that P2C sees a
/// backend that is slow to accept as busy rather than idle during a burst. Dropped on a
/// failed connect, and keeps the count right however the task ends.
pub(super) struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    pub(super) fn backend(&self) -> &Arc<Backend> {
        &self.0
    }

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

/// Why `connect_any` found no backend for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NoBackend {
    /// Every candidate it was allowed to try failed.
    Exhausted,
    /// This host could not make a connection at all (out of descriptors, ports or memory).
    Local,
}

/// A backend connection made for a client (its socket is returned beside it, so that a
/// data path can take it by value).
pub(super) struct Connected {
    /// The backend, counted as active while this lives.
    pub(super) backend: ActiveGuard,
    /// Connects tried, this one included.
    pub(super) attempts: u32,
    /// When the connect completed (`now_ms`).
    pub(super) at: u64,
}

/// Walks the selector's candidates until one connects, at most `1 + connect_retries` times.
pub(super) async fn connect_any(
    service: &Service,
    config: &ServiceConfig,
    snapshot: &Snapshot,
    peer: SocketAddr,
) -> Result<(Connected, TcpStream), NoBackend> {
    let key = client_key(peer, config.hash_key);
    let mut selector = Selector::new(&snapshot.tiers, key, now_ms())
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
        attempts += 1;
        if attempts > 1 {
            service.stats.retries.fetch_add(1, Ordering::Relaxed);
        }
        let connect_started = std::time::Instant::now();
        let e = match connect(active.backend().addr(), config.connect_timeout).await {
            Ok(stream) => {
                active.connected();
                service
                    .stats
                    .histograms
                    .observe_connect(connect_started.elapsed());
                let connected = Connected {
                    backend: active,
                    attempts,
                    at: now_ms(),
                };
                return Ok((connected, stream));
            }
            Err(e) => e,
        };
        // The guard lives on until the failure is counted, as the connect's would have.
        let failed = FailedConnect {
            service,
            config,
            backend: active.backend(),
            peer,
            attempts,
        };
        failed.report(&e)?;
    }
    Err(NoBackend::Exhausted)
}

/// One failed connect of `connect_any`, to log and to blame.
struct FailedConnect<'a> {
    service: &'a Service,
    config: &'a ServiceConfig,
    backend: &'a Arc<Backend>,
    peer: SocketAddr,
    /// Connects tried, this one included.
    attempts: u32,
}

impl FailedConnect<'_> {
    /// Logs the failure and counts it against the backend when it is the backend's fault.
    /// `Err(NoBackend::Local)` when this host is out of resources: then no other backend is
    /// to be tried.
    fn report(&self, e: &ConnectError) -> Result<(), NoBackend> {
        let FailedConnect {
            service,
            config,
            backend,
            peer,
            attempts,
        } = *self;
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
            judge::record_failure(service, config, backend, &why);
        }
        Ok(())
    }
}

/// Whose fault a failed connect is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blame {
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
pub(crate) struct ConnectError {
    pub(crate) blame: Blame,
    pub(crate) error: io::Error,
}

/// Classifies an error of `connect(2)` (or of the timeout around it).
pub(crate) fn blame(e: &io::Error) -> Blame {
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
        // No local port left, or out of descriptors or memory: this host's shortage.
        Some(Errno::ADDRNOTAVAIL) => Blame::Local,
        _ if crate::os_error::out_of_resources(e) => Blame::Local,
        _ => Blame::Unknown,
    }
}

/// Connects with TCP_NODELAY within `timeout`.
pub(crate) async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
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
