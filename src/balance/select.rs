//! Turns a snapshot into an ordered stream of candidate backends for one client connection:
//! preferred tier first, the configured algorithm within a tier, never the same backend twice,
//! and, when every backend is ejected, the least recently failed one rather than nothing.
//! The proxy only asks "next?"; how retries pick is decided here.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;

use super::hash_key;
use crate::config::{Balance, HashKey};
use crate::pool::{Backend, Snapshot, Tier};

/// The selection key of a client: its address (and port with `client_ip_port`) hashed the
/// same way in every srvlb instance.
pub fn client_key(client: SocketAddr, hash: HashKey) -> u64 {
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
pub struct Selector<'a> {
    snapshot: &'a Snapshot,
    balance: Balance,
    key: u64,
    now: u64,
    /// Addresses of the `Backend`s already handed out (pointer identity, kept as integers so
    /// the selector stays `Send` across the proxy's awaits).
    tried: Vec<usize>,
    /// How many backends the caller will try at most (u32::MAX: no limit known).
    max_attempts: u32,
}

impl<'a> Selector<'a> {
    pub fn new(snapshot: &'a Snapshot, balance: Balance, key: u64, now: u64) -> Selector<'a> {
        Selector {
            snapshot,
            balance,
            key,
            now,
            tried: Vec::with_capacity(4),
            max_attempts: u32::MAX,
        }
    }

    /// Tells the selector how many attempts the caller makes, so that the last one can go
    /// where a failed tier cannot take it.
    pub fn with_attempts(mut self, max_attempts: u32) -> Selector<'a> {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// The next backend to try, or `None` when every backend has been tried.
    ///
    /// The tier is the first one with a healthy backend (not ejected, not held by the
    /// ejection cap, not tried); within it the algorithm (Maglev or P2C) picks. A retry
    /// prefers, within that tier, a backend with no failure on record, so it does not walk
    /// from one dead backend to the next while a tier dies and its failure counts are still
    /// below the threshold. A last attempt after two failures leaves a tier that looks
    /// dying (half its backends failing) for an untried tier with a healthy backend, so the
    /// client is served by a backup tier rather than reset.
    pub fn next_backend<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Option<Arc<Backend>> {
        let tiers = &self.snapshot.tiers;
        let healthy = |b: &Arc<Backend>| self.usable(b) && !b.health.is_held(self.now);
        // A backend whose removal from DNS awaits confirmation is no cleaner a retry than
        // one with failures: during a rollout it is the old pod that just stopped listening.
        let clean = |b: &Arc<Backend>| {
            healthy(b) && b.health.consecutive_failures() == 0 && !b.is_removal_pending()
        };
        let usable = |b: &Arc<Backend>| self.usable(b);
        let retrying = !self.tried.is_empty();
        let last_after_two =
            self.tried.len() >= 2 && self.tried.len() as u64 + 1 >= u64::from(self.max_attempts);
        let escape = (last_after_two && self.tried_tiers_look_dying())
            .then(|| {
                tiers
                    .iter()
                    .filter(|tier| !tier.backends.iter().any(|b| self.was_tried(b)))
                    .find_map(|tier| self.pick_in_tier(tier, rng, &healthy))
            })
            .flatten();
        let picked = escape
            .or_else(|| {
                let tier = tiers
                    .iter()
                    .find(|tier| tier.backends.iter().any(healthy))?;
                retrying
                    .then(|| self.pick_in_tier(tier, rng, &clean))
                    .flatten()
                    .or_else(|| self.pick_in_tier(tier, rng, &usable))
            })
            // No tier has a healthy backend: held backends (kept in by the cap) still serve.
            .or_else(|| {
                tiers
                    .iter()
                    .find_map(|tier| self.pick_in_tier(tier, rng, &usable))
            })
            .or_else(|| self.least_recently_failed())?;
        self.tried.push(Arc::as_ptr(&picked) as usize);
        Some(picked)
    }

    /// True when, in some tier this client already tried, at least half of the backends are
    /// ejected, held or have failures on record.
    fn tried_tiers_look_dying(&self) -> bool {
        self.snapshot
            .tiers
            .iter()
            .filter(|tier| tier.backends.iter().any(|b| self.was_tried(b)))
            .any(|tier| {
                let failing = tier
                    .backends
                    .iter()
                    .filter(|b| {
                        !b.health.is_available(self.now)
                            || b.health.is_held(self.now)
                            || b.health.consecutive_failures() > 0
                    })
                    .count();
                failing * 2 >= tier.backends.len()
            })
    }

    fn usable(&self, backend: &Arc<Backend>) -> bool {
        backend.health.is_available(self.now) && !self.was_tried(backend)
    }

    fn was_tried(&self, backend: &Arc<Backend>) -> bool {
        self.tried.contains(&(Arc::as_ptr(backend) as usize))
    }

    /// The algorithm's pick among the tier's backends that pass `ok`.
    fn pick_in_tier<R: Rng + ?Sized>(
        &self,
        tier: &Tier,
        rng: &mut R,
        ok: &dyn Fn(&Arc<Backend>) -> bool,
    ) -> Option<Arc<Backend>> {
        let weighted = match self.balance {
            Balance::Maglev => tier
                .maglev
                .preference(self.key)
                .map(|i| &tier.backends[i])
                .find(|b| ok(b)),
            Balance::P2c => tier
                .p2c
                .pick(
                    rng,
                    |i| tier.backends[i].active(),
                    |i| ok(&tier.backends[i]),
                )
                .map(|i| &tier.backends[i]),
        };
        weighted
            .or_else(|| self.zero_weight_fallback(tier, ok))
            .map(Arc::clone)
    }

    /// RFC 2782: weight-0 backends take traffic only when no weighted backend of the tier is
    /// usable. (When every weight is 0 the tables already cover them all.)
    fn zero_weight_fallback<'t>(
        &self,
        tier: &'t Tier,
        ok: &dyn Fn(&Arc<Backend>) -> bool,
    ) -> Option<&'t Arc<Backend>> {
        let zero = tier
            .backends
            .iter()
            .zip(&tier.weights)
            .filter(|(b, w)| **w == 0 && ok(b))
            .map(|(b, _)| b);
        match self.balance {
            // Stable per client: start at a key-derived offset.
            Balance::Maglev => {
                let candidates: usize = zero.clone().count();
                if candidates == 0 {
                    return None;
                }
                let skip = usize::try_from(self.key % candidates as u64).unwrap_or(0);
                zero.clone().nth(skip)
            }
            Balance::P2c => zero.min_by_key(|b| b.active()),
        }
    }

    /// Every backend is ejected or tried: better a slow answer than none, so take the one
    /// that failed longest ago among those not tried yet.
    fn least_recently_failed(&self) -> Option<Arc<Backend>> {
        self.snapshot
            .iter()
            .map(|(_, b)| b)
            .filter(|b| !self.was_tried(b))
            .min_by_key(|b| b.health.last_failure())
            .map(Arc::clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthConfig;
    use crate::pool::{Endpoint, Pool};
    use std::time::Duration;

    fn pool(spec: &[(u8, u16, u16)]) -> Pool {
        let pool = Pool::new("svc", 1009);
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

    fn first(snapshot: &Snapshot, balance: Balance, key: u64, now: u64) -> u8 {
        let mut rng = rand::rng();
        let b = Selector::new(snapshot, balance, key, now)
            .next_backend(&mut rng)
            .expect("a backend");
        match b.addr().ip() {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(_) => 0,
        }
    }

    #[test]
    fn preferred_tier_first_then_failover() {
        let p = pool(&[(1, 10, 1), (2, 10, 1), (3, 20, 1)]);
        let snap = p.snapshot();
        let now = crate::health::now_ms();
        for key in 0..200u64 {
            assert_ne!(first(&snap, Balance::Maglev, key, now), 3);
        }
        for b in &snap.tiers[0].backends {
            eject(b, now);
        }
        for key in 0..50u64 {
            assert_eq!(first(&snap, Balance::Maglev, key, now), 3);
            assert_eq!(first(&snap, Balance::P2c, key, now), 3);
        }
    }

    #[test]
    fn never_the_same_backend_twice_and_ends() {
        let p = pool(&[(1, 10, 1), (2, 10, 1), (3, 20, 1)]);
        let snap = p.snapshot();
        let mut rng = rand::rng();
        for balance in [Balance::Maglev, Balance::P2c] {
            let mut s = Selector::new(&snap, balance, 42, crate::health::now_ms());
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
        let p = pool(&[(1, 10, 5), (2, 10, 0)]);
        let snap = p.snapshot();
        let now = crate::health::now_ms();
        for key in 0..100u64 {
            assert_eq!(first(&snap, Balance::Maglev, key, now), 1);
            assert_eq!(first(&snap, Balance::P2c, key, now), 1);
        }
        eject(&snap.tiers[0].backends[0], now);
        assert_eq!(first(&snap, Balance::Maglev, 7, now), 2);
        assert_eq!(first(&snap, Balance::P2c, 7, now), 2);
    }

    #[test]
    fn a_tier_kept_in_only_by_the_ejection_cap_yields_to_a_healthy_tier() {
        let p = pool(&[(1, 10, 1), (2, 10, 1), (3, 10, 1), (4, 20, 1)]);
        let snap = p.snapshot();
        let now = crate::health::now_ms();
        let policy = HealthConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 34,
        };
        // Every preferred backend fails; the cap lets only one be ejected.
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
        for key in 0..50u64 {
            assert_eq!(first(&snap, Balance::Maglev, key, now), 4);
            assert_eq!(first(&snap, Balance::P2c, key, now), 4);
        }
        // Without a healthy tier to go to, the held backends still serve.
        eject(&snap.tiers[1].backends[0], now);
        let b = first(&snap, Balance::P2c, 1, now);
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
        let p = pool(&[(1, 10, 1), (2, 10, 1), (3, 10, 1)]);
        let snap = p.snapshot();
        let mut rng = rand::rng();
        for key in 0..50u64 {
            let now = crate::health::now_ms();
            // The key's plain preference order, before anything failed.
            let mut plain = Selector::new(&snap, Balance::Maglev, key, now);
            let first = plain.next_backend(&mut rng).expect("first");
            let second = plain.next_backend(&mut rng).expect("second");
            // Both have failed once (below the threshold of 3): still in service.
            fail_once(&first);
            fail_once(&second);
            let mut s = Selector::new(&snap, Balance::Maglev, key, now);
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
        let p = pool(&[(1, 10, 1), (2, 10, 1), (3, 10, 1), (4, 20, 1)]);
        let snap = p.snapshot();
        let mut rng = rand::rng();
        let reset = || {
            for (_, b) in snap.iter() {
                b.health.record_success(0, crate::health::now_ms());
            }
        };
        for balance in [Balance::Maglev, Balance::P2c] {
            for key in 0..20u64 {
                let now = crate::health::now_ms();
                let mut s = Selector::new(&snap, balance, key, now).with_attempts(3);
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
                let mut s = Selector::new(&snap, balance, key, now).with_attempts(4);
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
        let p = pool(&spec);
        let snap = p.snapshot();
        let mut rng = rand::rng();
        for key in 0..20u64 {
            let now = crate::health::now_ms();
            let mut s = Selector::new(&snap, Balance::Maglev, key, now).with_attempts(3);
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
        let p = pool(&[(1, 10, 1), (2, 10, 1), (3, 10, 1), (4, 20, 1)]);
        let snap = p.snapshot();
        for b in &snap.tiers[0].backends {
            fail_once(b);
        }
        let mut rng = rand::rng();
        for balance in [Balance::Maglev, Balance::P2c] {
            for key in 0..50u64 {
                let now = crate::health::now_ms();
                let mut s = Selector::new(&snap, balance, key, now).with_attempts(6);
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
        let p = pool(&[(1, 10, 1), (2, 10, 1)]);
        let snap = p.snapshot();
        let now = crate::health::now_ms();
        eject(&snap.tiers[0].backends[1], now);
        eject(&snap.tiers[0].backends[0], now + 5);
        assert_eq!(first(&snap, Balance::Maglev, 1, now + 6), 2);
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
}
