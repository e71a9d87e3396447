//! Finds a service's backends: SRV records (RFC 2782) resolved with hickory-resolver, targets
//! resolved to A/AAAA (from the additional section when present), static backends, refresh on
//! the records' TTL with jitter, and the rules that keep a flapping or failing registry from
//! emptying a pool. It feeds whole answers to `Pool::update`; it never touches connections.
//!
//! `lookup` does the DNS queries, `schedule` decides when to look again, `tiers` logs tier
//! switches; this file runs the per-service loop and applies answers.

mod lookup;
mod schedule;
mod tiers;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig as HickoryConfig,
    ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{ResolverConfig, ServiceConfig};
use crate::health::now_ms;
use crate::pool::{Endpoint, Pool};

pub use lookup::{Answer, Unresolved, lookup_srv};
pub use schedule::{failure_backoff, refresh_interval};
use tiers::{TIER_CHECK, TierWatch};

/// Priority given to static backends listed beside an SRV name: a last-resort tier that takes
/// traffic only when no SRV backend is usable. Alone, they form the only tier.
pub const STATIC_PRIORITY: u16 = u16::MAX;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read the system resolver configuration: {0}")]
    SystemConfig(NetError),
    #[error("cannot build the DNS resolver: {0}")]
    Build(NetError),
}

