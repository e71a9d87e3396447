//! srvlb behind the DNS software operators actually run, with the figures a user notices:
//! clients failed, seconds until a new set is used, queries per minute.
//!
//! * unbound as a caching resolver in front of bind9 (`named` + `nsupdate`): a rolling
//!   update that replaces every pod at once, replacing the only target and its address,
//!   the query rate at TTL 5, the empty hold after NXDOMAIN.
//! * dnsmasq serving SRV itself (`srv-host=`): weight per SRV record whatever the number of
//!   addresses, a dual-stack target whose backend listens on IPv4 only, `family = "ipv4"`,
//!   a refused resolver port, the back-off for an absent name and a failing target.
//!
//! Run with `cargo test --test it resolvers_e2e:: -- --nocapture` to see the figures.
//! Servers are stopped by Drop, also on failure.
//!
//! The fixtures are here; the tests are in `unbound` and `dnsmasq`.

use crate::support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::bind::Named;
use support::harness::{
    Mode, Srvlb, TestBackend, dns_config, eventually, free_port, http_get, srv_service,
    who_answers_from,
};
use support::resolvers::{Dnsmasq, Unbound};

mod dnsmasq;
mod unbound;

const ZONE: &str = "srvlb.test.";
const SRV: &str = "_app._tcp.srvlb.test.";
/// TTL of the records behind unbound, as in the measurements.
const TTL: u64 = 5;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Prints a figure where `--nocapture` shows it.
fn figure(what: &str) {
    println!("FIGURE {what}");
}

fn config(dns: SocketAddr, admin: u16, resolver: &str, services: &str) -> String {
    let global = format!("admin = \"127.0.0.1:{admin}\"\nshutdown_grace = \"1s\"");
    dns_config(dns, &global, resolver, services)
}

fn service(name: &str, listen: u16, srv: &str) -> String {
    srv_service(name, addr(listen), srv, "maglev", "")
}

fn status(admin: u16) -> Value {
    serde_json::from_str(&http_get(addr(admin), "/status")).expect("/status is JSON")
}

fn metric(admin: u16, name: &str) -> Option<f64> {
    http_get(addr(admin), "/metrics").lines().find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name || key.starts_with(&format!("{name}{{"))).then(|| value.parse().ok())?
    })
}

/// Which backend answers each client address `127.0.<hi>.<lo>`, `n` of them. Every client
/// must be served.
fn census(listen: SocketAddr, n: usize) -> HashMap<String, usize> {
    try_census(listen, n).unwrap_or_else(|e| panic!("{e}"))
}

/// `census` that reports a failed client instead of panicking (for waiting on start-up).
fn try_census(listen: SocketAddr, n: usize) -> Result<HashMap<String, usize>, String> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let source = SocketAddr::from(([127, 0, 1 + (i / 250) as u8, 2 + (i % 250) as u8], 0));
        let name =
            who_answers_from(listen, Some(source)).map_err(|e| format!("client {source}: {e}"))?;
        *counts.entry(name).or_insert(0) += 1;
    }
    Ok(counts)
}

/// Waits until every one of `n` clients is served and `ok` holds for the census.
fn serving(listen: SocketAddr, n: usize, ok: impl Fn(&HashMap<String, usize>) -> bool) -> bool {
    eventually(Duration::from_secs(15), || {
        try_census(listen, n).is_ok_and(|c| ok(&c))
    })
}

fn update(named: &Named, lines: &[String]) {
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    named
        .update(&refs)
        .unwrap_or_else(|e| panic!("nsupdate: {e}\nnamed log:\n{}", named.log()));
}

fn srv_line(priority: u16, weight: u16, b: &TestBackend) -> String {
    format!(
        "{SRV} {TTL} IN SRV {priority} {weight} {} {}.{ZONE}",
        b.port(),
        b.name
    )
}

/// A client attempt: when it started, and which backend answered (or the error).
type Attempt = (Instant, Result<String, String>);

/// Clients connecting one after another from changing source addresses until stopped.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ClientLoop {
    fn start(listen: SocketAddr) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (Arc::clone(&stop), Arc::clone(&attempts));
        let thread = thread::spawn(move || {
            let mut i = 0usize;
            while !s.load(Ordering::Relaxed) {
                let source = SocketAddr::from(([127, 0, 2, 2 + (i % 250) as u8], 0));
                let started = Instant::now();
                let result = who_answers_from(listen, Some(source)).map_err(|e| e.to_string());
                a.lock().expect("attempts").push((started, result));
                i += 1;
                thread::sleep(Duration::from_millis(20));
            }
        });
        ClientLoop {
            stop,
            attempts,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.attempts.lock().expect("attempts").clone()
    }
}

/// unbound in front of bind9 with `records`, and srvlb using unbound; `None` when a tool
/// is missing (skipped).
fn behind_unbound(records: &[String]) -> Option<(Named, Unbound)> {
    let refs: Vec<&str> = records.iter().map(String::as_str).collect();
    let named = Named::start_or_skip(ZONE, &refs)?;
    let unbound = Unbound::start_or_skip(ZONE, named.addr())?;
    Some((named, unbound))
}
