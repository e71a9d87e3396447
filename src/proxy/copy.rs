//! Moves bytes both ways between a client and a backend until both sides are done, keeping
//! TCP's meaning: a FIN becomes `shutdown(Write)` on the other leg while the other direction
//! keeps flowing, a reset is passed on as a reset, and an idle connection is closed. On Linux
//! the bytes move with splice(2) (see `splice`); elsewhere, or where the kernel refuses it, a
//! userspace copy does. Either way pipes and buffers are taken only while bytes are in
//! flight, so an idle connection holds none.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::direction::{Direction, DirectionError, Shared};
use super::progress::Progress;
use crate::health::now_ms;

/// Which leg of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    /// Where this side's entry is in the per-direction arrays (client to backend first).
    pub(crate) fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Backend => 1,
        }
    }

    /// Of the two legs, the one bytes whose source is this side come from, and the one they
    /// go to.
    pub(crate) fn ends<T>(self, client: T, backend: T) -> (T, T) {
        match self {
            Side::Client => (client, backend),
            Side::Backend => (backend, client),
        }
    }

    /// The other leg of the connection.
    pub(crate) fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

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
    /// srvlb could not go on with the connection (a local error, not a side's); both sides
    /// were reset.
    Local(io::ErrorKind),
}

impl End {
    pub fn label(&self) -> String {
        match self {
            End::Closed => "closed".to_owned(),
            End::Reset(side, kind) => format!("{}_reset({kind:?})", side.label()),
            End::IdleTimeout => "idle_timeout".to_owned(),
            End::Shutdown => "shutdown".to_owned(),
            End::Local(kind) => format!("local_error({kind:?})"),
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

    /// A connection srvlb could not go on with, for a reason of its own: nobody's fault.
    pub fn failed_locally(kind: io::ErrorKind) -> Transfer {
        Transfer {
            client_to_backend: 0,
            backend_to_client: 0,
            first_to_finish: None,
            first_finish_at: None,
            end: End::Local(kind),
            cut_pending: false,
        }
    }
}

/// How long a connection must have moved nothing for a shutdown cut to close it cleanly.
const AT_REST_MS: u64 = 1_000;

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
    cut: impl Future<Output = ()> + Unpin,
    on_bytes: &(dyn Fn(Side, u64) + Sync),
) -> impl Future<Output = Transfer> {
    // Not an `async fn`: its arguments would be stored twice in the future (see
    // `proxy::tests::a_connection_task_stays_small`).
    async move {
        #[cfg(target_os = "linux")]
        let pipes = &super::splice::PIPES;
        #[cfg(not(target_os = "linux"))]
        let pipes = &PipePool;
        // Read and written by the two directions and the idle clock, which all run inside
        // this one task, so Cell would do for the logic; but this future must be Send
        // (`tokio::spawn` asks for it even on a worker's single-threaded runtime) and `&Cell`
        // is not, so uncontended relaxed atomics it is.
        let last_activity = AtomicU64::new(now_ms());
        let shared = Shared {
            client,
            backend,
            progress: [
                Progress::new(&last_activity, idle),
                Progress::new(&last_activity, idle),
            ],
            moved: [AtomicU64::new(0), AtomicU64::new(0)],
            on_bytes,
            ended: AtomicU8::new(0),
            pipes,
        };
        let sleep = tokio::time::sleep(idle);
        tokio::pin!(sleep);
        let ending = Both {
            shared: &shared,
            c2b: Leg::Moving(Direction::new(Side::Client)),
            b2c: Leg::Moving(Direction::new(Side::Backend)),
            idle: IdleClock {
                last_activity: &last_activity,
                idle_ms: u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
                sleep,
            },
            cut,
            first_to_finish: None,
        }
        .await;
        let [up, down] = &shared.moved;
        conclude(
            ending,
            Leftover {
                holding: shared.progress.iter().any(Progress::is_holding),
                lost: false,
                last_activity: last_activity.load(Ordering::Relaxed),
            },
            (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed)),
            (client, backend),
        )
    }
}

/// How the directions of a connection ended: why, which side finished first (and when), and
/// whether a direction was still open.
pub(crate) struct Ending {
    pub(crate) end: End,
    pub(crate) first_to_finish: Option<(Side, u64)>,
    pub(crate) open: bool,
}

