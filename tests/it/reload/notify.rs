//! The systemd notify protocol around start, reload and stop: READY, RELOADING, STOPPING,
//! STATUS and the watchdog.

use super::*;

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
