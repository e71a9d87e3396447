//! A running service: its current configuration (swapped on reload), its backend pool, its
//! discovery task and counters, and the connection limit its listeners obey. The proxy reads
//! it; control creates, updates and retires it.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::admin::ConnectionHistograms;
use crate::balance::Selection;
use crate::config::{ResolverConfig, ServiceConfig};
use crate::discovery::{self, DiscoveryStatus, Resolver};
use crate::pool::Pool;
use crate::source_limits::SourceLimits;

/// Counters of one service, for logs and metrics.
#[derive(Debug, Default)]
pub(crate) struct ServiceStats {
    pub(crate) accepted: AtomicU64,
    pub(crate) active: AtomicU64,
    /// Refused by allow/deny.
    pub(crate) denied: AtomicU64,
    /// Closed at once because the pool had no backend at all.
    pub(crate) no_backend: AtomicU64,
    /// Closed because every attempted backend failed to connect.
    pub(crate) connect_exhausted: AtomicU64,
    /// Connect attempts beyond the first.
    pub(crate) retries: AtomicU64,
    /// Closed because `accept_proxy` is on and no valid PROXY header came in time.
    pub(crate) proxy_header_rejected: AtomicU64,
    /// Closed because their source had `max_connections_per_source` open.
    pub(crate) source_connection_limited: AtomicU64,
    /// Closed because their source exceeded `rate_per_source`.
    pub(crate) source_rate_limited: AtomicU64,
    /// Connect time, duration and bytes of the connections that reached a backend.
    pub(crate) histograms: ConnectionHistograms,
}

/// A running service: configuration, pool, discovery task, counters and connection limit.
#[derive(Debug)]
pub struct Service {
    /// The configured `name`.
    pub name: String,
    config: ArcSwap<ServiceConfig>,
    /// Its backends, as discovery last published them.
    pub pool: Arc<Pool>,
    pub(crate) discovery_status: Arc<DiscoveryStatus>,
    pub(crate) stats: ServiceStats,
    /// One permit per open connection; listeners take a permit before accepting, so at the
    /// limit clients wait in the backlog instead of being reset. Shared with the service that
    /// replaces this one under the same name (see [`Service::start_with_limit`]).
    limit: Arc<ConnectionLimit>,
    stop_discovery: watch::Sender<bool>,
    /// Refresh settings for the running discovery task (see `update_resolver_settings`).
    resolver_settings: watch::Sender<ResolverConfig>,
}

impl Service {
    /// Creates the service with a connection limit of its own and starts its discovery task.
    #[cfg(test)]
    pub(crate) fn start(
        config: ServiceConfig,
        resolver: &Resolver,
        resolver_settings: ResolverConfig,
    ) -> Arc<Service> {
        let limit = Arc::new(ConnectionLimit::new(config.max_connections));
        Service::start_with_limit(config, resolver, resolver_settings, limit)
    }

