//! When srvlb asks again and what a bad answer does: refresh on the TTL clamped to
//! min/max_refresh, failed lookups (SERVFAIL, REFUSED, timeout, server down) keeping the last
//! set and marking the service stale, their back-off, and an absent service (NXDOMAIN, NODATA,
//! ".") emptied only after the empty hold.

use super::*;

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
    let counting = Instant::now();
    thread::sleep(Duration::from_secs(9));
    let short = dns.server.queries(SRV_NAME) - short0;
    let long_n = dns.server.queries(long) - long0;
    // The window as it really was (a loaded machine may oversleep): at most one lookup per
    // period in it, plus one at its start.
    let window = counting.elapsed().as_secs_f64();
    let at_most = |period: f64| (window / period).floor() as usize + 1;
    // Unclamped, TTL 1 s would mean ~9 lookups and TTL 1 h none at all.
    assert!(
        (2..=at_most(2.0)).contains(&short),
        "TTL 1 s with min_refresh 2 s: {short} lookups in {window:.1} s"
    );
    assert!(
        (2..=at_most(3.0)).contains(&long_n),
        "TTL 1 h with max_refresh 3 s: {long_n} lookups in {window:.1} s"
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
