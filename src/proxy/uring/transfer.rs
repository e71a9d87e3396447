//! Both directions of a connection on the worker's io_uring ring: each direction keeps one
//! receive armed on its source; the bytes it brings (in a buffer of the ring's pool, taken
//! only when they arrive) are sent on from that same buffer, and the next receive is armed
//! once they are all sent. The rules are the epoll path's (`copy`): a FIN becomes
//! `shutdown(Write)` on the other leg, a reset is passed on as a reset, a finished source
//! is watched for a late reset ([`Watch`]), the idle clock moves with any progress, and a connection
//! srvlb ends itself with bytes pending is reset, never closed cleanly.
//!
//! Before the transfer returns, every operation still in flight is cancelled and waited
//! for: a socket an operation still refers to would not close (nor reset) when dropped, and
//! a receive that took bytes after the end was decided makes the end a reset.
//!
//! A hand-written future rather than an `async` block, like the epoll path's: all its state
//! is one struct, stored once in the connection's task.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::Sleep;

use super::ring::{self, ECANCELED, ENOBUFS, Lease, Op};
use crate::health::now_ms;
use crate::proxy::copy::{End, Ending, Leftover, Side, Transfer, conclude, fail, peer_error};
use crate::proxy::direction::{DirectionError, pass_fin};

const EINTR: i32 = 4;
const EAGAIN: i32 = 11;

/// Proxies `client` and `backend` on this thread's ring until both directions are done,
/// one side resets, nothing moves for `idle`, or `cut` resolves: the contract of the epoll
/// path's `copy::proxy_streams`. The ring must be set up on this thread (`ring::ensure`).
/// The sockets are the transfer's: they close when it is dropped, once (when it ran to the
/// end) no operation refers to them any more.
pub(crate) fn proxy_streams<'a, C: Future<Output = ()> + Unpin>(
    client: TcpStream,
    backend: TcpStream,
    idle: Duration,
    cut: C,
    on_bytes: &'a (dyn Fn(Side, u64) + Sync),
) -> RingTransfer<'a, C> {
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    // The clock ticks a few times per idle timeout: each tick probes a destination that has
    // not taken bytes since the last one (see `Step::Sending`).
    let probe_ms = (idle_ms / 4).max(10);
    RingTransfer {
        c2b: Leg::Moving(Direction::new(Side::Client)),
        b2c: Leg::Moving(Direction::new(Side::Backend)),
        io: Io {
            client,
            backend,
            on_bytes,
            moved: [Cell::new(0), Cell::new(0)],
            holding: [Cell::new(false), Cell::new(false)],
            ended: AtomicU8::new(0),
            last_activity: Cell::new(now_ms()),
        },
        idle_ms,
        probe_ms,
        sleep: tokio::time::sleep(Duration::from_millis(probe_ms.min(idle_ms))),
        cut,
        first_to_finish: None,
        ending: None,
        lost: false,
    }
}

pin_project_lite::pin_project! {
    /// The future [`proxy_streams`] returns.
    #[project = RingTransferProj]
    pub(crate) struct RingTransfer<'a, C> {
        // Before `io`, which holds the sockets: fields drop in order, so a transfer dropped
        // midway hands its operations to the ring (cancelled, and flushed) while their
        // descriptors are still open.
        c2b: Leg,
        b2c: Leg,
        io: Io<'a>,
        idle_ms: u64,
        probe_ms: u64,
        // The idle clock: expires once nothing has moved either way for `idle_ms`, and
        // ticks every `probe_ms` before that so that blocked sends are probed.
        #[pin]
        sleep: Sleep,
        cut: C,
        first_to_finish: Option<(Side, u64)>,
        // Set once the end is decided: the operations in flight are being cancelled.
        ending: Option<Ending>,
        // A cancelled receive took bytes that will never be sent on.
        lost: bool,
    }
}

/// The sockets, and what both directions share.
struct Io<'a> {
    client: TcpStream,
    backend: TcpStream,
    /// Told of every chunk that reached its destination.
    on_bytes: &'a (dyn Fn(Side, u64) + Sync),
    /// Bytes moved client to backend, and back.
    moved: [Cell<u64>; 2],
    /// Each direction holds bytes received and not all sent yet.
    holding: [Cell<bool>; 2],
    /// Directions that ended with a FIN (see `pass_fin`).
    ended: AtomicU8,
    /// When (`now_ms`) bytes last moved either way.
    last_activity: Cell<u64>,
}