    /// Like [`Service::start`], counting connections against `limit`, which the caller has
    /// already sized to `config.max_connections`. A reload that replaces a service (its
    /// discovery source changed) passes the old service's limit: the old service's open
    /// connections keep their permits, so old and new together stay within the new
    /// `max_connections`, and a listener waiting for a permit wakes when the resize adds some.
    pub(crate) fn start_with_limit(
        config: ServiceConfig,
        resolver: &Resolver,
        resolver_settings: ResolverConfig,
        limit: Arc<ConnectionLimit>,
    ) -> Arc<Service> {
        let pool = Arc::new(Pool::new(&config.name, Selection::new(config.balance)));
        let status = Arc::new(DiscoveryStatus::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let (settings_tx, settings_rx) = watch::channel(resolver_settings);
        discovery::spawn(
            &config,
            resolver,
            settings_rx,
            Arc::clone(&pool),
            Arc::clone(&status),
            stop_rx,
        );
        Arc::new(Service {
            name: config.name.clone(),
            config: ArcSwap::from_pointee(config),
            pool,
            discovery_status: status,
            stats: ServiceStats::default(),
            limit,
            stop_discovery: stop_tx,
            resolver_settings: settings_tx,
        })
    }

    pub(crate) fn config(&self) -> Arc<ServiceConfig> {
        self.config.load_full()
    }

    /// The permits of the service's connection limit (one per open connection); listeners
    /// take one before they accept.
    pub(crate) fn connection_permits(&self) -> &Arc<Semaphore> {
        &self.limit.semaphore
    }

    /// The limit to hand to a replacement of this service (see [`Service::start_with_limit`]).
    pub(crate) fn connection_limit(&self) -> &Arc<ConnectionLimit> {
        &self.limit
    }

    /// Applies a new configuration whose discovery source is unchanged: balance, timeouts,
    /// health policy, lists and the connection limit take effect for new connections. A
    /// new `balance` rebuilds the pool's selectors on a blocking thread; until that
    /// snapshot is published (milliseconds), connections select with the old algorithm.
    pub(crate) fn reconfigure(&self, config: ServiceConfig) {
        self.limit.resize(&self.name, config.max_connections);
        if self.pool.set_selection(Selection::new(config.balance)) {
            let pool = Arc::clone(&self.pool);
            // Detached: a later reload's rebuild, or a discovery update, may publish first;
            // `reselect` then finds nothing left to do.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = pool.reselect() {
                    warn!(service = %pool.service(), error = %e, "cannot rebuild the selection tables for the new balance; keeping the previous ones");
                }
            });
        }
        self.config.store(Arc::new(config));
    }

    /// Hands new refresh settings (min_refresh, max_refresh, empty_hold) to the running
    /// discovery task; they apply from its next refresh, and the pool keeps its state.
    pub(crate) fn update_resolver_settings(&self, settings: ResolverConfig) {
        self.resolver_settings.send_if_modified(|current| {
            let changed = *current != settings;
            *current = settings;
            changed
        });
    }

    /// Waits (until `deadline` at the latest) for discovery's first answer to reach the pool,
    /// so a listener handed to this service does not reset clients for want of backends that
    /// are merely not looked up yet, nor send them to static last-resort backends before the
    /// SRV answer lands. True when the first lookup is done.
    pub(crate) async fn first_lookup(&self, deadline: tokio::time::Instant) -> bool {
        tokio::time::timeout_at(deadline, self.discovery_status.wait_first_outcome())
            .await
            .is_ok()
    }

    /// Stops discovery; the pool keeps serving open connections until they end. The
    /// connection limit is left alone, because a replacement may share it.
    pub(crate) fn retire(&self) {
        let _ = self.stop_discovery.send(true);
    }

    /// Retires a service that has no replacement. What its connection limit still owes from
    /// a lowering is dropped too: nothing accepts under that limit any more, and the debt
    /// task would otherwise live as long as the longest open connection.
    pub(crate) fn remove(&self) {
        self.retire();
        self.limit.cancel_debts();
    }
}

/// A semaphore whose size can change while permits are out.
///
/// Raising the size adds permits. Lowering it forgets the free permits, and the rest of the
/// difference becomes a debt: a task queues for that many permits and forgets them as open
/// connections return them. tokio's semaphore is fair, so acceptors queued after the debt wait
/// until the count is under the new limit (an acceptor already waiting when the limit dropped
/// may still take one permit first). The total always converges to the last size set,
/// whatever order raises, lowerings and returns happen in: a raise while a debt is unpaid
/// simply pays it sooner.
///
/// Debt tasks belong to the limit: they are aborted when it is dropped or
/// [`cancel_debts`](ConnectionLimit::cancel_debts) is called, so a retired service does not
/// leave tasks behind waiting for its connections.
#[derive(Debug)]
pub(crate) struct ConnectionLimit {
    semaphore: Arc<Semaphore>,
    /// Per-source counts, shared the same way as the permits.
    sources: Arc<SourceLimits>,
    size: Mutex<usize>,
    /// Dropping a `JoinSet` aborts its tasks.
    debts: Mutex<JoinSet<()>>,
}

impl ConnectionLimit {
    /// A size beyond this is treated as this: it is unlimited in practice, and it keeps every
    /// amount within what `Semaphore` (which panics above `MAX_PERMITS`) and `acquire_many`
    /// (u32) accept.
    pub(crate) const MAX: usize = if Semaphore::MAX_PERMITS < u32::MAX as usize {
        Semaphore::MAX_PERMITS
    } else {
        u32::MAX as usize
    };

    pub(crate) fn new(size: usize) -> ConnectionLimit {
        let size = size.min(Self::MAX);
        ConnectionLimit {
            semaphore: Arc::new(Semaphore::new(size)),
            sources: Arc::new(SourceLimits::default()),
            size: Mutex::new(size),
            debts: Mutex::new(JoinSet::new()),
        }
    }

    pub(crate) fn semaphore(&self) -> &Arc<Semaphore> {
        &self.semaphore
    }

    pub(crate) fn sources(&self) -> &Arc<SourceLimits> {
        &self.sources
    }

