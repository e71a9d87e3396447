//! One direction of a proxied connection (client to backend, or back) as a state machine the
//! transfer polls: wait for bytes, read them into the thread's scratch buffer and write them
//! on at once; finish a write the destination could not take whole; splice a bulk burst. It
//! owns the rules a direction keeps on its own: splice only when a read fills the buffer, a
//! FIN passed on as `shutdown(Write)`, and no buffer or pipe held while nothing moves.
//!
//! A hand-written state machine rather than an `async` block: the block kept every local of
//! every await point in each connection's task (216 bytes a direction); this keeps a state
//! tag and, only while a destination is full or a burst is spliced, one boxed future.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::{PipePool, Side};
use super::progress::Progress;

/// Size of the buffer a direction reads into while splice may take over bulk: a read that
/// fills it switches the direction to splice, and a spliced read smaller than it switches
/// back.
pub(crate) const SMALL_BUFFER: usize = 16 * 1024;
/// Size of that buffer when the userspace copy is all there is (splice off or refused).
const BULK_BUFFER: usize = 64 * 1024;

#[cfg(target_os = "linux")]
static NO_PIPE_LOG: super::LogThrottle = super::LogThrottle::new(std::time::Duration::from_secs(1));

/// Why a direction failed: reading its source, or writing its destination.
pub(crate) enum DirectionError {
    Read(io::Error),
    Write(io::Error),
}

/// What both directions of one connection share; lives in the transfer's frame.
pub(crate) struct Shared<'a> {
    pub client: &'a TcpStream,
    pub backend: &'a TcpStream,
    /// Client-to-backend and backend-to-client progress (idle clock, bytes held).
    pub progress: [Progress<'a>; 2],
    /// Bytes moved each way, in the same order.
    pub moved: [AtomicU64; 2],
    /// Told of every chunk that reached its destination (the backend's byte counters, the
    /// first byte that proves a backend).
    pub on_bytes: &'a (dyn Fn(Side, u64) + Sync),
    /// Directions that ended with a FIN (see [`pass_fin`]).
    pub ended: AtomicU8,
    pub pipes: &'a PipePool,
}

impl Shared<'_> {
    /// The socket bytes whose source is `side` come from, and the one they go to.
    pub(crate) fn ends(&self, side: Side) -> (&TcpStream, &TcpStream) {
        side.ends(self.client, self.backend)
    }

    pub(crate) fn progress(&self, side: Side) -> &Progress<'_> {
        &self.progress[side.index()]
    }

    fn count(&self, side: Side, n: u64) {
        self.moved[side.index()].fetch_add(n, Ordering::Relaxed);
        (self.on_bytes)(side, n);
    }
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The bytes whose source is `side`, moving to the other side.
pub(crate) struct Direction<'a> {
    side: Side,
    /// Splice may take over bulk (cleared when the kernel refuses it or no pipe is left).
    splice_allowed: bool,
    flow: Flow<'a>,
}

enum Flow<'a> {
    /// Waiting for bytes, to copy them through the scratch buffer.
    Copying,
    /// The destination was full: the rest of a message of `n` bytes is being written. Then
    /// the `n` bytes are counted and, when the read filled the buffer (`bulk`), the
    /// direction switches to splice.
    Writing {
        rest: Boxed<'a, io::Result<()>>,
        n: usize,
        bulk: bool,
    },
    /// A bulk burst moving with splice(2).
    #[cfg(target_os = "linux")]
    Splicing(Boxed<'a, super::splice::SpliceEnd>),
}

