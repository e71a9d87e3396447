//! The refresh policy every source shares: when to ask the source again (the answer's TTL,
//! back-off after failures, the registry's negative TTL), what an answer does to the pool
//! (last-known-good on a failed lookup, the empty hold on an absent service, damping of a
//! large removal), and the static backends published beside the source's. One
//! [`Discovery`] task runs per service; only it writes the service's pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::schedule::{absent_backoff, failure_backoff, refresh_after};
use super::status::{Absence, DiscoveryStatus, unix_ms};
use super::tiers::{TIER_CHECK, TierWatch};
use super::{Answer, Fetched, Source, Unresolved};
use crate::config::ResolverConfig;
use crate::pool::{Endpoint, Pool};

/// The registry's "absent" as the loop tracks it.
#[derive(Debug, Clone, Copy)]
struct AbsentState {
    since: Instant,
    rounds: u32,
    emptied: bool,
}

/// How much of the set a round looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// The whole set (the SRV records and their targets): the answer says everything
    /// about the registry (staleness, the empty hold, the next full round).
    Full,
    /// Only some targets' addresses. `records_current`: the records came from a query that
    /// answered, so a found set ends staleness (the targets were what failed); otherwise
    /// the answer says nothing about the registry.
    Addresses { records_current: bool },
}

/// The refresh loop of one service over its source `S`. Runs until `shutdown` flips to true.
pub(crate) struct Discovery<S> {
    pub(super) service: String,
    source: S,
    /// Published beside every answer of the source: the static last-resort tier.
    pub(super) fixed: Vec<Endpoint>,
    /// The refresh settings in use: taken from `settings_updates` at each refresh.
    settings: ResolverConfig,
    /// A reload that changes only min_refresh, max_refresh or empty_hold sends them here
    /// instead of restarting discovery (which would throw away the pool's state).
    settings_updates: watch::Receiver<ResolverConfig>,
    pub(super) pool: Arc<Pool>,
    status: Arc<DiscoveryStatus>,
    /// When the source is asked for its whole set next.
    due: Instant,
    /// TTL of the previous answer, for `refresh_after`.
    ttl: u32,
    /// Negative TTL of the latest absent answer.
    negative_ttl: Option<u32>,
    /// The source's part of the set the pool serves (sorted), confirmed.
    pub(super) current: Arc<Vec<Endpoint>>,
    /// An answer that would remove more than half of the backends, waiting for confirmation;
    /// its additions are already served.
    pub(super) pending: Option<Arc<Vec<Endpoint>>>,
    /// Since when the registry has said "absent" (NXDOMAIN / empty / ".").
    absent: Option<AbsentState>,
    consecutive_failures: u32,
    /// Whether any lookup has answered yet (start-up failures get their own log line).
    answered: bool,
    /// (skipped, kept, targets) of the last answer with unresolved targets, for logging.
    unresolved_counts: Option<(usize, usize, usize)>,
    tier_watch: TierWatch,
}

