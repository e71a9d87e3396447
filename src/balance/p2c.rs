//! Weighted power of two choices: sample two backends by weight, keep the less loaded.
//!
//! Owns the cumulative-weight table and the pick rule. It must not read connection
//! counters or health itself: callers pass `load` and `eligible`, so the table stays
//! immutable, shareable and free of locks, and a pick never allocates.

use rand::{Rng, RngCore};

use super::{TierSelector, zero_weight};

/// Random samples tried before falling back to a scan; with half the backends ineligible,
/// a fallback is needed once in 2^8 picks, so the scan's O(n) cost stays rare.
const SAMPLE_ATTEMPTS: usize = 8;

/// Cumulative weights of a backend set, for O(log n) weighted sampling.
#[derive(Debug, Clone)]
pub struct P2cTable {
    /// `cumulative[i]` is the sum of effective weights of backends `0..=i`.
    cumulative: Box<[u64]>,
}

impl P2cTable {
    /// A backend with weight 0 is never picked unless every weight is 0; then all count as
    /// weight 1. This matches [`MaglevTable`](super::MaglevTable), where weight 0 owns no
    /// slots, so both policies agree on which backends serve.
    pub fn new(weights: &[u32]) -> P2cTable {
        let all_zero = weights.iter().all(|&w| w == 0);
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                // u32 weights summed in u64 cannot overflow below 2^32 backends.
                *sum += if all_zero { 1 } else { u64::from(w) };
                Some(*sum)
            })
            .collect();
        P2cTable { cumulative }
    }

    pub(crate) fn len(&self) -> usize {
        self.cumulative.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    /// Picks two distinct eligible backends, each sampled with probability proportional to
    /// its weight, and returns the one with less `load` per unit of weight.
    ///
    /// `eligible(i)` is false for a backend that is ejected or was already tried. On a tie
    /// the first sampled candidate wins: it was itself drawn at random by weight, so idle
    /// backends receive picks in proportion to weight (a coin flip would give two idle
    /// backends of weights 1 and 3 half each). With one eligible backend it is returned;
    /// with none, `None`. `load` is called only for the two candidates.
    pub fn pick<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        load: impl Fn(usize) -> u64,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.is_empty() {
            return None;
        }
        let first = self.sample(rng, &eligible)?;
        let Some(second) = self.sample(rng, |i| i != first && eligible(i)) else {
            return Some(first);
        };
        // load_a / w_a > load_b / w_b, cross-multiplied: no division, and u64 * u32 fits
        // in u128 so no overflow either.
        let (wa, wb) = (self.weight(first), self.weight(second));
        let a_busier =
            u128::from(load(first)) * u128::from(wb) > u128::from(load(second)) * u128::from(wa);
        Some(if a_busier { second } else { first })
    }

    fn weight(&self, i: usize) -> u64 {
        self.cumulative[i] - if i == 0 { 0 } else { self.cumulative[i - 1] }
    }

    fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// One backend accepted by `accept`, drawn by weight among accepted backends.
    fn sample<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        accept: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        // Rejection sampling keeps the weighted distribution, conditioned on acceptance.
        for _ in 0..SAMPLE_ATTEMPTS {
            let point = rng.random_range(0..total);
            // The first backend whose cumulative weight exceeds the point; weight-0
            // backends share their predecessor's cumulative value and are never hit.
            let i = self.cumulative.partition_point(|&c| c <= point);
            if accept(i) {
                return Some(i);
            }
        }
        self.scan(rng, accept)
    }

    /// Weighted draw by linear scan over accepted backends, for when most are rejected.
    fn scan<R: Rng + ?Sized>(&self, rng: &mut R, accept: impl Fn(usize) -> bool) -> Option<usize> {
        let accepted_weight: u64 = (0..self.len())
            .filter(|&i| accept(i))
            .map(|i| self.weight(i))
            .sum();
        if accepted_weight == 0 {
            return None;
        }
        let mut point = rng.random_range(0..accepted_weight);
        let mut last = None;
        for i in (0..self.len()).filter(|&i| self.weight(i) > 0 && accept(i)) {
            let w = self.weight(i);
            if point < w {
                return Some(i);
            }
            point -= w;
            last = Some(i);
        }
        // Only reached if `accept` changed its answers between the two passes (it may read
        // live health flags); any accepted backend is then as good as another.
        last
    }
}

/// The P2C algorithm for one tier: a weighted two-choice pick among eligible backends,
/// and the least loaded weight-0 backend when no weighted one is eligible.
#[derive(Debug)]
pub(crate) struct P2cSelector {
    table: P2cTable,
    /// Weight-0 backends, which the weighted draw never hits.
    zero_weight: Box<[usize]>,
}

impl P2cSelector {
    pub(crate) fn new(weights: &[u32]) -> P2cSelector {
        P2cSelector {
            table: P2cTable::new(weights),
            zero_weight: zero_weight(weights),
        }
    }
}

