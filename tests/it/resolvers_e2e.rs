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
    Mode, Srvlb, TestBackend, eventually, free_port, http_get, who_answers_from,
};
use support::resolvers::{Dnsmasq, Unbound};

const ZONE: &str = "srvlb.test.";
const SRV: &str = "_app._tcp.srvlb.test.";
/// TTL of the records behind unbound, as in the issue's measurements.
const TTL: u64 = 5;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Prints a figure where `--nocapture` shows it.
fn figure(what: &str) {
    println!("FIGURE {what}");
}

fn config(dns: SocketAddr, admin: u16, resolver: &str, services: &str) -> String {
    format!(
        r#"
[global]
admin = "127.0.0.1:{admin}"
shutdown_grace = "1s"

[resolver]
nameservers = ["{dns}"]
timeout = "1s"
{resolver}

{services}
"#
    )
}

fn service(name: &str, listen: u16, srv: &str) -> String {
    format!(
        r#"
[[service]]
name = "{name}"
listen = ["127.0.0.1:{listen}"]
srv = "{srv}"
balance = "maglev"
connect_timeout = "1s"
"#
    )
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

/// Issue 8.1: a rolling update replaces all 3 pods in one SRV update and the old pods stop
/// listening at once. No client may fail once a lookup has listed the new pods, and they
/// must be in use (and in /status) within TTL + 3 s of the update.
#[test]
fn a_rollout_behind_unbound_fails_no_client_once_the_new_pods_are_listed() {
    let old: Vec<TestBackend> = ["old1", "old2", "old3"]
        .iter()
        .map(|n| TestBackend::start(n, Mode::Identify))
        .collect();
    let new: Vec<TestBackend> = ["new1", "new2", "new3"]
        .iter()
        .map(|n| TestBackend::start(n, Mode::Identify))
        .collect();
    let mut records: Vec<String> = old
        .iter()
        .map(|b| format!("_app._tcp {TTL} IN SRV 10 10 {} {}", b.port(), b.name))
        .collect();
    for b in old.iter().chain(&new) {
        records.push(format!("{} {TTL} IN A 127.0.0.1", b.name));
    }
    let Some((named, unbound)) = behind_unbound(&records) else {
        return;
    };
    let (port, admin) = (free_port(), free_port());
    let srvlb = Srvlb::start(&config(
        unbound.addr(),
        admin,
        "min_refresh = \"1s\"\nmax_refresh = \"30s\"\nempty_hold = \"10s\"",
        &service("app", port, SRV),
    ));
    let listen = addr(port);
    assert!(
        serving(listen, 30, |c| c.len() == 3),
        "old pods never all served"
    );
    let clients = ClientLoop::start(listen);
    thread::sleep(Duration::from_millis(500));

    let mut lines: Vec<String> = old
        .iter()
        .map(|b| format!("update delete {}", srv_line(10, 10, b)))
        .collect();
    lines.extend(
        new.iter()
            .map(|b| format!("update add {}", srv_line(10, 10, b))),
    );
    update(&named, &lines);
    let t0 = Instant::now();
    drop(old); // the old pods stop listening at once

    // The first lookup that lists the new pods: they appear in /status.
    let new_names = ["new1", "new2", "new3"];
    let listed = loop {
        let st = status(admin);
        let shown: Vec<String> = st["services"][0]["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["target"].as_str().map(str::to_owned))
            .collect();
        if new_names
            .iter()
            .all(|n| shown.iter().any(|t| t.starts_with(&format!("{n}."))))
        {
            break Instant::now();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(TTL + 3),
            "new pods not in /status {:?} after the update: {st}",
            t0.elapsed()
        );
        thread::sleep(Duration::from_millis(50));
    };
    // Through the damping confirmation and beyond.
    thread::sleep(Duration::from_secs(TTL + 4));
    let attempts = clients.finish();
    let after: Vec<&Attempt> = attempts.iter().filter(|(at, _)| *at >= listed).collect();
    let failed_after: Vec<&Attempt> = after.iter().copied().filter(|(_, r)| r.is_err()).collect();
    let before_listed = attempts
        .iter()
        .filter(|(at, r)| *at >= t0 && *at < listed && r.is_err())
        .count();
    let first_new = attempts
        .iter()
        .filter(|(at, r)| *at >= t0 && r.as_ref().is_ok_and(|n| n.starts_with("new")))
        .map(|(at, _)| at.duration_since(t0))
        .min();
    let still_old = after
        .iter()
        .filter(|(_, r)| r.as_ref().is_ok_and(|n| n.starts_with("old")))
        .count();
    figure(&format!(
        "rollout behind unbound (TTL {TTL}s): new pods listed {:.1}s after the update, first client on a new pod after {:.1}s; clients failed after listing: {} of {}; failed before listing (old pods gone, DNS not yet changed): {before_listed}",
        listed.duration_since(t0).as_secs_f64(),
        first_new.map_or(f64::NAN, |d| d.as_secs_f64()),
        failed_after.len(),
        after.len()
    ));
    assert_eq!(still_old, 0, "an old pod answered after it stopped");
    assert!(
        failed_after.is_empty(),
        "{} clients failed after the new pods were listed: {:?}\nlog:\n{}",
        failed_after.len(),
        failed_after.iter().take(5).collect::<Vec<_>>(),
        srvlb.log().join("\n")
    );
    assert!(
        after.len() > 50,
        "only {} clients after listing",
        after.len()
    );
    assert!(
        srvlb.log_contains("damping: large removal confirmed"),
        "the removal of the old pods was never confirmed"
    );
    drop(unbound);
}

/// Issue 8.1 / 8.6: replacing the only target (a -> b, another priority; a keeps running)
/// and then moving the new target to another address (the old one stops at once), through
/// unbound: each followed within TTL + 3 s, no client failing once the new one answers, and
/// no "preferred tier has no usable backend" for a DNS change.
#[test]
fn replacing_the_only_target_and_its_address_behind_unbound() {
    let a = TestBackend::start("a", Mode::Identify);
    let mut b = TestBackend::start("b", Mode::Identify);
    let moved = TestBackend::start_on(
        "b-moved",
        SocketAddr::from(([127, 0, 0, 2], b.port())),
        Mode::Identify,
    );
    let records = vec![
        format!("_app._tcp {TTL} IN SRV 10 10 {} a", a.port()),
        format!("a {TTL} IN A 127.0.0.1"),
        format!("b {TTL} IN A 127.0.0.1"),
    ];
    let Some((named, unbound)) = behind_unbound(&records) else {
        return;
    };
    let (port, admin) = (free_port(), free_port());
    let srvlb = Srvlb::start(&config(
        unbound.addr(),
        admin,
        "min_refresh = \"1s\"\nmax_refresh = \"30s\"",
        &service("app", port, SRV),
    ));
    let listen = addr(port);
    assert!(serving(listen, 10, |c| c.contains_key("a")));

    // Until every client lands on `want`; counts the clients that fail once `want` has
    // answered one (before that, a stopped old backend may refuse them: DNS has not changed
    // yet as far as srvlb can know).
    let follow = |want: &str| -> (Duration, usize) {
        let started = Instant::now();
        let (mut failed, mut seen) = (0, false);
        loop {
            let mut all = true;
            for host in 2..12u8 {
                match who_answers_from(listen, Some(SocketAddr::from(([127, 0, 3, host], 0)))) {
                    Ok(name) => {
                        seen |= name == want;
                        all &= name == want;
                    }
                    Err(_) => {
                        failed += usize::from(seen);
                        all = false;
                    }
                }
            }
            if all {
                return (started.elapsed(), failed);
            }
            assert!(
                started.elapsed() < Duration::from_secs(TTL + 3),
                "{want} not used within TTL + 3 s; log:\n{}",
                srvlb.log().join("\n")
            );
            thread::sleep(Duration::from_millis(100));
        }
    };
    update(
        &named,
        &[
            format!("update delete {SRV} SRV"),
            format!("update add {}", srv_line(20, 10, &b)),
        ],
    );
    let (took, failed) = follow("b");
    figure(&format!(
        "only target replaced (a -> b, priority 10 -> 20) behind unbound: b used after {:.1}s, {failed} clients failed",
        took.as_secs_f64()
    ));
    assert_eq!(
        failed, 0,
        "a working backend was replaced by another: no client may fail"
    );
    update(
        &named,
        &[
            format!("update delete b.{ZONE} A"),
            format!("update add b.{ZONE} {TTL} IN A 127.0.0.2"),
        ],
    );
    // The old address stops serving at once, as a moved host does.
    b.stop();
    let (took, failed) = follow("b-moved");
    figure(&format!(
        "only A record of the target changed behind unbound: new address used after {:.1}s, {failed} clients failed",
        took.as_secs_f64()
    ));
    assert_eq!(failed, 0);
    assert!(
        !srvlb.log_contains("preferred tier has no usable backend"),
        "a DNS change was logged as a failover:\n{}",
        srvlb.log().join("\n")
    );
    assert!(srvlb.log_contains("tier change: DNS replaced the tier in use"));
    drop((a, moved, unbound));
}

/// Issue 8.5: at TTL 5 behind unbound, about one SRV and one address lookup per TTL (the
/// issue measured 23 SRV + 23 A + 23 AAAA a minute before); with `family = "ipv4"` no AAAA
/// query at all.
#[test]
fn query_rate_behind_unbound_is_one_lookup_per_ttl() {
    let b = TestBackend::start("b1", Mode::Identify);
    let records = vec![
        format!("_app._tcp {TTL} IN SRV 10 10 {} b1", b.port()),
        format!("b1 {TTL} IN A 127.0.0.1"),
    ];
    let Some((_named, unbound)) = behind_unbound(&records) else {
        return;
    };
    let count = |from: u64, to: u64, qtype: &str, name: &str| {
        unbound
            .queries()
            .iter()
            .filter(|q| q.at >= from && q.at < to && q.qtype == qtype && q.name == name)
            .count()
    };
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    const WINDOW: u64 = 30;
    for family in ["any", "ipv4"] {
        let (port, admin) = (free_port(), free_port());
        let srvlb = Srvlb::start(&config(
            unbound.addr(),
            admin,
            &format!("min_refresh = \"1s\"\nmax_refresh = \"60s\"\nfamily = \"{family}\""),
            &service("app", port, SRV),
        ));
        assert!(serving(addr(port), 5, |c| c.contains_key("b1")));
        // Skip start-up, then count whole seconds of the log.
        thread::sleep(Duration::from_secs(2));
        let from = unix();
        thread::sleep(Duration::from_secs(WINDOW));
        let to = unix();
        let per_min = |n: usize| n as f64 * 60.0 / (to - from) as f64;
        let srv = count(from, to, "SRV", SRV);
        let a = count(from, to, "A", "b1.srvlb.test.");
        let aaaa = count(from, to, "AAAA", "b1.srvlb.test.");
        let srv_at: Vec<u64> = unbound
            .queries()
            .iter()
            .filter(|q| q.at >= from && q.at < to && q.qtype == "SRV")
            .map(|q| q.at - from)
            .collect();
        println!("SRV queries at seconds {srv_at:?} of the window");
        figure(&format!(
            "queries per minute behind unbound at TTL {TTL}s, family {family}: SRV {:.0}, A {:.0}, AAAA {:.0} (before the fix: 23 each)",
            per_min(srv),
            per_min(a),
            per_min(aaaa)
        ));
        // A lookup a second past each expiry is about 10 a minute; the window's edges allow
        // a few more. Refreshing on the expiry edge gave 23.
        assert!(per_min(srv) <= 14.0, "SRV {srv} in {}s", to - from);
        assert!(per_min(srv) >= 6.0, "SRV records not refreshed: {srv}");
        assert!(per_min(a) <= 14.0, "A {a} in {}s", to - from);
        if family == "any" {
            assert!(per_min(aaaa) <= 14.0, "AAAA {aaaa}");
        } else {
            assert_eq!(aaaa, 0, "family = \"ipv4\" still asked for AAAA");
        }
        assert!(census(addr(port), 5).contains_key("b1"));
        drop(srvlb);
    }
}

/// Issue 8.4 / 8.6: the empty hold after NXDOMAIN shows in /status and /metrics (since,
/// until, the answer), its end is visible too, and records coming back afterwards are
/// reported as a restore, not as a cancelled hold.
#[test]
fn the_empty_hold_behind_unbound_is_visible_and_its_end_reported_truthfully() {
    let b = TestBackend::start("b1", Mode::Identify);
    let records = vec![
        format!("_app._tcp {TTL} IN SRV 10 10 {} b1", b.port()),
        format!("b1 {TTL} IN A 127.0.0.1"),
    ];
    let Some((named, unbound)) = behind_unbound(&records) else {
        return;
    };
    let (port, admin) = (free_port(), free_port());
    let srvlb = Srvlb::start(&config(
        unbound.addr(),
        admin,
        "min_refresh = \"1s\"\nmax_refresh = \"4s\"\nempty_hold = \"6s\"",
        &service("app", port, SRV),
    ));
    assert!(serving(addr(port), 5, |c| c.contains_key("b1")));
    let hold_of = || status(admin)["services"][0]["dns"]["empty_hold"].clone();
    assert!(hold_of().is_null());
    update(&named, &[format!("update delete {SRV} SRV")]);
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(TTL + 4), || hold_of()["in_hold"]
            == true),
        "/status never showed the empty hold: {}",
        status(admin)
    );
    let hold = hold_of();
    let (since, until) = (
        hold["since_unix_ms"].as_u64().expect("since"),
        hold["until_unix_ms"].as_u64().expect("until"),
    );
    figure(&format!(
        "empty hold visible {:.1}s after the records were deleted: {hold}",
        t0.elapsed().as_secs_f64()
    ));
    assert_eq!(until - since, 6000);
    assert_eq!(hold["reason"], "NXDOMAIN");
    assert_eq!(metric(admin, "srvlb_dns_empty_hold"), Some(1.0));
    assert!(metric(admin, "srvlb_dns_empty_hold_remaining_seconds").is_some_and(|s| s > 0.0));
    assert!(
        census(addr(port), 5).contains_key("b1"),
        "the hold keeps serving"
    );
    assert!(
        eventually(Duration::from_secs(12), || hold_of()["emptied"] == true),
        "the hold never ended: {}",
        status(admin)
    );
    assert_eq!(metric(admin, "srvlb_dns_empty_hold"), Some(0.0));
    assert_eq!(metric(admin, "srvlb_dns_absent"), Some(1.0));
    assert!(
        status(admin)["services"][0]["backends"]
            .as_array()
            .is_some_and(|b| b.is_empty())
    );

    update(&named, &[format!("update add {}", srv_line(10, 10, &b))]);
    let back = Instant::now();
    assert!(
        eventually(Duration::from_secs(15), || hold_of().is_null()),
        "records back but /status still shows the hold"
    );
    figure(&format!(
        "records back after the hold emptied the pool: served again after {:.1}s",
        back.elapsed().as_secs_f64()
    ));
    assert!(census(addr(port), 5).contains_key("b1"));
    assert!(srvlb.log_contains("restoring the backends the empty hold had removed"));
    assert!(
        !srvlb.log_contains("empty hold cancelled"),
        "a hold that had already emptied the pool was reported as cancelled"
    );
    drop(unbound);
}