impl Io<'_> {
    /// The socket bytes whose source is `side` come from, and the one they go to.
    fn ends(&self, side: Side) -> (&TcpStream, &TcpStream) {
        side.ends(&self.client, &self.backend)
    }

    fn touch(&self) {
        self.last_activity.set(now_ms());
    }

    fn delivered(&self, side: Side, n: u64) {
        let i = side.index();
        self.holding[i].set(false);
        self.moved[i].set(self.moved[i].get() + n);
        (self.on_bytes)(side, n);
    }
}

impl<C: Future<Output = ()> + Unpin> Future for RingTransfer<'_, C> {
    type Output = Transfer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Transfer> {
        let mut this = self.project();
        if this.ending.is_none() {
            let ending = ready!(poll_end(&mut this, cx));
            this.c2b.cancel();
            this.b2c.cancel();
            *this.ending = Some(ending);
            let give_up = tokio::time::Instant::now() + Duration::from_millis(SETTLE_MS);
            this.sleep.as_mut().reset(give_up);
        }
        let c2b = this.c2b.poll_settled(cx, this.io);
        let b2c = this.b2c.poll_settled(cx, this.io);
        for settled in [&c2b, &b2c] {
            if let Poll::Ready(lost) = settled {
                *this.lost |= *lost;
            }
        }
        if c2b.is_pending() || b2c.is_pending() {
            ready!(this.sleep.as_mut().poll(cx));
            // The kernel has not answered the cancels: the operations are left to the ring
            // (which frees what they hold when they complete), and what they took is taken
            // as lost, so a cut ends in a reset.
            *this.c2b = Leg::Finished(Watch::None);
            *this.b2c = Leg::Finished(Watch::None);
            *this.lost = true;
        }
        let lost = *this.lost;
        let Some(ending) = this.ending.take() else {
            return Poll::Pending;
        };
        let io = &*this.io;
        let left = Leftover {
            holding: io.holding.iter().any(Cell::get),
            lost,
            last_activity: io.last_activity.get(),
        };
        let [up, down] = &io.moved;
        let moved = (up.get(), down.get());
        Poll::Ready(conclude(ending, left, moved, (&io.client, &io.backend)))
    }
}

/// Polls both directions, then the idle clock and the shutdown cut: `Ready` with how the
/// connection ended.
fn poll_end<C: Future<Output = ()> + Unpin>(
    this: &mut RingTransferProj<'_, '_, C>,
    cx: &mut Context<'_>,
) -> Poll<Ending> {
    let ended = |this: &RingTransferProj<'_, '_, C>, end: End| {
        Poll::Ready(Ending {
            end,
            first_to_finish: *this.first_to_finish,
            open: !(this.c2b.is_finished() && this.b2c.is_finished()),
        })
    };
    loop {
        let other_finished = this.b2c.is_finished();
        let leg = (Side::Client, other_finished);
        if let Poll::Ready(end) = this.c2b.poll_leg(cx, this.io, leg, this.first_to_finish) {
            return ended(this, end);
        }
        let other_finished = this.c2b.is_finished();
        let leg = (Side::Backend, other_finished);
        if let Poll::Ready(end) = this.b2c.poll_leg(cx, this.io, leg, this.first_to_finish) {
            return ended(this, end);
        }
        if this.c2b.is_finished() && this.b2c.is_finished() {
            return ended(this, End::Closed);
        }
        // A watch to arm soon makes the clock's next tick come no later than then.
        let due = this.c2b.watch_due().or(this.b2c.watch_due());
        if let Some(due) = due {
            let wait = Duration::from_millis(due.saturating_sub(now_ms()));
            let at = tokio::time::Instant::now() + wait;
            if this.sleep.deadline() > at {
                this.sleep.as_mut().reset(at);
            }
        }
        let mut armed = false;
        while this.sleep.as_mut().poll(cx).is_ready() {
            let deadline = this.io.last_activity.get().saturating_add(*this.idle_ms);
            let now = now_ms();
            if now >= deadline {
                return ended(this, End::IdleTimeout);
            }
            this.c2b.probe(now, *this.probe_ms);
            this.b2c.probe(now, *this.probe_ms);
            armed |= this.c2b.arm_watch(now, this.io, Side::Client);
            armed |= this.b2c.arm_watch(now, this.io, Side::Backend);
            let watch = this.c2b.watch_due().or(this.b2c.watch_due());
            let next = (deadline - now)
                .min(*this.probe_ms)
                .min(watch.map_or(u64::MAX, |due| due.saturating_sub(now)));
            let at = tokio::time::Instant::now() + Duration::from_millis(next);
            this.sleep.as_mut().reset(at);
        }
        if !armed {
            break;
        }
    }
    if Pin::new(&mut *this.cut).poll(cx).is_ready() {
        return ended(this, End::Shutdown);
    }
    Poll::Pending
}

