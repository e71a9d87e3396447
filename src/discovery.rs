//! Finds a service's backends: SRV records (RFC 2782) resolved with hickory-resolver, targets
//! resolved to A/AAAA (from the additional section when present), static backends, refresh on
//! the records' TTL with jitter, and the rules that keep a flapping or failing registry from
//! emptying a pool. It feeds whole answers to `Pool::update`; it never touches connections.

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
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::{ResolverConfig, ServiceConfig};
use crate::health::now_ms;
use crate::pool::{Endpoint, Pool};

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

/// At most this many target address lookups of one refresh run at once: enough that a large
/// answer resolves in a few rounds, few enough not to flood the DNS server.
const TARGET_CONCURRENCY: usize = 16;

/// Targets that could not be resolved this round (SERVFAIL, timeout, the budget spent), as
/// counts for one log line per refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// Targets skipped this round: no address now and none from an earlier answer.
    pub skipped: usize,
    /// Targets served with their addresses from an earlier answer.
    pub kept: usize,
    /// Distinct targets in the answer.
    pub targets: usize,
    /// One of the errors, as an example.
    pub error: String,
}

/// The outcome of one SRV lookup, classified the way the refresh rules need it.
#[derive(Debug)]
pub enum Answer {
    /// Records (possibly after resolving targets) and the smallest TTL among them.
    /// `unresolved` is set when some targets failed transiently and were skipped or kept.
    Found {
        endpoints: Vec<Endpoint>,
        ttl: u32,
        unresolved: Option<Unresolved>,
    },
    /// NXDOMAIN, an empty answer, or the lone target "." (service deliberately absent).
    Absent(&'static str),
    /// Timeout, SERVFAIL, REFUSED, network error: says nothing about the service.
    Failed(String),
}

/// Says whether a lookup error is the server's authoritative "nothing here": NXDOMAIN, or
/// NOERROR with an empty answer (NODATA). Only those may (after the hold) empty a pool;
/// every other error (SERVFAIL, REFUSED, timeout, network) says nothing about the service.
fn absence(e: &NetError) -> Option<&'static str> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::NXDomain => Some("NXDOMAIN"),
            ResponseCode::NoError => Some("no SRV records (NODATA)"),
            _ => None,
        },
        _ => None,
    }
}

/// What the address lookup of one SRV target gave.
#[derive(Debug)]
enum TargetAddrs {
    /// Addresses and the smallest TTL among their records.
    Found(Vec<IpAddr>, u32),
    /// NXDOMAIN or NODATA: the target authoritatively has no address.
    None,
    /// SERVFAIL, timeout, network error, or no answer within the refresh's budget.
    Transient(String),
}

