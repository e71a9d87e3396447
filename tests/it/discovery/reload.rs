//! Reloads that change only discovery's refresh settings: the pool and its state stay, and a
//! shorter interval applies at once.

use super::*;

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
