//! The SRV source: a service's SRV records (RFC 2782) and the addresses of their targets,
//! each refreshed on its own TTL. A full round queries the records (when the refresh policy
//! says so) and resolves the targets that are new or due; between full rounds, a partial
//! round resolves only the targets whose addresses are due. It turns what it knows into an
//! [`Answer`]; what an answer does to the pool is the refresh policy's business.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::proto::rr::Name;
use tracing::warn;

use super::lookup::{self, Additional, SrvOutcome, SrvRecord, TargetAddrs};
use super::resolver::{Resolver, probe_servers};
use super::schedule::{absent_backoff, failure_backoff, refresh_after};
use super::{Answer, Fetched, Source, Unresolved};
use crate::config::ResolverConfig;

/// What the source knows of one SRV target's addresses, refreshed on their own TTL.
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

/// A service's SRV name, looked up with the shared [`Resolver`].
pub(crate) struct SrvSource {
    service: String,
    srv: String,
    resolver: Resolver,
    /// Servers the refusal probe asks (see `probe`).
    nameservers: Vec<SocketAddr>,
    /// The SRV records of the last answer that had some (within the caps).
    records: Vec<SrvRecord>,
    /// Addresses of the records' targets, each on its own TTL.
    targets: HashMap<String, TargetState>,
    /// The last answer said the service is absent: its old targets are not looked after
    /// (the empty hold alone decides what happens to their backends).
    absent: bool,
    /// SRV records the last answer lost to the caps (logged when it changes).
    trimmed: usize,
    /// The last SRV query answered with records (it did not fail): `records` are current.
    records_answered: bool,
}

impl SrvSource {
    /// `settings` gives the servers the refusal probe asks (the configured ones, or the
    /// system's).
    pub(crate) fn new(
        service: &str,
        srv: &str,
        resolver: Resolver,
        settings: &ResolverConfig,
    ) -> Self {
        SrvSource {
            service: service.to_owned(),
            srv: srv.to_owned(),
            resolver,
            nameservers: probe_servers(settings),
            records: Vec::new(),
            targets: HashMap::new(),
            absent: false,
            trimmed: 0,
            records_answered: false,
        }
    }

    /// Folds a round's results into the records and target states.
    fn apply_lookups(&mut self, lookups: Lookups, settings: &ResolverConfig) -> Fetched {
        let mut fetched = Fetched::default();
        let srv_ttl = match lookups.srv {
            Some(SrvOutcome::Records {
                records,
                ttl,
                additional,
                trimmed,
            }) => {
                self.take_records(records, additional, trimmed, settings);
                self.records_answered = true;
                Some(ttl)
            }
            Some(SrvOutcome::Absent { why, negative_ttl }) => {
                self.records_answered = false;
                fetched.negative_ttl = negative_ttl;
                fetched.answer = Some(Answer::Absent(why));
                return fetched;
            }
            Some(SrvOutcome::Failed(why)) => {
                self.records_answered = false;
                fetched.answer = Some(Answer::Failed(why));
                return fetched;
            }
            None => None,
        };
        let (changed, recheck) = self.take_addresses(lookups.resolved, srv_ttl.is_none(), settings);
        fetched.full_round_now = recheck;
        fetched.records_current = srv_ttl.is_none() && self.records_answered;
        if srv_ttl.is_some() || changed {
            fetched.answer = Some(self.assemble(srv_ttl.unwrap_or(u32::MAX)));
        }
        fetched
    }

    /// New SRV records, with the addresses their additional section carried.
    fn take_records(
        &mut self,
        records: Vec<SrvRecord>,
        additional: Additional,
        trimmed: usize,
        settings: &ResolverConfig,
    ) {
        if trimmed != self.trimmed {
            self.trimmed = trimmed;
            if trimmed > 0 {
                warn!(service = %self.service, left_out = trimmed, max_backends = crate::pool::MAX_BACKENDS, max_tiers = crate::pool::MAX_TIERS, "SRV answer too large; keeping only the preferred priorities and records");
            }
        }
        let now = Instant::now();
        for (target, (addrs, ttl)) in additional {
            let previous = self.targets.get(&target).map_or(ttl, |t| t.ttl);
            let delay = refresh_after(ttl, previous, settings, &mut rand::rng());
            let state = TargetState {
                addrs,
                due: now + delay,
                ttl,
                failures: 0,
                error: None,
            };
            self.targets.insert(target, state);
        }
        self.records = records;
        let wanted: HashSet<&str> = self.records.iter().map(|r| r.target.as_str()).collect();
        self.targets.retain(|t, _| wanted.contains(t.as_str()));
    }