/// What a connection's directions still had when it ended.
pub(crate) struct Leftover {
    /// A direction held bytes taken from its source, not all written yet.
    pub(crate) holding: bool,
    /// Bytes were taken from a source that will never reach the destination.
    pub(crate) lost: bool,
    /// When (`now_ms`) bytes last moved either way.
    pub(crate) last_activity: u64,
}

/// The end of a transfer, on either data path: decides whether srvlb's own end of the
/// connection (idle timeout, shutdown cut) must be a reset, sets both sockets to reset on
/// close when it must or when a side reset, and sums up what moved (`moved`: client to
/// backend, backend to client).
pub(crate) fn conclude(
    Ending {
        end,
        first_to_finish,
        open,
    }: Ending,
    left: Leftover,
    (client_to_backend, backend_to_client): (u64, u64),
    (client, backend): (&impl AsFd, &impl AsFd),
) -> Transfer {
    // Asked only when srvlb ends the connection itself: after a clean close or a reset the
    // answer changes nothing, and the two FIONREAD calls would cost every connection.
    let pending = || left.lost || left.holding || unread(client) || unread(backend);
    // A shutdown cut also resets a stream that is merely caught up: a direction still open
    // that moved bytes within the last second is mid-transfer (a backend streaming rows a
    // little slower than the client reads them), and a FIN would pass it off as complete.
    // Only a connection at rest that long gets a clean close.
    let in_flight = || open && now_ms().saturating_sub(left.last_activity) < AT_REST_MS;
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
        client_to_backend,
        backend_to_client,
        first_to_finish: first_to_finish.map(|(side, _)| side),
        first_finish_at: first_to_finish.map(|(_, at)| at),
        end,
        cut_pending,
    }
}

/// Both directions of a connection, its idle clock and the shutdown cut, polled as one
/// future: resolves with how the connection ended, which side finished first (and when),
/// and whether a direction was still open.
struct Both<'a, C> {
    shared: &'a Shared<'a>,
    c2b: Leg<'a>,
    b2c: Leg<'a>,
    idle: IdleClock<'a>,
    /// Pinned by the caller (`Unpin` here): pinning it again would store it twice.
    cut: C,
    first_to_finish: Option<(Side, u64)>,
}

/// A direction, moving or finished.
enum Leg<'a> {
    Moving(Direction<'a>),
    /// Its source sent FIN, passed on. The source can still reset later; without a watch
    /// for its error a silent other side would keep the connection (and the backend's slot)
    /// until the idle timeout. Boxed and made only once the FIN came: inline, the watches
    /// would be part of every connection's task. None once both directions are done.
    Finished(Option<Pin<Box<dyn Future<Output = io::Error> + Send + 'a>>>),
}

impl<'a> Leg<'a> {
    /// `Ready` with the end of the connection when this leg ends it (a failure, a reset after
    /// FIN); turns into `Finished` on a FIN (`other_finished`: the other leg is, too).
    fn poll_leg(
        &mut self,
        cx: &mut Context<'_>,
        shared: &'a Shared<'a>,
        (source, other_finished): (Side, bool),
        first: &mut Option<(Side, u64)>,
    ) -> Poll<End> {
        loop {
            match self {
                Leg::Moving(direction) => match ready!(direction.poll_move(cx, shared)) {
                    Ok(()) => {
                        first.get_or_insert((source, now_ms()));
                        if other_finished {
                            // Both directions are done: the transfer is over, nothing to watch.
                            *self = Leg::Finished(None);
                            return Poll::Pending;
                        }
                        let (source_stream, _) = shared.ends(source);
                        *self = Leg::Finished(Some(Box::pin(peer_error(source_stream))));
                    }
                    Err(DirectionError::Read(e)) => return Poll::Ready(fail(source, e, first)),
                    Err(DirectionError::Write(e)) => {
                        return Poll::Ready(fail(source.other(), e, first));
                    }
                },
                Leg::Finished(None) => return Poll::Pending,
                Leg::Finished(Some(watch)) => {
                    let e = ready!(watch.as_mut().poll(cx));
                    return Poll::Ready(fail(source, e, first));
                }
            }
        }
    }

    fn is_finished(&self) -> bool {
        matches!(self, Leg::Finished(_))
    }
}

impl<C: Future<Output = ()> + Unpin> Future for Both<'_, C> {
    type Output = Ending;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let open = |this: &Self| !(this.c2b.is_finished() && this.b2c.is_finished());
        let ended = |this: &Self, end: End| {
            Poll::Ready(Ending {
                end,
                first_to_finish: this.first_to_finish,
                open: open(this),
            })
        };
        // In order: the directions first (they are what wakes a connection), then the watches
        // that end it from outside.
        let leg = (Side::Client, this.b2c.is_finished());
        if let Poll::Ready(end) = this
            .c2b
            .poll_leg(cx, this.shared, leg, &mut this.first_to_finish)
        {
            return ended(this, end);
        }
        let leg = (Side::Backend, this.c2b.is_finished());
        if let Poll::Ready(end) = this
            .b2c
            .poll_leg(cx, this.shared, leg, &mut this.first_to_finish)
        {
            return ended(this, end);
        }
        if !open(this) {
            return ended(this, End::Closed);
        }
        if this.idle.poll_expired(cx).is_ready() {
            return ended(this, End::IdleTimeout);
        }
        if Pin::new(&mut this.cut).poll(cx).is_ready() {
            return ended(this, End::Shutdown);
        }
        Poll::Pending
    }
}

