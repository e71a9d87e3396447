//! One io_uring instance per worker thread, and the only `unsafe` code in srvlb: the ring
//! takes raw pointers into memory the kernel writes later, which no safe wrapper of the
//! maintained `io-uring` crate can check. Everything else sees a safe interface: an [`Op`]
//! (a submitted operation, polled like a future) and a [`Lease`] (a receive buffer).
//!
//! Why it is sound: every pointer a submission carries points into memory the ring itself
//! owns (its provided-buffer pool), never into a connection's task. A buffer is either in
//! the kernel's buffer ring or leased to exactly one owner (a connection, or a send in
//! flight), never both. Dropping an [`Op`] before its completion cancels it and leaves its
//! slot (and any buffer it holds) with the ring until the kernel answers. The ring frees
//! its memory only once every operation has completed; if some never do, it leaks it.
//!
//! Receives use a provided-buffer ring (the kernel picks a buffer only when bytes arrive),
//! so an idle connection's pending receive holds no memory.

#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue};
use slab::Slab;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Bytes in one receive buffer: what one receive can take at most.
pub(crate) const BUFFER_SIZE: usize = 16 * 1024;
/// Receive buffers per worker (a power of two, as the kernel's buffer ring requires): up to
/// this many directions can hold received bytes not yet sent on at once; the next receive
/// waits for a buffer to come back. 32 MiB of address space, of which only the buffers the
/// load needs are ever touched (see `BufferPool::spare`), and those only as far as bytes
/// reach. (Four in unit tests, so that they can run the pool dry.)
#[cfg(not(test))]
const BUFFERS: u16 = 2048;
/// Buffers the kernel's ring holds at first; more as receives find none (see
/// `BufferPool::target`).
const INITIAL_PUBLISHED: u16 = 64;
#[cfg(test)]
const BUFFERS: u16 = TEST_BUFFERS;
#[cfg(test)]
pub(crate) const TEST_BUFFERS: u16 = 4;
const BUFFER_GROUP: u16 = 0;
/// Submission queue entries: how many operations one flush can carry.
const SUBMISSION_ENTRIES: u32 = 1024;
/// Completion queue entries: completions waiting to be reaped (the kernel keeps any excess
/// on its overflow list, so this bounds nothing but the fast path).
const COMPLETION_ENTRIES: u32 = 8192;
/// The `user_data` of cancel requests, whose own completions say nothing anyone waits for.
const CANCEL: u64 = u64::MAX;
/// How often a full submission queue is handed to the kernel before an operation fails.
const PUSH_TRIES: usize = 16;
const PAGE: usize = 4096;

/// Linux ABI values the ring's operations take as plain integers.
const MSG_NOSIGNAL: i32 = 0x4000;
pub(crate) const ECANCELED: i32 = 125;
pub(crate) const ENOBUFS: i32 = 105;

thread_local! {
    static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
    /// The runtime of this thread flushes the ring before it parks (a worker sets this):
    /// submissions are batched until then. Elsewhere every submission enters the kernel at
    /// once.
    static FLUSH_ON_PARK: Cell<bool> = const { Cell::new(false) };
}

/// Tells every ring made on this thread later that its runtime calls [`on_park`].
pub(crate) fn flush_on_park() {
    FLUSH_ON_PARK.with(|f| f.set(true));
}

/// The runtime's park hook: submits what this thread's ring has queued and wakes the tasks
/// whose operations completed, so that they run before the thread sleeps (and their next
/// operations go out with the next park).
pub(crate) fn on_park() {
    let mut woken = Vec::new();
    with_ring(|ring| {
        ring.flush();
        ring.reap(&mut woken);
    });
    woken.into_iter().for_each(Waker::wake);
}

/// Identifies one ring, so that a handle is never used with another thread's ring.
type RingId = u32;
static NEXT_RING: AtomicU32 = AtomicU32::new(1);

