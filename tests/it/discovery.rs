//! Discovery end to end: the spawned srvlb binary against the in-process DNS server, whose
//! records and failure mode each test changes. Checks what clients see (who answers, or a
//! connection closed at once) and what operators see (/status, /metrics, log lines).
//!
//! Timing: TTLs are 1 s and refreshes 1-3 s; every wait is a bounded poll with several
//! seconds of slack, so the tests hold on a loaded 2-core CI machine.

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
    Dns, Mode, SRV_NAME, Srvlb, TestBackend, eventually, free_port, http_get, srv_host, temp_dir,
    who_answers,
};

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
    let config = format!(
        r#"
[global]
admin = "127.0.0.1:{admin}"
shutdown_grace = "1s"

[resolver]
nameservers = ["{dns}"]
timeout = "1s"
{resolver}

[[service]]
name = "{SERVICE}"
listen = ["127.0.0.1:{port}"]
srv = "{SRV_NAME}"
balance = "{balance}"
connect_timeout = "1s"
{service}
"#,
        dns = dns.addr(),
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

// ---------------------------------------------------------------------------------------
// RFC 2782: priority tiers, weight 0, ".", multiple addresses, IPv6, truncation
// ---------------------------------------------------------------------------------------

#[test]
fn priority_failover_and_return() {
    let dns = Dns::start();
    let mut b = backends(&["b1", "b2", "b3"]);
    dns.publish(&[(&b[0], 10, 10), (&b[1], 10, 10), (&b[2], 20, 10)]);
    let lb = start_lb(
        &dns,
        "p2c",
        FAST,
        "connect_retries = 2\n[service.health]\nconsecutive_failures = 1\nbase_ejection = \"3s\"\nmax_ejection = \"3s\"\nmax_ejected_percent = 100",
    );
    lb.wait_serving(&["b1", "b2"], Duration::from_secs(15));
    assert!(!lb.answers(40).contains(&"b3".to_owned()));
    assert_eq!(lb.backend("b3.srvlb.test.")["state"], "standby");

    // Kill every tier-1 backend: tier 2 takes the traffic, and no client notices.
    let (a1, a2) = (b[0].addr, b[1].addr);
    b[0].stop();
    b[1].stop();
    let after = lb.answers(30);
    assert!(
        after.iter().all(|n| n == "b3"),
        "tier 2 should serve every client: {after:?}"
    );
    assert_eq!(lb.backend("b3.srvlb.test.")["state"], "active");
    let b1 = lb.backend("b1.srvlb.test.");
    assert_eq!(b1["state"], "ejected", "{b1}");
    assert!(
        b1["reason"]
            .as_str()
            .is_some_and(|r| r.contains("consecutive failures")),
        "{b1}"
    );
    lb.srvlb.wait_log(
        "tier switch: preferred tier has no usable backend",
        Duration::from_secs(10),
    );

    // Tier 1 back: once the ejection ends, traffic returns to it.
    let _b1 = TestBackend::start_on("b1", a1, Mode::Identify);
    let _b2 = TestBackend::start_on("b2", a2, Mode::Identify);
    lb.wait_serving(&["b1", "b2"], Duration::from_secs(20));
    lb.srvlb.wait_log(
        "tier switch: traffic returns to a preferred tier",
        Duration::from_secs(15),
    );
    assert_eq!(lb.backend("b3.srvlb.test.")["state"], "standby");
}

#[test]
fn weight_zero_takes_traffic_only_when_no_weighted_backend_of_its_tier_is_usable() {
    let dns = Dns::start();
    let mut b = backends(&["b1", "b2", "b3"]);
    // b2 has weight 0 in the preferred tier; b3 is a weighted backend of a lower tier.
    dns.publish(&[(&b[0], 10, 10), (&b[1], 10, 0), (&b[2], 20, 10)]);
    let lb = start_lb(
        &dns,
        "p2c",
        FAST,
        "connect_retries = 2\n[service.health]\nconsecutive_failures = 1\nbase_ejection = \"60s\"\nmax_ejected_percent = 100",
    );
    lb.wait_serving(&["b1"], Duration::from_secs(15));
    assert_eq!(sorted(lb.answers(60)), ["b1"]);
    b[0].stop();
    // Within the tier, weight 0 comes before any lower tier.
    assert_eq!(sorted(lb.answers(30)), ["b2"]);
}

/// A target with an A and an AAAA record gives two backends; the IPv6 one works; targets are
/// resolved with their own queries when the SRV answer has no additional section.
#[test]
fn targets_with_several_addresses_and_ipv6_without_additional_section() {
    let dns = Dns::start();
    dns.server.set_additional(false);
    let v4 = TestBackend::start("v4", Mode::Identify);
    let v6 = Greeter::start(SocketAddr::from((Ipv6Addr::LOCALHOST, v4.port())), "v6");
    let dual = srv_host("dual");
    dns.server.set_addrs(
        &dual,
        1,
        &[
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ],
    );
    dns.server.set_srv(
        SRV_NAME,
        1,
        &[Srv {
            priority: 10,
            weight: 10,
            port: v4.port(),
            target: dual.clone(),
        }],
    );
    let lb = start_lb(&dns, "p2c", FAST, "");
    lb.wait_serving(&["v4", "v6"], Duration::from_secs(15));
    let port = v4.port();
    assert_eq!(
        lb.backends(),
        [
            (
                dual.clone(),
                format!("127.0.0.1:{port}"),
                "active".to_owned()
            ),
            (dual.clone(), format!("[::1]:{port}"), "active".to_owned()),
        ]
    );
    assert!(
        dns.server.queries(&dual) > 0,
        "targets were not resolved separately"
    );
    drop(v6);
}

#[test]
fn three_hundred_records_arrive_over_tcp_after_truncation() {
    let dns = Dns::start();
    let b = TestBackend::start("big", Mode::Identify);
    let records: Vec<Srv> = (0..300)
        .map(|i| {
            let target = srv_host(&format!("t{i}"));
            dns.server
                .set_addrs(&target, 60, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
            Srv {
                priority: 10,
                weight: 1,
                port: b.port(),
                target,
            }
        })
        .collect();
    dns.server.set_srv(SRV_NAME, 60, &records);
    let lb = start_lb(&dns, "maglev", FAST, "");
    let ok = eventually(Duration::from_secs(15), || lb.backends().len() == 300);
    assert!(ok, "expected 300 backends, got {}", lb.backends().len());
    assert_eq!(who_answers(lb.listen).expect("connect"), "big");
    // The UDP answer was truncated, so each lookup is (at least) a UDP and a TCP query.
    assert!(dns.server.queries(SRV_NAME) >= 2);
    // Summary lines with counts, never one line per backend: 300 backends, a handful of
    // lines in all (listening, ready, the change).
    let log = lb.srvlb.log();
    assert!(
        log.len() < 30,
        "{} log lines:\n{}",
        log.len(),
        log.join("\n")
    );
    assert!(
        logged(&lb, &["backends changed", "backends=300"]),
        "{}",
        log.join("\n")
    );
}

/// A target without any address gives no backend and does not spoil the others; an answer in
/// which no target has an address counts as "absent" (the hold applies), not as an error.
#[test]
fn a_target_without_address_gives_no_backend() {
    let dns = Dns::start();
    let b = backends(&["b1", "b2"]);
    dns.publish(&[(&b[0], 10, 10), (&b[1], 10, 10)]);
    let ghost = Srv {
        priority: 10,
        weight: 10,
        port: b[0].port(),
        target: srv_host("ghost"), // never given an A or AAAA record: NXDOMAIN
    };
    let mut records: Vec<Srv> = [&b[0], &b[1]]
        .iter()
        .map(|t| Srv {
            priority: 10,
            weight: 10,
            port: t.port(),
            target: srv_host(&t.name),
        })
        .collect();
    records.push(ghost.clone());
    dns.server.set_srv(SRV_NAME, 1, &records);
    let lb = start_lb(&dns, "p2c", FAST, "");
    lb.wait_serving(&["b1", "b2"], Duration::from_secs(15));
    assert_eq!(lb.backends().len(), 2, "{:?}", lb.backends());
    assert!(dns.server.queries(&srv_host("ghost")) > 0);

    dns.server.set_srv(SRV_NAME, 1, &[ghost]);
    lb.srvlb.wait_log(
        "keeping the last backends during the hold",
        Duration::from_secs(10),
    );
    assert!(logged(&lb, &["no SRV target has an address"]));
    assert!(!lb.stale());
    assert_eq!(sorted(lb.answers(20)), ["b1", "b2"]);
}

/// A target whose address lookup fails transiently (its A record is not ready yet: SERVFAIL)
/// is skipped this round; the other target is served from the very first lookup, and the
/// service is not stale. Once the target resolves, it joins.
#[test]
fn a_target_failing_transiently_does_not_spoil_the_others() {
    let dns = Dns::start();
    let b = backends(&["b1", "b2"]);
    dns.publish(&[(&b[0], 10, 10), (&b[1], 10, 10)]);
    let b2 = srv_host("b2");
    dns.server.set_name_failure(&b2, Some(Failure::ServFail));
    let lb = start_lb(&dns, "p2c", FAST, "");
    // Every client of the first lookup's pool reaches b1; none is closed for want of it.
    assert_eq!(sorted(lb.answers(10)), ["b1"]);
    assert!(!lb.stale(), "one unresolved target made the service stale");
    assert!(dns.server.queries(&b2) > 0, "b2 was never looked up");
    assert!(
        logged(
            &lb,
            &[
                "some SRV targets could not be resolved",
                "skipped=1",
                "targets=2"
            ]
        ),
        "{}",
        lb.srvlb.log().join("\n")
    );

    dns.server.set_name_failure(&b2, None);
    lb.wait_serving(&["b1", "b2"], Duration::from_secs(15));
    lb.srvlb
        .wait_log("every SRV target resolves again", Duration::from_secs(5));
    assert!(!lb.stale());
}

/// Targets are resolved concurrently under one budget (2 x the 1 s timeout): eight targets
/// whose server never answers delay a refresh by about 2 s, not 8 x 1 s.
#[test]
fn unanswered_targets_are_resolved_together_within_one_budget() {
    let dns = Dns::start();
    let b = TestBackend::start("b1", Mode::Identify);
    dns.publish(&[(&b, 10, 10)]);
    let mut records = vec![Srv {
        priority: 10,
        weight: 10,
        port: b.port(),
        target: srv_host("b1"),
    }];
    for i in 0..8 {
        let slow = srv_host(&format!("slow{i}"));
        dns.server.set_name_failure(&slow, Some(Failure::Drop));
        records.push(Srv {
            priority: 10,
            weight: 10,
            port: b.port(),
            target: slow,
        });
    }
    dns.server.set_srv(SRV_NAME, 1, &records);
    let started = Instant::now();
    let lb = start_lb(&dns, "p2c", FAST, "");
    lb.wait_serving(&["b1"], Duration::from_secs(15));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "first lookup took {took:?}; targets resolved one after another?"
    );
    assert!(logged(&lb, &["skipped=8", "targets=9"]));
}

/// When no target resolves and one failed transiently, the lookup as a whole failed: stale,
/// not "absent" (which would empty a pool after the hold).
#[test]
fn no_target_resolving_because_of_a_transient_failure_is_a_failed_lookup() {
    let dns = Dns::start();
    let b = TestBackend::start("b1", Mode::Identify);
    dns.publish(&[(&b, 10, 10)]);
    let b1 = srv_host("b1");
    dns.server.set_name_failure(&b1, Some(Failure::ServFail));
    let lb = start_lb(&dns, "p2c", FAST, "");
    lb.srvlb
        .wait_log("first DNS lookup failed", Duration::from_secs(10));
    assert!(lb.stale());
    assert!(!logged(&lb, &["service absent from DNS"]));
    dns.server.set_name_failure(&b1, None);
    lb.wait_serving(&["b1"], Duration::from_secs(15));
    assert!(!lb.stale());
}

// ---------------------------------------------------------------------------------------
// TTL-driven refresh
// ---------------------------------------------------------------------------------------

/// TTL 1 s is clamped up to min_refresh (2 s) and TTL 1 h down to max_refresh (3 s): counted
/// as queries over a 9 s window.
#[test]
fn refresh_follows_ttl_clamped_to_min_and_max_refresh() {
    let dns = Dns::start();
    let b = TestBackend::start("b1", Mode::Identify);
    let long = "_long._tcp.srvlb.test.";
    dns.publish_on(SRV_NAME, 1, &[(&b, 10, 10)]);
    dns.publish_on(long, 3600, &[(&b, 10, 10)]);
    let (p1, p2, admin) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"
[global]
admin = "127.0.0.1:{admin}"
[resolver]
nameservers = ["{dns}"]
timeout = "1s"
min_refresh = "2s"
max_refresh = "3s"
[[service]]
name = "short"
listen = ["127.0.0.1:{p1}"]
srv = "{SRV_NAME}"
[[service]]
name = "long"
listen = ["127.0.0.1:{p2}"]
srv = "{long}"
"#,
        dns = dns.addr()
    );
    let _srvlb = Srvlb::start(&config);
    assert!(eventually(Duration::from_secs(10), || {
        who_answers(addr(p1)).is_ok() && who_answers(addr(p2)).is_ok()
    }));
    let (short0, long0) = (dns.server.queries(SRV_NAME), dns.server.queries(long));
    thread::sleep(Duration::from_secs(9));
    let short = dns.server.queries(SRV_NAME) - short0;
    let long_n = dns.server.queries(long) - long0;
    // Unclamped, TTL 1 s would mean ~9 lookups and TTL 1 h none at all.
    assert!(
        (2..=5).contains(&short),
        "TTL 1 s with min_refresh 2 s: {short} lookups in 9 s"
    );
    assert!(
        (2..=4).contains(&long_n),
        "TTL 1 h with max_refresh 3 s: {long_n} lookups in 9 s"
    );
}

