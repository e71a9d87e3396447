//! One SRV lookup (RFC 2782) with hickory-resolver and the address lookups of its targets
//! (the additional section first, then concurrent A/AAAA queries within one budget),
//! classified the way the refresh rules need it: found, absent, failed. No scheduling here.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use tokio::task::JoinSet;
use tracing::debug;

use crate::pool::Endpoint;

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
pub(crate) fn absence(e: &NetError) -> Option<&'static str> {
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
