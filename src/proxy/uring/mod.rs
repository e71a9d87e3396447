//! The io_uring data path, chosen per service with `data_path = "io_uring"`: each worker
//! thread has one ring (`ring`), set up on its first such connection, and a connection's
//! two directions move on it (`transfer`) with the epoll path's rules. Where the kernel
//! has no usable io_uring (too old, `io_uring_disabled`, a seccomp filter), connections
//! take the epoll path instead and a warning says why.
//!
//! What it buys: the epoll path makes about four syscalls per small message (wait, read,
//! write, and the read that finds the socket drained); here a worker submits every
//! connection's next operations in one `io_uring_enter` before it sleeps.

mod ring;
mod transfer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub(crate) use ring::{flush_on_park, on_park};
pub(crate) use transfer::proxy_streams;

use crate::config::{DataPath, ServiceConfig};
use crate::log_throttle::LogThrottle;

static FALLBACK_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(60));

/// What /metrics reports of the io_uring data path.
pub(crate) struct RingStats {
    /// Rings set up (one per worker that served an io_uring connection; each holds two
    /// descriptors: the ring, and the duplicate its worker's reactor watches).
    pub(crate) rings: AtomicU64,
    /// Connections whose bytes moved on a ring.
    pub(crate) connections: AtomicU64,
    /// Connections that asked for io_uring and took the epoll path (no ring could be set up).
    pub(crate) fallbacks: AtomicU64,
    /// Receives that found their worker's buffer pool empty and waited for a buffer.
    pub(crate) buffer_waits: AtomicU64,
}

pub(crate) static STATS: RingStats = RingStats {
    rings: AtomicU64::new(0),
    connections: AtomicU64::new(0),
    fallbacks: AtomicU64::new(0),
    buffer_waits: AtomicU64::new(0),
};

/// The data path a connection of this service takes: its `data_path`, unless
/// `SRVLB_DATA_PATH` (`epoll` or `io_uring`) is set in the environment, which overrides
/// every service's (to run a test suite or a benchmark on either path). Read once.
pub(crate) fn wanted(config: &ServiceConfig) -> DataPath {
    static OVERRIDE: std::sync::OnceLock<Option<DataPath>> = std::sync::OnceLock::new();
    let forced = OVERRIDE.get_or_init(|| match std::env::var("SRVLB_DATA_PATH").ok().as_deref() {
        Some("io_uring") => Some(DataPath::IoUring),
        Some("epoll") => Some(DataPath::Epoll),
        _ => None,
    });
    forced.unwrap_or(config.data_path)
}

/// True when this thread's ring is ready (set up now if need be). When it cannot be, the
/// connection takes the epoll path; the reason is logged (at most once a minute).
pub(crate) fn ready() -> bool {
    match ring::ensure() {
        Ok(()) => {
            STATS.connections.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(e) => {
            STATS.fallbacks.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = FALLBACK_LOG.permit() {
                tracing::warn!(
                    error = %e,
                    suppressed,
                    "io_uring is not available; connections take the epoll path"
                );
            }
            false
        }
    }
}
