//! The DNS client SRV sources share: hickory-resolver configured from `[resolver]` (servers,
//! timeout, address family; no cache, srvlb schedules its own refreshes), wrapped in
//! [`Resolver`] so that nothing outside discovery names the hickory type.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig as HickoryConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use super::DiscoveryError;
use crate::config::{AddressFamily, ResolverConfig};

/// A handle on the DNS client: cheap to clone, shared by every service's SRV source.
#[derive(Clone)]
pub(crate) struct Resolver(Arc<TokioResolver>);

impl Resolver {
    /// Builds the client from `[resolver]`; see [`build_resolver`].
    pub(crate) fn new(settings: &ResolverConfig) -> Result<Resolver, DiscoveryError> {
        Ok(Resolver(Arc::new(build_resolver(settings)?)))
    }

    pub(crate) fn hickory(&self) -> &TokioResolver {
        &self.0
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
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

/// The servers the refusal probe asks: the configured ones, or the system's.
pub(super) fn probe_servers(settings: &ResolverConfig) -> Vec<SocketAddr> {
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
