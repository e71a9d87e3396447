//! Maglev consistent-hash lookup table (Eisenbud et al., NSDI 2016), weighted.
//!
//! Owns building the table from backend names and weights, key lookup, and each key's
//! preference order for skipping ejected backends. It must not know about health or
//! connections, and the table depends only on the set of (name, weight) pairs, never on
//! input order or process state, so every instance agrees.

use std::fmt;
use std::iter::FusedIterator;

use rand::RngCore;

use super::seen::Seen;
use super::{TierSelector, fnv1a64, hash_key, splitmix64_mix, zero_weight};

/// Why a table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// The permutation walk only visits every slot when the size is prime.
    #[error("maglev table size {0} is not prime")]
    SizeNotPrime(usize),
    /// `names` and `weights` must be parallel slices.
    #[error("{names} backend names but {weights} weights")]
    LengthMismatch { names: usize, weights: usize },
    /// Two backends with one identity would make the name-per-slot table ambiguous.
    #[error("backend name {0:?} appears more than once")]
    DuplicateName(String),
    /// Slots store `u32` indices, one value of which marks an empty slot during build.
    #[error("{0} backends is more than a maglev table can index")]
    TooManyBackends(usize),
}

/// Basis for the second (skip) hash of a backend name. Together with [`hash_key`] for the
/// offset it defines which slots a name prefers; changing either reshuffles every table.
const SKIP_BASIS: u64 = 0x84222325_cbf29ce4;

/// Marks a slot not yet taken while the table is populated.
const EMPTY: u32 = u32::MAX;

/// Slot owners as indices into the caller's slices. Stored as `u16` whenever the backend
/// count allows, halving the table (128 KiB at the default size) for the CPU cache.
#[derive(Clone)]
enum Slots {
    Narrow(Box<[u16]>),
    Wide(Box<[u32]>),
}

impl Slots {
    fn len(&self) -> usize {
        match self {
            Slots::Narrow(s) => s.len(),
            Slots::Wide(s) => s.len(),
        }
    }

    #[inline]
    fn get(&self, slot: usize) -> usize {
        match self {
            Slots::Narrow(s) => usize::from(s[slot]),
            Slots::Wide(s) => s[slot] as usize,
        }
    }
}

/// An immutable Maglev lookup table; build it off the hot path and share it.
#[derive(Clone)]
pub struct MaglevTable {
    slots: Slots,
    /// Length of the slices given to [`MaglevTable::build`].
    backend_count: usize,
    /// Backends that own at least one slot: the length of every preference order.
    owners: usize,
}

/// Per-backend state while populating: where its permutation stands and its credit.
struct Filler {
    caller_index: u32,
    position: u64,
    skip: u64,
    weight: u64,
    credit: u64,
}

impl MaglevTable {
    /// A prime near 2^16: large enough that 1000 backends each get ~65 slots (shares
    /// within 2%), small enough to rebuild in milliseconds and stay cache friendly.
    pub const DEFAULT_SIZE: usize = 65537;

    /// Builds the table for `names[i]` with `weights[i]`; lookups return such an `i`.
    ///
    /// `size` must be prime. A backend with weight 0 gets no slots, unless every weight is
    /// 0, in which case all count as weight 1 (an all-zero SRV set still serves). An empty
    /// backend list gives an empty table whose lookups return `None`.
    pub fn build(names: &[&str], weights: &[u32], size: usize) -> Result<MaglevTable, MaglevError> {
        if names.len() != weights.len() {
            return Err(MaglevError::LengthMismatch {
                names: names.len(),
                weights: weights.len(),
            });
        }
        if !is_prime(size) {
            return Err(MaglevError::SizeNotPrime(size));
        }
        let count = names.len();
        if u32::try_from(count).map_or(true, |c| c == EMPTY) {
            return Err(MaglevError::TooManyBackends(count));
        }
        if count == 0 {
            return Ok(MaglevTable {
                slots: Slots::Wide(Box::new([])),
                backend_count: 0,
                owners: 0,
            });
        }

        let fillers = fillers(names, weights, size)?;
        let table = populate(fillers, size);
        let owners = {
            let mut owns = vec![false; count];
            table.iter().for_each(|&i| owns[i as usize] = true);
            owns.iter().filter(|&&o| o).count()
        };
        let slots = if count <= usize::from(u16::MAX) {
            // Every entry is < count <= u16::MAX, so the narrowing is exact.
            Slots::Narrow(table.iter().map(|&i| i as u16).collect())
        } else {
            Slots::Wide(table.into_boxed_slice())
        };
        Ok(MaglevTable {
            slots,
            backend_count: count,
            owners,
        })
    }

