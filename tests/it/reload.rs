//! SIGHUP reloads and the systemd notify protocol, through the spawned srvlb binary with
//! static backends on 127.0.0.1. Every wait is bounded; every client uses timeouts.

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

#[test]
fn hundred_reloads_under_load_break_nothing() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let b2 = TestBackend::start("b2", Mode::Echo);
    let (port, extra_port) = (free_port(), free_port());
    let config_a = config(&[
        service(
            "main",
            &[port],
            &[&b1, &b2],
            "balance = \"maglev\"\nconnect_timeout = \"1s\"\nidle_timeout = \"30s\"\n\
             max_connections = 1000\n[service.health]\nconsecutive_failures = 3",
        ),
        service("extra", &[extra_port], &[&b1], ""),
    ]);
    let config_b = config(&[service(
        "main",
        &[port],
        &[&b1, &b2],
        "balance = \"p2c\"\nconnect_timeout = \"2s\"\nidle_timeout = \"20s\"\n\
         max_connections = 64\nconnect_retries = 1\n[service.health]\nconsecutive_failures = 5",
    )]);
    // Connection-close lines would swamp the log this test polls; reload lines stay.
    let srvlb = Srvlb::start_with_env(&config_a, &[("SRVLB_LOG", "info,srvlb::proxy=warn")]);

    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicU64::new(0));
    // Long-lived connections opened before any reload, exercised throughout.
    let mut long_lived: Vec<TcpStream> = (0..2)
        .map(|_| connect(port).expect("long-lived connect"))
        .collect();
    let long_thread = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || -> Result<u64, String> {
            let mut rounds = 0u64;
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (i, stream) in long_lived.iter_mut().enumerate() {
                    roundtrip(stream, &payload(rounds * 2 + i as u64, 64))
                        .map_err(|e| format!("long-lived #{i}, round {rounds}: {e}"))?;
                }
                rounds += 1;
                thread::sleep(Duration::from_millis(20));
            }
            for stream in long_lived {
                finish(stream)?;
            }
            Ok(rounds)
        })
    };
    let clients: Vec<_> = (0..4u64)
        .map(|id| {
            let (stop, connections) = (Arc::clone(&stop), Arc::clone(&connections));
            thread::spawn(move || -> Vec<String> {
                let mut failures = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(600);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    n += 1;
                    let len = 1 + ((id * 7919 + n * 104_729) % 16_384) as usize;
                    match exchange(port, &payload(id << 32 | n, len)) {
                        Ok(()) => {
                            connections.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("client {id} #{n}: {e}")),
                    }
                    // Paced so ephemeral ports in TIME_WAIT cannot run out on a shared host.
                    thread::sleep(Duration::from_millis(2));
                }
                failures
            })
        })
        .collect();

    let started = Instant::now();
    // Wait until load is flowing before the first reload.
    assert!(
        eventually(Duration::from_secs(10), || connections
            .load(Ordering::Relaxed)
            > 20),
        "no load flowing"
    );
    let before = connections.load(Ordering::Relaxed);
    const RELOADS: usize = 100;
    for i in 0..RELOADS {
        srvlb.write_config(if i % 2 == 0 { &config_b } else { &config_a });
        srvlb.signal("HUP");
        srvlb.wait_log_count(RELOADED, i + 1, RELOAD_TIMEOUT);
    }
    let during = connections.load(Ordering::Relaxed) - before;
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();
    let long_rounds = long_thread.join().expect("long-lived thread");
    let applied = srvlb.count_log(RELOADED);
    let refused = srvlb.count_log(REFUSED);
    let total = connections.load(Ordering::Relaxed);
    println!(
        "reload under load: {total} connections ({during} during the reloads), \
         {RELOADS} SIGHUPs, {applied} reloads applied, {refused} refused, \
         {} client failures, long-lived rounds {:?}, {:.1}s",
        failures.len(),
        long_rounds,
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "client failures: {failures:#?}");
    let long_rounds = long_rounds.expect("long-lived connections survive every reload");
    assert!(long_rounds > 0);
    assert_eq!(applied, RELOADS, "every SIGHUP was applied");
    assert_eq!(refused, 0);
    assert!(during > 0, "no connection overlapped the reloads");
    // The last config applied is A: the extra service is back and serving.
    assert!(serves(extra_port), "extra service of the final config");
}