/// A direction, moving or finished.
enum Leg {
    Moving(Direction),
    /// Its source sent FIN, passed on; it is watched for a late reset (see [`Watch`]).
    Finished(Watch),
}

/// The watch on a finished source: a reset it sends later must reach the other side, which
/// may be silent, instead of waiting for the idle timeout.
///
/// io_uring cannot wait for it: its poll always reports RDHUP, which a source that sent FIN
/// has for good. So the watch is an epoll one (on a duplicate of the socket, registered with
/// the worker's reactor), armed only once the connection has stayed half-closed for
/// [`WATCH_AFTER_MS`]: most connections are over by then, and pay nothing for it.
enum Watch {
    /// Nothing to watch: both directions are done.
    None,
    /// To be armed at this time (`now_ms`).
    Due(u64),
    Armed(Pin<Box<dyn Future<Output = io::Error> + Send>>),
}

/// How long a connection stays half-closed before its finished source is watched.
const WATCH_AFTER_MS: u64 = 200;

/// How long the end of a transfer waits for the kernel to answer its cancels (it normally
/// does within one loop of the worker).
const SETTLE_MS: u64 = 1_000;

impl Leg {
    fn poll_leg(
        &mut self,
        cx: &mut Context<'_>,
        io: &Io<'_>,
        (source, other_finished): (Side, bool),
        first: &mut Option<(Side, u64)>,
    ) -> Poll<End> {
        loop {
            match self {
                Leg::Moving(direction) => match ready!(direction.poll_move(cx, io)) {
                    Ok(()) => {
                        let now = now_ms();
                        first.get_or_insert((source, now));
                        if other_finished {
                            *self = Leg::Finished(Watch::None);
                            return Poll::Pending;
                        }
                        *self = Leg::Finished(Watch::Due(now.saturating_add(WATCH_AFTER_MS)));
                    }
                    Err(DirectionError::Read(e)) => return Poll::Ready(fail(source, e, first)),
                    Err(DirectionError::Write(e)) => {
                        return Poll::Ready(fail(source.other(), e, first));
                    }
                },
                Leg::Finished(Watch::None | Watch::Due(_)) => return Poll::Pending,
                Leg::Finished(Watch::Armed(watch)) => {
                    let e = ready!(watch.as_mut().poll(cx));
                    return Poll::Ready(fail(source, e, first));
                }
            }
        }
    }

    /// When this leg's watch is to be armed, if it waits for that.
    fn watch_due(&self) -> Option<u64> {
        match self {
            Leg::Finished(Watch::Due(at)) => Some(*at),
            _ => None,
        }
    }

    /// Arms the watch on `source` if it is due at `now`; true if it did (the caller polls
    /// the leg again, to register the watch's wake-up).
    fn arm_watch(&mut self, now: u64, io: &Io<'_>, source: Side) -> bool {
        if self.watch_due().is_none_or(|at| at > now) {
            return false;
        }
        let (from, _) = io.ends(source);
        *self = Leg::Finished(match from.try_clone() {
            Ok(dup) => Watch::Armed(Box::pin(async move {
                match tokio::net::TcpStream::from_std(dup) {
                    Ok(stream) => peer_error(&stream).await,
                    // Not registered (out of memory): the idle timeout will end it.
                    Err(_) => std::future::pending().await,
                }
            })),
            // Out of descriptors: the idle timeout will end it.
            Err(_) => Watch::None,
        });
        true
    }

