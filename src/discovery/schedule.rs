//! When to look again: refresh intervals from TTLs and the back-off after failed lookups,
//! both clamped to `[min_refresh, max_refresh]` and jittered. Pure arithmetic.

use std::time::Duration;

use rand::Rng;

use crate::config::ResolverConfig;

/// Refresh interval from a TTL: clamped to `[min_refresh, max_refresh]`, then moved by up to
/// 10% at random so that a fleet of instances does not query in lock-step.
pub fn refresh_interval<R: Rng + ?Sized>(
    ttl: u32,
    settings: &ResolverConfig,
    rng: &mut R,
) -> Duration {
    let clamped =
        Duration::from_secs(u64::from(ttl)).clamp(settings.min_refresh, settings.max_refresh);
    jitter(clamped, settings, rng)
}

/// Retry delay after the `failures`-th failed lookup in a row: doubling from min_refresh,
/// never above max_refresh, jittered like refreshes (a fleet that lost its DNS server
/// together must not come back in lock-step).
pub fn failure_backoff<R: Rng + ?Sized>(
    failures: u32,
    settings: &ResolverConfig,
    rng: &mut R,
) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    let base = settings
        .min_refresh
        .saturating_mul(factor)
        .clamp(settings.min_refresh, settings.max_refresh);
    jitter(base, settings, rng)
}

/// Moves `base` (already within the bounds) by up to 10% without leaving
/// `[min_refresh, max_refresh]`: shorter when there is room above min_refresh, otherwise
/// longer. The common case of short TTLs clamped up to min_refresh therefore still spreads
/// a fleet's queries instead of putting them all exactly min_refresh apart.
fn jitter<R: Rng + ?Sized>(base: Duration, settings: &ResolverConfig, rng: &mut R) -> Duration {
    let span = base / 10;
    let (low, high) = if base.saturating_sub(span) >= settings.min_refresh {
        (base - span, base)
    } else {
        (base, (base + span).min(settings.max_refresh))
    };
    if high <= low {
        return low;
    }
    low + (high - low).mul_f64(rng.random_range(0.0..=1.0))
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

    fn within(d: Duration, low_ms: u64, high_ms: u64) -> bool {
        d >= Duration::from_millis(low_ms) && d <= Duration::from_millis(high_ms)
    }

    #[test]
    fn refresh_interval_clamps_and_jitters_at_most_ten_percent() {
        let s = settings();
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let d = refresh_interval(30, &s, &mut rng);
            assert!(within(d, 27_000, 30_000), "{d:?}");
            // Below min_refresh: clamped up, jittered upwards (never faster than min_refresh).
            let low = refresh_interval(0, &s, &mut rng);
            assert!(within(low, 1_000, 1_100), "{low:?}");
            let high = refresh_interval(86_400, &s, &mut rng);
            assert!(within(high, 54_000, 60_000), "{high:?}");
        }
        for ttl in [0, 30] {
            let spread: std::collections::HashSet<u128> = (0..100)
                .map(|_| refresh_interval(ttl, &s, &mut rng).as_millis())
                .collect();
            assert!(spread.len() > 10, "no jitter at ttl {ttl}: {spread:?}");
        }
        // min_refresh == max_refresh leaves no room: exactly that interval.
        let mut fixed = settings();
        fixed.max_refresh = fixed.min_refresh;
        assert_eq!(refresh_interval(30, &fixed, &mut rng), fixed.min_refresh);
    }

    #[test]
    fn failure_backoff_doubles_within_bounds() {
        let s = settings();
        let mut rng = rand::rng();
        for _ in 0..200 {
            let got: Vec<Duration> = (1..=8).map(|n| failure_backoff(n, &s, &mut rng)).collect();
            let want = [1, 2, 4, 8, 16, 32, 60, 60];
            for (d, w) in got.iter().zip(want) {
                let w = w * 1000;
                // Never faster than min_refresh, never slower than max_refresh, within 10% of
                // the doubled delay.
                assert!(within(*d, w * 9 / 10, (w * 11 / 10).min(60_000)), "{got:?}");
                assert!(within(*d, 1_000, 60_000), "{got:?}");
            }
        }
    }
}
