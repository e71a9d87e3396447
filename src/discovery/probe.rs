//! Tells a refused DNS query from a slow one. hickory sends UDP queries from unconnected
//! sockets, which never see the ICMP "port unreachable" a host returns when nothing listens
//! on the server's port, so a closed port looks like a timeout (and a stale service) only
//! seconds later. When an answer is late, one query from a *connected* UDP socket per
//! server gets that error at once. It only ever reports refusals; it never answers.

use std::future::pending;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

/// How long an answer may take before the probe runs: loopback and LAN servers answer
/// well within it, so a healthy server never sees the probe's query.
const PROBE_AFTER: Duration = Duration::from_millis(250);

/// Resolves with a message once every server in `nameservers` has refused a query for
/// `name` (connection refused); otherwise never resolves. Runs beside the real lookup.
pub(crate) async fn refused(nameservers: &[SocketAddr], name: &str) -> String {
    if nameservers.is_empty() {
        return pending().await;
    }
    tokio::time::sleep(PROBE_AFTER).await;
    let mut refusals = Vec::with_capacity(nameservers.len());
    for server in nameservers {
        match probe(*server, name).await {
            Ok(true) => refusals.push(server.to_string()),
            // Answered, silent or a local error: says nothing; the lookup decides.
            Ok(false) | Err(_) => return pending().await,
        }
    }
    format!(
        "DNS server {} refused the query (connection refused: nothing listens on that port)",
        refusals.join(", ")
    )
}

/// True when `server` refuses a query at once (ICMP port unreachable / ECONNREFUSED).
async fn probe(server: SocketAddr, name: &str) -> io::Result<bool> {
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    let id = rand::random::<u16>();
    match socket.send(&srv_query(id, name)).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(true),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let mut buf = [0u8; 512];
    // The refusal arrives within a round trip; an answer (or nothing) means "not refused".
    match tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf)).await {
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
        Ok(Err(e)) => Err(e),
        Ok(Ok(_)) | Err(_) => Ok(false),
    }
}

/// A minimal DNS query: `<name> IN SRV`, recursion desired.
fn srv_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(name.len() + 18);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT=1
    for label in name.split('.').filter(|l| !l.is_empty()) {
        // Labels longer than 63 bytes cannot occur: config validation rejects them.
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.push(0);
    q.extend_from_slice(&[0, 33, 0, 1]); // QTYPE=SRV, QCLASS=IN
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encodes_labels_and_type() {
        let q = srv_query(7, "_a._tcp.x.");
        assert_eq!(&q[..2], &[0, 7]);
        assert_eq!(&q[12..], b"\x02_a\x04_tcp\x01x\x00\x00\x21\x00\x01");
    }

    #[tokio::test]
    async fn a_closed_port_is_reported_as_refused_at_once() {
        // A port nothing listens on: bind one, learn its number, close it.
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.local_addr().expect("addr").port()
        };
        let server: SocketAddr = ([127, 0, 0, 1], port).into();
        let started = std::time::Instant::now();
        let why = tokio::time::timeout(Duration::from_secs(3), refused(&[server], "_a._tcp.x."))
            .await
            .expect("refusal reported");
        assert!(why.contains("refused"), "{why}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // A server that answers (here: one that is bound and silent) is not "refused".
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = silent.local_addr().expect("addr");
        let quiet =
            tokio::time::timeout(Duration::from_secs(2), refused(&[addr], "_a._tcp.x.")).await;
        assert!(
            quiet.is_err(),
            "a listening server was reported as refusing"
        );
    }
}
