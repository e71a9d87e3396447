//! Finds a service's backends: SRV records (RFC 2782) resolved with hickory-resolver, targets
//! resolved to A/AAAA (from the additional section when present), static backends, refresh on
//! the records' TTL with jitter, and the rules that keep a flapping or failing registry from
//! emptying a pool. It feeds whole answers to `Pool::update`; it never touches connections.

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
use hickory_resolver::proto::rr::{RData, RecordType};
use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::watch;
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
}

impl DiscoveryStatus {
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

/// The outcome of one SRV lookup, classified the way the refresh rules need it.
#[derive(Debug)]
pub enum Answer {
    /// Records (possibly after resolving targets) and the smallest TTL among them.
    Found { endpoints: Vec<Endpoint>, ttl: u32 },
    /// NXDOMAIN, an empty answer, or the lone target "." (service deliberately absent).
    Absent(&'static str),
    /// Timeout, SERVFAIL, REFUSED, network error: says nothing about the service.
    Failed(String),
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
        Err(e) if e.is_nx_domain() => return Answer::Absent("NXDOMAIN"),
        Err(e) if e.is_no_records_found() => return Answer::Absent("no SRV records"),
        Err(e) => return Answer::Failed(e.to_string()),
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
    let mut endpoints = Vec::new();
    let mut addresses: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for srv in records.iter().filter(|s| !s.target.is_root()) {
        let target = srv.target.to_lowercase().to_string();
        if !addresses.contains_key(&target) {
            let mut from_additional = Vec::new();
            for record in lookup.additionals() {
                if record.name.to_lowercase() != srv.target.to_lowercase() {
                    continue;
                }
                match &record.data {
                    RData::A(a) => from_additional.push(IpAddr::V4(a.0)),
                    RData::AAAA(aaaa) => from_additional.push(IpAddr::V6(aaaa.0)),
                    _ => continue,
                }
                ttl = ttl.min(record.ttl);
            }
            let ips = if from_additional.is_empty() {
                match resolver.lookup_ip(srv.target.clone()).await {
                    Ok(found) => {
                        for record in found.as_lookup().answers() {
                            ttl = ttl.min(record.ttl);
                        }
                        found.iter().collect()
                    }
                    Err(e) if e.is_no_records_found() => {
                        debug!(target = %target, error = %e, "SRV target has no address");
                        Vec::new()
                    }
                    Err(e) => match known.get(&target) {
                        Some(previous) => previous.clone(),
                        None => return Answer::Failed(format!("resolving {target}: {e}")),
                    },
                }
            } else {
                from_additional
            };
            addresses.insert(target.clone(), ips);
        }
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
    if endpoints.is_empty() {
        return Answer::Absent("no SRV target has an address");
    }
    Answer::Found { endpoints, ttl }
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

/// Refresh interval from a TTL: clamped to `[min_refresh, max_refresh]`, then shortened by up
/// to 10% at random so that a fleet of instances does not query in lock-step.
pub fn refresh_interval<R: Rng + ?Sized>(
    ttl: u32,
    settings: &ResolverConfig,
    rng: &mut R,
) -> Duration {
    let clamped =
        Duration::from_secs(u64::from(ttl)).clamp(settings.min_refresh, settings.max_refresh);
    let jittered = clamped.mul_f64(rng.random_range(0.9..=1.0));
    jittered.max(settings.min_refresh)
}

/// Retry delay after the `failures`-th failed lookup in a row: doubling from min_refresh,
/// never above max_refresh.
pub fn failure_backoff(failures: u32, settings: &ResolverConfig) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    settings
        .min_refresh
        .saturating_mul(factor)
        .clamp(settings.min_refresh, settings.max_refresh)
}

/// The refresh loop of one service. Runs until `shutdown` flips to true.
pub struct Discovery {
    service: String,
    srv: Option<String>,
    statics: Vec<Endpoint>,
    resolver: Arc<TokioResolver>,
    settings: ResolverConfig,
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
}

impl Discovery {
    pub fn new(
        service: &ServiceConfig,
        resolver: Arc<TokioResolver>,
        settings: ResolverConfig,
        pool: Arc<Pool>,
        status: Arc<DiscoveryStatus>,
    ) -> Discovery {
        Discovery {
            service: service.name.clone(),
            srv: service.srv.clone(),
            statics: static_endpoints(&service.static_backends),
            resolver,
            settings,
            pool,
            status,
            known_addresses: HashMap::new(),
            current: Vec::new(),
            pending: None,
            absent_since: None,
            consecutive_failures: 0,
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.publish();
        let Some(srv) = self.srv.clone() else {
            // Static backends only: nothing to refresh.
            self.status.succeed();
            return;
        };
        loop {
            let delay = self.refresh(&srv).await;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One lookup and its consequences; returns when to look again.
    async fn refresh(&mut self, srv: &str) -> Duration {
        let answer = lookup_srv(&self.resolver, srv, &self.known_addresses).await;
        let mut rng = rand::rng();
        match answer {
            Answer::Found { endpoints, ttl } => {
                self.consecutive_failures = 0;
                if self.status.succeed() {
                    info!(service = %self.service, srv, backends = endpoints.len(), "DNS lookups recovered");
                }
                if self.absent_since.take().is_some() {
                    info!(service = %self.service, srv, "SRV records are back; empty hold cancelled");
                }
                self.remember_addresses(&endpoints);
                self.accept_answer(endpoints);
                refresh_interval(ttl, &self.settings, &mut rng)
            }
            Answer::Absent(why) => {
                self.consecutive_failures = 0;
                self.status.succeed();
                let since = *self.absent_since.get_or_insert_with(Instant::now);
                let held = since.elapsed();
                if held >= self.settings.empty_hold {
                    if !self.current.is_empty() {
                        warn!(service = %self.service, srv, reason = why, held_secs = held.as_secs(), "service absent from DNS; emptying its SRV backends");
                        self.current.clear();
                        self.pending = None;
                        self.publish();
                    }
                    return refresh_interval(0, &self.settings, &mut rng);
                }
                if !self.current.is_empty() {
                    warn!(service = %self.service, srv, reason = why, hold_secs = self.settings.empty_hold.as_secs(), "service absent from DNS; keeping the last backends during the hold");
                }
                let remaining = self.settings.empty_hold.saturating_sub(held);
                refresh_interval(0, &self.settings, &mut rng)
                    .min(remaining.max(Duration::from_millis(50)))
            }
            Answer::Failed(why) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let delay = failure_backoff(self.consecutive_failures, &self.settings);
                if self.status.fail(why.clone()) {
                    warn!(service = %self.service, srv, error = %why, backends = self.current.len(), retry_ms = delay.as_millis() as u64, "DNS lookup failed; serving the last known backends (stale)");
                } else {
                    debug!(service = %self.service, srv, error = %why, "DNS lookup failed again");
                }
                delay
            }
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
    fn accept_answer(&mut self, mut endpoints: Vec<Endpoint>) {
        endpoints.sort_by(|a, b| (&a.target, a.port, a.addr).cmp(&(&b.target, b.port, b.addr)));
        if endpoints == self.current {
            self.pending = None;
            return;
        }
        let removed = self
            .current
            .iter()
            .filter(|old| !endpoints.iter().any(|new| same_backend(old, new)))
            .count();
        if removed * 2 > self.current.len() && !self.current.is_empty() {
            if self.pending.as_ref() != Some(&endpoints) {
                warn!(service = %self.service, removed, of = self.current.len(), "answer would remove more than half of the backends; waiting for the next lookup to confirm");
                self.pending = Some(endpoints);
                return;
            }
            info!(service = %self.service, removed, "large removal confirmed by a second lookup");
        }
        self.pending = None;
        self.current = endpoints;
        self.publish();
    }

    fn publish(&mut self) {
        let mut all = self.current.clone();
        all.extend(self.statics.iter().cloned());
        match self.pool.update(&all) {
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

    fn settings() -> ResolverConfig {
        ResolverConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(60),
            empty_hold: Duration::from_secs(30),
        }
    }

    #[test]
    fn refresh_interval_clamps_and_jitters_down_at_most_ten_percent() {
        let s = settings();
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let d = refresh_interval(30, &s, &mut rng);
            assert!(
                d >= Duration::from_secs(27) && d <= Duration::from_secs(30),
                "{d:?}"
            );
            let low = refresh_interval(0, &s, &mut rng);
            assert_eq!(low, Duration::from_secs(1));
            let high = refresh_interval(86_400, &s, &mut rng);
            assert!(
                high >= Duration::from_secs(54) && high <= Duration::from_secs(60),
                "{high:?}"
            );
        }
        let spread: std::collections::HashSet<u128> = (0..100)
            .map(|_| refresh_interval(30, &s, &mut rng).as_millis())
            .collect();
        assert!(spread.len() > 10, "no jitter: {spread:?}");
    }

    #[test]
    fn failure_backoff_doubles_within_bounds() {
        let s = settings();
        let got: Vec<u64> = (1..=8).map(|n| failure_backoff(n, &s).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn statics_are_the_last_resort_tier() {
        let eps = static_endpoints(&["127.0.0.1:80".parse().expect("addr")]);
        assert_eq!(eps[0].priority, STATIC_PRIORITY);
        assert_eq!(eps[0].weight, 1);
    }
}
