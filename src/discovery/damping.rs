//! Damping: the rule that keeps a partial or broken answer from removing most of a service
//! at once. Additions are never held back (a rollout's new pods are usable from the first
//! answer that lists them); only a removal of more than half of the backends waits for a
//! second lookup to confirm it, and the backends it would remove stay in service meanwhile.
//! Pure set arithmetic on sorted endpoint lists, linear in the answer size.

use std::collections::HashSet;
use std::net::SocketAddr;

use crate::pool::Endpoint;

/// What to do with a new answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The answer is the current set (in some order): nothing to publish, unless a pending
    /// large removal is dropped by it (`dropped_pending`), which republishes the current set.
    Same { dropped_pending: bool },
    /// Apply the answer as the new set. `confirmed` is `(removed, of)` when it confirms a
    /// large removal held back by the previous lookup.
    Apply { confirmed: Option<(usize, usize)> },
    /// A large removal seen for the first time: publish the answer plus `held` (the backends
    /// it would remove, still served) and wait for the next lookup.
    Hold {
        held: Vec<Endpoint>,
        removed: usize,
        of: usize,
    },
}

type Key<'a> = (&'a str, u16, SocketAddr);

fn key(ep: &Endpoint) -> Key<'_> {
    (ep.target.as_str(), ep.port, ep.addr)
}

/// Judges `next` (sorted like `current`) against the current set and the answer waiting
/// for confirmation.
pub(super) fn judge(
    current: &[Endpoint],
    pending: Option<&[Endpoint]>,
    next: &[Endpoint],
) -> Verdict {
    if next == current {
        return Verdict::Same {
            dropped_pending: pending.is_some(),
        };
    }
    let next_keys: HashSet<Key<'_>> = next.iter().map(key).collect();
    let removed: Vec<&Endpoint> = current
        .iter()
        .filter(|old| !next_keys.contains(&key(old)))
        .collect();
    let large = !current.is_empty() && removed.len() * 2 > current.len();
    if !large {
        return Verdict::Apply { confirmed: None };
    }
    if pending == Some(next) {
        return Verdict::Apply {
            confirmed: Some((removed.len(), current.len())),
        };
    }
    Verdict::Hold {
        removed: removed.len(),
        of: current.len(),
        held: demote(removed, next),
    }
}

/// The held backends as they are published meanwhile. A held backend whose priority has no
/// backend in the new answer moves behind every priority of the answer (staying ahead of
/// the static last-resort tier): it must not keep a replaced tier preferred over the new
/// one (a -> b with another priority), yet still serves should the new backends fail.
/// Held backends in a priority the answer still has stay there, so a broken answer's
/// survivors do not take the whole load.
fn demote(removed: Vec<&Endpoint>, next: &[Endpoint]) -> Vec<Endpoint> {
    let priorities: HashSet<u16> = next.iter().map(|ep| ep.priority).collect();
    let behind = next
        .iter()
        .map(|ep| ep.priority)
        .max()
        .map_or(0, |p| p.saturating_add(1))
        .min(super::STATIC_PRIORITY - 1);
    removed
        .into_iter()
        .map(|ep| {
            let mut ep = ep.clone();
            if !priorities.contains(&ep.priority) {
                ep.priority = ep.priority.max(behind);
            }
            ep
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::test_support::ep;

    #[test]
    fn a_rollout_is_held_only_for_its_removals() {
        let old = vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)];
        let new = vec![ep("d.", 4), ep("e.", 5), ep("f.", 6)];
        let Verdict::Hold { held, removed, of } = judge(&old, None, &new) else {
            panic!("a removal of 3 of 3 must wait");
        };
        assert_eq!((removed, of), (3, 3));
        assert_eq!(held, old, "the old pods stay in service until confirmed");
        assert_eq!(
            judge(&old, Some(&new), &new),
            Verdict::Apply {
                confirmed: Some((3, 3))
            }
        );
    }

    #[test]
    fn a_held_backend_of_a_replaced_tier_moves_behind_the_new_one() {
        let a = ep("a.", 1);
        let mut b = ep("b.", 2);
        b.priority = 20;
        let Verdict::Hold { held, .. } =
            judge(std::slice::from_ref(&a), None, std::slice::from_ref(&b))
        else {
            panic!("replacing the only backend waits for confirmation");
        };
        assert_eq!(held[0].priority, 21, "{held:?}");
        // In a priority the answer keeps, a held backend stays where it was.
        let old = vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)];
        let Verdict::Hold { held, .. } = judge(&old, None, &[ep("c.", 3)]) else {
            panic!("2 of 3 removed");
        };
        assert!(held.iter().all(|h| h.priority == 10), "{held:?}");
    }

    #[test]
    fn additions_and_small_removals_apply_at_once() {
        let old = vec![ep("a.", 1), ep("b.", 2)];
        let grown = vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)];
        assert_eq!(
            judge(&old, None, &grown),
            Verdict::Apply { confirmed: None }
        );
        // Exactly half is not "more than half".
        assert_eq!(
            judge(&old, None, &[ep("a.", 1)]),
            Verdict::Apply { confirmed: None }
        );
        assert_eq!(judge(&[], None, &grown), Verdict::Apply { confirmed: None });
    }

    #[test]
    fn the_current_set_again_drops_a_pending_removal() {
        let old = vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)];
        let broken = vec![ep("c.", 3)];
        assert!(matches!(judge(&old, None, &broken), Verdict::Hold { .. }));
        assert_eq!(
            judge(&old, Some(&broken), &old),
            Verdict::Same {
                dropped_pending: true
            }
        );
        assert_eq!(
            judge(&old, None, &old),
            Verdict::Same {
                dropped_pending: false
            }
        );
        // Another large removal restarts the wait instead of confirming the first.
        assert!(matches!(
            judge(&old, Some(&broken), &[ep("a.", 1)]),
            Verdict::Hold { .. }
        ));
    }
}
