//! Fault handling through the spawned srvlb binary, with real sockets on 127.0.0.1: backends
//! that die, refuse, black-hole, reset mid-stream or flap, and what clients see meanwhile.
//! srvlb logs JSON here so the tests can read ejection and re-admission fields exactly.
//! Every loop is bounded in count and time; assertions are about behaviour (who answered,
//! what was logged, what the client read), with deadlines generous enough for a loaded CI box.

use crate::support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::harness::{
    Mode, StaticLb as Lb, TestBackend, black_hole, eventually, http_get, who_answers,
    who_answers_from,
};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn field_u64(event: &Value, name: &str) -> u64 {
    event[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} missing in {event}"))
}

/// What a bounded client loop saw.
#[derive(Debug, Default)]
struct Seen {
    answered: HashMap<String, usize>,
    /// When each successful connection was answered, with the backend's name.
    log: Vec<(Instant, String)>,
    errors: Vec<String>,
}

/// One client thread connecting over and over (from rotating source addresses, so Maglev
/// spreads them) until `stop`, at most `max` connections or `limit` of time.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Seen>,
}

impl ClientLoop {
    fn start(listen: SocketAddr, max: usize, limit: Duration) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut seen = Seen::default();
            let deadline = Instant::now() + limit;
            for i in 0..max {
                if flag.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let host = 2 + u8::try_from(i % 60).unwrap_or(0);
                let source = SocketAddr::from(([127, 0, 0, host], 0));
                match who_answers_from(listen, Some(source)) {
                    Ok(name) => {
                        *seen.answered.entry(name.clone()).or_default() += 1;
                        seen.log.push((Instant::now(), name));
                    }
                    Err(e) => seen.errors.push(format!("{:?}: {e}", Instant::now())),
                }
                // Keep the loop from monopolising a shared 2-core machine.
                thread::sleep(Duration::from_millis(2));
            }
            seen
        });
        ClientLoop { stop, handle }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("client loop panicked")
    }
}

/// Waits until every named backend has answered through srvlb.
fn wait_all_answer(listen: SocketAddr, names: &[&str]) {
    let ok = eventually(Duration::from_secs(10), || {
        let mut seen = std::collections::HashSet::new();
        for host in 2..40u8 {
            let source = SocketAddr::from(([127, 0, 0, host], 0));
            if let Ok(name) = who_answers_from(listen, Some(source)) {
                seen.insert(name);
            }
        }
        names.iter().all(|n| seen.contains(*n))
    });
    assert!(ok, "not every backend of {names:?} answered through srvlb");
}

#[test]
fn killed_backend_is_retried_ejected_and_readmitted_after_restart() {
    let mut backends: Vec<TestBackend> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| TestBackend::start(n, Mode::Identify))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let victim = addrs[1];
    let lb = Lb::start(
        &addrs,
        "balance = \"maglev\"\nconnect_timeout = \"2s\"\nconnect_retries = 2",
        "consecutive_failures = 3\nbase_ejection = \"1s\"\nmax_ejection = \"4s\"\nmax_ejected_percent = 50",
    );
    wait_all_answer(lb.listen, &["b1", "b2", "b3"]);

    let clients = ClientLoop::start(lb.listen, 20_000, Duration::from_secs(60));
    thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    backends[1].stop();
    let (ejection, ejected_at) = lb.wait_event("backend ejected", victim, Duration::from_secs(10));
    // Keep it down past the 1 s ejection so its end is tested too, then restart it.
    thread::sleep(Duration::from_millis(1500));
    let restarted_at = Instant::now();
    let revived = TestBackend::start_on("b2", victim, Mode::Identify);
    let (readmission, readmitted_at) =
        lb.wait_event("backend re-admitted", victim, Duration::from_secs(20));
    assert!(
        eventually(Duration::from_secs(10), || revived.accepted() > 0),
        "the restarted backend never took a connection"
    );
    // A few more answers from it prove it is back in rotation.
    let served_after = eventually(Duration::from_secs(10), || {
        (2..62u8).any(|host| {
            let src = SocketAddr::from(([127, 0, 0, host], 0));
            who_answers_from(lb.listen, Some(src)).is_ok_and(|name| name == "b2")
        })
    });
    let seen = clients.finish();

    eprintln!(
        "killed backend: ejected {:?} after the kill, re-admitted {:?} after the restart \
         (out_ms={}), clients ok={} errors={}, answered={:?}",
        ejected_at - killed_at,
        readmitted_at - restarted_at,
        readmission["out_ms"],
        seen.log.len(),
        seen.errors.len(),
        seen.answered
    );
    assert!(served_after, "b2 took no client after re-admission");
    assert!(field_u64(&ejection, "failures") >= 3);
    assert_eq!(field_u64(&ejection, "ejection_ms"), 1000);
    // Clients kept being served while b2 was down.
    let during = seen
        .log
        .iter()
        .filter(|(t, _)| *t > killed_at && *t < restarted_at)
        .count();
    assert!(
        during >= 10,
        "only {during} clients served during the outage"
    );
    // No client was refused for lack of a backend: refused connects were retried.
    assert_eq!(lb.srvlb.count_log("all_backends_failed"), 0);
    assert!(lb.service_metric("srvlb_service_retries_total") >= 1);
    // The only client-visible errors allowed are connections that b2 had already taken
    // into its accept queue when it was killed; srvlb logs each of them.
    assert!(
        seen.errors.len() <= lb.unserved_by(victim),
        "client errors not explained by the kill: {:?}",
        seen.errors
    );
    assert!(lb.backend_metric("srvlb_backend_readmissions_total", victim) >= 1);
    assert!(lb.backend_metric("srvlb_backend_ejections_total", victim) >= 1);
}

