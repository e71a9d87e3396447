//! Discovery end to end: the spawned srvlb binary against the in-process DNS server, whose
//! records and failure mode each test changes. Checks what clients see (who answers, or a
//! connection closed at once) and what operators see (/status, /metrics, log lines).
//!
//! Timing: TTLs are 1 s and refreshes 1-3 s; every wait is a bounded poll with several
//! seconds of slack, so the tests hold on a loaded 2-core CI machine.
//!
//! The fixtures are here (a srvlb with one service, the checks of what a client and the logs
//! show); the tests are in one file per topic: `records` (RFC 2782), `refresh` (TTL, failed
//! and absent answers), `startup`, `identity` (and damping), `reload`.

use crate::support;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::dns::{Failure, Srv};
use support::harness::{
    Dns, Mode, SRV_NAME, Srvlb, TestBackend, dns_config, eventually, free_port, http_get, srv_host,
    srv_service, temp_dir, who_answers,
};

mod identity;
mod records;
mod refresh;
mod reload;
mod startup;

const SERVICE: &str = "app";

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A srvlb with one service SERVICE on `listen` and an admin endpoint.
struct Lb {
    srvlb: Srvlb,
    listen: SocketAddr,
    admin: SocketAddr,
}

/// `resolver`: extra `[resolver]` lines; `service`: extra `[[service]]` lines.
fn start_lb(dns: &Dns, balance: &str, resolver: &str, service: &str) -> Lb {
    let (port, admin) = (free_port(), free_port());
    let config = dns_config(
        dns.addr(),
        &format!("admin = \"127.0.0.1:{admin}\"\nshutdown_grace = \"1s\""),
        resolver,
        &srv_service(SERVICE, addr(port), SRV_NAME, balance, service),
    );
    Lb {
        srvlb: Srvlb::start(&config),
        listen: addr(port),
        admin: addr(admin),
    }
}

const FAST: &str = "min_refresh = \"1s\"\nmax_refresh = \"2s\"\nempty_hold = \"3s\"";

impl Lb {
    fn service_status(&self) -> Value {
        let body = http_get(self.admin, "/status");
        let status: Value = serde_json::from_str(&body).expect("/status is JSON");
        status["services"]
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == SERVICE))
            .cloned()
            .unwrap_or_else(|| panic!("service {SERVICE} missing from /status: {body}"))
    }

    fn stale(&self) -> bool {
        self.service_status()["dns"]["stale"]
            .as_bool()
            .expect("dns.stale is a bool")
    }

    /// (target, address, state) of every backend in /status.
    fn backends(&self) -> Vec<(String, String, String)> {
        let status = self.service_status();
        let mut out: Vec<(String, String, String)> = status["backends"]
            .as_array()
            .expect("backends array")
            .iter()
            .map(|b| {
                (
                    b["target"].as_str().unwrap_or_default().to_owned(),
                    b["address"].as_str().unwrap_or_default().to_owned(),
                    b["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn backend(&self, target: &str) -> Value {
        self.service_status()["backends"]
            .as_array()
            .and_then(|all| all.iter().find(|b| b["target"] == target).cloned())
            .unwrap_or_else(|| panic!("backend {target} missing from /status"))
    }

    fn metric(&self, name: &str) -> u64 {
        let body = http_get(self.admin, "/metrics");
        let prefix = format!("{name}{{service=\"{SERVICE}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing:\n{body}"))
    }

    /// Names of the backends that answered `n` connections (every one must succeed).
    fn answers(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                who_answers(self.listen)
                    .unwrap_or_else(|e| panic!("connection {i} through srvlb failed: {e}"))
            })
            .collect()
    }

    /// Waits until `n` connections in a row reach exactly the backends in `want`.
    fn wait_serving(&self, want: &[&str], timeout: Duration) {
        let want: HashSet<String> = want.iter().map(|s| s.to_string()).collect();
        let mut last = HashSet::new();
        let ok = eventually(timeout, || {
            last = (0..40)
                .filter_map(|_| who_answers(self.listen).ok())
                .collect::<HashSet<_>>();
            last == want
        });
        assert!(
            ok,
            "srvlb never served exactly {want:?} (last: {last:?}); log:\n{}",
            self.srvlb.log().join("\n")
        );
    }
}

/// Ok when srvlb accepts the connection and closes it at once, without a backend's greeting:
/// what a client of a service with no backend must see (not a hang). Err says what happened.
fn closed_at_once(listen: SocketAddr) -> Result<(), String> {
    let started = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&listen, Duration::from_secs(5)) {
        Ok(stream) => stream,
        // Accepted and reset before connect_timeout's poll returned: closed at once.
        // (A listener that is not bound gives ConnectionRefused instead.)
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
        Err(e) => return Err(format!("connect failed: {e}")),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => {
            return Err(format!("served: {:?}", String::from_utf8_lossy(&buf[..n])));
        }
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) => {}
        Err(e) => return Err(format!("not closed: {e}")),
    }
    // Generous for a loaded CI machine; a hanging connection would hit the 5 s read timeout.
    match started.elapsed() {
        t if t < Duration::from_secs(3) => Ok(()),
        t => Err(format!("closed only after {t:?}")),
    }
}

fn logged(lb: &Lb, needles: &[&str]) -> bool {
    lb.srvlb
        .log()
        .iter()
        .any(|l| needles.iter().all(|n| l.contains(n)))
}

fn backends(names: &[&str]) -> Vec<TestBackend> {
    names
        .iter()
        .map(|n| TestBackend::start(n, Mode::Identify))
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// A minimal IPv6 backend: greets with its name, then holds the connection until the client
/// closes it. (TestBackend binds 127.0.0.1 only.)
struct Greeter {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Greeter {
    fn start(at: SocketAddr, name: &str) -> Greeter {
        let listener = TcpListener::bind(at).expect("bind IPv6 backend");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, greeting) = (Arc::clone(&stop), format!("{name}\n"));
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let greeting = greeting.clone();
                        thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                            if stream.write_all(greeting.as_bytes()).is_ok() {
                                let mut sink = Vec::new();
                                let _ = stream.read_to_end(&mut sink);
                            }
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Greeter {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
