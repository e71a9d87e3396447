//! Configuration: the TOML schema, its defaults, and validation whose errors name file, line,
//! column and key. It owns turning text into a checked [`Config`] and printing the plan; it
//! must not do I/O beyond reading the file (and the admin token file it names), and never
//! resolves names (SRV names and nameservers are only checked for shape; discovery does the
//! lookups). Each key is declared once, in `keys.rs`; ARCHITECTURE.md says what else a new
//! key needs.

mod admin;
mod duration;
mod error;
mod keys;
mod plan;
mod raw;
mod validate;
mod values;

#[cfg(test)]
mod docs_tests;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) use admin::AdminToken;
pub use error::ConfigError;

/// A validated configuration; every default is already filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the configuration came from (the path given to `load`, or `parse`'s origin).
    pub(crate) source: PathBuf,
    /// `[global]`.
    pub global: GlobalConfig,
    /// `[resolver]`.
    pub resolver: ResolverConfig,
    /// In file order; at least one, names and listen addresses unique.
    pub services: Vec<ServiceConfig>,
}

/// The `[global]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalConfig {
    /// Metrics and status endpoint; `None` means no admin listener.
    pub admin: Option<SocketAddr>,
    /// The admin endpoint on a unix socket as well (or instead); `None`: no socket.
    pub admin_socket: Option<PathBuf>,
    /// Read from `admin_token_file` when the configuration is loaded; when set, every admin
    /// request but `/healthz` must carry it as a bearer token.
    pub(crate) admin_token: Option<AdminToken>,
    /// `log_format`: how log lines are written.
    pub log_format: LogFormat,
    /// How long `SIGTERM` waits for connections to finish before closing them.
    pub(crate) shutdown_grace: Duration,
    /// File that gets one line per client connection; `None`: no access log.
    pub(crate) access_log: Option<PathBuf>,
    pub(crate) access_log_format: LogFormat,
    /// Data-path worker threads; `None` for `"auto"` (one per CPU). Read at start only.
    pub(crate) workers: Option<NonZeroUsize>,
}

impl GlobalConfig {
    /// The most worker threads `workers` may ask for.
    pub(crate) const MAX_WORKERS: i64 = 1024;

    /// The number of worker threads this configuration runs with on this machine.
    pub(crate) fn worker_count(&self) -> NonZeroUsize {
        self.workers
            .unwrap_or_else(crate::workers::Workers::auto_count)
    }
}

/// `[global] log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The `[resolver]` table: the DNS client and the refresh policy every SRV service shares.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolverConfig {
    /// Empty means the system resolver (resolv.conf).
    pub(crate) nameservers: Vec<SocketAddr>,
    pub(crate) timeout: Duration,
    /// Record TTLs are clamped to `[min_refresh, max_refresh]`.
    pub(crate) min_refresh: Duration,
    pub(crate) max_refresh: Duration,
    /// How long an NXDOMAIN or empty answer must persist before a pool is emptied.
    pub(crate) empty_hold: Duration,
    /// Which address records of SRV targets are asked for and used.
    pub(crate) family: AddressFamily,
}

/// `[resolver] family`: the address families srvlb resolves SRV targets to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddressFamily {
    /// A and AAAA (the default).
    Any,
    /// A only: for hosts without IPv6 connectivity; AAAA is neither asked for nor tried.
    Ipv4,
    /// AAAA only.
    Ipv6,
}