impl TierSelector for P2cSelector {
    fn pick(
        &self,
        _key: u64,
        rng: &mut dyn RngCore,
        eligible: &dyn Fn(usize) -> bool,
        load: &dyn Fn(usize) -> u64,
    ) -> Option<usize> {
        self.table.pick(rng, load, eligible).or_else(|| {
            self.zero_weight
                .iter()
                .copied()
                .filter(|&i| eligible(i))
                .min_by_key(|&i| load(i))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::cell::RefCell;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(0x5eed)
    }

    /// Share of `picks` calls that returned each index.
    fn shares(
        table: &P2cTable,
        picks: usize,
        loads: &[u64],
        eligible: impl Fn(usize) -> bool,
    ) -> Vec<f64> {
        let mut rng = rng();
        let mut counts = vec![0usize; table.len()];
        for _ in 0..picks {
            let i = table
                .pick(&mut rng, |i| loads[i], &eligible)
                .expect("something eligible");
            counts[i] += 1;
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    #[test]
    fn idle_backend_wins_two_thirds_and_busy_only_against_busy() {
        // Equal weights: each of the 3 unordered pairs is drawn with probability 1/3.
        // Index 2 (idle) is in two of them and wins both: P = 2/3. Indices 0 and 1 win only
        // as the tie winner of the pair {0, 1}: 1/6 each.
        let table = P2cTable::new(&[1, 1, 1]);
        let loads = [100u64, 100, 0];
        let mut rng = rng();
        let picks = 30_000;
        let mut counts = [0usize; 3];
        for _ in 0..picks {
            let asked = RefCell::new(Vec::new());
            let got = table
                .pick(
                    &mut rng,
                    |i| {
                        asked.borrow_mut().push(i);
                        loads[i]
                    },
                    |_| true,
                )
                .expect("all eligible");
            counts[got] += 1;
            let mut asked = asked.into_inner();
            asked.sort_unstable();
            assert_eq!(asked.len(), 2, "load read for exactly the two candidates");
            if got != 2 {
                assert_eq!(
                    asked,
                    [0, 1],
                    "busy backend {got} picked against the idle one"
                );
            }
        }
        // Binomial sd at 30k picks is 0.0027; 0.015 is over 5 sd, so a correct pick never
        // fails here while a biased one (e.g. 3/4 or 1/2) does.
        let idle = counts[2] as f64 / picks as f64;
        assert!((idle - 2.0 / 3.0).abs() < 0.015, "idle share {idle}");
        for busy in [0, 1] {
            let share = counts[busy] as f64 / picks as f64;
            assert!(
                (share - 1.0 / 6.0).abs() < 0.015,
                "busy {busy} share {share}"
            );
        }
    }

    #[test]
    fn idle_backends_share_picks_by_weight() {
        // Two backends always form the pair and always tie at zero load, so the result is
        // the first sample: exactly 1/4 and 3/4. sd at 20k picks is 0.0031; 0.015 is ~5 sd.
        let share = shares(&P2cTable::new(&[1, 3]), 20_000, &[0, 0], |_| true);
        assert!((share[1] - 0.75).abs() < 0.015, "shares {share:?}");

        // More backends: sampling by weight still shows through (1 is twice 0 and so on).
        let share = shares(&P2cTable::new(&[1, 2, 4]), 20_000, &[0, 0, 0], |_| true);
        assert!(
            share[0] < share[1] && share[1] < share[2],
            "shares {share:?}"
        );
    }

    #[test]
    fn load_is_compared_per_unit_of_weight() {
        // 10 connections on weight 1 is busier than 25 on weight 3 (8.3 per unit).
        let share = shares(&P2cTable::new(&[1, 3]), 1_000, &[10, 25], |_| true);
        assert_eq!(share[1], 1.0);
        // Extremes must not overflow the cross-multiplication.
        let share = shares(
            &P2cTable::new(&[u32::MAX, 1]),
            1_000,
            &[u64::MAX, u64::MAX - 1],
            |_| true,
        );
        assert_eq!(share[0], 1.0);
    }

    #[test]
    fn eligibility_is_respected() {
        let table = P2cTable::new(&[1; 10]);
        let loads = [0u64; 10];
        let share = shares(&table, 5_000, &loads, |i| i % 2 == 0);
        assert!(
            share
                .iter()
                .enumerate()
                .all(|(i, &s)| i % 2 == 0 || s == 0.0),
            "{share:?}"
        );
        assert!(share.iter().step_by(2).all(|&s| s > 0.1), "{share:?}");

        // A single eligible backend among many defeats sampling and exercises the scan.
        let share = shares(&table, 1_000, &loads, |i| i == 7);
        assert_eq!(share[7], 1.0);

        let mut rng = rng();
        assert_eq!(table.pick(&mut rng, |_| 0, |_| false), None);
        assert_eq!(P2cTable::new(&[]).pick(&mut rng, |_| 0, |_| true), None);
    }

    #[test]
    fn zero_weight_only_when_all_are_zero() {
        let share = shares(&P2cTable::new(&[0, 1, 1]), 5_000, &[0, 50, 50], |_| true);
        assert_eq!(share[0], 0.0, "weight 0 picked though it is idle");
        // Ineligible weighted backends do not promote a weight-0 one.
        let mut rng = rng();
        assert_eq!(
            P2cTable::new(&[0, 1]).pick(&mut rng, |_| 0, |i| i == 0),
            None
        );

        let share = shares(&P2cTable::new(&[0; 4]), 20_000, &[0; 4], |_| true);
        assert!(
            share.iter().all(|&s| (s - 0.25).abs() < 0.02),
            "all-zero not uniform: {share:?}"
        );
    }
}
