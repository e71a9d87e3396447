//! `accept_proxy`: srvlb behind another balancer that announces each client with a PROXY
//! header. A real HAProxy (`send-proxy` and `send-proxy-v2`) stands in front; the address it
//! announces must be the client for allow/deny and for the PROXY header srvlb sends on, and a
//! connection without a valid header must be closed and counted, never proxied.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support;
use support::bind::skip_or_fail;
use support::harness::{StaticLb as Lb, free_port, temp_dir};

/// A backend that expects srvlb's PROXY v1 line, answers with it, and closes.
fn proxy_echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let mut reader = BufReader::new(&stream);
                if reader.read_line(&mut line).is_ok() {
                    let _ = (&stream).write_all(line.as_bytes());
                }
            });
        }
    });
    addr
}

/// Connects to `to` from `source` and returns the first line the far end sends, or why not.
fn first_line_from(source: &str, to: SocketAddr) -> std::io::Result<String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let source: SocketAddr = format!("{source}:0").parse().expect("source");
    socket.bind(&source.into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(line)
}

/// A real HAProxy in tcp mode with one frontend per PROXY version, both in front of `srvlb`.
struct Haproxy {
    child: Child,
    v1: SocketAddr,
    v2: SocketAddr,
    _dir: PathBuf,
}

impl Haproxy {
    fn start(srvlb: SocketAddr) -> Option<Haproxy> {
        let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let Some(bin) = bin else {
            skip_or_fail("haproxy is not installed (run .ci/install-deps)");
            return None;
        };
        let v1 = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let v2 = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dir = temp_dir("haproxy");
        let config = format!(
            "global\n  maxconn 200\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
             frontend v1\n  bind {v1}\n  default_backend to_srvlb_v1\n\
             backend to_srvlb_v1\n  server srvlb {srvlb} send-proxy\n\
             frontend v2\n  bind {v2}\n  default_backend to_srvlb_v2\n\
             backend to_srvlb_v2\n  server srvlb {srvlb} send-proxy-v2\n"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn haproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(v2).is_err() || TcpStream::connect(v1).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not start listening");
            thread::sleep(Duration::from_millis(50));
        }
        Some(Haproxy {
            child,
            v1,
            v2,
            _dir: dir,
        })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn behind_haproxy_the_announced_client_is_the_client() {
    let backend = proxy_echo_backend();
    let lb = Lb::start(
        &[backend],
        "accept_proxy = true\naccept_proxy_from = [\"127.0.0.1\"]\nsend_proxy = \"v1\"\n\
         allow = [\"127.0.0.7\"]",
        "",
    );
    let Some(haproxy) = Haproxy::start(lb.listen) else {
        return;
    };
    for (version, front) in [("send-proxy", haproxy.v1), ("send-proxy-v2", haproxy.v2)] {
        // HAProxy connects to srvlb from 127.0.0.1, which allow would refuse: only the
        // announced client, 127.0.0.7, lets the connection through.
        let line = first_line_from("127.0.0.7", front).expect("answer through both LBs");
        eprintln!("{version}: the backend saw {line:?}");
        let fields: Vec<&str> = line.trim_end().split(' ').collect();
        assert_eq!(
            &fields[..4],
            &["PROXY", "TCP4", "127.0.0.7", "127.0.0.1"],
            "{version}: srvlb passed on {line:?}"
        );
        assert_eq!(
            fields[5],
            front.port().to_string(),
            "{version}: the destination is the address the client reached (HAProxy's)"
        );
        // Another announced client is refused by allow/deny as if it had connected itself.
        let refused = first_line_from("127.0.0.8", front);
        assert!(
            !matches!(&refused, Ok(line) if !line.is_empty()),
            "{version}: 127.0.0.8 got through: {refused:?}"
        );
    }
    assert!(
        lb.service_metric("srvlb_service_denied_total") >= 2,
        "the refused clients were not counted as denied"
    );
    // A client reaching srvlb directly cannot claim an allowed address: only the balancer
    // (accept_proxy_from) is trusted to send the header.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let from: SocketAddr = "127.0.0.5:0".parse().expect("addr");
    socket.bind(&from.into()).expect("bind");
    socket.connect(&lb.listen.into()).expect("connect");
    let mut forged: TcpStream = socket.into();
    forged
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // srvlb may reset the untrusted peer before the write even lands: that is a refusal too.
    let _ = forged.write_all(b"PROXY TCP4 127.0.0.7 127.0.0.1 4000 80\r\n");
    let mut buf = [0u8; 64];
    let got = forged.read(&mut buf);
    assert!(
        matches!(got, Ok(0) | Err(_)),
        "a forged header from an untrusted peer got through: {got:?}"
    );
    assert_eq!(
        lb.service_metric("srvlb_service_proxy_header_rejected_total"),
        1
    );
}

#[test]
fn a_connection_without_a_valid_header_is_closed_and_counted() {
    let backend = proxy_echo_backend();
    let lb = Lb::start(
        &[backend],
        "accept_proxy = true\naccept_proxy_timeout = \"1s\"\nsend_proxy = \"v1\"",
        "",
    );
    // Payload where the header should be: closed, nothing reaches a backend.
    let mut garbage = TcpStream::connect(lb.listen).expect("connect");
    garbage
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    let mut buf = [0u8; 64];
    let read = garbage.read(&mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a connection without a header got {read:?}"
    );
    // A client that never finishes its header is let go after accept_proxy_timeout.
    let mut silent = TcpStream::connect(lb.listen).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    silent.write_all(b"PROXY TCP4 192.0.2.1").expect("write");
    let started = Instant::now();
    let read = silent.read(&mut buf);
    let waited = started.elapsed();
    assert!(matches!(read, Ok(0) | Err(_)), "silent client got {read:?}");
    assert!(
        waited < Duration::from_secs(5),
        "the silent client was held {waited:?}, past the 1 s header timeout"
    );
    // A v2 LOCAL header (the health check of a balancer in front) is accepted: the
    // connection's own address stands.
    let mut local = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
    ];
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let mut check = TcpStream::connect(lb.listen).expect("connect");
    check
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    check.write_all(&local).expect("write");
    let mut line = String::new();
    BufReader::new(&check).read_line(&mut line).expect("answer");
    assert!(
        line.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 "),
        "a LOCAL connection should pass with its own address, got {line:?}"
    );
    let rejected = lb.service_metric("srvlb_service_proxy_header_rejected_total");
    assert_eq!(rejected, 2, "rejected headers counted");
    let logged = lb
        .events("connection closed")
        .iter()
        .filter(|f| f["reason"] == "bad_proxy_header")
        .count();
    assert!(logged >= 1, "no bad_proxy_header line was logged");
}