impl<'a> Direction<'a> {
    pub(crate) fn new(side: Side) -> Direction<'a> {
        Direction {
            side,
            splice_allowed: splice_enabled(),
            flow: Flow::Copying,
        }
    }

    /// Moves bytes until the source sends FIN (`Ready(Ok)`, passed on), a side fails, or
    /// nothing can move now (`Pending`, with the task's waker registered where it waits).
    pub(crate) fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        shared: &'a Shared<'a>,
    ) -> Poll<Result<(), DirectionError>> {
        let (from, to) = shared.ends(self.side);
        let progress = shared.progress(self.side);
        loop {
            match &mut self.flow {
                Flow::Copying => {
                    // The direction is the one reader of `from`, so the socket's own reader
                    // slot holds the waker: no waiter node (as `readable()` would make).
                    if let Err(e) = ready!(from.poll_read_ready(cx)) {
                        return Poll::Ready(Err(DirectionError::Read(e)));
                    }
                    // Small while splice may take over bulk; the bulk size once the copy is
                    // all there is (splice off, refused, or out of pipes).
                    let size = if self.splice_allowed {
                        SMALL_BUFFER
                    } else {
                        BULK_BUFFER
                    };
                    let bulk = |n: usize| n == size && self.splice_allowed;
                    match read_and_write(from, to, size, progress) {
                        Err(e) => return Poll::Ready(Err(e)),
                        Ok(Moved::Eof) => return Poll::Ready(pass_fin(to, &shared.ended)),
                        Ok(Moved::Drained | Moved::Interrupted) => {}
                        Ok(Moved::Bytes { n, unwritten: None }) => {
                            let bulk = bulk(n);
                            self.delivered(shared, n, bulk);
                        }
                        // Nearly always the destination takes it all at once; only a full
                        // one needs the wait, boxed with the bytes it still holds.
                        Ok(Moved::Bytes {
                            n,
                            unwritten: Some(rest),
                        }) => {
                            let bulk = bulk(n);
                            self.flow = Flow::Writing {
                                rest: Box::pin(write_rest(to, rest, progress)),
                                n,
                                bulk,
                            };
                        }
                    }
                }
                Flow::Writing { rest, n, bulk } => {
                    if let Err(e) = ready!(rest.as_mut().poll(cx)) {
                        return Poll::Ready(Err(DirectionError::Write(e)));
                    }
                    let (n, bulk) = (*n, *bulk);
                    self.delivered(shared, n, bulk);
                }
                #[cfg(target_os = "linux")]
                Flow::Splicing(burst) => {
                    use super::splice::SpliceEnd;
                    let end = ready!(burst.as_mut().poll(cx));
                    self.flow = Flow::Copying;
                    match end {
                        SpliceEnd::Eof => return Poll::Ready(pass_fin(to, &shared.ended)),
                        SpliceEnd::Read(e) => return Poll::Ready(Err(DirectionError::Read(e))),
                        SpliceEnd::Write(e) => {
                            return Poll::Ready(Err(DirectionError::Write(e)));
                        }
                        // The burst is over (a read came in small): back to the buffer.
                        SpliceEnd::Small => {}
                        // Refused before any byte moved: copy in user space from now on.
                        SpliceEnd::Unsupported => self.splice_allowed = false,
                        // Out of descriptors for a pipe, with nothing in flight: the copy
                        // needs none, so the connection keeps working (copying, for the rest
                        // of this direction).
                        SpliceEnd::NoPipe(e) => {
                            self.splice_allowed = false;
                            if let Some(suppressed) = NO_PIPE_LOG.permit() {
                                tracing::warn!(
                                    error = %e,
                                    suppressed,
                                    "no pipe for splice (out of descriptors?); copying in user space"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// A message of `n` bytes reached the destination: count it, and switch to splice when
    /// its read filled the buffer (bulk, like HAProxy's splice-auto).
    fn delivered(&mut self, shared: &'a Shared<'a>, n: usize, bulk: bool) {
        let side = self.side;
        shared.progress(side).set_holding(false);
        shared.count(side, n as u64);
        self.flow = Flow::Copying;
        #[cfg(target_os = "linux")]
        if bulk {
            let (from, to) = shared.ends(side);
            let burst = super::splice::splice_direction(
                from,
                to,
                shared.pipes,
                shared.progress(side),
                move |n| shared.count(side, n),
            );
            self.flow = Flow::Splicing(Box::pin(burst));
        }
        #[cfg(not(target_os = "linux"))]
        let _ = bulk;
    }
}

/// What one read-and-write step of a direction did.
enum Moved {
    /// The source sent FIN.
    Eof,
    /// Nothing to read after all (readiness was stale).
    Drained,
    /// A signal interrupted the read; try again.
    Interrupted,
    /// `n` bytes were read; `unwritten` holds those the destination did not take yet.
    Bytes {
        n: usize,
        unwritten: Option<Vec<u8>>,
    },
}

/// Reads up to `size` bytes from `from` into the thread's scratch buffer and writes them to
/// `to` at once. Only the bytes the destination could not take are copied out, so a
/// connection holds a buffer only while its destination is full, and a request/response
/// exchange allocates nothing per message.
fn read_and_write(
    from: &TcpStream,
    to: &TcpStream,
    size: usize,
    progress: &Progress<'_>,
) -> Result<Moved, DirectionError> {
    with_scratch(size, |buf| match read_some(from, buf) {
        Ok(0) => Ok(Moved::Eof),
        Ok(n) => {
            progress.set_holding(true);
            let written = write_now(to, &buf[..n], progress).map_err(DirectionError::Write)?;
            if written == 0 {
                // The read was progress too; a write that moved bytes has said so already
                // (one clock read per message, not two).
                progress.touch();
            }
            let unwritten = (written < n).then(|| buf[written..n].to_vec());
            Ok(Moved::Bytes { n, unwritten })
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Moved::Drained),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Moved::Interrupted),
        Err(e) => Err(DirectionError::Read(e)),
    })
}

thread_local! {
    /// The buffer every direction on this thread reads into and writes from. It is taken
    /// only for one synchronous read-and-write step, never across an await, so all of the
    /// thread's connections share it. Made on first use (calloc'd pages, touched only as far
    /// as reads reach).
    static SCRATCH: Cell<Option<Box<[u8]>>> = const { Cell::new(None) };
}

/// Runs `f` on the first `size` bytes (at most [`BULK_BUFFER`]) of the thread's scratch
/// buffer.
fn with_scratch<R>(size: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut buf = SCRATCH
        .try_with(Cell::take)
        .ok()
        .flatten()
        .unwrap_or_else(|| vec![0; BULK_BUFFER].into_boxed_slice());
    let result = f(&mut buf[..size.min(BULK_BUFFER)]);
    // Fails only while the thread exits; the buffer is then simply freed.
    let _ = SCRATCH.try_with(|cell| cell.set(Some(buf)));
    result
}

/// Reads what `from` has into `buf` (never 0 bytes of room, so `Ok(0)` is EOF). A read that
/// returns less than the room it had drained the socket: tokio is told so (as its own
/// `poll_read` does), so the next wait for readability sleeps until new bytes arrive instead
/// of costing a read that only returns EAGAIN. New bytes arriving after the read raise a new
/// readiness event that this does not clear.
fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let room = buf.len();
    let mut got = 0;
    let read = from.try_io(Interest::READABLE, || {
        let n = rustix::io::read(from, &mut *buf)?;
        got = n;
        if n > 0 && n < room {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match read {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// The source sent FIN: pass it on as `shutdown(Write)`, leaving the other direction open.
/// When the other direction has ended with a FIN already, the transfer is over and both
/// sockets are closed at once, which sends this FIN anyway: the shutdown would be a syscall
/// for nothing on every connection. (Both sources are read to EOF then, so the close is a
/// FIN, never a reset for unread bytes.)
pub(crate) fn pass_fin(to: &impl AsFd, ended: &AtomicU8) -> Result<(), DirectionError> {
    if ended.fetch_add(1, Ordering::Relaxed) > 0 {
        return Ok(());
    }
    match SockRef::from(to).shutdown(Shutdown::Write) {
        Ok(()) => Ok(()),
        // The other side is already gone; its own direction will report how.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(DirectionError::Write(e)),
    }
}

/// splice(2) is used unless `SRVLB_SPLICE=0` is set in the environment (to compare with the
/// userspace copy, or to work around a kernel that misbehaves). Read once.
pub(crate) fn splice_enabled() -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("SRVLB_SPLICE").is_none_or(|v| v != "0"))
}

/// Writes as much of `data` as `to` takes now, without waiting; returns how much that was.
fn write_now(to: &TcpStream, data: &[u8], progress: &Progress<'_>) -> io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        let rest = &data[written..];
        match to.try_io(Interest::WRITABLE, || SockRef::from(to).send(rest)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                progress.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// The part of a message that [`write_now`] could not hand over (the destination is full):
/// waits for room or a probe (see [`Progress`]), writes, and goes on until all of `rest` is
/// written, telling `progress` about every partial write.
async fn write_rest(to: &TcpStream, rest: Vec<u8>, progress: &Progress<'_>) -> io::Result<()> {
    let mut data = &rest[..];
    while !data.is_empty() {
        // The socket is non-blocking (tokio made it so): a full buffer is EAGAIN.
        let written = progress
            .write_after_wait(to, || SockRef::from(to).send(data))
            .await;
        match written {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                progress.touch();
                let more = write_now(to, data, progress)?;
                data = &data[more..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