/// Resolves `targets` (lower-case key, name) concurrently, at most `TARGET_CONCURRENCY` at a
/// time, all within one budget of twice the resolver timeout: a refresh must not take
/// "targets x timeout" when the server is slow. A target still unanswered at the deadline
/// counts as a transient failure.
async fn resolve_targets(
    resolver: &TokioResolver,
    targets: Vec<(String, Name)>,
) -> HashMap<String, TargetAddrs> {
    let deadline = tokio::time::Instant::now() + resolver.options().timeout.saturating_mul(2);
    let keys: Vec<String> = targets.iter().map(|(key, _)| key.clone()).collect();
    let mut queue = targets.into_iter();
    let mut running = JoinSet::new();
    let mut results = HashMap::new();
    loop {
        while running.len() < TARGET_CONCURRENCY {
            let Some((key, name)) = queue.next() else {
                break;
            };
            // The resolver is a handle on shared state: cloning it is cheap.
            let resolver = resolver.clone();
            running.spawn(async move {
                let addrs = match resolver.lookup_ip(name).await {
                    Ok(found) => {
                        let ttl = found
                            .as_lookup()
                            .answers()
                            .iter()
                            .map(|r| r.ttl)
                            .min()
                            .unwrap_or(u32::MAX);
                        TargetAddrs::Found(found.iter().collect(), ttl)
                    }
                    Err(e) if absence(&e).is_some() => {
                        debug!(target = %key, error = %e, "SRV target has no address");
                        TargetAddrs::None
                    }
                    Err(e) => TargetAddrs::Transient(e.to_string()),
                };
                (key, addrs)
            });
        }
        match tokio::time::timeout_at(deadline, running.join_next()).await {
            Ok(Some(Ok((key, addrs)))) => {
                results.insert(key, addrs);
            }
            // A task that panicked: its target is reported unresolved below.
            Ok(Some(Err(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    // Dropping `running` aborts lookups still in flight at the deadline.
    for key in keys {
        results.entry(key).or_insert_with(|| {
            TargetAddrs::Transient("no answer within the refresh's lookup budget".to_owned())
        });
    }
    results
}

/// Performs one SRV lookup of `name` and resolves its targets. `known` holds the addresses
/// of targets from earlier answers, used when a target's own lookup fails transiently.
pub async fn lookup_srv(
    resolver: &TokioResolver,
    name: &str,
    known: &HashMap<String, Vec<IpAddr>>,
) -> Answer {
    let lookup = match resolver.lookup(absolute(name), RecordType::SRV).await {
        Ok(lookup) => lookup,
        Err(e) => match absence(&e) {
            Some(why) => return Answer::Absent(why),
            None => return Answer::Failed(e.to_string()),
        },
    };
    let mut ttl = u32::MAX;
    let mut records = Vec::new();
    for record in lookup.answers() {
        if let RData::SRV(srv) = &record.data {
            ttl = ttl.min(record.ttl);
            records.push(srv.clone());
        }
    }
    if records.is_empty() {
        return Answer::Absent("no SRV records");
    }
    if records.len() == 1 && records[0].target.is_root() {
        return Answer::Absent("target \".\" (service absent)");
    }
    // Addresses from the additional section first; the other targets get their own queries.
    // Indexed once, so a large answer costs one pass, not one pass per target.
    let mut additional: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let mut additional_ttl: HashMap<String, u32> = HashMap::new();
    for record in lookup.additionals() {
        let ip = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        let name = record.name.to_lowercase().to_string();
        let min_ttl = additional_ttl.entry(name.clone()).or_insert(u32::MAX);
        *min_ttl = (*min_ttl).min(record.ttl);
        additional.entry(name).or_default().push(ip);
    }
    let mut addresses: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let mut to_resolve: Vec<(String, Name)> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for srv in records.iter().filter(|s| !s.target.is_root()) {
        let target = srv.target.to_lowercase().to_string();
        if !seen.insert(target.clone()) {
            continue;
        }
        match additional.remove(&target) {
            Some(ips) => {
                ttl = ttl.min(additional_ttl.get(&target).copied().unwrap_or(u32::MAX));
                addresses.insert(target, ips);
            }
            None => to_resolve.push((target, srv.target.clone())),
        }
    }
    let targets = addresses.len() + to_resolve.len();
    let (mut skipped, mut kept, mut error) = (0, 0, None);
    for (target, addrs) in resolve_targets(resolver, to_resolve).await {
        let ips = match addrs {
            TargetAddrs::Found(ips, found_ttl) => {
                ttl = ttl.min(found_ttl);
                ips
            }
            // The target authoritatively has no address: it gives no backend (the damping
            // rule still guards against losing most of them at once).
            TargetAddrs::None => Vec::new(),
            // Says nothing about the target (a new registration's A record may not be
            // ready yet): keep what it had, or skip it this round, but never let it spoil
            // the rest of the answer.
            TargetAddrs::Transient(e) => {
                error.get_or_insert_with(|| format!("resolving {target}: {e}"));
                match known.get(&target) {
                    Some(previous) => {
                        kept += 1;
                        previous.clone()
                    }
                    None => {
                        skipped += 1;
                        Vec::new()
                    }
                }
            }
        };
        addresses.insert(target, ips);
    }
    let mut endpoints = Vec::new();
    for srv in records.iter().filter(|s| !s.target.is_root()) {
        let target = srv.target.to_lowercase().to_string();
        for ip in addresses.get(&target).into_iter().flatten() {
            endpoints.push(Endpoint {
                target: target.clone(),
                port: srv.port,
                addr: SocketAddr::new(*ip, srv.port),
                priority: srv.priority,
                weight: srv.weight,
            });
        }
    }
    let unresolved = error.map(|error| Unresolved {
        skipped,
        kept,
        targets,
        error,
    });
    if endpoints.is_empty() {
        // Nothing usable, and at least one target's lookup said nothing about it: that is
        // a failed lookup (keep the last set), not an authoritative "absent".
        return match unresolved {
            Some(u) => Answer::Failed(format!(
                "no SRV target could be resolved ({} of {} failed; {})",
                u.skipped, u.targets, u.error
            )),
            None => Answer::Absent("no SRV target has an address"),
        };
    }
    if unresolved.is_some() {
        // Look again soon (min_refresh) rather than after the SRV TTL: the skipped targets
        // are probably only a moment away.
        ttl = 0;
    }
    Answer::Found {
        endpoints,
        ttl,
        unresolved,
    }
}

fn absolute(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
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

/// Refresh interval from a TTL: clamped to `[min_refresh, max_refresh]`, then moved by up to
/// 10% at random so that a fleet of instances does not query in lock-step.
pub fn refresh_interval<R: Rng + ?Sized>(
    ttl: u32,
    settings: &ResolverConfig,
    rng: &mut R,
) -> Duration {
    let clamped =
        Duration::from_secs(u64::from(ttl)).clamp(settings.min_refresh, settings.max_refresh);
    jitter(clamped, settings, rng)
}

/// Retry delay after the `failures`-th failed lookup in a row: doubling from min_refresh,
/// never above max_refresh, jittered like refreshes (a fleet that lost its DNS server
/// together must not come back in lock-step).
pub fn failure_backoff<R: Rng + ?Sized>(
    failures: u32,
    settings: &ResolverConfig,
    rng: &mut R,
) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    let base = settings
        .min_refresh
        .saturating_mul(factor)
        .clamp(settings.min_refresh, settings.max_refresh);
    jitter(base, settings, rng)
}

/// Moves `base` (already within the bounds) by up to 10% without leaving
/// `[min_refresh, max_refresh]`: shorter when there is room above min_refresh, otherwise
/// longer. The common case of short TTLs clamped up to min_refresh therefore still spreads
/// a fleet's queries instead of putting them all exactly min_refresh apart.
fn jitter<R: Rng + ?Sized>(base: Duration, settings: &ResolverConfig, rng: &mut R) -> Duration {
    let span = base / 10;
    let (low, high) = if base.saturating_sub(span) >= settings.min_refresh {
        (base - span, base)
    } else {
        (base, (base + span).min(settings.max_refresh))
    };
    if high <= low {
        return low;
    }
    low + (high - low).mul_f64(rng.random_range(0.0..=1.0))
}

/// How often discovery looks at which tier new connections would use. Tier switches happen
/// at selection time (health ejects a whole tier), not on DNS refreshes, so they are
/// sampled; one snapshot load and a scan of the backends' atomics per second is cheap.
const TIER_CHECK: Duration = Duration::from_secs(1);
/// At most one tier-switch line per service this often; a flapping tier is summarised by
/// the `switches` count of the next line instead of one line per flip.
const TIER_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Detects and logs (rate-limited) changes of the tier new connections use.
#[derive(Debug, Default)]
struct TierWatch {
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
struct TierSwitch {
    from: Option<u16>,
    to: Option<u16>,
    /// Away from the preferred tier (the alarming direction).
    fallback: bool,
    usable: usize,
    in_tier: usize,
    switches: u32,
}

impl TierWatch {
    fn check(&mut self, service: &str, pool: &Pool) {
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
        if switch.fallback {
            warn!(service, from_priority = %from, to_priority = %to, usable, backends, switches, "tier switch: preferred tier has no usable backend");
        } else {
            info!(service, from_priority = %from, to_priority = %to, usable, backends, switches, "tier switch: traffic returns to a preferred tier");
        }
    }

    /// Compares the tier in use with the one last reported; returns a switch to report
    /// (at most one per TIER_LOG_INTERVAL; flips in between are counted).
    fn observe(&mut self, pool: &Pool) -> Option<TierSwitch> {
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
        let (usable, in_tier) = active
            .and_then(|p| snapshot.tiers.iter().find(|t| t.priority == p))
            .map(|t| {
                let usable = t
                    .backends
                    .iter()
                    .filter(|b| b.health.is_available(now))
                    .count();
                (usable, t.backends.len())
            })
            .unwrap_or((0, 0));
        // Falling back (to a larger priority value, to none, or from none to a tier that is
        // not the preferred one) is the alarming direction.
        let preferred = snapshot.tiers.first().map(|t| t.priority);
        let fallback = match (logged, active) {
            (Some(old), Some(new)) => new > old,
            (Some(_), None) => true,
            (None, Some(new)) => Some(new) != preferred,
            (None, None) => false,
        };
        let switch = TierSwitch {
            from: logged,
            to: active,
            fallback,
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
    use super::*;

    #[test]
    fn tier_watch_takes_no_baseline_from_an_empty_pool_and_reports_failover() {
        let pool = Pool::new("svc", 1009);
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
            .record_failure(now_ms(), &policy, || true);
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
        assert_eq!((switch.from, switch.to), (None, Some(20)));
        assert!(
            switch.fallback,
            "from none to a backup tier is a failover: {switch:?}"
        );
    }

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
    fn refresh_interval_clamps_and_jitters_at_most_ten_percent() {
        let s = settings();
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let d = refresh_interval(30, &s, &mut rng);
            assert!(within(d, 27_000, 30_000), "{d:?}");
            // Below min_refresh: clamped up, jittered upwards (never faster than min_refresh).
            let low = refresh_interval(0, &s, &mut rng);
            assert!(within(low, 1_000, 1_100), "{low:?}");
            let high = refresh_interval(86_400, &s, &mut rng);
            assert!(within(high, 54_000, 60_000), "{high:?}");
        }
        for ttl in [0, 30] {
            let spread: std::collections::HashSet<u128> = (0..100)
                .map(|_| refresh_interval(ttl, &s, &mut rng).as_millis())
                .collect();
            assert!(spread.len() > 10, "no jitter at ttl {ttl}: {spread:?}");
        }
        // min_refresh == max_refresh leaves no room: exactly that interval.
        let mut fixed = settings();
        fixed.max_refresh = fixed.min_refresh;
        assert_eq!(refresh_interval(30, &fixed, &mut rng), fixed.min_refresh);
    }

    #[test]
    fn failure_backoff_doubles_within_bounds() {
        let s = settings();
        let mut rng = rand::rng();
        for _ in 0..200 {
            let got: Vec<Duration> = (1..=8).map(|n| failure_backoff(n, &s, &mut rng)).collect();
            let want = [1, 2, 4, 8, 16, 32, 60, 60];
            for (d, w) in got.iter().zip(want) {
                let w = w * 1000;
                // Never faster than min_refresh, never slower than max_refresh, within 10% of
                // the doubled delay.
                assert!(within(*d, w * 9 / 10, (w * 11 / 10).min(60_000)), "{got:?}");
                assert!(within(*d, 1_000, 60_000), "{got:?}");
            }
        }
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
