//! The admin endpoint's bounded connection table, shared by its TCP and unix listeners: at
//! most `max` live connections plus one evicted and closing, so no flood of clients holds
//! more descriptors than the budget reserves for it. A new connection evicts the oldest one
//! still sending its head (or, when every one is answering, the oldest) rather than queueing
//! behind it. It also keeps the spare descriptor that lets an accept succeed when the process
//! is out of them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// One admin connection, as the slot table sees it.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) id: u64,
    /// True once the request head is complete and the answer is being written: such a
    /// connection is evicted only when no connection is still sending its head.
    pub(super) answering: AtomicBool,
    /// Told to close; it stays in the table (and counts) until its task has ended.
    pub(super) evicted: AtomicBool,
    pub(super) evict: Notify,
}

/// The open admin connections, oldest first.
#[derive(Debug, Default)]
pub(super) struct Slots {
    open: Mutex<VecDeque<Arc<Slot>>>,
    next_id: AtomicU64,
    released: Notify,
    /// Closed to make room for one accept when the process is out of descriptors.
    spare: Mutex<Option<std::fs::File>>,
}

impl Slots {
    /// Registers a new connection; when `max` are live already, evicts the oldest one still
    /// sending its head (or, if every one is answering, the oldest). True when one was
    /// evicted.
    pub(super) fn admit(&self, max: usize) -> (Arc<Slot>, bool) {
        let slot = Arc::new(Slot {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            answering: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        let mut open = self.open.lock();
        let mut evicted = false;
        loop {
            let live: Vec<&Arc<Slot>> = open
                .iter()
                .filter(|s| !s.evicted.load(Ordering::Relaxed))
                .collect();
            if live.len() < max.max(1) {
                break;
            }
            let victim = live
                .iter()
                .find(|s| !s.answering.load(Ordering::Relaxed))
                .unwrap_or(&live[0]);
            victim.evicted.store(true, Ordering::Relaxed);
            // notify_one keeps the wake-up if the task is not waiting yet.
            victim.evict.notify_one();
            evicted = true;
        }
        open.push_back(Arc::clone(&slot));
        (slot, evicted)
    }

    pub(super) fn release(&self, id: u64) {
        let mut open = self.open.lock();
        if let Some(i) = open.iter().position(|s| s.id == id) {
            open.remove(i);
        }
        drop(open);
        self.released.notify_waiters();
    }

    /// Waits until at most `max` connections (live or closing) are open, so that accepting
    /// one more stays within `max + 1`. Evicted connections close within moments.
    pub(super) async fn room(&self, max: usize) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.open.lock().len() <= max.max(1) {
                return;
            }
            released.await;
        }
    }

    /// Gives up the spare descriptor so the next accept can succeed; false when there was
    /// none to give.
    pub(super) fn use_spare(&self) -> bool {
        self.spare.lock().take().is_some()
    }

    /// Opens the spare descriptor again if it was used; a no-op while none can be had.
    pub(super) fn refill_spare(&self) {
        let mut spare = self.spare.lock();
        if spare.is_none() {
            *spare = std::fs::File::open("/dev/null").ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_full_table_evicts_the_oldest_still_sending_its_head() {
        let slots = Slots::default();
        let evicted = |slots: &Slots| -> Vec<u64> {
            let open = slots.open.lock();
            open.iter()
                .filter(|s| s.evicted.load(Ordering::Relaxed))
                .map(|s| s.id)
                .collect()
        };
        let (a, _) = slots.admit(3);
        let (b, _) = slots.admit(3);
        let (c, _) = slots.admit(3);
        a.answering.store(true, Ordering::Relaxed);
        let (d, was_evicted) = slots.admit(3);
        assert!(was_evicted);
        assert_eq!(evicted(&slots), vec![b.id], "b: the oldest not answering");
        slots.release(b.id);
        // Everyone answering: the oldest goes.
        for s in [&c, &d] {
            s.answering.store(true, Ordering::Relaxed);
        }
        let (_e, _) = slots.admit(3);
        assert_eq!(evicted(&slots), vec![a.id]);
        assert_eq!(slots.open.lock().len(), 4, "three live and one closing");
        slots.release(a.id);
        assert_eq!(slots.open.lock().len(), 3);
    }

    #[tokio::test]
    async fn accepting_waits_for_an_evicted_connection_to_close() {
        let slots = Arc::new(Slots::default());
        let (first, _) = slots.admit(1);
        let (_second, evicted) = slots.admit(1);
        assert!(evicted && first.evicted.load(Ordering::Relaxed));
        let waiting = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.room(1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "two open: no room for a third");
        slots.release(first.id);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("room once the evicted one closed")
            .expect("task");
    }

    #[test]
    fn the_spare_is_given_once_and_refilled() {
        let slots = Slots::default();
        assert!(!slots.use_spare(), "none before the first refill");
        slots.refill_spare();
        assert!(slots.use_spare());
        assert!(!slots.use_spare());
    }
}
