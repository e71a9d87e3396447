//! Finds a service's backends: SRV records (RFC 2782) resolved with hickory-resolver, targets
//! resolved to A/AAAA (from the additional section when present), static backends, refresh on
//! the records' TTL with jitter, and the rules that keep a flapping or failing registry from
//! emptying a pool. It feeds whole answers to `Pool::update`; it never touches connections.
//!
//! `lookup` does the DNS queries (`probe` tells a refused query from a slow one), `schedule`
//! decides when to look again, `damping` judges large removals, `tiers` logs tier switches;
//! this file runs the per-service loop: the SRV records on their TTL, each target's
//! addresses on theirs.

mod damping;
mod lookup;
mod probe;
mod schedule;
mod tiers;

use std::collections::{HashMap, HashSet};
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

use crate::config::{AddressFamily, ResolverConfig, ServiceConfig};
use crate::health::now_ms;
use crate::pool::{BackendKey, Endpoint, Pool};

use damping::Verdict;
pub use lookup::{Answer, Unresolved, lookup_srv};
use lookup::{SrvOutcome, SrvRecord, TargetAddrs};
pub use schedule::{absent_backoff, failure_backoff, refresh_after, refresh_interval};
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
    // `family = "ipv4"` neither asks for AAAA nor tries IPv6 addresses (and the reverse).
    opts.ip_strategy = match settings.family {
        AddressFamily::Any => LookupIpStrategy::Ipv4AndIpv6,
        AddressFamily::Ipv4 => LookupIpStrategy::Ipv4Only,
        AddressFamily::Ipv6 => LookupIpStrategy::Ipv6Only,
    };
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
    /// Set while DNS says the service is absent (NXDOMAIN, NODATA, lone "."): the empty
    /// hold, and after it the emptied pool. Cleared when records are back.
    pub absence: Mutex<Option<Absence>>,
}

/// The registry's "absent" answer and the empty hold it started, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Absence {
    /// The answer that started it: "NXDOMAIN", "no SRV records (NODATA)", ...
    pub reason: String,
    /// Wall-clock time (ms since the Unix epoch) of the first absent answer.
    pub since_unix_ms: u64,
    /// When the hold ends and the SRV backends are removed (same clock).
    pub until_unix_ms: u64,
    /// The hold has elapsed and the pool's SRV backends were removed.
    pub emptied: bool,
}

impl Absence {
    /// True while the old backends still serve and the hold has not elapsed.
    pub fn in_hold(&self) -> bool {
        !self.emptied
    }

