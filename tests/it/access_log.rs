//! The access log through the spawned binary: one line per connection in its own file, in
//! JSON or text, with what an operator looks for (client, backend, bytes, reason), and a
//! new file after logrotate moves the old one away and sends SIGUSR1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::support;
use support::harness::{Mode, Srvlb, TestBackend, eventually, free_port, temp_dir};

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// One round trip of `n` bytes through srvlb, then a clean close.
fn round_trip(listen: SocketAddr, n: usize) {
    let mut c = TcpStream::connect(listen).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(&vec![b'x'; n]).expect("write");
    c.shutdown(std::net::Shutdown::Write).expect("fin");
    let mut back = Vec::new();
    c.read_to_end(&mut back).expect("read");
    assert_eq!(back.len(), n, "echo");
}

fn config(listen: SocketAddr, backend: SocketAddr, log: &Path, format: &str) -> String {
    format!(
        "[global]\naccess_log = \"{}\"\naccess_log_format = \"{format}\"\n\
         [[service]]\nname = \"app\"\nlisten = [\"{listen}\"]\nstatic = [\"{backend}\"]\n\
         deny = [\"127.0.0.99\"]\n",
        log.display()
    )
}

#[test]
fn one_line_per_connection_and_a_new_file_after_rotation() {
    let backend = TestBackend::start("a", Mode::Echo);
    let dir = temp_dir("access-log");
    let log = dir.join("access.log");
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let srvlb = Srvlb::start(&config(listen, backend.addr, &log, "json"));
    round_trip(listen, 100);
    round_trip(listen, 2000);
    // A denied client has its line too.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let from: SocketAddr = "127.0.0.99:0".parse().expect("addr");
    socket.bind(&from.into()).expect("bind");
    socket.connect(&listen.into()).expect("connect");
    let mut denied: TcpStream = socket.into();
    denied
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = denied.read(&mut [0u8; 8]);
    assert!(
        eventually(Duration::from_secs(5), || lines(&log).len() == 3),
        "expected 3 lines, got {:?}",
        lines(&log)
    );
    let records: Vec<serde_json::Value> = lines(&log)
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let served: Vec<_> = records.iter().filter(|r| r["reason"] == "closed").collect();
    assert_eq!(served.len(), 2, "{records:?}");
    let mut bytes: Vec<u64> = served
        .iter()
        .map(|r| r["bytes_in"].as_u64().unwrap_or(0))
        .collect();
    bytes.sort_unstable();
    assert_eq!(bytes, vec![100, 2000]);
    for r in &served {
        assert_eq!(r["service"], "app");
        assert_eq!(r["backend"], backend.addr.to_string());
        assert_eq!(r["bytes_out"], r["bytes_in"]);
        assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
    }
    let refused: Vec<_> = records.iter().filter(|r| r["reason"] == "denied").collect();
    assert_eq!(refused.len(), 1, "{records:?}");
    assert!(
        refused[0]["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.99:"))
    );

    // logrotate: move the file away, then SIGUSR1. New lines go to a new file at the path.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    srvlb.signal("USR1");
    srvlb.wait_log("access log reopened", Duration::from_secs(5));
    round_trip(listen, 7);
    assert!(
        eventually(Duration::from_secs(5), || lines(&log).len() == 1),
        "the new file has {:?}",
        lines(&log)
    );
    assert_eq!(lines(&rotated).len(), 3, "the rotated file kept its lines");

    // A reload to text applies to the next line.
    srvlb.write_config(&config(listen, backend.addr, &log, "text"));
    srvlb.signal("HUP");
    srvlb.wait_log("configuration reloaded", Duration::from_secs(10));
    round_trip(listen, 9);
    assert!(
        eventually(Duration::from_secs(5), || lines(&log).len() == 2),
        "{:?}",
        lines(&log)
    );
    let text = &lines(&log)[1];
    assert!(
        text.contains(" service=app ")
            && text.contains(" bytes_in=9 ")
            && text.ends_with("reason=closed"),
        "{text}"
    );
}

#[test]
fn an_access_log_that_cannot_be_opened_stops_the_start() {
    let backend = TestBackend::start("a", Mode::Echo);
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let bad = Path::new("/nonexistent-dir/srvlb/access.log");
    let mut srvlb = Srvlb::spawn_with_env(&config(listen, backend.addr, bad, "text"), &[]);
    assert_eq!(srvlb.wait_exit(Duration::from_secs(10)), Some(2));
    assert!(
        srvlb.log_contains("cannot open the access log /nonexistent-dir/srvlb/access.log"),
        "{:?}",
        srvlb.log()
    );
}
