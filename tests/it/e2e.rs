//! End to end through the spawned srvlb binary: backends found through an in-process DNS
//! server, real sockets on 127.0.0.1, and what a client would notice.

use crate::support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::harness::{
    Dns, Mode, SRV_NAME, Srvlb, TestBackend, dns_config, eventually, free_port, srv_service,
    who_answers, who_answers_from,
};

fn config(dns: SocketAddr, services: &str) -> String {
    let refresh = "min_refresh = \"1s\"\nmax_refresh = \"2s\"";
    dns_config(dns, "shutdown_grace = \"10s\"", refresh, services)
}

fn service(name: &str, port: u16, balance: &str, extra: &str) -> String {
    srv_service(name, addr(port), SRV_NAME, balance, extra)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn three_backends(dns: &Dns) -> Vec<TestBackend> {
    let backends: Vec<TestBackend> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| TestBackend::start(n, Mode::Identify))
        .collect();
    dns.publish(&[
        (&backends[0], 10, 10),
        (&backends[1], 10, 10),
        (&backends[2], 10, 10),
    ]);
    backends
}

/// Waits until srvlb routes to `want` distinct backends (discovery has run).
fn wait_backends(listen: SocketAddr, want: usize) {
    let ok = eventually(Duration::from_secs(10), || {
        let mut seen = std::collections::HashSet::new();
        // Several source addresses, so a Maglev service (keyed by client IP) shows them all.
        for host in 2..32u8 {
            let source = SocketAddr::from(([127, 0, 0, host], 0));
            if let Ok(name) = who_answers_from(listen, Some(source)) {
                seen.insert(name);
            }
        }
        seen.len() >= want
    });
    assert!(ok, "srvlb never reached {want} backends");
}

#[test]
fn p2c_spreads_connections_across_all_backends() {
    let dns = Dns::start();
    let backends = three_backends(&dns);
    let port = free_port();
    let _srvlb = Srvlb::start(&config(dns.addr(), &service("app", port, "p2c", "")));
    wait_backends(addr(port), 3);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let name = who_answers(addr(port)).expect("connection through srvlb");
        *counts.entry(name).or_default() += 1;
    }
    for b in &backends {
        let n = counts.get(&b.name).copied().unwrap_or(0);
        assert!(
            n >= 50,
            "backend {} got {n} of 300 connections: {counts:?}",
            b.name
        );
    }
}

#[test]
fn maglev_keeps_a_client_address_on_one_backend() {
    let dns = Dns::start();
    let _backends = three_backends(&dns);
    let port = free_port();
    let _srvlb = Srvlb::start(&config(dns.addr(), &service("app", port, "maglev", "")));
    wait_backends(addr(port), 3);
    let mut chosen = HashMap::new();
    for host in 2..=40u8 {
        let source = SocketAddr::from(([127, 0, 0, host], 0));
        let first = who_answers_from(addr(port), Some(source)).expect("connect");
        for _ in 0..5 {
            let again = who_answers_from(addr(port), Some(source)).expect("connect");
            assert_eq!(
                again, first,
                "client 127.0.0.{host} moved from {first} to {again}"
            );
        }
        chosen.insert(host, first);
    }
    let distinct: std::collections::HashSet<_> = chosen.values().collect();
    assert_eq!(
        distinct.len(),
        3,
        "39 client addresses should use all 3 backends: {chosen:?}"
    );
}