    /// Milliseconds left in the hold (0 once elapsed).
    pub fn remaining_ms(&self) -> u64 {
        if self.emptied {
            0
        } else {
            self.until_unix_ms.saturating_sub(unix_ms())
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch, for times shown to operators.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The servers the refusal probe asks: the configured ones, or the system's.
fn probe_servers(settings: &ResolverConfig) -> Vec<SocketAddr> {
    if !settings.nameservers.is_empty() {
        return settings.nameservers.clone();
    }
    match hickory_resolver::system_conf::read_system_conf() {
        Ok((config, _)) => config
            .name_servers()
            .iter()
            .filter_map(|ns| {
                let port = ns.connections.first().map(|c| c.port)?;
                Some(SocketAddr::new(ns.ip, port))
            })
            .collect(),
        Err(_) => Vec::new(),
    }
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

/// What the refresh loop knows of one SRV target's addresses, refreshed on their own TTL.
#[derive(Debug, Clone)]
struct TargetState {
    addrs: Vec<IpAddr>,
    /// When to resolve the target again.
    due: Instant,
    /// TTL of the previous answer, for `refresh_after`.
    ttl: u32,
    /// Transient failures (or authoritative "no address") in a row: the back-off exponent.
    failures: u32,
    /// The last lookup failed transiently (the addresses, if any, are from before).
    error: Option<String>,
}

/// The registry's "absent" as the loop tracks it.
#[derive(Debug, Clone, Copy)]
struct AbsentState {
    since: Instant,
    rounds: u32,
    emptied: bool,
}

/// Answer sets above this size are compared on a blocking thread, not on a runtime worker.
const COMPARE_INLINE_MAX: usize = 512;

/// The refresh loop of one service. Runs until `shutdown` flips to true.
pub struct Discovery {
    service: String,
    srv: Option<String>,
    statics: Vec<Endpoint>,
    resolver: Arc<TokioResolver>,
    /// Servers the refusal probe asks (see `probe`).
    nameservers: Vec<SocketAddr>,
    /// The refresh settings in use: taken from `settings_updates` at each refresh.
    settings: ResolverConfig,
    /// A reload that changes only min_refresh, max_refresh or empty_hold sends them here
    /// instead of restarting discovery (which would throw away the pool's state).
    settings_updates: watch::Receiver<ResolverConfig>,
    pool: Arc<Pool>,
    status: Arc<DiscoveryStatus>,
    /// The SRV records of the last answer that had some (within the caps).
    records: Vec<SrvRecord>,
    /// Addresses of the records' targets, each on its own TTL.
    targets: HashMap<String, TargetState>,
    /// TTL of the previous SRV answer, for `refresh_after`.
    srv_ttl: u32,
    /// When the SRV records are looked up next.
    srv_due: Instant,
    /// Negative TTL of the latest absent answer.
    negative_ttl: Option<u32>,
    /// The SRV part of the set the pool serves (sorted), confirmed.
    current: Arc<Vec<Endpoint>>,
    /// An answer that would remove more than half of the backends, waiting for confirmation;
    /// its additions are already served.
    pending: Option<Arc<Vec<Endpoint>>>,
    /// Since when the registry has said "absent" (NXDOMAIN / empty / ".").
    absent: Option<AbsentState>,
    consecutive_failures: u32,
    /// Whether any lookup has answered yet (start-up failures get their own log line).
    answered: bool,
    /// (skipped, kept, targets) of the last answer with unresolved targets, for logging.
    unresolved_counts: Option<(usize, usize, usize)>,
    tier_watch: TierWatch,
    /// SRV records the last answer lost to the caps (logged when it changes).
    trimmed: usize,
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
            nameservers: probe_servers(&settings),
            settings,
            settings_updates,
            pool,
            status,
            records: Vec::new(),
            targets: HashMap::new(),
            srv_ttl: 0,
            srv_due: Instant::now(),
            negative_ttl: None,
            current: Arc::new(Vec::new()),
            pending: None,
            absent: None,
            consecutive_failures: 0,
            answered: false,
            unresolved_counts: None,
            tier_watch: TierWatch::default(),
            trimmed: 0,
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.publish(&[]).await;
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
            // The lookups are the long part of a round (up to the SRV timeout plus the
            // targets' budget): they run under the same select, so a retired service's task
            // ends at once instead of finishing a refresh nobody wants.
            let srv_round = Instant::now() >= self.srv_due;
            let outcome = {
                let due: HashMap<String, Instant> = self
                    .targets
                    .iter()
                    .map(|(t, s)| (t.clone(), s.due))
                    .collect();
                let round = lookups(
                    Arc::clone(&self.resolver),
                    srv.clone(),
                    self.nameservers.clone(),
                    // While DNS says the service is absent, its old targets are not looked
                    // after: the hold alone decides what happens to their backends.
                    if srv_round || self.absent.is_some() {
                        Vec::new()
                    } else {
                        self.records.clone()
                    },
                    due,
                    srv_round,
                );
                tokio::pin!(round);
                loop {
                    tokio::select! {
                        outcome = &mut round => break outcome,
                        _ = tier_tick.tick() => self.tier_watch.check(&self.service, &self.pool),
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                }
            };
            if let Some(answer) = self.apply_lookups(outcome) {
                let delay = self.refresh(&srv, answer, srv_round).await;
                if srv_round {
                    self.srv_due = Instant::now() + delay;
                }
            }
            self.status.first_outcome_applied();
            let wake = self.next_wake();
            let next = tokio::time::sleep_until(wake.into());
            tokio::pin!(next);
            let mut settings_live = true;
            loop {
                tokio::select! {
                    _ = &mut next => break,
                    _ = tier_tick.tick() => self.tier_watch.check(&self.service, &self.pool),
                    // A reload changed the refresh settings: look again now, so a shorter
                    // max_refresh or empty_hold does not wait out the old, longer interval.
                    changed = self.settings_updates.changed(), if settings_live => match changed {
                        Ok(()) => {
                            self.srv_due = Instant::now();
                            break;
                        }
                        Err(_) => settings_live = false, // the service is gone; shutdown follows
                    },
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        }
    }

    /// When the loop has something to do next: the SRV refresh, or a target's addresses.
    fn next_wake(&self) -> Instant {
        let mut wake = self.srv_due;
        if self.absent.is_some() {
            return wake;
        }
        for record in &self.records {
            if let Some(t) = self.targets.get(&record.target) {
                wake = wake.min(t.due);
            }
        }
        wake
    }

    /// Folds a round's results into the records and target states; returns the answer to
    /// act on, or `None` when an address-only round changed nothing.
    fn apply_lookups(&mut self, lookups: Lookups) -> Option<Answer> {
        let now = Instant::now();
        let mut srv_ttl = None;
        match lookups.srv {
            Some(SrvOutcome::Records {
                records,
                ttl,
                additional,
                trimmed,
            }) => {
                if trimmed != self.trimmed {
                    self.trimmed = trimmed;
                    if trimmed > 0 {
                        warn!(service = %self.service, left_out = trimmed, max_backends = crate::pool::MAX_BACKENDS, max_tiers = crate::pool::MAX_TIERS, "SRV answer too large; keeping only the preferred priorities and records");
                    }
                }
                for (target, (addrs, ttl)) in additional {
                    let previous = self.targets.get(&target).map_or(ttl, |t| t.ttl);
                    let delay = refresh_after(ttl, previous, &self.settings, &mut rand::rng());
                    self.targets.insert(
                        target,
                        TargetState {
                            addrs,
                            due: now + delay,
                            ttl,
                            failures: 0,
                            error: None,
                        },
                    );
                }
                self.records = records;
                let wanted: HashSet<&str> =
                    self.records.iter().map(|r| r.target.as_str()).collect();
                self.targets.retain(|t, _| wanted.contains(t.as_str()));
                srv_ttl = Some(ttl);
            }
            Some(SrvOutcome::Absent { why, negative_ttl }) => {
                self.negative_ttl = negative_ttl;
                return Some(Answer::Absent(why));
            }
            Some(SrvOutcome::Failed(why)) => return Some(Answer::Failed(why)),
            None => {}
        }
        let mut changed = false;
        let address_round = srv_ttl.is_none();
        for (target, result) in lookups.resolved {
            let old = self.targets.get(&target).cloned();
            // A target that loses every address between two SRV lookups is judged together
            // with the SRV records, as when both are looked up in one round: the whole
            // name may be going away (NXDOMAIN for everything is the empty hold's case,
            // not one target's removal). Look at both again now.
            if address_round
                && matches!(result, TargetAddrs::None(_))
                && let Some(mut kept) = old.clone().filter(|o| !o.addrs.is_empty())
            {
                kept.due = now;
                self.targets.insert(target, kept);
                self.srv_due = now;
                continue;
            }
            let state = self.next_target_state(old.as_ref(), result, now);
            changed |= old.as_ref().is_none_or(|o| {
                o.addrs != state.addrs || o.error.is_some() != state.error.is_some()
            });
            self.targets.insert(target, state);
        }
        if srv_ttl.is_none() && !changed {
            return None;
        }
        Some(self.assemble(srv_ttl.unwrap_or(u32::MAX)))
    }

    /// A target's state after one lookup of its addresses.
    fn next_target_state(
        &self,
        old: Option<&TargetState>,
        result: TargetAddrs,
        now: Instant,
    ) -> TargetState {
        let rng = &mut rand::rng();
        let failures = old.map_or(0, |o| o.failures).saturating_add(1);
        match result {
            TargetAddrs::Found(addrs, ttl) => {
                let previous = old.map_or(ttl, |o| o.ttl);
                TargetState {
                    addrs,
                    due: now + refresh_after(ttl, previous, &self.settings, rng),
                    ttl,
                    failures: 0,
                    error: None,
                }
            }
            // Authoritatively no address: none until it has one; look again with back-off.
            TargetAddrs::None(negative_ttl) => TargetState {
                addrs: Vec::new(),
                due: now + absent_backoff(failures, negative_ttl, &self.settings, rng),
                ttl: negative_ttl.unwrap_or(0),
                failures,
                error: None,
            },
            // Says nothing about the target (a new registration's A record may not be ready
            // yet): keep what it had, and retry with back-off rather than every min_refresh.
            TargetAddrs::Transient(e) => TargetState {
                addrs: old.map(|o| o.addrs.clone()).unwrap_or_default(),
                due: now + failure_backoff(failures, &self.settings, rng),
                ttl: old.map_or(0, |o| o.ttl),
                failures,
                error: Some(e),
            },
        }
    }

    /// The answer the records and the targets' addresses give now.
    fn assemble(&self, ttl: u32) -> Answer {
        let addresses: HashMap<String, Vec<IpAddr>> = self
            .targets
            .iter()
            .map(|(t, s)| (t.clone(), s.addrs.clone()))
            .collect();
        let endpoints = lookup::endpoints(&self.records, &addresses);
        let mut targets = 0;
        let (mut skipped, mut kept, mut error) = (0, 0, None);
        let mut seen = HashSet::new();
        for record in self
            .records
            .iter()
            .filter(|r| seen.insert(r.target.as_str()))
        {
            targets += 1;
            if let Some(TargetState {
                error: Some(e),
                addrs,
                ..
            }) = self.targets.get(&record.target)
            {
                error.get_or_insert_with(|| format!("resolving {}: {e}", record.target));
                if addrs.is_empty() {
                    skipped += 1;
                } else {
                    kept += 1;
                }
            }
        }
        let unresolved = error.map(|error| Unresolved {
            skipped,
            kept,
            targets,
            error,
        });
        lookup::answer(endpoints, ttl, unresolved)
    }

    /// The consequences of one answer; returns when to look at the SRV records again.
    /// `srv_round` is false when only target addresses were looked up: a set assembled
    /// from them says nothing about the SRV lookup (staleness, the empty hold).
    async fn refresh(&mut self, srv: &str, answer: Answer, srv_round: bool) -> Duration {
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
                if !srv_round {
                    self.accept_answer(endpoints).await;
                    return Duration::ZERO;
                }
                self.answered = true;
                self.consecutive_failures = 0;
                if self.status.succeed() {
                    info!(service = %self.service, srv, backends = endpoints.len(), "DNS lookups recovered");
                }
                let was_absent = self.absent.take();
                if let Some(absent) = was_absent {
                    if absent.emptied {
                        info!(service = %self.service, srv, backends = endpoints.len(), absent_ms = absent.since.elapsed().as_millis() as u64, "SRV records are back; restoring the backends the empty hold had removed");
                    } else {
                        info!(service = %self.service, srv, backends = endpoints.len(), "SRV records are back; empty hold cancelled");
                    }
                }
                self.accept_answer(endpoints).await;
                // Only now that the pool holds the answer: /status must not say the hold is
                // over while clients would still find no backend.
                if was_absent.is_some() {
                    *self.status.absence.lock() = None;
                }
                let previous = std::mem::replace(&mut self.srv_ttl, ttl);
                refresh_after(ttl, previous, &self.settings, &mut rand::rng())
            }
            Answer::Absent(why) => {
                self.answered = true;
                self.consecutive_failures = 0;
                if self.status.succeed() {
                    info!(service = %self.service, srv, reason = why, "DNS lookups recovered");
                }
                let hold = self.settings.empty_hold;
                let serving = !self.current.is_empty() || self.pending.is_some();
                let absent = match &mut self.absent {
                    Some(absent) => {
                        absent.rounds = absent.rounds.saturating_add(1);
                        *absent
                    }
                    None => {
                        let absent = AbsentState {
                            since: Instant::now(),
                            rounds: 1,
                            emptied: !serving,
                        };
                        self.absent = Some(absent);
                        let since_unix_ms = unix_ms();
                        let hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
                        *self.status.absence.lock() = Some(Absence {
                            reason: why.to_owned(),
                            since_unix_ms,
                            until_unix_ms: since_unix_ms.saturating_add(hold_ms),
                            emptied: !serving,
                        });
                        if serving {
                            warn!(service = %self.service, srv, reason = why, backends = self.current.len(), hold_ms, "service absent from DNS; keeping the last backends during the hold");
                        } else {
                            warn!(service = %self.service, srv, reason = why, "service absent from DNS; no SRV backends");
                        }
                        absent
                    }
                };
                let delay = absent_backoff(
                    absent.rounds,
                    self.negative_ttl.take(),
                    &self.settings,
                    &mut rand::rng(),
                );
                let held = absent.since.elapsed();
                if held >= hold {
                    if !absent.emptied {
                        warn!(service = %self.service, srv, reason = why, held_ms = held.as_millis() as u64, backends = self.current.len(), "empty hold elapsed; removing the service's SRV backends");
                        self.current = Arc::new(Vec::new());
                        self.pending = None;
                        self.records.clear();
                        self.targets.clear();
                        self.publish(&[]).await;
                        if let Some(a) = &mut self.absent {
                            a.emptied = true;
                        }
                        if let Some(a) = self.status.absence.lock().as_mut() {
                            a.emptied = true;
                        }
                    }
                    return delay;
                }
                // Back off, but look again no later than the end of the hold, so that the
                // pool empties on time.
                let remaining = hold.saturating_sub(held);
                delay.min(remaining.max(Duration::from_millis(50)))
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

    /// Applies a new answer. Additions and small removals apply at once; an answer that
    /// would remove more than half of the backends has its additions served at once while
    /// the backends it removes stay in service (flagged, so retries avoid them) until the
    /// next lookup confirms the removal. The comparison of a large answer runs on a
    /// blocking thread, never on a runtime worker that also proxies.
    async fn accept_answer(&mut self, endpoints: Vec<Endpoint>) {
        let current = Arc::clone(&self.current);
        let pending = self.pending.clone();
        let large = endpoints.len() > COMPARE_INLINE_MAX;
        let judge = move || {
            let (mut endpoints, _) = crate::pool::trim_to_caps(endpoints);
            endpoints.sort_by(|a, b| (&a.target, a.port, a.addr).cmp(&(&b.target, b.port, b.addr)));
            let verdict = damping::judge(
                &current,
                pending.as_deref().map(|p| p.as_slice()),
                &endpoints,
            );
            (endpoints, verdict)
        };
        let (endpoints, verdict) = if large {
            match tokio::task::spawn_blocking(judge).await {
                Ok(judged) => judged,
                Err(e) => {
                    warn!(service = %self.service, error = %e, "comparing the answer failed; keeping the previous set");
                    return;
                }
            }
        } else {
            judge()
        };
        match verdict {
            Verdict::Same { dropped_pending } => {
                if dropped_pending {
                    self.pending = None;
                    info!(service = %self.service, backends = endpoints.len(), "damping: the large removal was not confirmed; nothing removed");
                    self.publish(&[]).await;
                }
            }
            Verdict::Apply { confirmed } => {
                if let Some((removed, of)) = confirmed {
                    info!(service = %self.service, removed, of, "damping: large removal confirmed by a second lookup; applying it");
                }
                self.pending = None;
                self.current = Arc::new(endpoints);
                self.publish(&[]).await;
            }
            Verdict::Hold { held, removed, of } => {
                let added = (endpoints.len() + held.len()).saturating_sub(self.current.len());
                warn!(service = %self.service, removed, of, added, "damping: answer would remove more than half of the backends; new backends serve at once, the removal waits for the next lookup to confirm");
                let next = Arc::new(endpoints);
                self.pending = Some(Arc::clone(&next));
                self.publish_with(&next, &held).await;
            }
        }
    }

    /// Publishes the confirmed set plus `held` backends (removal pending).
    async fn publish(&mut self, held: &[Endpoint]) {
        let current = Arc::clone(&self.current);
        self.publish_with(&current, held).await;
    }

    async fn publish_with(&mut self, set: &[Endpoint], held: &[Endpoint]) {
        let mut all = set.to_vec();
        all.extend(held.iter().cloned());
        all.extend(self.statics.iter().cloned());
        let result = self.pool.update_off_runtime(all).await;
        let pending: HashSet<BackendKey> = held
            .iter()
            .map(|ep| BackendKey {
                target: Arc::from(ep.target.as_str()),
                port: ep.port,
                addr: ep.addr,
            })
            .collect();
        self.pool.mark_removal_pending(&pending);
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
                removal_pending = held.len(),
                "backends changed"
            ),
            Ok(_) => {}
            Err(e) => {
                warn!(service = %self.service, error = %e, "cannot publish backends; keeping the previous set")
            }
        }
    }
}

/// One round of queries: the SRV records when `srv_round`, then the targets that are new
/// or due (`due`: when each known target is due) and whose addresses did not come in the
/// additional section. Without an SRV round, the targets of `records` are considered.
async fn lookups(
    resolver: Arc<TokioResolver>,
    srv: String,
    nameservers: Vec<SocketAddr>,
    records: Vec<SrvRecord>,
    due: HashMap<String, Instant>,
    srv_round: bool,
) -> Lookups {
    let srv_outcome = if srv_round {
        Some(lookup::query_srv(&resolver, &srv, &nameservers).await)
    } else {
        None
    };
    let now = Instant::now();
    let (records, additional): (&[SrvRecord], Option<&lookup::Additional>) = match &srv_outcome {
        Some(SrvOutcome::Records {
            records,
            additional,
            ..
        }) => (records, Some(additional)),
        Some(_) => (&[], None),
        None => (&records, None),
    };
    // A little slack groups targets that fall due together into one round.
    let slack = Duration::from_millis(50);
    let mut seen = HashSet::new();
    let to_resolve: Vec<(String, hickory_resolver::proto::rr::Name)> = records
        .iter()
        .filter(|r| seen.insert(r.target.as_str()))
        .filter(|r| !additional.is_some_and(|a| a.contains_key(&r.target)))
        .filter(|r| due.get(&r.target).is_none_or(|d| *d <= now + slack))
        .map(|r| (r.target.clone(), r.name.clone()))
        .collect();
    let resolved = if to_resolve.is_empty() {
        HashMap::new()
    } else {
        lookup::resolve_targets(&resolver, to_resolve).await
    };
    Lookups {
        srv: srv_outcome,
        resolved,
    }
}

/// The results of one round of queries.
struct Lookups {
    /// `None` when only target addresses were due.
    srv: Option<SrvOutcome>,
    resolved: HashMap<String, TargetAddrs>,
}

#[cfg(test)]
mod tests {
    use super::lookup::absence;
    use super::*;
    use crate::balance::Selection;
    use hickory_resolver::net::DnsError;
    use hickory_resolver::proto::op::ResponseCode;

    fn settings() -> ResolverConfig {
        ResolverConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(60),
            empty_hold: Duration::from_secs(30),
            family: AddressFamily::Any,
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
        let config = crate::config::Config::parse(
            "[[service]]\nname = \"svc\"\nlisten = [\"127.0.0.1:1\"]\nsrv = \"_x._tcp.test.\"\n",
            "t.toml",
        )
        .expect("config");
        let service = &config.services[0];
        Discovery::new(
            service,
            resolver,
            watch::channel(cfg).1,
            Arc::clone(pool),
            Arc::new(DiscoveryStatus::default()),
        )
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
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
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
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
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
                .all(|st| st.state.label() != "draining")
        );
    }

    #[tokio::test]
    async fn a_rollout_serves_the_new_backends_from_the_first_answer() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        d.accept_answer(vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)])
            .await;
        let rollout = vec![ep("d.", 4), ep("e.", 5), ep("f.", 6)];
        d.accept_answer(rollout.clone()).await;
        // New pods serve at once; the old ones stay, flagged, until confirmed.
        assert_eq!(served(&pool), ["a.", "b.", "c.", "d.", "e.", "f."]);
        let pending: Vec<String> = pool
            .snapshot()
            .iter()
            .filter(|(_, b)| b.is_removal_pending())
            .map(|(_, b)| b.key.target.to_string())
            .collect();
        assert_eq!(pending, ["a.", "b.", "c."]);
        d.accept_answer(rollout).await;
        assert_eq!(served(&pool), ["d.", "e.", "f."]);
        assert!(pool.snapshot().iter().all(|(_, b)| !b.is_removal_pending()));
    }