// ---------------------------------------------------------------------------------------
// Failed lookups keep the last known good set
// ---------------------------------------------------------------------------------------

enum Outage {
    Fail(Failure),
    Shutdown,
}

fn failed_lookups_keep_the_last_set(outage: Outage) {
    let dns = Dns::start();
    let b = backends(&["b1", "b2"]);
    dns.publish(&[(&b[0], 10, 10), (&b[1], 10, 10)]);
    let lb = start_lb(&dns, "p2c", FAST, "");
    lb.wait_serving(&["b1", "b2"], Duration::from_secs(15));
    assert!(!lb.stale());
    assert_eq!(lb.metric("srvlb_dns_stale"), 0);

    let recoverable = match outage {
        Outage::Fail(kind) => {
            dns.server.set_failure(Some(kind));
            true
        }
        Outage::Shutdown => {
            dns.shutdown();
            false
        }
    };
    assert!(
        eventually(Duration::from_secs(10), || lb.stale()),
        "dns.stale never became true; log:\n{}",
        lb.srvlb.log().join("\n")
    );
    assert_eq!(lb.metric("srvlb_dns_stale"), 1);
    assert!(lb.service_status()["dns"]["last_error"].is_string());
    lb.srvlb.wait_log(
        "serving the last known backends (stale)",
        Duration::from_secs(5),
    );
    // Well past the TTL, the refresh interval and empty_hold, every client is still served
    // by the last known backends.
    let until = Instant::now() + Duration::from_secs(5);
    let mut seen = HashSet::new();
    while Instant::now() < until {
        seen.extend(lb.answers(5));
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen, HashSet::from(["b1".to_owned(), "b2".to_owned()]));
    assert!(lb.stale());
    if recoverable {
        dns.server.set_failure(None);
        assert!(
            eventually(Duration::from_secs(10), || !lb.stale()),
            "stale never cleared"
        );
        lb.srvlb
            .wait_log("DNS lookups recovered", Duration::from_secs(5));
        lb.wait_serving(&["b1", "b2"], Duration::from_secs(5));
    }
}

