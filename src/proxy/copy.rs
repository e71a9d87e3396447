//! Moves bytes both ways between a client and a backend until both sides are done, keeping
//! TCP's meaning: a FIN becomes `shutdown(Write)` on the other leg while the other direction
//! keeps flowing, a reset is passed on as a reset, and an idle connection is closed. On Linux
//! the bytes move with splice(2) (see `splice`); elsewhere, or where the kernel refuses it, a
//! userspace copy does. Either way pipes and buffers are taken only while bytes are in
//! flight, so an idle connection holds none.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::health::now_ms;

/// Size of the buffer a direction borrows while it has bytes to move, when splice takes
/// over bulk: a read that fills it switches the direction to splice, and a spliced read
/// smaller than it switches back.
pub(crate) const SMALL_BUFFER: usize = 16 * 1024;
/// Size of that buffer when the userspace copy is all there is (splice off or refused).
const BULK_BUFFER: usize = 64 * 1024;

/// Which leg of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

/// Why a proxied connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with a FIN.
    Closed,
    /// One side reset (or failed); the other was reset too.
    Reset(Side, io::ErrorKind),
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// srvlb ended the connection itself: the shutdown grace elapsed.
    Shutdown,
}

impl End {
    pub fn label(&self) -> String {
        match self {
            End::Closed => "closed".to_owned(),
            End::Reset(side, kind) => format!("{}_reset({kind:?})", side.label()),
            End::IdleTimeout => "idle_timeout".to_owned(),
            End::Shutdown => "shutdown".to_owned(),
        }
    }
}

/// What a finished transfer did.
#[derive(Debug)]
pub struct Transfer {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// Which side sent the first FIN or reset, if any.
    pub first_to_finish: Option<Side>,
    /// When (`now_ms`) that first FIN or reset was seen.
    pub first_finish_at: Option<u64>,
    pub end: End,
    /// srvlb ended the connection itself (idle timeout, shutdown) with bytes still pending,
    /// so both sides were reset rather than closed cleanly: a clean FIN would let a peer
    /// take a cut stream for a complete one.
    pub cut_pending: bool,
}

impl Transfer {
    /// A connection that failed before any byte moved (writing the PROXY header): the
    /// backend's fault, as far as anyone can tell.
    pub fn failed_before_data(kind: io::ErrorKind) -> Transfer {
        Transfer {
            client_to_backend: 0,
            backend_to_client: 0,
            first_to_finish: Some(Side::Backend),
            first_finish_at: Some(now_ms()),
            end: End::Reset(Side::Backend, kind),
            cut_pending: false,
        }
    }
}

/// How long a connection must have moved nothing for a shutdown cut to close it cleanly.
const AT_REST_MS: u64 = 1_000;

pub(crate) use super::progress::Progress;

enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// Proxies until both directions are done, one side resets, nothing moves for `idle`, or
/// `cut` resolves (the shutdown grace elapsed). On a reset, both sockets are set to reset on
/// close (SO_LINGER 0); the caller drops them. When srvlb itself ends the connection (idle
/// timeout, `cut`) while bytes are still pending in either direction, both sides are reset
/// too, so neither can mistake the cut stream for a complete one; with nothing pending they
/// get a clean FIN.
#[allow(clippy::manual_async_fn)] // see the comment in the body
pub fn proxy_streams(
    client: &TcpStream,
    backend: &TcpStream,
    idle: Duration,
    cut: impl Future<Output = ()>,
    on_bytes: &(dyn Fn(Side, u64) + Sync),
) -> impl Future<Output = Transfer> {
    // Not an `async fn`: its arguments would be stored twice in the future (see
    // `proxy::tests::a_connection_task_stays_small`).
    async move {
        #[cfg(target_os = "linux")]
        let pipes = &super::splice::PIPES;
        #[cfg(not(target_os = "linux"))]
        let pipes = &PipePool;
        // Shared by the two pumps and the idle watch, which all run inside this one task, so
        // Cell would do for the logic; but this future must be Send (`tokio::spawn` asks for it
        // even on a worker's single-threaded runtime) and `&Cell` is not, so uncontended relaxed
        // atomics it is.
        let up = AtomicU64::new(0);
        let down = AtomicU64::new(0);
        let last_activity = AtomicU64::new(now_ms());
        let up_progress = Progress::new(&last_activity, idle);
        let down_progress = Progress::new(&last_activity, idle);
        // Directions that ended with a FIN (see `pass_fin`).
        let ended = AtomicU8::new(0);
        let c2b = pump(
            (client, backend),
            &up,
            &up_progress,
            Side::Client,
            on_bytes,
            &ended,
            pipes,
        );
        let b2c = pump(
            (backend, client),
            &down,
            &down_progress,
            Side::Backend,
            on_bytes,
            &ended,
            pipes,
        );
        tokio::pin!(c2b, b2c);
        let idle_expired = idle_watch(&last_activity, idle);
        tokio::pin!(idle_expired, cut);

        let (mut c2b_done, mut b2c_done) = (false, false);
        // A side that sent FIN can still reset later. Its pump is finished, so only a watch for
        // its error notices; without it a silent other side would keep the connection (and the
        // backend's slot) until the idle timeout. Boxed and made only once the side's FIN came:
        // inline, the two watches would be part of every connection's task.
        let mut client_error = None;
        let mut backend_error = None;
        let mut first_to_finish: Option<(Side, u64)> = None;
        let end = loop {
            tokio::select! {
                // In order, not from a random start: only the pumps are woken often, and
                // none of these branches can starve another (each resolves once at most).
                biased;
                result = &mut c2b, if !c2b_done => match result {
                    Ok(()) => {
                        c2b_done = true;
                        client_error = Some(Box::pin(peer_error(client)));
                        first_to_finish.get_or_insert((Side::Client, now_ms()));
                    }
                    Err(PumpError::Read(e)) => break fail(Side::Client, e, &mut first_to_finish),
                    Err(PumpError::Write(e)) => break fail(Side::Backend, e, &mut first_to_finish),
                },
                result = &mut b2c, if !b2c_done => match result {
                    Ok(()) => {
                        b2c_done = true;
                        backend_error = Some(Box::pin(peer_error(backend)));
                        first_to_finish.get_or_insert((Side::Backend, now_ms()));
                    }
                    Err(PumpError::Read(e)) => break fail(Side::Backend, e, &mut first_to_finish),
                    Err(PumpError::Write(e)) => break fail(Side::Client, e, &mut first_to_finish),
                },
                e = poll_some(&mut client_error), if client_error.is_some() => {
                    break fail(Side::Client, e, &mut first_to_finish)
                }
                e = poll_some(&mut backend_error), if backend_error.is_some() => {
                    break fail(Side::Backend, e, &mut first_to_finish)
                }
                () = &mut idle_expired => break End::IdleTimeout,
                () = &mut cut => break End::Shutdown,
            }
            if c2b_done && b2c_done {
                break End::Closed;
            }
        };
        // Asked only when srvlb ends the connection itself: after a clean close or a reset the
        // answer changes nothing, and the two FIONREAD calls would cost every connection.
        let pending = || {
            up_progress.is_holding()
                || down_progress.is_holding()
                || unread(client)
                || unread(backend)
        };
        // A shutdown cut also resets a stream that is merely caught up: a direction still open
        // that moved bytes within the last second is mid-transfer (a backend streaming rows a
        // little slower than the client reads them), and a FIN would pass it off as complete.
        // Only a connection at rest that long gets a clean close.
        let in_flight = || {
            let open = !(c2b_done && b2c_done);
            open && now_ms().saturating_sub(last_activity.load(Ordering::Relaxed)) < AT_REST_MS
        };
        let cut_pending = match end {
            End::IdleTimeout => pending(),
            End::Shutdown => pending() || in_flight(),
            _ => false,
        };
        if matches!(end, End::Reset(..)) || cut_pending {
            reset_on_close(client);
            reset_on_close(backend);
        }
        Transfer {
            client_to_backend: up.load(Ordering::Relaxed),
            backend_to_client: down.load(Ordering::Relaxed),
            first_to_finish: first_to_finish.map(|(side, _)| side),
            first_finish_at: first_to_finish.map(|(_, at)| at),
            end,
            cut_pending,
        }
    }
}

