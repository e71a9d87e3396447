//! A backend: its identity (SRV target, port, address), its counters and health, and the
//! state an operator sees. The live part is atomics, written by connection tasks and read
//! by selection through [`Candidate`]; nothing here decides anything.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::balance::select::Candidate;
use crate::health::Health;

/// One address a service may send clients to, as discovery found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// SRV target (lower-case, absolute) or, for a static backend, the address as written.
    pub target: String,
    /// SRV port, or the static address's port.
    pub port: u16,
    /// The address connections go to.
    pub addr: SocketAddr,
    /// RFC 2782 priority: lower is preferred.
    pub priority: u16,
    /// RFC 2782 weight: share within the tier; 0 = only when no weighted backend is usable.
    pub weight: u16,
}

/// A backend's identity: its SRV target and port, and the address the target resolved to
/// (a target with several addresses gives several backends). Position in the DNS answer
/// plays no part, so reordered answers change nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// SRV target (or the static address as written).
    pub target: Arc<str>,
    pub(crate) port: u16,
    pub(crate) addr: SocketAddr,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.target, self.port, self.addr.ip())
    }
}

/// Counters of one backend, updated by connection tasks.
#[derive(Debug, Default)]
pub(crate) struct BackendStats {
    pub(crate) active: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    /// Bytes from clients to this backend.
    pub(crate) bytes_sent: AtomicU64,
    /// Bytes from this backend to clients.
    pub(crate) bytes_received: AtomicU64,
}

/// A backend with the state that outlives DNS refreshes.
#[derive(Debug)]
pub struct Backend {
    /// Its identity: SRV target, port and address.
    pub key: BackendKey,
    /// Identity string fed to the Maglev table; the same in every srvlb instance.
    pub(crate) name: String,
    pub(crate) stats: BackendStats,
    pub(crate) health: Health,
    /// Left out of the latest DNS answer, but kept in service until a second lookup confirms
    /// the removal (damping). Retries prefer other backends.
    pub(super) removal_pending: AtomicBool,
}

impl Backend {
    pub(crate) fn new(key: BackendKey) -> Backend {
        Backend {
            name: key.to_string(),
            key,
            stats: BackendStats::default(),
            health: Health::default(),
            removal_pending: AtomicBool::new(false),
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.key.addr
    }

    pub(crate) fn active(&self) -> u64 {
        self.stats.active.load(Ordering::Relaxed)
    }

    /// True while the latest answer left this backend out and a second lookup has not yet
    /// confirmed the removal (see `Pool::mark_removal_pending`).
    pub(crate) fn is_removal_pending(&self) -> bool {
        self.removal_pending.load(Ordering::Relaxed)
    }
}

/// The state an operator sees for a backend, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendState {
    /// Takes new connections.
    Active,
    /// Ejected by passive health checking until `until_ms` (on the `now_ms` clock).
    Ejected {
        /// Until when (`now_ms` clock).
        until_ms: u64,
        /// Consecutive failures that led to the ejection.
        failures: u32,
    },
    /// Removed from discovery; `connections` still open.
    Draining {
        /// Connections still open.
        connections: u64,
    },
    /// In a tier that is not in use because a preferred tier has usable backends.
    Standby,
    /// Ejected, but another address of the same SRV target and port is usable, so the
    /// target itself is served (e.g. an AAAA address on a host whose backend listens on
    /// IPv4 only). Not a fault of the target.
    AddressUnused {
        /// Until when (`now_ms` clock).
        until_ms: u64,
        /// Consecutive failures that led to the ejection.
        failures: u32,
    },
}

impl BackendState {
    /// The state's name as /status and the metrics show it.
    pub fn label(&self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Ejected { .. } => "ejected",
            BackendState::Draining { .. } => "draining",
            BackendState::Standby => "standby",
            BackendState::AddressUnused { .. } => "address_unused",
        }
    }
}

/// Selection reads a backend through this view: health's verdicts and discovery's flag.
impl Candidate for Backend {
    fn is_available(&self, now: u64) -> bool {
        self.health.is_available(now)
    }

    fn is_held(&self, now: u64) -> bool {
        self.health.is_held(now)
    }

    fn has_failures(&self) -> bool {
        self.health.consecutive_failures() > 0
    }

    fn is_removal_pending(&self) -> bool {
        Backend::is_removal_pending(self)
    }

    fn last_failure(&self) -> u64 {
        self.health.last_failure()
    }

    fn load(&self) -> u64 {
        self.active()
    }
}
