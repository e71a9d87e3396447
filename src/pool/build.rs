//! Building a snapshot from an answer, off the `members` lock: the caps on an answer's size,
//! the plan of what an update changes (kept, added, revived, removed backends), the
//! per-address weights, and the tiers with the selectors built for them.

use std::collections::HashMap;
use std::sync::Arc;

use super::{
    Backend, BackendKey, Endpoint, Member, Members, PoolChange, PoolError, Snapshot, Tier,
};
use crate::balance::Selection;

/// Most backends a service takes from one answer; beyond that the preferred ones are kept.
/// Bounds the memory and time a huge (or hostile) answer costs.
pub(crate) const MAX_BACKENDS: usize = 10_000;
/// Most tiers (distinct priorities) a service keeps: each costs a selector (for Maglev, a
/// table of `maglev_size` slots), so thousands of distinct priorities would cost hundreds of MiB.
pub(crate) const MAX_TIERS: usize = 32;

/// `cap` for owned endpoints: discovery trims an answer with it before comparing it with
/// the current set, so a huge answer costs no more than a capped one. Returns how many
/// endpoints were cut.
pub(crate) fn trim_to_caps(endpoints: Vec<Endpoint>) -> (Vec<Endpoint>, usize) {
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
pub(super) fn cap(endpoints: &[Endpoint]) -> (Vec<&Endpoint>, usize) {
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
pub(super) struct Plan {
    pub(super) next: HashMap<BackendKey, Member>,
    /// Draining backends that are back in the answer.
    pub(super) revived: Vec<Arc<Backend>>,
    pub(super) change: PoolChange,
    /// The generation the plan was made against.
    pub(super) generation: u64,
    /// The algorithm the snapshot is built for.
    pub(super) selection: Selection,
    /// Publish even when no backend changed: nothing is published yet, or the published
    /// snapshot was built for another algorithm.
    pub(super) force: bool,
}

impl Plan {
    /// False when the published snapshot already is what this plan would build.
    pub(super) fn must_publish(&self) -> bool {
        !self.change.is_noop() || self.force
    }
}

/// The plan that keeps every backend and only rebuilds the selectors, when the algorithm
/// changed since the published snapshot.
pub(super) fn plan_reselect(members: &Members) -> Plan {
    Plan {
        next: members.current.clone(),
        revived: Vec::new(),
        change: PoolChange {
            total: members.current.len(),
            ..PoolChange::default()
        },
        generation: members.generation,
        selection: members.selection,
        // Nothing published yet: the first update builds for the new algorithm anyway.
        force: members.published.is_some_and(|p| p != members.selection),
    }
}

pub(super) fn plan(members: &Members, endpoints: &[&Endpoint]) -> Plan {
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
        selection: members.selection,
        force: members.generation == 0 || members.published != Some(members.selection),
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

pub(super) fn build_snapshot(
    members: &HashMap<BackendKey, Member>,
    generation: u64,
    selection: Selection,
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
        let selector = selection.build(&names, &weights)?;
        tiers.push(Tier {
            priority,
            backends,
            #[cfg(test)]
            weights,
            srv_weights,
            selector,
        });
    }
    #[cfg(not(test))]
    let _ = generation;
    Ok(Snapshot {
        tiers,
        #[cfg(test)]
        generation,
    })
}
