//! Per-source limits through the spawned binary: one client address cannot hold more than
//! `max_connections_per_source` connections or open them faster than `rate_per_source`,
//! while other sources keep being served, and every refusal is counted.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::support;
use support::harness::{Mode, StaticLb as Lb, TestBackend};

/// Connects from `source` and checks the echo works; the stream stays open.
fn echo_from(source: &str, to: SocketAddr) -> Option<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    let source: SocketAddr = format!("{source}:0").parse().ok()?;
    socket.bind(&source.into()).ok()?;
    socket
        .connect_timeout(&to.into(), Duration::from_secs(5))
        .ok()?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"ping\n").ok()?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).ok()?;
    (!line.is_empty()).then_some(stream)
}

#[test]
fn one_source_cannot_hold_every_slot() {
    let backend = TestBackend::start("a", Mode::Echo);
    let lb = Lb::start(&[backend.addr], "max_connections_per_source = 3", "");
    let held: Vec<TcpStream> = (0..3)
        .map(|i| echo_from("127.0.0.9", lb.listen).unwrap_or_else(|| panic!("connection {i}")))
        .collect();
    // The fourth from the same address is closed at once; another address is served.
    assert!(
        echo_from("127.0.0.9", lb.listen).is_none(),
        "a fourth connection from 127.0.0.9 was served"
    );
    assert!(
        echo_from("127.0.0.10", lb.listen).is_some(),
        "127.0.0.10 was refused"
    );
    assert_eq!(
        lb.service_metric("srvlb_service_source_connection_limited_total"),
        1
    );
    // A slot comes back when a connection closes.
    drop(held);
    let again = support::harness::eventually(Duration::from_secs(5), || {
        echo_from("127.0.0.9", lb.listen).is_some()
    });
    assert!(
        again,
        "127.0.0.9 stayed refused after closing its connections"
    );
}

#[test]
fn one_source_cannot_open_connections_faster_than_its_rate() {
    let backend = TestBackend::start("a", Mode::Echo);
    // 2 per minute with a burst of 4: within this test no token comes back.
    let lb = Lb::start(
        &[backend.addr],
        "rate_per_source = \"2/m\"\nrate_per_source_burst = 4",
        "",
    );
    let served = (0..8)
        .filter(|_| echo_from("127.0.0.11", lb.listen).is_some())
        .count();
    assert_eq!(served, 4, "the burst of 4, then nothing");
    assert!(
        echo_from("127.0.0.12", lb.listen).is_some(),
        "another source was refused"
    );
    assert_eq!(
        lb.service_metric("srvlb_service_source_rate_limited_total"),
        4
    );
    assert_eq!(lb.service_metric("srvlb_service_tracked_sources"), 2);
}