/// Builds the resolver every service shares. Caching is off: srvlb schedules its own
/// refreshes from the TTLs, and a cache would hide record changes for up to a TTL more.
pub fn build_resolver(settings: &ResolverConfig) -> Result<TokioResolver, DiscoveryError> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if settings.nameservers.is_empty() {
        TokioResolver::builder(provider).map_err(DiscoveryError::SystemConfig)?
    } else {
        let servers = settings
            .nameservers
            .iter()
            .map(|ns| {
                let mut udp = ConnectionConfig::udp();
                udp.port = ns.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = ns.port();
                NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(HickoryConfig::from_name_servers(servers), provider)
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = settings.timeout;
    opts.attempts = 1;
    opts.cache_size = 0;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.try_tcp_on_error = true;
    builder.build().map_err(DiscoveryError::Build)
}

/// What operators see of a service's discovery: shared with status and metrics.
#[derive(Debug, Default)]
pub struct DiscoveryStatus {
    /// The last lookup failed and the pool serves the last known good answer.
    pub stale: AtomicBool,
    pub refreshes: AtomicU64,
    pub failures: AtomicU64,
    /// `now_ms` of the last successful lookup (0 = never).
    pub last_success_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// The first lookup's outcome (found, absent or failed) has reached the pool; for a
    /// static-only service, the static backends have. Static backends beside an SRV name
    /// are published before the first lookup, so a non-empty pool does not mean this.
    first_outcome: AtomicBool,
    first_outcome_notify: tokio::sync::Notify,
}

impl DiscoveryStatus {
    fn first_outcome_applied(&self) {
        if !self.first_outcome.swap(true, Ordering::AcqRel) {
            self.first_outcome_notify.notify_waiters();
        }
    }

    /// Returns once the first lookup's outcome is in the pool (see `first_outcome`).
    pub async fn wait_first_outcome(&self) {
        loop {
            // Registered before the flag is read, so a notification in between is not lost.
            let notified = self.first_outcome_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.first_outcome.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn fail(&self, why: String) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(why);
        !self.stale.swap(true, Ordering::Relaxed)
    }

    fn succeed(&self) -> bool {
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        self.last_success_ms.store(now_ms(), Ordering::Relaxed);
        *self.last_error.lock() = None;
        self.stale.swap(false, Ordering::Relaxed)
    }
}

/// Static backends as endpoints of the last-resort tier.
pub fn static_endpoints(statics: &[SocketAddr]) -> Vec<Endpoint> {
    statics
        .iter()
        .map(|addr| Endpoint {
            target: addr.ip().to_string(),
            port: addr.port(),
            addr: *addr,
            priority: STATIC_PRIORITY,
            weight: 1,
        })
        .collect()
}

/// The refresh loop of one service. Runs until `shutdown` flips to true.
pub struct Discovery {
    service: String,
    srv: Option<String>,
    statics: Vec<Endpoint>,
    resolver: Arc<TokioResolver>,
    /// The refresh settings in use: taken from `settings_updates` at each refresh.
    settings: ResolverConfig,
    /// A reload that changes only min_refresh, max_refresh or empty_hold sends them here
    /// instead of restarting discovery (which would throw away the pool's state).
    settings_updates: watch::Receiver<ResolverConfig>,
    pool: Arc<Pool>,
    status: Arc<DiscoveryStatus>,
    /// Addresses of SRV targets from the last good answer.
    known_addresses: HashMap<String, Vec<IpAddr>>,
    /// The SRV part of the answer the pool currently serves.
    current: Vec<Endpoint>,
    /// An answer that would remove more than half of the backends, waiting for confirmation.
    pending: Option<Vec<Endpoint>>,
    /// Since when the registry has said "absent" (NXDOMAIN / empty / ".").
    absent_since: Option<Instant>,
    consecutive_failures: u32,
    /// Whether any lookup has answered yet (start-up failures get their own log line).
    answered: bool,
    /// (skipped, kept, targets) of the last answer with unresolved targets, for logging.
    unresolved_counts: Option<(usize, usize, usize)>,
    tier_watch: TierWatch,
}

impl Discovery {
    pub fn new(
        service: &ServiceConfig,
        resolver: Arc<TokioResolver>,
        mut settings_updates: watch::Receiver<ResolverConfig>,
        pool: Arc<Pool>,
        status: Arc<DiscoveryStatus>,
    ) -> Discovery {
        let settings = settings_updates.borrow_and_update().clone();
        Discovery {
            service: service.name.clone(),
            srv: service.srv.clone(),
            statics: static_endpoints(&service.static_backends),
            resolver,
            settings,
            settings_updates,
            pool,
            status,
            known_addresses: HashMap::new(),
            current: Vec::new(),
            pending: None,
            absent_since: None,
            consecutive_failures: 0,
            answered: false,
            unresolved_counts: None,
            tier_watch: TierWatch::default(),
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.publish().await;
        let mut tier_tick = tokio::time::interval(TIER_CHECK);
        tier_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let Some(srv) = self.srv.clone() else {
            // Static backends only: nothing to refresh, but health can still switch tiers.
            self.status.succeed();
            self.status.first_outcome_applied();
            loop {
                tokio::select! {
                    _ = tier_tick.tick() => self.tier_watch.check(&self.service, &self.pool),
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        };
        loop {
            // The lookup is the long part of a refresh (up to the SRV timeout plus the
            // targets' budget): it runs under the same select, so a retired service's task
            // ends at once instead of finishing a refresh nobody wants.
            let answer = {
                let lookup = lookup_srv(&self.resolver, &srv, &self.known_addresses);
                tokio::pin!(lookup);
                loop {
                    tokio::select! {
                        answer = &mut lookup => break answer,
                        _ = tier_tick.tick() => self.tier_watch.check(&self.service, &self.pool),
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                }
            };
            let delay = self.refresh(&srv, answer).await;
            self.status.first_outcome_applied();
            let next = tokio::time::sleep(delay);
            tokio::pin!(next);
            let mut settings_live = true;
            loop {
                tokio::select! {
                    _ = &mut next => break,
                    _ = tier_tick.tick() => self.tier_watch.check(&self.service, &self.pool),
                    // A reload changed the refresh settings: look again now, so a shorter
                    // max_refresh or empty_hold does not wait out the old, longer interval.
                    changed = self.settings_updates.changed(), if settings_live => match changed {
                        Ok(()) => break,
                        Err(_) => settings_live = false, // the service is gone; shutdown follows
                    },
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        }
    }

    /// The consequences of one lookup's answer; returns when to look again.
    async fn refresh(&mut self, srv: &str, answer: Answer) -> Duration {
        // Settings from a reload apply from here on: the hold, the next interval. (Read
        // unconditionally: the sleep above may already have marked the change as seen.)
        self.settings = self.settings_updates.borrow_and_update().clone();
        // `rand::rng()` per use: the thread-local generator must not be held across an await.
        match answer {
            Answer::Found {
                endpoints,
                ttl,
                unresolved,
            } => {
                self.log_unresolved(srv, unresolved);
                self.answered = true;
                self.consecutive_failures = 0;
                if self.status.succeed() {
                    info!(service = %self.service, srv, backends = endpoints.len(), "DNS lookups recovered");
                }
                if self.absent_since.take().is_some() {
                    info!(service = %self.service, srv, backends = endpoints.len(), "SRV records are back; empty hold cancelled");
                }
                self.remember_addresses(&endpoints);
                self.accept_answer(endpoints).await;
                refresh_interval(ttl, &self.settings, &mut rand::rng())
            }
            Answer::Absent(why) => {
                self.answered = true;
                self.consecutive_failures = 0;
                if self.status.succeed() {
                    info!(service = %self.service, srv, reason = why, "DNS lookups recovered");
                }
                // A pending large removal is moot: the hold below decides what happens.
                self.pending = None;
                let hold = self.settings.empty_hold;
                let since = match self.absent_since {
                    Some(since) => since,
                    None => {
                        let now = Instant::now();
                        self.absent_since = Some(now);
                        if self.current.is_empty() {
                            warn!(service = %self.service, srv, reason = why, "service absent from DNS; no SRV backends");
                        } else {
                            warn!(service = %self.service, srv, reason = why, backends = self.current.len(), hold_ms = hold.as_millis() as u64, "service absent from DNS; keeping the last backends during the hold");
                        }
                        now
                    }
                };
                let held = since.elapsed();
                if held >= hold {
                    if !self.current.is_empty() {
                        warn!(service = %self.service, srv, reason = why, held_ms = held.as_millis() as u64, backends = self.current.len(), "empty hold elapsed; removing the service's SRV backends");
                        self.current.clear();
                        self.publish().await;
                    }
                    return refresh_interval(0, &self.settings, &mut rand::rng());
                }
                // Look again at min_refresh, and no later than the end of the hold, so that
                // the pool empties on time (or the hold is cancelled as soon as DNS says so).
                let remaining = hold.saturating_sub(held);
                refresh_interval(0, &self.settings, &mut rand::rng())
                    .min(remaining.max(Duration::from_millis(50)))
            }
            Answer::Failed(why) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let delay =
                    failure_backoff(self.consecutive_failures, &self.settings, &mut rand::rng());
                let first = self.status.fail(why.clone());
                let retry_ms = delay.as_millis() as u64;
                if !self.answered && first {
                    warn!(service = %self.service, srv, error = %why, retry_ms, "first DNS lookup failed; listening anyway, clients are closed at once until backends appear");
                } else if first {
                    warn!(service = %self.service, srv, error = %why, backends = self.current.len(), retry_ms, "DNS lookup failed; serving the last known backends (stale)");
                } else {
                    debug!(service = %self.service, srv, error = %why, retry_ms, "DNS lookup failed again");
                }
                delay
            }
        }
    }

    /// One line per refresh about targets that could not be resolved: a warning when the
    /// counts change (a target starts or stops failing), at debug while they stay the same,
    /// so a target that keeps failing does not fill the log.
    fn log_unresolved(&mut self, srv: &str, unresolved: Option<Unresolved>) {
        let counts = unresolved.as_ref().map(|u| (u.skipped, u.kept, u.targets));
        let changed = counts != self.unresolved_counts;
        self.unresolved_counts = counts;
        match unresolved {
            Some(u) if changed => {
                warn!(service = %self.service, srv, skipped = u.skipped, kept_previous = u.kept, targets = u.targets, error = %u.error, "some SRV targets could not be resolved; serving the others")
            }
            Some(u) => {
                debug!(service = %self.service, srv, skipped = u.skipped, kept_previous = u.kept, targets = u.targets, error = %u.error, "some SRV targets could not be resolved; serving the others")
            }
            None if changed => {
                info!(service = %self.service, srv, "every SRV target resolves again")
            }
            None => {}
        }
    }

    fn remember_addresses(&mut self, endpoints: &[Endpoint]) {
        let mut by_target: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for ep in endpoints {
            let ips = by_target.entry(ep.target.clone()).or_default();
            if !ips.contains(&ep.addr.ip()) {
                ips.push(ep.addr.ip());
            }
        }
        self.known_addresses = by_target;
    }

    /// Applies a new answer, unless it would remove more than half of the backends at once:
    /// such an answer is applied only when the next lookup says the same.
    async fn accept_answer(&mut self, mut endpoints: Vec<Endpoint>) {
        endpoints.sort_by(|a, b| (&a.target, a.port, a.addr).cmp(&(&b.target, b.port, b.addr)));
        if endpoints == self.current {
            if self.pending.take().is_some() {
                info!(service = %self.service, backends = endpoints.len(), "damping: the large removal was not confirmed; nothing removed");
            }
            return;
        }
        let removed = self
            .current
            .iter()
            .filter(|old| !endpoints.iter().any(|new| same_backend(old, new)))
            .count();
        if removed * 2 > self.current.len() && !self.current.is_empty() {
            if self.pending.as_ref() != Some(&endpoints) {
                warn!(service = %self.service, removed, of = self.current.len(), "damping: answer would remove more than half of the backends; waiting for the next lookup to confirm");
                self.pending = Some(endpoints);
                return;
            }
            info!(service = %self.service, removed, of = self.current.len(), "damping: large removal confirmed by a second lookup; applying it");
        }
        self.pending = None;
        self.current = endpoints;
        self.publish().await;
    }

    async fn publish(&mut self) {
        let mut all = self.current.clone();
        all.extend(self.statics.iter().cloned());
        let result = self.pool.update_off_runtime(all).await;
        if let Ok(change) = &result {
            if change.capped > 0 {
                warn!(service = %self.service, left_out = change.capped, max_backends = crate::pool::MAX_BACKENDS, max_tiers = crate::pool::MAX_TIERS, "answer too large; keeping only the preferred priorities and backends");
            }
        }
        match result {
            Ok(change) if !change.is_noop() => info!(
                service = %self.service,
                added = change.added,
                removed = change.removed,
                reweighted = change.reweighted,
                backends = change.total,
                "backends changed"
            ),
            Ok(_) => {}
            Err(e) => {
                warn!(service = %self.service, error = %e, "cannot publish backends; keeping the previous set")
            }
        }
    }
}

fn same_backend(a: &Endpoint, b: &Endpoint) -> bool {
    a.target == b.target && a.port == b.port && a.addr == b.addr
}

#[cfg(test)]
mod tests {
    use super::lookup::absence;
    use super::tiers::TierWatch;
    use super::*;
    use hickory_resolver::net::DnsError;
    use hickory_resolver::proto::op::ResponseCode;

    fn settings() -> ResolverConfig {
        ResolverConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(60),
            empty_hold: Duration::from_secs(30),
        }
    }

    fn within(d: Duration, low_ms: u64, high_ms: u64) -> bool {
        d >= Duration::from_millis(low_ms) && d <= Duration::from_millis(high_ms)
    }

    #[test]
    fn statics_are_the_last_resort_tier() {
        let eps = static_endpoints(&["127.0.0.1:80".parse().expect("addr")]);
        assert_eq!(eps[0].priority, STATIC_PRIORITY);
        assert_eq!(eps[0].weight, 1);
    }

    fn ep(target: &str, last: u8) -> Endpoint {
        Endpoint {
            target: target.to_owned(),
            port: 80,
            addr: SocketAddr::from(([127, 0, 0, last], 80)),
            priority: 10,
            weight: 1,
        }
    }

    fn discovery(pool: &Arc<Pool>) -> Discovery {
        let mut cfg = settings();
        // Never queried: the tests below feed answers straight to `accept_answer`.
        cfg.nameservers = vec!["127.0.0.1:9".parse().expect("addr")];
        let resolver = Arc::new(build_resolver(&cfg).expect("resolver"));
        Discovery {
            service: "svc".to_owned(),
            srv: Some("_x._tcp.test.".to_owned()),
            statics: Vec::new(),
            resolver,
            settings: cfg.clone(),
            settings_updates: watch::channel(cfg).1,
            pool: Arc::clone(pool),
            status: Arc::new(DiscoveryStatus::default()),
            known_addresses: HashMap::new(),
            current: Vec::new(),
            pending: None,
            absent_since: None,
            consecutive_failures: 0,
            answered: false,
            unresolved_counts: None,
            tier_watch: TierWatch::default(),
        }
    }

    fn served(pool: &Pool) -> Vec<String> {
        let mut names: Vec<String> = pool
            .snapshot()
            .iter()
            .map(|(_, b)| b.key.target.to_string())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn damping_applies_a_large_removal_only_when_confirmed() {
        let pool = Arc::new(Pool::new("svc", 1009));
        let mut d = discovery(&pool);
        let full = vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)];
        d.accept_answer(full.clone()).await;
        assert_eq!(served(&pool), ["a.", "b.", "c."]);
        // Removing 2 of 3 is held back...
        d.accept_answer(vec![ep("a.", 1)]).await;
        assert_eq!(served(&pool), ["a.", "b.", "c."]);
        // ...and applied when the next lookup says the same.
        d.accept_answer(vec![ep("a.", 1)]).await;
        assert_eq!(served(&pool), ["a."]);
        // Removing exactly half (1 of 2) is not "more than half": applied at once.
        d.accept_answer(vec![ep("a.", 1), ep("b.", 2)]).await;
        d.accept_answer(vec![ep("b.", 2)]).await;
        assert_eq!(served(&pool), ["b."]);
    }

    #[tokio::test]
    async fn damping_forgets_a_one_off_broken_answer() {
        let pool = Arc::new(Pool::new("svc", 1009));
        let mut d = discovery(&pool);
        let full = vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)];
        d.accept_answer(full.clone()).await;
        let generation = pool.snapshot().generation;
        d.accept_answer(vec![ep("c.", 3)]).await;
        // The full answer again, in another order: nothing changes, nothing drains.
        let mut reordered = full.clone();
        reordered.reverse();
        d.accept_answer(reordered).await;
        assert!(d.pending.is_none());
        assert_eq!(pool.snapshot().generation, generation);
        // A later broken answer must again wait for confirmation (the old one was forgotten).
        d.accept_answer(vec![ep("c.", 3)]).await;
        assert_eq!(served(&pool), ["a.", "b.", "c."]);
        assert!(
            pool.states()
                .iter()
                .all(|(_, _, _, s)| s.label() != "draining")
        );
    }

    #[tokio::test]
    async fn refresh_settings_from_a_reload_apply_from_the_next_refresh() {
        let pool = Arc::new(Pool::new("svc", 1009));
        let mut d = discovery(&pool);
        let (tx, rx) = watch::channel(d.settings.clone());
        d.settings_updates = rx;
        let found = || Answer::Found {
            endpoints: vec![ep("a.", 1)],
            ttl: 3600,
            unresolved: None,
        };
        let before = d.refresh("_x._tcp.test.", found()).await;
        assert!(within(before, 54_000, 60_000), "{before:?}");
        let mut next = d.settings.clone();
        next.max_refresh = Duration::from_secs(5);
        tx.send_replace(next);
        let after = d.refresh("_x._tcp.test.", found()).await;
        assert!(within(after, 4_500, 5_000), "{after:?}");
        assert_eq!(served(&pool), ["a."]);
    }

    #[test]
    fn only_nxdomain_and_nodata_mean_absent() {
        use hickory_resolver::net::NoRecords;
        use hickory_resolver::proto::op::Query;
        let no = |code| {
            NetError::Dns(DnsError::NoRecordsFound(NoRecords::new(
                Query::default(),
                code,
            )))
        };
        assert_eq!(absence(&no(ResponseCode::NXDomain)), Some("NXDOMAIN"));
        assert!(absence(&no(ResponseCode::NoError)).is_some());
        assert_eq!(absence(&no(ResponseCode::ServFail)), None);
        assert_eq!(
            absence(&NetError::Dns(DnsError::ResponseCode(
                ResponseCode::ServFail
            ))),
            None
        );
        assert_eq!(
            absence(&NetError::Dns(DnsError::ResponseCode(
                ResponseCode::Refused
            ))),
            None
        );
        assert_eq!(absence(&NetError::Timeout), None);
    }
}
