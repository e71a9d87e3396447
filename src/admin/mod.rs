//! The admin endpoint: `/metrics` (Prometheus text format or OpenMetrics), `/status` (JSON
//! of services, listeners, tiers, backends and their health, and the descriptor budget) and
//! `/healthz`, on a TCP address, a unix socket, or both, optionally behind a bearer token.
//! This file owns what the endpoint reports ([`AdminState`], updated by control) and its
//! listeners ([`Admin`], [`AdminSocket`]); `http.rs` serves requests, `slots.rs` bounds the
//! connections, `metrics.rs`, `histogram.rs` and `process.rs` make /metrics, `status.rs`
//! makes /status. It reads shared state and changes nothing.
//!
//! It must answer when the rest of the process is under stress: its descriptors are part of
//! the reserve `fd_budget` keeps free of proxied connections, and no client can hold it (see
//! `http.rs`).

mod histogram;
mod http;
mod metrics;
mod process;
mod slots;
mod status;

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tracing::warn;

pub(crate) use histogram::ConnectionHistograms;

use crate::config::AdminToken;
use crate::fd_budget::{FdBudget, MAX_ADMIN_SLOTS};
use crate::proxy::listener::{ConnectionTracker, ListenerStatus};
use crate::service::Service;
use http::{AdminListener, accept_loop};
use slots::Slots;

/// Permissions of the admin unix socket: its owner and group may connect.
pub(crate) const SOCKET_MODE: u32 = 0o660;

/// What the admin endpoint reports, updated by control.
#[derive(Debug, Default)]
pub(crate) struct AdminState {
    services: ArcSwap<Vec<Arc<Service>>>,
    listeners: ArcSwap<Vec<Arc<ListenerStatus>>>,
    process: Mutex<Option<(FdBudget, ConnectionTracker)>>,
    /// Admin connections served at once (from the budget); 0 until set means the maximum.
    slot_count: AtomicUsize,
    /// The connections of every admin listener, TCP and unix together.
    slots: Slots,
    /// The bearer token every request but /healthz must carry; none: no authentication.
    token: ArcSwapOption<AdminToken>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_reload: Mutex<Option<(bool, String)>>,
    evictions: AtomicU64,
    bad_requests: AtomicU64,
    unauthorized: AtomicU64,
}

impl AdminState {
    pub(crate) fn set_services(&self, mut services: Vec<Arc<Service>>) {
        services.sort_by(|a, b| a.name.cmp(&b.name));
        self.services.store(Arc::new(services));
    }

    /// The proxy listeners to report, in any order.
    pub(crate) fn set_listeners(&self, mut listeners: Vec<Arc<ListenerStatus>>) {
        listeners.sort_by_key(|l| l.addr);
        self.listeners.store(Arc::new(listeners));
    }

    /// The descriptor budget in force and the tracker of proxied connections.
    pub(crate) fn set_budget(&self, budget: FdBudget, tracker: ConnectionTracker) {
        self.slot_count.store(budget.admin_slots, Ordering::Relaxed);
        *self.process.lock() = Some((budget, tracker));
    }

    /// The token requests must present from now on (read from `admin_token_file` at start
    /// and on every reload); `None` turns authentication off.
    pub(crate) fn set_token(&self, token: Option<AdminToken>) {
        self.token.store(token.map(Arc::new));
    }

    fn slot_count(&self) -> usize {
        match self.slot_count.load(Ordering::Relaxed) {
            0 => MAX_ADMIN_SLOTS,
            n => n,
        }
    }

    pub(crate) fn record_reload(&self, ok: bool, message: String) {
        if ok {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        }
        *self.last_reload.lock() = Some((ok, message));
    }

    /// "last reload: ok" / "last reload: refused: ..." / "no reload yet".
    pub(crate) fn last_reload(&self) -> String {
        match &*self.last_reload.lock() {
            None => "no reload yet".to_owned(),
            Some((true, _)) => "last reload: ok".to_owned(),
            Some((false, why)) => format!("last reload: refused: {why}"),
        }
    }
}

/// A running admin listener on a TCP address.
#[derive(Debug)]
pub(crate) struct Admin {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Admin {
    /// Binds synchronously (so a reload can refuse an unusable address) and starts serving.
    pub(crate) fn bind(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<Admin> {
        let socket = crate::proxy::listener::bind(addr)?;
        let addr = socket.local_addr()?;
        let listener = TcpListener::from_std(socket)?;
        let task = tokio::spawn(accept_loop(AdminListener::Tcp(listener), state));
        Ok(Admin { addr, task })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and closes the socket; the same as dropping it.
    pub(crate) fn close(self) {}
}

/// A reload that binds a new admin listener and then fails a later step drops it: the
/// accept task (which owns the socket) must go with it, or the refused config's endpoint
/// would keep serving and every retry would bind another one beside it (SO_REUSEPORT).
impl Drop for Admin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running admin listener on a unix socket. The socket file is removed when this is
/// dropped (reload to another path, shutdown), if it is still the one srvlb created.
#[derive(Debug)]
pub(crate) struct AdminSocket {
    path: PathBuf,
    /// Device and inode of the socket file created, to remove only our own.
    file_id: (u64, u64),
    task: JoinHandle<()>,
}

impl AdminSocket {
    /// Binds `path` (replacing a stale socket file that nothing listens on), sets its mode
    /// to [`SOCKET_MODE`] and starts serving. Fails when another process serves the path or
    /// when something other than a socket is there: srvlb deletes only dead sockets.
    pub(crate) fn bind(path: &Path, state: Arc<AdminState>) -> std::io::Result<AdminSocket> {
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        let meta = std::fs::symlink_metadata(path)?;
        let task = tokio::spawn(accept_loop(AdminListener::Unix(listener), state));
        Ok(AdminSocket {
            path: path.to_path_buf(),
            file_id: (meta.dev(), meta.ino()),
            task,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving and removes the socket file; the same as dropping it.
    pub(crate) fn close(self) {}
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        self.task.abort();
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                warn!(path = %self.path.display(), error = %e, "cannot remove the admin socket");
            }
        }
    }
}

/// Removes a socket file at `path` that no process listens on (left by a crash or a kill).
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket; srvlb will not replace it",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process is listening on this socket",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::TcpStream;

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

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("srvlb-admin-{}-{name}", std::process::id()))
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_the_file_removed_on_drop() {
        let path = temp_path("stale.sock");
        let _ = std::fs::remove_file(&path);
        // A socket file nobody listens on, as a killed srvlb leaves it.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        let state = Arc::new(AdminState::default());
        let socket = AdminSocket::bind(&path, Arc::clone(&state)).expect("replaces the stale one");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        let busy = AdminSocket::bind(&path, Arc::clone(&state)).expect_err("in use");
        assert_eq!(busy.kind(), std::io::ErrorKind::AddrInUse, "{busy}");
        drop(socket);
        assert!(!path.exists(), "removed on drop");
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_left_alone() {
        let path = temp_path("plain");
        std::fs::write(&path, b"keep me").expect("write");
        let state = Arc::new(AdminState::default());
        let e = AdminSocket::bind(&path, state).expect_err("not a socket");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&path).expect("still there"), b"keep me");
        let _ = std::fs::remove_file(&path);
    }
}