    fn is_finished(&self) -> bool {
        matches!(self, Leg::Finished(_))
    }

    fn probe(&mut self, now: u64, probe_ms: u64) {
        if let Leg::Moving(direction) = self {
            direction.probe(now, probe_ms);
        }
    }

    /// The operation in flight, if any, and whether it is a receive.
    fn op(&mut self) -> Option<(&mut Op, bool)> {
        match self {
            Leg::Moving(Direction {
                step: Step::Receiving(op),
                ..
            }) => Some((op, true)),
            Leg::Moving(Direction {
                step: Step::Sending { op, .. },
                ..
            }) => Some((op, false)),
            Leg::Moving(_) | Leg::Finished(_) => None,
        }
    }

    /// Asks the kernel to end the operation in flight, once the connection's end is decided.
    fn cancel(&mut self) {
        if let Some((op, _)) = self.op() {
            op.cancel();
        }
    }

    /// Ready once no operation of this leg is in flight any more; true when a receive took
    /// bytes that will now never be sent on. A send that completed the message after all
    /// counts it as delivered.
    fn poll_settled(&mut self, cx: &mut Context<'_>, io: &Io<'_>) -> Poll<bool> {
        let Some((op, receiving)) = self.op() else {
            return Poll::Ready(false);
        };
        let done = ready!(op.poll(cx));
        if let Leg::Moving(Direction {
            side,
            step: Step::Sending { total, sent, .. },
        }) = self
        {
            let sent = sent.saturating_add(done.result.max(0).unsigned_abs());
            if sent >= *total {
                io.delivered(*side, u64::from(*total));
            }
        }
        *self = Leg::Finished(Watch::None);
        Poll::Ready(receiving && done.result > 0)
    }
}

/// The bytes whose source is `side`, moving to the other side.
struct Direction {
    side: Side,
    step: Step,
}

enum Step {
    /// About to arm the next receive.
    Idle,
    Receiving(Op),
    /// The pool had no buffer: waiting for one to come back (true once registered).
    NoBuffer(bool),
    /// Sending `total` bytes of a received buffer, `sent` of them done. A send waiting while
    /// nothing has moved on the connection since `since` (ms) is cancelled at the next clock
    /// tick and sent again (`probed`): the kernel wakes a full socket's writer only once
    /// much of its buffer is free, which a slow but steady reader may take longer than the
    /// idle timeout to free, while a new send takes whatever room there is.
    Sending {
        op: Op,
        total: u32,
        sent: u32,
        since: u64,
        probed: bool,
    },
}

impl Direction {
    fn new(side: Side) -> Direction {
        Direction {
            side,
            step: Step::Idle,
        }
    }

    /// Moves bytes until the source sends FIN (`Ready(Ok)`, passed on), a side fails, or
    /// nothing can move now.
    fn poll_move(&mut self, cx: &mut Context<'_>, io: &Io<'_>) -> Poll<Result<(), DirectionError>> {
        loop {
            let (from, to) = io.ends(self.side);
            match &mut self.step {
                Step::Idle => match ring::recv(from.as_fd()) {
                    Ok(op) => self.step = Step::Receiving(op),
                    Err(e) => return Poll::Ready(Err(DirectionError::Read(e))),
                },
                Step::Receiving(op) => {
                    let done = ready!(op.poll(cx));
                    self.step = Step::Idle;
                    match done.result {
                        n if n > 0 => {
                            let Some(lease) = done.lease else {
                                let e = io::Error::other("a receive came back without its buffer");
                                return Poll::Ready(Err(DirectionError::Read(e)));
                            };
                            io.touch();
                            io.holding[self.side.index()].set(true);
                            let total = n.unsigned_abs();
                            let since = io.last_activity.get();
                            if let Err(e) = self.send(to, lease, (0, total), since) {
                                return Poll::Ready(Err(e));
                            }
                        }
                        0 => return Poll::Ready(pass_fin(to, &io.ended)),
                        e if e == -ENOBUFS => {
                            super::STATS.buffer_waits.fetch_add(1, Ordering::Relaxed);
                            self.step = Step::NoBuffer(false);
                        }
                        e if e == -EINTR || e == -EAGAIN || e == -ECANCELED => {}
                        e => {
                            let e = io::Error::from_raw_os_error(-e);
                            return Poll::Ready(Err(DirectionError::Read(e)));
                        }
                    }
                }
                Step::NoBuffer(waiting) => {
                    ready!(ring::poll_buffer(cx, waiting));
                    self.step = Step::Idle;
                }
                Step::Sending {
                    op, total, sent, ..
                } => {
                    let done = ready!(op.poll(cx));
                    let (total, sent) = (*total, *sent);
                    self.step = Step::Idle;
                    let Some(lease) = done.lease else {
                        let e = io::Error::other("a send came back without its buffer");
                        return Poll::Ready(Err(DirectionError::Write(e)));
                    };
                    let rest = match done.result {
                        m if m > 0 => {
                            io.touch();
                            sent.saturating_add(m.unsigned_abs()).min(total)
                        }
                        // Interrupted, or cancelled by a probe: send the rest again.
                        e if e == -EINTR || e == -EAGAIN || e == -ECANCELED => sent,
                        0 => {
                            let e = io::Error::from(io::ErrorKind::WriteZero);
                            return Poll::Ready(Err(DirectionError::Write(e)));
                        }
                        e => {
                            let e = io::Error::from_raw_os_error(-e);
                            return Poll::Ready(Err(DirectionError::Write(e)));
                        }
                    };
                    if rest < total {
                        let since = io.last_activity.get();
                        if let Err(e) = self.send(to, lease, (rest, total), since) {
                            return Poll::Ready(Err(e));
                        }
                    } else {
                        drop(lease);
                        io.delivered(self.side, u64::from(total));
                    }
                }
            }
        }
    }