impl<S: Source> Discovery<S> {
    /// `fixed` endpoints are served beside whatever `source` finds.
    pub(crate) fn new(
        service: &str,
        source: S,
        fixed: Vec<Endpoint>,
        mut settings_updates: watch::Receiver<ResolverConfig>,
        pool: Arc<Pool>,
        status: Arc<DiscoveryStatus>,
    ) -> Discovery<S> {
        let settings = settings_updates.borrow_and_update().clone();
        Discovery {
            service: service.to_owned(),
            source,
            fixed,
            settings,
            settings_updates,
            pool,
            status,
            due: Instant::now(),
            ttl: 0,
            negative_ttl: None,
            current: Arc::new(Vec::new()),
            pending: None,
            absent: None,
            consecutive_failures: 0,
            answered: false,
            unresolved_counts: None,
            tier_watch: TierWatch::default(),
        }
    }

    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // The static backends serve before the source's first answer; a fixed source's
        // first answer is its whole set anyway.
        if self.source.refreshes() {
            self.publish(&[]).await;
        }
        let mut tier_tick = tokio::time::interval(TIER_CHECK);
        tier_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The lookups are the long part of a round (up to the SRV timeout plus the
            // targets' budget): they run under the same select, so a retired service's task
            // ends at once instead of finishing a refresh nobody wants.
            let full = Instant::now() >= self.due;
            let fetched = {
                let round = self.source.fetch(full, &self.settings);
                tokio::pin!(round);
                loop {
                    tokio::select! {
                        fetched = &mut round => break fetched,
                        _ = tier_tick.tick() => self.tier_watch.check(&self.service, &self.pool),
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                }
            };
            self.take(fetched, full).await;
            self.status.first_outcome_applied();
            if !self.source.refreshes() {
                break;
            }
            if !self.sleep(&mut tier_tick, &mut shutdown).await {
                return;
            }
        }
        // A fixed set: nothing to refresh, but health can still switch tiers.
        loop {
            tokio::select! {
                _ = tier_tick.tick() => self.tier_watch.check(&self.service, &self.pool),
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Acts on one round of the source.
    async fn take(&mut self, fetched: Fetched, full: bool) {
        if let Some(answer) = fetched.answer {
            self.negative_ttl = fetched.negative_ttl;
            let scope = if full {
                Scope::Full
            } else {
                Scope::Addresses {
                    records_current: fetched.records_current,
                }
            };
            let delay = self.refresh(answer, scope).await;
            if full {
                self.due = Instant::now() + delay;
            }
        }
        if fetched.full_round_now {
            self.due = Instant::now();
        }
    }

    /// Waits until the next round is due (the whole set, or the source's own refreshes),
    /// checking tiers meanwhile. False when the service is shutting down.
    async fn sleep(
        &mut self,
        tier_tick: &mut tokio::time::Interval,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let wake = self
            .source
            .next_due()
            .map_or(self.due, |due| due.min(self.due));
        let next = tokio::time::sleep_until(wake.into());
        tokio::pin!(next);
        let mut settings_live = true;
        loop {
            tokio::select! {
                _ = &mut next => return true,
                _ = tier_tick.tick() => self.tier_watch.check(&self.service, &self.pool),
                // A reload changed the refresh settings: look again now, so a shorter
                // max_refresh or empty_hold does not wait out the old, longer interval.
                changed = self.settings_updates.changed(), if settings_live => match changed {
                    Ok(()) => {
                        self.due = Instant::now();
                        return true;
                    }
                    Err(_) => settings_live = false, // the service is gone; shutdown follows
                },
                _ = shutdown.wait_for(|stop| *stop) => return false,
            }
        }
    }

    /// The consequences of one answer; returns when to ask for the whole set again (only
    /// meaningful for a full round).
    pub(super) async fn refresh(&mut self, answer: Answer, scope: Scope) -> Duration {
        // Settings from a reload apply from here on: the hold, the next interval. (Read
        // unconditionally: the sleep above may already have marked the change as seen.)
        self.settings = self.settings_updates.borrow_and_update().clone();
        match answer {
            Answer::Found {
                endpoints,
                ttl,
                unresolved,
            } => self.found(endpoints, ttl, unresolved, scope).await,
            Answer::Absent(why) => self.absent(why).await,
            Answer::Failed(why) => self.failed(why),
        }
    }

    async fn found(
        &mut self,
        endpoints: Vec<Endpoint>,
        ttl: u32,
        unresolved: Option<Unresolved>,
        scope: Scope,
    ) -> Duration {
        self.log_unresolved(unresolved);
        match scope {
            Scope::Full => {}
            Scope::Addresses { records_current } => {
                // Before the pool holds the set, so that /status never calls a served
                // set stale. (Not a refresh: the registry was not asked.)
                if records_current && self.status.recover() {
                    self.consecutive_failures = 0;
                    info!(service = %self.service, srv = self.source.name(), backends = endpoints.len(), "DNS lookups recovered");
                }
                self.accept_answer(endpoints).await;
                return Duration::ZERO;
            }
        }
        let srv = self.source.name();
        self.answered = true;
        self.consecutive_failures = 0;
        if self.status.succeed() {
            info!(service = %self.service, srv, backends = endpoints.len(), "DNS lookups recovered");
        }
        let was_absent = self.absent.take();
        if let Some(absent) = was_absent {
            if absent.emptied {
                info!(service = %self.service, srv, backends = endpoints.len(), absent_ms = absent.since.elapsed().as_millis() as u64, "SRV records are back; restoring the backends the empty hold had removed");
            } else {
                info!(service = %self.service, srv, backends = endpoints.len(), "SRV records are back; empty hold cancelled");
            }
        }
        self.accept_answer(endpoints).await;
        // Only now that the pool holds the answer: /status must not say the hold is over
        // while clients would still find no backend.
        if was_absent.is_some() {
            *self.status.absence.lock() = None;
        }
        let previous = std::mem::replace(&mut self.ttl, ttl);
        // `rand::rng()` per use: the thread-local generator must not be held across an await.
        refresh_after(ttl, previous, &self.settings, &mut rand::rng())
    }

    /// The registry says the service is absent: the empty hold starts (or goes on), and
    /// once it has lasted `empty_hold` the source's backends are removed.
    async fn absent(&mut self, why: &'static str) -> Duration {
        self.answered = true;
        self.consecutive_failures = 0;
        if self.status.succeed() {
            info!(service = %self.service, srv = self.source.name(), reason = why, "DNS lookups recovered");
        }
        let hold = self.settings.empty_hold;
        let absent = match &mut self.absent {
            Some(absent) => {
                absent.rounds = absent.rounds.saturating_add(1);
                *absent
            }
            None => self.start_hold(why, hold),
        };
        let delay = absent_backoff(
            absent.rounds,
            self.negative_ttl.take(),
            &self.settings,
            &mut rand::rng(),
        );
        let held = absent.since.elapsed();
        if held >= hold {
            if !absent.emptied {
                self.end_hold(why, held).await;
            }
            return delay;
        }
        // Back off, but look again no later than the end of the hold, so that the pool
        // empties on time.
        let remaining = hold.saturating_sub(held);
        delay.min(remaining.max(Duration::from_millis(50)))
    }

    /// The first absent answer: the hold starts, visible in /status.
    fn start_hold(&mut self, why: &'static str, hold: Duration) -> AbsentState {
        let serving = !self.current.is_empty() || self.pending.is_some();
        let absent = AbsentState {
            since: Instant::now(),
            rounds: 1,
            emptied: !serving,
        };
        self.absent = Some(absent);
        let since_unix_ms = unix_ms();
        let hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
        *self.status.absence.lock() = Some(Absence {
            reason: why.to_owned(),
            since_unix_ms,
            until_unix_ms: since_unix_ms.saturating_add(hold_ms),
            emptied: !serving,
        });
        let srv = self.source.name();
        if serving {
            warn!(service = %self.service, srv, reason = why, backends = self.current.len(), hold_ms, "service absent from DNS; keeping the last backends during the hold");
        } else {
            warn!(service = %self.service, srv, reason = why, "service absent from DNS; no SRV backends");
        }
        absent
    }

    /// The hold has elapsed with the service still absent: its backends go.
    async fn end_hold(&mut self, why: &'static str, held: Duration) {
        warn!(service = %self.service, srv = self.source.name(), reason = why, held_ms = held.as_millis() as u64, backends = self.current.len(), "empty hold elapsed; removing the service's SRV backends");
        self.current = Arc::new(Vec::new());
        self.pending = None;
        self.source.forget();
        self.publish(&[]).await;
        if let Some(a) = &mut self.absent {
            a.emptied = true;
        }
        if let Some(a) = self.status.absence.lock().as_mut() {
            a.emptied = true;
        }
    }

    /// A failed lookup says nothing about the service: the last known set keeps serving
    /// (stale), and the source is asked again with back-off.
    fn failed(&mut self, why: String) -> Duration {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let delay = failure_backoff(self.consecutive_failures, &self.settings, &mut rand::rng());
        let first = self.status.fail(why.clone());
        let retry_ms = delay.as_millis() as u64;
        let srv = self.source.name();
        if !self.answered && first {
            warn!(service = %self.service, srv, error = %why, retry_ms, "first DNS lookup failed; listening anyway, clients are closed at once until backends appear");
        } else if first {
            warn!(service = %self.service, srv, error = %why, backends = self.current.len(), retry_ms, "DNS lookup failed; serving the last known backends (stale)");
        } else {
            debug!(service = %self.service, srv, error = %why, retry_ms, "DNS lookup failed again");
        }
        delay
    }

    /// One line per refresh about targets that could not be resolved: a warning when the
    /// counts change (a target starts or stops failing), at debug while they stay the same,
    /// so a target that keeps failing does not fill the log.
    fn log_unresolved(&mut self, unresolved: Option<Unresolved>) {
        let counts = unresolved.as_ref().map(|u| (u.skipped, u.kept, u.targets));
        let changed = counts != self.unresolved_counts;
        self.unresolved_counts = counts;
        let srv = self.source.name();
        match unresolved {
            Some(u) if changed => {
                warn!(service = %self.service, srv, skipped = u.skipped, kept_previous = u.kept, targets = u.targets, error = %u.error, "some SRV targets could not be resolved; serving the others")
            }
            Some(u) => {
                debug!(service = %self.service, srv, skipped = u.skipped, kept_previous = u.kept, targets = u.targets, error = %u.error, "some SRV targets could not be resolved; serving the others")
            }
            None if changed => {
                info!(service = %self.service, srv, "every SRV target resolves again")
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Selection;
    use crate::discovery::StaticSource;
    use crate::discovery::test_support::{ep, settings, within};
    use std::sync::atomic::Ordering;

    fn discovery(pool: &Arc<Pool>) -> Discovery<StaticSource> {
        // Never asked: the tests below feed answers straight to `accept_answer`/`refresh`.
        let source = StaticSource::new(&[]);
        Discovery::new(
            "svc",
            source,
            Vec::new(),
            watch::channel(settings()).1,
            Arc::clone(pool),
            Arc::new(DiscoveryStatus::default()),
        )
    }

    fn served(pool: &Pool) -> Vec<String> {
        let mut names: Vec<String> = pool
            .snapshot()
            .iter()
            .map(|(_, b)| b.key.target.to_string())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn damping_applies_a_large_removal_only_when_confirmed() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        let full = vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)];
        d.accept_answer(full.clone()).await;
        assert_eq!(served(&pool), ["a.", "b.", "c."]);
        // Removing 2 of 3 is held back...
        d.accept_answer(vec![ep("a.", 1)]).await;
        assert_eq!(served(&pool), ["a.", "b.", "c."]);
        // ...and applied when the next lookup says the same.
        d.accept_answer(vec![ep("a.", 1)]).await;
        assert_eq!(served(&pool), ["a."]);
        // Removing exactly half (1 of 2) is not "more than half": applied at once.
        d.accept_answer(vec![ep("a.", 1), ep("b.", 2)]).await;
        d.accept_answer(vec![ep("b.", 2)]).await;
        assert_eq!(served(&pool), ["b."]);
    }

    #[tokio::test]
    async fn damping_forgets_a_one_off_broken_answer() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        let full = vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)];
        d.accept_answer(full.clone()).await;
        let generation = pool.snapshot().generation;
        d.accept_answer(vec![ep("c.", 3)]).await;
        // The full answer again, in another order: nothing changes, nothing drains.
        let mut reordered = full.clone();
        reordered.reverse();
        d.accept_answer(reordered).await;
        assert!(d.pending.is_none());
        assert_eq!(pool.snapshot().generation, generation);
        // A later broken answer must again wait for confirmation (the old one was forgotten).
        d.accept_answer(vec![ep("c.", 3)]).await;
        assert_eq!(served(&pool), ["a.", "b.", "c."]);
        assert!(
            pool.states()
                .iter()
                .all(|st| st.state.label() != "draining")
        );
    }

    #[tokio::test]
    async fn a_rollout_serves_the_new_backends_from_the_first_answer() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        d.accept_answer(vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)])
            .await;
        let rollout = vec![ep("d.", 4), ep("e.", 5), ep("f.", 6)];
        d.accept_answer(rollout.clone()).await;
        // New pods serve at once; the old ones stay, flagged, until confirmed.
        assert_eq!(served(&pool), ["a.", "b.", "c.", "d.", "e.", "f."]);
        let pending: Vec<String> = pool
            .snapshot()
            .iter()
            .filter(|(_, b)| b.is_removal_pending())
            .map(|(_, b)| b.key.target.to_string())
            .collect();
        assert_eq!(pending, ["a.", "b.", "c."]);
        d.accept_answer(rollout).await;
        assert_eq!(served(&pool), ["d.", "e.", "f."]);
        assert!(pool.snapshot().iter().all(|(_, b)| !b.is_removal_pending()));
    }

    #[tokio::test]
    async fn a_broken_answer_with_an_addition_is_undone_when_not_confirmed() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        let full = vec![ep("a.", 1), ep("b.", 2), ep("c.", 3)];
        d.accept_answer(full.clone()).await;
        d.accept_answer(vec![ep("c.", 3), ep("x.", 9)]).await;
        assert_eq!(served(&pool), ["a.", "b.", "c.", "x."]);
        d.accept_answer(full).await;
        assert_eq!(served(&pool), ["a.", "b.", "c."]);
        assert!(pool.snapshot().iter().all(|(_, b)| !b.is_removal_pending()));
    }

    #[tokio::test]
    async fn the_empty_hold_is_visible_while_it_lasts_and_after_it_empties() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        d.settings.empty_hold = Duration::from_millis(300);
        d.settings_updates = watch::channel(d.settings.clone()).1;
        let found = || Answer::Found {
            endpoints: vec![ep("a.", 1)],
            ttl: 5,
            unresolved: None,
        };
        d.refresh(found(), Scope::Full).await;
        assert!(d.status.absence.lock().is_none());
        let before = unix_ms();
        let delay = d.refresh(Answer::Absent("NXDOMAIN"), Scope::Full).await;
        assert!(delay <= Duration::from_millis(300), "{delay:?}");
        let hold = d.status.absence.lock().clone().expect("in hold");
        assert!(hold.in_hold() && hold.reason == "NXDOMAIN", "{hold:?}");
        assert!(hold.since_unix_ms >= before);
        assert_eq!(hold.until_unix_ms, hold.since_unix_ms + 300);
        assert_eq!(served(&pool), ["a."], "the hold keeps serving");
        tokio::time::sleep(Duration::from_millis(350)).await;
        // Past the hold, absent again: emptied, with growing back-off.
        let first = d.refresh(Answer::Absent("NXDOMAIN"), Scope::Full).await;
        assert!(served(&pool).is_empty());
        let hold = d.status.absence.lock().clone().expect("still absent");
        assert!(hold.emptied && !hold.in_hold() && hold.remaining_ms() == 0);
        let mut later = first;
        for _ in 0..5 {
            later = d.refresh(Answer::Absent("NXDOMAIN"), Scope::Full).await;
        }
        assert!(
            later >= Duration::from_secs(16),
            "no back-off: {first:?} then {later:?}"
        );
        d.refresh(found(), Scope::Full).await;
        assert!(d.status.absence.lock().is_none());
        assert_eq!(served(&pool), ["a."]);
    }

    #[tokio::test]
    async fn refresh_settings_from_a_reload_apply_from_the_next_refresh() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        let (tx, rx) = watch::channel(d.settings.clone());
        d.settings_updates = rx;
        let found = || Answer::Found {
            endpoints: vec![ep("a.", 1)],
            ttl: 3600,
            unresolved: None,
        };
        let before = d.refresh(found(), Scope::Full).await;
        assert!(within(before, 54_000, 60_000), "{before:?}");
        let mut next = d.settings.clone();
        next.max_refresh = Duration::from_secs(5);
        tx.send_replace(next);
        let after = d.refresh(found(), Scope::Full).await;
        assert!(within(after, 4_500, 5_000), "{after:?}");
        assert_eq!(served(&pool), ["a."]);
    }

    /// A failed lookup whose targets then resolve in a partial round: the set is current
    /// again only if its records came from a query that answered.
    #[tokio::test]
    async fn a_partial_round_ends_staleness_only_when_the_records_are_current() {
        let pool = Arc::new(Pool::new("svc", Selection::maglev(1009)));
        let mut d = discovery(&pool);
        let stale = |d: &Discovery<StaticSource>| d.status.stale.load(Ordering::Relaxed);
        let found = || Answer::Found {
            endpoints: vec![ep("a.", 1)],
            ttl: 30,
            unresolved: None,
        };
        d.refresh(Answer::Failed("no target resolved".into()), Scope::Full)
            .await;
        assert!(stale(&d));
        let stale_records = Scope::Addresses {
            records_current: false,
        };
        d.refresh(found(), stale_records).await;
        assert_eq!(served(&pool), ["a."]);
        assert!(
            stale(&d),
            "records from before a failed query are not current"
        );
        let current_records = Scope::Addresses {
            records_current: true,
        };
        d.refresh(found(), current_records).await;
        assert!(!stale(&d));
        assert!(d.status.last_error.lock().is_none());
        assert_eq!(served(&pool), ["a."]);
        assert_eq!(
            d.status.refreshes.load(Ordering::Relaxed),
            0,
            "a partial round is not a lookup of the registry"
        );
    }
}