#[test]
fn connections_of_a_removed_service_run_until_they_close() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let b2 = TestBackend::start("b2", Mode::Echo);
    let (main_port, old_port) = (free_port(), free_port());
    let main = service("main", &[main_port], &[&b1], "");
    let srvlb = Srvlb::start(&config(&[
        main.clone(),
        service("old", &[old_port], &[&b2], "idle_timeout = \"30s\""),
    ]));
    let mut open: Vec<TcpStream> = (0..3)
        .map(|_| connect(old_port).expect("connect to the old service"))
        .collect();
    for (i, stream) in open.iter_mut().enumerate() {
        roundtrip(stream, &payload(i as u64, 100)).expect("before reload");
    }

    srvlb.write_config(&config(std::slice::from_ref(&main)));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert!(refuses(old_port), "the removed service must stop accepting");
    assert!(serves(main_port));
    // Well past the reload, the old connections still carry data both ways...
    for round in 0..5u64 {
        for (i, stream) in open.iter_mut().enumerate() {
            roundtrip(stream, &payload(round * 10 + i as u64, 4096))
                .unwrap_or_else(|e| panic!("connection {i} after the reload, round {round}: {e}"));
        }
        thread::sleep(Duration::from_millis(200));
    }
    // ...and end normally when the client ends them.
    for (i, stream) in open.into_iter().enumerate() {
        finish(stream).unwrap_or_else(|e| panic!("connection {i} did not close cleanly: {e}"));
    }
    assert!(b2.accepted() >= 3);
}

#[test]
fn a_refused_reload_keeps_the_old_config_and_logs_what_check_prints() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let port = free_port();
    let good = config(&[service("main", &[port], &[&b1], "")]);
    let srvlb = Srvlb::start(&good);

    // 1. Invalid: a bad balance value on a known line.
    let bad = format!("{good}balance = \"random\"\n");
    let bad_line = bad.lines().count();
    srvlb.write_config(&bad);
    srvlb.signal("HUP");
    srvlb.wait_log(REFUSED, RELOAD_TIMEOUT);
    let check = check_error(&srvlb.config_path);
    assert!(
        check.contains(&format!("config.toml:{bad_line}:")),
        "check names file:line: {check}"
    );
    assert_eq!(check.lines().count(), 1, "one-line error: {check}");
    let logged = srvlb.log();
    assert!(
        logged
            .iter()
            .any(|l| l.contains(REFUSED) && l.contains(&format!("error={check}"))),
        "the reload error must be exactly check's text {check:?}; log:\n{}",
        logged.join("\n")
    );
    assert!(serves(port), "the old config keeps serving");

    // 2. A listener that cannot be bound: refused as a whole, so the other new address in the
    //    same config must not be listening either.
    let held = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let held_port = held.local_addr().expect("addr").port();
    let new_port = free_port();
    srvlb.write_config(&config(&[
        service("main", &[port], &[&b1], ""),
        service("more", &[new_port, held_port], &[&b1], ""),
    ]));
    srvlb.signal("HUP");
    srvlb.wait_log_count(REFUSED, 2, RELOAD_TIMEOUT);
    assert!(
        srvlb.log_contains(&format!("cannot listen on 127.0.0.1:{held_port}")),
        "bind error logged"
    );
    assert!(refuses(new_port), "nothing of a refused reload is applied");
    assert!(serves(port));
    assert_eq!(srvlb.count_log(RELOADED), 0);

    // 3. The next valid reload works.
    drop(held);
    srvlb.write_config(&config(&[
        service("main", &[port], &[&b1], ""),
        service("more", &[new_port], &[&b1], ""),
    ]));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert!(serves(new_port));
    assert!(serves(port));
    // NOTIFY_SOCKET is unset here: notifying must be a silent no-op.
    assert!(!srvlb.log_contains("sd_notify failed"));
}

