//! One direction's progress: the idle clock every partial read, write or splice moves, the
//! "bytes held" flag the cut rules read, and the write that probes a full destination (the
//! kernel says "writable" only once a third of its buffer is free, which a slow but steady
//! reader may take longer than the idle timeout to free).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::health::now_ms;

/// One direction's progress, shared by its pump and the connection's idle watch.
///
/// Any progress, however small (a partial write, a few bytes read), moves the idle clock:
/// a slow reader draining a large response a few KiB at a time is active, not idle.
pub(crate) struct Progress<'a> {
    last_activity: &'a AtomicU64,
    /// How often a pump blocked on a full destination tries the write again although the
    /// kernel has not said "writable": it says so only once a third of the send buffer is
    /// free, which a slow but steady reader may take longer than the idle timeout to free.
    /// A quarter of the idle timeout, so progress is seen well before the clock runs out.
    /// In milliseconds (u32: 49 days, longer is capped), as two of these are in every
    /// connection's task.
    probe_every_ms: u32,
    /// True while the pump holds bytes taken from the source and not yet all written to
    /// the destination (in its buffer or pipe).
    holding: AtomicBool,
}

impl<'a> Progress<'a> {
    pub(crate) fn new(last_activity: &'a AtomicU64, idle: Duration) -> Progress<'a> {
        Progress {
            last_activity,
            probe_every_ms: u32::try_from((idle / 4).as_millis().max(10)).unwrap_or(u32::MAX),
            holding: AtomicBool::new(false),
        }
    }

    /// Resolves when `to` is writable, or when it is time to probe it anyway, and then
    /// writes with `write`. A write after tokio's wake-up goes through `try_io`, so EAGAIN
    /// clears tokio's readiness flag (else the next wait would return at once and spin); a
    /// probe writes past that flag, which stays "not writable" until the kernel's next
    /// wake-up, and its EAGAIN changes nothing.
    pub(crate) async fn write_when_ready(
        &self,
        to: &TcpStream,
        mut write: impl FnMut() -> io::Result<usize>,
    ) -> io::Result<usize> {
        // Right after a read the destination is nearly always writable: try at once, and
        // make a probe timer only when it is not (a timer per write cost more than the write).
        match to.try_io(Interest::WRITABLE, &mut write) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            done => return done,
        }
        // Boxed: the wait (a readiness future and a timer, some 250 bytes) is needed only
        // while the destination is full, and inline it would be part of every connection's
        // task, idle ones included, twice (one pump each way).
        Box::pin(self.write_after_wait(to, write)).await
    }

    /// The second half of [`Progress::write_when_ready`], for a destination that just said
    /// EAGAIN: waits until it is writable or it is time to probe it, then writes.
    pub(crate) async fn write_after_wait(
        &self,
        to: &TcpStream,
        mut write: impl FnMut() -> io::Result<usize>,
    ) -> io::Result<usize> {
        let probe_every = Duration::from_millis(u64::from(self.probe_every_ms));
        if writable_or_probe(to, probe_every).await? {
            to.try_io(Interest::WRITABLE, write)
        } else {
            write()
        }
    }

    /// Bytes moved (read from the source or written to the destination).
    pub(crate) fn touch(&self) {
        self.last_activity.store(now_ms(), Ordering::Relaxed);
    }

    /// Bytes were taken from the source (`true`) or all handed to the destination (`false`).
    pub(crate) fn set_holding(&self, holding: bool) {
        self.holding.store(holding, Ordering::Relaxed);
    }

    pub(crate) fn is_holding(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
    }
}

/// Resolves with true when `to` is writable, with false when `probe_every` passed first.
async fn writable_or_probe(to: &TcpStream, probe_every: Duration) -> io::Result<bool> {
    tokio::select! {
        biased;
        ready = to.writable() => ready.map(|()| true),
        () = tokio::time::sleep(probe_every) => Ok(false),
    }
}
