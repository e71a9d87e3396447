//! A reload that keeps a service's discovery source keeps its pool: counters and ejections.

use super::*;

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
