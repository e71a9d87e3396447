//! Turns a snapshot's tiers into an ordered stream of candidate backends for one client
//! connection: preferred tier first, the tier's own [`TierSelector`] within it, never the
//! same backend twice, and, when every backend is ejected, the least recently failed one
//! rather than nothing. The proxy only asks "next?"; how retries pick is decided here.
//!
//! It reads no health state itself: the pool describes each backend through [`Candidate`]
//! (available, held, failures on record), and each tier through [`TierView`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::RngCore;

use super::seen::Tried;
use super::{TierSelector, hash_key};
use crate::config::HashKey;

/// A tier as the selector walks it: its backends and the selector built for them.
pub trait TierView {
    /// The backend type the tier holds.
    type Backend: Candidate;
    /// The members the tier's selector indexes, in its build order.
    fn backends(&self) -> &[Arc<Self::Backend>];
    /// The selector built for this tier's backends (Maglev table, P2C weights).
    fn selector(&self) -> &dyn TierSelector;
}

/// What selection may know of a backend at `now`. Health and discovery keep this state;
/// the pool answers for them, so the rules below never read it directly.
pub trait Candidate {
    /// Not inside an ejection window (`Health::is_available`).
    fn is_available(&self, now: u64) -> bool;
    /// Failed past the threshold but kept in service by the ejection cap.
    fn is_held(&self, now: u64) -> bool;
    /// Failures on record since the last success (below the threshold or not).
    fn has_failures(&self) -> bool;
    /// Left out of the latest answer, its removal awaiting confirmation.
    fn is_removal_pending(&self) -> bool;
    /// When it last failed (0: never), on the clock `now` comes from.
    fn last_failure(&self) -> u64;
    /// Open connections.
    fn load(&self) -> u64;
}

/// The selection key of a client: its address (and port with `client_ip_port`) hashed the
/// same way in every srvlb instance.
pub(crate) fn client_key(client: SocketAddr, hash: HashKey) -> u64 {
    let ip = crate::proxy::canonical_ip(client.ip());
    let mut bytes = [0u8; 18];
    let len = match ip {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            bytes[..16].copy_from_slice(&v6.octets());
            16
        }
    };
    match hash {
        HashKey::ClientIp => hash_key(&bytes[..len]),
        HashKey::ClientIpPort => {
            bytes[len..len + 2].copy_from_slice(&client.port().to_be_bytes());
            hash_key(&bytes[..len + 2])
        }
    }
}

/// Candidate backends for one connection, in the order they should be tried.
pub struct Selector<'a, T: TierView> {
    /// Ascending priority: index 0 is the preferred tier.
    tiers: &'a [T],
    key: u64,
    now: u64,
    /// Addresses of the backends already handed out (pointer identity, kept as integers so
    /// the selector stays `Send` across the proxy's awaits).
    tried: Tried,
    /// How many backends the caller will try at most (u32::MAX: no limit known).
    max_attempts: u32,
}