    /// Number of slots; 0 for a table built from no backends.
    pub(crate) fn size(&self) -> usize {
        self.slots.len()
    }

    /// Length of the slices the table was built from, including weight-0 backends.
    #[cfg(test)]
    pub(crate) fn backend_count(&self) -> usize {
        self.backend_count
    }

    /// The backend that owns the key's slot, as an index into the build slices.
    #[inline]
    pub fn lookup(&self, key_hash: u64) -> Option<usize> {
        let size = self.size();
        if size == 0 {
            return None;
        }
        Some(self.slots.get((key_hash % size as u64) as usize))
    }

    /// The key's preference order: [`lookup`](Self::lookup) first, then each further
    /// backend as first met walking the table onward from the key's slot (wrapping).
    ///
    /// Walking the table instead of rebuilding it is what keeps ejection cheap and local:
    /// keys of an available backend never move, and the keys of an unavailable one land on
    /// whichever backends follow their slots, which are spread across the whole set.
    /// Every backend that owns a slot appears exactly once.
    pub fn preference(&self, key_hash: u64) -> Preference<'_> {
        let size = self.size();
        Preference {
            table: self,
            slot: if size == 0 {
                0
            } else {
                (key_hash % size as u64) as usize
            },
            unvisited: size,
            remaining: self.owners,
            seen: Seen::for_backends(self.backend_count),
        }
    }
}

/// The backends that take slots, in name order so that the caller's order cannot influence
/// the table, each with its permutation (offset and skip) and weight. Callers have checked
/// that `names` and `weights` are parallel, non-empty and fewer than `u32::MAX`.
fn fillers(names: &[&str], weights: &[u32], size: usize) -> Result<Vec<Filler>, MaglevError> {
    let mut by_name: Vec<usize> = (0..names.len()).collect();
    by_name.sort_unstable_by(|&a, &b| names[a].cmp(names[b]));
    if let Some(pair) = by_name.windows(2).find(|p| names[p[0]] == names[p[1]]) {
        return Err(MaglevError::DuplicateName(names[pair[0]].to_owned()));
    }
    let all_zero = weights.iter().all(|&w| w == 0);
    let m = size as u64;
    Ok(by_name
        .iter()
        .filter(|&&i| all_zero || weights[i] > 0)
        .map(|&i| {
            let name = names[i].as_bytes();
            Filler {
                // Fits: count < u32::MAX was checked by the caller.
                caller_index: i as u32,
                position: hash_key(name) % m,
                skip: splitmix64_mix(fnv1a64(name, SKIP_BASIS)) % (m - 1) + 1,
                weight: if all_zero { 1 } else { u64::from(weights[i]) },
                credit: 0,
            }
        })
        .collect())
}

