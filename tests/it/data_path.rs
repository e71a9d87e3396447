//! The data path's judgement of backends and its handling of local trouble, through the
//! spawned srvlb binary on 127.0.0.1: what counts against a backend (and what must not), and
//! how a connection ends when one side goes away. Every wait is bounded; deadlines are
//! generous for a loaded 2-core box, and the behaviour asserted would take far longer (or
//! never happen) without the fix each test guards.

use crate::support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use support::harness::{Mode, StaticLb as Lb, TestBackend, black_hole, eventually, who_answers};

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
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

    assert_eq!(
        lb.ejected_now(),
        0,
        "a backend was ejected; log:\n{}",
        lb.log()
    );
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
    assert_eq!(lb.ejected_now(), 0, "ejected; log:\n{}", lb.log());
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
        eventually(Duration::from_secs(10), || lb.ejected_now() == 1),
        "not ejected; log:\n{}",
        lb.log()
    );
    assert!(lb.srvlb.log_contains("closed before any data"));
}

/// User plus system CPU time of process `pid`, in clock ticks (usually 100 per second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    stat.rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// A backend that never writes: it reports when the client's FIN arrives and then when its
/// socket gets an error (srvlb's reset), checking SO_ERROR so that it stays silent.
fn silent_backend() -> (SocketAddr, mpsc::Receiver<(&'static str, Instant)>) {
    let listener = TcpListener::bind(local(0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
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
                    return;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = stream.take_error() {
                let _ = tx.send(("reset", Instant::now()));
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = tx.send(("still open", Instant::now()));
    });
    (addr, rx)
}

/// A client that half-closes and then resets must not leave the backend leg open until the
/// idle timeout just because the backend is silent: the reset is passed on.
#[test]
fn reset_after_half_close_reaches_a_silent_backend() {
    let (backend, events) = silent_backend();
    let lb = Lb::start(&[backend], "idle_timeout = \"60s\"", "");
    let mut client = TcpStream::connect(lb.listen).expect("connect");
    client.write_all(b"hi").expect("write");
    client.shutdown(Shutdown::Write).expect("half-close");
    let (what, _) = events
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend saw no FIN");
    assert_eq!(what, "eof");
    // Watching the finished side must not spin: srvlb stays (nearly) idle meanwhile.
    let cpu_before = cpu_ticks(lb.srvlb.pid());
    thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(lb.srvlb.pid()) - cpu_before;
    assert!(
        spent < 30,
        "srvlb used {spent} clock ticks in 1 s of a half-closed idle connection"
    );
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    let reset_at = Instant::now();
    drop(client); // RST
    let (what, seen) = events
        .recv_timeout(Duration::from_secs(35))
        .expect("backend thread gone");
    assert_eq!(what, "reset", "log:\n{}", lb.log());
    let after = seen.duration_since(reset_at);
    assert!(
        after < Duration::from_secs(5),
        "the backend leg was reset only {after:?} after the client's reset"
    );
    assert!(eventually(Duration::from_secs(5), || lb
        .events("connection closed")
        .iter()
        .any(|f| f["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("client_reset")))));
    eprintln!("reset after half-close reached the backend in {after:?}");
}

/// A connect still in flight counts as an active connection of its backend (P2C compares
/// these), and stops counting when it fails; only a connect that succeeds is counted in
/// the backend's connections.
#[test]
fn a_connect_in_flight_counts_as_active_until_it_fails() {
    let hole = black_hole();
    let lb = Lb::start(
        &[hole.addr],
        "balance = \"p2c\"\nconnect_timeout = \"4s\"\nconnect_retries = 0",
        "",
    );
    let mut client = TcpStream::connect(lb.listen).expect("connect");
    let pending = eventually(Duration::from_secs(3), || {
        lb.backend_metric("srvlb_backend_active_connections", hole.addr) == 1
    });
    assert!(pending, "the pending connect was not counted as active");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let _ = client.read(&mut buf); // closed once the connect times out
    let released = eventually(Duration::from_secs(10), || {
        lb.backend_metric("srvlb_backend_active_connections", hole.addr) == 0
    });
    assert!(released, "the failed connect stayed counted as active");
    assert_eq!(
        lb.backend_metric("srvlb_backend_connections_total", hole.addr),
        0,
        "a failed connect was counted as a connection"
    );
}

// ---- slow readers: no silent truncation ----

/// The environment of each data path: splice (the default on Linux), the userspace copy,
/// and io_uring. Explicit, so that the suite's io_uring pass (`scripts/test`) runs them
/// all still.
const DATA_PATHS: [(&str, &[(&str, &str)]); 3] = [
    ("splice", &[("SRVLB_DATA_PATH", "epoll")]),
    (
        "copy",
        &[("SRVLB_DATA_PATH", "epoll"), ("SRVLB_SPLICE", "0")],
    ),
    ("io_uring", &[("SRVLB_DATA_PATH", "io_uring")]),
];

/// Byte `i` of every test stream.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// A backend that, for each client, streams `total` pattern bytes and then closes cleanly.
/// Write errors (srvlb resetting it) end that stream; nothing else is reported.
fn streaming_backend(total: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let block: Vec<u8> = (0..251 * 256).map(pattern).collect();
                let mut sent = 0;
                while sent < total {
                    let n = block.len().min(total - sent);
                    if stream.write_all(&block[..n]).is_err() {
                        return;
                    }
                    sent += n;
                }
                let _ = stream.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// How a client's read of a stream ended.
#[derive(Debug)]
enum StreamEnd {
    /// A clean EOF after this many bytes.
    Eof(usize),
    /// An error after this many bytes.
    Error(usize, ErrorKind),
}

/// Reads `client` to its end, checking every byte against the pattern; `pace` decides how
/// much to read next, and how long to wait before, given the bytes read so far.
fn read_stream(client: &mut TcpStream, pace: impl FnMut(usize) -> (usize, Duration)) -> StreamEnd {
    read_stream_from(client, 0, pace)
}

/// [`read_stream`] after the first `got` bytes of the stream were read already.
fn read_stream_from(
    client: &mut TcpStream,
    mut got: usize,
    mut pace: impl FnMut(usize) -> (usize, Duration),
) -> StreamEnd {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let (want, wait) = pace(got);
        thread::sleep(wait);
        let want = want.clamp(1, buf.len());
        match client.read(&mut buf[..want]) {
            Ok(0) => return StreamEnd::Eof(got),
            Ok(n) => {
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(got + k), "byte {} is wrong", got + k);
                }
                got += n;
            }
            Err(e) => return StreamEnd::Error(got, e.kind()),
        }
    }
}

/// A client that stops reading while a backend streams to it: srvlb ends the connection at
/// the idle timeout, and since bytes were still pending it must reset both legs. Before the
/// fix the client got a clean EOF after a few MiB of 64 MiB, and could not tell that most of
/// the stream was missing.
#[test]
fn a_stalled_reader_gets_a_reset_never_a_short_clean_eof() {
    const TOTAL: usize = 64 << 20;
    for (path, env) in DATA_PATHS {
        let backend = streaming_backend(TOTAL);
        let lb = Lb::start_with_env(&[backend], "idle_timeout = \"1s\"", "", env);
        let mut client = TcpStream::connect(lb.listen).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        // One byte, then nothing for 2.5 idle timeouts, then read as fast as possible.
        let started = Instant::now();
        let end = read_stream(&mut client, |got| {
            if got == 0 {
                (1, Duration::ZERO)
            } else if started.elapsed() < Duration::from_millis(2500) {
                (
                    1,
                    Duration::from_millis(2500).saturating_sub(started.elapsed()),
                )
            } else {
                (1 << 20, Duration::ZERO)
            }
        });
        eprintln!("{path}: stalled reader: {end:?} of {TOTAL} bytes");
        match end {
            StreamEnd::Eof(got) => assert_eq!(
                got, TOTAL,
                "{path}: a clean EOF after {got} of {TOTAL} bytes: the stream was cut silently"
            ),
            StreamEnd::Error(got, kind) => {
                assert_eq!(
                    kind,
                    ErrorKind::ConnectionReset,
                    "{path}: after {got} bytes"
                );
                let closed = lb.events("connection closed");
                assert!(
                    closed
                        .iter()
                        .any(|f| f["reason"] == "idle_timeout" && f["reset_pending"] == true),
                    "{path}: srvlb did not log an idle timeout with bytes pending: {closed:?}"
                );
            }
        }
    }
}

/// A slow reader that keeps reading (16 KiB/s, through a small receive buffer) is active,
/// not idle: it gets the whole stream although each 64 KiB chunk takes longer than the idle
/// timeout to drain (4 s against 3 s). Before the fix the idle clock only moved once a
/// whole chunk was written, so srvlb timed such a client out and cut its stream. (The
/// small window lets srvlb's writes through about once a second, every other read; the
/// 3 s leaves the test's own thread 2 s of being held off the CPU on a loaded machine, and
/// srvlb is right to time out a client that truly reads nothing for the idle timeout.)
#[test]
fn a_slow_reader_that_keeps_reading_gets_every_byte() {
    const TOTAL: usize = 32 << 20;
    for (path, env) in DATA_PATHS {
        let backend = streaming_backend(TOTAL);
        let lb = Lb::start_with_env(&[backend], "idle_timeout = \"3s\"", "", env);
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
        socket.connect(&lb.listen.into()).expect("connect");
        let mut client: TcpStream = socket.into();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        // 8 KiB every 500 ms for 10 s (over three idle timeouts), then as fast as possible.
        let started = Instant::now();
        let end = read_stream(&mut client, |_| {
            if started.elapsed() < Duration::from_secs(10) {
                (8 * 1024, Duration::from_millis(500))
            } else {
                (1 << 20, Duration::ZERO)
            }
        });
        eprintln!("{path}: slow reader: {end:?} of {TOTAL} bytes");
        assert!(
            matches!(end, StreamEnd::Eof(got) if got == TOTAL),
            "{path}: the slow reader got {end:?} of {TOTAL} bytes; srvlb said: {:?}",
            lb.events("connection closed")
        );
        assert!(
            !lb.events("connection closed")
                .iter()
                .any(|f| f["reason"] == "idle_timeout"),
            "{path}: srvlb timed out a reader that kept reading"
        );
    }
}

/// A stream still running when the shutdown grace elapses is cut by srvlb: the client must
/// get a reset, not a clean EOF that passes the cut stream off as complete. (Closing by the
/// runtime going away used to send a FIN.)
#[test]
fn a_stream_cut_by_the_shutdown_grace_is_reset() {
    const TOTAL: usize = 64 << 20;
    for (path, env) in DATA_PATHS {
        let backend = streaming_backend(TOTAL);
        // shutdown_grace is 1 s in this fixture; the idle timeout stays out of the way.
        let mut lb = Lb::start_with_env(&[backend], "idle_timeout = \"1h\"", "", env);
        let mut client = TcpStream::connect(lb.listen).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut first = [0u8; 1];
        client.read_exact(&mut first).expect("first byte");
        lb.srvlb.signal("TERM");
        let code = lb.srvlb.wait_exit(Duration::from_secs(15));
        assert_eq!(code, Some(0), "{path}: srvlb did not exit cleanly");
        let end = read_stream_from(&mut client, 1, |_| (1 << 20, Duration::ZERO));
        eprintln!("{path}: stream at the end of the shutdown grace: {end:?} of {TOTAL} bytes");
        assert!(
            matches!(end, StreamEnd::Error(_, ErrorKind::ConnectionReset)),
            "{path}: a stream cut by the shutdown ended with {end:?}, not a reset"
        );
    }
}

/// A backend that sends `chunk` pattern bytes every `every`, for ever (until a write fails).
fn trickling_backend(chunk: usize, every: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut sent = 0usize;
                loop {
                    let block: Vec<u8> = (sent..sent + chunk).map(pattern).collect();
                    if stream.write_all(&block).is_err() {
                        return;
                    }
                    sent += chunk;
                    thread::sleep(every);
                }
            });
        }
    });
    addr
}