impl<'a, T: TierView> Selector<'a, T> {
    /// A walk over `tiers` (preferred first) for the client whose hashed key is `key`, judging
    /// health at `now` (`health::now_ms`).
    pub fn new(tiers: &'a [T], key: u64, now: u64) -> Selector<'a, T> {
        Selector {
            tiers,
            key,
            now,
            tried: Tried::default(),
            max_attempts: u32::MAX,
        }
    }

    /// Tells the selector how many attempts the caller makes, so that the last one can go
    /// where a failed tier cannot take it.
    pub(crate) fn with_attempts(mut self, max_attempts: u32) -> Selector<'a, T> {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// The next backend to try, or `None` when every backend has been tried.
    ///
    /// The tier is the first one with a healthy backend (not ejected, not held by the
    /// ejection cap, not tried); within it the tier's selector picks. A retry prefers,
    /// within that tier, a backend with no failure on record, so it does not walk from one
    /// dead backend to the next while a tier dies and its failure counts are still below
    /// the threshold. A last attempt after two failures leaves a tier that looks dying
    /// (half its backends failing) for an untried tier with a healthy backend, so the
    /// client is served by a backup tier rather than reset.
    pub fn next_backend(&mut self, rng: &mut dyn RngCore) -> Option<Arc<T::Backend>> {
        let healthy = |b: &T::Backend| self.usable(b) && !b.is_held(self.now);
        // A backend whose removal from DNS awaits confirmation is no cleaner a retry than
        // one with failures: during a rollout it is the old pod that just stopped listening.
        let clean = |b: &T::Backend| healthy(b) && !b.has_failures() && !b.is_removal_pending();
        let usable = |b: &T::Backend| self.usable(b);
        let picked = self
            .escape(rng, healthy)
            .or_else(|| {
                let tier = self
                    .tiers
                    .iter()
                    .find(|tier| tier.backends().iter().any(|b| healthy(b)))?;
                let retrying = !self.tried.is_empty();
                retrying
                    .then(|| self.pick_in_tier(tier, rng, clean))
                    .flatten()
                    .or_else(|| self.pick_in_tier(tier, rng, usable))
            })
            // No tier has a healthy backend: held backends (kept in by the cap) still serve.
            .or_else(|| {
                self.tiers
                    .iter()
                    .find_map(|tier| self.pick_in_tier(tier, rng, usable))
            })
            .or_else(|| self.least_recently_failed())?;
        self.tried.push(Arc::as_ptr(&picked) as *const () as usize);
        Some(picked)
    }

    /// The last attempt after two failures, when a tried tier looks dying: a healthy
    /// backend of a tier this client has not tried yet.
    fn escape(
        &self,
        rng: &mut dyn RngCore,
        healthy: impl Fn(&T::Backend) -> bool,
    ) -> Option<Arc<T::Backend>> {
        let tried = self.tried.len();
        let last_after_two = tried >= 2 && tried as u64 + 1 >= u64::from(self.max_attempts);
        if !last_after_two || !self.tried_tiers_look_dying() {
            return None;
        }
        self.tiers
            .iter()
            .filter(|tier| !tier.backends().iter().any(|b| self.was_tried(b)))
            .find_map(|tier| self.pick_in_tier(tier, rng, &healthy))
    }

    /// True when, in some tier this client already tried, at least half of the backends are
    /// ejected, held or have failures on record.
    fn tried_tiers_look_dying(&self) -> bool {
        self.tiers
            .iter()
            .filter(|tier| tier.backends().iter().any(|b| self.was_tried(b)))
            .any(|tier| {
                let failing = tier
                    .backends()
                    .iter()
                    .filter(|b| {
                        !b.is_available(self.now) || b.is_held(self.now) || b.has_failures()
                    })
                    .count();
                failing * 2 >= tier.backends().len()
            })
    }

    fn usable(&self, backend: &T::Backend) -> bool {
        backend.is_available(self.now) && !self.was_tried(backend)
    }

    fn was_tried(&self, backend: &T::Backend) -> bool {
        let id = backend as *const T::Backend as *const () as usize;
        self.tried.contains(id)
    }

    /// The tier selector's pick among the tier's backends that pass `ok`. (`ok` is generic,
    /// so the selector's one virtual call per candidate reaches an inlined predicate.)
    fn pick_in_tier(
        &self,
        tier: &T,
        rng: &mut dyn RngCore,
        ok: impl Fn(&T::Backend) -> bool,
    ) -> Option<Arc<T::Backend>> {
        let backends = tier.backends();
        tier.selector()
            .pick(self.key, rng, &|i| ok(&backends[i]), &|i| {
                backends[i].load()
            })
            .map(|i| Arc::clone(&backends[i]))
    }

    /// Every backend is ejected or tried: better a slow answer than none, so take the one
    /// that failed longest ago among those not tried yet.
    fn least_recently_failed(&self) -> Option<Arc<T::Backend>> {
        self.tiers
            .iter()
            .flat_map(|tier| tier.backends())
            .filter(|b| !self.was_tried(b))
            .min_by_key(|b| b.last_failure())
            .map(Arc::clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Selection;
    use crate::config::{Balance, HealthConfig};
    use crate::pool::{Backend, Endpoint, Pool, Snapshot};
    use std::time::Duration;

    const BOTH: [Balance; 2] = [Balance::Maglev, Balance::P2c];

    /// A pool of `spec` (last octet, priority, weight) whose tiers select with `balance`.
    fn pool(spec: &[(u8, u16, u16)], balance: Balance) -> Pool {
        let selection = Selection {
            balance,
            maglev_size: 1009,
        };
        let pool = Pool::new("svc", selection);
        let eps: Vec<Endpoint> = spec
            .iter()
            .map(|&(i, priority, weight)| Endpoint {
                target: format!("b{i}.test."),
                port: 80,
                addr: SocketAddr::from(([127, 0, 0, i], 80)),
                priority,
                weight,
            })
            .collect();
        pool.update(&eps).expect("update");
        pool
    }

    fn eject(b: &Backend, now: u64) {
        let policy = HealthConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 100,
        };
        b.health.count_and_try_eject(now, &policy, || true);
    }

    /// The same backends in a Maglev pool and in a P2C pool.
    fn both(spec: &[(u8, u16, u16)]) -> [(Balance, Arc<Snapshot>); 2] {
        BOTH.map(|balance| (balance, pool(spec, balance).snapshot()))
    }

    fn first(snapshot: &Snapshot, key: u64, now: u64) -> u8 {
        let mut rng = rand::rng();
        let b = Selector::new(&snapshot.tiers, key, now)
            .next_backend(&mut rng)
            .expect("a backend");
        match b.addr().ip() {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(_) => 0,
        }
    }

    #[test]
    fn preferred_tier_first_then_failover() {
        let [(_, maglev), (_, p2c)] = both(&[(1, 10, 1), (2, 10, 1), (3, 20, 1)]);
        let now = crate::health::now_ms();
        for key in 0..200u64 {
            assert_ne!(first(&maglev, key, now), 3);
        }
        for b in maglev.tiers[0]
            .backends
            .iter()
            .chain(&p2c.tiers[0].backends)
        {
            eject(b, now);
        }
        for key in 0..50u64 {
            assert_eq!(first(&maglev, key, now), 3);
            assert_eq!(first(&p2c, key, now), 3);
        }
    }

    #[test]
    fn never_the_same_backend_twice_and_ends() {
        let mut rng = rand::rng();
        for (balance, snap) in both(&[(1, 10, 1), (2, 10, 1), (3, 20, 1)]) {
            let mut s = Selector::new(&snap.tiers, 42, crate::health::now_ms());
            let mut seen = Vec::new();
            while let Some(b) = s.next_backend(&mut rng) {
                assert!(
                    !seen.contains(&b.addr()),
                    "{balance:?} repeated {}",
                    b.addr()
                );
                seen.push(b.addr());
            }
            assert_eq!(seen.len(), 3);
        }
    }

    #[test]
    fn zero_weight_only_when_weighted_unusable() {
        let [(_, maglev), (_, p2c)] = both(&[(1, 10, 5), (2, 10, 0)]);
        let now = crate::health::now_ms();
        for key in 0..100u64 {
            assert_eq!(first(&maglev, key, now), 1);
            assert_eq!(first(&p2c, key, now), 1);
        }
        eject(&maglev.tiers[0].backends[0], now);
        eject(&p2c.tiers[0].backends[0], now);
        assert_eq!(first(&maglev, 7, now), 2);
        assert_eq!(first(&p2c, 7, now), 2);
    }

    #[test]
    fn a_tier_kept_in_only_by_the_ejection_cap_yields_to_a_healthy_tier() {
        let [(_, maglev), (_, p2c)] = both(&[(1, 10, 1), (2, 10, 1), (3, 10, 1), (4, 20, 1)]);
        let now = crate::health::now_ms();
        let policy = HealthConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 34,
        };
        // Every preferred backend fails; the cap lets only one be ejected.
        for snap in [&maglev, &p2c] {
            let tier = &snap.tiers[0];
            for b in &tier.backends {
                b.health
                    .count_and_try_eject(now, &policy, || tier.may_eject_one(now, 34));
            }
            let ejected = tier
                .backends
                .iter()
                .filter(|b| !b.health.is_available(now))
                .count();
            assert_eq!(ejected, 1, "the cap must hold");
        }
        for key in 0..50u64 {
            assert_eq!(first(&maglev, key, now), 4);
            assert_eq!(first(&p2c, key, now), 4);
        }
        // Without a healthy tier to go to, the held backends still serve.
        eject(&p2c.tiers[1].backends[0], now);
        let b = first(&p2c, 1, now);
        assert!((1..=3).contains(&b), "got {b}");
    }

    fn fail_once(b: &Backend) {
        let policy = HealthConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 100,
        };
        b.health
            .count_and_try_eject(crate::health::now_ms(), &policy, || true);
    }

