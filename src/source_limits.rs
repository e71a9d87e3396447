//! Per-source admission: at most `max_connections_per_source` open connections and a token
//! bucket of new connections (`rate_per_source`) per client source, where a source is an
//! IPv4 address or an IPv6 /64 (one customer's network, which hands out addresses at will).
//! The table is sharded so admission takes one shard's lock, never a global one, and it is
//! bounded: a full shard first forgets sources with nothing open and a full bucket (which it
//! would recreate identically), and past that lets new sources in untracked (counted), so no
//! number of distinct sources can grow srvlb's memory. It owns counting only; the proxy
//! decides what to do with a refusal.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::config::{RatePerSource, ServiceConfig};

/// Shards of the table; a power of two.
const SHARDS: usize = 64;
/// Sources tracked at most per service (each entry is a few dozen bytes).
pub(crate) const MAX_SOURCES: usize = 65_536;
const PER_SHARD: usize = MAX_SOURCES / SHARDS;

/// A client source as limits count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6Net([u8; 8]),
}

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        match crate::proxy::canonical_ip(ip) {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let mut net = [0u8; 8];
                net.copy_from_slice(&v6.octets()[..8]);
                Source::V6Net(net)
            }
        }
    }
}

#[derive(Debug)]
struct Entry {
    open: u32,
    tokens: f64,
    refilled_ms: u64,
}

/// Why a source may not open another connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// It has `max_connections_per_source` open.
    Connections,
    /// Its bucket of new connections is empty.
    Rate,
}

/// The per-source table of one service (shared, like the connection limit, with a service
/// that replaces it under the same name).
#[derive(Debug)]
pub(crate) struct SourceLimits {
    shards: Vec<Mutex<HashMap<Source, Entry>>>,
    hasher: std::collections::hash_map::RandomState,
    /// Sources let in without tracking because their shard was full of busy sources.
    pub(crate) untracked: AtomicU64,
}

impl Default for SourceLimits {
    fn default() -> SourceLimits {
        SourceLimits {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            untracked: AtomicU64::new(0),
        }
    }
}

/// Held for as long as an admitted connection is open; gives its slot back when dropped.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    limits: Arc<SourceLimits>,
    source: Source,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut shard = self.limits.shard(&self.source).lock();
        if let Some(entry) = shard.get_mut(&self.source) {
            entry.open = entry.open.saturating_sub(1);
        }
    }
}

impl SourceLimits {
    fn shard(&self, source: &Source) -> &Mutex<HashMap<Source, Entry>> {
        &self.shards[(self.hasher.hash_one(source) as usize) & (SHARDS - 1)]
    }