/// One `[[service]]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// `name`: unique; labels logs, metrics and /status.
    pub name: String,
    /// Never empty.
    pub listen: Vec<SocketAddr>,
    /// `srv`: the SRV name to discover backends from, when set.
    pub srv: Option<String>,
    /// Fixed backends (TOML key `static`). At least one of `srv` and this is set.
    pub static_backends: Vec<SocketAddr>,
    /// `balance`: the selection algorithm.
    pub balance: Balance,
    /// Only used by `Balance::Maglev`.
    pub(crate) hash_key: HashKey,
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// TCP keepalive on both legs: the silence before the first probe, which is also the
    /// interval between probes ([`KEEPALIVE_PROBES`] of them). `None`: off.
    pub(crate) tcp_keepalive: Option<Duration>,
    /// Further backends tried after a failed connect.
    pub connect_retries: u32,
    /// `max_connections`: open connections at most; more clients wait in the backlog.
    pub max_connections: usize,
    /// Open connections one source (an IPv4 address or an IPv6 /64) may have; `None`: no
    /// limit.
    pub(crate) max_connections_per_source: Option<u32>,
    /// New connections one source may open, as a token bucket; `None`: no limit.
    pub(crate) rate_per_source: Option<RatePerSource>,
    /// Source filter: a client in `deny` is refused; when `allow` is not empty, a client must
    /// also be in `allow`. Networks are stored with host bits clear.
    pub(crate) allow: Vec<ipnet::IpNet>,
    pub(crate) deny: Vec<ipnet::IpNet>,
    /// `send_proxy`: the PROXY header version sent to backends, when set.
    pub send_proxy: Option<ProxyProtocol>,
    /// Every connection must start with a PROXY header (v1 or v2), whose client address
    /// then stands for the connection's: a balancer in front tells who the client is.
    pub(crate) accept_proxy: bool,
    /// How long a client may take to send that header.
    pub(crate) accept_proxy_timeout: Duration,
    /// Peers trusted to send that header (the balancers in front); empty: any peer.
    pub(crate) accept_proxy_from: Vec<ipnet::IpNet>,
    /// `data_path`: how the bytes of this service's connections move.
    pub(crate) data_path: DataPath,
    pub(crate) health: HealthConfig,
}

/// `data_path`: the kernel interface a service's connections move bytes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataPath {
    /// Readiness from epoll, then read/write (and splice(2) for bulk): the default.
    Epoll,
    /// Receives and sends submitted in batches on each worker's io_uring ring (Linux 6.0 or
    /// later; where it is missing, connections take the epoll path).
    IoUring,
}

/// A token bucket: `count` new connections per `per`, and up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RatePerSource {
    pub(crate) count: u32,
    pub(crate) per: Duration,
    pub(crate) burst: u32,
}

/// Unanswered keepalive probes after which the kernel declares a peer gone, so a vanished
/// peer is noticed within `(1 + KEEPALIVE_PROBES) * tcp_keepalive` of silence.
pub(crate) const KEEPALIVE_PROBES: u32 = 4;

/// `balance`: how a tier picks a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// A Maglev table keyed by the client address: stable, consistent hashing.
    Maglev,
    /// Power of two choices by active connections per unit of weight.
    P2c,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HashKey {
    ClientIp,
    ClientIpPort,
}

/// A PROXY protocol version (`send_proxy`, and what `accept_proxy` read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// The text header.
    V1,
    /// The binary header.
    V2,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HealthConfig {
    /// At least 1.
    pub(crate) consecutive_failures: u32,
    pub(crate) base_ejection: Duration,
    /// Not shorter than `base_ejection`.
    pub(crate) max_ejection: Duration,
    /// 0..=100.
    pub(crate) max_ejected_percent: u8,
}

impl Config {
    /// Reads and validates the file at `path`; errors name `path` as given.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Validates `text`; `origin` names it in errors and becomes `Config::source`.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        validate::config(text, PathBuf::from(origin)).map_err(|p| p.into_error(origin, text))
    }

    /// The human-readable plan `srvlb check` prints.
    pub fn plan(&self) -> String {
        plan::render(self)
    }
}

impl ServiceConfig {
    /// True when the discovery source (SRV name and static list) equals `other`'s; a reload
    /// then keeps the pool's state. DNS names compare case-insensitively and the static list
    /// as a set, because neither difference changes which backends are found.
    pub(crate) fn same_discovery(&self, other: &ServiceConfig) -> bool {
        let srv_equal = match (&self.srv, &other.srv) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            (None, None) => true,
            _ => false,
        };
        let sorted = |list: &[SocketAddr]| {
            let mut list = list.to_vec();
            list.sort_unstable();
            list
        };
        srv_equal && sorted(&self.static_backends) == sorted(&other.static_backends)
    }
}