    fn octet(b: &Backend) -> u8 {
        match b.addr().ip() {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(_) => 0,
        }
    }

    #[test]
    fn a_retry_prefers_a_backend_without_failures() {
        let p = pool(&[(1, 10, 1), (2, 10, 1), (3, 10, 1)], Balance::Maglev);
        let snap = p.snapshot();
        let mut rng = rand::rng();
        for key in 0..50u64 {
            let now = crate::health::now_ms();
            // The key's plain preference order, before anything failed.
            let mut plain = Selector::new(&snap.tiers, key, now);
            let first = plain.next_backend(&mut rng).expect("first");
            let second = plain.next_backend(&mut rng).expect("second");
            // Both have failed once (below the threshold of 3): still in service.
            fail_once(&first);
            fail_once(&second);
            let mut s = Selector::new(&snap.tiers, key, now);
            assert_eq!(
                octet(&s.next_backend(&mut rng).expect("first")),
                octet(&first)
            );
            let retry = s.next_backend(&mut rng).expect("retry");
            assert!(
                octet(&retry) != octet(&second),
                "key {key}: retried on a backend that just failed"
            );
            for b in &snap.tiers[0].backends {
                b.health.record_success(0, crate::health::now_ms());
            }
        }
    }

    #[test]
    fn the_last_attempt_after_two_failures_leaves_a_dying_tier() {
        let mut rng = rand::rng();
        for (balance, snap) in both(&[(1, 10, 1), (2, 10, 1), (3, 10, 1), (4, 20, 1)]) {
            let reset = || {
                for (_, b) in snap.iter() {
                    b.health.record_success(0, crate::health::now_ms());
                }
            };
            for key in 0..20u64 {
                let now = crate::health::now_ms();
                let mut s = Selector::new(&snap.tiers, key, now).with_attempts(3);
                let a = s.next_backend(&mut rng).expect("1st");
                fail_once(&a);
                let b = s.next_backend(&mut rng).expect("2nd");
                fail_once(&b);
                assert!(octet(&a) != 4 && octet(&b) != 4, "preferred tier first");
                let c = s.next_backend(&mut rng).expect("3rd");
                assert_eq!(
                    octet(&c),
                    4,
                    "{balance:?} key {key}: last attempt stayed in tier 1"
                );
                reset();
                // With attempts to spare, a retry stays in the preferred tier.
                let mut s = Selector::new(&snap.tiers, key, now).with_attempts(4);
                fail_once(&s.next_backend(&mut rng).expect("1st"));
                fail_once(&s.next_backend(&mut rng).expect("2nd"));
                let c = s.next_backend(&mut rng).expect("3rd of 4");
                assert_ne!(octet(&c), 4, "{balance:?}: left the tier too early");
                reset();
            }
        }
    }

