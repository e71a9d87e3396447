//! Property tests (proptest) of pool building on arbitrary SRV answer sets: tiers, weights,
//! caps, and backend identity and counters across refreshes. Beside the pool rather than in
//! tests/it because they play connections on the backends' counters, which the crate keeps
//! to itself. Case counts are small so the suite stays fast on 2 cores; PROPTEST_CASES
//! overrides.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use super::{Backend, BackendState, Endpoint, MAX_TIERS, Pool};
use crate::balance::Selection;

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Failures print their minimal input; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A small prime table size: the properties are about membership, not table quality.
const TABLE: usize = 251;

/// An SRV answer, resolved: a few targets, ports and addresses so that keys repeat and
/// collide, priorities from a small set so tiers form, weights including 0 and the maximum.
fn answer() -> impl Strategy<Value = Vec<Endpoint>> {
    let endpoint = (
        0u8..6,
        1u16..4,
        1u8..4,
        0u16..4,
        prop_oneof![0u16..6, Just(u16::MAX)],
    )
        .prop_map(|(target, port, addr, priority, weight)| Endpoint {
            target: format!("t{target}.example."),
            port,
            addr: SocketAddr::from(([127, 0, 0, addr], port)),
            priority,
            weight,
        });
    prop::collection::vec(endpoint, 0..24)
}

type Key = (String, u16, SocketAddr);

fn key(ep: &Endpoint) -> Key {
    (ep.target.clone(), ep.port, ep.addr)
}

/// Priority and weight per key: the first endpoint of a key in the answer wins.
fn first_wins(answer: &[Endpoint]) -> HashMap<Key, (u16, u16)> {
    let mut out = HashMap::new();
    for ep in answer {
        out.entry(key(ep)).or_insert((ep.priority, ep.weight));
    }
    out
}

/// The backends of the current snapshot by key.
fn members(pool: &Pool) -> HashMap<Key, Arc<Backend>> {
    pool.snapshot()
        .iter()
        .map(|(_, b)| {
            (
                (b.key.target.to_string(), b.key.port, b.key.addr),
                Arc::clone(b),
            )
        })
        .collect()
}