/// The shutdown cut of a stream that srvlb is caught up with (nothing held, nothing unread:
/// the backend produces slower than the client reads) must still be a reset: the stream is
/// not complete, and a FIN would say it is.
#[test]
fn a_trickling_stream_cut_by_the_shutdown_grace_is_reset() {
    for (path, env) in DATA_PATHS {
        let backend = trickling_backend(512, Duration::from_millis(50));
        let mut lb = Lb::start_with_env(&[backend], "idle_timeout = \"1h\"", "", env);
        let mut client = TcpStream::connect(lb.listen).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut first = [0u8; 1];
        client.read_exact(&mut first).expect("first byte");
        lb.srvlb.signal("TERM");
        let end = read_stream_from(&mut client, 1, |_| (1 << 20, Duration::ZERO));
        assert_eq!(
            lb.srvlb.wait_exit(Duration::from_secs(15)),
            Some(0),
            "{path}"
        );
        eprintln!("{path}: trickling stream at the end of the shutdown grace: {end:?}");
        assert!(
            matches!(end, StreamEnd::Error(_, ErrorKind::ConnectionReset)),
            "{path}: a live stream cut by the shutdown ended with {end:?}, not a reset"
        );
    }
}

/// Lines of `ss` for established TCP sockets matching `filter`, with their timers.
fn sockets_with_timers(filter: &str) -> Vec<String> {
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established", filter])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Milliseconds in one of `ss`'s timer values, which iproute2 writes as "6.988ms" (6 s
/// 988 ms), "850ms", "7sec" or "12sec"; None for a minute or more ("1min59sec", "119min")
/// and anything else.
fn ss_timer_ms(value: &str) -> Option<u64> {
    if value.contains("min") {
        return None;
    }
    if let Some(secs) = value.strip_suffix("sec") {
        return secs.parse::<u64>().ok().map(|s| s * 1000);
    }
    let ms = value.strip_suffix("ms")?;
    match ms.split_once('.') {
        Some((secs, ms)) => Some(secs.parse::<u64>().ok()? * 1000 + ms.parse::<u64>().ok()?),
        None => ms.parse().ok(),
    }
}

/// TCP keepalive runs on both of srvlb's legs with the configured interval, so a peer that
/// vanished without a FIN or RST is noticed long before an hour-long idle timeout; and
/// `tcp_keepalive = false` turns it off.
#[test]
fn tcp_keepalive_runs_on_both_legs() {
    // ss's formats, as iproute2 prints them.
    assert_eq!(ss_timer_ms("6.988ms"), Some(6_988));
    assert_eq!(ss_timer_ms("850ms"), Some(850));
    assert_eq!(ss_timer_ms("12sec"), Some(12_000));
    assert_eq!(ss_timer_ms("119min"), None);
    let backend = TestBackend::start("ka", Mode::Echo);
    for (setting, expect_keepalive) in [
        ("tcp_keepalive = \"7s\"", true),
        ("tcp_keepalive = false", false),
    ] {
        let lb = Lb::start(&[backend.addr], setting, "");
        let mut client = TcpStream::connect(lb.listen).expect("connect");
        client.write_all(b"ping\n").expect("write");
        let mut buf = [0u8; 64];
        let n = client.read(&mut buf).expect("echo");
        assert!(n > 0, "no echo");
        // srvlb's client leg has the listen port as its local port; its backend leg has the
        // backend's port as its remote port (the backend's own socket has it as local).
        let client_leg = sockets_with_timers(&format!("sport = :{}", lb.listen.port()));
        let backend_leg = sockets_with_timers(&format!("dport = :{}", backend.port()));
        eprintln!("{setting}: client leg {client_leg:?}, backend leg {backend_leg:?}");
        assert_eq!(client_leg.len(), 1, "{setting}: {client_leg:?}");
        assert_eq!(backend_leg.len(), 1, "{setting}: {backend_leg:?}");
        for (leg, lines) in [("client", &client_leg), ("backend", &backend_leg)] {
            let has = lines[0].contains("timer:(keepalive");
            assert_eq!(
                has, expect_keepalive,
                "{setting}: srvlb's {leg} leg: {}",
                lines[0]
            );
            if expect_keepalive {
                // The first probe is due within the 7 s interval (the system default would
                // be 2 hours: "timer:(keepalive,119min,0)"). How much of it is left
                // depends on how long this test took to get here.
                let due = lines[0]
                    .split("timer:(keepalive,")
                    .nth(1)
                    .and_then(|rest| rest.split(',').next())
                    .and_then(ss_timer_ms);
                assert!(
                    due.is_some_and(|ms| ms > 0 && ms <= 7_000),
                    "{setting}: {leg} leg's keepalive is not the configured 7 s: {}",
                    lines[0]
                );
            }
        }
    }
}

// ---- data_path = "io_uring" ----

/// Echoes `count` streams of `len` pattern bytes through `lb`, one connection each, and
/// checks each comes back whole.
fn echo_streams(lb: &Lb, count: usize, len: usize) {
    for i in 0..count {
        let mut client = TcpStream::connect(lb.listen).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let data: Vec<u8> = (0..len).map(|j| pattern(i + j)).collect();
        let mut writer = client.try_clone().expect("clone");
        let sent = data.clone();
        let write = thread::spawn(move || {
            writer.write_all(&sent).expect("write");
            writer.shutdown(Shutdown::Write).expect("half-close");
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).expect("read the echo");
        write.join().expect("writer");
        assert!(
            got == data,
            "stream {i}: {} of {len} bytes came back",
            got.len()
        );
    }
}

/// A service with `data_path = "io_uring"` moves its bytes on the workers' rings, intact and
/// with the half-close passed on (the echo backend closes only after the client's FIN);
/// /metrics says so. Where the kernel has no usable io_uring, the connections must still
/// work, on the epoll path, and the log must say why.
#[test]
fn a_service_on_io_uring_moves_its_bytes_on_the_ring() {
    let backend = TestBackend::start("echo", Mode::Echo);
    // The environment's override would decide for the test: this one is about the setting.
    let env = [("SRVLB_DATA_PATH", "")];
    let lb = Lb::start_with_env(&[backend.addr], "data_path = \"io_uring\"", "", &env);
    echo_streams(&lb, 8, 300_000);
    let on_ring = lb.global_metric("srvlb_io_uring_connections_total");
    let fell_back = lb.global_metric("srvlb_io_uring_fallbacks_total");
    assert_eq!(
        on_ring + fell_back,
        8,
        "connections not counted on either path"
    );
    if fell_back > 0 {
        assert!(
            lb.log().contains("io_uring is not available"),
            "connections took the epoll path without a word in the log:\n{}",
            lb.log()
        );
        eprintln!("io_uring is not available here: the epoll path served all 8");
        return;
    }
    let rings = lb.global_metric("srvlb_io_uring_rings");
    assert!((1..=2).contains(&rings), "{rings} rings for 2 workers");
    assert_eq!(
        lb.backend_metric("srvlb_backend_bytes_sent_total", backend.addr),
        8 * 300_000,
        "bytes moved on the ring were not counted"
    );
}

/// The default data path is epoll: no ring is set up and no connection counted on one.
#[test]
fn the_default_data_path_sets_up_no_ring() {
    let backend = TestBackend::start("echo", Mode::Echo);
    let env = [("SRVLB_DATA_PATH", "")];
    let lb = Lb::start_with_env(&[backend.addr], "", "", &env);
    echo_streams(&lb, 3, 10_000);
    assert_eq!(lb.global_metric("srvlb_io_uring_connections_total"), 0);
    assert_eq!(lb.global_metric("srvlb_io_uring_rings"), 0);
}