/// The connection's idle timeout: expires once nothing has moved either way for `idle_ms`.
/// One timer, moved forward when it fires early (something moved since it was set).
struct IdleClock<'a> {
    last_activity: &'a AtomicU64,
    idle_ms: u64,
    sleep: Pin<&'a mut Sleep>,
}

impl IdleClock<'_> {
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            let deadline = self
                .last_activity
                .load(Ordering::Relaxed)
                .saturating_add(self.idle_ms);
            let now = now_ms();
            if now >= deadline {
                return Poll::Ready(());
            }
            let rest = Duration::from_millis(deadline - now);
            self.sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + rest);
        }
    }
}

/// True when the kernel holds bytes from `stream`'s peer that srvlb has not read yet (or
/// when that cannot be told: erring towards a reset never passes a cut stream off as whole).
fn unread(stream: &impl AsFd) -> bool {
    rustix::io::ioctl_fionread(stream).map_or(true, |n| n > 0)
}

/// The connection ends because `side` failed (or reset) with `e`; the first to finish, if
/// none was yet.
pub(crate) fn fail(side: Side, e: io::Error, first: &mut Option<(Side, u64)>) -> End {
    first.get_or_insert((side, now_ms()));
    End::Reset(side, e.kind())
}

/// Waits for an error (a reset) on a socket whose read side is finished, and returns it.
///
/// Read readiness cannot be used for this: after EOF a socket stays readable, so waiting for
/// it would spin. EPOLLERR, which epoll reports without being asked, is raised when a reset
/// sets the socket's pending error (SO_ERROR); tokio keeps it as `Ready::ERROR` until it is
/// cleared, so a reset that came before this watch started is not missed either.
pub(crate) async fn peer_error(stream: &TcpStream) -> io::Error {
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

/// Makes the kernel send RST instead of FIN when the socket is closed.
pub fn reset_on_close(stream: &impl AsFd) {
    // Failing here only means the peer gets a FIN instead of a RST; nothing to recover.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(target_os = "linux")]
pub(crate) use super::splice::PipePool;
/// Stands in for the pipe pool where there is no splice.
#[cfg(not(target_os = "linux"))]
pub(crate) struct PipePool;

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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::proxy::direction::splice_enabled;

    /// Runs one direction (client to backend) until it finishes.
    async fn pump(
        (client, backend): (&TcpStream, &TcpStream),
        moved: &AtomicU64,
        pipes: &PipePool,
    ) -> Result<(), DirectionError> {
        let last_activity = AtomicU64::new(0);
        let shared = Shared {
            client,
            backend,
            progress: [
                Progress::new(&last_activity, Duration::from_secs(60)),
                Progress::new(&last_activity, Duration::from_secs(60)),
            ],
            moved: [AtomicU64::new(0), AtomicU64::new(0)],
            on_bytes: &|_, n| {
                moved.fetch_add(n, Ordering::Relaxed);
            },
            ended: AtomicU8::new(0),
            pipes,
        };
        let mut direction = Direction::new(Side::Client);
        std::future::poll_fn(|cx| direction.poll_move(cx, &shared)).await
    }

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
        let pumped = pump((&near, &far), &counter, &pipes);
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
        let pumped = async { pump((&near, &far), &counter, &pipes).await.is_ok() };
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
