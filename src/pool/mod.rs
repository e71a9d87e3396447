//! The backend pool of one service: backends with a stable identity and their live atomics
//! (`backend.rs`), and the immutable `Snapshot` (tiers, weights, one selector per tier for
//! the service's algorithm) published through `ArcSwap`, built by `build.rs`. Discovery
//! feeds it whole answers; the accept path only loads the current snapshot. Nothing here
//! does I/O or picks a backend for a client (`balance::select` does, through `TierView`).

mod backend;
mod build;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::balance::select::TierView;
use crate::balance::{Selection, SelectorError, TierSelector};
use crate::health::now_ms;

pub use backend::{Backend, BackendKey, BackendState, Endpoint};
pub(crate) use build::{MAX_BACKENDS, MAX_TIERS, trim_to_caps};
use build::{Plan, build_snapshot, cap, plan, plan_reselect};

/// Backends of one SRV priority, with the selector built for them.
#[derive(Debug)]
pub struct Tier {
    pub(crate) priority: u16,
    /// Sorted by key, so the same answer always gives the same order.
    pub(crate) backends: Vec<Arc<Backend>>,
    /// Selection weights: each SRV record's weight split evenly across the addresses its
    /// target resolved to (see `address_weights`). Parallel to `backends`. Kept for the
    /// tests only: the selector holds what it needs of them.
    #[cfg(test)]
    pub(crate) weights: Vec<u32>,
    /// The SRV weight of each backend's record, as published. Parallel to `backends`.
    pub(crate) srv_weights: Vec<u16>,
    /// Built for the service's algorithm (a P2C service has no Maglev table).
    pub(crate) selector: Box<dyn TierSelector>,
}

impl TierView for Tier {
    type Backend = Backend;

    fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    fn selector(&self) -> &dyn TierSelector {
        &*self.selector
    }
}

impl Tier {
    /// True when at least one backend of the tier is not ejected.
    pub(crate) fn has_available(&self, now: u64) -> bool {
        self.backends.iter().any(|b| b.health.is_available(now))
    }

    /// True when one more backend may be ejected without exceeding `max_percent` of the
    /// tier. The cap is a hard limit (rounded down): a tier of 2 at 10 % ejects nothing,
    /// a tier of 1 never ejects (there is nowhere else to send its clients anyway).
    /// Callers hold `Pool::ejection_gate` across this check and the ejection itself.
    pub(crate) fn may_eject_one(&self, now: u64, max_percent: u8) -> bool {
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
    /// The pool's publish count when this was built (the tests check what republishes).
    #[cfg(test)]
    pub(crate) generation: u64,
}

impl Snapshot {
    /// Backends in all tiers.
    pub fn backend_count(&self) -> usize {
        self.tiers.iter().map(|t| t.backends.len()).sum()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.tiers.is_empty()
    }

    /// Index of the tier a new connection would use first.
    /// (Mirrors the selector: a tier of only cap-held backends yields to a healthy one.)
    pub(crate) fn active_tier(&self, now: u64) -> Option<usize> {
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
    pub(crate) fn tier_of(&self, backend: &Arc<Backend>) -> Option<&Tier> {
        self.tiers
            .iter()
            .find(|t| t.backends.iter().any(|b| Arc::ptr_eq(b, backend)))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Tier, &Arc<Backend>)> {
        self.tiers
            .iter()
            .flat_map(|t| t.backends.iter().map(move |b| (t, b)))
    }
}

/// What one `Pool::update` changed, for logging as one line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PoolChange {
    pub(crate) added: usize,
    pub(crate) removed: usize,
    pub(crate) reweighted: usize,
    pub(crate) total: usize,
    /// Endpoints left out because the answer exceeded `MAX_TIERS` or `MAX_BACKENDS`.
    pub(crate) capped: usize,
}

impl PoolChange {
    pub(crate) fn is_noop(&self) -> bool {
        self.added == 0 && self.removed == 0 && self.reweighted == 0
    }
}

/// Error raised when a snapshot cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Selector(#[from] SelectorError),
    #[error("building the snapshot: {0}")]
    Build(String),
}

