//! The data path's judgement of backends and its handling of local trouble, through the
//! spawned srvlb binary on 127.0.0.1: what counts against a backend (and what must not), and
//! how a connection ends when one side goes away. Every wait is bounded; deadlines are
//! generous for a loaded 2-core box, and the behaviour asserted would take far longer (or
//! never happen) without the fix each test guards.

mod support;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::harness::{Mode, Srvlb, TestBackend, eventually, free_port, http_get, who_answers};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// srvlb with one service "app" on `listen` over static `backends`.
struct Lb {
    srvlb: Srvlb,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Lb {
    fn start(backends: &[SocketAddr], service: &str, health: &str) -> Lb {
        let listen = local(free_port());
        let admin = local(free_port());
        let statics = backends
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            r#"
[global]
admin = "{admin}"
shutdown_grace = "1s"

[[service]]
name = "app"
listen = ["{listen}"]
static = [{statics}]
{service}

[service.health]
{health}
"#
        );
        let lb = Lb {
            srvlb: Srvlb::start(&config),
            listen,
            admin,
        };
        let loaded = eventually(Duration::from_secs(10), || {
            lb.backends().len() == backends.len()
        });
        assert!(loaded, "srvlb never loaded its {} backends", backends.len());
        lb
    }

    fn backends(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&http_get(self.admin, "/status"))
            .ok()
            .and_then(|s| s["services"][0]["backends"].as_array().cloned())
            .unwrap_or_default()
    }

    fn ejected(&self) -> usize {
        self.backends()
            .iter()
            .filter(|b| b["state"] == "ejected")
            .count()
    }

    /// The sum of a per-backend counter over all backends.
    fn backend_metric_sum(&self, name: &str) -> u64 {
        http_get(self.admin, "/metrics")
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn log(&self) -> String {
        self.srvlb.log().join("\n")
    }
}

/// Descriptor numbers open in process `pid`.
fn open_fds(pid: u32) -> Vec<u32> {
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort_unstable();
    fds
}

fn set_soft_nofile(pid: u32, soft: &str) {
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={soft}:"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --nofile={soft}: failed");
}

fn soft_nofile(pid: u32) -> String {
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            "--nofile",
            "--output=SOFT",
            "--noheadings",
        ])
        .output()
        .expect("run prlimit");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// srvlb out of descriptors must not blame its backends: with one descriptor left, each
/// client is accepted but no backend socket can be made. Before the fix every such client
/// counted as a connect failure of (in turn) every backend and, with
/// `consecutive_failures = 1`, ejected the whole healthy pool.
#[test]
fn running_out_of_descriptors_ejects_no_backend() {
    let b1 = TestBackend::start("b1", Mode::Identify);
    let b2 = TestBackend::start("b2", Mode::Identify);
    let lb = Lb::start(
        &[b1.addr, b2.addr],
        "connect_retries = 1",
        "consecutive_failures = 1\nmax_ejected_percent = 100",
    );
    assert!(
        who_answers(lb.listen).is_ok(),
        "srvlb serves before the test"
    );
    let pid = lb.srvlb.pid();
    let original = soft_nofile(pid);

    // Wait until the descriptor table is quiet (the admin and client connections above are
    // closed), then allow exactly one more descriptor: the limit caps descriptor numbers, so
    // it goes right above the first free number.
    let mut fds = open_fds(pid);
    let quiet = eventually(Duration::from_secs(10), || {
        thread::sleep(Duration::from_millis(100));
        let now = open_fds(pid);
        let same = now == fds;
        fds = now;
        same
    });
    assert!(quiet, "srvlb's descriptors never settled: {fds:?}");
    let mut free = (0u32..).filter(|n| !fds.contains(n));
    let _first_free = free.next();
    let second_free = free.next().expect("a second free descriptor number");
    set_soft_nofile(pid, &second_free.to_string());

    let mut closed = 0;
    for _ in 0..6 {
        let Ok(mut client) = TcpStream::connect(lb.listen) else {
            continue;
        };
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        // The client must be closed (reset), not left waiting; a backend greeting would mean
        // a descriptor was free after all, which proves nothing but harms nothing either.
        match client.read(&mut buf) {
            Ok(0) | Err(_) => closed += 1,
            Ok(_) => {}
        }
    }
    set_soft_nofile(pid, &original);
    assert!(closed >= 1, "no client ever hit the descriptor limit");

    assert_eq!(lb.ejected(), 0, "a backend was ejected; log:\n{}", lb.log());
    assert_eq!(
        lb.backend_metric_sum("srvlb_backend_connect_failures_total"),
        0,
        "local failures were counted against backends; log:\n{}",
        lb.log()
    );
    assert!(
        lb.srvlb.log_contains("out of local resources"),
        "the local problem was not logged; log:\n{}",
        lb.log()
    );
    // And srvlb is fine once descriptors are back.
    assert!(eventually(Duration::from_secs(10), || who_answers(
        lb.listen
    )
    .is_ok()));
}

/// A backend that accepts and, after `delay`, closes cleanly without a byte.
fn closing_backend(delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind(local(0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || {
                thread::sleep(delay);
                drop(stream);
            });
        }
    });
    addr
}

/// Connects a silent client and waits until srvlb has closed it and logged the close.
fn silent_client_until_closed(lb: &Lb) -> Duration {
    let started = Instant::now();
    let mut client = TcpStream::connect(lb.listen).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("the backend sent {n} bytes"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("srvlb never closed the client; log:\n{}", lb.log())
        }
        Err(_) => {} // reset: closed as well
    }
    let waited = started.elapsed();
    drop(client);
    lb.srvlb
        .wait_log("connection closed", Duration::from_secs(10));
    waited
}

/// A backend that times out a client which never speaks (Postgres' authentication_timeout)
/// is doing its job: it must not be ejected.
#[test]
fn backend_closing_a_silent_client_after_its_own_timeout_is_not_ejected() {
    let backend = closing_backend(Duration::from_millis(1500));
    let lb = Lb::start(
        &[backend],
        "connect_timeout = \"500ms\"",
        "consecutive_failures = 1\nmax_ejected_percent = 100",
    );
    let waited = silent_client_until_closed(&lb);
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}"
    );
    assert_eq!(lb.ejected(), 0, "ejected; log:\n{}", lb.log());
    assert!(
        !lb.srvlb.log_contains("backend ejected"),
        "log:\n{}",
        lb.log()
    );
}

/// A backend that accepts and closes at once is broken (an overloaded server shedding
/// connections, a proxy with no upstream): ejected.
#[test]
fn backend_closing_at_once_without_data_is_ejected() {
    let backend = closing_backend(Duration::ZERO);
    let lb = Lb::start(
        &[backend],
        "connect_timeout = \"2s\"",
        "consecutive_failures = 1\nmax_ejected_percent = 100",
    );
    silent_client_until_closed(&lb);
    assert!(
        eventually(Duration::from_secs(10), || lb.ejected() == 1),
        "not ejected; log:\n{}",
        lb.log()
    );
    assert!(lb.srvlb.log_contains("closed before any data"));
}
