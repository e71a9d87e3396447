//! The backend pool of one service: backends with a stable identity and their live atomics,
//! and the immutable `Snapshot` (tiers, weights, selection tables) published through `ArcSwap`.
//! Discovery feeds it whole answers; the accept path only loads the current snapshot. Nothing
//! here does I/O or picks a backend for a client.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::balance::{MaglevTable, P2cTable};
use crate::health::{Health, now_ms};

/// One address a service may send clients to, as discovery found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// SRV target (lower-case, absolute) or, for a static backend, the address as written.
    pub target: String,
    pub port: u16,
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
    pub target: Arc<str>,
    pub port: u16,
    pub addr: SocketAddr,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.target, self.port, self.addr.ip())
    }
}

/// Counters of one backend, updated by connection tasks.
#[derive(Debug, Default)]
pub struct BackendStats {
    pub active: AtomicU64,
    pub connections: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Bytes from clients to this backend.
    pub bytes_sent: AtomicU64,
    /// Bytes from this backend to clients.
    pub bytes_received: AtomicU64,
}

/// A backend with the state that outlives DNS refreshes.
#[derive(Debug)]
pub struct Backend {
    pub key: BackendKey,
    /// Identity string fed to the Maglev table; the same in every srvlb instance.
    pub name: String,
    pub stats: BackendStats,
    pub health: Health,
    /// Gone from discovery: takes no new connections, existing ones run to completion.
    removed: AtomicBool,
}

impl Backend {
    pub fn new(key: BackendKey) -> Backend {
        Backend {
            name: key.to_string(),
            key,
            stats: BackendStats::default(),
            health: Health::default(),
            removed: AtomicBool::new(false),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.key.addr
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> u64 {
        self.stats.active.load(Ordering::Relaxed)
    }
}

/// The state an operator sees for a backend, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendState {
    Active,
    /// Ejected by passive health checking until `until_ms` (on the `now_ms` clock).
    Ejected {
        until_ms: u64,
        failures: u32,
    },
    /// Removed from discovery; `connections` still open.
    Draining {
        connections: u64,
    },
    /// In a tier that is not in use because a preferred tier has usable backends.
    Standby,
}

impl BackendState {
    pub fn label(&self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Ejected { .. } => "ejected",
            BackendState::Draining { .. } => "draining",
            BackendState::Standby => "standby",
        }
    }
}

/// Backends of one SRV priority, with the selection tables built for them.
#[derive(Debug)]
pub struct Tier {
    pub priority: u16,
    /// Sorted by key, so the same answer always gives the same order.
    pub backends: Vec<Arc<Backend>>,
    pub weights: Vec<u32>,
    pub maglev: MaglevTable,
    pub p2c: P2cTable,
}

impl Tier {
    /// True when at least one backend of the tier is not ejected.
    pub fn has_available(&self, now: u64) -> bool {
        self.backends.iter().any(|b| b.health.is_available(now))
    }

    /// True when one more backend may be ejected without exceeding `max_percent` of the
    /// tier. The cap is a hard limit (rounded down): a tier of 2 at 10 % ejects nothing,
    /// a tier of 1 never ejects (there is nowhere else to send its clients anyway).
    /// Callers hold `Pool::ejection_gate` across this check and the ejection itself.
    pub fn may_eject_one(&self, now: u64, max_percent: u8) -> bool {
        let ejected = self
            .backends
            .iter()
            .filter(|b| !b.health.is_available(now))
            .count();
        let allowed = (self.backends.len() * usize::from(max_percent.min(100))) / 100;
        ejected < allowed
    }
}

/// An immutable view of a service's backends. Built on every discovery change, read by every
/// connection.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Ascending priority: index 0 is the preferred tier.
    pub tiers: Vec<Tier>,
    pub generation: u64,
}

