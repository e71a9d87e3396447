//! Zero-copy forwarding on Linux: bytes go socket -> pipe -> socket with splice(2) and never
//! enter user space. A direction borrows a pipe from a small pool only while bytes are in
//! flight, so an idle connection holds neither a buffer nor a pipe. Where splice is refused
//! (EINVAL/ENOSYS: not Linux, or an exotic socket) the caller falls back to a userspace copy.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::progress::Progress;

/// A spliced read smaller than this ends a burst (see [`SpliceEnd::Small`]). Lower than the
/// 16 KiB that switches a direction to splice: a splice read is bounded by the pipe's 16
/// slots, one per packet, so with small segments (MSS 1024 or less) a bulk read can stay
/// under 16 KiB, and without this gap the direction would bounce between the two modes.
const SPLICE_SMALL: usize = 4 * 1024;

/// Bytes moved per splice call. A pipe holds 64 KiB by default (16 pages); asking for more
/// than that per call gains nothing.
const CHUNK: usize = 64 * 1024;

/// Idle pipes kept for reuse. A pipe costs two file descriptors; more than this and a burst
/// would leave descriptors parked long after it ended.
pub const POOL_MAX: usize = 32;

/// A pipe's two ends.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        Ok(Pipe { read, write })
    }
}

/// Empty pipes ready for the next burst. The lock is held for a push or a pop only.
#[derive(Debug)]
pub struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    created: AtomicU64,
    /// Makes a new pipe; a field so that tests can simulate running out of descriptors.
    make: fn() -> io::Result<Pipe>,
}

impl Default for PipePool {
    fn default() -> PipePool {
        PipePool::new()
    }
}

impl PipePool {
    pub const fn new() -> PipePool {
        PipePool {
            idle: Mutex::new(Vec::new()),
            created: AtomicU64::new(0),
            make: Pipe::new,
        }
    }

    /// A pool that can never make a pipe, as when the process is out of descriptors.
    #[cfg(test)]
    pub(crate) const fn exhausted() -> PipePool {
        PipePool {
            idle: Mutex::new(Vec::new()),
            created: AtomicU64::new(0),
            make: || {
                Err(io::Error::from_raw_os_error(
                    rustix::io::Errno::MFILE.raw_os_error(),
                ))
            },
        }
    }

    fn take(&self) -> io::Result<Pipe> {
        if let Some(pipe) = self.idle.lock().pop() {
            return Ok(pipe);
        }
        self.created.fetch_add(1, Ordering::Relaxed);
        (self.make)()
    }

    /// Returns an EMPTY pipe. A pipe that still holds bytes must be dropped instead, or the
    /// next connection would receive them.
    fn give(&self, pipe: Pipe) {
        let mut idle = self.idle.lock();
        if idle.len() < POOL_MAX {
            idle.push(pipe);
        }
    }

    /// Pipes parked in the pool now (each holds two file descriptors).
    pub fn idle(&self) -> usize {
        self.idle.lock().len()
    }

    /// Pipes ever created.
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }
}

/// The process-wide pipe pool.
pub static PIPES: PipePool = PipePool::new();

/// How one spliced direction ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// The source sent FIN; nothing is left in flight.
    Eof,
    /// Reading from the source failed.
    Read(io::Error),
    /// Writing to the destination failed.
    Write(io::Error),
    /// The kernel refused splice for these sockets before any byte moved: copy instead.
    Unsupported,
    /// A read moved less than `SPLICE_SMALL` bytes: the burst is over and the messages are
    /// small again, which the caller's buffer moves with fewer syscalls. The pipe is empty.
    Small,
    /// No pipe could be had (out of descriptors). Pipes are taken only before a read, so
    /// nothing is in flight: the caller continues with the userspace copy, which needs no
    /// descriptor, instead of failing a healthy connection.
    NoPipe(io::Error),
}

fn unsupported(e: &io::Error) -> bool {
    // EINVAL: splice not supported for this pair of descriptors; ENOSYS: no splice at all.
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS)
    )
}