    /// The targets' new addresses. Returns whether any target's addresses (or error) changed,
    /// and whether the SRV records should be looked at again now.
    fn take_addresses(
        &mut self,
        resolved: HashMap<String, TargetAddrs>,
        address_round: bool,
        settings: &ResolverConfig,
    ) -> (bool, bool) {
        let now = Instant::now();
        let (mut changed, mut recheck) = (false, false);
        for (target, result) in resolved {
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
                recheck = true;
                continue;
            }
            let state = next_target_state(old.as_ref(), result, now, settings);
            changed |= old.as_ref().is_none_or(|o| {
                o.addrs != state.addrs || o.error.is_some() != state.error.is_some()
            });
            self.targets.insert(target, state);
        }
        (changed, recheck)
    }

    /// The answer the records and the targets' addresses give now.
    fn assemble(&self, ttl: u32) -> Answer {
        let addresses: HashMap<String, Vec<IpAddr>> = self
            .targets
            .iter()
            .map(|(t, s)| (t.clone(), s.addrs.clone()))
            .collect();
        let endpoints = lookup::endpoints(&self.records, &addresses);
        lookup::answer(endpoints, ttl, self.unresolved())
    }

    /// The targets whose last lookup failed transiently, as counts for one log line.
    fn unresolved(&self) -> Option<Unresolved> {
        let (mut targets, mut skipped, mut kept, mut error) = (0, 0, 0, None);
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
        error.map(|error| Unresolved {
            skipped,
            kept,
            targets,
            error,
        })
    }

    /// The targets a round resolves: those of `records` (the new answer's, or the known
    /// ones in a partial round) that are new or due and whose addresses did not come in the
    /// additional section.
    fn to_resolve(
        &self,
        records: &[SrvRecord],
        additional: Option<&Additional>,
    ) -> Vec<(String, Name)> {
        // A little slack groups targets that fall due together into one round.
        let due_by = Instant::now() + Duration::from_millis(50);
        let mut seen = HashSet::new();
        records
            .iter()
            .filter(|r| seen.insert(r.target.as_str()))
            .filter(|r| !additional.is_some_and(|a| a.contains_key(&r.target)))
            .filter(|r| self.targets.get(&r.target).is_none_or(|t| t.due <= due_by))
            .map(|r| (r.target.clone(), r.name.clone()))
            .collect()
    }

    /// One round of queries: the SRV records when `full`, then the targets to resolve.
    async fn lookups(&self, full: bool) -> Lookups {
        let resolver = self.resolver.hickory();
        let srv = if full {
            Some(lookup::query_srv(resolver, &self.srv, &self.nameservers).await)
        } else {
            None
        };
        let to_resolve = match &srv {
            Some(SrvOutcome::Records {
                records,
                additional,
                ..
            }) => self.to_resolve(records, Some(additional)),
            Some(_) => Vec::new(),
            // While DNS says the service is absent, its old targets are not looked after.
            None if self.absent => Vec::new(),
            None => self.to_resolve(&self.records, None),
        };
        let resolved = if to_resolve.is_empty() {
            HashMap::new()
        } else {
            lookup::resolve_targets(resolver, to_resolve).await
        };
        Lookups { srv, resolved }
    }
}

impl Source for SrvSource {
    fn name(&self) -> &str {
        &self.srv
    }

    async fn fetch(&mut self, full: bool, settings: &ResolverConfig) -> Fetched {
        // The queries change nothing here, so a round dropped halfway (the service retired)
        // leaves the source as it was.
        let lookups = self.lookups(full).await;
        let fetched = self.apply_lookups(lookups, settings);
        match &fetched.answer {
            Some(Answer::Absent(_)) => self.absent = true,
            Some(Answer::Found { .. }) => self.absent = false,
            Some(Answer::Failed(_)) | None => {}
        }
        fetched
    }

    fn next_due(&self) -> Option<Instant> {
        if self.absent {
            return None;
        }
        self.records
            .iter()
            .filter_map(|record| self.targets.get(&record.target))
            .map(|t| t.due)
            .min()
    }

    fn forget(&mut self) {
        self.records.clear();
        self.targets.clear();
    }
}

/// A target's state after one lookup of its addresses.
fn next_target_state(
    old: Option<&TargetState>,
    result: TargetAddrs,
    now: Instant,
    settings: &ResolverConfig,
) -> TargetState {
    let rng = &mut rand::rng();
    let failures = old.map_or(0, |o| o.failures).saturating_add(1);
    match result {
        TargetAddrs::Found(addrs, ttl) => {
            let previous = old.map_or(ttl, |o| o.ttl);
            TargetState {
                addrs,
                due: now + refresh_after(ttl, previous, settings, rng),
                ttl,
                failures: 0,
                error: None,
            }
        }
        // Authoritatively no address: none until it has one; look again with back-off.
        TargetAddrs::None(negative_ttl) => TargetState {
            addrs: Vec::new(),
            due: now + absent_backoff(failures, negative_ttl, settings, rng),
            ttl: negative_ttl.unwrap_or(0),
            failures,
            error: None,
        },
        // Says nothing about the target (a new registration's A record may not be ready
        // yet): keep what it had, and retry with back-off rather than every min_refresh.
        TargetAddrs::Transient(e) => TargetState {
            addrs: old.map(|o| o.addrs.clone()).unwrap_or_default(),
            due: now + failure_backoff(failures, settings, rng),
            ttl: old.map_or(0, |o| o.ttl),
            failures,
            error: Some(e),
        },
    }
}

/// The results of one round of queries.
struct Lookups {
    /// `None` when only target addresses were due.
    srv: Option<SrvOutcome>,
    resolved: HashMap<String, TargetAddrs>,
}