/// Issue 8.2: RFC 2782 weight belongs to the SRV record. dnsmasq serves two targets of
/// weight 10, one with 3 A records and one with 1, and a dual-stack target beside a
/// v4-only one: each pair must split clients about evenly (the issue saw 75 / 25).
#[test]
fn dnsmasq_weight_is_per_srv_record_whatever_the_address_count() {
    let p3 = free_port();
    let three: Vec<TestBackend> = (2..=4u8)
        .map(|i| {
            TestBackend::start_on(
                "three",
                SocketAddr::from(([127, 0, 0, i], p3)),
                Mode::Identify,
            )
        })
        .collect();
    let one = TestBackend::start_on(
        "one",
        SocketAddr::from(([127, 0, 0, 5], free_port())),
        Mode::Identify,
    );
    let pd = free_port();
    let dual4 = TestBackend::start_on(
        "dual",
        SocketAddr::from(([127, 0, 0, 6], pd)),
        Mode::Identify,
    );
    let dual6 = TestBackend::start_on(
        "dual",
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, pd)),
        Mode::Identify,
    );
    let solo = TestBackend::start_on(
        "solo",
        SocketAddr::from(([127, 0, 0, 7], free_port())),
        Mode::Identify,
    );
    let records = vec![
        format!("srv-host=_split._tcp.srvlb.test,three.srvlb.test,{p3},10,10"),
        format!(
            "srv-host=_split._tcp.srvlb.test,one.srvlb.test,{},10,10",
            one.port()
        ),
        "host-record=three.srvlb.test,127.0.0.2".to_owned(),
        "host-record=three.srvlb.test,127.0.0.3".to_owned(),
        "host-record=three.srvlb.test,127.0.0.4".to_owned(),
        "host-record=one.srvlb.test,127.0.0.5".to_owned(),
        format!("srv-host=_dual._tcp.srvlb.test,dual.srvlb.test,{pd},10,10"),
        format!(
            "srv-host=_dual._tcp.srvlb.test,solo.srvlb.test,{},10,10",
            solo.port()
        ),
        "host-record=dual.srvlb.test,127.0.0.6,::1".to_owned(),
        "host-record=solo.srvlb.test,127.0.0.7".to_owned(),
    ];
    let Some(dnsmasq) = Dnsmasq::start_or_skip(ZONE, 5, &records) else {
        return;
    };
    let (split, dual, admin) = (free_port(), free_port(), free_port());
    let _srvlb = Srvlb::start(&config(
        dnsmasq.addr(),
        admin,
        "min_refresh = \"1s\"",
        &(service("split", split, "_split._tcp.srvlb.test")
            + &service("dual", dual, "_dual._tcp.srvlb.test")),
    ));
    assert!(eventually(Duration::from_secs(10), || census(
        addr(split),
        20
    )
    .len()
        == 2));
    assert!(eventually(Duration::from_secs(10), || census(
        addr(dual),
        20
    )
    .len()
        == 2));
    const CLIENTS: usize = 400;
    for (listen, a, b) in [(split, "three", "one"), (dual, "dual", "solo")] {
        let counts = census(addr(listen), CLIENTS);
        let (na, nb) = (
            counts.get(a).copied().unwrap_or(0),
            counts.get(b).copied().unwrap_or(0),
        );
        figure(&format!(
            "share of {CLIENTS} Maglev clients, equal SRV weights: {a} {na} ({:.0}%), {b} {nb} ({:.0}%)",
            na as f64 * 100.0 / CLIENTS as f64,
            nb as f64 * 100.0 / CLIENTS as f64
        ));
        assert_eq!(na + nb, CLIENTS, "{counts:?}");
        // Maglev is not exact; 75 / 25 (weight per address) must fail, 50 / 50 pass.
        assert!(
            (140..=260).contains(&na),
            "{a}: {na} of {CLIENTS} ({counts:?})"
        );
    }
    drop((three, dual4, dual6));
}