    #[tokio::test]
    async fn a_broken_answer_with_an_addition_is_undone_when_not_confirmed() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        let full = vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)];
        d.accept_answer(full.clone()).await;
        d.accept_answer(vec![ep("c.", 3), ep("x.", 9)]).await;
        assert_eq!(served(&pool), ["a.", "b.", "c.", "x."]);
        d.accept_answer(full).await;
        assert_eq!(served(&pool), ["a.", "b.", "c."]);
        assert!(pool.snapshot().iter().all(|(_, b)| !b.is_removal_pending()));
    }

    #[tokio::test]
    async fn the_empty_hold_is_visible_while_it_lasts_and_after_it_empties() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        d.settings.empty_hold = Duration::from_millis(300);
        d.settings_updates = watch::channel(d.settings.clone()).1;
        let found = || Answer::Found {
            endpoints: vec![ep("a.", 1)],
            ttl: 5,
            unresolved: None,
        };
        d.refresh("_x._tcp.test.", found(), true).await;
        assert!(d.status.absence.lock().is_none());
        let before = unix_ms();
        let delay = d
            .refresh("_x._tcp.test.", Answer::Absent("NXDOMAIN"), true)
            .await;
        assert!(delay <= Duration::from_millis(300), "{delay:?}");
        let hold = d.status.absence.lock().clone().expect("in hold");
        assert!(hold.in_hold() && hold.reason == "NXDOMAIN", "{hold:?}");
        assert!(hold.since_unix_ms >= before);
        assert_eq!(hold.until_unix_ms, hold.since_unix_ms + 300);
        assert_eq!(served(&pool), ["a."], "the hold keeps serving");
        tokio::time::sleep(Duration::from_millis(350)).await;
        // Past the hold, absent again: emptied, with growing back-off.
        let first = d
            .refresh("_x._tcp.test.", Answer::Absent("NXDOMAIN"), true)
            .await;
        assert!(served(&pool).is_empty());
        let hold = d.status.absence.lock().clone().expect("still absent");
        assert!(hold.emptied && !hold.in_hold() && hold.remaining_ms() == 0);
        let mut later = first;
        for _ in 0..5 {
            later = d
                .refresh("_x._tcp.test.", Answer::Absent("NXDOMAIN"), true)
                .await;
        }
        assert!(
            later >= Duration::from_secs(16),
            "no back-off: {first:?} then {later:?}"
        );
        d.refresh("_x._tcp.test.", found(), true).await;
        assert!(d.status.absence.lock().is_none());
        assert_eq!(served(&pool), ["a."]);
    }

    #[tokio::test]
    async fn refresh_settings_from_a_reload_apply_from_the_next_refresh() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        let (tx, rx) = watch::channel(d.settings.clone());
        d.settings_updates = rx;
        let found = || Answer::Found {
            endpoints: vec![ep("a.", 1)],
            ttl: 3600,
            unresolved: None,
        };
        let before = d.refresh("_x._tcp.test.", found(), true).await;
        assert!(within(before, 54_000, 60_000), "{before:?}");
        let mut next = d.settings.clone();
        next.max_refresh = Duration::from_secs(5);
        tx.send_replace(next);
        let after = d.refresh("_x._tcp.test.", found(), true).await;
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