#[test]
fn servfail_keeps_the_last_set_and_marks_stale() {
    failed_lookups_keep_the_last_set(Outage::Fail(Failure::ServFail));
}

#[test]
fn refused_keeps_the_last_set_and_marks_stale() {
    failed_lookups_keep_the_last_set(Outage::Fail(Failure::Refused));
}

#[test]
fn timeout_keeps_the_last_set_and_marks_stale() {
    failed_lookups_keep_the_last_set(Outage::Fail(Failure::Drop));
}

#[test]
fn dns_server_down_keeps_the_last_set_and_marks_stale() {
    failed_lookups_keep_the_last_set(Outage::Shutdown);
}

/// While lookups fail, srvlb retries with backoff between min_refresh (1 s) and max_refresh
/// (2 s): over 8 s that is 4-8 lookups, never one per timeout or a tight loop.
#[test]
fn failed_lookups_are_retried_no_faster_than_min_refresh() {
    let dns = Dns::start();
    let b = TestBackend::start("b1", Mode::Identify);
    dns.publish(&[(&b, 10, 10)]);
    let lb = start_lb(&dns, "p2c", FAST, "");
    lb.wait_serving(&["b1"], Duration::from_secs(15));
    dns.server.set_failure(Some(Failure::ServFail));
    assert!(eventually(Duration::from_secs(10), || lb.stale()));
    let q0 = dns.server.queries(SRV_NAME);
    let f0 = lb.service_status()["dns"]["failures"]
        .as_u64()
        .expect("failures");
    thread::sleep(Duration::from_secs(8));
    let queries = (dns.server.queries(SRV_NAME) - q0) as u64;
    let failures = lb.service_status()["dns"]["failures"]
        .as_u64()
        .expect("failures")
        - f0;
    assert!(
        (3..=9).contains(&failures),
        "{failures} failed lookups in 8 s"
    );
    // A failed lookup may be retried once over TCP by the resolver, not more.
    assert!(
        queries <= 2 * failures + 2,
        "{queries} queries for {failures} lookups"
    );
}