/// True when the kernel holds bytes from `stream`'s peer that srvlb has not read yet (or
/// when that cannot be told: erring towards a reset never passes a cut stream off as whole).
fn unread(stream: &TcpStream) -> bool {
    rustix::io::ioctl_fionread(stream).map_or(true, |n| n > 0)
}

fn fail(side: Side, e: io::Error, first: &mut Option<(Side, u64)>) -> End {
    first.get_or_insert((side, now_ms()));
    End::Reset(side, e.kind())
}

/// Waits for an error (a reset) on a socket whose read side is finished, and returns it.
///
/// Read readiness cannot be used for this: after EOF a socket stays readable, so waiting for
/// it would spin. EPOLLERR, which epoll reports without being asked, is raised when a reset
/// sets the socket's pending error (SO_ERROR); tokio keeps it as `Ready::ERROR` until it is
/// cleared, so a reset that came before this watch started is not missed either.
async fn peer_error(stream: &TcpStream) -> io::Error {
    loop {
        if let Err(e) = stream.ready(Interest::ERROR).await {
            return e;
        }
        // No pending error after all (taken elsewhere, or a stale event): `WouldBlock`
        // clears the readiness, so the next wait sleeps until a new event instead of
        // spinning.
        let taken = stream.try_io(Interest::ERROR, || match stream.take_error() {
            Ok(Some(e)) | Err(e) => Ok(e),
            Ok(None) => Err(io::ErrorKind::WouldBlock.into()),
        });
        if let Ok(e) = taken {
            return e;
        }
    }
}

/// Awaits the future in `slot`; never resolves when there is none.
async fn poll_some<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// Makes the kernel send RST instead of FIN when the socket is closed.
pub fn reset_on_close(stream: &TcpStream) {
    // Failing here only means the peer gets a FIN instead of a RST; nothing to recover.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(target_os = "linux")]
use super::splice::PipePool;
/// Stands in for the pipe pool where there is no splice.
#[cfg(not(target_os = "linux"))]
struct PipePool;

#[cfg(target_os = "linux")]
static NO_PIPE_LOG: super::LogThrottle = super::LogThrottle::new(Duration::from_secs(1));

/// How a pump moves its bytes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Through a small userspace buffer: for small messages, where a read and a write (two
    /// syscalls) beat splicing in and out of a pipe (at least three, one of them EAGAIN).
    Buffer,
    /// socket -> pipe -> socket with splice(2): for bulk, once a read filled the buffer.
    Splice,
}

