//! A backend's identity across answers (reordered, reweighted) and damping of large removals.

use super::*;

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