// ---------------------------------------------------------------------------------------
// Absent service: NXDOMAIN, NODATA, "." — hold, then empty; recovery
// ---------------------------------------------------------------------------------------

fn absent_empties_only_after_the_hold(make_absent: impl FnOnce(&Dns)) {
    let dns = Dns::start();
    let b = TestBackend::start("b1", Mode::Identify);
    dns.publish(&[(&b, 10, 10)]);
    let lb = start_lb(&dns, "p2c", FAST, "");
    lb.wait_serving(&["b1"], Duration::from_secs(15));

    make_absent(&dns);
    let absent_at = Instant::now();
    lb.srvlb.wait_log(
        "keeping the last backends during the hold",
        Duration::from_secs(5),
    );
    // Still served during the hold.
    assert_eq!(sorted(lb.answers(10)), ["b1"]);
    assert!(!lb.stale(), "an authoritative answer is not a failure");
    lb.srvlb
        .wait_log("empty hold elapsed", Duration::from_secs(10));
    assert!(
        absent_at.elapsed() >= Duration::from_secs(3),
        "emptied after {:?}, before empty_hold (3 s)",
        absent_at.elapsed()
    );

    // No backend: clients are closed at once, and counted.
    let before = lb.metric("srvlb_service_no_backend_total");
    for i in 0..3 {
        if let Err(e) = closed_at_once(lb.listen) {
            panic!("client {i} was not closed at once: {e}");
        }
    }
    assert!(lb.metric("srvlb_service_no_backend_total") >= before + 3);

    // Records come back: served again.
    dns.publish(&[(&b, 10, 10)]);
    lb.wait_serving(&["b1"], Duration::from_secs(10));
    lb.srvlb
        .wait_log("SRV records are back", Duration::from_secs(5));
}