    #[test]
    fn a_last_attempt_stays_in_a_large_healthy_tier() {
        // Two failures for this client in a tier of ten with nothing else failing: the tier
        // is not dying, so the last attempt stays in it.
        let mut spec: Vec<(u8, u16, u16)> = (1..=10).map(|i| (i, 10, 1)).collect();
        spec.push((11, 20, 1));
        let p = pool(&spec, Balance::Maglev);
        let snap = p.snapshot();
        let mut rng = rand::rng();
        for key in 0..20u64 {
            let now = crate::health::now_ms();
            let mut s = Selector::new(&snap.tiers, key, now).with_attempts(3);
            let a = s.next_backend(&mut rng).expect("1st");
            fail_once(&a);
            let b = s.next_backend(&mut rng).expect("2nd");
            fail_once(&b);
            let c = s.next_backend(&mut rng).expect("3rd");
            assert_ne!(octet(&c), 11, "key {key}: left a healthy tier");
            for (_, b) in snap.iter() {
                b.health.record_success(0, crate::health::now_ms());
            }
        }
    }

    #[test]
    fn a_retry_with_attempts_to_spare_stays_in_the_preferred_tier() {
        // Old failures on record (below the threshold) in every preferred backend must not
        // send retries to the backup tier while untried preferred backends remain.
        let mut rng = rand::rng();
        for (balance, snap) in both(&[(1, 10, 1), (2, 10, 1), (3, 10, 1), (4, 20, 1)]) {
            for b in &snap.tiers[0].backends {
                fail_once(b);
            }
            for key in 0..50u64 {
                let now = crate::health::now_ms();
                let mut s = Selector::new(&snap.tiers, key, now).with_attempts(6);
                s.next_backend(&mut rng).expect("1st");
                let retry = s.next_backend(&mut rng).expect("retry");
                assert_ne!(
                    octet(&retry),
                    4,
                    "{balance:?} key {key}: retry skipped tier 1"
                );
            }
        }
    }

