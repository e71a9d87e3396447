//! One SRV lookup (RFC 2782) with hickory-resolver and the address lookups of its targets
//! (the additional section first, then concurrent A/AAAA queries within one budget),
//! classified the way the refresh rules need it: found, absent, failed. No scheduling here;
//! the refresh loop decides which targets to resolve and when.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::LookupIpStrategy;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::task::JoinSet;
use tracing::debug;

use super::probe;
use crate::pool::{Endpoint, MAX_BACKENDS, MAX_TIERS};

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
    pub(crate) kept: usize,
    /// Distinct targets in the answer.
    pub targets: usize,
    /// One of the errors, as an example.
    pub error: String,
}

/// The outcome of one SRV lookup with its targets resolved (`srvlb check --resolve`).
#[derive(Debug)]
pub enum Answer {
    /// Records (possibly after resolving targets) and the smallest TTL among them.
    /// `unresolved` is set when some targets failed transiently and were skipped or kept.
    Found {
        /// The backends found, one per address.
        endpoints: Vec<Endpoint>,
        /// The smallest TTL among the records, in seconds.
        ttl: u32,
        /// Targets that failed transiently, when any did.
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

/// The negative-caching TTL of an NXDOMAIN/NODATA answer (RFC 2308: from its SOA), if any.
fn negative_ttl(e: &NetError) -> Option<u32> {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no)) => no.negative_ttl,
        _ => None,
    }
}

/// One SRV record as the refresh loop keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SrvRecord {
    /// Lower-case, absolute: the key of the target's addresses.
    pub(crate) target: String,
    pub(crate) name: Name,
    pub(crate) port: u16,
    pub(crate) priority: u16,
    pub(crate) weight: u16,
}

/// Addresses from an answer's additional section, per target, with their smallest TTL.
pub(crate) type Additional = HashMap<String, (Vec<IpAddr>, u32)>;

/// What an SRV query gave, before any target is resolved.
#[derive(Debug)]
pub(crate) enum SrvOutcome {
    Records {
        /// Within the backend caps (see `trim_records`); "." targets left out.
        records: Vec<SrvRecord>,
        /// Smallest TTL among the SRV records.
        ttl: u32,
        /// Addresses from the additional section, per target, with their smallest TTL,
        /// already filtered by the resolver's address family.
        additional: Additional,
        /// Records left out by the caps.
        trimmed: usize,
    },
    Absent {
        why: &'static str,
        /// The SOA minimum of an NXDOMAIN/NODATA answer, when it carried one.
        negative_ttl: Option<u32>,
    },
    Failed(String),
}

/// Queries `name`'s SRV records. When the answer is slow, a probe looks whether the
/// servers refuse the query outright (port closed: ICMP port unreachable), which hickory's
/// unconnected UDP sockets never see and would report only as a timeout much later.
pub(crate) async fn query_srv(
    resolver: &TokioResolver,
    name: &str,
    nameservers: &[SocketAddr],
) -> SrvOutcome {
    let absolute = absolute(name);
    let lookup = {
        let query = resolver.lookup(absolute.as_str(), RecordType::SRV);
        tokio::pin!(query);
        tokio::select! {
            result = &mut query => result,
            refused = probe::refused(nameservers, &absolute) => return SrvOutcome::Failed(refused),
        }
    };
    let lookup = match lookup {
        Ok(lookup) => lookup,
        Err(e) => {
            return match absence(&e) {
                Some(why) => SrvOutcome::Absent {
                    why,
                    negative_ttl: negative_ttl(&e),
                },
                None => SrvOutcome::Failed(e.to_string()),
            };
        }
    };
    let (mut records, ttl, dot) = srv_records(lookup.answers());
    if records.is_empty() {
        let why = if dot {
            "target \".\" (service absent)"
        } else {
            "no SRV records"
        };
        return SrvOutcome::Absent {
            why,
            negative_ttl: None,
        };
    }
    let trimmed = trim_records(&mut records);
    let additional = additional_addresses(lookup.additionals(), Family::of(resolver));
    SrvOutcome::Records {
        records,
        ttl,
        additional,
        trimmed,
    }
}

/// The SRV records of an answer ("." targets left out), their smallest TTL, and whether a
/// "." target was among them.
fn srv_records<'a>(answers: impl IntoIterator<Item = &'a Record>) -> (Vec<SrvRecord>, u32, bool) {
    let mut ttl = u32::MAX;
    let mut records = Vec::new();
    let mut dot = false;
    for record in answers {
        if let RData::SRV(srv) = &record.data {
            ttl = ttl.min(record.ttl);
            if srv.target.is_root() {
                dot = true;
                continue;
            }
            records.push(SrvRecord {
                target: srv.target.to_lowercase().to_string(),
                name: srv.target.clone(),
                port: srv.port,
                priority: srv.priority,
                weight: srv.weight,
            });
        }
    }
    (records, ttl, dot)
}