/// Moves bytes from `from` to `to` until `from` sends FIN, either side fails, or a read comes
/// in small (`Small`: the burst is over). `moved` is
/// called with each chunk's size after it reached `to`; `progress` hears of every partial
/// move and of bytes held in the pipe.
pub(crate) async fn splice_direction(
    from: &TcpStream,
    to: &TcpStream,
    pool: &PipePool,
    progress: &Progress<'_>,
    mut moved: impl FnMut(u64) + Send,
) -> SpliceEnd {
    let mut total: u64 = 0;
    loop {
        if let Err(e) = from.readable().await {
            return SpliceEnd::Read(e);
        }
        let pipe = match pool.take() {
            Ok(pipe) => pipe,
            Err(e) => return SpliceEnd::NoPipe(e),
        };
        let filled = from.try_io(Interest::READABLE, || {
            splice(
                from,
                None,
                &pipe.write,
                None,
                CHUNK,
                SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
            )
            .map_err(io::Error::from)
        });
        let mut in_pipe = match filled {
            Ok(0) => {
                pool.give(pipe);
                return SpliceEnd::Eof;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                // Spurious wake-up (nothing to read after all) or a signal before any byte
                // moved: the pipe is still empty.
                pool.give(pipe);
                continue;
            }
            Err(e) if total == 0 && unsupported(&e) => {
                pool.give(pipe);
                return SpliceEnd::Unsupported;
            }
            Err(e) => {
                pool.give(pipe);
                return SpliceEnd::Read(e);
            }
        };
        let chunk = in_pipe as u64;
        progress.set_holding(true);
        progress.touch();
        while in_pipe > 0 {
            // A slow reader's progress is seen by probing too (see `Progress`).
            let drained = progress
                .write_when_ready(to, || {
                    splice(
                        &pipe.read,
                        None,
                        to,
                        None,
                        in_pipe,
                        SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
                    )
                    .map_err(io::Error::from)
                })
                .await;
            match drained {
                Ok(n) => {
                    in_pipe -= n;
                    progress.touch();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return SpliceEnd::Write(e),
            }
        }
        progress.set_holding(false);
        pool.give(pipe);
        total += chunk;
        moved(chunk);
        if chunk < SPLICE_SMALL as u64 {
            return SpliceEnd::Small;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn idle_clock() -> AtomicU64 {
        AtomicU64::new(0)
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    #[tokio::test]
    async fn splices_every_byte_in_order_and_reports_eof() {
        // client -> (a_far, a_near) -> splice -> (b_near, b_far) -> reader
        let (mut client, a_near) = pair().await;
        let (b_near, mut reader) = pair().await;
        let pool = PipePool::new();
        let clock = idle_clock();
        let progress = Progress::new(&clock, std::time::Duration::from_secs(60));
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.expect("write");
            client.shutdown().await.expect("fin");
        });
        let mut counted = 0u64;
        let read_all = async {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.expect("read");
            got
        };
        let splice_then_fin = async {
            // A small read ends a burst; the pump would copy it and come back. Here the
            // direction is simply spliced again until the end.
            let end = loop {
                match splice_direction(&a_near, &b_near, &pool, &progress, &mut |n| counted += n)
                    .await
                {
                    SpliceEnd::Small => continue,
                    end => break end,
                }
            };
            socket2::SockRef::from(&b_near)
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            end
        };
        let (end, got) = tokio::join!(splice_then_fin, read_all);
        writer.await.expect("writer");
        assert!(matches!(end, SpliceEnd::Eof), "{end:?}");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ");
        assert_eq!(counted, expected.len() as u64);
        assert!(pool.idle() >= 1, "the pipe went back to the pool");
        assert!(
            pool.created() <= 2,
            "a pipe per chunk was created: {}",
            pool.created()
        );
    }

    #[tokio::test]
    async fn no_pipe_is_reported_before_anything_is_read() {
        let (mut client, a_near) = pair().await;
        let (b_near, _reader) = pair().await;
        client.write_all(b"queued").await.expect("write");
        let pool = PipePool::exhausted();
        let clock = idle_clock();
        let progress = Progress::new(&clock, std::time::Duration::from_secs(60));
        let end = splice_direction(&a_near, &b_near, &pool, &progress, &mut |_| {}).await;
        assert!(matches!(end, SpliceEnd::NoPipe(_)), "{end:?}");
        // The bytes are still in the socket for the copy to take.
        let mut buf = [0u8; 16];
        let n = a_near.try_read(&mut buf).expect("still readable");
        assert_eq!(&buf[..n], b"queued");
    }

    #[tokio::test]
    async fn reset_source_is_a_read_error() {
        let (client, a_near) = pair().await;
        let (b_near, _reader) = pair().await;
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .expect("linger");
        drop(client);
        let pool = PipePool::new();
        let clock = idle_clock();
        let progress = Progress::new(&clock, std::time::Duration::from_secs(60));
        let end = splice_direction(&a_near, &b_near, &pool, &progress, &mut |_| {}).await;
        assert!(
            matches!(&end, SpliceEnd::Read(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{end:?}"
        );
    }
}