/// Sets up this thread's ring if it has none yet. Needs a single-threaded tokio runtime
/// here: the ring's completions are reaped by a task that must run on this thread. The ring
/// is kept only once all of it is in place (its eventfd watched, its driver task spawned).
pub(crate) fn ensure() -> io::Result<()> {
    let present = RING.with(|cell| cell.try_borrow().map(|slot| slot.is_some()));
    match present {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(_) => return Err(busy()),
    }
    let handle = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring needs a single-threaded runtime",
        ));
    }
    let ring = Ring::new()?;
    // The kernel signals this eventfd when completion work is waiting; the reactor watches
    // it (it is the watch's own, so it stays valid for as long as the watch).
    let fd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
    ring.uring.submitter().register_eventfd(fd.as_raw_fd())?;
    // SAFETY: the `OwnedFd` stays open and the same file for the watch's whole life, as it
    // is the watch's own.
    let watch = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(io::Error::from)?;
    RING.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(|_| busy())?;
        *slot = Some(ring);
        Ok::<_, io::Error>(())
    })?;
    super::STATS.rings.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(Driver { watch });
    Ok(())
}

/// True when this thread's ring exists but is borrowed right now.
fn ring_in_use() -> bool {
    RING.try_with(|cell| cell.try_borrow_mut().is_err())
        .unwrap_or(false)
}

fn busy() -> io::Error {
    io::Error::other("the io_uring ring is in use")
}

/// The ring's driver task: submits what was queued and runs the ring's completion work
/// (`on_park`) whenever an operation is queued on an empty submission queue or the eventfd
/// says completions wait. The park hook does the same before the thread sleeps, batching
/// more; but tokio skips that hook while it has deferred tasks (a task that yielded or ran
/// out of budget), so the driver is what guarantees a queued operation reaches the kernel
/// within one round of the scheduler.
///
/// The eventfd is never read: every signal is a new edge for epoll, and its counter (64
/// bits) does not fill.
struct Driver {
    watch: AsyncFd<OwnedFd>,
}

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let registered = with_ring(|ring| {
            ring.flush_requested = false;
            if !ring
                .driver
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                ring.driver = Some(cx.waker().clone());
            }
        });
        if registered.is_none() {
            // The ring is gone (the thread is ending) or in use: nothing to drive now.
            return Poll::Pending;
        }
        loop {
            match self.watch.poll_read_ready(cx) {
                Poll::Ready(Ok(mut ready)) => ready.clear_ready(),
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => break,
            }
        }
        on_park();
        Poll::Pending
    }
}

/// Runs `f` on this thread's ring, if there is one and it is not in use.
fn with_ring<R>(f: impl FnOnce(&mut Ring) -> R) -> Option<R> {
    RING.try_with(|cell| cell.try_borrow_mut().ok()?.as_mut().map(f))
        .ok()
        .flatten()
}

/// Like [`with_ring`], for the ring `id` only.
fn with_ring_id<R>(id: RingId, f: impl FnOnce(&mut Ring) -> R) -> Option<R> {
    with_ring(|ring| (ring.id == id).then(|| f(ring))).flatten()
}

struct Ring {
    id: RingId,
    uring: IoUring,
    slots: Slab<Slot>,
    pool: BufferPool,
    /// Directions waiting for a receive buffer to come back, in the order they found none:
    /// each buffer given back wakes one (waking all of them at once, thousands under load,
    /// would have all but one find none again).
    buffer_waiters: VecDeque<Waker>,
    flush_on_park: bool,
    /// The driver task, woken when an operation is queued on an empty submission queue.
    driver: Option<Waker>,
    /// The driver was woken and has not run since.
    flush_requested: bool,
}

/// An operation in flight, or completed and not yet taken by its [`Op`].
struct Slot {
    waker: Option<Waker>,
    done: Option<(i32, u32)>,
    /// Its [`Op`] is gone: the completion only frees the slot.
    orphaned: bool,
    /// The buffer a send is sending from, held until the send completes.
    lease: Option<u16>,
}