#[test]
fn nxdomain_empties_the_pool_only_after_the_hold() {
    absent_empties_only_after_the_hold(|dns| dns.server.remove(SRV_NAME));
}

#[test]
fn nodata_empties_the_pool_only_after_the_hold() {
    absent_empties_only_after_the_hold(|dns| dns.server.set_srv(SRV_NAME, 1, &[]));
}

#[test]
fn lone_dot_target_empties_the_pool_only_after_the_hold() {
    absent_empties_only_after_the_hold(|dns| {
        let dot = Srv {
            priority: 0,
            weight: 0,
            port: 0,
            target: ".".to_owned(),
        };
        dns.server.set_srv(SRV_NAME, 1, &[dot]);
    });
}

#[test]
fn records_back_during_the_hold_cancel_it() {
    let dns = Dns::start();
    let b = backends(&["b1", "b2"]);
    dns.publish(&[(&b[0], 10, 10), (&b[1], 10, 10)]);
    let lb = start_lb(
        &dns,
        "p2c",
        "min_refresh = \"1s\"\nmax_refresh = \"2s\"\nempty_hold = \"4s\"",
        "",
    );
    lb.wait_serving(&["b1", "b2"], Duration::from_secs(15));
    dns.server.set_failure(Some(Failure::NxDomain));
    lb.srvlb.wait_log(
        "keeping the last backends during the hold",
        Duration::from_secs(5),
    );
    dns.server.set_failure(None);
    lb.srvlb
        .wait_log("empty hold cancelled", Duration::from_secs(5));
    // Past the end of the original hold, nothing was removed and every client is served.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        lb.answers(5);
        thread::sleep(Duration::from_millis(100));
    }
    assert!(!lb.srvlb.log_contains("empty hold elapsed"));
    assert_eq!(lb.srvlb.count_log("backends changed"), 1);
}