#[test]
fn backend_that_accepts_nothing_times_out_and_is_ejected() {
    let hole = black_hole();
    let good: Vec<TestBackend> = ["b1", "b2"]
        .iter()
        .map(|n| TestBackend::start(n, Mode::Identify))
        .collect();
    let lb = Lb::start(
        &[good[0].addr, good[1].addr, hole.addr],
        "balance = \"p2c\"\nconnect_timeout = \"300ms\"\nconnect_retries = 2",
        "consecutive_failures = 2\nbase_ejection = \"30s\"\nmax_ejection = \"60s\"\nmax_ejected_percent = 50",
    );
    let started = Instant::now();
    let mut ejected_after = None;
    for i in 0..60 {
        let name = who_answers(lb.listen)
            .unwrap_or_else(|e| panic!("client {i} failed while two backends were up: {e}"));
        assert!(name == "b1" || name == "b2", "unexpected answer {name}");
        if ejected_after.is_none() && !lb.events_for("backend ejected", hole.addr).is_empty() {
            ejected_after = Some((i, started.elapsed()));
        }
    }
    let (ejection, _) = lb.wait_event("backend ejected", hole.addr, Duration::from_secs(5));
    assert_eq!(ejection["reason"], "connect timeout");
    // Once ejected it is not tried any more: 30 more clients add no connect failure.
    let failures = lb.backend_metric("srvlb_backend_connect_failures_total", hole.addr);
    for i in 0..30 {
        who_answers(lb.listen).unwrap_or_else(|e| panic!("client {i} after ejection: {e}"));
    }
    assert_eq!(
        lb.backend_metric("srvlb_backend_connect_failures_total", hole.addr),
        failures,
        "an ejected black hole was still tried"
    );
    eprintln!(
        "black hole: ejected after {ejected_after:?} (client index, elapsed) with {failures} \
         connect timeouts; 90 clients, 0 errors"
    );
}

