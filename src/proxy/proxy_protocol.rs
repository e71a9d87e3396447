//! The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2) that tells the
//! next hop who the real client is: written to backends (`send_proxy`), and read from a
//! balancer in front (`accept_proxy`). Decoding is a pure function of a byte prefix
//! ([`decode`]), so it is tested on arbitrary bytes; [`read_header`] is the I/O around it and
//! never consumes a byte of the payload that follows the header.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

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
    SocketAddr::new(super::canonical_ip(addr.ip()), addr.port())
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

/// The longest v1 line the specification allows, CRLF included.
const V1_MAX: usize = 107;
/// The fixed part of a v2 header: signature, version/command, family/protocol, length.
const V2_FIXED: usize = 16;

/// What a PROXY header says about the connection it precedes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The protocol version the header was written in.
    pub version: ProxyProtocol,
    /// The original client and the address it connected to, or `None` when the header
    /// carries no usable address (v1 `UNKNOWN`, v2 `LOCAL` such as a health check of the
    /// balancer in front, or an address family other than TCP over IPv4/IPv6): the
    /// connection's own addresses then stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("no PROXY header (the connection does not start with a v1 or v2 signature)")]
    NoSignature,
    #[error("PROXY v1 line longer than 107 bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 line: {0}")]
    V1Malformed(&'static str),
    #[error("PROXY v2: unsupported version or command byte {0:#04x}")]
    V2Command(u8),
    #[error("PROXY v2: address block of {have} bytes, {need} needed for its family")]
    V2Short { have: usize, need: usize },
}

/// The result of decoding a byte prefix of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole header: the first `length` bytes are the header, the rest is payload.
    Header {
        /// The header decoded.
        header: ProxyHeader,
        /// Its length in bytes.
        length: usize,
    },
    /// Nothing wrong so far, but the header is not complete yet.
    Incomplete,
    /// Not a valid PROXY header: the connection is refused.
    Invalid(HeaderError),
}

/// Decodes the PROXY header at the start of `bytes` (either version, told apart by their
/// signatures), strictly: a v1 line must be exactly `PROXY TCP4|TCP6 src dst sport dport`
/// with single spaces and CRLF, or `PROXY UNKNOWN...`; a v2 header must have version 2, a
/// known command, and an address block as long as its family needs (TLVs after it are
/// skipped).
pub fn decode(bytes: &[u8]) -> Decoded {
    const V1_SIGNATURE: &[u8] = b"PROXY ";
    let prefix = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..prefix] == V2_SIGNATURE[..prefix] && !bytes.is_empty() {
        return decode_v2(bytes);
    }
    let prefix = bytes.len().min(V1_SIGNATURE.len());
    if bytes[..prefix] == V1_SIGNATURE[..prefix] && !bytes.is_empty() {
        return decode_v1(bytes);
    }
    if bytes.is_empty() {
        Decoded::Incomplete
    } else {
        Decoded::Invalid(HeaderError::NoSignature)
    }
}

fn decode_v1(bytes: &[u8]) -> Decoded {
    let window = &bytes[..bytes.len().min(V1_MAX)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() >= V1_MAX {
            Decoded::Invalid(HeaderError::V1TooLong)
        } else {
            Decoded::Incomplete
        };
    };
    match parse_v1_line(&window[..cr]) {
        Ok(addresses) => Decoded::Header {
            header: ProxyHeader {
                version: ProxyProtocol::V1,
                addresses,
            },
            length: cr + 2,
        },
        Err(why) => Decoded::Invalid(HeaderError::V1Malformed(why)),
    }
}

/// `line` is the v1 header without its CRLF.
fn parse_v1_line(line: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "not ASCII")?;
    let mut fields = line.split(' ');
    if fields.next() != Some("PROXY") {
        return Err("does not start with \"PROXY \"");
    }
    let v6 = match fields.next() {
        Some("TCP4") => false,
        Some("TCP6") => true,
        // "UNKNOWN" may be followed by anything; the receiver ignores it.
        Some("UNKNOWN") => return Ok(None),
        _ => return Err("protocol is not TCP4, TCP6 or UNKNOWN"),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err("expected source, destination, source port and destination port");
    };
    let ip = |text: &str| -> Result<IpAddr, &'static str> {
        if v6 {
            text.parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| "bad IPv6 address")
        } else {
            text.parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| "bad IPv4 address")
        }
    };
    let port = |text: &str| -> Result<u16, &'static str> {
        let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        let no_leading_zero = text == "0" || !text.starts_with('0');
        if !(digits_only && no_leading_zero) {
            return Err("bad port");
        }
        text.parse().map_err(|_| "port out of range")
    };
    Ok(Some((
        SocketAddr::new(ip(src)?, port(sport)?),
        SocketAddr::new(ip(dst)?, port(dport)?),
    )))
}