// ---------------------------------------------------------------------------------------
// Start-up with a failing DNS, `srvlb check --resolve`
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Identity and damping
// ---------------------------------------------------------------------------------------

#[test]
fn reordered_answers_change_nothing_and_reweighting_keeps_counters() {
    let dns = Dns::start();
    let b = backends(&["b1", "b2", "b3"]);
    dns.publish(&[(&b[0], 10, 10), (&b[1], 10, 10), (&b[2], 10, 10)]);
    let lb = start_lb(&dns, "p2c", FAST, "");
    lb.wait_serving(&["b1", "b2", "b3"], Duration::from_secs(15));
    lb.answers(30);
    let connections = |lb: &Lb| {
        lb.backend("b1.srvlb.test.")["connections"]
            .as_u64()
            .expect("connections")
    };
    let before = connections(&lb);
    assert!(before > 0);
    let changes = lb.srvlb.count_log("backends changed");

    dns.publish(&[(&b[2], 10, 10), (&b[0], 10, 10), (&b[1], 10, 10)]);
    let refreshes = lb.metric("srvlb_dns_refreshes_total");
    assert!(eventually(Duration::from_secs(10), || lb
        .metric("srvlb_dns_refreshes_total")
        >= refreshes + 2));
    assert_eq!(lb.srvlb.count_log("backends changed"), changes);
    assert!(connections(&lb) >= before);

    dns.publish(&[(&b[2], 10, 10), (&b[0], 10, 30), (&b[1], 10, 10)]);
    lb.srvlb
        .wait_log_count("backends changed", changes + 1, Duration::from_secs(10));
    assert!(
        logged(
            &lb,
            &["backends changed", "reweighted=1", "added=0", "removed=0"]
        ),
        "{:?}",
        lb.srvlb.log()
    );
    assert_eq!(lb.backend("b1.srvlb.test.")["weight"], 30);
    assert!(connections(&lb) >= before, "counters were reset");
}

const DAMPING: &str = "min_refresh = \"2s\"\nmax_refresh = \"3s\"\nempty_hold = \"3s\"";

#[test]
fn removing_more_than_half_waits_for_a_confirming_lookup() {
    let dns = Dns::start();
    let b = backends(&["b1", "b2", "b3"]);
    dns.publish(&[(&b[0], 10, 10), (&b[1], 10, 10), (&b[2], 10, 10)]);
    let lb = start_lb(&dns, "p2c", DAMPING, "");
    lb.wait_serving(&["b1", "b2", "b3"], Duration::from_secs(15));
    let changes = lb.srvlb.count_log("backends changed");

    dns.publish(&[(&b[0], 10, 10)]);
    lb.srvlb.wait_log(
        "damping: answer would remove more than half",
        Duration::from_secs(10),
    );
    // Not applied yet: all three still active.
    let states: Vec<String> = lb.backends().into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(states, ["active", "active", "active"]);
    assert_eq!(lb.srvlb.count_log("backends changed"), changes);

    lb.srvlb
        .wait_log("damping: large removal confirmed", Duration::from_secs(10));
    lb.wait_serving(&["b1"], Duration::from_secs(5));
    assert!(
        logged(&lb, &["backends changed", "removed=2", "backends=1"]),
        "{:?}",
        lb.srvlb.log()
    );
}