    /// Sends bytes `sent..total` of `lease`'s buffer to `to`; `since`: when bytes last moved
    /// (the connection's idle clock, read rather than the clock again).
    fn send(
        &mut self,
        to: &TcpStream,
        lease: Lease,
        (sent, total): (u32, u32),
        since: u64,
    ) -> Result<(), DirectionError> {
        let (offset, len) = (sent as usize, (total - sent) as usize);
        let op = ring::send(to.as_fd(), lease, offset, len).map_err(DirectionError::Write)?;
        self.step = Step::Sending {
            op,
            total,
            sent,
            since,
            probed: false,
        };
        Ok(())
    }

    fn probe(&mut self, now: u64, probe_ms: u64) {
        if let Step::Sending {
            op, since, probed, ..
        } = &mut self.step
        {
            if !*probed && now.saturating_sub(*since) >= probe_ms {
                *probed = true;
                op.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::thread;

    use super::*;

    /// A connected pair of sockets on loopback: (the end srvlb holds, the peer's end).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let near = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (far, _) = listener.accept().expect("accept");
        near.set_nonblocking(true).expect("nonblocking");
        (near, far)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// A peer that writes `data` and half-closes after `delay`, while another thread reads
    /// everything that comes back; joined for what it read.
    fn peer(mut socket: TcpStream, data: Vec<u8>, delay: Duration) -> thread::JoinHandle<Vec<u8>> {
        let mut reader = socket.try_clone().expect("clone");
        let got = thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).expect("read");
            got
        });
        thread::spawn(move || {
            thread::sleep(delay);
            socket.write_all(&data).expect("write");
            socket.shutdown(Shutdown::Write).expect("fin");
            got.join().expect("reader")
        })
    }

    async fn proxy(client: TcpStream, backend: TcpStream, moved: &AtomicU64) -> Transfer {
        ring::ensure().expect("io_uring ring");
        let cut = std::pin::pin!(std::future::pending::<()>());
        let count = |_: Side, n: u64| {
            moved.fetch_add(n, Ordering::Relaxed);
        };
        let limit = Duration::from_secs(30);
        let transfer = proxy_streams(client, backend, Duration::from_secs(60), cut, &count);
        tokio::time::timeout(limit, transfer)
            .await
            .expect("the transfer finished")
    }