impl Snapshot {
    pub fn backend_count(&self) -> usize {
        self.tiers.iter().map(|t| t.backends.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.tiers.is_empty()
    }

    /// Index of the tier a new connection would use first.
    /// (Mirrors the selector: a tier of only cap-held backends yields to a healthy one.)
    pub fn active_tier(&self, now: u64) -> Option<usize> {
        self.tiers
            .iter()
            .position(|t| {
                t.backends
                    .iter()
                    .any(|b| b.health.is_available(now) && !b.health.is_held(now))
            })
            .or_else(|| self.tiers.iter().position(|t| t.has_available(now)))
    }

    /// The tier that holds `backend`, found by pointer.
    pub fn tier_of(&self, backend: &Arc<Backend>) -> Option<&Tier> {
        self.tiers
            .iter()
            .find(|t| t.backends.iter().any(|b| Arc::ptr_eq(b, backend)))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Tier, &Arc<Backend>)> {
        self.tiers
            .iter()
            .flat_map(|t| t.backends.iter().map(move |b| (t, b)))
    }
}

/// What one `Pool::update` changed, for logging as one line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PoolChange {
    pub added: usize,
    pub removed: usize,
    pub reweighted: usize,
    pub total: usize,
}

impl PoolChange {
    pub fn is_noop(&self) -> bool {
        self.added == 0 && self.removed == 0 && self.reweighted == 0
    }
}

/// Error raised when a snapshot cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("building the Maglev table: {0}")]
    Maglev(#[from] crate::balance::maglev::MaglevError),
}

/// The backends of one service.
#[derive(Debug)]
pub struct Pool {
    service: String,
    maglev_size: usize,
    current: ArcSwap<Snapshot>,
    /// Backends of the current snapshot and those still draining. Only discovery updates and
    /// status reads take this lock; the accept path never does.
    members: Mutex<Members>,
    /// Serialises "may this backend be ejected?" with the ejection itself. Without it two
    /// backends of a tier crossing their threshold at the same moment would both see room
    /// under `max_ejected_percent` and together exceed it. Taken only when a failure is
    /// recorded, never on the success path.
    ejection_gate: Mutex<()>,
}

#[derive(Debug, Default)]
struct Members {
    current: HashMap<BackendKey, (Arc<Backend>, u16, u16)>,
    /// Removed backends with the priority and weight they last had, until their
    /// connections end.
    draining: Vec<(Arc<Backend>, u16, u16)>,
    generation: u64,
}

impl Pool {
    pub fn new(service: &str, maglev_size: usize) -> Pool {
        Pool {
            service: service.to_owned(),
            maglev_size,
            current: ArcSwap::from_pointee(Snapshot::default()),
            members: Mutex::new(Members::default()),
            ejection_gate: Mutex::new(()),
        }
    }

