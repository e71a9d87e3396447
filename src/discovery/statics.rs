//! The static source: backends fixed in the configuration (`static = [...]`). Alone they
//! are the service's whole set, fetched once; beside an SRV name they are the last-resort
//! tier, published with every answer by the refresh policy.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Answer, Fetched, STATIC_PRIORITY, Source};
use crate::config::ResolverConfig;
use crate::pool::Endpoint;

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

/// A fixed set of backends.
#[derive(Debug, Clone)]
pub(crate) struct StaticSource {
    endpoints: Vec<Endpoint>,
}

impl StaticSource {
    pub(crate) fn new(statics: &[SocketAddr]) -> StaticSource {
        StaticSource {
            endpoints: static_endpoints(statics),
        }
    }
}

impl Source for StaticSource {
    fn name(&self) -> &str {
        "static"
    }

    async fn fetch(&mut self, _full: bool, _settings: &ResolverConfig) -> Fetched {
        Fetched {
            answer: Some(Answer::Found {
                endpoints: self.endpoints.clone(),
                ttl: u32::MAX,
                unresolved: None,
            }),
            ..Fetched::default()
        }
    }

    fn next_due(&self) -> Option<Instant> {
        None
    }

    fn refreshes(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statics_are_the_last_resort_tier() {
        let eps = static_endpoints(&["127.0.0.1:80".parse().expect("addr")]);
        assert_eq!(eps[0].priority, STATIC_PRIORITY);
        assert_eq!(eps[0].weight, 1);
    }
}
