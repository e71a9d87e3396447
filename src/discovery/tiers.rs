//! The tier-change log: samples which tier new connections would use and reports switches
//! (rate-limited). It reads snapshots only; it never changes the pool.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::health::now_ms;
use crate::pool::{Pool, Snapshot};

/// How often discovery looks at which tier new connections would use. Tier switches happen
/// at selection time (health ejects a whole tier), not on DNS refreshes, so they are
/// sampled; one snapshot load and a scan of the backends' atomics per second is cheap.
pub(super) const TIER_CHECK: Duration = Duration::from_secs(1);
/// At most one tier-switch line per service this often; a flapping tier is summarised by
/// the `switches` count of the next line instead of one line per flip.
const TIER_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Detects and logs (rate-limited) changes of the tier new connections use.
#[derive(Debug, Default)]
pub(super) struct TierWatch {
    /// Priority of the active tier as last logged (`None` inside = no usable tier);
    /// `None` outside = nothing observed yet.
    logged: Option<Option<u16>>,
    /// Priority seen at the previous check, to count flips between two log lines.
    seen: Option<Option<u16>>,
    switches: u32,
    last_log: Option<Instant>,
}

/// A change of the tier new connections use, ready to be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TierSwitch {
    from: Option<u16>,
    to: Option<u16>,
    /// Away from the preferred tier (the alarming direction).
    fallback: bool,
    /// The tier in use before is no longer in the answer: DNS moved the service to another
    /// tier, nothing failed.
    replaced: bool,
    usable: usize,
    in_tier: usize,
    switches: u32,
}

impl TierWatch {
    pub(super) fn check(&mut self, service: &str, pool: &Pool) {
        let Some(switch) = self.observe(pool) else {
            return;
        };
        let from = switch
            .from
            .map_or_else(|| "none".to_owned(), |p| p.to_string());
        let to = switch
            .to
            .map_or_else(|| "none".to_owned(), |p| p.to_string());
        let (usable, backends, switches) = (switch.usable, switch.in_tier, switch.switches);
        if switch.replaced {
            info!(service, from_priority = %from, to_priority = %to, usable, backends, "tier change: DNS replaced the tier in use");
        } else if switch.fallback {
            warn!(service, from_priority = %from, to_priority = %to, usable, backends, switches, "tier switch: preferred tier has no usable backend");
        } else {
            info!(service, from_priority = %from, to_priority = %to, usable, backends, switches, "tier switch: traffic returns to a preferred tier");
        }
    }

    /// Compares the tier in use with the one last reported; returns a switch to report
    /// (at most one per TIER_LOG_INTERVAL; flips in between are counted).
    pub(super) fn observe(&mut self, pool: &Pool) -> Option<TierSwitch> {
        let snapshot = pool.snapshot();
        let now = now_ms();
        let active = snapshot
            .active_tier(now)
            .map(|i| snapshot.tiers[i].priority);
        let logged = match self.logged {
            Some(logged) => logged,
            // An empty pool before the first answer is no baseline.
            None if snapshot.is_empty() => return None,
            // The first look at a populated pool compares with its preferred tier: on it,
            // nothing to say ("backends changed" said it); already past it, a failover.
            None => {
                let preferred = snapshot.tiers.first().map(|t| t.priority);
                self.logged = Some(preferred);
                self.seen = Some(preferred);
                preferred
            }
        };
        if self.seen != Some(active) {
            self.seen = Some(active);
            self.switches = self.switches.saturating_add(1);
        }
        if logged == active
            || self
                .last_log
                .is_some_and(|at| at.elapsed() < TIER_LOG_INTERVAL)
        {
            return None;
        }
        let (usable, in_tier) = usable_in(&snapshot, active, now);
        let replaced = logged.is_some_and(|old| snapshot.tiers.iter().all(|t| t.priority != old));
        let preferred = snapshot.tiers.first().map(|t| t.priority);
        let fallback = !replaced && is_fallback(logged, active, preferred);
        let switch = TierSwitch {
            from: logged,
            to: active,
            fallback,
            replaced,
            usable,
            in_tier,
            switches: self.switches,
        };
        self.logged = Some(active);
        self.switches = 0;
        self.last_log = Some(Instant::now());
        Some(switch)
    }
}

/// Usable (not ejected) and all backends of the tier with `priority`; (0, 0) for none.
fn usable_in(snapshot: &Snapshot, priority: Option<u16>, now: u64) -> (usize, usize) {
    priority
        .and_then(|p| snapshot.tiers.iter().find(|t| t.priority == p))
        .map(|t| {
            let usable = t
                .backends
                .iter()
                .filter(|b| b.health.is_available(now))
                .count();
            (usable, t.backends.len())
        })
        .unwrap_or((0, 0))
}

/// Falling back (to a larger priority value, to none, or from none to a tier that is not
/// the preferred one) is the alarming direction.
fn is_fallback(from: Option<u16>, to: Option<u16>, preferred: Option<u16>) -> bool {
    match (from, to) {
        (Some(old), Some(new)) => new > old,
        (Some(_), None) => true,
        (None, Some(new)) => Some(new) != preferred,
        (None, None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Selection;
    use crate::pool::Endpoint;
    use std::net::SocketAddr;

    #[test]
    fn tier_watch_takes_no_baseline_from_an_empty_pool_and_reports_failover() {
        let pool = Pool::new("svc", Selection::maglev(1009));
        let mut watch = TierWatch::default();
        assert_eq!(watch.observe(&pool), None, "empty pool: nothing to report");
        let ep = |i: u8, priority: u16| Endpoint {
            target: format!("b{i}.test."),
            port: 80,
            addr: SocketAddr::from(([127, 0, 0, i], 80)),
            priority,
            weight: 1,
        };
        pool.update(&[ep(1, 10), ep(2, 20)]).expect("update");
        // Tier 10 fails before the watch ever saw the populated pool with tier 10 active.
        let snapshot = pool.snapshot();
        let policy = crate::config::HealthConfig {
            consecutive_failures: 1,
            base_ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 100,
        };
        snapshot.tiers[0].backends[0]
            .health
            .count_and_try_eject(now_ms(), &policy, || true);
        let switch = watch
            .observe(&pool)
            .expect("already failed over at the first look");
        assert_eq!((switch.from, switch.to), (Some(10), Some(20)));
        assert!(
            switch.fallback,
            "landing on a backup tier is a failover: {switch:?}"
        );
        assert_eq!(watch.observe(&pool), None, "reported once");
        let mut fresh = TierWatch {
            logged: Some(None),
            ..TierWatch::default()
        };
        let switch = fresh.observe(&pool).expect("a switch from none");
        assert!(!switch.replaced);
        assert_eq!((switch.from, switch.to), (None, Some(20)));
        assert!(
            switch.fallback,
            "from none to a backup tier is a failover: {switch:?}"
        );
    }

    #[test]
    fn dns_replacing_the_only_tier_is_not_a_failover() {
        let pool = Pool::new("svc", Selection::maglev(1009));
        let mut watch = TierWatch::default();
        let ep = |i: u8, priority: u16| Endpoint {
            target: format!("b{i}.test."),
            port: 80,
            addr: SocketAddr::from(([127, 0, 0, i], 80)),
            priority,
            weight: 1,
        };
        pool.update(&[ep(1, 10)]).expect("update");
        assert_eq!(watch.observe(&pool), None);
        pool.update(&[ep(2, 20)]).expect("update");
        let switch = watch.observe(&pool).expect("a change");
        assert!(switch.replaced && !switch.fallback, "{switch:?}");
    }
}