#[test]
fn a_listener_added_and_one_removed_change_nothing_else() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let (kept, removed, added) = (free_port(), free_port(), free_port());
    let srvlb = Srvlb::start(&config(&[service("main", &[kept, removed], &[&b1], "")]));
    assert!(serves(kept) && serves(removed));
    assert!(refuses(added), "not yet configured");
    let mut on_kept = connect(kept).expect("connect kept");
    let mut on_removed = connect(removed).expect("connect removed");
    roundtrip(&mut on_kept, b"before").expect("kept before");
    roundtrip(&mut on_removed, b"before").expect("removed before");

    srvlb.write_config(&config(&[service("main", &[kept, added], &[&b1], "")]));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert!(serves(added), "the new address accepts");
    assert!(
        refuses(removed),
        "the removed address refuses after the reload"
    );
    assert!(serves(kept));
    roundtrip(&mut on_kept, b"after").expect("open connection on the kept address");
    roundtrip(&mut on_removed, b"after").expect("open connection on the removed address");
    finish(on_kept).expect("kept closes cleanly");
    finish(on_removed).expect("removed closes cleanly");

    // The kept address was bound once, at start: its socket was never replaced.
    let log = srvlb.log();
    let bound = |port: u16| {
        let field = format!("listen=127.0.0.1:{port}");
        log.iter()
            .filter(|l| l.contains("listening") && l.contains(&field))
            .count()
    };
    assert_eq!(bound(kept), 1, "log:\n{}", log.join("\n"));
    assert_eq!(bound(added), 1);
    let removed_field = format!("listen=127.0.0.1:{removed}");
    let closed: Vec<_> = log
        .iter()
        .filter(|l| l.contains("listener removed"))
        .collect();
    assert_eq!(closed.len(), 1, "only one listener closed: {closed:?}");
    assert!(closed[0].contains(&removed_field));
}

#[test]
fn an_allow_list_change_applies_to_new_connections_only() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let port = free_port();
    let srvlb = Srvlb::start(&config(&[service("main", &[port], &[&b1], "")]));
    let mut open = connect(port).expect("connect");
    roundtrip(&mut open, b"before").expect("before");

    // Only a network the test client is not in may connect now.
    srvlb.write_config(&config(&[service(
        "main",
        &[port],
        &[&b1],
        "allow = [\"10.0.0.0/8\"]",
    )]));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert!(
        !serves(port),
        "a new connection from 127.0.0.1 is denied at once"
    );
    roundtrip(&mut open, b"after").expect("the open connection is not cut");
    finish(open).expect("closes cleanly");
}

#[test]
fn quick_successive_reloads_end_in_the_last_config() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let (port, p_x, p_y) = (free_port(), free_port(), free_port());
    let main = service("main", &[port], &[&b1], "");
    let with = |extra_port: u16, balance: &str| {
        config(&[
            main.clone(),
            service(
                "extra",
                &[extra_port],
                &[&b1],
                &format!("balance = \"{balance}\""),
            ),
        ])
    };
    let srvlb = Srvlb::start(&config(std::slice::from_ref(&main)));
    // Each round sends two HUPs back to back with different files; whichever way they
    // interleave with the reload they trigger (coalesced before the read, or the second
    // arriving during apply), the state must end as the second file says.
    const ROUNDS: usize = 8;
    let mut seen = 0;
    for round in 0..ROUNDS {
        let (first, last) = if round % 2 == 0 {
            (p_x, p_y)
        } else {
            (p_y, p_x)
        };
        srvlb.write_config(&with(first, "maglev"));
        srvlb.signal("HUP");
        srvlb.write_config(&with(last, "p2c"));
        srvlb.signal("HUP");
        srvlb.wait_log_count(RELOADED, seen + 1, RELOAD_TIMEOUT);
        let settled = eventually(Duration::from_secs(10), || serves(last) && refuses(first));
        // Let any reload still pending happen, then make sure it did not undo the last file.
        thread::sleep(Duration::from_millis(300));
        assert!(
            settled && serves(last) && refuses(first),
            "round {round}: final state is not the last file's; log:\n{}",
            srvlb.log().join("\n")
        );
        seen = srvlb.count_log(RELOADED);
    }
    // Two HUPs give one reload (coalesced) or two, never more.
    assert!((ROUNDS..=2 * ROUNDS).contains(&seen), "{seen} reloads");
    assert!(serves(port));
    assert_eq!(srvlb.count_log(REFUSED), 0);
    println!("{ROUNDS} double-HUP rounds -> {seen} reloads applied");
}

