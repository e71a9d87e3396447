use super::*;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;

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
    let pool = Pool::new("svc", Selection::maglev(1009));
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
    let pool = Pool::new("svc", Selection::maglev(1009));
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
    let pool = Pool::new("svc", Selection::maglev(1009));
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
    let pool = Arc::new(Pool::new(
        "svc",
        Selection::maglev(crate::balance::MaglevTable::DEFAULT_SIZE),
    ));
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
    let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
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
    let pool = Pool::new("svc", Selection::maglev(1009));
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
    let names: Vec<&str> = tier.backends.iter().map(|b| b.name.as_str()).collect();
    let maglev = crate::balance::MaglevTable::build(&names, &tier.weights, 1009).expect("table");
    let mut slots: HashMap<String, usize> = HashMap::new();
    for key in 0..30_000u64 {
        if let Some(i) = maglev.lookup(key.wrapping_mul(0x9E37_79B9_7F4A_7C15)) {
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
    let pool = Pool::new("svc", Selection::maglev(1009));
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
    let pool = Pool::new("svc", Selection::maglev(1009));
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
    let pool = Pool::new("svc", Selection::maglev(1009));
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

fn selector_kind(pool: &Pool) -> Vec<String> {
    pool.snapshot()
        .tiers
        .iter()
        .map(|t| {
            let debug = format!("{:?}", t.selector);
            debug
                .split([' ', '{'])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[test]
fn a_tier_holds_only_the_selector_of_the_services_algorithm() {
    let eps = [
        ep("a.test.", 80, [127, 0, 0, 1], 10, 1),
        ep("b.test.", 80, [127, 0, 0, 2], 20, 1),
    ];
    let p2c = Pool::new("svc", Selection::new(crate::config::Balance::P2c));
    p2c.update(&eps).expect("update");
    assert_eq!(selector_kind(&p2c), ["P2cSelector", "P2cSelector"]);
    let maglev = Pool::new("svc", Selection::maglev(1009));
    maglev.update(&eps).expect("update");
    assert_eq!(selector_kind(&maglev), ["MaglevSelector", "MaglevSelector"]);
}

#[test]
fn a_new_algorithm_rebuilds_the_selectors_and_keeps_the_backends() {
    let pool = Pool::new("svc", Selection::maglev(1009));
    let eps = [ep("a.test.", 80, [127, 0, 0, 1], 10, 1)];
    assert!(
        !pool.set_selection(Selection::new(crate::config::Balance::P2c)),
        "nothing published yet: nothing to rebuild"
    );
    pool.update(&eps).expect("update");
    assert_eq!(selector_kind(&pool), ["P2cSelector"]);
    let before = pool.snapshot();
    assert!(pool.set_selection(Selection::maglev(1009)));
    // Until the rebuild, the published snapshot stays as it was.
    assert_eq!(pool.snapshot().generation, before.generation);
    let change = pool.reselect().expect("reselect");
    assert!(change.is_noop(), "{change:?}");
    let after = pool.snapshot();
    assert_eq!(selector_kind(&pool), ["MaglevSelector"]);
    assert_eq!(after.generation, before.generation + 1);
    assert!(Arc::ptr_eq(
        &after.tiers[0].backends[0],
        &before.tiers[0].backends[0]
    ));
    // Done once: a second rebuild, or the same answer again, publishes nothing.
    pool.reselect().expect("reselect");
    pool.update(&eps).expect("update");
    assert_eq!(pool.snapshot().generation, after.generation);
}

#[test]
fn an_update_after_a_new_algorithm_builds_for_it() {
    let pool = Pool::new("svc", Selection::maglev(1009));
    let eps = [ep("a.test.", 80, [127, 0, 0, 1], 10, 1)];
    pool.update(&eps).expect("update");
    assert!(pool.set_selection(Selection::new(crate::config::Balance::P2c)));
    // The same answer: no backend changed, but the snapshot is rebuilt for P2C.
    pool.update(&eps).expect("update");
    assert_eq!(selector_kind(&pool), ["P2cSelector"]);
    pool.reselect().expect("nothing left to do");
    assert_eq!(selector_kind(&pool), ["P2cSelector"]);
}
