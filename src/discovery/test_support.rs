//! Fixtures the discovery modules' unit tests share.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{AddressFamily, ResolverConfig};
use crate::pool::Endpoint;

/// Resolver settings with short, round refresh bounds.
pub(super) fn settings() -> ResolverConfig {
    ResolverConfig {
        nameservers: Vec::new(),
        timeout: Duration::from_secs(2),
        min_refresh: Duration::from_secs(1),
        max_refresh: Duration::from_secs(60),
        empty_hold: Duration::from_secs(30),
        family: AddressFamily::Any,
    }
}

/// `d` lies in `[low_ms, high_ms]`.
pub(super) fn within(d: Duration, low_ms: u64, high_ms: u64) -> bool {
    d >= Duration::from_millis(low_ms) && d <= Duration::from_millis(high_ms)
}

/// An endpoint of `target` at 127.0.0.`last`:80, priority 10, weight 1.
pub(super) fn ep(target: &str, last: u8) -> Endpoint {
    Endpoint {
        target: target.to_owned(),
        port: 80,
        addr: SocketAddr::from(([127, 0, 0, last], 80)),
        priority: 10,
        weight: 1,
    }
}