/// Issue 8.3: a target published with AAAA ::1 and A 127.0.0.1 while its backend listens on
/// IPv4 only. No client fails, the v6 address is shown as an unused address of a served
/// target, not as an ejected backend; with `family = "ipv4"` it is not even there.
#[test]
fn dnsmasq_dual_stack_target_on_a_v4_only_backend_does_not_look_broken() {
    let b = TestBackend::start("dual", Mode::Identify);
    let records = vec![
        format!(
            "srv-host=_app._tcp.srvlb.test,dual.srvlb.test,{},10,10",
            b.port()
        ),
        "host-record=dual.srvlb.test,127.0.0.1,::1".to_owned(),
    ];
    let Some(dnsmasq) = Dnsmasq::start_or_skip(ZONE, 5, &records) else {
        return;
    };
    for family in ["any", "ipv4"] {
        let (port, admin) = (free_port(), free_port());
        let srvlb = Srvlb::start(&config(
            dnsmasq.addr(),
            admin,
            &format!("min_refresh = \"1s\"\nfamily = \"{family}\""),
            &service("app", port, SRV),
        ));
        assert!(serving(addr(port), 3, |c| c.contains_key("dual")));
        // 200 clients: every one served although half the keys map to [::1] first.
        let counts = census(addr(port), 200);
        assert_eq!(counts.get("dual"), Some(&200), "{counts:?}");
        let backends = status(admin)["services"][0]["backends"].clone();
        let states: Vec<(String, String)> = backends
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    b["address"].as_str().unwrap_or("").to_owned(),
                    b["state"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        figure(&format!(
            "dual-stack target, backend on IPv4 only, family {family}: 200 of 200 clients served; /status {states:?}"
        ));
        assert!(
            states.iter().all(|(_, s)| s != "ejected"),
            "a target reachable on IPv4 looks broken: {backends}"
        );
        let v6 = states.iter().find(|(a, _)| a.starts_with('['));
        if family == "any" {
            assert_eq!(
                v6.map(|(_, s)| s.as_str()),
                Some("address_unused"),
                "{backends}"
            );
            // Nor does the log call it an ejected backend.
            assert!(
                srvlb.log_contains("address unused") && !srvlb.log_contains("backend ejected"),
                "the log reports the unused v6 address as a broken backend"
            );
        } else {
            assert!(
                v6.is_none(),
                "family = \"ipv4\" still uses IPv6: {backends}"
            );
        }
        drop(srvlb);
    }
}

/// Issue 8.6: a resolver whose port is closed refuses the query at once (ICMP port
/// unreachable). srvlb must say "refused" and turn stale promptly (the issue saw "request
/// timed out" and stale only 9.1 s later).
#[test]
fn dnsmasq_down_is_reported_as_refused_at_once() {
    let b = TestBackend::start("b1", Mode::Identify);
    let records = vec![
        format!(
            "srv-host=_app._tcp.srvlb.test,b1.srvlb.test,{},10,10",
            b.port()
        ),
        "host-record=b1.srvlb.test,127.0.0.1".to_owned(),
    ];
    let Some(mut dnsmasq) = Dnsmasq::start_or_skip(ZONE, 1, &records) else {
        return;
    };
    let (port, admin) = (free_port(), free_port());
    let _srvlb = Srvlb::start(&config(
        dnsmasq.addr(),
        admin,
        "min_refresh = \"1s\"\nmax_refresh = \"2s\"",
        &service("app", port, SRV),
    ));
    assert!(serving(addr(port), 3, |c| c.contains_key("b1")));
    dnsmasq.stop();
    let t0 = Instant::now();
    let dns = || status(admin)["services"][0]["dns"].clone();
    assert!(
        eventually(Duration::from_secs(10), || dns()["stale"] == true),
        "never stale"
    );
    let took = t0.elapsed();
    let error = dns()["last_error"].as_str().unwrap_or("").to_owned();
    figure(&format!(
        "resolver port closed: stale after {:.1}s (refresh interval ~1.1s), last_error {error:?}",
        took.as_secs_f64()
    ));
    assert!(error.contains("refused"), "reported as {error:?}");
    // One refresh interval (TTL 1 s) plus the probe's quarter second, with room for a
    // loaded machine (alone it takes ~1.4 s).
    assert!(took < Duration::from_secs(4), "stale only after {took:?}");
    assert!(
        census(addr(port), 5).contains_key("b1"),
        "stale keeps serving"
    );
}

/// Issue 9.5: a name that stays absent, and a target whose lookups keep failing, are
/// re-queried with back-off up to max_refresh, not every min_refresh forever.
#[test]
fn dnsmasq_absent_name_and_failing_target_are_queried_with_back_off() {
    let b = TestBackend::start("b1", Mode::Identify);
    // A target in a domain dnsmasq has no server for: it answers REFUSED at once (a
    // transient failure, never NXDOMAIN).
    let records = vec![
        format!(
            "srv-host=_flaky._tcp.srvlb.test,b1.srvlb.test,{},10,10",
            b.port()
        ),
        format!(
            "srv-host=_flaky._tcp.srvlb.test,gone.dead.test,{},10,10",
            b.port()
        ),
        "host-record=b1.srvlb.test,127.0.0.1".to_owned(),
        "server=/dead.test/#".to_owned(),
    ];
    let Some(dnsmasq) = Dnsmasq::start_or_skip(ZONE, 1, &records) else {
        return;
    };
    let (absent, flaky, admin) = (free_port(), free_port(), free_port());
    let _srvlb = Srvlb::start(&config(
        dnsmasq.addr(),
        admin,
        "min_refresh = \"1s\"\nmax_refresh = \"8s\"\nempty_hold = \"5s\"",
        &(service("absent", absent, "_gone._tcp.srvlb.test")
            + &service("flaky", flaky, "_flaky._tcp.srvlb.test")),
    ));
    assert!(serving(addr(flaky), 3, |c| c.contains_key("b1")));
    let before = dnsmasq.queries().len();
    const WINDOW: Duration = Duration::from_secs(30);
    thread::sleep(WINDOW);
    let queries = dnsmasq.queries();
    let window = &queries[before.min(queries.len())..];
    let count = |qtype: &str, name: &str| {
        window
            .iter()
            .filter(|(t, n)| t == qtype && n == name)
            .count()
    };
    let absent_srv = count("SRV", "_gone._tcp.srvlb.test");
    let target = count("A", "gone.dead.test");
    figure(&format!(
        "in {}s with min_refresh 1s, max_refresh 8s: absent name queried {absent_srv} times, failing target {target} A queries (every min_refresh would be ~{} lookups)",
        WINDOW.as_secs(),
        WINDOW.as_secs()
    ));
    assert!(
        absent_srv <= 10,
        "absent name queried {absent_srv} times in {WINDOW:?}"
    );
    assert!(absent_srv >= 2, "absent name not re-queried at all");
    // A lookup may reach dnsmasq twice (UDP, then TCP after REFUSED). Every min_refresh
    // would be ~27 lookups in 30 s; the back-off (1, 2, 4, 8, 8 s) about 5.
    assert!(
        target <= 18,
        "failing target queried {target} times in {WINDOW:?}"
    );
    assert!(
        census(addr(flaky), 5).contains_key("b1"),
        "the good target serves"
    );
}
