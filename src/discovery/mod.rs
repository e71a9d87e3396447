//! Finds a service's backends and keeps its pool in step with them. A [`Source`] yields
//! endpoint sets: `srv.rs` (SRV records, RFC 2782, and their targets' A/AAAA, each on its
//! TTL) and `statics.rs` (fixed backends). The policy every source shares is `refresh.rs`:
//! when to ask again, last-known-good on a failed lookup, the empty hold on an absent
//! service, and `publish.rs` applies a set to the pool with damping of large removals
//! (`damping.rs`). It feeds whole answers to `Pool::update`; it never touches connections.
//!
//! Beside them: `lookup.rs` does the DNS queries (`probe.rs` tells a refused query from a
//! slow one), `resolver.rs` builds the DNS client, `schedule.rs` is the interval
//! arithmetic, `tiers.rs` logs tier switches, `status.rs` is what operators see.

mod damping;
mod lookup;
mod probe;
mod publish;
mod refresh;
mod resolver;
mod schedule;
mod srv;
mod statics;
mod status;
#[cfg(test)]
mod test_support;
mod tiers;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use hickory_resolver::net::NetError;
use tokio::sync::watch;

use crate::config::{ResolverConfig, ServiceConfig};
use crate::pool::Pool;

pub use lookup::{Answer, Unresolved, lookup_srv};
pub(crate) use refresh::Discovery;
pub(crate) use resolver::Resolver;
pub use resolver::build_resolver;
pub(crate) use srv::SrvSource;
pub(crate) use statics::StaticSource;
pub use statics::static_endpoints;
pub(crate) use status::DiscoveryStatus;

/// Priority given to static backends listed beside an SRV name: a last-resort tier that takes
/// traffic only when no SRV backend is usable. Alone, they form the only tier.
pub(crate) const STATIC_PRIORITY: u16 = u16::MAX;

/// Why the DNS resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read the system resolver configuration: {0}")]
    SystemConfig(NetError),
    #[error("cannot build the DNS resolver: {0}")]
    Build(NetError),
}

/// Where a service's endpoints come from. The source only looks things up and says what it
/// found; [`Discovery`] decides what an answer does to the pool and when to ask again.
pub(crate) trait Source: Send + 'static {
    /// What logs call the source (the `srv` field): the SRV name, say.
    fn name(&self) -> &str;

    /// One round of lookups. `full`: the policy's schedule asks for the whole set (the SRV
    /// records); otherwise only what the source refreshes on its own clock ([`next_due`]:
    /// an SRV target's addresses). Dropping the future halfway must leave the source as it
    /// was.
    ///
    /// [`next_due`]: Source::next_due
    fn fetch(
        &mut self,
        full: bool,
        settings: &ResolverConfig,
    ) -> impl Future<Output = Fetched> + Send;

    /// When the source wants a round of its own before the policy's next full one.
    fn next_due(&self) -> Option<Instant>;

    /// The empty hold has removed every backend the source found: forget what it knew.
    fn forget(&mut self) {}

    /// False for a set that never changes: it is fetched once.
    fn refreshes(&self) -> bool {
        true
    }
}

/// What one round of a source gave.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    /// The set as the source sees it now; `None` when a partial round changed nothing.
    pub(crate) answer: Option<Answer>,
    /// With `Answer::Absent`: the registry's negative TTL (RFC 2308), which paces the next
    /// look.
    pub(crate) negative_ttl: Option<u32>,
    /// Ask for the whole set now (an SRV target lost every address between two SRV
    /// lookups: the whole name may be going away).
    pub(crate) full_round_now: bool,
    /// In a partial round: the set's records are those of the last query for them, which
    /// answered, so a set found now is as current as a full round's (the service is no
    /// longer stale). False when that query failed: the records may be out of date.
    pub(crate) records_current: bool,
}

/// Starts the discovery task of `service`: its SRV name with the static backends beside it,
/// or the static backends alone. Runs until `shutdown` flips to true.
pub(crate) fn spawn(
    service: &ServiceConfig,
    resolver: &Resolver,
    settings: watch::Receiver<ResolverConfig>,
    pool: Arc<Pool>,
    status: Arc<DiscoveryStatus>,
    shutdown: watch::Receiver<bool>,
) {
    match &service.srv {
        Some(srv) => {
            let source = SrvSource::new(&service.name, srv, resolver.clone(), &settings.borrow());
            let fixed = static_endpoints(&service.static_backends);
            let discovery = Discovery::new(&service.name, source, fixed, settings, pool, status);
            tokio::spawn(discovery.run(shutdown));
        }
        None => {
            let source = StaticSource::new(&service.static_backends);
            let discovery =
                Discovery::new(&service.name, source, Vec::new(), settings, pool, status);
            tokio::spawn(discovery.run(shutdown));
        }
    }
}
