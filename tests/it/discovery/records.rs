//! RFC 2782 as clients see it: priority tiers and failover, weight 0, the lone ".", targets
//! with several addresses and IPv6, truncation to TCP, targets without an address or failing
//! transiently, and the one budget for resolving targets.

use super::*;

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
    // One after another would take at least 8 x 1 s; together, about the 2 s budget (7 s
    // leaves a loaded machine room for the start and the 40 connections of wait_serving).
    assert!(
        took < Duration::from_secs(7),
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
