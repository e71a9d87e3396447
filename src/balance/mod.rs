//! Backend selection: a small trait, [`TierSelector`], with one implementation per
//! algorithm (`maglev.rs`, `p2c.rs`), and the walk over a snapshot's tiers (`select.rs`).
//!
//! This module owns pure, immutable selection data built from backend names and weights.
//! It must not do I/O, read clocks, track health or hold locks, and it knows nothing of the
//! pool: callers pass in loads and eligibility (`select::Candidate`), so the hot path only
//! reads tables that were built off it. A new algorithm is one file here implementing
//! [`TierSelector`], plus its `config::Balance` value and its arm in [`Selection::build`].

pub(crate) mod maglev;
pub(crate) mod p2c;
mod seen;
pub mod select;

use std::fmt;

use rand::RngCore;

use crate::config::Balance;

pub(crate) use maglev::MaglevSelector;
pub use maglev::{MaglevError, MaglevTable, Preference};
pub(crate) use p2c::P2cSelector;
pub use p2c::P2cTable;

/// The selection of one tier for one algorithm, built off the hot path (on discovery's
/// blocking thread) and stored in the immutable snapshot. Members are the tier's backends
/// by index, in the order the selector was built with.
pub trait TierSelector: Send + Sync + fmt::Debug {
    /// The algorithm's choice for a client with `key` among the members for which
    /// `eligible(i)` holds, or `None` when none does. `load(i)` is member `i`'s open
    /// connections. Weight-0 members are chosen only when no weighted member is eligible
    /// (RFC 2782). Must not allocate in proportion to the tier.
    fn pick(
        &self,
        key: u64,
        rng: &mut dyn RngCore,
        eligible: &dyn Fn(usize) -> bool,
        load: &dyn Fn(usize) -> u64,
    ) -> Option<usize>;
}

/// A service's selection algorithm with its parameters: what every tier's selector is
/// built from. A P2C selection builds no Maglev table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    pub(crate) balance: Balance,
    /// Slots of a Maglev table (prime); unused by other algorithms.
    pub(crate) maglev_size: usize,
}

/// Why a tier's selector could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("building the Maglev table: {0}")]
    Maglev(#[from] MaglevError),
}

impl Selection {
    /// `balance` with the default parameters.
    pub fn new(balance: Balance) -> Selection {
        Selection {
            balance,
            maglev_size: MaglevTable::DEFAULT_SIZE,
        }
    }

    /// Maglev with a table of `size` slots (tests use small primes).
    #[cfg(test)]
    pub(crate) fn maglev(size: usize) -> Selection {
        Selection {
            balance: Balance::Maglev,
            maglev_size: size,
        }
    }

    /// The selector of one tier whose members have these identity `names` and `weights`.
    pub(crate) fn build(
        &self,
        names: &[&str],
        weights: &[u32],
    ) -> Result<Box<dyn TierSelector>, SelectorError> {
        Ok(match self.balance {
            Balance::Maglev => Box::new(MaglevSelector::build(names, weights, self.maglev_size)?),
            Balance::P2c => Box::new(P2cSelector::new(weights)),
        })
    }
}

/// Indices of the weight-0 members: RFC 2782's "only when nothing weighted is usable".
pub(crate) fn zero_weight(weights: &[u32]) -> Box<[usize]> {
    weights
        .iter()
        .enumerate()
        .filter(|(_, w)| **w == 0)
        .map(|(i, _)| i)
        .collect()
}

/// FNV-1a 64-bit offset basis (the published constant).
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV 64-bit prime (the published constant).
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Stable 64-bit hash of a selection key (client address bytes).
///
/// Identical across processes, restarts, machines and srvlb versions, so every instance
/// sends a client to the same backend. It is FNV-1a 64 followed by the splitmix64
/// finalizer: FNV is fully specified but its low bits mix poorly, and the table index is
/// taken modulo the table size, so the finalizer spreads every input bit over the output.
///
/// Changing this function remaps every client across a fleet that is mid-upgrade; the
/// known-answer tests below exist to make such a change deliberate.
pub fn hash_key(bytes: &[u8]) -> u64 {
    splitmix64_mix(fnv1a64(bytes, FNV_OFFSET_BASIS))
}

/// FNV-1a over `bytes` starting from `basis`; a different basis gives a second,
/// independently behaving hash of the same bytes (Maglev needs two per backend).
pub(crate) fn fnv1a64(bytes: &[u8], basis: u64) -> u64 {
    bytes
        .iter()
        .fold(basis, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// The splitmix64 output function (Steele, Lea and Flood): a bijective 64-bit mixer.
pub(crate) fn splitmix64_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published FNV-1a 64 test vectors, so the first stage is checked against an
    /// outside reference rather than against itself.
    #[test]
    fn fnv1a64_matches_published_vectors() {
        assert_eq!(fnv1a64(b"", FNV_OFFSET_BASIS), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a", FNV_OFFSET_BASIS), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar", FNV_OFFSET_BASIS), 0x8594_4171_f739_67e8);
    }

    /// splitmix64 seeded with 0 yields mix(gamma), mix(2*gamma), ...; its first two
    /// published outputs pin the finalizer.
    #[test]
    fn splitmix64_mix_matches_published_sequence() {
        const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
        assert_eq!(splitmix64_mix(GAMMA), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64_mix(GAMMA.wrapping_mul(2)), 0x6e78_9e6a_a1b9_65f4);
    }

    /// Known answers for the composed key hash (cross-checked with an independent Python
    /// implementation). If this fails, instances running the old version disagree with the
    /// new one about where every client goes.
    #[test]
    fn hash_key_known_answers_are_pinned() {
        let pinned: [(&[u8], u64); 4] = [
            (b"", 0xf52a_15e9_a9b5_e89b),
            (&[10, 0, 0, 1], 0xe7a7_7091_5e3a_6bb4),
            (
                &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                0x216d_ba65_aa6c_0c57,
            ),
            (b"192.168.1.20", 0x36ec_d85e_cebc_b2ee),
        ];
        for (input, want) in pinned {
            assert_eq!(hash_key(input), want, "hash_key({input:?})");
        }
    }
}