/// The paper's populate loop, weighted by credit: each round every backend earns its
/// weight and takes its next preferred free slot once it holds `max_weight`, so slot
/// counts follow weights and the heaviest backend takes one slot every round. Returns the
/// owner (caller index) of every slot.
fn populate(mut fillers: Vec<Filler>, size: usize) -> Vec<u32> {
    let max_weight = fillers.iter().map(|f| f.weight).max().unwrap_or(1);
    let m = size as u64;
    let mut table = vec![EMPTY; size];
    let mut filled = 0;
    'fill: loop {
        for f in &mut fillers {
            f.credit += f.weight;
            if f.credit < max_weight {
                continue;
            }
            f.credit -= max_weight;
            // Terminates: skip is in 1..m and m is prime, so the walk reaches every
            // slot, and at least one is still free.
            loop {
                let slot = f.position as usize;
                f.position = (f.position + f.skip) % m;
                if table[slot] == EMPTY {
                    table[slot] = f.caller_index;
                    break;
                }
            }
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

impl fmt::Debug for MaglevTable {
    // The slots themselves are tens of thousands of numbers; the shape is what helps.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MaglevTable")
            .field("size", &self.size())
            .field("backend_count", &self.backend_count)
            .field("owners", &self.owners)
            .finish_non_exhaustive()
    }
}

/// The Maglev algorithm for one tier: the client's key walks the table's preference order
/// to the first eligible backend, so only keys of an ejected backend move.
#[derive(Debug)]
pub(crate) struct MaglevSelector {
    table: MaglevTable,
    /// Weight-0 backends, which own no slots.
    zero_weight: Box<[usize]>,
}

impl MaglevSelector {
    /// See [`MaglevTable::build`].
    pub(crate) fn build(
        names: &[&str],
        weights: &[u32],
        size: usize,
    ) -> Result<MaglevSelector, MaglevError> {
        Ok(MaglevSelector {
            table: MaglevTable::build(names, weights, size)?,
            zero_weight: zero_weight(weights),
        })
    }
}

impl TierSelector for MaglevSelector {
    fn pick(
        &self,
        key: u64,
        _rng: &mut dyn RngCore,
        eligible: &dyn Fn(usize) -> bool,
        _load: &dyn Fn(usize) -> u64,
    ) -> Option<usize> {
        if let Some(i) = self.table.preference(key).find(|&i| eligible(i)) {
            return Some(i);
        }
        // Weight-0 backends, stable per client: start at a key-derived offset.
        let zero = self.zero_weight.iter().copied().filter(|&i| eligible(i));
        let candidates = zero.clone().count();
        if candidates == 0 {
            return None;
        }
        let skip = usize::try_from(key % candidates as u64).unwrap_or(0);
        zero.clone().nth(skip)
    }
}

/// Iterator over a key's backends in preference order; see [`MaglevTable::preference`].
#[derive(Debug, Clone)]
pub struct Preference<'a> {
    table: &'a MaglevTable,
    slot: usize,
    unvisited: usize,
    remaining: usize,
    seen: Seen,
}

impl Iterator for Preference<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.remaining > 0 && self.unvisited > 0 {
            let backend = self.table.slots.get(self.slot);
            self.unvisited -= 1;
            self.slot += 1;
            if self.slot == self.table.size() {
                self.slot = 0;
            }
            if self.seen.insert(backend) {
                self.remaining -= 1;
                return Some(backend);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // A full lap of the table meets every owner, so exactly `remaining` are left.
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Preference<'_> {}

impl FusedIterator for Preference<'_> {}

/// Whether `n` is prime, by trial division (table sizes are small and checked once).
pub(crate) fn is_prime(n: usize) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 || n % 3 == 0 {
        return false;
    }
    let mut d = 5usize;
    while d.checked_mul(d).is_some_and(|sq| sq <= n) {
        if n % d == 0 || n % (d + 2) == 0 {
            return false;
        }
        d += 6;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::seq::SliceRandom;

    const M: usize = MaglevTable::DEFAULT_SIZE;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("db{i}.example.:5432/10.0.{}.{}", i / 256, i % 256))
            .collect()
    }

    fn build(names: &[String], weights: &[u32]) -> MaglevTable {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        MaglevTable::build(&refs, weights, M).expect("valid table")
    }

