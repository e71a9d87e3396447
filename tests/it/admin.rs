//! The admin endpoint under clients that misbehave: many that connect and stay silent, and
//! ones that ask for a large /metrics and never read it. srvlb must keep a bounded number
//! of them open, close each within its response timeout, and keep answering operators.

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::harness::{Srvlb, eventually, free_port};

/// srvlb closes an admin connection at most this long (its RESPONSE_TIMEOUT, 10 s) after
/// accepting it; the margin is for a loaded machine.
const CLOSED_WITHIN: Duration = Duration::from_secs(25);

/// A config with an admin endpoint and `backends` static backends (never connected to:
/// they only make /metrics large).
fn config(admin: SocketAddr, backends: usize) -> String {
    let statics: Vec<String> = (0..backends)
        .map(|i| format!("\"127.0.{}.{}:9\"", 1 + i / 250, 1 + i % 250))
        .collect();
    format!(
        "[global]\nadmin = \"{admin}\"\nshutdown_grace = \"1s\"\n\n[[service]]\nname = \"main\"\n\
         listen = [\"127.0.0.1:{}\"]\nstatic = [{}]\n",
        free_port(),
        statics.join(", ")
    )
}

/// GET `path` with generous timeouts; the status line and the body length.
fn get(admin: SocketAddr, path: &str) -> std::io::Result<(String, usize)> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((head.lines().next().unwrap_or("").to_owned(), body.len()))
}

#[test]
fn silent_admin_clients_are_capped_and_operators_are_still_answered() {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let srvlb = Srvlb::start(&config(admin, 2));
    let (status, _) = get(admin, "/healthz").expect("healthz");
    assert!(status.contains("200"), "{status}");
    let baseline = srvlb.fd_count();

    // 100 clients connect and never send a byte.
    let silent: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect_timeout(&admin, Duration::from_secs(10)).expect("connect"))
        .collect();
    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < Duration::from_secs(2) {
        peak = peak.max(srvlb.fd_count().saturating_sub(baseline));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        (1..=70).contains(&peak),
        "srvlb should hold about 64 admin connections (the cap), held {peak} more fds"
    );

    // An operator behind them in the backlog is answered once slots free up.
    let (status, body) = get(admin, "/metrics").expect("metrics while flooded");
    assert!(status.contains("200") && body > 0, "{status}");
    println!(
        "GET /metrics behind 100 silent clients answered after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        eventually(CLOSED_WITHIN, || srvlb.fd_count() <= baseline),
        "silent admin connections are not closed: {} fds over the baseline",
        srvlb.fd_count().saturating_sub(baseline)
    );
    drop(silent);
}

#[test]
fn an_admin_client_that_never_reads_is_closed_after_the_timeout() {
    // Enough backends that /metrics outgrows any socket buffer the kernel may give the
    // connection (tcp_wmem's maximum on the sending side, plus our small receive buffer).
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let srvlb = Srvlb::start(&config(admin, 6000));
    let (status, size) = get(admin, "/metrics").expect("metrics");
    assert!(status.contains("200"), "{status}");
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    assert!(
        size > wmem_max + (1 << 20),
        "/metrics ({size} bytes) too small to stall against tcp_wmem max {wmem_max}"
    );
    let baseline = srvlb.fd_count();

    let stalled: Vec<TcpStream> = (0..2)
        .map(|_| {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
            socket
                .connect_timeout(&admin.into(), Duration::from_secs(10))
                .expect("connect");
            let mut stream: TcpStream = socket.into();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("send request");
            stream
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || srvlb.fd_count() >= baseline + 2),
        "the stalled clients were not accepted"
    );
    let started = Instant::now();
    assert!(
        eventually(CLOSED_WITHIN, || srvlb.fd_count() <= baseline),
        "an admin client that never reads keeps its connection open"
    );
    println!(
        "stalled admin connections closed {:.1}s after they were seen",
        started.elapsed().as_secs_f64()
    );
    let (status, _) = get(admin, "/healthz").expect("healthz after");
    assert!(status.contains("200"), "{status}");
    drop(stalled);
}