/// A backend driven by the client's first byte: `R` makes it send 256 KiB and then reset
/// the connection; `E` makes it echo everything after that byte.
fn scripted_backend() -> SocketAddr {
    let listener = std::net::TcpListener::bind(local(0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut first = [0u8; 1];
                if stream.read_exact(&mut first).is_err() {
                    return;
                }
                if first[0] == b'R' {
                    let _ = stream.write_all(&vec![7u8; 256 * 1024]);
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    return; // dropped with linger 0: RST
                }
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn backend_reset_mid_stream_reaches_the_client_as_a_reset() {
    let backend = scripted_backend();
    let lb = Lb::start(&[backend], "", "consecutive_failures = 3");
    // A bystander connection on the same backend.
    let mut bystander = TcpStream::connect(lb.listen).expect("connect bystander");
    bystander
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    bystander.write_all(b"Ehello").expect("write");
    let mut echo = [0u8; 5];
    bystander.read_exact(&mut echo).expect("bystander echo");
    assert_eq!(&echo, b"hello");

    let mut victim = TcpStream::connect(lb.listen).expect("connect");
    victim
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    victim.write_all(b"R").expect("write");
    let mut received = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let outcome = loop {
        match victim.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => received += n,
            Err(e) => break Err(e),
        }
    };
    eprintln!("reset mid-stream: client read {received} bytes, then {outcome:?}");
    match outcome {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "the client saw {e} instead of a reset"
        ),
        Ok(()) => panic!("the client saw a clean EOF after {received} bytes: data loss hidden"),
    }
    // srvlb says why.
    assert!(eventually(Duration::from_secs(5), || lb
        .events("connection closed")
        .iter()
        .any(|f| f["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("backend_reset")))));
    // The bystander is untouched.
    bystander
        .write_all(b"still alive")
        .expect("bystander write");
    let mut echo = [0u8; 11];
    bystander.read_exact(&mut echo).expect("bystander echo");
    assert_eq!(&echo, b"still alive");
}

#[test]
fn all_backends_failing_srvlb_keeps_trying_and_recovers_when_one_returns() {
    let mut down: Vec<TestBackend> = ["b1", "b2"]
        .iter()
        .map(|n| TestBackend::start(n, Mode::Identify))
        .collect();
    for b in &mut down {
        b.stop();
    }
    let addrs: Vec<SocketAddr> = down.iter().map(|b| b.addr).collect();
    let lb = Lb::start(
        &addrs,
        "balance = \"p2c\"\nconnect_timeout = \"1s\"\nconnect_retries = 2",
        // A long ejection: recovering before it ends proves srvlb kept trying.
        "consecutive_failures = 1\nbase_ejection = \"30s\"\nmax_ejection = \"60s\"\nmax_ejected_percent = 50",
    );
    for i in 0..20 {
        assert!(
            who_answers(lb.listen).is_err(),
            "client {i} was answered with every backend down"
        );
    }
    // Each client tried both backends (one ejected, one kept by the cap): nobody was
    // refused without an attempt.
    let attempts: u64 = addrs
        .iter()
        .map(|a| lb.backend_metric("srvlb_backend_connect_failures_total", *a))
        .sum();
    assert!(
        attempts >= 40,
        "only {attempts} connect attempts for 20 clients"
    );
    let ejected = lb.events("backend ejected");
    assert_eq!(
        ejected.len(),
        1,
        "the 50% cap allows one of two: {ejected:?}"
    );
    let ejected_addr: SocketAddr = ejected[0]["backend"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("ejected backend address");
    let name = if ejected_addr == addrs[0] { "b1" } else { "b2" };

    // Bring back the ejected one (the worst case: it is still inside a 30 s ejection).
    let restarted_at = Instant::now();
    let _back = TestBackend::start_on(name, ejected_addr, Mode::Identify);
    let recovered = eventually(Duration::from_secs(15), || {
        who_answers(lb.listen).is_ok_and(|n| n == name)
    });
    let recovery = restarted_at.elapsed();
    assert!(
        recovered,
        "srvlb did not recover within 15 s of {name} returning"
    );
    for i in 0..20 {
        let who = who_answers(lb.listen)
            .unwrap_or_else(|e| panic!("client {i} after recovery failed: {e}"));
        assert_eq!(who, name);
    }
    let (readmission, _) =
        lb.wait_event("backend re-admitted", ejected_addr, Duration::from_secs(5));
    assert_eq!(readmission["early"], true);
    eprintln!(
        "all failing: 20 clients reset during the outage ({attempts} connect attempts), \
         served again {recovery:?} after {name} came back (ejection was 30 s)"
    );
}

#[test]
fn flapping_backend_is_ejected_for_longer_each_time() {
    let stable: Vec<TestBackend> = ["b1", "b2"]
        .iter()
        .map(|n| TestBackend::start(n, Mode::Identify))
        .collect();
    let mut flapper = TestBackend::start("b3", Mode::Identify);
    let flap_addr = flapper.addr;
    let lb = Lb::start(
        &[stable[0].addr, stable[1].addr, flap_addr],
        "balance = \"p2c\"\nconnect_timeout = \"1s\"\nconnect_retries = 2",
        "consecutive_failures = 2\nbase_ejection = \"1s\"\nmax_ejection = \"8s\"\nmax_ejected_percent = 50",
    );
    wait_all_answer(lb.listen, &["b1", "b2", "b3"]);
    let clients = ClientLoop::start(lb.listen, 50_000, Duration::from_secs(40));
    let cycles = 6;
    for _ in 0..cycles {
        flapper.stop();
        thread::sleep(Duration::from_secs(1));
        flapper = TestBackend::start_on("b3", flap_addr, Mode::Identify);
        thread::sleep(Duration::from_secs(1));
    }
    let seen = clients.finish();
    let durations: Vec<u64> = lb
        .events_for("backend ejected", flap_addr)
        .iter()
        .map(|e| field_u64(e, "ejection_ms"))
        .collect();
    eprintln!(
        "flapping: ejections {durations:?} ms, {} re-admissions, clients ok={} errors={}",
        lb.events_for("backend re-admitted", flap_addr).len(),
        seen.log.len(),
        seen.errors.len()
    );
    assert!(
        durations.len() >= 2,
        "expected repeat ejections: {durations:?}"
    );
    // Never healthy for max_ejection in between, so each ejection doubles up to the cap.
    let mut expected = 1000;
    for d in &durations {
        assert_eq!(*d, expected, "ejections did not double: {durations:?}");
        expected = (expected * 2).min(8000);
    }
    assert_eq!(lb.srvlb.count_log("all_backends_failed"), 0);
    // A single sequential client can lose at most the one connection in b3's accept queue
    // each time b3 dies; srvlb logged each such loss.
    assert!(
        seen.errors.len() <= cycles && seen.errors.len() <= lb.unserved_by(flap_addr),
        "client failures not bounded by the flaps: {:?}",
        seen.errors
    );
}

#[test]
fn max_ejected_percent_holds_when_three_of_four_backends_fail() {
    let good = TestBackend::start("good", Mode::Identify);
    let mut bad: Vec<TestBackend> = ["x1", "x2", "x3"]
        .iter()
        .map(|n| TestBackend::start(n, Mode::Identify))
        .collect();
    for b in &mut bad {
        b.stop();
    }
    let mut addrs = vec![good.addr];
    addrs.extend(bad.iter().map(|b| b.addr));
    let lb = Lb::start(
        &addrs,
        "balance = \"p2c\"\nconnect_timeout = \"1s\"\nconnect_retries = 3",
        "consecutive_failures = 1\nbase_ejection = \"30s\"\nmax_ejection = \"60s\"\nmax_ejected_percent = 50",
    );
    let errors = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Eight concurrent clients make simultaneous ejections likely: the cap must still hold.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (errors, listen) = (Arc::clone(&errors), lb.listen);
            thread::spawn(move || {
                for _ in 0..25 {
                    match who_answers(listen) {
                        Ok(name) if name == "good" => {}
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    let watcher = {
        let (done, admin_lb) = (Arc::clone(&done), lb.admin);
        thread::spawn(move || {
            let mut most = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                let status: Value =
                    serde_json::from_str(&http_get(admin_lb, "/status")).expect("status");
                let n = status["services"][0]["backends"]
                    .as_array()
                    .map(|bs| bs.iter().filter(|b| b["state"] == "ejected").count())
                    .unwrap_or(0);
                most = most.max(n);
                thread::sleep(Duration::from_millis(10));
            }
            most
        })
    };
    for w in workers {
        w.join().expect("client thread");
    }
    done.store(true, Ordering::Relaxed);
    let most = watcher.join().expect("watcher");
    let ejections = lb.events("backend ejected").len();
    eprintln!(
        "max ejected percent: 200 clients, {} errors, {ejections} ejections, at most {most} \
         ejected at once, {} now",
        errors.load(Ordering::Relaxed),
        lb.ejected_now()
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0, "clients failed");
    assert_eq!(ejections, 2, "50% of 4 is 2 ejections");
    assert!(most <= 2, "{most} backends were ejected at once");
    assert_eq!(lb.ejected_now(), 2);
}

/// A backend that holds every connection open: it reads until EOF and reports it, then
/// keeps the socket; once `probe` is set it writes a byte every 20 ms and reports whether a
/// write failed (its leg was closed by srvlb).
struct HoldBackend {
    addr: SocketAddr,
    events: mpsc::Receiver<(&'static str, Instant)>,
    probe: Arc<AtomicBool>,
}

fn hold_backend() -> HoldBackend {
    let listener = std::net::TcpListener::bind(local(0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, events) = mpsc::channel();
    let probe = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&probe);
    thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.send(("eof", Instant::now()));
                    break;
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = tx.send(("read error", Instant::now()));
                    break;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if flag.load(Ordering::Relaxed) && stream.write_all(b".").is_err() {
                let _ = tx.send(("write failed", Instant::now()));
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    HoldBackend {
        addr,
        events,
        probe,
    }
}

#[test]
fn idle_timeout_closes_both_legs() {
    let backend = hold_backend();
    let lb = Lb::start(&[backend.addr], "idle_timeout = \"1s\"", "");
    let mut client = TcpStream::connect(lb.listen).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    client.write_all(b"hi").expect("write");
    let sent = Instant::now();
    let mut buf = [0u8; 16];
    let read = client.read(&mut buf);
    let client_closed_after = sent.elapsed();
    assert!(
        matches!(read, Ok(0)),
        "expected srvlb to close the idle client leg, got {read:?}"
    );
    assert!(
        client_closed_after >= Duration::from_millis(900),
        "closed after {client_closed_after:?}, before the 1 s idle timeout"
    );
    let (what, _) = backend
        .events
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend leg was never closed");
    assert_eq!(what, "eof", "the backend leg should see srvlb's FIN");
    lb.srvlb.wait_log("idle_timeout", Duration::from_secs(5));
    eprintln!("idle: both legs closed {client_closed_after:?} after the last byte");
}

#[test]
fn half_closed_connection_still_times_out_when_nothing_moves() {
    let backend = hold_backend();
    let lb = Lb::start(&[backend.addr], "idle_timeout = \"1s\"", "");
    let mut client = TcpStream::connect(lb.listen).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    client.write_all(b"hi").expect("write");
    client.shutdown(Shutdown::Write).expect("half-close");
    let half_closed = Instant::now();
    // The client's FIN is passed on at once...
    let (what, _) = backend
        .events
        .recv_timeout(Duration::from_secs(10))
        .expect("backend saw no EOF");
    assert_eq!(what, "eof");
    // ...and the remaining direction, idle, is closed by the timeout.
    let mut buf = [0u8; 16];
    let read = client.read(&mut buf);
    let closed_after = half_closed.elapsed();
    assert!(matches!(read, Ok(0)), "expected EOF, got {read:?}");
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed after {closed_after:?}, before the idle timeout"
    );
    // The backend leg is gone as well: its writes start failing.
    backend.probe.store(true, Ordering::Relaxed);
    let (what, _) = backend
        .events
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend leg stayed open after the idle timeout");
    assert_eq!(what, "write failed");
    assert!(
        lb.events("connection closed")
            .iter()
            .any(|f| f["reason"] == "idle_timeout")
    );
    eprintln!("half-closed idle: closed {closed_after:?} after the half-close");
}

// ---- integrity soak ----

const SOAK_CONNECTIONS: usize = 200;
const MAX_SIZE: u64 = 8 << 20;
const CHUNK: usize = 64 * 1024;

/// A reproducible byte stream: xorshift64, generated in chunks so nothing is held whole.
struct Stream {
    state: u64,
    left: u64,
}

impl Stream {
    fn new(seed: u64, len: u64) -> Stream {
        Stream {
            state: seed | 1,
            left: len,
        }
    }

    /// Fills up to `buf.len()` bytes; returns how many (0 at the end).
    fn fill(&mut self, buf: &mut [u8]) -> usize {
        let n = usize::try_from(self.left).map_or(buf.len(), |l| l.min(buf.len()));
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes()[..chunk.len()]);
        }
        self.left -= n as u64;
        n
    }
}

/// Sends `len` bytes of `seed`'s stream; returns their SHA-256.
fn send_stream(to: &mut TcpStream, seed: u64, len: u64) -> std::io::Result<[u8; 32]> {
    let mut stream = Stream::new(seed, len);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = stream.fill(&mut buf);
        if n == 0 {
            return Ok(hash.finalize().into());
        }
        hash.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
}

/// Reads to EOF; returns the byte count and SHA-256.
fn receive_all(from: &mut TcpStream) -> std::io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        total += n as u64;
        hash.update(&buf[..n]);
    }
}

/// What the backend saw on one connection: (bytes received, their hash, hash of what it sent).
type BackendRecord = (u64, [u8; 32], [u8; 32]);

/// A backend for the soak: reads a 24-byte header (id, down length, seed), then sends
/// `down` bytes and half-closes while it reads the client's bytes to EOF, both hashed.
fn soak_backend(records: Arc<Mutex<HashMap<u64, BackendRecord>>>) -> SocketAddr {
    let listener = std::net::TcpListener::bind(local(0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming().take(SOAK_CONNECTIONS * 2) {
            let Ok(mut stream) = stream else { continue };
            let records = Arc::clone(&records);
            let spawned = thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut header = [0u8; 24];
                    if stream.read_exact(&mut header).is_err() {
                        return;
                    }
                    let word = |i: usize| {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&header[i * 8..i * 8 + 8]);
                        u64::from_le_bytes(w)
                    };
                    let (id, down, seed) = (word(0), word(1), word(2));
                    let Ok(mut writer) = stream.try_clone() else {
                        return;
                    };
                    let sender = thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn(move || {
                            let hash = send_stream(&mut writer, seed ^ 0xd0d0, down);
                            let _ = writer.shutdown(Shutdown::Write);
                            hash
                        });
                    let received = receive_all(&mut stream);
                    let sent = sender.ok().and_then(|h| h.join().ok());
                    if let (Ok((n, up_hash)), Some(Ok(down_hash))) = (received, sent) {
                        records
                            .lock()
                            .expect("records")
                            .insert(id, (n, up_hash, down_hash));
                    }
                });
            drop(spawned);
        }
    });
    addr
}

/// What a soak client saw: (up bytes, up hash, down bytes, down hash).
type ClientRecord = (u64, [u8; 32], u64, [u8; 32]);

fn soak_client(
    listen: SocketAddr,
    id: u64,
    up: u64,
    down: u64,
    early_half_close: bool,
) -> std::io::Result<ClientRecord> {
    let mut stream = TcpStream::connect(listen)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let seed = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed;
    let mut header = Vec::with_capacity(24);
    for w in [id, down, seed] {
        header.extend_from_slice(&w.to_le_bytes());
    }
    let mut writer = stream.try_clone()?;
    let (received_tx, received_rx) = mpsc::channel::<()>();
    let sender = thread::Builder::new().stack_size(256 * 1024).spawn(
        move || -> std::io::Result<[u8; 32]> {
            writer.write_all(&header)?;
            let hash = send_stream(&mut writer, seed ^ 0xabab, up)?;
            if !early_half_close {
                // Keep our direction open until the whole reply is in: the backend
                // half-closes first on these connections.
                let _ = received_rx.recv_timeout(Duration::from_secs(60));
            }
            writer.shutdown(Shutdown::Write)?;
            Ok(hash)
        },
    )?;
    let received = receive_all(&mut stream);
    let _ = received_tx.send(());
    let up_hash = sender
        .join()
        .map_err(|_| std::io::Error::other("sender panicked"))??;
    let (down_n, down_hash) = received?;
    Ok((up, up_hash, down_n, down_hash))
}

/// Sizes from 1 byte to 8 MiB, log-uniform (every scale is covered without the average
/// being 4 MiB), with the extremes always present.
fn soak_sizes(count: usize, seed: u64) -> Vec<(u64, u64)> {
    let mut rng = Stream::new(seed, u64::MAX);
    let mut next = || {
        let mut b = [0u8; 8];
        rng.fill(&mut b);
        u64::from_le_bytes(b)
    };
    let mut log_uniform = || {
        let unit = (next() >> 11) as f64 / (1u64 << 53) as f64;
        let size = ((MAX_SIZE as f64).ln() * unit).exp();
        (size as u64).clamp(1, MAX_SIZE)
    };
    let mut sizes: Vec<(u64, u64)> = (0..count).map(|_| (log_uniform(), log_uniform())).collect();
    let extremes = [(MAX_SIZE, MAX_SIZE), (1, 1), (1, MAX_SIZE), (MAX_SIZE, 1)];
    for (slot, pair) in sizes.iter_mut().zip(extremes) {
        *slot = pair;
    }
    sizes
}

#[test]
fn integrity_soak_hashes_match_and_no_descriptor_leaks() {
    let records = Arc::new(Mutex::new(HashMap::new()));
    let backend = soak_backend(Arc::clone(&records));
    let lb = Lb::start(&[backend], "idle_timeout = \"60s\"", "");
    // Warm up (lazily created runtime resources), then take the baseline.
    soak_client(lb.listen, u64::MAX, 10, 10, true).expect("warm-up connection");
    thread::sleep(Duration::from_millis(300));
    let fds_before = lb.srvlb.fd_count();
    assert!(fds_before > 0, "cannot read /proc/PID/fd");
    let pipes_before = lb.global_metric("srvlb_splice_pipes_idle");

    let seed = 0x50a7_u64;
    let sizes = soak_sizes(SOAK_CONNECTIONS, seed);
    let total: u64 = sizes.iter().map(|(u, d)| u + d).sum();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let (tx, rx) = mpsc::channel();
    let gate = Arc::new(std::sync::Barrier::new(SOAK_CONNECTIONS));
    for (i, &(up, down)) in sizes.iter().enumerate() {
        let (tx, gate, listen) = (tx.clone(), Arc::clone(&gate), lb.listen);
        thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                gate.wait(); // all 200 at once
                let id = i as u64;
                let _ = tx.send((id, soak_client(listen, id, up, down, i % 2 == 0)));
            })
            .expect("spawn client");
    }
    drop(tx);
    let mut results = HashMap::new();
    while results.len() < SOAK_CONNECTIONS {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((id, result)) => {
                results.insert(id, result);
            }
            Err(_) => panic!(
                "soak did not finish within 60 s: {} of {SOAK_CONNECTIONS} done",
                results.len()
            ),
        }
    }
    let elapsed = started.elapsed();
    // The backend records a connection once it read the client's EOF; give it a moment.
    let soak_ids = SOAK_CONNECTIONS as u64;
    assert!(
        eventually(Duration::from_secs(10), || records
            .lock()
            .expect("records")
            .keys()
            .filter(|id| **id < soak_ids)
            .count()
            >= SOAK_CONNECTIONS),
        "the backend did not finish every connection"
    );
    let records = records.lock().expect("records").clone();
    let mut mismatches = Vec::new();
    for (id, result) in &results {
        let (up, down) = sizes[*id as usize];
        match (result, records.get(id)) {
            (
                Ok((sent_n, sent_hash, got_n, got_hash)),
                Some((b_got_n, b_got_hash, b_sent_hash)),
            ) => {
                if sent_n != b_got_n || sent_hash != b_got_hash {
                    mismatches.push(format!(
                        "#{id} up {up} B: backend got {b_got_n} B, hash differs: {}",
                        sent_hash != b_got_hash
                    ));
                }
                if *got_n != down || got_hash != b_sent_hash {
                    mismatches.push(format!(
                        "#{id} down {down} B: client got {got_n} B, hash differs: {}",
                        got_hash != b_sent_hash
                    ));
                }
            }
            (Err(e), _) => {
                mismatches.push(format!("#{id} ({up} up / {down} down): client error {e}"))
            }
            (Ok(_), None) => mismatches.push(format!("#{id}: the backend never finished")),
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {SOAK_CONNECTIONS} connections broken:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // Empty splice pipes parked in srvlb's pool (bounded, two descriptors each) are reused,
    // not leaked; srvlb reports how many it holds.
    let pooled = || {
        2 * lb
            .global_metric("srvlb_splice_pipes_idle")
            .saturating_sub(pipes_before)
    };
    let settled = eventually(Duration::from_secs(10), || {
        lb.srvlb.fd_count() as u64 <= fds_before as u64 + pooled()
    });
    let fds_after = lb.srvlb.fd_count();
    eprintln!(
        "soak: {SOAK_CONNECTIONS} connections, {} MiB total, {elapsed:?}, 0 mismatches, \
         fds {fds_before} -> {fds_after} ({} in pooled splice pipes)",
        total >> 20,
        pooled()
    );
    assert!(
        settled,
        "srvlb leaked descriptors: {fds_before} before, {fds_after} after"
    );
}