impl Ring {
    fn new() -> io::Result<Ring> {
        let uring = IoUring::builder()
            .setup_cqsize(COMPLETION_ENTRIES)
            .setup_clamp()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(SUBMISSION_ENTRIES)?;
        let mut probe = Probe::new();
        uring.submitter().register_probe(&mut probe)?;
        let needed = [
            opcode::Recv::CODE,
            opcode::Send::CODE,
            opcode::AsyncCancel::CODE,
        ];
        if let Some(missing) = needed.iter().find(|&&code| !probe.is_supported(code)) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel's io_uring lacks operation {missing}"),
            ));
        }
        let pool = BufferPool::new(&uring)?;
        Ok(Ring {
            id: NEXT_RING.fetch_add(1, Ordering::Relaxed),
            uring,
            slots: Slab::with_capacity(256),
            pool,
            buffer_waiters: VecDeque::new(),
            flush_on_park: FLUSH_ON_PARK.with(Cell::get),
            driver: None,
            flush_requested: false,
        })
    }

    /// Queues `entry` as the operation of a new slot; returns the slot's key.
    ///
    /// # Safety
    /// Every pointer in `entry` must point into memory this ring owns and keeps unchanged
    /// until the operation completes (see the module's comment).
    unsafe fn submit(&mut self, entry: squeue::Entry, lease: Option<u16>) -> io::Result<u32> {
        let entry_slot = self.slots.vacant_entry();
        let Ok(key) = u32::try_from(entry_slot.key()) else {
            return Err(io::ErrorKind::OutOfMemory.into());
        };
        entry_slot.insert(Slot {
            waker: None,
            done: None,
            orphaned: false,
            lease,
        });
        let entry = entry.user_data(u64::from(key));
        // SAFETY: passed on from this function's contract.
        if let Err(e) = unsafe { self.push(&entry) } {
            // Never queued: nothing refers to the slot (its buffer goes back to the caller).
            self.slots.remove(key as usize);
            return Err(e);
        }
        self.request_flush();
        Ok(key)
    }

    /// Makes sure what was just queued reaches the kernel soon: at once where no park hook
    /// flushes, else by waking the driver task once per batch.
    fn request_flush(&mut self) {
        if !self.flush_on_park {
            self.flush();
        } else if !self.flush_requested {
            self.flush_requested = true;
            if let Some(driver) = &self.driver {
                driver.wake_by_ref();
            }
        }
    }

    /// # Safety
    /// As for [`Ring::submit`].
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..PUSH_TRIES {
            // SAFETY: the caller vouches for the entry's pointers.
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // The queue is full: hand it to the kernel and try again.
            if self.uring.submit().is_err() {
                // EBUSY (completions overflowing): reap to make room first. Waking a task
                // only schedules it, so the ring may be in use meanwhile.
                let mut woken = Vec::new();
                self.reap(&mut woken);
                woken.into_iter().for_each(Waker::wake);
            }
        }
        Err(io::Error::other("the io_uring submission queue stays full"))
    }

    fn flush(&mut self) {
        let sq = self.uring.submission();
        if !sq.is_empty() || sq.cq_overflow() || sq.taskrun() {
            drop(sq);
            // An error here (EINTR, EBUSY) leaves the entries queued for the next flush.
            let _ = self.uring.submit();
        }
    }

    /// Asks the kernel to end operation `key` early. Failing (the queue stays full), the
    /// operation ends when it would have; the transfer does not wait for it long.
    fn cancel(&mut self, key: u32) {
        if self
            .slots
            .get(key as usize)
            .is_none_or(|slot| slot.done.is_some())
        {
            // Completed already: a cancel could only hit the next operation with its key.
            return;
        }
        let entry = opcode::AsyncCancel::new(u64::from(key))
            .build()
            .user_data(CANCEL);
        // SAFETY: a cancel request carries no pointer.
        let _ = unsafe { self.push(&entry) };
        self.request_flush();
    }

    /// Takes every waiting completion: records it in its slot and collects the waker to
    /// wake, or frees an orphaned slot and what it held.
    fn reap(&mut self, woken: &mut Vec<Waker>) {
        for cqe in self.uring.completion() {
            let key = cqe.user_data();
            if key == CANCEL {
                continue;
            }
            let Ok(key) = usize::try_from(key) else {
                continue;
            };
            let Some(slot) = self.slots.get_mut(key) else {
                continue;
            };
            if cqueue::buffer_select(cqe.flags()).is_some() {
                // The kernel lent this buffer out of its ring: srvlb's until given back.
                self.pool.lent();
            }
            if slot.orphaned {
                let slot = self.slots.remove(key);
                for bid in slot
                    .lease
                    .into_iter()
                    .chain(cqueue::buffer_select(cqe.flags()))
                {
                    self.pool.give_back(bid);
                }
                continue;
            }
            slot.done = Some((cqe.result(), cqe.flags()));
            woken.extend(slot.waker.take());
        }
        self.wake_buffer_waiters(woken);
    }

    fn give_back(&mut self, bid: u16) {
        self.pool.give_back(bid);
        let mut woken = Vec::new();
        self.wake_buffer_waiters(&mut woken);
        woken.into_iter().for_each(Waker::wake);
    }

    /// As many directions as there are buffers in the kernel's ring now try again, those
    /// that have waited longest first. (Waking every waiter at once, thousands under load,
    /// would have all but a few find none again.)
    fn wake_buffer_waiters(&mut self, woken: &mut Vec<Waker>) {
        let n = usize::from(self.pool.in_kernel()).min(self.buffer_waiters.len());
        woken.extend(self.buffer_waiters.drain(..n));
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        super::STATS.rings.fetch_sub(1, Ordering::Relaxed);
        // Every operation still in flight is cancelled and waited for (a second at most)
        // before the buffers it may write into are freed.
        if !self.slots.is_empty() {
            let entry = opcode::AsyncCancel2::new(CancelBuilder::any())
                .build()
                .user_data(CANCEL);
            // SAFETY: a cancel request carries no pointer.
            let _ = unsafe { self.push(&entry) };
        }
        let wait = Timespec::from(Duration::from_millis(10));
        let args = SubmitArgs::new().timespec(&wait);
        for _ in 0..100 {
            let mut woken = Vec::new();
            self.slots
                .iter_mut()
                .for_each(|(_, slot)| slot.orphaned = true);
            self.reap(&mut woken);
            // Completed but never taken: nothing in flight any more.
            self.slots.retain(|_, slot| slot.done.is_none());
            if self.slots.is_empty() {
                return;
            }
            let _ = self.uring.submitter().submit_with_args(1, &args);
        }
        // The kernel still holds operations that may write into the buffers: leak them
        // rather than free memory it writes to.
        self.pool.leak();
    }
}