/// The addresses of an answer's additional section that `family` allows, per target, with
/// their smallest TTL. Indexed once, so a large answer costs one pass, not one per target.
fn additional_addresses<'a>(
    additionals: impl IntoIterator<Item = &'a Record>,
    family: Family,
) -> Additional {
    let mut additional: Additional = HashMap::new();
    for record in additionals {
        let ip = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        if !family.allows(ip) {
            continue;
        }
        let entry = additional
            .entry(record.name.to_lowercase().to_string())
            .or_insert_with(|| (Vec::new(), u32::MAX));
        entry.0.push(ip);
        entry.1 = entry.1.min(record.ttl);
    }
    additional
}

/// Cuts an answer beyond the caps before any other work: duplicates go, then the records
/// beyond the `MAX_TIERS` lowest priorities, then all but the first `MAX_BACKENDS` in
/// (priority, target, port) order, the order `Pool` cuts in, so every instance keeps the
/// same records. Returns how many were cut.
pub(crate) fn trim_records(records: &mut Vec<SrvRecord>) -> usize {
    let before = records.len();
    let mut seen = HashSet::new();
    records.retain(|r| seen.insert((r.target.clone(), r.port)));
    let priorities: std::collections::BTreeSet<u16> = records.iter().map(|r| r.priority).collect();
    if records.len() <= MAX_BACKENDS && priorities.len() <= MAX_TIERS {
        return before - records.len();
    }
    if let Some(&last_kept) = priorities.iter().nth(MAX_TIERS - 1) {
        records.retain(|r| r.priority <= last_kept);
    }
    records.sort_by(|a, b| (a.priority, &a.target, a.port).cmp(&(b.priority, &b.target, b.port)));
    records.truncate(MAX_BACKENDS);
    before - records.len()
}

/// The address families the resolver asks for (`[resolver] family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Any,
    Ipv4,
    Ipv6,
}

impl Family {
    fn of(resolver: &TokioResolver) -> Family {
        match resolver.options().ip_strategy {
            LookupIpStrategy::Ipv4Only => Family::Ipv4,
            LookupIpStrategy::Ipv6Only => Family::Ipv6,
            _ => Family::Any,
        }
    }

    fn allows(self, ip: IpAddr) -> bool {
        match self {
            Family::Any => true,
            Family::Ipv4 => ip.is_ipv4(),
            Family::Ipv6 => ip.is_ipv6(),
        }
    }
}

/// What the address lookup of one SRV target gave.
#[derive(Debug)]
pub(crate) enum TargetAddrs {
    /// Addresses and the smallest TTL among their records.
    Found(Vec<IpAddr>, u32),
    /// NXDOMAIN or NODATA: the target authoritatively has no address; the negative TTL
    /// when the answer carried an SOA.
    None(Option<u32>),
    /// SERVFAIL, timeout, network error, or no answer within the refresh's budget.
    Transient(String),
}

