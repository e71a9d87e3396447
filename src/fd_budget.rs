//! The descriptor budget: how many proxied connections fit in the process's RLIMIT_NOFILE.
//! Each proxied connection takes two descriptors (client and backend); a reserve stays free
//! for the admin endpoint, DNS, splice pipes, listeners and the process itself, so that
//! srvlb stops accepting at the cap (clients wait in the backlog) instead of running into
//! EMFILE, and `/healthz` still answers when every proxied slot is taken. This module only
//! does the arithmetic and reads the limit; the listeners enforce it.

use std::fmt;

/// Descriptors one proxied connection holds: the client's socket and the backend's.
pub(crate) const PER_CONNECTION: u64 = 2;

/// The process itself: stdio, the runtime's epoll and eventfd, signal handling, the config
/// file read on reload, /proc files read by the admin endpoint, a log file.
const BASE: u64 = 32;
/// DNS: the resolver's UDP sockets and an occasional TCP fallback for a truncated answer.
const DNS: u64 = 16;
/// Idle splice pipes the pool keeps (two descriptors each), see `proxy::splice::POOL_MAX`.
const PIPE_POOL: u64 = 2 * 32;
/// Admin connections served at once, at most (fewer under a small limit, see `admin_slots`).
pub(crate) const MAX_ADMIN_SLOTS: usize = 64;
/// And at least.
const MIN_ADMIN_SLOTS: usize = 4;

/// How the descriptor limit is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft RLIMIT_NOFILE; `None` when unlimited.
    pub(crate) limit: Option<u64>,
    /// Descriptors kept free of proxied connections.
    pub(crate) reserve: u64,
    /// Proxied connections allowed at once, across every service.
    pub connection_cap: usize,
    /// Admin connections served at once; part of the reserve.
    pub(crate) admin_slots: usize,
}

impl FdBudget {
    /// The budget for the process's current soft RLIMIT_NOFILE and `listeners` listening
    /// sockets (the admin listener included).
    pub fn current(listeners: usize) -> FdBudget {
        FdBudget::for_limit(nofile_limit(), listeners)
    }

    /// The budget for a soft limit of `limit` descriptors (`None`: unlimited).
    ///
    /// reserve = process (32) + listeners + admin slots and a spare (admin_slots + 2) + DNS
    /// (16) + the splice pipe pool (64, less under a small limit) + 1 % of the limit for
    /// pipes in flight. The admin slots scale with the limit (limit / 16, between 4 and 64),
    /// so that a small limit still leaves room for proxied connections.
    pub(crate) fn for_limit(limit: Option<u64>, listeners: usize) -> FdBudget {
        let Some(limit) = limit else {
            return FdBudget {
                limit: None,
                reserve: 0,
                connection_cap: crate::service::ConnectionLimit::MAX,
                admin_slots: MAX_ADMIN_SLOTS,
            };
        };
        let admin_slots = usize::try_from(limit / 16)
            .unwrap_or(usize::MAX)
            .clamp(MIN_ADMIN_SLOTS, MAX_ADMIN_SLOTS);
        let listeners = u64::try_from(listeners).unwrap_or(u64::MAX);
        let reserve = BASE
            .saturating_add(listeners)
            .saturating_add(admin_slots as u64 + 2)
            .saturating_add(DNS)
            .saturating_add(PIPE_POOL.min(limit / 8))
            .saturating_add(limit / 100);
        let cap = limit.saturating_sub(reserve) / PER_CONNECTION;
        // A limit too small for even one connection beside the reserve still gets one: a
        // balancer that never accepts is worse than one that may hit EMFILE.
        let connection_cap = usize::try_from(cap)
            .unwrap_or(usize::MAX)
            .clamp(1, crate::service::ConnectionLimit::MAX);
        FdBudget {
            limit: Some(limit),
            reserve,
            connection_cap,
            admin_slots,
        }
    }

    /// True when the limit is too small to leave the reserve free even at one connection.
    pub(crate) fn is_starved(&self) -> bool {
        self.limit
            .is_some_and(|l| l < self.reserve + PER_CONNECTION)
    }
}

impl fmt::Display for FdBudget {
    /// One line for `srvlb check` and the start-up log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limit {
            None => write!(f, "unlimited (RLIMIT_NOFILE is unlimited)"),
            Some(limit) => {
                write!(
                    f,
                    "{} proxied connections (RLIMIT_NOFILE {limit}: {PER_CONNECTION} per connection, \
                     {} reserved for admin, DNS, pipes and listeners)",
                    self.connection_cap, self.reserve
                )?;
                if self.is_starved() {
                    write!(f, "; the limit is too low for the reserve, raise it")?;
                }
                Ok(())
            }
        }
    }
}

/// The soft RLIMIT_NOFILE of this process; `None` when unlimited.
pub(crate) fn nofile_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit};
    getrlimit(Resource::Nofile).current
}

/// Descriptors this process has open now (Linux: entries of /proc/self/fd, less the one the
/// count itself uses); `None` where that cannot be read.
pub(crate) fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    let n = entries.count() as u64;
    Some(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_reserve_free_and_scales_with_the_limit() {
        for limit in [16u64, 64, 128, 256, 1024, 4096, 20_000, 1 << 20] {
            let b = FdBudget::for_limit(Some(limit), 3);
            assert!(b.connection_cap >= 1, "{limit}: {b:?}");
            if !b.is_starved() {
                assert!(
                    b.connection_cap as u64 * PER_CONNECTION + b.reserve <= limit,
                    "{limit}: {b:?}"
                );
            }
            assert!((MIN_ADMIN_SLOTS..=MAX_ADMIN_SLOTS).contains(&b.admin_slots));
            assert!(
                b.reserve > b.admin_slots as u64,
                "admin slots are part of the reserve"
            );
        }
        // The figures the README quotes.
        let b = FdBudget::for_limit(Some(20_000), 2);
        assert!((9_700..=9_950).contains(&b.connection_cap), "{b:?}");
        let b = FdBudget::for_limit(Some(128), 2);
        assert!(b.connection_cap >= 16 && !b.is_starved(), "{b:?}");
        let b = FdBudget::for_limit(Some(1024), 2);
        assert!(b.connection_cap >= 400, "{b:?}");
    }

    #[test]
    fn unlimited_and_starved_limits() {
        let b = FdBudget::for_limit(None, 1);
        assert_eq!(b.connection_cap, crate::service::ConnectionLimit::MAX);
        assert_eq!(b.reserve, 0);
        let b = FdBudget::for_limit(Some(20), 1);
        assert!(b.is_starved());
        assert_eq!(b.connection_cap, 1);
        assert!(b.to_string().contains("raise it"), "{b}");
    }

    #[test]
    fn reads_this_process_limit_and_descriptors() {
        let b = FdBudget::current(1);
        assert_eq!(b.limit, nofile_limit());
        let open = open_fds().expect("/proc/self/fd");
        assert!(open >= 3, "stdio at least: {open}");
    }
}