/// The receive buffers of one ring and the kernel's buffer ring that lends them out.
struct BufferPool {
    /// `BUFFERS` entries of the kernel's buffer ring, page-aligned.
    entries: *mut BufRingEntry,
    /// `BUFFERS` buffers of `BUFFER_SIZE` bytes.
    memory: *mut u8,
    /// The next tail to publish.
    tail: u16,
    /// Buffers lent out by the kernel and not given back yet.
    leased: u16,
    /// Buffers neither in the kernel's ring nor lent out, most recently returned last: they
    /// go to the kernel again first, so a worker's buffers in use stay as few as its load
    /// needs (the kernel hands out its ring's buffers in order, touching every one).
    spare: Vec<u16>,
    /// How many buffers the kernel's ring is kept filled with: doubled whenever a receive
    /// finds none, up to `BUFFERS`.
    target: u16,
    leaked: bool,
}

fn entries_layout() -> std::alloc::Layout {
    let size = usize::from(BUFFERS) * std::mem::size_of::<BufRingEntry>();
    // The size is a multiple of 16 and PAGE is a power of two: the layout is valid.
    std::alloc::Layout::from_size_align(size.max(PAGE), PAGE)
        .unwrap_or_else(|_| std::alloc::Layout::new::<[u8; PAGE]>())
}

fn memory_layout() -> std::alloc::Layout {
    std::alloc::Layout::from_size_align(usize::from(BUFFERS) * BUFFER_SIZE, PAGE)
        .unwrap_or_else(|_| std::alloc::Layout::new::<[u8; PAGE]>())
}