#[allow(clippy::too_many_arguments)]
#[allow(clippy::manual_async_fn)] // see the comment in the body
fn pump(
    (from, to): (&TcpStream, &TcpStream),
    counter: &AtomicU64,
    progress: &Progress<'_>,
    side: Side,
    on_bytes: &(dyn Fn(Side, u64) + Sync),
    ended: &AtomicU8,
    #[cfg_attr(not(target_os = "linux"), allow(unused_variables))] pipes: &PipePool,
) -> impl Future<Output = Result<(), PumpError>> {
    // Not an `async fn`: its arguments would be stored twice in the future (see
    // `proxy::tests::a_connection_task_stays_small`).
    async move {
        let moved = |n: u64| {
            counter.fetch_add(n, Ordering::Relaxed);
            on_bytes(side, n);
        };
        // Splice pays for bulk only (HAProxy's splice-auto): a direction starts with the small
        // buffer and switches to splice when a read fills it; splice hands back once a burst's
        // reads come in small again. Without splice, the buffer is the bulk size.
        #[cfg(target_os = "linux")]
        let mut splice_allowed = splice_enabled();
        #[cfg(not(target_os = "linux"))]
        let splice_allowed = false;
        let mut mode = Mode::Buffer;
        loop {
            #[cfg(target_os = "linux")]
            if mode == Mode::Splice {
                use super::splice::{SpliceEnd, splice_direction};
                // Boxed, allocated once per burst: inline, the splice state (some 500 bytes)
                // would be part of every connection's task, idle ones included.
                let mut count = |n| moved(n);
                let spliced = Box::pin(splice_direction(from, to, pipes, progress, &mut count));
                match spliced.await {
                    SpliceEnd::Eof => return pass_fin(to, ended),
                    SpliceEnd::Read(e) => return Err(PumpError::Read(e)),
                    SpliceEnd::Write(e) => return Err(PumpError::Write(e)),
                    // The burst is over (a read came in small): back to the buffer.
                    SpliceEnd::Small => {}
                    // Refused before any byte moved: copy in user space from now on.
                    SpliceEnd::Unsupported => splice_allowed = false,
                    // Out of descriptors for a pipe, with nothing in flight: the copy needs
                    // none, so the connection keeps working (copying, for the rest of this
                    // direction).
                    SpliceEnd::NoPipe(e) => {
                        splice_allowed = false;
                        if let Some(suppressed) = NO_PIPE_LOG.permit() {
                            tracing::warn!(
                                error = %e,
                                suppressed,
                                "no pipe for splice (out of descriptors?); copying in user space"
                            );
                        }
                    }
                }
                mode = Mode::Buffer;
                continue;
            }
            // The pump is the one reader of `from`, so the socket's own reader slot holds its
            // waker: no waiter node in the task (as `readable()` would put there, 150 bytes).
            std::future::poll_fn(|cx| from.poll_read_ready(cx))
                .await
                .map_err(PumpError::Read)?;
            // Small while splice may take over bulk; the bulk size once the copy is all there is
            // (splice off, refused, or out of pipes).
            let buffer_size = if splice_allowed {
                SMALL_BUFFER
            } else {
                BULK_BUFFER
            };
            match read_and_write(from, to, buffer_size, progress)? {
                Moved::Eof => return pass_fin(to, ended),
                Moved::Drained | Moved::Interrupted => {}
                Moved::Bytes { n, unwritten } => {
                    let bulk = n == buffer_size && splice_allowed;
                    // Nearly always the destination took it all at once; only a full one
                    // needs the wait, boxed with the bytes it still holds so that neither is
                    // part of every connection's task.
                    if let Some(rest) = unwritten {
                        Box::pin(write_rest(to, rest, progress))
                            .await
                            .map_err(PumpError::Write)?;
                    }
                    progress.set_holding(false);
                    moved(n as u64);
                    if bulk {
                        mode = Mode::Splice;
                    }
                }
            }
        }
    }
}

/// What one read-and-write step of a pump did.
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
) -> Result<Moved, PumpError> {
    with_scratch(size, |buf| match read_some(from, buf) {
        Ok(0) => Ok(Moved::Eof),
        Ok(n) => {
            progress.set_holding(true);
            let written = write_now(to, &buf[..n], progress).map_err(PumpError::Write)?;
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
        Err(e) => Err(PumpError::Read(e)),
    })
}

thread_local! {
    /// The buffer every pump on this thread reads into and writes from. It is taken only for
    /// one synchronous read-and-write step, never across an await, so all of the thread's
    /// connections share it. Made on first use (calloc'd pages, touched only as far as reads
    /// reach).
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
/// of costing a read that only returns EAGAIN. New bytes arriving after the
/// read raise a new readiness event that this does not clear.
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
fn pass_fin(to: &TcpStream, ended: &AtomicU8) -> Result<(), PumpError> {
    if ended.fetch_add(1, Ordering::Relaxed) > 0 {
        return Ok(());
    }
    match SockRef::from(to).shutdown(Shutdown::Write) {
        Ok(()) => Ok(()),
        // The other side is already gone; its own direction will report how.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(PumpError::Write(e)),
    }
}

/// splice(2) is used unless `SRVLB_SPLICE=0` is set in the environment (to compare with the
/// userspace copy, or to work around a kernel that misbehaves). Read once.
#[cfg(target_os = "linux")]
fn splice_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("SRVLB_SPLICE").is_none_or(|v| v != "0"))
}

