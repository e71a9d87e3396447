//! How many clients wait in a listening socket's accept queue. Linux reports it in
//! /proc/net/tcp and /proc/net/tcp6: for a socket in LISTEN state, `rx_queue` is the number
//! of completed handshakes not yet accepted. The queue's size is the listen(2) backlog capped
//! by net.core.somaxconn. Read only when /metrics or /status is asked for, never on the
//! accept path.
//!
//! The kernel lists every listening socket before any other, so reading stops at the first
//! line that is not LISTEN: the cost does not grow with the number of open connections.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};

/// The accept queue of one listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Backlog {
    /// Connections completed by the kernel and waiting for accept(2).
    pub(crate) queued: u64,
}

/// The accept queue's size for a socket that asked for `requested`: the kernel caps it at
/// net.core.somaxconn. `None` where that cannot be read.
pub(crate) fn capacity(requested: u64) -> Option<u64> {
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(requested.min(somaxconn))
}

/// The socket inode of a descriptor, by which /proc/net/tcp names a socket.
#[cfg(target_os = "linux")]
pub(crate) fn socket_inode(fd: &impl std::os::fd::AsRawFd) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .ok()
        .map(|m| m.ino())
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn socket_inode<T>(_fd: &T) -> Option<u64> {
    None
}

/// The accept queues of the listening sockets whose inodes are in `inodes`; a socket not
/// found (or a platform without /proc/net/tcp) is absent from the map.
pub(crate) fn read(inodes: &[u64]) -> HashMap<u64, Backlog> {
    let mut out = HashMap::new();
    if inodes.is_empty() {
        return out;
    }
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(file) = std::fs::File::open(path) else {
            continue;
        };
        scan(BufReader::new(file), inodes, &mut out);
        if out.len() == inodes.len() {
            break;
        }
    }
    out
}

/// Reads the LISTEN lines at the head of one /proc/net/tcp-format table.
fn scan(reader: impl BufRead, inodes: &[u64], out: &mut HashMap<u64, Backlog>) {
    for line in reader.lines().skip(1) {
        let Ok(line) = line else { return };
        match parse_listen_line(&line) {
            Some((inode, backlog)) => {
                if inodes.contains(&inode) {
                    out.insert(inode, backlog);
                }
            }
            // The first non-LISTEN line: the listening sockets are behind us.
            None => return,
        }
    }
}

/// `(inode, backlog)` for a LISTEN line (state 0A); `None` for any other line.
fn parse_listen_line(line: &str) -> Option<(u64, Backlog)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(3) != Some(&"0A") {
        return None;
    }
    let (_tx, rx) = fields.get(4)?.split_once(':')?;
    let inode = fields.get(9)?.parse().ok()?;
    Some((
        inode,
        Backlog {
            queued: u64::from_str_radix(rx, 16).ok()?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00001000:00000005 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F91 00000000:0000 0A 00000080:00000000 00:00000000 00000000  1000        0 4243 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D2C4 01 00000000:00000000 00:00000000 00000000  1000        0 4244 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:1F92 00000000:0000 0A 00000010:00000003 00:00000000 00000000  1000        0 4245 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn reads_listen_lines_and_stops_at_the_first_other() {
        let mut out = HashMap::new();
        scan(TABLE.as_bytes(), &[4242, 4243, 4245], &mut out);
        assert_eq!(out.get(&4242), Some(&Backlog { queued: 5 }));
        assert_eq!(out.get(&4243).map(|b| b.queued), Some(0));
        // After an established line; the kernel never lists a LISTEN socket there.
        assert_eq!(out.get(&4245), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn counts_connections_waiting_on_a_real_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let inode = socket_inode(&listener).expect("inode");
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let backlog = read(&[inode]);
        assert_eq!(
            backlog.get(&inode).map(|b| b.queued),
            Some(3),
            "{backlog:?}"
        );
        drop(clients);
    }
}
