//! Histograms of connections, observed on the data path and encoded at scrape time: connect
//! time, connection duration, bytes per connection and direction. Each service owns its set
//! (in `ServiceStats`), so observing is two relaxed atomic additions on the service's own
//! counters: no lookup by label and no lock. prometheus-client's own `Histogram` takes a
//! mutex on every observation, which the accept and connect path must not; this type only
//! borrows prometheus-client's encoder.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{MetricEncoder, NoLabelSet};

/// Upper bounds of connect times, in microseconds: 100 µs to 10 s.
const CONNECT_BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Upper bounds of connection durations, in microseconds: 1 ms to 1 h.
const DURATION_BOUNDS_US: [u64; 15] = [
    1_000,
    5_000,
    10_000,
    50_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    900_000_000,
    1_800_000_000,
    3_600_000_000,
];

/// Upper bounds of bytes per connection and direction: 64 B to 1 GiB, by powers of 4.
const BYTES_BOUNDS: [u64; 13] = [
    64,
    256,
    1 << 10,
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
    256 << 20,
    1 << 30,
];

/// A histogram of integer observations (microseconds, bytes) with fixed bounds. Buckets are
/// not cumulative here (one addition per observation); the encoder adds them up. The count
/// is the sum of the buckets, so `_count` always equals the `+Inf` bucket.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [u64],
    /// `bounds.len() + 1` buckets; the last takes what is above every bound.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    /// Observed units per exported unit (1e6 microseconds in a second). A division, not a
    /// multiplication by 1e-6, so that bounds print as `0.025`, not `0.024999999999999998`.
    divisor: f64,
}

impl Histogram {
    fn new(bounds: &'static [u64], divisor: f64) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            divisor,
        }
    }

    /// Counts one observation of `value` (in the histogram's integer unit).
    pub(crate) fn observe(&self, value: u64) {
        // `le` is inclusive: the first bound not below the value.
        let index = self.bounds.partition_point(|&bound| bound < value);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Observations so far.
    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples through prometheus-client.
    pub(super) fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(&counts)
            .map(|(&bound, &n)| (bound as f64 / self.divisor, n))
            .collect();
        let count = counts.iter().sum();
        let sum = self.sum.load(Ordering::Relaxed) as f64 / self.divisor;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// The histograms of one service's connections.
#[derive(Debug)]
pub(crate) struct ConnectionHistograms {
    /// Successful backend connects: from the connect call until the connection is up.
    pub(crate) connect: Histogram,
    /// Client connections that reached a backend: from accept to close.
    pub(crate) duration: Histogram,
    /// Bytes from the client to the backend, per connection.
    pub(crate) sent: Histogram,
    /// Bytes from the backend to the client, per connection.
    pub(crate) received: Histogram,
}

impl Default for ConnectionHistograms {
    fn default() -> Self {
        ConnectionHistograms {
            connect: Histogram::new(&CONNECT_BOUNDS_US, 1e6),
            duration: Histogram::new(&DURATION_BOUNDS_US, 1e6),
            sent: Histogram::new(&BYTES_BOUNDS, 1.0),
            received: Histogram::new(&BYTES_BOUNDS, 1.0),
        }
    }
}

impl ConnectionHistograms {
    /// A backend connect that took `took`.
    pub(crate) fn observe_connect(&self, took: Duration) {
        self.connect.observe(micros(took));
    }

    /// A connection that reached a backend ended after `lasted`, having moved `sent` bytes
    /// from the client and `received` bytes to it.
    pub(crate) fn observe_connection(&self, lasted: Duration, sent: u64, received: u64) {
        self.duration.observe(micros(lasted));
        self.sent.observe(sent);
        self.received.observe(received);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_the_last_bucket_takes_the_rest() {
        let h = Histogram::new(&BYTES_BOUNDS, 1.0);
        for v in [0, 64, 65, 1 << 30, (1 << 30) + 1, u64::MAX / 4] {
            h.observe(v);
        }
        let counts: Vec<u64> = h
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts[0], 2, "0 and 64 are <= 64");
        assert_eq!(counts[1], 1, "65 is <= 256");
        assert_eq!(counts[12], 1, "1 GiB is <= 1 GiB");
        assert_eq!(counts[13], 2, "above every bound");
        assert_eq!(h.count(), 6);
    }

    #[test]
    fn bounds_ascend() {
        for bounds in [
            &CONNECT_BOUNDS_US[..],
            &DURATION_BOUNDS_US[..],
            &BYTES_BOUNDS[..],
        ] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        }
    }
}