impl BufferPool {
    fn new(uring: &IoUring) -> io::Result<BufferPool> {
        let (entries_layout, memory_layout) = (entries_layout(), memory_layout());
        // SAFETY: both layouts have a non-zero size.
        let entries = unsafe { std::alloc::alloc_zeroed(entries_layout) }.cast::<BufRingEntry>();
        // SAFETY: as above. Zeroed pages are mapped lazily: untouched buffers cost nothing.
        let memory = unsafe { std::alloc::alloc_zeroed(memory_layout) };
        let target = INITIAL_PUBLISHED.min(BUFFERS);
        let mut pool = BufferPool {
            entries,
            memory,
            tail: 0,
            leased: 0,
            // Popped from the end: the lowest numbers first.
            spare: (target..BUFFERS).rev().collect(),
            target,
            leaked: false,
        };
        if entries.is_null() || memory.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // SAFETY: `entries` is page-aligned, zeroed and `BUFFERS` entries long, and lives
        // until the pool is dropped, after the ring (and its registration) is gone, or is
        // leaked.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                entries as u64,
                BUFFERS,
                BUFFER_GROUP,
                0,
            )?;
        }
        for bid in 0..target {
            pool.publish(bid);
        }
        Ok(pool)
    }

    /// Buffers in the kernel's ring now, for receives to take.
    fn in_kernel(&self) -> u16 {
        BUFFERS
            .saturating_sub(self.leased)
            .saturating_sub(self.spare.len() as u16)
    }

    /// The kernel lent a buffer out (a receive's completion carried it).
    fn lent(&mut self) {
        self.leased = self.leased.saturating_add(1);
        self.top_up();
    }

    /// Buffer `bid` is srvlb's no more: to the kernel's ring if it is short, else spare.
    fn give_back(&mut self, bid: u16) {
        if bid >= BUFFERS {
            return;
        }
        let short = self.in_kernel() < self.target;
        self.leased = self.leased.saturating_sub(1);
        if short {
            self.publish(bid);
        } else {
            self.spare.push(bid);
        }
    }

    /// A receive found the kernel's ring empty: keep it filled with twice as many.
    fn grow(&mut self) {
        self.target = self.target.saturating_mul(2).min(BUFFERS);
        self.top_up();
    }

    fn top_up(&mut self) {
        while self.in_kernel() < self.target {
            let Some(bid) = self.spare.pop() else {
                return;
            };
            self.publish(bid);
        }
    }

    /// Puts buffer `bid` in the kernel's ring.
    fn publish(&mut self, bid: u16) {
        let index = usize::from(self.tail & (BUFFERS - 1));
        // SAFETY: `index` is within the `BUFFERS` entries; the kernel reads only entries
        // below the published tail, and this one is past it until the store below.
        let entry = unsafe { &mut *self.entries.add(index) };
        entry.set_addr(self.memory as u64 + u64::from(bid) * BUFFER_SIZE as u64);
        entry.set_len(BUFFER_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lies in the first entry, which lives as long as the pool;
        // the kernel reads it concurrently, hence the atomic store with release ordering
        // (the entry written above must be visible first).
        unsafe {
            let tail = BufRingEntry::tail(self.entries).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        if self.leaked || self.entries.is_null() || self.memory.is_null() {
            return;
        }
        // SAFETY: allocated in `new` with these layouts; no operation is in flight (the
        // ring checked, or leaked the pool instead), and the ring's descriptor, declared
        // before the pool, is closed already.
        unsafe {
            std::alloc::dealloc(self.entries.cast(), entries_layout());
            std::alloc::dealloc(self.memory, memory_layout());
        }
    }
}

/// A submitted operation. Poll it for its completion; dropping it before then cancels it.
#[derive(Debug)]
pub(crate) struct Op {
    ring: RingId,
    key: u32,
    /// True once its completion was taken.
    done: bool,
}

/// What an operation ended with.
#[derive(Debug)]
pub(crate) struct Completion {
    /// The syscall's result: a count, or a negated errno.
    pub(crate) result: i32,
    /// A receive's buffer, or the buffer a send sent from.
    pub(crate) lease: Option<Lease>,
}

/// A receive buffer lent to its holder; given back to the kernel when dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    ring: RingId,
    bid: u16,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let bid = self.bid;
        with_ring_id(self.ring, |ring| ring.give_back(bid));
    }
}

fn current_id() -> io::Result<RingId> {
    with_ring(|ring| ring.id).ok_or_else(|| io::Error::other("no io_uring ring on this thread"))
}

/// Receives into a buffer the kernel picks from the pool once bytes arrive.
pub(crate) fn recv(fd: BorrowedFd<'_>) -> io::Result<Op> {
    let ring = current_id()?;
    let entry = opcode::Recv::new(Fd(fd.as_raw_fd()), std::ptr::null_mut(), BUFFER_SIZE as u32)
        .buf_group(BUFFER_GROUP)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT);
    // SAFETY: no pointer: the kernel takes a buffer of the pool the ring owns.
    let key = with_ring(|r| unsafe { r.submit(entry, None) }).ok_or_else(busy)??;
    Ok(Op {
        ring,
        key,
        done: false,
    })
}

