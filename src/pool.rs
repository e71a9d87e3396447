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
    /// Left out of the latest DNS answer, but kept in service until a second lookup confirms
    /// the removal (damping). Retries prefer other backends.
    removal_pending: AtomicBool,
}

impl Backend {
    pub fn new(key: BackendKey) -> Backend {
        Backend {
            name: key.to_string(),
            key,
            stats: BackendStats::default(),
            health: Health::default(),
            removal_pending: AtomicBool::new(false),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.key.addr
    }

    pub fn active(&self) -> u64 {
        self.stats.active.load(Ordering::Relaxed)
    }

    /// True while the latest answer left this backend out and a second lookup has not yet
    /// confirmed the removal (see `Pool::mark_removal_pending`).
    pub fn is_removal_pending(&self) -> bool {
        self.removal_pending.load(Ordering::Relaxed)
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
    /// Ejected, but another address of the same SRV target and port is usable, so the
    /// target itself is served (e.g. an AAAA address on a host whose backend listens on
    /// IPv4 only). Not a fault of the target.
    AddressUnused {
        until_ms: u64,
        failures: u32,
    },
}

impl BackendState {
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

/// Backends of one SRV priority, with the selection tables built for them.
#[derive(Debug)]
pub struct Tier {
    pub priority: u16,
    /// Sorted by key, so the same answer always gives the same order.
    pub backends: Vec<Arc<Backend>>,
    /// Selection weights: each SRV record's weight split evenly across the addresses its
    /// target resolved to (see `address_weights`). Parallel to `backends`.
    pub weights: Vec<u32>,
    /// The SRV weight of each backend's record, as published. Parallel to `backends`.
    pub srv_weights: Vec<u16>,
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
    /// Endpoints left out because the answer exceeded `MAX_TIERS` or `MAX_BACKENDS`.
    pub capped: usize,
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
    #[error("building the snapshot: {0}")]
    Build(String),
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

/// A backend as the pool holds it, with the priority and weight of its SRV record.
#[derive(Debug, Clone)]
struct Member {
    backend: Arc<Backend>,
    priority: u16,
    weight: u16,
}

/// A backend as /status and /metrics show it: its record's priority and weight, and its
/// state now.
#[derive(Debug, Clone)]
pub struct BackendStatus {
    pub backend: Arc<Backend>,
    pub priority: u16,
    pub weight: u16,
    pub state: BackendState,
}

#[derive(Debug, Default)]
struct Members {
    current: HashMap<BackendKey, Member>,
    /// Removed backends with the priority and weight they last had, until their
    /// connections end.
    draining: Vec<Member>,
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
    /// something changed. An answer beyond `MAX_TIERS` priorities or `MAX_BACKENDS`
    /// backends is cut to the preferred ones (`PoolChange::capped` says how many went).
    ///
    /// The selection tables (one Maglev table per tier, ~2 ms each) are built without
    /// holding `members`, which /metrics and /status take too. Discovery is the only
    /// writer; should two updates ever overlap, the one that publishes second sees the
    /// generation moved and plans again from what the first published.
    pub fn update(&self, endpoints: &[Endpoint]) -> Result<PoolChange, PoolError> {
        let (endpoints, capped) = cap(endpoints);
        loop {
            let plan = plan(&self.members.lock(), &endpoints);
            let mut change = plan.change;
            change.capped = capped;
            if change.is_noop() && plan.generation > 0 {
                return Ok(change);
            }
            let snapshot = build_snapshot(&plan.next, plan.generation + 1, self.maglev_size)?;
            let mut members = self.members.lock();
            if members.generation != plan.generation {
                continue;
            }
            let Members {
                current, draining, ..
            } = &mut *members;
            for backend in &plan.revived {
                draining.retain(|m| !Arc::ptr_eq(&m.backend, backend));
            }
            for (key, member) in current.iter() {
                if !plan.next.contains_key(key) {
                    draining.push(member.clone());
                }
            }
            draining.retain(|m| m.backend.active() > 0);
            members.current = plan.next;
            members.generation += 1;
            // Stored under the lock, so `states` sees the snapshot and the draining list
            // of the same generation.
            self.current.store(Arc::new(snapshot));
            return Ok(change);
        }
    }

    /// `update` on a blocking thread: building the tables of a large answer takes
    /// milliseconds to tens of milliseconds, which must not stall a runtime worker.
    pub async fn update_off_runtime(
        self: &Arc<Self>,
        endpoints: Vec<Endpoint>,
    ) -> Result<PoolChange, PoolError> {
        let pool = Arc::clone(self);
        match tokio::task::spawn_blocking(move || pool.update(&endpoints)).await {
            Ok(result) => result,
            Err(e) => Err(PoolError::Build(e.to_string())),
        }
    }

    /// Flags the backends of the current snapshot whose removal waits for confirmation
    /// (`keys`) and clears the flag on every other one. Discovery calls it after each
    /// update; until then a newly published backend reads as not pending, which is the
    /// safe side (a retry merely does not avoid it).
    pub fn mark_removal_pending(&self, keys: &std::collections::HashSet<BackendKey>) {
        for (_, backend) in self.snapshot().iter() {
            backend
                .removal_pending
                .store(keys.contains(&backend.key), Ordering::Relaxed);
        }
    }

    /// Every backend with its state, draining ones included, for status and metrics.
    pub fn states(&self) -> Vec<BackendStatus> {
        let now = now_ms();
        // The snapshot is read under `members`, where `update` publishes it: the snapshot and
        // the draining list then come from the same generation, so a backend removed
        // meanwhile is not listed both as active (old snapshot) and as draining.
        let mut members = self.members.lock();
        let snapshot = self.snapshot();
        let active_tier = snapshot.active_tier(now);
        let mut out = Vec::new();
        for (i, tier) in snapshot.tiers.iter().enumerate() {
            for (b, w) in tier.backends.iter().zip(&tier.srv_weights) {
                let state = match b.health.ejected_until(now) {
                    Some(until_ms) if sibling_usable(tier, b, now) => BackendState::AddressUnused {
                        until_ms,
                        failures: b.health.consecutive_failures(),
                    },
                    Some(until_ms) => BackendState::Ejected {
                        until_ms,
                        failures: b.health.consecutive_failures(),
                    },
                    None if active_tier.is_some_and(|a| i > a) => BackendState::Standby,
                    None => BackendState::Active,
                };
                out.push(BackendStatus {
                    backend: Arc::clone(b),
                    priority: tier.priority,
                    weight: *w,
                    state,
                });
            }
        }
        members.draining.retain(|m| m.backend.active() > 0);
        for m in &members.draining {
            let state = BackendState::Draining {
                connections: m.backend.active(),
            };
            out.push(BackendStatus {
                backend: Arc::clone(&m.backend),
                priority: m.priority,
                weight: m.weight,
                state,
            });
        }
        out
    }
}

/// Most backends a service takes from one answer; beyond that the preferred ones are kept.
/// Bounds the memory and time a huge (or hostile) answer costs.
pub const MAX_BACKENDS: usize = 10_000;
/// Most tiers (distinct priorities) a service keeps: each costs a Maglev table of
/// `maglev_size` slots, so thousands of distinct priorities would cost hundreds of MiB.
pub const MAX_TIERS: usize = 32;

/// True when another address of `backend`'s SRV target and port in `tier` takes traffic.
pub(crate) fn sibling_usable(tier: &Tier, backend: &Arc<Backend>, now: u64) -> bool {
    tier.backends.iter().any(|other| {
        !Arc::ptr_eq(other, backend)
            && other.key.target == backend.key.target
            && other.key.port == backend.key.port
            && other.health.is_available(now)
    })
}

/// `cap` for owned endpoints: discovery trims an answer with it before comparing it with
/// the current set, so a huge answer costs no more than a capped one. Returns how many
/// endpoints were cut.
pub fn trim_to_caps(endpoints: Vec<Endpoint>) -> (Vec<Endpoint>, usize) {
    let (kept, cut) = cap(&endpoints);
    if cut == 0 && kept.len() == endpoints.len() {
        return (endpoints, 0);
    }
    let kept = kept.into_iter().cloned().collect();
    (kept, cut)
}

/// The endpoints an update uses: one per key (the first in the answer wins), cut to the
/// `MAX_TIERS` lowest priority values and then to `MAX_BACKENDS` in (priority, key) order,
/// so every instance cuts the same answer the same way. Returns how many were cut.
fn cap(endpoints: &[Endpoint]) -> (Vec<&Endpoint>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut list: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|ep| seen.insert((ep.target.as_str(), ep.port, ep.addr)))
        .collect();
    let priorities: std::collections::BTreeSet<u16> = list.iter().map(|ep| ep.priority).collect();
    if list.len() <= MAX_BACKENDS && priorities.len() <= MAX_TIERS {
        return (list, 0);
    }
    let before = list.len();
    if let Some(&last_kept) = priorities.iter().nth(MAX_TIERS - 1) {
        list.retain(|ep| ep.priority <= last_kept);
    }
    list.sort_by(|a, b| {
        (a.priority, &a.target, a.port, a.addr).cmp(&(b.priority, &b.target, b.port, b.addr))
    });
    list.truncate(MAX_BACKENDS);
    let cut = before - list.len();
    (list, cut)
}

/// What an update will do, worked out under the `members` lock without changing anything.
struct Plan {
    next: HashMap<BackendKey, Member>,
    /// Draining backends that are back in the answer.
    revived: Vec<Arc<Backend>>,
    change: PoolChange,
    /// The generation the plan was made against.
    generation: u64,
}

fn plan(members: &Members, endpoints: &[&Endpoint]) -> Plan {
    let mut next: HashMap<BackendKey, Member> = HashMap::new();
    let mut revived = Vec::new();
    let mut change = PoolChange::default();
    for ep in endpoints {
        let key = BackendKey {
            target: Arc::from(ep.target.as_str()),
            port: ep.port,
            addr: ep.addr,
        };
        let backend = match members.current.get(&key) {
            Some(member) => {
                if (member.priority, member.weight) != (ep.priority, ep.weight) {
                    change.reweighted += 1;
                }
                Arc::clone(&member.backend)
            }
            None => {
                change.added += 1;
                match members.draining.iter().find(|m| m.backend.key == key) {
                    // Came back before its connections drained: same backend, same counters.
                    Some(m) => {
                        revived.push(Arc::clone(&m.backend));
                        Arc::clone(&m.backend)
                    }
                    None => Arc::new(Backend::new(key.clone())),
                }
            }
        };
        next.insert(
            key,
            Member {
                backend,
                priority: ep.priority,
                weight: ep.weight,
            },
        );
    }
    change.removed = members
        .current
        .keys()
        .filter(|key| !next.contains_key(*key))
        .count();
    change.total = next.len();
    Plan {
        next,
        revived,
        change,
        generation: members.generation,
    }
}

/// Divisible by every address count from 1 to 12, so splitting a record's weight across
/// that many addresses is exact; `u16::MAX * WEIGHT_SCALE` still fits a u32.
const WEIGHT_SCALE: u32 = 27_720;

/// Selection weights of one tier's backends. RFC 2782 gives a weight to each SRV record,
/// not to each address its target resolves to: a record's weight is split evenly across
/// the backends of the same target and port (its addresses), so a target with three A
/// records takes the same share as one with a single address. Weight 0 stays 0 (its
/// meaning, "only when no weighted backend is usable", is kept); any other weight stays at
/// least 1.
fn address_weights(backends: &[Arc<Backend>], srv_weights: &[u16]) -> Vec<u32> {
    let mut addresses: HashMap<(&str, u16), u32> = HashMap::new();
    for b in backends {
        *addresses.entry((&*b.key.target, b.key.port)).or_insert(0) += 1;
    }
    backends
        .iter()
        .zip(srv_weights)
        .map(|(b, &w)| {
            if w == 0 {
                return 0;
            }
            let n = addresses
                .get(&(&*b.key.target, b.key.port))
                .copied()
                .unwrap_or(1)
                .max(1);
            (u32::from(w) * WEIGHT_SCALE / n).max(1)
        })
        .collect()
}

fn build_snapshot(
    members: &HashMap<BackendKey, Member>,
    generation: u64,
    maglev_size: usize,
) -> Result<Snapshot, PoolError> {
    let mut by_priority: std::collections::BTreeMap<u16, Vec<(&Arc<Backend>, u16)>> =
        Default::default();
    for m in members.values() {
        by_priority
            .entry(m.priority)
            .or_default()
            .push((&m.backend, m.weight));
    }
    let mut tiers = Vec::with_capacity(by_priority.len());
    for (priority, mut list) in by_priority {
        list.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        let backends: Vec<Arc<Backend>> = list.iter().map(|(b, _)| Arc::clone(b)).collect();
        let srv_weights: Vec<u16> = list.iter().map(|(_, w)| *w).collect();
        let weights = address_weights(&backends, &srv_weights);
        let names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        let maglev = MaglevTable::build(&names, &weights, maglev_size)?;
        let p2c = P2cTable::new(&weights);
        tiers.push(Tier {
            priority,
            backends,
            weights,
            srv_weights,
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
        let states = pool.states();
        assert!(states.iter().any(|st| st.backend.key == backend_a.key
            && st.state.label() == "draining"
            && (st.priority, st.weight) == (20, 1)));
        assert_eq!(pool.snapshot().backend_count(), 1);
        // It comes back: same backend object, no longer removed.
        pool.update(&[a, ep("b.test.", 80, [127, 0, 0, 2], 10, 1)])
            .expect("update");
        let again = pool.snapshot();
        assert!(Arc::ptr_eq(&again.tiers[1].backends[0], &backend_a));
        assert!(
            pool.states()
                .iter()
                .any(|st| Arc::ptr_eq(&st.backend, &backend_a) && st.state.label() == "standby"),
            "the revived backend is not back in its (backup) tier"
        );
    }

    #[test]
    fn tiers_beyond_the_cap_are_cut_keeping_the_lowest_priorities() {
        let pool = Pool::new("svc", 1009);
        // 40 priorities, given highest first: the 32 lowest values stay.
        let eps: Vec<Endpoint> = (0..40u16)
            .rev()
            .map(|i| {
                let ip = [127, 0, (i >> 8) as u8, i as u8];
                ep(&format!("b{i}.test."), 80, ip, 100 + i, 1)
            })
            .collect();
        let change = pool.update(&eps).expect("update");
        assert_eq!(change.capped, 8);
        assert_eq!(change.total, MAX_TIERS);
        let priorities: Vec<u16> = pool.snapshot().tiers.iter().map(|t| t.priority).collect();
        assert_eq!(priorities, (100..132).collect::<Vec<u16>>());
    }

    #[test]
    fn backends_beyond_the_cap_are_cut_the_same_way_whatever_the_order() {
        let make = |i: usize, priority: u16| {
            let ip = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            ep(&format!("b{i:05}.test."), 80, ip, priority, 1)
        };
        // The preferred tier fills most of the cap; of the second, only the keys that sort
        // first fit.
        let mut eps: Vec<Endpoint> = (0..MAX_BACKENDS - 10).map(|i| make(i, 10)).collect();
        eps.extend((0..100).map(|i| make(20_000 + i, 20)));
        let (kept, cut) = cap(&eps);
        assert_eq!((kept.len(), cut), (MAX_BACKENDS, 90));
        assert_eq!(
            kept.iter().filter(|e| e.priority == 10).count(),
            MAX_BACKENDS - 10
        );
        let mut second: Vec<&str> = kept
            .iter()
            .filter(|e| e.priority == 20)
            .map(|e| e.target.as_str())
            .collect();
        second.sort_unstable();
        let want: Vec<String> = (0..10)
            .map(|i| format!("b{:05}.test.", 20_000 + i))
            .collect();
        assert_eq!(second, want);
        // Another order of the same answer: the same cut.
        let mut reversed = eps.clone();
        reversed.reverse();
        let (again, _) = cap(&reversed);
        let keys = |list: &[&Endpoint]| {
            let mut k: Vec<(String, SocketAddr)> =
                list.iter().map(|e| (e.target.clone(), e.addr)).collect();
            k.sort();
            k
        };
        assert_eq!(keys(&kept), keys(&again));
    }

    /// /metrics and /status take `members`; a table build must not make them wait. With
    /// 32 full-size tables the update takes a while; `states` calls made meanwhile must
    /// each return in a fraction of it.
    #[test]
    fn states_do_not_wait_for_table_builds() {
        let pool = Arc::new(Pool::new("svc", crate::balance::MaglevTable::DEFAULT_SIZE));
        // Alternating weights: every update rebuilds every table.
        let answers: Vec<Vec<Endpoint>> = (1..=2u16)
            .map(|weight| {
                (0..MAX_TIERS as u16)
                    .map(|i| ep(&format!("b{i}.test."), 80, [127, 0, 1, i as u8], i, weight))
                    .collect()
            })
            .collect();
        const UPDATES: u32 = 4;
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (pool, done) = (Arc::clone(&pool), Arc::clone(&done));
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                for n in 0..UPDATES {
                    pool.update(&answers[n as usize % 2]).expect("update");
                }
                done.store(true, Ordering::SeqCst);
                started.elapsed() / UPDATES
            })
        };
        let (mut slowest, mut calls) = (std::time::Duration::ZERO, 0u32);
        while !done.load(Ordering::SeqCst) {
            let started = std::time::Instant::now();
            let _ = pool.states();
            slowest = slowest.max(started.elapsed());
            calls += 1;
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let update = writer.join().expect("writer");
        assert_eq!(pool.snapshot().tiers.len(), MAX_TIERS);
        assert!(calls > 1, "no states() call overlapped the updates");
        // Under the lock for the whole build, a call would wait up to a full update.
        assert!(
            slowest * 3 < update,
            "a states() call took {slowest:?}; one update takes {update:?} ({calls} calls)"
        );
    }

    /// A backend removed while `states` runs must appear once (draining), never also as
    /// active from the snapshot before the removal: that would be two Prometheus series.
    #[test]
    fn states_never_list_a_backend_twice_while_it_is_removed() {
        // Many backends make `states` spend a while between reading the snapshot and the
        // draining list, which is where the two used to come from different generations.
        let pool = Arc::new(Pool::new("svc", 1009));
        let with: Vec<Endpoint> = (0..1500u16)
            .map(|i| {
                let ip = [127, 1, (i >> 8) as u8, i as u8];
                ep(&format!("b{i}.test."), 80, ip, 10, 1)
            })
            .collect();
        let without = with[1..].to_vec();
        pool.update(&with).expect("update");
        // Open connections keep the removed backend draining instead of vanishing.
        let snap = pool.snapshot();
        let flapping = snap
            .iter()
            .map(|(_, b)| b)
            .find(|b| b.key.target.as_ref() == "b0.test.")
            .expect("b0");
        flapping.stats.active.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (pool, stop) = (Arc::clone(&pool), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let next = if n % 2 == 0 { &without } else { &with };
                    pool.update(next).expect("update");
                    n += 1;
                }
                n
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
        let mut duplicate = None;
        while std::time::Instant::now() < deadline && duplicate.is_none() {
            let states = pool.states();
            let mut seen = std::collections::HashSet::new();
            duplicate = states
                .iter()
                .find(|st| !seen.insert(st.backend.key.clone()))
                .map(|st| format!("{} ({})", st.backend.key, st.state.label()));
        }
        stop.store(true, Ordering::Relaxed);
        let updates = writer.join().expect("writer");
        assert_eq!(duplicate, None, "listed twice");
        assert!(updates > 2, "only {updates} updates ran");
    }

    #[test]
    fn a_records_weight_is_split_across_its_addresses() {
        let pool = Pool::new("svc", 1009);
        // "three" has three A records, "one" a single one, both weight 10; "dual" is a
        // dual-stack target; "zero" has weight 0.
        let mut eps = vec![
            ep("three.test.", 80, [127, 0, 0, 1], 10, 10),
            ep("three.test.", 80, [127, 0, 0, 2], 10, 10),
            ep("three.test.", 80, [127, 0, 0, 3], 10, 10),
            ep("one.test.", 80, [127, 0, 0, 4], 10, 10),
            ep("zero.test.", 80, [127, 0, 0, 6], 10, 0),
        ];
        eps.push(Endpoint {
            target: "dual.test.".to_owned(),
            port: 80,
            addr: "[::1]:80".parse().expect("addr"),
            priority: 10,
            weight: 10,
        });
        eps.push(ep("dual.test.", 80, [127, 0, 0, 5], 10, 10));
        pool.update(&eps).expect("update");
        let snap = pool.snapshot();
        let tier = &snap.tiers[0];
        let share = |target: &str| -> u32 {
            tier.backends
                .iter()
                .zip(&tier.weights)
                .filter(|(b, _)| &*b.key.target == target)
                .map(|(_, w)| *w)
                .sum()
        };
        assert_eq!(share("three.test."), share("one.test."));
        assert_eq!(share("dual.test."), share("one.test."));
        assert_eq!(share("zero.test."), 0);
        // Maglev slots follow: each weight-10 target owns about a third of the table.
        let mut slots: HashMap<String, usize> = HashMap::new();
        for key in 0..30_000u64 {
            if let Some(i) = tier.maglev.lookup(key.wrapping_mul(0x9E37_79B9_7F4A_7C15)) {
                *slots
                    .entry(tier.backends[i].key.target.to_string())
                    .or_insert(0) += 1;
            }
        }
        for target in ["three.test.", "one.test.", "dual.test."] {
            let n = slots.get(target).copied().unwrap_or(0);
            assert!(
                (8_500..11_500).contains(&n),
                "{target}: {n} of 30000 ({slots:?})"
            );
        }
        // /status shows the record's weight, not the split one.
        assert!(pool.states().iter().all(|st| st.weight
            == if &*st.backend.key.target == "zero.test." {
                0
            } else {
                10
            }));
    }

    #[test]
    fn an_ejected_address_of_a_served_target_is_not_reported_as_a_fault() {
        let pool = Pool::new("svc", 1009);
        let v6 = Endpoint {
            target: "dual.test.".to_owned(),
            port: 80,
            addr: "[::1]:80".parse().expect("addr"),
            priority: 10,
            weight: 10,
        };
        let lone = ep("lone.test.", 80, [127, 0, 0, 9], 10, 10);
        pool.update(&[v6, ep("dual.test.", 80, [127, 0, 0, 5], 10, 10), lone])
            .expect("update");
        let snap = pool.snapshot();
        let now = now_ms();
        let policy = crate::config::HealthConfig {
            consecutive_failures: 1,
            base_ejection: std::time::Duration::from_secs(60),
            max_ejection: std::time::Duration::from_secs(60),
            max_ejected_percent: 100,
        };
        for b in &snap.tiers[0].backends {
            if b.addr().is_ipv6() || &*b.key.target == "lone.test." {
                b.health.count_and_try_eject(now, &policy, || true);
            }
        }
        let label = |target: &str, v6: bool| {
            pool.states()
                .into_iter()
                .find(|st| &*st.backend.key.target == target && st.backend.addr().is_ipv6() == v6)
                .map(|st| st.state.label())
                .expect("listed")
        };
        assert_eq!(label("dual.test.", true), "address_unused");
        assert_eq!(label("dual.test.", false), "active");
        assert_eq!(
            label("lone.test.", false),
            "ejected",
            "a target with no usable address is a fault"
        );
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
                .count_and_try_eject(now, &policy, || tier.may_eject_one(now, 50));
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
            .count_and_try_eject(now, &policy, || tier.may_eject_one(now, 50));
        assert!(!tier.may_eject_one(now, 50));
    }
}
