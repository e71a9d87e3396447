//! Tests of the bind9 harness itself (tests/it/support/bind.rs): a real `named` starts,
//! answers, takes dynamic updates, goes down, comes back with its updates, and cleans up.
//! Queries go through `dig` so that the harness is checked independently of srvlb's own
//! resolver code.

use crate::support;

use std::process::Command;
use std::time::Instant;

use support::bind::{Named, free_port, skip_or_fail};

const ZONE: &str = "srvlb.test.";
const SRV: &str = "_pg._tcp.srvlb.test.";

fn records() -> Vec<&'static str> {
    vec![
        "_pg._tcp 5 IN SRV 10 10 5432 b1",
        "b1 5 IN A 127.0.0.2",
        "b2 5 IN A 127.0.0.3",
    ]
}

/// Starts a server, or returns None when the test must be skipped (not under CI).
fn start() -> Option<Named> {
    if which("dig").is_none() {
        skip_or_fail("`dig` is not installed (run .ci/install-deps)");
        return None;
    }
    Named::start_or_skip(ZONE, &records())
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `dig +short`, one try with a 1 s timeout so that a down server fails fast.
/// Err holds dig's output when it exits non-zero (e.g. 9: no reply).
fn dig(named: &Named, rtype: &str, name: &str, tcp: bool) -> Result<Vec<String>, String> {
    let mut cmd = Command::new("dig");
    cmd.args(["+short", "+time=1", "+tries=1"])
        .arg(format!("-p{}", named.addr().port()))
        .arg("@127.0.0.1")
        .args([rtype, name]);
    if tcp {
        cmd.arg("+tcp");
    }
    let out = cmd.output().map_err(|e| format!("running dig: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "dig exited {}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut lines: Vec<String> = stdout.lines().map(str::to_owned).collect();
    lines.sort();
    Ok(lines)
}

#[test]
fn serves_updates_survives_restart() {
    let t = Instant::now();
    let Some(mut named) = start() else { return };
    eprintln!("named start: {:?} on {}", t.elapsed(), named.addr());

    // Initial records, over UDP and TCP.
    for tcp in [false, true] {
        assert_eq!(
            dig(&named, "SRV", SRV, tcp).unwrap(),
            ["10 10 5432 b1.srvlb.test."]
        );
    }
    assert_eq!(
        dig(&named, "A", "b1.srvlb.test.", false).unwrap(),
        ["127.0.0.2"]
    );

    // One atomic update: b2 in, b1 out.
    named
        .update(&[
            "update add _pg._tcp.srvlb.test. 5 IN SRV 20 5 5433 b2.srvlb.test.",
            "update delete _pg._tcp.srvlb.test. IN SRV 10 10 5432 b1.srvlb.test.",
        ])
        .unwrap();
    assert_eq!(
        dig(&named, "SRV", SRV, false).unwrap(),
        ["20 5 5433 b2.srvlb.test."]
    );

    // Outage: no answer at all over either transport.
    let t = Instant::now();
    named.stop();
    eprintln!("named stop: {:?}", t.elapsed());
    assert!(!named.is_running());
    assert!(dig(&named, "SRV", SRV, false).is_err());
    assert!(dig(&named, "SRV", SRV, true).is_err());
    // An update against a down server fails, and within nsupdate's bounded timeout.
    let t = Instant::now();
    let err = named
        .update(&["update add x.srvlb.test. 5 IN A 127.0.0.9"])
        .unwrap_err();
    eprintln!("update while down failed after {:?}: {err}", t.elapsed());

    // Back on the same port, with the update replayed from the journal.
    let port = named.addr().port();
    let t = Instant::now();
    named.restart().unwrap();
    eprintln!("named restart: {:?}", t.elapsed());
    assert_eq!(named.addr().port(), port);
    assert_eq!(
        dig(&named, "SRV", SRV, false).unwrap(),
        ["20 5 5433 b2.srvlb.test."]
    );
    assert_eq!(dig(&named, "A", "x.srvlb.test.", false).unwrap(), [""; 0]);

    // A second round of updates after the restart still works and survives another one.
    named.update(&["update delete b1.srvlb.test. A"]).unwrap();
    named.restart().unwrap();
    assert_eq!(dig(&named, "A", "b1.srvlb.test.", false).unwrap(), [""; 0]);
    assert_eq!(
        dig(&named, "A", "b2.srvlb.test.", true).unwrap(),
        ["127.0.0.3"]
    );
}

#[test]
fn bad_update_reports_nsupdate_stderr() {
    let Some(named) = start() else { return };
    let err = named
        .update(&["update add x.srvlb.test. 5 IN BOGUS 1"])
        .unwrap_err();
    assert!(err.to_string().contains("BOGUS"), "{err}");
    // Outside the zone: the server refuses (NOTZONE), nsupdate exits non-zero.
    let err = named
        .update(&["update add x.other.test. 5 IN A 127.0.0.1"])
        .unwrap_err();
    assert!(err.to_string().contains("nsupdate failed"), "{err}");
    // The server is unharmed.
    assert_eq!(
        dig(&named, "SRV", SRV, false).unwrap(),
        ["10 10 5432 b1.srvlb.test."]
    );
}

#[test]
fn drop_kills_server_and_removes_dir_even_on_panic() {
    let Some(named) = start() else { return };
    let dir = named.dir().to_path_buf();
    let port = named.addr().port();
    assert!(dir.join("named.conf").is_file());

    // Move the server into a panicking closure: unwinding must run its Drop.
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _named = named;
        panic!("simulated test failure");
    }));
    assert!(res.is_err());
    assert!(!dir.exists(), "{} left behind", dir.display());

    // Nothing answers on the port any more: query it with a throwaway server object is
    // not possible, so use dig directly.
    let out = Command::new("dig")
        .args(["+short", "+time=1", "+tries=1", &format!("-p{port}")])
        .args(["@127.0.0.1", "SOA", ZONE])
        .output()
        .unwrap();
    assert!(!out.status.success(), "named still answers on {port}");
}

#[test]
fn free_port_is_free_for_udp_and_tcp() {
    let port = free_port().unwrap();
    assert_ne!(port, 0);
    // Still free right after (barring the documented race).
    let _u = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let _t = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
}
