//! When to look again: refresh intervals from TTLs and the back-off after failed lookups,
//! both clamped to `[min_refresh, max_refresh]` and jittered. Pure arithmetic.

use std::time::Duration;

use rand::Rng;

use crate::config::ResolverConfig;

/// Refresh interval from a TTL, for records whose previous answer had the same TTL.
pub(crate) fn refresh_interval<R: Rng + ?Sized>(
    ttl: u32,
    settings: &ResolverConfig,
    rng: &mut R,
) -> Duration {
    refresh_after(ttl, ttl, settings, rng)
}

/// Refresh interval for records answered with `ttl`, whose previous answer said
/// `previous_ttl`. The next lookup goes a little *after* the TTL runs out, never before:
/// behind a caching resolver (unbound, systemd-resolved, a Consul agent's cache) a lookup
/// just before expiry gets the same records with a TTL of 0-1 and has to be repeated a
/// second later, doubling the query rate; a lookup just after expiry gets the renewed
/// records with a full TTL. The margin past expiry is a second (caches count in whole
/// seconds), 0.1 s for TTLs of 0-1 s unless `ttl` is much smaller than `previous_ttl` (a
/// cached answer near its end). Then up to 10% more at random, so that a fleet
/// does not query in lock-step. Clamped to `[min_refresh, max_refresh]`; records that
/// outlive `max_refresh` are looked up again shortly before it.
pub(crate) fn refresh_after<R: Rng + ?Sized>(
    ttl: u32,
    previous_ttl: u32,
    settings: &ResolverConfig,
    rng: &mut R,
) -> Duration {
    let record = Duration::from_secs(u64::from(ttl));
    if record >= settings.max_refresh {
        return jitter(settings.max_refresh, settings, rng);
    }
    // Caches count TTLs in whole seconds (unbound), so an entry may live up to a second
    // past "TTL seconds from now": a full second clears that edge. TTLs of 0-1 s are not
    // cached anyway (Consul's 0, an authority's 1), and 0.1 s keeps them quick.
    let margin = if ttl >= 2 || ttl.saturating_mul(2) < previous_ttl {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(100)
    };
    let base = (record + margin).max(settings.min_refresh);
    let spread = base / 10;
    (base + spread.mul_f64(rng.random_range(0.0..=1.0)))
        .clamp(settings.min_refresh, settings.max_refresh)
}

/// Delay before looking again at a name the registry says is absent (NXDOMAIN, NODATA,
/// "."), the `rounds`-th time in a row: the failure back-off, but never before the answer's
/// negative TTL (its SOA minimum) has run out.
pub(crate) fn absent_backoff<R: Rng + ?Sized>(
    rounds: u32,
    negative_ttl: Option<u32>,
    settings: &ResolverConfig,
    rng: &mut R,
) -> Duration {
    let backoff = failure_backoff(rounds, settings, rng);
    match negative_ttl {
        Some(ttl) => backoff.max(refresh_interval(ttl, settings, rng)),
        None => backoff,
    }
}

/// Retry delay after the `failures`-th failed lookup in a row: doubling from min_refresh,
/// never above max_refresh, jittered like refreshes (a fleet that lost its DNS server
/// together must not come back in lock-step).
pub(crate) fn failure_backoff<R: Rng + ?Sized>(
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
    use crate::discovery::test_support::{settings, within};

    #[test]
    fn refresh_interval_clamps_and_jitters_at_most_ten_percent() {
        let s = settings();
        let mut rng = rand::rng();
        for _ in 0..1000 {
            // After the TTL runs out, never before (issue 8: a cache renews on expiry).
            let d = refresh_interval(30, &s, &mut rng);
            assert!(within(d, 31_000, 34_100), "{d:?}");
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
    fn a_cached_answer_near_its_end_is_refreshed_a_second_past_expiry() {
        let s = settings();
        let mut rng = rand::rng();
        for _ in 0..1000 {
            // Fresh TTL 5 (as a cache hands out right after renewing): 6 s, +10%.
            let fresh = refresh_after(5, 5, &s, &mut rng);
            assert!(within(fresh, 6_000, 6_600), "{fresh:?}");
            // TTL 1 where the last answer said 5: the cache expires within 2 s.
            let edge = refresh_after(1, 5, &s, &mut rng);
            assert!(within(edge, 2_000, 2_200), "{edge:?}");
            // Authoritative TTL 1 stays quick (followed within TTL + 2 s).
            let one = refresh_after(1, 1, &s, &mut rng);
            assert!(within(one, 1_100, 1_210), "{one:?}");
        }
        // At TTL 5 behind a cache that is about 10 lookups a minute, not 23.
        let mut elapsed = Duration::ZERO;
        let mut lookups = 0;
        while elapsed < Duration::from_secs(60) {
            elapsed += refresh_after(5, 5, &s, &mut rng);
            lookups += 1;
        }
        assert!(lookups <= 10, "{lookups} lookups a minute");
    }

    #[test]
    fn an_absent_name_backs_off_and_respects_its_negative_ttl() {
        let s = settings();
        let mut rng = rand::rng();
        let delays: Vec<Duration> = (1..=8)
            .map(|n| absent_backoff(n, None, &s, &mut rng))
            .collect();
        assert!(within(delays[0], 1_000, 1_100), "{delays:?}");
        assert!(within(delays[7], 54_000, 60_000), "{delays:?}");
        assert!(
            delays.windows(2).all(|w| w[1] >= w[0].mul_f64(0.8)),
            "{delays:?}"
        );
        // SOA minimum 10 s: not before it runs out.
        let first = absent_backoff(1, Some(10), &s, &mut rng);
        assert!(within(first, 11_000, 12_100), "{first:?}");
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