/// The backends of one service.
#[derive(Debug)]
pub struct Pool {
    service: String,
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
    /// The backend.
    pub backend: Arc<Backend>,
    /// Its SRV record's priority (its tier).
    pub priority: u16,
    /// Its SRV record's weight.
    pub weight: u16,
    /// What it is doing now, and why.
    pub state: BackendState,
}

#[derive(Debug)]
struct Members {
    current: HashMap<BackendKey, Member>,
    /// Removed backends with the priority and weight they last had, until their
    /// connections end.
    draining: Vec<Member>,
    generation: u64,
    /// The algorithm new snapshots are built for; a reload may change it.
    selection: Selection,
    /// The algorithm the published snapshot was built for.
    published: Option<Selection>,
}

impl Pool {
    /// An empty pool whose tiers will select with `selection`.
    pub fn new(service: &str, selection: Selection) -> Pool {
        Pool {
            service: service.to_owned(),
            current: ArcSwap::from_pointee(Snapshot::default()),
            members: Mutex::new(Members {
                current: HashMap::new(),
                draining: Vec::new(),
                generation: 0,
                selection,
                published: None,
            }),
            ejection_gate: Mutex::new(()),
        }
    }

    /// Held while a failure is recorded; see `ejection_gate`.
    pub(crate) fn ejection_gate(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.ejection_gate.lock()
    }

    pub(crate) fn service(&self) -> &str {
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
        let mut change = self.publish(|members| plan(members, &endpoints))?;
        change.capped = capped;
        Ok(change)
    }

    /// Makes `selection` the algorithm of the snapshots built from now on. True when the
    /// published snapshot was built for another one: [`Pool::reselect`] then rebuilds it
    /// (off the runtime: tables take milliseconds), unless an update does so first.
    pub(crate) fn set_selection(&self, selection: Selection) -> bool {
        let mut members = self.members.lock();
        members.selection = selection;
        members.published.is_some_and(|p| p != selection)
    }

    /// Rebuilds the snapshot's selectors for the algorithm set last, keeping every
    /// backend; a no-op when the published snapshot already has it.
    pub(crate) fn reselect(&self) -> Result<PoolChange, PoolError> {
        self.publish(plan_reselect)
    }

    /// Plans under `members`, builds the snapshot without it, and publishes under it, as
    /// long as nothing was published meanwhile and the algorithm stayed; otherwise plans
    /// again from what is there now.
    fn publish(&self, make_plan: impl Fn(&Members) -> Plan) -> Result<PoolChange, PoolError> {
        loop {
            let plan = make_plan(&self.members.lock());
            if !plan.must_publish() {
                return Ok(plan.change);
            }
            let snapshot = build_snapshot(&plan.next, plan.generation + 1, plan.selection)?;
            let mut members = self.members.lock();
            if members.generation != plan.generation || members.selection != plan.selection {
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
            members.published = Some(plan.selection);
            // Stored under the lock, so `states` sees the snapshot and the draining list
            // of the same generation.
            self.current.store(Arc::new(snapshot));
            return Ok(plan.change);
        }
    }

    /// `update` on a blocking thread: building the tables of a large answer takes
    /// milliseconds to tens of milliseconds, which must not stall a runtime worker.
    pub(crate) async fn update_off_runtime(
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
    pub(crate) fn mark_removal_pending(&self, keys: &std::collections::HashSet<BackendKey>) {
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

/// True when another address of `backend`'s SRV target and port in `tier` takes traffic.
pub(crate) fn sibling_usable(tier: &Tier, backend: &Arc<Backend>, now: u64) -> bool {
    tier.backends.iter().any(|other| {
        !Arc::ptr_eq(other, backend)
            && other.key.target == backend.key.target
            && other.key.port == backend.key.port
            && other.health.is_available(now)
    })
}

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;
