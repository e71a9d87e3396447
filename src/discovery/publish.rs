//! Applying a source's set to the pool: damping of large removals (the verdict comes from
//! `damping.rs`), the removal-pending flags of held backends, the static tier beside the
//! source, and the one log line per change. Part of [`Discovery`], split from the policy
//! that decides when to look (`refresh.rs`).

use std::collections::HashSet;
use std::sync::Arc;

use tracing::{info, warn};

use super::damping::{self, Verdict};
use super::{Discovery, Source};
use crate::pool::{BackendKey, Endpoint};

/// Answer sets above this size are compared on a blocking thread, not on a runtime worker.
const COMPARE_INLINE_MAX: usize = 512;

impl<S: Source> Discovery<S> {
    /// Applies a new answer. Additions and small removals apply at once; an answer that
    /// would remove more than half of the backends has its additions served at once while
    /// the backends it removes stay in service (flagged, so retries avoid them) until the
    /// next lookup confirms the removal. The comparison of a large answer runs on a
    /// blocking thread, never on a runtime worker that also proxies.
    pub(super) async fn accept_answer(&mut self, endpoints: Vec<Endpoint>) {
        let current = Arc::clone(&self.current);
        let pending = self.pending.clone();
        let large = endpoints.len() > COMPARE_INLINE_MAX;
        let judge = move || {
            let (mut endpoints, _) = crate::pool::trim_to_caps(endpoints);
            endpoints.sort_by(|a, b| (&a.target, a.port, a.addr).cmp(&(&b.target, b.port, b.addr)));
            let verdict = damping::judge(
                &current,
                pending.as_deref().map(|p| p.as_slice()),
                &endpoints,
            );
            (endpoints, verdict)
        };
        let (endpoints, verdict) = if large {
            match tokio::task::spawn_blocking(judge).await {
                Ok(judged) => judged,
                Err(e) => {
                    warn!(service = %self.service, error = %e, "comparing the answer failed; keeping the previous set");
                    return;
                }
            }
        } else {
            judge()
        };
        self.apply_verdict(endpoints, verdict).await;
    }

    async fn apply_verdict(&mut self, endpoints: Vec<Endpoint>, verdict: Verdict) {
        match verdict {
            Verdict::Same { dropped_pending } => {
                if dropped_pending {
                    self.pending = None;
                    info!(service = %self.service, backends = endpoints.len(), "damping: the large removal was not confirmed; nothing removed");
                    self.publish(&[]).await;
                }
            }
            Verdict::Apply { confirmed } => {
                if let Some((removed, of)) = confirmed {
                    info!(service = %self.service, removed, of, "damping: large removal confirmed by a second lookup; applying it");
                }
                self.pending = None;
                self.current = Arc::new(endpoints);
                self.publish(&[]).await;
            }
            Verdict::Hold { held, removed, of } => {
                let added = (endpoints.len() + held.len()).saturating_sub(self.current.len());
                warn!(service = %self.service, removed, of, added, "damping: answer would remove more than half of the backends; new backends serve at once, the removal waits for the next lookup to confirm");
                let next = Arc::new(endpoints);
                self.pending = Some(Arc::clone(&next));
                self.publish_with(&next, &held).await;
            }
        }
    }

    /// Publishes the confirmed set plus `held` backends (removal pending).
    pub(super) async fn publish(&mut self, held: &[Endpoint]) {
        let current = Arc::clone(&self.current);
        self.publish_with(&current, held).await;
    }

    async fn publish_with(&mut self, set: &[Endpoint], held: &[Endpoint]) {
        let mut all = set.to_vec();
        all.extend(held.iter().cloned());
        all.extend(self.fixed.iter().cloned());
        let result = self.pool.update_off_runtime(all).await;
        let pending: HashSet<BackendKey> = held
            .iter()
            .map(|ep| BackendKey {
                target: Arc::from(ep.target.as_str()),
                port: ep.port,
                addr: ep.addr,
            })
            .collect();
        self.pool.mark_removal_pending(&pending);
        match result {
            Ok(change) => {
                if change.capped > 0 {
                    warn!(service = %self.service, left_out = change.capped, max_backends = crate::pool::MAX_BACKENDS, max_tiers = crate::pool::MAX_TIERS, "answer too large; keeping only the preferred priorities and backends");
                }
                if !change.is_noop() {
                    info!(
                        service = %self.service,
                        added = change.added,
                        removed = change.removed,
                        reweighted = change.reweighted,
                        backends = change.total,
                        removal_pending = held.len(),
                        "backends changed"
                    );
                }
            }
            Err(e) => {
                warn!(service = %self.service, error = %e, "cannot publish backends; keeping the previous set")
            }
        }
    }
}