/// The snapshot matches the answer: one backend per key, tiers in ascending priority, each
/// sorted by key, with the answer's priority and weight.
fn check_snapshot(pool: &Pool, answer: &[Endpoint]) -> Result<(), TestCaseError> {
    let want = first_wins(answer);
    let snapshot = pool.snapshot();
    prop_assert_eq!(snapshot.backend_count(), want.len());
    prop_assert_eq!(snapshot.is_empty(), want.is_empty());
    let priorities: Vec<u16> = snapshot.tiers.iter().map(|t| t.priority).collect();
    prop_assert!(
        priorities.windows(2).all(|w| w[0] < w[1]),
        "tiers {:?}",
        priorities
    );
    for tier in &snapshot.tiers {
        prop_assert!(!tier.backends.is_empty());
        prop_assert_eq!(tier.backends.len(), tier.weights.len());
        prop_assert_eq!(tier.backends.len(), tier.srv_weights.len());
        prop_assert!(
            tier.backends.windows(2).all(|w| w[0].key < w[1].key),
            "tier not sorted"
        );
        // The record's weight as published, and the selection weight it was split into:
        // zero stays zero, and a target's addresses share their record's weight equally.
        for ((b, srv_weight), weight) in tier
            .backends
            .iter()
            .zip(&tier.srv_weights)
            .zip(&tier.weights)
        {
            let k = (b.key.target.to_string(), b.key.port, b.key.addr);
            prop_assert_eq!(want.get(&k), Some(&(tier.priority, *srv_weight)));
            prop_assert_eq!(*srv_weight == 0, *weight == 0);
            // (Generated answers may give one target's addresses different weights, which
            // real SRV records cannot; compare only addresses published with the same one.)
            let siblings: Vec<u32> = tier
                .backends
                .iter()
                .zip(&tier.srv_weights)
                .zip(&tier.weights)
                .filter(|((o, ow), _)| {
                    o.key.target == b.key.target && o.key.port == b.key.port && ow == &srv_weight
                })
                .map(|(_, w)| *w)
                .collect();
            prop_assert!(
                siblings.iter().all(|w| w == weight),
                "uneven split {:?}",
                siblings
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(48))]

    #[test]
    fn pools_follow_answers_and_keep_backend_identity(
        first in answer(),
        second in answer(),
        shuffle_seed in any::<u64>(),
    ) {
        let pool = Pool::new("prop", Selection::maglev(TABLE));
        let change = pool.update(&first).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(change.total, first_wins(&first).len());
        prop_assert_eq!(change.capped, 0);
        check_snapshot(&pool, &first)?;
        let before = members(&pool);
        for b in before.values() {
            b.stats.connections.fetch_add(7, Ordering::Relaxed);
        }

        // The same answer in another order changes nothing: same snapshot, same backends.
        let mut reordered = first.clone();
        let mut x = shuffle_seed | 1;
        for i in (1..reordered.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            reordered.swap(i, (x % (i as u64 + 1)) as usize);
        }
        // Reordering may change which duplicate comes first; only then may weights change.
        if first_wins(&reordered) == first_wins(&first) {
            let snapshot = pool.snapshot();
            let change = pool.update(&reordered).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(change.is_noop(), "{:?}", change);
            prop_assert!(Arc::ptr_eq(&snapshot, &pool.snapshot()), "republished");
        }

        // One backend keeps a connection open across the change to `second`.
        let held = before.values().next().cloned();
        if let Some(b) = &held {
            b.stats.active.fetch_add(1, Ordering::Relaxed);
        }
        let change = pool.update(&second).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_snapshot(&pool, &second)?;
        let after = members(&pool);
        let kept = after.keys().filter(|k| before.contains_key(*k)).count();
        prop_assert_eq!(change.removed, before.len() - kept);
        prop_assert_eq!(change.added, after.len() - kept);
        for (k, b) in &after {
            match before.get(k) {
                Some(old) => {
                    prop_assert!(Arc::ptr_eq(old, b), "{:?} lost its identity", k);
                    prop_assert_eq!(b.stats.connections.load(Ordering::Relaxed), 7);
                }
                None => prop_assert_eq!(b.stats.connections.load(Ordering::Relaxed), 0),
            }
        }
        let states = pool.states();
        if let Some(held) = &held {
            let k = (held.key.target.to_string(), held.key.port, held.key.addr);
            let shown: Vec<&BackendState> = states
                .iter()
                .filter(|st| Arc::ptr_eq(&st.backend, held))
                .map(|st| &st.state)
                .collect();
            prop_assert_eq!(shown.len(), 1, "listed once");
            if after.contains_key(&k) {
                let draining = matches!(shown[0], BackendState::Draining { .. });
                prop_assert!(!draining, "a kept backend is not draining");
            } else {
                prop_assert_eq!(shown[0], &BackendState::Draining { connections: 1 });
                // Back in the answer before its connection ends: the same backend again.
                pool.update(&first).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(Arc::ptr_eq(&members(&pool)[&k], held), "not revived");
            }
            held.stats.active.fetch_sub(1, Ordering::Relaxed);
        }
        // Removed backends without connections are not listed at all.
        let listed = pool.states().len();
        prop_assert_eq!(listed, pool.snapshot().backend_count());
    }

    #[test]
    fn answers_with_too_many_priorities_keep_the_preferred_tiers(
        priorities in prop::collection::btree_set(any::<u16>(), 1..48),
    ) {
        let answer: Vec<Endpoint> = priorities
            .iter()
            .enumerate()
            .map(|(i, &priority)| Endpoint {
                target: format!("t{i}.example."),
                port: 80,
                addr: SocketAddr::from(([127, 0, 0, 1], 80)),
                priority,
                weight: 1,
            })
            .collect();
        let pool = Pool::new("prop", Selection::maglev(TABLE));
        let change = pool.update(&answer).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let kept: Vec<u16> = pool.snapshot().tiers.iter().map(|t| t.priority).collect();
        let want: Vec<u16> = priorities.iter().copied().take(MAX_TIERS).collect();
        prop_assert_eq!(&kept, &want);
        prop_assert_eq!(change.capped, priorities.len() - want.len());
        prop_assert_eq!(change.total, want.len());
    }
}
