//! The access log: one line per client connection, to a file of its own, in text or JSON, as
//! operators of HAProxy and nginx know it. The connection task only hands a small record to
//! a bounded channel (no formatting, no I/O, no lock); one writer thread formats, buffers and
//! writes, and reopens the file on SIGUSR1 so logrotate can move it away. When the writer
//! cannot keep up, records are dropped and counted rather than slowing the data path.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use tracing::{error, info};

use crate::config::LogFormat;

/// Records waiting for the writer at most; past this they are dropped (and counted).
const QUEUE: usize = 16_384;
/// The writer flushes at least this often while records come in.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// One client connection, as the access log shows it.
#[derive(Debug, Clone)]
pub(crate) struct AccessRecord {
    /// When the connection ended.
    pub(crate) at: SystemTime,
    pub(crate) service: Arc<str>,
    pub(crate) client: SocketAddr,
    /// The backend's address and SRV target, when one was connected.
    pub(crate) backend: Option<(SocketAddr, Arc<str>)>,
    pub(crate) attempts: u32,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) duration_ms: u64,
    /// The same word as the `reason` of the "connection closed" log line.
    pub(crate) reason: String,
}

/// The running access log: the channel to its writer thread.
#[derive(Debug)]
struct Sink {
    sender: SyncSender<Box<AccessRecord>>,
}

static SINK: ArcSwapOption<Sink> = ArcSwapOption::const_empty();
/// Where the writer should write, and how; read by the writer when `REOPEN` is set.
static TARGET: Mutex<Option<(PathBuf, LogFormat)>> = Mutex::new(None);
/// Set by SIGUSR1 and by a reload that changed path or format; the writer reopens within
/// `FLUSH_EVERY`. A flag, not a message, so a full queue can never lose a reopen.
static REOPEN: AtomicBool = AtomicBool::new(false);
static WRITER: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);
/// Records dropped because the writer's queue was full.
pub(crate) static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Records written.
pub(crate) static WRITTEN: AtomicU64 = AtomicU64::new(0);

/// Why the access log could not be started.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open the access log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot start the access log writer: {0}")]
    Thread(io::Error),
}

/// True when an access log is configured: callers skip building records otherwise.
pub(crate) fn enabled() -> bool {
    SINK.load().is_some()
}