#[test]
fn a_one_off_broken_answer_followed_by_the_full_answer_never_drains() {
    let dns = Dns::start();
    let b = backends(&["b1", "b2", "b3"]);
    let full = [(&b[0], 10, 10), (&b[1], 10, 10), (&b[2], 10, 10)];
    dns.publish(&full);
    let lb = start_lb(&dns, "p2c", DAMPING, "");
    lb.wait_serving(&["b1", "b2", "b3"], Duration::from_secs(15));
    let changes = lb.srvlb.count_log("backends changed");

    dns.publish(&[(&b[2], 10, 10)]);
    lb.srvlb.wait_log(
        "damping: answer would remove more than half",
        Duration::from_secs(10),
    );
    dns.publish(&full);
    lb.srvlb.wait_log(
        "damping: the large removal was not confirmed",
        Duration::from_secs(10),
    );
    let states: Vec<String> = lb.backends().into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(states, ["active", "active", "active"]);
    assert_eq!(lb.srvlb.count_log("backends changed"), changes);
    lb.wait_serving(&["b1", "b2", "b3"], Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------

/// A reload that changes only the refresh settings keeps the pool: the ejected backend stays
/// ejected and the counters stay.
#[test]
fn reload_of_refresh_settings_only_keeps_pool_state() {
    let dns = Dns::start();
    let live = TestBackend::start("live", Mode::Identify);
    dns.publish(&[(&live, 10, 10)]);
    // A second target where nothing listens: connects are refused.
    let dead = srv_host("dead");
    dns.server
        .set_addrs(&dead, 1, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let srv = |target: String, port: u16| Srv {
        priority: 10,
        weight: 10,
        port,
        target,
    };
    dns.server.set_srv(
        SRV_NAME,
        1,
        &[
            srv(srv_host("live"), live.port()),
            srv(dead.clone(), free_port()),
        ],
    );
    let health = "connect_retries = 1\n[service.health]\nconsecutive_failures = 1\n\
                  base_ejection = \"60s\"\nmax_ejection = \"60s\"\nmax_ejected_percent = 50";
    let lb = start_lb(&dns, "p2c", FAST, health);
    lb.wait_serving(&["live"], Duration::from_secs(15));
    assert!(
        eventually(Duration::from_secs(15), || {
            lb.answers(2);
            lb.backend(&dead)["state"] == "ejected"
        }),
        "dead backend never ejected"
    );
    let connections = |lb: &Lb| lb.backend(&srv_host("live"))["connections"].as_u64();
    let served = connections(&lb).expect("connections");
    assert!(served > 0);

    let config = std::fs::read_to_string(&lb.srvlb.config_path).expect("read config");
    let changed = config.replace("max_refresh = \"2s\"", "max_refresh = \"3s\"");
    assert_ne!(config, changed);
    lb.srvlb.write_config(&changed);
    lb.srvlb.signal("HUP");
    lb.srvlb
        .wait_log("configuration reloaded", Duration::from_secs(20));
    assert_eq!(lb.backend(&dead)["state"], "ejected");
    assert_eq!(connections(&lb), Some(served), "counters were reset");
}

#[test]
fn a_shorter_max_refresh_from_a_reload_applies_without_waiting_out_the_old_interval() {
    let dns = Dns::start();
    let live = TestBackend::start("live", Mode::Identify);
    dns.publish_on(SRV_NAME, 3600, &[(&live, 10, 10)]);
    // Address TTLs count too: make them long as well.
    dns.server
        .set_addrs(&srv_host("live"), 3600, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let slow = "min_refresh = \"1s\"\nmax_refresh = \"1h\"";
    let lb = start_lb(&dns, "p2c", slow, "");
    lb.wait_serving(&["live"], Duration::from_secs(15));
    // TTL 3600 clamped to 1 h: no further query for a long while.
    let q0 = dns.server.queries(SRV_NAME);
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        dns.server.queries(SRV_NAME),
        q0,
        "refreshed early with a 1 h interval"
    );

    let config = std::fs::read_to_string(&lb.srvlb.config_path).expect("read config");
    let changed = config.replace("max_refresh = \"1h\"", "max_refresh = \"1s\"");
    assert_ne!(config, changed);
    lb.srvlb.write_config(&changed);
    lb.srvlb.signal("HUP");
    lb.srvlb
        .wait_log("configuration reloaded", Duration::from_secs(20));
    // The next lookups come at the new interval, not after the old hour.
    assert!(
        eventually(Duration::from_secs(8), || dns.server.queries(SRV_NAME)
            >= q0 + 2),
        "no refresh after max_refresh was lowered to 1s"
    );
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
