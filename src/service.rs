//! A running service: its current configuration (swapped on reload), its backend pool, its
//! discovery task and counters, and the connection limit its listeners obey. The proxy reads
//! it; control creates, updates and retires it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use hickory_resolver::TokioResolver;
use tokio::sync::{Semaphore, watch};

use crate::balance::MaglevTable;
use crate::config::{ResolverConfig, ServiceConfig};
use crate::discovery::{Discovery, DiscoveryStatus};
use crate::pool::Pool;

/// Counters of one service, for logs and metrics.
#[derive(Debug, Default)]
pub struct ServiceStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    /// Refused by allow/deny.
    pub denied: AtomicU64,
    /// Closed at once because the pool had no backend at all.
    pub no_backend: AtomicU64,
    /// Closed because every attempted backend failed to connect.
    pub connect_exhausted: AtomicU64,
    /// Connect attempts beyond the first.
    pub retries: AtomicU64,
}

#[derive(Debug)]
pub struct Service {
    pub name: String,
    config: ArcSwap<ServiceConfig>,
    pub pool: Arc<Pool>,
    pub discovery: Arc<DiscoveryStatus>,
    pub stats: ServiceStats,
    /// One permit per open connection; listeners take a permit before accepting, so at the
    /// limit clients wait in the backlog instead of being reset.
    limit: Arc<Semaphore>,
    limit_size: AtomicUsize,
    stop_discovery: watch::Sender<bool>,
}

impl Service {
    /// Creates the service and starts its discovery task.
    pub fn start(
        config: ServiceConfig,
        resolver: Arc<TokioResolver>,
        resolver_settings: ResolverConfig,
    ) -> Arc<Service> {
        let pool = Arc::new(Pool::new(&config.name, MaglevTable::DEFAULT_SIZE));
        let status = Arc::new(DiscoveryStatus::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let discovery = Discovery::new(
            &config,
            resolver,
            resolver_settings,
            Arc::clone(&pool),
            Arc::clone(&status),
        );
        tokio::spawn(discovery.run(stop_rx));
        let limit_size = config.max_connections;
        Arc::new(Service {
            name: config.name.clone(),
            config: ArcSwap::from_pointee(config),
            pool,
            discovery: status,
            stats: ServiceStats::default(),
            limit: Arc::new(Semaphore::new(limit_size)),
            limit_size: AtomicUsize::new(limit_size),
            stop_discovery: stop_tx,
        })
    }

    pub fn config(&self) -> Arc<ServiceConfig> {
        self.config.load_full()
    }

    pub fn limit(&self) -> &Arc<Semaphore> {
        &self.limit
    }

    /// Applies a new configuration whose discovery source is unchanged: balance, timeouts,
    /// health policy, lists and the connection limit take effect for new connections.
    pub fn reconfigure(&self, config: ServiceConfig) {
        let new_size = config.max_connections;
        let old_size = self.limit_size.swap(new_size, Ordering::Relaxed);
        if new_size > old_size {
            self.limit.add_permits(new_size - old_size);
        } else if new_size < old_size {
            // Permits held by open connections come back later; forget what is free now and
            // keep the rest of the difference owed by letting the connections drain.
            self.limit.forget_permits(old_size - new_size);
        }
        self.config.store(Arc::new(config));
    }

    /// Stops discovery; the pool keeps serving open connections until they end.
    pub fn retire(&self) {
        let _ = self.stop_discovery.send(true);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.stop_discovery.send(true);
    }
}