    /// Held while a failure is recorded; see `ejection_gate`.
    pub fn ejection_gate(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.ejection_gate.lock()
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// The snapshot new connections select from. One atomic load.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the backend set with `endpoints`. Backends whose key stays keep their
    /// counters and health; removed ones drain. Publishes a new snapshot only when
    /// something changed.
    pub fn update(&self, endpoints: &[Endpoint]) -> Result<PoolChange, PoolError> {
        let mut members = self.members.lock();
        let mut next: HashMap<BackendKey, (Arc<Backend>, u16, u16)> = HashMap::new();
        let mut change = PoolChange::default();
        for ep in endpoints {
            let key = BackendKey {
                target: Arc::from(ep.target.as_str()),
                port: ep.port,
                addr: ep.addr,
            };
            if next.contains_key(&key) {
                continue; // the same target listed twice: first record wins
            }
            let backend = match members.current.get(&key) {
                Some((backend, priority, weight)) => {
                    if (*priority, *weight) != (ep.priority, ep.weight) {
                        change.reweighted += 1;
                    }
                    Arc::clone(backend)
                }
                None => match members.draining.iter().position(|(b, _, _)| b.key == key) {
                    // Came back before its connections drained: same backend, same counters.
                    Some(i) => {
                        let (b, _, _) = members.draining.swap_remove(i);
                        b.removed.store(false, Ordering::Relaxed);
                        change.added += 1;
                        b
                    }
                    None => {
                        change.added += 1;
                        Arc::new(Backend::new(key.clone()))
                    }
                },
            };
            next.insert(key, (backend, ep.priority, ep.weight));
        }
        let Members {
            current, draining, ..
        } = &mut *members;
        for (key, (backend, priority, weight)) in current.iter() {
            if !next.contains_key(key) {
                change.removed += 1;
                backend.removed.store(true, Ordering::Relaxed);
                draining.push((Arc::clone(backend), *priority, *weight));
            }
        }
        change.total = next.len();
        members.draining.retain(|(b, _, _)| b.active() > 0);
        if change.is_noop() && members.generation > 0 {
            members.current = next;
            return Ok(change);
        }
        let snapshot = build_snapshot(&next, members.generation + 1, self.maglev_size)?;
        members.current = next;
        members.generation += 1;
        self.current.store(Arc::new(snapshot));
        Ok(change)
    }

    /// Every backend with its state, draining ones included, for status and metrics.
    pub fn states(&self) -> Vec<(Arc<Backend>, u16, u16, BackendState)> {
        let now = now_ms();
        let snapshot = self.snapshot();
        let active_tier = snapshot.active_tier(now);
        let mut out = Vec::new();
        for (i, tier) in snapshot.tiers.iter().enumerate() {
            for (b, w) in tier.backends.iter().zip(&tier.weights) {
                let state = match b.health.ejected_until(now) {
                    Some(until_ms) => BackendState::Ejected {
                        until_ms,
                        failures: b.health.consecutive_failures(),
                    },
                    None if active_tier.is_some_and(|a| i > a) => BackendState::Standby,
                    None => BackendState::Active,
                };
                let weight = u16::try_from(*w).unwrap_or(u16::MAX);
                out.push((Arc::clone(b), tier.priority, weight, state));
            }
        }
        let mut members = self.members.lock();
        members.draining.retain(|(b, _, _)| b.active() > 0);
        for (b, priority, weight) in &members.draining {
            let state = BackendState::Draining {
                connections: b.active(),
            };
            out.push((Arc::clone(b), *priority, *weight, state));
        }
        out
    }
}

fn build_snapshot(
    members: &HashMap<BackendKey, (Arc<Backend>, u16, u16)>,
    generation: u64,
    maglev_size: usize,
) -> Result<Snapshot, PoolError> {
    let mut by_priority: std::collections::BTreeMap<u16, Vec<(&Arc<Backend>, u16)>> =
        Default::default();
    for (backend, priority, weight) in members.values() {
        by_priority
            .entry(*priority)
            .or_default()
            .push((backend, *weight));
    }
    let mut tiers = Vec::with_capacity(by_priority.len());
    for (priority, mut list) in by_priority {
        list.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        let backends: Vec<Arc<Backend>> = list.iter().map(|(b, _)| Arc::clone(b)).collect();
        let weights: Vec<u32> = list.iter().map(|(_, w)| u32::from(*w)).collect();
        let names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        let maglev = MaglevTable::build(&names, &weights, maglev_size)?;
        let p2c = P2cTable::new(&weights);
        tiers.push(Tier {
            priority,
            backends,
            weights,
            maglev,
            p2c,
        });
    }
    Ok(Snapshot { tiers, generation })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(target: &str, port: u16, ip: [u8; 4], priority: u16, weight: u16) -> Endpoint {
        Endpoint {
            target: target.to_owned(),
            port,
            addr: SocketAddr::from((ip, port)),
            priority,
            weight,
        }
    }

    #[test]
    fn identity_survives_reordering_and_counters_are_kept() {
        let pool = Pool::new("svc", 1009);
        let a = ep("a.test.", 80, [127, 0, 0, 1], 10, 5);
        let b = ep("b.test.", 80, [127, 0, 0, 2], 10, 5);
        pool.update(&[a.clone(), b.clone()]).expect("update");
        let first = pool.snapshot();
        let backend_a = Arc::clone(&first.tiers[0].backends[0]);
        backend_a.stats.connections.fetch_add(7, Ordering::Relaxed);
        let change = pool.update(&[b, a]).expect("update");
        assert!(
            change.is_noop(),
            "reordered answer changed the pool: {change:?}"
        );
        let second = pool.snapshot();
        assert_eq!(first.generation, second.generation);
        assert!(Arc::ptr_eq(&second.tiers[0].backends[0], &backend_a));
        assert_eq!(backend_a.stats.connections.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn tiers_are_ordered_by_priority_and_removed_backends_drain() {
        let pool = Pool::new("svc", 1009);
        let a = ep("a.test.", 80, [127, 0, 0, 1], 20, 1);
        let b = ep("b.test.", 80, [127, 0, 0, 2], 10, 1);
        pool.update(&[a.clone(), b.clone()]).expect("update");
        let snap = pool.snapshot();
        assert_eq!(
            snap.tiers.iter().map(|t| t.priority).collect::<Vec<_>>(),
            [10, 20]
        );
        let backend_a = Arc::clone(&snap.tiers[1].backends[0]);
        backend_a.stats.active.fetch_add(1, Ordering::Relaxed);
        let change = pool.update(&[b]).expect("update");
        assert_eq!((change.added, change.removed, change.total), (0, 1, 1));
        assert!(backend_a.is_removed());
        let states = pool.states();
        assert!(
            states
                .iter()
                .any(|(b, priority, weight, s)| b.key == backend_a.key
                    && s.label() == "draining"
                    && (*priority, *weight) == (20, 1))
        );
        assert_eq!(pool.snapshot().backend_count(), 1);
        // It comes back: same backend object, no longer removed.
        pool.update(&[a, ep("b.test.", 80, [127, 0, 0, 2], 10, 1)])
            .expect("update");
        let again = pool.snapshot();
        assert!(Arc::ptr_eq(&again.tiers[1].backends[0], &backend_a));
        assert!(!backend_a.is_removed());
    }

    #[test]
    fn ejection_cap_counts_the_tier() {
        let pool = Pool::new("svc", 1009);
        let eps: Vec<Endpoint> = (1..=4)
            .map(|i| ep(&format!("b{i}.test."), 80, [127, 0, 0, i], 10, 1))
            .collect();
        pool.update(&eps).expect("update");
        let snap = pool.snapshot();
        let tier = &snap.tiers[0];
        let now = now_ms();
        let policy = crate::config::HealthConfig {
            consecutive_failures: 1,
            base_ejection: std::time::Duration::from_secs(60),
            max_ejection: std::time::Duration::from_secs(60),
            max_ejected_percent: 50,
        };
        let mut ejected = 0;
        for b in &tier.backends {
            let verdict = b
                .health
                .record_failure(now, &policy, || tier.may_eject_one(now, 50));
            if matches!(verdict, crate::health::FailureVerdict::Ejected { .. }) {
                ejected += 1;
            }
        }
        assert_eq!(ejected, 2);
        assert!(tier.has_available(now));
    }

    #[test]
    fn ejection_cap_is_never_exceeded_even_in_small_tiers() {
        let pool = Pool::new("svc", 1009);
        let eps: Vec<Endpoint> = (1..=2)
            .map(|i| ep(&format!("b{i}.test."), 80, [127, 0, 0, i], 10, 1))
            .collect();
        pool.update(&eps).expect("update");
        let snap = pool.snapshot();
        let tier = &snap.tiers[0];
        let now = now_ms();
        // 2 backends: 10 % allows none, 50 % one, 100 % both.
        assert!(!tier.may_eject_one(now, 10));
        assert!(tier.may_eject_one(now, 50));
        assert!(tier.may_eject_one(now, 100));
        let policy = crate::config::HealthConfig {
            consecutive_failures: 1,
            base_ejection: std::time::Duration::from_secs(60),
            max_ejection: std::time::Duration::from_secs(60),
            max_ejected_percent: 50,
        };
        tier.backends[0]
            .health
            .record_failure(now, &policy, || tier.may_eject_one(now, 50));
        assert!(!tier.may_eject_one(now, 50));
    }
}