    #[test]
    fn all_ejected_picks_least_recently_failed() {
        let p = pool(&[(1, 10, 1), (2, 10, 1)], Balance::Maglev);
        let snap = p.snapshot();
        let now = crate::health::now_ms();
        eject(&snap.tiers[0].backends[1], now);
        eject(&snap.tiers[0].backends[0], now + 5);
        assert_eq!(first(&snap, 1, now + 6), 2);
    }

    #[test]
    fn client_key_ignores_port_unless_asked() {
        let a: SocketAddr = "10.1.2.3:1000".parse().expect("addr");
        let b: SocketAddr = "10.1.2.3:2000".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:1000".parse().expect("addr");
        assert_eq!(
            client_key(a, HashKey::ClientIp),
            client_key(b, HashKey::ClientIp)
        );
        assert_eq!(
            client_key(a, HashKey::ClientIp),
            client_key(mapped, HashKey::ClientIp)
        );
        assert_ne!(
            client_key(a, HashKey::ClientIpPort),
            client_key(b, HashKey::ClientIpPort)
        );
    }

    /// Selection needs no pool: any tier of `Candidate`s will do, which is what keeps
    /// `balance/` free of pool and health types.
    #[test]
    fn selection_walks_any_tier_view() {
        struct Fake {
            up: bool,
        }
        impl Candidate for Fake {
            fn is_available(&self, _now: u64) -> bool {
                self.up
            }
            fn is_held(&self, _now: u64) -> bool {
                false
            }
            fn has_failures(&self) -> bool {
                !self.up
            }
            fn is_removal_pending(&self) -> bool {
                false
            }
            fn last_failure(&self) -> u64 {
                0
            }
            fn load(&self) -> u64 {
                0
            }
        }
        struct FakeTier {
            backends: Vec<Arc<Fake>>,
            selector: Box<dyn TierSelector>,
        }
        impl TierView for FakeTier {
            type Backend = Fake;
            fn backends(&self) -> &[Arc<Fake>] {
                &self.backends
            }
            fn selector(&self) -> &dyn TierSelector {
                &*self.selector
            }
        }
        let mut rng = rand::rng();
        for balance in BOTH {
            let tier = FakeTier {
                backends: [true, false, true].map(|up| Arc::new(Fake { up })).into(),
                selector: Selection::new(balance)
                    .build(&["a", "b", "c"], &[1, 1, 1])
                    .expect("selector"),
            };
            let tiers = [tier];
            let mut s = Selector::new(&tiers, 7, 0);
            let picks: Vec<bool> = std::iter::from_fn(|| s.next_backend(&mut rng))
                .map(|b| b.up)
                .collect();
            // The two available backends, then the ejected one as the last resort.
            assert_eq!(picks, [true, true, false], "{balance:?}");
        }
    }

    /// Past the inline part of the tried set, a walk still never repeats a backend.
    #[test]
    fn a_long_walk_never_repeats_a_backend() {
        let spec: Vec<(u8, u16, u16)> = (1..=12).map(|i| (i, 10 + u16::from(i % 2), 1)).collect();
        let mut rng = rand::rng();
        for (balance, snap) in both(&spec) {
            let mut s = Selector::new(&snap.tiers, 3, crate::health::now_ms());
            let mut seen: Vec<u8> = std::iter::from_fn(|| s.next_backend(&mut rng))
                .map(|b| octet(&b))
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (1..=12).collect::<Vec<u8>>(), "{balance:?}");
        }
    }
}
