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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tracing::{error, info, warn};

use crate::config::LogFormat;

/// Records waiting for the writer at most; past this they are dropped (and counted).
const QUEUE: usize = 16_384;
/// The writer flushes at least this often while records come in.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// One client connection, as the access log shows it.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// When the connection ended.
    pub at: SystemTime,
    pub service: Arc<str>,
    pub client: SocketAddr,
    /// The backend's address and SRV target, when one was connected.
    pub backend: Option<(SocketAddr, Arc<str>)>,
    pub attempts: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u64,
    /// The same word as the `reason` of the "connection closed" log line.
    pub reason: String,
}

enum Message {
    Record(Box<AccessRecord>),
    /// Reopen the file (SIGUSR1, or a reload that changed path or format).
    Reopen {
        path: PathBuf,
        format: LogFormat,
    },
}

/// The running access log: the channel to its writer thread.
#[derive(Debug)]
struct Sink {
    sender: SyncSender<Message>,
}

static SINK: ArcSwapOption<Sink> = ArcSwapOption::const_empty();
/// Records dropped because the writer's queue was full.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Records written.
pub static WRITTEN: AtomicU64 = AtomicU64::new(0);

/// Why the access log could not be started.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open the access log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot start the access log writer: {0}")]
    Thread(io::Error),
}

/// True when an access log is configured: callers skip building records otherwise.
pub fn enabled() -> bool {
    SINK.load().is_some()
}

/// Hands a record to the writer; never blocks.
pub fn record(record: AccessRecord) {
    let sink = SINK.load();
    let Some(sink) = sink.as_ref() else {
        return;
    };
    match sink.sender.try_send(Message::Record(Box::new(record))) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Applies the configured access log: starts the writer (opening `path` first, so a bad path
/// fails here, at start or reload, with a clear error), points a running writer at a new
/// path or format, or stops it when `path` is `None`.
pub fn configure(path: Option<&Path>, format: LogFormat) -> Result<(), AccessLogError> {
    let Some(path) = path else {
        // Dropping the sender ends the writer once it has written what it holds.
        SINK.store(None);
        return Ok(());
    };
    let file = open(path)?;
    if let Some(sink) = SINK.load().as_ref() {
        drop(file);
        let reopen = Message::Reopen {
            path: path.to_owned(),
            format,
        };
        // A full queue delays the switch to the next SIGUSR1 or reload; say so.
        if sink.sender.try_send(reopen).is_err() {
            warn!(path = %path.display(), "access log queue full; the new path applies on the next reopen");
        }
        return Ok(());
    }
    let (sender, receiver) = sync_channel(QUEUE);
    let writer = Writer {
        path: path.to_owned(),
        format,
        out: BufWriter::new(file),
    };
    std::thread::Builder::new()
        .name("srvlb-access-log".to_owned())
        .spawn(move || writer.run(receiver))
        .map_err(AccessLogError::Thread)?;
    SINK.store(Some(Arc::new(Sink { sender })));
    Ok(())
}

/// Reopens the file at its path (SIGUSR1: logrotate moved the old one away).
pub fn reopen() {
    let sink = SINK.load();
    let Some(sink) = sink.as_ref() else {
        return;
    };
    // The writer knows its path and format; an empty path means "the same one".
    let message = Message::Reopen {
        path: PathBuf::new(),
        format: LogFormat::Text,
    };
    if sink.sender.try_send(message).is_err() {
        warn!("access log queue full; reopen skipped, send SIGUSR1 again");
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
    fn run(mut self, receiver: Receiver<Message>) {
        let mut line = String::with_capacity(256);
        loop {
            match receiver.recv_timeout(FLUSH_EVERY) {
                Ok(message) => self.handle(message, &mut line),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.out.flush();
                    return;
                }
            }
            while let Ok(message) = receiver.try_recv() {
                self.handle(message, &mut line);
            }
            if let Err(e) = self.out.flush() {
                error!(path = %self.path.display(), error = %e, "access log write failed");
            }
        }
    }

    fn handle(&mut self, message: Message, line: &mut String) {
        match message {
            Message::Record(record) => {
                line.clear();
                format_record(&record, self.format, line);
                match self.out.write_all(line.as_bytes()) {
                    Ok(()) => {
                        WRITTEN.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        error!(path = %self.path.display(), error = %e, "access log write failed")
                    }
                }
            }
            Message::Reopen { path, format } => self.reopen(path, format),
        }
    }

    fn reopen(&mut self, path: PathBuf, format: LogFormat) {
        let _ = self.out.flush();
        let (path, format) = if path.as_os_str().is_empty() {
            (self.path.clone(), self.format)
        } else {
            (path, format)
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
pub fn format_record(record: &AccessRecord, format: LogFormat, out: &mut String) {
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
