//! Connection limits across a reload: a replaced service keeps its limit, and a listener moved
//! to another service stops waiting for the old one.

use super::*;

/// Writes "ping\n" and expects it echoed within `within`; false when nothing came back.
fn answered_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let ok = roundtrip(stream, b"ping\n").is_ok();
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    ok
}

#[test]
fn a_replaced_service_keeps_its_connection_limit_and_its_listener_wakes() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let b2 = TestBackend::start("b2", Mode::Echo);
    let port = free_port();
    let srvlb = Srvlb::start(&config(&[service(
        "main",
        &[port],
        &[&b1],
        "max_connections = 1",
    )]));
    let mut first = connect(port).expect("first connect");
    roundtrip(&mut first, b"first").expect("first connection served");

    // A new static list replaces the service; the limit (now 2) stays the name's.
    srvlb.write_config(&config(&[service(
        "main",
        &[port],
        &[&b1, &b2],
        "max_connections = 2",
    )]));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    let mut second = connect(port).expect("second connect");
    assert!(
        answered_within(&mut second, Duration::from_secs(10)),
        "a client after the reload waits for the old service's connection to end"
    );
    // First (old service) + second (new service) = 2 = the new limit: a third must wait
    // in the backlog, not make the total exceed it.
    let mut third = connect(port).expect("third connect");
    assert!(
        !answered_within(&mut third, Duration::from_millis(1500)),
        "old and new service together exceed max_connections"
    );
    finish(first).expect("first closes cleanly");
    let mut echoed = [0u8; 5];
    third
        .read_exact(&mut echoed)
        .expect("the third is served once the first closes");
    assert_eq!(&echoed, b"ping\n");
    finish(second).expect("second closes cleanly");
    finish(third).expect("third closes cleanly");
}

#[test]
fn a_listener_moved_to_another_service_stops_waiting_for_the_old_limit() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let (port, other) = (free_port(), free_port());
    let srvlb = Srvlb::start(&config(&[service(
        "a",
        &[port],
        &[&b1],
        "max_connections = 1",
    )]));
    let mut first = connect(port).expect("first connect");
    roundtrip(&mut first, b"first").expect("first connection served");

    // The address now belongs to "b", whose limit is free.
    srvlb.write_config(&config(&[
        service("a", &[other], &[&b1], "max_connections = 1"),
        service("b", &[port], &[&b1], "max_connections = 10"),
    ]));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    let mut second = connect(port).expect("second connect");
    assert!(
        answered_within(&mut second, Duration::from_secs(10)),
        "the listener still waits for a permit of the service it no longer feeds"
    );
    finish(second).expect("second closes cleanly");
    finish(first).expect("first closes cleanly");
}