fn decode_v2(bytes: &[u8]) -> Decoded {
    if bytes.len() < V2_FIXED {
        return Decoded::Incomplete;
    }
    let version_command = bytes[12];
    let local = match version_command {
        0x20 => true,
        0x21 => false,
        other => return Decoded::Invalid(HeaderError::V2Command(other)),
    };
    let family = bytes[13];
    let length = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let Some(block) = bytes.get(V2_FIXED..V2_FIXED + length) else {
        return Decoded::Incomplete;
    };
    let addresses = if local {
        None
    } else {
        match v2_addresses(family, block) {
            Ok(addresses) => addresses,
            Err(e) => return Decoded::Invalid(e),
        }
    };
    Decoded::Header {
        header: ProxyHeader {
            version: ProxyProtocol::V2,
            addresses,
        },
        length: V2_FIXED + length,
    }
}

fn v2_addresses(family: u8, block: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, HeaderError> {
    let need = match family {
        0x11 => 12, // TCP over IPv4
        0x21 => 36, // TCP over IPv6
        // UNSPEC, UDP, UNIX sockets: nothing srvlb can use; the connection's own addresses
        // stand, as the specification asks of a receiver.
        _ => return Ok(None),
    };
    if block.len() < need {
        return Err(HeaderError::V2Short {
            have: block.len(),
            need,
        });
    }
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    let addresses = if family == 0x11 {
        let ip = |at: usize| {
            IpAddr::V4(Ipv4Addr::new(
                block[at],
                block[at + 1],
                block[at + 2],
                block[at + 3],
            ))
        };
        (
            SocketAddr::new(ip(0), port(8)),
            SocketAddr::new(ip(4), port(10)),
        )
    } else {
        let ip = |at: usize| {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(octets))
        };
        (
            SocketAddr::new(ip(0), port(32)),
            SocketAddr::new(ip(16), port(34)),
        )
    };
    Ok(Some(addresses))
}

/// Why no header could be read from a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadHeaderError {
    #[error(transparent)]
    Invalid(#[from] HeaderError),
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before a complete PROXY header")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
    #[error("peer is not in accept_proxy_from: not trusted to send a PROXY header")]
    Untrusted,
}