    /// Slot count per backend index, read through the public lookup (slot s == hash s).
    fn slot_counts(table: &MaglevTable) -> Vec<usize> {
        let mut counts = vec![0; table.backend_count()];
        for slot in 0..table.size() {
            counts[table.lookup(slot as u64).expect("non-empty")] += 1;
        }
        counts
    }

    /// 100k distinct client addresses 10.0.0.0 onward, hashed as the proxy would.
    fn client_hashes() -> Vec<u64> {
        (0..100_000u32)
            .map(|i| hash_key(&(0x0a00_0000 + i).to_be_bytes()))
            .collect()
    }

    #[test]
    fn is_prime_small_and_default() {
        let primes: Vec<usize> = (0..40).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        assert!(is_prime(65537));
        assert!(!is_prime(65535));
        assert!(!is_prime(25) && !is_prime(49) && !is_prime(65537 * 3));
    }

    #[test]
    fn build_rejects_bad_input() {
        assert_eq!(
            MaglevTable::build(&["a"], &[1], 65536).unwrap_err(),
            MaglevError::SizeNotPrime(65536)
        );
        assert_eq!(
            MaglevTable::build(&["a", "b"], &[1], M).unwrap_err(),
            MaglevError::LengthMismatch {
                names: 2,
                weights: 1
            }
        );
        assert_eq!(
            MaglevTable::build(&["a", "b", "a"], &[1, 1, 1], M).unwrap_err(),
            MaglevError::DuplicateName("a".into())
        );
    }

    #[test]
    fn equal_weights_are_balanced() {
        for n in [3, 10, 100, 1000] {
            let counts = slot_counts(&build(&names(n), &vec![1; n]));
            let mean = M as f64 / n as f64;
            let max = *counts.iter().max().expect("n > 0") as f64;
            assert!(max / mean <= 1.05, "n={n}: max/mean = {}", max / mean);
            assert!(
                counts.iter().all(|&c| c > 0),
                "n={n}: a backend got no slots"
            );
        }
    }