    /// Sets the number of permits to `new_size`; see the type's documentation. Must run
    /// inside the tokio runtime when lowering below the permits in use.
    pub(crate) fn resize(&self, service: &str, new_size: usize) {
        let new_size = new_size.min(Self::MAX);
        let mut size = self.size.lock();
        let old_size = std::mem::replace(&mut *size, new_size);
        if new_size > old_size {
            self.semaphore.add_permits(new_size - old_size);
            return;
        }
        let lower_by = old_size - new_size;
        let forgotten = self.semaphore.forget_permits(lower_by);
        let Ok(owed) = u32::try_from(lower_by - forgotten) else {
            return; // unreachable: sizes are capped at MAX <= u32::MAX
        };
        if owed == 0 {
            return;
        }
        debug!(
            service,
            owed, "connection limit lowered below open connections; waiting for them to close"
        );
        let semaphore = Arc::clone(&self.semaphore);
        let mut debts = self.debts.lock();
        // Reap finished debts so the set does not grow with every lowering.
        while debts.try_join_next().is_some() {}
        debts.spawn(async move {
            // Err only if the semaphore were closed, which nothing does.
            if let Ok(permits) = semaphore.acquire_many_owned(owed).await {
                permits.forget();
            }
        });
    }

    /// Aborts the unpaid debts; permits returned from now on become free again. Permits a
    /// debt had already collected stay forgotten.
    pub(crate) fn cancel_debts(&self) {
        self.debts.lock().abort_all();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.stop_discovery.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Lets the debt task run (it only needs to be polled once after each release).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn lowering_below_open_connections_is_exact() {
        let limit = ConnectionLimit::new(4);
        let sem = Arc::clone(limit.semaphore());
        let mut held: Vec<_> = (0..3)
            .map(|_| Arc::clone(&sem).try_acquire_owned().expect("permit"))
            .collect();
        // 3 of 4 in use; lower to 1: one free permit is forgotten, two are owed.
        limit.resize("t", 1);
        settle().await;
        assert_eq!(sem.available_permits(), 0);
        held.pop();
        settle().await;
        assert_eq!(
            sem.available_permits(),
            0,
            "a returned permit pays the debt"
        );
        held.pop();
        settle().await;
        assert_eq!(sem.available_permits(), 0, "debt of two is paid only now");
        held.pop();
        settle().await;
        assert_eq!(sem.available_permits(), 1, "exactly the new limit is left");
    }

    #[tokio::test]
    async fn raising_while_a_debt_is_unpaid_converges_to_the_last_size() {
        let limit = ConnectionLimit::new(4);
        let sem = Arc::clone(limit.semaphore());
        let held: Vec<_> = (0..4)
            .map(|_| Arc::clone(&sem).try_acquire_owned().expect("permit"))
            .collect();
        limit.resize("t", 2); // owes 2
        limit.resize("t", 6); // adds 4: 2 pay the debt, 2 are free
        settle().await;
        assert_eq!(sem.available_permits(), 2);
        drop(held);
        settle().await;
        assert_eq!(sem.available_permits(), 6);
    }

    #[tokio::test]
    async fn a_cancelled_or_dropped_limit_leaves_no_debt_task_behind() {
        for drop_limit in [false, true] {
            let limit = ConnectionLimit::new(2);
            let sem = Arc::clone(limit.semaphore());
            let held: Vec<_> = (0..2)
                .map(|_| Arc::clone(&sem).try_acquire_owned().expect("permit"))
                .collect();
            limit.resize("t", 0); // owes 2
            settle().await;
            if drop_limit {
                drop(limit);
            } else {
                limit.cancel_debts();
            }
            settle().await;
            // The test, the two permits and (unless dropped) the limit: no debt task.
            let holders = if drop_limit { 3 } else { 4 };
            assert_eq!(Arc::strong_count(&sem), holders, "the debt task is gone");
            drop(held);
            settle().await;
            assert_eq!(
                sem.available_permits(),
                2,
                "nothing collects returned permits"
            );
        }
    }

    #[tokio::test]
    async fn absurd_sizes_are_capped_instead_of_panicking() {
        let limit = ConnectionLimit::new(usize::MAX);
        assert_eq!(limit.semaphore().available_permits(), ConnectionLimit::MAX);
        limit.resize("t", 10);
        assert_eq!(limit.semaphore().available_permits(), 10);
        limit.resize("t", usize::MAX);
        assert_eq!(limit.semaphore().available_permits(), ConnectionLimit::MAX);
    }
}