/// The value of the backend metric `name` for `backend`.
fn backend_metric(admin: SocketAddr, name: &str, backend: SocketAddr) -> Option<u64> {
    let body = http_get(admin, "/metrics");
    let needle = format!("backend=\"{backend}\"");
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&needle))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The current state of `backend` as /metrics reports it (the srvlb_backend_state series
/// whose value is 1).
fn backend_state(admin: SocketAddr, backend: SocketAddr) -> Option<String> {
    let body = http_get(admin, "/metrics");
    let needle = format!("backend=\"{backend}\"");
    body.lines()
        .filter(|l| l.starts_with("srvlb_backend_state{") && l.contains(&needle))
        .filter(|l| l.ends_with(" 1"))
        .find_map(|l| Some(l.split("state=\"").nth(1)?.split('"').next()?.to_owned()))
}

#[test]
fn pool_state_survives_a_reload_that_keeps_the_discovery_source() {
    let live = TestBackend::start("live", Mode::Echo);
    let dead = addr(free_port()); // nothing listens: connects are refused
    let (port, admin_port) = (free_port(), free_port());
    let admin = addr(admin_port);
    let main = |balance: &str, failures: u32, statics: &str| {
        format!(
            "[global]\nadmin = \"{admin}\"\nshutdown_grace = \"5s\"\n\n[[service]]\n\
             name = \"main\"\nlisten = [\"127.0.0.1:{port}\"]\nstatic = [{statics}]\n\
             balance = \"{balance}\"\nhash_key = \"client_ip_port\"\nconnect_retries = 1\n\
             [service.health]\nconsecutive_failures = {failures}\nbase_ejection = \"60s\"\n\
             max_ejection = \"120s\"\nmax_ejected_percent = 50\n"
        )
    };
    let both = format!("\"{}\", \"{dead}\"", live.addr);
    let srvlb = Srvlb::start(&main("p2c", 1, &both));
    // Drive traffic until the dead backend is ejected (retries keep clients whole).
    let ejected = eventually(Duration::from_secs(15), || {
        assert!(serves(port), "a retry must hide the dead backend");
        backend_state(admin, dead).is_some_and(|s| s == "ejected")
    });
    assert!(ejected, "dead backend never ejected");
    let served =
        backend_metric(admin, "srvlb_backend_connections_total", live.addr).expect("live metric");
    let ejections =
        backend_metric(admin, "srvlb_backend_ejections_total", dead).expect("dead metric");
    assert!(served > 0 && ejections > 0);

    // Balance and health settings change, discovery does not: counters and ejection stay.
    srvlb.write_config(&main("maglev", 2, &both));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert_eq!(backend_state(admin, dead), Some("ejected".to_owned()));
    assert_eq!(
        backend_metric(admin, "srvlb_backend_ejections_total", dead),
        Some(ejections)
    );
    assert_eq!(
        backend_metric(admin, "srvlb_backend_connections_total", live.addr),
        Some(served)
    );

    // The static list changes: a new pool, so the counters start again. (This is what the
    // assertions above would have seen had the reload thrown the pool away.)
    srvlb.write_config(&main("maglev", 2, &format!("\"{}\"", live.addr)));
    srvlb.signal("HUP");
    srvlb.wait_log_count(RELOADED, 2, RELOAD_TIMEOUT);
    assert_eq!(
        backend_metric(admin, "srvlb_backend_connections_total", live.addr),
        Some(0)
    );
    assert!(serves(port));
}

/// Collects notify datagrams until one satisfies `until` (bounded by `timeout`).
fn recv_until(
    socket: &UnixDatagram,
    timeout: Duration,
    until: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = until(&msg);
                got.push(msg);
                if done {
                    return got;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    panic!("no matching notify message within {timeout:?}; got {got:#?}");
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

#[test]
fn notify_protocol_ready_reloading_stopping_status_watchdog() {
    let dir = temp_dir("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let b1 = TestBackend::start("b1", Mode::Echo);
    let (port, port2) = (free_port(), free_port());
    let socket_env = socket_path.to_str().expect("utf-8 temp path").to_owned();
    let mut srvlb = Srvlb::spawn_with_env(
        &config(&[service("main", &[port], &[&b1], "")]),
        &[
            ("NOTIFY_SOCKET", socket_env.as_str()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );

    // READY=1 means every listener is bound: a connect right away must succeed.
    let startup = recv_until(&socket, Duration::from_secs(15), |m| has_line(m, "READY=1"));
    assert!(
        serves(port),
        "listener not serving when READY=1 arrived: {startup:?}"
    );
    let ready = startup.last().expect("READY message");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=") && l.contains("1 services")),
        "READY carries a status: {ready:?}"
    );

    // A reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 with the result in STATUS.
    srvlb.write_config(&config(&[service("main", &[port, port2], &[&b1], "")]));
    srvlb.signal("HUP");
    let reload = recv_until(&socket, RELOAD_TIMEOUT, |m| has_line(m, "READY=1"));
    let reloading = reload
        .iter()
        .position(|m| has_line(m, "RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 before READY=1: {reload:?}"));
    let usec = reload[reloading]
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reload:?}"));
    assert!(
        usec.parse::<u64>().is_ok_and(|v| v > 0),
        "MONOTONIC_USEC={usec}"
    );
    let after = reload.last().expect("READY after reload");
    assert!(
        after.contains("STATUS=") && after.contains("last reload: ok"),
        "{after:?}"
    );
    assert!(serves(port2), "reloaded config serving after READY=1");

    // A refused reload still ends with READY=1, and STATUS says it was refused.
    srvlb.write_config("[global]\nshutdown_grace = \"nope\"\n");
    srvlb.signal("HUP");
    let refused = recv_until(&socket, RELOAD_TIMEOUT, |m| has_line(m, "READY=1"));
    assert!(refused.iter().any(|m| has_line(m, "RELOADING=1")));
    let status = refused.last().expect("READY after refusal");
    assert!(
        status.contains("last reload: refused") && status.contains("config.toml:2:"),
        "{status:?}"
    );
    assert!(serves(port) && serves(port2), "old config keeps serving");

    // Watchdog pings every WATCHDOG_USEC/2 while running.
    recv_until(&socket, Duration::from_secs(10), |m| {
        has_line(m, "WATCHDOG=1")
    });

    srvlb.signal("TERM");
    let stopping = recv_until(&socket, Duration::from_secs(15), |m| {
        has_line(m, "STOPPING=1")
    });
    assert!(!stopping.iter().any(|m| has_line(m, "READY=1")));
    assert_eq!(srvlb.wait_exit(Duration::from_secs(15)), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes "ping\n" and expects it echoed within `within`; false when nothing came back.
fn answered_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let ok = roundtrip(stream, b"ping\n").is_ok();
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    ok
}

#[test]
fn a_replaced_service_keeps_its_connection_limit_and_its_listener_wakes() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let b2 = TestBackend::start("b2", Mode::Echo);
    let port = free_port();
    let srvlb = Srvlb::start(&config(&[service(
        "main",
        &[port],
        &[&b1],
        "max_connections = 1",
    )]));
    let mut first = connect(port).expect("first connect");
    roundtrip(&mut first, b"first").expect("first connection served");

    // A new static list replaces the service; the limit (now 2) stays the name's.
    srvlb.write_config(&config(&[service(
        "main",
        &[port],
        &[&b1, &b2],
        "max_connections = 2",
    )]));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    let mut second = connect(port).expect("second connect");
    assert!(
        answered_within(&mut second, Duration::from_secs(10)),
        "a client after the reload waits for the old service's connection to end"
    );
    // First (old service) + second (new service) = 2 = the new limit: a third must wait
    // in the backlog, not make the total exceed it.
    let mut third = connect(port).expect("third connect");
    assert!(
        !answered_within(&mut third, Duration::from_millis(1500)),
        "old and new service together exceed max_connections"
    );
    finish(first).expect("first closes cleanly");
    let mut echoed = [0u8; 5];
    third
        .read_exact(&mut echoed)
        .expect("the third is served once the first closes");
    assert_eq!(&echoed, b"ping\n");
    finish(second).expect("second closes cleanly");
    finish(third).expect("third closes cleanly");
}

#[test]
fn a_listener_moved_to_another_service_stops_waiting_for_the_old_limit() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let (port, other) = (free_port(), free_port());
    let srvlb = Srvlb::start(&config(&[service(
        "a",
        &[port],
        &[&b1],
        "max_connections = 1",
    )]));
    let mut first = connect(port).expect("first connect");
    roundtrip(&mut first, b"first").expect("first connection served");

    // The address now belongs to "b", whose limit is free.
    srvlb.write_config(&config(&[
        service("a", &[other], &[&b1], "max_connections = 1"),
        service("b", &[port], &[&b1], "max_connections = 10"),
    ]));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    let mut second = connect(port).expect("second connect");
    assert!(
        answered_within(&mut second, Duration::from_secs(10)),
        "the listener still waits for a permit of the service it no longer feeds"
    );
    finish(second).expect("second closes cleanly");
    finish(first).expect("first closes cleanly");
}

#[test]
fn a_second_stop_signal_ends_the_drain_at_once() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let port = free_port();
    let mut srvlb = Srvlb::start(&format!(
        "[global]\nshutdown_grace = \"30s\"\n{}",
        service("main", &[port], &[&b1], "")
    ));
    let mut open = connect(port).expect("connect");
    roundtrip(&mut open, b"before").expect("served");
    srvlb.signal("TERM");
    srvlb.wait_log("draining connections", Duration::from_secs(10));
    assert_eq!(
        srvlb.wait_exit(Duration::from_millis(500)),
        None,
        "the first signal drains: the open connection keeps srvlb running"
    );
    srvlb.signal("TERM");
    let started = Instant::now();
    // Well under the 30 s grace; the margin is for a loaded machine.
    assert_eq!(
        srvlb.wait_exit(Duration::from_secs(10)),
        Some(0),
        "a second SIGTERM must end the drain and exit 0"
    );
    println!(
        "exited {:.2}s after the second SIGTERM",
        started.elapsed().as_secs_f64()
    );
    assert!(srvlb.log_contains("second stop signal"));
    drop(open);
}

/// The names of srvlb's data-path worker threads, from /proc.
fn worker_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim().to_owned())
        .filter(|comm| comm.starts_with("srvlb-worker-"))
        .collect();
    names.sort();
    names
}

