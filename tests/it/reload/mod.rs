//! SIGHUP reloads and the systemd notify protocol, through the spawned srvlb binary with
//! static backends on 127.0.0.1. Every wait is bounded; every client uses timeouts.
//!
//! The fixtures are here (configs, clients, checks); the tests are in one file per topic:
//! `swap`, `pool_state`, `notify`, `limits`, `stop`.

use crate::support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::harness::{Mode, Srvlb, TestBackend, eventually, free_port, http_get, temp_dir};

mod limits;
mod notify;
mod pool_state;
mod stop;
mod swap;

/// Generous: the machine is shared and may be heavily loaded.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
const RELOADED: &str = "configuration reloaded";
const REFUSED: &str = "reload refused";

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One `[[service]]` table with static backends; `extra` is appended verbatim.
fn service(name: &str, ports: &[u16], backends: &[&TestBackend], extra: &str) -> String {
    let listen: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let statics: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    format!(
        "\n[[service]]\nname = \"{name}\"\nlisten = [{}]\nstatic = [{}]\n{extra}\n",
        listen.join(", "),
        statics.join(", ")
    )
}

fn config(services: &[String]) -> String {
    format!("[global]\nshutdown_grace = \"5s\"\n{}", services.concat())
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr(port), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends `payload` on an open connection to an echo backend and checks it comes back intact.
fn roundtrip(stream: &mut TcpStream, payload: &[u8]) -> Result<(), String> {
    stream
        .write_all(payload)
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; payload.len()];
    stream
        .read_exact(&mut back)
        .map_err(|e| format!("read: {e}"))?;
    if back != payload {
        return Err("data mismatch".to_owned());
    }
    Ok(())
}

/// Half-closes and expects a clean EOF with nothing more: the connection ended normally.
fn finish(mut stream: TcpStream) -> Result<(), String> {
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .map_err(|e| format!("read to end: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} unexpected bytes before EOF", rest.len()));
    }
    Ok(())
}

/// A whole client connection: connect, send, read back, close cleanly.
fn exchange(port: u16, payload: &[u8]) -> Result<(), String> {
    let mut stream = connect(port).map_err(|e| format!("connect: {e}"))?;
    roundtrip(&mut stream, payload)?;
    finish(stream)
}

fn serves(port: u16) -> bool {
    exchange(port, b"ping\n").is_ok()
}

fn refuses(port: u16) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr(port), Duration::from_secs(5)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What `srvlb check --config path` prints on stderr (it must reject the file).
fn check_error(path: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_srvlb"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run srvlb check");
    assert_eq!(out.status.code(), Some(1), "check must reject the file");
    String::from_utf8_lossy(&out.stderr).trim_end().to_owned()
}
