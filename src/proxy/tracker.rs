//! Who is still connected: the count of open client connections across all listeners (so a
//! shutdown can wait for them, or tell each to end now) and the process-wide connection cap
//! every listener takes a permit of before it accepts.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Poll, Waker};

use tokio::sync::{Notify, Semaphore};

use crate::service::ConnectionLimit;

/// Counts open client connections across all listeners so shutdown can wait for them, and
/// holds the process-wide connection cap (derived from RLIMIT_NOFILE, see `fd_budget`) that
/// every listener takes a permit of before it accepts. Unlimited until `set_cap`.
#[derive(Debug, Clone)]
pub struct ConnectionTracker {
    inner: Arc<TrackerInner>,
    cap: Arc<ConnectionLimit>,
}

impl Default for ConnectionTracker {
    fn default() -> ConnectionTracker {
        ConnectionTracker {
            inner: Arc::default(),
            cap: Arc::new(ConnectionLimit::new(ConnectionLimit::MAX)),
        }
    }
}

#[derive(Debug)]
struct TrackerInner {
    open: AtomicUsize,
    idle: Notify,
    /// Set once the shutdown grace has elapsed: every open connection ends now.
    cut: AtomicBool,
    /// Wakes the connections waiting in `Tracked::cut` when `cut` is set.
    cut_now: Notify,
}

impl Default for TrackerInner {
    fn default() -> TrackerInner {
        TrackerInner {
            open: AtomicUsize::new(0),
            idle: Notify::new(),
            cut: AtomicBool::new(false),
            cut_now: Notify::new(),
        }
    }
}

/// Held by a connection task; the count drops when it ends, however it ends.
pub struct Tracked(Arc<TrackerInner>);

impl Tracked {
    /// Resolves when the connection must end now (the shutdown grace elapsed).
    pub async fn cut(&self) {
        // A `Notify` waiter rather than a watch subscription: every open connection holds
        // this future for its whole life, and this one is less than half the size.
        let notified = self.0.cut_now.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.0.cut.load(Ordering::Acquire) {
            return;
        }
        // This future is polled every time the connection's task wakes (a message, either
        // way), and polling a waiting `Notified` locks the one `Notify` every connection of
        // every worker waits on. Once the waiter holds the task's waker, `notify_waiters`
        // wakes the task without being polled, so the waiter is polled again only when the
        // cut is due or the waker has changed.
        let mut registered: Option<Waker> = None;
        std::future::poll_fn(|cx| {
            if self.0.cut.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            if registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return Poll::Pending;
            }
            let poll = notified.as_mut().poll(cx);
            registered = Some(cx.waker().clone());
            poll
        })
        .await;
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl ConnectionTracker {
    pub fn track(&self) -> Tracked {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        Tracked(Arc::clone(&self.inner))
    }

    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Tells every open connection to end now. Each ends in its own task: with a reset
    /// when bytes were still in flight, else with a clean close.
    pub fn cut_all(&self) {
        self.inner.cut.store(true, Ordering::Release);
        self.inner.cut_now.notify_waiters();
    }

    /// Sets the process-wide cap on proxied connections. Lowering it below the connections
    /// open closes none: listeners wait until enough have ended.
    pub fn set_cap(&self, cap: usize) {
        self.cap.resize("(process descriptor cap)", cap);
    }

    /// The semaphore of the process-wide cap.
    pub fn cap(&self) -> &Arc<Semaphore> {
        self.cap.semaphore()
    }

    /// Resolves once no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}
