//! dnsmasq serving SRV itself (`srv-host=`): weight per SRV record whatever the number of
//! addresses, a dual-stack target whose backend listens on IPv4 only, a refused resolver port,
//! the back-off for an absent name and a failing target.

use super::*;

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