/// Resolves `targets` (lower-case key, name) concurrently, at most `TARGET_CONCURRENCY` at a
/// time, all within one budget of twice the resolver timeout: a refresh must not take
/// "targets x timeout" when the server is slow. A target still unanswered at the deadline
/// counts as a transient failure.
pub(crate) async fn resolve_targets(
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
                        TargetAddrs::None(negative_ttl(&e))
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

/// The endpoints of `records` with the addresses known for their targets, in answer order.
pub(crate) fn endpoints(
    records: &[SrvRecord],
    addresses: &HashMap<String, Vec<IpAddr>>,
) -> Vec<Endpoint> {
    let mut out = Vec::with_capacity(records.len());
    for srv in records {
        for ip in addresses.get(&srv.target).into_iter().flatten() {
            out.push(Endpoint {
                target: srv.target.clone(),
                port: srv.port,
                addr: SocketAddr::new(*ip, srv.port),
                priority: srv.priority,
                weight: srv.weight,
            });
        }
    }
    out
}

/// Performs one SRV lookup of `name` and resolves every target (the additional section
/// first). `known` holds the addresses of targets from earlier answers, used when a
/// target's own lookup fails transiently. For one-off lookups (`srvlb check --resolve`);
/// the refresh loop resolves targets on their own TTLs instead.
pub async fn lookup_srv(
    resolver: &TokioResolver,
    name: &str,
    known: &HashMap<String, Vec<IpAddr>>,
) -> Answer {
    let (records, mut ttl, mut additional) = match query_srv(resolver, name, &[]).await {
        SrvOutcome::Records {
            records,
            ttl,
            additional,
            ..
        } => (records, ttl, additional),
        SrvOutcome::Absent { why, .. } => return Answer::Absent(why),
        SrvOutcome::Failed(why) => return Answer::Failed(why),
    };
    let mut addresses: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let mut to_resolve: Vec<(String, Name)> = Vec::new();
    for srv in &records {
        if addresses.contains_key(&srv.target) || to_resolve.iter().any(|(t, _)| *t == srv.target) {
            continue;
        }
        match additional.remove(&srv.target) {
            Some((ips, found_ttl)) => {
                ttl = ttl.min(found_ttl);
                addresses.insert(srv.target.clone(), ips);
            }
            None => to_resolve.push((srv.target.clone(), srv.name.clone())),
        }
    }
    let targets = addresses.len() + to_resolve.len();
    let resolved = resolve_targets(resolver, to_resolve).await;
    let unresolved =
        take_resolved(resolved, known, &mut addresses, &mut ttl).map(|(skipped, kept, error)| {
            Unresolved {
                skipped,
                kept,
                targets,
                error,
            }
        });
    answer(endpoints(&records, &addresses), ttl, unresolved)
}

/// Folds resolved targets into `addresses` (a transient failure falls back to `known`) and
/// `ttl`. Returns (skipped, kept, an example error) when some target failed transiently.
fn take_resolved(
    resolved: HashMap<String, TargetAddrs>,
    known: &HashMap<String, Vec<IpAddr>>,
    addresses: &mut HashMap<String, Vec<IpAddr>>,
    ttl: &mut u32,
) -> Option<(usize, usize, String)> {
    let (mut skipped, mut kept, mut error) = (0, 0, None);
    for (target, addrs) in resolved {
        let ips = match addrs {
            TargetAddrs::Found(ips, found_ttl) => {
                *ttl = (*ttl).min(found_ttl);
                ips
            }
            TargetAddrs::None(_) => Vec::new(),
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
    error.map(|error| (skipped, kept, error))
}

/// The answer that `endpoints` (from the records and their targets' addresses) make. None
/// usable while a target's lookup said nothing about it is a failed lookup (the last set
/// keeps serving), not an authoritative "absent".
pub(crate) fn answer(endpoints: Vec<Endpoint>, ttl: u32, unresolved: Option<Unresolved>) -> Answer {
    if endpoints.is_empty() {
        return match unresolved {
            Some(u) => Answer::Failed(format!(
                "no SRV target could be resolved ({} of {} failed; {})",
                u.skipped, u.targets, u.error
            )),
            None => Answer::Absent("no SRV target has an address"),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize, priority: u16) -> SrvRecord {
        let target = format!("b{i:05}.test.");
        SrvRecord {
            name: Name::from_ascii(&target).expect("name"),
            target,
            port: 80,
            priority,
            weight: 1,
        }
    }

    #[test]
    fn an_answer_beyond_the_caps_is_trimmed_before_anything_else() {
        let mut records: Vec<SrvRecord> = (0..MAX_BACKENDS + 500).map(|i| record(i, 10)).collect();
        records.push(record(3, 10)); // a duplicate
        records.reverse();
        let cut = trim_records(&mut records);
        assert_eq!(cut, 501);
        assert_eq!(records.len(), MAX_BACKENDS);
        assert!(
            records
                .iter()
                .all(|r| r.target < format!("b{MAX_BACKENDS:05}.test."))
        );
        // Too many priorities: the lowest MAX_TIERS stay.
        let mut tiers: Vec<SrvRecord> = (0..40).map(|i| record(i, 100 + i as u16)).collect();
        assert_eq!(trim_records(&mut tiers), 8);
        assert!(tiers.iter().all(|r| r.priority < 100 + MAX_TIERS as u16));
        // Within the caps: untouched, order kept.
        let mut small = vec![record(2, 10), record(1, 10)];
        assert_eq!(trim_records(&mut small), 0);
        assert_eq!(small[0].target, "b00002.test.");
    }

    #[test]
    fn family_filters_addresses() {
        let v4: IpAddr = "127.0.0.1".parse().expect("ip");
        let v6: IpAddr = "::1".parse().expect("ip");
        assert!(Family::Any.allows(v4) && Family::Any.allows(v6));
        assert!(Family::Ipv4.allows(v4) && !Family::Ipv4.allows(v6));
        assert!(!Family::Ipv6.allows(v4) && Family::Ipv6.allows(v6));
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
