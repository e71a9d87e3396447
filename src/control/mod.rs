//! Runs the process: binds listeners and starts services from a `Config`, applies a new
//! configuration on SIGHUP (bind new, swap, close removed; refuse a bad one as a whole),
//! drains on SIGTERM/SIGINT, and keeps systemd informed through sd_notify. It owns the
//! lifecycle; it never touches bytes or selection. `Server` (here) is what runs and how a
//! configuration is applied; `run.rs` is the signal loop and sd_notify around it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::access_log;
use crate::admin::{Admin, AdminSocket, AdminState};
use crate::config::{Config, ConfigError, ResolverConfig, ServiceConfig};
use crate::discovery::{DiscoveryError, Resolver};
use crate::fd_budget::FdBudget;
use crate::proxy::listener::{Bound, ConnectionTracker, Listener};
use crate::service::{ConnectionLimit, Service};
use crate::workers::Workers;

mod run;

pub use run::run;

/// Why the process could not start, or why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Resolver(#[from] DiscoveryError),
    #[error("cannot listen on {addr} (service \"{service}\"): {source}")]
    Bind {
        addr: SocketAddr,
        service: String,
        source: std::io::Error,
    },
    #[error("cannot start the admin listener on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the admin socket at {}: {source}", path.display())]
    AdminSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {count} worker threads: {source}")]
    Workers {
        count: usize,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    AccessLog(#[from] crate::access_log::AccessLogError),
}

/// Everything the running process owns.
pub struct Server {
    config: Config,
    resolver: Resolver,
    services: HashMap<String, Arc<Service>>,
    listeners: HashMap<SocketAddr, Listener>,
    tracker: ConnectionTracker,
    admin: Option<Admin>,
    admin_socket: Option<AdminSocket>,
    admin_state: Arc<AdminState>,
    /// The descriptor budget in force (see `apply_fd_budget`).
    budget: Option<FdBudget>,
    /// The data-path threads every listener accepts on. Declared last: dropped after the
    /// listeners, it stops the threads once nothing accepts on them any more.
    workers: Workers,
}

/// What step 1 of `Server::apply` made ready: bound but not yet serving.
struct Prepared {
    /// The sockets of addresses that were not open before.
    listeners: HashMap<SocketAddr, Bound>,
    /// A new admin listener, when `[global] admin` names a new address.
    admin: Option<Admin>,
    /// A new admin socket, when `[global] admin_socket` names a new path.
    admin_socket: Option<AdminSocket>,
    /// The resolver was rebuilt: services keep their pools only with the one they used.
    resolver_changed: bool,
}

impl Server {
    /// Binds every listener and starts every service. Fails, having changed nothing that
    /// outlives it, when a listener cannot be bound.
    pub async fn start(config: Config) -> Result<Server, ControlError> {
        let resolver = Resolver::new(&config.resolver)?;
        access_log::configure(
            config.global.access_log.as_deref(),
            config.global.access_log_format,
        )?;
        let admin_state = Arc::new(AdminState::default());
        let count = config.global.worker_count();
        let workers = Workers::start(count).map_err(|source| ControlError::Workers {
            count: count.get(),
            source,
        })?;
        info!(workers = count.get(), "data-path workers started");
        let mut server = Server {
            config: Config {
                services: Vec::new(),
                ..config.clone()
            },
            resolver,
            services: HashMap::new(),
            listeners: HashMap::new(),
            tracker: ConnectionTracker::default(),
            admin: None,
            admin_socket: None,
            admin_state,
            budget: None,
            workers,
        };
        server.apply(config).await?;
        Ok(server)
    }

    pub(crate) fn tracker(&self) -> &ConnectionTracker {
        &self.tracker
    }

    /// The running services.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// A one-line summary for logs and systemd's STATUS=.
    pub(crate) fn summary(&self) -> String {
        let backends: usize = self
            .services
            .values()
            .map(|s| s.pool.snapshot().backend_count())
            .sum();
        format!(
            "{} services, {} listeners, {} backends, {} connections",
            self.services.len(),
            self.listeners.len(),
            backends,
            self.tracker.open()
        )
    }

    /// Applies `next` in place of the running configuration, as a whole or not at all.
    ///
    /// Everything that can fail (binding new addresses, the admin listener, the resolver)
    /// happens first, before anything running changes; after that the swap cannot fail.
    /// Listeners whose address stays keep their socket and only switch service; new
    /// listeners accept before removed ones stop, and connections of removed services run
    /// on until they end.
    pub(crate) async fn apply(&mut self, next: Config) -> Result<(), ControlError> {
        // 1. Everything fallible. Failing here drops what was bound and changes nothing.
        let prepared = self.prepare(&next)?;
        // 2. Services, each with its first lookup done or given up on.
        let services = self.start_services(&next, prepared.resolver_changed).await;
        // The descriptor cap, in force before the new listeners accept their first client.
        self.apply_fd_budget(&next);
        // 3. Listeners: existing sockets feed the (possibly new) service; new ones start.
        let listeners = self.attach_listeners(&next, &services, prepared.listeners);
        // 4. Only now close what is gone; its connections drain on their own.
        self.close_removed_listeners(listeners).await;
        self.retire_replaced(services);
        self.swap_admin(prepared.admin, &next);
        self.swap_admin_socket(prepared.admin_socket, &next);
        self.publish_admin_state(&next);
        self.warn_if_workers_changed(&next);
        self.config = next;
        Ok(())
    }

    /// Step 1 of `apply`: binds what `next` adds (listen addresses, the admin listener and
    /// socket), builds a changed resolver and opens a changed access log. Only the last
    /// step changes the running process (the access log, then the resolver), and nothing
    /// after it can fail.
    fn prepare(&mut self, next: &Config) -> Result<Prepared, ControlError> {
        let listeners = self.bind_new_listeners(next)?;
        let admin = self.bind_admin(next)?;
        let admin_socket = self.bind_admin_socket(next)?;
        let new_resolver = self.changed_resolver(next)?;
        let resolver_changed = new_resolver.is_some();
        // The last fallible step: a new access log path that cannot be opened refuses the
        // reload; once it is open, nothing below can fail, so the new resolver is kept only
        // from here on.
        if next.global.access_log != self.config.global.access_log
            || next.global.access_log_format != self.config.global.access_log_format
        {
            access_log::configure(
                next.global.access_log.as_deref(),
                next.global.access_log_format,
            )?;
        }
        if let Some(resolver) = new_resolver {
            self.resolver = resolver;
        }
        Ok(Prepared {
            listeners,
            admin,
            admin_socket,
            resolver_changed,
        })
    }

    /// The sockets of every address in `next` that is not open yet, bound (fallible step).
    fn bind_new_listeners(
        &self,
        next: &Config,
    ) -> Result<HashMap<SocketAddr, Bound>, ControlError> {
        let mut fresh: HashMap<SocketAddr, Bound> = HashMap::new();
        for service in &next.services {
            for addr in &service.listen {
                if self.listeners.contains_key(addr) || fresh.contains_key(addr) {
                    continue;
                }
                let bind = |addr: SocketAddr| {
                    let bound = Bound::bind(addr, &self.workers)?;
                    bound.set_keepalive(service.tcp_keepalive)?;
                    Ok(bound)
                };
                let bound = bind(*addr).map_err(|source| ControlError::Bind {
                    addr: *addr,
                    service: service.name.clone(),
                    source,
                })?;
                fresh.insert(*addr, bound);
            }
        }
        Ok(fresh)
    }

    /// The admin TCP listener `next` asks for, bound now when its address is new (fallible
    /// step).
    fn bind_admin(&self, next: &Config) -> Result<Option<Admin>, ControlError> {
        match next.global.admin {
            Some(addr) if self.admin.as_ref().map(|a| a.addr()) != Some(addr) => {
                Admin::bind(addr, Arc::clone(&self.admin_state))
                    .map(Some)
                    .map_err(|source| ControlError::Admin { addr, source })
            }
            _ => Ok(None),
        }
    }

    /// Step 3 of `apply`: the listeners of `next`, each feeding its service. A listener
    /// whose address stays is taken out of `self.listeners` and switched to the (possibly
    /// new) service; a freshly bound one starts accepting. What stays in `self.listeners`
    /// afterwards is what `next` removed.
    fn attach_listeners(
        &mut self,
        next: &Config,
        services: &HashMap<String, Arc<Service>>,
        mut fresh: HashMap<SocketAddr, Bound>,
    ) -> HashMap<SocketAddr, Listener> {
        let mut listeners = HashMap::new();
        for cfg in &next.services {
            let Some(service) = services.get(&cfg.name) else {
                continue;
            };
            for addr in &cfg.listen {
                let listener = if let Some(existing) = self.listeners.remove(addr) {
                    existing.set_service(Arc::clone(service));
                    existing
                } else if let Some(bound) = fresh.remove(addr) {
                    let listener =
                        Listener::start(bound, Arc::clone(service), self.tracker.clone());
                    info!(service = %cfg.name, listen = %listener.addr, "listening");
                    listener
                } else {
                    continue; // unreachable: step 1 bound every address not already open
                };
                listeners.insert(*addr, listener);
            }
        }
        listeners
    }

    /// Step 4 of `apply`: puts `listeners` in place and closes the ones they replace (those
    /// `attach_listeners` left behind); their connections drain on their own.
    async fn close_removed_listeners(&mut self, listeners: HashMap<SocketAddr, Listener>) {
        for (addr, old) in std::mem::replace(&mut self.listeners, listeners) {
            info!(listen = %addr, service = %old.service().name, "listener removed");
            old.close().await;
        }
    }

    /// Hands the admin endpoint what it shows after a swap: the token, the services and the
    /// listeners.
    fn publish_admin_state(&self, next: &Config) {
        self.admin_state.set_token(next.global.admin_token.clone());
        self.admin_state
            .set_services(self.services.values().cloned().collect());
        self.admin_state.set_listeners(
            self.listeners
                .values()
                .map(|l| Arc::clone(l.status()))
                .collect(),
        );
    }

    /// The worker threads are started once; a reload that asks for another count is told so.
    fn warn_if_workers_changed(&self, next: &Config) {
        let asked = next.global.worker_count().get();
        if asked != self.workers.count() {
            warn!(
                workers = self.workers.count(),
                configured = asked,
                "global.workers is read at start: the running workers stay until a restart"
            );
        }
    }

    /// The resolver a reload needs, built only when `next` changes it. Only the servers, the
    /// timeout and the family are part of the resolver. The refresh settings (min_refresh,
    /// max_refresh, empty_hold) go to the running discovery tasks instead: restarting
    /// discovery for them would throw away every pool's state.
    fn changed_resolver(&self, next: &Config) -> Result<Option<Resolver>, ControlError> {
        let changed = next.resolver.nameservers != self.config.resolver.nameservers
            || next.resolver.timeout != self.config.resolver.timeout
            || next.resolver.family != self.config.resolver.family;
        Ok(if changed {
            Some(Resolver::new(&next.resolver)?)
        } else {
            None
        })
    }

    /// The services of `next`: those whose discovery is unchanged are kept (pool state
    /// survives) and take the new settings for the next connection they accept; the others
    /// start, and get a bounded moment for their first lookup.
    async fn start_services(
        &self,
        next: &Config,
        resolver_changed: bool,
    ) -> HashMap<String, Arc<Service>> {
        let mut services = HashMap::new();
        for cfg in &next.services {
            let kept = self
                .services
                .get(&cfg.name)
                .filter(|old| !resolver_changed && old.config().same_discovery(cfg));
            let service = match kept {
                Some(old) => {
                    old.reconfigure(cfg.clone());
                    old.update_resolver_settings(next.resolver.clone());
                    Arc::clone(old)
                }
                None => Service::start_with_limit(
                    cfg.clone(),
                    &self.resolver,
                    next.resolver.clone(),
                    self.connection_limit_for(cfg),
                ),
            };
            services.insert(cfg.name.clone(), service);
        }
        // New services start with an empty pool. Give their first lookup a bounded moment
        // before any listener feeds them: meanwhile clients of a kept address are served by
        // the old service and clients of a new address wait in the backlog, instead of being
        // reset for lack of backends. A dead DNS server delays the reload, never blocks it.
        let deadline = tokio::time::Instant::now() + first_lookup_budget(&next.resolver);
        for (name, service) in &services {
            let started = !self
                .services
                .get(name)
                .is_some_and(|old| Arc::ptr_eq(old, service));
            if started && !service.first_lookup(deadline).await {
                warn!(service = %name, "first DNS lookup still pending; serving without backends until it completes");
            }
        }
        services
    }

    /// Puts `services` in place; a running service that is not among them is retired.
    fn retire_replaced(&mut self, services: HashMap<String, Arc<Service>>) {
        for (name, old) in std::mem::replace(&mut self.services, services) {
            match self.services.get(&name) {
                Some(new) if Arc::ptr_eq(new, &old) => {}
                // Its connection limit lives on in the replacement.
                Some(_) => old.retire(),
                None => old.remove(),
            }
        }
    }

    /// Starts serving on the newly bound admin listener, or closes the old one when `next`
    /// has none.
    fn swap_admin(&mut self, admin: Option<Admin>, next: &Config) {
        if let Some(admin) = admin {
            if let Some(old) = self.admin.take() {
                old.close();
            }
            info!(admin = %admin.addr(), "admin endpoint listening");
            self.admin = Some(admin);
        } else if next.global.admin.is_none() {
            if let Some(old) = self.admin.take() {
                old.close();
            }
        }
    }

    /// The admin unix socket `next` asks for, bound now when its path is new (fallible step).
    fn bind_admin_socket(&self, next: &Config) -> Result<Option<AdminSocket>, ControlError> {
        match &next.global.admin_socket {
            Some(path) if self.admin_socket.as_ref().map(|a| a.path()) != Some(path.as_path()) => {
                AdminSocket::bind(path, Arc::clone(&self.admin_state))
                    .map(Some)
                    .map_err(|source| ControlError::AdminSocket {
                        path: path.clone(),
                        source,
                    })
            }
            _ => Ok(None),
        }
    }

    /// Puts a newly bound admin socket in place of the old one, or closes the old one when
    /// `next` has none.
    fn swap_admin_socket(&mut self, fresh: Option<AdminSocket>, next: &Config) {
        if let Some(socket) = fresh {
            info!(admin_socket = %socket.path().display(), "admin endpoint listening");
            if let Some(old) = self.admin_socket.replace(socket) {
                old.close();
            }
        } else if next.global.admin_socket.is_none() {
            if let Some(old) = self.admin_socket.take() {
                old.close();
            }
        }
    }

    /// Derives the process-wide connection cap from RLIMIT_NOFILE as it is now (a reload
    /// picks up a limit changed with prlimit) and the listeners open, and puts it in force.
    fn apply_fd_budget(&mut self, next: &Config) {
        let sockets = next.services.iter().map(|s| s.listen.len()).sum::<usize>()
            + usize::from(next.global.admin.is_some())
            + usize::from(next.global.admin_socket.is_some());
        let budget = FdBudget::current(sockets);
        if self.budget == Some(budget) {
            return;
        }
        self.tracker.set_cap(budget.connection_cap);
        self.admin_state.set_budget(budget, self.tracker.clone());
        let max_connections: usize = next
            .services
            .iter()
            .map(|s| s.max_connections)
            .fold(0, usize::saturating_add);
        let limit = budget
            .limit
            .map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
        if budget.is_starved() {
            warn!(fd_limit = %limit, fd_reserve = budget.reserve, connection_cap = budget.connection_cap,
                "RLIMIT_NOFILE is too low for the descriptor reserve; raise it (LimitNOFILE= in the unit)");
        } else if max_connections > budget.connection_cap {
            warn!(fd_limit = %limit, fd_reserve = budget.reserve, connection_cap = budget.connection_cap, max_connections,
                "the services' max_connections add up to more than the descriptors allow; the descriptor cap applies first");
        } else {
            info!(fd_limit = %limit, fd_reserve = budget.reserve, connection_cap = budget.connection_cap, max_connections,
                "descriptor budget");
        }
        self.budget = Some(budget);
    }

    /// The connection limit for a service started from `cfg`: the running service's of the
    /// same name, resized, when there is one, so that a limit belongs to the service name
    /// and not to one discovery source (see [`Service::start_with_limit`]).
    fn connection_limit_for(&self, cfg: &ServiceConfig) -> Arc<ConnectionLimit> {
        match self.services.get(&cfg.name) {
            Some(old) => {
                let limit = Arc::clone(old.connection_limit());
                limit.resize(&cfg.name, cfg.max_connections);
                limit
            }
            None => Arc::new(ConnectionLimit::new(cfg.max_connections)),
        }
    }

    /// Stops accepting, waits up to `grace` for open connections, then returns.
    pub async fn shutdown(mut self, grace: Duration) {
        for (_, listener) in self.listeners.drain() {
            listener.close().await;
        }
        for service in self.services.values() {
            service.retire();
        }
        let open = self.tracker.open();
        if open > 0 {
            info!(
                connections = open,
                grace_secs = grace.as_secs(),
                "draining connections"
            );
            if tokio::time::timeout(grace, self.tracker.wait_idle())
                .await
                .is_err()
            {
                warn!(
                    connections = self.tracker.open(),
                    "shutdown grace elapsed; closing the remaining connections"
                );
                cut_connections(&self.tracker).await;
            }
        }
        if let Some(admin) = self.admin.take() {
            admin.close();
        }
        if let Some(socket) = self.admin_socket.take() {
            socket.close();
        }
    }

    /// What the admin endpoint shows of the process (services, last reload).
    pub(crate) fn admin_state(&self) -> &AdminState {
        &self.admin_state
    }
}

/// Ends every open connection and gives their tasks a moment to do it themselves: a task
/// knows whether bytes were still in flight and then resets both sides, whereas a socket
/// closed by the runtime going away would send a clean FIN and pass a cut stream off as
/// complete.
async fn cut_connections(tracker: &ConnectionTracker) {
    tracker.cut_all();
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait_idle()).await;
}

/// How long a reload (or start) waits for new services' first lookups, all together: one
/// SRV query plus the target address queries, each bounded by the resolver timeout.
fn first_lookup_budget(resolver: &ResolverConfig) -> Duration {
    resolver
        .timeout
        .saturating_mul(3)
        .min(Duration::from_secs(10))
}
