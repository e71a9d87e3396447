//! The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2) that tells a
//! backend who the real client is. srvlb only writes it; it never parses payload.

use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocol;

const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// The header announcing a connection from `client` to `local` (srvlb's listening address).
pub fn header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = (unmap(client), unmap(local));
    match version {
        ProxyProtocol::V1 => v1(client, local),
        ProxyProtocol::V2 => v2(client, local),
    }
}

/// An IPv4 client reaching an IPv6 listener appears as ::ffff:a.b.c.d; backends want a.b.c.d.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let line = match (client.ip(), local.ip()) {
        (IpAddr::V4(c), IpAddr::V4(l)) => {
            format!("PROXY TCP4 {c} {l} {} {}\r\n", client.port(), local.port())
        }
        (IpAddr::V6(c), IpAddr::V6(l)) => {
            format!("PROXY TCP6 {c} {l} {} {}\r\n", client.port(), local.port())
        }
        // Mixed families cannot be expressed in v1.
        _ => "PROXY UNKNOWN\r\n".to_owned(),
    };
    line.into_bytes()
}

fn v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(52);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    match (client.ip(), local.ip()) {
        (IpAddr::V4(c), IpAddr::V4(l)) => {
            out.push(0x11); // TCP over IPv4
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.octets());
            out.extend_from_slice(&l.octets());
        }
        (IpAddr::V6(c), IpAddr::V6(l)) => {
            out.push(0x21); // TCP over IPv6
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&c.octets());
            out.extend_from_slice(&l.octets());
        }
        _ => {
            out.push(0x00); // UNSPEC: the backend uses the connection's own addresses
            out.extend_from_slice(&0u16.to_be_bytes());
            return out;
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_ipv4_and_mapped() {
        let h = header(
            ProxyProtocol::V1,
            "[::ffff:192.0.2.1]:5000".parse().expect("addr"),
            "198.51.100.2:443".parse().expect("addr"),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n");
    }

    #[test]
    fn v2_ipv6_layout() {
        let h = header(
            ProxyProtocol::V2,
            "[2001:db8::1]:1234".parse().expect("addr"),
            "[2001:db8::2]:80".parse().expect("addr"),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x21);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 36);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(u16::from_be_bytes([h[48], h[49]]), 1234);
        assert_eq!(u16::from_be_bytes([h[50], h[51]]), 80);
    }
}
