//! Whether a listener is accepting and, when not, why: the state /metrics and /status show
//! for each listener, and the log of its pauses (once when one has lasted a moment, once when
//! it ends), shared by the listener's accept loops on every worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tracing::{info, warn};

use crate::health::now_ms;
use crate::service::Service;

/// Why a listener is not accepting right now. Clients meanwhile wait in its backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pause {
    /// The service has `max_connections` open.
    MaxConnections,
    /// The process has as many proxied connections as its descriptors allow (`fd_budget`).
    FdCap,
    /// accept(2) failed (EMFILE and the like) and the loop is backing off.
    AcceptBackoff,
}

impl Pause {
    pub(crate) const ALL: [Pause; 3] = [Pause::MaxConnections, Pause::FdCap, Pause::AcceptBackoff];

    /// The label in metrics, status and logs.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Pause::MaxConnections => "max_connections",
            Pause::FdCap => "fd_cap",
            Pause::AcceptBackoff => "accept_backoff",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// What one listener shows /metrics and /status: its address, the service it feeds, whether
/// its accept loops are waiting and for what, and how often they had to.
#[derive(Debug)]
pub(crate) struct ListenerStatus {
    pub(crate) addr: SocketAddr,
    /// The socket's inode, by which its accept queue is found (`backlog::read`).
    inode: Option<u64>,
    service: Arc<ArcSwap<Service>>,
    /// One per accept loop (one loop per worker, all on the same socket).
    loops: Box<[LoopPause]>,
    /// Pause episodes (as logged) per reason.
    pauses: [AtomicU64; 3],
    pub(super) log: PauseLog,
}

/// Whether one accept loop is waiting, and since when.
#[derive(Debug, Default)]
struct LoopPause {
    /// 0 while accepting (or waiting for a client), else 1 + `Pause::index`.
    paused: AtomicU8,
    /// When the current wait began, on the `now_ms` clock.
    since_ms: AtomicU64,
}

impl ListenerStatus {
    pub(super) fn new(
        addr: SocketAddr,
        inode: Option<u64>,
        service: Arc<ArcSwap<Service>>,
        loops: usize,
    ) -> Self {
        ListenerStatus {
            addr,
            inode,
            service,
            loops: (0..loops.max(1)).map(|_| LoopPause::default()).collect(),
            pauses: Default::default(),
            log: PauseLog::new(),
        }
    }

    pub(crate) fn service_name(&self) -> String {
        self.service.load().name.clone()
    }

    pub(crate) fn inode(&self) -> Option<u64> {
        self.inode
    }

    /// Why the listener is not accepting now, and since when (`now_ms` clock); `None` while
    /// any of its loops can take a client (they share one accept queue).
    pub(crate) fn paused(&self) -> Option<(Pause, u64)> {
        let mut earliest: Option<(Pause, u64)> = None;
        for state in self.loops.iter() {
            let code = state.paused.load(Ordering::Relaxed);
            let reason = *Pause::ALL.get(usize::from(code).checked_sub(1)?)?;
            let since = state.since_ms.load(Ordering::Relaxed);
            if earliest.is_none_or(|(_, first)| since < first) {
                earliest = Some((reason, since));
            }
        }
        earliest
    }

    /// Pause episodes for `reason` since the listener started.
    pub(crate) fn pauses_total(&self, reason: Pause) -> u64 {
        self.pauses[reason.index()].load(Ordering::Relaxed)
    }

    pub(super) fn set_paused(&self, accept_loop: usize, reason: Option<Pause>) {
        let Some(state) = self.loops.get(accept_loop) else {
            return;
        };
        if let Some(reason) = reason {
            state.since_ms.store(now_ms(), Ordering::Relaxed);
            state
                .paused
                .store(reason.index() as u8 + 1, Ordering::Relaxed);
        } else {
            state.paused.store(0, Ordering::Relaxed);
        }
    }
}

/// A pause shorter than this is not logged (nor counted): at a limit with connections
/// churning, a listener waits a few milliseconds for each permit, and one line per
/// connection would flood the log while telling nothing the gauges do not.
pub(super) const PAUSE_LOG_AFTER: Duration = Duration::from_millis(250);

/// One pause of a listener: from the first wait for a permit until nobody waits any more.
#[derive(Debug, Clone, Copy)]
pub(super) struct Episode {
    pub(super) since: std::time::Instant,
    pub(super) logged: bool,
}

/// Logs each pause of a listener once, when it has lasted `PAUSE_LOG_AFTER`, and once when it
/// ends. A pause spans the short waits for one permit after another while clients keep
/// waiting; it ends when there is room again (a permit without waiting) or nobody is left
/// in the backlog (a loop holds its permits and waits for a client). Shared by the
/// listener's accept loops, so a pause they all wait out is one episode; the lock is taken
/// only while an episode is open, never on the accept path of a listener that is not paused.
#[derive(Debug)]
pub(super) struct PauseLog {
    episodes: Mutex<[Option<Episode>; 3]>,
    open: [AtomicBool; 3],
}

impl PauseLog {
    fn new() -> PauseLog {
        PauseLog {
            episodes: Mutex::new([None; 3]),
            open: Default::default(),
        }
    }

    /// A wait for `reason` begins; returns the episode it belongs to.
    pub(super) fn enter(&self, reason: Pause) -> Episode {
        let mut episodes = self.episodes.lock();
        self.open[reason.index()].store(true, Ordering::Relaxed);
        *episodes[reason.index()].get_or_insert(Episode {
            since: std::time::Instant::now(),
            logged: false,
        })
    }

    /// Logs the pause if it has lasted long enough (or at once with `now`).
    pub(super) fn maybe_log(&self, status: &ListenerStatus, reason: Pause, now: bool) {
        if !self.open[reason.index()].load(Ordering::Relaxed) {
            return;
        }
        let mut episodes = self.episodes.lock();
        let Some(episode) = &mut episodes[reason.index()] else {
            return;
        };
        if episode.logged || (!now && episode.since.elapsed() < PAUSE_LOG_AFTER) {
            return;
        }
        episode.logged = true;
        drop(episodes);
        status.pauses[reason.index()].fetch_add(1, Ordering::Relaxed);
        warn!(
            listener = %status.addr,
            service = %status.service_name(),
            reason = reason.label(),
            "accepting paused; new clients wait in the listen backlog"
        );
    }

    pub(super) fn leave(&self, status: &ListenerStatus, reason: Pause) {
        if !self.open[reason.index()].load(Ordering::Relaxed) {
            return;
        }
        let episode = {
            let mut episodes = self.episodes.lock();
            self.open[reason.index()].store(false, Ordering::Relaxed);
            episodes[reason.index()].take()
        };
        if let Some(episode) = episode.filter(|e| e.logged) {
            info!(
                listener = %status.addr,
                service = %status.service_name(),
                reason = reason.label(),
                paused_ms = episode.since.elapsed().as_millis() as u64,
                "accepting resumed"
            );
        }
    }
}