/// Reads the PROXY header that must start `stream`, within `timeout`, and consumes exactly
/// its bytes: what follows is the client's payload and stays in the socket for the proxy.
///
/// Bytes are peeked first and decoded; only a complete header is consumed. While the header
/// is incomplete, the bytes peeked so far are consumed into a buffer (they are all header),
/// so that the next peek waits for new bytes instead of returning the same ones at once.
pub(crate) async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<ProxyHeader, ReadHeaderError> {
    let reading = async {
        let mut taken: Vec<u8> = Vec::new();
        let mut peeked = [0u8; 512];
        loop {
            let n = stream.peek(&mut peeked).await?;
            if n == 0 {
                return Err(ReadHeaderError::Closed);
            }
            // Nearly always the whole header comes in the first peek: decode it in place.
            let decoded = if taken.is_empty() {
                decode(&peeked[..n])
            } else {
                let mut seen = taken.clone();
                seen.extend_from_slice(&peeked[..n]);
                decode(&seen)
            };
            match decoded {
                Decoded::Header { header, length } => {
                    let rest = length - taken.len();
                    stream.read_exact(&mut peeked[..rest]).await?;
                    return Ok(header);
                }
                Decoded::Invalid(e) => return Err(e.into()),
                Decoded::Incomplete => {
                    stream.read_exact(&mut peeked[..n]).await?;
                    taken.extend_from_slice(&peeked[..n]);
                }
            }
        }
    };
    tokio::time::timeout(timeout, reading)
        .await
        .map_err(|_| ReadHeaderError::Timeout(timeout))?
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

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn decodes_what_it_writes_and_stops_at_the_payload() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            for (client, local) in [
                (addr("192.0.2.1:5000"), addr("198.51.100.2:443")),
                (addr("[2001:db8::1]:1234"), addr("[2001:db8::2]:80")),
            ] {
                let mut bytes = header(version, client, local);
                let length = bytes.len();
                bytes.extend_from_slice(b"payload");
                assert_eq!(
                    decode(&bytes),
                    Decoded::Header {
                        header: ProxyHeader {
                            version,
                            addresses: Some((client, local))
                        },
                        length
                    },
                    "{version:?} {client}"
                );
                for cut in 0..length {
                    assert_eq!(
                        decode(&bytes[..cut]),
                        Decoded::Incomplete,
                        "{version:?} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn v1_is_strict() {
        let bad = [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n"[..],
            b"PROXY TCP4 1.2.3.4  5.6.7.8 80 443\r\n",
            b"PROXY TCP4 ::1 ::1 80 443\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 80 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 080 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 9\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 80 443\r\n",
        ];
        for line in bad {
            assert!(
                matches!(decode(line), Decoded::Invalid(_) | Decoded::Incomplete),
                "{:?} accepted",
                String::from_utf8_lossy(line)
            );
            // With more bytes behind it, nothing malformed is ever accepted.
            let mut longer = line.to_vec();
            longer.extend_from_slice(&[b'x'; 120]);
            assert!(matches!(decode(&longer), Decoded::Invalid(_)), "{line:?}");
        }
        assert_eq!(
            decode(b"PROXY UNKNOWN whatever\r\nGET"),
            Decoded::Header {
                header: ProxyHeader {
                    version: ProxyProtocol::V1,
                    addresses: None
                },
                length: 24
            }
        );
        assert_eq!(
            decode(b"GET / HTTP/1.1\r\n"),
            Decoded::Invalid(HeaderError::NoSignature)
        );
        assert_eq!(
            decode(&[b'P'; 200]),
            Decoded::Invalid(HeaderError::NoSignature)
        );
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.extend_from_slice(&[b'a'; 100]);
        assert_eq!(decode(&long), Decoded::Invalid(HeaderError::V1TooLong));
    }

    #[test]
    fn v2_local_and_unusable_families_keep_the_connection_addresses() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(
            decode(&local),
            Decoded::Header {
                header: ProxyHeader {
                    version: ProxyProtocol::V2,
                    addresses: None
                },
                length: 16
            }
        );
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 0x04, 1, 2, 3, 4]);
        assert!(matches!(
            decode(&unix),
            Decoded::Header {
                header: ProxyHeader {
                    addresses: None,
                    ..
                },
                length: 20
            }
        ));
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(
            decode(&short),
            Decoded::Invalid(HeaderError::V2Short { have: 4, need: 12 })
        );
        let mut version1 = V2_SIGNATURE.to_vec();
        version1.extend_from_slice(&[0x11, 0x11, 0x00, 0x00]);
        assert_eq!(
            decode(&version1),
            Decoded::Invalid(HeaderError::V2Command(0x11))
        );
    }

    #[tokio::test]
    async fn read_header_leaves_the_payload_in_the_socket() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(target).await.expect("connect");
            let h = header(
                ProxyProtocol::V1,
                addr("192.0.2.9:4000"),
                addr("192.0.2.10:80"),
            );
            // In two pieces, the second with the payload right behind the header.
            stream.write_all(&h[..10]).await.expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut rest = h[10..].to_vec();
            rest.extend_from_slice(b"hello");
            stream.write_all(&rest).await.expect("write");
            stream
        });
        let (mut server, _) = listener.accept().await.expect("accept");
        let got = read_header(&mut server, Duration::from_secs(5))
            .await
            .expect("header");
        assert_eq!(
            got.addresses,
            Some((addr("192.0.2.9:4000"), addr("192.0.2.10:80")))
        );
        let mut payload = [0u8; 5];
        server.read_exact(&mut payload).await.expect("payload");
        assert_eq!(&payload, b"hello");
        drop(client.await.expect("client"));

        // A client that never completes its header is let go after the timeout.
        let silent = tokio::spawn(async move {
            let mut s = TcpStream::connect(target).await.expect("connect");
            s.write_all(b"PROXY TCP4").await.expect("write");
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let (mut server, _) = listener.accept().await.expect("accept");
        let err = read_header(&mut server, Duration::from_millis(200)).await;
        assert!(matches!(err, Err(ReadHeaderError::Timeout(_))), "{err:?}");
        silent.abort();
    }
}
