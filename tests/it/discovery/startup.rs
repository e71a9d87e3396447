//! Start-up against a failing or slow DNS server, and `srvlb check --resolve`.

use super::*;

#[test]
fn starts_with_a_failing_dns_closes_clients_then_serves_when_it_recovers() {
    let dns = Dns::start();
    let b = TestBackend::start("b1", Mode::Identify);
    dns.publish(&[(&b, 10, 10)]);
    dns.server.set_failure(Some(Failure::Drop));
    let lb = start_lb(&dns, "p2c", FAST, "");
    lb.srvlb
        .wait_log("first DNS lookup failed", Duration::from_secs(10));
    for i in 0..3 {
        if let Err(e) = closed_at_once(lb.listen) {
            panic!("client {i} was not closed at once: {e}");
        }
    }
    assert!(lb.metric("srvlb_service_no_backend_total") >= 3);
    assert!(lb.stale());
    dns.server.set_failure(None);
    lb.wait_serving(&["b1"], Duration::from_secs(15));
    assert!(!lb.stale());
}

/// With `srv` and `static` together, start-up waits for the SRV answer, not just for a
/// non-empty pool (the static tier is there at once): the first client after "srvlb ready"
/// reaches the SRV backend, even when the DNS server is slow to answer.
#[test]
fn srv_beside_static_start_waits_for_the_srv_answer() {
    let dns = Dns::start();
    let b = TestBackend::start("srv1", Mode::Identify);
    let fallback = TestBackend::start("static", Mode::Identify);
    dns.publish(&[(&b, 10, 10)]);
    dns.server.set_delay(Duration::from_millis(400));
    for round in 0..2 {
        let lb = start_lb(
            &dns,
            "maglev",
            FAST,
            &format!("static = [\"{}\"]", fallback.addr),
        );
        let first = who_answers(lb.listen).expect("first client");
        assert_eq!(
            first,
            "srv1",
            "round {round}: the first client went to the static backend; log:\n{}",
            lb.srvlb.log().join("\n")
        );
    }
}

fn check_resolve(dns: &Dns, port: u16) -> (Option<i32>, String) {
    let dir = temp_dir("check");
    let path = dir.join("config.toml");
    let config = format!(
        "[resolver]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\n[[service]]\nname = \"{SERVICE}\"\nlisten = [\"127.0.0.1:{port}\"]\nsrv = \"{SRV_NAME}\"\n",
        dns.addr()
    );
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_srvlb"))
        .args(["check", "--resolve", "--config"])
        .arg(&path)
        .output()
        .expect("run srvlb check");
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn check_resolve_prints_what_each_service_would_use() {
    let dns = Dns::start();
    let b = backends(&["b1", "b2"]);
    dns.publish(&[(&b[0], 10, 5), (&b[1], 20, 0)]);
    let port = free_port();
    let (code, out) = check_resolve(&dns, port);
    assert_eq!(code, Some(0), "{out}");
    for (backend, priority, weight) in [(&b[0], 10, 5), (&b[1], 20, 0)] {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("{}:{}", srv_host(&backend.name), backend.port())))
            .unwrap_or_else(|| panic!("{} missing:\n{out}", backend.name));
        assert!(line.contains(&format!("priority {priority} ")), "{line}");
        assert!(line.contains(&format!("weight {weight} ")), "{line}");
        assert!(line.contains(&backend.addr.to_string()), "{line}");
    }
    // Nothing was bound: check only looks.
    assert!(TcpStream::connect(addr(port)).is_err());

    dns.server.set_failure(Some(Failure::ServFail));
    let (code, out) = check_resolve(&dns, port);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("lookup failed"), "{out}");
}