#[test]
fn removed_srv_record_takes_no_new_connections_but_open_ones_continue() {
    let dns = Dns::start();
    let backends = three_backends(&dns);
    let port = free_port();
    let srvlb = Srvlb::start(&config(dns.addr(), &service("app", port, "p2c", "")));
    wait_backends(addr(port), 3);

    // Hold a connection open on b3.
    let mut held = loop {
        let mut s = TcpStream::connect(addr(port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut greeting = [0u8; 3];
        s.read_exact(&mut greeting).expect("greeting");
        if &greeting == b"b3\n" {
            break s;
        }
    };

    // The first answer logged "backends changed" already: wait for the next one, the
    // removal (logged once the pool holds it; the TTL is 1 s).
    let changes = srvlb.count_log("backends changed");
    dns.publish(&[(&backends[0], 10, 10), (&backends[1], 10, 10)]);
    srvlb.wait_log_count("backends changed", changes + 1, Duration::from_secs(15));
    let before = backends[2].accepted();
    for _ in 0..100 {
        let name = who_answers(addr(port)).expect("connection through srvlb");
        assert_ne!(name, "b3", "a removed backend got a new connection");
    }
    assert_eq!(backends[2].accepted(), before);

    // The held connection to the removed backend still works both ways.
    held.write_all(b"still here")
        .expect("write on held connection");
    let mut echo = [0u8; 10];
    held.read_exact(&mut echo).expect("echo on held connection");
    assert_eq!(&echo, b"still here");
}

#[test]
fn refusing_backend_is_retried_and_ejected() {
    let dns = Dns::start();
    let good: Vec<TestBackend> = ["b1", "b2"]
        .iter()
        .map(|n| TestBackend::start(n, Mode::Identify))
        .collect();
    let mut dead = TestBackend::start("b3", Mode::Identify);
    dead.stop(); // the port now refuses connections
    dns.publish(&[(&good[0], 10, 10), (&good[1], 10, 10), (&dead, 10, 10)]);
    let port = free_port();
    let extra = "connect_retries = 2\n[service.health]\nconsecutive_failures = 2\nbase_ejection = \"30s\"\nmax_ejected_percent = 50\n";
    let srvlb = Srvlb::start(&config(dns.addr(), &service("app", port, "p2c", extra)));
    wait_backends(addr(port), 2);
    for i in 0..100 {
        let name = who_answers(addr(port))
            .unwrap_or_else(|e| panic!("client {i} saw the refusing backend: {e}"));
        assert_ne!(name, "b3");
    }
    srvlb.wait_log("backend ejected", Duration::from_secs(5));
    let ejection = srvlb
        .log()
        .into_iter()
        .find(|l| l.contains("backend ejected"))
        .expect("ejection line");
    assert!(
        ejection.contains(&format!("127.0.0.1:{}", dead.port())),
        "the wrong backend was ejected: {ejection}"
    );
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    // xorshift: fast, reproducible, incompressible enough for an integrity check.
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn static_service(name: &str, port: u16, backend: &TestBackend) -> String {
    format!(
        r#"
[[service]]
name = "{name}"
listen = ["127.0.0.1:{port}"]
static = ["{}"]
"#,
        backend.addr
    )
}

#[test]
fn sixty_four_mebibytes_each_way_arrive_intact() {
    let backend = TestBackend::start("echo", Mode::Echo);
    let port = free_port();
    let _srvlb = Srvlb::start(&format!(
        "[global]\nshutdown_grace = \"1s\"\n{}",
        static_service("bulk", port, &backend)
    ));
    let payload = random_bytes(64 << 20, 0x5eed);
    let sent_hash = sha256(&payload);
    let stream = TcpStream::connect(addr(port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        writer.write_all(&payload).expect("send 64 MiB");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut received = Vec::with_capacity(64 << 20);
    (&stream).read_to_end(&mut received).expect("receive");
    sender.join().expect("sender");
    assert_eq!(received.len(), 64 << 20, "byte count differs");
    assert_eq!(sha256(&received), sent_hash, "SHA-256 differs");
}

#[test]
fn half_closed_client_still_receives_the_whole_reply() {
    let backend = TestBackend::start("late", Mode::ReplyAfterEof);
    let port = free_port();
    let _srvlb = Srvlb::start(&static_service("half", port, &backend));
    let request = random_bytes(4 << 20, 7);
    let mut stream = TcpStream::connect(addr(port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream.write_all(&request).expect("send");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("reply after half-close");
    assert_eq!(reply.len(), request.len());
    assert_eq!(sha256(&reply), sha256(&request));
}

#[test]
fn sigterm_lets_open_connections_finish_then_exits_zero() {
    let backend = TestBackend::start("slow", Mode::Echo);
    let port = free_port();
    let mut srvlb = Srvlb::start(&format!(
        "[global]\nshutdown_grace = \"10s\"\n{}",
        static_service("drain", port, &backend)
    ));
    let mut stream = TcpStream::connect(addr(port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(b"before").expect("write");
    let mut buf = [0u8; 6];
    stream.read_exact(&mut buf).expect("echo before");
    srvlb.signal("TERM");
    srvlb.wait_log("draining connections", Duration::from_secs(5));
    // New clients are no longer accepted...
    assert!(
        eventually(Duration::from_secs(2), || TcpStream::connect(addr(port))
            .is_err()),
        "srvlb still accepts after SIGTERM"
    );
    // ...but the open connection keeps working during the grace period.
    for round in 0..5 {
        thread::sleep(Duration::from_millis(200));
        let msg = format!("round{round}");
        stream
            .write_all(msg.as_bytes())
            .expect("write during drain");
        let mut echo = vec![0u8; msg.len()];
        stream.read_exact(&mut echo).expect("echo during drain");
        assert_eq!(echo, msg.as_bytes());
    }
    assert_eq!(
        srvlb.wait_exit(Duration::from_millis(200)),
        None,
        "exited before the connection closed"
    );
    drop(stream);
    assert_eq!(
        srvlb.wait_exit(Duration::from_secs(5)),
        Some(0),
        "srvlb did not exit 0 after draining"
    );
}