/// Hands a record to the writer; never blocks.
pub(crate) fn record(record: AccessRecord) {
    let sink = SINK.load();
    let Some(sink) = sink.as_ref() else {
        return;
    };
    if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
        sink.sender.try_send(Box::new(record))
    {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Applies the configured access log: starts the writer (opening `path` first, so a bad path
/// fails here, at start or reload, with a clear error), points a running writer at a new
/// path or format, or stops it when `path` is `None`.
pub(crate) fn configure(path: Option<&Path>, format: LogFormat) -> Result<(), AccessLogError> {
    let Some(path) = path else {
        finish();
        return Ok(());
    };
    let file = open(path)?;
    *TARGET.lock() = Some((path.to_owned(), format));
    if SINK.load().is_some() {
        drop(file);
        REOPEN.store(true, Ordering::Release);
        return Ok(());
    }
    let (sender, receiver) = sync_channel(QUEUE);
    let writer = Writer {
        path: path.to_owned(),
        format,
        out: BufWriter::new(file),
    };
    let handle = std::thread::Builder::new()
        .name("srvlb-access-log".to_owned())
        .spawn(move || writer.run(receiver))
        .map_err(AccessLogError::Thread)?;
    *WRITER.lock() = Some(handle);
    SINK.store(Some(Arc::new(Sink { sender })));
    Ok(())
}

/// Reopens the file at its path (SIGUSR1: logrotate moved the old one away).
pub(crate) fn reopen() {
    REOPEN.store(true, Ordering::Release);
}

/// Stops the writer after it has written and flushed everything queued: at exit, so the
/// lines of the connections just closed are not lost, and when a reload turns the log off.
pub fn finish() {
    SINK.store(None);
    let writer = WRITER.lock().take();
    if let Some(writer) = writer {
        // Err only if the writer panicked; nothing is left to flush then.
        let _ = writer.join();
    }
}

fn open(path: &Path) -> Result<File, AccessLogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AccessLogError::Open {
            path: path.to_owned(),
            source,
        })
}

struct Writer {
    path: PathBuf,
    format: LogFormat,
    out: BufWriter<File>,
}

impl Writer {
    /// Takes what is queued, writes it, and flushes whenever the queue runs dry: a quiet log
    /// is never behind by more than the record in hand, a busy one is written in large
    /// blocks.
    fn run(mut self, receiver: Receiver<Box<AccessRecord>>) {
        let mut line = String::with_capacity(256);
        loop {
            let received = receiver.recv_timeout(FLUSH_EVERY);
            // Before writing: a reload that changed the format applies to the lines of the
            // connections that close after it.
            if REOPEN.swap(false, Ordering::AcqRel) {
                self.reopen();
            }
            match received {
                Ok(record) => self.write(&record, &mut line),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.out.flush();
                    return;
                }
            }
            while let Ok(record) = receiver.try_recv() {
                self.write(&record, &mut line);
            }
            if let Err(e) = self.out.flush() {
                error!(path = %self.path.display(), error = %e, "access log write failed");
            }
        }
    }

    fn write(&mut self, record: &AccessRecord, line: &mut String) {
        line.clear();
        format_record(record, self.format, line);
        match self.out.write_all(line.as_bytes()) {
            Ok(()) => {
                WRITTEN.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => error!(path = %self.path.display(), error = %e, "access log write failed"),
        }
    }

    fn reopen(&mut self) {
        let Some((path, format)) = TARGET.lock().clone() else {
            return;
        };
        match open(&path) {
            Ok(file) => {
                self.out = BufWriter::new(file);
                info!(path = %path.display(), "access log reopened");
                self.path = path;
                self.format = format;
            }
            Err(e) => error!(error = %e, "access log not reopened; writing to the old file"),
        }
    }
}

/// Appends `record` as one line: `key=value` pairs (text) or one JSON object.
pub(crate) fn format_record(record: &AccessRecord, format: LogFormat, out: &mut String) {
    use std::fmt::Write as _;
    let at = humantime::format_rfc3339_millis(record.at);
    let (backend, target) = match &record.backend {
        Some((addr, target)) => (addr.to_string(), target.as_ref()),
        None => ("-".to_owned(), "-"),
    };
    match format {
        LogFormat::Text => {
            let _ = writeln!(
                out,
                "{at} service={} client={} backend={backend} target={target} attempts={} \
                 bytes_in={} bytes_out={} duration_ms={} reason={}",
                record.service,
                record.client,
                record.attempts,
                record.bytes_in,
                record.bytes_out,
                record.duration_ms,
                record.reason
            );
        }
        LogFormat::Json => {
            let value = serde_json::json!({
                "time": at.to_string(),
                "service": record.service.as_ref(),
                "client": record.client.to_string(),
                "backend": record.backend.as_ref().map(|(a, _)| a.to_string()),
                "target": record.backend.as_ref().map(|(_, t)| t.as_ref()),
                "attempts": record.attempts,
                "bytes_in": record.bytes_in,
                "bytes_out": record.bytes_out,
                "duration_ms": record.duration_ms,
                "reason": record.reason,
            });
            let _ = writeln!(out, "{value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AccessRecord {
        AccessRecord {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_598_400_123),
            service: Arc::from("pg"),
            client: "192.0.2.7:40000".parse().expect("addr"),
            backend: Some((
                "10.0.0.5:5432".parse().expect("addr"),
                Arc::from("db1.example."),
            )),
            attempts: 1,
            bytes_in: 10,
            bytes_out: 20,
            duration_ms: 30,
            reason: "closed".to_owned(),
        }
    }

    #[test]
    fn text_and_json_lines() {
        let mut line = String::new();
        format_record(&sample(), LogFormat::Text, &mut line);
        assert_eq!(
            line,
            "2025-12-01T14:13:20.123Z service=pg client=192.0.2.7:40000 backend=10.0.0.5:5432 \
             target=db1.example. attempts=1 bytes_in=10 bytes_out=20 duration_ms=30 reason=closed\n"
        );
        line.clear();
        let mut refused = sample();
        refused.backend = None;
        refused.reason = "no_backend".to_owned();
        format_record(&refused, LogFormat::Json, &mut line);
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["service"], "pg");
        assert_eq!(v["backend"], serde_json::Value::Null);
        assert_eq!(v["reason"], "no_backend");
        assert_eq!(v["time"], "2025-12-01T14:13:20.123Z");
    }
}