    /// Sources tracked now.
    pub(crate) fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Admits one connection from `ip` at `now_ms` under `config`'s per-source limits.
    /// `Ok(None)`: no per-source limit is configured (nothing tracked). `Ok(Some(slot))`:
    /// admitted; the slot counts the connection until dropped.
    pub(crate) fn admit(
        self: &Arc<Self>,
        config: &ServiceConfig,
        ip: IpAddr,
        now_ms: u64,
    ) -> Result<Option<SourceSlot>, Refusal> {
        let max_open = config.max_connections_per_source;
        let rate = config.rate_per_source;
        if max_open.is_none() && rate.is_none() {
            return Ok(None);
        }
        let source = Source::of(ip);
        let mut shard = self.shard(&source).lock();
        if !shard.contains_key(&source) && shard.len() >= PER_SHARD {
            forget_idle(&mut shard, rate, now_ms);
            if shard.len() >= PER_SHARD {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
        }
        let entry = shard.entry(source).or_insert_with(|| Entry {
            open: 0,
            tokens: rate.map_or(0.0, |r| f64::from(r.burst)),
            refilled_ms: now_ms,
        });
        if let Some(rate) = rate {
            refill(entry, rate, now_ms);
            if entry.tokens < 1.0 {
                return Err(Refusal::Rate);
            }
        }
        if max_open.is_some_and(|max| entry.open >= max) {
            return Err(Refusal::Connections);
        }
        if rate.is_some() {
            entry.tokens -= 1.0;
        }
        entry.open += 1;
        Ok(Some(SourceSlot {
            limits: Arc::clone(self),
            source,
        }))
    }
}

fn refill(entry: &mut Entry, rate: RatePerSource, now_ms: u64) {
    let elapsed_ms = now_ms.saturating_sub(entry.refilled_ms);
    let per_ms = f64::from(rate.count) / rate.per.as_millis().max(1) as f64;
    entry.tokens = (entry.tokens + elapsed_ms as f64 * per_ms).min(f64::from(rate.burst));
    entry.refilled_ms = now_ms;
}

/// Drops the sources that have nothing open and whose bucket is full again: they would be
/// recreated exactly as they are.
fn forget_idle(shard: &mut HashMap<Source, Entry>, rate: Option<RatePerSource>, now_ms: u64) {
    shard.retain(|_, entry| {
        if entry.open > 0 {
            return true;
        }
        match rate {
            None => false,
            Some(rate) => {
                refill(entry, rate, now_ms);
                entry.tokens < f64::from(rate.burst)
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(max: Option<u32>, rate: Option<(u32, u64, u32)>) -> ServiceConfig {
        let mut c = crate::config::Config::parse(
            "[[service]]\nname = \"s\"\nlisten = [\"127.0.0.1:1\"]\nstatic = [\"127.0.0.1:2\"]\n",
            "t.toml",
        )
        .expect("config")
        .services
        .remove(0);
        c.max_connections_per_source = max;
        c.rate_per_source = rate.map(|(count, per_ms, burst)| RatePerSource {
            count,
            per: Duration::from_millis(per_ms),
            burst,
        });
        c
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn open_connections_are_capped_per_source_and_given_back() {
        let limits = Arc::new(SourceLimits::default());
        let c = config(Some(2), None);
        let a = limits.admit(&c, ip("192.0.2.1"), 0).expect("first");
        let b = limits.admit(&c, ip("192.0.2.1"), 0).expect("second");
        assert_eq!(
            limits.admit(&c, ip("192.0.2.1"), 0).err(),
            Some(Refusal::Connections)
        );
        assert!(
            limits.admit(&c, ip("192.0.2.2"), 0).is_ok(),
            "another source"
        );
        drop(a);
        assert!(
            limits.admit(&c, ip("192.0.2.1"), 0).is_ok(),
            "a slot came back"
        );
        drop(b);
    }

    #[test]
    fn ipv6_sources_are_grouped_by_64_and_mapped_v4_is_v4() {
        let limits = Arc::new(SourceLimits::default());
        let c = config(Some(1), None);
        let _a = limits.admit(&c, ip("2001:db8:1:2::1"), 0).expect("first");
        assert_eq!(
            limits.admit(&c, ip("2001:db8:1:2:ffff::9"), 0).err(),
            Some(Refusal::Connections),
            "same /64"
        );
        assert!(
            limits.admit(&c, ip("2001:db8:1:3::1"), 0).is_ok(),
            "other /64"
        );
        let _v4 = limits.admit(&c, ip("192.0.2.7"), 0).expect("v4");
        assert_eq!(
            limits.admit(&c, ip("::ffff:192.0.2.7"), 0).err(),
            Some(Refusal::Connections)
        );
    }

    #[test]
    fn the_rate_is_a_token_bucket_with_burst() {
        let limits = Arc::new(SourceLimits::default());
        // 10 per second, burst 3.
        let c = config(None, Some((10, 1000, 3)));
        let src = ip("198.51.100.4");
        let admitted = (0..5)
            .filter(|_| limits.admit(&c, src, 1000).is_ok())
            .count();
        assert_eq!(admitted, 3, "the burst");
        assert_eq!(limits.admit(&c, src, 1000).err(), Some(Refusal::Rate));
        // 100 ms later one token is back, not two.
        assert!(limits.admit(&c, src, 1100).is_ok());
        assert_eq!(limits.admit(&c, src, 1100).err(), Some(Refusal::Rate));
        // A long pause refills to the burst, no further.
        let admitted = (0..5)
            .filter(|_| limits.admit(&c, src, 60_000).is_ok())
            .count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn the_table_stays_bounded_however_many_sources_appear() {
        let limits = Arc::new(SourceLimits::default());
        let c = config(Some(5), Some((100, 1000, 100)));
        // Each source opens and closes one connection: idle afterwards, bucket refills.
        for i in 0..(MAX_SOURCES as u32 * 3) {
            let v4 = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            let slot = limits
                .admit(&c, IpAddr::V4(v4), u64::from(i))
                .expect("admitted");
            drop(slot);
        }
        assert!(
            limits.tracked() <= MAX_SOURCES,
            "{} tracked",
            limits.tracked()
        );
        // Busy sources are never forgotten; past the bound new ones go untracked.
        let mut held = Vec::new();
        for i in 0..(MAX_SOURCES as u32 + 1000) {
            let v4 = std::net::Ipv4Addr::from(0x0b00_0000 + i);
            if let Ok(slot) = limits.admit(&c, IpAddr::V4(v4), 10_000_000) {
                held.push(slot);
            }
        }
        assert!(limits.tracked() <= MAX_SOURCES);
        assert!(limits.untracked.load(Ordering::Relaxed) >= 1000);
    }

    #[test]
    fn no_limit_configured_tracks_nothing() {
        let limits = Arc::new(SourceLimits::default());
        let c = config(None, None);
        assert!(matches!(limits.admit(&c, ip("192.0.2.1"), 0), Ok(None)));
        assert_eq!(limits.tracked(), 0);
    }
}