    #[test]
    fn removing_one_backend_moves_about_one_nth() {
        let keys = client_hashes();
        for n in [5, 20, 100] {
            let all = names(n);
            let before = build(&all, &vec![1; n]);
            let removed = n / 2;
            let rest: Vec<String> = all
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != removed)
                .map(|(_, s)| s.clone())
                .collect();
            let after = build(&rest, &vec![1; n - 1]);

            let (mut moved, mut collateral) = (0usize, 0usize);
            for &k in &keys {
                let old = &all[before.lookup(k).expect("non-empty")];
                let new = &rest[after.lookup(k).expect("non-empty")];
                if old != new {
                    moved += 1;
                    if *old != all[removed] {
                        collateral += 1;
                    }
                }
            }
            let moved_frac = moved as f64 / keys.len() as f64;
            let collateral_frac = collateral as f64 / keys.len() as f64;
            eprintln!(
                "maglev remove 1 of {n}: moved {moved_frac:.4} (1/N = {:.4}), collateral {collateral_frac:.4}",
                1.0 / n as f64
            );
            assert!(moved_frac <= 1.7 / n as f64, "n={n}: moved {moved_frac}");
            assert!(
                collateral_frac <= 0.01,
                "n={n}: collateral {collateral_frac}"
            );
        }
    }

    /// `ejected` is unavailable: where each key goes by taking the first available backend
    /// in its preference order, with the table left as it is.
    fn route_around(table: &MaglevTable, key: u64, ejected: usize) -> usize {
        table
            .preference(key)
            .find(|&b| b != ejected)
            .expect("another backend exists")
    }

    #[test]
    fn ejection_moves_only_the_ejected_backends_keys_and_spreads_them() {
        let keys = client_hashes();
        for n in [20, 100] {
            let table = build(&names(n), &vec![1; n]);
            let ejected = 7;
            let mut landed = vec![0usize; n];
            for &k in &keys {
                let home = table.lookup(k).expect("non-empty");
                let now = route_around(&table, k, ejected);
                if home == ejected {
                    assert_ne!(now, ejected);
                    landed[now] += 1;
                } else {
                    assert_eq!(now, home, "a key of an available backend moved");
                }
            }
            let moved: usize = landed.iter().sum();
            let receivers = landed.iter().filter(|&&c| c > 0).count();
            let busiest = *landed.iter().max().expect("n > 0") as f64 / moved as f64;
            // Spread like the table itself: most survivors receive some, none takes more
            // than a few times its fair 1/(N-1) share.
            assert!(
                receivers >= (n - 1) * 3 / 4,
                "n={n}: only {receivers} backends received keys"
            );
            assert!(
                busiest <= 4.0 / (n - 1) as f64,
                "n={n}: one backend took {busiest} of moved keys"
            );
        }
    }

    #[test]
    fn input_order_does_not_change_the_table() {
        let all = names(50);
        let weights: Vec<u32> = (0..50).map(|i| 1 + i % 4).collect();
        let reference = build(&all, &weights);
        let mut pairs: Vec<(String, u32)> =
            all.iter().cloned().zip(weights.iter().copied()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..3 {
            pairs.shuffle(&mut rng);
            let (shuffled, shuffled_w): (Vec<String>, Vec<u32>) = pairs.iter().cloned().unzip();
            let table = build(&shuffled, &shuffled_w);
            for slot in 0..M as u64 {
                let want = &all[reference.lookup(slot).expect("non-empty")];
                let got = &shuffled[table.lookup(slot).expect("non-empty")];
                assert_eq!(want, got, "slot {slot}");
            }
        }
    }

    #[test]
    fn weights_set_slot_shares() {
        let counts = slot_counts(&build(&names(3), &[1, 2, 3]));
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].into_iter().enumerate() {
            let share = counts[i] as f64 / M as f64;
            assert!(
                (share / want - 1.0).abs() <= 0.05,
                "backend {i}: share {share}, want {want}"
            );
        }

        let counts = slot_counts(&build(&names(4), &[5, 0, 5, 5]));
        assert_eq!(counts[1], 0, "weight 0 got slots");
        let table = build(&names(4), &[5, 0, 5, 5]);
        assert!(
            table.preference(1).all(|b| b != 1),
            "weight 0 is in a preference order"
        );

        let counts = slot_counts(&build(&names(4), &[0; 4]));
        let (min, max) = (
            counts.iter().min().expect("4"),
            counts.iter().max().expect("4"),
        );
        assert!(max - min <= 1, "all-zero weights not equal: {counts:?}");
    }

    #[test]
    fn empty_table_looks_up_nothing() {
        let table = MaglevTable::build(&[], &[], M).expect("empty is valid");
        assert_eq!(table.lookup(42), None);
        assert_eq!(table.preference(42).next(), None);
        assert_eq!((table.size(), table.backend_count()), (0, 0));
    }

    #[test]
    fn preference_starts_at_lookup_and_covers_each_backend_once() {
        // 64 and 65 straddle the inline bitset; 100 and 1000 exercise the spill to heap.
        for n in [1, 2, 3, 64, 65, 100, 1000] {
            let table = build(&names(n), &vec![1; n]);
            for key in [0u64, 1, 65536, u64::MAX, hash_key(b"10.1.2.3")] {
                assert_eq!(table.preference(key).len(), n, "n={n}: size hint");
                let order: Vec<usize> = table.preference(key).collect();
                assert_eq!(order.first().copied(), table.lookup(key), "n={n}");
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n={n} key={key}");
            }
        }
    }

    #[test]
    fn wide_indices_above_u16() {
        // More backends than u16 can index forces the u32 table; only ~1 slot each.
        let n = usize::from(u16::MAX) + 2;
        let all = names(n);
        let table = build(&all, &vec![1; n]);
        assert!(matches!(table.slots, Slots::Wide(_)));
        let counts = slot_counts(&table);
        assert!(counts.iter().all(|&c| c <= 1));
        assert_eq!(table.preference(3).count(), table.owners);
    }
}