/// Writes all of `data` to a stream shared by reference (the PROXY header, tests).
pub async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// The part of a pump's write that [`write_now`] could not hand over (the destination is
/// full): waits for room or a probe (see [`Progress`]), writes, and goes on until all of
/// `data` is written, telling `progress` about every partial write.
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

#[allow(clippy::manual_async_fn)] // see the comment in the body
fn idle_watch(last_activity: &AtomicU64, idle: Duration) -> impl Future<Output = ()> {
    // Not an `async fn`: its arguments would be stored twice in the future (see
    // `proxy::tests::a_connection_task_stays_small`).
    async move {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        loop {
            let deadline = last_activity
                .load(Ordering::Relaxed)
                .saturating_add(idle_ms);
            let now = now_ms();
            if now >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(deadline - now)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    /// Small messages go through the buffer and never take a pipe; a bulk transfer switches
    /// to splice (a read filled the buffer), and every byte still arrives in order.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn splice_only_for_bulk() {
        if !splice_enabled() {
            return; // SRVLB_SPLICE=0: nothing is spliced at all.
        }
        let (mut client, near) = pair().await;
        let (far, mut reader) = pair().await;
        let pipes = PipePool::new();
        let counter = AtomicU64::new(0);
        let last = AtomicU64::new(0);
        let progress = Progress::new(&last, Duration::from_secs(60));
        let ended = AtomicU8::new(0);
        let pumped = pump(
            (&near, &far),
            &counter,
            &progress,
            Side::Client,
            &|_, _| {},
            &ended,
            &pipes,
        );
        let bulk: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let drive = async {
            let mut got = Vec::new();
            for i in 0..50u8 {
                client.write_all(&[i; 10]).await.expect("write");
                let mut msg = [0u8; 10];
                reader.read_exact(&mut msg).await.expect("read");
                got.extend_from_slice(&msg);
            }
            let small_pipes = pipes.created();
            client.write_all(&bulk).await.expect("bulk");
            client.shutdown().await.expect("fin");
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).await.expect("read bulk");
            (got, small_pipes, rest)
        };
        let limit = Duration::from_secs(20);
        let (end, (got, small_pipes, rest)) =
            tokio::time::timeout(limit, async { tokio::join!(pumped, drive) })
                .await
                .expect("the transfer finished");
        assert!(end.is_ok(), "the direction failed");
        let expected: Vec<u8> = (0..50u8).flat_map(|i| [i; 10]).collect();
        assert_eq!(got, expected, "small messages arrived changed");
        assert!(
            rest == bulk,
            "bulk bytes differ ({} of {})",
            rest.len(),
            bulk.len()
        );
        assert_eq!(small_pipes, 0, "small messages took a pipe");
        assert!(pipes.created() >= 1, "the bulk transfer was never spliced");
    }

    /// Out of descriptors for a pipe, a direction copies in user space instead of failing.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn no_pipe_falls_back_to_copy_without_losing_bytes() {
        if !splice_enabled() {
            return; // SRVLB_SPLICE=0: the copy path is used anyway.
        }
        let (mut client, near) = pair().await;
        let (far, mut reader) = pair().await;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.expect("write");
            client.shutdown().await.expect("fin");
        });
        let pipes = PipePool::exhausted();
        let counter = AtomicU64::new(0);
        let last = AtomicU64::new(0);
        let progress = Progress::new(&last, Duration::from_secs(60));
        let ended = AtomicU8::new(0);
        let pumped = async {
            let end = pump(
                (&near, &far),
                &counter,
                &progress,
                Side::Client,
                &|_, _| {},
                &ended,
                &pipes,
            )
            .await;
            end.is_ok()
        };
        let read_all = async {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.expect("read");
            got
        };
        let limit = Duration::from_secs(20);
        let (ok, got) = tokio::time::timeout(limit, async { tokio::join!(pumped, read_all) })
            .await
            .expect("the copy finished");
        writer.await.expect("writer");
        assert!(ok, "the direction failed instead of copying");
        assert!(
            got == expected,
            "bytes differ ({} of {})",
            got.len(),
            expected.len()
        );
        assert_eq!(counter.load(Ordering::Relaxed), expected.len() as u64);
    }
}