#[test]
fn connections_on_every_worker_survive_a_reload_that_asks_for_other_workers() {
    let echo = TestBackend::start("echo", Mode::Echo);
    let port = free_port();
    let with_workers = |workers: u32, extra: &str| {
        format!(
            "[global]\nshutdown_grace = \"5s\"\nworkers = {workers}\n{}",
            service("app", &[port], &[&echo], extra)
        )
    };
    let srvlb = Srvlb::start(&with_workers(3, ""));
    assert_eq!(
        worker_threads(srvlb.pid()),
        ["srvlb-worker-0", "srvlb-worker-1", "srvlb-worker-2"],
        "workers = 3 must run three data-path threads"
    );
    let mut open: Vec<TcpStream> = (0..60)
        .map(|i| {
            let mut stream = connect(port).expect("connect");
            roundtrip(&mut stream, &payload(i, 300)).expect("before the reload");
            stream
        })
        .collect();

    srvlb.write_config(&with_workers(1, "idle_timeout = \"10m\""));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert!(
        srvlb.log_contains("global.workers is read at start"),
        "a changed worker count must be reported as taking effect at restart"
    );
    assert_eq!(
        worker_threads(srvlb.pid()).len(),
        3,
        "the running workers stay"
    );
    for (i, stream) in open.iter_mut().enumerate() {
        roundtrip(stream, &payload(1000 + i as u64, 5000))
            .unwrap_or_else(|e| panic!("connection {i} after the reload: {e}"));
    }
    assert!(serves(port), "new clients after the reload");
    for (i, stream) in open.drain(..).enumerate() {
        finish(stream).unwrap_or_else(|e| panic!("connection {i} did not close cleanly: {e}"));
    }
}