    /// Bytes cross both ways intact, each FIN is passed on while the other direction keeps
    /// flowing, and the transfer ends as a clean close that counted every byte.
    #[tokio::test]
    async fn bytes_cross_both_ways_and_each_fin_is_passed_on() {
        let (client, client_peer) = pair();
        let (backend, backend_peer) = pair();
        let up = pattern(1_500_000, 0);
        let down = pattern(700_000, 0x5a);
        // The client finishes first; the backend keeps sending for a while after.
        let from_backend = peer(client_peer, up.clone(), Duration::ZERO);
        let from_client = peer(backend_peer, down.clone(), Duration::from_millis(300));
        let moved = AtomicU64::new(0);
        let transfer = proxy(client, backend, &moved).await;
        assert_eq!(transfer.end, End::Closed);
        assert_eq!(transfer.first_to_finish, Some(Side::Client));
        let (at_backend, at_client) = (from_client.join(), from_backend.join());
        assert!(
            at_backend.expect("backend peer") == up,
            "client bytes changed"
        );
        assert!(
            at_client.expect("client peer") == down,
            "backend bytes changed"
        );
        assert_eq!(transfer.client_to_backend, up.len() as u64);
        assert_eq!(transfer.backend_to_client, down.len() as u64);
        assert_eq!(
            moved.load(Ordering::Relaxed),
            (up.len() + down.len()) as u64
        );
    }

    /// More connections with bytes in flight than the pool has buffers: the receives that
    /// find none wait for one to come back, and every stream still arrives whole.
    #[tokio::test]
    async fn receives_wait_for_a_buffer_when_the_pool_runs_dry() {
        let connections = 3 * usize::from(super::super::ring::TEST_BUFFERS);
        let mut peers = Vec::new();
        let mut transfers = Vec::new();
        let moved = AtomicU64::new(0);
        let waits_before = super::super::STATS.buffer_waits.load(Ordering::Relaxed);
        for i in 0..connections {
            let (client, client_peer) = pair();
            let (backend, backend_peer) = pair();
            // Small socket buffers towards the backend: a direction's send blocks (and its
            // buffer stays leased) as soon as a few KiB wait there.
            socket2::SockRef::from(&backend)
                .set_send_buffer_size(4096)
                .expect("sndbuf");
            socket2::SockRef::from(&backend_peer)
                .set_recv_buffer_size(4096)
                .expect("rcvbuf");
            let data = pattern(150_000, i as u8);
            // The backends start reading only after a while: meanwhile every direction
            // holds a buffer it cannot send, and the pool is empty.
            let reader = thread::spawn({
                let mut backend_peer = backend_peer;
                move || {
                    thread::sleep(Duration::from_millis(500));
                    let mut got = Vec::new();
                    backend_peer.read_to_end(&mut got).expect("read");
                    drop(backend_peer);
                    got
                }
            });
            let writer = thread::spawn({
                let mut client_peer = client_peer;
                let data = data.clone();
                move || {
                    client_peer.write_all(&data).expect("write");
                    client_peer.shutdown(Shutdown::Write).expect("fin");
                    let mut rest = Vec::new();
                    let _ = client_peer.read_to_end(&mut rest);
                }
            });
            peers.push((data, reader, writer));
            transfers.push((client, backend));
        }
        let all = transfers
            .into_iter()
            .map(|(client, backend)| proxy(client, backend, &moved));
        let ends: Vec<Transfer> = futures_join_all(all).await;
        for (transfer, (data, reader, writer)) in ends.iter().zip(peers) {
            let got = reader.join().expect("reader");
            writer.join().expect("writer");
            assert!(
                got == data,
                "a stream changed ({} of {} bytes)",
                got.len(),
                data.len()
            );
            assert_eq!(transfer.client_to_backend, data.len() as u64);
        }
        let waits = super::super::STATS.buffer_waits.load(Ordering::Relaxed) - waits_before;
        assert!(
            waits > 0,
            "no receive found the pool empty: nothing was tested"
        );
    }

    /// Polls every future to completion on this task (the transfers must share the thread's
    /// ring), in order of the input.
    async fn futures_join_all<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
        let mut pending: Vec<Pin<Box<F>>> = futures.map(Box::pin).collect();
        let mut done: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut all = true;
            for (future, out) in pending.iter_mut().zip(done.iter_mut()) {
                if out.is_none() {
                    match future.as_mut().poll(cx) {
                        Poll::Ready(v) => *out = Some(v),
                        Poll::Pending => all = false,
                    }
                }
            }
            if all { Poll::Ready(()) } else { Poll::Pending }
        })
        .await;
        done.into_iter().flatten().collect()
    }
}