/// Sends `len` bytes of `lease`'s buffer from `offset` on. The completion gives the lease
/// back. An offset or length beyond the buffer is cut to it.
pub(crate) fn send(fd: BorrowedFd<'_>, lease: Lease, offset: usize, len: usize) -> io::Result<Op> {
    let ring = current_id()?;
    if lease.ring != ring {
        return Err(io::Error::other("a buffer of another thread's ring"));
    }
    let offset = offset.min(BUFFER_SIZE);
    let len = len.min(BUFFER_SIZE - offset);
    let bid = lease.bid;
    let key = with_ring(|r| {
        let start = r.pool.memory as usize + usize::from(bid) * BUFFER_SIZE + offset;
        let entry = opcode::Send::new(Fd(fd.as_raw_fd()), start as *const u8, len as u32)
            .flags(MSG_NOSIGNAL)
            .build();
        // SAFETY: the bytes lie in buffer `bid` of the ring's pool (offset and length are
        // cut to it), which the slot holds until the send completes.
        let key = unsafe { r.submit(entry, Some(bid)) };
        // The slot holds the buffer from now on (or, when there is none, the pool has it
        // back); the lease must not give it back (its drop could not, inside the ring).
        if key.is_err() {
            r.give_back(bid);
        }
        std::mem::forget(lease);
        key
    })
    .ok_or_else(busy)??;
    Ok(Op {
        ring,
        key,
        done: false,
    })
}

/// Ready once a receive may find a buffer again: at once when the kernel's ring has one
/// (some came back since the receive found none), else when one comes back.
pub(crate) fn poll_buffer(cx: &mut Context<'_>, waiting: &mut bool) -> Poll<()> {
    if std::mem::take(waiting) {
        return Poll::Ready(());
    }
    let queued = with_ring(|ring| {
        ring.pool.grow();
        if ring.pool.in_kernel() > 0 {
            return false;
        }
        ring.buffer_waiters.push_back(cx.waker().clone());
        true
    });
    if queued != Some(true) {
        return Poll::Ready(());
    }
    *waiting = true;
    Poll::Pending
}

impl Op {
    /// The operation's completion, once the kernel has answered.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Completion> {
        if self.done {
            return Poll::Pending;
        }
        let (ring, key) = (self.ring, self.key as usize);
        let taken = with_ring_id(ring, |r| {
            let slot = r.slots.get_mut(key)?;
            match slot.done {
                Some(done) => {
                    let slot = r.slots.remove(key);
                    Some(Some((done, slot.lease)))
                }
                None => {
                    if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        slot.waker = Some(cx.waker().clone());
                    }
                    Some(None)
                }
            }
        });
        match taken.flatten() {
            Some(Some(((result, flags), lease))) => {
                self.done = true;
                let lease = lease
                    .or_else(|| cqueue::buffer_select(flags))
                    .map(|bid| Lease { ring, bid });
                Poll::Ready(Completion { result, lease })
            }
            Some(None) => Poll::Pending,
            None if ring_in_use() => {
                // Polled while the ring is borrowed (not reachable today): try again soon
                // rather than take a live operation for a finished one.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            // No such slot, or another thread's ring: the operation cannot complete here.
            None => {
                debug_assert!(false, "an io_uring operation polled away from its ring");
                self.done = true;
                Poll::Ready(Completion {
                    result: -ECANCELED,
                    lease: None,
                })
            }
        }
    }

    /// Asks the kernel to end the operation early; its completion still comes (usually
    /// `-ECANCELED`, or what it did before the cancel reached it) and must be polled for.
    pub(crate) fn cancel(&self) {
        if !self.done {
            let key = self.key;
            with_ring_id(self.ring, |ring| ring.cancel(key));
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let key = self.key;
        with_ring_id(self.ring, |ring| {
            let Some(slot) = ring.slots.get_mut(key as usize) else {
                return;
            };
            if slot.done.is_some() {
                // Completed but never taken: free what it holds now.
                let slot = ring.slots.remove(key as usize);
                let flags = slot.done.map_or(0, |(_, flags)| flags);
                for bid in slot.lease.into_iter().chain(cqueue::buffer_select(flags)) {
                    ring.give_back(bid);
                }
            } else {
                slot.orphaned = true;
                slot.waker = None;
                ring.cancel(key);
                // Now, not at the next park: the owner closes its sockets next, and an
                // operation still queued would name a descriptor number free for reuse.
                ring.flush();
            }
        });
    }
}
